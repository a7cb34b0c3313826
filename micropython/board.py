# The platform layer on a real board (ESP32, Raspberry Pi Pico W) and on MicroPython's unix port:
# the only module that touches the hardware. Everything else reaches sockets, TLS, the clock, the
# RNG and reset through these functions. The tests run this very file on the unix port (tests/
# boardkit.py); they replace only what that port lacks (an RTC, reset, power cuts).
import time
import os

NAME = "board"
# Ports differ in their epoch (2000 on older ports, 1970 since 1.22 on most); the agent wants Unix time.
_EPOCH = 946684800 if time.gmtime(0)[0] == 2000 else 0
TLS_TIMEOUT_S = 15  # TCP connect and the whole TLS handshake, each
READ_SIZE = 1024


def now():
    # Whole seconds everywhere: the unix port's time.time() is a float, and a float report_id or
    # token is refused by the cloud.
    return int(time.time()) + _EPOCH


def set_time(epoch):
    import machine
    t = time.gmtime(int(epoch) - _EPOCH)
    machine.RTC().datetime((t[0], t[1], t[2], t[6] + 1, t[3], t[4], t[5], 0))


def random(n):
    return os.urandom(n)


class Stream:
    """A verified TLS connection as the agent's MQTT client uses it: write() queues, read() sends
    what is queued first and then waits for bytes (None after timeout_ms, b"" at the end)."""

    def __init__(self, sock):
        import asyncio
        self.s = sock
        self.a = asyncio.StreamReader(sock)
        self.closed = False

    def write(self, b):
        if self.closed:
            raise OSError(9)  # EBADF: the MQTT client treats it as a lost session
        self.a.write(b)

    async def read(self, timeout_ms=None):
        import asyncio
        if self.closed:
            return b""
        # MicroPython's Stream.write() only queues what the socket did not take, and nothing sends
        # the queue but drain(): without this, a request waiting for its answer is never sent.
        await self.a.drain()
        try:
            if timeout_ms is None:
                return await self.a.read(READ_SIZE)
            return await asyncio.wait_for_ms(self.a.read(READ_SIZE), timeout_ms)
        except asyncio.TimeoutError:
            return None

    def close(self):
        # asyncio's Stream.close() leaves the socket (and its TLS session) open: close it here, once,
        # and let go of it, so a caller that keeps this object does not keep ~4 KB of socket with it.
        if not self.closed:
            self.closed = True
            try:
                self.s.close()
            except OSError:
                pass
            self.s = self.a = None


def _ders(pem):
    """Every PEM block's DER, in order: a CA bundle holds several certificates."""
    import binascii
    out, cur = [], None
    for line in pem.split("\n"):
        line = line.strip()
        if line.startswith("-----BEGIN"):
            cur = []
        elif line.startswith("-----END"):
            if cur is not None:
                out.append(binascii.a2b_base64("".join(cur)))
            cur = None
        elif cur is not None and line:
            cur.append(line)
    if not out:
        raise ValueError("no PEM block found")
    return out


async def tls(host, port, ca, cert, key):
    """A TLS stream whose server was verified against `ca` (PEM, one or more certificates) for `host`,
    presenting `cert`/`key` (PEM). The handshake runs here, blocking, under TLS_TIMEOUT_S, so the
    caller never holds an unverified connection and never sends a byte before verification."""
    import socket
    import ssl
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.verify_mode = ssl.CERT_REQUIRED  # the default on some ports is CERT_NONE
    for der in _ders(ca):
        ctx.load_verify_locations(cadata=der)  # each call adds one: a bundle loads whole
    ctx.load_cert_chain(_ders(cert)[0], _ders(key)[0])  # Mbed TLS on the ports parses DER only
    ai = socket.getaddrinfo(host, port, 0, socket.SOCK_STREAM)[0]
    s = socket.socket(ai[0], socket.SOCK_STREAM, ai[2])
    try:
        s.settimeout(TLS_TIMEOUT_S)  # a server that accepts TCP but never answers must not hang the board
        s.connect(ai[-1])
        ss = ctx.wrap_socket(s, server_hostname=host)  # the handshake: verification happens here
    except BaseException:
        s.close()
        raise
    ss.setblocking(False)
    return Stream(ss)


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
    """Where the tests cut the power; nothing on a board."""


def reset():
    """Hard reset. On a port without machine.reset() this raises; the agent then restarts in-process
    (loader.Restart) and never carries on as if the reset had happened."""
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
