"""The sealing's construction (agent/sealing.py): RFC 8439 ChaCha20-Poly1305 and RFC 5869
HKDF-SHA256, through PyNaCl and the standard library since issue 17. Stores sealed before, through
`cryptography`, open with no migration, and the reverse (a box rolled back to a release before)."""

from __future__ import annotations

import functools
import os
import uuid

import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import ChaCha20Poly1305
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from agent import sealing
from agent.model import UsageRecord
from agent.outbox import Store

QR = "3B5E4A8C" * 8 + ":1"
NAME = "张晓明"
ID_NUMBER = "630102198503121237"


class CryptographyKeyring(sealing.Keyring):
    """The sealing as it was before issue 17 (commit 235db69), through `cryptography`."""

    @functools.cached_property
    def _qr_index_key(self) -> bytes:
        return HKDF(hashes.SHA256(), 32, salt=None, info=sealing.QR_INDEX_LABEL).derive(self.key)

    def seal(self, plaintext: bytes, associated: bytes) -> bytes:
        nonce = os.urandom(sealing.NONCE_BYTES)
        return bytes([sealing.VERSION]) + self.key_id + nonce + ChaCha20Poly1305(self.key).encrypt(
            nonce, plaintext, associated)

    def open(self, sealed: bytes, associated: bytes) -> bytes:
        keys = {sealing.key_id(k): k for k in [*self.old, self.key]}
        try:
            return ChaCha20Poly1305(keys[sealed[1:5]]).decrypt(
                sealed[5:sealing.HEADER_BYTES], sealed[sealing.HEADER_BYTES:], associated)
        except InvalidTag:
            raise sealing.SealError("does not open") from None


@pytest.mark.parametrize("plaintext", [b"", b"x", "张晓明 630102198503121237".encode() * 40])
def test_what_cryptography_sealed_opens_and_the_reverse(plaintext):
    key = os.urandom(32)
    before, now = CryptographyKeyring(key, "235db69"), sealing.Keyring(key, "now")
    assert now.open(before.seal(plaintext, b"outbox:guid"), b"outbox:guid") == plaintext
    assert before.open(now.seal(plaintext, b"outbox:guid"), b"outbox:guid") == plaintext
    # the same layout: version, key id, nonce, ciphertext and the 16-byte tag
    expected = sealing.HEADER_BYTES + len(plaintext) + 16
    assert len(now.seal(plaintext, b"")) == len(before.seal(plaintext, b"")) == expected


def test_a_changed_byte_or_other_associated_data_does_not_open():
    keys = sealing.Keyring(os.urandom(32), "test")
    sealed = keys.seal(b"payload", b"outbox:a")
    for i in range(sealing.HEADER_BYTES - sealing.NONCE_BYTES, len(sealed)):  # nonce, ciphertext, tag
        changed = bytearray(sealed)
        changed[i] ^= 0x01
        with pytest.raises(sealing.SealError, match="changed, or moved"):
            keys.open(bytes(changed), b"outbox:a")
    with pytest.raises(sealing.SealError, match="changed, or moved"):
        keys.open(sealed, b"outbox:b")
    with pytest.raises(sealing.SealError, match="another key"):
        sealing.Keyring(os.urandom(32), "other").open(sealed, b"outbox:a")
    with pytest.raises(sealing.SealError, match="not a sealed value"):
        keys.open(sealed[:sealing.HEADER_BYTES + 15], b"outbox:a")


def test_rfc_8439_aead_test_vector():
    """RFC 8439 2.8.2: the construction itself, not only agreement with another library."""
    key = bytes(range(0x80, 0xa0))
    nonce = bytes.fromhex("070000004041424344454647")
    aad = bytes.fromhex("50515253c0c1c2c3c4c5c6c7")
    plaintext = (b"Ladies and Gentlemen of the class of '99: If I could offer you only one tip for the future,"
                 b" sunscreen would be it.")
    keys = sealing.Keyring(key, "rfc")
    sealed = bytes([sealing.VERSION]) + keys.key_id + nonce + bytes.fromhex(
        "d31a8d34648e60db7b86afbc53ef7ec2a4aded51296e08fea9e2b5a736ee62d63dbea45e8ca9671282fafb69da92728b1a71de0a9e06"
        "0b2905d6a5b67ecd3b3692ddbd7f2d778b8c9803aee328091b58fab324e4fad675945585808b4831d7bc3ff4def08e4b7a9de576d265"
        "86cec64b6116" "1ae10b594f09e26a7e902ecbd0600691")
    assert keys.open(sealed, aad) == plaintext


@pytest.mark.parametrize("length", [1, 32, 42, 64, 100])
@pytest.mark.parametrize("info", [b"", sealing.QR_INDEX_LABEL])
def test_hkdf_derives_what_cryptography_derives(length, info):
    key = os.urandom(32)
    assert sealing.hkdf_sha256(key, info, length) == HKDF(hashes.SHA256(), length, salt=None, info=info).derive(key)


def test_hkdf_rfc_5869_test_case_3():
    okm = sealing.hkdf_sha256(bytes([0x0b]) * 22, b"", 42)
    assert okm.hex() == ("8da4e775a563c18f715f802a063c5a31b8a11f5c5ee1879ec3454e5f3c738d2d"
                         "9d201395faa4b61a96c8")
    with pytest.raises(ValueError, match="8160 bytes"):
        sealing.hkdf_sha256(b"k", b"", 255 * 32 + 1)


def use(n: int) -> UsageRecord:
    return UsageRecord(uuid.uuid4().hex, "RHC_E0003", {"qr_code": QR, "name": NAME, "id_card": ID_NUMBER,
                                                       "time": "2026-11-22 10:00:%02d" % n}, "scan-%d" % n)


@pytest.mark.parametrize("before, after", [(CryptographyKeyring, sealing.Keyring),
                                           (sealing.Keyring, CryptographyKeyring)])
async def test_a_store_sealed_by_one_opens_with_the_other(tmp_path, before, after):
    """A whole store (outbox payloads and the identity cache, its index derived by HKDF) written
    by one and read by the other, with no migration in between."""
    key = os.urandom(32)
    store = Store(tmp_path / "outbox.db", keyring=before(key, "test"))
    await store.open()
    ids = [await store.enqueue(use(n)) for n in range(3)]
    await store.cache_put(QR, {"name": NAME, "id_number": ID_NUMBER}, ttl_s=3600)
    await store.close()
    store = Store(tmp_path / "outbox.db", keyring=after(key, "test"))
    await store.open()
    assert [(await store.get(i)).values["time"] for i in ids] == ["2026-11-22 10:00:%02d" % n for n in range(3)]
    assert (await store.cache_get(QR))[0] == {"name": NAME, "id_number": ID_NUMBER}
    await store.close()
