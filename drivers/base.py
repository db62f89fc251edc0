"""The interface between drivers and the daemon."""

import abc
import asyncio
import glob
import random
import threading
from pathlib import Path
from typing import Callable, Literal, Protocol

import msgspec

from agent.model import Scan
from agent.schema import Schema


class DriverOptions(Schema):
    """Base of every driver's config section: unknown keys are errors, values are read-only
    (agent.schema: like agent.model, plain types drivers may import)."""


class ScanSink(Protocol):
    """Where a source delivers. Every method is safe to call from any thread."""

    def event_loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the sink delivers on, if it has one: a driver whose device has a file
        descriptor may read it there (`loop.add_reader`) rather than in a thread of its own, and
        deliver without a hop between threads. None (the default): drivers read in threads."""
        return None

    def scan(self, scan: Scan) -> None: ...

    def connected(self, source: str, connected: bool, detail: str | None = None) -> None: ...

    def problem(self, source: str, text: str) -> None:
        """Input that could not become a scan (an over-long line, a bad frame): logged, counted."""

    def failed(self, source: str, exc: BaseException) -> None:
        """The source's thread died of `exc` (a bug, not a missing device): the daemon logs it,
        raises an alarm and restarts the source after a backoff."""


class Source(abc.ABC):
    """A device that produces scans. `start` returns at once; the device is read in the
    source's own thread (or, for a descriptor the sink's event loop can wait on, on that loop),
    and a device that vanishes is waited for, never fatal."""

    def __init__(self, name: str) -> None:
        self.name = name

    @abc.abstractmethod
    def start(self, sink: ScanSink) -> None: ...

    @abc.abstractmethod
    def stop(self) -> None:
        """Stop reading and release the device; returns within a few seconds."""


class ThreadedSource(Source):
    """A source read in its own thread until `stop`: the thread runs `_run(sink)`, which returns
    once `_stop` is set. `_interrupt` wakes the thread from whatever it blocks on (a port read,
    a PC/SC wait, a select) so stopping takes milliseconds, not a timeout."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self, sink: ScanSink) -> None:
        self._stop.clear()
        self._prepare()
        self._thread = threading.Thread(target=self._main, args=(sink,), name=self.name, daemon=True)
        self._thread.start()

    def _main(self, sink: ScanSink) -> None:
        try:
            self._run(sink)
        except Exception as exc:  # handed to the daemon's supervisor: logged there, alarmed, restarted
            sink.connected(self.name, False, "driver failed: %s" % (exc or type(exc).__name__))
            sink.failed(self.name, exc)

    def stop(self) -> None:
        self._stop.set()
        self._interrupt()
        if self._thread is not None:
            self._thread.join(5)

    def _prepare(self) -> None:
        """Before the thread starts (the thread's own wake-up pipe, say)."""

    def _interrupt(self) -> None:
        """Wake the thread from a blocking call; called after `_stop` is set."""

    @abc.abstractmethod
    def _run(self, sink: ScanSink) -> None: ...


class Backoff:
    """Delays for reconnect attempts: exponential, capped, with jitter so that boxes that lost
    the same network do not retry in step. (A retry library's decorators do not fit a thread
    that waits on a stop event between attempts; this is the whole of what is needed.)"""

    def __init__(self, initial: float = 0.2, maximum: float = 5.0, factor: float = 2.0) -> None:
        self.initial = initial
        self.maximum = maximum
        self.factor = factor
        self._next = initial

    def next(self) -> float:
        delay = self._next
        self._next = min(self._next * self.factor, self.maximum)
        return delay * random.uniform(0.5, 1.0)

    def reset(self) -> None:
        self._next = self.initial


# --- `scanbox doctor`: each driver module brings its own probe --------------------------------
#
# A module in SOURCE_DRIVERS may define
#     def doctor(sources: Mapping[str, Options], ctx: ProbeContext) -> list[Finding]
# called with the configured sources of that driver (none: it still reports what it finds on
# the box, say an unconfigured reader). `doctor` only collects (STYLE.md item 11).

FindingStatus = Literal["ok", "info", "warn", "fail"]


class Finding(msgspec.Struct):
    area: str
    status: FindingStatus
    subject: str
    text: str
    fix: str | None = None


class Roots(msgspec.Struct):
    """Where /dev and /sys are: the real ones, or a tree in a test's temporary directory."""

    dev: Path = Path("/dev")
    sys: Path = Path("/sys")


class ProbeContext(msgspec.Struct):
    roots: Roots = msgspec.field(default_factory=Roots)
    probe_timeout_s: float = 1.0
    # ask devices nobody configured whether they are a reader (writes to them)
    probe_unconfigured: bool = True
    # every device path the config names (any driver's `port`), as under roots.dev -> its source
    claimed: dict[str, str] = msgspec.field(default_factory=dict)
    # the PC/SC readers pcscd offers (injectable; None: ask pcscd)
    pcsc_list: Callable[[], list[str]] | None = None

    def dev(self, path: str) -> Path:
        """A configured /dev path as seen under `roots`."""
        return self.roots.dev / path[len("/dev/"):] if path.startswith("/dev/") else Path(path)


SERIAL_PORT_PATTERNS = ("ttyUSB*", "ttyACM*", "ttyAMA*", "serial0", "serial/by-id/*")


def serial_ports(dev_root: Path) -> list[str]:
    ports: list[str] = []
    for pattern in SERIAL_PORT_PATTERNS:
        ports += sorted(glob.glob(str(dev_root / pattern)))
    return ports

