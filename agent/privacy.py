"""Masking of personal data for logs and the display (DESIGN.md "Personal data").

Full values go only to authenticated API clients. Everything a person might read off a log or a
screen goes through these functions: names keep their first and last character (`张*明`), ID
numbers their region prefix and last four (`630102********1234`), phones their first three and
last four. QR payloads are bearer credentials (a static code verifies its owner), so logs keep
only enough of them to tell two apart.
"""

from __future__ import annotations

import re

_ID18 = re.compile(r"(?<![0-9A-Za-z])\d{17}[\dXx](?![0-9A-Za-z])")
_ID15 = re.compile(r"(?<![0-9A-Za-z])\d{15}(?![0-9A-Za-z])")
_PHONE = re.compile(r"(?<![0-9A-Za-z])((?:\+?86[- ]?)?1[3-9]\d)(\d{4})(\d{4})(?![0-9A-Za-z])")
# long hex runs: e-health card ids and QR ciphertexts (static codes are credentials)
_HEXRUN = re.compile(r"(?<![0-9A-Fa-f])([0-9A-Fa-f]{6})[0-9A-Fa-f]{18,}")
# secrets that may travel inside XML, e.g. a library's debug dump of a SOAP request, where the
# action document is itself escaped text: <userPwd>, <ns:userPwd a="b">, &lt;userPwd&gt;
_SECRET_XML = re.compile(
    r"((?:<|&lt;)(?:[\w.-]+:)?(?:userPwd|passWord|password|appSecret|authKey|token)\b[^<>&]*(?:>|&gt;))"
    r"(?:(?!<|&lt;).)*"
    r"((?:<|&lt;)/)", re.I | re.S)


def mask_name(name: str | None) -> str:
    if not name:
        return ""
    if len(name) == 1:
        return "*"
    if len(name) == 2:
        return name[0] + "*"
    return name[0] + "*" * (len(name) - 2) + name[-1]


def mask_id_number(value: str | None) -> str:
    if not value:
        return ""
    if len(value) >= 15:
        return value[:6] + "*" * (len(value) - 10) + value[-4:]
    if len(value) > 4:
        return "*" * (len(value) - 4) + value[-4:]
    return "*" * len(value)


def mask_phone(value: str | None) -> str:
    if not value:
        return ""
    if len(value) >= 11:
        return value[:3] + "*" * (len(value) - 7) + value[-4:]
    return "*" * max(len(value) - 2, 0) + value[-2:]


def mask_qr(payload: str | None) -> str:
    """Enough of a QR payload to tell two scans apart in a log, not enough to replay it. The
    part kept is logged before the code is checked, so its control characters are escaped."""
    if payload is None:
        return ""
    if len(payload) <= 8:
        return "*" * len(payload)
    return "%s…(%d chars)" % (escape_controls(payload[:6]), len(payload))


# C0 controls (newline and tab too), DEL, C1 controls, and the line/paragraph separators
_CONTROLS = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029]")


def escape_controls(text: str) -> str:
    """Control characters as \\xNN: scanned text cannot move a terminal's cursor, colour a
    line, or start a forged log line (journald takes a newline for a new entry)."""
    return _CONTROLS.sub(lambda m: "\\x%02x" % ord(m.group(0)) if ord(m.group(0)) < 0x100
                         else "\\u%04x" % ord(m.group(0)), text)


def mask_text(text: str) -> str:
    """Backstop for free text: mask anything shaped like an ID number, phone or credential."""
    text = _SECRET_XML.sub(r"\1********\2", text)
    text = _ID18.sub(lambda m: mask_id_number(m.group(0)), text)
    text = _ID15.sub(lambda m: mask_id_number(m.group(0)), text)
    text = _PHONE.sub(lambda m: m.group(1) + "****" + m.group(3), text)
    text = _HEXRUN.sub(lambda m: m.group(1) + "…", text)
    return text
