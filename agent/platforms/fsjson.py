"""Adapter for spec 003: the Foshan electronic health card JSON interface.

Each method is `POST <endpoint>/<method>.do` with `{"appId", "app": {...}, "data": {...}}` and
answers `{"data": {"resultCode", "message", ...}}`. getWorkKey signs with the appSecret and
answers a workKey "获取一次每天" (once a day); every other method signs with the workKey, which
is never sent itself. scanbox keeps the workKey in the state directory until the day changes or
the platform answers 10105 (then one refresh for all callers, and one more try).

This platform has no verification call: `verify_qr` answers NOT_SUPPORTED and scans are
delivered raw. Card issue (syncCardInfo), bind (bindCardInfo) and the QR image (getImg) are
reachable through `call`.

Ambiguities of the spec text, and what scanbox does (each also noted where it applies):
- `md5(appId|appSecret|timestamp)`: "|" is taken as a literal separator between the values,
  and the digest as upper-case hex (the samples' signs are upper case). `sign_separator = ""`
  in [platform.fsjson] switches to plain concatenation should a site's platform want that.
- syncCardInfo's table nests peopleInfo inside cardInfo; its sample sends peopleInfo beside
  cardInfo in `data`. The sample is followed.
- `type` is "String ... 0: 动态二维码" in the tables and the number 1 in one sample: scanbox
  sends the string from config (default "0").
- getImg's sample answer has no `data` wrapper and spells the field `qRCode` (the table says
  QrCode); bindCardInfo's sample spells `" virtualCardNum "` with spaces. Answers are read with
  or without the wrapper, keys stripped, and the code is returned as `QrCode`.
"""

from __future__ import annotations

import email.utils
import hashlib
import json
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Mapping


import msgspec

from agent.codes import Outcome
from agent.codes import wondersgroup as codes
from agent.config import FsjsonConfig, PlatformConfig, SiteConfig
from agent.model import Reason, ScanboxError, UsageRecord
from agent.platforms import wondersgroup_schema as schema
from agent.platforms.base import (
    Platform,
    PlatformError,
    PlatformHealth,
    PlatformRejected,
    PlatformUnavailable,
    VerifyAnswer,
    VerifyRequest,
)
from agent.platforms.credentials import Credential, CredentialCache
from agent.platforms.transport import HttpClient, preview

logger = logging.getLogger(__name__)

# the most workKey expiries one call lives through (each refreshed once, for all callers)
MAX_KEY_REFRESHES = 3

# what each method's sign covers after appId|key|timestamp (spec 003, each method's table)
SIGNED: dict[str, tuple[str, ...]] = {
    "bindCardInfo": ("zjlx", "zjhm"),
    "syncCardInfo": ("type",),
    # getImg: ehealthCardId when given (also when both are), else virtualCardNum
    "getImg": ("ehealthCardId|virtualCardNum",),
}
OPERATIONS = tuple(SIGNED)
# the box's clock is trusted within this; beyond it the platform's Date header is used
SKEW_TOLERANCE_S = 60.0

_BIND_FIELDS: tuple[schema.Field, ...] = (
    schema.Field("type", "二维码类型", 1, True),
    schema.Field("zjlx", "证件类别", 2, True, schema.ID_TYPE, code="10134"),
    schema.Field("zjhm", "证件号码", 18, True),
    schema.Field("xm", "姓名", 32, True, code="10114"),
    schema.Field("brdh", "电话号码", 20, True, check=lambda v: v.isascii() and v.isdigit()),
    schema.Field("bindType", "绑定类型", 1, True, check=lambda v: v in ("1", "2")),
    schema.Field("bindZjlx", "绑定人证件类型", 2, True, schema.ID_TYPE, code="10134"),
    schema.Field("bindZjhm", "绑定人证件号码", 18, True),
)
_SYNC_CARD: tuple[schema.Field, ...] = (
    schema.Field("klx", "卡的类别", 1, True, schema.CARD_KIND),
    schema.Field("kh", "卡号", 18),
    schema.Field("fksj", "发卡时间", 8),
    schema.Field("orgCode", "发卡机构代码", 30, True, code="10101"),
    schema.Field("yhkh", "银行卡号", 64),
    schema.Field("isRealName", "是否实名标识", 1, True, check=lambda v: v in ("0", "1")),
)
_IMG_FIELDS: tuple[schema.Field, ...] = (
    schema.Field("type", "二维码类型", 1, True),
    schema.Field("ehealthCardId", "电子健康卡ID", 64),
    schema.Field("virtualCardNum", "虚拟卡号", 32),
)


def check_data(method: str, data: Mapping[str, Any]) -> list[schema.Problem]:
    """Problems of a method's `data` (without timestamp and sign), by spec 003's tables; the
    simulator applies the same checks on receipt."""
    if method == "bindCardInfo":
        return schema.check_fields(_BIND_FIELDS, data) + (
            [schema.Problem("zjhm", "not a valid resident ID number", "10111")]
            if data.get("zjlx") == "01" and not schema.resident_id_ok(str(data.get("zjhm", ""))) else [])
    if method == "getImg":
        problems = schema.check_fields(_IMG_FIELDS, data)
        if not data.get("ehealthCardId") and not data.get("virtualCardNum"):
            problems.append(schema.Problem("ehealthCardId/virtualCardNum", "one of them is required", "10110"))
        return problems
    if method == "syncCardInfo":
        problems = schema.check_fields((schema.Field("type", "二维码类型", 1, True),),
                                       {k: v for k, v in data.items() if k not in ("cardInfo", "peopleInfo")})
        card, people = data.get("cardInfo"), data.get("peopleInfo")
        if not isinstance(card, Mapping):
            return problems + [schema.Problem("cardInfo", "required", "10149")]
        if not isinstance(people, Mapping):
            return problems + [schema.Problem("peopleInfo", "required", "10149")]
        problems += schema.check_fields(_SYNC_CARD, card, "cardInfo.")
        problems += schema.check_people(people)
        # the table marks phone and payment 必填 too; the sample fills them
        problems += [schema.Problem("peopleInfo." + k, "required", "10110") for k in ("brdh", "ylfyzffs")
                     if not people.get(k)]
        return problems
    return [schema.Problem("method", "unknown method %r" % method, "10112")]


def sign(*parts: str, separator: str = "|") -> str:
    """md5 of the parts joined by `separator`, upper-case hex as the spec's samples."""
    return hashlib.md5(separator.join(parts).encode("utf-8")).hexdigest().upper()


def signed_values(method: str, data: Mapping[str, Any]) -> list[str]:
    out = []
    for name in SIGNED[method]:
        if name == "ehealthCardId|virtualCardNum":
            out.append(str(data.get("ehealthCardId") or data.get("virtualCardNum") or ""))
        else:
            out.append(str(data.get(name, "")))
    return out


def answer_of(body: Any) -> dict[str, Any]:
    """The answer's fields, with or without the `data` wrapper, keys stripped of stray spaces."""
    if not isinstance(body, dict):
        raise PlatformUnavailable("platform answered JSON %s, not an object" % type(body).__name__)
    inner = body.get("data")
    fields = inner if isinstance(inner, dict) and "resultCode" in inner else body
    out: dict[str, Any] = {}
    for key, value in fields.items():
        key = str(key).strip()
        out["QrCode" if key.lower() == "qrcode" else key] = value.strip() if isinstance(value, str) else value
    if "resultCode" not in out:
        raise PlatformUnavailable("platform answer has no resultCode: %s" % preview(json.dumps(body)))
    out["resultCode"] = str(out["resultCode"]).strip()
    return out


class FsjsonPlatform(Platform):
    kind = "fsjson"

    def __init__(self, config: PlatformConfig, site: SiteConfig, state_dir: Path,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__()
        self.clock = clock
        if config.fsjson is None:
            raise ValueError("platform kind fsjson needs [platform.fsjson]")
        self.fs: FsjsonConfig = config.fsjson
        self.endpoint = config.endpoint.rstrip("/")
        self.timeout_s = config.timeout_s
        self._http = HttpClient(timeout_s=config.timeout_s, tls_verify=config.tls_verify)
        # seconds to add to the box's clock: learnt from the platform's Date header when the box's
        # own clock is off (a Pi has no RTC and may sign before NTP has set it)
        self.clock_offset_s = 0.0
        self.work_key = CredentialCache(state_dir / "fsjson-workkey.json",
                                        {"endpoint": self.endpoint, "appId": self.fs.app_id},
                                        self._get_work_key, self._today, clock)

    @property
    def operations(self) -> list[str]:
        return sorted(OPERATIONS)

    async def start(self) -> None:
        if self.work_key.load() is not None:
            logger.info("platform fsjson: today's workKey from %s", self.work_key.path)
            return
        try:
            await self.work_key.get()  # today's workKey now, not at the first request
        except PlatformError as exc:
            self.record_failure(exc)
            logger.warning("platform fsjson not ready: %s (will retry when needed)", exc.message)
            return
        self._record_ok()  # the platform answered with a workKey: reachable

    async def close(self) -> None:
        await self._http.close()

    def health(self) -> PlatformHealth:
        health = super().health()
        current = self.work_key.current
        health.credential_age_s = current.age_s(self.clock()) if current is not None else None
        return health

    def now(self) -> float:
        return self.clock() + self.clock_offset_s

    def _today(self, credential: Credential) -> bool:
        """A workKey is good for the (local) day it was issued on."""
        return datetime.fromtimestamp(credential.obtained_at + self.clock_offset_s).date() == \
            datetime.fromtimestamp(self.now()).date()

    # --- the interface ---------------------------------------------------------------------

    def verify_record(self, request: VerifyRequest, scan_id: str | None = None) -> UsageRecord:
        raise ScanboxError(Reason.NOT_SUPPORTED, "platform fsjson (spec 003) has no verification call: the code "
                           "is delivered raw in scan.payload for the HIS to use")

    async def verify(self, record: UsageRecord) -> VerifyAnswer:
        raise ScanboxError(Reason.NOT_SUPPORTED, "platform fsjson (spec 003) has no verification call")

    def retime(self, record: UsageRecord, when: datetime) -> UsageRecord:
        """No message of spec 003 carries a scan's time: `timestamp` is signed at each send (by
        the platform's clock when ours is off), cardInfo.fksj is a card's issue date and csrq a
        birth date. Nothing in the values moves."""
        if record.operation not in SIGNED:
            return super().retime(record, when)
        return msgspec.structs.replace(record, created_at=when.timestamp())

    async def upload(self, record: UsageRecord) -> tuple[str | None, str | None]:
        if record.operation not in SIGNED:
            raise ScanboxError(Reason.BAD_REQUEST, "platform fsjson cannot send %r" % record.operation)
        answer = await self.request(record.operation, record.values)
        return answer.get("resultCode"), answer.get("message")

    async def call(self, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        if operation not in SIGNED:
            raise ScanboxError(Reason.BAD_REQUEST, "unknown operation %r; fsjson offers %s"
                               % (operation, ", ".join(self.operations)))
        data = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in params.items()}
        data.setdefault("type", self.fs.qr_type)
        if operation == "syncCardInfo":
            card = data.setdefault("cardInfo", {})
            if isinstance(card, dict):
                card.setdefault("klx", "3")
            people = data.get("peopleInfo")
            if isinstance(people, dict) and isinstance(people.get("csrq"), str):
                people["csrq"] = schema.birth_date(people["csrq"]) or people["csrq"]
        answer = await self.request(operation, data)
        return {"resultCode": answer["resultCode"], "message": answer.get("message"),
                "data": {k: v for k, v in answer.items() if k not in ("resultCode", "message")}}

    async def request(self, method: str, data: Mapping[str, Any]) -> dict[str, Any]:
        """One signed call; its answer's fields. Raises ScanboxError(BAD_REQUEST) before
        sending, PlatformUnavailable, or PlatformRejected."""
        problems = check_data(method, data)
        if problems:
            raise ScanboxError(Reason.BAD_REQUEST, "%s not sent: %s" % (method, "; ".join(map(str, problems))),
                               data={"problems": [{"field": p.field, "text": p.text} for p in problems]})
        started = time.monotonic()
        try:
            key = await self.work_key.get()
            answer, skewed = await self._signed(method, data, key)
            if skewed and answer["resultCode"] != codes.SUCCESS:
                # signed with a time our clock got wrong: once more with the platform's time
                answer, _ = await self._signed(method, data, key)
            # a new day at the platform or a revoked key: one fresh workKey, shared with every
            # caller that heard the same, and one more try. A key another caller fetched that
            # expired since (a second expiry within a burst) is refreshed too; a key fetched
            # for this call and refused at once is an auth error
            fresh, refreshes = False, 0
            while answer["resultCode"] == codes.AUTH_EXPIRED and not fresh and refreshes < MAX_KEY_REFRESHES:
                refreshes += 1
                logger.info("%s answered 10105; refreshing the workKey and sending again", method)
                key, fresh = await self.work_key.renew(stale=key)
                answer, _ = await self._signed(method, data, key)
            self._check(answer)
        except PlatformError as exc:
            self.record_failure(exc)
            self.exchanged(method, started, None, exc)
            logger.info("%s failed after %.0f ms: %s", method, (time.monotonic() - started) * 1000, exc.message)
            raise
        self._record_ok()
        self.exchanged(method, started, answer.get("resultCode"), None)
        return answer

    async def _signed(self, method: str, data: Mapping[str, Any], key: str) -> tuple[dict[str, Any], bool]:
        timestamp = str(int(self.now() * 1000))
        payload = {**data, "timestamp": timestamp,
                   "sign": sign(self.fs.app_id, key, timestamp, *signed_values(method, data),
                                separator=self.fs.sign_separator)}
        return await self._post(method, payload)

    async def _get_work_key(self) -> str:
        answer, skewed = await self._ask_work_key()
        if skewed and answer["resultCode"] != codes.SUCCESS:
            answer, _ = await self._ask_work_key()  # now with the platform's time
        self._check(answer)
        key = answer.get("workKey")
        if not isinstance(key, str) or not key:
            raise PlatformUnavailable("getWorkKey answered %s without a workKey" % answer["resultCode"])
        logger.info("platform fsjson: new workKey for app %s", self.fs.app_id)
        return key

    async def _ask_work_key(self) -> tuple[dict[str, Any], bool]:
        timestamp = str(int(self.now() * 1000))
        return await self._post("getWorkKey", {
            "timestamp": timestamp,
            "sign": sign(self.fs.app_id, self.fs.app_secret.get_secret_value(), timestamp,
                         separator=self.fs.sign_separator)})

    async def _post(self, method: str, data: Mapping[str, Any]) -> tuple[dict[str, Any], bool]:
        """POST one method; (its answer, whether the platform's clock showed ours was off)."""
        body = {"appId": self.fs.app_id, "data": data, "app": {
            "termId": self.fs.term_id, "version": self.fs.version, "appVersion": self.fs.app_version,
            "appPackageName": self.fs.app_package_name, "digestType": self.fs.digest_type,
            "encType": self.fs.enc_type}}
        url = "%s/%s.do" % (self.endpoint, method)
        response = await self._http.post(url, json.dumps(body, ensure_ascii=False).encode("utf-8"),
                                         {"Content-Type": "application/json; charset=utf-8"})
        skewed = self._learn_clock(response.headers.get("Date"))
        text = response.text()  # by the Content-Type charset: a platform answering GBK is read right
        if response.status >= 500:
            raise PlatformUnavailable("platform answered HTTP %d: %s" % (response.status, preview(text) or "(empty)"))
        try:
            parsed = json.loads(text)
        except ValueError:
            raise PlatformUnavailable("platform answered HTTP %d, %s, not JSON: %s" % (
                response.status, response.content_type or "no content type", preview(text) or "(empty)")) from None
        return answer_of(parsed), skewed

    def _learn_clock(self, date_header: str | None) -> bool:
        """Follow the platform's clock when ours is off by more than SKEW_TOLERANCE_S; whether
        the offset changed (a request signed before this was signed with the wrong time)."""
        if not date_header:
            return False
        try:
            platform_time = email.utils.parsedate_to_datetime(date_header).timestamp()
        except (TypeError, ValueError):
            return False
        skew = platform_time - self.clock()
        offset = skew if abs(skew) > SKEW_TOLERANCE_S else 0.0
        changed = abs(offset - self.clock_offset_s) > SKEW_TOLERANCE_S
        if changed:
            logger.warning("this box's clock is %+.0f s off the platform's; signing with the platform's time", skew)
        self.clock_offset_s = offset
        return changed

    def _check(self, answer: Mapping[str, Any]) -> None:
        rc = codes.FSJSON_RETURN_CODES.lookup(answer.get("resultCode"))
        if rc.outcome is Outcome.SUCCESS:
            return
        message = answer.get("message") or rc.text
        if rc.outcome is Outcome.TRANSIENT:
            raise PlatformUnavailable("platform failed: %s %s" % (rc.code, message), platform_code=rc.code,
                                      platform_message=message)
        raise PlatformRejected(rc, message)
