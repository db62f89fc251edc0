"""scanbox: the daemon; all logic that does not touch hardware."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("scanbox")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0+unknown"
