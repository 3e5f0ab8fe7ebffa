//! The Grafana dashboard `deploy/grafana/weft.json` is a well-formed dashboard, and every
//! metric it queries exists, with the labels it groups by, in what running daemons serve: a
//! two-node mesh (two regions, so encrypted, each holding a block) is scraped after traffic.
//! Run as root.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::Value;
use weft::demo::lab::wait_for;
use weft_tests::exposition::parse_exposition;
use weft_tests::http_get;
use weft_tests::meshlab::{MeshLab, Spec};

/// Every `weft_*` name in a PromQL expression.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(i) = rest.find("weft_") {
        let tail = &rest[i..];
        let end = tail
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .unwrap_or(tail.len());
        out.insert(tail[..end].to_owned());
        rest = &tail[end..];
    }
    out
}

/// The labels of every `by (...)` in a PromQL expression.
fn grouped_by(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for part in expr.split("by (").skip(1) {
        let inside = part.split(')').next().unwrap_or("");
        out.extend(
            inside
                .split(',')
                .map(|l| l.trim().to_owned())
                .filter(|l| !l.is_empty()),
        );
    }
    out
}

/// (panel title, expression) of every query of the dashboard, checking its shape on the way.
fn queries(dashboard: &Value) -> anyhow::Result<Vec<(String, String)>> {
    ensure!(dashboard["uid"] == "weft-overview", "uid");
    let vars = dashboard["templating"]["list"]
        .as_array()
        .context("templating")?;
    ensure!(
        vars.iter().any(|v| v["name"] == "instance"),
        "no instance variable"
    );
    let mut ids = BTreeSet::new();
    let mut out = Vec::new();
    for p in dashboard["panels"].as_array().context("panels")? {
        let id = p["id"].as_u64().context("panel id")?;
        ensure!(ids.insert(id), "panel id {id} twice");
        for k in ["h", "w", "x", "y"] {
            ensure!(p["gridPos"][k].is_u64(), "panel {id}: gridPos.{k}");
        }
        if p["type"] == "row" {
            continue;
        }
        let title = p["title"].as_str().context("title")?.to_owned();
        ensure!(
            p["description"].as_str().is_some_and(|d| !d.is_empty()),
            "{title}: no description"
        );
        let targets = p["targets"].as_array().context("targets")?;
        ensure!(!targets.is_empty(), "{title}: no query");
        for t in targets {
            let expr = t["expr"].as_str().context("expr")?;
            ensure!(
                expr.contains("instance=~\"$instance\""),
                "{title}: {expr} ignores the node selector"
            );
            ensure!(t["refId"].is_string(), "{title}: refId");
            out.push((title.clone(), expr.to_owned()));
        }
    }
    Ok(out)
}

#[test]
fn every_metric_and_label_the_grafana_dashboard_queries_is_served_by_a_running_daemon()
-> anyhow::Result<()> {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/weft.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(&path)?)
        .with_context(|| format!("{} is not JSON", path.display()))?;
    let queries = queries(&dashboard)?;
    let source = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../src/api/metrics.rs"),
    )?;
    let spec = |name, region, lan, bootstrap| Spec {
        name,
        region,
        lan,
        host: 1,
        block: None,
        bootstrap,
    };
    let m = MeshLab::start(
        "gd",
        &[
            spec("e1", "eu", 1, Some("198.19.0.11")),
            spec("u1", "us", 2, Some("198.19.0.1")),
        ],
    )?;
    m.wait_full_mesh(&["e1", "u1"])?;
    // The first host of u1's block (never computed by hand: a string edit of "100.64.0.0/24"
    // once gave 100.64.1.1, the wrong block, whenever u1 claimed the pool's first block).
    let u1_pod = m.overlay("u1")?.into_iter().next().context("u1's block")?;
    weft_tests::ping(&m.lab, &m.daemon("e1").ns, &u1_pod, None)?;
    let ns = m.daemon("e1").ns.clone();
    // Scraped once the handshake shows, so every family the dashboard reads has its samples.
    let body = wait_for(
        "a scrape with a handshake age",
        Duration::from_secs(20),
        || {
            let resp = http_get(&m.lab, &ns, "127.0.0.1:6782", "/metrics").ok()?;
            let body = resp.split("\r\n\r\n").nth(1)?.to_owned();
            body.contains("weft_peer_handshake_age_seconds{")
                .then_some(body)
        },
    )?;
    let samples = parse_exposition(&body).map_err(|e| anyhow::anyhow!("{e}\n{body}"))?;
    // Families declared (a counter with no sample yet is still declared), as exposed names.
    let mut declared = BTreeSet::new();
    for line in body.lines() {
        let mut w = line.split(' ');
        if let (Some("#"), Some("TYPE"), Some(name), Some(kind)) =
            (w.next(), w.next(), w.next(), w.next())
        {
            declared.insert(if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            });
        }
    }
    let mut labels: BTreeMap<&str, BTreeSet<&str>> = BTreeMap::new();
    for s in &samples {
        labels
            .entry(s.name.as_str())
            .or_default()
            .extend(s.labels.iter().map(|(k, _)| k.as_str()));
    }
    let mut checked = BTreeSet::new();
    for (title, expr) in &queries {
        for name in metric_names(expr) {
            // Drop and refusal counters are served only once something was dropped or refused
            // (an empty family is left out): those not served in this run must at least be
            // counters the daemon registers under that name.
            let may_be_empty = name.contains("drops") || name.contains("rejected");
            let registered = name
                .strip_suffix("_total")
                .is_some_and(|family| source.contains(&format!("\"{family}\"")));
            ensure!(
                declared.contains(&name) || (may_be_empty && registered),
                "{title}: {name} is not served (declared: {declared:?})"
            );
            let Some(have) = labels.get(name.as_str()) else {
                ensure!(may_be_empty, "{title}: {name} has no sample");
                checked.insert(name);
                continue;
            };
            for l in grouped_by(expr) {
                // Prometheus adds the target's instance label when it scrapes.
                ensure!(
                    l == "instance" || have.contains(l.as_str()),
                    "{title}: {name} has no label {l} (it has {have:?})"
                );
            }
            checked.insert(name);
        }
    }
    eprintln!(
        "{} queries over {} metrics, all served: {checked:?}",
        queries.len(),
        checked.len()
    );
    for must in [
        "weft_peer_state",
        "weft_peer_transmit_bytes_total",
        "weft_peer_handshake_age_seconds",
        "weft_drops_total",
        "weft_mesh_members",
        "weft_mesh_gossip_sent_bytes_total",
        "weft_ipam_block",
    ] {
        ensure!(checked.contains(must), "the dashboard does not show {must}");
    }
    Ok(())
}
