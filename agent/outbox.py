"""Store-and-forward for usage records, and the offline identity cache (DESIGN.md "Offline",
"Outbox durability", "Personal data").

One SQLite database (WAL, synchronous=FULL) owned by one connection in its own thread: the event
loop never waits on the disk. Writes that arrive together are committed together (one fsync for
many records), so a burst of scans costs little more than one. A record is committed before the
HIS hears about its scan, keeps its msgGuid (the platform's idempotency key) through every retry
and restart, and is deleted `outbox.retention` after the platform has it.

Personal data at rest (DESIGN.md "Personal data"): a record's payload (the QR code, names, ID
numbers) and a cached identity are sealed (agent/sealing.py) with the row's msgGuid or code index
as associated data, under a key kept outside the database; the cache is indexed by a keyed hash
of the code (Keyring.qr_index), so a copied database cannot be searched for a known code; a
record the platform has keeps no payload at all; dead records go `outbox.dead_retention` after
they died. secure_delete zeroes what is deleted, and the WAL is truncated after deletions, so a
deleted row is not left readable in the -wal file either. A corrupt database's readable rows are
carried over to a new one and the corrupt file is deleted.

A record made while the clock was not right (agent/clock.py) is held, with its scan's boot id
and CLOCK_BOOTTIME, until the uploader can re-time it to the scan's true time; one from another
boot goes to dead-letter saying so, and `retry` then asks for the scan's time or leave to keep its own.

A full disk, an unwritable directory or a corrupt file never stops the box: the store reports
the problem (an alarm), the caller carries on without it, and the next write tries again.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import os
import queue
import resource
import sqlite3
import threading
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterator, NamedTuple

import msgspec
import orjson

from agent import sealing
from agent.clock import RELEASE_FLOOR, Clock, Stamp
from agent.codes import Outcome
from agent.model import Alarm, ComponentStatus, ScanboxError, UsageRecord, local_iso
from agent.platforms.base import Platform, PlatformError, PlatformRejected
from agent.supervisor import Supervisor
from drivers.base import Backoff

logger = logging.getLogger(__name__)

# 1: payloads and identities in clear JSON; 2: sealed, no payload once sent, clock_ok;
# 3: the identity cache indexed by a keyed hash of the code (older entries are deleted);
# 4: boot_id, boottime, retime_to, retimed (records held for the clock are re-timed)
SCHEMA_VERSION = 4
SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    guid TEXT NOT NULL UNIQUE,          -- msgGuid: the platform's idempotency key, kept for life
    operation TEXT NOT NULL,            -- e.g. RHC_E0003 (a deferred verification), RHC_E0009
    payload BLOB NOT NULL,              -- the message's values, JSON, sealed; empty once sent
    scan_id TEXT,
    created_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    platform_code TEXT,
    platform_message TEXT,
    done_at REAL,
    clock_ok INTEGER NOT NULL DEFAULT 1, -- 0: made while the clock was not right; held until re-timed
    boot_id TEXT,                       -- clock_ok 0: the kernel's boot id then
    boottime REAL,                      -- clock_ok 0: CLOCK_BOOTTIME at the scan, in that boot
    retime_to REAL,                     -- clock_ok 0: the scan's time, as a technician gave it (retry --at)
    retimed REAL                        -- seconds its time was moved when re-timed; NULL: never
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at, id);
CREATE TABLE IF NOT EXISTS identity_cache (
    qr_hash TEXT PRIMARY KEY,           -- HMAC-SHA256 of the code (Keyring.qr_index): the code is a credential
    identity BLOB NOT NULL,             -- JSON, sealed; personal data, expires
    verified_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS identity_cache_expiry ON identity_cache (expires_at);
"""
# after a failed open, wait this long before trying again (a full disk, a missing directory)
REOPEN_AFTER_S = 10.0
MAX_BATCH = 256
# an upload's outcome waits this long for others to share its commit (one fsync for many): a
# power cut sends the uploads of the last MARK_DELAY_S again, with their msgGuids
MARK_DELAY_S = 0.01
PAGE = 128  # due records an upload round reads at once (at least 8 per upload in flight)
MAX_RETIME = 256  # held records re-timed in one transaction
THREAD_NAME = "outbox-db"
IDLE_CHECK_S = 60.0
# while records wait for the clock to be right: how often the uploader looks at it
CLOCK_POLL_S = 1.0
# slots of the unrecorded-uses ledger (a use that could not be recorded: the disk was full)
LEDGER_NAME = "unrecorded.dat"
LEDGER_SLOT = 256
LEDGER_SLOTS = 64  # the first holds the count; 16 KiB, allocated while there is room


class StoreUnavailable(Exception):
    """The database cannot be used now (disk full, unwritable, corrupt, closed)."""


class RetryRefused(ValueError):
    """A retry that needs a decision first (a record whose time is not the scan's); the message
    says which. A ValueError: the database thread rolls back that job alone."""


class Row(msgspec.Struct, frozen=True):
    """One outbox record as stored."""

    id: int
    guid: str
    operation: str
    values: dict[str, Any] | None  # None: the payload cannot be opened (see `unreadable`)
    scan_id: str | None
    created_at: float
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    platform_code: str | None
    platform_message: str | None
    done_at: float | None
    clock_ok: bool = True
    unreadable: str | None = None
    stamp: Stamp | None = None  # clock_ok False: where the scan lies in time (its boot, BOOTTIME)
    retime_to: float | None = None  # clock_ok False: the scan's time a technician gave
    retimed: float | None = None  # seconds the time was moved when re-timed

    @property
    def record(self) -> UsageRecord:
        return UsageRecord(self.guid, self.operation, self.values or {}, self.scan_id, self.created_at)

    def to_json(self, with_values: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "msg_guid": self.guid, "operation": self.operation, "scan_id": self.scan_id,
            "created_at": _iso(self.created_at), "state": self.state, "attempts": self.attempts,
            "next_attempt_at": _iso(self.next_attempt_at) if self.state == "pending" else None,
            "last_error": self.last_error, "platform_code": self.platform_code,
            "platform_message": self.platform_message, "done_at": _iso(self.done_at),
            "clock_ok": self.clock_ok, "retimed_s": None if self.retimed is None else round(self.retimed, 3),
        }
        if self.unreadable:
            out["unreadable"] = self.unreadable
        if with_values:
            out["values"] = self.values
        return out


STATS_REUSE_S = 1.0
# the bound on SQLite's page cache per connection (its default is 2000 KiB)
PAGE_CACHE_KIB = 512

# the due records of a page, oldest first, as one row (JSON): the store's thread hands the GIL
# back and forth with the loop once per row it steps through, and a busy loop makes each of those
# wait. The first page of a round goes by the retry-time index and sorts what is due (few are
# during a backoff); the next ones along the ids past the last one read (a backlog: no sort of
# all of it for each page). created_at as text that reads back exactly (JSON keeps 15 digits)
_PAGE = ("SELECT json_group_array(json_array(id, guid, operation, hex(payload), scan_id, printf('%!.17g', created_at)))"
         " FROM (SELECT id, guid, operation, payload, scan_id, created_at FROM outbox"
         " WHERE state = 'pending' AND clock_ok = 1 AND next_attempt_at <= ? {after} ORDER BY id LIMIT ?)")
_CLAIM = _PAGE.format(after="")
_CLAIM_AFTER = _PAGE.format(after="AND id > ?")
# the outcomes of a batch, one statement for each (state, code, message): the ids as JSON, looked
# up by rowid (`+state`: not along an index of every pending record)
_MARK = ("UPDATE outbox SET state = ?, platform_code = ?, platform_message = ?, done_at = ?,"
         " attempts = attempts + 1{payload} WHERE id IN (SELECT value FROM json_each(?)) AND +state = 'pending'")
# the platform has a sent record: its payload (the QR code, a bearer credential, and the personal
# data) has no further use here; a dead one keeps it for a retry
_MARK_SENT = _MARK.format(payload=", payload = X''")
_MARK_DEAD = _MARK.format(payload="")

# an upload's outcome: (record id, "sent" or "dead", the platform's code, its message)
Mark = tuple[int, str, str | None, str | None]


class Due(NamedTuple):
    """A record for the uploader, as read: its payload still sealed (`Store.record` opens it
    when it goes)."""

    id: int
    guid: str
    operation: str
    payload: bytes
    scan_id: str | None
    created_at: float


class Store:
    """The outbox and the identity cache. Every method is a coroutine that runs its SQL in the
    store's own thread; StoreUnavailable means the database cannot be used right now."""

    name = "outbox"

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time,
                 stamp: Callable[[float | None], Stamp | None] = lambda monotonic: None,
                 keyring: sealing.Keyring | None = None, owner: bool = True,
                 supervisor: Supervisor | None = None) -> None:
        self.path = path
        self.clock = clock
        # None: the clock is right; else a record made now has a wrong time, and this says
        # where its scan lies in time (Clock.stamp)
        self.stamp = stamp
        # None: loaded at open from where agent/sealing.py says
        self.keyring = keyring
        # the daemon: makes the key and the ledger when missing, migrates. Not the CLI: a key it
        # made would seal nothing anyone has, and files it made as root would lock the daemon out
        self.owner = owner
        # the database thread is the supervisor's child (critical: without it `status` cannot
        # count the outbox); without one (the CLI) a thread of its own
        self.supervisor = supervisor
        self.error: str | None = None  # why the store is unusable now (for alarms); None when fine
        self.recovered: str | None = None  # a corrupt database was carried over at open
        self.newest: float | None = None  # the newest time in the database at open (the clock's floor)
        self.ledger = Ledger(path.with_name(LEDGER_NAME))
        self._queue: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._open_failed_at: float | None = None
        # stats() answers from its last counts for up to STATS_REUSE_S while no write was submitted
        # here since, no connection was (re)opened and no cached identity expired: `status` (a HIS
        # may ask before every scan) costs no thread round trip. A change the CLI makes in its own
        # process shows within STATS_REUSE_S
        self._writes = 0
        self._connections = 0
        self._stats: tuple[tuple[int, int], float, dict[str, int], float | None, int, float | None] | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Start the store's thread and open the database; never raises (see `error`)."""
        if self._thread is None:
            if self.supervisor is not None:
                self._thread = self.supervisor.thread(THREAD_NAME, self._run, critical=True)
            else:
                self._thread = threading.Thread(target=self._run, name=THREAD_NAME, daemon=True)
                self._thread.start()
        try:
            await self._submit(lambda conn: None, write=False)
        except StoreUnavailable:
            pass  # recorded in self.error; the next call tries again

    async def close(self) -> None:
        thread = self._live_thread()
        if thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(thread.join, 10)
        self._thread = None

    @property
    def available(self) -> bool:
        return self.error is None

    @property
    def unrecorded(self) -> int:
        """Uses that could not be recorded (the store was unusable), since the ledger was cleared."""
        return self.ledger.count

    def note_unrecorded(self, record: UsageRecord) -> None:
        """A use that could not be stored: its count, scan id and time go to the ledger, which
        was allocated while there was room. Blocking (a small write and fsync): from a thread."""
        self.ledger.add(record, self.clock())

    async def get_status(self) -> ComponentStatus:
        """The outbox's counts (None when the database cannot be read) and what is wrong."""
        try:
            stats: dict[str, Any] | None = await self.stats()
        except StoreUnavailable:
            stats = None
        alarms = []
        if self.error:
            alarms.append(Alarm("OUTBOX_UNAVAILABLE", "outbox", self.error))
        if self.recovered:
            alarms.append(Alarm("OUTBOX_RECOVERED", "outbox", self.recovered))
        if self.unrecorded:
            alarms.append(Alarm("USES_UNRECORDED", "outbox", "%d uses could not be recorded for upload; their scan "
                                "ids and times: `scanbox outbox unrecorded`" % self.unrecorded))
        if self.keyring is not None and self.keyring.beside_data:
            alarms.append(Alarm("STORE_KEY_BESIDE_DATA", "outbox", "the key that seals personal data is %s, beside "
                                "the data (no store.key credential): restart the service as shipped, which makes "
                                "/etc/scanbox/store.key; if this stays, `journalctl -u scanbox` says why it could "
                                "not" % self.keyring.source))
        if stats and stats["dead"]:
            alarms.append(Alarm("OUTBOX_DEAD", "outbox", "%d records the platform refused; see `scanbox outbox "
                                "list --state dead`" % stats["dead"]))
        return ComponentStatus(dict(stats, available=True) if stats else {"available": False, "error": self.error},
                               alarms)

    # --- the outbox --------------------------------------------------------------------------

    async def enqueue(self, record: UsageRecord, *, attempts: int = 0, next_attempt_at: float = 0.0,
                      last_error: str | None = None, scanned: float | None = None) -> int:
        """Store a record for upload; returns once it is on disk (fsynced). `scanned`: the
        time.monotonic() reading of its scan. Made while the clock is not right, the record is
        held (clock_ok 0) with its boot and CLOCK_BOOTTIME, to be re-timed before it goes."""
        stamp = self.stamp(scanned)

        def insert(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO outbox (guid, operation, payload, scan_id, created_at, state, attempts,"
                " next_attempt_at, last_error, clock_ok, boot_id, boottime)"
                " VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?, ?, ?, ?)",
                (record.guid, record.operation, self._seal_values(record.guid, record.values),
                 record.scan_id, record.created_at, attempts, next_attempt_at, last_error, int(stamp is None),
                 stamp.boot_id if stamp else None, stamp.boottime if stamp else None))
            return int(cur.lastrowid or 0)
        return await self._submit(insert, stores=True)

    async def claim(self, limit: int, after: int | None = None) -> list[Due]:
        """What the uploader sends: pending records whose time has come, oldest first, not those
        held for the clock; `after`: past this id only (the next page of a round)."""
        now = self.clock()

        def read(conn: sqlite3.Connection) -> str:
            if after is None:
                return str(conn.execute(_CLAIM, (now, limit)).fetchone()[0])
            return str(conn.execute(_CLAIM_AFTER, (now, after, limit)).fetchone()[0])
        page = orjson.loads(await self._submit(read, write=False))
        due = [Due(i, guid, operation, bytes.fromhex(payload), scan_id, float(created))
               for i, guid, operation, payload, scan_id, created in page]
        due.sort()  # by id: SQLite does not promise json_group_array its rows in order
        return due

    def record(self, due: Due) -> UsageRecord:
        """The record to send. sealing.SealError, StoreUnavailable (no key) or ValueError when
        its payload cannot be opened."""
        # orjson: the standard library's json took twice as long as opening the seal
        values = orjson.loads(self._keys().open(due.payload, b"outbox:" + due.guid.encode()))
        return UsageRecord(due.guid, due.operation, values, due.scan_id, due.created_at)

    async def finish(self, marks: list[Mark]) -> None:
        """Uploads' outcomes, in one transaction: each (record id, "sent" or "dead", the
        platform's code, its message). A record no longer pending (the CLI purged it) is left."""
        now = self.clock()
        groups: dict[tuple[str, str | None, str | None], list[int]] = {}
        for record_id, state, code, message in marks:
            groups.setdefault((state, code, message), []).append(record_id)

        def update(conn: sqlite3.Connection) -> None:
            for (state, code, message), ids in groups.items():
                conn.execute(_MARK_SENT if state == "sent" else _MARK_DEAD,
                             (state, code, message, now, orjson.dumps(ids).decode()))
        await self._submit(update)

    async def next_due_at(self) -> float | None:
        return await self._submit(lambda conn: conn.execute(
            "SELECT min(next_attempt_at) FROM outbox WHERE state = 'pending' AND clock_ok = 1").fetchone()[0],
            write=False)

    async def held(self, limit: int) -> list[Row]:
        """Pending records made while the clock was not right, oldest first: each waits to be
        re-timed (or, from another boot, for a technician)."""
        return await self._submit(lambda conn: [self._row(r) for r in conn.execute(
            "SELECT * FROM outbox WHERE state = 'pending' AND clock_ok = 0 ORDER BY id LIMIT ?", (limit,))],
            write=False)

    async def retime(self, changes: list[tuple[int, UsageRecord, float]]) -> int:
        """Held records re-timed, in one transaction: (id, the record with its new values and
        created_at, seconds its time moved). They are due as they were; how many changed."""
        sealed = [(self._seal_values(record.guid, record.values), record.created_at, moved, record_id)
                  for record_id, record, moved in changes]

        def update(conn: sqlite3.Connection) -> int:
            done = 0
            for values in sealed:
                done += conn.execute(
                    "UPDATE outbox SET payload = ?, created_at = ?, clock_ok = 1, retimed = ?, retime_to = NULL"
                    " WHERE id = ? AND state = 'pending' AND clock_ok = 0", values).rowcount
            return done
        return await self._submit(update)

    async def mark_sent(self, record_id: int, code: str | None, message: str | None) -> None:
        await self.finish([(record_id, "sent", code, message)])

    async def mark_dead(self, record_id: int, code: str | None, message: str | None) -> None:
        await self.finish([(record_id, "dead", code, message)])

    async def attempt_failed(self, record_id: int, error: str, next_attempt_at: float) -> None:
        await self._submit(lambda conn: conn.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?"
            " WHERE id = ? AND state = 'pending'", (error, next_attempt_at, record_id)))

    async def postpone_all(self, next_attempt_at: float) -> None:
        """The platform is down: nothing pending is due before `next_attempt_at`."""
        await self._submit(lambda conn: conn.execute(
            "UPDATE outbox SET next_attempt_at = max(next_attempt_at, ?) WHERE state = 'pending'",
            (next_attempt_at,)))

    async def clamp(self, latest: float) -> int:
        """No pending record waits past `latest` (now plus the longest backoff): one that does
        was postponed by a clock that has since gone back (a box that ran with the wrong date,
        or booted at 1970 on a state from 2026). Due now; how many there were."""
        return await self._submit(lambda conn: conn.execute(
            "UPDATE outbox SET next_attempt_at = 0 WHERE state = 'pending' AND next_attempt_at > ?",
            (latest,)).rowcount)

    async def hasten(self) -> None:
        """Everything pending is due now (the platform is back)."""
        await self._submit(lambda conn: conn.execute(
            "UPDATE outbox SET next_attempt_at = 0 WHERE state = 'pending'"))

    async def retry(self, record_id: int, *, at: float | None = None, keep_time: bool = False) -> bool:
        """A dead (or waiting) record back to pending, due now. False if there is no such record
        or it was already sent. A record made while the clock was not right, which the box
        could not re-time (another boot), needs a decision: `keep_time` sends it with the time
        it carries, `at` (a wall time) re-times it to that before it goes; without either,
        RetryRefused says so. `at` for any other record is refused too."""
        def reset(conn: sqlite3.Connection) -> bool:
            r = conn.execute("SELECT state, clock_ok, created_at FROM outbox WHERE id = ?", (record_id,)).fetchone()
            if r is None or r["state"] not in ("pending", "dead"):
                return False
            if r["clock_ok"] and at is not None:
                raise RetryRefused("record %d was made while the clock was right: its time is the scan's, and "
                                   "--at is only for a record the box could not place in time" % record_id)
            if not r["clock_ok"] and r["state"] == "dead" and at is None and not keep_time:
                raise RetryRefused(
                    "record %d was made while the clock was not right (it says %s), in a boot before the "
                    "clock was set: its true time is unknown. Retry it with --at TIME (the scan's time, from "
                    "the hospital's records; `at` over the API) or --keep-time (send the time it carries)"
                    % (record_id, _iso(r["created_at"])))
            conn.execute(
                "UPDATE outbox SET state = 'pending', next_attempt_at = 0, done_at = NULL,"
                " clock_ok = CASE WHEN ? THEN 1 ELSE clock_ok END,"
                " retime_to = CASE WHEN ? IS NOT NULL THEN ? ELSE retime_to END"
                " WHERE id = ?", (keep_time, at, at, record_id))
            return True
        return await self._submit(reset)

    async def purge_dead(self) -> int:
        return await self._submit(lambda conn: conn.execute("DELETE FROM outbox WHERE state = 'dead'").rowcount,
                                  deletes=True)

    async def get(self, record_id: int) -> Row | None:
        def one(conn: sqlite3.Connection) -> Row | None:
            r = conn.execute("SELECT * FROM outbox WHERE id = ?", (record_id,)).fetchone()
            return self._row(r) if r else None
        return await self._submit(one, write=False)

    async def rows(self, state: str = "pending", limit: int = 100) -> list[Row]:
        return await self._submit(lambda conn: [self._row(r) for r in conn.execute(
            "SELECT * FROM outbox WHERE state = ? ORDER BY id LIMIT ?", (state, limit))], write=False)

    async def stats(self) -> dict[str, Any]:
        now = self.clock()
        snapshot = self._stats
        if (snapshot is None or snapshot[0] != (self._writes, self._connections) or self.error is not None
                or self._thread is None or not 0 <= now - snapshot[1] < STATS_REUSE_S
                or (snapshot[5] is not None and now >= snapshot[5])):
            writes = self._writes

            def count(conn: sqlite3.Connection) -> Any:
                counts: dict[str, int] = {"held": 0, "retimed": 0}
                # one pass: per state, and of those the records held for the clock and the re-timed
                for state, n, held, retimed in conn.execute(
                        "SELECT state, count(*), count(*) FILTER (WHERE clock_ok = 0),"
                        " count(retimed) FROM outbox GROUP BY state"):
                    counts[state] = n
                    counts["held"] += held if state == "pending" else 0
                    counts["retimed"] += retimed
                oldest = conn.execute("SELECT min(created_at) FROM outbox WHERE state = 'pending'").fetchone()[0]
                cached, expiry = conn.execute("SELECT count(*), min(expires_at) FROM identity_cache"
                                              " WHERE expires_at > ?", (now,)).fetchone()
                return (writes, self._connections), now, counts, oldest, cached, expiry
            snapshot = self._stats = await self._submit(count, write=False)
        _, _, counts, oldest, cached, _ = snapshot
        return {"pending": counts.get("pending", 0), "sent": counts.get("sent", 0),
                "dead": counts.get("dead", 0),
                "oldest_pending_age_s": round(now - oldest, 1) if oldest else None,
                "cached_identities": cached,
                # pending records made while the clock was not right, waiting for it to be; records
                # (any state) whose time was re-timed to the scan's
                "held_for_clock": counts.get("held", 0), "retimed": counts.get("retimed", 0)}

    # --- the identity cache ----------------------------------------------------------------

    async def cache_put(self, qr: str, identity: dict[str, Any], ttl_s: float) -> None:
        now = self.clock()

        def put(conn: sqlite3.Connection) -> None:
            key = self._keys().qr_index(qr)  # the key is loaded with the database, in this thread
            conn.execute(
                "INSERT INTO identity_cache (qr_hash, identity, verified_at, expires_at) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (qr_hash) DO UPDATE SET identity = excluded.identity,"
                " verified_at = excluded.verified_at, expires_at = excluded.expires_at",
                (key, self._seal_identity(key, identity), now, now + ttl_s))
        await self._submit(put)

    async def cache_get(self, qr: str) -> tuple[dict[str, Any], float] | None:
        """The identity verified for this code and when, if it has not expired and was not
        verified "after now" (a clock that was ahead then, or is behind now, proves nothing)."""
        now = self.clock()

        def lookup(conn: sqlite3.Connection) -> tuple[dict[str, Any], float] | None:
            key = self._keys().qr_index(qr)
            r = conn.execute("SELECT identity, verified_at FROM identity_cache"
                             " WHERE qr_hash = ? AND expires_at > ? AND verified_at <= ?", (key, now, now)).fetchone()
            if r is None:
                return None
            try:
                return json.loads(self._keys().open(r[0], b"cache:" + key.encode())), r[1]
            except (sealing.SealError, TypeError, ValueError) as exc:
                logger.error("identity cache: an entry cannot be opened (%s); not used", exc)
                return None
        return await self._submit(lookup, write=False)

    async def cache_forget(self, qr: str) -> None:
        await self._submit(lambda conn: conn.execute("DELETE FROM identity_cache WHERE qr_hash = ?",
                                                     (self._keys().qr_index(qr),)), deletes=True)

    async def housekeeping(self, retention_s: float, dead_retention_s: float | None = None) -> tuple[int, int, int]:
        """Delete sent records older than `retention_s`, dead ones older than `dead_retention_s`
        and expired identities: (sent, dead, identities)."""
        now = self.clock()

        def purge(conn: sqlite3.Connection) -> tuple[int, int, int]:
            sent = conn.execute("DELETE FROM outbox WHERE state = 'sent' AND done_at < ?",
                                (now - retention_s,)).rowcount
            dead = 0
            if dead_retention_s is not None:
                dead = conn.execute("DELETE FROM outbox WHERE state = 'dead' AND done_at < ?",
                                    (now - dead_retention_s,)).rowcount
            cached = conn.execute("DELETE FROM identity_cache WHERE expires_at <= ?", (now,)).rowcount
            return sent, dead, cached
        return await self._submit(purge, deletes=True)

    # --- sealing ---------------------------------------------------------------------------

    def _keys(self) -> sealing.Keyring:
        if self.keyring is None:
            raise StoreUnavailable("no store key here (%s): run as root" % sealing.ETC_KEY)
        return self.keyring

    def _seal_values(self, guid: str, values: Any) -> bytes:
        return self._keys().seal(json.dumps(values, ensure_ascii=False).encode(), b"outbox:" + guid.encode())

    def _seal_identity(self, key: str, identity: Any) -> bytes:
        return self._keys().seal(json.dumps(identity, ensure_ascii=False).encode(), b"cache:" + key.encode())

    def _row(self, r: sqlite3.Row) -> Row:
        values: dict[str, Any] | None = None
        unreadable = None
        payload = r["payload"]
        if isinstance(payload, str):  # a version 1 row the migration has not reached (it always does)
            values = json.loads(payload)
        elif payload:
            try:
                values = json.loads(self._keys().open(payload, b"outbox:" + r["guid"].encode()))
            except (sealing.SealError, StoreUnavailable, ValueError) as exc:
                unreadable = "the payload cannot be opened: %s" % exc
        # the CLI without the key reads a database an older daemon made: its columns, not this schema's
        columns = r.keys()

        def get(column: str) -> Any:
            return r[column] if column in columns else None
        clock_ok = bool(r["clock_ok"]) if "clock_ok" in columns else True
        boottime = get("boottime")
        return Row(r["id"], r["guid"], r["operation"], values, r["scan_id"], r["created_at"], r["state"],
                   r["attempts"], r["next_attempt_at"], r["last_error"], r["platform_code"],
                   r["platform_message"], r["done_at"], clock_ok, unreadable,
                   None if clock_ok or boottime is None else Stamp(get("boot_id"), boottime),
                   get("retime_to"), get("retimed"))

    # --- the database thread ---------------------------------------------------------------

    async def _submit(self, fn: Callable[[sqlite3.Connection], Any], write: bool = True,
                      stores: bool = False, deletes: bool = False) -> Any:
        """Run `fn` in the store's thread. `stores`: it adds a record, and its success proves the
        store can take records again (an update may succeed in WAL space a full disk still has).
        `deletes`: it deletes personal data; the WAL is truncated after it commits."""
        if self._thread is None:
            raise StoreUnavailable("the outbox is not open")
        thread = self._live_thread()
        if thread is None or not thread.is_alive():
            # died (the supervisor restarts it) or given up: an answer now, not a wait forever
            raise StoreUnavailable(self.error or "the outbox database thread is not running")
        loop = asyncio.get_running_loop()
        if write:
            self._writes += 1
        job = _Job(fn, write, loop, loop.create_future(), stores, deletes)
        self._queue.put(job)
        return await job.future

    def _live_thread(self) -> threading.Thread | None:
        if self.supervisor is not None and self._thread is not None:
            return self.supervisor.current_thread(THREAD_NAME)
        return self._thread

    def _run(self) -> None:
        try:
            self._serve()
        except BaseException as exc:
            # whatever killed the thread: every caller waiting on it gets an answer, the
            # supervisor (which gets `exc` when this re-raises) logs it and starts a new one
            self.error = "the outbox database thread failed: %s" % (exc or type(exc).__name__)
            self._drop_connection()
            left = []
            while True:
                try:
                    job = self._queue.get_nowait()
                except queue.Empty:
                    break
                if job is not None:
                    job.fail(StoreUnavailable(self.error))
                    left.append(job)
            _reply(left)
            raise

    def _serve(self) -> None:
        while True:
            job = self._queue.get()
            if job is None:
                break
            batch = [job]
            while len(batch) < MAX_BATCH:  # everything that arrived meanwhile: one transaction
                try:
                    more = self._queue.get_nowait()
                except queue.Empty:
                    break
                if more is None:
                    self._queue.put(None)
                    break
                batch.append(more)
            try:
                self._execute(batch)
            except BaseException as exc:
                for job in batch:
                    job.fail(StoreUnavailable("the outbox database thread failed: %s" % (exc or type(exc).__name__)))
                raise
            finally:
                _reply(batch)
        if self._conn is not None:
            self._conn.close()
            self._conn = None

    def _execute(self, batch: list[_Job]) -> None:
        try:
            conn = self._connection()
        except StoreUnavailable as exc:
            for job in batch:
                job.fail(exc)
            return
        # writes first, in one transaction, then reads: a read sees at least every write that was
        # submitted before it
        self._write([j for j in batch if j.write], conn)
        for job in batch:
            if not job.write:
                try:
                    job.done(job.fn(conn))
                except sqlite3.Error as exc:
                    job.fail(self._failed(exc))
                except Exception as exc:
                    # the job's own fault: no key (the CLI as the daemon's user), a parameter SQLite cannot take
                    job.fail(exc)

    def _write(self, writes: list[_Job], conn: sqlite3.Connection) -> None:
        if not writes:
            return
        results: list[tuple[_Job, Any, BaseException | None]] = []
        try:
            conn.execute("BEGIN IMMEDIATE")
            for job in writes:
                conn.execute("SAVEPOINT job")
                try:
                    results.append((job, job.fn(conn), None))
                    conn.execute("RELEASE job")
                except (sqlite3.IntegrityError, StoreUnavailable, ValueError, TypeError, OverflowError) as exc:
                    # this job's own fault (a duplicate, no key, a parameter SQLite cannot take): the others go on
                    conn.execute("ROLLBACK TO job")
                    conn.execute("RELEASE job")
                    results.append((job, None, exc))
            conn.execute("COMMIT")
        except sqlite3.Error as exc:
            error = self._failed(exc)
            if conn.in_transaction:
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error:
                    self._drop_connection()
            for job in writes:
                job.fail(error)
            return
        if any(job.stores and fault is None for job, _, fault in results):
            self.error = None
        if any(job.deletes and fault is None for job, _, fault in results):
            _truncate_wal(conn)
        for job, value, fault in results:
            if fault is None:
                job.done(value)
            else:
                job.fail(fault)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        if self._open_failed_at is not None and time.monotonic() - self._open_failed_at < REOPEN_AFTER_S:
            raise StoreUnavailable(self.error or "the outbox could not be opened")
        try:
            self._conn = self._open()
        except (sqlite3.Error, OSError, sealing.StoreKeyError) as exc:
            self._open_failed_at = time.monotonic()
            self.error = "cannot open %s: %s" % (self.path, exc)
            logger.error("outbox: %s", self.error)
            raise StoreUnavailable(self.error) from exc
        self._open_failed_at = None
        self.error = None
        return self._conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        if self.keyring is None:
            try:
                self.keyring = sealing.load(self.path.parent, create=self.owner)
            except sealing.StoreKeyError:
                if self.owner:
                    raise
                # the CLI as the daemon's user: counts and states, not the sealed values
            if self.keyring is not None and self.keyring.beside_data:
                logger.error("outbox: the store key is %s, beside the data it protects (no %s credential)",
                             self.keyring.source, sealing.KEY_NAME)
        if self.owner:
            self.ledger.allocate()
        try:
            conn = self._connect()
            if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                conn.close()
                raise sqlite3.DatabaseError("quick_check failed")
        except sqlite3.OperationalError:
            raise  # cannot open (permissions, a directory in the way, no space): nothing to move
        except sqlite3.DatabaseError as exc:
            if not self.owner:
                raise
            conn = self._carry_over(exc)
        if self.keyring is not None:
            self._migrate(conn)
        self.newest = conn.execute(
            "SELECT max(coalesce(max(created_at), 0), coalesce(max(done_at), 0)) FROM outbox").fetchone()[0] or None
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        """Bring the database to this version's schema: seal what version 1 kept in clear, drop
        the payloads of sent records, re-seal what a key made beside the data sealed."""
        conn.executescript(SCHEMA)
        columns = {r[1] for r in conn.execute("PRAGMA table_info(outbox)")}
        for column, kind in (("clock_ok", "INTEGER NOT NULL DEFAULT 1"), ("boot_id", "TEXT"), ("boottime", "REAL"),
                             ("retime_to", "REAL"), ("retimed", "REAL")):
            if column not in columns:
                conn.execute("ALTER TABLE outbox ADD COLUMN %s %s" % (column, kind))
        # the uploader looks for held records after every wake: a look at those alone
        conn.execute("CREATE INDEX IF NOT EXISTS outbox_held ON outbox (state, clock_ok, id)")
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        keys = self._keys()
        resealed = 0
        conn.execute("BEGIN IMMEDIATE")
        try:
            for r in conn.execute("SELECT id, guid, state, payload FROM outbox").fetchall():
                payload = r["payload"]
                if r["state"] == "sent":
                    if payload:
                        conn.execute("UPDATE outbox SET payload = X'' WHERE id = ?", (r["id"],))
                    continue
                ad = b"outbox:" + r["guid"].encode()
                if isinstance(payload, str):
                    sealed = keys.seal(payload.encode(), ad)
                elif keys.sealed_under_old(payload):
                    try:
                        sealed = keys.seal(keys.open(payload, ad), ad)
                    except sealing.SealError:
                        continue
                else:
                    continue
                conn.execute("UPDATE outbox SET payload = ? WHERE id = ?", (sealed, r["id"]))
                resealed += 1
            # the cache's index is a keyed hash of the code under the current key, and the code
            # itself is not kept: an entry indexed otherwise (a plain sha256 before version 3, or
            # under a key replaced since) can be neither found nor re-indexed, and its plain
            # index is what a copied card could test a code against. A cache: deleted.
            if version < 3:
                dropped = conn.execute("DELETE FROM identity_cache").rowcount
            else:
                dropped = 0
                for r in conn.execute("SELECT qr_hash, identity FROM identity_cache").fetchall():
                    identity = r["identity"]
                    if isinstance(identity, str) or keys.sealed_under_old(identity):
                        conn.execute("DELETE FROM identity_cache WHERE qr_hash = ?", (r["qr_hash"],))
                        dropped += 1
            conn.execute("PRAGMA user_version = %d" % SCHEMA_VERSION)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        if version < 3 or resealed or dropped:
            # the clear text of version 1, and the cache entries version 3 deleted, lie in free pages
            # and in the WAL: rewrite the file (version 4 only added columns: nothing to rewrite)
            conn.execute("VACUUM")
            _truncate_wal(conn)
        if version < SCHEMA_VERSION or resealed or dropped:
            logger.info("outbox: database at version %d (was %d); %d payloads sealed, %d cached identities "
                        "deleted (indexed without the current key: the next online verification caches "
                        "them again)", SCHEMA_VERSION, version, resealed, dropped)
        if keys.old_path is not None:
            with contextlib.suppress(FileNotFoundError):
                keys.old_path.unlink()
            logger.info("outbox: re-sealed under %s; %s deleted", keys.source, keys.old_path)
            keys.old_path = None

    def _carry_over(self, exc: sqlite3.DatabaseError) -> sqlite3.Connection:
        """The database is corrupt ("file is not a database", "malformed"): what can still be
        read goes into a new one (pending uses above all), and the corrupt file is deleted; it
        holds personal data, and nobody reads a corrupt file in the field."""
        broken = self.path.with_name("%s.corrupt" % self.path.name)
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(self.path) + suffix)
            if source.exists():
                source.rename(Path(str(broken) + suffix))
        conn = self._connect()
        conn.executescript(SCHEMA)
        rescued = {"outbox": 0, "identity_cache": 0}
        pending = 0
        try:
            old = sqlite3.connect("file:%s?mode=ro" % broken, uri=True, isolation_level=None)
            old.row_factory = sqlite3.Row
        except sqlite3.Error:
            old = None
        if old is not None:
            try:
                conn.execute("BEGIN IMMEDIATE")
                for table in rescued:
                    for r in _readable_rows(old, table):
                        columns = list(r)
                        try:
                            conn.execute("INSERT OR IGNORE INTO %s (%s) VALUES (%s)" % (
                                table, ", ".join(columns), ", ".join("?" * len(columns))), tuple(r.values()))
                        except sqlite3.Error:
                            continue
                        rescued[table] += 1
                        if table == "outbox" and r["state"] == "pending":
                            pending += 1
                # the rows are as the old schema version left them: _migrate takes them from there
                with contextlib.suppress(sqlite3.Error):
                    conn.execute("PRAGMA user_version = %d" % int(old.execute("PRAGMA user_version").fetchone()[0]))
                conn.execute("COMMIT")
            finally:
                old.close()
        for suffix in ("", "-wal", "-shm"):
            Path(str(broken) + suffix).unlink(missing_ok=True)
        self.recovered = ("the database was corrupt (%s); %d records (%d pending) and %d cached identities "
                          "could be read and were carried over to a new one, and the corrupt file was deleted"
                          % (exc, rescued["outbox"], pending, rescued["identity_cache"]))
        logger.error("outbox: %s", self.recovered)
        return conn

    def _connect(self) -> sqlite3.Connection:
        # create the file 0600 before SQLite does (it copies the mode to -wal and -shm)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(self.path, 0o600)
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=5)
        self._connections += 1
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA busy_timeout = 5000")  # the CLI may read while the daemon writes
            # what is deleted is overwritten with zeros, not left in free pages
            conn.execute("PRAGMA secure_delete = ON")
            # SQLite's own page cache, 512 KiB instead of 2 MiB: the kernel caches the file's pages
            # anyway, and a box that has verified a few thousand patients would otherwise keep
            # 2 MiB of its identity cache resident twice (a lookup reads a page or two more)
            conn.execute("PRAGMA cache_size = %d" % -PAGE_CACHE_KIB)
        except sqlite3.Error:
            conn.close()
            raise
        return conn

    def _failed(self, exc: sqlite3.Error) -> StoreUnavailable:
        self.error = "%s: %s%s" % (self.path, exc, self._space_hint())
        logger.error("outbox: %s", self.error)
        if isinstance(exc, sqlite3.DatabaseError) and "malformed" in str(exc):
            self._drop_connection()  # reopen: the check at open moves a corrupt file aside
        return StoreUnavailable(self.error)

    def _space_hint(self) -> str:
        """SQLite says "disk I/O error" or "database or disk is full": say what the disk says."""
        hints = []
        with contextlib.suppress(OSError):
            st = os.statvfs(self.path.parent)
            hints.append("%.1f MB free" % (st.f_bavail * st.f_frsize / 1e6))
        soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
        if soft != resource.RLIM_INFINITY:
            hints.append("file size limit %d bytes" % soft)
        return " (%s)" % ", ".join(hints) if hints else ""

    def _drop_connection(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(sqlite3.Error):
                self._conn.close()
            self._conn = None


class _Job(msgspec.Struct):
    fn: Callable[[sqlite3.Connection], Any]
    write: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    stores: bool = False
    deletes: bool = False
    answered: bool = False  # the first answer stands (a failure of the thread after it changes nothing)
    value: Any = None
    error: BaseException | None = None

    def done(self, value: Any) -> None:
        if not self.answered:
            self.answered = True
            self.value = value

    def fail(self, exc: BaseException) -> None:
        if not self.answered:
            self.answered = True
            self.error = exc


def _reply(jobs: list[_Job]) -> None:
    """The answers of the jobs done together, in one call to each caller's loop: one wake-up of
    the loop for a batch, not one per job."""
    loops: dict[asyncio.AbstractEventLoop, list[_Job]] = {}
    for job in jobs:
        loops.setdefault(job.loop, []).append(job)
    for loop, done in loops.items():
        with contextlib.suppress(RuntimeError):  # the loop is gone: the daemon stopped while this ran
            loop.call_soon_threadsafe(_resolve, done)


def _resolve(jobs: list[_Job]) -> None:
    for job in jobs:
        if job.future.done():  # the caller was cancelled
            continue
        if job.error is not None:
            job.future.set_exception(job.error)
        else:
            job.future.set_result(job.value)


def _readable_rows(conn: sqlite3.Connection, table: str) -> Iterator[dict[str, Any]]:
    """The rows of a corrupt database's table that can still be read: forward from the start
    until a damaged page, then backward from the end until one."""
    seen: set[Any] = set()
    for order in ("ASC", "DESC"):
        try:
            for r in conn.execute("SELECT rowid AS _rowid, * FROM %s ORDER BY rowid %s" % (table, order)):
                if r["_rowid"] in seen:
                    break
                seen.add(r["_rowid"])
                yield {k: r[k] for k in r.keys() if k != "_rowid"}
        except sqlite3.Error:
            continue


class Ledger:
    """Uses that could not be recorded (the disk full, the database broken): their count, scan
    ids and times, in a small file allocated while there was room, so they outlive a restart and
    a technician can report them. A full disk refuses new blocks, not writes into blocks a file
    already has. Fixed slots: the first holds the count, the others one use each; past the last
    slot only the count grows. `scanbox outbox unrecorded` shows it, `--clear` empties it."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._count = 0
        self._used = 0  # slots holding a use
        self._loaded = False
        self._mtime: int | None = None
        self._lock = threading.Lock()  # uses are noted from worker threads

    def allocate(self) -> None:
        """Make the file its full size now (before the disk fills), and read what it holds."""
        if not self._loaded:
            self._read()
        size = LEDGER_SLOT * LEDGER_SLOTS
        with contextlib.suppress(OSError):
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if os.fstat(fd).st_size < size:
                    os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)

    @property
    def count(self) -> int:
        """Read again when the file changed (the CLI cleared it)."""
        with contextlib.suppress(OSError):
            if self.path.stat().st_mtime_ns != self._mtime:
                with self._lock:
                    self._read()
        return self._count

    def _read(self) -> None:
        self._loaded = True
        self._count = self._used = 0
        try:
            self._mtime = self.path.stat().st_mtime_ns
            header = self.path.read_bytes()[:LEDGER_SLOT]
        except FileNotFoundError:
            return
        except OSError as exc:
            logger.error("outbox: %s: %s", self.path, exc)
            return
        try:
            data = json.loads(header.rstrip(b"\0 \n") or b"{}")
            self._count = int(data.get("count", 0))
            self._used = min(int(data.get("slots", 0)), LEDGER_SLOTS - 1)
        except (ValueError, TypeError, AttributeError):
            logger.error("outbox: %s: not a ledger of unrecorded uses; starting it again", self.path)

    def add(self, record: UsageRecord, now: float) -> None:
        with self._lock:
            self._add(record, now)

    def _add(self, record: UsageRecord, now: float) -> None:
        if not self._loaded:
            self._read()
        self._count += 1
        slot = None
        if self._used < LEDGER_SLOTS - 1:
            self._used += 1
            slot = self._used
        entry = json.dumps({"scan_id": record.scan_id, "msg_guid": record.guid, "operation": record.operation,
                            "at": round(record.created_at, 3), "noted_at": round(now, 3)})
        header = json.dumps({"count": self._count, "slots": self._used})
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
            try:
                if slot is not None:
                    os.pwrite(fd, _slot(entry), slot * LEDGER_SLOT)
                os.pwrite(fd, _slot(header), 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        except OSError as exc:
            logger.error("outbox: the unrecorded use of scan %s could not be noted in %s either: %s",
                         record.scan_id, self.path, exc)
        with contextlib.suppress(OSError):
            self._mtime = self.path.stat().st_mtime_ns

    def entries(self) -> list[dict[str, Any]]:
        self._read()
        try:
            raw = self.path.read_bytes()
        except OSError:
            return []
        out = []
        for n in range(1, self._used + 1):
            chunk = raw[n * LEDGER_SLOT:(n + 1) * LEDGER_SLOT].rstrip(b"\0 \n")
            with contextlib.suppress(ValueError):
                out.append(json.loads(chunk))
        return out

    def clear(self) -> None:
        """Forget them (once reported): zeros over the whole file, which keeps its blocks."""
        with contextlib.suppress(FileNotFoundError):
            fd = os.open(self.path, os.O_RDWR)
            try:
                os.pwrite(fd, b"\0" * os.fstat(fd).st_size, 0)
                os.fsync(fd)
            finally:
                os.close(fd)
        with self._lock:
            self._count = 0
            self._used = 0


def _slot(text: str) -> bytes:
    data = text.encode()[:LEDGER_SLOT - 1] + b"\n"
    return data + b"\0" * (LEDGER_SLOT - len(data))


def _truncate_wal(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the database (where secure_delete has zeroed what was deleted) and
    truncate it: the WAL keeps old page images, deleted rows included, until it is rewound.
    A reader in another process (the CLI) can hold it back: then the next deletion does it."""
    try:
        busy = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()[0]
    except sqlite3.Error as exc:
        logger.warning("outbox: WAL not truncated: %s", exc)
        return
    if busy:
        logger.info("outbox: WAL not truncated now: a reader holds it")


def _iso(ts: float | None) -> str | None:
    return local_iso(ts) if ts else None


class Uploader:
    """Drains the outbox to the platform: oldest first, at most `max_in_flight` at once.

    Per record it costs the loop little beyond the upload itself: the due records are read a
    page at a time and the outcomes written a batch at a time (`_round`), so the store's thread
    is handed one job per page and one per MARK_DELAY_S, not two per record.

    A transient failure (the platform down, slow or answering nonsense) postpones everything
    with exponential backoff and jitter, capped; a permanent rejection sends that record to
    dead-letter with the platform's code and message; refused credentials hold the queue (an
    alarm) until they work. `platform_back()` ends a backoff early: a verification just worked.
    """

    def __init__(self, store: Store, platform: Platform, *, max_in_flight: int, backoff: Backoff,
                 clock: Callable[[], float] = time.time, clock_ok: Callable[[], bool] = lambda: True,
                 timekeeper: Clock | None = None) -> None:
        self.store = store
        # False: the clock is wrong; nothing goes (the platform would file the uses under it)
        self.clock_ok = clock_ok
        # the daemon's clock: when records made while it was not right can be re-timed
        self.timekeeper = timekeeper
        self.held_for_clock = False
        self.waiting_for_clock = 0  # records of this boot waiting for a right clock to be re-timed
        self.retimed = 0
        self._check_held = True  # held records may be there: look (at the start, after a wake)
        self._clamped = False
        self.platform = platform
        self.max_in_flight = max_in_flight
        self.backoff = backoff
        self.clock = clock
        self.blocked: str | None = None  # why uploads are held (credentials refused), for alarms
        self.sent = 0
        self.dead = 0
        self.failed = 0  # attempts that will be retried (the platform down, credentials refused)
        self.backing_off = False
        self.resume_at = 0.0  # when the current backoff ends (0: not backing off)
        self._wake = asyncio.Event()
        self._hasten = False
        self._rewind = False  # a round reads no further page: something before its last id may be due
        self._marks: list[Mark] = []  # outcomes not yet handed to the store
        self._marking: asyncio.Task[None] | None = None  # writes them, a batch at a time
        self._flush = asyncio.Event()
        # called when the outbox changed (a record added, sent, refused): status, display
        self.on_change: Callable[[], None] | None = None

    name = "uploader"

    async def get_status(self) -> ComponentStatus:
        return ComponentStatus(
            {"sent": self.sent, "dead": self.dead, "backing_off": self.backing_off, "blocked": self.blocked,
             "retimed": self.retimed, "waiting_for_clock": self.waiting_for_clock},
            [Alarm("OUTBOX_BLOCKED", "outbox", self.blocked)] if self.blocked else [])

    def wake(self) -> None:
        """Something is due (a new record, a retry), or the clock became right."""
        self._check_held = True
        self._rewind = True
        self._wake.set()
        self._changed()

    def _changed(self) -> None:
        if self.on_change is not None:
            self.on_change()

    def platform_back(self) -> None:
        """The platform answered elsewhere: stop waiting out the backoff."""
        if self.backing_off:
            self._hasten = True
            self._wake.set()

    async def run(self) -> None:
        while True:
            self._wake.clear()
            if not self.clock_ok():
                # the clock's own alarm says why; its becoming right wakes this (Clock.on_sane)
                self._clamped = False
                self.held_for_clock = True
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(CLOCK_POLL_S):  # a look at the clock costs a stat
                        await self._wake.wait()
                continue
            self.held_for_clock = False
            try:
                if self._check_held or (self.waiting_for_clock and self._clock_right()):
                    self._check_held = False
                    await self._retime_held()
                if not self._clamped:
                    # at the start, and whenever the clock was wrong: a retry time a backoff
                    # cannot give was set by a clock that has since gone back
                    clamped = await self.store.clamp(self.clock() + self.backoff.maximum)
                    self._clamped = True
                    if clamped:
                        logger.warning("outbox: %d records were waiting for a time the clock set wrongly; due now",
                                       clamped)
                if self._hasten:
                    self._hasten = False
                    self.backoff.reset()
                    await self.store.hasten()
                busy = await self._round()
                wait = 0.0 if busy else await self._until_due()
                if self.waiting_for_clock:
                    wait = min(wait, CLOCK_POLL_S)  # each look may find the clock right (Clock.on_right)
            except StoreUnavailable:
                wait = REOPEN_AFTER_S
                self._check_held = True
            if wait:
                try:
                    async with asyncio.timeout(wait):
                        await self._wake.wait()
                except TimeoutError:
                    if wait >= IDLE_CHECK_S:
                        self._check_held = True  # a retry from the CLI (another process) is seen within it

    def _clock_right(self) -> bool:
        return self.timekeeper is None or self.timekeeper.can_place()

    async def _retime_held(self) -> None:
        """Records made while the clock was not right: once it is, each is re-timed to its scan's
        true time (now minus the CLOCK_BOOTTIME since) by the platform's own rules, and goes.
        One from another boot cannot be placed in time: dead-letter, saying so."""
        rows = await self.store.held(MAX_RETIME)
        waiting = 0
        changes: list[tuple[int, UsageRecord, float]] = []
        for row in rows:
            if row.values is None:
                await self._dead(row, row.unreadable or "the payload cannot be opened")
                continue
            how = "to the time a technician gave"
            when = row.retime_to
            if when is None:
                this_boot = self.timekeeper.boot_id() if self.timekeeper is not None else None
                if row.stamp is None or row.stamp.boot_id is None or row.stamp.boot_id != this_boot:
                    await self._dead(row, _unplaced(row))
                    continue
                placed = self.timekeeper.when(row.stamp) if self.timekeeper is not None else None
                if placed is None:
                    waiting += 1  # this boot: its time is known once the clock is right
                    continue
                when, how = placed[0], "by %s and the BOOTTIME since its scan" % placed[1]
            try:
                record = self.platform.retime(row.record, datetime.fromtimestamp(when).astimezone())
            except ScanboxError as exc:
                await self._dead(row, "made while the clock was not right, and cannot be re-timed: %s" % exc.message)
                continue
            changes.append((row.id, msgspec.structs.replace(record, created_at=when), when - row.created_at))
            logger.info("outbox: record %d (%s) re-timed %s: %+.1f s, to %s", row.id, row.operation, how,
                        when - row.created_at, _iso(when))
        if changes:
            self.retimed += await self.store.retime(changes)
            self._changed()
        if len(rows) == MAX_RETIME and (changes or len(rows) > waiting):
            self._check_held = True  # more behind these
        if waiting != self.waiting_for_clock:
            self.waiting_for_clock = waiting
            self._changed()
            if waiting:
                logger.info("outbox: %d records wait for the clock to be right to be re-timed", waiting)

    async def _dead(self, row: Row, reason: str) -> None:
        await self.store.mark_dead(row.id, None, reason)
        self.dead += 1
        self._changed()
        logger.error("outbox: record %d (%s) not sent: %s", row.id, row.operation, reason)

    async def _until_due(self) -> float:
        # never more than a minute: a retry from the CLI (another process) is seen within it
        due = await self.store.next_due_at()
        if due is None:
            return IDLE_CHECK_S
        return max(0.0, min(due - self.clock(), IDLE_CHECK_S))

    async def _round(self) -> bool:
        """Send what is due, oldest first, at most `max_in_flight` at once; True when it all went
        (more may be due).

        `max_in_flight` workers take the due records in id order. They are read a page at a
        time, the next page (past the last id read) by one worker once half of this one is left,
        while the others send it, so the uploads seldom wait for the database (a read may wait
        behind a commit). No upload waits for its
        outcome to be marked: outcomes are written in batches, one transaction each (`_note`),
        and the round ends once all of them are on disk, before anything is read from the start
        again. A wake() (a retry, a record re-timed) ends the round at the end of its page: what
        it made due may lie before the last id read."""
        page = max(PAGE, self.max_in_flight * 8)
        self._rewind = False
        rows: collections.deque[Due] = collections.deque(await self.store.claim(page))
        if not rows:
            return False
        loop = asyncio.get_running_loop()
        cursor = rows[-1].id
        more = len(rows) == page
        reading: asyncio.Future[None] | None = None
        failure: ScanboxError | None = None  # the round's first transient failure stops it
        broken: StoreUnavailable | None = None

        async def take() -> Due | None:
            nonlocal reading, cursor, more, broken
            while failure is None and broken is None:
                if more and reading is None and len(rows) <= page // 2 and not self._rewind:
                    reading = loop.create_future()
                    got: list[Due] = []
                    try:
                        got = await self.store.claim(page, cursor)
                    except StoreUnavailable as exc:
                        broken = exc
                    finally:
                        read, reading = reading, None
                        read.set_result(None)
                    rows.extend(got)
                    more = len(got) == page
                    if got:
                        cursor = got[-1].id
                elif rows:
                    return rows.popleft()
                elif reading is not None:
                    await reading
                else:
                    return None
            return None

        async def worker() -> None:
            nonlocal failure, broken
            while (due := await take()) is not None:
                try:
                    record = self.store.record(due)
                except (sealing.SealError, StoreUnavailable, ValueError) as exc:
                    # never sent: its payload is lost to the key
                    self._refused(due, "the payload cannot be opened: %s" % exc)
                    continue
                try:
                    code, message = await self.platform.upload(record)
                except (PlatformError, ScanboxError) as exc:
                    if not _holds_queue(exc):
                        self._refused(due, exc.message, exc.platform_code, exc.platform_message or exc.message)
                        continue
                    self.failed += 1
                    try:
                        if failure is None:
                            failure = exc
                            await self._postpone(due, exc)
                        else:  # in the air when the first failure came back: same wait
                            await self.store.attempt_failed(due.id, exc.message, self.resume_at)
                    except StoreUnavailable as error:
                        broken = error
                    continue
                self._sent(due, code, message)

        try:
            async with asyncio.TaskGroup() as workers:
                for _ in range(self.max_in_flight):
                    workers.create_task(worker())
        except BaseExceptionGroup as group:
            # a worker's fault (the others stopped): raised as itself, so the alarm names it
            raise group.exceptions[0] from None
        finally:
            # before anything is read from the start again, and before the daemon stops (a
            # record whose outcome is lost goes again)
            await self._written()
        if broken is not None:
            raise broken
        return failure is None

    def _note(self, mark: Mark) -> None:
        """An upload's outcome, written with the others of the next MARK_DELAY_S in one commit."""
        self._marks.append(mark)
        if self._marking is None or self._marking.done():
            if self._marking is not None and not self._marking.cancelled():
                self._marking.result()  # a failure other than the store's is the uploader's: it shows
            self._marking = asyncio.get_running_loop().create_task(self._mark())

    async def _mark(self) -> None:
        while self._marks:
            if not self._flush.is_set():
                # the outcomes that come meanwhile share the commit
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(MARK_DELAY_S):
                        await self._flush.wait()
            marks, self._marks = self._marks, []
            try:
                await self.store.finish(marks)
            except StoreUnavailable as exc:
                # still pending: they go again, with their msgGuids (the platform's idempotency key)
                logger.error("outbox: the outcome of %d uploads could not be written (%s); they will be sent "
                             "again", len(marks), exc)
                continue
            sent = sum(1 for mark in marks if mark[1] == "sent")
            self.sent += sent
            self.dead += len(marks) - sent
            self._changed()

    async def _written(self) -> None:
        """Until every outcome noted is on disk (or could not be written)."""
        if self._marking is not None:
            self._flush.set()
            marking, self._marking = self._marking, None
            try:
                await marking
            finally:
                self._flush.clear()

    async def _postpone(self, due: Due, exc: ScanboxError) -> None:
        """The platform cannot take records now: one backoff step for the whole queue."""
        held = isinstance(exc, PlatformRejected) and exc.outcome is Outcome.AUTH
        delay = self.backoff.maximum if held else self.backoff.next()
        self.blocked = exc.message if held else None
        self.backing_off = True
        until = self.clock() + delay
        self.resume_at = until
        logger.warning("outbox: record %d (%s) not uploaded: %s; retrying in %.0f s",
                       due.id, due.operation, exc.message, delay)
        await self.store.attempt_failed(due.id, exc.message, until)
        await self.store.postpone_all(until)

    def _refused(self, due: Due, why: str, code: str | None = None, message: str | None = None) -> None:
        """Permanent: the platform refused it, or it fails its message table, or its payload
        cannot be opened: it can never go. Dead-letter, with the platform's code and message."""
        self._note((due.id, "dead", code, message or why))
        logger.error("outbox: record %d (%s) refused: %s; moved to dead-letter", due.id, due.operation, why)

    def _sent(self, due: Due, code: str | None, message: str | None) -> None:
        self._note((due.id, "sent", code, message))
        self.blocked = None
        if self.backing_off:
            self.backing_off = False
            self.resume_at = 0.0
            self.backoff.reset()
            logger.info("outbox: the platform takes records again")


def scan_time(text: str, now: float | None = None) -> float:
    """The wall time a technician gives for a record's scan (`retry --at`): ISO 8601,
    "2026-11-30 08:15:00" in the box's zone or with an offset. ValueError saying what is wrong."""
    try:
        at = datetime.fromisoformat(text.strip())
    except ValueError:
        raise ValueError("%r is not a time: give it as YYYY-MM-DD HH:MM:SS (the box's zone) or ISO 8601 with "
                         "an offset" % text) from None
    when = (at if at.tzinfo is not None else at.astimezone()).timestamp()
    if when < RELEASE_FLOOR:
        raise ValueError("%s is before %s: no box ran this release then" % (text, _iso(RELEASE_FLOOR)))
    now = time.time() if now is None else now
    if now >= RELEASE_FLOOR and when > now + 60:
        raise ValueError("%s is in the future (now %s)" % (text, _iso(now)))
    return when


def _unplaced(row: Row) -> str:
    """Why a record held for the clock cannot be re-timed by the box (and what a technician can do)."""
    if row.stamp is None or row.stamp.boot_id is None:
        why = "and the box kept no boot time for it"
    else:
        why = "in an earlier boot: the box restarted before its clock was set"
    return ("recorded while the clock was not right (it says %s), %s, so the scan's true time is unknown; "
            "`scanbox outbox retry %d --at TIME` sends it with the scan's time (from the hospital's records), "
            "`--keep-time` with the time it carries" % (_iso(row.created_at), why, row.id))


def _holds_queue(exc: ScanboxError) -> bool:
    """Transient failures and refused credentials wait; everything else is the record's own fault."""
    if isinstance(exc, PlatformRejected):
        return exc.outcome is Outcome.AUTH
    return isinstance(exc, PlatformError) and exc.transient
