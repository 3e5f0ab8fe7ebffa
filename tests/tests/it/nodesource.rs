//! The Kubernetes node source with the real kube client against an in-process server that
//! speaks the Kubernetes REST protocol for Nodes (list with resourceVersion, watch event streams,
//! 410 Gone forcing a re-list, merge and strategic-merge patches, 403, 503): the API down at
//! start then up, the initial list, a node added, labels and addresses changed, a node deleted,
//! the watch expired, the key and the condition published once. No sockets: the server is a
//! tower service inside the test.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use anyhow::{Context as _, ensure};
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};
use weft::nodesource::{NodeSource, SourceEvent};

type Chunk = Result<http_body::Frame<Bytes>, Infallible>;

#[derive(Default)]
struct Fake {
    nodes: BTreeMap<String, Value>,
    rv: u64,
    watchers: Vec<mpsc::UnboundedSender<Chunk>>,
    /// (path, content type, body) of every PATCH.
    patches: Vec<(String, String, Value)>,
    /// Answer everything with this status code.
    fail: Option<u16>,
    lists: usize,
}

type Shared = Arc<Mutex<Fake>>;

fn node(name: &str, region_label: &str, region: &str, internal: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {region_label: region}, "annotations": {}},
        "spec": {"podCIDRs": [format!("100.64.{}.0/24", &name[1..])]},
        "status": {"addresses": [{"type": "InternalIP", "address": internal}]}
    })
}

fn full(code: u16, v: &Value) -> http::Response<BoxBody<Bytes, Infallible>> {
    let mut r = http::Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = http::StatusCode::from_u16(code).expect("status code");
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    r
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
           "message": format!("{reason} (fake API)")})
}

impl Fake {
    fn bump(&mut self, name: &str) -> Value {
        self.rv += 1;
        let rv = self.rv.to_string();
        let n = self.nodes.get_mut(name).expect("node");
        n["metadata"]["resourceVersion"] = json!(rv);
        n.clone()
    }

    fn event(&mut self, kind: &str, obj: &Value) {
        let line = format!("{}\n", json!({"type": kind, "object": obj}));
        self.watchers.retain(|w| {
            w.send(Ok(http_body::Frame::data(Bytes::from(line.clone()))))
                .is_ok()
        });
    }

    fn put(&mut self, n: Value) {
        let name = n["metadata"]["name"].as_str().expect("name").to_owned();
        let kind = if self.nodes.contains_key(&name) {
            "MODIFIED"
        } else {
            "ADDED"
        };
        self.nodes.insert(name.clone(), n);
        let obj = self.bump(&name);
        self.event(kind, &obj);
    }

    fn delete(&mut self, name: &str) {
        let obj = self.bump(name);
        self.nodes.remove(name);
        self.event("DELETED", &obj);
    }

    /// The watch expires: an ERROR 410 event, then the streams close.
    fn expire(&mut self) {
        self.event("ERROR", &status(410, "Expired"));
        self.watchers.clear();
    }
}

async fn serve(
    req: http::Request<kube::client::Body>,
    st: Shared,
) -> Result<http::Response<BoxBody<Bytes, Infallible>>, Infallible> {
    let (path, query) = (
        req.uri().path().to_owned(),
        req.uri().query().unwrap_or("").to_owned(),
    );
    let method = req.method().clone();
    let ctype = req
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or("")
        .to_owned();
    let body = req
        .into_body()
        .collect()
        .await
        .map(|b| b.to_bytes())
        .unwrap_or_default();
    let mut f = st.lock().expect("fake");
    if let Some(code) = f.fail {
        return Ok(full(
            code,
            &status(
                code,
                if code == 403 {
                    "Forbidden"
                } else {
                    "ServiceUnavailable"
                },
            ),
        ));
    }
    match (method.as_str(), path.as_str()) {
        ("GET", "/api/v1/nodes") if query.contains("watch=true") => {
            let (tx, rx) = mpsc::unbounded_channel::<Chunk>();
            f.watchers.push(tx);
            let stream =
                futures::stream::unfold(rx, |mut rx| async { rx.recv().await.map(|c| (c, rx)) });
            let mut r = http::Response::new(StreamBody::new(stream).boxed());
            r.headers_mut().insert(
                "content-type",
                http::HeaderValue::from_static("application/json"),
            );
            Ok(r)
        }
        ("GET", "/api/v1/nodes") => {
            f.lists += 1;
            let items: Vec<Value> = f.nodes.values().cloned().collect();
            Ok(full(
                200,
                &json!({"kind": "NodeList", "apiVersion": "v1",
                "metadata": {"resourceVersion": f.rv.to_string()}, "items": items}),
            ))
        }
        ("PATCH", p) if p.starts_with("/api/v1/nodes/") => {
            let rest = &p["/api/v1/nodes/".len()..];
            let (name, sub) = rest.split_once('/').unwrap_or((rest, ""));
            let patch: Value = serde_json::from_slice(&body).unwrap_or(Value::Null);
            f.patches.push((p.to_owned(), ctype, patch.clone()));
            let Some(n) = f.nodes.get_mut(name) else {
                return Ok(full(404, &status(404, "NotFound")));
            };
            if sub == "status" {
                n["status"]["conditions"] = patch["status"]["conditions"].clone();
            } else if let Some(a) = patch["metadata"]["annotations"].as_object() {
                for (k, v) in a {
                    n["metadata"]["annotations"][k] = v.clone();
                }
            }
            let obj = f.bump(name);
            f.event("MODIFIED", &obj);
            Ok(full(200, &obj))
        }
        _ => Ok(full(404, &status(404, "NotFound"))),
    }
}

fn client(st: &Shared) -> kube::Client {
    let st = st.clone();
    let svc = tower::service_fn(move |req| serve(req, st.clone()));
    kube::Client::new(svc, "default")
}

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
