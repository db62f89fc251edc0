"""What the hub tells its listeners: a fixed set of typed events (STYLE.md item 12, Mopidy's
`CoreListener`). Listeners (the display, the daemon's status upkeep, the demo's printer, API
subscriptions) get these objects; JSON exists only at the API's edge, where `wire()` gives the
`{"type", "data"}` of docs/api.md's `event` notification. Renaming a wire field cannot silently
break the screen: the screen reads attributes that a type checker follows.

Three wire types: `scan` (ScanRead), `verification` (Verified), `status` (every *Changed).
"""

from __future__ import annotations

import enum
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Literal, Mapping

import msgspec

from agent.model import Result, Scan

if TYPE_CHECKING:
    from agent.platforms.base import PlatformHealth


class EventType(enum.StrEnum):
    SCAN = "scan"
    VERIFICATION = "verification"
    STATUS = "status"


EventName = Literal["scan", "verification", "status"]
EVENT_TYPES: tuple[EventName, ...] = ("scan", "verification", "status")


class Event(msgspec.Struct, frozen=True):
    """Base of every event: its wire type and its wire data."""

    type: ClassVar[EventType]

    def data(self) -> dict[str, Any]:
        raise NotImplementedError

    def wire(self) -> dict[str, Any]:
        """The params of the API's `event` notification."""
        return {"type": self.type.value, "data": self.data()}


class ScanRead(Event, frozen=True):
    """A source read something (before verification)."""

    type: ClassVar[EventType] = EventType.SCAN
    scan: Scan

    def data(self) -> dict[str, Any]:
        return self.scan.to_json()


class Verified(Event, frozen=True):
    """A scan's outcome: verified, refused, answered from the cache, or INTERNAL."""

    type: ClassVar[EventType] = EventType.VERIFICATION
    result: Result

    def data(self) -> dict[str, Any]:
        return self.result.to_json()


class SourceChanged(Event, frozen=True):
    type: ClassVar[EventType] = EventType.STATUS
    name: str
    connected: bool
    detail: str | None
    source: Mapping[str, Any]  # the source's entry in `status.sources`

    def data(self) -> dict[str, Any]:
        return {"source": dict(self.source)}


class PlatformChanged(Event, frozen=True):
    """The platform became reachable or unreachable."""

    type: ClassVar[EventType] = EventType.STATUS
    health: PlatformHealth

    @property
    def reachable(self) -> bool | None:
        return self.health.reachable

    def data(self) -> dict[str, Any]:
        return {"platform": self.health.to_json()}


class NetworkChanged(Event, frozen=True):
    type: ClassVar[EventType] = EventType.STATUS
    up: bool

    def data(self) -> dict[str, Any]:
        return {"network": {"up": self.up}}


class OutboxChanged(Event, frozen=True):
    """The outbox's counts (`status.outbox`); `stats` None when the database cannot be read."""

    type: ClassVar[EventType] = EventType.STATUS
    stats: Mapping[str, Any] | None
    error: str | None = None

    @property
    def available(self) -> bool:
        return self.stats is not None

    @property
    def pending(self) -> int:
        return int(self.stats["pending"]) if self.stats is not None else 0

    def data(self) -> dict[str, Any]:
        if self.stats is None:
            return {"outbox": {"available": False, "error": self.error}}
        return {"outbox": dict(self.stats, available=True)}


class DisplayChanged(Event, frozen=True):
    type: ClassVar[EventType] = EventType.STATUS
    status: Mapping[str, Any]  # `status.display`

    def data(self) -> dict[str, Any]:
        return {"display": dict(self.status)}


class ComponentsChanged(Event, frozen=True):
    """A supervised part failed, was restarted or given up (`status.components`)."""

    type: ClassVar[EventType] = EventType.STATUS
    components: Mapping[str, Mapping[str, Any]]

    def data(self) -> dict[str, Any]:
        return {"components": {name: dict(c) for name, c in self.components.items()}}


Listener = Callable[[Event], None]
