"""The udev rules: systemd 252 has no `udevadm verify` (254 does), so the rules are parsed here
with udev's own grammar (udev(7)): every key known, every operator one the key takes, every
value quoted, the substitutions ones udev knows."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
RULES = sorted((ROOT / "systemd").glob("*.rules"))

# udev(7): keys that only match, keys that only assign, keys that do both
MATCH = {"ACTION", "DEVPATH", "KERNEL", "NAME", "SYMLINK", "SUBSYSTEM", "DRIVER", "KERNELS", "SUBSYSTEMS",
         "DRIVERS", "TAG", "TAGS", "PROGRAM", "RESULT", "TEST", "CONST", "ATTR", "SYSCTL", "ATTRS", "ENV"}
ASSIGN = {"NAME", "SYMLINK", "OWNER", "GROUP", "MODE", "SECLABEL", "ATTR", "SYSCTL", "ENV", "TAG", "RUN",
          "LABEL", "GOTO", "IMPORT", "OPTIONS"}
WITH_ATTR = {"ATTR", "ATTRS", "ENV", "SYSCTL", "TEST", "SECLABEL", "RUN", "IMPORT", "CONST"}
TOKEN = re.compile(r'\s*([A-Z]+)(?:\{([^}]*)\})?\s*(==|!=|\+=|-=|:=|=)\s*"((?:[^"\\]|\\.)*)"\s*(,|$)')
SUBSTITUTION = re.compile(r"\$(?:env\{[A-Za-z0-9_.]+\}|attr\{[^}]+\}|kernel|number|devpath|id|driver|major|minor|"
                          r"result|parent|name|links|root|sys|devnode|\$)|%[knpbMmcPNrSs%]|%c\{[0-9+]+\}|"
                          r"%s\{[^}]+\}|%E\{[^}]+\}")


def parse(path: Path) -> list[list[tuple[str, str | None, str, str]]]:
    rules = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        assert not line.endswith("\\"), "%s:%d: no continuation lines here" % (path.name, number)
        tokens, pos = [], 0
        while pos < len(line):
            m = TOKEN.match(line, pos)
            assert m, "%s:%d: cannot parse from column %d: %r" % (path.name, number, pos, line[pos:])
            key, attr, op, value, _ = m.groups()
            where = "%s:%d: %s" % (path.name, number, key)
            if op in ("==", "!="):
                assert key in MATCH, "%s cannot be matched" % where
            else:
                assert key in ASSIGN, "%s cannot be assigned" % where
            assert (attr is not None) == (key in WITH_ATTR) or key in ("IMPORT", "RUN"), "%s{...}" % where
            stripped = SUBSTITUTION.sub("", value)
            assert "$" not in stripped and "%" not in stripped, "%s: unknown substitution in %r" % (where, value)
            tokens.append((key, attr, op, value))
            pos = m.end()
        assert any(op in ("==", "!=") for _, _, op, _ in tokens), "%s:%d: matches nothing" % (path.name, number)
        assert any(op not in ("==", "!=") for _, _, op, _ in tokens), "%s:%d: does nothing" % (path.name, number)
        rules.append(tokens)
    return rules


@pytest.mark.parametrize("path", RULES, ids=lambda p: p.name)
def test_rules_parse_with_udevs_grammar(path):
    assert parse(path)


def test_the_parser_catches_what_udev_rejects(tmp_path):
    for bad in ('SUBSYSTEM="tty", GROUP="dialout"',           # assignment where a match was meant
                'SUBSYSTEM=="tty", GROUP=="dialout"',          # a match where an assignment was meant
                'SUBSYSTEM=="tty", GROUP=dialout',             # unquoted
                'SUBSYSTEM=="tty", SYMLINK+="x-$envv{A}"',     # a substitution udev does not know
                'SUBSYSTEM=="tty", ENV="x"'):                  # ENV needs its {NAME}
        rules = tmp_path / "bad.rules"
        rules.write_text(bad + "\n")
        with pytest.raises(AssertionError):
            parse(rules)


def test_every_device_class_gets_a_group_and_usb_devices_a_socket_name():
    rules = [dict(((k, a), v) for k, a, _, v in tokens) for tokens in parse(ROOT / "systemd" / "70-scanbox.rules")]
    groups = {r[("SUBSYSTEM", None)]: r[("GROUP", None)] for r in rules if ("GROUP", None) in r}
    assert groups == {"tty": "dialout", "input": "scanbox-scanner", "i2c-dev": "i2c", "spidev": "spi", "gpio": "gpio",
                      "bcm2835-gpiomem": "gpio", "video4linux": "video", "media": "video", "dma_heap": "video"}
    links = [r[("SYMLINK", None)] for r in rules if ("SYMLINK", None) in r]
    assert all(link.startswith("scanbox/") for link in links)
    for kind in ("serial", "scanner", "idcard", "hid", "camera"):
        named = [link for link in links if link.startswith("scanbox/%s-" % kind)]
        assert named and all("%b" in link for link in named), kind  # by USB socket
    bridges = {(r[("ATTRS", "idVendor")], r[("ATTRS", "idProduct")]) for r in rules
               if ("ATTRS", "idVendor") in r and r[("SUBSYSTEM", None)] == "tty"}
    assert {v for v, _ in bridges} == {"1a86", "067b", "10c4", "0403"}  # CH340, PL2303, CP210x, FTDI
