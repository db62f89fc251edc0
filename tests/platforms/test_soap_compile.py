"""zeep reads a site's WSDL in a process of its own (soapcompile), once per WSDL: the daemon keeps
what it needs beside the cached WSDL and never has zeep resident for string-only operations."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap

import pytest

from agent.platforms import soapservice, wsdl
from agent.platforms.base import PlatformUnavailable
from agent.platforms.soapservice import SoapService
from agent.platforms.transport import HttpClient
from agent.simulator.soap import WsdlStyle, render_wsdl
from tests.conftest import until


async def service_for(tmp_path, path, needed=("RHCMessageServer",)) -> tuple[SoapService, HttpClient]:
    http = HttpClient(timeout_s=2, tls_verify=True)
    service = SoapService("test", wsdl.WsdlSource(str(path), "rhc.wsdl"), tmp_path / "cache", http,
                          "http://127.0.0.1:9/x", 2, needed)
    return service, http


async def test_a_wsdl_is_read_by_zeep_once_and_again_when_it_changes(tmp_path):
    path = tmp_path / "site.wsdl"
    path.write_text(render_wsdl("http://192.0.2.1:1/unused", WsdlStyle()), encoding="utf-8")
    first, http = await service_for(tmp_path, path)
    assert await first.input_names("RHCMessageServer") == ["action", "message"]
    assert first.compiled_from_cache is False
    kept = list((tmp_path / "cache").glob("compiled-*.json"))
    assert len(kept) == 1 and json.loads(kept[0].read_text())["operations"]["RHCMessageServer"]["template"]

    again, _ = await service_for(tmp_path, path)
    assert await again.input_names("RHCMessageServer") == ["action", "message"]
    assert again.compiled_from_cache is True

    # the site's WSDL changed (other part names): read again, the old result is not used
    path.write_text(render_wsdl("http://192.0.2.1:1/unused", WsdlStyle(action_part="arg0", message_part="arg1")),
                    encoding="utf-8")
    changed, _ = await service_for(tmp_path, path)
    assert await changed.input_names("RHCMessageServer") == ["arg0", "arg1"]
    assert changed.compiled_from_cache is False
    assert len(list((tmp_path / "cache").glob("compiled-*.json"))) == 1
    await http.close()


async def test_a_kept_result_that_is_damaged_is_read_again(tmp_path):
    path = tmp_path / "site.wsdl"
    path.write_text(render_wsdl("http://192.0.2.1:1/unused", WsdlStyle()), encoding="utf-8")
    first, http = await service_for(tmp_path, path)
    await first.bound()
    kept = next((tmp_path / "cache").glob("compiled-*.json"))
    kept.write_text("{not json", encoding="utf-8")
    again, _ = await service_for(tmp_path, path)
    assert await again.input_names("RHCMessageServer") == ["action", "message"]
    assert again.compiled_from_cache is False
    await http.close()


async def test_a_wsdl_zeep_cannot_read_says_why(tmp_path):
    path = tmp_path / "site.wsdl"
    path.write_text(render_wsdl("http://192.0.2.1:1/unused", WsdlStyle()).replace(
        "RHCMessageServer", "SomethingElse"), encoding="utf-8")
    service, http = await service_for(tmp_path, path)
    with pytest.raises(PlatformUnavailable, match="no port with the operations RHCMessageServer"):
        await service.bound()
    broken = tmp_path / "broken.wsdl"
    broken.write_text('<definitions xmlns="http://schemas.xmlsoap.org/wsdl/"><message name="m">'
                      '<part name="p" element="nowhere:x" xmlns:nowhere="urn:x"/></message></definitions>',
                      encoding="utf-8")
    service, _ = await service_for(tmp_path / "b", broken)
    with pytest.raises(PlatformUnavailable, match="platform WSDL not loaded"):
        await service.bound()
    await http.close()


def test_the_daemon_does_not_load_zeep_for_string_requests(tmp_path):
    """The request a scan sends is built without zeep in the process (zeep is 9 MiB resident)."""
    script = textwrap.dedent("""
        import asyncio, sys
        from pathlib import Path
        from agent.platforms import wsdl
        from agent.platforms.soapservice import SoapService
        from agent.platforms.transport import HttpClient

        async def main():
            http = HttpClient(timeout_s=2, tls_verify=True)
            service = SoapService("t", wsdl.WsdlSource(None, "rhc.wsdl"), Path(sys.argv[1]), http, None, 2,
                                  ["RHCMessageServer"])
            bound = await service.bound()
            names = await service.input_names("RHCMessageServer")
            assert bound.operations["RHCMessageServer"].template.render(dict.fromkeys(names, "x")) is not None
            await http.close()
            print(sorted(m for m in sys.modules if m.split(".")[0] in ("zeep", "requests", "urllib3")))

        asyncio.run(main())
    """)
    out = subprocess.run([sys.executable, "-c", script, str(tmp_path / "cache")], capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


async def test_the_shipped_wsdls_come_read_so_a_box_on_them_never_runs_zeep():
    """What zeep reads from scanbox's own WSDLs ships beside them (a fresh box's first scan does
    not wait for a child process). Written again by `python -m agent.platforms.soapservice`."""
    expected = set()
    for path, needed in soapservice.shipped():
        name = soapservice.compiled_name(path, needed)
        expected.add(name)
        fresh = await soapservice._compile_in_child(str(path), list(needed))
        fresh.pop("zeep")
        shipped = json.loads((soapservice.SHIPPED_COMPILED / name).read_text(encoding="utf-8"))
        assert shipped == fresh, "run `python -m agent.platforms.soapservice` and commit what it writes"
    assert {p.name for p in soapservice.SHIPPED_COMPILED.glob("*.json")} == expected


async def test_a_box_on_the_shipped_wsdl_reads_it_without_a_child(tmp_path):
    service, http = await service_for(tmp_path, wsdl.SHIPPED / "rhc.wsdl")
    assert await service.input_names("RHCMessageServer") == ["action", "message"]
    assert service.compiled_from_cache is True
    assert not (tmp_path / "cache").exists()  # nothing written on the box either
    await http.close()


async def test_a_scan_that_gives_up_leaves_the_wsdl_being_read_for_the_next(tmp_path):
    """A verification's deadline cancels its wait, not the child reading the site's WSDL: the
    next load joins it (one child) and finds it read."""
    path = tmp_path / "site.wsdl"
    path.write_text(render_wsdl("http://192.0.2.1:1/unused", WsdlStyle(namespace="http://gives.up/")),
                    encoding="utf-8")
    service, http = await service_for(tmp_path, path)
    scan = asyncio.ensure_future(service.bound())
    await until(lambda: bool(service._compiling), timeout=30)  # the child is reading
    scan.cancel()  # the scan's deadline
    with pytest.raises(asyncio.CancelledError):
        await scan
    assert len(service._compiling) == 1  # still reading
    assert await service.input_names("RHCMessageServer") == ["action", "message"]
    assert service.compiled_from_cache is False and not service._compiling
    assert len(list((tmp_path / "cache").glob("compiled-*.json"))) == 1
    await http.close()
