"""The floor scanbox is measured against: a minimal daemon doing the same work with the same
libraries and nothing else (issue 17).

asyncio, aiohttp, lxml and sqlite3 (WAL, synchronous=FULL): it reads scans from the serial
scanner's pty, posts RHC_E0003 (spec 000 3.3) as a SOAP body filled in from a template to the
same RHC simulator, parses the reply (the SOAP envelope, then the `<response>` document), writes
the identity to an sqlite cache when the code is not in it yet, and answers JSON-RPC `read_card`
and `status` on a Unix socket. It sends READY=1 to NOTIFY_SOCKET once it listens and the scanner
is open. No config validation, no logging, no hub, no display: what is left is what any daemon
doing this job pays.

The template is made once, by the benchmark and not by the floor (so the floor imports none of
scanbox), from scanbox's own `RhcPlatform.build_action` and `rhc.build_xml`, with placeholder
values that pass the spec's checks; the floor replaces them with each scan's (escaped twice: the
action and message documents travel as text inside the envelope).

`floor_drain` is the outbox's floor: records in sqlite, uploaded with N requests in flight, each
marked sent durably (the marks that arrive together share a commit) before its worker goes on.

    .venv/bin/python bench/bench_floor.py daemon CONFIG.json   (what the benchmarks start)
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import socket
import sqlite3
import sys
import termios
import time
import tty
import uuid
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape

import aiohttp
from lxml import etree

SOAP_ENV = "http://schemas.xmlsoap.org/soap/envelope/"
# placeholders that pass rhc_schema's checks, replaced in the template by each request's values
GUID = "f100f100f100f100f100f100f100f100"
CREATED = "1999-09-09 09:09:09"
QR = "FLOORQRPLACEHOLDER"
USED = "1998-08-08 08:08:08"
PARSER = etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False)
IDENTITY = ("name", "sex", "nation", "birthday", "id_type", "id_number", "id_card", "ecardId", "main_index",
            "cellphone", "telephone", "address", "ehc_card_status")


# --- made by the benchmark, once --------------------------------------------------------------

def make_template(platform: Any) -> str:
    """The SOAP request for RHC_E0003 as scanbox builds it, with placeholders (see above)."""
    from datetime import datetime

    from agent.platforms.rhc import build_xml
    from agent.platforms.rhc_schema import OPERATIONS
    from agent.simulator.soap import DEFAULT_NAMESPACE

    action = platform.build_action("RHC_E0003", GUID, datetime.strptime(CREATED, "%Y-%m-%d %H:%M:%S"))
    values = {k: v for k, v in {
        "qr_code": QR, "time": USED, "sam": platform.site.sam, "use_citycode": platform.site.city_code,
        "use_cityname": platform.site.city_name, "hospital_code": platform.site.hospital_code,
        "hospital_name": platform.site.hospital_name, "channel_code": "01", "channel_name": "HIS",
        "medstep_code": "010101", "medstep_name": "挂号"}.items() if v}
    message = build_xml(OPERATIONS["RHC_E0003"].request, values)
    env = etree.Element("{%s}Envelope" % SOAP_ENV, nsmap={"soapenv": SOAP_ENV})
    body = etree.SubElement(env, "{%s}Body" % SOAP_ENV)
    call = etree.SubElement(body, "{%s}RHCMessageServer" % DEFAULT_NAMESPACE, nsmap={"ns0": DEFAULT_NAMESPACE})
    etree.SubElement(call, "action").text = action
    etree.SubElement(call, "message").text = message
    return etree.tostring(env, encoding="unicode")


def write_config(path: Path, *, template: str, endpoint: str, tty_path: str, api: str, db: str) -> None:
    path.write_text(json.dumps({"template": template, "endpoint": endpoint, "tty": tty_path, "api": api,
                                "db": db}), encoding="utf-8")


def command(config: Path) -> list[str]:
    # imported, not run as a script: its bytecode is used as scanbox's is (compile_like_an_install)
    here = str(Path(__file__).resolve().parent)
    return [sys.executable, "-c", "import sys; sys.path.insert(0, %r); import bench_floor; bench_floor.main()" % here,
            "daemon", str(config)]


# --- the floor's work -------------------------------------------------------------------------

def body_for(template: str, qr: str, used: str, guid: str | None = None, created: str | None = None) -> bytes:
    def twice(value: str) -> str:
        return escape(escape(value))
    return (template.replace(GUID, guid or uuid.uuid4().hex)
            .replace(CREATED, created or time.strftime("%Y-%m-%d %H:%M:%S"))
            .replace(QR, twice(qr)).replace(USED, twice(used)).encode("utf-8"))


def parse_reply(content: bytes) -> tuple[bool, str | None, dict[str, str]]:
    """(ok, resultCode, fields) from the SOAP reply; ValueError when it is not one."""
    root = etree.fromstring(content, PARSER)
    body = root.find("{%s}Body" % SOAP_ENV)
    if body is None or not len(body) or not len(body[0]):
        raise ValueError("not a SOAP reply")
    response = etree.fromstring(body[0][0].text.encode("utf-8"), PARSER)
    data = {}
    for element in response.iter():
        if not len(element) and isinstance(element.tag, str):
            data[element.tag] = (element.text or "").strip()
    return data.get("result") == "success", data.get("resultCode"), data


def open_db(path: str) -> sqlite3.Connection:
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode = WAL")
    conn.execute("PRAGMA synchronous = FULL")
    conn.execute("CREATE TABLE IF NOT EXISTS cache (key TEXT PRIMARY KEY, identity TEXT, at REAL)")
    conn.execute("CREATE TABLE IF NOT EXISTS outbox (id INTEGER PRIMARY KEY, guid TEXT, qr TEXT, used TEXT,"
                 " state TEXT NOT NULL DEFAULT 'pending', code TEXT)")
    return conn


class Floor:
    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.template = config["template"]
        self.db = open_db(config["db"])
        self.waiting: list[tuple[asyncio.StreamWriter, Any]] = []
        self.scans = 0
        self.session: aiohttp.ClientSession | None = None
        self.buffer = b""

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.session = aiohttp.ClientSession()
        fd = os.open(self.config["tty"], os.O_RDWR | os.O_NOCTTY | os.O_NONBLOCK)
        tty.setraw(fd)
        termios.tcflush(fd, termios.TCIFLUSH)
        loop.add_reader(fd, self.readable, fd)
        server = await asyncio.start_unix_server(self.client, self.config["api"])
        notify = os.environ.get("NOTIFY_SOCKET")
        if notify:
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
                s.sendto(b"READY=1", notify)
        async with server:
            await server.serve_forever()

    def readable(self, fd: int) -> None:
        try:
            self.buffer += os.read(fd, 4096)
        except BlockingIOError:
            return
        while b"\r" in self.buffer:
            line, _, self.buffer = self.buffer.partition(b"\r")
            if line.strip():
                asyncio.get_running_loop().create_task(self.scan(line.decode("ascii", "replace").strip()))

    async def scan(self, qr: str) -> None:
        self.scans += 1
        at = time.strftime("%Y-%m-%d %H:%M:%S")
        assert self.session is not None, "run() opens the session first"
        try:
            async with self.session.post(self.config["endpoint"], data=body_for(self.template, qr, at),
                                         headers={"Content-Type": "text/xml; charset=utf-8",
                                                  "SOAPAction": '""'}) as response:
                ok, code, data = parse_reply(await response.read())
            identity = {k: data[k] for k in IDENTITY if data.get(k)}
            if ok:
                key = hashlib.sha256(qr.encode()).hexdigest()
                if self.db.execute("SELECT 1 FROM cache WHERE key = ?", (key,)).fetchone() is None:
                    self.db.execute("INSERT INTO cache VALUES (?, ?, ?)", (key, json.dumps(identity), time.time()))
            result = {"scan": {"kind": "qr", "at": at}, "verification": {"ok": ok, "code": code,
                                                                        "identity": identity}}
        except (aiohttp.ClientError, ValueError, etree.XMLSyntaxError) as exc:
            result = {"scan": {"kind": "qr", "at": at}, "verification": {"ok": False, "message": str(exc)}}
        waiting, self.waiting = self.waiting, []
        for writer, request_id in waiting:
            writer.write(json.dumps({"jsonrpc": "2.0", "id": request_id, "result": result}).encode() + b"\n")

    async def client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while line := await reader.readline():
                request = json.loads(line)
                if request["method"] == "read_card":
                    self.waiting.append((writer, request["id"]))
                    continue
                result = {"ready": True, "scans": self.scans, "sources": [{"name": "counter", "connected": True}]}
                writer.write(json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": result}).encode() + b"\n")
        except ConnectionError:
            pass  # the client went away
        finally:
            writer.close()


# --- the outbox floor -------------------------------------------------------------------------

def fill_outbox(path: str, rows: list[tuple[str, str]]) -> None:
    """Pending records (qr, time of use), committed before the drain is timed."""
    conn = open_db(path)
    conn.execute("BEGIN")
    conn.executemany("INSERT INTO outbox (guid, qr, used) VALUES (?, ?, ?)",
                     [(uuid.uuid4().hex, qr, used) for qr, used in rows])
    conn.execute("COMMIT")
    conn.close()


async def floor_drain(path: str, endpoint: str, template: str, in_flight: int) -> int:
    """Upload every pending record with `in_flight` requests at once; each is marked sent (or
    refused) durably before its worker takes the next: the marks that arrive together share one
    commit (synchronous=FULL), as any outbox with several uploads in flight would do. The number
    uploaded."""
    conn = open_db(path)
    created = time.strftime("%Y-%m-%d %H:%M:%S")
    done = 0
    pending: collections.deque[tuple[int, str, str, str]] = collections.deque()
    marks: list[tuple[str, str | None, int]] = []
    committed: asyncio.Future[None] | None = None
    last = 0
    loop = asyncio.get_running_loop()

    def commit() -> None:
        nonlocal committed
        batch, future = marks[:], committed
        marks.clear()
        committed = None
        conn.execute("BEGIN")
        conn.executemany("UPDATE outbox SET state = ?, code = ? WHERE id = ?", batch)
        conn.execute("COMMIT")
        assert future is not None, "a commit is scheduled only with its future"
        future.set_result(None)

    async with aiohttp.ClientSession() as session:
        async def worker() -> None:
            nonlocal done, last, committed
            while True:
                if not pending:  # sqlite runs in the loop's thread: nothing interleaves here
                    batch = conn.execute("SELECT id, guid, qr, used FROM outbox WHERE state = 'pending' AND id > ?"
                                         " ORDER BY id LIMIT 64", (last,)).fetchall()
                    if not batch:
                        return
                    pending.extend(batch)
                    last = batch[-1][0]
                record_id, guid, qr, used = pending.popleft()
                async with session.post(endpoint, data=body_for(template, qr, used, guid, created),
                                        headers={"Content-Type": "text/xml; charset=utf-8",
                                                 "SOAPAction": '""'}) as response:
                    ok, code, _ = parse_reply(await response.read())
                marks.append(("sent" if ok else "dead", code, record_id))
                if committed is None:
                    committed = loop.create_future()
                    loop.call_soon(commit)
                await asyncio.shield(committed)
                done += 1

        await asyncio.gather(*(worker() for _ in range(in_flight)))
    conn.close()
    return done


def main() -> None:
    if len(sys.argv) != 3 or sys.argv[1] != "daemon":
        sys.exit(__doc__)
    asyncio.run(Floor(json.loads(Path(sys.argv[2]).read_text(encoding="utf-8"))).run())


if __name__ == "__main__":
    main()
