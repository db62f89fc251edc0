"""How often a box fetches its platform's WSDL, counted at the simulator: once at start, and
after a load that failed, not again before the retry window, whatever stopped the load. A failure
outside the expected exception types (zeep's ValueError for a schema's unreadable minOccurs; the
RuntimeError of zeep's AsyncTransport without `packaging`, when the adapters used it) skipped the
retry window, so every scan, authKey request and upload fetched the WSDL again (issue 13: dozens
of fetches)."""

from __future__ import annotations

import pytest
from aiohttp import web

from agent.platforms.base import Platform, PlatformUnavailable
from agent.simulator.rhc import RhcSimulator
from agent.simulator.soap import SimServer
from agent.simulator.wondersgroup import WondersgroupServer, WondersgroupSimulator
from tests.platforms import test_rhc_operations as rhc
from tests.platforms import test_wondersgroup as wg


def _unreadable(text: str) -> str:
    # a site schema zeep cannot read: it raises ValueError (int("none")), not one of its errors
    assert 'minOccurs="0"' in text
    return text.replace('minOccurs="0"', 'minOccurs="none"', 1)


class UnreadableRhcWsdl(SimServer):
    async def _get(self, request: web.Request) -> web.Response:
        response = await super()._get(request)
        return web.Response(text=_unreadable(response.text or ""), content_type="text/xml")


class UnreadableWondersgroupWsdl(WondersgroupServer):
    async def _get(self, request: web.Request) -> web.Response:
        response = await super()._get(request)
        return web.Response(text=_unreadable(response.text or ""), content_type="text/xml")


async def test_a_wondersgroup_box_fetches_its_wsdl_once(tmp_path):
    sim = WondersgroupSimulator(org_code=wg.ORG)
    server = await WondersgroupServer(sim).start("127.0.0.1", 0)
    p = wg.new_platform(server, tmp_path)
    try:
        await p.start()
        qr = wg.first(sim, "袁宇阳").static_qr
        for _ in range(3):
            assert (await p.verify_qr(wg.scan(qr))).platform_code == "10000"
        sim.expire_auth()  # a new authKey: getAuthKey again, not the WSDL
        assert (await p.verify_qr(wg.scan(qr))).platform_code == "10000"
        assert [e.operation for e in sim.journal].count("getAuthKey") == 2
        assert server.documents_served == ["wsdl"]
    finally:
        await p.close()
        await server.close()


@pytest.mark.parametrize("kind", ["rhc", "wondersgroup"])
async def test_a_wsdl_that_cannot_be_loaded_is_fetched_once_per_retry_window(kind, tmp_path):
    server: SimServer
    p: Platform
    if kind == "rhc":
        rhc_sim = RhcSimulator()
        server = await UnreadableRhcWsdl(rhc_sim).start("127.0.0.1", 0)
        p = rhc.new_platform(server, tmp_path, wsdl=server.wsdl_url)
        request = rhc.scan(next(iter(rhc_sim.residents.values())).static_qr)
    else:
        wg_sim = WondersgroupSimulator(org_code=wg.ORG)
        wg_server = UnreadableWondersgroupWsdl(wg_sim)
        server = await wg_server.start("127.0.0.1", 0)
        p = wg.new_platform(wg_server, tmp_path)
        request = wg.scan(wg.first(wg_sim, "袁宇阳").static_qr)
    try:
        await p.start()  # does not raise: the box starts and says what is wrong
        assert p.health().reachable is False
        for _ in range(4):
            with pytest.raises(PlatformUnavailable) as info:
                await p.verify_qr(request)
            assert "WSDL not loaded" in info.value.message and "ValueError" in info.value.message
        assert server.documents_served == ["wsdl"]
        assert server.sim.journal == []  # nothing was sent
    finally:
        await p.close()
        await server.close()
