#!/bin/sh
# Removes what deploy/install.sh installed: stops and disables the service, removes the unit
# and the binaries, and the CNI conflist the daemon wrote at its default path
# (/etc/cni/net.d/10-weft.conflist, only if it names weft-cni: without the plugin it would make
# every pod's network set-up fail). The config (/etc/weft) and the state (/var/lib/weft: key,
# pod blocks) stay unless --purge is given. A conflist written elsewhere (cni.conflist) is the
# operator's to remove.
#
# DESTDIR=/some/root removes from under that root instead.
set -eu
root=${DESTDIR:-}
purge=no
for a in "$@"; do
    case "$a" in
        --purge) purge=yes ;;
        *) echo "uninstall.sh: unknown argument $a (only --purge)" >&2; exit 1 ;;
    esac
done
if [ -z "$root" ] && [ "$(id -u)" -ne 0 ]; then
    echo "uninstall.sh: run as root (or set DESTDIR)" >&2
    exit 1
fi
if [ -z "$root" ] && command -v systemctl >/dev/null 2>&1; then
    systemctl disable --now weft 2>/dev/null || true
fi
rm -f "$root/etc/systemd/system/weft.service" "$root/usr/local/bin/weft" "$root/usr/local/bin/weft-cni"
conflist="$root/etc/cni/net.d/10-weft.conflist"
if [ -f "$conflist" ] && grep -q '"weft-cni"' "$conflist"; then
    rm -f "$conflist"
    echo "removed the CNI conflist $conflist"
fi
if [ -z "$root" ] && command -v systemctl >/dev/null 2>&1; then
    systemctl daemon-reload || true
fi
if [ "$purge" = yes ]; then
    rm -rf "$root/etc/weft" "$root/var/lib/weft"
    echo "removed weft, its config and its state"
else
    echo "removed weft; kept $root/etc/weft and $root/var/lib/weft (--purge removes them)"
fi
