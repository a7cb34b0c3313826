"""The MQTT 5 connection to AWS IoT Core over mutual TLS, with the device key on a PKCS#11 token.

Built with awsiotsdk's `mqtt5_client_builder.mtls_with_pkcs11`, so the TLS handshake's signature is
made on the token. The server is verified against the configured root CA only (the system trust
store is replaced, not extended), with host name checking, and TLS 1.2 as the minimum. The CRT
reconnects by itself with exponential backoff and full jitter between the configured bounds.

`stop()` matters on a TPM: swtpm and small TPMs have three object/session slots, and a process
that exits with its client still open leaks them until the next TPM reset. We stop the client,
wait for the stopped event, and drop the client and the PKCS#11 library (C_Finalize) in order.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent.base.config import Config
from agent.base.errors import BrokerConnectionError, CredentialError
from agent.session.feature import MessageProperties

if TYPE_CHECKING:  # awscrt loads late, in prepare(): the daemon starts without it
    from concurrent.futures import Future

    import awscrt.io
    import awscrt.mqtt5

log = logging.getLogger("agent.connection")

# PUBACK reason codes that mean the broker took the message: success, no matching subscribers.
PUBACK_ACCEPTED = (0, 16)
ACK_TIMEOUT_S = 60


@dataclass(frozen=True, eq=False)
class ConnectionSettings:
    endpoint: str
    port: int
    ca_file: Path
    client_id: str  # the thing name: AWS IoT policies key on it
    certificate_file: Path
    pkcs11_library: Path
    token_label: str
    key_label: str
    pin: str = field(repr=False)  # never printed
    keepalive_s: int = 60
    connect_timeout_s: float = 30.0
    reconnect_min_s: float = 1.0
    reconnect_max_s: float = 120.0
    reconnect_reset_after_s: float = 30.0
    aws_iot_core_limits: bool = True

    @classmethod
    def from_config(
        cls, cfg: Config, client_id: str, certificate_file: Path, key_label: str, pin: str
    ) -> ConnectionSettings:
        """The one place a connection's settings come from the config: the device's sessions and the
        claim connection differ only in client ID, certificate and key."""
        b = cfg.broker
        return cls(
            endpoint=b.endpoint,
            port=b.port,
            ca_file=cfg.resolve(b.ca_file),
            client_id=client_id,
            certificate_file=certificate_file,
            pkcs11_library=cfg.resolve(cfg.pkcs11.library),
            token_label=cfg.pkcs11.token_label,
            key_label=key_label,
            pin=pin,
            keepalive_s=b.keepalive_s,
            connect_timeout_s=b.connect_timeout_s,
            reconnect_min_s=b.reconnect_min_s,
            reconnect_max_s=b.reconnect_max_s,
            reconnect_reset_after_s=b.reconnect_reset_after_s,
            aws_iot_core_limits=b.aws_iot_core_limits,
        )


@dataclass(frozen=True, eq=False)
class LifecycleEvent:
    kind: str  # attempting, connected, failed, disconnected, stopped
    at: float  # time.monotonic()
    detail: str = ""


class Connection:
    """One broker session; thread-safe to publish from any thread once connected."""

    def __init__(
        self,
        settings: ConnectionSettings,
        on_message: Callable[[str, bytes], None] | None = None,
        on_event: Callable[[LifecycleEvent], None] | None = None,
    ):
        self.settings = settings
        self._on_message = on_message
        # Decided once, not per message: whether the handler takes MQTT 5 properties (the daemon's router does).
        self._with_properties = bool(getattr(on_message, "takes_properties", False))
        self._on_event = on_event
        self.connected = threading.Event()
        self._stopped = threading.Event()
        self._client: awscrt.mqtt5.Client | None = None
        self._lib: awscrt.io.Pkcs11Lib | None = None
        self._started = False
        self.events: list[LifecycleEvent] = []
        self.connect_count = 0
        self.refusals = 0  # consecutive failures where the broker refused this identity (see REFUSED)
        self.refusal_limit = 0  # when > 0: stop trying after this many refusals in a row and set `refused`
        self.refused = threading.Event()

    # -- lifecycle --------------------------------------------------------------------------
    def prepare(self) -> None:
        """Load the PKCS#11 module, log in, build the TLS context and client: no network I/O.

        Split from start() so the daemon can do this while the clock gate waits for NTP; a wrong
        PIN or missing key is reported here, before anything touches the network.
        """
        if self._client is not None:
            return
        import awscrt.io
        import awscrt.mqtt5
        from awsiot import mqtt5_client_builder

        s = self.settings
        if not awscrt.io.TlsCipherPref.TLSv1_2_2025_07.is_supported():
            raise BrokerConnectionError("this awscrt build cannot enforce TLS 1.2+; upgrade awscrt")
        self._lib = _load_pkcs11(s.pkcs11_library)
        try:
            self._client = mqtt5_client_builder.mtls_with_pkcs11(
                pkcs11_lib=self._lib,
                user_pin=s.pin,
                token_label=s.token_label,
                private_key_label=s.key_label,
                cert_filepath=str(s.certificate_file),
                endpoint=s.endpoint,
                port=s.port,
                ca_filepath=str(s.ca_file),  # replaces the default trust store: only this CA is trusted
                cipher_pref=awscrt.io.TlsCipherPref.TLSv1_2_2025_07,  # TLS 1.2 minimum, forward secrecy
                client_id=s.client_id,
                keep_alive_interval_sec=s.keepalive_s,
                socket_options=_socket_options(s.connect_timeout_s),
                connack_timeout_ms=int(s.connect_timeout_s * 1000),
                # A QoS 1 publish sent but never acknowledged (the connection died after the broker read it)
                # would otherwise stay pending forever (aws-iot-device-sdk-python-v2 discussion 621).
                ack_timeout_sec=ACK_TIMEOUT_S,
                # AWS IoT Core's per-connection limits (100 publishes/s, 512 KiB/s): the client paces itself
                # instead of being throttled. Off only for a broker without them (broker.aws_iot_core_limits).
                extended_validation_and_flow_control_options=(
                    awscrt.mqtt5.ExtendedValidationAndFlowControlOptions.AWS_IOT_CORE_DEFAULTS
                    if s.aws_iot_core_limits
                    else awscrt.mqtt5.ExtendedValidationAndFlowControlOptions.NONE
                ),
                retry_jitter_mode=awscrt.mqtt5.ExponentialBackoffJitterMode.FULL,
                min_reconnect_delay_ms=int(s.reconnect_min_s * 1000),
                max_reconnect_delay_ms=int(s.reconnect_max_s * 1000),
                min_connected_time_to_reset_reconnect_delay_ms=int(s.reconnect_reset_after_s * 1000),
                enable_metrics_collection=False,  # do not announce our SDK version in the MQTT username
                on_publish_received=self._on_publish,
                on_lifecycle_attempting_connect=lambda d: self._event("attempting"),
                on_lifecycle_connection_success=self._on_success,
                on_lifecycle_connection_failure=self._on_failure,
                on_lifecycle_disconnection=self._on_disconnect,
                on_lifecycle_stopped=self._on_stopped,
            )
        except Exception as e:
            self._release()
            msg, credential = _setup_error(s, e)
            raise (CredentialError if credential else BrokerConnectionError)(msg) from None

    def start(self) -> None:
        """Connect (after prepare(), which it calls if needed); the CRT keeps reconnecting from here."""
        self.prepare()
        assert self._client is not None  # prepare() built it or raised
        self._client.start()
        self._started = True

    def wait_connected(self, timeout: float) -> bool:
        return self.connected.wait(timeout)

    def stop(self, timeout: float = 10.0) -> None:
        """Disconnect cleanly and release the token; safe to call twice."""
        if self._client is not None and self._started:
            import awscrt.mqtt5

            try:
                self._client.stop(awscrt.mqtt5.DisconnectPacket())
            except Exception as e:  # already stopped
                log.debug("stop: %s", _crt_name(e))
            if not self._stopped.wait(timeout):
                log.warning("MQTT client did not report stopped within %.0f s", timeout)
        self._release()

    def _release(self) -> None:
        self._started = False
        self._client = None
        gc.collect()  # the native client and TLS context hold the library; free them first
        self._lib = None
        gc.collect()

    # -- operations -------------------------------------------------------------------------
    def publish(self, topic: str, payload: bytes | str, qos: int = 1, timeout: float = 10.0) -> int:
        """Publish and return the PUBACK reason code (see PUBACK_ACCEPTED; 135 = not authorized)."""
        import awscrt.mqtt5

        if self._client is None:
            raise BrokerConnectionError("not started")
        data = payload.encode() if isinstance(payload, str) else payload
        fut = self._client.publish(awscrt.mqtt5.PublishPacket(topic=topic, payload=data, qos=awscrt.mqtt5.QoS(qos)))
        result = fut.result(timeout)
        if qos == 0:
            return 0
        return int(result.puback.reason_code)

    def publish_async(
        self,
        topic: str,
        payload: bytes,
        qos: int = 1,
        content_type: str | None = None,
        message_expiry_s: int | None = None,
        extras: Any = None,
    ) -> Future:
        """Hand a publish to the client and return its future at once (local messaging's forwarder keeps a
        window of them). `extras`: an app's response topic, correlation data and user properties, relayed
        unaltered (agent.local_messaging.spool.Extras). Raises BrokerConnectionError when the session has no
        client."""
        import awscrt.mqtt5

        client = self._client
        if client is None:
            raise BrokerConnectionError("not started")
        packet = awscrt.mqtt5.PublishPacket(
            topic=topic,
            payload=payload,
            qos=awscrt.mqtt5.QoS(qos),
            content_type=content_type,
            message_expiry_interval_sec=message_expiry_s,
        )
        if extras:
            packet.response_topic = extras.response_topic
            packet.correlation_data_bytes = extras.correlation_data
            if extras.user_properties:
                packet.user_properties = [awscrt.mqtt5.UserProperty(k, v) for k, v in extras.user_properties]
        return client.publish(packet)

    def subscribe_async(self, topic: str, qos: int = 1) -> Future:
        import awscrt.mqtt5

        client = self._client
        if client is None:
            raise BrokerConnectionError("not started")
        return client.subscribe(
            awscrt.mqtt5.SubscribePacket(subscriptions=[awscrt.mqtt5.Subscription(topic, awscrt.mqtt5.QoS(qos))])
        )

    def unsubscribe_async(self, topic: str) -> Future:
        import awscrt.mqtt5

        client = self._client
        if client is None:
            raise BrokerConnectionError("not started")
        return client.unsubscribe(awscrt.mqtt5.UnsubscribePacket(topic_filters=[topic]))

    def subscribe(self, topic: str, qos: int = 1, timeout: float = 10.0) -> int:
        """Subscribe and return the SUBACK reason code (0-2 = granted QoS; >= 128 = refused)."""
        import awscrt.mqtt5

        if self._client is None:
            raise BrokerConnectionError("not started")
        fut = self._client.subscribe(
            awscrt.mqtt5.SubscribePacket(subscriptions=[awscrt.mqtt5.Subscription(topic, awscrt.mqtt5.QoS(qos))])
        )
        return int(fut.result(timeout).reason_codes[0])

    def service_client(self, client_class: Any, subscriptions: int, streaming: int = 0, timeout_s: float = 10.0) -> Any:
        """An awsiotsdk request-response service client (identity, jobs, shadow) over this connection.

        Features get the service they need from here, never the awscrt client itself: what they hold
        is released with the service client when they stop (the MQTT client holds the token's module)."""
        import awscrt.mqtt_request_response as rr

        if self._client is None:
            raise BrokerConnectionError("not prepared")
        return client_class(
            self._client,
            rr.ClientOptions(
                max_request_response_subscriptions=subscriptions,
                max_streaming_subscriptions=streaming,
                operation_timeout_in_seconds=int(timeout_s),
            ),
        )

    def limit_refusals(self, limit: int) -> None:
        """Stop trying after `limit` refusals of this identity in a row and set `refused` (0: never)."""
        self.refusal_limit = limit

    def last_error(self, kinds: tuple[str, ...] = ("failed",), default: str = "none yet") -> str:
        """The newest failure (or disconnection) this connection saw, as one line; a user-requested stop
        is not an error."""
        return next(
            (e.detail for e in reversed(self.events) if e.kind in kinds and "USER_REQUESTED_STOP" not in e.detail),
            default,
        )

    # -- callbacks (CRT event-loop thread) ---------------------------------------------------
    def _event(self, kind: str, detail: str = "") -> None:
        ev = LifecycleEvent(kind, time.monotonic(), detail)
        self.events.append(ev)
        if self._on_event:
            try:
                self._on_event(ev)
            except Exception:
                log.exception("lifecycle listener failed")

    def _on_success(self, data) -> None:
        self.connect_count += 1
        self.refusals = 0
        s = self.settings
        log.info("connected to %s:%d as %s", s.endpoint, s.port, s.client_id)
        self.connected.set()
        self._event("connected")

    def _on_failure(self, data) -> None:
        why = _crt_name(data.exception)
        reason = getattr(getattr(data, "connack_packet", None), "reason_code", None)
        if reason is not None:
            why += f" (CONNACK {getattr(reason, 'name', reason)})"
        if why.startswith(REFUSED) or any(f"CONNACK {r}" in why for r in REFUSED_CONNACK):
            self.refusals += 1
        else:
            self.refusals = 0
        if self.refusal_limit and self.refusals >= self.refusal_limit and not self.refused.is_set():
            self.refused.set()
            client = self._client  # None only once stop() has released it: nothing left to stop
            if client is not None:
                client.stop()  # asynchronous: no further attempt; the daemon paces the next one
        log.warning(
            "connection to %s:%d failed: %s; retrying with jittered backoff",
            self.settings.endpoint,
            self.settings.port,
            why,
        )
        self._event("failed", why)

    def _on_disconnect(self, data) -> None:
        self.connected.clear()
        why = _crt_name(data.exception)
        if why == "AWS_ERROR_MQTT5_USER_REQUESTED_STOP":
            log.info("disconnected (stop requested)")
        else:
            log.warning("disconnected: %s", why)
        self._event("disconnected", why)

    def _on_stopped(self, data) -> None:
        self.connected.clear()
        self._event("stopped")
        self._stopped.set()

    def _on_publish(self, data) -> None:
        p = data.publish_packet
        if self._on_message:
            try:
                if self._with_properties:
                    props = MessageProperties(
                        p.content_type,
                        p.message_expiry_interval_sec,
                        p.response_topic,
                        # binary as it came (awscrt's `correlation_data` is a str, or None when not UTF-8)
                        None if p.correlation_data_bytes is None else bytes(p.correlation_data_bytes),
                        tuple((u.name, u.value) for u in p.user_properties or ()),
                    )
                    self._on_message(p.topic, bytes(p.payload or b""), props)  # type: ignore[call-arg]
                else:
                    self._on_message(p.topic, bytes(p.payload or b""))
            except Exception:
                log.exception("message handler failed for %s", p.topic)


# What awscrt's set-up errors mean for the user, by the AWS_ERROR_* name in their message.
_SETUP_HINTS = {
    "AWS_ERROR_PKCS11_CKR_PIN_INCORRECT": "token {token!r} refused the PIN (a TPM locks out after repeated "
    "failures); fix the PIN file",
    "AWS_ERROR_PKCS11_CKR_PIN_LOCKED": "token {token!r}: the user PIN is locked; unlock it with the SO PIN",
    "AWS_ERROR_PKCS11_KEY_NOT_FOUND": "no single private key labelled {key!r} on token {token!r}; check "
    "pkcs11.key_label (iot-agent keys list)",
    "AWS_ERROR_PKCS11_TOKEN_NOT_FOUND": "no PKCS#11 token labelled {token!r}; check pkcs11.token_label",
    "AWS_IO_FILE_VALIDATION_FAILURE": "a certificate file is not valid PEM; check broker.ca_file and the device "
    "certificate",
}


def _setup_error(s: ConnectionSettings, e: Exception) -> tuple[str, bool]:
    """(one-line message, whether it is a credential problem that retrying cannot fix)."""
    import re

    m = re.search(r"\b(AWS_[A-Z0-9_]+)\b", str(e))
    name = m.group(1) if m else e.__class__.__name__
    hint = _SETUP_HINTS.get(name)
    if hint:
        return f"{hint.format(token=s.token_label, key=s.key_label)} ({name})", "PKCS11" in name
    return (
        f"cannot set up the TLS client for {s.endpoint}:{s.port} ({name}); check broker.ca_file, "
        "the device certificate, pkcs11.token_label, pkcs11.key_label and the PIN"
    ), False


def _load_pkcs11(path: Path, wait_s: float = 10.0) -> awscrt.io.Pkcs11Lib:
    """Load the module with STRICT initialise/finalise, so that stop() really finalises it.

    A previous connection in this process (the claim connection before the device's own) is torn
    down asynchronously by the CRT: its C_Finalize may come a moment after stop() returns. Until
    then C_Initialize answers CKR_CRYPTOKI_ALREADY_INITIALIZED, so wait for it, boundedly.
    """
    import awscrt.io

    deadline = time.monotonic() + wait_s
    while True:
        try:
            return awscrt.io.Pkcs11Lib(file=str(path), behavior=awscrt.io.Pkcs11Lib.InitializeFinalizeBehavior.STRICT)
        except Exception as e:
            if "ALREADY_INITIALIZED" in str(e) and time.monotonic() < deadline:
                gc.collect()
                time.sleep(0.05)
                continue
            raise BrokerConnectionError(
                f"{path}: cannot load the PKCS#11 module ({_crt_name(e)}: {str(e)[:120]})"
            ) from None


def wait_token_released(path: Path, wait_s: float = 10.0) -> bool:
    """True once every earlier connection in this process has finalised the PKCS#11 module (see
    _load_pkcs11), proven by initialising it once more and finalising that at once; False if not
    within wait_s. Before the agent replaces itself (exec), this matters: a module still initialised
    would take its open token connection into the new program (swtpm serves one client at a time, so
    the new one would wait forever) and leave its TPM objects loaded."""
    try:
        lib = _load_pkcs11(path, wait_s)
    except BrokerConnectionError:
        return False
    del lib  # the only reference: C_Finalize runs now
    gc.collect()
    return True


def _socket_options(connect_timeout_s: float):
    import awscrt.io

    opts = awscrt.io.SocketOptions()
    opts.connect_timeout_ms = int(connect_timeout_s * 1000)
    return opts


# The broker (not the network) said no to this identity: a TLS handshake it aborted (a revoked, inactive or
# unknown client certificate: with TLS 1.3 the server's alert arrives after the client's Finished, as a
# read failure; also a server this device does not trust), or a CONNACK refusing the client. Only
# failures while connecting count, so a read failure on an established session is not one of them.
REFUSED = ("AWS_IO_TLS_ERROR_NEGOTIATION_FAILURE", "AWS_IO_TLS_ERROR_READ_FAILURE")
REFUSED_CONNACK = ("NOT_AUTHORIZED", "BANNED", "BAD_USERNAME_OR_PASSWORD", "CLIENT_IDENTIFIER_NOT_VALID")


def _crt_name(e: BaseException | None) -> str:
    if e is None:
        return "no error"
    return getattr(e, "name", None) or e.__class__.__name__
