"""systemd's notify protocol: READY=1, WATCHDOG=1, STATUS=..., STOPPING=1 on $NOTIFY_SOCKET.

The protocol is one datagram per message; python-systemd would need libsystemd headers to build,
for what is a sendto() on a Unix socket.
"""

from __future__ import annotations

import logging
import os
import socket

logger = logging.getLogger(__name__)


class Notifier:
    def __init__(self, address: str | None = None) -> None:
        self.address = address if address is not None else os.environ.get("NOTIFY_SOCKET", "")
        self._socket: socket.socket | None = None
        if self.address:
            # non-blocking: a receiver that is not reading (its queue holds ~10 datagrams) must
            # cost a dropped status line, never a blocked event loop
            self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK)

    @property
    def enabled(self) -> bool:
        return self._socket is not None

    @staticmethod
    def watchdog_interval() -> float | None:
        """Half the watchdog timeout systemd gave us (WATCHDOG_USEC), or None when off."""
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        if not usec or (pid and pid != str(os.getpid())):
            return None
        try:
            return int(usec) / 1e6 / 2
        except ValueError:
            return None

    def send(self, **fields: str) -> None:
        if self._socket is None:
            return
        address = self.address
        if address.startswith("@"):
            address = "\0" + address[1:]  # abstract namespace
        message = "\n".join("%s=%s" % (k, v.replace("\n", " ")) for k, v in fields.items())
        try:
            self._socket.sendto(message.encode("utf-8"), address)
        except BlockingIOError:
            logger.debug("sd_notify %s dropped: the receiver is not reading", ",".join(fields))
        except OSError as exc:
            logger.debug("sd_notify %s failed: %s", ",".join(fields), exc)

    def ready(self, status: str) -> None:
        self.send(READY="1", STATUS=status)

    def status(self, status: str) -> None:
        self.send(STATUS=status)

    def watchdog(self) -> None:
        self.send(WATCHDOG="1")

    def stopping(self) -> None:
        self.send(STOPPING="1", STATUS="stopping")

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
