# The platform layer on a real board (ESP32, Raspberry Pi Pico W): the only module that differs
# between a board and the test harness (harness/board.py). Everything else reaches the hardware
# through these functions.
import time
import os

NAME = "board"
# Ports differ in their epoch (2000 on older ports, 1970 since 1.22 on most); the agent wants Unix time.
_EPOCH = 946684800 if time.gmtime(0)[0] == 2000 else 0


def now():
    return time.time() + _EPOCH


def set_time(epoch):
    import machine
    t = time.gmtime(int(epoch) - _EPOCH)
    machine.RTC().datetime((t[0], t[1], t[2], t[6] + 1, t[3], t[4], t[5], 0))


def random(n):
    return os.urandom(n)


class Stream:
    def __init__(self, r, w):
        self.r = r
        self.w = w

    def write(self, b):
        self.w.write(b)

    async def read(self, timeout_ms=None):
        import asyncio
        try:
            if timeout_ms is None:
                data = await self.r.read(1024)
            else:
                data = await asyncio.wait_for_ms(self.r.read(1024), timeout_ms)
        except asyncio.TimeoutError:
            return None
        await self.w.drain()
        return data

    def close(self):
        self.w.close()


def _der(pem):
    import binascii
    lines = [l for l in pem.strip().split("\n") if l and not l.startswith("-----")]
    return binascii.a2b_base64("".join(lines).encode())


async def tls(host, port, ca, cert, key):
    """A TLS stream that verifies the server against `ca` and presents `cert`/`key` (PEM text)."""
    import asyncio
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.load_verify_locations(cadata=_der(ca))
    ctx.load_cert_chain(_der(cert), _der(key))
    # A server that accepts TCP but never finishes the handshake must not hang the board.
    r, w = await asyncio.wait_for(asyncio.open_connection(host, port, ssl=ctx, server_hostname=host), 15)
    return Stream(r, w)


async def udp_query(host, port, packet, timeout_ms):
    import socket
    import select
    addr = socket.getaddrinfo(host, port, 0, socket.SOCK_DGRAM)[0][-1]
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        s.setblocking(False)
        s.sendto(packet, addr)
        p = select.poll()
        p.register(s, select.POLLIN)
        if p.poll(timeout_ms):
            return s.recv(64)
        return None
    except OSError:
        return None
    finally:
        s.close()


def sync():
    """LittleFS commits on close and rename; nothing to flush."""


def cut(name):
    """Where the test harness cuts the power; nothing on a board."""


def reset():
    import machine
    machine.reset()


async def live_heap():
    import gc
    gc.collect()
    return gc.mem_alloc()


def free_heap():
    import gc
    return gc.mem_free()


def rssi():
    try:
        import network
        return network.WLAN(network.STA_IF).status("rssi")
    except Exception:
        return None


def net_stats():
    return None  # no MicroPython port exposes interface counters
