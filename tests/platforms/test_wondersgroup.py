"""The wondersgroup adapter (spec 001) against its simulator over real SOAP on loopback: every
operation, the authKey's life (cached on disk, reused across restarts, one refresh for many
callers), return codes, Chinese text in UTF-8 and GBK, transport faults, and the WSDL cache."""

from __future__ import annotations

import asyncio
import json
import socket
import stat
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.config import validate
from agent.model import Reason, ScanboxError
from agent.platforms.base import PlatformRejected, PlatformUnavailable, VerifyRequest
from agent.platforms.wondersgroup import WondersgroupPlatform
from agent.qr import QrKind
from agent.simulator.rhc import make_id
from agent.simulator.soap import Fault
from agent.simulator.wondersgroup import WondersgroupServer, WondersgroupSimulator
from tests.conftest import config_dict, until

ORG = "440604001"


def wg_config_dict(server: WondersgroupServer | None, tmp_path: Path, **wondersgroup: Any) -> dict[str, Any]:
    data = config_dict(None, tmp_path)
    endpoint = server.endpoint if server else "http://127.0.0.1:9/hcpde/services/healthCardService"
    data["platform"] = {
        "kind": "wondersgroup", "endpoint": endpoint, "timeout_s": 2,
        "wsdl": endpoint + "?wsdl" if server else None,
        "wondersgroup": {"org_code": ORG, "user_name": "scanbox", "pass_word": "scanbox-secret",
                         "machine_code": "SB-0001", **wondersgroup},
    }
    if data["platform"]["wsdl"] is None:
        del data["platform"]["wsdl"]
    return data


def new_platform(server: WondersgroupServer | None, tmp_path: Path, **wondersgroup: Any) -> WondersgroupPlatform:
    config = validate(wg_config_dict(server, tmp_path, **wondersgroup))
    return WondersgroupPlatform(config.platform, config.site, tmp_path / "state")


@pytest.fixture
def wg_sim() -> WondersgroupSimulator:
    return WondersgroupSimulator(org_code=ORG)


@pytest.fixture
async def wg_server(wg_sim):
    server = await WondersgroupServer(wg_sim).start("127.0.0.1", 0)
    yield server
    await server.close()


@pytest.fixture
async def platform(wg_server, tmp_path):
    p = new_platform(wg_server, tmp_path)
    await p.start()
    yield p
    await p.close()


def scan(qr: str, step: str = "010101", channel: str = "01") -> VerifyRequest:
    return VerifyRequest(qr, QrKind.STATIC if qr.endswith(":1") else QrKind.DYNAMIC, datetime.now(), step, channel)


def first(sim: WondersgroupSimulator, name: str):
    return next(p for p in sim.people.values() if p.people["xm"] == name)


# --- verification ------------------------------------------------------------------------------

async def test_verify_static_code_maps_people_info_to_identity(platform, wg_sim):
    yuan = first(wg_sim, "袁宇阳")
    answer = await platform.verify_qr(scan(yuan.static_qr))
    identity = answer.identity
    assert (answer.platform_code, answer.platform_message) == ("10000", "操作成功")
    assert (identity.name, identity.sex, identity.nation, identity.birthday) == ("袁宇阳", "1", "01", "19900708")
    assert (identity.id_type, identity.id_number, identity.phone) == ("01", yuan.people["zjhm"], "13589759854")
    assert (identity.ecard_id, identity.main_index) == (yuan.vuid, yuan.empi)
    assert identity.address == "广东省佛山市禅城区祖庙街道金鱼街24号"
    sent = wg_sim.journal_for("virIdCardVerify")[-1].values
    assert sent["useCardInfo"] == {"issuingMode": "2", "depCode": "5500", "depType": "1", "machineCode": "SB-0001",
                                   "medStepcode": "010101", "medType": "2", "terminalType": "1"}


async def test_use_card_info_from_config_and_per_call_overrides(wg_server, wg_sim, tmp_path):
    p = new_platform(wg_server, tmp_path, issuing_mode="6", dep_code="0300", dep_type="3", med_type="1")
    await p.start()
    try:
        qr = first(wg_sim, "欧阳喆").static_qr
        await p.verify_qr(scan(qr))  # the site's step and channel (010101, 01)
        assert wg_sim.journal_for("virIdCardVerify")[-1].values["useCardInfo"] == {
            "issuingMode": "6", "depCode": "0300", "depType": "3", "machineCode": "SB-0001",
            "medStepcode": "010101", "medType": "1", "terminalType": "1"}
        await p.verify_qr(scan(qr, step="010103", channel="02"))  # a kiosk caller naming its step
        sent = wg_sim.journal_for("virIdCardVerify")[-1].values["useCardInfo"]
        assert (sent["medStepcode"], sent["terminalType"]) == ("010103", "2")
        with pytest.raises(ScanboxError) as err:
            p.verify_record(scan(qr, step="020101"))  # no such step (the API refuses it before this)
        assert err.value.reason is Reason.BAD_REQUEST and "medStepcode" in err.value.message
        result = await p.call("virIdCardVerify", {"qrCode": qr, "useCardInfo": {"depCode": "1000"}})
        assert result["data"]["peopleInfo"]["xm"] == "欧阳喆"
        assert wg_sim.journal_for("virIdCardVerify")[-1].values["useCardInfo"]["depCode"] == "1000"
    finally:
        await p.close()


async def test_dynamic_code_verifies_until_it_expires(platform, wg_sim):
    he = first(wg_sim, "欧阳喆")
    fresh = wg_sim.issue_dynamic(he.people["zjhm"])
    assert (await platform.verify_qr(scan(fresh))).identity.name == "欧阳喆"
    stale = wg_sim.issue_dynamic(he.people["zjhm"], ttl_s=-1)
    with pytest.raises(PlatformRejected) as err:
        await platform.verify_qr(scan(stale))
    assert err.value.platform_code == "10110" and "过期" in err.value.platform_message


@pytest.mark.parametrize("name, code, reason", [
    ("夏海祥", "1010", Reason.CARD_INACTIVE),   # lost
    ("何敏", "1020", Reason.CARD_INACTIVE),     # cancelled
])
async def test_card_states_answer_their_codes(platform, wg_sim, name, code, reason):
    with pytest.raises(PlatformRejected) as err:
        await platform.verify_qr(scan(first(wg_sim, name).static_qr))
    assert (err.value.platform_code, err.value.reason) == (code, reason)
    assert not err.value.transient


async def test_unknown_code_is_card_not_found(platform):
    with pytest.raises(PlatformRejected) as err:
        await platform.verify_qr(scan("A" * 64 + ":1"))
    assert (err.value.platform_code, err.value.reason) == ("10109", Reason.CARD_NOT_FOUND)


async def test_a_verify_record_uploads_later_from_the_outbox(platform, wg_sim):
    record = platform.verify_record(scan(first(wg_sim, "袁宇阳").static_qr))
    assert record.operation == "virIdCardVerify" and record.values["useCardInfo.machineCode"] == "SB-0001"
    assert await platform.upload(record) == ("10000", "操作成功")
    assert len(wg_sim.journal_for("virIdCardVerify")) == 1


# --- the authKey ---------------------------------------------------------------------------------

async def test_auth_key_is_kept_0600_and_reused_after_a_restart(wg_server, wg_sim, tmp_path):
    qr = first(wg_sim, "袁宇阳").static_qr
    p = new_platform(wg_server, tmp_path)
    await p.start()
    await p.verify_qr(scan(qr))
    await p.close()
    cache = tmp_path / "state" / "wondersgroup-authkey.json"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    key = json.loads(cache.read_text())["value"]
    assert key in wg_sim.auth_keys

    restarted = new_platform(wg_server, tmp_path)
    await restarted.start()
    try:
        await restarted.verify_qr(scan(qr))
        assert restarted.health().credential_age_s is not None
    finally:
        await restarted.close()
    assert len(wg_sim.journal_for("getAuthKey")) == 1
    assert {e.auth_key for e in wg_sim.journal_for("virIdCardVerify")} == {key}


async def test_a_cached_key_of_another_account_is_not_used(wg_server, wg_sim, tmp_path):
    p = new_platform(wg_server, tmp_path)
    await p.start()
    await p.verify_qr(scan(first(wg_sim, "袁宇阳").static_qr))
    await p.close()
    wg_sim.user_name = "other"
    other = new_platform(wg_server, tmp_path, user_name="other")
    assert other.auth.load() is None
    await other.start()
    try:
        await other.verify_qr(scan(first(wg_sim, "袁宇阳").static_qr))
    finally:
        await other.close()
    assert len(wg_sim.journal_for("getAuthKey")) == 2


async def test_expired_auth_mid_traffic_20_concurrent_verifies_one_reauth(platform, wg_sim):
    qrs = [p.static_qr for p in wg_sim.people.values() if p.status == "1"]
    await platform.verify_qr(scan(qrs[0]))
    assert len(wg_sim.journal_for("getAuthKey")) == 1
    wg_sim.expire_auth()
    answers = await asyncio.gather(*(platform.verify_qr(scan(qrs[i % len(qrs)])) for i in range(20)))
    assert all(a.platform_code == "10000" for a in answers)
    assert len(wg_sim.journal_for("getAuthKey")) == 2  # exactly one re-auth for all twenty
    verifies = wg_sim.journal_for("virIdCardVerify")
    assert sum(e.result_code == "10105" for e in verifies) == 20  # each heard "expired" once ...
    assert sum(e.result_code == "10000" for e in verifies) == 21  # ... and was answered on its retry


async def test_two_expiries_within_one_burst_are_each_refreshed_once(platform, wg_server, wg_sim):
    """A caller that heard key 1 expire is handed key 2, which expired too in the meantime: it
    refreshes again (once), instead of answering PLATFORM_AUTH."""
    qrs = [p.static_qr for p in wg_sim.people.values() if p.status == "1"]
    await platform.verify_qr(scan(qrs[0]))
    wg_sim.expire_auth()                                    # the first expiry
    wg_server.faults.add(Fault("hold"))                     # the late caller's request waits
    late = asyncio.get_running_loop().create_task(platform.verify_qr(scan(qrs[1])))
    await until(lambda: wg_server.held == 1)
    others = await asyncio.gather(*(platform.verify_qr(scan(qrs[i % len(qrs)])) for i in range(5)))
    assert all(a.platform_code == "10000" for a in others)
    assert len(wg_sim.journal_for("getAuthKey")) == 2       # one refresh for the first expiry
    wg_sim.expire_auth()                                    # the second, while the late one waits
    wg_server.release_held()
    assert (await late).platform_code == "10000"            # 10105 (key 1), 10105 (key 2), 10000 (key 3)
    assert len(wg_sim.journal_for("getAuthKey")) == 3       # and one refresh for the second
    assert [e.result_code for e in wg_sim.journal_for("virIdCardVerify")][-2:] == ["10105", "10000"]


async def test_callers_waiting_for_a_failing_auth_share_its_failure(wg_server, wg_sim, tmp_path):
    p = new_platform(wg_server, tmp_path)  # not started: no authKey yet
    try:
        wg_server.faults.add(Fault("http500"))  # getAuthKey fails once
        results = await asyncio.gather(*(p.verify_qr(scan(first(wg_sim, "袁宇阳").static_qr)) for _ in range(20)),
                                       return_exceptions=True)
        assert all(isinstance(r, PlatformUnavailable) for r in results)
        assert wg_server.requests == 1  # one getAuthKey for twenty callers, not twenty in a row
        assert (await p.verify_qr(scan(first(wg_sim, "袁宇阳").static_qr))).platform_code == "10000"
    finally:
        await p.close()


async def test_expiry_through_the_control_api(platform, wg_server, wg_sim):
    qr = first(wg_sim, "袁宇阳").static_qr
    await platform.verify_qr(scan(qr))
    async with httpx.AsyncClient() as http:
        expired = (await http.post("http://%s:%d/_sim/expire_auth" % (wg_server.host, wg_server.port))).json()
    assert expired == {"expired": 1}
    assert (await platform.verify_qr(scan(qr))).platform_code == "10000"
    assert [e.result_code for e in wg_sim.journal] == ["10000", "10000", "10105", "10000", "10000"]


async def test_a_site_wsdl_that_cannot_carry_the_parameters_is_a_bad_request(wg_sim, tmp_path):
    # a site whose useCardInfo has no machineCode: zeep cannot build the request; trying again
    # later cannot help, so it is not "platform unavailable"
    wsdl = (Path(__file__).resolve().parents[2] / "agent" / "platforms" / "wsdl" / "wondersgroup.wsdl")
    text = wsdl.read_text(encoding="utf-8").replace('<xsd:element name="machineCode" type="xsd:string" '
                                                    'minOccurs="0"/>', "")
    (tmp_path / "site.wsdl").write_text(text, encoding="utf-8")
    server = await WondersgroupServer(wg_sim).start("127.0.0.1", 0)
    data = wg_config_dict(server, tmp_path)
    data["platform"]["wsdl"] = str(tmp_path / "site.wsdl")  # a file, as config allows
    config = validate(data)
    p = WondersgroupPlatform(config.platform, config.site, tmp_path / "state")
    await p.start()
    try:
        with pytest.raises(ScanboxError) as err:
            await p.verify_qr(scan(first(wg_sim, "袁宇阳").static_qr))
        assert err.value.reason is Reason.BAD_REQUEST and "WSDL" in err.value.message
    finally:
        await p.close()
        await server.close()


async def test_an_auth_key_refused_right_after_refresh_is_an_auth_error_not_a_loop(wg_server, wg_sim, tmp_path):
    wg_sim.auth_ttl_s = -1  # every key is expired as soon as it is issued
    p = new_platform(wg_server, tmp_path)
    await p.start()
    try:
        with pytest.raises(PlatformRejected) as err:
            await p.verify_qr(scan(first(wg_sim, "袁宇阳").static_qr))
    finally:
        await p.close()
    assert (err.value.platform_code, err.value.reason) == ("10105", Reason.PLATFORM_AUTH)
    assert len(wg_sim.journal_for("getAuthKey")) == 2
    assert len(wg_sim.journal_for("virIdCardVerify")) == 2


@pytest.mark.parametrize("field, value, code", [
    ("pass_word", "wrong-password", "10103"),
    ("user_name", "nobody", "10102"),
    ("org_code", "999999999", "10101"),
])
async def test_wrong_credentials_are_an_auth_error(wg_server, wg_sim, tmp_path, field, value, code):
    p = new_platform(wg_server, tmp_path, **{field: value})
    await p.start()
    try:
        with pytest.raises(PlatformRejected) as err:
            await p.verify_qr(scan(first(wg_sim, "袁宇阳").static_qr))
        assert (err.value.platform_code, err.value.reason) == (code, Reason.PLATFORM_AUTH)
        assert p.health().reachable is True and p.health().last_error
    finally:
        await p.close()
    assert not (tmp_path / "state" / "wondersgroup-authkey.json").exists()
    assert "wrong-password" not in json.dumps([e.to_json() for e in wg_sim.journal])


# --- card issue, update, QR download ---------------------------------------------------------------

def new_person(name: str, seq: str = "118") -> dict[str, str]:
    id_number = make_id("440604", "20010203", seq)
    return {"xm": name, "xb": "2", "mzdm": "01", "csrq": "2001-02-03", "sfzhm": id_number, "zjlx": "01",
            "zjhm": id_number, "brdh": "13800000000", "dzsf": "广东省", "dzs": "佛山市"}


@pytest.mark.parametrize("encoding", ["UTF-8", "GBK"])
async def test_issue_an_electronic_card_and_verify_it_chinese_names_round_trip(wg_sim, tmp_path, encoding):
    server = await WondersgroupServer(wg_sim, encoding=encoding).start("127.0.0.1", 0)
    p = new_platform(server, tmp_path)
    await p.start()
    try:
        # 喆 is in GBK; 𠮷 (U+20BB7) is not, and must survive as a character reference
        name = "欧阳喆𠮷"
        issued = await p.call("syncCardInfo", {"cardInfo": {"isRealName": "1", "peopleInfo": new_person(name)}})
        data = issued["data"]
        assert issued["resultCode"] == "10000"
        assert set(data) >= {"virtualCardNum", "vuid", "empi", "QRCode", "img"}
        assert data["QRCode"] == data["vuid"] + ":1"
        sent = wg_sim.journal_for("syncCardInfo")[-1].values["cardInfo"]
        assert (sent["klx"], sent["orgCode"], sent["issuingMode"]) == ("3", ORG, "2")
        assert sent["peopleInfo"]["csrq"] == "20010203"  # sent as the table's YYYYMMDD
        answer = await p.verify_qr(scan(data["QRCode"]))
        assert answer.identity.name == name and answer.identity.address == "广东省佛山市"
    finally:
        await p.close()
        await server.close()


async def test_issuing_twice_is_refused(platform):
    person = new_person("王芳", "226")
    await platform.call("syncCardInfo", {"cardInfo": {"isRealName": "1", "peopleInfo": person}})
    with pytest.raises(PlatformRejected) as err:
        await platform.call("syncCardInfo", {"cardInfo": {"isRealName": "1", "peopleInfo": person}})
    assert err.value.platform_code == "10115"


async def test_update_card_info(platform, wg_sim):
    yuan = first(wg_sim, "袁宇阳")
    people = {"xm": "袁宇阳", "xb": "1", "mzdm": "01", "csrq": "1990-07-08", "zjlx": "01",
              "zjhm": yuan.people["zjhm"], "brdh": "13600000001"}
    result = await platform.call("updateCardInfo", {"qrCode": yuan.static_qr, "issuingMode": "2",
                                                    "terminalType": "1", "peopleInfo": people})
    assert result["resultCode"] == "10000"
    assert (await platform.verify_qr(scan(yuan.static_qr))).identity.phone == "13600000001"
    with pytest.raises(PlatformRejected) as err:  # 姓名，证件号码、证件类型不能更改
        await platform.call("updateCardInfo", {"peopleInfo": {**people, "xm": "袁宇"}})
    assert err.value.platform_code == "10130"


async def test_down_qr(platform, wg_sim):
    yuan = first(wg_sim, "袁宇阳")
    result = await platform.call("downQr", {"name": "袁宇阳", "zjlx": "01", "zjhm": yuan.people["zjhm"]})
    assert (result["data"]["vuid"], result["data"]["empi"]) == (yuan.vuid, yuan.empi)
    assert result["data"]["img"].startswith("iVBOR")  # base64 PNG
    with pytest.raises(PlatformRejected) as err:
        await platform.call("downQr", {"name": "袁宇阳", "zjlx": "01", "zjhm": make_id("440604", "19990101", "001")})
    assert (err.value.platform_code, err.value.reason) == ("10108", Reason.CARD_NOT_FOUND)


@pytest.mark.parametrize("people, field", [
    ({"xb": "5"}, "xb"),
    ({"mzdm": "77"}, "mzdm"),
    ({"csrq": "19901340"}, "csrq"),
    ({"zjhm": "440604199007087610"}, "zjhm"),  # wrong check digit
    ({"xm": ""}, "xm"),
    ({"nickname": "x"}, "nickname"),
])
async def test_bad_parameters_are_refused_before_sending(platform, wg_sim, people, field):
    person = {**new_person("赵六", "330"), **people}
    with pytest.raises(ScanboxError) as err:
        await platform.call("syncCardInfo", {"cardInfo": {"isRealName": "1", "peopleInfo": person}})
    assert err.value.reason is Reason.BAD_REQUEST and field in err.value.message
    assert wg_sim.journal_for("syncCardInfo") == []


@pytest.mark.parametrize("people, code", [
    ({"xb": "5"}, "10113"), ({"mzdm": "77"}, "10123"), ({"csrq": "19901340"}, "10124"),
    ({"zjhm": "440604199007087610"}, "10111"), ({"xm": ""}, "10114"), ({"zjlx": "42"}, "10134"),
])
def test_the_simulator_answers_the_spec_codes_for_bad_fields(wg_sim, people, code):
    key = wg_sim.handle("getAuthKey", {"orgCode": ORG, "userName": "scanbox", "passWord": "scanbox-secret"})["authKey"]
    card = {"klx": "3", "orgCode": ORG, "fksj": "20240101", "issuingMode": "2", "isRealName": "1",
            "peopleInfo": {**new_person("赵六", "330"), **people}}
    assert wg_sim.handle("syncCardInfo", {"orgCode": ORG, "authKey": key, "cardInfo": card})["resultCode"] == code


async def test_unknown_operation(platform):
    with pytest.raises(ScanboxError) as err:
        await platform.call("getCardInfo", {})
    assert err.value.reason is Reason.BAD_REQUEST and "virIdCardVerify" in err.value.message


# --- transport and WSDL ------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["http500", "html", "garbage", "empty", "reset"])
async def test_transport_faults_are_unavailable(platform, wg_server, wg_sim, mode):
    await platform.verify_qr(scan(first(wg_sim, "袁宇阳").static_qr))  # authKey in hand
    wg_server.faults.add(Fault(mode))
    with pytest.raises(PlatformUnavailable):
        await platform.verify_qr(scan(first(wg_sim, "袁宇阳").static_qr))
    assert platform.health().reachable is False
    assert (await platform.verify_qr(scan(first(wg_sim, "袁宇阳").static_qr))).platform_code == "10000"


async def test_a_hung_platform_times_out(wg_server, wg_sim, tmp_path):
    data = wg_config_dict(wg_server, tmp_path)
    data["platform"]["timeout_s"] = 0.3
    config = validate(data)
    p = WondersgroupPlatform(config.platform, config.site, tmp_path / "state")
    await p.start()
    try:
        await p.verify_qr(scan(first(wg_sim, "袁宇阳").static_qr))
        wg_server.faults.add(Fault("hang"))
        with pytest.raises(PlatformUnavailable) as err:
            await p.verify_qr(scan(first(wg_sim, "袁宇阳").static_qr))
        assert "no answer within" in err.value.message
    finally:
        await p.close()


async def test_the_site_wsdl_is_cached_for_an_offline_start(wg_sim, tmp_path):
    server = await WondersgroupServer(wg_sim).start("127.0.0.1", 0)
    endpoint = server.endpoint
    p = new_platform(server, tmp_path)
    await p.start()
    assert p.service.note.startswith("fetched")
    await p.close()
    await server.close()  # the platform is down at the next boot

    restarted = new_platform(server, tmp_path)
    await restarted.start()  # does not fail
    try:
        assert restarted.service.note == "cached copy"
        with pytest.raises(PlatformUnavailable):
            await restarted.verify_qr(scan(first(wg_sim, "袁宇阳").static_qr))
        assert restarted.service.endpoint == endpoint
    finally:
        await restarted.close()


async def test_shipped_wsdl_when_none_is_configured(wg_server, wg_sim, tmp_path):
    data = wg_config_dict(wg_server, tmp_path)
    del data["platform"]["wsdl"]
    config = validate(data)
    p = WondersgroupPlatform(config.platform, config.site, tmp_path / "state")
    await p.start()
    try:
        assert p.service.note == "shipped default"
        assert (await p.verify_qr(scan(first(wg_sim, "袁宇阳").static_qr))).platform_code == "10000"
    finally:
        await p.close()


async def test_platform_down_at_start(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    data = wg_config_dict(None, tmp_path)
    data["platform"]["endpoint"] = "http://127.0.0.1:%d/hcpde/services/healthCardService" % port
    data["platform"]["wsdl"] = data["platform"]["endpoint"] + "?wsdl"
    config = validate(data)
    p = WondersgroupPlatform(config.platform, config.site, tmp_path / "state")
    await p.start()
    try:
        with pytest.raises(PlatformUnavailable):
            await p.verify_qr(scan("A" * 64 + ":1"))
        assert p.health().reachable is False
    finally:
        await p.close()
