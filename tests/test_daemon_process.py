"""`scanbox run` as systemd runs it: a real process, NOTIFY_SOCKET, SIGTERM, its log on stderr."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from agent.simulator.soap import SimServer
from tests.conftest import PtyScanner, RpcClient, config_dict, write_config

class NotifyListener:
    """The systemd side of sd_notify: a datagram socket the daemon reports to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.messages: list[str] = []

    def wait_for(self, key: str, timeout: float = 15) -> str:
        deadline = time.monotonic() + timeout
        while True:
            for message in self.messages:
                if key in message.split("\n"):
                    return message
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError("no %s from the daemon; got %r" % (key, self.messages))
            self.sock.settimeout(remaining)
            self.messages.append(self.sock.recv(4096).decode())

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def files(tmp_path: Path, sim_server: SimServer, pty_scanner: PtyScanner):
    data = config_dict(sim_server, tmp_path,
                       device={"id": "counter-3", "log_level": "debug"},
                       platform={"wsdl": sim_server.wsdl_url, "timeout_s": 3},
                       sources={"counter": {"driver": "serial_scanner", "port": str(pty_scanner.path),
                                            "reconnect_max_s": 0.2}})
    return write_config(tmp_path, data)


async def test_the_daemon_process_from_ready_to_sigterm(tmp_path, files, sim_server, pty_scanner):
    config, secrets = files
    notify = NotifyListener(tmp_path / "notify.sock")
    log_path = tmp_path / "daemon.log"
    env = {**os.environ, "NOTIFY_SOCKET": str(notify.path), "WATCHDOG_USEC": "400000"}
    with open(log_path, "wb") as log:
        started = time.monotonic()
        proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config),
                                 "--secrets", str(secrets)], stderr=log, env=env)
    try:
        ready = await asyncio.to_thread(notify.wait_for, "READY=1")
        ready_after = time.monotonic() - started
        assert any(line.startswith("STATUS=") for line in ready.split("\n"))
        await asyncio.to_thread(notify.wait_for, "WATCHDOG=1", 5)  # pings every 0.2 s
        client = await RpcClient.unix(tmp_path / "api.sock")
        await client.call("subscribe", {"events": ["status"]})
        status = await client.call("status")
        assert status["device_id"] == "counter-3"
        # READY does not wait for the scanner: its port may be opened a moment later, and opening
        # it discards what was typed before (pyserial flushes the input), so a scan waits for it
        if not all(source["connected"] for source in status["sources"]):
            async with asyncio.timeout(10):
                while True:
                    event = (await client.notifications.get())["params"]
                    if event["data"].get("source", {}).get("connected") is True:
                        break
        pending = asyncio.get_running_loop().create_task(client.request("read_card", {"timeout_s": 10}, timeout=15))
        # the read_card is registered once the daemon has answered a later request on the same connection
        await client.call("status")
        resident = list(sim_server.sim.residents.values())[0]
        pty_scanner.scan(resident.static_qr)
        result = (await pending)["result"]
        assert result["verification"]["ok"] and result["identity"]["id_number"] == resident.id_card
        await client.close()
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
        notify.wait_for("STOPPING=1")
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()
    log = log_path.read_text(encoding="utf-8")
    assert "ready as counter-3" in log and "scanbox stopped" in log
    # the WSDL came from the platform and was cached for offline starts
    assert (tmp_path / "state" / "wsdl" / "rhc" / "current" / "0.wsdl").exists()
    # personal data never reaches the log unmasked, even at debug level
    for secret in (resident.id_card, resident.name, resident.cellphone, resident.telephone,
                   resident.static_qr, "scanbox-secret"):
        assert secret not in log, "%r found in the daemon's log" % secret
    assert resident.id_card[:6] + "********" + resident.id_card[-4:] in log
    assert ready_after < 10


def test_config_problems_stop_the_daemon_with_every_problem_listed(tmp_path):
    config = tmp_path / "bad.toml"
    config.write_text('[platform]\nkind = "rhc"\nendpont = "http://x"\n[api]\ntcp = "nowhere"\n')
    proc = subprocess.run([sys.executable, "-m", "agent", "run", "--config", str(config),
                           "--secrets", str(tmp_path / "none.toml")], capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert "platform.endpont: unknown key (did you mean 'endpoint'?)" in proc.stderr
    assert "platform.endpoint: required" in proc.stderr
    assert "api.tcp" in proc.stderr
    assert "none.toml: no such file" in proc.stderr
