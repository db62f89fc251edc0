"""Newline-delimited JSON-RPC over a Unix socket and TCP (PROTOCOL.md "Transports").

One JSON object per line. A line over `api.max_message` gets an error and closes the connection
(there is no telling where the next message starts); bad JSON or an unknown method gets an error
and the connection stays usable. TCP clients must `auth` within `api.auth_timeout_s` unless
their address is in `api.trusted`; at most `api.max_unauthenticated_per_address` connections
from one address may be waiting to; the Unix socket and TCP each have `api.max_clients` of their
own. TCP speaks TLS when `api.tls` says so (agent/tls.py). Each connection has one writer task and a bounded queue: a
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
import ssl
import stat
from pathlib import Path
from typing import Any, Callable

from agent.api.jsonrpc import APPLICATION_ERROR, INVALID_REQUEST, Dispatcher, RpcError, Session, encode, error_response
from agent.api.limits import UnauthenticatedLimit
from agent.api.outbound import MAX_IN_FLIGHT, Outbound, answer
from agent.config import ApiConfig

logger = logging.getLogger(__name__)

UNIX_SCOPES = frozenset({"read", "admin"})  # whoever can open the socket file (mode, group)
TRUSTED_SCOPES = frozenset({"read"})


class StreamServer:
    def __init__(self, dispatcher: Dispatcher, config: ApiConfig) -> None:
        self.dispatcher = dispatcher
        self.config = config
        self.trusted = [ipaddress.ip_network(t, strict=False) for t in config.trusted]
        self._servers: list[asyncio.base_events.Server] = []
        self._connections: set[asyncio.Task[Any]] = set()
        # each transport its own count against max_clients: TCP clients never starve the Unix
        # socket, the admin's way in
        self._per_transport: dict[str, int] = {"unix": 0, "tcp": 0}
        self.unauthenticated = UnauthenticatedLimit(config.max_unauthenticated_per_address)
        self.tls = False
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

    async def start_tcp(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        server = await asyncio.start_server(
            lambda r, w: self._accept(r, w, "tcp"), host=host, port=port,
            limit=self.config.max_message + 1, reuse_address=True, ssl=ssl_context,
            ssl_handshake_timeout=self.config.auth_timeout_s if ssl_context is not None else None)
        self._servers.append(server)
        self.tcp_address = server.sockets[0].getsockname()[:2]
        self.tls = ssl_context is not None
        logger.info("api: listening on %s:%s:%d", "tls" if self.tls else "tcp", *self.tcp_address)

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
        writer_task = asyncio.get_running_loop().create_task(conn.send_loop())
        session = Session(transport, peer, notify=conn.notify)
        if transport == "unix":
            session.scopes = UNIX_SCOPES
        elif self._is_trusted(peer):
            session.scopes = TRUSTED_SCOPES
        in_flight: set[asyncio.Task[Any]] = set()
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        opened = asyncio.get_running_loop().time()
        self._per_transport[transport] += 1
        release: Callable[[], None] | None = _nothing
        if not session.authenticated:
            release = self.unauthenticated.admit(peer)
            if release is not None:
                session.on_authenticated.append(release)
        try:
            if self._per_transport[transport] > self.config.max_clients:
                logger.warning("api: refusing %s: %d %s clients connected", conn.label,
                               self._per_transport[transport] - 1, transport)
                await conn.close_with(error_response(None, RpcError(INVALID_REQUEST, "too many clients")))
                return
            if release is None:
                logger.warning("api: refusing %s: %d unauthenticated connections from it", conn.label,
                               self.config.max_unauthenticated_per_address)
                await conn.close_with(error_response(None, RpcError(
                    INVALID_REQUEST, "too many connections from %s that have not authenticated" % peer,
                    {"reason": "BUSY"})))
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
                task = asyncio.get_running_loop().create_task(answer(self.dispatcher, session, conn, line, slots))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                if reader.at_eof():
                    await asyncio.gather(*in_flight, return_exceptions=True)
                    break
        finally:
            self._per_transport[transport] -= 1
            if release is not None:
                release()
            for task in in_flight:
                task.cancel()  # a read_card whose caller left stops waiting
            await asyncio.gather(*in_flight, return_exceptions=True)
            session.close()
            await conn.finish(writer_task)

class _Connection(Outbound):
    """A Unix or TCP client: one JSON message a line."""

    def __init__(self, writer: asyncio.StreamWriter, label: str) -> None:
        super().__init__(label)
        self.writer = writer

    async def _write(self, data: bytes) -> None:
        self.writer.writelines((data, b"\n"))
        await self.writer.drain()

    def _write_now(self, data: bytes) -> bool:
        transport = self.writer.transport
        if transport.is_closing() or transport.get_write_buffer_size():
            return False  # the sender task writes it, waiting for the buffer to drain
        self.writer.writelines((data, b"\n"))
        return True

    def _drop(self) -> None:
        self.writer.transport.abort()

    async def _close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()

    async def close_with(self, message: dict[str, Any]) -> None:
        self.send(encode(message))
        self.closed = True


def _nothing() -> None:
    """What a connection that was never counted as unauthenticated gives back."""


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
