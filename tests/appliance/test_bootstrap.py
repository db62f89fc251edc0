"""bootstrap.sh run again is a no-op that needs no network (its header says so); it redoes the
Python side when pyproject.toml or the script itself changed, and only then."""

from __future__ import annotations

import shutil
import subprocess

from tests.appliance.test_wheel import ROOT, no_network, pip_env

FAKE_PYTHON = """#!/bin/sh
# stands in for the venv's python: records how bootstrap called it
echo "$*" >> "$(dirname "$0")/../../calls.log"
if [ "$1" = "-" ]; then cat > /dev/null; fi
case "$*" in *" wheel "*) mkdir -p .venv/wheelhouse ;; esac
"""


def test_a_second_run_needs_no_network_and_changes_nothing():
    # CI has just run bootstrap.sh on this tree (.ci/run); so has a developer who runs the suite
    stamp = ROOT / ".venv" / "bootstrap.stamp"
    before = stamp.stat().st_mtime_ns
    proc = subprocess.run(no_network() + [str(ROOT / "bootstrap.sh")], env=pip_env(), capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, "bootstrap.sh needed more than this machine has (run it again?):\n%s%s" % (
        proc.stdout, proc.stderr)
    assert proc.stdout == "" and stamp.stat().st_mtime_ns == before


def test_the_python_side_is_redone_when_pyproject_or_the_script_changes(tmp_path):
    for name in ("bootstrap.sh", "pyproject.toml"):
        shutil.copy2(ROOT / name, tmp_path / name)
    python = tmp_path / ".venv" / "bin" / "python"
    python.parent.mkdir(parents=True)
    python.write_text(FAKE_PYTHON)
    python.chmod(0o755)
    calls = tmp_path / "calls.log"

    def run() -> list[str]:
        calls.unlink(missing_ok=True)
        subprocess.run([str(tmp_path / "bootstrap.sh")], check=True, capture_output=True, timeout=60)
        return calls.read_text().splitlines() if calls.exists() else []

    first = run()
    assert any("install -q -e .[test]" in call for call in first)
    assert any(call.startswith("-m pip --disable-pip-version-check wheel") for call in first)
    assert run() == []  # nothing changed: nothing done
    with open(tmp_path / "pyproject.toml", "a") as fh:
        fh.write("# a new dependency\n")
    assert run() == first
    assert run() == []
    with open(tmp_path / "bootstrap.sh", "a") as fh:
        fh.write("# another step\n")
    assert run() == first
    shutil.rmtree(tmp_path / ".venv" / "wheelhouse")  # the fresh-venv test would have nothing to install
    assert run() == first
    assert run() == []
