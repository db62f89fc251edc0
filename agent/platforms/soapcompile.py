"""A WSDL compiled by zeep, in a process of its own, into what the daemon needs to call it.

zeep (with requests, urllib3 and attrs, which it imports) costs a box about 9 MiB of memory and a
tenth of its start-up. The daemon needs it only to read the site's WSDL: which port offers the
operations, where it listens, each operation's SOAPAction and request element names, and each
request's envelope (zeep's `create_message` with a placeholder in each string parameter: the
Template that soapservice fills in with lxml). That is computed here, by

    python -m agent.platforms.soapcompile < {"wsdl": PATH, "needed": [...]}

which prints it as JSON, and kept beside the WSDL's cached copy under a digest of its documents:
a box reads its WSDL with zeep once per WSDL, not once per start, and zeep is never resident in
the daemon. A WSDL is input from the network: parsing it in a short-lived process also keeps a
parser's trouble (memory, time) out of the daemon. An operation whose request is not all single
strings (wondersgroup's syncCardInfo, a call that leaves a parameter out) is still built by zeep,
loaded in the daemon on its first such call.
"""

from __future__ import annotations

import json
import sys
from typing import Any

# bumped when what `compile_wsdl` returns changes: a cached result of another version is not used
VERSION = 1
PLACEHOLDER = "scanbox-template-%d-b7e1"


class Unusable(Exception):
    """The WSDL cannot be used (zeep's reason, or no port with the operations)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind  # "unusable" (zeep could not read it) or "lookup" (no such port)


def client(path: str) -> Any:
    """zeep's client for the WSDL at `path` (local files: its imports are the cached copies, so
    zeep's own transport never goes to the network)."""
    import zeep
    import zeep.exceptions

    try:
        return zeep.Client(path, settings=zeep.Settings(strict=False, xml_huge_tree=False))
    except zeep.exceptions.Error as exc:
        raise Unusable("unusable", str(exc)) from None


def find_port(zeep_client: Any, needed: list[str]) -> tuple[Any, Any]:
    """The first (service, port) whose binding offers every operation in `needed`."""
    for service in zeep_client.wsdl.services.values():
        for port in service.ports.values():
            if all(has_operation(port.binding, op) for op in needed):
                return service, port
    raise Unusable("lookup", "the WSDL has no port with the operations %s" % ", ".join(needed))


def has_operation(binding: Any, operation: str) -> bool:
    try:
        binding.get(operation)
    except ValueError:  # zeep: "Operation %r not found"
        return False
    return True


def compile_wsdl(path: str, needed: list[str]) -> dict[str, Any]:
    """What the daemon needs of the WSDL at `path`: the port offering `needed`, its address, and
    per operation its SOAPAction, its request's element names and, where every parameter is a
    single string, zeep's envelope with a placeholder in each (the template)."""
    from lxml import etree

    import zeep

    zeep_client = client(path)
    service, port = find_port(zeep_client, needed)
    proxy = zeep_client.bind(service.name, port.name)
    operations: dict[str, Any] = {}
    for name, operation in port.binding.all().items():
        body = operation.input.body if operation.input is not None else None
        elements = body.type.elements if body is not None else []
        envelope, slots = _template(zeep_client, proxy, name, elements)
        operations[name] = {
            "soapaction": operation.soapaction or "",
            "inputs": [element_name for element_name, _ in elements],
            "template": None if envelope is None else etree.tostring(envelope, encoding="unicode"),
            "slots": slots,
        }
    return {"version": VERSION, "zeep": zeep.__version__, "service": service.name, "port": port.name,
            "address": port.binding_options.get("address", ""), "operations": operations}


def _template(zeep_client: Any, proxy: Any, operation: str,
              elements: list[tuple[str, Any]]) -> tuple[Any, dict[str, list[int]] | None]:
    """zeep's request for `operation` with a placeholder in each parameter and where each one
    landed (child indices from the envelope), when they are all single strings and each
    placeholder lands in exactly one element's text; else (None, None)."""
    import zeep.xsd

    if not elements or any(not isinstance(e.type, zeep.xsd.String) or e.max_occurs != 1 for _, e in elements):
        return None, None
    placeholders = {PLACEHOLDER % i: name for i, (name, _) in enumerate(elements)}
    envelope = zeep_client.create_message(proxy, operation, **{n: p for p, n in placeholders.items()})
    slots: dict[str, list[int]] = {}
    for element in envelope.iter():
        if element.text in placeholders:
            if placeholders[element.text] in slots or len(element):
                return None, None
            path = []
            node = element
            while node.getparent() is not None:
                path.append(node.getparent().index(node))
                node = node.getparent()
            slots[placeholders[element.text]] = list(reversed(path))
    if slots.keys() != set(placeholders.values()) or any(
            PLACEHOLDER.split("%")[0] in (a or "") for e in envelope.iter() for a in (e.tail, *e.attrib.values())):
        return None, None
    return envelope, slots


def main() -> int:
    request = json.load(sys.stdin)
    try:
        result: dict[str, Any] = compile_wsdl(request["wsdl"], list(request["needed"]))
    except Unusable as exc:
        result = {"error": str(exc), "kind": exc.kind}
    except Exception as exc:  # zeep's ValueError for a schema it cannot read, lxml's syntax errors
        result = {"error": "%s: %s" % (type(exc).__name__, exc), "kind": "unusable"}
    json.dump(result, sys.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main())
