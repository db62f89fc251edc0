"""The messages of spec 000 (Qinghai resident health card platform) as data.

One table per business code RHC_E0001..RHC_E0017, transcribed from the spec's field tables
(chapter 3) and the action table (4.2.1). The adapter checks a request against its table before
sending it; the simulator checks what it receives against the same table, as strictly as the
spec reads. Where the converted document contradicts itself, the decision is noted at the field.
"""

from __future__ import annotations

import base64
import binascii
import re
from datetime import datetime
from typing import Callable, Mapping

import msgspec

from agent.codes import CodeTable
from agent.codes import qwb002 as codes

# the platform refuses these in any parameter (4.3.12 code 1002)
SPECIAL_CHARACTERS = frozenset('&<>"')
# what XML 1.0 cannot carry at all (C0 controls but tab/CR/LF, lone surrogates, U+FFFE/U+FFFF)
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")
# either of the two: one search per value finds the few that need a closer look
_SUSPECT = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff&<>\"]")


class Format(msgspec.Struct, frozen=True):
    name: str
    check: Callable[[str], bool]
    # the return code the platform answers for this format error
    error_code: str = "1012"


def _dated(pattern: str) -> Callable[[str], bool]:
    """Fixed-width ASCII digits (strptime alone takes "199099" and full-width digits), and a real
    date (the pattern alone takes 20241340): the pattern's groups are year, month, day and
    perhaps hour, minute, second, which must make a datetime (strptime did the same per request,
    at several times the cost)."""
    rx = re.compile(pattern)

    def check(value: str) -> bool:
        match = rx.fullmatch(value)
        if match is None:
            return False
        try:
            year, month, day, hour, minute, second = [int(g) for g in match.groups()] + [0] * (6 - rx.groups)
            datetime(year, month, day, hour, minute, second)
        except ValueError:
            return False
        return True
    return check


def _regex_check(pattern: str) -> Callable[[str], bool]:
    rx = re.compile(pattern)
    return lambda value: rx.fullmatch(value) is not None


def _png_base64(value: str) -> bool:
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return False
    return data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) <= 200 * 1024


_YMD = r"([0-9]{4})-([0-9]{2})-([0-9]{2})"
_HMS = r"([0-9]{2}):([0-9]{2}):([0-9]{2})"
DATE8 = Format("yyyyMMdd", _dated(r"([0-9]{4})([0-9]{2})([0-9]{2})"), "6003")
DATE10 = Format("yyyy-MM-dd", _dated(_YMD))
DATETIME = Format("yyyy-MM-dd HH:mm:ss", _dated(_YMD + " " + _HMS))
_DATETIME_NO_SPACE = _dated(_YMD + _HMS)
# resident ID numbers: letters must be upper case (return code 6002)
ID_CARD = Format("18-character resident ID number (X upper case)", _regex_check(r"[0-9]{17}[0-9X]"), "6002")
PHOTO = Format("base64 PNG of at most 200 KB", _png_base64, "6005")
INTEGER = Format("digits", _regex_check(r"[0-9]+"))
QRCODE_TYPE = Format("0 (dynamic) or 1 (static)", _regex_check(r"[01]"))
# newborn registration (3.16) uses its own id types: N1/N2/N3 by birth order, 08 birth certificate
NEWBORN_ID_TYPE = Format("N1, N2, N3 or 08", _regex_check(r"N[123]|08"))


class Field(msgspec.Struct, frozen=True):
    name: str
    title: str
    max_len: int | None = None
    required: bool = False
    table: CodeTable | None = None
    format: Format | None = None


class Operation(msgspec.Struct, frozen=True):
    code: str
    title: str
    section: str
    request: tuple[Field, ...]
    # element that wraps the data in the response (None: directly under <response>)
    response_container: str | None = None
    # response elements that may repeat and always parse as lists
    response_lists: tuple[str, ...] = ()
    # alternatives: the request must fill every field of at least one group
    one_of: tuple[tuple[str, ...], ...] = ()
    one_of_text: str = ""
    # a field that may be left out when another field has a given value
    optional_when: Mapping[str, tuple[str, str]] = msgspec.field(default_factory=dict)

    def field(self, name: str) -> Field | None:
        for f in self.request:
            if f.name == name:
                return f
        return None


def F(name: str, title: str, max_len: int | None = None, required: bool = False,
      table: CodeTable | None = None, format: Format | None = None) -> Field:
    return Field(name, title, max_len, required, table, format)


_ID_CHOICE = (("id_card",), ("id_type", "id_number"))
_ID_CHOICE_TEXT = "有身份证号只需传身份证号,没有身份证号就传证件类型和证件号码"
# V1.8: a newborn registers without id_card, with id_type 99 and the birth certificate number
_NEWBORN_EXEMPTION = {"id_card": ("id_type", "99")}

_REGISTER_PERSON = (
    F("name", "居民姓名", 32, True),
    F("telephone", "联系电话", 11, True),
    F("id_number", "证件号码", 18, True),
    F("id_type", "证件类型", 2, True, codes.ID_TYPE),
    F("id_card", "居民身份证号", 18, True, format=ID_CARD),
    F("nation", "民族", 2, True, codes.NATION),
    F("sex", "性别", 1, True, codes.SEX),
    F("birthday", "出生日期", 8, True, format=DATE8),
)

OPERATIONS: dict[str, Operation] = {op.code: op for op in (
    Operation("RHC_E0001", "电子健康卡注册", "3.1", _REGISTER_PERSON + (
        F("photo_front", "居民身份证件照片正面", None, True, format=PHOTO),
        F("photo_reverse", "居民身份证件照片背面", None, True, format=PHOTO),
        F("photo_face", "居民本人正面头像", None, True, format=PHOTO),
        F("address", "户籍地址", 256, True),
        F("cellphone", "手机号码", 20),
        F("unit", "工作单位", 100),
    ), response_container="personinfo", optional_when=_NEWBORN_EXEMPTION),
    Operation("RHC_E0002", "申请居民电子健康卡二维码", "3.2", (
        F("id_card", "身份证号", 18, format=ID_CARD),
        F("id_type", "证件类型", 2, table=codes.ID_TYPE),
        F("id_number", "证件号码", 32),
        F("qrcode_type", "二维码类型", 1, True, format=QRCODE_TYPE),
    ), response_container="ehc_cardinfo", one_of=_ID_CHOICE, one_of_text=_ID_CHOICE_TEXT),
    Operation("RHC_E0003", "电子健康卡二维码验证", "3.3", (
        F("qr_code", "二维码密文", 256, True),
        F("time", "刷卡时间", 19, format=DATETIME),
        F("sam", "扫描枪终端标识号", 20),
        F("use_citycode", "用卡城市代码", 10),
        F("use_cityname", "用卡城市名称", 20),
        F("hospital_code", "用卡机构代码", 20),
        F("hospital_name", "用卡机构名称", 50),
        F("channel_code", "刷卡终端类型", 3, table=codes.TERMINAL_TYPE),
        F("channel_name", "刷卡终端名称", 10),
        # the table says length 4, but every code in 4.3.9 has 6 digits
        F("medstep_code", "诊疗环节代码", 6, table=codes.MEDICAL_STEP),
        F("medstep_name", "诊疗环节名称", 10),
    ), response_container="ehc_cardinfo"),
    Operation("RHC_E0004", "电子健康卡注销", "3.4", (
        F("id_card", "居民身份证号", 18, format=ID_CARD),
        F("id_type", "证件类型", 2, table=codes.ID_TYPE),
        F("id_number", "证件号码", 32),
        F("qr_code", "二维码密文", 256, True),
    ), one_of=_ID_CHOICE, one_of_text=_ID_CHOICE_TEXT),
    # the table marks id_card required but its note (and V1.8) allow id_type + id_number instead
    Operation("RHC_E0005", "查询电子健康卡二维码", "3.5", (
        F("id_card", "居民身份证号", 18, format=ID_CARD),
        F("id_type", "证件类型", 2, table=codes.ID_TYPE),
        F("id_number", "证件号码", 32),
    ), response_container="ehc_cardinfo", one_of=_ID_CHOICE, one_of_text=_ID_CHOICE_TEXT),
    Operation("RHC_E0006", "电子健康卡注册(现场认证)", "3.6", _REGISTER_PERSON + (
        F("address", "户籍地址", 256, True),
        F("auth_id_card", "认证人身份证件号码", 18, True, format=ID_CARD),
        F("auth_name", "认证人姓名", 50, True),
        F("cellphone", "手机号码", 20),
        F("unit", "工作单位", 100),
    ), response_container="personinfo", optional_when=_NEWBORN_EXEMPTION),
    Operation("RHC_E0007", "家庭成员健康卡绑定", "3.7", (
        F("self_id_type", "本人证件类型", 2, True, codes.ID_TYPE),
        F("self_id_number", "本人证件号码", 18),
        F("relation", "家庭成员关系代码", 1, table=codes.FAMILY_RELATION),
        F("name", "家庭成员姓名", 32, True),
        F("telephone", "家庭成员联系电话", 11, True),
        F("id_number", "家庭成员证件号码", 18, True),
        F("id_type", "家庭成员证件类型", 2, True, codes.ID_TYPE),
        F("id_card", "家庭成员居民身份证号", 18, True, format=ID_CARD),
        F("nation", "家庭成员民族", 2, True, codes.NATION),
        F("sex", "家庭成员性别", 1, True, codes.SEX),
        F("birthday", "家庭成员出生日期", 8, True, format=DATE8),
        F("photo_front", "家庭成员身份证件照片正面", format=PHOTO),
        F("photo_reverse", "家庭成员身份证件照片背面", format=PHOTO),
        F("photo_face", "家庭成员本人正面头像", format=PHOTO),
        F("address", "家庭成员户籍地址", 256, True),
    ), response_container="personinfo"),
    Operation("RHC_E0008", "家庭成员健康卡解除绑定", "3.8", (
        F("self_id_type", "本人证件类型", 2, True, codes.ID_TYPE),
        F("self_id_number", "本人证件号码", 18, True),
        F("id_type", "家庭成员证件类型", 2, True, codes.ID_TYPE),
        F("id_number", "家庭成员证件号码", 18, True),
    )),
    Operation("RHC_E0009", "上传实体卡用卡记录", "3.9", (
        # length 15 in the table cannot hold its own format (19 characters): the format wins
        F("time", "用卡时间", 19, True, format=DATETIME),
        F("atr", "ATR 卡号", 20, True),
        F("hc_number", "健康卡卡号", 19, True),
        F("sam", "SAM 卡号", 20, True),
        F("use_citycode", "用卡城市代码", 7, True),
        F("use_cityname", "用卡城市名称", 50, True),
        F("name", "姓名", 40),
        F("sex", "性别代码", 1, table=codes.SEX),
        F("nation", "民族代码", 2, True, codes.NATION),
        F("birthday", "出生日期", 8, format=DATE8),
        F("telephone", "联系方式", 12),
        F("id_card", "身份证号", 18, True, format=ID_CARD),
        F("address", "户籍所在地", 250),
        F("hospital_code", "医疗机构代码", 10, True),
        F("hospital_name", "医疗机构名称", 50, True),
        F("channel_code", "刷卡终端类型编号", 3, True, codes.TERMINAL_TYPE),
        F("channel_name", "刷卡终端类型名称", 10, True),
        F("medstep_code", "诊疗环节代码", 6, table=codes.MEDICAL_STEP),
        F("medstep_name", "诊疗环节名称", 10),
    )),
    Operation("RHC_E0010", "查询家庭成员", "3.10", (
        F("self_id_type", "本人证件类型", 2, True, codes.ID_TYPE),
        F("self_id_number", "本人证件号码", 18, True),
    ), response_lists=("personinfo",)),
    Operation("RHC_E0011", "修改电子健康卡信息", "3.11", (
        F("ecardId", "电子健康卡 ID", 64, True),
        F("sex", "变更性别", 18, table=codes.SEX),
        F("birthday", "出生日期", None, format=DATE10),
        F("telephone", "联系电话"),
        F("address", "地址"),
        F("alterNo", "外部变更流水号", None, True),
        F("alterTime", "外部变更时间", None, True, format=DATETIME),
    )),
    Operation("RHC_E0012", "申请临时电子健康卡", "3.12", (
        F("name", "姓名", 30, True),
        F("sex", "性别", 1, True, codes.SEX),
        F("age", "年龄", 5, True, format=INTEGER),
        F("clinicTime", "就诊时间", None, True, format=Format(DATETIME.name, DATETIME.check, "12001")),
        F("empi", "院内主索引"),
    )),
    Operation("RHC_E0013", "验证临时电子健康卡", "3.13", (
        F("qr_code", "二维码", 20, True),
    )),
    Operation("RHC_E0014", "电子健康卡绑定临时卡", "3.14", (
        # the table says 50, but the formal card's code is what E0002 issues and E0003 takes, up
        # to 256 characters (a static code alone has 66): 50 would refuse every real card
        F("qr_code", "正式卡二维码内容", 256, True),
        F("qr_code_temp", "临时卡二维码内容", 100, True),
        F("name", "居民姓名", 32, True),
        F("id_type", "证件类型", 2, True, codes.ID_TYPE),
        F("id_number", "证件号码", 18, True),
        F("sex", "性别", 1, True, codes.SEX),
    )),
    Operation("RHC_E0015", "获取新生儿信息", "3.15", (
        F("mother_name", "母亲姓名", 50),
        F("mother_id_type", "母亲证件类型", 2, table=codes.ID_TYPE),
        F("mother_id_number", "母亲证件号码", 30),
        F("mother_ecard_id", "母亲电子健康卡 ID", 50),
        F("father_name", "父亲姓名", 50),
        F("father_id_type", "父亲证件类型", 2, table=codes.ID_TYPE),
        F("father_id_number", "父亲证件号码", 30),
        F("father_ecard_id", "父亲电子健康卡 ID", 50),
    ), response_container="personinfos", response_lists=("personinfo",),
        one_of=(("mother_id_type", "mother_id_number"), ("mother_ecard_id",),
                ("father_id_type", "father_id_number"), ("father_ecard_id",)),
        one_of_text="父母亲的信息不能同时为空"),
    Operation("RHC_E0016", "新生儿健康卡注册", "3.16", (
        F("name", "新生儿姓名", 32, True),
        F("telephone", "联系电话", 11, True),
        F("id_number", "证件号码", 18, True),
        F("id_type", "证件类型", 2, True, format=NEWBORN_ID_TYPE),
        F("id_card", "新生儿身份证号", 18, True, format=ID_CARD),
        F("nation", "民族", 2, True, codes.NATION),
        F("sex", "性别", 1, True, codes.SEX),
        F("birthday", "出生日期", 8, True, format=DATE8),
        F("address", "户籍地址", 256, True),
    ), response_container="personinfo"),
    Operation("RHC_E0017", "查询机构建卡数量", "3.17", (
        F("orgId", "机构代码", 32, True),
        F("startDate", "起始日期", 10, True, format=Format(DATE10.name, DATE10.check, "1703")),
        F("endDate", "截止日期", 10, True, format=Format(DATE10.name, DATE10.check, "1703")),
    )),
)}

# 4.2.1 参数 action 描述, in the table's order. msgCreateTime: the table says
# "YYYY-MM-DDHH:mm:ss", length 17, which fits no rendering of that pattern; the conversion lost
# the space. scanbox sends "yyyy-MM-dd HH:mm:ss" like every other time field of the spec; the
# simulator accepts both.
MSG_GUID = Format("32 hex digits", _regex_check(r"[0-9A-Fa-f]{32}"))
ACTION_FIELDS: tuple[Field, ...] = (
    F("msgGuid", "消息标识符号", 32, True, format=MSG_GUID),
    F("msgType", "消息类别", 7, True, format=Format("1", _regex_check(r"1"))),
    F("bussinessCode", "消息编号", 50, True),
    F("msgCreateTime", "消息创建时间", 19, True, format=Format(
        "yyyy-MM-dd HH:mm:ss",
        lambda v: DATETIME.check(v) or _DATETIME_NO_SPACE(v))),
    F("orgId", "机构 ID", 32),
    F("appCode", "APP 编码", 6),
    F("userName", "用户名称", 32, True),
    F("userPwd", "用户密码", 32, True),
    F("stdVerCode", "版本", 100),
    F("encryption", "加密标签", 1),
)


class Problem(msgspec.Struct, frozen=True):
    """One reason a message does not meet its table, with the code the platform would answer."""

    field: str
    text: str
    code: str

    def __str__(self) -> str:
        return "%s: %s" % (self.field, self.text)


def check_fields(fields: tuple[Field, ...], values: Mapping[str, str]) -> list[Problem]:
    """Every problem with `values` against `fields`, in table order."""
    problems: list[Problem] = []
    for f in fields:
        value = values.get(f.name)
        if value is None or value == "":
            if f.required:
                problems.append(Problem(f.name, "required (%s)" % f.title, "1001"))
            continue
        if _SUSPECT.search(value) is not None:
            bad_char = _NOT_XML.search(value)
            if bad_char:
                problems.append(Problem(f.name, "contains character U+%04X at offset %d, which XML cannot carry"
                                        % (ord(bad_char.group()), bad_char.start()), "1012"))
                continue
            bad = "".join(sorted(SPECIAL_CHARACTERS.intersection(value)))
            problems.append(Problem(f.name, "contains %s, which the platform refuses" % bad, "1002"))
            continue
        if f.max_len is not None and len(value) > f.max_len:
            problems.append(Problem(f.name, "%d characters, at most %d allowed" % (len(value), f.max_len), "1012"))
        if f.table is not None and value not in f.table:
            problems.append(Problem(f.name, "%r is not a code of %s" % (value, f.table.describe()), "1012"))
        if f.format is not None and not f.format.check(value):
            problems.append(Problem(f.name, "%r is not %s" % (_short(value), f.format.name), f.format.error_code))
    return problems


def check_message(op: Operation, values: Mapping[str, str]) -> list[Problem]:
    names = _FIELD_NAMES.get(op.code)
    if names is None or names[0] is not op:
        names = _FIELD_NAMES[op.code] = (op, frozenset(f.name for f in op.request))
    problems = [Problem(name, "not a field of %s" % op.code, "1012") for name in sorted(values.keys() - names[1])]
    fields = op.request
    if op.optional_when:
        exempt = {name for name, (other, value) in op.optional_when.items() if values.get(other) == value}
        if exempt:
            fields = tuple(Field(f.name, f.title, f.max_len, False, f.table, f.format) if f.name in exempt else f
                           for f in fields)
    problems += check_fields(fields, values)
    if op.one_of and not any(all(values.get(n) for n in group) for group in op.one_of):
        problems.append(Problem("/".join(sorted({n for g in op.one_of for n in g})), op.one_of_text, "1001"))
    return problems


# each operation's field names, made once (with the operation they are of)
_FIELD_NAMES: dict[str, tuple[Operation, frozenset[str]]] = {}


def _short(value: str) -> str:
    return value if len(value) <= 40 else value[:37] + "..."
