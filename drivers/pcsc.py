"""Card readers through PC/SC (pcscd + pyscard): social security and resident health cards.

The reader is chosen by a pattern on its PC/SC name (`"ACS ACR1281"`, `"Virtual PCD 00 00"`),
so a reader that is unplugged and plugged back, even on another USB port, is found again. One
thread waits on SCardGetStatusChange for the reader and for readers coming and going (the PnP
pseudo-reader); a card put on the reader is identified by the card profiles (drivers/cards.py,
card_profiles/*.toml), read, and delivered as one Scan of kind `ssc` or `health_card` with the
identity it states. A PSAM in a second reader (`psam_reader`) authenticates the box to cards
that want it (social security cards of version 3, the health card's personal file); without
one, such a card is delivered with what it let us read and the reason PSAM_REQUIRED.

A card that is pulled mid-read, answers wrong status words, or is neither kind is a `problem`
(logged with what the card said, counted), never a scan with half-true data. pcscd going away
is waited out with backoff, like an unplugged scanner.
"""

import contextlib
import logging
import re
import threading
import time
from pathlib import Path
from typing import Annotated, Any, Literal, Mapping

import msgspec
from msgspec import Meta
from smartcard import scard
from smartcard.ATR import ATR

from agent.model import Identity, IdentitySource, Reason, Scan, ScanKind
from agent.schema import Check, Regex
from drivers import cards
from drivers.base import Backoff, DriverOptions, Finding, ProbeContext, ScanSink, ThreadedSource

logger = logging.getLogger(__name__)

PNP = "\\\\?PnP?\\Notification"
KINDS = {"ssc": ScanKind.SSC, "health_card": ScanKind.HEALTH_CARD}
_GONE = (scard.SCARD_E_NO_SERVICE, scard.SCARD_E_SERVICE_STOPPED, scard.SCARD_F_COMM_ERROR)
_REMOVED = (scard.SCARD_W_REMOVED_CARD, scard.SCARD_E_NO_SMARTCARD, scard.SCARD_W_RESET_CARD,
            scard.SCARD_W_UNPOWERED_CARD)
_READER_LOST = (scard.SCARD_E_UNKNOWN_READER, scard.SCARD_E_READER_UNAVAILABLE)


def _profiles(value: dict[str, Path]) -> dict[str, Path]:
    for kind, path in value.items():
        profile = cards.load_profile(path)  # ValueError names the file and the problem
        if profile.kind != kind:
            raise ValueError("%s describes %s, not %s" % (path, profile.kind, kind))
    return value


class Options(DriverOptions):
    driver: Literal["pcsc"]
    # a regular expression searched in each PC/SC reader name; the first reader that matches
    reader: Annotated[Regex, Meta(min_length=1)]
    # the reader (slot) that holds the PSAM; none: cards that need one answer PSAM_REQUIRED
    psam_reader: Annotated[Regex, Meta(min_length=1)] | None = None
    # which cards to read, tried in this order
    cards: Annotated[list[Literal["ssc", "health_card"]], Meta(min_length=1)] = msgspec.field(
        default_factory=lambda: ["ssc", "health_card"])
    # a corrected file map for a card kind (card_profiles/*.toml is the model)
    profiles: Annotated[dict[Literal["ssc", "health_card"], Path], Check(_profiles)] = {}
    # how often readers coming and going are looked for when the PnP notification is not offered
    poll_s: Annotated[float, Meta(ge=0.1, le=10)] = 1.0
    reconnect_max_s: Annotated[float, Meta(gt=0, le=300)] = 5.0


def create(name: str, options: Options) -> "PcscReader":
    profiles = [cards.load_profile(options.profiles[k]) if k in options.profiles else cards.builtin_profile(k)
                for k in options.cards]
    return PcscReader(name, reader=options.reader, psam_reader=options.psam_reader, profiles=profiles,
                      poll_s=options.poll_s, reconnect_max_s=options.reconnect_max_s)


class PcscError(Exception):
    def __init__(self, what: str, hresult: int) -> None:
        super().__init__("%s: %s" % (what, scard.SCardGetErrorMessage(hresult).strip()))
        self.hresult = hresult


class _ServiceGone(Exception):
    pass


def _check(what: str, hresult: int) -> None:
    if hresult != scard.SCARD_S_SUCCESS:
        if hresult in _GONE:
            raise _ServiceGone("%s: %s" % (what, scard.SCardGetErrorMessage(hresult).strip()))
        raise PcscError(what, hresult)


class Connection:
    """One card in one reader, connected shared; `transmit` is what drivers.cards needs."""

    def __init__(self, context: int, reader: str) -> None:
        self.context = context
        self.reader = reader
        hresult, self.handle, self.protocol = scard.SCardConnect(
            context, reader, scard.SCARD_SHARE_SHARED, scard.SCARD_PROTOCOL_T0 | scard.SCARD_PROTOCOL_T1)
        if hresult in _REMOVED:
            raise cards.CardRemoved("the card left %s before it could be read" % reader)
        _check("connect to %s" % reader, hresult)

    def transmit(self, apdu: bytes) -> bytes:
        hresult, response = scard.SCardTransmit(self.handle, self.protocol, list(apdu))
        if hresult in _REMOVED:
            raise cards.CardRemoved("the card was removed during the read (%s)"
                                    % scard.SCardGetErrorMessage(hresult).strip())
        if hresult in _READER_LOST:
            raise cards.CardRemoved("the reader went away during the read")
        _check("transmit", hresult)
        if len(response) < 2 and self._gone():
            # some readers (vpcd among them) answer "nothing" rather than "removed" when the
            # card leaves in the middle of a command
            raise cards.CardRemoved("the card was removed during the read (the reader answered nothing)")
        return bytes(response)

    def _gone(self, within_ms: int = 1000) -> bool:
        """Whether pcscd sees the card leave within `within_ms` (it polls some readers)."""
        state = scard.SCARD_STATE_UNAWARE
        deadline = time.monotonic() + within_ms / 1000
        while True:
            left = int((deadline - time.monotonic()) * 1000)
            hresult, states = scard.SCardGetStatusChange(self.context, max(left, 0), [(self.reader, state)])
            if hresult != scard.SCARD_S_SUCCESS:
                return hresult != scard.SCARD_E_TIMEOUT
            state = states[0][1] & ~scard.SCARD_STATE_CHANGED
            if not state & scard.SCARD_STATE_PRESENT:
                return True
            if left <= 0:
                return False

    def close(self) -> None:
        scard.SCardDisconnect(self.handle, scard.SCARD_LEAVE_CARD)


class PcscReader(ThreadedSource):
    def __init__(self, name: str, *, reader: str, psam_reader: str | None, profiles: list[cards.Profile],
                 poll_s: float = 1.0, reconnect_max_s: float = 5.0) -> None:
        super().__init__("pcsc:" + name)
        self.pattern = re.compile(reader)
        self.psam_pattern = re.compile(psam_reader) if psam_reader else None
        self.profiles = profiles
        self.poll_ms = int(poll_s * 1000)
        self.backoff = Backoff(0.2, reconnect_max_s)
        self._context: int | None = None
        self._lock = threading.Lock()
        # timing of the last read, for the benchmark: state change seen -> scan delivered
        self.last_read_ms: float | None = None

    def _interrupt(self) -> None:
        with self._lock:
            if self._context is not None:
                scard.SCardCancel(self._context)

    # --- the reader thread ---------------------------------------------------------------

    def _run(self, sink: ScanSink) -> None:
        last_detail: str | None = None
        while not self._stop.is_set():
            hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
            if hresult != scard.SCARD_S_SUCCESS:
                detail = "PC/SC not available (is pcscd running?): %s" % scard.SCardGetErrorMessage(hresult).strip()
                if detail != last_detail:
                    logger.warning("%s: %s", self.name, detail)
                    sink.connected(self.name, False, detail)
                    last_detail = detail
                self._stop.wait(self.backoff.next())
                continue
            with self._lock:
                self._context = context
            try:
                last_detail = self._serve(context, sink, last_detail)
            except (_ServiceGone, PcscError) as exc:
                # pcscd stopped or restarted (a context or handle it no longer knows): start over
                detail = "PC/SC service went away: %s" % exc
                logger.warning("%s: %s", self.name, detail)
                sink.connected(self.name, False, detail)
                last_detail = detail
                self._stop.wait(self.backoff.next())
            finally:
                with self._lock:
                    self._context = None
                scard.SCardReleaseContext(context)
        sink.connected(self.name, False, "stopped")

    def _find(self, context: int, pattern: re.Pattern[str]) -> str | None:
        hresult, readers = scard.SCardListReaders(context, [])
        if hresult in (scard.SCARD_E_NO_READERS_AVAILABLE,):
            return None
        _check("list readers", hresult)
        return next((r for r in readers if pattern.search(r)), None)

    def _serve(self, context: int, sink: ScanSink, last_detail: str | None) -> str | None:
        reader: str | None = None
        state = scard.SCARD_STATE_UNAWARE
        pnp_state = scard.SCARD_STATE_UNAWARE
        pnp = True
        while not self._stop.is_set():
            if reader is None:
                reader = self._find(context, self.pattern)
                if reader is None:
                    detail = "no reader matching %r" % self.pattern.pattern
                    if detail != last_detail:
                        logger.warning("%s: %s", self.name, detail)
                        sink.connected(self.name, False, detail)
                        last_detail = detail
                else:
                    logger.info("%s: reader %s", self.name, reader)
                    sink.connected(self.name, True)
                    self.backoff.reset()
                    last_detail = None
                    state = scard.SCARD_STATE_UNAWARE
            watch = ([(reader, state)] if reader else []) + ([(PNP, pnp_state)] if pnp else [])
            if not watch:
                self._stop.wait(self.poll_ms / 1000)
                continue
            hresult, states = scard.SCardGetStatusChange(context, self.poll_ms, watch)
            seen = time.monotonic()
            if hresult in (scard.SCARD_E_TIMEOUT, scard.SCARD_E_CANCELLED):
                continue
            if hresult == scard.SCARD_E_INVALID_VALUE and pnp:
                pnp = False  # no PnP notification here: poll for readers instead
                continue
            if hresult in _READER_LOST and reader is not None:
                last_detail, reader = self._lost(reader, sink), None
                continue
            _check("wait for a card", hresult)
            for name, event, atr in states:
                if name == PNP:
                    pnp_state = event & ~scard.SCARD_STATE_CHANGED
                    continue
                if event & (scard.SCARD_STATE_UNKNOWN | scard.SCARD_STATE_IGNORE | scard.SCARD_STATE_UNAVAILABLE):
                    last_detail, reader = self._lost(name, sink), None
                    continue
                was_present = bool(state & scard.SCARD_STATE_PRESENT)
                # pcsc-lite counts card insertions and removals in the upper 16 bits: a card
                # swapped between two waits is still a new card
                swapped = (event >> 16) != (state >> 16) and state != scard.SCARD_STATE_UNAWARE
                state = event & ~scard.SCARD_STATE_CHANGED
                present = bool(event & scard.SCARD_STATE_PRESENT)
                if was_present and not present:
                    logger.debug("%s: card removed from %s", self.name, name)
                if present and (not was_present or swapped):
                    if event & scard.SCARD_STATE_MUTE:
                        sink.problem(self.name, "a card that does not answer (mute) is on %s" % reader)
                    else:
                        self._card(context, name, bytes(atr), sink, seen)
            if reader is not None and not pnp:
                # without PnP, look for the reader again on every timeout (cheap)
                with contextlib.suppress(PcscError):
                    if self._find(context, self.pattern) != reader:
                        last_detail, reader = self._lost(reader, sink), None
        return last_detail

    def _lost(self, reader: str, sink: ScanSink) -> str:
        detail = "reader %s went away" % reader
        logger.warning("%s: %s", self.name, detail)
        sink.connected(self.name, False, detail)
        return "no reader matching %r" % self.pattern.pattern

    # --- one card ------------------------------------------------------------------------

    def _card(self, context: int, reader: str, atr: bytes, sink: ScanSink, seen: float) -> None:
        connection: Connection | None = None
        psam: _PsamSlot | None = None
        try:
            connection = Connection(context, reader)
            if self.psam_pattern is not None:
                psam = _PsamSlot(context, self._find, self.psam_pattern)
            read = cards.read_card(connection.transmit, atr, self.profiles,
                                   cards.Psam(psam.channel) if psam else None)
        except cards.CardError as exc:
            sink.problem(self.name, "card not read (ATR %s): %s" % (atr.hex().upper(), exc))
            return
        except PcscError as exc:
            sink.problem(self.name, "card not read (ATR %s): %s" % (atr.hex().upper(), exc))
            return
        finally:
            if connection is not None:
                connection.close()
            if psam is not None:
                psam.close()
        try:
            sink.scan(self._scan(read))
        except Exception:  # the sink is the daemon's; never let it end the reader thread
            logger.exception("%s: failed to deliver a card read", self.name)
            return
        self.last_read_ms = (time.monotonic() - seen) * 1000
        logger.info("%s: %s read in %.0f ms (%d APDUs)%s", self.name, read.kind, self.last_read_ms, read.apdus,
                    "; %s" % read.incomplete_message if read.incomplete else "")

    def _scan(self, read: cards.CardRead) -> Scan:
        profile = next(p for p in self.profiles if p.kind == read.kind)
        values, problems = cards.identity_fields(profile, read)
        problems = read.problems + problems
        fields: dict[str, Any] = dict(read.fields, atr=read.atr.hex().upper(),
                                      atr_historical=bytes(ATR(list(read.atr)).getHistoricalBytes()).hex().upper())
        if problems:
            fields["problems"] = problems
        identity = Identity(source=IdentitySource.CARD, **values) if values.get("id_number") or values.get(
            "name") else None
        partial: Reason | None = None
        if read.incomplete == "psam_required":
            partial = Reason.PSAM_REQUIRED
        elif read.incomplete:
            partial = Reason.DEVICE_ERROR
        return Scan.from_card(self.name, KINDS[read.kind], identity, fields, raw=read.atr,
                              partial=partial, partial_message=read.incomplete_message)


class _PsamSlot:
    """The PSAM's reader, connected on first use for one card read."""

    def __init__(self, context: int, find: Any, pattern: re.Pattern[str]) -> None:
        self.context = context
        self.find = find
        self.pattern = pattern
        self.connection: Connection | None = None

    def channel(self) -> cards.Channel:
        if self.connection is None:
            reader = self.find(self.context, self.pattern)
            if reader is None:
                raise cards.CardError("no PSAM reader matching %r" % self.pattern.pattern)
            try:
                self.connection = Connection(self.context, reader)
            except cards.CardRemoved:
                raise cards.CardError("no PSAM in %s" % reader) from None
        return cards.Channel(self._transmit)

    def _transmit(self, apdu: bytes) -> bytes:
        assert self.connection is not None
        try:
            return self.connection.transmit(apdu)
        except cards.CardRemoved as exc:  # the PSAM's, not the patient's card
            raise cards.CardError("PSAM: %s" % exc) from None

    def close(self) -> None:
        if self.connection is not None:
            self.connection.close()


class PcscUnavailable(Exception):
    """pcscd is not running (or cannot be reached)."""


def pcsc_readers() -> list[str]:
    """The reader names pcscd offers now; raises PcscUnavailable when pcscd cannot be reached."""
    hresult, context = scard.SCardEstablishContext(scard.SCARD_SCOPE_USER)
    if hresult != scard.SCARD_S_SUCCESS:
        raise PcscUnavailable(scard.SCardGetErrorMessage(hresult))
    try:
        hresult, readers = scard.SCardListReaders(context, [])
        if hresult == scard.SCARD_E_NO_READERS_AVAILABLE:
            return []
        if hresult != scard.SCARD_S_SUCCESS:
            raise PcscUnavailable(scard.SCardGetErrorMessage(hresult))
        return list(readers)
    finally:
        scard.SCardReleaseContext(context)


def doctor(sources: Mapping[str, Options], ctx: ProbeContext) -> list[Finding]:
    """The readers pcscd offers, which configured pcsc source (or PSAM slot) each one is,
    and the configured sources no reader matches."""
    try:
        readers = (ctx.pcsc_list or pcsc_readers)()
    except PcscUnavailable as exc:
        if not sources:
            return []  # no card reader configured: pcscd is not needed
        return [Finding("cards", "fail", "pcscd", "PC/SC is not available: %s" % exc,
                        "start pcscd: `systemctl enable --now pcscd.socket` (package pcscd)")]
    roles: dict[str, str] = {}
    out = []
    for name, opts in sources.items():
        for role, pattern in (("pcsc:%s" % name, opts.reader), ("PSAM of pcsc:%s" % name, opts.psam_reader)):
            if pattern is None:
                continue
            found = next((r for r in readers if re.search(pattern, r)), None)
            if found is None:
                out.append(Finding("cards", "fail", role, "no PC/SC reader matches %r" % pattern,
                                   "plug the reader in, or set the pattern to one of: %s"
                                   % (", ".join(repr(r) for r in readers) or "(pcscd sees no reader)")))
            else:
                roles.setdefault(found, role)
                out.append(Finding("cards", "ok", role, "reader %r" % found))
    for reader in readers:
        if reader not in roles:
            out.append(Finding("cards", "info", reader, "PC/SC reader, not configured"))
    return out

