"""The wire codec of AWS IoT secure tunneling (local proxy protocol v2 and v3), stdlib only.

Checked against aws-samples/aws-iot-securetunneling-localproxy at commit 8a71618 (docs/V2WebSocketProtocolGuide.md,
docs/V3WebSocketProtocolGuide.md, resources/Message.proto, last changed in 6716623 "Support for v3 protocol"):

- Framing ("Tunneling message frames" in both guides): every message is a 2-byte unsigned big-endian length,
  then that many bytes of a protobuf ``Message``. Tunnel messages are only loosely coupled to WebSocket
  frames: one WebSocket frame may carry several messages, or a slice of one that started in an earlier frame
  and ends in a later one, and the service may re-aggregate what a peer sent. Hence ``Deframer`` treats the
  WebSocket payloads as one byte stream and never assumes alignment.
- Limits: a message's payload "may not contain more than 63kb (64512 bytes)" (both guides) -> ``MAX_PAYLOAD``.
  A WebSocket frame carries at most 131076 bytes in either direction (the subprotocol sections of both
  guides), which is 2 x (64 KiB + 2). The reference proxy sizes its parse buffer at 64 KiB
  (src/ProxySettings.cpp, ``DEFAULT_MESSAGE_MAX_SIZE``) but the 2-byte prefix cannot express more than
  65535, so that is ``MAX_MESSAGE``: any length the prefix can carry is structurally acceptable and the
  field limits below do the real bounding.
- Schema: v3 added ``connectionId`` (field 7) and types CONNECTION_START/CONNECTION_RESET to the v2 schema; with
  proto3's "defaults are not sent" a v3 message with connectionId 0 is byte-for-byte a v2 message, so one codec
  serves both subprotocols.
- The guides say a type must be non-zero and a stream id of 0 is invalid for stream messages; those are rules
  of the conversation, not of the encoding, so the codec leaves them to agent.tunneling.protocol and keeps
  unknown type numbers (proto3 enums are open) for the ``ignorable`` decision there.
- The guides forbid *sending* fields outside the schema. Received unknown fields are still skipped, as proto3
  parsers do, so that a later schema revision from the service does not break older agents.

Bounds this module adds (the guides name none), chosen so a hostile peer cannot make one message cost more
than its bytes: a service id is at most 128 characters (the AWS API's DestinationConfig.services limit and
src/InputValidation.h ``MAX_SERVICE_ID_LENGTH`` in the reference proxy) and a SERVICE_IDS message lists at most
64 of them. ``decode`` is stricter than the protobuf runtime (wrong wire types, out-of-range ints and groups
are errors rather than unknown fields or silent truncation): a peer that sends them is broken, and the
tunnel should end instead of guessing. ``encode`` enforces the same bounds, so the agent never sends what
it would itself reject.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass


class MessageType(enum.IntEnum):
    UNKNOWN = 0
    DATA = 1
    STREAM_START = 2
    STREAM_RESET = 3
    SESSION_RESET = 4
    SERVICE_IDS = 5
    CONNECTION_START = 6
    CONNECTION_RESET = 7


MAX_PAYLOAD = 63 * 1024  # 64512: "may not contain more than 63kb (64512 bytes)" (both protocol guides)
MAX_MESSAGE = 0xFFFF  # what the 2-byte big-endian length prefix can express
MAX_SERVICE_ID = 128  # characters: AWS API DestinationConfig.services; reference src/InputValidation.h
MAX_SERVICE_IDS = 64  # ids in one SERVICE_IDS message: generous, but bounded

_U64 = (1 << 64) - 1
_I32_MIN = -(1 << 31)
_I32_MAX = (1 << 31) - 1
_U32_MAX = (1 << 32) - 1
_MAX_UTF8 = 4 * MAX_SERVICE_ID  # no string of MAX_SERVICE_ID characters is longer in UTF-8

# Tags (field number << 3 | wire type) of the known fields, each with its only accepted wire type.
_T_TYPE = 0x08  # 1, varint
_T_STREAM = 0x10  # 2, varint
_T_IGNORABLE = 0x18  # 3, varint
_T_PAYLOAD = 0x22  # 4, length-delimited
_T_SERVICE = 0x2A  # 5, length-delimited
_T_AVAILABLE = 0x32  # 6, length-delimited
_T_CONNECTION = 0x38  # 7, varint
_FIELD_NAMES = ("", "type", "streamId", "ignorable", "payload", "serviceId", "availableServiceIds", "connectionId")

_TYPES: dict[int, MessageType] = {t.value: t for t in MessageType}
_ONE_BYTE = tuple(bytes((i,)) for i in range(0x80))  # varints below 128: no loop, no allocation


class FrameError(ValueError):
    """Malformed or oversized tunnel data. The text names what and where, never the bytes, so it can be logged."""


@dataclass(frozen=True, slots=True)
class Message:
    """One tunnel message. Field defaults are proto3's, so an unset field and a default one are the same thing."""

    type: int  # a MessageType; decode keeps numbers it does not know as plain ints
    stream_id: int = 0
    ignorable: bool = False
    payload: bytes = b""
    service_id: str = ""
    available_service_ids: tuple[str, ...] = ()
    connection_id: int = 0


def _varint(v: int) -> bytes:
    if v < 0x80:
        return _ONE_BYTE[v]
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def _int32(v: int, name: str) -> bytes:
    """int32 on the wire: negatives are sign-extended to 64 bits (10 bytes), as protobuf does."""
    if not _I32_MIN <= v <= _I32_MAX:
        raise FrameError(f"{name} {v} is outside int32")
    return _varint(v & _U64)


def _string(s: str, name: str) -> bytes:
    if len(s) > MAX_SERVICE_ID:
        raise FrameError(f"{name} of {len(s)} characters (at most {MAX_SERVICE_ID})")
    try:
        b = s.encode("utf-8")
    except UnicodeEncodeError:
        raise FrameError(f"{name} cannot be encoded as UTF-8") from None
    return _varint(len(b)) + b


def _parts(msg: Message) -> list[bytes]:
    """The encoding as pieces, led by an empty slot for frame's length prefix, so the payload is copied once."""
    parts: list[bytes] = [b""]
    if msg.type:
        parts += (b"\x08", _int32(msg.type, "type"))
    if msg.stream_id:
        parts += (b"\x10", _int32(msg.stream_id, "stream id"))
    if msg.ignorable:
        parts.append(b"\x18\x01")
    payload = msg.payload
    if payload:
        n = len(payload)
        if n > MAX_PAYLOAD:
            raise FrameError(f"payload of {n} bytes (at most {MAX_PAYLOAD})")
        parts += (b"\x22", _varint(n), payload)
    if msg.service_id:
        parts += (b"\x2a", _string(msg.service_id, "service id"))
    ids = msg.available_service_ids
    if ids:
        if len(ids) > MAX_SERVICE_IDS:
            raise FrameError(f"{len(ids)} available service ids (at most {MAX_SERVICE_IDS})")
        for s in ids:  # repeated: every element is written, empty ones too
            parts += (b"\x32", _string(s, "available service id"))
    c = msg.connection_id
    if c:
        if not 0 <= c <= _U32_MAX:
            raise FrameError(f"connection id {c} is outside uint32")
        parts += (b"\x38", _varint(c))
    return parts


def _checked(parts: list[bytes]) -> int:
    n = sum(map(len, parts))
    if n > MAX_MESSAGE:
        raise FrameError(f"message of {n} bytes (at most {MAX_MESSAGE})")
    return n


def encode(msg: Message) -> bytes:
    """The protobuf encoding, as the reference runtime writes it: fields in number order, defaults left out."""
    parts = _parts(msg)
    _checked(parts)
    return b"".join(parts)


def frame(msg: Message) -> bytes:
    """One message ready for the WebSocket: the 2-byte big-endian length, then ``encode(msg)``.

    A message with every field at its default encodes to nothing; its zero length is refused, as Deframer
    refuses it, since such a message has type UNKNOWN (the guides require a non-zero type).
    """
    parts = _parts(msg)
    n = _checked(parts)
    if not n:
        raise FrameError("an empty message (type UNKNOWN, nothing set)")
    parts[0] = n.to_bytes(2, "big")
    return b"".join(parts)


_Buf = bytes | bytearray | memoryview


def _read_varint(buf: _Buf, pos: int, end: int, limit: int, what: str) -> tuple[int, int]:
    """A varint of at most ``limit`` bytes. Tags and lengths get 5 (they are 32-bit, as in upb), values 10."""
    result = 0
    shift = 0
    stop = pos + limit
    while True:
        if pos >= end:
            raise FrameError(f"truncated {what} at offset {pos}")
        b = buf[pos]
        pos += 1
        result |= (b & 0x7F) << shift
        if b < 0x80:
            break
        if pos >= stop:
            raise FrameError(f"{what} longer than {limit} bytes at offset {pos}")
        shift += 7
    if result > (_U64 if limit > 5 else _U32_MAX):
        raise FrameError(f"{what} overflows at offset {pos}")
    return result, pos


def _as_int32(v: int, name: str) -> int:
    if v > _I32_MAX:
        v -= 1 << 64  # a sign-extended negative; anything else stays out of range
        if v < _I32_MIN:
            raise FrameError(f"{name} outside int32")
    return v


def _decode(buf: _Buf, pos: int, end: int) -> Message:
    """Parse ``buf[pos:end]``. One pass; the payload is sliced out once, never walked byte by byte."""
    mtype = 0
    stream_id = 0
    ignorable = False
    payload = b""
    service_id = ""
    available: list[str] = []
    connection_id = 0
    while pos < end:
        tag = buf[pos]
        if tag < 0x80:
            pos += 1
        else:
            tag, pos = _read_varint(buf, pos, end, 5, "tag")
        wire = tag & 7
        if wire == 0:
            if pos < end and buf[pos] < 0x80:  # the common one-byte value
                v = buf[pos]
                pos += 1
            else:
                v, pos = _read_varint(buf, pos, end, 10, "varint")
            if tag == _T_TYPE:
                mtype = _as_int32(v, "type")
            elif tag == _T_STREAM:
                stream_id = _as_int32(v, "stream id")
            elif tag == _T_IGNORABLE:
                ignorable = v != 0  # protobuf reads any non-zero bool as true
            elif tag == _T_CONNECTION:
                if v > _U32_MAX:
                    raise FrameError("connection id outside uint32")
                connection_id = v
            else:
                _unknown(tag)
        elif wire == 2:
            if pos < end and buf[pos] < 0x80:
                n = buf[pos]
                pos += 1
            else:
                n, pos = _read_varint(buf, pos, end, 5, "length")
            nxt = pos + n
            if tag == _T_PAYLOAD:
                if n > MAX_PAYLOAD:
                    raise FrameError(f"payload of {n} bytes (at most {MAX_PAYLOAD})")
                if nxt > end:
                    raise FrameError(f"truncated payload at offset {pos}")
                payload = bytes(buf[pos:nxt])
            elif tag in (_T_SERVICE, _T_AVAILABLE):
                if n > _MAX_UTF8:
                    raise FrameError(f"service id of {n} bytes (at most {MAX_SERVICE_ID} characters)")
                if nxt > end:
                    raise FrameError(f"truncated service id at offset {pos}")
                try:
                    s = str(buf[pos:nxt], "utf-8")
                except UnicodeDecodeError:
                    raise FrameError(f"service id at offset {pos} is not UTF-8") from None
                if len(s) > MAX_SERVICE_ID:
                    raise FrameError(f"service id of {len(s)} characters (at most {MAX_SERVICE_ID})")
                if tag == _T_SERVICE:
                    service_id = s
                else:
                    if len(available) == MAX_SERVICE_IDS:
                        raise FrameError(f"more than {MAX_SERVICE_IDS} available service ids")
                    available.append(s)
            else:
                _unknown(tag)
                if nxt > end:
                    raise FrameError(f"truncated field {tag >> 3} at offset {pos}")
            pos = nxt
        elif wire in (1, 5):
            _unknown(tag)
            pos += 8 if wire == 1 else 4
            if pos > end:
                raise FrameError(f"truncated field {tag >> 3}")
        elif wire in (3, 4):
            raise FrameError(f"group wire type {wire} (field {tag >> 3})")
        else:
            raise FrameError(f"invalid wire type {wire} (field {tag >> 3})")
    return Message(
        _TYPES.get(mtype, mtype),
        stream_id,
        ignorable,
        payload,
        service_id,
        tuple(available),
        connection_id,
    )


def _unknown(tag: int) -> None:
    """Allow a field this schema does not have; refuse a known field that came with the wrong wire type."""
    field = tag >> 3
    if field == 0:
        raise FrameError("field number 0")
    if field < len(_FIELD_NAMES):
        raise FrameError(f"{_FIELD_NAMES[field]} with wire type {tag & 7}")


def decode(data: bytes) -> Message:
    """Parse one message (without its length prefix); FrameError for anything a conforming peer would not send."""
    n = len(data)
    if n > MAX_MESSAGE:
        raise FrameError(f"message of {n} bytes (at most {MAX_MESSAGE})")
    return _decode(data, 0, n)


class Deframer:
    """Turns the byte stream of a tunnel's WebSocket payloads into Messages, without doing any I/O itself.

    Messages ignore WebSocket frame boundaries (see the module docstring), so only an incomplete message is
    kept between calls. Whole messages are parsed straight from the caller's chunk, not copied into the buffer
    first. After a FrameError the stream position is lost: every later feed raises again.
    """

    __slots__ = ("_buf", "_failed", "_max_buffer")

    def __init__(self, max_buffer: int = 2 * (MAX_MESSAGE + 2)) -> None:
        if max_buffer < 1:
            raise ValueError("max_buffer must be positive")
        self._buf = bytearray()
        self._max_buffer = max_buffer
        self._failed = False

    @property
    def pending(self) -> int:
        """Bytes held for a message whose rest has not arrived yet."""
        return len(self._buf)

    def feed(self, data: bytes) -> list[Message]:
        """The complete messages that ``data`` finishes, in order. On FrameError none of this chunk's are returned."""
        if self._failed:
            raise FrameError("the stream failed earlier")
        try:
            with memoryview(data) as view:
                return self._feed(view)
        except FrameError:
            self._failed = True
            self._buf.clear()
            raise

    def _length(self, hi: int, lo: int) -> int:
        n = (hi << 8) | lo
        if n == 0:
            raise FrameError("zero-length message")
        if n > MAX_MESSAGE:
            raise FrameError(f"message of {n} bytes (at most {MAX_MESSAGE})")
        return n

    def _keep(self, view: memoryview) -> None:
        if len(self._buf) + len(view) > self._max_buffer:
            raise FrameError(f"more than {self._max_buffer} bytes buffered")
        self._buf += view

    def _feed(self, view: memoryview) -> list[Message]:
        out: list[Message] = []
        end = len(view)
        pos = 0
        buf = self._buf
        if buf:  # finish the message an earlier chunk started
            if len(buf) == 1:
                if not end:
                    return out
                self._keep(view[:1])
                pos = 1
            need = 2 + self._length(buf[0], buf[1]) - len(buf)
            if end - pos < need:
                self._keep(view[pos:])
                return out
            self._keep(view[pos : pos + need])
            pos += need
            with memoryview(buf) as held:
                out.append(_decode(held, 2, len(held)))
            buf.clear()
        while end - pos >= 2:
            n = self._length(view[pos], view[pos + 1])
            nxt = pos + 2 + n
            if nxt > end:
                break
            out.append(_decode(view, pos + 2, nxt))
            pos = nxt
        if pos < end:
            self._keep(view[pos:])
        return out
