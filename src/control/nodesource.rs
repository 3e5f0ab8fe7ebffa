//! The Kubernetes node source: watches Nodes with the kube runtime watcher and reports this
//! node's view (region, addresses, `spec.podCIDRs`) and every other node's, and marks this node
//! ready for the cluster: the `weft.dev/public-key` annotation (merge patch) and the
//! `NetworkUnavailable=False` condition (strategic merge patch of the status), each only when
//! the Node does not say so already — never on a timer.
//!
//! Both patches name weft as their field manager (`fieldManager=weft`), so the Node's
//! `managedFields` say which fields weft owns. The watcher lists with a consistent read (no
//! `resourceVersion`, so a re-list after `410 Gone` never goes back in time), in pages of 500,
//! resumes watches from the last `resourceVersion` seen, and asks for bookmarks, so a watch the
//! server ends after a quiet spell resumes without listing every Node again. It keeps a small
//! [`NodeView`] per Node, never the Node objects.
//!
//! [`wait_for_node`] reads this node's Node once before the daemon creates its TUN device, when
//! the Node's private address decides the MTU.
//!
//! The API being down, at start or later, is retried with the watcher's backoff while the
//! daemon forwards with what it knows; each failure is reported ([`SourceEvent::Trouble`]),
//! a 403 naming the permission the ServiceAccount lacks.

use std::collections::BTreeMap;
use std::time::Duration;

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::control::k8s::{KEY_ANNOTATION, NodeView};

/// The field manager weft's patches name.
pub const FIELD_MANAGER: &str = "weft";
/// Nodes per page of a list (client-go's pager uses the same).
const LIST_PAGE: u32 = 500;
/// The longest pause between two reads of this node's Node while waiting for it.
const WAIT_BACKOFF_MAX: Duration = Duration::from_secs(10);

/// What the source tells the daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SourceEvent {
    /// This node, as its Node object says now.
    Me(NodeView),
    /// Every other node, as the API says now (after the initial list and each change).
    Others(Vec<NodeView>),
    /// The API could not be read; the message says why.
    Trouble(String),
}

/// The source's settings.
#[derive(Clone)]
pub struct NodeSource {
    /// The API client.
    pub client: Client,
    /// This node's Node name.
    pub me: String,
    /// This node's WireGuard public key, base64, to publish.
    pub public_key: String,
}

impl std::fmt::Debug for NodeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeSource")
            .field("me", &self.me)
            .finish_non_exhaustive()
    }
}

/// Why a failure happened, for people: a 403 names the permission.
pub fn explain(e: &watcher::Error) -> String {
    explain_text(&e.to_string())
}

fn explain_text(text: &str) -> String {
    if text.contains("403") || text.to_ascii_lowercase().contains("forbidden") {
        format!(
            "the Kubernetes API refused (403 Forbidden): the ServiceAccount needs get, list and watch on nodes, \
             and patch on nodes and nodes/status (ClusterRole weft in deploy/kubernetes/rbac.yaml): {text}"
        )
    } else {
        format!("the Kubernetes API is not answering as expected (retrying with backoff): {text}")
    }
}

/// Reads this node's Node (`me`) until the API answers with one weft can read, retrying with a
/// backoff capped at 10 s and logging every miss (the API down or refusing, no such Node yet, a
/// bad address annotation).
pub async fn wait_for_node(client: Client, me: &str) -> NodeView {
    let api: Api<Node> = Api::all(client);
    let mut delay = Duration::from_millis(250);
    loop {
        let miss = match api.get_opt(me).await {
            Ok(Some(n)) => match NodeView::from_node(&n) {
                Ok(v) => return v,
                Err(e) => e.to_string(),
            },
            Ok(None) => format!("no Node {me} yet (node.name must be the Kubernetes node name)"),
            Err(e) => explain_text(&e.to_string()),
        };
        warn!(node = %me, error = %miss, retry_in = ?delay, "waiting for this node's Node");
        tokio::time::sleep(delay).await;
        delay = (delay * 2).min(WAIT_BACKOFF_MAX);
    }
}

fn patch_params() -> PatchParams {
    PatchParams {
        field_manager: Some(FIELD_MANAGER.to_owned()),
        ..PatchParams::default()
    }
}

impl NodeSource {
    /// Watches until `shutdown`; events go to `events`.
    pub async fn run(
        self,
        events: mpsc::Sender<SourceEvent>,
        mut shutdown: crate::shutdown::Shutdown,
    ) {
        let api: Api<Node> = Api::all(self.client.clone());
        // Spelled out rather than left to kube's defaults, which the module doc promises.
        let mut config = watcher::Config::default()
            .list_semantic(watcher::ListSemantic::MostRecent)
            .page_size(LIST_PAGE);
        config.bookmarks = true;
        let mut stream = watcher(api.clone(), config).default_backoff().boxed();
        let mut nodes: BTreeMap<String, NodeView> = BTreeMap::new();
        let mut listing: Option<BTreeMap<String, NodeView>> = None;
        let mut published = None;
        let mut ready = false;
        loop {
            let item = tokio::select! {
                () = shutdown.wait() => return,
                item = stream.next() => item,
            };
            let Some(item) = item else { return };
            let changed = match item {
                Err(e) => {
                    let msg = explain(&e);
                    warn!(error = %msg, "Kubernetes node source");
                    let _ = events.send(SourceEvent::Trouble(msg)).await;
                    continue;
                }
                Ok(watcher::Event::Init) => {
                    listing = Some(BTreeMap::new());
                    None
                }
                Ok(watcher::Event::InitApply(n)) => {
                    if let (Some(l), Some(v)) = (listing.as_mut(), self.view(&n)) {
                        l.insert(v.name.clone(), v);
                    }
                    if n.metadata.name.as_deref() == Some(self.me.as_str()) {
                        self.mark(&api, &n, &mut published, &mut ready).await;
                    }
                    None
                }
                Ok(watcher::Event::InitDone) => {
                    nodes = listing.take().unwrap_or_default();
                    info!(nodes = nodes.len(), "Kubernetes nodes listed");
                    Some(())
                }
                Ok(watcher::Event::Apply(n)) => {
                    if n.metadata.name.as_deref() == Some(self.me.as_str()) {
                        self.mark(&api, &n, &mut published, &mut ready).await;
                    }
                    self.view(&n).map(|v| {
                        nodes.insert(v.name.clone(), v);
                    })
                }
                Ok(watcher::Event::Delete(n)) => {
                    let name = n.metadata.name.unwrap_or_default();
                    info!(node = %name, "Kubernetes node deleted");
                    nodes.remove(&name).map(drop)
                }
            };
            if changed.is_some() {
                if let Some(me) = nodes.get(&self.me) {
                    let _ = events.send(SourceEvent::Me(me.clone())).await;
                } else {
                    warn!(node = %self.me, "this node has no Node object (node.name must be the Kubernetes node name)");
                }
                let others = nodes
                    .values()
                    .filter(|v| v.name != self.me)
                    .cloned()
                    .collect();
                let _ = events.send(SourceEvent::Others(others)).await;
            }
        }
    }

    fn view(&self, n: &Node) -> Option<NodeView> {
        match NodeView::from_node(n) {
            Ok(v) => Some(v),
            Err(e) => {
                warn!(error = %e, "ignoring a Node weft cannot read");
                None
            }
        }
    }

    /// Publishes the key and the condition on this node's object, each only if it differs.
    /// `published` is the `metadata.uid` of the Node object the key was last published on:
    /// a Node deleted and made again (a kubelet that registers anew) gets the key again, while
    /// a view of the same object from before the patch does not patch twice.
    async fn mark(
        &self,
        api: &Api<Node>,
        n: &Node,
        published: &mut Option<String>,
        ready: &mut bool,
    ) {
        let carried = n
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(KEY_ANNOTATION));
        let has_key = carried.is_some_and(|k| *k == self.public_key);
        // Another key on this node's Node: the other nodes would take the member with that
        // key for this node (claims, `NotTheNodeKey`) and refuse this one. Put back, and said
        // loudly: something else writes it.
        let replaced = carried.is_some_and(|k| *k != self.public_key);
        let uid = n.metadata.uid.clone().unwrap_or_default();
        if replaced {
            warn!(node = %self.me, found = ?carried, "this node's Node carries another weft.dev/public-key: putting this node's back; whoever wrote it can make the other nodes route this node's pods elsewhere");
        }
        if replaced || (!has_key && published.as_ref() != Some(&uid)) {
            let patch = json!({"metadata": {"annotations": {KEY_ANNOTATION: self.public_key}}});
            match api
                .patch(&self.me, &patch_params(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    *published = Some(uid);
                    info!(node = %self.me, "published the WireGuard key on the Node");
                }
                Err(e) => warn!(error = %e, "could not annotate the Node (patch on nodes)"),
            }
        }
        let available = n
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "NetworkUnavailable"))
            .is_some_and(|c| c.status == "False" && c.reason.as_deref() == Some("WeftIsUp"));
        if !available && !*ready {
            let now = jiff::Timestamp::now().to_string();
            let patch = json!({"status": {"conditions": [{
                "type": "NetworkUnavailable", "status": "False", "reason": "WeftIsUp",
                "message": "weft is running on this node",
                "lastTransitionTime": now, "lastHeartbeatTime": now,
            }]}});
            match api
                .patch_status(&self.me, &patch_params(), &Patch::Strategic(&patch))
                .await
            {
                Ok(_) => {
                    *ready = true;
                    info!(node = %self.me, "set NetworkUnavailable=False on the Node");
                }
                Err(e) => {
                    warn!(error = %e, "could not set the Node's condition (patch on nodes/status)")
                }
            }
        }
    }
}
