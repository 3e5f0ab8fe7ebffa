//! Links the `weft` binary with the functions a packet runs through side by side
//! (`link/hot-symbols.txt`, written by `scripts/ping-instructions.sh`; see `link/README.md`):
//! a ping then touches about 50 pages of code rather than 85 spread over 10 MB, which on this
//! project's machines took about 0.025x off weft's critical path against boringtun-cli's.
//!
//! Only where the linker is LLD (`rust-lld`, the default for `x86_64-unknown-linux-gnu` from
//! Rust 1.90 where the toolchain ships it; GNU ld has no `--symbol-ordering-file`), with no other
//! linker asked for in RUSTFLAGS or `CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER`, and only for
//! release builds (a debug build's symbols are other ones). A linker set in a cargo config file
//! is not seen here: set `WEFT_NO_SYMBOL_ORDER=1` with it, which turns the ordering off.

use std::path::Path;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=link/hot-symbols.txt");
    println!("cargo:rerun-if-env-changed=WEFT_NO_SYMBOL_ORDER");
    let var = |name: &str| std::env::var(name).unwrap_or_default();
    if var("WEFT_NO_SYMBOL_ORDER") == "1"
        || var("TARGET") != "x86_64-unknown-linux-gnu"
        || var("PROFILE") != "release"
        || !default_linker_is_lld(&var("RUSTC"))
        || ["linker", "fuse-ld"]
            .iter()
            .any(|flag| var("CARGO_ENCODED_RUSTFLAGS").contains(flag))
        || std::env::var_os("CARGO_TARGET_X86_64_UNKNOWN_LINUX_GNU_LINKER").is_some()
    {
        return;
    }
    let order = Path::new(&var("CARGO_MANIFEST_DIR")).join("link/hot-symbols.txt");
    if order.is_file() {
        println!(
            "cargo:rustc-link-arg-bin=weft=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        // Symbols of another build (the list is older than the code) are skipped quietly.
        println!("cargo:rustc-link-arg-bin=weft=-Wl,--no-warn-symbol-ordering");
    }
}

/// Whether `rustc` links with its own LLD by default on x86_64 Linux: from 1.90, and only
/// where the toolchain ships it (`gcc-ld/ld.lld` in its sysroot, as rustup's do; a distribution's
/// rustc may link with the system's GNU ld).
fn default_linker_is_lld(rustc: &str) -> bool {
    let rustc = if rustc.is_empty() { "rustc" } else { rustc };
    let Ok(sysroot) = Command::new(rustc).args(["--print", "sysroot"]).output() else {
        return false;
    };
    let sysroot = String::from_utf8_lossy(&sysroot.stdout).trim().to_owned();
    let lld = Path::new(&sysroot).join("lib/rustlib/x86_64-unknown-linux-gnu/bin/gcc-ld/ld.lld");
    if !lld.exists() {
        return false;
    }
    let Ok(out) = Command::new(rustc).arg("--version").output() else {
        return false;
    };
    let version = String::from_utf8_lossy(&out.stdout);
    // "rustc 1.95.0 (59807616e 2026-04-14)"
    let mut numbers = version
        .split_whitespace()
        .nth(1)
        .unwrap_or_default()
        .split('.')
        .map(|n| n.parse::<u32>().unwrap_or(0));
    let (major, minor) = (numbers.next().unwrap_or(0), numbers.next().unwrap_or(0));
    (major, minor) >= (1, 90)
}
