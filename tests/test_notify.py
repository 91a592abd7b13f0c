"""sd_notify (lib/kiln/notify.py) against datagram sockets the test binds: messages, abstract names, the watchdog
greenlet and its PID rule, an unreachable socket. The proxy's own messages are checked in test_e2e_systemd.py."""
import logging
import os
import socket

import gevent
import pytest

from kiln import notify


@pytest.fixture
def listener(tmp_path):
    """A bound AF_UNIX datagram socket: (path, recv() -> [lines] or None after timeout)."""
    path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(10)

    def recv(timeout=10):
        sock.settimeout(timeout)
        try:
            return sock.recv(4096).decode().split("\n")
        except socket.timeout:
            return None

    yield path, recv
    sock.close()


def test_without_notify_socket_everything_is_a_no_op():
    n = notify.Notifier.from_environ({}, pid=1)
    assert not n.enabled
    assert n.ready("serving 0 sessions") is False and n.stopping("x") is False and n.reloading() is False
    n.start(lambda: "x")
    assert n._greenlets == []
    n.stop()
    n.close()


def test_lifecycle_messages(listener):
    path, recv = listener
    n = notify.Notifier.from_environ({"NOTIFY_SOCKET": path}, pid=1)
    n._clock_usec = lambda: 123456789
    try:
        assert n.status("starting")
        assert recv() == ["STATUS=starting"]
        assert n.ready("serving 0 sessions")
        assert recv() == ["READY=1", "STATUS=serving 0 sessions"]
        assert n.reloading()
        assert recv() == ["RELOADING=1", "MONOTONIC_USEC=123456789", "STATUS=reloading"]
        assert n.stopping("draining 2 sessions")
        assert recv() == ["STOPPING=1", "STATUS=draining 2 sessions"]
    finally:
        n.close()


def test_monotonic_usec_is_clock_monotonic():
    import time
    n = notify.Notifier("/nonexistent")
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    got = n._clock_usec()
    assert before <= got <= before + 5_000_000


def test_abstract_socket_names():
    name = "kiln-test-%d" % os.getpid()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind("\0" + name)
    sock.settimeout(10)
    n = notify.Notifier.from_environ({"NOTIFY_SOCKET": "@" + name}, pid=1)
    try:
        assert n.ready("serving 0 sessions")
        assert sock.recv(4096) == b"READY=1\nSTATUS=serving 0 sessions"
    finally:
        n.close()
        sock.close()


@pytest.mark.parametrize("value", ["/nonexistent/notify.sock", "relative/path", "vsock:2:1234"])
def test_unreachable_socket_warns_once_and_carries_on(value, caplog):
    n = notify.Notifier.from_environ({"NOTIFY_SOCKET": value}, pid=1)
    with caplog.at_level(logging.WARNING, logger="kiln.notify"):
        assert n.status("starting") is False
        assert n.ready("serving") is False
        assert n.stopping("draining") is False
    warnings = [r for r in caplog.records if r.name == "kiln.notify"]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
    assert "NOTIFY_SOCKET=%s" % value in warnings[0].getMessage()
    assert "carrying on" in warnings[0].getMessage()
    assert not n.enabled


@pytest.mark.parametrize("env, pid, expected", [
    ({}, 7, None),
    ({"WATCHDOG_USEC": "0"}, 7, None),
    ({"WATCHDOG_USEC": "x"}, 7, None),
    ({"WATCHDOG_USEC": "2000000"}, 7, 1.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "7"}, 7, 1.0),
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "8"}, 7, None),       # another process's watchdog
    ({"WATCHDOG_USEC": "2000000", "WATCHDOG_PID": "x"}, 7, None),
])
def test_watchdog_interval(env, pid, expected):
    assert notify.watchdog_interval(env, pid) == expected


def test_watchdog_pings_from_a_greenlet_and_stop_when_the_hub_is_blocked(listener):
    path, recv = listener
    n = notify.Notifier.from_environ({"NOTIFY_SOCKET": path, "WATCHDOG_USEC": "100000"}, pid=1)
    assert n.watchdog_every == 0.05
    n.start(lambda: "serving 0 sessions", status_every=3600)
    try:
        got = []
        while len(got) < 3:
            gevent.sleep(0.01)          # the pings run on the loop: give it the hand
            lines = recv(timeout=0.5)
            if lines is not None:
                got.append(lines)
        assert all(lines == ["WATCHDOG=1"] for lines in got)
        import time
        time.sleep(0.3)                 # the hub is blocked: no greenlet runs, no ping is sent meanwhile
        sent = n.sent
        time.sleep(0.3)
        assert n.sent == sent
    finally:
        n.stop()
        n.close()


def test_status_refresh_only_when_the_text_changes(listener):
    path, recv = listener
    n = notify.Notifier.from_environ({"NOTIFY_SOCKET": path}, pid=1)
    texts = iter(["serving 1 session", "serving 1 session", "serving 2 sessions"])
    last = ["serving 2 sessions"]

    def describe():
        return next(texts, last[0])

    n.ready("serving 0 sessions")
    assert recv() == ["READY=1", "STATUS=serving 0 sessions"]
    n.start(describe, status_every=0.01)
    try:
        seen = []
        while len(seen) < 2:
            gevent.sleep(0.02)
            lines = recv(timeout=0.2)
            if lines is not None:
                seen.append(lines)
        assert seen == [["STATUS=serving 1 session"], ["STATUS=serving 2 sessions"]]
        gevent.sleep(0.1)
        assert recv(timeout=0.2) is None          # unchanged: nothing more
    finally:
        n.stop()
        n.close()
