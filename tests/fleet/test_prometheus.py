"""Debian's real Prometheus, with contrib's scrape job (over TLS), scrapes a running box: after a
few scans, an offline period (the platform simulator stopped, then back) and an unplugged
scanner, its metrics port answers with the values, and the alert rules of contrib/prometheus
evaluate on them.

No sleeping for a guessed time: each step waits until the box has been scraped twice since the
state changed (so a whole scrape that saw the change is in Prometheus' store), then queries."""

from __future__ import annotations

import asyncio
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml

from agent import tls
from tests.fleet.common import METRICS_TOKEN, api_with_metrics

RULES = Path(__file__).resolve().parents[2] / "contrib" / "prometheus" / "scanbox-rules.yml"
SCRAPE_CONFIG = RULES.with_name("prometheus.yml")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Prometheus:
    """Debian's Prometheus with contrib/prometheus.yml's `scanbox` job as a region copies it
    (https, the box's certificate trusted, the token from a file), aimed at one box."""

    def __init__(self, directory: Path, target: tuple[str, int], box_certificate: Path) -> None:
        binary = shutil.which("prometheus")
        if binary is None:
            raise AssertionError("prometheus is missing: bootstrap.sh installs Debian's prometheus package")
        self.port = free_port()
        self.url = "http://127.0.0.1:%d" % self.port
        shutil.copy(RULES, directory / "rules.yml")
        jobs = yaml.safe_load(SCRAPE_CONFIG.read_text(encoding="utf-8"))["scrape_configs"]
        job = next(j for j in jobs if j["job_name"] == "scanbox")
        (directory / job["authorization"]["credentials_file"]).write_text(METRICS_TOKEN + "\n")
        shutil.copy(box_certificate, directory / job["tls_config"]["ca_file"])
        del job["file_sd_configs"]
        job.update(scrape_timeout="1s",
                   static_configs=[{"targets": ["%s:%d" % target], "labels": {"site": "clinic-4"}}])
        (directory / "prometheus.yml").write_text(yaml.safe_dump({
            "global": {"scrape_interval": "1s", "scrape_timeout": "1s", "evaluation_interval": "1s"},
            "rule_files": ["rules.yml"], "scrape_configs": [job]}))
        self.log = open(directory / "prometheus.log", "wb")
        self.proc = subprocess.Popen(
            [binary, "--config.file=%s" % (directory / "prometheus.yml"),
             "--storage.tsdb.path=%s" % (directory / "tsdb"),
             "--web.listen-address=127.0.0.1:%d" % self.port, "--log.level=warn"],
            cwd=directory, stdout=self.log, stderr=subprocess.STDOUT)
        self.directory = directory

    async def ready(self, http: aiohttp.ClientSession, timeout: float = 60) -> None:
        async with asyncio.timeout(timeout):
            while True:
                if self.proc.poll() is not None:
                    raise AssertionError("prometheus exited %s: %s" % (
                        self.proc.returncode, (self.directory / "prometheus.log").read_text()[-2000:]))
                try:
                    async with http.get(self.url + "/-/ready") as response:
                        if response.status == 200:
                            return
                except aiohttp.ClientConnectionError:
                    pass
                # Prometheus offers no event to wait on for readiness: ask again shortly
                await asyncio.sleep(0.2)

    async def query(self, http: aiohttp.ClientSession, promql: str) -> list[dict[str, Any]]:
        async with http.get(self.url + "/api/v1/query", params={"query": promql}) as response:
            body = await response.json()
        assert body["status"] == "success", body
        return body["data"]["result"]

    async def value(self, http: aiohttp.ClientSession, promql: str) -> float | None:
        result = await self.query(http, promql)
        assert len(result) <= 1, result
        return float(result[0]["value"][1]) if result else None

    async def alert(self, http: aiohttp.ClientSession, name: str, timeout: float = 30) -> str:
        """The state of an alert once its rule has been evaluated on the stored values: rules run
        on Prometheus' own timer (each second here), with nothing to wait on but its API."""
        async with asyncio.timeout(timeout):
            while True:
                async with http.get(self.url + "/api/v1/alerts") as response:
                    body = await response.json()
                states = {a["labels"]["alertname"]: a["state"] for a in body["data"]["alerts"]}
                if name in states:
                    return states[name]
                await asyncio.sleep(0.25)

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def scraped_twice(box, timeout: float = 30) -> None:
    """Until two more scrapes have begun: the first of them saw the state as it is now, and
    Prometheus (one scrape of a target at a time) has stored it by the time the second begins."""
    metrics = box.daemon.metrics
    async with metrics.scraped:
        target = metrics.scrapes + 2
        async with asyncio.timeout(timeout):
            await metrics.scraped.wait_for(lambda: metrics.scrapes >= target)


@pytest.mark.timeout(240)
async def test_a_real_prometheus_sees_scans_an_offline_period_and_an_unplugged_scanner(box, http, tmp_path):
    # TLS as on a clinic LAN ("auto" is plain on loopback only because loopback is not a network)
    await box.start(api=api_with_metrics(), metrics={"listen": "127.0.0.1:0", "tls": "on",
                                                     "labels": {"district": "chengdong"}},
                    platform={"timeout_s": 1, "verify_deadline_s": 2},
                    outbox={"backoff_initial": 0.2, "backoff_max": 0.5})
    assert box.daemon.metrics_server.tls
    prometheus = Prometheus(tmp_path, box.daemon.metrics_server.address,
                            tls.default_paths(box.daemon.config.state_dir()).cert)
    try:
        await prometheus.ready(http)
        await scraped_twice(box)
        assert await prometheus.value(http, 'up{job="scanbox"}') == 1
        assert await prometheus.value(http, 'scanbox_build_info{box_id="test-box", district="chengdong"}') == 1

        # a few scans, verified online
        residents = [box.resident(i) for i in range(3)]
        for resident in residents:
            box.scan(resident.static_qr)
            await box.events.wait("verification", lambda d, r=resident: d["scan"]["payload"] == r.static_qr)
        await scraped_twice(box)
        assert await prometheus.value(http, 'scanbox_scans_total{source="serial:counter", kind="qr"}') == 3
        assert await prometheus.value(http, 'sum(scanbox_scan_results_total{outcome="ok", offline="false"})') == 3
        assert await prometheus.value(http, 'scanbox_platform_reachable') == 1
        p95 = await prometheus.value(http, "histogram_quantile(0.95, sum by (le) "
                                     "(scanbox_verification_seconds_bucket))")
        assert p95 is not None and 0 < p95 <= 16

        # offline: the platform is gone; a code verified before is answered from the cache and
        # its use waits in the outbox
        port = box.sim.port
        await box.sim.close()
        start = len(box.events.events)
        box.scan(residents[0].static_qr)
        await box.events.wait("verification", lambda d: d["verification"]["offline"], start=start)
        await scraped_twice(box)
        assert await prometheus.value(http, 'scanbox_platform_reachable{platform="rhc"}') == 0
        assert await prometheus.value(http, 'scanbox_alarm{code="PLATFORM_UNREACHABLE"}') == 1
        assert await prometheus.value(http, 'scanbox_outbox_records{state="pending"}') == 1
        assert await prometheus.value(http, 'scanbox_scan_results_total{outcome="ok", offline="true"}') == 1
        assert await prometheus.value(http, 'scanbox_outbox_oldest_pending_age_seconds') is not None
        assert await prometheus.alert(http, "ScanboxPlatformUnreachable") == "pending"  # for: 10m

        # back: the uploader delivers the queued use
        await box.sim.start("127.0.0.1", port)
        await box.events.wait("status", lambda d: d.get("outbox", {}).get("pending") == 0, timeout=30, start=start)
        await scraped_twice(box)
        assert await prometheus.value(http, 'scanbox_outbox_records{state="pending"}') == 0
        assert await prometheus.value(http, 'scanbox_uploads_total{result="sent"}') == 1
        assert await prometheus.value(http, 'max_over_time(scanbox_outbox_records{state="pending"}[1m])') == 1

        # the scanner is unplugged
        box.scanner.unplug()
        await box.events.wait("status", lambda d: d.get("source", {}).get("connected") is False)
        await scraped_twice(box)
        assert await prometheus.value(http, 'scanbox_source_connected{source="serial:counter"}') == 0
        assert await prometheus.value(http, 'scanbox_alarm{code="SOURCE_DISCONNECTED", where="serial:counter"}') == 1
        assert await prometheus.alert(http, "ScanboxScannerMissing") == "pending"  # for: 5m
        assert await prometheus.value(http, 'up{job="scanbox"}') == 1
    finally:
        prometheus.stop()
