"""agent/config.py and `scanbox config check`: what a technician sees when a config file is
right, wrong, or holds a secret in the wrong place."""

from __future__ import annotations

import os
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

import drivers.serial_scanner
from agent import cli, config, schema
from agent.config import MASK, ConfigError, QrRules, dump, load, parse_hostport, validate
from tests.conftest import SITE, config_dict

PASSWORD = "Pw-9f3k2-rhc"
TOKEN = "tok-7Hq2xZ-his-4c9e"

MAIN = """\
[device]
id = "box-1"
state_dir = "{state}"

[site]
org_code = "45600001X"
department = "5500"
hospital_code = "QH0001"
hospital_name = "西宁市第一人民医院"
city_code = "630100"
city_name = "西宁市"
channel = "02"
medstep = "010101"

[platform]
kind = "rhc"
endpoint = "https://rhc.example.cn/healthCard/services/RHCMessageServer"
timeout_s = 4

[platform.rhc]
org_id = "QH0001"
user_name = "scanbox"

[api]
tcp = "0.0.0.0:7800"
trusted = ["192.168.1.0/24"]

[api.clients.his]
scopes = ["read", "admin"]

[sources.counter]
driver = "serial_scanner"
port = "/dev/ttyACM0"
"""

SECRETS = f"""\
[platform.rhc]
user_pwd = "{PASSWORD}"

[api.clients.his]
token = "{TOKEN}"
"""


@pytest.fixture(autouse=True)
def no_system_secrets(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Never pick up /etc/scanbox/secrets.toml or a systemd credential of the machine."""
    monkeypatch.setattr(config, "DEFAULT_SECRETS", tmp_path / "no-such-dir" / "secrets.toml")
    monkeypatch.delenv("CREDENTIALS_DIRECTORY", raising=False)


def write(path: Path, text: str, mode: int = 0o600) -> Path:
    path.write_text(text, encoding="utf-8")
    path.chmod(mode)
    return path


@pytest.fixture
def main_file(tmp_path: Path) -> Path:
    return write(tmp_path / "scanbox.toml", MAIN.format(state=tmp_path / "state"), 0o644)


@pytest.fixture
def secrets_file(tmp_path: Path) -> Path:
    return write(tmp_path / "secrets.toml", SECRETS)


def problems(exc: ConfigError) -> dict[str, str]:
    out: dict[str, str] = {}
    for p in exc.problems:
        out[p.path] = (out[p.path] + " | " if p.path in out else "") + p.message
    return out


def load_error(main: Path, secrets: Path | None) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        load(main, secrets)
    return info.value


def validate_error(data: dict[str, Any]) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        validate(data)
    return info.value


def check(argv: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    rc = cli.main(["config", "check", *argv])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


# --- a good config ------------------------------------------------------------------------------

def test_valid_config_and_secrets_file_load(main_file: Path, secrets_file: Path) -> None:
    cfg = load(main_file, secrets_file)
    assert cfg.site.department == "5500"
    assert cfg.site.channel == "02"
    assert cfg.site.sam == "45600001X5500"
    assert cfg.platform.timeout_s == 4
    assert cfg.platform.rhc is not None
    assert cfg.platform.rhc.org_id == "QH0001"
    assert cfg.platform.rhc.user_pwd.get_secret_value() == PASSWORD
    assert cfg.api.clients["his"].token.get_secret_value() == TOKEN
    assert cfg.api.clients["his"].scopes == ["read", "admin"]
    assert parse_hostport(cfg.api.tcp or "") == ("0.0.0.0", 7800)
    # a source section becomes its driver's own options, defaults filled in
    counter = cfg.sources["counter"]
    assert isinstance(counter, drivers.serial_scanner.Options)
    assert counter.port == "/dev/ttyACM0"
    assert counter.baud == 9600


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_secrets_file_private_to_its_owner_is_accepted(main_file: Path, tmp_path: Path, mode: int) -> None:
    secrets = write(tmp_path / "secrets.toml", SECRETS, mode)
    try:
        cfg = load(main_file, secrets)
    finally:
        secrets.chmod(0o600)
    assert cfg.platform.rhc is not None and cfg.platform.rhc.user_pwd.get_secret_value() == PASSWORD


# --- everything wrong is reported at once, each with its key path ------------------------------

def test_every_problem_in_every_section_is_reported_at_once(tmp_path: Path, secrets_file: Path) -> None:
    main = write(tmp_path / "scanbox.toml", """\
[device]
log_level = "verbose"

[site]
department = "1234"
channel = "03"

[platform]
endpoint = "ftp://rhc.example.cn/x"
timeout_s = 0

[platform.rhc]
org_id = "QH0001"
app_code = "APP001"
user_name = "scanbox"

[api]
tcp = "localhost"

[scans]
dedupe_s = -1

[sources.counter]
driver = "serial_scanner"
baud = 1234
""")
    exc = load_error(main, secrets_file)
    found = problems(exc)
    assert set(found) == {
        "device.log_level", "site.department", "site.channel", "platform.endpoint",
        "platform.timeout_s", "platform.rhc", "api.tcp", "scans.dedupe_s",
        "sources.counter.port", "sources.counter.baud",
    }
    assert exc.source == str(main)
    # the exception's text lists every problem, one per line, path first
    lines = str(exc).splitlines()
    assert len(lines) == len(exc.problems)
    assert all(any(line.startswith(path + ": ") for line in lines) for path in found)


@pytest.mark.parametrize("sections, path, hint", [
    ({"platform": {"endpont": "http://x"}}, "platform.endpont", "endpoint"),
    ({"device": {"idd": "box"}}, "device.idd", "id"),
    ({"sitee": {}}, "sitee", "site"),
    ({"platform": {"rhc": {"org_id": "QH0001", "user_name": "u", "user_pwd": "p", "user_nme": "u"}}},
     "platform.rhc.user_nme", "user_name"),
    ({"platform": {"qr": {"max_lenght": 600}}}, "platform.qr.max_lenght", "max_length"),
    ({"api": {"unix_mod": "0600"}}, "api.unix_mod", "unix_mode"),
    ({"api": {"clients": {"his": {"token": TOKEN, "scope": ["read"]}}}}, "api.clients.his.scope", "scopes"),
    ({"scans": {"dedup_s": 1}}, "scans.dedup_s", "dedupe_s"),
])
def test_unknown_key_is_an_error_with_a_suggestion(tmp_path: Path, sections: dict[str, Any], path: str,
                                                  hint: str) -> None:
    found = problems(validate_error(config_dict(None, tmp_path, **sections)))
    assert found == {path: "unknown key (did you mean %r?)" % hint}


def test_unknown_key_without_a_near_match_has_no_suggestion(tmp_path: Path) -> None:
    found = problems(validate_error(config_dict(None, tmp_path, device={"colour": "blue"})))
    assert found == {"device.colour": "unknown key"}


def test_typo_in_the_main_file_is_reported_with_suggestion(tmp_path: Path, secrets_file: Path) -> None:
    text = MAIN.format(state=tmp_path / "state").replace("endpoint =", "endpont =")
    found = problems(load_error(write(tmp_path / "scanbox.toml", text), secrets_file))
    assert found["platform.endpont"] == "unknown key (did you mean 'endpoint'?)"
    assert found["platform.endpoint"] == "required"
    assert len(found) == 2


def test_source_options_are_validated_by_the_drivers_own_model(tmp_path: Path) -> None:
    data = config_dict(None, tmp_path, sources={
        "counter": {"driver": "serial_scanner", "prot": "/dev/ttyACM0", "baud": 1234, "parity": "X"},
        "kiosk": {"driver": "stdin", "charset": "utf-8", "chrset": "gbk"},
    })
    found = problems(validate_error(data))
    assert set(found) == {"sources.counter.prot", "sources.counter.port", "sources.counter.baud",
                          "sources.counter.parity", "sources.kiosk.chrset"}
    assert found["sources.counter.prot"] == "unknown key (did you mean 'port'?)"
    assert found["sources.counter.port"] == "required"
    assert "9600" in found["sources.counter.baud"] and "115200" in found["sources.counter.baud"]
    assert found["sources.kiosk.chrset"] == "unknown key (did you mean 'charset'?)"


def test_source_with_unknown_driver_gets_a_suggestion_and_the_known_drivers(tmp_path: Path) -> None:
    found = problems(validate_error(config_dict(None, tmp_path, sources={
        "counter": {"driver": "serial_scaner", "port": "/dev/ttyACM0"}})))
    assert list(found) == ["sources.counter.driver"]
    message = found["sources.counter.driver"]
    assert "unknown driver 'serial_scaner'" in message
    assert "did you mean 'serial_scanner'?" in message
    assert "serial_scanner" in message.split("known:")[1] and "stdin" in message.split("known:")[1]


def test_source_without_driver_is_an_error_listing_drivers(tmp_path: Path) -> None:
    found = problems(validate_error(config_dict(None, tmp_path, sources={
        "counter": {"port": "/dev/ttyACM0"}})))
    assert list(found) == ["sources.counter.driver"]
    assert found["sources.counter.driver"].startswith("required")
    assert "serial_scanner" in found["sources.counter.driver"]


def test_source_name_and_shape_are_checked(tmp_path: Path) -> None:
    found = problems(validate_error(config_dict(None, tmp_path, sources={
        "Front Desk": {"driver": "stdin"}, "kiosk": "stdin"})))
    assert "Front Desk" in found["sources"]
    assert found["sources.kiosk"] == "must be a table"


@pytest.mark.parametrize("sections, path", [
    ({"platform": {"tls_verify": 5}}, "platform.tls_verify"),
    ({"sources": {"counter": {"driver": "serial_scanner", "port": "/dev/ttyACM0", "terminator": 5}}},
     "sources.counter.terminator"),
])
def test_union_typed_key_is_reported_under_its_own_path(tmp_path: Path, sections: dict[str, Any],
                                                       path: str) -> None:
    exc = validate_error(config_dict(None, tmp_path, **sections))
    assert {p.path for p in exc.problems} == {path}


# --- secrets ------------------------------------------------------------------------------------

def test_secrets_in_the_main_file_are_errors(tmp_path: Path) -> None:
    text = MAIN.format(state=tmp_path / "state")
    text = text.replace('user_name = "scanbox"', 'user_name = "scanbox"\nuser_pwd = "%s"' % PASSWORD)
    text = text.replace('scopes = ["read", "admin"]', 'scopes = ["read"]\ntoken = "%s"' % TOKEN)
    main = write(tmp_path / "scanbox.toml", text)
    exc = load_error(main, None)
    found = problems(exc)
    assert set(found) == {"platform.rhc.user_pwd", "api.clients.his.token"}
    assert all("secret" in message and str(main) in message for message in found.values())
    assert PASSWORD not in str(exc) and TOKEN not in str(exc)


def test_non_secret_in_the_secrets_file_is_an_error(main_file: Path, tmp_path: Path) -> None:
    secrets = write(tmp_path / "secrets.toml", SECRETS + '\n[site]\nhospital_name = "x"\n')
    found = problems(load_error(main_file, secrets))
    assert list(found) == ["site.hospital_name"]
    assert "not a secret" in found["site.hospital_name"]


@pytest.mark.parametrize("mode", [0o644, 0o604, 0o666, 0o620])
def test_secrets_file_readable_or_writable_by_others_is_refused(main_file: Path, tmp_path: Path,
                                                                mode: int) -> None:
    secrets = write(tmp_path / "secrets.toml", SECRETS, mode)
    exc = load_error(main_file, secrets)
    assert len(exc.problems) == 1
    message = str(exc.problems[0])
    assert str(secrets) in message and "chmod 600" in message and "%04o" % mode in message
    assert PASSWORD not in str(exc)


def test_secrets_print_as_mask_in_dump_repr_and_str(main_file: Path, secrets_file: Path) -> None:
    cfg = load(main_file, secrets_file)
    out = dump(cfg)
    assert out["platform"]["rhc"]["user_pwd"] == MASK == "********"
    assert out["api"]["clients"]["his"]["token"] == MASK
    secret = cfg.platform.rhc.user_pwd if cfg.platform.rhc else None
    for text in (repr(cfg), str(cfg), repr(cfg.platform), str(out), "%s" % secret, f"{secret!r}", f"{secret}",
                 msgspec.json.encode(cfg, enc_hook=schema.encode_hook).decode(), str(msgspec.structs.asdict(cfg)),
                 str(schema.to_builtins(cfg))):
        assert PASSWORD not in text and TOKEN not in text
        assert MASK in text


def test_config_check_prints_the_effective_config_with_secrets_masked(
        main_file: Path, secrets_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rc, out, err = check([str(main_file), "--secrets", str(secrets_file)], capsys)
    assert rc == 0
    first, body = out.split("\n", 1)
    assert first == "%s: OK" % main_file
    assert PASSWORD not in out + err and TOKEN not in out + err
    assert 'user_pwd = "********"' in body.splitlines()
    assert 'token = "********"' in body.splitlines()
    # what it prints is the effective config as TOML (defaults filled in, unset keys left out)
    parsed = tomllib.loads(body)

    def without_none(value: Any) -> Any:
        if isinstance(value, dict):
            # TOML has no null: unset keys are left out (an empty table, no OneTrans apps, stays)
            return {k: without_none(v) for k, v in value.items() if v is not None}
        return value

    assert parsed == without_none(dump(load(main_file, secrets_file)))
    assert parsed["sources"]["counter"]["baud"] == 9600


def test_config_check_quiet_prints_nothing_on_success(main_file: Path, secrets_file: Path,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    assert check([str(main_file), "--secrets", str(secrets_file), "--quiet"], capsys) == (0, "", "")


def test_config_check_lists_every_problem_and_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = MAIN.format(state=tmp_path / "state")
    text = text.replace('user_name = "scanbox"', 'user_name = "scanbox"\nuser_pwd = "%s"' % PASSWORD)
    text = text.replace('channel = "02"', 'channel = "03"').replace('endpoint =', 'endpont =')
    main = write(tmp_path / "scanbox.toml", text)
    rc, out, err = check([str(main)], capsys)
    assert rc == 1
    assert out == ""
    lines = err.splitlines()
    assert lines[0] == "%s: 5 problems" % main
    assert sorted(line.split(":")[0].strip() for line in lines[1:]) == [
        "api.clients.his.token", "platform.endpoint", "platform.endpont", "platform.rhc.user_pwd",
        "site.channel"]
    assert "  platform.endpont: unknown key (did you mean 'endpoint'?)" in lines
    assert PASSWORD not in out + err


def test_scanbox_console_script_checks_a_config(main_file: Path, secrets_file: Path) -> None:
    scanbox = Path(sys.executable).parent / "scanbox"
    env = {k: v for k, v in os.environ.items() if k != "CREDENTIALS_DIRECTORY"}
    done = subprocess.run([str(scanbox), "config", "check", str(main_file), "--secrets", str(secrets_file)],
                          capture_output=True, text=True, timeout=30, env=env)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("%s: OK\n" % main_file)
    assert PASSWORD not in done.stdout + done.stderr and TOKEN not in done.stdout + done.stderr
    assert "********" in done.stdout


def test_credentials_directory_secrets_are_used_without_secrets_option(
        main_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    write(creds / "secrets.toml", SECRETS.replace(PASSWORD, "from-credential"), 0o400)
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = load(main_file)
    assert cfg.platform.rhc is not None
    assert cfg.platform.rhc.user_pwd.get_secret_value() == "from-credential"
    (creds / "secrets.toml").chmod(0o600)


def test_explicit_secrets_file_wins_over_credentials_directory(
        main_file: Path, secrets_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    creds = tmp_path / "creds"
    creds.mkdir()
    write(creds / "secrets.toml", SECRETS.replace(PASSWORD, "from-credential"))
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    cfg = load(main_file, secrets_file)
    assert cfg.platform.rhc is not None and cfg.platform.rhc.user_pwd.get_secret_value() == PASSWORD


def test_without_any_secrets_file_the_password_is_reported_missing(
        main_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(tmp_path))  # no secrets.toml in it
    found = problems(load_error(main_file, None))
    assert found == {"platform.rhc.user_pwd": "required", "api.clients.his.token": "required"}


# --- files that cannot be read ------------------------------------------------------------------

def file_problems(exc: ConfigError, path: Path) -> list[str]:
    """The problems that name a file (as their key path or in their message), as printed."""
    return [str(p) for p in exc.problems if str(path) in str(p)]


def test_toml_syntax_error_is_reported_with_the_file(tmp_path: Path, secrets_file: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    main = write(tmp_path / "scanbox.toml", '[site]\ndepartment = "5500\n')
    exc = load_error(main, secrets_file)
    assert exc.source == str(main)
    assert len(exc.problems) == 1
    [problem] = file_problems(exc, main)
    assert "not valid TOML" in problem and "line 2" in problem
    rc, out, err = check([str(main), "--secrets", str(secrets_file)], capsys)
    assert rc == 1 and out == ""
    assert str(main) in err and "not valid TOML" in err


def test_toml_syntax_error_in_secrets_file_names_that_file(main_file: Path, tmp_path: Path) -> None:
    secrets = write(tmp_path / "secrets.toml", '[platform.rhc]\nuser_pwd = "%s\n' % PASSWORD)
    exc = load_error(main_file, secrets)
    [problem] = file_problems(exc, secrets)
    assert "not valid TOML" in problem
    assert PASSWORD not in str(exc)


def test_missing_config_file_is_reported(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    exc = load_error(missing, None)
    assert len(exc.problems) == 1
    assert file_problems(exc, missing) == [str(exc.problems[0])]
    assert "no such file" in str(exc.problems[0])


def test_unreadable_secrets_file_does_not_hide_main_file_problems(tmp_path: Path) -> None:
    text = MAIN.format(state=tmp_path / "state").replace('channel = "02"', 'channel = "03"')
    main = write(tmp_path / "scanbox.toml", text)
    secrets = write(tmp_path / "secrets.toml", "[platform.rhc\n")
    exc = load_error(main, secrets)
    assert "site.channel" in problems(exc)
    assert len(file_problems(exc, secrets)) == 1
    missing = tmp_path / "missing-secrets.toml"
    exc = load_error(main, missing)
    assert "site.channel" in problems(exc)
    assert file_problems(exc, missing)


# --- values checked against the spec -------------------------------------------------------------

@pytest.mark.parametrize("site, ok", [
    ({"department": "5500"}, True),    # 挂号处
    ({"department": "5405"}, True),    # 内科药房, listed among the 中医科 rows
    ({"department": "0102"}, True),    # 计划免疫, the table's last row
    ({"department": "0000"}, True),    # no department
    ({"department": "1234"}, False),
    ({"department": "55"}, False),
    ({"channel": "99"}, True),
    ({"channel": "1"}, False),
    ({"channel": "03"}, False),
    ({"medstep": "010107"}, True),     # 手术
    ({"medstep": "000000"}, True),
    ({"medstep": "0101"}, False),      # the message tables' length 4 is not a code
    ({"medstep": "010108"}, False),
])
def test_site_codes_are_checked_against_spec_000_tables(tmp_path: Path, site: dict[str, str], ok: bool) -> None:
    data = config_dict(None, tmp_path, site=site)
    if ok:
        cfg = validate(data)
        key, value = next(iter(site.items()))
        assert getattr(cfg.site, key) == value
    else:
        found = problems(validate_error(data))
        assert list(found) == ["site.%s" % next(iter(site))]


def test_site_code_errors_list_the_valid_codes(tmp_path: Path) -> None:
    found = problems(validate_error(config_dict(None, tmp_path, site={"channel": "03", "medstep": "0101"})))
    assert "01 人工窗口" in found["site.channel"] and "02 自助机" in found["site.channel"]
    assert "010101 挂号" in found["site.medstep"]


@pytest.mark.parametrize("rhc, ok", [
    ({"org_id": "QH0001", "app_code": ""}, True),
    ({"org_id": "", "app_code": "APP001"}, True),
    ({"org_id": "QH0001", "app_code": "APP001"}, False),
    ({"org_id": "", "app_code": ""}, False),
])
def test_platform_rhc_needs_exactly_one_of_org_id_and_app_code(tmp_path: Path, rhc: dict[str, str], ok: bool) -> None:
    data = config_dict(None, tmp_path)
    data["platform"]["rhc"] = {"user_name": "scanbox", "user_pwd": "x", **rhc}
    if ok:
        assert validate(data).platform.rhc is not None
    else:
        found = problems(validate_error(data))
        assert list(found) == ["platform.rhc"]
        assert "org_id" in found["platform.rhc"] and "app_code" in found["platform.rhc"]


def test_platform_rhc_section_is_required_for_kind_rhc(tmp_path: Path) -> None:
    data = config_dict(None, tmp_path)
    del data["platform"]["rhc"]
    assert list(problems(validate_error(data))) == ["platform"]


@pytest.mark.parametrize("tcp", ["localhost", "host:70000", ":7800", "host:port", "host:-1", "7800",
                                 " :80", "a:b:80", "::1:80"])
def test_api_tcp_must_be_host_port(tmp_path: Path, tcp: str) -> None:
    found = problems(validate_error(config_dict(None, tmp_path, api={"tcp": tcp})))
    assert list(found) == ["api.tcp"]
    assert found["api.tcp"].startswith("%r is not HOST:PORT" % tcp)


@pytest.mark.parametrize("tcp, expected", [("127.0.0.1:7800", ("127.0.0.1", 7800)), ("[::1]:80", ("::1", 80)),
                                           ("box.local:0", ("box.local", 0))])
def test_api_tcp_accepts_hosts_and_bracketed_ipv6(tcp: str, expected: tuple[str, int]) -> None:
    from agent.config import parse_hostport

    assert parse_hostport(tcp) == expected


@pytest.mark.parametrize("tcp, parsed", [
    ("0.0.0.0:7800", ("0.0.0.0", 7800)),
    ("127.0.0.1:1", ("127.0.0.1", 1)),
    ("[::1]:7800", ("::1", 7800)),
    ("scanbox.local:65535", ("scanbox.local", 65535)),
])
def test_api_tcp_host_port_accepted(tmp_path: Path, tcp: str, parsed: tuple[str, int]) -> None:
    cfg = validate(config_dict(None, tmp_path, api={"tcp": tcp}))
    assert cfg.api.tcp == tcp
    assert parse_hostport(tcp) == parsed


def test_api_trusted_must_be_addresses_or_networks(tmp_path: Path) -> None:
    found = problems(validate_error(config_dict(None, tmp_path, api={"trusted": ["10.0.0.0/8", "his-pc"]})))
    assert found == {"api.trusted": "'his-pc' is not an IP address or network"}


def test_custom_qr_regexes_must_compile(tmp_path: Path) -> None:
    found = problems(validate_error(config_dict(None, tmp_path, platform={
        "qr": {"static": "^[0-9A-F{64}:1$", "temporary": "(?P<x"}})))
    assert set(found) == {"platform.qr.static", "platform.qr.temporary"}
    assert all(message.startswith("not a regular expression") for message in found.values())


def test_custom_qr_regexes_that_compile_are_kept(tmp_path: Path) -> None:
    cfg = validate(config_dict(None, tmp_path, platform={"qr": {"static": r"^[0-9A-Fa-f]{64}:1$"}}))
    assert cfg.platform.qr.static == r"^[0-9A-Fa-f]{64}:1$"
    assert cfg.platform.qr.dynamic == QrRules().dynamic


def test_config_from_conftest_site_is_valid(tmp_path: Path) -> None:
    cfg = validate(config_dict(None, tmp_path))
    assert schema.to_builtins(cfg.site) == SITE


def test_to_toml_round_trips_a_config_and_split_secrets_separates_them(tmp_path: Path) -> None:
    from agent.config import split_secrets, to_toml
    from tests.conftest import write_config

    data = config_dict(None, tmp_path, api={"clients": {"his": {"token": "t0k-5b1e9f3a-his", "scopes": ["read"]}}},
                       sources={"counter": {"driver": "serial_scanner", "port": "/dev/ttyACM0",
                                            "terminator": ["\r", "\n"], "charset": "gbk"}})
    public, secrets = split_secrets(data)
    assert secrets == {"platform": {"rhc": {"user_pwd": "scanbox-secret"}},
                       "api": {"clients": {"his": {"token": "t0k-5b1e9f3a-his"}}}}
    assert "user_pwd" not in to_toml(public) and "t0k-5b1e9f3a-his" not in to_toml(public)
    config_file, secrets_file = write_config(tmp_path, data)
    loaded = load(config_file, secrets_file)
    assert loaded.sources["counter"].terminator == ["\r", "\n"]
    assert loaded.site.hospital_name == "西宁市第一人民医院"
    assert loaded.api.clients["his"].token.get_secret_value() == "t0k-5b1e9f3a-his"
    assert tomllib.loads(to_toml(dump(loaded)))["site"] == dump(loaded)["site"]


def test_scanbox_version_says_the_version_agent_carries(capsys: pytest.CaptureFixture[str]) -> None:
    import agent
    with pytest.raises(SystemExit) as exc:
        cli.main(["--version"])
    assert exc.value.code == 0
    assert capsys.readouterr().out.strip() == "scanbox %s" % agent.__version__
