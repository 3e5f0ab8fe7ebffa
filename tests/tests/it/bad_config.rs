//! Every kind of bad config: `weft run` exits non-zero naming file, line and key, and the host
//! (a namespace of its own here) is left exactly as it was, also when the start fails after
//! the TUN device and the masquerade table exist.

use std::process::Stdio;

use anyhow::Context as _;
use std::time::Duration;

use weft::demo::lab::{Lab, wait_for};
use weft_tests::weft_bin;

/// `(case, config text, what stderr must name after the file: line and key)`.
const CASES: &[(&str, &str, &str)] = &[
    (
        "syntax",
        "node:\n  name: a\n    pod_cidr: 100.64.1.0/24\n",
        ":3:13: node:",
    ),
    (
        "unknown-key",
        "node:\n  name: a\n  pod_cidr: 100.64.1.0/24\nrouter:\n  prot: 51820\n",
        ":5:3: router.prot: unknown field `prot`",
    ),
    (
        "bad-cidr",
        "node:\n  pod_cidr: 100.64.1.0/24\nnetwork:\n  pod_network_cidr: 100.64.0.0/33\n",
        ":4:3: network.pod_network_cidr: invalid CIDR \"100.64.0.0/33\"",
    ),
    (
        "bad-key",
        "node:\n  pod_cidr: 100.64.1.0/24\nwireguard_peers:\n  - name: b\n    public_key: not-a-key\n    allowed_ips: [100.64.2.0/24]\n",
        ":5:5: wireguard_peers[0].public_key: invalid WireGuard public key \"not-a-key\"",
    ),
    (
        "port-out-of-range",
        "node:\n  pod_cidr: 100.64.1.0/24\nrouter:\n  port: 70000\n",
        ":4:3: router.port: port 70000 is out of range 1-65535",
    ),
    (
        "pod-outside-pool",
        "node:\n  pod_cidr: 100.65.1.0/24\nnetwork:\n  pod_network_cidr: 100.64.0.0/16\n",
        ":2:3: node.pod_cidr: 100.65.1.0/24 is not inside the pod network 100.64.0.0/16",
    ),
    (
        "pool-smaller-than-a-block",
        "node:\n  name: a\nnetwork:\n  pod_network_cidr: 100.64.0.0/26\n",
        ":3:1: network.node_cidr_mask_size: mask size /24 does not fit the pool 100.64.0.0/26",
    ),
    (
        "ipv6-mask-outside-the-pool",
        "node:\n  name: a\nnetwork:\n  pod_network_cidr: [100.64.0.0/16, 'fd00:64::/48']\n  node_cidr_mask_size_ipv6: 40\n",
        ":5:3: network.node_cidr_mask_size_ipv6: mask size /40 does not fit the pool fd00:64::/48",
    ),
    (
        "overlapping-static-blocks",
        "node:\n  name: a\n  pod_cidr: [100.64.1.0/24, 100.64.1.128/25]\n",
        ":3:3: node.pod_cidr: at most one IPv4 and one IPv6 CIDR, found two IPv4 ones: 100.64.1.0/24 and 100.64.1.128/25",
    ),
    (
        "kubernetes-without-the-mesh",
        "node:\n  pod_cidr: 100.64.1.0/24\nkubernetes:\n  enabled: true\n",
        ": kubernetes.enabled: needs the mesh",
    ),
    (
        "no-pod-cidr",
        "node:\n  name: a\n",
        ": node.pod_cidr: required",
    ),
];

fn snapshot(lab: &Lab, ns: &str) -> anyhow::Result<String> {
    let mut s = String::new();
    for args in [
        &["-o", "link", "show"][..],
        &["-o", "addr", "show"],
        &["route", "show", "table", "all"],
    ] {
        s.push_str(&String::from_utf8_lossy(&lab.ip(ns, args)?.stdout));
    }
    Ok(s)
}

#[test]
fn each_bad_config_exits_non_zero_naming_file_line_and_key_and_changes_nothing()
-> anyhow::Result<()> {
    let bin = weft_bin()?;
    let mut lab = Lab::new("bc")?;
    let ns = lab.add_ns("host")?;
    let before = snapshot(&lab, &ns)?;
    for (case, text, want) in CASES {
        let dir = lab.dir.join(case);
        std::fs::create_dir_all(&dir)?;
        let config = dir.join("weft.yaml");
        // Paths of its own, so anything the daemon wrongly creates is visible.
        let paths = format!(
            "state_dir: {d}\napi_socket: {d}/weft.sock\n",
            d = dir.display()
        );
        let text = if *case == "syntax" {
            (*text).to_owned()
        } else {
            format!("{text}{paths}")
        };
        std::fs::write(&config, text)?;
        let mut child = lab
            .cmd(&ns, &bin)
            .arg("run")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()?;
        let status = wait_for(
            &format!("weft to exit on the {case} config"),
            Duration::from_secs(10),
            || child.try_wait().ok().flatten(),
        );
        let status = match status {
            Ok(s) => s,
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(e);
            }
        };
        let mut stderr = String::new();
        std::io::Read::read_to_string(&mut child.stderr.take().expect("piped"), &mut stderr)?;
        assert!(!status.success(), "{case}: exited 0");
        let expected = format!("{}{want}", config.display());
        assert!(
            stderr.contains(&expected),
            "{case}: stderr does not contain {expected:?}:\n{stderr}"
        );
        assert!(!stderr.contains("panicked"), "{case}: {stderr}");
        assert_eq!(
            snapshot(&lab, &ns)?,
            before,
            "{case}: the namespace changed"
        );
        let left: Vec<_> = std::fs::read_dir(&dir)?
            .filter_map(|e| e.ok())
            .map(|e| e.file_name())
            .collect();
        assert_eq!(
            left,
            vec![std::ffi::OsString::from("weft.yaml")],
            "{case}: files created"
        );
    }
    Ok(())
}

#[test]
fn a_taken_interface_name_or_port_fails_before_touching_the_host() -> anyhow::Result<()> {
    let bin = weft_bin()?;
    let mut lab = Lab::new("bt")?;
    let ns = lab.add_ns("host")?;
    // Something else already holds the interface name.
    lab.ip(
        &ns,
        &[
            "link", "add", "weft0", "type", "veth", "peer", "name", "weft0p",
        ],
    )?;
    let before = snapshot(&lab, &ns)?;
    let d = lab.daemon(
        "a",
        &ns,
        "node:\n  key_file: KEY_FILE\n  pod_cidr: 100.64.1.0/24\n",
    )?;
    let out = lab
        .cmd(&ns, &bin)
        .arg("run")
        .arg("--config")
        .arg(&d.config)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("interface weft0 already exists"),
        "{stderr}"
    );
    assert_eq!(snapshot(&lab, &ns)?, before);
    lab.ip(&ns, &["link", "del", "weft0"])?;
    // The UDP port is taken.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    let holder = lab.in_ns(&ns, move || {
        let _s = std::net::UdpSocket::bind("0.0.0.0:51820")?;
        let _ = rx.recv_timeout(Duration::from_secs(30));
        Ok(())
    });
    let before = snapshot(&lab, &ns)?;
    let out = wait_for("the port holder to bind", Duration::from_secs(10), || {
        let out = lab
            .cmd(&ns, &bin)
            .arg("run")
            .arg("--config")
            .arg(&d.config)
            .output()
            .ok()?;
        String::from_utf8_lossy(&out.stderr)
            .contains("51820")
            .then_some(out)
    })?;
    drop(tx);
    holder
        .join()
        .map_err(|_| anyhow::anyhow!("holder panicked"))??;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("binding UDP port 51820 (router.port)"),
        "{stderr}"
    );
    assert_eq!(snapshot(&lab, &ns)?, before);
    assert!(!d.socket.exists());
    Ok(())
}

#[test]
fn a_start_that_fails_after_the_device_and_the_nft_table_exist_removes_both() -> anyhow::Result<()>
{
    let bin = weft_bin()?;
    let mut lab = Lab::new("bi")?;
    let ns = lab.add_ns("host")?;
    let before = snapshot(&lab, &ns)?;
    let tables = || -> anyhow::Result<String> {
        let out = weft::demo::lab::run(lab.cmd(&ns, "nft").args(["list", "tables"]))?;
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    };
    assert!(!tables()?.contains("weft"));
    // The conflist is written only once the TUN device is configured and the masquerade table
    // applied; under a regular file, it cannot be.
    let blocker = lab.dir.join("not-a-directory");
    std::fs::write(&blocker, "")?;
    let conflist = blocker.join("10-weft.conflist");
    let d = lab.daemon(
        "a",
        &ns,
        "node:\n  key_file: KEY_FILE\n  pod_cidr: 100.64.1.0/24\nnetwork:\n  nat_outgoing: true\n",
    )?;
    let text = std::fs::read_to_string(&d.config)?;
    let dir = d.config.parent().context("the daemon's directory")?;
    let lab_conflist = format!("conflist: {}/10-weft.conflist", dir.display());
    assert!(text.contains(&lab_conflist), "{text}");
    std::fs::write(
        &d.config,
        text.replace(&lab_conflist, &format!("conflist: {}", conflist.display())),
    )?;
    // Bounded: a daemon that logs the failure and runs on is stopped and fails the test.
    let log = lab.dir.join("a.log");
    let mut child = lab
        .cmd(&ns, &bin)
        .arg("run")
        .arg("--config")
        .arg(&d.config)
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let status = wait_for("weft run to exit", Duration::from_secs(30), || {
        child.try_wait().ok().flatten()
    });
    if status.is_err() {
        let _ = child.kill();
        let _ = child.wait();
    }
    let stderr = std::fs::read_to_string(&log)?;
    let status = status.with_context(|| format!("the start did not fail: {stderr}"))?;
    assert!(!status.success(), "{stderr}");
    assert!(
        stderr.contains(&format!("cni.conflist: writing {}", conflist.display())),
        "{stderr}"
    );
    // It got that far, then undid it.
    assert!(stderr.contains("masquerading pod traffic"), "{stderr}");
    assert!(stderr.contains("removing what it installed"), "{stderr}");
    assert_eq!(snapshot(&lab, &ns)?, before, "{stderr}");
    assert!(
        !tables()?.contains("weft"),
        "the nft table is left: {stderr}"
    );
    Ok(())
}
