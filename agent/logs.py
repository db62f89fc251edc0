"""Logging setup: personal data masked by one filter; records to journald or stderr.

STYLE.md item 9: call sites log with %-style arguments; the filter formats the message and
masks anything shaped like an ID number, phone number or credential before any handler sees it.
Identity objects mask themselves in repr(). Libraries that dump whole requests at DEBUG (zeep
logs every SOAP envelope, userPwd included) are held at WARNING whatever the level.

Records about a scan carry its id, source and kind (and, on the record of its answer, the
reason) as fields a collector can filter on (docs/fleet.md): `bind_scan()` puts the scan in the
context of the task handling it, so every record that task and the tasks it starts log carries
them, the platform adapter's included. The fields reach a collector in one of three forms
(`device.log_format`, or the environment's SCANBOX_LOG_FORMAT):

- "journal": journald's native protocol (one datagram a record to
  /run/systemd/journal/socket, https://systemd.io/JOURNAL_NATIVE_PROTOCOL/): MESSAGE, PRIORITY,
  SCAN_ID, SCAN_SOURCE, SCAN_KIND, SCAN_REASON, CODE_FILE, ... A dozen lines of socket code
  instead of python-systemd, which has no wheels and needs libsystemd's headers to build.
- "json": one JSON object a line on stderr, for any other collector (Vector, Fluent Bit,
  promtail): the same fields in lower case.
- "text": human lines on stderr; under journald each line starts with its syslog priority.
"auto" (the default) is "journal" when stderr is journald's stream (JOURNAL_STREAM names it),
else "text". A journal that stops taking datagrams falls back to stderr, loudly, record by record.
"""

from __future__ import annotations

import contextvars
import errno
import json
import logging
import os
import socket
import struct
import sys
import threading
from datetime import datetime
from typing import IO, Any

from agent.privacy import escape_controls, mask_text

NOISY = ("zeep", "httpx", "httpcore", "aiohttp.access", "asyncio")
FORMATS = ("auto", "journal", "json", "text")
JOURNAL_SOCKET = "/run/systemd/journal/socket"
IDENTIFIER = "scanbox"
PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}
# a datagram journald takes whole on any box (its limit is larger; a traceback rarely comes close)
MAX_MESSAGE = 48 * 1024

# the scan the current task is handling: {"scan_id": ..., "scan_source": ..., "scan_kind": ...}
_scan: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar("scanbox_scan", default=None)


def bind_scan(scan_id: str, source: str, kind: str) -> contextvars.Token[dict[str, str] | None]:
    """Records logged from here on in this task (and tasks it starts) carry the scan's fields."""
    return _scan.set({"scan_id": scan_id, "scan_source": source, "scan_kind": kind})


def unbind_scan(token: contextvars.Token[dict[str, str] | None]) -> None:
    _scan.reset(token)


def scan_fields(record: logging.LogRecord) -> dict[str, str]:
    """The scan fields of a record (lower case): from the task's context, or `extra`."""
    fields = dict(getattr(record, "scan", None) or {})
    reason = getattr(record, "scan_reason", None)
    if reason:
        fields["scan_reason"] = str(reason)
    return fields


class MaskingFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the record
            message = "%s %r" % (record.msg, record.args)
        # control characters (a scanned code's, an exception's text) escaped: one record is
        # one line, and nothing in it can drive a terminal or forge a journald entry
        record.msg = escape_controls(mask_text(message))
        record.args = None
        if record.exc_info and not record.exc_text:
            record.exc_text = _traceback(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = _traceback(record.exc_text)
        if not hasattr(record, "scan"):
            # the record is made in the logging task: its context is the scan's
            record.scan = _scan.get()
        return True


def _traceback(text: str) -> str:
    """A traceback keeps its lines; anything else that controls a terminal is escaped."""
    return "\n".join(escape_controls(line) for line in mask_text(text).split("\n"))


def setup(level: str = "info", stream: IO[str] | None = None, fmt: str = "auto",
          journal_socket: str = JOURNAL_SOCKET) -> logging.Handler:
    fmt = os.environ.get("SCANBOX_LOG_FORMAT", "").strip().lower() or fmt
    if fmt not in FORMATS:
        print("scanbox: SCANBOX_LOG_FORMAT=%s is none of %s; logging text" % (fmt, ", ".join(FORMATS)),
              file=sys.stderr)
        fmt = "text"
    out = stream or sys.stderr
    if fmt == "auto":
        fmt = "journal" if _stream_is_journal(out) and os.path.exists(journal_socket) else "text"
    handler: logging.Handler
    if fmt == "journal":
        handler = JournalHandler(journal_socket, fallback=out)
    else:
        handler = logging.StreamHandler(out)
        if fmt == "json":
            handler.setFormatter(JsonFormatter())
        elif os.environ.get("JOURNAL_STREAM"):
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


def _stream_is_journal(stream: IO[str]) -> bool:
    """systemd.exec(5): JOURNAL_STREAM is "device:inode" of the stream stderr was connected to;
    a child whose stderr went elsewhere (a pipe, a file) must not take it for the journal."""
    value = os.environ.get("JOURNAL_STREAM", "")
    try:
        device, inode = (int(x) for x in value.split(":"))
        st = os.fstat(stream.fileno())
    except (ValueError, OSError, AttributeError):
        return False
    return (st.st_dev, st.st_ino) == (device, inode)


class _JournalFormatter(logging.Formatter):
    """Prefixes each line with its syslog priority ("<4>"), which journald reads."""

    def format(self, record: logging.LogRecord) -> str:
        prefix = "<%d>" % PRIORITY.get(record.levelno, 6)
        return "\n".join(prefix + line for line in super().format(record).splitlines())


class JsonFormatter(logging.Formatter):
    """One JSON object a line: time, level, logger, message, scan fields, exception."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created).astimezone().isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        out.update(scan_fields(record))
        if record.exc_text:
            out["exception"] = record.exc_text
        return json.dumps(out, ensure_ascii=False)


class JournalHandler(logging.Handler):
    """journald's native protocol over its datagram socket."""

    def __init__(self, path: str = JOURNAL_SOCKET, fallback: IO[str] | None = None) -> None:
        super().__init__()
        self.path = path
        self.fallback = fallback or sys.stderr
        self.failures = 0
        self._sock: socket.socket | None = None
        self._sock_lock = threading.Lock()
        self._text = _JournalFormatter("%(name)s: %(message)s")

    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        message = record.getMessage()
        if record.exc_text:
            message = "%s\n%s" % (message, record.exc_text)
        if len(message) > MAX_MESSAGE:
            message = message[:MAX_MESSAGE] + "… (%d characters cut)" % (len(message) - MAX_MESSAGE)
        fields = {
            "MESSAGE": "%s: %s" % (record.name, message),
            "PRIORITY": str(PRIORITY.get(record.levelno, 6)),
            "SYSLOG_IDENTIFIER": IDENTIFIER,
            "LOGGER": record.name,
            "CODE_FILE": record.pathname,
            "CODE_LINE": str(record.lineno),
            "CODE_FUNC": record.funcName,
            "THREAD_NAME": record.threadName or "",
        }
        fields.update({k.upper(): v for k, v in scan_fields(record).items()})
        return fields

    def emit(self, record: logging.LogRecord) -> None:
        try:
            datagram = encode(self.fields(record))
            with self._sock_lock:
                if self._sock is None:
                    self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
                self._sock.sendto(datagram, self.path)
        except OSError as exc:
            # journald restarting, or gone: the record still goes somewhere a person can read
            self.failures += 1
            try:
                if self.failures == 1 or self.failures % 1000 == 0:
                    self.fallback.write("<4>agent.logs: the journal socket %s refused a record (%s; %d so far); "
                                        "logging to stderr\n" % (self.path, errno.errorcode.get(exc.errno or 0, exc),
                                                                 self.failures))
                self.fallback.write(self._text.format(record) + "\n")
                self.fallback.flush()
            except Exception:
                self.handleError(record)
        except Exception:
            self.handleError(record)

    def close(self) -> None:
        with self._sock_lock:
            if self._sock is not None:
                self._sock.close()
                self._sock = None
        super().close()


def encode(fields: dict[str, str]) -> bytes:
    """The native protocol: KEY=value lines; a value with a newline as KEY, newline, its length
    (64-bit little endian), the value, newline."""
    out = bytearray()
    for key, value in fields.items():
        data = value.encode("utf-8", errors="replace")
        if b"\n" in data:
            out += key.encode("ascii") + b"\n" + struct.pack("<Q", len(data)) + data + b"\n"
        else:
            out += key.encode("ascii") + b"=" + data + b"\n"
    return bytes(out)
