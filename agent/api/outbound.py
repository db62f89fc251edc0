"""The sending half of an API connection, the same for every transport (Unix/TCP lines, WebSocket
frames): one sender task and a bounded queue. A client that stops reading is dropped, not
buffered without end; a send that stalls for SEND_TIMEOUT_S ends the connection. Requests are
answered concurrently, at most MAX_IN_FLIGHT per connection (more wait: backpressure).

A message to a connection with nothing queued, nothing being sent and an empty transport
buffer is written at once (when the transport can: `_write_now`), without waking the sender
task: that hop was a loop turn and a timer per answer. Order is kept: anything else queues."""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
from typing import Any

from agent.api.jsonrpc import Dispatcher, Session, encode

logger = logging.getLogger(__name__)

MAX_IN_FLIGHT = 8  # requests per connection being answered at once
OUTGOING_QUEUE = 256  # messages waiting to be sent to one client
SEND_TIMEOUT_S = 10.0


class Outbound(abc.ABC):
    def __init__(self, label: str) -> None:
        self.label = label
        self.queue: asyncio.Queue[bytes | None] = asyncio.Queue(OUTGOING_QUEUE)
        self.closed = False
        self._sending = False  # the sender task is writing a message it took from the queue

    @abc.abstractmethod
    async def _write(self, data: bytes) -> None:
        """Send one message (the transport's framing is the subclass's)."""

    def _write_now(self, data: bytes) -> bool:
        """Send one message without waiting, if the transport takes it whole at once; False
        when it must go through the queue (the default). Called only when nothing is queued or
        being sent."""
        return False

    @abc.abstractmethod
    def _drop(self) -> None:
        """Cut the connection now: the client is not reading, or cannot be written to."""

    @abc.abstractmethod
    async def _close(self) -> None:
        """Close the connection once everything queued has been sent."""

    def send(self, data: bytes) -> None:
        if self.closed:
            return
        if not self._sending and self.queue.empty():
            try:
                if self._write_now(data):
                    return
            except (ConnectionError, OSError, RuntimeError):
                self.closed = True
                self._drop()
                return
        try:
            self.queue.put_nowait(data)
        except asyncio.QueueFull:
            logger.warning("api: %s is not reading its messages; disconnecting it", self.label)
            self.closed = True
            self._drop()

    def notify(self, message: dict[str, Any]) -> None:
        self.send(encode(message))

    async def send_loop(self) -> None:
        try:
            while True:
                data = await self.queue.get()
                if data is None:
                    break
                self._sending = True
                async with asyncio.timeout(SEND_TIMEOUT_S):
                    await self._write(data)
                self._sending = False
        except (TimeoutError, ConnectionError, OSError, RuntimeError):
            self.closed = True
            self._drop()

    async def finish(self, sender: asyncio.Task[None]) -> None:
        """Send what is queued (for at most SEND_TIMEOUT_S), then close."""
        self.closed = True
        with contextlib.suppress(asyncio.QueueFull):
            self.queue.put_nowait(None)
        try:
            async with asyncio.timeout(SEND_TIMEOUT_S):
                await sender
        except TimeoutError:
            sender.cancel()
        with contextlib.suppress(Exception):
            await self._close()


async def answer(dispatcher: Dispatcher, session: Session, conn: Outbound, data: bytes,
                 slots: asyncio.Semaphore) -> None:
    """One request's answer onto its connection; frees its slot however it ends."""
    try:
        response = await dispatcher.handle_bytes(session, data)
        if response is not None:
            conn.send(response)
    finally:
        slots.release()
