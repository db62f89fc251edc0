"""Smart card emulators behind vsmartcard's virtual reader (vpcd), for tests, benchmarks and
trying a reader setup without cards.

vpcd is a pcsc-lite reader driver: each of its slots ("Virtual PCD 00 00", "00 01") listens on
127.0.0.1 (35963, 35964, ...) for a card emulator to connect. A connected emulator is an
inserted card; closing the connection pulls it. Messages are framed by a 2-byte big-endian
length; 1-byte messages are power off (0x00), power on (0x01), reset (0x02) and get ATR
(0x04); longer ones are command APDUs, answered with the response APDU.

The cards here are written from the public descriptions (../shared/research/physical-cards.md),
independently of the driver's profiles: a social security card (v2 reads freely; v3 wants
external authentication before EF06), a resident health card (EF06 after authentication), a
PSAM, and a card that is neither. The PSAM's cryptogram is HMAC-SHA256 over the diversifier
and the challenge: the real algorithm (SM4/3DES with issuer keys) is not public and no test
depends on it, only on the card and the PSAM agreeing.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

logger = logging.getLogger(__name__)

VPCD_HOST = "127.0.0.1"
VPCD_PORT = 35963  # slot 00 00; slot 00 01 is the next port
ISSUER_KEY = b"scanbox test issuer key"

SSSE = "sx1.sh.社会保障".encode("gbk")
DDF1 = bytes.fromhex("DDF1")
OK = b"\x90\x00"


def sw(value: int) -> bytes:
    return value.to_bytes(2, "big")


def an(text: str, length: int) -> bytes:
    data = text.encode("gb18030")
    if len(data) > length:
        raise ValueError("%r is longer than %d bytes" % (text, length))
    return data.ljust(length, b"\x00")


def cn(digits: str, length: int) -> bytes:
    return bytes.fromhex(digits.ljust(length * 2, "F"))


def cryptogram(diversifier: bytes, challenge: bytes, key: bytes = ISSUER_KEY) -> bytes:
    return hmac.new(key, diversifier[-8:].rjust(8, b"\x00") + challenge, hashlib.sha256).digest()[:16]


@dataclass
class Application:
    """A DF: files by FID, each a map tag -> value; `protected` files want authentication."""

    files: dict[bytes, dict[int, bytes]]
    protected: frozenset[bytes] = frozenset()
    key_ref: int = 0x0A
    diversifier: tuple[bytes, int] = (b"\xef\x05", 0x01)


@dataclass
class EmulatedCard:
    """An ISO 7816-4 card: SELECT (by name or FID), READ RECORD by tag, GET CHALLENGE,
    EXTERNAL AUTHENTICATE.

    `exact_le`: READ RECORD with the wrong Le is answered 6Cxx (as many cards do), so a reader
    must send it again. `faults`: command prefix -> status word, to answer wrongly on purpose.
    `pull_after`: the card leaves the field instead of answering that many-th APDU."""

    atr: bytes
    apps: dict[bytes, Application] = field(default_factory=dict)
    exact_le: bool = True
    faults: dict[bytes, int] = field(default_factory=dict)
    pull_after: int | None = None
    label: str = "card"
    apdus: int = 0
    _app: Application | None = None
    _file: dict[int, bytes] | None = None
    _fid: bytes | None = None
    _challenge: bytes | None = None
    _authenticated: bool = False

    def reset(self) -> None:
        self._app = self._file = self._fid = self._challenge = None
        self._authenticated = False

    def command(self, apdu: bytes) -> bytes:
        self.apdus += 1
        for prefix, status in self.faults.items():
            if apdu.startswith(prefix):
                return sw(status)
        if len(apdu) < 4:
            return sw(0x6700)
        cla, ins, p1, p2 = apdu[:4]
        body = apdu[5:5 + apdu[4]] if len(apdu) > 5 else b""
        if ins == 0xA4:
            return self._select(body)
        if ins == 0xB2:
            return self._read(p1, apdu[4] if len(apdu) == 5 else 0)
        if ins == 0x84:
            self._challenge = os.urandom(apdu[4] if len(apdu) == 5 and apdu[4] else 8)
            return self._challenge + OK
        if ins == 0x82:
            return self._external(p2, body)
        return sw(0x6D00)

    def _select(self, name: bytes) -> bytes:
        if name in self.apps:
            self._app, self._file, self._fid, self._authenticated = self.apps[name], None, None, False
            return OK
        if self._app is not None and name in self._app.files:
            self._file, self._fid = self._app.files[name], name
            return OK
        return sw(0x6A82)

    def _read(self, tag: int, le: int) -> bytes:
        if self._app is None or self._file is None or self._fid is None:
            return sw(0x6986)
        if self._fid in self._app.protected and not self._authenticated:
            return sw(0x6982)
        if tag not in self._file:
            return sw(0x6A83)
        value = self._file[tag]
        record = bytes([tag, len(value)]) + value
        if self.exact_le and le != len(record):
            return sw(0x6C00 | len(record))
        return record + OK

    def _external(self, key_ref: int, data: bytes) -> bytes:
        if self._app is None or self._challenge is None:
            return sw(0x6985)
        fid, tag = self._app.diversifier
        expected = cryptogram(self._app.files[fid][tag], self._challenge)
        self._challenge = None
        if key_ref != self._app.key_ref or not hmac.compare_digest(expected, data):
            return sw(0x6300)
        self._authenticated = True
        return OK


@dataclass
class EmulatedPsam(EmulatedCard):
    """A PSAM: 0088 turns (diversifier, challenge) into a cryptogram, answered 61xx so the
    reader has to fetch it with GET RESPONSE."""

    key: bytes = ISSUER_KEY
    _pending: bytes = b""

    def command(self, apdu: bytes) -> bytes:
        self.apdus += 1
        for prefix, status in self.faults.items():
            if apdu.startswith(prefix):
                return sw(status)
        if len(apdu) >= 5 and apdu[1] == 0x88:
            body = apdu[5:5 + apdu[4]]
            if len(body) != 16:
                return sw(0x6700)
            self._pending = cryptogram(body[:8], body[8:], self.key)
            return sw(0x6100 | len(self._pending))
        if len(apdu) >= 5 and apdu[1] == 0xC0:
            data, self._pending = self._pending[:apdu[4]], self._pending[apdu[4]:]
            return data + OK if data else sw(0x6985)
        return sw(0x6D00)


# --- the cards tests use -------------------------------------------------------------------

SAMPLE_PERSON = {"name": "张晓明", "sex": "1", "nation": "01", "birthday": "19850312",
                 "id_number": "630102198503121237", "birthplace": "630102"}


def ssc(version: str = "2.00", person: dict[str, str] | None = None, **options: object) -> EmulatedCard:
    """A social security card; version 3 wants external authentication before EF06."""
    p = dict(SAMPLE_PERSON, **(person or {}))
    ef05 = {
        0x01: bytes.fromhex("630100D15600000599110145FFFFFFFF"),
        0x02: an("3", 1),
        0x03: an(version, 4),
        0x04: cn("630100000000", 12),
        0x05: cn("20200101", 4),
        0x06: cn("20300101", 4),
        0x07: an("A12345678", 9),
    }
    ef06 = {
        0x08: an(p["id_number"], 18),
        0x09: an(p["name"], 30),
        0x0A: an(p["sex"], 1),
        0x0B: cn(p["nation"], 1),
        0x0C: cn(p["birthplace"], 3),
        0x0D: cn(p["birthday"], 4),
    }
    protected = frozenset({b"\xef\x06"}) if version.startswith("3") else frozenset()
    app = Application({b"\xef\x05": ef05, b"\xef\x06": ef06}, protected, 0x0A, (b"\xef\x05", 0x01))
    atr = bytes.fromhex("3B6C00000081869966112233445566") if version.startswith("3") else \
        bytes.fromhex("3B6C00000081869966AABBCCDDEEFF")
    return EmulatedCard(atr, {SSSE: app}, label="ssc v%s" % version, **options)  # type: ignore[arg-type]


HC_NUMBER = "630100199001010012"


def health_card(person: dict[str, str] | None = None, **options: object) -> EmulatedCard:
    """A resident health card: EF05 freely, EF06 after external authentication."""
    p = dict(SAMPLE_PERSON, **(person or {}))
    ef05 = {
        0x01: an("1", 1),
        0x02: an("1.00", 4),
        0x03: an("青海省卫生健康委员会", 30),
        0x04: cn("63000000001", 11),
        0x06: cn("20210601", 4),
        0x08: an(HC_NUMBER, 18),
        0x0A: an("HC00012345", 10),
        0x39: cn("630100", 3),
    }
    ef06 = {
        0x0B: an(p["name"], 30),
        0x0C: bytes([int(p["sex"])]),
        0x0D: cn(p["nation"], 1),
        0x0E: cn(p["birthday"], 4),
        0x0F: an(p["id_number"], 18),
    }
    app = Application({b"\xef\x05": ef05, b"\xef\x06": ef06}, frozenset({b"\xef\x06"}), 0x0B, (b"\xef\x05", 0x0A))
    return EmulatedCard(bytes.fromhex("3B8F8001804F0CA000000306030001000000006A"), {DDF1: app},
                        label="health card", **options)  # type: ignore[arg-type]


def other_card() -> EmulatedCard:
    """A card that is neither (a transit card, a bank card): selects nothing we ask for."""
    return EmulatedCard(bytes.fromhex("3B8A800150904E4C4F4E4732300E"), {b"\xa0\x00\x00\x00\x03": Application({})},
                        label="other card")


def psam() -> EmulatedPsam:
    return EmulatedPsam(bytes.fromhex("3B6900000A0A0A0A0A0A0A0A0A"), label="psam")


# --- the link to vpcd ----------------------------------------------------------------------


class VirtualSlot:
    """One vpcd slot: `insert(card)` connects the card's emulator, `remove()` pulls it."""

    def __init__(self, port: int = VPCD_PORT, host: str = VPCD_HOST) -> None:
        self.host = host
        self.port = port
        self.card: EmulatedCard | None = None
        self.pulled = threading.Event()  # the card left on its own (pull_after)
        self.powered = threading.Event()
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None

    def insert(self, card: EmulatedCard, timeout: float = 5.0) -> None:
        """Connect; vpcd listens once pcscd has loaded it, so a refused connection is retried
        until `timeout`."""
        self.remove()
        deadline = time.monotonic() + timeout
        while True:
            try:
                sock = socket.create_connection((self.host, self.port), timeout=timeout)
                break
            except ConnectionRefusedError:
                if time.monotonic() > deadline:
                    raise ConnectionRefusedError("vpcd does not listen on %s:%d (is pcscd running with "
                                                 "vsmartcard-vpcd?)" % (self.host, self.port)) from None
                threading.Event().wait(0.05)
        sock.settimeout(None)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        # close with a reset: no TIME_WAIT on vpcd's port, which would keep a restarted pcscd's
        # vpcd from binding it for a minute
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        card.reset()
        self.card, self._sock = card, sock
        self.pulled.clear()
        self.powered.clear()
        self._thread = threading.Thread(target=self._serve, args=(sock, card), name="vpcd-%d" % self.port,
                                        daemon=True)
        self._thread.start()

    def remove(self) -> None:
        sock, self._sock = self._sock, None
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
            sock.close()
        if self._thread is not None:
            self._thread.join(5)
            self._thread = None
        self.card = None

    def _serve(self, sock: socket.socket, card: EmulatedCard) -> None:
        try:
            while True:
                header = _recv(sock, 2)
                message = _recv(sock, struct.unpack(">H", header)[0])
                if len(message) == 1:
                    if message[0] in (0x01, 0x02):
                        card.reset()
                        self.powered.set()
                    elif message[0] == 0x00:
                        card.reset()
                    elif message[0] == 0x04:
                        sock.sendall(struct.pack(">H", len(card.atr)) + card.atr)
                    continue
                if card.pull_after is not None and card.apdus + 1 >= card.pull_after:
                    self.pulled.set()
                    sock.close()
                    return
                response = card.command(message)
                sock.sendall(struct.pack(">H", len(response)) + response)
        except (EOFError, OSError):
            return


def _recv(sock: socket.socket, n: int) -> bytes:
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
        # vpcd writes a message's length and its body separately; a delayed ACK of the first
        # would hold the second back for 40 ms (Nagle) on every APDU
        if hasattr(socket, "TCP_QUICKACK"):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_QUICKACK, 1)
    return data
