#!/usr/bin/env bash
# Builds weft's container image from the built binaries without pulling anything: FROM scratch
# (deploy/container/Containerfile) with weft and weft-cni, nft for masquerade, cp for the
# DaemonSet's init container, every shared library they load (as ldd lists them), and the
# host's CA bundle (the Kubernetes client will not start without system roots).
#
#   cargo build --release --bins && scripts/image.sh
#   sudo scripts/pgo.sh && BIN_DIR=target/pgo/release scripts/image.sh   # profile-guided (scripts/pgo.sh)
#
# It tags localhost/weft:<version>, the image deploy/kubernetes/daemonset.yaml runs. Load it on
# the nodes (podman save localhost/weft:0.1.0 | ssh node sudo ctr -n k8s.io images import -) or
# push it to a registry and set that name in the DaemonSet.
#
# Environment: BIN_DIR (default target/release) holds weft and weft-cni; IMAGE overrides the
# tag; ENGINE is podman (default) or docker. `scripts/image.sh --print-image` prints the tag and
# builds nothing. The host needs nft (Debian package nftables) to copy it from.
set -euo pipefail
cd "$(dirname "$0")/.."

version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)
image=${IMAGE:-localhost/weft:$version}
if [ "${1:-}" = "--print-image" ]; then
    echo "$image"
    exit 0
fi
[ $# -eq 0 ] || { echo "image.sh: unknown argument $1 (only --print-image)" >&2; exit 1; }
bin_dir=${BIN_DIR:-target/release}
engine=${ENGINE:-podman}

for b in weft weft-cni; do
    [ -x "$bin_dir/$b" ] || { echo "image.sh: $bin_dir/$b is missing: run \`cargo build --release --bins\` first" >&2; exit 1; }
done
built=$("$bin_dir/weft" --version)
[ "$built" = "weft $version" ] || { echo "image.sh: $bin_dir/weft says \"$built\", the tree is at $version: rebuild it" >&2; exit 1; }
nft=$(PATH="$PATH:/usr/sbin:/sbin" command -v nft) || { echo "image.sh: nft is missing (Debian package nftables): the image needs it for masquerade" >&2; exit 1; }
cp_bin=$(command -v cp)
cas=/etc/ssl/certs/ca-certificates.crt
[ -s "$cas" ] || { echo "image.sh: $cas is missing (Debian package ca-certificates): the Kubernetes client needs CA roots" >&2; exit 1; }
command -v "$engine" >/dev/null || { echo "image.sh: $engine is missing" >&2; exit 1; }

ctx=target/image/rootfs
rm -rf "$ctx"
mkdir -p "$ctx"/{usr/local/bin,usr/sbin,bin,etc/weft,etc/cni/net.d,etc/ssl/certs,var/lib/weft,run/weft,tmp}
install -m 0644 "$cas" "$ctx/etc/ssl/certs/ca-certificates.crt"
chmod 1777 "$ctx/tmp"
chmod 0700 "$ctx/etc/weft" "$ctx/var/lib/weft"
strip --strip-debug -o "$ctx/usr/local/bin/weft" "$bin_dir/weft"
strip --strip-debug -o "$ctx/usr/local/bin/weft-cni" "$bin_dir/weft-cni"
install -m 0755 "$nft" "$ctx/usr/sbin/nft"
install -m 0755 "$cp_bin" "$ctx/bin/cp"
# Every shared library and the loader, at the path the loader looks them up by.
for exe in "$ctx/usr/local/bin/weft" "$ctx/usr/local/bin/weft-cni" "$nft" "$cp_bin"; do
    ldd "$exe" | awk '$2 == "=>" && $3 ~ /^\// { print $3 } $1 ~ /^\// { print $1 }'
done | sort -u | while read -r lib; do
    mkdir -p "$ctx$(dirname "$lib")"
    cp -L "$lib" "$ctx$lib"
done

pull=()
[ "$engine" = podman ] && pull=(--pull=never)
"$engine" build "${pull[@]}" -q -f deploy/container/Containerfile --build-arg "VERSION=$version" -t "$image" "$ctx" >/dev/null
echo "built $image ($(du -sh "$ctx" | cut -f1) of files) from $bin_dir"
