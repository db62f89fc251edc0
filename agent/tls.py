"""The box's TLS certificate: made once (provisioning, `scanbox tls init`, or the first start
that needs it), or the technician's own files; an ssl context for the TCP, HTTP and WebSocket
listeners; the SHA-256 fingerprint a HIS pins (docs/api.md "TLS").

A box has no name a public CA would certify and a hospital rarely runs a CA, so the default is
a self-signed certificate whose fingerprint the HIS pins: the fingerprint is shown by `doctor`,
`status` and the display. The key never leaves the box and is never printed.
"""

from __future__ import annotations

import base64
import datetime
import ipaddress
import logging
import os
import socket
import ssl
import stat
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

logger = logging.getLogger(__name__)

CERT_NAME = "box.crt"
KEY_NAME = "box.key"
VALID_DAYS = 20 * 365  # a box lives for years; the HIS pins the fingerprint, not a date


class TlsError(ValueError):
    """A certificate or key that cannot be used, with the file in the message."""


@dataclass(frozen=True)
class BoxCertificate:
    cert: Path
    key: Path

    def fingerprint(self) -> str:
        """SHA-256 of the certificate (DER), as AA:BB:...: what `openssl x509 -fingerprint
        -sha256`, browsers and the examples show and compare."""
        return fingerprint(_load_cert(self.cert))

    def spki_sha256(self) -> str:
        """base64 SHA-256 of the public key (SPKI): what Chromium's
        --ignore-certificate-errors-spki-list takes."""
        return spki_sha256(_load_cert(self.cert))

    def server_context(self) -> ssl.SSLContext:
        check_key_file(self.key)
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.minimum_version = ssl.TLSVersion.TLSv1_2
        try:
            context.load_cert_chain(self.cert, self.key)
        except (OSError, ssl.SSLError) as exc:
            raise TlsError("cannot use %s with %s: %s" % (self.cert, self.key, exc)) from exc
        return context


def fingerprint(cert: x509.Certificate) -> str:
    return cert.fingerprint(hashes.SHA256()).hex(":").upper()


def spki_sha256(cert: x509.Certificate) -> str:
    spki = cert.public_key().public_bytes(serialization.Encoding.DER,
                                          serialization.PublicFormat.SubjectPublicKeyInfo)
    digest = hashes.Hash(hashes.SHA256())
    digest.update(spki)
    return base64.b64encode(digest.finalize()).decode("ascii")


def default_paths(state_dir: Path) -> BoxCertificate:
    return BoxCertificate(state_dir / "tls" / CERT_NAME, state_dir / "tls" / KEY_NAME)


def check_key_file(path: Path) -> None:
    """The key is a secret: its owner alone may read it."""
    try:
        mode = path.stat().st_mode
    except OSError as exc:
        raise TlsError("TLS key %s: %s" % (path, exc.strerror or exc)) from exc
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise TlsError("TLS key %s has mode %04o: it must be readable by its owner only (chmod 600)"
                       % (path, stat.S_IMODE(mode)))


def make(target: BoxCertificate, names: list[str] | None = None, force: bool = False) -> bool:
    """Make a key and a self-signed certificate at `target` unless both exist (or `force`).
    True when new ones were made."""
    if not force and target.cert.exists() and target.key.exists():
        return False
    names = names or box_names()
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "scanbox"),
                         x509.NameAttribute(NameOID.COMMON_NAME, names[0][:64])])
    sans: list[x509.GeneralName] = []
    for name in names:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(name)))
        except ValueError:
            sans.append(x509.DNSName(name))
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder()
            .subject_name(subject).issuer_name(subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            # a day back: a box whose clock is behind still accepts its own certificate
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=VALID_DAYS))
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .sign(key, hashes.SHA256()))
    target.key.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                serialization.NoEncryption())
    _write(target.key, key_pem, 0o600)
    _write(target.cert, cert.public_bytes(serialization.Encoding.PEM), 0o644)
    logger.info("tls: made a key and certificate for %s; SHA-256 fingerprint %s", ", ".join(names),
                fingerprint(cert))
    return True


def box_names() -> list[str]:
    host = socket.gethostname() or "scanbox"
    return [host, host + ".local", "localhost", "127.0.0.1", "192.168.7.1"]


def _load_cert(path: Path) -> x509.Certificate:
    try:
        return x509.load_pem_x509_certificate(path.read_bytes())
    except OSError as exc:
        raise TlsError("TLS certificate %s: %s" % (path, exc.strerror or exc)) from exc
    except ValueError as exc:
        raise TlsError("TLS certificate %s is not a PEM certificate: %s" % (path, exc)) from exc


def _write(path: Path, data: bytes, mode: int) -> None:
    # written aside and renamed: a crash never leaves half a key, and the mode is set before
    # anything is in the file
    tmp = path.with_name(path.name + ".new")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
    try:
        os.fchmod(fd, mode)
        os.write(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def for_config(cert: Path | None, key: Path | None, state_dir: Path) -> BoxCertificate:
    """The technician's files (api.tls_cert, api.tls_key), else the box's own in the state
    directory, made now when there are none."""
    if cert is not None and key is not None:
        return BoxCertificate(cert, key)
    target = default_paths(state_dir)
    make(target)
    return target
