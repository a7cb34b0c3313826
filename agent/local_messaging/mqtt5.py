"""The server side of MQTT 5.0 (OASIS Standard, 7 March 2019) for the local endpoint: a decoder and encoders.

Section numbers below are the standard's. Only what the local endpoint serves is implemented: protocol level 5,
QoS 0 and 1, no retained messages, no Topic Aliases, no enhanced authentication (AUTH), no Will messages (a Will
is parsed and validated, then only its flag is kept so the server can refuse it).

Every byte from a client is hostile. The decoder therefore

- bounds each packet by ``max_packet_size`` (the total size, as MQTT's Maximum Packet Size counts it, 3.1.2.11.4)
  as soon as the fixed header is read, before any of the body is buffered, so ``pending`` never exceeds it;
- checks every length field against the bytes actually present before slicing, so no allocation is ever sized
  by a length field alone;
- caps the items a single packet can multiply into Python objects (user properties, topic filters), since a
  256 KiB packet of 5-byte user properties would otherwise become tens of megabytes of tuples and strings;
- rejects whatever the standard calls malformed or a protocol error (reserved bits, QoS 3, non-minimal or
  five-byte Variable Byte Integers, ill-formed UTF-8 and U+0000 in strings, repeated or misplaced properties,
  packet identifier 0, wildcards in topic names, ...), and what this server does not support;
- raises nothing but ``ProtocolError``. Its ``reason_code`` is one the server may send back as is: codes raised
  while decoding CONNECT are valid CONNACK reason codes (3.2.2.2), all others valid DISCONNECT ones (3.14.2.1).

Which reason code: Malformed Packet (0x81) where 1.5/2.x/3.x say "malformed" or the bytes cannot be parsed,
Protocol Error (0x82) where they parse but break a rule, and the specific code where one exists (0x90 topic name
invalid, 0x8F topic filter invalid, 0x94, 0x95, 0x97, 0x99, 0x9A, 0x9B). Unknown property identifiers are
malformed; known properties in the wrong packet are protocol errors.

The encoders build only server-to-client packets, and raise ValueError for arguments the server should never
pass (they are programming errors, not client input). A Reason String is diagnostic text: the encoders make any
string sendable (U+0000, lone surrogates and U+FEFF are replaced, see ``_reason_bytes``) and, given the client's
Maximum Packet Size, shorten or drop it so the packet fits, as 3.4.2.2.2 and its siblings require.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from agent.local_messaging.topics import filter_syntax_problem, split_shared, topic_name_problem

# Reason codes (2.4, Table 2-6).
SUCCESS = 0x00
NORMAL_DISCONNECTION = 0x00
GRANTED_QOS_0 = 0x00
GRANTED_QOS_1 = 0x01
GRANTED_QOS_2 = 0x02
DISCONNECT_WITH_WILL = 0x04
NO_MATCHING_SUBSCRIBERS = 0x10
NO_SUBSCRIPTION_EXISTED = 0x11
UNSPECIFIED = 0x80
MALFORMED = 0x81
PROTOCOL_ERROR = 0x82
IMPLEMENTATION_SPECIFIC = 0x83
UNSUPPORTED_VERSION = 0x84
CLIENT_ID_INVALID = 0x85
BAD_USERNAME_OR_PASSWORD = 0x86
NOT_AUTHORIZED = 0x87
SERVER_UNAVAILABLE = 0x88
SERVER_BUSY = 0x89
BANNED = 0x8A
SERVER_SHUTTING_DOWN = 0x8B
BAD_AUTH_METHOD = 0x8C
KEEPALIVE_TIMEOUT = 0x8D
SESSION_TAKEN_OVER = 0x8E
TOPIC_FILTER_INVALID = 0x8F
TOPIC_NAME_INVALID = 0x90
PACKET_ID_IN_USE = 0x91
PACKET_ID_NOT_FOUND = 0x92
RECEIVE_MAX_EXCEEDED = 0x93
TOPIC_ALIAS_INVALID = 0x94
PACKET_TOO_LARGE = 0x95
MESSAGE_RATE_TOO_HIGH = 0x96
QUOTA_EXCEEDED = 0x97
ADMINISTRATIVE_ACTION = 0x98
PAYLOAD_FORMAT_INVALID = 0x99
RETAIN_NOT_SUPPORTED = 0x9A
QOS_NOT_SUPPORTED = 0x9B
USE_ANOTHER_SERVER = 0x9C
SERVER_MOVED = 0x9D
SHARED_SUB_NOT_SUPPORTED = 0x9E
CONNECTION_RATE_EXCEEDED = 0x9F
MAXIMUM_CONNECT_TIME = 0xA0
SUB_IDS_NOT_SUPPORTED = 0xA1
WILDCARD_NOT_SUPPORTED = 0xA2

# MQTT 3.1.1 CONNACK return codes (3.1.1 section 3.2.2.3), for answering a 3.1.1 client the way it understands.
V311_UNACCEPTABLE_PROTOCOL_VERSION = 0x01

# The reason codes each packet may carry (3.2.2.2, 3.4.2.1, 3.9.3, 3.11.3, 3.14.2.1).
CONNACK_CODES = frozenset(
    {0x00, 0x80, 0x81, 0x82, 0x83, 0x84, 0x85, 0x86, 0x87, 0x88, 0x89, 0x8A, 0x8C, 0x90, 0x95, 0x97, 0x99}
    | {0x9A, 0x9B, 0x9C, 0x9D, 0x9F}
)
PUBACK_CODES = frozenset({0x00, 0x10, 0x80, 0x83, 0x87, 0x90, 0x91, 0x97, 0x99})
SUBACK_CODES = frozenset({0x00, 0x01, 0x02, 0x80, 0x83, 0x87, 0x8F, 0x91, 0x97, 0x9E, 0xA1, 0xA2})
UNSUBACK_CODES = frozenset({0x00, 0x11, 0x80, 0x83, 0x87, 0x8F, 0x91})
# DISCONNECT codes by sender (3.14.2.1 Table 3-10's "Sent by" column).
CLIENT_DISCONNECT_CODES = frozenset({0x00, 0x04, 0x80, 0x81, 0x82, 0x83, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x99})
SERVER_DISCONNECT_CODES = frozenset(
    {0x00, 0x80, 0x81, 0x82, 0x83, 0x87, 0x89, 0x8B, 0x8D, 0x8E, 0x8F, 0x90, 0x93, 0x94, 0x95, 0x96, 0x97, 0x98}
    | {0x99, 0x9A, 0x9B, 0x9C, 0x9D, 0x9E, 0x9F, 0xA0, 0xA1, 0xA2}
)

DEFAULT_MAX_PACKET_SIZE = 256 * 1024
DEFAULT_MAX_USER_PROPERTIES = 64  # per packet (and per Will): MQTT sets no limit, memory does
DEFAULT_MAX_FILTERS = 64  # topic filters in one SUBSCRIBE or UNSUBSCRIBE
MAX_VBI = 268_435_455  # 1.5.5: the largest value four bytes can carry
MAX_PACKET = 1 + 4 + MAX_VBI  # the largest packet any fixed header can announce

# Packet types (2.1.2).
CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = 8, 9, 10, 11, 12, 13, 14, 15
_NAMES = (
    "reserved type 0",
    "CONNECT",
    "CONNACK",
    "PUBLISH",
    "PUBACK",
    "PUBREC",
    "PUBREL",
    "PUBCOMP",
    "SUBSCRIBE",
    "SUBACK",
    "UNSUBSCRIBE",
    "UNSUBACK",
    "PINGREQ",
    "PINGRESP",
    "DISCONNECT",
    "AUTH",
)
# The fixed header flags each client packet must carry (2.1.3, Table 2-2); PUBLISH's are checked on their own.
_REQUIRED_FLAGS = {CONNECT: 0, PUBACK: 0, SUBSCRIBE: 2, UNSUBSCRIBE: 2, PINGREQ: 0, DISCONNECT: 0}

# Properties (2.2.2.2, Table 2-4): identifier -> (name, type).
_BYTE, _U16, _U32, _VARINT, _STR, _BIN, _PAIR = range(7)
_PROPERTIES: dict[int, tuple[str, int]] = {
    0x01: ("Payload Format Indicator", _BYTE),
    0x02: ("Message Expiry Interval", _U32),
    0x03: ("Content Type", _STR),
    0x08: ("Response Topic", _STR),
    0x09: ("Correlation Data", _BIN),
    0x0B: ("Subscription Identifier", _VARINT),
    0x11: ("Session Expiry Interval", _U32),
    0x12: ("Assigned Client Identifier", _STR),
    0x13: ("Server Keep Alive", _U16),
    0x15: ("Authentication Method", _STR),
    0x16: ("Authentication Data", _BIN),
    0x17: ("Request Problem Information", _BYTE),
    0x18: ("Will Delay Interval", _U32),
    0x19: ("Request Response Information", _BYTE),
    0x1A: ("Response Information", _STR),
    0x1C: ("Server Reference", _STR),
    0x1F: ("Reason String", _STR),
    0x21: ("Receive Maximum", _U16),
    0x22: ("Topic Alias Maximum", _U16),
    0x23: ("Topic Alias", _U16),
    0x24: ("Maximum QoS", _BYTE),
    0x25: ("Retain Available", _BYTE),
    0x26: ("User Property", _PAIR),
    0x27: ("Maximum Packet Size", _U32),
    0x28: ("Wildcard Subscription Available", _BYTE),
    0x29: ("Subscription Identifier Available", _BYTE),
    0x2A: ("Shared Subscription Available", _BYTE),
}
_USER_PROPERTY = 0x26
# Which properties a client may put where (the "used in" column of Table 2-4, client-sent packets only; a
# client's DISCONNECT may not carry Server Reference, 3.14.2.2.5).
_CONNECT_PROPS = frozenset({0x11, 0x21, 0x27, 0x22, 0x19, 0x17, 0x26, 0x15, 0x16})
_WILL_PROPS = frozenset({0x18, 0x01, 0x02, 0x03, 0x08, 0x09, 0x26})
_PUBLISH_PROPS = frozenset({0x01, 0x02, 0x23, 0x08, 0x09, 0x0B, 0x03, 0x26})
_PUBACK_PROPS = frozenset({0x1F, 0x26})
_SUBSCRIBE_PROPS = frozenset({0x0B, 0x26})
_UNSUBSCRIBE_PROPS = frozenset({0x26})
_DISCONNECT_PROPS = frozenset({0x11, 0x1F, 0x26})

UserProperties = tuple[tuple[str, str], ...]


class ProtocolError(Exception):
    """A client broke MQTT 5 (or asked for what this server does not do). `reason_code` is what to tell it.

    `in_connect` is True when no CONNECT had been decoded: the error is the connection's answer, so the server
    sends `connack(reason_code)` (a valid CONNACK code then) and closes. Otherwise `reason_code` is valid in a
    server's DISCONNECT. `packets` holds the packets the same `Decoder.feed` call decoded before the error, so
    none is lost: a CONNECT among them has not been answered yet (a client may send more packets right after
    CONNECT, 3.1.4), and the server may act on them all before it sends `disconnect(reason_code)` and closes."""

    def __init__(self, reason_code: int, message: str) -> None:
        super().__init__(message)
        self.reason_code = reason_code
        self.message = message
        self.in_connect = False
        self.packets: tuple[Packet, ...] = ()


class UnsupportedVersion(ProtocolError):
    """A CONNECT for a protocol other than MQTT 5.

    `mqtt311` is True for protocol levels 3 and 4 (MQTT 3.1 and 3.1.1, with the bridge bit 0x80 or not): such a
    client cannot parse an MQTT 5 CONNACK, so the server answers `connack_v311(1)` ("unacceptable protocol
    version") and closes. Otherwise it answers `connack(UNSUPPORTED_VERSION)` and closes (3.1.2.2)."""

    def __init__(self, message: str, *, protocol_level: int, mqtt311: bool) -> None:
        super().__init__(UNSUPPORTED_VERSION, message)
        self.protocol_level = protocol_level
        self.mqtt311 = mqtt311


@dataclass(frozen=True)
class Connect:
    """A client's CONNECT (3.1). Absent properties have the standard's defaults."""

    protocol_level: int
    client_id: str
    clean_start: bool
    keepalive: int
    session_expiry: int = 0
    receive_maximum: int = 65535
    maximum_packet_size: int | None = None
    username: str | None = None
    password: bytes | None = None
    will: bool = False
    request_problem_information: bool = True
    user_properties: UserProperties = ()
    topic_alias_maximum: int = 0
    request_response_information: bool = False


@dataclass(slots=True)
class Publish:
    """A PUBLISH from a client (3.3): QoS 0 or 1, never retained, its topic always spelled out (no alias).

    Not frozen, unlike the other packets: one is made per message on the hot path, and a frozen dataclass
    sets each field through object.__setattr__. Nothing changes one after the decoder made it."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    packet_id: int | None
    content_type: str | None = None
    payload_format: int | None = None
    message_expiry: int | None = None
    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: UserProperties = ()


@dataclass(frozen=True)
class PubAck:
    """The client's acknowledgement of a QoS 1 PUBLISH the server sent it (3.4)."""

    packet_id: int
    reason_code: int
    reason_string: str | None = None


@dataclass(frozen=True)
class Subscription:
    """One topic filter of a SUBSCRIBE with its Subscription Options (3.8.3.1). `qos` is the maximum requested."""

    topic_filter: str
    qos: int
    no_local: bool
    retain_as_published: bool
    retain_handling: int


@dataclass(frozen=True)
class Subscribe:
    """A SUBSCRIBE (3.8). The filters are well formed; whether they are allowed is the server's question."""

    packet_id: int
    subscriptions: tuple[Subscription, ...]
    subscription_identifier: int | None
    user_properties: UserProperties = ()


@dataclass(frozen=True)
class Unsubscribe:
    """An UNSUBSCRIBE (3.10)."""

    packet_id: int
    topic_filters: tuple[str, ...]
    user_properties: UserProperties = ()


@dataclass(frozen=True)
class PingReq:
    """A PINGREQ (3.12): answer `pingresp()`."""


@dataclass(frozen=True)
class Disconnect:
    """A client's DISCONNECT (3.14). `session_expiry` is None when the client did not change it."""

    reason_code: int = 0
    session_expiry: int | None = None
    reason_string: str | None = None


Packet = Connect | Publish | PubAck | Subscribe | Unsubscribe | PingReq | Disconnect
_PINGREQ = PingReq()  # one instance: a flood of PINGREQs should not also be a flood of objects


class _Reader:
    """A cursor over one packet's bytes (after the fixed header) that never reads or slices past `end`."""

    __slots__ = ("data", "end", "name", "pos")

    def __init__(self, data: bytes, name: str, pos: int = 0, end: int | None = None) -> None:
        self.data = data
        self.name = name
        self.pos = pos
        self.end = len(data) if end is None else end

    def left(self) -> int:
        return self.end - self.pos

    def _take(self, n: int, what: str) -> int:
        if n > self.end - self.pos:
            raise ProtocolError(MALFORMED, f"{self.name}: {what} runs past the end of the packet")
        start = self.pos
        self.pos += n
        return start

    def byte(self, what: str) -> int:
        return self.data[self._take(1, what)]

    def u16(self, what: str) -> int:
        i = self._take(2, what)
        return (self.data[i] << 8) | self.data[i + 1]

    def u32(self, what: str) -> int:
        i = self._take(4, what)
        return int.from_bytes(self.data[i : i + 4], "big")

    def varint(self, what: str) -> int:
        """A Variable Byte Integer (1.5.5): at most 4 bytes, and in its shortest form."""
        value = 0
        for shift in (0, 7, 14, 21):
            b = self.byte(what)
            value |= (b & 0x7F) << shift
            if not b & 0x80:
                if b == 0 and shift:
                    raise ProtocolError(MALFORMED, f"{self.name}: {what} is not in its shortest form")
                return value
        raise ProtocolError(MALFORMED, f"{self.name}: {what} is longer than 4 bytes")

    def binary(self, what: str) -> bytes:
        """Binary Data (1.5.6): a 2-byte length, checked against what is left before anything is copied."""
        n = self.u16(f"{what}'s length")
        i = self._take(n, what)
        return self.data[i : i + n]

    def string(self, what: str) -> str:
        """A UTF-8 Encoded String (1.5.4): well-formed UTF-8 (so no surrogates) without U+0000."""
        return _utf8(self.binary(what), f"{self.name}: {what}")

    def rest(self) -> bytes:
        start, self.pos = self.pos, self.end
        return self.data[start : self.end]


def _utf8(raw: bytes, what: str) -> str:
    try:
        text = raw.decode("utf-8")  # strict: rejects overlong forms, surrogates and code points past U+10FFFF
    except UnicodeDecodeError:
        raise ProtocolError(MALFORMED, f"{what} is not well-formed UTF-8") from None
    if "\x00" in text:
        raise ProtocolError(MALFORMED, f"{what} contains U+0000")
    return text


class _Properties:
    """The properties of one packet (or Will), checked against where they may appear and how often."""

    __slots__ = ("user", "values")

    def __init__(self) -> None:
        self.values: dict[int, Any] = {}
        self.user: list[tuple[str, str]] = []

    def get(self, ident: int) -> Any:
        return self.values.get(ident)

    def __contains__(self, ident: int) -> bool:
        return ident in self.values


def _properties(r: _Reader, where: str, allowed: frozenset[int], max_user: int) -> _Properties:
    """Properties (2.2.2): a length, then identifier/value pairs, none past that length or repeated (2.2.2.2)."""
    length = r.varint(f"{where} property length")
    if length > r.left():
        raise ProtocolError(MALFORMED, f"{r.name}: {where} property length {length} runs past the end of the packet")
    end = r.pos + length
    sub = _Reader(r.data, r.name, r.pos, end)
    r.pos = end
    props = _Properties()
    while sub.left():
        ident = sub.varint(f"{where} property identifier")
        known = _PROPERTIES.get(ident)
        if known is None:
            raise ProtocolError(MALFORMED, f"{r.name}: unknown property identifier 0x{ident:02X} in {where}")
        name, kind = known
        if ident not in allowed:
            raise ProtocolError(PROTOCOL_ERROR, f"{r.name}: property {name} is not allowed in {where}")
        value: Any
        if kind == _BYTE:
            value = sub.byte(name)
        elif kind == _U16:
            value = sub.u16(name)
        elif kind == _U32:
            value = sub.u32(name)
        elif kind == _VARINT:
            value = sub.varint(name)
        elif kind == _STR:
            value = sub.string(name)
        elif kind == _BIN:
            value = sub.binary(name)
        else:
            pair = (sub.string(f"{name} name"), sub.string(f"{name} value"))
            if len(props.user) >= max_user:
                raise ProtocolError(QUOTA_EXCEEDED, f"{r.name}: more than {max_user} user properties in {where}")
            props.user.append(pair)
            continue
        if ident in props.values:
            raise ProtocolError(PROTOCOL_ERROR, f"{r.name}: property {name} appears more than once in {where}")
        props.values[ident] = value
    return props


def _flag(props: _Properties, ident: int, where: str, r: _Reader) -> int | None:
    """A Byte property whose only values are 0 and 1 (3.1.2.11.6, 3.1.2.11.7, 3.3.2.3.2)."""
    value = props.get(ident)
    if value is not None and value not in (0, 1):
        name = _PROPERTIES[ident][0]
        raise ProtocolError(PROTOCOL_ERROR, f"{r.name}: {name} is {value} in {where}; only 0 and 1 are defined")
    return value


def _check_payload_format(fmt: int | None, payload: bytes, what: str) -> None:
    """Payload Format Indicator 1 promises UTF-8 (3.3.2.3.2); a receiver may check, and this one does."""
    if fmt == 1:
        try:
            payload.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolError(
                PAYLOAD_FORMAT_INVALID, f"{what}: Payload Format Indicator is 1 but the payload is not UTF-8"
            ) from None


def _check_response_topic(props: _Properties, r: _Reader, where: str) -> str | None:
    topic = props.get(0x08)
    if topic is not None:
        problem = topic_name_problem(topic)
        if problem:  # 3.3.2.3.5: a Response Topic is a Topic Name
            raise ProtocolError(PROTOCOL_ERROR, f"{r.name}: Response Topic in {where} {problem}")
    return topic


class Decoder:
    """Incremental: feed() bytes as they arrive from the socket, get whole packets.

    One Decoder per connection. The first packet must be CONNECT; the decoder keeps it (``connect``) because
    later rules depend on it (3.14.2.2.2). After a DISCONNECT, or after any ProtocolError, the connection is
    over: further bytes raise (the same error, for the latter), so a caller that keeps feeding cannot be
    talked into decoding packets from a stream that has already gone wrong.

    Pass at most what one recv() returned to each feed(): the decoder's own buffering is bounded by
    ``max_packet_size``, the list it returns by the chunk it was given."""

    def __init__(
        self,
        max_packet_size: int = DEFAULT_MAX_PACKET_SIZE,
        *,
        max_user_properties: int = DEFAULT_MAX_USER_PROPERTIES,
        max_filters: int = DEFAULT_MAX_FILTERS,
    ) -> None:
        if not 2 <= max_packet_size <= MAX_PACKET:
            raise ValueError(f"max_packet_size must be 2..{MAX_PACKET}, not {max_packet_size}")
        if max_user_properties < 0 or max_filters < 1:
            raise ValueError("max_user_properties must be >= 0 and max_filters >= 1")
        self.max_packet_size = max_packet_size
        self.max_user_properties = max_user_properties
        self.max_filters = max_filters
        self._header = bytearray()  # the fixed header being read: 1 to 5 bytes
        self._body = bytearray()  # the body being read, once the header announced its length
        self._need: int | None = None  # the body's length, once known
        self._connect: Connect | None = None
        self._closed = False  # a DISCONNECT arrived
        self._error: ProtocolError | None = None

    @property
    def pending(self) -> int:
        """Bytes buffered towards the next packet: never more than ``max_packet_size``."""
        return len(self._header) + len(self._body)

    @property
    def connect(self) -> Connect | None:
        """The connection's CONNECT once decoded (None before, and so for errors raised while decoding it)."""
        return self._connect

    def feed(self, data: bytes | bytearray | memoryview) -> list[Packet]:
        """Decode what `data` completes; keep the rest. Raises ProtocolError, whose `packets` has the ones before."""
        if self._error is not None:
            raise self._error
        out: list[Packet] = []
        try:
            self._feed(memoryview(data).cast("B"), out)
        except ProtocolError as e:
            e.in_connect = self._connect is None
            e.packets = tuple(out)
            self._error = e
            self._header.clear()
            self._body.clear()
            raise
        return out

    def _feed(self, data: memoryview, out: list[Packet]) -> None:
        pos, end = 0, len(data)
        while True:
            if self._need is None and not self._header and pos + 1 < end:
                pos = self._whole_header(data, pos, end)
            if self._need is None:
                while self._need is None and pos < end:
                    self._header.append(data[pos])
                    pos += 1
                    self._header_byte()
                if self._need is None:
                    return
            need = self._need
            have = len(self._body)
            take = min(need - have, end - pos)
            if take == need:  # the whole body is in this chunk: no copy into the buffer
                body = bytes(data[pos : pos + take])
            else:
                self._body += data[pos : pos + take]
                if len(self._body) < need:
                    return
                body = bytes(self._body)
                self._body.clear()
            pos += take
            first = self._header[0]
            self._header.clear()
            self._need = None
            out.append(self._packet(first, body))

    def _whole_header(self, data: memoryview, pos: int, end: int) -> int:
        """A fixed header that lies wholly in this chunk, valid and within the size limit, read in one go (the
        hot path: most packets arrive whole). Returns the position after it, or `pos` unchanged for anything
        else: then the byte-by-byte path reads it, and refuses what is wrong with the precise reason."""
        remaining = shift = 0
        i = pos + 1
        while i < end and i <= pos + 4:
            b = data[i]
            remaining |= (b & 0x7F) << shift
            i += 1
            if not b & 0x80:
                if b == 0 and shift:  # not in its shortest form
                    return pos
                if i - pos + remaining > self.max_packet_size:
                    return pos
                self._check_first_byte(data[pos])
                self._header.append(data[pos])
                self._need = remaining
                return i
            shift += 7
        return pos

    def _header_byte(self) -> None:
        """Check the fixed header (2.1) as each byte arrives, so a bad or oversized packet is refused at once."""
        h = self._header
        if len(h) == 1:
            self._check_first_byte(h[0])
            return
        b = h[-1]
        if b & 0x80:
            if len(h) == 5:
                raise ProtocolError(MALFORMED, "the Remaining Length is longer than 4 bytes")
            # Still reading the length, but its shortest form already promises at least this much.
            if len(h) + 1 + 128 ** (len(h) - 1) > self.max_packet_size:
                raise ProtocolError(
                    PACKET_TOO_LARGE, f"{_NAMES[h[0] >> 4]} exceeds the maximum packet size of {self.max_packet_size}"
                )
            return
        if b == 0 and len(h) > 2:
            raise ProtocolError(MALFORMED, "the Remaining Length is not in its shortest form")
        remaining = 0
        for i, c in enumerate(h[1:]):
            remaining |= (c & 0x7F) << (7 * i)
        size = len(h) + remaining
        if size > self.max_packet_size:
            raise ProtocolError(
                PACKET_TOO_LARGE,
                f"{_NAMES[h[0] >> 4]} of {size} bytes exceeds the maximum packet size of {self.max_packet_size}",
            )
        self._need = remaining

    def _check_first_byte(self, first: int) -> None:
        kind, flags = first >> 4, first & 0x0F
        name = _NAMES[kind]
        if self._closed:
            raise ProtocolError(PROTOCOL_ERROR, f"{name} after DISCONNECT")
        if kind == 0:
            raise ProtocolError(MALFORMED, "packet type 0 is reserved")
        if self._connect is None:
            if kind != CONNECT:
                raise ProtocolError(PROTOCOL_ERROR, f"the first packet must be CONNECT, not {name}")
        elif kind == CONNECT:
            raise ProtocolError(PROTOCOL_ERROR, "a second CONNECT on the same connection")  # 3.1.0-2
        if kind in (PUBREC, PUBREL, PUBCOMP):
            raise ProtocolError(QOS_NOT_SUPPORTED, f"{name}: QoS 2 is not supported")
        if kind == AUTH:
            # 4.12: a client that sent no Authentication Method in CONNECT (and this server accepts none) must
            # not send AUTH. 0x8C (Bad authentication method) is a CONNACK code, not a DISCONNECT one (3.14.2.1).
            raise ProtocolError(PROTOCOL_ERROR, "AUTH: enhanced authentication is not supported")
        if kind == PUBLISH:
            qos = (flags >> 1) & 3
            if qos == 3:
                raise ProtocolError(MALFORMED, "PUBLISH with QoS 3")  # 3.3.1-4
            if qos == 2:
                raise ProtocolError(QOS_NOT_SUPPORTED, "QoS 2 is not supported")  # Maximum QoS is 1
            if flags & 1:
                raise ProtocolError(RETAIN_NOT_SUPPORTED, "retain is not supported")  # Retain Available is 0
            if flags & 8 and qos == 0:
                raise ProtocolError(MALFORMED, "PUBLISH with QoS 0 has the DUP flag set")  # 3.3.1-2
            return
        required = _REQUIRED_FLAGS.get(kind)
        if required is None:
            raise ProtocolError(PROTOCOL_ERROR, f"{name} is not a packet a client may send")
        if flags != required:
            raise ProtocolError(MALFORMED, f"{name} has reserved flag bits 0x{flags:X} (must be 0x{required:X})")

    def _packet(self, first: int, body: bytes) -> Packet:
        kind = first >> 4
        if kind == PUBLISH:
            return self._publish(first, body)
        if kind == CONNECT:
            self._connect = self._decode_connect(body)
            return self._connect
        if kind == PUBACK:
            return self._puback(body)
        if kind == SUBSCRIBE:
            return self._subscribe(body)
        if kind == UNSUBSCRIBE:
            return self._unsubscribe(body)
        if kind == PINGREQ:
            if body:
                raise ProtocolError(MALFORMED, "PINGREQ with a non-empty body")  # 3.12: no variable header
            return _PINGREQ
        return self._disconnect(body)  # _check_first_byte let no other type through

    def _decode_connect(self, body: bytes) -> Connect:
        r = _Reader(body, "CONNECT")
        name = r.binary("Protocol Name")
        level = r.byte("Protocol Version")
        if name != b"MQTT" or level != 5:
            if name in (b"MQTT", b"MQIsdp") and (level & 0x7F) in (3, 4):
                raise UnsupportedVersion(
                    f"MQTT protocol level {level} (3.1/3.1.1) is not served; only MQTT 5",
                    protocol_level=level,
                    mqtt311=True,
                )
            raise UnsupportedVersion(
                f"protocol {name[:16]!r} level {level} is not served; only MQTT 5", protocol_level=level, mqtt311=False
            )
        flags = r.byte("Connect Flags")
        if flags & 0x01:
            raise ProtocolError(MALFORMED, "CONNECT: the reserved Connect Flags bit is set")  # 3.1.2-3
        will = bool(flags & 0x04)
        will_qos = (flags >> 3) & 3
        if will_qos == 3:
            raise ProtocolError(MALFORMED, "CONNECT: Will QoS is 3")  # 3.1.2-12
        if not will and (will_qos or flags & 0x20):
            raise ProtocolError(MALFORMED, "CONNECT: Will QoS or Will Retain set without the Will Flag")  # 3.1.2-11/13
        keepalive = r.u16("Keep Alive")
        props = _properties(r, "CONNECT", _CONNECT_PROPS, self.max_user_properties)
        receive_maximum = props.get(0x21)
        if receive_maximum == 0:
            raise ProtocolError(PROTOCOL_ERROR, "CONNECT: Receive Maximum is 0")  # 3.1.2.11.3
        maximum_packet_size = props.get(0x27)
        if maximum_packet_size == 0:
            raise ProtocolError(PROTOCOL_ERROR, "CONNECT: Maximum Packet Size is 0")  # 3.1.2.11.4
        request_response = _flag(props, 0x19, "CONNECT", r)
        request_problem = _flag(props, 0x17, "CONNECT", r)
        if 0x15 in props:  # 4.12: enhanced authentication, which this server does not offer
            raise ProtocolError(BAD_AUTH_METHOD, f"CONNECT: authentication method {props.get(0x15)!r} is not supported")
        if 0x16 in props:
            raise ProtocolError(PROTOCOL_ERROR, "CONNECT: Authentication Data without an Authentication Method")
        client_id = r.string("Client Identifier")
        if will:
            wprops = _properties(r, "Will Properties", _WILL_PROPS, self.max_user_properties)
            fmt = _flag(wprops, 0x01, "Will Properties", r)
            _check_response_topic(wprops, r, "Will Properties")
            will_topic = r.string("Will Topic")
            problem = topic_name_problem(will_topic)
            if problem:
                raise ProtocolError(TOPIC_NAME_INVALID, f"CONNECT: Will Topic {problem}")
            _check_payload_format(fmt, r.binary("Will Payload"), "CONNECT: Will")
        username = r.string("User Name") if flags & 0x80 else None
        password = r.binary("Password") if flags & 0x40 else None
        if r.left():
            raise ProtocolError(MALFORMED, f"CONNECT: {r.left()} bytes after the payload")
        return Connect(
            protocol_level=level,
            client_id=client_id,
            clean_start=bool(flags & 0x02),
            keepalive=keepalive,
            session_expiry=props.get(0x11) or 0,
            receive_maximum=65535 if receive_maximum is None else receive_maximum,
            maximum_packet_size=maximum_packet_size,
            username=username,
            password=password,
            will=will,
            request_problem_information=request_problem != 0,
            user_properties=tuple(props.user),
            topic_alias_maximum=props.get(0x22) or 0,
            request_response_information=request_response == 1,
        )

    def _publish(self, first: int, body: bytes) -> Publish:
        """The common case first: no properties (what most apps send), a valid topic and packet identifier, read
        directly. Anything else, or anything wrong, goes through the general reader, which names the problem."""
        qos = (first >> 1) & 3  # 0 or 1: _check_first_byte refused the rest
        n = len(body)
        if n >= 2:
            topic_end = 2 + ((body[0] << 8) | body[1])
            props_at = topic_end + 2 if qos else topic_end
            if props_at < n and body[props_at] == 0:
                packet_id = ((body[topic_end] << 8) | body[topic_end + 1]) if qos else None
                try:
                    topic = body[2:topic_end].decode("utf-8")
                except UnicodeDecodeError:
                    topic = ""
                if topic and packet_id != 0 and topic_name_problem(topic) is None:
                    return Publish(topic, body[props_at + 1 :], qos, False, bool(first & 0x08), packet_id)
        return self._publish_general(first, body)

    def _publish_general(self, first: int, body: bytes) -> Publish:
        qos = (first >> 1) & 3
        r = _Reader(body, "PUBLISH")
        topic = r.string("Topic Name")
        packet_id = None
        if qos:
            packet_id = r.u16("Packet Identifier")
            if packet_id == 0:
                raise ProtocolError(PROTOCOL_ERROR, "PUBLISH: Packet Identifier 0")  # 2.2.1-3
        props = _properties(r, "PUBLISH", _PUBLISH_PROPS, self.max_user_properties)
        payload = r.rest()
        if 0x23 in props:  # 3.3.2.3.4: above our Topic Alias Maximum, which is 0
            raise ProtocolError(TOPIC_ALIAS_INVALID, "PUBLISH: topic aliases are not supported (Topic Alias Maximum 0)")
        if 0x0B in props:
            raise ProtocolError(PROTOCOL_ERROR, "PUBLISH: a client may not send a Subscription Identifier")  # 3.3.4-6
        if not topic:
            raise ProtocolError(PROTOCOL_ERROR, "PUBLISH: empty Topic Name without a Topic Alias")  # 3.3.2.3.4
        problem = topic_name_problem(topic)
        if problem:
            raise ProtocolError(TOPIC_NAME_INVALID, f"PUBLISH: Topic Name {problem}")  # 3.3.2-2
        fmt = _flag(props, 0x01, "PUBLISH", r)
        _check_payload_format(fmt, payload, "PUBLISH")
        return Publish(
            topic=topic,
            payload=payload,
            qos=qos,
            retain=False,
            dup=bool(first & 0x08),
            packet_id=packet_id,
            content_type=props.get(0x03),
            payload_format=fmt,
            message_expiry=props.get(0x02),
            response_topic=_check_response_topic(props, r, "PUBLISH"),
            correlation_data=props.get(0x09),
            user_properties=tuple(props.user),
        )

    def _puback(self, body: bytes) -> PubAck:
        r = _Reader(body, "PUBACK")
        packet_id = r.u16("Packet Identifier")
        if packet_id == 0:
            raise ProtocolError(PROTOCOL_ERROR, "PUBACK: Packet Identifier 0")
        reason = SUCCESS
        reason_string = None
        if r.left():  # 3.4.2.1: the Reason Code may be omitted (Success), and then the properties too
            reason = r.byte("Reason Code")
            if reason not in PUBACK_CODES:
                raise ProtocolError(PROTOCOL_ERROR, f"PUBACK: 0x{reason:02X} is not a PUBACK reason code")
            if r.left():
                props = _properties(r, "PUBACK", _PUBACK_PROPS, self.max_user_properties)
                reason_string = props.get(0x1F)
            if r.left():
                raise ProtocolError(MALFORMED, f"PUBACK: {r.left()} bytes after the properties")
        return PubAck(packet_id=packet_id, reason_code=reason, reason_string=reason_string)

    def _packet_id(self, r: _Reader) -> int:
        packet_id = r.u16("Packet Identifier")
        if packet_id == 0:
            raise ProtocolError(PROTOCOL_ERROR, f"{r.name}: Packet Identifier 0")  # 2.2.1-3
        return packet_id

    def _filter(self, r: _Reader) -> str:
        topic_filter = r.string("Topic Filter")
        problem = filter_syntax_problem(topic_filter)
        if problem:
            raise ProtocolError(TOPIC_FILTER_INVALID, f"{r.name}: topic filter {topic_filter[:64]!r} {problem}")
        return topic_filter

    def _subscribe(self, body: bytes) -> Subscribe:
        r = _Reader(body, "SUBSCRIBE")
        packet_id = self._packet_id(r)
        props = _properties(r, "SUBSCRIBE", _SUBSCRIBE_PROPS, self.max_user_properties)
        sub_id = props.get(0x0B)
        if sub_id == 0:
            raise ProtocolError(PROTOCOL_ERROR, "SUBSCRIBE: Subscription Identifier 0")  # 3.8.2.1.2
        subs: list[Subscription] = []
        while r.left():
            if len(subs) >= self.max_filters:
                raise ProtocolError(QUOTA_EXCEEDED, f"SUBSCRIBE: more than {self.max_filters} topic filters")
            topic_filter = self._filter(r)
            options = r.byte("Subscription Options")
            if options & 0xC0:
                raise ProtocolError(MALFORMED, "SUBSCRIBE: reserved Subscription Options bits are set")  # 3.8.3-5
            qos = options & 3
            if qos == 3:
                raise ProtocolError(PROTOCOL_ERROR, "SUBSCRIBE: Maximum QoS 3")  # 3.8.3.1
            retain_handling = (options >> 4) & 3
            if retain_handling == 3:
                raise ProtocolError(PROTOCOL_ERROR, "SUBSCRIBE: Retain Handling 3")  # 3.8.3.1
            no_local = bool(options & 0x04)
            if no_local and split_shared(topic_filter) is not None:
                raise ProtocolError(PROTOCOL_ERROR, "SUBSCRIBE: No Local on a shared subscription")  # 3.8.3-4
            subs.append(
                Subscription(
                    topic_filter=topic_filter,
                    qos=qos,
                    no_local=no_local,
                    retain_as_published=bool(options & 0x08),
                    retain_handling=retain_handling,
                )
            )
        if not subs:
            raise ProtocolError(PROTOCOL_ERROR, "SUBSCRIBE without topic filters")  # 3.8.3-2
        return Subscribe(
            packet_id=packet_id,
            subscriptions=tuple(subs),
            subscription_identifier=sub_id,
            user_properties=tuple(props.user),
        )

    def _unsubscribe(self, body: bytes) -> Unsubscribe:
        r = _Reader(body, "UNSUBSCRIBE")
        packet_id = self._packet_id(r)
        props = _properties(r, "UNSUBSCRIBE", _UNSUBSCRIBE_PROPS, self.max_user_properties)
        filters: list[str] = []
        while r.left():
            if len(filters) >= self.max_filters:
                raise ProtocolError(QUOTA_EXCEEDED, f"UNSUBSCRIBE: more than {self.max_filters} topic filters")
            filters.append(self._filter(r))
        if not filters:
            raise ProtocolError(PROTOCOL_ERROR, "UNSUBSCRIBE without topic filters")  # 3.10.3-2
        return Unsubscribe(packet_id=packet_id, topic_filters=tuple(filters), user_properties=tuple(props.user))

    def _disconnect(self, body: bytes) -> Disconnect:
        r = _Reader(body, "DISCONNECT")
        reason = NORMAL_DISCONNECTION
        session_expiry = reason_string = None
        if r.left():  # 3.14.2.1: no Reason Code means 0x00
            reason = r.byte("Reason Code")
            if reason not in CLIENT_DISCONNECT_CODES:
                raise ProtocolError(PROTOCOL_ERROR, f"DISCONNECT: 0x{reason:02X} is not a client's reason code")
            if r.left():
                props = _properties(r, "DISCONNECT", _DISCONNECT_PROPS, self.max_user_properties)
                session_expiry = props.get(0x11)
                reason_string = props.get(0x1F)
            if r.left():
                raise ProtocolError(MALFORMED, f"DISCONNECT: {r.left()} bytes after the properties")
        connect = self._connect
        if session_expiry and connect is not None and connect.session_expiry == 0:
            raise ProtocolError(  # 3.14.2.2.2
                PROTOCOL_ERROR, "DISCONNECT: non-zero Session Expiry Interval after CONNECT's was 0"
            )
        self._closed = True
        return Disconnect(reason_code=reason, session_expiry=session_expiry, reason_string=reason_string)


# ---- Encoders (server -> client) ----


def _varint(n: int) -> bytes:
    if not 0 <= n <= MAX_VBI:
        raise ValueError(f"{n} does not fit a Variable Byte Integer")
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        if n:
            out.append(digit | 0x80)
        else:
            out.append(digit)
            return bytes(out)


def _u16(n: int, what: str) -> bytes:
    if not 0 <= n <= 0xFFFF:
        raise ValueError(f"{what} {n} does not fit 2 bytes")
    return n.to_bytes(2, "big")


def _u32(n: int, what: str) -> bytes:
    if not 0 <= n <= 0xFFFFFFFF:
        raise ValueError(f"{what} {n} does not fit 4 bytes")
    return n.to_bytes(4, "big")


def _bin(data: bytes, what: str) -> bytes:
    if len(data) > 0xFFFF:
        raise ValueError(f"{what} is {len(data)} bytes; at most 65535 fit")
    return len(data).to_bytes(2, "big") + data


def _str(text: str, what: str) -> bytes:
    if "\x00" in text:
        raise ValueError(f"{what} contains U+0000")
    try:
        raw = text.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError(f"{what} holds a lone surrogate") from None
    return _bin(raw, what)


def _packet_id(packet_id: int) -> bytes:
    if not 1 <= packet_id <= 0xFFFF:
        raise ValueError(f"packet identifier {packet_id} is not 1..65535")
    return packet_id.to_bytes(2, "big")


def _code(code: int, allowed: frozenset[int], packet: str) -> int:
    if code not in allowed:
        raise ValueError(f"0x{code:02X} is not a {packet} reason code")
    return code


def _fixed(first: int, body: bytes) -> bytes:
    return bytes((first,)) + _varint(len(body)) + body


def _props(parts: Sequence[bytes]) -> bytes:
    data = b"".join(parts)
    return _varint(len(data)) + data


def _user_properties(pairs: Sequence[tuple[str, str]]) -> list[bytes]:
    return [b"\x26" + _str(k, "user property name") + _str(v, "user property value") for k, v in pairs]


def _reason_bytes(text: str) -> bytes:
    """A Reason String made sendable: it is diagnostics, so it must never be why a packet cannot be built.

    U+0000 and lone surrogates cannot be sent (1.5.4); U+FEFF can, but paho-mqtt 2.x refuses any property
    string holding it ("[MQTT-1.5.4-3] U+FEFF in UTF-8 data") and drops the connection, so it goes too."""
    clean = text.replace("\x00", "\ufffd").replace("\ufeff", "\ufffd").encode("utf-8", "replace")
    return _truncate_utf8(clean, 0xFFFF)


def _truncate_utf8(raw: bytes, n: int) -> bytes:
    """The longest prefix of the UTF-8 `raw` of at most `n` bytes that ends on a character boundary."""
    if len(raw) <= n:
        return raw
    return raw[:n].decode("utf-8", "ignore").encode("utf-8")


def _fit(build: Callable[[bytes | None], bytes], reason_string: str | None, max_packet_size: int | None) -> bytes:
    """build(reason) with the Reason String shortened, or dropped, until the packet fits `max_packet_size`.

    The standard (3.2.2.3.7, 3.4.2.2.2, 3.9.2.1.2, 3.11.2.1.2, 3.14.2.2.3) says to leave the Reason String out
    when it would make the packet exceed the client's Maximum Packet Size; a shortened one tells the app more.
    If the packet is too large even without it, it is returned without it: the caller decides what to do."""
    raw = _reason_bytes(reason_string) if reason_string else b""
    if not raw:
        return build(None)
    packet = build(raw)
    if max_packet_size is None or len(packet) <= max_packet_size:
        return packet
    bare = build(None)
    if len(bare) >= max_packet_size:
        return bare
    best, lo, hi = bare, 1, len(raw) - 1  # find the longest prefix that fits; size grows with the prefix
    while lo <= hi:
        mid = (lo + hi) // 2
        prefix = _truncate_utf8(raw, mid)
        candidate = build(prefix) if prefix else bare
        if len(candidate) <= max_packet_size:
            best, lo = candidate, mid + 1
        else:
            hi = mid - 1
    return best


def connack(
    reason_code: int = SUCCESS,
    *,
    session_present: bool = False,
    reason_string: str | None = None,
    receive_maximum: int | None = None,
    maximum_qos: int | None = 1,
    retain_available: bool = False,
    maximum_packet_size: int | None = None,
    assigned_client_id: str | None = None,
    topic_alias_maximum: int = 0,
    wildcard_available: bool = True,
    subscription_ids_available: bool = False,
    shared_available: bool = False,
    server_keep_alive: int | None = None,
    session_expiry: int | None = 0,
    max_packet_size: int | None = None,
) -> bytes:
    """CONNACK (3.2). `maximum_packet_size` is the limit the server announces; `max_packet_size` is the client's,
    which the packet (its Reason String shortened if need be) must fit.

    Properties whose absence already means what the server wants are left out (Maximum QoS 2, Retain, Wildcard,
    Subscription Identifier and Shared Subscription Available 1, Topic Alias Maximum 0: 3.2.2.3)."""
    _code(reason_code, CONNACK_CODES, "CONNACK")
    if session_present and reason_code != SUCCESS:
        raise ValueError("Session Present must be 0 when the connection is refused")  # 3.2.2-6
    parts: list[bytes] = []
    if session_expiry is not None:
        parts.append(b"\x11" + _u32(session_expiry, "Session Expiry Interval"))
    if receive_maximum is not None:
        if not 1 <= receive_maximum <= 0xFFFF:
            raise ValueError(f"Receive Maximum {receive_maximum} is not 1..65535")
        parts.append(b"\x21" + _u16(receive_maximum, "Receive Maximum"))
    if maximum_qos is not None and maximum_qos != 2:
        if maximum_qos not in (0, 1):
            raise ValueError(f"Maximum QoS {maximum_qos} is not 0, 1 or 2")
        parts.append(bytes((0x24, maximum_qos)))
    if not retain_available:
        parts.append(b"\x25\x00")
    if maximum_packet_size is not None:
        if not 1 <= maximum_packet_size <= 0xFFFFFFFF:
            raise ValueError(f"Maximum Packet Size {maximum_packet_size} is not positive")
        parts.append(b"\x27" + _u32(maximum_packet_size, "Maximum Packet Size"))
    if assigned_client_id is not None:
        parts.append(b"\x12" + _str(assigned_client_id, "Assigned Client Identifier"))
    if topic_alias_maximum:
        parts.append(b"\x22" + _u16(topic_alias_maximum, "Topic Alias Maximum"))
    if not wildcard_available:
        parts.append(b"\x28\x00")
    if not subscription_ids_available:
        parts.append(b"\x29\x00")
    if not shared_available:
        parts.append(b"\x2a\x00")
    if server_keep_alive is not None:
        parts.append(b"\x13" + _u16(server_keep_alive, "Server Keep Alive"))
    head = bytes((1 if session_present else 0, reason_code))

    def build(reason: bytes | None) -> bytes:
        extra = [b"\x1f" + _bin(reason, "Reason String")] if reason else []
        return _fixed(0x20, head + _props(parts + extra))

    return _fit(build, reason_string, max_packet_size)


def connack_v311(return_code: int) -> bytes:
    """An MQTT 3.1.1 CONNACK (3.1.1 section 3.2): for refusing a 3.1/3.1.1 client in terms it can read."""
    if not 0 <= return_code <= 5:
        raise ValueError(f"MQTT 3.1.1 CONNACK return code {return_code} is not 0..5")
    return bytes((0x20, 0x02, 0x00, return_code))


_PUBACK_OK = bytes((0x40, 0x02))


def puback(
    packet_id: int, reason_code: int = SUCCESS, reason_string: str | None = None, *, max_packet_size: int | None = None
) -> bytes:
    """PUBACK (3.4). Success without properties is the short form, the packet identifier alone (3.4.2.1)."""
    if reason_code == SUCCESS and reason_string is None and 0 < packet_id <= 0xFFFF:
        return _PUBACK_OK + packet_id.to_bytes(2, "big")  # every stored message's answer: the hot path
    head = _packet_id(packet_id)
    _code(reason_code, PUBACK_CODES, "PUBACK")

    def build(reason: bytes | None) -> bytes:
        if reason:
            return _fixed(0x40, head + bytes((reason_code,)) + _props([b"\x1f" + _bin(reason, "Reason String")]))
        if reason_code == SUCCESS:
            return _fixed(0x40, head)
        return _fixed(0x40, head + bytes((reason_code,)))  # 3.4.2.2.1: no Property Length when < 4 bytes

    return _fit(build, reason_string, max_packet_size)


def _ack(
    first: int,
    name: str,
    allowed: frozenset[int],
    packet_id: int,
    reason_codes: Sequence[int],
    reason_string: str | None,
    max_packet_size: int | None,
) -> bytes:
    head = _packet_id(packet_id)
    if not reason_codes:
        raise ValueError(f"{name} needs a reason code for each topic filter")
    codes = bytes(_code(c, allowed, name) for c in reason_codes)

    def build(reason: bytes | None) -> bytes:
        extra = [b"\x1f" + _bin(reason, "Reason String")] if reason else []
        return _fixed(first, head + _props(extra) + codes)

    return _fit(build, reason_string, max_packet_size)


def suback(
    packet_id: int, reason_codes: Sequence[int], reason_string: str | None = None, *, max_packet_size: int | None = None
) -> bytes:
    """SUBACK (3.9): one reason code per filter of the SUBSCRIBE, in order (3.9.3)."""
    return _ack(0x90, "SUBACK", SUBACK_CODES, packet_id, reason_codes, reason_string, max_packet_size)


def unsuback(
    packet_id: int, reason_codes: Sequence[int], reason_string: str | None = None, *, max_packet_size: int | None = None
) -> bytes:
    """UNSUBACK (3.11): one reason code per filter of the UNSUBSCRIBE, in order (3.11.3)."""
    return _ack(0xB0, "UNSUBACK", UNSUBACK_CODES, packet_id, reason_codes, reason_string, max_packet_size)


def publish(
    topic: str,
    payload: bytes,
    *,
    qos: int = 0,
    packet_id: int | None = None,
    retain: bool = False,
    dup: bool = False,
    content_type: str | None = None,
    message_expiry: int | None = None,
    user_properties: Sequence[tuple[str, str]] = (),
    payload_format: int | None = None,
    response_topic: str | None = None,
    correlation_data: bytes | None = None,
) -> bytes:
    """PUBLISH to a client (3.3). The properties a server must forward unaltered (3.3.2.3) can all be given.

    The caller checks the result's length against the client's Maximum Packet Size: a message that does not fit
    is not sent at all, but treated as delivered (3.1.2.11.4)."""
    if qos not in (0, 1):
        raise ValueError(f"QoS {qos}: this server sends QoS 0 and 1 only")
    if (packet_id is None) != (qos == 0):
        raise ValueError("a packet identifier is needed exactly when QoS > 0")
    if dup and qos == 0:
        raise ValueError("DUP must be 0 for QoS 0")  # 3.3.1-2
    problem = topic_name_problem(topic)
    if problem:
        raise ValueError(f"topic {topic[:64]!r} {problem}")
    parts: list[bytes] = []
    if payload_format is not None:
        if payload_format not in (0, 1):
            raise ValueError(f"Payload Format Indicator {payload_format} is not 0 or 1")
        if payload_format == 1:
            try:
                payload.decode("utf-8")
            except UnicodeDecodeError:
                raise ValueError("Payload Format Indicator 1 with a payload that is not UTF-8") from None
        parts.append(bytes((0x01, payload_format)))
    if message_expiry is not None:
        parts.append(b"\x02" + _u32(message_expiry, "Message Expiry Interval"))
    if content_type is not None:
        parts.append(b"\x03" + _str(content_type, "Content Type"))
    if response_topic is not None:
        problem = topic_name_problem(response_topic)
        if problem:
            raise ValueError(f"Response Topic {problem}")
        parts.append(b"\x08" + _str(response_topic, "Response Topic"))
    if correlation_data is not None:
        parts.append(b"\x09" + _bin(correlation_data, "Correlation Data"))
    parts += _user_properties(user_properties)
    body = _str(topic, "topic") + (_packet_id(packet_id) if packet_id is not None else b"") + _props(parts) + payload
    return _fixed(0x30 | (dup << 3) | (qos << 1) | int(retain), body)


def pingresp() -> bytes:
    """PINGRESP (3.13)."""
    return b"\xd0\x00"


def disconnect(
    reason_code: int = NORMAL_DISCONNECTION, reason_string: str | None = None, *, max_packet_size: int | None = None
) -> bytes:
    """A server's DISCONNECT (3.14): the shortest form the reason code and Reason String allow (3.14.2.1)."""
    _code(reason_code, SERVER_DISCONNECT_CODES, "server DISCONNECT")

    def build(reason: bytes | None) -> bytes:
        if reason:
            return _fixed(0xE0, bytes((reason_code,)) + _props([b"\x1f" + _bin(reason, "Reason String")]))
        if reason_code == NORMAL_DISCONNECTION:
            return b"\xe0\x00"
        return _fixed(0xE0, bytes((reason_code,)))

    return _fit(build, reason_string, max_packet_size)
