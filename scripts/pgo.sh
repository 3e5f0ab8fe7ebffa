#!/usr/bin/env bash
# Builds weft's release binaries optimized with a profile of its own data path (profile-guided
# optimization): the compiler lays out each function's hot blocks side by side, away from its
# error and logging paths, and inlines by what ran. Root (the training runs weft in network
# namespaces); needs llvm-profdata of the LLVM that rustc is built on (installed as Debian's
# llvm-<major> when missing and apt-get is there).
#
#   sudo scripts/pgo.sh && BIN_DIR=target/pgo/release scripts/deb.sh
#
# 1. weft built with instrumentation (target/pgo-train);
# 2. trained: `weft-bench small` (pings and 64-byte UDP floods, workers=1 and auto) and
#    `weft-bench net` (TCP, 1 and 4 streams, through the offloads), a few minutes, inside
#    network namespaces the bench makes;
# 3. the counts merged (target/pgo/weft.profdata);
# 4. every binary of the workspace built with it into target/pgo/release, beside a plain
#    `cargo build --release` (of which this builds only weft-bench, the training's driver).
#
# Measured (bench/results/small.md, session 29): 0.03-0.04 off the ping p50's ratio to
# boringtun-cli's, from 127 fewer instruction-cache lines per ping at each end (of 478).
# Bulk TCP measured the same with workers=1 and leaned 7 % lower with auto (inside the
# spread of four pairs): this is the build for latency; the plain one stays the default.
# Environment: PGO_TRAIN_ROUNDS (default 2) scales the training run.
set -euo pipefail
cd "$(dirname "$0")/.."

[ "$(id -u)" -eq 0 ] || { echo "pgo.sh: the training run needs root (network namespaces, TUN devices); run it as root, e.g. sudo scripts/pgo.sh" >&2; exit 1; }

major=$(rustc -vV | sed -n 's/^LLVM version: \([0-9]*\).*/\1/p')
[ -n "$major" ] || { echo "pgo.sh: rustc -vV names no LLVM version" >&2; exit 1; }
# llvm-profdata of LLVM $major: Debian's, rustup's llvm-tools, or one on PATH of that version.
find_profdata() {
    local c
    for c in "llvm-profdata-$major" "$(rustc --print sysroot)/lib/rustlib/x86_64-unknown-linux-gnu/bin/llvm-profdata" llvm-profdata; do
        if command -v "$c" >/dev/null 2>&1 &&
            "$c" --version 2>/dev/null | grep -q "LLVM version $major\."; then
            command -v "$c"
            return 0
        fi
    done
    return 1
}
if ! profdata=$(find_profdata); then
    if command -v apt-get >/dev/null && apt-cache show "llvm-$major" >/dev/null 2>&1; then
        echo "==> installing llvm-$major for llvm-profdata"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "llvm-$major"
    fi
    profdata=$(find_profdata) || { echo "pgo.sh: no llvm-profdata of LLVM $major (rustc's): install Debian's llvm-$major or rustup's llvm-tools" >&2; exit 1; }
fi

# RUSTFLAGS replaces .cargo/config.toml's flags: keep its v0 symbol names (link/README.md).
flags="-C symbol-mangling-version=v0"
work=$(mktemp -d /tmp/weft-pgo.XXXXXX)
trap 'rm -rf "$work"' EXIT
mkdir -p "$work/bin" "$work/raw" target/pgo

echo "==> building the bench and an instrumented weft"
cargo build --release --locked -p weft-bench
RUSTFLAGS="$flags -Cprofile-generate=$work/raw" \
    cargo build --release --locked --bin weft --target-dir target/pgo-train
cp target/release/weft-bench target/pgo-train/release/weft "$work/bin/"

echo "==> training (weft-bench small and net)"
rounds=${PGO_TRAIN_ROUNDS:-2}
"$work/bin/weft-bench" small --rounds "$rounds" --pings 300 --secs 3 --paths weft/1,weft/auto \
    --out "$work/small.md" >"$work/small.log" 2>&1 ||
    { cat "$work/small.log" >&2; echo "pgo.sh: the training run (small) failed" >&2; exit 1; }
"$work/bin/weft-bench" net --secs 2 --reps "$rounds" --paths weft/1,weft/auto --out "$work/net.md" \
    >"$work/net.log" 2>&1 ||
    { cat "$work/net.log" >&2; echo "pgo.sh: the training run (net) failed" >&2; exit 1; }
shopt -s nullglob
raw=("$work"/raw/*.profraw)
[ "${#raw[@]}" -gt 0 ] || { echo "pgo.sh: the training wrote no profile (did weft exit cleanly?)" >&2; exit 1; }
"$profdata" merge -o target/pgo/weft.profdata "${raw[@]}"

echo "==> building with the profile"
RUSTFLAGS="$flags -Cprofile-use=$PWD/target/pgo/weft.profdata" \
    cargo build --release --locked --workspace --bins --target-dir target/pgo
echo "==> target/pgo/release holds the profile-guided build (weft, weft-cni, weft-bench)"
