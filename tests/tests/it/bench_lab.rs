//! `weft-bench` stopped by a signal: its lab (daemons, iperf3, namespaces) goes with it.

use std::io::{BufRead as _, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{Context as _, ensure};
use weft::demo::lab;

/// The namespaces of the first lab process `pid` made: `wl<pid>0<tag>-…`, the tag a letter on
/// (so another process whose pid starts with `pid` never matches).
fn lab_namespaces(pid: u32) -> anyhow::Result<Vec<String>> {
    let prefix = format!("wl{pid}0");
    Ok(lab::namespaces()?
        .into_iter()
        .filter(|ns| {
            ns.strip_prefix(&prefix)
                .and_then(|rest| rest.chars().next())
                .is_some_and(|c| c.is_ascii_lowercase())
        })
        .collect())
}

/// Kills the bench if the test fails before it is stopped.
struct KillOnDrop(Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[test]
fn a_bench_stopped_by_sigterm_removes_its_daemons_iperf3_and_namespaces() -> anyhow::Result<()> {
    lab::require_root("stopping a bench's lab")?;
    let bench = weft_tests::weft_bin()?.with_file_name("weft-bench");
    ensure!(
        bench.exists(),
        "{} does not exist: run `cargo build --workspace --bins` first",
        bench.display()
    );
    let out = std::env::temp_dir().join(format!("weft-soak-signal-{}.md", std::process::id()));
    let mut child = KillOnDrop(
        Command::new(&bench)
            // Run by cargo, the bench would build weft first, from the test's directory.
            .env_remove("CARGO")
            .args(["soak", "--mins", "10", "--every", "1", "--out"])
            .arg(&out)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .with_context(|| format!("starting {}", bench.display()))?,
    );
    let pid = child.0.id();
    let stderr = child.0.stderr.take().context("the bench's stderr")?;
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    // Up: the first RSS sample is taken once both daemons and the iperf3 load run.
    let mut seen = String::new();
    lab::wait_for("the soak's first sample", Duration::from_secs(90), || {
        while let Ok(line) = rx.try_recv() {
            seen.push_str(&line);
            seen.push('\n');
        }
        // Up, or gone (an error it printed).
        (seen.contains("0 s: RSS") || child.0.try_wait().ok().flatten().is_some()).then_some(())
    })
    .with_context(|| format!("weft-bench said:\n{seen}"))?;
    ensure!(
        seen.contains("0 s: RSS"),
        "weft-bench ended before its first sample:\n{seen}"
    );

    let namespaces = lab_namespaces(pid)?;
    ensure!(!namespaces.is_empty(), "no namespace of the bench's lab");
    let mut pids = Vec::new();
    for ns in &namespaces {
        pids.extend(lab::namespace_pids(ns)?);
    }
    ensure!(
        pids.len() >= 3,
        "two daemons and iperf3 expected in {namespaces:?}, found pids {pids:?}"
    );

    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(pid)?),
        nix::sys::signal::Signal::SIGTERM,
    )?;
    let status = lab::wait_for("weft-bench to exit", Duration::from_secs(60), || {
        child.0.try_wait().ok().flatten()
    })?;
    while let Ok(line) = rx.recv_timeout(Duration::from_secs(1)) {
        seen.push_str(&line);
        seen.push('\n');
    }
    ensure!(
        status.code() == Some(130),
        "exit {status} (130 wanted):\n{seen}"
    );
    ensure!(
        seen.contains("removing its labs"),
        "the bench did not say what it did:\n{seen}"
    );
    let left = lab_namespaces(pid)?;
    ensure!(left.is_empty(), "namespaces left behind: {left:?}\n{seen}");
    for p in pids {
        lab::wait_for(
            &format!("lab process {p} to be gone"),
            Duration::from_secs(10),
            || lab::process_gone(p).then_some(()),
        )?;
    }
    let _ = std::fs::remove_file(&out);
    Ok(())
}
