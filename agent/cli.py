"""The `iot-agent` command line."""

from __future__ import annotations

import argparse
import logging
import os
import sys
import threading
from pathlib import Path

from . import __version__
from .config import DEFAULT_CONFIG_PATH, Config, check_files, load
from .errors import AgentError, ConfigError


def _setup_logging(level: str) -> None:
    # Under systemd the journal adds its own timestamps.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), format=fmt, datefmt="%Y-%m-%dT%H:%M:%S",
                        stream=sys.stderr)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="iot-agent", description="AWS IoT Core device agent")
    p.add_argument("--config", type=Path, default=None, help=f"config file (default {DEFAULT_CONFIG_PATH})")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="overrides log.level")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("run", help="wait for a trustworthy clock, connect, stay connected until SIGTERM")
    sub.add_parser("check-config", help="print every problem with the configuration; non-zero exit if any")
    sub.add_parser("version", help="print the agent's version")
    keys = sub.add_parser("keys", help="keys on the PKCS#11 token")
    ks = keys.add_subparsers(dest="keys_command", required=True)
    ks.add_parser("list", help="list private keys on the token")
    g = ks.add_parser("generate", help="generate an EC P-256 key pair on the token")
    g.add_argument("label")
    g.add_argument("--if-missing", action="store_true", help="keep an existing key with this label (for resuming)")
    d = ks.add_parser("delete", help="delete the key pair with this label")
    d.add_argument("label")
    c = ks.add_parser("csr", help="write a CSR for a token key, signed on the token")
    c.add_argument("label")
    c.add_argument("--cn", required=True, help="subject common name (the thing name)")
    c.add_argument("--out", type=Path, help="file to write (default: stdout)")
    f = sub.add_parser("factory", help="production-line steps: claim key on the token, claim certificate")
    fs = f.add_subparsers(dest="factory_command", required=True)
    fi = fs.add_parser("init", help="record the serial number, generate the claim key on the token, write its CSR")
    fi.add_argument("--serial", required=True)
    fi.add_argument("--csr-out", type=Path, required=True)
    fc = fs.add_parser("claim-cert", help="install the claim certificate the manufacturer's CA issued for that CSR")
    fc.add_argument("certificate", type=Path)
    fk = fs.add_parser("device-key", help="JITP: the device key on the token and a CSR with the thing name as CN")
    fk.add_argument("--thing", required=True)
    fk.add_argument("--csr-out", type=Path, required=True)
    fd = fs.add_parser("device-cert", help="JITP: install the device certificate the manufacturer's CA issued")
    fd.add_argument("certificate", type=Path)
    sub.add_parser("rotate", help="ask the running agent to rotate the device certificate now (new key on the token)")
    st = sub.add_parser("status", help="the device's identity and provisioning state")
    st.add_argument("--json", action="store_true")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "version":
        print(__version__)
        return 0
    try:
        if args.command == "check-config":
            return _check_config(args.config)
        cfg = load(args.config)
        _setup_logging(args.log_level or cfg.log.level)
        problems = check_files(cfg) if args.command != "status" else []
        if problems:
            raise ConfigError(problems)
        if args.command == "run":
            from .daemon import install_stop_signals, run

            stop = threading.Event()
            install_stop_signals(stop)
            return run(cfg, stop)
        if args.command == "keys":
            return _keys(cfg, args)
        if args.command == "factory":
            from .factory import claim_cert, device_cert, device_key, init

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
            from .status import show

            return show(cfg, as_json=args.json)
    except AgentError as e:
        for line in str(e).splitlines():
            print(f"iot-agent: {line}", file=sys.stderr)
        return e.exit_code
    return 2


def _rotate(cfg) -> int:
    """Record the request in the state (so it survives a stopped agent) and wake the running agent."""
    import os
    import signal

    from .daemon import current_identity
    from .rotation import Rotator
    from .state import StateStore

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
    from .pin import read_pin

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
    for line in problems:
        print(line, file=sys.stderr)
    if problems:
        return 2
    print(f"{cfg.path}: ok")
    return 0


def _keys(cfg: Config, args) -> int:
    from .keystore import open_token
    from .pin import read_pin

    with open_token(cfg.resolve(cfg.pkcs11.library), cfg.pkcs11.token_label, read_pin(cfg)) as ks:
        if args.keys_command == "list":
            for k in ks.list_keys():
                print(f"{k.label}\t{k.key_type}\tid={k.key_id}")
        elif args.keys_command == "generate":
            existing = ks.find(args.label) if args.if_missing else None
            if existing:
                print(f"kept existing {existing.key_type} key {existing.label!r} (id {existing.key_id})")
                return 0
            k = ks.generate_ec_key(args.label)
            print(f"generated {k.key_type} P-256 key {k.label!r} (id {k.key_id}) on token {cfg.pkcs11.token_label!r}")
        elif args.keys_command == "delete":
            n = ks.delete(args.label)
            if not n:
                raise AgentError(f"no key labelled {args.label!r} on the token")
            print(f"deleted {n} objects labelled {args.label!r}")
        elif args.keys_command == "csr":
            pem = ks.make_csr(args.label, args.cn)
            if args.out:
                args.out.write_bytes(pem)
            else:
                sys.stdout.write(pem.decode())
    return 0


if __name__ == "__main__":
    sys.exit(main())
