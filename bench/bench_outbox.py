"""Outbox figures: durable enqueues per second, drain rate, and platform-back to empty backlog.

    .venv/bin/python bench/bench_outbox.py [--records 10000] [--runs 3]

- enqueue: records committed (WAL, synchronous=FULL, fsync) one at a time, and from 64
  concurrent producers (commits are grouped: one fsync for all that arrived together);
- drain: a backlog uploaded by the real uploader and adapter to the RHC simulator running in its
  own process at zero latency, at 1 and 8 (and 4) uploads in flight; interleaved with it, the
  floor's drain (bench_floor.floor_drain: the same records in sqlite, a SOAP body from a template,
  aiohttp, each marked sent by its own durable commit), and the ratio beside issue 17's goal
  (>= 0.8x the floor); beside those, the same adapter without the outbox, and the rate the
  simulator takes from a lean raw client, so it can be read off which side limits the drain;
- the event loop during a drain at 8 in flight: how late a timer due every 5 ms runs (what a scan
  arriving then waits before the loop turns to it), scanbox's and the floor's (which commits on
  the loop);
- platform back: the backlog waits while the platform is down (the uploader backs off), then the
  simulator starts; time to the first upload and to an empty outbox.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_floor  # noqa: E402
from common import compile_like_an_install, free_port, percentile, start_simulator, stop  # noqa: E402


from agent.config import validate  # noqa: E402
from agent.model import UsageRecord, now_local  # noqa: E402
from agent.outbox import Store, Uploader  # noqa: E402
from agent.platforms.base import VerifyRequest  # noqa: E402
from agent.platforms.rhc import RhcPlatform  # noqa: E402
from agent.qr import QrKind  # noqa: E402
from agent.simulator.rhc import default_residents  # noqa: E402
from drivers.base import Backoff  # noqa: E402
from tests.conftest import config_dict  # noqa: E402


def platform_for(port: int, tmp: Path) -> RhcPlatform:
    data = config_dict(None, tmp)
    data["platform"]["endpoint"] = "http://127.0.0.1:%d/healthCard/services/elecHealthCardWebSevice" % port
    config = validate(data)
    return RhcPlatform(config.platform, config.site, tmp)


def records(platform: RhcPlatform, n: int) -> list[UsageRecord]:
    codes = [r.static_qr for r in default_residents() if r.status == "1"]
    return [platform.verify_record(VerifyRequest(codes[i % len(codes)], QrKind.STATIC, now_local(), "010101", "01"),
                                   "scan-%d" % i) for i in range(n)]


async def enqueue_rates(tmp: Path) -> tuple[float, float]:
    store = Store(tmp / "enqueue.db")
    await store.open()
    one = [UsageRecord(uuid.uuid4().hex, "RHC_E0003", {"qr_code": "Q" * 66, "time": "2026-11-22 10:00:00"})
           for _ in range(2000)]
    started = time.perf_counter()
    for r in one:
        await store.enqueue(r)
    sequential = len(one) / (time.perf_counter() - started)
    many = [UsageRecord(uuid.uuid4().hex, "RHC_E0003", {"qr_code": "Q" * 66, "time": "2026-11-22 10:00:00"})
            for _ in range(10000)]
    queue = list(many)

    async def producer() -> None:
        while queue:
            await store.enqueue(queue.pop())

    started = time.perf_counter()
    await asyncio.gather(*(producer() for _ in range(64)))
    concurrent = len(many) / (time.perf_counter() - started)
    await store.close()
    return sequential, concurrent


async def drain(port: int, tmp: Path, n: int, in_flight: int, run: int = 0, watch: Lateness | None = None) -> float:
    platform = platform_for(port, tmp)
    store = Store(tmp / ("drain-%d-%d.db" % (in_flight, run)))
    await store.open()
    for r in records(platform, n):
        await store.enqueue(r)
    await platform.start()
    uploader = Uploader(store, platform, max_in_flight=in_flight, backoff=Backoff(1, 300))
    done = asyncio.Event()
    uploader.on_change = lambda: done.set() if uploader.sent + uploader.dead >= n else None
    async with watch or Lateness(False):
        started = time.perf_counter()
        task = asyncio.get_running_loop().create_task(uploader.run())
        await done.wait()
        elapsed = time.perf_counter() - started
    task.cancel()
    await store.close()
    await platform.close()
    if uploader.dead:
        raise RuntimeError("%d records refused" % uploader.dead)
    return n / elapsed


class Lateness:
    """While open: how late (ms) a timer due every TICK_S runs on the loop."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.late: list[float] = []
        self._stop = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Lateness:
        if self.enabled:
            self._task = asyncio.get_running_loop().create_task(self._tick())
        return self

    async def __aexit__(self, *exc: object) -> None:
        self._stop.set()
        if self._task is not None:
            await self._task

    async def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        while not self._stop.is_set():
            due = loop.time() + TICK_S
            await asyncio.sleep(TICK_S)
            self.late.append((loop.time() - due) * 1000)


TICK_S = 0.005


async def adapter_alone(port: int, tmp: Path, n: int, concurrency: int) -> float:
    """The same uploads through the same adapter, without the outbox: what the client side of
    scanbox (zeep, httpx, the message checks) can push at this concurrency."""
    platform = platform_for(port, tmp)
    await platform.start()
    todo = records(platform, n)

    async def worker() -> None:
        while todo:
            await platform.upload(todo.pop())

    started = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    rate = n / (time.perf_counter() - started)
    await platform.close()
    return rate


async def floor(port: int, tmp: Path, n: int, in_flight: int, run: int, watch: Lateness | None = None) -> float:
    """The floor's drain of the same backlog (see bench_floor.floor_drain)."""
    platform = platform_for(port, tmp)
    template = bench_floor.make_template(platform)
    path = str(tmp / ("floor-%d-%d.db" % (in_flight, run)))
    bench_floor.fill_outbox(path, [(r.values["qr_code"], r.values["time"]) for r in records(platform, n)])
    async with watch or Lateness(False):
        started = time.perf_counter()
        sent = await bench_floor.floor_drain(path, platform.endpoint, template, in_flight)
        rate = n / (time.perf_counter() - started)
    if sent != n:
        raise RuntimeError("the floor uploaded %d of %d records" % (sent, n))
    return rate


async def simulator_capacity(port: int, tmp: Path, n: int) -> float:
    """Pre-built SOAP requests posted with aiohttp's lean client: the simulator's own limit."""
    import aiohttp
    from lxml import etree

    from agent.platforms.rhc import build_xml
    from agent.platforms.rhc_schema import OPERATIONS
    from agent.simulator.soap import DEFAULT_NAMESPACE, SOAP_ENV

    platform = platform_for(port, tmp)
    bodies = []
    for r in records(platform, n):
        env = etree.Element("{%s}Envelope" % SOAP_ENV)
        body = etree.SubElement(env, "{%s}Body" % SOAP_ENV)
        call = etree.SubElement(body, "{%s}RHCMessageServer" % DEFAULT_NAMESPACE)
        etree.SubElement(call, "action").text = platform.build_action(r.operation, r.guid)
        etree.SubElement(call, "message").text = build_xml(OPERATIONS[r.operation].request, r.values)
        bodies.append(etree.tostring(env))
    await platform.close()
    url = platform.endpoint

    async with aiohttp.ClientSession() as session:
        async def worker() -> None:
            while bodies:
                async with session.post(url, data=bodies.pop(), headers={"Content-Type": "text/xml"}) as response:
                    if b"3005" not in await response.read():
                        raise RuntimeError("the simulator did not verify a pre-built request")

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(8)))
        return n / (time.perf_counter() - started)


async def platform_back(tmp: Path, n: int, outage_s: float) -> tuple[float, float, float]:
    port = free_port()
    platform = platform_for(port, tmp)
    store = Store(tmp / "back.db")
    await store.open()
    for r in records(platform, n):
        await store.enqueue(r)
    uploader = Uploader(store, platform, max_in_flight=4, backoff=Backoff(1, 300))  # the default backoff
    task = asyncio.get_running_loop().create_task(uploader.run())
    await asyncio.sleep(outage_s)  # the platform is down this long
    waited = uploader.resume_at - time.time()
    sim = start_simulator(port)
    back = time.perf_counter()
    first = asyncio.Event()
    done = asyncio.Event()

    def changed() -> None:
        if uploader.sent:
            first.set()
        if uploader.sent >= n:
            done.set()

    uploader.on_change = changed
    await first.wait()
    first_at = time.perf_counter() - back
    await done.wait()
    empty_at = time.perf_counter() - back
    task.cancel()
    await store.close()
    await platform.close()
    stop(sim)
    return max(waited, 0.0), first_at, empty_at


async def main(n: int, runs: int) -> None:
    compile_like_an_install()
    tmp = Path(tempfile.mkdtemp(prefix="scanbox-bench-outbox-"))
    sequential, concurrent = await enqueue_rates(tmp)
    print("outbox benchmark (%s)" % tmp)
    print("  durable enqueue, one at a time     %8.0f records/s  (target >= 500)" % sequential)
    print("  durable enqueue, 64 producers      %8.0f records/s  (grouped commits)" % concurrent)
    port = free_port()
    sim = start_simulator(port)
    try:
        load = open("/proc/loadavg").read().split()[:3]
        print("  drain, interleaved with the floor's, median of %d runs each (load average %s):"
              % (runs, " ".join(load)))
        print("  %-30s %10s %10s %8s  %s" % ("", "scanbox/s", "floor/s", "ratio", "goal (issue 17)"))
        for in_flight in (1, 8):
            ours: list[float] = []
            theirs: list[float] = []
            for run in range(runs):  # alternate which goes first
                order = [("scanbox", ours), ("floor", theirs)][::1 if run % 2 == 0 else -1]
                for who, rates in order:
                    if who == "scanbox":
                        rates.append(await drain(port, tmp, n, in_flight, run))
                    else:
                        rates.append(await floor(port, tmp, n, in_flight, run))
            a, b = statistics.median(ours), statistics.median(theirs)
            print("  %-30s %10.0f %10.0f %7.2fx  >= 0.8x" % ("drain, %d in flight" % in_flight, a, b, a / b))
        for who, measure in (("scanbox", drain), ("floor", floor)):
            watch = Lateness()
            await measure(port, tmp, n, 8, runs, watch)
            late = watch.late
            print("  loop lateness, drain at 8 in flight, %-8s p50 %5.2f  p99 %5.2f  max %6.2f ms  (a timer due every "
                  "%.0f ms)" % (who, percentile(late, 50), percentile(late, 99), max(late), TICK_S * 1000))
        for in_flight in (1, 4, 8):
            alone = await adapter_alone(port, tmp, n, in_flight)
            print("  the adapter without the outbox, %d in flight  %8.0f records/s" % (in_flight, alone))
        raw = await simulator_capacity(port, tmp, n)
        print("  the simulator itself, raw HTTP      %8.0f requests/s  (pre-built SOAP, 8 at once: what it "
              "can take)" % raw)
    finally:
        stop(sim)
    outage = float(os.environ.get("BENCH_OUTAGE_S", "20"))
    waited, first, empty = await platform_back(tmp, n, outage)
    print("  platform back after a %.0f s outage: backoff had %.1f s to go; first upload after %.1f s, "
          "%d records uploaded after %.1f s" % (outage, waited, first, n, empty))


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=10000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    asyncio.run(main(args.records, args.runs))
