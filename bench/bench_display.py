"""Display figures: render time per frame, and what the UI costs when nothing happens.

    .venv/bin/python bench/bench_display.py

Render time is the pure screen -> 1-bit image step (drawing on the panel is the bus's time: an
I2C frame is 1 KiB). Idle CPU is the UI running against luma's dummy device with no events for
a while: it should be about zero, since it sleeps until the minute turns.
"""

from __future__ import annotations

import asyncio
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402,F401  (puts the repo on sys.path)

from agent.events import ScanRead  # noqa: E402
from agent.model import Scan  # noqa: E402
from agent.ui import Fonts, Ui, render, samples  # noqa: E402
from drivers.display import Display, Options  # noqa: E402


def render_times(fonts: Fonts) -> None:
    for size in ((128, 64), (128, 32)):
        worst = ("", 0.0)
        total = 0.0
        screens = samples(fonts)
        for name, screen in screens.items():
            n = 200
            started = time.perf_counter()
            for _ in range(n):
                render(screen, size, fonts)
            per = (time.perf_counter() - started) / n * 1000
            total += per
            worst = max(worst, (name, per), key=lambda w: w[1])
        print("  render %dx%d: mean %.2f ms per frame, slowest %s %.2f ms"
              % (size[0], size[1], total / len(screens), worst[0], worst[1]))


async def cpu_while(seconds: float, ui: Ui, animate: bool) -> tuple[float, int]:
    task = asyncio.get_running_loop().create_task(ui.run())
    await asyncio.sleep(0.2)  # first frame drawn
    frames = ui.frames
    if animate:
        # the verifying screen's progress bar, for the whole period
        ui.on_event(ScanRead(Scan.from_qr_bytes("bench", b"CCEBCA5E8566:1")))
    started_cpu, started = time.process_time(), time.perf_counter()
    await asyncio.sleep(seconds)
    cpu = (time.process_time() - started_cpu) / (time.perf_counter() - started)
    task.cancel()
    return cpu * 100, ui.frames - frames


async def main() -> None:
    fonts = Fonts()
    print("display benchmark (CJK font: %s)" % (fonts.path or "none"))
    render_times(fonts)
    display = Display(Options(model="dummy"))
    display.start()
    ui = Ui(display.show, (128, 64), fonts)
    idle, idle_frames = await cpu_while(10.0, ui, animate=False)
    print("  UI idle for 10 s: %.2f%% of one core, %d frames drawn" % (idle, idle_frames))
    ui2 = Ui(display.show, (128, 64), fonts)
    busy, busy_frames = await cpu_while(5.0, ui2, animate=True)
    print("  UI animating (verifying) for 5 s: %.1f%% of one core, %d frames (%.1f/s)"
          % (busy, busy_frames, busy_frames / 5.0))
    display.stop()


if __name__ == "__main__":
    asyncio.run(main())
