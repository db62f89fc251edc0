"""The hub's own bookkeeping of the scans it verifies (routing and events are tested through the
API in tests/api)."""

from __future__ import annotations

import asyncio

import pytest

from agent.hub import Hub
from agent.model import Scan, ScanKind
from agent.platforms.rhc import RhcPlatform
from agent.qr import Classifier
from agent.simulator.rhc import default_residents
from agent.simulator.soap import Fault
from agent.supervisor import Supervisor
from agent.verifier import Verifier
from tests.conftest import make_config


@pytest.fixture
async def hub(sim_server, tmp_path):
    """A hub verifying through an RHC platform at the simulator, as the daemon builds it."""
    config = make_config(sim_server, tmp_path)
    platform = RhcPlatform(config.platform, config.site, tmp_path / "state")
    supervisor = Supervisor()
    verifier = Verifier(platform, Classifier.from_rules(config.platform.qr), config.site.medstep,
                        config.site.channel, supervisor=supervisor)
    try:
        yield Hub(verifier, dedupe_s=0, hold_s=0, supervisor=supervisor)
    finally:
        await supervisor.close()
        await platform.close()


async def test_closing_the_hub_cancels_the_verifications_in_flight(hub, sim_server):
    """A scan nobody waits for is verified in a task the hub keeps (weakly) for close(): a
    platform that never answers does not keep the daemon from stopping, and no verification
    runs on once the hub is closed."""
    sim_server.faults.add(Fault("hang"))
    seen = []
    hub.listen(seen.append)
    qr = next(r.static_qr for r in default_residents() if r.status == "1")
    hub.accept(Scan.from_qr_bytes("serial:counter", qr.encode()))
    verifying = [t for t in asyncio.all_tasks() if t.get_name().startswith("verify scan")]
    assert len(verifying) == 1
    async with asyncio.timeout(10):
        await sim_server.arrived.wait()  # the request is at the platform, which holds it
    await hub.close()
    assert verifying[0].cancelled()
    assert [type(e).__name__ for e in seen] == ["ScanRead"]  # no Verified


async def test_a_scan_read_while_a_caller_waits_is_answered_to_it(hub):
    waiting = asyncio.get_running_loop().create_task(hub.read_card([ScanKind.QR], 10, None, True))
    async with asyncio.timeout(10):
        while not hub.waiting:  # read_card registers its waiter in its first step
            await asyncio.sleep(0)
    resident = next(r for r in default_residents() if r.status == "1")
    hub.accept(Scan.from_qr_bytes("serial:counter", resident.static_qr.encode()))
    async with asyncio.timeout(10):
        result = await waiting
    assert result.verification is not None and result.verification.ok
    assert result.identity is not None and result.identity.name == resident.name
    await hub.close()
