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
  `api.max_clients` WebSockets, idle WebSockets closed after `api.idle_timeout_s`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from typing import Any, Awaitable, Callable

from aiohttp import WSCloseCode, WSMsgType, web

from agent.api.jsonrpc import (APPLICATION_ERROR, INVALID_REQUEST, Dispatcher, RpcError, Session,
                               encode, error_response)
from agent.api.methods import Api
from agent.api.outbound import MAX_IN_FLIGHT, Outbound, answer
from agent.config import ApiConfig
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
        self._site: web.TCPSite | None = None
        # connections that sent a whole request head; a connection not here when its
        # auth_timeout_s is up is holding a slot with headers that never end (slowloris)
        self._served: set[Any] = set()
        self.refused_connections = 0

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

    async def start(self, host: str, port: int) -> None:
        # handler_cancellation: a HIS that hangs up stops its read_card waiting
        self._runner = web.AppRunner(self.app(), access_log=None, handler_cancellation=True)
        await self._runner.setup()
        if self._runner.server is None:  # setup() made it; aiohttp types it optional
            raise RuntimeError("aiohttp made no server")
        self._limit_connections(self._runner.server)
        self._site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await self._site.start()
        self.address = tuple(self._runner.addresses[0][:2])
        logger.info("api: listening on http://%s:%d", *self.address)

    def _limit_connections(self, server: web.Server) -> None:
        """aiohttp limits neither how many connections are open nor how long a request head may
        take. Both matter on a hospital LAN: every connection is a file descriptor the Unix socket
        and the platform share, and a client that trickles headers holds one forever. So: at most
        `api.http_max_connections` open (more are cut at once), and a connection that has not sent
        a whole request head within `api.auth_timeout_s` is closed. (aiohttp's Server calls
        `connection_made` on itself for every connection: that is the hook.)"""
        loop = asyncio.get_running_loop()
        accept = server.connection_made

        def connection_made(handler: Any, transport: asyncio.Transport) -> None:
            accept(handler, transport)
            if len(server.connections) > self.config.http_max_connections:
                self.refused_connections += 1
                if self.refused_connections % 100 == 1:
                    logger.warning("api: more than %d HTTP connections open; cutting new ones (%d so far)",
                                   self.config.http_max_connections, self.refused_connections)
                transport.abort()
                return
            loop.call_later(self.config.auth_timeout_s, self._reap, handler, transport)

        server.connection_made = connection_made  # type: ignore[method-assign]

    def _reap(self, handler: Any, transport: asyncio.Transport) -> None:
        if handler in self._served:
            self._served.discard(handler)
        elif not transport.is_closing():
            logger.info("api: closed an HTTP connection that sent no whole request in %.0f s",
                        self.config.auth_timeout_s)
            transport.abort()

    def serving(self) -> bool:
        # the listening sockets of a closed or broken server are gone
        return self._runner is not None and bool(self._runner.addresses)

    async def close(self) -> None:
        for ws in list(self.websockets):
            with contextlib.suppress(Exception):
                await ws.close(code=WSCloseCode.GOING_AWAY, message=b"scanbox is stopping")
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- the guard every request passes --------------------------------------------------

    @web.middleware
    async def _guard(self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        self._served.add(request.protocol)
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
        found = self.api.guard.check(token) if token is not None else None
        if found is None:
            if token is not None:
                delay = self.api.guard.penalty(session.peer)
                logger.warning("api: http auth refused for %s (answer delayed %.2f s)", session.peer, delay)
                await asyncio.sleep(delay)
            return _rpc_error(401, APPLICATION_ERROR, "send Authorization: Bearer <token>" if token is None
                              else "unknown token", Reason.UNAUTHORIZED, {"WWW-Authenticate": "Bearer"})
        self.api.guard.forgive(session.peer)
        session.client, session.scopes = found
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

    async def rpc(self, request: web.Request) -> web.Response:
        session = Session("http", _peer(request))
        refused = await self._authenticate(request, session)
        if refused is not None:
            return refused
        body = await request.read()
        response = await self.dispatcher.handle_bytes(session, body)
        if response is None:
            return web.Response(status=204)
        return web.Response(body=response, content_type=JSON_TYPE, charset="utf-8")

    async def onetrans(self, request: web.Request) -> web.Response:
        """The bare pInData as the body (UTF-8, or GBK as the DLL spoke); pOutData back in the
        request's charset. The app's signature is the authentication (no bearer token)."""
        peer = "http:%s" % _peer(request)
        charset = (request.charset or "").lower() or None
        try:
            body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            # every body gets a pOutData, this one too
            out = self.api.onetrans.refused("pInData is longer than %d bytes (api.max_message)"
                                            % self.config.max_message, peer)
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
                out = self.api.onetrans.refused("the body is not %s text" % charset[:20], peer)
            else:
                out = await self.api.onetrans.handle(text, peer)
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
        ws = web.WebSocketResponse(max_msg_size=self.config.max_message, heartbeat=30.0)
        await ws.prepare(request)
        self.websockets.add(ws)
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
            session.close()
            for task in in_flight:
                task.cancel()  # a read_card whose caller left stops waiting
            try:
                await asyncio.gather(*in_flight, return_exceptions=True)
                await conn.finish(sender)
            finally:
                sender.cancel()
        return ws

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
