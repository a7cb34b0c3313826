# A minimal MQTT 3.1.1 client for MicroPython: CONNECT, PUBLISH (QoS 0/1), SUBSCRIBE, keepalive.
# It talks to a stream with `write(bytes)` and `await read(timeout_ms)` (bytes; b"" at end; None when
# nothing came in time) from the platform layer (board.tls). Reconnecting is the caller's job: any
# MQTTError means the session is gone. Incoming lengths are bounded because the broker's bytes are
# hostile input on a 100 kB heap.
import time

MAX_PACKET = 40 * 1024


class MQTTError(Exception):
    pass


class Refused(Exception):
    """The cloud answered a request on its .../rejected topic."""


def _varlen(n):
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        out.append(b | 0x80 if n else b)
        if not n:
            return out


def _str(s):
    b = s.encode() if isinstance(s, str) else s
    return bytes((len(b) >> 8, len(b) & 0xFF)) + b


class Client:
    def __init__(self, stream, client_id, keepalive=60):
        self.s = stream
        self.client_id = client_id
        self.keepalive = keepalive
        self.buf = b""
        self.pid = 0
        self.inbox = []
        self.tx = self.rx = time.ticks_ms()
        self.ping_out = False

    def _parse(self):
        b = self.buf
        n, shift, i = 0, 0, 1
        while True:
            if i >= len(b):
                return None
            c = b[i]
            n |= (c & 0x7F) << shift
            i += 1
            if not c & 0x80:
                break
            shift += 7
            if shift > 21:
                raise MQTTError("malformed remaining length")
        if n > MAX_PACKET:
            raise MQTTError("packet of %d bytes is over the limit" % n)
        if len(b) < i + n:
            return None
        p = b[i:i + n]
        self.buf = b[i + n:]
        return b[0], p

    async def _packet(self, timeout_ms):
        """The next packet, or None when none completes within timeout_ms."""
        t0 = time.ticks_ms()
        while True:
            try:
                p = self._parse()
            except MemoryError:
                raise self._lost()
            if p:
                self.rx = time.ticks_ms()
                self.ping_out = False
                return p
            left = timeout_ms - time.ticks_diff(time.ticks_ms(), t0)
            if left <= 0:
                return None
            chunk = await self.s.read(left)
            if chunk is None:
                return None
            if not chunk:
                raise MQTTError("connection closed")
            try:
                self.buf += chunk
            except MemoryError:
                raise self._lost()

    def _lost(self):
        # A chunk or packet was lost, so the byte stream no longer lines up with packets: end the session.
        self.buf = b""
        return MQTTError("out of memory while receiving")

    def _send(self, head, body):
        self.s.write(bytes((head,)) + _varlen(len(body)) + body)
        self.tx = time.ticks_ms()

    async def connect(self, timeout_ms=15000):
        body = _str("MQTT") + bytes((4, 0x02, self.keepalive >> 8, self.keepalive & 0xFF)) + _str(self.client_id)
        self._send(0x10, body)
        p = await self._packet(timeout_ms)
        if not p:
            raise MQTTError("no CONNACK")
        if p[0] != 0x20 or len(p[1]) != 2:
            raise MQTTError("expected CONNACK")
        if p[1][1]:
            raise MQTTError("connection refused, code %d" % p[1][1])

    def _next_pid(self):
        self.pid = self.pid % 65535 + 1
        return self.pid

    async def publish(self, topic, payload, qos=0, timeout_ms=15000):
        if isinstance(payload, str):
            payload = payload.encode()
        body = _str(topic)
        pid = 0
        if qos:
            pid = self._next_pid()
            body += bytes((pid >> 8, pid & 0xFF))
        self._send(0x30 | (qos << 1), body + payload)
        if qos:
            await self._wait_for(0x40, pid, timeout_ms)

    async def subscribe(self, topic, qos=0, timeout_ms=15000):
        pid = self._next_pid()
        self._send(0x82, bytes((pid >> 8, pid & 0xFF)) + _str(topic) + bytes((qos,)))
        data = await self._wait_for(0x90, pid, timeout_ms)
        if len(data) < 3 or data[2] >= 0x80:
            raise MQTTError("subscription to %s refused" % topic)
        return data[2]

    async def _wait_for(self, kind, pid, timeout_ms):
        # Publishes that arrive meanwhile are kept for msg().
        t0 = time.ticks_ms()
        while True:
            left = timeout_ms - time.ticks_diff(time.ticks_ms(), t0)
            p = await self._packet(left) if left > 0 else None
            if not p:
                raise MQTTError("no acknowledgement within %d ms" % timeout_ms)
            head, data = p
            if head & 0xF0 == 0x30:
                self._incoming(head, data)
            elif head & 0xF0 == kind and len(data) >= 2 and (data[0] << 8 | data[1]) == pid:
                return data

    def _incoming(self, head, data):
        if len(data) < 2:
            raise MQTTError("malformed PUBLISH")
        n = data[0] << 8 | data[1]
        topic = data[2:2 + n].decode()
        rest = data[2 + n:]
        if head >> 1 & 3:
            if len(rest) < 2:
                raise MQTTError("malformed PUBLISH")
            self._send(0x40, rest[:2])
            rest = rest[2:]
        if len(self.inbox) < 32:  # a flood is dropped, not stored
            self.inbox.append((topic, rest))

    async def msg(self, timeout_ms):
        """(topic, payload) of the next message, or None after timeout_ms; keeps the session alive."""
        t0 = time.ticks_ms()
        while not self.inbox:
            self._keepalive()
            left = min(timeout_ms - time.ticks_diff(time.ticks_ms(), t0), self.keepalive * 500)
            if left <= 0:
                return None
            p = await self._packet(left)
            if p and p[0] & 0xF0 == 0x30:
                self._incoming(p[0], p[1])
        return self.inbox.pop(0)

    def _keepalive(self):
        now = time.ticks_ms()
        if self.ping_out and time.ticks_diff(now, self.rx) > self.keepalive * 1500:
            raise MQTTError("no answer to PINGREQ")
        if time.ticks_diff(now, self.tx) >= self.keepalive * 500:
            self._send(0xC0, b"")
            self.ping_out = True

    def disconnect(self):
        try:
            self._send(0xE0, b"")
        finally:
            self.s.close()

    def close(self):
        self.s.close()
