"""scanbox: the daemon; all logic that does not touch hardware."""

from typing import Any


def __getattr__(name: str) -> Any:
    # `__version__` on first use: importlib.metadata costs a tenth of the daemon's start-up
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            value = version("scanbox")
        except PackageNotFoundError:  # running from a source tree that was never installed
            value = "0+unknown"
        globals()["__version__"] = value
        return value
    raise AttributeError("module 'agent' has no attribute %r" % name)
