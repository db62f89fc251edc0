"""A platform's SOAP service from its WSDL, loaded once and on demand: the WSDL comes from config
(URL or file, see `wsdl`), is cached for offline starts, and a failed load is not retried on
every scan. zeep builds the requests from the site's WSDL (its namespace, its element names);
the replies are returned raw (`raw_response`) for the adapter to read with lxml, so an element
order or an extra element the WSDL did not foresee cannot lose an answer.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any, Iterable

import httpx
import zeep
import zeep.exceptions
from lxml import etree
from zeep.proxy import AsyncServiceProxy

from agent.model import Reason, ScanboxError
from agent.platforms import wsdl
from agent.platforms.base import PlatformUnavailable
from agent.platforms.transport import CheckedTransport, NotSoap, http_error, preview

logger = logging.getLogger(__name__)

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
# after a failed WSDL load, wait this long before trying again on demand
RETRY_S = 30.0
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False,
                          remove_blank_text=True)


class SoapService:
    """The operations `needed` of the WSDL at `source`, bound to `endpoint` (else the WSDL's)."""

    def __init__(self, label: str, source: wsdl.WsdlSource, cache_dir: Any, http: httpx.AsyncClient,
                 endpoint: str | None, timeout_s: float, needed: Iterable[str]) -> None:
        self.label = label
        self.source = source
        self.cache_dir = cache_dir
        self.http = http
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.needed = tuple(needed)
        self.note: str | None = None
        self._proxy: Any = None
        self._lock = asyncio.Lock()
        self._failed_at: float | None = None
        self._error = ""

    async def proxy(self) -> Any:
        if self._proxy is not None:
            return self._proxy
        async with self._lock:
            if self._proxy is None:
                if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_S:
                    raise PlatformUnavailable("platform WSDL not loaded: %s" % self._error)
                try:
                    self._proxy = await self._load()
                except (wsdl.WsdlError, zeep.exceptions.Error, etree.XMLSyntaxError, OSError, LookupError) as exc:
                    self._failed_at = time.monotonic()
                    self._error = str(exc)
                    raise PlatformUnavailable("platform WSDL not loaded: %s" % exc) from None
                self._failed_at = None
            return self._proxy

    async def _load(self) -> Any:
        path, note = await wsdl.resolve(self.source, self.cache_dir, self.http, self.timeout_s * 2)
        settings = zeep.Settings(strict=False, xml_huge_tree=False, raw_response=True)
        # parsing a WSDL is blocking CPU work: off the event loop
        client = await asyncio.to_thread(zeep.AsyncClient, str(path), transport=CheckedTransport(client=self.http),
                                         settings=settings)
        for service in client.wsdl.services.values():
            for port in service.ports.values():
                missing = [op for op in self.needed if op not in port.binding._operations]
                if missing:
                    continue
                address = self.endpoint or port.binding_options.get("address", "")
                self.note = note
                logger.info("platform %s: WSDL %s (%s), service at %s", self.label, self.source.describe(), note,
                            address)
                # AsyncClient.create_service() returns a synchronous proxy (zeep 4.3): bind the
                # async proxy ourselves so calls are awaited on httpx and never block the loop
                return AsyncServiceProxy(client, port.binding, address=address)
        raise LookupError("the WSDL has no port with the operations %s" % ", ".join(self.needed))

    async def send(self, operation: str, params: dict[str, Any]) -> etree._Element:
        """Call `operation`; the reply's `<operationResponse>` element. Raises PlatformUnavailable
        for anything but a SOAP answer (transport errors, faults, error pages, timeouts)."""
        proxy = await self.proxy()
        try:
            async with asyncio.timeout(self.timeout_s):
                response = await getattr(proxy, operation)(**params)
        except (TimeoutError, httpx.TimeoutException):
            raise PlatformUnavailable("no answer within %.1f s" % self.timeout_s) from None
        except httpx.HTTPError as exc:
            raise PlatformUnavailable("%s: %s" % (self.endpoint, http_error(exc))) from None
        except NotSoap as exc:
            raise PlatformUnavailable(str(exc)) from None
        except (zeep.exceptions.ValidationError, ValueError, TypeError) as exc:
            # zeep refusing to build the request from these parameters: a site WSDL that does
            # not match the spec. Sending it again cannot help (an outbox record goes dead)
            raise ScanboxError(Reason.BAD_REQUEST, "%s cannot be built from the platform's WSDL: %s"
                               % (operation, exc)) from None
        except zeep.exceptions.Error as exc:
            raise PlatformUnavailable("%s: %s" % (operation, exc)) from None
        return parse_envelope(response.content, response.headers.get("content-type", ""), operation,
                              response.status_code)


def parse_envelope(content: bytes, content_type: str, operation: str, status: int = 200) -> etree._Element:
    """The `<operationResponse>` element of a SOAP reply, whatever its namespace.

    The document's own XML declaration decides its encoding; a reply without one in a charset
    other than UTF-8 (a GBK Windows-era service) is decoded by its Content-Type."""
    charset = _charset(content_type)
    if charset and charset not in ("utf-8", "utf8") and not content.lstrip().startswith(b"<?xml"):
        try:
            content = content.decode(charset).encode("utf-8")
        except (LookupError, UnicodeDecodeError) as exc:
            raise PlatformUnavailable("platform reply is not %s: %s" % (charset, exc)) from None
    try:
        root = etree.fromstring(content, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise PlatformUnavailable("platform reply is not XML (%s): %s"
                                  % (exc, preview(content.decode("utf-8", "replace")))) from None
    body = root.find("{%s}Body" % SOAP_ENV)
    if root.tag != "{%s}Envelope" % SOAP_ENV or body is None or not len(body):
        raise PlatformUnavailable("platform reply is not a SOAP envelope: <%s>" % etree.QName(root).localname)
    answer = body[0]
    if answer.tag == "{%s}Fault" % SOAP_ENV:
        text = answer.findtext("faultstring") or "(no faultstring)"
        raise PlatformUnavailable("platform answered a SOAP fault: %s" % preview(text))
    if status >= 400:
        raise PlatformUnavailable("platform answered HTTP %d" % status)
    if etree.QName(answer).localname != operation + "Response":
        raise PlatformUnavailable("platform answered <%s> to %s" % (etree.QName(answer).localname, operation))
    return answer


def element_data(element: etree._Element) -> dict[str, Any]:
    """An element's children as data: text for leaves, nested dicts for structures, by local
    name (a site may or may not qualify them)."""
    out: dict[str, Any] = {}
    for child in element:
        if not isinstance(child.tag, str):
            continue  # comments, processing instructions
        name = etree.QName(child).localname
        value: Any = element_data(child) if len(child) else (child.text or "").strip()
        if name in out:
            out[name] = (out[name] if isinstance(out[name], list) else [out[name]]) + [value]
        else:
            out[name] = value
    return out


def _charset(content_type: str) -> str | None:
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "charset" and value:
            return value.strip('"').lower()
    return None
