"""Classify QR payloads before anything else is done with them (DESIGN.md "QR classification").

Length and character set are checked first, so a 10 KB paste or binary noise never reaches a
regular expression or the platform. Then the shapes of mobile payment codes, which a counter
scanner also reads and which must never leave the box; then the health card forms. The patterns
come from config (`[platform.qr]`), so a site whose codes look different is a config change, and
`explain` says (without the code itself) why a code was not sent, for the technician who
widens a pattern.
"""

from __future__ import annotations

import enum
import re

import msgspec

from agent.config import QrRules
from agent.model import Reason, Scan, ScanboxError


class QrKind(enum.StrEnum):
    STATIC = "static"          # e-health card, static: 64 hex + ":1"
    DYNAMIC = "dynamic"        # e-health card, dynamic: 64 hex + ":0:" + 32 hex
    TEMPORARY = "temporary"    # temporary card (spec 000 3.12), 20 characters
    CIPHERTEXT = "ciphertext"  # RHC ciphertext (spec 000 3.3, up to 256 characters)
    PAYMENT = "payment"        # a mobile payment code: never sent to a health platform
    UNKNOWN = "unknown"        # not a health card code: delivered raw


# C0, DEL and C1 controls
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")

# e-health card codes: what a platform verifies
VERIFIABLE = frozenset({QrKind.STATIC, QrKind.DYNAMIC, QrKind.CIPHERTEXT, QrKind.TEMPORARY})


class Classifier(msgspec.Struct, frozen=True):
    max_length: int
    patterns: tuple[tuple[QrKind, re.Pattern[str]], ...]
    payment: tuple[tuple[str, re.Pattern[str]], ...] = ()

    @classmethod
    def from_rules(cls, rules: QrRules) -> "Classifier":
        # order matters: the specific shapes before the catch-all ciphertext
        return cls(rules.max_length, (
            (QrKind.STATIC, re.compile(rules.static)),
            (QrKind.DYNAMIC, re.compile(rules.dynamic)),
            (QrKind.TEMPORARY, re.compile(rules.temporary)),
            (QrKind.CIPHERTEXT, re.compile(rules.ciphertext)),
        ), tuple((name, re.compile(pattern)) for name, pattern in rules.payment.items()))

    def classify(self, scan: Scan) -> QrKind:
        """The kind of a QR scan; raises ScanboxError(QR_INVALID) for what cannot be a code."""
        if scan.decode_error:
            raise ScanboxError(Reason.QR_INVALID, "undecodable QR payload: %s" % scan.decode_error)
        return self.classify_text(scan.payload)

    def classify_text(self, text: str) -> QrKind:
        if not text:
            raise ScanboxError(Reason.QR_INVALID, "empty QR payload")
        if len(text) > self.max_length:
            raise ScanboxError(Reason.QR_INVALID, "QR payload of %d characters, longer than any "
                               "health card code (max %d)" % (len(text), self.max_length))
        control = _CONTROL.search(text)
        if control is not None:
            raise ScanboxError(Reason.QR_INVALID, "QR payload contains control character "
                               "0x%02x at offset %d" % (ord(control.group()), control.start()))
        if self.payment_issuer(text) is not None:
            return QrKind.PAYMENT
        for kind, pattern in self.patterns:
            if pattern.fullmatch(text):
                return kind
        return QrKind.UNKNOWN

    def payment_issuer(self, text: str) -> str | None:
        for name, pattern in self.payment:
            if pattern.fullmatch(text):
                return name
        return None

    def explain(self, text: str) -> str:
        """Why a classified code is not sent to the platform, naming its shape but none of its
        characters (a payment code or a ticket number is the patient's)."""
        issuer = self.payment_issuer(text)
        if issuer is not None:
            return ("the shape of a mobile payment code ([platform.qr.payment] %s: %s); never sent "
                    "to the health platform" % (issuer, shape(text)))
        return ("matches none of the health card forms in [platform.qr] (static, dynamic, temporary, "
                "ciphertext): %s; a site whose platform issues this form widens the pattern" % shape(text))


def shape(text: str) -> str:
    """`20 characters: digits` — the length and character classes of a code, nothing of it."""
    classes = []
    if any(c.isdigit() and c.isascii() for c in text):
        classes.append("digits")
    if any(c.isascii() and c.isupper() for c in text):
        classes.append("upper-case letters")
    if any(c.isascii() and c.islower() for c in text):
        classes.append("lower-case letters")
    if any(not c.isascii() for c in text):
        classes.append("non-ASCII")
    others = sorted({c for c in text if c.isascii() and not c.isalnum()})
    if others:
        classes.append("punctuation %s" % "".join(others)[:16])
    return "%d characters: %s" % (len(text), ", ".join(classes))
