"""Release slots: staging, atomic symlink swaps, rollback to the previous release, safe tar extraction."""

from __future__ import annotations

import io
import tarfile

import pytest

from agent.update.install import InstallError, activate, health_check, roll_back, slot, stage


def tar_with(path, members: dict[str, bytes], evil: str | None = None):
    with tarfile.open(path, "w") as t:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            t.addfile(info, io.BytesIO(data))
        if evil:
            info = tarfile.TarInfo(evil)
            info.size = 1
            t.addfile(info, io.BytesIO(b"x"))


def test_install_swap_and_roll_back(tmp_path):
    d = tmp_path / "app"
    a1, a2 = tmp_path / "a1.bin", tmp_path / "a2.bin"
    a1.write_bytes(b"v1")
    a2.write_bytes(b"v2")
    stage(d, "1.0.0", a1, "app.bin", unpack=False)
    activate(d, "1.0.0")
    assert slot(d, "current") == "1.0.0" and (d / "current" / "app.bin").read_bytes() == b"v1"
    stage(d, "1.1.0", a2, "app.bin", unpack=False)
    activate(d, "1.1.0")
    assert (slot(d, "current"), slot(d, "previous")) == ("1.1.0", "1.0.0")
    assert roll_back(d) == "1.0.0"
    assert (slot(d, "current"), slot(d, "broken")) == ("1.0.0", "1.1.0")
    assert (d / "current" / "app.bin").read_bytes() == b"v1"
    assert sorted(p.name for p in d.iterdir()) == ["broken", "current", "previous", "releases"]  # no temp links left
    with pytest.raises(InstallError, match="already installed"):
        stage(d, "1.0.0", a1, "app.bin", unpack=False)


def test_tar_releases_are_extracted_safely(tmp_path):
    d = tmp_path / "app"
    good = tmp_path / "good.tar"
    tar_with(good, {"bin/app": b"#!/bin/sh\n", "etc/conf": b"x=1\n"})
    rel = stage(d, "2.0.0", good, "good.tar", unpack=True)
    assert (rel / "bin" / "app").read_bytes() == b"#!/bin/sh\n"
    for evil in ("../../escape", "/etc/passwd-owned"):
        bad = tmp_path / "bad.tar"
        tar_with(bad, {"ok": b"1"}, evil=evil)
        with pytest.raises(InstallError, match="not a safe tar"):
            stage(d, "3.0.0", bad, "bad.tar", unpack=True)
        assert not (d / "releases" / "3.0.0").exists() and not (tmp_path / "escape").exists()


def test_health_check_outcomes(tmp_path):
    assert health_check(["true"], tmp_path, 5) == (True, "healthy")
    ok, why = health_check(["sh", "-c", "echo bad config >&2; exit 3"], tmp_path, 5)
    assert not ok and why == "health check exited 3: bad config"
    ok, why = health_check(["sleep", "5"], tmp_path, 0.3)
    assert not ok and "timed out" in why
    assert health_check([], tmp_path, 1)[0]


@pytest.mark.parametrize("filtered", [True, False], ids=["data-filter", "python-3.11.2"])
def test_extraction_with_and_without_the_data_filter(tmp_path, monkeypatch, filtered):
    """Debian bookworm's Python 3.11.2 predates tarfile's extraction filters: the same archives are
    accepted and refused either way, and extracted files get safe modes."""
    if not filtered:
        monkeypatch.delattr(tarfile, "data_filter", raising=False)
    d = tmp_path / "app"
    good = tmp_path / "good.tar"
    tar_with(good, {"bin/run": b"#!/bin/sh\n", "VERSION": b"1.0.0\n"})
    release = stage(d, "1.0.0", good, "good.tar", True)
    assert (release / "bin" / "run").read_bytes() == b"#!/bin/sh\n"
    assert not (release / "bin" / "run").stat().st_mode & 0o022
    for i, evil in enumerate(["../escape", "/abs/path"]):
        bad = tmp_path / f"bad{i}.tar"
        tar_with(bad, {"ok": b"1"}, evil=evil)
        with pytest.raises(InstallError, match="not a safe tar archive"):
            stage(d, f"2.0.{i}", bad, "bad.tar", True)
    assert not (tmp_path / "escape").exists() and sorted(p.name for p in (d / "releases").iterdir()) == ["1.0.0"]
