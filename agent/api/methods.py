"""The methods of PROTOCOL.md, on whatever transport carries them."""

import asyncio
import hmac
import logging
import math
import time
from typing import TYPE_CHECKING, Annotated, Any, Awaitable, Callable, Literal

import msgspec
from msgspec import Meta

from agent.api.jsonrpc import Method, NoParams, Params, Session
from agent.api.onetrans import OneTrans
from agent.codes import member_of, qwb002
from agent.config import ClientConfig, OnetransConfig
from agent.events import EVENT_TYPES, Event, EventName
from agent.hub import Hub
from agent.model import Reason, Scan, ScanboxError, ScanKind
from agent.outbox import RetryRefused, Store, StoreUnavailable, Uploader, scan_time
from agent.platforms.base import Platform
from agent.schema import Check

if TYPE_CHECKING:
    from agent.ui import Ui

logger = logging.getLogger(__name__)

ALL_KINDS = [k.value for k in ScanKind]

# SQLite's INTEGER is 64-bit signed: a larger id raises inside the database thread (OverflowError)
# instead of matching nothing, so every id is bounded here, at the edge, like every other number
SQLITE_MAX_INT = 2 ** 63 - 1
# platform.call's params: deep enough for the specs' DTOs (cardInfo.peopleInfo.*), no deeper
MAX_PARAMS_DEPTH = 4


Step = Annotated[str, Check(member_of(qwb002.MEDICAL_STEP, "spec 000 4.3.9"))]
Channel = Annotated[str, Check(member_of(qwb002.TERMINAL_TYPE, "spec 000 4.3.7"))]


class AuthParams(Params):
    token: Annotated[str, Meta(max_length=512)]


class ReadCardParams(Params):
    timeout_s: Annotated[float, Meta(gt=0, le=3600)] = 30.0
    kinds: Annotated[list[ScanKind], Meta(min_length=1)] = msgspec.field(default_factory=lambda: list(ScanKind))
    step: Step | None = None
    verify: bool = True


class VerifyQrParams(Params):
    qr: str
    step: Step | None = None
    channel: Channel | None = None


class SubscribeParams(Params):
    events: list[EventName] = msgspec.field(default_factory=lambda: list(EVENT_TYPES))


class OutboxListParams(Params):
    state: Literal["pending", "dead", "sent"] = "pending"
    limit: Annotated[int, Meta(ge=1, le=1000)] = 50


class OutboxRetryParams(Params):
    id: Annotated[int, Meta(ge=1, le=SQLITE_MAX_INT)]
    # a record the box could not place in time (made while the clock was wrong, in an earlier
    # boot): the scan's time, or true to send the time it carries
    at: Annotated[str, Meta(max_length=40)] | None = None
    keep_time: bool = False


class DisplayShowParams(Params):
    lines: Annotated[list[Annotated[str, Meta(max_length=64)]], Meta(min_length=1, max_length=4)]
    seconds: Annotated[float, Meta(gt=0, le=300)] = 5.0


def _platform_value(value: Any, path: str = "params", depth: int = 0) -> Any:
    """A DTO as docs/api.md shows it (objects of strings and numbers, lists of them), each number
    one a platform can carry: a 64-bit integer or a finite float."""
    if isinstance(value, dict):
        if depth >= MAX_PARAMS_DEPTH:
            raise ValueError("%s: nested deeper than %d objects" % (path, MAX_PARAMS_DEPTH))
        for key, item in value.items():
            _platform_value(item, "%s.%s" % (path, key), depth + 1)
    elif isinstance(value, list):
        if depth >= MAX_PARAMS_DEPTH:
            raise ValueError("%s: nested deeper than %d objects" % (path, MAX_PARAMS_DEPTH))
        for i, item in enumerate(value):
            _platform_value(item, "%s[%d]" % (path, i), depth + 1)
    elif isinstance(value, bool) or value is None or isinstance(value, str):
        pass
    elif isinstance(value, int):
        if not -SQLITE_MAX_INT - 1 <= value <= SQLITE_MAX_INT:
            raise ValueError("%s: %d is outside the 64-bit integer range" % (path, value))
    elif isinstance(value, float):
        if not math.isfinite(value):
            raise ValueError("%s: %r is not a number a platform can carry" % (path, value))
    else:
        raise ValueError("%s: not a JSON value" % path)
    return value


class PlatformCallParams(Params):
    operation: Annotated[str, Meta(min_length=1, max_length=64)]
    # the DTOs of docs/api.md are objects ({"cardInfo": {"peopleInfo": {...}}}); each adapter
    # checks its operation's own fields
    params: Annotated[dict[str, Any], Check(_platform_value)] = {}


class OnetransParams(Params):
    # the DLL took a string; the object itself is accepted too
    pInData: dict[str, Any] | Annotated[str, Meta(max_length=1 << 20)]


class AuthGuard:
    """Tokens compared in constant time. Each failure from an address doubles the wait before
    its answer (up to MAX_DELAY_S); LOCKOUT_FAILURES failures within LOCKOUT_WINDOW_S lock the
    address out for LOCKOUT_S, during which even a right token is refused. A success forgives
    nothing: an attacker holding one token cannot reset its count while guessing another."""

    MAX_DELAY_S = 8.0
    LOCKOUT_FAILURES = 10
    LOCKOUT_WINDOW_S = 600.0
    LOCKOUT_S = 900.0
    MAX_PEERS = 4096

    def __init__(self, clients: dict[str, ClientConfig]) -> None:
        self.clients = clients
        # per address: the times of its recent failures, and when its lockout ends
        self._failures: dict[str, list[float]] = {}
        self._locked_until: dict[str, float] = {}
        self.lockouts = 0

    def check(self, token: str) -> tuple[str, frozenset[str]] | None:
        found = None
        for name, client in self.clients.items():
            # compare against every client: the time taken does not tell which one matched
            if hmac.compare_digest(token.encode("utf-8"), client.token.get_secret_value().encode("utf-8")):
                found = (name, frozenset(client.scopes))
        return found

    def failures(self, peer: str) -> int:
        """Failed logins from `peer` within the lockout window."""
        now = time.monotonic()
        return sum(1 for t in self._failures.get(peer, ()) if now - t < self.LOCKOUT_WINDOW_S)

    def locked(self, peer: str) -> float:
        """Seconds left of `peer`'s lockout (0: not locked out)."""
        until = self._locked_until.get(peer)
        if until is None:
            return 0.0
        left = until - time.monotonic()
        if left <= 0:
            del self._locked_until[peer]
            return 0.0
        return left

    def penalty(self, peer: str) -> float:
        """Count a failure from `peer`; the delay its answer waits."""
        now = time.monotonic()
        recent = [t for t in self._failures.pop(peer, []) if now - t < self.LOCKOUT_WINDOW_S]
        recent.append(now)
        self._failures[peer] = recent
        if len(recent) >= self.LOCKOUT_FAILURES and peer not in self._locked_until:
            self._locked_until[peer] = now + self.LOCKOUT_S
            self.lockouts += 1
            logger.warning("api: %d failed logins from %s within %.0f s: locked out for %.0f s", len(recent), peer,
                           self.LOCKOUT_WINDOW_S, self.LOCKOUT_S)
        for table in (self._failures, self._locked_until):  # bounded memory under a scan of many addresses
            while len(table) > self.MAX_PEERS:
                table.pop(next(iter(table)))
        return min(0.25 * 2 ** (len(recent) - 1), self.MAX_DELAY_S)

    def refusal(self, peer: str) -> str | None:
        """Why `peer` may not log in now, or None."""
        left = self.locked(peer)
        if left:
            return "too many failed logins from %s: locked out for %.0f s more" % (peer, left)
        return None


class Api:
    def __init__(self, hub: Hub, platform: Platform, status: Callable[[], Awaitable[dict[str, Any]]],
                 clients: dict[str, ClientConfig], store: Store, uploader: Uploader, ui: "Ui | None" = None,
                 onetrans: OnetransConfig | None = None) -> None:
        self.hub = hub
        self.ui = ui
        self.platform = platform
        self.store = store
        self.uploader = uploader
        self.status_provider = status
        self.guard = AuthGuard(clients)
        # one guard for tokens and OneTrans signatures on every transport; a signed request
        # forgives nothing either
        self.onetrans = OneTrans(onetrans or OnetransConfig(), self._read_for_onetrans, self.guard)

    def methods(self) -> list[Method]:
        return [
            Method("auth", AuthParams, self.auth, scope=None),
            Method("status", NoParams, self.status),
            Method("read_card", ReadCardParams, self.read_card),
            Method("verify_qr", VerifyQrParams, self.verify_qr),
            Method("subscribe", SubscribeParams, self.subscribe),
            Method("platform.call", PlatformCallParams, self.platform_call, scope="admin"),
            Method("display.show", DisplayShowParams, self.display_show),
            Method("outbox.stats", NoParams, self.outbox_stats),
            # records hold personal data (a physical card's use record has the holder's name)
            Method("outbox.list", OutboxListParams, self.outbox_list, scope="admin"),
            Method("outbox.retry", OutboxRetryParams, self.outbox_retry, scope="admin"),
            Method("onetrans", OnetransParams, self.onetrans_call),
        ]

    async def auth(self, session: Session, params: AuthParams) -> dict[str, Any]:
        refusal = self.guard.refusal(session.peer)
        if refusal is not None:
            raise ScanboxError(Reason.UNAUTHORIZED, refusal)
        found = self.guard.check(params.token)
        if found is None:
            delay = self.guard.penalty(session.peer)
            logger.warning("api: auth refused for %s:%s (answer delayed %.2f s)", session.transport,
                           session.peer, delay)
            await asyncio.sleep(delay)
            raise ScanboxError(Reason.UNAUTHORIZED, "unknown token")
        session.authenticate(*found)
        logger.info("api: client %s authenticated from %s:%s", found[0], session.transport, session.peer)
        return {"ok": True, "client": found[0], "scopes": sorted(found[1])}

    async def status(self, session: Session, params: NoParams) -> dict[str, Any]:
        return await self.status_provider()

    async def read_card(self, session: Session, params: ReadCardParams) -> dict[str, Any]:
        result = await self.hub.read_card(params.kinds, params.timeout_s, params.step, params.verify)
        return result.to_json()

    async def verify_qr(self, session: Session, params: VerifyQrParams) -> dict[str, Any]:
        scan = Scan(source="api:%s" % (session.client or session.transport), kind=ScanKind.QR,
                    payload=params.qr, raw=params.qr.encode("utf-8"))
        result = await self.hub.verify_external(scan, params.step, params.channel)
        return result.to_json()

    async def subscribe(self, session: Session, params: SubscribeParams) -> dict[str, Any]:
        notify = session.notify
        if notify is None:
            raise ScanboxError(Reason.NOT_SUPPORTED, "this transport cannot carry events; use the "
                               "Unix socket, TCP or the WebSocket")
        wanted = frozenset(params.events)
        session.close()  # a new subscribe replaces the previous one

        def deliver(event: Event) -> None:
            if event.type in wanted:  # JSON only here, at the edge
                notify({"jsonrpc": "2.0", "method": "event", "params": event.wire()})

        session.cleanups.append(self.hub.listen(deliver))
        return {"subscribed": sorted(wanted)}

    async def display_show(self, session: Session, params: DisplayShowParams) -> dict[str, Any]:
        if self.ui is None:
            raise ScanboxError(Reason.NOT_SUPPORTED, "this box has no display configured")
        self.ui.show_message(params.lines, params.seconds)
        return {"shown": True, "seconds": params.seconds}

    async def outbox_stats(self, session: Session, params: NoParams) -> dict[str, Any]:
        return await self._store(self.store.stats())

    async def outbox_list(self, session: Session, params: OutboxListParams) -> dict[str, Any]:
        rows = await self._store(self.store.rows(params.state, params.limit))
        return {"state": params.state, "records": [r.to_json() for r in rows]}

    async def outbox_retry(self, session: Session, params: OutboxRetryParams) -> dict[str, Any]:
        try:
            at = scan_time(params.at) if params.at is not None else None
        except ValueError as exc:
            raise ScanboxError(Reason.BAD_REQUEST, "params.at: %s" % exc) from None
        try:
            retried = await self._store(self.store.retry(params.id, at=at, keep_time=params.keep_time))
        except RetryRefused as exc:
            raise ScanboxError(Reason.BAD_REQUEST, str(exc)) from None
        if not retried:
            raise ScanboxError(Reason.BAD_REQUEST, "no pending or dead record %d" % params.id)
        logger.info("api: %s retries outbox record %d", session.client or session.transport, params.id)
        self.uploader.wake()
        return {"ok": True, "id": params.id}

    @staticmethod
    async def _store(call: Awaitable[Any]) -> Any:
        try:
            return await call
        except StoreUnavailable as exc:
            raise ScanboxError(Reason.DEVICE_ERROR, "the outbox is unavailable: %s" % exc) from None

    async def platform_call(self, session: Session, params: PlatformCallParams) -> dict[str, Any]:
        logger.info("api: %s calls platform operation %s", session.client or session.transport, params.operation)
        return await self.platform.call(params.operation, params.params)

    async def _read_for_onetrans(self, kinds: list[ScanKind], timeout_s: float, step: str | None) -> Any:
        return await self.hub.read_card(kinds, timeout_s, step, True)

    async def onetrans_call(self, session: Session, params: OnetransParams) -> dict[str, Any]:
        return await self.onetrans.handle(params.pInData, session.transport, session.peer)
