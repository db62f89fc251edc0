#!/usr/bin/env python3
"""A HIS that used OneTrans2.dll, talking to a scanbox instead (docs/api.md "OneTrans").

    python3 onetrans_client.py --url http://127.0.0.1:7801/onetrans --app-id HIS0000000000001 \
        --app-key KEY --org H35058300252

builds a hos.user.get request (spec 004) with a fresh msgid and timestamp, signs it (HMAC-SM3
over the canonical form), encrypts `data` (SM4-CBC), POSTs it without the app_key (the key
stays here), checks that the answer is signed and carries this request's msgid, decrypts it
and prints pOutData. Needs `cryptography` (pip install cryptography): SM3 and SM4 come from OpenSSL.
This file stands alone: it is the reference for implementing the same in another language.
"""

from __future__ import annotations

import argparse
import base64
import datetime as dt
import hmac
import itertools
import json
import secrets
import sys
import urllib.request
from typing import Any

from cryptography.hazmat.primitives import hashes, padding
from cryptography.hazmat.primitives import hmac as crypto_hmac
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

_sequence = itertools.count(1)


def canonical(value: Any) -> bytes:
    """Keys sorted at every level, no whitespace, non-ASCII as itself, UTF-8."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False).encode("utf-8")


def _hmac_sm3(key: bytes, data: bytes) -> bytes:
    mac = crypto_hmac.HMAC(key, hashes.SM3())
    mac.update(data)
    return mac.finalize()


def mac_key(app_key: str) -> bytes:
    """The signing key: derived from app_key with its own label, apart from the SM4 key."""
    return _hmac_sm3(app_key.encode("utf-8"), b"scanbox onetrans mac v1")


def sm4_key(app_key: str) -> bytes:
    return _hmac_sm3(app_key.encode("utf-8"), b"scanbox onetrans sm4 v1")[:16]


def sign(message: dict[str, Any], app_key: str) -> str:
    body = {k: v for k, v in message.items() if k != "sign"}
    return _hmac_sm3(mac_key(app_key), canonical(body)).hex()


def encrypt(data: Any, app_key: str) -> str:
    iv = secrets.token_bytes(16)
    padder = padding.PKCS7(128).padder()
    plain = padder.update(canonical(data)) + padder.finalize()
    encryptor = Cipher(algorithms.SM4(sm4_key(app_key)), modes.CBC(iv)).encryptor()
    return base64.b64encode(iv + encryptor.update(plain) + encryptor.finalize()).decode("ascii")


def decrypt(text: str, app_key: str) -> Any:
    raw = base64.b64decode(text)
    decryptor = Cipher(algorithms.SM4(sm4_key(app_key)), modes.CBC(raw[:16])).decryptor()
    unpadder = padding.PKCS7(128).unpadder()
    plain = unpadder.update(decryptor.update(raw[16:]) + decryptor.finalize()) + unpadder.finalize()
    return json.loads(plain.decode("utf-8"))


def read_card_request(app_id: str, app_key: str, org: str, cert_type: str = "09") -> dict[str, Any]:
    now = dt.datetime.now()
    message: dict[str, Any] = {
        "app_id": app_id,
        "recer_sys_code": "HIS",
        # 定点医药机构编号(up to 12) + yyyyMMddHHmmss + 顺序号(4)
        "msgid": "%s%s%04d" % (org, now.strftime("%Y%m%d%H%M%S"), next(_sequence) % 10000),
        "timestamp": now.strftime("%Y%m%d%H%M%S") + "%03d" % (now.microsecond // 1000),
        "signtype": "SM3",
        "enc_type": "SM4",
        "dept_codg": "275",
        "dept_name": "妇产科",
        "opter": "nurse01",
        "opter_name": "护士",
        "opter_type": "1",
        "trans_type": "hos.user.get",
        "data": encrypt({"mdtrt_cert_type": cert_type, "business_type": "01101"}, app_key),
    }
    message["sign"] = sign(message, app_key)
    return message


class UntrustedAnswer(Exception):
    """An answer this client cannot attribute to the box and this request: do not use it."""


def open_answer(answer: dict[str, Any], request: dict[str, Any], app_key: str) -> dict[str, Any]:
    """Check the box's signature and that the answer is this request's (its msgid), then decrypt
    its data. An unsigned answer is refused: the box signs every answer to a request it could
    authenticate, so an unsigned one is either an error about the request itself (its code and
    err_msg are in the exception) or not from the box."""
    if not isinstance(answer.get("sign"), str):
        raise UntrustedAnswer("unsigned answer (code %s: %s)" % (answer.get("code"), answer.get("err_msg")))
    if not hmac.compare_digest(answer["sign"], sign(answer, app_key)):
        raise UntrustedAnswer("the answer's signature is wrong: not from a box that has this app's key")
    if answer.get("msgid") != request["msgid"]:
        raise UntrustedAnswer("the answer is for msgid %r, not this request's %r" % (answer.get("msgid"),
                                                                                   request["msgid"]))
    if answer.get("enc_type") == "SM4":
        answer = dict(answer, data=decrypt(answer["data"], app_key))
    return answer


def onetrans(url: str, message: dict[str, Any], app_key: str, timeout: float = 90) -> dict[str, Any]:
    body = json.dumps(message, ensure_ascii=False).encode("utf-8")
    request = urllib.request.Request(url, data=body, method="POST",
                                     headers={"Content-Type": "application/json; charset=utf-8"})
    with urllib.request.urlopen(request, timeout=timeout) as response:
        return open_answer(json.loads(response.read().decode(response.headers.get_content_charset("utf-8"))),
                           message, app_key)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", default="http://127.0.0.1:7801/onetrans")
    parser.add_argument("--app-id", required=True)
    parser.add_argument("--app-key", required=True)
    parser.add_argument("--org", default="H35058300252", help="定点医药机构编号 for msgid")
    parser.add_argument("--cert-type", default="09", help="mdtrt_cert_type: 01, 02, 03 or 09")
    args = parser.parse_args(argv)
    try:
        message = read_card_request(args.app_id, args.app_key, args.org, args.cert_type)
        answer = onetrans(args.url, message, args.app_key)
    except UntrustedAnswer as exc:
        print("refused the box's answer: %s" % exc, file=sys.stderr)
        return 2
    print(json.dumps(answer, ensure_ascii=False, indent=2))
    return 0 if answer["code"] == "000000" else 1


if __name__ == "__main__":
    sys.exit(main())
