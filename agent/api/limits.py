"""Limits every network transport shares (agent/api/stream.py, agent/api/http.py)."""

from __future__ import annotations

from typing import Callable


class UnauthenticatedLimit:
    """Open connections per address that have not authenticated, at most `cap` each: one address
    cannot fill the server's slots with sockets that never log in."""

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self._open: dict[str, int] = {}

    def count(self, peer: str) -> int:
        return self._open.get(peer, 0)

    def admit(self, peer: str) -> Callable[[], None] | None:
        """None when `peer` is at its cap; else the call that gives its place back (once)."""
        if self._open.get(peer, 0) >= self.cap:
            return None
        self._open[peer] = self._open.get(peer, 0) + 1
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                left = self._open.get(peer, 1) - 1
                if left > 0:
                    self._open[peer] = left
                else:
                    self._open.pop(peer, None)

        return release
