"""JSON-RPC 2.0, independent of the transport that carries it (PROTOCOL.md).

A transport hands `Dispatcher.handle_bytes` one message (a line on Unix/TCP, a body over HTTP, a
frame over WebSocket) and writes back what it returns. Parameters are msgspec Structs checked
by agent.schema, so a wrong call gets -32602 naming every bad parameter; scanbox's own failures are -32000
with `data.reason`; nothing a client sends can raise out of here.
"""

import asyncio
import json
import logging
from typing import Any, Awaitable, Callable, Mapping

import msgspec
import orjson

from agent import schema
from agent.model import Reason, ScanboxError

logger = logging.getLogger(__name__)

PARSE_ERROR = -32700
INVALID_REQUEST = -32600
METHOD_NOT_FOUND = -32601
INVALID_PARAMS = -32602
INTERNAL_ERROR = -32603
APPLICATION_ERROR = -32000

MAX_BATCH = 32


class Params(schema.Schema):
    """Base of every method's parameters: unknown parameters are errors. Types are strict: a
    number written as a string, or a boolean where a number goes, is refused. (msgspec builds
    each method's converter on its first call, not at the daemon's start.)"""


class NoParams(Params):
    """A method that takes no parameters (any given are an error)."""


class Session(msgspec.Struct, eq=False):
    """One client connection (or one HTTP request): who it is and what it may do."""

    transport: str
    peer: str
    scopes: frozenset[str] = frozenset()
    client: str | None = None
    # how the transport sends a notification to this client; None where it cannot
    notify: Callable[[dict[str, Any]], None] | None = None
    cleanups: list[Callable[[], None]] = msgspec.field(default_factory=list)
    # called once when the session authenticates (the transport's count of unauthenticated
    # connections from this address goes down)
    on_authenticated: list[Callable[[], None]] = msgspec.field(default_factory=list)
    # where `auth` makes no sense (HTTP: every request carries its bearer token)
    auth_method: bool = True

    @property
    def authenticated(self) -> bool:
        return bool(self.scopes)

    def authenticate(self, client: str | None, scopes: frozenset[str]) -> None:
        self.client, self.scopes = client, scopes
        hooks, self.on_authenticated = self.on_authenticated, []
        for hook in hooks:
            hook()

    def close(self) -> None:
        for cleanup in self.cleanups:
            try:
                cleanup()
            except Exception:
                logger.exception("session cleanup failed")
        self.cleanups.clear()


Handler = Callable[[Session, Any], Awaitable[Any]]


class Method(msgspec.Struct, frozen=True):
    name: str
    params: type[Params]
    handler: Handler
    # None: callable before authenticating (auth itself)
    scope: str | None = "read"


class RpcError(Exception):
    def __init__(self, code: int, message: str, data: Mapping[str, Any] | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.data = dict(data) if data else None

    @classmethod
    def from_scanbox(cls, exc: ScanboxError) -> "RpcError":
        code = INVALID_PARAMS if exc.reason is Reason.BAD_REQUEST else APPLICATION_ERROR
        return cls(code, exc.message, exc.to_data())


def error_response(id_: Any, error: RpcError) -> dict[str, Any]:
    body: dict[str, Any] = {"code": error.code, "message": error.message}
    if error.data is not None:
        body["data"] = error.data
    return {"jsonrpc": "2.0", "id": id_, "error": body}


def encode(message: Any) -> bytes:
    """One message as UTF-8 JSON, compact. orjson writes the same bytes as the standard library
    (non-ASCII as itself, no spaces) in a tenth of the time: two answers per scan (read_card,
    and the status a kiosk asks before it) were a tenth of the daemon's CPU. What orjson refuses
    (an integer beyond 64 bits, a key that is not a string, a lone surrogate) goes to the standard
    library, which answers or raises as it always did. A NaN or an infinity, which JSON cannot
    carry (a float from a platform's JSON reply, say), is written as null, where the standard
    library raised and the caller was never answered."""
    try:
        return orjson.dumps(message)
    except TypeError:
        return json.dumps(message, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode("utf-8")


class Dispatcher:
    def __init__(self, methods: list[Method]) -> None:
        self.methods = {m.name: m for m in methods}

    async def handle_bytes(self, session: Session, data: bytes) -> bytes | None:
        """One message in, its response out (None when it held only notifications)."""
        try:
            message = json.loads(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            return encode(error_response(None, RpcError(PARSE_ERROR, "not UTF-8: byte 0x%02x at offset %d"
                                                        % (data[exc.start], exc.start))))
        except (ValueError, RecursionError) as exc:
            # RecursionError: nesting deeper than the parser takes; ValueError: bad JSON, or an
            # integer with more digits than Python converts
            return encode(error_response(None, RpcError(PARSE_ERROR, "not JSON: %s" % _short(str(exc)))))
        response = await self.handle(session, message)
        return None if response is None else encode(response)

    async def handle(self, session: Session, message: Any) -> Any:
        if isinstance(message, list):
            if not message:
                return error_response(None, RpcError(INVALID_REQUEST, "empty batch"))
            if len(message) > MAX_BATCH:
                return error_response(None, RpcError(INVALID_REQUEST, "batch of %d requests, at most %d"
                                                     % (len(message), MAX_BATCH)))
            # auth inside a batch would guess many tokens in one round trip, under another
            # token's session: each member that tries is refused
            responses = await asyncio.gather(*(self._one(session, m, in_batch=True) for m in message))
            out = [r for r in responses if r is not None]
            return out or None
        return await self._one(session, message)

    async def _one(self, session: Session, message: Any, in_batch: bool = False) -> dict[str, Any] | None:
        if not isinstance(message, dict):
            return error_response(None, RpcError(INVALID_REQUEST, "a request must be a JSON object"))
        id_ = message.get("id")
        is_notification = "id" not in message
        if not (id_ is None or isinstance(id_, (str, int)) and not isinstance(id_, bool)):
            return error_response(None, RpcError(INVALID_REQUEST, "id must be a string, a number or null"))
        try:
            result = await self._call(session, message, in_batch)
        except RpcError as exc:
            return None if is_notification else error_response(id_, exc)
        except ScanboxError as exc:
            return None if is_notification else error_response(id_, RpcError.from_scanbox(exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            logger.exception("method %r failed", message.get("method"))
            return None if is_notification else error_response(id_, RpcError(
                INTERNAL_ERROR, "internal error; it has been logged", {"reason": Reason.INTERNAL.value}))
        return None if is_notification else {"jsonrpc": "2.0", "id": id_, "result": result}

    async def _call(self, session: Session, message: dict[str, Any], in_batch: bool = False) -> Any:
        if message.get("jsonrpc") != "2.0":
            raise RpcError(INVALID_REQUEST, 'jsonrpc must be "2.0"')
        name = message.get("method")
        if not isinstance(name, str):
            raise RpcError(INVALID_REQUEST, "method must be a string")
        method = self.methods.get(name)
        if method is None:
            raise RpcError(METHOD_NOT_FOUND, "unknown method %r" % _short(name),
                           {"methods": sorted(self.methods)})
        if method.scope is None and (in_batch or not session.auth_method):
            raise RpcError(INVALID_REQUEST, "%s cannot be called %s" % (name, "inside a batch" if in_batch else
                           "on %s: send Authorization: Bearer <token> with each request" % session.transport),
                           {"reason": Reason.BAD_REQUEST.value})
        if method.scope is not None and method.scope not in session.scopes:
            if not session.authenticated:
                raise RpcError(APPLICATION_ERROR, "authenticate first: call auth with a token",
                               {"reason": Reason.UNAUTHORIZED.value})
            raise RpcError(APPLICATION_ERROR, "%s needs the %s scope" % (name, method.scope),
                           {"reason": Reason.UNAUTHORIZED.value})
        raw = message.get("params", {})
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise RpcError(INVALID_PARAMS, "params must be an object (named parameters)",
                           {"reason": Reason.BAD_REQUEST.value})
        try:
            params = schema.convert(raw, method.params, key="parameter")
        except schema.Invalid as exc:
            problems = ["%s: %s" % (path or "params", message) for path, message in exc.problems]
            raise RpcError(INVALID_PARAMS, "bad params for %s: %s" % (name, "; ".join(problems)),
                           {"reason": Reason.BAD_REQUEST.value, "problems": problems}) from None
        return await method.handler(session, params)


def _short(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[:limit] + "…"
