"""MQTT file-stream downloads against the local cloud, with a resume from a persisted block bitmap."""

from __future__ import annotations

import hashlib
import os
import threading

import pytest
from cloudkit import provision_device

from agent.update.download import DownloadError
from agent.update.signing import sha256_file
from agent.update.streamdl import StreamDownload
from localcloud.cloud import LocalCloud
from localcloud.streams import Streams


@pytest.fixture
def world(tmp_path):
    c = LocalCloud(tmp_path / "cloud")
    c.registry.allow_serials(["SN-S1"])
    info = c.up()
    data = os.urandom(300_000)
    (tmp_path / "fw.bin").write_bytes(data)
    Streams(c.registry.db, c.registry.lock, c.directory / "streams").create([tmp_path / "fw.bin"], "fw-9")
    dev, _ = provision_device(c, info, tmp_path, "SN-S1")
    yield c, dev, data, tmp_path
    dev.stop()
    c.down()


def downloader(dev, tmp_path, size, **kw):
    dl = StreamDownload(
        "gw-SN-S1",
        "fw-9",
        0,
        tmp_path / "fw.partial",
        size,
        publish=lambda t, p: dev.publish(t, p),
        subscribe=dev.subscribe,
        **kw,
    )
    stop = threading.Event()

    def pump():
        while not stop.is_set():
            try:
                t, p = dev.messages.get(timeout=0.2)
            except Exception:
                continue
            if t.startswith(dl.base):
                dl.on_message(t, p)

    threading.Thread(target=pump, daemon=True).start()
    return dl, stop


def test_stream_download_and_resume(world):
    c, dev, data, tmp = world
    dl, stop = downloader(dev, tmp, len(data))
    try:
        # Simulate an earlier run that got the first 20 blocks and a bitmap saying so.
        with open(dl.partial, "wb") as f:
            f.truncate(len(data))
            f.seek(0)
            f.write(data[: 20 * 4096])
        bm = bytearray((len(data) // 4096 + 8) // 8)
        for i in range(20):
            bm[i // 8] |= 1 << (i % 8)
        dl.bitmap_path.write_bytes(bytes(bm))
        path = dl.run()
        assert sha256_file(path) == hashlib.sha256(data).digest()
        assert not dl.bitmap_path.exists()
    finally:
        stop.set()


def test_stream_size_mismatch_is_refused(world):
    c, dev, data, tmp = world
    dl, stop = downloader(dev, tmp, len(data) + 1)
    try:
        with pytest.raises(DownloadError, match="size mismatch"):
            dl.run()
    finally:
        stop.set()
