"""The tunnel wire codec against the official protobuf runtime, and against hostile bytes.

The runtime is the reference: a message class is built here from a descriptor that declares what
aws-samples/aws-iot-securetunneling-localproxy's resources/Message.proto declares (checked at commit
8a71618acf536923e882387e8d9eca9dbc7fdbe2; the file last changed in 6716623a, "Support for v3 protocol"), so
our bytes must be its bytes, and whatever it writes we must read back to the same values. Whatever we accept
from arbitrary input the runtime must accept too, with the same values: the codec may only be stricter.
"""

from __future__ import annotations

import random
import struct
from typing import Any

import pytest
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.message import DecodeError
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.tunneling import frames
from agent.tunneling.frames import (
    MAX_MESSAGE,
    MAX_PAYLOAD,
    Deframer,
    FrameError,
    Message,
    MessageType,
    decode,
    encode,
    frame,
)

PACKAGE = "com.amazonaws.iot.securedtunneling"
F = descriptor_pb2.FieldDescriptorProto
PROTO_TYPES = [  # Message.Type in resources/Message.proto
    ("UNKNOWN", 0),
    ("DATA", 1),
    ("STREAM_START", 2),
    ("STREAM_RESET", 3),
    ("SESSION_RESET", 4),
    ("SERVICE_IDS", 5),
    ("CONNECTION_START", 6),
    ("CONNECTION_RESET", 7),
]
PROTO_FIELDS = [  # Message's fields in resources/Message.proto: name, number, type, label
    ("type", 1, F.TYPE_ENUM, F.LABEL_OPTIONAL),
    ("streamId", 2, F.TYPE_INT32, F.LABEL_OPTIONAL),
    ("ignorable", 3, F.TYPE_BOOL, F.LABEL_OPTIONAL),
    ("payload", 4, F.TYPE_BYTES, F.LABEL_OPTIONAL),
    ("serviceId", 5, F.TYPE_STRING, F.LABEL_OPTIONAL),
    ("availableServiceIds", 6, F.TYPE_STRING, F.LABEL_REPEATED),
    ("connectionId", 7, F.TYPE_UINT32, F.LABEL_OPTIONAL),
]
# Fields a later schema might add: one of every wire type the runtime writes (varint, 64-bit, bytes, 32-bit)
EXTRA_FIELDS = [
    ("extraVarint", 8, F.TYPE_UINT64, F.LABEL_OPTIONAL),
    ("extraFixed64", 9, F.TYPE_FIXED64, F.LABEL_OPTIONAL),
    ("extraBytes", 10, F.TYPE_BYTES, F.LABEL_OPTIONAL),
    ("extraFixed32", 11, F.TYPE_FIXED32, F.LABEL_OPTIONAL),
    ("extraSint", 12, F.TYPE_SINT64, F.LABEL_OPTIONAL),
    ("extraFar", 536870911, F.TYPE_STRING, F.LABEL_OPTIONAL),  # the highest field number there is
    ("extraRepeated", 13, F.TYPE_INT32, F.LABEL_REPEATED),  # packed in proto3: length-delimited
]


def _message_class(extra: bool = False) -> Any:
    fdp = descriptor_pb2.FileDescriptorProto(
        name="tunnel_message.proto", package=PACKAGE, syntax="proto3", options={"optimize_for": "LITE_RUNTIME"}
    )
    msg = fdp.message_type.add(name="Message")
    enum = msg.enum_type.add(name="Type")
    for name, number in PROTO_TYPES:
        enum.value.add(name=name, number=number)
    for name, number, ftype, label in PROTO_FIELDS + (EXTRA_FIELDS if extra else []):
        field = msg.field.add(name=name, number=number, type=ftype, label=label)
        if ftype == F.TYPE_ENUM:
            field.type_name = f".{PACKAGE}.Message.Type"
    pool = descriptor_pool.DescriptorPool()  # its own pool: the two classes share a full name
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{PACKAGE}.Message"))


PB = _message_class()
PB_EXTENDED = _message_class(extra=True)


def to_pb(m: Message, cls: Any = PB, **extra: Any) -> Any:
    return cls(
        type=m.type,
        streamId=m.stream_id,
        ignorable=m.ignorable,
        payload=m.payload,
        serviceId=m.service_id,
        availableServiceIds=list(m.available_service_ids),
        connectionId=m.connection_id,
        **extra,
    )


def from_pb(p: Any) -> Message:
    return Message(
        p.type,
        p.streamId,
        p.ignorable,
        p.payload,
        p.serviceId,
        tuple(p.availableServiceIds),
        p.connectionId,
    )


def rejects(data: bytes) -> FrameError:
    with pytest.raises(FrameError) as info:
        decode(data)
    loggable(info.value)
    return info.value


def loggable(e: FrameError) -> None:
    """Short, plain text: a log line, never a dump of what the peer sent."""
    text = str(e)
    assert 0 < len(text) <= 100 and text.isascii() and text.isprintable(), text
    assert "\\x" not in text and "b'" not in text and 'b"' not in text, text


# --- strategies -------------------------------------------------------------------------------------------------

int32s = st.integers(-(2**31), 2**31 - 1)
uint32s = st.integers(0, 2**32 - 1)
service_ids = st.text(max_size=frames.MAX_SERVICE_ID) | st.sampled_from(["SSH", "", "ü" * 128, "😀" * 128])


def _big(n: int) -> st.SearchStrategy[bytes]:  # random bytes too long for hypothesis to draw byte by byte
    return st.integers(0, 2**32).map(lambda seed: random.Random(seed).randbytes(n))


payloads = (
    st.binary(max_size=300)
    | st.sampled_from([b"", b"\x00", bytes(MAX_PAYLOAD), b"\xff" * MAX_PAYLOAD])
    | _big(MAX_PAYLOAD)
    | st.integers(1, MAX_PAYLOAD).flatmap(_big)
)
messages = st.builds(
    Message,
    type=st.sampled_from(MessageType) | int32s,
    stream_id=st.sampled_from([0, 1, -1, 2**31 - 1, -(2**31)]) | int32s,
    ignorable=st.booleans(),
    payload=payloads,
    service_id=service_ids,
    available_service_ids=st.lists(service_ids, max_size=frames.MAX_SERVICE_IDS).map(tuple),
    connection_id=st.sampled_from([0, 1, 2**32 - 1]) | uint32s,
)
# Messages that always fit a frame: small payloads, few ids
small_messages = st.builds(
    Message,
    type=st.sampled_from(MessageType) | int32s,
    stream_id=int32s,
    ignorable=st.booleans(),
    payload=st.binary(max_size=64),
    service_id=service_ids,
    available_service_ids=st.lists(service_ids, max_size=3).map(tuple),
    connection_id=uint32s,
)
SLOW = settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# --- agreement with the runtime ---------------------------------------------------------------------------------


def test_schema_here_matches_the_module() -> None:
    assert [(t.name, t.value) for t in MessageType] == PROTO_TYPES
    enum = PB.DESCRIPTOR.enum_types_by_name["Type"]
    assert [(v.name, v.number) for v in enum.values] == PROTO_TYPES
    assert MAX_PAYLOAD == 64512  # "63kb (64512 bytes)" in both protocol guides
    assert MAX_MESSAGE == 0xFFFF


@SLOW
@given(messages)
def test_encode_is_the_runtimes_encoding(m: Message) -> None:
    expected = to_pb(m).SerializeToString()
    if len(expected) > MAX_MESSAGE:  # possible only with a full payload and many long ids
        with pytest.raises(FrameError):
            encode(m)
        with pytest.raises(FrameError):
            frame(m)
        return
    if not expected:  # every field at its default: a zero length, which Deframer would refuse
        assert encode(m) == b""
        with pytest.raises(FrameError):
            frame(m)
        return
    assert encode(m) == expected
    assert frame(m) == struct.pack(">H", len(expected)) + expected


@SLOW
@given(messages)
def test_the_runtimes_bytes_decode_to_the_same_values(m: Message) -> None:
    data = to_pb(m).SerializeToString()
    if len(data) > MAX_MESSAGE:
        rejects(data)
        return
    got = decode(data)
    assert got == m
    assert got == from_pb(PB.FromString(data))
    assert isinstance(got.payload, bytes) and isinstance(got.available_service_ids, tuple)


def test_known_types_come_back_as_the_enum_and_unknown_ones_as_ints() -> None:
    got = decode(to_pb(Message(MessageType.DATA)).SerializeToString())
    assert type(got.type) is MessageType and got.type is MessageType.DATA
    for number in (8, 99, 2**31 - 1, -1, -(2**31)):
        got = decode(to_pb(Message(number)).SerializeToString())
        assert type(got.type) is int and got.type == number


def test_hand_checked_encodings() -> None:
    """A few encodings worked out by hand, so a shared misreading of the runtime cannot pass unseen."""
    m = Message(MessageType.DATA, stream_id=1, payload=b"hi", service_id="SSH", connection_id=300)
    assert encode(m) == b"\x08\x01\x10\x01\x22\x02hi\x2a\x03SSH\x38\xac\x02"
    assert frame(m) == b"\x00\x10" + encode(m)
    # int32 -1 is sign-extended to 64 bits: ten bytes
    assert encode(Message(0, stream_id=-1)) == b"\x10" + b"\xff" * 9 + b"\x01"
    assert decode(b"\x10" + b"\xff" * 9 + b"\x01") == Message(0, stream_id=-1)
    # repeated strings are all written, the empty one too; a default scalar is not written at all
    assert encode(Message(MessageType.SERVICE_IDS, available_service_ids=("a", ""))) == b"\x08\x05\x32\x01a\x32\x00"
    assert encode(Message(0)) == b"" and decode(b"") == Message(0)
    with pytest.raises(FrameError):
        frame(Message(0))  # nothing to send, and a zero length is refused on the way in
    assert frame(Message(0, stream_id=1)) == b"\x00\x02\x10\x01"
    assert encode(Message(MessageType.STREAM_RESET, ignorable=True)) == b"\x08\x03\x18\x01"
    big = Message(MessageType.DATA, stream_id=1, payload=bytes(MAX_PAYLOAD))
    assert frame(big)[:2] == len(encode(big)).to_bytes(2, "big") and len(encode(big)) == 4 + 1 + 3 + MAX_PAYLOAD


@SLOW
@given(
    small_messages,
    st.integers(0, 2**64 - 1),
    st.integers(0, 2**64 - 1),
    st.binary(max_size=200),
    st.integers(0, 2**32 - 1),
    st.integers(-(2**63), 2**63 - 1),
    st.text(max_size=20),
    st.lists(st.integers(-(2**31), 2**31 - 1), max_size=5),
)
def test_unknown_fields_from_a_later_schema_are_skipped(
    m: Message, v: int, f64: int, raw: bytes, f32: int, sint: int, far: str, rep: list[int]
) -> None:
    extended = to_pb(
        m,
        PB_EXTENDED,
        extraVarint=v,
        extraFixed64=f64,
        extraBytes=raw,
        extraFixed32=f32,
        extraSint=sint,
        extraFar=far,
        extraRepeated=rep,
    )
    data = extended.SerializeToString()
    assert decode(data) == m
    shuffled = _shuffle_fields(data)  # unknown fields between the known ones, not only after them
    assert decode(shuffled) == from_pb(PB.FromString(shuffled)) == m


def _shuffle_fields(data: bytes) -> bytes:
    """Reverse the field order of a runtime encoding (repeated fields keep their own order)."""
    fields = []
    pos = 0
    while pos < len(data):
        start = pos
        tag, pos = _varint(data, pos)
        wire = tag & 7
        if wire == 0:
            _, pos = _varint(data, pos)
        elif wire == 1:
            pos += 8
        elif wire == 5:
            pos += 4
        else:
            n, pos = _varint(data, pos)
            pos += n
        fields.append((tag >> 3, data[start:pos]))
    numbers = sorted({n for n, _ in fields}, reverse=True)
    return b"".join(raw for number in numbers for n, raw in fields if n == number)


def _varint(data: bytes, pos: int) -> tuple[int, int]:
    v = shift = 0
    while True:
        b = data[pos]
        pos += 1
        v |= (b & 0x7F) << shift
        shift += 7
        if b < 0x80:
            return v, pos


def test_a_repeated_scalar_field_keeps_the_last_value_as_the_runtime_does() -> None:
    data = b"\x08\x01\x10\x05\x22\x01a\x10\x07\x22\x01b\x2a\x01x\x2a\x01y\x38\x01\x38\x02\x18\x01\x18\x00"
    assert decode(data) == from_pb(PB.FromString(data)) == Message(1, 7, False, b"b", "y", (), 2)


# --- what must be refused ---------------------------------------------------------------------------------------

FULL = [
    Message(
        MessageType.DATA,
        stream_id=-5,
        ignorable=True,
        payload=b"\x00\x01" * 200,
        service_id="SSH",
        connection_id=2**32 - 1,
    ),
    Message(MessageType.SERVICE_IDS, available_service_ids=("SSH", "", "ü" * 3, "HTTP")),
    Message(2**31 - 1, stream_id=2**31 - 1, service_id="😀", available_service_ids=("a",), connection_id=1),
]


@pytest.mark.parametrize("m", FULL, ids=["data", "service-ids", "extremes"])
def test_truncation_at_every_position_is_refused_unless_it_falls_between_fields(m: Message) -> None:
    # The encoding field by field, with the message its first k fields make: a cut there is a valid message.
    pieces: list[tuple[bytes, dict[str, Any]]] = []
    acc: dict[str, Any] = {"type": 0}
    for name, value in [
        ("type", m.type),
        ("stream_id", m.stream_id),
        ("ignorable", m.ignorable),
        ("payload", m.payload),
        ("service_id", m.service_id),
    ]:
        if value:
            acc = {**acc, name: value}
            pieces.append((encode(Message(**{"type": 0, name: value})), acc))
    for s in m.available_service_ids:
        acc = {**acc, "available_service_ids": acc.get("available_service_ids", ()) + (s,)}
        pieces.append((encode(Message(0, available_service_ids=(s,))), acc))
    if m.connection_id:
        acc = {**acc, "connection_id": m.connection_id}
        pieces.append((encode(Message(0, connection_id=m.connection_id)), acc))
    data = encode(m)
    assert b"".join(p for p, _ in pieces) == data
    boundaries = {0: Message(0)}
    end = 0
    for piece, fields in pieces:
        end += len(piece)
        boundaries[end] = Message(**fields)
    assert boundaries[len(data)] == m
    for cut in range(len(data)):
        if cut in boundaries:
            assert decode(data[:cut]) == boundaries[cut]
        else:
            rejects(data[:cut])


MALFORMED = {
    "overlong varint": b"\x10" + b"\x80" * 10 + b"\x01",
    "varint beyond 64 bits": b"\x10" + b"\xff" * 9 + b"\x02",
    "overlong tag": b"\x88\x80\x80\x80\x80\x00\x01",
    "tag beyond 32 bits": b"\x88\x80\x80\x80\x10\x01",
    "overlong length": b"\x22\x81\x80\x80\x80\x80\x00a",
    "truncated varint": b"\x10\x80",
    "truncated tag": b"\x80",
    "field number 0": b"\x00\x01",
    "type as bytes": b"\x0a\x01\x01",
    "stream id as fixed32": b"\x15\x01\x00\x00\x00",
    "ignorable as fixed64": b"\x19" + bytes(8),
    "payload as varint": b"\x20\x01",
    "service id as fixed32": b"\x2d\x00\x00\x00\x00",
    "available ids as varint": b"\x30\x01",
    "connection id as bytes": b"\x3a\x00",
    "start group, known field": b"\x0b\x0c",
    "start group, unknown field": b"\x43\x44",
    "end group": b"\x44",
    "wire type 6": b"\x46\x00",
    "wire type 7": b"\x47\x00",
    "bad utf-8 service id": b"\x2a\x02\xc3\x28",
    "bad utf-8 available id": b"\x32\x01\xff",
    "utf-8 surrogate": b"\x2a\x03\xed\xa0\x80",
    "overlong utf-8": b"\x2a\x02\xc0\xaf",
    "payload over the limit": b"\x22\x81\xf8\x03" + bytes(MAX_PAYLOAD + 1),
    "payload length over the limit, data absent": b"\x22\xff\xff\x03",
    "payload longer than the message": b"\x22\x05abc",
    "unknown field longer than the message": b"\x42\x05abc",
    "truncated unknown fixed64": b"\x41" + bytes(7),
    "truncated unknown fixed32": b"\x45" + bytes(3),
    "stream id 2**31": b"\x10\x80\x80\x80\x80\x08",
    "stream id -1 as 32 bits": b"\x10\xff\xff\xff\xff\x0f",  # the runtime truncates; a conforming peer never sends it
    "stream id below int32": b"\x10" + b"\xff" * 4 + b"\xf7" + b"\xff" * 4 + b"\x01",
    "type beyond int32": b"\x08\x80\x80\x80\x80\x10",
    "connection id 2**32": b"\x38\x80\x80\x80\x80\x10",
    "service id of 129 characters": b"\x2a\x81\x01" + b"a" * 129,
    "service id of 129 four-byte characters": b"\x2a\x84\x04" + "😀".encode() * 129,
    "service id over 512 bytes": b"\x2a\x81\x04" + b"a" * 513,
    "65 available ids": b"\x32\x01a" * 65,
    "longer than a frame": b"\x42\xfc\xff\x03" + bytes(MAX_MESSAGE - 3),
}


@pytest.mark.parametrize("data", MALFORMED.values(), ids=list(MALFORMED))
def test_malformed_messages_are_refused(data: bytes) -> None:
    rejects(data)


def test_the_bounds_themselves_are_accepted() -> None:
    """So the refusals above are about the bound, not something else in the bytes."""
    assert decode(b"\x22\x80\xf8\x03" + bytes(MAX_PAYLOAD)).payload == bytes(MAX_PAYLOAD)
    assert decode(b"\x2a\x80\x04" + "😀".encode() * 128).service_id == "😀" * 128
    assert len(decode(b"\x32\x01a" * 64).available_service_ids) == 64
    assert decode(b"\x38\xff\xff\xff\xff\x0f").connection_id == 2**32 - 1
    assert decode(b"\x10\x80\x80\x80\x80\xf8\xff\xff\xff\xff\x01").stream_id == -(2**31)
    assert decode(b"\x88\x80\x80\x80\x00\x05").type == MessageType.SERVICE_IDS  # non-minimal 5-byte tag
    assert decode(b"\x10" + b"\x80" * 9 + b"\x00") == Message(0)  # non-minimal 10-byte zero
    assert decode(b"\x42\xfb\xff\x03" + bytes(MAX_MESSAGE - 4)) == Message(0)  # exactly MAX_MESSAGE bytes


@pytest.mark.parametrize(
    "m",
    [
        Message(MessageType.DATA, stream_id=2**31),
        Message(MessageType.DATA, stream_id=-(2**31) - 1),
        Message(2**31),
        Message(MessageType.DATA, connection_id=-1),
        Message(MessageType.DATA, connection_id=2**32),
        Message(MessageType.DATA, payload=bytes(MAX_PAYLOAD + 1)),
        Message(MessageType.DATA, service_id="a" * 129),
        Message(MessageType.SERVICE_IDS, available_service_ids=("a",) * 65),
        Message(MessageType.SERVICE_IDS, available_service_ids=("ok", "b" * 129)),
        Message(MessageType.DATA, service_id="\ud800"),  # a lone surrogate has no UTF-8 form
        Message(  # every field within its bound, the whole too big for the 2-byte length
            MessageType.DATA, payload=bytes(MAX_PAYLOAD), available_service_ids=("a" * 128,) * 8
        ),
    ],
    ids=lambda m: repr(m)[:40],
)
def test_encode_refuses_what_decode_would_refuse(m: Message) -> None:
    for f in (encode, frame):
        with pytest.raises(FrameError) as info:
            f(m)
        loggable(info.value)


def _protobuf_like() -> st.SearchStrategy[bytes]:
    """Bytes built from plausible fields with every wire type and random contents, so both paths get exercised."""

    def field(t: tuple[int, int, int, bytes]) -> bytes:
        number, wire, value, raw = t
        tag = bytes(_encode_varint((number << 3) | wire))
        if wire == 0:
            return tag + bytes(_encode_varint(value))
        if wire == 1:
            return tag + raw[:8].ljust(8, b"\x00")
        if wire == 5:
            return tag + raw[:4].ljust(4, b"\x00")
        if wire == 2:
            return tag + bytes(_encode_varint(len(raw))) + raw
        return tag + raw

    one = st.tuples(
        st.integers(0, 20) | st.integers(0, 2**29 - 1),
        st.integers(0, 7),
        st.sampled_from([0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**63, 2**64 - 1]) | st.integers(0, 2**64 - 1),
        st.binary(max_size=20) | st.text(max_size=5).map(str.encode),
    ).map(field)
    return st.lists(one, max_size=8).map(b"".join)


def _encode_varint(v: int) -> bytearray:
    out = bytearray()
    while v >= 0x80:
        out.append((v & 0x7F) | 0x80)
        v >>= 7
    out.append(v)
    return out


def _ours_or_frame_error(data: bytes) -> None:
    try:
        got = decode(data)
    except FrameError as e:
        loggable(e)
        return
    # accepted: the runtime must accept it too and read the same values
    try:
        expected = from_pb(PB.FromString(data))
    except DecodeError:
        pytest.fail(f"accepted what the protobuf runtime refuses: {data.hex()}")
    assert got == expected


@settings(max_examples=1500, deadline=None)
@given(st.binary(max_size=80))
def test_random_bytes_raise_only_frame_error(data: bytes) -> None:
    _ours_or_frame_error(data)


@settings(max_examples=1500, deadline=None)
@given(_protobuf_like(), st.integers(0, 200))
def test_protobuf_like_bytes_raise_only_frame_error(data: bytes, cut: int) -> None:
    _ours_or_frame_error(data)
    _ours_or_frame_error(data[:cut])


@settings(max_examples=500, deadline=None)
@given(small_messages, st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), min_size=1, max_size=4))
def test_mutated_messages_raise_only_frame_error(m: Message, edits: list[tuple[int, int]]) -> None:
    data = bytearray(encode(m))
    for where, byte in edits:
        if data:
            data[where % len(data)] = byte
    _ours_or_frame_error(bytes(data))


# --- the deframer -----------------------------------------------------------------------------------------------

STREAM_MESSAGES = [
    Message(MessageType.SERVICE_IDS, available_service_ids=("SSH", "HTTP")),
    Message(MessageType.STREAM_START, stream_id=1, service_id="SSH", connection_id=1),
    Message(MessageType.DATA, stream_id=1, service_id="SSH", connection_id=1, payload=bytes(range(256))),
    Message(MessageType.STREAM_RESET, stream_id=1, service_id="SSH"),
]
STREAM = b"".join(frame(m) for m in STREAM_MESSAGES)


def test_several_messages_in_one_chunk() -> None:
    d = Deframer()
    assert d.feed(STREAM) == STREAM_MESSAGES
    assert d.pending == 0


def test_split_at_every_position() -> None:
    for cut in range(len(STREAM) + 1):
        d = Deframer()
        first = d.feed(STREAM[:cut])
        assert d.pending == cut - sum(len(frame(m)) for m in first), cut
        assert first + d.feed(STREAM[cut:]) == STREAM_MESSAGES, cut
        assert d.pending == 0


def test_one_byte_at_a_time() -> None:
    d = Deframer()
    got: list[Message] = []
    for i in range(len(STREAM)):
        got += d.feed(STREAM[i : i + 1])
    assert got == STREAM_MESSAGES and d.pending == 0
    assert d.feed(b"") == [] and d.pending == 0


@SLOW
@given(st.lists(messages, min_size=1, max_size=4), st.lists(st.integers(0, 140_000), max_size=6), st.booleans())
def test_any_chunking_of_any_messages(ms: list[Message], cuts: list[int], as_bytearray: bool) -> None:
    fitting = [m for m in ms if 0 < len(to_pb(m).SerializeToString()) <= MAX_MESSAGE]
    data = b"".join(frame(m) for m in fitting)
    points = sorted({0, len(data), *(c % (len(data) + 1) for c in cuts)})
    d = Deframer()
    got: list[Message] = []
    for a, b in zip(points, points[1:], strict=False):
        chunk = data[a:b]
        got += d.feed(bytearray(chunk) if as_bytearray else chunk)
    assert got == fitting and d.pending == 0


def test_maximal_websocket_frames_fit_the_default_buffer() -> None:
    """The service sends WebSocket frames of up to 131076 bytes, each may end mid-message: none is refused."""
    big = Message(MessageType.DATA, stream_id=7, payload=b"\xa5" * MAX_PAYLOAD, service_id="s" * 128, connection_id=9)
    ms = [big, Message(MessageType.STREAM_RESET, stream_id=7), big, big, big]
    data = b"".join(frame(m) for m in ms)
    for offset in (0, 1, 2, 3, 64_000):
        d = Deframer()
        got = d.feed(data[:offset])
        for i in range(offset, len(data), 131076):
            got += d.feed(data[i : i + 131076])
            assert d.pending <= MAX_MESSAGE + 1
        assert got == ms and d.pending == 0


def test_a_zero_length_is_refused_and_the_stream_stays_failed() -> None:
    for chunks in ([b"\x00\x00"], [b"\x00", b"\x00"], [frame(STREAM_MESSAGES[0]) + b"\x00\x00"]):
        d = Deframer()
        with pytest.raises(FrameError) as info:
            for c in chunks:
                d.feed(c)
        loggable(info.value)
        with pytest.raises(FrameError):
            d.feed(STREAM)  # the position in the stream is lost: nothing after is trusted
        assert d.pending == 0


def test_a_malformed_message_in_a_chunk_fails_the_chunk() -> None:
    d = Deframer()
    with pytest.raises(FrameError):
        d.feed(frame(STREAM_MESSAGES[1]) + b"\x00\x02\x10\x80" + frame(STREAM_MESSAGES[1]))
    with pytest.raises(FrameError):
        d.feed(frame(STREAM_MESSAGES[1]))
    d = Deframer()  # the same, the bad message finished by a later chunk
    assert d.feed(b"\x00\x03\x2a") == [] and d.pending == 3
    with pytest.raises(FrameError):
        d.feed(b"\x01\xff")


def test_a_length_over_max_message_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    # MAX_MESSAGE is what two bytes can say, so the wire cannot exceed it: a lower one shows the check is there.
    d = Deframer()
    assert d.feed(b"\xff\xff") == [] and d.pending == 2  # the largest length is a message still to come
    monkeypatch.setattr(frames, "MAX_MESSAGE", 100)
    for chunks in ([b"\x00\x65"], [b"\x00", b"\x65"], [frame(STREAM_MESSAGES[1]) + b"\x00\x65" + bytes(101)]):
        d = Deframer()
        with pytest.raises(FrameError) as info:
            for c in chunks:
                d.feed(c)
        loggable(info.value)
    assert Deframer().feed(b"\x00\x64" + b"\x42\x62" + bytes(98)) == [Message(0)]
    with pytest.raises(FrameError):
        frame(Message(MessageType.DATA, payload=bytes(100)))


def test_max_buffer_bounds_what_is_held() -> None:
    d = Deframer(max_buffer=10)
    assert d.feed(b"\x00\x20" + bytes(8)) == [] and d.pending == 10
    with pytest.raises(FrameError) as info:
        d.feed(b"\x00")
    loggable(info.value)
    d = Deframer(max_buffer=10)  # a whole message in one chunk is never held, whatever its size
    assert d.feed(STREAM) == STREAM_MESSAGES
    with pytest.raises(ValueError):
        Deframer(max_buffer=0)
