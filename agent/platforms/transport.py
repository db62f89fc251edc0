"""The box's one HTTP client to its platform (aiohttp), shared by every adapter: one connection
pool, the site's TLS settings, a deadline per request, and every failure said plainly. An error
page where SOAP was expected, a connection dropped halfway, an answer full of control characters
all become one line a technician can read in the journal.

aiohttp rather than httpx: the same POST costs several times less CPU (bench/bench_e2e.py and
bench_floor.py measure the daemon per scan), and aiohttp already serves the HIS API.
"""

from __future__ import annotations

import asyncio
import ssl
from pathlib import Path
from typing import Any, Coroutine, Mapping

import msgspec
import aiohttp

from agent.clock import heard_date, tls_hint
from agent.platforms.base import PlatformUnavailable

USER_AGENT = "scanbox"


class Reply(msgspec.Struct, frozen=True):
    status: int
    headers: Mapping[str, str]
    content: bytes

    @property
    def content_type(self) -> str:
        return self.headers.get("Content-Type", "")

    @property
    def charset(self) -> str | None:
        for part in self.content_type.split(";")[1:]:
            key, _, value = part.strip().partition("=")
            if key.lower() == "charset" and value:
                return value.strip('"').lower()
        return None

    def text(self) -> str:
        """The body decoded by its Content-Type charset (a GBK platform is read right), else UTF-8."""
        try:
            return self.content.decode(self.charset or "utf-8", errors="replace")
        except LookupError:
            return self.content.decode("utf-8", errors="replace")


class HttpClient:
    """One aiohttp session, made on first use (it belongs to the running event loop)."""

    def __init__(self, *, timeout_s: float, tls_verify: bool | str | Path = True, max_connections: int = 16) -> None:
        self.timeout_s = timeout_s
        self.tls_verify = tls_verify
        self.max_connections = max_connections
        self._session: aiohttp.ClientSession | None = None

    def _ssl(self) -> ssl.SSLContext | bool:
        if self.tls_verify is False:
            return False
        if isinstance(self.tls_verify, (str, Path)):  # a private CA's bundle (platform.tls_verify)
            return ssl.create_default_context(cafile=str(self.tls_verify))
        return True

    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(limit=self.max_connections, ssl=self._ssl())
            # no cookie jar: a platform has no business keeping state in the box's requests. No
            # timeout of aiohttp's own: request() bounds each request as a whole (aiohttp's
            # default, 5 minutes, was a timer set and cancelled per request for nothing)
            self._session = aiohttp.ClientSession(connector=connector, headers={"User-Agent": USER_AGENT},
                                                  cookie_jar=aiohttp.DummyCookieJar(),
                                                  timeout=aiohttp.ClientTimeout(total=None))
        return self._session

    async def request(self, method: str, url: str, *, data: bytes | None = None,
                      headers: Mapping[str, str] | None = None, timeout_s: float | None = None) -> Reply:
        """The whole reply, or PlatformUnavailable saying what went wrong, within `timeout_s`
        for the request as a whole (connect, send, wait, read)."""
        limit = timeout_s or self.timeout_s
        try:
            async with asyncio.timeout(limit):
                async with self.session().request(method, url, data=data, headers=headers,
                                                  allow_redirects=False) as response:
                    content = await response.read()
                    # the platform's time, for a box whose clock is not right yet (Clock.platform_now)
                    heard_date(response.headers.get("Date"))
                    return Reply(response.status, response.headers, content)
        except TimeoutError:
            raise PlatformUnavailable("no answer within %.1f s" % limit) from None
        except aiohttp.ClientError as exc:
            raise PlatformUnavailable("%s: %s" % (url, http_error(exc))) from None
        except (OSError, ValueError) as exc:  # a malformed URL, a socket error outside aiohttp's wrapping
            raise PlatformUnavailable("%s: %s" % (url, exc or type(exc).__name__)) from None

    # request() itself, not a coroutine of their own awaiting it: one frame less on every resumption
    def post(self, url: str, data: bytes, headers: Mapping[str, str],
             timeout_s: float | None = None) -> Coroutine[Any, Any, Reply]:
        return self.request("POST", url, data=data, headers=headers, timeout_s=timeout_s)

    def get(self, url: str, timeout_s: float | None = None) -> Coroutine[Any, Any, Reply]:
        return self.request("GET", url, timeout_s=timeout_s)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


class NotSoap(Exception):
    """The platform answered something other than XML (an error page, a portal, nothing)."""


def check_xml(reply: Reply) -> None:
    """Refuse what is not XML before anything parses it, so the error says what the platform
    actually answered (a proxy's error page, a captive portal, an empty body)."""
    if "xml" not in reply.content_type.lower() or not reply.content:
        raise NotSoap("platform answered HTTP %d, %s, not SOAP: %s" % (
            reply.status, reply.content_type or "no content type", preview(text_of(reply.content)) or "(empty)"))


def preview(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    text = "".join(c if c.isprintable() else "\\x%02x" % ord(c) for c in text)
    return text if len(text) <= limit else text[:limit] + "…"


def text_of(content: Any) -> str:
    if isinstance(content, bytes):
        return content.decode("utf-8", errors="replace")
    return str(content or "")


# most specific first: aiohttp's exceptions derive from each other
HTTP_ERRORS: tuple[tuple[type[BaseException], str], ...] = (
    (aiohttp.ClientConnectorCertificateError, "the platform's TLS certificate was refused"),
    (aiohttp.ClientSSLError, "TLS handshake failed"),
    (aiohttp.ClientConnectorError, "cannot connect"),
    (aiohttp.ServerDisconnectedError, "connection closed without a valid HTTP answer"),
    (aiohttp.ClientPayloadError, "connection broken while reading the answer"),
    (aiohttp.ClientResponseError, "not a valid HTTP answer"),
    (aiohttp.ClientOSError, "connection broken"),
)


def http_error(exc: BaseException) -> str:
    what = next((text for kind, text in HTTP_ERRORS if isinstance(exc, kind)), type(exc).__name__)
    detail = tls_hint(str(exc) or str(exc.__cause__ or exc.__context__ or ""))
    return "%s (%s)" % (what, detail) if detail else what
