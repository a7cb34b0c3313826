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
ARCH=arm64
NAME=check-arm64
INCLUDE=ca-certificates,git,make,python3,python3-venv,systemd,systemd-sysv,dbus,procps
FA_DIR=${IOT_AGENT_ARM64_DIR:-}
INSIDE_ENV=(IOT_AGENT_SWTPM_SECCOMP=none)
case "$(uname -m)" in
aarch64 | arm64) echo "check-arm64: this machine is arm64 already: run make demo and make test" >&2 && exit 2 ;;
esac
# shellcheck source=scripts/foreign-arch.sh
. "$(dirname "$0")/foreign-arch.sh"

fa_start
# For tests/system/test_check_arm64_host.py: fail (or wait for a signal) right after changing the host.
case "${IOT_AGENT_ARM64_FAIL_AT:-}" in
registered) say "failing on purpose after registering the handler" && exit 1 ;;
# Short sleeps: bash runs a trap only once its foreground child ends, and a child that missed the signal (it can
# arrive between fork and exec) would otherwise hold the trap back for the whole wait.
wait) say "registered; waiting for a signal" && for _ in $(seq 240); do sleep 0.5; done && exit 1 ;;
esac
fa_rootfs
fa_enter

# A clone of this checkout's HEAD, as a new user's `git clone` would give. On a later run the clone is
# brought to HEAD and cleaned, keeping what `make` built in it (.venv, .deps): the warm run.
if [ -d "$ROOT/src/.git" ] && git -C "$ROOT/src" fetch -q "$SRC" HEAD 2>/dev/null; then
    git -C "$ROOT/src" reset -q --hard FETCH_HEAD
    git -C "$ROOT/src" clean -qfdx -e .venv -e .deps
else
    rm -rf "$ROOT/src"
    git clone -q "$SRC" "$ROOT/src"
fi

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
