"""AWS IoT Commands end to end: the local cloud starts executions, the real agent runs them and answers.

A built-in and an operator handler SUCCEED with results; an unknown command, a malformed payload, an
unsupported payload type, an expired request, a request past max_pending, a duplicate delivery, a handler past
its timeout and a handler that prints 10 MB each end with the right status and reason; the agent is
unharmed (it still answers, its memory did not follow the output). A restart in the middle of an execution
is answered AGENT_RESTARTED and the execution is not run again.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest

from localcloud import pace
from localcloud.bench import fresh_device
from localcloud.cloud import LocalCloud
from localcloud.commands import Commands, request_topic
from localcloud.ntp import Chrony

CT = "application/json"
QUIET = {"defender": {"enabled": False}, "inventory": {"enabled": False}, "jobs": {"enabled": False}}


def script(where: Path, name: str, body: str) -> str:
    p = where / name
    p.write_text("#!/bin/sh\n" + body)
    p.chmod(0o755)
    return str(p)


@pytest.fixture
def world(tmp_path, softhsm):
    cloud = LocalCloud(tmp_path / "cloud")
    cloud.registry.allow_serials(["C1"])
    ntp = Chrony(tmp_path / "chrony").start()
    cloud.up()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    runs = tmp_path / "runs.log"
    handlers = {
        "echo-params": {"command": [script(bin_dir, "echo.sh", 'cat; echo; echo "exec=$IOT_AGENT_EXECUTION_ID"\n')]},
        "count": {"command": [script(bin_dir, "count.sh", f"echo run >> {runs}\nsleep 1\necho counted\n")]},
        "slow": {"command": [script(bin_dir, "slow.sh", "sleep 4\necho slept\n")], "timeout_s": 30},
        "hang": {"command": [script(bin_dir, "hang.sh", "echo started\nsleep 300\n")], "timeout_s": 2},
        "chatty": {"command": [script(bin_dir, "chatty.sh", "head -c 10485760 /dev/zero | tr '\\0' y\n")]},
        "fail": {"command": [script(bin_dir, "fail.sh", "echo broken >&2\nexit 3\n")]},
    }
    dev = fresh_device(
        cloud,
        softhsm,
        "C1",
        tmp_path / "dev",
        [ntp.server],
        extra={
            **QUIET,
            "commands": {"enabled": True, "builtin": ["report-status"], "handlers": handlers, "max_pending": 1},
        },
    )
    commands = Commands(cloud.registry.db, cloud.registry.lock)
    for name in handlers:
        commands.create_command(name, json.dumps({"action": name}).encode())
    yield cloud, dev, commands, runs
    ntp.stop()
    cloud.down()


def wait(commands: Commands, eid: str, status: str, timeout: float = 60) -> dict:
    deadline = time.monotonic() + pace.scaled(timeout)
    ex = None
    while time.monotonic() < deadline:
        ex = commands.get(eid)
        # The cloud's own TIMED_OUT ($NO_RESPONSE_FROM_DEVICE) is not the device's answer: wait for that.
        if ex and ex["status"] == status and not reason(ex).startswith("$"):
            return ex
        time.sleep(0.2)
    raise AssertionError(f"execution {eid} not {status} within {timeout} s: {ex}")


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


def reason(ex: dict) -> str:
    return ex.get("statusReason", {}).get("reasonCode", "")


def test_commands_end_to_end(world, agents):
    cloud, dev, commands, runs = world
    a = agents(dev)
    a.wait_for(r"commands: waiting for requests on \$aws/commands/things/gw-C1/", timeout=90)
    thing = "gw-C1"

    # A built-in and an operator handler succeed, with results.
    commands.create_command("status", b'{"action": "report-status"}')
    ex = wait(commands, commands.start_execution("status", thing, 30)["executionId"], "SUCCEEDED")
    assert ex["result"]["thing_name"] == {"s": thing} and ex["result"]["agent_version"]["s"], ex
    commands.create_command("echo-with", b'{"action": "echo-params", "parameters": {"lines": 200, "unit": "x y"}}')
    eid = commands.start_execution("echo-with", thing, 30)["executionId"]
    ex = wait(commands, eid, "SUCCEEDED")
    assert ex["result"]["output"]["s"] == f'{{"lines": 200, "unit": "x y"}}\nexec={eid}\n', ex
    assert ex["result"]["exit_code"] == {"s": "0"} and ex["result"]["output_truncated"] == {"b": False}

    # Refused without running, each with its reason.
    commands.create_command("unknown", b'{"action": "format-disk"}')
    ex = wait(commands, commands.start_execution("unknown", thing, 30)["executionId"], "REJECTED")
    assert reason(ex) == "UNKNOWN_COMMAND" and "format-disk" in ex["statusReason"]["reasonDescription"]
    commands.create_command("malformed", b'{"action": "echo-params", "shell": "rm -rf /"}')
    ex = wait(commands, commands.start_execution("malformed", thing, 30)["executionId"], "REJECTED")
    assert reason(ex) == "MALFORMED_REQUEST" and '"shell"' in ex["statusReason"]["reasonDescription"]
    commands.create_command("text", b"reboot please", "text/plain")
    ex = wait(commands, commands.start_execution("text", thing, 30)["executionId"], "REJECTED")
    assert reason(ex) == "UNSUPPORTED_PAYLOAD_FORMAT"
    ex = wait(commands, commands.start_execution("fail", thing, 30)["executionId"], "FAILED")
    assert reason(ex) == "HANDLER_FAILED" and ex["result"]["exit_code"] == {"s": "3"}
    assert ex["result"]["output"] == {"s": "broken\n"}

    # A handler past its timeout: killed, TIMED_OUT.
    ex = wait(commands, commands.start_execution("hang", thing, 60)["executionId"], "TIMED_OUT")
    assert reason(ex) == "HANDLER_TIMEOUT" and ex["result"]["output"] == {"s": "started\n"}, ex

    # 10 MB of output: capped in the result, counted, the agent unharmed.
    rss_before = rss_kib(a.proc.pid)
    ex = wait(commands, commands.start_execution("chatty", thing, 60)["executionId"], "SUCCEEDED")
    assert ex["result"]["output_bytes"] == {"s": str(10 * 1024 * 1024)} and ex["result"]["output_truncated"] == {
        "b": True
    }
    assert len(ex["result"]["output"]["s"]) == 16 * 1024
    assert rss_kib(a.proc.pid) - rss_before < 8 * 1024, "the agent's memory followed the handler's output"

    # An expired request: it waited behind a slow one past its execution timeout, and is not run.
    slow = commands.start_execution("slow", thing, 30)["executionId"]
    a.wait_for(rf"commands: execution {slow}: running slow", timeout=30)
    late = commands.start_execution("count", thing, 1)["executionId"]
    wait(commands, slow, "SUCCEEDED")
    ex = wait(commands, late, "TIMED_OUT")
    assert reason(ex) == "REQUEST_EXPIRED", ex
    assert not runs.exists(), "an expired request ran"

    # A flood: one runs, max_pending (1) waits, the rest are REJECTED (BUSY) at once.
    slow = commands.start_execution("slow", thing, 30)["executionId"]
    a.wait_for(rf"commands: execution {slow}: running slow", timeout=30)
    waiting = commands.start_execution("echo-params", thing, 30)["executionId"]
    time.sleep(0.5)  # it is in the queue before the next one arrives
    busy = commands.start_execution("echo-params", thing, 30)["executionId"]
    ex = wait(commands, busy, "REJECTED")
    assert reason(ex) == "BUSY" and "commands.max_pending" in ex["statusReason"]["reasonDescription"]
    wait(commands, slow, "SUCCEEDED")
    wait(commands, waiting, "SUCCEEDED")

    # A duplicate delivery of the same execution: run once, the first answer stands.
    eid = commands.start_execution("count", thing, 60)["executionId"]
    wait(commands, eid, "SUCCEEDED")
    with commands.lock, commands.db:  # the request published again, as a broker redelivery would
        commands.db.execute(
            "INSERT INTO commands_outbox (topic, payload, content_type, expires) VALUES (?,?,?,?)",
            (
                request_topic(thing, eid, "application/json"),
                b'{"action": "count"}',
                "application/json",
                time.time() + 60,
            ),
        )
    a.wait_for(rf"commands: execution {eid} was seen before \(SUCCEEDED\); not run again", timeout=30)
    assert runs.read_text() == "run\n"
    assert commands.get(eid)["status"] == "SUCCEEDED"

    # Still answering.
    ex = wait(commands, commands.start_execution("status", thing, 30)["executionId"], "SUCCEEDED")
    assert a.proc.poll() is None
    assert a.stop() == 0


def test_an_execution_interrupted_by_a_restart_is_answered_and_not_run_again(world, agents):
    cloud, dev, commands, runs = world
    a = agents(dev)
    a.wait_for(r"commands: waiting for requests", timeout=90)
    eid = commands.start_execution("slow", "gw-C1", 120)["executionId"]
    a.wait_for(rf"commands: execution {eid}: running slow", timeout=30)
    a.proc.kill()  # SIGKILL mid-execution: the record says RUNNING
    a.proc.wait(10)
    b = agents(dev)
    ex = wait(commands, eid, "FAILED")
    assert reason(ex) == "AGENT_RESTARTED"
    b.wait_for(r"commands: waiting for requests", timeout=90)
    assert "running slow" not in b.text()
    assert b.stop() == 0
