"""Typed events inside, JSON at the edge: listeners get model objects; a subscriber gets the
`{type, data}` docs/api.md shows, made only where the event leaves the box."""

from __future__ import annotations

from agent.events import (EVENT_TYPES, ComponentsChanged, DisplayChanged, Event, NetworkChanged, OutboxChanged,
                          PlatformChanged, ScanRead, SourceChanged, Verified)
from agent.model import Result, Scan, Verification
from agent.platforms.base import PlatformHealth


def test_each_event_has_one_of_the_three_wire_types_and_the_documented_data():
    scan = Scan.from_qr_bytes("serial:counter", b"CCEBCA5E8566:1")
    result = Result(scan, None, Verification(False, None, "x"))
    cases: list[tuple[Event, str, dict]] = [
        (ScanRead(scan), "scan", scan.to_json()),
        (Verified(result), "verification", result.to_json()),
        (SourceChanged("serial:counter", False, "gone", {"name": "serial:counter", "connected": False}), "status",
         {"source": {"name": "serial:counter", "connected": False}}),
        (PlatformChanged(PlatformHealth("rhc", True)), "status", {"platform": PlatformHealth("rhc", True).to_json()}),
        (NetworkChanged(False), "status", {"network": {"up": False}}),
        (OutboxChanged({"pending": 3}), "status", {"outbox": {"pending": 3, "available": True}}),
        (OutboxChanged(None, "disk full"), "status", {"outbox": {"available": False, "error": "disk full"}}),
        (DisplayChanged({"connected": True}), "status", {"display": {"connected": True}}),
        (ComponentsChanged({"ui": {"state": "running"}}), "status", {"components": {"ui": {"state": "running"}}}),
    ]
    for event, kind, data in cases:
        assert event.type in EVENT_TYPES
        assert event.wire() == {"type": kind, "data": data}


async def test_listeners_get_typed_events_from_the_daemon(box):
    """The hub hands listeners the Result itself: no dict shaped like the wire inside."""
    await box.start()
    seen: list[Event] = []
    box.daemon.hub.listen(seen.append)
    client = await box.unix()
    await client.call("verify_qr", {"qr": box.resident().static_qr})
    verified = [e for e in seen if isinstance(e, Verified)]
    assert len(verified) == 1 and isinstance(verified[0].result, Result)
    assert verified[0].result.identity is not None and verified[0].result.verification.ok
    assert any(isinstance(e, ScanRead) and e.scan.source.startswith("api:") for e in seen)
