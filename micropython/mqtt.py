# A minimal MQTT 3.1.1 client for MicroPython: CONNECT, PUBLISH (QoS 0/1), SUBSCRIBE, PINGREQ.
# It talks to a stream with `write(bytes)` and `await read()` (bytes, b"" at end), which the platform
# layer provides: asyncio streams over ssl on a board, Node's tls in the test harness. No typing,
# dataclasses or enum; packets are built in small bytearrays.

class MQTTError(Exception):
    pass


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
        self.buf = bytearray()
        self.pid = 0
        self.inbox = []

    async def _read(self, n):
        while len(self.buf) < n:
            chunk = await self.s.read()
            if not chunk:
                raise MQTTError("connection closed")
            self.buf.extend(bytes(chunk))
        out = bytes(self.buf[:n])
        self.buf = self.buf[n:]
        return out

    async def _packet(self):
        head = (await self._read(1))[0]
        n, shift = 0, 0
        while True:
            b = (await self._read(1))[0]
            n |= (b & 0x7F) << shift
            shift += 7
            if not b & 0x80:
                break
            if shift > 21:
                raise MQTTError("malformed remaining length")
        return head, await self._read(n)

    def _send(self, head, body):
        self.s.write(bytes((head,)) + _varlen(len(body)) + body)

    async def connect(self):
        body = _str("MQTT") + bytes((4, 0x02)) + bytes((self.keepalive >> 8, self.keepalive & 0xFF)) + _str(self.client_id)
        self._send(0x10, body)
        head, data = await self._packet()
        if head != 0x20 or len(data) != 2:
            raise MQTTError("expected CONNACK")
        if data[1]:
            raise MQTTError("connection refused, code %d" % data[1])

    def _next_pid(self):
        self.pid = self.pid % 65535 + 1
        return self.pid

    async def publish(self, topic, payload, qos=0):
        if isinstance(payload, str):
            payload = payload.encode()
        body = _str(topic)
        pid = 0
        if qos:
            pid = self._next_pid()
            body += bytes((pid >> 8, pid & 0xFF))
        self._send(0x30 | (qos << 1), body + payload)
        if qos:
            await self._wait_for(0x40, pid)

    async def subscribe(self, topic, qos=0):
        pid = self._next_pid()
        self._send(0x82, bytes((pid >> 8, pid & 0xFF)) + _str(topic) + bytes((qos,)))
        data = await self._wait_for(0x90, pid)
        if data[2] >= 0x80:
            raise MQTTError("subscription refused")
        return data[2]

    async def _wait_for(self, kind, pid):
        # Publishes that arrive meanwhile are kept for wait_msg().
        while True:
            head, data = await self._packet()
            if head & 0xF0 == 0x30:
                self._incoming(head, data)
            elif head & 0xF0 == kind and (data[0] << 8 | data[1]) == pid:
                return data

    def _incoming(self, head, data):
        n = data[0] << 8 | data[1]
        topic = data[2:2 + n].decode()
        rest = data[2 + n:]
        qos = head >> 1 & 3
        if qos:
            pid = rest[0] << 8 | rest[1]
            rest = rest[2:]
            self._send(0x40, bytes((pid >> 8, pid & 0xFF)))
        self.inbox.append((topic, bytes(rest)))

    async def wait_msg(self):
        while not self.inbox:
            head, data = await self._packet()
            if head & 0xF0 == 0x30:
                self._incoming(head, data)
        return self.inbox.pop(0)

    async def ping(self):
        self._send(0xC0, b"")

    def disconnect(self):
        self._send(0xE0, b"")
        self.s.close()
