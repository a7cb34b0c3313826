# The tests' thin layer over the real board.py on MicroPython's unix port: only what that port lacks.
#   RTC      virtual, starting at 2000-01-01 on every boot like a board without a backup battery, so
#            the agent's clock gate runs for real (board.set_time needs machine.RTC, absent here)
#   reset    SIGKILL of this process; the test (tests/boardkit.py) boots it again. Never sys.exit():
#            that runs `finally` blocks, which a reset or a power cut does not
#   cuts     power cuts at named points (board.cut) and at every sweep point (each board.sync() and
#            named point, numbered across boots in FLASH.syncs), as SIGKILL too
# TLS, sockets, SNTP over UDP, randomness, files and the heap stay the real board.py's.
import os
import time

EPOCH_AT_BOOT = 946684800  # what an unset RTC reads: 2000-01-01T00:00:00Z
_boot = time.ticks_ms()
_offset = EPOCH_AT_BOOT
P = {}
_watched = []


def now():
    return _offset + time.ticks_diff(time.ticks_ms(), _boot) // 1000


def set_time(epoch):
    global _offset
    _offset = int(epoch) - time.ticks_diff(time.ticks_ms(), _boot) // 1000


def _kill(marker):
    print(marker)
    os.system("kill -9 $PPID")  # the shell's parent is this interpreter
    while True:  # not reached; never return into the agent
        time.sleep(1)


def _read(p):
    try:
        with open(p, "rb") as f:
            return f.read()
    except OSError:
        return None


def _cut(name, what=""):
    mark = P["flash"] + ".cut-" + name
    if _read(mark) is not None:  # each named cut happens once per flash
        return
    with open(mark, "w"):
        pass
    _kill("### power cut at " + name + what)


def _sweep(what):
    n = P.get("cut_sync")
    if n is None:
        return
    f = P["flash"] + ".syncs"
    k = int(_read(f) or b"0") + 1
    with open(f, "w") as fh:
        fh.write(str(k))
    if k == n:
        _cut("sync-%d" % k, " (after %s)" % what)


def sync():
    for p, was in _watched:
        if _read(p) != was:
            _cut("change", " (%s changed)" % p)
    _sweep("sync")


def cut(name):
    if name == P.get("cut"):
        _cut(name)
    _sweep(name)


def reset():
    _kill("### reset")


def install(board, params):
    """Give `board` (the real module) what the unix port lacks; params come from the test."""
    P.update(params)
    board.NAME = "unix"
    board.now = now
    board.set_time = set_time
    board.sync = sync
    board.cut = cut
    if P.get("reset", "kill") == "kill":
        board.reset = reset  # else: the real board.reset(), which raises here (no machine.reset)
    for p in P.get("cut_on_change", ()):
        _watched.append((p, _read(p)))
