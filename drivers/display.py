"""The OLED: luma.oled devices (ssd1306, sh1106, ssd1309) on I2C or SPI, and luma's dummy.

`Display` owns the device in its own thread and draws only the newest frame it was given, as
fast as the bus takes it and no faster: frames that arrive while one is being drawn replace each
other. A display that is missing, or vanishes mid-run (unplugged, a loose I2C wire), is reported
and reopened with backoff; nothing else in the box waits for it (STYLE.md item 8).
"""

import logging
import threading
from pathlib import Path
from typing import Annotated, Any, Callable, Literal

from msgspec import Meta

from agent.schema import Custom
from drivers.base import Backoff, DriverOptions

logger = logging.getLogger(__name__)

MODELS = ("ssd1306", "sh1106", "ssd1309")


class I2cAddress(int, Custom):
    """A 7-bit I2C address a device may have (0x03 to 0x77): a number, or a string such as
    "0x3C" as the display's label and i2cdetect write it."""

    __slots__ = ()

    @classmethod
    def decode(cls, value: Any) -> "I2cAddress":
        if isinstance(value, str):
            try:
                value = int(value, 0)
            except ValueError:
                raise ValueError("an I2C address such as 0x3C") from None
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError("an I2C address such as 0x3C")
        if not 0x03 <= value <= 0x77:
            raise ValueError("0x%02X is not a 7-bit device address (0x03 to 0x77)" % value)
        return cls(value)

    def encode(self) -> int:
        return int(self)


class Options(DriverOptions):
    """The `[display]` section."""

    model: Literal["ssd1306", "sh1106", "ssd1309", "dummy"] = "ssd1306"
    interface: Literal["i2c", "spi"] = "i2c"
    i2c_port: Annotated[int, Meta(ge=0, le=255)] = 1  # /dev/i2c-N
    i2c_address: I2cAddress = I2cAddress(0x3C)
    spi_port: Annotated[int, Meta(ge=0, le=7)] = 0
    spi_device: Annotated[int, Meta(ge=0, le=7)] = 0
    gpio_dc: Annotated[int, Meta(ge=0, le=40)] = 24
    gpio_rst: Annotated[int, Meta(ge=0, le=40)] = 25
    height: Literal[64, 32] = 64  # width is 128
    rotate: Literal[0, 180] = 0  # mounted upside down: 180 (the screens are laid out landscape)
    contrast: Annotated[int, Meta(ge=0, le=255)] = 127
    font: Path | None = None  # a CJK font; default: WenQuanYi Zen Hei (Debian fonts-wqy-zenhei)
    result_s: Annotated[float, Meta(gt=0, le=120)] = 5.0  # how long a verification result stays up

    @property
    def size(self) -> tuple[int, int]:
        return (128, self.height)

    def describe(self) -> str:
        if self.model == "dummy":
            return "dummy"
        if self.interface == "i2c":
            return "%s on i2c-%d at 0x%02X" % (self.model, self.i2c_port, self.i2c_address)
        return "%s on spi%d.%d" % (self.model, self.spi_port, self.spi_device)


def open_device(options: Options, bus: Any = None) -> Any:
    """The luma device for `options`. `bus` replaces the smbus (tests pass one that records the
    bytes or fails like a vanished display). Raises luma.core.error.Error or OSError."""
    from luma.core.device import dummy

    if options.model == "dummy":
        return dummy(width=128, height=options.height, rotate=options.rotate // 90, mode="1")
    from luma.core.interface import serial
    from luma.oled import device as oled

    if options.interface == "i2c":
        interface = serial.i2c(bus=bus, port=options.i2c_port, address=options.i2c_address)
    else:  # needs RPi.GPIO (Raspberry Pi OS has it), imported by luma only now
        interface = serial.spi(port=options.spi_port, device=options.spi_device,
                               gpio_DC=options.gpio_dc, gpio_RST=options.gpio_rst)
    device = getattr(oled, options.model)(interface, width=128, height=options.height,
                                          rotate=options.rotate // 90)
    device.persist = True  # leave the last screen up at exit: scanbox restarting is no reason to go blank
    device.contrast(options.contrast)
    return device


class Display:
    """The device side of the screen. `show()` may be called from any thread; the newest frame
    is drawn by the display's own thread."""

    def __init__(self, options: Options, *, opener: Callable[[Options], Any] | None = None,
                 on_change: Callable[[bool, str | None], None] | None = None) -> None:
        self.options = options
        self.opener = opener or open_device
        self.on_change = on_change
        self.connected = False
        self.error: str | None = None
        self.device: Any = None  # the open luma device (its .image on the dummy: the last frame)
        self._frame: Any = None
        self._fresh = False
        self._stopping = False
        self._cond = threading.Condition()
        self._thread: threading.Thread | None = None
        self._backoff = Backoff(0.5, 10.0)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="display", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(5)

    def show(self, image: Any) -> None:
        with self._cond:
            self._frame = image
            self._fresh = True
            self._cond.notify_all()

    def _report(self, connected: bool, error: str | None) -> None:
        if (connected, error) == (self.connected, self.error):
            return
        self.connected, self.error = connected, error
        if connected:
            logger.info("display: %s ready", self.options.describe())
        else:
            logger.warning("display: %s: %s", self.options.describe(), error)
        if self.on_change is not None:
            try:
                self.on_change(connected, error)
            except Exception:
                logger.exception("display: status callback failed")

    def _run(self) -> None:
        device = self.device = None
        while True:
            with self._cond:
                if device is None:
                    # not connected: try again after the backoff, or now if told to stop
                    self._cond.wait_for(lambda: self._stopping, timeout=self._backoff.next() if self.error else 0)
                else:
                    self._cond.wait_for(lambda: self._fresh or self._stopping)
                if self._stopping:
                    break
                frame, self._fresh = self._frame, False
            if device is None:
                device = self.device = self._open()
                if device is None:
                    continue
                frame = frame if frame is not None else self._frame
            if frame is None:
                continue
            try:
                device.display(frame)
            except Exception as exc:  # luma.core.error.Error, OSError (EREMOTEIO when unplugged)
                self._report(False, "lost while drawing: %s" % (exc or type(exc).__name__))
                device = self.device = None
                with self._cond:
                    self._fresh = True  # redraw the newest frame once it is back
        if device is not None:
            try:
                device.cleanup()
            except Exception:
                logger.debug("display: cleanup failed", exc_info=True)

    def _open(self) -> Any:
        try:
            device = self.opener(self.options)
        except Exception as exc:  # DeviceNotFoundError, DevicePermissionError, OSError, ImportError
            self._report(False, "cannot open: %s" % (exc or type(exc).__name__))
            return None
        self._backoff.reset()
        self._report(True, None)
        return device
