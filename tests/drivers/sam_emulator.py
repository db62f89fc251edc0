"""A resident ID card reader (SAM serial protocol) played through a pty: the driver opens the
slave by name as it would /dev/ttyUSB0. A card can be put on and taken off, and the next answers
can be broken on purpose (noise, a bad checksum, a truncated frame, silence).

It parses commands on its own (not with the driver's FrameParser), so a framing bug in the driver
cannot hide behind the same bug here.
"""

from __future__ import annotations

import os
import select
import threading
import tty
from pathlib import Path

from drivers.idcard import build_text, response_frame

PREAMBLE = b"\xaa\xaa\xaa\x96\x69"

CARD = {
    "name": "张三丰",
    "sex": "1",
    "nation": "01",
    "birthday": "19800101",
    "address": "青海省西宁市城东区八一路1号",
    "id_number": "630102198001011234",
    "issuer": "西宁市公安局城东分局",
    "valid_from": "20150101",
    "valid_until": "20350101",
}
PHOTO = bytes(range(256)) * 4  # 1024 opaque bytes, as a WLT photo


class SamEmulator:
    def __init__(self, directory: Path) -> None:
        self.path = directory / "ttyIdReader"
        master, slave = os.openpty()
        tty.setraw(master)
        tty.setraw(slave)
        self.slave_name = os.ttyname(slave)
        # held open: reading a pty master whose slave no one holds fails with EIO
        self.slave = slave
        self.path.symlink_to(self.slave_name)
        self.master = master
        self.card: dict[str, str] | None = None
        self.card_type = "resident"
        self.text: bytes | None = None  # a text block to answer as it is (an unknown card type)
        self.photo = PHOTO
        # each is consumed by the next answer it applies to
        self.faults: list[str] = []
        self.read_failures = 0  # base-info reads still to answer 0x41 with the card on the reader
        self.commands: list[tuple[int, int]] = []
        self.commands_seen = threading.Condition()
        self.silent = False
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="sam-emulator", daemon=True)
        self._thread.start()

    def insert(self, card: dict[str, str] | None = None, card_type: str = "resident") -> None:
        self.card = dict(card or CARD)
        self.card_type = card_type

    def remove(self) -> None:
        self.card = None

    def fail_next_read(self) -> None:
        """The next base-info read answers SW3 0x41 (reading the card failed), the card still
        on the reader: a read disturbed by a hand, or a card slightly out of the field."""
        self.read_failures += 1

    def fault(self, kind: str) -> None:
        """"garbage" (noise before the frame), "checksum" (one bit flipped), "truncate" (half a
        frame, then nothing), "silence" (no answer)."""
        self.faults.append(kind)

    def wait_commands(self, count: int, timeout: float = 5.0) -> None:
        with self.commands_seen:
            if not self.commands_seen.wait_for(lambda: len(self.commands) >= count, timeout):
                raise TimeoutError("reader saw %d commands, waited for %d" % (len(self.commands), count))

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        os.close(self.master)
        os.close(self.slave)
        self.path.unlink(missing_ok=True)

    def answer(self, cmd: int, para: int) -> bytes:
        if (cmd, para) == (0x11, 0xFF):
            return response_frame(0x90)
        if (cmd, para) == (0x20, 0x01):
            return response_frame(0x9F, b"\x00\x00\x00\x00") if self.card else response_frame(0x80)
        if (cmd, para) == (0x20, 0x02):
            return response_frame(0x90, bytes(8)) if self.card else response_frame(0x81)
        if (cmd, para) == (0x30, 0x01):
            if not self.card:
                return response_frame(0x41)
            if self.read_failures:
                self.read_failures -= 1
                return response_frame(0x41)
            text = self.text or build_text(self.card, self.card_type)
            data = len(text).to_bytes(2, "big") + len(self.photo).to_bytes(2, "big") + text + self.photo
            return response_frame(0x90, data)
        return response_frame(0x21)

    def _run(self) -> None:
        buffer = bytearray()
        while not self._stop:
            ready, _, _ = select.select([self.master], [], [], 0.05)
            if not ready:
                continue
            try:
                buffer += os.read(self.master, 4096)
            except OSError:
                return
            while True:
                start = buffer.find(PREAMBLE)
                if start < 0 or len(buffer) < start + 7:
                    break
                length = int.from_bytes(buffer[start + 5:start + 7], "big")
                end = start + 7 + length
                if len(buffer) < end:
                    break
                frame = bytes(buffer[start:end])
                del buffer[:end]
                cmd, para = frame[7], frame[8]
                xor = 0
                for b in frame[5:-1]:
                    xor ^= b
                reply = self.answer(cmd, para) if xor == frame[-1] else _reply_checksum_error()
                reply = self._apply_fault(reply)
                with self.commands_seen:
                    self.commands.append((cmd, para))
                    self.commands_seen.notify_all()
                if reply:
                    os.write(self.master, reply)

    def _apply_fault(self, reply: bytes) -> bytes:
        if self.silent:
            return b""
        if not self.faults:
            return reply
        kind = self.faults.pop(0)
        if kind == "garbage":
            return b"\x00\xff\xaa\xaa\x13\x96\x69garbage" + reply
        if kind == "checksum":
            return reply[:-1] + bytes((reply[-1] ^ 0x01,))
        if kind == "truncate":
            return reply[:len(reply) // 2]
        if kind == "silence":
            return b""
        raise ValueError(kind)


def _reply_checksum_error() -> bytes:
    return response_frame(0x10)
