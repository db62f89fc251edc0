"""Cards through the whole box: the pcsc driver in the daemon, read_card answering the card's
identity, and RHC_E0009 reaching the platform simulator exactly once through the outbox."""

from __future__ import annotations

import asyncio

from agent.simulator import cards as emu
from agent.simulator.pcscd import CARD_READER, PSAM_READER
from tests.conftest import until


def sources(psam: bool) -> dict:
    options = {"driver": "pcsc", "reader": "^%s$" % CARD_READER, "poll_s": 0.2}
    if psam:
        options["psam_reader"] = "^%s$" % PSAM_READER
    return {"cards": options}


async def read_card_with(box, slot, card) -> dict:
    client = await box.tcp()
    call = asyncio.ensure_future(client.call("read_card", {"timeout_s": 10, "kinds": ["health_card", "ssc"]}))
    await box.waiting(1)
    await asyncio.to_thread(slot.insert, card)
    return await asyncio.wait_for(call, 15)


async def test_health_card_read_is_answered_and_recorded_once_with_rhc_e0009(box, card_slot, psam_slot):
    await asyncio.to_thread(psam_slot.insert, emu.psam())
    await box.start(sources=sources(psam=True))
    result = await read_card_with(box, card_slot, emu.health_card())
    assert result["scan"]["kind"] == "health_card" and result["scan"]["source"] == "pcsc:cards"
    assert result["verification"]["ok"] is True, result["verification"]
    assert result["identity"]["source"] == "card"
    assert result["identity"]["id_number"] == emu.SAMPLE_PERSON["id_number"]
    assert result["identity"]["nation_text"] == "汉族"
    verification = result["verification"]
    assert verification["ok"] is True and verification["msg_guid"]
    journal = box.sim.sim.journal
    await until(lambda: any(e.msg_guid == verification["msg_guid"] and e.ok for e in journal), 10)
    entries = [e for e in journal if e.code == "RHC_E0009"]
    assert len(entries) == 1 and entries[0].msg_guid == verification["msg_guid"]
    values = entries[0].values
    assert values["hc_number"] == emu.HC_NUMBER
    assert values["id_card"] == emu.SAMPLE_PERSON["id_number"]
    assert values["sam"] == "45600001X5500"  # organisation code + department
    assert (values["use_citycode"], values["use_cityname"]) == ("630100", "西宁市")
    assert (values["hospital_code"], values["channel_code"], values["medstep_code"]) == ("QH0001", "01", "010101")
    assert values["name"] == "张晓明" and values["nation"] == "01" and values["sex"] == "1"
    assert len(values["atr"]) == 16
    # the outbox says so too: sent, nothing pending (the status event the uploader raises)
    await box.events.wait("status", lambda d: "outbox" in d and d["outbox"]["sent"] == 1
                          and d["outbox"]["pending"] == 0, timeout=10)


async def test_card_without_psam_answers_psam_required_and_records_nothing(box, card_slot):
    await box.start(sources=sources(psam=False))
    result = await read_card_with(box, card_slot, emu.ssc("3.00"))
    assert result["scan"]["kind"] == "ssc"
    assert result["identity"] is None
    assert result["verification"]["ok"] is False
    assert result["verification"]["reason"] == "PSAM_REQUIRED"
    assert result["scan"]["payload"]["version"] == "3.00"
    assert "name" not in result["scan"]["payload"]
    stats = await box.daemon.store.stats()
    assert stats["pending"] == 0 and stats["sent"] == 0


async def test_social_security_card_is_not_an_rhc_e0009_record(box, card_slot):
    await box.start(sources=sources(psam=False))
    result = await read_card_with(box, card_slot, emu.ssc("2.00"))
    assert result["verification"]["ok"] is True and result["verification"]["msg_guid"] is None
    assert result["identity"]["name"] == "张晓明"
    assert [e for e in box.sim.sim.journal if e.code == "RHC_E0009"] == []


async def test_the_same_card_put_on_again_is_read_again_despite_dedupe(box, card_slot):
    await box.start(sources=sources(psam=False), scans={"dedupe_s": 30, "hold_s": 0})
    first = await read_card_with(box, card_slot, emu.ssc("2.00"))
    await asyncio.to_thread(card_slot.remove)
    second = await read_card_with(box, card_slot, emu.ssc("2.00"))
    assert first["identity"]["name"] == second["identity"]["name"] == "张晓明"
    assert first["scan"]["id"] != second["scan"]["id"]


async def test_read_card_without_verification_still_has_the_cards_identity_and_partial_reason(box, card_slot):
    await box.start(sources=sources(psam=False))
    client = await box.tcp()
    call = asyncio.ensure_future(client.call("read_card", {"timeout_s": 10, "verify": False}))
    await box.waiting(1)
    await asyncio.to_thread(card_slot.insert, emu.ssc("2.00"))
    result = await asyncio.wait_for(call, 15)
    assert result["verification"] is None and result["identity"]["name"] == "张晓明"
    assert "partial" not in result["scan"]
    await asyncio.to_thread(card_slot.remove)
    call = asyncio.ensure_future(client.call("read_card", {"timeout_s": 10, "verify": False}))
    await box.waiting(1)
    await asyncio.to_thread(card_slot.insert, emu.health_card())
    result = await asyncio.wait_for(call, 15)
    assert result["identity"] is None
    assert result["scan"]["partial"]["reason"] == "PSAM_REQUIRED" and "EF06" in result["scan"]["partial"]["message"]
