"""Clean shutdown on a TPM: 20 connect/stop cycles leave no transient handles behind.

swtpm has no resource manager and three object slots, like many small TPMs behind a thin driver:
a client that exits without releasing its PKCS#11 objects exhausts it within a few runs.
"""

from __future__ import annotations

import gc

from agent.identity.current import Identity
from agent.runtime.daemon import settings_for
from agent.runtime.features import load
from agent.session.connection import PUBACK_ACCEPTED, Connection


def test_twenty_connect_stop_cycles_leak_no_transient_handles(bench, tpm, agents, monkeypatch):
    dev = bench.enroll(tpm, "gw-tpm-cycles")
    baseline = tpm.tpm.transient_handles()

    # 5 cycles through the real daemon process (SIGTERM), 15 in-process through the same code.
    for i in range(5):
        a = agents(dev)
        a.wait_for(r"connected to localhost:\d+ as gw-tpm-cycles")
        assert a.stop() == 0
        assert "stopped" in a.text()
        assert tpm.tpm.transient_handles() == baseline, f"after daemon cycle {i}"

    for k, v in tpm.env.items():
        monkeypatch.setenv(k, v)
    cfg = load(dev.config_path)
    settings = settings_for(cfg, Identity("gw-tpm-cycles", dev.cert_path, "device"), tpm.pin)
    for i in range(15):
        c = Connection(settings)
        c.start()
        assert c.wait_connected(20), c.events
        assert c.publish("dt/gw-tpm-cycles/n", str(i)) in PUBACK_ACCEPTED
        c.stop()
        del c
        gc.collect()
        assert tpm.tpm.transient_handles() == baseline, f"after in-process cycle {i}"

    connects = [c for c in bench.broker.connected_clients() if c[0] == "gw-tpm-cycles"]
    assert len(connects) == 20
    print(f"transient handles before/after 20 cycles: {len(baseline)}/{len(tpm.tpm.transient_handles())}")

    # Control: a daemon killed without its clean shutdown does leak, so the check above can fail.
    a = agents(dev)
    a.wait_for(r"connected to localhost:\d+ as gw-tpm-cycles")
    a.proc.kill()
    a.proc.wait(10)
    assert len(tpm.tpm.transient_handles()) > len(baseline)
