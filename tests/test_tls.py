"""The box's TLS certificate (agent/tls.py) and `scanbox tls`."""

from __future__ import annotations

import hashlib
import ssl
import stat
import subprocess
import sys

import pytest

from agent import tls


def _scanbox(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "agent", *args], capture_output=True, text=True)


def test_tls_init_makes_a_key_once_and_show_prints_the_fingerprint_a_client_sees(tmp_path):
    made = _scanbox("tls", "init", "--state-dir", str(tmp_path))
    assert made.returncode == 0 and "made" in made.stdout
    certificate = tls.default_paths(tmp_path)
    assert stat.S_IMODE(certificate.key.stat().st_mode) == 0o600
    key_pem = certificate.key.read_bytes()
    assert key_pem.decode() not in made.stdout  # the key is never printed
    der = ssl.PEM_cert_to_DER_cert(certificate.cert.read_text())
    expected = hashlib.sha256(der).hexdigest().upper()
    assert expected == certificate.fingerprint().replace(":", "")
    again = _scanbox("tls", "init", "--state-dir", str(tmp_path))
    assert "kept the existing" in again.stdout and certificate.key.read_bytes() == key_pem
    shown = _scanbox("tls", "show", "--state-dir", str(tmp_path))
    assert certificate.fingerprint() in shown.stdout and certificate.spki_sha256() in shown.stdout
    forced = _scanbox("tls", "init", "--state-dir", str(tmp_path), "--force", "--name", "box-3.clinic.lan")
    assert forced.returncode == 0 and certificate.key.read_bytes() != key_pem


def test_a_key_others_can_read_is_refused(tmp_path):
    certificate = tls.default_paths(tmp_path)
    tls.make(certificate)
    certificate.key.chmod(0o640)
    with pytest.raises(tls.TlsError, match="mode 0640"):
        certificate.server_context()
    shown = _scanbox("tls", "show", "--state-dir", str(tmp_path / "nothing"))
    assert shown.returncode == 1 and "box.crt" in shown.stderr
