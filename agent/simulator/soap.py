"""The RHC simulator behind a SOAP endpoint, as a JAX-WS deployment publishes it.

The WSDL it serves is rendered from one template with the site-controlled parts as parameters
(target namespace, parameter names, schema inline or imported from `?xsd=1`), so tests can prove
the adapter works from whatever WSDL a site publishes. The default rendering is the WSDL that
ships with scanbox (agent/platforms/wsdl/rhc.wsdl).

Faults are injected on request (`/_sim/faults`): latency, HTTP 500 with an HTML page, garbage,
an HTML 200 (a captive portal), an empty body, a hang, a connection reset.
"""

from __future__ import annotations

import asyncio
import json
import logging
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Literal

from aiohttp import web
from lxml import etree

from agent.simulator.rhc import RhcSimulator

logger = logging.getLogger(__name__)

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
DEFAULT_NAMESPACE = "http://webservice.healthcard.rhc/"
OPERATION = "RHCMessageServer"
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)

FaultMode = Literal["latency", "http500", "garbage", "html", "empty", "hang", "reset", "hold"]
FAULT_MODES: tuple[str, ...] = ("latency", "http500", "garbage", "html", "empty", "hang", "reset")


@dataclass(frozen=True)
class WsdlStyle:
    """The parts of the WSDL a site controls."""

    namespace: str = DEFAULT_NAMESPACE
    action_part: str = "action"
    message_part: str = "message"
    external_schema: bool = False


_SCHEMA = """<xsd:schema xmlns:tns="{ns}" xmlns:xsd="http://www.w3.org/2001/XMLSchema" targetNamespace="{ns}" version="1.0">
      <xsd:element name="RHCMessageServer" type="tns:RHCMessageServer"/>
      <xsd:element name="RHCMessageServerResponse" type="tns:RHCMessageServerResponse"/>
      <xsd:complexType name="RHCMessageServer">
        <xsd:sequence>
          <xsd:element name="{action}" type="xsd:string" minOccurs="0"/>
          <xsd:element name="{message}" type="xsd:string" minOccurs="0"/>
        </xsd:sequence>
      </xsd:complexType>
      <xsd:complexType name="RHCMessageServerResponse">
        <xsd:sequence>
          <xsd:element name="return" type="xsd:string" minOccurs="0"/>
        </xsd:sequence>
      </xsd:complexType>
    </xsd:schema>"""

_WSDL = """<?xml version="1.0" encoding="UTF-8"?>
<!-- String RHCMessageServer(String action, String message): spec 000 (QWB 002-2017), as a
     JAX-WS document/literal wrapped service. A site's own WSDL replaces this one (platform.wsdl). -->
<definitions xmlns="http://schemas.xmlsoap.org/wsdl/" xmlns:soap="http://schemas.xmlsoap.org/wsdl/soap/" xmlns:tns="{ns}" xmlns:xsd="http://www.w3.org/2001/XMLSchema" targetNamespace="{ns}" name="ElecHealthCardWebSeviceService">
  <types>
    {types}
  </types>
  <message name="RHCMessageServer">
    <part name="parameters" element="tns:RHCMessageServer"/>
  </message>
  <message name="RHCMessageServerResponse">
    <part name="parameters" element="tns:RHCMessageServerResponse"/>
  </message>
  <portType name="ElecHealthCardWebSevice">
    <operation name="RHCMessageServer">
      <input message="tns:RHCMessageServer"/>
      <output message="tns:RHCMessageServerResponse"/>
    </operation>
  </portType>
  <binding name="ElecHealthCardWebSevicePortBinding" type="tns:ElecHealthCardWebSevice">
    <soap:binding transport="http://schemas.xmlsoap.org/soap/http" style="document"/>
    <operation name="RHCMessageServer">
      <soap:operation soapAction=""/>
      <input>
        <soap:body use="literal"/>
      </input>
      <output>
        <soap:body use="literal"/>
      </output>
    </operation>
  </binding>
  <service name="ElecHealthCardWebSeviceService">
    <port name="ElecHealthCardWebSevicePort" binding="tns:ElecHealthCardWebSevicePortBinding">
      <soap:address location="{address}"/>
    </port>
  </service>
</definitions>
"""

SHIPPED_ADDRESS = "http://130.130.3.111:8080/healthCard/services/elecHealthCardWebSevice"


def render_wsdl(address: str, style: WsdlStyle = WsdlStyle()) -> str:
    if style.external_schema:
        types = ('<xsd:schema xmlns:xsd="http://www.w3.org/2001/XMLSchema">\n'
                 '      <xsd:import namespace="%s" schemaLocation="%s?xsd=1"/>\n    </xsd:schema>'
                 % (style.namespace, address))
    else:
        types = _SCHEMA.format(ns=style.namespace, action=style.action_part, message=style.message_part)
    return _WSDL.format(ns=style.namespace, types=types, address=address)


def render_xsd(style: WsdlStyle) -> str:
    return ('<?xml version="1.0" encoding="UTF-8"?>\n'
            + _SCHEMA.format(ns=style.namespace, action=style.action_part, message=style.message_part) + "\n")


@dataclass
class Fault:
    mode: FaultMode
    count: int | None = 1  # None: until cleared
    latency_s: float = 0.0


@dataclass
class Faults:
    queue: list[Fault] = field(default_factory=list)
    # added to every request, for benchmarks and demos of a slow platform
    base_latency_s: float = 0.0
    # a share of requests (0..1) answered with `flaky_mode`, from a seeded generator
    flaky_rate: float = 0.0
    flaky_mode: FaultMode = "http500"
    rng: random.Random = field(default_factory=lambda: random.Random(0))

    def add(self, fault: Fault) -> None:
        self.queue.append(fault)

    def clear(self) -> None:
        self.queue.clear()
        self.flaky_rate = 0.0

    def take(self) -> Fault | None:
        if not self.queue:
            if self.flaky_rate and self.rng.random() < self.flaky_rate:
                return Fault(self.flaky_mode)
            return None
        fault = self.queue[0]
        if fault.count is not None:
            fault.count -= 1
            if fault.count <= 0:
                self.queue.pop(0)
        return fault


class SimServer:
    """The simulator on a TCP port: SOAP endpoint, WSDL, and the /_sim control API."""

    def __init__(self, sim: RhcSimulator, style: WsdlStyle = WsdlStyle(),
                 path: str = "/healthCard/services/elecHealthCardWebSevice") -> None:
        self.sim = sim
        self.style = style
        self.path = path
        self.faults = Faults()
        self.requests = 0
        # time each SOAP request spent inside the simulator (ms), so benchmarks can subtract it
        self.service_ms: list[float] = []
        # when each request arrived (time.monotonic()), faulted ones included: retry timing
        self.arrivals: list[float] = []
        self.arrived = asyncio.Event()  # set by the first request (a test waits for it)
        self.in_flight = 0
        self.max_in_flight = 0  # the most requests it was answering at once
        # every GET of the endpoint (the WSDL, its schemas) by query: how often a box fetches them
        self.documents_served: list[str] = []
        self._runner: web.AppRunner | None = None
        self._closing = asyncio.Event()
        # requests a "hold" fault keeps until release_held(), then handles as usual: a test
        # orders one request's handling after others' without guessing at times
        self.held = 0
        self._release = asyncio.Event()
        self.host = ""
        self.port = 0
        app = web.Application(client_max_size=4 * 1024 * 1024)
        app.router.add_get(path, self._document)
        app.router.add_post(path, self._post)
        app.router.add_get("/_sim/residents", self._residents)
        app.router.add_post("/_sim/dynamic", self._dynamic)
        app.router.add_get("/_sim/journal", self._journal)
        app.router.add_get("/_sim/service_ms", self._service_ms)
        app.router.add_post("/_sim/faults", self._add_fault)
        app.router.add_delete("/_sim/faults", self._clear_faults)
        self.app = app

    @property
    def endpoint(self) -> str:
        return "http://%s:%d%s" % (self.host, self.port, self.path)

    @property
    def wsdl_url(self) -> str:
        return self.endpoint + "?wsdl"

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> "SimServer":
        self._closing.clear()
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False, shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port, reuse_address=True)
        await site.start()
        self.host, self.port = self._runner.addresses[0][:2]
        return self

    def release_held(self) -> None:
        """Requests held by a "hold" fault go on to be handled (and later ones are not held)."""
        self._release.set()

    async def close(self) -> None:
        self._closing.set()  # ends requests held by a "hang" fault
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # --- SOAP ------------------------------------------------------------------------------

    async def _document(self, request: web.Request) -> web.Response:
        self.documents_served.append(request.query_string)
        return await self._get(request)

    async def _get(self, request: web.Request) -> web.Response:
        if "wsdl" in request.query:
            return web.Response(text=render_wsdl(self.endpoint, self.style), content_type="text/xml")
        if request.query.get("xsd") == "1" and self.style.external_schema:
            return web.Response(text=render_xsd(self.style), content_type="text/xml")
        return web.Response(status=404, text="no such document")

    async def _post(self, request: web.Request) -> web.StreamResponse:
        started = time.perf_counter()
        self.arrivals.append(time.monotonic())
        del self.arrivals[:-100000]
        self.arrived.set()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            self.requests += 1
            if self.faults.base_latency_s:
                await asyncio.sleep(self.faults.base_latency_s)
            fault = self.faults.take()
            if fault is not None:
                response = await self._apply(fault, request)
                if response is not None:
                    return response
            return await self._soap(request)  # the platform's own handling (subclasses: theirs)
        finally:
            self.in_flight -= 1
            self.service_ms.append((time.perf_counter() - started) * 1000)
            del self.service_ms[:-100000]

    async def _soap(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        try:
            action, message = self._unwrap(body)
        except ValueError as exc:
            return _soap_fault(str(exc))
        reply = self.sim.handle(action, message)
        return web.Response(body=_soap_reply(self.style.namespace, reply), content_type="text/xml",
                            charset="utf-8")

    def _unwrap(self, body: bytes) -> tuple[str | None, str | None]:
        call = soap_call(body)
        if call is None or call.tag != "{%s}%s" % (self.style.namespace, OPERATION):
            raise ValueError("Cannot find dispatch method for %s" % (call.tag if call is not None else "(empty body)"))
        parts = {self.style.action_part: None, self.style.message_part: None}
        for child in call:
            if child.tag not in parts:
                raise ValueError("Unmarshalling Error: unexpected element %s (expected %s)"
                                 % (child.tag, ", ".join(parts)))
            parts[child.tag] = child.text
        return parts[self.style.action_part], parts[self.style.message_part]

    async def _apply(self, fault: Fault, request: web.Request) -> web.StreamResponse | None:
        if fault.mode == "latency":
            await asyncio.sleep(fault.latency_s)
            return None
        if fault.mode == "http500":
            return web.Response(status=500, content_type="text/html",
                                text="<html><body><h1>HTTP Status 500 - Internal Server Error</h1></body></html>")
        if fault.mode == "html":
            return web.Response(status=200, content_type="text/html",
                                text="<html><head><title>Login</title></head><body>Please log in</body></html>")
        if fault.mode == "garbage":
            return web.Response(status=200, content_type="text/xml", body=b"\x00\xff<soap:Env\x13\x88garbage")
        if fault.mode == "empty":
            return web.Response(status=200, content_type="text/xml", body=b"")
        if fault.mode == "hold":
            self.held += 1
            release = asyncio.ensure_future(self._release.wait())
            closing = asyncio.ensure_future(self._closing.wait())
            try:
                await asyncio.wait({release, closing}, return_when=asyncio.FIRST_COMPLETED)
            finally:
                release.cancel()
                closing.cancel()
                self.held -= 1
            return None
        if fault.mode == "hang":
            await self._closing.wait()  # the client gives up long before; the server closing ends it
            return web.Response(status=503)
        if fault.mode == "reset":
            transport = request.transport
            sock = transport.get_extra_info("socket") if transport else None
            if sock is not None:
                # linger 0: close sends RST, as a crashed server or a middlebox does
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            if transport is not None:
                transport.abort()
            raise asyncio.CancelledError
        return None

    # --- control API -----------------------------------------------------------------------

    async def _residents(self, request: web.Request) -> web.Response:
        return web.json_response(self.sim.snapshot())

    async def _dynamic(self, request: web.Request) -> web.Response:
        data = await _json(request)
        try:
            code = self.sim.issue_dynamic(str(data["id_card"]), float(data.get("ttl_s", self.sim.dynamic_ttl_s)))
        except (KeyError, ValueError) as exc:
            return web.json_response({"error": "need a known id_card: %s" % exc}, status=400)
        return web.json_response({"qr": code})

    async def _journal(self, request: web.Request) -> web.Response:
        return web.json_response([e.to_json() for e in self.sim.journal])

    async def _service_ms(self, request: web.Request) -> web.Response:
        return web.json_response(self.service_ms)

    async def _add_fault(self, request: web.Request) -> web.Response:
        data = await _json(request)
        mode = data.get("mode")
        if mode not in FAULT_MODES:
            return web.json_response({"error": "mode must be one of %s" % ", ".join(FAULT_MODES)}, status=400)
        if "rate" in data:  # {"mode": "http500", "rate": 0.3}: a share of all requests
            self.faults.flaky_mode, self.faults.flaky_rate = mode, float(data["rate"])
            return web.json_response({"ok": True})
        count = data.get("count", 1)
        self.faults.add(Fault(mode, None if count is None else int(count), float(data.get("latency_s", 0))))
        return web.json_response({"ok": True})

    async def _clear_faults(self, request: web.Request) -> web.Response:
        self.faults.clear()
        return web.json_response({"ok": True})


async def _json(request: web.Request) -> dict[str, Any]:
    try:
        data = await request.json()
    except (json.JSONDecodeError, UnicodeDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def _soap_reply(namespace: str, text: str) -> bytes:
    env = etree.Element("{%s}Envelope" % SOAP_ENV, nsmap={"S": SOAP_ENV})
    body = etree.SubElement(env, "{%s}Body" % SOAP_ENV)
    resp = etree.SubElement(body, "{%s}RHCMessageServerResponse" % namespace, nsmap={"ns2": namespace})
    etree.SubElement(resp, "return").text = text
    return etree.tostring(env, xml_declaration=True, encoding="UTF-8")


def soap_call(body: bytes) -> Any:
    """The operation element of a SOAP 1.1 request (None for an empty Body); ValueError with the
    text JAX-WS answers for a request that is not XML or not an envelope."""
    try:
        root = etree.fromstring(body, _PARSER)
    except etree.XMLSyntaxError as exc:
        raise ValueError("Unmarshalling Error: %s" % exc) from None
    if root.tag != "{%s}Envelope" % SOAP_ENV:
        raise ValueError("Unmarshalling Error: not a SOAP 1.1 envelope: %s" % root.tag)
    body_el = root.find("{%s}Body" % SOAP_ENV)
    return body_el[0] if body_el is not None and len(body_el) else None


def _soap_fault(text: str) -> web.Response:
    env = etree.Element("{%s}Envelope" % SOAP_ENV, nsmap={"S": SOAP_ENV})
    body = etree.SubElement(env, "{%s}Body" % SOAP_ENV)
    fault = etree.SubElement(body, "{%s}Fault" % SOAP_ENV)
    etree.SubElement(fault, "faultcode").text = "S:Client"
    etree.SubElement(fault, "faultstring").text = text
    return web.Response(status=500, body=etree.tostring(env, xml_declaration=True, encoding="UTF-8"),
                        content_type="text/xml", charset="utf-8")
