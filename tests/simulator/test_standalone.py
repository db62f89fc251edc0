"""`scanbox simulate rhc` runs the simulator alone, as a site would point a test box at it."""

from __future__ import annotations

import asyncio
import re
import signal
import sys

from agent.config import validate
from agent.platforms.base import VerifyRequest
from agent.platforms.rhc import RhcPlatform
from agent.qr import QrKind
from agent.model import now_local
from tests.conftest import config_dict


async def test_the_standalone_simulator_answers_an_adapter_using_its_wsdl(tmp_path):
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "simulate", "rhc", "--listen", "127.0.0.1:0", "--parts", "arg0,arg1",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL)
    try:
        async with asyncio.timeout(20):
            header = (await proc.stdout.readline()).decode()
            wsdl_line = (await proc.stdout.readline()).decode()
            lines = [(await proc.stdout.readline()).decode() for _ in range(7)]
        endpoint = re.search(r"endpoint (\S+)", header).group(1)
        wsdl = re.search(r"WSDL (\S+)", wsdl_line).group(1)
        static_qr = re.search(r"static QR (\S+)", next(line for line in lines if "status 1" in line)).group(1)
        data = config_dict(None, tmp_path)
        data["platform"].update(endpoint=endpoint, wsdl=wsdl)
        config = validate(data)
        platform = RhcPlatform(config.platform, config.site, tmp_path)
        await platform.start()
        try:
            answer = await platform.verify_qr(VerifyRequest(static_qr, QrKind.STATIC, now_local(), "010101", "01"))
        finally:
            await platform.close()
        assert answer.platform_code == "3005" and answer.identity.name
    finally:
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
