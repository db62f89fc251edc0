"""agent/qr.py: which scans are e-health card codes, which are delivered raw, which are refused."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from agent.config import QrRules
from agent.model import Reason, Scan, ScanboxError
from agent.qr import VERIFIABLE, Classifier, QrKind
from tests.conftest import make_config

HEX64 = hashlib.sha256(b"resident 630102199001011234").hexdigest().upper()
HEX32 = hashlib.md5(b"2026-11-22 10:00:00").hexdigest().upper()
STATIC = HEX64 + ":1"
DYNAMIC = HEX64 + ":0:" + HEX32
TEMPORARY = "T2026112210000012345"  # 20 characters
# RHC ciphertext: base64, 32 to 256 characters
CIPHERTEXT = "U2FsdGVkX1+vupppZksvRf5pq5g5XjFRlipRkwB0K1Y="
# payment codes of the national issuers' published shapes (made up, of course)
WECHAT = "134567890123456789"                 # 18 digits, 10..15
ALIPAY = "28763443825664394"                  # 16..24 digits, 25..30
ALIPAY_20 = "28" + "0" * 17 + "1"             # the 20-digit one that once went out as a temporary card
UNIONPAY = "6212345678901234567"              # 19 digits, 62


@pytest.fixture
def classifier() -> Classifier:
    return Classifier.from_rules(QrRules())


def invalid(classifier: Classifier, text: str) -> ScanboxError:
    with pytest.raises(ScanboxError) as info:
        classifier.classify_text(text)
    assert info.value.reason is Reason.QR_INVALID
    return info.value


@pytest.mark.parametrize("text, kind", [
    (STATIC, QrKind.STATIC),
    ("0" * 64 + ":1", QrKind.STATIC),
    (DYNAMIC, QrKind.DYNAMIC),
    (TEMPORARY, QrKind.TEMPORARY),
    ("abcdefghijKLMNOPQRST", QrKind.TEMPORARY),
    ("0123456789ABCDEF0123", QrKind.TEMPORARY),   # 20 hex digits are a temporary card, not ciphertext
    (CIPHERTEXT, QrKind.CIPHERTEXT),
    ("Qz" * 16, QrKind.CIPHERTEXT),
    ("z/+Q" * 64, QrKind.CIPHERTEXT),
    ("z/+Q" * 63 + "zz==", QrKind.CIPHERTEXT),
], ids=["static", "static-zeros", "dynamic", "temporary", "temporary-mixed", "temporary-hex",
        "ciphertext", "ciphertext-32", "ciphertext-256", "ciphertext-padded"])
def test_health_card_codes_are_classified(classifier: Classifier, text: str, kind: QrKind) -> None:
    assert classifier.classify_text(text) is kind
    assert kind in VERIFIABLE


@pytest.mark.parametrize("text, kind", [
    (STATIC.lower(), QrKind.UNKNOWN),
    (HEX64 + ":2", QrKind.UNKNOWN),
    (HEX64 + ":01", QrKind.UNKNOWN),
    (HEX64[:-1] + ":1", QrKind.UNKNOWN),
    (HEX64 + "0:1", QrKind.UNKNOWN),
    (HEX64[:-1] + "G:1", QrKind.UNKNOWN),
    (HEX64 + ":0:" + HEX32.lower(), QrKind.UNKNOWN),
    (HEX64 + ":0:" + HEX32[:-1], QrKind.UNKNOWN),
    (HEX64 + ":1:" + HEX32, QrKind.UNKNOWN),
    ("T" * 19, QrKind.UNKNOWN),
    ("T" * 21, QrKind.UNKNOWN),
    ("T202611221000001234-", QrKind.UNKNOWN),
    ("A" * 31, QrKind.UNKNOWN),
    ("A" * 257, QrKind.UNKNOWN),
    ("https://example.com/ticket/42", QrKind.UNKNOWN),
    ("TICKET-42", QrKind.UNKNOWN),
    ("!" * 256, QrKind.UNKNOWN),
    ("0" * 20, QrKind.UNKNOWN),                   # 20 digits: an order number, not a temporary card
    ("A" * 32, QrKind.UNKNOWN),                   # hex digits only: an id, not a ciphertext
    (HEX64, QrKind.UNKNOWN),                      # a card id without the ":1"
    ("z/+=" * 64, QrKind.UNKNOWN),                # padding inside is not base64
    ("Qz" * 16 + "Q", QrKind.UNKNOWN),            # not whole 4-character groups
    ("1234567890" * 4, QrKind.UNKNOWN),           # digits, 40 long
], ids=["static-lowercase", "static-suffix-2", "static-suffix-01", "static-63-hex", "static-65-hex",
        "static-non-hex", "dynamic-lowercase-tail", "dynamic-31-tail", "dynamic-wrong-flag",
        "temporary-19", "temporary-21", "temporary-dash", "ciphertext-31", "ciphertext-257",
        "url", "ticket", "punctuation", "temporary-all-digits", "ciphertext-hex-32", "hex64-no-suffix",
        "ciphertext-inner-padding", "ciphertext-ragged", "digits-40"])
def test_near_misses_are_not_the_specific_kind(classifier: Classifier, text: str, kind: QrKind) -> None:
    # a code that is almost a card code is not sent to the platform: the HIS gets it raw
    assert classifier.classify_text(text) is kind


@pytest.mark.parametrize("text", [
    "张三 630102199001011234",
    "健康卡",
    "https://his.example.cn/pay?order=1&amount=2",
    "<xml>card</xml>",
    'say "hi"',
    "hello world",            # a space is not in a ciphertext
    "x" * 257,
    "A" * 300,
    "é",
    "\u3000",
], ids=["chinese", "chinese-only", "url-with-amp", "xml", "quotes", "space", "257-chars", "300-chars",
        "latin1", "ideographic-space"])
def test_other_payloads_are_unknown_and_not_verifiable(classifier: Classifier, text: str) -> None:
    kind = classifier.classify_text(text)
    assert kind is QrKind.UNKNOWN
    assert kind not in VERIFIABLE


def test_longest_allowed_payload_is_unknown_not_invalid(classifier: Classifier) -> None:
    assert classifier.classify_text("A" * 512) is QrKind.UNKNOWN
    invalid(classifier, "A" * 513)


def test_empty_payload_is_invalid(classifier: Classifier) -> None:
    invalid(classifier, "")


@pytest.mark.parametrize("size", [10 * 1024, 1024 * 1024])
def test_oversized_payload_is_invalid_with_its_length(classifier: Classifier, size: int) -> None:
    exc = invalid(classifier, STATIC + "A" * (size - len(STATIC)))
    assert str(size) in exc.message and "512" in exc.message


@pytest.mark.parametrize("text, offset", [
    ("\x00", 0),
    (STATIC + "\r\n", 66),        # a scanner's terminator left on the code
    ("abc\tdef", 3),
    ("\x1b[31mred", 0),           # a terminal escape
    ("abc\x7f", 3),
    (HEX64 + ":\x001", 65),
])
def test_control_characters_are_invalid_and_located(classifier: Classifier, text: str, offset: int) -> None:
    exc = invalid(classifier, text)
    assert "0x%02x" % ord(text[offset]) in exc.message
    assert "offset %d" % offset in exc.message


@pytest.mark.parametrize("text", ["abc\x85def", "\x9b31mred"], ids=["nel", "csi"])
def test_c1_control_characters_are_invalid(classifier: Classifier, text: str) -> None:
    invalid(classifier, text)


def test_scan_with_decode_error_is_invalid_even_if_the_rest_looks_like_a_code(classifier: Classifier) -> None:
    scan = Scan.from_qr_bytes("serial:counter", b"\xff\xfe" + STATIC.encode(), "utf-8")
    assert scan.decode_error
    with pytest.raises(ScanboxError) as info:
        classifier.classify(scan)
    assert info.value.reason is Reason.QR_INVALID
    assert "0xff" in info.value.message


def test_scans_decoded_with_their_charset_are_classified(classifier: Classifier) -> None:
    assert classifier.classify(Scan.from_qr_bytes("serial:counter", STATIC.encode(), "utf-8")) is QrKind.STATIC
    assert classifier.classify(Scan.from_qr_bytes("serial:counter", DYNAMIC.encode("ascii"), "ascii")) \
        is QrKind.DYNAMIC
    gbk = Scan.from_qr_bytes("serial:counter", "挂号处".encode("gbk"), "gbk")
    assert gbk.decode_error is None
    assert classifier.classify(gbk) is QrKind.UNKNOWN


def test_rules_override_changes_classification() -> None:
    default = Classifier.from_rules(QrRules())
    relaxed = Classifier.from_rules(QrRules(static=r"^[0-9A-Fa-f]{64}:1$"))
    assert default.classify_text(STATIC.lower()) is QrKind.UNKNOWN
    assert relaxed.classify_text(STATIC.lower()) is QrKind.STATIC

    site_temp = Classifier.from_rules(QrRules(temporary=r"^LS\d{16}$"))
    assert site_temp.classify_text("LS2026112210000001") is QrKind.TEMPORARY
    assert site_temp.classify_text(TEMPORARY) is QrKind.UNKNOWN
    site_cipher = Classifier.from_rules(QrRules(ciphertext=r"^QH[0-9A-Z]{10,}$"))
    assert Classifier.from_rules(QrRules(ciphertext=r"^[0-9A-F]{64}$")).classify_text(HEX64) is QrKind.CIPHERTEXT
    assert site_cipher.classify_text("QH0123456789AB") is QrKind.CIPHERTEXT

    no_cipher = Classifier.from_rules(QrRules(ciphertext=r"^(?!)$"))
    assert no_cipher.classify_text(CIPHERTEXT) is QrKind.UNKNOWN
    assert no_cipher.classify_text(STATIC) is QrKind.STATIC


def test_max_length_override_refuses_shorter_payloads() -> None:
    short = Classifier.from_rules(QrRules(max_length=100))
    assert short.classify_text(DYNAMIC) is QrKind.DYNAMIC   # 99 characters
    with pytest.raises(ScanboxError) as info:
        short.classify_text(CIPHERTEXT + "A" * (101 - len(CIPHERTEXT)))
    assert info.value.reason is Reason.QR_INVALID


def test_overrides_from_the_config_file(tmp_path: Path) -> None:
    cfg = make_config(None, tmp_path, platform={"qr": {"static": r"^[0-9A-Fa-f]{64}:1$", "max_length": 64}})
    classifier = Classifier.from_rules(cfg.platform.qr)
    with pytest.raises(ScanboxError) as info:
        classifier.classify_text(STATIC.lower())       # 66 characters, over the configured 64
    assert info.value.reason is Reason.QR_INVALID
    assert classifier.classify_text("Qz" * 32) is QrKind.CIPHERTEXT


@pytest.mark.parametrize("text, issuer", [
    (WECHAT, "wechat"), (ALIPAY, "alipay"), (ALIPAY_20, "alipay"), ("25" + "1" * 22, "alipay"),
    (UNIONPAY, "unionpay"), ("5678" + "0" * 15, "webank"),
])
def test_payment_codes_are_never_verifiable_even_where_a_site_widened_its_forms(text: str, issuer: str) -> None:
    strict = Classifier.from_rules(QrRules())
    assert strict.classify_text(text) is QrKind.PAYMENT and QrKind.PAYMENT not in VERIFIABLE
    # a site whose temporary cards are 16..24 digits: payment codes still never match
    wide = Classifier.from_rules(QrRules(temporary=r"^[0-9]{16,24}$", ciphertext=r"^[0-9A-Za-z]{16,256}$"))
    assert wide.classify_text(text) is QrKind.PAYMENT
    assert wide.classify_text("09" + "1" * 18) is QrKind.TEMPORARY  # no issuer's prefix
    why = strict.explain(text)
    assert issuer in why and "%d characters: digits" % len(text) in why
    assert text not in why and text[:6] not in why


def test_a_site_sets_its_own_payment_shapes_in_the_config_file(tmp_path: Path) -> None:
    cfg = make_config(None, tmp_path, platform={"qr": {"payment": {"campus": r"^99[0-9]{14}$"},
                                                       "temporary": r"^[0-9]{16,20}$"}})
    classifier = Classifier.from_rules(cfg.platform.qr)
    assert classifier.classify_text("99" + "0" * 14) is QrKind.PAYMENT
    assert classifier.classify_text(WECHAT) is QrKind.TEMPORARY  # the table replaced the defaults


def test_a_payment_pattern_that_is_not_a_regex_names_its_key(tmp_path: Path) -> None:
    from agent.config import ConfigError
    with pytest.raises(ConfigError) as info:
        make_config(None, tmp_path, platform={"qr": {"payment": {"campus": "^(99"}}})
    assert "platform.qr.payment" in str(info.value) and "campus" in str(info.value)


def test_explain_names_the_shape_of_an_unknown_code_not_the_code(classifier: Classifier) -> None:
    why = classifier.explain("0" * 20)
    assert "20 characters: digits" in why and "0" * 6 not in why and "[platform.qr]" in why
