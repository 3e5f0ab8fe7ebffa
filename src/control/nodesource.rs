//! The Kubernetes node source: watches Nodes with the kube runtime watcher and reports this
//! node's view (region, addresses, `spec.podCIDRs`) and every other node's, and marks this node
//! ready for the cluster: the `weft.dev/public-key` annotation (merge patch) and the
//! `NetworkUnavailable=False` condition (strategic merge patch of the status), each only when
//! the Node does not say so already — never on a timer. A Node event that shows either missing
//! (removed, the Node made anew, replaced whole) patches it again, unless weft patched it less
//! than [`NodeSource::mark_again_after`] ago: an event from before its own patch is not taken
//! for a removal. Another key written over this node's is put back at once.
//!
//! Both patches name weft as their field manager (`fieldManager=weft`), so the Node's
//! `managedFields` say which fields weft owns. The watcher lists with a consistent read (no
//! `resourceVersion`, so a re-list after `410 Gone` never goes back in time), in pages of 500,
//! resumes watches from the last `resourceVersion` seen, and asks for bookmarks, so a watch the
//! server ends after a quiet spell resumes without listing every Node again. It keeps a small
//! [`NodeView`] per Node, never the Node objects.
//!
//! A Node with a value weft cannot read is read without it (see [`crate::control::k8s`]) and
//! stays in the view; a Node that cannot be read at all is left out. Either is warned of once
//! per Node and value, not at every watch event: the source keeps, for each Node read with a
//! fault now, which faults it said.
//!
//! [`wait_for_node`] reads this node's Node once before the daemon creates its TUN device, when
//! the Node's private address decides the MTU.
//!
//! The API being down, at start or later, is retried with the watcher's backoff while the
//! daemon forwards with what it knows; each failure is reported ([`SourceEvent::Trouble`]),
//! a 403 naming the permission the ServiceAccount lacks.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use futures::StreamExt as _;
use k8s_openapi::api::core::v1::Node;
use kube::api::{Patch, PatchParams};
use kube::runtime::WatchStreamExt as _;
use kube::runtime::watcher;
use kube::{Api, Client};
use serde_json::json;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

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
    /// How long after its own patch a Node seen without the key or the condition is taken
    /// for a view from before the patch ([`MARK_AGAIN_AFTER`] but in tests).
    pub mark_again_after: Duration,
}

/// How long after its own patch the source takes a Node without the key or the condition for
/// a view from before the patch: watch events follow a patch within moments.
pub const MARK_AGAIN_AFTER: Duration = Duration::from_secs(5);

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
/// backoff capped at 10 s and logging every miss (the API down or refusing, no such Node yet,
/// unreadable `spec.podCIDRs`). A value it reads the Node without (a bad address annotation)
/// is only a debug line here: the source warns of it once it lists the Node.
pub async fn wait_for_node(client: Client, me: &str) -> NodeView {
    let api: Api<Node> = Api::all(client);
    let mut delay = Duration::from_millis(250);
    loop {
        let miss = match api.get_opt(me).await {
            Ok(Some(n)) => match NodeView::from_node(&n) {
                Ok(v) => {
                    for i in &v.ignored {
                        debug!(node = %me, field = %i.field, value = ?i.value, used = ?i.used, "read this node's Node without a value that is {}", i.problem);
                    }
                    return v;
                }
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

/// One fault of a Node read: a value ignored (its field and value), or the Node refused (the
/// field and what is wrong).
type Fault = (String, String);

/// The faults said of each Node read with one now, so that each is said once per Node and
/// value rather than at every watch event. Holds nothing for a Node read cleanly.
#[derive(Debug, Default)]
struct Said(BTreeMap<String, BTreeSet<Fault>>);

impl Said {
    /// Reads Node `n`, warning of each of its faults not said of it before; returns its name,
    /// its view (`None` when it cannot be read at all) and its faults now.
    fn read(&self, n: &Node) -> (String, Option<NodeView>, BTreeSet<Fault>) {
        let name = n.metadata.name.clone().unwrap_or_default();
        let before = self.0.get(&name);
        let new = |f: &Fault| before.is_none_or(|b| !b.contains(f));
        let mut faults = BTreeSet::new();
        let view = match NodeView::from_node(n) {
            Ok(v) => {
                for i in &v.ignored {
                    let f = (i.field.clone(), i.value.clone());
                    if new(&f) {
                        warn!(node = %v.name, field = %i.field, value = ?i.value, used = ?i.used,
                              "a value on the Node is {}: ignored, the Node is read without it", i.problem);
                    }
                    faults.insert(f);
                }
                Some(v)
            }
            Err(e) => {
                let f = (e.field.clone(), e.problem.clone());
                if new(&f) {
                    warn!(error = %e, "ignoring a Node weft cannot read: its member is not routed");
                }
                faults.insert(f);
                None
            }
        };
        (name, view, faults)
    }

    /// Sets Node `name`'s faults (none: forgets it).
    fn set(&mut self, name: String, faults: BTreeSet<Fault>) {
        if faults.is_empty() {
            self.0.remove(&name);
        } else {
            self.0.insert(name, faults);
        }
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
        let mut said = Said::default();
        // A new list: the Nodes, and the faults said of them (what was said of a Node before
        // is not said again; a Node gone from the list is forgotten).
        let mut listing: Option<(BTreeMap<String, NodeView>, Said)> = None;
        let (mut published, mut ready) = (None, None);
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
                    listing = Some((BTreeMap::new(), Said::default()));
                    None
                }
                Ok(watcher::Event::InitApply(n)) => {
                    if let Some((l, now)) = listing.as_mut() {
                        let (name, view, faults) = said.read(&n);
                        now.set(name.clone(), faults);
                        if let Some(v) = view {
                            l.insert(name, v);
                        }
                    }
                    if n.metadata.name.as_deref() == Some(self.me.as_str()) {
                        self.mark(&api, &n, &mut published, &mut ready).await;
                    }
                    None
                }
                Ok(watcher::Event::InitDone) => {
                    (nodes, said) = listing.take().unwrap_or_default();
                    info!(nodes = nodes.len(), "Kubernetes nodes listed");
                    Some(())
                }
                Ok(watcher::Event::Apply(n)) => {
                    if n.metadata.name.as_deref() == Some(self.me.as_str()) {
                        self.mark(&api, &n, &mut published, &mut ready).await;
                    }
                    let (name, view, faults) = said.read(&n);
                    said.set(name.clone(), faults);
                    view.map(|v| {
                        nodes.insert(name, v);
                    })
                }
                Ok(watcher::Event::Delete(n)) => {
                    let name = n.metadata.name.unwrap_or_default();
                    info!(node = %name, "Kubernetes node deleted");
                    said.set(name.clone(), BTreeSet::new());
                    nodes.remove(&name).map(drop)
                }
            };
            if changed.is_some() {
                self.report(&nodes, &events).await;
            }
        }
    }

    /// Sends this node's view and the others' after a change.
    async fn report(&self, nodes: &BTreeMap<String, NodeView>, events: &mpsc::Sender<SourceEvent>) {
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

    /// Publishes the key and the condition on this node's object, each only if it differs;
    /// `published` and `ready` are when each was last patched (module docs).
    async fn mark(
        &self,
        api: &Api<Node>,
        n: &Node,
        published: &mut Option<Instant>,
        ready: &mut Option<Instant>,
    ) {
        #[expect(clippy::disallowed_methods, reason = "the node source is a driver")]
        let now = Instant::now();
        let due = |last: &Option<Instant>| {
            last.is_none_or(|t| now.saturating_duration_since(t) >= self.mark_again_after)
        };
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
        if replaced {
            warn!(node = %self.me, found = ?carried, "this node's Node carries another weft.dev/public-key: putting this node's back; whoever wrote it can make the other nodes route this node's pods elsewhere");
        }
        if replaced || (!has_key && due(published)) {
            let patch = json!({"metadata": {"annotations": {KEY_ANNOTATION: self.public_key}}});
            match api
                .patch(&self.me, &patch_params(), &Patch::Merge(&patch))
                .await
            {
                Ok(_) => {
                    *published = Some(now);
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
        if !available && due(ready) {
            let stamp = jiff::Timestamp::now().to_string();
            let patch = json!({"status": {"conditions": [{
                "type": "NetworkUnavailable", "status": "False", "reason": "WeftIsUp",
                "message": "weft is running on this node",
                "lastTransitionTime": stamp, "lastHeartbeatTime": stamp,
            }]}});
            match api
                .patch_status(&self.me, &patch_params(), &Patch::Strategic(&patch))
                .await
            {
                Ok(_) => {
                    *ready = Some(now);
                    info!(node = %self.me, "set NetworkUnavailable=False on the Node");
                }
                Err(e) => {
                    warn!(error = %e, "could not set the Node's condition (patch on nodes/status)")
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::{Arc, Mutex};

    use super::*;

    /// The warnings logged while `f` runs.
    fn warnings(f: impl FnOnce()) -> Vec<String> {
        #[derive(Clone, Default)]
        struct Buf(Arc<Mutex<Vec<u8>>>);
        impl std::io::Write for Buf {
            fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
                self.0.lock().expect("buffer").extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let buf = Buf::default();
        let out = buf.clone();
        let sub = tracing_subscriber::fmt()
            .with_writer(move || out.clone())
            .with_ansi(false)
            .with_max_level(tracing::Level::WARN)
            .finish();
        tracing::subscriber::with_default(sub, f);
        let text = String::from_utf8(buf.0.lock().expect("buffer").clone()).expect("utf-8");
        text.lines().map(str::to_owned).collect()
    }

    fn node(name: &str, private: &str, cidr: &str) -> Node {
        serde_json::from_value(json!({
            "metadata": {"name": name, "annotations": {"weft.dev/private-address": private}},
            "spec": {"podCIDRs": [cidr]},
            "status": {"addresses": [{"type": "InternalIP", "address": "198.18.1.1"}]}
        }))
        .expect("a Node")
    }

    #[test]
    fn a_bad_value_is_warned_of_once_per_node_and_value_not_at_every_event() {
        let mut said = Said::default();
        let event = |said: &mut Said, n: &Node| {
            let mut view = None;
            let w = warnings(|| {
                let (name, v, faults) = said.read(n);
                said.set(name, faults);
                view = v;
            });
            (view.is_some(), w)
        };
        let bad = node("n1", "10.0.0.5/24", "100.64.1.0/24");
        let (kept, w) = event(&mut said, &bad);
        assert!(kept, "the Node stays in the view");
        assert_eq!(w.len(), 1, "{w:?}");
        assert!(
            w[0].contains("n1")
                && w[0].contains("weft.dev/private-address")
                && w[0].contains("10.0.0.5/24")
                && w[0].contains("198.18.1.1"),
            "names the Node, the annotation, the value and what is used: {}",
            w[0]
        );
        // The same value at the next events (a label changed, a heartbeat): said already.
        assert_eq!(event(&mut said, &bad).1.len(), 0);
        assert_eq!(event(&mut said, &bad).1.len(), 0);
        // The same value on another Node, or another value on this one: said once each.
        assert_eq!(
            event(&mut said, &node("n2", "10.0.0.5/24", "100.64.2.0/24"))
                .1
                .len(),
            1
        );
        let other = node("n1", "10.0.0.6/24", "100.64.1.0/24");
        assert_eq!(event(&mut said, &other).1.len(), 1);
        assert_eq!(event(&mut said, &other).1.len(), 0);
        // Fixed: nothing said, nothing kept; broken again later: said again.
        assert_eq!(
            event(&mut said, &node("n1", "198.18.1.9", "100.64.1.0/24"))
                .1
                .len(),
            0
        );
        assert!(!said.0.contains_key("n1"), "a clean Node holds no state");
        assert_eq!(event(&mut said, &bad).1.len(), 1);
        // A Node that cannot be read at all: left out, said once.
        let refused = node("n3", "198.18.1.3", "100.64.3.0/33");
        let (kept, w) = event(&mut said, &refused);
        assert!(
            !kept && w.len() == 1 && w[0].contains("spec.podCIDRs"),
            "{w:?}"
        );
        assert_eq!(event(&mut said, &refused).1.len(), 0);
    }
}
