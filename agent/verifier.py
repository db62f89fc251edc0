"""Scan -> verification -> result (DESIGN.md "Data flow", "Offline").

Classification first (length, charset, shape), so noise never reaches the platform; then the
platform, with its deadline. Online, the verification itself is the platform's use record
(RHC_E0003 carries the scan's time and place), acknowledged before the HIS hears of it.

When the platform cannot be asked (connect error, deadline, 5xx, nonsense), a static code
verified online within `cache.ttl` is answered from the identity cache, marked `offline`, and
its use goes to the outbox under the msgGuid of the attempt that failed, committed before the
answer; the uploader delivers it later, and if the failed attempt did reach the platform after
all, the shared msgGuid lets the platform tell. Any other code gets PLATFORM_UNAVAILABLE with
the scan. Every outcome is a Result the HIS receives with the scan.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from datetime import datetime
from typing import Any, Callable, Coroutine

from agent.clock import Clock
from agent.model import (IDENTITY_FIELDS, Identity, IdentitySource, Reason, Result, Scan, ScanboxError,
                         ScanKind, UsageRecord, Verification)
from agent.outbox import Store, StoreUnavailable, Uploader
from agent.platforms.base import Platform, PlatformError, PlatformUnavailable, VerifyRequest
from agent.privacy import mask_qr
from agent.qr import VERIFIABLE, Classifier, QrKind
from agent.supervisor import Supervisor

logger = logging.getLogger(__name__)

# codes whose cache entry this process wrote, and when: the same code verified again with the same
# identity is not written again until its entry is a quarter of `cache.ttl` old (an SD card write
# and an fsync per scan saved; an entry can then expire up to a quarter of the TTL early)
CACHE_NOTES = 4096
# the forms whose identity may be cached: a static code, and a ciphertext (static or dynamic;
# the platform's answer tells, and only a static one is put in the cache)
CACHEABLE = frozenset({QrKind.STATIC, QrKind.CIPHERTEXT})


def _note_key(qr: str) -> int:
    """A code's place in the notes above: a digest, so this process does not hold thousands of
    codes (credentials) longer than their scans. Python's own hash of the string: 64 bits keyed
    per process (SipHash), which no code can be read back from, and already made for the scan
    (the hub's de-duplication hashed the code; a string keeps its hash). Two codes that share
    one cost at most a cache write. In memory only, never stored or logged: the store indexes
    its cache by a keyed hash (Keyring.qr_index)."""
    return hash(qr)


class Verifier:
    def __init__(self, platform: Platform, classifier: Classifier, default_step: str, default_channel: str,
                 *, store: Store | None = None, uploader: Uploader | None = None, cache_ttl_s: float = 0.0,
                 deadline_s: float | None = None, clock: Clock | None = None,
                 supervisor: Supervisor | None = None) -> None:
        self.platform = platform
        self.supervisor = supervisor or Supervisor()
        # a box just booted may not know the date yet: verifications wait for it, bounded
        self.clock = clock
        # a nurse waits for this at the counter: one verification's whole budget
        self.deadline_s = deadline_s
        self.classifier = classifier
        self.default_step = default_step
        self.default_channel = default_channel
        self.store = store
        self.uploader = uploader
        self.cache_ttl_s = cache_ttl_s if store is not None else 0.0
        self._background: set[asyncio.Task[Any]] = set()  # cache updates, for drain()
        self._cache_notes: collections.OrderedDict[int, tuple[Identity, float]] = collections.OrderedDict()
        self.monotonic = time.monotonic  # the clock the cache notes age by (tests move it)

    async def verify(self, scan: Scan, step: str | None = None, channel: str | None = None) -> Result:
        """The scan's Result, always: a fault inside scanbox is answered as INTERNAL (logged,
        and an alarm), so the HIS that waits for this scan hears of it at once."""
        started = time.monotonic()

        def elapsed() -> float:
            return (time.monotonic() - started) * 1000

        try:
            return await self._verify(scan, step, channel, elapsed)
        except Exception as exc:
            logger.exception("scan %s: verification failed inside scanbox", scan.id)
            self.supervisor.task_fault("verifier", exc)
            return Result(scan, None, Verification(False, Reason.INTERNAL, Reason.INTERNAL.description,
                                                   elapsed_ms=elapsed()))

    async def _verify(self, scan: Scan, step: str | None, channel: str | None,
                      elapsed: Callable[[], float]) -> Result:
        if scan.partial is not None:
            # a card read that got only part of the card (no PSAM, a failed authentication); no
            # use record either: the platform's needs the personal data (RHC_E0009: id_card)
            logger.info("scan %s (%s): %s", scan.id, scan.kind.value, scan.partial_message or scan.partial.value)
            return Result(scan, scan.identity, Verification(
                False, scan.partial, scan.partial_message or scan.partial.description, elapsed_ms=elapsed()))
        if scan.identity is not None:
            # a card says who it belongs to; the platform has nothing to add at the counter,
            # but may keep a record of the card's use (RHC_E0009), on disk before the answer
            guid = await self._card_use(scan, step or self.default_step, channel or self.default_channel)
            return Result(scan, scan.identity, Verification(True, message="read from the card",
                                                            elapsed_ms=elapsed(), msg_guid=guid))
        if scan.kind is not ScanKind.QR:
            return Result(scan, None, Verification(False, Reason.NOT_SUPPORTED,
                                                   "no verification for %s scans" % scan.kind.value))
        try:
            kind = self.classifier.classify(scan)
        except ScanboxError as exc:
            logger.info("scan %s from %s: %s", scan.id, scan.source, exc.message)
            return Result(scan, None, Verification.failed(exc, elapsed()))
        if kind not in VERIFIABLE:
            # refused here, never sent: the log says why (the shape, not the code), so a
            # technician whose platform issues this form can widen [platform.qr]
            logger.info("scan %s from %s: not sent to the platform: %s", scan.id, scan.source,
                        self.classifier.explain(scan.payload))
            message = ("a mobile payment code, never sent to the health platform; delivered raw"
                       if kind is QrKind.PAYMENT else "not a health card code this box verifies; delivered raw")
            return Result(scan, None, Verification(False, Reason.QR_UNKNOWN, message, elapsed_ms=elapsed()))
        scanned_at = scan.at
        filed_under: str | None = None  # what the use's time is, when not the box's right clock
        if self.clock is not None and self.clock.problem() is not None:
            if await self.clock.wait_synchronised(self.deadline_s / 2 if self.deadline_s else None):
                # the platform files the use under the scan's time: the right one, now known
                scanned_at = datetime.fromtimestamp(
                    self.clock.now() - (time.monotonic() - scan.monotonic)).astimezone()
            else:
                # the nurse is answered all the same: with the platform's time, from the last
                # HTTP Date it answered with in this boot (a second or two out), else the box's.
                # Should the use wait in the outbox, it is held and re-timed by the right clock
                platform_now = self.clock.platform_now()
                if platform_now is not None:
                    scanned_at = datetime.fromtimestamp(platform_now - (time.monotonic() - scan.monotonic)).astimezone()
                    filed_under = "the platform's time (%s): this box's clock is not right" % (
                        scanned_at.isoformat(timespec="seconds"))
                else:
                    filed_under = "this box's clock, which is not right (no platform answer gave its time yet)"
                logger.warning("scan %s: verifying with a clock that is not right (%s); the use carries %s",
                               scan.id, self.clock.problem(), filed_under)
        request = VerifyRequest(scan.payload, kind, scanned_at, step or self.default_step,
                                channel or self.default_channel)
        try:
            record = self.platform.verify_record(request, scan.id)
            try:
                # one deadline for the whole verification, a wait for the clock included
                budget = None if self.deadline_s is None else self.deadline_s - elapsed() / 1000
                async with asyncio.timeout(budget):
                    answer = await self.platform.verify(record)
            except TimeoutError:
                late = PlatformUnavailable("no answer from the platform within %g s" % self.deadline_s
                                           if self.deadline_s is not None else "the platform call timed out")
                self.platform.record_failure(late)
                raise late from None
        except PlatformError as exc:
            if exc.transient:
                return await self._offline(scan, kind, record, exc, elapsed)
            logger.info("scan %s (%s %s): %s", scan.id, kind.value, mask_qr(scan.payload), exc.message)
            if kind in CACHEABLE:
                self._background_task(self._forget(scan.payload), "forget a refused code")
            return Result(scan, None, Verification.failed(exc, elapsed(), msg_guid=record.guid))
        except ScanboxError as exc:
            return Result(scan, None, Verification.failed(exc, elapsed()))
        verification = Verification(True, platform_code=answer.platform_code,
                                    platform_message=answer.platform_message, elapsed_ms=elapsed(),
                                    msg_guid=record.guid,
                                    message="the use is filed under %s" % filed_under if filed_under else None)
        if logger.isEnabledFor(logging.INFO):  # the code is masked only for a record that is written
            logger.info("scan %s (%s %s) verified: %r in %.1f ms", scan.id, kind.value, mask_qr(scan.payload),
                        answer.identity, verification.elapsed_ms)
        if self.uploader is not None:
            self.uploader.platform_back()
        # a static code, or a ciphertext the platform's answer says is static (the form that
        # RHC_E0002/E0005 issue): its identity may answer it while the platform is down
        static = answer.static if answer.static is not None else kind is QrKind.STATIC
        if static and kind in CACHEABLE and self.cache_ttl_s > 0 and self._cache_stale(scan.payload, answer.identity):
            self._background_task(self._remember(scan.payload, answer.identity), "cache an identity")
        return Result(scan, answer.identity, verification)

    async def _card_use(self, scan: Scan, step: str, channel: str) -> str | None:
        try:
            record = self.platform.card_use_record(scan, step, channel)
        except ScanboxError as exc:
            logger.warning("scan %s (%s): %s", scan.id, scan.kind.value, exc.message)
            return None
        if record is None:
            return None
        if self.store is None:
            logger.warning("scan %s: %s not recorded: no outbox", scan.id, record.operation)
            return None
        try:
            await self.store.enqueue(record, scanned=scan.monotonic)
        except StoreUnavailable as exc:
            await asyncio.to_thread(self.store.note_unrecorded, record)
            logger.error("outbox: a card use could not be recorded (%s); %d unrecorded so far", exc,
                         self.store.unrecorded)
            return None
        if self.uploader is not None:
            self.uploader.wake()
        return record.guid

    async def _offline(self, scan: Scan, kind: QrKind, record: UsageRecord, error: PlatformError,
                       elapsed: Any) -> Result:
        # only codes found static online are ever in the cache
        cached = await self._cached(scan.payload) if kind in CACHEABLE and self.cache_ttl_s > 0 else None
        if cached is None:
            logger.info("scan %s (%s %s): %s; not in the cache", scan.id, kind.value, mask_qr(scan.payload),
                        error.message)
            return Result(scan, None, Verification.failed(error, elapsed(), offline=True))
        identity, verified_at = cached
        guid = await self._record(record, error, scan)
        age = datetime.fromtimestamp(verified_at).astimezone().isoformat(timespec="seconds")
        verification = Verification(True, message="answered from the cache (verified online %s): %s"
                                    % (age, error.message), elapsed_ms=elapsed(), offline=True, msg_guid=guid)
        logger.info("scan %s (%s %s) answered from the cache: %r; its use is %s", scan.id, kind.value,
                    mask_qr(scan.payload), identity, "queued" if guid else "NOT RECORDED (outbox unavailable)")
        return Result(scan, identity, verification)

    async def _record(self, record: UsageRecord, error: PlatformError, scan: Scan) -> str | None:
        """The use goes to the outbox, on disk before the HIS hears of it. A box whose disk is
        full still answers (availability first), and counts the use it could not record."""
        if self.store is None:
            return None
        resume = self.uploader.resume_at if self.uploader is not None else 0.0
        try:
            # made while the clock is not right, it is held (with the scan's boot time) and re-timed
            await self.store.enqueue(record, attempts=1, next_attempt_at=resume, last_error=error.message,
                                     scanned=scan.monotonic)
        except StoreUnavailable as exc:
            await asyncio.to_thread(self.store.note_unrecorded, record)
            logger.error("outbox: a use could not be recorded (%s); %d unrecorded so far", exc, self.store.unrecorded)
            return None
        if self.uploader is not None:
            self.uploader.wake()
        return record.guid

    async def _cached(self, qr: str) -> tuple[Identity, float] | None:
        if self.store is None:
            return None
        try:
            found = await self.store.cache_get(qr)
        except StoreUnavailable:
            return None
        if found is None:
            return None
        data, verified_at = found
        fields = {k: data.get(k) for k in IDENTITY_FIELDS}
        return Identity(source=IdentitySource.CACHE, **fields), verified_at

    def _cache_stale(self, qr: str, identity: Identity) -> bool:
        """Whether the cache entry for this code is missing, different or a quarter-TTL old; notes
        the write about to happen."""
        key = _note_key(qr)
        now = self.monotonic()
        noted = self._cache_notes.get(key)
        if noted is not None and noted[0] == identity and now - noted[1] < self.cache_ttl_s / 4:
            return False
        self._cache_notes[key] = (identity, now)
        self._cache_notes.move_to_end(key)
        if len(self._cache_notes) > CACHE_NOTES:
            self._cache_notes.popitem(last=False)
        return True

    async def _remember(self, qr: str, identity: Identity) -> None:
        if self.store is None:
            return
        try:
            await self.store.cache_put(qr, {k: getattr(identity, k) for k in IDENTITY_FIELDS}, self.cache_ttl_s)
        except StoreUnavailable as exc:
            self._cache_notes.pop(_note_key(qr), None)  # not written after all: the next scan tries again
            logger.warning("identity cache: not updated: %s", exc)

    async def _forget(self, qr: str) -> None:
        """The platform refused this code (cancelled, unknown): never answer it from the cache."""
        self._cache_notes.pop(_note_key(qr), None)
        if self.store is None:
            return
        try:
            await self.store.cache_forget(qr)
        except StoreUnavailable as exc:
            logger.warning("identity cache: could not forget a refused code: %s", exc)

    def _background_task(self, coro: Coroutine[Any, Any, None], name: str) -> None:
        task = self.supervisor.spawn(coro, name)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def drain(self) -> None:
        """Wait for cache updates in flight (at shutdown)."""
        if self._background:
            await asyncio.gather(*self._background, return_exceptions=True)
