//! CNI: the conflist the daemon writes, the attachments it keeps, and the logic of the
//! `weft-cni` chained plugin (spec 1.0.0 and 1.1.0).
//!
//! The daemon writes, once its block is known, a conflist that chains `ptp` with `host-local`
//! IPAM over the node's block(s), `weft-cni` and `portmap` ([`conflist`]); the runtime runs them
//! in order. `weft-cni` then sets the pod interface's MTU (and the host side of the veth) to the
//! overlay MTU, registers the attachment with the daemon over the local API and passes
//! `prevResult` on unchanged. Every failure is a CNI error object ([`CniError`]) with the
//! spec's code.

pub mod plugin;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

/// The spec versions `weft-cni` speaks.
pub const SUPPORTED: [&str; 2] = ["1.0.0", "1.1.0"];
/// The version of the conflist the daemon writes (what Debian's reference plugins speak).
pub const CONFLIST_VERSION: &str = "1.0.0";

/// One attachment of a pod to the network, as `weft-cni` registers it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attachment {
    /// The runtime's container id.
    pub container_id: String,
    /// The interface inside the pod.
    pub ifname: String,
    /// The pod's addresses (from `prevResult`).
    pub addresses: Vec<String>,
}

/// The attachments a daemon knows, by (container id, interface).
pub type Attachments = BTreeMap<(String, String), Attachment>;

/// The error codes of the CNI spec that weft uses, and weft's own (100 and up).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 1: the configuration's `cniVersion` is not supported.
    IncompatibleVersion,
    /// 3: the container (its network namespace) is unknown or gone.
    UnknownContainer,
    /// 4: a required environment variable is missing or wrong.
    InvalidEnvironment,
    /// 5: an I/O failure (netlink, files, the runtime).
    Io,
    /// 6: the configuration could not be decoded.
    Undecodable,
    /// 7: the configuration is invalid.
    InvalidConfig,
    /// 11: try again later (the daemon is starting or unreachable).
    TryAgainLater,
    /// 50: the plugin is not available (STATUS while the daemon is not ready).
    NotAvailable,
    /// 100: weft's own: the pod's interface is not as weft needs it.
    Weft,
}

impl ErrorCode {
    /// The number the spec (or weft, from 100) gives it.
    pub fn code(self) -> u32 {
        match self {
            Self::IncompatibleVersion => 1,
            Self::UnknownContainer => 3,
            Self::InvalidEnvironment => 4,
            Self::Io => 5,
            Self::Undecodable => 6,
            Self::InvalidConfig => 7,
            Self::TryAgainLater => 11,
            Self::NotAvailable => 50,
            Self::Weft => 100,
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.code())
    }
}

/// A CNI error: its code, a message and details.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("CNI error {code}: {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
pub struct CniError {
    /// What kind of failure, as the spec numbers it.
    pub code: ErrorCode,
    /// What went wrong.
    pub msg: String,
    /// More detail.
    pub details: String,
}

impl CniError {
    /// An error with `code`.
    pub fn new(code: ErrorCode, msg: impl Into<String>, details: impl Into<String>) -> Self {
        Self {
            code,
            msg: msg.into(),
            details: details.into(),
        }
    }

    /// The error object the spec prints on stdout.
    pub fn to_json(&self, version: &str) -> Value {
        json!({"cniVersion": version, "code": self.code.code(), "msg": self.msg, "details": self.details})
    }
}

/// The conflist for a node with `blocks` and overlay `mtu`, whose daemon listens on `socket`;
/// host-local keeps its leases under `ipam_dir`.
pub fn conflist(blocks: &[IpNet], mtu: u16, socket: &Path, ipam_dir: &Path) -> Value {
    let ranges: Vec<Value> = blocks
        .iter()
        .map(|b| json!([{"subnet": b.trunc().to_string()}]))
        .collect();
    let mut routes = Vec::new();
    if blocks.iter().any(|b| b.addr().is_ipv4()) {
        routes.push(json!({"dst": "0.0.0.0/0"}));
    }
    if blocks.iter().any(|b| b.addr().is_ipv6()) {
        routes.push(json!({"dst": "::/0"}));
    }
    json!({
        "cniVersion": CONFLIST_VERSION,
        "name": "weft",
        "plugins": [
            {
                "type": "ptp",
                "mtu": mtu,
                "ipMasq": false,
                "ipam": {
                    "type": "host-local",
                    "ranges": ranges,
                    "routes": routes,
                    "dataDir": ipam_dir.display().to_string(),
                }
            },
            {"type": "weft-cni", "mtu": mtu, "socket": socket.display().to_string()},
            {"type": "portmap", "capabilities": {"portMappings": true}, "snat": true}
        ]
    })
}

/// Writes `value` to `path` atomically (temporary file, fsync, rename) when it differs from
/// what is there; only that file is ever written. Returns whether it wrote.
pub fn write_conflist(path: &Path, value: &Value) -> std::io::Result<bool> {
    let text = serde_json::to_string_pretty(value).map_err(std::io::Error::other)? + "\n";
    if std::fs::read_to_string(path).is_ok_and(|old| old == text) {
        return Ok(false);
    }
    crate::host::files::write_atomic(path, text.as_bytes())?;
    Ok(true)
}

/// What the runtime hands a plugin in its environment.
#[derive(Debug, Clone, Default)]
pub struct Env {
    /// `CNI_COMMAND`.
    pub command: String,
    /// `CNI_CONTAINERID`.
    pub container_id: Option<String>,
    /// `CNI_NETNS`.
    pub netns: Option<PathBuf>,
    /// `CNI_IFNAME`.
    pub ifname: Option<String>,
}

impl Env {
    /// From the process environment.
    pub fn from_process() -> Self {
        let var = |k: &str| std::env::var(k).ok().filter(|v| !v.is_empty());
        Self {
            command: var("CNI_COMMAND").unwrap_or_default(),
            container_id: var("CNI_CONTAINERID"),
            netns: var("CNI_NETNS").map(PathBuf::from),
            ifname: var("CNI_IFNAME"),
        }
    }

    fn need<'a>(&self, v: &'a Option<String>, name: &str) -> Result<&'a str, CniError> {
        v.as_deref().ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidEnvironment,
                format!("{name} is not set"),
                format!("CNI_COMMAND={}", self.command),
            )
        })
    }
}

/// `weft-cni`'s part of the network config.
#[derive(Debug, Clone, PartialEq)]
pub struct NetConf {
    /// `cniVersion`.
    pub version: String,
    /// The overlay MTU.
    pub mtu: Option<u16>,
    /// The daemon's API socket.
    pub socket: PathBuf,
    /// `prevResult`, when given.
    pub prev_result: Option<Value>,
    /// `cni.dev/valid-attachments` (GC), as (container id, ifname).
    pub valid: Option<Vec<(String, String)>>,
}

/// Parses stdin: the JSON, the version, the fields weft-cni reads.
pub fn parse_conf(stdin: &[u8]) -> Result<NetConf, CniError> {
    let v: Value = serde_json::from_slice(stdin).map_err(|e| {
        CniError::new(
            ErrorCode::Undecodable,
            "the network configuration is not JSON",
            e.to_string(),
        )
    })?;
    let version = v["cniVersion"]
        .as_str()
        .ok_or_else(|| CniError::new(ErrorCode::InvalidConfig, "cniVersion is missing", ""))?
        .to_owned();
    if !SUPPORTED.contains(&version.as_str()) {
        return Err(CniError::new(
            ErrorCode::IncompatibleVersion,
            format!("cniVersion {version} is not supported"),
            format!("weft-cni supports {}", SUPPORTED.join(", ")),
        ));
    }
    let mtu = match &v["mtu"] {
        Value::Null => None,
        m => Some(
            m.as_u64()
                .and_then(|m| u16::try_from(m).ok())
                .filter(|m| *m >= 576)
                .ok_or_else(|| {
                    CniError::new(
                        ErrorCode::InvalidConfig,
                        format!("mtu {m} is not an MTU"),
                        "",
                    )
                })?,
        ),
    };
    let valid = v["cni.dev/valid-attachments"].as_array().map(|a| {
        a.iter()
            .filter_map(|x| {
                Some((
                    x["containerID"].as_str()?.to_owned(),
                    x["ifname"].as_str()?.to_owned(),
                ))
            })
            .collect()
    });
    Ok(NetConf {
        version,
        mtu,
        socket: v["socket"]
            .as_str()
            .map_or_else(|| PathBuf::from("/run/weft/weft.sock"), PathBuf::from),
        prev_result: v.get("prevResult").filter(|p| !p.is_null()).cloned(),
        valid,
    })
}

/// The addresses in a result (`ips[].address`).
pub fn result_addresses(result: &Value) -> Vec<String> {
    result["ips"]
        .as_array()
        .map(|ips| {
            ips.iter()
                .filter_map(|ip| ip["address"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// The host-side interfaces of a result (those without a `sandbox`).
pub fn host_interfaces(result: &Value) -> Vec<String> {
    result["interfaces"]
        .as_array()
        .map(|ifs| {
            ifs.iter()
                .filter(|i| i["sandbox"].as_str().is_none_or(str::is_empty))
                .filter_map(|i| i["name"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

/// What a command needs from the environment, checked before anything is done.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// The container id.
    pub container_id: String,
    /// The interface in the pod.
    pub ifname: String,
    /// The pod's network namespace (ADD and CHECK only).
    pub netns: Option<PathBuf>,
    /// `prevResult`, the interface plugin's result, checked to be an object (ADD and CHECK
    /// only): ADD passes it on.
    pub prev_result: Option<serde_json::Map<String, Value>>,
}

/// Checks the environment and config for `env.command`; the netns must exist for ADD and
/// CHECK (code 3 otherwise), `prevResult` is required for ADD and CHECK and must be a JSON
/// object (code 7).
pub fn target(env: &Env, conf: &NetConf) -> Result<Target, CniError> {
    let container_id = env.need(&env.container_id, "CNI_CONTAINERID")?.to_owned();
    let ifname = env.need(&env.ifname, "CNI_IFNAME")?.to_owned();
    let needs_netns = matches!(env.command.as_str(), "ADD" | "CHECK");
    let netns = if needs_netns {
        let ns = env.netns.clone().ok_or_else(|| {
            CniError::new(
                ErrorCode::InvalidEnvironment,
                "CNI_NETNS is not set",
                env.command.clone(),
            )
        })?;
        if !ns.exists() {
            return Err(CniError::new(
                ErrorCode::UnknownContainer,
                format!("network namespace {} does not exist", ns.display()),
                "",
            ));
        }
        Some(ns)
    } else {
        env.netns.clone()
    };
    let prev_result = if needs_netns {
        Some(prev_object(conf.prev_result.as_ref())?)
    } else {
        None
    };
    Ok(Target {
        container_id,
        ifname,
        netns,
        prev_result,
    })
}

/// `prevResult` as the object a CNI result is; missing or anything else is code 7, naming
/// what was given.
fn prev_object(prev: Option<&Value>) -> Result<serde_json::Map<String, Value>, CniError> {
    match prev {
        Some(Value::Object(result)) => Ok(result.clone()),
        None => Err(CniError::new(
            ErrorCode::InvalidConfig,
            "prevResult is missing: weft-cni is a chained plugin and runs after an interface plugin (ptp)",
            "",
        )),
        Some(other) => {
            const SHOWN: usize = 64;
            let text = other.to_string();
            let mut shown: String = text.chars().take(SHOWN).collect();
            if shown.len() < text.len() {
                shown.push('…');
            }
            Err(CniError::new(
                ErrorCode::InvalidConfig,
                format!("prevResult {shown} is not a JSON object (the interface plugin's result)"),
                "",
            ))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(cmd: &str) -> Env {
        Env {
            command: cmd.into(),
            container_id: Some("c1".into()),
            netns: Some("/proc/self/ns/net".into()),
            ifname: Some("eth0".into()),
        }
    }

    #[test]
    fn bad_configs_get_the_spec_codes() {
        let code = |stdin: &str| parse_conf(stdin.as_bytes()).unwrap_err().code.code();
        assert_eq!(code("{not json"), 6);
        assert_eq!(
            code(r#"{"cniVersion":"0.4.0","name":"w","type":"weft-cni"}"#),
            1
        );
        assert_eq!(code(r#"{"name":"w","type":"weft-cni"}"#), 7);
        assert_eq!(code(r#"{"cniVersion":"1.0.0","mtu":"big"}"#), 7);
        let conf = parse_conf(br#"{"cniVersion":"1.1.0","name":"w","type":"weft-cni"}"#).unwrap();
        // ADD without prevResult: 7; without the netns: 3; without env: 4.
        assert_eq!(
            target(&env("ADD"), &conf).unwrap_err().code,
            ErrorCode::InvalidConfig
        );
        let mut e = env("ADD");
        e.netns = Some("/run/netns/weft-does-not-exist".into());
        assert_eq!(
            target(&e, &conf).unwrap_err().code,
            ErrorCode::UnknownContainer
        );
        let mut e = env("ADD");
        e.container_id = None;
        assert_eq!(
            target(&e, &conf).unwrap_err().code,
            ErrorCode::InvalidEnvironment
        );
        // DEL needs neither.
        assert!(target(&env("DEL"), &conf).is_ok());
    }

    #[test]
    fn the_conflist_chains_ptp_host_local_weft_and_portmap_over_the_blocks() {
        let blocks: Vec<IpNet> = vec![
            "100.64.1.0/24".parse().unwrap(),
            "fd00:64:0:1::/64".parse().unwrap(),
        ];
        let c = conflist(
            &blocks,
            1440,
            Path::new("/run/weft/weft.sock"),
            Path::new("/var/lib/weft/cni"),
        );
        let types: Vec<&str> = c["plugins"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["type"].as_str().unwrap())
            .collect();
        assert_eq!(types, ["ptp", "weft-cni", "portmap"]);
        assert_eq!(
            c["plugins"][0]["ipam"]["ranges"][1][0]["subnet"],
            "fd00:64:0:1::/64"
        );
        assert_eq!(c["plugins"][0]["mtu"], 1440);
        assert_eq!(c["plugins"][1]["mtu"], 1440);
    }

    #[test]
    fn results_yield_addresses_and_host_interfaces() {
        let r = json!({"interfaces": [{"name": "veth1"}, {"name": "eth0", "sandbox": "/run/netns/p"}],
                       "ips": [{"address": "100.64.1.2/24", "interface": 1}]});
        assert_eq!(result_addresses(&r), ["100.64.1.2/24"]);
        assert_eq!(host_interfaces(&r), ["veth1"]);
    }

    #[test]
    fn concurrent_conflist_writers_are_serialised_and_the_file_ends_as_the_last_change() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("10-weft.conflist");
        let w = ConflistWriter::new(
            Some(path.clone()),
            1420,
            "/run/weft.sock".into(),
            "/ipam".into(),
        );
        for round in 0..20u16 {
            std::thread::scope(|s| {
                for t in 0..4u16 {
                    let w = w.clone();
                    s.spawn(move || {
                        let block: IpNet = format!("100.64.{t}.0/24").parse().unwrap();
                        w.write(&[block]).unwrap();
                        w.set_mtu(1300 + round * 4 + t).unwrap();
                    });
                }
            });
            let (mtu, blocks) = w.state.lock().unwrap().clone();
            let want = conflist(
                &blocks,
                mtu,
                Path::new("/run/weft.sock"),
                Path::new("/ipam"),
            );
            let got: Value =
                serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
            assert_eq!(got, want, "round {round}");
        }
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["10-weft.conflist"]);
    }

    #[test]
    fn a_store_change_that_cannot_be_written_is_not_kept() {
        let dir = tempfile::tempdir().unwrap();
        let a = |id: &str| Attachment {
            container_id: id.into(),
            ifname: "eth0".into(),
            addresses: vec!["100.64.1.2/24".into()],
        };
        // The store's directory is a regular file: every write fails (also as root).
        let blocked = dir.path().join("not-a-dir");
        std::fs::write(&blocked, "x").unwrap();
        let store = Store::load(blocked.join("cni.json"));
        assert!(store.add(a("c1")).is_err());
        assert_eq!(store.list(), [], "a failed add is remembered");

        // A store that was written, whose directory then turns into a file.
        let state = dir.path().join("state");
        let store = Store::load(state.join("cni.json"));
        store.add(a("c1")).unwrap();
        std::fs::remove_dir_all(&state).unwrap();
        std::fs::write(&state, "x").unwrap();
        assert!(store.add(a("c2")).is_err());
        assert!(store.del("c1", "eth0").is_err());
        assert!(store.gc(&[]).is_err());
        assert_eq!(store.list(), [a("c1")], "failed changes are remembered");
    }
}

/// The daemon's attachments, persisted in `state_dir/cni.json` (atomically) so GC and CHECK
/// still know them after a restart.
#[derive(Debug, Clone)]
pub struct Store {
    path: PathBuf,
    inner: std::sync::Arc<std::sync::Mutex<Attachments>>,
}

impl Store {
    /// Loads `path`; a missing file is an empty store, an unreadable one is logged and
    /// replaced on the next change (attachments are re-registered by CHECK's callers anyway).
    pub fn load(path: PathBuf) -> Self {
        let list: Vec<Attachment> = match std::fs::read_to_string(&path) {
            Ok(t) => serde_json::from_str(&t).unwrap_or_else(|e| {
                tracing::warn!(path = %path.display(), error = %e, "CNI attachments file unreadable; starting empty");
                Vec::new()
            }),
            Err(_) => Vec::new(),
        };
        let map = list
            .into_iter()
            .map(|a| ((a.container_id.clone(), a.ifname.clone()), a))
            .collect();
        Self {
            path,
            inner: std::sync::Arc::new(std::sync::Mutex::new(map)),
        }
    }

    /// Applies `f` to a copy of the attachments and keeps the copy only once it is written: a
    /// change that cannot be persisted is not remembered either (the caller reports it failed).
    fn with<T>(&self, f: impl FnOnce(&mut Attachments) -> T) -> std::io::Result<T> {
        let mut map = self
            .inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut next = map.clone();
        let out = f(&mut next);
        if next != *map {
            let list: Vec<&Attachment> = next.values().collect();
            let text = serde_json::to_string_pretty(&list).map_err(std::io::Error::other)?;
            crate::host::files::write_atomic(&self.path, text.as_bytes())?;
            *map = next;
        }
        Ok(out)
    }

    /// Remembers `a` (replacing an earlier one of the same container and interface).
    pub fn add(&self, a: Attachment) -> std::io::Result<()> {
        self.with(|m| {
            m.insert((a.container_id.clone(), a.ifname.clone()), a);
        })
    }

    /// Forgets one; true if it was known.
    pub fn del(&self, container_id: &str, ifname: &str) -> std::io::Result<bool> {
        self.with(|m| {
            m.remove(&(container_id.to_owned(), ifname.to_owned()))
                .is_some()
        })
    }

    /// Forgets every attachment not in `valid`; returns those forgotten.
    pub fn gc(&self, valid: &[(String, String)]) -> std::io::Result<Vec<Attachment>> {
        self.with(|m| {
            let stale: Vec<(String, String)> =
                m.keys().filter(|k| !valid.contains(k)).cloned().collect();
            stale.iter().filter_map(|k| m.remove(k)).collect()
        })
    }

    /// Every attachment.
    pub fn list(&self) -> Vec<Attachment> {
        self.inner
            .lock()
            .map(|m| m.values().cloned().collect())
            .unwrap_or_default()
    }
}

/// Where and how the daemon writes its conflist. Clones share the MTU and the last blocks, so
/// the IPAM loop (new blocks) and a reload (new MTU) both rewrite the same, current file.
/// Without a path (`cni.conflist` unset on a node without Kubernetes) it writes nothing.
#[derive(Debug, Clone)]
pub struct ConflistWriter {
    path: Option<PathBuf>,
    socket: PathBuf,
    ipam_dir: PathBuf,
    state: std::sync::Arc<std::sync::Mutex<(u16, Vec<IpNet>)>>,
}

impl ConflistWriter {
    /// A writer of `path` (none: write nothing) for a daemon on `socket` whose overlay MTU is
    /// `mtu`; host-local keeps its leases under `ipam_dir`.
    pub fn new(path: Option<PathBuf>, mtu: u16, socket: PathBuf, ipam_dir: PathBuf) -> Self {
        Self {
            path,
            socket,
            ipam_dir,
            state: std::sync::Arc::new(std::sync::Mutex::new((mtu, Vec::new()))),
        }
    }

    /// Writes the conflist for `blocks` (nothing before the node has a block); logs a change.
    /// Writers are serialised (the file is rendered under the state's lock), so the file
    /// always ends as the last change says.
    pub fn write(&self, blocks: &[IpNet]) -> std::io::Result<()> {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st.1 = blocks.to_vec();
        self.render(st.0, &st.1)
    }

    /// The conflist's path, if it writes one.
    pub fn path(&self) -> Option<&Path> {
        self.path.as_deref()
    }

    /// A new overlay MTU: rewrites the conflist for the blocks last written.
    pub fn set_mtu(&self, mtu: u16) -> std::io::Result<()> {
        let mut st = self
            .state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        st.0 = mtu;
        self.render(st.0, &st.1)
    }

    fn render(&self, mtu: u16, blocks: &[IpNet]) -> std::io::Result<()> {
        let Some(path) = &self.path else {
            return Ok(());
        };
        if blocks.is_empty() {
            return Ok(());
        }
        let value = conflist(blocks, mtu, &self.socket, &self.ipam_dir);
        if write_conflist(path, &value)? {
            tracing::info!(path = %path.display(), blocks = ?blocks, mtu, "wrote the CNI conflist");
        }
        Ok(())
    }

    /// [`ConflistWriter::write`], logging a failure (after start, a failed write leaves the
    /// last file in place; the next change writes again).
    pub fn write_or_log(&self, blocks: &[IpNet]) {
        if let Err(e) = self.write(blocks) {
            self.log_failure(&e);
        }
    }

    /// [`ConflistWriter::set_mtu`], logging a failure.
    pub fn set_mtu_or_log(&self, mtu: u16) {
        if let Err(e) = self.set_mtu(mtu) {
            self.log_failure(&e);
        }
    }

    fn log_failure(&self, e: &std::io::Error) {
        let path = self.path.as_deref().unwrap_or(Path::new(""));
        tracing::error!(path = %path.display(), error = %e, "could not write the CNI conflist");
    }
}
