//! weft against the stock userspace WireGuard (`wireguard-go` configured with `wg`, Debian's
//! packages): traffic both ways, then a restart of each side.

use std::process::Command;
use std::time::Duration;

use weft::demo::lab::{Lab, run, wait_for};
use weft_tests::{make_key, node_config, ping, tcp_transfer, weft_bin};

/// Starts wireguard-go as `ifname` in `ns` and configures it as the peer of weft node `a`.
fn start_wireguard_go(
    lab: &mut Lab,
    ns: &str,
    ifname: &str,
    key_file: &std::path::Path,
    weft_pub: &str,
) -> anyhow::Result<()> {
    let mut cmd = lab.cmd(ns, "wireguard-go");
    cmd.arg("-f")
        .arg(ifname)
        .env("WG_I_PREFER_BUGGY_USERSPACE_TO_POLISHED_KMOD", "1");
    let log = lab.dir.join(format!("{ifname}.log"));
    lab.spawn("wireguard-go", cmd, Some(&log))?;
    wait_for(
        &format!("wireguard-go to create {ifname}"),
        Duration::from_secs(10),
        || lab.ip(ns, &["link", "show", ifname]).ok(),
    )?;
    let sock = format!("/var/run/wireguard/{ifname}.sock");
    wait_for(
        "wireguard-go's control socket",
        Duration::from_secs(10),
        || std::path::Path::new(&sock).exists().then_some(()),
    )?;
    run(lab
        .cmd(ns, "wg")
        .args(["set", ifname, "listen-port", "51820", "private-key"])
        .arg(key_file)
        .args([
            "peer",
            weft_pub,
            "endpoint",
            "198.18.1.1:51820",
            "allowed-ips",
            "100.64.1.0/24",
        ]))?;
    lab.ip(ns, &["addr", "add", "100.64.2.1/32", "dev", ifname])?;
    lab.ip(ns, &["link", "set", ifname, "up"])?;
    lab.ip(ns, &["route", "add", "100.64.0.0/16", "dev", ifname])?;
    Ok(())
}

#[test]
fn weft_and_wireguard_go_exchange_traffic_and_survive_restarts_of_either_side() -> anyhow::Result<()>
{
    let bin = weft_bin()?;
    let mut lab = Lab::new("wg")?;
    let na = lab.add_ns("a")?;
    let nw = lab.add_ns("w")?;
    lab.link(
        (&na, "eth0", "198.18.1.1/24"),
        (&nw, "eth0", "198.18.1.2/24"),
    )?;
    let ifname = format!(
        "wg{}",
        lab.id
            .trim_start_matches("wl")
            .chars()
            .rev()
            .take(8)
            .collect::<String>()
    );
    let a = lab.daemon("a", &na, "")?;
    let weft_pub = make_key(&a)?;
    let wg_key = String::from_utf8(run(Command::new("wg").arg("genkey"))?.stdout)?;
    let wg_key_file = lab.dir.join("wg.key");
    std::fs::write(&wg_key_file, &wg_key)?;
    let mut pubkey = Command::new("wg");
    pubkey
        .arg("pubkey")
        .stdin(std::fs::File::open(&wg_key_file)?);
    let wg_pub = String::from_utf8(run(&mut pubkey)?.stdout)?
        .trim()
        .to_owned();
    let a = lab.daemon(
        "a",
        &na,
        &node_config(
            "a",
            "198.18.1.1",
            "100.64.1.0/24",
            &[("wg", &wg_pub, "198.18.1.2:51820", "100.64.2.0/24")],
        ),
    )?;
    lab.start(&bin, &a)?;
    start_wireguard_go(&mut lab, &nw, &ifname, &wg_key_file, &weft_pub)?;

    // Both directions, a ping and a stream each way.
    ping(&lab, &na, "100.64.2.1", None)?;
    ping(&lab, &nw, "100.64.1.1", None)?;
    tcp_transfer(&lab, (&na, &nw), "100.64.2.1:5001".parse()?, 10 << 20, 1)?;
    tcp_transfer(&lab, (&nw, &na), "100.64.1.1:5002".parse()?, 10 << 20, 2)?;
    let show = String::from_utf8(
        run(lab
            .cmd(&nw, "wg")
            .args(["show", &ifname, "latest-handshakes"]))?
        .stdout,
    )?;
    anyhow::ensure!(
        show.contains(&weft_pub),
        "wg show does not list weft: {show}"
    );

    // Restart weft: same key, new session indexes; it initiates, wireguard-go accepts.
    anyhow::ensure!(
        lab.stop("a", Duration::from_secs(10))?,
        "weft did not exit 0"
    );
    lab.start(&bin, &a)?;
    ping(&lab, &na, "100.64.2.1", None)?;
    ping(&lab, &nw, "100.64.1.1", None)?;

    // Restart wireguard-go: it initiates with a newer timestamp, weft accepts.
    lab.stop("wireguard-go", Duration::from_secs(10))?;
    wait_for(
        "the old wireguard-go interface to go",
        Duration::from_secs(10),
        || {
            lab.ip(&nw, &["link", "show", &ifname])
                .is_err()
                .then_some(())
        },
    )?;
    start_wireguard_go(&mut lab, &nw, &ifname, &wg_key_file, &weft_pub)?;
    ping(&lab, &nw, "100.64.1.1", None)?;
    ping(&lab, &na, "100.64.2.1", None)?;
    tcp_transfer(&lab, (&na, &nw), "100.64.2.1:5003".parse()?, 4 << 20, 3)?;

    let st = lab.status(&bin, &a)?;
    assert_eq!(st["peers"][0]["state"], "up", "{st}");
    assert_eq!(st["peers"][0]["public_key"], wg_pub.as_str());
    Ok(())
}
