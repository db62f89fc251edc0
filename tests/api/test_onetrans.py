"""OneTrans2.dll compatibility (spec 004): crypto against the standard vectors, the envelope's
checks, golden request/answer pairs from the spec's examples, 600001 under concurrency, on
JSON-RPC and on POST /onetrans."""

from __future__ import annotations

import asyncio
import base64
import copy
import datetime as dt
import itertools
import json

import aiohttp
import pytest
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

from agent.api import onetrans
from agent.api.onetrans import canonical, decrypt_data, encrypt_data, msgid_ok, sign, signature, sm3
from tests.api.webclient import HTTP_API, base_url, post_rpc
from tests.conftest import TOKEN, RpcClient

APP_ID = "HIS0000000000001"
APP_KEY = "app-key-5f1c9d2e7a"
ONETRANS = {"onetrans": {"region": "630000", "read_timeout_s": 2, "apps": {APP_ID: {"app_key": APP_KEY}}}}

# spec 004 4.1 读卡入参示例, as printed (its camel-case appId/appKey are accepted too)
SPEC_READ_CARD = {
    "msgid": "H35058300252202308170959539B2",
    "timestamp": "20230817095953001",
    "appId": "zxm3QCh5RA5SrXm2C3b5JDcGAHMtepFN",
    "appKey": "St72fYdfk6ph4YiFpMwa4yw8TYr8wCmM",
    "dev_no": "H35058300252_lyj",
    "signtype": "SM3",
    "enc_type": "SM4",
    "recer_sys_code": "HIS",
    "dept_codg": "275",
    "dept_name": "妇产科",
    "opter": "H35058300252_lyj",
    "opter_name": "lyj",
    "opter_type": "1",
    "trans_type": "hos.user.get",
    "data": {"begntime": "20220301", "business_type": "01101", "mdtrt_cert_type": "09"},
}
# spec 004 hop.trade.recharge 入参示例 (a trans_type this box does not do)
SPEC_RECHARGE = {
    "app_id": "zxm3QCh5RA5SrXm2C3b5JDcGAHMtepFN", "app_key": "St72fYdfk6ph4YiFpMwa4yw8TYr8wCmM",
    "recer_sys_code": "HIS-INPATIENT", "msgid": "xmfdzl001202312111626173099", "timestamp": "20231211162617285",
    "dev_no": "H35058300252_lyj", "signtype": "SM3", "enc_type": "SM4", "dept_codg": "32760",
    "dept_name": "消化内科", "opter": "test001", "opter_name": "超级管理员", "opter_type": "1",
    "trans_type": "hop.trade.recharge",
    "data": {"payAppId": "1FDP92C2500I0105A8C00000A25D84E2", "payAppSecret": "1FDP92C1I04F0105A8C00000CA6C3FBF",
             "termNo": "xmfdzl001", "cardType": "01", "cardNo": "DD456004X", "accountType": "01",
             "hisCustId": "000239281700", "idNo": "身份证号", "userName": "姓名", "amount": "0.01",
             "outChargeNo": "1702283177285398", "origBalance": "10"},
}
# the answer's keys, per spec 004's 出参示例 and tables 3-2 / baseinfo / ehcinfo
OUT_KEYS = {"code", "data", "err_msg", "inf_refmsgid", "refmsg_time", "respond_time", "signtype", "enc_type", "sign",
            "msgid"}
BASEINFO_KEYS = {"psn_no", "psn_cert_type", "certno", "psn_name", "gend", "naty", "brdy", "age"}


_sequence = itertools.count(1)


def fresh() -> dict:
    """A msgid never used before and a timestamp of now, as a HIS makes them for each call."""
    now = dt.datetime.now()
    return {"msgid": "H35058300252%s%04d" % (now.strftime("%Y%m%d%H%M%S"), next(_sequence) % 10000),
            "timestamp": now.strftime("%Y%m%d%H%M%S") + "%03d" % (now.microsecond // 1000)}


def request(example: dict, encrypt: bool = False, **changes) -> dict:
    """The spec's example as this box's app sends it: our app_id, no key on the wire, a fresh
    msgid and timestamp, signed."""
    message = copy.deepcopy(example)
    for name in ("appId", "appKey", "app_key"):
        message.pop(name, None)
    message["app_id"] = APP_ID
    message["enc_type"] = "SM4" if encrypt else "NONE"
    message.update(fresh())
    message.update(changes)
    if encrypt:
        message["data"] = encrypt_data(message["data"], APP_KEY)
    return sign(message, APP_KEY)


def opened(answer: dict) -> dict:
    """Check the answer's signature and decrypt its data."""
    assert set(answer) == OUT_KEYS, answer
    assert answer["sign"] == signature(answer, APP_KEY)
    out = dict(answer)
    if answer["enc_type"] == "SM4":
        out["data"] = decrypt_data(answer["data"], APP_KEY)
    return out


# --- crypto --------------------------------------------------------------------------------

def test_sm3_and_sm4_standard_vectors():
    # GB/T 32905 A.1 and GB/T 32907 A.1 (OpenSSL through cryptography)
    assert sm3(b"abc").hex() == "66c7f0f462eeedd9d1f2d46bdc10e4e24167c4875cf2f7a2297da02b8f4ba8e0"
    assert sm3(b"abcd" * 16).hex() == "debe9ff92275b8a138604889c18e5a4d6fdb70e5387e5765293dcba39c0c5732"
    key = bytes.fromhex("0123456789abcdeffedcba9876543210")
    encryptor = Cipher(algorithms.SM4(key), modes.ECB()).encryptor()
    assert (encryptor.update(key) + encryptor.finalize()).hex() == "681edf34d206965e86b3e94f536e4246"
    # HMAC-SM3 is HMAC (RFC 2104) over SM3: the same construction computed by hand
    block = 64
    k = APP_KEY.encode().ljust(block, b"\0")
    inner = sm3(bytes(b ^ 0x36 for b in k) + b"message")
    assert onetrans.hmac_sm3(APP_KEY.encode(), b"message") == sm3(bytes(b ^ 0x5C for b in k) + inner)


def test_sm4_round_trip_with_a_fresh_iv_and_the_wrong_key_or_tampering_refused():
    data = {"mdtrt_cert_type": "09", "business_type": "01101", "名": "张"}
    first, second = encrypt_data(data, APP_KEY), encrypt_data(data, APP_KEY)
    assert first != second  # a fresh IV each time
    assert decrypt_data(first, APP_KEY) == data == decrypt_data(second, APP_KEY)
    with pytest.raises(onetrans.DecryptError):
        decrypt_data(first, "another-key")
    raw = bytearray(base64.b64decode(first))
    raw[-1] ^= 0x01
    with pytest.raises(onetrans.DecryptError):
        decrypt_data(base64.b64encode(bytes(raw)).decode(), APP_KEY)
    for bad in ("not base64!", "QUJD", ""):
        with pytest.raises(onetrans.DecryptError):
            decrypt_data(bad, APP_KEY)


def test_signature_covers_every_member_but_sign_in_canonical_form():
    signed = request(SPEC_READ_CARD)
    assert canonical({"b": 1, "a": {"d": "张", "c": [1, 2]}}) == '{"a":{"c":[1,2],"d":"张"},"b":1}'.encode()
    reordered = dict(reversed(list(signed.items())))
    assert signature(reordered, APP_KEY) == signed["sign"]
    assert signature(dict(signed, dept_name="外科"), APP_KEY) != signed["sign"]
    assert signature(signed, "another-key") != signed["sign"]


# docs/api.md "Keys": the vectors a second implementation (windows/onetrans.c) checks itself against
VECTOR_KEY = "scanbox-test-key"
VECTORS = {
    "mac_key": "1776f0b958f9e57c5b7f969689f7a1cf4a4778cef31e965264b28e01feeba6fc",
    "sm4_key": "a0ed35583a58aaee16667abf8aa89ea3",
    "sign": "f8a78b046242c2d82fee7e27f9c32abd09290be9ddb5a9fd2c9c7687a2da44f9",  # of {"b":1,"a":"张"}
    "data": "AAECAwQFBgcICQoLDA0ODwMOfk4m5O/SMR/KdDTKZ7o=",  # {"a":1}, IV 00..0f
}


def test_mac_and_sm4_keys_are_derived_apart_with_labels():
    mac, sm4 = onetrans.mac_key(VECTOR_KEY), onetrans.sm4_key(VECTOR_KEY)
    assert mac == onetrans.hmac_sm3(VECTOR_KEY.encode(), b"scanbox onetrans mac v1")
    assert sm4 == onetrans.hmac_sm3(VECTOR_KEY.encode(), b"scanbox onetrans sm4 v1")[:16]
    assert mac.hex() == VECTORS["mac_key"] and sm4.hex() == VECTORS["sm4_key"]
    assert not mac.startswith(sm4) and sm4 != sm3(VECTOR_KEY.encode())[:16]  # neither gives the other
    assert signature({"b": 1, "a": "张"}, VECTOR_KEY) == VECTORS["sign"]
    assert encrypt_data({"a": 1}, VECTOR_KEY, iv=bytes(range(16))) == VECTORS["data"]
    assert decrypt_data(VECTORS["data"], VECTOR_KEY) == {"a": 1}


def test_every_code_is_in_the_api_document():
    from pathlib import Path

    doc = (Path(__file__).resolve().parent.parent.parent / "docs" / "api.md").read_text(encoding="utf-8")
    codes = {v for k, v in vars(onetrans).items() if k.isupper() and isinstance(v, str) and len(v) == 6
             and v.isdigit()} | set(onetrans.REASON_CODES.values())
    assert {"100008", "100009", "100010"} <= codes
    assert [c for c in sorted(codes) if "`%s`" % c not in doc] == []


def test_msgid_format():
    # both of the spec's own examples, and the 12 + 14 + 4 its table describes
    for good in ("H35058300252202308170959539B2", "xmfdzl001202312111626173099", "H35058300252202311221021070001"):
        assert msgid_ok(good), good
    for bad in ("", "20231211162617", "H350583002522023081709595", "H35058300252202313170959530001",
                "H3505830025212345202308170959530001", "H35058300252-20230817095953-0001",
                "张35058300252202308170959530001"):
        assert not msgid_ok(bad), bad


# --- the envelope on a running box ------------------------------------------------------------

async def call(client, message) -> dict:
    return await client.call("onetrans", {"pInData": message}, timeout=15)


async def test_hos_user_get_golden_pair_from_the_spec_example_plain_and_encrypted(box):
    await box.start(api=ONETRANS)
    client = await box.tcp(TOKEN)
    resident = box.resident()
    for encrypt in (False, True):
        pending = asyncio.get_running_loop().create_task(call(client, request(SPEC_READ_CARD, encrypt)))
        await box.waiting(1)
        box.scan(resident.static_qr)
        raw = await pending
        assert isinstance(raw["data"], str) is encrypt  # the answer's data is encrypted like the request's
        answer = opened(raw)
        assert answer["code"] == "000000" and answer["err_msg"] == "成功"
        assert answer["enc_type"] == ("SM4" if encrypt else "NONE")
        data = answer["data"]
        assert set(data["baseinfo"]) == BASEINFO_KEYS
        born = dt.datetime.strptime(resident.birthday, "%Y%m%d").date()
        today = dt.date.today()
        assert data["baseinfo"] == {
            # 人员编号 is at most 30 characters: the platform's main index when it fits, else the ID number
            "psn_no": mindex if len(mindex := data["ehcinfo"]["mindex_id"]) <= 30 else resident.id_card,
            "psn_cert_type": "01", "certno": resident.id_card,
            "psn_name": resident.name, "gend": resident.sex, "naty": resident.nation,
            "brdy": "%s-%s-%s" % (resident.birthday[:4], resident.birthday[4:6], resident.birthday[6:]),
            "age": today.year - born.year - ((today.month, today.day) < (born.month, born.day)),
        }
        assert data["mdtrt_cert_type"] == "07"
        assert data["ehcinfo"]["id_no"] == resident.id_card and data["ehcinfo"]["user_name"] == resident.name
        assert data["ehcinfo"]["id_type"] == "01" and data["ehcinfo"]["birthday"] == resident.birthday
        assert len(answer["inf_refmsgid"]) == 30 and answer["inf_refmsgid"].startswith("630000")
        assert answer["inf_refmsgid"][6:20].isdigit() and len(answer["refmsg_time"]) == 17
        assert answer["respond_time"] >= answer["refmsg_time"]


async def test_a_failed_verification_and_a_timeout_answer_their_codes(box):
    await box.start(api=ONETRANS)
    client = await box.tcp(TOKEN)
    pending = asyncio.get_running_loop().create_task(call(client, request(SPEC_READ_CARD)))
    await box.waiting(1)
    box.scan(box.sim.sim.issue_dynamic(box.resident().id_card, -1))
    answer = opened(await pending)
    assert answer["code"] == "200003" and answer["data"] == {} and answer["err_msg"]
    # nobody scans within read_timeout_s (2 s here)
    timed_out = opened(await call(client, request(SPEC_READ_CARD)))
    assert timed_out["code"] == "200001"


async def test_envelope_errors_have_their_own_codes(box):
    await box.start(sources={}, api=ONETRANS)
    client = await box.tcp(TOKEN)
    good = request(SPEC_READ_CARD)
    cases = [
        ("not json at all", "100001", False),
        ("[1, 2]", "100001", False),
        ('{"app_id": NaN}', "100001", False),
        (dict(good, data={"x": float("nan")}), "100001", False),
        # (a good signature in between forgives nothing, as a good token does not: failures add up)
        (dict(good, app_id="nobody"), "100003", False),
        (request(SPEC_READ_CARD, enc_type="DES"), "100006", True),
        (sign(dict(good, app_id="nobody"), "a-guessed-key"), "100003", False),
        (request(SPEC_READ_CARD, enc_type="DES"), "100006", True),
        (dict(good, sign="0" * 64), "100003", False),
        (request(SPEC_READ_CARD, enc_type="DES"), "100006", True),
        ({k: v for k, v in good.items() if k != "sign"}, "100003", False),
        (request(SPEC_READ_CARD, enc_type="DES"), "100006", True),
        (dict(good, dept_name="外科"), "100003", False),  # changed after signing
        (sign(dict(good, signtype="SM2"), APP_KEY), "100006", False),
        (request(SPEC_READ_CARD, msgid="H350583002522023081709"), "100002", True),
        (request(SPEC_READ_CARD, timestamp="2023-08-17"), "100001", True),
        (request(SPEC_READ_CARD, timestamp="20261332250000000"), "100001", True),
        (request(SPEC_READ_CARD, opter_type="7"), "100001", True),
        (request(SPEC_READ_CARD, dept_name="科" * 31), "100001", True),
        (sign({k: v for k, v in request(SPEC_READ_CARD).items() if k not in ("opter", "sign")}, APP_KEY),
         "100001", True),
        (request(SPEC_READ_CARD, data={"business_type": "01101", "mdtrt_cert_type": "05"}), "100001", True),
        (request(SPEC_READ_CARD, data={"mdtrt_cert_type": "01"}), "100001", True),
        (sign(dict(request(SPEC_READ_CARD), enc_type="SM4"), APP_KEY), "100005", True),
        (sign(dict(request(SPEC_READ_CARD), enc_type="SM4", data=encrypt_data({}, "other")), APP_KEY), "100005", True),
        (request(SPEC_RECHARGE), "100007", True),
        (request(SPEC_RECHARGE, encrypt=True), "100007", True),
    ]
    box.daemon.api.guard.MAX_DELAY_S = 0.25  # the doubling wait is not what this test is about
    for message, code, signed in cases:
        failures = box.daemon.api.guard.failures("127.0.0.1")
        answer = await call(client, message)
        if code == "100003":  # a wrong app or signature counts against the address
            assert box.daemon.api.guard.failures("127.0.0.1") == failures + 1
        assert answer["code"] == code, (message, answer)
        assert answer["data"] == {} or answer["enc_type"] == "SM4"
        assert ("sign" in answer) is signed, answer
        if signed:
            opened(answer)
    # an unknown app and a wrong signature cannot be told apart
    unknown_app = await call(client, sign(dict(good, app_id="nobody"), APP_KEY))
    wrong_sign = await call(client, dict(good, sign="0" * 64))
    assert {k: unknown_app[k] for k in ("code", "err_msg", "data")} == \
        {k: wrong_sign[k] for k in ("code", "err_msg", "data")} == \
        {"code": "100003", "err_msg": onetrans.BAD_SIGNATURE_TEXT, "data": {}}
    # the spec's read-card example spells appId in camel case: signed as sent, it is accepted
    camel = {("appId" if k == "app_id" else k): v for k, v in request(SPEC_RECHARGE).items() if k != "sign"}
    assert opened(await call(client, sign(camel, APP_KEY)))["code"] == "100007"
    unknown = await call(client, request(SPEC_RECHARGE))
    assert "hop.trade.recharge" in unknown["err_msg"] and "hos.user.get" in unknown["err_msg"]
    # pInData as the DLL's string works as the object does
    assert (await call(client, json.dumps(request(SPEC_RECHARGE), ensure_ascii=False)))["code"] == "100007"


async def test_a_request_carrying_the_app_key_is_refused_and_the_leak_logged(box, caplog):
    await box.start(sources={}, api=ONETRANS)
    client = await box.tcp(TOKEN)
    for name, key in (("app_key", APP_KEY), ("appKey", APP_KEY), ("app_key", "some-other-key")):
        # signed correctly, as the spec's envelope would be with its key inside: refused all the same
        answer = await call(client, sign(dict(request(SPEC_RECHARGE), **{name: key}), APP_KEY))
        assert answer["code"] == "100010" and "sign" not in answer, answer
        assert "app_key must not be sent" in answer["err_msg"] and "HIS's PC" in answer["err_msg"]
    leaked = [r.getMessage() for r in caplog.records if "no longer secret" in r.getMessage()]
    assert len(leaked) == 2 and all(APP_ID in m and APP_KEY not in m for m in leaked)


ATTACKER = ("127.0.0.2", 0)  # loopback is all of 127/8; the HIS is 127.0.0.1


async def _post_onetrans(http: aiohttp.ClientSession, box, message: dict) -> dict:
    async with http.post(base_url(box) + "/onetrans", data=json.dumps(message, ensure_ascii=False).encode()) as r:
        assert r.status == 200
        return json.loads(await r.read())


async def test_guessing_signatures_over_onetrans_locks_the_address_out_of_onetrans_and_the_http_api(box):
    await box.start(sources={}, api=dict(ONETRANS, **HTTP_API))
    guard = box.daemon.api.guard
    guard.MAX_DELAY_S = 0.01  # the lockout is the subject here, not the doubling wait
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=ATTACKER)) as attacker, \
            aiohttp.ClientSession() as his:
        for i in range(guard.LOCKOUT_FAILURES):
            guess = sign(request(SPEC_RECHARGE), "guessed-key-%02d" % i)
            assert (await _post_onetrans(attacker, box, guess))["code"] == "100003"
        assert guard.failures("127.0.0.2") == guard.LOCKOUT_FAILURES
        # now even the right key is refused from that address, before any signature is checked
        answer = await _post_onetrans(attacker, box, request(SPEC_RECHARGE))
        assert answer["code"] == "100011" and "locked out" in answer["err_msg"] and "sign" not in answer, answer
        # ... and the HTTP API is closed to it too, whatever the token
        status, body = await post_rpc(attacker, box, {"jsonrpc": "2.0", "id": 1, "method": "status"}, TOKEN)
        assert status == 401 and "locked out" in body["error"]["message"], body
        # another address is not locked out of either
        assert opened(await _post_onetrans(his, box, request(SPEC_RECHARGE)))["code"] == "100007"
        status, body = await post_rpc(his, box, {"jsonrpc": "2.0", "id": 1, "method": "status"}, TOKEN)
        assert status == 200 and body["result"]["device_id"] == "test-box"


async def test_wrong_tokens_on_the_http_api_lock_the_address_out_of_onetrans(box):
    await box.start(sources={}, api=dict(ONETRANS, **HTTP_API))
    guard = box.daemon.api.guard
    guard.MAX_DELAY_S = 0.01
    # a TCP session from the address, logged in before the guessing (JSON-RPC's `onetrans`)
    session = await RpcClient.tcp(*box.daemon.stream.tcp_address, local_addr=ATTACKER)
    try:
        assert (await session.call("auth", {"token": TOKEN}))["ok"]
        status_call = {"jsonrpc": "2.0", "id": 1, "method": "status"}
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=ATTACKER)) as attacker:
            for i in range(guard.LOCKOUT_FAILURES):
                assert (await post_rpc(attacker, box, status_call, "guess-%02d" % i))[0] == 401
            answer = await _post_onetrans(attacker, box, request(SPEC_RECHARGE))
            assert answer["code"] == "100011" and "locked out" in answer["err_msg"], answer
        answer = await call(session, request(SPEC_RECHARGE))
        assert answer["code"] == "100011" and "sign" not in answer, answer
    finally:
        await session.close()
    his = await box.tcp(TOKEN)  # 127.0.0.1 is not locked out
    assert opened(await call(his, request(SPEC_RECHARGE)))["code"] == "100007"


async def test_a_replayed_or_stale_request_is_refused_and_the_answer_signs_the_msgid(box):
    await box.start(api=ONETRANS)
    client = await box.tcp(TOKEN)
    recorded = request(SPEC_READ_CARD)
    pending = asyncio.get_running_loop().create_task(call(client, recorded))
    await box.waiting(1)
    box.scan(box.resident().static_qr)
    answer = opened(await pending)
    assert answer["code"] == "000000" and answer["msgid"] == recorded["msgid"]
    # the msgid is signed: an answer moved onto another request does not verify
    moved = dict(await call(client, request(SPEC_RECHARGE)), msgid=recorded["msgid"])
    assert moved["sign"] != signature(moved, APP_KEY)
    # the same request again: refused before any read, however often
    for _ in range(2):
        again = opened(await call(client, recorded))
        assert again["code"] == "100009" and recorded["msgid"] in again["err_msg"] and again["data"] == {}
    assert box.daemon.hub.waiting == 0
    # an old recording (issue 15: a 2001 timestamp) and one from the future
    for when, word in ((dt.datetime(2001, 5, 1, 9), "behind"), (dt.datetime.now() + dt.timedelta(minutes=10), "ahead")):
        stamp = when.strftime("%Y%m%d%H%M%S") + "000"
        stale = opened(await call(client, request(SPEC_READ_CARD, timestamp=stamp,
                                                  msgid="H35058300252%s0001" % stamp[:14])))
        assert stale["code"] == "100008" and word in stale["err_msg"] and "300 s" in stale["err_msg"]
    # a fresh msgid with the same content is served
    pending = asyncio.get_running_loop().create_task(call(client, request(SPEC_READ_CARD)))
    await box.waiting(1)
    box.scan(box.resident(1).static_qr)
    assert opened(await pending)["code"] == "000000"


async def test_a_box_whose_clock_is_not_set_refuses_instead_of_accepting_anything(box, monkeypatch):
    await box.start(sources={}, api=ONETRANS)
    client = await box.tcp(TOKEN)
    then = dt.datetime(1970, 1, 1, 0, 5).astimezone()
    monkeypatch.setattr(onetrans, "now_local", lambda: then)
    stamp = "19700101000500000"
    message = request(SPEC_RECHARGE, timestamp=stamp, msgid="H35058300252" + stamp[:14] + "0001")
    answer = opened(await call(client, message))
    assert answer["code"] == "100008" and "clock is not set" in answer["err_msg"]


async def test_a_second_concurrent_call_answers_600001(box):
    await box.start(api=dict(ONETRANS, onetrans=dict(ONETRANS["onetrans"], read_timeout_s=10)))
    first_client, second_client = await box.tcp(TOKEN), await box.tcp(TOKEN)
    first = asyncio.get_running_loop().create_task(call(first_client, request(SPEC_READ_CARD)))
    await box.waiting(1)
    answers = await asyncio.gather(*(call(second_client, request(SPEC_READ_CARD)) for _ in range(5)))
    assert [opened(a)["code"] for a in answers] == ["600001"] * 5
    assert "并发" in answers[0]["err_msg"]
    box.scan(box.resident().static_qr)
    assert opened(await first)["code"] == "000000"
    # and the next call is served again
    again = asyncio.get_running_loop().create_task(call(second_client, request(SPEC_READ_CARD)))
    await box.waiting(1)
    box.scan(box.resident(1).static_qr)
    assert opened(await again)["code"] == "000000"


async def test_post_onetrans_in_gbk_and_utf8(box):
    await box.start(api=dict(ONETRANS, **HTTP_API))
    async with aiohttp.ClientSession() as http:
        for charset in ("gbk", "utf-8"):
            body = json.dumps(request(SPEC_RECHARGE), ensure_ascii=False).encode(charset)
            async with http.post(base_url(box) + "/onetrans", data=body,
                                 headers={"Content-Type": "application/json; charset=%s" % charset}) as r:
                assert r.status == 200 and r.charset == charset
                answer = json.loads((await r.read()).decode(charset))
            assert opened(answer)["code"] == "100007"
        # no charset given and not UTF-8: GBK, as the DLL spoke
        body = json.dumps(request(SPEC_READ_CARD, dept_name="妇产科"), ensure_ascii=False).encode("gbk")
        pending = asyncio.get_running_loop().create_task(http.post(base_url(box) + "/onetrans", data=body))
        await box.waiting(1)
        box.scan(box.resident().static_qr)
        async with await pending as r:
            answer = json.loads((await r.read()).decode("gbk"))
        assert opened(answer)["data"]["baseinfo"]["psn_name"] == box.resident().name


async def test_a_box_whose_clock_ntp_has_not_synchronised_refuses_too(box, tmp_path):
    await box.start(sources={}, api=ONETRANS)
    client = await box.tcp(TOKEN)
    assert opened(await call(client, request(SPEC_RECHARGE)))["code"] == "100007"
    # systemd-timesyncd runs and has not synchronised yet (its directory without the file)
    timesync = tmp_path / "timesync"
    timesync.mkdir()
    box.daemon.clock.timesync_dir = timesync
    answer = opened(await call(client, request(SPEC_RECHARGE)))
    assert answer["code"] == "100008" and "not been synchronised" in answer["err_msg"], answer
    timesync.joinpath("synchronized").touch()
    assert opened(await call(client, request(SPEC_RECHARGE)))["code"] == "100007"


async def test_post_onetrans_answers_every_body_with_a_pout_data(box):
    await box.start(sources={}, api=dict(ONETRANS, **HTTP_API))
    good = json.dumps(request(SPEC_RECHARGE), ensure_ascii=False)
    bodies = [
        (b"\xff\xfe{not text", {"Content-Type": "application/json; charset=utf-8"}, "not utf-8 text"),
        (good.encode("utf-8"), {"Content-Type": "application/json; charset=no-such-charset"}, "not no-such-charset"),
        (b'{"app_id": NaN, "msgid": 1}', {}, "NaN"),
        (b'{"app_id": "x", "data": {"n": Infinity}}', {}, "NaN"),
        (b"[" * 20000 + b"]" * 20000, {}, "not JSON"),
        (b"{" + b" " * (64 * 1024 + 10) + b"}", {}, "longer than"),
    ]
    async with aiohttp.ClientSession() as http:
        for body, headers, said in bodies:
            async with http.post(base_url(box) + "/onetrans", data=body, headers=headers) as r:
                assert r.status == 200, (body[:40], r.status, await r.text())
                answer = json.loads(await r.read())
            assert answer["code"] == "100001" and said in answer["err_msg"], (body[:40], answer)
            assert {"inf_refmsgid", "refmsg_time", "respond_time", "data"} <= set(answer)


def test_psn_no_fits_the_specs_30_characters():
    assert onetrans._psn_no("a" * 30, "110101199003071234") == "a" * 30
    assert onetrans._psn_no("f" * 32, "110101199003071234") == "110101199003071234"
    assert onetrans._psn_no("f" * 64, None) == "f" * 30
    assert onetrans._psn_no(None, None) == ""


async def test_hos_user_get_for_an_id_card_waits_for_the_card_not_a_qr(box):
    from agent.model import Identity, IdentitySource, Scan, ScanKind

    await box.start(api=dict(ONETRANS, onetrans=dict(ONETRANS["onetrans"], read_timeout_s=10)))
    client = await box.tcp(TOKEN)
    data = {"mdtrt_cert_type": "02", "business_type": "01101", "treatment_code": "0101051"}
    pending = asyncio.get_running_loop().create_task(call(client, request(SPEC_READ_CARD, data=data)))
    await box.waiting(1)
    box.scan(box.resident().static_qr)  # a QR does not answer a request for an ID card
    await box.events.wait("verification")
    assert not pending.done()
    identity = Identity(IdentitySource.CARD, name="张三", sex="1", nation="01", id_type="01",
                        id_number="110101199003071234", birthday="1990-03-07")
    box.daemon.hub.accept(Scan.from_card("idcard:desk", ScanKind.ID_CARD, identity,
                                         {"name": "张三", "id_number": "110101199003071234"}, raw=b"\x00" * 256))
    answer = opened(await pending)
    assert answer["code"] == "000000" and answer["data"]["mdtrt_cert_type"] == "02"
    assert answer["data"]["baseinfo"]["certno"] == "110101199003071234"
    assert answer["data"]["baseinfo"]["brdy"] == "1990-03-07" and isinstance(answer["data"]["baseinfo"]["age"], int)
    assert "ehcinfo" not in answer["data"]
