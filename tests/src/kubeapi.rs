//! A fake Kubernetes API server for Nodes, in process: list with resourceVersion in pages
//! (`limit` and `continue`), watch event streams with bookmarks, merge and strategic-merge
//! patches of a Node and its status, 403/503 on demand, 410 Gone on demand, and a log of every
//! request with its query. [`client`] serves it to a kube client without sockets; [`serve_http`] serves
//! it over HTTP inside a lab namespace, for daemons.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::sync::{Arc, Mutex};

use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt as _, Full, StreamBody};
use serde_json::{Value, json};
use tokio::sync::mpsc;

/// One chunk of a watch stream.
pub type Chunk = Result<http_body::Frame<Bytes>, Infallible>;

/// The fake's state.
#[derive(Default)]
pub struct Fake {
    /// The Nodes, by name.
    pub nodes: BTreeMap<String, Value>,
    /// The resourceVersion.
    pub rv: u64,
    /// Open watches.
    pub watchers: Vec<mpsc::UnboundedSender<Chunk>>,
    /// (path, content type, body) of every PATCH.
    pub patches: Vec<(String, String, Value)>,
    /// Answer everything with this status code.
    pub fail: Option<u16>,
    /// How many lists (pages) were served.
    pub lists: usize,
    /// (method, path, query) of every request, in order.
    pub requests: Vec<(String, String, String)>,
    /// The resourceVersion each list page reported, in order.
    pub listed: Vec<u64>,
}

/// The value of `key` in a query string (`None` when absent).
pub fn query_value<'q>(query: &'q str, key: &str) -> Option<&'q str> {
    query
        .split('&')
        .filter_map(|kv| kv.split_once('='))
        .find(|(k, _)| *k == key)
        .map(|(_, v)| v)
}

/// The fake, shared with its requests.
pub type Shared = Arc<Mutex<Fake>>;

/// A Node named `nN` (N digits) with its block `100.64.N.0/24`.
pub fn node(name: &str, region_label: &str, region: &str, internal: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {region_label: region}, "annotations": {}},
        "spec": {"podCIDRs": [format!("100.64.{}.0/24", &name[1..])]},
        "status": {"addresses": [{"type": "InternalIP", "address": internal}]}
    })
}

/// A JSON response.
pub fn full(code: u16, v: &Value) -> http::Response<BoxBody<Bytes, Infallible>> {
    let mut r = http::Response::new(Full::new(Bytes::from(v.to_string())).boxed());
    *r.status_mut() = http::StatusCode::from_u16(code).expect("status code");
    r.headers_mut().insert(
        "content-type",
        http::HeaderValue::from_static("application/json"),
    );
    r
}

/// A Status object.
pub fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "status": "Failure", "code": code, "reason": reason,
           "message": format!("{reason} (fake API)")})
}

impl Fake {
    /// A new resourceVersion for `name`; its object.
    pub fn bump(&mut self, name: &str) -> Value {
        self.rv += 1;
        let rv = self.rv.to_string();
        let n = self.nodes.get_mut(name).expect("node");
        n["metadata"]["resourceVersion"] = json!(rv);
        n.clone()
    }

    /// Sends a watch event to every watch.
    pub fn event(&mut self, kind: &str, obj: &Value) {
        let line = format!("{}\n", json!({"type": kind, "object": obj}));
        self.watchers.retain(|w| {
            w.send(Ok(http_body::Frame::data(Bytes::from(line.clone()))))
                .is_ok()
        });
    }

    /// Adds or replaces a Node (ADDED or MODIFIED).
    pub fn put(&mut self, n: Value) {
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

    /// Deletes a Node (DELETED).
    pub fn delete(&mut self, name: &str) {
        let obj = self.bump(name);
        self.nodes.remove(name);
        self.event("DELETED", &obj);
    }

    /// A BOOKMARK event: the resourceVersion moves on (as other objects change) and every watch
    /// is told so. Returns the new resourceVersion.
    pub fn bookmark(&mut self) -> u64 {
        self.rv += 1;
        let obj = json!({"kind": "Node", "apiVersion": "v1",
                         "metadata": {"resourceVersion": self.rv.to_string()}});
        self.event("BOOKMARK", &obj);
        self.rv
    }

    /// The server ends every watch (as after its timeout), without an error.
    pub fn close_watches(&mut self) {
        self.watchers.clear();
    }

    /// The watch expires: an ERROR 410 event, then the streams close.
    pub fn expire(&mut self) {
        self.event("ERROR", &status(410, "Expired"));
        self.watchers.clear();
    }
}

/// Answers one request.
pub async fn serve<B: http_body::Body<Data = Bytes>>(
    req: http::Request<B>,
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
    f.requests
        .push((method.to_string(), path.clone(), query.clone()));
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
            // Pages in name order; the continue token is the last name served.
            let after = query_value(&query, "continue").unwrap_or("");
            let limit = query_value(&query, "limit")
                .and_then(|l| l.parse::<usize>().ok())
                .filter(|l| *l > 0)
                .unwrap_or(usize::MAX);
            let rest: Vec<(&String, &Value)> = f
                .nodes
                .iter()
                .filter(|(name, _)| after.is_empty() || name.as_str() > after)
                .collect();
            let items: Vec<Value> = rest.iter().take(limit).map(|(_, n)| (*n).clone()).collect();
            let rv = f.rv;
            let mut meta = json!({"resourceVersion": rv.to_string()});
            if rest.len() > limit {
                meta["continue"] = json!(rest[limit - 1].0);
            }
            f.listed.push(rv);
            Ok(full(
                200,
                &json!({"kind": "NodeList", "apiVersion": "v1", "metadata": meta, "items": items}),
            ))
        }
        ("GET", p) if p.starts_with("/api/v1/nodes/") => {
            match f.nodes.get(&p["/api/v1/nodes/".len()..]) {
                Some(n) => Ok(full(200, n)),
                None => Ok(full(404, &status(404, "NotFound"))),
            }
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

/// A kube client served by the fake in process.
pub fn client(st: &Shared) -> kube::Client {
    let st = st.clone();
    let svc = tower::service_fn(move |req| serve(req, st.clone()));
    kube::Client::new(svc, "default")
}

/// Serves the fake over HTTP on `addr` from a thread inside namespace `ns` until the lab's
/// namespace goes (the thread is detached). Returns the path of a kubeconfig (in the lab's
/// directory) that points a client at it.
pub fn serve_http(
    lab: &weft::demo::lab::Lab,
    ns: &str,
    addr: std::net::SocketAddr,
    st: Shared,
) -> anyhow::Result<std::path::PathBuf> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let _detached = lab.in_ns(ns, move || -> anyhow::Result<()> {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        rt.block_on(async move {
            let listener = tokio::net::TcpListener::bind(addr).await?;
            let _ = ready_tx.send(());
            loop {
                let (stream, _) = listener.accept().await?;
                let st = st.clone();
                tokio::spawn(async move {
                    let svc = hyper::service::service_fn(move |req| serve(req, st.clone()));
                    let _ = hyper::server::conn::http1::Builder::new()
                        .serve_connection(hyper_util::rt::TokioIo::new(stream), svc)
                        .await;
                });
            }
        })
    });
    ready_rx
        .recv_timeout(std::time::Duration::from_secs(5))
        .map_err(|_| anyhow::anyhow!("the fake API server did not listen on {addr}"))?;
    let kubeconfig = lab.dir.join(format!("kubeconfig-{ns}-{}", addr.port()));
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{addr}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: fake\n\
             current-context: fake\nusers:\n- name: fake\n  user: {{}}\n"
        ),
    )?;
    Ok(kubeconfig)
}
