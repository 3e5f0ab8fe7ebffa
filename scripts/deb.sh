#!/usr/bin/env bash
# Builds weft's Debian package, target/deb/weft_<version>_<arch>.deb, with dpkg-deb from the
# built binaries: /usr/bin/weft, the CNI plugin /opt/cni/bin/weft-cni, the systemd unit
# (deploy/systemd/weft.service, ExecStart on /usr/bin/weft), the commented config
# /etc/weft/weft.yaml (a conffile: an edited one is kept on upgrade, removed on purge) and the
# maintainer scripts of deploy/debian/.
#
#   cargo build --release --bins && scripts/deb.sh && sudo dpkg -i target/deb/weft_*.deb
#   sudo scripts/pgo.sh && BIN_DIR=target/pgo/release scripts/deb.sh   # profile-guided (scripts/pgo.sh)
#
# Environment: BIN_DIR (default target/release) holds weft and weft-cni; OUT_DIR (default
# target/deb) receives the package. It prints the package's path.
set -euo pipefail
cd "$(dirname "$0")/.."

bin_dir=${BIN_DIR:-target/release}
out=${OUT_DIR:-target/deb}
version=$(sed -n '/^\[workspace.package\]/,/^\[/s/^version = "\(.*\)"$/\1/p' Cargo.toml)
arch=$(dpkg --print-architecture)
for b in weft weft-cni; do
    [ -x "$bin_dir/$b" ] || { echo "deb.sh: $bin_dir/$b is missing: run \`cargo build --release --bins\` first" >&2; exit 1; }
done
built=$("$bin_dir/weft" --version)
[ "$built" = "weft $version" ] || { echo "deb.sh: $bin_dir/weft says \"$built\", the tree is at $version: rebuild it" >&2; exit 1; }

root=$out/weft_${version}_$arch
rm -rf "$root"
install -d -m 0755 "$root/DEBIAN" "$root/usr/bin" "$root/opt/cni/bin" "$root/lib/systemd/system" \
    "$root/usr/share/doc/weft"
install -d -m 0700 "$root/etc/weft"
strip --strip-debug -o "$root/usr/bin/weft" "$bin_dir/weft"
strip --strip-debug -o "$root/opt/cni/bin/weft-cni" "$bin_dir/weft-cni"
chmod 0755 "$root/usr/bin/weft" "$root/opt/cni/bin/weft-cni"
sed 's|/usr/local/bin/weft|/usr/bin/weft|g; s|Installed by deploy/install.sh|Installed by the weft package|' \
    deploy/systemd/weft.service > "$root/lib/systemd/system/weft.service"
install -m 0600 deploy/weft.yaml "$root/etc/weft/weft.yaml"
install -m 0644 deploy/debian/copyright "$root/usr/share/doc/weft/copyright"
install -m 0644 deploy/debian/conffiles "$root/DEBIAN/conffiles"
install -m 0755 deploy/debian/postinst deploy/debian/prerm deploy/debian/postrm "$root/DEBIAN/"
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed "s/@VERSION@/$version/; s/@ARCH@/$arch/; s/@SIZE@/$size/" deploy/debian/control.in > "$root/DEBIAN/control"
deb=$out/weft_${version}_$arch.deb
dpkg-deb --root-owner-group -Zgzip --build "$root" "$deb" >/dev/null
rm -rf "$root"
echo "$deb"
