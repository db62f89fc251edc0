"""The real PC/SC stack for card tests: pcscd with vsmartcard's virtual reader (vpcd), and our
card emulators behind it (agent/simulator/cards.py).

pcscd is started here when it is not running (as root: it owns /run/pcscd), and stopped at the
end. When it cannot be started, every card test FAILS with the reason: a suite that passes
without having talked to pcscd would prove nothing.
"""

from __future__ import annotations

import threading

import pytest
from typing_extensions import override

from agent import schema
from agent.simulator.cards import VPCD_PORT
from agent.simulator.pcscd import CARD_READER, PSAM_READER, Pcscd, PcscdError, PcscSlot
from drivers.base import ScanSink


@pytest.fixture(scope="session")
def pcscd():
    daemon = Pcscd()
    try:
        daemon.ensure()
    except PcscdError as exc:
        pytest.fail(str(exc))
    yield daemon
    daemon.stop()


@pytest.fixture
def card_slot(pcscd):
    slot = PcscSlot(VPCD_PORT, CARD_READER)
    yield slot
    slot.remove()


@pytest.fixture
def psam_slot(pcscd):
    slot = PcscSlot(VPCD_PORT + 1, PSAM_READER)
    yield slot
    slot.remove()


class Collector(ScanSink):
    """A ScanSink for a driver under test: records what its thread delivers; `wait` blocks on a
    condition (with a deadline) until something matching has arrived."""

    def __init__(self) -> None:
        self.scans: list = []
        self.problems: list[str] = []
        self.states: list[tuple[bool, str | None]] = []
        self._changed = threading.Condition()

    @override
    def scan(self, scan) -> None:
        with self._changed:
            self.scans.append(scan)
            self._changed.notify_all()

    @override
    def connected(self, source: str, connected: bool, detail: str | None = None) -> None:
        with self._changed:
            self.states.append((connected, detail))
            self._changed.notify_all()

    @override
    def problem(self, source: str, text: str) -> None:
        with self._changed:
            self.problems.append(text)
            self._changed.notify_all()

    @override
    def failed(self, source: str, exc: BaseException) -> None:
        with self._changed:
            self.problems.append("driver failed: %r" % exc)
            self._changed.notify_all()

    def wait(self, predicate, timeout: float = 5.0, what: str = "an event"):
        with self._changed:
            if not self._changed.wait_for(predicate, timeout):
                raise AssertionError("no %s within %.0f s: scans %r, problems %r, states %r"
                                     % (what, timeout, self.scans, self.problems, self.states))

    def next_scan(self, start: int = 0, timeout: float = 5.0):
        self.wait(lambda: len(self.scans) > start, timeout, "scan")
        return self.scans[start]

    def next_problem(self, start: int = 0, timeout: float = 5.0) -> str:
        self.wait(lambda: len(self.problems) > start, timeout, "problem")
        return self.problems[start]


@pytest.fixture
def reader_driver(pcscd):
    """`start(**options)` runs a pcsc driver on the virtual reader; stopped at the end."""
    from drivers import pcsc

    running = []

    def start(**options):
        options = {"driver": "pcsc", "reader": "^" + CARD_READER + "$", "poll_s": 0.2, "reconnect_max_s": 0.5,
                   **options}
        driver = pcsc.create("desk", schema.convert(options, pcsc.Options))
        sink = Collector()
        driver.start(sink)
        running.append(driver)
        return driver, sink

    yield start
    for driver in running:
        driver.stop()
