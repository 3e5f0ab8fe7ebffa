//! The Kubernetes node source with the real kube client against an in-process server that
//! speaks the Kubernetes REST protocol for Nodes (list with resourceVersion, watch event streams,
//! 410 Gone forcing a re-list, merge and strategic-merge patches, 403, 503): the API down at
//! start then up, the initial list, a node added, labels and addresses changed, a node deleted,
//! the watch expired, the key and the condition published once. No sockets: the server is a
//! tower service inside the test.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use weft::nodesource::{NodeSource, SourceEvent};
use weft_tests::kubeapi::{Shared, client, node};

/// The next event the source sends that `want` accepts (bounded).
async fn next(
    rx: &mut mpsc::Receiver<SourceEvent>,
    what: &str,
    mut want: impl FnMut(&SourceEvent) -> bool,
) -> anyhow::Result<SourceEvent> {
    #[expect(clippy::disallowed_methods, reason = "the test bounds its own wait")]
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    loop {
        let e = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .with_context(|| format!("timed out waiting for {what}"))?
            .context("the source stopped")?;
        if want(&e) {
            return Ok(e);
        }
    }
}

fn others(e: &SourceEvent) -> Option<BTreeMap<String, Option<String>>> {
    match e {
        SourceEvent::Others(v) => Some(
            v.iter()
                .map(|n| (n.name.clone(), n.region.clone()))
                .collect(),
        ),
        _ => None,
    }
}

#[tokio::test]
async fn the_source_follows_nodes_through_api_downtime_changes_deletions_and_expired_watches()
-> anyhow::Result<()> {
    let st: Shared = Arc::default();
    {
        let mut f = st.lock().expect("fake");
        f.put(node(
            "n1",
            "failure-domain.beta.kubernetes.io/region",
            "eu",
            "198.18.1.1",
        ));
        f.put(node(
            "n2",
            "topology.kubernetes.io/region",
            "us",
            "198.18.2.1",
        ));
        f.fail = Some(503);
    }
    let (tx, mut rx) = mpsc::channel(64);
    let (stop_tx, stop_rx) = watch::channel(false);
    let source = NodeSource {
        client: client(&st),
        me: "n1".into(),
        public_key: "KEY1".into(),
    };
    let task = tokio::spawn(source.run(tx, stop_rx));

    // Down at start: reported, retried.
    let e = next(&mut rx, "a trouble report", |e| {
        matches!(e, SourceEvent::Trouble(_))
    })
    .await?;
    ensure!(
        matches!(&e, SourceEvent::Trouble(m) if m.contains("retrying")),
        "{e:?}"
    );
    st.lock().expect("fake").fail = None;
    let me = next(&mut rx, "this node", |e| matches!(e, SourceEvent::Me(_))).await?;
    let SourceEvent::Me(me) = me else {
        unreachable!()
    };
    ensure!(
        me.region.as_deref() == Some("eu") && me.pod_cidrs.len() == 1,
        "{me:?}"
    );
    ensure!(me.private_address == Some("198.18.1.1".parse()?));
    let o = next(&mut rx, "the others", |e| others(e).is_some()).await?;
    ensure!(
        others(&o) == Some(BTreeMap::from([("n2".into(), Some("us".into()))])),
        "{o:?}"
    );

    // The key and the condition, each once.
    let patched = |st: &Shared| st.lock().expect("fake").patches.clone();
    for _ in 0..200 {
        if patched(&st).len() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let p = patched(&st);
    ensure!(p.len() == 2, "{p:?}");
    let key = p
        .iter()
        .find(|(path, ..)| path == "/api/v1/nodes/n1")
        .context("annotation patch")?;
    ensure!(
        key.1.contains("merge-patch")
            && key.2["metadata"]["annotations"]["weft.dev/public-key"] == "KEY1"
    );
    let cond = p
        .iter()
        .find(|(path, ..)| path == "/api/v1/nodes/n1/status")
        .context("status patch")?;
    ensure!(cond.1.contains("strategic-merge-patch"), "{}", cond.1);
    ensure!(cond.2["status"]["conditions"][0]["type"] == "NetworkUnavailable");
    ensure!(cond.2["status"]["conditions"][0]["status"] == "False");

    // A node added, a region and an address changed, a node deleted.
    st.lock().expect("fake").put(node(
        "n3",
        "topology.kubernetes.io/region",
        "eu",
        "198.18.1.3",
    ));
    next(&mut rx, "n3 added", |e| {
        others(e).is_some_and(|o| o.contains_key("n3"))
    })
    .await?;
    let mut n2 = node("n2", "topology.kubernetes.io/region", "ap", "198.18.2.1");
    n2["metadata"]["annotations"]["weft.dev/private-address"] = json!("198.18.2.9");
    st.lock().expect("fake").put(n2);
    next(&mut rx, "n2 moved to ap", |e| {
        others(e).is_some_and(|o| o.get("n2") == Some(&Some("ap".into())))
    })
    .await?;
    st.lock().expect("fake").delete("n3");
    next(&mut rx, "n3 gone", |e| {
        others(e).is_some_and(|o| !o.contains_key("n3"))
    })
    .await?;

    // The watch expires while a node appears: the source lists again and sees it.
    let lists = st.lock().expect("fake").lists;
    {
        let mut f = st.lock().expect("fake");
        f.nodes.insert(
            "n4".into(),
            node("n4", "topology.kubernetes.io/region", "us", "198.18.2.4"),
        );
        f.bump("n4");
        f.expire();
    }
    next(&mut rx, "n4 after the re-list", |e| {
        others(e).is_some_and(|o| o.contains_key("n4"))
    })
    .await?;
    ensure!(
        st.lock().expect("fake").lists > lists,
        "no re-list after 410"
    );
    // No patch repeated: the Node already says both.
    ensure!(patched(&st).len() == 2, "patched again: {:?}", patched(&st));

    stop_tx.send(true)?;
    tokio::time::timeout(Duration::from_secs(5), task).await??;
    Ok(())
}

#[tokio::test]
async fn a_forbidden_api_is_reported_naming_the_missing_permission() -> anyhow::Result<()> {
    let st: Shared = Arc::default();
    st.lock().expect("fake").fail = Some(403);
    let (tx, mut rx) = mpsc::channel(8);
    let (stop_tx, stop_rx) = watch::channel(false);
    let source = NodeSource {
        client: client(&st),
        me: "n1".into(),
        public_key: "K".into(),
    };
    let task = tokio::spawn(source.run(tx, stop_rx));
    let e = next(&mut rx, "a trouble report", |e| {
        matches!(e, SourceEvent::Trouble(_))
    })
    .await?;
    let SourceEvent::Trouble(msg) = e else {
        unreachable!()
    };
    ensure!(
        msg.contains("403") && msg.contains("list and watch on nodes"),
        "{msg}"
    );
    stop_tx.send(true)?;
    tokio::time::timeout(Duration::from_secs(5), task).await??;
    Ok(())
}
