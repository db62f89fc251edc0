"""A strict simulator of the spec 000 platform (Qinghai resident health card).

`RhcSimulator` is the platform's logic: it validates `action` and `message` as strictly as the
spec reads (credentials, required fields, lengths, formats, code tables, the characters &<>"),
answers with the spec's return codes, and keeps a small population of residents with static
and dynamic QR codes (dynamic ones expire). `soap.py` puts it behind a JAX-WS-like SOAP endpoint
with fault injection.

Every request is journaled with its msgGuid, so tests can count what reached the platform.
"""

from __future__ import annotations

import base64
import hashlib
import itertools
import threading
import time
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Callable, Mapping

from lxml import etree

from agent.platforms.rhc_schema import ACTION_FIELDS, OPERATIONS, Operation, check_fields, check_message

_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


@dataclass
class Resident:
    name: str
    sex: str
    nation: str
    birthday: str
    id_card: str
    telephone: str
    address: str
    id_type: str = "01"
    id_number: str = ""
    cellphone: str = ""
    unit: str = ""
    status: str = "1"  # RHC_VCARD_ZT
    ecard_id: str = ""
    main_index: str = ""
    org_id: str = ""
    family: dict[str, str] = field(default_factory=dict)  # member key -> relation

    def __post_init__(self) -> None:
        self.id_number = self.id_number or self.id_card
        digest = hashlib.sha256(("ecard:%s:%s" % (self.id_type, self.id_number)).encode()).hexdigest().upper()
        self.ecard_id = self.ecard_id or digest[:20]
        self.main_index = self.main_index or "QH" + str(int(digest[20:36], 16))[:18]

    @property
    def key(self) -> str:
        """Who this is: (id_type, id_number). A newborn shares a parent's id_card (3.16), so
        id_card alone does not tell people apart."""
        return "%s:%s" % (self.id_type, self.id_number)

    @property
    def newborn(self) -> bool:
        return self.id_type in NEWBORN_ID_TYPES

    @property
    def static_qr(self) -> str:
        return hashlib.sha256(("static:" + self.ecard_id).encode()).hexdigest().upper() + ":1"

    @property
    def ciphertext_qr(self) -> str:
        """The same static code in the ciphertext form spec 000 3.3 describes ("二维码密文", up
        to 256): what a platform set to `code_form="ciphertext"` issues from RHC_E0002/E0005."""
        digest = hashlib.sha512(("static:" + self.ecard_id).encode()).digest()
        return base64.b64encode(digest[:48]).decode("ascii")

    def person_fields(self) -> dict[str, str]:
        return {
            "name": self.name, "main_index": self.main_index, "ecardId": self.ecard_id,
            "telephone": self.telephone, "id_number": self.id_number, "id_type": self.id_type,
            "id_card": self.id_card, "nation": self.nation, "sex": self.sex,
            "birthday": self.birthday, "address": self.address,
        }


NEWBORN_ID_TYPES = ("N1", "N2", "N3", "08")


def id_check_digit(first17: str) -> str:
    """GB 11643 check character of a resident ID number."""
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return "10X98765432"[sum(int(d) * w for d, w in zip(first17, weights, strict=True)) % 11]


def make_id(region: str, birthday: str, seq: str) -> str:
    first17 = region + birthday + seq
    return first17 + id_check_digit(first17)


def default_residents() -> list[Resident]:
    """Fictional residents of Xining; every field is valid by the spec's tables."""
    return [
        Resident("张晓明", "1", "01", "19850312", make_id("630102", "19850312", "123"),
                 "09718123456", "青海省西宁市城东区八一路12号", cellphone="13897001234", unit="西宁市第一中学"),
        Resident("马丽娟", "2", "03", "19920708", make_id("630104", "19920708", "562"),
                 "09716254321", "青海省西宁市城西区五四西路8号", cellphone="13909712345"),
        Resident("才让卓玛", "2", "04", "19781130", make_id("632123", "19781130", "204"),
                 "09738812345", "青海省海东市乐都区碾伯镇", cellphone="18997123456"),
        Resident("李建国", "1", "01", "19600101", make_id("630105", "19600101", "331"),
                 "09715512345", "青海省西宁市城北区", status="0"),
        Resident("韩雪", "2", "01", "20010515", make_id("630102", "20010515", "448"),
                 "09718800000", "青海省西宁市城中区", status="2"),
        # authenticated on site (RHC_E0006), never applied for a static code
        Resident("赵文博", "1", "01", "19751020", make_id("630103", "19751020", "517"),
                 "09718300000", "青海省西宁市城东区", status="4"),
    ]


@dataclass
class JournalEntry:
    msg_guid: str
    code: str
    at: float
    result_code: str
    ok: bool
    values: dict[str, str]
    service_ms: float = 0.0

    def to_json(self) -> dict[str, Any]:
        return {"msgGuid": self.msg_guid, "bussinessCode": self.code, "at": self.at,
                "resultCode": self.result_code, "ok": self.ok, "values": self.values,
                "service_ms": round(self.service_ms, 3)}


class Answer(Exception):
    """Ends handling with a return code (success or failure) and optional data."""

    def __init__(self, code: str, desc: str, ok: bool = False, data: Mapping[str, Any] | None = None,
                 container: str | None = None) -> None:
        super().__init__(desc)
        self.code = code
        self.desc = desc
        self.ok = ok
        self.data = dict(data or {})
        self.container = container


class RhcSimulator:
    def __init__(self, *, user_name: str = "scanbox", user_pwd: str = "scanbox-secret",
                 org_ids: tuple[str, ...] = ("QH0001",), app_codes: tuple[str, ...] = ("APP001",),
                 residents: list[Resident] | None = None, dynamic_ttl_s: float = 300.0,
                 clock: Callable[[], float] = time.time, code_form: str = "hex") -> None:
        self.user_name = user_name
        self.user_pwd = user_pwd
        self.org_ids = set(org_ids)
        self.app_codes = set(app_codes)
        self.dynamic_ttl_s = dynamic_ttl_s
        self.clock = clock
        if code_form not in ("hex", "ciphertext"):
            raise ValueError("code_form is hex (64 hex + :1 / :0:...) or ciphertext (base64)")
        # which form RHC_E0002/E0005 issue; RHC_E0003 verifies both, and names the kind in
        # qr_codetext (ecardId:1 static, ecardId:0:valid-until dynamic)
        self.code_form = code_form
        self.residents: dict[str, Resident] = {}  # Resident.key -> resident
        self.static_codes: dict[str, str] = {}  # qr -> resident key
        self.dynamic_codes: dict[str, tuple[str, float]] = {}  # qr -> (resident key, expires at)
        self.temporary_cards: dict[str, dict[str, str]] = {}
        self.journal: list[JournalEntry] = []
        self._lock = threading.Lock()
        self._counter = itertools.count(1)
        for resident in residents if residents is not None else default_residents():
            self.add_resident(resident)

    # --- population ------------------------------------------------------------------------

    def add_resident(self, resident: Resident) -> Resident:
        self.residents[resident.key] = resident
        self.static_codes[resident.static_qr] = resident.key
        self.static_codes[resident.ciphertext_qr] = resident.key
        return resident

    def issued_static(self, resident: Resident) -> str:
        return resident.ciphertext_qr if self.code_form == "ciphertext" else resident.static_qr

    def by_card(self, id_card: str) -> Resident | None:
        """The person whose own resident ID card this is (not a newborn registered under it)."""
        return next((r for r in self.residents.values() if r.id_card == id_card and not r.newborn), None)

    def issue_dynamic(self, id_card: str, ttl_s: float | None = None, form: str | None = None) -> str:
        resident = self.by_card(id_card)
        if resident is None:
            raise KeyError(id_card)
        n = next(self._counter)
        expires = self.clock() + (self.dynamic_ttl_s if ttl_s is None else ttl_s)
        head = hashlib.sha256(("dynamic:%s:%d" % (resident.ecard_id, n)).encode()).hexdigest().upper()
        tail = hashlib.md5(("%s:%f" % (head, expires)).encode()).hexdigest().upper()
        code = "%s:0:%s" % (head, tail)
        if (form or self.code_form) == "ciphertext":
            code = base64.b64encode(bytes.fromhex(head + tail)).decode("ascii")
        self.dynamic_codes[code] = (resident.key, expires)
        return code

    def find(self, values: Mapping[str, str], prefix: str = "") -> Resident | None:
        id_card = values.get(prefix + "id_card")
        if id_card:
            return self.by_card(id_card)
        return self.residents.get("%s:%s" % (values.get(prefix + "id_type"), values.get(prefix + "id_number")))

    # --- the service ---------------------------------------------------------------------------

    def handle(self, action: str | None, message: str | None) -> str:
        """One RHCMessageServer call: the `<response>` document it answers."""
        started = time.perf_counter()
        act: dict[str, str] = {}
        values: dict[str, str] = {}
        try:
            if not action or not message:
                raise Answer("1009", "请求信息不能为空")
            act = _parse_request(action, "action")
            values = self._accept(act, message)
            self._dispatch(act["bussinessCode"], values)
            raise Answer("1011", "系统处理失败")  # a business handler that did not answer
        except Answer as answer:
            result = answer
        # refused requests are journaled too, with whatever of their action could be read
        entry = JournalEntry(act.get("msgGuid", ""), act.get("bussinessCode", ""), self.clock(), result.code,
                             result.ok, values, (time.perf_counter() - started) * 1000)
        with self._lock:
            self.journal.append(entry)
        return _response_xml(result)

    def _accept(self, act: dict[str, str], message: str) -> dict[str, str]:
        """The message's values once action and message pass every check; else an Answer."""
        code = act.get("bussinessCode", "")
        if not code:
            raise Answer("1008", "业务编码(bussinessCode)不能为空")
        if code not in OPERATIONS:
            raise Answer("1003", "业务编码(bussinessCode)非法: %s" % code)
        unknown = sorted(set(act) - {f.name for f in ACTION_FIELDS})
        if unknown:
            raise Answer("1012", "数据解析出现错误: action 节点 %s" % ",".join(unknown))
        if bool(act.get("orgId")) == bool(act.get("appCode")):
            raise Answer("1007", "机构 ID(orgId)和 APP 编码(appCode)不能同时为空")
        problems = check_fields(ACTION_FIELDS, act)
        if problems:
            raise Answer(problems[0].code, str(problems[0]))
        if act.get("orgId") and act["orgId"] not in self.org_ids:
            raise Answer("1006", "机构编码未认证")
        if act.get("appCode") and act["appCode"] not in self.app_codes:
            raise Answer("1004", "APP 编码未认证")
        if act.get("userName") != self.user_name or act.get("userPwd") != self.user_pwd:
            raise Answer("1005", "认证信息错误")
        values = _parse_request(message, "message")
        problems = check_message(OPERATIONS[code], values)
        if problems:
            raise Answer(problems[0].code, str(problems[0]))
        values = {k: v for k, v in values.items() if v}
        values["_org"] = act.get("orgId") or act.get("appCode") or ""
        return values

    def _dispatch(self, code: str, values: dict[str, str]) -> None:
        with self._lock:
            getattr(self, "_" + code.lower())(OPERATIONS[code], values)

    # --- business codes --------------------------------------------------------------------
    # each raises Answer; `values` has been checked against the operation's table

    def _register(self, values: dict[str, str], status: str) -> None:
        key = "%s:%s" % (values["id_type"], values["id_number"])
        adult = values["id_type"] not in NEWBORN_ID_TYPES and values.get("id_card")
        if key in self.residents or (adult and self.by_card(values["id_card"])):
            raise Answer("6009", "该居民已经注册")
        resident = self.add_resident(Resident(
            values["name"], values["sex"], values["nation"], values["birthday"], values.get("id_card", ""),
            values["telephone"], values["address"], id_type=values["id_type"],
            id_number=values["id_number"], cellphone=values.get("cellphone", ""),
            unit=values.get("unit", ""), status=status, org_id=values["_org"]))
        raise Answer("6008", "注册成功", True, {**resident.person_fields(), "ehc_card_status": resident.status},
                     "personinfo")

    def _rhc_e0001(self, op: Operation, values: dict[str, str]) -> None:
        self._register(values, "2")  # online registration waits for review

    def _rhc_e0006(self, op: Operation, values: dict[str, str]) -> None:
        self._register(values, "4")  # authenticated on site

    def _rhc_e0016(self, op: Operation, values: dict[str, str]) -> None:
        self._register(values, "4")  # id_card is a parent's; the newborn is its (id_type, id_number)

    def _resident(self, values: Mapping[str, str], prefix: str = "") -> Resident:
        resident = self.find(values, prefix)
        if resident is None:
            raise Answer("2008", "该居民未注册")
        return resident

    def _rhc_e0002(self, op: Operation, values: dict[str, str]) -> None:
        resident = self._resident(values)
        if resident.status not in ("1", "4"):
            raise Answer("2002", "该卡未审核")
        if values["qrcode_type"] == "1":
            if resident.status == "1":
                raise Answer("2003", "该居民已申请过静态二维码")
            resident.status = "1"
            qr = self.issued_static(resident)
        else:
            qr = self.issue_dynamic(resident.id_card)
        raise Answer("2009", "申请二维码成功", True, {"qr_code": qr, "qr_code_imgtext": "", "qr_code_imgurl": ""},
                     "ehc_cardinfo")

    def _rhc_e0003(self, op: Operation, values: dict[str, str]) -> None:
        qr = values["qr_code"]
        if qr in self.dynamic_codes:
            key, expires = self.dynamic_codes[qr]
            if self.clock() > expires:
                raise Answer("3004", "有效时间已过期")
            valid_until = datetime.fromtimestamp(expires).strftime("%Y%m%d%H%M%S")
            text = "%s:0:%s" % (self.residents[key].ecard_id, valid_until)
        elif qr in self.static_codes:
            key = self.static_codes[qr]
            text = "%s:1" % self.residents[key].ecard_id
        else:
            raise Answer("3001", "二维码错误")
        resident = self.residents[key]
        if resident.status in ("0", "4"):
            # as the platform answers a cancelled card, or one authenticated on site that never
            # applied for its code (a dynamic code issued before): 3003 with the card's status
            raise Answer("3003", "居民信息验证错误", False, {"ehc_card_status": resident.status}, "ehc_cardinfo")
        if resident.status in ("2", "3"):
            raise Answer("2002", "该卡未审核")
        raise Answer("3005", "验证成功", True, {
            "qr_codetext": text, **resident.person_fields(),
            "cellphone": resident.cellphone, "unit": resident.unit}, "ehc_cardinfo")

    def _rhc_e0004(self, op: Operation, values: dict[str, str]) -> None:
        resident = self.find(values)
        if resident is None:
            raise Answer("4003", "健康卡不存在")
        if self.static_codes.get(values["qr_code"]) != resident.key:
            raise Answer("4001", "身份证与二维码不匹配,注销失败")
        if resident.status == "0":
            raise Answer("4002", "该卡未认证或已注销")
        resident.status = "0"
        raise Answer("4004", "注销成功", True)

    def _rhc_e0005(self, op: Operation, values: dict[str, str]) -> None:
        resident = self._resident(values)
        refused = {"0": ("5001", "该卡已注销"), "2": ("5002", "待审核"), "3": ("5003", "审核未通过")}
        if resident.status in refused:
            raise Answer(*refused[resident.status])
        data = {**resident.person_fields(), "ehc_card_status": resident.status,
                "cellphone": resident.cellphone, "unit": resident.unit,
                "qr_code": self.issued_static(resident) if resident.status == "1" else "", "qr_code_imgtext": "",
                "dt_qr_code": self.issue_dynamic(resident.id_card), "qr_code_dtimgtext": ""}
        raise Answer("5005", "查询成功", True, data, "ehc_cardinfo")

    def _rhc_e0007(self, op: Operation, values: dict[str, str]) -> None:
        owner = self.find({"id_type": values["self_id_type"], "id_number": values.get("self_id_number", "")})
        if owner is None or owner.status != "1":
            raise Answer("7003", "本人尚未注册健康卡或健康卡处于非正常状态,请先完善本人的健康卡再绑定家庭成员")
        member = self.by_card(values["id_card"])
        if member is None:
            member = self.add_resident(Resident(
                values["name"], values["sex"], values["nation"], values["birthday"], values["id_card"],
                values["telephone"], values["address"], id_type=values["id_type"],
                id_number=values["id_number"], status="4", org_id=values["_org"]))
        if member.key in owner.family:
            raise Answer("7004", "已绑定,请勿重复绑定")
        owner.family[member.key] = values.get("relation", "8")
        raise Answer("7006", "绑定成功", True, {**member.person_fields(), "ehc_card_status": member.status},
                     "personinfo")

    def _rhc_e0008(self, op: Operation, values: dict[str, str]) -> None:
        owner = self.find({"id_type": values["self_id_type"], "id_number": values["self_id_number"]})
        member = self.find(values)
        if owner is None or member is None or member.key not in owner.family:
            raise Answer("8005", "两者已解除绑定或没有绑定关系")
        del owner.family[member.key]
        raise Answer("8006", "解除绑定成功", True)

    def _rhc_e0009(self, op: Operation, values: dict[str, str]) -> None:
        if self.by_card(values["id_card"]) is None:
            raise Answer("9001", "未查到该居民健康卡注册信息")
        raise Answer("9002", "上传用卡数据成功", True)

    def _rhc_e0010(self, op: Operation, values: dict[str, str]) -> None:
        owner = self.find({"id_type": values["self_id_type"], "id_number": values["self_id_number"]})
        if owner is None:
            raise Answer("9001", "未查到该居民健康卡注册信息")
        members = [{"name": m.name, "id_type": m.id_type, "id_number": m.id_number, "id_card": m.id_card,
                    "relation": relation, "ehc_card_status": m.status}
                   for key, relation in owner.family.items() if (m := self.residents.get(key))]
        raise Answer("5005", "查询成功", True, {"total": str(len(members)), "personinfo": members})

    def _rhc_e0011(self, op: Operation, values: dict[str, str]) -> None:
        resident = next((r for r in self.residents.values() if r.ecard_id == values["ecardId"]), None)
        if resident is None:
            raise Answer("11001", "该居民未注册")
        for key in ("sex", "telephone", "address"):
            if values.get(key):
                setattr(resident, key, values[key])
        if values.get("birthday"):
            resident.birthday = values["birthday"].replace("-", "")
        raise Answer("11002", "变更成功", True)

    def _rhc_e0012(self, op: Operation, values: dict[str, str]) -> None:
        code = hashlib.sha256(("temp:%d:%s" % (next(self._counter), values["name"])).encode()).hexdigest().upper()[:20]
        self.temporary_cards[code] = {k: values[k] for k in ("name", "sex", "age", "clinicTime")}
        raise Answer("12002", "申请临时卡成功", True, {"qr_code": code, "qr_code_imgtext": ""})

    def _rhc_e0013(self, op: Operation, values: dict[str, str]) -> None:
        card = self.temporary_cards.get(values["qr_code"])
        if card is None:
            raise Answer("13001", "未找到对应的临时卡")
        raise Answer("13002", "临时卡验证成功", True, card)

    def _rhc_e0014(self, op: Operation, values: dict[str, str]) -> None:
        if values["qr_code_temp"] not in self.temporary_cards:
            raise Answer("14003", "未找到对应的临时居民健康卡")
        key = self.static_codes.get(values["qr_code"])
        if key is None:
            raise Answer("14004", "未找到对应的正式居民健康卡")
        resident = self.residents[key]
        if (resident.name, resident.id_number) != (values["name"], values["id_number"]):
            raise Answer("14005", "正式卡二维码内容与居民信息不符")
        del self.temporary_cards[values["qr_code_temp"]]
        raise Answer("14006", "绑定成功", True)

    def _rhc_e0015(self, op: Operation, values: dict[str, str]) -> None:
        parents = {r.id_card for prefix in ("mother_", "father_")
                   if (r := self.find({"id_type": values.get(prefix + "id_type", ""),
                                       "id_number": values.get(prefix + "id_number", "")}))}
        babies = [{"relation": "2" if r.sex == "1" else "3", **r.person_fields()}
                  for r in self.residents.values() if r.newborn and r.id_card in parents]
        raise Answer("1505", "查询成功", True, {"personinfo": babies}, "personinfos")

    def _rhc_e0017(self, op: Operation, values: dict[str, str]) -> None:
        if values["startDate"] > values["endDate"]:
            raise Answer("1703", "日期格式不正确")
        count = sum(1 for r in self.residents.values() if r.org_id == values["orgId"])
        raise Answer("1704", "查询成功", True, {"count": str(count)})

    # --- for tests and the demo ------------------------------------------------------------

    def journal_for(self, code: str) -> list[JournalEntry]:
        with self._lock:
            return [e for e in self.journal if e.code == code]

    def snapshot(self) -> list[dict[str, Any]]:
        return [{**r.person_fields(), "status": r.status, "static_qr": r.static_qr}
                for r in self.residents.values()]


def _parse_request(text: str, what: str) -> dict[str, str]:
    try:
        root = etree.fromstring(text.encode("utf-8"), _PARSER)
    except etree.XMLSyntaxError:
        raise Answer("1012", "数据解析出现错误: %s 不是 XML" % what) from None
    if root.tag != "request":
        raise Answer("1012", "数据解析出现错误: %s 根节点应为 request" % what)
    out: dict[str, str] = {}
    for child in root:
        if not isinstance(child.tag, str):
            continue
        if len(child):
            raise Answer("1012", "数据解析出现错误: 节点 %s 不应有子节点" % child.tag)
        text_value = child.text or ""
        if text_value != text_value.strip():
            raise Answer("1012", "数据解析出现错误: 节点 %s 包含空格" % child.tag)
        out[child.tag] = text_value
    return out


def _response_xml(answer: Answer) -> str:
    root = etree.Element("response")
    etree.SubElement(root, "result").text = "success" if answer.ok else "failure"
    etree.SubElement(root, "desc").text = answer.desc
    etree.SubElement(root, "resultCode").text = answer.code
    parent = etree.SubElement(root, answer.container) if answer.container and answer.data else root
    for key, value in answer.data.items():
        if isinstance(value, list):
            for item in value:
                node = etree.SubElement(parent, key)
                for k, v in item.items():
                    etree.SubElement(node, k).text = v
        else:
            etree.SubElement(parent, key).text = value
    return etree.tostring(root, encoding="unicode")
