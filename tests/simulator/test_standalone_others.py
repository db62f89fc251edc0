"""`scanbox simulate wondersgroup` and `scanbox simulate fsjson` run alone, as a site would point
a test box at them; an adapter configured from what they print gets answers."""

from __future__ import annotations

import asyncio
import re
import signal
import sys
from datetime import datetime

import pytest

from agent.config import validate
from agent.platforms import create
from agent.platforms.base import VerifyRequest
from agent.qr import QrKind
from tests.conftest import config_dict


async def run_simulator(platform: str, *extra: str) -> tuple[asyncio.subprocess.Process, list[str]]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "simulate", platform, "--listen", "127.0.0.1:0", *extra,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    async with asyncio.timeout(20):
        lines = [(await proc.stdout.readline()).decode() for _ in range(9)]
    return proc, lines


async def stop(proc: asyncio.subprocess.Process) -> None:
    proc.send_signal(signal.SIGTERM)
    async with asyncio.timeout(10):
        assert await proc.wait() == 0


def value(lines: list[str], pattern: str) -> str:
    return next(m.group(1) for line in lines if (m := re.search(pattern, line)))


@pytest.mark.parametrize("encoding", ["UTF-8", "GBK"])
async def test_standalone_wondersgroup(tmp_path, encoding):
    proc, lines = await run_simulator("wondersgroup", "--encoding", encoding)
    try:
        data = config_dict(None, tmp_path)
        credentials = {"org_code": value(lines, r"orgCode=(\S+)"), "user_name": value(lines, r"userName=(\S+)"),
                       "pass_word": value(lines, r"passWord=(\S+)")}
        data["platform"] = {"kind": "wondersgroup", "endpoint": value(lines, r"endpoint (\S+)"),
                            "wsdl": value(lines, r"WSDL (\S+)"), "wondersgroup": credentials}
        platform = create(validate(data), tmp_path)
        await platform.start()
        try:
            qr = value([line for line in lines if "status 1" in line], r"static QR (\S+)")
            answer = await platform.verify_qr(VerifyRequest(qr, QrKind.STATIC, datetime.now(), "010101", "01"))
            assert answer.platform_code == "10000" and answer.identity.name == "袁宇阳"
        finally:
            await platform.close()
    finally:
        await stop(proc)


async def test_standalone_fsjson(tmp_path):
    proc, lines = await run_simulator("fsjson")
    try:
        data = config_dict(None, tmp_path)
        data["platform"] = {"kind": "fsjson", "endpoint": value(lines, r"endpoint (\S+)"), "fsjson": {
            "app_id": value(lines, r"appId=(\S+)"), "app_secret": value(lines, r"appSecret=(\S+)")}}
        platform = create(validate(data), tmp_path)
        await platform.start()
        try:
            qr = value([line for line in lines if "status 1" in line], r"static QR (\S+)")
            answer = await platform.call("getImg", {"ehealthCardId": qr.removesuffix(":1")})
            assert answer["resultCode"] == "10000" and answer["data"]["QrCode"].startswith(qr[:64])
        finally:
            await platform.close()
    finally:
        await stop(proc)
