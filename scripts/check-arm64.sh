#!/usr/bin/env bash
# make check-arm64: what a new user runs, on Raspberry Pi OS's architecture (arm64 Debian bookworm),
# on any x86_64 machine: an arm64 root file system (debootstrap) entered with the kernel's binfmt handler
# for qemu-aarch64, where the README's `make demo` runs from a clone of this checkout, then
# scripts/install.sh and a short session of the installed agent, then the identity, update and rotation
# tests on both tokens (IOT_AGENT_ARM64_TESTS=0 skips them).
#
# The root file system is cached: .deps/arm64/rootfs (ready to use) and a tarball of debootstrap's
# output in ~/.cache/iot-agent (IOT_AGENT_CACHE), never required. Everything this script registers
# or mounts on the host (binfmt_misc, the qemu-aarch64 handler, /proc /sys /dev in the chroot) it
# removes on exit, also on failure and on Ctrl-C; it then checks that the host's mounts and binfmt
# entries are what they were before (exit 3 otherwise).
set -euo pipefail
SRC=$(cd "$(dirname "$0")/.." && pwd)
DIR=${IOT_AGENT_ARM64_DIR:-$SRC/.deps/arm64}
MIRROR=${IOT_AGENT_DEBIAN_MIRROR:-http://deb.debian.org/debian}
ROOT=$DIR/rootfs
CACHE=${IOT_AGENT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/iot-agent}
INCLUDE=ca-certificates,git,make,python3,python3-venv,systemd,systemd-sysv,dbus,procps
KEY=$(printf 'bookworm arm64 minbase %s' "$INCLUDE" | sha256sum | cut -c1-16)
TARBALL=$CACHE/arm64-rootfs-$KEY.tar
BINFMT=/proc/sys/fs/binfmt_misc
T0=$(date +%s)

say() { printf '[check-arm64 %4ss] %s\n' "$(($(date +%s) - T0))" "$*"; }

if [ "$(id -u)" -ne 0 ]; then
    echo "check-arm64: needs root (binfmt_misc, chroot, debootstrap); run it with sudo" >&2
    exit 2
fi
case "$(uname -m)" in
x86_64 | amd64) ;;
aarch64 | arm64) echo "check-arm64: this machine is arm64 already: run make demo and make test" >&2 && exit 2 ;;
*) echo "check-arm64: made for x86_64 hosts, this is $(uname -m)" >&2 && exit 2 ;;
esac

need=()
command -v qemu-aarch64-static >/dev/null || need+=(qemu-user-static)
command -v debootstrap >/dev/null || need+=(debootstrap)
if [ ${#need[@]} -gt 0 ]; then
    say "installing ${need[*]}"
    apt-get update -q >/dev/null
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${need[@]}" >/dev/null
fi
QEMU=$(command -v qemu-aarch64-static)

# The host as it was: what the cleanup must return to (taken after the packages: installing them is
# the one lasting change, and it registers nothing while binfmt_misc is not mounted).
host_state() {
    awk '{print $2}' /proc/self/mounts | sort
    if [ -d "$BINFMT" ] && [ -e "$BINFMT/status" ]; then ls "$BINFMT" | sort | sed 's/^/binfmt:/'; fi
}
BEFORE=$(host_state)
MOUNTED_BINFMT=0
REGISTERED=0
CHROOT_MOUNTS=()

cleanup() {
    local rc=$?
    trap - EXIT INT TERM
    set +e
    for ((i = ${#CHROOT_MOUNTS[@]} - 1; i >= 0; i--)); do
        umount -l "${CHROOT_MOUNTS[$i]}" 2>/dev/null
    done
    if [ "$REGISTERED" = 1 ] && [ -e "$BINFMT/qemu-aarch64" ]; then echo -1 >"$BINFMT/qemu-aarch64"; fi
    if [ "$MOUNTED_BINFMT" = 1 ]; then umount "$BINFMT"; fi
    AFTER=$(host_state)
    if [ "$AFTER" != "$BEFORE" ]; then
        echo "check-arm64: the host is not as it was:" >&2
        diff <(echo "$BEFORE") <(echo "$AFTER") >&2
        rc=3
    else
        say "host restored: no binfmt entry or mount left behind"
    fi
    exit $rc
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# The kernel runs aarch64 ELF files through qemu (F: the interpreter is opened now, so the chroot
# needs no copy of it).
if [ ! -e "$BINFMT/status" ]; then
    mount -t binfmt_misc binfmt_misc "$BINFMT"
    MOUNTED_BINFMT=1
fi
if [ ! -e "$BINFMT/qemu-aarch64" ]; then
    REGISTERED=1
    printf '%s' ':qemu-aarch64:M::\x7fELF\x02\x01\x01\x00\x00\x00\x00\x00\x00\x00\x00\x00\x02\x00\xb7\x00:\xff\xff\xff\xff\xff\xff\xff\x00\xff\xff\xff\xff\xff\xff\xff\xff\xfe\xff\xff\xff:'"$QEMU"':F' >"$BINFMT/register"
fi
# For tests/system/test_check_arm64_host.py: fail (or wait for a signal) right after changing the host.
case "${IOT_AGENT_ARM64_FAIL_AT:-}" in
registered) say "failing on purpose after registering the handler" && exit 1 ;;
wait) say "registered; waiting for a signal" && sleep 120 && exit 1 ;;
esac

if [ ! -x "$ROOT/usr/bin/python3" ]; then
    rm -rf "$ROOT.tmp"
    mkdir -p "$ROOT.tmp"
    if [ -s "$TARBALL" ] && [ -z "$(find "$TARBALL" -mtime +30)" ] \
        && tar --numeric-owner -C "$ROOT.tmp" -xpf "$TARBALL" 2>/dev/null && [ -x "$ROOT.tmp/usr/bin/python3" ]; then
        say "arm64 root file system from $TARBALL"
    else
        rm -rf "$ROOT.tmp"
        say "debootstrap --arch=arm64 bookworm (a few minutes under emulation)"
        debootstrap --arch=arm64 --variant=minbase --include="$INCLUDE" bookworm "$ROOT.tmp" "$MIRROR" \
            >"$DIR.debootstrap.log" 2>&1 || { tail -20 "$DIR.debootstrap.log" >&2; exit 1; }
        if mkdir -p "$CACHE" 2>/dev/null && tar --numeric-owner -C "$ROOT.tmp" -cf "$TARBALL.$$" . 2>/dev/null; then
            mv "$TARBALL.$$" "$TARBALL"
        else
            rm -f "$TARBALL.$$"
        fi
    fi
    mv "$ROOT.tmp" "$ROOT"
fi

# The same registries as the host: its Debian sources and apt settings, pip's settings and CAs.
cp /etc/resolv.conf "$ROOT/etc/resolv.conf" 2>/dev/null || true
cp /etc/ssl/certs/ca-certificates.crt "$ROOT/etc/ssl/certs/ca-certificates.crt"
[ -d /etc/apt/apt.conf.d ] && cp /etc/apt/apt.conf.d/* "$ROOT/etc/apt/apt.conf.d/" 2>/dev/null || true
[ -f /etc/pip.conf ] && cp /etc/pip.conf "$ROOT/etc/pip.conf"
grep -qs '^127.0.0.1[[:space:]].*localhost' "$ROOT/etc/hosts" || printf '127.0.0.1\tlocalhost\n::1\t\tlocalhost\n' >>"$ROOT/etc/hosts"

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

# A clone of this checkout's HEAD, as a new user's `git clone` would give. On a later run the clone is
# brought to HEAD and cleaned, keeping what `make` built in it (.venv, .deps): the warm run.
if [ -d "$ROOT/src/.git" ] && git -C "$ROOT/src" fetch -q "$SRC" HEAD 2>/dev/null; then
    git -C "$ROOT/src" reset -q --hard FETCH_HEAD
    git -C "$ROOT/src" clean -qfdx -e .venv -e .deps
else
    rm -rf "$ROOT/src"
    git clone -q "$SRC" "$ROOT/src"
fi

pip_env=()
for v in PIP_INDEX_URL PIP_EXTRA_INDEX_URL PIP_CERT PIP_DEFAULT_TIMEOUT HTTP_PROXY HTTPS_PROXY NO_PROXY http_proxy https_proxy no_proxy; do
    [ -n "${!v:-}" ] && pip_env+=("$v=${!v}")
done
inside() {
    chroot "$ROOT" /usr/bin/env -i HOME=/root PATH=/usr/sbin:/usr/bin:/sbin:/bin LANG=C.UTF-8 \
        IOT_AGENT_SWTPM_SECCOMP=none "${pip_env[@]}" "$@"
}

say "inside: $(inside uname -m), $(inside python3 -c 'import sysconfig; print(sysconfig.get_platform())')"
t=$(date +%s)
inside bash -c 'cd /src && make demo' | tee "$DIR/demo.log"
grep -q "steps verified" "$DIR/demo.log"
say "make demo on arm64: $(grep -o '[0-9]* steps verified.*' "$DIR/demo.log" | head -1) ($(($(date +%s) - t)) s)"

t=$(date +%s)
inside bash -c 'cd /src && sh scripts/install.sh' | tail -3
inside /opt/iot-agent/venv/bin/python -c 'import platform, awscrt; print("installed agent:", platform.machine(), "awscrt", awscrt.__version__)'
inside /opt/iot-agent/venv/bin/iot-agent version
inside bash -c 'cd /src && .venv/bin/python scripts/arm64_session.py'
say "install.sh and the installed agent's session: $(($(date +%s) - t)) s"

if [ "${IOT_AGENT_ARM64_TESTS:-1}" = 1 ]; then
    t=$(date +%s)
    inside bash -c 'cd /src && .venv/bin/python -m compileall -q agent localcloud tests && .venv/bin/python -m pytest -q -p no:cacheprovider -n 2 tests/identity/test_rotation.py tests/identity/test_provisioning_flow.py tests/identity/test_keystore.py tests/update/test_install.py tests/update/test_ota_agent.py tests/update/test_ota_selfupdate.py'
    say "identity, update and rotation tests on arm64: $(($(date +%s) - t)) s"
fi
say "done"
