"""`[metrics] listen`: GET /metrics on a port of its own, for a Prometheus server on a management
network that should not reach the HIS API. Nothing else is served there. TLS as on the API's
listeners (`metrics.tls`, the box's certificate): the bearer token and the box's state do not
cross a clinic network in clear."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Awaitable, Callable

from aiohttp import web

from agent.api.http import METRICS_SCOPES, METRICS_TYPE
from agent.api.methods import AuthGuard

logger = logging.getLogger(__name__)


class MetricsServer:
    def __init__(self, render: Callable[[], Awaitable[bytes]], guard: AuthGuard, *, require_token: bool) -> None:
        self.render = render
        self.guard = guard
        self.require_token = require_token
        self.address: tuple[str, int] | None = None
        self.tls = False
        self._runner: web.AppRunner | None = None

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        app = web.Application(client_max_size=4096)
        app.router.add_get("/metrics", self.metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True, ssl_context=ssl_context)
        try:
            await site.start()
        except OSError:
            await self._runner.cleanup()
            self._runner = None
            raise
        self.address = tuple(self._runner.addresses[0][:2])
        self.tls = ssl_context is not None
        logger.info("metrics: listening on %s://%s:%d/metrics%s", "https" if self.tls else "http", *self.address,
                    "" if self.require_token else " (no token asked)")

    async def metrics(self, request: web.Request) -> web.Response:
        if self.require_token:
            scheme, _, token = request.headers.get("Authorization", "").partition(" ")
            refusal = self.guard.refusal(request.remote or "unknown")  # an address locked out (AuthGuard)
            if refusal is not None:
                return web.Response(status=401, text=refusal + "\n", headers={"WWW-Authenticate": "Bearer"})
            found = self.guard.check(token.strip()) if scheme.lower() == "bearer" and token.strip() else None
            if found is None or not found[1] & METRICS_SCOPES:
                peer = request.remote or "unknown"
                if token:
                    delay = self.guard.penalty(peer)
                    logger.warning("metrics: scrape refused for %s (answer delayed %.2f s)", peer, delay)
                    await asyncio.sleep(delay)
                return web.Response(status=401, text="send Authorization: Bearer <a token with the metrics scope>\n",
                                    headers={"WWW-Authenticate": "Bearer"})
        return web.Response(body=await self.render(), headers={"Content-Type": METRICS_TYPE})

    async def close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
