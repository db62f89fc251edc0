"""The HTTP and WebSocket API end to end: a running daemon, aiohttp's client on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import re

import aiohttp
import pytest

from agent.config import parse_http_listen, validate
from agent.events import DisplayChanged
from tests.api.webclient import HTTP_API, base_url, open_ws, post_rpc
from tests.conftest import ADMIN_TOKEN, TOKEN, config_dict, until

ORIGIN = "http://his.example:8080"
# every method that needs more than `read`, with params that pass validation
ADMIN_CALLS = [
    ("platform.call", {"operation": "RHC_E0017", "params": {"orgId": "QH0001", "startDate": "2026-01-01",
                                                            "endDate": "2026-12-31"}}),
    ("outbox.list", {"state": "dead"}),
    ("outbox.retry", {"id": 1}),
]
READ_CALLS = [("status", {}), ("outbox.stats", {}), ("verify_qr", {"qr": "not-a-health-card"}),
              ("display.show", {"lines": ["请扫码"]})]


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def test_http_is_off_by_default_and_a_bare_port_listens_on_loopback(tmp_path):
    assert validate(config_dict(None, tmp_path)).api.http is None
    assert parse_http_listen("7801") == ("127.0.0.1", 7801)
    assert parse_http_listen(":7801") == ("127.0.0.1", 7801)
    assert parse_http_listen("0.0.0.0:7801") == ("0.0.0.0", 7801)
    with pytest.raises(ValueError):
        parse_http_listen("99999")
    with pytest.raises(Exception, match="origin"):
        validate(config_dict(None, tmp_path, api={"cors_origins": ["http://his.example/app/"]}))


async def test_post_rpc_with_a_bearer_token_single_and_batch(box, http):
    await box.start(sources={}, api=HTTP_API)
    status, body = await post_rpc(http, box, {"jsonrpc": "2.0", "id": 1, "method": "status"}, TOKEN)
    assert status == 200 and body["result"]["device_id"] == "test-box"
    status, body = await post_rpc(http, box, [{"jsonrpc": "2.0", "id": 1, "method": "outbox.stats"},
                                              {"jsonrpc": "2.0", "method": "status"},  # a notification
                                              {"jsonrpc": "2.0", "id": 2, "method": "nope"}], TOKEN)
    assert status == 200 and [r["id"] for r in body] == [1, 2]
    assert body[0]["result"]["pending"] == 0 and body[1]["error"]["code"] == -32601
    status, body = await post_rpc(http, box, {"jsonrpc": "2.0", "method": "status"}, TOKEN)
    assert status == 204 and body is None
    status, body = await post_rpc(http, box, b'{"jsonrpc": "2.0", "id": 1, "method"', TOKEN)
    assert status == 200 and body["error"]["code"] == -32700


async def test_http_without_or_with_a_wrong_token_is_refused_and_slowed(box, http):
    await box.start(sources={}, api=HTTP_API)
    request = {"jsonrpc": "2.0", "id": 1, "method": "status"}
    status, body = await post_rpc(http, box, request, None)
    assert status == 401 and body["error"]["data"]["reason"] == "UNAUTHORIZED"
    status, body = await post_rpc(http, box, request, "guess")
    assert status == 401 and body["error"]["data"]["reason"] == "UNAUTHORIZED"
    # the guard counts the failure against this address: the next wrong answer waits longer
    assert box.daemon.api.guard.failures("127.0.0.1") == 1
    status, _ = await post_rpc(http, box, request, TOKEN)
    # a right token forgives nothing: guessing under cover of a known token stays counted
    assert status == 200 and box.daemon.api.guard.failures("127.0.0.1") == 1
    for method, params in ADMIN_CALLS + READ_CALLS + [("onetrans", {"pInData": "{}"})]:
        status, body = await post_rpc(http, box, {"jsonrpc": "2.0", "id": 1, "method": method, "params": params},
                                      None)
        assert status == 401 and body["error"]["data"]["reason"] == "UNAUTHORIZED", method


@pytest.mark.parametrize("transport", ["tcp", "http", "websocket"])
async def test_admin_methods_need_the_admin_scope_on_every_transport(box, http, transport):
    await box.start(sources={}, api=HTTP_API)

    async def call(token: str, method: str, params: dict) -> dict:
        if transport == "tcp":
            client = await box.tcp(token)
            return await client.request(method, params)
        if transport == "http":
            return (await post_rpc(http, box, {"jsonrpc": "2.0", "id": 1, "method": method, "params": params},
                                   token))[1]
        client = await open_ws(http, box, token)
        try:
            return await client.request(method, params)
        finally:
            await client.close()

    for method, params in ADMIN_CALLS:
        refused = await call(TOKEN, method, params)
        assert refused["error"]["data"]["reason"] == "UNAUTHORIZED", method
        assert "admin" in refused["error"]["message"]
        allowed = await call(ADMIN_TOKEN, method, params)
        assert allowed.get("error", {}).get("data", {}).get("reason") != "UNAUTHORIZED", (method, allowed)
    for method, params in READ_CALLS:
        answer = await call(TOKEN, method, params)
        assert answer.get("error", {}).get("data", {}).get("reason") != "UNAUTHORIZED", (method, answer)


async def test_unauthenticated_tcp_calls_are_refused(box):
    await box.start(sources={}, api=HTTP_API)
    client = await box.tcp(token=None)
    for method, params in ADMIN_CALLS + READ_CALLS + [("subscribe", {}), ("onetrans", {"pInData": "{}"})]:
        refused = await client.request(method, params)
        assert refused["error"]["data"]["reason"] == "UNAUTHORIZED", method


async def test_unauthenticated_websocket_calls_are_refused_until_auth(box, http):
    await box.start(sources={}, api=HTTP_API)
    client = await open_ws(http, box)
    for method, params in ADMIN_CALLS + READ_CALLS + [("subscribe", {}), ("onetrans", {"pInData": "{}"})]:
        refused = await client.request(method, params)
        assert refused["error"]["data"]["reason"] == "UNAUTHORIZED", method
    wrong = await client.request("auth", {"token": "guess"})
    assert wrong["error"]["data"]["reason"] == "UNAUTHORIZED"
    assert (await client.call("auth", {"token": TOKEN}))["scopes"] == ["read"]
    assert (await client.call("status"))["device_id"] == "test-box"
    await client.close()
    # a bearer header authenticates the handshake itself (non-browser clients)
    header = await open_ws(http, box, headers={"Authorization": "Bearer " + ADMIN_TOKEN})
    assert (await header.call("outbox.list"))["records"] == []
    await header.close()


async def test_a_websocket_that_never_authenticates_is_closed(box, http):
    await box.start(sources={}, api=dict(HTTP_API, auth_timeout_s=0.3))
    client = await open_ws(http, box)
    message = await client.next_unsolicited()
    assert message["error"]["data"]["reason"] == "UNAUTHORIZED" and "no auth" in message["error"]["message"]
    assert (await client.next_unsolicited())["closed"] is True


async def test_websocket_reads_a_card_and_delivers_events(box, http):
    await box.start(api=HTTP_API)
    client = await open_ws(http, box, TOKEN)
    assert (await client.call("subscribe", {"events": ["scan", "verification"]}))["subscribed"] == [
        "scan", "verification"]
    pending = asyncio.get_running_loop().create_task(client.request("read_card", {"timeout_s": 10}))
    await box.waiting(1)
    resident = box.resident()
    box.scan(resident.static_qr)
    result = (await pending)["result"]
    assert result["identity"]["name"] == resident.name and result["verification"]["ok"] is True
    async with asyncio.timeout(5):
        kinds = [(await client.notifications.get())["type"] for _ in range(2)]
    assert kinds == ["scan", "verification"]
    status = await client.call("status")
    assert status["api"]["websockets"] == 1
    await client.close()
    await until(lambda: not box.daemon.http.websockets)


async def test_an_http_caller_that_hangs_up_stops_waiting(box, http):
    await box.start(api=HTTP_API)
    task = asyncio.get_running_loop().create_task(post_rpc(
        http, box, {"jsonrpc": "2.0", "id": 1, "method": "read_card", "params": {"timeout_s": 30}}, TOKEN))
    await box.waiting(1)
    task.cancel()
    await until(lambda: box.daemon.hub.waiting == 0)


async def test_cors_only_for_configured_origins(box, http):
    await box.start(sources={}, api=HTTP_API)
    url = base_url(box)
    async with http.options(url + "/rpc", headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                                   "Access-Control-Request-Headers": "authorization"}) as r:
        assert r.status == 204 and r.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Authorization" in r.headers["Access-Control-Allow-Headers"]
    status, body = await post_rpc(http, box, {"jsonrpc": "2.0", "id": 1, "method": "status"}, TOKEN,
                                  {"Origin": ORIGIN})
    assert status == 200
    async with http.post(url + "/rpc", json={"jsonrpc": "2.0", "id": 1, "method": "status"},
                         headers={"Origin": "http://evil.example", "Authorization": "Bearer " + TOKEN}) as r:
        assert r.status == 403 and "Access-Control-Allow-Origin" not in r.headers
    async with http.options(url + "/rpc", headers={"Origin": "http://evil.example"}) as r:
        assert r.status == 403
    # browsers do not apply CORS to WebSockets: the handshake itself checks the origin
    with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
        await open_ws(http, box, headers={"Origin": "http://evil.example"})
    assert refused.value.status == 403
    allowed = await open_ws(http, box, TOKEN, headers={"Origin": ORIGIN})
    await allowed.close()


async def test_limits_body_size_and_rate(box, http):
    await box.start(sources={}, api=dict(HTTP_API, max_message=2048, rate_per_s=1, rate_burst=5))
    status, body = await post_rpc(http, box, b"[" + b"1," * 2000 + b"1]", TOKEN)
    assert status == 413 and body["error"]["data"]["reason"] == "BAD_REQUEST"
    statuses = []
    for _ in range(6):
        status, body = await post_rpc(http, box, {"jsonrpc": "2.0", "id": 1, "method": "status"}, TOKEN)
        statuses.append(status)
    assert statuses[-1] == 429 and body["error"]["data"]["reason"] == "BUSY"
    # monitoring is never rate limited and needs no token; it tells no personal data
    async with http.get(base_url(box) + "/healthz") as r:
        health = await r.json()
        assert r.status == 200 and health["ok"] is True and set(health) == {"ok", "version", "uptime_s", "alarms"}


async def test_a_websocket_client_that_stops_reading_is_dropped_and_others_are_served(box, http):
    await box.start(api=HTTP_API)
    # a raw client that subscribes, then never reads again: its queue fills with events
    lazy = await http.ws_connect(base_url(box) + "/ws", headers={"Authorization": "Bearer " + TOKEN})
    await lazy.send_json({"jsonrpc": "2.0", "id": 1, "method": "subscribe", "params": {"events": ["status"]}})
    assert (await lazy.receive_json(timeout=5))["result"]["subscribed"] == ["status"]
    other = await open_ws(http, box, TOKEN)
    for i in range(1000):
        box.daemon.hub.publish(DisplayChanged({"filler": "x" * 200, "i": i}))
    await until(lambda: len(box.daemon.http.websockets) == 1, timeout=10)
    assert (await other.call("status"))["device_id"] == "test-box"
    await other.close()
    await lazy.close()


async def test_an_idle_websocket_is_closed_and_a_frame_over_max_message_closes_it(box, http):
    await box.start(sources={}, api=dict(HTTP_API, idle_timeout_s=0.3, max_message=2048))
    idle = await open_ws(http, box, TOKEN)
    assert (await idle.next_unsolicited())["closed"] is True
    big = await open_ws(http, box, TOKEN)
    await big.ws.send_str('"%s"' % ("x" * 4096))
    closed = await big.next_unsolicited()
    assert closed["closed"] is True and closed["code"] == 1009
    await until(lambda: not box.daemon.http.websockets)


async def test_no_token_key_or_personal_data_in_scanboxs_own_log_records(box, http, caplog):
    from tests.api.test_onetrans import APP_KEY, ONETRANS, SPEC_READ_CARD, request

    caplog.set_level(logging.DEBUG)
    await box.start(api=dict(HTTP_API, **ONETRANS))
    wrong = "guessed-token-4f9a1c"
    await post_rpc(http, box, {"jsonrpc": "2.0", "id": 1, "method": "status"}, wrong)
    await post_rpc(http, box, {"jsonrpc": "2.0", "id": 1, "method": "status"}, TOKEN)
    client = await open_ws(http, box, ADMIN_TOKEN)
    pending = asyncio.get_running_loop().create_task(client.request("onetrans", {"pInData": request(SPEC_READ_CARD)}))
    await box.waiting(1)
    resident = box.resident()
    box.scan(resident.static_qr)
    assert (await pending)["result"]["code"] == "000000"
    await client.close()
    # the raw records, before the masking filter any handler adds
    own = "\n".join(r.getMessage() for r in caplog.records if r.name.startswith(("agent", "drivers")))
    assert "api: http auth refused" in own and "onetrans" in own
    for secret in (wrong, TOKEN, ADMIN_TOKEN, APP_KEY, resident.name, resident.id_card):
        assert secret not in own, secret


async def _closed_by_the_box(reader: asyncio.StreamReader, timeout: float = 5) -> bool:
    """True when the box closes the connection (EOF or reset) before the deadline."""
    async with asyncio.timeout(timeout):
        try:
            return await reader.read(1) == b""
        except ConnectionError:
            return True


async def _status_over(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
    """One keep-alive POST /rpc status on a raw connection; the HTTP status code."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "status"}).encode()
    writer.write(b"POST /rpc HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
                 b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s" % (TOKEN.encode(), len(body), body))
    head = (await reader.readuntil(b"\r\n\r\n")).decode()
    length = int(re.search(r"(?im)^content-length: *(\d+)", head).group(1))
    await reader.readexactly(length)
    return int(head.split()[1])


async def test_http_connections_are_capped_and_a_head_that_never_ends_is_cut(box):
    await box.start(sources={}, api=dict(HTTP_API, http_max_connections=3, auth_timeout_s=0.5))
    host, port = box.daemon.http.address
    # a connection that completed a request first: kept alive past its deadline
    served = await asyncio.open_connection(host, port)
    assert await _status_over(*served) == 200
    trickling = []
    for _ in range(2):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST /rpc HTTP/1.1\r\nHost: bo")
        trickling.append((reader, writer))
    # the fourth connection is over the cap: cut at once
    over_reader, over = await asyncio.open_connection(host, port)
    assert await _closed_by_the_box(over_reader, timeout=2)
    assert box.daemon.http.refused_connections == 1
    # the tricklers are cut at their deadline, which comes after the served connection's
    for reader, _ in trickling:
        assert await _closed_by_the_box(reader)
    assert await _status_over(*served) == 200
    for writer in (served[1], over, *(w for _, w in trickling)):
        writer.close()
