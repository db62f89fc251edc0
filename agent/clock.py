"""The box's wall clock (DESIGN.md "Supervision and health": the `clock` part).

A Raspberry Pi has no real-time clock: it boots at the time fake-hwclock saved at the last
shutdown, or at 1970, and is right only once NTP has synchronised it. The platform records
every use with its time, TLS needs today's date to accept a certificate, and the identity cache
and the outbox reason in wall time. So the daemon asks, before it trusts the clock:

- synchronised? systemd-timesyncd (Raspberry Pi OS's) touches /run/systemd/timesync/synchronized
  once it has; its directory without the file means it runs and has not yet. Elsewhere the
  kernel's NTP state (adjtimex, read only) can say yes; it cannot say "no" usefully (a container,
  a box without any NTP client reads as unsynchronised for ever), so it is never a "no".
  `After=time-sync.target` in the unit does not wait for any of this (systemd-time-wait-sync
  would, and would hold the HIS API back on a box without a network: the daemon waits itself,
  bounded, and only where it matters).
- sane? not before the release floor, nor before the newest time in the state (a box that
  uploaded a record in 2026 is not in 1970 now). A synchronised clock is sane.
- right? sane, and not known to be unsynchronised: a time a use may be filed under. A Pi with
  fake-hwclock starts sane (the last shutdown's time) but hours or days behind until NTP.

What follows (each where it is used): verifications wait at most `clock.sync_wait` after the
start for synchronisation; uploads wait for a sane clock; cache entries dated after now do not
answer; retry times beyond what a backoff can give are clamped; a TLS failure while the clock is
wrong says so. A use recorded while the clock is not right keeps a `Stamp`: the kernel's boot id
and CLOCK_BOOTTIME at the scan (which counts suspend, and no clock setting moves). Once the clock
is right in the same boot, the scan's true time is now minus the BOOTTIME since, and the uploader
re-times the record (each platform re-renders its own time fields) before it goes. A box whose
NTP is blocked would hold it for ever: NTP_PATIENCE_S after the start, the platform's time (its
HTTP Date) places it instead; the platform files the use by its own clock anyway. A record from
another boot cannot be placed in time: dead-letter, with that reason, for a technician who
accepts its time or gives one (`scanbox outbox retry ID --keep-time | --at TIME`).

When the wait for NTP runs out, a verification goes anyway (the patient is answered): with the
platform's time if any platform answer in this boot had an HTTP `Date` (`platform_now`, good to a
second or two, counted forward on BOOTTIME), else with the box's; its record, if it waits in the
outbox, is held and re-timed like any other.
"""

from __future__ import annotations

import asyncio
import functools
import email.utils
import logging
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import msgspec

from agent.model import Alarm, ComponentStatus, local_iso

if TYPE_CHECKING:
    import ctypes

logger = logging.getLogger(__name__)

# no box runs this release before this date: a clock behind it is wrong
RELEASE_FLOOR = datetime(2024, 1, 1, tzinfo=timezone.utc).timestamp()
TIMESYNC_DIR = Path("/run/systemd/timesync")
BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
# an HTTP Date is the server's time cut to the second: its middle is the better guess
DATE_RESOLUTION_S = 1.0
# a use held for the clock waits this long after the start for NTP; then (a hospital firewall that
# drops NTP) it is re-timed by the platform's time, from its HTTP Date, which files it anyway
NTP_PATIENCE_S = 600.0
POLL_S = 0.25
# how long "cannot tell whether it is synchronised" (no timesyncd, the kernel not saying so) stands
UNKNOWN_RECHECK_S = 1.0
# a clock found synchronised is looked at again after this long (Clock.synchronised_by)
SYNCHRONISED_RECHECK_S = 1.0
STA_UNSYNC = 0x0040
TIME_ERROR = 5


class KernelClock(msgspec.Struct, frozen=True):
    """The kernel's NTP state, as adjtimex(2) reports it (and `timedatectl`, node_exporter)."""

    synchronised: bool
    maxerror_s: float  # the kernel's bound on the clock's error


@functools.lru_cache(maxsize=1)
def _adjtimex() -> tuple[Callable[[Any], int], type[ctypes.Structure]]:
    """libc's adjtimex and struct timex, made once (the state is read for every scan). ctypes
    (half a MiB resident) only where it is asked: a Pi's timesyncd answers first
    (Clock.synchronised_by). libc is the one Python itself runs on: dlopen(NULL) finds it
    among the process's own libraries, where ctypes.util.find_library ran `ldconfig -p` in a
    subprocess (7 ms of the daemon's start on a box without timesyncd)."""
    import ctypes

    class Timeval(ctypes.Structure):
        _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]

    class Timex(ctypes.Structure):
        """struct timex (adjtimex(2)); C longs, so the same layout on aarch64, x86-64 and armhf."""

        _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                    ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long), ("status", ctypes.c_int),
                    ("constant", ctypes.c_long), ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                    ("time", Timeval), ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long),
                    ("jitter", ctypes.c_long), ("shift", ctypes.c_int), ("stabil", ctypes.c_long),
                    ("jitcnt", ctypes.c_long), ("calcnt", ctypes.c_long), ("errcnt", ctypes.c_long),
                    ("stbcnt", ctypes.c_long), ("tai", ctypes.c_int), ("_reserved", ctypes.c_int * 11)]

    libc = ctypes.CDLL(None, use_errno=True)
    return lambda timex: libc.adjtimex(ctypes.byref(timex)), Timex


def read_kernel() -> KernelClock | None:
    """adjtimex(2) asking no change (modes 0 only reads); None when it cannot be read (the
    unit's ProtectClock= filters adjtimex, even reading; no libc: another platform)."""
    try:
        adjtimex, timex_type = _adjtimex()
        timex: Any = timex_type()
        state = adjtimex(timex)
    except (OSError, AttributeError):
        return None
    if state < 0:
        return None
    return KernelClock(state != TIME_ERROR and not timex.status & STA_UNSYNC, timex.maxerror / 1e6)


def kernel_synchronised() -> bool | None:
    """The kernel's NTP state; None when it cannot be read."""
    kernel = read_kernel()
    return None if kernel is None else kernel.synchronised


def boottime() -> float:
    """CLOCK_BOOTTIME: seconds since the boot, suspend included; no clock setting moves it."""
    return time.clock_gettime(time.CLOCK_BOOTTIME)


def read_boot_id(path: Path = BOOT_ID) -> str | None:
    """The kernel's id of this boot (a new one at every boot); None where there is none."""
    try:
        return path.read_text(encoding="ascii").strip() or None
    except (OSError, UnicodeDecodeError):
        return None


class Stamp(msgspec.Struct, frozen=True):
    """Where a scan made while the clock was not right lies in time: its boot and CLOCK_BOOTTIME
    then. Within that boot its true time is known as soon as the clock is right."""

    boot_id: str | None
    boottime: float


class Clock:
    """The wall clock as the daemon trusts it. `time_source`, `timesync_dir`, `boottime` and
    `boot_id` are the seams the tests turn (a box started in 1970 on a state from 2026, a box
    restarted, another boot)."""

    def __init__(self, *, time_source: Callable[[], float] = time.time, timesync_dir: Path = TIMESYNC_DIR,
                 kernel: Callable[[], KernelClock | None] = read_kernel, sync_wait_s: float = 20.0,
                 floor: float = RELEASE_FLOOR, boottime: Callable[[], float] = boottime,
                 boot_id: Callable[[], str | None] = read_boot_id) -> None:
        self.time_source = time_source
        self.timesync_dir = timesync_dir
        self.kernel = kernel
        self.sync_wait_s = sync_wait_s
        self.floor = floor
        self.floor_source = "the release"
        self.boottime = boottime
        self.boot_id = boot_id
        self.started = time.monotonic()
        self._kernel_said_yes = False
        self._was_sane: bool | None = None
        self._was_right: bool | None = None
        # the last HTTP Date a platform answered with, as it came, and BOOTTIME then (parsed
        # only when needed: every platform answer brings one)
        self._platform_date: tuple[str, float] | None = None
        self.waiting = 0  # verifications waiting for the clock now
        # called when the clock becomes sane (the uploader clamps and resumes)
        self.on_sane: list[Callable[[], None]] = []
        # called when it becomes right (the uploader re-times the records held for it)
        self.on_right: list[Callable[[], None]] = []

    def now(self) -> float:
        return self.time_source()

    __call__ = now  # a Clock is a time source for the store and the uploader

    def raise_floor(self, ts: float | None, source: str) -> None:
        """The clock cannot be behind `ts`: the newest time in the state."""
        if ts is not None and ts > self.floor:
            self.floor = ts
            self.floor_source = source

    def synchronised(self) -> bool | None:
        """True, False, or None when the box cannot tell (the module's docstring): the one
        answer `status`, the CLOCK_UNSYNCHRONISED alarm, `doctor` and the metrics give."""
        return self.synchronised_by()[0]

    @property
    def timesync_dir(self) -> Path:
        return self._timesync_dir

    @timesync_dir.setter
    def timesync_dir(self, path: Path) -> None:
        # as strings, once: the clock is read for every scan and every `status`, and a Path's
        # joins and stat() were most of a reading's cost
        self._timesync_dir = path
        self._timesync = os.fspath(path)
        self._timesync_flag = os.path.join(self._timesync, "synchronized")
        self._unknown_until = 0.0
        self._synchronised_until = 0.0
        self._synchronised_by = "timesyncd"

    def synchronised_by(self) -> tuple[bool | None, str | None]:
        """(synchronised?, who says so: "timesyncd" or "adjtimex"; None when nobody can)."""
        now = time.monotonic()
        if now < self._synchronised_until:
            # a yes holds for a second: the clock is read for every scan and thrice per `status`,
            # two stat() calls each where timesyncd is not (its flag, once there, stays)
            return True, self._synchronised_by
        if now < self._unknown_until:
            return None, None
        try:
            if os.path.exists(self._timesync_flag):
                return self._synchronised(now, "timesyncd")
            if os.path.isdir(self._timesync):
                return False, "timesyncd"
        except OSError:
            pass
        if not self._kernel_said_yes:
            kernel = self.kernel()
            self._kernel_said_yes = kernel is not None and kernel.synchronised
        if self._kernel_said_yes:
            return self._synchronised(now, "adjtimex")
        # no timesyncd, and the kernel cannot say: asked again in a second, not at every scan
        # and `status` (two failed stat() calls and an adjtimex each time)
        self._unknown_until = time.monotonic() + UNKNOWN_RECHECK_S
        return None, None

    def _synchronised(self, now: float, by: str) -> tuple[bool, str]:
        self._synchronised_until = now + SYNCHRONISED_RECHECK_S
        self._synchronised_by = by
        return True, by

    def maxerror_s(self) -> float | None:
        """The kernel's bound on the clock's error, where adjtimex can be read."""
        kernel = self.kernel()
        return None if kernel is None else kernel.maxerror_s

    def _state(self) -> tuple[bool | None, bool, bool]:
        """(synchronised, sane, right), each read once; tells `on_sane` and `on_right` of a change."""
        synced = self.synchronised()
        sane = synced is True or self.now() >= self.floor
        if sane and self._was_sane is False:
            logger.info("clock: now %s, sane again", local_iso(self.now()))
            for callback in self.on_sane:
                callback()
        self._was_sane = sane
        # right: sane and not known to be unsynchronised, a time a use may be filed under
        # (None, "cannot tell", is not a no: a box without timesyncd would wait for ever)
        right = sane and synced is not False
        if right and self._was_right is False:
            for callback in self.on_right:
                callback()
        self._was_right = right
        return synced, sane, right

    def sane(self) -> bool:
        return self._state()[1]

    def right(self) -> bool:
        """Sane and not known to be unsynchronised: a use may be filed under its time."""
        return self._state()[2]

    def stamp(self, monotonic: float | None = None) -> Stamp | None:
        """None when the clock is right; else this boot and CLOCK_BOOTTIME at `monotonic` (a
        time.monotonic() reading a moment ago, the scan's), or now."""
        if self.right():
            return None
        at = self.boottime()
        if monotonic is not None:
            # monotonic and BOOTTIME differ only by suspend, and none fits between a scan and its record
            at -= max(0.0, time.monotonic() - monotonic)
        return Stamp(self.boot_id(), at)

    def when(self, stamp: Stamp) -> tuple[float, str] | None:
        """The true wall time of a stamped moment, and by which clock: the box's once it is
        right; NTP_PATIENCE_S after the start without NTP, the platform's if one of its answers
        told it. None until then, and for a moment of another boot (the BOOTTIME between then
        and now is lost)."""
        if stamp.boot_id is None or stamp.boot_id != self.boot_id():
            return None
        since = self.boottime() - stamp.boottime
        if since < 0:
            return None
        if self.right():
            return self.now() - since, "the clock"
        platform = self.platform_now() if self.impatient() else None
        if platform is not None:
            return platform - since, "the platform's time (no NTP)"
        return None

    def impatient(self) -> bool:
        """NTP_PATIENCE_S since the start, and the clock still not right."""
        return time.monotonic() - self.started >= NTP_PATIENCE_S and not self.right()

    def can_place(self) -> bool:
        """Whether `when` can place a stamp of this boot now (a cheap look, for the uploader's polls)."""
        return self.right() or (self.impatient() and self._platform_date is not None)

    def heard_date(self, date: str | None) -> None:
        """A platform answered with this HTTP Date (transport.HttpClient tells of every answer)."""
        if date:
            self._platform_date = (date, self.boottime())

    def platform_now(self) -> float | None:
        """The platform's time now, from the last Date it answered with in this boot and the
        BOOTTIME since; None when no answer had one."""
        if self._platform_date is None:
            return None
        date, heard_at = self._platform_date
        said = _http_date(date)
        if said is None:
            return None
        return said + DATE_RESOLUTION_S / 2 + self.boottime() - heard_at

    def problem(self) -> str | None:
        """What is wrong with the clock, for an alarm or an error message; None when nothing."""
        synced, sane, _ = self._state()
        if not sane:
            return ("the clock says %s, before %s (%s): it is wrong and not synchronised"
                    % (local_iso(self.now()), local_iso(self.floor), self.floor_source))
        if synced is False:
            return "the clock (%s) has not been synchronised by NTP yet" % local_iso(self.now())
        return None

    async def wait_synchronised(self, budget_s: float | None) -> bool:
        """Before verifying: wait, at most until `sync_wait_s` after the start and `budget_s`,
        for a clock that is known to be unsynchronised or wrong. True when it is fine now."""
        end = self.started + self.sync_wait_s
        if budget_s is not None:
            end = min(end, time.monotonic() + budget_s)
        self.waiting += 1
        try:
            while self.problem() is not None:
                if time.monotonic() >= end:
                    return False
                await asyncio.sleep(min(POLL_S, max(0.0, end - time.monotonic())))
            return True
        finally:
            self.waiting -= 1

    def status(self) -> dict[str, Any]:
        synchronised, by = self.synchronised_by()
        platform = self.platform_now()
        return {"now": local_iso(self.now()), "synchronised": synchronised, "synchronised_by": by, "sane": self.sane(),
                "floor": local_iso(self.floor), "floor_source": self.floor_source,
                # the platform's clock minus this box's, from its last HTTP Date (null: none heard)
                "platform_offset_s": round(platform - self.now()) if platform is not None else None}

    def alarms(self) -> list[Alarm]:
        problem = self.problem()
        if problem is None:
            return []
        return [Alarm("CLOCK_UNSYNCHRONISED", "clock", problem)]

    name = "clock"  # a component (agent.model.Component): `status.clock` and its alarms

    async def get_status(self) -> ComponentStatus:
        return ComponentStatus(self.status(), self.alarms())


@functools.lru_cache(maxsize=4)
def _http_date(date: str) -> float | None:
    """An HTTP Date as a timestamp; None when it is not one. Parsed once: `status` shows the
    platform's offset, and the last Date heard is the same for a second."""
    try:
        said = email.utils.parsedate_to_datetime(date)
    except (TypeError, ValueError, IndexError):
        return None
    if said.tzinfo is None:  # "-0000": the RFC's "UTC, but not said where it is"
        said = said.replace(tzinfo=timezone.utc)
    return said.timestamp()


# the daemon's clock, for the few places far from the daemon that explain a failure by it
# (a TLS certificate "not yet valid")
_current: Clock | None = None


def install(clock: Clock | None) -> None:
    global _current
    _current = clock


def message_time() -> datetime:
    """The time a platform message made now says it was made (RHC's msgCreateTime): the box's
    clock, or, while the daemon's clock was last found not right, the platform's when one of its
    answers told it. (The last finding, not a new look: this runs for every message.)"""
    clock = _current
    if clock is not None and clock._was_right is False:
        platform = clock.platform_now()
        if platform is not None:
            return datetime.fromtimestamp(platform)
    return datetime.now()


def heard_date(date: str | None) -> None:
    """A platform's HTTP answer carried this Date: the daemon's clock keeps it (see Clock.platform_now)."""
    if _current is not None:
        _current.heard_date(date)


def tls_hint(detail: str) -> str:
    """A TLS failure's text, with the clock's problem when there is one: a certificate checked
    against 1970 is "not yet valid", and the technician should look at the clock, not the CA."""
    lowered = detail.lower()
    if "certificate" not in lowered and "ssl" not in lowered:
        return detail
    clock = _current or Clock()
    problem = clock.problem()
    if problem is None:
        return detail
    return "%s; %s, and TLS cannot check a certificate's dates until it is right" % (detail, problem)
