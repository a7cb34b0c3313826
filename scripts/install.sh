#!/bin/sh
# Install iot-agent as a system service on Debian / Raspberry Pi OS: its own virtualenv in /opt/iot-agent,
# the systemd units, the system user (sysusers.d), its folders (tmpfiles.d) and a config skeleton.
# Idempotent: a second run changes nothing and says so.
#
#   sudo scripts/install.sh            # the real system
#   scripts/install.sh --root DIR      # into DIR (packaging, tests): no apt-get, no systemctl
set -eu

SRC=$(cd "$(dirname "$0")/.." && pwd)
ROOT=""
while [ $# -gt 0 ]; do
    case "$1" in
        --root) ROOT=$(cd "$2" && pwd); shift 2 ;;
        *) echo "usage: $0 [--root DIR]" >&2; exit 2 ;;
    esac
done
PREFIX="$ROOT/opt/iot-agent"
CHANGED=0

say() { echo "install: $*"; }

put() {  # put SRC DST MODE: copy only when the content or mode differs
    if [ -f "$2" ] && cmp -s "$1" "$2" && [ "$(stat -c %a "$2")" = "$3" ]; then
        return 0
    fi
    mkdir -p "$(dirname "$2")"
    install -m "$3" "$1" "$2"
    CHANGED=1
    say "wrote ${2#$ROOT}"
}

if [ -z "$ROOT" ]; then
    [ "$(id -u)" = 0 ] || { echo "install: run as root (or with --root DIR)" >&2; exit 2; }
    missing=""
    for p in python3-venv libtpm2-pkcs11-1 softhsm2; do
        dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
    done
    if [ -n "$missing" ]; then
        say "apt-get install$missing"
        apt-get update -q >/dev/null
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q $missing >/dev/null
        CHANGED=1
    fi
fi

# The agent in its own virtualenv, reinstalled only when the source changed.
stamp=$(cd "$SRC" && find agent pyproject.toml -type f \( -name '*.py' -o -name '*.toml' \) | LC_ALL=C sort \
        | xargs sha256sum | sha256sum | cut -c1-64)
if [ ! -x "$PREFIX/venv/bin/python" ]; then
    python3 -m venv "$PREFIX/venv"
    CHANGED=1
    say "created ${PREFIX#$ROOT}/venv"
fi
if [ "$(cat "$PREFIX/source.sha256" 2>/dev/null || true)" != "$stamp" ]; then
    # IOT_AGENT_PIP_ARGS: extra pip arguments (tests pass --no-deps with a pre-filled cache)
    # From a private copy: the source may be read-only, and pip's build must not litter it.
    build=$(mktemp -d)
    cp -r "$SRC/agent" "$SRC/localcloud" "$SRC/pyproject.toml" "$SRC/README.md" "$build/"
    "$PREFIX/venv/bin/pip" install -q ${IOT_AGENT_PIP_ARGS:-} "$build"
    rm -rf "$build"
    echo "$stamp" > "$PREFIX/source.sha256"
    CHANGED=1
    say "installed the agent into ${PREFIX#$ROOT}/venv"
fi
put "$SRC/README.md" "$PREFIX/README.md" 644

# systemd units, the user and the folders.
for u in iot-agent.service iot-agent-install.service iot-agent-install.path; do
    put "$SRC/systemd/$u" "$ROOT/etc/systemd/system/$u" 644
done
put "$SRC/systemd/iot-agent.sysusers" "$ROOT/usr/lib/sysusers.d/iot-agent.conf" 644
put "$SRC/systemd/iot-agent.tmpfiles" "$ROOT/usr/lib/tmpfiles.d/iot-agent.conf" 644

# A config skeleton, never overwritten.
if [ ! -e "$ROOT/etc/iot-agent/config.toml" ]; then
    put "$SRC/systemd/config.example.toml" "$ROOT/etc/iot-agent/config.toml" 644
fi

if [ -z "$ROOT" ]; then
    systemd-sysusers /usr/lib/sysusers.d/iot-agent.conf
    systemd-tmpfiles --create /usr/lib/tmpfiles.d/iot-agent.conf
    if [ "$CHANGED" = 1 ] && [ -d /run/systemd/system ]; then  # not when building an image offline
        systemctl daemon-reload
    fi
    systemctl is-enabled -q iot-agent.service 2>/dev/null || { systemctl enable -q iot-agent.service; CHANGED=1; }
    systemctl is-enabled -q iot-agent-install.path 2>/dev/null || { systemctl enable -q iot-agent-install.path; CHANGED=1; }
fi

if [ "$CHANGED" = 0 ]; then
    say "nothing to change"
else
    say "done; edit /etc/iot-agent/config.toml, put the PIN in /etc/iot-agent/pkcs11-pin (mode 0600), then systemctl start iot-agent"
fi
