//! The key tools against `wg` (wireguard-tools), and `weft status` without a daemon.

use std::io::Write as _;
use std::process::{Command, Stdio};

use weft_tests::weft_bin;

fn pipe(
    program: &std::path::Path,
    args: &[&str],
    input: &str,
) -> anyhow::Result<std::process::Output> {
    let mut child = Command::new(program)
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    child
        .stdin
        .take()
        .expect("piped")
        .write_all(input.as_bytes())?;
    Ok(child.wait_with_output()?)
}

#[test]
fn genkey_and_pubkey_are_byte_compatible_with_wg() -> anyhow::Result<()> {
    let weft = weft_bin()?;
    let wg = std::path::Path::new("/usr/bin/wg");
    anyhow::ensure!(
        wg.exists(),
        "wg (wireguard-tools) is not installed: scripts/test.sh installs it"
    );
    for _ in 0..5 {
        // A key from weft, its public key from both tools.
        let key = String::from_utf8(Command::new(&weft).arg("genkey").output()?.stdout)?;
        assert_eq!(key.len(), 45, "44 base64 characters and a newline: {key:?}");
        let ours = pipe(&weft, &["pubkey"], &key)?;
        let theirs = pipe(wg, &["pubkey"], &key)?;
        assert!(ours.status.success() && theirs.status.success());
        assert_eq!(ours.stdout, theirs.stdout);
        // A key from wg, through weft.
        let key = String::from_utf8(Command::new(wg).arg("genkey").output()?.stdout)?;
        assert_eq!(
            pipe(&weft, &["pubkey"], &key)?.stdout,
            pipe(wg, &["pubkey"], &key)?.stdout
        );
    }
    let secret = String::from_utf8(Command::new(&weft).arg("gensecret").output()?.stdout)?;
    assert_eq!(weft::host::keys::decode(&secret, "secret")?.len(), 32);
    Ok(())
}

#[test]
fn pubkey_refuses_bad_input_with_a_clear_error() -> anyhow::Result<()> {
    let weft = weft_bin()?;
    for bad in ["", "hello", "AAAA\n"] {
        let out = pipe(&weft, &["pubkey"], bad)?;
        assert!(!out.status.success(), "{bad:?} accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(
            err.contains("standard input is not a base64 WireGuard key"),
            "{err}"
        );
    }
    Ok(())
}

#[test]
fn status_without_a_daemon_says_so() -> anyhow::Result<()> {
    let weft = weft_bin()?;
    let out = Command::new(&weft)
        .args(["status", "--socket", "/nonexistent/weft.sock"])
        .output()?;
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("cannot reach the weft daemon at /nonexistent/weft.sock"),
        "{err}"
    );
    Ok(())
}
