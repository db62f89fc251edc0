"""The HIS API's listeners as one component: where they listen, which could not, how many
clients are connected, and whether they still serve (the watchdog asks)."""

from __future__ import annotations

import logging
import ssl
from typing import TYPE_CHECKING, Callable

from agent.api.stream import StreamServer
from agent.config import ApiConfig, Config, MetricsConfig, parse_hostport, parse_http_listen, uses_tls
from agent.model import Alarm, ComponentStatus

if TYPE_CHECKING:
    from agent.api.http import HttpServer
    from agent.metrics_server import MetricsServer

logger = logging.getLogger(__name__)


class Listeners:
    name = "api"

    def __init__(self, config: Config, stream: StreamServer, http: HttpServer | None,
                 waiting: Callable[[], int], metrics: MetricsServer | None = None) -> None:
        self.config = config
        self.stream = stream
        self.http = http
        self.metrics = metrics  # [metrics] listen: not the HIS API, but a listener all the same
        self.waiting = waiting  # read_card callers waiting for a scan
        self.failed: list[Alarm] = []  # listeners that could not start
        # SHA-256 of the certificate the TLS listeners present (what a HIS pins); None: no TLS
        self.tls_fingerprint: str | None = None

    def _tls_context(self, host: str, section: ApiConfig | MetricsConfig | None = None) -> ssl.SSLContext | None:
        """The ssl context for a listener on `host`, or None where it speaks plain (api.tls, or
        metrics.tls for the metrics port). Raises TlsError: a listener that should speak TLS never
        falls back to plain."""
        if not uses_tls(section or self.config.api, host):
            return None
        from agent import tls  # cryptography's x509: only on a box that serves TLS

        api = self.config.api
        certificate = tls.for_config(api.tls_cert, api.tls_key, self.config.state_dir())
        context = certificate.server_context()
        self.tls_fingerprint = certificate.fingerprint()
        logger.info("api: TLS certificate %s, SHA-256 fingerprint %s", certificate.cert, self.tls_fingerprint)
        return context

    async def start(self) -> None:
        """Listen on every configured transport; one that cannot is an alarm. Raises
        RuntimeError when none can (a box nobody can ask is of no use)."""
        api = self.config.api
        unix = self.config.unix_socket()
        try:
            await self.stream.start_unix(unix, int(api.unix_mode, 8), api.unix_group)
        except OSError as exc:
            self._failed("unix:%s" % unix, exc)
        if api.tcp:
            host, port = parse_hostport(api.tcp)
            try:
                await self.stream.start_tcp(host, port, self._tls_context(host))
            except (OSError, ValueError) as exc:  # TlsError is a ValueError
                self._failed("tcp:%s" % api.tcp, exc)
        if self.http is not None and api.http:
            host, port = parse_http_listen(api.http)
            try:
                await self.http.start(host, port, self._tls_context(host))
            except (OSError, ValueError) as exc:  # TlsError is a ValueError
                self._failed("http:%s" % api.http, exc)
        if self.metrics is not None and self.config.metrics.listen:
            host, port = parse_http_listen(self.config.metrics.listen)
            try:
                await self.metrics.start(host, port, self._tls_context(host, self.config.metrics))
            except (OSError, ValueError) as exc:  # TlsError is a ValueError
                self._failed("metrics:%s" % self.config.metrics.listen, exc, "METRICS_UNAVAILABLE")
        if self.stream.unix_path is None and self.stream.tcp_address is None and self.http_address is None:
            raise RuntimeError("the HIS API could not listen anywhere: %s"
                               % "; ".join(a.text for a in self.failed if a.code == "API_UNAVAILABLE"))

    def _failed(self, where: str, exc: Exception, code: str = "API_UNAVAILABLE") -> None:
        logger.error("api: cannot listen on %s: %s", where, exc)
        self.failed.append(Alarm(code, where, str(exc)))

    @property
    def http_address(self) -> tuple[str, int] | None:
        return self.http.address if self.http is not None else None

    def serving(self) -> bool:
        """Whether the listeners that started still serve."""
        return self.stream.serving() and (self.http is None or self.http_address is None or self.http.serving())

    async def close(self) -> None:
        await self.stream.close()
        if self.http is not None:
            await self.http.close()
        if self.metrics is not None:
            await self.metrics.close()

    async def get_status(self) -> ComponentStatus:
        alarms = list(self.failed)
        if (self.stream.unix_path is not None or self.stream.tcp_address is not None
                or self.http_address is not None) and not self.serving():
            alarms.append(Alarm("API_UNAVAILABLE", "api", "a listener has stopped serving"))
        return ComponentStatus({"clients": self.stream.clients, "waiting_read_card": self.waiting(),
                                "websockets": len(self.http.websockets) if self.http is not None else 0,
                                # what a HIS pins (docs/api.md "TLS"); null while no listener speaks TLS
                                "tls_fingerprint": self.tls_fingerprint},
                               alarms)
