"""The wheel the SD image installs (image/build.sh: `pip wheel --no-deps`) carries everything the
daemon loads at run time: every module, the shipped WSDLs, the card file maps. A file left out
here works in a checkout and fails only on a box."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DATA = ("*.wsdl", "*.toml")


def test_the_wheel_carries_every_module_and_data_file(tmp_path):
    # from a copy without build/ and *.egg-info: files left there by an earlier build would be
    # packed again and hide what pyproject.toml leaves out
    source = tmp_path / "src"
    shutil.copytree(ROOT, source, ignore=shutil.ignore_patterns(
        "build", "*.egg-info", ".venv", ".git", "__pycache__", ".pytest_cache", "dist"))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--disable-pip-version-check",
                    "-w", str(tmp_path), str(source)], check=True, timeout=300)
    (wheel,) = tmp_path.glob("scanbox-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    wanted = set()
    for package in ("agent", "drivers"):
        for pattern in ("*.py",) + DATA:
            wanted |= {str(p.relative_to(ROOT)) for p in (ROOT / package).rglob(pattern)
                       if "__pycache__" not in p.parts}
    assert wanted - names == set()
    assert {"agent/platforms/wsdl/rhc.wsdl", "drivers/card_profiles/health_card.toml"} <= names
    entry_points = zipfile.ZipFile(wheel).read(
        next(n for n in names if n.endswith(".dist-info/entry_points.txt"))).decode()
    assert "scanbox = agent.cli:main" in entry_points
