//! What the harness reads from each daemon: its status over the API socket (blocking, with a
//! timeout, so one stuck daemon cannot stall the lab) and its RSS and open descriptors from
//! `/proc`.

use std::io::{BufRead as _, BufReader, Write as _};
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use anyhow::{Context as _, bail};
use weft::api::Response;
use weft::api::status::Status;

/// The status of the daemon at `socket`.
pub(crate) fn status(socket: &Path) -> anyhow::Result<Status> {
    let mut s = UnixStream::connect(socket)
        .with_context(|| format!("connecting to {}", socket.display()))?;
    s.set_read_timeout(Some(Duration::from_secs(2)))?;
    s.set_write_timeout(Some(Duration::from_secs(2)))?;
    s.write_all(b"{\"command\":\"status\"}\n")?;
    let mut line = String::new();
    BufReader::new(s).read_line(&mut line)?;
    let r: Response = serde_json::from_str(&line).context("parsing the status answer")?;
    match r.status {
        Some(st) if r.ok => Ok(st),
        _ => bail!("status refused: {:?}", r.error),
    }
}

/// The node's IPv4 overlay address: the first host of its first IPv4 block.
pub(crate) fn overlay_v4(st: &Status) -> Option<Ipv4Addr> {
    st.node
        .pod_cidrs
        .iter()
        .filter_map(|c| c.parse::<ipnet::IpNet>().ok())
        .find_map(|net| match weft::plan::overlay_address(net).addr() {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        })
}

/// (block, owner) for the node itself and every member it believes alive and routes.
pub(crate) fn owners(st: &Status) -> Vec<(String, String)> {
    let mut v: Vec<(String, String)> = st
        .node
        .pod_cidrs
        .iter()
        .map(|c| (c.clone(), st.node.name.clone()))
        .collect();
    if let Some(m) = &st.mesh {
        for x in &m.members {
            if x.alive && !x.left && x.claims_refused.is_none() && x.name != st.node.name {
                v.extend(x.pod_cidrs.iter().map(|c| (c.clone(), x.name.clone())));
            }
        }
    }
    v
}

/// Resident memory (KiB) and open descriptors of process `pid`.
pub(crate) fn usage(pid: u32) -> Option<(u64, usize)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let rss = text
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .ok()?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count();
    Some((rss, fds))
}
