"""`localcloud`: run and inspect the local stand-in for AWS IoT Core."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .cloud import LocalCloud

DEFAULT_DIR = Path(".localcloud")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="localcloud", description="A local stand-in for AWS IoT Core's device APIs")
    ap.add_argument("--dir", type=Path, default=DEFAULT_DIR, help="state folder (default ./.localcloud)")
    sub = ap.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="start the broker and services (creates the CA once)")
    up.add_argument("--port", type=int, default=0)
    up.add_argument(
        "--defender-min-interval",
        type=float,
        help="seconds between accepted Defender reports (AWS: 300; lower it only for tests)",
    )
    up.add_argument(
        "--ntp-port",
        type=int,
        default=0,
        metavar="PORT",
        help="also serve NTP on 127.0.0.1:PORT (UDP) with chronyd, the trusted clock for agents offline "
        '(clock.ntp_servers = ["127.0.0.1:PORT"]); chronyd runs with -x and never sets this '
        "machine's clock; `down` stops it",
    )
    sub.add_parser("down", help="stop them (and the NTP server of up --ntp-port); state is kept")
    sub.add_parser("status", help="running or not, and the endpoint")
    certs = sub.add_parser("certs", help="certificates")
    cs = certs.add_subparsers(dest="certs_cmd", required=True)
    cs.add_parser("list")
    for name in ("revoke", "deactivate", "activate"):
        p = cs.add_parser(name)
        p.add_argument("certificate_id")
    claim = cs.add_parser("claim", help="issue a claim certificate (software key, for the sandbox)")
    claim.add_argument("name")
    sc = cs.add_parser("sign-claim", help="the manufacturer's CA: sign a claim CSR made on a device's token")
    sc.add_argument("--csr", type=Path, required=True)
    sc.add_argument("--out", type=Path, required=True)
    things = sub.add_parser("things", help="things")
    tsub = things.add_subparsers(dest="things_cmd", required=True)
    tsub.add_parser("list")
    tq = tsub.add_parser("query", help="things whose shadow matches a condition (stands in for fleet indexing)")
    tq.add_argument("--shadow", required=True, help="named shadow, e.g. inventory ('' for the classic shadow)")
    tq.add_argument("--where", required=True, help="e.g. 'reported.targets.app.current<1.2.0' or 'reported.x exists'")
    shadows = sub.add_parser("shadows", help="device shadows")
    shsub = shadows.add_subparsers(dest="shadows_cmd", required=True)
    sg = shsub.add_parser("get", help="the shadow document (GetThingShadow)")
    sg.add_argument("thing")
    sg.add_argument("name", nargs="?", default="", help="shadow name (omit for the classic shadow)")
    su = shsub.add_parser(
        "update", help="set desired state as an app would (UpdateThingShadow); the device gets the delta"
    )
    su.add_argument("thing")
    su.add_argument("name", nargs="?", default="")
    su.add_argument("--desired", required=True, help="JSON object to merge into desired (null deletes a key), or null")
    sl = shsub.add_parser("list")
    sl.add_argument("--thing")
    jobs = sub.add_parser("jobs", help="jobs")
    js = jobs.add_subparsers(dest="jobs_cmd", required=True)
    jc = js.add_parser("create")
    target = jc.add_mutually_exclusive_group(required=True)
    target.add_argument("--thing")
    target.add_argument(
        "--query", help="every thing whose shadow matches, e.g. 'reported.targets.app.current<1.2.0' (with --shadow)"
    )
    jc.add_argument("--shadow", help="the named shadow --query reads (e.g. inventory)")
    jc.add_argument("--document", type=Path, required=True, help="job document (JSON file)")
    jc.add_argument("--job-id", help="default: job-<timestamp>")
    jc.add_argument("--step-timeout", type=int, help="minutes; an IN_PROGRESS step that runs longer is TIMED_OUT")
    js.add_parser("list")
    jd = js.add_parser("describe")
    jd.add_argument("job_id")
    jd.add_argument("--thing", required=True)
    jx = js.add_parser("cancel")
    jx.add_argument("job_id")
    commands = sub.add_parser("commands", help="AWS IoT Device Management commands: one instruction to one thing")
    csub = commands.add_subparsers(dest="commands_cmd", required=True)
    cc = csub.add_parser("create", help="a reusable command with a static payload (CreateCommand)")
    cc.add_argument("command_id", help="1-128 characters of [A-Za-z0-9_-]")
    payload = cc.add_mutually_exclusive_group(required=True)
    payload.add_argument("--payload-file", type=Path, help="the payload, as bytes")
    payload.add_argument("--payload", help="the payload as text, e.g. JSON")
    cc.add_argument(
        "--content-type",
        default="application/json",
        help="application/json or application/cbor (request topic .../request/json|cbor), or any other type "
        "(.../request, the type in the MQTT 5 content type); default application/json",
    )
    cc.add_argument("--description", default="")
    cst = csub.add_parser("start", help="send it to a thing (StartCommandExecution); prints the execution id")
    cst.add_argument("command_id")
    cst.add_argument("--thing", required=True)
    cst.add_argument(
        "--timeout",
        type=int,
        default=60,
        help="seconds the device has to report a terminal status (1-43200, default 60)",
    )
    csub.add_parser("get", help="an execution: status, statusReason, result, timestamps").add_argument("execution_id")
    cl = csub.add_parser("list", help="executions, oldest first")
    cl.add_argument("--thing")
    cl.add_argument("--command")
    streams = sub.add_parser("streams", help="MQTT file streams")
    ssub = streams.add_subparsers(dest="streams_cmd", required=True)
    sc = ssub.add_parser("create")
    sc.add_argument(
        "--file", type=Path, action="append", required=True, help="repeat for several files (ids 0, 1, ...)"
    )
    sc.add_argument("--stream-id")
    sc.add_argument("--description", default="")
    art = sub.add_parser("artifacts", help="files for jobs, served over HTTPS with presigned URLs")
    asub = art.add_subparsers(dest="artifacts_cmd", required=True)
    ap_put = asub.add_parser("put")
    ap_put.add_argument("file", type=Path)
    ap_put.add_argument("--key")
    defender = sub.add_parser("defender", help="Device Defender reports")
    dsub = defender.add_subparsers(dest="defender_cmd", required=True)
    dr = dsub.add_parser("reports")
    dr.add_argument("thing")
    allow = sub.add_parser("allow", help="add serial numbers to the pre-provisioning allow list")
    allow.add_argument("serials", nargs="+")
    for name, text in (
        ("quarantine", "put a thing in the quarantine group (only jobs, streams, certificate rotation)"),
        ("release", "take a thing out of the quarantine group"),
    ):
        tsub.add_parser(name, help=text).add_argument("thing")
    ca = sub.add_parser("ca", help="manufacturer CA certificates (just-in-time provisioning)")
    casub = ca.add_subparsers(dest="ca_cmd", required=True)
    car = casub.add_parser("register", help="register a CA with its JITP template (again: replace the template)")
    car.add_argument("--cert", type=Path, required=True, help="the CA certificate (PEM)")
    car.add_argument("--template", type=Path, required=True, help="e.g. provisioning/jitp-template.json")
    casub.add_parser("list")
    tun = sub.add_parser("tunnels", help="secure tunnels: open, close, list, and the source side (connect)")
    tusub = tun.add_subparsers(dest="tunnels_cmd", required=True)
    to = tusub.add_parser("open", help="open a tunnel to a thing (OpenTunnel); the device is notified over MQTT")
    to.add_argument("--thing", required=True)
    to.add_argument("--services", required=True, help="comma-separated service ids, e.g. SSH,HTTP (at most 3)")
    to.add_argument("--timeout", default="12h", help="lifetime, e.g. 90s, 30m or 12h (at most 12h, the default)")
    tc = tusub.add_parser(
        "connect", help="the source side: forward local TCP connections through the tunnel until Ctrl-C or SIGTERM"
    )
    token = tc.add_mutually_exclusive_group(required=True)
    token.add_argument("--token", help="the sourceAccessToken (other users may see it in ps: prefer --token-file)")
    token.add_argument("--token-file", type=Path, help="a file holding the sourceAccessToken")
    tc.add_argument(
        "--listen",
        action="append",
        required=True,
        metavar="SERVICE=HOST:PORT",
        help="where to listen for a service, e.g. SSH=127.0.0.1:2222 (port 0: a free one); once per service",
    )
    tusub.add_parser("list", help="tunnels, open and closed, with who is connected")
    tusub.add_parser("close", help="close a tunnel (CloseTunnel): both sides are disconnected").add_argument(
        "tunnel_id"
    )
    args = ap.parse_args(argv)

    cloud = LocalCloud(args.dir)
    try:
        if args.cmd == "up":
            if args.defender_min_interval is not None:
                cloud.configure(defender_min_interval_s=args.defender_min_interval)
            info = cloud.up(args.port)
            if args.ntp_port:
                info["ntp_server"] = _ntp_up(cloud.directory / "ntp", args.ntp_port)
            print(json.dumps(info, indent=1))
        elif args.cmd == "down":
            cloud.down()
            _ntp_down(cloud.directory / "ntp")
            print("stopped")
        elif args.cmd == "status":
            print(
                json.dumps(
                    {"running": cloud.running(), **(cloud.endpoint() if cloud.endpoint_file.exists() else {})}, indent=1
                )
            )
        elif args.cmd == "certs":
            if args.certs_cmd == "list":
                for c in cloud.registry.certificates():
                    print(f"{c.id}\t{c.status}\t{c.kind}\t{c.thing or '-'}\t{c.cn}")
            elif args.certs_cmd == "sign-claim":
                cert_id = cloud.sign_claim_csr(args.csr.read_bytes(), args.out)
                print(f"claim certificate {cert_id} written to {args.out}")
            elif args.certs_cmd == "claim":
                cert, key = cloud.issue_claim(args.name)
                print(f"claim certificate {cert}\nkey {key}")
            else:
                status = {"revoke": "REVOKED", "deactivate": "INACTIVE", "activate": "ACTIVE"}[args.certs_cmd]
                match = [c for c in cloud.registry.certificates() if c.id.startswith(args.certificate_id)]
                if len(match) != 1:
                    print(f"localcloud: {len(match)} certificates match {args.certificate_id!r}", file=sys.stderr)
                    return 2
                cloud.set_certificate_status(match[0].id, status)
                print(f"{match[0].id} {status}")
        elif args.cmd == "things" and args.things_cmd in ("quarantine", "release"):
            changed = getattr(cloud, args.things_cmd)(args.thing)
            state = "quarantined" if args.things_cmd == "quarantine" else "released"
            print(f"{args.thing} {state}" + ("" if changed else " (already)"))
        elif args.cmd == "ca":
            if args.ca_cmd == "register":
                try:
                    template = json.loads(args.template.read_text())
                except (OSError, ValueError) as e:
                    raise ValueError(
                        f"{args.template}: not a readable JSON template ({e.__class__.__name__})"
                    ) from None
                ca_id = cloud.register_ca(args.cert.read_bytes(), template)
                port = cloud.endpoint().get("jitp_port") if cloud.endpoint_file.exists() else None
                print(f"{ca_id}\tACTIVE\tdevices it issued connect on port {port or '(jitp_port after up)'}")
            else:
                for c in cloud.registry.ca_certificates():
                    print(f"{c.id}\t{c.status}\t{c.subject}")
        elif args.cmd == "things" and args.things_cmd == "query":
            from .shadows import Shadows, parse_where

            for thing in Shadows(cloud.registry.db, cloud.registry.lock).things_matching(
                args.shadow, *parse_where(args.where)
            ):
                print(thing)
        elif args.cmd == "things":
            for name, attrs in cloud.registry.things():
                certs = ",".join(c.id[:12] for c in cloud.registry.thing_certificates(name))
                print(f"{name}\t{json.dumps(attrs)}\t{certs}")
        elif args.cmd == "shadows":
            from .shadows import ShadowError, Shadows

            shadows = Shadows(cloud.registry.db, cloud.registry.lock)
            try:
                if args.shadows_cmd == "get":
                    print(json.dumps(shadows.get(args.thing, args.name), indent=1))
                elif args.shadows_cmd == "update":
                    try:
                        desired = json.loads(args.desired)
                    except ValueError:
                        raise ValueError("--desired is not JSON") from None
                    doc = shadows.operator_update(args.thing, args.name, {"state": {"desired": desired}})
                    print(f"version {doc['version']}")
                else:
                    for thing, name, version in shadows.list(args.thing):
                        print(f"{thing}\t{name or '(classic)'}\tv{version}")
            except ShadowError as e:
                raise ValueError(f"{e.code} {e.message}") from None
        elif args.cmd == "jobs":
            from .jobs import Jobs

            jobs = Jobs(cloud.registry.db, cloud.registry.lock)
            if args.jobs_cmd == "create":
                import time

                try:
                    document = json.loads(args.document.read_text())
                except (OSError, ValueError) as e:
                    raise ValueError(
                        f"{args.document}: not a readable JSON job document ({e.__class__.__name__})"
                    ) from None
                job_id = args.job_id or f"job-{int(time.time() * 1000)}"
                if args.query is None:
                    jobs.create(job_id, args.thing, document, args.step_timeout)
                    print(job_id)
                else:
                    from .shadows import Shadows, parse_where

                    if args.shadow is None:
                        raise ValueError("--query needs --shadow (the named shadow it reads)")
                    targets = Shadows(cloud.registry.db, cloud.registry.lock).things_matching(
                        args.shadow, *parse_where(args.query)
                    )
                    if not targets:
                        raise ValueError(f"no thing matches {args.query!r} in shadow {args.shadow!r}; no job created")
                    jobs.create_for_things(job_id, targets, document, args.step_timeout)
                    for thing in targets:
                        print(f"{job_id}\t{thing}")
            elif args.jobs_cmd == "list":
                for ex in jobs.list():
                    print(
                        f"{ex['jobId']}\t{ex['thingName']}\t{ex['status']}\tv{ex['versionNumber']}\t{json.dumps(ex['statusDetails'])}"
                    )
            elif args.jobs_cmd == "describe":
                ex = jobs.execution(args.job_id, args.thing)
                if ex is None:
                    raise ValueError(f"no execution of {args.job_id!r} for {args.thing!r}")
                print(json.dumps(ex, indent=1))
            elif args.jobs_cmd == "cancel":
                print(f"canceled {jobs.cancel(args.job_id)} execution(s)")
        elif args.cmd == "commands":
            return _commands(cloud, args)
        elif args.cmd == "streams":
            from .streams import Streams

            st = Streams(cloud.registry.db, cloud.registry.lock, cloud.directory / "streams")
            print(st.create(args.file, args.stream_id, args.description))
        elif args.cmd == "artifacts":
            from .artifacts import Artifacts

            print(Artifacts.open(cloud.directory).put(args.file, args.key))
        elif args.cmd == "defender":
            from .defender import DefenderStore

            store = DefenderStore(cloud.registry.db, cloud.registry.lock)
            for r in store.reports(args.thing):
                print(json.dumps(r))
        elif args.cmd == "tunnels":
            return _tunnels(cloud, args)
        elif args.cmd == "allow":
            cloud.registry.allow_serials(args.serials)
            print(f"allowed {len(args.serials)} serial number(s)")
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        print(f"localcloud: {e}", file=sys.stderr)
        return 2
    return 0


def _commands(cloud: LocalCloud, args: argparse.Namespace) -> int:
    from .commands import Commands

    commands = Commands(cloud.registry.db, cloud.registry.lock)
    if args.commands_cmd == "create":
        if args.payload_file is not None:
            try:
                body = args.payload_file.read_bytes()
            except OSError as e:
                raise ValueError(f"{args.payload_file}: cannot read the payload ({e.__class__.__name__})") from None
        else:
            body = args.payload.encode()
        commands.create_command(args.command_id, body, args.content_type, args.description)
        print(args.command_id)
    elif args.commands_cmd == "start":
        if not cloud.registry.has_thing(args.thing):
            raise ValueError(f"no thing {args.thing!r} (see localcloud things list)")
        started = commands.start_execution(args.command_id, args.thing, args.timeout)
        print(started["executionId"])
        if not cloud.running():
            print(
                "localcloud: not running: the request is sent once it is up (if it has not timed out)", file=sys.stderr
            )
    elif args.commands_cmd == "get":
        ex = commands.get(args.execution_id)
        if ex is None:
            raise ValueError(f"no command execution {args.execution_id!r}")
        print(json.dumps(ex, indent=1))
    else:
        for ex in commands.list(args.thing, args.command):
            reason = ex.get("statusReason", {}).get("reasonCode", "-")
            print(f"{ex['executionId']}\t{ex['commandId']}\t{ex['thingName']}\t{ex['status']}\t{reason}")
    return 0


def _tunnels(cloud: LocalCloud, args: argparse.Namespace) -> int:
    import time

    from .tunnels import TunnelRegistry

    tunnels = TunnelRegistry(cloud.registry.db, cloud.registry.lock)
    if args.tunnels_cmd == "open":
        if not cloud.registry.has_thing(args.thing):
            raise ValueError(f"no thing {args.thing!r} (see localcloud things list)")
        services = [s.strip() for s in args.services.split(",") if s.strip()]
        t = tunnels.open(args.thing, services, _duration(args.timeout))
        out = {"tunnelId": t.tunnel_id, "sourceAccessToken": t.source_token}
        print(json.dumps({**out, "destinationAccessToken": t.destination_token, "expiresAt": t.expiry}, indent=1))
        if not cloud.running():
            print("localcloud: not running: the device is notified once it is up", file=sys.stderr)
    elif args.tunnels_cmd == "list":
        for t in tunnels.list():
            d = t.describe()
            print(
                f"{t.tunnel_id}\t{t.status}\t{t.thing}\t{','.join(t.services)}\t"
                f"source {d['sourceConnectionState']}\tdestination {d['destinationConnectionState']}\t"
                f"expires {time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime(t.expiry))}"
            )
    elif args.tunnels_cmd == "close":
        if tunnels.close(args.tunnel_id):
            print(f"{args.tunnel_id} CLOSED")
        elif tunnels.get(args.tunnel_id) is None:
            raise ValueError(f"no tunnel {args.tunnel_id!r}")
        else:
            print(f"{args.tunnel_id} CLOSED (already)")
    else:
        return _tunnel_connect(cloud, args)
    return 0


def _duration(text: str) -> float:
    import re

    m = re.fullmatch(r"(\d+(?:\.\d+)?)([smh]?)", text.strip())
    if not m:
        raise ValueError(f"--timeout {text!r}: a number of seconds, or with s, m or h (e.g. 30m)")
    return float(m.group(1)) * {"": 1, "s": 1, "m": 60, "h": 3600}[m.group(2)]


def _listen_spec(text: str) -> tuple[str, tuple[str, int]]:
    service, sep, address = text.partition("=")
    host, colon, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not service or not colon or not host or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"--listen {text!r}: expected SERVICE=HOST:PORT, e.g. SSH=127.0.0.1:2222")
    return service, (host, int(port))


def _tunnel_connect(cloud: LocalCloud, args: argparse.Namespace) -> int:
    """Run a source-mode proxy in the foreground: until Ctrl-C / SIGTERM (0) or the tunnel ends (1)."""
    import signal
    import threading

    from .tunnel_source import SourceProxy

    listen = dict(_listen_spec(text) for text in args.listen)
    if len(listen) != len(args.listen):
        raise ValueError("--listen: each service once")
    token = args.token if args.token is not None else args.token_file.read_text().strip()
    port = cloud.endpoint().get("tunnels_port") if cloud.endpoint_file.exists() else None
    if not port or not cloud.running():
        raise ValueError("the local cloud is not running (localcloud up)")
    stop = threading.Event()
    proxy = SourceProxy("localhost", port, cloud.ca.cert_path, token, listen, on_end=lambda reason: stop.set())
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    try:
        addresses = proxy.start()
    except (ConnectionError, OSError, TimeoutError) as e:
        raise ValueError(str(e)) from None
    for service, (host, p) in addresses.items():
        print(f"{service} listening on {host}:{p}", flush=True)
    stop.wait()
    ended = proxy.ended.is_set()
    proxy.stop()
    if ended:
        print(f"localcloud: the tunnel ended: {proxy.end_reason}", file=sys.stderr)
        return 1
    return 0


def _ntp_pid(directory: Path) -> int | None:
    """chronyd's PID from the pidfile it writes, if that process is still a chronyd."""
    try:
        pid = int((directory / "chronyd.pid").read_text().strip())
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (OSError, ValueError):
        return None
    comm, _, rest = stat.partition("(")[2].rpartition(")")
    return pid if comm == "chronyd" and rest.split()[:1] != ["Z"] else None  # a zombie counts as gone


def _ntp_up(directory: Path, port: int) -> str:
    """chronyd serving this machine's time on 127.0.0.1:port (localcloud.ntp.Chrony), left running like
    the broker; `down` stops it by the PID in its pidfile."""
    from .ntp import Chrony

    if _ntp_pid(directory) is None:
        Chrony(directory, port).start()
    return f"127.0.0.1:{port}"


def _ntp_down(directory: Path, timeout: float = 10.0) -> None:
    import os
    import signal
    import time

    from . import pace

    pid = _ntp_pid(directory)
    if pid is None:
        return
    os.kill(pid, signal.SIGTERM)
    deadline = pace.deadline(timeout)
    while _ntp_pid(directory) == pid and time.monotonic() < deadline:
        time.sleep(0.05)
    if _ntp_pid(directory) == pid:
        os.kill(pid, signal.SIGKILL)


if __name__ == "__main__":
    sys.exit(main())
