//! weft daemons with `kubernetes.enabled` against a fake Kubernetes API served over HTTP in the
//! lab: each node takes its block from its Node's `spec.podCIDRs` (waiting while there is none,
//! following a change, writing its CNI config and no other), its region and addresses from
//! the Node, finds the others from the Node list (no bootstrap peers configured), publishes its
//! key and `NetworkUnavailable=False`, and follows a region label changed at run time. Run as
//! root.

use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::{Value, json};
use weft::demo::lab::{Lab, wait_for};
use weft_tests::kubeapi::{Shared, serve_http};
use weft_tests::weft_bin;

/// (name, region, LAN, host): e1, e2 in eu (LAN 1), u1 in us (LAN 2).
const NODES: [(&str, &str, u8, u8); 3] =
    [("e1", "eu", 1, 1), ("e2", "eu", 1, 2), ("u1", "us", 2, 1)];

fn public(lan: u8, host: u8) -> String {
    format!("198.19.0.{}", host + 10 * (lan - 1))
}

fn node_object(i: usize) -> Value {
    let (name, region, lan, host) = NODES[i];
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {"topology.kubernetes.io/region": region}, "annotations": {}},
        "spec": {"podCIDRs": [format!("100.64.{}.0/24", i + 1)]},
        "status": {"addresses": [
            {"type": "InternalIP", "address": format!("198.18.{lan}.{host}")},
            {"type": "ExternalIP", "address": public(lan, host)}]}
    })
}

#[test]
fn nodes_take_blocks_regions_and_peers_from_the_kubernetes_api_and_follow_label_changes_and_deletions()
-> anyhow::Result<()> {
    let bin = weft_bin()?;
    let mut lab = Lab::new("k8")?;
    let sw = lab.add_ns("sw")?;
    for br in ["lan1", "lan2", "inet"] {
        lab.bridge(&sw, br)?;
    }
    // The API server lives on the shared segment.
    lab.ip(&sw, &["addr", "add", "198.19.0.100/24", "dev", "inet"])?;
    let api: Shared = Shared::default();
    {
        let mut f = api.lock().expect("fake");
        for i in 0..NODES.len() {
            f.put(node_object(i));
        }
        // u1's podCIDRs are not assigned yet.
        let mut u1 = f.nodes["u1"].clone();
        u1["spec"]["podCIDRs"] = json!([]);
        f.put(u1);
    }
    let kubeconfig = serve_http(&lab, &sw, "198.19.0.100:6443".parse()?, api.clone())?;
    let secret = String::from_utf8(
        weft::demo::lab::run(std::process::Command::new(&bin).arg("gensecret"))?.stdout,
    )?;
    let mut daemons = Vec::new();
    for (name, _, lan, host) in NODES {
        let ns = lab.add_ns(name)?;
        lab.plug(
            (&sw, &format!("lan{lan}")),
            (&ns, "lan0", &format!("198.18.{lan}.{host}/24")),
        )?;
        lab.plug(
            (&sw, "inet"),
            (&ns, "wan0", &format!("{}/24", public(lan, host))),
        )?;
        // e1's underlay is a 1450-byte (cloud-like) link: its overlay MTU must follow it.
        if name == "e1" {
            lab.ip(&ns, &["link", "set", "lan0", "mtu", "1450"])?;
        }
        // No region, no addresses, no block, no bootstrap peers: Kubernetes says them all.
        let node = weft::demo::lab::NodeSection {
            name,
            ..Default::default()
        };
        let body = format!(
            "{}network:\n  trusted_subnets: [198.18.{lan}.0/24]\n\
             mesh:\n  secret_file: SECRET_FILE\n  gossip_interval: 1s\n  liveness_timeout: 6s\n\
             kubernetes:\n  enabled: true\nrouter:\n  interface: weft0\n",
            node.yaml()
        );
        let d = lab.daemon(name, &ns, &body)?;
        weft::host::keys::write_private(&d.secret_file, &secret)?;
        // Someone else's CNI config next to weft's, which weft must not touch.
        std::fs::write(
            d.config.with_file_name("99-other.conflist"),
            "{\"other\": true}\n",
        )?;
        lab.start_with(
            &bin,
            &d,
            &[],
            &[("KUBECONFIG", kubeconfig.to_str().context("path")?)],
        )?;
        daemons.push(d);
    }
    let status = |i: usize| lab.status(&bin, &daemons[i]);
    let peer = |i: usize, name: &str| -> Option<Value> {
        status(i).ok()?["peers"]
            .as_array()?
            .iter()
            .find(|p| p["name"] == name)
            .cloned()
    };

    // u1 waits for its podCIDRs, saying so, and writes no CNI config before it has a block.
    let u1_log = daemons[2].log.clone();
    wait_for(
        "u1 to say it waits for its podCIDRs",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&u1_log)
                .ok()
                .filter(|l| l.contains("waiting for the Node's spec.podCIDRs"))
        },
    )?;
    ensure!(
        status(2)?["node"]["pod_cidrs"] == json!([]),
        "u1 has a block before its Node says so"
    );
    let u1_conflist = daemons[2].config.with_file_name("10-weft.conflist");
    ensure!(!u1_conflist.exists(), "a conflist without a block");
    // A podCIDR outside weft's pod network (a cluster CIDR that is not pod_network_cidr) is
    // refused, naming it and the pool: every peer would refuse it, so u1 does not take it for
    // its TUN address, state or CNI config, and keeps waiting.
    {
        let mut f = api.lock().expect("fake");
        let mut u1 = f.nodes["u1"].clone();
        u1["spec"]["podCIDRs"] = json!(["10.244.1.0/24"]);
        f.put(u1);
    }
    wait_for(
        "u1 to refuse a podCIDR outside the pod network",
        Duration::from_secs(20),
        || {
            std::fs::read_to_string(&u1_log).ok().filter(|l| {
                l.lines().any(|l| {
                    l.contains("ERROR")
                        && l.contains("10.244.1.0/24")
                        && l.contains("100.64.0.0/16")
                })
            })
        },
    )
    .map_err(|e| {
        let st = status(2).map(|s| s.to_string()).unwrap_or_default();
        anyhow::anyhow!("{e}\nu1's status: {st}")
    })?;
    ensure!(
        status(2)?["node"]["pod_cidrs"] == json!([]),
        "u1 took a podCIDR outside the pod network: {}",
        status(2)?["node"]
    );
    ensure!(!u1_conflist.exists(), "a conflist for a refused podCIDR");
    let k = status(2)?["kubernetes"].clone();
    ensure!(
        k.as_str()
            .is_some_and(|k| k.contains("10.244.1.0/24") && k.contains("not taken")),
        "u1's status says kubernetes {k}"
    );
    // The node controller assigns u1's podCIDRs (a patch of the spec: the key u1 published
    // on its Node stays).
    {
        let mut f = api.lock().expect("fake");
        let mut u1 = f.nodes["u1"].clone();
        u1["spec"] = node_object(2)["spec"].clone();
        f.put(u1);
    }

    // Blocks from spec.podCIDRs, and a full mesh found through the Node list.
    for (i, (name, ..)) in NODES.iter().enumerate() {
        wait_for(
            &format!("{name} to take its block from its Node"),
            Duration::from_secs(30),
            || {
                (status(i).ok()?["node"]["pod_cidrs"] == json!([format!("100.64.{}.0/24", i + 1)]))
                    .then_some(())
            },
        )?;
    }
    for i in 0..NODES.len() {
        for (j, other) in NODES.iter().enumerate().filter(|(j, _)| *j != i) {
            wait_for(
                &format!("{} to route {}", NODES[i].0, other.0),
                Duration::from_secs(30),
                || {
                    peer(i, other.0)
                        .filter(|p| p["pod_cidrs"] == json!([format!("100.64.{}.0/24", j + 1)]))
                },
            )?;
            weft_tests::ping(&lab, &daemons[i].ns, &format!("100.64.{}.1", j + 1), None).map_err(
                |e| {
                    let logs: String = daemons
                        .iter()
                        .map(|d| {
                            format!(
                                "--- {}\n{}",
                                d.name,
                                std::fs::read_to_string(&d.log).unwrap_or_default()
                            )
                        })
                        .collect();
                    let st = status(i).map(|s| s.to_string()).unwrap_or_default();
                    anyhow::anyhow!("{e}\nstatus of {}: {st}\n{logs}", NODES[i].0)
                },
            )?;
        }
    }
    // Status shows the facts in use, from the Node, and where each came from; the MTU is the
    // link of the Node's InternalIP less WireGuard's 60 bytes (1450 on e1, 1500 elsewhere).
    for (i, (name, region, lan, host)) in NODES.iter().enumerate() {
        let n = status(i)?["node"].clone();
        let want = json!({
            "region": region, "region_source": "kubernetes",
            "private_address": format!("198.18.{lan}.{host}"), "private_address_source": "kubernetes",
            "public_address": public(*lan, *host), "public_address_source": "kubernetes",
            "mtu": if *name == "e1" { 1390 } else { 1440 },
        });
        let got: serde_json::Map<String, Value> = want
            .as_object()
            .context("object")?
            .keys()
            .map(|k| (k.clone(), n[k].clone()))
            .collect();
        ensure!(Value::Object(got) == want, "{name}: {n}");
    }
    let e1_conflist =
        std::fs::read_to_string(daemons[0].config.with_file_name("10-weft.conflist"))?;
    ensure!(
        e1_conflist.contains("\"mtu\": 1390"),
        "e1's conflist: {e1_conflist}"
    );
    // Regions from the labels decide the endpoints: e2 in-region (private, plaintext), u1 across.
    let p = peer(0, "e2").context("e1's peer e2")?;
    ensure!(
        p["endpoint"] == "198.18.1.2:51820" && p["path"] == "plaintext",
        "{p}"
    );
    let p = peer(0, "u1").context("e1's peer u1")?;
    ensure!(
        p["endpoint"] == format!("{}:51820", public(2, 1)) && p["region"] == "us",
        "{p}"
    );

    // Every node published its key and its condition, once.
    let patches = api.lock().expect("fake").patches.clone();
    for (name, ..) in NODES {
        let n = patches
            .iter()
            .filter(|(path, ..)| path == &format!("/api/v1/nodes/{name}"))
            .count();
        let s = patches
            .iter()
            .filter(|(path, ..)| path == &format!("/api/v1/nodes/{name}/status"))
            .count();
        ensure!(
            n == 1 && s == 1,
            "{name}: {n} annotation and {s} status patches: {patches:?}"
        );
    }
    let key =
        api.lock().expect("fake").nodes["e1"]["metadata"]["annotations"]["weft.dev/public-key"]
            .clone();
    ensure!(
        key == status(0)?["node"]["public_key"],
        "published key {key}"
    );

    ensure!(
        status(0)?["kubernetes"] == "ok",
        "{}",
        status(0)?["kubernetes"]
    );
    let conflist = std::fs::read_to_string(&u1_conflist)?;
    ensure!(conflist.contains("100.64.3.0/24"), "{conflist}");

    // The API goes away (the watch breaks and re-lists fail): status says so, traffic flows on.
    {
        let mut f = api.lock().expect("fake");
        f.fail = Some(503);
        f.expire();
    }
    wait_for(
        "e1's status to report the API trouble",
        Duration::from_secs(20),
        || {
            status(0).ok()?["kubernetes"]
                .as_str()
                .filter(|k| k.contains("retrying"))
                .map(drop)
        },
    )?;
    weft_tests::ping(&lab, &daemons[0].ns, "100.64.3.1", None)?;
    api.lock().expect("fake").fail = None;
    wait_for("e1's source to recover", Duration::from_secs(60), || {
        (status(0).ok()?["kubernetes"] == "ok").then_some(())
    })?;

    // u1's block changes: it moves, its conflist follows, the others route the new block.
    {
        let mut f = api.lock().expect("fake");
        let mut n = f.nodes["u1"].clone();
        n["spec"]["podCIDRs"] = json!(["100.64.9.0/24"]);
        f.put(n);
    }
    wait_for(
        "e1 to route u1's new block",
        Duration::from_secs(30),
        || peer(0, "u1").filter(|p| p["pod_cidrs"] == json!(["100.64.9.0/24"])),
    )?;
    weft_tests::ping(&lab, &daemons[0].ns, "100.64.9.1", None)?;
    ensure!(
        std::fs::read_to_string(&u1_conflist)?.contains("100.64.9.0/24"),
        "the conflist kept the old block"
    );
    for d in &daemons {
        let other = std::fs::read_to_string(d.config.with_file_name("99-other.conflist"))?;
        ensure!(
            other == "{\"other\": true}\n",
            "{}: another CNI config changed",
            d.name
        );
    }

    // e2's region label changes at run time: e1 now reaches it at its public address.
    {
        let mut f = api.lock().expect("fake");
        let mut n = f.nodes["e2"].clone();
        n["metadata"]["labels"]["topology.kubernetes.io/region"] = json!("us");
        f.put(n);
    }
    wait_for(
        "e1 to see e2 in us, at its public address",
        Duration::from_secs(30),
        || {
            peer(0, "e2").filter(|p| {
                p["region"] == "us" && p["endpoint"] == format!("{}:51820", public(1, 2))
            })
        },
    )?;
    weft_tests::ping(&lab, &daemons[0].ns, "100.64.2.1", None)?;
    // e2's own status follows its label too.
    wait_for(
        "e2's status to show region us",
        Duration::from_secs(10),
        || {
            let n = status(1).ok()?["node"].clone();
            (n["region"] == "us" && n["region_source"] == "kubernetes").then_some(())
        },
    )?;

    // u1's Node is deleted while its daemon still runs: the others stop routing it.
    api.lock().expect("fake").delete("u1");
    for (i, (name, ..)) in NODES.iter().enumerate().take(2) {
        wait_for(
            &format!("{name} to withdraw u1"),
            Duration::from_secs(30),
            || peer(i, "u1").is_none().then_some(()),
        )?;
    }
    ensure!(peer(0, "e2").is_some(), "e1 lost e2 too");
    for d in &daemons {
        ensure!(
            lab.stop(&d.name, Duration::from_secs(10))?,
            "{} did not stop cleanly",
            d.name
        );
    }
    Ok(())
}

/// `VmRSS` and `VmHWM` of process `pid`, in KiB.
fn rss_kib(pid: u32) -> anyhow::Result<(u64, u64)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        text.lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("no {name} in /proc/{pid}/status"))
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// A Node of the 1000-node cluster: `k0000` is the daemon's own, the others are in the same
/// region at addresses no route leads to (the daemon's dials to them fail at once).
fn cluster_node(i: usize, region: &str, round: usize) -> Value {
    let internal = if i == 0 {
        "198.18.1.1".to_owned()
    } else {
        format!("198.19.{}.{}", 100 + i / 250, i % 250 + 1)
    };
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": format!("k{i:04}"),
                     "labels": {"topology.kubernetes.io/region": region,
                                "weft.test/round": round.to_string()},
                     "annotations": {}},
        "spec": {"podCIDRs": [format!("100.{}.{}.0/24", 64 + i / 256, i % 256)]},
        "status": {"addresses": [{"type": "InternalIP", "address": internal}]}
    })
}

#[test]
fn a_daemon_watching_a_thousand_nodes_keeps_its_memory_flat_through_churn() -> anyhow::Result<()> {
    const N: usize = 1000;
    const ROUNDS: usize = 4;
    let bin = weft_bin()?;
    let mut lab = Lab::new("kmem")?;
    let sw = lab.add_ns("sw")?;
    lab.bridge(&sw, "lan1")?;
    lab.ip(&sw, &["addr", "add", "198.18.1.100/24", "dev", "lan1"])?;
    let api: Shared = Shared::default();
    {
        let mut f = api.lock().expect("fake");
        for i in 0..N {
            f.put(cluster_node(i, "eu", 0));
        }
    }
    let kubeconfig = serve_http(&lab, &sw, "198.18.1.100:6443".parse()?, api.clone())?;
    let ns = lab.add_ns("k0")?;
    lab.plug((&sw, "lan1"), (&ns, "lan0", "198.18.1.1/24"))?;
    let body = "node:\n  name: k0000\n  key_file: KEY_FILE\nmesh:\n  secret_file: SECRET_FILE\n\
                kubernetes:\n  enabled: true\nrouter:\n  interface: weft0\n";
    let d = lab.daemon("k0", &ns, body)?;
    let secret = String::from_utf8(
        weft::demo::lab::run(std::process::Command::new(&bin).arg("gensecret"))?.stdout,
    )?;
    weft::host::keys::write_private(&d.secret_file, &secret)?;
    lab.start_with(
        &bin,
        &d,
        &[],
        &[("KUBECONFIG", kubeconfig.to_str().context("path")?)],
    )?;
    let pid = lab.pid(&d.name).context("the daemon's pid")?;
    // The fake keeps no history to replay from a resourceVersion: changes go only to open
    // watches, so the rounds start once the daemon watches.
    wait_for(
        "the daemon to list and watch",
        Duration::from_secs(60),
        || (!api.lock().ok()?.watchers.is_empty()).then_some(()),
    )?;
    // Each round changes every Node, then this node's region last: once status shows that
    // region, the daemon has taken in the whole round (a watch delivers in order).
    let mut rss = Vec::new();
    for round in 0..ROUNDS {
        let region = format!("eu{round}");
        {
            let mut f = api.lock().expect("fake");
            for i in (1..N).chain([0]) {
                f.put(cluster_node(i, &region, round));
            }
        }
        wait_for(
            &format!("round {round} to reach the daemon"),
            Duration::from_secs(60),
            || (lab.status(&bin, &d).ok()?["node"]["region"] == region.as_str()).then_some(()),
        )
        .map_err(|e| {
            let log = std::fs::read_to_string(&d.log).unwrap_or_default();
            let tail: String = log.lines().rev().take(40).collect::<Vec<_>>().join("\n");
            let st = lab.status(&bin, &d).map(|s| s["node"].to_string());
            anyhow::anyhow!("{e}\nstatus: {st:?}\nlog (last lines first):\n{tail}")
        })?;
        ensure!(lab.status(&bin, &d)?["kubernetes"] == "ok");
        rss.push(rss_kib(pid)?);
    }
    let log = std::fs::read_to_string(&d.log)?;
    ensure!(
        log.contains("Kubernetes nodes listed nodes=1000"),
        "the daemon did not list 1000 Nodes:\n{log}"
    );
    eprintln!("RSS and peak (KiB) after each round of {N} Node changes: {rss:?}");
    let (first, _) = rss[0];
    let (last, peak) = rss[ROUNDS - 1];
    ensure!(
        peak <= 64 * 1024,
        "the daemon's peak RSS is {peak} KiB with {N} Nodes (budget 64 MiB): {rss:?}"
    );
    ensure!(
        last <= first + 4 * 1024,
        "RSS grew from {first} to {last} KiB over {ROUNDS} rounds of {N} Node changes: {rss:?}"
    );
    ensure!(
        lab.stop(&d.name, Duration::from_secs(10))?,
        "the daemon did not stop cleanly"
    );
    Ok(())
}
