"""The `iot-agent` command line."""

from __future__ import annotations

import logging
import os
import stat
import sys
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Any

from agent import __version__
from agent.base.config import DEFAULT_CONFIG_PATH, Config
from agent.base.errors import AgentError, ConfigError
from agent.runtime.features import check_files, load

if TYPE_CHECKING:
    import argparse


def _setup_logging(level: str) -> None:
    # Under systemd the journal adds its own timestamps.
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if os.environ.get("JOURNAL_STREAM")
        else "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
    )
    from agent.base.logfmt import basic_config  # one record, one bounded line: network text cannot forge log lines

    basic_config(
        level=getattr(logging, level.upper(), logging.INFO), format=fmt, datefmt="%Y-%m-%dT%H:%M:%S", stream=sys.stderr
    )


def _global_options(p: argparse.ArgumentParser, default: object) -> argparse.ArgumentParser:
    p.add_argument("--config", type=Path, default=default, help=f"config file (default {DEFAULT_CONFIG_PATH})")
    p.add_argument(
        "--log-level", choices=["debug", "info", "warning", "error"], default=default, help="overrides log.level"
    )
    return p


def _add(sub: argparse._SubParsersAction, name: str, **kw: Any) -> argparse.ArgumentParser:
    """A subcommand that also accepts the global options; `kw` (help=...) goes to add_parser unchanged.
    There they default to SUPPRESS, so a subcommand that does not repeat them keeps what came before it
    (`iot-agent run --config X` works as `iot-agent --config X run`)."""
    import argparse

    common = _global_options(argparse.ArgumentParser(add_help=False), argparse.SUPPRESS)
    return sub.add_parser(name, parents=[common], **kw)


LOG_LEVELS = ("debug", "info", "warning", "error")


def _service_args(argv: list[str]) -> argparse.Namespace | None:
    """The service's own command line (`run` with --config and --log-level, before or after it) read
    without argparse, or None for anything else, which argparse then parses (and explains).

    The service lives for months: argparse and what it imports (shutil, bz2, lzma, gettext, textwrap)
    would stay in its memory for one parse (about 1 MiB; bench/lifecycle_rss.py)."""
    from types import SimpleNamespace

    out: dict[str, Any] = {"config": None, "log_level": None, "command": None}
    i = 0
    while i < len(argv):
        a = argv[i]
        name, eq, value = a.partition("=")
        if name in ("--config", "--log-level"):
            if not eq:
                if i + 1 >= len(argv) or argv[i + 1].startswith("-"):
                    return None
                i, value = i + 1, argv[i + 1]
            if name == "--log-level" and value not in LOG_LEVELS:
                return None
            out["config" if name == "--config" else "log_level"] = Path(value) if name == "--config" else value
        elif a == "run" and out["command"] is None:
            out["command"] = "run"
        else:
            return None
        i += 1
    return SimpleNamespace(**out) if out["command"] == "run" else None  # type: ignore[return-value]


def _parser() -> argparse.ArgumentParser:
    import argparse

    p = _global_options(argparse.ArgumentParser(prog="iot-agent", description="AWS IoT Core device agent"), None)
    sub = p.add_subparsers(dest="command", required=True)
    _add(sub, "run", help="wait for a trustworthy clock, connect, stay connected until SIGTERM")
    _add(sub, "check-config", help="print every problem with the configuration; non-zero exit if any")
    _add(sub, "version", help="print the agent's version")
    keys = _add(sub, "keys", help="keys on the PKCS#11 token")
    ks = keys.add_subparsers(dest="keys_command", required=True)
    _add(ks, "list", help="list private keys on the token")
    g = _add(ks, "generate", help="generate an EC P-256 key pair on the token")
    g.add_argument("label")
    g.add_argument("--if-missing", action="store_true", help="keep an existing key with this label (for resuming)")
    g.add_argument("--csr-out", type=Path, help="also write a CSR for the key, signed on the token (needs --cn)")
    g.add_argument("--cn", help="the CSR's subject common name (the thing name)")
    d = _add(ks, "delete", help="delete the key pair with this label")
    d.add_argument("label")
    c = _add(ks, "csr", help="write a CSR for a token key, signed on the token")
    c.add_argument("label")
    c.add_argument("--cn", required=True, help="subject common name (the thing name)")
    c.add_argument("--out", type=Path, help="file to write (default: stdout)")
    f = _add(sub, "factory", help="production-line steps: claim key on the token, claim certificate")
    fs = f.add_subparsers(dest="factory_command", required=True)
    fi = _add(fs, "init", help="record the serial number, generate the claim key on the token, write its CSR")
    fi.add_argument("--serial", required=True)
    fi.add_argument("--csr-out", type=Path, required=True)
    fc = _add(fs, "claim-cert", help="install the claim certificate the manufacturer's CA issued for that CSR")
    fc.add_argument("certificate", type=Path)
    fk = _add(fs, "device-key", help="JITP: the device key on the token and a CSR with the thing name as CN")
    fk.add_argument("--thing", required=True)
    fk.add_argument("--csr-out", type=Path, required=True)
    fd = _add(fs, "device-cert", help="JITP: install the device certificate the manufacturer's CA issued")
    fd.add_argument("certificate", type=Path)
    _add(sub, "rotate", help="ask the running agent to rotate the device certificate now (new key on the token)")
    st = _add(sub, "status", help="the device's identity and provisioning state")
    st.add_argument("--json", action="store_true")
    pub = _add(sub, "publish", help="publish stdin to TOPIC through the agent's local endpoint (spooled at QoS 1)")
    pub.add_argument("topic")
    pub.add_argument("--qos", type=int, choices=[0, 1], default=1)
    pub.add_argument("--socket", type=Path, help="the endpoint's socket (default: from the config)")
    subs = _add(sub, "subscribe", help="print messages on TOPIC from the agent's local endpoint")
    subs.add_argument("topic", nargs="+")
    subs.add_argument("--count", type=int, default=0, help="exit after this many messages (default: never)")
    subs.add_argument("--socket", type=Path, help="the endpoint's socket (default: from the config)")
    return p


def main(argv: list[str] | None = None) -> int:
    from agent.base import killpoints

    killpoints.install()  # a no-op unless a test sweeps kill points
    args = _service_args(sys.argv[1:] if argv is None else argv) or _parser().parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    try:
        if args.command == "check-config":
            return _check_config(args.config)
        cfg = load(args.config)
        _setup_logging(args.log_level or cfg.log.level)
        problems = check_files(cfg) if args.command not in ("status", "publish", "subscribe") else []
        if problems:
            raise ConfigError(problems)
        if args.command == "run":
            from agent.runtime.daemon import install_stop_signals, run

            stop = threading.Event()
            install_stop_signals(stop)
            return run(cfg, stop, restart_in_place=True)
        if args.command == "keys":
            return _keys(cfg, args)
        if args.command == "factory":
            from agent.identity.factory import claim_cert, device_cert, device_key, init

            if args.factory_command == "init":
                print(init(cfg, args.serial, args.csr_out))
            elif args.factory_command == "device-key":
                print(device_key(cfg, args.thing, args.csr_out))
            elif args.factory_command == "device-cert":
                print(device_cert(cfg, args.certificate))
            else:
                print(claim_cert(cfg, args.certificate))
            return 0
        if args.command == "rotate":
            return _rotate(cfg)
        if args.command == "status":
            from agent.runtime.status import show

            return show(cfg, as_json=args.json)
        if args.command == "publish":
            from agent.local_messaging.cli import publish

            return publish(cfg, args.topic, args.qos, args.socket)
        if args.command == "subscribe":
            from agent.local_messaging.cli import subscribe

            return subscribe(cfg, args.topic, args.count, args.socket)
    except AgentError as e:
        for line in str(e).splitlines():
            print(f"iot-agent: {line}", file=sys.stderr)
        return e.exit_code
    return 2


def _rotate(cfg) -> int:
    """Record the request in the state (so it survives a stopped agent) and wake the running agent."""
    import os
    import signal

    from agent.base.state import StateStore
    from agent.identity.current import current_identity
    from agent.identity.rotation import Rotator

    store = StateStore(cfg.resolve(cfg.device.state_dir))
    identity = current_identity(cfg, store.load())
    Rotator(cfg, store, identity.thing_name).request(reason="requested by iot-agent rotate")
    try:
        pid = int((store.directory / "agent.pid").read_text().strip())
        os.kill(pid, signal.SIGUSR1)
        print(f"rotation requested; the running agent (pid {pid}) starts it now")
    except (OSError, ValueError):
        print("rotation requested; the agent is not running and starts it when it does")
    return 0


def _check_config(path: Path | None) -> int:
    """Every problem `run` would stop on at start, one line each, exit 2 if any: the config (types, ranges),
    its files (the CA parsed), the PIN file, then what run checks next (_startup_problems)."""
    from agent.base.pin import read_pin

    try:
        cfg = load(path)
    except ConfigError as e:
        for line in e.problems:
            print(line, file=sys.stderr)
        return 2
    problems = check_files(cfg)
    try:
        read_pin(cfg)
    except AgentError as e:
        problems.append(str(e))
    problems += [p for p in _startup_problems(cfg) if p not in problems]
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return 2
    print(f"{cfg.path}: ok")
    return 0


def _startup_problems(cfg: Config) -> list[str]:
    """What daemon._run and its first session refuse after the config, its files and the PIN, in their order,
    one line each (the same lines where the daemon has one): the state file; the identity its mode needs (a
    device certificate that parses and has not expired; in claim mode the serial number and a claim certificate
    that parses; jitp needs its factory certificate); the pinned code-signing certificate (loaded by the OTA
    handler at every session start). Imports here stay out of the daemon's start."""
    from agent.base.pemfile import MAX_CERTIFICATE_FILE_BYTES, MISSING_FILE, certificate_file_problem, read_regular_file
    from agent.base.state import StateStore
    from agent.identity.config import identity_mode
    from agent.identity.current import current_identity, has_identity
    from agent.identity.rotation import check_not_expired

    out: list[str] = []
    signing: list[str] = []  # the session's last start-up step: reported last
    if cfg.ota.code_signing_certificate is not None:
        cs = cfg.resolve(cfg.ota.code_signing_certificate)
        try:
            read_regular_file(cs, MAX_CERTIFICATE_FILE_BYTES)  # refuses a FIFO before load_pinned_key reads it
        except FileNotFoundError:
            pass  # check_files said so
        except ValueError as e:
            signing.append(
                f"ota.code_signing_certificate: {cs} {e}; install the code-signing certificate that signs your updates"
            )
        else:
            from agent.update.signing import load_pinned_key

            try:
                load_pinned_key(cs)
            except AgentError as e:
                signing.append(
                    f"ota.code_signing_certificate: {e}; install the code-signing certificate (PEM) that "
                    "signs your updates"
                )
    store = StateStore(cfg.resolve(cfg.device.state_dir))
    try:
        st = os.stat(store.path)
    except FileNotFoundError:
        st = None
    except OSError as e:
        out.append(f"{store.path}: cannot read the state file ({e.strerror}); check its owner and mode")
        return out + signing
    if st is not None and not stat.S_ISREG(st.st_mode):  # StateStore.load would wait on a FIFO for ever
        out.append(
            f"{store.path}: state file is not a regular file; move it aside (the device may need re-provisioning)"
        )
        return out + signing
    try:
        state = store.load()
    except AgentError as e:  # StateError: corrupt, unreadable, or from a newer agent
        out.append(str(e))
        return out + signing
    mode = identity_mode(cfg)
    from_state = isinstance(state.get("certificate_file"), str) and state.get("certificate_file")
    cert = (
        Path(from_state)
        if from_state
        else (cfg.resolve(cfg.identity.certificate_file) if cfg.identity.certificate_file else None)
    )
    cert_ok = False
    if cert is not None:
        problem = certificate_file_problem(cert)
        if problem is None:
            cert_ok = True
        elif problem != MISSING_FILE:
            key = "device certificate (recorded in the state)" if from_state else "identity.certificate_file"
            out.append(f"{key}: {cert} {problem}; restore the device's certificate or provision the device again")
    if has_identity(cfg, state):
        try:
            current_identity(cfg, state)
        except AgentError as e:
            if from_state or cert is None or cert.exists():  # a missing identity.certificate_file: said already
                out.append(str(e))
        if cert is not None and cert_ok:
            rotation = state.get("rotation")
            flow = rotation if isinstance(rotation, dict) else {}
            if flow.get("step") != "switch":  # a switch proves the new certificate first (daemon._session)
                try:
                    check_not_expired(cert)
                except AgentError as e:
                    out.append(str(e))
    elif mode == "jitp":  # daemon._run's words
        out.append(
            "identity.mode is jitp but there is no device certificate yet: run `iot-agent factory "
            "device-key` and `factory device-cert` at the factory (README, 'Just-in-time provisioning')"
        )
    elif mode == "claim":  # Provisioner.run's checks, its words
        from agent.identity.provisioning import claim_certificate, serial_number

        if not serial_number(cfg, state):
            out.append(
                "provisioning: no serial number; run `iot-agent factory init --serial ...` or set "
                "provisioning.serial_number"
            )
        claim = claim_certificate(cfg, state)
        problem = certificate_file_problem(claim)
        if problem == MISSING_FILE:
            out.append(f"provisioning: claim certificate {claim} not found; run `iot-agent factory claim-cert`")
        elif problem:
            out.append(
                f"provisioning.claim_certificate: {claim} {problem}; install the claim certificate again "
                "(`iot-agent factory claim-cert`)"
            )
    else:
        try:
            current_identity(cfg, state)
        except AgentError as e:
            out.append(str(e))
    return out + signing


def _keys(cfg: Config, args) -> int:
    from agent.base import killpoints
    from agent.base.pin import read_pin
    from agent.identity.keystore import open_token

    with open_token(cfg.resolve(cfg.pkcs11.library), cfg.pkcs11.token_label, read_pin(cfg)) as ks:
        if args.keys_command == "list":
            for k in ks.list_keys():
                print(f"{k.label}\t{k.key_type}\tid={k.key_id}")
        elif args.keys_command == "generate":
            if args.csr_out and not args.cn:
                raise AgentError("keys generate --csr-out needs --cn (the thing name)")
            existing = ks.find(args.label) if args.if_missing else None
            if existing:
                print(f"kept existing {existing.key_type} key {existing.label!r} (id {existing.key_id})")
            else:
                k = ks.generate_ec_key(args.label)
                killpoints.op("token:generate", args.label)
                print(
                    f"generated {k.key_type} P-256 key {k.label!r} (id {k.key_id}) on token {cfg.pkcs11.token_label!r}"
                )
            if args.csr_out:
                from agent.base.durable import write_atomic

                write_atomic(args.csr_out, ks.make_csr(args.label, args.cn), 0o644)
        elif args.keys_command == "delete":
            n = ks.delete(args.label)
            killpoints.op("token:delete", args.label)
            if not n:
                raise AgentError(f"no key labelled {args.label!r} on the token")
            print(f"deleted {n} objects labelled {args.label!r}")
        elif args.keys_command == "csr":
            pem = ks.make_csr(args.label, args.cn)
            if args.out:
                from agent.base.durable import write_atomic

                write_atomic(args.out, pem, 0o644)
            else:
                sys.stdout.write(pem.decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
