"""The local cloud's services process: answers device requests that reach it through the broker.

Provisioning requests arrive from the broker plugin on `$localcloud/req/<topic>` with the
sender's client id and certificate CN as user properties (so identity comes from the broker, not
from the request). Replies go back through `$localcloud/deliver` to that client alone, as AWS
does. Every payload is hostile: decoding and validation failures become AWS-shaped rejections
and the service keeps running.
"""

from __future__ import annotations

import argparse
import json
import logging
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any

from .artifacts import Artifacts
from .cloud import ROTATION_TEMPLATE, SERVICE_CN, TEMPLATE_NAME, LocalCloud
from .commands import Commands, printable
from .commands import encode as commands_encode
from .commands import reply_topic as commands_reply_topic
from .commands import route as commands_route
from .defender import DefenderStore
from .fleet import FleetProvisioning, reject
from .jobs import Jobs
from .jobs import encode as jobs_encode
from .jobs import route as jobs_route
from .shadows import Shadows
from .shadows import route as shadows_route
from .streams import Streams, encode_block_payload
from .streams import route as streams_route
from .tunnels import TunnelRegistry, TunnelService

log = logging.getLogger("localcloud.service")

MAX_REQUEST_BYTES = 64 * 1024
REQ_PREFIX = "$localcloud/req/"


def decode(payload: bytes, fmt: str) -> Any:
    if fmt == "json":
        return json.loads(payload.decode("utf-8"))
    import cbor2

    return cbor2.loads(payload)


def encode(doc: dict, fmt: str) -> bytes:
    if fmt == "json":
        return json.dumps(doc, separators=(",", ":")).encode()
    import cbor2

    return cbor2.dumps(doc)


class Service:
    def __init__(self, cloud: LocalCloud, port: int):
        self.cloud = cloud
        self.port = port
        from . import policy

        self.claim_rules = policy.rules(policy.load_policy("claim-policy.json"))
        self._permits = policy.permits
        template = json.loads(
            (Path(__file__).resolve().parent.parent / "provisioning" / "fleet-template.json").read_text()
        )
        settings = cloud.settings()
        days = float(settings["device_cert_days"])
        self.fleet = FleetProvisioning(
            cloud.registry, cloud.ca, TEMPLATE_NAME, template, on_change=cloud.reconcile, cert_days=days
        )
        rotation = json.loads(
            (Path(__file__).resolve().parent.parent / "provisioning" / "rotation-template.json").read_text()
        )
        self.rotation = FleetProvisioning(
            cloud.registry,
            cloud.ca,
            ROTATION_TEMPLATE,
            rotation,
            on_change=cloud.reconcile,
            allow_list_enabled=False,
            caller_kind="device",
            cert_days=days,
            refused=bool(settings["rotation_refused"]),
            leave_inactive=bool(settings["rotation_new_inactive"]),
        )
        self.artifacts = Artifacts.open(cloud.directory)
        self.jobs = Jobs(cloud.registry.db, cloud.registry.lock, resolve_document=self.artifacts.resolve)
        self.defender = DefenderStore(
            cloud.registry.db, cloud.registry.lock, float(cloud.settings()["defender_min_interval_s"])
        )
        self.streams = Streams(cloud.registry.db, cloud.registry.lock, cloud.directory / "streams")
        self.shadows = Shadows(cloud.registry.db, cloud.registry.lock)
        self.commands = Commands(cloud.registry.db, cloud.registry.lock)
        self.tunnels = TunnelRegistry(cloud.registry.db, cloud.registry.lock)
        self._last_next: dict[str, str | None] = {}  # thing -> job id last sent on notify-next
        self._last_list: dict[str, str] = {}
        self._send_lock = threading.Lock()
        self._work = threading.Lock()  # one request at a time: the registry and CRL change together
        self.client = None
        self.connected = threading.Event()
        self.stopped = threading.Event()

    def start(self) -> None:
        from awsiot import mqtt5_client_builder

        pki = self.cloud.directory / "pki"
        self.client = mqtt5_client_builder.mtls_from_path(
            endpoint="localhost",
            port=self.port,
            cert_filepath=str(pki / "service.pem"),
            pri_key_filepath=str(pki / "service.key"),
            ca_filepath=str(self.cloud.ca.cert_path),
            client_id=SERVICE_CN,
            enable_metrics_collection=False,
            min_reconnect_delay_ms=100,
            max_reconnect_delay_ms=2000,
            on_publish_received=self._on_publish,
            on_lifecycle_connection_success=self._on_connected,
            on_lifecycle_stopped=lambda d: self.stopped.set(),
        )
        self.client.start()

    def _on_connected(self, _data) -> None:
        import awscrt.mqtt5 as m5

        # no_local: the service's own replies on these topics must not come back to it.
        # Never block the CRT's event-loop thread: readiness is signalled when the SUBACK arrives.
        fut = self.client.subscribe(
            m5.SubscribePacket(
                [
                    m5.Subscription(t, m5.QoS.AT_LEAST_ONCE, no_local=True)
                    for t in (
                        "$aws/things/+/jobs/#",
                        "$aws/things/+/defender/metrics/+",
                        "$aws/things/+/streams/+/describe/+",
                        "$aws/things/+/streams/+/get/+",
                        "dt/+/certificate-rotation/+",
                        "$aws/things/+/shadow/+",
                        "$aws/things/+/shadow/name/+/+",
                        "$aws/commands/things/+/executions/+/response",
                        "$aws/commands/things/+/executions/+/response/+",
                    )
                ]
            )
        )
        fut.add_done_callback(lambda f: self.connected.set() if not f.exception() else log.error("subscribe failed"))

    def stop(self) -> None:
        if self.client:
            self.client.stop()
            self.stopped.wait(5)

    # -- dispatch ----------------------------------------------------------------------------
    def _on_publish(self, data) -> None:
        p = data.publish_packet
        props = {u.name: u.value for u in (p.user_properties or [])}
        try:
            self.handle(p.topic, bytes(p.payload or b""), props.get("client-id", ""), props.get("username", ""))
        except Exception:  # a bug must not take the service down; the device times out and retries
            log.exception("request on %s failed", p.topic)

    def handle(self, topic: str, payload: bytes, client_id: str, username: str) -> None:
        if topic == "$localcloud/jitp":  # the plugin refused an unknown certificate of a registered CA (jitp.py)
            from .jitp import JustInTimeProvisioning

            with self._work:
                log.info(
                    "jitp (client %s): %s",
                    client_id,
                    JustInTimeProvisioning(self.cloud.registry, self.cloud.reconcile).register(payload),
                )
            return
        if topic.startswith("dt/") and "/certificate-rotation/" in topic:
            with self._work:
                self.handle_rotation(topic, payload)
            return
        if topic.startswith("$aws/commands/"):
            with self._work:
                self.handle_command_response(topic, payload)
            return
        if topic.startswith("$aws/things/"):
            with self._work:
                if topic.split("/", 4)[3:4] == ["shadow"]:
                    self.handle_shadow(topic, payload)
                elif "/defender/metrics/" in topic:
                    self.handle_defender(topic, payload)
                elif "/streams/" in topic:
                    self.handle_stream(topic, payload)
                else:
                    self.handle_jobs(topic, payload)
            return
        if not topic.startswith(REQ_PREFIX) or not client_id:
            return
        original = topic[len(REQ_PREFIX) :]
        route = route_request(original)
        if route is None:
            return  # e.g. a device publishing to a response topic: AWS ignores it, so do we
        op, fmt, template = route
        caller = self.cloud.registry.certificate_by_cn(username)
        fleet = self.fleet
        if (
            caller is not None
            and caller.kind == "device"
            and caller.status == "ACTIVE"
            and caller.thing
            and (op == "create-from-csr" and fmt == "json" or op == "provision" and template == ROTATION_TEMPLATE)
        ):
            fleet = self.rotation  # a device renewing its own certificate (the device policy allows these two)
        elif (
            caller is None
            or caller.status != "ACTIVE"
            or caller.kind != "claim"
            or not self._permits(self.claim_rules, "write", original)
        ):
            # The broker refused this publish (PUBACK 135); AWS sends no reply either.
            log.info("dropped %s from %s (%s): not permitted by the claim policy", original, client_id, username)
            return
        with self._work:
            if len(payload) > MAX_REQUEST_BYTES:
                ok, doc = reject(400, "InvalidPayload", f"payload larger than {MAX_REQUEST_BYTES} bytes")
            else:
                try:
                    req = decode(payload, fmt) if payload else {}
                except Exception as e:
                    ok, doc = reject(
                        400, "InvalidPayload", f"payload is not valid {fmt.upper()} ({e.__class__.__name__})"
                    )
                else:
                    if op == "create-from-csr":
                        ok, doc = fleet.create_from_csr(req, username)
                    elif op == "create":
                        ok, doc = fleet.create_keys(req, username)
                    else:
                        ok, doc = fleet.register_thing(template, req, username)
            if ok:
                doc = self._tampered(op, doc)
            log.info("%s from %s (%s): %s", op, client_id, username, "accepted" if ok else doc.get("errorCode"))
            self.deliver(client_id, f"{original}/{'accepted' if ok else 'rejected'}", encode(doc, fmt))

    def _tampered(self, op: str, doc: dict) -> dict:
        """Tests only (setting tamper_answers): an accepted answer with fields replaced after the cloud
        did its work, as a hostile network or a broken cloud would deliver it. Never set by default."""
        overrides = (self.cloud.settings().get("tamper_answers") or {}).get(op)
        if not overrides:
            return doc
        log.warning("%s: answer tampered with for a test (%s)", op, ", ".join(sorted(overrides)))
        return {**doc, **overrides}

    def handle_rotation(self, topic: str, payload: bytes) -> None:
        """The cloud side of a certificate rotation (on AWS: an IoT rule on this topic and a Lambda).

        `dt/<thing>/certificate-rotation/commit` {"newCertificateId", "oldCertificateId"}: the device
        connected with its new certificate, so the old one is deactivated. `.../abandon`
        {"certificateId"}: a new certificate the device gave up on is deactivated. Only certificates
        attached to that thing are touched, the one in use is never deactivated, and repeats are
        answered the same. The broker's ACL already bound the topic to the thing's certificates.
        """
        p = topic.split("/")
        if len(p) != 4 or p[3] not in ("commit", "abandon"):
            return
        thing, action = p[1], p[3]
        reply = f"cmd/{thing}/certificate-rotation/{action}"
        try:
            req = json.loads(payload)
            if not isinstance(req, dict):
                raise ValueError
        except ValueError:
            self.publish(
                reply + "/rejected", json.dumps({"code": "InvalidJson", "message": "not a JSON object"}).encode()
            )
            return
        reg = self.cloud.registry
        token = req.get("clientToken") if isinstance(req.get("clientToken"), str) else None

        def answer(ok: bool, code: str = "", message: str = "") -> None:
            doc = {"clientToken": token} if token else {}
            doc.update({} if ok else {"code": code, "message": message})
            self.publish(f"{reply}/{'accepted' if ok else 'rejected'}", json.dumps(doc).encode())
            log.info("certificate rotation %s for %s: %s", action, thing, "accepted" if ok else code)

        if action == "commit":
            new, old = (
                reg.certificate(str(req.get("newCertificateId"))),
                reg.certificate(str(req.get("oldCertificateId"))),
            )
            if new is None or new.thing != thing or new.status != "ACTIVE":
                return answer(False, "InvalidRequest", "the new certificate is not active and attached to this thing")
            if old is None or old.thing != thing or old.id == new.id:
                return answer(False, "InvalidRequest", "the old certificate is not another certificate of this thing")
            if old.status == "ACTIVE":
                reg.set_status(old.id, "INACTIVE")
                self.cloud.reconcile()
            return answer(True)
        cert = reg.certificate(str(req.get("certificateId")))
        if cert is None or cert.thing != thing:
            return answer(False, "InvalidRequest", "not a certificate of this thing")
        others = [c for c in reg.certificates() if c.thing == thing and c.status == "ACTIVE" and c.id != cert.id]
        if not others:
            return answer(False, "InvalidRequest", "the thing's only active certificate cannot be abandoned")
        if cert.status == "ACTIVE":
            reg.set_status(cert.id, "INACTIVE")
            self.cloud.reconcile()
        return answer(True)

    def handle_jobs(self, topic: str, payload: bytes) -> None:
        """Jobs requests: the broker's ACL already bound `$aws/things/T/...` to T's certificate."""
        r = jobs_route(topic)
        if r is None:
            return  # notifications, replies of ours, or not a jobs API topic
        thing, op, job_id = r
        if len(payload) > MAX_REQUEST_BYTES:
            suffix, doc = (
                "rejected",
                {"code": "InvalidRequest", "message": "payload too large", "timestamp": int(time.time())},
            )
        else:
            try:
                req = json.loads(payload.decode("utf-8")) if payload else {}
            except (ValueError, UnicodeDecodeError):
                suffix, doc = (
                    "rejected",
                    {"code": "InvalidJson", "message": "payload is not valid JSON", "timestamp": int(time.time())},
                )
            else:
                suffix, doc = self.jobs.handle(thing, op, job_id, req)
        log.info("jobs %s %s %s: %s", thing, op, job_id or "", suffix if suffix == "accepted" else doc.get("code"))
        self.publish(f"{topic}/{suffix}", jobs_encode(doc))  # a raw job document goes out as given
        self.send_job_notifications()

    def handle_defender(self, topic: str, payload: bytes) -> None:
        p = topic.split("/")
        if len(p) != 6 or p[3:5] != ["defender", "metrics"] or p[5] not in ("json", "cbor"):
            return  # our own replies (…/accepted) never come back (no_local); anything else is not an API
        thing, fmt = p[2], p[5]
        # AWS answers a report it cannot read with InvalidPayload, "Malformed metrics report", and a timestamp
        # in epoch ms: https://docs.aws.amazon.com/iot/latest/developerguide/device-defender-troubleshoot.html
        rejected = {"thingName": thing, "status": "REJECTED", "timestamp": int(time.time() * 1000)}
        if len(payload) > MAX_REQUEST_BYTES:
            ok, doc = (
                False,
                {
                    **rejected,
                    "statusDetails": {
                        "ErrorCode": "InvalidPayload",
                        "ErrorMessage": "Malformed metrics report: too large",
                    },
                },
            )
        else:
            try:
                report = decode(payload, fmt)
            except Exception as e:
                ok, doc = (
                    False,
                    {
                        **rejected,
                        "statusDetails": {
                            "ErrorCode": "InvalidPayload",
                            "ErrorMessage": (
                                f"Malformed metrics report: not valid {fmt.upper()} ({e.__class__.__name__})"
                            ),
                        },
                    },
                )
            else:
                ok, doc = self.defender.receive(thing, fmt, report)
        log.info("defender report from %s (%s): %s", thing, fmt, doc["status"])
        self.publish(f"{topic}/{'accepted' if ok else 'rejected'}", encode(doc, fmt))

    def handle_shadow(self, topic: str, payload: bytes) -> None:
        """Device Shadow get/update/delete (named and classic); the ACL bound the thing to the caller."""
        r = shadows_route(topic)
        if r is None:
            return  # e.g. $aws/things/T/shadow/name: not an API topic
        thing, name, op = r
        out = self.shadows.request(thing, name, op, payload)
        log.info("shadow %s %s %s: %s", thing, name or "(classic)", op, out[0][0].rsplit("/", 1)[1])
        for reply_topic, doc in out:
            self.publish(reply_topic, json.dumps(doc, separators=(",", ":")).encode())

    def send_shadow_outbox(self) -> None:
        """Publications of shadow updates made outside MQTT (the CLI's `shadows update`)."""
        for topic, body in self.shadows.take_outbox():
            self.publish(topic, body)

    def handle_command_response(self, topic: str, payload: bytes) -> None:
        """A device's UpdateCommandExecution; the broker's ACL bound `$aws/commands/things/T/...` to T."""
        r = commands_route(topic)
        if r is None:
            return  # not a response topic (our own replies never come back: no_local)
        thing, execution_id, fmt = r
        ok, doc = self.commands.device_response(thing, execution_id, fmt, payload)
        log.info(
            "command execution %s on %s: %s",
            printable(execution_id),
            thing,
            "accepted" if ok else f"{doc['error']} ({printable(doc['errorMessage'])})",
        )
        self.publish(commands_reply_topic(thing, execution_id, fmt, ok), commands_encode(doc, fmt))
        self.send_commands_outbox()  # the status-change event

    def send_commands_outbox(self) -> None:
        """Command requests (started by the CLI) with their content type and expiry, and execution events;
        executions whose timeout passed become TIMED_OUT first."""
        import awscrt.mqtt5 as m5

        for eid in self.commands.expire():
            log.info("command execution %s: no response from the device, TIMED_OUT", eid)
        for req in self.commands.take_outbox():
            if req.expiry_s is None:
                self.publish(req.topic, req.payload)
                continue
            log.info("command request on %s (%s, expires in %d s)", req.topic, req.content_type, req.expiry_s)
            with self._send_lock:
                self.client.publish(
                    m5.PublishPacket(
                        topic=req.topic,
                        payload=req.payload,
                        qos=m5.QoS.AT_LEAST_ONCE,
                        content_type=req.content_type,
                        message_expiry_interval_sec=req.expiry_s,
                    )
                )

    def send_tunnel_notifications(self) -> None:
        """`$aws/things/<thing>/tunnels/notify` for tunnels opened elsewhere (the CLI's `tunnels open`)."""
        for topic, body in self.tunnels.take_outbox():
            log.info("tunnel notification on %s", topic)
            self.publish(topic, body)

    def handle_stream(self, topic: str, payload: bytes) -> None:
        r = streams_route(topic)
        if r is None:
            return
        thing, stream_id, op, fmt = r
        base = f"$aws/things/{thing}/streams/{stream_id}"
        if len(payload) > MAX_REQUEST_BYTES:
            replies = [("rejected", {"o": "InvalidRequest", "m": "request too large"})]
        else:
            try:
                req = decode(payload, fmt) if payload else {}
            except Exception:
                replies = [
                    (
                        "rejected",
                        {
                            "o": "InvalidJson" if fmt == "json" else "InvalidCbor",
                            "m": f"payload is not valid {fmt.upper()}",
                        },
                    )
                ]
            else:
                replies = self.streams.handle(stream_id, op, req)
        for kind, doc in replies:
            self.publish(f"{base}/{kind}/{fmt}", encode(encode_block_payload(doc, fmt), fmt))
        log.info("stream %s %s from %s: %d %s", stream_id, op, thing, len(replies), replies[0][0] if replies else "-")

    def send_job_notifications(self) -> None:
        """notify when a thing's pending list changes; notify-next when its next job changes."""
        for job_id_thing in self.jobs.expire_steps():
            log.info("job %s on %s: step timeout, TIMED_OUT", *job_id_thing)
        for thing, notify, nxt in self.jobs.take_notifications():
            listing = json.dumps(notify["jobs"], sort_keys=True)
            if self._last_list.get(thing) != listing:
                self._last_list[thing] = listing
                self.publish(f"$aws/things/{thing}/jobs/notify", json.dumps(notify).encode())
            next_id = nxt.get("execution", {}).get("jobId")
            if thing not in self._last_next or self._last_next[thing] != next_id:
                self._last_next[thing] = next_id
                self.publish(f"$aws/things/{thing}/jobs/notify-next", jobs_encode(nxt))

    def publish(self, topic: str, body: bytes) -> None:
        import awscrt.mqtt5 as m5

        with self._send_lock:
            self.client.publish(m5.PublishPacket(topic=topic, payload=body, qos=m5.QoS.AT_LEAST_ONCE))

    def deliver(self, client_id: str, topic: str, body: bytes) -> None:
        import awscrt.mqtt5 as m5

        frame = f"{client_id}\n{topic}\n".encode() + body
        with self._send_lock:
            self.client.publish(m5.PublishPacket(topic="$localcloud/deliver", payload=frame, qos=m5.QoS.AT_LEAST_ONCE))


def route_request(topic: str) -> tuple[str, str, str | None] | None:
    """(operation, format, template) for a provisioning request topic, else None."""
    parts = topic.split("/")
    certificates = len(parts) == 4 and parts[:2] == ["$aws", "certificates"] and parts[3] in ("json", "cbor")
    if certificates and parts[2] in ("create", "create-from-csr"):
        return parts[2], parts[3], None
    if (
        len(parts) == 5
        and parts[:2] == ["$aws", "provisioning-templates"]
        and parts[3] == "provision"
        and parts[4] in ("json", "cbor")
        and parts[2]
    ):
        return "provision", parts[4], parts[2]
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="localcloud.service")
    ap.add_argument("--dir", type=Path, required=True)
    ap.add_argument("--port", type=int, required=True)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cloud = LocalCloud(args.dir)
    svc = Service(cloud, args.port)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *a: stop.set())
    signal.signal(signal.SIGINT, lambda *a: stop.set())
    pki = cloud.directory / "pki"
    https = svc.artifacts.serve(pki / "server.pem", pki / "server.key")
    (cloud.directory / "artifacts.port").write_text(str(svc.artifacts.port))
    tunnels = TunnelService(svc.tunnels, pki / "server.pem", pki / "server.key").start()
    (cloud.directory / "tunnels.port").write_text(str(tunnels.port))
    svc.start()
    if not svc.connected.wait(15):
        log.error("could not connect to the broker on port %d", args.port)
        svc.stop()
        return 1
    (cloud.directory / "service.ready").write_text("ok\n")
    log.info("services ready on port %d", args.port)
    # Step timers and jobs created by the CLI are picked up here (a quarter-second tick).
    while not stop.wait(0.25):
        try:
            with svc._work:
                svc.send_job_notifications()
                svc.send_shadow_outbox()
                svc.send_commands_outbox()
                svc.send_tunnel_notifications()
        except Exception:
            log.exception("job timers failed")
    svc.stop()
    tunnels.stop()
    https.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
