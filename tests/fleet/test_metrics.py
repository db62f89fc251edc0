"""GET /metrics on a running box: what it counts, who may scrape, and no personal data in it."""

from __future__ import annotations

import aiohttp
import pytest

from agent.config import ConfigError, validate
from tests.conftest import ADMIN_TOKEN, TOKEN, config_dict
from tests.fleet.common import METRICS_TOKEN, api_with_metrics, samples, scrape, value


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


def url(box) -> str:
    return "http://%s:%d/metrics" % box.daemon.http.address


async def test_a_scrape_counts_scans_results_platform_calls_and_outbox(box, http):
    await box.start(api=api_with_metrics(), metrics={"labels": {"region": "xining", "site": "clinic-4"}})
    resident = box.resident()
    box.scan(resident.static_qr)
    await box.events.wait("verification", lambda d: d["verification"]["ok"])
    box.scan("NOT-A-HEALTH-CODE-12345")
    await box.events.wait("verification", lambda d: d["verification"]["reason"] == "QR_UNKNOWN")
    status, text = await scrape(http, url(box))
    assert status == 200
    m = samples(text)
    source = "serial:counter"
    assert value(m, "scanbox_scans_total", source=source, kind="qr") == 2
    assert value(m, "scanbox_scan_results_total", source=source, outcome="ok", offline="false") == 1
    assert value(m, "scanbox_scan_results_total", source=source, outcome="qr_unknown") == 1
    assert value(m, "scanbox_verification_seconds_count", kind="qr") == 2
    assert value(m, "scanbox_platform_request_seconds_count", operation="RHC_E0003", outcome="ok") == 1
    assert value(m, "scanbox_platform_answers_total", operation="RHC_E0003", code="3005") == 1  # 验证成功
    assert value(m, "scanbox_platform_reachable", platform="rhc") == 1
    assert value(m, "scanbox_source_connected", source=source, kind="serial") == 1
    assert value(m, "scanbox_outbox_records", state="pending") == 0
    assert value(m, "scanbox_outbox_oldest_pending_age_seconds") == 0
    assert value(m, "scanbox_alarms") == 0
    assert value(m, "scanbox_build_info", box_id="test-box", region="xining", site="clinic-4",
                 platform="rhc") == 1
    assert value(m, "process_resident_memory_bytes") > 0


async def test_scrapes_hold_no_personal_data_and_no_token(box, http):
    await box.start(api=api_with_metrics())
    resident = box.resident()
    box.scan(resident.static_qr)
    await box.events.wait("verification", lambda d: d["verification"]["ok"])
    # a code that carries personal data in clear (a ticket with a name and ID number)
    leaky = "%s|%s|%s" % (resident.name, resident.id_card, resident.cellphone)
    box.scan(leaky)
    await box.events.wait("verification", lambda d: d["scan"]["payload"] == leaky)
    _, text = await scrape(http, url(box))
    for secret in (resident.name, resident.id_card, resident.cellphone, resident.static_qr,
                   resident.static_qr[:64], METRICS_TOKEN, TOKEN, ADMIN_TOKEN, "scanbox-secret"):
        assert secret not in text, "%r in the scrape" % secret


async def test_only_a_token_with_the_metrics_or_admin_scope_may_scrape(box, http):
    await box.start(api=api_with_metrics())
    assert (await scrape(http, url(box), None))[0] == 401
    assert (await scrape(http, url(box), "wrong"))[0] == 401
    assert (await scrape(http, url(box), TOKEN))[0] == 403  # a HIS token reads cards, not metrics
    assert (await scrape(http, url(box), ADMIN_TOKEN))[0] == 200
    # and a metrics token reads no cards
    async with http.post(url(box).replace("/metrics", "/rpc"), json={"jsonrpc": "2.0", "id": 1, "method": "status"},
                         headers={"Authorization": "Bearer %s" % METRICS_TOKEN}) as response:
        assert (await response.json())["error"]["data"]["reason"] == "UNAUTHORIZED"


async def test_a_port_of_its_own_for_a_management_network(box, http):
    await box.start(api=api_with_metrics(), metrics={"listen": "127.0.0.1:0"})
    address = "http://%s:%d" % box.daemon.metrics_server.address
    assert (await scrape(http, address + "/metrics", None))[0] == 401
    assert (await scrape(http, address + "/metrics", TOKEN))[0] == 401
    status, text = await scrape(http, address + "/metrics")
    assert status == 200 and "scanbox_build_info{" in text
    async with http.post(address + "/rpc", json={}) as response:
        assert response.status in (404, 405)  # nothing but /metrics there


async def test_the_own_port_speaks_tls_with_the_box_certificate(box, http):
    """As the HIS API's listeners do: the token and the box's state never cross a network in clear."""
    await box.start(api=api_with_metrics(), metrics={"listen": "127.0.0.1:0", "tls": "on"})
    server = box.daemon.metrics_server
    fingerprint = box.daemon.tls_fingerprint
    assert server.tls and fingerprint  # the box's certificate, the one `status` and doctor show
    address = "%s:%d" % server.address
    pinned = aiohttp.Fingerprint(bytes.fromhex(fingerprint.replace(":", "")))
    async with http.get("https://%s/metrics" % address, ssl=pinned,
                        headers={"Authorization": "Bearer %s" % METRICS_TOKEN}) as response:
        assert response.status == 200 and "scanbox_build_info{" in await response.text()
    with pytest.raises(aiohttp.ServerFingerprintMismatch):
        await http.get("https://%s/metrics" % address, ssl=aiohttp.Fingerprint(bytes(32)))
    with pytest.raises(aiohttp.ClientError):  # in clear, nothing is answered (no token is read)
        await scrape(http, "http://%s/metrics" % address)


async def test_auto_tls_on_the_own_port_is_plain_on_loopback_only(box, http):
    await box.start(api=api_with_metrics(), metrics={"listen": "127.0.0.1:0"})
    assert not box.daemon.metrics_server.tls and box.daemon.tls_fingerprint is None
    assert (await scrape(http, "http://%s:%d/metrics" % box.daemon.metrics_server.address))[0] == 200


async def test_without_require_token_the_own_port_is_open(box, http):
    await box.start(api=api_with_metrics(), metrics={"listen": "127.0.0.1:0", "require_token": False})
    status, _ = await scrape(http, "http://%s:%d/metrics" % box.daemon.metrics_server.address, None)
    assert status == 200


async def test_a_port_already_taken_is_an_alarm_not_a_dead_box(box, http):
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        await box.start(api=api_with_metrics(), metrics={"listen": "127.0.0.1:%d" % port})
        _, text = await scrape(http, url(box))
    m = samples(text)
    assert value(m, "scanbox_alarm", code="METRICS_UNAVAILABLE", where="metrics:127.0.0.1:%d" % port) == 1


async def test_an_unplugged_scanner_and_an_unreachable_platform_show(box, http):
    await box.start(api=api_with_metrics(), platform={"timeout_s": 1, "verify_deadline_s": 2})
    await box.sim.close()
    box.scan(box.resident().static_qr)  # never verified before: nothing in the cache
    await box.events.wait("verification", lambda d: d["verification"]["offline"])
    box.scanner.unplug()
    await box.events.wait("status", lambda d: d.get("source", {}).get("connected") is False)
    _, text = await scrape(http, url(box))
    m = samples(text)
    assert value(m, "scanbox_platform_reachable", platform="rhc") == 0
    assert value(m, "scanbox_source_connected", source="serial:counter") == 0
    assert value(m, "scanbox_alarm", code="SOURCE_DISCONNECTED", where="serial:counter") == 1
    assert value(m, "scanbox_alarm", code="PLATFORM_UNREACHABLE", where="rhc") == 1
    assert value(m, "scanbox_scan_results_total", outcome="platform_unavailable", offline="true") == 1
    assert value(m, "scanbox_platform_answers_total", operation="RHC_E0003", code="none") == 1


def test_metrics_config_is_checked(tmp_path):
    with pytest.raises(ConfigError) as caught:
        validate(config_dict(None, tmp_path, metrics={"listen": "nowhere", "labels": {"box_id": "x", "9bad": "y"},
                                                      "lables": {}}))
    text = str(caught.value)
    assert "metrics.listen" in text and "metrics.lables: unknown key (did you mean 'labels'?)" in text
    assert "box_id: scanbox_build_info sets these itself" in text and "9bad" in text


def test_the_clock_from_timesyncd_or_else_from_the_kernel(tmp_path):
    from agent.clock import STA_UNSYNC, Clock, KernelClock, read_kernel

    real = read_kernel()  # the real syscall: readable here (no seccomp)
    assert real is not None and real.maxerror_s >= 0
    assert isinstance(real.synchronised, bool) and STA_UNSYNC == 0x40
    timesync = tmp_path / "timesync"
    # as under the unit's ProtectClock=: adjtimex refused, and no timesyncd either
    assert Clock(timesync_dir=timesync, kernel=lambda: None).synchronised_by() == (None, None)
    # the kernel's "no" is no answer (a container, a box without an NTP client); its "yes" is
    assert Clock(timesync_dir=timesync, kernel=lambda: KernelClock(False, 16.0)).synchronised_by() == (None, None)
    assert Clock(timesync_dir=timesync, kernel=lambda: KernelClock(True, 0.1)).synchronised_by() == (True, "adjtimex")
    timesync.mkdir()  # timesyncd runs, and is asked first
    assert Clock(timesync_dir=timesync, kernel=lambda: KernelClock(True, 0.1)).synchronised_by() == (False, "timesyncd")
    (timesync / "synchronized").touch()
    clock = Clock(timesync_dir=timesync, kernel=lambda: None)
    assert clock.synchronised_by() == (True, "timesyncd") and clock.maxerror_s() is None
