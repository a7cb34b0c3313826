"""Footprint of the MicroPython board agent.

1. Flash: every file a board carries (main, loader, board and the app modules) compiled with
   mpy-cross; total `.mpy` size next to the `.py` sources it came from. Target: <= 64 KB.
2. Heap: the board boots from `.mpy` files under the real MicroPython interpreter (WebAssembly, in
   Node) against the local cloud and runs a full cycle: SNTP, provisioning by claim (key and CSR made
   on the board), a Defender report, a signed OTA update over an MQTT stream (download, verify, unpack,
   reset, self-test, commit) and a certificate rotation. With `heap_probe` on, the agent collects
   garbage at each step and after every stream block and prints the live heap (gc.mem_alloc) when it
   grows (collected from the top of the JS stack; see liveHeap in harness/run.mjs); the figure is the
   highest of those, next to the bare interpreter and the harness's platform layer measured in the same
   run. TLS runs in Node, so TLS buffers are excluded as the target asks. Target: <= 48 KB.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from boardkit import APP_MODULES, MP, THING, MpWorld, mpy_cross  # noqa: E402
from mpkit import HARNESS  # noqa: E402

FLASH_TARGET = 64 * 1024
HEAP_TARGET = 48 * 1024


def flash_size(work: Path) -> tuple[int, int]:
    files = ["main", "loader", "board", *APP_MODULES]
    total_py = total_mpy = 0
    for m in files:
        out = work / f"{m}.mpy"
        subprocess.run([mpy_cross(), "-o", str(out), str(MP / f"{m}.py")], check=True, timeout=60)
        py, mpy = (MP / f"{m}.py").stat().st_size, out.stat().st_size
        total_py += py
        total_mpy += mpy
        print(f"  {m + '.mpy':16} {mpy:7,d} bytes  (from {py:,d} bytes of source)")
    return total_py, total_mpy


def baseline_heap(work: Path) -> tuple[int, int]:
    """Live heap of the bare interpreter, and with the harness's platform layer imported: board.py on
    Node's bridge plus json, asyncio, hashlib and binascii. On a board most of that is C or frozen code
    that takes no heap (binascii is even pure Python in the WebAssembly build), so the raw high-water,
    which the target is checked against, overstates a board's figure by about this much."""
    script = work / "bare.py"
    script.write_text("import js\nprint(await js.liveHeap())\nimport board, json, asyncio, hashlib, binascii, os\n"
                      "print(await js.liveHeap())\n")
    r = subprocess.run(["node", "--expose-gc", str(HARNESS / "run.mjs"), str(script)], capture_output=True, text=True, timeout=60,
                       check=True)
    bare, platform = (int(x) for x in r.stdout.split()[-2:])
    return bare, platform


def full_cycle(work: Path) -> tuple[int, str]:
    w = MpWorld(work / "cycle", config={"heap_probe": True}, mpy=True)
    try:
        b = w.boot()
        b.wait_for(r"defender report \d+ accepted", 120)
        data = w.release("1.1.0")
        w.run_job("bench-ota", w.ota_doc("1.1.0", data), "SUCCEEDED", timeout=180)
        w.run_job("bench-rotate", {"operation": "rotate-certificate"}, "SUCCEEDED", timeout=120)
        b.wait_for(r"rotation: SUCCEEDED", 30)
        text = b.text()
    finally:
        w.close()
    marks = [int(x) for x in re.findall(r"heap high-water (\d+)", text)]
    assert marks, text[-3000:]
    assert f"connected as {THING}" in text
    return max(marks), f"{len(data):,d}-byte release, {text.count('### boot')} boots"


def main() -> int:
    if not (HARNESS / "node_modules" / "@micropython").is_dir():
        subprocess.run(["npm", "ci", "--silent", "--no-audit", "--no-fund"], cwd=HARNESS, check=True, timeout=300)
    work = Path(tempfile.mkdtemp(prefix="mp-footprint-"))
    print("flash (.mpy built by mpy-cross):")
    py, mpy = flash_size(work)
    print(f"total .mpy {mpy:,d} bytes = {mpy / 1024:.1f} KB; ratio to the .py sources {mpy / py:.2f}; "
          f"ratio to the 64 KB target {mpy / FLASH_TARGET:.2f}")
    bare, platform = baseline_heap(work)
    hw, what = full_cycle(work)
    net = hw - platform
    print(f"heap, live bytes after a collection: bare interpreter {bare:,d}; with the harness platform layer "
          f"{platform:,d}; full cycle ({what}) high-water {hw:,d} = {hw / 1024:.1f} KB")
    print(f"ratio of the high-water to the 48 KB target {hw / HEAP_TARGET:.2f}; to the bare interpreter "
          f"{hw / bare:.1f}; the agent's share above the platform layer {net:,d} bytes = {net / 1024:.1f} KB")
    return 0 if mpy <= FLASH_TARGET and hw <= HEAP_TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
