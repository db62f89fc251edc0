"""Store-and-forward for usage records, and the offline identity cache (DESIGN.md "Offline",
"Outbox durability", "Personal data").

One SQLite database (WAL, synchronous=FULL) owned by one connection in its own thread: the event
loop never waits on the disk. Writes that arrive together are committed together (one fsync for
many records), so a burst of scans costs little more than one. A record is committed before the
HIS hears about its scan, keeps its msgGuid (the platform's idempotency key) through every retry
and restart, and is deleted `outbox.retention` after the platform has it.

A full disk, an unwritable directory or a corrupt file never stops the box: the store reports
the problem (an alarm), the caller carries on without it, and the next write tries again.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import queue
import resource
import sqlite3
import threading
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

from agent.codes import Outcome
from agent.model import ScanboxError, UsageRecord
from agent.platforms.base import Platform, PlatformError, PlatformRejected
from drivers.base import Backoff

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id INTEGER PRIMARY KEY,
    guid TEXT NOT NULL UNIQUE,          -- msgGuid: the platform's idempotency key, kept for life
    operation TEXT NOT NULL,            -- e.g. RHC_E0003 (a deferred verification), RHC_E0009
    payload TEXT NOT NULL,              -- the message's values, JSON
    scan_id TEXT,
    created_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead')),
    attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0,
    last_error TEXT,
    platform_code TEXT,
    platform_message TEXT,
    done_at REAL
);
CREATE INDEX IF NOT EXISTS outbox_due ON outbox (state, next_attempt_at, id);
CREATE TABLE IF NOT EXISTS identity_cache (
    qr_hash TEXT PRIMARY KEY,           -- sha256 of the code: the code itself is a credential
    identity TEXT NOT NULL,             -- JSON; personal data, expires
    verified_at REAL NOT NULL,
    expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS identity_cache_expiry ON identity_cache (expires_at);
"""
# after a failed open, wait this long before trying again (a full disk, a missing directory)
REOPEN_AFTER_S = 10.0
MAX_BATCH = 256
IDLE_CHECK_S = 60.0


class StoreUnavailable(Exception):
    """The database cannot be used now (disk full, unwritable, corrupt, closed)."""


@dataclass(frozen=True)
class Row:
    """One outbox record as stored."""

    id: int
    guid: str
    operation: str
    values: dict[str, str]
    scan_id: str | None
    created_at: float
    state: str
    attempts: int
    next_attempt_at: float
    last_error: str | None
    platform_code: str | None
    platform_message: str | None
    done_at: float | None

    @property
    def record(self) -> UsageRecord:
        return UsageRecord(self.guid, self.operation, self.values, self.scan_id, self.created_at)

    def to_json(self, with_values: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.id, "msg_guid": self.guid, "operation": self.operation, "scan_id": self.scan_id,
            "created_at": _iso(self.created_at), "state": self.state, "attempts": self.attempts,
            "next_attempt_at": _iso(self.next_attempt_at) if self.state == "pending" else None,
            "last_error": self.last_error, "platform_code": self.platform_code,
            "platform_message": self.platform_message, "done_at": _iso(self.done_at),
        }
        if with_values:
            out["values"] = self.values
        return out


def qr_hash(qr: str) -> str:
    return hashlib.sha256(qr.encode("utf-8")).hexdigest()


class Store:
    """The outbox and the identity cache. Every method is a coroutine that runs its SQL in the
    store's own thread; StoreUnavailable means the database cannot be used right now."""

    def __init__(self, path: Path, *, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.clock = clock
        self.error: str | None = None  # why the store is unusable now (for alarms); None when fine
        self.recovered: str | None = None  # a corrupt database was moved aside at open
        self.unrecorded = 0  # uses that could not be recorded because the store was unusable
        self._queue: queue.Queue[_Job | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._conn: sqlite3.Connection | None = None
        self._open_failed_at: float | None = None

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Start the store's thread and open the database; never raises (see `error`)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._run, name="outbox-db", daemon=True)
            self._thread.start()
        try:
            await self._submit(lambda conn: None, write=False)
        except StoreUnavailable:
            pass  # recorded in self.error; the next call tries again

    async def close(self) -> None:
        if self._thread is not None:
            self._queue.put(None)
            await asyncio.to_thread(self._thread.join, 10)
            self._thread = None

    @property
    def available(self) -> bool:
        return self.error is None

    # --- the outbox --------------------------------------------------------------------------

    async def enqueue(self, record: UsageRecord, *, attempts: int = 0, next_attempt_at: float = 0.0,
                      last_error: str | None = None) -> int:
        """Store a record for upload; returns once it is on disk (fsynced)."""
        def insert(conn: sqlite3.Connection) -> int:
            cur = conn.execute(
                "INSERT INTO outbox (guid, operation, payload, scan_id, created_at, state, attempts,"
                " next_attempt_at, last_error) VALUES (?, ?, ?, ?, ?, 'pending', ?, ?, ?)",
                (record.guid, record.operation, json.dumps(record.values, ensure_ascii=False),
                 record.scan_id, record.created_at, attempts, next_attempt_at, last_error))
            return int(cur.lastrowid or 0)
        return await self._submit(insert, stores=True)

    async def due(self, limit: int) -> list[Row]:
        """Pending records whose time has come, oldest first."""
        now = self.clock()
        return await self._submit(lambda conn: [_row(r) for r in conn.execute(
            "SELECT * FROM outbox WHERE state = 'pending' AND next_attempt_at <= ? ORDER BY id LIMIT ?",
            (now, limit))], write=False)

    async def next_due_at(self) -> float | None:
        return await self._submit(lambda conn: conn.execute(
            "SELECT min(next_attempt_at) FROM outbox WHERE state = 'pending'").fetchone()[0], write=False)

    async def mark_sent(self, record_id: int, code: str | None, message: str | None) -> None:
        await self._finish(record_id, "sent", code, message)

    async def mark_dead(self, record_id: int, code: str | None, message: str | None) -> None:
        await self._finish(record_id, "dead", code, message)

    async def _finish(self, record_id: int, state: str, code: str | None, message: str | None) -> None:
        now = self.clock()
        await self._submit(lambda conn: conn.execute(
            "UPDATE outbox SET state = ?, platform_code = ?, platform_message = ?, done_at = ?,"
            " attempts = attempts + 1 WHERE id = ? AND state = 'pending'",
            (state, code, message, now, record_id)))

    async def attempt_failed(self, record_id: int, error: str, next_attempt_at: float) -> None:
        await self._submit(lambda conn: conn.execute(
            "UPDATE outbox SET attempts = attempts + 1, last_error = ?, next_attempt_at = ?"
            " WHERE id = ? AND state = 'pending'", (error, next_attempt_at, record_id)))

    async def postpone_all(self, next_attempt_at: float) -> None:
        """The platform is down: nothing pending is due before `next_attempt_at`."""
        await self._submit(lambda conn: conn.execute(
            "UPDATE outbox SET next_attempt_at = max(next_attempt_at, ?) WHERE state = 'pending'",
            (next_attempt_at,)))

    async def hasten(self) -> None:
        """Everything pending is due now (the platform is back)."""
        await self._submit(lambda conn: conn.execute(
            "UPDATE outbox SET next_attempt_at = 0 WHERE state = 'pending'"))

    async def retry(self, record_id: int) -> bool:
        """A dead (or waiting) record back to pending, due now. False if there is no such record
        or it was already sent."""
        def reset(conn: sqlite3.Connection) -> bool:
            cur = conn.execute(
                "UPDATE outbox SET state = 'pending', next_attempt_at = 0, done_at = NULL"
                " WHERE id = ? AND state IN ('pending', 'dead')", (record_id,))
            return cur.rowcount == 1
        return await self._submit(reset)

    async def purge_dead(self) -> int:
        return await self._submit(lambda conn: conn.execute("DELETE FROM outbox WHERE state = 'dead'").rowcount)

    async def get(self, record_id: int) -> Row | None:
        def one(conn: sqlite3.Connection) -> Row | None:
            r = conn.execute("SELECT * FROM outbox WHERE id = ?", (record_id,)).fetchone()
            return _row(r) if r else None
        return await self._submit(one, write=False)

    async def list(self, state: str = "pending", limit: int = 100) -> list[Row]:
        return await self._submit(lambda conn: [_row(r) for r in conn.execute(
            "SELECT * FROM outbox WHERE state = ? ORDER BY id LIMIT ?", (state, limit))], write=False)

    async def stats(self) -> dict[str, Any]:
        now = self.clock()

        def count(conn: sqlite3.Connection) -> dict[str, Any]:
            counts = dict(conn.execute("SELECT state, count(*) FROM outbox GROUP BY state").fetchall())
            oldest = conn.execute("SELECT min(created_at) FROM outbox WHERE state = 'pending'").fetchone()[0]
            cached = conn.execute("SELECT count(*) FROM identity_cache WHERE expires_at > ?", (now,)).fetchone()[0]
            return {"pending": counts.get("pending", 0), "sent": counts.get("sent", 0),
                    "dead": counts.get("dead", 0),
                    "oldest_pending_age_s": round(now - oldest, 1) if oldest else None,
                    "cached_identities": cached}
        return await self._submit(count, write=False)

    # --- the identity cache ----------------------------------------------------------------

    async def cache_put(self, qr: str, identity: dict[str, Any], ttl_s: float) -> None:
        now = self.clock()
        await self._submit(lambda conn: conn.execute(
            "INSERT INTO identity_cache (qr_hash, identity, verified_at, expires_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (qr_hash) DO UPDATE SET identity = excluded.identity,"
            " verified_at = excluded.verified_at, expires_at = excluded.expires_at",
            (qr_hash(qr), json.dumps(identity, ensure_ascii=False), now, now + ttl_s)))

    async def cache_get(self, qr: str) -> tuple[dict[str, Any], float] | None:
        """The identity verified for this code and when, if it has not expired."""
        now = self.clock()

        def lookup(conn: sqlite3.Connection) -> tuple[dict[str, Any], float] | None:
            r = conn.execute("SELECT identity, verified_at FROM identity_cache"
                             " WHERE qr_hash = ? AND expires_at > ?", (qr_hash(qr), now)).fetchone()
            return (json.loads(r[0]), r[1]) if r else None
        return await self._submit(lookup, write=False)

    async def cache_forget(self, qr: str) -> None:
        await self._submit(lambda conn: conn.execute("DELETE FROM identity_cache WHERE qr_hash = ?", (qr_hash(qr),)))

    async def housekeeping(self, retention_s: float) -> tuple[int, int]:
        """Delete sent records older than `retention_s` and expired identities: (records, identities)."""
        now = self.clock()

        def purge(conn: sqlite3.Connection) -> tuple[int, int]:
            sent = conn.execute("DELETE FROM outbox WHERE state = 'sent' AND done_at < ?",
                                (now - retention_s,)).rowcount
            cached = conn.execute("DELETE FROM identity_cache WHERE expires_at <= ?", (now,)).rowcount
            return sent, cached
        return await self._submit(purge)

    # --- the database thread ---------------------------------------------------------------

    async def _submit(self, fn: Callable[[sqlite3.Connection], Any], write: bool = True,
                      stores: bool = False) -> Any:
        """Run `fn` in the store's thread. `stores`: it adds a record, and its success proves the
        store can take records again (an update may succeed in WAL space a full disk still has)."""
        if self._thread is None:
            raise StoreUnavailable("the outbox is not open")
        loop = asyncio.get_running_loop()
        job = _Job(fn, write, loop, loop.create_future(), stores)
        self._queue.put(job)
        return await job.future

    def _run(self) -> None:
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
            self._execute(batch)
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
                except sqlite3.IntegrityError as exc:  # this job's own fault: the others go on
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
        if any(job.stores and exc is None for job, _, exc in results):
            self.error = None
        for job, value, exc in results:
            if exc is None:
                job.done(value)
            else:
                job.fail(exc)

    def _connection(self) -> sqlite3.Connection:
        if self._conn is not None:
            return self._conn
        if self._open_failed_at is not None and time.monotonic() - self._open_failed_at < REOPEN_AFTER_S:
            raise StoreUnavailable(self.error or "the outbox could not be opened")
        try:
            self._conn = self._open()
        except (sqlite3.Error, OSError) as exc:
            self._open_failed_at = time.monotonic()
            self.error = "cannot open %s: %s" % (self.path, exc)
            logger.error("outbox: %s", self.error)
            raise StoreUnavailable(self.error) from exc
        self._open_failed_at = None
        self.error = None
        return self._conn

    def _open(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            conn = self._connect()
            if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                conn.close()
                raise sqlite3.DatabaseError("quick_check failed")
        except sqlite3.OperationalError:
            raise  # cannot open (permissions, a directory in the way, no space): nothing to move
        except sqlite3.DatabaseError as exc:
            # corrupt ("file is not a database", "malformed"): keep it for forensics, start empty
            aside = self.path.with_name("%s.corrupt-%d" % (self.path.name, int(time.time())))
            for suffix in ("", "-wal", "-shm"):
                source = Path(str(self.path) + suffix)
                if source.exists():
                    source.rename(Path(str(aside) + suffix))
            self.recovered = "the database was corrupt (%s); moved aside to %s and started empty" % (exc, aside)
            logger.error("outbox: %s", self.recovered)
            conn = self._connect()
        conn.executescript(SCHEMA)
        conn.execute("PRAGMA user_version = %d" % SCHEMA_VERSION)
        return conn

    def _connect(self) -> sqlite3.Connection:
        # create the file 0600 before SQLite does (it copies the mode to -wal and -shm)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        os.close(fd)
        os.chmod(self.path, 0o600)
        conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=5)
        try:
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA busy_timeout = 5000")  # the CLI may read while the daemon writes
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


@dataclass
class _Job:
    fn: Callable[[sqlite3.Connection], Any]
    write: bool
    loop: asyncio.AbstractEventLoop
    future: asyncio.Future[Any]
    stores: bool = False

    def done(self, value: Any) -> None:
        self._reply(value, None)

    def fail(self, exc: BaseException) -> None:
        self._reply(None, exc)

    def _reply(self, value: Any, exc: BaseException | None) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is gone: the daemon stopped while this ran
            self.loop.call_soon_threadsafe(_resolve, self.future, value, exc)


def _resolve(future: asyncio.Future[Any], value: Any, exc: BaseException | None) -> None:
    if future.done():  # the caller was cancelled
        return
    if exc is not None:
        future.set_exception(exc)
    else:
        future.set_result(value)


def _row(r: sqlite3.Row) -> Row:
    return Row(r["id"], r["guid"], r["operation"], json.loads(r["payload"]), r["scan_id"], r["created_at"],
               r["state"], r["attempts"], r["next_attempt_at"], r["last_error"], r["platform_code"],
               r["platform_message"], r["done_at"])


def _iso(ts: float | None) -> str | None:
    return datetime.fromtimestamp(ts).astimezone().isoformat(timespec="seconds") if ts else None


class Uploader:
    """Drains the outbox to the platform: oldest first, at most `max_in_flight` at once.

    A transient failure (the platform down, slow or answering nonsense) postpones everything
    with exponential backoff and jitter, capped; a permanent rejection sends that record to
    dead-letter with the platform's code and message; refused credentials hold the queue (an
    alarm) until they work. `platform_back()` ends a backoff early: a verification just worked.
    """

    def __init__(self, store: Store, platform: Platform, *, max_in_flight: int, backoff: Backoff,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
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
        # called when the outbox changed (a record added, sent, refused): status, display
        self.on_change: Callable[[], None] | None = None

    def wake(self) -> None:
        """Something is due (a new record, a retry)."""
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
            try:
                if self._hasten:
                    self._hasten = False
                    self.backoff.reset()
                    await self.store.hasten()
                busy = await self._round()
                wait = 0.0 if busy else await self._until_due()
            except StoreUnavailable:
                wait = REOPEN_AFTER_S
            if wait:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(wait):
                        await self._wake.wait()

    async def _until_due(self) -> float:
        # never more than a minute: a retry from the CLI (another process) is seen within it
        due = await self.store.next_due_at()
        if due is None:
            return IDLE_CHECK_S
        return max(0.0, min(due - self.clock(), IDLE_CHECK_S))

    async def _round(self) -> bool:
        """Send what is due; True when it all went (more may be waiting)."""
        # a large batch: the pipeline drains at each batch's end (the slowest upload holds the next
        # batch back), so that happens rarely
        rows = await self.store.due(max(256, self.max_in_flight * 32))
        if not rows:
            return False
        slots = asyncio.Semaphore(self.max_in_flight)
        failure: PlatformError | None = None  # the round's first transient failure stops it

        async def send(row: Row) -> None:
            nonlocal failure
            async with slots:  # only the upload holds a slot: the platform sees max_in_flight at most
                if failure is not None:
                    return
                try:
                    code, message = await self.platform.upload(row.record)
                except (PlatformError, ScanboxError) as exc:
                    if _holds_queue(exc):
                        self.failed += 1
                        if failure is None:
                            failure = exc
                            await self._postpone(row, exc)
                        else:  # in the air when the first failure came back: same wait
                            await self.store.attempt_failed(row.id, exc.message, self.resume_at)
                        return
                    await self._refused(row, exc)
                    return
            await self._sent(row, code, message)

        # started in id order; each waits for a slot
        await asyncio.gather(*(send(row) for row in rows))
        return failure is None

    async def _postpone(self, row: Row, exc: ScanboxError) -> None:
        """The platform cannot take records now: one backoff step for the whole queue."""
        held = isinstance(exc, PlatformRejected) and exc.outcome is Outcome.AUTH
        delay = self.backoff.maximum if held else self.backoff.next()
        self.blocked = exc.message if held else None
        self.backing_off = True
        until = self.clock() + delay
        self.resume_at = until
        logger.warning("outbox: record %d (%s) not uploaded: %s; retrying in %.0f s",
                       row.id, row.operation, exc.message, delay)
        await self.store.attempt_failed(row.id, exc.message, until)
        await self.store.postpone_all(until)

    async def _refused(self, row: Row, exc: ScanboxError) -> None:
        """Permanent: the platform refused it, or it fails its message table and can never go."""
        await self.store.mark_dead(row.id, exc.platform_code, exc.platform_message or exc.message)
        self.dead += 1
        self._changed()
        logger.error("outbox: record %d (%s) refused: %s; moved to dead-letter", row.id, row.operation, exc.message)

    async def _sent(self, row: Row, code: str | None, message: str | None) -> None:
        await self.store.mark_sent(row.id, code, message)
        self.sent += 1
        self.blocked = None
        self._changed()
        if self.backing_off:
            self.backing_off = False
            self.resume_at = 0.0
            self.backoff.reset()
            logger.info("outbox: the platform takes records again")


def _holds_queue(exc: ScanboxError) -> bool:
    """Transient failures and refused credentials wait; everything else is the record's own fault."""
    if isinstance(exc, PlatformRejected):
        return exc.outcome is Outcome.AUTH
    return isinstance(exc, PlatformError) and exc.transient
