"""End-to-end overhead of the daemon: scanner terminator byte -> HIS receives the answer, beside
the floor (bench_floor.py: a minimal asyncio + aiohttp + lxml + sqlite daemon doing the same work).

Runs the RHC simulator, `scanbox run` and the floor daemon as separate processes (as on a box,
where the platform is elsewhere), plays each one's scanner through its own pty and the HIS over
its Unix socket. For each scan a read_card waits, the payload is written, the clock starts at the
terminator byte and stops when the answer arrives. The simulator reports the time each request
spent inside it; a daemon's own overhead is the end-to-end time minus that. Daemon CPU is
utime+stime from /proc/PID/stat over the measured scans.

The two are interleaved so that the machine's drift hits both: start-ups alternate, and the scans
run in alternating batches against both daemons, which run side by side. Issue 17's goals are
ratios to the floor, printed beside them.

    .venv/bin/python bench/bench_e2e.py [--scans 1000] [--batch 50] [--starts 5] [--profile FILE]

`--profile FILE` runs scanbox under cProfile (its figures are then not comparable: the profiler
costs more than the work) and writes the profile of the whole run to FILE when it stops; the
measured scans' share is what `python -m pstats FILE` shows once warm-up is small beside it.
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

import bench_floor  # noqa: E402
from common import compile_like_an_install, free_port, percentile, start_simulator, stop  # noqa: E402

from agent.config import validate  # noqa: E402
from agent.platforms.rhc import RhcPlatform  # noqa: E402
from agent.simulator.rhc import default_residents  # noqa: E402
from tests.conftest import config_dict, write_config  # noqa: E402

TICK_MS = 1000 / os.sysconf("SC_CLK_TCK")


def rss_kib(pid: int) -> int:
    with open("/proc/%d/status" % pid) as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def cpu_ms(pid: int) -> float:
    with open("/proc/%d/stat" % pid) as fh:
        fields = fh.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) * TICK_MS  # utime, stime


class Contender:
    """One daemon under test: its pty, its config, its process and its API connection."""

    def __init__(self, name: str, tmp: Path) -> None:
        self.name = name
        self.tmp = tmp
        tmp.mkdir()
        self.master, slave = os.openpty()
        tty.setraw(self.master)
        self.tty_path = os.ttyname(slave)
        os.close(slave)
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(tmp / "notify.sock"))
        self.notify.settimeout(60)
        self.proc: subprocess.Popen | None = None
        self.rss = 0
        self.rss_warm = 0  # after the warm-up's 20 scans: what the measured scans add is growth
        self.argv: list[str] = []
        self.ready_ms: list[float] = []
        self.ready_cpu_ms: list[float] = []
        self.e2e: list[float] = []
        self.own: list[float] = []
        self.service: list[float] = []
        self.cpu = 0.0
        self.scans = 0
        self.next_id = 0

    def start(self) -> None:
        started = time.perf_counter()
        self.proc = subprocess.Popen(self.argv, env={**os.environ, "NOTIFY_SOCKET": str(self.tmp / "notify.sock")})
        while b"READY=1" not in self.notify.recv(4096):
            pass
        self.ready_ms.append((time.perf_counter() - started) * 1000)
        self.ready_cpu_ms.append(cpu_ms(self.proc.pid))

    def stop(self) -> None:
        if self.proc is not None:
            stop(self.proc)

    async def connect(self) -> None:
        self.reader, self.writer = await asyncio.open_unix_connection(str(self.tmp / "api.sock"))
        # READY=1 means the drivers started, not that the scanner is open (and pyserial flushes
        # input on open): wait for the source to connect before scanning
        events_reader, events_writer = await asyncio.open_unix_connection(str(self.tmp / "api.sock"))
        events_writer.write(b'{"jsonrpc":"2.0","id":1,"method":"subscribe","params":{"events":["status"]}}\n')
        await events_writer.drain()
        status = await self.request("status", {})
        if not status["result"]["sources"] or not status["result"]["sources"][0]["connected"]:
            await events_reader.readline()
            while '"connected":true' not in (await events_reader.readline()).decode():
                pass
        events_writer.close()

    async def request(self, method: str, params: dict) -> dict:
        self.next_id += 1
        self.writer.write(json.dumps({"jsonrpc": "2.0", "id": self.next_id, "method": method,
                                      "params": params}).encode() + b"\n")
        await self.writer.drain()
        return json.loads(await self.reader.readline())

    async def scan(self, code: str) -> float:
        self.writer.write(json.dumps({"jsonrpc": "2.0", "id": "r", "method": "read_card",
                                      "params": {"timeout_s": 10}}).encode() + b"\n")
        await self.writer.drain()
        await self.request("status", {})  # answered only after the read_card is registered
        os.write(self.master, code.encode())
        t0 = time.perf_counter()
        os.write(self.master, b"\r")
        line = await self.reader.readline()
        elapsed = (time.perf_counter() - t0) * 1000
        response = json.loads(line)
        assert response["result"]["verification"]["ok"], (self.name, response)
        return elapsed

    @property
    def pid(self) -> int:
        assert self.proc is not None, "%s is not running" % self.name
        return self.proc.pid

    async def batch(self, codes: list[str], n: int, sim_url: str) -> None:
        before_service = len(service_ms(sim_url))
        before_cpu = cpu_ms(self.pid)
        e2e = []
        for _ in range(n):
            e2e.append(await self.scan(codes[self.scans % len(codes)]))
            self.scans += 1
        self.cpu += cpu_ms(self.pid) - before_cpu
        service = service_ms(sim_url)[before_service:]
        if len(service) != len(e2e):
            raise RuntimeError("%s: %d scans but %d requests at the simulator" % (self.name, len(e2e), len(service)))
        self.e2e += e2e
        self.service += service
        self.own += [t - s for t, s in zip(e2e, service, strict=True)]


def service_ms(sim_url: str) -> list[float]:
    return json.loads(urllib.request.urlopen(sim_url + "/_sim/service_ms").read())


async def main(scans: int, batch: int, starts: int, profile: str | None = None) -> None:
    compile_like_an_install()
    children: list[subprocess.Popen] = []
    contenders: list[Contender] = []
    try:
        await run(scans, batch, starts, children, contenders, profile)
    finally:
        for contender in contenders:
            contender.stop()
        for child in reversed(children):
            stop(child)


async def run(scans: int, batch: int, starts: int, children: list[subprocess.Popen],
              contenders: list[Contender], profile: str | None = None) -> None:
    tmp = Path(tempfile.mkdtemp(prefix="scanbox-bench-"))
    port = free_port()
    sim = start_simulator(port)
    children.append(sim)
    sim_url = "http://127.0.0.1:%d" % port
    endpoint = sim_url + "/healthCard/services/elecHealthCardWebSevice"

    scanbox = Contender("scanbox", tmp / "scanbox")
    data = config_dict(None, scanbox.tmp, device={"id": "bench", "log_level": "warning"},
                       sources={"counter": {"driver": "serial_scanner", "port": scanbox.tty_path}})
    data["platform"]["endpoint"] = endpoint
    write_config(scanbox.tmp, data)
    profiler = ["-m", "cProfile", "-o", str(Path(profile).resolve())] if profile else []
    scanbox.argv = [sys.executable, *profiler, "-m", "agent", "run", "--config", str(scanbox.tmp / "scanbox.toml"),
                    "--secrets", str(scanbox.tmp / "secrets.toml")]
    contenders.append(scanbox)

    floor = Contender("floor", tmp / "floor")
    config = validate(data)
    template = bench_floor.make_template(RhcPlatform(config.platform, config.site, floor.tmp))
    bench_floor.write_config(floor.tmp / "floor.json", template=template, endpoint=endpoint,
                             tty_path=floor.tty_path, api=str(floor.tmp / "api.sock"), db=str(floor.tmp / "floor.db"))
    floor.argv = bench_floor.command(floor.tmp / "floor.json")
    contenders.append(floor)

    # start-up: alternate, each started and stopped `starts` times; the last start stays up
    for round_ in range(starts):
        for contender in (contenders if round_ % 2 == 0 else contenders[::-1]):
            contender.start()
            if round_ < starts - 1:
                contender.stop()

    codes = [r.static_qr for r in default_residents() if r.status == "1"]
    for contender in contenders:
        await contender.connect()
        # warm up: the first call loads the WSDL and opens the platform connection
        for i in range(20):
            await contender.scan(codes[i % len(codes)])
        contender.rss_warm = rss_kib(contender.pid)
    for round_ in range(0, scans, batch):
        for contender in (contenders if (round_ // batch) % 2 == 0 else contenders[::-1]):
            await contender.batch(codes, min(batch, scans - round_), sim_url)
    for contender in contenders:
        contender.rss = rss_kib(contender.pid)
        contender.writer.close()
    report(scans, batch, scanbox, floor)


def report(scans: int, batch: int, scanbox: Contender, floor: Contender) -> None:
    load = open("/proc/loadavg").read().split()[:3]
    print("scanbox end-to-end benchmark: %d scans each, serial pty -> RHC_E0003 at the simulator -> HIS on the Unix"
          " socket; scanbox and the floor interleaved in batches of %d (load average %s)"
          % (scans, batch, " ".join(load)))
    for c in (scanbox, floor):
        print("  %-8s terminator byte -> answer  p50 %6.2f ms  p99 %6.2f ms  max %6.2f ms; inside the simulator p50 "
              "%5.2f ms; own p50 %5.2f ms p99 %6.2f ms"
              % (c.name, percentile(c.e2e, 50), percentile(c.e2e, 99), max(c.e2e), percentile(c.service, 50),
                 percentile(c.own, 50), percentile(c.own, 99)))
    print("  %-42s %10s %10s %8s  %s" % ("", "scanbox", "floor", "ratio", "goal (issue 17)"))

    def row(what: str, ours: float, theirs: float, goal: str, fmt: str = "%10.2f") -> None:
        ratio = ours / theirs if theirs else float("inf")
        print("  %-42s %s %s %7.2fx  %s" % (what, fmt % ours, fmt % theirs, ratio, goal))

    row("daemon CPU per scan, ms", scanbox.cpu / scans, floor.cpu / scans, "<= 2.0x")
    row("scan to answer minus the simulator, p50 ms", percentile(scanbox.own, 50), percentile(floor.own, 50),
        "<= 1.5x")
    row("start to READY=1, median of %d, ms" % len(scanbox.ready_ms), statistics.median(scanbox.ready_ms),
        statistics.median(floor.ready_ms), "<= 1.3x", "%10.0f")
    row("  its CPU (what load does not inflate), ms", statistics.median(scanbox.ready_cpu_ms),
        statistics.median(floor.ready_cpu_ms), "", "%10.0f")
    row("RSS after %d scans, MiB" % (scans + 20), scanbox.rss / 1024, floor.rss / 1024, "<= 1.3x", "%10.1f")
    print("  %-42s %10.2f %10.2f" % ("  its growth from scan 20 to scan %d, MiB" % (scans + 20),
                                     (scanbox.rss - scanbox.rss_warm) / 1024, (floor.rss - floor.rss_warm) / 1024))
    print("  start-ups, ms: scanbox %s; floor %s" % (" ".join("%.0f" % t for t in scanbox.ready_ms),
                                                     " ".join("%.0f" % t for t in floor.ready_ms)))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--scans", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=50)
    parser.add_argument("--starts", type=int, default=5)
    parser.add_argument("--profile", metavar="FILE", help="run scanbox under cProfile, its profile written to FILE")
    args = parser.parse_args()
    asyncio.run(main(args.scans, args.batch, args.starts, args.profile))
