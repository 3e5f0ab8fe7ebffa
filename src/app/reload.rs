//! `SIGHUP` (`systemctl reload weft`): re-reads the config file and applies what can change
//! without a restart — `network.trusted_subnets`, `network.mtu`, `wireguard_peers`,
//! `mesh.peers` and `log_level` — touching only what changed, so traffic to unaffected peers
//! keeps flowing. A config that does not load, or that changes anything else, is refused as a
//! whole with a logged error naming why, and the running config stays. A change that fails
//! half-way is taken back step by step (apply, then commit), so nothing is left half-applied.

use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use anyhow::{Context as _, bail};
use ipnet::IpNet;
use tokio::sync::watch;
use tracing::{error, info};
use weft_config::Config;
use weft_router::PeerConfig;

use crate::api::status::NodeStatus;
use crate::host::netlink::Netlink;

/// Changes the log filter (absent when `WEFT_LOG` fixes it).
pub type SetLog = Box<dyn Fn(&str) -> anyhow::Result<()> + Send + Sync>;

/// The sections of `new` that differ from `old` in keys a reload cannot apply.
pub fn needs_restart(old: &Config, new: &Config) -> Vec<&'static str> {
    let mut n = new.clone();
    n.network
        .trusted_subnets
        .clone_from(&old.network.trusted_subnets);
    n.network.mtu = old.network.mtu;
    n.wireguard_peers.clone_from(&old.wireguard_peers);
    n.mesh.peers.clone_from(&old.mesh.peers);
    n.log_level.clone_from(&old.log_level);
    let mut out = Vec::new();
    for (differs, name) in [
        (n.node != old.node, "node"),
        (
            n.network != old.network,
            "network (other than trusted_subnets and mtu)",
        ),
        (n.mesh != old.mesh, "mesh (other than peers)"),
        (n.router != old.router, "router"),
        (n.cni != old.cni, "cni"),
        (n.kubernetes != old.kubernetes, "kubernetes"),
        (n.state_dir != old.state_dir, "state_dir"),
        (n.api_socket != old.api_socket, "api_socket"),
        (n.metrics_address != old.metrics_address, "metrics_address"),
    ] {
        if differs {
            out.push(name);
        }
    }
    out
}

/// What a reload needs to reach.
pub struct Reloader {
    /// The config file.
    pub path: PathBuf,
    /// The running config.
    pub config: Config,
    /// Netlink, for the TUN device's MTU and routes.
    pub netlink: Netlink,
    /// The TUN device's name and index.
    pub interface: (String, u32),
    /// Its MTU now.
    pub mtu: u16,
    /// The private address whose link set the MTU at start (the config's or the Node's).
    pub underlay: Option<std::net::IpAddr>,
    /// The router driver.
    pub router: crate::handle::RouterHandle,
    /// The mesh driver (closed when the mesh is off).
    pub mesh: Option<crate::handle::MeshHandle>,
    /// The reconciler's configured peers, when the mesh is on (else they go to the router
    /// directly).
    pub statics: Option<watch::Sender<Vec<PeerConfig>>>,
    /// What status shows of this node.
    pub node: Arc<Mutex<NodeStatus>>,
    /// The CNI conflist, whose MTU follows the overlay's.
    pub conflist: crate::cni::ConflistWriter,
    /// Changes the log filter.
    pub set_log: Option<SetLog>,
    /// `mesh.authority` and the certificate this node publishes.
    pub certified: Option<super::certify::Certified>,
}

impl std::fmt::Debug for Reloader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Reloader")
            .field("path", &self.path)
            .field("interface", &self.interface)
            .field("mtu", &self.mtu)
            .finish_non_exhaustive()
    }
}

impl Reloader {
    /// Handles one SIGHUP: logs what was applied, or why nothing was.
    pub async fn on_hangup(&mut self) {
        match self.reload().await {
            Ok(applied) if applied.is_empty() => {
                info!(path = %self.path.display(), "SIGHUP: config reloaded, nothing changed");
            }
            Ok(applied) => info!(
                path = %self.path.display(), applied = ?applied,
                "SIGHUP: config reloaded"
            ),
            Err(e) => error!(
                path = %self.path.display(), error = format!("{e:#}"),
                "SIGHUP: reload refused; the running config stays"
            ),
        }
    }

    /// Loads and checks the new config, then applies its changes; returns what changed.
    ///
    /// Apply, then commit: the running config is replaced only once every change is in place.
    /// Each change that succeeds leaves a step to undo it; when one fails, the steps already
    /// taken are undone in reverse, so the running config *and* the applied state (log level,
    /// MTU, routes, configured peers) are as they were, and the same file can be reloaded again.
    pub async fn reload(&mut self) -> anyhow::Result<Vec<String>> {
        let mut new = Config::load(&self.path)?;
        // The certificate is read again: it gives node.pod_cidr, and a renewed one (the same
        // blocks) is published without a restart.
        let certified =
            super::certify::certify(&mut new, &self.path, crate::control::now_millis())?;
        if let (Some(c), Some(path)) = (&certified, &new.mesh.certificate) {
            super::certify::no_worse(c, self.certified.as_ref(), crate::control::now_millis())
                .with_context(|| format!("mesh.certificate {}", path.display()))?;
            c.log_window(path);
        }
        let restart = needs_restart(&self.config, &new);
        if !restart.is_empty() {
            bail!(
                "changing {} needs a restart (systemctl restart weft); nothing was applied",
                restart.join(", ")
            );
        }
        // Everything that can fail without changing anything comes first.
        let mtu = crate::host::netlink::choose_mtu(&new, &self.netlink, self.underlay).await?;
        let mut undo = Vec::new();
        let mut applied = match self.apply(&new, mtu, &mut undo).await {
            Ok(applied) => applied,
            Err(e) => {
                let steps = undo.len();
                let failed = self.undo(undo).await;
                if failed.is_empty() {
                    return Err(e.context(format!(
                        "nothing was applied ({steps} change(s) made before this were undone)"
                    )));
                }
                return Err(e.context(format!(
                    "undoing the {steps} change(s) made before this failed too: {}",
                    failed.join("; ")
                )));
            }
        };
        // Committed: the new config runs. What follows goes to the mesh and cannot fail.
        let old = std::mem::replace(&mut self.config, new);
        let new = &self.config;
        if new.network.trusted_subnets != old.network.trusted_subnets {
            let trusted = new.network.trusted_subnets.clone();
            let change = move |r: &mut weft_mesh::NodeRecord| r.trusted_subnets = trusted;
            if let Some(mesh) = &self.mesh {
                mesh.modify(change).await;
            }
            applied.push(format!(
                "trusted_subnets {:?}",
                subnets(&new.network.trusted_subnets)
            ));
        }
        if new.mesh.peers != old.mesh.peers {
            if let Some(mesh) = &self.mesh {
                mesh.join(new.mesh.peers.clone()).await;
            }
            applied.push(format!("mesh.peers {:?}", new.mesh.peers));
        }
        let cert =
            |c: &Option<super::certify::Certified>| c.as_ref().map(|c| c.certificate.clone());
        if cert(&certified) != cert(&self.certified) {
            if let Ok(mut node) = self.node.lock() {
                node.certificate_not_after_ms = certified.as_ref().map(|c| c.certificate.not_after);
            }
            let cert = certified.as_ref().map(|c| Box::new(c.certificate.clone()));
            if let (Some(mesh), Some(c)) = (&self.mesh, &cert) {
                let not_after = c.not_after;
                mesh.modify(move |r| r.certificate = cert).await;
                applied.push(format!("mesh.certificate (valid until {not_after} ms)"));
            }
            self.certified = certified;
        }
        Ok(applied)
    }

    /// The changes that can fail, in order, each recording how to undo it in `undo`.
    async fn apply(
        &mut self,
        new: &Config,
        mtu: u16,
        undo: &mut Vec<Undo>,
    ) -> anyhow::Result<Vec<String>> {
        let old = &self.config.clone();
        let (name, index) = self.interface.clone();
        let mut applied = Vec::new();
        if new.log_level != old.log_level
            && let Some(set) = &self.set_log
        {
            set(&new.log_level).context("log_level")?;
            undo.push(Undo::LogLevel(old.log_level.clone()));
            applied.push(format!("log_level {}", new.log_level));
        }
        if mtu != self.mtu {
            self.netlink.set_mtu(&name, index, mtu).await?;
            undo.push(Undo::Mtu(self.mtu));
            applied.push(format!("mtu {} -> {mtu}", self.mtu));
            self.show_mtu(mtu);
        }
        if new.wireguard_peers != old.wireguard_peers {
            let (before, after) = (crate::plan::routes(old), crate::plan::routes(new));
            for r in after.iter().filter(|r| !before.contains(r)) {
                self.netlink.add_route(&name, index, *r).await?;
                undo.push(Undo::RouteAdded(*r));
            }
            self.set_statics(crate::plan::static_peers(new)).await?;
            undo.push(Undo::Statics(crate::plan::static_peers(old)));
            for r in before.iter().filter(|r| !after.contains(r)) {
                self.netlink.delete_route(&name, index, *r).await?;
                undo.push(Undo::RouteDeleted(*r));
            }
            applied.push(format!("wireguard_peers ({})", new.wireguard_peers.len()));
        }
        Ok(applied)
    }

    /// Takes `steps` back, last first; returns what could not be taken back.
    async fn undo(&mut self, steps: Vec<Undo>) -> Vec<String> {
        let (name, index) = self.interface.clone();
        let mut failed = Vec::new();
        for step in steps.into_iter().rev() {
            let result = match &step {
                Undo::LogLevel(level) => match &self.set_log {
                    Some(set) => set(level),
                    None => Ok(()),
                },
                Undo::Mtu(mtu) => match self.netlink.set_mtu(&name, index, *mtu).await {
                    Ok(()) => {
                        self.show_mtu(*mtu);
                        Ok(())
                    }
                    Err(e) => Err(e.into()),
                },
                Undo::RouteAdded(r) => self
                    .netlink
                    .delete_route(&name, index, *r)
                    .await
                    .map_err(Into::into),
                Undo::RouteDeleted(r) => self
                    .netlink
                    .add_route(&name, index, *r)
                    .await
                    .map_err(Into::into),
                Undo::Statics(peers) => self.set_statics(peers.clone()).await,
            };
            match result {
                Ok(()) => info!(undone = ?step, "SIGHUP: took a change back"),
                Err(e) => {
                    error!(step = ?step, error = format!("{e:#}"), "SIGHUP: could not take a change back");
                    failed.push(format!("{step:?}: {e:#}"));
                }
            }
        }
        failed
    }

    /// The MTU in force: remembered, shown in status, written to the conflist.
    fn show_mtu(&mut self, mtu: u16) {
        self.mtu = mtu;
        if let Ok(mut n) = self.node.lock() {
            n.mtu = mtu;
        }
        self.conflist.set_mtu_or_log(mtu);
    }

    /// The configured peers: to the reconciler when the mesh is on, else to the router.
    async fn set_statics(&self, statics: Vec<PeerConfig>) -> anyhow::Result<()> {
        match &self.statics {
            Some(tx) => {
                let _ = tx.send(statics);
                Ok(())
            }
            None => self.apply_statics(&statics).await,
        }
    }

    /// Without a mesh, the configured peers go to the router directly.
    async fn apply_statics(&self, statics: &[PeerConfig]) -> anyhow::Result<()> {
        let snap = self
            .router
            .snapshot()
            .await
            .context("the data plane stopped")?;
        let desired = crate::control::reconcile::static_peers(statics);
        if !crate::control::apply(
            &self.router,
            &snap.peers,
            &desired,
            &std::collections::BTreeMap::new(),
            |_| false,
        )
        .await
        {
            bail!("the data plane stopped");
        }
        Ok(())
    }
}

/// One change a reload made, and what taking it back restores.
#[derive(Debug)]
enum Undo {
    /// The log filter was this.
    LogLevel(String),
    /// The TUN device's MTU was this.
    Mtu(u16),
    /// This route was added.
    RouteAdded(IpNet),
    /// This route was removed.
    RouteDeleted(IpNet),
    /// The configured peers were these.
    Statics(Vec<PeerConfig>),
}

fn subnets(nets: &[IpNet]) -> Vec<String> {
    nets.iter().map(ToString::to_string).collect()
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;

    fn parse(text: &str) -> Config {
        Config::parse(text, Path::new("w.yaml"), "h").expect("config")
    }

    #[test]
    fn only_changes_outside_the_reloadable_keys_need_a_restart() {
        let base =
            "node:\n  pod_cidr: 100.64.1.0/24\nnetwork:\n  trusted_subnets: [198.18.1.0/24]\n";
        let old = parse(base);
        let reloadable = parse(
            "node:\n  pod_cidr: 100.64.1.0/24\nnetwork:\n  trusted_subnets: []\n  mtu: 1300\nmesh:\n  peers: [198.18.1.2]\nlog_level: debug\n",
        );
        assert!(needs_restart(&old, &reloadable).is_empty());
        let port = parse(&format!("{base}router:\n  port: 51821\n"));
        assert_eq!(needs_restart(&old, &port), vec!["router"]);
        let block = parse("node:\n  pod_cidr: 100.64.2.0/24\n");
        assert_eq!(needs_restart(&old, &block), vec!["node"]);
        let pool = parse(&format!("{base}  pod_network_cidr: 100.64.0.0/12\n"));
        assert_eq!(
            needs_restart(&old, &pool),
            vec!["network (other than trusted_subnets and mtu)"]
        );
    }
}
