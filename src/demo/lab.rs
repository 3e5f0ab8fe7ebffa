//! A lab of network namespaces on this machine, for the end-to-end tests and `weft demo`.
//!
//! Every namespace, and every directory of configs, keys and logs, is named after the lab, so
//! labs of concurrent tests never meet; dropping the lab stops its processes and deletes its
//! namespaces (which takes their links with them) and its directory, also when a test fails.
//! Nothing is configured in the root namespace: veth pairs are created directly inside the
//! namespaces they join. The lab drives `ip` (iproute2) for its plumbing; the daemon under test
//! uses netlink itself; reachability is checked with this process's own ICMP socket
//! ([`Lab::icmp_echo`]), so no `ping` binary is needed.

use std::fs;
use std::io::{Read as _, Write as _};
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4, TcpListener, TcpStream};
use std::os::fd::AsFd as _;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail, ensure};

static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The ids of this process's labs that are up (made, not yet dropped or kept), for
/// [`remove_live_labs`].
static LIVE: Mutex<Vec<String>> = Mutex::new(Vec::new());

fn live() -> std::sync::MutexGuard<'static, Vec<String>> {
    LIVE.lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Fails with a clear message unless the process runs as root (namespaces need it).
pub fn require_root(what: &str) -> anyhow::Result<()> {
    if !nix::unistd::Uid::effective().is_root() {
        bail!(
            "{what} needs root (network namespaces, TUN devices): run it as root, e.g. with sudo"
        );
    }
    Ok(())
}

/// Runs `cmd`, failing with its stderr when it exits non-zero.
pub fn run(cmd: &mut Command) -> anyhow::Result<Output> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(out)
}

/// Polls `f` until it returns `Some`, at most until `timeout`; `what` names the wait in errors.
pub fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Option<T>,
) -> anyhow::Result<T> {
    #[expect(
        clippy::disallowed_methods,
        reason = "a harness deadline, not a core's clock"
    )]
    let start = Instant::now();
    let mut delay = Duration::from_millis(10);
    loop {
        if let Some(v) = f() {
            return Ok(v);
        }
        if start.elapsed() >= timeout {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        std::thread::sleep(delay);
        delay = (delay * 2).min(Duration::from_millis(200));
    }
}

/// A set of namespaces, processes and files that disappear together.
#[derive(Debug)]
pub struct Lab {
    /// The prefix of every name in the lab.
    pub id: String,
    /// The lab's directory (configs, keys, sockets, logs).
    pub dir: PathBuf,
    namespaces: Vec<String>,
    children: Vec<(String, Child)>,
    /// Left running on drop ([`Lab::keep`]).
    kept: bool,
}

/// The file in a kept lab's directory that lists what [`remove_kept`] removes.
pub const KEPT_FILE: &str = "kept";

impl Lab {
    /// A new, empty lab; `tag` (a few letters) helps tell labs apart in `ip netns list`.
    pub fn new(tag: &str) -> anyhow::Result<Self> {
        require_root("the network-namespace lab")?;
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let id = format!("wl{}{}{}", std::process::id(), n, tag);
        let dir = std::env::temp_dir().join(format!("weft-{id}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        live().push(id.clone());
        Ok(Self {
            id,
            dir,
            namespaces: Vec::new(),
            children: Vec::new(),
            kept: false,
        })
    }

    /// The full name of the lab's namespace `short`.
    pub fn ns(&self, short: &str) -> String {
        format!("{}-{short}", self.id)
    }

    /// Creates namespace `short` with its loopback up; returns its full name.
    pub fn add_ns(&mut self, short: &str) -> anyhow::Result<String> {
        let name = self.ns(short);
        run(Command::new("ip").args(["netns", "add", &name]))?;
        self.namespaces.push(name.clone());
        self.ip(&name, &["link", "set", "lo", "up"])?;
        Ok(name)
    }

    /// `ip -n NS ARGS…`.
    pub fn ip(&self, ns: &str, args: &[&str]) -> anyhow::Result<Output> {
        run(Command::new("ip").arg("-n").arg(ns).args(args))
    }

    /// A command that runs inside namespace `ns`.
    pub fn cmd(&self, ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut c = Command::new("ip");
        c.args(["netns", "exec", ns]).arg(program);
        c
    }

    /// Joins namespaces `a` and `b` by a veth pair named `a_if` / `b_if` inside them, with the
    /// given addresses (CIDR notation), both ends up.
    pub fn link(
        &mut self,
        (a, a_if, a_addr): (&str, &str, &str),
        (b, b_if, b_addr): (&str, &str, &str),
    ) -> anyhow::Result<()> {
        run(Command::new("ip").args([
            "link", "add", a_if, "netns", a, "type", "veth", "peer", "name", b_if, "netns", b,
        ]))?;
        for (ns, ifname, addr) in [(a, a_if, a_addr), (b, b_if, b_addr)] {
            if !addr.is_empty() {
                self.ip(ns, &["addr", "add", addr, "dev", ifname])?;
            }
            self.ip(ns, &["link", "set", ifname, "up"])?;
        }
        Ok(())
    }

    /// A pod behind node namespace `node`: namespace `short` with `ip`/32 on `eth0` and a
    /// default route out of it, a veth `pod0` on the node with a route to `ip`, proxy ARP, and
    /// forwarding on in the node. Returns the pod's namespace.
    pub fn add_pod(&mut self, node: &str, short: &str, ip: &str) -> anyhow::Result<String> {
        let pod = self.add_ns(short)?;
        self.link((node, "pod0", ""), (&pod, "eth0", &format!("{ip}/32")))?;
        self.ip(&pod, &["route", "add", "default", "dev", "eth0"])?;
        self.ip(node, &["route", "add", &format!("{ip}/32"), "dev", "pod0"])?;
        run(self.cmd(node, "sh").args([
            "-c",
            "echo 1 > /proc/sys/net/ipv4/ip_forward && echo 1 > /proc/sys/net/ipv4/conf/pod0/proxy_arp && echo 0 > /proc/sys/net/ipv4/neigh/pod0/proxy_delay",
        ]))?;
        Ok(pod)
    }

    /// A bridge called `name` inside namespace `ns` (a lab "switch").
    pub fn bridge(&mut self, ns: &str, name: &str) -> anyhow::Result<()> {
        self.ip(ns, &["link", "add", name, "type", "bridge"])?;
        self.ip(ns, &["link", "set", name, "up"])?;
        Ok(())
    }

    /// Connects `node`'s interface `ifname` (address `addr`) to `bridge` in namespace `switch`;
    /// returns the name of the bridge port in the switch (for filtering in the fabric).
    pub fn plug(
        &mut self,
        (switch, bridge): (&str, &str),
        (node, ifname, addr): (&str, &str, &str),
    ) -> anyhow::Result<String> {
        let port = format!("p{}", COUNTER.fetch_add(1, Ordering::Relaxed));
        self.link((node, ifname, addr), (switch, &port, ""))?;
        self.ip(switch, &["link", "set", &port, "master", bridge])?;
        Ok(port)
    }

    /// Starts `cmd` and keeps it until the lab is dropped (or [`stop`](Self::stop)). A process
    /// of the same name that has exited is forgotten; one still running is an error.
    pub fn spawn(
        &mut self,
        name: &str,
        mut cmd: Command,
        log: Option<&Path>,
    ) -> anyhow::Result<()> {
        if self.running(name) {
            bail!("process {name} is already running in the lab");
        }
        self.children.retain(|(n, _)| n != name);
        cmd.stdin(Stdio::null());
        match log {
            Some(path) => {
                let f = fs::File::create(path)?;
                cmd.stdout(f.try_clone()?).stderr(f);
            }
            None => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("starting {name}: {cmd:?}"))?;
        self.children.push((name.to_owned(), child));
        Ok(())
    }

    /// Sends SIGTERM to process `name` and waits for it (up to `timeout`, then SIGKILL); returns
    /// whether it exited on its own with status 0.
    pub fn stop(&mut self, name: &str, timeout: Duration) -> anyhow::Result<bool> {
        let mut child = self.take(name)?;
        Ok(terminate(&mut child, timeout))
    }

    fn take(&mut self, name: &str) -> anyhow::Result<Child> {
        let pos = self
            .children
            .iter()
            .position(|(n, _)| n == name)
            .with_context(|| format!("no process {name} in the lab"))?;
        Ok(self.children.remove(pos).1)
    }

    /// Kills process `name` with SIGKILL (no cleanup on its side) and reaps it.
    pub fn kill(&mut self, name: &str) -> anyhow::Result<()> {
        let mut child = self.take(name)?;
        child.kill()?;
        child.wait()?;
        Ok(())
    }

    /// The pid of process `name`, if the lab holds it.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.children
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, c)| c.id())
    }

    /// Sends `signal` to process `name`.
    pub fn signal(&self, name: &str, signal: nix::sys::signal::Signal) -> anyhow::Result<()> {
        let pid = self
            .pid(name)
            .with_context(|| format!("no process {name} in the lab"))?;
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(i32::try_from(pid).context("pid")?),
            signal,
        )
        .with_context(|| format!("signalling {name}"))
    }

    /// Whether process `name` is still running.
    pub fn running(&mut self, name: &str) -> bool {
        self.children
            .iter_mut()
            .find(|(n, _)| n == name)
            .is_some_and(|(_, c)| matches!(c.try_wait(), Ok(None)))
    }

    /// Runs `f` on a new thread inside namespace `ns` (sockets it opens live there).
    pub fn in_ns<T: Send + 'static>(
        &self,
        ns: &str,
        f: impl FnOnce() -> anyhow::Result<T> + Send + 'static,
    ) -> std::thread::JoinHandle<anyhow::Result<T>> {
        let path = PathBuf::from("/run/netns").join(ns);
        std::thread::spawn(move || {
            let file =
                fs::File::open(&path).with_context(|| format!("opening {}", path.display()))?;
            nix::sched::setns(file.as_fd(), nix::sched::CloneFlags::CLONE_NEWNET)
                .with_context(|| format!("entering {}", path.display()))?;
            f()
        })
    }
}

impl Lab {
    /// Sends ICMP echo requests from namespace `ns` to `dst`, one a second, until one is
    /// answered or `timeout` has passed; returns the answered one's round-trip time. It uses a
    /// raw ICMP socket of this process (root), not the `ping` program.
    pub fn icmp_echo(
        &self,
        ns: &str,
        dst: Ipv4Addr,
        timeout: Duration,
    ) -> anyhow::Result<Duration> {
        let id = u16::try_from(COUNTER.fetch_add(1, Ordering::Relaxed) & 0xffff).unwrap_or(0)
            ^ u16::try_from(std::process::id() & 0xffff).unwrap_or(0);
        self.in_ns(ns, move || echo(dst, id, timeout))
            .join()
            .map_err(|_| anyhow::anyhow!("the ICMP echo thread panicked"))?
            .with_context(|| format!("ICMP echo to {dst} from {ns}"))
    }
}

/// The Internet checksum (RFC 1071) of `bytes`.
fn inet_checksum(bytes: &[u8]) -> u16 {
    let mut sum: u32 = bytes
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c.get(1).copied().unwrap_or(0)])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !u16::try_from(sum).unwrap_or(0)
}

/// An ICMP echo request with identifier `id` and sequence number `seq`.
pub fn echo_request(id: u16, seq: u16) -> [u8; 40] {
    let mut m = [0u8; 40];
    m[0] = 8; // echo request, code 0
    m[4..6].copy_from_slice(&id.to_be_bytes());
    m[6..8].copy_from_slice(&seq.to_be_bytes());
    for (i, b) in m[8..].iter_mut().enumerate() {
        *b = b'w'.wrapping_add(u8::try_from(i).unwrap_or(0));
    }
    let sum = inet_checksum(&m);
    m[2..4].copy_from_slice(&sum.to_be_bytes());
    m
}

/// Whether `packet` (an IPv4 datagram as a raw socket reads it) is the echo reply from `from`
/// to request (`id`, `seq`).
fn is_echo_reply(packet: &[u8], from: Ipv4Addr, id: u16, seq: u16) -> bool {
    echo_reply(packet) == Some((from, id, seq))
}

/// The source, identifier and sequence number of `packet` when it is an ICMP echo reply (an
/// IPv4 datagram as a raw socket reads it).
pub fn echo_reply(packet: &[u8]) -> Option<(Ipv4Addr, u16, u16)> {
    let ihl = usize::from(packet.first()? & 0x0f) * 4;
    let s = packet.get(12..16)?;
    let h = packet.get(ihl..ihl + 8)?;
    (h[0] == 0 && h[1] == 0).then(|| {
        (
            Ipv4Addr::new(s[0], s[1], s[2], s[3]),
            u16::from_be_bytes([h[4], h[5]]),
            u16::from_be_bytes([h[6], h[7]]),
        )
    })
}

/// The echo loop of [`Lab::icmp_echo`], in the namespace already.
fn echo(dst: Ipv4Addr, id: u16, timeout: Duration) -> anyhow::Result<Duration> {
    use socket2::{Domain, Protocol, Socket, Type};
    let sock = Socket::new(Domain::IPV4, Type::RAW, Some(Protocol::ICMPV4))
        .context("opening a raw ICMP socket (needs root)")?;
    sock.set_read_timeout(Some(Duration::from_millis(100)))?;
    let to = socket2::SockAddr::from(SocketAddrV4::new(dst, 0));
    #[expect(
        clippy::disallowed_methods,
        reason = "a harness deadline and a round-trip time, not a core's clock"
    )]
    let now = Instant::now;
    let start = now();
    let mut buf = [0u8; 2048];
    // One request a second: at most `timeout` seconds' worth, each waited for up to a second.
    for seq in 0..=u16::try_from(timeout.as_secs()).unwrap_or(u16::MAX) {
        if start.elapsed() >= timeout {
            break;
        }
        let sent = now();
        // An unreachable destination (no route yet) is one more try, not a failure.
        if sock.send_to(&echo_request(id, seq), &to).is_err() {
            std::thread::sleep(Duration::from_secs(1).saturating_sub(sent.elapsed()));
            continue;
        }
        while sent.elapsed() < Duration::from_secs(1) {
            match (&sock).read(&mut buf) {
                Ok(n) if is_echo_reply(&buf[..n], dst, id, seq) => return Ok(sent.elapsed()),
                Ok(_) => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => return Err(e).context("reading the ICMP socket"),
            }
        }
    }
    bail!("no echo reply from {dst} within {timeout:?}")
}

/// SIGTERM, wait up to `timeout`, then SIGKILL; true when it exited 0 on its own.
fn terminate(child: &mut Child, timeout: Duration) -> bool {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).unwrap_or(0));
    let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
    let exited = wait_for("process exit", timeout, || child.try_wait().ok().flatten());
    match exited {
        Ok(status) => status.success(),
        Err(_) => {
            let _ = child.kill();
            let _ = child.wait();
            false
        }
    }
}

impl Lab {
    /// Leaves the lab running when it is dropped: its processes, namespaces and directory stay,
    /// listed in `<dir>/kept` for [`remove_kept`]. Returns that file.
    pub fn keep(mut self) -> anyhow::Result<PathBuf> {
        let mut list = String::new();
        for (name, child) in &self.children {
            list.push_str(&format!("pid {} {name}\n", child.id()));
        }
        for ns in &self.namespaces {
            list.push_str(&format!("netns {ns}\n"));
        }
        let file = self.dir.join(KEPT_FILE);
        fs::write(&file, list).with_context(|| format!("writing {}", file.display()))?;
        self.kept = true;
        live().retain(|id| *id != self.id);
        Ok(file)
    }
}

/// The kept labs under the temporary directory whose id ends with `tag`.
pub fn kept_labs(tag: &str) -> Vec<PathBuf> {
    let Ok(entries) = fs::read_dir(std::env::temp_dir()) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("weft-wl") && n.ends_with(tag))
                && p.join(KEPT_FILE).exists()
        })
        .collect();
    dirs.sort();
    dirs
}

/// Refuses `path` unless it is this user's own, not a symlink, and not writable by group or
/// others.
fn own_private(path: &Path) -> anyhow::Result<()> {
    use std::os::unix::fs::MetadataExt as _;
    let m = fs::symlink_metadata(path).with_context(|| format!("reading {}", path.display()))?;
    let me = nix::unistd::geteuid().as_raw();
    ensure!(
        !m.file_type().is_symlink() && m.uid() == me && m.mode() & 0o022 == 0,
        "{} is not a lab this user kept (owner uid {}, mode {:o}, symlink {}): left alone",
        path.display(),
        m.uid(),
        m.mode() & 0o7777,
        m.file_type().is_symlink()
    );
    Ok(())
}

/// Removes a lab left by [`Lab::keep`]: SIGTERM to its processes (SIGKILL after `timeout`),
/// then its namespaces, then its directory. Returns what it removed, for the user.
///
/// `/tmp` is everyone's: the directory and its list must be this user's own (not symlinks, not
/// writable by group or others), and only namespaces named for the lab (`<id>-…`) are deleted,
/// so a list planted by another user makes root neither kill nor delete anything.
pub fn remove_kept(dir: &Path, timeout: Duration) -> anyhow::Result<Vec<String>> {
    let file = dir.join(KEPT_FILE);
    own_private(dir)?;
    own_private(&file)?;
    let id = dir
        .file_name()
        .and_then(|n| n.to_str())
        .and_then(|n| n.strip_prefix("weft-"))
        .with_context(|| format!("{} is not a weft lab directory", dir.display()))?;
    let ns_prefix = format!("{id}-");
    let list = fs::read_to_string(&file).with_context(|| format!("reading {}", file.display()))?;
    let mut done = Vec::new();
    for line in list.lines() {
        let mut words = line.split_whitespace();
        if words.next() != Some("pid") {
            continue;
        }
        let (Some(pid), name) = (
            words.next().and_then(|p| p.parse::<i32>().ok()),
            words.next(),
        ) else {
            continue;
        };
        // Only a process still running from this lab's directory is ours to stop.
        let cmdline = fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
        if !String::from_utf8_lossy(&cmdline).contains(&dir.display().to_string()) {
            continue;
        }
        stop_pid(pid, timeout);
        done.push(format!("stopped {} (pid {pid})", name.unwrap_or("?")));
    }
    for line in list.lines().rev() {
        if let Some(ns) = line
            .strip_prefix("netns ")
            .filter(|ns| ns.starts_with(&ns_prefix) && !ns.contains('/'))
        {
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            done.push(format!("deleted namespace {ns}"));
        }
    }
    fs::remove_dir_all(dir).with_context(|| format!("removing {}", dir.display()))?;
    done.push(format!("removed {}", dir.display()));
    Ok(done)
}

/// Whether process `pid` has exited: gone, or a zombie no one has reaped yet.
pub fn process_gone(pid: i32) -> bool {
    !Path::new(&format!("/proc/{pid}")).exists()
        || fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|s| s.contains(") Z "))
}

/// SIGTERM to process `pid`, then SIGKILL if it has not exited (or become a zombie) within
/// `timeout`.
fn stop_pid(pid: i32, timeout: Duration) {
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGTERM,
    );
    let gone = wait_for("a lab process to exit", timeout, || {
        process_gone(pid).then_some(())
    });
    if gone.is_err() {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGKILL,
        );
    }
}

/// The network namespaces on this machine (`ip netns list`), by name.
pub fn namespaces() -> anyhow::Result<Vec<String>> {
    let out = run(Command::new("ip").args(["netns", "list"]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().next().map(str::to_owned))
        .collect())
}

/// The processes in network namespace `ns` (`ip netns pids`).
pub fn namespace_pids(ns: &str) -> anyhow::Result<Vec<i32>> {
    let out = run(Command::new("ip").args(["netns", "pids", ns]))?;
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|p| p.trim().parse().ok())
        .collect())
}

/// Removes every lab of this process that is up, as dropping each would, for a process
/// stopped by a signal (which unwinds nothing, so no lab is dropped): every process in a lab's
/// namespaces is stopped (SIGTERM, SIGKILL after `timeout`), then the namespaces and the lab's
/// directory are deleted. Only namespaces named for the labs (`<id>-…`) are touched. Returns
/// what it removed, for the user.
pub fn remove_live_labs(timeout: Duration) -> Vec<String> {
    let ids = std::mem::take(&mut *live());
    let namespaces = namespaces().unwrap_or_default();
    let mut done = Vec::new();
    for id in ids {
        let prefix = format!("{id}-");
        for ns in namespaces.iter().filter(|ns| ns.starts_with(&prefix)) {
            for pid in namespace_pids(ns).unwrap_or_default() {
                stop_pid(pid, timeout);
                done.push(format!("stopped pid {pid} in {ns}"));
            }
            let _ = Command::new("ip").args(["netns", "del", ns]).output();
            done.push(format!("deleted namespace {ns}"));
        }
        let dir = std::env::temp_dir().join(format!("weft-{id}"));
        if fs::remove_dir_all(&dir).is_ok() {
            done.push(format!("removed {}", dir.display()));
        }
    }
    done
}

impl Drop for Lab {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for (_, child) in &mut self.children {
            terminate(child, Duration::from_secs(5));
        }
        for ns in self.namespaces.drain(..).rev() {
            let _ = Command::new("ip").args(["netns", "del", &ns]).output();
        }
        if let Some(to) = std::env::var_os(KEEP_LOGS) {
            keep_logs(&self.dir, &self.id, Path::new(&to));
        }
        let _ = fs::remove_dir_all(&self.dir);
        live().retain(|id| *id != self.id);
    }
}

/// The environment variable naming a directory where a dropped lab leaves its daemons' logs,
/// as `<lab id>-<daemon>.log` (a failed run's logs outlive its lab): `WEFT_LAB_LOGS=/tmp/logs
/// cargo nextest run ...`.
pub const KEEP_LOGS: &str = "WEFT_LAB_LOGS";

/// Copies every daemon log under lab directory `dir` (`<dir>/<daemon>/weft.log`) into `to`.
/// Best effort: the lab is being torn down, and a log that cannot be copied is reported on
/// stderr.
fn keep_logs(dir: &Path, id: &str, to: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    if let Err(e) = fs::create_dir_all(to) {
        eprintln!("{KEEP_LOGS}: cannot create {}: {e}", to.display());
        return;
    }
    for entry in entries.flatten() {
        let log = entry.path().join("weft.log");
        if !log.is_file() {
            continue;
        }
        let name = format!("{id}-{}.log", entry.file_name().to_string_lossy());
        if let Err(e) = fs::copy(&log, to.join(&name)) {
            eprintln!("{KEEP_LOGS}: cannot copy {}: {e}", log.display());
        }
    }
}

/// A weft daemon in the lab: its namespace and files.
#[derive(Debug, Clone)]
pub struct Daemon {
    /// The node's name (and the lab process name).
    pub name: String,
    /// Its namespace.
    pub ns: String,
    /// Its config file.
    pub config: PathBuf,
    /// Its API socket.
    pub socket: PathBuf,
    /// Its log file.
    pub log: PathBuf,
    /// Its private key file.
    pub key_file: PathBuf,
    /// Its cluster secret file (`SECRET_FILE` in a config body); the mesh runs only when it
    /// exists.
    pub secret_file: PathBuf,
}

impl Lab {
    /// Files for a daemon called `name` in namespace `ns`: writes its config, which is
    /// `body` (YAML, where `KEY_FILE` and `SECRET_FILE` stand for the daemon's own paths) plus
    /// the lab's state dir and API socket.
    pub fn daemon(&self, name: &str, ns: &str, body: &str) -> anyhow::Result<Daemon> {
        let dir = self.dir.join(name);
        fs::create_dir_all(&dir)?;
        let d = Daemon {
            name: name.to_owned(),
            ns: ns.to_owned(),
            config: dir.join("weft.yaml"),
            socket: dir.join("weft.sock"),
            log: dir.join("weft.log"),
            key_file: dir.join("private.key"),
            secret_file: dir.join("secret"),
        };
        let text = format!(
            "{body}\nstate_dir: {dir}\napi_socket: {sock}\ncni:\n  conflist: {dir}/10-weft.conflist\n",
            dir = dir.display(),
            sock = d.socket.display()
        );
        let text = text
            .replace("KEY_FILE", &d.key_file.display().to_string())
            .replace("SECRET_FILE", &dir.join("secret").display().to_string());
        fs::write(&d.config, text)?;
        Ok(d)
    }

    /// Starts `daemon` with the weft binary `bin` and waits until its API answers.
    pub fn start(&mut self, bin: &Path, d: &Daemon) -> anyhow::Result<()> {
        self.start_with(bin, d, &[], &[])
    }

    /// As [`Lab::start`], with more arguments to `weft run` and more environment.
    pub fn start_with(
        &mut self,
        bin: &Path,
        d: &Daemon,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> anyhow::Result<()> {
        let mut cmd = self.cmd(&d.ns, bin);
        cmd.arg("run")
            .arg("--config")
            .arg(&d.config)
            .args(args)
            .env("WEFT_LOG", "info,weft=debug")
            .envs(env.iter().copied());
        self.spawn(&d.name, cmd, Some(&d.log))?;
        let name = d.name.clone();
        let r = wait_for(
            &format!("{name} to answer on {}", d.socket.display()),
            Duration::from_secs(20),
            || {
                if !self.running(&name) {
                    return Some(false);
                }
                let st = Command::new(bin)
                    .arg("status")
                    .arg("--socket")
                    .arg(&d.socket)
                    .output()
                    .ok()?;
                st.status.success().then_some(true)
            },
        )?;
        if !r {
            let log = fs::read_to_string(&d.log).unwrap_or_default();
            bail!("daemon {name} exited during startup:\n{log}");
        }
        Ok(())
    }

    /// `weft status --json` of `daemon`, parsed.
    pub fn status(&self, bin: &Path, d: &Daemon) -> anyhow::Result<serde_json::Value> {
        let out = run(Command::new(bin)
            .arg("status")
            .arg("--json")
            .arg("--socket")
            .arg(&d.socket))?;
        serde_json::from_slice(&out.stdout).context("parsing weft status --json")
    }
}

/// A deterministic byte stream, so the receiver can check every byte whatever the sizes of its
/// reads.
#[derive(Debug, Clone)]
pub struct Stream {
    state: u64,
    word: [u8; 8],
    pos: usize,
}

impl Stream {
    /// A stream from `seed`.
    pub fn new(seed: u64) -> Self {
        Self {
            state: seed | 1,
            word: [0; 8],
            pos: 8,
        }
    }

    /// The next eight bytes as a number (a seeded random source for schedules).
    pub fn next_u64(&mut self) -> u64 {
        let mut b = [0u8; 8];
        self.fill(&mut b);
        u64::from_le_bytes(b)
    }

    /// A number below `n` (`n` > 0), from the next eight bytes.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n.max(1)
    }

    /// Fills `buf` with the next bytes.
    pub fn fill(&mut self, buf: &mut [u8]) {
        for b in buf {
            if self.pos == 8 {
                let mut x = self.state;
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                self.state = x;
                self.word = x.to_le_bytes();
                self.pos = 0;
            }
            *b = self.word[self.pos];
            self.pos += 1;
        }
    }
}

/// Sends `total` bytes of [`Stream`] `seed` over TCP from namespace `from_ns` to `to` (a server
/// in `to_ns`), and checks on the receiving side that every byte arrived intact and in order.
pub fn tcp_transfer(
    lab: &Lab,
    (from_ns, to_ns): (&str, &str),
    to: SocketAddr,
    total: usize,
    seed: u64,
) -> anyhow::Result<Duration> {
    tcp_transfer_mss(lab, (from_ns, to_ns), to, total, seed, None)
}

/// As [`tcp_transfer`], with the server advertising a maximum segment size of `mss` bytes
/// (`TCP_MAXSEG` on its listener): the sender's segments carry at most that much.
pub fn tcp_transfer_mss(
    lab: &Lab,
    (from_ns, to_ns): (&str, &str),
    to: SocketAddr,
    total: usize,
    seed: u64,
    mss: Option<u32>,
) -> anyhow::Result<Duration> {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let server = lab.in_ns(to_ns, move || {
        let listener = TcpListener::bind(to).with_context(|| format!("binding {to}"))?;
        if let Some(mss) = mss {
            // Read when a connection's SYN arrives, so it applies though set after listen().
            socket2::SockRef::from(&listener)
                .set_tcp_mss(mss)
                .with_context(|| format!("setting TCP_MAXSEG {mss} on {to}"))?;
        }
        ready_tx.send(()).ok();
        let (mut conn, _) = listener.accept().context("accepting")?;
        conn.set_read_timeout(Some(Duration::from_secs(30)))?;
        let mut expect = Stream::new(seed);
        let (mut got, mut want) = (vec![0u8; 1 << 16], vec![0u8; 1 << 16]);
        let mut received = 0usize;
        loop {
            let n = conn
                .read(&mut got)
                .with_context(|| format!("server reading after {received} bytes"))?;
            if n == 0 {
                break;
            }
            expect.fill(&mut want[..n]);
            if got[..n] != want[..n] {
                bail!("byte {received}..{}: content differs", received + n);
            }
            received += n;
        }
        Ok(received)
    });
    ready_rx
        .recv_timeout(Duration::from_secs(10))
        .context("the TCP server did not start")?;
    let client = lab.in_ns(from_ns, move || {
        #[expect(clippy::disallowed_methods, reason = "measuring a transfer")]
        let start = Instant::now();
        let mut conn = TcpStream::connect_timeout(&to, Duration::from_secs(10))
            .with_context(|| format!("connecting to {to}"))?;
        conn.set_write_timeout(Some(Duration::from_secs(30)))?;
        let mut s = Stream::new(seed);
        let mut buf = vec![0u8; 1 << 16];
        let mut sent = 0;
        while sent < total {
            let n = buf.len().min(total - sent);
            s.fill(&mut buf[..n]);
            conn.write_all(&buf[..n])
                .with_context(|| format!("client writing after {sent} bytes"))?;
            sent += n;
        }
        conn.shutdown(std::net::Shutdown::Write)?;
        // Wait for the server to close, so the duration covers delivery.
        let _ = conn.read(&mut buf);
        Ok(start.elapsed())
    });
    let took = client
        .join()
        .map_err(|_| anyhow::anyhow!("client thread panicked"))??;
    let received = server
        .join()
        .map_err(|_| anyhow::anyhow!("server thread panicked"))??;
    ensure!(received == total, "received {received} of {total} bytes");
    Ok(took)
}

/// The `node:` section of a lab daemon's config, written one way for the demo, the tests and
/// the benchmarks. The key file is left as `KEY_FILE` for [`Lab::daemon`] to fill in.
#[derive(Debug, Clone, Copy, Default)]
pub struct NodeSection<'a> {
    /// `node.name`.
    pub name: &'a str,
    /// `node.region`.
    pub region: Option<&'a str>,
    /// `node.private_address`.
    pub private_address: Option<&'a str>,
    /// `node.public_address`.
    pub public_address: Option<&'a str>,
    /// `node.pod_cidr`.
    pub pod_cidr: Option<&'a str>,
}

impl NodeSection<'_> {
    /// The section as YAML, ending with a newline.
    pub fn yaml(&self) -> String {
        let mut s = format!("node:\n  name: {}\n", self.name);
        for (key, value) in [
            ("region", self.region),
            ("private_address", self.private_address),
            ("public_address", self.public_address),
        ] {
            if let Some(v) = value {
                s.push_str(&format!("  {key}: {v}\n"));
            }
        }
        s.push_str("  key_file: KEY_FILE\n");
        if let Some(p) = self.pod_cidr {
            s.push_str(&format!("  pod_cidr: {p}\n"));
        }
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_list_planted_by_another_user_or_writable_by_others_is_left_alone() {
        use std::os::unix::fs::PermissionsExt as _;
        let base = tempfile::tempdir().unwrap();
        let dir = base.path().join("weft-wl1x");
        fs::create_dir(&dir).unwrap();
        let file = dir.join(KEPT_FILE);
        fs::write(&file, "netns wl1x-a\n").unwrap();
        // Another user's list: refused, nothing removed.
        nix::unistd::chown(&file, Some(nix::unistd::Uid::from_raw(65534)), None).unwrap();
        let e = remove_kept(&dir, Duration::from_secs(1))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("not a lab this user kept") && e.contains("65534"),
            "{e}"
        );
        assert!(file.exists());
        // Ours but writable by others: refused too.
        nix::unistd::chown(&file, Some(nix::unistd::geteuid()), None).unwrap();
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        assert!(remove_kept(&dir, Duration::from_secs(1)).is_err());
        assert!(file.exists());
        // A symlink to somewhere else: refused.
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        let link = base.path().join("weft-wl2x");
        std::os::unix::fs::symlink(&dir, &link).unwrap();
        assert!(remove_kept(&link, Duration::from_secs(1)).is_err());
        // Our own: removed, and a namespace not named for the lab is never deleted.
        fs::write(&file, "netns not-ours-at-all\n").unwrap();
        let done = remove_kept(&dir, Duration::from_secs(1)).unwrap();
        assert!(done.iter().all(|d| !d.contains("not-ours")), "{done:?}");
        assert!(!dir.exists());
    }
}
