"""Logging setup: stderr (journald picks it up), personal data masked by one filter.

STYLE.md item 9: call sites log with %-style arguments; the filter formats the message and
masks anything shaped like an ID number, phone number or credential before any handler sees it.
Identity objects mask themselves in repr(). Libraries that dump whole requests at DEBUG (zeep
logs every SOAP envelope, userPwd included) are held at WARNING whatever the level.
"""

from __future__ import annotations

import logging
import os
import sys

from agent.privacy import mask_text

NOISY = ("zeep", "httpx", "httpcore", "aiohttp.access", "asyncio")


class MaskingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record
            message = "%s %r" % (record.msg, record.args)
        record.msg = mask_text(message)
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = mask_text(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = mask_text(record.exc_text)
        return True


def setup(level: str = "info", stream=None) -> logging.Handler:
    handler = logging.StreamHandler(stream or sys.stderr)
    if os.environ.get("JOURNAL_STREAM"):
        handler.setFormatter(_JournalFormatter("%(name)s: %(message)s"))  # journald adds time and unit
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    handler.addFilter(MaskingFilter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in NOISY:
        logging.getLogger(name).setLevel(max(logging.WARNING, root.level))
    return handler


class _JournalFormatter(logging.Formatter):
    """Prefixes each line with its syslog priority ("<4>"), which journald reads."""

    PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}

    def format(self, record: logging.LogRecord) -> str:
        prefix = "<%d>" % self.PRIORITY.get(record.levelno, 6)
        return "\n".join(prefix + line for line in super().format(record).splitlines())
