# Sourced by check-arm64.sh and measure-armhf.sh: a Debian bookworm root file system of another
# architecture (debootstrap), entered from an x86_64 host through the kernel's binfmt handler for
# qemu-user, and a cleanup that returns the host to what it was.
#
# The caller sets ARCH (arm64 or armhf), INCLUDE (debootstrap's --include) and NAME (for messages),
# then calls fa_start, fa_rootfs, fa_enter; `inside CMD...` runs a command in the root file system.
# Everything registered or mounted on the host (binfmt_misc, the qemu handler, /proc /sys /dev in the
# chroot) is removed on exit, also on failure and on Ctrl-C; then the host's mounts and binfmt entries
# are compared with before (exit 3 when they differ).
# shellcheck shell=bash

case "$ARCH" in
arm64)
    QEMU_NAME=aarch64
    MAGIC='\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00'
    ;;
armhf)
    QEMU_NAME=arm
    MAGIC='\x7fELF\x01\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\x28\x00'
    ;;
*) echo "foreign-arch: unknown ARCH $ARCH" >&2 && exit 2 ;;
esac
# The same mask for both (qemu's scripts/qemu-binfmt-conf.sh): any ELF OS/ABI, executables and
# shared objects.
MASK='\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff'
SRC=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DIR=${FA_DIR:-$SRC/.deps/$ARCH}
MIRROR=${IOT_AGENT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOT=$DIR/rootfs
CACHE=${IOT_AGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/iot-agent}
KEY=$(printf 'bookworm %s minbase %s' "$ARCH" "$INCLUDE" | sha256sum | cut -c1-16)
TARBALL=$CACHE/$ARCH-rootfs-$KEY.tar
BINFMT=/proc/sys/fs/binfmt_misc
T0=$(date +%s)
MOUNTED_BINFMT=0
REGISTERED=0
CHROOT_MOUNTS=()

say() { printf '[%s %4ss] %s\n' "$NAME" "$(($(date +%s) - T0))" "$*"; }

host_state() {
    awk '{print $2}' /proc/self/mounts | sort
    if [ -d "$BINFMT" ] && [ -e "$BINFMT/status" ]; then ls "$BINFMT" | sort | sed 's/^/binfmt:/'; fi
}

fa_cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    for ((i = ${#CHROOT_MOUNTS[@]} - 1; i >= 0; i--)); do
        umount -l "${CHROOT_MOUNTS[$i]}" 2>/dev/null
    done
    if [ "$REGISTERED" = 1 ] && [ -e "$BINFMT/qemu-$QEMU_NAME" ]; then echo -1 >"$BINFMT/qemu-$QEMU_NAME"; fi
    if [ "$MOUNTED_BINFMT" = 1 ]; then umount "$BINFMT"; fi
    AFTER=$(host_state)
    if [ "$AFTER" != "$BEFORE" ]; then
        echo "$NAME: the host is not as it was:" >&2
        diff <(echo "$BEFORE") <(echo "$AFTER") >&2
        rc=3
    else
        say "host restored: no binfmt entry or mount left behind"
    fi
    exit $rc
}

# Root, an x86_64 host, qemu-user-static and debootstrap (installed when missing); then the host's
# state is recorded and the handler registered.
fa_start() {
    if [ "$(id -u)" -ne 0 ]; then
        echo "$NAME: needs root (binfmt_misc, chroot, debootstrap); run it with sudo" >&2
        exit 2
    fi
    case "$(uname -m)" in
    x86_64 | amd64) ;;
    *) echo "$NAME: made for x86_64 hosts, this is $(uname -m)" >&2 && exit 2 ;;
    esac
    local need=()
    command -v "qemu-$QEMU_NAME-static" >/dev/null || need+=(qemu-user-static)
    command -v debootstrap >/dev/null || need+=(debootstrap)
    if [ ${#need[@]} -gt 0 ]; then
        say "installing ${need[*]}"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
    fi
    local qemu
    qemu=$(command -v "qemu-$QEMU_NAME-static")
    # The host as it was: what the cleanup must return to (taken after the packages: installing them
    # is the one lasting change, and it registers nothing while binfmt_misc is not mounted).
    BEFORE=$(host_state)
    trap fa_cleanup EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    # The kernel runs the foreign ELF files through qemu (F: the interpreter is opened now, so the
    # chroot needs no copy of it).
    if [ ! -e "$BINFMT/status" ]; then
        mount -t binfmt_misc binfmt_misc "$BINFMT"
        MOUNTED_BINFMT=1
    fi
    if [ ! -e "$BINFMT/qemu-$QEMU_NAME" ]; then
        REGISTERED=1
        printf '%s' ":qemu-$QEMU_NAME:M::$MAGIC:$MASK:$qemu:F" >"$BINFMT/register"
    fi
}

# The root file system: .deps/ARCH/rootfs when ready, else debootstrap's output from the tarball
# cache (never required), else debootstrap.
fa_rootfs() {
    if [ -x "$ROOT/usr/bin/python3" ]; then return; fi
    mkdir -p "$DIR"
    rm -rf "$ROOT.tmp"
    mkdir -p "$ROOT.tmp"
    if [ -s "$TARBALL" ] && [ -z "$(find "$TARBALL" -mtime +30)" ] \
        && tar --numeric-owner -C "$ROOT.tmp" -xpf "$TARBALL" 2>/dev/null && [ -x "$ROOT.tmp/usr/bin/python3" ]; then
        say "$ARCH root file system from $TARBALL"
    else
        rm -rf "$ROOT.tmp"
        say "debootstrap --arch=$ARCH bookworm (a few minutes under emulation)"
        debootstrap --arch="$ARCH" --variant=minbase --include="$INCLUDE" bookworm "$ROOT.tmp" "$MIRROR" \
            >"$DIR.debootstrap.log" 2>&1 || {
            tail -20 "$DIR.debootstrap.log" >&2
            exit 1
        }
        if mkdir -p "$CACHE" 2>/dev/null && tar --numeric-owner -C "$ROOT.tmp" -cf "$TARBALL.$$" . 2>/dev/null; then
            mv "$TARBALL.$$" "$TARBALL"
        else
            rm -f "$TARBALL.$$"
        fi
    fi
    mv "$ROOT.tmp" "$ROOT"
}

# The same registries as the host (its apt settings, pip's settings and CAs), then /proc /sys /dev.
fa_enter() {
    cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
    cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
    [ -d /etc/apt/apt.conf.d ] && cp /etc/apt/apt.conf.d/* "$ROOT/etc/apt/apt.conf.d/" 2>/dev/null || true
    [ -f /etc/pip.conf ] && cp /etc/pip.conf "$ROOT/etc/pip.conf"
    grep -qs '^127.0.0.1[[:space:]].*localhost' "$ROOT/etc/hosts" || printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost\n' >>"$ROOT/etc/hosts"
    local m
    for m in proc sys dev dev/pts; do
        mkdir -p "$ROOT/$m"
        case $m in
        proc) mount -t proc proc "$ROOT/proc" ;;
        dev/pts) mount -t devpts -o newinstance,ptmxmode=0666 devpts "$ROOT/dev/pts" ;;
        *) mount --rbind "/$m" "$ROOT/$m" && mount --make-rslave "$ROOT/$m" ;;
        esac
        CHROOT_MOUNTS+=("$ROOT/$m")
    done
    mkdir -p "$ROOT/dev/shm"
    PIP_ENV=()
    local v
    for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CERT PIP_DEFAULT_TIMEOUT HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
        if [ -n "${!v:-}" ]; then PIP_ENV+=("$v=${!v}"); fi
    done
}

inside() {
    chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        "${PIP_ENV[@]}" "${INSIDE_ENV[@]}" "$@"
}
