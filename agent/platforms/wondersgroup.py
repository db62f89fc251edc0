"""Adapter for spec 001: the wondersgroup healthCardService (the web service behind WSCallDLL.dll).

A JAX-WS SOAP service with one operation per business function. Every call carries orgCode and
an authKey from getAuthKey(orgCode, userName, passWord); the authKey is kept in the state
directory and reused across restarts until a call answers 10105 (认证字符串失效): then it is
refreshed once, by one caller for all (see `credentials`), and the call is sent once more.

verify = virIdCardVerify with useCardInfo; syncCardInfo (issue an electronic card, klx=3),
updateCardInfo and downQr are reachable through `call`.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping


import msgspec

from agent.codes import Outcome
from agent.codes import wondersgroup as codes
from agent.config import PlatformConfig, SiteConfig, WondersgroupConfig
from agent.model import Identity, IdentitySource, Reason, ScanboxError, UsageRecord
from agent.platforms import wsdl
from agent.platforms import wondersgroup_schema as schema
from agent.platforms.base import (Platform, PlatformError, PlatformHealth, PlatformRejected, PlatformUnavailable,
                                  VerifyAnswer, VerifyRequest)
from agent.platforms.credentials import CredentialCache
from agent.platforms.soapservice import SoapService, element_data
from agent.platforms.transport import HttpClient

logger = logging.getLogger(__name__)

# the most expiries one call lives through (each refreshed once, for all callers), so a platform
# that expires every key it hands out is answered PLATFORM_AUTH, not asked forever
MAX_AUTH_REFRESHES = 3

VERIFY = "virIdCardVerify"
OPERATIONS = tuple(schema.OPERATIONS)


def use_card_info(config: WondersgroupConfig, step: str, channel: str) -> dict[str, str]:
    """useCardInfo: the box's own fields from config; the step and channel of this use (the
    caller's, else the site's). The HIS API speaks spec 000's channel codes (01 人工窗口, 02 自助机);
    spec 001's terminalType is the same code without the leading zero."""
    return {"issuingMode": config.issuing_mode, "depCode": config.dep_code, "depType": config.dep_type,
            "machineCode": config.machine_code, "medStepcode": step, "medType": config.med_type,
            "terminalType": channel.lstrip("0") or channel}


def identity_from(result: Mapping[str, Any], source: IdentitySource = IdentitySource.PLATFORM) -> Identity:
    """scanbox's identity from virIdCardVerify's `return`: peopleInfo plus the card's ids."""
    people = result.get("peopleInfo")
    people = people if isinstance(people, Mapping) else {}

    def get(data: Mapping[str, Any], key: str) -> str | None:
        value = data.get(key)
        return value.strip() if isinstance(value, str) and value.strip() else None

    birthday = get(people, "csrq")
    address = "".join(part for key in ("dzsf", "dzs", "dzqx", "dzxz", "dzc") if (part := get(people, key)))
    return Identity(
        source=source,
        name=get(people, "xm"),
        sex=get(people, "xb"),
        nation=get(people, "mzdm"),
        birthday=(schema.birth_date(birthday) or birthday) if birthday else None,
        id_type=get(people, "zjlx") or ("01" if get(people, "sfzhm") else None),
        id_number=get(people, "zjhm") or get(people, "sfzhm"),
        # vuid is "电子健康卡ID", the card's id on this platform; empi the person's master index
        ecard_id=get(result, "vuid"),
        main_index=get(result, "empi"),
        phone=get(people, "brdh"),
        address=address or get(people, "domicile"),
        card_status=None,  # virIdCardVerify answers only for cards in use; 1010/1020/1040 otherwise
    )


class WondersgroupPlatform(Platform):
    kind = "wondersgroup"

    def __init__(self, config: PlatformConfig, site: SiteConfig, state_dir: Path) -> None:
        super().__init__()
        if config.wondersgroup is None:
            raise ValueError("platform kind wondersgroup needs [platform.wondersgroup]")
        self.wg = config.wondersgroup
        self.site = site
        self.endpoint = config.endpoint
        self._http = HttpClient(timeout_s=config.timeout_s, tls_verify=config.tls_verify)
        self.service = SoapService("wondersgroup", wsdl.WsdlSource(config.wsdl, "wondersgroup.wsdl"),
                                   state_dir / "wsdl" / "wondersgroup", self._http, config.endpoint,
                                   config.timeout_s, ("getAuthKey", *OPERATIONS))
        # the authKey belongs to this account at this platform; a changed config fetches a new one
        self.auth = CredentialCache(state_dir / "wondersgroup-authkey.json",
                                    {"endpoint": config.endpoint, "orgCode": self.wg.org_code,
                                     "userName": self.wg.user_name},
                                    self._get_auth_key)

    @property
    def operations(self) -> list[str]:
        return sorted(OPERATIONS)

    async def start(self) -> None:
        if self.auth.load() is not None:
            logger.info("platform wondersgroup: authKey from %s (%.0f s old)", self.auth.path,
                        self.auth.current.age_s() if self.auth.current else 0)
        refreshes = self.auth.refreshes
        try:
            await self.service.bound()
            # an authKey now, so the first scan at the counter costs one round trip, not two
            await self.auth.get()
        except PlatformError as exc:
            self.record_failure(exc)
            logger.warning("platform wondersgroup not ready: %s (will retry when needed)", exc.message)
            return
        if self.auth.refreshes > refreshes:
            self._record_ok()  # getAuthKey answered: the platform is reachable

    async def close(self) -> None:
        await self._http.close()

    def health(self) -> PlatformHealth:
        health = super().health()
        current = self.auth.current
        health.credential_age_s = current.age_s() if current is not None else None
        return health

    # --- the business operations ---------------------------------------------------------

    def verify_record(self, request: VerifyRequest, scan_id: str | None = None) -> UsageRecord:
        """virIdCardVerify records where the code was used (useCardInfo), so the verification is
        the platform's use record."""
        info = use_card_info(self.wg, request.step, request.channel)
        problems = schema.check_fields(schema.USE_CARD_INFO, info, "useCardInfo.")
        if problems:
            raise ScanboxError(Reason.BAD_REQUEST, "virIdCardVerify not sent: %s" % "; ".join(map(str, problems)))
        values = {"qrCode": request.qr, **{"useCardInfo." + k: v for k, v in info.items()}}
        return UsageRecord(uuid.uuid4().hex, VERIFY, values, scan_id)

    def retime(self, record: UsageRecord, when: datetime) -> UsageRecord:
        """virIdCardVerify, the one record the outbox holds here, carries no time (useCardInfo,
        6.3: where, not when; the platform files the use when it arrives), nor does any other
        operation's message carry the scan's: fksj is a card's issue date, csrq a birth date.
        Nothing in the values moves."""
        if record.operation not in schema.OPERATIONS:
            return super().retime(record, when)
        return msgspec.structs.replace(record, created_at=when.timestamp())

    async def verify(self, record: UsageRecord) -> VerifyAnswer:
        result = await self.request(VERIFY, _unflatten(record.values))
        return VerifyAnswer(identity_from(result), result.get("resultCode"), result.get("message"))

    async def upload(self, record: UsageRecord) -> tuple[str | None, str | None]:
        if record.operation not in schema.OPERATIONS:
            raise ScanboxError(Reason.BAD_REQUEST, "unknown operation %r" % record.operation)
        result = await self.request(record.operation, _unflatten(record.values))
        return result.get("resultCode"), result.get("message")

    async def call(self, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        if operation not in schema.OPERATIONS:
            raise ScanboxError(Reason.BAD_REQUEST, "unknown operation %r; wondersgroup offers %s"
                               % (operation, ", ".join(self.operations)))
        values = self._with_defaults(operation, params)
        result = await self.request(operation, values)
        data = {k: v for k, v in result.items() if k not in ("resultCode", "message")}
        if operation == "syncCardInfo":
            data.update(_sync_message(result.get("message")))
        return {"resultCode": result.get("resultCode"), "message": result.get("message"), "data": data}

    def _with_defaults(self, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        """What the box knows fills what the caller left out: useCardInfo from config, the
        issuing organisation and date for a new card. Birth dates go as YYYYMMDD."""
        values = {k: (dict(v) if isinstance(v, Mapping) else v) for k, v in params.items()}
        if operation == VERIFY:
            given = values.get("useCardInfo")
            values["useCardInfo"] = {**use_card_info(self.wg, self.site.medstep, self.site.channel),
                                     **(given if isinstance(given, dict) else {})}
        elif operation == "syncCardInfo" and isinstance(values.get("cardInfo"), dict):
            card = values["cardInfo"]
            card.setdefault("klx", "3")
            card.setdefault("orgCode", self.wg.org_code)
            card.setdefault("fksj", datetime.now().strftime("%Y%m%d"))
            card.setdefault("issuingMode", "2")  # 医院现场发卡: a box at a hospital counter
            if isinstance(card.get("peopleInfo"), Mapping):
                card["peopleInfo"] = _normalise_people(card["peopleInfo"])
        elif operation == "updateCardInfo" and isinstance(values.get("peopleInfo"), Mapping):
            values["peopleInfo"] = _normalise_people(values["peopleInfo"])
        return values

    async def request(self, operation: str, values: Mapping[str, Any]) -> dict[str, Any]:
        """Send one business call with orgCode and the authKey; its `return` as data.

        Raises ScanboxError(BAD_REQUEST) before sending when the parameters do not meet the
        spec, PlatformUnavailable when the platform cannot answer, PlatformRejected when it
        answers no."""
        problems = schema.check_operation(schema.OPERATIONS[operation], values)
        if problems:
            raise ScanboxError(Reason.BAD_REQUEST, "%s not sent: %s" % (operation, "; ".join(map(str, problems))),
                               data={"problems": [{"field": p.field, "text": p.text} for p in problems]})
        started = time.monotonic()
        try:
            key, fresh = await self.auth.get(), False
            result = await self._send(operation, {"orgCode": self.wg.org_code, "authKey": key, **values})
            # the authKey expired (or was revoked): one fresh key, shared with every caller that
            # heard the same, and one more try. In a burst the key handed over may be one
            # another caller fetched and that expired since (a second expiry): that one is
            # refreshed too. A key fetched for this call and refused at once is PLATFORM_AUTH.
            refreshes = 0
            while result.get("resultCode") == codes.AUTH_EXPIRED and not fresh and refreshes < MAX_AUTH_REFRESHES:
                refreshes += 1
                logger.info("%s: authKey expired (10105); refreshing it and sending again", operation)
                key, fresh = await self.auth.renew(stale=key)
                result = await self._send(operation, {"orgCode": self.wg.org_code, "authKey": key, **values})
            self._check(operation, result)
        except PlatformError as exc:
            self.record_failure(exc)
            self.exchanged(operation, started, None, exc)
            logger.info("%s failed after %.0f ms: %s", operation, (time.monotonic() - started) * 1000, exc.message)
            raise
        self._record_ok()
        self.exchanged(operation, started, result.get("resultCode"), None)
        return result

    def _check(self, operation: str, result: Mapping[str, Any]) -> None:
        code = result.get("resultCode")
        rc = codes.RETURN_CODES.lookup(code)
        if rc.outcome is Outcome.SUCCESS:
            return
        message = result.get("message") or rc.text
        if rc.outcome is Outcome.TRANSIENT:
            raise PlatformUnavailable("platform failed: %s %s" % (rc.code, message), platform_code=rc.code,
                                      platform_message=message)
        raise PlatformRejected(rc, message)

    async def _get_auth_key(self) -> str:
        """getAuthKey; the new authKey, or PlatformRejected(PLATFORM_AUTH) for wrong credentials."""
        result = await self._send("getAuthKey", {"orgCode": self.wg.org_code, "userName": self.wg.user_name,
                                                 "passWord": self.wg.pass_word.get_secret_value()})
        self._check("getAuthKey", result)
        key = result.get("authKey")
        if not isinstance(key, str) or not key:
            raise PlatformUnavailable("getAuthKey answered %s without an authKey" % result.get("resultCode"))
        logger.info("platform wondersgroup: new authKey for %s", self.wg.user_name)
        return key

    async def _send(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        answer = await self.service.send(operation, params)
        data = element_data(answer)
        result = data.pop("return", None)
        if not isinstance(result, dict):
            raise PlatformUnavailable("%sResponse has no <return>" % operation)
        result = {**data, **result}  # getAuthKey's macAddress/orgCode sit beside <return>
        code = result.get("resultCode")
        if not isinstance(code, str) or not code:
            raise PlatformUnavailable("%sResponse has no resultCode" % operation)
        return result


def _normalise_people(people: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(people)
    csrq = out.get("csrq")
    if isinstance(csrq, str) and schema.birth_date(csrq):
        out["csrq"] = schema.birth_date(csrq)
    return out


def _sync_message(message: Any) -> dict[str, Any]:
    """syncCardInfo's message for an electronic card is JSON: virtualCardNum, vuid, empi, QRCode,
    img. Anything else (a plain 操作成功) gives nothing."""
    if not isinstance(message, str) or not message.strip().startswith("{"):
        return {}
    try:
        data = json.loads(message)
    except ValueError:
        logger.warning("syncCardInfo: message looks like JSON but is not; returned as text")
        return {}
    return data if isinstance(data, dict) else {}


def _unflatten(values: Mapping[str, str]) -> dict[str, Any]:
    """An outbox record's flat values ("useCardInfo.depCode") as the call's parameters."""
    out: dict[str, Any] = {}
    for key, value in values.items():
        head, _, rest = key.partition(".")
        if rest:
            out.setdefault(head, {})[rest] = value
        else:
            out[key] = value
    return out
