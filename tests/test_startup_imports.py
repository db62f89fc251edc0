"""A box loads only what its configuration uses (issue 17: start-up and memory on a Pi): no
Pillow without a display, no cryptography (8.5 MiB resident) unless it serves TLS or OneTrans,
not even once scans were sealed into the outbox and the identity cache, no zeep (nor requests and
urllib3, which it brings) for a platform whose requests are all strings, and no pydantic anywhere,
not even once the HIS called (the config and the API's params are msgspec Structs: agent/schema.py)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest

from agent.config import dump
from agent.simulator.soap import Fault
from tests.conftest import PtyScanner, RpcClient, config_dict, make_config

# what a counter box never needs at its start or its scans; difflib and tomli_w: only for a config
# error and for writing a config
HEAVY = ("PIL", "cryptography", "zeep", "requests", "urllib3", "prometheus_client", "pydantic", "pydantic_core",
         "difflib", "tomli_w")
SCRIPT = """
import asyncio, json, sys
from agent.config import validate
from agent.daemon import Daemon

async def main():
    box = Daemon(validate(json.loads(sys.argv[1])))
    await box.start()
    try:
        await box.status()  # every component reports (the platform, the store, the clock)
    finally:
        await box.stop()
    print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2:]))))

asyncio.run(main())
"""


def loaded_after_start(tmp_path, **sections) -> list[str]:
    config = make_config(None, tmp_path, **sections)
    data = json.dumps(dump(config) | {"sources": {}})
    data = data.replace('"********"', '"scanbox-secret"')  # the dump masks the platform password
    out = subprocess.run([sys.executable, "-c", SCRIPT, data, *HEAVY], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_a_counter_box_starts_without_pillow_cryptography_zeep_or_pydantic(tmp_path):
    assert loaded_after_start(tmp_path) == []


@pytest.mark.parametrize("display, expected", [({"model": "dummy"}, ["PIL"])])
def test_a_box_with_a_display_loads_pillow(tmp_path, display, expected):
    assert loaded_after_start(tmp_path, display=display) == expected


SCANNING_SCRIPT = """
import asyncio, json, sys
from agent.config import validate
from agent.daemon import Daemon

async def main():
    box = Daemon(validate(json.loads(sys.argv[1])))
    await box.start()
    try:
        print("started", flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)  # the scans are done
        await box.status()
    finally:
        await box.stop()
    print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2:]))))

asyncio.run(main())
"""


async def read_card(client: RpcClient, scanner: PtyScanner, code: str) -> dict:
    client.send_raw(b'{"jsonrpc":"2.0","id":"scan","method":"read_card","params":{"timeout_s":10}}\n')
    await client.call("status")  # answered after the read_card sent before it is registered
    scanner.scan(code)
    return (await client.unsolicited(timeout=10))["result"]


async def test_a_counter_box_that_scanned_has_loaded_no_cryptography(tmp_path, sim_server, pty_scanner):
    """A plain rhc box with a serial scanner, after verified scans (each identity sealed into the
    cache), a code the platform refuses, scans answered from the cache while the platform is down
    (each use sealed into the outbox), and the outbox drained once it is back."""
    data = config_dict(sim_server, tmp_path, sources={"counter": {"driver": "serial_scanner",
                                                                  "port": str(pty_scanner.path)}},
                       outbox={"backoff_initial": "50ms", "backoff_max": "100ms"})
    daemon = await asyncio.create_subprocess_exec(sys.executable, "-c", SCANNING_SCRIPT, json.dumps(data), *HEAVY,
                                                  stdin=subprocess.PIPE, stdout=subprocess.PIPE)
    assert daemon.stdin is not None and daemon.stdout is not None
    try:
        async with asyncio.timeout(60):
            assert await daemon.stdout.readline() == b"started\n"
        client = await RpcClient.unix(tmp_path / "api.sock")
        await client.call("subscribe", {"events": ["status"]})
        if not (await client.call("status"))["sources"][0]["connected"]:
            while not (await client.event("status", timeout=10))["data"].get("source", {}).get("connected"):
                pass
        static = [r.static_qr for r in sim_server.sim.residents.values() if r.status == "1"][:3]
        answers = [await read_card(client, pty_scanner, code) for code in ["F" * 64 + ":1", *static]]
        sim_server.faults.add(Fault("http500", count=None))  # offline: from the cache, uses into the outbox
        answers += [await read_card(client, pty_scanner, code) for code in static]
        assert [a["verification"]["ok"] for a in answers] == [False] + [True] * 6
        assert [a["identity"]["source"] for a in answers[1:]] == ["platform"] * 3 + ["cache"] * 3
        # back online: the uploader opens the three sealed uses and sends them
        sim_server.faults.clear()
        outbox = (await client.call("status"))["outbox"]
        while outbox["pending"] or outbox["sent"] < 3:
            outbox = (await client.event("status", timeout=10))["data"].get("outbox", outbox)
        await client.close()
        daemon.stdin.write(b"done\n")
        async with asyncio.timeout(60):
            out, _ = await daemon.communicate()
    finally:
        if daemon.returncode is None:
            daemon.kill()
            await daemon.wait()
    assert daemon.returncode == 0
    assert json.loads(out.splitlines()[-1]) == []


def test_a_clock_that_timesyncd_vouches_for_loads_no_ctypes(tmp_path):
    """ctypes (half a MiB) is for adjtimex, asked only where timesyncd does not answer: a Pi's
    daemon never needs it (and its unit's ProtectClock= filters adjtimex anyway)."""
    (tmp_path / "synchronized").touch()
    script = ("import sys; from agent import daemon; from agent.clock import Clock; "
              "clock = Clock(timesync_dir=sys.argv[1]); "
              "print(clock.synchronised_by(), clock.right(), 'ctypes' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["(True,", "'timesyncd')", "True", "False"]


VERSION_SCRIPT = """
import asyncio, json, sys
from agent.config import validate
from agent.daemon import Daemon

async def main():
    box = Daemon(validate(json.loads(sys.argv[1])))
    await box.start()  # logs the version at READY
    try:
        version = (await box.status())["version"]
    finally:
        await box.stop()
    print(json.dumps([version, "importlib.metadata" in sys.modules]))

asyncio.run(main())
"""


def test_the_daemon_says_its_version_without_importlib_metadata(tmp_path):
    """The version is written once, in agent/__init__.py, and the package's metadata is made from
    it: the daemon says it (at READY, in `status`) without importlib.metadata (1.1 MiB, 10 ms)."""
    import importlib.metadata

    data = json.dumps(config_dict(None, tmp_path))
    out = subprocess.run([sys.executable, "-c", VERSION_SCRIPT, data], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1]) == [importlib.metadata.version("scanbox"), False]
