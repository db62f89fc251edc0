"""The spec 000 simulator's strictness, called directly: RhcSimulator.handle(action, message)."""

from __future__ import annotations

import uuid
from datetime import datetime

import pytest
from lxml import etree

from agent.platforms.rhc import build_xml
from agent.platforms.rhc_schema import ACTION_FIELDS, OPERATIONS
from agent.simulator.rhc import Resident, RhcSimulator, default_residents, make_id

RESIDENTS = {r.name: r for r in default_residents()}
ZHANG = RESIDENTS["张晓明"]      # status 1
LI = RESIDENTS["李建国"]         # status 0: cancelled
HAN = RESIDENTS["韩雪"]          # status 2: pending review


class Clock:
    def __init__(self, now: float = 1_709_600_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def action(code: str = "RHC_E0003", **changes: str) -> str:
    values = {
        "msgGuid": uuid.uuid4().hex, "msgType": "1", "bussinessCode": code,
        "msgCreateTime": datetime.now().strftime("%Y-%m-%d %H:%M:%S"), "orgId": "QH0001", "appCode": "",
        "userName": "scanbox", "userPwd": "scanbox-secret", "stdVerCode": "1.0", "encryption": "",
    }
    values.update(changes)
    return build_xml(ACTION_FIELDS, values)


def message(code: str = "RHC_E0003", **values: str) -> str:
    return build_xml(OPERATIONS[code].request, values)


def verify(qr: str) -> str:
    return message("RHC_E0003", qr_code=qr, time="2024-03-05 08:30:00", channel_code="01", medstep_code="010101")


def answer(xml: str) -> dict:
    root = etree.fromstring(xml)
    assert root.tag == "response"
    out = {child.tag: (child.text or "") if len(child) == 0 else {c.tag: c.text or "" for c in child}
           for child in root}
    assert out["result"] in ("success", "failure")
    assert out["desc"]
    return out


def code_of(sim: RhcSimulator, act: str | None, msg: str | None) -> str:
    return answer(sim.handle(act, msg))["resultCode"]


# --- the request envelope -----------------------------------------------------------------

@pytest.mark.parametrize("act,msg", [(None, "x"), ("", "<request/>"), ("<request/>", None), ("<request/>", "")])
def test_empty_action_or_message_is_1009(sim, act, msg):
    a = action() if act == "<request/>" else act
    m = verify(ZHANG.static_qr) if msg == "<request/>" else msg
    out = answer(sim.handle(a, m))
    assert (out["result"], out["resultCode"]) == ("failure", "1009")


@pytest.mark.parametrize("bad", ["<request><msgGuid>", "not xml", "<request><a></b></request>", "   "])
def test_malformed_action_is_1012(sim, bad):
    assert code_of(sim, bad, verify(ZHANG.static_qr)) == "1012"


@pytest.mark.parametrize("bad", ["<request><qr_code>", "<request>&bogus;</request>", "qr_code=abc"])
def test_malformed_message_is_1012(sim, bad):
    assert code_of(sim, action(), bad) == "1012"


def test_root_not_request_is_1012(sim):
    assert code_of(sim, action().replace("request>", "req>"), verify(ZHANG.static_qr)) == "1012"
    assert code_of(sim, action(), verify(ZHANG.static_qr).replace("request>", "message>")) == "1012"


def test_nested_element_is_1012(sim):
    assert code_of(sim, action(), "<request><qr_code><v>%s</v></qr_code></request>" % ZHANG.static_qr) == "1012"


@pytest.mark.parametrize("value", [" %s", "%s ", "\n%s\n", "\t%s"])
def test_whitespace_around_message_value_is_1012(sim, value):
    assert code_of(sim, action(), verify(value % ZHANG.static_qr)) == "1012"
    assert code_of(sim, action(), verify(ZHANG.static_qr)) == "3005"


def test_whitespace_around_action_value_is_1012(sim):
    assert code_of(sim, action(userName=" scanbox"), verify(ZHANG.static_qr)) == "1012"


def test_whitespace_between_elements_is_fine(sim):
    act = etree.tostring(etree.fromstring(action()), pretty_print=True, encoding="unicode")
    msg = etree.tostring(etree.fromstring(verify(ZHANG.static_qr)), pretty_print=True, encoding="unicode")
    assert "\n  <" in act and "\n  <" in msg
    assert code_of(sim, act, msg) == "3005"


def test_empty_bussiness_code_is_1008(sim):
    assert code_of(sim, action(bussinessCode=""), verify(ZHANG.static_qr)) == "1008"


@pytest.mark.parametrize("bad", ["RHC_E0018", "RHC_E0000", "rhc_e0003", "businessCode"])
def test_unknown_bussiness_code_is_1003(sim, bad):
    assert code_of(sim, action(bussinessCode=bad), verify(ZHANG.static_qr)) == "1003"


def test_org_id_and_app_code_exactly_one(sim):
    both = action(orgId="QH0001", appCode="APP001")
    neither = action(orgId="", appCode="")
    assert code_of(sim, both, verify(ZHANG.static_qr)) == "1007"
    assert code_of(sim, neither, verify(ZHANG.static_qr)) == "1007"
    assert code_of(sim, action(orgId="", appCode="APP001"), verify(ZHANG.static_qr)) == "3005"


def test_unknown_org_id_is_1006(sim):
    assert code_of(sim, action(orgId="QH9999"), verify(ZHANG.static_qr)) == "1006"


def test_unknown_app_code_is_1004(sim):
    assert code_of(sim, action(orgId="", appCode="APP999"), verify(ZHANG.static_qr)) == "1004"


@pytest.mark.parametrize("changes", [{"userPwd": "wrong"}, {"userName": "other"}, {"userPwd": "SCANBOX-SECRET"}])
def test_wrong_credentials_are_1005(sim, changes):
    out = answer(sim.handle(action(**changes), verify(ZHANG.static_qr)))
    assert (out["result"], out["resultCode"]) == ("failure", "1005")
    assert "ehc_cardinfo" not in out and "name" not in out


def test_missing_password_is_1001(sim):
    assert code_of(sim, action(userPwd=""), verify(ZHANG.static_qr)) == "1001"


def test_unknown_action_element_is_1012(sim):
    act = action().replace("</request>", "<header>x</header></request>")
    assert code_of(sim, act, verify(ZHANG.static_qr)) == "1012"


@pytest.mark.parametrize("changes,expected", [
    ({"msgGuid": "not-a-guid"}, "1012"),
    ({"msgGuid": ""}, "1001"),
    ({"msgType": "2"}, "1012"),
    ({"msgCreateTime": "05/03/2024"}, "1012"),
])
def test_action_fields_are_checked(sim, changes, expected):
    assert code_of(sim, action(**changes), verify(ZHANG.static_qr)) == expected


def test_msg_create_time_without_space_accepted(sim):
    # 4.2.1 writes YYYY-MM-DDHH:mm:ss (the conversion lost the space); both are accepted
    assert code_of(sim, action(msgCreateTime="2024-03-0508:30:00"), verify(ZHANG.static_qr)) == "3005"


@pytest.mark.parametrize("ch", list('&<>"'))
def test_special_character_in_message_is_1002(sim, ch):
    assert code_of(sim, action(), verify("AB" + ch + "CD")) == "1002"


def test_special_character_in_action_is_1002(sim):
    assert code_of(sim, action(userPwd="a&b"), verify(ZHANG.static_qr)) == "1002"


def test_missing_required_field_is_1001(sim):
    out = answer(sim.handle(action(), message("RHC_E0003", time="2024-03-05 08:30:00")))
    assert out["resultCode"] == "1001" and "qr_code" in out["desc"]
    reg = message("RHC_E0006", name="测试", telephone="09710000000", id_number=ZHANG.id_card, id_type="01",
                  id_card=ZHANG.id_card, nation="01", sex="1", birthday="19850312", address="西宁",
                  auth_name="王护士")
    out = answer(sim.handle(action("RHC_E0006"), reg))
    assert out["resultCode"] == "1001" and "auth_id_card" in out["desc"]


def test_unknown_message_field_is_1012(sim):
    msg = verify(ZHANG.static_qr).replace("</request>", "<extra>1</extra></request>")
    assert code_of(sim, action(), msg) == "1012"


def test_format_errors_answer_their_codes(sim):
    e12 = message("RHC_E0012", name="王小二", sex="1", age="35", clinicTime="2024-03-05")
    assert code_of(sim, action("RHC_E0012"), e12) == "12001"
    e17 = message("RHC_E0017", orgId="QH0001", startDate="20240101", endDate="2024-12-31")
    assert code_of(sim, action("RHC_E0017"), e17) == "1703"


# --- verification -----------------------------------------------------------------------------

def test_verify_static_is_3005_with_identity(sim):
    out = answer(sim.handle(action(), verify(ZHANG.static_qr)))
    assert (out["result"], out["resultCode"]) == ("success", "3005")
    card = out["ehc_cardinfo"]
    assert card["name"] == "张晓明" and card["sex"] == "1" and card["nation"] == "01"
    assert card["birthday"] == "19850312" and card["id_card"] == ZHANG.id_card == make_id("630102", "19850312", "123")
    assert card["id_type"] == "01" and card["id_number"] == ZHANG.id_card
    assert card["ecardId"] == ZHANG.ecard_id and card["main_index"] == ZHANG.main_index
    assert card["qr_codetext"] == ZHANG.ecard_id + ":1"
    assert card["cellphone"] == "13897001234" and card["unit"] == "西宁市第一中学"
    assert card["telephone"] == "09718123456"
    # spec 3.3.3 fields only, nothing else
    assert set(card) == {"qr_codetext", "name", "main_index", "ecardId", "telephone", "id_number", "id_type",
                         "id_card", "nation", "sex", "birthday", "address", "cellphone", "unit"}


def test_verify_dynamic_valid_then_expired():
    clock = Clock()
    sim = RhcSimulator(clock=clock)
    qr = sim.issue_dynamic(ZHANG.id_card, ttl_s=60)
    assert qr.split(":")[1] == "0" and len(qr) == 64 + 3 + 32
    out = answer(sim.handle(action(), verify(qr)))
    assert out["resultCode"] == "3005"
    expires = datetime.fromtimestamp(clock.now + 60).strftime("%Y%m%d%H%M%S")
    assert out["ehc_cardinfo"]["qr_codetext"] == "%s:0:%s" % (ZHANG.ecard_id, expires)
    clock.now += 60
    assert code_of(sim, action(), verify(qr)) == "3005"  # the last second is still valid
    clock.now += 1
    out = answer(sim.handle(action(), verify(qr)))
    assert (out["result"], out["resultCode"]) == ("failure", "3004")
    assert "ehc_cardinfo" not in out
    # a fresh code works again
    assert code_of(sim, action(), verify(sim.issue_dynamic(ZHANG.id_card, ttl_s=60))) == "3005"


def test_dynamic_codes_use_default_ttl():
    clock = Clock()
    sim = RhcSimulator(clock=clock, dynamic_ttl_s=300)
    qr = sim.issue_dynamic(ZHANG.id_card)
    clock.now += 299
    assert code_of(sim, action(), verify(qr)) == "3005"
    clock.now += 2
    assert code_of(sim, action(), verify(qr)) == "3004"


def test_every_dynamic_code_is_distinct(sim):
    codes = {sim.issue_dynamic(ZHANG.id_card) for _ in range(5)}
    assert len(codes) == 5


@pytest.mark.parametrize("qr", ["0" * 64 + ":1", "SOMETHINGELSE", "A1B2C3D4E5F6A7B8C9D0"])
def test_unknown_code_is_3001(sim, qr):
    assert code_of(sim, action(), verify(qr)) == "3001"


def test_cancelled_resident_is_3003_with_the_card_status(sim):
    assert LI.status == "0"
    assert code_of(sim, action(), verify(LI.static_qr)) == "3003"
    assert code_of(sim, action(), verify(sim.issue_dynamic(LI.id_card))) == "3003"
    reply = answer(sim.handle(action(), verify(LI.static_qr)))
    assert reply["ehc_cardinfo"]["ehc_card_status"] == "0"


def test_pending_resident_is_2002(sim):
    assert HAN.status == "2"
    assert code_of(sim, action(), verify(HAN.static_qr)) == "2002"


def test_custom_population_and_credentials():
    person = Resident("卓玛", "2", "04", "20000101", make_id("632123", "20000101", "777"), "09738800000", "海东")
    sim = RhcSimulator(user_name="box7", user_pwd="pw7", org_ids=("QH0777",), residents=[person])
    assert code_of(sim, action(orgId="QH0777", userName="box7", userPwd="pw7"), verify(person.static_qr)) == "3005"
    assert code_of(sim, action(orgId="QH0777", userName="box7", userPwd="pw7"), verify(ZHANG.static_qr)) == "3001"
    assert code_of(sim, action(), verify(person.static_qr)) == "1006"


# --- journal -----------------------------------------------------------------------------------

def test_every_request_is_journaled_once(sim):
    sim.handle(None, None)
    sim.handle(action(), "<broken")
    sim.handle(action(), verify(ZHANG.static_qr))
    sim.handle(action(), verify("X" * 20))
    assert [e.result_code for e in sim.journal] == ["1009", "1012", "3005", "3001"]
    assert [e.ok for e in sim.journal] == [False, False, True, False]


@pytest.mark.parametrize("qr,expected", [(ZHANG.static_qr, "3005"), ("X" * 20, "3001"), (LI.static_qr, "3003")])
def test_journal_records_msg_guid_and_code_of_accepted_requests(sim, qr, expected):
    guid = uuid.uuid4().hex
    sim.handle(action(msgGuid=guid), verify(qr))
    (entry,) = sim.journal
    assert (entry.msg_guid, entry.code, entry.result_code) == (guid, "RHC_E0003", expected)
    assert entry.values["qr_code"] == qr
    assert sim.journal_for("RHC_E0003") == [entry] and sim.journal_for("RHC_E0013") == []
    j = entry.to_json()
    assert j["msgGuid"] == guid and j["resultCode"] == expected and j["bussinessCode"] == "RHC_E0003"


@pytest.mark.parametrize("changes,msg,expected", [
    ({"userPwd": "wrong"}, None, "1005"),
    ({"orgId": "QH9999"}, None, "1006"),
    ({}, "<request><time>2024-03-05 08:30:00</time></request>", "1001"),
    ({}, "<request><qr_code>A&amp;B</qr_code></request>", "1002"),
])
def test_journal_records_msg_guid_of_refused_requests(sim, changes, msg, expected):
    guid = uuid.uuid4().hex
    sim.handle(action(msgGuid=guid, **changes), msg or verify(ZHANG.static_qr))
    (entry,) = sim.journal
    assert entry.result_code == expected
    assert (entry.msg_guid, entry.code) == (guid, "RHC_E0003")


# --- newborns (3.15/3.16) ------------------------------------------------------------------------

MA = RESIDENTS["马丽娟"]


def newborn(id_type: str, id_number: str, name: str = "马丽娟之子") -> str:
    return message("RHC_E0016", name=name, telephone="09716254321", id_number=id_number, id_type=id_type,
                   id_card=MA.id_card, nation="03", sex="1", birthday="20240301", address="青海省西宁市城西区")


def newborn_info(sim: RhcSimulator) -> dict:
    return answer(sim.handle(action("RHC_E0015"), message(
        "RHC_E0015", mother_name=MA.name, mother_id_type="01", mother_id_number=MA.id_card)))


def test_newborn_reply_keeps_the_parent_id_card(sim):
    out = answer(sim.handle(action("RHC_E0016"), newborn("N1", MA.id_card)))
    assert out["resultCode"] == "6008"
    assert out["personinfo"]["id_card"] == MA.id_card


def test_newborn_by_birth_order_is_found_through_the_mother(sim):
    assert code_of(sim, action("RHC_E0016"), newborn("N1", MA.id_card)) == "6008"
    out = newborn_info(sim)
    assert out["resultCode"] == "1505"
    babies = etree.fromstring(sim.handle(action("RHC_E0015"), message(
        "RHC_E0015", mother_id_type="01", mother_id_number=MA.id_card))).findall("personinfos/personinfo")
    assert [b.findtext("name") for b in babies] == ["马丽娟之子"]
    assert babies[0].findtext("relation") == "2" and babies[0].findtext("id_type") == "N1"


def test_newborn_with_birth_certificate_is_found_through_the_mother(sim):
    assert code_of(sim, action("RHC_E0016"), newborn("08", "Q630012345", "马丽娟之女")) == "6008"
    babies = etree.fromstring(sim.handle(action("RHC_E0015"), message(
        "RHC_E0015", mother_id_type="01", mother_id_number=MA.id_card))).findall("personinfos/personinfo")
    assert [b.findtext("name") for b in babies] == ["马丽娟之女"]


def test_registering_twice_is_6009(sim):
    msg = newborn("N2", MA.id_card)
    assert code_of(sim, action("RHC_E0016"), msg) == "6008"
    assert code_of(sim, action("RHC_E0016"), msg) == "6009"
