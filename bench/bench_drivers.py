"""Input driver costs: camera QR decoding per frame and on hard frames (zxing-cpp and zbar),
phone screens (moire, dark mode, glare, an angle) against raw zxing-cpp, the USB camera's YUYV
frame path against a numpy floor, the event loop's lateness while the camera thread works on
1080p frames, HID keystroke decoding per scan, ID card reads against the pty reader emulator.

    .venv/bin/python bench/bench_drivers.py [--frames 40] [--hard 60] [--phone 60]

Runs pinned to one CPU core (the figure a Pi core has to carry; a Pi 4 core is ~3-4x slower
than a desktop core).
"""

from __future__ import annotations

import argparse
import asyncio
import io
import os
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (puts the repo on sys.path)
from common import percentile  # noqa: E402

from drivers import camera, hid, idcard  # noqa: E402
from PIL import Image  # noqa: E402

from tests.drivers.qr_frames import HARD, PHONE, frame, hard_frames, phone_frames  # noqa: E402
from tests.drivers.sam_emulator import SamEmulator  # noqa: E402

STATIC = "6B34A2F1" * 8 + ":1"
DYNAMIC = "6B34A2F1" * 8 + ":0:" + "0123456789ABCDEF" * 2


def bench_camera(n_frames: int, n_hard: int) -> None:
    decoders = {name: camera.make_decoder(name) for name in ("zbar", "zxing")}
    print("camera: decode per frame (QR only), one core, %d frames each" % n_frames)
    print("  %-6s %-10s %9s %9s %9s %8s" % ("", "frame", "p50 ms", "p99 ms", "frames/s", "decoded"))
    for size, module_px in (((640, 480), 4), ((1280, 720), 6)):
        frames = [frame(DYNAMIC, size, module_px, angle=(i * 7) % 30, seed=i) for i in range(n_frames)]
        blank = [frame(DYNAMIC, size, module_px).point(lambda v: 200)] * (n_frames // 4)
        for name, decoder in decoders.items():
            decoder.decode(frames[0])  # warm up
            times, ok = [], 0
            for image in frames:
                t0 = time.perf_counter()
                ok += decoder.decode(image) == [DYNAMIC.encode()]
                times.append(time.perf_counter() - t0)
            empty = []
            for image in blank:
                t0 = time.perf_counter()
                decoder.decode(image)
                empty.append(time.perf_counter() - t0)
            mean = statistics.mean(times)
            print("  %-6s %-10s %9.2f %9.2f %9.0f %7.0f%%   (no code in view: %.2f ms)" % (
                name, "%dx%d" % size, percentile(times, 50) * 1e3, percentile(times, 99) * 1e3, 1 / mean,
                100 * ok / len(frames), statistics.mean(empty) * 1e3))
    print("camera: success on hard frames, 640x480, %d frames of each kind" % n_hard)
    print("  %-14s %8s %8s" % ("", "zbar", "zxing"))
    totals = {name: 0 for name in decoders}
    for kind in HARD:
        frames = hard_frames(STATIC, kind, n_hard)
        row = []
        for name, decoder in decoders.items():
            ok = sum(decoder.decode(image) == [STATIC.encode()] for image in frames)
            totals[name] += ok
            row.append(100 * ok / len(frames))
        print("  %-14s %s" % (kind, " ".join("%7.0f%%" % r for r in row)))
    print("  %-14s %s" % ("all", " ".join("%7.0f%%" % (100 * totals[n] / (n_hard * len(HARD))) for n in decoders)))


def median_ms(values: list[float]) -> float:
    return statistics.median(values) * 1e3


def bench_phone(n_phone: int, n_hard: int) -> None:
    """scanbox's zxing path (a second, softened attempt when a frame yields nothing) against
    zxing-cpp called directly, frame by frame, interleaved."""
    import zxingcpp

    decoder = camera.make_decoder("zxing")
    want = [STATIC.encode()]

    def raw(image: object) -> list[bytes]:
        return [r.bytes for r in zxingcpp.read_barcodes(
            image, formats=zxingcpp.BarcodeFormats(zxingcpp.BarcodeFormat.QRCode))]

    def run(corpus: dict[str, list]) -> tuple[int, int, int, list[float], list[float]]:
        ok_raw = ok_box = total = 0
        t_raw: list[float] = []
        t_box: list[float] = []
        for kind, frames in corpus.items():
            row_raw = row_box = 0
            for image in frames:
                t0 = time.perf_counter()
                got_raw = raw(image)
                t1 = time.perf_counter()
                got_box = decoder.decode(camera.prepare(image, None, 1.0))
                t2 = time.perf_counter()
                t_raw.append(t1 - t0)
                t_box.append(t2 - t1)
                row_raw += got_raw == want
                row_box += got_box == want
            print("  %-20s %8.0f%% %8.0f%%" % (kind, 100 * row_raw / len(frames), 100 * row_box / len(frames)))
            ok_raw, ok_box, total = ok_raw + row_raw, ok_box + row_box, total + len(frames)
        return ok_raw, ok_box, total, t_raw, t_box

    print("camera: phone screens, 640x480, %d frames of each kind (goal: >= 95%% read, <= 1.5x raw time)" % n_phone)
    print("  %-20s %9s %9s" % ("", "raw zxing", "scanbox"))
    phone = {kind: phone_frames(STATIC, kind, n_phone) for kind in PHONE}
    ok_raw, ok_box, total, t_raw, t_box = run(phone)
    print("  %-20s %8.0f%% %8.0f%%   median %.2f ms vs raw %.2f ms: %.2fx" % (
        "phone screens", 100 * ok_raw / total, 100 * ok_box / total, median_ms(t_box), median_ms(t_raw),
        median_ms(t_box) / median_ms(t_raw)))
    print("camera: all hard frames, 640x480 (goal: >= 91%% read, <= 1.5x raw time)")
    hard = {kind: hard_frames(STATIC, kind, n_hard) for kind in HARD}
    hard["occluded"] = [frame(STATIC, module_px=4 + i % 2, cover=0.12 + 0.02 * (i % 5), seed=i) for i in range(n_hard)]
    hard["mixed"] = [frame(STATIC, module_px=4, angle=11 * i % 360, blur=0.6 + 0.1 * (i % 6), contrast=0.45,
                           noise=20 + i % 15, seed=i) for i in range(n_hard)]
    hard_raw, hard_box, hard_total, h_raw, h_box = run(hard)
    all_raw, all_box = ok_raw + hard_raw, ok_box + hard_box
    print("  %-20s %8.0f%% %8.0f%%   median %.2f ms vs raw %.2f ms: %.2fx  (%d frames)" % (
        "all hard frames", 100 * all_raw / (total + hard_total), 100 * all_box / (total + hard_total),
        median_ms(t_box + h_box), median_ms(t_raw + h_raw), median_ms(t_box + h_box) / median_ms(t_raw + h_raw),
        total + hard_total))
    blank = Image.new("L", (640, 480), 200)
    empty_raw: list[float] = []
    empty_box: list[float] = []
    for _ in range(n_phone):
        t0 = time.perf_counter()
        raw(blank)
        t1 = time.perf_counter()
        decoder.decode(blank)
        empty_raw.append(t1 - t0)
        empty_box.append(time.perf_counter() - t1)
    print("  no code in view: %.2f ms vs raw %.2f ms (the second attempt's cost on an idle camera)" % (
        median_ms(empty_box), median_ms(empty_raw)))


def yuyv_of(image: Image.Image) -> bytes:
    luma = image.tobytes()
    out = bytearray(2 * len(luma))
    out[0::2] = luma
    out[1::2] = b"\x80" * len(luma)
    return bytes(out)


def bench_frame_path(n: int) -> None:
    """USB camera frames to what the decoder reads, against numpy (the floor: a strided view
    made contiguous), and MJPEG decoded by libjpeg straight to grayscale."""
    try:
        import numpy
    except ImportError:
        numpy = None  # type: ignore[assignment]  # the floor is then not measured
    print("camera: USB frame to grayscale, %d frames (goal: <= 2x the numpy floor)" % n)
    for size, module_px in (((640, 480), 4), ((1920, 1080), 8)):
        gray = frame(DYNAMIC, size, module_px)
        data = yuyv_of(gray)
        w, h = size
        ours, floor = [], []
        for _ in range(n):
            t0 = time.perf_counter()
            luma = camera.yuyv_luma(data, w, h)
            t1 = time.perf_counter()
            if numpy is not None:
                numpy.ascontiguousarray(numpy.frombuffer(data, numpy.uint8)[::2].reshape(h, w))
            floor.append(time.perf_counter() - t1)
            ours.append(t1 - t0)
        if camera.make_decoder("zxing").decode(luma) != [DYNAMIC.encode()]:
            raise SystemExit("YUYV: the in-place frame did not decode")
        copy = []
        for _ in range(n):
            t0 = time.perf_counter()
            luma.image()
            copy.append(time.perf_counter() - t0)
        jpeg = io.BytesIO()
        gray.convert("RGB").save(jpeg, "JPEG", quality=85)
        mjpeg = []
        for _ in range(n):
            t0 = time.perf_counter()
            camera.mjpeg_gray(jpeg.getvalue())
            mjpeg.append(time.perf_counter() - t0)
        print("  %dx%d YUYV: %.3f ms (read in place by zxing-cpp) vs numpy %s; as a PIL copy (zbar, "
              "second attempt) %.2f ms; MJPEG decoded to gray %.2f ms" % (
                  w, h, median_ms(ours), "%.3f ms" % median_ms(floor) if numpy else "(numpy not installed)",
                  median_ms(copy), median_ms(mjpeg)))


def bench_loop_lateness(seconds: float) -> None:
    """How late the event loop's timers run while the camera thread decodes 1080p YUYV frames
    (goal: <= 5 ms above the same loop with no camera)."""
    gray = frame(DYNAMIC, (1920, 1080), 8)
    data = yuyv_of(gray)

    class Sink:
        def scan(self, scan: object) -> None: ...
        def connected(self, name: str, ok: bool, detail: str | None = None) -> None: ...
        def problem(self, name: str, detail: str) -> None: ...

    def lateness(with_camera: bool) -> tuple[float, float]:
        stop = threading.Event()
        cam = camera.Camera("bench", frames=camera.ImageFiles("."), decoder=camera.make_decoder("zxing"))

        def work() -> None:
            while not stop.is_set():
                cam.process(camera.yuyv_luma(data, 1920, 1080), time.monotonic(), Sink())  # type: ignore[arg-type]

        async def measure() -> list[float]:
            late = []
            end = time.monotonic() + seconds
            while time.monotonic() < end:
                t0 = time.perf_counter()
                await asyncio.sleep(0.005)
                late.append(time.perf_counter() - t0 - 0.005)
            return late

        thread = threading.Thread(target=work) if with_camera else None
        if thread:
            thread.start()
        try:
            late = asyncio.run(measure())
        finally:
            stop.set()
            if thread:
                thread.join()
        return percentile(late, 99) * 1e3, max(late) * 1e3

    idle_p99, idle_max = lateness(False)
    busy_p99, busy_max = lateness(True)
    print("camera: event-loop lateness over %.0f s, p99 / max: no camera %.2f / %.2f ms, camera decoding 1080p "
          "YUYV %.2f / %.2f ms (goal: <= 5 ms caused by the camera)" % (
              seconds, idle_p99, idle_max, busy_p99, busy_max))


def bench_camera_scale(n_frames: int) -> None:
    """The `scale` option: prepare + decode per frame at each scale, and the codes read. The
    "0.5 resize" row is how scale was done before (PIL's antialiased bilinear resize), kept
    for comparison: slower than no scaling at all, and it read fewer codes."""
    from PIL import Image

    def resized(image: Image.Image) -> Image.Image:
        return image.resize((image.width // 2, image.height // 2), Image.Resampling.BILINEAR)

    print("camera: scale, prepare + decode per frame, one core, %d frames each" % n_frames)
    print("  %-6s %-10s %-11s %9s %8s" % ("", "frame", "scale", "p50 ms", "decoded"))
    for size, module_px in (((640, 480), 4), ((1280, 720), 6), ((1920, 1080), 8)):
        frames = [frame(DYNAMIC, size, module_px, angle=(i * 7) % 30, seed=i) for i in range(n_frames)]
        for name in ("zbar", "zxing"):
            decoder = camera.make_decoder(name)
            for label, prepare in (("1.0", lambda im: camera.prepare(im, None, 1.0)),
                                   ("0.5", lambda im: camera.prepare(im, None, 0.5)),
                                   ("0.33", lambda im: camera.prepare(im, None, 1 / 3)),
                                   ("0.5 resize", resized)):
                decoder.decode(prepare(frames[0]))  # warm up
                times, ok = [], 0
                for image in frames:
                    t0 = time.perf_counter()
                    ok += decoder.decode(prepare(image)) == [DYNAMIC.encode()]
                    times.append(time.perf_counter() - t0)
                print("  %-6s %-10s %-11s %9.2f %7.0f%%" % (name, "%dx%d" % size, label,
                                                           percentile(times, 50) * 1e3, 100 * ok / len(frames)))


def bench_hid(n: int) -> None:
    layout = hid.LAYOUTS["us"]
    events = hid.keystrokes(DYNAMIC, layout)
    decoder = hid.KeyDecoder(layout)
    assembler = hid.ScanAssembler("\n\t", None, 4096)
    t0 = time.perf_counter()
    scans = 0
    for _ in range(n):
        for event in events:
            chars = decoder.feed(event)
            if chars:
                scans += len(assembler.add(chars, 0.0))
    elapsed = time.perf_counter() - t0
    if scans != n:
        raise SystemExit("HID: decoded %d scans of %d" % (scans, n))
    print("hid: %d-character code (%d input events): %.0f us per scan" % (
        len(DYNAMIC), len(events), elapsed / n * 1e6))


def bench_idcard(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        emulator = SamEmulator(Path(tmp))
        emulator.insert()
        port = idcard.open_port(str(emulator.path), 115200)
        link = idcard.SamLink(port, 2.0)
        times = []
        try:
            for _ in range(n):
                t0 = time.perf_counter()
                card = link.read_card()
                times.append(time.perf_counter() - t0)
                if card is None:
                    raise SystemExit("ID card: no card read")
        finally:
            port.close()
            emulator.close()
    # what the pty does not model: the bytes' time on a 115200 8N1 line (10 bits per byte)
    wire = sum(len(f) for f in (idcard.command_frame(0x20, 1), idcard.command_frame(0x20, 2),
                                idcard.command_frame(0x30, 1))) + 11 + 19 + 1295
    print("idcard: find + select + read base info against the pty emulator, %d reads: p50 %.1f ms, "
          "p99 %.1f ms (plus %.0f ms of wire time at 115200 baud on a real reader)" % (
              n, percentile(times, 50) * 1e3, percentile(times, 99) * 1e3, wire * 10 / 115200 * 1e3))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=40)
    parser.add_argument("--hard", type=int, default=60)
    parser.add_argument("--phone", type=int, default=60)
    args = parser.parse_args()
    cores = os.sched_getaffinity(0)
    bench_loop_lateness(5.0)  # on two cores, as the daemon's loop and the camera thread run on a Pi
    os.sched_setaffinity(0, {min(cores)})
    bench_camera(args.frames, args.hard)
    bench_phone(args.phone, args.hard)
    bench_frame_path(args.frames)
    bench_camera_scale(args.frames)
    bench_hid(2000)
    bench_idcard(50)


if __name__ == "__main__":
    main()
