"""The Python client examples against a running box: what a HIS developer copies must work."""

from __future__ import annotations

import asyncio
import importlib.util
import ssl
from pathlib import Path
from types import ModuleType

import pytest

from tests.api.test_onetrans import APP_ID, APP_KEY, ONETRANS
from tests.conftest import ADMIN_TOKEN, TOKEN

EXAMPLES = Path(__file__).resolve().parent.parent.parent / "examples"


def example(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location("example_%s" % name, EXAMPLES / ("%s.py" % name))
    assert spec is not None and spec.loader is not None, name
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


async def test_python_client_over_http_and_tcp(box):
    client = example("python_client")
    await box.start(api={"http": "127.0.0.1:0"})
    base = "http://%s:%d" % box.daemon.http.address
    http = client.HttpClient(base, TOKEN)
    status = await asyncio.to_thread(http.call, "status")
    assert status["device_id"] == "test-box"
    with pytest.raises(client.ScanboxError) as refused:
        await asyncio.to_thread(http.call, "outbox.list", {})
    assert refused.value.reason == "UNAUTHORIZED"
    with pytest.raises(client.ScanboxError) as wrong:
        await asyncio.to_thread(client.HttpClient(base, "guess").call, "status")
    assert wrong.value.reason == "UNAUTHORIZED"
    # read_card: the call blocks in its thread until the patient scans
    pending = asyncio.get_running_loop().create_task(asyncio.to_thread(http.call, "read_card", {"timeout_s": 10}))
    await box.waiting(1)
    box.scan(box.resident().static_qr)
    assert (await pending)["identity"]["name"] == box.resident().name
    host, port = box.daemon.stream.tcp_address
    tcp = await asyncio.to_thread(client.TcpClient, host, port, ADMIN_TOKEN)
    assert (await asyncio.to_thread(tcp.call, "outbox.list", {}))["state"] == "pending"
    tcp.close()


async def test_python_client_over_tls_with_the_fingerprint_pinned(box):
    client = example("python_client")
    await box.start(sources={}, api={"http": "127.0.0.1:0", "tls": "on"})
    fingerprint = box.daemon.tls_fingerprint
    base = "https://%s:%d" % box.daemon.http.address
    host, port = box.daemon.stream.tcp_address
    assert (await asyncio.to_thread(client.HttpClient(base, TOKEN, fingerprint).call, "status"))["api"][
        "tls_fingerprint"] == fingerprint
    tcp = await asyncio.to_thread(client.TcpClient, host, port, TOKEN, 10, fingerprint)
    assert (await asyncio.to_thread(tcp.call, "status"))["device_id"] == "test-box"
    tcp.close()
    # another certificate (another box, or someone in between): refused before the token is sent
    other = "00:" * 31 + "00"
    with pytest.raises(ssl.SSLError, match="not the pinned one"):
        await asyncio.to_thread(client.HttpClient(base, TOKEN, other).call, "status")
    with pytest.raises(ssl.SSLError, match="not the pinned one"):
        await asyncio.to_thread(client.TcpClient, host, port, TOKEN, 10, other)
    # without a pin, the system's CAs do not know the box's own certificate
    with pytest.raises(ssl.SSLError):
        await asyncio.to_thread(client.HttpClient(base, TOKEN).call, "status")
    assert box.daemon.api.guard.failures("127.0.0.1") == 0  # no token was ever tried


async def test_onetrans_client_reads_a_card_signed_and_encrypted(box):
    client = example("onetrans_client")
    await box.start(api=dict(ONETRANS, http="127.0.0.1:0"))
    url = "http://%s:%d/onetrans" % box.daemon.http.address
    message = client.read_card_request(APP_ID, APP_KEY, "H35058300252")
    assert isinstance(message["data"], str)  # encrypted on the wire
    pending = asyncio.get_running_loop().create_task(asyncio.to_thread(client.onetrans, url, message, APP_KEY))
    await box.waiting(1)
    box.scan(box.resident().static_qr)
    answer = await pending
    assert answer["code"] == "000000"
    assert answer["data"]["baseinfo"]["certno"] == box.resident().id_card
    assert answer["msgid"] == message["msgid"]
    # the example does not trust an answer whose signature is not the box's, an unsigned one, or
    # one signed for another request
    as_sent = dict(answer, enc_type="NONE")
    as_sent["sign"] = client.sign(as_sent, APP_KEY)
    assert client.open_answer(as_sent, message, APP_KEY)["data"] == answer["data"]
    with pytest.raises(client.UntrustedAnswer, match="signature"):
        client.open_answer(dict(as_sent, sign="0" * 64), message, APP_KEY)
    with pytest.raises(client.UntrustedAnswer, match="unsigned"):
        client.open_answer({k: v for k, v in as_sent.items() if k != "sign"}, message, APP_KEY)
    other = client.read_card_request(APP_ID, APP_KEY, "H35058300252")
    with pytest.raises(client.UntrustedAnswer, match="msgid"):
        client.open_answer(as_sent, other, APP_KEY)
    # and the box refuses the same request sent again (a signed answer saying so)
    replayed = await asyncio.to_thread(client.onetrans, url, message, APP_KEY)
    assert replayed["code"] == "100009" and replayed["msgid"] == message["msgid"]
