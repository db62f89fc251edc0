"""Reading social security and resident health cards, over any APDU transport.

Nothing here knows PC/SC: a card is a function that takes a command APDU and returns the
response APDU (data + SW1 SW2), so the same code reads a card through pcscd or any other
reader library. The cards' file maps are data (`card_profiles/*.toml`); this module is the
ISO 7816-4 mechanics (SELECT, READ RECORD by tag, GET RESPONSE, external authentication through
a PSAM), the encodings (an / cn / b), and the checks on what the card says.
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable

PROFILE_DIR = Path(__file__).with_name("card_profiles")
PROFILES = ("ssc", "health_card")

Transmit = Callable[[bytes], bytes]

# a card that keeps answering 61xx is broken, not long-winded
MAX_GET_RESPONSE = 16

STATUS_TEXT = {
    0x6281: "part of the data may be corrupted",
    0x6300: "authentication failed",
    0x6581: "memory failure",
    0x6700: "wrong length",
    0x6982: "security status not satisfied",
    0x6983: "authentication method blocked",
    0x6985: "conditions of use not satisfied",
    0x6A81: "function not supported",
    0x6A82: "file or application not found",
    0x6A83: "record not found",
    0x6A86: "incorrect P1 P2",
    0x6D00: "instruction not supported",
    0x6E00: "class not supported",
}


def status_text(sw: int) -> str:
    if sw in STATUS_TEXT:
        return "%04X %s" % (sw, STATUS_TEXT[sw])
    if sw >> 4 == 0x63C:
        return "%04X authentication failed, %d tries left" % (sw, sw & 0xF)
    return "%04X" % sw


class CardError(Exception):
    """A card that could not be read; the text says what happened, for a technician."""


class CardRemoved(CardError):
    """The card left the field during the read."""


class NotThisCard(CardError):
    """Not a card of any profile this box reads."""


class StatusError(CardError):
    def __init__(self, what: str, sw: int) -> None:
        super().__init__("%s: the card answered %s" % (what, status_text(sw)))
        self.what = what
        self.sw = sw


class AuthNeeded(CardError):
    """The card wants external authentication (6982) before this file."""


# --- APDUs ---------------------------------------------------------------------------------


class Channel:
    """Command APDUs to one card with ISO 7816-4 status-word handling: 61xx fetches the rest
    with GET RESPONSE, 6Cxx sends the command again with the Le the card asked for."""

    def __init__(self, transmit: Transmit) -> None:
        self.transmit = transmit
        self.count = 0

    def exchange(self, apdu: bytes) -> tuple[bytes, int]:
        """Data and status word, after 61xx/6Cxx; raises only for transport failures."""
        response = self._raw(apdu)
        data, sw = response[:-2], int.from_bytes(response[-2:], "big")
        if sw >> 8 == 0x6C and len(apdu) >= 5:
            response = self._raw(apdu[:-1] + bytes([sw & 0xFF]))
            data, sw = response[:-2], int.from_bytes(response[-2:], "big")
        rounds = 0
        while sw >> 8 == 0x61:
            rounds += 1
            if rounds > MAX_GET_RESPONSE:
                raise CardError("the card kept answering 61xx (more data) after %d GET RESPONSE" % MAX_GET_RESPONSE)
            response = self._raw(bytes([apdu[0] & 0x03, 0xC0, 0x00, 0x00, sw & 0xFF]))
            data, sw = data + response[:-2], int.from_bytes(response[-2:], "big")
        return data, sw

    def send(self, apdu: bytes, what: str) -> bytes:
        """The response data; StatusError unless the card answered 9000."""
        data, sw = self.exchange(apdu)
        if sw == 0x6982:
            raise AuthNeeded("%s: the card answered %s" % (what, status_text(sw)))
        if sw != 0x9000:
            raise StatusError(what, sw)
        return data

    def _raw(self, apdu: bytes) -> bytes:
        self.count += 1
        response = self.transmit(apdu)
        if len(response) < 2:
            raise CardError("the reader returned %d bytes, not a response APDU" % len(response))
        return response


# --- encodings -----------------------------------------------------------------------------


def decode(encoding: str, value: bytes) -> str:
    """an: text padded with 00 or spaces (GB18030, which is ASCII for ASCII); cn: BCD padded
    with F; b: hex; u: a one-byte number as decimal text."""
    if encoding == "an":
        try:
            return value.rstrip(b"\x00\xff").decode("gb18030").strip()
        except UnicodeDecodeError as exc:
            raise ValueError("not GB18030 text: byte 0x%02x at %d" % (value[exc.start], exc.start)) from None
    if encoding == "cn":
        return value.hex().upper().rstrip("F")
    if encoding == "b":
        return value.hex().upper()
    if encoding == "u":
        if len(value) != 1:
            raise ValueError("%d bytes for a one-byte number" % len(value))
        return str(value[0])
    raise ValueError("unknown encoding %r" % encoding)


def parse_tlv(data: bytes, tag: int) -> bytes:
    """The value of a record read by tag: tag, length (one byte, or 81/82 + length), value."""
    if len(data) < 2:
        raise ValueError("%d bytes, not a tag-length-value record" % len(data))
    if data[0] != tag:
        raise ValueError("tag %02X where %02X was asked for" % (data[0], tag))
    length, start = data[1], 2
    if length == 0x81 and len(data) >= 3:
        length, start = data[2], 3
    elif length == 0x82 and len(data) >= 4:
        length, start = int.from_bytes(data[2:4], "big"), 4
    if len(data) < start + length:
        raise ValueError("length %d, but only %d bytes follow" % (length, len(data) - start))
    return data[start:start + length]


# --- profiles ------------------------------------------------------------------------------


@dataclass(frozen=True)
class FieldSpec:
    tag: int
    name: str
    encoding: str
    length: int
    optional: bool = False


@dataclass(frozen=True)
class FileSpec:
    name: str
    select: bytes
    fields: tuple[FieldSpec, ...]
    personal: bool = False
    auth: bool = False


@dataclass(frozen=True)
class AuthSpec:
    get_challenge: bytes
    psam_authenticate: str
    external_authenticate: str
    diversifier: str


@dataclass(frozen=True)
class Profile:
    kind: str
    label: str
    select: bytes
    read: str
    files: tuple[FileSpec, ...]
    identity: dict[str, tuple[str, ...]]
    auth: AuthSpec
    version_field: str | None = None
    auth_from_version: int | None = None
    source: str = ""

    def read_record(self, tag: int) -> bytes:
        return bytes.fromhex(self.read.format(tag=tag))


def load_profile(path: Path | str) -> Profile:
    """A card profile from TOML; ValueError naming the file and the key when it is wrong."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
        return _profile(data, str(path))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ValueError("card profile %s: %s" % (path, exc)) from None
    except (KeyError, TypeError, ValueError) as exc:
        raise ValueError("card profile %s: %s: %s" % (path, type(exc).__name__, exc)) from None


def builtin_profile(kind: str) -> Profile:
    return load_profile(PROFILE_DIR / ("%s.toml" % kind))


def _hex(value: Any) -> bytes:
    return bytes.fromhex(str(value))


def _profile(data: dict[str, Any], source: str) -> Profile:
    files = tuple(FileSpec(
        name=f["name"], select=_hex(f["select"]), personal=bool(f.get("personal", False)),
        auth=bool(f.get("auth", False)),
        fields=tuple(FieldSpec(int(x["tag"]), x["name"], x["encoding"], int(x["length"]), bool(x.get("optional")))
                     for x in f["fields"]))
        for f in data["files"])
    names = {x.name for f in files for x in f.fields}
    for spec in (x for f in files for x in f.fields):
        if spec.encoding not in ("an", "cn", "b", "u"):
            raise ValueError("field %s: unknown encoding %r" % (spec.name, spec.encoding))
    identity = {key: (value,) if isinstance(value, str) else tuple(value) for key, value in data["identity"].items()}
    for key, value in identity.items():
        unknown = [v for v in value if v not in names]
        if unknown:
            raise ValueError("identity.%s names fields no file has: %s" % (key, ", ".join(unknown)))
    auth = data["auth"]
    if auth["diversifier"] not in names:
        raise ValueError("auth.diversifier names no field: %r" % auth["diversifier"])
    profile = Profile(
        kind=data["kind"], label=data["label"], select=_hex(data["select"]), read=data["read"], files=files,
        identity=identity, version_field=data.get("version_field"), auth_from_version=data.get("auth_from_version"),
        auth=AuthSpec(_hex(auth["get_challenge"]), auth["psam_authenticate"], auth["external_authenticate"],
                      auth["diversifier"]),
        source=source)
    profile.read_record(0x01)  # the template must make an APDU
    return profile


# --- reading -------------------------------------------------------------------------------


@dataclass
class CardRead:
    """What one card said. `fields` holds every field read (JSON-able text), `raw` their bytes
    (for the PSAM's diversifier). `missing` names what could not be read and why."""

    kind: str
    atr: bytes
    fields: dict[str, str] = field(default_factory=dict)
    raw: dict[str, bytes] = field(default_factory=dict)
    problems: list[dict[str, str]] = field(default_factory=list)
    # why personal data is missing: "psam_required" or a device problem, with the text
    incomplete: str | None = None
    incomplete_message: str | None = None
    apdus: int = 0


class Psam:
    """The PSAM in its own slot: given a transmit, or a factory that opens one on demand."""

    def __init__(self, open_channel: Callable[[], Channel]) -> None:
        self.open_channel = open_channel

    def authenticate(self, profile: Profile, diversifier: bytes, challenge: bytes) -> bytes:
        channel = self.open_channel()
        apdu = bytes.fromhex(profile.auth.psam_authenticate.format(
            diversifier=diversifier[-8:].rjust(8, b"\x00").hex(), challenge=challenge.hex()))
        return channel.send(apdu, "PSAM authentication")


def identify(channel: Channel, profiles: list[Profile]) -> Profile:
    """The profile whose application the card selects; NotThisCard when none does."""
    answers = []
    for profile in profiles:
        sw = channel.exchange(profile.select)[1]
        if sw == 0x9000:
            return profile
        answers.append("%s: %s" % (profile.label, status_text(sw)))
    raise NotThisCard("not a card this box reads (SELECT %s)" % "; ".join(answers))


def read_card(transmit: Transmit, atr: bytes, profiles: list[Profile], psam: Psam | None = None) -> CardRead:
    """Identify the card and read every file of its profile; authenticate through the PSAM
    where the card asks for it. CardError (CardRemoved, NotThisCard, StatusError) when the card
    cannot be read at all; a read without the personal files is marked `incomplete`."""
    channel = Channel(transmit)
    profile = identify(channel, profiles)
    result = CardRead(profile.kind, atr)
    authenticated = False
    for file in profile.files:
        needs_auth = file.auth or (file.personal and _version_needs_auth(profile, result))
        if needs_auth and not authenticated:
            if psam is None:
                result.incomplete = "psam_required"
                result.incomplete_message = ("%s %s: %s needs authentication through a PSAM, and none is "
                                             "configured" % (profile.label, _version(profile, result), file.name))
                break
            if not _authenticate(channel, profile, result, psam):
                break
            authenticated = True
        try:
            _read_file(channel, profile, file, result)
        except AuthNeeded as exc:
            if authenticated or psam is None:
                result.incomplete = "psam_required" if psam is None else "auth_failed"
                result.incomplete_message = "%s %s: %s" % (profile.label, _version(profile, result), exc)
                break
            if not _authenticate(channel, profile, result, psam):
                break
            authenticated = True
            _read_file(channel, profile, file, result)
    result.apdus = channel.count
    return result


def _version(profile: Profile, result: CardRead) -> str:
    version = result.fields.get(profile.version_field or "")
    return "version %s" % version if version else "(version unknown)"


def _version_needs_auth(profile: Profile, result: CardRead) -> bool:
    if profile.auth_from_version is None:
        return False
    version = result.fields.get(profile.version_field or "", "")
    major = re.match(r"\d+", version)
    return major is not None and int(major.group()) >= profile.auth_from_version


def _authenticate(channel: Channel, profile: Profile, result: CardRead, psam: Psam) -> bool:
    """External authentication; False (and the read marked incomplete) when the PSAM or the
    card refuses. Only the card leaving the reader is raised."""
    try:
        diversifier = result.raw.get(profile.auth.diversifier)
        if diversifier is None:
            raise CardError("cannot authenticate: %s was not read" % profile.auth.diversifier)
        challenge = channel.send(profile.auth.get_challenge, "GET CHALLENGE")
        cryptogram = psam.authenticate(profile, diversifier, challenge)
        channel.send(bytes.fromhex(profile.auth.external_authenticate.format(cryptogram=cryptogram.hex())),
                     "EXTERNAL AUTHENTICATE")
    except CardRemoved:
        raise
    except CardError as exc:
        result.incomplete = "auth_failed"
        result.incomplete_message = "%s %s: authentication through the PSAM failed: %s" % (
            profile.label, _version(profile, result), exc)
        return False
    return True


def _read_file(channel: Channel, profile: Profile, file: FileSpec, result: CardRead) -> None:
    channel.send(file.select, "SELECT %s" % file.name)
    for spec in file.fields:
        data, sw = channel.exchange(profile.read_record(spec.tag))
        if sw == 0x6982:
            raise AuthNeeded("%s: the card answered %s" % (file.name, status_text(sw)))
        if sw == 0x6A83 and spec.optional:
            continue
        if sw != 0x9000:
            raise StatusError("READ %s tag %02X (%s)" % (file.name, spec.tag, spec.name), sw)
        try:
            value = parse_tlv(data, spec.tag)
            if len(value) > spec.length:
                raise ValueError("%d bytes, more than the %d the profile allows" % (len(value), spec.length))
            text = decode(spec.encoding, value)
        except ValueError as exc:
            result.problems.append({"field": spec.name, "text": "%s tag %02X: %s" % (file.name, spec.tag, exc)})
            continue
        result.raw[spec.name] = value
        if text:
            result.fields[spec.name] = text


# --- checks --------------------------------------------------------------------------------

_ID_WEIGHTS = (7, 9, 10, 5, 8, 4, 2, 1, 6, 3, 7, 9, 10, 5, 8, 4, 2)
# GB/T 2261.1: 0 unknown, 1 male, 2 female, 9 not stated
SEXES = frozenset("0129")
# GB 3304: 01..56, 97 other, 98 naturalised foreigners
NATIONS = frozenset(["%02d" % n for n in range(1, 57)] + ["97", "98"])


def id_number_problem(value: str) -> str | None:
    """GB 11643: 17 digits and a check character (0-9 or X)."""
    if not re.fullmatch(r"[0-9]{17}[0-9X]", value):
        return "not 17 digits and a check character"
    check = "10X98765432"[sum(int(d) * w for d, w in zip(value[:17], _ID_WEIGHTS, strict=True)) % 11]
    if value[17] != check:
        return "check character %s, should be %s" % (value[17], check)
    try:
        datetime.strptime(value[6:14], "%Y%m%d")
    except ValueError:
        return "no date of birth at characters 7-14"
    return None


def identity_fields(profile: Profile, read: CardRead) -> tuple[dict[str, str], list[dict[str, str]]]:
    """The identity the card states, checked: a value that fails its check is left out (and
    named in the problems), so a HIS never files a wrong ID number as the patient's."""
    out: dict[str, str] = {}
    problems: list[dict[str, str]] = []
    for key, names in profile.identity.items():
        value = "".join(read.fields.get(n, "") for n in names)
        if value:
            out[key] = value
    if "sex" in out and out["sex"] not in SEXES:
        problems.append({"field": "sex", "text": "%r is not a GB/T 2261.1 sex code" % out.pop("sex")})
    if "nation" in out and out["nation"] not in NATIONS:
        problems.append({"field": "nation", "text": "%r is not a GB 3304 nation code" % out.pop("nation")})
    if "birthday" in out:
        try:
            datetime.strptime(out["birthday"], "%Y%m%d")
        except ValueError:
            problems.append({"field": "birthday", "text": "%r is not a date (yyyyMMdd)" % out.pop("birthday")})
    if "id_number" in out:
        problem = id_number_problem(out["id_number"])
        if problem:
            out.pop("id_number")
            problems.append({"field": "id_number", "text": "not a valid resident ID number: %s" % problem})
        elif "birthday" in out and out["birthday"] != out["id_number"][6:14]:
            problems.append({"field": "birthday", "text": "differs from the date of birth in the ID number"})
            out.pop("birthday")
    if "id_number" in out:
        out["id_type"] = "01"  # 居民身份证
    return out, problems
