"""The local cloud's registry: certificates (with AWS's states), things, the serial allow list,
CA certificates registered for just-in-time provisioning, and thing groups (the quarantine group).

SQLite in the cloud's folder, so `localcloud down` / `up` keeps everything. Every method is one
transaction; the service thread and the CLI may both use it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

STATES = ("PENDING_ACTIVATION", "ACTIVE", "INACTIVE", "REVOKED")
OWNERSHIP_TOKEN_TTL_S = 3600.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS certificates (
    id TEXT PRIMARY KEY,            -- SHA-256 of the DER, hex (AWS's certificateId)
    cn TEXT UNIQUE NOT NULL,        -- the broker identity (mosquitto username)
    serial TEXT NOT NULL,           -- hex, for the CRL
    pem TEXT NOT NULL,
    status TEXT NOT NULL,
    kind TEXT NOT NULL,             -- 'device' or 'claim'
    thing TEXT,
    ownership_token TEXT,
    token_expires REAL,
    created REAL NOT NULL,
    updated REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS things (
    name TEXT PRIMARY KEY,
    attributes TEXT NOT NULL,
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS allowed_serials (serial TEXT PRIMARY KEY);
CREATE TABLE IF NOT EXISTS ca_certificates (
    id TEXT PRIMARY KEY,            -- SHA-256 of the DER, hex (AWS's caCertificateId)
    subject TEXT NOT NULL,          -- RFC 4514
    pem TEXT NOT NULL,
    status TEXT NOT NULL,           -- ACTIVE (auto-registration enabled)
    registration_config TEXT NOT NULL,  -- the JITP template: {"templateBody": "...", "roleArn": "..."}
    created REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS thing_groups (
    name TEXT NOT NULL,
    thing TEXT NOT NULL,
    PRIMARY KEY (name, thing)
);
CREATE TABLE IF NOT EXISTS counters (name TEXT PRIMARY KEY, value INTEGER NOT NULL);
"""


@dataclass(frozen=True)
class Certificate:
    id: str
    cn: str
    serial: str
    pem: str
    status: str
    kind: str
    thing: str | None
    ownership_token: str | None
    token_expires: float | None
    created: float


@dataclass(frozen=True)
class CaCertificate:
    id: str
    subject: str
    pem: str
    status: str
    registration_config: str
    created: float


@contextlib.contextmanager
def write_transaction(db: sqlite3.Connection, lock: threading.RLock, name: str) -> Iterator[None]:
    """One read-modify-write, atomic across processes (the service and the CLI share the file); a savepoint
    named `name` when the caller is inside a transaction already."""
    with lock:
        nested = db.in_transaction
        db.execute(f"SAVEPOINT {name}" if nested else "BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            db.execute(f"ROLLBACK TO {name}" if nested else "ROLLBACK")
            if nested:
                db.execute(f"RELEASE {name}")
            raise
        db.execute(f"RELEASE {name}" if nested else "COMMIT")


def certificate_id(der: bytes) -> str:
    return hashlib.sha256(der).hexdigest()


SIDE_FILES = ("-wal", "-shm", "-journal")  # SQLite's companions of the database file


def create_private_db(path: Path) -> None:
    """The database file, mode 0600 from creation, before SQLite opens it.

    The registry holds live certificate ownership tokens (and the jobs, shadows and Defender
    tables share it). SQLite would create the file 0644 (less the umask); it creates its -wal,
    -shm and -journal files with the database file's own mode, so creating that file 0600 first
    keeps all of them private. A registry from an older version (0644) is tightened in place."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
    try:
        if os.fstat(fd).st_mode & 0o077:
            os.fchmod(fd, 0o600)
    except PermissionError:
        pass  # not the owner: nothing this process may change
    finally:
        os.close(fd)
    for suffix in SIDE_FILES:
        side = path.with_name(path.name + suffix)
        try:
            if side.stat().st_mode & 0o077:
                side.chmod(0o600)
        except (FileNotFoundError, PermissionError):
            pass


class Registry:
    def __init__(self, path: Path):
        self.path = Path(path)
        create_private_db(self.path)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.executescript(SCHEMA)

    @property
    def db(self) -> sqlite3.Connection:
        """The shared connection, for the jobs store (use with `lock`)."""
        return self._db

    @property
    def lock(self) -> threading.RLock:
        return self._lock

    def close(self) -> None:
        with self._lock:
            self._db.close()

    # -- certificates -------------------------------------------------------------------
    def add_certificate(
        self, der: bytes, pem: str, cn: str, serial: int, kind: str, status: str, with_ownership_token: bool = False
    ) -> Certificate:
        assert status in STATES and kind in ("device", "claim")
        now = time.time()
        token = secrets.token_urlsafe(48) if with_ownership_token else None
        expires = now + OWNERSHIP_TOKEN_TTL_S if token else None
        cid = certificate_id(der)
        with self._lock:
            self._db.execute(
                "INSERT INTO certificates VALUES (?,?,?,?,?,?,?,?,?,?,?)",
                (cid, cn, format(serial, "x"), pem, status, kind, None, token, expires, now, now),
            )
        return self.certificate(cid)

    def certificate(self, cid: str) -> Certificate | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, cn, serial, pem, status, kind, thing, ownership_token, token_expires, created "
                "FROM certificates WHERE id = ?",
                (cid,),
            ).fetchone()
        return Certificate(*row) if row else None

    def certificate_by_cn(self, cn: str) -> Certificate | None:
        with self._lock:
            row = self._db.execute("SELECT id FROM certificates WHERE cn = ?", (cn,)).fetchone()
        return self.certificate(row[0]) if row else None

    def certificate_by_token(self, token: str) -> Certificate | None:
        with self._lock:
            row = self._db.execute("SELECT id FROM certificates WHERE ownership_token = ?", (token,)).fetchone()
        return self.certificate(row[0]) if row else None

    def certificates(self) -> list[Certificate]:
        with self._lock:
            ids = [r[0] for r in self._db.execute("SELECT id FROM certificates ORDER BY created")]
        return [self.certificate(i) for i in ids]

    def set_status(self, cid: str, status: str) -> Certificate:
        if status not in STATES:
            raise ValueError(f"unknown certificate status {status!r}")
        with self._lock:
            cur = self.certificate(cid)
            if cur is None:
                raise KeyError(cid)
            if cur.status == "REVOKED" and status != "REVOKED":
                raise ValueError("a revoked certificate cannot change state (AWS: revocation is final)")
            self._db.execute("UPDATE certificates SET status = ?, updated = ? WHERE id = ?", (status, time.time(), cid))
        return self.certificate(cid)

    def activate_and_attach(self, cid: str, thing: str) -> None:
        """RegisterThing's effect: ACTIVE and attached to the thing.

        The ownership token stays valid until it expires, so a device whose answer was lost can ask
        again and be told the same thing name (see FleetProvisioning.register_thing)."""
        with self._lock:
            self._db.execute(
                "UPDATE certificates SET status = 'ACTIVE', thing = ?, updated = ? WHERE id = ?",
                (thing, time.time(), cid),
            )

    def attach(self, cid: str, thing: str, status: str) -> None:
        """Attach to a thing and set the status in one step (a JITP template's certificate resource)."""
        if status not in STATES:
            raise ValueError(f"unknown certificate status {status!r}")
        with self._lock:
            self._db.execute(
                "UPDATE certificates SET status = ?, thing = ?, updated = ? WHERE id = ?",
                (status, thing, time.time(), cid),
            )

    # -- CA certificates (just-in-time provisioning) --------------------------------------
    def put_ca_certificate(self, cid: str, subject: str, pem: str, registration_config: str) -> CaCertificate:
        """Register a CA (ACTIVE, auto-registration on) or replace its template (AWS: UpdateCACertificate)."""
        with self._lock:
            self._db.execute(
                "INSERT INTO ca_certificates VALUES (?,?,?,'ACTIVE',?,?) ON CONFLICT(id) DO UPDATE "
                "SET registration_config = excluded.registration_config",
                (cid, subject, pem, registration_config, time.time()),
            )
        return self.ca_certificate(cid)

    def ca_certificate(self, cid: str) -> CaCertificate | None:
        with self._lock:
            row = self._db.execute(
                "SELECT id, subject, pem, status, registration_config, created FROM ca_certificates WHERE id = ?",
                (cid,),
            ).fetchone()
        return CaCertificate(*row) if row else None

    def ca_certificates(self) -> list[CaCertificate]:
        with self._lock:
            rows = self._db.execute(
                "SELECT id, subject, pem, status, registration_config, created FROM ca_certificates ORDER BY created"
            ).fetchall()
        return [CaCertificate(*r) for r in rows]

    # -- thing groups ------------------------------------------------------------------------
    def add_to_group(self, group: str, thing: str) -> bool:
        """True when the thing was not in the group before."""
        with self._lock:
            return self._db.execute("INSERT OR IGNORE INTO thing_groups VALUES (?, ?)", (group, thing)).rowcount == 1

    def remove_from_group(self, group: str, thing: str) -> bool:
        with self._lock:
            return (
                self._db.execute("DELETE FROM thing_groups WHERE name = ? AND thing = ?", (group, thing)).rowcount == 1
            )

    def group_things(self, group: str) -> list[str]:
        with self._lock:
            return [
                r[0] for r in self._db.execute("SELECT thing FROM thing_groups WHERE name = ? ORDER BY thing", (group,))
            ]

    # -- things --------------------------------------------------------------------------
    def upsert_thing(self, name: str, attributes: dict[str, str]) -> bool:
        """Create the thing or merge attributes; True when it was created."""
        with self._lock:
            row = self._db.execute("SELECT attributes FROM things WHERE name = ?", (name,)).fetchone()
            if row:
                merged = {**json.loads(row[0]), **attributes}
                self._db.execute("UPDATE things SET attributes = ? WHERE name = ?", (json.dumps(merged), name))
                return False
            self._db.execute("INSERT INTO things VALUES (?,?,?)", (name, json.dumps(attributes), time.time()))
            return True

    def has_thing(self, name: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM things WHERE name = ?", (name,)).fetchone() is not None

    def things(self) -> list[tuple[str, dict]]:
        with self._lock:
            return [
                (n, json.loads(a)) for n, a in self._db.execute("SELECT name, attributes FROM things ORDER BY name")
            ]

    def thing_certificates(self, thing: str) -> list[Certificate]:
        return [c for c in self.certificates() if c.thing == thing]

    def next_crl_number(self) -> int:
        with self._lock:
            # One statement: atomic across the CLI and the service process.
            return self._db.execute(
                "INSERT INTO counters VALUES ('crl', 1) ON CONFLICT(name) DO UPDATE "
                "SET value = value + 1 RETURNING value"
            ).fetchone()[0]

    # -- pre-provisioning allow list -----------------------------------------------------
    def allow_serials(self, serials: list[str]) -> None:
        with self._lock:
            self._db.executemany("INSERT OR IGNORE INTO allowed_serials VALUES (?)", [(s,) for s in serials])

    def serial_allowed(self, serial: str) -> bool:
        with self._lock:
            return self._db.execute("SELECT 1 FROM allowed_serials WHERE serial = ?", (serial,)).fetchone() is not None
