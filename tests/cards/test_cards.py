"""Card reading without a reader: drivers.cards against the emulated cards' command handlers
(the status words, the encodings, the profiles), and the driver's config."""

from __future__ import annotations

import pytest

from agent import schema
from agent.simulator import cards as emu
from drivers import cards, pcsc

PROFILES = [cards.builtin_profile(k) for k in cards.PROFILES]


def channel(card: emu.EmulatedCard) -> tuple[cards.Channel, list[bytes]]:
    sent: list[bytes] = []

    def transmit(apdu: bytes) -> bytes:
        sent.append(apdu)
        return card.command(apdu)
    return cards.Channel(transmit), sent


def test_6cxx_sends_the_command_again_with_the_length_the_card_asked_for():
    card = emu.ssc()
    ch, sent = channel(card)
    ch.send(PROFILES[0].select, "SELECT")
    ch.send(bytes.fromhex("00A4020002EF05"), "SELECT EF05")
    data = ch.send(bytes.fromhex("00B2030000"), "READ")
    assert data == bytes.fromhex("0304") + b"2.00"
    assert sent[-2:] == [bytes.fromhex("00B2030000"), bytes.fromhex("00B2030006")]


def test_61xx_collects_the_rest_with_get_response():
    psam = emu.psam()
    ch, sent = channel(psam)
    data = ch.send(bytes.fromhex("0088000010") + bytes(16), "PSAM")
    assert len(data) == 16
    assert sent[-1] == bytes.fromhex("00C0000010")


def test_a_card_that_never_stops_answering_61xx_is_an_error():
    ch = cards.Channel(lambda apdu: bytes.fromhex("6110"))
    with pytest.raises(cards.CardError, match="kept answering 61xx"):
        ch.send(bytes.fromhex("00B2010000"), "READ")


def test_wrong_status_word_is_named():
    ch = cards.Channel(lambda apdu: bytes.fromhex("6A86"))
    with pytest.raises(cards.StatusError, match="READ: the card answered 6A86 incorrect P1 P2"):
        ch.send(bytes.fromhex("00B2010000"), "READ")
    with pytest.raises(cards.CardError, match="1 bytes, not a response APDU"):
        cards.Channel(lambda apdu: b"\x90").send(b"\x00\xb2\x01\x00\x00", "READ")
    assert cards.status_text(0x63C2) == "63C2 authentication failed, 2 tries left"


def test_encodings():
    assert cards.decode("an", "张晓明".encode("gb18030") + bytes(24)) == "张晓明"
    assert cards.decode("an", "𠀀".encode("gb18030")) == "𠀀"  # beyond GBK: GB18030 four-byte
    assert cards.decode("cn", bytes.fromhex("19850312")) == "19850312"
    assert cards.decode("cn", bytes.fromhex("630100FF")) == "630100"
    assert cards.decode("b", b"\x01\xab") == "01AB"
    assert cards.decode("u", b"\x02") == "2"
    with pytest.raises(ValueError, match="not GB18030"):
        cards.decode("an", b"\x81\x20")


def test_tlv():
    assert cards.parse_tlv(bytes.fromhex("0302AABB"), 0x03) == b"\xaa\xbb"
    assert cards.parse_tlv(bytes.fromhex("0381020102"), 0x03) == b"\x01\x02"
    with pytest.raises(ValueError, match="tag 04 where 03"):
        cards.parse_tlv(bytes.fromhex("0401AA"), 0x03)
    with pytest.raises(ValueError, match="length 5, but only 1"):
        cards.parse_tlv(bytes.fromhex("0305AA"), 0x03)


def test_a_field_longer_than_the_profile_allows_is_a_problem_not_a_value():
    card = emu.ssc()
    card.apps[emu.SSSE].files[b"\xef\x05"][0x07] = b"A123456789012"
    read = cards.read_card(card.command, card.atr, PROFILES)
    assert "card_number" not in read.fields
    assert read.problems == [{"field": "card_number",
                              "text": "EF05 tag 07: 13 bytes, more than the 9 the profile allows"}]


def test_optional_field_may_be_missing_and_name_extension_is_joined():
    card = emu.ssc()
    read = cards.read_card(card.command, card.atr, PROFILES)
    assert "name_extension" not in read.fields and read.incomplete is None
    card = emu.ssc()
    card.apps[emu.SSSE].files[b"\xef\x06"][0x4E] = emu.an("䶮", 20)
    read = cards.read_card(card.command, card.atr, PROFILES)
    values, problems = cards.identity_fields(PROFILES[0], read)
    assert values["name"] == "张晓明䶮" and problems == []


def test_birthday_must_agree_with_the_id_number():
    card = emu.ssc(person={"birthday": "19850313"})
    read = cards.read_card(card.command, card.atr, PROFILES)
    values, problems = cards.identity_fields(PROFILES[0], read)
    assert "birthday" not in values and values["id_number"] == emu.SAMPLE_PERSON["id_number"]
    assert problems == [{"field": "birthday", "text": "differs from the date of birth in the ID number"}]


def test_profile_errors_name_the_file_and_the_problem(tmp_path):
    text = (cards.PROFILE_DIR / "health_card.toml").read_text(encoding="utf-8")
    bad = tmp_path / "hc.toml"
    bad.write_text(text.replace('encoding = "u"', 'encoding = "x"'), encoding="utf-8")
    with pytest.raises(ValueError, match="hc.toml: .*field sex: unknown encoding 'x'"):
        cards.load_profile(bad)
    bad.write_text(text.replace('name = ["name"]', 'name = ["nmae"]'), encoding="utf-8")
    with pytest.raises(ValueError, match="identity.name names fields no file has: nmae"):
        cards.load_profile(bad)
    bad.write_text(text.replace("[auth]", "[auth\n"), encoding="utf-8")
    with pytest.raises(ValueError, match="hc.toml"):
        cards.load_profile(bad)


def test_a_corrected_profile_is_a_data_change(tmp_path):
    """A field the vendor source got wrong: fixed in the TOML, read by the driver as given."""
    corrected = tmp_path / "health_card.toml"
    corrected.write_text((cards.PROFILE_DIR / "health_card.toml").read_text(encoding="utf-8").replace(
        'name = "city_code"', 'name = "application_city"'), encoding="utf-8")
    options = schema.convert({"driver": "pcsc", "reader": "x", "profiles": {"health_card": corrected}}, pcsc.Options)
    driver = pcsc.create("desk", options)
    card = emu.health_card()
    read = cards.read_card(card.command, card.atr, driver.profiles)
    assert read.fields["application_city"] == "630100" and "city_code" not in read.fields


def test_driver_options_are_checked():
    with pytest.raises(schema.Invalid, match="not a regular expression"):
        schema.convert({"driver": "pcsc", "reader": "ACS ("}, pcsc.Options)
    with pytest.raises(schema.Invalid, match="describes health_card, not ssc"):
        schema.convert({"driver": "pcsc", "reader": "x", "profiles": {"ssc": cards.PROFILE_DIR / "health_card.toml"}},
                       pcsc.Options)
    with pytest.raises(schema.Invalid):
        schema.convert({"driver": "pcsc", "reader": "x", "cards": ["bank_card"]}, pcsc.Options)
    with pytest.raises(schema.Invalid, match="unknown key"):
        schema.convert({"driver": "pcsc", "reader": "x", "psam": "y"}, pcsc.Options)


def test_config_reports_a_bad_card_reader_section_by_key():
    from agent.config import ConfigError, validate_source

    with pytest.raises(ConfigError) as exc:
        validate_source("desk", {"driver": "pcsc", "reader": "ACS (", "cards": ["ssc"]})
    assert "sources.desk.reader" in str(exc.value.problems[0])


def test_pcscd_that_cannot_start_is_an_error_with_the_reason(monkeypatch):
    """The card tests' fixture turns this into a failure (never a skip)."""
    from agent.simulator import pcscd

    monkeypatch.setattr(pcscd.shutil, "which", lambda name: "/nonexistent/pcscd")
    with pytest.raises(pcscd.PcscdError, match="pcscd cannot start .*install pcscd and vsmartcard-vpcd"):
        pcscd.Pcscd().start()
