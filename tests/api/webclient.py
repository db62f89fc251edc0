"""Clients for the HTTP and WebSocket API in tests (aiohttp's client, a real HTTP stack)."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import aiohttp

HTTP_API = {"http": "127.0.0.1:0", "cors_origins": ["http://his.example:8080"]}


def base_url(box: Any) -> str:
    host, port = box.daemon.http.address
    return "%s://%s:%d" % ("https" if box.daemon.http.tls else "http", host, port)


async def post_rpc(session: aiohttp.ClientSession, box: Any, body: Any, token: str | None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
    send = dict(headers or {})
    if token is not None:
        send["Authorization"] = "Bearer %s" % token
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with session.post(base_url(box) + "/rpc", data=data, headers=send) as response:
        text = await response.read()
        return response.status, json.loads(text) if text else None


class WsClient:
    """JSON-RPC over a WebSocket; notifications apart from responses, as RpcClient does."""

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws
        self.notifications: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.unsolicited: asyncio.Queue[Any] = asyncio.Queue()
        self._pending: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self._next = 0
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def _read(self) -> None:
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            message = json.loads(msg.data)
            if isinstance(message, dict) and message.get("method") == "event":
                await self.notifications.put(message["params"])
            elif isinstance(message, dict) and message.get("id") in self._pending:
                self._pending.pop(message["id"]).set_result(message)
            else:
                await self.unsolicited.put(message)
        await self.unsolicited.put({"closed": True, "code": self.ws.close_code})

    async def request(self, method: str, params: Any = None, timeout: float = 10) -> dict[str, Any]:
        self._next += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._pending[self._next] = fut
        message: dict[str, Any] = {"jsonrpc": "2.0", "id": self._next, "method": method}
        if params is not None:
            message["params"] = params
        await self.ws.send_str(json.dumps(message, ensure_ascii=False))
        async with asyncio.timeout(timeout):
            return await fut

    async def call(self, method: str, params: Any = None, timeout: float = 10) -> Any:
        response = await self.request(method, params, timeout)
        assert "result" in response, response
        return response["result"]

    async def next_unsolicited(self, timeout: float = 5) -> Any:
        async with asyncio.timeout(timeout):
            return await self.unsolicited.get()

    async def close(self) -> None:
        await self.ws.close()
        self._task.cancel()


async def open_ws(session: aiohttp.ClientSession, box: Any, token: str | None = None,
                  headers: dict[str, str] | None = None) -> WsClient:
    ws = await session.ws_connect(base_url(box) + "/ws", headers=headers or {}, max_msg_size=1 << 22)
    client = WsClient(ws)
    if token is not None:
        await client.call("auth", {"token": token})
    return client
