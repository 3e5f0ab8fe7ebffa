//! A minimal container runtime for the CNI tests: runs the plugins of a conflist in order, as a
//! runtime does (CNI_COMMAND, CNI_CONTAINERID, CNI_NETNS, CNI_IFNAME, CNI_PATH, the plugin's
//! config on stdin with `name`, `cniVersion` and `prevResult`), inside a node's namespace.

use std::io::Write as _;
use std::path::PathBuf;
use std::process::Stdio;

use anyhow::{Context as _, bail};
use serde_json::{Value, json};
use weft::demo::lab::Lab;

/// Where Debian's `containernetworking-plugins` puts the reference plugins.
pub const REFERENCE_PLUGINS: &str = "/usr/lib/cni";

/// A plugin's answer: its stdout parsed (when any), and whether it exited 0.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Exit status 0.
    pub ok: bool,
    /// Stdout as JSON, if it was JSON.
    pub json: Option<Value>,
    /// Stdout and stderr, for messages.
    pub text: String,
}

impl Outcome {
    /// The CNI error code, if this is an error object.
    pub fn code(&self) -> Option<u64> {
        self.json.as_ref()?.get("code")?.as_u64()
    }
}

/// Runs `plugin` (found in `cni_path`) in namespace `host_ns`.
#[expect(
    clippy::too_many_arguments,
    reason = "the CNI environment, spelled out"
)]
pub fn exec(
    lab: &Lab,
    host_ns: &str,
    cni_path: &str,
    plugin: &str,
    command: &str,
    container_id: &str,
    netns: &str,
    ifname: &str,
    stdin: &Value,
) -> anyhow::Result<Outcome> {
    let bin = std::env::split_paths(cni_path)
        .map(|d| d.join(plugin))
        .find(|p| p.exists())
        .with_context(|| {
            format!(
                "plugin {plugin} not in {cni_path} (apt-get install containernetworking-plugins)"
            )
        })?;
    let mut cmd = lab.cmd(host_ns, &bin);
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("CNI_COMMAND", command)
        .env("CNI_CONTAINERID", container_id)
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", ifname)
        .env("CNI_PATH", cni_path)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd
        .spawn()
        .with_context(|| format!("starting {}", bin.display()))?;
    child
        .stdin
        .take()
        .context("stdin")?
        .write_all(stdin.to_string().as_bytes())?;
    let out = child.wait_with_output()?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(Outcome {
        ok: out.status.success(),
        json: serde_json::from_str(&stdout).ok(),
        text: format!("{stdout}{}", String::from_utf8_lossy(&out.stderr)),
    })
}

/// A conflist and the runtime that runs it on one node.
#[derive(Debug, Clone)]
pub struct Runtime {
    /// The conflist, as the daemon wrote it.
    pub conflist: Value,
    /// The node's namespace (the "host" of the plugins).
    pub host_ns: String,
    /// `CNI_PATH`: the reference plugins and the directory of this build's weft-cni.
    pub cni_path: String,
}

impl Runtime {
    /// The runtime for `conflist` on `host_ns`, with this build's weft-cni.
    pub fn new(conflist: &std::path::Path, host_ns: &str) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(conflist)
            .with_context(|| format!("reading {}", conflist.display()))?;
        let bin_dir: PathBuf = crate::weft_bin()?
            .parent()
            .context("target dir")?
            .to_path_buf();
        Ok(Self {
            conflist: serde_json::from_str(&text)?,
            host_ns: host_ns.to_owned(),
            cni_path: format!("{REFERENCE_PLUGINS}:{}", bin_dir.display()),
        })
    }

    fn conf(&self, plugin: &Value, prev: Option<&Value>) -> Value {
        let mut c = plugin.clone();
        c["name"] = self.conflist["name"].clone();
        c["cniVersion"] = self.conflist["cniVersion"].clone();
        if let Some(p) = prev {
            c["prevResult"] = p.clone();
        }
        c
    }

    fn plugins(&self) -> Vec<Value> {
        self.conflist["plugins"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// Runs one plugin of the conflist with `command`; an error when it fails.
    fn step(
        &self,
        lab: &Lab,
        plugin: &Value,
        command: &str,
        (id, netns, ifname): (&str, &str, &str),
        prev: Option<&Value>,
    ) -> anyhow::Result<Outcome> {
        let ty = plugin["type"].as_str().unwrap_or_default();
        let conf = self.conf(plugin, prev);
        let o = exec(
            lab,
            &self.host_ns,
            &self.cni_path,
            ty,
            command,
            id,
            netns,
            ifname,
            &conf,
        )?;
        if !o.ok {
            bail!("{ty} {command} failed: {}", o.text);
        }
        Ok(o)
    }

    /// ADD through every plugin; the final result.
    pub fn add(&self, lab: &Lab, id: &str, netns: &str, ifname: &str) -> anyhow::Result<Value> {
        let mut prev: Option<Value> = None;
        for p in self.plugins() {
            let o = self.step(lab, &p, "ADD", (id, netns, ifname), prev.as_ref())?;
            prev = Some(
                o.json
                    .with_context(|| format!("{} ADD printed no result", p["type"]))?,
            );
        }
        prev.context("an empty conflist")
    }

    /// DEL through every plugin, in reverse order.
    pub fn del(
        &self,
        lab: &Lab,
        id: &str,
        netns: &str,
        ifname: &str,
        prev: &Value,
    ) -> anyhow::Result<()> {
        for p in self.plugins().iter().rev() {
            self.step(lab, p, "DEL", (id, netns, ifname), Some(prev))?;
        }
        Ok(())
    }

    /// One plugin's config from the conflist, by type (with name and version).
    pub fn plugin_conf(&self, ty: &str, prev: Option<&Value>) -> anyhow::Result<Value> {
        let p = self
            .plugins()
            .into_iter()
            .find(|p| p["type"] == ty)
            .with_context(|| format!("no {ty} in the conflist"))?;
        Ok(self.conf(&p, prev))
    }

    /// `weft-cni` alone with `command` and `stdin`.
    pub fn weft_cni(
        &self,
        lab: &Lab,
        command: &str,
        id: &str,
        netns: &str,
        stdin: &Value,
    ) -> anyhow::Result<Outcome> {
        exec(
            lab,
            &self.host_ns,
            &self.cni_path,
            "weft-cni",
            command,
            id,
            netns,
            "eth0",
            stdin,
        )
    }
}

/// A plugin result's first IPv4 address, without the prefix length.
pub fn first_ipv4(result: &Value) -> Option<String> {
    result["ips"].as_array()?.iter().find_map(|ip| {
        let a = ip["address"].as_str()?;
        let host = a.split('/').next()?;
        host.contains('.').then(|| host.to_owned())
    })
}

/// The stdin of a GC call.
pub fn gc_conf(version: &Value, socket: &str, valid: &[(&str, &str)]) -> Value {
    json!({
        "cniVersion": version,
        "name": "weft",
        "type": "weft-cni",
        "socket": socket,
        "cni.dev/valid-attachments": valid.iter().map(|(c, i)| json!({"containerID": c, "ifname": i})).collect::<Vec<_>>(),
    })
}
