"""A scanner on standard input: one line is one scan. The demo's scanner (type or paste a code,
press Enter), and handy for trying a config by hand."""

import logging
import os
import sys
import threading
from typing import Annotated, Literal

from msgspec import Meta

from agent.model import Scan
from drivers.base import DriverOptions, ScanSink, Source

logger = logging.getLogger(__name__)


class Options(DriverOptions):
    driver: Literal["stdin"]
    charset: str = "utf-8"
    # a line longer than this (bytes) is no scan: dropped whole and reported, never buffered
    # (a 60 MB paste once grew the demo to 206 MB); the serial scanner's limit
    max_length: Annotated[int, Meta(ge=64, le=1024 * 1024)] = 16384


def create(name: str, options: Options, fd: int | None = None) -> "StdinScanner":
    return StdinScanner(name, options.charset, fd, options.max_length)


class StdinScanner(Source):
    def __init__(self, name: str, charset: str, fd: int | None = None, max_length: int = 16384) -> None:
        super().__init__("stdin:" + name)
        self.charset = charset
        self.fd = fd
        self.max_length = max_length
        self._thread: threading.Thread | None = None
        self._stopped = threading.Event()

    def start(self, sink: ScanSink) -> None:
        fd = self.fd if self.fd is not None else sys.stdin.fileno()
        self._thread = threading.Thread(target=self._run, args=(sink, fd), name=self.name, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        # a read() blocked on a terminal cannot be interrupted: the thread is a daemon that ends
        # with the process and drops whatever it reads after this. It reads the raw descriptor,
        # not sys.stdin, whose buffer lock would abort the interpreter at exit.
        self._stopped.set()

    def _run(self, sink: ScanSink, fd: int) -> None:
        sink.connected(self.name, True)
        pending = bytearray()
        discarding = 0  # bytes of an over-long line dropped so far (0: not dropping)
        while True:
            try:
                chunk = os.read(fd, 65536)
            except OSError as exc:
                sink.connected(self.name, False, "cannot read: %s" % exc.strerror)
                return
            if self._stopped.is_set():
                return
            if not chunk:
                break
            start = 0
            while True:
                end = chunk.find(b"\n", start)
                piece = chunk[start:] if end < 0 else chunk[start:end]
                if discarding:
                    discarding += len(piece)
                elif len(pending) + len(piece) > self.max_length:
                    discarding = len(pending) + len(piece)
                    pending.clear()
                else:
                    pending += piece
                if end < 0:
                    break
                if discarding:
                    self._too_long(sink, discarding)
                    discarding = 0
                else:
                    self._line(sink, bytes(pending))
                pending.clear()
                start = end + 1
        if discarding:
            self._too_long(sink, discarding)
        elif pending.strip():
            self._line(sink, bytes(pending))
        sink.connected(self.name, False, "end of input")

    def _line(self, sink: ScanSink, line: bytes) -> None:
        line = line.rstrip(b"\r")
        if line:
            sink.scan(Scan.from_qr_bytes(self.name, line, self.charset))

    def _too_long(self, sink: ScanSink, size: int) -> None:
        sink.problem(self.name, "dropped a line of %d bytes, longer than max_length %d: not a scan"
                     % (size, self.max_length))
