//! `weft demo`, exactly as the README tells a newcomer to run it, on a machine with nothing but
//! iproute2 (no `ping`, no `nft` on `PATH`), and `--keep` / `demo down`.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::Context as _;
use weft_tests::weft_bin;

/// A directory to use as the whole `PATH`: `ip` and `sh` linked in, nothing else. Removed on
/// drop.
struct BarePath(PathBuf);

impl BarePath {
    fn new() -> anyhow::Result<Self> {
        let dir = std::env::temp_dir().join(format!("weft-barepath-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir)?;
        let me = Self(dir);
        let path = std::env::var_os("PATH").context("no PATH")?;
        for program in ["ip", "sh"] {
            let found = std::env::split_paths(&path)
                .map(|d| d.join(program))
                .find(|p| p.exists())
                .with_context(|| format!("{program} is not on PATH"))?;
            std::os::unix::fs::symlink(&found, me.0.join(program))?;
        }
        Ok(me)
    }

    fn has(&self, program: &str) -> bool {
        Path::new(&self.0).join(program).exists()
    }
}

impl Drop for BarePath {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Whether a network namespace of lab `id` is still there.
fn lab_namespace_left(id: &str) -> anyhow::Result<bool> {
    Ok(weft::demo::lab::namespaces()?
        .iter()
        .any(|ns| ns.contains(id)))
}

fn lab_id(stdout: &str) -> anyhow::Result<String> {
    Ok(stdout
        .split_whitespace()
        .skip_while(|w| *w != "lab")
        .nth(1)
        .ok_or_else(|| anyhow::anyhow!("no lab id in {stdout}"))?
        .to_owned())
}

#[test]
fn weft_demo_with_only_iproute2_on_path_shows_status_ping_and_tcp_between_pods_and_cleans_up()
-> anyhow::Result<()> {
    weft::demo::lab::require_root("weft demo")?;
    let bare = BarePath::new()?;
    assert!(!bare.has("ping") && !bare.has("nft"));
    let out = Command::new(weft_bin()?)
        .arg("demo")
        .env("PATH", &bare.0)
        .output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "weft demo failed:\n{stdout}\n{stderr}"
    );
    assert!(
        stdout.contains("every node learned the others through the mesh"),
        "{stdout}"
    );
    let replies = stdout.lines().filter(|l| l.contains(": reply in ")).count();
    assert_eq!(replies, 12, "{stdout}");
    // Node a's table: b over plaintext in its region, c and d over WireGuard across.
    let table_a = stdout
        .split("# on node a")
        .nth(1)
        .unwrap_or("")
        .split("TCP between pods")
        .next()
        .unwrap_or("");
    let row = |peer: &str| {
        table_a
            .lines()
            .find(|l| l.starts_with(peer))
            .unwrap_or("")
            .to_owned()
    };
    for want in [
        "eu-west",
        "100.64.2.0/24",
        "plaintext",
        "198.18.1.2:51820",
        "same-region",
    ] {
        assert!(row("b ").contains(want), "b's row lacks {want}:\n{table_a}");
    }
    for (peer, addr) in [("c ", "198.19.0.3:51820"), ("d ", "198.19.0.4:51820")] {
        for want in ["us-east", "encrypted", addr, "other-region"] {
            assert!(
                row(peer).contains(want),
                "{peer}row lacks {want}:\n{table_a}"
            );
        }
    }
    // TCP: where the bytes went, one line per transfer, each at least the payload on the wire.
    let tcp: Vec<&str> = stdout.lines().filter(|l| l.contains(" MB in ")).collect();
    assert_eq!(tcp.len(), 3, "{stdout}");
    for (line, want) in tcp.iter().zip([
        "to node b at 198.18.1.2:51820 (plaintext, same-region)",
        "to node c at 198.19.0.3:51820 (encrypted, other-region)",
        "to node d at 198.18.2.4:51820 (encrypted, same-region)",
    ]) {
        assert!(line.contains(want), "{line:?} lacks {want:?}");
        let sent: f64 = line
            .split(" sent ")
            .nth(1)
            .and_then(|s| s.split(" MB").next())
            .and_then(|s| s.parse().ok())
            .unwrap_or(0.0);
        assert!(
            sent >= 33.5,
            "{line}: {sent} MB counted for 32 MiB of payload"
        );
    }
    assert!(stdout.contains("done: the lab is gone"), "{stdout}");
    let id = lab_id(&stdout)?;
    assert!(!lab_namespace_left(&id)?, "namespaces of {id} left behind");
    assert!(
        !std::env::temp_dir().join(format!("weft-{id}")).exists(),
        "lab directory left behind"
    );
    Ok(())
}

#[test]
fn weft_demo_keep_leaves_the_lab_running_and_demo_down_removes_it() -> anyhow::Result<()> {
    weft::demo::lab::require_root("weft demo --keep")?;
    let bin = weft_bin()?;
    let out = Command::new(&bin).args(["demo", "--keep"]).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let id = lab_id(&stdout)?;
    let dir = std::env::temp_dir().join(format!("weft-{id}"));
    // Whatever happens below, the kept lab goes.
    struct Down(PathBuf);
    impl Drop for Down {
        fn drop(&mut self) {
            if self.0.exists() {
                let _ = weft::demo::lab::remove_kept(&self.0, std::time::Duration::from_secs(10));
            }
        }
    }
    let _guard = Down(dir.clone());
    assert!(
        out.status.success(),
        "weft demo --keep failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The printed way to look around works: status from node a's namespace.
    let socket = dir.join("a").join("weft.sock");
    assert!(
        stdout.contains(&format!("ip netns exec {id}-a")),
        "{stdout}"
    );
    assert!(stdout.contains("demo down"), "{stdout}");
    let st = Command::new("ip")
        .args(["netns", "exec", &format!("{id}-a")])
        .arg(&bin)
        .args(["status", "--json", "--socket"])
        .arg(&socket)
        .output()?;
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    let st: serde_json::Value = serde_json::from_slice(&st.stdout)?;
    assert_eq!(st["peers"].as_array().map(Vec::len), Some(3), "{st}");

    let down = Command::new(&bin).args(["demo", "down"]).output()?;
    let text = String::from_utf8_lossy(&down.stdout);
    assert!(down.status.success(), "{text}");
    assert!(text.contains("done: the kept lab is gone"), "{text}");
    assert!(!lab_namespace_left(&id)?, "namespaces of {id} left behind");
    assert!(!dir.exists(), "lab directory left behind");
    let procs = Command::new("pgrep")
        .args(["-f", &dir.display().to_string()])
        .output()?;
    assert!(procs.stdout.is_empty(), "daemons left running");
    Ok(())
}

#[test]
fn weft_demo_nat_shows_a_mapping_followed_a_hole_punched_and_a_relayed_path_and_cleans_up()
-> anyhow::Result<()> {
    weft::demo::lab::require_root("weft demo nat")?;
    let out = Command::new(weft_bin()?).args(["demo", "nat"]).output()?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        out.status.success(),
        "weft demo nat failed:\n{stdout}\n{stderr}"
    );
    let path = |from: &str, to: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(&format!("  {from} -> {to}: up at ")))
            .map(str::to_owned)
            .with_context(|| format!("no path {from} -> {to} in\n{stdout}"))
    };
    // p follows a's datagrams to its router's mapping (or takes it from a's record).
    let pa = path("p", "a")?;
    assert!(pa.contains("198.19.0.101:"), "{pa}");
    assert!(
        pa.ends_with("(learned)") || pa.ends_with("(observed)"),
        "{pa}"
    );
    for (x, y, router) in [("a", "b", "198.19.0.102:"), ("b", "a", "198.19.0.101:")] {
        let l = path(x, y)?;
        assert!(l.contains(router) && l.ends_with("(hole-punched)"), "{l}");
    }
    for (x, y) in [("a", "c"), ("c", "a"), ("b", "c"), ("c", "b")] {
        let l = path(x, y)?;
        assert!(l.ends_with("(relayed via p)"), "{l}");
    }
    let replies = stdout.lines().filter(|l| l.contains(": reply in ")).count();
    assert_eq!(replies, 12, "{stdout}");
    assert!(
        stdout.contains("TCP pod-a -> pod-c through the relay: 8 MB"),
        "{stdout}"
    );
    assert!(
        stdout.contains("behind NAT  seen at 198.19.0.103:"),
        "{stdout}"
    );
    assert!(stdout.contains("done: the lab is gone"), "{stdout}");
    let id = lab_id(&stdout)?;
    assert!(!lab_namespace_left(&id)?, "namespaces of {id} left behind");
    Ok(())
}

#[test]
fn weft_demo_nat_without_nft_says_which_package_it_needs_and_builds_nothing() -> anyhow::Result<()>
{
    weft::demo::lab::require_root("weft demo nat")?;
    let bare = BarePath::new()?;
    let out = Command::new(weft_bin()?)
        .args(["demo", "nat"])
        .env("PATH", &bare.0)
        .output()?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{stderr}");
    assert!(
        stderr.contains("needs `nft` (Debian package nftables)"),
        "{stderr}"
    );
    // Refused before any lab is made (other tests' labs may come and go meanwhile).
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(!stdout.contains("building lab"), "{stdout}");
    Ok(())
}
