"""Issue 15: settings that weaken the box are refused by `config check` and at start unless
`[security] allow` names them; tokens and keys have a minimum strength."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from agent.config import ConfigError, load, validate
from tests.conftest import config_dict, write_config

STRONG = "7f3c9a1e-his-token-5d2b"


def _problems(tmp_path: Path, **sections: Any) -> dict[str, str]:
    config, secrets = write_config(tmp_path, config_dict(None, tmp_path, **sections))
    try:
        load(config, secrets)
    except ConfigError as exc:
        return {p.path: p.message for p in exc.problems}
    return {}


RISKS = [
    ({"api": {"trusted": ["0.0.0.0/0"]}}, "api.trusted", "wide_trusted"),
    ({"api": {"trusted": ["10.0.0.0/8"]}}, "api.trusted", "wide_trusted"),
    ({"api": {"unix_mode": "0666"}}, "api.unix_mode", "open_unix_socket"),
    ({"platform": {"endpoint": "http://10.20.30.40:8083/hcpde/services/healthCardService"}}, "platform.endpoint",
     "plain_platform"),
    ({"platform": {"tls_verify": False}}, "platform.tls_verify", "no_tls_verify"),
    ({"api": {"tcp": "0.0.0.0:7800", "tls": "off"}}, "api.tcp", "plain_listener"),
    ({"api": {"http": "192.168.1.20:7801", "tls": "off"}}, "api.http", "plain_listener"),
    # the metrics port: the bearer token of the region's Prometheus in clear
    ({"metrics": {"listen": "0.0.0.0:9851", "tls": "off"}}, "metrics.listen", "plain_listener"),
]


@pytest.mark.parametrize(("sections", "path", "allow"), RISKS)
def test_a_dangerous_setting_is_refused_unless_the_site_allows_it(tmp_path, sections, path, allow):
    found = _problems(tmp_path, **sections)
    assert path in found and '[security] allow = ["%s"]' % allow in found[path], found
    assert _problems(tmp_path, security={"allow": [allow]}, **sections) == {}


@pytest.mark.parametrize("sections", [
    {"api": {"trusted": ["192.168.1.0/24", "127.0.0.1"]}},
    {"api": {"tcp": "0.0.0.0:7800"}},  # TLS: api.tls = "auto"
    {"api": {"tcp": "192.168.7.1:7800", "http": "127.0.0.1:7801", "tls": "off"}},  # USB link, loopback
    {"platform": {"endpoint": "http://127.0.0.1:8780/healthCard/services/x"}},  # a simulator on the box
    {"metrics": {"listen": "0.0.0.0:9851"}},  # TLS: metrics.tls = "auto"
    {"metrics": {"listen": "192.168.7.1:9851", "tls": "off"}},  # the USB link
])
def test_safe_settings_pass(tmp_path, sections):
    assert _problems(tmp_path, **sections) == {}


def test_a_secrets_file_its_group_can_read_is_refused_unless_allowed(tmp_path):
    config, secrets = write_config(tmp_path, config_dict(None, tmp_path))
    secrets.chmod(0o640)
    with pytest.raises(ConfigError, match="group_readable_secrets"):
        load(config, secrets)
    allowed = config_dict(None, tmp_path, security={"allow": ["group_readable_secrets"]})
    config, secrets = write_config(tmp_path, allowed)
    secrets.chmod(0o640)
    assert load(config, secrets).security.allow == ["group_readable_secrets"]


@pytest.mark.parametrize("token", ["", "t", "0123456789", "aaaaaaaaaaaaaaaaaaaaaaaa", "abababababababababab"])
def test_weak_tokens_and_app_keys_are_refused(tmp_path, token):
    with pytest.raises(ConfigError, match="api.clients.his.token: too weak"):
        validate(config_dict(None, tmp_path, api={"clients": {"his": {"token": token}}}))
    with pytest.raises(ConfigError, match="app_key: too weak"):
        validate(config_dict(None, tmp_path, api={"onetrans": {"apps": {"HIS1": {"app_key": token}}}}))
    validate(config_dict(None, tmp_path, api={"clients": {"his": {"token": STRONG}}}))


def test_an_empty_platform_password_is_refused(tmp_path):
    data = config_dict(None, tmp_path)
    data["platform"]["rhc"]["user_pwd"] = ""
    with pytest.raises(ConfigError, match="platform.rhc.user_pwd: empty"):
        validate(data)


def test_config_check_refuses_then_warns_about_what_is_allowed(tmp_path):
    scanbox = [sys.executable, "-m", "agent", "config", "check"]
    config, secrets = write_config(tmp_path, config_dict(None, tmp_path, platform={"tls_verify": False}))
    proc = subprocess.run(scanbox + [str(config), "--secrets", str(secrets)], capture_output=True, text=True)
    assert proc.returncode == 1 and "platform.tls_verify" in proc.stderr and "no_tls_verify" in proc.stderr
    config, secrets = write_config(tmp_path, config_dict(None, tmp_path, platform={"tls_verify": False},
                                                         security={"allow": ["no_tls_verify"]}))
    proc = subprocess.run(scanbox + [str(config), "--secrets", str(secrets), "--quiet"], capture_output=True,
                          text=True)
    assert proc.returncode == 0 and proc.stderr.startswith("warning: platform.tls_verify"), proc.stderr


def test_every_network_listener_speaks_tls_beyond_loopback_and_the_usb_link(tmp_path):
    from agent.config import listeners

    config = validate(config_dict(None, tmp_path, api={"tcp": "0.0.0.0:7800", "http": "127.0.0.1:7801"},
                                  metrics={"listen": "10.20.3.41:9851"}))
    assert listeners(config) == [("api.tcp", "0.0.0.0:7800", True), ("api.http", "127.0.0.1:7801", False),
                                 ("metrics.listen", "10.20.3.41:9851", True)]


def test_an_old_metrics_port_config_still_loads_and_is_told_it_speaks_tls_now(tmp_path):
    """A config written when the metrics port was plain HTTP: read as before (now https on
    that address), and said at start and by `config check` until the site writes tls = "auto"."""
    scanbox = [sys.executable, "-m", "agent", "config", "check", "--quiet"]
    config, secrets = write_config(tmp_path, config_dict(None, tmp_path, metrics={"listen": "0.0.0.0:9851"}))
    proc = subprocess.run(scanbox + [str(config), "--secrets", str(secrets)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "metrics.listen = \"0.0.0.0:9851\" speaks TLS now" in proc.stderr and "docs/fleet.md" in proc.stderr
    config, secrets = write_config(tmp_path, config_dict(None, tmp_path, metrics={"listen": "0.0.0.0:9851",
                                                                                  "tls": "auto"}))
    proc = subprocess.run(scanbox + [str(config), "--secrets", str(secrets)], capture_output=True, text=True)
    assert proc.returncode == 0 and proc.stderr == "", proc.stderr
