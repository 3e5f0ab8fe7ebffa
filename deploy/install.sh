#!/bin/sh
# Installs weft as a systemd service: the binaries into /usr/local/bin, the unit into
# /etc/systemd/system, and a commented config into /etc/weft (kept if one is there).
#
#   cargo build --release --bins && sudo deploy/install.sh
#
# DESTDIR=/some/root installs under that root instead (nothing is started then).
set -eu
here=$(cd "$(dirname "$0")" && pwd)
root=${DESTDIR:-}
bin_dir=${BIN_DIR:-"$here/../target/release"}

for b in weft weft-cni; do
    if [ ! -x "$bin_dir/$b" ]; then
        echo "install.sh: $bin_dir/$b is missing: run \`cargo build --release --bins\` first" >&2
        exit 1
    fi
done
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    echo "install.sh: run as root (or set DESTDIR to install under another root)" >&2
    exit 1
fi

install -d -m 0755 "$root/usr/local/bin" "$root/etc/systemd/system"
install -d -m 0700 "$root/etc/weft"
install -m 0755 "$bin_dir/weft" "$bin_dir/weft-cni" "$root/usr/local/bin/"
install -m 0644 "$here/systemd/weft.service" "$root/etc/systemd/system/weft.service"
if [ -e "$root/etc/weft/weft.yaml" ]; then
    echo "kept the existing $root/etc/weft/weft.yaml"
else
    install -m 0600 "$here/weft.yaml" "$root/etc/weft/weft.yaml"
    echo "installed a commented config: $root/etc/weft/weft.yaml"
fi
echo "installed $root/usr/local/bin/weft, $root/usr/local/bin/weft-cni, $root/etc/systemd/system/weft.service"
if [ -z "$root" ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload || true
fi
cat <<NEXT

Next:
  1. edit /etc/weft/weft.yaml (node addresses, region, mesh.peers)
  2. on the first node: (umask 077; weft gensecret > /etc/weft/secret); copy that file to every node (0600: weft refuses a secret others can read)
  3. systemctl enable --now weft && weft status
Remove it again with deploy/uninstall.sh.
NEXT
