"""Every long-lived task and thread is supervised: a fault injected into each one is logged, shows
as an alarm naming it in `status`, and the part is started again; a verification that raises
inside scanbox is still answered (INTERNAL). The watchdog side (a critical part that cannot
recover stops the pings) is in tests/appliance/test_watchdog.py."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
from typing_extensions import override

import agent.daemon
from agent.config import Config
from agent.daemon import Daemon
from agent.events import NetworkChanged
from agent.model import Reason, UsageRecord, now_local
from agent.outbox import Store
from agent.platforms.base import VerifyAnswer, VerifyRequest
from agent.platforms.rhc import RhcPlatform
from agent.qr import QrKind
from agent.supervisor import Supervisor
from drivers.base import ScanSink, ThreadedSource
from tests.conftest import EventRecorder, make_config, until


def fast() -> Supervisor:
    return Supervisor(backoff_initial=0.01, backoff_max=0.05)


class Fault(RuntimeError):
    """A bug, injected."""


class ThreadKiller(BaseException):
    """What no handler in the database thread expects (as a MemoryError would be)."""


def once(fn: Any) -> Any:
    """`fn`, except that its first call raises Fault."""
    calls = [0]

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls[0] += 1
        if calls[0] == 1:
            raise Fault("injected into %s" % fn.__name__)
        return await fn(*args, **kwargs)
    return wrapper


async def failed_and_restarted(events: EventRecorder, name: str, timeout: float = 5) -> None:
    """Until `name` has failed at least once and runs again."""
    await events.wait("status", lambda d: d.get("components", {}).get(name, {}).get("failures", 0) >= 1
                      and d["components"][name]["state"] == "running", timeout=timeout)


def alarm(status: dict[str, Any], code: str, source: str) -> dict[str, Any]:
    found = [a for a in status["alarms"] if a["code"] == code and a["source"] == source]
    assert found, "no %s alarm for %s in %s" % (code, source, status["alarms"])
    return found[0]


class UploadFailsOnce(RhcPlatform):
    """An adapter with a bug on its first upload (not a PlatformError: an exception nobody expects)."""

    calls = 0

    @override
    async def upload(self, record: UsageRecord) -> tuple[str | None, str | None]:
        self.calls += 1
        if self.calls == 1:
            raise Fault("adapter bug")
        return await super().upload(record)


class VerifyRaises(RhcPlatform):
    @override
    async def verify(self, record: UsageRecord) -> VerifyAnswer:
        raise Fault("adapter bug in verify")


def rhc(cls: type[RhcPlatform]) -> Any:
    return lambda config: cls(config.platform, config.site, config.state_dir())


async def test_an_uploader_that_raises_is_alarmed_restarted_and_the_record_still_goes(box):
    """The issue's case: the adapter raised, the uploader died, `pending` stayed 1 for ever."""
    await box.start(supervisor=fast(), adapter=rhc(UploadFailsOnce), sources={})
    daemon = box.daemon
    resident = box.resident()
    record = daemon.platform.verify_record(
        VerifyRequest(resident.static_qr, QrKind.STATIC, now_local(), "010101", "01"), "scan-x")
    await daemon.store.enqueue(record)
    daemon.uploader.wake()
    await failed_and_restarted(box.events, "uploader")
    status = await daemon.status()
    assert "Fault: adapter bug" in alarm(status, "COMPONENT_FAILED", "uploader")["text"]
    assert status["components"]["uploader"]["failures"] == 1
    await box.events.wait("status", lambda d: d.get("outbox", {}).get("sent") == 1)
    assert (await daemon.store.stats())["pending"] == 0


async def test_the_display_loop_that_raises_is_restarted(box):
    await box.start(supervisor=fast(), sources={}, display={"model": "dummy"})
    ui = box.daemon.ui
    draw = ui.draw
    calls = []

    def broken(image: Any) -> None:
        calls.append(image)
        if len(calls) == 1:
            raise Fault("cannot draw")
        draw(image)

    ui.draw = broken
    ui.show_message(["hello"], 30)
    await failed_and_restarted(box.events, "ui")
    alarm(await box.daemon.status(), "COMPONENT_FAILED", "ui")
    frames = ui.frames
    ui.show_message(["again"], 30)  # the restarted loop draws
    await until(lambda: ui.frames > frames)


async def test_housekeeping_that_raises_is_restarted(box, monkeypatch):
    monkeypatch.setattr(Store, "housekeeping", once(Store.housekeeping))
    await box.start(supervisor=fast(), sources={})
    await failed_and_restarted(box.events, "housekeeping")
    alarm(await box.daemon.status(), "COMPONENT_FAILED", "housekeeping")


async def test_the_network_watch_that_raises_is_restarted(box, monkeypatch):
    real = agent.daemon.network_up
    calls = []

    def flaky() -> bool:
        calls.append(1)
        if len(calls) == 1:
            raise Fault("cannot read the routes")
        return real()

    monkeypatch.setattr(agent.daemon, "network_up", flaky)
    await box.start(supervisor=fast(), sources={})
    await failed_and_restarted(box.events, "network")
    await box.events.wait("status", lambda d: "network" in d)
    status = await box.daemon.status()
    alarm(status, "COMPONENT_FAILED", "network")
    assert status["network"]["up"] is not None


async def test_a_status_notification_that_raises_is_an_internal_error_alarm(box):
    await box.start(supervisor=fast(), sources={})
    daemon = box.daemon
    failed = asyncio.Event()

    def broken(line: str) -> None:
        failed.set()
        raise Fault("notify socket bug")

    daemon.notifier.status = broken
    daemon.hub.publish(NetworkChanged(True))  # a STATUS= within a second
    async with asyncio.timeout(5):
        await failed.wait()
    await box.events.wait("status", lambda d: "components" in d)
    assert "notify socket bug" in alarm(await daemon.status(), "INTERNAL_ERROR", "sd_notify status")["text"]


async def test_a_dead_outbox_database_thread_is_alarmed_and_a_new_one_serves(box):
    await box.start(supervisor=fast(), sources={})
    store = box.daemon.store
    first = box.daemon.supervisor.current_thread("outbox-db")

    def kill(conn: Any) -> None:
        raise ThreadKiller()

    with pytest.raises(Exception) as raised:
        await store._submit(kill, write=False)  # the job that kills the thread is answered
    assert "database thread failed" in str(raised.value)
    await failed_and_restarted(box.events, "outbox-db")
    assert box.daemon.supervisor.current_thread("outbox-db") is not first
    status = await box.daemon.status()  # answers: it does not hang on the dead thread
    alarm(status, "COMPONENT_FAILED", "outbox-db")
    assert status["outbox"]["available"] is True
    assert (await store.stats())["pending"] == 0


async def test_an_outbox_parameter_sqlite_cannot_take_fails_only_that_call(box):
    """A record id beyond SQLite's integer range used to kill the database thread."""
    await box.start(supervisor=fast(), sources={})
    store = box.daemon.store
    with pytest.raises(OverflowError):
        await store.retry(1 << 70)
    with pytest.raises(OverflowError):
        await store.get(1 << 70)
    assert (await store.stats())["pending"] == 0
    assert box.daemon.supervisor.children["outbox-db"].failures == 0


async def test_a_verification_that_raises_inside_scanbox_is_answered_internal(box):
    """The waiting read_card gets the scan with INTERNAL at once (it used to wait out its timeout
    and answer TIMEOUT "no scan"); subscribers get the verification event."""
    await box.start(supervisor=fast(), adapter=rhc(VerifyRaises))
    client = await box.unix()
    await client.call("subscribe", {"events": ["verification"]})
    resident = box.resident()
    reading = asyncio.ensure_future(client.call("read_card", {"timeout_s": 20}))
    await box.waiting(1)
    box.scan(resident.static_qr)
    result = await asyncio.wait_for(reading, 5)
    assert result["scan"]["payload"] == resident.static_qr
    assert result["verification"]["ok"] is False
    assert result["verification"]["reason"] == Reason.INTERNAL.value
    event = await client.event("verification")
    assert event["data"]["verification"]["reason"] == "INTERNAL"
    assert "adapter bug in verify" in alarm(await box.daemon.status(), "INTERNAL_ERROR", "verifier")["text"]


class BrokenDriver(ThreadedSource):
    """A driver whose thread raises on its first run (a bug), then reads nothing until stopped."""

    def __init__(self, name: str) -> None:
        super().__init__(name)
        self.runs = 0
        self.second_run = threading.Event()

    @override
    def _run(self, sink: ScanSink) -> None:
        self.runs += 1
        if self.runs == 1:
            raise Fault("driver bug")
        sink.connected(self.name, True)
        self.second_run.set()
        self._stop.wait()


async def test_a_driver_thread_that_dies_is_alarmed_and_restarted(tmp_path, sim_server):
    config: Config = make_config(sim_server, tmp_path)
    driver = BrokenDriver("fake:counter")
    daemon = Daemon(config, sources=[driver], supervisor=fast())
    events = EventRecorder()
    daemon.hub.listen(events)
    await daemon.start()
    try:
        await failed_and_restarted(events, "fake:counter")
        await events.wait("status", lambda d: d.get("source", {}).get("connected") is True)
        status = await daemon.status()
        assert "driver bug" in alarm(status, "COMPONENT_FAILED", "fake:counter")["text"]
        assert status["sources"][0]["connected"] is True
        assert driver.runs == 2
    finally:
        await daemon.stop()


async def test_a_critical_child_that_keeps_failing_is_given_up_and_the_box_is_unhealthy():
    supervisor = Supervisor(backoff_initial=0.001, backoff_max=0.002, give_up_after=3)
    runs = []

    async def always_fails() -> None:
        runs.append(1)
        raise Fault("no luck")

    given_up = asyncio.Event()
    supervisor.on_change = lambda: given_up.set() if supervisor.children["db"].state == "failed" else None
    supervisor.task("db", always_fails, critical=True)
    async with asyncio.timeout(5):
        await given_up.wait()
    assert len(runs) == 3
    assert not supervisor.healthy()
    report = await supervisor.get_status()
    assert report.status["db"]["state"] == "failed"
    assert [a.code for a in report.alarms] == ["COMPONENT_FAILED"]
    await supervisor.close()


async def test_a_child_that_is_not_critical_is_restarted_for_ever_and_the_box_stays_healthy():
    supervisor = Supervisor(backoff_initial=0.001, backoff_max=0.002, give_up_after=2)
    runs = []
    sixth = asyncio.Event()

    async def always_fails() -> None:
        runs.append(1)
        if len(runs) == 6:
            sixth.set()
        raise Fault("no luck")

    supervisor.task("ui", always_fails)
    async with asyncio.timeout(5):
        await sixth.wait()
    assert supervisor.healthy()
    await supervisor.close()


async def test_onetrans_answers_999999_for_a_verification_that_raised(box):
    """OneTrans's read (hos.user.get) gets 999999 at once, not 200001 after its read timeout."""
    from tests.api.test_onetrans import ONETRANS, SPEC_READ_CARD, call, opened, request
    from tests.conftest import TOKEN

    await box.start(supervisor=fast(), adapter=rhc(VerifyRaises), api=ONETRANS)
    client = await box.tcp(TOKEN)
    pending = asyncio.ensure_future(call(client, request(SPEC_READ_CARD)))
    await box.waiting(1)
    box.scan(box.resident().static_qr)
    answer = opened(await pending)
    assert answer["code"] == "999999" and answer["data"] == {}
