"""One WebSocket over TLS on a non-blocking socket, sans-I/O: what the local cloud's tunneling endpoint
(localcloud.tunnels) and its source side (localcloud.tunnel_source) both speak.

TLS is ssl.SSLObject on memory BIOs and the WebSocket is wsproto, so one selector thread can own many of them
and decide, per connection, when to read (back-pressure) and when to write.
"""

from __future__ import annotations

import contextlib
import socket
import ssl
from pathlib import Path

from wsproto import ConnectionType, WSConnection
from wsproto.connection import ConnectionState
from wsproto.events import BytesMessage, Event, Request
from wsproto.utilities import RemoteProtocolError

MAX_WS_MESSAGE = 131076  # either way, in both subprotocols
RECV_CHUNK = 64 * 1024


class TlsWebSocket:
    """One WebSocket over TLS on a non-blocking socket, driven by one selector thread.

    TLS is ssl.SSLObject on memory BIOs and the WebSocket is wsproto, so nothing here blocks: `receive()`
    reads once from the socket and returns the WebSocket events that completes, `send()` only appends to
    `out`, and `flush()` writes what the socket takes. The owner decides when to read (back-pressure)."""

    def __init__(
        self, sock: socket.socket, context: ssl.SSLContext, *, server_side: bool, server_hostname: str | None = None
    ) -> None:
        sock.setblocking(False)
        self.sock = sock
        self._in = ssl.MemoryBIO()
        self._out = ssl.MemoryBIO()
        self.tls = context.wrap_bio(self._in, self._out, server_side=server_side, server_hostname=server_hostname)
        self.ws = WSConnection(ConnectionType.SERVER if server_side else ConnectionType.CLIENT)
        self.out = bytearray()  # encrypted bytes waiting for the socket
        self.tls_ready = False
        self.app_bytes = 0  # decrypted bytes received so far
        self.dead = False  # the TCP connection ended (EOF, error, or closed here)
        self.error = ""  # why, when that was not an orderly end
        self.bad_request: RemoteProtocolError | None = None  # an HTTP request wsproto could not take
        self._request: Request | None = None
        if not server_side:
            self._handshake()

    def fileno(self) -> int:
        return self.sock.fileno()

    def request(self, req: Request) -> None:
        """Client side: the upgrade request, sent as soon as TLS is up."""
        if self.tls_ready:
            self.send(req)
        else:
            self._request = req

    def _handshake(self) -> bool:
        try:
            self.tls.do_handshake()
        except ssl.SSLWantReadError:
            self._pull()
            return False
        self.tls_ready = True
        self._pull()
        if self._request is not None:
            req, self._request = self._request, None
            self.send(req)
        return True

    def receive(self) -> list[Event]:
        if self.dead:
            return []
        try:
            data = self.sock.recv(RECV_CHUNK)
        except (BlockingIOError, InterruptedError):
            return []
        except OSError as e:
            data = b""
            self.error = self.error or e.strerror or e.__class__.__name__
        if data:
            self._in.write(data)
        else:
            self._in.write_eof()
            self.dead = True
        try:
            if self.tls_ready or self._handshake():
                while True:
                    chunk = self.tls.read(RECV_CHUNK)
                    if not chunk:
                        self.dead = True
                        break
                    self.app_bytes += len(chunk)
                    if self.ws.state is ConnectionState.CLOSED:
                        continue  # nothing more is owed to a closed WebSocket
                    self.ws.receive_data(chunk)
        except ssl.SSLWantReadError:
            pass
        except (ssl.SSLZeroReturnError, ssl.SSLEOFError):
            self.dead = True
        except ssl.SSLError as e:
            self.dead = True
            self.error = f"TLS: {e.reason or e.__class__.__name__}"
        except RemoteProtocolError as e:
            self.bad_request = e
        self._pull()
        try:
            return list(self.ws.events())
        except RemoteProtocolError as e:  # the client side of a handshake answer it cannot take
            self.bad_request = e
            return []

    def send(self, event: Event) -> None:
        """Encode `event` into `out`. LocalProtocolError when the WebSocket's state does not allow it."""
        self.write(self.ws.send(event))

    def write(self, data: bytes) -> None:
        if not data or self.dead:
            return
        try:
            with memoryview(data) as view:
                while view:
                    n = self.tls.write(view)
                    view = view[n:]
        except ssl.SSLError as e:
            self.dead = True
            self.error = f"TLS: {e.reason or e.__class__.__name__}"
        self._pull()

    def send_frames(self, frames: list[bytes]) -> None:
        """Tunnel messages (each already framed) in as few binary WebSocket messages as MAX_WS_MESSAGE allows."""
        batch = bytearray()
        for f in frames:
            if batch and len(batch) + len(f) > MAX_WS_MESSAGE:
                self.send(BytesMessage(bytes(batch)))
                batch.clear()
            batch += f
        if batch:
            self.send(BytesMessage(bytes(batch)))

    def _pull(self) -> None:
        if self._out.pending:
            self.out += self._out.read()

    def flush(self) -> None:
        while self.out and not self.dead:
            try:
                n = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                return
            except OSError as e:
                self.dead = True
                self.error = self.error or e.strerror or e.__class__.__name__
                self.out.clear()
                return
            del self.out[:n]

    def close_notify(self) -> None:
        """Queue TLS's close_notify (the orderly end of the TLS layer) after everything already in `out`."""
        if self.tls_ready and not self.dead:
            with contextlib.suppress(ssl.SSLError):  # SSLWantReadError: the peer's close_notify is not needed
                self.tls.unwrap()
            self._pull()

    def close(self) -> None:
        self.dead = True
        self.out.clear()
        with contextlib.suppress(OSError):
            self.sock.close()


def server_context(cert_file: Path | str, key_file: Path | str) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert_file), str(key_file))
    return ctx


def foreign_context() -> ssl.SSLContext:
    """A server certificate for localhost and 127.0.0.1 from a CA made for the occasion (no device trusts it)."""
    import tempfile

    from .pki import CertificateAuthority

    with tempfile.TemporaryDirectory() as d:
        ca = CertificateAuthority(Path(d) / "ca", "another CA")
        issued = ca.issue_server("server", ["localhost", "127.0.0.1"], days=1)
        assert issued.key_path is not None
        return server_context(issued.cert_path, issued.key_path)
