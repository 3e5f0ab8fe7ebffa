//! The Kubernetes node source with the real kube client against an in-process server that
//! speaks the Kubernetes REST protocol for Nodes (list with resourceVersion, watch event streams,
//! 410 Gone forcing a re-list, merge and strategic-merge patches, 403, 503): the API down at
//! start then up, the initial list, a node added, labels and addresses changed, a node deleted,
//! the watch expired, the key and the condition published once, the key put back when another
//! is written over it. No sockets: the server is a
//! tower service inside the test.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use serde_json::json;
use tokio::sync::{mpsc, watch};
use weft::control::nodesource::{NodeSource, SourceEvent};
use weft_tests::kubeapi::{Shared, client, node, query_value};

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

/// How long after its own patch the sources here take a Node without the key for a removal.
const MARK_AGAIN: Duration = Duration::from_millis(300);

/// The source for node n1 (key KEY1) against `st`: its events, its stop, its task.
fn start(
    st: &Shared,
) -> (
    mpsc::Receiver<SourceEvent>,
    watch::Sender<bool>,
    tokio::task::JoinHandle<()>,
) {
    let (tx, rx) = mpsc::channel(64);
    let (stop_tx, stop_rx) = watch::channel(false);
    let source = NodeSource {
        client: client(st),
        me: "n1".into(),
        public_key: "KEY1".into(),
        mark_again_after: MARK_AGAIN,
    };
    (rx, stop_tx, tokio::spawn(source.run(tx, stop_rx.into())))
}

/// The patches the fake received, once there are `n` or 10 s have passed (whichever first).
async fn patches(st: &Shared, n: usize) -> Vec<(String, String, serde_json::Value)> {
    patches_within(st, n, 200).await
}

/// As [`patches`], waiting at most `tries` × 50 ms.
async fn patches_within(
    st: &Shared,
    n: usize,
    tries: u32,
) -> Vec<(String, String, serde_json::Value)> {
    for _ in 0..tries {
        if st.lock().expect("fake").patches.len() >= n {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    st.lock().expect("fake").patches.clone()
}

/// Whether patch `p` (path, content type, body) writes n1's key, KEY1, on n1's Node.
fn writes_n1_key(p: &(String, String, serde_json::Value)) -> bool {
    p.0 == "/api/v1/nodes/n1" && p.2["metadata"]["annotations"]["weft.dev/public-key"] == "KEY1"
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
    let (mut rx, stop_tx, task) = start(&st);

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
    let p = patches(&st, 2).await;
    ensure!(p.len() == 2, "{p:?}");
    let key = p
        .iter()
        .find(|(path, ..)| path == "/api/v1/nodes/n1")
        .context("annotation patch")?;
    ensure!(
        key.1.contains("merge-patch") && writes_n1_key(key),
        "{key:?}"
    );
    let cond = p
        .iter()
        .find(|(path, ..)| path == "/api/v1/nodes/n1/status")
        .context("status patch")?;
    ensure!(cond.1.contains("strategic-merge-patch"), "{}", cond.1);
    ensure!(cond.2["status"]["conditions"][0]["type"] == "NetworkUnavailable");
    ensure!(cond.2["status"]["conditions"][0]["status"] == "False");

    // Someone writes another key on this node's Node (the other nodes would take the member
    // with that key for n1): the source puts n1's back, once.
    {
        let mut f = st.lock().expect("fake");
        let mut n1 = f.nodes["n1"].clone();
        n1["metadata"]["annotations"]["weft.dev/public-key"] = json!("THIEF");
        f.put(n1);
    }
    let p = patches(&st, 3).await;
    ensure!(p.len() == 3, "{p:?}");
    ensure!(writes_n1_key(&p[2]), "{:?}", p[2]);
    ensure!(
        st.lock().expect("fake").nodes["n1"]["metadata"]["annotations"]["weft.dev/public-key"]
            == "KEY1"
    );
    // The key removed from the same Node object (`kubectl annotate ... -`, or a whole Node
    // put back without it): published again at the next event once the source's own patch
    // is MARK_AGAIN old (a view from before the patch is not taken for a removal). The Node
    // is touched (put again) until then, a bounded number of times.
    let mut again = Vec::new();
    for _ in 0..40 {
        {
            let mut f = st.lock().expect("fake");
            let mut n1 = f.nodes["n1"].clone();
            if let Some(a) = n1["metadata"]["annotations"].as_object_mut() {
                a.remove("weft.dev/public-key");
            }
            f.put(n1);
        }
        again = patches_within(&st, 4, 2).await;
        if again.len() >= 4 {
            break;
        }
    }
    ensure!(again.len() == 4, "{again:?}");
    ensure!(writes_n1_key(&again[3]), "{:?}", again[3]);

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
    ensure!(patched(&st).len() == 4, "patched again: {:?}", patched(&st));

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
        mark_again_after: MARK_AGAIN,
    };
    let task = tokio::spawn(source.run(tx, stop_rx.into()));
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

#[tokio::test]
async fn a_node_with_a_bad_address_annotation_stays_in_the_view_at_its_status_addresses()
-> anyhow::Result<()> {
    let st: Shared = Arc::default();
    {
        let mut f = st.lock().expect("fake");
        let mut n1 = node("n1", "topology.kubernetes.io/region", "eu", "198.18.1.1");
        n1["metadata"]["annotations"]["weft.dev/private-address"] = json!("10.0.0.5/24");
        f.put(n1);
        let mut n2 = node("n2", "topology.kubernetes.io/region", "eu", "198.18.1.2");
        n2["metadata"]["annotations"]["weft.dev/public-address"] = json!("not-an-ip");
        f.put(n2);
    }
    let (mut rx, stop_tx, task) = start(&st);
    // Listed: this node and the other, each at its InternalIP.
    let me = next(&mut rx, "this node", |e| matches!(e, SourceEvent::Me(_))).await?;
    let SourceEvent::Me(me) = me else {
        unreachable!()
    };
    ensure!(
        me.private_address == Some("198.18.1.1".parse()?) && me.pod_cidrs.len() == 1,
        "{me:?}"
    );
    let addresses = |e: &SourceEvent| match e {
        SourceEvent::Others(v) => Some(
            v.iter()
                .map(|n| (n.name.clone(), n.private_address, n.public_address))
                .collect::<Vec<_>>(),
        ),
        _ => None,
    };
    let o = next(&mut rx, "the others", |e| addresses(e).is_some()).await?;
    ensure!(
        addresses(&o) == Some(vec![("n2".into(), Some("198.18.1.2".parse()?), None)]),
        "{o:?}"
    );
    // Watched: a Node that arrives with a bad annotation is kept too.
    let mut n3 = node("n3", "topology.kubernetes.io/region", "eu", "198.18.1.3");
    n3["metadata"]["annotations"]["weft.dev/private-address"] = json!("198.18.1.300");
    st.lock().expect("fake").put(n3);
    let n3_ip: std::net::IpAddr = "198.18.1.3".parse()?;
    let o = next(&mut rx, "n3 added", |e| {
        addresses(e).is_some_and(|v| v.iter().any(|n| n.0 == "n3"))
    })
    .await?;
    ensure!(
        addresses(&o).is_some_and(|v| v.contains(&("n3".into(), Some(n3_ip), None))),
        "{o:?}"
    );
    stop_tx.send(true)?;
    tokio::time::timeout(Duration::from_secs(5), task).await??;
    Ok(())
}

/// Node `m{i:04}` with its own /24 in 100.64.0.0/10 and an InternalIP.
fn numbered(i: usize) -> serde_json::Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": format!("m{i:04}"),
                     "labels": {"topology.kubernetes.io/region": "eu"}, "annotations": {}},
        "spec": {"podCIDRs": [format!("100.{}.{}.0/24", 64 + i / 256, i % 256)]},
        "status": {"addresses": [{"type": "InternalIP",
                                  "address": format!("198.18.{}.{}", i / 250, i % 250 + 1)}]}
    })
}

/// The (method, path, query) requests the fake has seen so far.
fn requests(st: &Shared) -> Vec<(String, String, String)> {
    st.lock().expect("fake").requests.clone()
}

fn is_list(r: &(String, String, String)) -> bool {
    r.0 == "GET" && r.1 == "/api/v1/nodes" && query_value(&r.2, "watch") != Some("true")
}

fn is_watch(r: &(String, String, String)) -> bool {
    r.0 == "GET" && r.1 == "/api/v1/nodes" && query_value(&r.2, "watch") == Some("true")
}

/// Polls the request log (bounded) until a request after the first `skip` matches `want`.
async fn request_after(
    st: &Shared,
    skip: usize,
    what: &str,
    want: impl Fn(&(String, String, String)) -> bool,
) -> anyhow::Result<(String, String, String)> {
    for _ in 0..400 {
        if let Some(r) = requests(st).into_iter().skip(skip).find(&want) {
            return Ok(r);
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    anyhow::bail!("no {what} within 10 s; requests: {:?}", requests(st))
}

#[tokio::test]
async fn the_source_lists_in_pages_patches_as_weft_resumes_from_bookmarks_and_relists_fresh_after_410()
-> anyhow::Result<()> {
    const N: usize = 1200;
    let st: Shared = Arc::default();
    {
        let mut f = st.lock().expect("fake");
        for i in 0..N {
            f.put(numbered(i));
        }
    }
    let (tx, mut rx) = mpsc::channel(64);
    let (stop_tx, stop_rx) = watch::channel(false);
    let source = NodeSource {
        client: client(&st),
        me: "m0000".into(),
        public_key: "KEY0".into(),
        mark_again_after: MARK_AGAIN,
    };
    let task = tokio::spawn(source.run(tx, stop_rx.into()));
    next(&mut rx, "all other nodes", |e| {
        others(e).is_some_and(|o| o.len() == N - 1)
    })
    .await?;

    // The first list: pages of 500 (three for 1200 Nodes), a consistent read (no resourceVersion).
    let lists: Vec<_> = requests(&st).into_iter().filter(is_list).collect();
    ensure!(lists.len() == 3, "{lists:?}");
    for (i, (_, _, q)) in lists.iter().enumerate() {
        ensure!(query_value(q, "limit") == Some("500"), "page {i}: {q}");
        ensure!(
            query_value(q, "resourceVersion").unwrap_or("").is_empty(),
            "page {i} is not a consistent read: {q}"
        );
        ensure!(
            query_value(q, "continue").is_some() == (i > 0),
            "page {i}: {q}"
        );
    }
    // The watch resumes from the list's resourceVersion and asks for bookmarks.
    let listed_rv = st
        .lock()
        .expect("fake")
        .listed
        .last()
        .context("a list")?
        .to_string();
    let w = request_after(&st, 0, "watch", is_watch).await?;
    ensure!(
        query_value(&w.2, "allowWatchBookmarks") == Some("true"),
        "{w:?}"
    );
    ensure!(
        query_value(&w.2, "resourceVersion") == Some(listed_rv.as_str()),
        "{w:?}"
    );

    // Both patches name weft as their field manager.
    for _ in 0..400 {
        if requests(&st).iter().filter(|r| r.0 == "PATCH").count() >= 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let patches: Vec<_> = requests(&st)
        .into_iter()
        .filter(|r| r.0 == "PATCH")
        .collect();
    ensure!(patches.len() == 2, "{patches:?}");
    for p in &patches {
        ensure!(query_value(&p.2, "fieldManager") == Some("weft"), "{p:?}");
    }

    // A bookmark, then the server ends the watch: the source watches again from the bookmark's
    // resourceVersion, without listing every Node again.
    let (seen, lists_before, bookmark_rv) = {
        let mut f = st.lock().expect("fake");
        let rv = f.bookmark();
        f.close_watches();
        (f.requests.len(), f.lists, rv)
    };
    let w = request_after(&st, seen, "a watch after the bookmark", is_watch).await?;
    ensure!(
        query_value(&w.2, "resourceVersion") == Some(bookmark_rv.to_string().as_str()),
        "the watch did not resume from the bookmark ({bookmark_rv}): {w:?}"
    );
    ensure!(
        st.lock().expect("fake").lists == lists_before,
        "listed again after a bookmark: {:?}",
        requests(&st)
    );

    // 410 Gone: a fresh, consistent list (never an older resourceVersion), then a watch from it,
    // and a Node that appeared meanwhile is seen.
    let seen = {
        let mut f = st.lock().expect("fake");
        f.nodes.insert("m9999".into(), numbered(N));
        f.nodes.get_mut("m9999").expect("node")["metadata"]["name"] = json!("m9999");
        f.bump("m9999");
        f.expire();
        f.requests.len()
    };
    let l = request_after(&st, seen, "a re-list after 410", is_list).await?;
    ensure!(
        query_value(&l.2, "resourceVersion")
            .unwrap_or("")
            .is_empty(),
        "the re-list after 410 asked for an old resourceVersion: {l:?}"
    );
    next(&mut rx, "the new node after the re-list", |e| {
        others(e).is_some_and(|o| o.contains_key("m9999") && o.len() == N)
    })
    .await?;
    let w = request_after(&st, seen, "a watch after the re-list", is_watch).await?;
    let relisted = st.lock().expect("fake").listed.last().copied();
    ensure!(
        query_value(&w.2, "resourceVersion") == relisted.map(|r| r.to_string()).as_deref(),
        "{w:?} (the re-list said {relisted:?})"
    );

    stop_tx.send(true)?;
    tokio::time::timeout(Duration::from_secs(5), task).await??;
    Ok(())
}
