"""The cost of GET /metrics: daemon CPU and bytes per scrape, and the scrape's latency.

Runs the RHC simulator and `scanbox run` (two serial scanners on ptys, the HTTP API, a metrics
port) as separate processes, verifies codes over the API so every histogram and counter has
series, then scrapes back to back as a Prometheus server would (one at a time) and reads the
daemon's CPU time from /proc before and after. Figures print beside their goals: on a Pi 4 a
scrape every 30 s should cost well under 1% of one core.

    .venv/bin/python bench/bench_metrics.py [--scrapes 300] [--verifications 200]
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import itertools
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_e2e import rss_kib  # noqa: E402
from common import compile_like_an_install, free_port, percentile, start_daemon, start_simulator, stop  # noqa: E402

from agent.simulator.rhc import default_residents  # noqa: E402
from tests.conftest import PtyScanner, config_dict, write_config  # noqa: E402

TOKEN = "bench-token-0123456789"
METRICS_TOKEN = "bench-metrics-token-0123"
# goals on this class of machine (a Pi 4 is about 3x slower: see docs/fleet.md)
CPU_MS_GOAL = 15.0
BYTES_GOAL = 32 * 1024
LATENCY_P99_GOAL_MS = 50.0


def cpu_seconds(pid: int) -> float:
    with open("/proc/%d/stat" % pid) as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def main(scrapes: int, verifications: int) -> None:
    compile_like_an_install()
    children: list[subprocess.Popen] = []
    try:
        await run(scrapes, verifications, children)
    finally:
        for child in reversed(children):
            stop(child)


async def run(scrapes: int, verifications: int, children: list[subprocess.Popen]) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="scanbox-bench-metrics-"))
    sim_port, http_port, metrics_port = free_port(), free_port(), free_port()
    children.append(start_simulator(sim_port))
    for directory in ("a", "b"):
        (tmp / directory).mkdir(exist_ok=True)
    scanners = [PtyScanner(tmp / name) for name in ("a", "b")]
    data = config_dict(None, tmp, device={"id": "bench", "log_level": "warning"}, api={
        "http": "127.0.0.1:%d" % http_port, "rate_per_s": 1e5, "rate_burst": 100000,
        "clients": {"bench": {"token": TOKEN, "scopes": ["read"]},
                    "prometheus": {"token": METRICS_TOKEN, "scopes": ["metrics"]}}},
        metrics={"listen": "127.0.0.1:%d" % metrics_port, "labels": {"district": "bench", "site": "counter-1"}},
        sources={"front": {"driver": "serial_scanner", "port": str(scanners[0].path)},
                 "back": {"driver": "serial_scanner", "port": str(scanners[1].path)}})
    data["platform"]["endpoint"] = "http://127.0.0.1:%d/healthCard/services/elecHealthCardWebSevice" % sim_port
    write_config(tmp, data)
    daemon = start_daemon(tmp)
    children.append(daemon)

    codes = itertools.cycle([r.static_qr for r in default_residents()] + ["not-a-health-code-%d" % i for i in range(5)])
    async with aiohttp.ClientSession() as http:
        for _ in range(verifications):  # series for every outcome, histogram and platform code
            body = {"jsonrpc": "2.0", "id": 1, "method": "verify_qr", "params": {"qr": next(codes)}}
            async with http.post("http://127.0.0.1:%d/rpc" % http_port, json=body,
                                 headers={"Authorization": "Bearer " + TOKEN}) as response:
                await response.read()
        for scanner in scanners:
            scanner.scan(default_residents()[0].static_qr)

        url = "http://127.0.0.1:%d/metrics" % metrics_port
        headers = {"Authorization": "Bearer " + METRICS_TOKEN}
        for _ in range(10):  # warm up
            async with http.get(url, headers=headers) as response:
                await response.read()
        latencies: list[float] = []
        size = 0
        text = b""
        cpu_before, wall_before = cpu_seconds(daemon.pid), time.perf_counter()
        for _ in range(scrapes):
            t0 = time.perf_counter()
            async with http.get(url, headers=headers) as response:
                text = await response.read()
            latencies.append((time.perf_counter() - t0) * 1000)
            size = len(text)
        cpu = cpu_seconds(daemon.pid) - cpu_before
        wall = time.perf_counter() - wall_before
        # the same time with nobody scraping: the daemon's own idle cost, subtracted
        idle_before = cpu_seconds(daemon.pid)
        await asyncio.sleep(min(wall, 5.0))
        idle = (cpu_seconds(daemon.pid) - idle_before) * wall / min(wall, 5.0)

    series = sum(1 for line in text.decode().splitlines() if line and not line.startswith("#"))
    cpu_ms = max(cpu - idle, 0.0) / scrapes * 1000
    print("scanbox /metrics benchmark: %d scrapes back to back, %d series (%d verifications before)"
          % (scrapes, series, verifications))
    print("  %-34s %10s   %s" % ("", "measured", "goal"))
    print("  %-34s %10.2f   <= %.0f" % ("daemon CPU per scrape (ms)", cpu_ms, CPU_MS_GOAL))
    print("  %-34s %10d   <= %d" % ("bytes per scrape", size, BYTES_GOAL))
    print("  %-34s %10d" % ("bytes per scrape, gzip", len(gzip.compress(text))))
    print("  %-34s %10.2f" % ("scrape latency p50 (ms)", percentile(latencies, 50)))
    print("  %-34s %10.2f   <= %.0f" % ("scrape latency p99 (ms)", percentile(latencies, 99), LATENCY_P99_GOAL_MS))
    print("  %-34s %10.3f" % ("CPU share at a 30 s interval (%)", cpu_ms / 30000 * 100))
    print("  %-34s %10.1f" % ("daemon RSS (MiB)", rss_kib(daemon.pid) / 1024))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--scrapes", type=int, default=300)
    parser.add_argument("--verifications", type=int, default=200)
    args = parser.parse_args()
    asyncio.run(main(args.scrapes, args.verifications))
