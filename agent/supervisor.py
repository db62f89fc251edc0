"""One owner for every long-lived task and thread (STYLE.md items 8 and 13).

The daemon's loops (the display's, the uploader, housekeeping, the network watch), the outbox's
database thread and the drivers' reader threads are each a *child* of one `Supervisor`. A child
that raises (or, being long-lived, returns) is logged with its traceback, raises a
`COMPONENT_FAILED` alarm naming it, and is started again after a backoff. A *critical* child
(one the box cannot answer without) that fails `give_up_after` times in a row, none of its runs
lasting `stable_s`, is given up: `healthy()` turns false, the watchdog stops pinging, and
systemd restarts the daemon (Klipper's `invoke_shutdown`: one visible failure state).

Short tasks (a verification, a cache update, a status publication) go through `spawn`: nobody
awaits them, so their failure is logged and alarmed here; `close()` cancels and awaits them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import traceback
from typing import Any, Awaitable, Callable, Coroutine, Literal

import msgspec

from agent.model import Alarm, ComponentStatus
from drivers.base import Backoff

logger = logging.getLogger(__name__)

State = Literal["running", "restarting", "failed", "stopped"]

# a failure keeps its alarm this long after the child runs again: a fault that heals itself
# within a second must still be seen by whoever looks at `status`
ALARM_HOLD_S = 600.0


class Child(msgspec.Struct, eq=False):
    name: str
    critical: bool
    start: Callable[[], None]  # (re)start it; must not block
    state: State = "running"
    failures: int = 0  # in all
    in_a_row: int = 0  # failures without a run lasting stable_s between them
    last_error: str | None = None
    last_failure_at: float | None = None  # monotonic
    started_at: float = msgspec.field(default_factory=time.monotonic)
    backoff: Backoff = msgspec.field(default_factory=lambda: Backoff(1.0, 60.0))

    def to_json(self) -> dict[str, Any]:
        return {"state": self.state, "critical": self.critical, "failures": self.failures,
                "in_a_row": self.in_a_row, "last_error": self.last_error}


class Supervisor:
    """Owns the daemon's tasks and threads. Used from the event loop (threads report through it)."""

    name = "components"  # its status: each child's state, under `status.components`

    def __init__(self, *, give_up_after: int = 5, stable_s: float = 60.0, backoff_initial: float = 1.0,
                 backoff_max: float = 60.0, clock: Callable[[], float] = time.monotonic) -> None:
        self.give_up_after = give_up_after
        self.stable_s = stable_s
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.clock = clock
        self.children: dict[str, Child] = {}
        # faults in short tasks: (name, error, when); the last few, for the alarm
        self.task_faults: list[tuple[str, str, float]] = []
        self.on_change: Callable[[], None] | None = None  # a child failed, gave up, or ran again
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._short: set[asyncio.Task[Any]] = set()
        self._restarts: set[asyncio.Task[None]] = set()
        self._threads: dict[str, threading.Thread] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closing = False

    # --- long-lived tasks ------------------------------------------------------------------

    def task(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]], *, critical: bool = False) -> None:
        """Run `factory()` as the child `name` until close(); restart it when it fails."""
        loop = self._running_loop()

        def start() -> None:
            self._tasks[name] = loop.create_task(self._guard(name, factory), name=name)

        self._add(name, critical, start)
        start()

    async def _guard(self, name: str, factory: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await factory()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            self.failed(name, exc)
        else:
            if not self._closing:
                self.failed(name, RuntimeError("%s ended by itself" % name))

    # --- threads ---------------------------------------------------------------------------

    def thread(self, name: str, target: Callable[[], None], *, critical: bool = False) -> threading.Thread:
        """Run `target` in a thread, the child `name`. Returning is a clean end (the owner
        asked it to stop); raising is a failure, and a new thread runs `target` again after
        the backoff. Returns the first thread; `current_thread(name)` is the live one."""
        loop = self._running_loop()
        def body() -> None:
            try:
                target()
            except BaseException as exc:  # a thread's death must reach the loop, whatever killed it
                with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                    loop.call_soon_threadsafe(self.failed, name, exc)

        def start() -> None:
            t = threading.Thread(target=body, name=name, daemon=True)
            self._threads[name] = t
            t.start()

        self._add(name, critical, start)
        start()
        return self._threads[name]

    def current_thread(self, name: str) -> threading.Thread | None:
        return self._threads.get(name)

    # --- children restarted by their owner (drivers) ---------------------------------------

    def child(self, name: str, restart: Callable[[], Awaitable[None] | None], *, critical: bool = False) -> None:
        """A child started elsewhere (a source driver) that reports its failures through
        `failed(name, exc)`; `restart` (a function or coroutine function) brings it back."""
        def start() -> None:
            result = restart()
            if asyncio.iscoroutine(result):
                self.spawn(result, "restart %s" % name)

        self._add(name, critical, start)

    # --- failures --------------------------------------------------------------------------

    def failed(self, name: str, exc: BaseException) -> None:
        """`name` has failed with `exc` (on the loop). Logged, alarmed, restarted or given up."""
        child = self.children.get(name)
        if child is None or self._closing or child.state in ("failed", "stopped"):
            if child is None:
                logger.error("%s failed: %r", name, exc, exc_info=exc)
            return
        now = self.clock()
        if now - child.started_at >= self.stable_s:
            child.in_a_row = 0
            child.backoff.reset()
        child.failures += 1
        child.in_a_row += 1
        child.last_error = _describe(exc)
        child.last_failure_at = now
        logger.error("%s failed (%d in a row): %s\n%s", name, child.in_a_row, child.last_error,
                     "".join(traceback.format_exception(exc)).rstrip())
        if child.critical and child.in_a_row >= self.give_up_after:
            child.state = "failed"
            logger.critical("%s cannot recover (%d failures in a row): no longer telling systemd we are alive, "
                            "so that it restarts scanbox", name, child.in_a_row)
        else:
            child.state = "restarting"
            delay = child.backoff.next()
            logger.info("%s: restarting in %.1f s", name, delay)
            restart = self._running_loop().create_task(self._restart(child, delay), name="restart %s" % name)
            self._restarts.add(restart)
            restart.add_done_callback(self._restarts.discard)
        self._changed()

    async def _restart(self, child: Child, delay: float) -> None:
        await asyncio.sleep(delay)
        if self._closing or child.state != "restarting":
            return
        child.state = "running"
        child.started_at = self.clock()
        try:
            child.start()
        except Exception as exc:
            self.failed(child.name, exc)
            return
        self._changed()

    # --- short tasks -----------------------------------------------------------------------

    def spawn(self, coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
        """A short task nobody awaits: its failure is logged and alarmed; close() waits for it."""
        task = self._running_loop().create_task(coro, name=name)
        self._short.add(task)
        task.add_done_callback(self._short_done)
        return task

    def _short_done(self, task: asyncio.Task[Any]) -> None:
        self._short.discard(task)
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        logger.error("%s failed: %s\n%s", task.get_name(), _describe(exc),
                     "".join(traceback.format_exception(exc)).rstrip())
        self.task_fault(task.get_name(), exc)

    def task_fault(self, name: str, exc: BaseException) -> None:
        """A fault in short work (already logged by the caller): alarmed for ALARM_HOLD_S."""
        self.task_faults.append((name, _describe(exc), self.clock()))
        del self.task_faults[:-5]
        self._changed()

    # --- health ----------------------------------------------------------------------------

    def healthy(self) -> bool:
        """False once a critical child has been given up: the watchdog stops pinging."""
        return not any(c.state == "failed" and c.critical for c in self.children.values())

    def alarms(self) -> list[Alarm]:
        now = self.clock()
        out = []
        for child in self.children.values():
            if child.state == "failed":
                out.append(Alarm("COMPONENT_FAILED", child.name, "gave up after %d failures in a row (last: %s); "
                                 "scanbox will be restarted" % (child.in_a_row, child.last_error)))
            elif child.last_failure_at is not None and (child.state == "restarting"
                                                        or now - child.last_failure_at < ALARM_HOLD_S):
                out.append(Alarm("COMPONENT_FAILED", child.name, "failed %d time%s (last: %s); %s" % (
                    child.failures, "" if child.failures == 1 else "s", child.last_error,
                    "restarting" if child.state == "restarting" else "restarted")))
        recent = [f for f in self.task_faults if now - f[2] < ALARM_HOLD_S]
        if recent:
            name, error, _ = recent[-1]
            out.append(Alarm("INTERNAL_ERROR", name, "%d fault%s inside scanbox (last: %s); see the log" % (
                len(recent), "" if len(recent) == 1 else "s", error)))
        return out

    async def get_status(self) -> ComponentStatus:
        return ComponentStatus({name: c.to_json() for name, c in self.children.items()}, self.alarms())

    # --- lifecycle -------------------------------------------------------------------------

    async def close(self) -> None:
        """Cancel every task, long and short, and wait for them (threads are their owners' to stop)."""
        self._closing = True
        for child in self.children.values():
            if child.state != "failed":
                child.state = "stopped"
        tasks = [*self._tasks.values(), *self._short, *self._restarts]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def drain(self) -> None:
        """Wait for the short tasks in flight (cache updates at shutdown), without cancelling."""
        while self._short:
            await asyncio.gather(*list(self._short), return_exceptions=True)

    def _add(self, name: str, critical: bool, start: Callable[[], None]) -> None:
        if name in self.children:
            raise ValueError("a child named %r is already supervised" % name)
        self.children[name] = Child(name, critical, start, started_at=self.clock(),
                                    backoff=Backoff(self.backoff_initial, self.backoff_max))

    def _running_loop(self) -> asyncio.AbstractEventLoop:
        if self._loop is None:
            self._loop = asyncio.get_running_loop()
        return self._loop

    def _changed(self) -> None:
        if self.on_change is not None:
            try:
                self.on_change()
            except Exception:
                logger.exception("supervisor: on_change failed")


def _describe(exc: BaseException) -> str:
    text = str(exc)
    return "%s: %s" % (type(exc).__name__, text) if text else type(exc).__name__
