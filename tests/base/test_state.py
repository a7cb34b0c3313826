"""The durable state store: atomic, private, versioned, and loud about corruption."""

from __future__ import annotations

import json
import os
import stat

import pytest

from agent.base.errors import StateError
from agent.base.state import SCHEMA_VERSION, StateStore


def test_roundtrip_mode_and_schema(tmp_path):
    s = StateStore(tmp_path / "st")
    assert s.load() == {}
    s.save({"thing_name": "gw-1", "flows": {"provisioning": {"step": "csr"}}})
    assert s.load()["flows"]["provisioning"]["step"] == "csr"
    assert stat.S_IMODE(s.path.stat().st_mode) == 0o600
    assert stat.S_IMODE(s.directory.stat().st_mode) == 0o700
    doc = json.loads(s.path.read_text())
    assert doc["schema"] == SCHEMA_VERSION
    assert s.update(thing_name=None, cert="c")["cert"] == "c"
    assert "thing_name" not in s.load()
    assert s.check_mode() is None


def test_replace_is_atomic_and_leaves_no_temp_files(tmp_path):
    s = StateStore(tmp_path)
    for i in range(20):
        s.save({"n": i})
    assert s.load() == {"n": 19}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_a_failed_write_keeps_the_old_state(tmp_path, monkeypatch):
    s = StateStore(tmp_path)
    s.save({"n": 1})

    def boom(fd):
        raise OSError(5, "I/O error")

    monkeypatch.setattr(os, "fsync", boom)
    with pytest.raises(OSError):
        s.save({"n": 2})
    monkeypatch.undo()
    assert s.load() == {"n": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


@pytest.mark.parametrize(
    "content, why",
    [
        (b'{"schema": 1, "sha256": "x", "data": {"a"', "not JSON"),
        (b"", "not JSON"),
        (b"\x00\x00\x00", "not JSON"),
        (b"[]", "no 'data' object"),
        (b'{"data": {}}', "no schema version"),
    ],
)
def test_corrupt_file_is_reported_and_left_untouched(tmp_path, content, why):
    s = StateStore(tmp_path)
    s.path.write_bytes(content)
    with pytest.raises(StateError) as e:
        s.load()
    assert why in str(e.value) and str(s.path) in str(e.value)
    assert "left untouched" in str(e.value)
    assert s.path.read_bytes() == content


def test_bit_flip_is_caught_by_the_checksum(tmp_path):
    s = StateStore(tmp_path)
    s.save({"thing_name": "gw-1"})
    s.path.write_text(s.path.read_text().replace("gw-1", "gw-2"))
    with pytest.raises(StateError, match="checksum mismatch"):
        s.load()


def test_newer_schema_is_refused(tmp_path):
    s = StateStore(tmp_path)
    s.save({})
    doc = json.loads(s.path.read_text())
    doc["schema"] = SCHEMA_VERSION + 1
    s.path.write_text(json.dumps(doc))
    with pytest.raises(StateError, match="newer than this agent"):
        s.load()


def test_world_readable_state_is_flagged(tmp_path):
    s = StateStore(tmp_path)
    s.save({})
    s.path.chmod(0o644)
    assert "readable by others" in s.check_mode()
