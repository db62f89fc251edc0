"""The ID card reader driver: SAM frames against known bytes, and the driver against a pty reader
emulator (card on, card off, noise, corrupted and truncated frames, silence, a late reader)."""

from __future__ import annotations

import asyncio
import base64
from pathlib import Path
from typing import Any

import pytest

from agent import schema
from agent.config import ConfigError, validate_source
from agent.model import IdentitySource, ScanKind
from drivers import idcard
from tests.drivers.sam_emulator import CARD, PHOTO, SamEmulator
from tests.drivers.test_serial_scanner import RecordingSink


@pytest.fixture
def reader(tmp_path: Path):
    emulator = SamEmulator(tmp_path)
    yield emulator
    emulator.close()


def make(port: Path | str, **options: Any) -> idcard.IdCardReader:
    opts = schema.convert({"driver": "idcard", "port": str(port), "poll_s": 0.05, **options}, idcard.Options)
    return idcard.create("counter", opts)


@pytest.fixture
def started(reader: SamEmulator):
    sources: list[idcard.IdCardReader] = []

    def start(**options: Any) -> tuple[idcard.IdCardReader, RecordingSink]:
        source = make(reader.path, **options)
        sink = RecordingSink()
        source.start(sink)
        sources.append(source)
        return source, sink

    yield start
    for source in sources:
        source.stop()


def test_frames_match_the_protocol_bytes() -> None:
    # an answer quoted in reader documentation: "read failed", checksum 0x45
    assert idcard.response_frame(0x41) == bytes.fromhex("aaaaaa9669 0004 000041 45")
    assert idcard.command_frame(0x20, 0x01) == bytes.fromhex("aaaaaa9669 0003 2001 22")
    assert idcard.command_frame(0x30, 0x01) == bytes.fromhex("aaaaaa9669 0003 3001 32")


def test_card_text_decodes_from_ucs2le() -> None:
    # the start of a real card's text block: 王美娜, then spaces; sex "2"; nation "01"
    name = bytes.fromhex("8B738E7F1C5A") + b" \x00" * 12
    text = name + b"2\x00" + b"0\x001\x00" + build_rest()
    fields = idcard.parse_text(text)
    assert fields["name"] == "王美娜"
    assert fields["sex"] == "2"
    assert fields["nation"] == "01"
    with pytest.raises(ValueError, match="256"):
        idcard.parse_text(text[:200])


def build_rest() -> bytes:
    return idcard.build_text({})[36:]


def test_parser_skips_noise_and_bad_frames_and_joins_split_ones() -> None:
    good = idcard.response_frame(0x90, b"abc")
    bad = bytearray(idcard.response_frame(0x9F, b"xyz"))
    bad[-2] ^= 0x40
    stream = b"\x00\xaa\xaa" + bytes(bad) + b"noise" + good + idcard.response_frame(0x80)
    parser = idcard.FrameParser()
    frames = []
    for i in range(len(stream)):  # one byte at a time, as a slow UART delivers them
        frames += parser.feed(stream[i:i + 1])
    assert [(f.sw3, f.data) for f in frames] == [(0x90, b"abc"), (0x80, b"")]
    assert any("checksum" in e for e in parser.errors)


def test_parser_rejects_impossible_lengths() -> None:
    parser = idcard.FrameParser()
    frames = parser.feed(idcard.PREAMBLE + b"\xff\xff" + idcard.response_frame(0x90))
    assert [f.sw3 for f in frames] == [0x90]
    assert parser.errors


def test_base_info_lengths_are_checked() -> None:
    with pytest.raises(ValueError, match="lengths say"):
        idcard.parse_base_info(b"\x01\x00\x04\x00" + bytes(100))


def test_a_card_becomes_one_scan_with_its_identity(reader: SamEmulator, started) -> None:
    _, sink = started()
    sink.wait_connected(True)
    reader.insert()
    scan = sink.next("scan")
    assert scan.kind is ScanKind.ID_CARD
    assert scan.source == "idcard:counter"
    assert scan.identity.source is IdentitySource.CARD
    assert (scan.identity.name, scan.identity.id_number, scan.identity.sex, scan.identity.nation) == (
        "张三丰", "630102198001011234", "1", "01")
    assert scan.identity.birthday == "19800101"
    assert scan.identity.address == CARD["address"]
    assert scan.identity.id_type == "01"
    assert scan.payload["issuer"] == CARD["issuer"]
    assert (scan.payload["valid_from"], scan.payload["valid_until"]) == ("20150101", "20350101")
    assert base64.b64decode(scan.payload["photo_wlt_base64"]) == PHOTO
    # the reader's sequence: find, select, read
    assert reader.commands[-3:] == [(0x20, 0x01), (0x20, 0x02), (0x30, 0x01)]
    # the payload is what the HIS gets: JSON-able
    assert scan.to_json()["payload"]["name"] == "张三丰"


FOREIGN = {"name_en": "SMITH JOHN", "sex": "1", "id_number": "USA110070101001", "nationality": "USA",
           "name": "史密斯", "valid_from": "20200101", "valid_until": "20300101", "birthday": "19700101",
           "card_version": "01", "issuer_code": "1100"}
GAT = {"name": "陈大文", "sex": "1", "birthday": "19850505", "address": "广东省深圳市福田区福华路1号",
       "id_number": "810000198505050011", "issuer": "深圳市公安局", "valid_from": "20190101",
       "valid_until": "20240101", "pass_number": "H12345678", "issue_count": "01"}


@pytest.mark.parametrize("card,card_type", [(FOREIGN, "foreign_permanent"), (GAT, "gat_residence")])
def test_other_cards_on_the_resident_card_technology(reader: SamEmulator, started, card: dict[str, str],
                                                     card_type: str) -> None:
    _, sink = started()
    reader.insert(card, card_type)
    scan = sink.next("scan")
    assert scan.payload["card_type"] == card_type
    assert {k: scan.payload[k] for k in card} == card
    assert scan.identity.id_type == "99"  # CV02.01.101 has no code of their own
    assert (scan.identity.name, scan.identity.id_number) == (card["name"], card["id_number"])
    assert scan.identity.nation is None


def test_a_foreign_card_without_a_chinese_name_is_named_in_english() -> None:
    text = idcard.build_text(dict(FOREIGN, name=""), "foreign_permanent")
    scan = idcard.card_scan("idcard:x", idcard.parse_text(text), b"")
    assert scan.identity.name == "SMITH JOHN"


def test_a_card_type_not_known_here_is_delivered_undecoded(reader: SamEmulator, started) -> None:
    _, sink = started()
    text = bytearray(idcard.build_text(CARD))
    text[248:250] = "Y".encode("utf-16-le")
    reader.text = bytes(text)
    reader.insert()
    scan = sink.next("scan")
    assert scan.payload["card_type"] == "unknown:Y"
    assert base64.b64decode(scan.payload["text_ucs2le_base64"]) == bytes(text)
    assert scan.identity.name is None
    assert "card type 'Y'" in sink.problems[-1]


def test_a_card_left_on_the_reader_is_one_scan_until_taken_off(reader: SamEmulator, started) -> None:
    source, sink = started()
    reader.insert()
    first = sink.next("scan")
    reads = source.reads
    seen = len(reader.commands)
    reader.wait_commands(seen + 9)  # three more full reads of the same card
    assert source.reads > reads
    assert [k for k, _ in list(sink.items.queue) if k == "scan"] == []
    reader.remove()
    seen = len(reader.commands)
    reader.wait_commands(seen + 2)  # a no-card answer ends the placement
    reader.insert(dict(CARD, name="李四"))
    second = sink.next("scan")
    assert second.identity.name == "李四"
    assert second.id != first.id


def test_a_card_left_on_the_reader_is_one_scan_across_a_failed_read(reader: SamEmulator, started) -> None:
    """One read answering SW3 0x41 (read failed) while the card stays on the reader does not
    end the placement: the next clean read of the same card is not a second scan."""
    source, sink = started()
    reader.insert()
    sink.next("scan")
    reader.fail_next_read()
    seen = len(reader.commands)
    reader.wait_commands(seen + 12)  # the failed read, then clean reads of the same card
    assert reader.read_failures == 0 and any("0x41" in p for p in sink.problems)
    assert [k for k, _ in list(sink.items.queue) if k == "scan"] == []
    # a different card is still a new scan, even after a failed read
    reader.fail_next_read()
    reader.insert(dict(CARD, name="李四"))
    assert sink.next("scan").identity.name == "李四"


@pytest.mark.parametrize("fault", ["garbage", "checksum", "truncate", "silence"])
def test_broken_answers_are_survived(reader: SamEmulator, started, fault: str) -> None:
    _, sink = started(timeout_s=0.2)
    sink.wait_connected(True)
    for _ in range(3):
        reader.fault(fault)
    reader.insert()
    scan = sink.next("scan")
    assert scan.identity.id_number == CARD["id_number"]


def test_a_corrupted_read_is_not_delivered(reader: SamEmulator, started) -> None:
    _, sink = started(timeout_s=0.2)
    sink.wait_connected(True)
    # every answer of the first read attempt corrupted: find, and then the base info
    reader.faults += ["checksum"] * 2
    reader.insert()
    scan = sink.next("scan")
    assert scan.payload["name"] == CARD["name"]  # a later, clean read; never a garbled one


def test_a_silent_reader_is_an_alarm_and_recovers(reader: SamEmulator, started) -> None:
    _, sink = started(timeout_s=0.1)
    sink.wait_connected(True)
    reader.silent = True
    sink.wait_connected(False)
    assert "does not answer" in sink.connected_state[-1][1]
    reader.silent = False
    sink.wait_connected(True)
    reader.insert()
    assert sink.next("scan").identity.name == CARD["name"]


def test_a_reader_plugged_in_late_is_found(tmp_path: Path) -> None:
    late = tmp_path / "late"
    late.mkdir()
    source = make(late / "ttyIdReader", reconnect_max_s=0.2)
    sink = RecordingSink()
    source.start(sink)
    try:
        sink.wait_connected(False)
        assert "cannot open" in sink.connected_state[-1][1]
        emulator = SamEmulator(late)
        try:
            sink.wait_connected(True)
            emulator.insert()
            assert sink.next("scan").identity.name == CARD["name"]
        finally:
            source.stop()
            emulator.close()
    finally:
        source.stop()


def test_an_unplugged_reader_is_reopened(tmp_path: Path) -> None:
    emulator = SamEmulator(tmp_path)
    source = make(emulator.path, reconnect_max_s=0.2)
    sink = RecordingSink()
    source.start(sink)
    try:
        sink.wait_connected(True)
        emulator.close()  # unplugged: the pty and its by-id link are gone
        sink.wait_connected(False)
        emulator = SamEmulator(tmp_path)  # plugged back: a new tty behind the same name
        sink.wait_connected(True)
        emulator.insert()
        assert sink.next("scan").identity.name == CARD["name"]
    finally:
        source.stop()
        emulator.close()


def test_probe_asks_the_sam_status(reader: SamEmulator) -> None:
    assert idcard.probe(str(reader.path)) == "SAM status 0x90 (ok)"
    reader.silent = True
    with pytest.raises(idcard.ReaderTimeout):
        idcard.probe(str(reader.path), timeout_s=0.2)


def test_a_loop_url_is_a_port() -> None:
    # pyserial URLs reach the same code: loop:// echoes the command, which is no answer
    with pytest.raises(idcard.ReaderTimeout, match="no valid answer"):
        idcard.probe("loop://", timeout_s=0.2)


def test_options_are_checked() -> None:
    with pytest.raises(schema.Invalid):
        schema.convert({"driver": "idcard", "port": "/dev/ttyUSB0", "baud": 1234}, idcard.Options)
    with pytest.raises(ConfigError) as err:
        validate_source("reader", {"driver": "idcard", "port": "/dev/ttyUSB0", "pol_s": 1})
    assert "sources.reader.pol_s" in str(err.value)
    opts = validate_source("reader", {"driver": "idcard", "port": "spy:///dev/ttyUSB0"})
    assert schema.to_builtins(opts)["baud"] == 115200


async def test_a_card_read_reaches_the_his(box, reader: SamEmulator) -> None:
    await box.start(sources={"reader": {"driver": "idcard", "port": str(reader.path), "poll_s": 0.05}})
    client = await box.unix()
    task = asyncio.ensure_future(client.call("read_card", {"kinds": ["id_card"], "timeout_s": 10}))
    await box.waiting(1)
    reader.insert()
    result = await task
    assert result["scan"]["source"] == "idcard:reader" and result["scan"]["kind"] == "id_card"
    assert result["identity"]["source"] == "card"
    assert (result["identity"]["name"], result["identity"]["sex_text"], result["identity"]["nation_text"]) == (
        "张三丰", "男性", "汉族")
    assert result["verification"]["ok"] is True
    assert result["scan"]["payload"]["issuer"] == CARD["issuer"]
