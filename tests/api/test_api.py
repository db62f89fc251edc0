"""The HIS API end to end: a daemon with a pty scanner and the simulator on loopback, clients on
the Unix socket and TCP. What a HIS sees, including every kind of bad input."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest

from agent.api.jsonrpc import encode
from agent.daemon import Daemon
from agent.events import ScanRead
from agent.model import Scan
from agent.simulator.soap import Fault
from tests.conftest import ADMIN_TOKEN, TOKEN, RpcClient, until

async def read_card_task(client: RpcClient, **params: Any) -> asyncio.Task[dict[str, Any]]:
    return asyncio.get_running_loop().create_task(client.request("read_card", params, timeout=15))


# --- the walking skeleton's path: serial scanner -> platform -> waiting HIS --------------------

async def test_read_card_over_unix_answers_a_serial_scan_verified_at_the_platform(box):
    await box.start()
    client = await box.unix()
    pending = await read_card_task(client, timeout_s=10)
    await box.waiting(1)
    resident = box.resident()
    box.scan(resident.static_qr)
    result = (await pending)["result"]
    assert result["scan"]["source"] == "serial:counter"
    assert result["scan"]["kind"] == "qr"
    assert result["scan"]["payload"] == resident.static_qr
    assert result["verification"]["ok"] is True
    assert result["verification"]["platform_code"] == "3005"
    identity = result["identity"]
    assert identity["name"] == resident.name and identity["id_number"] == resident.id_card
    assert identity["source"] == "platform" and identity["sex_text"] == "男性" and identity["nation_text"] == "汉族"
    # the platform recorded where the card was used (RHC_E0003 with the site's fields)
    used = box.sim.sim.journal_for("RHC_E0003")[-1]
    assert used.values["sam"] == "45600001X5500" and used.values["medstep_code"] == "010101"
    assert used.values["hospital_name"] == "西宁市第一人民医院"


async def test_read_card_over_tcp_after_auth_with_the_callers_step(box):
    await box.start()
    client = await box.tcp()
    pending = await read_card_task(client, timeout_s=10, step="010105")
    await box.waiting(1)
    box.scan(box.resident(1).static_qr)
    result = (await pending)["result"]
    assert result["verification"]["ok"] is True
    assert result["identity"]["nation_text"] == "回族"
    assert box.sim.sim.journal_for("RHC_E0003")[-1].values["medstep_code"] == "010105"
    assert box.sim.sim.journal_for("RHC_E0003")[-1].values["medstep_name"] == "收费"


async def test_waiting_callers_are_served_oldest_first_one_scan_each(box):
    await box.start()
    first, second = await box.unix(), await box.tcp()
    a = await read_card_task(first, timeout_s=10)
    await box.waiting(1)
    b = await read_card_task(second, timeout_s=10)
    await box.waiting(2)
    box.scan(box.resident(0).static_qr)
    box.scan(box.resident(1).static_qr)
    assert (await a)["result"]["scan"]["payload"] == box.resident(0).static_qr
    assert (await b)["result"]["scan"]["payload"] == box.resident(1).static_qr


async def test_a_caller_that_disconnects_stops_waiting(box):
    await box.start()
    leaving, staying = await box.unix(), await box.unix()
    await read_card_task(leaving, timeout_s=10)
    await box.waiting(1)
    await leaving.close()
    await until(lambda: box.daemon.hub.waiting == 0)
    b = await read_card_task(staying, timeout_s=10)
    await box.waiting(1)
    box.scan(box.resident().static_qr)
    assert (await b)["result"]["verification"]["ok"] is True


async def test_read_card_times_out_with_reason_timeout(box):
    await box.start()
    client = await box.unix()
    started = time.monotonic()
    response = await client.request("read_card", {"timeout_s": 0.3})
    assert response["error"]["code"] == -32000
    assert response["error"]["data"]["reason"] == "TIMEOUT"
    assert time.monotonic() - started < 2


async def test_kinds_filter_and_verify_false(box):
    await box.start()
    client = await box.unix()
    card_only = await read_card_task(client, timeout_s=0.5, kinds=["id_card"])
    raw = await read_card_task(client, timeout_s=10, verify=False)
    await box.waiting(2)
    box.scan("TICKET-42")
    result = (await raw)["result"]
    assert result["scan"]["payload"] == "TICKET-42" and result["verification"] is None
    assert (await card_only)["error"]["data"]["reason"] == "TIMEOUT"


async def test_a_scan_before_read_card_is_held_for_hold_s(box):
    await box.start(scans={"hold_s": 10, "dedupe_s": 0})
    box.scan(box.resident().static_qr)
    await box.events.wait("verification")
    client = await box.unix()
    result = await client.call("read_card", {"timeout_s": 2})
    assert result["scan"]["payload"] == box.resident().static_qr and result["verification"]["ok"]
    # claimed once: the next caller waits for a new scan
    response = await client.request("read_card", {"timeout_s": 0.3})
    assert response["error"]["data"]["reason"] == "TIMEOUT"


async def test_without_hold_a_scan_nobody_waits_for_is_not_delivered_later(box):
    await box.start(scans={"hold_s": 0, "dedupe_s": 0})
    box.scan(box.resident().static_qr)
    await box.events.wait("verification")
    client = await box.unix()
    assert (await client.request("read_card", {"timeout_s": 0.3}))["error"]["data"]["reason"] == "TIMEOUT"


async def test_the_same_code_twice_within_dedupe_s_is_one_scan(box):
    await box.start(scans={"hold_s": 0, "dedupe_s": 30})
    box.scan("SAME-CODE")
    box.scan("SAME-CODE")
    box.scan("OTHER-CODE")
    await box.events.wait("scan", lambda d: d["payload"] == "OTHER-CODE")
    payloads = [d["payload"] for k, d in box.events.events if k == "scan"]
    assert payloads == ["SAME-CODE", "OTHER-CODE"]


# --- verification outcomes a HIS must tell apart ---------------------------------------------

async def test_verify_qr_outcomes(box):
    await box.start(sources={})
    client = await box.unix()
    sim = box.sim.sim
    ok = await client.call("verify_qr", {"qr": box.resident().static_qr})
    assert ok["verification"]["ok"] and ok["identity"]["source"] == "platform"
    dynamic = await client.call("verify_qr", {"qr": sim.issue_dynamic(box.resident().id_card, 60)})
    assert dynamic["verification"]["ok"]
    expired = await client.call("verify_qr", {"qr": sim.issue_dynamic(box.resident().id_card, -1)})
    assert expired["verification"]["reason"] == "QR_EXPIRED" and expired["verification"]["platform_code"] == "3004"
    assert expired["identity"] is None
    wrong = await client.call("verify_qr", {"qr": "F" * 64 + ":1"})
    assert wrong["verification"]["reason"] == "QR_INVALID" and wrong["verification"]["platform_code"] == "3001"
    cancelled = next(r for r in sim.residents.values() if r.status == "0")
    inactive = await client.call("verify_qr", {"qr": cancelled.static_qr})
    # the platform answers 3003 居民信息验证错误 with ehc_card_status 0: the card, not the box
    assert inactive["verification"]["reason"] == "CARD_INACTIVE"
    assert inactive["verification"]["platform_code"] == "3003"
    authenticated = next(r for r in sim.residents.values() if r.status == "4")
    no_code = await client.call("verify_qr", {"qr": sim.issue_dynamic(authenticated.id_card, 60)})
    assert no_code["verification"]["reason"] == "CARD_INACTIVE" and no_code["identity"] is None


async def test_a_temporary_card_answers_with_its_age_and_clinic_time(box):
    await box.start()
    admin = await box.tcp(ADMIN_TOKEN)
    issued = await admin.call("platform.call", {"operation": "RHC_E0012", "params": {
        "name": "王小二", "sex": "1", "age": "35", "clinicTime": "2026-11-22 09:20:00"}})
    temp = issued["data"]["qr_code"]
    client = await box.unix()
    waiting = await read_card_task(client, timeout_s=10)
    await box.waiting(1)
    box.scan(temp)
    result = (await waiting)["result"]
    assert result["verification"]["ok"] and result["verification"]["platform_code"] == "13002"
    identity = result["identity"]
    assert (identity["name"], identity["sex_text"], identity["age"], identity["clinic_time"]) == (
        "王小二", "男性", "35", "2026-11-22 09:20:00")
    assert identity["id_number"] is None and identity["birthday"] is None
    assert box.sim.sim.journal[-1].code == "RHC_E0013"
    # a card's identity has the fields too, null
    static = await client.call("verify_qr", {"qr": box.resident().static_qr})
    assert static["identity"]["age"] is None and static["identity"]["clinic_time"] is None


async def test_bad_codes_get_specific_reasons_and_never_reach_the_platform(box):
    await box.start(sources={})
    client = await box.unix()
    special = await client.call("verify_qr", {"qr": 'A&B<C>"D'})
    assert special["verification"]["reason"] == "QR_UNKNOWN"
    assert special["scan"]["payload"] == 'A&B<C>"D'  # delivered raw
    huge = await client.call("verify_qr", {"qr": "9" * 10240})
    assert huge["verification"]["reason"] == "QR_INVALID" and "10240" in huge["verification"]["message"]
    control = await client.call("verify_qr", {"qr": "AB\x00CD"})
    assert control["verification"]["reason"] == "QR_INVALID"
    assert box.sim.sim.journal == []


@pytest.mark.parametrize("code", [
    "28" + "0" * 17 + "1",      # Alipay, 20 digits: once sent to the platform as a temporary card
    "134567890123456789",       # WeChat Pay
    "6212345678901234567",      # UnionPay
    "0" * 20,                   # 20 digits of no issuer: not a temporary card by default either
    "ABCDEF0123456789ABCDEF0123456789",  # 32 hex digits: not a ciphertext by default
])
async def test_payment_codes_and_loose_shapes_never_reach_the_platform_and_the_log_says_why(box, caplog, code):
    await box.start()
    client = await box.unix()
    waiting = await read_card_task(client, timeout_s=10)
    await box.waiting(1)
    caplog.set_level("INFO", logger="agent.verifier")
    box.scan(code)
    result = (await waiting)["result"]
    assert result["scan"]["payload"] == code  # the HIS gets it raw (a cashier may want it)
    assert result["verification"]["reason"] == "QR_UNKNOWN" and result["identity"] is None
    direct = await client.call("verify_qr", {"qr": code})
    assert direct["verification"]["reason"] == "QR_UNKNOWN"
    assert box.sim.sim.journal == []
    refused = [r.getMessage() for r in caplog.records if "not sent to the platform" in r.getMessage()]
    assert refused and "%d characters: " % len(code) in refused[0]
    assert all(code[:8] not in line for line in refused)
    if code[0] != "0" and code[0] != "A":
        assert "payment code" in refused[0] and "payment code" in direct["verification"]["message"]


async def test_serial_noise_reaches_the_his_as_an_invalid_scan_and_reading_goes_on(box):
    await box.start()
    client = await box.unix()
    noisy = await read_card_task(client, timeout_s=10)
    await box.waiting(1)
    box.scanner.write(b"\x80\xff\x13\x00noise\r")
    result = (await noisy)["result"]
    assert result["verification"]["reason"] == "QR_INVALID"
    assert "not valid utf-8" in result["verification"]["message"]
    good = await read_card_task(client, timeout_s=10)
    await box.waiting(1)
    box.scan(box.resident().static_qr)
    assert (await good)["result"]["verification"]["ok"]


@pytest.mark.parametrize("mode, expected", [
    ("html", "text/html"), ("http500", "HTTP 500"), ("garbage", "not XML"), ("empty", "(empty)"),
    ("reset", "connection broken"),
])
async def test_a_platform_answering_nonsense_gives_platform_unavailable_with_the_scan(box, mode, expected):
    await box.start(sources={})
    client = await box.unix()
    box.sim.faults.add(Fault(mode))
    qr = box.resident().static_qr
    result = await client.call("verify_qr", {"qr": qr})
    verification = result["verification"]
    assert verification["reason"] == "PLATFORM_UNAVAILABLE" and verification["offline"] is True
    assert expected in verification["message"]
    assert result["scan"]["payload"] == qr
    status = await client.call("status")
    assert status["platform"]["reachable"] is False
    assert any(a["code"] == "PLATFORM_UNREACHABLE" for a in status["alarms"])
    # and it recovers on its own
    assert (await client.call("verify_qr", {"qr": qr}))["verification"]["ok"]
    assert (await client.call("status"))["platform"]["reachable"] is True


async def test_a_platform_that_hangs_is_cut_off_at_the_deadline(box):
    await box.start(sources={}, platform={"timeout_s": 0.5})
    client = await box.unix()
    box.sim.faults.add(Fault("hang"))
    started = time.monotonic()
    result = await client.call("verify_qr", {"qr": box.resident().static_qr})
    assert result["verification"]["reason"] == "PLATFORM_UNAVAILABLE"
    assert "0.5 s" in result["verification"]["message"]
    assert time.monotonic() - started < 2


async def test_wrong_credentials_are_platform_auth_and_an_alarm(box):
    await box.start(sources={}, platform={"rhc": {"org_id": "QH0001", "user_name": "scanbox", "user_pwd": "wrong"}})
    client = await box.unix()
    result = await client.call("verify_qr", {"qr": box.resident().static_qr})
    assert result["verification"]["reason"] == "PLATFORM_AUTH"
    assert result["verification"]["platform_code"] == "1005"
    status = await client.call("status")
    assert status["platform"]["reachable"] is True
    assert any(a["code"] == "PLATFORM_ERROR" and "1005" in a["text"] for a in status["alarms"])


# --- status and events -----------------------------------------------------------------------

async def test_status_reports_sources_platform_and_alarms(box):
    await box.start()
    client = await box.unix()
    status = await client.call("status")
    assert status["device_id"] == "test-box" and status["version"]
    assert status["platform"]["kind"] == "rhc"
    assert status["sources"] == [{"name": "serial:counter", "kind": "serial", "connected": True, "detail": None,
                                  "last_scan_at": None, "scans": 0, "problems": 0}]
    assert status["alarms"] == []
    box.scanner.unplug()
    await box.events.wait("status", lambda d: d.get("source", {}).get("connected") is False)
    status = await client.call("status")
    assert status["alarms"][0]["code"] == "SOURCE_DISCONNECTED"
    assert status["alarms"][0]["source"] == "serial:counter"


async def test_subscribe_delivers_scan_verification_and_status_events(box):
    await box.start()
    client = await box.tcp()
    assert await client.call("subscribe", {"events": ["scan", "verification", "status"]}) == {
        "subscribed": ["scan", "status", "verification"]}
    box.scan(box.resident().static_qr)
    scan = await client.event("scan")
    assert scan["data"]["payload"] == box.resident().static_qr
    verification = await client.event("verification")
    assert verification["data"]["identity"]["name"] == box.resident().name
    box.scanner.unplug()
    status = await client.event("status")
    assert status["data"]["source"]["connected"] is False


async def test_subscribe_filters_event_types(box):
    await box.start()
    client = await box.unix()
    await client.call("subscribe", {"events": ["verification"]})
    box.scan(box.resident().static_qr)
    event = await client.event()
    assert event["type"] == "verification"


# --- authentication and scopes ---------------------------------------------------------------

async def test_tcp_needs_auth_and_wrong_tokens_are_slowed(box):
    await box.start(sources={})
    client = await box.tcp(token=None)
    refused = await client.request("status")
    assert refused["error"]["data"]["reason"] == "UNAUTHORIZED"
    timings = []
    for _ in range(2):
        started = time.monotonic()
        wrong = await client.request("auth", {"token": "guess"})
        timings.append(time.monotonic() - started)
        assert wrong["error"]["data"]["reason"] == "UNAUTHORIZED"
    assert timings[0] >= 0.2 and timings[1] > timings[0]
    assert (await client.call("auth", {"token": TOKEN}))["client"] == "his"
    assert (await client.call("status"))["device_id"] == "test-box"


async def test_platform_call_needs_the_admin_scope(box):
    await box.start(sources={})
    reader = await box.tcp(TOKEN)
    refused = await reader.request("platform.call", {"operation": "RHC_E0017",
                                                     "params": {"orgId": "QH0001", "startDate": "2026-01-01",
                                                                "endDate": "2026-12-31"}})
    assert refused["error"]["data"]["reason"] == "UNAUTHORIZED" and "admin" in refused["error"]["message"]
    admin = await box.tcp(ADMIN_TOKEN)
    answer = await admin.call("platform.call", {"operation": "RHC_E0017",
                                                "params": {"orgId": "QH0001", "startDate": "2026-01-01",
                                                           "endDate": "2026-12-31"}})
    assert answer["result"] == "success" and answer["resultCode"] == "1704" and "count" in answer["data"]
    rejected = await admin.request("platform.call", {"operation": "RHC_E0013", "params": {"qr_code": "X" * 20}})
    assert rejected["error"]["data"]["reason"] == "CARD_NOT_FOUND"
    assert rejected["error"]["data"]["platform_code"] == "13001"


async def test_trusted_addresses_read_without_a_token(box):
    await box.start(sources={}, api={"trusted": ["127.0.0.0/8"]})
    client = await box.tcp(token=None)
    assert (await client.call("status"))["device_id"] == "test-box"
    refused = await client.request("platform.call", {"operation": "RHC_E0017", "params": {}})
    assert refused["error"]["data"]["reason"] == "UNAUTHORIZED"


async def test_a_tcp_client_that_never_authenticates_is_closed(box):
    await box.start(sources={}, api={"auth_timeout_s": 0.3})
    client = await box.tcp(token=None)
    message = await client.unsolicited(timeout=3)
    assert message["error"]["data"]["reason"] == "UNAUTHORIZED" and "no auth" in message["error"]["message"]
    assert (await client.unsolicited(timeout=3)) == {"closed": True}


# --- hostile and broken input ----------------------------------------------------------------

async def test_bad_lines_get_json_rpc_errors_and_the_connection_stays_usable(box):
    await box.start(sources={})
    client = await box.unix()
    for raw, code in [
        (b"this is not json\n", -32700),
        (b"\xff\xfe{}\n", -32700),
        (b"[" * 60000 + b"\n", -32700),
        (b'{"jsonrpc":"2.0","id":1,"method":"status","params":' + b"9" * 5000 + b"}\n", -32700),
        (b"42\n", -32600),
        (b"[]\n", -32600),
        (b'{"id":1,"method":"status"}\n', None),  # answered with id 1, see below
    ]:
        client.send_raw(raw)
        if code is not None:
            message = await client.unsolicited()
            assert message["error"]["code"] == code, raw[:40]
    missing_version = await client.unsolicited()
    assert missing_version["id"] == 1 and missing_version["error"]["code"] == -32600
    unknown = await client.request("no.such.method")
    assert unknown["error"]["code"] == -32601
    bad = await client.request("read_card", {"timeout_s": "soon", "colour": "red"})
    assert bad["error"]["code"] == -32602 and bad["error"]["data"]["reason"] == "BAD_REQUEST"
    assert any("timeout_s" in p for p in bad["error"]["data"]["problems"])
    assert any("colour" in p for p in bad["error"]["data"]["problems"])
    positional = await client.request("read_card", [5])
    assert positional["error"]["code"] == -32602
    bad_step = await client.request("read_card", {"step": "999999"})
    assert "4.3.9" in bad_step["error"]["message"]
    assert (await client.call("status"))["device_id"] == "test-box"


@pytest.mark.parametrize("method, params, problem", [
    ("outbox.retry", {"id": 2 ** 63}, "id"),       # beyond SQLite's INTEGER: once killed the DB thread
    ("outbox.retry", {"id": -(2 ** 70)}, "id"),
    ("outbox.retry", {"id": 0}, "id"),
    ("outbox.retry", {"id": True}, "id"),
    ("outbox.retry", {"id": 1.5}, "id"),
    ("outbox.list", {"limit": 2 ** 64}, "limit"),
    ("outbox.list", {"limit": 0}, "limit"),
    ("read_card", {"timeout_s": 1e308}, "timeout_s"),
    ("read_card", {"timeout_s": -1}, "timeout_s"),
    ("read_card", {"timeout_s": float("nan")}, "timeout_s"),
    ("read_card", {"timeout_s": True}, "timeout_s"),
    ("display.show", {"lines": ["x"], "seconds": float("inf")}, "seconds"),
    ("display.show", {"lines": ["x"], "seconds": 0}, "seconds"),
    ("platform.call", {"operation": "RHC_E0017", "params": {"orgId": 2 ** 64}}, "orgId"),
    ("platform.call", {"operation": "RHC_E0017", "params": {"orgId": float("nan")}}, "orgId"),
    ("platform.call", {"operation": "RHC_E0017", "params": {"a": {"b": {"c": {"d": {"e": 1}}}}}}, "deeper"),
])
async def test_every_numeric_parameter_is_bounded_and_the_box_keeps_answering(box, method, params, problem):
    await box.start(sources={})
    admin = await box.tcp(ADMIN_TOKEN)
    # json.dumps writes NaN/Infinity as Python's json.loads (the box's parser) reads them
    admin.send_raw(json.dumps({"jsonrpc": "2.0", "id": 7, "method": method, "params": params}).encode() + b"\n")
    refused = await admin.unsolicited()
    assert refused["id"] == 7 and refused["error"]["code"] == -32602, refused
    assert refused["error"]["data"]["reason"] == "BAD_REQUEST"
    assert problem in refused["error"]["message"]
    # the outbox (its database thread) still answers, and so does status
    assert (await admin.call("outbox.list", {"state": "dead"}, timeout=5))["records"] == []
    assert (await admin.call("status", timeout=5))["device_id"] == "test-box"
    missing = await admin.request("outbox.retry", {"id": 2 ** 63 - 1})
    assert missing["error"]["data"]["reason"] == "BAD_REQUEST"
    assert "no pending or dead record" in missing["error"]["message"]


async def test_notifications_get_no_answer_and_batches_are_answered_together(box):
    await box.start(sources={})
    client = await box.unix()
    client.send_raw(b'{"jsonrpc":"2.0","method":"status"}\n')
    client.send_raw(json.dumps([
        {"jsonrpc": "2.0", "id": "a", "method": "status"},
        {"jsonrpc": "2.0", "method": "status"},
        {"jsonrpc": "2.0", "id": "b", "method": "nope"},
    ]).encode() + b"\n")
    batch = await client.unsolicited()
    assert [r["id"] for r in batch] == ["a", "b"]
    assert "result" in batch[0] and batch[1]["error"]["code"] == -32601


async def test_a_line_over_max_message_is_refused_and_closes_the_connection(box):
    await box.start(sources={}, api={"max_message": 4096})
    client = await box.unix()
    client.send_raw(b'{"x":"' + b"a" * 10000 + b'"}\n')
    message = await client.unsolicited()
    assert message["error"]["code"] == -32600 and "4096" in message["error"]["message"]
    assert (await client.unsolicited()) == {"closed": True}
    other = await box.unix()
    assert (await other.call("status"))["device_id"] == "test-box"


async def test_idle_connections_are_closed(box):
    await box.start(sources={}, api={"idle_timeout_s": 0.3})
    client = await box.unix()
    assert (await client.unsolicited(timeout=3)) == {"closed": True}


async def test_clients_beyond_max_clients_are_refused(box):
    await box.start(sources={}, api={"max_clients": 2})
    a, b = await box.unix(), await box.unix()
    assert (await a.call("status")) and (await b.call("status"))
    c = await box.unix()
    message = await c.unsolicited()
    assert "too many clients" in message["error"]["message"]
    await a.close()
    await until(lambda: box.daemon.stream.clients <= 1)
    d = await box.unix()
    assert (await d.call("status"))["device_id"] == "test-box"


async def test_a_client_that_stops_reading_is_dropped_and_others_are_served(box):
    await box.start()
    stuck = await box.unix()
    await stuck.call("subscribe", {"events": ["scan"]})
    stuck._task.cancel()  # never reads again; the kernel buffers fill, then the queue
    healthy = await box.unix()
    for i in range(3000):
        box.daemon.hub.publish(ScanRead(Scan.from_qr_bytes("test:%d" % i, b"x" * 2000)))
    await until(lambda: box.daemon.stream.clients <= 1, timeout=10)
    assert (await healthy.call("status"))["device_id"] == "test-box"


async def test_unix_socket_mode_is_applied(box, tmp_path):
    await box.start(sources={}, api={"unix_mode": "0600"})
    assert (box.daemon.stream.unix_path.stat().st_mode & 0o777) == 0o600


async def test_a_second_daemon_does_not_steal_the_socket(box, tmp_path):
    await box.start(sources={}, api={"tcp": None})
    other = Daemon(box.daemon.config)
    with pytest.raises(RuntimeError, match="another scanbox"):
        await other.start()
    await other.stop()
    client = await box.unix()
    assert (await client.call("status"))["device_id"] == "test-box"


# --- cards: the reader says who it is; no platform round trip ----------------------------------

async def test_a_card_scan_answers_read_card_with_the_cards_identity_and_only_for_its_kind(box):
    from agent.model import Identity, IdentitySource, Scan, ScanKind

    await box.start()
    client = await box.unix()
    qr_only = await read_card_task(client, timeout_s=10, kinds=["qr"])
    cards = await read_card_task(client, timeout_s=10, kinds=["id_card"])
    await box.waiting(2)
    identity = Identity(IdentitySource.CARD, name="张三", sex="1", nation="01", id_type="01",
                        id_number="110101199003071234", birthday="1990-03-07")
    scan = Scan.from_card("idcard:desk", ScanKind.ID_CARD, identity,
                          {"name": "张三", "id_number": "110101199003071234"}, raw=b"\x00" * 256)
    assert "张三" not in repr(scan) and "110101199003071234" not in repr(scan)
    box.daemon.hub.accept(scan)
    result = (await cards)["result"]
    assert result["scan"]["kind"] == "id_card" and result["scan"]["payload"]["name"] == "张三"
    assert result["identity"]["source"] == "card" and result["identity"]["id_number"] == "110101199003071234"
    assert result["verification"]["ok"] is True and result["verification"]["reason"] is None
    assert not qr_only.done()
    assert box.sim.sim.journal_for("RHC_E0003") == []
    qr_only.cancel()


@pytest.mark.parametrize("message", [
    {"jsonrpc": "2.0", "id": 1, "result": {"name": "才让卓玛", "ok": True, "elapsed_ms": 12.3, "x": None}},
    {"jsonrpc": "2.0", "id": 2 ** 70, "result": []},   # beyond orjson's 64 bits: the standard library's
    {"jsonrpc": "2.0", "id": "a", "result": {1: "a key that is not a string"}},
    {"jsonrpc": "2.0", "id": 3, "result": [1e16, 0.1, -0.0, 12345678.9]},
])
def test_answers_are_the_bytes_the_standard_library_writes(message):
    assert encode(message) == json.dumps(message, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def test_a_nan_in_an_answer_is_null_not_a_lost_answer():
    """JSON has no NaN: a float from a platform's JSON reply that is one cannot stop the answer."""
    assert json.loads(encode({"jsonrpc": "2.0", "id": 1, "result": {"x": float("nan")}}))["result"] == {"x": None}
