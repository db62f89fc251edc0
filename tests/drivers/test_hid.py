"""HID keyboard-wedge scanners: real evdev.InputEvent sequences through the driver's decoding
path, and the driver's device handling (grab, unplug, replug) over a fake device list whose
devices have real file descriptors (pipes) for the driver's select()."""

from __future__ import annotations

import asyncio
import errno
import os
import string
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any, Iterable, Iterator

import pytest
from evdev import InputEvent, ecodes as e

from agent import schema
from agent.daemon import Daemon
from drivers import hid
from drivers.base import Source
from tests.conftest import RpcClient, make_config, until
from tests.drivers.test_serial_scanner import RecordingSink

PRINTABLE = string.printable[:95]  # every printable ASCII character, space included

US = hid.LAYOUTS["us"]
DE = hid.LAYOUTS["de"]


def decode(events: Iterable[InputEvent], layout: hid.Layout = US, caps_lock: bool = False) -> str:
    decoder = hid.KeyDecoder(layout, caps_lock)
    return "".join(decoder.feed(ev) for ev in events)


def press(*codes: int) -> list[InputEvent]:
    """Press the keys in order, release them in reverse (a chord: modifiers first)."""
    down = [InputEvent(0, 0, e.EV_KEY, c, 1) for c in codes]
    up = [InputEvent(0, 0, e.EV_KEY, c, 0) for c in reversed(codes)]
    return down + up


@pytest.mark.parametrize("layout", [US, DE], ids=["us", "de"])
@pytest.mark.parametrize("shift", [e.KEY_LEFTSHIFT, e.KEY_RIGHTSHIFT], ids=["lshift", "rshift"])
def test_every_printable_ascii_character(layout: hid.Layout, shift: int) -> None:
    assert decode(hid.keystrokes(PRINTABLE, layout, shift), layout) == PRINTABLE + "\n"


def test_us_sequences_by_hand() -> None:
    assert decode(press(e.KEY_LEFTSHIFT, e.KEY_2) + press(e.KEY_Y) + press(e.KEY_RIGHTSHIFT, e.KEY_APOSTROPHE)) == '@y"'


def test_german_layout_by_hand() -> None:
    assert decode(press(e.KEY_Y) + press(e.KEY_Z), DE) == "zy"
    assert decode(press(e.KEY_RIGHTALT, e.KEY_Q), DE) == "@"
    assert decode(press(e.KEY_LEFTSHIFT, e.KEY_7) + press(e.KEY_RIGHTALT, e.KEY_MINUS), DE) == "/\\"
    # dead keys: alone (with space), composed, and with a letter they do not combine with
    assert decode(press(e.KEY_GRAVE) + press(e.KEY_SPACE), DE) == "^"
    assert decode(press(e.KEY_EQUAL) + press(e.KEY_E), DE) == "é"
    assert decode(press(e.KEY_LEFTSHIFT, e.KEY_EQUAL) + press(e.KEY_A), DE) == "à"
    assert decode(press(e.KEY_GRAVE) + press(e.KEY_X), DE) == "^x"
    assert decode(press(e.KEY_SEMICOLON) + press(e.KEY_LEFTSHIFT, e.KEY_APOSTROPHE) + press(e.KEY_MINUS), DE) == "öÄß"


def test_caps_lock_inverts_shift_for_letters_only() -> None:
    events = (press(e.KEY_CAPSLOCK) + press(e.KEY_A) + press(e.KEY_LEFTSHIFT, e.KEY_B) + press(e.KEY_1)
              + press(e.KEY_LEFTSHIFT, e.KEY_1) + press(e.KEY_CAPSLOCK) + press(e.KEY_C))
    assert decode(events) == "Ab1!c"
    # the state the device's LED reports when it is grabbed
    assert decode(press(e.KEY_A), caps_lock=True) == "A"
    assert decode(press(e.KEY_APOSTROPHE), DE, caps_lock=True) == "Ä"


def test_keypad_and_its_enter() -> None:
    events = press(e.KEY_KP1) + press(e.KEY_KP0) + press(e.KEY_KPDOT) + press(e.KEY_KPMINUS) + press(e.KEY_KPENTER)
    assert decode(events) == "10.-\n"


def alt(*digit_keys: int) -> list[InputEvent]:
    return ([InputEvent(0, 0, e.EV_KEY, e.KEY_LEFTALT, 1)] + [ev for k in digit_keys for ev in press(k)]
            + [InputEvent(0, 0, e.EV_KEY, e.KEY_LEFTALT, 0)])


def test_alt_codes_type_chinese() -> None:
    # 中 is GBK D6D0 = 54992; Alt+65 is A; Alt+0228 is ä (Windows-1252)
    assert decode(alt(e.KEY_KP5, e.KEY_KP4, e.KEY_KP9, e.KEY_KP9, e.KEY_KP2)) == "中"
    assert decode(alt(e.KEY_KP6, e.KEY_KP5) + alt(e.KEY_KP0, e.KEY_KP2, e.KEY_KP2, e.KEY_KP8)) == "Aä"
    text = "患者:张三丰 ID 630102198001011234 青海省西宁市"
    assert decode(hid.keystrokes(text, US, alt_charset="gbk")) == text + "\n"
    assert decode(hid.keystrokes("ä中", DE, alt_charset="gbk", end=None), DE) == "ä中"  # ä has a key on de
    # switched off: an Alt chord types nothing, and the keypad digits in it are not typed either
    off = hid.KeyDecoder(US, alt_charset=None)
    assert "".join(off.feed(ev) for ev in alt(e.KEY_KP5, e.KEY_KP4) + press(e.KEY_KP1)) == "1"


def test_ignores_releases_repeats_and_other_events() -> None:
    events = [InputEvent(0, 0, e.EV_MSC, e.MSC_SCAN, 4), InputEvent(0, 0, e.EV_KEY, e.KEY_A, 1),
              InputEvent(0, 0, e.EV_KEY, e.KEY_A, 2), InputEvent(0, 0, e.EV_KEY, e.KEY_A, 0),
              InputEvent(0, 0, e.EV_SYN, e.SYN_REPORT, 0), InputEvent(0, 0, e.EV_KEY, e.KEY_F5, 1)]
    assert decode(events) == "a"
    assert decode(press(e.KEY_LEFTCTRL, e.KEY_J) + press(e.KEY_K)) == "k"


def test_keystrokes_refuses_what_a_layout_cannot_type() -> None:
    with pytest.raises(ValueError, match="cannot be typed"):
        hid.keystrokes("中", US)


# --- the driver, over a fake device list ------------------------------------------------------


class FakeDevice:
    """An input device with a pipe for its fd: the driver select()s on it as on /dev/input/eventN."""

    def __init__(self, path: str, name: str = "Honeywell scanner", leds: Iterable[int] = (),
                 busy: bool = False) -> None:
        self.path = path
        self.name = name
        self._leds = list(leds)
        self.busy = busy
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        self.queue: deque[list[InputEvent]] = deque()
        self.gone = False
        self.grabbed = False
        self.closed = False

    def fileno(self) -> int:
        return self.r

    def type(self, events: Iterable[InputEvent]) -> None:
        self.queue.append(list(events))
        os.write(self.w, b"e")

    def read(self) -> Iterator[InputEvent]:
        if not self.queue and self.gone:  # what came before the unplug is read first
            raise OSError(errno.ENODEV, "No such device")
        if not self.gone:
            try:
                os.read(self.r, 4096)
            except BlockingIOError:
                pass
        if not self.queue:
            raise BlockingIOError(errno.EAGAIN, "no events")
        out: list[InputEvent] = []
        while self.queue:
            out += self.queue.popleft()
        return iter(out)

    def unplug(self) -> None:
        self.gone = True
        os.write(self.w, b"x")  # the fd turns readable, and the read fails, as evdev's does

    def grab(self) -> None:
        if self.busy:
            raise OSError(errno.EBUSY, "Device or resource busy")
        self.grabbed = True

    def leds(self) -> list[int]:
        return self._leds

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            os.close(self.r)
            os.close(self.w)


class FakeBus:
    """The device list the driver discovers from: plug and unplug devices."""

    def __init__(self) -> None:
        self.plugged: dict[str, FakeDevice] = {}
        self.discoveries = 0  # how often the driver listed the devices
        self._discovered = threading.Condition()

    def plug(self, device: FakeDevice) -> FakeDevice:
        self.plugged[device.path] = device
        return device

    def unplug(self, path: str) -> None:
        self.plugged.pop(path).unplug()

    def discover(self) -> list[str]:
        with self._discovered:
            self.discoveries += 1
            self._discovered.notify_all()
        return list(self.plugged)

    def wait_discoveries(self, n: int, timeout: float = 5.0) -> None:
        with self._discovered:
            assert self._discovered.wait_for(lambda: self.discoveries >= n, timeout), \
                "the driver listed the devices %d times, not %d" % (self.discoveries, n)

    def open(self, path: str) -> FakeDevice:
        if path not in self.plugged:
            raise FileNotFoundError(errno.ENOENT, "No such file or directory", path)
        return self.plugged[path]


@pytest.fixture
def bus():
    bus = FakeBus()
    yield bus
    for device in bus.plugged.values():
        device.close()


@pytest.fixture
def started(bus: FakeBus):
    sources: list[hid.HidScanner] = []

    def start(**options: Any) -> tuple[hid.HidScanner, RecordingSink]:
        opts = schema.convert({"driver": "hid", "devices": ["/dev/input/by-id/usb-*-event-kbd"],
                                           "rescan_s": 0.1, **options}, hid.Options)
        source = hid.create("counter", opts, discover=bus.discover, opener=bus.open)
        sink = RecordingSink()
        source.start(sink)
        sources.append(source)
        return source, sink

    yield start
    for source in sources:
        source.stop()


def test_a_scan_through_the_driver(bus: FakeBus, started) -> None:
    device = bus.plug(FakeDevice("/dev/input/event3"))
    _, sink = started()
    sink.wait_connected(True)
    assert device.grabbed
    code = "6B34A2F1" * 8 + ":1"
    device.type(hid.keystrokes(code, US))
    scan = sink.next("scan")
    assert (scan.payload, scan.source, scan.kind.value) == (code, "hid:counter", "qr")


def test_a_chinese_scan_through_the_driver(bus: FakeBus, started) -> None:
    device = bus.plug(FakeDevice("/dev/input/event3"))
    _, sink = started()
    sink.wait_connected(True)
    device.type(hid.keystrokes("西宁市第一人民医院 挂号 0012", US, alt_charset="gb18030"))
    assert sink.next("scan").payload == "西宁市第一人民医院 挂号 0012"


def test_not_grabbed_when_told_not_to(bus: FakeBus, started) -> None:
    device = bus.plug(FakeDevice("/dev/input/event3"))
    _, sink = started(grab=False)
    sink.wait_connected(True)
    assert not device.grabbed


def test_two_scanners_typing_at_once_do_not_mix(bus: FakeBus, started) -> None:
    a = bus.plug(FakeDevice("/dev/input/event3"))
    b = bus.plug(FakeDevice("/dev/input/event4"))
    _, sink = started()
    sink.wait_connected(True)
    ka = hid.keystrokes("ABCDEF", US)  # Shift held around every letter
    kb = hid.keystrokes("uvwxyz", US)
    for i in range(0, max(len(ka), len(kb)), 2):  # interleaved, two events at a time
        a.type(ka[i:i + 2])
        b.type(kb[i:i + 2])
    assert {sink.next("scan").payload, sink.next("scan").payload} == {"ABCDEF", "uvwxyz"}


def test_caps_lock_state_is_read_from_the_device(bus: FakeBus, started) -> None:
    device = bus.plug(FakeDevice("/dev/input/event3", leds=[e.LED_CAPSL]))
    _, sink = started()
    sink.wait_connected(True)
    device.type(press(e.KEY_A) + press(e.KEY_ENTER))
    assert sink.next("scan").payload == "A"


@pytest.mark.parametrize("options,tail,expected", [
    ({}, [e.KEY_TAB], "abc"),
    ({"end_keys": ["tab"]}, [e.KEY_ENTER, e.KEY_TAB], "abc\n"),
    ({"suffix": "#!", "idle_end_s": 0}, [], "abc"),
])
def test_scan_ends(bus: FakeBus, started, options: dict[str, Any], tail: list[int], expected: str) -> None:
    device = bus.plug(FakeDevice("/dev/input/event3"))
    _, sink = started(**options)
    sink.wait_connected(True)
    text = "abc#!" if options.get("suffix") else "abc"
    events = hid.keystrokes(text, US, end=None)
    for code in tail:
        events += press(code)
    device.type(events)
    assert sink.next("scan").payload == expected


def test_a_scanner_without_terminator_ends_when_idle(bus: FakeBus, started) -> None:
    device = bus.plug(FakeDevice("/dev/input/event3"))
    _, sink = started(idle_end_s=0.05)
    sink.wait_connected(True)
    device.type(hid.keystrokes("1234", US, end=None))
    assert sink.next("scan").payload == "1234"
    device.type(hid.keystrokes("5678", US, end=None))
    assert sink.next("scan").payload == "5678"


def test_an_endless_scan_is_dropped_and_reported(bus: FakeBus, started) -> None:
    device = bus.plug(FakeDevice("/dev/input/event3"))
    _, sink = started(max_length=16, idle_end_s=0)
    sink.wait_connected(True)
    device.type(hid.keystrokes("x" * 40, US))
    assert "dropped" in sink.next("problem")
    device.type(hid.keystrokes("ok", US))
    assert sink.next("scan").payload == "ok"


def test_unplug_is_an_alarm_and_replug_is_grabbed_again(bus: FakeBus, started) -> None:
    bus.plug(FakeDevice("/dev/input/event3"))
    source, sink = started()
    sink.wait_connected(True)
    bus.plugged["/dev/input/event3"].type(hid.keystrokes("12", US, end=None))
    bus.unplug("/dev/input/event3")
    sink.wait_connected(False)
    assert "no input device matches /dev/input/by-id/usb-*-event-kbd" in sink.connected_state[-1][1]
    assert "gone in the middle of a scan; 2 characters dropped" in sink.problems[-1]
    # unplugged: the device list is looked at every rescan_s, not in a loop
    listed, t0 = bus.discoveries, time.monotonic()
    bus.wait_discoveries(listed + 3)
    assert time.monotonic() - t0 >= 2 * 0.1
    replugged = bus.plug(FakeDevice("/dev/input/event7"))
    sink.wait_connected(True)
    assert replugged.grabbed
    replugged.type(hid.keystrokes("back", US))
    assert sink.next("scan").payload == "back"


def test_a_fault_in_discovery_is_reported_and_survived(bus: FakeBus) -> None:
    calls = []

    def discover() -> list[str]:
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("udev database unreadable")
        return bus.discover()

    device = bus.plug(FakeDevice("/dev/input/event3"))
    opts = schema.convert({"driver": "hid", "devices": ["0c2e:0b61"], "rescan_s": 0.1}, hid.Options)
    source = hid.create("counter", opts, discover=discover, opener=bus.open)
    sink = RecordingSink()
    source.start(sink)
    try:
        sink.wait_connected(False)
        assert "driver failed: udev database unreadable" in sink.connected_state[-1][1]
        sink.wait_connected(True)
        device.type(hid.keystrokes("still here", US))
        assert sink.next("scan").payload == "still here"
    finally:
        source.stop()


def test_a_device_held_by_another_program_is_reported(bus: FakeBus, started) -> None:
    bus.plug(FakeDevice("/dev/input/event3", busy=True))
    _, sink = started()
    sink.wait_connected(False)
    detail = sink.connected_state[-1][1]
    assert "cannot grab /dev/input/event3" in detail and "another program" in detail


def test_options_are_checked() -> None:
    with pytest.raises(schema.Invalid, match="vendor:product"):
        schema.convert({"driver": "hid", "devices": ["scanner"]}, hid.Options)
    with pytest.raises(schema.Invalid):
        schema.convert({"driver": "hid", "devices": ["0c2e:0b61"], "layout": "fr"}, hid.Options)
    with pytest.raises(schema.Invalid):
        schema.convert({"driver": "hid", "devices": []}, hid.Options)
    with pytest.raises(schema.Invalid, match="unknown charset"):
        schema.convert({"driver": "hid", "devices": ["0c2e:0b61"], "alt_charset": "gbx"}, hid.Options)
    off = schema.convert({"driver": "hid", "devices": ["0c2e:0b61"], "alt_charset": ""}, hid.Options)
    assert off.alt_charset is None


def fake_sysfs(root: Path) -> tuple[Path, Path]:
    dev, sys = root / "dev", root / "sys"
    (dev / "input" / "by-id").mkdir(parents=True)
    for n, name, vendor, product in [(0, "Power Button", "0000", "0001"),
                                     (3, "Honeywell Imaging 1950g", "0C2E", "0B61"),
                                     (11, "Newland NLS-FR40", "1eab", "1a03")]:
        (dev / "input" / ("event%d" % n)).touch()
        ids = sys / "class" / "input" / ("event%d" % n) / "device" / "id"
        ids.mkdir(parents=True)
        (ids.parent / "name").write_text(name + "\n")
        (ids / "vendor").write_text(vendor + "\n")
        (ids / "product").write_text(product + "\n")
    (dev / "input" / "by-id" / "usb-Honeywell_1950g-event-kbd").symlink_to("../event3")
    return dev, sys


def test_devices_are_found_by_id_glob_and_by_vendor_product(tmp_path: Path) -> None:
    dev, sys = fake_sysfs(tmp_path)
    assert hid.find_devices(["/dev/input/by-id/usb-Honeywell*-event-kbd"], dev, sys) == [str(dev / "input/event3")]
    assert hid.find_devices(["1eab:1a03"], dev, sys) == [str(dev / "input/event11")]
    assert hid.find_devices(["0c2e:0B61", "1eab:1a03"], dev, sys) == [str(dev / "input/event3"),
                                                                      str(dev / "input/event11")]
    assert hid.find_devices(["ffff:ffff"], dev, sys) == []
    nodes = {n.path: n for n in hid.list_input_nodes(dev, sys)}
    assert nodes[str(dev / "input/event3")].by_id == (str(dev / "input/by-id/usb-Honeywell_1950g-event-kbd"),)
    assert nodes[str(dev / "input/event11")].name == "Newland NLS-FR40"


def test_the_fake_device_has_what_the_driver_uses() -> None:
    device = FakeDevice("/dev/input/event3")
    try:
        assert isinstance(device, hid.InputDeviceLike)
    finally:
        device.close()


async def test_a_hid_scan_reaches_the_his_and_a_missing_scanner_is_an_alarm(tmp_path: Path, sim_server,
                                                                          bus: FakeBus) -> None:
    config = make_config(sim_server, tmp_path, sources={
        "counter": {"driver": "hid", "devices": ["/dev/input/by-id/usb-*-event-kbd"], "rescan_s": 0.1},
        "kiosk": {"driver": "hid", "devices": ["ffff:0001"]}})
    sources: list[Source] = [hid.create("counter", config.sources["counter"], discover=bus.discover, opener=bus.open),
               hid.create("kiosk", config.sources["kiosk"], discover=lambda: [], opener=bus.open)]
    device = bus.plug(FakeDevice("/dev/input/event3"))
    daemon = Daemon(config, sources=sources)
    await daemon.start()
    assert daemon.stream.unix_path is not None
    client = await RpcClient.unix(daemon.stream.unix_path)
    try:
        await until(lambda: daemon.hub.sources.get("hid:counter") is not None
                    and daemon.hub.sources["hid:counter"].connected)
        waiting = asyncio.ensure_future(client.call("read_card", {"timeout_s": 10}))
        await until(lambda: daemon.hub.waiting >= 1)
        resident = list(sim_server.sim.residents.values())[0]
        device.type(hid.keystrokes(resident.static_qr, US))
        result = await waiting
        assert result["scan"]["source"] == "hid:counter"
        assert result["scan"]["payload"] == resident.static_qr
        assert result["verification"]["ok"] is True
        status = await client.call("status")
        alarm = next(a for a in status["alarms"] if a["source"] == "hid:kiosk")
        assert alarm["code"] == "SOURCE_DISCONNECTED" and "no input device matches ffff:0001" in alarm["text"]
    finally:
        await client.close()
        await daemon.stop()
