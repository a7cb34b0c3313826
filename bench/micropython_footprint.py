"""Footprint of the MicroPython board agent, as figures and ratios against targets and against baselines
measured in the same run. Benchmarks print; the only verdicts (exit status 1) are the two targets.

1. Flash: every file a board carries (main, loader, board and the app modules) compiled with mpy-cross;
   total `.mpy` size next to the `.py` sources it came from. Target: <= 64 KB.
2. Heap high-water of a full cycle, on both lanes of tests/boardkit.py: SNTP, provisioning by claim (key
   and CSR made on the board), a Defender report, a signed OTA update over an MQTT stream (download,
   verify, unpack, reset, self-test, commit) and a certificate rotation. With `heap_probe` on, the agent
   collects garbage at each step and after every stream block and prints the live heap (gc.mem_alloc)
   when it grows; the figure is the highest of those.
     wasm  WebAssembly port in Node: a 32-bit heap like a board's, TLS in Node (outside the heap, as the
           target asks). Target: <= 48 KB, checked on this figure.
     unix  MicroPython's unix port running the shipped board.py with Mbed TLS: 64-bit, so every pointer
           and object header is twice a board's; printed with its ratio to the 32-bit figure.
   Each lane's bare interpreter and platform layer (board, json, asyncio, hashlib, binascii, os) are
   measured the same way, in the same run.
3. The smallest `-X heapsize` under which the unix-lane cycle completes cleanly (no MemoryError), by a
   bisection between the live high-water (below which nothing fits) and 160k (or the lane's default heap,
   where it has just passed, if smaller); this is the figure the test suite's heap cap is set from.
4. TLS: the C-heap bytes Mbed TLS takes for one mutual-TLS handshake and MQTT CONNECT (peak, and live
   while connected), counted by an LD_PRELOAD malloc interposer (bench/cheap/malloc_peak.c, built here
   with gcc) around bench/cheap/tls_session.py against a real mosquitto with client certificates.
Then estimates for a Raspberry Pi Pico W and an ESP32, built from those measured numbers.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from boardkit import APP_MODULES, MP, RESET_EXIT, THING, UNIX_HEAP, BoardProcess, MpWorld, mpy_cross  # noqa: E402
from mpkit import HARNESS, micropython_unix  # noqa: E402

KB = 1024
FLASH_TARGET = 64 * KB
HEAP_TARGET = 48 * KB  # on the 32-bit (wasm) figure: a board's heap is 32-bit
CHEAP = Path(__file__).resolve().parent / "cheap"
MICROPYPATH = f".frozen:{MP}"  # without .frozen the unix port has no asyncio

# Heap search: 4 KB steps up to SEARCH_TOP_KB, one confirmation run; every run ends at its first failure
# or after RUN_BUDGET_S. About six runs in all.
SEARCH_STEP_KB = 4
SEARCH_TOP_KB = 160
RUN_BUDGET_S = 120.0
OOM = "memory allocation failed"

# Board figures the estimates assume (not measured here).
PICO_W_HEAP = 190 * KB  # gc.mem_free() of a fresh Pico W (rp2 port): Mbed TLS allocates from this heap too
TLS_RX_RECORD = 16 * KB  # MBEDTLS_SSL_IN_CONTENT_LEN in MicroPython's Mbed TLS config: one block
ESP32_GC_INITIAL = 56 * KB  # MICROPY_GC_INITIAL_HEAP_SIZE on a plain ESP32; it grows from the IDF heap on demand


# 1. Flash


def flash_size(work: Path) -> tuple[int, int]:
    """(total .py bytes, total .mpy bytes) of what a board carries, per file printed."""
    total_py = total_mpy = 0
    for m in ("main", "loader", "board", *APP_MODULES):
        out = work / f"{m}.mpy"
        subprocess.run([mpy_cross(), "-o", str(out), str(MP / f"{m}.py")], check=True, timeout=60)
        py, mpy = (MP / f"{m}.py").stat().st_size, out.stat().st_size
        total_py += py
        total_mpy += mpy
        print(f"  {m + '.mpy':16} {mpy:7,d} bytes  (from {py:,d} bytes of source)")
    return total_py, total_mpy


# 2. Baselines of each lane


def wasm_baseline(work: Path) -> tuple[int, int]:
    """Live heap of the bare WebAssembly interpreter, and with the harness's platform layer imported:
    board.py on Node's bridge plus json, asyncio, hashlib and binascii. On a board most of that is C or
    frozen code that takes no heap (binascii is even pure Python in the WebAssembly build), so the raw
    high-water, which the target is checked against, overstates a board's figure by about this much."""
    script = work / "bare-wasm.py"
    script.write_text(
        "import js\nprint(await js.liveHeap())\nimport board, json, asyncio, hashlib, binascii, os\n"
        "print(await js.liveHeap())\n"
    )
    r = subprocess.run(
        ["node", "--expose-gc", str(HARNESS / "run.mjs"), str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    bare, platform = (int(x) for x in r.stdout.split()[-2:])
    return bare, platform


def unix_baseline(work: Path) -> tuple[int, int]:
    """The same two figures on the unix port, with the shipped board.py (as the unix lane runs it): the
    64-bit floor under the unix-lane high-water, measured the same way (collect, then gc.mem_alloc)."""
    script = work / "bare-unix.py"
    script.write_text(
        "import gc\ngc.collect()\nprint(gc.mem_alloc())\n"
        "import board, json, asyncio, hashlib, binascii, os\ngc.collect()\nprint(gc.mem_alloc())\n"
    )
    r = subprocess.run(
        [micropython_unix(), "-X", f"heapsize={UNIX_HEAP}", str(script)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
        cwd=work,
        env={**os.environ, "MICROPYPATH": MICROPYPATH},
    )
    bare, platform = (int(x) for x in r.stdout.split()[-2:])
    return bare, platform


# 2-3. The full cycle


@dataclass
class Cycle:
    """One full cycle on one lane: whether it completed cleanly, and the heap probe's high-water."""

    ok: bool
    why: str  # what stopped it, when not ok
    high_water: int
    where: str  # the probe point of the high-water
    boots: int
    release_bytes: int
    seconds: float


class Stopped(Exception):
    """The cycle cannot complete any more: the board ran out of heap, gave up, or a job failed."""


def _board_done(b: BoardProcess) -> bool:
    """The board stopped booting (an exit other than a reset, or the boot bound was reached)."""
    codes = b.exit_codes
    return bool(codes) and (codes[-1] != RESET_EXIT or len(codes) >= b.max_boots)


def _check(b: BoardProcess) -> None:
    """Fail fast instead of waiting out a timeout: the heap search runs many cycles that fail."""
    if b.count(OOM):
        line = next(x for x in b.text().splitlines() if OOM in x)
        raise Stopped(line.strip())
    if _board_done(b):
        raise Stopped(f"the board stopped (exit codes {b.exit_codes})")


def _await_line(b: BoardProcess, pattern: str, deadline: float) -> None:
    rx = re.compile(pattern)
    while not rx.search(b.text()):
        _check(b)
        if time.monotonic() > deadline:
            raise Stopped(f"no {pattern!r} in time")
        time.sleep(0.1)


def _await_job(w: MpWorld, b: BoardProcess, job_id: str, deadline: float) -> None:
    while True:
        ex = w.jobs.execution(job_id, THING) or {}
        status = ex.get("status")
        if status == "SUCCEEDED":
            return
        if status in ("FAILED", "REJECTED", "TIMED_OUT", "CANCELED", "REMOVED"):
            raise Stopped(f"{job_id} {status}: {ex.get('statusDetails')}")
        _check(b)
        if time.monotonic() > deadline:
            raise Stopped(f"{job_id} not done in time (status {status})")
        time.sleep(0.1)


def full_cycle(root: Path, lane: str, heap: str = UNIX_HEAP, budget: float = RUN_BUDGET_S) -> Cycle:
    """Provisioning, Defender, signed OTA with swap, rotation; the cycle this bench has always measured.
    A run counts only if it completes without a MemoryError anywhere: the agent survives some (a failed
    session is retried), but a heap cap set where they happen would make the tests flaky."""
    t0 = time.monotonic()
    deadline = t0 + budget
    w = MpWorld(root, config={"heap_probe": True}, mpy=True, lane=lane, heap=heap)
    data = b""
    try:
        b = w.boot()
        try:
            _await_line(b, r"defender report \d+ accepted", deadline)
            data = w.release("1.1.0")
            w.jobs.create("bench-ota", THING, w.ota_doc("1.1.0", data))
            _await_job(w, b, "bench-ota", deadline)
            w.jobs.create("bench-rotate", THING, {"operation": "rotate-certificate"})
            _await_job(w, b, "bench-rotate", deadline)
            _await_line(b, r"rotation: SUCCEEDED", deadline)
            _check(b)
            ok, why = f"connected as {THING}" in b.text(), ""
        except Stopped as e:
            ok, why = False, str(e)
        text = b.text()
    finally:
        w.close()
    marks = [(int(n), where) for n, where in re.findall(r"heap high-water (\d+) ?(\S*)", text)]
    hw, where = max(marks) if marks else (0, "")
    return Cycle(ok, why, hw, where, text.count("### boot"), len(data), time.monotonic() - t0)


def heap_kb(heap: str) -> int:
    """KB in a `-X heapsize` value as boardkit spells it ("256k", "1M")."""
    m = re.fullmatch(r"(\d+)([kKmM]?)", heap)
    assert m, heap
    n, unit = int(m[1]), m[2].lower()
    return n * KB if unit == "m" else n if unit == "k" else n // KB


def smallest_heap(work: Path, high_water: int, passed_kb: int) -> tuple[int | None, list[tuple[int, Cycle]]]:
    """Bisection in SEARCH_STEP_KB steps between the live high-water (a heap that small cannot hold it,
    let alone the GC's own tables) and SEARCH_TOP_KB or `passed_kb`, where the lane has just completed,
    whichever is smaller; then one more run at the answer, since runs near the edge can differ (one
    step up if it fails). Bounded: about log2((top - floor) / step) + 1 runs, each ending at its first
    MemoryError or after RUN_BUDGET_S. None if no answer held."""
    runs: list[tuple[int, Cycle]] = []

    def run(kb: int) -> bool:
        c = full_cycle(work / f"heap-{kb}k-{len(runs)}", "unix", heap=f"{kb}k")
        runs.append((kb, c))
        verdict = "completes" if c.ok else f"fails ({c.why[:110]})"
        print(f"  -X heapsize={kb}k: {verdict}; {c.seconds:.1f} s")
        return c.ok

    lo = high_water // KB // SEARCH_STEP_KB * SEARCH_STEP_KB  # assumed to fail: not run
    hi = min(passed_kb, SEARCH_TOP_KB) // SEARCH_STEP_KB * SEARCH_STEP_KB  # expected to pass; confirmed below
    while hi - lo > SEARCH_STEP_KB:
        mid = (lo + hi) // 2 // SEARCH_STEP_KB * SEARCH_STEP_KB
        if run(mid):
            hi = mid
        else:
            lo = mid
    for _ in range(2):
        if hi >= passed_kb or run(hi):
            return hi, runs
        hi += SEARCH_STEP_KB
    return None, runs


# 4. TLS on the C heap


def build_interposer(work: Path) -> Path | None:
    """bench/cheap/malloc_peak.c as a shared object, or None (with the reason printed) without gcc."""
    gcc = shutil.which("gcc")
    if not gcc and os.geteuid() == 0:
        print("  gcc is missing: installing it (apt-get install -y gcc)")
        r = subprocess.run(["apt-get", "install", "-y", "-q", "gcc"], capture_output=True, text=True, timeout=600)
        gcc = shutil.which("gcc")
        if not gcc:
            print(f"  apt-get install gcc failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}")
    if not gcc:
        print(
            "  skipped: gcc is needed to build the malloc interposer (bench/cheap/malloc_peak.c); "
            "install it (apt-get install gcc) and run again"
        )
        return None
    so = work / "malloc_peak.so"
    subprocess.run(
        [gcc, "-O2", "-shared", "-fPIC", "-o", str(so), str(CHEAP / "malloc_peak.c"), "-ldl"], check=True, timeout=120
    )
    return so


@dataclass
class TlsCost:
    """C-heap bytes of one mutual-TLS session above the process's floor before it, and the GC heap."""

    peak: int  # handshake (context, certificates, key) + MQTT CONNECT
    live: int  # while connected, after a collection
    traffic_peak: int  # above `live`, over SUBSCRIBE + a 2,000-byte PUBLISH and its echo
    after_close: int  # still held after close and a collection
    gc_before: int
    gc_connected: int


def tls_cost(work: Path, so: Path) -> TlsCost:
    """One session of the shipped board.tls() + mqtt.Client against mosquitto with client certificates."""
    from localcloud.bench import Bench

    bench = Bench(work / "tls-bench").start(ntp=False)
    try:
        issued = bench.ca.issue_client("mp-footprint", "mp-footprint")
        out = work / "tls-c-heap.txt"
        params = work / "tls-params.json"
        params.write_text(
            json.dumps(
                {
                    "port": bench.broker.port,
                    "ca": bench.ca.cert_path.read_text(),
                    "cert": issued.cert_path.read_text(),
                    "key": issued.key_path.read_text(),
                    "client_id": "mp-footprint",
                    "out": str(out),
                }
            )
        )
        env = {**os.environ, "MICROPYPATH": MICROPYPATH, "LD_PRELOAD": str(so), "MALLOC_PEAK_OUT": str(out)}
        r = subprocess.run(
            [micropython_unix(), "-X", f"heapsize={UNIX_HEAP}", str(CHEAP / "tls_session.py"), str(params)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
            cwd=work,
        )
    finally:
        bench.stop()
    if r.returncode != 0:
        raise RuntimeError(f"tls_session.py failed ({r.returncode}):\n{r.stdout[-2000:]}\n{r.stderr[-2000:]}")
    got = {
        name: (int(live), int(peak), int(gc_bytes))
        for name, live, peak, gc_bytes in re.findall(r"^tls (\w+) (\d+) (\d+) (\d+)$", r.stdout, re.M)
    }
    floor = got["before"][0]
    live = got["connected"][0] - floor
    return TlsCost(
        peak=got["connected"][1] - floor,
        live=live,
        traffic_peak=got["traffic"][1] - got["traffic"][0],
        after_close=got["closed"][0] - floor,
        gc_before=got["before"][2],
        gc_connected=got["connected"][2],
    )


# Report


def kb(n: float) -> str:
    return f"{n / KB:.1f} KB"


def estimates(hw32: int, tls: TlsCost | None) -> None:
    """Boards, from the measured numbers and the board constants above; labelled as estimates."""
    print("estimates for boards, from the numbers above (not measured on a board):")
    if tls is None:
        print(
            f"  without the TLS figure, only the agent's: its 32-bit high-water {kb(hw32)} is "
            f"{hw32 / PICO_W_HEAP:.2f} of a Pico W's ~{PICO_W_HEAP // KB} KB heap and {hw32 / ESP32_GC_INITIAL:.2f} "
            f"of the {ESP32_GC_INITIAL // KB} KB heap MicroPython starts with on a plain ESP32"
        )
        return
    print(
        f"  the TLS figures are the unix port's (64-bit structures), so an upper bound for a 32-bit board; "
        f"the agent's are the 32-bit (wasm) high-water {kb(hw32)}"
    )
    need = hw32 + tls.peak
    print(
        f"  Raspberry Pi Pico W (Mbed TLS allocates from the MicroPython heap): agent high-water {kb(hw32)} + "
        f"TLS peak {kb(tls.peak)} = {kb(need)}, {need / PICO_W_HEAP:.2f} of the ~{PICO_W_HEAP // KB} KB heap; with "
        f"{kb(TLS_RX_RECORD)} more headroom, {kb(need + TLS_RX_RECORD)} = {(need + TLS_RX_RECORD) / PICO_W_HEAP:.2f}."
        f" The TLS receive buffer is one {kb(TLS_RX_RECORD)} block, allocated at every connect: it needs that "
        f"much contiguous free heap, which fragmentation, not the total, decides"
    )
    print(
        f"  ESP32 (Mbed TLS allocates from the IDF heap, outside the MicroPython heap): agent high-water "
        f"{kb(hw32)} = {hw32 / ESP32_GC_INITIAL:.2f} of the {ESP32_GC_INITIAL // KB} KB heap MicroPython starts "
        f"with on a plain ESP32 (it adds areas from the IDF heap when full); TLS needs {kb(tls.peak)} of IDF heap "
        f"at its peak and keeps {kb(tls.live)} while connected"
    )


def main() -> int:
    if not (HARNESS / "node_modules" / "@micropython").is_dir():
        subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=HARNESS, check=True, timeout=300)
    work = Path(tempfile.mkdtemp(prefix="mp-footprint-"))
    try:
        return report(work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def report(work: Path) -> int:
    """Every figure, printed as it is measured; 1 if the flash or the 32-bit heap target is missed."""

    print("1. flash (.mpy built by mpy-cross):")
    py, mpy = flash_size(work)
    print(
        f"total .mpy {mpy:,d} bytes = {kb(mpy)}; ratio to the .py sources {mpy / py:.2f}; "
        f"ratio to the 64 KB target {mpy / FLASH_TARGET:.2f}"
    )

    print("\n2. heap high-water of the full cycle, live bytes after a collection:")
    bare32, plat32 = wasm_baseline(work)
    wasm = full_cycle(work / "cycle-wasm", "wasm", budget=400)
    bare64, plat64 = unix_baseline(work)
    unix = full_cycle(work / "cycle-unix", "unix", budget=400)
    for name, c, bare, plat in (
        ("wasm (32-bit)", wasm, bare32, plat32),
        (f"unix (64-bit, -X heapsize={UNIX_HEAP})", unix, bare64, plat64),
    ):
        state = "" if c.ok else f"; DID NOT COMPLETE: {c.why}"
        print(
            f"  {name}: bare interpreter {bare:,d}; with the platform layer {plat:,d}; full cycle "
            f"({c.release_bytes:,d}-byte release, {c.boots} boots, {c.seconds:.1f} s) high-water {c.high_water:,d} "
            f"= {kb(c.high_water)} at {c.where or '?'}{state}"
        )
        print(
            f"    ratio to the bare interpreter {c.high_water / bare:.1f}; the agent's share above the platform "
            f"layer {c.high_water - plat:,d} bytes = {kb(c.high_water - plat)}"
        )
    print(f"  ratio of the 32-bit high-water to the 48 KB target {wasm.high_water / HEAP_TARGET:.2f}")
    print(
        f"  ratio 64-bit/32-bit: high-water {unix.high_water / wasm.high_water:.2f}; agent's share above the "
        f"platform layer {(unix.high_water - plat64) / (wasm.high_water - plat32):.2f}; platform layer "
        f"{plat64 / plat32:.2f}"
    )

    print("\n3. smallest -X heapsize the unix-lane full cycle completes under (no MemoryError):")
    passed_kb = heap_kb(UNIX_HEAP)
    if unix.ok:
        smallest, runs = smallest_heap(work, unix.high_water, passed_kb)
        if smallest is None:
            print(f"  not found: no answer held on a second run; {len(runs)} runs")
        else:
            print(
                f"  smallest heap: {smallest}k ({len(runs)} runs of the cycle, {SEARCH_STEP_KB}k steps, the last a "
                f"repeat); ratio to the 64-bit high-water {smallest * KB / unix.high_water:.2f}; to the lane's "
                f"default {UNIX_HEAP} {smallest / passed_kb:.2f}"
            )
            print(
                "  runs near the edge differ from run to run (keys, timing, where collections fall): a cap "
                "needs a margin above this"
            )
    else:
        print(f"  not searched: the cycle did not complete at {UNIX_HEAP}")

    print("\n4. TLS (unix port, Mbed TLS on the C heap, counted by an LD_PRELOAD malloc interposer):")
    so = build_interposer(work)
    tls = tls_cost(work, so) if so else None
    if tls:
        print(
            f"  one mutual-TLS handshake + MQTT CONNECT (P-256 certificates): C-heap peak {tls.peak:,d} bytes = "
            f"{kb(tls.peak)}; live while connected {tls.live:,d} = {kb(tls.live)}; SUBSCRIBE + 2,000-byte "
            f"PUBLISH and its echo add {tls.traffic_peak:,d} at their peak; after close {tls.after_close:,d} "
            f"(one-time state, not per session)"
        )
        print(
            f"  GC heap on the unix lane: {tls.gc_before:,d} bytes before; {tls.gc_connected:,d} while connected "
            f"(+{tls.gc_connected - tls.gc_before:,d} for the socket, its TLS wrapper, the stream and the client)"
        )

    print()
    estimates(wasm.high_water, tls)
    flash_ok, heap_ok = mpy <= FLASH_TARGET, wasm.ok and wasm.high_water <= HEAP_TARGET
    print(f"\ntargets: flash {'met' if flash_ok else 'MISSED'}; 32-bit heap {'met' if heap_ok else 'MISSED'}")
    return 0 if flash_ok and heap_ok else 1


if __name__ == "__main__":
    sys.exit(main())
