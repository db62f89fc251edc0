"""Personal data at rest (issue 15): what a pulled SD card, a copied database file or a backup
shows. Sealed payloads and identities under a key kept outside the database, nothing kept once
uploaded, deleted rows gone from the WAL too, dead records expired, a corrupt database carried
over and deleted, a version 1 database migrated, uses that could not be recorded kept."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import os
import sqlite3
import uuid
from pathlib import Path

import pytest

from agent import sealing
from agent.model import UsageRecord
from agent.outbox import SCHEMA_VERSION, Ledger, Store

QR = "3B5E4A8C" * 8 + ":1"
NAME = "张晓明"
ID_NUMBER = "630102198503121237"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def use(n: int = 0) -> UsageRecord:
    return UsageRecord(uuid.uuid4().hex, "RHC_E0003", {"qr_code": QR, "name": NAME, "id_card": ID_NUMBER,
                                                       "time": "2026-11-22 10:00:%02d" % n}, "scan-%d" % n)


def on_disk(directory: Path) -> bytes:
    """Every byte of the database, its WAL and anything beside it: what a copied card holds."""
    return b"".join(p.read_bytes() for p in directory.iterdir() if p.is_file() and p.name != "store.key")


def clear_text_in(data: bytes) -> list[str]:
    return [v for v in (QR, NAME, ID_NUMBER) if v.encode() in data]


@pytest.fixture
def credentials(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """systemd's LoadCredential=store.key:...: a directory the daemon is handed."""
    creds = tmp_path / "credentials"
    creds.mkdir()
    assert sealing.new_key_file(creds / sealing.KEY_NAME)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    return creds


async def test_outbox_payloads_and_cached_identities_are_not_in_clear_on_disk(tmp_path, credentials):
    state = tmp_path / "state"
    store = Store(state / "outbox.db")
    await store.open()
    record_id = await store.enqueue(use())
    await store.cache_put(QR, {"name": NAME, "id_number": ID_NUMBER}, ttl_s=3600)
    # the store itself reads them back
    assert (await store.get(record_id)).values["name"] == NAME
    assert (await store.cache_get(QR))[0]["id_number"] == ID_NUMBER
    assert clear_text_in(on_disk(state)) == []  # the WAL included: nothing checkpointed yet
    await store.close()
    assert clear_text_in(on_disk(state)) == []
    # the key is the credential, not a file beside the database
    assert not (state / "store.key").exists()
    assert store.keyring is not None and not store.keyring.beside_data


async def test_a_copied_database_does_not_open_without_its_key(tmp_path, credentials, monkeypatch):
    state = tmp_path / "state"
    store = Store(state / "outbox.db")
    await store.open()
    record_id = await store.enqueue(use())
    await store.cache_put(QR, {"name": NAME}, ttl_s=3600)
    await store.close()
    # the file elsewhere, with another key (the thief's box, a backup restored to another box)
    other = tmp_path / "other"
    other.mkdir()
    assert sealing.new_key_file(other / sealing.KEY_NAME)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(other))
    thief = Store(state / "outbox.db")
    await thief.open()
    row = await thief.get(record_id)
    assert row.values is None and "another key" in row.unreadable
    assert await thief.cache_get(QR) is None
    await thief.close()


async def test_a_sealed_payload_moved_onto_another_row_does_not_open(tmp_path, credentials):
    """The row's msgGuid is the associated data: swapping payloads between rows (to send one
    patient's use under another's msgGuid) fails, and the uploader never sends it."""
    state = tmp_path / "state"
    store = Store(state / "outbox.db")
    await store.open()
    a, b = await store.enqueue(use(1)), await store.enqueue(use(2))
    await store.close()
    with sqlite3.connect(state / "outbox.db") as conn:
        payload_a = conn.execute("SELECT payload FROM outbox WHERE id = ?", (a,)).fetchone()[0]
        conn.execute("UPDATE outbox SET payload = ? WHERE id = ?", (payload_a, b))
    store = Store(state / "outbox.db")
    await store.open()
    assert (await store.get(a)).values["time"].endswith("01")
    moved = await store.get(b)
    assert moved.values is None and "moved from another row" in moved.unreadable
    await store.close()


async def test_an_uploaded_record_keeps_no_payload(tmp_path, credentials):
    state = tmp_path / "state"
    store = Store(state / "outbox.db")
    await store.open()
    sent, dead = await store.enqueue(use(1)), await store.enqueue(use(2))
    await store.mark_sent(sent, "3005", "ok")
    await store.mark_dead(dead, "4002", "no")
    assert (await store.get(sent)).values is None  # the QR code, a bearer credential, is gone
    assert (await store.get(dead)).values["qr_code"] == QR  # kept for a retry
    await store.close()
    with sqlite3.connect(state / "outbox.db") as conn:
        assert conn.execute("SELECT length(payload) FROM outbox WHERE id = ?", (sent,)).fetchone()[0] == 0


async def test_deleted_rows_are_not_left_in_the_wal_or_free_pages(tmp_path, credentials):
    state = tmp_path / "state"
    clock = Clock()
    store = Store(state / "outbox.db", clock=clock)
    await store.open()
    await store.cache_put(QR, {"name": NAME}, ttl_s=3600)
    dead = await store.enqueue(use())
    await store.mark_dead(dead, "4002", "no")
    with sqlite3.connect(state / "outbox.db") as conn:
        sealed = [conn.execute("SELECT identity FROM identity_cache").fetchone()[0],
                  conn.execute("SELECT payload FROM outbox").fetchone()[0]]
    assert all(s in on_disk(state) for s in sealed)
    await store.cache_forget(QR)
    assert await store.purge_dead() == 1
    assert (state / "outbox.db-wal").stat().st_size == 0  # truncated after the deletions
    data = on_disk(state)
    assert not any(s in data for s in sealed)  # secure_delete: zeroed, not merely unlinked
    await store.close()


async def test_dead_records_expire_after_dead_retention(tmp_path, credentials):
    clock = Clock()
    store = Store(tmp_path / "outbox.db", clock=clock)
    await store.open()
    dead, pending = await store.enqueue(use(1)), await store.enqueue(use(2))
    await store.mark_dead(dead, "4002", "no")
    clock.now += 86400
    assert await store.housekeeping(3600, dead_retention_s=7 * 86400) == (0, 0, 0)
    clock.now += 6 * 86400 + 1
    assert await store.housekeeping(3600, dead_retention_s=7 * 86400) == (0, 1, 0)
    assert await store.get(dead) is None and (await store.get(pending)).state == "pending"
    await store.close()


V1_SCHEMA = """
CREATE TABLE outbox (id INTEGER PRIMARY KEY, guid TEXT NOT NULL UNIQUE, operation TEXT NOT NULL,
    payload TEXT NOT NULL, scan_id TEXT, created_at REAL NOT NULL,
    state TEXT NOT NULL CHECK (state IN ('pending', 'sent', 'dead')), attempts INTEGER NOT NULL DEFAULT 0,
    next_attempt_at REAL NOT NULL DEFAULT 0, last_error TEXT, platform_code TEXT, platform_message TEXT,
    done_at REAL);
CREATE INDEX outbox_due ON outbox (state, next_attempt_at, id);
CREATE TABLE identity_cache (qr_hash TEXT PRIMARY KEY, identity TEXT NOT NULL, verified_at REAL NOT NULL,
    expires_at REAL NOT NULL);
CREATE INDEX identity_cache_expiry ON identity_cache (expires_at);
PRAGMA user_version = 1;
"""


async def test_a_version_1_database_is_sealed_in_place_and_keeps_working(tmp_path, credentials):
    state = tmp_path / "state"
    state.mkdir()
    import json

    with sqlite3.connect(state / "outbox.db") as conn:
        conn.execute("PRAGMA journal_mode = WAL")
        conn.executescript(V1_SCHEMA)
        for n, st in enumerate(("pending", "sent", "dead")):
            conn.execute("INSERT INTO outbox (guid, operation, payload, scan_id, created_at, state, done_at)"
                         " VALUES (?, 'RHC_E0003', ?, ?, 1.8e9, ?, ?)",
                         ("%032x" % n, json.dumps(use(n).values, ensure_ascii=False), "scan-%d" % n, st,
                          None if st == "pending" else 1.8e9))
        conn.execute("INSERT INTO identity_cache VALUES (?, ?, 1.8e9, 1.9e9)",
                     (hashlib.sha256(QR.encode()).hexdigest(), json.dumps({"name": NAME}, ensure_ascii=False)))
    assert clear_text_in(on_disk(state))  # what the field's boxes hold today
    store = Store(state / "outbox.db", clock=Clock())
    await store.open()
    pending, sent, dead = await store.get(1), await store.get(2), await store.get(3)
    assert pending.values["name"] == NAME and dead.values["id_card"] == ID_NUMBER and sent.values is None
    # its cache was indexed by a plain sha256 of the code: deleted, not kept searchable
    assert await store.cache_get(QR) is None
    assert clear_text_in(on_disk(state)) == []
    assert hashlib.sha256(QR.encode()).hexdigest().encode() not in on_disk(state)
    await store.enqueue(use(9))  # and it takes new records
    await store.close()
    with sqlite3.connect(state / "outbox.db") as conn:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION


def _unkeyed_digests(text: str) -> set[str]:
    data = text.encode()
    return {hashlib.new(name, data).hexdigest() for name in ("md5", "sha1", "sha256", "sha512", "sha3_256")}


async def test_the_identity_cache_cannot_be_searched_for_a_known_code(tmp_path, credentials):
    """Whoever holds the card and knows a patient's static code (printed, photographed) must not
    be able to find out from the database whether, and when, that patient was here."""
    state = tmp_path / "state"
    store = Store(state / "outbox.db")
    await store.open()
    await store.cache_put(QR, {"name": NAME}, ttl_s=3600)
    await store.close()
    with sqlite3.connect(state / "outbox.db") as conn:
        index = [r[0] for r in conn.execute("SELECT qr_hash FROM identity_cache")]
    assert len(index) == 1
    assert not _unkeyed_digests(QR) & set(index)  # on main: the sha256 of the code
    assert not any(d.encode() in on_disk(state) for d in _unkeyed_digests(QR))
    # keyed by a key derived from the store key with a label of its own, not the store key itself
    key = sealing.read_key(credentials / sealing.KEY_NAME)
    assert index == [sealing.Keyring(key, "test").qr_index(QR)]
    assert index[0] != hmac.new(key, QR.encode(), hashlib.sha256).hexdigest()
    assert index[0] != sealing.Keyring(os.urandom(32), "another box").qr_index(QR)
    # and the store finds it again
    store = Store(state / "outbox.db")
    await store.open()
    assert (await store.cache_get(QR))[0]["name"] == NAME
    await store.cache_forget(QR)
    assert await store.cache_get(QR) is None
    await store.close()


async def test_cache_entries_indexed_by_a_plain_hash_are_deleted_at_the_upgrade(tmp_path, credentials):
    """A version 2 database (sealed identities, indexed by sha256 of the code): the index cannot
    be re-keyed without the code, so those entries go (a cache: the next online verification
    fills it again); the outbox is untouched."""
    state = tmp_path / "state"
    store = Store(state / "outbox.db")
    await store.open()
    record_id = await store.enqueue(use())
    await store.close()
    plain = hashlib.sha256(QR.encode()).hexdigest()
    keys = sealing.Keyring(sealing.read_key(credentials / sealing.KEY_NAME), "test")
    with sqlite3.connect(state / "outbox.db") as conn:
        conn.execute("INSERT INTO identity_cache VALUES (?, ?, 1.8e9, 1.9e9)",
                     (plain, keys.seal(b'{"name": "%s"}' % NAME.encode(), b"cache:" + plain.encode())))
        conn.execute("PRAGMA user_version = 2")
    store = Store(state / "outbox.db", clock=Clock())
    await store.open()
    assert await store.cache_get(QR) is None
    assert (await store.get(record_id)).values["name"] == NAME
    await store.close()
    assert plain.encode() not in on_disk(state)
    with sqlite3.connect(state / "outbox.db") as conn:
        assert conn.execute("SELECT count(*) FROM identity_cache").fetchone()[0] == 0
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION == 4


async def test_a_key_made_beside_the_data_is_replaced_by_the_credential(tmp_path, monkeypatch):
    """A box whose credential was missing made its key in the state directory (an alarm); once
    the credential exists, what was sealed is re-sealed under it and the old key deleted."""
    fallback = tmp_path / "fallback-credentials"  # SetCredential=store.key:none, the file missing
    fallback.mkdir()
    (fallback / sealing.KEY_NAME).write_bytes(sealing.NO_KEY)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(fallback))
    state = tmp_path / "state"
    store = Store(state / "outbox.db")
    await store.open()
    record_id = await store.enqueue(use())
    await store.cache_put(QR, {"name": NAME}, ttl_s=3600)
    assert store.keyring.beside_data and (state / "store.key").exists()
    await store.close()
    creds = tmp_path / "credentials"
    creds.mkdir()
    sealing.new_key_file(creds / sealing.KEY_NAME)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    store = Store(state / "outbox.db")
    await store.open()
    assert not store.keyring.beside_data and not (state / "store.key").exists()
    assert (await store.get(record_id)).values["name"] == NAME
    # its index was keyed by the old key: it cannot be found, so it is not kept
    assert (await store.stats())["cached_identities"] == 0
    await store.close()


async def test_a_corrupt_database_has_its_readable_rows_carried_over_and_is_deleted(tmp_path, credentials):
    state = tmp_path / "state"
    store = Store(state / "outbox.db")
    await store.open()
    guids = []
    for n in range(60):
        record = UsageRecord(uuid.uuid4().hex, "RHC_E0003", {"qr_code": QR, "pad": "x" * 600}, "scan-%d" % n)
        guids.append(record.guid)
        await store.enqueue(record)
    await store.close()  # checkpointed into the database file
    path = state / "outbox.db"
    page = 4096
    pages = path.stat().st_size // page
    with open(path, "r+b") as fh:  # one page in the middle of the table becomes garbage
        fh.seek(page * (pages // 2))
        fh.write(os.urandom(page))
    store = Store(path)
    await store.open()
    assert store.available and "corrupt" in store.recovered and "carried over" in store.recovered
    carried = await store.rows("pending", 1000)
    assert 30 <= len(carried) < 60, len(carried)
    assert {r.guid for r in carried} <= set(guids)
    assert all(r.values is not None and r.values["qr_code"] == QR for r in carried)  # they still open
    await store.enqueue(use())
    await store.close()
    assert not [p.name for p in state.iterdir() if "corrupt" in p.name]  # deleted: it held personal data


def test_unrecorded_uses_outlive_a_restart_in_a_file_allocated_beforehand(tmp_path):
    ledger = Ledger(tmp_path / "unrecorded.dat")
    ledger.allocate()
    size = (tmp_path / "unrecorded.dat").stat().st_size
    assert size >= 16384
    records = [use(n) for n in range(70)]
    for record in records:
        ledger.add(record, 1.8e9)
    assert (tmp_path / "unrecorded.dat").stat().st_size == size  # not one block more
    again = Ledger(tmp_path / "unrecorded.dat")  # the daemon restarted
    again.allocate()
    assert again.count == 70
    entries = again.entries()
    assert [e["scan_id"] for e in entries] == [r.scan_id for r in records[:len(entries)]]
    assert len(entries) >= 60 and entries[0]["msg_guid"] == records[0].guid
    assert clear_text_in((tmp_path / "unrecorded.dat").read_bytes()) == []
    again.clear()
    assert Ledger(tmp_path / "unrecorded.dat").entries() == [] and again.count == 0


def test_a_key_file_is_0600_and_never_replaced(tmp_path):
    path = tmp_path / "etc" / "store.key"
    assert sealing.new_key_file(path)
    key = path.read_bytes()
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert len(base64.b64decode(key)) == 32
    assert not sealing.new_key_file(path) and path.read_bytes() == key


async def test_the_cli_as_the_daemons_user_counts_without_the_key_and_makes_nothing(tmp_path, credentials,
                                                                                      monkeypatch, capsys):
    from agent import cli

    state = tmp_path / "state"
    store = Store(state / "outbox.db")
    await store.open()
    await store.enqueue(use())
    await store.close()
    monkeypatch.delenv("CREDENTIALS_DIRECTORY")  # `sudo -u scanbox scanbox outbox ...`: no credential
    (state / "unrecorded.dat").unlink()
    assert await asyncio.to_thread(cli.main, ["outbox", "--state-dir", str(state), "list"]) == 0
    assert "1 pending record" in capsys.readouterr().out
    assert await asyncio.to_thread(cli.main, ["outbox", "--state-dir", str(state), "show", "1"]) == 0
    shown = capsys.readouterr().out
    assert NAME not in shown and "no store key here" in shown
    assert sorted(p.name for p in state.iterdir() if not p.name.startswith("outbox.db")) == []
