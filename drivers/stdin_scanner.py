"""A scanner on standard input: one line is one scan. The demo's scanner (type or paste a code,
press Enter), and handy for trying a config by hand."""

from __future__ import annotations

import logging
import sys
import threading
from typing import BinaryIO, Literal

from agent.model import Scan
from drivers.base import DriverOptions, ScanSink, Source

logger = logging.getLogger(__name__)


class Options(DriverOptions):
    driver: Literal["stdin"]
    charset: str = "utf-8"


def create(name: str, options: Options, stream: BinaryIO | None = None) -> "StdinScanner":
    return StdinScanner(name, options.charset, stream)


class StdinScanner(Source):
    def __init__(self, name: str, charset: str, stream: BinaryIO | None = None) -> None:
        super().__init__("stdin:" + name)
        self.charset = charset
        self.stream = stream
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self, sink: ScanSink) -> None:
        stream = self.stream or sys.stdin.buffer
        self._thread = threading.Thread(target=self._run, args=(sink, stream), name=self.name,
                                        daemon=True)
        self._thread.start()

    def stop(self) -> None:
        # a thread blocked in read() on a terminal cannot be interrupted: it is a daemon thread
        # that ends with the process, and drops whatever it reads after this
        self._stopped.set()

    def _run(self, sink: ScanSink, stream: BinaryIO) -> None:
        sink.connected(self.name, True)
        for line in stream:
            line = line.rstrip(b"\r\n")
            if self._stopped.is_set():
                return
            if line:
                sink.scan(Scan.from_qr_bytes(self.name, line, self.charset))
        sink.connected(self.name, False, "end of input")
