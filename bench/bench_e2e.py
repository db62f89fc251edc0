"""End-to-end overhead of the daemon: scanner terminator byte -> HIS receives the answer.

Runs the RHC simulator and `scanbox run` as separate processes (as on a box, where the platform
is elsewhere), plays the scanner through a pty and the HIS over the Unix socket. For each scan a
read_card waits, the payload is written, the clock starts at the terminator byte and stops when
the answer arrives. The simulator reports the time each request spent inside it; the daemon's
own overhead is the end-to-end time minus that.

    .venv/bin/python bench/bench_e2e.py [--scans 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import tty
import urllib.request
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import free_port, percentile, start_simulator, stop  # noqa: E402

from agent.simulator.rhc import default_residents  # noqa: E402
from tests.conftest import config_dict, write_config  # noqa: E402

def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


async def main(scans: int) -> None:
    children: list[subprocess.Popen] = []
    try:
        await run(scans, children)
    finally:
        for child in reversed(children):
            stop(child)


async def run(scans: int, children: list[subprocess.Popen]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="scanbox-bench-"))
    port = free_port()
    sim = start_simulator(port)
    children.append(sim)

    master, slave = os.openpty()
    tty.setraw(master)
    tty_path = os.ttyname(slave)
    os.close(slave)
    data = config_dict(None, tmp, device={"id": "bench", "log_level": "warning"},
                       sources={"counter": {"driver": "serial_scanner", "port": tty_path}})
    data["platform"]["endpoint"] = "http://127.0.0.1:%d/healthCard/services/elecHealthCardWebSevice" % port
    write_config(tmp, data)
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify.sock"))
    started = time.perf_counter()
    daemon = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(tmp / "scanbox.toml"),
                               "--secrets", str(tmp / "secrets.toml")],
                              env={**os.environ, "NOTIFY_SOCKET": str(tmp / "notify.sock")})
    children.append(daemon)
    notify.settimeout(30)
    while b"READY=1" not in notify.recv(4096):
        pass
    ready_s = time.perf_counter() - started

    reader, writer = await asyncio.open_unix_connection(str(tmp / "api.sock"))
    codes = [r.static_qr for r in default_residents() if r.status == "1"]
    next_id = 0

    async def request(method: str, params: dict) -> dict:
        nonlocal next_id
        next_id += 1
        writer.write(json.dumps({"jsonrpc": "2.0", "id": next_id, "method": method, "params": params}).encode() + b"\n")
        await writer.drain()
        return json.loads(await reader.readline())

    # READY=1 means the drivers started, not that the scanner is open (and pyserial flushes input
    # on open): wait for the source to connect before scanning
    events_reader, events_writer = await asyncio.open_unix_connection(str(tmp / "api.sock"))
    events_writer.write(b'{"jsonrpc":"2.0","id":1,"method":"subscribe","params":{"events":["status"]}}\n')
    await events_reader.readline()
    status = await request("status", {})
    if not status["result"]["sources"] or not status["result"]["sources"][0]["connected"]:
        while '"connected":true' not in (await events_reader.readline()).decode():
            pass
    events_writer.close()

    # warm up: the first call loads the WSDL and opens the platform connection
    for i in range(20):
        writer.write(json.dumps({"jsonrpc": "2.0", "id": "w", "method": "read_card",
                                 "params": {"timeout_s": 10}}).encode() + b"\n")
        await writer.drain()
        await request("status", {})
        os.write(master, codes[i % len(codes)].encode() + b"\r")
        assert json.loads(await reader.readline())["result"]["verification"]["ok"]
    urllib.request.urlopen("http://127.0.0.1:%d/_sim/service_ms" % port).read()
    service_before = len(json.loads(urllib.request.urlopen("http://127.0.0.1:%d/_sim/service_ms" % port).read()))

    e2e: list[float] = []
    for i in range(scans):
        writer.write(json.dumps({"jsonrpc": "2.0", "id": "r%d" % i, "method": "read_card",
                                 "params": {"timeout_s": 10}}).encode() + b"\n")
        await writer.drain()
        await request("status", {})  # answered only after the read_card is registered
        os.write(master, codes[i % len(codes)].encode())
        t0 = time.perf_counter()
        os.write(master, b"\r")
        line = await reader.readline()
        e2e.append((time.perf_counter() - t0) * 1000)
        response = json.loads(line)
        assert response["result"]["verification"]["ok"], response
    rss = rss_kib(daemon.pid)
    service = json.loads(urllib.request.urlopen("http://127.0.0.1:%d/_sim/service_ms" % port).read())[service_before:]
    writer.close()
    own = [t - s for t, s in zip(e2e, service, strict=False)] if len(service) == len(e2e) else []
    report(scans, e2e, service, own, ready_s, rss)


def report(scans, e2e, service, own, ready_s, rss) -> None:
    print("scanbox end-to-end benchmark: %d scans, serial pty -> RHC_E0003 at the simulator -> HIS on the Unix socket"
          % scans)
    print("  terminator byte -> answer     p50 %6.2f ms   p99 %6.2f ms   max %6.2f ms"
          % (percentile(e2e, 50), percentile(e2e, 99), max(e2e)))
    print("  time inside the simulator     p50 %6.2f ms   p99 %6.2f ms"
          % (percentile(service, 50), percentile(service, 99)))
    if own:
        print("  daemon's own overhead         p50 %6.2f ms   p99 %6.2f ms   (target p50 <= 5, p99 <= 20)"
              % (percentile(own, 50), percentile(own, 99)))
    print("  startup to READY=1            %6.0f ms" % (ready_s * 1000))
    print("  daemon RSS after %d scans   %6.1f MiB" % (scans, rss / 1024))
    print("  mean %.2f ms, stdev %.2f ms" % (statistics.mean(e2e), statistics.pstdev(e2e)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--scans", type=int, default=1000)
    asyncio.run(main(parser.parse_args().scans))
