"""Card insert -> identity delivered, per card kind, through the real pcscd and the emulated
cards in vsmartcard's virtual reader (the same stack the tests use; run as root).

The time runs from the emulator connecting to vpcd (the card touching the reader) to the driver
handing the scan to its sink, so it includes pcscd noticing the card (it polls vpcd), the ATR,
every APDU of the read (and the PSAM's authentication), and the decoding. Beside it: the read
alone, from the driver seeing the card to the scan, and the APDUs per read.
"""

from __future__ import annotations

import argparse
import statistics
import threading
import time

import common  # noqa: F401  (puts the repository on sys.path)
from typing_extensions import override

from agent import schema
from agent.simulator import cards as emu
from agent.simulator.pcscd import CARD_READER, PSAM_READER, Pcscd, PcscSlot
from drivers import pcsc
from drivers.base import ScanSink

KINDS = {
    "ssc v2 (no authentication)": lambda: emu.ssc("2.00"),
    "ssc v3 + PSAM": lambda: emu.ssc("3.00"),
    "health card + PSAM": lambda: emu.health_card(),
    "ssc v3, no PSAM (PSAM_REQUIRED)": lambda: emu.ssc("3.00"),
}


class Sink(ScanSink):
    def __init__(self) -> None:
        self.arrived = threading.Event()
        self.at = 0.0
        self.last = None

    @override
    def scan(self, scan) -> None:
        self.at = time.monotonic()
        self.last = scan
        self.arrived.set()

    @override
    def connected(self, source, connected, detail=None) -> None:
        pass

    @override
    def problem(self, source, text) -> None:
        print("problem:", text)

    @override
    def failed(self, source: str, exc: BaseException) -> None:
        print("driver failed:", repr(exc))


def run(kind: str, make, n: int, card_slot: PcscSlot, psam: bool) -> None:
    driver = pcsc.create("bench", schema.convert({
        "driver": "pcsc", "reader": "^%s$" % CARD_READER, "poll_s": 1.0,
        **({"psam_reader": "^%s$" % PSAM_READER} if psam else {})}, pcsc.Options))
    sink = Sink()
    driver.start(sink)
    totals, reads, apdus = [], [], []
    try:
        for _ in range(n):
            sink.arrived.clear()
            card = make()
            started = time.monotonic()
            card_slot.insert(card)
            if not sink.arrived.wait(10):
                raise SystemExit("%s: no scan within 10 s" % kind)
            totals.append((sink.at - started) * 1000)
            reads.append(driver.last_read_ms or 0.0)
            apdus.append(card.apdus)
            card_slot.remove()
    finally:
        driver.stop()
    print("%-34s n=%-3d insert->identity p50 %6.1f ms  max %6.1f ms | read alone p50 %5.1f ms | %d APDUs"
          % (kind, n, statistics.median(totals), max(totals), statistics.median(reads), statistics.median(apdus)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("-n", type=int, default=20, help="cards per kind")
    args = parser.parse_args()
    daemon = Pcscd()
    daemon.ensure()
    card_slot = PcscSlot(emu.VPCD_PORT, CARD_READER)
    psam_slot = PcscSlot(emu.VPCD_PORT + 1, PSAM_READER)
    psam_slot.insert(emu.psam())
    try:
        for kind, make in KINDS.items():
            run(kind, make, args.n, card_slot, psam="no PSAM" not in kind)
    finally:
        card_slot.remove()
        psam_slot.remove()
        daemon.stop()


if __name__ == "__main__":
    main()
