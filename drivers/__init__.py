"""Hardware drivers. Each module turns one kind of device into a stream of Scans (or draws
frames) and exposes, Klipper-style, an `Options` model for its config section and a `create`
factory, and may expose a `doctor(sources, ctx)` probe that `scanbox doctor` runs (drivers/base.py).
Adding a reader is one module here plus one entry below; nothing above changes: the config
validates its section against its Options, `status` shows it among the sources, the supervisor
restarts its thread if it dies, and doctor runs its probe.

Drivers never import `agent`, except the plain types in `agent.model` and the Struct base of
their `Options` in `agent.schema`.
"""

from __future__ import annotations

import importlib
from types import ModuleType

# `driver = "..."` in a [sources.NAME] section -> module
SOURCE_DRIVERS: dict[str, str] = {
    "serial_scanner": "drivers.serial_scanner",
    "stdin": "drivers.stdin_scanner",
    "idcard": "drivers.idcard",
    "hid": "drivers.hid",
    "camera": "drivers.camera",
    "pcsc": "drivers.pcsc",
}


def source_module(driver: str) -> ModuleType:
    return importlib.import_module(SOURCE_DRIVERS[driver])
