"""Resident ID card readers (居民身份证阅读器) speaking the SAM serial protocol.

Every frame starts with the preamble `AA AA AA 96 69`, then a big-endian length of what follows
(host -> reader: CMD, Para, data, checksum; reader -> host: SW1, SW2, SW3, data, checksum), and
ends with the XOR of every byte between the preamble and the checksum. SW3 is the reader's own
status: 0x90 done, 0x9F card found, 0x80 no card, 0x81 select failed, 0x41 read failed, ...

A read is find card (0x20 0x01) -> select card (0x20 0x02) -> read base info (0x30 0x01), whose
data is the text length and photo length (2 bytes each, big-endian), 256 bytes of UCS-2LE text
and the photo (1024 bytes, WLT-compressed; kept opaque, as base64 in the scan's fields).

One thread owns the port: it polls for a card every `poll_s`, reads it, and delivers one scan per
placement (a card that stays on the reader is not delivered again; a no-card answer ends the
placement). Garbage and frames with a bad checksum are skipped by resynchronising on the next
preamble; a reader that stops answering is an alarm and is retried; an unplugged reader is
reopened with backoff. The port is a device path or any pyserial URL.
"""

import base64
import contextlib
import logging
import os
import termios
import time
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Mapping

import serial
from msgspec import Meta

from agent.model import Identity, IdentitySource, Scan, ScanKind
from drivers.base import Backoff, DriverOptions, Finding, ProbeContext, ScanSink, ThreadedSource, serial_ports

logger = logging.getLogger(__name__)

PREAMBLE = b"\xaa\xaa\xaa\x96\x69"
MAX_FRAME = 4096  # base info with fingerprints is ~2.3 KB; anything longer is noise

CMD_RESET = (0x10, 0xFF)
CMD_STATUS = (0x11, 0xFF)
CMD_SAM_ID = (0x12, 0xFF)
CMD_FIND = (0x20, 0x01)
CMD_SELECT = (0x20, 0x02)
CMD_READ_BASE = (0x30, 0x01)

SW3_OK = 0x90
SW3_FOUND = 0x9F
SW3_NO_CARD = 0x80

# SW3 -> meaning (the SAM protocol's status table)
STATUS_TEXT: dict[int, str] = {
    0x90: "ok",
    0x9F: "card found",
    0x10: "reader: bad checksum in the command",
    0x11: "reader: bad length in the command",
    0x21: "reader: bad command",
    0x23: "reader: unauthorised operation",
    0x24: "reader: unrecognised error",
    0x31: "card failed to authenticate the reader",
    0x32: "reader failed to authenticate the card",
    0x33: "information verification failed",
    0x40: "wrong card type",
    0x41: "reading the card failed",
    0x47: "getting a random number failed",
    0x60: "SAM self-test failed",
    0x66: "SAM not authorised",
    0x80: "no card",
    0x81: "selecting the card failed",
    0x91: "no such content on the card",
}

# The 256-byte text block, UCS-2LE padded with spaces: (field, length in bytes) per card type.
# The card type is the character at byte 248: blank on a resident ID card (居民身份证), "J" on a
# Hong Kong/Macao/Taiwan residents' residence permit (港澳台居民居住证, same technology, its own
# layout), "I" on a 2017 foreign permanent resident ID card (外国人永久居留身份证).
RESIDENT_LAYOUT: tuple[tuple[str, int], ...] = (
    ("name", 30), ("sex", 2), ("nation", 4), ("birthday", 16), ("address", 70), ("id_number", 36),
    ("issuer", 30), ("valid_from", 16), ("valid_until", 16), ("-", 36),
)
GAT_LAYOUT: tuple[tuple[str, int], ...] = (
    ("name", 30), ("sex", 2), ("-", 4), ("birthday", 16), ("address", 70), ("id_number", 36),
    ("issuer", 30), ("valid_from", 16), ("valid_until", 16), ("pass_number", 18), ("issue_count", 4),
    ("-", 6), ("-", 2), ("-", 6),
)
FOREIGN_LAYOUT: tuple[tuple[str, int], ...] = (
    ("name_en", 120), ("sex", 2), ("id_number", 30), ("nationality", 6), ("name", 30), ("valid_from", 16),
    ("valid_until", 16), ("birthday", 16), ("card_version", 4), ("issuer_code", 8), ("-", 2), ("-", 6),
)
CARD_TYPE_OFFSET = 248
# card type mark -> (card_type in the payload, layout, id_type code of CV02.01.101)
CARD_TYPES: dict[str, tuple[str, tuple[tuple[str, int], ...], str]] = {
    " ": ("resident", RESIDENT_LAYOUT, "01"),  # 居民身份证
    "J": ("gat_residence", GAT_LAYOUT, "99"),  # 其他法定有效证件: the table has no residence permit
    "I": ("foreign_permanent", FOREIGN_LAYOUT, "99"),
}
TEXT_LAYOUT = RESIDENT_LAYOUT
TEXT_SIZE = 256


class Options(DriverOptions):
    driver: Literal["idcard"]
    port: Annotated[str, Meta(min_length=1)]
    # SAM modules default to 115200; the others are what "set baud rate" (0x60 xx) can choose
    baud: Literal[9600, 19200, 38400, 57600, 115200] = 115200
    poll_s: Annotated[float, Meta(ge=0.05, le=10)] = 0.3
    # one command's answer; a base-info read (1295 bytes) takes ~115 ms at 115200 baud
    timeout_s: Annotated[float, Meta(ge=0.1, le=10)] = 1.0
    reconnect_max_s: Annotated[float, Meta(gt=0, le=300)] = 5.0


def create(name: str, options: Options) -> "IdCardReader":
    return IdCardReader(name, port=options.port, baud=options.baud, poll_s=options.poll_s,
                        timeout_s=options.timeout_s, reconnect_max_s=options.reconnect_max_s)


class ReaderTimeout(Exception):
    """The reader sent no complete, valid answer in time."""


class ReaderStatusError(Exception):
    """The reader answered with a status other than the one the step needs."""

    def __init__(self, step: str, sw3: int) -> None:
        super().__init__("%s: status 0x%02X (%s)" % (step, sw3, STATUS_TEXT.get(sw3, "unknown status")))
        self.sw3 = sw3


def checksum(body: bytes) -> int:
    out = 0
    for b in body:
        out ^= b
    return out


def command_frame(cmd: int, para: int, data: bytes = b"") -> bytes:
    body = (len(data) + 3).to_bytes(2, "big") + bytes((cmd, para)) + data
    return PREAMBLE + body + bytes((checksum(body),))


def response_frame(sw3: int, data: bytes = b"", sw1: int = 0, sw2: int = 0) -> bytes:
    """A reader's answer (the emulator in tests and the benchmark builds them with this)."""
    body = (len(data) + 4).to_bytes(2, "big") + bytes((sw1, sw2, sw3)) + data
    return PREAMBLE + body + bytes((checksum(body),))


@dataclass(frozen=True)
class Frame:
    """One checked frame: the three status bytes (or CMD, Para and a zero for a command) + data."""

    head: bytes
    data: bytes

    @property
    def sw3(self) -> int:
        return self.head[2]


class FrameParser:
    """Bytes -> checked frames. Noise before a preamble is skipped; a frame with a bad checksum
    or an impossible length is reported and parsing resumes after its preamble, so one broken
    frame never hides the next good one."""

    def __init__(self, head_size: int = 3) -> None:
        self.head_size = head_size
        self.buffer = bytearray()
        self.errors: list[str] = []

    def feed(self, data: bytes) -> list[Frame]:
        self.buffer.extend(data)
        frames: list[Frame] = []
        while True:
            start = self.buffer.find(PREAMBLE)
            if start < 0:
                # keep a possible partial preamble at the end
                keep = len(PREAMBLE) - 1
                if len(self.buffer) > keep:
                    del self.buffer[:len(self.buffer) - keep]
                return frames
            if start:
                del self.buffer[:start]
            if len(self.buffer) < len(PREAMBLE) + 2:
                return frames
            length = int.from_bytes(self.buffer[5:7], "big")
            if length < self.head_size + 1 or length > MAX_FRAME:
                self.errors.append("impossible frame length %d" % length)
                del self.buffer[:1]
                continue
            end = len(PREAMBLE) + 2 + length
            if len(self.buffer) < end:
                return frames
            body = bytes(self.buffer[5:end - 1])
            if checksum(body) != self.buffer[end - 1]:
                self.errors.append("bad checksum (%d-byte frame)" % length)
                del self.buffer[:1]
                continue
            del self.buffer[:end]
            frames.append(Frame(body[2:2 + self.head_size], body[2 + self.head_size:]))

    def reset(self) -> None:
        self.buffer.clear()


class UnknownCardType(ValueError):
    def __init__(self, mark: str) -> None:
        super().__init__("card type %r is not one this reader knows (resident ID card, J, I)" % mark)
        self.mark = mark


def card_type_mark(text: bytes) -> str:
    mark = text[CARD_TYPE_OFFSET:CARD_TYPE_OFFSET + 2].decode("utf-16-le", errors="replace")
    return " " if mark in (" ", "\x00") else mark


def parse_text(text: bytes) -> dict[str, str]:
    """The 256-byte UCS-2LE block -> fields (padding stripped) and `card_type`. Raises
    UnknownCardType for a card type whose layout is not known here."""
    if len(text) < TEXT_SIZE:
        raise ValueError("card text is %d bytes, expected %d" % (len(text), TEXT_SIZE))
    mark = card_type_mark(text)
    if mark not in CARD_TYPES:
        raise UnknownCardType(mark)
    card_type, layout, _ = CARD_TYPES[mark]
    out: dict[str, str] = {"card_type": card_type}
    offset = 0
    for name, size in layout:
        value = text[offset:offset + size].decode("utf-16-le", errors="replace").strip(" \x00")
        offset += size
        if name != "-":
            out[name] = value
    return out


def build_text(fields: dict[str, str], card_type: str = "resident") -> bytes:
    """Fields -> the card's 256-byte text block (for the emulator and the benchmark)."""
    mark, layout = next((m, layout) for m, (t, layout, _) in CARD_TYPES.items() if t == card_type)
    out = bytearray()
    for name, size in layout:
        encoded = fields.get(name, "").encode("utf-16-le")[:size]
        out += encoded + " ".encode("utf-16-le") * ((size - len(encoded)) // 2)
    out[CARD_TYPE_OFFSET:CARD_TYPE_OFFSET + 2] = mark.encode("utf-16-le")
    return bytes(out)


def parse_base_info(data: bytes) -> tuple[bytes, bytes]:
    """Read-base-info data -> (the text block, the photo), both as the card holds them."""
    if len(data) < 4:
        raise ValueError("base info is %d bytes, too short for its length fields" % len(data))
    text_len = int.from_bytes(data[0:2], "big")
    photo_len = int.from_bytes(data[2:4], "big")
    if len(data) < 4 + text_len + photo_len:
        raise ValueError("base info is %d bytes, its lengths say %d" % (len(data), 4 + text_len + photo_len))
    if text_len < TEXT_SIZE:
        raise ValueError("card text is %d bytes, expected %d" % (text_len, TEXT_SIZE))
    return data[4:4 + text_len], data[4 + text_len:4 + text_len + photo_len]


def card_scan(source: str, fields: dict[str, str], photo: bytes, raw: bytes | None = None) -> Scan:
    """Text fields + photo -> a card scan. Sex and nation stay the GB codes the card holds
    (GB/T 2261.1 and GB/T 3304, the tables in agent/codes/qwb002.py)."""
    payload: dict[str, Any] = dict(fields)
    # the photo is WLT-compressed, decodable only with the licensed library: passed on untouched
    payload["photo_wlt_base64"] = base64.b64encode(photo).decode("ascii") if photo else None
    id_type = next((code for t, _, code in CARD_TYPES.values() if t == fields.get("card_type")), None)
    identity = Identity(
        source=IdentitySource.CARD,
        # a foreign resident's card may have no Chinese name: the English one then
        name=fields.get("name") or fields.get("name_en") or None,
        sex=fields.get("sex") or None,
        nation=fields.get("nation") or None,
        birthday=fields.get("birthday") or None,
        id_type=id_type,
        id_number=fields.get("id_number") or None,
        address=fields.get("address") or None,
    )
    return Scan.from_card(source, ScanKind.ID_CARD, identity, payload, raw)


def unknown_card_scan(source: str, text: bytes, photo: bytes, mark: str, raw: bytes | None = None) -> Scan:
    """A card of a type whose layout is not known: its text as it is, for the HIS to read."""
    payload = {"card_type": "unknown:%s" % mark, "text_ucs2le_base64": base64.b64encode(text).decode("ascii"),
               "photo_wlt_base64": base64.b64encode(photo).decode("ascii") if photo else None}
    return Scan.from_card(source, ScanKind.ID_CARD, Identity(source=IdentitySource.CARD), payload, raw)


class SamLink:
    """Command/answer over an open port. Not thread-safe: one thread owns it."""

    def __init__(self, port: serial.SerialBase, timeout_s: float) -> None:
        self.port = port
        self.timeout_s = timeout_s
        self.parser = FrameParser()

    def transact(self, cmd: tuple[int, int], data: bytes = b"") -> Frame:
        # whatever is left from an answer we gave up on must not be taken for this one's
        try:
            self.port.reset_input_buffer()
        except termios.error as exc:  # an unplugged tty fails tcflush with EIO, not as an OSError
            raise serial.SerialException("cannot flush the port: %s" % exc.args[-1]) from exc
        self.parser.reset()
        self.port.write(command_frame(cmd[0], cmd[1], data))
        deadline = time.monotonic() + self.timeout_s
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ReaderTimeout("no valid answer to command %02X %02X within %.1f s%s"
                                    % (cmd[0], cmd[1], self.timeout_s, self._errors()))
            self.port.timeout = min(remaining, 0.05)
            chunk = self.port.read(max(self.port.in_waiting, 1))
            if chunk:
                frames = self.parser.feed(chunk)
                if frames:
                    return frames[0]

    def _errors(self) -> str:
        if not self.parser.errors:
            return ""
        errors, self.parser.errors = self.parser.errors, []
        return " (%s)" % "; ".join(errors[-3:])

    def status(self) -> int:
        return self.transact(CMD_STATUS).sw3

    def read_card(self) -> tuple[bytes, bytes, bytes] | None:
        """Find, select and read a card: (text block, photo, raw base info), or None without a card."""
        found = self.transact(CMD_FIND)
        if found.sw3 == SW3_NO_CARD:
            return None
        if found.sw3 != SW3_FOUND:
            raise ReaderStatusError("find card", found.sw3)
        selected = self.transact(CMD_SELECT)
        if selected.sw3 != SW3_OK:
            raise ReaderStatusError("select card", selected.sw3)
        info = self.transact(CMD_READ_BASE)
        if info.sw3 != SW3_OK:
            raise ReaderStatusError("read base info", info.sw3)
        text, photo = parse_base_info(info.data)
        return text, photo, info.data


def open_port(url: str, baud: int) -> serial.SerialBase:
    return serial.serial_for_url(url, baudrate=baud, timeout=0.05, exclusive=True)


def probe(url: str, baud: int = 115200, timeout_s: float = 1.0) -> str:
    """Ask whatever is on `url` for the SAM status: a line for `scanbox doctor`. Raises
    OSError/serial.SerialException when the port cannot be opened, ReaderTimeout when nothing
    answers like a reader."""
    port = open_port(url, baud)
    try:
        sw3 = SamLink(port, timeout_s).status()
    finally:
        with contextlib.suppress(serial.SerialException, OSError):
            port.close()
    return "SAM status 0x%02X (%s)" % (sw3, STATUS_TEXT.get(sw3, "unknown status"))


class IdCardReader(ThreadedSource):
    # consecutive unanswered commands before the reader is reported as not answering
    TIMEOUTS_BEFORE_ALARM = 3

    def __init__(self, name: str, *, port: str, baud: int, poll_s: float, timeout_s: float,
                 reconnect_max_s: float) -> None:
        super().__init__("idcard:" + name)
        self.port = port
        self.baud = baud
        self.poll_s = poll_s
        self.timeout_s = timeout_s
        self.backoff = Backoff(0.2, reconnect_max_s)
        self.reads = 0  # complete card reads (the benchmark and tests look)

    def _run(self, sink: ScanSink) -> None:
        last_detail: str | None = None
        while not self._stop.is_set():
            try:
                port = open_port(self.port, self.baud)
            except (serial.SerialException, OSError, ValueError) as exc:
                detail = "cannot open %s: %s" % (self.port, exc)
                if detail != last_detail:
                    logger.warning("%s: %s", self.name, detail)
                    sink.connected(self.name, False, detail)
                    last_detail = detail
                self._stop.wait(self.backoff.next())
                continue
            try:
                detail = self._poll(port, sink)
            except Exception as exc:  # a bug here must not end reading for good
                logger.exception("%s: reading failed", self.name)
                detail = "driver failed: %s" % exc
            finally:
                with contextlib.suppress(serial.SerialException, OSError):
                    port.close()
            if self._stop.is_set():
                break
            logger.warning("%s: %s", self.name, detail)
            sink.connected(self.name, False, detail)
            last_detail = detail
            self._stop.wait(self.backoff.next())
        sink.connected(self.name, False, "stopped")

    def _poll(self, port: serial.SerialBase, sink: ScanSink) -> str:
        """Poll an open port until it fails or stop(); returns why it ended."""
        link = SamLink(port, self.timeout_s)
        connected: bool | None = None
        timeouts = 0
        present: bytes | None = None  # the text of the card on the reader, delivered already
        while not self._stop.is_set():
            try:
                card = link.read_card()
            except (serial.SerialException, OSError) as exc:
                return "lost %s: %s" % (self.port, exc)
            except ReaderTimeout as exc:
                timeouts += 1
                if timeouts >= self.TIMEOUTS_BEFORE_ALARM and connected is not False:
                    connected = False
                    sink.connected(self.name, False, "reader on %s does not answer: %s" % (self.port, exc))
                self._stop.wait(self.poll_s)
                continue
            except (ReaderStatusError, ValueError) as exc:
                # a card moved away mid-read, or a read the card refused: try again next poll.
                # The placement goes on (`present` stays): only a "no card" answer ends it, so
                # a card left on the reader is not delivered again after one failed read
                sink.problem(self.name, "card read failed: %s" % exc)
                self._stop.wait(self.poll_s)
                continue
            timeouts = 0
            if connected is not True:
                connected = True
                self.backoff.reset()
                logger.info("%s: reader answers on %s", self.name, self.port)
                sink.connected(self.name, True)
            if card is None:
                present = None
            else:
                text, photo, raw = card
                self.reads += 1
                if text != present:
                    present = text
                    self._deliver(sink, text, photo, raw)
            self._stop.wait(self.poll_s)
        return "stopped"

    def _deliver(self, sink: ScanSink, text: bytes, photo: bytes, raw: bytes) -> None:
        try:
            try:
                scan = card_scan(self.name, parse_text(text), photo, raw)
            except UnknownCardType as exc:
                sink.problem(self.name, "%s: delivered with its text undecoded" % exc)
                scan = unknown_card_scan(self.name, text, photo, exc.mark, raw)
            sink.scan(scan)
        except Exception:  # the sink is the daemon's; never let it stop the reader
            logger.exception("%s: failed to deliver a card", self.name)


def doctor(sources: Mapping[str, Options], ctx: ProbeContext) -> list[Finding]:
    """`scanbox doctor`: the serial ports on the box (a USB one nobody configured is asked whether
    it is a reader someone forgot to add), and whether each configured reader answers the SAM
    status command."""
    out = []
    ports = serial_ports(ctx.roots.dev)
    probed: set[str] = set()
    for port in ports:
        real = os.path.realpath(port)
        owner = ctx.claimed.get(port) or next((o for p, o in ctx.claimed.items()
                                               if os.path.realpath(p) == real), None)
        if owner is not None:
            continue
        # a USB port nobody configured: is it an ID card reader someone forgot to add?
        # (only USB ones: the Pi's own UART may carry a console)
        usb = any(os.path.basename(p).startswith(("ttyUSB", "ttyACM")) for p in (port, real)) \
            or "/serial/by-id/" in port
        if ctx.probe_unconfigured and usb and real not in probed:
            probed.add(real)
            try:
                answer = probe(port, 115200, ctx.probe_timeout_s)
            except Exception:  # not a reader, or not at the default rate: nothing to say
                pass
            else:
                out.append(Finding("serial", "warn", port, "not configured, but an ID card reader answers "
                                   "(%s)" % answer, "add [sources.idcard] driver = \"idcard\", port = \"%s\""
                                   % port))
                continue
        out.append(Finding("serial", "info", port, "not configured"))
    for name, opts in sources.items():
        port = opts.port if "://" in opts.port else str(ctx.dev(opts.port))
        try:
            answer = probe(port, opts.baud, ctx.probe_timeout_s)
        except ReaderTimeout:
            out.append(Finding("serial", "fail", "idcard:%s" % name,
                               "%s opens, but nothing answers the SAM status command at %d baud"
                               % (opts.port, opts.baud),
                               "check that this is the reader's port and its baud rate (SAM modules "
                               "default to 115200); power-cycle the reader"))
        except Exception as exc:
            out.append(Finding("serial", "fail", "idcard:%s" % name, "cannot open %s: %s" % (opts.port, exc),
                               _serial_fix(exc)))
        else:
            out.append(Finding("serial", "ok", "idcard:%s" % name, "reader on %s: %s" % (opts.port, answer)))
    return out


def _serial_fix(exc: Exception) -> str:
    text = str(exc)
    if "Permission denied" in text or "Errno 13" in text:
        return "add the service user to group 'dialout'"
    if "No such file" in text or "Errno 2" in text:
        return "plug the reader in, or fix port (ls /dev/ttyUSB* /dev/serial/by-id/)"
    if "busy" in text.lower() or "lock" in text.lower():
        return "another program has the port open (is scanbox running? it holds its readers)"
    return "check the port"
