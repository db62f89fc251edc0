"""mypy over agent, drivers, tests and bench, as configured in
pyproject.toml's [tool.mypy]: an Optional passed where a value is required, a method that
shadows a builtin its own class uses, str and Path mixed, and a test double that has drifted
from the interface it stands in for (the fakes subclass the Protocol or class and mark their
methods @override) fail the suite.

mypy's cache (.mypy_cache) makes a second run take seconds; a first run on a clean clone takes
about 15 s of CPU."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_mypy_is_clean():
    started = time.monotonic()
    proc = subprocess.run([sys.executable, "-m", "mypy", "--no-error-summary", "--hide-error-context"],
                          cwd=ROOT, capture_output=True, text=True)
    print("mypy took %.1f s" % (time.monotonic() - started))
    errors = [line for line in proc.stdout.splitlines() if ": error:" in line]
    assert proc.returncode == 0 and not errors, proc.stdout + proc.stderr
