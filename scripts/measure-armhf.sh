#!/usr/bin/env bash
# What a 32-bit (armhf) install costs where no awscrt wheel exists: PyPI has none for armv7l, so pip
# builds awscrt from source. This builds it once inside an armhf Debian bookworm root file system under
# qemu-arm (on an x86_64 host, as root) and prints the build's wall time and memory: the peak of the
# largest single process and the peak of all build processes together, sampled from the host every
# 0.2 s. Both include the emulator's own memory, so they are upper bounds for a real board.
# Run once to document the 32-bit path (README, "Raspberry Pi"); it is not run in CI.
#
#   sudo bash scripts/measure-armhf.sh            # CMAKE_BUILD_PARALLEL_LEVEL=2
#   sudo JOBS=1 bash scripts/measure-armhf.sh     # what a 512 MB board should use
#
# Host cleanup as make check-arm64 (scripts/foreign-arch.sh); it cannot run at the same time as that
# check, since each compares the host's binfmt entries with what it saw at its start.
set -euo pipefail
ARCH=armhf
NAME=measure-armhf
INCLUDE=ca-certificates,python3,python3-venv,python3-dev,build-essential,cmake,time,procps
JOBS=${JOBS:-2}
INSIDE_ENV=(CMAKE_BUILD_PARALLEL_LEVEL="$JOBS")
# shellcheck source=scripts/foreign-arch.sh
. "$(dirname "$0")/foreign-arch.sh"

fa_start
fa_rootfs
fa_enter

VERSION=${AWSCRT_VERSION:-$("$SRC/.venv/bin/python" -c 'import awscrt; print(awscrt.__version__)' 2>/dev/null || echo 0.36.1)}
say "inside: $(inside uname -m), $(inside python3 -c 'import sysconfig; print(sysconfig.get_platform())'), awscrt $VERSION, $JOBS build jobs"
inside bash -c 'test -x /build/venv/bin/pip || python3 -m venv /build/venv'
inside /build/venv/bin/pip download -q --no-deps --no-binary :all: -d /build/sdist "awscrt==$VERSION"
rm -rf "$ROOT/build/wheels" "$ROOT/build/tmp"
mkdir -p "$ROOT/build/tmp"

# The sampler: every process whose root is this file system (what the chroot started), summed.
python3 - "$ROOT" "$DIR/armhf-rss.txt" <<'EOF' &
import os, sys, time
root, out = sys.argv[1], sys.argv[2]
peak = peak_one = 0
with open(out, "w") as f:
    while True:
        total = one = 0
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                if os.readlink(f"/proc/{pid}/root") != root:
                    continue
                with open(f"/proc/{pid}/statm") as s:
                    rss = int(s.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
            except OSError:
                continue
            total += rss
            one = max(one, rss)
        peak, peak_one = max(peak, total), max(peak_one, one)
        f.seek(0)
        f.write(f"{peak} {peak_one}\n")
        f.truncate()
        f.flush()
        time.sleep(0.2)
EOF
SAMPLER=$!
t=$(date +%s)
rc=0
inside env TMPDIR=/build/tmp /usr/bin/time -v -o /build/time.txt \
    /build/venv/bin/pip wheel -q --no-deps --no-binary :all: -w /build/wheels /build/sdist/awscrt-"$VERSION".tar.gz \
    >"$DIR/armhf-build.log" 2>&1 || rc=$?
secs=$(($(date +%s) - t))
kill "$SAMPLER" 2>/dev/null || true
wait "$SAMPLER" 2>/dev/null || true
if [ "$rc" != 0 ]; then
    tail -30 "$DIR/armhf-build.log" >&2
    say "the build failed (exit $rc) after $secs s"
    exit 1
fi
read -r peak peak_one <"$DIR/armhf-rss.txt"
maxrss=$(awk -F': ' '/Maximum resident set size/ {print $2}' "$ROOT/build/time.txt")
cpu=$(awk -F': ' '/User time|System time/ {s += $2} END {printf "%d", s}' "$ROOT/build/time.txt")
say "built $(ls "$ROOT/build/wheels") in $secs s ($((secs / 60)) min; CPU $cpu s) with $JOBS jobs under qemu-arm"
say "the wheel, for IOT_AGENT_PIP_ARGS=\"--find-links DIR\": $ROOT/build/wheels"
say "peak memory: $((peak / 1048576)) MiB all build processes together, $((peak_one / 1048576)) MiB the largest one (time -v: $((maxrss / 1024)) MiB); emulator included"
