"""What every platform adapter does with HTTP: say plainly what went wrong. An error page where
SOAP was expected, a connection dropped halfway, an answer full of control characters all become
one line a technician can read in the journal."""

from __future__ import annotations

from typing import Any

import httpx
from zeep.transports import AsyncTransport

from agent.clock import tls_hint


class CheckedTransport(AsyncTransport):
    """zeep reads any HTTP 500 as a SOAP fault and any body as XML; a proxy's error page or a
    captive portal then surfaces as "Unknown fault". Refuse what is not XML before zeep looks,
    so the error says what the platform actually answered."""

    async def post_xml(self, address: str, envelope: Any, headers: Any) -> Any:
        response = await super().post_xml(address, envelope, headers)
        content_type = response.headers.get("content-type", "")
        if "xml" not in content_type.lower() or not response.content:
            raise NotSoap("platform answered HTTP %d, %s, not SOAP: %s" % (
                response.status_code, content_type or "no content type",
                preview(text_of(response.content)) or "(empty)"))
        return response


class NotSoap(Exception):
    """The platform answered something other than XML (an error page, a portal, nothing)."""


def preview(text: str, limit: int = 120) -> str:
    text = " ".join(text.split())
    text = "".join(c if c.isprintable() else "\\x%02x" % ord(c) for c in text)
    return text if len(text) <= limit else text[:limit] + "…"


def text_of(content: Any) -> str:
    if isinstance(content, bytes):
        return content.decode("utf-8", errors="replace")
    return str(content or "")


HTTP_ERRORS: tuple[tuple[type[httpx.HTTPError], str], ...] = (
    (httpx.ConnectError, "cannot connect"),
    (httpx.ReadError, "connection broken while waiting for the answer"),
    (httpx.WriteError, "connection broken while sending"),
    (httpx.RemoteProtocolError, "connection closed without a valid HTTP answer"),
)


def http_error(exc: httpx.HTTPError) -> str:
    what = next((text for kind, text in HTTP_ERRORS if isinstance(exc, kind)), type(exc).__name__)
    detail = tls_hint(str(exc) or str(exc.__cause__ or exc.__context__ or ""))
    return "%s (%s)" % (what, detail) if detail else what
