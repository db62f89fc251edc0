"""The serial scanner driver through a real pty: framing, charsets, noise, unplug and replug.

Each test that reads through `running` runs twice: read by the driver's own thread (a sink
without an event loop), and read on an event loop (`LoopSink`, as the daemon's sink)."""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from typing_extensions import override

from agent import schema
from agent.model import Scan, ScanKind
from drivers import serial_scanner
from drivers.base import ScanSink
from tests.conftest import PtyScanner


class RecordingSink(ScanSink):
    """A ScanSink that records from the driver's threads and lets the test wait with a deadline."""

    def __init__(self) -> None:
        self.items: queue.Queue[tuple[str, Any]] = queue.Queue()
        self.connected_state: list[tuple[bool, str | None]] = []
        self.problems: list[str] = []

    @override
    def scan(self, scan: Scan) -> None:
        self.items.put(("scan", scan))

    @override
    def connected(self, source: str, connected: bool, detail: str | None = None) -> None:
        self.connected_state.append((connected, detail))
        self.items.put(("connected", connected))

    @override
    def problem(self, source: str, text: str) -> None:
        self.problems.append(text)
        self.items.put(("problem", text))

    @override
    def failed(self, source: str, exc: BaseException) -> None:
        self.items.put(("failed", exc))

    def next(self, kind: str, timeout: float = 5.0) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no %s event within %.1f s" % (kind, timeout))
            try:
                item_kind, value = self.items.get(timeout=remaining)
            except queue.Empty:
                continue
            if item_kind == kind:
                return value

    def wait_connected(self, state: bool, timeout: float = 5.0) -> None:
        deadline = time.monotonic() + timeout
        while self.next("connected", max(deadline - time.monotonic(), 0.01)) is not state:
            pass


class LoopSink(RecordingSink):
    """A RecordingSink with an event loop of its own (in a thread, as the daemon's runs in its
    main thread): the driver reads a port with a descriptor on it. Records which thread
    delivered each scan."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="test-loop", daemon=True)
        self.thread.start()
        self.delivered_by: list[int] = []

    @override
    def event_loop(self) -> asyncio.AbstractEventLoop:
        return self.loop

    @override
    def scan(self, scan: Scan) -> None:
        self.delivered_by.append(threading.get_ident())
        super().scan(scan)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()


def make(port: Path | str, **options: Any) -> serial_scanner.SerialScanner:
    opts = schema.convert({"driver": "serial_scanner", "port": str(port), **options}, serial_scanner.Options)
    return serial_scanner.create("counter", opts)


@pytest.fixture(params=["thread", "loop"])
def running(request, pty_scanner: PtyScanner):
    started: list[serial_scanner.SerialScanner] = []
    sinks: list[RecordingSink] = []

    def start(**options: Any) -> RecordingSink:
        sink = LoopSink() if request.param == "loop" else RecordingSink()
        sinks.append(sink)
        scanner = make(pty_scanner.path, **options)
        scanner.start(sink)
        started.append(scanner)
        sink.wait_connected(True)
        return sink

    start.mode = request.param  # type: ignore[attr-defined]
    yield start
    for scanner in started:
        scanner.stop()
    for sink in sinks:
        if isinstance(sink, LoopSink):
            sink.close()


def test_default_terminators_take_cr_lf_and_crlf(running, pty_scanner):
    sink = running()
    pty_scanner.write(b"AAA\rBBB\nCCC\r\n\r\nDDD\r")
    scans = [sink.next("scan") for _ in range(4)]
    assert [s.payload for s in scans] == ["AAA", "BBB", "CCC", "DDD"]
    assert all(s.kind is ScanKind.QR and s.source == "serial:counter" for s in scans)
    assert scans[0].raw == b"AAA"


def test_a_scan_split_across_reads_is_one_scan(running, pty_scanner):
    sink = running()
    pty_scanner.write(b"ABCD")
    pty_scanner.write(b"EFGH\r")
    assert sink.next("scan").payload == "ABCDEFGH"


def test_configured_terminator_and_gbk_charset(running, pty_scanner):
    sink = running(terminator="\x03", charset="gbk")
    pty_scanner.write("张晓明\r\n".encode("gbk") + b"\x03")
    # CR LF are payload when the terminator is ETX
    assert sink.next("scan").payload == "张晓明\r\n"


def test_utf8_chinese_payload(running, pty_scanner):
    sink = running()
    pty_scanner.scan("挂号单 No.42 才让卓玛")
    assert sink.next("scan").payload == "挂号单 No.42 才让卓玛"


def test_binary_noise_becomes_a_scan_with_a_decode_error_not_a_crash(running, pty_scanner):
    sink = running()
    pty_scanner.write(b"\xff\xfe\x00\x81garbage\r")
    noisy = sink.next("scan")
    assert noisy.decode_error is not None and "0xff" in noisy.decode_error
    assert noisy.raw == b"\xff\xfe\x00\x81garbage"
    pty_scanner.scan("STILL-READING")
    assert sink.next("scan").payload == "STILL-READING"


def test_line_without_terminator_over_max_length_is_discarded_and_reported(running, pty_scanner):
    sink = running(max_length=1024)
    pty_scanner.write(b"x" * 5000)
    assert "max_length 1024" in sink.next("problem")
    # the rest of the over-long line up to its terminator is dropped too, then reading resumes
    pty_scanner.write(b"tail-of-noise\rGOOD\r")
    assert sink.next("scan").payload == "GOOD"


def test_ten_kilobyte_scan_is_delivered_whole(running, pty_scanner):
    sink = running()
    text = "Q" * 10240
    pty_scanner.scan(text)
    assert sink.next("scan").payload == text


def test_unplug_and_replug_resumes_scanning(running, pty_scanner):
    sink = running(reconnect_max_s=0.2)
    pty_scanner.scan("BEFORE")
    assert sink.next("scan").payload == "BEFORE"
    pty_scanner.unplug()
    sink.wait_connected(False)
    assert "lost" in sink.connected_state[-1][1]
    pty_scanner.replug()
    sink.wait_connected(True)
    pty_scanner.scan("AFTER")
    assert sink.next("scan").payload == "AFTER"


def test_port_missing_at_start_is_waited_for(tmp_path):
    sink = RecordingSink()
    scanner = make(tmp_path / "ttyScanner", reconnect_max_s=0.2)
    scanner.start(sink)
    try:
        sink.wait_connected(False)
        assert "cannot open" in sink.connected_state[-1][1]
        pty = PtyScanner(tmp_path)  # the scanner is plugged in
        try:
            sink.wait_connected(True)
            pty.scan("LATE")
            assert sink.next("scan").payload == "LATE"
        finally:
            pty.close()
    finally:
        scanner.stop()


def test_retries_while_unplugged_are_reported_once_and_do_not_spin(tmp_path):
    sink = RecordingSink()
    scanner = make(tmp_path / "absent", reconnect_max_s=0.05)
    attempts = 0
    enough = threading.Event()
    real_open = scanner._open

    def counting_open():
        nonlocal attempts
        attempts += 1
        if attempts >= 5:
            enough.set()
        return real_open()

    scanner._open = counting_open
    started = time.monotonic()
    scanner.start(sink)
    assert enough.wait(5), "the driver stopped retrying"
    scanner.stop()
    # five attempts took several backoff delays, not a busy loop
    assert time.monotonic() - started > 4 * 0.05 * 0.5
    # one "disconnected" report for the same cause, not one per retry
    assert [c for c, _ in sink.connected_state].count(False) <= 2


@pytest.mark.parametrize("sink_kind", [RecordingSink, LoopSink])
def test_stop_returns_promptly_while_reading(pty_scanner, sink_kind):
    sink = sink_kind()
    scanner = make(pty_scanner.path)
    scanner.start(sink)
    sink.wait_connected(True)
    started = time.monotonic()
    scanner.stop()
    assert time.monotonic() - started < 2
    assert sink.connected_state[-1] == (False, "stopped")
    if isinstance(sink, LoopSink):
        sink.close()


def test_stop_called_on_the_loop_itself_returns_promptly(pty_scanner):
    """The loop reads the port: a stop() made on that loop cannot wait for a callback the loop
    would run only after stop() returns."""
    sink = LoopSink()
    scanner = make(pty_scanner.path)
    scanner.start(sink)
    try:
        sink.wait_connected(True)

        async def stop_here() -> float:
            started = time.monotonic()
            scanner.stop()
            return time.monotonic() - started

        took = asyncio.run_coroutine_threadsafe(stop_here(), sink.loop).result(10)
        assert took < 2
        sink.wait_connected(False)
        assert sink.connected_state[-1] == (False, "stopped")
    finally:
        sink.close()


def test_on_a_loop_the_port_is_read_by_the_loop_not_a_thread(running, pty_scanner):
    """The daemon's sink has a loop: a scan is delivered from the loop's thread, and the driver
    starts no reader thread (the hop between them was a wake-up per scan)."""
    sink = running()
    pty_scanner.scan("ON-THE-LOOP")
    assert sink.next("scan").payload == "ON-THE-LOOP"
    readers = [t for t in threading.enumerate() if t.name.endswith("-reader")]
    if running.mode == "loop":
        assert isinstance(sink, LoopSink) and sink.delivered_by == [sink.thread.ident]
        assert readers == []
    else:
        assert [t.name for t in readers] == ["serial:counter-reader"]


def test_a_port_without_a_descriptor_is_read_in_a_thread_even_with_a_loop():
    """`loop://` has no file descriptor for a loop to wait on: its own thread reads it."""
    sink = LoopSink()
    scanner = make("loop://")
    scanner.start(sink)
    try:
        sink.wait_connected(True)
        assert [t.name for t in threading.enumerate() if t.name.endswith("-reader")] == ["serial:counter-reader"]
    finally:
        scanner.stop()
        sink.close()


def test_port_is_opened_exclusively(running, pty_scanner):
    running()
    other = RecordingSink()
    second = make(pty_scanner.path, reconnect_max_s=0.1)
    second.start(other)
    try:
        other.wait_connected(False)
        assert "cannot open" in other.connected_state[-1][1]
    finally:
        second.stop()


def test_options_are_checked():
    with pytest.raises(ValueError, match="baud"):
        schema.convert({"driver": "serial_scanner", "port": "/dev/x", "baud": 9601}, serial_scanner.Options)
    with pytest.raises(ValueError, match="charset"):
        schema.convert({"driver": "serial_scanner", "port": "/dev/x", "charset": "klingon"}, serial_scanner.Options)
    with pytest.raises(ValueError):
        schema.convert({"driver": "serial_scanner", "port": "/dev/x", "terminator": ""}, serial_scanner.Options)


@pytest.mark.parametrize("sink_kind", [RecordingSink, LoopSink])
def test_port_as_a_pyserial_url_spy_logs_the_bytes(pty_scanner, tmp_path, sink_kind):
    """`spy://` is how a technician sees what a scanner sends: same driver, a URL for a port."""
    log = tmp_path / "spy.log"
    sink = sink_kind()
    scanner = make("spy://%s?file=%s" % (pty_scanner.path, log))
    scanner.start(sink)
    try:
        sink.wait_connected(True)
        pty_scanner.scan("SPIED-CODE")
        assert sink.next("scan").payload == "SPIED-CODE"
    finally:
        scanner.stop()
        if isinstance(sink, LoopSink):
            sink.close()
    # the hexdump of what the scanner sent, one line per read: the RX bytes, joined
    received = b"".join(bytes.fromhex(line[21:70].replace(" ", "")) for line in log.read_text().splitlines()
                        if line[11:15] == "RX  ")
    assert b"SPIED-CODE\r\n" in received


def test_an_unplug_seen_as_eio_from_any_call_still_reconnects(pty_scanner, monkeypatch):
    """pyserial's reader loop lets OSError from the in_waiting ioctl escape; ours reports the loss.
    (The reader thread's loop: on an event loop, the port is read only when select says so.)"""
    import serial.serialposix

    sink = RecordingSink()
    scanner = make(pty_scanner.path, reconnect_max_s=0.2)
    scanner.start(sink)
    try:
        sink.wait_connected(True)
        real = serial.serialposix.Serial.in_waiting
        failures = {"left": 1}

        def flaky(self):
            if failures["left"]:
                failures["left"] -= 1
                raise OSError(5, "Input/output error")
            return real.fget(self)

        monkeypatch.setattr(serial.serialposix.Serial, "in_waiting", property(flaky))
        pty_scanner.scan("WAKE")  # the reader wakes, asks in_waiting, gets EIO
        sink.wait_connected(False)
        assert "Input/output error" in sink.connected_state[-1][1]
        sink.wait_connected(True)
        pty_scanner.scan("AGAIN")
        assert sink.next("scan").payload == "AGAIN"
    finally:
        scanner.stop()
