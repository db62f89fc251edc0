"""Scan -> verification -> result (DESIGN.md "Data flow").

Classification first (length, charset, shape), so noise never reaches the platform; then the
platform adapter with its deadline. Every outcome is a Result the HIS receives with the scan:
a code the box does not verify is delivered raw with reason QR_UNKNOWN, never dropped.
"""

from __future__ import annotations

import logging
import time

from agent.model import Reason, Result, Scan, ScanboxError, ScanKind, Verification
from agent.platforms.base import Platform, PlatformError, VerifyRequest
from agent.privacy import mask_qr
from agent.qr import Classifier, QrKind

logger = logging.getLogger(__name__)


class Verifier:
    def __init__(self, platform: Platform, classifier: Classifier, default_step: str, default_channel: str) -> None:
        self.platform = platform
        self.classifier = classifier
        self.default_step = default_step
        self.default_channel = default_channel

    async def verify(self, scan: Scan, step: str | None = None, channel: str | None = None) -> Result:
        started = time.monotonic()

        def elapsed() -> float:
            return (time.monotonic() - started) * 1000

        if scan.kind is not ScanKind.QR:
            return Result(scan, None, Verification(False, Reason.NOT_SUPPORTED,
                                                   "no verification for %s scans" % scan.kind.value))
        try:
            kind = self.classifier.classify(scan)
        except ScanboxError as exc:
            logger.info("scan %s from %s: %s", scan.id, scan.source, exc.message)
            return Result(scan, None, Verification.failed(exc, elapsed()))
        if kind is QrKind.UNKNOWN:
            return Result(scan, None, Verification(
                False, Reason.QR_UNKNOWN, "not a health card code this box verifies; delivered raw",
                elapsed_ms=elapsed()))
        request = VerifyRequest(scan.payload, kind, scan.at, step or self.default_step,
                                channel or self.default_channel)
        try:
            answer = await self.platform.verify_qr(request)
        except PlatformError as exc:
            logger.info("scan %s (%s %s): %s", scan.id, kind.value, mask_qr(scan.payload), exc.message)
            return Result(scan, None, Verification.failed(exc, elapsed(), offline=exc.transient))
        except ScanboxError as exc:
            return Result(scan, None, Verification.failed(exc, elapsed()))
        verification = Verification(True, platform_code=answer.platform_code,
                                    platform_message=answer.platform_message, elapsed_ms=elapsed())
        logger.info("scan %s (%s %s) verified: %r in %.1f ms", scan.id, kind.value, mask_qr(scan.payload),
                    answer.identity, verification.elapsed_ms)
        return Result(scan, answer.identity, verification)
