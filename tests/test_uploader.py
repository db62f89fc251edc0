"""The uploader against the real adapter and the simulator on loopback: order, bounded in-flight,
backoff, dead-letter, held credentials, and a msgGuid that never changes."""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest

from agent import outbox as outbox_module
from agent.model import now_local
from agent.outbox import Store, Uploader
from agent.platforms.base import VerifyRequest
from agent.platforms.rhc import RhcPlatform
from agent.qr import QrKind
from agent.simulator.soap import Fault, SimServer
from drivers.base import Backoff
from tests.conftest import make_config, until


class Harness:
    def __init__(self, tmp_path: Path, server: SimServer) -> None:
        self.tmp_path = tmp_path
        self.server = server
        config = make_config(server, tmp_path)
        self.platform = RhcPlatform(config.platform, config.site, tmp_path)
        self.store = Store(tmp_path / "outbox.db")
        self.uploader: Uploader | None = None
        self.task: asyncio.Task | None = None

    async def start(self, max_in_flight: int = 4, initial: float = 0.02, maximum: float = 0.1) -> Uploader:
        await self.platform.start()
        await self.store.open()
        self.uploader = Uploader(self.store, self.platform, max_in_flight=max_in_flight,
                                 backoff=Backoff(initial, maximum))
        self.task = asyncio.get_running_loop().create_task(self.uploader.run())
        return self.uploader

    def record(self, resident_index: int = 0, qr: str | None = None):
        resident = list(self.server.sim.residents.values())[resident_index]
        request = VerifyRequest(qr or resident.static_qr, QrKind.STATIC, now_local(), "010101", "01")
        return self.platform.verify_record(request, "scan-x")

    async def stats(self) -> dict:
        return await self.store.stats()

    async def drained(self, timeout: float = 10) -> None:
        """Until nothing is pending: re-checked each time the uploader reports a change."""
        changed = asyncio.Event()
        self.uploader.on_change = changed.set
        async with asyncio.timeout(timeout):
            while True:
                changed.clear()
                if not (await self.store.stats())["pending"]:
                    return
                await changed.wait()

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        await self.store.close()
        await self.platform.close()


@pytest.fixture
async def harness(tmp_path, sim_server):
    h = Harness(tmp_path, sim_server)
    await h.store.open()
    yield h
    await h.stop()


def uploads(server: SimServer) -> list:
    return server.sim.journal_for("RHC_E0003")


async def test_the_backlog_is_uploaded_in_order_with_its_msgguids(harness):
    records = [harness.record(i % 3) for i in range(20)]
    for r in records:
        await harness.store.enqueue(r)
    await harness.start(max_in_flight=1)
    await harness.drained()
    assert [e.msg_guid for e in uploads(harness.server)] == [r.guid for r in records]
    assert all(e.ok for e in uploads(harness.server))
    # the deferred verification carries the original scan time, not the upload time
    assert [e.values["time"] for e in uploads(harness.server)] == [r.values["time"] for r in records]
    stats = await harness.stats()
    assert (stats["pending"], stats["sent"]) == (0, 20)
    sent = await harness.store.rows("sent", 100)
    assert {row.platform_code for row in sent} == {"3005"}


async def test_in_flight_uploads_are_bounded(harness):
    harness.server.faults.base_latency_s = 0.05
    for i in range(24):
        await harness.store.enqueue(harness.record(i % 3))
    await harness.start(max_in_flight=3)
    await harness.drained()
    assert harness.server.max_in_flight == 3


async def test_transient_failures_back_off_and_recover_on_their_own(harness):
    r = harness.record()
    await harness.store.enqueue(r)
    harness.server.faults.add(Fault("http500", count=4))
    uploader = await harness.start(initial=0.05, maximum=0.2)
    await harness.drained()
    attempts = [e for e in harness.server.sim.journal if e.msg_guid == r.guid]
    assert len(attempts) == 1 and attempts[0].ok  # the four failures never reached the business logic
    assert harness.server.requests == 5
    row = (await harness.store.rows("sent"))[0]
    assert row.attempts == 5 and "HTTP 500" in row.last_error
    assert uploader.backing_off is False and uploader.resume_at == 0.0


async def test_backoff_delays_grow_and_are_capped(harness):
    await harness.store.enqueue(harness.record())
    harness.server.faults.add(Fault("http500", count=6))
    await harness.start(initial=0.04, maximum=0.16)
    await harness.drained()
    arrivals = harness.server.arrivals
    gaps = [b - a for a, b in zip(arrivals, arrivals[1:], strict=False)]
    assert len(gaps) == 6
    # jitter takes 50-100% of each delay: 0.04, 0.08, 0.16, then capped at 0.16
    assert gaps[0] >= 0.02 and gaps[2] >= 0.08
    # uncapped, the sixth delay would be 1.28 s (at least 0.64 with jitter); capped it is at most
    # 0.16 s, and the margin below 0.64 is for a slow machine's scheduling
    assert gaps[5] < 0.6


async def test_a_permanent_rejection_goes_to_dead_letter_with_the_platforms_code(harness):
    cancelled = next(i for i, r in enumerate(harness.server.sim.residents.values()) if r.status == "0")
    bad = harness.record(cancelled)
    good = harness.record(0)
    await harness.store.enqueue(bad)
    await harness.store.enqueue(good)
    uploader = await harness.start()
    await harness.drained()
    (dead,) = await harness.store.rows("dead")
    assert (dead.guid, dead.platform_code, dead.platform_message) == (bad.guid, "3003", "居民信息验证错误")
    assert uploader.dead == 1 and uploader.sent == 1


async def test_a_record_that_fails_its_table_is_dead_without_being_sent(harness):
    broken = harness.record()
    broken = type(broken)(broken.guid, broken.operation, {**broken.values, "channel_code": "77"}, None)
    await harness.store.enqueue(broken)
    await harness.start()
    await harness.drained()
    (dead,) = await harness.store.rows("dead")
    assert dead.platform_code is None and "channel_code" in dead.platform_message
    assert harness.server.requests == 0


async def test_refused_credentials_hold_the_queue_instead_of_killing_records(harness):
    await harness.store.enqueue(harness.record())
    harness.server.sim.user_pwd = "rotated-by-the-platform"
    uploader = await harness.start(initial=0.02, maximum=0.05)
    await until(lambda: uploader.blocked is not None)
    assert "1005" in uploader.blocked
    assert (await harness.stats())["dead"] == 0  # not the record's fault
    harness.server.sim.user_pwd = "scanbox-secret"  # the platform takes the box's password again
    await harness.drained()
    assert uploader.blocked is None


async def test_the_msgguid_survives_retries_and_a_restart(harness, tmp_path):
    r = harness.record()
    await harness.store.enqueue(r)
    harness.server.faults.add(Fault("http500", count=None))  # down until cleared
    uploader = await harness.start(initial=0.02, maximum=0.05)
    await until(lambda: uploader.backing_off)
    await harness.stop()  # the box restarts while the platform is down

    later = Harness(tmp_path, harness.server)
    try:
        harness.server.faults.clear()
        await later.start()
        await later.drained()
    finally:
        await later.stop()
    delivered = [e.msg_guid for e in harness.server.sim.journal if e.msg_guid]
    assert delivered == [r.guid]


async def test_platform_back_ends_a_long_backoff(harness):
    await harness.store.enqueue(harness.record())
    harness.server.faults.add(Fault("http500", count=1))
    uploader = await harness.start(initial=60, maximum=300)  # a long backoff
    await until(lambda: uploader.backing_off)
    started = time.monotonic()
    uploader.platform_back()  # a verification just worked
    await harness.drained()
    assert time.monotonic() - started < 5


async def test_a_backlog_of_many_pages_goes_once_each_in_order(harness, monkeypatch):
    """The round reads the backlog a page at a time, past the last id it read: no record twice,
    none skipped, oldest first."""
    monkeypatch.setattr(outbox_module, "PAGE", 1)  # a page of 8 records at 1 in flight
    records = [harness.record(i % 3) for i in range(45)]
    for r in records:
        await harness.store.enqueue(r)
    uploader = await harness.start(max_in_flight=1)
    await harness.drained()
    assert [e.msg_guid for e in uploads(harness.server)] == [r.guid for r in records]
    assert (await harness.stats())["sent"] == 45
    await until(lambda: uploader.sent == 45)  # counted once its batch's commit is answered


async def test_several_in_flight_read_ahead_without_sending_a_record_twice(harness, monkeypatch):
    monkeypatch.setattr(outbox_module, "PAGE", 1)  # 32 records a page at 4 in flight
    harness.server.faults.base_latency_s = 0.002
    records = [harness.record(i % 3) for i in range(150)]
    for r in records:
        await harness.store.enqueue(r)
    await harness.start(max_in_flight=4)
    await harness.drained()
    sent = [e.msg_guid for e in uploads(harness.server)]
    assert sorted(sent) == sorted(r.guid for r in records)  # each once
    assert harness.server.max_in_flight == 4


async def test_outcomes_waiting_for_their_commit_are_written_when_the_uploader_stops(harness, monkeypatch, tmp_path):
    """Outcomes share commits (MARK_DELAY_S); a stop does not lose those still waiting: a record
    the platform has is not sent again after a restart."""
    monkeypatch.setattr(outbox_module, "MARK_DELAY_S", 60.0)  # nothing would be written before the stop
    harness.server.faults.base_latency_s = 0.005
    for i in range(40):
        await harness.store.enqueue(harness.record(i % 3))
    await harness.start(max_in_flight=1)
    await until(lambda: len(uploads(harness.server)) >= 6)
    await harness.stop()
    at_platform = {e.msg_guid for e in uploads(harness.server) if e.ok}
    check = Store(tmp_path / "outbox.db")
    await check.open()
    marked = {row.guid for row in await check.rows("sent", 100)}
    await check.close()
    # the one upload in the air when the uploader stopped may be unmarked; no other
    assert len(at_platform) >= 6 and len(at_platform - marked) <= 1


async def test_a_record_retried_during_a_backlog_goes_before_the_rest_of_it(harness, monkeypatch):
    """A wake() ends the round at its page: the round reads on past its last id, and a record
    made due before it (a retry, a re-timed record) would otherwise wait for the whole backlog."""
    monkeypatch.setattr(outbox_module, "PAGE", 1)
    harness.server.faults.base_latency_s = 0.005
    first = harness.record(0)
    first_id = await harness.store.enqueue(first)
    await harness.store.mark_dead(first_id, "3003", "a technician looks at it")
    for i in range(40):
        await harness.store.enqueue(harness.record(i % 3))
    uploader = await harness.start(max_in_flight=1)
    await until(lambda: len(uploads(harness.server)) >= 5)
    assert await harness.store.retry(first_id)
    uploader.wake()
    await harness.drained()
    order = [e.msg_guid for e in uploads(harness.server)]
    assert len(order) == 41 and order.index(first.guid) < 30


async def test_a_payload_that_does_not_open_is_dead_and_never_sent(harness, tmp_path):
    """A payload moved onto another row (its msgGuid is the seal's associated data) fails to
    open when its turn comes: dead-letter saying so, the rest of the backlog goes on."""
    a, b, c = (harness.record(i) for i in range(3))
    ids = [await harness.store.enqueue(r) for r in (a, b, c)]
    await harness.store.close()
    with sqlite3.connect(tmp_path / "outbox.db") as conn:
        payload_a = conn.execute("SELECT payload FROM outbox WHERE id = ?", (ids[0],)).fetchone()[0]
        conn.execute("UPDATE outbox SET payload = ? WHERE id = ?", (payload_a, ids[1]))
    uploader = await harness.start(max_in_flight=1)
    await harness.drained()
    (dead,) = await harness.store.rows("dead")
    assert dead.guid == b.guid and "cannot be opened" in dead.platform_message and dead.platform_code is None
    assert [e.msg_guid for e in uploads(harness.server)] == [a.guid, c.guid]
    await until(lambda: (uploader.sent, uploader.dead) == (2, 1))
