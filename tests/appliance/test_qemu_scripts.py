"""The QEMU boot test's own parts, cheaply (the boot test itself, image/qemu/run-boot-test, builds
an arm64 root and boots it: too long for CI, README "Boot test"):

- image/qemu/run-stage runs a stage with pi-gen's semantics (order, SKIP, the executable bit,
  chroot scripts on stdin, pi-gen's variables and copy_previous), leaving out and naming the
  Raspberry Pi OS-only packages;
- the real image/stage-scanbox, run by it on a stand-in root with the chroot faked, installs the
  units, rules, wheel and boot-partition files, and asks apt for Debian's evdev and pyscard;
- every package the stage asks for is in Debian 12, or is listed as Raspberry Pi OS-only;
- the technician's file the boot test puts on the boot partition is one `scanbox provision` takes.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from agent import provision

ROOT = Path(__file__).resolve().parents[2]
QEMU = ROOT / "image" / "qemu"
STAGE = ROOT / "image" / "stage-scanbox"

# the fake chroot: each script it is given (stdin) is recorded and run by bash -e on the host
FAKE_CHROOT = """#!/bin/bash
set -e
script="$(cat)"
printf '%s\\n---\\n' "$script" >> "${ROOTFS_DIR}/../chroot.log"
echo "chroot" >> "${ROOTFS_DIR}/../events"
if [ -z "${FAKE_CHROOT_RECORD_ONLY:-}" ]; then
    (cd "${ROOTFS_DIR}" && bash -e -c "$script")
fi
"""


def pi_only() -> set[str]:
    text = (QEMU / "pi-only-packages").read_text(encoding="utf-8")
    return {line.split("#")[0].strip() for line in text.splitlines() if line.split("#")[0].strip()}


def run_stage(stage: Path, prev: Path, work: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    fake = tmp_path / "fake-chroot"
    fake.write_text(FAKE_CHROOT)
    fake.chmod(0o755)
    return subprocess.run([str(QEMU / "run-stage"), str(stage), str(prev), str(work)], capture_output=True,
                          text=True, timeout=120, env={**os.environ, "RUN_STAGE_CHROOT": str(fake), **env})


def make_stage(base: Path) -> Path:
    stage = base / "stage-test"
    (stage / "00-first").mkdir(parents=True)
    (stage / "01-skipped").mkdir()
    (stage / "02-second").mkdir()
    (stage / "prerun.sh").write_text('#!/bin/bash -e\n[ -d "${ROOTFS_DIR}" ] || copy_previous\n'
                                     'echo prerun >> "${STAGE_WORK_DIR}/events"\n')
    first = stage / "00-first"
    (first / "00-packages-nr").write_text("# a comment\npython3-venv python3-picamera2\n"
                                          "fonts-wqy-zenhei  # trailing\npython3-rpi-lgpio\n")
    (first / "01-run.sh").write_text('#!/bin/bash -e\necho "run $(basename "$PWD") ${SUB_STAGE_DIR##*/} '
                                     '${STAGE_WORK_DIR##*/}" >> "${STAGE_WORK_DIR}/events"\n'
                                     'test -f "${ROOTFS_DIR}/from-previous"\n')
    (first / "02-run-chroot.sh").write_text('echo "in chroot: $(cat from-previous)" > chroot-ran\n')
    (stage / "01-skipped" / "SKIP").write_text("")
    (stage / "01-skipped" / "00-run.sh").write_text('#!/bin/bash -e\necho skipped >> "${STAGE_WORK_DIR}/events"\n')
    second = stage / "02-second"
    # not executable: pi-gen does not run it, and says nothing
    (second / "00-run.sh").write_text('#!/bin/bash -e\necho not-executable >> "${STAGE_WORK_DIR}/events"\n')
    (second / "01-packages").write_text("raspi-config\n")  # only Pi-only: no apt-get at all
    (second / "03-run.sh").write_text('#!/bin/bash -e\necho "second ${STAGE}" >> "${STAGE_WORK_DIR}/events"\n')
    for script in (stage / "prerun.sh", first / "01-run.sh", stage / "01-skipped" / "00-run.sh", second / "03-run.sh"):
        script.chmod(0o755)
    return stage


def test_run_stage_has_pi_gens_order_and_semantics(tmp_path):
    stage = make_stage(tmp_path)
    prev = tmp_path / "prev"
    prev.mkdir()
    (prev / "from-previous").write_text("base")
    work = tmp_path / "work"
    proc = run_stage(stage, prev, work, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    events = (work / "stage-test" / "events").read_text().split("\n")
    assert events == ["prerun", "chroot", "run 00-first 00-first stage-test", "chroot", "second stage-test", ""]
    rootfs = work / "stage-test" / "rootfs"
    assert (rootfs / "chroot-ran").read_text() == "in chroot: base\n"  # copy_previous, then the chroot
    scripts = (work / "stage-test" / "chroot.log").read_text().split("\n---\n")
    apt = scripts[0].strip()
    assert apt.endswith("apt-get -o Acquire::Retries=3 install --no-install-recommends -y python3-venv "
                        "fonts-wqy-zenhei"), apt
    assert "picamera2" not in apt and "lgpio" not in apt and "#" not in apt
    # the left-out packages are named, per file
    output = proc.stdout + proc.stderr
    assert "00-packages-nr: skipped under QEMU (Raspberry Pi OS only): python3-picamera2 python3-rpi-lgpio" in output
    assert "01-packages: skipped under QEMU (Raspberry Pi OS only): raspi-config" in output
    assert "skipped" not in events and "not-executable" not in events


def test_run_stage_stops_at_a_failing_step(tmp_path):
    stage = make_stage(tmp_path)
    (stage / "00-first" / "02-run-chroot.sh").write_text("false\necho after >> chroot-ran\n")
    prev = tmp_path / "prev"
    prev.mkdir()
    (prev / "from-previous").write_text("base")
    work = tmp_path / "work"
    proc = run_stage(stage, prev, work, tmp_path)
    assert proc.returncode != 0
    assert not (work / "stage-test" / "rootfs" / "chroot-ran").exists()  # bash -e, as pi-gen's capsh -- -e
    assert "second" not in (work / "stage-test" / "events").read_text()


def test_run_stage_refuses_quilt_patches_loudly(tmp_path):
    stage = make_stage(tmp_path)
    (stage / "02-second" / "00-patches").mkdir()
    prev = tmp_path / "prev"
    prev.mkdir()
    (prev / "from-previous").write_text("base")
    proc = run_stage(stage, prev, tmp_path / "work", tmp_path)
    assert proc.returncode != 0
    assert "quilt patches are not supported" in proc.stdout + proc.stderr


def test_the_scanbox_stage_through_the_runner(tmp_path):
    """The real stage's host steps on a stand-in for Raspberry Pi OS Lite's root; its chroot steps
    recorded, not run (they need arm64 and apt: the boot test runs them)."""
    prev = tmp_path / "lite"
    for directory in ("etc/systemd/system", "etc/udev/rules.d", "boot/firmware"):
        (prev / directory).mkdir(parents=True)
    (prev / "boot/firmware/config.txt").write_text("[all]\n")
    (prev / "etc/modules").write_text("")
    (prev / "etc/fstab").write_text("proc /proc proc defaults 0 0\n"
                                    "PARTUUID=abcdef01-01 /boot/firmware vfat defaults 0 2\n")
    dist = tmp_path / "dist"
    dist.mkdir()
    (dist / "scanbox-0.1.0-py3-none-any.whl").write_bytes(b"PK")
    work = tmp_path / "work"
    proc = run_stage(STAGE, prev, work, tmp_path, SCANBOX_SRC=str(ROOT), SCANBOX_DIST=str(dist),
                     FAKE_CHROOT_RECORD_ONLY="1", SCANBOX_USB_GADGET="0", SCANBOX_READONLY_ROOT="0")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rootfs = work / "stage-scanbox" / "rootfs"
    for path in ("etc/systemd/system/scanbox.service", "etc/systemd/system/scanbox-provision.service",
                 "etc/udev/rules.d/70-scanbox.rules", "opt/scanbox/dist/scanbox-0.1.0-py3-none-any.whl",
                 "opt/scanbox/docs/technician.md", "boot/firmware/scanbox.toml.example",
                 "etc/systemd/journald.conf.d/scanbox.conf"):
        assert (rootfs / path).is_file(), path
    assert "dtparam=i2c_arm=on" in (rootfs / "boot/firmware/config.txt").read_text()
    assert (rootfs / "etc/modules").read_text() == "i2c-dev\n"
    assert "/boot/firmware vfat defaults,uid=0,gid=0,fmask=0177,dmask=0077 0 2" in (rootfs / "etc/fstab").read_text()
    chroot = (work / "stage-scanbox" / "chroot.log").read_text()
    apt = next(line for line in chroot.splitlines() if "apt-get" in line).split()
    # Debian's evdev and pyscard reach the venv (--system-site-packages): no compiler on the box
    assert {"python3-evdev", "python3-pyscard", "pcscd", "python3-venv"} <= set(apt)
    assert not {"gcc", "python3-dev"} & set(apt)
    assert not pi_only() & set(apt)
    assert "python3 -m venv --system-site-packages /opt/scanbox/venv" in chroot
    # the two options stay off unless asked for
    assert not (rootfs / "data").exists()
    assert not (rootfs / "etc/modprobe.d/scanbox-g_ether.conf").exists()


def stage_packages() -> set[str]:
    names: set[str] = set()
    for listing in STAGE.rglob("[0-9][0-9]-packages*"):
        for line in listing.read_text(encoding="utf-8").splitlines():
            names.update(line.split("#")[0].split())
    for script in STAGE.rglob("*-run-chroot.sh"):
        for match in re.finditer(r"apt-get install[^\n]*", script.read_text(encoding="utf-8")):
            names.update(word for word in match.group(0).split()[2:] if not word.startswith("-"))
    return names


@pytest.mark.skipif(shutil.which("apt-cache") is None, reason="a Debian host (CI is Debian 12)")
def test_every_package_is_in_debian_or_listed_as_pi_only():
    wanted = stage_packages()
    assert {"python3-evdev", "python3-pyscard", "python3-picamera2"} <= wanted
    assert pi_only() <= wanted | {"raspi-config"}
    debian = subprocess.run(["apt-cache", "show", "--no-all-versions", *sorted(wanted - pi_only())],
                            capture_output=True, text=True, timeout=120)
    found = set(re.findall(r"^Package: (\S+)$", debian.stdout, re.M))
    assert wanted - pi_only() - found == set(), "not in Debian and not in image/qemu/pi-only-packages"
    # and the Pi-only ones really are not in Debian (else the boot test should install them)
    for name in pi_only():
        proc = subprocess.run(["apt-cache", "show", name], capture_output=True, text=True, timeout=60)
        assert "Package: %s\n" % name not in proc.stdout, "%s is in Debian: take it out of pi-only-packages" % name


def load_boot_test():
    loader = importlib.machinery.SourceFileLoader("run_boot_test", str(QEMU / "run-boot-test"))
    spec = importlib.util.spec_from_loader("run_boot_test", loader)
    module = importlib.util.module_from_spec(spec)
    loader.exec_module(module)
    return module


def test_the_boot_tests_technician_file_provisions(tmp_path):
    boot_test = load_boot_test()
    card = tmp_path / "boot" / "scanbox.toml"
    card.parent.mkdir()
    card.write_text(boot_test.technician_file(8780, "/healthCard/services/x"), encoding="utf-8")
    outcome = provision.provision(card, root=tmp_path)
    assert outcome.ok, outcome.problems
    assert outcome.config.platform.endpoint == "http://10.0.2.2:8780/healthCard/services/x"
    secrets = tmp_path / "etc" / "scanbox" / "secrets.toml"
    assert secrets.stat().st_mode & 0o777 == 0o600
    assert boot_test.TOKENS["his"] in secrets.read_text()
    assert not card.exists()


def test_the_boot_test_reads_the_readmes_exposure_figure():
    boot_test = load_boot_test()
    unit = (ROOT / "systemd" / "scanbox.service").read_text(encoding="utf-8")
    claimed = re.search(r"systemd 252\): (\d+\.\d) ", unit).group(1)
    assert boot_test.readme_exposure() == float(claimed)
    # offline, as here, the same figure the booted guest computes (PrivateMounts= said explicitly)
    proc = subprocess.run(["systemd-analyze", "security", "--offline=true", "--no-pager",
                           str(ROOT / "systemd" / "scanbox.service")], capture_output=True, text=True, timeout=60)
    offline = re.search(r"Overall exposure level for scanbox\.service: (\d+\.\d)", proc.stdout)
    assert offline and float(offline.group(1)) == boot_test.readme_exposure(), proc.stdout[-400:]


def test_the_boot_test_is_clean_python():
    ruff = shutil.which("ruff", path=str(Path(sys.executable).parent)) or shutil.which("ruff")
    proc = subprocess.run([ruff, "check", "--output-format", "concise", "--line-length", "120",
                           str(QEMU / "run-boot-test")], capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout + proc.stderr
