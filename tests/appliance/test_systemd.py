"""The systemd units: valid for systemd itself, hardened, and agreeing with the code they start."""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import pytest

from agent import cli, config as configuration, sealing

ROOT = Path(__file__).resolve().parents[2]
UNITS = ROOT / "systemd"
VENV_SCANBOX = "/opt/scanbox/venv/bin/scanbox"  # where image/stage-scanbox installs it
# scanbox.service explains (in its header) what the points above ~1.5 buy; more than this means
# a hardening line was lost
MAX_EXPOSURE = {"scanbox.service": 2.0, "scanbox-provision.service": 2.0}


def unit(name: str) -> dict[str, list[str]]:
    """A unit file as {Section.Key: [values]} (keys repeat: DeviceAllow=, ConditionPathExists=)."""
    out: dict[str, list[str]] = {}
    section = ""
    for line in (UNITS / name).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("["):
            section = line.strip("[]")
            continue
        key, _, value = line.partition("=")
        out.setdefault("%s.%s" % (section, key.strip()), []).append(value.strip())
    return out


def one(u: dict[str, list[str]], key: str) -> str:
    assert len(u[key]) == 1, key
    return u[key][0]


def credentials(u: dict[str, list[str]]) -> dict[str, str]:
    """LoadCredential= lines as {name: source}."""
    return dict(line.partition(":")[::2] for line in u["Service.LoadCredential"])


def systemd_analyze() -> str:
    path = shutil.which("systemd-analyze")
    assert path, "systemd-analyze comes with Debian's systemd package (bootstrap.sh installs it)"
    return path


@pytest.fixture
def runnable_units(tmp_path: Path) -> list[Path]:
    """The units with ExecStart= pointing at this checkout's scanbox: `verify` checks that the
    command exists, and /opt/scanbox is only there on a box."""
    here = Path(sys.executable).parent / "scanbox"
    assert here.exists()
    out = []
    for path in sorted(UNITS.glob("*.service")):
        copy = tmp_path / path.name
        copy.write_text(path.read_text(encoding="utf-8").replace(VENV_SCANBOX, str(here)), encoding="utf-8")
        out.append(copy)
    return out


def test_systemd_analyze_verify_accepts_the_units(runnable_units, tmp_path):
    assert [p.name for p in runnable_units] == ["scanbox-provision.service", "scanbox.service"]
    proc = subprocess.run([systemd_analyze(), "verify", "--man=no", *map(str, runnable_units)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stdout + proc.stderr


@pytest.mark.parametrize("name", sorted(MAX_EXPOSURE))
def test_exposure_stays_low(name, tmp_path):
    proc = subprocess.run([systemd_analyze(), "security", "--offline=true", str(UNITS / name)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    match = re.search(r"Overall exposure level for %s: ([0-9.]+)" % re.escape(name), proc.stdout)
    assert match, proc.stdout + proc.stderr
    assert float(match.group(1)) <= MAX_EXPOSURE[name], proc.stdout


def test_the_daemon_unit_is_notify_with_a_watchdog_and_a_start_limit():
    u = unit("scanbox.service")
    assert one(u, "Service.Type") == "notify"
    assert one(u, "Service.WatchdogSec") == "30s"
    assert one(u, "Service.Restart") == "on-failure"
    assert int(one(u, "Unit.StartLimitBurst")) >= 3 and int(one(u, "Unit.StartLimitIntervalSec")) > 0
    assert one(u, "Service.User") == "scanbox" and one(u, "Service.NoNewPrivileges") == "yes"
    assert one(u, "Service.CapabilityBoundingSet") == ""
    # no root, no DynamicUser (the device groups and the state's owner must be stable)
    assert "Service.DynamicUser" not in u


def test_the_command_line_is_one_the_cli_accepts():
    for name, command in (("scanbox.service", "run"), ("scanbox-provision.service", "provision")):
        argv = shlex.split(one(unit(name), "Service.ExecStart"))
        assert argv[0] == VENV_SCANBOX and argv[1] == command
        args = cli._parser().parse_args(argv[1:])
        assert args.func is not None
    run = cli._parser().parse_args(shlex.split(one(unit("scanbox.service"), "Service.ExecStart"))[1:])
    assert run.config == configuration.DEFAULT_CONFIG
    provision = unit("scanbox-provision.service")
    source = cli._parser().parse_args(shlex.split(one(provision, "Service.ExecStart"))[1:]).source
    assert provision["Unit.ConditionPathExists"] == [str(source)]


def test_state_socket_and_secrets_are_where_the_code_looks(monkeypatch, tmp_path):
    u = unit("scanbox.service")
    # what systemd sets from StateDirectory=, RuntimeDirectory= and LoadCredential=
    monkeypatch.setenv("STATE_DIRECTORY", "/var/lib/" + one(u, "Service.StateDirectory"))
    monkeypatch.setenv("RUNTIME_DIRECTORY", "/run/" + one(u, "Service.RuntimeDirectory"))
    config = configuration.validate({"platform": {"endpoint": "http://127.0.0.1:9/x", "rhc": {
        "org_id": "QH0001", "user_name": "u", "user_pwd": "p"}}})
    assert config.state_dir() == Path("/var/lib/scanbox")
    assert config.unix_socket() == Path("/run/scanbox/api.sock")
    assert Path(credentials(u)[configuration.CREDENTIAL_NAME]) == configuration.DEFAULT_SECRETS
    assert configuration.DEFAULT_CONFIG.parent == Path("/etc") / one(u, "Service.ConfigurationDirectory")
    # unconfigured: both files are needed (LoadCredential= fails the start on a missing file)
    assert sorted(u["Unit.ConditionPathExists"]) == sorted([str(configuration.DEFAULT_CONFIG),
                                                            str(configuration.DEFAULT_SECRETS)])
    # the socket's group is the unit's group (a local HIS joins it)
    assert config.api.unix_group == one(u, "Service.Group")
    # provisioning runs first
    assert "scanbox-provision.service" in one(u, "Unit.After").split()
    assert "scanbox.service" in one(unit("scanbox-provision.service"), "Unit.Before").split()


def test_a_credentials_directory_is_found_without_flags(monkeypatch, tmp_path):
    """`scanbox run --config FILE` with no --secrets, as the unit starts it."""
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / configuration.CREDENTIAL_NAME).write_text('[platform.rhc]\nuser_pwd = "from-credential"\n')
    (creds / configuration.CREDENTIAL_NAME).chmod(0o400)  # as systemd leaves it
    config = tmp_path / "scanbox.toml"
    config.write_text('[platform]\nendpoint = "http://127.0.0.1:9/x"\n[platform.rhc]\norg_id = "Q"\n'
                      'user_name = "u"\n')
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(creds))
    loaded = configuration.load(config)
    assert loaded.platform.rhc.user_pwd.get_secret_value() == "from-credential"


def test_the_device_groups_are_the_ones_udev_gives_the_devices():
    u = unit("scanbox.service")
    groups = set(one(u, "Service.SupplementaryGroups").split())
    rules = (ROOT / "systemd" / "70-scanbox.rules").read_text(encoding="utf-8")
    given = set(re.findall(r'GROUP="([a-z0-9_-]+)"', rules))
    assert given <= groups | {one(u, "Service.Group")}, given - groups
    assert {"dialout", "scanbox-scanner", "i2c", "spi", "video"} <= groups
    assert "input" not in groups  # every keyboard on the box
    assert one(u, "Service.DevicePolicy") == "closed"
    allowed = {v.split()[0] for v in u["Service.DeviceAllow"]}
    for major in ("char-ttyACM", "char-ttyUSB", "char-input", "char-i2c", "char-spi", "char-video4linux"):
        assert major in allowed


class UnitRun:
    """scanbox.service's commands as written, in the environment systemd gives them:
    STATE_DIRECTORY, RUNTIME_DIRECTORY, CREDENTIALS_DIRECTORY (the secrets only there), no paths
    in the config; the scanbox of this checkout in place of the image's."""

    def __init__(self, tmp_path: Path) -> None:
        from agent.config import split_secrets, to_toml
        from tests.conftest import config_dict

        self.unit = unit("scanbox.service")
        data = config_dict(None, tmp_path)
        del data["device"]["state_dir"], data["api"]["unix"], data["api"]["unix_group"]
        public, secrets = split_secrets(data)
        self.config = tmp_path / "etc" / "scanbox" / "scanbox.toml"
        self.config.parent.mkdir(parents=True)
        self.config.write_text(to_toml(public), encoding="utf-8")
        self.creds = tmp_path / "credentials"
        self.creds.mkdir()
        (self.creds / configuration.CREDENTIAL_NAME).write_text(to_toml(secrets), encoding="utf-8")
        (self.creds / configuration.CREDENTIAL_NAME).chmod(0o400)
        self.state = tmp_path / "var" / "lib" / one(self.unit, "Service.StateDirectory")
        self.runtime = tmp_path / "run" / one(self.unit, "Service.RuntimeDirectory")
        self.state.mkdir(parents=True)
        self.runtime.mkdir(parents=True)
        self.notify = tmp_path / "notify.sock"
        self.scanbox = str(Path(sys.executable).parent / "scanbox")

    def exec_start_pre(self, key_path: Path) -> tuple[str, subprocess.CompletedProcess[str]]:
        """ExecStartPre= (its prefix, and the command run with the key made at `key_path`)."""
        line = one(self.unit, "Service.ExecStartPre")
        command = line.lstrip("-+@:!")
        argv = shlex.split(command)
        assert argv[-1] == str(sealing.ETC_KEY)
        run = subprocess.run([self.scanbox] + argv[1:-1] + [str(key_path)], capture_output=True, text=True)
        return line[:len(line) - len(command)], run

    def load_credential(self, made: Path) -> None:
        """LoadCredential=store.key:/etc/scanbox/store.key, or SetCredential='s value when the
        file is missing (systemd's fallback)."""
        key_name, key_source = [(n, s) for n, s in credentials(self.unit).items()
                                if n != configuration.CREDENTIAL_NAME][0]
        assert key_name == sealing.KEY_NAME and Path(key_source) == sealing.ETC_KEY
        target = self.creds / key_name
        target.unlink(missing_ok=True)
        if made.is_file():
            target.write_bytes(made.read_bytes())
        else:
            fallback = dict(line.partition(":")[::2] for line in self.unit["Service.SetCredential"])
            target.write_text(fallback[key_name])
        target.chmod(0o400)

    def run(self, while_running: Callable[[], None] = lambda: None) -> str:
        """ExecStart= until READY=1, then `while_running`, then SIGTERM; its log."""
        from tests.appliance.test_watchdog import Systemd

        systemd = Systemd(self.notify)
        env = {k: v for k, v in os.environ.items() if k not in ("WATCHDOG_USEC", "WATCHDOG_PID")}
        env.update(NOTIFY_SOCKET=str(systemd.path), STATE_DIRECTORY=str(self.state),
                   RUNTIME_DIRECTORY=str(self.runtime), CREDENTIALS_DIRECTORY=str(self.creds))
        argv = shlex.split(one(self.unit, "Service.ExecStart"))
        argv = [self.scanbox] + [str(self.config) if a == str(configuration.DEFAULT_CONFIG) else a for a in argv[1:]]
        proc = subprocess.Popen(argv, env=env, stderr=subprocess.PIPE, text=True)
        try:
            systemd.wait_for("READY=1", 30)
            while_running()
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(10) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
            systemd.sock.close()
            self.notify.unlink(missing_ok=True)
        assert proc.stderr is not None
        return proc.stderr.read()

    def status(self) -> dict[str, Any]:
        with socket.socket(socket.AF_UNIX) as sock:
            sock.settimeout(10)
            sock.connect(str(self.runtime / "api.sock"))
            sock.sendall(b'{"jsonrpc": "2.0", "id": 1, "method": "status"}\n')
            answer = sock.makefile("rb").readline()
        return json.loads(answer)["result"]


def test_the_daemon_runs_as_the_unit_starts_it(tmp_path):
    run = UnitRun(tmp_path)
    # the store key, as ExecStartPre= makes it (as root) and LoadCredential= hands it over
    prefix, made = run.exec_start_pre(tmp_path / "etc" / "store.key")
    assert "+" in prefix and made.returncode == 0 and made.stdout.startswith("made")
    run.load_credential(tmp_path / "etc" / "store.key")

    def running() -> None:
        assert (run.runtime / "api.sock").is_socket()
        assert (run.state / "outbox.db").is_file()
        assert not (run.state / "store.key").exists()  # the key stays outside the state
        assert "STORE_KEY_BESIDE_DATA" not in {a["code"] for a in run.status()["alarms"]}
    log = run.run(running)
    assert "ready as test-box" in log and "api: listening on unix:%s" % (run.runtime / "api.sock") in log


def test_a_store_key_that_cannot_be_made_falls_back_to_the_set_credential_and_an_alarm(tmp_path, monkeypatch):
    """/etc/scanbox/store.key missing and impossible to make (a read-only or full /etc): the
    unit still starts (ExecStartPre='s failure is ignored: "-"), systemd hands over
    SetCredential='s "none", and the daemon keeps a key beside the data, with an alarm. Once the
    key can be made, the next start seals everything under it and deletes the one beside the data."""
    import asyncio
    import uuid

    from agent.model import UsageRecord
    from agent.outbox import Store

    run = UnitRun(tmp_path)
    unmakeable = tmp_path / "etc-read-only"
    unmakeable.write_text("a file where the key's directory should be\n")  # makes mkdir fail, root or not
    prefix, made = run.exec_start_pre(unmakeable / "store.key")
    assert made.returncode != 0 and str(unmakeable) in made.stderr  # the journal says why
    # systemd: a failing ExecStartPre= without "-" fails the start (Restart= tries 10 times, then
    # the box stays down), and SetCredential= would never be used
    assert "-" in prefix and "+" in prefix
    run.load_credential(unmakeable / "store.key")
    assert (run.creds / sealing.KEY_NAME).read_bytes() == sealing.NO_KEY

    def running_on_the_fallback() -> None:
        alarms = {a["code"]: a["text"] for a in run.status()["alarms"]}
        assert "STORE_KEY_BESIDE_DATA" in alarms and "journalctl -u scanbox" in alarms["STORE_KEY_BESIDE_DATA"]
    log = run.run(running_on_the_fallback)
    assert "ready as test-box" in log and "beside the data it protects" in log
    key = run.state / sealing.KEY_NAME
    assert key.is_file() and key.stat().st_mode & 0o777 == 0o600

    # a use recorded meanwhile, sealed under the key beside the data
    monkeypatch.setenv("CREDENTIALS_DIRECTORY", str(run.creds))
    record = UsageRecord(uuid.uuid4().hex, "RHC_E0009", {"name": "张晓明"}, "scan-1")

    async def record_a_use() -> int:
        store = Store(run.state / "outbox.db")
        await store.open()
        try:
            return await store.enqueue(record)
        finally:
            await store.close()
    record_id = asyncio.run(record_a_use())

    # /etc writable again: the next start makes the key, and the data moves under it
    prefix, made = run.exec_start_pre(tmp_path / "etc" / "store.key")
    assert made.returncode == 0
    run.load_credential(tmp_path / "etc" / "store.key")

    def running_on_the_credential() -> None:
        assert "STORE_KEY_BESIDE_DATA" not in {a["code"] for a in run.status()["alarms"]}
    run.run(running_on_the_credential)
    assert not key.exists()

    async def read_it() -> dict[str, Any] | None:
        store = Store(run.state / "outbox.db")
        await store.open()
        try:
            return (await store.get(record_id)).values
        finally:
            await store.close()
    assert asyncio.run(read_it()) == {"name": "张晓明"}
