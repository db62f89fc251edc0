"""scanbox: the daemon; all logic that does not touch hardware."""

# The one place the version is written: pyproject.toml reads it from here ([tool.setuptools.dynamic]),
# so the daemon says its version (at READY, in `status`) without importlib.metadata, which cost
# 1.1 MiB resident and 10 ms of the start for one string.
__version__ = "0.1.0"
