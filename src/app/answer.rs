//! The local API's answers: status, and the CNI plugin's attachment bookkeeping.

use std::sync::Arc;

use tracing::info;

use crate::api::status::{NodeStatus, Status};
use crate::api::{Request, Response};
use crate::control;
use crate::handle::{MeshHandle, RouterHandle};

/// What the API answers from.
#[derive(Clone)]
pub(super) struct Shared {
    pub(super) router: RouterHandle,
    pub(super) mesh: Option<MeshHandle>,
    pub(super) infos: control::PeerInfos,
    pub(super) ipam: Arc<crate::api::metrics::IpamCounters>,
    pub(super) node: Arc<std::sync::Mutex<NodeStatus>>,
    pub(super) cni: crate::cni::Store,
    pub(super) kube: Option<Arc<std::sync::Mutex<String>>>,
}

/// The answer to one request.
pub(super) async fn answer(req: Request, sh: Shared) -> Response {
    let listed = |sh: &Shared| Response {
        ok: true,
        status: None,
        error: None,
        attachments: Some(sh.cni.list()),
    };
    match req {
        Request::Status => {
            let snap = sh.router.snapshot().await;
            let mesh = match &sh.mesh {
                Some(m) => m.snapshot().await,
                None => None,
            };
            let infos = sh.infos.lock().map(|i| i.clone()).unwrap_or_default();
            let node = sh
                .node
                .lock()
                .map(|n| n.clone())
                .unwrap_or_else(|e| e.into_inner().clone());
            match snap {
                Some(s) => Response {
                    ok: true,
                    status: Some(Status {
                        kubernetes: sh
                            .kube
                            .as_ref()
                            .and_then(|k| k.lock().ok().map(|k| k.clone())),
                        ..super::report::status(&node, &s, mesh.as_ref(), &infos, &sh.ipam)
                    }),
                    error: None,
                    attachments: None,
                },
                None => Response::refused("the data plane is stopping"),
            }
        }
        Request::CniAdd { attachment } => {
            let (cid, ifname) = (attachment.container_id.clone(), attachment.ifname.clone());
            let addrs = attachment.addresses.clone();
            match sh.cni.add(attachment) {
                Ok(()) => {
                    info!(container = %cid, %ifname, addresses = ?addrs, "pod attached");
                    listed(&sh)
                }
                Err(e) => Response::refused(format!("saving the attachment: {e}")),
            }
        }
        Request::CniDel {
            container_id,
            ifname,
        } => match sh.cni.del(&container_id, &ifname) {
            Ok(known) => {
                info!(container = %container_id, %ifname, known, "pod detached");
                listed(&sh)
            }
            Err(e) => Response::refused(format!("saving the attachments: {e}")),
        },
        Request::CniList => listed(&sh),
        Request::CniGc { valid } => match sh.cni.gc(&valid) {
            Ok(gone) => {
                for a in &gone {
                    info!(container = %a.container_id, ifname = %a.ifname, "stale attachment removed (GC)");
                }
                listed(&sh)
            }
            Err(e) => Response::refused(format!("saving the attachments: {e}")),
        },
    }
}
