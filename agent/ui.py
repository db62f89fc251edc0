"""What the OLED shows: the state of the box as a `Screen`, a `Screen` as a picture.

`render()` is a pure function from a Screen to a 1-bit PIL image, so every screen is tested
pixel for pixel on luma's dummy device and previewed as PNG without hardware. `Ui` decides what
to show from the daemon's events (scans, verifications, sources, platform, outbox), and wakes
only when something changes: a result expiring, the minute on the clock turning, the progress
bar while a verification runs. Idle, it sleeps.

A patient reads this screen: short Chinese, names masked (`张*明`), no ID numbers. Without a
CJK font (a box built without fonts-wqy-zenhei) the same screens appear in English.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import msgspec
from msgspec.structs import replace

from agent.events import (ComponentsChanged, Event, NetworkChanged, OutboxChanged, PlatformChanged, ScanRead,
                          SourceChanged, Verified)
from agent.model import Alarm, ComponentStatus, IdentitySource, Reason, Result, ScanKind
from agent.privacy import mask_name

if TYPE_CHECKING:
    from PIL import Image, ImageDraw, ImageFont

    from drivers.display import Display

logger = logging.getLogger(__name__)

CJK_FONTS = (
    Path("/usr/share/fonts/truetype/wqy/wqy-zenhei.ttc"),  # Debian fonts-wqy-zenhei
    Path("/usr/share/fonts/wqy-zenhei/wqy-zenhei.ttc"),
)
# WenQuanYi Zen Hei "Sharp" carries hand-drawn bitmaps at 12 and 16 px: crisp on a 1-bit OLED
SHARP_INDEX = 2
PROGRESS_STEPS = 16
PROGRESS_FRAME_S = 0.125
VERIFY_TIMEOUT_S = 15.0  # a verifying screen with no result goes back to ready after this
# a supervised part that has failed this many times in a row (and waits to be restarted), or was
# given up, is on the screen (COMPONENT_FAILED): one failure that a restart heals is only an alarm
KEEPS_FAILING = 2

# (Chinese, English fallback)
TEXT = {
    "show_card": ("请出示电子健康卡", "Show your health card"),
    "aim": ("二维码对准扫码窗口", "QR code to the window"),
    "online": ("在线", "online"),
    "offline": ("离线", "offline"),
    "pending": ("待传%d", "%d queued"),
    "offline_mode": ("网络中断 离线核验", "Network down: offline"),
    "verifying": ("正在验证", "Verifying"),
    "verified": ("验证成功", "Verified"),
    "failed": ("验证失败", "Not verified"),
    "scanner_missing": ("扫码器未连接", "Scanner not connected"),
    "fault": ("故障 %s", "Fault: %s"),
    "call_staff": ("请联系工作人员", "Please ask the staff"),
    "provisioned": ("配置成功", "Configured"),
    "provision_failed": ("配置失败", "Not configured"),
    "ehc": ("电子健康卡", "e-health card"),
    "temporary": ("临时健康卡", "temporary card"),
    "id_card": ("身份证", "ID card"),
    "health_card": ("居民健康卡", "health card"),
    "ssc": ("社保卡", "social security card"),
    "from_cache": ("离线核验", "offline check"),
    "read": ("已读取", "Code read"),
    "wait_staff": ("请等候工作人员", "Please wait for the staff"),
}
REASON_EN = {
    Reason.QR_INVALID: "Invalid code", Reason.QR_EXPIRED: "Code expired, refresh it",
    Reason.QR_UNKNOWN: "Not a health card", Reason.CARD_NOT_FOUND: "Card not found",
    Reason.CARD_INACTIVE: "Card not active", Reason.PLATFORM_UNAVAILABLE: "Service unavailable",
    Reason.PLATFORM_REJECTED: "Refused", Reason.PLATFORM_AUTH: "Box not authorised",
    Reason.NOT_SUPPORTED: "Not supported", Reason.DEVICE_ERROR: "Device error",
    Reason.TIMEOUT: "Timed out", Reason.BUSY: "Busy", Reason.UNAUTHORIZED: "Not authorised",
    Reason.BAD_REQUEST: "Bad request", Reason.INTERNAL: "Internal error",
    Reason.PSAM_REQUIRED: "Card needs a PSAM",
}


class Screen(msgspec.Struct, frozen=True):
    """Everything one picture shows. Texts are keys of TEXT or already-masked strings."""

    kind: str  # ready, offline, verifying, success, failure, read, device_missing, fault, provisioning, message
    clock: str = ""
    network: bool | None = None  # a default route: the box is on a network
    online: bool | None = None  # the platform answers
    pending: int = 0
    title: str = ""  # success/failure/provisioning headline (a TEXT key)
    lines: tuple[str, ...] = ()  # body lines, literal (names already masked)
    progress: int = 0  # verifying: position of the moving block


class Fonts:
    """A 12 px and a 16 px font; CJK when the font is there, Pillow's own (Latin) otherwise."""

    def __init__(self, path: Path | None = None) -> None:
        from PIL import ImageFont  # Pillow only on a box with a display (4 MiB, 40 ms of its start)

        candidates = [path] if path else list(CJK_FONTS)
        self.path = next((p for p in candidates if p and p.is_file()), None)
        self.small: ImageFont.FreeTypeFont | ImageFont.ImageFont
        self.large: ImageFont.FreeTypeFont | ImageFont.ImageFont
        if self.path is not None:
            index = SHARP_INDEX if self.path.suffix == ".ttc" else 0
            # BASIC layout: Pillow otherwise uses raqm when libfribidi happens to be installed,
            # and glyphs land differently; horizontal Chinese needs no complex shaping
            self.small = ImageFont.truetype(str(self.path), 12, index=index, layout_engine=ImageFont.Layout.BASIC)
            self.large = ImageFont.truetype(str(self.path), 16, index=index, layout_engine=ImageFont.Layout.BASIC)
            self.cjk = True
        else:
            self.small = ImageFont.load_default(11)
            self.large = ImageFont.load_default(14)
            self.cjk = False

    def text(self, key: str, *args: Any) -> str:
        zh, en = TEXT[key]
        return (zh if self.cjk else en) % args if args else (zh if self.cjk else en)


def reason_text(reason: Reason | None, fonts: Fonts) -> str:
    if reason is None:
        return ""
    return reason.patient_text if fonts.cjk else REASON_EN[reason]


def render(screen: Screen, size: tuple[int, int], fonts: Fonts) -> Image.Image:
    """A screen as a 1-bit image of `size` (128x64 or 128x32)."""
    width, height = size
    from PIL import Image, ImageDraw

    image = Image.new("1", size, 0)
    draw = ImageDraw.Draw(image)
    draw.fontmode = "1"  # no anti-aliasing: the panel has no grey
    tall = height >= 64
    body_top = 0
    if tall:
        _header(draw, screen, width, fonts)
        body_top = 18
    kind = screen.kind
    if kind == "verifying":
        _centered(draw, fonts.text("verifying"), fonts.small, width, body_top + (6 if tall else 1))
        _progress(draw, screen.progress, width, body_top + (26 if tall else 20))
    elif kind in ("success", "failure", "read", "provisioning"):
        title_font = fonts.large if tall else fonts.small
        _centered(draw, fonts.text(screen.title), title_font, width, body_top + (0 if tall else 1))
        y = body_top + (18 if tall else 17)
        for line in _wrap(screen.lines, fonts.small, width - 4, 2 if tall else 1):
            _centered(draw, line, fonts.small, width, y)
            y += 14
    else:  # ready, offline, device_missing, fault, message
        lines = screen.lines
        if not tall and kind in ("ready", "offline"):
            lines = (_status_line(screen, fonts),) + lines[:1]
        y = body_top + (4 if tall else 2)
        for line in _wrap(lines, fonts.small, width - 4, 3 if tall else 2):
            _centered(draw, line, fonts.small, width, y)
            y += 14 if tall else 15
    return image


def _header(draw: ImageDraw.ImageDraw, screen: Screen, width: int, fonts: Fonts) -> None:
    draw.text((1, 0), screen.clock, font=fonts.small, fill=1)
    status = _status_line(screen, fonts, with_clock=False)
    right = width - 1 - draw.textlength(status, font=fonts.small)
    draw.text((right, 0), status, font=fonts.small, fill=1)
    if screen.network is not None:
        _network_glyph(draw, int(right) - 13, screen.network)
    draw.line((0, 14, width - 1, 14), fill=1)


def _network_glyph(draw: ImageDraw.ImageDraw, x: int, up: bool) -> None:
    """Three rising bars when the box is on a network, a cross when it is not."""
    if up:
        for i, h in enumerate((3, 6, 9)):
            draw.rectangle((x + i * 4, 11 - h, x + i * 4 + 2, 11), fill=1)
    else:
        draw.line((x + 1, 3, x + 9, 11), fill=1)
        draw.line((x + 1, 11, x + 9, 3), fill=1)


def _status_line(screen: Screen, fonts: Fonts, with_clock: bool = True) -> str:
    parts = [screen.clock] if with_clock and screen.clock else []
    if screen.online is not None:
        parts.append(fonts.text("online" if screen.online else "offline"))
    if screen.pending:
        parts.append(fonts.text("pending", screen.pending))
    return " ".join(parts)


def _centered(draw: ImageDraw.ImageDraw, text: str, font: Any, width: int, y: int) -> None:
    text = _fit(text, font, width - 2)
    x = max(0, (width - draw.textlength(text, font=font)) // 2)
    draw.text((x, y), text, font=font, fill=1)


def _progress(draw: ImageDraw.ImageDraw, step: int, width: int, y: int) -> None:
    """A block that moves along a track: the screen shows that something is happening."""
    left, right = 14, width - 14
    draw.rectangle((left, y, right, y + 6), outline=1, fill=0)
    block = (right - left - 4) // 4
    travel = right - left - 4 - block
    x = left + 2 + travel * (step % PROGRESS_STEPS) // (PROGRESS_STEPS - 1)
    draw.rectangle((x, y + 2, x + block, y + 4), fill=1)


def _fit(text: str, font: Any, width: int) -> str:
    """The text, cut with … so it fits `width` pixels."""
    if font.getlength(text) <= width:
        return text
    while text and font.getlength(text + "…") > width:
        text = text[:-1]
    return text + "…"


def _wrap(lines: tuple[str, ...], font: Any, width: int, max_lines: int) -> list[str]:
    """Lines broken to fit, at most `max_lines`, the last cut with …. Chinese breaks between any
    two characters; Latin text at its last space, where it has one."""
    out: list[str] = []
    for line in lines:
        current = ""
        for ch in line:
            if font.getlength(current + ch) > width and current:
                head, space, tail = current.rpartition(" ")
                if space and head and ch != " ":
                    out.append(head)
                    current = tail + ch
                else:
                    out.append(current)
                    current = ch.lstrip()
            else:
                current += ch
        out.append(current)
    if len(out) > max_lines:
        out = out[:max_lines]
        out[-1] = _fit(out[-1] + "…", font, width)
    return out


# --- the screens a box shows, with sample contents (previews, reference images, README) ---------

def samples(fonts: Fonts) -> dict[str, Screen]:
    base = Screen("ready", clock="10:21", network=True, online=True)
    ready = replace(base, lines=(fonts.text("show_card"), fonts.text("aim")))
    return {
        "ready": ready,
        "ready-pending": replace(ready, pending=3),
        "verifying": replace(base, kind="verifying", progress=5),
        "success": replace(base, kind="success", title="verified", lines=(
            "%s  %s" % (mask_name("张晓明"), fonts.text("ehc")),)),
        "success-offline": replace(base, kind="success", online=False, pending=4, title="verified", lines=(
            "%s  %s" % (mask_name("才让卓玛"), fonts.text("ehc")), fonts.text("from_cache"))),
        "failure": replace(base, kind="failure", title="failed", lines=(reason_text(Reason.QR_EXPIRED, fonts),)),
        "failure-unavailable": replace(base, kind="failure", online=False, title="failed",
                                       lines=(reason_text(Reason.PLATFORM_UNAVAILABLE, fonts),)),
        "read": replace(base, kind="read", title="read", lines=(fonts.text("wait_staff"),)),
        "offline": replace(base, kind="offline", network=False, online=False, pending=12, lines=(
            fonts.text("show_card"), fonts.text("offline_mode"))),
        "device-missing": replace(base, kind="device_missing", lines=(
            fonts.text("scanner_missing"), fonts.text("call_staff"))),
        "fault": replace(base, kind="fault", lines=(fonts.text("fault", "uploader"), fonts.text("call_staff"))),
        "provisioning": replace(base, kind="provisioning", network=None, online=None, title="provisioned", lines=(
            "clinic-counter-1",)),
        "provisioning-failed": replace(base, kind="provisioning", network=None, online=None,
                                       title="provision_failed", lines=(
            "platform.endpoint: required",)),
        "message": replace(base, kind="message", lines=("请到3号窗口缴费", "Window 3 for payment")),
    }


def preview(screen: Screen, size: tuple[int, int], fonts: Fonts, scale: int = 4) -> Image.Image:
    """A screen as people look at it: scaled up, white on black like the panel."""
    from PIL import Image

    image = render(screen, size, fonts).convert("L")
    return image.resize((size[0] * scale, size[1] * scale), Image.Resampling.NEAREST)


# --- deciding what to show ------------------------------------------------------------------

class _State(msgspec.Struct):
    sources: dict[str, bool] = msgspec.field(default_factory=dict)
    faults: tuple[str, ...] = ()  # supervised parts that keep failing (KEEPS_FAILING)
    network: bool | None = None
    online: bool | None = None
    pending: int = 0
    verifying_since: float | None = None
    result: Screen | None = None
    result_until: float = 0.0
    message: Screen | None = None
    message_until: float = 0.0


class Ui:
    """Turns the daemon's events into screens and hands changed pictures to `draw`."""

    def __init__(self, draw: Callable[[Image.Image], None], size: tuple[int, int], fonts: Fonts, *,
                 result_s: float = 5.0, clock: Callable[[], float] = time.time) -> None:
        self.draw = draw
        self.size = size
        self.fonts = fonts
        self.result_s = result_s
        self.clock = clock
        self.state = _State()
        self.screen: Screen | None = None
        self.frames = 0  # pictures handed to the display (each one different from the last)
        self._last: bytes | None = None
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    # --- inputs ----------------------------------------------------------------------------

    def on_event(self, event: Event) -> None:
        """A hub listener: scans, verifications and status changes, as typed events."""
        s = self.state
        now = self.clock()
        match event:
            case ScanRead():
                s.verifying_since = now
            case Verified(result=result):
                s.verifying_since = None
                s.result = self._result_screen(result)
                s.result_until = now + self.result_s
            case SourceChanged(name=name, connected=connected):
                s.sources[name] = connected
            case PlatformChanged(health=health):
                s.online = health.reachable
            case NetworkChanged(up=up):
                s.network = up
            case OutboxChanged() if event.available:
                s.pending = event.pending
            case ComponentsChanged(components=components):
                s.faults = tuple(sorted(name for name, c in components.items() if c.get("state") == "failed" or (
                    c.get("state") == "restarting" and int(c.get("in_a_row") or 0) >= KEEPS_FAILING)))
        self._wake.set()

    def show_message(self, lines: list[str], seconds: float) -> None:
        self.state.message = Screen("message", lines=tuple(lines))
        self.state.message_until = self.clock() + seconds
        self._wake.set()

    def showing_message(self) -> bool:
        """A message or the provisioning outcome is up (and should not be replaced)."""
        return self.state.message is not None and self.clock() < self.state.message_until

    def show_provisioning(self, ok: bool, lines: list[str], seconds: float = 30.0) -> None:
        self.state.message = Screen("provisioning", title="provisioned" if ok else "provision_failed",
                                    lines=tuple(lines))
        self.state.message_until = self.clock() + seconds
        self._wake.set()

    def _result_screen(self, result: Result) -> Screen:
        v = result.verification
        identity = result.identity
        if v is not None and v.ok:
            card = {ScanKind.QR: "ehc", ScanKind.ID_CARD: "id_card", ScanKind.HEALTH_CARD: "health_card",
                    ScanKind.SSC: "ssc"}.get(result.scan.kind, "ehc")
            lines: tuple[str, ...] = ("%s  %s" % (mask_name(identity.name if identity else None),
                                                  self.fonts.text(card)),)
            if identity is not None and identity.source is IdentitySource.CACHE:
                lines += (self.fonts.text("from_cache"),)
            return Screen("success", title="verified", lines=lines)
        reason = v.reason if v is not None else None
        if reason is Reason.NOT_SUPPORTED:
            # nothing failed: this box only passes the code on (a platform with no verify call)
            return Screen("read", title="read", lines=(self.fonts.text("wait_staff"),))
        return Screen("failure", title="failed", lines=(reason_text(reason, self.fonts),))

    # --- the screen now -----------------------------------------------------------------------

    def current(self) -> tuple[Screen, float | None]:
        """The screen to show now, and when it may change next (None: only on an event)."""
        s = self.state
        now = self.clock()
        when = datetime.fromtimestamp(now)
        next_minute = now + 60 - when.second - when.microsecond / 1e6

        def headed(screen: Screen) -> Screen:
            return replace(screen, clock=when.strftime("%H:%M"), network=s.network, online=s.online,
                           pending=s.pending)

        if s.message is not None and now < s.message_until:
            return headed(s.message), min(s.message_until, next_minute)
        if s.result is not None and now < s.result_until:
            return headed(s.result), min(s.result_until, next_minute)
        if s.verifying_since is not None and now - s.verifying_since < VERIFY_TIMEOUT_S:
            step = int((now - s.verifying_since) / PROGRESS_FRAME_S)
            return (headed(Screen("verifying", progress=step)),
                    s.verifying_since + (step + 1) * PROGRESS_FRAME_S)
        if s.faults:
            return headed(Screen("fault", lines=(self.fonts.text("fault", " ".join(s.faults)),
                                                 self.fonts.text("call_staff")))), next_minute
        if any(not connected for connected in s.sources.values()):
            return headed(Screen("device_missing", lines=(self.fonts.text("scanner_missing"),
                                                          self.fonts.text("call_staff")))), next_minute
        if s.online is False:
            return headed(Screen("offline", lines=(self.fonts.text("show_card"),
                                                   self.fonts.text("offline_mode")))), next_minute
        return headed(Screen("ready", lines=(self.fonts.text("show_card"), self.fonts.text("aim")))), next_minute

    def refresh(self) -> float | None:
        """Render the current screen; hand it to the display only if the picture changed."""
        screen, until = self.current()
        self.screen = screen
        image = render(screen, self.size, self.fonts)
        data = image.tobytes()
        if data != self._last:
            self._last = data
            self.frames += 1
            self.draw(image)
        return until

    async def run(self) -> None:
        while True:
            self._wake.clear()
            until = self.refresh()
            delay = None if until is None else max(0.0, until - self.clock())
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._wake.wait()


class DisplayComponent:
    """The screen's health: the display's connection (its own thread reports it) and the fonts."""

    name = "display"

    def __init__(self, display: Display | None, ui: Ui | None) -> None:
        self.display = display
        self.ui = ui

    def status(self) -> dict[str, Any]:
        if self.display is None or self.ui is None:
            return {"configured": False, "connected": False}
        return {"configured": True, "connected": self.display.connected, "model": self.display.options.describe(),
                "error": self.display.error, "cjk_font": self.ui.fonts.cjk,
                "screen": self.ui.screen.kind if self.ui.screen else None}

    def alarms(self) -> list[Alarm]:
        out = []
        if self.display is not None and not self.display.connected:
            out.append(Alarm("DISPLAY_MISSING", self.display.options.describe(), self.display.error or "not connected"))
        if self.ui is not None and not self.ui.fonts.cjk:
            out.append(Alarm("DISPLAY_NO_CJK_FONT", "display", "no Chinese font (install fonts-wqy-zenhei): "
                             "the screen shows English"))
        return out

    async def get_status(self) -> ComponentStatus:
        return ComponentStatus(self.status(), self.alarms())

