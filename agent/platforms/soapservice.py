"""A platform's SOAP service from its WSDL, loaded once and on demand: the WSDL comes from config
(URL or file, see `wsdl`), is cached for offline starts, and a failed load is not retried on
every scan. zeep reads the site's WSDL (its namespace, its element names) in a process of its own
(`soapcompile`), once per WSDL: each operation whose parameters are all strings comes back as
the envelope zeep's `Client.create_message` builds, with a placeholder in each string, and each
request is that envelope with its strings filled in by lxml (zeep's 0.8 ms per request was a fifth
of a scan's CPU, and zeep itself 9 MiB of the daemon's memory). Any other request (a structured
parameter, one left out) is zeep's, loaded in the daemon on its first such call. The box's one
HTTP client (`transport.HttpClient`) posts it; the reply is read with lxml (`parse_envelope`), so
an element order or an extra element the WSDL did not foresee cannot lose an answer. The rhc and
wondersgroup adapters both use this.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any, Iterable

import msgspec
from lxml import etree

from agent.model import Reason, ScanboxError
from agent.platforms import soapcompile, wsdl
from agent.platforms.base import PlatformUnavailable
from agent.platforms.transport import HttpClient, NotSoap, check_xml, preview

logger = logging.getLogger(__name__)

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
# after a failed WSDL load, wait this long before trying again on demand
RETRY_S = 30.0
# reading a WSDL with zeep in its own process: a Pi takes a second or two, a huge WSDL longer
COMPILE_TIMEOUT_S = 120.0
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False,
                          remove_blank_text=True)
# replies keep the whitespace between elements (every value is stripped where it is read):
# dropping it at parse time cost a quarter of the parse
_REPLY_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


class WsdlUnusable(Exception):
    """zeep could not read the WSDL (its exception's text)."""


# what a WSDL that cannot be had or used raises on its way through zeep; anything else is logged
# with its traceback, and waits all the same
LOAD_ERRORS = (wsdl.WsdlError, WsdlUnusable, etree.XMLSyntaxError, OSError, LookupError)


class Template(msgspec.Struct, frozen=True, dict=True):
    """An operation's request as zeep built it with a placeholder in each string parameter, and
    where each parameter's element is (child indices from the envelope)."""

    envelope: etree._Element
    slots: dict[str, tuple[int, ...]]
    soapaction: str

    def render(self, params: dict[str, Any]) -> bytes | None:
        """The request's bytes when every parameter is a string given here (else None: zeep
        builds it). ValueError for text XML cannot carry. The envelope is filled in, written
        and given its placeholders back at once (no await between: one request at a time on the
        loop), not copied for each request."""
        if params.keys() != self.slots.keys() or not all(type(v) is str for v in params.values()):
            return None
        slots = self._slot_elements()
        try:
            for name, (element, _) in slots.items():
                element.text = params[name]
            return etree.tostring(self.envelope, encoding="utf-8", xml_declaration=True)
        finally:
            for element, placeholder in slots.values():  # nothing of the request (a code, a password) stays
                element.text = placeholder

    def _slot_elements(self) -> dict[str, tuple[etree._Element, str | None]]:
        """Each parameter's element in the envelope, and its placeholder: found once."""
        slots: dict[str, tuple[etree._Element, str | None]] | None = self.__dict__.get("_slots")
        if slots is None:
            slots = {}
            for name, path in self.slots.items():
                element = self.envelope
                for i in path:
                    element = element[i]
                slots[name] = (element, element.text)
            self.__dict__["_slots"] = slots  # frozen fields; the envelope's own elements kept beside them
        return slots


class Operation(msgspec.Struct):
    soapaction: str
    inputs: list[str]  # its request's element names, in the WSDL's order
    template: Template | None  # None: zeep builds each request (not all single strings)
    headers: dict[str, str] = {}  # its requests' HTTP headers: made from soapaction

    def __post_init__(self) -> None:
        self.headers = {"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '"%s"' % self.soapaction}


class Bound(msgspec.Struct):
    """The loaded WSDL's port that offers the operations, and where to send them."""

    path: str  # the WSDL (local) it was read from
    service: str
    port: str
    address: str
    operations: dict[str, Operation]
    # zeep's client and ServiceProxy for the port, loaded on the first request that needs zeep
    zeep: tuple[Any, Any] | None = None


class SoapService:
    """The operations `needed` of the WSDL at `source`, bound to `endpoint` (else the WSDL's)."""

    def __init__(self, label: str, source: wsdl.WsdlSource, cache_dir: Any, http: HttpClient,
                 endpoint: str | None, timeout_s: float, needed: Iterable[str]) -> None:
        self.label = label
        self.source = source
        self.cache_dir = Path(cache_dir)
        self.http = http
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.needed = tuple(needed)
        self.note: str | None = None
        self._bound: Bound | None = None
        self._lock = asyncio.Lock()
        self._zeep_lock = asyncio.Lock()
        # a child reading a WSDL, by compiled_name: it goes on when the scan that started it gives
        # up at its deadline, so the next one finds it read (or further along), not started again
        self._compiling: dict[str, asyncio.Task[dict[str, Any]]] = {}
        self._failed_at: float | None = None
        self._error = ""
        self.compiled_from_cache: bool | None = None  # how the last load got its WSDL read (tests, logs)

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
        compiled = await self._compiled(path)
        operations = {}
        for name, op in compiled["operations"].items():
            template = None
            if op["template"] is not None:
                template = Template(etree.fromstring(op["template"], _PARSER),
                                    {k: tuple(v) for k, v in op["slots"].items()}, op["soapaction"])
            operations[name] = Operation(op["soapaction"], list(op["inputs"]), template)
        address = self.endpoint or compiled["address"]
        self.note = note
        logger.info("platform %s: WSDL %s (%s), service at %s", self.label, self.source.describe(), note, address)
        return Bound(str(path), compiled["service"], compiled["port"], address, operations)

    async def _compiled(self, path: Path) -> dict[str, Any]:
        """The WSDL at `path` as `soapcompile` reads it: shipped with scanbox for its own WSDLs,
        else the copy kept under its digest, else from a child process (and then kept)."""
        name, compiled = await asyncio.to_thread(self._find_kept, path)
        self.compiled_from_cache = compiled is not None
        if compiled is not None:
            return compiled
        task = self._compiling.get(name)
        if task is None:
            task = self._compiling[name] = asyncio.get_running_loop().create_task(
                self._compile_and_keep(path, name), name="read WSDL %s" % self.label)
            task.add_done_callback(functools.partial(self._compiled_done, name))
        return await asyncio.shield(task)

    def _find_kept(self, path: Path) -> tuple[str, dict[str, Any] | None]:
        """(the result's file name, the result where scanbox ships it or the box kept it)."""
        name = compiled_name(path, self.needed)
        for kept in (SHIPPED_COMPILED / name, self.cache_dir / name):
            try:
                compiled: dict[str, Any] = json.loads(kept.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if compiled.get("version") == soapcompile.VERSION:
                return name, compiled
        return name, None

    def _compiled_done(self, name: str, task: asyncio.Task[dict[str, Any]]) -> None:
        self._compiling.pop(name, None)
        if task.cancelled():
            return
        error = task.exception()  # raised to whoever awaits it, and said here for when nobody does any more
        if error is not None:
            logger.warning("platform %s: reading the WSDL failed: %s", self.label, error or type(error).__name__)

    async def _compile_and_keep(self, path: Path, name: str) -> dict[str, Any]:
        started = time.monotonic()
        compiled = await _compile_in_child(str(path), list(self.needed))
        logger.info("platform %s: WSDL read by zeep (zeep %s) in %.1f s", self.label, compiled.get("zeep"),
                    time.monotonic() - started)
        await asyncio.to_thread(self._keep, name, compiled)
        return compiled

    def _keep(self, name: str, compiled: dict[str, Any]) -> None:
        try:
            self.cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            for old in self.cache_dir.glob("compiled-*.json"):
                old.unlink(missing_ok=True)
            kept = self.cache_dir / name
            temporary = kept.with_suffix(".tmp")
            temporary.write_text(json.dumps(compiled), encoding="utf-8")
            os.replace(temporary, kept)
        except OSError as exc:  # read again at the next start; nothing is lost
            logger.warning("platform %s: the read WSDL cannot be kept in %s: %s", self.label, self.cache_dir, exc)

    async def input_names(self, operation: str) -> list[str]:
        """The element names of an operation's request, in the WSDL's order."""
        return (await self._operation(operation)).inputs

    async def _operation(self, operation: str) -> Operation:
        bound = await self.bound()
        try:
            return bound.operations[operation]
        except KeyError:
            raise PlatformUnavailable("platform WSDL has no operation %s" % operation) from None

    async def send(self, operation: str, params: dict[str, Any]) -> etree._Element:
        """Call `operation`; the reply's `<operationResponse>` element. Raises PlatformUnavailable
        for anything but a SOAP answer (transport errors, faults, error pages, timeouts)."""
        bound = self._bound or await self.bound()
        op = bound.operations.get(operation) or await self._operation(operation)
        try:
            body = op.template.render(params) if op.template is not None else None
        except ValueError as exc:  # text XML cannot carry, as zeep's
            raise ScanboxError(Reason.BAD_REQUEST, "%s cannot be built from the platform's WSDL: %s"
                               % (operation, exc)) from None
        if body is None:
            body = etree.tostring(await self._zeeps(bound, operation, params), encoding="utf-8", xml_declaration=True)
        reply = await self.http.post(bound.address, body, op.headers, self.timeout_s)
        try:
            check_xml(reply)
        except NotSoap as exc:
            raise PlatformUnavailable(str(exc)) from None
        return parse_envelope(reply.content, reply.content_type, operation, reply.status)

    async def zeep_port(self) -> tuple[Any, Any]:
        """zeep's client and ServiceProxy for the bound port, loaded in the daemon (in a thread:
        parsing a WSDL is blocking CPU work) the first time a request needs them."""
        bound = await self.bound()
        async with self._zeep_lock:
            if bound.zeep is None:
                def load() -> tuple[Any, Any]:
                    client = soapcompile.client(bound.path)
                    return client, client.bind(bound.service, bound.port)
                try:
                    bound.zeep = await asyncio.to_thread(load)
                except soapcompile.Unusable as exc:
                    raise PlatformUnavailable("platform WSDL not usable: %s" % exc) from None
                logger.info("platform %s: zeep loaded for requests that are not all strings", self.label)
            return bound.zeep

    async def _zeeps(self, bound: Bound, operation: str, params: dict[str, Any]) -> etree._Element:
        client, proxy = await self.zeep_port()
        import zeep.exceptions  # loaded with zeep_port

        try:
            return client.create_message(proxy, operation, **params)
        except (zeep.exceptions.ValidationError, ValueError, TypeError) as exc:
            # zeep (or lxml) refusing to build the request from these parameters: a site WSDL
            # that does not match the spec, or text XML cannot carry. Sending it again cannot
            # help (an outbox record goes dead)
            raise ScanboxError(Reason.BAD_REQUEST, "%s cannot be built from the platform's WSDL: %s"
                               % (operation, exc)) from None
        except zeep.exceptions.Error as exc:
            raise PlatformUnavailable("%s: %s" % (operation, exc)) from None


# what zeep read from the WSDLs scanbox ships, for the operations its adapters need by default:
# a box on a shipped WSDL never runs zeep (tests/platforms/test_soap_compile.py keeps them true;
# `python -m agent.platforms.soapservice` writes them again)
SHIPPED_COMPILED = wsdl.SHIPPED / "compiled"


def compiled_name(path: Path, needed: Iterable[str]) -> str:
    """The file name of what zeep read from the WSDL at `path` for the operations `needed`: a
    digest of the WSDL's documents (its local imports included) and of what was asked."""
    digest = hashlib.sha256(json.dumps([soapcompile.VERSION, list(needed)]).encode())
    for name, content in wsdl.documents(path):
        digest.update(name.encode() + b"\0" + hashlib.sha256(content).digest())
    return "compiled-%s.json" % digest.hexdigest()[:32]


def shipped() -> list[tuple[Path, tuple[str, ...]]]:
    """The shipped WSDLs and the operations their adapters need by default."""
    from agent.config import RHC_OPERATION
    from agent.platforms.wondersgroup import OPERATIONS

    return [(wsdl.SHIPPED / "rhc.wsdl", (RHC_OPERATION,)),
            (wsdl.SHIPPED / "wondersgroup.wsdl", ("getAuthKey", *OPERATIONS))]


async def _compile_in_child(path: str, needed: list[str]) -> dict[str, Any]:
    """`soapcompile` in a child process (the daemon's own interpreter); raises WsdlUnusable or
    LookupError as reading the WSDL in the daemon would."""
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agent.platforms.soapcompile", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    try:
        async with asyncio.timeout(COMPILE_TIMEOUT_S):
            out, err = await child.communicate(json.dumps({"wsdl": path, "needed": needed}).encode())
    except TimeoutError:
        raise WsdlUnusable("zeep did not read the WSDL within %.0f s" % COMPILE_TIMEOUT_S) from None
    finally:
        if child.returncode is None:  # timed out, or the daemon stopping: no child left behind
            child.kill()
            await child.wait()
    try:
        result: dict[str, Any] = json.loads(out)
    except ValueError:
        lines = err.decode("utf-8", "replace").strip().splitlines()
        raise WsdlUnusable("reading the WSDL failed (exit %s): %s"
                           % (child.returncode, preview(lines[-1]) if lines else "no output")) from None
    if "error" in result:
        raise (LookupError if result.get("kind") == "lookup" else WsdlUnusable)(result["error"])
    return result


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
        root = etree.fromstring(content, _REPLY_PARSER)
    except etree.XMLSyntaxError as exc:
        raise PlatformUnavailable("platform reply is not XML (%s): %s"
                                  % (exc, preview(content.decode("utf-8", "replace")))) from None
    body = next(root.iterchildren(_BODY), None)  # as find() would, without parsing a path
    if root.tag != _ENVELOPE or body is None or not len(body):
        raise PlatformUnavailable("platform reply is not a SOAP envelope: <%s>" % etree.QName(root).localname)
    answer = body[0]
    if answer.tag == _FAULT:
        text = answer.findtext("faultstring") or "(no faultstring)"
        raise PlatformUnavailable("platform answered a SOAP fault: %s" % preview(text))
    if status >= 400:
        raise PlatformUnavailable("platform answered HTTP %d" % status)
    answered = etree.QName(answer).localname
    if answered != operation + "Response":
        raise PlatformUnavailable("platform answered <%s> to %s" % (answered, operation))
    return answer


_ENVELOPE = "{%s}Envelope" % SOAP_ENV
_BODY = "{%s}Body" % SOAP_ENV
_FAULT = "{%s}Fault" % SOAP_ENV


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


@functools.lru_cache(maxsize=16)  # a platform answers with one or two content types
def _charset(content_type: str) -> str | None:
    for part in content_type.split(";")[1:]:
        key, _, value = part.strip().partition("=")
        if key.lower() == "charset" and value:
            return value.strip('"').lower()
    return None


async def _write_shipped() -> None:
    SHIPPED_COMPILED.mkdir(exist_ok=True)
    for old in SHIPPED_COMPILED.glob("compiled-*.json"):
        old.unlink()
    for path, needed in shipped():
        compiled = await _compile_in_child(str(path), list(needed))
        compiled.pop("zeep")  # the box's zeep may be another release: the result is what counts
        target = SHIPPED_COMPILED / compiled_name(path, needed)
        target.write_text(json.dumps(compiled, ensure_ascii=False, indent=1, sort_keys=True) + "\n", encoding="utf-8")
        print(target)


if __name__ == "__main__":
    asyncio.run(_write_shipped())
