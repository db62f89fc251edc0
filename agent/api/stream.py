"""Newline-delimited JSON-RPC over a Unix socket and TCP (PROTOCOL.md "Transports").

One JSON object per line. A line over `api.max_message` gets an error and closes the connection
(there is no telling where the next message starts); bad JSON or an unknown method gets an error
and the connection stays usable. TCP clients must `auth` within `api.auth_timeout_s` unless
their address is in `api.trusted`. Each connection has one writer task and a bounded queue: a
client that stops reading is dropped, not buffered without end.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import grp
import ipaddress
import logging
import os
import socket
import stat
from pathlib import Path
from typing import Any

from agent.api.jsonrpc import APPLICATION_ERROR, INVALID_REQUEST, Dispatcher, RpcError, Session, encode, error_response
from agent.config import ApiConfig

logger = logging.getLogger(__name__)

UNIX_SCOPES = frozenset({"read", "admin"})  # whoever can open the socket file (mode, group)
TRUSTED_SCOPES = frozenset({"read"})
MAX_IN_FLIGHT = 8  # requests per connection being answered at once; more wait (backpressure)
OUTGOING_QUEUE = 256  # messages waiting to be written to one client
WRITE_TIMEOUT_S = 10.0


class StreamServer:
    def __init__(self, dispatcher: Dispatcher, config: ApiConfig) -> None:
        self.dispatcher = dispatcher
        self.config = config
        self.trusted = [ipaddress.ip_network(t, strict=False) for t in config.trusted]
        self._servers: list[asyncio.base_events.Server] = []
        self._connections: set[asyncio.Task[Any]] = set()
        self.unix_path: Path | None = None
        self.tcp_address: tuple[str, int] | None = None

    def serving(self) -> bool:
        return bool(self._servers) and all(server.is_serving() for server in self._servers)

    @property
    def clients(self) -> int:
        return len(self._connections)

    async def start_unix(self, path: Path, mode: int, group: str | None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale_socket(path)
        server = await asyncio.start_unix_server(
            lambda r, w: self._accept(r, w, "unix"), path=str(path), limit=self.config.max_message + 1)
        os.chmod(path, mode)
        if group:
            try:
                gid = grp.getgrnam(group).gr_gid
                # already its group (the daemon's own, as under scanbox.service): no chown, which
                # the unit's system call filter (~@privileged) refuses
                if os.stat(path).st_gid != gid:
                    os.chown(path, -1, gid)
            except KeyError:
                logger.warning("api: group %r does not exist; %s keeps its owner's group", group, path)
            except PermissionError:
                logger.warning("api: cannot give %s to group %r (not permitted)", path, group)
        self._servers.append(server)
        self.unix_path = path
        logger.info("api: listening on unix:%s", path)

    async def start_tcp(self, host: str, port: int) -> None:
        server = await asyncio.start_server(
            lambda r, w: self._accept(r, w, "tcp"), host=host, port=port,
            limit=self.config.max_message + 1, reuse_address=True)
        self._servers.append(server)
        self.tcp_address = server.sockets[0].getsockname()[:2]
        logger.info("api: listening on tcp:%s:%d", *self.tcp_address)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for task in list(self._connections):
            task.cancel()
        await asyncio.gather(*self._connections, return_exceptions=True)
        for server in self._servers:
            with contextlib.suppress(Exception):
                await server.wait_closed()
        self._servers.clear()
        if self.unix_path is not None:
            with contextlib.suppress(FileNotFoundError):
                self.unix_path.unlink()

    def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, transport: str) -> None:
        task = asyncio.get_running_loop().create_task(self._serve(reader, writer, transport))
        self._connections.add(task)
        task.add_done_callback(self._connections.discard)

    def _is_trusted(self, peer: str) -> bool:
        try:
            address = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(address in net for net in self.trusted)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, transport: str) -> None:
        peername = writer.get_extra_info("peername")
        peer = peername[0] if transport == "tcp" and peername else "local"
        conn = _Connection(writer, "%s:%s" % (transport, peer))
        writer_task = asyncio.get_running_loop().create_task(conn.write_loop())
        session = Session(transport, peer, notify=conn.notify)
        if transport == "unix":
            session.scopes = UNIX_SCOPES
        elif self._is_trusted(peer):
            session.scopes = TRUSTED_SCOPES
        in_flight: set[asyncio.Task[Any]] = set()
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        opened = asyncio.get_running_loop().time()
        try:
            if len(self._connections) > self.config.max_clients:
                logger.warning("api: refusing %s: %d clients connected", conn.label, len(self._connections) - 1)
                await conn.close_with(error_response(None, RpcError(INVALID_REQUEST, "too many clients")))
                return
            while not conn.closed:
                timeout = self.config.idle_timeout_s
                if not session.authenticated:
                    timeout = min(timeout, opened + self.config.auth_timeout_s - asyncio.get_running_loop().time())
                    if timeout <= 0:
                        await conn.close_with(error_response(None, RpcError(
                            APPLICATION_ERROR, "closed: no auth within %g s" % self.config.auth_timeout_s,
                            {"reason": "UNAUTHORIZED"})))
                        break
                try:
                    async with asyncio.timeout(timeout):
                        line = await reader.readuntil(b"\n")
                except TimeoutError:
                    if not session.authenticated:
                        continue  # the loop top sends the reason and closes
                    logger.info("api: closing idle %s", conn.label)
                    break
                except asyncio.IncompleteReadError as exc:
                    line = exc.partial  # the peer closed; a last message without newline still counts
                    if not line.strip():
                        break
                except asyncio.LimitOverrunError:
                    await conn.close_with(error_response(None, RpcError(
                        INVALID_REQUEST, "message longer than %d bytes" % self.config.max_message,
                        {"reason": "BAD_REQUEST"})))
                    break
                except (ConnectionError, OSError):
                    break
                if not line.strip():
                    continue
                await slots.acquire()
                task = asyncio.get_running_loop().create_task(self._answer(session, conn, line, slots))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                if reader.at_eof():
                    await asyncio.gather(*in_flight, return_exceptions=True)
                    break
        finally:
            for task in in_flight:
                task.cancel()  # a read_card whose caller left stops waiting
            await asyncio.gather(*in_flight, return_exceptions=True)
            session.close()
            await conn.finish(writer_task)

    async def _answer(self, session: Session, conn: "_Connection", line: bytes, slots: asyncio.Semaphore) -> None:
        try:
            response = await self.dispatcher.handle_bytes(session, line)
            if response is not None:
                conn.send(response)
        finally:
            slots.release()


class _Connection:
    """The writing half of a client connection: one writer task, a bounded queue."""

    def __init__(self, writer: asyncio.StreamWriter, label: str) -> None:
        self.writer = writer
        self.label = label
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(OUTGOING_QUEUE)
        self.closed = False

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        try:
            self.queue.put_nowait(data + b"\n")
        except asyncio.QueueFull:
            logger.warning("api: %s is not reading its messages; disconnecting it", self.label)
            self.closed = True
            self.writer.transport.abort()

    def notify(self, message: dict[str, Any]) -> None:
        self.send(encode(message))

    async def write_loop(self) -> None:
        try:
            while True:
                data = await self.queue.get()
                if data is None:
                    break
                self.writer.write(data)
                async with asyncio.timeout(WRITE_TIMEOUT_S):
                    await self.writer.drain()
        except (TimeoutError, ConnectionError, OSError):
            self.closed = True
            self.writer.transport.abort()

    async def close_with(self, message: dict[str, Any]) -> None:
        self.send(encode(message))
        self.closed = True

    async def finish(self, writer_task: asyncio.Task[None]) -> None:
        self.closed = True
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await writer_task
        except TimeoutError:
            writer_task.cancel()
        self.writer.close()
        with contextlib.suppress(Exception):
            await self.writer.wait_closed()


def _remove_stale_socket(path: Path) -> None:
    try:
        st = path.lstat()
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise OSError(errno.EEXIST, "%s exists and is not a socket" % path)
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except (ConnectionRefusedError, FileNotFoundError):
        path.unlink(missing_ok=True)  # left behind by a process that died
        return
    finally:
        probe.close()
    raise OSError(errno.EADDRINUSE, "another scanbox is serving %s" % path)
