"""`scanbox doctor` asks the real pcscd which readers there are (vsmartcard's virtual ones here)."""

from __future__ import annotations

from pathlib import Path

from agent import doctor
from agent.simulator.pcscd import CARD_READER, PSAM_READER
from tests.conftest import make_config


async def test_doctor_names_each_pcsc_reader_and_what_no_reader_matches(tmp_path: Path, pcscd) -> None:
    config = make_config(None, tmp_path, sources={"cards": {
        "driver": "pcsc", "reader": "^%s$" % CARD_READER, "psam_reader": "ACR1281 .* SAM"}})
    found = doctor.Doctor(config, doctor.Roots(tmp_path / "dev", tmp_path / "sys"), probe_unconfigured=False,
                          i2c_probe=lambda bus, address: True).sources()
    subjects = {f.subject: f for f in found}
    assert subjects["pcsc:cards"].status == "ok" and CARD_READER in subjects["pcsc:cards"].text
    psam = subjects["PSAM of pcsc:cards"]
    assert psam.status == "fail" and repr(PSAM_READER) in psam.fix  # the readers it could have been
    assert subjects[PSAM_READER].status == "info" and CARD_READER not in subjects
