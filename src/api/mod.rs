//! The local API: one JSON request per line on a unix socket, one JSON response per line.
//!
//! ```text
//! → {"command":"status"}
//! ← {"ok":true,"status":{...}}        or        {"ok":false,"error":"unknown command \"x\""}
//! ```

pub mod metrics;
pub mod status;

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{Context as _, bail};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};

use crate::api::status::Status;

/// The longest request line the server reads.
const MAX_REQUEST: u64 = 64 * 1024;

/// A request.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "command", rename_all = "snake_case")]
pub enum Request {
    /// The status report.
    Status,
    /// `weft-cni` ADD: remember a pod's attachment.
    CniAdd {
        /// The attachment.
        attachment: crate::cni::Attachment,
    },
    /// `weft-cni` DEL: forget one (done even when unknown).
    CniDel {
        /// The runtime's container id.
        container_id: String,
        /// The pod's interface.
        ifname: String,
    },
    /// `weft-cni` CHECK and GC, and tests: the attachments known.
    CniList,
    /// `weft-cni` GC: forget every attachment not in `valid`.
    CniGc {
        /// (container id, interface) pairs still in use.
        valid: Vec<(String, String)>,
    },
}

/// A response.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Response {
    /// Whether the request was served.
    pub ok: bool,
    /// The status, for `status`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub status: Option<Status>,
    /// What went wrong.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// The attachments, for the CNI requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attachments: Option<Vec<crate::cni::Attachment>>,
}

impl Response {
    /// A refusal.
    pub fn refused(error: impl Into<String>) -> Self {
        Self {
            ok: false,
            status: None,
            error: Some(error.into()),
            attachments: None,
        }
    }
}

/// The bound socket; the file is removed when this is dropped.
#[derive(Debug)]
pub struct ApiSocket {
    /// The listener.
    pub listener: UnixListener,
    path: PathBuf,
}

impl ApiSocket {
    /// Binds `path`, creating its directory. A socket file left by a dead daemon is replaced; a
    /// live daemon's is not, and anything at `path` that is not a socket (a file, a directory,
    /// a symlink) is an error naming it, left as it is.
    pub async fn bind(path: &Path) -> anyhow::Result<Self> {
        use std::os::unix::fs::FileTypeExt as _;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)
                .with_context(|| format!("creating the API socket directory {}", dir.display()))?;
        }
        match std::fs::symlink_metadata(path) {
            Ok(meta) if meta.file_type().is_socket() => {
                if UnixStream::connect(path).await.is_ok() {
                    bail!(
                        "API socket {} is in use: is another weft daemon running?",
                        path.display()
                    );
                }
                std::fs::remove_file(path)
                    .with_context(|| format!("removing the stale API socket {}", path.display()))?;
            }
            Ok(_) => bail!(
                "API socket path {} exists and is not a socket: refusing to replace it \
                 (move it away or set api_socket to another path)",
                path.display()
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => {
                return Err(e)
                    .with_context(|| format!("inspecting the API socket path {}", path.display()));
            }
        }
        let listener = UnixListener::bind(path)
            .with_context(|| format!("binding the API socket {}", path.display()))?;
        // Owner only, whatever the umask: the API changes pods' attachments. Connections are
        // checked again by their peer's credentials ([`allowed_peer`]).
        {
            use std::os::unix::fs::PermissionsExt as _;
            std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
                .with_context(|| format!("making the API socket {} private", path.display()))?;
        }
        Ok(Self {
            listener,
            path: path.to_owned(),
        })
    }
}

impl Drop for ApiSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether a connection's peer may use the API: root, or the daemon's own user.
pub fn allowed_peer(stream: &UnixStream) -> bool {
    let me = nix::unistd::geteuid().as_raw();
    stream
        .peer_cred()
        .is_ok_and(|c| c.uid() == 0 || c.uid() == me)
}

/// Parses one request line into a request or the error to send back.
pub fn parse_request(line: &str) -> Result<Request, String> {
    serde_json::from_str(line.trim()).map_err(|e| format!("bad request: {e}"))
}

/// Serves one connection: reads request lines and answers each with `answer`.
pub async fn serve_connection<F, Fut>(stream: UnixStream, answer: F) -> std::io::Result<()>
where
    F: Fn(Request) -> Fut,
    Fut: Future<Output = Response>,
{
    let (rd, mut wr) = stream.into_split();
    let mut lines = BufReader::new(rd.take(MAX_REQUEST));
    let mut line = String::new();
    loop {
        line.clear();
        if lines.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let response = match parse_request(&line) {
            Ok(req) => answer(req).await,
            Err(error) => Response::refused(error),
        };
        let mut out = serde_json::to_vec(&response).map_err(std::io::Error::other)?;
        out.push(b'\n');
        wr.write_all(&out).await?;
    }
}

use tokio::io::AsyncReadExt as _;

/// Sends one request to the daemon at `path` and returns its (served) response.
pub async fn call(path: &Path, request: &Request) -> anyhow::Result<Response> {
    let call = async {
        let mut s = UnixStream::connect(path).await.with_context(|| {
            format!(
                "cannot reach the weft daemon at {} (is it running?)",
                path.display()
            )
        })?;
        let mut line = serde_json::to_vec(request)?;
        line.push(b'\n');
        s.write_all(&line).await?;
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).await?;
        let r: Response = serde_json::from_str(&line)
            .with_context(|| format!("the daemon's answer is not a response: {line:?}"))?;
        if !r.ok {
            bail!(
                "the daemon refused: {}",
                r.error.clone().unwrap_or_default()
            );
        }
        Ok(r)
    };
    tokio::time::timeout(Duration::from_secs(10), call)
        .await
        .with_context(|| format!("no answer from {} in 10 s", path.display()))?
}

/// Asks the daemon at `path` for its status.
pub async fn status(path: &Path) -> anyhow::Result<Status> {
    call(path, &Request::Status)
        .await?
        .status
        .context("the daemon sent no status")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_api_socket_is_private_and_its_own_user_may_connect() {
        use std::os::unix::fs::PermissionsExt as _;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weft.sock");
        // Under the usual umask (022) a socket is 0755 unless weft says otherwise.
        let sock = ApiSocket::bind(&path).await.unwrap();
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600, "{mode:o}");
        let client = UnixStream::connect(&path).await.unwrap();
        let (server, _) = sock.listener.accept().await.unwrap();
        assert!(allowed_peer(&server));
        drop(client);
    }

    #[tokio::test]
    async fn binding_over_a_file_that_is_not_a_socket_fails_naming_it_and_keeps_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weft.sock");
        std::fs::write(&path, "not a socket\n").unwrap();
        let e = format!("{:#}", ApiSocket::bind(&path).await.unwrap_err());
        assert!(
            e.contains(&path.display().to_string()) && e.contains("not a socket"),
            "{e}"
        );
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not a socket\n");
    }

    #[tokio::test]
    async fn a_socket_left_by_a_dead_daemon_is_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("weft.sock");
        // Bound and closed: the file stays, nobody listens.
        drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
        let sock = ApiSocket::bind(&path).await.unwrap();
        let _client = UnixStream::connect(&path).await.unwrap();
        sock.listener.accept().await.unwrap();
    }

    #[test]
    fn requests_parse_and_bad_ones_are_named() {
        assert_eq!(
            parse_request("{\"command\":\"status\"}\n"),
            Ok(Request::Status)
        );
        let e = parse_request("{\"command\":\"reboot\"}").unwrap_err();
        assert!(e.contains("reboot"), "{e}");
        assert!(parse_request("not json").is_err());
    }
}
