#!/bin/sh
# A Debian bookworm root file system with systemd and the agent installed by scripts/install.sh, for the
# tests that boot it with systemd-nspawn. Built once (about a minute) and cached in .deps/nspawn; the agent
# in it is brought up to date on every call (install.sh changes nothing when nothing changed).
set -eu
SRC=$(cd "$(dirname "$0")/.." && pwd)
DIR=${IOT_AGENT_NSPAWN_DIR:-$SRC/.deps/nspawn}
MIRROR=${IOT_AGENT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOTFS=$DIR/rootfs
mkdir -p "$DIR"

# nspawn keeps per-machine state under /run/systemd/nspawn and refuses to use a disk file system there.
if [ "$(findmnt -n -o FSTYPE --target /run/systemd/nspawn 2>/dev/null || true)" != tmpfs ]; then
    mkdir -p /run/systemd/nspawn
    mount -t tmpfs -o mode=0755 tmpfs /run/systemd/nspawn
fi

# debootstrap's output (before install.sh) is also kept as a tarball in a cache outside the checkout, so a
# fresh clone on the same machine (CI) unpacks it in seconds instead of bootstrapping for minutes. Never
# needed: without it (or when it is over 30 days old, or unreadable) debootstrap runs as before.
INCLUDE=systemd,systemd-sysv,dbus,python3,python3-venv,softhsm2,libtpm2-pkcs11-1,ca-certificates,procps
CACHE=${IOT_AGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/iot-agent}
KEY=$(printf 'bookworm minbase %s' "$INCLUDE" | sha256sum | cut -c1-16)
TARBALL=$CACHE/nspawn-rootfs-$KEY.tar
if [ ! -x "$ROOTFS/usr/bin/python3" ]; then
    rm -rf "$ROOTFS.tmp"
    mkdir -p "$ROOTFS.tmp"
    if [ -s "$TARBALL" ] && [ -z "$(find "$TARBALL" -mtime +30)" ] \
        && tar --numeric-owner -C "$ROOTFS.tmp" -xpf "$TARBALL" 2>/dev/null && [ -x "$ROOTFS.tmp/usr/bin/python3" ]; then
        echo "nspawn image: base file system from $TARBALL" >"$DIR/debootstrap.log"
    else
        rm -rf "$ROOTFS.tmp"
        debootstrap --variant=minbase --include="$INCLUDE" \
            bookworm "$ROOTFS.tmp" "$MIRROR" >"$DIR/debootstrap.log" 2>&1
        if mkdir -p "$CACHE" 2>/dev/null && tar --numeric-owner -C "$ROOTFS.tmp" -cf "$TARBALL.$$" . 2>/dev/null; then
            mv "$TARBALL.$$" "$TARBALL"
        else
            rm -f "$TARBALL.$$"
        fi
    fi
    mv "$ROOTFS.tmp" "$ROOTFS"
fi

# minbase has no /etc/hosts: "localhost" would not resolve.
grep -qs '^127.0.0.1[[:space:]].*localhost' "$ROOTFS/etc/hosts" || printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost\n' >> "$ROOTFS/etc/hosts"

rm -rf "$DIR/src"
mkdir -p "$DIR/src"
cp -r "$SRC/agent" "$SRC/localcloud" "$SRC/pyproject.toml" "$SRC/README.md" "$SRC/systemd" "$SRC/scripts" "$DIR/src/"
# The host's CA bundle: pip inside must trust what the host trusts (a proxy's CA, if any).
systemd-nspawn -q -D "$ROOTFS" --register=no --keep-unit --bind-ro="$DIR/src:/src" \
    --bind-ro=/etc/ssl/certs/ca-certificates.crt --pipe sh /src/scripts/install.sh
