"""Throughput and latency of the HIS API per transport, and the memory of many WebSockets.

Runs the RHC simulator (no added latency) and `scanbox run` as separate processes. For each
transport (TCP, Unix socket, HTTP POST /rpc) and method (`status`, `verify_qr` of a static code,
which is a real RHC_E0003 round trip to the simulator), 50 clients call back to back; it prints
requests per second and latency percentiles. Then it opens 200 WebSockets and prints the
daemon's RSS before and after. The clients share one process (and the machine's cores with the
daemon and the simulator), so the figures are a floor, not the daemon's ceiling.

    .venv/bin/python bench/bench_api.py [--clients 50] [--requests 100] [--websockets 200]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import rss_kib  # noqa: E402
from common import compile_like_an_install, free_port, percentile, start_daemon, start_simulator, stop  # noqa: E402

from agent.simulator.rhc import default_residents  # noqa: E402
from tests.conftest import config_dict, write_config  # noqa: E402

TOKEN = "bench-token-0123456789"


async def main(clients: int, requests: int, websockets: int) -> None:
    compile_like_an_install()
    children: list[subprocess.Popen] = []
    try:
        await run(clients, requests, websockets, children)
    finally:
        for child in reversed(children):
            stop(child)


async def run(clients: int, requests: int, websockets: int, children: list[subprocess.Popen]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="scanbox-bench-api-"))
    sim_port, tcp_port, http_port = free_port(), free_port(), free_port()
    children.append(start_simulator(sim_port))
    data = config_dict(None, tmp, device={"id": "bench", "log_level": "warning"}, sources={}, api={
        "tcp": "127.0.0.1:%d" % tcp_port, "http": "127.0.0.1:%d" % http_port,
        "max_clients": max(256, websockets + clients + 8), "rate_per_s": 1e5, "rate_burst": 100000,
        # every bench client is on 127.0.0.1 and connects before it authenticates
        "max_unauthenticated_per_address": max(8, websockets + clients + 8),
        "clients": {"bench": {"token": TOKEN, "scopes": ["read"]}}})
    data["platform"]["endpoint"] = "http://127.0.0.1:%d/healthCard/services/elecHealthCardWebSevice" % sim_port
    write_config(tmp, data)
    daemon = start_daemon(tmp)
    children.append(daemon)

    codes = itertools.cycle([r.static_qr for r in default_residents() if r.status == "1"])
    params = {"status": lambda: {}, "verify_qr": lambda: {"qr": next(codes)}}
    print("scanbox API benchmark: %d concurrent clients x %d requests each, simulator without latency"
          % (clients, requests))
    print("  %-10s %-10s %10s %9s %9s %9s" % ("transport", "method", "req/s", "p50 ms", "p99 ms", "max ms"))
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=clients)) as http:
        openers = {
            "tcp": lambda: stream_client(asyncio.open_connection("127.0.0.1", tcp_port, limit=1 << 22), True),
            "unix": lambda: stream_client(asyncio.open_unix_connection(str(tmp / "api.sock"), limit=1 << 22), False),
            "http": lambda: http_client(http, "http://127.0.0.1:%d/rpc" % http_port),
        }
        await measure_round(openers["unix"], "verify_qr", params, clients, 5)  # warm up: WSDL, connections
        for method in ("status", "verify_qr"):
            for transport in ("tcp", "unix", "http"):
                latencies, elapsed = await measure_round(openers[transport], method, params, clients, requests)
                print("  %-10s %-10s %10.0f %9.2f %9.2f %9.2f" % (
                    transport, method, len(latencies) / elapsed, percentile(latencies, 50),
                    percentile(latencies, 99), max(latencies)))

    # each WebSocket holds its connection: a session without a connection limit
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as http:
        before = rss_kib(daemon.pid)
        open_ws = []
        for _ in range(websockets):
            ws = await http.ws_connect("http://127.0.0.1:%d/ws" % http_port,
                                       headers={"Authorization": "Bearer " + TOKEN})
            await ws.send_json({"jsonrpc": "2.0", "id": 1, "method": "subscribe", "params": {}})
            open_ws.append(ws)
        for ws in open_ws:
            await ws.receive_json(timeout=30)
        after = rss_kib(daemon.pid)
        print("  RSS: %.1f MiB with no WebSocket, %.1f MiB with %d subscribed WebSockets open (%.1f KiB each)"
              % (before / 1024, after / 1024, websockets, (after - before) / websockets))
        for ws in open_ws:
            await ws.close()


Call = Callable[[str, dict], Awaitable[dict]]


async def measure_round(open_client: Callable[[], Awaitable[tuple[Call, Callable[[], Awaitable[None]]]]],
                        method: str, params: dict, clients: int, requests: int) -> tuple[list[float], float]:
    opened = [await open_client() for _ in range(clients)]
    latencies: list[float] = []

    async def worker(call: Call) -> None:
        for _ in range(requests):
            t0 = time.perf_counter()
            response = await call(method, params[method]())
            latencies.append((time.perf_counter() - t0) * 1000)
            if "result" not in response:
                raise RuntimeError("%s failed: %s" % (method, response))

    started = time.perf_counter()
    await asyncio.gather(*(worker(call) for call, _ in opened))
    elapsed = time.perf_counter() - started
    for _, close in opened:
        await close()
    return latencies, elapsed


async def stream_client(connecting, auth: bool):
    reader, writer = await connecting
    ids = itertools.count(1)

    async def call(method: str, params: dict) -> dict:
        id_ = next(ids)
        writer.write(json.dumps({"jsonrpc": "2.0", "id": id_, "method": method, "params": params}).encode() + b"\n")
        return json.loads(await reader.readline())

    async def close() -> None:
        writer.close()

    if auth:
        await call("auth", {"token": TOKEN})
    return call, close


async def http_client(session: aiohttp.ClientSession, url: str):
    ids = itertools.count(1)
    headers = {"Authorization": "Bearer " + TOKEN}

    async def call(method: str, params: dict) -> dict:
        body = {"jsonrpc": "2.0", "id": next(ids), "method": method, "params": params}
        async with session.post(url, json=body, headers=headers) as response:
            return await response.json()

    async def close() -> None:
        pass

    return call, close


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=100)
    parser.add_argument("--websockets", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.clients, args.requests, args.websockets))
