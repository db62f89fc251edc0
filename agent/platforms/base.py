"""What every platform adapter offers the daemon: verify a QR code, call a named business
operation, and report its health. Failures are PlatformErrors that say whether trying again
later can help (`transient`) — the return-code tables decide, not the call site."""

from __future__ import annotations

import abc
import time
from datetime import datetime
from typing import Any, Callable, Mapping

import msgspec

from agent.codes import Outcome, ReturnCode
from agent.model import Alarm, ComponentStatus, Identity, Reason, Scan, ScanboxError, UsageRecord, local_iso
from agent.qr import QrKind


class PlatformError(ScanboxError):
    transient: bool = False


class PlatformUnavailable(PlatformError):
    """The platform could not be asked or did not answer usefully: connect error, timeout,
    HTTP 5xx, an unparsable reply, or its own internal failure. Retrying later can help."""

    transient = True

    def __init__(self, message: str, *, platform_code: str | None = None,
                 platform_message: str | None = None) -> None:
        super().__init__(Reason.PLATFORM_UNAVAILABLE, message, platform_code=platform_code,
                         platform_message=platform_message)


class PlatformRejected(PlatformError):
    """The platform answered and said no. Asking again with the same request changes nothing
    (until, for PLATFORM_AUTH, the box's credentials are fixed)."""

    def __init__(self, code: ReturnCode, platform_message: str | None) -> None:
        super().__init__(code.reason or Reason.PLATFORM_REJECTED,
                         "platform answered %s %s" % (code.code, platform_message or code.text),
                         platform_code=code.code, platform_message=platform_message or code.text)
        self.outcome = code.outcome


class VerifyRequest(msgspec.Struct, frozen=True):
    """One QR verification, with where and when it happened (the platform records the use)."""

    qr: str
    kind: QrKind
    scanned_at: datetime
    step: str
    channel: str


class VerifyAnswer(msgspec.Struct, frozen=True):
    identity: Identity
    platform_code: str | None
    platform_message: str | None
    # what the platform says the code was: True a static (reusable) code, whose identity may
    # answer it offline later; False a dynamic one; None when the reply does not say
    static: bool | None = None


class PlatformHealth(msgspec.Struct):
    kind: str
    reachable: bool | None = None  # None: not asked yet
    last_ok_at: float | None = None  # wall time of the last answer
    last_error: str | None = None
    credential_age_s: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "reachable": self.reachable,
            "last_ok_at": local_iso(self.last_ok_at) if self.last_ok_at else None,
            "last_error": self.last_error,
            "credential_age_s": round(self.credential_age_s) if self.credential_age_s is not None else None,
        }


class Exchange(msgspec.Struct, frozen=True):
    """One business call and its answer, as the metrics see it: no values, only what was asked,
    how long it took and what came back."""

    operation: str
    seconds: float
    code: str | None  # the platform's return code; None when it gave none (no answer)
    outcome: str  # "ok", "rejected" or "unavailable"


class Platform(abc.ABC):
    kind: str

    def __init__(self) -> None:
        self._health = PlatformHealth(self.kind)
        # told of every business call each adapter's one request path makes (GET /metrics)
        self.observers: list[Callable[[Exchange], None]] = []

    def exchanged(self, operation: str, started: float, code: str | None, error: PlatformError | None) -> None:
        """An adapter's request path reports one call (`started` from time.monotonic())."""
        if not self.observers:  # a box without metrics: nobody to tell
            return
        if error is None:
            outcome = "ok"
        else:
            outcome = "unavailable" if error.transient else "rejected"
            code = code if code is not None else error.platform_code
        exchange = Exchange(operation, time.monotonic() - started, code, outcome)
        for observer in self.observers:
            observer(exchange)

    @abc.abstractmethod
    async def start(self) -> None:
        """Prepare (load the WSDL, cached credentials). Never fails because the platform is
        unreachable: the box must start and serve offline."""

    @abc.abstractmethod
    async def close(self) -> None: ...

    @abc.abstractmethod
    def verify_record(self, request: VerifyRequest, scan_id: str | None = None) -> UsageRecord:
        """The message that verifies this scan and records its use, with a fresh msgGuid.
        Raises ScanboxError(NOT_SUPPORTED) where the platform has no verification."""

    @abc.abstractmethod
    async def verify(self, record: UsageRecord) -> VerifyAnswer:
        """Send a verify record now; raises PlatformError."""

    async def verify_qr(self, request: VerifyRequest) -> VerifyAnswer:
        return await self.verify(self.verify_record(request))

    def card_use_record(self, scan: Scan, step: str, channel: str) -> UsageRecord | None:
        """The record of a physical card's use this platform keeps (with a fresh msgGuid), for
        the outbox; None where it keeps none. Raises ScanboxError(BAD_REQUEST) when the scan
        lacks what the record needs."""
        return None

    def retime(self, record: UsageRecord, when: datetime) -> UsageRecord:
        """The record as it would have been made at `when`, its scan's true time (found once the
        clock was right, for a record made while it was not): every field that carries the
        time of the use re-rendered in the platform's format, created_at `when`, nothing else
        changed (birth dates, issue dates and the like are not the scan's). Raises
        ScanboxError(NOT_SUPPORTED) for an operation the adapter does not know."""
        raise ScanboxError(Reason.NOT_SUPPORTED, "platform %s cannot re-time a %s record"
                           % (self.kind, record.operation))

    @abc.abstractmethod
    async def upload(self, record: UsageRecord) -> tuple[str | None, str | None]:
        """Send a record from the outbox (under its own msgGuid); the platform's code and
        message. Raises PlatformError; ScanboxError(BAD_REQUEST) when it cannot be sent at all."""

    @abc.abstractmethod
    async def call(self, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """A named business operation with the box's credentials; the platform's answer as data."""

    @property
    @abc.abstractmethod
    def operations(self) -> list[str]: ...

    def health(self) -> PlatformHealth:
        return self._health

    name = "platform"

    async def get_status(self) -> ComponentStatus:
        health = self.health()
        alarms = []
        if health.reachable is False:
            alarms.append(Alarm("PLATFORM_UNREACHABLE", health.kind, health.last_error or "unreachable"))
        elif health.last_error:
            alarms.append(Alarm("PLATFORM_ERROR", health.kind, health.last_error))
        return ComponentStatus(health.to_json(), alarms)

    def _record_ok(self) -> None:
        self._health.reachable = True
        self._health.last_ok_at = time.time()
        self._health.last_error = None

    def record_failure(self, error: PlatformError) -> None:
        """What `health()` says after a failed call (also one given up on by its caller)."""
        if error.transient:
            self._health.reachable = False
            self._health.last_error = error.message
        else:
            # it answered: reachable, even though it said no
            self._record_ok()
            if isinstance(error, PlatformRejected) and error.outcome is Outcome.AUTH:
                self._health.last_error = error.message
