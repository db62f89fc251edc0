"""First boot: `scanbox provision` against a temporary root, with the boot partition a directory."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import pytest

from agent import config as configuration, provision
from agent.config import to_toml
from agent.ui import Fonts, Screen, render
from tests.conftest import config_dict, until

SECRETS = ("scanbox-secret", "his-token-0123456789")


@pytest.fixture
def boot(tmp_path: Path) -> Path:
    path = tmp_path / "boot" / "firmware"
    path.mkdir(parents=True)
    return path


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "root"
    path.mkdir()
    return path


def technician_file(boot: Path, tmp_path: Path, **sections) -> Path:
    """What a technician writes on a PC: config and secrets in one file."""
    data = config_dict(None, tmp_path, api={"clients": {"his": {"token": SECRETS[1]}}}, **sections)
    del data["device"]["state_dir"]
    path = boot / "scanbox.toml"
    path.write_text(to_toml(data), encoding="utf-8")
    return path


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_a_good_file_is_installed_and_wiped_from_the_boot_partition(boot, root, tmp_path):
    source = technician_file(boot, tmp_path, device={"id": "counter-7"})
    size = source.stat().st_size
    peek = tmp_path / "peek"
    os.link(source, peek)  # the same blocks as the file on the card: they must not keep the password
    outcome = provision.provision(source, root)
    assert outcome.ok and outcome.note == ""
    etc = root / "etc" / "scanbox"
    assert sorted(p.name for p in etc.iterdir()) == ["scanbox.toml", "secrets.toml", "store.key"]  # no staging left
    assert mode(etc / "scanbox.toml") == 0o644 and mode(etc / "secrets.toml") == 0o600
    config_text = (etc / "scanbox.toml").read_text(encoding="utf-8")
    assert not any(s in config_text for s in SECRETS)
    # the daemon reads the pair back to the same configuration
    installed = configuration.load(etc / "scanbox.toml", etc / "secrets.toml")
    assert installed.device.id == "counter-7"
    assert installed.platform.rhc.user_pwd.get_secret_value() == SECRETS[0]
    assert installed.api.clients["his"].token.get_secret_value() == SECRETS[1]
    assert configuration.dump(installed) == configuration.dump(outcome.config)
    # the card: the file is gone, its bytes were overwritten, the settings stay without secrets
    assert not source.exists()
    assert peek.read_bytes() == b"\0" * size
    applied = (boot / provision.APPLIED_NAME).read_text(encoding="utf-8")
    assert "counter-7" in applied and not any(s in applied for s in SECRETS)
    assert configuration.split_secrets(tomllib.loads(applied)) == (tomllib.loads(applied), {})
    assert outcome.screen_lines() == ["counter-7", "西宁市第一人民医院"]
    # the box's TLS identity is made with it: key for its owner only, in the state directory
    key = root / "var" / "lib" / "scanbox" / "tls" / "box.key"
    assert mode(key) == 0o600 and mode(key.parent) == 0o700 and key.with_name("box.crt").is_file()


def test_names_that_need_quotes_in_toml_survive_the_install(boot, root, tmp_path):
    """A client named "front desk" and an app id with dots are quoted keys in TOML; the files
    provisioning writes must read back to the same names (tomli-w writes them)."""
    source = technician_file(boot, tmp_path)
    with source.open("a", encoding="utf-8") as fh:
        fh.write('\n[api.clients."front desk"]\ntoken = "desk-token-0123456789"\nscopes = ["read", "admin"]\n'
                 '\n[api.onetrans.apps."HIS.app.1"]\napp_key = "app-key-0123456789abcdef"\n')
    outcome = provision.provision(source, root)
    assert outcome.ok, outcome.note
    etc = root / "etc" / "scanbox"
    installed = configuration.load(etc / "scanbox.toml", etc / "secrets.toml")
    assert sorted(installed.api.clients) == ["front desk", "his"]
    assert installed.api.clients["front desk"].token.get_secret_value() == "desk-token-0123456789"
    assert installed.api.clients["front desk"].scopes == ["read", "admin"]
    assert list(installed.api.onetrans.apps) == ["HIS.app.1"]
    assert installed.api.onetrans.apps["HIS.app.1"].app_key.get_secret_value() == "app-key-0123456789abcdef"
    applied = tomllib.loads((boot / provision.APPLIED_NAME).read_text(encoding="utf-8"))
    assert applied["api"]["clients"]["front desk"] == {"scopes": ["read", "admin"]}


def test_a_bad_file_installs_nothing_and_says_what_is_wrong(boot, root, tmp_path):
    source = technician_file(boot, tmp_path, platform={"endpont": "http://x"}, site={"channel": "07"})
    before = source.read_bytes()
    outcome = provision.provision(source, root)
    assert not outcome.ok
    problems = [str(p) for p in outcome.problems]
    assert "platform.endpont: unknown key (did you mean 'endpoint'?)" in problems
    assert any(p.startswith("site.channel:") for p in problems)
    assert not (root / "etc" / "scanbox").exists()
    # the technician fixes it on the PC; the secrets do not stay on the card meanwhile
    after = source.read_bytes()
    assert not any(s.encode() in after for s in SECRETS)
    assert after == before.replace(SECRETS[0].encode(), provision.PLACEHOLDER.encode()).replace(
        SECRETS[1].encode(), provision.PLACEHOLDER.encode())
    error = (boot / provision.ERROR_NAME).read_bytes().decode("utf-8")
    assert "platform.endpont: unknown key" in error and "site.channel" in error and "\r\n" in error
    assert not any(s in error for s in SECRETS)
    assert "user_pwd" in error and "token" in error and "enter them again" in error
    assert outcome.screen_lines()[0] == problems[0]
    assert outcome.screen_lines()[1] == "+%d: %s" % (len(problems) - 1, provision.ERROR_NAME)


def test_a_file_that_is_not_even_toml_loses_its_secrets_and_a_placeholder_is_refused(boot, root, tmp_path):
    """Issue 15: a file with one typo stayed on the FAT partition with the platform password,
    the admin token and the OneTrans key in it."""
    source = boot / "scanbox.toml"
    source.write_text(
        '[platform\nendpoint = "http://127.0.0.1:9/x"\n[platform.rhc]\norg_id = "QH0001"\nuser_name = "u"\n'
        'user_pwd = "%s"   # from the hospital\n[api.clients]\nhis = { token = \'%s\', scopes = ["read"] }\n'
        '[api.onetrans.apps.his]\napp_key = """k3y-one-trans"""\n' % SECRETS, encoding="utf-8")
    outcome = provision.provision(source, root)
    assert not outcome.ok and "not valid TOML" in str(outcome.problems[0])
    text = source.read_text(encoding="utf-8")
    assert not any(s in text for s in (*SECRETS, "k3y-one-trans"))
    assert text.count(provision.PLACEHOLDER) == 3 and "# from the hospital" in text
    # fixed on the PC, but a secret not entered again: refused by name, nothing installed
    source.write_text(text.replace("[platform\n", "[platform]\n").replace(
        '"%s", scopes' % provision.PLACEHOLDER, '"%s", scopes' % SECRETS[1]).replace(
        "[api.onetrans.apps.his]\napp_key", "#"), encoding="utf-8")
    outcome = provision.provision(source, root)
    assert [str(p) for p in outcome.problems] == [
        "platform.rhc.user_pwd: this secret was removed from the card after a failed attempt: enter it again"]
    assert not (root / "etc" / "scanbox").exists()


def test_a_bad_file_leaves_a_configured_box_as_it_was(boot, root, tmp_path):
    first = provision.provision(technician_file(boot, tmp_path, device={"id": "old"}), root)
    assert first.ok
    etc = root / "etc" / "scanbox"
    old = {p.name: p.read_bytes() for p in etc.iterdir()}
    source = boot / "scanbox.toml"
    source.write_text(source.parent.joinpath(provision.APPLIED_NAME).read_text(encoding="utf-8")
                      + '\n[api.clients.his]\ntoken = "new-his-token-8e41"\n', encoding="utf-8")  # user_pwd forgotten
    outcome = provision.provision(source, root)
    assert not outcome.ok and [str(p) for p in outcome.problems] == ["platform.rhc.user_pwd: required"]
    assert {p.name: p.read_bytes() for p in etc.iterdir()} == old
    assert source.exists()


def test_a_new_file_replaces_the_old_configuration(boot, root, tmp_path):
    assert provision.provision(technician_file(boot, tmp_path, device={"id": "old"}), root).ok
    (boot / provision.ERROR_NAME).write_text("stale")
    assert provision.provision(technician_file(boot, tmp_path, device={"id": "new"}), root).ok
    etc = root / "etc" / "scanbox"
    assert configuration.load(etc / "scanbox.toml", etc / "secrets.toml").device.id == "new"
    # and the key that seals personal data at rest, root's alone
    assert mode(etc / "store.key") == 0o600 and len((etc / "store.key").read_bytes()) > 32
    assert not (boot / provision.ERROR_NAME).exists()


def test_notepad_files_a_byte_order_mark_is_fine_gbk_is_named(boot, root, tmp_path):
    source = technician_file(boot, tmp_path)
    text = source.read_text(encoding="utf-8")
    source.write_bytes(b"\xef\xbb\xbf" + text.replace("\n", "\r\n").encode("utf-8"))
    assert provision.provision(source, root).ok
    source.write_bytes(text.encode("gbk"))
    outcome = provision.provision(source, tmp_path / "other-root")
    assert not outcome.ok
    assert "not UTF-8" in str(outcome.problems[0]) and "GBK" in str(outcome.problems[0])


def test_leftovers_of_an_interrupted_install_are_cleared(boot, root, tmp_path):
    etc = provision.etc_dir(root)
    (etc / ".provision-crashed").mkdir(parents=True)
    (etc / ".provision-crashed" / "secrets.toml").write_text('[platform.rhc]\nuser_pwd = "old"\n')
    assert provision.provision(technician_file(boot, tmp_path), root).ok
    assert sorted(p.name for p in etc.iterdir()) == ["scanbox.toml", "secrets.toml", "store.key"]


def test_an_install_that_cannot_write_changes_nothing(boot, root, tmp_path):
    source = technician_file(boot, tmp_path)
    (root / "etc").mkdir()
    (root / "etc" / "scanbox").write_text("not a directory")
    outcome = provision.provision(source, root)
    assert not outcome.ok and "nothing changed" in outcome.note
    assert source.exists() and (boot / provision.ERROR_NAME).exists()


def test_no_file_is_nothing_to_provision(boot, root):
    outcome = provision.provision(boot / "scanbox.toml", root)
    assert not outcome.ok and outcome.note == "nothing to provision"
    assert list(boot.iterdir()) == []


def test_the_outcome_is_drawn_on_the_display(boot, root, tmp_path):
    source = technician_file(boot, tmp_path, device={"id": "counter-7"}, display={"model": "dummy"})
    options = provision.display_options(source, provision.etc_dir(root))
    assert options is not None and options.model == "dummy"
    device = provision.show(provision.provision(source, root), options)
    fonts = Fonts(options.font)
    expected = render(Screen("provisioning", title="provisioned", lines=("counter-7", "西宁市第一人民医院")),
                      options.size, fonts)
    assert device.image.convert("1").tobytes() == expected.tobytes()


def test_a_broken_file_still_finds_its_display(boot, root, tmp_path):
    source = technician_file(boot, tmp_path, display={"model": "dummy", "height": 32}, platform={"endpoint": 5})
    options = provision.display_options(source, provision.etc_dir(root))
    assert options is not None and options.height == 32
    outcome = provision.provision(source, root)
    device = provision.show(outcome, options)
    expected = render(Screen("provisioning", title="provision_failed", lines=tuple(outcome.screen_lines())),
                      (128, 32), Fonts(None))
    assert device.image.convert("1").tobytes() == expected.tobytes()


def test_the_command_reports_to_the_journal_and_exits_non_zero_on_failure(boot, root, tmp_path):
    source = technician_file(boot, tmp_path, platform={"endpont": "http://x"})
    argv = [sys.executable, "-m", "agent", "provision", "--from", str(source), "--root", str(root)]
    bad = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert bad.returncode == 1
    assert "platform.endpont: unknown key" in bad.stderr and "nothing installed" in bad.stderr
    assert not any(s in bad.stderr for s in SECRETS)
    technician_file(boot, tmp_path, device={"id": "counter-9"})
    good = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    assert good.returncode == 0, good.stderr
    assert "provisioned counter-9" in good.stderr
    assert (root / "etc" / "scanbox" / "secrets.toml").exists() and not source.exists()
    # for the daemon, which starts next
    assert provision.recent_outcome(root / "run" / "scanbox-provision" / "outcome.json") == (
        True, ["counter-9", "西宁市第一人民医院"])


async def test_the_daemon_starting_after_provisioning_shows_the_outcome(box, tmp_path, monkeypatch):
    """On success the daemon starts at once and takes the screen over: it shows the outcome first."""
    outcome = provision.Outcome(False, [configuration.ConfigProblem("platform.endpoint", "required")])
    saved = tmp_path / "run" / "outcome.json"
    provision.save_outcome(outcome, saved)
    monkeypatch.setattr(provision, "OUTCOME_FILE", saved)
    await box.start(sources={}, display={"model": "dummy"})
    await until(lambda: box.daemon.ui.screen is not None and box.daemon.display.device is not None)
    screen = box.daemon.ui.screen
    assert (screen.kind, screen.title, screen.lines) == ("provisioning", "provision_failed",
                                                         ("platform.endpoint: required",))


def test_an_old_outcome_is_not_shown_again(tmp_path):
    saved = tmp_path / "outcome.json"
    provision.save_outcome(provision.Outcome(True, config=None, note=""), saved)
    assert provision.recent_outcome(saved) is not None
    old = time.time() - provision.OUTCOME_FRESH_S - 1
    os.utime(saved, (old, old))
    assert provision.recent_outcome(saved) is None
    saved.write_text("not json")
    assert provision.recent_outcome(saved) is None
    assert provision.recent_outcome(tmp_path / "none.json") is None
