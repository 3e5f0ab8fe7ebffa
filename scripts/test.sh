#!/usr/bin/env bash
# Runs every check weft's CI runs: formatting, clippy, docs, unit and simulation tests, the
# network-namespace end-to-end tests (root), and the fuzz targets' build.
#
#   sudo scripts/test.sh
#
# Debian packages the end-to-end tests drive (iproute2, wireguard-go, wireguard-tools, tcpdump,
# iputils-ping, iperf3, systemd for systemd-analyze, procps, nftables, conntrack (to flush NAT
# mappings in the NAT tests), the CNI reference plugins,
# iptables, podman and runc for the image test, ca-certificates and binutils for the image
# script) are installed first when missing and apt-get is there. Where cargo fuzz and a nightly
# toolchain are installed, the sequence fuzz targets also run for FUZZ_SECS (default 60) each.
set -euo pipefail
cd "$(dirname "$0")/.."

if [ "$(id -u)" -ne 0 ]; then
    echo "scripts/test.sh: the end-to-end tests need root (network namespaces, TUN devices); run it as root, e.g. sudo scripts/test.sh" >&2
    exit 1
fi

packages=(iproute2 wireguard-go wireguard-tools tcpdump iputils-ping iperf3 systemd procps nftables conntrack containernetworking-plugins iptables podman runc ca-certificates binutils)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
    echo "==> installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}"
fi

step() { echo; echo "==> $*"; "$@"; }

step cargo fmt --all --check
step scripts/layout-rules.sh
step cargo clippy --workspace --all-targets --locked -- -D warnings
step cargo clippy -p weft-router -p weft-mesh --no-default-features --all-targets --locked -- -D warnings
RUSTDOCFLAGS="-D warnings" step cargo doc --workspace --no-deps --locked
# The end-to-end tests run the weft binary of this build.
step cargo build --workspace --bins --locked
if cargo nextest --version >/dev/null 2>&1; then
    step cargo nextest run --workspace --locked --no-fail-fast
    step cargo test --workspace --doc --locked
else
    step cargo test --workspace --locked --no-fail-fast
fi
step cargo check --manifest-path fuzz/Cargo.toml --locked --bins
# The mesh benchmark's harness, small (the full run and its targets: bench/results/mesh.md).
step cargo run -q -p weft-bench --locked -- mesh --sizes 50 --steady-secs 10
# The data-path and router-core harnesses, small (the full runs: bench/RESULTS.md,
# bench/results/router.md, bench/results/small.md); they fail loudly when a comparison cannot
# run.
step cargo run -q -p weft-bench --locked -- net --secs 1 --reps 1 --paths veth,weft,wireguard-go --wireguard-go "$(command -v wireguard-go)" --out target/net-smoke.md
step cargo run -q -p weft-bench --locked -- router --secs 1 --reps 1 --out target/router-smoke.md
step cargo run -q -p weft-bench --locked -- small --rounds 2 --pings 20 --secs 1 --paths weft/1,weft/auto --out target/small-smoke.md
# The chaos lab, short (the full run: bench/results/chaos.md): 8 real daemons restarted,
# killed, wiped, partitioned and reloaded on a fixed seed; it fails, naming the seed, when an
# invariant breaks.
step cargo run -q -p weft-bench --locked -- chaos --nodes 8 --mins 2.5 --seed 14 --out target/chaos-smoke.md
# The sequence fuzz targets (router datagrams, gossip frames over time, the transport's framing),
# bounded in time.
if cargo +nightly fuzz --version >/dev/null 2>&1; then
    for target in router_sequence mesh_sequence transport_framing; do
        step cargo +nightly fuzz run "$target" -- -max_total_time="${FUZZ_SECS:-60}" -rss_limit_mb=2048
    done
else
    echo
    echo "==> fuzz runs not done: cargo fuzz with a nightly toolchain is not installed (cargo install cargo-fuzz; rustup toolchain install nightly); the targets were only built above"
fi
echo
echo "==> all checks passed"
