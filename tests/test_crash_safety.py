"""Power cuts: the real daemon, killed with SIGKILL at random moments hundreds of times while scans
flow and a flaky platform forces answers from the cache and uploads from the outbox.

Afterwards every scan the HIS was told was verified is at the platform exactly once after
de-duplication by msgGuid, and none is missing. The figures are printed (run with -s) and
written to the test's tmp directory as crash-report.json.
"""

from __future__ import annotations

import asyncio
import collections
import json
import os
import random
import signal
import socket
import sys
import time
from pathlib import Path

import pytest

from agent.simulator.rhc import RhcSimulator
from agent.simulator.soap import SimServer
from tests.conftest import RpcClient, config_dict, write_config

KILLS = int(os.environ.get("SCANBOX_CRASH_KILLS", "200"))

def box_config(tmp_path: Path, endpoint: str) -> dict:
    """A box whose outbox retries quickly, so one short life sees several uploads."""
    data = config_dict(None, tmp_path, device={"id": "crash-box", "log_level": "info"},
                       outbox={"backoff_initial": "20ms", "backoff_max": "100ms", "max_in_flight": 2})
    data["platform"]["endpoint"] = endpoint
    return data


class Box:
    """The daemon as a process that can lose power at any moment."""

    def __init__(self, tmp_path: Path, endpoint: str) -> None:
        self.tmp_path = tmp_path
        self.socket = tmp_path / "api.sock"
        self.config, self.secrets = write_config(tmp_path, box_config(tmp_path, endpoint))
        self.log = open(tmp_path / "daemon.log", "ab")
        self.proc: asyncio.subprocess.Process | None = None
        self.notify_path = tmp_path / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(self.notify_path))
        self.notify.setblocking(False)

    async def start(self) -> float:
        while True:  # drop what an earlier run said
            try:
                self.notify.recv(4096)
            except BlockingIOError:
                break
        started = time.monotonic()
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "run", "--config", str(self.config), "--secrets", str(self.secrets),
            stdout=asyncio.subprocess.DEVNULL, stderr=self.log,
            env={**os.environ, "NOTIFY_SOCKET": str(self.notify_path)})
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(30):
            while b"READY=1" not in await loop.sock_recv(self.notify, 4096):
                pass
        return time.monotonic() - started

    async def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        await self.proc.wait()

    async def stop(self) -> None:
        if self.proc and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            async with asyncio.timeout(15):
                await self.proc.wait()

    def close(self) -> None:
        self.notify.close()
        self.log.close()


async def scan_until_killed(box: Box, codes: list[str], answered: dict[str, bool], rng: random.Random) -> int:
    """HIS clients verifying codes back to back; each answer with ok=true is noted with its
    msgGuid and whether it came from the cache. Ends when the connection dies."""
    count = 0

    async def his() -> None:
        nonlocal count
        try:
            client = await RpcClient.unix(box.socket)
        except OSError:
            return  # the power went before this HIS connected
        try:
            while True:
                response = await client.request("verify_qr", {"qr": rng.choice(codes)}, timeout=10)
                v = response["result"]["verification"]
                count += 1
                if v["ok"]:
                    assert v["msg_guid"], response
                    answered[v["msg_guid"]] = v["offline"]
        except (ConnectionError, OSError):
            return
        finally:
            await client.close()

    await asyncio.gather(his(), his(), return_exceptions=False)
    return count


@pytest.mark.timeout(900)
async def test_sigkill_at_random_moments_loses_no_verified_use_and_duplicates_none(tmp_path):
    sim = RhcSimulator()
    server = await SimServer(sim).start("127.0.0.1", 0)
    server.faults.base_latency_s = 0.003  # uploads take a moment: kills land in them
    box = Box(tmp_path, server.endpoint)
    rng = random.Random(20261122)
    codes = [r.static_qr for r in sim.residents.values() if r.status == "1"]
    answered: dict[str, bool] = {}  # msgGuid -> answered from the cache
    kills_during_upload = 0
    scans = 0
    try:
        # the box has seen every patient once: the cache knows them
        await box.start()
        client = await RpcClient.unix(box.socket)
        for qr in codes:
            result = await client.call("verify_qr", {"qr": qr})
            answered[result["verification"]["msg_guid"]] = False
        await client.close()
        await box.kill()

        server.faults.flaky_rate = 0.4  # the platform fails 40% of requests: offline answers, retries
        for _ in range(KILLS):
            await box.start()
            scanning = asyncio.get_running_loop().create_task(scan_until_killed(box, codes, answered, rng))
            await asyncio.sleep(rng.uniform(0.0, 0.4))  # the power cut comes when it comes
            if server.in_flight:
                kills_during_upload += 1
            await box.kill()
            scans += await scanning

        # power back for good, platform healthy: the box drains on its own
        server.faults.clear()
        await box.start()
        client = await RpcClient.unix(box.socket)
        await client.call("subscribe", {"events": ["status"]})
        stats = await client.call("outbox.stats")
        async with asyncio.timeout(120):
            while stats["pending"]:
                event = await client.event("status", timeout=120)
                stats = event["data"].get("outbox", stats)
        await client.close()
        await box.stop()
    finally:
        if box.proc and box.proc.returncode is None:
            box.proc.kill()
        box.close()
        await server.close()

    deliveries = collections.Counter(e.msg_guid for e in sim.journal if e.ok)
    lost = [g for g in answered if g not in deliveries]
    duplicated = {g: n for g, n in deliveries.items() if n > 1}
    from_cache = sum(1 for offline in answered.values() if offline)
    report = {
        "kills": KILLS, "scans_sent": scans, "verified_answers": len(answered), "answered_from_cache": from_cache,
        "kills_while_the_platform_was_answering": kills_during_upload,
        "platform_requests": server.requests, "distinct_records_at_platform": len(deliveries),
        "duplicates_the_platform_saw": sum(n - 1 for n in duplicated.values()), "lost": len(lost),
    }
    (tmp_path / "crash-report.json").write_text(json.dumps(report, indent=2))
    print("\ncrash safety:", json.dumps(report))
    assert lost == [], "verified uses missing at the platform: %d" % len(lost)
    assert from_cache > KILLS // 4, "the offline path was not exercised enough: %s" % report
    assert kills_during_upload > KILLS // 10, "kills did not land during uploads: %s" % report
    # nothing personal in a log of hundreds of runs
    log = (tmp_path / "daemon.log").read_text(encoding="utf-8", errors="replace")
    for resident in sim.residents.values():
        for value in (resident.id_card, resident.name, resident.telephone, resident.static_qr):
            assert value not in log
