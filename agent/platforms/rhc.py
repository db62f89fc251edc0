"""Adapter for spec 000: the Qinghai resident health card platform.

One SOAP operation, `String RHCMessageServer(String action, String message)`, where `action`
(4.2.1: message id, business code, credentials) and `message` (the business fields) are XML
documents passed as strings. Both are built with lxml from the tables in `rhc_schema` and
checked against them before sending; the reply's `<response>` is parsed into data, and its
`resultCode` looked up in the return-code table to decide success, rejection or retry.
"""

from __future__ import annotations

import copy
import logging
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping

import msgspec
from lxml import etree

from agent.clock import message_time
from agent.codes import Outcome, ReturnCode
from agent.codes import qwb002 as codes
from agent.config import PlatformConfig, SiteConfig
from agent.model import Identity, IdentitySource, Reason, Scan, ScanboxError, ScanKind, UsageRecord
from agent.platforms import wsdl
from agent.platforms.base import (
    Platform,
    PlatformError,
    PlatformRejected,
    PlatformUnavailable,
    VerifyAnswer,
    VerifyRequest,
)
from agent.platforms.rhc_schema import (
    ACTION_FIELDS,
    MSG_GUID,
    OPERATIONS,
    Operation,
    Problem,
    check_fields,
    check_message,
)
from agent.platforms.soapservice import SoapService
from agent.platforms.transport import HttpClient, preview
from agent.qr import QrKind

logger = logging.getLogger(__name__)

# whitespace between elements is kept (every value is stripped where it is read): dropping it
# at parse time cost a quarter of the parse
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_OWN_ACTION_FIELDS = tuple(f for f in ACTION_FIELDS if f.name in ("msgGuid", "msgCreateTime"))
_STATIC_ACTION_FIELDS = tuple(f for f in ACTION_FIELDS if f not in _OWN_ACTION_FIELDS)
_ACTION_ORDER = {f.name: i for i, f in enumerate(ACTION_FIELDS)}
# the fields that carry the time of the use, for each operation the outbox can hold: 3.3.2 刷卡时间
# and 3.9.2 用卡时间 (TIME_FORMAT). RHC_E0013 (3.13.2) carries only the code. Every other date in
# them (RHC_E0009's birthday) is the patient's and never moves; msgCreateTime is made at each send
SCAN_TIME_FIELDS: dict[str, tuple[str, ...]] = {"RHC_E0003": ("time",), "RHC_E0009": ("time",), "RHC_E0013": ()}


class RhcResponse(msgspec.Struct, frozen=True):
    """A parsed `<response>`: result, desc, resultCode, and the business data as plain data."""

    ok: bool
    code: str | None
    desc: str | None
    data: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"result": "success" if self.ok else "failure", "resultCode": self.code,
                "desc": self.desc, "data": self.data}


def time_text(moment: datetime) -> str:
    """The spec's time fields, `yyyy-MM-dd HH:mm:ss` (TIME_FORMAT): by hand, as strftime
    would write it, without strftime's look at the time zone (a system call per use)."""
    return "%04d-%02d-%02d %02d:%02d:%02d" % (moment.year, moment.month, moment.day, moment.hour,
                                              moment.minute, moment.second)


def build_xml(fields: tuple, values: Mapping[str, str]) -> str:
    """`<request>` with every field of the table in table order (empty when not given), as the
    spec's samples show. lxml escapes; nothing is concatenated by hand. The table's empty
    document is filled in, written and emptied again at once (no await between: one message at
    a time on the loop), not copied for each message."""
    names, root = _empty_request(fields)
    filled = []
    try:
        for element, name in zip(root, names, strict=True):
            value = values.get(name)
            if value:
                element.text = value
                filled.append(element)
        return etree.tostring(root, encoding="unicode")
    finally:
        for element in filled:  # nothing of the message (a code, a name) stays
            element.text = ""


def _filled(fields: tuple, values: Mapping[str, str]) -> etree._Element:
    """A new `<request>` element of the table with `values` in it."""
    names, empty = _empty_request(fields)
    root = copy.deepcopy(empty)
    for element, name in zip(root, names, strict=True):
        value = values.get(name)
        if value:  # else the copy's empty text stays
            element.text = value
    return root


def _empty_request(fields: tuple) -> tuple[tuple[str, ...], etree._Element]:
    """The table's field names and its `<request>` with every field empty. Each table's document
    is made once: a new document and an element per field, each name checked by lxml, were most
    of a message's building."""
    entry = _EMPTY_REQUESTS.get(id(fields))
    if entry is None or entry[0] is not fields:
        names = tuple(f.name for f in fields)
        empty = etree.Element("request")
        for name in names:
            etree.SubElement(empty, name).text = ""
        if len(_EMPTY_REQUESTS) >= 64:  # the spec has 18 tables; tests make more
            _EMPTY_REQUESTS.clear()
        entry = _EMPTY_REQUESTS[id(fields)] = (fields, names, empty)
    return entry[1], entry[2]


# each table's <request> with its fields empty, by the table (its id: hashing a table hashes
# every field's title and code table), with the table itself (so the id is not another's) and
# its field names
_EMPTY_REQUESTS: dict[int, tuple[tuple, tuple[str, ...], etree._Element]] = {}


def parse_response(text: str, op: Operation) -> RhcResponse:
    """Parse the platform's reply; raises PlatformUnavailable when it is not a `<response>`."""
    if not isinstance(text, str):
        raise PlatformUnavailable("platform answered %s instead of a <response> document"
                                  % ("nothing" if text is None else type(text).__name__))
    text = text.strip()
    if not text:
        raise PlatformUnavailable("platform answered an empty string instead of a <response> document")
    try:
        root = etree.fromstring(text.encode("utf-8"), _PARSER)
    except etree.XMLSyntaxError as exc:
        raise PlatformUnavailable("platform reply is not XML (%s): %s" % (exc, preview(text))) from None
    if root.tag != "response":
        raise PlatformUnavailable("platform reply is <%s>, not <response>" % root.tag)
    # the first of each as findtext() would find it, in one pass (findtext parses a path: 1.5 us each)
    head: dict[str, str] = {}
    for element in root.iterchildren("result", "resultCode", "desc"):
        head.setdefault(element.tag, element.text or "")
    result = head.get("result", "").strip().lower()
    if result not in ("success", "failure"):
        raise PlatformUnavailable("platform reply has result %r, neither success nor failure" % result)
    data = _element_data(root, op.response_lists)
    for key in ("result", "desc", "resultCode"):
        data.pop(key, None)
    container = data.pop(op.response_container, None) if op.response_container else None
    if isinstance(container, dict):
        data.update(container)
    for name in op.response_lists:  # a list with no members is still a list
        data.setdefault(name, [])
    return RhcResponse(ok=result == "success", code=head.get("resultCode", "").strip() or None,
                       desc=head.get("desc", "").strip() or None, data=data)


def _element_data(element: Any, lists: tuple[str, ...]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for child in element.iterchildren(etree.Element):  # elements only: no comments, processing instructions
        tag = child.tag
        value: Any = _element_data(child, lists) if len(child) else (child.text or "").strip()
        if tag in lists:
            out.setdefault(tag, []).append(value)
        elif tag in out:
            if not isinstance(out[tag], list):
                out[tag] = [out[tag]]
            out[tag].append(value)
        else:
            out[tag] = value
    return out


def identity_from(data: Mapping[str, Any], source: IdentitySource = IdentitySource.PLATFORM) -> Identity:
    """scanbox's identity from a verify reply (3.3.3 fields; 3.13.3 for temporary cards)."""
    def get(key: str) -> str | None:
        value = data.get(key)
        return value if isinstance(value, str) and value else None

    id_type, id_number = get("id_type"), get("id_number")
    if id_number is None and get("id_card"):
        id_type, id_number = "01", get("id_card")
    return Identity(
        source=source,
        name=get("name"),
        sex=get("sex"),
        nation=get("nation"),
        birthday=get("birthday"),
        id_type=id_type,
        id_number=id_number,
        ecard_id=get("ecardId"),
        main_index=get("main_index"),
        phone=get("cellphone") or get("telephone"),
        address=get("address"),
        card_status=get("ehc_card_status"),
        age=get("age"),
        clinic_time=get("clinicTime"),
    )


class RhcPlatform(Platform):
    kind = "rhc"

    def __init__(self, config: PlatformConfig, site: SiteConfig, state_dir: Path) -> None:
        super().__init__()
        if config.rhc is None:
            raise ValueError("platform kind rhc needs [platform.rhc]")
        self.rhc = config.rhc
        self.config = config
        self.site = site
        self.endpoint = config.endpoint
        self.timeout_s = config.timeout_s
        self.wsdl_source = wsdl.WsdlSource(config.wsdl, "rhc.wsdl")
        self._http = HttpClient(timeout_s=config.timeout_s, tls_verify=config.tls_verify)
        self.service = SoapService("rhc", self.wsdl_source, state_dir / "wsdl" / "rhc", self._http,
                                   config.endpoint, config.timeout_s, (self.rhc.operation,))
        # the names of the operation's (action, message) parameters, once the WSDL is loaded
        self._names: tuple[str, str] | None = None
        self._places: dict[tuple[str, str], dict[str, str]] = {}
        # each business code's action with the fields from config in it, and their problems
        self._actions: dict[str, tuple[etree._Element, etree._Element, etree._Element, list[Problem]]] = {}

    @property
    def operations(self) -> list[str]:
        return sorted(OPERATIONS)

    @property
    def wsdl_note(self) -> str | None:
        return self.service.note

    async def start(self) -> None:
        try:
            await self._parameter_names()
        except PlatformError as exc:
            self.record_failure(exc)
            logger.warning("platform rhc not ready: %s (will retry when needed)", exc.message)

    async def close(self) -> None:
        await self._http.close()

    # --- the business operations ---------------------------------------------------------

    def verify_record(self, request: VerifyRequest, scan_id: str | None = None) -> UsageRecord:
        """RHC_E0003 carries where and when the card was used, so the verification is the
        platform's use record; a temporary card is verified with RHC_E0013."""
        values: dict[str, str] = {}
        if request.qr:
            values["qr_code"] = request.qr
        if request.kind is QrKind.TEMPORARY:
            operation = "RHC_E0013"
        else:
            operation = "RHC_E0003"
            values["time"] = time_text(request.scanned_at)
            values.update(self._place(request.step, request.channel))
        return UsageRecord(uuid.uuid4().hex, operation, values, scan_id)

    def _place(self, step: str, channel: str) -> dict[str, str]:
        """RHC_E0003's fields that say where: the site's, the terminal's and the step's (those
        given), made once per step and channel."""
        place = self._places.get((step, channel))
        if place is None:
            values = {
                "sam": self.site.sam,
                "use_citycode": self.site.city_code,
                "use_cityname": self.site.city_name,
                "hospital_code": self.site.hospital_code,
                "hospital_name": self.site.hospital_name,
                "channel_code": channel,
                "channel_name": codes.TERMINAL_TYPE.text(channel) or "",
                "medstep_code": step,
                "medstep_name": codes.MEDICAL_STEP.text(step) or "",
            }
            if len(self._places) >= 64:  # steps and channels come from the HIS's calls
                self._places.clear()
            place = self._places[(step, channel)] = {k: v for k, v in values.items() if v}
        return place

    def card_use_record(self, scan: Scan, step: str, channel: str) -> UsageRecord | None:
        """RHC_E0009 (3.9) for a resident health card read at this box; other cards have none.
        Its personal fields (id_card and nation are required) come from EF06, which only a box
        with a PSAM reads."""
        if scan.kind is not ScanKind.HEALTH_CARD:
            return None
        card = scan.payload if isinstance(scan.payload, dict) else {}
        person = scan.identity
        values = {
            "time": time_text(scan.at),
            "atr": card_atr_number(card),
            "hc_number": card.get("card_number") or "",
            "sam": self.site.sam,
            "use_citycode": self.site.city_code,
            "use_cityname": self.site.city_name,
            "name": person.name if person else None,
            "sex": person.sex if person else None,
            "nation": person.nation if person else None,
            "birthday": person.birthday if person else None,
            "id_card": person.id_number if person and person.id_type == "01" else None,
            "hospital_code": self.site.hospital_code,
            "hospital_name": self.site.hospital_name,
            "channel_code": channel,
            "channel_name": codes.TERMINAL_TYPE.text(channel) or "",
            "medstep_code": step,
            "medstep_name": codes.MEDICAL_STEP.text(step) or "",
        }
        present = {k: str(v) for k, v in values.items() if v}
        problems = check_message(OPERATIONS["RHC_E0009"], present)
        if problems:
            raise ScanboxError(Reason.BAD_REQUEST, "RHC_E0009 not recorded: %s" % "; ".join(map(str, problems)))
        return UsageRecord(uuid.uuid4().hex, "RHC_E0009", present, scan.id)

    def retime(self, record: UsageRecord, when: datetime) -> UsageRecord:
        fields = SCAN_TIME_FIELDS.get(record.operation)
        if fields is None:
            return super().retime(record, when)
        rendered = when.strftime(TIME_FORMAT)
        return msgspec.structs.replace(record, values={**record.values, **{name: rendered for name in fields}},
                                   created_at=when.timestamp())

    async def verify(self, record: UsageRecord) -> VerifyAnswer:
        response = await self.request(record.operation, record.values, msg_guid=record.guid)
        return VerifyAnswer(identity_from(response.data), response.code, response.desc,
                            static=code_is_static(response.data.get("qr_codetext")))

    async def upload(self, record: UsageRecord) -> tuple[str | None, str | None]:
        if record.operation not in OPERATIONS:
            raise ScanboxError(Reason.BAD_REQUEST, "unknown operation %r" % record.operation)
        response = await self.request(record.operation, record.values, msg_guid=record.guid)
        return response.code, response.desc

    async def call(self, operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
        if operation not in OPERATIONS:
            raise ScanboxError(Reason.BAD_REQUEST, "unknown operation %r; rhc offers %s"
                               % (operation, ", ".join(self.operations)))
        values = {}
        for key, value in params.items():
            if not isinstance(value, (str, int)) or isinstance(value, bool):
                raise ScanboxError(Reason.BAD_REQUEST, "params.%s: must be a string" % key)
            values[key] = str(value)
        return (await self.request(operation, values)).to_json()

    async def request(self, code: str, values: Mapping[str, str], *, msg_guid: str | None = None) -> RhcResponse:
        """Send one business message; the one path every operation takes.

        Raises ScanboxError(BAD_REQUEST) before sending when the message does not meet its
        table, PlatformUnavailable when the platform cannot answer, PlatformRejected when it
        answers no."""
        op = OPERATIONS[code]
        values = {k: v for k, v in values.items() if v not in (None, "")}
        problems = check_message(op, values)
        if problems:
            raise ScanboxError(Reason.BAD_REQUEST, "%s not sent: %s" % (code, "; ".join(map(str, problems))),
                               data={"problems": [{"field": p.field, "text": p.text} for p in problems]})
        action = self.build_action(code, msg_guid)
        message = build_xml(op.request, values)
        started = time.monotonic()
        try:
            reply = await self._send(action, message)
            response = parse_response(reply, op)
        except PlatformError as exc:
            self.record_failure(exc)
            self.exchanged(code, started, None, exc)
            logger.info("%s failed after %.0f ms: %s", code, (time.monotonic() - started) * 1000, exc.message)
            raise
        if not response.ok:
            rc = codes.RETURN_CODES.lookup(response.code)
            error: PlatformError
            if rc.outcome is Outcome.TRANSIENT:
                error = PlatformUnavailable("platform failed: %s %s" % (rc.code, response.desc or rc.text),
                                            platform_code=rc.code, platform_message=response.desc or rc.text)
            else:
                error = PlatformRejected(card_status_refusal(rc, response.data), response.desc)
            self.record_failure(error)
            self.exchanged(code, started, response.code, error)
            logger.info("%s answered %s (%s)", code, response.code, response.desc)
            raise error
        self._record_ok()
        self.exchanged(code, started, response.code, None)
        logger.debug("%s answered %s in %.1f ms", code, response.code, (time.monotonic() - started) * 1000)
        return response

    def build_action(self, code: str, msg_guid: str | None = None, created: datetime | None = None) -> str:
        """The `action` document (4.2.1). Its fields from config are checked and filled in once
        per business code; each message adds its own msgGuid and msgCreateTime."""
        prepared = self._actions.get(code)
        if prepared is None:
            prepared = self._actions[code] = self._prepare_action(code)
        template, guid_element, created_element, static = prepared
        created_text = time_text(created or message_time())
        problems = static
        # a msgGuid made here (32 hex digits) and a time written by time_text meet their formats
        # by construction: only a msgGuid given from outside (an outbox record's) is checked
        if msg_guid and not MSG_GUID.check(msg_guid):
            problems = static + check_fields(_OWN_ACTION_FIELDS, {"msgGuid": msg_guid, "msgCreateTime": created_text})
        if problems:
            problems = sorted(problems, key=lambda p: _ACTION_ORDER[p.field])
            raise ScanboxError(Reason.BAD_REQUEST, "action not sent: %s" % "; ".join(map(str, problems)))
        # filled in and written at once (no await between: one message at a time on the loop),
        # in place: the rest of the document is the config's, the same for every message
        guid_element.text = msg_guid or uuid.uuid4().hex
        created_element.text = created_text
        return etree.tostring(template, encoding="unicode")

    def _prepare_action(self, code: str) -> tuple[etree._Element, etree._Element, etree._Element, list[Problem]]:
        """The action of a business code with its fields from config (and its msgGuid and
        msgCreateTime elements, for each message's own), and their problems."""
        values = {
            "msgType": "1",
            "bussinessCode": code,
            "orgId": self.rhc.org_id,
            "appCode": self.rhc.app_code,
            "userName": self.rhc.user_name,
            "userPwd": self.rhc.user_pwd.get_secret_value(),
            "stdVerCode": self.rhc.std_ver_code,
            # "1" asks the platform to encrypt personal fields with a scheme the spec never
            # defines; scanbox leaves it empty (no encryption) and relies on TLS
            "encryption": "",
        }
        root = _filled(ACTION_FIELDS, values)
        return (root, root[_ACTION_ORDER["msgGuid"]], root[_ACTION_ORDER["msgCreateTime"]],
                check_fields(_STATIC_ACTION_FIELDS, values))

    # --- SOAP ------------------------------------------------------------------------------

    async def _send(self, action: str, message: str) -> str:
        action_name, message_name = self._names or await self._parameter_names()
        answer = await self.service.send(self.rhc.operation, {action_name: action, message_name: message})
        # <RHCMessageServerResponse><return>the reply document as text</return>
        returned = answer[0] if len(answer) else answer
        return returned.text or ""

    async def _parameter_names(self) -> tuple[str, str]:
        """The operation's two string parameters, (action, message).

        Part names are the site's choice (`action`/`message` with @WebParam, `arg0`/`arg1`
        without): match by name when they are called action and message, else by position,
        which the spec fixes as (action, message)."""
        if self._names is None:
            elements = await self.service.input_names(self.rhc.operation)
            if len(elements) != 2:
                raise PlatformUnavailable("platform WSDL not usable: operation %s takes %d parameters, "
                                          "not (action, message)" % (self.rhc.operation, len(elements)))
            lower = [e.lower() for e in elements]
            if "action" in lower and "message" in lower:
                self._names = (elements[lower.index("action")], elements[lower.index("message")])
            else:
                self._names = (elements[0], elements[1])
            logger.info("platform rhc: operation %s(%s, %s)", self.rhc.operation, *self._names)
        return self._names


def code_is_static(qr_codetext: Any) -> bool | None:
    """RHC_E0003's qr_codetext (3.3.3) is the code in clear: "电子健康卡 ID:二维类型" for a
    static code (type 1), "ID:类型:有效时间" for a dynamic one (type 0). The ciphertext form
    looks the same either way; this is how the box tells a static one, which it may cache."""
    if not isinstance(qr_codetext, str):
        return None
    parts = qr_codetext.strip().split(":")
    if len(parts) == 2 and parts[0] and parts[1] == "1":
        return True
    if len(parts) == 3 and parts[0] and parts[1] == "0":
        return False
    return None


def card_status_refusal(rc: ReturnCode, data: Mapping[str, Any]) -> ReturnCode:
    """A general refusal (3003 居民信息验证错误) that names the card's status (RHC_VCARD_ZT) is
    about the card: 0 注销 or 4 已认证 is CARD_INACTIVE, not a generic PLATFORM_REJECTED."""
    status = data.get("ehc_card_status")
    reason = codes.CARD_STATUS_REASON.get(status) if isinstance(status, str) else None
    if reason is None or rc.reason is not Reason.PLATFORM_REJECTED:
        return rc
    return msgspec.structs.replace(rc, reason=reason)


def card_atr_number(card: dict[str, Any]) -> str:
    """3.9's "ATR 卡号": chip maker (4) + card maker (4) + card serial (8), 16 characters. Which
    ATR bytes hold them is not public: scanbox sends the last 8 historical bytes in hex, and
    the whole ATR (cut to the field's 20) when the card has fewer."""
    historical = str(card.get("atr_historical") or "")
    if len(historical) >= 16:
        return historical[-16:]
    return str(card.get("atr") or "")[-20:]
