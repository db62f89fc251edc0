"""A card read the box could not finish is shown to the patient, in Chinese and without the font."""

from __future__ import annotations

from pathlib import Path

from agent.model import Reason
from agent.ui import Fonts, Screen, reason_text, render


def test_every_reason_has_a_screen_text_in_both_languages():
    latin = Fonts(Path("/nonexistent.ttf"))
    assert not latin.cjk
    for reason in Reason:
        assert reason_text(reason, latin)
    assert reason_text(Reason.PSAM_REQUIRED, latin) == "Card needs a PSAM"
    assert Reason.PSAM_REQUIRED.patient_text == "本机暂不能读取此卡"


def test_the_psam_required_failure_screen_renders():
    for fonts in (Fonts(), Fonts(Path("/nonexistent.ttf"))):
        screen = Screen("failure", title="failed", lines=(reason_text(Reason.PSAM_REQUIRED, fonts),))
        image = render(screen, (128, 64), fonts)
        assert image.size == (128, 64) and image.getbbox() is not None
