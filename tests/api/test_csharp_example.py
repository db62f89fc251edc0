"""examples/ScanboxClient.cs built with Mono's mcs (C# 5, .NET Framework 4.x libraries) and run
with mono against a box whose HTTP listener speaks TLS: what a .NET HIS developer copies must
build and work, with the box's certificate pinned."""

from __future__ import annotations

import asyncio
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from aiohttp import web

from tests.conftest import TOKEN

EXAMPLE = Path(__file__).resolve().parent.parent.parent / "examples" / "ScanboxClient.cs"
# the class libraries it names in its build line (mono-mcs brings System, System.Core, System.Xml)
REFERENCES = ["System.Net.Http.dll", "System.Runtime.Serialization.dll", "System.Xml.Linq.dll"]
RUN_TIMEOUT_S = 120  # a deadline for a hung process, not an expected time

# A HIS's own code on top of ScanboxClient: parameters of every JSON kind out, a result read back
JSON_PROBE = r"""
using System;
using System.Collections.Generic;
using System.Linq;
using System.Net.Http;
using System.Xml.Linq;

public static class JsonProbe
{
    public static int Main(string[] args)
    {
        using (var box = new ScanboxClient(args[0], "probe-token"))
        {
            XElement result = box.CallAsync("echo", new Dictionary<string, object> {
                { "hid:front", 1 }, { "text", "张三 \"q\" \\ /\n" }, { "none", null }, { "ratio", 1.5 },
                { "list", new object[] { 1L, "a", null, new Dictionary<string, object>() } },
                { "empty", "" }, { "flag", true }, { "big", 9007199254740993L } }).GetAwaiter().GetResult();
            Console.WriteLine((string)result.Element("name"));
            XElement front = result.Elements().Single(e => (string)e.Attribute("item") == "hid:front");
            Console.WriteLine(ScanboxClient.IsNull(front));
            Console.WriteLine("{0} {1} {2}", (int)result.Element("count"), (bool)result.Element("ok"),
                              ScanboxClient.IsNull(result.Element("absent")));
            try
            {
                box.CallAsync("broken").GetAwaiter().GetResult();
            }
            catch (HttpRequestException e)
            {
                Console.WriteLine(e.Message);
            }
        }
        return 0;
    }
}
"""


def build(folder: Path, name: str, *sources: Path, main: str | None = None) -> Path:
    """Built as the Windows csc.exe would take it: C# 5, and no warnings."""
    exe = folder / name
    command = ["mcs", "-langversion:5", "-warn:4", "-warnaserror+", "-out:%s" % exe]
    command += ["-r:%s" % reference for reference in REFERENCES]
    if main:
        command.append("-main:%s" % main)
    done = subprocess.run(command + [str(source) for source in sources], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    return exe


@pytest.fixture(scope="module")
def built(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    for tool in ("mcs", "mono"):
        assert shutil.which(tool), "%s is not installed (bootstrap.sh installs it)" % tool
    folder = tmp_path_factory.mktemp("csharp")
    build(folder, "ScanboxClient.exe", EXAMPLE)
    probe = folder / "JsonProbe.cs"
    probe.write_text(JSON_PROBE, encoding="utf-8")
    build(folder, "JsonProbe.exe", EXAMPLE, probe, main="JsonProbe")
    # a HOME of its own: Mono's certificate stores start empty whatever this machine trusts
    return folder, dict(os.environ, HOME=str(folder), LC_ALL="C.UTF-8")


@pytest.fixture
def client(built) -> tuple[list[str], dict[str, str]]:
    """How to run the example's own program."""
    folder, env = built
    return ["mono", str(folder / "ScanboxClient.exe")], env


async def start(client: tuple[list[str], dict[str, str]], *args: str) -> asyncio.subprocess.Process:
    command, env = client
    return await asyncio.create_subprocess_exec(*command, *args, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.PIPE)


async def finish(process: asyncio.subprocess.Process) -> tuple[int, str, str]:
    out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT_S)
    assert process.returncode is not None
    return process.returncode, out.decode("utf-8"), err.decode("utf-8")


async def run(client: tuple[list[str], dict[str, str]], *args: str) -> tuple[int, str, str]:
    return await finish(await start(client, *args))


async def test_csharp_client_reads_a_card_over_tls_with_the_fingerprint_pinned(box, client):
    await box.start(api={"http": "127.0.0.1:0", "tls": "on"})
    base = "https://%s:%d" % box.daemon.http.address
    process = await start(client, base, TOKEN, box.daemon.tls_fingerprint, "30")
    assert process.stdout is not None
    # status answered over TLS, then the prompt; read_card is sent right after it
    status = await asyncio.wait_for(process.stdout.readline(), RUN_TIMEOUT_S)
    assert status.decode("utf-8").startswith("box test-box, platform reachable:"), status
    prompt = await asyncio.wait_for(process.stdout.readline(), RUN_TIMEOUT_S)
    assert "请出示电子健康卡" in prompt.decode("utf-8"), prompt
    await box.waiting(1)
    box.scan(box.resident().static_qr)
    code, out, err = await finish(process)
    assert code == 0, err
    assert out.strip() == "%s %s" % (box.resident().name, box.resident().id_card)


async def test_csharp_client_refuses_another_certificate_before_sending_the_token(box, client):
    await box.start(sources={}, api={"http": "127.0.0.1:0", "tls": "on"})
    base = "https://%s:%d" % box.daemon.http.address
    fingerprint = box.daemon.tls_fingerprint
    # a token the box would count as a failed login, had it ever seen one
    guess = "guess-" + TOKEN
    # another box, or someone in between: refused in the handshake, and the message says what was seen
    code, out, err = await run(client, base, guess, "00:" * 31 + "00")
    assert code == 1 and out == ""
    assert "cannot talk to the box: the box's certificate is not the pinned one (its SHA-256 is %s)" % fingerprint \
        in err, err
    # without a pin the system's CAs decide, and none of them signed the box's own certificate
    code, out, err = await run(client, base, guess)
    assert code == 1 and out == ""
    assert "cannot talk to the box:" in err and "pinned" not in err, err
    assert box.daemon.api.guard.failures("127.0.0.1") == 0  # no token was ever sent
    # the same token behind the right pin reaches the box, which refuses it: UNAUTHORIZED on a 401
    code, out, err = await run(client, base, guess, fingerprint)
    assert code == 1 and out == ""
    assert "(UNAUTHORIZED): unknown token" in err, err
    assert box.daemon.api.guard.failures("127.0.0.1") == 1


async def test_csharp_client_raises_the_reason_of_an_error_answer(box, client):
    await box.start(api={"http": "127.0.0.1:0", "tls": "on"})
    base = "https://%s:%d" % box.daemon.http.address
    # nobody scans: read_card ends with the box's TIMEOUT error, an HTTP 200 answer
    code, out, err = await run(client, base, TOKEN, box.daemon.tls_fingerprint, "1")
    assert code == 1
    assert out.startswith("box test-box, platform reachable:")
    assert err.startswith("error -32000 (TIMEOUT): "), err


async def test_csharp_client_writes_and_reads_any_json(built: tuple[Path, dict[str, str]]) -> None:
    """What the box's answers do not show: each kind of JSON value out and back, names that are
    not XML names, and an answer that is not JSON. An echo server stands in for the box."""
    seen: list[tuple[dict[str, str], object]] = []

    async def rpc(request: web.Request) -> web.Response:
        message = await request.json()
        seen.append((dict(request.headers), message))
        if message["method"] == "broken":
            return web.Response(status=502, text="<html>bad gateway</html>", content_type="text/html")
        return web.json_response({"jsonrpc": "2.0", "id": message["id"], "result": {
            "name": "张三", "hid:front": None, "count": 3, "ok": True}})

    app = web.Application()
    app.router.add_post("/rpc", rpc)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        folder, env = built
        process = await asyncio.create_subprocess_exec(
            "mono", str(folder / "JsonProbe.exe"), "http://127.0.0.1:%d" % runner.addresses[0][1], env=env,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        code, out, err = await finish(process)
    finally:
        await runner.cleanup()
    assert code == 0, err
    headers, message = seen[0]
    assert headers["Authorization"] == "Bearer probe-token"
    assert headers["Content-Type"].startswith("application/json")
    assert message == {"jsonrpc": "2.0", "id": 1, "method": "echo", "params": {
        "hid:front": 1, "text": '张三 "q" \\ /\n', "none": None, "ratio": 1.5, "list": [1, "a", None, {}],
        "empty": "", "flag": True, "big": 9007199254740993}}
    assert seen[1][1] == {"jsonrpc": "2.0", "id": 2, "method": "broken", "params": {}}
    lines = out.splitlines()
    assert lines[:3] == ["张三", "True", "3 True True"]
    assert lines[3].startswith("HTTP 502 without a JSON-RPC answer: "), lines
