"""Classify QR payloads before anything else is done with them (DESIGN.md "QR classification").

Length and character set are checked first, so a 10 KB paste or binary noise never reaches a
regular expression or the platform. The patterns come from config (`[platform.qr]`), so a site
whose codes look different is a config change.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass

from agent.config import QrRules
from agent.model import Reason, Scan, ScanboxError


class QrKind(enum.StrEnum):
    STATIC = "static"          # e-health card, static: 64 hex + ":1"
    DYNAMIC = "dynamic"        # e-health card, dynamic: 64 hex + ":0:" + 32 hex
    TEMPORARY = "temporary"    # temporary card (spec 000 3.12), 20 characters
    CIPHERTEXT = "ciphertext"  # RHC ciphertext (spec 000 3.3, up to 256 characters)
    UNKNOWN = "unknown"        # not a health card code: delivered raw


# e-health card codes: what a platform verifies
VERIFIABLE = frozenset({QrKind.STATIC, QrKind.DYNAMIC, QrKind.CIPHERTEXT, QrKind.TEMPORARY})


@dataclass(frozen=True)
class Classifier:
    max_length: int
    patterns: tuple[tuple[QrKind, re.Pattern[str]], ...]

    @classmethod
    def from_rules(cls, rules: QrRules) -> "Classifier":
        # order matters: the specific shapes before the catch-all ciphertext
        return cls(rules.max_length, (
            (QrKind.STATIC, re.compile(rules.static)),
            (QrKind.DYNAMIC, re.compile(rules.dynamic)),
            (QrKind.TEMPORARY, re.compile(rules.temporary)),
            (QrKind.CIPHERTEXT, re.compile(rules.ciphertext)),
        ))

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
        for i, ch in enumerate(text):
            if ch < " " or "\x7f" <= ch <= "\x9f":  # C0, DEL and C1 controls
                raise ScanboxError(Reason.QR_INVALID, "QR payload contains control character "
                                   "0x%02x at offset %d" % (ord(ch), i))
        for kind, pattern in self.patterns:
            if pattern.fullmatch(text):
                return kind
        return QrKind.UNKNOWN
