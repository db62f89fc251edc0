"""Shared fixtures: the RHC simulator on loopback, configs, a JSON-RPC client, a pty scanner.

Nothing here sleeps to wait: waits are on events or I/O, each with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import tty
from pathlib import Path
from typing import Any, Callable

import pytest

from agent.config import Config, split_secrets, to_toml, validate
from agent.daemon import Daemon
from agent.demo import DEMO_SITE
from agent.events import Event
from agent.platforms.base import Platform
from agent.simulator.rhc import RhcSimulator
from agent.supervisor import Supervisor
from agent.simulator.soap import SimServer, WsdlStyle

SITE = DEMO_SITE


@pytest.fixture
def sim() -> RhcSimulator:
    return RhcSimulator()


@pytest.fixture
async def sim_server(sim: RhcSimulator):
    server = await SimServer(sim).start("127.0.0.1", 0)
    yield server
    await server.close()


async def start_sim(sim: RhcSimulator | None = None, style: WsdlStyle | None = None) -> SimServer:
    return await SimServer(sim or RhcSimulator(), style or WsdlStyle()).start("127.0.0.1", 0)


def config_dict(sim_server: SimServer | None, tmp_path: Path, **sections: Any) -> dict[str, Any]:
    """A complete config for a daemon talking to `sim_server`; sections override by key."""
    endpoint = sim_server.endpoint if sim_server else "http://127.0.0.1:9/healthCard/services/x"
    data: dict[str, Any] = {
        "device": {"id": "test-box", "state_dir": str(tmp_path / "state")},
        "site": dict(SITE),
        "platform": {
            "kind": "rhc",
            "endpoint": endpoint,
            "timeout_s": 2,
            "rhc": {"org_id": "QH0001", "user_name": "scanbox", "user_pwd": "scanbox-secret"},
        },
        "api": {"unix": str(tmp_path / "api.sock"), "unix_group": None},
        "scans": {"dedupe_s": 0, "hold_s": 0},
        "sources": {},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(data.get(key), dict):
            data[key] = {**data[key], **value}
        else:
            data[key] = value
    return data


def make_config(sim_server: SimServer | None, tmp_path: Path, **sections: Any) -> Config:
    return validate(config_dict(sim_server, tmp_path, **sections))


def write_config(directory: Path, data: dict[str, Any]) -> tuple[Path, Path]:
    """The files a box has: scanbox.toml and secrets.toml (0600), secrets split out."""
    public, secrets = split_secrets(data)
    config = directory / "scanbox.toml"
    config.write_text(to_toml(public), encoding="utf-8")
    secrets_file = directory / "secrets.toml"
    secrets_file.write_text(to_toml(secrets), encoding="utf-8")
    secrets_file.chmod(0o600)
    return config, secrets_file


class RpcClient:
    """A newline-delimited JSON-RPC client; notifications are kept apart from responses."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader = reader
        self.writer = writer
        self.notifications: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._pending: dict[Any, asyncio.Future[dict[str, Any]]] = {}
        self._next_id = 0
        self._unsolicited: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.closed = False
        self._task = asyncio.get_running_loop().create_task(self._read())

    @classmethod
    async def unix(cls, path: Path | str) -> "RpcClient":
        reader, writer = await asyncio.open_unix_connection(str(path), limit=1 << 22)
        return cls(reader, writer)

    @classmethod
    async def tcp(cls, host: str, port: int, **options: Any) -> "RpcClient":
        """`options` go to asyncio.open_connection (local_addr, ssl, server_hostname)."""
        reader, writer = await asyncio.open_connection(host, port, limit=1 << 22, **options)
        return cls(reader, writer)

    async def _read(self) -> None:
        while True:
            try:
                line = await self.reader.readline()
            except (ConnectionError, OSError):
                line = b""
            if not line:
                self.closed = True
                for fut in self._pending.values():
                    if not fut.done():
                        fut.set_exception(ConnectionError("server closed the connection"))
                await self._unsolicited.put({"closed": True})
                return
            message = json.loads(line)
            if isinstance(message, dict) and message.get("method") == "event":
                await self.notifications.put(message)
            elif isinstance(message, dict) and message.get("id") in self._pending:
                self._pending.pop(message["id"]).set_result(message)
            else:
                await self._unsolicited.put(message)

    def send_raw(self, data: bytes) -> None:
        self.writer.write(data)

    async def request(self, method: str, params: Any = None, timeout: float = 10) -> dict[str, Any]:
        """The whole response object ({result} or {error})."""
        if self.closed:
            raise ConnectionError("the server closed the connection")
        self._next_id += 1
        id_ = self._next_id
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[id_] = fut
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": id_, "method": method}
        if params is not None:
            message["params"] = params
        try:
            self.writer.write(json.dumps(message, ensure_ascii=False).encode() + b"\n")
            await self.writer.drain()
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            # a request that ends without its answer (a send that failed, a timeout) leaves no
            # future behind for the reader to fail unobserved
            self._pending.pop(id_, None)

    async def call(self, method: str, params: Any = None, timeout: float = 10) -> Any:
        response = await self.request(method, params, timeout)
        if "error" in response:
            raise AssertionError("%s failed: %s" % (method, response["error"]))
        return response["result"]

    async def unsolicited(self, timeout: float = 5) -> dict[str, Any]:
        """The next message that answered no request of ours (an error with id null, a close)."""
        async with asyncio.timeout(timeout):
            return await self._unsolicited.get()

    async def event(self, kind: str | None = None, timeout: float = 5) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            while True:
                message = await self.notifications.get()
                if kind is None or message["params"]["type"] == kind:
                    return message["params"]

    async def close(self) -> None:
        self._task.cancel()
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except (ConnectionError, OSError):
            pass


class PtyScanner:
    """A serial scanner played through a pty. `path` is a stable symlink (like /dev/serial/by-id)
    that `replug()` points at a fresh pty, as a USB scanner that is unplugged and plugged back."""

    def __init__(self, directory: Path) -> None:
        self.path = directory / "ttyScanner"
        self.master: int | None = None
        self.replug()

    def replug(self) -> None:
        master, slave = os.openpty()
        tty.setraw(master)
        slave_name = os.ttyname(slave)
        os.close(slave)  # the driver opens it by name
        tmp = self.path.with_suffix(".new")
        tmp.unlink(missing_ok=True)
        tmp.symlink_to(slave_name)
        os.replace(tmp, self.path)
        self.master = master

    def unplug(self) -> None:
        if self.master is not None:
            os.close(self.master)
            self.master = None
        self.path.unlink(missing_ok=True)

    def write(self, data: bytes) -> None:
        assert self.master is not None, "scanner is unplugged"
        os.write(self.master, data)

    def scan(self, text: str, terminator: bytes = b"\r\n") -> None:
        self.write(text.encode("utf-8") + terminator)

    def close(self) -> None:
        self.unplug()


@pytest.fixture
def pty_scanner(tmp_path: Path):
    scanner = PtyScanner(tmp_path)
    yield scanner
    scanner.close()


class EventRecorder:
    """Records hub events; `wait` returns the first (past or future) event matching a predicate."""

    def __init__(self) -> None:
        self.events: list[tuple[str, dict[str, Any]]] = []
        self._changed = asyncio.Condition()

    def __call__(self, event: Event) -> None:
        self.events.append((event.type.value, event.data()))  # as a subscriber sees it
        asyncio.get_running_loop().create_task(self._notify())

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def wait(self, kind: str, predicate: Callable[[dict[str, Any]], bool] = lambda d: True,
                   timeout: float = 5, start: int = 0) -> dict[str, Any]:
        async with asyncio.timeout(timeout):
            async with self._changed:
                while True:
                    for k, data in self.events[start:]:
                        if k == kind and predicate(data):
                            return data
                    await self._changed.wait()


TOKEN = "his-token-7d1c2e"
ADMIN_TOKEN = "admin-token-99ab01"


@pytest.fixture
async def box(tmp_path: Path, sim_server: SimServer, pty_scanner: PtyScanner):
    """A running daemon; `box.scan(text)` scans on the pty, `box.unix()`/`box.tcp()` connect."""
    started: list[Daemon] = []
    clients: list[RpcClient] = []

    class Box:
        sim = sim_server
        scanner = pty_scanner
        daemon: Daemon
        events: EventRecorder

        async def start(self, clock: Any = None, supervisor: Supervisor | None = None,
                        adapter: Callable[[Config], Platform] | None = None,
                        **sections: Any) -> "Box":
            sections.setdefault("sources", {"counter": {"driver": "serial_scanner", "port": str(pty_scanner.path),
                                                        "reconnect_max_s": 0.2}})
            api = {"tcp": "127.0.0.1:0", "auth_timeout_s": 5,
                   "clients": {"his": {"token": TOKEN, "scopes": ["read"]},
                               "admin": {"token": ADMIN_TOKEN, "scopes": ["read", "admin"]}}}
            api.update(sections.pop("api", {}))
            config = make_config(sim_server, tmp_path, api=api, **sections)
            self.daemon = Daemon(config, clock=clock, supervisor=supervisor,
                                 platform=adapter(config) if adapter is not None else None)
            self.events = EventRecorder()
            self.daemon.hub.listen(self.events)
            await self.daemon.start()
            started.append(self.daemon)
            if config.sources:
                await self.events.wait("status", lambda d: d.get("source", {}).get("connected") is True)
            return self

        async def unix(self) -> RpcClient:
            assert self.daemon.stream.unix_path is not None, "the daemon does not listen on a Unix socket"
            client = await RpcClient.unix(self.daemon.stream.unix_path)
            clients.append(client)
            return client

        async def tcp(self, token: str | None = TOKEN) -> RpcClient:
            assert self.daemon.stream.tcp_address is not None, "the daemon does not listen on TCP"
            client = await RpcClient.tcp(*self.daemon.stream.tcp_address)
            clients.append(client)
            if token:
                await client.call("auth", {"token": token})
            return client

        def scan(self, text: str) -> None:
            pty_scanner.scan(text)

        def resident(self, index: int = 0):
            return list(sim_server.sim.residents.values())[index]

        async def waiting(self, n: int) -> None:
            """Until n read_card calls wait (so they are registered before the hub sees a scan)."""
            await until(lambda: self.daemon.hub.waiting >= n)

    yield Box()
    for client in clients:
        await client.close()
    for daemon in started:
        await daemon.stop()


async def until(predicate: Callable[[], bool], timeout: float = 5.0) -> None:
    """Until `predicate()` holds, for state that only the event loop changes (so yielding to the
    loop is what makes progress; nothing sleeps for a guessed time). Fails at the deadline."""
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0)
