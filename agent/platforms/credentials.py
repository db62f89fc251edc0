"""Platform credentials obtained at run time (wondersgroup's authKey, Foshan's workKey): kept in
the state directory (0600), reused across restarts, refreshed by one caller while the others wait.

The refresh is single-flight: when twenty verifications hear "credential expired" at once, the
first one asks the platform for a new credential and the other nineteen use it. A caller says
which credential failed (`stale`); if the cache already holds a different one, someone else
has refreshed it and no new request is made.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, Mapping

import msgspec

logger = logging.getLogger(__name__)


class Credential(msgspec.Struct, frozen=True):
    value: str
    obtained_at: float  # wall time
    # what it was issued for (org code, user name, endpoint, ...): a cached credential for
    # another account or platform is not used
    scope: Mapping[str, str]

    def age_s(self, now: float | None = None) -> float:
        return max(0.0, (time.time() if now is None else now) - self.obtained_at)


class CredentialCache:
    """One credential, on disk at `path`, with a single-flight refresh through `fetch`."""

    def __init__(self, path: Path, scope: Mapping[str, str],
                 fetch: Callable[[], Awaitable[str]],
                 still_valid: Callable[[Credential], bool] = lambda c: True,
                 clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.scope = dict(scope)
        self._fetch = fetch
        self._still_valid = still_valid
        self._clock = clock
        self._current: Credential | None = None
        self._inflight: asyncio.Task[str] | None = None
        self.refreshes = 0  # credentials fetched from the platform by this process

    @property
    def current(self) -> Credential | None:
        return self._current

    def load(self) -> Credential | None:
        """The credential saved by an earlier run, when it was issued for this scope."""
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            logger.warning("credential cache %s unreadable (%s); a new credential will be fetched", self.path, exc)
            return None
        if not isinstance(data, dict) or data.get("scope") != self.scope or not isinstance(data.get("value"), str):
            logger.info("credential cache %s is for another account or platform; not used", self.path)
            return None
        credential = Credential(data["value"], float(data.get("obtained_at", 0)), self.scope)
        if not self._still_valid(credential):
            return None
        self._current = credential
        return credential

    async def get(self, stale: str | None = None) -> str:
        """A credential to use. `stale`: the one the platform just refused.

        Callers that need a new credential while one is being fetched wait for that fetch and
        share its result, or its failure: twenty callers and a platform that does not answer
        cost one request and one timeout, not twenty in a row."""
        return (await self.renew(stale))[0]

    async def renew(self, stale: str | None = None) -> tuple[str, bool]:
        """As `get`, and whether the credential was fetched after this call (True), or is one
        another caller had already fetched (False), which may have expired since: refused,
        the first means the platform does not accept this box, the second is another expiry."""
        current = self._usable(stale)
        if current is not None:
            return current.value, False
        if self._inflight is None:
            self._inflight = asyncio.get_running_loop().create_task(self._refresh())
            self._inflight.add_done_callback(_retrieve)
        # shielded: a caller that gives up (its own deadline) does not cancel the others' fetch
        return await asyncio.shield(self._inflight), True

    async def _refresh(self) -> str:
        try:
            value = await self._fetch()
            credential = Credential(value, self._clock(), self.scope)
            self._current = credential
            self.refreshes += 1
        finally:
            self._inflight = None
        await asyncio.to_thread(self._save, credential)
        return value

    def forget(self, value: str) -> None:
        if self._current is not None and self._current.value == value:
            self._current = None

    def _usable(self, stale: str | None) -> Credential | None:
        current = self._current
        if current is None or current.value == stale or not self._still_valid(current):
            return None
        return current

    def _save(self, credential: Credential) -> None:
        """Atomically, 0600: a power cut leaves the old credential or the new one."""
        data: dict[str, Any] = {"value": credential.value, "obtained_at": credential.obtained_at,
                                "scope": self.scope}
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
            tmp = self.path.with_name(self.path.name + ".tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except OSError as exc:
            # the credential still works for this run; the next start fetches a new one
            logger.warning("cannot keep the platform credential in %s: %s", self.path, exc)


def _retrieve(task: asyncio.Task[str]) -> None:
    """A failed fetch whose callers all gave up is not an "exception never retrieved"."""
    if not task.cancelled():
        task.exception()
