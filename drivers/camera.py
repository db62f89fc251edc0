"""Cameras that read QR codes: the Raspberry Pi camera (picamera2), USB cameras (V4L2), and
image files or folders (tests, demos, trying a decoder on photos taken at the counter).

The driver's thread captures a frame, cuts it down to what the decoder needs (grayscale, the
region of interest, a scale), decodes it, and hands new codes to the sink: nothing runs on the
event loop. A code seen in consecutive frames is one scan; it is delivered again only after it
has been out of sight for `dedupe_s`.

QR payloads are taken as bytes, then decoded with the configured charsets in order (UTF-8, then
GB18030 by default): zbar's own text conversion guesses Shift-JIS or Latin-1 for many UTF-8
Chinese payloads (你好 comes out as "ä½ å¥½"), so it is switched off (ZBAR_CFG_BINARY) and
zxing-cpp's raw `bytes` are used.

Decoders: zxing-cpp (the default: faster and reads more hard frames, see bench/bench_drivers.py)
and zbar through pyzbar, restricted to QR symbols. USB cameras are read with linuxpy (pure Python
V4L2, no OpenCV: a scan box needs frames, not a vision library); YUYV frames give their luma
plane without any conversion (zxing-cpp reads every other byte of the frame in place), MJPEG
frames are decoded by Pillow straight to grayscale.

Phone screens: a camera looking at a phone sees the screen's pixel grid, and the two grids beat
into moire that breaks the binarizer. A frame that yields nothing is tried once more, softened
(a blur of about one pixel removes the grid and keeps the modules); frames that decode the first
time cost nothing more (bench/bench_drivers.py measures both).
"""

import abc
import codecs
import contextlib
import dataclasses
import glob
import io
import logging
import os
import threading
import time
from typing import Annotated, Any, Callable, Literal, Mapping, Union, cast

import msgspec
from msgspec import Meta
from PIL import Image, ImageFilter

from agent.model import Scan
from agent.schema import Check
from drivers.base import Backoff, DriverOptions, Finding, ProbeContext, ScanSink, ThreadedSource

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".pgm")

PICAMERA2_MISSING = (
    "picamera2 is not installed. On Raspberry Pi OS: `apt install python3-picamera2` and create the "
    "virtualenv with --system-site-packages (`pip install 'scanbox[camera-pi]'` builds only where "
    "libcamera and libcap-dev are installed). For a USB camera, set device = \"/dev/video0\".")

# ZBAR_CFG_BINARY in zbar >= 0.23 (after ENABLE, ADD_CHECK, EMIT_CHECK, ASCII); pyzbar 0.1.9's
# enum predates it
ZBAR_CFG_BINARY = 4


class CameraError(Exception):
    """A camera that cannot be opened or read; the message says what to do."""


def _roi(value: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    x, y, w, h = value
    if not (0 <= x < 1 and 0 <= y < 1 and 0 < w <= 1 - x + 1e-9 and 0 < h <= 1 - y + 1e-9):
        raise ValueError("[x, y, width, height] fractions of the frame, inside it: got %r" % (value,))
    return value


def _charsets(value: list[str]) -> list[str]:
    for charset in value:
        try:
            codecs.lookup(charset)
        except LookupError:
            raise ValueError("unknown charset %r" % charset) from None
    return value


class Options(DriverOptions):
    driver: Literal["camera"]
    # "picamera2" (the Pi camera), a V4L2 device ("/dev/video0", "/dev/v4l/by-id/..."), or an
    # image file or a folder of images
    device: Annotated[str, Meta(min_length=1)] = "picamera2"
    decoder: Literal["zxing", "zbar"] = "zxing"
    width: Annotated[int, Meta(ge=160, le=4096)] = 640
    height: Annotated[int, Meta(ge=120, le=3072)] = 480
    pixel_format: Literal["YUYV", "MJPG", "GREY"] = "YUYV"  # V4L2 only
    max_fps: Annotated[float, Meta(gt=0, le=60)] = 10.0
    # the part of the frame to decode: [x, y, width, height] as fractions of the frame
    roi: Annotated[tuple[float, float, float, float], Check(_roi)] | None = None
    # decode at 1/n of the captured size (0.5: half, 0.33: a third), the frame reduced by a
    # whole factor with a box filter: faster on large frames (bench/bench_drivers.py prints the
    # figures); codes must keep >= ~2 px per module. Other values use the next whole factor
    # below them (0.75 decodes at full size) and say so at start
    scale: Annotated[float, Meta(ge=0.1, le=1.0)] = 1.0
    # a code seen again after this long out of sight is a new scan
    dedupe_s: Annotated[float, Meta(ge=0, le=60)] = 2.0
    charsets: Annotated[list[str], Meta(min_length=1), Check(_charsets)] = msgspec.field(
        default_factory=lambda: ["utf-8", "gb18030"])
    loop: bool = False  # image files: start again after the last one (demos)
    reconnect_max_s: Annotated[float, Meta(gt=0, le=300)] = 5.0


def create(name: str, options: Options) -> "Camera":
    factor = reduction(options.scale)
    if abs(1 / factor - options.scale) > 0.01:
        logger.warning("camera:%s: scale %g decodes at 1/%d of the frame (scale reduces by whole "
                       "factors: 1, 0.5, 0.33, 0.25 ...)", name, options.scale, factor)
    return Camera(name, frames=frame_source(options), decoder=make_decoder(options.decoder),
                  roi=options.roi, scale=options.scale, max_fps=options.max_fps, dedupe_s=options.dedupe_s,
                  charsets=options.charsets, reconnect_max_s=options.reconnect_max_s)


def reduction(scale: float) -> int:
    """The whole factor a frame is reduced by for `scale`: the largest n with 1/n >= scale, so
    a code is never decoded smaller than asked."""
    return max(1, int(1 / scale + 1e-6))


# ---------------------------------------------------------------------------------------------
# frames and decoders: a grayscale frame -> payloads as bytes


@dataclasses.dataclass(frozen=True)
class LumaFrame:
    """A grayscale frame left in the camera's own buffer: a YUYV frame's luma is every other byte
    (`pix_stride` 2), a GREY frame's every byte. zxing-cpp reads it in place; whatever needs a
    PIL image (zbar, scaling, the second attempt) asks `image()` for a copy. `box` is the region
    of interest (left, top, width, height) in pixels."""

    data: bytes | bytearray | memoryview
    width: int
    height: int
    pix_stride: int = 1
    box: tuple[int, int, int, int] | None = None

    @property
    def size(self) -> tuple[int, int]:
        return (self.box[2], self.box[3]) if self.box else (self.width, self.height)

    def crop(self, box: tuple[int, int, int, int]) -> "LumaFrame":
        """The region (left, top, width, height) of the whole frame, still without a copy."""
        return dataclasses.replace(self, box=box)

    def view(self) -> Any:
        """The region as a zxing-cpp ImageView over the buffer itself."""
        import zxingcpp

        left, top, width, height = self.box or (0, 0, self.width, self.height)
        row = self.width * self.pix_stride
        data = memoryview(self.data)[top * row + left * self.pix_stride:]
        # zxing-cpp's stubs name an ndarray; it takes any buffer (the point: no copy)
        return zxingcpp.ImageView(cast(Any, data), width, height, zxingcpp.ImageFormat.Lum, row, self.pix_stride)

    def image(self) -> Image.Image:
        mode = "L" if self.pix_stride == 1 else "LA"  # YUYV read as (Y, U/V) pairs: Pillow's C code splits them
        image = Image.frombuffer(mode, (self.width, self.height), cast(Any, self.data), "raw", mode, 0, 1)
        image = image.getchannel(0) if mode == "LA" else image.copy()
        if self.box:
            left, top, width, height = self.box
            image = image.crop((left, top, left + width, top + height))
        return image


Frame = Union[Image.Image, LumaFrame]


def as_image(frame: Frame) -> Image.Image:
    return frame.image() if isinstance(frame, LumaFrame) else frame


# the second attempt's blur: a 1.5 px box washes out a phone screen's pixel grid seen at 2.5-7
# camera pixels per QR module without merging the modules. It rescued 52 of the 61 hard frames
# zxing-cpp missed (GaussianBlur(1.2): 51) at a third of a Gaussian's cost, which an idle camera
# pays on every frame (bench/bench_drivers.py prints both)
SOFTEN = ImageFilter.BoxBlur(1.5)


class Decoder(abc.ABC):
    name: str

    def decode(self, frame: Frame) -> list[bytes]:
        """The payloads in the frame; a frame that yields none is tried once more, softened."""
        found = self.read(frame)
        if not found:
            found = self.read(as_image(frame).filter(SOFTEN))
        return found

    @abc.abstractmethod
    def read(self, frame: Frame) -> list[bytes]: ...


class ZxingDecoder(Decoder):
    name = "zxing"

    def __init__(self) -> None:
        try:
            import zxingcpp
        except ImportError as exc:
            raise CameraError("zxing-cpp is not installed (pip install zxing-cpp)") from exc
        self._zxing = zxingcpp
        self._formats = zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.QRCode)

    def read(self, frame: Frame) -> list[bytes]:
        image = frame.view() if isinstance(frame, LumaFrame) else frame
        return [r.bytes for r in self._zxing.read_barcodes(image, formats=self._formats)]


class ZbarDecoder(Decoder):
    """zbar through pyzbar's ctypes wrapper, QR only and in binary mode (pyzbar's decode() offers
    neither binary mode nor a way to set it, so its few steps are repeated here)."""

    name = "zbar"

    def __init__(self) -> None:
        try:
            from pyzbar import pyzbar, wrapper
        except ImportError as exc:  # pyzbar raises ImportError when libzbar0 is missing too
            raise CameraError("pyzbar cannot load zbar (%s): apt install libzbar0" % exc) from exc
        self._pyzbar = pyzbar
        self._w = wrapper

    def read(self, frame: Frame) -> list[bytes]:
        from ctypes import c_void_p, cast

        pz, w = self._pyzbar, self._w
        pixels, width, height = pz._pixel_data(as_image(frame))
        with pz._image_scanner() as scanner:
            w.zbar_image_scanner_set_config(scanner, 0, w.ZBarConfig.CFG_ENABLE, 0)  # all symbologies off
            w.zbar_image_scanner_set_config(scanner, w.ZBarSymbol.QRCODE, w.ZBarConfig.CFG_ENABLE, 1)
            w.zbar_image_scanner_set_config(scanner, w.ZBarSymbol.QRCODE, ZBAR_CFG_BINARY, 1)
            with pz._image() as zimage:
                w.zbar_image_set_format(zimage, pz._FOURCC["L800"])
                w.zbar_image_set_size(zimage, width, height)
                w.zbar_image_set_data(zimage, cast(pixels, c_void_p), len(pixels), None)
                if w.zbar_scan_image(scanner, zimage) < 0:
                    raise CameraError("zbar refused the image")
                return [d.data for d in pz._decode_symbols(pz._symbols_for_image(zimage))]


DECODERS: dict[str, Callable[[], Decoder]] = {"zxing": ZxingDecoder, "zbar": ZbarDecoder}


def make_decoder(name: str) -> Decoder:
    return DECODERS[name]()


def prepare(frame: Frame, roi: tuple[float, float, float, float] | None, scale: float) -> Frame:
    """What the decoder needs of a frame: grayscale, the region of interest, scaled. A LumaFrame
    stays in its buffer unless it has to be scaled."""
    if isinstance(frame, Image.Image) and frame.mode != "L":
        frame = frame.convert("L")
    if roi is not None:
        x, y, w, h = roi
        W, H = frame.size
        left, top = round(x * W), round(y * H)
        box = (left, top, round((x + w) * W) - left, round((y + h) * H) - top)
        if isinstance(frame, LumaFrame):
            frame = frame.crop(box)
        else:
            frame = frame.crop((box[0], box[1], box[0] + box[2], box[1] + box[3]))
    factor = reduction(scale)
    if factor > 1:
        # a box filter over whole n x n blocks: a fraction of a millisecond where resize()'s
        # antialiased bilinear cost more than the decode it was to save, and blurred small
        # modules so that fewer codes were read (bench_drivers "camera: scale")
        frame = as_image(frame).reduce(factor)
    return frame


def payload_text(data: bytes, charsets: list[str]) -> tuple[str, str]:
    """(text, charset) with the first charset that decodes the bytes; the scan keeps the bytes."""
    for charset in charsets:
        try:
            return data.decode(charset), charset
        except UnicodeDecodeError:
            continue
    return data.decode(charsets[0], errors="backslashreplace"), charsets[0]


# ---------------------------------------------------------------------------------------------
# frame sources


class FrameSource(abc.ABC):
    describe: str

    @abc.abstractmethod
    def open(self) -> None:
        """Raises CameraError (or OSError) with what is wrong."""

    @abc.abstractmethod
    def read(self) -> Frame | None:
        """The next frame, or None at the end (image files)."""

    def close(self) -> None:  # noqa: B027  (most sources have nothing to release)
        pass


class ImageFiles(FrameSource):
    """An image file, or every image in a folder in name order: one frame each."""

    def __init__(self, path: str, loop: bool = False) -> None:
        self.path = path
        self.loop = loop
        self.describe = "images %s" % path
        self._files: list[str] = []
        self._next = 0

    def open(self) -> None:
        if os.path.isdir(self.path):
            self._files = sorted(p for p in glob.glob(os.path.join(self.path, "*"))
                                 if p.lower().endswith(IMAGE_SUFFIXES))
        elif os.path.exists(self.path):
            self._files = [self.path]
        else:
            raise CameraError("%s: no such image file or folder" % self.path)
        if not self._files:
            raise CameraError("%s: no images (%s)" % (self.path, ", ".join(IMAGE_SUFFIXES)))
        self._next = 0

    def read(self) -> Image.Image | None:
        while True:
            if self._next >= len(self._files):
                if not self.loop:
                    return None
                self._next = 0
            path = self._files[self._next]
            self._next += 1
            try:
                with Image.open(path) as image:
                    image.draft("L", image.size)  # JPEG: decode straight to grayscale
                    return image.convert("L")
            except OSError as exc:
                logger.warning("camera: cannot read %s: %s", path, exc)
                if len(self._files) == 1:
                    return None


def yuyv_luma(data: bytes | bytearray | memoryview, width: int, height: int) -> LumaFrame:
    """A YUYV (YUV 4:2:2) frame's luma plane: every other byte, read where it lies."""
    if len(data) < width * height * 2:
        raise CameraError("YUYV frame of %d bytes for %dx%d" % (len(data), width, height))
    return LumaFrame(data, width, height, pix_stride=2)


def mjpeg_gray(data: bytes, scale: float = 1.0) -> Image.Image:
    """An MJPEG frame decoded to grayscale; libjpeg scales by 1/2, 1/4, 1/8 while decoding."""
    image = Image.open(io.BytesIO(data))
    image.draft("L", (int(image.width * scale), int(image.height * scale)))
    return image.convert("L")


class V4L2Camera(FrameSource):
    def __init__(self, path: str, width: int, height: int, pixel_format: str) -> None:
        self.path = path
        self.width = width
        self.height = height
        self.pixel_format = pixel_format
        self.describe = "V4L2 %s" % path
        self._device: Any = None
        self._capture: Any = None
        self._frames: Any = None

    def open(self) -> None:
        try:
            from linuxpy.video.device import BufferType, Device, VideoCapture
        except ImportError as exc:
            raise CameraError("linuxpy is not installed (pip install linuxpy)") from exc
        if not os.path.exists(self.path):
            raise CameraError("%s: no such device (is the camera plugged in? `ls /dev/video*`)" % self.path)
        device = Device(self.path)
        device.open()
        try:
            device.set_format(BufferType.VIDEO_CAPTURE, self.width, self.height, self.pixel_format)
            fmt = device.get_format(BufferType.VIDEO_CAPTURE)
            self.width, self.height = fmt.width, fmt.height  # what the camera chose
            capture = VideoCapture(device)
            capture.open()
        except Exception:
            device.close()
            raise
        self._device, self._capture = device, capture
        self._frames = iter(capture)

    def read(self) -> Frame | None:
        frame = next(self._frames)
        fmt = frame.pixel_format.name
        if fmt == "YUYV":
            return yuyv_luma(frame.data, frame.width, frame.height)
        if fmt == "GREY":
            return LumaFrame(frame.data, frame.width, frame.height)
        if fmt in ("MJPEG", "JPEG"):
            return mjpeg_gray(frame.data)
        raise CameraError("%s: unsupported pixel format %s" % (self.path, fmt))

    def close(self) -> None:
        with contextlib.suppress(Exception):
            if self._capture is not None:
                self._capture.close()
        with contextlib.suppress(Exception):
            if self._device is not None:
                self._device.close()
        self._device = self._capture = self._frames = None


class PiCamera(FrameSource):
    def __init__(self, width: int, height: int) -> None:
        self.width = width
        self.height = height
        self.describe = "picamera2"
        self._camera: Any = None

    def open(self) -> None:
        try:
            from picamera2 import Picamera2
        except ImportError as exc:
            raise CameraError(PICAMERA2_MISSING) from exc
        camera = Picamera2()
        # YUV420: the first `height` rows are the luma plane, which is all a QR decoder needs
        camera.configure(camera.create_video_configuration(
            main={"size": (self.width, self.height), "format": "YUV420"}))
        camera.start()
        self._camera = camera

    def read(self) -> Image.Image | None:
        array = self._camera.capture_array("main")
        return Image.fromarray(array[:self.height, :self.width])

    def close(self) -> None:
        if self._camera is not None:
            with contextlib.suppress(Exception):
                self._camera.close()
            self._camera = None


def frame_source(options: Options) -> FrameSource:
    if options.device == "picamera2":
        return PiCamera(options.width, options.height)
    if options.device.startswith("/dev/"):
        return V4L2Camera(options.device, options.width, options.height, options.pixel_format)
    return ImageFiles(options.device, options.loop)


# ---------------------------------------------------------------------------------------------
# the driver


class Camera(ThreadedSource):
    def __init__(self, name: str, *, frames: FrameSource, decoder: Decoder,
                 roi: tuple[float, float, float, float] | None = None, scale: float = 1.0,
                 max_fps: float = 10.0, dedupe_s: float = 2.0, charsets: list[str] | None = None,
                 reconnect_max_s: float = 5.0) -> None:
        super().__init__("camera:" + name)
        self.frames = frames
        self.decoder = decoder
        self.roi = roi
        self.scale = scale
        self.min_interval = 1.0 / max_fps
        self.dedupe_s = dedupe_s
        self.charsets = charsets or ["utf-8", "gb18030"]
        self.backoff = Backoff(0.5, reconnect_max_s)
        self.frames_decoded = 0
        self.ended = threading.Event()  # image files: all played
        self._last_seen: dict[bytes, float] = {}

    def process(self, image: Frame, now: float, sink: ScanSink) -> None:
        """One frame: decode, and deliver the codes not seen in the last `dedupe_s`."""
        payloads = self.decoder.decode(prepare(image, self.roi, self.scale))
        self.frames_decoded += 1
        for data in payloads:
            last = self._last_seen.get(data)
            self._last_seen[data] = now
            if last is not None and now - last <= self.dedupe_s:
                continue
            _, charset = payload_text(data, self.charsets)
            sink.scan(Scan.from_qr_bytes(self.name, data, charset))
        if len(self._last_seen) > 64:  # forget codes long out of sight
            self._last_seen = {k: t for k, t in self._last_seen.items() if now - t <= self.dedupe_s}

    def _run(self, sink: ScanSink) -> None:
        last_detail: str | None = None
        while not self._stop.is_set():
            try:
                self.frames.open()
            except Exception as exc:  # a camera stack fails in many ways; each one is an alarm
                detail = "cannot open %s: %s" % (self.frames.describe, exc)
                if detail != last_detail:
                    logger.warning("%s: %s", self.name, detail)
                    sink.connected(self.name, False, detail)
                    last_detail = detail
                self._stop.wait(self.backoff.next())
                continue
            logger.info("%s: reading %s with %s", self.name, self.frames.describe, self.decoder.name)
            sink.connected(self.name, True)
            last_detail = None
            ended = self._read_frames(sink)
            self.frames.close()
            if self._stop.is_set():
                break
            if ended is None:  # image files played to the end
                self.ended.set()
                sink.connected(self.name, False, "end of images")
                return
            logger.warning("%s: %s", self.name, ended)
            sink.connected(self.name, False, ended)
            last_detail = ended
            self._stop.wait(self.backoff.next())
        sink.connected(self.name, False, "stopped")

    def _read_frames(self, sink: ScanSink) -> str | None:
        """Capture and decode until stop, the end of the images (None), or a failure (why)."""
        failing = False
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                image = self.frames.read()
            except Exception as exc:
                return "lost %s: %s" % (self.frames.describe, exc)
            if image is None:
                return None
            try:
                self.process(image, time.monotonic(), sink)
                failing = False
            except Exception as exc:  # a decoder or sink fault must not end capture
                if not failing:  # once per run of failing frames, not ten times a second
                    failing = True
                    logger.exception("%s: failed to decode a frame", self.name)
                    sink.problem(self.name, "cannot decode frames: %s" % exc)
            self._stop.wait(max(0.0, self.min_interval - (time.monotonic() - started)))
        return "stopped"


def doctor(sources: Mapping[str, Options], ctx: ProbeContext) -> list[Finding]:
    """`scanbox doctor`: the video devices on the box, and whether each configured camera is there."""
    out = []
    for path in sorted(glob.glob(str(ctx.roots.dev / "video*"))):
        node = os.path.basename(path)
        name_file = ctx.roots.sys / "class" / "video4linux" / node / "name"
        try:
            name = name_file.read_text().strip()
        except OSError:
            name = "?"
        out.append(Finding("camera", "info", path, name))
    for name, opts in sources.items():
        subject = "camera:%s" % name
        if opts.device == "picamera2":
            try:
                import picamera2  # noqa: F401
            except ImportError:
                out.append(Finding("camera", "fail", subject, "picamera2 cannot be imported", PICAMERA2_MISSING))
            else:
                out.append(Finding("camera", "ok", subject, "picamera2 is installed"))
        elif opts.device.startswith("/dev/"):
            device = ctx.dev(opts.device)
            if not device.exists():
                out.append(Finding("camera", "fail", subject, "%s does not exist" % opts.device,
                                   "plug the camera in; `ls /dev/video*`"))
            elif not os.access(device, os.R_OK | os.W_OK):
                out.append(Finding("camera", "fail", subject, "%s is not readable" % opts.device,
                                   "add the service user to group 'video'"))
            else:
                out.append(Finding("camera", "ok", subject, "%s present" % opts.device))
        elif not os.path.exists(opts.device):
            out.append(Finding("camera", "fail", subject, "%s: no such image file or folder" % opts.device))
        else:
            out.append(Finding("camera", "ok", subject, "images from %s" % opts.device))
    return out

