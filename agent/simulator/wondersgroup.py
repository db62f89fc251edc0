"""A strict simulator of the spec 001 platform (wondersgroup healthCardService), and its SOAP
endpoint on the machinery of `soap.py` (fault injection, control API, journal).

`WondersgroupSimulator` is the platform's logic: getAuthKey checks orgCode/userName/passWord
(10101/10102/10103) and issues 40-hex authKeys, which expire (after `auth_ttl_s`, or on demand
through /_sim/expire_auth) and are then answered with 10105; every business call checks orgCode,
authKey and its parameters against the DTO tables (`wondersgroup_schema`, the same checks the
adapter applies), with the spec's return codes. Residents have static (`vuid:1`) and dynamic QR
codes; dynamic ones expire.

The SOAP side is strict too: a JAX-WS envelope, the operation element in the service namespace,
unqualified parameters as the spec's samples send them. Replies can be sent in GBK
(`encoding="GBK"`), as a Windows-era deployment might.
"""

from __future__ import annotations

import base64
import hashlib
import io
import itertools
import json
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from aiohttp import web
from lxml import etree
from PIL import Image

from agent.codes import wondersgroup as codes
from agent.platforms import wondersgroup_schema as schema
from agent.platforms.soapservice import SOAP_ENV, element_data
from agent.simulator.rhc import make_id
from agent.simulator.soap import SimServer, _soap_fault, soap_call

NAMESPACE = "http://www.wondersgroup.com/card"
PATH = "/hcpde/services/healthCardService"
SHIPPED_WSDL = Path(__file__).resolve().parent.parent / "platforms" / "wsdl" / "wondersgroup.wsdl"
# CardInfo.jkkzt: 1 正常, 3 挂失, 9 注销; the sim adds 4 for a voided card (作废, return code 1040)
_STATUS_CODES = {"3": ("1010", "卡已挂失"), "9": ("1020", "卡已注销"), "4": ("1040", "卡已作废")}


@dataclass
class Person:
    people: dict[str, str]  # PeopleInfo as the platform keeps it
    status: str = "1"
    vuid: str = ""
    empi: str = ""
    virtual_card_num: str = ""
    org_code: str = ""

    def __post_init__(self) -> None:
        digest = hashlib.sha256(("wg:%s:%s" % (self.people["zjlx"], self.people["zjhm"])).encode()).hexdigest()
        self.vuid = self.vuid or digest.upper()
        self.empi = self.empi or hashlib.sha256(("empi:" + digest).encode()).hexdigest().upper()
        self.virtual_card_num = self.virtual_card_num or str(int(digest[:16], 16))[:20].rjust(20, "0")

    @property
    def key(self) -> str:
        return "%s:%s" % (self.people["zjlx"], self.people["zjhm"])

    @property
    def static_qr(self) -> str:
        return self.vuid + ":1"


def person(xm: str, xb: str, mzdm: str, csrq: str, region: str, seq: str, brdh: str, **more: str) -> Person:
    id_number = make_id(region, csrq, seq)
    status = more.pop("status", "1")
    return Person({"xm": xm, "xb": xb, "mzdm": mzdm, "csrq": csrq, "sfzhm": id_number, "zjlx": "01",
                   "zjhm": id_number, "brdh": brdh, "ylfyzffs": "07", "citizenship": "156", **more}, status)


def default_people() -> list[Person]:
    """Fictional residents of Foshan; every field valid by the spec's tables."""
    return [
        person("袁宇阳", "1", "01", "19900708", "440604", "761", "13589759854",
               dzlb="2", dzsf="广东省", dzs="佛山市", dzqx="禅城区", dzxz="祖庙街道", dzc="金鱼街24号"),
        person("欧阳喆", "2", "01", "19850312", "440605", "122", "13902263273"),
        person("热依拉·买买提", "2", "05", "19920101", "650102", "344", "18999112233"),
        person("夏海祥", "1", "01", "19620518", "440606", "451", "13700000000", status="3"),  # lost
        person("何敏", "2", "01", "19700909", "440604", "562", "13711111111", status="9"),    # cancelled
    ]


@dataclass
class JournalEntry:
    operation: str
    at: float
    result_code: str
    auth_key: str
    values: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        return {"operation": self.operation, "at": self.at, "resultCode": self.result_code,
                "authKey": self.auth_key, "values": self.values}


class Answer(Exception):
    """Ends handling with a result code, a message and optional data (also fsjson's)."""

    def __init__(self, code: str, message: str, data: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = dict(data or {})


class WondersgroupSimulator:
    def __init__(self, *, org_code: str = "440604001", user_name: str = "scanbox",
                 pass_word: str = "scanbox-secret", people: list[Person] | None = None,
                 auth_ttl_s: float = 7200.0, dynamic_ttl_s: float = 300.0,
                 clock: Callable[[], float] = time.time) -> None:
        self.org_code = org_code
        self.user_name = user_name
        self.pass_word = pass_word
        self.auth_ttl_s = auth_ttl_s
        self.dynamic_ttl_s = dynamic_ttl_s
        self.clock = clock
        self.auth_keys: dict[str, float] = {}  # authKey -> issued at
        self.people: dict[str, Person] = {}
        self.static_codes: dict[str, str] = {}
        self.dynamic_codes: dict[str, tuple[str, float]] = {}
        self.journal: list[JournalEntry] = []
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        for p in people if people is not None else default_people():
            self.add(p)

    def add(self, p: Person) -> Person:
        self.people[p.key] = p
        self.static_codes[p.static_qr] = p.key
        return p

    def by_id(self, id_number: str) -> Person | None:
        return next((p for p in self.people.values() if p.people["zjhm"] == id_number), None)

    def issue_dynamic(self, id_card: str, ttl_s: float | None = None) -> str:
        p = self.by_id(id_card)
        if p is None:
            raise KeyError(id_card)
        n = next(self._counter)
        expires = self.clock() + (self.dynamic_ttl_s if ttl_s is None else ttl_s)
        tail = hashlib.md5(("%s:%d:%f" % (p.vuid, n, expires)).encode()).hexdigest().upper()
        code = "%s:0:%s" % (p.vuid, tail)
        self.dynamic_codes[code] = (p.key, expires)
        return code

    def expire_auth(self) -> int:
        """Every authKey issued so far stops working (the platform's expiry, on demand)."""
        with self._lock:
            count = len(self.auth_keys)
            self.auth_keys.clear()
            return count

    def journal_for(self, operation: str) -> list[JournalEntry]:
        with self._lock:
            return [e for e in self.journal if e.operation == operation]

    def snapshot(self) -> list[dict[str, Any]]:
        return [{**p.people, "status": p.status, "vuid": p.vuid, "empi": p.empi, "static_qr": p.static_qr}
                for p in self.people.values()]

    # --- the service -------------------------------------------------------------------------

    def handle(self, operation: str, params: dict[str, Any]) -> dict[str, Any]:
        """One call: the `<return>` fields, plus what sits beside it (getAuthKey)."""
        try:
            with self._lock:
                getattr(self, "_" + operation.lower())(params)
            raise Answer("10110", "参数错误")  # a handler that did not answer
        except Answer as answer:
            result = answer
        with self._lock:
            self.journal.append(JournalEntry(operation, self.clock(), result.code, str(params.get("authKey", "")),
                                             {k: v for k, v in params.items() if k != "passWord"}))
        return {"message": result.message, "resultCode": result.code, **result.data}

    def _authorised(self, params: Mapping[str, Any], operation: str) -> dict[str, Any]:
        if params.get("orgCode") != self.org_code:
            raise Answer("10101", "机构代码错误")
        issued = self.auth_keys.get(str(params.get("authKey") or ""))
        if issued is None or self.clock() - issued > self.auth_ttl_s:
            raise Answer(codes.AUTH_EXPIRED, "认证字符串失效,请重新操作本操作")
        values = {k: v for k, v in params.items() if k not in ("orgCode", "authKey")}
        problems = schema.check_operation(schema.OPERATIONS[operation], values)
        if problems:
            raise Answer(problems[0].code, str(problems[0]))
        return values

    def _getauthkey(self, params: Mapping[str, Any]) -> None:
        if params.get("orgCode") != self.org_code:
            raise Answer("10101", "机构代码错误")
        if params.get("userName") != self.user_name:
            raise Answer("10102", "用户名错误")
        if params.get("passWord") != self.pass_word:
            raise Answer("10103", "密码错误")
        key = hashlib.sha1(("auth:%d:%f" % (next(self._counter), self.clock())).encode()).hexdigest()
        self.auth_keys[key] = self.clock()
        raise Answer(codes.SUCCESS, "操作成功", {"authKey": key, "macAddress": "8C-70-5A-43-CE-6D,null",
                                                "orgCode": self.org_code})

    def _card(self, p: Person) -> None:
        if p.status in _STATUS_CODES:
            raise Answer(*_STATUS_CODES[p.status])

    def _viridcardverify(self, params: Mapping[str, Any]) -> None:
        values = self._authorised(params, "virIdCardVerify")
        qr = values["qrCode"]
        if qr in self.dynamic_codes:
            key, expires = self.dynamic_codes[qr]
            if self.clock() > expires:
                # the spec has no code for an expired dynamic code: 参数错误 with a message
                raise Answer("10110", "二维码已过期")
        elif qr in self.static_codes:
            key = self.static_codes[qr]
        else:
            raise Answer("10109", "卡号不存在")
        p = self.people[key]
        self._card(p)
        raise Answer(codes.SUCCESS, "操作成功", {
            "empi": p.empi, "erhcEnddate": "2028-12-14", "orgcode": p.org_code or self.org_code,
            "orgname": "统一测试机构", "virtualCardNum": p.virtual_card_num, "vuid": p.vuid,
            "peopleInfo": dict(p.people)})

    def _synccardinfo(self, params: Mapping[str, Any]) -> None:
        values = self._authorised(params, "syncCardInfo")
        card = values["cardInfo"]
        people = {k: v for k, v in card["peopleInfo"].items() if v}
        people["csrq"] = schema.birth_date(people["csrq"]) or people["csrq"]
        if self.by_id(people["zjhm"]) is not None:
            raise Answer("10115", "身份证已经办理过")
        p = self.add(Person(people, org_code=card["orgCode"]))
        if card["klx"] != "3":
            raise Answer(codes.SUCCESS, "操作成功")
        message = json.dumps({"virtualCardNum": p.virtual_card_num, "vuid": p.vuid, "empi": p.empi,
                              "QRCode": p.static_qr, "img": _png()}, ensure_ascii=False)
        raise Answer(codes.SUCCESS, message)

    def _updatecardinfo(self, params: Mapping[str, Any]) -> None:
        values = self._authorised(params, "updateCardInfo")
        people = values["peopleInfo"]
        p = self.people.get("%s:%s" % (people["zjlx"], people["zjhm"]))
        if p is None:
            raise Answer("10108", "身份证未办卡")
        if values.get("qrCode") and self.static_codes.get(values["qrCode"]) != p.key:
            raise Answer("10130", "卡号和身份证号码关联不上")
        if people["xm"] != p.people["xm"]:
            raise Answer("10130", "姓名、证件号码、证件类型不能更改")  # the table's note on peopleInfo
        self._card(p)
        for k, v in people.items():
            if v and k not in ("xm", "zjlx", "zjhm"):
                p.people[k] = (schema.birth_date(v) or v) if k == "csrq" else v
        raise Answer(codes.SUCCESS, "操作成功")

    def _downqr(self, params: Mapping[str, Any]) -> None:
        values = self._authorised(params, "downQr")
        p = self.people.get("%s:%s" % (values["zjlx"], values["zjhm"]))
        if p is None:
            raise Answer("10108", "身份证未办卡")
        if values["name"] != p.people["xm"]:
            raise Answer("10130", "卡号和身份证号码关联不上")
        self._card(p)
        raise Answer(codes.SUCCESS, "操作成功", {"empi": p.empi, "img": _png(), "vuid": p.vuid})


def _png() -> str:
    """A small PNG for `img` (the simulator draws no QR code: nothing here encodes one)."""
    buffer = io.BytesIO()
    Image.new("1", (33, 33), 1).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


class WondersgroupServer(SimServer):
    """The simulator behind a SOAP endpoint at `PATH`, serving the shipped WSDL with its own
    address, with soap.py's fault injection and control API (/_sim/residents, /_sim/journal,
    /_sim/dynamic, /_sim/faults) and /_sim/expire_auth."""

    def __init__(self, sim: WondersgroupSimulator, path: str = PATH, encoding: str = "UTF-8") -> None:
        super().__init__(sim, path=path)  # type: ignore[arg-type]  # same control surface as RhcSimulator
        self.sim: WondersgroupSimulator = sim  # type: ignore[assignment]
        self.encoding = encoding
        self.app.router.add_post("/_sim/expire_auth", self._expire_auth)

    async def _get(self, request: web.Request) -> web.Response:
        if "wsdl" in request.query:
            text = SHIPPED_WSDL.read_text(encoding="utf-8").replace(
                "http://127.0.0.1:8083/hcpde/services/healthCardService", self.endpoint)
            return web.Response(text=text, content_type="text/xml")
        return web.Response(status=404, text="no such document")

    async def _soap(self, request: web.Request) -> web.StreamResponse:
        try:
            operation, params = _unwrap(await request.read())
        except ValueError as exc:
            return _soap_fault(str(exc))
        result = self.sim.handle(operation, params)
        return web.Response(body=_reply(operation, result, self.encoding),
                            headers={"Content-Type": "text/xml; charset=%s" % self.encoding})

    async def _expire_auth(self, request: web.Request) -> web.Response:
        return web.json_response({"expired": self.sim.expire_auth()})


def _unwrap(body: bytes) -> tuple[str, dict[str, Any]]:
    call = soap_call(body)
    operation = etree.QName(call).localname if call is not None else ""
    if call is None or etree.QName(call).namespace != NAMESPACE or operation not in (
            "getAuthKey", *schema.OPERATIONS):
        raise ValueError("Cannot find dispatch method for %s" % (call.tag if call is not None else "(empty body)"))
    for element in call.iter():
        if element is not call and isinstance(element.tag, str) and etree.QName(element).namespace:
            # JAX-WS binds unqualified parameters; a qualified one is an unknown element to it
            raise ValueError("Unmarshalling Error: unexpected element %s" % element.tag)
    return operation, element_data(call)


def _reply(operation: str, result: Mapping[str, Any], encoding: str) -> bytes:
    env = etree.Element("{%s}Envelope" % SOAP_ENV, nsmap={"soap": SOAP_ENV})
    body = etree.SubElement(env, "{%s}Body" % SOAP_ENV)
    response = etree.SubElement(body, "{%s}%sResponse" % (NAMESPACE, operation), nsmap={"ns2": NAMESPACE})
    ret = etree.SubElement(response, "return")
    beside = ("macAddress", "orgCode") if operation == "getAuthKey" else ()
    for key, value in result.items():
        parent = response if key in beside else ret
        node = etree.SubElement(parent, key)
        if isinstance(value, Mapping):
            for k, v in value.items():
                etree.SubElement(node, k).text = v
        else:
            node.text = value
    return etree.tostring(env, xml_declaration=True, encoding=encoding)

