"""The daemon's confinement written from the site's config at provisioning (agent/confine.py):
HID scanners in their own group, IPAddressAllow= from the config, MemoryDenyWriteExecute= off
only for a camera."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from agent import confine, provision
from agent.config import to_toml
from tests.appliance.test_systemd import UNITS, VENV_SCANBOX, systemd_analyze
from tests.appliance.test_udev import parse
from tests.conftest import config_dict, make_config

HID = {"driver": "hid", "devices": ["1EAB:1A03", "/dev/input/by-id/usb-Honeywell_Imaging*-event-kbd",
                                    "/dev/input/event7"]}


def test_the_sites_hid_scanners_get_the_scanner_group_and_nothing_else(tmp_path):
    config = make_config(None, tmp_path, sources={"counter": HID})
    rules = tmp_path / "71-scanbox-hid.rules"
    rules.write_text(confine.hid_rules(config), encoding="utf-8")
    parsed = [dict(((k, a), v) for k, a, _, v in tokens) for tokens in parse(rules)]
    assert [(r.get(("ATTRS", "idVendor")), r.get(("ATTRS", "idProduct")), r.get(("ENV", "ID_SERIAL")))
            for r in parsed] == [("1eab", "1a03", None), (None, None, "Honeywell_Imaging*")]
    assert {r[("GROUP", None)] for r in parsed} == {"scanbox-scanner"}
    assert all(r[("SUBSYSTEM", None)] == "input" for r in parsed)
    assert confine.hid_rules(make_config(None, tmp_path, sources={})) == ""


def test_the_shipped_rules_give_scanners_their_group_not_input():
    rules = [dict(((k, a), v) for k, a, _, v in tokens) for tokens in parse(UNITS / "70-scanbox.rules")]
    inputs = [r for r in rules if r.get(("SUBSYSTEM", None)) == "input" and ("GROUP", None) in r]
    assert inputs and {r[("GROUP", None)] for r in inputs} == {"scanbox-scanner"}
    assert all(r[("ENV", "ID_INPUT_KEYBOARD")] == "1" and ("ATTRS", "idVendor") in r for r in inputs)
    unit = (UNITS / "scanbox.service").read_text(encoding="utf-8")
    groups = re.search(r"^SupplementaryGroups=(.*)$", unit, re.MULTILINE).group(1).split()
    assert "scanbox-scanner" in groups and "input" not in groups
    assert re.search(r"^MemoryDenyWriteExecute=yes$", unit, re.MULTILINE)


def test_ip_addresses_allowed_are_the_sites(tmp_path):
    lan = make_config(None, tmp_path, platform={"endpoint": "https://10.20.30.40:8443/hcpde/services/x"},
                      api={"tcp": "0.0.0.0:7800", "trusted": ["10.1.2.0/24"]})
    allowed = confine.allowed_addresses(lan)
    assert allowed[:4] == ["localhost", "192.168.7.0/24", "10.20.30.40", "10.1.2.0/24"]
    assert "192.168.0.0/16" in allowed and "0.0.0.0/0" not in allowed
    usb_only = make_config(None, tmp_path, platform={"endpoint": "https://10.20.30.40:8443/x"},
                           api={"tcp": "192.168.7.1:7800"})
    assert confine.allowed_addresses(usb_only) == ["localhost", "192.168.7.0/24", "10.20.30.40"]
    by_name = make_config(None, tmp_path, platform={"endpoint": "https://live.fswsj.gov.cn/x"})
    assert confine.allowed_addresses(by_name) is None
    assert "IPAddressDeny" not in confine.drop_in(by_name)


def test_memory_deny_write_execute_is_off_only_with_a_camera(tmp_path):
    assert "MemoryDenyWriteExecute" not in confine.drop_in(make_config(None, tmp_path, sources={"counter": HID}))
    camera = make_config(None, tmp_path, sources={"cam": {"driver": "camera", "device": "/dev/video0"}})
    assert "MemoryDenyWriteExecute=no" in confine.drop_in(camera)


def test_the_unit_with_the_drop_in_is_valid_and_less_exposed(tmp_path):
    config = make_config(None, tmp_path, platform={"endpoint": "https://10.20.30.40:8443/x"},
                         api={"tcp": "0.0.0.0:7800"})
    here = str(Path(sys.executable).parent / "scanbox")
    shipped = (UNITS / "scanbox.service").read_text(encoding="utf-8").replace(VENV_SCANBOX, here)
    service = "\n".join(line for line in confine.drop_in(config).splitlines() if line != "[Service]")
    # a drop-in's [Service] lines come after the unit's own: the same as appending them
    unit = tmp_path / "scanbox.service"
    unit.write_text(shipped.replace("\n[Install]", "\n" + service + "\n\n[Install]"), encoding="utf-8")
    proc = subprocess.run([systemd_analyze(), "verify", "--man=no", str(unit)], capture_output=True, text=True,
                          cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr
    proc = subprocess.run([systemd_analyze(), "security", "--offline=true", str(unit)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=60)
    exposure = float(re.search(r"Overall exposure level for scanbox.service: ([0-9.]+)", proc.stdout).group(1))
    assert exposure <= 1.4, proc.stdout  # the shipped unit alone: 1.5 (its header, the README)
    assert "does not define an IP address allow list" not in proc.stdout


def test_provisioning_writes_both(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    boot = tmp_path / "boot"
    boot.mkdir()
    data = config_dict(None, tmp_path, sources={"counter": HID},
                       api={"clients": {"his": {"token": "his-token-0123456789"}}})
    data["platform"]["endpoint"] = "https://10.20.30.40:8443/x"
    del data["device"]["state_dir"]
    (boot / "scanbox.toml").write_text(to_toml(data), encoding="utf-8")
    assert provision.provision(boot / "scanbox.toml", root).ok
    assert "1eab" in (root / "etc/udev/rules.d/71-scanbox-hid.rules").read_text(encoding="utf-8")
    drop_in = (root / "etc/systemd/system/scanbox.service.d/50-provisioned.conf").read_text(encoding="utf-8")
    assert "IPAddressAllow=localhost 192.168.7.0/24 10.20.30.40\n" in drop_in
