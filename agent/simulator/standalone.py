"""`scanbox simulate wondersgroup|fsjson`: a simulator alone on a port, as a site would point a
test box at it, until SIGINT/SIGTERM. Prints where it listens, its credentials and its people."""

from __future__ import annotations

import asyncio
import signal
import sys
from typing import Any

from agent.simulator.fsjson import FsjsonServer, FsjsonSimulator
from agent.simulator.wondersgroup import WondersgroupServer, WondersgroupSimulator

CONTROL = ("  control: GET /_sim/residents, /_sim/journal; POST /_sim/dynamic {id_card, ttl_s}, "
           "/_sim/faults {mode, count, latency_s}, /_sim/expire_auth")


async def _serve(server: Any, host: str, port: int, latency_ms: float, banner: list[str]) -> None:
    await server.start(host, port)
    server.faults.base_latency_s = latency_ms / 1000
    print("\n".join(line.format(server=server, sim=server.sim) for line in banner))
    print(CONTROL)
    for person in server.sim.people.values():
        print("  %s status %s static QR %s" % (person.people["zjhm"][-4:], person.status, person.static_qr))
    sys.stdout.flush()
    await until_signalled(server)


async def until_signalled(server: Any) -> None:
    """Serve until SIGINT or SIGTERM, then close the server (every `scanbox simulate`)."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.close()


def wondersgroup(host: str, port: int, latency_ms: float = 0.0, encoding: str = "UTF-8") -> None:
    server = WondersgroupServer(WondersgroupSimulator(), encoding=encoding)
    asyncio.run(_serve(server, host, port, latency_ms, [
        "wondersgroup simulator: endpoint {server.endpoint}",
        "  WSDL {server.wsdl_url}",
        "  credentials: orgCode={sim.org_code} userName={sim.user_name} passWord={sim.pass_word}"]))


def fsjson(host: str, port: int, latency_ms: float = 0.0, encoding: str = "UTF-8") -> None:
    server = FsjsonServer(FsjsonSimulator(), encoding=encoding)
    asyncio.run(_serve(server, host, port, latency_ms, [
        "fsjson simulator: endpoint {server.endpoint}",
        "  methods: POST {server.endpoint}/getWorkKey.do, bindCardInfo.do, syncCardInfo.do, getImg.do",
        "  credentials: appId={sim.app_id} appSecret={sim.app_secret}"]))
