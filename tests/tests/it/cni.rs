//! `weft-cni` chained after Debian's reference plugins (`ptp` + `host-local`, then `portmap`),
//! run exactly as a runtime runs the conflist each daemon writes: pods on two nodes reach each
//! other through the overlay with the overlay MTU; CHECK, DEL, ADD again, GC, STATUS; and bad
//! input gets the right CNI code with nothing changed. Run as root.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::json;
use weft::demo::lab::{Lab, wait_for};
use weft_tests::cni::{Runtime, first_ipv4, gc_conf};
use weft_tests::{Pair, ping};

fn conflist_of(p: &Pair, node: &weft::demo::lab::Daemon) -> anyhow::Result<Runtime> {
    let path = node.config.with_file_name("10-weft.conflist");
    wait_for(
        "the daemon to write its conflist",
        Duration::from_secs(10),
        || path.exists().then_some(()),
    )?;
    Runtime::new(&path, &node.ns).context(p.lab.id.clone())
}

fn mtu_of(lab: &Lab, ns: &str, dev: &str) -> anyhow::Result<u64> {
    let out = weft::demo::lab::run(lab.cmd(ns, "ip").args(["-j", "link", "show", dev]))?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    v[0]["mtu"].as_u64().context("no mtu")
}

fn netns_path(ns: &str) -> String {
    format!("/run/netns/{ns}")
}

#[test]
fn pods_from_the_rendered_conflist_reach_each_other_with_the_overlay_mtu_and_check_del_gc_status_work()
-> anyhow::Result<()> {
    let mut p = Pair::start("cn")?;
    let (ra, rb) = (conflist_of(&p, &p.a)?, conflist_of(&p, &p.b)?);
    let overlay_mtu = p.lab.status(&p.bin, &p.a)?["node"]["mtu"]
        .as_u64()
        .context("mtu")?;
    ensure!(
        ra.conflist["plugins"][1]["mtu"] == overlay_mtu,
        "{}",
        ra.conflist
    );
    let (pa, pb) = (p.lab.add_ns("pa")?, p.lab.add_ns("pb")?);
    let res_a = ra.add(&p.lab, "pod-a", &netns_path(&pa), "eth0")?;
    let res_b = rb.add(&p.lab, "pod-b", &netns_path(&pb), "eth0")?;
    let (ip_a, ip_b) = (
        first_ipv4(&res_a).context("a's ip")?,
        first_ipv4(&res_b).context("b's ip")?,
    );
    ensure!(
        ip_a.starts_with("100.64.1.") && ip_b.starts_with("100.64.2."),
        "{ip_a} {ip_b}"
    );
    // The pod's interface and the host side of its veth carry the overlay MTU.
    ensure!(mtu_of(&p.lab, &pa, "eth0")? == overlay_mtu, "pod MTU");
    let host_if = weft::cni::host_interfaces(&res_a);
    ensure!(!host_if.is_empty(), "no host interface in {res_a}");
    ensure!(
        mtu_of(&p.lab, &p.a.ns, &host_if[0])? == overlay_mtu,
        "host-side MTU"
    );
    // Pod to pod, through weft.
    ping(&p.lab, &pa, &ip_b, None)?;
    ping(&p.lab, &pb, &ip_a, None)?;

    // CHECK passes, then catches a changed MTU.
    let check_conf = ra.plugin_conf("weft-cni", Some(&res_a))?;
    let o = ra.weft_cni(&p.lab, "CHECK", "pod-a", &netns_path(&pa), &check_conf)?;
    ensure!(o.ok, "CHECK failed: {}", o.text);
    p.lab.ip(&pa, &["link", "set", "eth0", "mtu", "1300"])?;
    let o = ra.weft_cni(&p.lab, "CHECK", "pod-a", &netns_path(&pa), &check_conf)?;
    ensure!(
        !o.ok && o.code() == Some(100) && o.text.contains("1300"),
        "CHECK missed the MTU: {}",
        o.text
    );

    // DEL, then ADD again.
    ra.del(&p.lab, "pod-a", &netns_path(&pa), "eth0", &res_a)?;
    let res_a = ra.add(&p.lab, "pod-a", &netns_path(&pa), "eth0")?;
    let ip_a = first_ipv4(&res_a).context("a's ip")?;
    ping(&p.lab, &pa, &ip_b, None)?;
    ensure!(mtu_of(&p.lab, &pa, "eth0")? == overlay_mtu);

    // GC: a second pod on a, then only pod-a is valid.
    let pa2 = p.lab.add_ns("pa2")?;
    let res_a2 = ra.add(&p.lab, "pod-a2", &netns_path(&pa2), "eth0")?;
    let listed = |p: &Pair| -> anyhow::Result<Vec<String>> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let r = rt.block_on(weft::api::call(&p.a.socket, &weft::api::Request::CniList))?;
        Ok(r.attachments
            .unwrap_or_default()
            .into_iter()
            .map(|a| a.container_id)
            .collect())
    };
    ensure!(listed(&p)? == ["pod-a", "pod-a2"], "{:?}", listed(&p)?);
    let socket = p.a.socket.display().to_string();
    let o = ra.weft_cni(
        &p.lab,
        "GC",
        "",
        "",
        &gc_conf(&ra.conflist["cniVersion"], &socket, &[("pod-a", "eth0")]),
    )?;
    ensure!(o.ok, "GC failed: {}", o.text);
    ensure!(listed(&p)? == ["pod-a"], "GC left {:?}", listed(&p)?);
    let _ = res_a2;

    // STATUS: ready while the daemon runs; 50 once it is down; DEL still succeeds then.
    let status_conf = rb.plugin_conf("weft-cni", None)?;
    let o = rb.weft_cni(&p.lab, "STATUS", "", "", &status_conf)?;
    ensure!(o.ok, "STATUS with a running daemon: {}", o.text);
    ensure!(
        p.lab.stop("b", Duration::from_secs(10))?,
        "b did not stop cleanly"
    );
    let o = rb.weft_cni(&p.lab, "STATUS", "", "", &status_conf)?;
    ensure!(
        !o.ok && o.code() == Some(50),
        "STATUS with the daemon down: {}",
        o.text
    );
    let del_conf = rb.plugin_conf("weft-cni", Some(&res_b))?;
    let o = rb.weft_cni(&p.lab, "DEL", "pod-b", &netns_path(&pb), &del_conf)?;
    ensure!(o.ok, "DEL with the daemon down: {}", o.text);
    let _ = ip_a;
    Ok(())
}

#[test]
fn bad_input_to_weft_cni_gets_the_right_code_and_changes_nothing() -> anyhow::Result<()> {
    let p = Pair::start("cb")?;
    let ra = conflist_of(&p, &p.a)?;
    let pa = {
        let mut lab = Lab::new("cbp")?;
        let ns = lab.add_ns("pod")?;
        (lab, ns)
    };
    let snapshot = |lab: &Lab, ns: &str| -> anyhow::Result<String> {
        let mut s = String::new();
        for args in [
            &["-o", "link", "show"][..],
            &["-o", "addr", "show"],
            &["route", "show"],
        ] {
            s.push_str(&String::from_utf8_lossy(&lab.ip(ns, args)?.stdout));
        }
        Ok(s)
    };
    let before = (snapshot(&p.lab, &p.a.ns)?, snapshot(&pa.0, &pa.1)?);
    let good = ra.plugin_conf(
        "weft-cni",
        Some(&json!({"cniVersion": "1.0.0", "interfaces": [], "ips": []})),
    )?;
    let ns = netns_path(&pa.1);
    let mut no_prev = good.clone();
    no_prev
        .as_object_mut()
        .context("object")?
        .remove("prevResult");
    let mut old = good.clone();
    old["cniVersion"] = json!("0.3.1");
    let cases: Vec<(&str, serde_json::Value, &str, u64)> = vec![
        ("malformed JSON", json!("{not json"), ns.as_str(), 6),
        ("missing prevResult", no_prev, ns.as_str(), 7),
        ("unsupported cniVersion", old, ns.as_str(), 1),
        (
            "netns that does not exist",
            good.clone(),
            "/run/netns/weft-no-such-netns",
            3,
        ),
    ];
    for (what, stdin, netns, code) in cases {
        // The malformed case sends the raw text, not a JSON string.
        let stdin = if let Some(t) = stdin.as_str() {
            serde_json::Value::String(t.into())
        } else {
            stdin
        };
        let o = if stdin.is_string() {
            raw(&p, &ra, netns, stdin.as_str().unwrap_or_default())?
        } else {
            ra.weft_cni(&p.lab, "ADD", "bad", netns, &stdin)?
        };
        ensure!(!o.ok, "{what}: exited 0: {}", o.text);
        ensure!(
            o.code() == Some(code),
            "{what}: wanted code {code}, got {}",
            o.text
        );
        ensure!(
            o.json
                .as_ref()
                .and_then(|j| j["msg"].as_str())
                .is_some_and(|m| !m.is_empty()),
            "{what}: no msg"
        );
        ensure!(!o.text.contains("panicked"), "{what}: {}", o.text);
    }
    ensure!(
        (snapshot(&p.lab, &p.a.ns)?, snapshot(&pa.0, &pa.1)?) == before,
        "bad input changed the host or the pod"
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let r = rt.block_on(weft::api::call(&p.a.socket, &weft::api::Request::CniList))?;
    ensure!(
        r.attachments.unwrap_or_default().is_empty(),
        "bad input registered something"
    );
    Ok(())
}

/// weft-cni ADD with `text` as stdin, verbatim.
fn raw(
    p: &Pair,
    ra: &Runtime,
    netns: &str,
    text: &str,
) -> anyhow::Result<weft_tests::cni::Outcome> {
    let bin = weft_tests::weft_bin()?.with_file_name("weft-cni");
    let mut cmd = p.lab.cmd(&ra.host_ns, &bin);
    cmd.env("CNI_COMMAND", "ADD")
        .env("CNI_CONTAINERID", "bad")
        .env("CNI_NETNS", netns)
        .env("CNI_IFNAME", "eth0")
        .env("CNI_PATH", &ra.cni_path);
    let out = weft_tests::output_with_input(&mut cmd, text)?;
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    Ok(weft_tests::cni::Outcome {
        ok: out.status.success(),
        json: serde_json::from_str(&stdout).ok(),
        text: stdout,
    })
}
