"""JSON-RPC over HTTP (`POST /rpc`) and WebSocket (`GET /ws`), OneTrans over `POST /onetrans`,
and `GET /healthz`, with aiohttp (PROTOCOL.md "Transports").

- `/rpc`: one request or a batch per body; `Authorization: Bearer <token>`. A wrong token is
  answered 401 after the peer's growing delay (AuthGuard, shared with TCP).
- `/ws`: JSON-RPC both ways, events as notifications. Browsers cannot set headers on a
  WebSocket, so a client without `Authorization` calls `auth {token}` first (as on TCP) within
  `api.auth_timeout_s`. Tokens never go in URLs (they would end up in histories and logs).
- CORS: only origins in `api.cors_origins` get CORS headers; a request (or WebSocket handshake,
  which browsers do not guard) carrying any other Origin is refused 403.
- Limits: bodies and frames over `api.max_message` (413 / close 1009), a token bucket per client
  address (`api.rate_per_s`, `api.rate_burst`: 429 over HTTP, an error over WebSocket), at most
  `api.max_clients` WebSockets (half of them at most unauthenticated), idle WebSockets closed
  after `api.idle_timeout_s`; at most `api.http_max_connections` connections, at most
  `api.max_unauthenticated_per_address` per address before one of its requests carries a good
  token; a request head and a body must each arrive within `api.auth_timeout_s` (408).
- `auth` is refused over `/rpc` (each request carries its token) and inside any batch; failed
  logins lock an address out (AuthGuard).
- Host: an IP address, localhost, the box's host name (and NAME.local) or `api.http_hosts`;
  any other name is a DNS-rebinding page and gets 421.
- TLS (`api.tls`): the listener gets an ssl context (agent/tls.py); the handshake must finish
  within `api.auth_timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import socket
import ssl
import time
from typing import Any, Awaitable, Callable, cast

from aiohttp import WSCloseCode, WSMsgType, web

from agent.api.jsonrpc import (APPLICATION_ERROR, INVALID_REQUEST, Dispatcher, RpcError, Session,
                               encode, error_response)
from agent.api.limits import UnauthenticatedLimit
from agent.api.methods import Api
from agent.api.outbound import MAX_IN_FLIGHT, Outbound, answer
from agent.config import ApiConfig, parse_http_listen
from agent.model import Reason

logger = logging.getLogger(__name__)

JSON_TYPE = "application/json"
METRICS_TYPE = "text/plain; version=0.0.4; charset=utf-8"  # Prometheus' text exposition format
METRICS_SCOPES = frozenset({"metrics", "admin"})


class RateLimiter:
    """A token bucket per client address; bounded memory (oldest buckets are forgotten)."""

    MAX_PEERS = 4096

    def __init__(self, rate: float, burst: int) -> None:
        self.rate = rate
        self.burst = float(burst)
        self._buckets: dict[str, tuple[float, float]] = {}

    def allow(self, peer: str) -> bool:
        now = time.monotonic()
        tokens, last = self._buckets.pop(peer, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        allowed = tokens >= 1.0
        self._buckets[peer] = (tokens - 1.0 if allowed else tokens, now)
        if len(self._buckets) > self.MAX_PEERS:
            self._buckets.pop(next(iter(self._buckets)))
        return allowed

    def retry_after(self) -> int:
        return max(1, int(1 / self.rate + 0.999))


def _rpc_error(status: int, code: int, message: str, reason: Reason, headers: dict[str, str] | None = None
               ) -> web.Response:
    body = error_response(None, RpcError(code, message, {"reason": reason.value}))
    return web.Response(status=status, body=encode(body), content_type=JSON_TYPE, headers=headers)


class HttpServer:
    def __init__(self, dispatcher: Dispatcher, api: Api, config: ApiConfig,
                 health: Callable[[], Awaitable[dict[str, Any]]],
                 metrics: Callable[[], Awaitable[bytes]] | None = None) -> None:
        self.dispatcher = dispatcher
        self.metrics_text = metrics
        self.api = api
        self.config = config
        self.health = health
        self.origins = frozenset(config.cors_origins)
        self.limiter = RateLimiter(config.rate_per_s, config.rate_burst)
        self.address: tuple[str, int] | None = None
        self.websockets: set[web.WebSocketResponse] = set()
        self._runner: web.AppRunner | None = None
        self._server: asyncio.Server | None = None
        self.tls = False
        # open connections by transport (request.transport finds a request's connection)
        self._open: dict[asyncio.BaseTransport, _Connection] = {}
        self.unauthenticated = UnauthenticatedLimit(config.max_unauthenticated_per_address)
        self.unauthenticated_websockets = 0
        self.refused_connections = 0
        self.hosts = allowed_hosts(config)

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.config.max_message, middlewares=[self._guard])
        app.router.add_post("/rpc", self.rpc)
        app.router.add_get("/ws", self.ws)
        app.router.add_post("/onetrans", self.onetrans)
        app.router.add_get("/healthz", self.healthz)
        if self.metrics_text is not None:
            app.router.add_get("/metrics", self.metrics)
        app.router.add_route("OPTIONS", "/{tail:.*}", self.preflight)
        return app

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        # handler_cancellation: a HIS that hangs up stops its read_card waiting
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        server = self._runner.server
        if server is None:
            raise RuntimeError("aiohttp's runner made no server")
        loop = asyncio.get_running_loop()
        # aiohttp's Server is the protocol factory of its low-level API (loop.create_server(server));
        # our RequestHandler subclass adds what aiohttp does not limit (see _Connection)
        self._server = await loop.create_server(
            lambda: _Connection(self, server, loop=loop, access_log=None,
                                keepalive_timeout=self.config.idle_timeout_s),
            host, port, ssl=ssl_context, reuse_address=True,
            ssl_handshake_timeout=self.config.auth_timeout_s if ssl_context is not None else None)
        self.address = tuple(self._server.sockets[0].getsockname()[:2])
        self.tls = ssl_context is not None
        logger.info("api: listening on %s://%s:%d", "https" if self.tls else "http", *self.address)

    def _admit(self, conn: "_Connection", transport: asyncio.BaseTransport) -> bool:
        """A new connection: within http_max_connections, and within its address's cap of
        unauthenticated connections. Not admitted: cut at once."""
        if len(self._open) >= self.config.http_max_connections:
            self._refuse("more than %d HTTP connections open" % self.config.http_max_connections)
            return False
        release = self.unauthenticated.admit(conn.peer)
        if release is None:
            self._refuse("%s has %d unauthenticated HTTP connections open"
                         % (conn.peer, self.config.max_unauthenticated_per_address))
            return False
        conn.release = release
        self._open[transport] = conn
        # a connection that has not sent a whole request head by then holds a slot with headers
        # that never end (slowloris)
        conn.reaper = asyncio.get_running_loop().call_later(self.config.auth_timeout_s, self._reap, conn,
                                                            transport)
        return True

    def _refuse(self, why: str) -> None:
        self.refused_connections += 1
        if self.refused_connections % 100 == 1:
            logger.warning("api: %s; cutting new ones (%d so far)", why, self.refused_connections)

    def _forget(self, transport: asyncio.BaseTransport | None) -> None:
        conn = self._open.pop(transport, None) if transport is not None else None
        if conn is not None:
            conn.release()
            if conn.reaper is not None:
                conn.reaper.cancel()

    def _reap(self, conn: "_Connection", transport: asyncio.BaseTransport) -> None:
        conn.reaper = None
        if not conn.served and not transport.is_closing():
            logger.info("api: closed an HTTP connection that sent no whole request in %.0f s",
                        self.config.auth_timeout_s)
            cast(asyncio.Transport, transport).abort()  # a stream transport (asyncio's server made it)

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def serving(self) -> bool:
        return self._server is not None and self._server.is_serving()

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for ws in list(self.websockets):
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"scanbox is stopping")
        if self._server is not None:
            self._server = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- the guard every request passes --------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        conn = self._open.get(request.transport) if request.transport is not None else None
        if conn is not None:
            conn.served = True
        host = request.headers.get("Host")
        if host is not None and not host_allowed(host, self.hosts):
            # DNS rebinding: a page on the attacker's name, resolved to this box, sends its own
            # name here; an IP address or one of the box's names cannot be rebound
            logger.warning("api: refused %s %s for Host %r (not this box's; api.http_hosts)", request.method,
                           request.path, host[:100])
            return _rpc_error(421, INVALID_REQUEST, "Host %s is not this box's name; add it to api.http_hosts"
                              % host[:100], Reason.UNAUTHORIZED)
        origin = request.headers.get("Origin")
        if origin is not None and origin not in self.origins:
            logger.warning("api: refused %s %s from origin %r (not in api.cors_origins)", request.method,
                           request.path, origin[:100])
            return _rpc_error(403, INVALID_REQUEST, "origin %s may not call this box (api.cors_origins)" % origin[:100],
                              Reason.UNAUTHORIZED)
        if request.path != "/healthz" and request.method != "OPTIONS" and not self.limiter.allow(_peer(request)):
            return _rpc_error(429, APPLICATION_ERROR, "too many requests; slow down", Reason.BUSY,
                              {"Retry-After": str(self.limiter.retry_after())})
        try:
            response = await handler(request)
        except _BodyTimeout:
            response = _rpc_error(408, INVALID_REQUEST, "the body did not arrive within %g s"
                                  % self.config.auth_timeout_s, Reason.BAD_REQUEST, {"Connection": "close"})
        except web.HTTPException as exc:
            if exc.status == 413:
                response = _rpc_error(413, INVALID_REQUEST, "body longer than %d bytes" % self.config.max_message,
                                      Reason.BAD_REQUEST)
            else:
                raise
        if origin is not None and not isinstance(response, web.WebSocketResponse):
            response.headers["Access-Control-Allow-Origin"] = origin
            response.headers["Vary"] = "Origin"
        return response

    async def preflight(self, request: web.Request) -> web.Response:
        # only reached for allowed origins (or none): the middleware refused the others
        return web.Response(status=204, headers={
            "Access-Control-Allow-Methods": "POST, GET, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type",
            "Access-Control-Max-Age": "600",
        })

    def _bearer(self, request: web.Request) -> str | None:
        header = request.headers.get("Authorization", "")
        scheme, _, token = header.partition(" ")
        return token.strip() if scheme.lower() == "bearer" and token.strip() else None

    async def _authenticate(self, request: web.Request, session: Session) -> web.Response | None:
        """None when the bearer token is good (the session gets its scopes), else the 401."""
        token = self._bearer(request)
        refusal = self.api.guard.refusal(session.peer) if token is not None else None
        if refusal is not None:
            return _rpc_error(401, APPLICATION_ERROR, refusal, Reason.UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
        found = self.api.guard.check(token) if token is not None else None
        if found is None:
            if token is not None:
                delay = self.api.guard.penalty(session.peer)
                logger.warning("api: http auth refused for %s (answer delayed %.2f s)", session.peer, delay)
                await asyncio.sleep(delay)
            return _rpc_error(401, APPLICATION_ERROR, "send Authorization: Bearer <token>" if token is None
                              else "unknown token", Reason.UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
        session.authenticate(*found)
        conn = self._open.get(request.transport) if request.transport is not None else None
        if conn is not None:
            conn.release()  # this connection is a known client's now
        return None

    # --- endpoints ---------------------------------------------------------------------------

    async def healthz(self, request: web.Request) -> web.Response:
        return web.json_response(await self.health())

    async def metrics(self, request: web.Request) -> web.Response:
        """Prometheus' scrape (agent/metrics.py): a token with the metrics or admin scope."""
        session = Session("http", _peer(request))
        refused = await self._authenticate(request, session)
        if refused is not None:
            return refused
        if not session.scopes & METRICS_SCOPES:
            return _rpc_error(403, APPLICATION_ERROR, "/metrics needs the metrics scope", Reason.UNAUTHORIZED)
        if self.metrics_text is None:  # the route exists only with it
            raise web.HTTPNotFound()
        return web.Response(body=await self.metrics_text(), headers={"Content-Type": METRICS_TYPE})

    async def _body(self, request: web.Request) -> bytes:
        """The whole body within auth_timeout_s of asking: a body sent a byte at a time holds a
        connection and a handler, and /onetrans reads it before any check can be made."""
        try:
            async with asyncio.timeout(self.config.auth_timeout_s):
                return await request.read()
        except TimeoutError:
            logger.info("api: %s sent no whole body in %g s", _peer(request), self.config.auth_timeout_s)
            raise _BodyTimeout() from None

    async def rpc(self, request: web.Request) -> web.Response:
        session = Session("http", _peer(request), auth_method=False)
        refused = await self._authenticate(request, session)
        if refused is not None:
            return refused
        body = await self._body(request)
        response = await self.dispatcher.handle_bytes(session, body)
        if response is None:
            return web.Response(status=204)
        return web.Response(body=response, content_type=JSON_TYPE, charset="utf-8")

    async def onetrans(self, request: web.Request) -> web.Response:
        """The bare pInData as the body (UTF-8, or GBK as the DLL spoke); pOutData back in the
        request's charset. The app's signature is the authentication (no bearer token)."""
        peer = _peer(request)
        charset = (request.charset or "").lower() or None
        try:
            body: bytes | None = await self._body(request)
        except web.HTTPRequestEntityTooLarge:
            # every body gets a pOutData, this one too
            out = self.api.onetrans.refused("pInData is longer than %d bytes (api.max_message)"
                                            % self.config.max_message, "http", peer)
            body = None
        except _BodyTimeout:
            out = self.api.onetrans.refused("pInData did not arrive within %g s (api.auth_timeout_s)"
                                            % self.config.auth_timeout_s, "http", peer)
            body = None
        if body is not None:
            if charset is None:
                try:
                    body.decode("utf-8")
                    charset = "utf-8"
                except UnicodeDecodeError:
                    charset = "gbk"
            try:
                text = body.decode(charset)
            except (UnicodeDecodeError, LookupError):
                out = self.api.onetrans.refused("the body is not %s text" % charset[:20], "http", peer)
            else:
                out = await self.api.onetrans.handle(text, "http", peer)
                conn = self._open.get(request.transport) if request.transport is not None else None
                if conn is not None and "sign" in out:
                    conn.release()  # a signed answer: a good signature, a known app's connection
        charset = charset or "utf-8"
        try:
            "".encode(charset)
        except LookupError:
            charset = "utf-8"
        data = json.dumps(out, ensure_ascii=False, separators=(",", ":"))
        try:
            payload = data.encode(charset)
        except UnicodeEncodeError:
            payload, charset = data.encode("utf-8"), "utf-8"
        return web.Response(body=payload, content_type=JSON_TYPE, charset=charset)

    async def ws(self, request: web.Request) -> web.StreamResponse:
        if len(self.websockets) >= self.config.max_clients:
            return _rpc_error(503, INVALID_REQUEST, "too many clients", Reason.BUSY)
        peer = _peer(request)
        session = Session("websocket", peer)
        if self._bearer(request) is not None:
            refused = await self._authenticate(request, session)
            if refused is not None:
                return refused
        elif self.unauthenticated_websockets >= self.max_unauthenticated_websockets:
            # sockets that have not sent `auth` never take the last slots from known clients
            return _rpc_error(503, INVALID_REQUEST, "too many unauthenticated WebSockets", Reason.BUSY)
        ws = web.WebSocketResponse(max_msg_size=self.config.max_message, heartbeat=30.0)
        await ws.prepare(request)
        self.websockets.add(ws)
        conn_state = self._open.get(request.transport) if request.transport is not None else None
        if not session.authenticated:
            self.unauthenticated_websockets += 1

            def authenticated() -> None:
                self.unauthenticated_websockets -= 1
                if conn_state is not None:
                    conn_state.release()

            session.on_authenticated.append(authenticated)
        conn = _WsConnection(ws, "websocket:%s" % peer)
        session.notify = conn.notify
        sender = asyncio.get_running_loop().create_task(conn.send_loop())
        in_flight: set[asyncio.Task[Any]] = set()
        slots = asyncio.Semaphore(MAX_IN_FLIGHT)
        opened = time.monotonic()
        try:
            while not conn.closed:
                timeout = self.config.idle_timeout_s
                if not session.authenticated:
                    timeout = min(timeout, opened + self.config.auth_timeout_s - time.monotonic())
                    if timeout <= 0:
                        conn.send(encode(error_response(None, RpcError(
                            APPLICATION_ERROR, "closed: no auth within %g s" % self.config.auth_timeout_s,
                            {"reason": Reason.UNAUTHORIZED.value}))))
                        break
                try:
                    msg = await ws.receive(timeout=timeout)
                except TimeoutError:
                    if session.authenticated:
                        logger.info("api: closing idle %s", conn.label)
                        break
                    continue
                if msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED):
                    break
                if msg.type == WSMsgType.ERROR:
                    # a frame over max_message: aiohttp closes with 1009 itself
                    logger.info("api: %s: %s", conn.label, ws.exception())
                    break
                if msg.type not in (WSMsgType.TEXT, WSMsgType.BINARY):
                    continue
                data = msg.data.encode("utf-8") if msg.type == WSMsgType.TEXT else msg.data
                if not self.limiter.allow(peer):
                    conn.send(encode(error_response(None, RpcError(
                        APPLICATION_ERROR, "too many requests; slow down", {"reason": Reason.BUSY.value}))))
                    continue
                await slots.acquire()
                task = asyncio.get_running_loop().create_task(answer(self.dispatcher, session, conn, data, slots))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
        finally:
            # aiohttp cancels this handler when the peer goes away: bookkeeping first
            self.websockets.discard(ws)
            if session.on_authenticated:  # never authenticated
                session.on_authenticated.clear()
                self.unauthenticated_websockets -= 1
            session.close()
            for task in in_flight:
                task.cancel()  # a read_card whose caller left stops waiting
            try:
                await asyncio.gather(*in_flight, return_exceptions=True)
                await conn.finish(sender)
            finally:
                sender.cancel()
        return ws

    @property
    def max_unauthenticated_websockets(self) -> int:
        return max(1, self.config.max_clients // 2)


class _BodyTimeout(Exception):
    """A request body that did not arrive in time (answered 408 by the guard)."""


class _Connection(web.RequestHandler):
    """aiohttp's per-connection protocol with what aiohttp does not limit: how many connections
    are open, how many per address have not authenticated, and how long a request head may take
    (HttpServer._admit). Overrides only asyncio.Protocol's own connection_made/lost."""

    def __init__(self, owner: HttpServer, manager: web.Server, **kwargs: Any) -> None:
        super().__init__(manager, **kwargs)
        self.owner = owner
        self.peer = "unknown"
        self.served = False
        self.release: Callable[[], None] = lambda: None
        self.reaper: asyncio.TimerHandle | None = None
        self._admitted_transport: asyncio.BaseTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        peername = transport.get_extra_info("peername")
        self.peer = peername[0] if peername else "unknown"
        super().connection_made(transport)
        self._admitted_transport = transport
        if not self.owner._admit(self, transport):
            cast(asyncio.Transport, transport).abort()  # a stream transport (asyncio's server made it)

    def connection_lost(self, exc: BaseException | None) -> None:
        self.owner._forget(self._admitted_transport)
        super().connection_lost(exc)


def allowed_hosts(config: ApiConfig) -> frozenset[str]:
    names = {"localhost", *config.http_hosts}
    host = socket.gethostname().lower()
    if host:
        names.update({host, host + ".local"})
    if config.http:
        listen = parse_http_listen(config.http)[0].lower()
        names.add(listen)
    return frozenset(names)


def host_allowed(header: str, names: frozenset[str]) -> bool:
    """A Host header naming an IP address (which no one can rebind) or one of `names`."""
    host = header.strip().lower()
    if host.startswith("["):
        host = host[1:host.find("]")] if "]" in host else host
    elif host.count(":") == 1:
        host = host.rsplit(":", 1)[0]
    host = host.rstrip(".")
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return host in names


class _WsConnection(Outbound):
    """A WebSocket client: one JSON message a text frame."""

    def __init__(self, ws: web.WebSocketResponse, label: str) -> None:
        super().__init__(label)
        self.ws = ws

    async def _write(self, data: bytes) -> None:
        await self.ws.send_str(data.decode("utf-8"))

    def _drop(self) -> None:
        self._closing = asyncio.get_running_loop().create_task(self._close_quietly())  # kept: not GC'd

    async def _close_quietly(self) -> None:
        with contextlib.suppress(Exception):
            await self.ws.close(code=WSCloseCode.POLICY_VIOLATION, message=b"not reading")

    async def _close(self) -> None:
        await self.ws.close()


def _peer(request: web.Request) -> str:
    return request.remote or "unknown"
