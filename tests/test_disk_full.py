"""A full disk: the daemon under a file-size limit (RLIMIT_FSIZE, set and later raised on the
running process with prlimit) keeps verifying, raises an alarm, never crashes, and records uses
again as soon as there is room."""

from __future__ import annotations

import asyncio
import os
import resource
import signal
import socket
import sys
from pathlib import Path

from agent.simulator.soap import Fault, SimServer
from tests.conftest import RpcClient, write_config
from tests.test_crash_safety import box_config


async def test_a_full_disk_is_an_alarm_and_enqueueing_resumes_when_space_returns(tmp_path: Path, sim_server: SimServer):
    config, secrets = write_config(tmp_path, box_config(tmp_path, sim_server.endpoint))
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify.sock"))
    notify.setblocking(False)
    limit = 160 * 1024  # room for the empty database and a few records

    def small_disk() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, resource.RLIM_INFINITY))  # soft limit: raisable

    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent", "run", "--config", str(config), "--secrets", str(secrets),
        stderr=asyncio.subprocess.PIPE, preexec_fn=small_disk,
        env={**os.environ, "NOTIFY_SOCKET": str(tmp_path / "notify.sock")})
    try:
        async with asyncio.timeout(30):
            while b"READY=1" not in await asyncio.get_running_loop().sock_recv(notify, 4096):
                pass
        client = await RpcClient.unix(tmp_path / "api.sock")
        resident = list(sim_server.sim.residents.values())[0]
        assert (await client.call("verify_qr", {"qr": resident.static_qr}))["verification"]["ok"]
        sim_server.faults.add(Fault("http500", count=None))  # offline from here: every answer needs a record

        recorded = 0
        for _ in range(2000):
            result = await client.call("verify_qr", {"qr": resident.static_qr})
            assert result["verification"]["ok"] and result["identity"]["source"] == "cache"  # still verifying
            if result["verification"]["msg_guid"] is None:
                unrecorded_scan = result["scan"]["id"]
                break  # this use could not be recorded: the disk is full
            recorded += 1
        else:
            raise AssertionError("the file-size limit was never reached")
        assert recorded > 0
        status = await client.call("status")
        codes = {a["code"]: a["text"] for a in status["alarms"]}
        assert "OUTBOX_UNAVAILABLE" in codes and "USES_UNRECORDED" in codes
        # reading what is stored still works; nothing already stored was lost
        assert (await client.call("outbox.stats"))["pending"] == recorded

        # space returns: the limit of the running daemon is raised
        resource.prlimit(proc.pid, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        again = await client.call("verify_qr", {"qr": resident.static_qr})
        assert again["verification"]["msg_guid"] is not None
        status = await client.call("status")
        assert "OUTBOX_UNAVAILABLE" not in {a["code"] for a in status["alarms"]}
        assert status["outbox"]["pending"] == recorded + 1

        sim_server.faults.clear()  # and everything recorded reaches the platform
        await client.call("subscribe", {"events": ["status"]})
        stats = await client.call("outbox.stats")
        async with asyncio.timeout(30):
            while stats["pending"]:
                stats = (await client.event("status", timeout=30))["data"].get("outbox", stats)
        await client.close()
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0  # never crashed
        # the use that could not be recorded outlives the daemon: its scan id and time are in the
        # ledger allocated before the disk filled (issue 15: it was an in-memory counter)
        listed = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "agent", "outbox", "--state-dir", str(tmp_path / "state"), "unrecorded",
            stdout=asyncio.subprocess.PIPE)
        out = (await listed.communicate())[0].decode()
        assert listed.returncode == 0 and "scan %s" % unrecorded_scan in out and "1 use could not be recorded" in out
    finally:
        if proc.returncode is None:
            proc.kill()
        notify.close()
    log = (await proc.stderr.read()).decode()
    assert "Traceback" not in log
