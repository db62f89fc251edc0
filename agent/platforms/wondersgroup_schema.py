"""The DTOs of spec 001 (wondersgroup healthCardService) as data, and the checks both the adapter
(before sending) and the simulator (on receipt) apply to them. Spec 003 (Foshan JSON) carries
the same PeopleInfo, so its adapter and simulator use these checks too.

Each problem carries the platform's own return code for it (10113 for a sex code, 10124 for a
birth date, ...), so the simulator answers what the platform would and the adapter's refusal
names the same code a HIS developer would find in the spec.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Callable, Mapping

from agent.codes import CodeTable, qwb002, wondersgroup

# GB/T 3304 as spec 001 12.1 lists it: qwb002's 56 nations, plus 97 其他 and 98 外国血统中国籍人士
NATION = CodeTable("GB_T_3304", "民族", {**{k: v for k, v in qwb002.NATION.entries.items() if k != "99"},
                                         "97": "其他", "98": "外国血统中国籍人士"})
# CV02.01.101 as spec 001/003 list it (no 08)
ID_TYPE = CodeTable("CV02.01.101", "身份证件类别",
                    {k: v for k, v in qwb002.ID_TYPE.entries.items() if k != "08"})
PAYMENT = CodeTable("CV07.10.003", "医疗费用支付方式", {
    "01": "城镇职工基本医疗保险", "02": "城镇居民基本医疗保险", "03": "新型农村合作医疗", "04": "贫困救助",
    "05": "商业医疗保险", "06": "全公费", "07": "全自费", "99": "其他",
})
CARD_KIND = CodeTable("klx", "卡的类别", {"1": "正式卡", "3": "电子健康卡"})
# what XML 1.0 cannot carry at all
_NOT_XML = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


@dataclass(frozen=True)
class Problem:
    field: str
    text: str
    code: str  # the platform's return code for it

    def __str__(self) -> str:
        return "%s: %s" % (self.field, self.text)


def resident_id_ok(value: str) -> bool:
    """GB 11643: 17 digits and the check character (X upper case)."""
    if re.fullmatch(r"[0-9]{17}[0-9X]", value) is None:
        return False
    weights = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
    return "10X98765432"[sum(int(d) * w for d, w in zip(value[:17], weights, strict=True)) % 11] == value[17]


def birth_date(value: str) -> str | None:
    """YYYYMMDD from YYYYMMDD or YYYY-MM-DD, or None when it is not a real date.

    Spec 001's field table says YYYYMMDD, its updateCardInfo sample sends 2010-01-01: the
    platform evidently takes both. scanbox sends YYYYMMDD; the simulator takes both."""
    for fmt, pattern in (("%Y%m%d", r"[0-9]{8}"), ("%Y-%m-%d", r"[0-9]{4}-[0-9]{2}-[0-9]{2}")):
        if re.fullmatch(pattern, value):
            try:
                return datetime.strptime(value, fmt).strftime("%Y%m%d")
            except ValueError:
                return None
    return None


@dataclass(frozen=True)
class Field:
    name: str
    title: str
    max_len: int | None = None
    required: bool = False
    table: CodeTable | None = None
    check: Callable[[str], bool] | None = None
    # the return code for a wrong value (10110 参数错误 where the table has none of its own)
    code: str = "10110"


def _date(value: str) -> bool:
    return birth_date(value) is not None


def _digits(limit: int) -> Callable[[str], bool]:
    return lambda value: re.fullmatch(r"[0-9]{1,%d}" % limit, value) is not None


# PeopleInfo (6.3). Required as the table marks them where scanbox can know them; the
# occupation/education/marital codes the table also marks 必填 are not asked of a scan box
# (its sync section says for electronic cards "能获取到的参数都传，只要接口不返回错误码即可").
PEOPLE_INFO: tuple[Field, ...] = (
    Field("xm", "姓名", 32, True, code="10114"),
    Field("xb", "性别", 1, True, qwb002.SEX, code="10113"),
    Field("mzdm", "民族代码", 2, True, NATION, code="10123"),
    Field("csrq", "出生日期", 10, True, check=_date, code="10124"),
    Field("sfzhm", "居民身份证号码", 18, check=resident_id_ok, code="10111"),
    Field("zjlx", "证件类别", 2, True, ID_TYPE, code="10134"),
    Field("zjhm", "证件号码", 18, True),
    Field("jkdah", "健康档案号", 17),
    Field("xnhkh", "新农合卡号", 18),
    Field("fyzhdm", "婚姻状况代码", 2, code="10132"),
    Field("xldm", "文化程度代码", 2, code="10133"),
    Field("zydm", "职业类别代码", 4, code="10135"),
    Field("dzlb", "地址类别", 1, check=lambda v: v in ("1", "2"), code="10136"),
    Field("dzsf", "地址-省", 20),
    Field("dzs", "地址-市", 20),
    Field("dzqx", "地址-县（区）", 20),
    Field("dzxz", "地址-乡（镇、街道）", 20),
    Field("dzc", "地址-村（街、路、弄）", 20),
    Field("brdh", "本人电话号码", 20, check=_digits(20)),
    Field("ylfyzffs", "医疗费用支付方式", 2, table=PAYMENT, code="10131"),
    Field("jzkkh", "就诊卡卡号", 20),
    Field("citizenship", "国籍", 3),
    Field("birthPlace", "出生地址"),
    Field("domicile", "户籍地址"),
    # "unitWrok" (sic) is the spec's spelling in the DTO table and both samples
    Field("unitWrok", "工作单位名称"),
    # only in updateCardInfo's sample ("< appUserID></ appUserID>", itself malformed XML)
    Field("appUserID", "应用用户ID"),
)

# CardInfo (6.3), for klx=3 (electronic card) as a scan box issues it
CARD_INFO: tuple[Field, ...] = (
    Field("klx", "卡的类别", 1, True, CARD_KIND),
    Field("gfbb", "规范版本", 4),
    Field("orgCode", "发卡机构代码", 30, True, code="10101"),
    Field("fksj", "发卡时间", 8, True, check=lambda v: re.fullmatch(r"[0-9]{8}", v) is not None and _date(v),
          code="10128"),
    Field("kh", "卡号", 18),
    Field("aqm", "安全码", 3),
    Field("fkxlh", "发卡序列号", 10, code="10142"),
    Field("yycsdm", "应用城市代码", 6, code="10144"),
    Field("xpxlh", "芯片序列号/电子健康卡号", 64, code="10141"),
    Field("yhkh", "银行卡号", 64, code="10151"),
    Field("jkkzt", "健康卡状态", 1, check=lambda v: v in ("1", "3", "9")),
    Field("issuingMode", "发卡方式", 1, True, wondersgroup.ISSUING_MODE, code="10154"),
    Field("bankCode", "银行代码", 22, code="10155"),
    Field("isRealName", "是否实名标识", 1, True, check=lambda v: v in ("0", "1")),
    Field("terminalType", "终端类型", 2, table=wondersgroup.TERMINAL_TYPE),
    Field("qrType", "二维码类型"),
    Field("pcName", "pcName"),
    Field("pcIp", "pcIp"),
    Field("macId", "macId"),
    Field("payAccType", "支付方式"),
    Field("regChannel", "注册渠道"),
)

# UseCardInfo (6.3) of virIdCardVerify: every field 必填
USE_CARD_INFO: tuple[Field, ...] = (
    Field("issuingMode", "二维码来源渠道", 2, True, wondersgroup.QR_CHANNEL),
    Field("depCode", "刷卡科室代码", 4, True, check=lambda v: re.fullmatch(r"[0-9]{4}", v) is not None),
    Field("depType", "科室类型", 2, True, wondersgroup.DEPARTMENT_TYPE),
    Field("machineCode", "机具号", 64, True),
    # the table says 4 Len; every code of 12.1.15 (and the sample, 010101) has 6 digits
    Field("medStepcode", "诊疗环节代码", 6, True, wondersgroup.MEDICAL_STEP),
    Field("medType", "就诊类型", 2, True, wondersgroup.MEDICAL_TYPE),
    Field("terminalType", "终端类型", 2, True, wondersgroup.TERMINAL_TYPE),
)


@dataclass(frozen=True)
class Operation:
    name: str
    title: str
    # top-level parameters (strings) besides orgCode/authKey, with the nested DTOs apart
    fields: tuple[Field, ...]
    nested: Mapping[str, tuple[Field, ...]]
    required_nested: tuple[str, ...] = ()


# the tables give qrCode "1Len", which no QR payload fits: taken as a slip for the 256 of spec
# 000's ciphertext (static codes are 66 characters, dynamic ones 99)
QR_CODE = Field("qrCode", "电子健康卡二维码内容", 256, True)

# getAuthKey is the adapter's own business, not an operation a HIS calls. Spec text notes:
# - syncCardInfo's input sample is cut off in the document (only its last lines, from
#   terminalType, survive); the CardInfo table is followed.
# - downQr's parameter table says szInput is "orgCode、userName、passWord" and szOutput has
#   "authKey": copied from getAuthKey; its field table and sample (orgCode, authKey, name, zjlx,
#   zjhm; empi, vuid, img) are followed.
# - orgCode is 1-30 (getAuthKey), 1-50 (syncCardInfo, updateCardInfo) or 1-22 (virIdCardVerify,
#   downQr) long by table; [platform.wondersgroup] org_code allows 30, what getAuthKey takes.
OPERATIONS: dict[str, Operation] = {op.name: op for op in (
    Operation("virIdCardVerify", "电子健康卡身份验证", (QR_CODE,), {"useCardInfo": USE_CARD_INFO}, ("useCardInfo",)),
    # cardInfo.peopleInfo is nested one level deeper; handled by check_operation
    Operation("syncCardInfo", "发卡同步（发电子卡）", (), {"cardInfo": CARD_INFO}, ("cardInfo",)),
    Operation("updateCardInfo", "信息更新", (
        Field("qrCode", "电子健康卡二维码内容", 256),
        Field("issuingMode", "二维码来源渠道", 2, table=wondersgroup.QR_CHANNEL),
        Field("terminalType", "终端类型", 2, table=wondersgroup.TERMINAL_TYPE),
    ), {"peopleInfo": PEOPLE_INFO}, ("peopleInfo",)),
    Operation("downQr", "电子卡静态二维码下载", (
        Field("name", "姓名", 32, True, code="10114"),
        Field("zjlx", "身份证件类型", 2, True, ID_TYPE, code="10134"),
        Field("zjhm", "证件号码", 64, True),
    ), {}),
)}


def check_fields(fields: tuple[Field, ...], values: Mapping[str, Any], prefix: str = "") -> list[Problem]:
    """Every problem of `values` against `fields`, in table order; unknown keys too."""
    known = {f.name for f in fields}
    problems = [Problem(prefix + k, "not a field of this DTO", "10110") for k in values if k not in known]
    for f in fields:
        value = values.get(f.name)
        where = prefix + f.name
        if value is None or value == "":
            if f.required:
                problems.append(Problem(where, "required (%s)" % f.title, f.code))
            continue
        if not isinstance(value, str):
            problems.append(Problem(where, "must be a string", "10110"))
            continue
        bad = _NOT_XML.search(value)
        if bad:
            problems.append(Problem(where, "contains character U+%04X, which XML cannot carry" % ord(bad.group()),
                                    "10110"))
        elif f.max_len is not None and len(value) > f.max_len:
            problems.append(Problem(where, "%d characters, at most %d allowed" % (len(value), f.max_len), f.code))
        elif f.table is not None and value not in f.table:
            problems.append(Problem(where, "%r is not a code of %s" % (value, f.table.describe()), f.code))
        elif f.check is not None and not f.check(value):
            problems.append(Problem(where, "%r is not a valid %s" % (value[:40], f.title), f.code))
    return problems


def check_people(values: Mapping[str, Any], prefix: str = "peopleInfo.") -> list[Problem]:
    problems = check_fields(PEOPLE_INFO, values, prefix)
    # a resident ID card's number is checked as one (10111), whichever field carries it
    if values.get("zjlx") == "01" and isinstance(values.get("zjhm"), str) and values.get("zjhm") \
            and not resident_id_ok(values["zjhm"]):
        problems.append(Problem(prefix + "zjhm", "not a valid resident ID number", "10111"))
    return problems


def check_operation(op: Operation, values: Mapping[str, Any]) -> list[Problem]:
    """`values`: the operation's parameters without orgCode/authKey."""
    top = {k: v for k, v in values.items() if k not in op.nested}
    problems = check_fields(op.fields, top)
    for name, fields in op.nested.items():
        sub = values.get(name)
        if sub is None or sub == {}:
            if name in op.required_nested:
                problems.append(Problem(name, "required", "10149"))
            continue
        if not isinstance(sub, Mapping):
            problems.append(Problem(name, "must be an object", "10110"))
            continue
        if fields is PEOPLE_INFO:
            problems += check_people(sub, name + ".")
            continue
        people = sub.get("peopleInfo") if fields is CARD_INFO else None
        rest = {k: v for k, v in sub.items() if not (fields is CARD_INFO and k == "peopleInfo")}
        problems += check_fields(fields, rest, name + ".")
        if fields is CARD_INFO:
            if not isinstance(people, Mapping) or not people:
                problems.append(Problem(name + ".peopleInfo", "required", "10149"))
            else:
                problems += check_people(people, name + ".peopleInfo.")
    return problems
