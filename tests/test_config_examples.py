"""The example config in the repo must stay true to the code."""

from __future__ import annotations

import shutil
from pathlib import Path

from agent.config import dump, load

ROOT = Path(__file__).resolve().parent.parent


def test_the_example_config_and_secrets_load(tmp_path):
    secrets = tmp_path / "secrets.toml"
    shutil.copy(ROOT / "config" / "secrets.example.toml", secrets)
    secrets.chmod(0o600)
    config = load(ROOT / "config" / "scanbox.example.toml", secrets)
    assert config.platform.rhc.user_pwd.get_secret_value() == "change-me"
    assert set(config.api.clients) == {"his", "technician"}
    assert config.sources["counter"].driver == "serial_scanner"
    assert config.sources["cards"].driver == "pcsc"
    assert config.site.sam == "45600001X5500"
    printed = repr(dump(config))
    assert "change-me" not in printed and "a-long-random-string" not in printed
