"""The durable spool between the local socket and AWS IoT: an app's QoS 1 publish is acknowledged only once it is
here, and it leaves only after the broker's PUBACK.

Why sqlite (stdlib) and not files of our own: it gives atomic, fsync'd multi-row transactions, survives kill -9
and power loss at any instant (its WAL is checksummed and replayed on open), reports a full disk as an error
instead of a torn file, and lets `iot-agent status` read the same file from another process while the agent
writes. Rows are read a page at a time, so 100,000 spooled messages cost the process no more than its (small,
bounded) page caches: the spool is never loaded into memory.

Ordering: `id` is an AUTOINCREMENT key, so ids are never reused, even after the newest rows are deleted and the
agent restarts. The global id order is therefore the arrival order, which is the order the forwarder publishes.

Durability, and why `synchronous=FULL`: in WAL mode `synchronous=NORMAL` does not fsync at commit (only at
checkpoints), so a power cut can take back a transaction that already returned, i.e. one the app was acked for.
FULL fsyncs the WAL at every commit. That costs one fsync per transaction, which is why the server hands every
publish that arrived in one event-loop turn to a single `add_many` (group commit): one fsync for the batch.

Threading, and why two connections rather than one per thread or one behind a lock: the event loop writes
(`add_many`), the forwarder reads (`peek`) and writes (`mark_sent`, `remove`, `expire`), and anyone may call
`stats`. sqlite allows one writer at a time anyway, so every write goes through one writer connection behind
`_write_lock`: writers queue on a Python lock (woken at once when it is free) instead of polling in sqlite's busy
handler with sleeps of up to 100 ms. Reads go through a second, read-only connection behind its own lock: WAL
lets a reader run while a writer commits, and sqlite releases the GIL during I/O, so a slow fsync in `add_many`
does not hold up `peek`. Two connections (not one per thread) keep memory bounded and known: two page caches of
`cache_kib` each, whatever threads come and go. The in-memory totals change only under the write lock, after a
commit, and are read under `_totals_lock`, so `stats` never waits for an fsync and never sees a rolled-back batch.

A full disk (seen on a 512 KiB tmpfs, tests/local_messaging/test_spool.py): sqlite reports SQLITE_FULL and rolls
the transaction back; nothing stored is touched and the file stays intact. add_many raises SpoolError ("disk
full"), and so may mark_sent and remove: in WAL mode every change, a delete too, is appended to the WAL first,
and the WAL cannot be checkpointed into a main file that would have to grow. peek and stats keep working. As soon
as space is freed, everything works again without reopening. Opening a spool on a full disk fails when its -shm
file cannot be sized (SQLITE_IOERR_SHMSIZE, reported as "disk full"); read_stats still answers.

One process owns a spool file: a second `Spool` on the same file (another agent) would keep its own totals.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from agent.base import killpoints

# Bumped only for a change an older agent cannot read. Added nullable columns are not one: the previous release
# names its columns in every statement, so it still reads and writes such a file, and it must, because a
# self-update that fails its trial starts the previous release again on the same spool (an older agent refuses
# a file whose version is newer than its own). Added columns go in _ADDED_COLUMNS instead.
SCHEMA_VERSION = 1

_SCHEMA = """
CREATE TABLE IF NOT EXISTS messages (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    app TEXT NOT NULL,
    topic TEXT NOT NULL,
    payload BLOB NOT NULL,
    created REAL NOT NULL,
    size INTEGER NOT NULL,
    sent INTEGER NOT NULL DEFAULT 0,
    content_type TEXT,
    expiry INTEGER,
    response_topic TEXT,
    correlation_data BLOB,
    user_properties TEXT
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""
# Columns added since version 1 (name, type), added to a file that lacks them; NULL in rows stored before. The
# MQTT 5 properties an app's message carries to its receiver.
_ADDED_COLUMNS = (("response_topic", "TEXT"), ("correlation_data", "BLOB"), ("user_properties", "TEXT"))

_INSERT_INTO = (
    "INSERT INTO messages(app, topic, payload, created, size, content_type, expiry, response_topic, correlation_data, "
    "user_properties) VALUES"
)
_ROW = "(?, ?, ?, ?, ?, ?, ?, ?, ?, ?)"
# Rows per INSERT statement: powers of two, so a batch of any size is a few statements from a small set (each
# prepared once and kept in the connection's statement cache).
_INSERT_SIZES = (64, 32, 16, 8, 4, 2, 1)
_INSERTS = {k: _INSERT_INTO + ", ".join([_ROW] * k) for k in _INSERT_SIZES}

COUNTERS = ("stored", "delivered", "refused", "evicted", "expired", "rejected", "resent")

# Every write and read takes its Python lock first, so sqlite's busy handler only ever waits for another process
# (a status reader in WAL recovery, a checkpoint); 5 s is long enough for a slow SD card, short enough to report.
BUSY_TIMEOUT_S = 5.0
# `iot-agent status` must answer promptly even if the agent is mid-recovery: it gives up after this.
READ_STATS_BUSY_TIMEOUT_S = 0.2
# sqlite's default (1000 pages, ~4 MB of WAL between checkpoints): small enough that a checkpoint (which runs in
# the committing thread) is short, large enough that checkpoints stay rare compared to commits.
WAL_AUTOCHECKPOINT_PAGES = 1000
# After a checkpoint the WAL file is cut back to this size, so an outage's burst does not keep disk space forever.
JOURNAL_SIZE_LIMIT = 4 * 1024 * 1024
# Ids per statement in remove/mark_sent (json_each keeps it one prepared statement whatever the count).
_CHUNK = 500
# expire() deletes in transactions of at most this many rows, so the WAL stays small and add_many gets the
# write lock between them even when an outage left a week of messages to expire.
_EXPIRE_CHUNK = 1000

# sqlite primary result codes -> what an operator should read. The rest keep sqlite's own one-line message.
_REASONS = {
    3: "permission denied",  # SQLITE_PERM
    5: "database is locked",  # SQLITE_BUSY
    6: "database is locked",  # SQLITE_LOCKED
    7: "out of memory",  # SQLITE_NOMEM
    8: "read-only file system",  # SQLITE_READONLY (also: file or folder not writable by the agent)
    10: "I/O error",  # SQLITE_IOERR
    11: "file is corrupt",  # SQLITE_CORRUPT
    13: "disk full",  # SQLITE_FULL
    14: "cannot open the file",  # SQLITE_CANTOPEN
    26: "file is not a database",  # SQLITE_NOTADB
}


@dataclass(frozen=True, slots=True)
class Extras:
    """The MQTT 5 properties a publisher gives its receivers besides content type and expiry (MQTT 5 3.3.2.3:
    a server forwards them unaltered): where to answer, the answer's correlation, and user properties in
    order (names may repeat)."""

    response_topic: str | None = None
    correlation_data: bytes | None = None
    user_properties: tuple[tuple[str, str], ...] = ()

    def size(self) -> int:
        """Bytes counted against the spool's limits, as they are stored."""
        n = len(self.response_topic.encode("utf-8")) if self.response_topic else 0
        n += len(self.correlation_data or b"")
        return n + sum(len(k.encode("utf-8")) + len(v.encode("utf-8")) for k, v in self.user_properties)

    def __bool__(self) -> bool:
        return bool(self.response_topic is not None or self.correlation_data is not None or self.user_properties)


NO_EXTRAS = Extras()

# An item to store: app, topic, payload, content type, expiry, and optionally its Extras.
Item = tuple[str, str, bytes, str | None, int | None] | tuple[str, str, bytes, str | None, int | None, Extras]


class SpoolRefused(Exception):
    """One message was not stored, by policy (spool full, message too big); str(e) is shown to the app."""


class SpoolError(Exception):
    """The spool cannot be used right now (disk full, I/O error, read-only, corrupt); str(e) is one line naming
    the file and the reason, never a payload."""


@dataclass(frozen=True)
class SpoolLimits:
    max_bytes: int = 64 * 1024 * 1024  # sum of stored (topic + payload + MQTT 5 properties) bytes
    max_messages: int = 1_000_000
    max_age_s: float = 7 * 86400.0  # older messages are dropped by expire() and counted
    when_full: str = "refuse"  # or "evict-oldest": delete the oldest messages (of any app) to make room

    def __post_init__(self) -> None:
        if self.when_full not in ("refuse", "evict-oldest"):
            raise ValueError(f"when_full must be 'refuse' or 'evict-oldest', not {self.when_full!r}")
        if self.max_bytes <= 0 or self.max_messages <= 0 or self.max_age_s <= 0:
            raise ValueError("spool limits must be positive")


@dataclass(frozen=True, slots=True)
class Entry:
    id: int
    app: str
    topic: str
    payload: bytes
    created: float  # unix time at add_many
    sent: bool  # handed to the broker at least once before: a re-send may duplicate
    content_type: str | None
    expiry: int | None  # MQTT message expiry interval (s) as given by the app
    extras: Extras = NO_EXTRAS


def _reason(e: BaseException, path: Path) -> str:
    """A short reason for an sqlite error; sqlite's messages never carry bound values (payloads)."""
    code = getattr(e, "sqlite_errorcode", None)
    name = getattr(e, "sqlite_errorname", code)
    if isinstance(code, int) and (code & 0xFF) in _REASONS:
        if code == 1032:  # SQLITE_READONLY_DBMOVED: it is not the file system, the file is gone
            return f"the file was deleted or moved ({name})"
        if code & 0xFF == 10 and _no_space(path.parent):
            # A full disk does not always come back as SQLITE_FULL: sizing a new -shm file is SQLITE_IOERR_SHMSIZE
            return f"disk full ({name})"
        return f"{_REASONS[code & 0xFF]} ({name})"
    text = " ".join(str(e).split())
    return text or type(e).__name__


def _no_space(directory: Path) -> bool:
    try:
        st = os.statvfs(directory)
    except OSError:
        return False
    free = st.f_bfree if os.geteuid() == 0 else st.f_bavail  # root may write into the reserved blocks
    return free * st.f_frsize < 64 * 1024


def _error(path: Path, e: BaseException) -> SpoolError:
    return SpoolError(f"spool {path}: {_reason(e, path)}")


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _id_selections(ids: Sequence[int]) -> list[tuple[str, tuple[int, int] | tuple[str]]]:
    """WHERE clauses (with their parameters) that select exactly these ids. One contiguous run, the usual case
    (the forwarder's window is a run of the spool's order), is a range on the primary key; anything else is JSON
    arrays of at most _CHUNK for `IN (SELECT value FROM json_each(?))`, one prepared statement whatever the
    count (a `?, ?, ...` list would be a new statement per length). Converted before the transaction starts,
    so a bad id cannot leave one open."""
    clean = sorted({int(i) for i in ids})
    if not clean:
        return []
    if clean[-1] - clean[0] + 1 == len(clean):
        return [("id BETWEEN ? AND ?", (clean[0], clean[-1]))]
    return [
        ("id IN (SELECT value FROM json_each(?))", (json.dumps(clean[i : i + _CHUNK]),))
        for i in range(0, len(clean), _CHUNK)
    ]


@dataclass
class _Txn:
    """A write transaction in progress and what it changes in the totals (applied once it commits)."""

    conn: sqlite3.Connection
    count: int = 0
    bytes: int = 0


def _bump(conn: sqlite3.Connection, **deltas: int) -> None:
    """Add to the persistent counters inside the caller's transaction (so they match what was stored)."""
    for name, n in deltas.items():
        if n:
            conn.execute(
                "INSERT INTO counters(name, value) VALUES(?, ?) "
                "ON CONFLICT(name) DO UPDATE SET value = value + excluded.value",
                (name, n),
            )


def _rollback(conn: sqlite3.Connection) -> None:
    # sqlite may already have rolled back by itself (SQLITE_FULL, IOERR): then there is nothing to do.
    if conn.in_transaction:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")


class Spool:
    """The durable FIFO of QoS 1 messages; see the module docstring for durability and threading."""

    def __init__(
        self,
        path: Path,
        limits: SpoolLimits = SpoolLimits(),  # frozen, so one shared default is safe
        *,
        cache_kib: int = 256,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = Path(path)
        self.limits = limits
        self._clock = clock
        self._cache_kib = max(16, int(cache_kib))
        self._write_lock = threading.Lock()
        self._read_lock = threading.Lock()
        self._totals_lock = threading.Lock()
        self._writer: sqlite3.Connection | None = None
        self._reader: sqlite3.Connection | None = None
        self._create_file()
        try:
            self._writer = self._connect(self.path.as_posix(), uri=False)
            mode = self._writer.execute("PRAGMA journal_mode=WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise SpoolError(f"spool {self.path}: cannot use WAL mode (sqlite kept {mode!r})")
            self._writer.execute("PRAGMA synchronous=FULL")  # see the module docstring: fsync at every commit
            self._writer.execute(f"PRAGMA wal_autocheckpoint={WAL_AUTOCHECKPOINT_PAGES}")
            self._writer.execute(f"PRAGMA journal_size_limit={JOURNAL_SIZE_LIMIT}")
            self._migrate(self._writer)
            count, nbytes = self._writer.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
            self._count: int = count
            self._bytes: int = nbytes
            # Read-only at the VFS level: peek and stats cannot write by mistake.
            self._reader = self._connect(self.path.absolute().as_uri() + "?mode=ro", uri=True)
        except sqlite3.Error as e:
            self._close_quietly()
            raise _error(self.path, e) from e
        except BaseException:
            self._close_quietly()
            raise

    # -- opening ---------------------------------------------------------------------------------------------

    def _create_file(self) -> None:
        """Create the file 0600 before sqlite does: sqlite gives the -wal and -shm files the database's mode,
        so the spool's payloads are never readable by other users, whatever the umask (which is process-wide,
        so we do not touch it)."""
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
        except FileExistsError:
            return
        except OSError as e:
            raise SpoolError(f"spool {self.path}: cannot create the file: {e.strerror}") from e
        try:
            os.fchmod(fd, 0o600)
            os.fsync(fd)
        finally:
            os.close(fd)
        try:
            _fsync_dir(self.path.parent)  # the new name itself survives a power cut
        except OSError as e:
            raise SpoolError(f"spool {self.path}: cannot sync its folder: {e.strerror}") from e

    def _connect(self, target: str, *, uri: bool) -> sqlite3.Connection:
        # isolation_level=None: we issue BEGIN IMMEDIATE ourselves, so a write transaction takes sqlite's write
        # lock up front (no deadlock-prone upgrade from a read lock) and ends exactly where we COMMIT.
        conn = sqlite3.connect(
            target,
            uri=uri,
            timeout=BUSY_TIMEOUT_S,
            isolation_level=None,
            check_same_thread=False,  # each connection is used under its own lock, by whichever thread holds it
            cached_statements=32,  # the INSERT sizes and every other statement
        )
        try:
            conn.execute(f"PRAGMA cache_size=-{self._cache_kib}")
            conn.execute("PRAGMA foreign_keys=OFF")
            conn.execute("PRAGMA mmap_size=0")  # pages are read into the bounded cache, never mapped
        except BaseException:
            conn.close()
            raise
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        if version > SCHEMA_VERSION:
            raise SpoolError(
                f"spool {self.path}: schema version {version} is newer than this agent's ({SCHEMA_VERSION})"
            )
        statements = []
        if version == 0:  # a new file
            statements = [s for s in _SCHEMA.split(";") if s.strip()]
        else:  # a file an older agent wrote: what it holds is kept, the columns it lacks are added
            have = {row[1] for row in conn.execute("PRAGMA table_info(messages)")}
            statements = [f"ALTER TABLE messages ADD COLUMN {n} {t}" for n, t in _ADDED_COLUMNS if n not in have]
        if not statements:
            return
        conn.execute("BEGIN IMMEDIATE")
        try:
            for statement in statements:
                conn.execute(statement)
            conn.execute(f"PRAGMA user_version={SCHEMA_VERSION}")
            conn.execute("COMMIT")
        except BaseException:
            _rollback(conn)
            raise

    def _close_quietly(self) -> None:
        for conn in (self._reader, self._writer):
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()
        self._reader = self._writer = None

    def _w(self) -> sqlite3.Connection:
        if self._writer is None:
            raise SpoolError(f"spool {self.path}: closed")
        return self._writer

    def _r(self) -> sqlite3.Connection:
        if self._reader is None:
            raise SpoolError(f"spool {self.path}: closed")
        return self._reader

    @contextlib.contextmanager
    def _sqlite_errors(self) -> Iterator[None]:
        try:
            yield
        except sqlite3.Error as e:
            raise _error(self.path, e) from e

    @contextlib.contextmanager
    def _transaction(self, durable: bool = True, what: str = "write") -> Iterator[_Txn]:
        """One write transaction on the writer connection; the caller holds the write lock. Committed when the
        block ends, and only then do the in-memory totals take its deltas; rolled back when the block raises
        (sqlite may have rolled back already), with sqlite errors turned into SpoolError.

        durable=False commits without an fsync (synchronous=NORMAL for this one transaction): for the forwarder's
        bookkeeping (removals after PUBACK, sent marks), whose loss in a power cut only means a message is sent
        again. A process crash loses nothing either way (the WAL is written at commit), and the next durable
        commit's fsync covers it too. Stored messages are always committed durably."""
        conn = self._w()
        txn = _Txn(conn)
        try:
            if not durable:
                conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("BEGIN IMMEDIATE")
            yield txn
            conn.execute("COMMIT")
            killpoints.op("spool", what)  # the kill sweep cuts the power after every commit (tests only)
        except sqlite3.Error as e:
            _rollback(conn)
            raise _error(self.path, e) from e
        except BaseException:
            _rollback(conn)
            raise
        finally:
            if not durable:
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA synchronous=FULL")
        with self._totals_lock:
            self._count += txn.count
            self._bytes += txn.bytes

    # -- the server's side -----------------------------------------------------------------------------------

    def add_many(self, items: Sequence[Item]) -> list[int | SpoolRefused]:
        """Store a batch durably in one transaction and one commit (the group commit): for each item its new id,
        or the SpoolRefused that kept that item alone out. Raises SpoolError (nothing of the batch stored, totals
        unchanged) when sqlite cannot write: the server then refuses the whole batch with that reason."""
        if not items:
            return []
        limits = self.limits
        prepared: list[tuple[str, str, bytes, str | None, int | None, Extras, int] | SpoolRefused] = []
        for given in items:
            app, topic, payload, content_type, expiry = given[:5]
            extras = given[5] if len(given) > 5 else NO_EXTRAS
            if not isinstance(payload, bytes):
                payload = bytes(payload)  # bytearray / memoryview; a str is a programming error (TypeError)
            try:
                size = len(topic.encode("utf-8")) + len(payload) + extras.size()
            except UnicodeEncodeError:
                prepared.append(SpoolRefused("topic or property is not valid UTF-8"))
                continue
            if size > limits.max_bytes:
                prepared.append(
                    SpoolRefused(
                        f"message too big: {size} bytes (topic, payload and properties) is more than the whole spool "
                        f"({limits.max_bytes} bytes, local_messaging.spool_max_bytes)"
                    )
                )
                continue
            prepared.append((app, topic, payload, content_type, expiry, extras, size))

        now = self._clock()
        results: list[int | SpoolRefused] = []
        rows: list[tuple] = []  # inserted together, many per statement (insert_rows)
        slots: list[int] = []  # their places in results
        stored = refused = evicted = 0

        def insert_rows(conn: sqlite3.Connection) -> None:
            if not rows:
                return
            # Many rows per statement: each statement is one sqlite3_step, and each step gives up the GIL and
            # takes it back, which under load means queueing behind the forwarder's and the MQTT client's threads
            # (per row, that wait was most of a stored batch's time). The ids are consecutive: AUTOINCREMENT gives
            # each new row one more than the largest id the table ever held, and we are the only writer.
            at = 0
            last = 0
            for k in _INSERT_SIZES:
                while len(rows) - at >= k:
                    cur = conn.execute(_INSERTS[k], [v for row in rows[at : at + k] for v in row])
                    assert cur.lastrowid is not None
                    last = cur.lastrowid
                    at += k
            for offset, slot in enumerate(slots, start=last - len(rows) + 1):
                results[slot] = offset
            rows.clear()
            slots.clear()

        with self._write_lock, self._transaction(what="store") as txn:
            conn = txn.conn
            with self._totals_lock:  # exact: only writers change them, and we are the writer
                count, nbytes = self._count, self._bytes
            for ready in prepared:
                if isinstance(ready, SpoolRefused):
                    results.append(ready)
                    refused += 1
                    continue
                app, topic, payload, content_type, expiry, extras, size = ready
                over_count = count + txn.count + 1 > limits.max_messages
                over_bytes = nbytes + txn.bytes + size > limits.max_bytes
                if over_count or over_bytes:
                    if limits.when_full == "refuse":
                        results.append(
                            SpoolRefused(self._full_reason(count + txn.count, nbytes + txn.bytes, over_count))
                        )
                        refused += 1
                        continue
                    insert_rows(conn)  # eviction takes the oldest rows, which may include this batch's
                    n, b = self._evict(
                        conn,
                        count + txn.count + 1 - limits.max_messages,
                        nbytes + txn.bytes + size - limits.max_bytes,
                    )
                    txn.count, txn.bytes, evicted = txn.count - n, txn.bytes - b, evicted + n
                user_properties = json.dumps(extras.user_properties) if extras.user_properties else None
                rows.append(
                    (app, topic, payload, now, size, content_type, expiry)
                    + (extras.response_topic, extras.correlation_data, user_properties)
                )
                slots.append(len(results))
                results.append(SpoolRefused("not stored"))  # replaced by its id once inserted
                txn.count, txn.bytes, stored = txn.count + 1, txn.bytes + size, stored + 1
            insert_rows(conn)
            _bump(conn, stored=stored, refused=refused, evicted=evicted)
        return results

    def _full_reason(self, count: int, nbytes: int, over_count: bool) -> str:
        if over_count:
            return (
                f"spool full: {count} of {self.limits.max_messages} messages "
                "(local_messaging.spool_max_messages); try again later"
            )
        return (
            f"spool full: {nbytes} of {self.limits.max_bytes} bytes used "
            "(local_messaging.spool_max_bytes); try again later"
        )

    @staticmethod
    def _evict(conn: sqlite3.Connection, need_count: int, need_bytes: int) -> tuple[int, int]:
        """Delete the oldest rows (a prefix of the ids) until `need_count` rows and `need_bytes` bytes are free;
        inside the caller's transaction. Reads only (id, size), never payloads."""
        freed_n = freed_b = 0
        while freed_n < need_count or freed_b < need_bytes:
            rows = conn.execute("SELECT id, size FROM messages ORDER BY id LIMIT 64").fetchall()
            if not rows:
                break
            last = 0
            for row_id, size in rows:
                if freed_n >= need_count and freed_b >= need_bytes:
                    break
                last, freed_n, freed_b = row_id, freed_n + 1, freed_b + size
            conn.execute("DELETE FROM messages WHERE id <= ?", (last,))
        return freed_n, freed_b

    # -- the forwarder's side --------------------------------------------------------------------------------

    def peek(self, after_id: int = 0, limit: int = 64) -> list[Entry]:
        """Up to `limit` messages with id > after_id, oldest first."""
        with self._read_lock, self._sqlite_errors():
            rows = (
                self._r()
                .execute(
                    "SELECT id, app, topic, payload, created, sent, content_type, expiry, response_topic, "
                    "correlation_data, user_properties FROM messages WHERE id > ? ORDER BY id LIMIT ?",
                    (int(after_id), max(0, int(limit))),
                )
                .fetchall()
            )
        return [
            Entry(r[0], r[1], r[2], bytes(r[3]), r[4], bool(r[5]), r[6], r[7], _extras(r[8], r[9], r[10])) for r in rows
        ]

    def mark_sent(self, ids: Sequence[int]) -> None:
        """Record, before the forwarder hands these to the broker, that they may reach it: after a crash the
        re-send is then known to be a possible duplicate. One transaction.
        On a full disk this can fail (SpoolError) even when add_many's refusals leave the stored rows intact."""
        selections = _id_selections(ids)
        if not selections:
            return
        with self._write_lock, self._transaction(durable=False, what="mark sent") as txn:
            for where, params in selections:
                txn.conn.execute(f"UPDATE messages SET sent = 1 WHERE {where} AND sent = 0", params)

    def remove(self, ids: Sequence[int], *, delivered: bool = True, expired: bool = False) -> None:
        """Delete messages the broker acknowledged (delivered) or refused for good (delivered=False, counted as
        'rejected'), or that the forwarder dropped unsent because their MQTT expiry interval passed (expired=True,
        counted as 'expired'). Ids not present are ignored, so a remove repeated after a crash changes nothing.

        On a full disk this can fail too: in WAL mode a delete is a write, and it needs WAL room for every page it
        touches. Then SpoolError, the rows stay, and they are sent again later (a duplicate, which QoS 1 allows)."""
        selections = _id_selections(ids)
        if not selections:
            return
        with self._write_lock, self._transaction(durable=False, what="remove") as txn:
            n = 0
            for where, params in selections:
                sizes = txn.conn.execute(f"DELETE FROM messages WHERE {where} RETURNING size", params).fetchall()
                n += len(sizes)
                txn.count -= len(sizes)
                txn.bytes -= sum(size for (size,) in sizes)
            if expired:
                _bump(txn.conn, expired=n)
            elif delivered:
                _bump(txn.conn, delivered=n)
            else:
                _bump(txn.conn, rejected=n)

    def expire(self) -> int:
        """Delete messages older than max_age_s (counter 'expired'); how many.

        It walks from the oldest id and stops at the first message young enough. Ids are arrival order, so this
        is exact while the clock only moves forward; a message stored after the clock was stepped back expires
        when it reaches the head of the queue. That keeps the schema free of an index on `created` (which every
        insert would pay for) and the walk proportional to what is expired, not to the spool. It deletes in
        transactions of at most 1000 rows, releasing the write lock in between for add_many."""
        cutoff = self._clock() - self.limits.max_age_s
        total = 0
        while True:
            with self._write_lock:
                with self._sqlite_errors():
                    rows = (
                        self._w()
                        .execute("SELECT id, created FROM messages ORDER BY id LIMIT ?", (_EXPIRE_CHUNK,))
                        .fetchall()
                    )
                last = 0
                for row_id, created in rows:
                    if created >= cutoff:
                        break
                    last = row_id
                if not last:
                    return total
                with self._transaction(what="expire") as txn:
                    sizes = txn.conn.execute("DELETE FROM messages WHERE id <= ? RETURNING size", (last,)).fetchall()
                    txn.count -= len(sizes)
                    txn.bytes -= sum(size for (size,) in sizes)
                    _bump(txn.conn, expired=len(sizes))
                total += len(sizes)
                if last != rows[-1][0] or len(rows) < _EXPIRE_CHUNK:
                    return total

    def count_resent(self, n: int) -> None:
        """Counter 'resent' += n: entries the forwarder published again with sent=True (possible duplicates)."""
        if n <= 0:
            return
        with self._write_lock, self._transaction(durable=False, what="count resent") as txn:
            _bump(txn.conn, resent=n)

    # -- status ----------------------------------------------------------------------------------------------

    def stats(self) -> dict[str, int | float | None]:
        """messages, bytes, oldest_age_s (None when empty), max_bytes, and every counter (0 when never set)."""
        with self._totals_lock:
            count, nbytes = self._count, self._bytes
        with self._read_lock, self._sqlite_errors():
            oldest, counters = _oldest_and_counters(self._r())
        return _stats_dict(count, nbytes, oldest, counters, self.limits.max_bytes, self._clock())

    def close(self) -> None:
        """Close both connections; the last close checkpoints and removes the -wal and -shm files."""
        with self._write_lock, self._read_lock:
            self._close_quietly()


def _extras(response_topic: str | None, correlation_data: bytes | None, user_properties: str | None) -> Extras:
    if response_topic is None and correlation_data is None and user_properties is None:
        return NO_EXTRAS
    pairs: tuple[tuple[str, str], ...] = ()
    if user_properties:
        try:
            pairs = tuple((str(k), str(v)) for k, v in json.loads(user_properties))
        except (ValueError, TypeError):
            # Only add_many writes this column (json.dumps of pairs); a row that no longer parses (a damaged
            # disk) still goes out without its user properties rather than stopping the queue behind it.
            pairs = ()
    return Extras(response_topic, None if correlation_data is None else bytes(correlation_data), pairs)


def _oldest_and_counters(conn: sqlite3.Connection) -> tuple[float | None, dict[str, int]]:
    row = conn.execute("SELECT created FROM messages ORDER BY id LIMIT 1").fetchone()
    counters = dict(conn.execute("SELECT name, value FROM counters").fetchall())
    return (row[0] if row else None), counters


def _stats_dict(
    count: int, nbytes: int, oldest: float | None, counters: dict[str, int], max_bytes: int | None, now: float
) -> dict[str, int | float | None]:
    out: dict[str, int | float | None] = {
        "messages": count,
        "bytes": nbytes,
        "oldest_age_s": None if oldest is None else max(0.0, now - oldest),
        "max_bytes": max_bytes,
    }
    for name in COUNTERS:
        out[name] = int(counters.get(name, 0))
    return out


def read_stats(path: Path, limits: SpoolLimits | None = None) -> dict[str, int | float | None] | None:
    """The spool's stats for `iot-agent status`, from another process: None when there is no spool file.

    It opens the file read-only (never creating it) with a short busy timeout, so it cannot block the agent or
    be blocked for long by it; WAL lets it read while the agent is inside a transaction. The totals come from
    one aggregate query over the size column. When the -wal file is absent or empty (no agent has the spool open,
    or one is just opening it), everything is in the main file and it is opened as immutable: a plain read-only
    open would create the -wal and -shm files, and on a full disk fail to size the -shm. max_bytes is the
    configured limit when `limits` is given, else None. Raises SpoolError (one line) when the file cannot be read."""
    path = Path(path)
    if not path.exists():
        return None
    try:
        wal_frames = path.with_name(path.name + "-wal").stat().st_size > 0
    except FileNotFoundError:
        wal_frames = False
    uri = path.absolute().as_uri() + ("?mode=ro" if wal_frames else "?mode=ro&immutable=1")
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=READ_STATS_BUSY_TIMEOUT_S, isolation_level=None)
    except sqlite3.Error as e:
        if not path.exists():
            return None
        raise _error(path, e) from e
    try:
        conn.execute("PRAGMA cache_size=-256")
        conn.execute("BEGIN")  # one snapshot for all three queries
        counters: dict[str, int] = {}
        if conn.execute("PRAGMA user_version").fetchone()[0] == 0:
            count, nbytes, oldest = 0, 0, None  # created, schema not written yet
        else:
            count, nbytes = conn.execute("SELECT COUNT(*), COALESCE(SUM(size), 0) FROM messages").fetchone()
            oldest, counters = _oldest_and_counters(conn)
        conn.execute("COMMIT")
    except sqlite3.Error as e:
        raise _error(path, e) from e
    finally:
        conn.close()
    return _stats_dict(count, nbytes, oldest, counters, limits.max_bytes if limits else None, time.time())
