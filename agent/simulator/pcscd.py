"""pcscd for the card emulators: started when it is not running, with vsmartcard's virtual
reader, for the tests and the card benchmark (and for trying a setup on a desk).

pcscd must run as root (it owns /run/pcscd). Everything here waits on pcscd's own state with a
deadline; a failure says what is missing.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import threading
import time
from typing import Callable

from smartcard import scard

from agent.simulator.cards import VPCD_PORT, VirtualSlot

CARD_READER = "Virtual PCD 00 00"
PSAM_READER = "Virtual PCD 00 01"


class PcscdError(Exception):
    pass


def readers() -> list[str] | None:
    """The PC/SC reader names; None when pcscd does not answer."""
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hresult != scard.SCARD_S_SUCCESS:
        return None
    try:
        hresult, names = scard.SCardListReaders(context, [])
        if hresult == scard.SCARD_E_NO_READERS_AVAILABLE:
            return []
        return list(names) if hresult == scard.SCARD_S_SUCCESS else None
    finally:
        scard.SCardReleaseContext(context)


def card_present(reader: str) -> bool | None:
    """Whether pcscd sees a card in `reader` (None: it does not answer)."""
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hresult != scard.SCARD_S_SUCCESS:
        return None
    try:
        hresult, states = scard.SCardGetStatusChange(context, 0, [(reader, scard.SCARD_STATE_UNAWARE)])
        if hresult != scard.SCARD_S_SUCCESS:
            return None
        return bool(states[0][1] & scard.SCARD_STATE_PRESENT)
    finally:
        scard.SCardReleaseContext(context)


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    """Until `predicate()` holds: state in another process, asked again every 20 ms. TimeoutError
    with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    pause = threading.Event()
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(what)
        pause.wait(0.02)


class Pcscd:
    """pcscd, started by us (`owned`) or found running."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.log = tempfile.TemporaryFile()  # pcscd's output (a pipe nobody reads could fill and block it)

    def output(self) -> str:
        self.log.seek(0)
        return self.log.read().decode(errors="replace")

    @property
    def owned(self) -> bool:
        return self.process is not None

    def ensure(self) -> None:
        present = readers()
        if present is None:
            self.start()
        elif CARD_READER not in present:
            raise PcscdError("pcscd runs but shows no %r (readers: %s): install vsmartcard-vpcd and restart pcscd"
                             % (CARD_READER, present))

    def start(self, timeout: float = 75.0) -> None:
        """Start pcscd and wait for the virtual readers. vpcd cannot bind a port that still has a
        connection in TIME_WAIT (pcscd stopped while an emulator was connected): pcscd then runs
        without that reader, so it is stopped and started again until the port is free (the
        kernel holds TIME_WAIT for 60 s)."""
        deadline = time.monotonic() + timeout
        while True:
            output = self._start_once()
            if output is None:
                return
            if "Address already in use" not in output or time.monotonic() > deadline:
                raise PcscdError("pcscd shows no %r: %s" % (PSAM_READER, output.strip()[-300:]))
            threading.Event().wait(1.0)

    def _start_once(self) -> str | None:
        """None once both virtual readers are there; else pcscd's output (and pcscd stopped)."""
        binary = shutil.which("pcscd") or "/usr/sbin/pcscd"
        self.log.seek(0)
        self.log.truncate()
        try:
            self.process = subprocess.Popen([binary, "--foreground"], stdout=self.log, stderr=subprocess.STDOUT)
        except OSError as exc:
            raise PcscdError("pcscd cannot start (%s): install pcscd and vsmartcard-vpcd (bootstrap.sh)"
                             % exc) from None
        process = self.process
        try:
            wait_for(lambda: CARD_READER in (readers() or []) or process.poll() is not None, 10,
                     "pcscd started but shows no %r: is vsmartcard-vpcd installed?" % CARD_READER)
        except TimeoutError as exc:
            output = self.output()
            self.stop()
            if "Address already in use" in output:
                raise PcscdError("pcscd's virtual reader cannot listen: another program holds vpcd's TCP port "
                                 "(another pcscd, perhaps in a container or chroot): %s"
                                 % output.strip()[-300:]) from None
            raise PcscdError(str(exc)) from None
        if process.poll() is not None:
            self.process = None
            raise PcscdError("pcscd cannot start (exit %s; it must run as root): %s"
                             % (process.returncode, self.output().strip()[-500:]))
        if PSAM_READER in (readers() or []):
            return None
        self.stop()
        return self.output()

    def stop(self) -> None:
        if self.process is not None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)
            self.process = None
            wait_for(lambda: readers() is None, 5, "pcscd still answers after it was stopped")


class PcscSlot(VirtualSlot):
    """A vpcd slot whose `remove()` returns once pcscd has seen the card go (it polls the
    driver), as a hand takes a card away before the next is put down."""

    def __init__(self, port: int = VPCD_PORT, reader: str = CARD_READER) -> None:
        super().__init__(port)
        self.reader = reader

    def remove(self) -> None:
        had_card = self.card is not None
        super().remove()
        if had_card:
            wait_for(lambda: not card_present(self.reader), 5, "pcscd still sees a card in %s" % self.reader)
