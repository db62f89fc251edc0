"""Wiring and lifecycle: config -> platform, drivers, hub, API; sd_notify; signals.

READY=1 goes out once the drivers are started and the API listens; the platform need not be
reachable (the box must start and serve offline). WATCHDOG=1 is sent from the event loop itself,
so a blocked loop or a dead API server stops the pings and systemd restarts the service. A
missing scanner is an alarm, not an exit (STYLE.md item 8).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import signal
import time
from typing import TYPE_CHECKING, Any, Callable

import msgspec

import drivers
import agent
from agent import clock as clocks, platforms, provision
from agent.api.jsonrpc import Dispatcher
from agent.api.listeners import Listeners
from agent.api.methods import Api
from agent.api.stream import StreamServer
from agent.config import Config
from agent.events import (ComponentsChanged, DisplayChanged, Event, EventType, NetworkChanged, OutboxChanged,
                          PlatformChanged, Verified)
from agent.hub import Hub, HubSink
from agent.model import Alarm, Component, ComponentStatus, device_id_default
from agent.outbox import Store, StoreUnavailable, Uploader
from agent.platforms.base import Platform
from agent.qr import Classifier
from agent.sdnotify import Notifier
from agent.supervisor import Supervisor
from agent.ui import DisplayComponent, Fonts, Ui
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


FINGERPRINT_SCREEN_S = 30.0


def fingerprint_lines(fingerprint: str) -> list[str]:
    """The start of the TLS certificate's SHA-256 as the screen shows it: 32 hex digits."""
    digits = fingerprint.replace(":", "")
    return ["TLS SHA-256"] + [" ".join(digits[i:i + 4] for i in range(start, start + 16, 4)) for start in (0, 16)]


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


class NetworkWatch:
    """Whether the box is on a network at all (a default route), apart from whether the
    platform answers: the two tell a technician different things. Published on change."""

    name = "network"

    def __init__(self, on_change: Callable[[bool], None]) -> None:
        self.up: bool | None = None
        self.on_change = on_change

    async def run(self) -> None:
        while True:
            up = await asyncio.to_thread(network_up)
            if up != self.up:
                self.up = up
                logger.info("network: %s", "up (default route)" if up else "DOWN: no default route")
                self.on_change(up)
            await asyncio.sleep(NETWORK_CHECK_S)

    async def get_status(self) -> ComponentStatus:
        return ComponentStatus({"up": self.up})


class Daemon:
    def __init__(self, config: Config, *, sources: list[Source] | None = None,
                 platform: Platform | None = None, notifier: Notifier | None = None,
                 clock: clocks.Clock | None = None, supervisor: Supervisor | None = None) -> None:
        self.config = config
        self.clock = clock or clocks.Clock(sync_wait_s=config.clock.sync_wait)
        clocks.install(self.clock)
        self.device_id = config.device.id or device_id_default()
        self.state_dir = config.state_dir()
        # owns every long-lived task and thread: a failure is logged, alarmed and restarted
        self.supervisor = supervisor or Supervisor()
        self.platform = platform or platforms.create(config, self.state_dir)
        # a record made while the clock is not right keeps its scan's boot time (Clock.stamp)
        self.store = Store(self.state_dir / "outbox.db", clock=self.clock, stamp=self.clock.stamp,
                           supervisor=self.supervisor)
        self.uploader = Uploader(self.store, self.platform, max_in_flight=config.outbox.max_in_flight,
                                 backoff=Backoff(config.outbox.backoff_initial, config.outbox.backoff_max),
                                 clock=self.clock, clock_ok=self.clock.sane, timekeeper=self.clock)
        self.clock.on_sane.append(self.uploader.wake)
        self.clock.on_right.append(self.uploader.wake)  # the records held for it are re-timed
        self.verifier = Verifier(self.platform, Classifier.from_rules(config.platform.qr),
                                 config.site.medstep, config.site.channel, store=self.store,
                                 uploader=self.uploader, cache_ttl_s=config.cache.ttl,
                                 deadline_s=config.platform.verify_deadline_s, clock=self.clock,
                                 supervisor=self.supervisor)
        self.hub = Hub(self.verifier, dedupe_s=config.scans.dedupe_s, hold_s=config.scans.hold_s,
                       supervisor=self.supervisor)
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
        self.api.onetrans.clock_problem = self.clock.problem  # no freshness check on a wrong clock
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
        self.listeners = Listeners(config, self.stream, self.http, lambda: self.hub.waiting, self.metrics_server)
        self.network = NetworkWatch(lambda up: self.hub.publish(NetworkChanged(up)))
        self.screen = DisplayComponent(self.display, self.ui)
        # every part that reports its own health (agent.model.Component): `status` shows each
        # one's status under its name and all their alarms; sd_notify STATUS, /healthz, /metrics
        # and doctor (through `status`) read the same. A new component is one more entry here.
        self.components: list[Component] = [
            self.network, self.platform, self.hub.component, self.screen, self.store, self.uploader,
            self.listeners, self.clock, self.supervisor]
        self.notifier = notifier or Notifier()
        self.started_at = time.monotonic()
        self.ready_at: float | None = None
        self._platform_reachable: bool | None = None
        self._status_pending = False
        self._outbox_event_pending = False
        self.uploader.on_change = self._outbox_changed
        self.supervisor.on_change = self._supervision_changed
        self._stopping = asyncio.Event()
        self.ready = asyncio.Event()
        self._stopped = False

    @property
    def network_up(self) -> bool | None:
        return self.network.up

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
        supervise = self.supervisor
        if self.ui is not None and self.display is not None:
            # first, so the screen hears of every source and scan from the start
            self.hub.listen(self.ui.on_event)
            self.display.start()
            provisioned = provision.recent_outcome()
            if provisioned is not None:  # first boot: the technician is looking at the screen
                self.ui.show_provisioning(*provisioned)
            supervise.task("ui", self.ui.run)
        supervise.spawn(self._start_platform(), "platform start")
        await self.store.open()
        # a box that recorded a use in 2026 is not in 1970 now
        self.clock.raise_floor(self.store.newest, "the newest record in the outbox")
        supervise.task("uploader", self.uploader.run)
        supervise.task("housekeeping", self._housekeeping)
        supervise.task("network", self.network.run)
        sink = HubSink(self.hub, loop)
        for source in self.sources:
            supervise.child(source.name, functools.partial(self._restart_source, source, sink))
            try:
                source.start(sink)
            except Exception as exc:  # one broken driver must not take the box down
                logger.exception("%s: failed to start", source.name)
                self.hub.source_connected(source.name, False, "failed to start: %s" % exc)
        await self.listeners.start()
        if self.ui is not None and self.tls_fingerprint is not None and not self.ui.showing_message():
            # the technician compares this with what the HIS pinned (`scanbox tls show` has it whole)
            self.ui.show_message(fingerprint_lines(self.tls_fingerprint), FINGERPRINT_SCREEN_S)
        self.hub.listen(self._on_event)
        if self.metrics is not None:
            self.metrics.attach()
        interval = Notifier.watchdog_interval()
        if interval:
            supervise.task("watchdog", functools.partial(self._watchdog, interval), critical=True)
        self.ready_at = time.monotonic()
        self.ready.set()
        self.notifier.ready(await self.status_line())
        logger.info("scanbox %s ready as %s in %.0f ms", agent.__version__, self.device_id,
                    (self.ready_at - self.started_at) * 1000)

    async def _start_platform(self) -> None:
        await self.platform.start()
        self._platform_maybe_changed()  # the credential fetched at start is an answer too

    async def _restart_source(self, source: Source, sink: HubSink) -> None:
        """A source whose thread died: released, then started again (the supervisor's backoff)."""
        await asyncio.to_thread(source.stop)
        source.start(sink)

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        self.notifier.stopping()
        await self.listeners.close()
        await self.hub.close()
        # drivers block while they release their devices: off the loop
        stopping = [asyncio.to_thread(s.stop) for s in self.sources]
        if self.display is not None:
            stopping.append(asyncio.to_thread(self.display.stop))
        await asyncio.gather(*stopping, return_exceptions=True)
        await self.verifier.drain()  # cache updates in flight
        await self.supervisor.close()
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
        told = False
        while True:
            if self._alive():
                self.notifier.watchdog()
            elif not told:
                told = True
                logger.error("watchdog: %s; no longer telling systemd we are alive",
                             "the API has stopped serving" if self.supervisor.healthy()
                             else "a critical part cannot recover")
            await asyncio.sleep(interval)

    def _alive(self) -> bool:
        return self.listeners.serving() and self.supervisor.healthy()

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

    def _on_event(self, event: Event) -> None:
        if isinstance(event, Verified):
            self._platform_maybe_changed()
        if event.type is not EventType.SCAN:
            self._status_soon()

    def _platform_maybe_changed(self) -> None:
        reachable = self.platform.health().reachable
        if reachable != self._platform_reachable:
            self._platform_reachable = reachable
            self.hub.publish(PlatformChanged(msgspec.structs.replace(self.platform.health())))

    def _status_soon(self) -> None:
        if not self._status_pending:
            # coalesce: at most one STATUS= a second, however fast scans arrive
            self._status_pending = True
            asyncio.get_running_loop().call_later(STATUS_INTERVAL_S, self._send_status)

    def _supervision_changed(self) -> None:
        """A child failed, was restarted or given up: subscribers and systemd hear of it."""
        self.hub.publish(ComponentsChanged({n: c.to_json() for n, c in self.supervisor.children.items()}))

    def _display_changed(self, connected: bool, error: str | None) -> None:
        """From the display's thread: tell status subscribers (and kiosks) on the loop."""
        with contextlib.suppress(RuntimeError):  # the loop is closing
            self._loop.call_soon_threadsafe(self._publish_display)

    def _publish_display(self) -> None:
        self.hub.publish(DisplayChanged(self.screen.status()))

    def _outbox_changed(self) -> None:
        """Publish the outbox's counts (the display's pending badge, kiosks, tests), coalesced."""
        if not self._outbox_event_pending:
            self._outbox_event_pending = True
            asyncio.get_running_loop().call_later(OUTBOX_EVENT_DELAY_S, self._spawn_outbox_event)

    def _spawn_outbox_event(self) -> None:
        self._outbox_event_pending = False
        self.supervisor.spawn(self._publish_outbox(), "publish outbox")

    async def _publish_outbox(self) -> None:
        try:
            stats = await self.store.stats()
        except StoreUnavailable:
            stats = None
        self.hub.publish(OutboxChanged(stats, self.store.error))

    def _send_status(self) -> None:
        self._status_pending = False
        self.supervisor.spawn(self._notify_status(), "sd_notify status")

    async def _notify_status(self) -> None:
        self.notifier.status(await self.status_line())

    async def reports(self) -> dict[str, ComponentStatus]:
        """Every component's status and alarms, by name. One after the other, not gathered:
        only the store's may wait (for its database thread, and rarely), and a task for each of
        nine components was a third of a `status` call's CPU (status is asked per scan by some
        kiosks); each awaited here, not through a coroutine of its own."""
        reports = {}
        for component in self.components:
            try:
                reports[component.name] = await component.get_status()
            except Exception as exc:  # one component's bug must not take `status` down with it
                logger.exception("%s: cannot report its status", component.name)
                reports[component.name] = ComponentStatus(None, [Alarm(
                    "COMPONENT_FAILED", component.name, "cannot report its status: %s" % exc)])
        return reports

    async def alarms(self) -> list[dict[str, Any]]:
        return [a.to_json() for r in (await self.reports()).values() for a in r.alarms]

    async def status(self) -> dict[str, Any]:
        reports = await self.reports()
        out: dict[str, Any] = {"device_id": self.device_id, "version": agent.__version__,
                               "uptime_s": round(time.monotonic() - self.started_at, 1)}
        alarms = []
        for name, report in reports.items():
            out[name] = report.status
            for alarm in report.alarms:
                alarms.append(alarm.to_json())
        out["alarms"] = alarms
        out["scans"] = self.hub.scans_total
        return out

    @property
    def tls_fingerprint(self) -> str | None:
        """SHA-256 of the certificate the TLS listeners present; None while none speaks TLS."""
        return self.listeners.tls_fingerprint

    @property
    def http_address(self) -> tuple[str, int] | None:
        """Where the HTTP/WebSocket API listens; None when it does not."""
        return self.listeners.http_address

    async def health(self) -> dict[str, Any]:
        """GET /healthz, for monitoring without a token: no personal data, no configuration."""
        reports = await self.reports()
        return {"ok": True, "version": agent.__version__, "uptime_s": round(time.monotonic() - self.started_at, 1),
                "alarms": sorted({a.code for r in reports.values() for a in r.alarms})}

    async def status_line(self) -> str:
        """sd_notify STATUS: the platform, the outbox, the sources, the alarms, in one line."""
        reports = await self.reports()
        platform = {True: "platform ok", False: "OFFLINE",
                    None: "platform not yet asked"}[reports["platform"].status["reachable"]]
        outbox = reports["outbox"].status
        pending = "%d pending" % outbox["pending"] if outbox.get("available") else "outbox unavailable"
        connected = sum(1 for s in reports["sources"].status if s["connected"])
        alarms = sum(len(r.alarms) for r in reports.values())
        return "%s; %s; %d/%d sources; %d alarms; %d scans" % (
            platform, pending, connected, len(self.sources), alarms, self.hub.scans_total)


def run(config: Config) -> int:
    """`scanbox run`: the daemon until SIGTERM."""
    daemon = Daemon(config)
    try:
        asyncio.run(daemon.run())
    except RuntimeError as exc:
        logger.error("%s", exc)
        return 1
    return 0
