"""Software inventory in a named shadow: it matches the device after provisioning, an update, a rollback
and a rotation, survives a version conflict, and drives a query-targeted job to exactly the devices
below a version (standing in for fleet indexing and a dynamic thing group with a continuous job).
The Software Package Catalog's reserved `$package` shadow follows the same update and rollback, keeps
what the cloud wrote there, and a fleet query on it selects the right things."""

from __future__ import annotations

import time

from cloudkit import wait_status
from otakit import HEALTH, World, release

from agent.update.install import slot
from localcloud.bench import fresh_device
from localcloud.shadows import Shadows
from localcloud.tokens import softhsm_token

TARGETS = {"app": {"directory": "app", "health_command": HEALTH, "health_timeout_s": 10.0}}


def reported(shadows: Shadows, thing: str, name: str = "inventory") -> dict:
    return shadows.get(thing, name)["state"].get("reported", {})


def package_version(shadows: Shadows, thing: str, package: str) -> str:
    return reported(shadows, thing, "$package")[package]["version"]


def eventually(check, timeout: float = 30.0):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            last = check()
            return last
        except (AssertionError, Exception) as e:  # the shadow may not exist yet
            last = e
        time.sleep(0.3)
    raise AssertionError(f"not reached within {timeout} s: {last}")


def test_inventory_follows_the_device_and_drives_a_query_job(tmp_path, agents):
    w = World(tmp_path / "a", "INVA", TARGETS)
    tok_b = softhsm_token(tmp_path / "b-softhsm")
    try:
        shadows = Shadows(w.cloud.registry.db, w.cloud.registry.lock)
        w.cloud.registry.allow_serials(["INVB"])
        dev_b = fresh_device(
            w.cloud,
            tok_b,
            "INVB",
            tmp_path / "b",
            [w.ntp.server],
            extra={
                "defender": {"enabled": False},
                "ota": {
                    "code_signing_certificate": str(w.signer.cert_path),
                    "ca_file": w.info["ca_file"],
                    "targets": {"app": {**TARGETS["app"], "directory": str(tmp_path / "b" / "app")}},
                },
            },
        )
        a = agents(w.dev)
        b = agents(dev_b)
        a.wait_for(r"inventory shadow 'inventory' updated", 90)
        b.wait_for(r"inventory shadow 'inventory' updated", 90)

        def after_provisioning():
            r = reported(shadows, w.thing)
            assert r["agent_version"] and r["certificate_expires"], r
            assert not r.get("targets", {}).get("app"), r  # nothing installed yet (nulls delete shadow keys)
            return r

        first = eventually(after_provisioning)
        from agent import __version__

        eventually(lambda: assert_eq(package_version(shadows, w.thing, "iot-agent"), __version__))
        assert "app" not in reported(shadows, w.thing, "$package")  # nothing installed: no version to claim
        # What the cloud keeps in $package (another package, attributes) is never overwritten by the agent.
        shadows.operator_update(
            w.thing,
            "$package",
            {"state": {"reported": {"firmware": {"version": "7.0"}, "iot-agent": {"attributes": {"ring": "beta"}}}}},
        )

        def update(thing: str, job: str, version: str, status: str, text: str | None = None):
            data = release(version, text)
            w.jobs.create(job, thing, w.signed("app", version, "app.tar", data))
            wait_status(w.jobs, job, thing, status, timeout=90)

        update(w.thing, "a-1", "1.1.0", "SUCCEEDED")
        update("gw-INVB", "b-1", "1.1.0", "SUCCEEDED")
        eventually(
            lambda: (
                assert_eq(reported(shadows, w.thing)["targets"]["app"], {"current": "1.1.0"}),
                assert_eq(reported(shadows, w.thing)["last_job"]["job_id"], "a-1"),
                assert_eq(package_version(shadows, w.thing, "app"), "1.1.0"),
            )
        )
        # a rollback: the unhealthy release is marked broken in the inventory
        update(w.thing, "a-2", "1.2.0", "FAILED", "unhealthy\n")
        eventually(
            lambda: assert_eq(reported(shadows, w.thing)["targets"]["app"], {"current": "1.1.0", "broken": "1.2.0"})
        )
        assert package_version(shadows, w.thing, "app") == "1.1.0"  # the rollback: the version that runs
        update(w.thing, "a-3", "1.3.0", "SUCCEEDED")
        eventually(lambda: assert_eq(reported(shadows, w.thing)["targets"]["app"]["current"], "1.3.0"))
        eventually(lambda: assert_eq(package_version(shadows, w.thing, "app"), "1.3.0"))
        pkg = reported(shadows, w.thing, "$package")
        assert pkg["firmware"] == {"version": "7.0"} and pkg["iot-agent"]["attributes"] == {"ring": "beta"}, pkg

        # a version conflict: someone else writes the shadow; the agent reads and writes again
        v = shadows.get(w.thing, "inventory")["version"]
        shadows.operator_update(w.thing, "inventory", {"state": {"reported": {"note": "operator"}}})
        w.jobs.create("rotate-a", w.thing, {"operation": "rotate-certificate"})
        wait_status(w.jobs, "rotate-a", w.thing, "SUCCEEDED", timeout=120)
        after = eventually(lambda: check_rotated(reported(shadows, w.thing), first))
        assert shadows.get(w.thing, "inventory")["version"] > v + 1 and after["note"] == "operator"

        # the fleet query: every device below 1.3.0 gets the update, and only those
        below = shadows.things_matching("inventory", "reported.targets.app.current", "<", "1.3.0")
        assert below == ["gw-INVB"], below
        eventually(lambda: assert_eq(package_version(shadows, "gw-INVB", "app"), "1.1.0"))
        assert shadows.things_matching("$package", "reported.app.version", "<", "1.3.0") == ["gw-INVB"]
        assert shadows.things_matching("$package", "reported.app.version", "==", "1.3.0") == [w.thing]
        assert shadows.things_matching("$package", "reported.firmware.version", "exists") == [w.thing]
        data = release("1.3.0")
        for thing in below:
            w.jobs.create(f"fleet-{thing}", thing, w.signed("app", "1.3.0", "app.tar", data))
        wait_status(w.jobs, "fleet-gw-INVB", "gw-INVB", "SUCCEEDED", timeout=90)
        assert w.jobs.execution("fleet-gw-INVA", w.thing) is None
        assert slot(tmp_path / "b" / "app", "current") == "1.3.0"
        eventually(
            lambda: assert_eq(shadows.things_matching("inventory", "reported.targets.app.current", "<", "1.3.0"), [])
        )
        eventually(lambda: assert_eq(shadows.things_matching("$package", "reported.app.version", "<", "1.3.0"), []))
        assert a.stop() == 0 and b.stop() == 0
    finally:
        tok_b.stop()
        w.close()


def assert_eq(got, want):
    assert got == want, (got, want)
    return got


def check_rotated(now: dict, first: dict) -> dict:
    assert now["certificate_expires"] and now["certificate_expires"] != first["certificate_expires"], now
    return now
