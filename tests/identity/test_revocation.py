"""A device whose certificate the cloud deactivates stops hammering the endpoint: after
broker.refused_after refusals in a row it tries once per long, jittered wait, says so in its log and
in `iot-agent status`, and recovers by itself when the certificate is activated again."""

from __future__ import annotations

import json
import re

from localcloud.bench import fresh_device
from localcloud.cloud import LocalCloud
from localcloud.ntp import Chrony

FAIL = r"connection to localhost:\d+ failed: "


def test_refused_identity_backs_off_and_recovers(tmp_path, softhsm, agents):
    cloud = LocalCloud(tmp_path / "cloud")
    cloud.registry.allow_serials(["RV1"])
    info = cloud.up()
    ntp = Chrony(tmp_path / "chrony").start()
    try:
        dev = fresh_device(
            cloud,
            softhsm,
            "RV1",
            tmp_path / "device",
            [ntp.server],
            extra={
                "defender": {"enabled": False},
                "broker": {"refused_after": 2, "refused_retry_min_s": 10.0, "refused_retry_max_s": 10.0},
            },
        )
        a = agents(dev)
        a.wait_for(r"connected to localhost:\d+ as gw-RV1", 90)
        cert = next(c for c in cloud.registry.certificates() if c.thing == "gw-RV1" and c.status == "ACTIVE")
        # The cloud deactivates the certificate; the broker comes back with the new CRL (AWS closes live
        # connections of a deactivated certificate; the local broker is restarted to do the same).
        cloud.down()
        cloud.set_certificate_status(cert.id, "INACTIVE")
        cloud.up(port=info["port"])
        i = a.wait_for(
            r"the broker refuses this device's identity \(AWS_IO_TLS_ERROR_(READ|NEGOTIATION)_FAILURE\)", 120
        )
        t_refused = a.lines[i][0]
        first = [entry for entry in a.lines[:i] if re.search(FAIL, entry[1])]
        assert len(first) >= 2, "it took refused_after refusals to slow down"
        status = json.loads(dev.cli("status", "--json").stdout)
        assert status["connection"]["refused_since"] and "AWS_IO_TLS_ERROR" in status["connection"]["last_error"]
        assert "REFUSED by the broker since" in dev.cli("status").stdout

        # One try per wait (10 s here, 300 s by default): nothing in between.
        j = a.wait_for(r"the broker refuses this device's identity", 90, after=i + 1)
        between = [entry for entry in a.lines[i + 1 : j] if re.search(FAIL, entry[1])]
        assert len(between) == 1, "\n".join(entry[1] for entry in a.lines[i - 3 : j + 1])
        assert a.lines[j][0] - t_refused >= 10, "the wait was shorter than refused_retry_min_s"

        cloud.set_certificate_status(cert.id, "ACTIVE")
        k = a.wait_for(r"the broker accepts this device's identity again", 90, after=j + 1)
        a.wait_for(r"connected to localhost:\d+ as gw-RV1", 5, after=k - 5)
        assert json.loads(dev.cli("status", "--json").stdout)["connection"] == {}
        # Attempts while refused: refused_after + one per wait, not the CRT's 1-4 s reconnect cadence.
        elapsed = a.lines[k][0] - first[0][0]
        tries = [entry for entry in a.lines[:k] if re.search(FAIL, entry[1])]
        assert len(tries) <= 2 + elapsed / 10 + 2, (len(tries), elapsed)
        assert a.stop() == 0
    finally:
        ntp.stop()
        cloud.down()
