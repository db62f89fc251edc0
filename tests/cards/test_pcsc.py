"""The pcsc driver against a real pcscd, with emulated cards in vsmartcard's virtual reader."""

from __future__ import annotations

from agent.model import IdentitySource, Reason, ScanKind
from agent.simulator import cards as emu
from agent.simulator.pcscd import CARD_READER, PSAM_READER

PERSON = emu.SAMPLE_PERSON


def connected(sink) -> None:
    sink.wait(lambda: any(up for up, _ in sink.states), what="reader connected")


def test_social_security_card_v2_is_read_without_authentication(reader_driver, card_slot):
    driver, sink = reader_driver()
    connected(sink)
    card = emu.ssc("2.00")
    card_slot.insert(card)
    scan = sink.next_scan()
    assert scan.kind is ScanKind.SSC and scan.source == "pcsc:desk"
    assert scan.partial is None
    identity = scan.identity
    assert identity.source is IdentitySource.CARD
    assert (identity.name, identity.sex, identity.nation, identity.birthday, identity.id_number, identity.id_type) \
        == (PERSON["name"], "1", "01", "19850312", PERSON["id_number"], "01")
    payload = scan.payload
    assert payload["version"] == "2.00"
    assert payload["card_id"] == "630100D15600000599110145"  # cn: F padding stripped
    assert payload["card_number"] == "A12345678"
    assert payload["birthplace"] == "630102"
    assert payload["atr"] == card.atr.hex().upper()
    assert scan.raw == card.atr
    assert "problems" not in payload
    assert driver.last_read_ms is not None


def test_version_3_card_without_psam_answers_psam_required_with_what_it_read(reader_driver, card_slot):
    driver, sink = reader_driver()
    connected(sink)
    card_slot.insert(emu.ssc("3.00"))
    scan = sink.next_scan()
    assert scan.kind is ScanKind.SSC
    assert scan.partial is Reason.PSAM_REQUIRED
    assert "version 3.00" in scan.partial_message and "PSAM" in scan.partial_message
    assert scan.identity is None
    assert scan.payload["card_number"] == "A12345678" and scan.payload["version"] == "3.00"
    assert "name" not in scan.payload and "id_number" not in scan.payload


def test_version_3_card_with_psam_is_authenticated_and_read(reader_driver, card_slot, psam_slot):
    psam = emu.psam()
    psam_slot.insert(psam)
    driver, sink = reader_driver(psam_reader="^" + PSAM_READER + "$")
    connected(sink)
    card_slot.insert(emu.ssc("3.00"))
    scan = sink.next_scan()
    assert scan.partial is None, scan.partial_message
    assert scan.identity.name == PERSON["name"] and scan.identity.id_number == PERSON["id_number"]
    # internal authentication answered 61xx, fetched with GET RESPONSE
    assert psam.apdus == 2


def test_wrong_psam_key_is_a_failed_authentication_not_a_wrong_identity(reader_driver, card_slot, psam_slot):
    psam = emu.psam()
    psam.key = b"another issuer"
    psam_slot.insert(psam)
    driver, sink = reader_driver(psam_reader=PSAM_READER)
    connected(sink)
    card_slot.insert(emu.ssc("3.00"))
    scan = sink.next_scan()
    assert scan.partial is Reason.DEVICE_ERROR
    assert "6300 authentication failed" in scan.partial_message
    assert scan.identity is None


def test_configured_psam_reader_without_a_psam_in_it(reader_driver, card_slot, psam_slot):
    driver, sink = reader_driver(psam_reader=PSAM_READER)
    connected(sink)
    card_slot.insert(emu.health_card())
    scan = sink.next_scan()
    assert scan.partial is Reason.DEVICE_ERROR
    assert "no PSAM in %s" % PSAM_READER in scan.partial_message
    assert scan.payload["card_number"] == emu.HC_NUMBER


def test_health_card_with_psam(reader_driver, card_slot, psam_slot):
    psam_slot.insert(emu.psam())
    driver, sink = reader_driver(psam_reader=PSAM_READER)
    connected(sink)
    card_slot.insert(emu.health_card())
    scan = sink.next_scan()
    assert scan.kind is ScanKind.HEALTH_CARD and scan.partial is None
    assert scan.identity.name == PERSON["name"] and scan.identity.sex == "1"
    assert scan.identity.nation == "01" and scan.identity.birthday == "19850312"
    assert scan.payload["card_number"] == emu.HC_NUMBER
    assert scan.payload["issuer_name"] == "青海省卫生健康委员会"  # GB18030 text
    assert scan.payload["city_code"] == "630100"
    assert len(scan.payload["atr_historical"]) >= 16


def test_health_card_without_psam_has_its_card_data_only(reader_driver, card_slot):
    driver, sink = reader_driver()
    connected(sink)
    card_slot.insert(emu.health_card())
    scan = sink.next_scan()
    assert scan.kind is ScanKind.HEALTH_CARD
    assert scan.partial is Reason.PSAM_REQUIRED and "EF06" in scan.partial_message
    assert scan.identity is None and scan.payload["card_number"] == emu.HC_NUMBER


def test_card_pulled_mid_read_is_a_problem_and_the_next_card_reads(reader_driver, card_slot):
    driver, sink = reader_driver()
    connected(sink)
    card_slot.insert(emu.ssc("2.00", pull_after=8))
    problem = sink.next_problem()
    assert "removed" in problem, problem
    assert card_slot.pulled.is_set()
    assert sink.scans == []
    card_slot.insert(emu.ssc("2.00"))
    assert sink.next_scan().identity.name == PERSON["name"]


def test_wrong_status_word_names_the_command_and_the_word(reader_driver, card_slot):
    driver, sink = reader_driver()
    connected(sink)
    card_slot.insert(emu.ssc("2.00", faults={bytes.fromhex("00B2090000"): 0x6581}))
    problem = sink.next_problem()
    assert "EF06 tag 09 (name)" in problem and "6581 memory failure" in problem, problem
    assert sink.scans == []


def test_a_card_that_is_neither(reader_driver, card_slot):
    driver, sink = reader_driver()
    connected(sink)
    card = emu.other_card()
    card_slot.insert(card)
    problem = sink.next_problem()
    assert "not a card this box reads" in problem and card.atr.hex().upper() in problem
    assert "social security card: 6A82" in problem and "resident health card: 6A82" in problem
    assert sink.scans == []


def test_implausible_card_data_is_left_out_of_the_identity(reader_driver, card_slot):
    driver, sink = reader_driver()
    connected(sink)
    card_slot.insert(emu.ssc("2.00", person={"id_number": "630102198503121230", "nation": "77"}))
    scan = sink.next_scan()
    assert scan.identity.name == PERSON["name"]
    assert scan.identity.id_number is None and scan.identity.nation is None
    fields = {p["field"]: p["text"] for p in scan.payload["problems"]}
    assert "check character 0, should be 7" in fields["id_number"]
    assert "GB 3304" in fields["nation"]


def test_no_matching_reader_is_reported(reader_driver):
    driver, sink = reader_driver(reader="^No Such Reader$")
    sink.wait(lambda: any(not up and "no reader matching" in (d or "") for up, d in sink.states))


def test_pcscd_going_away_and_coming_back(reader_driver, card_slot, pcscd):
    if not pcscd.owned:
        import pytest
        pytest.skip("pcscd was already running (not started by the tests): not restarting it")
    driver, sink = reader_driver()
    connected(sink)
    pcscd.stop()
    sink.wait(lambda: not sink.states[-1][0], what="reader lost")
    pcscd.start()
    start = len(sink.states)
    sink.wait(lambda: any(up for up, _ in sink.states[start:]), timeout=10, what="reader back")
    card_slot.insert(emu.ssc("2.00"))
    assert sink.next_scan().identity.name == PERSON["name"]


def test_reader_name_is_a_pattern_searched_in_the_names(reader_driver, card_slot, caplog):
    caplog.set_level("INFO", logger="drivers.pcsc")
    driver, sink = reader_driver(reader="PCD 00 0[0]")
    connected(sink)
    assert "pcsc:desk: reader %s" % CARD_READER in caplog.text
    card_slot.insert(emu.ssc("2.00"))
    assert sink.next_scan().source == "pcsc:desk"


def test_a_card_swapped_for_another_is_read_again(reader_driver, card_slot):
    from agent.simulator.cards import VirtualSlot

    driver, sink = reader_driver()
    connected(sink)
    card_slot.insert(emu.ssc("2.00"))
    assert sink.next_scan().identity.name == PERSON["name"]
    VirtualSlot.remove(card_slot)  # not waiting for pcscd to see the card go
    card_slot.insert(emu.ssc("2.00", person={"name": "李四"}))
    assert sink.next_scan(1).identity.name == "李四"
    assert sink.problems == []
