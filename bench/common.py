"""What the benchmarks share: a free port, the simulator as its own process, percentiles."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def compile_like_an_install() -> None:
    """Byte-compile scanbox and the benchmarks, as `pip install` does on a box: a daemon started
    under PYTHONDONTWRITEBYTECODE (as this machine's shells have it) would otherwise compile
    every one of its modules from source at each start, which no box does."""
    import compileall

    for tree in (ROOT / "agent", ROOT / "drivers", ROOT / "bench"):
        if not compileall.compile_dir(str(tree), quiet=1):
            raise RuntimeError("byte-compiling %s failed" % tree)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_simulator(port: int) -> subprocess.Popen:
    """`scanbox simulate rhc` in its own process, so it does not share the daemon's event loop."""
    sim = subprocess.Popen([sys.executable, "-m", "agent", "simulate", "rhc", "--listen", "127.0.0.1:%d" % port],
                           stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    assert sim.stdout is not None
    sim.stdout.readline()  # printed once it listens
    return sim


def start_daemon(tmp: Path, timeout_s: float = 30) -> subprocess.Popen:
    """`scanbox run` on the config and secrets written in `tmp`, once it has sent READY=1."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp / "notify.sock"))
    notify.settimeout(timeout_s)
    daemon = subprocess.Popen([sys.executable, "-m", "agent", "run", "--config", str(tmp / "scanbox.toml"),
                               "--secrets", str(tmp / "secrets.toml")],
                              env={**os.environ, "NOTIFY_SOCKET": str(tmp / "notify.sock")})
    try:
        while b"READY=1" not in notify.recv(4096):
            continue  # WATCHDOG=1, STATUS=...: wait for READY
    except BaseException:
        stop(daemon)
        raise
    finally:
        notify.close()
    return daemon


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is not None:
        return
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]
