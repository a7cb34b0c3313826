"""The destination side's rules, as a pure state machine (agent.tunneling.protocol): what a source may
open, what is refused, and what the source is told. No sockets: every decision is a value here."""

from __future__ import annotations

from agent.tunneling.config import TunnelService
from agent.tunneling.frames import Message, MessageType
from agent.tunneling.protocol import Close, ConnKey, Destination, Fail, Open, Refuse, Send, Write

T = MessageType
SERVICES = {"SSH": TunnelService("127.0.0.1:22", max_connections=2), "HTTP": TunnelService("127.0.0.1:80")}


def v3(max_connections: int = 16) -> Destination:
    return Destination(3, SERVICES, max_connections)


def test_v3_streams_and_connections_open_only_listed_services():
    d = v3()
    assert d.receive(Message(T.SERVICE_IDS, available_service_ids=("SSH", "HTTP", "VNC"))) == [
        Refuse("the tunnel offers service 'VNC', which tunneling.services does not list: it will be refused")
    ]
    assert d.receive(Message(T.STREAM_START, stream_id=1, service_id="SSH", connection_id=1)) == [
        Open(ConnKey("SSH", 1, 1), "127.0.0.1:22")
    ]
    assert d.receive(Message(T.CONNECTION_START, stream_id=1, service_id="SSH", connection_id=2)) == [
        Open(ConnKey("SSH", 1, 2), "127.0.0.1:22")
    ]
    assert d.receive(Message(T.STREAM_START, stream_id=7, service_id="HTTP", connection_id=1)) == [
        Open(ConnKey("HTTP", 7, 1), "127.0.0.1:80")
    ]
    assert d.receive(Message(T.DATA, stream_id=1, service_id="SSH", connection_id=2, payload=b"hi")) == [
        Write(ConnKey("SSH", 1, 2), b"hi")
    ]
    # VNC is not listed: a reset and a log line, nothing opened
    out = d.receive(Message(T.STREAM_START, stream_id=3, service_id="VNC", connection_id=1))
    assert out == [
        Refuse("stream for service 'VNC' refused: not in tunneling.services"),
        Send(Message(T.STREAM_RESET, stream_id=3, service_id="VNC")),
    ]
    assert not any(isinstance(a, Open) for a in out)
    assert len(d.conns) == 3


def test_stale_streams_and_unknown_connections_are_dropped():
    d = v3()
    d.receive(Message(T.STREAM_START, stream_id=1, service_id="SSH", connection_id=1))
    assert d.receive(Message(T.DATA, stream_id=2, service_id="SSH", connection_id=1, payload=b"x")) == []
    assert d.receive(Message(T.DATA, stream_id=1, service_id="SSH", connection_id=9, payload=b"x")) == []
    assert d.receive(Message(T.DATA, stream_id=1, service_id="NOPE", connection_id=1, payload=b"x")) == []
    # a new stream for the service replaces the old one and ends its connections
    out = d.receive(Message(T.STREAM_START, stream_id=2, service_id="SSH", connection_id=1))
    assert out == [Close(ConnKey("SSH", 1, 1), "replaced by a new stream"), Open(ConnKey("SSH", 2, 1), "127.0.0.1:22")]


def test_limits_refuse_with_a_reset():
    d = v3(max_connections=3)
    d.receive(Message(T.STREAM_START, stream_id=1, service_id="SSH", connection_id=1))
    d.receive(Message(T.CONNECTION_START, stream_id=1, service_id="SSH", connection_id=2))
    out = d.receive(Message(T.CONNECTION_START, stream_id=1, service_id="SSH", connection_id=3))
    assert out == [
        Refuse("SSH connection 3 refused: tunneling.services.SSH.max_connections (2) reached"),
        Send(Message(T.CONNECTION_RESET, stream_id=1, service_id="SSH", connection_id=3)),
    ]
    d.receive(Message(T.STREAM_START, stream_id=5, service_id="HTTP", connection_id=1))
    out = d.receive(Message(T.CONNECTION_START, stream_id=5, service_id="HTTP", connection_id=2))
    assert isinstance(out[0], Refuse) and "tunneling.max_connections (3)" in out[0].reason
    assert len(d.conns) == 3


def test_resets_close_and_the_source_hears_of_local_closes():
    d = v3()
    d.receive(Message(T.STREAM_START, stream_id=1, service_id="SSH", connection_id=1))
    d.receive(Message(T.CONNECTION_START, stream_id=1, service_id="SSH", connection_id=2))
    assert d.receive(Message(T.CONNECTION_RESET, stream_id=1, service_id="SSH", connection_id=1)) == [
        Close(ConnKey("SSH", 1, 1), "reset by the source")
    ]
    assert d.local_closed(ConnKey("SSH", 1, 2)) == [
        Send(Message(T.CONNECTION_RESET, stream_id=1, service_id="SSH", connection_id=2))
    ]
    assert d.local_closed(ConnKey("SSH", 1, 2)) == []  # once
    d.receive(Message(T.CONNECTION_START, stream_id=1, service_id="SSH", connection_id=3))
    assert d.receive(Message(T.STREAM_RESET, stream_id=1, service_id="SSH")) == [
        Close(ConnKey("SSH", 1, 3), "stream reset by the source")
    ]
    d.receive(Message(T.STREAM_START, stream_id=4, service_id="HTTP", connection_id=1))
    assert d.receive(Message(T.SESSION_RESET)) == [Close(ConnKey("HTTP", 4, 1), "session reset by the tunnel")]
    assert not d.conns and not d.streams


def test_local_data_is_split_into_bounded_messages():
    from agent.tunneling.frames import MAX_PAYLOAD

    d = v3()
    d.receive(Message(T.STREAM_START, stream_id=1, service_id="SSH", connection_id=1))
    out = d.local_data(ConnKey("SSH", 1, 1), b"a" * (2 * MAX_PAYLOAD + 5))
    sizes = [len(a.message.payload) for a in out if isinstance(a, Send)]
    assert sizes == [MAX_PAYLOAD, MAX_PAYLOAD, 5]
    assert all(a.message.connection_id == 1 and a.message.service_id == "SSH" for a in out if isinstance(a, Send))
    assert d.local_data(ConnKey("SSH", 1, 9), b"x") == []  # not open: nothing sent


def test_v2_one_connection_per_stream_and_stream_reset_on_close():
    d = Destination(2, SERVICES, 16)
    assert d.receive(Message(T.STREAM_START, stream_id=1, service_id="SSH")) == [
        Open(ConnKey("SSH", 1, 0), "127.0.0.1:22")
    ]
    assert d.local_closed(ConnKey("SSH", 1, 0)) == [Send(Message(T.STREAM_RESET, stream_id=1, service_id="SSH"))]
    assert d.receive(Message(T.CONNECTION_START, stream_id=1, service_id="SSH", connection_id=2)) == [
        Fail("CONNECTION_START from a peer that negotiated protocol v2")
    ]


def test_an_empty_service_id_means_the_only_service():
    d = Destination(2, {"SSH": SERVICES["SSH"]}, 16)
    assert d.receive(Message(T.STREAM_START, stream_id=1)) == [Open(ConnKey("SSH", 1, 0), "127.0.0.1:22")]
    two = v3()
    out = two.receive(Message(T.STREAM_START, stream_id=1, connection_id=1))  # ambiguous: refused
    assert isinstance(out[0], Refuse) and not two.conns


def test_unknown_types_end_the_tunnel_unless_ignorable():
    d = v3()
    assert d.receive(Message(42, ignorable=True)) == []
    assert d.receive(Message(42)) == [Fail("message type 42 is not part of protocol v3 and not ignorable")]


def test_end_closes_everything():
    d = v3()
    d.receive(Message(T.STREAM_START, stream_id=1, service_id="SSH", connection_id=1))
    d.receive(Message(T.STREAM_START, stream_id=2, service_id="HTTP", connection_id=1))
    out = d.end()
    assert {a.key for a in out if isinstance(a, Close)} == {ConnKey("SSH", 1, 1), ConnKey("HTTP", 2, 1)}
    assert not d.conns and not d.streams


def test_stream_id_zero_is_a_protocol_error():
    assert v3().receive(Message(T.STREAM_START, stream_id=0, service_id="SSH", connection_id=1)) == [
        Fail("STREAM_START with stream id 0 (the guides reserve it)")
    ]


def test_repeated_service_ids_refuse_each_unlisted_service_once():
    d = v3()
    first = d.receive(Message(T.SERVICE_IDS, available_service_ids=("SSH", "VNC")))
    assert len(first) == 1 and isinstance(first[0], Refuse)
    assert d.receive(Message(T.SERVICE_IDS, available_service_ids=("SSH", "VNC"))) == []
