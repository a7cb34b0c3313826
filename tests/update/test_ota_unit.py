"""The OTA handler's bookkeeping without a cloud: a finished job handed out again gets its recorded
answer (nothing fetched, nothing installed), and an install cut between staging and the switch is
undone at start-up."""

from __future__ import annotations

import json

from otakit import CodeSigner, make_tar, our_doc

from agent.runtime.features import parse
from agent.update import install
from agent.update.ota import OtaHandler


def handler(tmp_path, state: dict) -> OtaHandler:
    signer = CodeSigner(tmp_path / "signer")
    cfg = parse(
        {
            "broker": {"endpoint": "localhost", "ca_file": "ca.pem"},
            "pkcs11": {"library": "lib.so", "token_label": "t"},
            "device": {"state_dir": str(tmp_path / "state")},
            "ota": {
                "code_signing_certificate": str(signer.cert_path),
                "download_attempts": 1,
                "targets": {"app": {"directory": str(tmp_path / "app")}},
            },
        }
    )
    h = OtaHandler(
        cfg,
        load=lambda: json.loads(json.dumps(state)),
        save=lambda d: (state.clear(), state.update(d)),
        thing="t",
        publish=lambda t, p: 0,
        subscribe=lambda t: 0,
    )
    h.signer = signer
    return h


def test_a_finished_job_handed_out_again_gets_the_recorded_answer(tmp_path):
    state = {"done": {"job-1": ["SUCCEEDED", {"result": "installed", "version": "1.0.0"}]}}
    h = handler(tmp_path, state)
    data = make_tar({"a": b"1"}, "1.0.0")
    doc = our_doc("app", "1.0.0", "app.tar", data, h.signer.sign(data), url="https://127.0.0.1:1/never-fetched")
    out = h("job-1", doc, lambda d: None)
    assert (out.status, out.details["version"]) == ("SUCCEEDED", "1.0.0")
    assert not (tmp_path / "app").exists() and state.get("active") is None
    # The same document as a new job does try (and here fails to download): proof the above was the record.
    out = h("job-2", doc, lambda d: None)
    assert out.status == "FAILED" and "download failed" in out.details["reason"]
    assert list((tmp_path / "state" / "ota").iterdir()) == []


def test_an_interrupted_switch_is_undone_at_start_up(tmp_path):
    app = tmp_path / "app"
    src = tmp_path / "a.tar"
    for v in ("1.0.0", "2.0.0"):
        src.write_bytes(make_tar({"app.txt": v.encode()}, v))
        install.stage(app, v, src, "a.tar", True)
    install.activate(app, "1.0.0")
    install.activate(app, "2.0.0")  # the power went right after this switch
    state = {
        "active": {
            "job_id": "j",
            "target": "app",
            "version": "2.0.0",
            "phase": "activating",
            "from_current": "1.0.0",
            "from_previous": None,
            "partial": str(tmp_path / "p"),
        }
    }
    h = handler(tmp_path, state)
    h.recover()
    assert install.slot(app, "current") == "1.0.0" and install.slot(app, "previous") is None
    assert sorted(p.name for p in (app / "releases").iterdir()) == ["1.0.0"]
    assert state["active"]["phase"] == "verified"  # the job re-stages from the verified artifact


def test_the_oldest_answer_is_forgotten_first_across_restarts(tmp_path):
    """The recorded answers are bounded (MAX_DONE). The state file keeps its keys sorted, so "the first key"
    after a reload is the smallest job id, not the oldest: a job that had just finished was forgotten
    first, and handed out again it would have run again. Job ids here run backwards to tell the two apart."""
    from agent.base.state import StateStore
    from agent.update.ota import MAX_DONE

    store = StateStore(tmp_path / "state")
    h = handler(tmp_path, {})
    h.load, h.save = (lambda: store.load().get("ota", {})), (lambda d: store.update(ota=d))
    ids = [f"job-{n:04d}" for n in range(MAX_DONE + 10, 0, -1)]  # the oldest has the largest id
    for job_id in ids:
        h._finish(job_id, "REJECTED", {"reason": "test"}, None)
    done = store.load()["ota"]["done"]
    assert len(done) == MAX_DONE
    assert set(done) == set(ids[-MAX_DONE:]), "the newest answers must be the ones kept"
    assert ids[-1] in done and ids[0] not in done


def test_a_rotation_keeps_its_newest_job_results(tmp_path):
    """Rotation keeps the last 20 job results, by when they were recorded, not by job id."""
    from agent.base.state import StateStore
    from agent.identity.rotation import Rotator, job_outcome

    cfg = parse(
        {"broker": {"endpoint": "localhost", "ca_file": "ca.pem"}, "pkcs11": {"library": "l.so", "token_label": "t"}},
        tmp_path / "config.toml",
    )
    rot = Rotator(cfg, StateStore(tmp_path / "state"), "gw-1")
    ids = [f"rot-{n:02d}" for n in range(30, 0, -1)]
    for job_id in ids:
        rot._done({**rot.flow(), "job_id": job_id}, "FAILED", f"test {job_id}")
    kept = rot.flow()["results"]
    assert set(kept) == set(ids[-20:])
    assert job_outcome(rot, ids[-1])[:2] == ("FAILED", f"test {ids[-1]}")
