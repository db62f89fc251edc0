"""USB HID barcode/QR scanners in keyboard-wedge mode, read with python-evdev.

Scanners are chosen by stable names: `/dev/input/by-id/...` globs or `vendor:product` (hex, as
lsusb prints them). Each matched device is grabbed (EVIOCGRAB), so a code never reaches a
console or desktop as keystrokes. Keystrokes are turned back into text as the host would with
the configured keyboard layout (the one the scanner is set to type for): both Shift keys, Caps
Lock, AltGr, dead keys and the keypad. Each device has its own decoder state, so two scanners
typing at once never mix. A scan ends on Enter or Tab (`end_keys`), on a configured suffix, or
after `idle_end_s` without a key, for scanners that send no terminator.

One thread selects over every open device. A device that fails (ENODEV/EIO when unplugged) is
closed; the device list is looked at again every `rescan_s` (not in a loop), and a replugged
scanner is grabbed again. No matching device is an alarm (`connected` false), never an error.
"""

import codecs
import errno
import glob
import logging
import os
import re
import select
import threading
import time
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Callable, Iterable, Iterator, Literal, Mapping, Protocol, runtime_checkable

import msgspec
from evdev import InputEvent, ecodes
from msgspec import Meta

from agent.model import Scan
from agent.schema import Check
from drivers.base import DriverOptions, Finding, ProbeContext, ScanSink, ThreadedSource

logger = logging.getLogger(__name__)

VENDOR_PRODUCT = re.compile(r"([0-9a-fA-F]{4}):([0-9a-fA-F]{4})")


# ---------------------------------------------------------------------------------------------
# keyboard layouts: key -> (plain, with Shift, with AltGr); a character in a layout's `dead` set
# is a dead key that combines with the next one


@dataclass(frozen=True)
class Layout:
    name: str
    keys: dict[int, tuple[str | None, str | None, str | None]]
    dead: dict[str, str] = field(default_factory=dict)  # dead key -> combining mark


def _row(codes: Iterable[int], plain: str, shifted: str, altgr: dict[int, str] | None = None
         ) -> dict[int, tuple[str | None, str | None, str | None]]:
    out: dict[int, tuple[str | None, str | None, str | None]] = {}
    for code, p, s in zip(codes, plain, shifted, strict=True):
        out[code] = (p, s, (altgr or {}).get(code))
    return out


K = ecodes
_DIGIT_KEYS = [K.KEY_1, K.KEY_2, K.KEY_3, K.KEY_4, K.KEY_5, K.KEY_6, K.KEY_7, K.KEY_8, K.KEY_9, K.KEY_0]
_TOP = [K.KEY_Q, K.KEY_W, K.KEY_E, K.KEY_R, K.KEY_T, K.KEY_Y, K.KEY_U, K.KEY_I, K.KEY_O, K.KEY_P]
_HOME = [K.KEY_A, K.KEY_S, K.KEY_D, K.KEY_F, K.KEY_G, K.KEY_H, K.KEY_J, K.KEY_K, K.KEY_L]
_BOTTOM = [K.KEY_Z, K.KEY_X, K.KEY_C, K.KEY_V, K.KEY_B, K.KEY_N, K.KEY_M]


def _us() -> Layout:
    keys = {}
    keys.update(_row(_DIGIT_KEYS, "1234567890", "!@#$%^&*()"))
    keys.update(_row(_TOP, "qwertyuiop", "QWERTYUIOP"))
    keys.update(_row(_HOME, "asdfghjkl", "ASDFGHJKL"))
    keys.update(_row(_BOTTOM, "zxcvbnm", "ZXCVBNM"))
    keys.update(_row([K.KEY_GRAVE, K.KEY_MINUS, K.KEY_EQUAL, K.KEY_LEFTBRACE, K.KEY_RIGHTBRACE,
                      K.KEY_BACKSLASH, K.KEY_SEMICOLON, K.KEY_APOSTROPHE, K.KEY_COMMA, K.KEY_DOT,
                      K.KEY_SLASH, K.KEY_102ND, K.KEY_SPACE],
                     "`-=[]\\;',./\\ ", "~_+{}|:\"<>?| "))
    return Layout("us", keys)


def _de() -> Layout:
    """German QWERTZ (Linux `de`, with dead keys)."""
    keys = {}
    keys.update(_row(_DIGIT_KEYS, "1234567890", "!\"§$%&/()=",
                     {K.KEY_2: "²", K.KEY_3: "³", K.KEY_7: "{", K.KEY_8: "[", K.KEY_9: "]", K.KEY_0: "}"}))
    keys.update(_row(_TOP, "qwertzuiop", "QWERTZUIOP", {K.KEY_Q: "@", K.KEY_E: "€"}))
    keys.update(_row(_HOME, "asdfghjkl", "ASDFGHJKL"))
    keys.update(_row(_BOTTOM, "yxcvbnm", "YXCVBNM", {K.KEY_M: "µ"}))
    keys.update(_row([K.KEY_GRAVE, K.KEY_MINUS, K.KEY_EQUAL, K.KEY_LEFTBRACE, K.KEY_RIGHTBRACE,
                      K.KEY_BACKSLASH, K.KEY_SEMICOLON, K.KEY_APOSTROPHE, K.KEY_COMMA, K.KEY_DOT,
                      K.KEY_SLASH, K.KEY_102ND, K.KEY_SPACE],
                     "^ß´ü+#öä,.-< ", "°?`Ü*'ÖÄ;:_> ",
                     {K.KEY_MINUS: "\\", K.KEY_RIGHTBRACE: "~", K.KEY_102ND: "|"}))
    return Layout("de", keys, dead={"^": "\u0302", "´": "\u0301", "`": "\u0300"})


LAYOUTS: dict[str, Layout] = {layout.name: layout for layout in (_us(), _de())}

# the keypad types the same on every layout; scanners use it for digits (NumLock is taken as on:
# a grabbed scanner has no NumLock LED anyone could have switched off)
KEYPAD: dict[int, str] = {
    K.KEY_KP0: "0", K.KEY_KP1: "1", K.KEY_KP2: "2", K.KEY_KP3: "3", K.KEY_KP4: "4",
    K.KEY_KP5: "5", K.KEY_KP6: "6", K.KEY_KP7: "7", K.KEY_KP8: "8", K.KEY_KP9: "9",
    K.KEY_KPDOT: ".", K.KEY_KPSLASH: "/", K.KEY_KPASTERISK: "*", K.KEY_KPMINUS: "-",
    K.KEY_KPPLUS: "+", K.KEY_KPEQUAL: "=", K.KEY_KPCOMMA: ",",
}
ENTER_KEYS = {K.KEY_ENTER, K.KEY_KPENTER}
SHIFT_KEYS = {K.KEY_LEFTSHIFT, K.KEY_RIGHTSHIFT}

ENTER = "\n"
TAB = "\t"


KEYPAD_DIGITS = {K.KEY_KP0: 0, K.KEY_KP1: 1, K.KEY_KP2: 2, K.KEY_KP3: 3, K.KEY_KP4: 4,
                 K.KEY_KP5: 5, K.KEY_KP6: 6, K.KEY_KP7: 7, K.KEY_KP8: 8, K.KEY_KP9: 9}


class KeyDecoder:
    """Key events of one device -> the characters they type. Ignores everything but key presses
    (releases only matter for modifiers; autorepeat is ignored: a scanner never holds a key).

    Alt codes, the way scanners type Chinese through a keyboard interface: left Alt held, the
    character's code in decimal on the keypad, Alt released. A code over 255 is the character's
    two bytes in `alt_charset` (GBK: 中 is D6D0, typed Alt+54992); up to 255 it is the byte itself
    (Windows' Alt+0NNN; ASCII below 128). With `alt_charset` None, Alt chords type nothing."""

    def __init__(self, layout: Layout, caps_lock: bool = False, alt_charset: str | None = "gb18030") -> None:
        self.layout = layout
        self.shift: set[int] = set()
        self.altgr = False
        self.alt = False
        self.alt_digits = ""
        self.alt_charset = alt_charset
        self.ctrl = False
        self.caps_lock = caps_lock
        self.pending_dead: str | None = None

    def feed(self, event: InputEvent) -> str:
        if event.type != ecodes.EV_KEY:
            return ""
        code, value = event.code, event.value
        if code in SHIFT_KEYS:
            (self.shift.add if value else self.shift.discard)(code)
            return ""
        if code == K.KEY_RIGHTALT:
            self.altgr = value != 0
            return ""
        if code == K.KEY_LEFTALT:
            self.alt = value != 0
            return self._alt_code() if not self.alt else ""
        if self.alt:
            if value == 1 and code in KEYPAD_DIGITS:
                self.alt_digits += str(KEYPAD_DIGITS[code])
            return ""
        if code in (K.KEY_LEFTCTRL, K.KEY_RIGHTCTRL):
            self.ctrl = value != 0
            return ""
        if value != 1:
            return ""
        if code == K.KEY_CAPSLOCK:
            self.caps_lock = not self.caps_lock
            return ""
        if code in ENTER_KEYS:
            return self._flush_dead() + ENTER
        if code == K.KEY_TAB:
            return self._flush_dead() + TAB
        if self.ctrl:
            return ""
        char = KEYPAD.get(code)
        if char is None:
            char = self._layout_char(code)
            if char is None:
                return ""
            if char in self.layout.dead and self.pending_dead is None:
                self.pending_dead = char
                return ""
        return self._compose(char)

    def _alt_code(self) -> str:
        digits, self.alt_digits = self.alt_digits, ""
        if not digits or self.alt_charset is None:
            return ""
        number = int(digits) % 65536  # Windows takes the code modulo 2**16
        if number < 128:
            return chr(number)
        if number < 256:
            return bytes((number,)).decode("cp1252", errors="replace")
        return number.to_bytes(2, "big").decode(self.alt_charset, errors="replace")

    def _layout_char(self, code: int) -> str | None:
        entry = self.layout.keys.get(code)
        if entry is None:
            return None
        plain, shifted, altgr = entry
        if self.altgr:
            return altgr
        upper = bool(self.shift)
        if self.caps_lock and plain is not None and plain.isalpha() and shifted == plain.upper():
            upper = not upper  # Caps Lock inverts Shift for letters only
        return shifted if upper else plain

    def _compose(self, char: str) -> str:
        dead, self.pending_dead = self.pending_dead, None
        if dead is None:
            return char
        if char == " ":
            return dead
        composed = unicodedata.normalize("NFC", char + self.layout.dead[dead])
        return composed if len(composed) == 1 else dead + char

    def _flush_dead(self) -> str:
        dead, self.pending_dead = self.pending_dead, None
        return dead or ""


def keystrokes(text: str, layout: Layout, shift_key: int = K.KEY_LEFTSHIFT,
               end: int | None = K.KEY_ENTER, alt_charset: str | None = None) -> list[InputEvent]:
    """The key events a scanner set to `layout` sends to type `text` (tests and the benchmark).
    Each key is pressed and released with a SYN_REPORT, as the kernel reports a real scanner.
    With `alt_charset`, characters the layout has no key for are typed as Alt codes."""
    reverse: dict[str, tuple[int, int]] = {}  # char -> (code, level)
    for code, levels in layout.keys.items():
        for level, char in enumerate(levels):
            if char is not None and char not in reverse:
                reverse[char] = (code, level)
    events: list[InputEvent] = []
    t = [0.0]

    def key(code: int, value: int) -> None:
        t[0] += 0.001
        sec, usec = int(t[0]), int((t[0] % 1) * 1e6)
        events.append(InputEvent(sec, usec, ecodes.EV_MSC, ecodes.MSC_SCAN, 0x70000 + code))
        events.append(InputEvent(sec, usec, ecodes.EV_KEY, code, value))
        events.append(InputEvent(sec, usec, ecodes.EV_SYN, ecodes.SYN_REPORT, 0))

    digit_keys = {str(v): k for k, v in KEYPAD_DIGITS.items()}
    for char in text:
        if char not in reverse and alt_charset is not None:
            encoded = char.encode(alt_charset)
            if len(encoded) != 2:
                raise ValueError("%r has no two-byte %s code to type with Alt" % (char, alt_charset))
            key(K.KEY_LEFTALT, 1)
            for digit in str(int.from_bytes(encoded, "big")):
                key(digit_keys[digit], 1)
                key(digit_keys[digit], 0)
            key(K.KEY_LEFTALT, 0)
            continue
        if char not in reverse:
            raise ValueError("%r cannot be typed on the %s layout" % (char, layout.name))
        code, level = reverse[char]
        modifier = {0: None, 1: shift_key, 2: K.KEY_RIGHTALT}[level]
        if modifier is not None:
            key(modifier, 1)
        key(code, 1)
        key(code, 0)
        if modifier is not None:
            key(modifier, 0)
        if char in layout.dead:  # the dead key alone: followed by space
            key(K.KEY_SPACE, 1)
            key(K.KEY_SPACE, 0)
    if end is not None:
        key(end, 1)
        key(end, 0)
    return events


class ScanAssembler:
    """Typed characters of one device -> scans, at an end key, a suffix, or when idle. A scan
    longer than `max_length` is dropped whole (a cut code is a wrong code) and reported once."""

    def __init__(self, end_chars: str, suffix: str | None, max_length: int) -> None:
        self.end_chars = end_chars
        self.suffix = suffix
        self.max_length = max_length
        self.buffer: list[str] = []
        self.last_key = 0.0
        self.overflowed = False  # the scan in progress is too long: dropped at its end
        self.overflow_reported = False

    def add(self, chars: str, now: float) -> list[str]:
        """Returns the scans these characters complete."""
        done: list[str] = []
        self.last_key = now
        for char in chars:
            if char in self.end_chars:  # an Enter or Tab that is not an end key is part of the code
                done += self.flush()
                continue
            if len(self.buffer) >= self.max_length:
                self.overflowed = True
                self.buffer.clear()
            self.buffer.append(char)
            if self.suffix and len(self.buffer) >= len(self.suffix) and \
                    "".join(self.buffer[-len(self.suffix):]) == self.suffix:
                del self.buffer[-len(self.suffix):]
                done += self.flush()
        return done

    def flush(self) -> list[str]:
        text = "".join(self.buffer)
        self.buffer.clear()
        if self.overflowed:
            self.overflowed = self.overflow_reported = False
            return []
        return [text] if text else []

    def idle_deadline(self, idle_end_s: float | None) -> float | None:
        if not self.buffer or idle_end_s is None:
            return None
        return self.last_key + idle_end_s


# ---------------------------------------------------------------------------------------------
# device discovery (sysfs, so `scanbox doctor` and tests can point it at another root)


@dataclass(frozen=True)
class InputNode:
    path: str  # /dev/input/eventN
    name: str
    vendor: str
    product: str
    by_id: tuple[str, ...] = ()


def list_input_nodes(dev_root: Path = Path("/dev"), sys_root: Path = Path("/sys")) -> list[InputNode]:
    by_id: dict[str, list[str]] = {}
    for link in sorted(glob.glob(str(dev_root / "input" / "by-id" / "*"))):
        by_id.setdefault(os.path.basename(os.path.realpath(link)), []).append(link)
    nodes = []
    for event_dir in sorted(glob.glob(str(sys_root / "class" / "input" / "event*")),
                            key=lambda p: int(p.rsplit("event", 1)[1] or 0)):
        event = os.path.basename(event_dir)
        device = Path(event_dir) / "device"
        nodes.append(InputNode(str(dev_root / "input" / event), _read(device / "name"),
                               _read(device / "id" / "vendor").lower(), _read(device / "id" / "product").lower(),
                               tuple(by_id.get(event, ()))))
    return nodes


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def selector_matches(selector: str, node: InputNode, dev_root: Path = Path("/dev")) -> bool:
    match = VENDOR_PRODUCT.fullmatch(selector)
    if match:
        return (node.vendor, node.product) == (match.group(1).lower(), match.group(2).lower())
    pattern = _rooted(selector, dev_root)
    event = os.path.basename(node.path)
    return any(os.path.basename(os.path.realpath(p)) == event for p in glob.glob(pattern))


def _rooted(selector: str, dev_root: Path) -> str:
    if selector.startswith("/dev/"):
        return str(dev_root / selector[len("/dev/"):])
    return selector


def find_devices(selectors: list[str], dev_root: Path = Path("/dev"), sys_root: Path = Path("/sys")) -> list[str]:
    return [node.path for node in list_input_nodes(dev_root, sys_root)
            if any(selector_matches(s, node, dev_root) for s in selectors)]


# ---------------------------------------------------------------------------------------------
# the driver


@runtime_checkable
class InputDeviceLike(Protocol):
    """What the driver uses of evdev.InputDevice (tests pass a fake with a pipe as its fd)."""

    @property
    def path(self) -> str | bytes: ...  # evdev's own type; a fake's str is one

    @property
    def name(self) -> str: ...

    def fileno(self) -> int: ...

    def read(self) -> Iterator[InputEvent]: ...

    def grab(self) -> None: ...

    def leds(self) -> list[int]: ...

    def close(self) -> None: ...


END_KEYS = {"enter": ENTER, "tab": TAB}


def _devices(value: list[str]) -> list[str]:
    for item in value:
        if not VENDOR_PRODUCT.fullmatch(item) and not item.startswith("/"):
            raise ValueError("%r: give an absolute path or glob (/dev/input/by-id/usb-*-event-kbd) "
                             "or vendor:product in hex (0c2e:0b61)" % item)
    return value


def _alt_charset(value: str) -> str | None:
    if value == "":  # TOML has no null: an empty string switches Alt codes off
        return None
    try:
        codecs.lookup(value)
    except LookupError:
        raise ValueError("unknown charset %r" % value) from None
    return value


class Options(DriverOptions):
    driver: Literal["hid"]
    # /dev/input/by-id globs or vendor:product ("0c2e:0b61"); any device matching any one is read
    devices: Annotated[list[str], Meta(min_length=1), Check(_devices)]
    layout: Literal["us", "de"] = "us"
    end_keys: list[Literal["enter", "tab"]] = msgspec.field(default_factory=lambda: ["enter", "tab"])
    # text that ends a scan and is not part of it (a scanner programmed with a suffix)
    suffix: Annotated[str, Meta(min_length=1, max_length=16)] | None = None
    # a scan also ends this long after its last key (scanners without a terminator); 0: never
    idle_end_s: Annotated[float, Meta(ge=0, le=10)] = 0.2
    # the charset of Alt+keypad codes over 255 (scanners set to type Chinese); "": no Alt codes
    alt_charset: Annotated[str, Check(_alt_charset)] | None = "gb18030"
    grab: bool = True
    rescan_s: Annotated[float, Meta(ge=0.1, le=60)] = 2.0
    max_length: Annotated[int, Meta(ge=16, le=65536)] = 4096


def create(name: str, options: Options, *, discover: Callable[[], list[str]] | None = None,
           opener: Callable[[str], InputDeviceLike] | None = None) -> "HidScanner":
    selectors = list(options.devices)
    return HidScanner(
        name,
        layout=LAYOUTS[options.layout],
        alt_charset=options.alt_charset,
        end_chars="".join(END_KEYS[k] for k in options.end_keys),
        suffix=options.suffix,
        idle_end_s=options.idle_end_s or None,
        grab=options.grab,
        rescan_s=options.rescan_s,
        max_length=options.max_length,
        discover=discover or (lambda: find_devices(selectors)),
        opener=opener or _open_evdev,
        wanted=", ".join(selectors),
    )


def _open_evdev(path: str) -> InputDeviceLike:
    from evdev import InputDevice

    return InputDevice(path)


@dataclass
class _Open:
    device: InputDeviceLike
    decoder: KeyDecoder
    assembler: ScanAssembler


class HidScanner(ThreadedSource):
    def __init__(self, name: str, *, layout: Layout, alt_charset: str | None = "gb18030", end_chars: str,
                 suffix: str | None, idle_end_s: float | None, grab: bool, rescan_s: float, max_length: int,
                 discover: Callable[[], list[str]], opener: Callable[[str], InputDeviceLike],
                 wanted: str = "") -> None:
        super().__init__("hid:" + name)
        self.layout = layout
        self.alt_charset = alt_charset
        self.end_chars = end_chars
        self.suffix = suffix
        self.idle_end_s = idle_end_s
        self.grab = grab
        self.rescan_s = rescan_s
        self.max_length = max_length
        self.discover = discover
        self.opener = opener
        self.wanted = wanted
        self.devices: dict[str, _Open] = {}
        self._wake_r, self._wake_w = -1, -1
        self._failed: dict[str, str] = {}  # path -> why it could not be opened
        self._next_rescan = 0.0
        self._lock = threading.Lock()

    def _prepare(self) -> None:
        self._wake_r, self._wake_w = os.pipe()

    def _interrupt(self) -> None:
        with self._lock:  # the thread closes the pipe under the same lock when it ends
            if self._wake_w >= 0:
                os.write(self._wake_w, b"x")

    def _run(self, sink: ScanSink) -> None:
        state: tuple[bool, str | None] | None = None
        try:
            while not self._stop.is_set():
                try:
                    state = self._step(sink, state)
                except Exception as exc:  # a bug here must not end reading for good
                    logger.exception("%s: reading failed", self.name)
                    sink.connected(self.name, False, "driver failed: %s" % exc)
                    state = None
                    self._stop.wait(self.rescan_s)
        finally:
            for item in self.devices.values():
                _close(item.device)
            self.devices.clear()
            with self._lock:
                os.close(self._wake_r)
                os.close(self._wake_w)
                self._wake_r = self._wake_w = -1
            sink.connected(self.name, False, "stopped")

    def _step(self, sink: ScanSink, state: tuple[bool, str | None] | None) -> tuple[bool, str | None]:
        """Look for devices when due, report a change of state, wait for keys (or the next
        deadline: an idle scan's end, the next rescan), and read them."""
        now = time.monotonic()
        if now >= self._next_rescan:
            self._rescan()
            self._next_rescan = now + self.rescan_s
        new_state = self._state()
        if new_state != state:
            (logger.info if new_state[0] else logger.warning)("%s: %s", self.name, new_state[1] or "reading")
            sink.connected(self.name, new_state[0], new_state[1])
        timeout = self._next_rescan - now
        for item in self.devices.values():
            deadline = item.assembler.idle_deadline(self.idle_end_s)
            if deadline is not None:
                timeout = min(timeout, deadline - now)
        fds = [self._wake_r] + [item.device.fileno() for item in self.devices.values()]
        ready, _, _ = select.select(fds, [], [], max(timeout, 0))
        if self._wake_r in ready:
            os.read(self._wake_r, 64)
        now = time.monotonic()
        for path, item in list(self.devices.items()):
            if item.device.fileno() in ready:
                self._read(path, item, sink, now)
            deadline = item.assembler.idle_deadline(self.idle_end_s)
            if deadline is not None and now >= deadline:
                self._deliver(item.assembler.flush(), sink)
        return new_state

    def _state(self) -> tuple[bool, str | None]:
        if self.devices:
            return True, None
        if self._failed:
            return False, "; ".join(self._failed.values())
        return False, "no input device matches %s" % self.wanted

    def _rescan(self) -> None:
        try:
            paths = self.discover()
        except OSError as exc:
            self._failed = {"": "cannot list input devices: %s" % exc}
            return
        self._failed = {p: why for p, why in self._failed.items() if p in paths}
        for path in paths:
            if path in self.devices:
                continue
            try:
                device = self.opener(path)
            except OSError as exc:
                self._failed[path] = "cannot open %s: %s" % (path, exc.strerror or exc)
                continue
            try:
                if self.grab:
                    device.grab()
                caps = ecodes.LED_CAPSL in device.leds()
            except OSError as exc:
                why = "cannot grab %s: %s" % (path, exc.strerror or exc)
                if exc.errno == errno.EBUSY:
                    why += " (another program holds it exclusively)"
                self._failed[path] = why
                _close(device)
                continue
            self._failed.pop(path, None)
            logger.info("%s: reading %s (%s)", self.name, path, getattr(device, "name", "?"))
            self.devices[path] = _Open(device, KeyDecoder(self.layout, caps_lock=caps, alt_charset=self.alt_charset),
                                       ScanAssembler(self.end_chars, self.suffix, self.max_length))

    def _read(self, path: str, item: _Open, sink: ScanSink, now: float) -> None:
        try:
            events = list(item.device.read())
        except BlockingIOError:
            return
        except OSError as exc:
            # ENODEV/EIO: unplugged. What was typed so far is not a whole code: dropped, and said so
            if item.assembler.buffer:
                sink.problem(self.name, "%s gone in the middle of a scan; %d characters dropped"
                             % (path, len(item.assembler.buffer)))
            logger.warning("%s: lost %s: %s", self.name, path, exc.strerror or exc)
            _close(item.device)
            del self.devices[path]
            return
        for event in events:
            chars = item.decoder.feed(event)
            if chars:
                self._deliver(item.assembler.add(chars, now), sink)
                if item.assembler.overflowed and not item.assembler.overflow_reported:
                    item.assembler.overflow_reported = True
                    sink.problem(self.name, "a scan over %d characters was dropped: no end key seen "
                                 "(check end_keys / suffix)" % self.max_length)

    def _deliver(self, texts: list[str], sink: ScanSink) -> None:
        for text in texts:
            try:
                sink.scan(Scan.from_qr_bytes(self.name, text.encode("utf-8")))
            except Exception:  # the sink is the daemon's; never let it stop the reader
                logger.exception("%s: failed to deliver a scan", self.name)


def _close(device: InputDeviceLike) -> None:
    try:
        device.close()
    except OSError:
        pass


def doctor(sources: Mapping[str, Options], ctx: ProbeContext) -> list[Finding]:
    """`scanbox doctor`: every input device, which configured scanner each one is, and the
    configured scanners no device matches."""
    nodes = list_input_nodes(ctx.roots.dev, ctx.roots.sys)
    out = []
    matched: dict[str, list[str]] = {name: [] for name in sources}
    for node in nodes:
        owners = [name for name, opts in sources.items()
                  if any(selector_matches(s, node, ctx.roots.dev) for s in opts.devices)]
        for name in owners:
            matched[name].append(node.path)
        label = "%s (%s:%s)%s" % (node.name or "?", node.vendor or "?", node.product or "?",
                                  " " + ", ".join(os.path.basename(p) for p in node.by_id) if node.by_id else "")
        if owners:
            readable = os.access(node.path, os.R_OK | os.W_OK)
            out.append(Finding("input", "ok" if readable else "fail", node.path,
                               "%s: scanner for source %s" % (label, ", ".join(owners)),
                               None if readable else "the service user cannot open it: udev gives scanners "
                               "the group 'scanbox-scanner' (70-scanbox.rules for the scanner makers, and "
                               "71-scanbox-hid.rules for this source once provisioned; name it vendor:product)"))
        else:
            out.append(Finding("input", "info", node.path, "%s: not a configured scanner" % label))
    keyboards = [p for node in nodes for p in node.by_id if p.endswith("-event-kbd")]
    for name, paths in matched.items():
        if not paths:
            out.append(Finding("input", "fail", "hid:%s" % name,
                               "no input device matches %s" % ", ".join(sources[name].devices),
                               "plug the scanner in, or set devices to one of: %s"
                               % (", ".join(keyboards) or "(no keyboard-like device is present)")))
    return out

