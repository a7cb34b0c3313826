"""200 simulated devices provisioning by claim at once against the local cloud.

One process, one MQTT 5 connection per device (all sharing one claim certificate, as a fleet may),
each running AWS's IotIdentityClientV2: CreateCertificateFromCsr then RegisterThing. CSRs are made
before the clock starts. Prints completion time, requests per second and per-device latency.
No target yet (issue 3): the figure is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

import contextlib  # noqa: E402

from awsiot import iotidentity  # noqa: E402
from cloudkit import Client, identity_client, new_csr  # noqa: E402

from localcloud.cloud import LocalCloud  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--devices", type=int, default=200)
    args = ap.parse_args()
    n = args.devices
    cloud = LocalCloud(Path(tempfile.mkdtemp(prefix="provision-bench-")) / "cloud")
    serials = [f"SN-{i:05d}" for i in range(n)]
    cloud.registry.allow_serials(serials)
    info = cloud.up()
    claim_cert, claim_key = cloud.issue_claim("fleet")
    csrs = [new_csr()[0] for _ in range(n)]
    clients = [Client(info["port"], cloud.ca.cert_path, claim_cert, claim_key, f"bench-{i}") for i in range(n)]
    latencies: list[float] = [0.0] * n
    errors: list[str] = []
    done = threading.Barrier(n + 1, timeout=600)

    def device(i: int) -> None:
        t0 = time.perf_counter()
        try:
            c = clients[i].start(wait=120)
            idc = identity_client(c)
            created = idc.create_certificate_from_csr(
                iotidentity.CreateCertificateFromCsrRequest(certificate_signing_request=csrs[i])
            ).result(300)
            reg = idc.register_thing(
                iotidentity.RegisterThingRequest(
                    template_name="iot-agent-fleet",
                    certificate_ownership_token=created.certificate_ownership_token,
                    parameters={"SerialNumber": serials[i]},
                )
            ).result(300)
            assert reg.thing_name == f"gw-{serials[i]}"
        except Exception as e:  # reported below; the run still completes
            errors.append(f"device {i}: {e!r}")
        latencies[i] = time.perf_counter() - t0
        done.wait()

    try:
        start = time.perf_counter()
        threads = [threading.Thread(target=device, args=(i,), daemon=True) for i in range(n)]
        for t in threads:
            t.start()
        done.wait()
        elapsed = time.perf_counter() - start
        things = len(cloud.registry.things())
    finally:
        for c in clients:
            with contextlib.suppress(Exception):
                c.stop()
        cloud.down()
    ok = n - len(errors)
    print(f"devices: {n} at once (connect + CreateCertificateFromCsr + RegisterThing each)")
    print(f"completed: {ok}/{n} in {elapsed:.2f} s; things registered: {things}")
    print(f"provisioning requests per second: {2 * ok / elapsed:.1f} (devices per second: {ok / elapsed:.1f})")
    lat = sorted(latencies)
    print(
        f"per-device latency: p50 {statistics.median(lat):.2f} s, p95 {lat[int(0.95 * (n - 1))]:.2f} s, "
        f"max {lat[-1]:.2f} s"
    )
    for e in errors[:5]:
        print("error:", e)
    return 0 if ok == n else 1


if __name__ == "__main__":
    sys.exit(main())
