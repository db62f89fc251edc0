"""The watchdog really watches: `scanbox run` pings systemd from its event loop, so a blocked loop
stops the pings (and systemd, after WatchdogSec=, kills and restarts the daemon).

The daemon runs as a process with NOTIFY_SOCKET and WATCHDOG_USEC, as systemd starts it. The
loop is blocked from inside, the way a bug would block it: a test-only launcher (below, not in
the package) installs a SIGUSR1 handler that, running on the loop's thread, says so and sits
in a read() until the test writes a byte. The daemon's other threads run on; only the loop stops.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from tests.conftest import config_dict, write_config

WATCHDOG_USEC = 200_000  # pings every 0.1 s
PING_S = WATCHDOG_USEC / 2 / 1e6

LAUNCHER = """
import os, signal, sys
from agent import cli

def stuck(signum, frame):
    os.write(int(os.environ["SCANBOX_TEST_ENTERED_FD"]), b"x")
    os.read(int(os.environ["SCANBOX_TEST_STUCK_FD"]), 1)  # the loop's thread waits here

signal.signal(signal.SIGUSR1, stuck)
sys.exit(cli.main(sys.argv[1:]))
"""


class Systemd:
    """The receiving end of sd_notify: every datagram, with when it arrived."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.path = path

    def next(self, timeout: float) -> list[str] | None:
        """The next message's lines, or None if none came within `timeout`."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(4096).decode().split("\n")
        except (TimeoutError, BlockingIOError):  # BlockingIOError: timeout 0, nothing queued
            return None

    def wait_for(self, line: str, timeout: float) -> float:
        deadline = time.monotonic() + timeout
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.next(remaining)
            if message is not None and line in message:
                return time.monotonic()
        raise TimeoutError("no %s within %.1f s" % (line, timeout))

    def drain(self) -> None:
        """Forget what is already queued."""
        while self.next(0.0) is not None:
            pass

    def pings_within(self, seconds: float) -> int:
        deadline = time.monotonic() + seconds
        count = 0
        while (remaining := deadline - time.monotonic()) > 0:
            message = self.next(remaining)
            count += message is not None and "WATCHDOG=1" in message
        return count


def test_a_blocked_event_loop_stops_the_watchdog_pings(tmp_path):
    config, secrets = write_config(tmp_path, config_dict(None, tmp_path))
    systemd = Systemd(tmp_path / "notify.sock")
    stuck_read, stuck_write = os.pipe()
    entered_read, entered_write = os.pipe()
    env = {**os.environ, "NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": str(WATCHDOG_USEC),
           "SCANBOX_TEST_STUCK_FD": str(stuck_read), "SCANBOX_TEST_ENTERED_FD": str(entered_write)}
    proc = subprocess.Popen([sys.executable, "-c", LAUNCHER, "run", "--config", str(config), "--secrets", str(secrets)],
                            env=env, pass_fds=(stuck_read, entered_write), stderr=subprocess.DEVNULL)
    try:
        systemd.wait_for("READY=1", 30)
        assert systemd.pings_within(10 * PING_S) >= 3  # alive: pinging
        proc.send_signal(signal.SIGUSR1)
        assert select.select([entered_read], [], [], 10)[0], "the loop never got stuck"
        systemd.drain()  # pings sent before it did
        # blocked: ten ping intervals, five watchdog timeouts, and not one ping
        assert systemd.pings_within(10 * PING_S) == 0
        assert proc.poll() is None  # alive, just stuck: what only a watchdog notices
        os.write(stuck_write, b"x")
        systemd.wait_for("WATCHDOG=1", 5)  # the loop runs again, and says so
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for fd in (stuck_read, stuck_write, entered_read, entered_write):
            os.close(fd)
        systemd.sock.close()


def test_no_watchdog_no_pings(tmp_path):
    """Without WATCHDOG_USEC (run by hand, or a unit without WatchdogSec=) nothing pings."""
    config, secrets = write_config(tmp_path, config_dict(None, tmp_path))
    systemd = Systemd(tmp_path / "notify.sock")
    env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
    env["NOTIFY_SOCKET"] = str(systemd.path)
    proc = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(config), "--secrets", str(secrets)],
                            env=env, stderr=subprocess.DEVNULL)
    try:
        systemd.wait_for("READY=1", 30)
        assert systemd.pings_within(5 * PING_S) == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        systemd.sock.close()


# a test-only launcher: quick restarts, and a switch (a file) that makes every database batch
# kill the outbox's thread, as a fault the thread cannot survive would
FAULTY_DB_LAUNCHER = """
import functools, os, sys
import agent.daemon, agent.outbox
from agent import cli
from agent.supervisor import Supervisor

agent.daemon.Supervisor = functools.partial(Supervisor, backoff_initial=0.01, backoff_max=0.02, give_up_after=3)
execute = agent.outbox.Store._execute

class Killed(BaseException):
    pass

def faulty(self, batch):
    if os.path.exists(os.environ["SCANBOX_TEST_FAULT"]):
        raise Killed("injected")
    return execute(self, batch)

agent.outbox.Store._execute = faulty
sys.exit(cli.main(sys.argv[1:]))
"""


def rpc(path: Path, method: str) -> dict:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(10)
        sock.connect(str(path))
        sock.sendall(json.dumps({"jsonrpc": "2.0", "id": 1, "method": method}).encode() + b"\n")
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    return json.loads(data)["result"]


def test_a_critical_part_that_cannot_recover_stops_the_watchdog_pings(tmp_path):
    """The outbox's database thread dies again each time it is restarted: after give_up_after
    failures in a row the supervisor gives it up, the pings stop (systemd restarts scanbox), and
    until then `status` still answers and names the part."""
    config, secrets = write_config(tmp_path, config_dict(None, tmp_path))
    systemd = Systemd(tmp_path / "notify.sock")
    fault = tmp_path / "fault"
    env = {**os.environ, "NOTIFY_SOCKET": str(systemd.path), "WATCHDOG_USEC": str(WATCHDOG_USEC),
           "SCANBOX_TEST_FAULT": str(fault)}
    proc = subprocess.Popen([sys.executable, "-c", FAULTY_DB_LAUNCHER, "run", "--config", str(config),
                             "--secrets", str(secrets)], env=env, stderr=subprocess.DEVNULL)
    try:
        systemd.wait_for("READY=1", 30)
        assert systemd.pings_within(10 * PING_S) >= 3  # alive: pinging
        fault.touch()
        deadline = time.monotonic() + 10
        while True:  # each status asks the database: each ask kills its thread again
            status = rpc(tmp_path / "api.sock", "status")
            if status["components"]["outbox-db"]["state"] == "failed":
                break
            assert time.monotonic() < deadline, status["components"]
        assert any(a["code"] == "COMPONENT_FAILED" and a["source"] == "outbox-db" for a in status["alarms"])
        assert status["outbox"]["available"] is False
        systemd.drain()
        assert systemd.pings_within(10 * PING_S) == 0  # given up: systemd will restart the daemon
        assert proc.poll() is None  # still answering meanwhile (degrade, don't die)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        systemd.sock.close()
