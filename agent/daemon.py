"""Wiring and lifecycle: config -> platform, drivers, hub, API; sd_notify; signals.

READY=1 goes out once the drivers are started and the API listens; the platform need not be
reachable (the box must start and serve offline). WATCHDOG=1 is sent from the event loop itself,
so a blocked loop or a dead API server stops the pings and systemd restarts the service. A
missing scanner is an alarm, not an exit (STYLE.md item 8).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

import drivers
from agent import __version__, clock as clocks, platforms, provision
from agent.api.jsonrpc import Dispatcher
from agent.api.methods import Api
from agent.api.stream import StreamServer
from agent.config import Config, parse_hostport, parse_http_listen
from agent.hub import Hub, HubSink
from agent.model import device_id_default
from agent.outbox import Store, StoreUnavailable, Uploader
from agent.platforms.base import Platform
from agent.qr import Classifier
from agent.sdnotify import Notifier
from agent.ui import Fonts, Ui
from agent.verifier import Verifier
from drivers.base import Backoff, Source
from drivers.display import Display

if TYPE_CHECKING:
    from agent.api.http import HttpServer
    from agent.metrics import BoxMetrics
    from agent.metrics_server import MetricsServer

logger = logging.getLogger(__name__)

STATUS_INTERVAL_S = 1.0
HOUSEKEEPING_S = 600.0
OUTBOX_EVENT_DELAY_S = 0.1
NETWORK_CHECK_S = 10.0


# /proc/self/net, not /proc/net: the unit's ProcSubset=pid hides /proc's top level (the same
# tables: a process sees its own network namespace's)
ROUTE_FILES = ("/proc/self/net/route", "/proc/self/net/ipv6_route")


def network_up(route_files: tuple[str, ...] = ROUTE_FILES) -> bool:
    """A default route on an interface other than loopback, IPv4 or IPv6."""
    for path in route_files:
        try:
            with open(path, encoding="ascii") as fh:
                lines = fh.read().splitlines()
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            if path.endswith("ipv6_route"):
                # destination, prefix length ... device last
                if len(fields) >= 10 and fields[0] == "0" * 32 and fields[1] == "00" and fields[-1] != "lo":
                    return True
            elif len(fields) >= 4 and fields[1] == "00000000" and fields[0] != "lo" and int(fields[3], 16) & 1:
                return True  # Destination 0.0.0.0 and flags RTF_UP
    return False


class Daemon:
    def __init__(self, config: Config, *, sources: list[Source] | None = None,
                 platform: Platform | None = None, notifier: Notifier | None = None,
                 clock: clocks.Clock | None = None) -> None:
        self.config = config
        self.clock = clock or clocks.Clock(sync_wait_s=config.clock.sync_wait)
        clocks.install(self.clock)
        self.device_id = config.device.id or device_id_default()
        self.state_dir = config.state_dir()
        self.platform = platform or platforms.create(config, self.state_dir)
        self.store = Store(self.state_dir / "outbox.db", clock=self.clock, clock_ok=self.clock.sane)
        self.uploader = Uploader(self.store, self.platform, max_in_flight=config.outbox.max_in_flight,
                                 backoff=Backoff(config.outbox.backoff_initial, config.outbox.backoff_max),
                                 clock=self.clock, clock_ok=self.clock.sane)
        self.clock.on_sane.append(self.uploader.wake)
        self.verifier = Verifier(self.platform, Classifier.from_rules(config.platform.qr),
                                 config.site.medstep, config.site.channel, store=self.store,
                                 uploader=self.uploader, cache_ttl_s=config.cache.ttl,
                                 deadline_s=config.platform.verify_deadline_s, clock=self.clock)
        self.hub = Hub(self.verifier, dedupe_s=config.scans.dedupe_s, hold_s=config.scans.hold_s)
        self.sources = sources if sources is not None else [
            drivers.source_module(options.driver).create(name, options)
            for name, options in config.sources.items()]
        self.display: Display | None = None
        self.ui: Ui | None = None
        if config.display is not None:
            self.display = Display(config.display, on_change=self._display_changed)
            self.ui = Ui(self.display.show, config.display.size, Fonts(config.display.font),
                         result_s=config.display.result_s)
        self.api = Api(self.hub, self.platform, self.status, config.api.clients, self.store, self.uploader,
                       ui=self.ui, onetrans=config.api.onetrans)
        self.dispatcher = Dispatcher(self.api.methods())
        self.stream = StreamServer(self.dispatcher, config.api)
        # GET /metrics is served over HTTP: prometheus-client is loaded only where it can be
        self.metrics: BoxMetrics | None = None
        if config.api.http or config.metrics.listen:
            from agent.metrics import BoxMetrics

            self.metrics = BoxMetrics(self)
        # aiohttp's server is a fifth of the start-up imports: loaded only for a box that serves HTTP
        self.http: HttpServer | None = None
        if config.api.http:
            from agent.api.http import HttpServer

            self.http = HttpServer(self.dispatcher, self.api, config.api, self.health,
                                   self.metrics.exposition if self.metrics is not None else None)
        self.metrics_server: MetricsServer | None = None
        if config.metrics.listen and self.metrics is not None:
            from agent.metrics_server import MetricsServer

            self.metrics_server = MetricsServer(self.metrics.exposition, self.api.guard,
                                                require_token=config.metrics.require_token)
        self.notifier = notifier or Notifier()
        self.started_at = time.monotonic()
        self.ready_at: float | None = None
        self._api_alarms: list[dict[str, Any]] = []
        self._platform_reachable: bool | None = None
        self._status_pending = False
        self._outbox_event_pending = False
        self.network_up: bool | None = None
        self.uploader.on_change = self._outbox_changed
        self._tasks: list[asyncio.Task[Any]] = []
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self._stopped = False

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        # past a file-size limit, writes fail with EFBIG (the store reports it) instead of the
        # signal killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        try:
            self.state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        except OSError as exc:
            logger.error("state directory %s: %s", self.state_dir, exc)
        loop = asyncio.get_running_loop()
        self._loop = loop
        if self.ui is not None and self.display is not None:
            # first, so the screen hears of every source and scan from the start
            self.hub.listen(self.ui.on_event)
            self.display.start()
            provisioned = provision.recent_outcome()
            if provisioned is not None:  # first boot: the technician is looking at the screen
                self.ui.show_provisioning(*provisioned)
            self._tasks.append(loop.create_task(self.ui.run(), name="ui"))
        self._tasks.append(loop.create_task(self.platform.start(), name="platform-start"))
        await self.store.open()
        # a box that recorded a use in 2026 is not in 1970 now
        self.clock.raise_floor(self.store.newest, "the newest record in the outbox")
        self._tasks.append(loop.create_task(self.uploader.run(), name="uploader"))
        self._tasks.append(loop.create_task(self._housekeeping(), name="housekeeping"))
        self._tasks.append(loop.create_task(self._watch_network(), name="network"))
        sink = HubSink(self.hub, loop)
        for source in self.sources:
            try:
                source.start(sink)
            except Exception as exc:  # one broken driver must not take the box down
                logger.exception("%s: failed to start", source.name)
                self.hub.source_connected(source.name, False, "failed to start: %s" % exc)
        await self._start_api()
        self.hub.listen(self._on_event)
        if self.metrics is not None:
            self.metrics.attach()
        interval = Notifier.watchdog_interval()
        if interval:
            self._tasks.append(loop.create_task(self._watchdog(interval), name="watchdog"))
        self.ready_at = time.monotonic()
        self.ready.set()
        self.notifier.ready(self.status_line(await self._outbox_stats()))
        logger.info("scanbox %s ready as %s in %.0f ms", __version__, self.device_id,
                    (self.ready_at - self.started_at) * 1000)

    async def _start_api(self) -> None:
        api = self.config.api
        try:
            await self.stream.start_unix(self.config.unix_socket(), int(api.unix_mode, 8), api.unix_group)
        except OSError as exc:
            logger.error("api: cannot listen on %s: %s", self.config.unix_socket(), exc)
            self._api_alarms.append(_alarm("API_UNAVAILABLE", "unix:%s" % self.config.unix_socket(), str(exc)))
        if api.tcp:
            host, port = parse_hostport(api.tcp)
            try:
                await self.stream.start_tcp(host, port)
            except OSError as exc:
                logger.error("api: cannot listen on tcp:%s: %s", api.tcp, exc)
                self._api_alarms.append(_alarm("API_UNAVAILABLE", "tcp:%s" % api.tcp, str(exc)))
        if self.http is not None:
            host, port = parse_http_listen(api.http)
            try:
                await self.http.start(host, port)
            except OSError as exc:
                logger.error("api: cannot listen on http:%s: %s", api.http, exc)
                self._api_alarms.append(_alarm("API_UNAVAILABLE", "http:%s" % api.http, str(exc)))
        if self.metrics_server is not None and self.config.metrics.listen:
            host, port = parse_http_listen(self.config.metrics.listen)
            try:
                await self.metrics_server.start(host, port)
            except OSError as exc:
                logger.error("metrics: cannot listen on %s: %s", self.config.metrics.listen, exc)
                self._api_alarms.append(_alarm("METRICS_UNAVAILABLE", "metrics:%s" % self.config.metrics.listen,
                                               str(exc)))
        if self.stream.unix_path is None and self.stream.tcp_address is None and self.http_address is None:
            raise RuntimeError("the HIS API could not listen anywhere: %s"
                               % "; ".join(a["text"] for a in self._api_alarms))

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.notifier.stopping()
        await self.stream.close()
        if self.http is not None:
            await self.http.close()
        if self.metrics_server is not None:
            await self.metrics_server.close()
        await self.hub.close()
        # drivers block while they release their devices: off the loop
        stopping = [asyncio.to_thread(s.stop) for s in self.sources]
        if self.display is not None:
            stopping.append(asyncio.to_thread(self.display.stop))
        await asyncio.gather(*stopping, return_exceptions=True)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.verifier.drain()
        await self.store.close()
        await self.platform.close()
        self.notifier.close()
        logger.info("scanbox stopped")

    async def run(self) -> None:
        """Start, serve until SIGTERM or SIGINT, stop cleanly."""
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self._stopping.set)
        try:
            await self.start()
            await self._stopping.wait()
        finally:
            # the handlers stay until the loop closes: a second Ctrl-C (or `timeout`, which
            # signals the whole process group) must not kill the process halfway through closing
            # the outbox, nor the demo before it removes its temporary state
            await self.stop()

    async def _watchdog(self, interval: float) -> None:
        while True:
            if self._alive():
                self.notifier.watchdog()
            else:
                logger.error("watchdog: the API has stopped serving; no longer telling systemd we are alive")
            await asyncio.sleep(interval)

    def _alive(self) -> bool:
        return self.stream.serving() and (self.http is None or self.http_address is None or self.http.serving())

    async def _watch_network(self) -> None:
        """Whether the box is on a network at all (a default route), apart from whether the
        platform answers: the two tell a technician different things. Published on change."""
        while True:
            up = await asyncio.to_thread(network_up)
            if up != self.network_up:
                self.network_up = up
                logger.info("network: %s", "up (default route)" if up else "DOWN: no default route")
                self.hub.publish("status", {"network": {"up": up}})
            await asyncio.sleep(NETWORK_CHECK_S)

    async def _housekeeping(self) -> None:
        """Personal data does not outstay its use: sent records after `outbox.retention`,
        cached identities after `cache.ttl`."""
        while True:
            try:
                # by a wrong clock everything looks expired (or nothing does): wait for a right one
                if self.clock.sane():
                    sent, dead, cached = await self.store.housekeeping(self.config.outbox.retention,
                                                                       self.config.outbox.dead_retention)
                    if sent or dead or cached:
                        logger.info("outbox: deleted %d uploaded records, %d dead ones and %d expired identities",
                                    sent, dead, cached)
                        self._outbox_changed()
            except StoreUnavailable:
                pass  # an alarm already says so
            await asyncio.sleep(HOUSEKEEPING_S)

    # --- status ----------------------------------------------------------------------------

    def _on_event(self, kind: str, data: dict[str, Any]) -> None:
        if kind == "verification":
            reachable = self.platform.health().reachable
            if reachable != self._platform_reachable:
                self._platform_reachable = reachable
                self.hub.publish("status", {"platform": self.platform.health().to_json()})
        if kind in ("verification", "status") and not self._status_pending:
            # coalesce: at most one STATUS= a second, however fast scans arrive
            self._status_pending = True
            asyncio.get_running_loop().call_later(STATUS_INTERVAL_S, self._send_status)

    def _display_changed(self, connected: bool, error: str | None) -> None:
        """From the display's thread: tell status subscribers (and kiosks) on the loop."""
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(self.hub.publish, "status", {"display": self._display_status()})

    def _display_status(self) -> dict[str, Any]:
        if self.display is None or self.ui is None:
            return {"configured": False, "connected": False}
        return {"configured": True, "connected": self.display.connected, "model": self.display.options.describe(),
                "error": self.display.error, "cjk_font": self.ui.fonts.cjk,
                "screen": self.ui.screen.kind if self.ui.screen else None}

    def _outbox_changed(self) -> None:
        """Publish the outbox's counts (the display's pending badge, kiosks, tests), coalesced."""
        if not self._outbox_event_pending:
            self._outbox_event_pending = True
            asyncio.get_running_loop().call_later(OUTBOX_EVENT_DELAY_S, self._spawn_outbox_event)

    def _spawn_outbox_event(self) -> None:
        self._outbox_event_pending = False
        self._spawn(self._publish_outbox())

    async def _publish_outbox(self) -> None:
        stats = await self._outbox_stats()
        self.hub.publish("status", {"outbox": dict(stats, available=True) if stats
                                    else {"available": False, "error": self.store.error}})

    def _send_status(self) -> None:
        self._status_pending = False
        self._spawn(self._notify_status())

    def _spawn(self, coro: Any) -> None:
        """A short task that stop() waits for (or cancels)."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.append(task)
        task.add_done_callback(lambda t: self._tasks.remove(t) if t in self._tasks else None)

    async def _notify_status(self) -> None:
        self.notifier.status(self.status_line(await self._outbox_stats()))

    async def _outbox_stats(self) -> dict[str, Any] | None:
        try:
            return await self.store.stats()
        except StoreUnavailable:
            return None

    def alarms(self, outbox: dict[str, Any] | None) -> list[dict[str, Any]]:
        out = list(self._api_alarms)
        for state in self.hub.sources.values():
            if not state.connected:
                out.append(_alarm("SOURCE_DISCONNECTED", state.name, state.detail or "not connected"))
        health = self.platform.health()
        if health.reachable is False:
            out.append(_alarm("PLATFORM_UNREACHABLE", health.kind, health.last_error or "unreachable"))
        elif health.last_error:
            out.append(_alarm("PLATFORM_ERROR", health.kind, health.last_error))
        if self.store.error:
            out.append(_alarm("OUTBOX_UNAVAILABLE", "outbox", self.store.error))
        if self.store.recovered:
            out.append(_alarm("OUTBOX_RECOVERED", "outbox", self.store.recovered))
        if self.store.unrecorded:
            out.append(_alarm("USES_UNRECORDED", "outbox", "%d uses could not be recorded for upload; their scan "
                              "ids and times: `scanbox outbox unrecorded`" % self.store.unrecorded))
        if self.store.keyring is not None and self.store.keyring.beside_data:
            out.append(_alarm("STORE_KEY_BESIDE_DATA", "outbox", "the key that seals personal data is %s, beside "
                              "the data (no store.key credential): restart the service as shipped, which makes "
                              "/etc/scanbox/store.key" % self.store.keyring.source))
        out += self.clock.alarms()
        if self.uploader.blocked:
            out.append(_alarm("OUTBOX_BLOCKED", "outbox", self.uploader.blocked))
        if self.display is not None and not self.display.connected:
            out.append(_alarm("DISPLAY_MISSING", self.display.options.describe(),
                              self.display.error or "not connected"))
        if self.ui is not None and not self.ui.fonts.cjk:
            out.append(_alarm("DISPLAY_NO_CJK_FONT", "display", "no Chinese font (install fonts-wqy-zenhei): "
                              "the screen shows English"))
        if outbox and outbox["dead"]:
            out.append(_alarm("OUTBOX_DEAD", "outbox", "%d records the platform refused; see `scanbox outbox "
                              "list --state dead`" % outbox["dead"]))
        return out

    async def status(self) -> dict[str, Any]:
        outbox = await self._outbox_stats()
        return {
            "device_id": self.device_id,
            "version": __version__,
            "uptime_s": round(time.monotonic() - self.started_at, 1),
            "network": {"up": self.network_up},
            "clock": self.clock.status(),
            "platform": self.platform.health().to_json(),
            "sources": [s.to_json() for s in self.hub.sources.values()],
            "display": self._display_status(),
            "outbox": dict(outbox, available=True) if outbox else {"available": False, "error": self.store.error},
            "alarms": self.alarms(outbox),
            "api": {"clients": self.stream.clients, "waiting_read_card": self.hub.waiting,
                    "websockets": len(self.http.websockets) if self.http is not None else 0},
            "scans": self.hub.scans_total,
        }

    @property
    def http_address(self) -> tuple[str, int] | None:
        """Where the HTTP/WebSocket API listens; None when it does not."""
        return self.http.address if self.http is not None else None

    async def health(self) -> dict[str, Any]:
        """GET /healthz, for monitoring without a token: no personal data, no configuration."""
        outbox = await self._outbox_stats()
        return {"ok": True, "version": __version__, "uptime_s": round(time.monotonic() - self.started_at, 1),
                "alarms": sorted({a["code"] for a in self.alarms(outbox)})}

    def status_line(self, outbox: dict[str, Any] | None = None) -> str:
        health = self.platform.health()
        platform = {True: "platform ok", False: "OFFLINE",
                    None: "platform not yet asked"}[health.reachable]
        connected = sum(1 for s in self.hub.sources.values() if s.connected)
        pending = "%d pending" % outbox["pending"] if outbox else "outbox unavailable"
        return "%s; %s; %d/%d sources; %d alarms; %d scans" % (
            platform, pending, connected, len(self.sources), len(self.alarms(outbox)), self.hub.scans_total)


def _alarm(code: str, where: str, text: str) -> dict[str, Any]:
    return {"code": code, "source": where, "text": text}


def run(config: Config) -> int:
    """`scanbox run`: the daemon until SIGTERM."""
    daemon = Daemon(config)
    try:
        asyncio.run(daemon.run())
    except RuntimeError as exc:
        logger.error("%s", exc)
        return 1
    return 0
