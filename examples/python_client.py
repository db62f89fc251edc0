#!/usr/bin/env python3
"""Call a scanbox from Python with nothing but the standard library.

    python3 python_client.py --http http://127.0.0.1:7801 --token TOKEN status
    python3 python_client.py --http https://10.1.2.3:7801 --fingerprint AB:CD:... --token TOKEN read_card
    python3 python_client.py --tcp 10.1.2.3:7800 --fingerprint AB:CD:... --token TOKEN read_card

Over HTTP each call is one POST /rpc with the token as a bearer token; over TCP the client
authenticates once (`auth`) and then sends one JSON object per line. Errors come back as
ScanboxError with the box's stable `reason` (TIMEOUT, QR_EXPIRED, UNAUTHORIZED, ...).

Beyond loopback and the USB cable the box speaks TLS with a certificate of its own: pin its
SHA-256 fingerprint (`scanbox tls show` on the box, `scanbox doctor`, the box's screen at start,
`status`). The fingerprint is checked before the token is sent; a box whose certificate has
another fingerprint gets nothing. Without --fingerprint, https:// verifies against the system's
CAs (a site that gave the box a certificate from its own CA).
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import http.client
import itertools
import json
import socket
import ssl
import sys
import urllib.parse
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


def tls_context(fingerprint: str | None) -> ssl.SSLContext:
    """With a pinned fingerprint: no CA (the box signed its own certificate), the fingerprint is
    compared after the handshake by `check_fingerprint`. Without one: the system's CAs."""
    if fingerprint is None:
        return ssl.create_default_context()
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    return context


def check_fingerprint(sock: ssl.SSLSocket, fingerprint: str) -> None:
    """The peer's certificate must be the pinned one; checked before anything is sent."""
    der = sock.getpeercert(binary_form=True) or b""
    seen = hashlib.sha256(der).hexdigest()
    wanted = fingerprint.replace(":", "").replace(" ", "").lower()
    if not hmac.compare_digest(seen, wanted):
        sock.close()
        raise ssl.SSLError("the box's certificate is not the pinned one (its SHA-256 is %s)"
                           % ":".join(seen[i:i + 2] for i in range(0, 64, 2)).upper())


class HttpClient:
    def __init__(self, base_url: str, token: str, fingerprint: str | None = None) -> None:
        url = urllib.parse.urlsplit(base_url)
        if url.scheme not in ("http", "https"):
            raise ValueError("%s: an http:// or https:// URL" % base_url)
        self.url = url
        self.path = url.path.rstrip("/") + "/rpc"
        self.token = token
        self.fingerprint = fingerprint
        self._ids = itertools.count(1)

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        if self.url.scheme == "http":
            return http.client.HTTPConnection(self.url.hostname, self.url.port or 80, timeout=timeout)
        conn = http.client.HTTPSConnection(self.url.hostname, self.url.port or 443, timeout=timeout,
                                           context=tls_context(self.fingerprint))
        conn.connect()
        if self.fingerprint is not None:
            check_fingerprint(conn.sock, self.fingerprint)
        return conn

    def call(self, method: str, params: dict[str, Any] | None = None, timeout: float = 90) -> Any:
        body = json.dumps({"jsonrpc": "2.0", "id": next(self._ids), "method": method, "params": params or {}},
                          ensure_ascii=False).encode("utf-8")
        conn = self._connect(timeout)
        try:
            conn.request("POST", self.path, body=body, headers={
                "Authorization": "Bearer " + self.token, "Content-Type": "application/json"})
            # 401, 403, 413, 429 carry a JSON-RPC error too
            return _result(json.loads(conn.getresponse().read()))
        finally:
            conn.close()


class TcpClient:
    def __init__(self, host: str, port: int, token: str | None, timeout: float = 90,
                 fingerprint: str | None = None, tls: bool | None = None) -> None:
        """`tls`: None speaks TLS when a fingerprint is given; True with the system's CAs."""
        sock = socket.create_connection((host, port), timeout=timeout)
        if tls or (tls is None and fingerprint is not None):
            sock = tls_context(fingerprint).wrap_socket(sock, server_hostname=host)
            if fingerprint is not None:
                check_fingerprint(sock, fingerprint)
        self.sock = sock
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
    parser.add_argument("--fingerprint", help="the box's certificate SHA-256 (AB:CD:...): TLS, pinned")
    parser.add_argument("method")
    parser.add_argument("params", nargs="?", default="{}", help="JSON object")
    args = parser.parse_args(argv)
    params = json.loads(args.params)
    try:
        if args.http:
            result = HttpClient(args.http, args.token, args.fingerprint).call(args.method, params)
        else:
            host, _, port = args.tcp.rpartition(":")
            client = TcpClient(host.strip("[]"), int(port), args.token, fingerprint=args.fingerprint)
            try:
                result = client.call(args.method, params)
            finally:
                client.close()
    except ScanboxError as exc:
        print("error %s (%s): %s" % (exc.code, exc.reason, exc), file=sys.stderr)
        return 1
    except (OSError, ssl.SSLError) as exc:
        print("cannot talk to the box: %s" % exc, file=sys.stderr)
        return 1
    print(json.dumps(result, ensure_ascii=False, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
