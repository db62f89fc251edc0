"""sd_notify: what systemd receives, and that a receiver which stops reading never blocks us."""

from __future__ import annotations

import os
import socket
import time

from agent.sdnotify import Notifier


def test_messages_reach_the_notify_socket(tmp_path):
    path = tmp_path / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))
    receiver.settimeout(2)
    notifier = Notifier(str(path))
    notifier.ready("platform ok; 1/1 sources")
    assert receiver.recv(4096).decode() == "READY=1\nSTATUS=platform ok; 1/1 sources"
    notifier.status("two\nlines")
    assert receiver.recv(4096).decode() == "STATUS=two lines"
    notifier.watchdog()
    assert receiver.recv(4096) == b"WATCHDOG=1"
    notifier.close()
    receiver.close()


def test_abstract_namespace_address():
    name = "scanbox-test-%d" % os.getpid()
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind("\0" + name)
    receiver.settimeout(2)
    Notifier("@" + name).watchdog()
    assert receiver.recv(4096) == b"WATCHDOG=1"
    receiver.close()


def test_a_receiver_that_stops_reading_never_blocks_the_sender(tmp_path):
    path = tmp_path / "notify"
    receiver = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    receiver.bind(str(path))  # bound, never read: its queue fills after ~10 datagrams
    notifier = Notifier(str(path))
    started = time.monotonic()
    for i in range(500):
        notifier.status("scan %d" % i)
    assert time.monotonic() - started < 1.0
    receiver.close()


def test_no_notify_socket_is_a_no_op(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert not notifier.enabled
    notifier.ready("x")  # nothing to send to, nothing raised


def test_watchdog_interval_is_half_the_timeout_and_only_for_our_pid(monkeypatch):
    monkeypatch.setenv("WATCHDOG_USEC", "4000000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier.watchdog_interval() == 2.0
    monkeypatch.setenv("WATCHDOG_PID", "1")
    assert Notifier.watchdog_interval() is None
    monkeypatch.delenv("WATCHDOG_USEC")
    assert Notifier.watchdog_interval() is None
