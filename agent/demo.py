"""`scanbox demo`: the whole box on one machine, no hardware, no network.

The daemon with an in-process RHC simulator, a scanner on stdin (type or paste a code, press
Enter), the HIS API on a Unix socket and on localhost TCP, and every scan and result printed as
it happens (personal data masked, as on the box's display).
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, TextIO

from agent.config import validate
from agent.daemon import Daemon
from agent.events import Event, ScanRead, SourceChanged, Verified
from agent.model import Result
from agent.privacy import mask_id_number, mask_name, mask_qr
from agent.simulator.rhc import RhcSimulator
from agent.simulator.soap import SimServer

DEMO_SITE = {
    "org_code": "45600001X",
    "department": "5500",
    "hospital_code": "QH0001",
    "hospital_name": "西宁市第一人民医院",
    "city_code": "630100",
    "city_name": "西宁市",
    "channel": "01",
    "medstep": "010101",
}


# the demo's HTTP/WebSocket token (HTTP has no trusted networks: a browser on the same machine is
# any web page's reach). A real box's tokens are long random strings in its secrets file.
DEMO_TOKEN = "demo-token-2f8a61c4"  # as long and mixed as config check demands of any token


def demo_config(sim: SimServer, state_dir: Path, tcp: str | None, stdin: bool,
                http: str | None = None) -> dict[str, Any]:
    return {
        "device": {"id": "demo", "state_dir": str(state_dir)},
        "site": DEMO_SITE,
        "platform": {
            "kind": "rhc",
            "endpoint": sim.endpoint,
            "wsdl": sim.wsdl_url,  # fetched and cached like a site's own WSDL
            "timeout_s": 5,
            "rhc": {"org_id": "QH0001", "user_name": sim.sim.user_name, "user_pwd": sim.sim.user_pwd},
        },
        "api": {"unix": str(state_dir / "api.sock"), "unix_group": None, "tcp": tcp, "http": http,
                "trusted": ["127.0.0.1/32", "::1/128"],
                "clients": {"demo": {"token": DEMO_TOKEN, "scopes": ["read"]}}},
        "sources": {"demo": {"driver": "stdin"}} if stdin else {},
    }


class Printer:
    """Prints events the way a nurse would want to read them; holds them until `start()` so
    nothing comes before the banner."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._held: list[Event] | None = []

    def start(self) -> None:
        held, self._held = self._held or [], None
        for event in held:
            self(event)

    def __call__(self, event: Event) -> None:
        if self._held is not None:
            self._held.append(event)
            return
        match event:
            case ScanRead(scan=scan):
                self._print("→ scan %s from %s: %s" % (scan.id, scan.source, mask_qr(scan.payload)
                                                       if isinstance(scan.payload, str) else "card"))
            case Verified(result=Result(identity=ident, verification=v)) if v is not None and v.ok:
                shown = ident.to_json() if ident is not None else {}  # the code tables' texts, as the HIS sees them
                self._print("  ✔ verified %s %s %s, %s (platform %s %s) in %.1f ms" % (
                    mask_name(shown.get("name")), shown.get("sex_text") or "", shown.get("nation_text") or "",
                    mask_id_number(shown.get("id_number")), v.platform_code, v.platform_message, v.elapsed_ms))
            case Verified(result=Result(verification=v)):
                reason = v.reason.value if v is not None and v.reason is not None else None
                self._print("  ✘ %s: %s%s" % (reason, (v.message if v else None) or "",
                                              " (platform %s)" % v.platform_code if v and v.platform_code else ""))
            case SourceChanged(name=name, connected=connected, detail=detail):
                self._print("  · %s %s%s" % (name, "connected" if connected else "disconnected",
                                             ": %s" % detail if detail else ""))

    def _print(self, text: str) -> None:
        print(text, file=self.out, flush=True)


def banner(sim: SimServer, daemon: Daemon, out: TextIO) -> None:
    residents = list(sim.sim.residents.values())
    active = [r for r in residents if r.status == "1"]
    dynamic = sim.sim.issue_dynamic(active[0].id_card, ttl_s=600)
    expired = sim.sim.issue_dynamic(active[1].id_card, ttl_s=-1)
    cancelled = next(r for r in residents if r.status == "0")
    lines = [
        "scanbox demo: a scan box with a simulated Qinghai platform at %s" % sim.endpoint,
        "",
        "Paste a code and press Enter:",
    ]
    for r in active:
        lines.append("  %-32s %s" % ("static card of %s (%s):" % (mask_name(r.name), r.id_card[-4:]), r.static_qr))
    lines += [
        "  %-32s %s" % ("dynamic code, valid 10 min:", dynamic),
        "  %-32s %s" % ("dynamic code, expired:", expired),
        "  %-32s %s" % ("cancelled card:", cancelled.static_qr),
        "  %-32s %s" % ("not a health card code:", "https://example.com/ticket/42"),
        "",
        "The HIS API (JSON-RPC, one JSON object per line):",
        "  unix socket  %s" % daemon.stream.unix_path,
    ]
    if daemon.stream.tcp_address:
        host, port = daemon.stream.tcp_address
        lines.append("  tcp          %s:%d (no token needed from localhost in the demo)" % (host, port))
    example = ["  e.g. in another terminal:",
               "    %s api --socket %s read_card '{\"timeout_s\": 60}'" % (_scanbox_command(), daemon.stream.unix_path)]
    if daemon.http_address:
        url = "http://%s:%d" % daemon.http_address
        lines.append("  http         POST %s/rpc, WebSocket %s/ws (bearer token %s)"
                     % (url, "ws" + url[4:], DEMO_TOKEN))
        example += ["  or over HTTP:",
                    "    curl -H 'Authorization: Bearer %s' -d '{\"jsonrpc\":\"2.0\",\"id\":1,"
                    "\"method\":\"read_card\",\"params\":{\"timeout_s\":60}}' %s/rpc" % (DEMO_TOKEN, url)]
    lines += example + [
        "  then paste a code here.",
        "",
        "Ctrl-C stops the demo.",
        "",
    ]
    print("\n".join(lines), file=out, flush=True)


def _scanbox_command() -> str:
    """How to call scanbox from another terminal: the venv's script, which is not on PATH."""
    beside = Path(sys.executable).parent / "scanbox"
    return str(beside) if beside.exists() else "scanbox"


async def run_demo(tcp: str | None, stdin: bool = True, out: TextIO = sys.stdout, http: str | None = None) -> None:
    state_dir = Path(tempfile.mkdtemp(prefix="scanbox-demo-"))
    sim = await SimServer(RhcSimulator()).start("127.0.0.1", 0)
    try:
        config = validate(demo_config(sim, state_dir, tcp, stdin, http))
        daemon = Daemon(config)
        printer = Printer(out)
        daemon.hub.listen(printer)
        loop = asyncio.get_running_loop()
        task = loop.create_task(daemon.run())
        ready = loop.create_task(daemon.ready.wait())
        await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
        ready.cancel()
        if not task.done():
            banner(sim, daemon, out)
            printer.start()
        await task
    finally:
        await sim.close()
        shutil.rmtree(state_dir, ignore_errors=True)
