"""Use records held until the clock is right, then re-timed (issue 15, "Time"): a Pi has no
real-time clock, and a use recorded before NTP has set it carries a wrong time. Such a record
keeps its boot id and CLOCK_BOOTTIME at the scan; once the clock is right in the same boot it
goes with the scan's true time (now minus the BOOTTIME since); one from another boot goes to
dead-letter saying so, for a technician to send with a time they give. The daemon runs with the
Clock's seams turned: its time source, timesyncd's directory, BOOTTIME and the boot id."""

from __future__ import annotations

import asyncio
import email.utils
import datetime as dt
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from agent import clock as clocks
from agent import platforms
from agent.clock import Clock
from agent.config import validate
from agent.model import Identity, IdentitySource, Scan, ScanKind, UsageRecord
from agent.outbox import Store
from agent.platforms.base import VerifyRequest
from agent.qr import QrKind
from agent.simulator import cards as emu
from agent.simulator.soap import Fault
from tests.conftest import ADMIN_TOKEN, config_dict, until
from tests.fleet.common import api_with_metrics, samples, scrape, value

NINETEEN_SEVENTY = 86400.0 * 3  # 1970-01-04
ONE_HOUR = 3600.0
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"


class Dial:
    """A reading the test sets: the wall clock, or CLOCK_BOOTTIME."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


class Shifted:
    """A wall clock that runs, `offset` seconds off the real one (fake-hwclock's restored time)."""

    def __init__(self, offset: float) -> None:
        self.offset = offset

    def __call__(self) -> float:
        return time.time() + self.offset


class Boot:
    """The kernel's boot: its id and CLOCK_BOOTTIME, as the Clock reads them."""

    def __init__(self, boot_id: str = "boot-1", boottime: float = 1000.0) -> None:
        self.id = boot_id
        self.time = Dial(boottime)

    def boot_id(self) -> str:
        return self.id


@pytest.fixture(autouse=True)
def no_installed_clock():
    yield
    clocks.install(None)


def a_clock(tmp_path: Path, now: float, boot: Boot | None = None, *, timesyncd: bool = False,
            synchronised: bool = False, wall: Any = None) -> tuple[Clock, Any]:
    wall = wall or Dial(now)
    timesync = tmp_path / "timesync"
    if timesyncd:
        timesync.mkdir(exist_ok=True)
        if synchronised:
            (timesync / "synchronized").touch()
    seams: dict[str, Any] = {}
    if boot is not None:
        seams = {"boottime": boot.time, "boot_id": boot.boot_id}
    return Clock(time_source=wall, timesync_dir=timesync, kernel=lambda: None, sync_wait_s=0.0, **seams), wall


def card_scan(at: float) -> Scan:
    """A resident health card read at this box (its use is RHC_E0009, through the outbox)."""
    person = emu.SAMPLE_PERSON
    identity = Identity(IdentitySource.CARD, name=person["name"], sex=person["sex"], nation=person["nation"],
                        birthday=person["birthday"], id_type="01", id_number=person["id_number"])
    card = {"card_number": emu.HC_NUMBER, "atr_historical": "8031C073D631C0239000A1B2C3D4E5F6"}
    return Scan("pcsc:cards", ScanKind.HEALTH_CARD, card, identity=identity,
                at=dt.datetime.fromtimestamp(at).astimezone())


def filed(entry: Any) -> float:
    return dt.datetime.strptime(entry.values["time"], TIME_FORMAT).timestamp()


def entries(box: Any, guid: str) -> list[Any]:
    return [e for e in box.sim.sim.journal if e.msg_guid == guid]


async def test_a_card_used_in_1970_goes_with_its_true_time_once_the_clock_is_right(box, tmp_path):
    # the state a box left behind in 2026: a use it uploaded
    before = Store(tmp_path / "state" / "outbox.db", clock=Dial(time.time() - 86400))
    await before.open()
    old_id = await before.enqueue(UsageRecord(uuid.uuid4().hex, "RHC_E0003", {"qr_code": box.resident(1).static_qr},
                                              "scan-2026", time.time() - 86400))
    await before.mark_sent(old_id, "0000", "ok")
    await before.close()
    boot = Boot()
    clock, wall = a_clock(tmp_path, NINETEEN_SEVENTY, boot)
    await box.start(clock=clock, sources={})
    assert clock.floor_source == "the newest record in the outbox"
    box.sim.faults.add(Fault("http500", count=None))  # and the platform is down: the box is offline
    result = await box.daemon.verifier.verify(card_scan(NINETEEN_SEVENTY))
    assert result.verification.ok and result.verification.msg_guid
    guid = result.verification.msg_guid
    await until(lambda: box.daemon.uploader.held_for_clock)
    (held,) = await box.daemon.store.held(10)
    assert held.guid == guid and not held.clock_ok and held.stamp is not None
    assert held.stamp.boot_id == "boot-1" and abs(held.stamp.boottime - 1000.0) < 1
    client = await box.unix()
    assert (await client.call("outbox.stats"))["held_for_clock"] == 1

    # ten minutes on (BOOTTIME), the platform is back and NTP sets the clock: the use happened
    # ten minutes before now
    box.sim.faults.clear()
    boot.time.now += 600
    wall.now = time.time()
    true_time = wall.now - 600
    await until(lambda: any(e.ok for e in entries(box, guid)), timeout=10)
    (entry,) = entries(box, guid)
    assert entry.code == "RHC_E0009"
    assert abs(filed(entry) - true_time) <= 1.5, entry.values["time"]  # whole seconds on the wire
    # nothing but the time moved: the patient's own date (birthday) is the card's
    assert entry.values["birthday"] == emu.SAMPLE_PERSON["birthday"]
    await until(lambda: box.daemon.uploader.sent == 1)
    sent = [r for r in await box.daemon.store.rows("sent") if r.guid == guid]
    # (less the moment between the scan and its record, which a loaded machine stretches)
    assert sent[0].clock_ok and abs(sent[0].created_at - true_time) < 0.5
    assert abs(sent[0].retimed - (true_time - held.created_at)) < 0.5
    stats = await client.call("outbox.stats")
    assert (stats["held_for_clock"], stats["retimed"], stats["dead"]) == (0, 1, 0)


async def test_a_restart_in_the_same_boot_still_re_times(box, tmp_path):
    boot = Boot()
    clock, _ = a_clock(tmp_path, NINETEEN_SEVENTY, boot)
    await box.start(clock=clock, sources={})
    result = await box.daemon.verifier.verify(card_scan(NINETEEN_SEVENTY))
    guid = result.verification.msg_guid
    await box.daemon.stop()
    assert entries(box, guid) == []

    # the service restarts (same boot); by then NTP has set the clock
    boot.time.now += 120
    clock, wall = a_clock(tmp_path, time.time(), boot)
    true_time = wall.now - 120
    await box.start(clock=clock, sources={})
    await until(lambda: any(e.ok for e in entries(box, guid)), timeout=10)
    (entry,) = entries(box, guid)
    assert abs(filed(entry) - true_time) <= 1.5, entry.values["time"]  # whole seconds on the wire


async def test_a_record_from_another_boot_is_dead_with_the_reason_until_a_technician_gives_its_time(box, tmp_path):
    clock, _ = a_clock(tmp_path, NINETEEN_SEVENTY, Boot("boot-1"))
    await box.start(clock=clock, sources={})
    result = await box.daemon.verifier.verify(card_scan(NINETEEN_SEVENTY))
    guid = result.verification.msg_guid
    await box.daemon.stop()

    # the box was switched off before NTP set the clock: BOOTTIME started again from 0
    clock, _ = a_clock(tmp_path, time.time(), Boot("boot-2", boottime=5.0))
    await box.start(clock=clock, sources={})
    await until(lambda: box.daemon.uploader.dead == 1, timeout=10)
    (dead,) = await box.daemon.store.rows("dead")
    assert dead.guid == guid
    assert "earlier boot" in dead.platform_message and "true time is unknown" in dead.platform_message
    assert "retry %d --at" % dead.id in dead.platform_message
    assert entries(box, guid) == []

    # retried as it is, it would go with 1970: the box asks which time
    admin = await box.tcp(ADMIN_TOKEN)
    refused = await admin.request("outbox.retry", {"id": dead.id})
    assert refused["error"]["data"]["reason"] == "BAD_REQUEST"
    assert "--at" in refused["error"]["message"] and "--keep-time" in refused["error"]["message"]
    bad = await admin.request("outbox.retry", {"id": dead.id, "at": "yesterday"})
    assert "params.at" in bad["error"]["message"]
    given = time.time() - 2 * ONE_HOUR
    at = dt.datetime.fromtimestamp(given).strftime(TIME_FORMAT)
    assert (await admin.call("outbox.retry", {"id": dead.id, "at": at}))["ok"]
    await until(lambda: any(e.ok for e in entries(box, guid)), timeout=10)
    (entry,) = entries(box, guid)
    assert entry.values["time"] == at
    await until(lambda: box.daemon.uploader.sent == 1)
    (sent,) = await box.daemon.store.rows("sent")
    assert sent.clock_ok and abs(sent.created_at - int(given)) < 1


async def test_fake_hwclock_an_hour_behind_holds_the_use_until_ntp_then_re_times_it(box, tmp_path):
    resident = box.resident()
    now = time.time()
    # a static code verified online yesterday answers from the cache while the platform is down
    before = Store(tmp_path / "state" / "outbox.db", clock=Dial(now - 86400))
    await before.open()
    await before.cache_put(resident.static_qr, {"name": resident.name, "id_number": resident.id_card}, 3 * 86400)
    await before.close()
    # fake-hwclock restored the last shutdown's time: sane, an hour behind, timesyncd not synchronised yet
    clock, wall = a_clock(tmp_path, 0, timesyncd=True, wall=Shifted(-ONE_HOUR))
    await box.start(clock=clock, sources={}, api=api_with_metrics())
    box.sim.faults.add(Fault("http500", count=None))
    client = await box.unix()
    scanned = time.time()
    answer = await client.call("verify_qr", {"qr": resident.static_qr})
    assert answer["verification"]["ok"] and answer["verification"]["offline"]
    guid = answer["verification"]["msg_guid"]
    box.sim.faults.clear()
    # the platform is back, the clock sane: the use is not sent with a time an hour behind
    await until(lambda: box.daemon.uploader.waiting_for_clock == 1, timeout=10)
    assert entries(box, guid) == []
    status = await client.call("status")
    assert status["outbox"]["held_for_clock"] == 1 and status["uploader"]["waiting_for_clock"] == 1
    async with aiohttp.ClientSession() as http:  # and the region's Prometheus sees it
        _, text = await scrape(http, "http://%s:%d/metrics" % box.daemon.http.address)
    assert value(samples(text), "scanbox_outbox_held_for_clock") == 1

    wall.offset = 0.0  # NTP: the clock steps an hour forward
    (tmp_path / "timesync" / "synchronized").touch()
    await until(lambda: any(e.ok for e in entries(box, guid)), timeout=10)
    (entry,) = entries(box, guid)
    assert entry.code == "RHC_E0003"
    assert abs(filed(entry) - scanned) <= 1.5, entry.values["time"]  # the second it was scanned in
    assert (await client.call("outbox.stats"))["retimed"] == 1


async def test_without_ntp_a_held_use_goes_by_the_platforms_time_ten_minutes_after_the_start(box, tmp_path):
    """A hospital firewall drops NTP: fake-hwclock's time stays an hour behind and unsynchronised.
    The use is not held for ever: it goes by the platform's clock, which files it anyway."""
    resident = box.resident()
    before = Store(tmp_path / "state" / "outbox.db", clock=Dial(time.time() - 86400))
    await before.open()
    await before.cache_put(resident.static_qr, {"name": resident.name, "id_number": resident.id_card}, 3 * 86400)
    await before.close()
    clock, _ = a_clock(tmp_path, 0, timesyncd=True, wall=Shifted(-ONE_HOUR))
    await box.start(clock=clock, sources={})
    box.sim.faults.add(Fault("http500", count=None))
    client = await box.unix()
    scanned = time.time()
    answer = await client.call("verify_qr", {"qr": resident.static_qr})
    guid = answer["verification"]["msg_guid"]
    box.sim.faults.clear()
    await until(lambda: box.daemon.uploader.waiting_for_clock == 1, timeout=10)
    assert entries(box, guid) == []
    clock.started -= clocks.NTP_PATIENCE_S  # ten minutes on, still no NTP
    await until(lambda: any(e.ok for e in entries(box, guid)), timeout=10)
    (entry,) = entries(box, guid)
    assert abs(filed(entry) - scanned) <= 2, entry.values["time"]  # the platform's time, not an hour behind
    assert "CLOCK_UNSYNCHRONISED" in {a["code"] for a in (await client.call("status"))["alarms"]}


async def test_when_the_wait_for_ntp_runs_out_a_verification_carries_the_platforms_time(box, tmp_path):
    # an hour behind and not synchronised, and the wait for NTP is over
    clock, _ = a_clock(tmp_path, 0, timesyncd=True, wall=Shifted(-ONE_HOUR))
    await box.start(clock=clock, sources={})
    client = await box.unix()
    # any answer from the platform in this boot tells its time (the simulator's HTTP Date)
    await client.call("verify_qr", {"qr": box.resident(1).static_qr})
    assert clock.platform_now() is not None
    assert abs((await client.call("status"))["clock"]["platform_offset_s"] - ONE_HOUR) <= 2
    scanned = time.time()
    answer = await client.call("verify_qr", {"qr": box.resident().static_qr})
    assert answer["verification"]["ok"]  # the nurse is answered
    assert "platform's time" in answer["verification"]["message"]
    (entry,) = entries(box, answer["verification"]["msg_guid"])
    assert abs(filed(entry) - scanned) <= 2, entry.values["time"]  # not an hour behind


async def test_a_record_made_before_boot_times_were_kept_is_dead_with_the_reason(box, tmp_path):
    """A version 3 database (clock_ok, no boot time) from a box that ran the previous release."""
    import sqlite3

    store = Store(tmp_path / "state" / "outbox.db")
    await store.open()
    record = UsageRecord(uuid.uuid4().hex, "RHC_E0003", {"qr_code": box.resident().static_qr}, "scan-old",
                         NINETEEN_SEVENTY)
    await store.enqueue(record)
    await store.close()
    conn = sqlite3.connect(tmp_path / "state" / "outbox.db")
    conn.execute("UPDATE outbox SET clock_ok = 0")
    for column in ("boot_id", "boottime", "retime_to", "retimed"):
        conn.execute("ALTER TABLE outbox DROP COLUMN %s" % column)
    conn.execute("PRAGMA user_version = 3")
    conn.commit()
    conn.close()
    await box.start(sources={})
    await until(lambda: box.daemon.uploader.dead == 1, timeout=10)
    (dead,) = await box.daemon.store.rows("dead")
    assert "kept no boot time" in dead.platform_message and entries(box, record.guid) == []


# --- each platform re-renders its own time fields, and nothing else ---------------------------

WHEN = dt.datetime(2026, 11, 30, 9, 41, 7).astimezone()


def platform_of(kind: str, tmp_path: Path) -> Any:
    data = config_dict(None, tmp_path)
    if kind == "wondersgroup":
        data["platform"] = {"kind": "wondersgroup", "endpoint": "http://127.0.0.1:9/card", "timeout_s": 2,
                            "wondersgroup": {"org_code": "121212", "user_name": "scanbox",
                                             "pass_word": "scanbox-secret", "machine_code": "SB-0001"}}
    elif kind == "fsjson":
        data["platform"] = {"kind": "fsjson", "endpoint": "http://127.0.0.1:9/fs", "timeout_s": 2,
                            "fsjson": {"app_id": "app-0001", "app_secret": "secret-0001-abcdefgh",
                                       "term_id": "SB-0001"}}
    config = validate(data)
    return platforms.create(config, tmp_path / "state")


def changed(before: UsageRecord, after: UsageRecord) -> dict[str, tuple[Any, Any]]:
    keys = set(before.values) | set(after.values)
    return {k: (before.values.get(k), after.values.get(k)) for k in keys
            if before.values.get(k) != after.values.get(k)}


def test_rhc_re_renders_the_time_of_a_verification_and_of_a_card_use_only(tmp_path):
    rhc = platform_of("rhc", tmp_path)
    scanned = dt.datetime.fromtimestamp(NINETEEN_SEVENTY).astimezone()
    verify = rhc.verify_record(VerifyRequest("A" * 64 + ":1", QrKind.STATIC, scanned, "010101", "01"), "s-1")
    card_use = rhc.card_use_record(card_scan(NINETEEN_SEVENTY), "010101", "01")
    for record in (verify, card_use):
        after = rhc.retime(record, WHEN)
        assert changed(record, after) == {"time": (scanned.strftime(TIME_FORMAT), "2026-11-30 09:41:07")}
        assert (after.guid, after.operation, after.scan_id) == (record.guid, record.operation, record.scan_id)
        assert after.created_at == WHEN.timestamp()
    assert card_use.values["birthday"] == "19850312"  # a date, not the scan's: unchanged above
    temporary = rhc.verify_record(VerifyRequest("T" * 20, QrKind.TEMPORARY, scanned, "010101", "01"))
    assert changed(temporary, rhc.retime(temporary, WHEN)) == {}  # RHC_E0013: the code alone
    with pytest.raises(Exception) as refused:
        rhc.retime(UsageRecord(uuid.uuid4().hex, "RHC_E9999", {}), WHEN)
    assert getattr(refused.value, "reason", None) == "NOT_SUPPORTED"


def test_wondersgroup_and_fsjson_records_carry_no_scan_time_and_keep_their_dates(tmp_path):
    wg = platform_of("wondersgroup", tmp_path / "wg")
    scanned = dt.datetime.fromtimestamp(NINETEEN_SEVENTY).astimezone()
    verify = wg.verify_record(VerifyRequest("A" * 64 + ":1", QrKind.STATIC, scanned, "010101", "01"), "s-1")
    after = wg.retime(verify, WHEN)
    assert changed(verify, after) == {} and after.created_at == WHEN.timestamp()
    fs = platform_of("fsjson", tmp_path / "fs")
    issue = UsageRecord(uuid.uuid4().hex, "syncCardInfo", {
        "type": "0", "cardInfo": {"klx": "3", "fksj": "19700104", "orgCode": "440600", "isRealName": "1"},
        "peopleInfo": {"xm": "张晓明", "csrq": "19850312"}})
    after = fs.retime(issue, WHEN)
    assert changed(issue, after) == {} and after.created_at == WHEN.timestamp()
    for platform in (wg, fs):
        with pytest.raises(Exception) as refused:
            platform.retime(UsageRecord(uuid.uuid4().hex, "RHC_E0003", {}), WHEN)
        assert getattr(refused.value, "reason", None) == "NOT_SUPPORTED"


async def test_the_clock_places_a_stamp_only_in_its_own_boot_and_once_right(tmp_path):
    boot = Boot("boot-1", 50.0)
    clock, wall = a_clock(tmp_path, NINETEEN_SEVENTY, boot, timesyncd=True)
    stamp = clock.stamp(time.monotonic())
    assert stamp is not None and stamp.boot_id == "boot-1" and abs(stamp.boottime - 50.0) < 0.1
    boot.time.now += 30
    assert clock.when(stamp) is None  # not right yet
    wall.now = 1.8e9
    assert clock.when(stamp) is None  # sane, but timesyncd has not synchronised
    (tmp_path / "timesync" / "synchronized").touch()
    placed = clock.when(stamp)
    assert placed is not None and abs(placed[0] - (1.8e9 - 30)) < 0.1 and placed[1] == "the clock"
    assert clock.stamp() is None  # right: nothing to hold
    boot.id = "boot-2"
    assert clock.when(stamp) is None
    await asyncio.sleep(0)


async def test_the_cli_retries_a_record_it_could_not_place_only_with_a_time_or_the_one_it_carries(tmp_path, capsys):
    from agent import cli
    from agent.clock import Stamp

    state = tmp_path / "state"
    store = Store(state / "outbox.db", stamp=lambda monotonic: Stamp("boot-1", 10.0))
    await store.open()
    ids = [await store.enqueue(UsageRecord(uuid.uuid4().hex, "RHC_E0003", {"qr_code": "A" * 64 + ":1"}, "s-%d" % n,
                                           NINETEEN_SEVENTY)) for n in range(2)]
    for record_id in ids:
        await store.mark_dead(record_id, None, "recorded while the clock was not right ... in an earlier boot")
    await store.close()

    def retry(*args: str) -> int:
        return cli.main(["outbox", "--state-dir", str(state), "retry", *args])

    assert await asyncio.to_thread(retry, str(ids[0])) == 1
    assert "--at TIME" in capsys.readouterr().err
    assert await asyncio.to_thread(retry, str(ids[0]), "--at", "1970-01-04 00:00:00") == 1
    assert "before 2024" in capsys.readouterr().err
    at = dt.datetime.fromtimestamp(time.time() - 2 * ONE_HOUR).replace(microsecond=0)
    assert await asyncio.to_thread(retry, str(ids[0]), "--at", at.strftime(TIME_FORMAT)) == 0
    assert await asyncio.to_thread(retry, str(ids[1]), "--keep-time") == 0
    store = Store(state / "outbox.db")
    await store.open()
    given, kept = [await store.get(record_id) for record_id in ids]
    await store.close()
    assert given is not None and kept is not None
    assert given.state == "pending" and not given.clock_ok  # re-timed by the daemon, by its platform's rules
    assert given.retime_to == at.astimezone().timestamp()
    assert kept.state == "pending" and kept.clock_ok and kept.created_at == NINETEEN_SEVENTY
    assert await asyncio.to_thread(cli.main, ["outbox", "--state-dir", str(state), "list"]) == 0
    listed = [line for line in capsys.readouterr().out.splitlines() if "RHC_E0003" in line]
    assert [line.endswith("(held for the clock)") for line in listed] == [True, False]


def test_an_rhc_message_made_while_the_clock_is_not_right_says_the_platforms_time(tmp_path):
    rhc = platform_of("rhc", tmp_path)
    clock, _ = a_clock(tmp_path, 0, timesyncd=True, wall=Shifted(-ONE_HOUR))
    clocks.install(clock)

    def created() -> float:
        action = rhc.build_action("RHC_E0003")
        text = action.split("<msgCreateTime>")[1].split("</msgCreateTime>")[0]
        return dt.datetime.strptime(text, TIME_FORMAT).timestamp()

    assert abs(created() - time.time()) <= 1.5  # the box's clock: nothing else known yet
    assert clock.problem() is not None  # the daemon looks at its clock for every scan
    clock.heard_date(email.utils.formatdate(time.time() - 7200, usegmt=True))  # the platform says two hours ago
    assert abs(created() - (time.time() - 7200)) <= 2
