"""The Foshan JSON adapter (spec 003) against its simulator over HTTP on loopback: signatures per
method, the daily workKey (cached, refreshed on a new day or 10105, once for many callers), clock
skew, Chinese text in UTF-8 and GBK, every operation, and NOT_SUPPORTED for verification."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import stat
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import pytest

from agent.config import validate
from agent.model import Reason, ScanboxError
from agent.platforms.base import PlatformRejected, PlatformUnavailable, VerifyRequest
from agent.platforms.fsjson import FsjsonPlatform, sign
from agent.qr import QrKind
from agent.simulator.fsjson import FsjsonServer, FsjsonSimulator
from agent.simulator.rhc import make_id
from agent.simulator.soap import Fault
from tests.conftest import config_dict, until

APP_ID = "39bf0ca6e9b340659852808173fdf705"
SECRET = "scanbox-app-secret"
DYNAMIC = re.compile(r"^[0-9A-F]{64}:0:[0-9A-F]{32}$")


class Clock:
    """A wall clock both sides read, so tests can move to tomorrow."""

    def __init__(self, at: float) -> None:
        self.at = at

    def __call__(self) -> float:
        return self.at


def fs_config_dict(server: FsjsonServer, tmp_path: Path, **fsjson: Any) -> dict[str, Any]:
    data = config_dict(None, tmp_path)
    data["platform"] = {"kind": "fsjson", "endpoint": server.endpoint, "timeout_s": 2,
                        "fsjson": {"app_id": APP_ID, "app_secret": SECRET, "term_id": "SB-0001", **fsjson}}
    return data


def new_platform(server: FsjsonServer, tmp_path: Path, clock=None, **fsjson: Any) -> FsjsonPlatform:
    config = validate(fs_config_dict(server, tmp_path, **fsjson))
    if clock is None:
        return FsjsonPlatform(config.platform, config.site, tmp_path / "state")
    return FsjsonPlatform(config.platform, config.site, tmp_path / "state", clock=clock)


@pytest.fixture
def fs_sim() -> FsjsonSimulator:
    return FsjsonSimulator(app_id=APP_ID, app_secret=SECRET)


@pytest.fixture
async def fs_server(fs_sim):
    server = await FsjsonServer(fs_sim).start("127.0.0.1", 0)
    yield server
    await server.close()


@pytest.fixture
async def platform(fs_server, tmp_path):
    p = new_platform(fs_server, tmp_path)
    await p.start()
    yield p
    await p.close()


def first(sim: FsjsonSimulator, name: str):
    return next(p for p in sim.people.values() if p.people["xm"] == name)


def new_person(name: str, seq: str = "118") -> dict[str, str]:
    id_number = make_id("440604", "19620518", seq)
    return {"xm": name, "xb": "1", "mzdm": "01", "csrq": "19620518", "sfzhm": id_number, "zjlx": "01",
            "zjhm": id_number, "jkdah": "", "fyzhdm": "", "xldm": "10", "zydm": "0", "dzlb": "2", "dzsf": "广东省",
            "dzs": "佛山市", "dzqx": "禅城区", "dzxz": "祖庙街道", "dzc": "", "brdh": "13902263273", "ylfyzffs": "01"}


def test_sign_is_upper_case_md5_of_the_values_joined_by_bars():
    assert sign(APP_ID, SECRET, "1520921936155") == hashlib.md5(
        ("%s|%s|1520921936155" % (APP_ID, SECRET)).encode()).hexdigest().upper()
    assert sign("a", "b", separator="") == hashlib.md5(b"ab").hexdigest().upper()


# --- operations ----------------------------------------------------------------------------------

@pytest.mark.parametrize("encoding, name", [("UTF-8", "夏海𠮷"), ("GBK", "欧阳喆")])
async def test_issue_then_bind_then_qr_image_chinese_names_round_trip(fs_sim, tmp_path, encoding, name):
    server = await FsjsonServer(fs_sim, encoding=encoding).start("127.0.0.1", 0)
    p = new_platform(server, tmp_path)
    await p.start()
    try:
        person = new_person(name)
        issued = await p.call("syncCardInfo", {"cardInfo": {"orgCode": "091760215", "isRealName": "0"},
                                               "peopleInfo": person})
        assert issued["resultCode"] == "10000" and issued["message"] == "操作成功"
        card_id, card_num = issued["data"]["ehealthCardId"], issued["data"]["virtualCardNum"]
        assert fs_sim.snapshot()[-1]["xm"] == name  # as sent, in either charset
        sent = fs_sim.journal_for("syncCardInfo")[-1].values
        assert (sent["type"], sent["cardInfo"]["klx"]) == ("0", "3")
        bound = await p.call("bindCardInfo", {"zjlx": "01", "zjhm": person["zjhm"], "xm": name, "brdh": "13902263273",
                                              "bindType": "1", "bindZjlx": "01", "bindZjhm": person["zjhm"]})
        assert bound["data"] == {"ehealthCardId": card_id, "virtualCardNum": card_num}
        img = await p.call("getImg", {"virtualCardNum": card_num})
        assert DYNAMIC.match(img["data"]["QrCode"]) and img["data"]["QrCode"].startswith(card_id)
    finally:
        await p.close()
        await server.close()


async def test_get_img_signs_with_the_card_id_when_both_are_given(platform, fs_sim):
    he = first(fs_sim, "欧阳喆")
    by_id = await platform.call("getImg", {"ehealthCardId": he.vuid})
    # the card id decides when both are given: a wrong virtualCardNum beside it does not matter,
    # and the simulator only accepts the sign made over the card id
    both = await platform.call("getImg", {"ehealthCardId": he.vuid, "virtualCardNum": "00000000000000000000"})
    assert by_id["data"]["QrCode"].startswith(he.vuid) and both["data"]["QrCode"].startswith(he.vuid)
    with pytest.raises(ScanboxError) as err:
        await platform.call("getImg", {})
    assert err.value.reason is Reason.BAD_REQUEST and "ehealthCardId/virtualCardNum" in err.value.message


async def test_bind_refusals(platform, fs_sim):
    yuan = first(fs_sim, "袁宇阳")
    base = {"zjlx": "01", "zjhm": yuan.people["zjhm"], "xm": "袁宇阳", "brdh": "13589759854",
            "bindType": "1", "bindZjlx": "01", "bindZjhm": yuan.people["zjhm"]}
    with pytest.raises(PlatformRejected) as err:
        await platform.call("bindCardInfo", {**base, "xm": "袁宇"})
    assert (err.value.platform_code, err.value.reason) == ("10157", Reason.PLATFORM_REJECTED)
    stranger = make_id("440604", "19990101", "005")
    with pytest.raises(PlatformRejected) as err:
        await platform.call("bindCardInfo", {**base, "zjhm": stranger, "bindZjhm": stranger})
    assert (err.value.platform_code, err.value.reason) == ("10108", Reason.CARD_NOT_FOUND)
    with pytest.raises(ScanboxError) as err:  # refused before sending
        await platform.call("bindCardInfo", {**base, "bindType": "3"})
    assert err.value.reason is Reason.BAD_REQUEST and "bindType" in err.value.message


async def test_a_second_card_for_one_person_is_refused(platform):
    person = new_person("王五", "237")
    card = {"orgCode": "091760215", "isRealName": "1"}
    await platform.call("syncCardInfo", {"cardInfo": card, "peopleInfo": person})
    with pytest.raises(PlatformRejected) as err:
        await platform.call("syncCardInfo", {"cardInfo": card, "peopleInfo": person})
    assert err.value.platform_code == "10115"


async def test_lost_card_has_no_qr_image(platform, fs_sim):
    with pytest.raises(PlatformRejected) as err:
        await platform.call("getImg", {"ehealthCardId": first(fs_sim, "夏海祥").vuid})
    assert (err.value.platform_code, err.value.reason) == ("1010", Reason.CARD_INACTIVE)


async def test_verification_is_not_supported(platform, fs_sim):
    request = VerifyRequest(first(fs_sim, "袁宇阳").static_qr, QrKind.STATIC, datetime.now(), "010101", "01")
    with pytest.raises(ScanboxError) as err:
        await platform.verify_qr(request)
    assert err.value.reason is Reason.NOT_SUPPORTED and "no verification" in err.value.message
    assert [e.operation for e in fs_sim.journal] == ["getWorkKey"]  # at start; nothing for the scan
    with pytest.raises(ScanboxError) as err:
        await platform.call("virIdCardVerify", {})
    assert err.value.reason is Reason.BAD_REQUEST and "getImg" in err.value.message


# --- the workKey ---------------------------------------------------------------------------------

async def test_work_key_is_kept_0600_and_reused_after_a_restart(fs_server, fs_sim, tmp_path):
    vuid = first(fs_sim, "袁宇阳").vuid
    p = new_platform(fs_server, tmp_path)
    await p.start()
    await p.call("getImg", {"ehealthCardId": vuid})
    await p.close()
    cache = tmp_path / "state" / "fsjson-workkey.json"
    assert stat.S_IMODE(cache.stat().st_mode) == 0o600
    restarted = new_platform(fs_server, tmp_path)
    await restarted.start()
    try:
        await restarted.call("getImg", {"ehealthCardId": vuid})
        assert restarted.health().credential_age_s is not None
    finally:
        await restarted.close()
    assert len(fs_sim.journal_for("getWorkKey")) == 1


async def test_a_new_day_fetches_a_new_work_key_before_sending(tmp_path):
    clock = Clock(datetime(2026, 3, 1, 23, 59, 50).timestamp())
    sim = FsjsonSimulator(app_id=APP_ID, app_secret=SECRET, clock=clock)
    server = await FsjsonServer(sim).start("127.0.0.1", 0)
    p = new_platform(server, tmp_path, clock=clock)
    await p.start()
    try:
        vuid = first(sim, "袁宇阳").vuid
        await p.call("getImg", {"ehealthCardId": vuid})
        clock.at += 20  # 00:00:10 the next day
        await p.call("getImg", {"ehealthCardId": vuid})
    finally:
        await p.close()
        await server.close()
    assert [e.result_code for e in sim.journal] == ["10000"] * 4  # key, img, key, img: no 10105 on the way


async def test_expired_work_key_mid_traffic_20_concurrent_calls_one_refresh(platform, fs_sim):
    vuids = [p.vuid for p in fs_sim.people.values() if p.status == "1"]
    await platform.call("getImg", {"ehealthCardId": vuids[0]})
    fs_sim.expire_auth()
    answers = await asyncio.gather(*(platform.call("getImg", {"ehealthCardId": vuids[i % len(vuids)]})
                                     for i in range(20)))
    assert all(a["resultCode"] == "10000" for a in answers)
    assert len(fs_sim.journal_for("getWorkKey")) == 2
    assert sum(e.result_code == "10105" for e in fs_sim.journal_for("getImg")) == 20


async def test_two_work_key_expiries_within_one_burst_are_each_refreshed_once(platform, fs_server, fs_sim):
    vuids = [p.vuid for p in fs_sim.people.values() if p.status == "1"]
    await platform.call("getImg", {"ehealthCardId": vuids[0]})
    fs_sim.expire_auth()                                    # the first expiry
    fs_server.faults.add(Fault("hold"))                     # the late caller's request waits
    late = asyncio.get_running_loop().create_task(platform.call("getImg", {"ehealthCardId": vuids[1]}))
    await until(lambda: fs_server.held == 1)
    others = await asyncio.gather(*(platform.call("getImg", {"ehealthCardId": vuids[i % len(vuids)]})
                                    for i in range(5)))
    assert all(a["resultCode"] == "10000" for a in others)
    assert len(fs_sim.journal_for("getWorkKey")) == 2
    fs_sim.expire_auth()                                    # the second, while the late one waits
    fs_server.release_held()
    assert (await late)["resultCode"] == "10000"
    assert len(fs_sim.journal_for("getWorkKey")) == 3       # one refresh per expiry


@pytest.mark.parametrize("settings", [{"app_secret": "not-the-secret"}, {"sign_separator": ""}])
async def test_wrong_signature_for_the_work_key_is_an_auth_error(fs_server, fs_sim, tmp_path, settings):
    p = new_platform(fs_server, tmp_path, **settings)
    await p.start()
    try:
        with pytest.raises(PlatformRejected) as err:
            await p.call("getImg", {"ehealthCardId": first(fs_sim, "袁宇阳").vuid})
    finally:
        await p.close()
    assert (err.value.platform_code, err.value.reason) == ("10103", Reason.PLATFORM_AUTH)
    assert fs_sim.journal_for("getImg") == []


async def test_the_simulator_refuses_a_wrongly_signed_business_call(platform, fs_server, fs_sim):
    vuid = first(fs_sim, "袁宇阳").vuid
    await platform.call("getImg", {"ehealthCardId": vuid})  # a workKey exists today
    key = platform.work_key.current.value
    timestamp = str(int(fs_sim.clock() * 1000))
    app = {"termId": "", "version": "v1.1", "appVersion": "1.1", "appPackageName": "x", "digestType": "",
           "encType": ""}

    async def post(signature: str) -> dict:
        body = {"appId": APP_ID, "app": app,
                "data": {"timestamp": timestamp, "sign": signature, "type": "0", "ehealthCardId": vuid}}
        async with httpx.AsyncClient() as http:
            return (await http.post(fs_server.endpoint + "/getImg.do", json=body)).json()

    assert (await post(sign(APP_ID, key, timestamp, vuid)))["resultCode"] == 10000
    assert (await post(sign(APP_ID, key, timestamp, "0")))["resultCode"] == 10105  # signed the wrong field
    assert (await post(sign(APP_ID, key, timestamp, vuid).lower()))["resultCode"] == 10000  # hex case is free


async def test_a_box_clock_an_hour_off_follows_the_platform_clock(tmp_path):
    sim = FsjsonSimulator(app_id=APP_ID, app_secret=SECRET, clock=lambda: datetime.now().timestamp() + 3600)
    server = await FsjsonServer(sim).start("127.0.0.1", 0)
    p = new_platform(server, tmp_path)
    await p.start()
    try:
        answer = await p.call("getImg", {"ehealthCardId": first(sim, "袁宇阳").vuid})
        assert answer["resultCode"] == "10000"
        assert 3500 < p.clock_offset_s < 3700
    finally:
        await p.close()
        await server.close()
    # the first getWorkKey carried the box's time and was refused; from then on the platform's
    assert [(e.operation, e.result_code) for e in sim.journal] == [
        ("getWorkKey", "10110"), ("getWorkKey", "10000"), ("getImg", "10000")]


async def test_a_small_skew_is_left_alone(tmp_path):
    sim = FsjsonSimulator(app_id=APP_ID, app_secret=SECRET, clock=lambda: datetime.now().timestamp() + 20)
    server = await FsjsonServer(sim).start("127.0.0.1", 0)
    p = new_platform(server, tmp_path)
    await p.start()
    try:
        await p.call("getImg", {"ehealthCardId": first(sim, "袁宇阳").vuid})
        assert p.clock_offset_s == 0.0
    finally:
        await p.close()
        await server.close()
    assert [e.result_code for e in sim.journal] == ["10000", "10000"]


# --- transport -----------------------------------------------------------------------------------

@pytest.mark.parametrize("mode", ["http500", "html", "garbage", "empty", "reset"])
async def test_transport_faults_are_unavailable(platform, fs_server, fs_sim, mode):
    vuid = first(fs_sim, "袁宇阳").vuid
    await platform.call("getImg", {"ehealthCardId": vuid})
    fs_server.faults.add(Fault(mode))
    with pytest.raises(PlatformUnavailable):
        await platform.call("getImg", {"ehealthCardId": vuid})
    assert platform.health().reachable is False
    assert (await platform.call("getImg", {"ehealthCardId": vuid}))["resultCode"] == "10000"


def test_simulator_needs_the_app_block_and_a_timestamp(fs_sim):
    assert fs_sim.handle("getWorkKey", {"appId": APP_ID, "data": {}})["resultCode"] == 10110
    app = dict.fromkeys(("termId", "version", "appVersion", "appPackageName", "digestType", "encType"), "")
    answer = fs_sim.handle("getWorkKey", {"appId": APP_ID, "app": app, "data": {"timestamp": "123", "sign": "x"}})
    assert answer["resultCode"] == 10110 and "timestamp" in answer["message"]
    assert json.dumps(fs_sim.handle("nope.do", {}), ensure_ascii=False).count("10112") == 1


async def test_control_api(fs_server, fs_sim):
    base = "http://%s:%d/_sim" % (fs_server.host, fs_server.port)
    person = first(fs_sim, "袁宇阳")
    async with httpx.AsyncClient() as http:
        residents = (await http.get(base + "/residents")).json()
        dynamic = (await http.post(base + "/dynamic", json={"id_card": person.people["zjhm"]})).json()
        expired = (await http.post(base + "/expire_auth")).json()
    assert {r["xm"] for r in residents} >= {"袁宇阳", "欧阳喆"}
    assert DYNAMIC.match(dynamic["qr"]) and dynamic["qr"].startswith(person.vuid)
    assert expired == {"expired": 0}
