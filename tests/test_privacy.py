"""Personal data never reaches a log or a screen unmasked: agent/privacy.py, the logging filter
in agent/logs.py, and Identity's repr."""

from __future__ import annotations

import io
import logging
from typing import Iterator

import pytest

from agent import logs
from agent.model import Identity, IdentitySource, Scan, ScanKind
from agent.privacy import mask_id_number, mask_name, mask_phone, mask_qr, mask_text

ID18 = "630102199001011234"
ID18X = "63010219900101123X"
ID15 = "630102900101123"
PHONE = "13812345678"
STATIC = "7F3A9C2B" * 8 + ":1"


# --- the masks ------------------------------------------------------------------------------------

@pytest.mark.parametrize("name, masked", [
    ("张三明", "张*明"),
    ("欧阳娜娜", "欧**娜"),
    ("张三", "张*"),
    ("张", "*"),
    ("", ""),
    (None, ""),
])
def test_mask_name(name: str | None, masked: str) -> None:
    assert mask_name(name) == masked


@pytest.mark.parametrize("value, masked", [
    (ID18, "630102********1234"),
    (ID18X, "630102********123X"),
    (ID15, "630102*****1123"),
    ("", ""),
    (None, ""),
])
def test_mask_id_number_keeps_region_and_last_four(value: str | None, masked: str) -> None:
    assert mask_id_number(value) == masked


def test_mask_short_id_numbers_never_show_more_than_the_last_four() -> None:
    assert mask_id_number("G12345678") == "*****5678"    # a passport number
    assert mask_id_number("1234") == "****"


@pytest.mark.parametrize("value, masked", [
    (PHONE, "138****5678"),
    ("15900001111", "159****1111"),
    ("", ""),
    (None, ""),
])
def test_mask_phone(value: str | None, masked: str) -> None:
    assert mask_phone(value) == masked


def test_mask_qr_tells_codes_apart_without_replayable_content() -> None:
    other = "1B2C3D4E" * 8 + ":1"
    masked = mask_qr(STATIC)
    assert STATIC not in masked and STATIC[8:40] not in masked
    assert masked.startswith(STATIC[:6])
    assert "66" in masked                      # its length
    assert mask_qr(other) != masked
    assert mask_qr("12345678") == "********"   # short payloads show nothing
    assert mask_qr("") == "" and mask_qr(None) == ""


# --- mask_text, the backstop for free text ---------------------------------------------------------

@pytest.mark.parametrize("text, secret, expected", [
    ("id %s end" % ID18, ID18, "id 630102********1234 end"),
    ("id=%s," % ID18X, ID18X, "id=630102********123X,"),
    ("id %s" % ID18X.lower(), ID18X.lower(), "id 630102********123x"),
    ("身份证%s号" % ID18, ID18, "身份证630102********1234号"),
    ("old card %s ok" % ID15, ID15, "old card 630102*****1123 ok"),
    ("call %s now" % PHONE, PHONE, "call 138****5678 now"),
    ("tel:%s" % PHONE, PHONE, "tel:138****5678"),
    ("电话%s。" % PHONE, PHONE, "电话138****5678。"),
    ("qr %s scanned" % STATIC, STATIC[:64], "qr 7F3A9C…:1 scanned"),
    ("ecardId %s." % STATIC[:64].lower(), STATIC[:64].lower(), "ecardId 7f3a9c…."),
    ("<request><userName>box</userName><userPwd>s3cret&amp;pw</userPwd></request>", "s3cret",
     "<request><userName>box</userName><userPwd>********</userPwd></request>"),
    ("<UserPwd>s3cret</UserPwd>", "s3cret", "<UserPwd>********</UserPwd>"),
    ("<appSecret>s3cret</appSecret><authKey>k3y</authKey>", "s3cret",
     "<appSecret>********</appSecret><authKey>********</authKey>"),
], ids=["id18", "id18-X", "id18-x", "id18-in-chinese", "id15", "phone", "phone-after-colon",
        "phone-in-chinese", "static-qr", "hex-ecard-id", "userPwd-xml", "userPwd-case", "other-secrets"])
def test_mask_text_masks_personal_data_and_credentials(text: str, secret: str, expected: str) -> None:
    masked = mask_text(text)
    assert secret not in masked
    assert masked == expected


@pytest.mark.parametrize("text", [
    "2026-11-22 10:00:00",
    "msgCreateTime 20261122100000",           # 14 digits: a timestamp, not an ID
    "elapsed 1234 ms, port 7800",
    "RHC_E0003 answered 3005 (验证成功) in 85.2 ms",
    "connected to 192.168.1.10:7800",
    "scan b0245e9-12 from serial:counter",
    "queue: 12 records, 3 dead",
    "department 5500 挂号处 medstep 010101",
    "already masked 630102********1234 and 138****5678",
])
def test_mask_text_leaves_ordinary_text_alone(text: str) -> None:
    assert mask_text(text) == text


def test_mask_text_is_idempotent() -> None:
    text = "张三明 %s %s %s <userPwd>pw</userPwd>" % (ID18, PHONE, STATIC)
    once = mask_text(text)
    assert mask_text(once) == once


def test_mask_text_masks_user_pwd_in_an_escaped_soap_dump() -> None:
    dump = ("<soap:Body><ns0:RHCMessageServer><action>&lt;request&gt;&lt;userName&gt;box&lt;/userName&gt;"
            "&lt;userPwd&gt;s3cret-pw&lt;/userPwd&gt;&lt;/request&gt;</action></ns0:RHCMessageServer>")
    assert "s3cret-pw" not in mask_text(dump)


def test_mask_text_masks_phone_with_country_code() -> None:
    assert PHONE not in mask_text("cellphone +86%s" % PHONE)


# --- the logging filter -----------------------------------------------------------------------------

@pytest.fixture
def log_stream(monkeypatch: pytest.MonkeyPatch) -> Iterator[io.StringIO]:
    """logs.setup() at debug into a buffer; the root logger and library levels restored after."""
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_levels = {name: logging.getLogger(name).level for name in logs.NOISY}
    stream = io.StringIO()
    logs.setup("debug", stream=stream)
    yield stream
    for handler in list(root.handlers):
        root.removeHandler(handler)
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


def test_log_arguments_are_masked(log_stream: io.StringIO) -> None:
    logger = logging.getLogger("agent.verifier")
    logger.info("verified %s phone %s", ID18, PHONE)
    logger.debug("debug detail for %s", ID18X)
    out = log_stream.getvalue()
    assert ID18 not in out and PHONE not in out and ID18X not in out
    assert "verified 630102********1234 phone 138****5678" in out
    assert "debug detail for 630102********123X" in out     # debug is on at level debug


def test_tracebacks_are_masked(log_stream: io.StringIO) -> None:
    logger = logging.getLogger("agent.platforms.rhc")
    try:
        try:
            raise KeyError(ID15)
        except KeyError as inner:
            raise ValueError("no card for id_number=%s phone=%s" % (ID18, PHONE)) from inner
    except ValueError:
        logger.exception("verify failed for %s", ID18)
    out = log_stream.getvalue()
    assert "Traceback (most recent call last)" in out
    assert "ValueError: no card for id_number=630102********1234 phone=138****5678" in out
    assert "KeyError" in out
    assert ID18 not in out and ID15 not in out and PHONE not in out


def test_record_with_bad_format_arguments_is_kept_and_masked(log_stream: io.StringIO) -> None:
    logging.getLogger("agent.hub").warning("two %s %s", ID18)
    out = log_stream.getvalue()
    assert "two %s %s" in out and "630102********1234" in out
    assert ID18 not in out


def test_identity_logged_as_argument_is_masked(log_stream: io.StringIO) -> None:
    identity = Identity(source=IdentitySource.PLATFORM, name="张三明", id_number=ID18, phone=PHONE)
    logging.getLogger("agent.verifier").info("identity %s / %r", identity, identity)
    out = log_stream.getvalue()
    assert "张三明" not in out and ID18 not in out
    assert "张*明" in out


@pytest.mark.parametrize("library", ["zeep", "zeep.transports", "httpx", "httpcore.http11"])
def test_request_dumping_libraries_are_held_at_warning_even_at_debug(log_stream: io.StringIO,
                                                                     library: str) -> None:
    logger = logging.getLogger(library)
    assert logger.getEffectiveLevel() == logging.WARNING
    logger.debug("HTTP Post to http://rhc/: <userName>box</userName> %s", ID18)
    logger.info("HTTP Request: POST http://rhc/ %s", ID18)
    assert log_stream.getvalue() == ""
    logger.warning("platform slow for %s", ID18)
    assert "platform slow for 630102********1234" in log_stream.getvalue()


def test_journald_lines_carry_the_priority_including_traceback_lines(
        monkeypatch: pytest.MonkeyPatch, log_stream: io.StringIO) -> None:
    monkeypatch.setenv("JOURNAL_STREAM", "8:12345")
    stream = io.StringIO()
    logs.setup("info", stream=stream)
    try:
        raise RuntimeError("reader gone for %s" % ID18)
    except RuntimeError:
        logging.getLogger("drivers.serial_scanner").exception("serial:counter failed")
    logging.getLogger("agent.daemon").info("ready")
    lines = stream.getvalue().splitlines()
    assert lines[0] == "<3>drivers.serial_scanner: serial:counter failed"
    assert len(lines) > 3 and all(line.startswith("<3>") for line in lines[:-1])
    assert lines[-1] == "<6>agent.daemon: ready"
    assert ID18 not in stream.getvalue()


def test_mask_qr_escapes_the_control_characters_it_keeps() -> None:
    masked = mask_qr("\x1b[2J\r\n<3>forged entry")
    assert masked == "\\x1b[2J\\x0d\\x0a…(21 chars)"
    assert not any(ord(c) < 0x20 for c in masked)


def test_control_characters_in_log_records_are_escaped(log_stream: io.StringIO) -> None:
    logging.getLogger("agent.hub").info("scan from %s: %s", "serial:counter", "A\x1b[31mB\nC\u2028D\x9bE")
    try:
        raise ValueError("bad \x1b]0;title\x07 code")
    except ValueError:
        logging.getLogger("agent.hub").exception("failed\rhere")
    out = log_stream.getvalue()
    assert "A\\x1b[31mB\\x0aC\\u2028D\\x9bE" in out and "failed\\x0dhere" in out
    assert "bad \\x1b]0;title\\x07 code" in out                 # the traceback keeps its lines ...
    assert not any(c in out for c in "\x1b\x07\r\x9b\u2028")  # ... and loses every other control


async def test_a_scanned_code_with_control_characters_never_reaches_the_log_raw(box, log_stream) -> None:
    """The hub logs the first characters of every scan before it is checked."""
    await box.start()
    box.scanner.write(b"\x1b[2J\x1b[31m<3>forged " + ID18.encode() + b"\r\n")
    scan = await box.events.wait("verification")
    assert scan["verification"]["reason"] == "QR_INVALID"
    out = log_stream.getvalue()
    assert "\\x1b[2J" in out and "\x1b" not in out and ID18 not in out


# --- Identity ---------------------------------------------------------------------------------------

def test_identity_repr_and_str_are_masked() -> None:
    identity = Identity(source=IdentitySource.CARD, name="欧阳娜娜", sex="2", nation="01", birthday="19900101",
                        id_type="01", id_number=ID18, phone=PHONE, address="西宁市城中区南大街1号")
    for text in (repr(identity), str(identity), "%s" % [identity], f"{identity!r}"):
        assert "欧阳娜娜" not in text and ID18 not in text and PHONE not in text and "南大街" not in text
        assert "欧**娜" in text and "630102********1234" in text and "card" in text


def test_a_scans_repr_names_no_payload_raw_bytes_or_identity() -> None:
    """A Scan in a log line or a traceback: its code, its bytes and the card's person stay out."""
    identity = Identity(source=IdentitySource.CARD, name="欧阳娜娜", id_number=ID18, phone=PHONE)
    scan = Scan.from_card("desk", ScanKind.ID_CARD, identity, {"id_number": ID18, "name": "欧阳娜娜"},
                          raw=ID18.encode())
    qr = Scan.from_qr_bytes("counter", (ID18 + ":1").encode())
    for text in (repr(scan), str(scan), "%r" % [scan], repr(qr), str(qr)):
        assert ID18 not in text and "欧阳" not in text and PHONE not in text
    assert "desk" in repr(scan) and scan.id in repr(scan) and "counter" in repr(qr)


def test_identity_to_json_keeps_full_values_for_authenticated_clients() -> None:
    identity = Identity(source=IdentitySource.PLATFORM, name="张三明", id_number=ID18, phone=PHONE)
    data = identity.to_json()
    assert (data["name"], data["id_number"], data["phone"]) == ("张三明", ID18, PHONE)
