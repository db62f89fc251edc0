"""Offline operation through the whole daemon: answers from the cache while the platform is down,
the backlog drained when it returns, the outbox over the API and the CLI."""

from __future__ import annotations

import json

import asyncio
import time

from agent import cli
from agent.simulator.soap import Fault
from tests.conftest import ADMIN_TOKEN, TOKEN


async def outbox_event(box, predicate):
    return await box.events.wait("status", lambda d: "outbox" in d and predicate(d["outbox"]), timeout=10)


async def test_platform_down_a_known_static_code_is_answered_from_the_cache(box):
    await box.start(sources={})
    client = await box.unix()
    resident = box.resident()
    online = await client.call("verify_qr", {"qr": resident.static_qr})
    assert online["verification"]["ok"] and not online["verification"]["offline"]
    online_guid = online["verification"]["msg_guid"]
    assert [e.msg_guid for e in box.sim.sim.journal] == [online_guid]  # the use, recorded online

    box.sim.faults.add(Fault("http500", count=None))  # the platform goes down
    offline = await client.call("verify_qr", {"qr": resident.static_qr, "step": "010103"})
    v = offline["verification"]
    assert v["ok"] is True and v["offline"] is True and "cache" in v["message"]
    assert offline["identity"]["source"] == "cache"
    assert offline["identity"]["name"] == resident.name and offline["identity"]["nation_text"] == "汉族"
    assert v["msg_guid"] and v["msg_guid"] != online_guid

    status = await client.call("status")
    assert status["platform"]["reachable"] is False
    assert status["outbox"]["pending"] == 1 and status["outbox"]["available"] is True
    assert {a["code"] for a in status["alarms"]} >= {"PLATFORM_UNREACHABLE"}
    # the record is on disk, with the msgGuid the HIS was told
    admin = await box.tcp(ADMIN_TOKEN)
    listed = await admin.call("outbox.list", {"state": "pending"})
    (row,) = listed["records"]
    assert row["msg_guid"] == v["msg_guid"] and row["values"]["medstep_code"] == "010103"
    assert row["attempts"] >= 1 and "HTTP 500" in row["last_error"]


async def test_the_platforms_own_static_ciphertext_is_cached_and_its_dynamic_one_is_not(box):
    """A platform that issues its codes in the ciphertext form (RHC_E0002/E0005): RHC_E0003's
    qr_codetext says which were static, and those get an offline answer."""
    await box.start(sources={})
    sim = box.sim.sim
    sim.code_form = "ciphertext"
    resident = box.resident()
    admin = await box.tcp(ADMIN_TOKEN)
    issued = (await admin.call("platform.call", {"operation": "RHC_E0005", "params": {
        "id_card": resident.id_card, "id_type": "01", "id_number": resident.id_number}}))["data"]
    static, dynamic = issued["qr_code"], issued["dt_qr_code"]
    assert static == resident.ciphertext_qr and ":" not in static + dynamic
    client = await box.unix()
    for qr in (static, dynamic):
        online = await client.call("verify_qr", {"qr": qr})
        assert online["verification"]["ok"] and online["identity"]["name"] == resident.name
    assert [e.values["qr_code"] for e in sim.journal_for("RHC_E0003")] == [static, dynamic]

    box.sim.faults.add(Fault("http500", count=None))
    cached = await client.call("verify_qr", {"qr": static})
    assert cached["verification"]["ok"] and cached["verification"]["offline"]
    assert cached["identity"]["source"] == "cache" and cached["identity"]["name"] == resident.name
    refused = await client.call("verify_qr", {"qr": dynamic})
    assert refused["verification"]["reason"] == "PLATFORM_UNAVAILABLE" and refused["identity"] is None
    assert (await admin.call("outbox.stats"))["cached_identities"] == 1


async def test_platform_down_unknown_and_dynamic_codes_get_platform_unavailable_with_the_scan(box):
    await box.start(sources={})
    client = await box.unix()
    box.sim.faults.add(Fault("http500", count=None))
    never_seen = box.resident(1).static_qr
    for qr in (never_seen, box.sim.sim.issue_dynamic(box.resident().id_card, 60)):
        result = await client.call("verify_qr", {"qr": qr})
        assert result["verification"]["reason"] == "PLATFORM_UNAVAILABLE"
        assert result["verification"]["offline"] is True and result["identity"] is None
        assert result["scan"]["payload"] == qr
    assert (await client.call("status"))["outbox"]["pending"] == 0  # nothing to record: nobody was verified


async def test_platform_back_the_backlog_drains_by_itself_with_the_original_scan_times(box):
    await box.start(sources={}, outbox={"backoff_initial": "50ms", "backoff_max": "200ms"})
    client = await box.unix()
    codes = [box.resident(i).static_qr for i in range(3)]
    for qr in codes:
        await client.call("verify_qr", {"qr": qr})  # verified online: cached
    box.sim.faults.add(Fault("http500", count=None))
    answered = [await client.call("verify_qr", {"qr": qr}) for qr in codes * 2]
    guids = [a["verification"]["msg_guid"] for a in answered]
    times = [a["scan"]["at"][:19].replace("T", " ") for a in answered]
    assert all(a["verification"]["offline"] for a in answered) and len(set(guids)) == 6
    await outbox_event(box, lambda o: o["pending"] == 6)

    box.sim.faults.clear()  # the platform is back; nobody touches the box
    await outbox_event(box, lambda o: o["pending"] == 0 and o["sent"] == 6)
    delivered = {e.msg_guid: e for e in box.sim.sim.journal if e.ok}
    for guid, at in zip(guids, times, strict=True):
        assert delivered[guid].values["time"] == at
    status = await client.call("status")
    assert status["platform"]["reachable"] is True and status["outbox"]["pending"] == 0


async def test_a_refused_deferred_record_is_dead_letter_and_can_be_retried(box):
    await box.start(sources={}, outbox={"backoff_initial": "50ms", "backoff_max": "100ms"})
    client = await box.unix()
    resident = box.resident()
    await client.call("verify_qr", {"qr": resident.static_qr})
    box.sim.faults.add(Fault("http500", count=None))
    await client.call("verify_qr", {"qr": resident.static_qr})
    resident.status = "0"  # the card is cancelled at the platform meanwhile
    box.sim.faults.clear()
    await outbox_event(box, lambda o: o["dead"] == 1)
    status = await client.call("status")
    assert any(a["code"] == "OUTBOX_DEAD" for a in status["alarms"])

    reader = await box.tcp(TOKEN)
    assert (await reader.call("outbox.stats"))["dead"] == 1
    refused = await reader.request("outbox.retry", {"id": 1})
    assert refused["error"]["data"]["reason"] == "UNAUTHORIZED"
    admin = await box.tcp(ADMIN_TOKEN)
    (dead,) = (await admin.call("outbox.list", {"state": "dead"}))["records"]
    assert (dead["platform_code"], dead["platform_message"]) == ("3003", "居民信息验证错误")
    resident.status = "1"  # reinstated
    assert await admin.call("outbox.retry", {"id": dead["id"]}) == {"ok": True, "id": dead["id"]}
    await outbox_event(box, lambda o: o["dead"] == 0 and o["pending"] == 0)
    missing = await admin.request("outbox.retry", {"id": 4242})
    assert missing["error"]["data"]["reason"] == "BAD_REQUEST"


async def test_a_refused_code_is_forgotten_by_the_cache(box):
    await box.start(sources={})
    client = await box.unix()
    resident = box.resident()
    await client.call("verify_qr", {"qr": resident.static_qr})
    resident.status = "0"
    refused = await client.call("verify_qr", {"qr": resident.static_qr})
    assert refused["verification"]["reason"] == "CARD_INACTIVE"
    box.sim.faults.add(Fault("http500", count=None))
    offline = await client.call("verify_qr", {"qr": resident.static_qr})
    assert offline["verification"]["reason"] == "PLATFORM_UNAVAILABLE"  # not the cancelled card's identity


async def test_cache_ttl_zero_means_no_offline_answers(box):
    await box.start(sources={}, cache={"ttl": 0})
    client = await box.unix()
    await client.call("verify_qr", {"qr": box.resident().static_qr})
    box.sim.faults.add(Fault("http500", count=None))
    result = await client.call("verify_qr", {"qr": box.resident().static_qr})
    assert result["verification"]["reason"] == "PLATFORM_UNAVAILABLE"


async def test_the_outbox_cli_shows_retries_and_purges(box, tmp_path, capsys):
    await box.start(sources={}, outbox={"backoff_initial": "50ms", "backoff_max": "100ms"})
    client = await box.unix()
    resident = box.resident()
    await client.call("verify_qr", {"qr": resident.static_qr})
    box.sim.faults.add(Fault("http500", count=None))
    guid = (await client.call("verify_qr", {"qr": resident.static_qr}))["verification"]["msg_guid"]
    await box.daemon.stop()  # the technician looks at a box that is off
    state = str(tmp_path / "state")

    assert await asyncio.to_thread(cli.main, ["outbox", "--state-dir", state, "stats"]) == 0
    assert json.loads(capsys.readouterr().out)["pending"] == 1
    assert await asyncio.to_thread(cli.main, ["outbox", "--state-dir", state, "list"]) == 0
    out = capsys.readouterr().out
    assert "RHC_E0003" in out and "1 pending record" in out
    assert await asyncio.to_thread(cli.main, ["outbox", "--state-dir", state, "show", "1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["msg_guid"] == guid and shown["values"]["qr_code"] == resident.static_qr
    assert await asyncio.to_thread(cli.main, ["outbox", "--state-dir", state, "show", "77"]) == 1
    assert "no record 77" in capsys.readouterr().err
    assert await asyncio.to_thread(cli.main, ["outbox", "--state-dir", state, "purge-dead"]) == 0
    assert "deleted 0 dead records" in capsys.readouterr().out
    assert await asyncio.to_thread(cli.main, ["outbox", "--state-dir", str(tmp_path / "nowhere"), "stats"]) == 1
    assert "no outbox" in capsys.readouterr().err


async def test_at_start_the_daemon_purges_expired_identities_and_old_uploaded_records(box, tmp_path):
    from agent.model import UsageRecord
    from agent.outbox import Store

    long_ago = Store(tmp_path / "state" / "outbox.db", clock=lambda: 1_000_000_000.0)  # in 2001
    await long_ago.open()
    await long_ago.cache_put("B" * 64 + ":1", {"name": "张晓明"}, ttl_s=3600)
    sent = await long_ago.enqueue(UsageRecord("a" * 32, "RHC_E0003", {"qr_code": "x"}))
    await long_ago.mark_sent(sent, "3005", "验证成功")
    assert (await long_ago.stats())["cached_identities"] == 1
    await long_ago.close()

    await box.start(sources={})
    await outbox_event(box, lambda o: o["sent"] == 0)
    assert await box.daemon.store.get(sent) is None
    import sqlite3

    with sqlite3.connect(tmp_path / "state" / "outbox.db") as conn:  # the expired identity is gone, not hidden
        assert conn.execute("SELECT count(*) FROM identity_cache").fetchone()[0] == 0


async def test_a_verification_gets_one_deadline_then_is_answered_as_offline_and_recorded(box):
    """However many calls a platform needs (a credential refresh, a retry), the nurse waits at
    most `platform.verify_deadline_s`; a known static code is then answered from the cache and
    its use is kept for upload."""
    await box.start(sources={}, platform={"verify_deadline_s": 0.5, "timeout_s": 30})
    client = await box.unix()
    resident = box.resident()
    assert (await client.call("verify_qr", {"qr": resident.static_qr}))["verification"]["ok"]
    box.sim.faults.base_latency_s = 20  # every answer now takes longer than the deadline
    late = await client.call("verify_qr", {"qr": resident.static_qr}, timeout=10)
    v = late["verification"]
    assert v["ok"] is True and v["offline"] is True and late["identity"]["source"] == "cache"
    assert v["elapsed_ms"] < 5000
    never_seen = await client.call("verify_qr", {"qr": box.resident(1).static_qr}, timeout=10)
    assert never_seen["verification"]["reason"] == "PLATFORM_UNAVAILABLE"
    assert "within 0.5 s" in never_seen["verification"]["message"]
    status = await client.call("status")
    assert status["platform"]["reachable"] is False and status["outbox"]["pending"] == 1
    box.sim.faults.base_latency_s = 0


async def test_the_cache_is_written_when_an_entry_is_missing_changed_or_stale_not_on_every_scan(box):
    await box.start(sources={})
    client = await box.unix()
    resident = box.resident()
    store, verifier = box.daemon.store, box.daemon.verifier

    async def cached() -> tuple[dict, float]:
        await verifier.drain()
        found = await store.cache_get(resident.static_qr)
        assert found is not None
        return found

    await client.call("verify_qr", {"qr": resident.static_qr})
    _, first_written = await cached()
    for _ in range(3):  # the same patient again: the entry is fresh, no SD card write
        assert (await client.call("verify_qr", {"qr": resident.static_qr}))["verification"]["ok"]
    assert (await cached())[1] == first_written

    resident.cellphone = "13900001111"  # the platform's answer changed: written at once
    assert (await client.call("verify_qr", {"qr": resident.static_qr}))["identity"]["phone"] == "13900001111"
    identity, written = await cached()
    assert identity["phone"] == "13900001111" and written > first_written

    # a quarter of cache.ttl (24 h) after the write: written again, so the entry never runs out
    # while the patient keeps coming
    verifier.monotonic = lambda: time.monotonic() + 6.1 * 3600
    await client.call("verify_qr", {"qr": resident.static_qr})
    assert (await cached())[1] > written
