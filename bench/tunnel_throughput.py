"""Secure tunneling: throughput through a tunnel against a direct loopback TCP copy in the same run, and
the memory one more open tunnel adds to the device's process. Targets (issue 21): ratio >= 0.5, RSS
per open tunnel <= 2 MB (what AWS's own tunneling component costs per tunnel). Also the case tunnels are
for: scp of the same file to a real sshd, straight and through the tunnel.

The device side (agent.tunneling.tunnel, the code that ships) runs in a child process of its own, so
its memory and CPU are measured alone; the local cloud's tunneling endpoint and source proxy (pure
Python stand-ins for AWS's service and localproxy) run in this process. The same sender and sink
copy the same bytes both ways: straight over loopback, then through source -> endpoint -> device ->
sink. CPU seconds per side say where the time goes.

The ceiling, measured in the same run: a tunnel is three relays in a row (source proxy, the service,
the device) and four TCP connections, where the direct copy is one. The same bytes through three relay
threads that only copy (recv, sendall: no TLS, no WebSocket, no framing, nothing else) are the most any
tunnel of that shape can carry on this machine; the ratio is also given against that ceiling.
Exit status 1 if a target is missed.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TARGET_RATIO = 0.5
TARGET_RSS_KIB = 2000  # 2 MB
sys.path.insert(0, str(REPO))

from localcloud.cloud import LocalCloud  # noqa: E402
from localcloud.sshd import Sshd  # noqa: E402
from localcloud.tunnel_source import SourceProxy  # noqa: E402
from localcloud.tunnels import TunnelRegistry, TunnelService  # noqa: E402

DEVICE = r"""
import json, sys, time
sys.path.insert(0, {repo!r})
from pathlib import Path
from agent.tunneling.config import TunnelingConfig, TunnelService
from agent.tunneling.tunnel import Tunnel

def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])

spec = json.loads(Path({spec!r}).read_text())
cfg = TunnelingConfig(enabled=True, services={{"SINK": TunnelService(spec["sink"]), "SSH": TunnelService(spec["ssh"])}},
                      endpoint="localhost", port=spec["port"])
import awscrt.io
# What the agent's MQTT connection has set up already: the CRT's event loops, resolver and a TLS context.
awscrt.io.ClientBootstrap.get_or_create_static_default()
_opts = awscrt.io.TlsContextOptions()
_opts.override_default_trust_store_from_path(None, spec["ca"])
_ctx = awscrt.io.ClientTlsContext(_opts)
time.sleep(0.5)
print("rss", 0, rss(), flush=True)
tunnels = []
for i, token in enumerate(spec["tokens"], 1):
    t = Tunnel(token=token, services=("SINK", "SSH"), host="localhost", port=spec["port"], ca_file=Path(spec["ca"]),
               cfg=cfg, connect_timeout_s=10).start()
    deadline = time.monotonic() + 30
    while t.info()["state"] != "open" and time.monotonic() < deadline:
        time.sleep(0.01)
    tunnels.append(t)
    time.sleep(0.2)
    print("rss", i, rss(), flush=True)
sys.stdin.readline()
for t in tunnels:
    t.stop()
"""


def cpu_s(pid: int | None = None) -> float:
    fields = Path(f"/proc/{pid or 'self'}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Sink:
    """Counts what arrives on each connection; one thread per connection."""

    def __init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.done = threading.Event()
        self.got = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._drain, args=(c,), daemon=True).start()

    def _drain(self, c: socket.socket) -> None:
        n = 0
        with c:
            while chunk := c.recv(1 << 18):
                n += len(chunk)
        self.got = n
        self.done.set()


def copy_relays(target: tuple[str, int], n: int) -> tuple[str, int]:
    """n relays in a row in front of `target`, each one thread that only copies (for one connection); the first
    one's address. The ceiling for any relay chain of that length (see the module docstring)."""
    for _ in range(n):
        listener = socket.create_server(("127.0.0.1", 0))

        def relay(listener: socket.socket = listener, target: tuple[str, int] = target) -> None:
            with listener:
                c, _ = listener.accept()
            with c, socket.create_connection(target) as out:
                while chunk := c.recv(1 << 18):
                    out.sendall(chunk)
                out.shutdown(socket.SHUT_WR)

        threading.Thread(target=relay, daemon=True).start()
        target = listener.getsockname()[:2]
    return target


def transfer(address: tuple[str, int], sink: Sink, total: int) -> float:
    """Seconds from connect to the sink having every byte (the sender half-closes when done)."""
    block = os.urandom(1 << 20)
    sink.done.clear()
    start = time.perf_counter()
    with socket.create_connection(address) as s:
        sent = 0
        while sent < total:
            s.sendall(block)
            sent += len(block)
        s.shutdown(socket.SHUT_WR)
        if not sink.done.wait(300):
            raise RuntimeError("the sink did not get everything within 300 s")
        elapsed = time.perf_counter() - start
    if sink.got != total:
        raise RuntimeError(f"the sink got {sink.got} of {total} bytes")
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=int, default=256, help="bytes copied each way (MiB)")
    ap.add_argument("--tunnels", type=int, default=10, help="open tunnels for the memory figure")
    ap.add_argument("--runs", type=int, default=3)
    args = ap.parse_args()
    total = args.mb << 20
    work = Path(tempfile.mkdtemp(prefix="tunnel-bench-"))
    cloud = LocalCloud(work / "cloud")
    reg = TunnelRegistry(cloud.registry.db, cloud.registry.lock)
    pki = cloud.directory / "pki"
    svc = TunnelService(reg, pki / "server.pem", pki / "server.key").start()
    sink = Sink()
    opened = [reg.open("bench", ["SINK", "SSH"], 3600) for _ in range(args.tunnels)]
    sshd = Sshd(work / "sshd").start()
    spec = work / "spec.json"
    spec.write_text(
        json.dumps(
            {
                "tokens": [t.destination_token for t in opened],
                "port": svc.port,
                "ca": str(cloud.ca.cert_path),
                "sink": f"127.0.0.1:{sink.port}",
                "ssh": f"127.0.0.1:{sshd.port}",
            }
        )
    )
    spec.chmod(0o600)
    failed = True
    device = subprocess.Popen(
        [sys.executable, "-c", DEVICE.format(repo=str(REPO), spec=str(spec))],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        rss = {}
        for _ in range(args.tunnels + 1):
            _, i, kb = device.stdout.readline().split()
            rss[int(i)] = int(kb)
        first = rss[1] - rss[0]
        per = (rss[args.tunnels] - rss[1]) / max(1, args.tunnels - 1)
        print(f"device process: {rss[0] / 1024:.1f} MiB before any tunnel (awscrt's event loops and a TLS context up)")
        print(f"  first tunnel adds {first / 1024:.2f} MiB (awscrt.websocket and the tunnel module, once)")
        print(f"  each further open tunnel adds {per / 1024:.3f} MiB (mean of {args.tunnels - 1}; target <= 2 MB)")

        listen = {"SINK": ("127.0.0.1", 0), "SSH": ("127.0.0.1", 0)}
        src = SourceProxy("localhost", svc.port, cloud.ca.cert_path, opened[0].source_token, listen)
        addresses = src.start()
        through = addresses["SINK"]
        direct_s, tunnel_s, ceiling_s = [], [], []
        cpu = {"device": 0.0, "endpoint+source": 0.0}
        transfer(through, sink, 8 << 20)  # warm-up
        for _ in range(args.runs):
            direct_s.append(transfer(("127.0.0.1", sink.port), sink, total))
            ceiling_s.append(transfer(copy_relays(("127.0.0.1", sink.port), 3), sink, total))
            d0, p0 = cpu_s(device.pid), cpu_s()
            tunnel_s.append(transfer(through, sink, total))
            cpu["device"] += cpu_s(device.pid) - d0
            cpu["endpoint+source"] += cpu_s() - p0
        blob = work / "blob.bin"
        with open(blob, "wb") as f:
            for _ in range(args.mb):
                f.write(os.urandom(1 << 20))

        def scp(port: int) -> float:
            start = time.perf_counter()
            r = subprocess.run(
                ["scp", *sshd.scp_args(port), str(blob), f"{sshd.host}:/dev/null"], capture_output=True, timeout=600
            )
            if r.returncode != 0:
                raise RuntimeError(f"scp failed: {r.stderr.decode(errors='replace')[-300:]}")
            return time.perf_counter() - start

        scp_direct = min(scp(sshd.port) for _ in range(args.runs))
        scp_tunnel = min(scp(addresses["SSH"][1]) for _ in range(args.runs))
        src.stop()
        mb = total / 1e6
        direct, tunnel, ceiling = mb / min(direct_s), mb / min(tunnel_s), mb / min(ceiling_s)
        print(f"direct loopback TCP copy: {direct:.0f} MB/s (best of {args.runs}, {args.mb} MiB)")
        print(
            f"ceiling, 3 relays that only copy: {ceiling:.0f} MB/s = {ceiling / direct:.3f} of the direct copy: "
            "no tunnel (3 relays) carries more on this machine"
        )
        print(f"through the tunnel:       {tunnel:.0f} MB/s")
        print(f"ratio: {tunnel / direct:.3f} (target >= {TARGET_RATIO}); of the ceiling: {tunnel / ceiling:.3f}")
        failed = tunnel / direct < TARGET_RATIO or per > TARGET_RSS_KIB
        print(
            f"scp to sshd, {args.mb} MiB: straight {mb / scp_direct:.0f} MB/s, through the tunnel "
            f"{mb / scp_tunnel:.0f} MB/s, ratio {scp_direct / scp_tunnel:.3f}"
        )
        per_mb = {k: v / (mb * args.runs) * 1000 for k, v in cpu.items()}
        print(
            f"CPU per MB through the tunnel: device {per_mb['device']:.2f} ms, "
            f"local cloud endpoint + source (this process) {per_mb['endpoint+source']:.2f} ms"
        )
    finally:
        if device.poll() is None:
            device.stdin.write("\n")
            device.stdin.flush()
            try:
                device.wait(30)
            except subprocess.TimeoutExpired:
                device.kill()
        svc.stop()
        sshd.stop()
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
