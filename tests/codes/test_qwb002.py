"""Spec 000's code tables (agent/codes/qwb002.py) checked against the spec text itself, and what
each platform return code means to scanbox (agent/codes/__init__.py)."""

from __future__ import annotations

import collections
import re
from pathlib import Path

import pytest

from agent import schema
from agent.codes import CodeTable, Outcome, ReturnCode, ReturnCodeTable, qwb002
from agent.config import SiteConfig
from agent.model import Reason

# the spec ships in the repo: these tests never skip
SPEC = Path(__file__).resolve().parents[2] / "docs" / "specs" / "000_7d1296688b65c848.txt"


@pytest.fixture(scope="module")
def chapter4() -> str:
    text = SPEC.read_text(encoding="utf-8")
    return text[text.index("第4章 数据字典"):]


def section(chapter4: str, number: str) -> str:
    """The text of section 4.3.N up to the next 4.3.x heading."""
    start = re.search(r"^%s(?!\d)" % re.escape(number), chapter4, re.M)
    assert start, "no section %s in spec 000" % number
    end = re.compile(r"^4\.3\.\d+", re.M).search(chapter4, start.end())
    return chapter4[start.start():end.start() if end else len(chapter4)]


def code_rows(text: str, code: str = r"\d+") -> dict[str, str]:
    """`code<TAB>meaning` rows of a simple table."""
    rows: dict[str, str] = {}
    for c, meaning in re.findall(r"^(%s)\t([^\t\n]+)" % code, text, re.M):
        assert c not in rows, "code %s listed twice" % c
        rows[c] = meaning.strip()
    return rows


# --- the dictionaries (4.3.1 - 4.3.11) ----------------------------------------------------------

@pytest.mark.parametrize("number, table", [
    ("4.3.1", qwb002.SEX),
    ("4.3.3", qwb002.ID_TYPE),
    ("4.3.4", qwb002.CARD_STATUS),
    ("4.3.8", qwb002.CARD_TYPE),
    ("4.3.9", qwb002.MEDICAL_STEP),
    ("4.3.11", qwb002.FAMILY_RELATION),
], ids=["sex", "id_type", "card_status", "card_type", "medstep", "family_relation"])
def test_simple_table_is_exactly_the_spec(chapter4: str, number: str, table: CodeTable) -> None:
    assert dict(table.entries) == code_rows(section(chapter4, number))


def test_terminal_type_is_exactly_the_spec(chapter4: str) -> None:
    # 4.3.7 lists the name first, then the code
    rows = dict((code, name) for name, code in
                re.findall(r"^([^\t\n]+)\t(\d{2})\t?$", section(chapter4, "4.3.7"), re.M))
    assert dict(qwb002.TERMINAL_TYPE.entries) == rows == {"01": "人工窗口", "02": "自助机", "99": "其他"}


def spec_nations(chapter4: str) -> tuple[dict[str, str], dict[str, collections.Counter[str]]]:
    """4.3.2 as converted: rows 01-27 are clean; 28-56 come as runs of "NN name" repeated many
    times, with OCR slips in single copies (42 窓族 once, 42 怒族 everywhere else). Each code's
    name is the one the document gives most often."""
    text = section(chapter4, "4.3.2")
    votes: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for code, name in re.findall(r"(?<![\d.])(\d{2})[ \t]+([^\s\d]+)", text):
        votes[code][name] += 1
    return {code: counter.most_common(1)[0][0] for code, counter in votes.items()}, votes


def test_nation_codes_are_exactly_the_spec_codes(chapter4: str) -> None:
    names, votes = spec_nations(chapter4)
    assert set(qwb002.NATION) == set(names)
    assert set(names) == {"%02d" % n for n in range(1, 57)} | {"99"}
    # the document's duplicate "42 怒族 42 怒族" is one code
    assert votes["42"]["怒族"] > 1 and len(qwb002.NATION) == 57


def test_nation_names_are_the_spec_names(chapter4: str) -> None:
    names, _ = spec_nations(chapter4)
    assert dict(qwb002.NATION.entries) == names


def test_nation_names_of_clean_rows(chapter4: str) -> None:
    # rows 01-27 are single, clean "NN<TAB>name" lines in the document: no vote needed
    clean = code_rows(section(chapter4, "4.3.2"), r"[0-2]\d")
    assert len(clean) == 27
    assert {c: qwb002.NATION.text(c) for c in clean} == clean


def spec_departments(chapter4: str) -> dict[str, tuple[str, str]]:
    rows: dict[str, tuple[str, str]] = {}
    for code, name, level in re.findall(r"^(\d{4})\t([^\t\n]+)\t(\d{1,2})\s*$",
                                        section(chapter4, "4.3.10"), re.M):
        assert code not in rows, "department %s listed twice" % code
        rows[code] = (name, level)
    return rows


def test_departments_are_exactly_the_spec_rows(chapter4: str) -> None:
    rows = spec_departments(chapter4)
    assert len(rows) == 199
    assert {c: (qwb002.DEPARTMENT.text(c), qwb002.DEPARTMENT_LEVEL[c]) for c in qwb002.DEPARTMENT} == rows
    # the table's oddity is kept as the spec has it
    assert rows["5405"] == ("内科药房", "54")


def test_every_spec_department_is_accepted_as_site_department(chapter4: str) -> None:
    for code in spec_departments(chapter4):
        assert schema.convert({"department": code}, SiteConfig).sam == ""   # validates; no org_code, no sam
        assert schema.convert({"org_code": "45600001X", "department": code}, SiteConfig).sam == "45600001X" + code


def test_tables_are_registered_by_their_spec_id() -> None:
    assert set(qwb002.TABLES) == {"GB_T_2261_1_2003", "GB_T_3304_1991", "CV02_01_101", "RHC_VCARD_ZT",
                                  "RHC_TERMINAL_TYPE", "RHC_CARD_TYPE", "RHC_MEDSTEP", "RHC_DEPARTMENT",
                                  "GB_T_4761_1984"}
    assert all(qwb002.TABLES[t.id] is t for t in qwb002.TABLES.values())


# --- CodeTable ------------------------------------------------------------------------------------

def test_code_table_lookup_and_membership() -> None:
    assert qwb002.SEX.text("2") == "女性"
    assert qwb002.CARD_STATUS.text("1") == "正常"
    assert qwb002.SEX.text(None) is None
    assert qwb002.SEX.text("3") is None
    assert qwb002.SEX.text("") is None
    assert "9" in qwb002.SEX and "3" not in qwb002.SEX and None not in qwb002.SEX
    assert 1 not in qwb002.SEX   # codes are strings, as they travel
    assert list(qwb002.SEX) == ["0", "1", "2", "9"] and len(qwb002.SEX) == 4
    assert qwb002.SEX.describe() == "性别 (GB_T_2261_1_2003)"


# --- return codes (4.3.12) ------------------------------------------------------------------------

def spec_return_rows(chapter4: str) -> list[list[str]]:
    """[code, text, note] rows of 4.3.12; a row that starts with a tab continues the previous
    row's cells, and a repeated code with no text continues its note (1004 ... appCode)."""
    rows: list[list[str]] = []
    for line in section(chapter4, "4.3.12").splitlines()[1:]:
        cells = line.split("\t") + ["", ""]
        if re.fullmatch(r"\d{4,5}", cells[0]):
            if rows and rows[-1][0] == cells[0] and not cells[1] and cells[2]:
                rows[-1][2] += cells[2]
            else:
                rows.append([cells[0], cells[1], cells[2]])
        elif cells[0] == "" and rows and line.strip():
            rows[-1][1] += cells[1]
            rows[-1][2] += cells[2]
    return rows


def norm(text: str) -> str:
    # the converted document breaks lines inside cells and reads "orgId" as "orgld"
    return re.sub(r"\s+", "", text).replace("orgld", "orgId")


# rows the converted document garbles; each resolved in qwb002 (the comments there) or below
RESOLVED = {
    "2001": "(规范原文无法辨认)",                  # unreadable ("2001 返下口往明 该卡未审核")
    "2002": "该卡未审核",
    "2007": "系统暂时不支持二码合一",
    "2008": "该居民未注册",                        # listed as a second 2007
    "3001": "二维码错误",
    # the document lists 3001, 3001, 3002, 3004 and no 3003: the second 3001 and the 3002 move
    # up by one (like the second 2007), so 3002 is the missing card and 3003 the failed check
    "3002": "未获得该居民电子健康卡信息",
    "3003": "居民信息验证错误",
    "7002": "本人证件号码不能为空",
    # 7003's text is split around its row: "本人尚未注册健康卡或健康卡处于非" / row / "庭成员"
    "7003": "本人尚未注册健康卡或健康卡处于非正常状态,请先完善本人的健康卡再绑定家庭成员",
    "7004": "已绑定,请勿重复绑定",                 # "己绑定" in the conversion
}


def test_return_codes_are_exactly_the_spec_codes(chapter4: str) -> None:
    rows = spec_return_rows(chapter4)
    counts = collections.Counter(code for code, _, _ in rows)
    assert {c for c, n in counts.items() if n > 1} == {"2001", "2007", "3001"}
    assert {rc.code for rc in qwb002.RETURN_CODES} == set(counts) | {"2008", "3003"}
    assert len(qwb002.RETURN_CODES) == len(set(counts)) + 2


def test_return_code_texts_and_notes_are_the_spec_text(chapter4: str) -> None:
    rows = spec_return_rows(chapter4)
    checked = 0
    for code, text, note in rows:
        if code in RESOLVED:
            continue
        rc = qwb002.RETURN_CODES.lookup(code)
        assert norm(rc.text) == norm(text), code
        if note.strip():
            assert norm(rc.note) == norm(note), code
        checked += 1
    assert checked == len(rows) - 11   # the 11 rows of the codes in RESOLVED
    for code, text in RESOLVED.items():
        assert qwb002.RETURN_CODES.lookup(code).text == text, code


INVALID_REQUEST = ["1001", "1002", "1003", "1007", "1008", "1009", "1010", "1012", "6001", "6002", "6003",
                   "6004", "6005", "6010", "7000", "7001", "7002", "8001", "8002", "12001", "14001", "14002",
                   "1501", "1502", "1601", "1701", "1702", "1703"]
AUTH = ["1004", "1005", "1006", "1503"]
TRANSIENT = ["1011", "6006", "6007", "1504", "1509"]
SUCCESS = ["2009", "3005", "4004", "5004", "5005", "6008", "7006", "8006", "9002", "11002", "12002", "13002",
           "14006", "1505", "1704"]


@pytest.mark.parametrize("code", INVALID_REQUEST)
def test_parameter_and_format_errors_are_permanent_invalid_requests(code: str) -> None:
    rc = qwb002.RETURN_CODES.lookup(code)
    assert rc.outcome is Outcome.INVALID_REQUEST
    assert not rc.outcome.transient
    assert rc.reason is Reason.BAD_REQUEST


@pytest.mark.parametrize("code", AUTH)
def test_credential_errors_are_auth(code: str) -> None:
    rc = qwb002.RETURN_CODES.lookup(code)
    assert rc.outcome is Outcome.AUTH and not rc.outcome.transient
    assert rc.reason is Reason.PLATFORM_AUTH


@pytest.mark.parametrize("code", TRANSIENT)
def test_platform_failures_are_transient(code: str) -> None:
    rc = qwb002.RETURN_CODES.lookup(code)
    assert rc.outcome is Outcome.TRANSIENT and rc.outcome.transient
    assert rc.reason is Reason.PLATFORM_UNAVAILABLE


@pytest.mark.parametrize("code", SUCCESS)
def test_success_codes(code: str) -> None:
    rc = qwb002.RETURN_CODES.lookup(code)
    assert rc.outcome is Outcome.SUCCESS
    assert not rc.outcome.transient


def test_every_code_is_in_exactly_one_group_or_a_considered_rejection() -> None:
    grouped = set(INVALID_REQUEST) | set(AUTH) | set(TRANSIENT) | set(SUCCESS)
    for rc in qwb002.RETURN_CODES:
        if rc.code not in grouped:
            assert rc.outcome is Outcome.REJECTED, rc.code
            assert rc.reason is not None and not rc.outcome.transient


def test_success_means_the_spec_says_success() -> None:
    # every "...成功" is a success, and every success but 5004 (已认证: a query's answer) says 成功
    for rc in qwb002.RETURN_CODES:
        assert (rc.outcome is Outcome.SUCCESS) == ("成功" in rc.text or rc.code == "5004"), rc.code
        assert (rc.reason is None) == (rc.outcome is Outcome.SUCCESS), rc.code


def test_empty_and_format_texts_are_invalid_requests() -> None:
    for rc in qwb002.RETURN_CODES:
        if "不能为空" in rc.text or "格式" in rc.text or rc.text.startswith("数据解析"):
            assert rc.outcome is Outcome.INVALID_REQUEST, rc.code


@pytest.mark.parametrize("code, reason", [
    ("3001", Reason.QR_INVALID),
    ("3004", Reason.QR_EXPIRED),
    ("3002", Reason.CARD_NOT_FOUND),
    ("4002", Reason.CARD_INACTIVE),
    ("3003", Reason.PLATFORM_REJECTED),
    ("2004", Reason.QR_INVALID),
    ("2008", Reason.CARD_NOT_FOUND),
    ("13001", Reason.CARD_NOT_FOUND),   # temporary card verify (RHC_E0013)
    ("5001", Reason.CARD_INACTIVE),
    ("2002", Reason.CARD_INACTIVE),
])
def test_verify_answers_map_to_the_reason_a_patient_is_shown(code: str, reason: Reason) -> None:
    rc = qwb002.RETURN_CODES.lookup(code)
    assert rc.outcome is Outcome.REJECTED
    assert rc.reason is reason


@pytest.mark.parametrize("code", ["99999", "3006", "", None])
def test_unknown_code_is_neither_success_nor_transient(code: str | None) -> None:
    rc = qwb002.RETURN_CODES.lookup(code)
    assert rc.outcome is not Outcome.SUCCESS
    assert not rc.outcome.transient
    assert rc.reason is Reason.PLATFORM_REJECTED
    assert rc.code == (code or "")
    assert code not in qwb002.RETURN_CODES


def test_return_code_table_refuses_duplicates_and_failures_without_reason() -> None:
    with pytest.raises(ValueError, match="duplicate return code 1"):
        ReturnCodeTable("t", [ReturnCode("1", "a", Outcome.SUCCESS), ReturnCode("1", "b", Outcome.SUCCESS)])
    with pytest.raises(ValueError, match="needs a reason"):
        ReturnCodeTable("t", [ReturnCode("2", "a", Outcome.TRANSIENT)])
    table = ReturnCodeTable("t", [ReturnCode("1", "ok", Outcome.SUCCESS)])
    assert "1" in table and "2" not in table and len(table) == 1
