"""QR scanners in serial (VCOM / USB CDC) mode.

The port is a device path or any pyserial URL: `/dev/ttyACM0` on the box, a pty in tests,
`spy:///dev/ttyACM0` to see the bytes when debugging a scanner in the field. `ScanFramer` turns
bytes into scans at the configured terminator. A scanner that is unplugged is waited for and
reopened with backoff, by the driver's own thread.

Where the bytes are read: a port with a file descriptor (a tty, a pty, `spy://` on one) is read
on the daemon's event loop when the sink has one (`loop.add_reader`, pyserial's `read` with a
zero timeout); the scan is then delivered without a hop between threads. That hop (the reader
thread waking, then waking the loop) was a twentieth of the daemon's CPU per scan and two
scheduler wake-ups on the way to the HIS's answer. A port without one (`loop://`) or a sink
without a loop is read in a thread (pyserial's ReaderThread), as before.
"""

import asyncio
import codecs
import contextlib
import fcntl
import logging
import os
import threading
import time
from typing import Annotated, Callable, Literal, Mapping

import msgspec
import serial
import serial.threaded
from msgspec import Meta

from agent.model import Scan
from agent.schema import Check
from drivers.base import Backoff, DriverOptions, Finding, ProbeContext, ScanSink, ThreadedSource, serial_ports

logger = logging.getLogger(__name__)

BAUD_RATES = (1200, 2400, 4800, 9600, 19200, 38400, 57600, 115200, 230400, 460800, 921600)
# a connection that lasted this long was a real one: start the backoff from the beginning
STABLE_AFTER_S = 5.0
# what one read on the loop takes at most (a scan longer than this arrives in several)
READ_SIZE = 4096


def _baud(value: int) -> int:
    if value not in BAUD_RATES:
        raise ValueError("must be one of %s" % ", ".join(map(str, BAUD_RATES)))
    return value


def _terminator(value: str | list[str]) -> str | list[str]:
    items = [value] if isinstance(value, str) else value
    if not items or any(not t for t in items):
        raise ValueError("must be a non-empty string or list of non-empty strings")
    return value


def _charset(value: str) -> str:
    try:
        codecs.lookup(value)
    except LookupError:
        raise ValueError("unknown charset %r" % value) from None
    return value


class Options(DriverOptions):
    driver: Literal["serial_scanner"]
    port: Annotated[str, Meta(min_length=1)]
    baud: Annotated[int, Check(_baud)] = 9600
    parity: Literal["N", "E", "O"] = "N"
    # bytes that end a scan; any one of them ends it, and empty scans are ignored, so the
    # default takes CR, LF and CRLF scanners alike
    terminator: Annotated[str | list[str], Check(_terminator)] = msgspec.field(default_factory=lambda: ["\r", "\n"])
    charset: Annotated[str, Check(_charset)] = "utf-8"
    max_length: Annotated[int, Meta(ge=64, le=1024 * 1024)] = 16384
    reconnect_max_s: Annotated[float, Meta(gt=0, le=300)] = 5.0


def create(name: str, options: Options) -> "SerialScanner":
    terminators = [options.terminator] if isinstance(options.terminator, str) else options.terminator
    return SerialScanner(
        name,
        port=options.port,
        baud=options.baud,
        parity=options.parity,
        terminators=[t.encode("latin-1") for t in terminators],
        charset=options.charset,
        max_length=options.max_length,
        reconnect_max_s=options.reconnect_max_s,
    )


class ScanFramer(serial.threaded.Protocol):
    """Bytes -> scans at any of the terminators. Never raises: ReaderThread ends on an exception
    from its protocol, and serial noise must not end reading."""

    def __init__(self, source: str, sink: ScanSink, terminators: list[bytes], charset: str,
                 max_length: int) -> None:
        self.source = source
        self.sink = sink
        self.terminators = terminators
        self.charset = charset
        self.max_length = max_length
        self.buffer = bytearray()
        self.discarding = False
        self.lost = threading.Event()
        self.lost_error: BaseException | None = None

    def data_received(self, data: bytes) -> None:
        try:
            self.buffer.extend(data)
            while True:
                cut = self._find_terminator()
                if cut is None:
                    break
                end, length = cut
                frame = bytes(self.buffer[:end])
                del self.buffer[:end + length]
                if self.discarding:
                    self.discarding = False
                    continue
                if frame:
                    self.sink.scan(Scan.from_qr_bytes(self.source, frame, self.charset))
            if len(self.buffer) > self.max_length:
                if not self.discarding:
                    self.sink.problem(self.source, "discarded %d+ bytes without a terminator "
                                      "(max_length %d): noise on the line, or the wrong "
                                      "terminator configured" % (len(self.buffer), self.max_length))
                self.discarding = True
                self.buffer.clear()
        except Exception:  # the sink is the daemon's; never let it stop the reader
            logger.exception("%s: failed to deliver a scan", self.source)

    def _find_terminator(self) -> tuple[int, int] | None:
        best: tuple[int, int] | None = None
        for t in self.terminators:
            i = self.buffer.find(t)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, len(t))
        return best

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost_error = exc
        self.lost.set()


class SerialScanner(ThreadedSource):
    def __init__(self, name: str, *, port: str, baud: int, parity: str, terminators: list[bytes],
                 charset: str, max_length: int, reconnect_max_s: float) -> None:
        super().__init__("serial:" + name)
        self.port = port
        self.baud = baud
        self.parity = parity
        self.terminators = terminators
        self.charset = charset
        self.max_length = max_length
        self.backoff = Backoff(0.2, reconnect_max_s)
        # ends the reading of the open port (the reader thread's stop, or the loop's reader removed)
        self._stop_reading: Callable[[], None] | None = None
        self._lock = threading.Lock()

    def _interrupt(self) -> None:
        # under the lock: _run closes the port only after taking it, so cancel_read() never
        # writes to a pipe that close() is tearing down (pyserial's close is not thread-safe)
        with self._lock:
            if self._stop_reading is not None:
                self._stop_reading()

    def _open(self) -> serial.SerialBase:
        return serial.serial_for_url(self.port, baudrate=self.baud, parity=self.parity,
                                     timeout=None, exclusive=True)

    def _run(self, sink: ScanSink) -> None:
        last_detail: str | None = None
        while not self._stop.is_set():
            try:
                port = self._open()
            except (serial.SerialException, OSError, ValueError) as exc:
                detail = "cannot open %s: %s" % (self.port, exc)
                if detail != last_detail:  # one line per change, not one per retry
                    logger.warning("%s: %s", self.name, detail)
                    sink.connected(self.name, False, detail)
                    last_detail = detail
                self._stop.wait(self.backoff.next())
                continue
            opened_at = time.monotonic()
            logger.info("%s: reading %s at %d baud", self.name, self.port, self.baud)
            framer = ScanFramer(self.name, sink, self.terminators, self.charset, self.max_length)
            loop = sink.event_loop()
            reader: _Reader | None = None
            if loop is not None and _fileno(port) is not None:
                stop_reading = _read_on_loop(loop, port, framer)
            else:
                reader = _Reader(port, framer)
                reader.start()
                stop_reading = reader.stop
            # registered only once started (stop() joins it); a stop() that came in between is
            # seen here under the same lock
            with self._lock:
                self._stop_reading = stop_reading
                stopping = self._stop.is_set()
            if stopping:
                stop_reading()
            else:
                # said once the reading can be stopped: a stop() made on the sink's loop as soon
                # as it hears of this (which cannot wait for a callback of that loop) finds it
                sink.connected(self.name, True)
                last_detail = None
            framer.lost.wait()
            if reader is not None:
                reader.join(2)
            with self._lock:
                self._stop_reading = None
                with contextlib.suppress(serial.SerialException, OSError):
                    port.close()
            if self._stop.is_set():
                break
            detail = "lost %s: %s" % (self.port, framer.lost_error or "closed")
            logger.warning("%s: %s", self.name, detail)
            sink.connected(self.name, False, detail)
            last_detail = detail
            if time.monotonic() - opened_at > STABLE_AFTER_S:
                self.backoff.reset()
            self._stop.wait(self.backoff.next())
        sink.connected(self.name, False, "stopped")


def _fileno(port: serial.SerialBase) -> int | None:
    """The port's file descriptor, None for a port that has none (`loop://`)."""
    try:
        return int(port.fileno())
    except (AttributeError, OSError, ValueError, serial.SerialException):
        return None


def _read_on_loop(loop: asyncio.AbstractEventLoop, port: serial.SerialBase,
                  framer: ScanFramer) -> Callable[[], None]:
    """Read `port` on `loop` until it fails or the returned function (callable from any thread)
    ends it; either way the framer hears `connection_lost`, once, after the loop has let go of
    the descriptor (so the driver's thread may close the port then)."""
    fd = port.fileno()
    port.timeout = 0  # read() takes what is there: it is called only when the port is readable
    attached = False
    # a plain port opened non-blocking (pyserial's own, on POSIX) is read with one read(2) of
    # its descriptor: pyserial's read() adds a select(2) and its timeout bookkeeping per call.
    # Any other (spy://, which logs what read() returns; a blocking one) through read()
    direct = type(port) is serial.Serial and bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK)

    def read() -> bytes:
        if not direct:
            return bytes(port.read(READ_SIZE))
        try:
            data = os.read(fd, READ_SIZE)
        except BlockingIOError:  # ready, then taken by someone else: nothing to read after all
            return b""
        except InterruptedError:
            return b""
        except OSError as exc:
            raise serial.SerialException("read failed: %s" % exc) from exc
        if not data:  # as pyserial says of it: a device that went away reads as ready and empty
            raise serial.SerialException("device reports readiness to read but returned no data "
                                         "(device disconnected or multiple access on port?)")
        return data

    def readable() -> None:
        try:
            data = read()
        except (serial.SerialException, OSError) as exc:  # the device went away
            finish(exc)
            return
        except Exception as exc:
            logger.exception("%s: reader failed", framer.source)
            finish(exc)
            return
        if data:
            framer.data_received(data)

    def attach() -> None:
        nonlocal attached
        if framer.lost.is_set():
            return  # stopped before it began
        try:
            loop.add_reader(fd, readable)
        except (OSError, ValueError) as exc:  # a descriptor the loop cannot wait on
            framer.connection_lost(exc)
            return
        attached = True

    def finish(exc: BaseException | None) -> None:
        if framer.lost.is_set():
            return
        if attached:
            loop.remove_reader(fd)
        framer.connection_lost(exc)

    def stop() -> None:
        try:
            on_the_loop = asyncio.get_running_loop() is loop
        except RuntimeError:
            on_the_loop = False
        if on_the_loop:  # stop() called on the loop itself: it cannot wait for its own callback
            finish(None)
            return
        try:
            loop.call_soon_threadsafe(finish, None)
        except RuntimeError:  # the loop is closed: nothing reads any more
            framer.connection_lost(None)

    try:
        loop.call_soon_threadsafe(attach)
    except RuntimeError as exc:  # the loop is closed: the daemon is stopping
        framer.connection_lost(exc)
    return stop


class _Reader(serial.threaded.ReaderThread):
    alive: bool  # pyserial's own flag (the library has no type hints)

    """ReaderThread with the framer as its protocol, and a read loop that always ends in
    connection_lost: pyserial's own catches only SerialException from read(), but an unplugged
    device can fail with OSError (EIO) from the in_waiting ioctl, which would end the thread
    silently and leave the driver waiting for a loss it is never told about."""

    def __init__(self, port: serial.SerialBase, framer: ScanFramer) -> None:
        super().__init__(port, lambda: framer)
        self.name = "%s-reader" % framer.source

    def run(self) -> None:
        self.protocol = self.protocol_factory()
        error: BaseException | None = None
        try:
            self.protocol.connection_made(self)
            self._connection_made.set()
            while self.alive and self.serial.is_open:
                data = self.serial.read(self.serial.in_waiting or 1)
                if data:
                    self.protocol.data_received(data)
        except (serial.SerialException, OSError) as exc:  # the device went away
            error = exc
        except Exception as exc:
            logger.exception("%s: reader failed", self.name)
            error = exc
        finally:
            self.alive = False
            self._connection_made.set()
            self.protocol.connection_lost(error)


def doctor(sources: Mapping[str, Options], ctx: ProbeContext) -> list[Finding]:
    """`scanbox doctor`: each configured scanner's port is there and the service can open it."""
    out = []
    for name, opts in sources.items():
        if "://" in opts.port:
            out.append(Finding("serial", "info", "serial:%s" % name, "%s (a URL: not checked)" % opts.port))
            continue
        path = ctx.dev(opts.port)
        if not path.exists():
            out.append(Finding("serial", "fail", "serial:%s" % name, "%s does not exist" % opts.port,
                               "plug the scanner in (and set it to USB serial / VCOM mode), or fix port; "
                               "present: %s" % (", ".join(serial_ports(ctx.roots.dev)) or "none")))
        elif not os.access(path, os.R_OK | os.W_OK):
            out.append(Finding("serial", "fail", "serial:%s" % name, "%s is not readable" % opts.port,
                               "add the service user to group 'dialout'"))
        else:
            out.append(Finding("serial", "ok", "serial:%s" % name, "%s present" % opts.port))
    return out
