"""The RHC adapter against the simulator over real SOAP on loopback: every business operation,
verification outcomes, transport faults, and WSDL handling (site WSDL, cache, local file)."""

from __future__ import annotations

import asyncio
import re
import socket
import stat
import time
from datetime import datetime
from pathlib import Path

import pytest
from lxml import etree

from agent.model import Reason, ScanboxError
from agent.platforms.base import PlatformRejected, PlatformUnavailable, VerifyRequest
from agent.platforms.rhc import RhcPlatform
from agent.qr import QrKind
from agent.simulator.rhc import default_residents, make_id
from agent.simulator.soap import Fault, SimServer, WsdlStyle, render_wsdl
from tests.conftest import make_config, start_sim
from tests.platforms.test_rhc_schema import PHOTO

RESIDENTS = {r.name: r for r in default_residents()}
ZHANG = RESIDENTS["张晓明"]
LI = RESIDENTS["李建国"]      # cancelled
HAN = RESIDENTS["韩雪"]       # pending review
STATIC = re.compile(r"^[0-9A-F]{64}:1$")
DYNAMIC = re.compile(r"^[0-9A-F]{64}:0:[0-9A-F]{32}$")
OTHER_STYLE = WsdlStyle(namespace="http://other.ns/", action_part="arg0", message_part="arg1", external_schema=True)


def new_platform(server: SimServer | None, state: Path, **platform: object) -> RhcPlatform:
    config = make_config(server, state, platform=platform) if platform else make_config(server, state)
    return RhcPlatform(config.platform, config.site, state / "state")


@pytest.fixture
async def platform(sim_server, tmp_path):
    p = new_platform(sim_server, tmp_path)
    await p.start()
    yield p
    await p.close()


def scan(qr: str, kind: QrKind = QrKind.STATIC, at: datetime | None = None) -> VerifyRequest:
    return VerifyRequest(qr, kind, at or datetime.now(), "010101", "01")


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# --- every operation, in a realistic flow ----------------------------------------------------------

async def test_every_operation_in_a_flow(platform, sim):
    mother_id = make_id("630103", "19880808", "426")
    person = {"name": "刘海燕", "telephone": "09714455667", "id_number": mother_id, "id_type": "01",
              "id_card": mother_id, "nation": "01", "sex": "2", "birthday": "19880808",
              "address": "青海省西宁市城中区南大街3号"}

    # E0006: registered on site, authenticated by a nurse
    r = await platform.call("RHC_E0006", {**person, "auth_id_card": make_id("630104", "19700101", "018"),
                                          "auth_name": "王护士", "cellphone": "13997001122"})
    assert (r["result"], r["resultCode"], r["desc"]) == ("success", "6008", "注册成功")
    d = r["data"]
    assert (d["name"], d["id_card"], d["sex"], d["birthday"], d["ehc_card_status"]) == (
        "刘海燕", mother_id, "2", "19880808", "4")
    ecard_id = d["ecardId"]
    assert ecard_id and d["main_index"]

    # E0002: static code
    r = await platform.call("RHC_E0002", {"id_card": mother_id, "qrcode_type": "1"})
    assert r["resultCode"] == "2009"
    static = r["data"]["qr_code"]
    assert STATIC.match(static)
    # a second static code is refused
    with pytest.raises(PlatformRejected) as info:
        await platform.call("RHC_E0002", {"id_card": mother_id, "qrcode_type": "1"})
    assert info.value.platform_code == "2003" and info.value.reason is Reason.PLATFORM_REJECTED

    # E0003 through verify_qr
    answer = await platform.verify_qr(scan(static))
    assert answer.platform_code == "3005"
    identity = answer.identity
    assert (identity.name, identity.id_number, identity.ecard_id) == ("刘海燕", mother_id, ecard_id)
    assert answer.identity.phone == "13997001122"

    # E0005: query, with a dynamic code that verifies
    r = await platform.call("RHC_E0005", {"id_type": "01", "id_number": mother_id})
    assert r["resultCode"] == "5005"
    d = r["data"]
    assert d["qr_code"] == static and d["ehc_card_status"] == "1" and d["name"] == "刘海燕"
    assert DYNAMIC.match(d["dt_qr_code"])
    assert (await platform.verify_qr(scan(d["dt_qr_code"], QrKind.DYNAMIC))).identity.name == "刘海燕"

    # E0011: modify, seen by the next query
    r = await platform.call("RHC_E0011", {"ecardId": ecard_id, "telephone": "09719988776",
                                          "birthday": "1988-08-09", "alterNo": "HIS0001",
                                          "alterTime": "2024-03-05 09:00:00"})
    assert (r["result"], r["resultCode"], r["data"]) == ("success", "11002", {})
    d = (await platform.call("RHC_E0005", {"id_card": mother_id}))["data"]
    assert (d["telephone"], d["birthday"]) == ("09719988776", "19880809")

    # E0007 / E0010 / E0008: family
    child_id = make_id("630103", "20150601", "215")
    r = await platform.call("RHC_E0007", {
        "self_id_type": "01", "self_id_number": mother_id, "relation": "3", "name": "刘小雨",
        "telephone": "09714455667", "id_number": child_id, "id_type": "01", "id_card": child_id,
        "nation": "01", "sex": "2", "birthday": "20150601", "address": "青海省西宁市城中区南大街3号"})
    assert r["resultCode"] == "7006" and r["data"]["name"] == "刘小雨" and r["data"]["id_card"] == child_id
    r = await platform.call("RHC_E0010", {"self_id_type": "01", "self_id_number": mother_id})
    assert r["resultCode"] == "5005" and r["data"]["total"] == "1"
    assert r["data"]["personinfo"] == [{"name": "刘小雨", "id_type": "01", "id_number": child_id,
                                        "id_card": child_id, "relation": "3", "ehc_card_status": "4"}]
    r = await platform.call("RHC_E0008", {"self_id_type": "01", "self_id_number": mother_id,
                                          "id_type": "01", "id_number": child_id})
    assert r["resultCode"] == "8006"
    r = await platform.call("RHC_E0010", {"self_id_type": "01", "self_id_number": mother_id})
    assert r["data"]["total"] == "0" and not r["data"].get("personinfo")
    with pytest.raises(PlatformRejected) as info:
        await platform.call("RHC_E0008", {"self_id_type": "01", "self_id_number": mother_id,
                                          "id_type": "01", "id_number": child_id})
    assert info.value.platform_code == "8005"

    # E0009: physical card usage
    r = await platform.call("RHC_E0009", {
        "time": "2024-03-05 09:10:00", "atr": "3B6D000000813186540B", "hc_number": "6300001234567890123",
        "sam": "45600001X5500", "use_citycode": "630100", "use_cityname": "西宁市", "nation": "01",
        "id_card": mother_id, "hospital_code": "QH0001", "hospital_name": "西宁市第一人民医院",
        "channel_code": "02", "channel_name": "自助机", "medstep_code": "010105", "medstep_name": "收费"})
    assert r["resultCode"] == "9002"

    # E0012 -> E0013 (verify_qr TEMPORARY)
    r = await platform.call("RHC_E0012", {"name": "王小二", "sex": "1", "age": 35,
                                          "clinicTime": "2024-03-05 09:20:00", "empi": "EMPI000123"})
    assert r["resultCode"] == "12002"
    temp = r["data"]["qr_code"]
    assert len(temp) == 20
    answer = await platform.verify_qr(scan(temp, QrKind.TEMPORARY))
    assert answer.platform_code == "13002"
    assert (answer.identity.name, answer.identity.sex, answer.identity.id_number) == ("王小二", "1", None)
    assert sim.journal[-1].code == "RHC_E0013"

    # E0016 -> E0015: a newborn, found through the mother
    r = await platform.call("RHC_E0016", {
        "name": "刘海燕之子", "telephone": "09714455667", "id_number": mother_id, "id_type": "N1",
        "id_card": mother_id, "nation": "01", "sex": "1", "birthday": "20240301",
        "address": "青海省西宁市城中区南大街3号"})
    assert r["resultCode"] == "6008" and r["data"]["id_type"] == "N1"
    r = await platform.call("RHC_E0015", {"mother_name": "刘海燕", "mother_id_type": "01",
                                          "mother_id_number": mother_id})
    assert r["resultCode"] == "1505"
    babies = r["data"]["personinfo"]
    assert isinstance(babies, list) and [(b["name"], b["relation"], b["sex"]) for b in babies] == [
        ("刘海燕之子", "2", "1")]

    # E0001: online registration with photos, waiting for review
    other_id = make_id("632123", "19951010", "335")
    r = await platform.call("RHC_E0001", {
        "name": "才让", "telephone": "09738812000", "id_number": other_id, "id_type": "01",
        "id_card": other_id, "nation": "04", "sex": "1", "birthday": "19951010",
        "photo_front": PHOTO, "photo_reverse": PHOTO, "photo_face": PHOTO,
        "address": "青海省海东市乐都区", "cellphone": "18997120000"})
    assert r["resultCode"] == "6008" and r["data"]["ehc_card_status"] == "2"
    assert len(sim.journal[-1].values["photo_face"]) == len(PHOTO)

    # E0017: cards built by this organisation (E0006, E0007's new member, E0016, E0001)
    r = await platform.call("RHC_E0017", {"orgId": "QH0001", "startDate": "2024-01-01", "endDate": "2024-12-31"})
    assert (r["resultCode"], r["data"]) == ("1704", {"count": "4"})
    with pytest.raises(PlatformRejected) as info:
        await platform.call("RHC_E0017", {"orgId": "QH0001", "startDate": "2024-12-31", "endDate": "2024-01-01"})
    assert info.value.platform_code == "1703" and info.value.reason is Reason.BAD_REQUEST

    # E0004: cancel; the code no longer verifies
    r = await platform.call("RHC_E0004", {"id_card": mother_id, "qr_code": static})
    assert r["resultCode"] == "4004"
    with pytest.raises(PlatformRejected) as info:
        await platform.verify_qr(scan(static))
    assert (info.value.reason, info.value.platform_code) == (Reason.CARD_INACTIVE, "3003")

    # every message reached the platform once, each with its own msgGuid
    seen = {e.code for e in sim.journal}
    assert seen == {"RHC_E%04d" % n for n in range(1, 18)} - {"RHC_E0014"}
    guids = [e.msg_guid for e in sim.journal]
    assert len(set(guids)) == len(guids) and all(re.fullmatch(r"[0-9a-f]{32}", g) for g in guids)
    assert platform.health().reachable is True


async def test_bind_temporary_card_e0014(platform, sim):
    temp = (await platform.call("RHC_E0012", {"name": "张晓明", "sex": "1", "age": "39",
                                              "clinicTime": "2024-03-05 09:20:00"}))["data"]["qr_code"]
    r = await platform.call("RHC_E0014", {"qr_code": ZHANG.static_qr, "qr_code_temp": temp, "name": "张晓明",
                                          "id_type": "01", "id_number": ZHANG.id_card, "sex": "1"})
    assert r["resultCode"] == "14006"
    assert temp not in sim.temporary_cards


async def test_chinese_text_round_trips(platform, sim):
    pid = make_id("632721", "19770412", "538")
    name = "索南才让·扎西𠀾"          # with a character outside the BMP
    address = "青海省玉树藏族自治州称多县珍秦镇（十一社）"
    r = await platform.call("RHC_E0006", {
        "name": name, "telephone": "09768800000", "id_number": pid, "id_type": "01", "id_card": pid,
        "nation": "04", "sex": "1", "birthday": "19770412", "address": address,
        "auth_id_card": make_id("630104", "19700101", "018"), "auth_name": "德吉卓玛"})
    assert (r["data"]["name"], r["data"]["address"]) == (name, address)
    assert sim.by_card(pid).name == name and sim.by_card(pid).address == address
    qr = (await platform.call("RHC_E0002", {"id_card": pid, "qrcode_type": "1"}))["data"]["qr_code"]
    ident = (await platform.verify_qr(scan(qr))).identity
    assert (ident.name, ident.address) == (name, address)


# --- refused before sending --------------------------------------------------------------------------

@pytest.mark.parametrize("code,params,field", [
    ("RHC_E0003", {}, "qr_code"),
    ("RHC_E0003", {"qr_code": "A&B"}, "qr_code"),
    ("RHC_E0012", {"name": "王小二", "sex": "3", "age": "35", "clinicTime": "2024-03-05 09:20:00"}, "sex"),
    ("RHC_E0005", {"id_type": "01"}, "id_card/id_number/id_type"),
    ("RHC_E0013", {"qr_code": "A" * 20, "extra": "x"}, "extra"),
])
async def test_message_failing_its_table_is_not_sent(platform, sim, sim_server, code, params, field):
    with pytest.raises(ScanboxError) as info:
        await platform.call(code, params)
    assert info.value.reason is Reason.BAD_REQUEST
    assert not isinstance(info.value, PlatformRejected)
    assert code in info.value.message and "not sent" in info.value.message
    assert field in [p["field"] for p in info.value.data["problems"]]
    assert sim.journal == [] and sim_server.requests == 0
    assert platform.health().reachable is None


async def test_verify_qr_with_refused_characters_is_not_sent(platform, sim):
    with pytest.raises(ScanboxError) as info:
        await platform.verify_qr(scan('<x>"'))
    assert info.value.reason is Reason.BAD_REQUEST
    assert sim.journal == []


@pytest.mark.parametrize("value", [None, True, ["a"], {"a": "b"}, 3.5])
async def test_params_must_be_strings(platform, sim, value):
    with pytest.raises(ScanboxError) as info:
        await platform.call("RHC_E0013", {"qr_code": value})
    assert info.value.reason is Reason.BAD_REQUEST and "params.qr_code" in info.value.message
    assert sim.journal == []


async def test_control_character_is_bad_request(platform, sim):
    with pytest.raises(ScanboxError) as info:
        await platform.call("RHC_E0013", {"qr_code": "A1B2C3D4E5\x01F6A7B8C9"})
    assert info.value.reason is Reason.BAD_REQUEST
    assert sim.journal == []


@pytest.mark.parametrize("op", ["RHC_E0018", "rhc_e0003", "", "RHCMessageServer"])
async def test_unknown_operation_is_bad_request(platform, sim, op):
    with pytest.raises(ScanboxError) as info:
        await platform.call(op, {})
    assert info.value.reason is Reason.BAD_REQUEST
    assert "RHC_E0001" in info.value.message and "RHC_E0017" in info.value.message
    assert sim.journal == []


def test_operations_lists_all_seventeen(tmp_path):
    assert new_platform(None, tmp_path).operations == ["RHC_E%04d" % n for n in range(1, 18)]


# --- credentials ----------------------------------------------------------------------------------

async def test_wrong_credentials_are_platform_auth(sim_server, sim, tmp_path):
    p = new_platform(sim_server, tmp_path, rhc={"org_id": "QH0001", "user_name": "scanbox", "user_pwd": "wrong"})
    await p.start()
    try:
        with pytest.raises(PlatformRejected) as info:
            await p.verify_qr(scan(ZHANG.static_qr))
        assert info.value.reason is Reason.PLATFORM_AUTH
        assert info.value.platform_code == "1005"
        assert not info.value.transient
        assert [e.result_code for e in sim.journal] == ["1005"]
        health = p.health()
        assert health.reachable is True            # it answered
        assert health.last_error and "1005" in health.last_error
        assert health.to_json()["last_error"] == health.last_error
    finally:
        await p.close()


async def test_app_code_credentials(sim_server, sim, tmp_path):
    p = new_platform(sim_server, tmp_path, rhc={"app_code": "APP001", "user_name": "scanbox",
                                                 "user_pwd": "scanbox-secret"})
    await p.start()
    try:
        assert (await p.verify_qr(scan(ZHANG.static_qr))).identity.name == "张晓明"
        assert sim.journal[-1].values["_org"] == "APP001"
    finally:
        await p.close()


# --- verification outcomes ------------------------------------------------------------------------

async def test_verify_static_identity(platform, sim):
    at = datetime(2024, 3, 5, 8, 30, 15)
    answer = await platform.verify_qr(scan(ZHANG.static_qr, at=at))
    assert answer.platform_code == "3005" and answer.platform_message == "验证成功"
    j = answer.identity.to_json()
    assert j["name"] == "张晓明" and j["sex"] == "1" and j["sex_text"] == "男性"
    assert j["nation"] == "01" and j["nation_text"] == "汉族"
    assert j["id_type"] == "01" and j["id_type_text"] == "居民身份证" and j["id_number"] == ZHANG.id_card
    assert j["birthday"] == "19850312" and j["phone"] == "13897001234"
    assert j["ecard_id"] == ZHANG.ecard_id and j["main_index"] == ZHANG.main_index
    assert j["address"] == ZHANG.address and j["source"] == "platform"
    # what the platform was told: where and when the card was used (3.3.2.2)
    sent = sim.journal[-1].values
    assert sent["time"] == "2024-03-05 08:30:15"
    assert sent["sam"] == "45600001X5500"
    assert (sent["use_citycode"], sent["use_cityname"]) == ("630100", "西宁市")
    assert (sent["hospital_code"], sent["hospital_name"]) == ("QH0001", "西宁市第一人民医院")
    assert (sent["channel_code"], sent["channel_name"]) == ("01", "人工窗口")
    assert (sent["medstep_code"], sent["medstep_name"]) == ("010101", "挂号")
    assert platform.health().reachable is True and platform.health().last_error is None


async def test_verify_dynamic(platform, sim):
    qr = sim.issue_dynamic(RESIDENTS["马丽娟"].id_card)
    answer = await platform.verify_qr(scan(qr, QrKind.DYNAMIC))
    j = answer.identity.to_json()
    assert (j["name"], j["sex_text"], j["nation_text"]) == ("马丽娟", "女性", "回族")


@pytest.mark.parametrize("who,qr,reason,code", [
    ("expired", None, Reason.QR_EXPIRED, "3004"),
    ("unknown", "0" * 64 + ":1", Reason.QR_INVALID, "3001"),
    ("cancelled", LI.static_qr, Reason.CARD_INACTIVE, "3003"),  # with ehc_card_status 0
    ("authenticated", "authenticated", Reason.CARD_INACTIVE, "3003"),  # with ehc_card_status 4
    ("pending", HAN.static_qr, Reason.CARD_INACTIVE, "2002"),
])
async def test_verify_refusals(platform, sim, who, qr, reason, code):
    if who == "expired":
        qr = sim.issue_dynamic(ZHANG.id_card, ttl_s=-1)
    if who == "authenticated":
        qr = sim.issue_dynamic(next(r for r in sim.residents.values() if r.status == "4").id_card)
    with pytest.raises(PlatformRejected) as info:
        await platform.verify_qr(scan(qr, QrKind.DYNAMIC if who == "expired" else QrKind.STATIC))
    assert (info.value.reason, info.value.platform_code) == (reason, code)
    assert info.value.platform_message
    assert not info.value.transient
    # a refusal is an answer: the platform is reachable
    assert platform.health().reachable is True and platform.health().last_error is None


async def test_verify_unknown_temporary_card(platform):
    with pytest.raises(PlatformRejected) as info:
        await platform.verify_qr(scan("Z" * 20, QrKind.TEMPORARY))
    assert (info.value.reason, info.value.platform_code) == (Reason.CARD_NOT_FOUND, "13001")


# --- transport faults --------------------------------------------------------------------------------

@pytest.mark.parametrize("mode,words", [
    ("http500", ["HTTP 500", "text/html"]),
    ("html", ["HTTP 200", "text/html", "Please log in"]),
    ("garbage", ["not XML", "garbage"]),
    ("empty", ["HTTP 200", "empty"]),
    ("reset", ["connection"]),
])
async def test_fault_is_platform_unavailable_then_recovers(platform, sim, sim_server, mode, words):
    assert (await platform.verify_qr(scan(ZHANG.static_qr))).identity.name == "张晓明"  # connection in the pool
    sim_server.faults.add(Fault(mode))
    with pytest.raises(PlatformUnavailable) as info:
        await platform.verify_qr(scan(ZHANG.static_qr))
    for word in words:
        assert word in info.value.message, info.value.message
    assert info.value.transient and info.value.reason is Reason.PLATFORM_UNAVAILABLE
    assert platform.health().reachable is False and platform.health().last_error == info.value.message
    assert len(sim.journal) == 1  # the faulted request never reached the platform logic
    answer = await platform.verify_qr(scan(ZHANG.static_qr))
    assert answer.identity.name == "张晓明"
    assert platform.health().reachable is True and platform.health().last_error is None


async def test_hang_gives_up_at_the_deadline(sim_server, tmp_path):
    p = new_platform(sim_server, tmp_path, timeout_s=0.3)
    await p.start()
    try:
        sim_server.faults.add(Fault("hang"))
        started = time.monotonic()
        with pytest.raises(PlatformUnavailable) as info:
            await p.verify_qr(scan(ZHANG.static_qr))
        elapsed = time.monotonic() - started
        assert 0.25 <= elapsed < 1.0, elapsed
        assert "0.3 s" in info.value.message
        assert (await p.verify_qr(scan(ZHANG.static_qr))).identity.name == "张晓明"
    finally:
        await p.close()


async def test_server_closes_promptly_after_a_hang(tmp_path):
    # aiohttp (>= 3.9) does not cancel a handler when its client leaves: a "hang" must end when
    # the server closes, or close() waits aiohttp's shutdown timeout (60 s by default)
    server = await start_sim()
    p = new_platform(server, tmp_path, timeout_s=0.2)
    try:
        await p.start()
        server.faults.add(Fault("hang"))
        with pytest.raises(PlatformUnavailable):
            await p.verify_qr(scan(ZHANG.static_qr))
        await p.close()
        started = time.monotonic()
        async with asyncio.timeout(5):
            await server.close()
        assert time.monotonic() - started < 0.5
    finally:
        await p.close()
        await server.close()


async def test_latency_within_deadline_is_fine(sim_server, tmp_path):
    p = new_platform(sim_server, tmp_path, timeout_s=1)
    await p.start()
    try:
        sim_server.faults.add(Fault("latency", latency_s=0.05))
        assert (await p.verify_qr(scan(ZHANG.static_qr))).identity.name == "张晓明"
    finally:
        await p.close()


async def test_connection_refused_is_platform_unavailable(tmp_path):
    port = closed_port()
    config = make_config(None, tmp_path, platform={"endpoint": "http://127.0.0.1:%d/healthCard/x" % port})
    p = RhcPlatform(config.platform, config.site, tmp_path / "state")
    await p.start()  # the shipped WSDL: no network needed
    try:
        with pytest.raises(PlatformUnavailable) as info:
            await p.call("RHC_E0013", {"qr_code": "A" * 20})
        assert "cannot connect" in info.value.message and str(port) in info.value.message
        assert p.health().reachable is False
    finally:
        await p.close()


async def test_platform_internal_failure_is_transient(platform, sim, monkeypatch):
    # a handler that fails answers 1011 (系统处理失败): retry later, not a rejection
    monkeypatch.setattr(sim, "_rhc_e0013", lambda op, values: None)
    with pytest.raises(PlatformUnavailable) as info:
        await platform.call("RHC_E0013", {"qr_code": "A" * 20})
    assert info.value.platform_code == "1011" and info.value.transient


# --- WSDL ----------------------------------------------------------------------------------------------

async def test_site_wsdl_from_url_with_other_names(tmp_path):
    server = await start_sim(style=OTHER_STYLE)
    p = new_platform(server, tmp_path, wsdl=server.wsdl_url)
    try:
        await p.start()
        assert p.wsdl_note == "fetched from %s" % server.wsdl_url
        assert (await p.verify_qr(scan(ZHANG.static_qr))).identity.name == "张晓明"
        assert server.sim.journal[-1].result_code == "3005"
        cache = tmp_path / "state" / "wsdl" / "rhc" / "current"
        assert sorted(f.name for f in cache.iterdir()) == ["0.wsdl", "1.xsd"]
        wsdl_doc = etree.parse(str(cache / "0.wsdl"))
        imports = wsdl_doc.findall(".//{http://www.w3.org/2001/XMLSchema}import")
        assert [i.get("schemaLocation") for i in imports] == ["1.xsd"]  # rewritten to the local copy
        for f in cache.iterdir():
            assert stat.S_IMODE(f.stat().st_mode) == 0o600, f
        assert b"arg0" in (cache / "1.xsd").read_bytes()
    finally:
        await p.close()
        await server.close()


async def test_shipped_wsdl_does_not_fit_another_site(tmp_path):
    # the control for the test above: the WSDL matters
    server = await start_sim(style=OTHER_STYLE)
    p = new_platform(server, tmp_path)
    try:
        await p.start()
        with pytest.raises(PlatformUnavailable) as info:
            await p.verify_qr(scan(ZHANG.static_qr))
        assert "SOAP fault" in info.value.message
        assert server.sim.journal == []
    finally:
        await p.close()
        await server.close()


async def test_cached_wsdl_used_when_site_wsdl_unreachable(tmp_path):
    first = await start_sim(style=OTHER_STYLE)
    wsdl_url = first.wsdl_url
    p = new_platform(first, tmp_path, wsdl=wsdl_url)
    await p.start()
    assert p.wsdl_note.startswith("fetched")
    await p.close()
    await first.close()

    second = await start_sim(style=OTHER_STYLE)
    assert second.port != first.port
    config = make_config(second, tmp_path, platform={"wsdl": wsdl_url})
    restarted = RhcPlatform(config.platform, config.site, tmp_path / "state")
    try:
        await restarted.start()
        assert restarted.wsdl_note == "cached copy"
        answer = await restarted.verify_qr(scan(ZHANG.static_qr))
        assert answer.identity.name == "张晓明"
        assert [e.result_code for e in second.sim.journal] == ["3005"]
    finally:
        await restarted.close()
        await second.close()


async def test_no_wsdl_and_no_cache(tmp_path, sim_server, sim):
    dead = "http://127.0.0.1:%d/healthCard/services/x?wsdl" % closed_port()
    p = new_platform(sim_server, tmp_path, wsdl=dead)
    try:
        await p.start()  # never raises: the box starts offline
        assert p.health().reachable is False
        for _ in range(2):
            with pytest.raises(PlatformUnavailable) as info:
                await p.call("RHC_E0013", {"qr_code": "A" * 20})
            assert "WSDL" in info.value.message and dead in info.value.message
        assert sim.journal == []
        assert not (tmp_path / "state" / "wsdl" / "rhc" / "current").exists()
    finally:
        await p.close()


@pytest.mark.parametrize("prefix", ["", "file://"])
async def test_wsdl_from_local_file(tmp_path, prefix):
    style = WsdlStyle(namespace="http://local.ns/", action_part="arg0", message_part="arg1")
    server = await start_sim(style=style)
    path = tmp_path / "site.wsdl"
    path.write_text(render_wsdl("http://192.0.2.1:1/unused", style), encoding="utf-8")
    p = new_platform(server, tmp_path, wsdl=prefix + str(path))
    try:
        await p.start()
        assert p.wsdl_note == "file %s" % path
        # the endpoint comes from config, not from the WSDL's soap:address
        assert (await p.verify_qr(scan(ZHANG.static_qr))).identity.name == "张晓明"
        # the file is used where it is (no copy), and only what zeep read from it is kept
        assert [f.name[:9] for f in (tmp_path / "state" / "wsdl" / "rhc").iterdir()] == ["compiled-"]
    finally:
        await p.close()
        await server.close()


async def test_missing_local_wsdl_file(tmp_path, sim_server, sim):
    p = new_platform(sim_server, tmp_path, wsdl=str(tmp_path / "missing.wsdl"))
    try:
        await p.start()
        with pytest.raises(PlatformUnavailable) as info:
            await p.call("RHC_E0013", {"qr_code": "A" * 20})
        assert "WSDL" in info.value.message and "does not exist" in info.value.message
        assert sim.journal == []
    finally:
        await p.close()


async def test_shipped_wsdl_is_the_default_rendering(tmp_path, platform):
    assert platform.wsdl_note == "shipped default"
    shipped = Path(__file__).resolve().parents[2] / "agent" / "platforms" / "wsdl" / "rhc.wsdl"
    ours = etree.fromstring(shipped.read_bytes())
    rendered = etree.fromstring(render_wsdl("http://130.130.3.111:8080/healthCard/services/elecHealthCardWebSevice")
                                .encode())
    assert etree.tostring(ours, method="c14n") == etree.tostring(rendered, method="c14n")


def test_a_request_document_is_what_building_it_afresh_gives_for_every_table():
    """build_xml copies each table's empty document: the same bytes as an element per field."""
    from agent.platforms.rhc import build_xml
    from agent.platforms.rhc_schema import ACTION_FIELDS, OPERATIONS

    def afresh(fields, values):
        root = etree.Element("request")
        for f in fields:
            etree.SubElement(root, f.name).text = values.get(f.name) or ""
        return etree.tostring(root, encoding="unicode")

    for values in ({"qr_code": 'A&B<"x">', "time": "2024-01-01 10:00:00", "name": "才让卓玛 𠮷", "msgGuid": "f" * 32},
                   {}):
        for fields in [op.request for op in OPERATIONS.values()] + [ACTION_FIELDS]:
            assert build_xml(fields, values) == afresh(fields, values)


def test_a_request_document_keeps_nothing_of_the_message_before():
    """Each table's document is filled in place and emptied again: the next message, one that
    failed halfway (text XML cannot carry) included, carries nothing of another's."""
    from agent.platforms.rhc import build_xml
    from agent.platforms.rhc_schema import OPERATIONS

    fields = OPERATIONS["RHC_E0003"].request
    first = etree.fromstring(build_xml(fields, {"qr_code": "CODE-ONE", "time": "2024-01-01 10:00:00"}))
    assert (first.findtext("qr_code"), first.findtext("time")) == ("CODE-ONE", "2024-01-01 10:00:00")
    with pytest.raises(ValueError):
        build_xml(fields, {"qr_code": "CODE-TWO", "time": "2024-01-01 10:00:00", "sam": "bad\x01"})
    second = etree.fromstring(build_xml(fields, {"medstep_code": "010101"}))
    assert [(c.tag, c.text) for c in second if c.text] == [("medstep_code", "010101")]
