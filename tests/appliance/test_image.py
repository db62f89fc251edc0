"""The pi-gen stage: the build itself needs root, a Pi OS chroot and an hour, so it does not run
here; what can be checked without it is: pi-gen's layout (it silently skips what it does not
recognise, and a step script without its executable bit), shellcheck on every script, and that
every file a step installs is there."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
IMAGE = ROOT / "image"
STAGE = IMAGE / "stage-scanbox"
STEP_FILE = re.compile(r"[0-9]{2}-(packages|packages-nr|debconf|run\.sh|run-chroot\.sh)")


def shell_scripts() -> list[Path]:
    # and the QEMU boot test's build (image/qemu: build-base, build-root, run-stage)
    scripts = [IMAGE / "build.sh"] + sorted(p for p in (IMAGE / "qemu").iterdir()
                                            if p.is_file() and p.read_bytes().startswith(b"#!/bin/bash"))
    for path in sorted(STAGE.rglob("*")):
        if path.is_file() and (path.suffix == ".sh" or path.read_bytes().startswith(b"#!")):
            scripts.append(path)
    return scripts


def steps() -> list[Path]:
    return sorted(p for p in STAGE.iterdir() if p.is_dir())


def test_the_stage_has_pi_gens_layout():
    assert sorted(p.name for p in STAGE.iterdir() if p.is_file()) == ["EXPORT_IMAGE", "prerun.sh"]
    assert [p.name for p in steps()] == ["00-scanbox", "01-usb-gadget", "02-readonly-root"]
    for step in steps():
        assert re.fullmatch(r"[0-9]{2}-[a-z0-9-]+", step.name), step
        for entry in step.iterdir():
            if entry.is_dir():
                assert entry.name == "files" or re.fullmatch(r"[0-9]{2}-patches", entry.name), entry
            else:
                assert STEP_FILE.fullmatch(entry.name), "pi-gen ignores %s" % entry.relative_to(ROOT)


def test_every_script_is_executable():
    """pi-gen runs NN-run.sh and prerun.sh only if they are executable, and says nothing if not."""
    for script in shell_scripts():
        assert script.stat().st_mode & 0o111 == 0o111, "chmod +x %s" % script.relative_to(ROOT)


def test_shellcheck_passes_on_every_script():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is a Debian package that bootstrap.sh installs"
    scripts = shell_scripts()
    assert len(scripts) >= 10
    proc = subprocess.run([shellcheck, "--external-sources", "--format=gcc", *map(str, scripts)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_every_file_a_step_installs_exists():
    missing = []
    for step in steps():
        for script in step.glob("*.sh"):
            text = script.read_text(encoding="utf-8")
            for name in re.findall(r"\bfiles/([A-Za-z0-9._-]+)", text):
                if not (step / "files" / name).is_file():
                    missing.append("%s: files/%s" % (script.relative_to(ROOT), name))
            for rel in re.findall(r"\$\{SCANBOX_SRC\}/([A-Za-z0-9._/-]+)", text):
                if not (ROOT / rel).is_file():
                    missing.append("%s: %s" % (script.relative_to(ROOT), rel))
        # and nothing in files/ is forgotten
        used = "\n".join(s.read_text(encoding="utf-8") for s in step.glob("*.sh"))
        for path in (step / "files").iterdir() if (step / "files").is_dir() else ():
            assert "files/%s" % path.name in used, "%s is not installed" % path.relative_to(ROOT)
    assert missing == []


def test_every_unit_and_rule_in_systemd_is_installed():
    text = (STAGE / "00-scanbox" / "01-run.sh").read_text(encoding="utf-8")
    for path in (ROOT / "systemd").iterdir():
        assert "${SCANBOX_SRC}/systemd/%s" % path.name in text, "%s is not in the image" % path.name
    chroot = (STAGE / "00-scanbox" / "02-run-chroot.sh").read_text(encoding="utf-8")
    assert "systemctl enable scanbox-provision.service scanbox.service" in chroot
    # the daemon's user gets the unit's device groups
    unit = (ROOT / "systemd" / "scanbox.service").read_text(encoding="utf-8")
    groups = re.search(r"^SupplementaryGroups=(.*)$", unit, re.M).group(1).split()
    assert "usermod --append --groups %s scanbox" % ",".join(groups) in chroot
    # the venv sees Raspberry Pi OS's picamera2 and libcamera, and lives where the units look
    assert "python3 -m venv --system-site-packages /opt/scanbox/venv" in chroot
    assert "ExecStart=/opt/scanbox/venv/bin/scanbox " in unit


def test_the_packages_are_names():
    for listing in STAGE.rglob("[0-9][0-9]-packages*"):
        for line in listing.read_text(encoding="utf-8").splitlines():
            if line.strip() and not line.startswith("#"):
                assert re.fullmatch(r"[a-z0-9][a-z0-9.+-]+", line.strip()), line
    names = (STAGE / "00-scanbox" / "00-packages-nr").read_text(encoding="utf-8").split()
    assert {"python3-venv", "python3-picamera2", "fonts-wqy-zenhei"} <= set(names)


def test_the_read_only_roots_data_partition_holds_what_must_last():
    fstab = (STAGE / "02-readonly-root" / "files" / "fstab-data").read_text(encoding="utf-8")
    entries = [line.split() for line in fstab.splitlines() if line.strip() and not line.startswith("#")]
    assert all(len(e) == 6 for e in entries)
    binds = {e[1]: e[0] for e in entries if "bind" in e[3]}
    assert binds == {"/etc/scanbox": "/data/etc-scanbox", "/var/lib/scanbox": "/data/state",
                     "/var/log/journal": "/data/journal"}
    build = (IMAGE / "build.sh").read_text(encoding="utf-8")
    for source in binds.values():
        assert '"${BUILD_DIR}/data/%s"' % source.removeprefix("/data/") in build, source
    assert "mkfs.ext4 -q -L scanbox-data" in build and entries[0][0] == "LABEL=scanbox-data"


@pytest.mark.parametrize("name", ["scanbox-grow-data.service", "scanbox-readonly.service"])
def test_the_images_own_units_verify(name, tmp_path):
    text = (STAGE / "02-readonly-root" / "files" / name).read_text(encoding="utf-8")
    unit = tmp_path / name
    unit.write_text(re.sub(r"ExecStart=\S+", "ExecStart=/bin/true", text), encoding="utf-8")
    proc = subprocess.run([shutil.which("systemd-analyze") or "systemd-analyze", "verify", "--man=no", str(unit)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=60)
    assert proc.returncode == 0 and proc.stderr.strip() == "", proc.stderr


PI_GEN_FSTAB = """proc            /proc           proc    defaults          0       0
PARTUUID=1a2b3c4d-01  /boot/firmware  vfat    defaults          0       2
PARTUUID=1a2b3c4d-02  /               ext4    defaults,noatime  0       1
"""


def test_the_boot_partition_is_mounted_readable_by_root_only(tmp_path):
    """Issue 15: the FAT partition, where the technician's file waits with its secrets, was
    mounted with pi-gen's defaults: readable by every user."""
    (tmp_path / "etc").mkdir()
    fstab = tmp_path / "etc" / "fstab"
    fstab.write_text(PI_GEN_FSTAB)
    step = STAGE / "00-scanbox" / "03-run.sh"
    for _ in range(2):  # pi-gen may run a step again on a rebuild
        subprocess.run([str(step)], env={"ROOTFS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}, check=True)
    boot = [line.split() for line in fstab.read_text().splitlines() if " /boot/firmware " in line]
    assert boot == [["PARTUUID=1a2b3c4d-01", "/boot/firmware", "vfat",
                     "defaults,uid=0,gid=0,fmask=0177,dmask=0077", "0", "2"]]
    # an fstab the step does not understand fails the build instead of shipping a readable card
    fstab.write_text("LABEL=bootfs /boot vfat defaults 0 2\n")
    assert subprocess.run([str(step)], env={"ROOTFS_DIR": str(tmp_path), "PATH": "/usr/bin:/bin"}).returncode != 0
