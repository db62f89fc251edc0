"""Where scans meet the callers that wait for them.

Drivers deliver from their threads through `HubSink` (thread-safe); the hub de-duplicates (the
same code from the same source inside `scans.dedupe_s` is one scan), hands each scan to the
oldest waiting `read_card` whose kinds match, verifies it with that caller's step, and
publishes events (scan, verification, status) to subscribers: API connections, the display, the
demo's printer. A scan nobody waits for is still verified (the patient sees the outcome) and
kept for `scans.hold_s`, so a nurse who scans first and clicks "read card" second is served.
"""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import time
import weakref
from typing import Any, Callable, Coroutine, Iterable

import msgspec

from agent import logs
from agent.events import Event, Listener, ScanRead, SourceChanged, Verified
from agent.model import Alarm, ComponentStatus, Reason, Result, Scan, ScanboxError, ScanKind
from agent.privacy import mask_qr
from agent.supervisor import Supervisor
from agent.verifier import Verifier

logger = logging.getLogger(__name__)


class SourceState(msgspec.Struct):
    name: str
    connected: bool = False
    detail: str | None = None
    last_scan_at: str | None = None
    scans: int = 0
    problems: int = 0

    def to_json(self) -> dict[str, Any]:
        kind = self.name.split(":", 1)[0]
        return {"name": self.name, "kind": kind, "connected": self.connected, "detail": self.detail,
                "last_scan_at": self.last_scan_at, "scans": self.scans, "problems": self.problems}

    def alarms(self) -> list[Alarm]:
        return [] if self.connected else [Alarm("SOURCE_DISCONNECTED", self.name, self.detail or "not connected")]


class Sources:
    """Every source's state as its driver reports it through the sink: one component."""

    name = "sources"

    def __init__(self, states: dict[str, SourceState]) -> None:
        self.states = states

    async def get_status(self) -> ComponentStatus:
        return ComponentStatus([s.to_json() for s in self.states.values()],
                               [a for s in self.states.values() for a in s.alarms()])


class Waiter(msgspec.Struct, eq=False):
    kinds: frozenset[ScanKind]
    step: str | None
    verify: bool
    # the scan's Result, None when the wait ran out first
    future: asyncio.Future[Result | None] = msgspec.field(
        default_factory=lambda: asyncio.get_running_loop().create_future())


class Held(msgspec.Struct):
    scan: Scan
    result: asyncio.Future[Result]  # the verification, possibly still running
    expires: float


class Hub:
    def __init__(self, verifier: Verifier, *, dedupe_s: float, hold_s: float,
                 supervisor: Supervisor | None = None) -> None:
        self.verifier = verifier
        self.supervisor = supervisor or verifier.supervisor
        self.dedupe_s = dedupe_s
        self.hold_s = hold_s
        self.sources: dict[str, SourceState] = {}
        self.component = Sources(self.sources)
        self.scans_total = 0
        self._waiters: collections.deque[Waiter] = collections.deque()
        self._held: Held | None = None
        self._recent: dict[tuple[str, str], float] = {}
        self._listeners: list[Listener] = []
        # the scans being verified, for close(): weakly (the supervisor holds each until it is
        # done), so that a scan costs no done-callback of the hub's own, a loop turn's work
        self._tasks: weakref.WeakSet[asyncio.Task[Any]] = weakref.WeakSet()

    # --- events --------------------------------------------------------------------------

    def listen(self, listener: Listener) -> Callable[[], None]:
        self._listeners.append(listener)
        return lambda: self._listeners.remove(listener) if listener in self._listeners else None

    def publish(self, event: Event) -> None:
        for listener in list(self._listeners):
            try:
                listener(event)
            except Exception:  # one broken subscriber must not stop the others
                logger.exception("event listener failed")

    # --- input from drivers (on the loop; HubSink hops threads) ---------------------------

    def source_connected(self, source: str, connected: bool, detail: str | None) -> None:
        state = self.sources.setdefault(source, SourceState(source))
        changed = state.connected != connected or state.detail != detail
        state.connected, state.detail = connected, detail
        if changed:
            self.publish(SourceChanged(state.name, state.connected, state.detail, state.to_json()))

    def source_problem(self, source: str, text: str) -> None:
        self.sources.setdefault(source, SourceState(source)).problems += 1
        logger.warning("%s: %s", source, text)

    def accept(self, scan: Scan) -> None:
        """A scan from a driver: de-duplicate, then route it."""
        key = (scan.source, scan.payload if isinstance(scan.payload, str)
               else json.dumps(scan.payload, sort_keys=True, default=str))
        now = scan.monotonic
        # a card is read once per insertion: putting it on the reader again is deliberate
        last = self._recent.get(key) if scan.kind is ScanKind.QR else None
        self._recent[key] = now
        if len(self._recent) > 256:
            self._recent = {k: t for k, t in self._recent.items() if now - t < self.dedupe_s}
        if last is not None and now - last < self.dedupe_s:
            logger.debug("%s: same code again within %.1f s, ignored", scan.source, self.dedupe_s)
            return
        state = self.sources.get(scan.source)
        if state is None:  # a source that reads before it says it is connected
            state = self.sources[scan.source] = SourceState(scan.source, connected=True)
        state.scans += 1
        state.last_scan_at = scan.at.isoformat(timespec="seconds")
        self.scans_total += 1
        # every record about this scan, in the tasks started here too, carries its fields
        bound = logs.bind_scan(scan.id, scan.source, scan.kind.value)
        try:
            if logger.isEnabledFor(logging.INFO):  # the code is masked only for a record that is written
                logger.info("scan %s from %s: %s %s", scan.id, scan.source, scan.kind.value,
                            mask_qr(scan.payload) if isinstance(scan.payload, str) else "card")
            self.publish(ScanRead(scan))
            waiter = self._take_waiter(scan.kind)
            if waiter is not None:
                self._spawn(self._serve(scan, waiter), "serve scan %s" % scan.id)
                return
            task = self._spawn(self._verify(scan, None, True), "verify scan %s" % scan.id)
            if self.hold_s > 0:
                self._held = Held(scan, task, time.monotonic() + self.hold_s)
        finally:
            logs.unbind_scan(bound)

    # --- callers -------------------------------------------------------------------------

    async def read_card(self, kinds: Iterable[ScanKind], timeout_s: float, step: str | None,
                        verify: bool) -> Result:
        """The next scan of one of `kinds`, verified unless `verify` is false. Raises
        ScanboxError(TIMEOUT); cancelling (the caller went away) stops the wait."""
        kinds = frozenset(kinds)
        held = self._claim_held(kinds)
        if held is not None:
            return await asyncio.shield(held.result)
        waiter = Waiter(kinds, step, verify)
        self._waiters.append(waiter)
        # the wait ends by the waiter's own future (not asyncio.timeout: a cancellation of the
        # caller's task and its undoing, per read_card)
        expiry = asyncio.get_running_loop().call_later(timeout_s, _expire, waiter)
        try:
            result = await waiter.future
        finally:
            expiry.cancel()
            if waiter in self._waiters:
                self._waiters.remove(waiter)
        if result is None:
            raise ScanboxError(Reason.TIMEOUT, "no scan within %g s" % timeout_s)
        return result

    async def verify_external(self, scan: Scan, step: str | None, channel: str | None) -> Result:
        """A code a caller scanned itself (verify_qr): verified and published, never routed to
        waiting read_card callers (it is the caller's, not the counter's)."""
        bound = logs.bind_scan(scan.id, scan.source, scan.kind.value)
        try:
            self.publish(ScanRead(scan))
            result = await self.verifier.verify(scan, step, channel)
            _log_answer(result)
            self.publish(Verified(result))
            return result
        finally:
            logs.unbind_scan(bound)

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    # --- internals -----------------------------------------------------------------------

    def _take_waiter(self, kind: ScanKind) -> Waiter | None:
        for waiter in self._waiters:
            if kind in waiter.kinds and not waiter.future.done():
                self._waiters.remove(waiter)
                return waiter
        return None

    def _claim_held(self, kinds: frozenset[ScanKind]) -> Held | None:
        held = self._held
        if held is None:
            return None
        if time.monotonic() > held.expires:
            self._held = None
            return None
        if held.scan.kind not in kinds:
            return None
        self._held = None
        return held

    async def _serve(self, scan: Scan, waiter: Waiter) -> None:
        result = await self._verify(scan, waiter.step, waiter.verify)
        if not waiter.future.done():
            waiter.future.set_result(result)
            return
        # the caller left while we verified: keep the result for the next one
        if self.hold_s > 0:
            done: asyncio.Future[Result] = asyncio.get_running_loop().create_future()
            done.set_result(result)
            self._held = Held(scan, done, time.monotonic() + self.hold_s)

    async def _verify(self, scan: Scan, step: str | None, verify: bool) -> Result:
        if not verify:
            # a card states its identity itself; only verification (and its use record) is skipped
            logger.info("scan %s answered unverified (the caller asked so)", scan.id,
                        extra={"scan_reason": "UNVERIFIED"})
            return Result(scan, scan.identity, None)
        result = await self.verifier.verify(scan, step)
        _log_answer(result)
        self.publish(Verified(result))
        return result

    def _spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        task = self.supervisor.spawn(coro, name)  # a failure is logged and alarmed there
        self._tasks.add(task)
        return task

    async def close(self) -> None:
        for waiter in list(self._waiters):
            if not waiter.future.done():
                waiter.future.set_exception(ScanboxError(Reason.BUSY, "scanbox is stopping"))
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _expire(waiter: Waiter) -> None:
    if not waiter.future.done():
        waiter.future.set_result(None)  # no scan in time


def _log_answer(result: Result) -> None:
    """The one record of a scan's outcome a collector counts and filters on (SCAN_REASON)."""
    verification = result.verification
    if verification is None or not logger.isEnabledFor(logging.INFO):
        return
    reason = "OK" if verification.ok else (verification.reason.value if verification.reason else "FAILED")
    logger.info("scan %s answered %s%s in %.0f ms", result.scan.id, reason,
                " (offline)" if verification.offline else "", verification.elapsed_ms,
                extra={"scan_reason": reason})


class HubSink:
    """The ScanSink drivers call from their threads: hops onto the hub's event loop. A driver
    that reads its device on the loop itself (`event_loop`) is served at once, without a hop."""

    def __init__(self, hub: Hub, loop: asyncio.AbstractEventLoop) -> None:
        self.hub = hub
        self.loop = loop

    def event_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    def scan(self, scan: Scan) -> None:
        self._call(self.hub.accept, scan)

    def connected(self, source: str, connected: bool, detail: str | None = None) -> None:
        self._call(self.hub.source_connected, source, connected, detail)

    def problem(self, source: str, text: str) -> None:
        self._call(self.hub.source_problem, source, text)

    def failed(self, source: str, exc: BaseException) -> None:
        self._call(self.hub.supervisor.failed, source, exc)

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        if _on_loop(self.loop):
            fn(*args)  # a driver reading on the loop: no wake-up of the loop by itself
            return
        try:
            self.loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has closed: the daemon is stopping
            logger.debug("event after shutdown dropped")


def _on_loop(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:  # a driver's own thread
        return False
