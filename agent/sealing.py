"""The key that seals personal data at rest, and the sealing (DESIGN.md "Personal data").

The outbox's payloads (QR codes, names, ID numbers) and the identity cache are sealed with
ChaCha20-Poly1305 (an AEAD: a changed byte or a row moved onto another row's id fails to open)
under a 256-bit key kept outside the database:

- `$CREDENTIALS_DIRECTORY/store.key`: the daemon under systemd (LoadCredential=store.key:
  /etc/scanbox/store.key); root's file, which the daemon's user cannot read itself;
- /etc/scanbox/store.key read directly: the CLI run as root (`sudo scanbox outbox show 3`);
- `<state directory>/store.key`: a development box, the tests, the demo; and a box whose
  credential is missing (an alarm says the key lies beside the data it protects).

ChaCha20-Poly1305, not AES-GCM: a Raspberry Pi 4's Cortex-A72 has no AES instructions, and
ChaCha20 in software is several times faster than AES there.

What the key protects against, and what not: docs/technician.md, "Personal data on the box".
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import hmac
import logging
import os
from pathlib import Path
from types import ModuleType

import msgspec


logger = logging.getLogger(__name__)

KEY_NAME = "store.key"  # LoadCredential=store.key:/etc/scanbox/store.key
ETC_KEY = Path("/etc/scanbox") / KEY_NAME
# the unit's SetCredential=store.key:none, systemd's fallback when /etc/scanbox/store.key is missing
NO_KEY = b"none"
KEY_BYTES = 32
NONCE_BYTES = 12
VERSION = 1
# version byte, key id, nonce, then ciphertext and tag
HEADER_BYTES = 1 + 4 + NONCE_BYTES
TAG_BYTES = 16  # Poly1305's, after the ciphertext
# HKDF's label for the key of the identity cache's index (Keyring.qr_index): a key of its own,
# so the index reveals nothing about the sealing key and the sealing key never keys a MAC
QR_INDEX_LABEL = b"scanbox identity cache qr index v1"


class SealError(Exception):
    """A sealed value cannot be opened: another key, or changed bytes."""


class StoreKeyError(Exception):
    """The key file cannot be read or made."""


def new_key_file(path: Path) -> bool:
    """Make a key file (0600, base64 text so a technician can back it up) unless one exists;
    True when it made one. Never replaces a key: data sealed under it would be lost."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
    text = base64.b64encode(os.urandom(KEY_BYTES)) + b"\n"
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text)
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


def read_key(path: Path) -> bytes | None:
    """The key in `path`; None when there is none (a missing or empty file, or NO_KEY)."""
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise StoreKeyError("%s: %s" % (path, exc.strerror or exc)) from exc
    if raw.strip() in (b"", NO_KEY):
        return None
    if len(raw) == KEY_BYTES:
        return raw
    try:
        key = base64.b64decode(raw.strip(), validate=True)
    except binascii.Error:
        key = b""
    if len(key) != KEY_BYTES:
        raise StoreKeyError("%s: not a store key (%d bytes of base64 expected)" % (path, KEY_BYTES))
    return key


def key_id(key: bytes) -> bytes:
    return hashlib.sha256(b"scanbox store key id\0" + key).digest()[:4]


class Keyring(msgspec.Struct, dict=True):
    """Seals with `key`; opens with it or any of `old` (keys a store was sealed under before)."""

    key: bytes
    source: str  # where the key came from, for status and doctor
    beside_data: bool = False  # the key lies in the state directory, next to the database
    old: list[bytes] = msgspec.field(default_factory=list)
    old_path: Path | None = None  # the file `old` came from, deleted once nothing uses it

    def __post_init__(self) -> None:
        self.key_id = key_id(self.key)

    @functools.cached_property
    def _keys_by_id(self) -> dict[bytes, bytes]:
        return {key_id(k): k for k in [*self.old, self.key]}

    @functools.cached_property
    def _qr_index_key(self) -> bytes:
        return hkdf_sha256(self.key, QR_INDEX_LABEL)

    def qr_index(self, qr: str) -> str:
        """The identity cache's key for a code: HMAC-SHA256 under a key derived from the store
        key. A plain hash of the code would let whoever holds the card test a code they know
        (a patient's static code is printed, photographed, shown) against the cache."""
        return hmac.new(self._qr_index_key, qr.encode("utf-8"), hashlib.sha256).hexdigest()

    def seal(self, plaintext: bytes, associated: bytes) -> bytes:
        aead = _aead()
        nonce = os.urandom(NONCE_BYTES)
        return (bytes([VERSION]) + self.key_id + nonce
                + aead.crypto_aead_chacha20poly1305_ietf_encrypt(bytes(plaintext), associated, nonce, self.key))

    def open(self, sealed: bytes, associated: bytes) -> bytes:
        if len(sealed) < HEADER_BYTES + TAG_BYTES or sealed[0] != VERSION:
            raise SealError("not a sealed value")
        key = self._keys_by_id.get(bytes(sealed[1:5]))
        if key is None:
            raise SealError("sealed under another key (a store key was replaced or lost)")
        aead = _aead()
        from nacl.exceptions import CryptoError

        try:
            return aead.crypto_aead_chacha20poly1305_ietf_decrypt(
                bytes(sealed[HEADER_BYTES:]), associated, bytes(sealed[5:HEADER_BYTES]), key)
        except CryptoError:
            raise SealError("does not open: changed, or moved from another row") from None

    def sealed_under_old(self, sealed: bytes) -> bool:
        return len(sealed) >= HEADER_BYTES and bytes(sealed[1:5]) != self.key_id


def _aead() -> ModuleType:
    """libsodium's RFC 8439 ChaCha20-Poly1305 (through PyNaCl), imported at the first seal or
    open, not at the daemon's start. Not `cryptography`: the same construction (12-byte nonce, the
    16-byte tag after the ciphertext: what it sealed opens here and back), but a daemon that loads
    OpenSSL's bindings to seal is 8.5 MiB larger; PyNaCl costs 1.2 MiB and 9 ms to import
    (pycryptodomex: 2.7 MiB and 45 ms, parsing its C declarations with pycparser at import)."""
    import nacl.bindings

    return nacl.bindings


def hkdf_sha256(key: bytes, info: bytes, length: int = 32) -> bytes:
    """HKDF-SHA256 (RFC 5869) without a salt, from the standard library's HMAC: extract, then
    expand. The same key as `cryptography`'s HKDF(SHA256(), length, salt=None, info=info), which
    derived the keys of stores sealed before (tests/test_sealing.py checks both ways)."""
    if not 0 < length <= 255 * hashlib.sha256().digest_size:
        raise ValueError("HKDF-SHA256 derives 1 to 8160 bytes, not %d" % length)
    prk = hmac.new(bytes(hashlib.sha256().digest_size), key, hashlib.sha256).digest()
    okm = block = b""
    counter = 1
    while len(okm) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        okm += block
        counter += 1
    return okm[:length]


def load(state_dir: Path, etc_key: Path = ETC_KEY, *, create: bool = True) -> Keyring:
    """The store's key, from the first place that has one (the module's docstring); a key made
    in the state directory when none has and `create` (the daemon; not the CLI, which would make
    a key nothing was sealed under). Raises StoreKeyError when there is no key to read."""
    fallback = state_dir / KEY_NAME
    creds = os.environ.get("CREDENTIALS_DIRECTORY")
    key = None
    source = ""
    if creds:
        key = read_key(Path(creds) / KEY_NAME)
        source = "systemd credential %s" % KEY_NAME
    if key is None and os.access(etc_key, os.R_OK):
        key = read_key(etc_key)
        source = str(etc_key)
    if key is not None:
        old = _old_key(fallback, key)
        return Keyring(key, source, old=[old] if old else [], old_path=fallback if old else None)
    if not create and read_key(fallback) is None:
        raise StoreKeyError("no store key: not in $CREDENTIALS_DIRECTORY, %s (run as root) or %s"
                            % (etc_key, fallback))
    if new_key_file(fallback):
        logger.info("store key: none given; made %s", fallback)
    key = read_key(fallback)
    if key is None:
        raise StoreKeyError("%s: empty" % fallback)
    # under systemd the key belongs in /etc/scanbox (a credential); elsewhere (development, the
    # demo, tests) the state directory is where it is meant to be
    return Keyring(key, str(fallback), beside_data=bool(creds))


def _old_key(fallback: Path, key: bytes) -> bytes | None:
    """A key the daemon once made beside the data, before the credential existed: the store
    re-seals what it sealed and then deletes it."""
    try:
        old = read_key(fallback)
    except StoreKeyError as exc:
        logger.error("store key: %s", exc)
        return None
    return old if old is not None and old != key else None
