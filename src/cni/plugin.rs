//! The `weft-cni` chained plugin's command logic (the binary only calls [`main`]).
//!
//! plugin (`ptp` with `host-local`, in the conflist the daemon writes): ADD sets the pod
//! interface's MTU and the host side's to the overlay MTU, registers the attachment with the
//! daemon and passes `prevResult` on; DEL forgets it (and succeeds when the daemon is down);
//! CHECK verifies the MTU and the registration; STATUS is code 50 while the daemon is not
//! ready; GC drops registrations not in `cni.dev/valid-attachments`; VERSION lists the versions.
//! Every failure is a CNI error object on stdout and a non-zero exit.

use std::io::{Read as _, Write as _};
use std::path::Path;
use std::process::ExitCode;

use crate::api::{self, Request};
use crate::cni::{self, Attachment, CniError, Env, ErrorCode, NetConf, Target};
use serde_json::{Value, json};

fn runtime() -> Result<tokio::runtime::Runtime, CniError> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CniError::new(ErrorCode::Io, "starting the async runtime", e.to_string()))
}

/// Sends `req` to the daemon; `code` is the error code when it cannot be reached.
fn daemon(conf: &NetConf, req: &Request, code: ErrorCode) -> Result<api::Response, CniError> {
    runtime()?
        .block_on(api::call(&conf.socket, req))
        .map_err(|e| {
            CniError::new(
                code,
                format!(
                    "the weft daemon at {} did not serve the request",
                    conf.socket.display()
                ),
                format!("{e:#}"),
            )
        })
}

/// The MTU of `ifname`, and sets it to `mtu` when given, inside `netns` (or here when `None`).
fn link_mtu(netns: Option<&Path>, ifname: &str, mtu: Option<u16>) -> Result<u32, CniError> {
    let netns = netns.map(Path::to_path_buf);
    let ifname = ifname.to_owned();
    std::thread::spawn(move || -> Result<u32, CniError> {
        if let Some(ns) = &netns {
            let f = std::fs::File::open(ns).map_err(|e| {
                CniError::new(
                    ErrorCode::UnknownContainer,
                    format!("opening network namespace {}", ns.display()),
                    e.to_string(),
                )
            })?;
            nix::sched::setns(f, nix::sched::CloneFlags::CLONE_NEWNET).map_err(|e| {
                CniError::new(
                    ErrorCode::Io,
                    format!("entering network namespace {}", ns.display()),
                    e.to_string(),
                )
            })?;
        }
        let io = |what: String| {
            move |e: crate::host::netlink::NetlinkError| CniError::new(ErrorCode::Io, what, e.to_string())
        };
        runtime()?.block_on(async {
            let (nl, connection) = crate::host::netlink::Netlink::connect()
                .map_err(|e| CniError::new(ErrorCode::Io, "opening a netlink socket", e.to_string()))?;
            // The reader runs beside the requests, in this one future.
            let work = async {
            let (index, current) = nl
                .link(&ifname)
                .await
                .map_err(io(format!("looking up {ifname}")))?
                .ok_or_else(|| {
                    CniError::new(ErrorCode::Weft, format!("interface {ifname} does not exist"), "")
                })?;
            match mtu {
                Some(m) if u32::from(m) != current => {
                    nl.set_mtu(&ifname, index, m)
                        .await
                        .map_err(io(format!("setting the MTU of {ifname}")))?;
                    Ok(u32::from(m))
                }
                _ => Ok(current),
            }
            };
            tokio::select! {
                r = work => r,
                () = connection => Err(CniError::new(ErrorCode::Io, "the netlink connection ended", "")),
            }
        })
    })
    .join()
    .map_err(|_| CniError::new(ErrorCode::Io, "the netlink thread panicked", ""))?
}

fn add(t: &Target, conf: &NetConf) -> Result<Value, CniError> {
    // `target` checked prevResult is an object, before anything was changed or registered;
    // from here on nothing depends on its shape.
    let mut result = t.prev_result.clone().unwrap_or_default();
    let prev = Value::Object(result.clone());
    if let Some(mtu) = conf.mtu {
        link_mtu(t.netns.as_deref(), &t.ifname, Some(mtu))?;
        for host in cni::host_interfaces(&prev) {
            link_mtu(None, &host, Some(mtu))?;
        }
    }
    let attachment = Attachment {
        container_id: t.container_id.clone(),
        ifname: t.ifname.clone(),
        addresses: cni::result_addresses(&prev),
    };
    // The daemon may be starting: the runtime retries on 11.
    daemon(
        conf,
        &Request::CniAdd { attachment },
        ErrorCode::TryAgainLater,
    )?;
    result.insert("cniVersion".to_owned(), json!(conf.version));
    Ok(Value::Object(result))
}

fn check(t: &Target, conf: &NetConf) -> Result<(), CniError> {
    if let Some(want) = conf.mtu {
        let got = link_mtu(t.netns.as_deref(), &t.ifname, None)?;
        if got != u32::from(want) {
            return Err(CniError::new(
                ErrorCode::Weft,
                format!("the MTU of {} is {got}, not the overlay's {want}", t.ifname),
                "",
            ));
        }
    }
    let known = daemon(conf, &Request::CniList, ErrorCode::TryAgainLater)?
        .attachments
        .unwrap_or_default()
        .iter()
        .any(|a| a.container_id == t.container_id && a.ifname == t.ifname);
    if !known {
        return Err(CniError::new(
            ErrorCode::Weft,
            format!(
                "container {} ({}) is not registered with the weft daemon",
                t.container_id, t.ifname
            ),
            "",
        ));
    }
    Ok(())
}

fn run(env: &Env, stdin: &[u8]) -> Result<Option<Value>, CniError> {
    let conf = cni::parse_conf(stdin)?;
    match env.command.as_str() {
        "ADD" => add(&cni::target(env, &conf)?, &conf).map(Some),
        "DEL" => {
            let t = cni::target(env, &conf)?;
            // Idempotent, and fine while the daemon is down: nothing here outlives the pod.
            let _ = daemon(
                &conf,
                &Request::CniDel {
                    container_id: t.container_id,
                    ifname: t.ifname,
                },
                ErrorCode::TryAgainLater,
            );
            Ok(None)
        }
        "CHECK" => check(&cni::target(env, &conf)?, &conf).map(|()| None),
        "STATUS" => daemon(&conf, &Request::Status, ErrorCode::NotAvailable).map(|_| None),
        "GC" => {
            let valid = conf.valid.clone().ok_or_else(|| {
                CniError::new(
                    ErrorCode::InvalidConfig,
                    "GC without cni.dev/valid-attachments",
                    "",
                )
            })?;
            daemon(&conf, &Request::CniGc { valid }, ErrorCode::TryAgainLater).map(|_| None)
        }
        other => Err(CniError::new(
            ErrorCode::InvalidEnvironment,
            format!("CNI_COMMAND {other:?} is not one of ADD, DEL, CHECK, STATUS, GC, VERSION"),
            "",
        )),
    }
}

/// The plugin: reads the environment and stdin, runs the command, prints the result or the
/// error object, and returns the exit code.
pub fn main() -> ExitCode {
    let env = Env::from_process();
    let mut out = std::io::stdout();
    let mut stdin = Vec::new();
    if env.command != "VERSION"
        && let Err(e) = std::io::stdin().read_to_end(&mut stdin)
    {
        let e = CniError::new(
            ErrorCode::Io,
            "reading the network configuration",
            e.to_string(),
        );
        let _ = writeln!(out, "{}", e.to_json("1.1.0"));
        return ExitCode::FAILURE;
    }
    if env.command == "VERSION" {
        let _ = writeln!(
            out,
            "{}",
            json!({"cniVersion": "1.1.0", "supportedVersions": cni::SUPPORTED})
        );
        return ExitCode::SUCCESS;
    }
    // Errors carry the config's version when it has a supported one.
    let version = serde_json::from_slice::<Value>(&stdin)
        .ok()
        .and_then(|v| v["cniVersion"].as_str().map(str::to_owned))
        .filter(|v| cni::SUPPORTED.contains(&v.as_str()))
        .unwrap_or_else(|| "1.1.0".to_owned());
    match run(&env, &stdin) {
        Ok(Some(result)) => {
            let _ = writeln!(out, "{result}");
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(e) => {
            let _ = writeln!(out, "{}", e.to_json(&version));
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use std::path::PathBuf;

    use super::*;
    use crate::cni::Store;

    /// A daemon on a socket in `dir` that keeps the attachments it is sent in the returned
    /// store, as the real one does; it serves (one connection at a time) until the test ends.
    fn daemon_in(dir: &Path) -> (PathBuf, Store) {
        let socket = dir.join("weft.sock");
        let store = Store::load(dir.join("cni.json"));
        let listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        listener.set_nonblocking(true).unwrap();
        let kept = store.clone();
        std::thread::spawn(move || {
            runtime().unwrap().block_on(async move {
                let listener = tokio::net::UnixListener::from_std(listener).unwrap();
                while let Ok((stream, _)) = listener.accept().await {
                    let answer = |req| {
                        let store = kept.clone();
                        async move {
                            let served = match req {
                                Request::CniAdd { attachment } => store.add(attachment),
                                Request::CniList => Ok(()),
                                other => panic!("the test sent {other:?}"),
                            };
                            match served {
                                Ok(()) => api::Response {
                                    ok: true,
                                    status: None,
                                    error: None,
                                    attachments: Some(store.list()),
                                },
                                Err(e) => api::Response::refused(e.to_string()),
                            }
                        }
                    };
                    let _ = api::serve_connection(stream, answer).await;
                }
            });
        });
        (socket, store)
    }

    fn add_env() -> Env {
        Env {
            command: "ADD".into(),
            container_id: Some("c1".into()),
            netns: Some("/proc/self/ns/net".into()),
            ifname: Some("eth0".into()),
        }
    }

    #[test]
    fn add_with_a_prev_result_that_is_not_an_object_is_refused_before_anything_is_registered() {
        let dir = tempfile::tempdir().unwrap();
        let (socket, store) = daemon_in(dir.path());
        // No `mtu`: nothing here touches a link.
        let conf = |prev: Value| {
            json!({"cniVersion": "1.1.0", "name": "weft", "type": "weft-cni",
                   "socket": socket, "prevResult": prev})
            .to_string()
        };
        for prev in [json!("x"), json!([1]), json!(7), json!(false)] {
            let e = run(&add_env(), conf(prev.clone()).as_bytes())
                .expect_err("a prevResult that is not an object is refused");
            assert_eq!(e.code, ErrorCode::InvalidConfig, "{prev}: {e}");
            assert!(
                e.msg.contains("prevResult") && e.msg.contains(&prev.to_string()),
                "{prev}: {e}"
            );
            assert_eq!(store.list(), [], "{prev}: registered");
        }
        // The same daemon registers a well-formed ADD and gets the result passed on.
        let prev = json!({"cniVersion": "1.0.0", "interfaces": [],
                          "ips": [{"address": "100.64.1.2/24"}]});
        let out = run(&add_env(), conf(prev).as_bytes()).unwrap().unwrap();
        assert_eq!(out["cniVersion"], "1.1.0");
        assert_eq!(out["ips"][0]["address"], "100.64.1.2/24");
        assert_eq!(store.list().len(), 1);
    }
}
