//! The container image, run as the DaemonSet runs it: `scripts/image.sh` builds it from the
//! built binaries (nothing pulled), the init container copies `weft-cni` out, and two weft
//! containers — each on the host network of a lab namespace, `NET_ADMIN` only, `/dev/net/tun`,
//! the ConfigMap's config as shipped, the Secret's file, state and CNI directories from the
//! "host" — take their blocks and regions from a fake Kubernetes API, ping across, stop cleanly
//! and leave no device, nftables table or container behind. Needs root, podman and runc (CI
//! installs both from Debian; runc because it runs in sandboxes whose cgroup set-up crun refuses).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::json;
use weft::demo::lab::{Lab, run, wait_for};
use weft_tests::kubeapi::{Shared, serve_http};
use weft_tests::weft_bin;

/// podman, with the runtime and limits that work in containers-in-sandboxes as on hosts.
fn podman() -> Command {
    let mut c = Command::new("podman");
    c.args(["--runtime", "runc"]);
    c
}

/// `--ulimit` options for `podman run`: open files and processes at what a pod commonly gets,
/// or this process's hard limit when that is lower. Given explicitly because the runtimes'
/// defaults can exceed what a sandboxed host allows (and raising a limit is refused there).
fn limits() -> anyhow::Result<Vec<String>> {
    let text = std::fs::read_to_string("/proc/self/limits")?;
    let mut out = Vec::new();
    for (row, name, usual) in [
        ("Max open files", "nofile", 1024u64),
        ("Max processes", "nproc", 1024),
    ] {
        let line = text
            .lines()
            .find(|l| l.starts_with(row))
            .with_context(|| format!("no {row:?} in /proc/self/limits"))?;
        let hard = line[row.len()..]
            .split_whitespace()
            .nth(1)
            .context("the hard limit")?;
        let n = hard.parse::<u64>().map_or(usual, |h| h.min(usual));
        out.push("--ulimit".to_owned());
        out.push(format!("{name}={n}:{n}"));
    }
    Ok(out)
}

/// The ConfigMap's `weft.yaml`, exactly as shipped.
fn configmap_config() -> anyhow::Result<String> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/kubernetes/config.yaml");
    let cm: serde_yaml_ng::Value = serde_yaml_ng::from_str(&std::fs::read_to_string(path)?)?;
    Ok(cm["data"]["weft.yaml"]
        .as_str()
        .context("the ConfigMap has no weft.yaml")?
        .to_owned())
}

/// Removes the containers and the image even when the test fails half-way.
struct Cleanup {
    containers: Vec<String>,
    image: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for c in &self.containers {
            let _ = podman().args(["rm", "-f", "-t", "0", c]).output();
        }
        let _ = podman().args(["rmi", "-f", &self.image]).output();
    }
}

#[test]
fn the_image_runs_as_the_daemonset_does_pings_across_and_leaves_nothing_behind()
-> anyhow::Result<()> {
    weft::demo::lab::require_root("the image test")?;
    for tool in ["podman", "runc"] {
        ensure!(
            Command::new("sh")
                .args(["-c", &format!("command -v {tool}")])
                .output()?
                .status
                .success(),
            "the image test needs {tool} (Debian package {tool}); .ci/run installs it"
        );
    }
    let bin = weft_bin()?;
    let bin_dir = bin.parent().context("bin dir")?.to_path_buf();
    let mut lab = Lab::new("im")?;
    let image = format!("localhost/weft-test:{}", lab.id);
    let mut cleanup = Cleanup {
        containers: Vec::new(),
        image: image.clone(),
    };
    let built = run(Command::new(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/image.sh"),
    )
    .env("BIN_DIR", &bin_dir)
    .env("IMAGE", &image))?;
    eprintln!("{}", String::from_utf8_lossy(&built.stdout).trim());

    // The fake API server, and two Nodes in one region.
    let sw = lab.add_ns("sw")?;
    lab.bridge(&sw, "lan1")?;
    lab.ip(&sw, &["addr", "add", "198.18.1.100/24", "dev", "lan1"])?;
    let api = Shared::default();
    {
        let mut f = api.lock().expect("fake");
        for i in 1..=2 {
            f.put(json!({
                "apiVersion": "v1", "kind": "Node",
                "metadata": {"name": format!("k{i}"),
                             "labels": {"topology.kubernetes.io/region": "eu"}, "annotations": {}},
                "spec": {"podCIDRs": [format!("100.64.{i}.0/24")]},
                "status": {"addresses": [{"type": "InternalIP", "address": format!("198.18.1.{i}")}]}
            }));
        }
    }
    let kubeconfig = serve_http(&lab, &sw, "198.18.1.100:6443".parse()?, api)?;
    let secret = String::from_utf8(run(Command::new(&bin).arg("gensecret"))?.stdout)?;
    let config = configmap_config()?;
    let limits = limits()?;

    let mut nodes: Vec<(String, PathBuf, String)> = Vec::new();
    for i in 1..=2 {
        let name = format!("k{i}");
        let ns = lab.add_ns(&name)?;
        lab.plug((&sw, "lan1"), (&ns, "eth0", &format!("198.18.1.{i}/24")))?;
        // The node's host paths the DaemonSet mounts.
        let host = lab.dir.join(format!("host-{name}"));
        for d in ["secret", "state", "run", "cni-conf", "cni-bin"] {
            std::fs::create_dir_all(host.join(d))?;
        }
        std::fs::write(host.join("weft.yaml"), &config)?;
        weft::host::keys::write_private(host.join("secret/secret"), &secret)?;
        let mount = |from: &str, to: &str, ro: bool| {
            format!(
                "{}:{to}{}",
                host.join(from).display(),
                if ro { ":ro" } else { "" }
            )
        };
        // The init container.
        let init = format!("weft-{}-{name}-init", lab.id);
        cleanup.containers.push(init.clone());
        run(podman()
            .args(["run", "--name", &init])
            .args(&limits)
            .args(["--network", "none", "--entrypoint", "/bin/cp"])
            .args(["-v", &mount("cni-bin", "/host/opt/cni/bin", false)])
            .arg(&image)
            .args(["/usr/local/bin/weft-cni", "/host/opt/cni/bin/weft-cni"]))?;
        ensure!(
            host.join("cni-bin/weft-cni").exists(),
            "the init container did not install weft-cni"
        );
        // The weft container: host network (the node's namespace), the node's hostname.
        let ctr = format!("weft-{}-{name}", lab.id);
        cleanup.containers.push(ctr.clone());
        run(podman()
            .args(["run", "-d", "--name", &ctr])
            .args(&limits)
            .args([
                "--network",
                &format!("ns:/run/netns/{ns}"),
                "--hostname",
                &name,
            ])
            .args(["--cap-drop", "ALL", "--cap-add", "NET_ADMIN"])
            .args(["--device", "/dev/net/tun", "-e", "WEFT_LOG=info"])
            .args(["-e", "KUBECONFIG=/etc/weft/kubeconfig"])
            .args(["-v", &mount("weft.yaml", "/etc/weft/weft.yaml", true)])
            .args(["-v", &mount("secret", "/etc/weft/secret", true)])
            .args(["-v", &mount("state", "/var/lib/weft", false)])
            .args(["-v", &mount("run", "/run/weft", false)])
            .args(["-v", &mount("cni-conf", "/etc/cni/net.d", false)])
            .args([
                "-v",
                &format!("{}:/etc/weft/kubeconfig:ro", kubeconfig.display()),
            ])
            .arg(&image)
            .args(["run", "--config", "/etc/weft/weft.yaml"]))?;
        nodes.push((name, host, ctr));
    }
    let status = |host: &Path| -> Option<serde_json::Value> {
        let out = Command::new(&bin)
            .args(["status", "--json", "--socket"])
            .arg(host.join("run/weft.sock"))
            .output()
            .ok()?;
        serde_json::from_slice(&out.stdout).ok()
    };
    let logs = |ctr: &str| {
        podman()
            .args(["logs", ctr])
            .output()
            .map(|o| String::from_utf8_lossy(&o.stderr).into_owned())
            .unwrap_or_default()
    };
    for (i, (name, host, ctr)) in nodes.iter().enumerate() {
        let other = format!("k{}", 2 - i);
        wait_for(
            &format!("{name} to route {other}"),
            Duration::from_secs(30),
            || {
                let st = status(host)?;
                st["peers"]
                    .as_array()?
                    .iter()
                    .any(|p| p["name"] == other.as_str() && p["state"] == "up")
                    .then_some(())
            },
        )
        .map_err(|e| anyhow::anyhow!("{e}\n{}", logs(ctr)))?;
        let conflist = std::fs::read_to_string(host.join("cni-conf/10-weft.conflist"))?;
        ensure!(
            conflist.contains(&format!("100.64.{}.0/24", i + 1)),
            "{conflist}"
        );
    }
    weft_tests::ping(&lab, &lab.ns("k1"), "100.64.2.1", None)?;
    weft_tests::ping(&lab, &lab.ns("k2"), "100.64.1.1", None)?;
    // The node's masquerade table is there while it runs.
    let tables = run(lab.cmd(&lab.ns("k1"), "nft").args(["list", "tables"]))?;
    ensure!(
        String::from_utf8_lossy(&tables.stdout).contains("inet weft"),
        "no masquerade table while weft runs"
    );

    // Stopped as the kubelet stops a pod: SIGTERM, a grace period; then nothing is left.
    for (name, _, ctr) in &nodes {
        run(podman().args(["stop", "-t", "10", ctr]))?;
        let code = run(podman().args(["inspect", "-f", "{{.State.ExitCode}}", ctr]))?;
        ensure!(
            String::from_utf8_lossy(&code.stdout).trim() == "0",
            "{name} exited {}:\n{}",
            String::from_utf8_lossy(&code.stdout).trim(),
            logs(ctr)
        );
        let ns = lab.ns(name);
        let links = run(lab.cmd(&ns, "ip").args(["-o", "link"]))?;
        ensure!(
            !String::from_utf8_lossy(&links.stdout).contains("weft0"),
            "{name}: weft0 left behind"
        );
        let tables = run(lab.cmd(&ns, "nft").args(["list", "tables"]))?;
        ensure!(
            !String::from_utf8_lossy(&tables.stdout).contains("weft"),
            "{name}: an nftables table left behind"
        );
        run(podman().args(["rm", ctr]))?;
    }
    Ok(())
}
