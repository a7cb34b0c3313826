"""Soak and fault campaign: the agent runs with every feature on while the test restarts the broker,
kills the agent with SIGKILL after a random state-changing operation (agent.killpoints) of updates
and rotations, fills the job queue and rotates the certificate. At the end no job status is lost, the
device is connected with exactly one identity, and the state store is valid.

Sized for CI (12 rounds, about a minute); `IOT_AGENT_SOAK_ROUNDS=100` runs a longer campaign locally, and
`IOT_AGENT_SOAK_SEED` replays one.
"""

from __future__ import annotations

import json
import os
import random
import time
from collections import Counter
from pathlib import Path

import pytest
from cloudkit import wait_status
from otakit import HEALTH, World, release, signed_doc
from sweep import sweep_env

from agent.base.state import StateStore
from agent.update.install import slot

ROUNDS = int(os.environ.get("IOT_AGENT_SOAK_ROUNDS", "12"))
SEED = int(os.environ.get("IOT_AGENT_SOAK_SEED", str(int(time.time()))))
KINDS = ["broker", "kill-update", "kill-rotation", "burst"]
TERMINAL = ("SUCCEEDED", "FAILED", "REJECTED", "TIMED_OUT", "CANCELED")


@pytest.mark.soak
def test_soak_under_faults(tmp_path, agents):
    rnd = random.Random(SEED)
    print(f"soak: seed {SEED}, {ROUNDS} rounds (IOT_AGENT_SOAK_SEED={SEED} replays this run)")
    w = World(tmp_path, "SOAK", {"app": {"directory": "app", "health_command": HEALTH, "health_timeout_s": 10.0}})
    counts: Counter = Counter()
    expected: dict[str, str] = {}
    n = [0]

    def start(env: dict | None = None):
        counts["agent starts"] += 1
        return agents(w.dev, env=env, session=True)

    def update_job(good: bool = True) -> str:
        n[0] += 1
        version = f"1.{n[0]}.0"
        data = release(version) + os.urandom(rnd.choice([1000, 600_000]))
        manifest = w.signer.manifest("app", version, "app.tar", data)
        if not good:
            data = data[:-1] + bytes([data[-1] ^ 1])
        via_stream = rnd.random() < 0.5
        doc = signed_doc(
            w.signer,
            "app",
            version,
            "app.tar",
            data,
            url=None if via_stream else w.https(data),
            stream=(w.stream(data), 0) if via_stream else None,
            manifest=manifest,
        )
        job = f"soak-{n[0]}"
        w.jobs.create(job, w.thing, doc)
        expected[job] = "SUCCEEDED" if good else "REJECTED"
        counts["update jobs"] += 1
        return job

    def restart_with_kill(a, job: str, most: int):
        a.proc.kill()  # SIGKILL: the agent is down as after a power cut
        a.wait_exit(15)
        counts["SIGKILLs"] += 1
        point = rnd.randint(1, most)  # cut after this many state-changing operations of the next run
        b = start(sweep_env({}, tmp_path / f"ops-{job}.log", w.dev.directory, point))
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and b.proc.poll() is None:
            ex = w.jobs.execution(job, w.thing)
            if ex and ex["status"] in TERMINAL:
                break  # the point was not on this job's path (e.g. a small download has no midway)
            time.sleep(0.2)
        if b.proc.poll() is not None:
            assert b.wait_exit(5) == -9, b.text()[-3000:]
            counts["SIGKILLs after an operation"] += 1
            return start()
        return b

    try:
        a = start()
        a.wait_for(rf"connected to localhost:\d+ as {w.thing}", 90)
        kinds = [KINDS[i % len(KINDS)] for i in range(ROUNDS)]
        rnd.shuffle(kinds)
        for r, kind in enumerate(kinds):
            print(f"soak round {r + 1}/{ROUNDS}: {kind}")
            if kind == "broker":
                w.cloud.down()
                job = update_job()  # queued while the broker is away: notify-next comes after the reconnect
                time.sleep(rnd.uniform(0.5, 3.0))
                w.cloud.up()
                counts["broker restarts"] += 1
                wait_status(w.jobs, job, w.thing, "SUCCEEDED", timeout=120)
            elif kind == "kill-update":
                job = update_job()
                a = restart_with_kill(a, job, 35)
                wait_status(w.jobs, job, w.thing, "SUCCEEDED", timeout=120)
            elif kind == "kill-rotation":
                n[0] += 1
                job = f"soak-rotate-{n[0]}"
                w.jobs.create(job, w.thing, {"operation": "rotate-certificate"})
                expected[job] = "SUCCEEDED"
                counts["rotation jobs"] += 1
                a = restart_with_kill(a, job, 20)
                wait_status(w.jobs, job, w.thing, "SUCCEEDED", timeout=120)
            else:  # a burst of jobs at once: refusals, a tampered update and a good one, in one queue
                for _ in range(rnd.randint(2, 4)):
                    n[0] += 1
                    w.jobs.create(f"soak-junk-{n[0]}", w.thing, {"operation": rnd.choice(["reboot", "format", "x"])})
                    expected[f"soak-junk-{n[0]}"] = "REJECTED"
                    counts["refused jobs"] += 1
                update_job(good=False)
                job = update_job()
                wait_status(w.jobs, job, w.thing, "SUCCEEDED", timeout=180)

        # every job reached the status it had to, and the cloud heard it (nothing lost in an outbox)
        for job, status in expected.items():
            wait_status(w.jobs, job, w.thing, status, timeout=60)
        a.wait_for(rf"connected to localhost:\d+ as {w.thing}", 60)
        assert a.stop() == 0
        state = StateStore(w.dev.directory / "state").load()  # raises if the store is not valid
        assert not state.get("jobs", {}).get("outbox"), state.get("jobs")
        status = json.loads(w.dev.cli("status", "--json").stdout)
        active = [c for c in w.cloud.registry.certificates() if c.thing == w.thing and c.status == "ACTIVE"]
        assert len(active) == 1, [(c.id[:8], c.status) for c in w.cloud.registry.certificates() if c.thing == w.thing]
        assert Path(status["certificate_file"]).read_text().strip() == active[0].pem.strip()
        keys = [
            line.split("\t")[0] for line in w.dev.cli("keys", "list").stdout.splitlines() if line.startswith("device")
        ]
        assert keys == [status["key_label"]]
        last_good = max(
            (int(j.split("-")[1]) for j, s in expected.items() if j.split("-")[1].isdigit() and s == "SUCCEEDED"),
            default=None,
        )
        assert slot(w.app, "current") == f"1.{last_good}.0"
        assert status["updates"]["app"]["current"] == f"1.{last_good}.0"  # what `iot-agent status --json` says
        assert status["jobs"]["last"]["status"] in TERMINAL and status["jobs"]["unsent_updates"] == 0
        counts["jobs"] = len(expected)
        print("soak counts: " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    finally:
        w.close()
