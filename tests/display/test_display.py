"""The OLED driver through luma's real device code on a recording I2C bus, the screens pixel for
pixel, and what the UI decides to show."""

from __future__ import annotations

import errno
import os
import threading
from msgspec.structs import replace
from pathlib import Path

import pytest
from PIL import Image, ImageChops

from agent import schema
from agent.events import (ComponentsChanged, NetworkChanged, OutboxChanged, PlatformChanged, ScanRead, SourceChanged,
                          Verified)
from agent.model import Identity, IdentitySource, Reason, Result, Scan, Verification
from agent.platforms.base import PlatformHealth
from agent.ui import PROGRESS_FRAME_S, Fonts, Screen, Ui, _fit, _wrap, render, samples
from drivers.display import Display, Options, open_device

REFERENCE = Path(__file__).parent / "reference"
UPDATE = os.environ.get("SCANBOX_UPDATE_REFERENCE") == "1"  # regenerate the reference PNGs


class Bus:
    """An SMBus that records what the driver sends, and can fail like a display pulled off."""

    def __init__(self) -> None:
        self.writes: list[tuple[int, int, list[int]]] = []
        self.fail = False
        self.lock = threading.Lock()

    def write_i2c_block_data(self, addr: int, mode: int, data: list[int]) -> None:
        if self.fail:
            raise OSError(errno.EREMOTEIO, "Remote I/O error")
        with self.lock:
            self.writes.append((addr, mode, list(data)))

    def commands(self) -> list[int]:
        return [b for _, mode, data in self.writes if mode == 0x00 for b in data]

    def data(self) -> bytes:
        return bytes(b for _, mode, data in self.writes if mode == 0x40 for b in data)


@pytest.fixture(scope="module")
def fonts() -> Fonts:
    f = Fonts()
    assert f.cjk, "the CJK font is a test requirement: ./bootstrap.sh installs fonts-wqy-zenhei"
    return f


# --- the device, byte for byte ---------------------------------------------------------------

def test_ssd1306_initialisation_and_contrast_bytes_are_exact():
    bus = Bus()
    # the address as the display's label writes it, read as a config file gives it
    open_device(schema.convert({"model": "ssd1306", "i2c_address": "0x3D", "contrast": 200}, Options), bus=bus)
    assert {addr for addr, _, _ in bus.writes} == {0x3D}
    assert bus.commands() == [
        0xAE, 0xD5, 0x80, 0xA8, 0x3F, 0xD3, 0x00, 0x40, 0x8D, 0x14, 0x20, 0x00, 0xA1, 0xC8, 0xDA, 0x12,
        0xD9, 0xF1, 0xDB, 0x40, 0xA4, 0xA6, 0x81, 0xCF, 0x21, 0x00, 0x7F, 0x22, 0x00, 0x07, 0xAF,
        0x81, 200,  # our contrast, after the driver's own
    ]


def test_a_frame_is_the_page_window_and_1024_bytes_of_pixels():
    bus = Bus()
    device = open_device(Options(model="ssd1306"), bus=bus)
    bus.writes.clear()
    image = Image.new("1", (128, 64), 0)
    image.putpixel((0, 0), 1)  # the top-left pixel: bit 0 of the first byte of page 0
    device.display(image)
    assert bus.commands() == [0x21, 0x00, 0x7F, 0x22, 0x00, 0x07]
    assert bus.data() == b"\x01" + b"\x00" * 1023


@pytest.mark.parametrize("model, height", [("sh1106", 64), ("ssd1309", 64), ("ssd1306", 32)])
def test_other_models_and_the_128x32_panel_draw(model, height):
    bus = Bus()
    device = open_device(Options(model=model, height=height), bus=bus)
    bus.writes.clear()
    device.display(Image.new("1", (128, height), 1))
    assert bus.data().count(0xFF) == 128 * height // 8


def test_a_missing_display_is_reported_not_fatal():
    changes: list[tuple[bool, str | None]] = []
    seen = threading.Event()

    def changed(connected, error):
        changes.append((connected, error))
        seen.set()

    display = Display(Options(model="ssd1306", i2c_port=99), on_change=changed)  # there is no /dev/i2c-99
    display.start()
    try:
        assert seen.wait(5)
        assert changes[0][0] is False and "i2c-99" in changes[0][1]
    finally:
        display.stop()


def test_a_display_that_vanishes_mid_run_is_reopened_and_gets_the_newest_frame():
    bus = Bus()
    events: list[tuple[bool, str | None]] = []
    changed = threading.Condition()

    def on_change(connected, error):
        with changed:
            events.append((connected, error))
            changed.notify_all()

    def wait_for(state: bool) -> None:
        with changed:
            assert changed.wait_for(lambda: events and events[-1][0] is state, timeout=10), events

    display = Display(Options(model="ssd1306"), opener=lambda o: open_device(o, bus=bus), on_change=on_change)
    display.start()
    try:
        wait_for(True)
        display.show(Image.new("1", (128, 64), 0))
        bus.fail = True  # the ribbon cable comes loose
        display.show(Image.new("1", (128, 64), 1))
        wait_for(False)
        assert "lost while drawing" in events[-1][1] and "0x3C" in events[-1][1]
        newest = Image.new("1", (128, 64), 0)
        newest.putpixel((127, 63), 1)
        display.show(newest)
        bus.writes.clear()
        bus.fail = False  # pushed back in
        wait_for(True)
        with changed:
            assert changed.wait_for(lambda: len(bus.data()) >= 1024, timeout=10)
        frame = bus.data()[-1024:]
        assert frame[-1] == 0x80 and frame.count(0) == 1023  # the newest frame, bottom-right pixel
    finally:
        display.stop()


# --- the screens, pixel for pixel --------------------------------------------------------------

@pytest.mark.parametrize("size", [(128, 64), (128, 32)], ids=["128x64", "128x32"])
@pytest.mark.parametrize("name", list(samples(Fonts())))
def test_every_screen_matches_its_reference_image(fonts, name, size):
    image = render(samples(fonts)[name], size, fonts)
    path = REFERENCE / ("%s-%dx%d.png" % (name, *size))
    if UPDATE:
        image.save(path)
    reference = Image.open(path).convert("1")
    assert reference.size == image.size
    difference = ImageChops.difference(reference.convert("L"), image.convert("L")).getbbox()
    assert difference is None, "%s differs from %s in %s" % (name, path.name, difference)


def test_screens_render_on_luma_dummy_device_unchanged(fonts):
    device = open_device(Options(model="dummy"))
    frame = render(samples(fonts)["success"], (128, 64), fonts)
    device.display(frame)
    assert ImageChops.difference(device.image.convert("L"), frame.convert("L")).getbbox() is None


def test_long_names_and_reasons_never_overflow(fonts):
    width = 124
    long_name = "阿卜杜热合曼·买买提依明·艾合买提江"
    fitted = _fit(long_name, fonts.small, width)
    assert fitted.endswith("…") and fonts.small.getlength(fitted) <= width
    lines = _wrap(("二维码已过期，请刷新二维码后再次扫描，如仍有问题请到人工窗口办理",), fonts.small, width, 2)
    assert len(lines) == 2 and lines[-1].endswith("…")
    assert all(fonts.small.getlength(line) <= width for line in lines)
    assert _wrap(("platform.endpoint required",), fonts.small, 110, 2) == ["platform.endpoint", "required"]
    # and rendered, nothing is drawn outside the panel or over the header rule
    for size in ((128, 64), (128, 32)):
        screen = Screen("failure", clock="10:21", online=True, title="failed", lines=(long_name * 3,))
        image = render(screen, size, fonts)
        assert image.size == size


def test_without_a_cjk_font_the_screens_are_english(tmp_path):
    fonts = Fonts(tmp_path / "missing.ttc")
    assert not fonts.cjk
    screens = samples(fonts)
    assert screens["failure"].lines == ("Code expired, refresh it",)
    for screen in screens.values():
        render(screen, (128, 64), fonts)  # no crash, nothing missing
    assert fonts.text("verified") == "Verified"


# --- what the UI shows, and when ---------------------------------------------------------------

class Clock:
    def __init__(self) -> None:
        self.now = 1_795_000_000.0  # a fixed moment

    def __call__(self) -> float:
        return self.now


def make_ui(fonts: Fonts, result_s: float = 5.0) -> tuple[Ui, list[Image.Image], Clock]:
    frames: list[Image.Image] = []
    clock = Clock()
    return Ui(frames.append, (128, 64), fonts, result_s=result_s, clock=clock), frames, clock


def verification(ok: bool, name: str = "张晓明", reason: str | None = None, source: str = "platform") -> Verified:
    scan = Scan.from_qr_bytes("serial:counter", b"CCEBCA5E8566:1")
    identity = Identity(name=name, id_number="630102198503121237", source=IdentitySource(source)) if ok else None
    return Verified(Result(scan, identity, Verification(ok, Reason(reason) if reason else None)))


def scanned() -> ScanRead:
    return ScanRead(Scan.from_qr_bytes("serial:counter", b"CCEBCA5E8566:1"))


def platform(reachable: bool | None) -> PlatformChanged:
    return PlatformChanged(PlatformHealth("rhc", reachable))


def outbox(pending: int) -> OutboxChanged:
    return OutboxChanged({"pending": pending, "sent": 0, "dead": 0})


def source(connected: bool) -> SourceChanged:
    return SourceChanged("serial:counter", connected, None, {})


def test_scan_verify_success_then_back_to_ready(fonts):
    ui, frames, clock = make_ui(fonts)
    ui.refresh()
    assert ui.screen.kind == "ready"
    ui.on_event(scanned())
    ui.refresh()
    assert ui.screen.kind == "verifying"
    first = ui.screen.progress
    clock.now += PROGRESS_FRAME_S * 3
    ui.refresh()
    assert ui.screen.progress == first + 3  # the bar moves
    ui.on_event(verification(True))
    until = ui.refresh()
    assert ui.screen.kind == "success" and ui.screen.lines == ("张*明  电子健康卡",)
    assert until == pytest.approx(clock.now + 5.0)
    clock.now += 5.01
    ui.refresh()
    assert ui.screen.kind == "ready"


def test_the_screen_never_shows_a_full_name_or_an_id_number(fonts):
    ui, frames, clock = make_ui(fonts)
    ui.on_event(verification(True, name="才让卓玛"))
    ui.refresh()
    text = " ".join(ui.screen.lines)
    assert "才**玛" in text and "才让卓玛" not in text and "1237" not in text and "630102" not in text


def test_failure_shows_a_reason_a_patient_understands(fonts):
    ui, frames, clock = make_ui(fonts)
    ui.on_event(verification(False, reason="QR_EXPIRED"))
    ui.refresh()
    assert ui.screen.kind == "failure" and ui.screen.lines == ("二维码已过期，请刷新",)
    assert Reason.QR_EXPIRED.patient_text == "二维码已过期，请刷新"


def test_a_code_the_box_only_passes_on_is_read_not_failed(fonts):
    """A platform with no verify call (fsjson) answers NOT_SUPPORTED for every code: the patient
    sees that the code was read, not a failure on every scan."""
    ui, frames, clock = make_ui(fonts)
    ui.on_event(verification(False, reason="NOT_SUPPORTED"))
    ui.refresh()
    assert ui.screen.kind == "read" and ui.screen.title == "read" and ui.screen.lines == ("请等候工作人员",)
    ui.on_event(verification(False, reason="QR_UNKNOWN"))
    ui.refresh()
    assert ui.screen.kind == "failure"  # the wrong code shown at a verifying box is worth saying


def test_offline_with_the_pending_count_and_answers_from_the_cache(fonts):
    ui, frames, clock = make_ui(fonts)
    ui.on_event(platform(False))
    ui.on_event(outbox(7))
    ui.refresh()
    assert ui.screen.kind == "offline" and ui.screen.pending == 7 and ui.screen.online is False
    ui.on_event(verification(True, source="cache"))
    ui.refresh()
    assert ui.screen.kind == "success" and ui.screen.lines[-1] == "离线核验"


def components(**states: tuple[str, int]) -> ComponentsChanged:
    """status.components as the supervisor publishes it: name=(state, failures in a row)."""
    return ComponentsChanged({name: {"state": state, "critical": name == "outbox-db", "failures": in_a_row,
                                     "in_a_row": in_a_row, "last_error": "Fault: bug"}
                              for name, (state, in_a_row) in states.items()})


def test_a_part_that_keeps_failing_is_on_the_screen(fonts):
    """COMPONENT_FAILED: one failure a restart heals is an alarm in `status` only; a part that
    fails again and again (or was given up) is on the screen, as a missing scanner is."""
    ui, frames, clock = make_ui(fonts)
    ui.on_event(components(uploader=("restarting", 1), ui=("running", 0)))
    ui.refresh()
    assert ui.screen.kind == "ready"
    ui.on_event(components(uploader=("restarting", 2), ui=("running", 0)))
    ui.refresh()
    assert ui.screen.kind == "fault" and ui.screen.lines == ("故障 uploader", "请联系工作人员")
    # a scan's answer still comes first, then the fault again
    ui.on_event(verification(True))
    ui.refresh()
    assert ui.screen.kind == "success"
    clock.now += 5.01
    ui.refresh()
    assert ui.screen.kind == "fault"
    ui.on_event(components(uploader=("running", 2), **{"outbox-db": ("failed", 5)}))  # given up
    ui.refresh()
    assert ui.screen.lines[0] == "故障 outbox-db"
    ui.on_event(components(uploader=("running", 2), **{"outbox-db": ("running", 0)}))
    ui.refresh()
    assert ui.screen.kind == "ready"


def test_a_missing_scanner_is_shown_until_it_is_back(fonts):
    ui, frames, clock = make_ui(fonts)
    ui.on_event(source(False))
    ui.refresh()
    assert ui.screen.kind == "device_missing"
    ui.on_event(source(True))
    ui.refresh()
    assert ui.screen.kind == "ready"


def test_caller_text_comes_first_for_its_seconds(fonts):
    ui, frames, clock = make_ui(fonts)
    ui.on_event(verification(True))
    ui.show_message(["请到3号窗口缴费"], seconds=10)
    ui.refresh()
    assert ui.screen.kind == "message" and ui.screen.lines == ("请到3号窗口缴费",)
    clock.now += 10.01
    ui.refresh()
    assert ui.screen.kind == "ready"


def test_frames_go_to_the_display_only_when_the_picture_changes(fonts):
    ui, frames, clock = make_ui(fonts)
    ui.refresh()
    ui.refresh()
    ui.on_event(outbox(0))  # nothing visible changes
    ui.refresh()
    assert len(frames) == 1
    clock.now += 60  # the minute turns: the clock in the header changes
    ui.refresh()
    assert len(frames) == 2


def test_idle_the_ui_sleeps_until_the_next_minute(fonts):
    ui, frames, clock = make_ui(fonts)
    until = ui.refresh()
    assert 0 < until - clock.now <= 60


def test_provisioning_result_screen(fonts):
    ui, frames, clock = make_ui(fonts)
    ui.show_provisioning(False, ["platform.endpoint: required"])
    ui.refresh()
    assert ui.screen.kind == "provisioning" and ui.screen.title == "provision_failed"
    expected = render(replace(ui.screen), (128, 64), fonts)
    assert ImageChops.difference(frames[-1].convert("L"), expected.convert("L")).getbbox() is None


@pytest.mark.parametrize("path", sorted((Path(__file__).resolve().parents[2] / "docs" / "screens").glob("*.png")),
                         ids=lambda p: p.name)
def test_the_readme_screens_are_the_code_s(fonts, path):
    """docs/screens/*.png (in the README) stay what `scanbox display preview --scale 3` writes."""
    from agent.ui import preview

    name, _, size = path.stem.partition("-128x")
    height = int(size) if size else 64
    if name not in samples(fonts):
        name, height = path.stem, 64
    expected = preview(samples(fonts)[name], (128, height), fonts, 3)
    assert ImageChops.difference(Image.open(path).convert("L"), expected).getbbox() is None


def test_the_header_tells_network_down_from_platform_down(fonts):
    ui, frames, clock = make_ui(fonts)
    ui.on_event(NetworkChanged(True))
    ui.on_event(platform(False))
    ui.refresh()
    platform_down = frames[-1]
    assert ui.screen.network is True and ui.screen.online is False
    ui.on_event(NetworkChanged(False))
    ui.refresh()
    assert ui.screen.network is False
    # the glyph left of "离线" changed from bars to a cross: the pictures differ in the header only
    changed = ImageChops.difference(platform_down.convert("L"), frames[-1].convert("L")).getbbox()
    assert changed is not None and changed[3] <= 14


def test_text_layout_does_not_depend_on_which_system_libraries_are_installed(fonts):
    """With libfribidi present Pillow would lay text out with raqm and put glyphs elsewhere:
    the screens (and these references) would then differ from box to box."""
    from PIL import ImageFont

    assert fonts.small.layout_engine == ImageFont.Layout.BASIC
    assert fonts.large.layout_engine == ImageFont.Layout.BASIC
