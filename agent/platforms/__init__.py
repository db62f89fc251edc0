"""Platform adapters: one module per platform protocol, all with the small interface in `base`."""

from __future__ import annotations

from pathlib import Path

from agent.config import Config
from agent.platforms.base import Platform


def create(config: Config, state_dir: Path) -> Platform:
    """The adapter for `platform.kind`."""
    if config.platform.kind == "rhc":
        from agent.platforms.rhc import RhcPlatform

        return RhcPlatform(config.platform, config.site, state_dir)
    if config.platform.kind == "wondersgroup":
        from agent.platforms.wondersgroup import WondersgroupPlatform

        return WondersgroupPlatform(config.platform, config.site, state_dir)
    if config.platform.kind == "fsjson":
        from agent.platforms.fsjson import FsjsonPlatform

        return FsjsonPlatform(config.platform, config.site, state_dir)
    raise ValueError("unknown platform kind %r" % config.platform.kind)
