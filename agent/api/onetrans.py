"""OneTrans2.dll compatibility (spec 004): the DLL's `pInData` envelope in, its `pOutData` out.

A HIS that called `OneTrans(pInData, pOutData)` sends the same JSON object to the box (JSON-RPC
`onetrans {pInData}` on any transport, or the bare object as the body of `POST /onetrans`), or
keeps calling scanbox's own OneTrans2.dll (windows/), which signs on the HIS's PC and forwards.
The spec says requests and responses are signed (`signtype`, "SM3") and may be encrypted
(`enc_type`, "SM4") but not what is signed or with which key; scanbox's definition (docs/api.md
"OneTrans"):

- every HIS program has an `app_id` and a secret `app_key`, configured in
  `[api.onetrans.apps.APP_ID]` (the key in the secrets file). The key never travels: a request
  that carries `app_key`/`appKey` is refused (whoever saw it could sign and decrypt as the app).
- two keys derived from app_key with labels: the MAC key HMAC-SM3(app_key, "scanbox onetrans mac
  v1") and the SM4 key HMAC-SM3(app_key, "scanbox onetrans sm4 v1")[:16].
- canonical form of a message: the JSON object without its `sign` member, keys sorted by code
  point at every level, no whitespace, non-ASCII characters as themselves, UTF-8.
- `sign` = lowercase hex HMAC-SM3(MAC key, canonical form). HMAC (GB/T 15852.2) rather than a
  bare SM3 of message + key, which length extension would let anyone extend.
- `enc_type` "SM4": `data` travels as base64(IV || SM4-CBC(PKCS#7(canonical form of data)))
  with a fresh random 16-byte IV under the SM4 key. It is encrypted first, then signed.
  "NONE": `data` is the plain object.
- `timestamp` must lie within `window_s` of the box's clock, and an app's `msgid` is accepted
  once within that window: a recorded request cannot be replayed.
- responses carry the request's `msgid` and are signed (and encrypted when the request was) the
  same way with the same app's keys; a request whose app or signature is wrong gets an unsigned
  answer (there is no key to trust), the same for both.
- a failed signature counts against the sender's address in the same guard as a wrong token on
  TCP, HTTP and the WebSocket (agent.api.methods.AuthGuard): an address locked out there is
  refused here (100011) before any signature is checked, and its failures here lock it out there.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime as dt
import hmac
import itertools
import json
import logging
import os
import re
import secrets
import time
from collections import OrderedDict
from typing import Any, Awaitable, Callable, Protocol

from agent.codes import qwb002
from agent.config import OnetransConfig
from agent.model import Reason, Result, ScanboxError, ScanKind, now_local

logger = logging.getLogger(__name__)

# --- the crypto (OpenSSL through `cryptography`) ------------------------------------------------
# imported on the first OneTrans request: a box whose HIS speaks JSON-RPC never loads it


def sm3(data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes

    digest = hashes.Hash(hashes.SM3())
    digest.update(data)
    return digest.finalize()


def hmac_sm3(key: bytes, data: bytes) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives import hmac as crypto_hmac

    mac = crypto_hmac.HMAC(key, hashes.SM3())
    mac.update(data)
    return mac.finalize()


def canonical(message: Any) -> bytes:
    """Raises ValueError for what JSON cannot carry (NaN, infinities)."""
    return json.dumps(message, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


MAC_LABEL = b"scanbox onetrans mac v1"
SM4_LABEL = b"scanbox onetrans sm4 v1"
KEY_NAMES = ("app_key", "appKey")


def mac_key(app_key: str) -> bytes:
    return hmac_sm3(app_key.encode("utf-8"), MAC_LABEL)


def sm4_key(app_key: str) -> bytes:
    return hmac_sm3(app_key.encode("utf-8"), SM4_LABEL)[:16]


def signature(message: dict[str, Any], app_key: str) -> str:
    body = {k: v for k, v in message.items() if k != "sign"}
    return hmac_sm3(mac_key(app_key), canonical(body)).hex()


def sign(message: dict[str, Any], app_key: str) -> dict[str, Any]:
    """`message` with its `sign` member set."""
    out = {k: v for k, v in message.items() if k != "sign"}
    out["sign"] = signature(out, app_key)
    return out


def encrypt_data(data: Any, app_key: str, iv: bytes | None = None) -> str:
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    iv = iv if iv is not None else secrets.token_bytes(16)
    padder = padding.PKCS7(128).padder()
    plain = padder.update(canonical(data)) + padder.finalize()
    encryptor = Cipher(algorithms.SM4(sm4_key(app_key)), modes.CBC(iv)).encryptor()
    return base64.b64encode(iv + encryptor.update(plain) + encryptor.finalize()).decode("ascii")


class DecryptError(ValueError):
    pass


def decrypt_data(text: str, app_key: str) -> Any:
    from cryptography.hazmat.primitives import padding
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

    try:
        raw = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError):
        raise DecryptError("data is not base64") from None
    if len(raw) < 32 or len(raw) % 16:
        raise DecryptError("data is not an IV and whole SM4 blocks (%d bytes)" % len(raw))
    decryptor = Cipher(algorithms.SM4(sm4_key(app_key)), modes.CBC(raw[:16])).decryptor()
    padded = decryptor.update(raw[16:]) + decryptor.finalize()
    unpadder = padding.PKCS7(128).unpadder()
    try:
        plain = unpadder.update(padded) + unpadder.finalize()
        return json.loads(plain.decode("utf-8"), parse_constant=_no_constant)
    except (ValueError, RecursionError):
        raise DecryptError("data does not decrypt to JSON under this app's key") from None


# --- codes (pOutData.code): spec 004's 000000 and 600001, the rest scanbox's -----------------

OK = "000000"
CONCURRENT = "600001"
BAD_ENVELOPE = "100001"
BAD_MSGID = "100002"
BAD_SIGNATURE = "100003"  # also an unknown app_id: the same code and text, so app ids cannot be probed
UNDECRYPTABLE = "100005"
UNSUPPORTED_ALGORITHM = "100006"
UNKNOWN_TRANS_TYPE = "100007"
STALE = "100008"  # timestamp outside the window (or the box's clock is not set)
REPLAYED = "100009"  # this app's msgid was already used within the window
KEY_SENT = "100010"  # app_key/appKey on the wire
LOCKED_OUT = "100011"  # the address failed too often (signatures here, tokens elsewhere): AuthGuard
# (100004, "unknown app_id", was retired: an unknown app answers 100003 like a bad signature)

BAD_SIGNATURE_TEXT = "签名验证失败: unknown app_id, or sign missing or wrong (HMAC-SM3, docs/api.md)"
# a clock before this cannot be right (scanbox did not exist yet): no window can be checked
EARLIEST_PLAUSIBLE = dt.datetime(2025, 1, 1)
MSGIDS_PER_APP = 10000  # msgids remembered per app within the window

# a failed read answers the code of its reason (docs/api.md lists them)
REASON_CODES: dict[Reason, str] = {
    Reason.TIMEOUT: "200001",
    Reason.QR_INVALID: "200002",
    Reason.QR_UNKNOWN: "200002",
    Reason.QR_EXPIRED: "200003",
    Reason.CARD_NOT_FOUND: "200004",
    Reason.CARD_INACTIVE: "200005",
    Reason.PLATFORM_UNAVAILABLE: "200006",
    Reason.PLATFORM_REJECTED: "200007",
    Reason.PLATFORM_AUTH: "200008",
    Reason.DEVICE_ERROR: "200009",
}
OTHER = "999999"  # any other reason: a fault inside scanbox, or the box stopping during the read

# pInData's common fields (spec 004 table 3-1): name -> (max length, required)
ENVELOPE = {
    # recer_sys_code: the table says 10, the spec's own recharge example sends 13 ("HIS-INPATIENT")
    "app_id": (50, True), "recer_sys_code": (32, True), "prd_id": (32, False), "msgid": (30, True),
    "timestamp": (30, True), "dev_no": (100, False), "signtype": (10, True), "enc_type": (5, True),
    "dept_codg": (20, True), "dept_name": (30, True), "opter": (30, True), "opter_name": (50, True),
    "opter_type": (3, True), "trans_type": (50, True),
}
OPTER_TYPES = {"1", "2", "3"}  # 经办人, 自助终端, 移动终端

# mdtrt_cert_type of the request -> the scan kinds that answer it
CERT_KINDS: dict[str, tuple[ScanKind, ...]] = {
    "01": (ScanKind.QR, ScanKind.HEALTH_CARD),  # 医保电子凭证/电子健康卡
    "02": (ScanKind.ID_CARD,),
    "03": (ScanKind.SSC,),
    "09": tuple(ScanKind),  # whatever the patient presents
}
# the scan's kind -> mdtrt_cert_type of the answer (就诊凭证类型字典)
KIND_CERT = {ScanKind.QR: "07", ScanKind.HEALTH_CARD: "07", ScanKind.ID_CARD: "02", ScanKind.SSC: "03"}
# CV02.01.101 (the identity's id_type) -> 人员证件类型 psn_cert_type
PSN_CERT_TYPE = {"01": "01", "02": "01", "03": "16", "04": "02", "05": "99", "06": "04", "07": "06",
                 "08": "99", "99": "99"}

PSN_NO_MAX = 30
_MSGID = re.compile(r"[0-9A-Za-z]{1,12}[0-9]{14}[0-9A-Za-z]{3,4}")
_TIMESTAMP = re.compile(r"[0-9]{17}")


def msgid_ok(msgid: str) -> bool:
    """定点医药机构编号(12) + yyyyMMddHHmmss + 顺序号(4). The spec's own examples have a 9-character
    institution code and a 3-character sequence, so: up to 12, a real date-time, then 3 or 4."""
    if not _MSGID.fullmatch(msgid):
        return False
    for seq in (4, 3):
        stamp = msgid[-seq - 14:-seq]
        if len(msgid) - seq - 14 >= 1 and stamp.isdigit():
            try:
                dt.datetime.strptime(stamp, "%Y%m%d%H%M%S")
                return True
            except ValueError:
                continue
    return False


def _ms_time(when: dt.datetime) -> str:
    return when.strftime("%Y%m%d%H%M%S") + "%03d" % (when.microsecond // 1000)


class Refused(Exception):
    """A request answered with a pOutData error code (and, once the app is known, signed)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


TransHandler = Callable[[dict[str, Any]], Awaitable[dict[str, Any]]]


class LoginGuard(Protocol):
    """What OneTrans needs of the API's per-address guard (agent.api.methods.AuthGuard)."""

    def refusal(self, peer: str) -> str | None: ...

    def penalty(self, peer: str) -> float: ...


class OneTrans:
    def __init__(self, config: OnetransConfig,
                 read_card: Callable[[list[ScanKind], float, str | None], Awaitable[Result]],
                 guard: LoginGuard | None = None) -> None:
        self.config = config
        self.read_card = read_card
        # one count per address for every transport: a wrong signature here is a wrong token
        # there, and an address locked out anywhere is locked out here
        self.guard = guard
        self._busy = False
        self._serial = itertools.count(int.from_bytes(os.urandom(4), "big"))
        self.trans_types: dict[str, TransHandler] = {"hos.user.get": self.user_get}
        self._msgids: dict[str, OrderedDict[str, float]] = {}
        # what is wrong with the box's clock (agent.clock.Clock.problem), None when it is right:
        # a timestamp window means nothing on a clock that is wrong or not yet synchronised
        self.clock_problem: Callable[[], str | None] | None = None

    async def handle(self, p_in: Any, transport: str = "unix", address: str = "local") -> dict[str, Any]:
        """pInData (object, or the JSON text of one) from `address` over `transport` -> pOutData.
        Never raises for bad input."""
        peer = "%s:%s" % (transport, address)
        received = now_local()
        app_key: str | None = None
        encrypt = False
        msgid: str | None = None
        try:
            sent, message = self._parse(p_in)
            if isinstance(message.get("msgid"), str) and len(message["msgid"]) <= 30:
                msgid = message["msgid"]
            self._refuse_key_on_wire(message, peer)
            if message.get("signtype") != "SM3":
                raise Refused(UNSUPPORTED_ALGORITHM, "signtype %r is not supported: SM3 (HMAC-SM3, see the API "
                              "document)" % _short(message.get("signtype")))
            refusal = self.guard.refusal(address) if self.guard is not None else None
            if refusal is not None:
                raise Refused(LOCKED_OUT, refusal)
            app_id = message.get("app_id")
            app = self.config.apps.get(app_id) if isinstance(app_id, str) else None
            # an unknown app costs the same HMAC as a known one, and answers the same
            key = app.app_key.get_secret_value() if app is not None else secrets.token_hex(16)
            given = message.get("sign")
            try:
                expected = signature(sent, key)
            except ValueError:  # NaN or an infinity inside an object given as an object
                raise Refused(BAD_ENVELOPE, "pInData holds a number JSON cannot carry (NaN, Infinity)") from None
            if app is None or not isinstance(given, str) or not hmac.compare_digest(
                    given.lower().encode("ascii", "replace"), expected.encode("ascii")):
                await self._slow(address)
                raise Refused(BAD_SIGNATURE, BAD_SIGNATURE_TEXT)
            app_key = key  # from here on the answer is signed
            enc_type = message.get("enc_type")
            if enc_type not in ("SM4", "NONE"):
                raise Refused(UNSUPPORTED_ALGORITHM, "enc_type %r is not supported: SM4 or NONE" % _short(enc_type))
            encrypt = enc_type == "SM4"
            self._check_envelope(message)
            self._check_fresh(str(app_id), message)  # a str: its app was found
            data = message.get("data")
            if encrypt:
                if not isinstance(data, str):
                    raise Refused(UNDECRYPTABLE, "enc_type SM4: data must be the base64 SM4 ciphertext")
                try:
                    data = decrypt_data(data, key)
                except DecryptError as exc:
                    raise Refused(UNDECRYPTABLE, str(exc)) from None
            if not isinstance(data, dict):
                raise Refused(BAD_ENVELOPE, "data must be a JSON object")
            trans_type = message["trans_type"]
            handler = self.trans_types.get(trans_type)
            if handler is None:
                raise Refused(UNKNOWN_TRANS_TYPE, "不支持的交易类型 trans_type %r; this box supports %s"
                              % (_short(trans_type), ", ".join(sorted(self.trans_types))))
            if self._busy:
                raise Refused(CONCURRENT, "接口业务不支持并发调用: another call is in progress")
            self._remember(str(app_id), message["msgid"])  # no await since _check_fresh: nothing slipped in
            self._busy = True
            try:
                out_data = await handler(data)
            finally:
                self._busy = False
            code, err_msg = OK, "成功"
        except Refused as exc:
            code, err_msg, out_data = exc.code, exc.message, {}
        return self._reply(code, err_msg, out_data, received, msgid, app_key, encrypt, peer)

    def refused(self, message: str, transport: str = "unix", address: str = "local") -> dict[str, Any]:
        """The pOutData for a body that is not even text (bad charset, too long): 100001, unsigned."""
        return self._reply(BAD_ENVELOPE, message, {}, now_local(), None, None, False, "%s:%s" % (transport, address))

    def _reply(self, code: str, err_msg: str, out_data: dict[str, Any], received: dt.datetime, msgid: str | None,
               app_key: str | None, encrypt: bool, peer: str) -> dict[str, Any]:
        logger.info("onetrans: %s answered %s", peer, code)
        reply: dict[str, Any] = {
            "code": code,
            "data": out_data,
            "err_msg": err_msg,
            "inf_refmsgid": "%s%s%010d" % (self.config.region, received.strftime("%Y%m%d%H%M%S"),
                                           next(self._serial) % 10**10),
            "refmsg_time": _ms_time(received),
            "respond_time": _ms_time(now_local()),
        }
        if msgid is not None:
            reply["msgid"] = msgid  # signed with the rest: the answer belongs to this request
        if app_key is None:
            return reply
        reply["signtype"] = "SM3"
        reply["enc_type"] = "SM4" if encrypt else "NONE"
        if encrypt:
            reply["data"] = encrypt_data(out_data, app_key)
        return sign(reply, app_key)

    def _refuse_key_on_wire(self, message: dict[str, Any], peer: str) -> None:
        """The key signs and decrypts for its app: it stays on the HIS's PC (OneTrans2.dll signs
        there). One that arrived has been seen by the network: say so, and refuse."""
        if not any(name in message for name in KEY_NAMES):
            return
        given = message.get("app_key", message.get("appKey"))
        app_id = message.get("app_id")
        app = self.config.apps.get(app_id) if isinstance(app_id, str) else None
        if app is not None and isinstance(given, str) and hmac.compare_digest(
                given.encode("utf-8"), app.app_key.get_secret_value().encode("utf-8")):
            logger.warning("onetrans: %s sent app %s's app_key over the network: it is no longer secret, "
                           "give the app a new key (api.onetrans.apps, the secrets file)", peer, message["app_id"])
        else:
            logger.warning("onetrans: %s sent an app_key over the network (refused)", peer)
        raise Refused(KEY_SENT, "app_key must not be sent: it stays on the HIS's PC, where the request is signed "
                      "(scanbox's OneTrans2.dll does this); one that crossed the network should be replaced")

    def _check_fresh(self, app_id: str, message: dict[str, Any]) -> None:
        """timestamp within window_s of the box's clock; msgid not yet used by this app in it."""
        now = now_local().replace(tzinfo=None)
        if now < EARLIEST_PLAUSIBLE:
            raise Refused(STALE, "the box's clock is not set (it says %s): requests cannot be checked for "
                          "freshness until it is synchronised" % now.strftime("%Y-%m-%d"))
        problem = self.clock_problem() if self.clock_problem is not None else None
        if problem is not None:
            raise Refused(STALE, "the box's clock cannot be trusted (%s): requests cannot be checked for "
                          "freshness until it is synchronised" % problem)
        try:
            t = message["timestamp"]  # 17 digits (_check_envelope): each field at its fixed place
            sent_at = dt.datetime(int(t[0:4]), int(t[4:6]), int(t[6:8]), int(t[8:10]), int(t[10:12]),
                                  int(t[12:14]), int(t[14:17]) * 1000)
        except ValueError:
            raise Refused(BAD_ENVELOPE, "timestamp must be yyyyMMddHHmmssSSS (a real time)") from None
        skew = (sent_at - now).total_seconds()
        window = self.config.window_s
        if abs(skew) > window:
            raise Refused(STALE, "timestamp %s is %.0f s %s the box's clock (%s); accepted within %g s: a "
                          "replayed request, or a clock to set right" % (
                              message["timestamp"], abs(skew), "behind" if skew < 0 else "ahead of",
                              now.strftime("%Y%m%d%H%M%S"), window))
        seen = self._seen(app_id)
        if message["msgid"] in seen:
            raise Refused(REPLAYED, "msgid %s was already used within %g s: each request needs a new msgid "
                          "(医疗机构业务流水号保持唯一)" % (message["msgid"], window))
        if len(seen) >= MSGIDS_PER_APP:
            raise Refused(REPLAYED, "more than %d requests from this app within %g s" % (MSGIDS_PER_APP, window))

    def _seen(self, app_id: str) -> "OrderedDict[str, float]":
        seen = self._msgids.setdefault(app_id, OrderedDict())
        now = time.monotonic()
        while seen and next(iter(seen.values())) < now:
            seen.popitem(last=False)
        return seen

    def _remember(self, app_id: str, msgid: str) -> None:
        # kept until a request with that timestamp is outside the window whichever way the clock
        # steps: twice the window from now
        self._seen(app_id)[msgid] = time.monotonic() + 2 * self.config.window_s

    async def _slow(self, address: str) -> None:
        if self.guard is not None:
            await asyncio.sleep(self.guard.penalty(address))

    @staticmethod
    def _parse(p_in: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """(the object as sent, which the signature covers; the same with aliases resolved)"""
        if isinstance(p_in, str):
            if len(p_in) > 1 << 20:
                raise Refused(BAD_ENVELOPE, "pInData is too long")
            try:
                p_in = json.loads(p_in, parse_constant=_no_constant)
            except (ValueError, RecursionError):
                raise Refused(BAD_ENVELOPE, "pInData is not JSON (or holds NaN/Infinity, which JSON has not)") from None
        if not isinstance(p_in, dict):
            raise Refused(BAD_ENVELOPE, "pInData must be a JSON object")
        message = dict(p_in)
        if "appId" in message and "app_id" not in message:
            message["app_id"] = message.pop("appId")
        return p_in, message

    @staticmethod
    def _check_envelope(message: dict[str, Any]) -> None:
        problems = []
        for name, (length, required) in ENVELOPE.items():
            value = message.get(name)
            if value is None or value == "":
                if required:
                    problems.append("%s is required" % name)
            elif not isinstance(value, str):
                problems.append("%s must be a string" % name)
            elif len(value) > length:
                problems.append("%s is longer than %d characters" % (name, length))
        if "data" not in message:
            problems.append("data is required")
        if problems:
            raise Refused(BAD_ENVELOPE, "; ".join(problems))
        if not msgid_ok(message["msgid"]):
            raise Refused(BAD_MSGID, "msgid %r is not 定点医药机构编号(up to 12) + yyyyMMddHHmmss + 顺序号(3-4)"
                          % _short(message["msgid"]))
        if not _TIMESTAMP.fullmatch(message["timestamp"]):
            raise Refused(BAD_ENVELOPE, "timestamp must be yyyyMMddHHmmssSSS")
        if message["opter_type"] not in OPTER_TYPES:
            raise Refused(BAD_ENVELOPE, "opter_type must be 1 (经办人), 2 (自助终端) or 3 (移动终端)")

    # --- trans_types -----------------------------------------------------------------------

    async def user_get(self, data: dict[str, Any]) -> dict[str, Any]:
        """hos.user.get (读卡): the next scan or card of the requested kind, verified."""
        cert_type = data.get("mdtrt_cert_type")
        if cert_type not in CERT_KINDS:
            raise Refused(BAD_ENVELOPE, "data.mdtrt_cert_type must be 01 (电子健康卡/医保电子凭证), 02 (身份证), "
                          "03 (社会保障卡) or 09 (any)")
        business_type = data.get("business_type")
        if not isinstance(business_type, str) or not 1 <= len(business_type) <= 5:
            raise Refused(BAD_ENVELOPE, "data.business_type is required (用码业务类型, up to 5 characters)")
        step = None
        treatment = data.get("treatment_code")
        if isinstance(treatment, str) and treatment[:6] in qwb002.MEDICAL_STEP:
            step = treatment[:6]  # 诊疗环节: the sub-step codes start with their step's
        try:
            result = await self.read_card(list(CERT_KINDS[cert_type]), self.config.read_timeout_s, step)
        except ScanboxError as exc:
            raise Refused(REASON_CODES.get(exc.reason, OTHER), exc.message) from None
        verification = result.verification
        if verification is not None and not verification.ok:
            reason = verification.reason or Reason.INTERNAL
            raise Refused(REASON_CODES.get(reason, OTHER), verification.message or reason.value)
        identity = result.identity
        if identity is None:
            raise Refused(REASON_CODES[Reason.QR_UNKNOWN], "the scan carries no identity")
        kind = result.scan.kind
        out: dict[str, Any] = {
            "baseinfo": {
                "psn_no": _psn_no(identity.main_index, identity.id_number),
                "psn_cert_type": PSN_CERT_TYPE.get(identity.id_type or "", "99"),
                "certno": identity.id_number or "",
                "psn_name": identity.name or "",
                "gend": identity.sex or "0",
                "naty": identity.nation or "",
                "brdy": _brdy(identity.birthday),
                "age": _age(identity.birthday),
            },
            "mdtrt_cert_type": KIND_CERT[kind],
        }
        if kind in (ScanKind.QR, ScanKind.HEALTH_CARD):
            out["ehcinfo"] = {
                "mindex_id": identity.main_index or "",
                "ehealth_card_id": identity.ecard_id or "",
                "phone": identity.phone or "",
                "id_type": identity.id_type or "",
                "id_no": identity.id_number or "",
                "user_name": identity.name or "",
                "user_sex": identity.sex or "",
                "mobile_phone": identity.phone or "",
                "birthday": identity.birthday or "",
                "address": identity.address or "",
            }
            out["phone"] = identity.phone or ""
        return out


def _psn_no(main_index: str | None, id_number: str | None) -> str:
    """人员编号, at most 30 characters (spec 004): the platform's main index when it fits (the
    wondersgroup one is 32 or 64 hex), else the ID number, which identifies the person as well."""
    for value in (main_index, id_number):
        if value and len(value) <= PSN_NO_MAX:
            return value
    return (id_number or main_index or "")[:PSN_NO_MAX]


def _born(birthday: str | None) -> dt.date | None:
    """The platform gives yyyyMMdd, some card readers yyyy-MM-dd."""
    digits = re.sub(r"[-/.]", "", birthday or "")
    try:
        return dt.datetime.strptime(digits, "%Y%m%d").date() if len(digits) == 8 else None
    except ValueError:
        return None


def _brdy(birthday: str | None) -> str:
    born = _born(birthday)
    return born.isoformat() if born else birthday or ""


def _age(birthday: str | None, today: dt.date | None = None) -> int | None:
    born = _born(birthday)
    if born is None:
        return None
    today = today or now_local().date()
    return today.year - born.year - ((today.month, today.day) < (born.month, born.day))


def _no_constant(name: str) -> Any:
    raise ValueError("%s is not JSON" % name)


def _short(value: Any, limit: int = 60) -> str:
    text = str(value)
    return text if len(text) <= limit else text[:limit] + "…"
