"""A box loads only what its configuration uses (issue 17: start-up and memory on a Pi): no
Pillow without a display, no cryptography before the first seal or OneTrans request, no zeep
(nor requests and urllib3, which it brings) for a platform whose requests are all strings."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import make_config

HEAVY = ("PIL", "cryptography", "zeep", "requests", "urllib3", "prometheus_client")
SCRIPT = """
import asyncio, json, sys
from agent.config import validate
from agent.daemon import Daemon

async def main():
    box = Daemon(validate(json.loads(sys.argv[1])))
    await box.start()
    try:
        await box.status()  # every component reports (the platform, the store, the clock)
    finally:
        await box.stop()
    print(json.dumps(sorted({m.split(".")[0] for m in sys.modules} & set(sys.argv[2:]))))

asyncio.run(main())
"""


def loaded_after_start(tmp_path, **sections) -> list[str]:
    config = make_config(None, tmp_path, **sections)
    data = json.dumps(config.model_dump(mode="json", exclude={"sources"}) | {"sources": {}})
    data = data.replace('"********"', '"scanbox-secret"')  # the dump masks the platform password
    out = subprocess.run([sys.executable, "-c", SCRIPT, data, *HEAVY], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.splitlines()[-1])


def test_a_counter_box_starts_without_pillow_cryptography_or_zeep(tmp_path):
    assert loaded_after_start(tmp_path) == []


@pytest.mark.parametrize("display, expected", [({"model": "dummy"}, ["PIL"])])
def test_a_box_with_a_display_loads_pillow(tmp_path, display, expected):
    assert loaded_after_start(tmp_path, display=display) == expected
