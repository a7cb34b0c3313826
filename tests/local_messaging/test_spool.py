"""The durable spool (agent.local_messaging.spool) on real sqlite files: order, durability, limits, counters,
a reader in another process, corruption, threads, SIGKILL at random moments and a real full disk.

The kill and full-disk tests run real child processes: what a child printed as acknowledged (only after add_many
returned) must be in the file after the kill, and the file must pass sqlite's integrity check.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from agent.local_messaging.spool import NO_EXTRAS, Extras, Spool, SpoolError, SpoolLimits, SpoolRefused, read_stats

REPO = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "PYTHONDONTWRITEBYTECODE": "1"}
BIG = SpoolLimits(max_bytes=1 << 30, max_messages=10_000_000)


def _msg(n: int, app: str = "app", size: int = 100) -> tuple[str, str, bytes, str | None, int | None]:
    return (app, f"t/{n}", str(n).encode().ljust(size, b"."), None, None)


def _number(payload: bytes) -> int:
    return int(payload.rstrip(b"."))


def _all(spool: Spool) -> list:
    out, after = [], 0
    while batch := spool.peek(after, 500):
        out += batch
        after = batch[-1].id
    return out


def _integrity(path: Path) -> list[str]:
    conn = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
    try:
        return [r[0] for r in conn.execute("PRAGMA integrity_check")]
    finally:
        conn.close()


# -- order and durability ------------------------------------------------------------------------------------


def test_mqtt5_properties_are_kept_in_order_and_count_against_the_limits(tmp_path):
    path = tmp_path / "spool.db"
    s = Spool(path, SpoolLimits(max_bytes=100))
    ex = Extras("resp/é", b"\x00\xff", (("k", "v"), ("k", "w"), ("ключ", "")))
    assert ex.size() == len("resp/é".encode()) + 2 + 2 + 2 + len("ключ".encode())
    ids = s.add_many([("app", "t/a", b"p", "text/plain", 5, ex), ("app", "t/b", b"q", None, None, NO_EXTRAS)])
    assert all(isinstance(i, int) for i in ids)
    assert s.stats()["bytes"] == (3 + 1 + ex.size()) + (3 + 1)
    # Properties too big for the whole spool are refused like a payload would be.
    (big,) = s.add_many([("app", "t/c", b"", None, None, Extras(user_properties=(("k", "v" * 200),)))])
    assert isinstance(big, SpoolRefused) and "properties" in str(big)
    s.close()
    s = Spool(path)
    a, b = _all(s)
    assert a.extras == ex and (a.content_type, a.expiry) == ("text/plain", 5)
    assert b.extras is NO_EXTRAS and not b.extras
    s.close()


V1_SCHEMA = """
CREATE TABLE messages (id INTEGER PRIMARY KEY AUTOINCREMENT, app TEXT NOT NULL, topic TEXT NOT NULL,
    payload BLOB NOT NULL, created REAL NOT NULL, size INTEGER NOT NULL, sent INTEGER NOT NULL DEFAULT 0,
    content_type TEXT, expiry INTEGER);
CREATE TABLE counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


def test_a_damaged_property_column_does_not_stop_the_queue(tmp_path):
    path = tmp_path / "spool.db"
    s = Spool(path)
    s.add_many([("a", "t/1", b"1", None, None, Extras(user_properties=(("k", "v"),))), _msg(2)])
    s.close()
    conn = sqlite3.connect(path)
    conn.execute("UPDATE messages SET user_properties = '{not json' WHERE topic = 't/1'")
    conn.commit()
    conn.close()
    s = Spool(path)
    first, second = _all(s)
    assert (first.topic, first.payload, first.extras) == ("t/1", b"1", NO_EXTRAS) and second.topic == "t/2"
    s.close()


def test_a_spool_the_previous_agent_wrote_is_upgraded_with_everything_in_it(tmp_path):
    """Version 1 without the property columns, as the previous release left it: messages, sent marks, counters.
    Afterwards that release can still use the file (a self-update that fails its trial starts it again)."""
    path = tmp_path / "spool.db"
    conn = sqlite3.connect(path)
    conn.executescript(V1_SCHEMA)
    conn.execute("INSERT INTO messages(app, topic, payload, created, size, sent) VALUES('a', 't/1', x'01', 1, 4, 1)")
    conn.execute("INSERT INTO messages(app, topic, payload, created, size) VALUES('a', 't/2', x'02', 2, 4)")
    conn.execute("INSERT INTO counters VALUES('stored', 7)")
    conn.execute("PRAGMA user_version=1")
    conn.commit()
    conn.close()
    s = Spool(path)
    old = _all(s)
    assert [(e.topic, e.payload, e.sent, e.extras) for e in old] == [
        ("t/1", b"\x01", True, NO_EXTRAS),
        ("t/2", b"\x02", False, NO_EXTRAS),
    ]
    assert s.stats()["stored"] == 7 and s.stats()["messages"] == 2
    (new,) = s.add_many([("a", "t/3", b"\x03", None, None, Extras("r/t", b"c", (("u", "p"),)))])
    s.close()
    s = Spool(path)
    assert [e.extras for e in _all(s)] == [NO_EXTRAS, NO_EXTRAS, Extras("r/t", b"c", (("u", "p"),))]
    s.close()
    # What the previous release does with the file: it accepts version 1, and its own statements (its columns
    # named) still work; a message it stores has no properties.
    conn = sqlite3.connect(path)
    assert conn.execute("PRAGMA user_version").fetchone()[0] == 1
    conn.execute(
        "INSERT INTO messages(app, topic, payload, created, size, content_type, expiry) VALUES(?, ?, ?, ?, ?, ?, ?)",
        ("a", "t/4", b"\x04", 4.0, 4, None, None),
    )
    rows = conn.execute(
        "SELECT id, app, topic, payload, created, sent, content_type, expiry FROM messages WHERE id > ? ORDER BY id",
        (0,),
    ).fetchall()
    assert [r[2] for r in rows] == ["t/1", "t/2", "t/3", "t/4"]
    conn.commit()
    conn.close()
    assert _integrity(path) == ["ok"]
    s = Spool(path)
    assert _all(s)[-1].extras is NO_EXTRAS
    s.close()


def test_ids_keep_arrival_order_across_reopen_even_after_the_newest_rows_are_deleted(tmp_path):
    path = tmp_path / "spool.db"
    s = Spool(path)
    ids = s.add_many([_msg(i) for i in range(5)])
    assert ids == sorted(ids) and len(set(ids)) == 5
    s.remove(ids[3:])  # the newest rows: a plain rowid table would hand their ids out again
    s.close()
    s = Spool(path)
    (new,) = s.add_many([_msg(5)])
    assert new > ids[-1]
    assert [_number(e.payload) for e in _all(s)] == [0, 1, 2, 5]
    s.close()


def test_what_add_many_returned_is_there_after_reopen_with_every_field(tmp_path):
    path = tmp_path / "spool.db"
    s = Spool(path, clock=lambda: 1000.5)
    ids = s.add_many([("app-a", "dt/a", b"\x00\xffbinary", "application/octet-stream", 60), _msg(1, "app-b")])
    s.close()
    s = Spool(path)
    a, b = _all(s)
    assert (a.id, a.app, a.topic, a.payload, a.created, a.sent, a.content_type, a.expiry) == (
        ids[0],
        "app-a",
        "dt/a",
        b"\x00\xffbinary",
        1000.5,
        False,
        "application/octet-stream",
        60,
    )
    assert (b.id, b.app, b.content_type, b.expiry) == (ids[1], "app-b", None, None)
    st = s.stats()  # the totals come back from the aggregate query at open
    assert st["messages"] == 2 and st["bytes"] == len("dt/a") + len(b"\x00\xffbinary") + len("t/1") + 100
    s.close()


def test_the_database_wal_and_shm_files_are_0600_whatever_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        s = Spool(tmp_path / "spool.db")
        s.add_many([_msg(1)])
        modes = {p.name: p.stat().st_mode & 0o777 for p in tmp_path.iterdir()}
        s.close()
    finally:
        os.umask(old)
    assert modes == {"spool.db": 0o600, "spool.db-wal": 0o600, "spool.db-shm": 0o600}


# -- limits --------------------------------------------------------------------------------------------------


def test_refuse_by_bytes_and_by_count_with_reasons_an_app_can_be_shown(tmp_path):
    s = Spool(tmp_path / "spool.db", SpoolLimits(max_bytes=300, max_messages=10))
    out = s.add_many([_msg(i, size=97) for i in range(4)])  # 100 bytes each with the topic
    assert [type(r) for r in out] == [int, int, int, SpoolRefused]
    assert str(out[3]) == "spool full: 300 of 300 bytes used (local_messaging.spool_max_bytes); try again later"
    s.remove(out[:3])

    s = Spool(tmp_path / "count.db", SpoolLimits(max_bytes=10_000, max_messages=2))
    out = s.add_many([_msg(i, size=10) for i in range(3)])
    assert isinstance(out[0], int) and isinstance(out[1], int) and isinstance(out[2], SpoolRefused)
    assert str(out[2]) == "spool full: 2 of 2 messages (local_messaging.spool_max_messages); try again later"
    s.remove([out[0]])  # room again
    assert isinstance(s.add_many([_msg(9, size=10)])[0], int)
    st = s.stats()
    assert (st["messages"], st["stored"], st["refused"], st["delivered"]) == (2, 3, 1, 1)
    s.close()


def test_evict_oldest_deletes_the_oldest_messages_of_any_app_to_make_room(tmp_path):
    s = Spool(tmp_path / "spool.db", SpoolLimits(max_bytes=10_000, max_messages=3, when_full="evict-oldest"))
    ids = s.add_many([_msg(i, app=f"app{i % 2}", size=10) for i in range(5)])
    assert all(isinstance(i, int) for i in ids)
    assert [_number(e.payload) for e in _all(s)] == [2, 3, 4]
    st = s.stats()
    assert (st["messages"], st["evicted"], st["stored"]) == (3, 2, 5)
    s.close()

    s = Spool(tmp_path / "bytes.db", SpoolLimits(max_bytes=250, when_full="evict-oldest"))
    s.add_many([_msg(i, size=97) for i in range(2)])
    s.add_many([_msg(2, size=177)])  # 180 bytes: both older ones must go (100 + 180 > 250 still)
    assert [_number(e.payload) for e in _all(s)] == [2]
    assert (s.stats()["bytes"], s.stats()["evicted"]) == (180, 2)
    s.add_many([_msg(3, size=67)])  # 70 bytes: fits beside it, nothing evicted
    assert [_number(e.payload) for e in _all(s)] == [2, 3] and s.stats()["evicted"] == 2
    s.close()


@pytest.mark.parametrize("policy", ["refuse", "evict-oldest"])
def test_a_message_bigger_than_the_whole_spool_is_refused_and_evicts_nothing(tmp_path, policy):
    s = Spool(tmp_path / "spool.db", SpoolLimits(max_bytes=500, when_full=policy))
    s.add_many([_msg(1, size=50)])
    ok, big = s.add_many([_msg(2, size=50), ("app", "t/big", b"x" * 600, None, None)])
    assert isinstance(ok, int) and isinstance(big, SpoolRefused)
    assert "message too big: 605 bytes" in str(big) and "local_messaging.spool_max_bytes" in str(big)
    assert len(_all(s)) == 2 and s.stats()["evicted"] == 0 and s.stats()["refused"] == 1
    s.close()


def test_expire_drops_messages_older_than_max_age_by_the_injected_clock(tmp_path):
    now = [1_000_000.0]
    s = Spool(tmp_path / "spool.db", SpoolLimits(max_age_s=100.0), clock=lambda: now[0])
    s.add_many([_msg(i) for i in range(3)])
    now[0] += 50
    s.add_many([_msg(i) for i in range(3, 5)])
    assert s.expire() == 0
    now[0] += 60  # the first three are 110 s old, the others 60 s
    assert s.expire() == 3
    assert [_number(e.payload) for e in _all(s)] == [3, 4]
    assert s.stats()["expired"] == 3 and s.stats()["messages"] == 2 and s.stats()["oldest_age_s"] == 60.0
    now[0] += 1000
    assert s.expire() == 2 and s.stats()["messages"] == 0 and s.stats()["bytes"] == 0
    s.close()


def test_expire_walks_more_than_one_chunk(tmp_path):
    now = [0.0]
    s = Spool(tmp_path / "spool.db", SpoolLimits(max_age_s=10.0), clock=lambda: now[0])
    for base in range(0, 2600, 260):
        s.add_many([_msg(i, size=8) for i in range(base, base + 260)])
    now[0] = 5.0
    s.add_many([_msg(9999, size=8)])
    now[0] = 12.0
    assert s.expire() == 2600 and [_number(e.payload) for e in _all(s)] == [9999]
    s.close()


# -- the forwarder's calls -----------------------------------------------------------------------------------


def test_peek_is_oldest_first_after_an_id_and_mark_sent_is_seen_by_peek(tmp_path):
    s = Spool(tmp_path / "spool.db")
    ids = s.add_many([_msg(i) for i in range(10)])
    assert [e.id for e in s.peek(0, 3)] == ids[:3]
    assert [e.id for e in s.peek(ids[4], 100)] == ids[5:]
    assert s.peek(ids[-1]) == [] and s.peek(0, 0) == []
    s.mark_sent(ids[:2])
    s.mark_sent(ids[:2])  # again: nothing changes
    assert [e.sent for e in s.peek(0, 4)] == [True, True, False, False]
    s.close()
    s = Spool(tmp_path / "spool.db")
    assert [e.sent for e in s.peek(0, 3)] == [True, True, False]
    s.close()


def test_remove_is_idempotent_and_counts_delivered_rejected_and_expired(tmp_path):
    s = Spool(tmp_path / "spool.db")
    ids = s.add_many([_msg(i) for i in range(6)])
    s.remove(ids[:2])
    s.remove(ids[:2])  # repeated after a crash: changes nothing
    s.remove([ids[2], 10**9])  # an id that never existed is ignored
    s.remove([ids[3]], delivered=False)
    s.remove([ids[4]], delivered=False, expired=True)
    st = s.stats()
    assert (st["delivered"], st["rejected"], st["expired"], st["messages"]) == (3, 1, 1, 1)
    assert st["bytes"] == len("t/5") + 100
    with pytest.raises(ValueError):
        s.remove(["not an id"])  # type: ignore[list-item]  # refused before any transaction starts
    with pytest.raises(TypeError):
        s.add_many([("app", "t", "a str, not bytes", None, None)])  # type: ignore[list-item]
    assert isinstance(s.add_many([_msg(7)])[0], int) and s.stats()["messages"] == 2
    s.close()
    with pytest.raises(SpoolError, match="closed"):
        s.peek()


def test_counters_and_stats_persist_across_reopen(tmp_path):
    path = tmp_path / "spool.db"
    now = [500.0]
    s = Spool(path, SpoolLimits(max_messages=3), clock=lambda: now[0])
    st = s.stats()
    assert st == {
        "messages": 0,
        "bytes": 0,
        "oldest_age_s": None,
        "max_bytes": 64 * 1024 * 1024,
        "stored": 0,
        "delivered": 0,
        "refused": 0,
        "evicted": 0,
        "expired": 0,
        "rejected": 0,
        "resent": 0,
    }
    ids = s.add_many([_msg(i) for i in range(4)])
    s.remove(ids[:1])
    s.count_resent(2)
    s.count_resent(0)
    s.close()
    now[0] = 530.0
    s = Spool(path, SpoolLimits(max_messages=3), clock=lambda: now[0])
    st = s.stats()
    assert (st["stored"], st["refused"], st["delivered"], st["resent"], st["messages"]) == (3, 1, 1, 2, 2)
    assert st["oldest_age_s"] == 30.0
    s.close()


# -- another process reads the stats -------------------------------------------------------------------------

READER = "import json, sys; from pathlib import Path; from agent.local_messaging.spool import read_stats; "
READER += "print(json.dumps(read_stats(Path(sys.argv[1]))))"


def _read_stats_elsewhere(path: Path) -> tuple[dict | None, float]:
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-c", READER, str(path)], env=ENV, capture_output=True, text=True, timeout=30)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout), time.monotonic() - t


def test_read_stats_from_another_process_while_the_agent_writes_or_not(tmp_path):
    path = tmp_path / "spool.db"
    assert _read_stats_elsewhere(path)[0] is None
    assert list(tmp_path.iterdir()) == [], "read_stats created a file"

    s = Spool(path)
    s.add_many([_msg(i) for i in range(3)])
    s.remove([s.peek(0, 1)[0].id])
    stats, _ = _read_stats_elsewhere(path)
    assert stats is not None and (stats["messages"], stats["stored"], stats["delivered"]) == (2, 3, 1)

    # Another writer holds sqlite's write lock with an uncommitted row: the reader neither waits nor sees it.
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")
    holder.execute("INSERT INTO messages(app, topic, payload, created, size) VALUES('x', 'y', x'00', 0, 2)")
    stats, took = _read_stats_elsewhere(path)
    assert stats is not None and stats["messages"] == 2 and took < 5
    holder.execute("ROLLBACK")
    holder.close()
    s.close()

    # The agent is gone (clean close: no -wal, no -shm); reading must not leave them behind either.
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool.db"]
    stats, _ = _read_stats_elsewhere(path)
    assert stats is not None and stats["messages"] == 2 and stats["max_bytes"] is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spool.db"]
    assert read_stats(path, SpoolLimits(max_bytes=1234))["max_bytes"] == 1234  # type: ignore[index]


# -- a damaged file ------------------------------------------------------------------------------------------


def test_a_corrupt_file_is_one_line_naming_the_file_never_a_traceback(tmp_path):
    path = tmp_path / "spool.db"
    path.write_bytes(b"this is not sqlite" * 500)
    with pytest.raises(SpoolError) as e:
        Spool(path)
    assert str(e.value) == f"spool {path}: file is not a database (SQLITE_NOTADB)"
    with pytest.raises(SpoolError, match="file is not a database"):
        read_stats(path)

    with pytest.raises(SpoolError) as e:
        Spool(tmp_path / "no-such-folder" / "spool.db")
    assert "\n" not in str(e.value) and "No such file or directory" in str(e.value)


def test_a_spool_from_a_newer_agent_is_refused(tmp_path):
    path = tmp_path / "spool.db"
    Spool(path).close()
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version=7")
    conn.close()
    with pytest.raises(SpoolError, match="schema version 7 is newer"):
        Spool(path)


# -- threads -------------------------------------------------------------------------------------------------


def test_one_thread_adds_while_another_peeks_and_removes_and_the_totals_stay_right(tmp_path):
    s = Spool(tmp_path / "spool.db", BIG)
    done = threading.Event()
    errors: list[BaseException] = []
    added: list[int] = []
    removed: list[int] = []

    def producer() -> None:
        try:
            for n in range(300):
                added.extend(i for i in s.add_many([_msg(n * 8 + k, size=20 + k) for k in range(8)]))
        except BaseException as e:
            errors.append(e)
        finally:
            done.set()

    def forwarder() -> None:
        try:
            while True:
                finished = done.is_set()
                entries = s.peek(0, 50)
                if not entries and finished:
                    return
                s.mark_sent([e.id for e in entries])
                s.stats()
                s.remove([e.id for e in entries])
                removed.extend(e.id for e in entries)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=producer), threading.Thread(target=forwarder)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors
    assert sorted(removed) == sorted(added) and len(added) == 2400 and removed == sorted(removed)
    st = s.stats()
    assert (st["messages"], st["bytes"], st["stored"], st["delivered"]) == (0, 0, 2400, 2400)
    s.close()


# -- SIGKILL at random moments -------------------------------------------------------------------------------

CHILD = textwrap.dedent(
    """
    import random, sys, threading, time
    from pathlib import Path
    from agent.local_messaging import spool as spool_module
    spool_module.WAL_AUTOCHECKPOINT_PAGES = 64  # checkpoints often, so kills land in them too
    path, start, forward = Path(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1"
    lock = threading.Lock()

    def say(line):
        with lock:
            sys.stdout.write(line + "\\n")
            sys.stdout.flush()

    spool = spool_module.Spool(path, spool_module.SpoolLimits(max_bytes=1 << 30, max_messages=10_000_000))
    say("ready")

    def forwarder():
        while True:
            entries = spool.peek(0, random.choice([1, 8, 32]))
            if not entries:
                time.sleep(0.001)
                continue
            ids = " ".join(str(e.id) for e in entries)
            fresh = [e.id for e in entries if not e.sent]
            if fresh:
                spool.mark_sent(fresh)
                say("sent " + " ".join(map(str, fresh)))
            say("removing " + ids)  # before: a kill during remove may or may not have removed them
            spool.remove([e.id for e in entries])
            say("removed " + ids)

    if forward:
        threading.Thread(target=forwarder, daemon=True).start()
    n = start
    while True:
        k = random.choice([1, 3, 16, 64])
        batch = [("app", f"t/{i}", str(i).encode().ljust(random.randrange(10, 400), b"."), None, None)
                 for i in range(n, n + k)]
        ids = spool.add_many(batch)
        say(f"acked {n} {ids[0]} {ids[-1]}")  # only after add_many returned: durable
        n += k
    """
)


def _kill_rounds(tmp_path: Path, forward: bool, rounds: int) -> dict[str, int]:
    path = tmp_path / "spool.db"
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    rng = random.Random()
    acked: dict[int, int] = {}  # row id -> message number
    removing: set[int] = set()
    removed: set[int] = set()
    sent: set[int] = set()
    seen = {"acked": 0, "removed": 0, "killed_before_ready": 0}
    for r in range(rounds):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(path), str((r + 1) * 10_000_000), "1" if forward else "0"],
            env=ENV,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        lines: list[str] = []
        ready = threading.Event()

        def read(proc=proc, lines=lines, ready=ready) -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                if line.endswith("\n"):  # a line cut by the kill was never acknowledged
                    lines.append(line)
                    ready.set()

        reader = threading.Thread(target=read)
        reader.start()
        if r % 3 == 0:  # from the start: the kill may land while the file is created or recovered
            time.sleep(rng.uniform(0.0, 0.2))
        else:
            assert ready.wait(30), "the child never started"
            time.sleep(rng.uniform(0.0, 0.2))
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
        reader.join(30)
        err = proc.stderr.read() if proc.stderr else ""
        if proc.stderr:
            proc.stderr.close()
        assert "Traceback" not in err, err
        if not lines:
            seen["killed_before_ready"] += 1
        for line in lines:
            word, *rest = line.split()
            if word == "acked":
                n, first, last = map(int, rest)
                for k, i in enumerate(range(first, last + 1)):
                    acked[i] = n + k  # one transaction, one writer: the ids of a batch are consecutive
            elif word == "sent":
                sent.update(map(int, rest))
            elif word == "removing":
                removing.update(map(int, rest))
            elif word == "removed":
                removed.update(map(int, rest))

        s = Spool(path, BIG)  # recovers the WAL the kill left
        try:
            assert _integrity(path) == ["ok"]
            present = {e.id: e for e in _all(s)}
            missing = sorted(set(acked) - removing - set(present))
            assert not missing, f"round {r}: acknowledged ids lost: {missing[:10]}"
            assert not removed & set(present), f"round {r}: removed ids came back: {sorted(removed & set(present))}"
            for i, e in present.items():
                if i in acked:
                    assert _number(e.payload) == acked[i] and e.topic == f"t/{acked[i]}"
                if i in sent:
                    assert e.sent, f"round {r}: id {i} was marked sent, the flag was lost"
            numbers = [_number(present[i].payload) for i in sorted(present)]
            assert numbers == sorted(numbers), "id order is not arrival order"
            assert s.stats()["messages"] == len(present)
        finally:
            s.close()
    seen["acked"], seen["removed"] = len(acked), len(removed)
    return seen


def test_sigkill_at_random_moments_loses_no_acknowledged_message(tmp_path):
    seen = _kill_rounds(tmp_path, forward=False, rounds=10)
    assert seen["acked"] > 100, seen


def test_sigkill_with_a_forwarder_peeking_marking_and_removing_concurrently(tmp_path):
    seen = _kill_rounds(tmp_path, forward=True, rounds=10)
    assert seen["acked"] > 100 and seen["removed"] > 10, seen


# -- a real full disk ----------------------------------------------------------------------------------------

FULL_DISK = textwrap.dedent(
    """
    import json, os, sqlite3, subprocess, sys
    from pathlib import Path
    from agent.local_messaging.spool import Spool, SpoolError, SpoolLimits, read_stats

    d = Path(sys.argv[1])
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=512k,mode=0700", "tmpfs", str(d)], check=True)
    obs = {}
    limits = SpoolLimits(max_bytes=1 << 30)
    path = d / "spool.db"

    def integrity():
        conn = sqlite3.connect(path.absolute().as_uri() + "?mode=ro", uri=True)
        try:
            return conn.execute("PRAGMA integrity_check").fetchone()[0]
        finally:
            conn.close()

    def check(spool, expect):
        got = {e.id: e.payload for e in spool.peek(0, 100000)}
        assert got == expect, f"stored {len(got)} rows, expected {len(expect)}"
        assert spool.stats()["messages"] == len(expect), spool.stats()
        assert integrity() == "ok"

    def attempt(name, fn):
        try:
            fn()
            obs[name] = "ok"
        except SpoolError as e:
            obs[name] = str(e)

    def fill(spool, expect, tag):
        n = 0
        while True:
            batch = [("app", "t", f"{tag}{n}.{k}".encode().ljust(1000, b"."), None, None) for k in range(4)]
            try:
                ids = spool.add_many(batch)
            except SpoolError as e:
                return str(e)
            expect.update(zip(ids, (b[2] for b in batch)))
            n += 1

    (d / "ballast").write_bytes(b"b" * 131072)  # someone else's file, deleted later to free space
    s = Spool(path, limits)
    expect = {}
    obs["first_full"] = fill(s, expect, "a")
    obs["acked_before_full"] = len(expect)
    obs["files_when_full"] = {p.name: p.stat().st_size for p in sorted(d.iterdir())}
    check(s, expect)
    ids = sorted(expect)
    attempt("mark_sent_when_full", lambda: s.mark_sent(ids[:5]))
    attempt("remove_when_full", lambda: s.remove(ids[:5]))
    if obs["remove_when_full"] == "ok":
        for i in ids[:5]:
            expect.pop(i)
    attempt("add_when_full", lambda: s.add_many([("app", "t", b"x" * 1000, None, None)]))
    assert obs["add_when_full"] != "ok"
    obs["stats_when_full"] = s.stats()
    check(s, expect)

    os.unlink(d / "ballast")
    attempt("remove_after_freeing", lambda: s.remove(ids[:5]))
    for i in ids[:5]:
        expect.pop(i, None)
    got = s.add_many([("app", "t", b"after".ljust(1000, b"."), None, None)])
    expect[got[0]] = b"after".ljust(1000, b".")
    obs["add_after_freeing"] = "ok"
    check(s, expect)

    # Full again, then closed on the full disk (its checkpoint cannot run) and opened again on it.
    (d / "ballast").write_bytes(b"b" * 65536)
    obs["second_full"] = fill(s, expect, "b")
    s.close()
    obs["files_after_close_when_full"] = {p.name: p.stat().st_size for p in sorted(d.iterdir())}
    s = Spool(path, limits)
    check(s, expect)
    attempt("remove_when_full_after_reopen", lambda: s.remove(sorted(expect)[:1]))
    if obs["remove_when_full_after_reopen"] == "ok":
        expect.pop(sorted(expect)[0])
    os.unlink(d / "ballast")
    # A delete writes every page it touches to the WAL: 200 rows need more than the 64 KiB just freed.
    gone = sorted(expect)[:200]
    attempt("remove_200_after_freeing_64k", lambda: s.remove(gone))
    if obs["remove_200_after_freeing_64k"] != "ok":
        gone = gone[:8]
        s.remove(gone)
    for i in gone:
        expect.pop(i)
    check(s, expect)
    s.close()
    s = Spool(path, limits)
    check(s, expect)
    s.close()
    obs["remaining"] = len(expect)

    # A spool closed cleanly (no -wal, no -shm), then another file takes the whole disk: opening it must say so.
    for p in d.glob("spool.db*"):
        os.unlink(p)
    small = d / "small.db"
    s = Spool(small, limits)
    s.add_many([("app", "t", b"%d" % i, None, None) for i in range(10)])
    s.close()
    obs["files_after_clean_close"] = sorted(p.name for p in d.iterdir())
    fd = os.open(d / "ballast2", os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"b" * 4096)
    except OSError:
        pass
    os.close(fd)
    attempt("open_on_full_disk", lambda: Spool(small, limits).close())
    obs["read_stats_on_full_disk"] = read_stats(small)["messages"]
    os.unlink(d / "ballast2")
    s = Spool(small, limits)
    obs["after_freeing_small"] = s.stats()["messages"]
    s.close()
    print(json.dumps(obs))
    """
)


def test_a_full_disk_refuses_new_messages_and_keeps_what_is_stored(tmp_path):
    if shutil.which("unshare") is None:
        pytest.fail("this test needs util-linux's unshare (and root) to mount a small tmpfs in its own namespace")
    script = tmp_path / "full_disk.py"
    script.write_text(FULL_DISK)
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    out = subprocess.run(
        ["unshare", "--mount", "--propagation", "private", sys.executable, str(script), str(mnt)],
        env=ENV,
        capture_output=True,
        text=True,
        timeout=60,
    )
    if out.returncode != 0 and ("Operation not permitted" in out.stderr or "permission denied" in out.stderr):
        pytest.fail(f"cannot mount a tmpfs in a private mount namespace (needs root): {out.stderr.strip()}")
    assert out.returncode == 0, out.stdout + out.stderr
    obs = json.loads(out.stdout.strip().splitlines()[-1])
    print(json.dumps(obs, indent=1))
    db = str(mnt / "spool.db")
    assert obs["first_full"] == f"spool {db}: disk full (SQLITE_FULL)"
    assert obs["second_full"] == f"spool {db}: disk full (SQLITE_FULL)"
    assert obs["acked_before_full"] > 50
    assert obs["add_when_full"] == f"spool {db}: disk full (SQLITE_FULL)"
    # In WAL mode a delete is a write too: on this disk it fails the same way and keeps the rows.
    assert obs["remove_when_full"] in ("ok", f"spool {db}: disk full (SQLITE_FULL)")
    assert obs["mark_sent_when_full"] in ("ok", f"spool {db}: disk full (SQLITE_FULL)")
    assert obs["stats_when_full"]["messages"] == obs["acked_before_full"] - (
        5 if obs["remove_when_full"] == "ok" else 0
    )
    assert obs["remove_after_freeing"] == "ok" and obs["add_after_freeing"] == "ok"
    assert obs["remaining"] > 20
    small = str(mnt / "small.db")
    assert obs["files_after_clean_close"] == ["small.db"]
    assert obs["open_on_full_disk"].startswith(f"spool {small}: disk full (")
    assert obs["read_stats_on_full_disk"] == 10 and obs["after_freeing_small"] == 10
