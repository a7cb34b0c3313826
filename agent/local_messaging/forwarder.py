"""Spool -> cloud: the oldest messages first, a bounded window in flight, each removed only after its PUBACK.

The spool is the record: a message leaves it only when the broker has acknowledged it (or refused it
for good: then it is counted and logged, never retried forever, so one bad message cannot block every
app's queue). Before a message is handed to the MQTT client it is marked `sent` (write ahead): after a
crash or a failed attempt, sending it again is a possible duplicate, and is counted as one.

Order: messages go out in the spool's order (arrival order across apps, so each app's own order), and
the MQTT client keeps that order on the wire. After a failure the window is drained and the cursor goes
back to the oldest message still in the spool. The window bounds what awscrt holds: it keeps QoS 1
publishes across reconnects by itself, and only the window's worth of them can exist at any time.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any

from agent.base.logfmt import escape
from agent.local_messaging.spool import Spool, SpoolError

log = logging.getLogger("agent")

EXPIRE_EVERY_S = 60.0
# A window being drained after a failure is abandoned (and resent) after this long: the MQTT client fails an
# unacknowledged publish after its ack timeout (agent.session.connection.ACK_TIMEOUT_S), so only a client
# that lost track of one would hold it longer.
DRAIN_LIMIT_S = 120.0
POLL_S = 0.01  # while publishes are in flight: how long a part batch may wait for the rest
# Errors after which a message can never be accepted: sending it again would fail the same way.
_PERMANENT = ("VALIDATION", "PACKET_TOO_LARGE", "TOPIC", "INVALID_UTF8", "PAYLOAD_FORMAT")


@dataclass(slots=True)
class _Sent:
    id: int
    future: Future


class Forwarder:
    """One thread. attach() gives it a connection (each session's); it publishes whenever that connection
    is up, and calls `on_state` when it goes up or down."""

    def __init__(self, spool: Spool, window: int, on_state: Callable[[bool], None]) -> None:
        self.spool = spool
        self.window = window
        self.on_state = on_state
        self._conn: Any = None
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._inflight: collections.deque[_Sent] = collections.deque()
        # Work in batches of a quarter window: one sent mark, one removal and one wake-up per batch instead of
        # per message (each a transaction, a thread switch); a batch not yet full still goes after POLL_S.
        self._batch = max(1, window // 4)
        self._acked: list[int] = []
        self._after = 0  # highest id handed to the client in this round
        self._online = False
        self._draining = False  # a publish failed: wait for the window to empty, then rewind
        self._drain_since = 0.0
        self._abandon = False  # a new connection: what the old one held is not waited for
        self._last_log = 0.0
        self.forwarded = 0

    def start(self) -> Forwarder:
        self._thread = threading.Thread(target=self._run, name="local-forwarder", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def attach(self, conn: Any) -> None:
        with self._lock:
            self._conn = conn
            self._abandon = True
        self._wake.set()

    def detach(self) -> None:
        """The session is ending: its client is about to be stopped, which fails what it still holds."""
        with self._lock:
            self._conn = None
        self._wake.set()

    def wake(self) -> None:
        """After every stored batch: setting an Event takes its lock and notifies, so only when it is clear. No
        wake-up is lost: the thread clears the event before it looks at the spool, after the caller's commit."""
        if not self._wake.is_set():
            self._wake.set()

    # -- the thread -------------------------------------------------------------------------------------------------
    def _run(self) -> None:
        next_expire = 0.0
        while not self._stop.is_set():
            busy = self._online and (self._inflight or self._acked)
            self._wake.wait(POLL_S if busy else 1.0)  # offline for hours: no fast polling
            self._wake.clear()
            try:
                now = time.monotonic()
                if now >= next_expire:
                    next_expire = now + EXPIRE_EVERY_S
                    n = self.spool.expire()
                    if n:
                        log.warning("local messaging: %d spooled message(s) older than spool_max_age_s dropped", n)
                with self._lock:
                    conn = self._conn
                    abandon, self._abandon = self._abandon, False
                if abandon and self._inflight:  # the old session's client failed or dropped them: resend
                    self._settle()  # what it did acknowledge leaves the spool first
                    self._flush_acked()
                    self._inflight.clear()
                    self._draining, self._after = False, 0
                self._settle()
                online = conn is not None and conn.connected.is_set()
                if online != self._online:
                    self._online = online
                    self.on_state(online)
                    if online:
                        spooled = int(self.spool.stats().get("messages") or 0)
                        log.info("local messaging: cloud reachable; %d spooled message(s) to send", spooled)
                if online and not self._draining:
                    self._send(conn)
            except SpoolError as e:
                self._log_spool(e)
                self._stop.wait(1.0)
            except Exception:  # never let the thread die: the spool keeps everything for the next try
                log.exception("local messaging: forwarder error; retrying")
                self._stop.wait(1.0)
        try:
            self._settle()
            self._flush_acked()  # acknowledged ones leave the spool before the agent stops
        except Exception as e:
            log.debug("local messaging: last removal failed (%s); those messages will be sent again", e)

    def _send(self, conn: Any) -> None:
        room = self.window - len(self._inflight)
        if room <= 0 or (self._inflight and room < self._batch):
            return
        entries = self.spool.peek(self._after, room)
        if not entries:
            return
        now = time.time()
        expired = [e.id for e in entries if e.expiry is not None and e.created + e.expiry <= now]
        if expired:
            self.spool.remove(expired, delivered=False, expired=True)
        entries = [e for e in entries if e.id not in set(expired)]
        fresh = [e.id for e in entries if not e.sent]
        resent = len(entries) - len(fresh)
        if fresh:
            self.spool.mark_sent(fresh)
        if resent:
            self.spool.count_resent(resent)
        last = len(entries) - 1
        for i, e in enumerate(entries):
            expiry = None if e.expiry is None else max(1, int(e.created + e.expiry - now))
            try:
                fut = conn.publish_async(e.topic, e.payload, 1, e.content_type, expiry, e.extras)
            except Exception as ex:  # the client is gone (session ending): try again with the next one
                log.debug("local messaging: publish not handed over (%s)", ex.__class__.__name__)
                break
            if i == last or i % self._batch == self._batch - 1:
                fut.add_done_callback(self._on_done)  # a batch's last: PUBACKs come in order (POLL_S covers a gap)
            self._inflight.append(_Sent(e.id, fut))
            self._after = e.id
        if expired:
            self._after = max(self._after, max(expired))
            self._wake.set()

    def _on_done(self, _fut: Future) -> None:
        """In the MQTT client's thread, for the last publish of each batch only (each callback is a call into
        Python from the client's thread, which must take the GIL): that batch is done, wake the forwarder."""
        if not self._wake.is_set():
            self._wake.set()

    def _flush_acked(self) -> None:
        if self._acked:
            acked, self._acked = self._acked, []
            self.spool.remove(acked, delivered=True)
            self.forwarded += len(acked)

    def _settle(self) -> None:
        """Take the finished head of the window: acknowledged ones leave the spool. After a failure the
        window drains (what the broker still acknowledges is kept) and the cursor rewinds once it is empty."""
        acked: list[int] = []
        rejected: list[int] = []
        while self._inflight and self._inflight[0].future.done():
            s = self._inflight.popleft()
            outcome = _outcome(s.future)
            if outcome == "ok":
                acked.append(s.id)
            elif outcome.startswith("rejected"):
                rejected.append(s.id)
                self._log_rejected(s.id, outcome)
            else:
                if not self._draining:
                    self._log_retry(outcome)
                    self._drain_since = time.monotonic()
                self._draining = True
        rewind = False
        if self._draining:
            keep = []
            for s in self._inflight:
                if not s.future.done():
                    keep.append(s)
                elif _outcome(s.future) == "ok":
                    acked.append(s.id)
            self._inflight = collections.deque(keep)
            if keep and time.monotonic() - self._drain_since > DRAIN_LIMIT_S:
                log.warning("local messaging: %d publish(es) never completed; sending them again", len(keep))
                keep = []
                self._inflight.clear()
            if not keep:
                self._draining, rewind = False, True
        self._acked += acked
        if len(self._acked) >= self._batch or not self._inflight or rewind:
            self._flush_acked()
        if rejected:
            self.spool.remove(rejected, delivered=False)
        if rewind:
            self._after = 0  # peek from the oldest message still spooled
            self._stop.wait(0.5)  # do not spin on a connection that fails every publish
        if rejected or rewind:
            self._wake.set()

    def _log_rejected(self, msg_id: int, outcome: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= 60:
            self._last_log = now
            log.warning(
                "local messaging: the broker refused spooled message %d for good (%s); dropped", msg_id, outcome
            )

    def _log_retry(self, outcome: str) -> None:
        now = time.monotonic()
        if now - self._last_log >= 60:
            self._last_log = now
            log.info("local messaging: a publish failed (%s); resending from the oldest unacknowledged", outcome)

    def _log_spool(self, e: SpoolError) -> None:
        now = time.monotonic()
        if now - self._last_log >= 60:
            self._last_log = now
            log.error("local messaging: spool error: %s; retrying", escape(str(e), 300))


def _outcome(fut: Future) -> str:
    """'ok', 'rejected (...)' for a final answer, or the transient error's name."""
    try:
        result = fut.result(timeout=0)
    except Exception as e:
        name = e.args[0] if e.args and isinstance(e.args[0], str) else e.__class__.__name__
        name = getattr(e, "name", name)
        if any(p in str(name) for p in _PERMANENT):
            return f"rejected ({name})"
        return str(name)
    puback = getattr(result, "puback", None)
    code = int(getattr(puback, "reason_code", 0) or 0)
    if code >= 0x80:
        return f"rejected (PUBACK reason {code:#x})"
    return "ok"
