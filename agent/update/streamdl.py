"""Artifact downloads over AWS IoT MQTT file streams (DescribeStream / GetStream), resumable.

Blocks are requested a window at a time with a bitmap of the ones still missing (at most 128 KB
per request, AWS's limit), written at their offsets into a preallocated partial file, and the
bitmap of received blocks is persisted beside it, so a restart asks only for what is missing.
Memory stays at one block at a time; the SHA-256 is taken from the finished file.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from agent.base.digest import token_hex
from agent.update.download import DownloadError

BLOCK = 4096
WINDOW_BYTES = 128 * 1024


@dataclass(eq=False)
class StreamDownload:
    thing: str
    stream_id: str
    file_id: int
    partial: Path
    expected_size: int
    publish: Callable[[str, bytes], int]
    subscribe: Callable[[str], int]
    block_size: int = BLOCK
    timeout_s: float = 10.0
    max_rounds: int = 10_000
    progress: Callable[[int, int], None] | None = None

    def __post_init__(self) -> None:
        self.inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self.base = f"$aws/things/{self.thing}/streams/{self.stream_id}"

    @property
    def bitmap_path(self) -> Path:
        return self.partial.with_name(self.partial.name + ".blocks")

    def on_message(self, topic: str, payload: bytes) -> None:
        """Feed messages for `{base}/…` here (from the connection's router)."""
        self.inbox.put((topic, payload))

    def _blocks(self) -> int:
        return max(1, -(-self.expected_size // self.block_size))

    def _load_bitmap(self) -> bytearray:
        n = self._blocks()
        try:
            bm = bytearray(self.bitmap_path.read_bytes())
            if len(bm) == (n + 7) // 8 and self.partial.exists() and self.partial.stat().st_size == self.expected_size:
                return bm
        except OSError:
            pass
        return bytearray((n + 7) // 8)

    def _save_bitmap(self, bm: bytearray) -> None:
        from agent.base.durable import write_atomic

        write_atomic(self.bitmap_path, bytes(bm), 0o600)

    def _expect(self, kinds: tuple[str, ...], token: str) -> tuple[str, dict]:
        deadline = time.monotonic() + self.timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DownloadError(f"stream {self.stream_id}: no answer within {self.timeout_s:g} s")
            try:
                topic, payload = self.inbox.get(timeout=left)
            except queue.Empty:
                continue
            kind = topic[len(self.base) + 1 :].split("/")[0]
            if kind not in kinds:
                continue
            try:
                doc = json.loads(payload)
            except ValueError:
                continue
            if not isinstance(doc, dict) or doc.get("c") != token:
                continue  # another request's answer (or a replay): not ours
            return kind, doc

    def run(self) -> Path:
        for kind in ("description", "data", "rejected"):
            self.subscribe(f"{self.base}/{kind}/json")
        token = token_hex(8)
        self.publish(f"{self.base}/describe/json", json.dumps({"c": token}).encode())
        kind, desc = self._expect(("description", "rejected"), token)
        if kind == "rejected":
            raise DownloadError(f"stream {self.stream_id} refused: {desc.get('o')}: {desc.get('m')}")
        files = {f.get("f"): f.get("z") for f in desc.get("r", []) if isinstance(f, dict)}
        if files.get(self.file_id) != self.expected_size:
            raise DownloadError(
                f"size mismatch: stream file {self.file_id} has {files.get(self.file_id)} bytes, "
                f"the job says {self.expected_size}"
            )
        version = desc.get("s")
        bm = self._load_bitmap()
        n = self._blocks()
        if not self.partial.exists() or self.partial.stat().st_size != self.expected_size:
            with open(self.partial, "wb") as new:
                new.truncate(self.expected_size)
        per_window = max(1, WINDOW_BYTES // self.block_size)
        with open(self.partial, "r+b") as f:
            for _ in range(self.max_rounds):
                missing = [i for i in range(n) if not bm[i // 8] >> (i % 8) & 1]
                if not missing:
                    break
                start = missing[0]
                want = [i for i in missing if i < start + per_window * 8][:per_window]
                req_bm = bytearray((max(want) - start) // 8 + 1)
                for w in want:
                    req_bm[(w - start) // 8] |= 1 << ((w - start) % 8)
                token = token_hex(8)
                self.publish(
                    f"{self.base}/get/json",
                    json.dumps(
                        {
                            "c": token,
                            "s": version,
                            "f": self.file_id,
                            "l": self.block_size,
                            "o": start,
                            "b": "0x" + bytes(req_bm).hex(),
                        }
                    ).encode(),
                )  # AWS: a hex string in JSON
                for _ in want:
                    kind, blk = self._expect(("data", "rejected"), token)
                    if kind == "rejected":
                        raise DownloadError(f"stream {self.stream_id} refused a block: {blk.get('o')}: {blk.get('m')}")
                    i = blk.get("i")
                    if not isinstance(i, int) or not 0 <= i < n or blk.get("f") != self.file_id:
                        raise DownloadError("stream sent a block that was not asked for")
                    data = base64.b64decode(blk.get("p", ""))
                    want_len = min(self.block_size, self.expected_size - i * self.block_size)
                    if len(data) != want_len:
                        raise DownloadError(f"block {i} has {len(data)} bytes, expected {want_len}")
                    f.seek(i * self.block_size)
                    f.write(data)
                    bm[i // 8] |= 1 << (i % 8)
                f.flush()
                os.fsync(f.fileno())
                self._save_bitmap(bm)  # after the data is durable: a resume never skips a lost block
                if self.progress:
                    have = sum(bin(b).count("1") for b in bm)
                    self.progress(min(self.expected_size, have * self.block_size), self.expected_size)
            else:
                raise DownloadError("stream download made no progress")
        from agent.base.durable import remove

        remove(self.bitmap_path)
        return self.partial
