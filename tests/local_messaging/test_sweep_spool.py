"""Power cut after every state-changing operation of local messaging (see tests/sweep.py): each spool commit
(store, mark sent, remove) and every file operation of the agent, while an app publishes numbered QoS 1
messages one at a time through it.

After each cut the agent starts again and the app (which retries by itself, at-least-once) finishes. Then
every message must have reached the cloud, in order (the first copy of each), and the spool must be
empty: a message the app was acknowledged for is never lost, whatever instant the power went.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from sweep import Outcome, Run, next_serial, op_at, sweep, sweep_env

from agent.local_messaging.spool import read_stats
from localcloud import pace
from localcloud.bench import agent_cmd, enrolled_device
from localcloud.cloud import LocalCloud
from localcloud.ntp import Chrony
from localcloud.recorder import Recorder
from localcloud.tokens import softhsm_token

HERE = Path(__file__).resolve().parent
MESSAGES = 6
QUIET = {"defender": {"enabled": False}, "inventory": {"enabled": False}, "jobs": {"enabled": False}}


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    d = tmp_path_factory.mktemp("sweeplm")
    cloud = LocalCloud(d / "cloud")
    cloud.up()
    ntp = Chrony(d / "chrony").start()
    rec = Recorder(cloud, ["dt/#"], client_id="sweep-recorder").start()
    yield cloud, ntp, rec
    rec.stop()
    ntp.stop()
    cloud.down()


def spool_case(world, root: Path):
    cloud, ntp, rec = world

    def case(n: int) -> Outcome:
        d = root / f"n{n:03d}"
        token = softhsm_token(d / "token")
        sockdir = Path(tempfile.mkdtemp(prefix="lm-", dir="/tmp"))  # a Unix socket path must stay short
        sock = sockdir / "s"
        thing = f"gw-{next_serial('LM')}"
        dev = enrolled_device(
            cloud,
            token,
            thing,
            d / "dev",
            [ntp.server],
            extra={
                **QUIET,
                "local_messaging": {
                    "enabled": True,
                    "socket": str(sock),
                    "apps": {"app": {"user": str(os.getuid()), "publish": ["dt/${thing}/#"]}},
                },
            },
        )
        ops = d / "ops.log"
        plain = {**token.full_env(), "PYTHONDONTWRITEBYTECODE": "1"}
        spool_file = dev.directory / "state" / "spool.sqlite"
        app = subprocess.Popen(
            [sys.executable, str(HERE / "publisher.py"), str(sock), f"dt/{thing}/app", "app", str(MESSAGES)]
            + ["--window", "1", "--give-up-s", str(pace.scaled(120))],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )

        def finished() -> bool:
            stats = read_stats(spool_file) or {}
            return app.poll() is not None and stats.get("messages") == 0 and stats.get("stored", 0) > 0

        def run_until_done(env: dict[str, str], log: Path) -> tuple[bool, str]:
            """(killed, error): the agent ran until the app finished and the spool emptied, or died."""
            return (
                Run(agent_cmd(dev.config_path, "run"), env, log)
                .start()
                .until(
                    finished,
                    120,
                    lambda: f"neither finished nor killed; app: {app.poll()}, spool: {read_stats(spool_file)}",
                )
            )

        try:
            killed, error = run_until_done(sweep_env(plain, ops, dev.directory, n), d / "swept.log")
            if killed:
                _, error = run_until_done(sweep_env(plain, ops, dev.directory, None), d / "after.log")
            if not error:
                out, _ = app.communicate(timeout=pace.scaled(30))
                if app.returncode != 0:
                    error = f"the app failed: {out[-500:]}"
            if not error:
                got = [p for t, p in rec.snapshot() if t == f"dt/{thing}/app"]
                firsts: list[int] = []
                for p in got:
                    seq = int(p.decode().split(":")[1])
                    if seq not in firsts:
                        firsts.append(seq)
                if firsts != list(range(MESSAGES)):
                    error = f"the cloud got {firsts} (all copies: {[p.decode() for p in got]})"
            return Outcome(n, killed, op_at(ops, n), error)
        finally:
            if app.poll() is None:
                app.kill()
                app.wait(5)
            token.stop()
            shutil.rmtree(sockdir, ignore_errors=True)

    return case


def test_sweep_local_messaging(world, tmp_path):
    result = sweep("local messaging", spool_case(world, tmp_path))
    kinds = [o.op.split(" spool ", 1)[1] for o in result.outcomes if o.killed and " spool " in o.op]
    print("spool commits swept:", ", ".join(kinds))
    # Each message is its own store (the app waits for each PUBACK); sending and removing come in batches of
    # whatever is spooled when the forwarder looks, so the Nth operation's kind varies from run to run.
    assert {"store", "mark sent", "remove"} <= set(kinds) and len(kinds) >= MESSAGES + 3, result.summary()
    assert not result.failures, "\n\n".join(f"kill after op {o.n} ({o.op}): {o.error}" for o in result.failures)
