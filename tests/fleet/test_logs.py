"""Structured logs: every record about a scan carries its id, source and kind (its answer the
reason too), as journald fields over the native protocol or as JSON lines; no personal data."""

from __future__ import annotations

import io
import json
import logging
import os
import socket
import struct
from pathlib import Path
from typing import Iterator

import pytest

from agent import logs


@pytest.fixture
def restore_logging(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.delenv("JOURNAL_STREAM", raising=False)
    monkeypatch.delenv("SCANBOX_LOG_FORMAT", raising=False)
    root = logging.getLogger()
    saved_handlers, saved_level = list(root.handlers), root.level
    saved_levels = {name: logging.getLogger(name).level for name in logs.NOISY}
    yield
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    for handler in saved_handlers:
        root.addHandler(handler)
    root.setLevel(saved_level)
    for name, level in saved_levels.items():
        logging.getLogger(name).setLevel(level)


class Journal:
    """journald's side of the native protocol: a datagram socket, each datagram parsed back."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.setblocking(False)

    def records(self) -> list[dict[str, str]]:
        """What has arrived (sends from the loop thread are complete when logging returns)."""
        out = []
        while True:
            try:
                out.append(parse(self.sock.recv(1 << 20)))
            except BlockingIOError:
                return out


def parse(data: bytes) -> dict[str, str]:
    fields = {}
    while data:
        line, sep, rest = data.partition(b"\n")
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            data = rest
        else:  # KEY\n<u64 length><value>\n
            (length,) = struct.unpack("<Q", rest[:8])
            fields[line.decode()] = rest[8:8 + length].decode()
            assert rest[8 + length:9 + length] == b"\n"
            data = rest[9 + length:]
    return fields


async def test_scan_records_reach_the_journal_with_their_fields(box, tmp_path, restore_logging):
    journal = Journal(tmp_path / "journal.sock")
    await box.start()
    logs.setup("info", fmt="journal", journal_socket=str(journal.path))
    resident = box.resident()
    box.scan(resident.static_qr)
    scan = (await box.events.wait("scan"))
    await box.events.wait("verification", lambda d: d["verification"]["ok"])
    records = journal.records()
    mine = [r for r in records if r.get("SCAN_ID") == scan["id"]]
    loggers = {r["LOGGER"] for r in mine}
    assert {"agent.hub", "agent.verifier"} <= loggers, records  # the verifier's record too: the task's context
    for record in mine:
        assert record["SCAN_SOURCE"] == "serial:counter" and record["SCAN_KIND"] == "qr"
        assert record["SYSLOG_IDENTIFIER"] == "scanbox" and record["PRIORITY"] == "6"
    answers = [r for r in mine if "SCAN_REASON" in r]
    assert len(answers) == 1 and answers[0]["SCAN_REASON"] == "OK"
    assert answers[0]["MESSAGE"].startswith("agent.hub: scan %s answered OK in " % scan["id"])
    text = json.dumps(records, ensure_ascii=False)
    for secret in (resident.name, resident.id_card, resident.cellphone, resident.static_qr):
        assert secret not in text
    # records about no scan carry no scan fields
    logging.getLogger("agent.daemon").warning("something else")
    (other,) = journal.records()
    assert "SCAN_ID" not in other and other["PRIORITY"] == "4"


async def test_json_lines_carry_the_same_fields(box, restore_logging, monkeypatch):
    monkeypatch.setenv("SCANBOX_LOG_FORMAT", "json")  # the environment overrides the config's "text"
    await box.start(platform={"timeout_s": 1, "verify_deadline_s": 2})
    stream = io.StringIO()
    logs.setup("info", stream=stream, fmt="text")
    await box.sim.close()
    resident = box.resident()
    box.scan(resident.static_qr)
    scan = await box.events.wait("scan")
    await box.events.wait("verification")
    lines = [json.loads(line) for line in stream.getvalue().splitlines()]
    mine = [line for line in lines if line.get("scan_id") == scan["id"]]
    assert {line["logger"] for line in mine} >= {"agent.hub", "agent.verifier"}
    (answer,) = [line for line in mine if "scan_reason" in line]
    assert answer["scan_reason"] == "PLATFORM_UNAVAILABLE" and answer["level"] == "info"
    assert answer["scan_source"] == "serial:counter" and answer["scan_kind"] == "qr"
    for secret in (resident.name, resident.id_card, resident.static_qr):
        assert secret not in stream.getvalue()


def test_a_traceback_travels_as_one_binary_field_masked(tmp_path, restore_logging):
    journal = Journal(tmp_path / "journal.sock")
    logs.setup("info", fmt="journal", journal_socket=str(journal.path))
    try:
        raise RuntimeError("reader gone for 630102199001011234")
    except RuntimeError:
        logging.getLogger("drivers.serial_scanner").exception("serial:counter failed")
    (record,) = journal.records()
    assert record["PRIORITY"] == "3"
    assert record["MESSAGE"].startswith("drivers.serial_scanner: serial:counter failed\nTraceback")
    assert "630102********1234" in record["MESSAGE"] and "630102199001011234" not in record["MESSAGE"]


def test_a_journal_that_is_gone_sends_records_to_stderr_loudly(tmp_path, restore_logging):
    stream = io.StringIO()
    handler = logs.setup("info", stream=stream, fmt="journal", journal_socket=str(tmp_path / "none.sock"))
    logging.getLogger("agent.daemon").info("ready")
    logging.getLogger("agent.daemon").info("still here")
    out = stream.getvalue().splitlines()
    assert out[0].startswith("<4>agent.logs: the journal socket %s refused a record" % (tmp_path / "none.sock"))
    assert out[1:] == ["<6>agent.daemon: ready", "<6>agent.daemon: still here"]
    assert isinstance(handler, logs.JournalHandler) and handler.failures == 2


def test_auto_takes_the_journal_only_when_stderr_is_journalds_stream(tmp_path, restore_logging, monkeypatch):
    socket_path = tmp_path / "journal.sock"
    Journal(socket_path)
    with open(tmp_path / "stderr", "w") as stream, open(tmp_path / "other", "w") as other:
        st = os.fstat(stream.fileno())
        monkeypatch.setenv("JOURNAL_STREAM", "%d:%d" % (st.st_dev, st.st_ino))
        assert isinstance(logs.setup(stream=stream, journal_socket=str(socket_path)), logs.JournalHandler)
        # a child whose stderr was redirected inherits JOURNAL_STREAM: not the journal
        assert not isinstance(logs.setup(stream=other, journal_socket=str(socket_path)), logs.JournalHandler)
        monkeypatch.delenv("JOURNAL_STREAM")
        assert not isinstance(logs.setup(stream=stream, journal_socket=str(socket_path)), logs.JournalHandler)


def test_an_unknown_format_in_the_environment_is_said_and_text_is_used(restore_logging, monkeypatch, capsys):
    monkeypatch.setenv("SCANBOX_LOG_FORMAT", "xml")
    stream = io.StringIO()
    logs.setup("info", stream=stream)
    logging.getLogger("agent.daemon").info("ready")
    assert "SCANBOX_LOG_FORMAT=xml is none of auto, journal, json, text" in capsys.readouterr().err
    assert stream.getvalue().rstrip().endswith("INFO    agent.daemon: ready")
