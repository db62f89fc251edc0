"""The API document must stay true to the code: every reason and method is documented."""

from __future__ import annotations

from pathlib import Path

from agent.api.methods import Api
from agent.model import Reason

DOC = (Path(__file__).resolve().parent.parent / "docs" / "api.md").read_text(encoding="utf-8")


def test_every_reason_is_documented():
    missing = [r.value for r in Reason if "`%s`" % r.value not in DOC]
    assert missing == []


def test_every_method_is_documented():
    api = Api.__new__(Api)  # the method table needs no running daemon
    names = [m.name for m in Api.methods(api)]
    missing = [n for n in names if "### `%s " % n not in DOC]
    assert missing == [], missing
