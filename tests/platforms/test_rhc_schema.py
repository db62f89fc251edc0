"""Spec 000 message tables (agent/platforms/rhc_schema.py) and the adapter's pure helpers
(build_xml, build_action, parse_response, identity_from), checked against the spec's text."""

from __future__ import annotations

import base64
import re
import struct
import zlib
from datetime import datetime
from pathlib import Path

import pytest
from lxml import etree

from agent.model import IdentitySource, Reason, ScanboxError
from agent.platforms.base import PlatformUnavailable
from agent.platforms.rhc import RhcPlatform, build_xml, identity_from, parse_response
from agent.platforms.rhc_schema import ACTION_FIELDS, OPERATIONS, check_message
from agent.simulator.rhc import id_check_digit, make_id
from tests.conftest import make_config

# the spec ships in the repo: these tests never skip
SPEC = Path(__file__).resolve().parents[2] / "docs" / "specs" / "000_7d1296688b65c848.txt"


# --- realistic values ---------------------------------------------------------------------

def png(width: int = 2, height: int = 2, extra: bytes = b"") -> bytes:
    """A real (decodable) RGB PNG; `extra` pads it with an ancillary chunk."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + b"\xc8\x10\x2e" * width for _ in range(height))
    body = chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
    if extra:
        body += chunk(b"tEXt", b"Comment\x00" + extra)
    return b"\x89PNG\r\n\x1a\n" + body + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b"")


PHOTO = base64.b64encode(png()).decode()
ZHANG = make_id("630102", "19850312", "123")        # 张晓明
CHILD = make_id("630102", "20150601", "215")
AUTH = make_id("630104", "19700101", "018")          # the nurse who authenticates on site
MOTHER = make_id("630104", "19920708", "562")
STATIC_QR = "3F2A" * 16 + ":1"
DYNAMIC_QR = "3F2A" * 16 + ":0:" + "0123456789ABCDEF" * 2
TEMP_QR = "A1B2C3D4E5F6A7B8C9D0"
NOW = "2024-03-05 08:30:00"


def id_with_x() -> str:
    """A valid resident ID whose GB 11643 check character is X."""
    for seq in range(1000):
        first17 = "630102" + "19900917" + "%03d" % seq
        if id_check_digit(first17) == "X":
            return first17 + "X"
    raise AssertionError("no ID with check character X")


def test_make_id_check_digit_is_gb11643():
    # the published example of GB 11643: 11010519491231002X
    assert make_id("110105", "19491231", "002") == "11010519491231002X"
    assert len(ZHANG) == 18 and ZHANG[:17].isdigit()


VALID: dict[str, dict[str, str]] = {
    "RHC_E0001": {
        "name": "张晓明", "telephone": "09718123456", "id_number": ZHANG, "id_type": "01",
        "id_card": ZHANG, "nation": "01", "sex": "1", "birthday": "19850312",
        "photo_front": PHOTO, "photo_reverse": PHOTO, "photo_face": PHOTO,
        "address": "青海省西宁市城东区八一路12号", "cellphone": "13897001234", "unit": "西宁市第一中学",
    },
    "RHC_E0002": {"id_card": ZHANG, "id_type": "01", "id_number": ZHANG, "qrcode_type": "1"},
    "RHC_E0003": {
        "qr_code": STATIC_QR, "time": NOW, "sam": "45600001X5500", "use_citycode": "630100",
        "use_cityname": "西宁市", "hospital_code": "QH0001", "hospital_name": "西宁市第一人民医院",
        "channel_code": "01", "channel_name": "人工窗口", "medstep_code": "010101", "medstep_name": "挂号",
    },
    "RHC_E0004": {"id_card": ZHANG, "id_type": "01", "id_number": ZHANG, "qr_code": STATIC_QR},
    "RHC_E0005": {"id_card": ZHANG, "id_type": "01", "id_number": ZHANG},
    "RHC_E0006": {
        "name": "张晓明", "telephone": "09718123456", "id_number": ZHANG, "id_type": "01",
        "id_card": ZHANG, "nation": "01", "sex": "1", "birthday": "19850312",
        "address": "青海省西宁市城东区八一路12号", "auth_id_card": AUTH, "auth_name": "王护士",
        "cellphone": "13897001234", "unit": "西宁市第一中学",
    },
    "RHC_E0007": {
        "self_id_type": "01", "self_id_number": ZHANG, "relation": "2", "name": "张小宝",
        "telephone": "09718123456", "id_number": CHILD, "id_type": "01", "id_card": CHILD,
        "nation": "01", "sex": "1", "birthday": "20150601", "photo_front": PHOTO,
        "photo_reverse": PHOTO, "photo_face": PHOTO, "address": "青海省西宁市城东区八一路12号",
    },
    "RHC_E0008": {"self_id_type": "01", "self_id_number": ZHANG, "id_type": "01", "id_number": CHILD},
    "RHC_E0009": {
        "time": NOW, "atr": "3B6D000000813186540B", "hc_number": "6300001234567890123",
        "sam": "45600001X5500", "use_citycode": "630100", "use_cityname": "西宁市", "name": "张晓明",
        "sex": "1", "nation": "01", "birthday": "19850312", "telephone": "09718123456", "id_card": ZHANG,
        "address": "青海省西宁市城东区八一路12号", "hospital_code": "QH0001",
        "hospital_name": "西宁市第一人民医院", "channel_code": "02", "channel_name": "自助机",
        "medstep_code": "010105", "medstep_name": "收费",
    },
    "RHC_E0010": {"self_id_type": "01", "self_id_number": ZHANG},
    "RHC_E0011": {
        "ecardId": "9C1F4E2A7B3D5E6F8A0B", "sex": "1", "birthday": "1985-03-12",
        "telephone": "13897001234", "address": "青海省西宁市城西区五四西路8号",
        "alterNo": "HIS202403050001", "alterTime": NOW,
    },
    "RHC_E0012": {"name": "王小二", "sex": "1", "age": "35", "clinicTime": NOW, "empi": "EMPI000123"},
    "RHC_E0013": {"qr_code": TEMP_QR},
    "RHC_E0014": {"qr_code": "3F2A" * 12, "qr_code_temp": TEMP_QR, "name": "张晓明", "id_type": "01",
                  "id_number": ZHANG, "sex": "1"},
    "RHC_E0015": {
        "mother_name": "马丽娟", "mother_id_type": "01", "mother_id_number": MOTHER,
        "mother_ecard_id": "9C1F4E2A7B3D5E6F8A0B", "father_name": "张晓明", "father_id_type": "01",
        "father_id_number": ZHANG, "father_ecard_id": "0A1B2C3D4E5F60718293",
    },
    "RHC_E0016": {
        "name": "马丽娟之子", "telephone": "09716254321", "id_number": MOTHER, "id_type": "N1",
        "id_card": MOTHER, "nation": "03", "sex": "1", "birthday": "20240301",
        "address": "青海省西宁市城西区五四西路8号",
    },
    "RHC_E0017": {"orgId": "QH0001", "startDate": "2024-01-01", "endDate": "2024-03-31"},
}


def problems(code: str, values: dict[str, str]) -> list[tuple[str, str]]:
    return [(p.field, p.code) for p in check_message(OPERATIONS[code], values)]


def with_(code: str, **changes: str | None) -> dict[str, str]:
    values = dict(VALID[code])
    for key, value in changes.items():
        if value is None:
            values.pop(key, None)
        else:
            values[key] = value
    return values


def test_every_operation_has_a_valid_example():
    assert sorted(VALID) == ["RHC_E%04d" % n for n in range(1, 18)] == sorted(OPERATIONS)


@pytest.mark.parametrize("code", sorted(VALID))
def test_complete_valid_message_passes(code):
    assert set(VALID[code]) == {f.name for f in OPERATIONS[code].request}, "example must fill every field"
    assert check_message(OPERATIONS[code], VALID[code]) == []


# --- the field tables against the spec text ------------------------------------------------

def _spec_lines() -> list[str]:
    return SPEC.read_text(encoding="utf-8").splitlines()


def spec_request_rows(n: int) -> list[tuple[str, int | None, bool]]:
    """(name, length, required) of the message table of section 3.n, repairing the conversion
    damage the document has: Greek capital upsilon for Y in 3.9, unnumbered rows in 3.11, and
    3.7 row 15 flattened into one line with the XML sample."""
    lines = _spec_lines()
    start = next(i for i, line in enumerate(lines) if re.match(r"^3\.%d\.2\s*请求消息" % n, line))
    end = next(i for i, line in enumerate(lines) if i > start and re.match(r"^3\.%d\.3\s*应答消息" % n, line))
    rows: list[tuple[str, int | None, bool]] = []
    for line in lines[start:end]:
        cols = [c.strip() for c in line.split("\t")]
        if (len(cols) >= 6 and re.fullmatch(r"(\d+\.?(\s*\d+)?)?", cols[0])
                and re.fullmatch(r"[A-Za-z_]+", cols[2]) and cols[3] == "String"):
            rows.append((cols[2], int(cols[4]) if cols[4] else None, cols[5].replace("\u03a5", "Y") == "Y"))
            continue
        m = re.match(r"^\d+\.\s+\S+\s+(\d+)\s+([YN])\s+([A-Za-z_]+)\s+String", line)
        if m:
            rows.append((m.group(3), int(m.group(1)), m.group(2) == "Y"))
    return rows


# transcription decisions documented in rhc_schema.py: field -> (spec length/required, code's)
DOCUMENTED_DEVIATIONS = {
    ("RHC_E0003", "medstep_code"): "length 4 cannot hold the 6-digit codes of 4.3.9",
    ("RHC_E0009", "medstep_code"): "length 4 cannot hold the 6-digit codes of 4.3.9",
    ("RHC_E0009", "time"): "length 15 cannot hold its own format",
    ("RHC_E0005", "id_card"): "note and V1.8 allow id_type + id_number instead",
    ("RHC_E0014", "qr_code"): "length 50 cannot hold a formal card's code (66 static, up to 256)",
}


@pytest.mark.parametrize("n", range(1, 18))
def test_field_names_match_spec_table(n):
    code = "RHC_E%04d" % n
    spec = spec_request_rows(n)
    assert [name for name, _, _ in spec] == [f.name for f in OPERATIONS[code].request]


@pytest.mark.parametrize("n", range(1, 18))
def test_lengths_and_required_flags_match_spec_table(n):
    code = "RHC_E%04d" % n
    deviations = []
    for (name, length, required), f in zip(spec_request_rows(n), OPERATIONS[code].request, strict=True):
        if (length, required) != (f.max_len, f.required):
            deviations.append((code, name))
    assert set(deviations) <= set(DOCUMENTED_DEVIATIONS), deviations


SPEC_ACTION_FIELDS = ["msgGuid", "msgType", "bussinessCode", "msgCreateTime", "orgId", "appCode",
                      "userName", "userPwd", "stdVerCode", "encryption"]


def test_action_fields_match_spec_4_2_1():
    lines = _spec_lines()
    start = next(i for i, line in enumerate(lines) if line.startswith("4.2.1 参数 action 描述"))
    end = next(i for i, line in enumerate(lines) if line.startswith("4.3 数据字典"))
    section = "\n".join(lines[start:end])
    # the converted table is mangled (rows merged, "wsgCreateTime"): every name must still occur
    for name in SPEC_ACTION_FIELDS:
        assert re.search(r"\b%s\b" % name, section), name
    # the spelling "bussinessCode" (sic) is the wire name, not businessCode of chapter 3's prose
    assert [f.name for f in ACTION_FIELDS] == SPEC_ACTION_FIELDS
    assert [f.name for f in ACTION_FIELDS if f.required] == [
        "msgGuid", "msgType", "bussinessCode", "msgCreateTime", "userName", "userPwd"]


# --- required fields ---------------------------------------------------------------------

REQUIRED = [(code, f.name) for code, op in sorted(OPERATIONS.items()) for f in op.request if f.required]


@pytest.mark.parametrize("code,name", REQUIRED)
def test_each_required_field_missing_is_1001(code, name):
    assert problems(code, with_(code, **{name: None})) == [(name, "1001")]
    # an empty element is missing too
    assert problems(code, with_(code, **{name: ""})) == [(name, "1001")]


def test_missing_problem_names_field_and_title():
    (p,) = check_message(OPERATIONS["RHC_E0003"], with_("RHC_E0003", qr_code=None))
    assert p.field == "qr_code" and "二维码密文" in p.text and str(p).startswith("qr_code:")


# --- characters, lengths, code tables, formats --------------------------------------------

ALL_FIELDS = [(code, f.name) for code, op in sorted(OPERATIONS.items()) for f in op.request]


@pytest.mark.parametrize("code,name", ALL_FIELDS)
def test_special_character_in_any_field_is_1002(code, name):
    ch = '&<>"'[len(name) % 4]
    value = VALID[code][name]
    assert problems(code, with_(code, **{name: value[:1] + ch + value[2:]})) == [(name, "1002")]


@pytest.mark.parametrize("ch", list('&<>"'))
def test_each_special_character_is_1002(ch):
    assert problems("RHC_E0012", with_("RHC_E0012", name="王" + ch)) == [("name", "1002")]


def test_other_punctuation_is_not_special():
    assert problems("RHC_E0012", with_("RHC_E0012", name="王'小-二(临时)")) == []


LIMITED = [(code, f.name, f.max_len) for code, op in sorted(OPERATIONS.items()) for f in op.request
           if f.max_len is not None]


@pytest.mark.parametrize("code,name,limit", LIMITED)
def test_over_length_is_1012(code, name, limit):
    found = check_message(OPERATIONS[code], with_(code, **{name: "1" * (limit + 1)}))
    assert any(p.field == name and p.code == "1012" and "at most %d" % limit in p.text for p in found), found
    assert {p.field for p in found} == {name}


FREE_TEXT = [(code, f.name, f.max_len) for code, op in sorted(OPERATIONS.items()) for f in op.request
             if f.max_len is not None and f.table is None and f.format is None]


@pytest.mark.parametrize("code,name,limit", FREE_TEXT)
def test_exactly_max_length_is_accepted(code, name, limit):
    assert problems(code, with_(code, **{name: "青" * limit})) == []


CODE_TABLE_CASES = [
    (code, name, bad)
    for code, op in sorted(OPERATIONS.items())
    for f in op.request
    for name, bad in [(f.name, {"sex": "3", "nation": "57", "id_type": "10", "self_id_type": "10",
                                "mother_id_type": "10", "father_id_type": "10", "channel_code": "03",
                                "medstep_code": "010108", "relation": "9"}.get(f.name))]
    if bad is not None and (f.table is not None or f.format is not None)
]


def test_code_table_cases_cover_every_table_field():
    tabled = {(code, f.name) for code, op in OPERATIONS.items() for f in op.request if f.table is not None}
    assert tabled <= {(c, n) for c, n, _ in CODE_TABLE_CASES}


@pytest.mark.parametrize("code,name,bad", CODE_TABLE_CASES)
def test_value_outside_code_table_is_rejected(code, name, bad):
    assert problems(code, with_(code, **{name: bad})) == [(name, "1012")]


@pytest.mark.parametrize("name,good", [("sex", ["0", "1", "2", "9"]), ("nation", ["01", "10", "56", "99"]),
                                       ("id_type", ["01", "03", "08", "99"])])
def test_code_table_values_accepted(name, good):
    for value in good:
        assert problems("RHC_E0007", with_("RHC_E0007", **{name: value})) == [], value


@pytest.mark.parametrize("step", ["010101", "010102", "010103", "010104", "010105", "010106", "010107", "000000"])
def test_every_medical_step_accepted(step):
    assert problems("RHC_E0003", with_("RHC_E0003", medstep_code=step)) == []


@pytest.mark.parametrize("code", ["RHC_E0001", "RHC_E0006", "RHC_E0007", "RHC_E0009", "RHC_E0016"])
@pytest.mark.parametrize("bad", ["1985-3-1", "1985/3/1", "19851312", "19850230", "abcdefgh"])
def test_birthday_not_yyyymmdd_is_6003(code, bad):
    assert problems(code, with_(code, birthday=bad)) == [("birthday", "6003")]


def test_lower_case_x_in_id_card_is_6002():
    upper = id_with_x()
    assert problems("RHC_E0001", with_("RHC_E0001", id_card=upper, id_number=upper)) == []
    lower = upper[:-1] + "x"
    assert problems("RHC_E0001", with_("RHC_E0001", id_card=lower, id_number=upper)) == [("id_card", "6002")]
    assert problems("RHC_E0002", with_("RHC_E0002", id_card=lower)) == [("id_card", "6002")]
    assert problems("RHC_E0006", with_("RHC_E0006", auth_id_card=lower)) == [("auth_id_card", "6002")]


@pytest.mark.parametrize("bad", ["63010219850312123", "6301021985031212AB", "63010219850312123Y"])
def test_malformed_id_card_is_6002(bad):
    assert ("id_card", "6002") in problems("RHC_E0009", with_("RHC_E0009", id_card=bad))


@pytest.mark.parametrize("code,name", [("RHC_E0003", "time"), ("RHC_E0009", "time"),
                                       ("RHC_E0011", "alterTime")])
@pytest.mark.parametrize("bad", ["2024/03/05 08:30:00", "2024-03-05T08:30:00", "2024-03-05", "20240305083000",
                                 "2024-03-05 25:30:00"])
def test_datetime_not_yyyy_mm_dd_hh_mm_ss_is_1012(code, name, bad):
    assert problems(code, with_(code, **{name: bad})) == [(name, "1012")]


def test_e0011_birthday_is_yyyy_mm_dd():
    assert problems("RHC_E0011", with_("RHC_E0011", birthday="19850312")) == [("birthday", "1012")]
    assert problems("RHC_E0011", with_("RHC_E0011", birthday="1985-02-30")) == [("birthday", "1012")]
    # optional there: the change may leave it out
    assert problems("RHC_E0011", with_("RHC_E0011", birthday=None, sex=None, telephone=None, address=None)) == []


@pytest.mark.parametrize("name", ["startDate", "endDate"])
@pytest.mark.parametrize("bad", ["20240101", "2024/01/01", "2024-13-01"])
def test_e0017_dates_are_1703(name, bad):
    assert problems("RHC_E0017", with_("RHC_E0017", **{name: bad})) == [(name, "1703")]


@pytest.mark.parametrize("bad", ["2024-03-05", "2024/03/05 08:30:00", "2024-03-05 08:30"])
def test_e0012_clinic_time_is_12001(bad):
    assert problems("RHC_E0012", with_("RHC_E0012", clinicTime=bad)) == [("clinicTime", "12001")]


@pytest.mark.parametrize("bad", ["35岁", "-1", "3.5"])
def test_e0012_age_is_digits(bad):
    assert problems("RHC_E0012", with_("RHC_E0012", age=bad)) == [("age", "1012")]


@pytest.mark.parametrize("bad", ["2", "s", "x"])
def test_e0002_qrcode_type_is_0_or_1(bad):
    assert problems("RHC_E0002", with_("RHC_E0002", qrcode_type=bad)) == [("qrcode_type", "1012")]
    assert problems("RHC_E0002", with_("RHC_E0002", qrcode_type="0")) == []


# The format checks use datetime.strptime and \d, which accept what the fixed-width formats
# of the spec do not: unpadded fields ("199099" parses as 1990-09-09) and non-ASCII digits.
@pytest.mark.parametrize("code,name,bad,expected", [
    ("RHC_E0001", "birthday", "199099", "6003"),
    ("RHC_E0001", "birthday", "1985312", "6003"),
    ("RHC_E0016", "birthday", "850312", "6003"),
    ("RHC_E0003", "time", "2024-3-5 8:30:00", "1012"),
    ("RHC_E0012", "clinicTime", "2024-3-5 8:30:0", "12001"),
    ("RHC_E0017", "startDate", "2024-1-5", "1703"),
    ("RHC_E0011", "birthday", "1985-3-12", "1012"),
    ("RHC_E0001", "id_card", "６３０１０２１９８５０３１２１２３４", "6002"),
    ("RHC_E0012", "age", "３５", "1012"),
])
def test_formats_are_fixed_width_ascii(code, name, bad, expected):
    assert problems(code, with_(code, **{name: bad})) == [(name, expected)]


@pytest.mark.parametrize("name", ["photo_front", "photo_reverse", "photo_face"])
def test_e0001_photo_must_be_base64_png(name):
    jpeg = base64.b64encode(b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 32).decode()
    assert problems("RHC_E0001", with_("RHC_E0001", **{name: jpeg})) == [(name, "6005")]
    assert problems("RHC_E0001", with_("RHC_E0001", **{name: "not base64!"})) == [(name, "6005")]
    assert problems("RHC_E0007", with_("RHC_E0007", **{name: jpeg})) == [(name, "6005")]


def test_e0001_photo_size_limit_200kb():
    near = png(extra=b"x" * (190 * 1024))
    assert len(near) <= 200 * 1024
    assert problems("RHC_E0001", with_("RHC_E0001", photo_face=base64.b64encode(near).decode())) == []
    big = png(extra=b"x" * (201 * 1024))
    assert problems("RHC_E0001", with_("RHC_E0001", photo_face=base64.b64encode(big).decode())) == [
        ("photo_face", "6005")]


def test_e0007_photos_optional():
    assert problems("RHC_E0007", with_("RHC_E0007", photo_front=None, photo_reverse=None, photo_face=None)) == []


def test_unknown_field_is_1012():
    assert problems("RHC_E0013", {"qr_code": TEMP_QR, "qrcode": "x"}) == [("qrcode", "1012")]


# --- rules across fields ----------------------------------------------------------------------

@pytest.mark.parametrize("code", ["RHC_E0002", "RHC_E0004", "RHC_E0005"])
def test_id_card_or_id_type_and_number(code):
    assert problems(code, with_(code, id_type=None, id_number=None)) == []
    assert problems(code, with_(code, id_card=None)) == []
    assert problems(code, with_(code, id_card=None, id_type="03", id_number="E12345678")) == []
    either = ("id_card/id_number/id_type", "1001")
    assert problems(code, with_(code, id_card=None, id_number=None)) == [either]
    assert problems(code, with_(code, id_card=None, id_type=None)) == [either]
    assert problems(code, with_(code, id_card=None, id_type=None, id_number=None)) == [either]
    (p,) = check_message(OPERATIONS[code], with_(code, id_card=None, id_type=None, id_number=None))
    assert "身份证号" in p.text


@pytest.mark.parametrize("code", ["RHC_E0001", "RHC_E0006"])
def test_newborn_registers_without_id_card_when_id_type_99(code):
    values = with_(code, id_card=None, id_type="99", id_number="Q630012345")
    assert problems(code, values) == []
    # but only then: another id type still needs id_card
    assert problems(code, with_(code, id_card=None, id_type="08", id_number="Q630012345")) == [("id_card", "1001")]
    # and id_number stays required
    assert problems(code, {**values, "id_number": ""}) == [("id_number", "1001")]
    # a given id_card is still checked
    assert problems(code, {**values, "id_card": MOTHER}) == []
    assert problems(code, {**values, "id_card": "123"}) == [("id_card", "6002")]


def test_newborn_exemption_is_only_for_registration():
    assert problems("RHC_E0007", with_("RHC_E0007", id_card=None, id_type="99")) == [("id_card", "1001")]


@pytest.mark.parametrize("id_type", ["N1", "N2", "N3", "08"])
def test_e0016_newborn_id_types_accepted(id_type):
    assert problems("RHC_E0016", with_("RHC_E0016", id_type=id_type)) == []


@pytest.mark.parametrize("id_type", ["01", "99", "N4", "N0", "n1", "N", "8"])
def test_e0016_other_id_types_rejected(id_type):
    assert problems("RHC_E0016", with_("RHC_E0016", id_type=id_type)) == [("id_type", "1012")]


E0015_EMPTY = {k: None for k in VALID["RHC_E0015"]}


@pytest.mark.parametrize("given", [
    {"mother_id_type": "01", "mother_id_number": MOTHER},
    {"father_id_type": "01", "father_id_number": ZHANG},
    {"mother_ecard_id": "9C1F4E2A7B3D5E6F8A0B"},
    {"father_ecard_id": "0A1B2C3D4E5F60718293"},
])
def test_e0015_one_parent_is_enough(given):
    assert problems("RHC_E0015", with_("RHC_E0015", **{**E0015_EMPTY, **given})) == []


@pytest.mark.parametrize("given", [
    {},
    {"mother_name": "马丽娟"},
    {"mother_id_type": "01"},
    {"father_id_number": ZHANG},
    {"mother_name": "马丽娟", "father_name": "张晓明"},
])
def test_e0015_parents_not_both_empty(given):
    found = check_message(OPERATIONS["RHC_E0015"], with_("RHC_E0015", **{**E0015_EMPTY, **given}))
    assert [p.code for p in found] == ["1001"]
    assert "父母亲的信息不能同时为空" in found[0].text
    assert "mother_id_number" in found[0].field and "father_ecard_id" in found[0].field


def test_e0014_accepts_a_real_static_code():
    assert problems("RHC_E0014", with_("RHC_E0014", qr_code="0123456789ABCDEF" * 4 + ":1")) == []


# --- build_xml -------------------------------------------------------------------------------

@pytest.mark.parametrize("code", sorted(OPERATIONS))
def test_build_xml_emits_every_field_in_table_order(code):
    op = OPERATIONS[code]
    partial = {f.name: VALID[code][f.name] for f in op.request[::2]}
    root = etree.fromstring(build_xml(op.request, partial))
    assert root.tag == "request"
    assert [child.tag for child in root] == [f.name for f in op.request]
    for child in root:
        assert (child.text or "") == partial.get(child.tag, "")
        assert len(child) == 0


def test_build_xml_escapes_and_round_trips():
    fields = OPERATIONS["RHC_E0012"].request
    tricky = {"name": 'a&b<c>d"e', "empi": "]]><x/>&amp;", "sex": "张晓明 青海"}
    text = build_xml(fields, tricky)
    assert "&amp;" in text and "&lt;" in text and "&gt;" in text
    assert "<c>" not in text and "<x/>" not in text
    root = etree.fromstring(text)
    assert root.findtext("name") == 'a&b<c>d"e'
    assert root.findtext("empi") == "]]><x/>&amp;"
    assert root.findtext("sex") == "张晓明 青海"
    assert [c.tag for c in root] == [f.name for f in fields]


def test_build_xml_ignores_values_outside_the_table():
    root = etree.fromstring(build_xml(OPERATIONS["RHC_E0013"].request, {"qr_code": TEMP_QR, "evil": "x"}))
    assert [c.tag for c in root] == ["qr_code"]


# --- build_action ------------------------------------------------------------------------------

async def test_build_action_has_the_4_2_1_fields(tmp_path):
    config = make_config(None, tmp_path)
    platform = RhcPlatform(config.platform, config.site, tmp_path)
    try:
        before = datetime.now().replace(microsecond=0)
        root = etree.fromstring(platform.build_action("RHC_E0003"))
        after = datetime.now()
        assert root.tag == "request"
        assert [c.tag for c in root] == SPEC_ACTION_FIELDS
        values = {c.tag: c.text or "" for c in root}
        assert re.fullmatch(r"[0-9a-fA-F]{32}", values["msgGuid"])
        assert values["msgType"] == "1"
        assert values["bussinessCode"] == "RHC_E0003"
        created = datetime.strptime(values["msgCreateTime"], "%Y-%m-%d %H:%M:%S")
        assert before <= created <= after
        assert values["orgId"] == "QH0001" and values["appCode"] == ""
        assert values["userName"] == "scanbox" and values["userPwd"] == "scanbox-secret"
        assert values["stdVerCode"] == "1.0"
        assert values["encryption"] == ""
        # a fresh identifier per message
        other = etree.fromstring(platform.build_action("RHC_E0003")).findtext("msgGuid")
        assert other != values["msgGuid"]
        # given identifier and time are used as they are
        fixed = etree.fromstring(platform.build_action("RHC_E0005", "ab" * 16, datetime(2024, 3, 5, 8, 30, 1)))
        assert fixed.findtext("msgGuid") == "ab" * 16
        assert fixed.findtext("msgCreateTime") == "2024-03-05 08:30:01"
        assert fixed.findtext("bussinessCode") == "RHC_E0005"
    finally:
        await platform.close()


async def test_build_action_with_app_code_leaves_org_id_empty(tmp_path):
    config = make_config(None, tmp_path, platform={
        "rhc": {"app_code": "APP001", "user_name": "scanbox", "user_pwd": "scanbox-secret"}})
    platform = RhcPlatform(config.platform, config.site, tmp_path)
    try:
        root = etree.fromstring(platform.build_action("RHC_E0012"))
        assert root.findtext("appCode") == "APP001"
        assert (root.findtext("orgId") or "") == ""
        assert sum(bool(root.findtext(n)) for n in ("orgId", "appCode")) == 1
    finally:
        await platform.close()


async def test_build_action_refuses_bad_config_every_time_and_a_bad_msg_guid_from_outside(tmp_path):
    """The fields from config are checked once per business code, and refused at every message
    all the same; a msgGuid given from outside (an outbox record's) is checked each time, one
    made here is 32 hex digits by construction, and an empty one is made afresh."""
    config = make_config(None, tmp_path, platform={
        "rhc": {"org_id": "QH0001", "user_name": "box&co", "user_pwd": "scanbox-secret"}})
    platform = RhcPlatform(config.platform, config.site, tmp_path)
    try:
        for _ in range(2):
            with pytest.raises(ScanboxError) as info:
                platform.build_action("RHC_E0003")
            assert info.value.reason is Reason.BAD_REQUEST
            assert info.value.message == "action not sent: userName: contains &, which the platform refuses"
        with pytest.raises(ScanboxError) as info:
            platform.build_action("RHC_E0003", "not-a-guid")
        # in the table's order: msgGuid first
        assert info.value.message == ("action not sent: msgGuid: 'not-a-guid' is not 32 hex digits; "
                                      "userName: contains &, which the platform refuses")
    finally:
        await platform.close()
    config = make_config(None, tmp_path)
    platform = RhcPlatform(config.platform, config.site, tmp_path)
    try:
        with pytest.raises(ScanboxError) as info:
            platform.build_action("RHC_E0003", "AB<")
        assert info.value.message == "action not sent: msgGuid: contains <, which the platform refuses"
        made = etree.fromstring(platform.build_action("RHC_E0003", "")).findtext("msgGuid")
        assert re.fullmatch(r"[0-9a-f]{32}", made)
        # each message its own msgGuid and time, the copy made from config untouched
        first = etree.fromstring(platform.build_action("RHC_E0003", "ab" * 16, datetime(2024, 3, 5, 8, 30, 1)))
        second = etree.fromstring(platform.build_action("RHC_E0003", "cd" * 16, datetime(2025, 1, 2, 3, 4, 5)))
        assert (first.findtext("msgGuid"), first.findtext("msgCreateTime")) == ("ab" * 16, "2024-03-05 08:30:01")
        assert (second.findtext("msgGuid"), second.findtext("msgCreateTime")) == ("cd" * 16, "2025-01-02 03:04:05")
        assert first.findtext("userName") == second.findtext("userName") == "scanbox"
    finally:
        await platform.close()


# --- parse_response ---------------------------------------------------------------------------

def resp(inner: str, result: str = "success", code: str = "3005", desc: str = "验证成功") -> str:
    return ("<response><result>%s</result><desc>%s</desc><resultCode>%s</resultCode>%s</response>"
            % (result, desc, code, inner))


def test_parse_success_flattens_ehc_cardinfo():
    r = parse_response(resp("<ehc_cardinfo><qr_codetext>E1:1</qr_codetext><name>张晓明</name>"
                            "<id_card>%s</id_card></ehc_cardinfo>" % ZHANG), OPERATIONS["RHC_E0003"])
    assert r.ok is True and r.code == "3005" and r.desc == "验证成功"
    assert r.data["name"] == "张晓明" and r.data["qr_codetext"] == "E1:1" and r.data["id_card"] == ZHANG
    assert "result" not in r.data and "resultCode" not in r.data and "desc" not in r.data
    assert r.to_json() == {"result": "success", "resultCode": "3005", "desc": "验证成功", "data": r.data}


def test_parse_flattens_personinfo_for_registration():
    r = parse_response(resp("<personinfo><name>张晓明</name><ehc_card_status>4</ehc_card_status></personinfo>",
                            code="6008", desc="注册成功"), OPERATIONS["RHC_E0006"])
    assert r.data["name"] == "张晓明" and r.data["ehc_card_status"] == "4"


@pytest.mark.parametrize("code,container", [("RHC_E0003", "ehc_cardinfo"), ("RHC_E0006", "personinfo"),
                                            ("RHC_E0015", "personinfos")])
def test_parse_removes_the_container(code, container):
    inner = ("<personinfos><personinfo><name>a</name></personinfo></personinfos>" if code == "RHC_E0015"
             else "<%s><name>a</name></%s>" % (container, container))
    r = parse_response(resp(inner), OPERATIONS[code])
    assert container not in r.data


def test_parse_failure_with_code_and_desc():
    r = parse_response("<response><result>failure</result><desc>二维码错误</desc>"
                       "<resultCode>3001</resultCode></response>", OPERATIONS["RHC_E0003"])
    assert (r.ok, r.code, r.desc, r.data) == (False, "3001", "二维码错误", {})
    assert r.to_json()["result"] == "failure"


def test_parse_tolerates_spacing_and_case_of_result():
    # the spec's samples write "<result> success or failure</result>"
    r = parse_response("\n <response>\n <result> Success </result>\n <resultCode> 5005 </resultCode>\n"
                       " <total>2</total></response>\n", OPERATIONS["RHC_E0010"])
    # a family with no members still has its (empty) list
    assert r.ok and r.code == "5005" and r.desc is None and r.data == {"total": "2", "personinfo": []}


def test_parse_missing_result_code_is_none():
    r = parse_response("<response><result>success</result></response>", OPERATIONS["RHC_E0008"])
    assert r.ok and r.code is None


def test_parse_e0010_repeated_personinfo_is_a_list():
    two = resp("<total>2</total><personinfo><name>甲</name><relation>1</relation></personinfo>"
               "<personinfo><name>乙</name><relation>2</relation></personinfo>", code="5005")
    r = parse_response(two, OPERATIONS["RHC_E0010"])
    assert r.data["personinfo"] == [{"name": "甲", "relation": "1"}, {"name": "乙", "relation": "2"}]
    one = resp("<total>1</total><personinfo><name>甲</name></personinfo>", code="5005")
    assert parse_response(one, OPERATIONS["RHC_E0010"]).data["personinfo"] == [{"name": "甲"}]


def test_parse_e0015_list_inside_container():
    r = parse_response(resp("<personinfos><personinfo><name>宝宝</name><relation>2</relation></personinfo>"
                            "</personinfos>", code="1505"), OPERATIONS["RHC_E0015"])
    assert r.data["personinfo"] == [{"name": "宝宝", "relation": "2"}]


def test_parse_unexpected_repeats_become_lists_and_comments_are_skipped():
    r = parse_response(resp("<!-- x --><note>a</note><note>b</note><note>c</note>"), OPERATIONS["RHC_E0003"])
    assert r.data == {"note": ["a", "b", "c"]}


@pytest.mark.parametrize("text,words", [
    ("", "empty"),
    ("   ", "<response>"),
    ("<html><body>502 Bad Gateway", "not XML"),
    ("not xml at all", "not XML"),
    ("<result>success</result>", "not <response>"),
    ("<soap:Envelope xmlns:soap='http://schemas.xmlsoap.org/soap/envelope/'/>", "not <response>"),
    ("<response><desc>x</desc></response>", "neither success nor failure"),
    ("<response><result>ok</result></response>", "neither success nor failure"),
])
def test_parse_non_response_is_platform_unavailable(text, words):
    with pytest.raises(PlatformUnavailable) as info:
        parse_response(text, OPERATIONS["RHC_E0003"])
    assert words in info.value.message
    assert info.value.transient


def test_parse_none_is_platform_unavailable():
    with pytest.raises(PlatformUnavailable):
        parse_response(None, OPERATIONS["RHC_E0003"])


def test_parse_does_not_expand_entities():
    text = ('<?xml version="1.0"?><!DOCTYPE r [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
            "<response><result>success</result><name>&x;</name></response>")
    try:
        r = parse_response(text, OPERATIONS["RHC_E0003"])
    except PlatformUnavailable:
        return
    assert "root:" not in str(r.data)


# --- identity_from -------------------------------------------------------------------------------

FULL = {
    "qr_codetext": "E1:1", "name": "张晓明", "main_index": "QH123", "ecardId": "E1", "telephone": "09718123456",
    "id_number": "E12345678", "id_type": "03", "id_card": ZHANG, "nation": "01", "sex": "1",
    "birthday": "19850312", "address": "青海省西宁市", "cellphone": "13897001234", "unit": "一中",
    "ehc_card_status": "1",
}


def test_identity_from_maps_fields():
    ident = identity_from(FULL)
    assert ident.source is IdentitySource.PLATFORM
    assert (ident.name, ident.sex, ident.nation, ident.birthday) == ("张晓明", "1", "01", "19850312")
    assert (ident.id_type, ident.id_number) == ("03", "E12345678")
    assert (ident.ecard_id, ident.main_index, ident.address, ident.card_status) == ("E1", "QH123", "青海省西宁市", "1")
    assert ident.phone == "13897001234"  # cellphone preferred
    j = ident.to_json()
    assert j["sex_text"] == "男性" and j["nation_text"] == "汉族" and j["id_type_text"] == "护照"
    assert j["card_status_text"] == "正常" and j["source"] == "platform"


def test_identity_phone_falls_back_to_telephone():
    assert identity_from({**FULL, "cellphone": ""}).phone == "09718123456"
    data = dict(FULL)
    del data["cellphone"]
    assert identity_from(data).phone == "09718123456"
    assert identity_from({"name": "x"}).phone is None


def test_identity_id_card_fallback_sets_id_type_01():
    data = {k: v for k, v in FULL.items() if k not in ("id_number", "id_type")}
    ident = identity_from(data)
    assert (ident.id_type, ident.id_number) == ("01", ZHANG)
    # an empty id_number counts as missing
    ident = identity_from({**FULL, "id_number": "", "id_type": "03"})
    assert (ident.id_type, ident.id_number) == ("01", ZHANG)


def test_identity_empty_and_non_string_values_are_none():
    ident = identity_from({"name": "", "sex": ["1"], "nation": {"a": "b"}}, IdentitySource.CACHE)
    assert ident.name is None and ident.sex is None and ident.nation is None
    assert ident.id_type is None and ident.id_number is None
    assert ident.source is IdentitySource.CACHE


def test_identity_from_temporary_card():
    ident = identity_from({"name": "王小二", "age": "35", "sex": "1", "clinicTime": NOW})
    assert ident.name == "王小二" and ident.sex == "1" and ident.id_number is None
