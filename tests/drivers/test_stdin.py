"""drivers/stdin_scanner.py through a real pipe: one line is one scan, and a line past
max_length is dropped whole and reported, without being held in memory."""

from __future__ import annotations

import os
import threading
import tracemalloc

import pytest

from agent import schema
from drivers import stdin_scanner
from tests.drivers.test_serial_scanner import RecordingSink


def start(max_length: int = 16384) -> tuple[stdin_scanner.StdinScanner, RecordingSink, int]:
    read_fd, write_fd = os.pipe()
    options = schema.convert({"driver": "stdin", "max_length": max_length}, stdin_scanner.Options)
    scanner = stdin_scanner.create("demo", options, fd=read_fd)
    sink = RecordingSink()
    scanner.start(sink)
    return scanner, sink, write_fd


def test_lines_are_scans_and_the_last_line_needs_no_newline() -> None:
    scanner, sink, w = start()
    os.write(w, b"FIRST\r\n\nSECOND\nLAST")
    os.close(w)
    assert [sink.next("scan").payload for _ in range(3)] == ["FIRST", "SECOND", "LAST"]
    sink.wait_connected(False)
    scanner.stop()


def test_an_over_long_line_is_dropped_whole_reported_and_never_held() -> None:
    scanner, sink, w = start(max_length=4096)
    size = 16 * 1024 * 1024
    block = b"9" * (1024 * 1024)
    tracemalloc.start()
    try:
        writer = threading.Thread(target=lambda: [os.write(w, block) for _ in range(size // len(block))])
        writer.start()
        writer.join()
        os.write(w, b"\nAFTER\n" + b"7" * 5000)
        os.close(w)
        problem = sink.next("problem", timeout=30)
        assert sink.next("scan").payload == "AFTER"  # reading goes on after the long line
        last = sink.next("problem")
        sink.wait_connected(False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "%d bytes" % size in problem and "max_length 4096" in problem
    assert "5000 bytes" in last           # the unterminated last line too
    assert peak < 2 * 1024 * 1024, "the long line was buffered: peak %d bytes" % peak
    assert sink.items.empty()             # neither long line became a scan
    scanner.stop()


def test_max_length_is_checked() -> None:
    with pytest.raises(schema.Invalid):
        schema.convert({"driver": "stdin", "max_length": 10}, stdin_scanner.Options)
