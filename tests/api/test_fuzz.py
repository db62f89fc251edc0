"""Fuzzing every transport's input with hypothesis: random bytes (invalid UTF-8), malformed and
deeply nested JSON, huge numbers, oversized messages, JSON-RPC requests with random members and
params, OneTrans envelopes with random fields. After every input the daemon must still answer a
separate client that stayed connected, and every byte it wrote back must be JSON.

Hypothesis runs in a worker thread; each input is sent on the daemon's event loop. The number
of inputs per transport is printed (pytest -s)."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any, Awaitable, Callable, Coroutine

import aiohttp
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.api.onetrans import encrypt_data, sign
from tests.api.test_onetrans import APP_ID, APP_KEY, ONETRANS, SPEC_READ_CARD
from tests.api.webclient import base_url
from tests.conftest import TOKEN

EXAMPLES_PER_TRANSPORT = 300
MAX_MESSAGE = 4096  # small, so oversized inputs are cheap to make
FUZZ_API = dict(ONETRANS, http="127.0.0.1:0", max_message=MAX_MESSAGE, rate_per_s=100000, rate_burst=100000)
SENTINEL = {"jsonrpc": "2.0", "id": "sentinel", "method": "outbox.stats"}
METHODS = ["status", "verify_qr", "subscribe", "platform.call", "display.show", "outbox.stats", "outbox.list",
           "outbox.retry", "onetrans", "nope", "", "auth "]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=16)
rpc_requests = st.fixed_dictionaries(
    {"jsonrpc": st.sampled_from(["2.0", "2.0", "1.0"]),
     "method": st.sampled_from(METHODS) | st.text(max_size=12),
     "params": json_values},
    optional={"id": st.integers() | st.text(max_size=8) | st.none() | st.floats(allow_nan=False)
              | st.lists(st.integers(), max_size=2)})
# read_card waits for a scan by design: fuzzed with short timeouts only
read_cards = st.fixed_dictionaries({"jsonrpc": st.just("2.0"), "id": st.integers(), "method": st.just("read_card"),
                                    "params": st.fixed_dictionaries({"timeout_s": st.floats(0.001, 0.05)},
                                                                    optional={"kinds": json_values,
                                                                              "verify": json_values,
                                                                              "step": json_values})})
messages = st.one_of(
    st.binary(max_size=600),                                                   # anything, mostly not UTF-8
    st.text(max_size=300).map(lambda t: t.encode("utf-8", "surrogatepass")),  # text, lone surrogates too
    st.lists(rpc_requests | read_cards, min_size=1, max_size=40).map(          # batches (over 32 too)
        lambda batch: json.dumps(batch if len(batch) > 1 else batch[0]).encode()),
    rpc_requests.map(lambda r: json.dumps(r, ensure_ascii=False).encode()),
    st.integers(1, 200_000).map(lambda n: b"[" * n),                          # deep nesting
    st.integers(1, 3000).map(lambda n: b'{"a":' * n + b"1" + b"}" * n),
    st.integers(4300, 20_000).map(                                             # numbers Python will not convert
        lambda n: b'{"jsonrpc":"2.0","id":' + b"9" * n + b',"method":"status"}'),
    st.sampled_from([b'{"jsonrpc":"2.0","id":1,"method":"verify_qr","params":{"qr":1e999}}',
                     b'{"jsonrpc":"2.0","id":1e400,"method":"status"}', b"NaN", b"-Infinity", b"\xef\xbb\xbf{}"]),
    st.integers(MAX_MESSAGE - 64, MAX_MESSAGE * 4).map(lambda n: b'"' + b"x" * n + b'"'),  # oversized
)


def _pin(fields: dict[str, Any], data: Any, encrypt: bool, signed: bool) -> dict[str, Any]:
    base = {k: v for k, v in SPEC_READ_CARD.items() if k not in ("appId", "appKey")}
    message = dict(base, app_id=APP_ID, enc_type="SM4" if encrypt else "NONE")
    message["data"] = encrypt_data(data, APP_KEY) if encrypt else data
    message.update(fields)
    return sign(message, APP_KEY) if signed else message


onetrans_inputs = st.one_of(
    messages,
    st.builds(_pin, st.dictionaries(st.sampled_from(["msgid", "timestamp", "signtype", "enc_type", "trans_type",
                                                     "opter_type", "dept_name", "app_key", "sign", "extra"]),
                                    json_values, max_size=4),
              json_values, st.booleans(), st.booleans()).map(lambda m: json.dumps(m, ensure_ascii=False).encode()),
)

counts: dict[str, int] = {}


def run_fuzz(name: str, loop: asyncio.AbstractEventLoop, strategy: st.SearchStrategy[bytes],
             attempt: Callable[[bytes], Coroutine[Any, Any, None]]) -> None:
    """In a worker thread: hypothesis draws, the daemon's loop runs each attempt."""
    counts[name] = 0

    @settings(max_examples=EXAMPLES_PER_TRANSPORT, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def one(data: bytes) -> None:
        counts[name] += 1
        asyncio.run_coroutine_threadsafe(attempt(data), loop).result(timeout=60)

    one()
    print("fuzz %s: %d inputs" % (name, counts[name]))


async def _read_until_sentinel(read_line: Callable[[], Awaitable[bytes | None]]) -> None:
    """Every message back must be JSON; the sentinel's answer (or a close) ends the attempt."""
    async with asyncio.timeout(20):
        while True:
            line = await read_line()
            if line is None:
                return  # closed: an oversized message ends the connection, by design
            message = json.loads(line)
            if isinstance(message, dict) and message.get("id") == "sentinel":
                assert "result" in message, message
                return


@pytest.mark.parametrize("transport", ["unix", "tcp"])
async def test_fuzz_stream_transports(box, transport):
    await box.start(sources={}, api=FUZZ_API)
    canary = await (box.unix() if transport == "unix" else box.tcp(TOKEN))

    async def attempt(data: bytes) -> None:
        if transport == "unix":
            reader, writer = await asyncio.open_unix_connection(str(box.daemon.stream.unix_path), limit=1 << 22)
        else:
            reader, writer = await asyncio.open_connection(*box.daemon.stream.tcp_address, limit=1 << 22)
            writer.write(json.dumps({"jsonrpc": "2.0", "id": 0, "method": "auth", "params": {"token": TOKEN}})
                         .encode() + b"\n")
            assert "result" in json.loads(await reader.readline())

        async def read_line() -> bytes | None:
            line = await reader.readline()
            return line or None

        try:
            writer.write(data.replace(b"\n", b" ") + b"\n" + json.dumps(SENTINEL).encode() + b"\n")
            await writer.drain()
            await _read_until_sentinel(read_line)
        except (ConnectionResetError, BrokenPipeError):
            pass  # closed on an oversized line before we finished writing
        finally:
            writer.close()
        assert (await canary.call("status"))["device_id"] == "test-box"

    await asyncio.to_thread(run_fuzz, transport, asyncio.get_running_loop(), messages, attempt)
    assert counts[transport] >= EXAMPLES_PER_TRANSPORT // 2


async def test_fuzz_http_rpc_and_websocket(box):
    await box.start(sources={}, api=FUZZ_API)
    auth = {"Authorization": "Bearer " + TOKEN}
    async with aiohttp.ClientSession() as http:
        canary = await http.ws_connect(base_url(box) + "/ws", headers=auth)

        async def still_served() -> None:
            await canary.send_json({"jsonrpc": "2.0", "id": 1, "method": "status"})
            assert (await canary.receive_json(timeout=10))["result"]["device_id"] == "test-box"

        async def post(data: bytes) -> None:
            async with http.post(base_url(box) + "/rpc", data=data, headers=auth,
                                 timeout=aiohttp.ClientTimeout(total=20)) as response:
                body = await response.read()
                assert response.status in (200, 204, 413), response.status
                if response.status != 204:
                    json.loads(body)
            await still_served()

        async def frame(data: bytes) -> None:
            ws = await http.ws_connect(base_url(box) + "/ws", headers=auth, max_msg_size=1 << 22)

            async def read_line() -> bytes | None:
                msg = await ws.receive()
                return msg.data.encode() if msg.type == aiohttp.WSMsgType.TEXT else None

            try:
                try:
                    text = data.decode("utf-8")
                    await ws.send_str(text)
                except UnicodeDecodeError:
                    await ws.send_bytes(data)
                await ws.send_json(SENTINEL)
                await _read_until_sentinel(read_line)
            except ConnectionResetError:
                pass
            finally:
                await ws.close()
            await still_served()

        loop = asyncio.get_running_loop()
        await asyncio.to_thread(run_fuzz, "http", loop, messages, post)
        await asyncio.to_thread(run_fuzz, "websocket", loop, messages, frame)
        await canary.close()


async def test_fuzz_onetrans(box):
    await box.start(sources={}, api=FUZZ_API)
    # most inputs are wrongly signed, and each would wait out the address's growing penalty
    # (test_onetrans checks that); here it would only make the run long
    box.daemon.api.onetrans.penalty = None
    canary = await box.unix()
    async with aiohttp.ClientSession() as http:

        async def post(data: bytes) -> None:
            async with http.post(base_url(box) + "/onetrans", data=data,
                                 timeout=aiohttp.ClientTimeout(total=20)) as response:
                body = await response.read()
                assert response.status in (200, 400, 413), response.status
                answer = json.loads(body.decode(response.charset or "utf-8"))
                if response.status == 200:
                    assert len(answer["code"]) == 6 and isinstance(answer["err_msg"], str)
            assert (await canary.call("status"))["device_id"] == "test-box"

        async def rpc(data: bytes) -> None:
            text = data.decode("utf-8", "replace")
            answer = await canary.call("onetrans", {"pInData": text[:MAX_MESSAGE // 2]})
            assert len(answer["code"]) == 6

        loop = asyncio.get_running_loop()
        await asyncio.to_thread(run_fuzz, "onetrans-http", loop, onetrans_inputs, post)
        await asyncio.to_thread(run_fuzz, "onetrans-rpc", loop, onetrans_inputs, rpc)


async def test_slow_clients_holding_connections_do_not_stop_others(box):
    await box.start(sources={}, api=dict(FUZZ_API, max_clients=200))
    held: list[asyncio.StreamWriter] = []
    host, port = box.daemon.stream.tcp_address
    http_host, http_port = box.daemon.http.address
    # the slow clients from one address (127.0.0.2: loopback is all of 127/8), the HIS from another
    attacker = ("127.0.0.2", 0)
    for _ in range(40):  # half a request line each, then nothing
        _, writer = await asyncio.open_connection(host, port, local_addr=attacker)
        writer.write(b'{"jsonrpc":"2.0","id":1,"meth')
        held.append(writer)
        _, writer = await asyncio.open_connection(http_host, http_port, local_addr=attacker)
        writer.write(b"POST /rpc HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 1000\r\n\r\n{\"jsonrpc\"")
        held.append(writer)
        _, writer = await asyncio.open_connection(http_host, http_port, local_addr=attacker)
        writer.write(b"GET /ws HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgr")  # headers that never end
        held.append(writer)
    for writer in held:
        with contextlib.suppress(ConnectionError):  # past its cap, the address is cut at once
            await writer.drain()
    unix, tcp = await box.unix(), await box.tcp(TOKEN)
    assert (await unix.call("status"))["device_id"] == "test-box"
    assert (await tcp.call("status"))["device_id"] == "test-box"
    async with aiohttp.ClientSession() as http:
        async with http.post(base_url(box) + "/rpc", json={"jsonrpc": "2.0", "id": 1, "method": "status"},
                             headers={"Authorization": "Bearer " + TOKEN}) as response:
            assert response.status == 200
        ws = await http.ws_connect(base_url(box) + "/ws", headers={"Authorization": "Bearer " + TOKEN})
        await ws.send_json({"jsonrpc": "2.0", "id": 1, "method": "status"})
        assert (await ws.receive_json(timeout=5))["result"]["device_id"] == "test-box"
        await ws.close()
    for writer in held:
        writer.close()
