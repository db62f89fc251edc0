"""GET /metrics: the box as a Prometheus target (docs/fleet.md, contrib/prometheus).

Two kinds of values:
- events, counted as they happen: scans (hub events), verifications and their latency, every
  business call to the platform and its round trip (Platform.observers);
- state, read at scrape time from the daemon's own status (`Daemon.status()`: sources, platform,
  outbox, display, alarms), the uploader's counters and the daemon's clock (agent/clock.py). This adapter is the
  one place that knows where each value lives, so the scrape follows the status `status` shows.

No label carries personal data or a payload: labels are source names from the config, scan
kinds, scanbox's reason codes, platform operation names and return codes (checked against a
pattern: anything else is "other"), alarm codes and where they are.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import platform as pyplatform
import re
from typing import TYPE_CHECKING, Any, Iterable, Iterator

from prometheus_client import (CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, PlatformCollector,
                               ProcessCollector, disable_created_metrics, generate_latest)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from agent import __version__
from agent.config import dump
from agent.events import Event, ScanRead, Verified
from agent.platforms.base import Exchange

if TYPE_CHECKING:
    from agent.daemon import Daemon

logger = logging.getLogger(__name__)

# the _created series double a scrape for what process_start_time_seconds already says
disable_created_metrics()

CONTENT_TYPE = CONTENT_TYPE_LATEST

# a verification at the counter: a nurse waits; the platform's deadline is 8 s by default
VERIFY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
ROUND_TRIP_BUCKETS = (0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0)

# a platform's code goes into a label only when it looks like one of the tables' codes
_CODE = re.compile(r"^[0-9A-Za-z_.-]{1,24}$")
_OPERATION = re.compile(r"^[0-9A-Za-z_.]{1,48}$")

def config_hash(config: Any) -> str:
    """Which configuration a box runs, comparable across a fleet: the effective config (secrets
    masked, so the hash gives none away), hashed."""
    text = json.dumps(dump(config), sort_keys=True, ensure_ascii=False, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:12]


def _label(value: Any, pattern: re.Pattern[str]) -> str:
    text = str(value) if value is not None else ""
    return text if pattern.fullmatch(text) else ("none" if not text else "other")


class BoxMetrics:
    """The registry a scrape renders. Built by the daemon; `exposition()` per scrape."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.scans = Counter("scanbox_scans", "Scans read, by source and kind (after de-duplication).",
                             ["source", "kind"], registry=self.registry)
        self.results = Counter(
            "scanbox_scan_results", "Verified scans by outcome: ok, or scanbox's reason code in lower case; "
            "offline=true when answered without the platform.", ["source", "kind", "outcome", "offline"],
            registry=self.registry)
        self.verify_seconds = Histogram(
            "scanbox_verification_seconds", "Time from a scan to its verification's answer, by scan kind.",
            ["kind"], buckets=VERIFY_BUCKETS, registry=self.registry)
        self.round_trip = Histogram(
            "scanbox_platform_request_seconds", "Round trip of each business call to the platform, by "
            "operation and outcome (ok, rejected, unavailable).", ["operation", "outcome"],
            buckets=ROUND_TRIP_BUCKETS, registry=self.registry)
        self.answers = Counter("scanbox_platform_answers", "Platform answers by operation and return code "
                               "(code=\"none\": no answer).", ["operation", "code"], registry=self.registry)
        self.state = StateCollector(daemon)
        self.registry.register(self.state)
        self._lock = asyncio.Lock()
        self.scrapes = 0  # renders begun; `scraped` is notified at each (tests wait on it)
        self.scraped = asyncio.Condition()

    def attach(self) -> None:
        """Listen to the hub and the platform (at the daemon's start)."""
        self.daemon.hub.listen(self.on_event)
        self.daemon.platform.observers.append(self.on_exchange)

    def on_event(self, event: Event) -> None:
        if isinstance(event, ScanRead):
            if event.scan.source.startswith("api:"):
                return  # verify_qr: the caller scanned it; counted with its result
            self.scans.labels(event.scan.source, event.scan.kind.value).inc()
        elif isinstance(event, Verified):
            scan, verification = event.result.scan, event.result.verification
            if verification is None:
                return
            outcome = "ok" if verification.ok else (verification.reason.value.lower() if verification.reason
                                                     else "error")
            self.results.labels(scan.source, scan.kind.value, outcome,
                                "true" if verification.offline else "false").inc()
            self.verify_seconds.labels(scan.kind.value).observe(verification.elapsed_ms / 1000.0)

    def on_exchange(self, exchange: Exchange) -> None:
        operation = _label(exchange.operation, _OPERATION)
        self.round_trip.labels(operation, exchange.outcome).observe(exchange.seconds)
        self.answers.labels(operation, _label(exchange.code, _CODE)).inc()

    async def exposition(self) -> bytes:
        """The text exposition format, with the state read now."""
        async with self.scraped:
            self.scrapes += 1
            self.scraped.notify_all()
        async with self._lock:  # one snapshot per render: concurrent scrapes take turns
            self.state.snapshot = await self.daemon.status()
            try:
                return generate_latest(self.registry)
            finally:
                self.state.snapshot = None


class StateCollector(Collector):
    """What the box is like now, from its status at scrape time."""

    def __init__(self, daemon: Daemon) -> None:
        self.daemon = daemon
        self.snapshot: dict[str, Any] | None = None
        config = daemon.config
        labels = {"version": __version__, "python": pyplatform.python_version(), "box_id": daemon.device_id,
                  "config_hash": config_hash(config), "platform": config.platform.kind,
                  "org_code": config.site.org_code, "hospital_code": config.site.hospital_code,
                  "city_code": config.site.city_code, "department": config.site.department}
        labels.update(config.metrics.labels)
        self.build_labels = labels

    def describe(self) -> Iterable[Metric]:
        return []  # values appear and go (alarms, sources): nothing to check up front

    def collect(self) -> Iterator[Metric]:
        status = self.snapshot
        build = GaugeMetricFamily("scanbox_build_info", "The box: version, id, config hash, site.",
                                  labels=list(self.build_labels))
        build.add_metric(list(self.build_labels.values()), 1)
        yield build
        if status is None:
            return  # registry self-checks outside a scrape
        yield from self._sources(status)
        yield from self._platform(status)
        yield from self._outbox(status)
        yield from self._alarms(status)
        yield from self._clock()
        network = GaugeMetricFamily("scanbox_network_up", "1 when the box has a default route.")
        if status["network"]["up"] is not None:
            network.add_metric([], 1 if status["network"]["up"] else 0)
        yield network
        display = GaugeMetricFamily("scanbox_display_connected", "1 when the configured display answers "
                                    "(absent: no display configured).")
        if status["display"].get("configured"):
            display.add_metric([], 1 if status["display"].get("connected") else 0)
        yield display
        api = status["api"]
        clients = GaugeMetricFamily("scanbox_api_clients", "Open HIS API connections by transport.",
                                    labels=["transport"])
        clients.add_metric(["stream"], api["clients"])
        clients.add_metric(["websocket"], api["websockets"])
        yield clients
        waiting = GaugeMetricFamily("scanbox_read_card_waiting", "read_card calls waiting for a scan.")
        waiting.add_metric([], api["waiting_read_card"])
        yield waiting

    def _sources(self, status: dict[str, Any]) -> Iterator[Metric]:
        connected = GaugeMetricFamily("scanbox_source_connected", "1 when the scanner or reader is there.",
                                      labels=["source", "kind"])
        problems = CounterMetricFamily("scanbox_source_problems", "Read errors and garbled frames per source.",
                                       labels=["source", "kind"])
        for source in status["sources"]:
            connected.add_metric([source["name"], source["kind"]], 1 if source["connected"] else 0)
            problems.add_metric([source["name"], source["kind"]], source["problems"])
        yield connected
        yield problems

    def _platform(self, status: dict[str, Any]) -> Iterator[Metric]:
        health = self.daemon.platform.health()
        reachable = GaugeMetricFamily("scanbox_platform_reachable", "1 when the platform answered the last "
                                      "call, 0 when it could not be asked (absent: not asked yet).",
                                      labels=["platform"])
        if health.reachable is not None:
            reachable.add_metric([health.kind], 1 if health.reachable else 0)
        yield reachable
        last_ok = GaugeMetricFamily("scanbox_platform_last_ok_timestamp_seconds",
                                    "When the platform last answered (Unix time).", labels=["platform"])
        if health.last_ok_at:
            last_ok.add_metric([health.kind], health.last_ok_at)
        yield last_ok
        age = GaugeMetricFamily("scanbox_platform_credential_age_seconds",
                                "Age of the platform credential in use (authKey, workKey).", labels=["platform"])
        if health.credential_age_s is not None:
            age.add_metric([health.kind], health.credential_age_s)
        yield age
        offset = getattr(self.daemon.platform, "clock_offset_s", None)
        skew = GaugeMetricFamily("scanbox_platform_clock_offset_seconds", "Seconds the platform's clock is "
                                 "ahead of the box's, where the platform tells (its Date header).",
                                 labels=["platform"])
        if isinstance(offset, (int, float)):
            skew.add_metric([health.kind], offset)
        yield skew

    def _outbox(self, status: dict[str, Any]) -> Iterator[Metric]:
        outbox = status["outbox"]
        available = GaugeMetricFamily("scanbox_outbox_available", "1 when the outbox database works.")
        available.add_metric([], 1 if outbox.get("available") else 0)
        yield available
        records = GaugeMetricFamily("scanbox_outbox_records", "Usage records in the outbox by state.",
                                    labels=["state"])
        oldest = GaugeMetricFamily("scanbox_outbox_oldest_pending_age_seconds",
                                   "Age of the oldest record not yet uploaded (0: none pending).")
        cached = GaugeMetricFamily("scanbox_identity_cache_entries", "Identities cached for offline answers.")
        held = GaugeMetricFamily("scanbox_outbox_held_for_clock", "Pending usage records made while the clock was "
                                 "not right, waiting for it to be right to be re-timed.")
        if outbox.get("available"):
            for state in ("pending", "dead", "sent"):
                records.add_metric([state], outbox[state])
            oldest.add_metric([], outbox["oldest_pending_age_s"] or 0)
            cached.add_metric([], outbox["cached_identities"])
            held.add_metric([], outbox["held_for_clock"])
        yield records
        yield oldest
        yield cached
        yield held
        uploader = self.daemon.uploader
        uploads = CounterMetricFamily("scanbox_uploads", "Outbox upload attempts by result: sent, dead "
                                      "(refused for good), failed (to be retried).", labels=["result"])
        uploads.add_metric(["sent"], uploader.sent)
        uploads.add_metric(["dead"], uploader.dead)
        uploads.add_metric(["failed"], uploader.failed)
        yield uploads
        backing_off = GaugeMetricFamily("scanbox_uploads_backing_off", "1 while uploads wait out a backoff.")
        backing_off.add_metric([], 1 if uploader.backing_off else 0)
        yield backing_off

    def _alarms(self, status: dict[str, Any]) -> Iterator[Metric]:
        alarm = GaugeMetricFamily("scanbox_alarm", "An alarm raised now (1), by code and the part it is about.",
                                  labels=["code", "where"])
        seen = set()
        for item in status["alarms"]:
            key = (item["code"], str(item["source"]))
            if key not in seen:
                seen.add(key)
                alarm.add_metric(list(key), 1)
        yield alarm
        count = GaugeMetricFamily("scanbox_alarms", "How many alarms are raised now.")
        count.add_metric([], len(seen))
        yield count

    def _clock(self) -> Iterator[Metric]:
        # the daemon's Clock: the answer `status`, the CLOCK_UNSYNCHRONISED alarm and doctor give
        clock = self.daemon.clock
        synchronised, by = clock.synchronised_by()
        synced = GaugeMetricFamily("scanbox_clock_synchronized", "1 when the clock is synchronised (NTP), as the "
                                   "box's status says; absent when the box cannot tell.", labels=["method"])
        error = GaugeMetricFamily("scanbox_clock_maxerror_seconds", "The kernel's bound on the clock's error.")
        if synchronised is not None and by is not None:
            synced.add_metric([by], 1 if synchronised else 0)
        maxerror = clock.maxerror_s()
        if maxerror is not None:
            error.add_metric([], maxerror)
        yield synced
        yield error
