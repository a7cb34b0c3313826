"""Just-in-time provisioning end to end: the device key on SoftHSM, a certificate from the manufacturer's
CA loaded at the factory; the agent's first connection is dropped while the cloud registers it, the
second is accepted, and the thing exists once."""

from __future__ import annotations

import json
import re
from pathlib import Path

from cryptography import x509

from localcloud.bench import Device, run_agent_cli, write_config
from localcloud.cloud import LocalCloud
from localcloud.ntp import Chrony
from localcloud.pki import CertificateAuthority, pem

REPO = Path(__file__).resolve().parents[2]
THING = "gw-JITP-0001"


def test_jitp_first_connection_dropped_second_accepted(tmp_path, softhsm, agents):
    cloud = LocalCloud(tmp_path / "cloud")
    info = cloud.up()
    ntp = Chrony(tmp_path / "chrony").start()
    try:
        maker = CertificateAuthority(tmp_path / "maker-ca", "Acme manufacturing CA")
        (tmp_path / "device").mkdir()
        cloud.register_ca(
            maker.cert_path.read_bytes(), json.loads((REPO / "provisioning" / "jitp-template.json").read_text())
        )
        cfg = write_config(
            tmp_path / "device" / "config.toml",
            thing_name=None,
            token=softhsm,
            cert_path=None,
            ntp_servers=[ntp.server],
            state_dir=tmp_path / "device" / "state",
            port=info["jitp_port"],
            ca_file=Path(info["ca_file"]),
            extra={"identity": {"mode": "jitp"}, "defender": {"enabled": False}},
        )
        # the factory: key on the token, CSR with the thing name, the manufacturer's CA signs it
        r = run_agent_cli(
            cfg, softhsm, "factory", "device-key", "--thing", THING, "--csr-out", str(tmp_path / "device.csr")
        )
        assert r.returncode == 0, r.stderr
        csr = x509.load_pem_x509_csr((tmp_path / "device.csr").read_bytes())
        (tmp_path / "device.pem").write_bytes(pem(maker.sign_public_key(csr.public_key(), THING)))
        r = run_agent_cli(cfg, softhsm, "factory", "device-cert", str(tmp_path / "device.pem"))
        assert r.returncode == 0 and THING in r.stdout, r.stderr
        assert cloud.registry.things() == [] or THING not in [n for n, _ in cloud.registry.things()]

        dev = Device("JITP-0001", softhsm, cfg, None, tmp_path / "device")
        a = agents(dev)
        a.wait_for(r"first connection of a JITP certificate", 60)
        i = a.wait_for(r"connection to localhost:\d+ failed: .*NOT_AUTHORIZED", 60)
        j = a.wait_for(rf"just-in-time registration done: connected as {THING}", 60)
        assert i < j
        assert "refuses this device's identity" not in a.text(), "the JITP drop is not a revocation"
        assert [n for n, _ in cloud.registry.things()].count(THING) == 1
        mine = [c for c in cloud.registry.certificates() if c.thing == THING]
        assert [c.status for c in mine] == ["ACTIVE"], mine
        assert a.stop() == 0
        # from now on it connects at once
        b = agents(dev)
        k = b.wait_for(rf"connected to localhost:\d+ as {THING}", 60)
        assert not any(re.search("failed", line) for _, line in b.lines[:k])
        assert json.loads(dev.cli("status", "--json").stdout)["thing_name"] == THING
        assert b.stop() == 0
    finally:
        ntp.stop()
        cloud.down()
