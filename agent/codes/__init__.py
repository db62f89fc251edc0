"""The specs' code tables as data, with lookups.

A table is data, not an if-chain: adding or correcting a code is a one-line change in the
table's module (`qwb002` for spec 000, the Qinghai platform).
"""

from __future__ import annotations

import enum
from typing import Callable, Iterator, Mapping

import msgspec

from agent.model import Reason


class CodeTable(msgspec.Struct, frozen=True):
    """One dictionary of a spec: code -> meaning, e.g. GB_T_2261_1_2003 (sex)."""

    id: str
    title: str
    entries: Mapping[str, str]

    def text(self, code: str | None) -> str | None:
        if code is None:
            return None
        return self.entries.get(code)

    def __contains__(self, code: object) -> bool:
        return code in self.entries

    def __iter__(self) -> Iterator[str]:
        return iter(self.entries)

    def __len__(self) -> int:
        return len(self.entries)

    def describe(self) -> str:
        return "%s (%s)" % (self.title, self.id)


def member_of(table: CodeTable, where: str) -> Callable[[str], str]:
    """A check (agent.schema.Check) that accepts only codes of `table`, and says
    which codes there are and where the spec defines them when it refuses one."""
    listing = ", ".join("%s %s" % (code, table.text(code)) for code in table) if len(table) <= 12 else ""

    def check(value: str) -> str:
        if value not in table:
            raise ValueError("%r is not a code of %s (%s)%s" % (
                value, table.describe(), where, ": one of " + listing if listing else ""))
        return value
    return check


class Outcome(enum.Enum):
    """What a platform return code means for the caller and for the outbox."""

    SUCCESS = "success"
    # the platform's considered answer about this card or request; asking again changes nothing
    REJECTED = "rejected"
    # our request was malformed (parameter/format errors): permanent, dead-letter it
    INVALID_REQUEST = "invalid_request"
    # credentials or registration of this box refused: permanent until the config is fixed
    AUTH = "auth"
    # the platform failed internally: retry later
    TRANSIENT = "transient"

    @property
    def transient(self) -> bool:
        return self is Outcome.TRANSIENT


class ReturnCode(msgspec.Struct, frozen=True):
    code: str
    text: str
    outcome: Outcome
    reason: Reason | None = None  # scanbox reason when not a success
    note: str = ""


class ReturnCodeTable:
    """A platform's return codes. Unknown codes are kept, never guessed into success."""

    def __init__(self, title: str, codes: list[ReturnCode]) -> None:
        self.title = title
        self._codes: dict[str, ReturnCode] = {}
        for rc in codes:
            if rc.code in self._codes:
                raise ValueError("duplicate return code %s in %s" % (rc.code, title))
            if rc.outcome is not Outcome.SUCCESS and rc.reason is None:
                raise ValueError("return code %s in %s needs a reason" % (rc.code, title))
            self._codes[rc.code] = rc

    def lookup(self, code: str | None) -> ReturnCode:
        if code is not None and code in self._codes:
            return self._codes[code]
        return ReturnCode(
            code=code or "",
            text="unknown return code",
            outcome=Outcome.REJECTED,
            reason=Reason.PLATFORM_REJECTED,
        )

    def __contains__(self, code: object) -> bool:
        return code in self._codes

    def __iter__(self) -> Iterator[ReturnCode]:
        return iter(self._codes.values())

    def __len__(self) -> int:
        return len(self._codes)
