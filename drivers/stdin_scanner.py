"""A scanner on standard input: one line is one scan. The demo's scanner (type or paste a code,
press Enter), and handy for trying a config by hand."""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Literal

from agent.model import Scan
from drivers.base import DriverOptions, ScanSink, Source

logger = logging.getLogger(__name__)


class Options(DriverOptions):
    driver: Literal["stdin"]
    charset: str = "utf-8"


def create(name: str, options: Options, fd: int | None = None) -> "StdinScanner":
    return StdinScanner(name, options.charset, fd)


class StdinScanner(Source):
    def __init__(self, name: str, charset: str, fd: int | None = None) -> None:
        super().__init__("stdin:" + name)
        self.charset = charset
        self.fd = fd
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
        pending = b""
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
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for line in lines:
                line = line.rstrip(b"\r")
                if line:
                    sink.scan(Scan.from_qr_bytes(self.name, line, self.charset))
        if pending.strip():
            sink.scan(Scan.from_qr_bytes(self.name, pending.rstrip(b"\r"), self.charset))
        sink.connected(self.name, False, "end of input")
