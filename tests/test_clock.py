"""A Pi has no real-time clock (issue 15, "Time"): started with the clock at 1970 on a state from
2026, an outbox record stayed stuck, cache entries "verified in the future" counted as fresh, a
use went up with a 1970 time, TLS failed without a word about the clock, and `status` said
nothing. The daemon runs here with an injected time source and timesyncd directory."""

from __future__ import annotations

import asyncio
import datetime as dt
import ssl
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from agent import clock as clocks
from agent.clock import Clock
from agent.model import UsageRecord
from agent.outbox import Store
from agent.platforms.base import PlatformUnavailable
from agent.platforms.transport import HttpClient
from agent.simulator.soap import Fault
from tests.conftest import until

NINETEEN_SEVENTY = 86400.0 * 3  # 1970-01-04
ONE_HOUR = 3600.0


class FakeTime:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def no_installed_clock():
    yield
    clocks.install(None)


def a_clock(tmp_path: Path, now: float, *, timesyncd: bool = False, sync_wait_s: float = 0.0) -> tuple[Clock, FakeTime]:
    fake = FakeTime(now)
    timesync = tmp_path / "timesync"
    if timesyncd:
        timesync.mkdir()
    return Clock(time_source=fake, timesync_dir=timesync, kernel=lambda: None, sync_wait_s=sync_wait_s), fake


async def test_cache_entries_dated_after_now_do_not_answer(tmp_path):
    fake = FakeTime(time.time())
    store = Store(tmp_path / "outbox.db", clock=fake)
    await store.open()
    qr = "A" * 64 + ":1"
    await store.cache_put(qr, {"name": "张晓明"}, ttl_s=86400)
    fake.now -= ONE_HOUR  # the clock went back: the entry was "verified in the future"
    assert await store.cache_get(qr) is None
    fake.now += 2 * ONE_HOUR
    assert (await store.cache_get(qr))[0]["name"] == "张晓明"
    await store.close()


async def test_started_in_1970_on_a_state_from_2026(box, tmp_path):
    resident = box.resident()
    now_2026 = time.time()
    # the state a box left behind in 2026: an identity verified online, and a use that was
    # postponed while the platform was down (its next attempt 5 minutes after that)
    before = Store(tmp_path / "state" / "outbox.db", clock=FakeTime(now_2026))
    await before.open()
    await before.cache_put(resident.static_qr, {"name": resident.name, "id_number": resident.id_card}, 86400)
    old_use = UsageRecord(uuid.uuid4().hex, "RHC_E0003", {"qr_code": box.resident(1).static_qr},
                                                   "scan-2026", now_2026)
    await before.enqueue(old_use, attempts=1, next_attempt_at=now_2026 + 300, last_error="HTTP 500")
    await before.close()

    clock, fake = a_clock(tmp_path, NINETEEN_SEVENTY)
    await box.start(clock=clock, sources={}, outbox={"backoff_initial": "50ms", "backoff_max": "1s"})
    client = await box.unix()
    status = await client.call("status")
    alarms = {a["code"]: a["text"] for a in status["alarms"]}
    assert "CLOCK_UNSYNCHRONISED" in alarms and "1970-01-04" in alarms["CLOCK_UNSYNCHRONISED"]
    assert "newest record in the outbox" in alarms["CLOCK_UNSYNCHRONISED"]
    assert status["clock"]["sane"] is False

    # the platform is down: the identity "verified in the future" does not answer
    box.sim.faults.add(Fault("http500", count=None))
    offline = await client.call("verify_qr", {"qr": resident.static_qr})
    assert offline["verification"]["reason"] == "PLATFORM_UNAVAILABLE" and offline["identity"] is None
    # a use recorded now would carry 1970: it is held, and nothing is uploaded meanwhile
    made_in_1970 = UsageRecord(uuid.uuid4().hex, "RHC_E0003", {"qr_code": resident.static_qr,
                                                               "time": "1970-01-04 00:00:00"}, "scan-1970",
                               NINETEEN_SEVENTY)
    await box.daemon.store.enqueue(made_in_1970)
    box.sim.faults.clear()
    await until(lambda: box.daemon.uploader.held_for_clock)
    assert not [e for e in box.sim.sim.journal if e.msg_guid == old_use.guid]

    # NTP sets the clock: the 2026 use is due at once (not 5 minutes after a clock that went
    # back), is uploaded, and the 1970 one goes re-timed to its true time (tests/test_retime.py)
    fake.now = now_2026 + 60
    assert "CLOCK_UNSYNCHRONISED" not in {a["code"] for a in (await client.call("status"))["alarms"]}
    await until(lambda: any(e.msg_guid == old_use.guid and e.ok for e in box.sim.sim.journal), timeout=10)
    await until(lambda: any(e.msg_guid == made_in_1970.guid and e.ok for e in box.sim.sim.journal), timeout=10)
    (entry,) = [e for e in box.sim.sim.journal if e.msg_guid == made_in_1970.guid]
    filed = dt.datetime.strptime(entry.values["time"], "%Y-%m-%d %H:%M:%S").timestamp()
    assert now_2026 + 50 < filed <= now_2026 + 60, entry.values["time"]  # not 1970-01-04
    assert await box.daemon.store.rows("dead") == []


async def test_a_verification_waits_for_ntp_bounded(box, tmp_path):
    clock, fake = a_clock(tmp_path, time.time(), timesyncd=True, sync_wait_s=30)
    await box.start(clock=clock, sources={})
    client = await box.unix()
    status = await client.call("status")
    assert "not been synchronised" in {a["code"]: a["text"] for a in status["alarms"]}["CLOCK_UNSYNCHRONISED"]
    asked = asyncio.create_task(client.call("verify_qr", {"qr": box.resident().static_qr}))
    await until(lambda: clock.waiting == 1)
    assert not asked.done() and box.sim.sim.journal == []  # not asked with an unknown date
    (tmp_path / "timesync" / "synchronized").touch()  # systemd-timesyncd has synchronised
    answer = await asyncio.wait_for(asked, 10)
    assert answer["verification"]["ok"] and not answer["verification"]["offline"]
    assert len(box.sim.sim.journal) == 1
    assert "CLOCK_UNSYNCHRONISED" not in {a["code"] for a in (await client.call("status"))["alarms"]}


async def test_the_wait_for_ntp_ends_and_the_box_verifies_anyway(box, tmp_path):
    clock, _ = a_clock(tmp_path, time.time(), timesyncd=True, sync_wait_s=0.5)
    await box.start(clock=clock, sources={})
    client = await box.unix()
    answer = await client.call("verify_qr", {"qr": box.resident().static_qr})
    assert answer["verification"]["ok"]  # the nurse is answered; the alarm stays
    assert "CLOCK_UNSYNCHRONISED" in {a["code"] for a in (await client.call("status"))["alarms"]}


def self_signed(directory: Path) -> ssl.SSLContext:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "platform.test")])
    today = dt.datetime.now(dt.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(today - dt.timedelta(days=1))
            .not_valid_after(today + dt.timedelta(days=30)).sign(key, hashes.SHA256()))
    (directory / "cert.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (directory / "key.pem").write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                          serialization.PrivateFormat.PKCS8,
                                                          serialization.NoEncryption()))
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(directory / "cert.pem", directory / "key.pem")
    return context


async def test_a_tls_failure_while_the_clock_is_wrong_says_so(tmp_path):
    context = self_signed(tmp_path)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]

    async def failure() -> str:
        # the box's own client to its platform, as every adapter uses it
        client = HttpClient(timeout_s=5)
        try:
            with pytest.raises(PlatformUnavailable) as caught:
                await client.post("https://127.0.0.1:%d/healthCard" % port, b"<x/>", {})
        finally:
            await client.close()
        return caught.value.message

    try:
        clocks.install(a_clock(tmp_path, time.time())[0])
        right = await failure()
        assert "certificate" in right.lower() and "clock" not in right
        clocks.install(a_clock(tmp_path, NINETEEN_SEVENTY)[0])
        wrong = await failure()
        assert "certificate" in wrong.lower()
        assert "the clock says 1970-01-04" in wrong and "TLS cannot check a certificate" in wrong
    finally:
        server.close()
        await server.wait_closed()


async def test_a_scan_read_at_1970_is_filed_under_the_time_ntp_gives(box, tmp_path):
    """A code scanned before NTP set the clock: the verification waits for it, and the platform
    records the use at the real time of the scan, not at 1970."""
    from agent.model import Scan, ScanKind

    clock, fake = a_clock(tmp_path, NINETEEN_SEVENTY, timesyncd=True, sync_wait_s=30)
    await box.start(clock=clock, sources={})
    scan = Scan("serial:counter", ScanKind.QR, box.resident().static_qr,
                at=dt.datetime.fromtimestamp(NINETEEN_SEVENTY).astimezone())
    verifying = asyncio.create_task(box.daemon.verifier.verify(scan))
    await until(lambda: clock.waiting == 1)
    fake.now = time.time()
    (tmp_path / "timesync" / "synchronized").touch()
    result = await asyncio.wait_for(verifying, 10)
    assert result.verification.ok
    (entry,) = box.sim.sim.journal
    filed = dt.datetime.strptime(entry.values["time"], "%Y-%m-%d %H:%M:%S")
    assert abs(filed.timestamp() - time.time()) < 60, entry.values["time"]  # not 1970-01-04


async def test_status_doctor_and_the_metrics_give_the_clock_one_answer(box, tmp_path):
    """One definition of "synchronised" and "sane" (agent/clock.py): while timesyncd runs and has
    not synchronised the clock, and once it has, the daemon's status (and its alarm), `doctor` and
    the metrics say the same, whatever the kernel's NTP state on the machine says."""
    import aiohttp

    from agent.doctor import Doctor
    from tests.fleet.common import api_with_metrics, samples, scrape, value

    clock, _ = a_clock(tmp_path, time.time(), timesyncd=True)
    await box.start(clock=clock, sources={}, api=api_with_metrics())
    url = "http://%s:%d/metrics" % box.daemon.http.address

    async def answers() -> tuple[Any, ...]:
        status = await (await box.unix()).call("status")
        alarmed = any(a["code"] == "CLOCK_UNSYNCHRONISED" for a in status["alarms"])
        found = [f for f in await Doctor(box.daemon.config, socket_path=box.daemon.stream.unix_path,
                                         probe_unconfigured=False).run() if f.area == "clock"]
        async with aiohttp.ClientSession() as http:
            _, text = await scrape(http, url)
        metric = value(samples(text), "scanbox_clock_synchronized")
        method = {dict(labels).get("method") for (name, labels) in samples(text)
                  if name == "scanbox_clock_synchronized"}
        return status["clock"]["synchronised"], alarmed, found[0].status, found[0].text, metric, method

    synced, alarmed, doctor_says, doctor_text, metric, method = await answers()
    assert (synced, alarmed, doctor_says, metric, method) == (False, True, "warn", 0, {"timesyncd"})
    assert "not synchronised (timesyncd)" in doctor_text
    (tmp_path / "timesync" / "synchronized").touch()
    synced, alarmed, doctor_says, doctor_text, metric, method = await answers()
    assert (synced, alarmed, doctor_says, metric, method) == (True, False, "ok", 1, {"timesyncd"})
    assert "synchronised (timesyncd)" in doctor_text


async def test_doctor_without_a_daemon_judges_the_clock_as_the_daemon_does(tmp_path):
    """A clock after 2024 but before the release floor the daemon uses is wrong to both."""
    from agent.doctor import Doctor

    clock, _ = a_clock(tmp_path, clocks.RELEASE_FLOOR - 86400)
    found = [f for f in await Doctor(None, wall_clock=clock, probe_unconfigured=False).run() if f.area == "clock"]
    assert clock.problem() is not None and found[0].status == "fail" and "wrong" in found[0].text


def test_without_timesyncd_the_kernel_is_asked_at_most_once_a_second(tmp_path, monkeypatch):
    """Per scan and per `status` the clock is read: on a box without timesyncd whose kernel
    cannot say, that reading is not two failed stat() calls and an adjtimex every time."""
    asked = []

    def kernel_cannot_say() -> None:
        asked.append(time.monotonic())

    clock = Clock(timesync_dir=tmp_path / "no-timesyncd", kernel=kernel_cannot_say)
    assert [clock.synchronised() for _ in range(100)] == [None] * 100
    assert len(asked) == 1
    later = time.monotonic() + clocks.UNKNOWN_RECHECK_S
    monkeypatch.setattr(clocks.time, "monotonic", lambda: later)
    clock.kernel = lambda: clocks.KernelClock(True, 0.01)  # chrony has synchronised it meanwhile
    assert clock.synchronised() is True


def test_a_synchronised_clock_is_looked_at_again_only_after_a_second(tmp_path, monkeypatch):
    """Read for every scan and thrice per `status`: a yes stands for SYNCHRONISED_RECHECK_S (a
    no does not: a box waiting for NTP sees it at once), and a clock told another timesyncd
    directory looks again."""
    clock, _ = a_clock(tmp_path, time.time(), timesyncd=True)
    flag = tmp_path / "timesync" / "synchronized"
    assert clock.synchronised_by() == (False, "timesyncd")
    flag.touch()
    assert clock.synchronised_by() == (True, "timesyncd")
    flag.unlink()
    assert clock.synchronised_by() == (True, "timesyncd")  # within the second, not looked at
    clock.timesync_dir = tmp_path / "timesync"
    assert clock.synchronised_by() == (False, "timesyncd")
    flag.touch()
    assert clock.synchronised_by() == (True, "timesyncd")
    flag.unlink()
    later = time.monotonic() + clocks.SYNCHRONISED_RECHECK_S
    monkeypatch.setattr(clocks.time, "monotonic", lambda: later)
    assert clock.synchronised_by() == (False, "timesyncd")
    kernel_says_yes = Clock(timesync_dir=tmp_path / "none", kernel=lambda: clocks.KernelClock(True, 0.01))
    assert kernel_says_yes.synchronised_by() == (True, "adjtimex")
    assert kernel_says_yes.synchronised_by() == (True, "adjtimex")
