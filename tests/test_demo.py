"""`scanbox demo`, the README's first command, as a user drives it: paste a code, see the result,
read it over the API."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from pathlib import Path

import httpx

from agent.simulator.rhc import default_residents
from tests.conftest import RpcClient


async def read_until(stream: asyncio.StreamReader, pattern: str, timeout: float = 20) -> str:
    seen: list[str] = []
    async with asyncio.timeout(timeout):
        while True:
            line = (await stream.readline()).decode("utf-8")
            if not line:
                raise AssertionError("demo ended before %r; output:\n%s" % (pattern, "".join(seen)))
            seen.append(line)
            if re.search(pattern, line):
                return line


async def test_demo_verifies_a_pasted_code_and_serves_the_api():
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "demo", "--tcp", "127.0.0.1:0", "--http", "127.0.0.1:0",
        stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        socket_line = await read_until(proc.stdout, r"^\s+unix socket\s+")
        state_dir = Path(socket_line.split()[-1]).parent
        assert state_dir.name.startswith("scanbox-demo-")
        tcp_line = await read_until(proc.stdout, r"^\s+tcp\s+127\.0\.0\.1:\d+")
        port = int(re.search(r"127\.0\.0\.1:(\d+)", tcp_line).group(1))
        http_line = await read_until(proc.stdout, r"^\s+http\s+POST http://127\.0\.0\.1:\d+/rpc")
        rpc_url = re.search(r"(http://127\.0\.0\.1:\d+/rpc)", http_line).group(1)
        token = re.search(r"bearer token (\S+)\)", http_line).group(1)
        await read_until(proc.stdout, "Ctrl-C stops the demo")
        resident = default_residents()[0]  # the demo's simulator has the same residents

        client = await RpcClient.tcp("127.0.0.1", port)  # localhost needs no token in the demo
        pending = asyncio.get_running_loop().create_task(client.request("read_card", {"timeout_s": 15}, timeout=20))
        await client.call("status")  # the read_card is registered before this is answered
        proc.stdin.write(resident.static_qr.encode() + b"\n")
        await proc.stdin.drain()
        line = await read_until(proc.stdout, "verified")
        assert "张*明" in line and "630102********" in line and resident.id_card not in line
        result = (await pending)["result"]
        assert result["identity"]["name"] == resident.name  # full values to the API client
        await client.close()

        # the banner's HTTP endpoint and token work as printed; without the token they do not
        async with httpx.AsyncClient() as http:
            call = {"jsonrpc": "2.0", "id": 1, "method": "status"}
            answer = await http.post(rpc_url, json=call, headers={"Authorization": "Bearer " + token})
            assert answer.status_code == 200 and answer.json()["result"]["platform"]["kind"] == "rhc"
            assert (await http.post(rpc_url, json=call)).status_code == 401

        proc.stdin.write(b"https://example.com/ticket/42\n")  # the banner's own sample
        await proc.stdin.drain()
        assert "QR_UNKNOWN" in await read_until(proc.stdout, "✘")

        # Ctrl-C twice (or `timeout`, which signals the whole group): still a clean stop, and
        # the demo's temporary state (an outbox with personal data) is removed
        proc.send_signal(signal.SIGINT)
        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
        assert not state_dir.exists()
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(15):
            code = await proc.wait()
    assert code == 0
