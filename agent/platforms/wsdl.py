"""The platform's own WSDL: fetched from a URL (with every schema it imports), kept in the state
directory, and used from there when the platform is down at boot.

Deployed platforms are JAX-WS services whose WSDL the site controls (namespace, part names), so
the adapter works from what the site publishes; a default WSDL ships for sites that give none.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from pathlib import Path
from urllib.parse import urljoin, urlparse

import msgspec
from lxml import etree

from agent.platforms.base import PlatformUnavailable
from agent.platforms.transport import HttpClient

logger = logging.getLogger(__name__)

SHIPPED = Path(__file__).parent / "wsdl"
MAX_DOCUMENTS = 32
MAX_DOCUMENT_BYTES = 4 * 1024 * 1024

_IMPORTS = (
    ("{http://schemas.xmlsoap.org/wsdl/}import", "location"),
    ("{http://www.w3.org/2001/XMLSchema}import", "schemaLocation"),
    ("{http://www.w3.org/2001/XMLSchema}include", "schemaLocation"),
)
# parse without entities, DTDs or network: a WSDL is input from the network like any other
_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=False)


class WsdlError(Exception):
    """The WSDL could not be had: neither fetched nor cached, or not usable."""


class WsdlSource(msgspec.Struct, frozen=True):
    """Where the WSDL comes from: a URL, a local file, or the one shipped with scanbox."""

    location: str | None
    shipped_name: str

    @property
    def is_url(self) -> bool:
        return bool(self.location) and urlparse(self.location or "").scheme in ("http", "https")

    def describe(self) -> str:
        return self.location or "shipped %s" % self.shipped_name


async def resolve(source: WsdlSource, cache_dir: Path, http: HttpClient,
                  timeout_s: float) -> tuple[Path, str]:
    """The local path of the WSDL to load and a note on where it came from.

    A URL is fetched and its copy in `cache_dir` refreshed; when it cannot be fetched the cached
    copy is used. Raises WsdlError when there is neither."""
    if not source.location:
        return SHIPPED / source.shipped_name, "shipped default"
    if not source.is_url:
        path = Path(source.location.removeprefix("file://"))
        if not path.is_file():
            raise WsdlError("WSDL file %s does not exist" % path)
        return path, "file %s" % path
    current = cache_dir / "current"
    try:
        documents = await _fetch_tree(source.location or "", http, timeout_s)
    except (PlatformUnavailable, WsdlError, etree.XMLSyntaxError) as exc:
        cached = current / "0.wsdl"
        if cached.is_file():
            logger.warning("WSDL %s unavailable (%s); using the copy cached %s", source.location,
                           _describe(exc), _mtime(cached))
            return cached, "cached copy"
        raise WsdlError("cannot fetch WSDL %s (%s) and no copy is cached" % (source.location,
                                                                           _describe(exc))) from exc
    _store(documents, cache_dir)
    return current / "0.wsdl", "fetched from %s" % source.location


async def _fetch_tree(url: str, http: HttpClient, timeout_s: float) -> dict[str, bytes]:
    """The WSDL at `url` and everything it imports, with imports rewritten to local names."""
    names: dict[str, str] = {url: "0.wsdl"}
    queue = [url]
    documents: dict[str, bytes] = {}
    while queue:
        doc_url = queue.pop(0)
        response = await http.get(doc_url, timeout_s=timeout_s)
        if response.status >= 300:
            raise WsdlError("HTTP %d for %s" % (response.status, doc_url))
        if len(response.content) > MAX_DOCUMENT_BYTES:
            raise WsdlError("%s is larger than %d bytes" % (doc_url, MAX_DOCUMENT_BYTES))
        root = etree.fromstring(response.content, _PARSER)
        for tag, attr in _IMPORTS:
            for element in root.iter(tag):
                location = element.get(attr)
                if not location:
                    continue
                target = urljoin(doc_url, location)
                if target not in names:
                    if len(names) >= MAX_DOCUMENTS:
                        raise WsdlError("%s imports more than %d documents" % (url, MAX_DOCUMENTS))
                    names[target] = "%d.%s" % (len(names), "wsdl" if "wsdl" in tag else "xsd")
                    queue.append(target)
                element.set(attr, names[target])
        documents[names[doc_url]] = etree.tostring(root, xml_declaration=True, encoding="UTF-8")
    return documents


def _store(documents: dict[str, bytes], cache_dir: Path) -> None:
    """Replace the cached copy as a whole: `current` is a symlink swapped atomically, so a power
    cut leaves the old copy or the new one, never a mix."""
    cache_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    version = "v%d" % time.time_ns()
    fresh = cache_dir / version
    fresh.mkdir(mode=0o700)
    for name, content in documents.items():
        path = fresh / name
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(content)
            fh.flush()
            os.fsync(fh.fileno())
    link = cache_dir / "current.tmp"
    link.unlink(missing_ok=True)
    link.symlink_to(version)
    os.replace(link, cache_dir / "current")
    dir_fd = os.open(cache_dir, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
    for old in cache_dir.glob("v*"):
        if old.name != version:
            shutil.rmtree(old, ignore_errors=True)


def _mtime(path: Path) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(path.stat().st_mtime).isoformat(timespec="seconds")


def _describe(exc: BaseException) -> str:
    if isinstance(exc, PlatformUnavailable):
        return exc.message
    return str(exc) or type(exc).__name__


def documents(path: Path) -> list[tuple[str, bytes]]:
    """The WSDL at `path` and the local documents it imports (relative names, as the cached copy
    has them), each with its content: what a WSDL read by zeep depends on."""
    out: list[tuple[str, bytes]] = []
    seen: set[Path] = set()
    queue = [Path(path).resolve()]
    while queue and len(out) < MAX_DOCUMENTS:
        current = queue.pop(0)
        if current in seen:
            continue
        seen.add(current)
        try:
            content = current.read_bytes()
        except OSError:
            continue  # zeep says so when it reads it
        out.append((current.name, content))
        try:
            root = etree.fromstring(content, _PARSER)
        except etree.XMLSyntaxError:
            continue
        for tag, attr in _IMPORTS:
            for element in root.iter(tag):
                location = element.get(attr) or ""
                if location and not urlparse(location).scheme:
                    queue.append((current.parent / location).resolve())
    return out
