"""The types that flow through scanbox: Scan -> Verification + Identity -> Result.

Drivers may import this module (and only this one from `agent`): it has no dependencies on the
rest of the daemon.
"""

from __future__ import annotations

import enum
import functools
import itertools
import math
import os
import time
from datetime import datetime, timezone
from typing import Any, Mapping, Protocol

import msgspec


class Reason(enum.StrEnum):
    """Every failure a HIS can see carries one of these stable codes (PROTOCOL.md "Errors")."""

    QR_INVALID = "QR_INVALID"
    QR_EXPIRED = "QR_EXPIRED"
    QR_UNKNOWN = "QR_UNKNOWN"
    CARD_NOT_FOUND = "CARD_NOT_FOUND"
    CARD_INACTIVE = "CARD_INACTIVE"
    PLATFORM_UNAVAILABLE = "PLATFORM_UNAVAILABLE"
    PLATFORM_REJECTED = "PLATFORM_REJECTED"
    PLATFORM_AUTH = "PLATFORM_AUTH"
    NOT_SUPPORTED = "NOT_SUPPORTED"
    DEVICE_ERROR = "DEVICE_ERROR"
    TIMEOUT = "TIMEOUT"
    BUSY = "BUSY"
    UNAUTHORIZED = "UNAUTHORIZED"
    BAD_REQUEST = "BAD_REQUEST"
    INTERNAL = "INTERNAL"
    PSAM_REQUIRED = "PSAM_REQUIRED"

    @property
    def description(self) -> str:
        return REASON_DESCRIPTIONS[self][0]

    @property
    def patient_text(self) -> str:
        """Short Chinese text a patient understands (display, kiosk prompts)."""
        return REASON_DESCRIPTIONS[self][1]


# reason -> (meaning for a HIS developer, short text for a patient)
REASON_DESCRIPTIONS: Mapping[Reason, tuple[str, str]] = {
    Reason.QR_INVALID: ("not a valid e-health card code, or the platform says it is wrong", "二维码无效"),
    Reason.QR_EXPIRED: ("the dynamic code has expired; the patient must refresh it", "二维码已过期，请刷新"),
    Reason.QR_UNKNOWN: ("a code this box does not verify; delivered raw in scan.payload", "无法识别的二维码"),
    Reason.CARD_NOT_FOUND: ("the platform has no registered card for this code", "未查到健康卡信息"),
    Reason.CARD_INACTIVE: ("the card exists but is cancelled, pending review or not approved", "健康卡状态异常"),
    Reason.PLATFORM_UNAVAILABLE: ("the platform cannot be reached or failed; try again later", "平台暂不可用"),
    Reason.PLATFORM_REJECTED: ("the platform refused the request; see platform_code", "平台拒绝请求"),
    Reason.PLATFORM_AUTH: ("the platform rejected this box's credentials; check the configuration", "设备认证失败"),
    Reason.NOT_SUPPORTED: ("the configured platform or device cannot do this", "不支持此操作"),
    Reason.DEVICE_ERROR: ("a reader or scanner failed", "设备故障"),
    Reason.TIMEOUT: ("nothing arrived before the deadline", "等待超时"),
    Reason.BUSY: ("another call is in progress and this one cannot run concurrently", "设备忙"),
    Reason.UNAUTHORIZED: ("authenticate first (auth with a token)", "未授权"),
    Reason.BAD_REQUEST: ("the request is malformed; see the message", "请求错误"),
    Reason.INTERNAL: ("a fault inside scanbox; it has been logged", "内部错误"),
    Reason.PSAM_REQUIRED: ("the card's personal data needs authentication through a PSAM, and this box has "
                           "none configured; scan.payload holds what the card let us read", "本机暂不能读取此卡"),
}


class ScanboxError(Exception):
    """A failure with a stable reason; the API turns it into a JSON-RPC error object."""

    def __init__(
        self,
        reason: Reason,
        message: str,
        *,
        platform_code: str | None = None,
        platform_message: str | None = None,
        data: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message
        self.platform_code = platform_code
        self.platform_message = platform_message
        self.data = dict(data or {})

    def to_data(self) -> dict[str, Any]:
        out: dict[str, Any] = {"reason": self.reason.value}
        if self.platform_code is not None:
            out["platform_code"] = self.platform_code
        if self.platform_message is not None:
            out["platform_message"] = self.platform_message
        out.update(self.data)
        return out


class ScanKind(enum.StrEnum):
    QR = "qr"
    ID_CARD = "id_card"
    HEALTH_CARD = "health_card"
    SSC = "ssc"


_scan_counter = itertools.count(1)
# scan ids are unique across restarts without coordination: boot-unique prefix + counter
_SCAN_PREFIX = "%x" % (int(time.time()) & 0xFFFFFFF)


def new_scan_id() -> str:
    return "%s-%d" % (_SCAN_PREFIX, next(_scan_counter))


def now_local() -> datetime:
    # from UTC: one conversion to local time, where now().astimezone() made two
    return datetime.now(timezone.utc).astimezone()


class Scan(msgspec.Struct, frozen=True):
    """One reading from one source: a QR code or a card.

    `payload` is the QR text for `qr` (decoded with the source's charset) and the card's fields
    for cards (a JSON-able dict). `raw` keeps the bytes as they came from the device. `decode_error`
    says why the bytes could not be decoded; the scan is still delivered so nothing a patient
    shows is lost. A card reader also fills `identity` (source `card`): a card needs no platform
    to say who it belongs to. Payload, raw bytes and identity are personal data and stay out of
    the repr.
    """

    source: str
    kind: ScanKind
    payload: Any
    raw: bytes | None = None
    decode_error: str | None = None
    identity: "Identity | None" = None
    id: str = msgspec.field(default_factory=new_scan_id)
    at: datetime = msgspec.field(default_factory=now_local)
    monotonic: float = msgspec.field(default_factory=time.monotonic)
    # a card read that could not get everything (PSAM_REQUIRED, DEVICE_ERROR): the verifier
    # answers this reason, with whatever the card let us read in payload
    partial: "Reason | None" = None
    partial_message: str | None = None

    @classmethod
    def from_qr_bytes(cls, source: str, data: bytes, charset: str = "utf-8") -> "Scan":
        try:
            text = data.decode(charset)
        except UnicodeDecodeError as exc:
            return cls(
                source=source,
                kind=ScanKind.QR,
                payload=data.decode(charset, errors="backslashreplace"),
                raw=data,
                decode_error="not valid %s: byte 0x%02x at offset %d"
                % (charset, data[exc.start], exc.start),
            )
        except LookupError as exc:
            raise ValueError("unknown charset %r" % charset) from exc
        return cls(source=source, kind=ScanKind.QR, payload=text, raw=data)

    @classmethod
    def from_card(cls, source: str, kind: ScanKind, identity: "Identity | None", fields: Mapping[str, Any],
                  raw: bytes | None = None, *, partial: "Reason | None" = None,
                  partial_message: str | None = None) -> "Scan":
        """A card read: `fields` as the card holds them (JSON-able), `identity` mapped from them.
        `partial`: why the read is incomplete (identity may then be None)."""
        if kind is ScanKind.QR:
            raise ValueError("a card scan needs a card kind, not qr")
        return cls(source=source, kind=kind, payload=dict(fields), raw=raw, identity=identity,
                   partial=partial, partial_message=partial_message)

    def __repr__(self) -> str:
        # payload, raw and identity are personal data: never in a repr (a log line, a traceback)
        return "Scan(id=%r, source=%r, kind=%s, at=%s, decode_error=%r, partial=%s)" % (
            self.id, self.source, self.kind.value, self.at.isoformat(timespec="milliseconds"), self.decode_error,
            self.partial.value if self.partial is not None else None)

    def to_json(self) -> dict[str, Any]:
        out = {
            "id": self.id,
            "source": self.source,
            "kind": self.kind.value,
            "at": self.at.isoformat(timespec="milliseconds"),
            "payload": self.payload,
        }
        if self.partial is not None:  # a card read that could not get everything
            out["partial"] = {"reason": self.partial.value, "message": self.partial_message}
        return out


class IdentitySource(enum.StrEnum):
    PLATFORM = "platform"
    CACHE = "cache"
    CARD = "card"


IDENTITY_FIELDS = (
    "name", "sex", "nation", "birthday", "id_type", "id_number", "ecard_id", "main_index",
    "phone", "address", "card_status", "age", "clinic_time",
)


@functools.cache
def _code_tables() -> Any:
    """The specs' code tables: data, loaded on first use to keep this module light (an import
    statement per use looked the package up each time)."""
    from agent.codes import qwb002

    return qwb002


class Identity(msgspec.Struct, frozen=True):
    """A verified person. Personal data: never logged unmasked (repr is masked)."""

    source: IdentitySource
    name: str | None = None
    sex: str | None = None
    nation: str | None = None
    birthday: str | None = None
    id_type: str | None = None
    id_number: str | None = None
    ecard_id: str | None = None
    main_index: str | None = None
    phone: str | None = None
    address: str | None = None
    card_status: str | None = None
    # a temporary card (spec 000 3.13) carries no birthday or id: the age given when it was
    # issued, and the visit it was issued for ("yyyy-MM-dd HH:mm:ss", the platform's text)
    age: str | None = None
    clinic_time: str | None = None

    def to_json(self) -> dict[str, Any]:
        qwb002 = _code_tables()
        return {  # IDENTITY_FIELDS, in order, then the source and the codes' names
            "name": self.name, "sex": self.sex, "nation": self.nation, "birthday": self.birthday,
            "id_type": self.id_type, "id_number": self.id_number, "ecard_id": self.ecard_id,
            "main_index": self.main_index, "phone": self.phone, "address": self.address,
            "card_status": self.card_status, "age": self.age, "clinic_time": self.clinic_time,
            "source": self.source.value,
            "sex_text": qwb002.SEX.text(self.sex),
            "nation_text": qwb002.NATION.text(self.nation),
            "id_type_text": qwb002.ID_TYPE.text(self.id_type),
            "card_status_text": qwb002.CARD_STATUS.text(self.card_status),
        }

    def __repr__(self) -> str:
        from agent.privacy import mask_id_number, mask_name

        return "Identity(%s, %s, source=%s)" % (
            mask_name(self.name), mask_id_number(self.id_number), self.source.value)


class Verification(msgspec.Struct, frozen=True):
    """The outcome of checking a scan. `ok` false always has a reason."""

    ok: bool
    reason: Reason | None = None
    message: str | None = None
    platform_code: str | None = None
    platform_message: str | None = None
    elapsed_ms: float = 0.0
    offline: bool = False
    # the msgGuid under which the platform has (or, from the outbox, will have) this use
    msg_guid: str | None = None

    @classmethod
    def failed(cls, error: ScanboxError, elapsed_ms: float = 0.0, offline: bool = False,
               msg_guid: str | None = None) -> "Verification":
        return cls(
            ok=False,
            reason=error.reason,
            message=error.message,
            platform_code=error.platform_code,
            platform_message=error.platform_message,
            elapsed_ms=elapsed_ms,
            offline=offline,
            msg_guid=msg_guid,
        )

    def to_json(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "reason": self.reason.value if self.reason else None,
            "message": self.message,
            "platform_code": self.platform_code,
            "platform_message": self.platform_message,
            "elapsed_ms": round(self.elapsed_ms, 1),
            "offline": self.offline,
            "msg_guid": self.msg_guid,
        }


class UsageRecord(msgspec.Struct, frozen=True):
    """A message that records a use of a card at the platform (a verification that carries the
    scan's time and place, or a physical card's use record). `guid` is its msgGuid, the
    platform's idempotency key: fixed when the record is made and kept through every retry."""

    guid: str
    operation: str
    values: Mapping[str, str]
    scan_id: str | None = None
    created_at: float = msgspec.field(default_factory=time.time)


class Result(msgspec.Struct, frozen=True):
    """What read_card and verify_qr answer: the scan always, identity when known."""

    scan: Scan
    identity: Identity | None
    verification: Verification | None

    def to_json(self) -> dict[str, Any]:
        return {
            "scan": self.scan.to_json(),
            "identity": self.identity.to_json() if self.identity else None,
            "verification": self.verification.to_json() if self.verification else None,
        }

    def replace(self, **changes: Any) -> "Result":
        return msgspec.structs.replace(self, **changes)


class Alarm(msgspec.Struct, frozen=True):
    """Something wrong that a technician should see in `status` (docs/api.md "Alarms"):
    a stable code, the part it concerns, and what to know."""

    code: str
    source: str
    text: str

    def to_json(self) -> dict[str, Any]:
        return {"code": self.code, "source": self.source, "text": self.text}


class ComponentStatus(msgspec.Struct, frozen=True):
    """A component's answer to "how are you": its part of `status`, and what is wrong."""

    status: Any  # JSON: the value `status` shows under the component's name
    alarms: list[Alarm] = msgspec.field(default_factory=list)


class Component(Protocol):
    """A part of the box that reports its own health (STYLE.md item 11, Klipper's
    `get_status`): sources, the platform adapter, the outbox and its uploader, the display,
    the API listeners, the clock, the supervisor. `status`, sd_notify STATUS, the display and
    `doctor` only collect. `name` is the key its status goes under."""

    name: str

    async def get_status(self) -> ComponentStatus: ...


def device_id_default() -> str:
    """A stable id for a box that was not given one: the machine id, shortened."""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            with open(path, encoding="ascii") as fh:
                mid = fh.read().strip()
            if mid:
                return "scanbox-" + mid[:8]
        except OSError:
            continue
    return "scanbox-" + os.uname().nodename


def local_iso(ts: float) -> str:
    """A wall time as the box's local ISO 8601 to the second (`2026-11-30T15:02:53+08:00`), as
    `status` and the logs show times."""
    return _local_iso_second(math.floor(ts))


@functools.lru_cache(maxsize=64)
def _local_iso_second(second: int) -> str:
    # one conversion per second, not per use: `status` shows three times, and a conversion to
    # local time (glibc re-reads the zone, datetime converts twice) cost a tenth of a status call;
    # the zone is read again for every new second
    return datetime.fromtimestamp(second, timezone.utc).astimezone().isoformat(timespec="seconds")
