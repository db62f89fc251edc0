"""The wondersgroup and fsjson platforms in the whole daemon, selected by `platform.kind`: the
HIS API answers, the outbox drains through the wondersgroup adapter, and a platform without
verification (fsjson) answers NOT_SUPPORTED while the box keeps serving."""

from __future__ import annotations

import asyncio

import pytest

from agent.simulator.fsjson import FsjsonServer, FsjsonSimulator
from agent.simulator.soap import Fault
from agent.simulator.wondersgroup import WondersgroupServer, WondersgroupSimulator
from agent.config import ConfigError, validate
from tests.conftest import ADMIN_TOKEN, config_dict
from tests.platforms.test_fsjson import APP_ID, SECRET
from tests.platforms.test_fsjson import new_person as fs_new_person
from tests.platforms.test_wondersgroup import ORG
from tests.platforms.test_wondersgroup import new_person as wg_new_person


@pytest.fixture
async def wg_server():
    server = await WondersgroupServer(WondersgroupSimulator(org_code=ORG)).start("127.0.0.1", 0)
    yield server
    await server.close()


@pytest.fixture
async def fs_server():
    server = await FsjsonServer(FsjsonSimulator(app_id=APP_ID, app_secret=SECRET)).start("127.0.0.1", 0)
    yield server
    await server.close()


def wondersgroup(server: WondersgroupServer) -> dict:
    return {"kind": "wondersgroup", "endpoint": server.endpoint, "wsdl": server.endpoint + "?wsdl",
            "wondersgroup": {"org_code": ORG, "user_name": "scanbox", "pass_word": "scanbox-secret"}}


async def test_wondersgroup_box_verifies_and_drains_its_outbox(box, wg_server):
    await box.start(sources={}, platform=wondersgroup(wg_server),
                    outbox={"backoff_initial": "50ms", "backoff_max": "200ms"})
    client = await box.unix()
    yuan = next(iter(wg_server.sim.people.values()))
    online = await client.call("verify_qr", {"qr": yuan.static_qr})
    assert online["verification"]["ok"] and online["identity"]["name"] == "袁宇阳"
    assert online["identity"]["nation_text"] == "汉族" and online["identity"]["source"] == "platform"

    wg_server.faults.add(Fault("http500", count=None))
    offline = await client.call("verify_qr", {"qr": yuan.static_qr, "step": "010105"})
    assert offline["verification"]["offline"] and offline["identity"]["source"] == "cache"
    await box.events.wait("status", lambda d: d.get("outbox", {}).get("pending") == 1, timeout=10)
    wg_server.faults.clear()
    await box.events.wait("status", lambda d: d.get("outbox", {}).get("sent") == 1, timeout=10)
    deferred = wg_server.sim.journal_for("virIdCardVerify")[-1]
    assert deferred.result_code == "10000" and deferred.values["useCardInfo"]["medStepcode"] == "010105"

    status = await client.call("status")
    assert status["platform"]["kind"] == "wondersgroup" and status["platform"]["credential_age_s"] is not None
    admin = await box.tcp(ADMIN_TOKEN)
    qr = await admin.call("platform.call", {"operation": "downQr", "params": {
        "name": "袁宇阳", "zjlx": "01", "zjhm": yuan.people["zjhm"]}})
    assert qr["data"]["vuid"] == yuan.vuid


async def test_fsjson_box_answers_not_supported_for_scans_and_keeps_serving(box, fs_server):
    await box.start(platform={"kind": "fsjson", "endpoint": fs_server.endpoint,
                              "fsjson": {"app_id": APP_ID, "app_secret": SECRET}})
    client = await box.unix()
    person = next(iter(fs_server.sim.people.values()))
    waiting = asyncio.get_running_loop().create_task(client.request("read_card", {"timeout_s": 10}, timeout=15))
    await box.waiting(1)
    box.scan(person.static_qr)
    result = (await waiting)["result"]
    assert result["scan"]["payload"] == person.static_qr  # the code, raw, for the HIS
    assert result["verification"]["ok"] is False and result["verification"]["reason"] == "NOT_SUPPORTED"
    answer = await client.request("verify_qr", {"qr": person.static_qr})
    assert answer["result"]["verification"]["reason"] == "NOT_SUPPORTED"
    status = await client.call("status")
    assert status["platform"]["kind"] == "fsjson" and status["outbox"]["pending"] == 0
    # nothing was sent for the scans (the workKey is fetched at start, whatever comes)
    assert [e.operation for e in fs_server.sim.journal] == ["getWorkKey"]

    admin = await box.tcp(ADMIN_TOKEN)
    img = await admin.call("platform.call", {"operation": "getImg", "params": {"ehealthCardId": person.vuid}})
    assert img["resultCode"] == "10000" and img["data"]["QrCode"].startswith(person.vuid)


async def test_card_issue_and_update_through_the_api_on_wondersgroup(box, wg_server):
    """platform.call's params are the DTOs of docs/api.md: objects inside objects."""
    await box.start(sources={}, platform=wondersgroup(wg_server))
    admin = await box.tcp(ADMIN_TOKEN)
    person = wg_new_person("欧阳芳", "331")
    issued = await admin.call("platform.call", {"operation": "syncCardInfo", "params": {
        "cardInfo": {"isRealName": "1", "peopleInfo": person}}})
    assert issued["resultCode"] == "10000" and issued["data"]["QRCode"] == issued["data"]["vuid"] + ":1"
    assert wg_server.sim.journal_for("syncCardInfo")[-1].values["cardInfo"]["peopleInfo"]["xm"] == "欧阳芳"
    updated = await admin.call("platform.call", {"operation": "updateCardInfo", "params": {
        "qrCode": issued["data"]["QRCode"], "issuingMode": "2", "terminalType": "1",
        "peopleInfo": {**{k: person[k] for k in ("xm", "xb", "mzdm", "csrq", "zjlx", "zjhm")},
                       "brdh": "13600000002"}}})
    assert updated["resultCode"] == "10000"
    verified = await admin.call("verify_qr", {"qr": issued["data"]["QRCode"]})
    assert verified["identity"]["phone"] == "13600000002"


async def test_card_issue_through_the_api_on_fsjson(box, fs_server):
    await box.start(sources={}, platform={"kind": "fsjson", "endpoint": fs_server.endpoint,
                                          "fsjson": {"app_id": APP_ID, "app_secret": SECRET}})
    admin = await box.tcp(ADMIN_TOKEN)
    person = fs_new_person("夏海", "341")
    issued = await admin.call("platform.call", {"operation": "syncCardInfo", "params": {
        "cardInfo": {"orgCode": "091760215", "isRealName": "0"}, "peopleInfo": person}})
    assert issued["resultCode"] == "10000" and issued["data"]["ehealthCardId"]
    assert fs_server.sim.journal_for("syncCardInfo")[-1].values["cardInfo"]["klx"] == "3"


@pytest.mark.parametrize("platform, where, text", [
    ({"kind": "fsjson"}, "platform", "kind 'fsjson' needs a [platform.fsjson] section"),
    ({"kind": "wondersgroup"}, "platform", "kind 'wondersgroup' needs a [platform.wondersgroup] section"),
    ({"kind": "wondersgroup", "wondersgroup": {"org_code": "1", "user_name": "u", "pass_word": "p",
                                              "dep_type": "11"}},
     "platform.wondersgroup.dep_type", "10 其它科室"),
    ({"kind": "fsjson", "fsjson": {"app_id": "a", "app_secret": "s", "sign_separator": ","}},
     "platform.fsjson.sign_separator", ""),
])
def test_config_problems_name_their_key(tmp_path, platform, where, text):
    data = config_dict(None, tmp_path)
    data["platform"] = {"endpoint": "http://127.0.0.1:9/x", **platform}
    with pytest.raises(ConfigError) as err:
        validate(data)
    assert any(p.path == where and text in p.message for p in err.value.problems), err.value.problems


@pytest.mark.parametrize("kind", ["wondersgroup", "fsjson"])
async def test_the_credential_fetched_at_start_makes_the_platform_reachable(box, wg_server, fs_server, kind):
    """status.platform.reachable stayed null after the box's own successful getAuthKey (or
    workKey) until the first scan; a status event says so too (the display leaves "not asked")."""
    platform = wondersgroup(wg_server) if kind == "wondersgroup" else {
        "kind": "fsjson", "endpoint": fs_server.endpoint, "fsjson": {"app_id": APP_ID, "app_secret": SECRET}}
    await box.start(sources={}, platform=platform)
    await box.events.wait("status", lambda d: d.get("platform", {}).get("reachable") is True, timeout=10)
    status = await box.daemon.status()
    assert status["platform"]["reachable"] is True and status["platform"]["last_ok_at"] is not None
    assert status["platform"]["credential_age_s"] is not None

