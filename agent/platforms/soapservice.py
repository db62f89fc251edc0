"""A platform's SOAP service from its WSDL, loaded once and on demand: the WSDL comes from config
(URL or file, see `wsdl`), is cached for offline starts, and a failed load is not retried on
every scan. zeep builds each request from the site's WSDL (its namespace, its element names,
through `Client.create_message`; an operation whose parameters are all strings is built by zeep
once, and each request is that envelope with its strings filled in by lxml: zeep's 0.8 ms per
request was a fifth of a scan's CPU); the box's one HTTP client (`transport.HttpClient`) posts it;
the reply is read with lxml (`parse_envelope`), so an element order or an extra element the WSDL
did not foresee cannot lose an answer. The rhc and wondersgroup adapters both use this.
"""

from __future__ import annotations

import asyncio
import copy
import logging
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable

from lxml import etree

from agent.model import Reason, ScanboxError
from agent.platforms import wsdl
from agent.platforms.base import PlatformUnavailable
from agent.platforms.transport import HttpClient, NotSoap, check_xml, preview

if TYPE_CHECKING:
    import zeep

# zeep (with requests and urllib3, which its transports import) is loaded with the first WSDL,
# in the thread that parses it: not at start-up, and not on the event loop

logger = logging.getLogger(__name__)

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
# after a failed WSDL load, wait this long before trying again on demand
RETRY_S = 30.0
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False,
                          remove_blank_text=True)


class WsdlUnusable(Exception):
    """zeep could not read the WSDL (its exception's text)."""


# what a WSDL that cannot be had or used raises on its way through zeep; anything else (zeep's
# ValueError for a schema's unreadable minOccurs) is logged with its traceback, and waits all the same
LOAD_ERRORS = (wsdl.WsdlError, WsdlUnusable, etree.XMLSyntaxError, OSError, LookupError)


@dataclass(frozen=True)
class Template:
    """An operation's request as zeep built it with a placeholder in each string parameter, and
    where each parameter's element is (child indices from the envelope)."""

    envelope: etree._Element
    slots: dict[str, tuple[int, ...]]
    soapaction: str


@dataclass(frozen=True)
class Bound:
    """The loaded WSDL's port that offers the operations, and where to send them."""

    client: zeep.Client
    proxy: Any  # zeep's ServiceProxy for the port (what create_message builds against)
    binding: Any
    address: str
    # per operation: its template, or None when zeep must build each request (not all strings)
    templates: dict[str, Template | None] = field(default_factory=dict)


class SoapService:
    """The operations `needed` of the WSDL at `source`, bound to `endpoint` (else the WSDL's)."""

    def __init__(self, label: str, source: wsdl.WsdlSource, cache_dir: Any, http: HttpClient,
                 endpoint: str | None, timeout_s: float, needed: Iterable[str]) -> None:
        self.label = label
        self.source = source
        self.cache_dir = cache_dir
        self.http = http
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.needed = tuple(needed)
        self.note: str | None = None
        self._bound: Bound | None = None
        self._lock = asyncio.Lock()
        self._failed_at: float | None = None
        self._error = ""

    @property
    def loaded(self) -> bool:
        return self._bound is not None

    async def bound(self) -> Bound:
        if self._bound is not None:
            return self._bound
        async with self._lock:
            if self._bound is None:
                if self._failed_at is not None and time.monotonic() - self._failed_at < RETRY_S:
                    raise PlatformUnavailable("platform WSDL not loaded: %s" % self._error)
                try:
                    self._bound = await self._load()
                except Exception as exc:
                    # whatever stopped the load, it waits RETRY_S: a box whose WSDL cannot be
                    # used must not fetch it again for every scan, authKey and upload
                    if not isinstance(exc, LOAD_ERRORS):
                        logger.error("platform %s: the WSDL could not be loaded", self.label, exc_info=True)
                    self._failed_at = time.monotonic()
                    self._error = (str(exc) or type(exc).__name__) if isinstance(exc, LOAD_ERRORS) \
                        else "%s: %s" % (type(exc).__name__, exc)
                    raise PlatformUnavailable("platform WSDL not loaded: %s" % self._error) from None
                self._failed_at = None
            return self._bound

    async def _load(self) -> Bound:
        path, note = await wsdl.resolve(self.source, self.cache_dir, self.http, self.timeout_s * 2)
        # parsing a WSDL is blocking CPU work: off the event loop. The cached copy's imports are
        # local files, so zeep's own (blocking) transport never goes to the network
        client = await asyncio.to_thread(_client, str(path))
        for service in client.wsdl.services.values():
            for port in service.ports.values():
                if not all(_has_operation(port.binding, op) for op in self.needed):
                    continue
                address = self.endpoint or port.binding_options.get("address", "")
                self.note = note
                logger.info("platform %s: WSDL %s (%s), service at %s", self.label, self.source.describe(), note,
                            address)
                return Bound(client, client.bind(service.name, port.name), port.binding, address)
        raise LookupError("the WSDL has no port with the operations %s" % ", ".join(self.needed))

    async def input_names(self, operation: str) -> list[str]:
        """The element names of an operation's request, in the WSDL's order."""
        bound = await self.bound()
        return [name for name, _ in bound.binding.get(operation).input.body.type.elements]

    async def send(self, operation: str, params: dict[str, Any]) -> etree._Element:
        """Call `operation`; the reply's `<operationResponse>` element. Raises PlatformUnavailable
        for anything but a SOAP answer (transport errors, faults, error pages, timeouts)."""
        bound = await self.bound()
        import zeep.exceptions  # loaded with the WSDL

        try:
            envelope, soapaction = self._from_template(bound, operation, params)
            if envelope is None:
                envelope = bound.client.create_message(bound.proxy, operation, **params)
        except (zeep.exceptions.ValidationError, ValueError, TypeError) as exc:
            # zeep (or lxml) refusing to build the request from these parameters: a site WSDL
            # that does not match the spec, or text XML cannot carry. Sending it again cannot
            # help (an outbox record goes dead)
            raise ScanboxError(Reason.BAD_REQUEST, "%s cannot be built from the platform's WSDL: %s"
                               % (operation, exc)) from None
        except zeep.exceptions.Error as exc:
            raise PlatformUnavailable("%s: %s" % (operation, exc)) from None
        headers = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '"%s"' % soapaction}
        reply = await self.http.post(bound.address, etree.tostring(envelope, encoding="utf-8", xml_declaration=True),
                                     headers, self.timeout_s)
        try:
            check_xml(reply)
        except NotSoap as exc:
            raise PlatformUnavailable(str(exc)) from None
        return parse_envelope(reply.content, reply.content_type, operation, reply.status)


    def _from_template(self, bound: Bound, operation: str,
                       params: dict[str, Any]) -> tuple[etree._Element | None, str]:
        """The request from the operation's template when every parameter is a string given here
        (else (None, soapaction): zeep builds it)."""
        if operation not in bound.templates:
            bound.templates[operation] = _template(bound, operation)
        template = bound.templates[operation]
        if template is None:
            return None, bound.binding.get(operation).soapaction or ""
        if params.keys() != template.slots.keys() or not all(type(v) is str for v in params.values()):
            return None, template.soapaction
        envelope = copy.deepcopy(template.envelope)
        for name, path in template.slots.items():
            element = envelope
            for i in path:
                element = element[i]
            element.text = params[name]  # ValueError for text XML cannot carry, as zeep's
        return envelope, template.soapaction


def _client(path: str) -> zeep.Client:
    import zeep
    import zeep.exceptions

    try:
        return zeep.Client(path, settings=zeep.Settings(strict=False, xml_huge_tree=False))
    except zeep.exceptions.Error as exc:
        raise WsdlUnusable(str(exc)) from None


PLACEHOLDER = "scanbox-template-%d-b7e1"


def _template(bound: Bound, operation: str) -> Template | None:
    """zeep's request for `operation` with a placeholder in each parameter, when they are all
    single strings and each placeholder lands in exactly one element's text; else None."""
    import zeep.xsd

    op = bound.binding.get(operation)
    elements = op.input.body.type.elements if op.input.body is not None else []
    if not elements or any(not isinstance(e.type, zeep.xsd.String) or e.max_occurs != 1 for _, e in elements):
        return None
    placeholders = {PLACEHOLDER % i: name for i, (name, _) in enumerate(elements)}
    envelope = bound.client.create_message(bound.proxy, operation, **{n: p for p, n in placeholders.items()})
    slots: dict[str, tuple[int, ...]] = {}
    for element in envelope.iter():
        if element.text in placeholders:
            if placeholders[element.text] in slots or len(element):
                return None
            path = []
            node = element
            while node.getparent() is not None:
                path.append(node.getparent().index(node))
                node = node.getparent()
            slots[placeholders[element.text]] = tuple(reversed(path))
    if slots.keys() != set(placeholders.values()) or any(
            PLACEHOLDER.split("%")[0] in (a or "") for e in envelope.iter() for a in (e.tail, *e.attrib.values())):
        return None
    return Template(envelope, slots, op.soapaction or "")


def _has_operation(binding: Any, operation: str) -> bool:
    try:
        binding.get(operation)
    except ValueError:  # zeep: "Operation %r not found"
        return False
    return True


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
