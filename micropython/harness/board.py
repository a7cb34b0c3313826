# The platform layer for the test harness: the same functions as micropython/board.py, backed by
# Node (harness/run.mjs). The RTC starts at 2000-01-01 like a board without a battery-backed clock,
# so the agent's clock gate is exercised for real.
import js
import time
import os

EPOCH_AT_BOOT = 946684800  # what an unset RTC reads: 2000-01-01T00:00:00Z
_boot = time.ticks_ms()
_offset = EPOCH_AT_BOOT
NAME = "harness"


def now():
    return _offset + time.ticks_diff(time.ticks_ms(), _boot) // 1000


def set_time(epoch):
    global _offset
    _offset = int(epoch) - time.ticks_diff(time.ticks_ms(), _boot) // 1000


def random(n):
    return bytes.fromhex(js.randomBytes(n))


class Stream:
    def __init__(self, s):
        self.s = s

    def write(self, b):
        self.s.write(b.hex())

    async def read(self, timeout_ms=None):
        r = await self.s.read(timeout_ms, 1024)  # as much as a board's socket read takes
        if r is None:
            return None
        return bytes.fromhex(r)

    def close(self):
        self.s.close()


async def tls(host, port, ca, cert, key):
    """A TLS 1.2+ stream that verified the server against `ca` and presented `cert`/`key` (PEM text)."""
    return Stream(await js.tlsOpen(host, port, ca, cert, key))


async def udp_query(host, port, packet, timeout_ms):
    r = await js.udpQuery(host, port, packet.hex(), timeout_ms)
    return None if r is None else bytes.fromhex(r)


def sync():
    """Make what was written to flash durable (the harness mirrors it to the host directory)."""
    js.flashSync()


def cut(name):
    """A named point where tests cut the power (harness/run.mjs)."""
    js.powerCut(name)


def reset():
    js.boardReset()


async def live_heap():
    """Bytes the program really holds (see liveHeap in run.mjs for why not gc.collect() here)."""
    return await js.liveHeap()


def free_heap():
    import gc
    return gc.mem_free()


def rssi():
    return None  # no Wi-Fi in the harness


def net_stats():
    return None
