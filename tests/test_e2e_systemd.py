"""End to end, a real `kilnproxy.py serve` as systemd runs it: sd_notify against a datagram socket the test binds
(READY only once both ports accept, RELOADING/READY around SIGHUP, STOPPING on SIGTERM, WATCHDOG pings and their PID
rule, a missing socket), socket activation (systemd-socket-activate, and descriptors passed by the test itself),
bad LISTEN_* input, and JSON log lines parsed line by line around a real git clone. The units themselves are
checked in test_deploy.py, the same things from dist/kilnproxy.pyz in test_dist.py."""
import json
import os
import re
import shutil
import signal
import socket
import subprocess

import pytest

import harness
from servicemanager import (SERVE_TIMEOUT, Launched, NotifySocket, clone_through, healthz, monotonic_usec,
                            ssh_banner)

pytestmark = pytest.mark.e2e


@pytest.fixture
def launched(tmp_path, keys):
    made = []

    def make(**extra):
        proxy = Launched(str(tmp_path / ("proxy%d" % len(made))), extra=extra)
        proxy.add_key(keys["user"] + ".pub")
        made.append(proxy)
        return proxy

    yield make
    problems = []
    for proxy in made:
        if proxy.proc is None:
            continue
        status = proxy.stop()
        if status not in (0, None, proxy.expected_exit):
            problems.append("%s exited %s:\n%s" % (proxy.dir, status, proxy.read_log()[-3000:]))
        # systemd-socket-activate's "Execing <command line>" names -W error::ResourceWarning: not a problem
        problems += ["%s: %s" % (proxy.dir, line) for line in proxy.problems() if not line.startswith("Execing ")]
    assert not problems, "proxy problems:\n" + "\n".join(problems)


@pytest.fixture
def notify_socket():
    made = []

    def make(abstract=False):
        made.append(NotifySocket(abstract))
        return made[-1]

    yield make
    for s in made:
        s.close()


# -- sd_notify ---------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("abstract", [False, True], ids=["path", "abstract"])
def test_notify_ready_reloading_stopping(launched, notify_socket, abstract):
    ns = notify_socket(abstract)
    proxy = launched()
    proxy.launch(proxy.serve_argv(), env=dict(os.environ, NOTIFY_SOCKET=ns.value))
    first = ns.recv()
    assert first == ["STATUS=starting"]
    got = ns.until("READY=1")
    assert got[-1] == ["READY=1", "STATUS=serving 0 sessions"]
    # READY=1 came after both listeners were bound: both ports answer now (their log lines precede it)
    ssh_port, admin_port = proxy.ports()
    assert ssh_banner(ssh_port).startswith(b"SSH-2.0-KilnProxy")
    assert healthz(admin_port) == 200

    before = monotonic_usec()
    proxy.proc.send_signal(signal.SIGHUP)
    got = ns.until("READY=1")
    after = monotonic_usec()
    reloading = next(m for m in got if "RELOADING=1" in m)
    usec = int(next(line for line in reloading if line.startswith("MONOTONIC_USEC="))[len("MONOTONIC_USEC="):])
    assert before <= usec <= after          # CLOCK_MONOTONIC, as systemd compares it
    assert "STATUS=reloading" in reloading
    assert got[-1][0] == "READY=1" and got.index(reloading) < len(got) - 1
    proxy.wait_for_log(r"reloaded: 1 keys")

    proxy.proc.send_signal(signal.SIGTERM)
    got = ns.until("STOPPING=1")
    assert got[-1] == ["STOPPING=1", "STATUS=draining 0 sessions"]
    assert proxy.proc.wait(SERVE_TIMEOUT) == 0
    assert not any("WATCHDOG=1" in m for m in ns.messages)      # no WATCHDOG_USEC, no pings


def test_watchdog_pings_only_for_this_pid(launched, notify_socket, keys, tmp_path):
    ns = notify_socket()
    proxy = launched()
    proxy.launch(proxy.serve_argv(), env=dict(os.environ, NOTIFY_SOCKET=ns.value, WATCHDOG_USEC="200000"))
    ns.until("READY=1")
    pings = 0
    while pings < 3:
        if ns.recv() == ["WATCHDOG=1"]:
            pings += 1
    proxy.wait_for_log(r"sd_notify: watchdog ping every 0.1s")
    proxy.ports()
    clone_through(proxy, keys, tmp_path, "watched")          # serving all along
    assert proxy.stop() == 0

    other = notify_socket()
    proxy2 = launched()
    # WATCHDOG_PID names another process (memory.py's re-exec keeps our PID; this one is never ours)
    proxy2.launch(proxy2.serve_argv(), env=dict(os.environ, NOTIFY_SOCKET=other.value, WATCHDOG_USEC="20000",
                                                WATCHDOG_PID="1"))
    other.until("READY=1")
    for _ in range(3):                       # each round trip gives 10 ms pings ample time to show up
        proxy2.proc.send_signal(signal.SIGHUP)
        other.until("READY=1")
    assert not any("WATCHDOG=1" in m for m in other.messages), other.messages
    assert "watchdog ping" not in proxy2.read_log()


def test_missing_notify_socket_is_a_warning_and_the_proxy_serves(launched, keys, tmp_path):
    proxy = launched()
    proxy.launch(proxy.serve_argv(), env=dict(os.environ, NOTIFY_SOCKET="/nonexistent/kiln/notify"))
    proxy.ports()
    line = proxy.wait_for_log(r".*sd_notify: cannot send to NOTIFY_SOCKET=/nonexistent/kiln/notify.*").group(0)
    assert " WARNING " in line and "carrying on" in line
    clone_through(proxy, keys, tmp_path, "unnotified")
    assert proxy.read_log().count("sd_notify: cannot send") == 1
    assert proxy.stop() == 0


# -- socket activation -------------------------------------------------------------------------------------------
SOCKET_ACTIVATE = shutil.which("systemd-socket-activate")


@pytest.mark.skipif(SOCKET_ACTIVATE is None, reason="systemd-socket-activate missing (apt-get install systemd)")
def test_systemd_socket_activate_serves_ssh_and_admin_on_inherited_sockets(launched, notify_socket, keys, tmp_path):
    ssh_port, admin_port = harness.free_port(), harness.free_port()
    ns = notify_socket()
    proxy = launched()
    proxy.launch([SOCKET_ACTIVATE, "-l", "127.0.0.1:%d" % ssh_port, "--fdname=ssh",
                  "-l", "127.0.0.1:%d" % admin_port, "--fdname=admin", "-E", "NOTIFY_SOCKET=" + ns.value]
                 + proxy.serve_argv())
    # systemd-socket-activate starts the proxy on the first connection (this probe's), which waits in the backlog
    harness.wait_for_port("127.0.0.1", admin_port, timeout=SERVE_TIMEOUT, proc=proxy.proc)
    assert ssh_banner(ssh_port).startswith(b"SSH-2.0-KilnProxy")
    ns.until("READY=1")
    assert healthz(admin_port) == 200
    log = proxy.read_log()
    assert re.search(r"socket activation: SSH on inherited descriptor 3 \(ssh\); proxy.listen 127.0.0.1:0 ignored",
                     log), log
    assert re.search(r"socket activation: admin API on inherited descriptor 4 \(admin\); admin.listen "
                     r"127.0.0.1:0 ignored", log), log
    assert "listening for SSH on 127.0.0.1:%d" % ssh_port in log
    proxy.port, proxy.admin_port = ssh_port, admin_port
    clone_through(proxy, keys, tmp_path, "activated")
    status, body = harness.admin_get(proxy, "/info")
    assert status == 200
    assert proxy.stop() == 0


LAUNCHER = """import os, sys
ssh, admin = int(sys.argv[1]), int(sys.argv[2])
os.dup2(admin, 3); os.dup2(ssh, 4); os.close(ssh); os.close(admin)
os.environ.update(LISTEN_PID=str(os.getpid()), LISTEN_FDS="2", LISTEN_FDNAMES="admin:ssh")
os.execv(sys.executable, [sys.executable] + sys.argv[3:])
"""


def test_descriptors_passed_by_hand_with_names_in_any_order(launched, keys, tmp_path):
    ssh = socket.socket()
    ssh.bind(("127.0.0.1", 0))
    ssh.listen(128)
    admin = socket.socket()
    admin.bind(("127.0.0.1", 0))
    admin.listen(128)
    try:
        proxy = launched()
        proxy.launch([harness.PYTHON, "-c", LAUNCHER, str(ssh.fileno()), str(admin.fileno())]
                     + proxy.serve_argv()[1:], pass_fds=(ssh.fileno(), admin.fileno()))
        ports = proxy.ports()
        assert ports == (ssh.getsockname()[1], admin.getsockname()[1])
        assert "inherited descriptor 4 (ssh)" in proxy.read_log()
        clone_through(proxy, keys, tmp_path, "handed")
        assert healthz(proxy.admin_port) == 200
        assert proxy.stop() == 0
    finally:
        ssh.close()
        admin.close()


@pytest.mark.parametrize("env, message", [
    ({"LISTEN_FDS": "1", "LISTEN_PID": "1"}, "LISTEN_FDS=1 is set but LISTEN_PID=1 is not this process"),
    ({"LISTEN_FDS": "1"}, "LISTEN_FDS=1 is set but LISTEN_PID=(unset) is not this process"),
    ({"LISTEN_FDS": "two", "LISTEN_PID": "1"}, "LISTEN_FDS='two' is not a number of descriptors"),
])
def test_bad_socket_activation_variables_are_one_line_and_exit_2(launched, env, message):
    proxy = launched()
    r = subprocess.run(proxy.serve_argv(), cwd=proxy.dir, env=dict(os.environ, **env), capture_output=True,
                       text=True, timeout=SERVE_TIMEOUT)
    assert r.returncode == 2, r.stderr
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("kilnproxy: socket activation: "), r.stderr
    assert message in r.stderr
    assert "Traceback" not in r.stderr


# -- JSON logs ---------------------------------------------------------------------------------------------------
def test_json_log_lines_around_a_clone(make_proxy, keys, tmp_path):
    proxy = make_proxy("local", log={"format": "json"})
    clone_through(proxy, keys, tmp_path, "logged")
    proxy.wait_for_log(r'"msg": "end duration=[^"]*reason=completed"')      # logged just after the client is done
    objects = [json.loads(line) for line in proxy.read_log().splitlines()]        # every line is one object
    for obj in objects:
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", obj["ts"]), obj
        assert obj["level"] in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL") and isinstance(obj["msg"], str)
    starts = [o for o in objects if o["msg"].startswith("start remote=")]
    auth = [o for o in objects if o["msg"].startswith("auth ")]
    ends = [o for o in objects if o["msg"].startswith("end ")]
    assert starts and auth and ends
    end = next(o for o in ends if o["session"] == auth[-1]["session"])
    assert end["reason"] == "completed" and end["exit"] == "0"
    assert isinstance(end["duration"], float) and end["duration"] >= 0
    assert isinstance(end["bytes_in"], int) and isinstance(end["bytes_out"], int) and end["bytes_out"] > 0
    assert re.fullmatch(r"[0-9a-f]{8}", end["session"])
    assert not end["msg"].startswith(end["session"])         # the key is a member, not a prefix of msg
    assert auth[-1]["account"] == harness.ACCOUNT and auth[-1]["user"] == "Peter Gibbons"
    assert re.fullmatch(r"127\.0\.0\.1:\d+", starts[-1]["remote"])
    session_lines = [o for o in objects if o.get("session") == end["session"]]
    assert session_lines[0]["msg"].startswith("start ") and session_lines[-1] is end
    assert all("session" not in o for o in objects if o["msg"].startswith("listening for SSH"))
