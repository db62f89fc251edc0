"""Issue 15 "on the wire": each attack a hospital's security officer tried, against a running
daemon on loopback. One address is 127.0.0.2 (loopback is all of 127/8), the HIS 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
import re
import ssl
import stat
import subprocess
import sys

import aiohttp
import pytest
from cryptography import x509

from agent import tls
from tests.api.webclient import HTTP_API, base_url, open_ws, post_rpc
from tests.conftest import TOKEN, RpcClient, until

ATTACKER = ("127.0.0.2", 0)
STATUS = {"jsonrpc": "2.0", "id": 1, "method": "status"}


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def _unauthenticated_tcp(box, n: int) -> list[RpcClient]:
    return [await RpcClient.tcp(*box.daemon.stream.tcp_address, local_addr=ATTACKER) for _ in range(n)]


async def test_one_address_cannot_fill_the_tcp_slots_with_connections_that_never_log_in(box):
    await box.start(sources={}, api={"max_clients": 16, "max_unauthenticated_per_address": 4})
    held = await _unauthenticated_tcp(box, 16)
    try:
        # past its cap the address is told why and cut; the ones it holds wait for auth_timeout_s
        refused = [c for c in held[4:] if (await c.unsolicited())["error"]["data"]["reason"] == "BUSY"]
        assert len(refused) == 12
        his = await box.tcp(TOKEN)  # another address still gets in
        assert (await his.call("status"))["device_id"] == "test-box"
    finally:
        for client in held:
            await client.close()


async def test_tcp_clients_never_starve_the_unix_socket(box):
    await box.start(sources={}, api={"max_clients": 3})
    for _ in range(3):
        await box.tcp(TOKEN)
    unix = await box.unix()  # the admin's way in has a count of its own
    assert (await unix.call("status"))["api"]["clients"] == 4


async def test_unauthenticated_websockets_cannot_fill_the_websocket_slots(box, http):
    await box.start(sources={}, api=dict(HTTP_API, max_clients=4, max_unauthenticated_per_address=100))
    connector = aiohttp.TCPConnector(local_addr=ATTACKER)
    async with aiohttp.ClientSession(connector=connector) as attacker:
        opened = []
        for _ in range(4):
            try:
                opened.append(await attacker.ws_connect(base_url(box) + "/ws"))
            except aiohttp.WSServerHandshakeError as exc:
                assert exc.status == 503
        assert len(opened) == 2  # half the slots at most
        his = await open_ws(http, box, headers={"Authorization": "Bearer " + TOKEN})
        assert (await his.call("status"))["device_id"] == "test-box"
        await his.close()
        for ws in opened:
            await ws.close()


async def test_an_http_body_sent_slowly_is_cut_at_the_deadline(box):
    await box.start(sources={}, api=dict(HTTP_API, auth_timeout_s=0.5))
    host, port = box.daemon.http.address
    for path in ("/onetrans", "/rpc"):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"POST %s HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer %s\r\n"
                     b"Content-Length: 1000\r\n\r\n{\"a\"" % (path.encode(), TOKEN.encode()))
        await writer.drain()
        async with asyncio.timeout(5):  # before: no answer until the body is complete
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?im)^content-length: *(\d+)", head).group(1))
            body = await reader.readexactly(length)
        if path == "/rpc":
            assert head.startswith(b"HTTP/1.1 408"), head
        else:  # OneTrans answers every body with a pOutData
            assert head.startswith(b"HTTP/1.1 200") and "did not arrive" in json.loads(body)["err_msg"], body
        writer.close()


async def test_auth_is_refused_inside_batches_and_over_http(box, http):
    await box.start(sources={}, api=HTTP_API)
    guesses = [{"jsonrpc": "2.0", "id": i, "method": "auth", "params": {"token": "guess-%d" % i}}
               for i in range(30)]
    status, body = await post_rpc(http, box, guesses, TOKEN)
    assert status == 200 and {r["error"]["code"] for r in body} == {-32600}
    assert "inside a batch" in body[0]["error"]["message"]
    status, body = await post_rpc(http, box, guesses[0], TOKEN)
    assert body["error"]["code"] == -32600 and "Bearer" in body["error"]["message"]
    tcp = await box.tcp(None)
    tcp.send_raw(json.dumps(guesses[:3]).encode() + b"\n")
    answer = await tcp.unsolicited()
    assert [r["error"]["code"] for r in answer] == [-32600] * 3
    assert box.daemon.api.guard.failures("127.0.0.1") == 0  # no guess was even tried


async def test_failed_logins_lock_an_address_out_and_a_login_does_not_reset_it(box):
    await box.start(sources={}, api={})
    guard = box.daemon.api.guard
    guard.MAX_DELAY_S = 0.01  # the lockout is the subject here, not the doubling wait
    client = await box.tcp(None)
    for i in range(guard.LOCKOUT_FAILURES):
        if i == guard.LOCKOUT_FAILURES // 2:
            assert (await client.call("auth", {"token": TOKEN}))["ok"]  # forgives nothing
        assert (await client.request("auth", {"token": "guess-%02d" % i}))["error"]["data"]["reason"] == "UNAUTHORIZED"
    assert guard.failures("127.0.0.1") == guard.LOCKOUT_FAILURES
    refused = await client.request("auth", {"token": TOKEN})
    assert "locked out" in refused["error"]["message"]
    other = await RpcClient.tcp(*box.daemon.stream.tcp_address, local_addr=ATTACKER)
    try:
        assert (await other.call("auth", {"token": TOKEN}))["ok"]  # another address is not
    finally:
        await other.close()


async def test_a_rebound_dns_name_in_host_is_refused(box, http):
    await box.start(sources={}, api=dict(HTTP_API, http_hosts=["scanbox-3.clinic.lan"]))
    url = base_url(box) + "/healthz"
    for host, expected in (("attacker.example", 421), ("attacker.example:7801", 421), ("127.0.0.1", 200),
                           ("localhost:7801", 200), ("scanbox-3.clinic.lan", 200), ("[::1]:7801", 200)):
        async with http.get(url, headers={"Host": host}) as response:
            assert response.status == expected, host


async def test_keep_alive_requests_after_the_head_deadline_leave_no_bookkeeping(box, http):
    await box.start(sources={}, api=dict(HTTP_API, auth_timeout_s=0.2))
    server = box.daemon.http
    connector = aiohttp.TCPConnector(limit=1)
    async with aiohttp.ClientSession(connector=connector) as one_connection:
        async with one_connection.get(base_url(box) + "/healthz") as response:
            assert response.status == 200
        conn = next(iter(server._open.values()))
        await until(lambda: conn.reaper is None)  # past auth_timeout_s: served, so not reaped
        for _ in range(20):
            async with one_connection.get(base_url(box) + "/healthz") as response:
                assert response.status == 200
        assert server.open_connections == 1
    await until(lambda: server.open_connections == 0)


# --- TLS ---------------------------------------------------------------------------------------

def _no_ca() -> ssl.SSLContext:
    """What the examples do: no CA (the box's certificate is its own), the certificate's SHA-256
    compared with the pinned one after the handshake."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def _fingerprint_of(der: bytes) -> str:
    return tls.fingerprint(x509.load_der_x509_certificate(der))


async def test_tcp_http_and_websocket_speak_tls_with_the_box_certificate(box, tmp_path):
    await box.start(sources={}, api=dict(HTTP_API, tls="on"))
    fingerprint = box.daemon.tls_fingerprint
    key = tmp_path / "state" / "tls" / "box.key"
    assert fingerprint and stat.S_IMODE(key.stat().st_mode) == 0o600
    context = _no_ca()
    host, port = box.daemon.stream.tcp_address
    reader, writer = await asyncio.open_connection(host, port, ssl=context)
    assert _fingerprint_of(writer.get_extra_info("ssl_object").getpeercert(binary_form=True)) == fingerprint
    writer.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "auth", "params": {"token": TOKEN}}).encode()
                 + b"\n" + json.dumps(dict(STATUS, id=2)).encode() + b"\n")
    await writer.drain()
    assert json.loads(await reader.readline())["result"]["ok"]
    assert json.loads(await reader.readline())["result"]["api"]["tls_fingerprint"] == fingerprint
    writer.close()
    # in clear, a TLS listener says nothing back (no token is ever read in clear)
    reader, writer = await asyncio.open_connection(host, port)
    writer.write(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "auth", "params": {"token": TOKEN}}).encode()
                 + b"\n")
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        async with asyncio.timeout(5):
            line = await reader.readline()
            if not line:
                raise ConnectionError("closed")
    writer.close()
    async with aiohttp.ClientSession() as https:
        assert base_url(box).startswith("https://")
        pinned = aiohttp.Fingerprint(bytes.fromhex(fingerprint.replace(":", "")))
        async with https.post(base_url(box) + "/rpc", json=STATUS, ssl=pinned,
                              headers={"Authorization": "Bearer " + TOKEN}) as response:
            assert response.status == 200
        with pytest.raises(aiohttp.ServerFingerprintMismatch):  # another box's (or a spy's) certificate
            await https.post(base_url(box) + "/rpc", json=STATUS, ssl=aiohttp.Fingerprint(bytes(32)),
                             headers={"Authorization": "Bearer " + TOKEN})
        ws = await https.ws_connect(base_url(box).replace("https", "wss") + "/ws", ssl=pinned,
                                    headers={"Authorization": "Bearer " + TOKEN})
        await ws.send_json(STATUS)
        assert (await ws.receive_json(timeout=5))["result"]["device_id"] == "test-box"
        await ws.close()


async def test_auto_tls_is_plain_on_loopback_only(box):
    await box.start(sources={}, api={})  # tls = "auto", tcp on 127.0.0.1
    assert not box.daemon.stream.tls and box.daemon.tls_fingerprint is None
    assert (await (await box.tcp(TOKEN)).call("status"))["api"]["tls_fingerprint"] is None


async def test_a_technician_key_others_can_read_is_refused_not_served_plain(box, tmp_path):
    target = tls.BoxCertificate(tmp_path / "site.crt", tmp_path / "site.key")
    tls.make(target, ["box.example"])
    target.key.chmod(0o644)
    await box.start(sources={}, api={"tls": "on", "tls_cert": str(target.cert), "tls_key": str(target.key)})
    assert box.daemon.stream.tcp_address is None
    status = await (await box.unix()).call("status")
    [alarm] = [a for a in status["alarms"] if a["code"] == "API_UNAVAILABLE"]
    assert "mode 0644" in alarm["text"] and "site.key" in alarm["text"]


async def test_scanbox_api_speaks_tls_to_the_pinned_box_only(box):
    await box.start(sources={}, api={"tls": "on"})
    tcp = "%s:%d" % box.daemon.stream.tcp_address
    command = [sys.executable, "-m", "agent", "api", "--tcp", tcp, "--token", TOKEN]
    good = await asyncio.to_thread(subprocess.run, command + ["--fingerprint", box.daemon.tls_fingerprint, "status"],
                                   capture_output=True, text=True, timeout=30)
    assert good.returncode == 0 and json.loads(good.stdout)["result"]["device_id"] == "test-box"
    wrong = await asyncio.to_thread(subprocess.run, command + ["--fingerprint", "00" * 32, "status"],
                                    capture_output=True, text=True, timeout=30)
    assert wrong.returncode == 1 and "not the pinned one" in wrong.stderr
    assert box.daemon.api.guard.failures("127.0.0.1") == 0
