"""Input driver costs: camera QR decoding per frame and on hard frames (zxing-cpp and zbar),
HID keystroke decoding per scan, ID card reads against the pty reader emulator.

    .venv/bin/python bench/bench_drivers.py [--frames 40] [--hard 60]

Runs pinned to one CPU core (the figure a Pi core has to carry; a Pi 4 core is ~3-4x slower
than a desktop core).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402,F401  (puts the repo on sys.path)
from common import percentile  # noqa: E402

from drivers import camera, hid, idcard  # noqa: E402
from tests.drivers.qr_frames import HARD, frame, hard_frames  # noqa: E402
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
        print("  %-14s %7.0f%% %7.0f%%" % (kind, *row))
    print("  %-14s %7.0f%% %7.0f%%" % ("all", *(100 * totals[n] / (n_hard * len(HARD)) for n in decoders)))


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
    args = parser.parse_args()
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})
    bench_camera(args.frames, args.hard)
    bench_hid(2000)
    bench_idcard(50)


if __name__ == "__main__":
    main()
