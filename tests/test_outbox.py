"""The outbox store: durability, states, the identity cache, personal data at rest, and a disk
that is full, unwritable or corrupt."""

from __future__ import annotations

import asyncio
import os
import sqlite3
import stat
import uuid
from pathlib import Path

import pytest

from agent import outbox as outbox_module
from agent.model import UsageRecord
from agent.outbox import Store, StoreUnavailable


def record(n: int = 0, **values: str) -> UsageRecord:
    values = values or {"qr_code": "Q%03d" % n, "time": "2026-11-22 10:00:00"}
    return UsageRecord(uuid.uuid4().hex, "RHC_E0003", values, "scan-%d" % n)


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
async def store(tmp_path: Path):
    s = Store(tmp_path / "outbox.db")
    await s.open()
    yield s
    await s.close()


async def test_a_record_is_on_disk_when_enqueue_returns(tmp_path, store):
    r = record(1)
    record_id = await store.enqueue(r)
    # another connection (another process would be the same) sees it committed
    with sqlite3.connect(tmp_path / "outbox.db") as other:
        row = other.execute("SELECT guid, state FROM outbox WHERE id = ?", (record_id,)).fetchone()
        assert row == (r.guid, "pending")


async def test_records_keep_their_guid_and_values_across_a_restart(tmp_path):
    first = Store(tmp_path / "outbox.db")
    await first.open()
    r = record(1, qr_code="张晓明的码", time="2026-11-22 10:00:00")
    await first.enqueue(r)
    await first.close()
    second = Store(tmp_path / "outbox.db")
    await second.open()
    (due,) = await second.claim(10)
    values = {"qr_code": "张晓明的码", "time": "2026-11-22 10:00:00"}
    assert second.record(due) == UsageRecord(r.guid, r.operation, values, r.scan_id, r.created_at)
    await second.close()


async def test_concurrent_enqueues_are_all_committed_in_order(store):
    records = [record(i) for i in range(300)]
    ids = await asyncio.gather(*(store.enqueue(r) for r in records))
    assert sorted(ids) == ids and len(set(ids)) == 300
    due = await store.claim(1000)
    assert [d.guid for d in due] == [r.guid for r in records]
    assert [store.record(d) for d in due] == records


async def test_a_duplicate_guid_fails_alone_and_the_rest_of_the_batch_commits(store):
    r = record(1)
    await store.enqueue(r)
    results = await asyncio.gather(store.enqueue(r), store.enqueue(record(2)), return_exceptions=True)
    assert isinstance(results[0], sqlite3.IntegrityError) and isinstance(results[1], int)
    assert len(await store.claim(10)) == 2
    assert store.available


async def test_states_sent_dead_retry_and_purge(store):
    a, b, c = [await store.enqueue(record(i)) for i in range(3)]
    await store.mark_sent(a, "3005", "验证成功")
    await store.mark_dead(b, "4002", "该卡未认证或已注销")
    assert [row.id for row in await store.claim(10)] == [c]
    stats = await store.stats()
    assert (stats["pending"], stats["sent"], stats["dead"]) == (1, 1, 1)
    dead = (await store.rows("dead"))[0]
    assert (dead.platform_code, dead.platform_message, dead.attempts) == ("4002", "该卡未认证或已注销", 1)
    assert await store.retry(b) is True
    assert [row.id for row in await store.claim(10)] == [b, c]
    assert await store.retry(a) is False  # the platform has it: nothing to retry
    assert await store.retry(999) is False
    await store.mark_dead(b, "4002", "again")
    assert await store.purge_dead() == 1
    assert await store.get(b) is None


async def test_a_failed_attempt_is_counted_and_postponed(tmp_path):
    clock = Clock()
    store = Store(tmp_path / "outbox.db", clock=clock)
    await store.open()
    record_id = await store.enqueue(record(1))
    await store.attempt_failed(record_id, "no answer within 5.0 s", clock.now + 30)
    assert await store.claim(10) == []
    assert await store.next_due_at() == clock.now + 30
    clock.now += 31
    (due,) = await store.claim(10)
    row = await store.get(due.id)
    assert (row.attempts, row.last_error) == (1, "no answer within 5.0 s")
    await store.postpone_all(clock.now + 100)
    assert await store.claim(10) == []
    await store.hasten()
    assert len(await store.claim(10)) == 1
    await store.close()


async def test_identity_cache_expires_and_is_purged(tmp_path):
    clock = Clock()
    store = Store(tmp_path / "outbox.db", clock=clock)
    await store.open()
    code = "A" * 64 + ":1"
    await store.cache_put(code, {"name": "张晓明", "id_number": "630102198503121237"}, ttl_s=3600)
    identity, verified_at = await store.cache_get(code)
    assert identity["name"] == "张晓明" and verified_at == clock.now
    clock.now += 3601
    assert await store.cache_get(code) is None
    assert (await store.housekeeping(retention_s=86400)) == (0, 0, 1)
    # the code itself, a credential, is never stored: only its hash
    with sqlite3.connect(tmp_path / "outbox.db") as conn:
        assert conn.execute("SELECT count(*) FROM identity_cache").fetchone()[0] == 0
    await store.cache_put(code, {"name": "x"}, 3600)
    await store.cache_forget(code)
    assert await store.cache_get(code) is None
    await store.close()
    assert code.encode() not in (tmp_path / "outbox.db").read_bytes()


async def test_sent_records_are_deleted_after_retention_but_pending_and_dead_stay(tmp_path):
    clock = Clock()
    store = Store(tmp_path / "outbox.db", clock=clock)
    await store.open()
    sent, dead, pending = [await store.enqueue(record(i)) for i in range(3)]
    await store.mark_sent(sent, "3005", "ok")
    await store.mark_dead(dead, "4002", "no")
    clock.now += 3600
    assert await store.housekeeping(retention_s=7200) == (0, 0, 0)
    clock.now += 3601
    assert await store.housekeeping(retention_s=7200) == (1, 0, 0)
    assert await store.get(sent) is None
    assert (await store.get(dead)).state == "dead" and (await store.get(pending)).state == "pending"
    await store.close()


async def test_state_files_are_0600(tmp_path, store):
    await store.enqueue(record(1))
    for name in ("outbox.db", "outbox.db-wal", "outbox.db-shm"):
        path = tmp_path / name
        assert path.exists(), name
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, name


async def test_a_corrupt_database_is_replaced_and_the_store_works(tmp_path):
    path = tmp_path / "outbox.db"
    path.write_bytes(b"SQLite format 3\x00" + os.urandom(8192))
    store = Store(path)
    await store.open()
    assert store.available and "corrupt" in store.recovered
    assert not list(tmp_path.glob("outbox.db.corrupt*"))  # deleted: it held personal data
    await store.enqueue(record(1))
    assert len(await store.claim(10)) == 1
    await store.close()


async def test_an_unusable_path_is_an_error_not_a_crash_and_recovers(tmp_path, monkeypatch):
    monkeypatch.setattr(outbox_module, "REOPEN_AFTER_S", 0.0)
    path = tmp_path / "outbox.db"
    path.mkdir()  # something that is not a database file stands in the way
    store = Store(path)
    await store.open()
    assert not store.available and "cannot open" in store.error
    with pytest.raises(StoreUnavailable):
        await store.enqueue(record(1))
    with pytest.raises(StoreUnavailable):
        await store.stats()
    path.rmdir()  # a technician clears it
    await store.enqueue(record(2))
    assert store.available and len(await store.claim(10)) == 1
    await store.close()


async def test_a_full_database_fails_writes_and_recovers_when_space_returns(tmp_path, monkeypatch):
    store = Store(tmp_path / "outbox.db")
    connect = store._connect

    def small(self_connect=connect):
        conn = self_connect()
        conn.execute("PRAGMA max_page_count = 12")  # the disk, as far as SQLite can tell, is this big
        return conn

    monkeypatch.setattr(store, "_connect", small)
    await store.open()
    stored = 0
    with pytest.raises(StoreUnavailable, match="full"):
        for i in range(10000):
            await store.enqueue(record(i, qr_code="Q" * 200, time=str(i)))
            stored += 1
    assert stored > 0 and not store.available
    assert (await store.stats())["pending"] == stored  # reading still works, nothing already stored was lost
    await store._submit(lambda conn: conn.execute("PRAGMA max_page_count = 100000"), write=False)
    await store.enqueue(record(99999))
    assert store.available and (await store.stats())["pending"] == stored + 1
    await store.close()


async def test_a_store_that_was_never_opened_refuses_plainly(tmp_path):
    with pytest.raises(StoreUnavailable):
        await Store(tmp_path / "x.db").enqueue(record(1))


async def test_only_storing_a_record_clears_the_alarm_not_an_update_that_fits(tmp_path, monkeypatch):
    """A full disk may still take an UPDATE in WAL space it already has: that is no sign that a
    new record can be stored, so the alarm stays until one is."""
    store = Store(tmp_path / "outbox.db")
    connect = store._connect

    def small(self_connect=connect):
        conn = self_connect()
        conn.execute("PRAGMA max_page_count = 12")
        return conn

    monkeypatch.setattr(store, "_connect", small)
    await store.open()
    first = await store.enqueue(record(0))
    with pytest.raises(StoreUnavailable):
        for i in range(1, 10000):
            await store.enqueue(record(i, qr_code="Q" * 200, time=str(i)))
    assert not store.available
    await store.attempt_failed(first, "platform down", 0)  # an update in place succeeds...
    assert not store.available  # ...and the alarm stays
    await store._submit(lambda conn: conn.execute("PRAGMA max_page_count = 100000"), write=False)
    await store.enqueue(record(99999))
    assert store.available
    await store.close()


async def test_stats_reused_between_calls_still_tell_every_change(tmp_path):
    """stats() answers from its last counts while nothing changed (status before every scan
    costs no round trip to the store's thread); its own writes, an identity expiring, time and
    another process's change (within STATS_REUSE_S) all show."""
    clock = Clock()
    store = Store(tmp_path / "outbox.db", clock=clock)
    await store.open()
    await store.cache_put("A" * 64 + ":1", {"name": "x"}, ttl_s=1.2)
    first = await store.stats()
    assert (first["pending"], first["cached_identities"], first["oldest_pending_age_s"]) == (0, 1, None)
    await store.enqueue(record(1))
    clock.now += 0.4
    stats = await store.stats()
    assert stats["pending"] == 1
    clock.now += 0.5
    assert abs((await store.stats())["oldest_pending_age_s"] - stats["oldest_pending_age_s"] - 0.5) < 0.11
    clock.now += 0.35  # past the identity's expiry, within STATS_REUSE_S of the last count: the expiry decides
    assert (await store.stats())["cached_identities"] == 0
    # the CLI (another process, another connection) marks the record dead
    with sqlite3.connect(tmp_path / "outbox.db") as conn:
        conn.execute("UPDATE outbox SET state = 'dead'")
    clock.now += outbox_module.STATS_REUSE_S
    stats = await store.stats()
    assert (stats["pending"], stats["dead"]) == (0, 1)
    await store.close()


@pytest.mark.parametrize("argv", [["outbox", "retry", str(2 ** 63)], ["outbox", "show", "-1"],
                                  ["outbox", "list", "--limit", str(2 ** 64)], ["outbox", "retry", "1.5"]])
def test_the_cli_refuses_an_id_or_limit_sqlite_cannot_hold_before_opening_the_outbox(argv, capsys):
    from agent import cli
    with pytest.raises(SystemExit) as exited:
        cli.main(argv)
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "outside" in err or "whole number" in err


async def test_the_page_cache_of_each_connection_is_bounded_at_512_kib(tmp_path):
    """SQLite keeps 2 MiB of pages per connection by default, which a box that has verified a few
    thousand patients fills with its identity cache (issue 17: the daemon's memory); the kernel
    caches the file anyway. A reopened connection (after a failure) is bounded the same."""
    store = Store(tmp_path / "outbox.db")
    await store.open()

    async def cache_size() -> int:
        return await store._submit(lambda conn: conn.execute("PRAGMA cache_size").fetchone()[0], write=False)

    assert await cache_size() == -512
    await store._submit(lambda conn: store._drop_connection(), write=False)  # in the store's thread
    assert await cache_size() == -512
    await store.close()
