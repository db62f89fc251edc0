#!/usr/bin/env python3
"""Call a scanbox from Python with nothing but the standard library.

    python3 python_client.py --http http://127.0.0.1:7801 --token TOKEN status
    python3 python_client.py --http http://127.0.0.1:7801 --token TOKEN read_card '{"timeout_s": 60}'
    python3 python_client.py --tcp 192.168.7.2:7800 --token TOKEN read_card

Over HTTP each call is one POST /rpc with the token as a bearer token; over TCP the client
authenticates once (`auth`) and then sends one JSON object per line. Errors come back as
ScanboxError with the box's stable `reason` (TIMEOUT, QR_EXPIRED, UNAUTHORIZED, ...).
"""

from __future__ import annotations

import argparse
import itertools
import json
import socket
import sys
import urllib.error
import urllib.request
from typing import Any


class ScanboxError(Exception):
    def __init__(self, error: dict[str, Any]) -> None:
        super().__init__(error.get("message"))
        self.code = error.get("code")
        self.reason = (error.get("data") or {}).get("reason")
        self.data = error.get("data") or {}


def _result(response: dict[str, Any]) -> Any:
    if "error" in response:
        raise ScanboxError(response["error"])
    return response["result"]


class HttpClient:
    def __init__(self, base_url: str, token: str) -> None:
        self.url = base_url.rstrip("/") + "/rpc"
        self.token = token
        self._ids = itertools.count(1)

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 90) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params or {}},
                          ensure_ascii=False).encode("utf-8")
        request = urllib.request.Request(self.url, data=body, method="POST", headers={
            "Authorization": "Bearer " + self.token, "Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as response:
                return _result(json.loads(response.read()))
        except urllib.error.HTTPError as exc:  # 401, 403, 413, 429 carry a JSON-RPC error too
            return _result(json.loads(exc.read()))


class TcpClient:
    def __init__(self, host: str, port: int, token: str | None, timeout: float = 90) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.lines = self.sock.makefile("rb")
        self._ids = itertools.count(1)
        if token:
            self.call("auth", {"token": token})

    def call(self, method: str, params: dict[str, Any] | None = None) -> Any:
        id_ = next(self._ids)
        message = {"jsonrpc": "2.0", "id": id_, "method": method, "params": params or {}}
        self.sock.sendall(json.dumps(message, ensure_ascii=False).encode("utf-8") + b"\n")
        while True:
            line = self.lines.readline()
            if not line:
                raise ConnectionError("the box closed the connection")
            response = json.loads(line)
            if response.get("id") == id_:  # skip events (notifications) if subscribed
                return _result(response)

    def close(self) -> None:
        self.lines.close()
        self.sock.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--http", help="base URL, e.g. http://127.0.0.1:7801")
    where.add_argument("--tcp", help="HOST:PORT")
    parser.add_argument("--token", required=True)
    parser.add_argument("method")
    parser.add_argument("params", nargs="?", default="{}", help="JSON object")
    args = parser.parse_args(argv)
    params = json.loads(args.params)
    try:
        if args.http:
            result = HttpClient(args.http, args.token).call(args.method, params)
        else:
            host, _, port = args.tcp.rpartition(":")
            client = TcpClient(host.strip("[]"), int(port), args.token)
            try:
                result = client.call(args.method, params)
            finally:
                client.close()
    except ScanboxError as exc:
        print("error %s (%s): %s" % (exc.code, exc.reason, exc), file=sys.stderr)
        return 1
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
