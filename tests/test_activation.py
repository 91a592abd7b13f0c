"""Socket activation (lib/kiln/activation.py): LISTEN_* parsing, choosing the ssh and admin sockets, bad input; and
the servers' start(listener) serving on a socket made elsewhere. The real thing, with systemd-socket-activate and a
proxy process, is in test_e2e_systemd.py."""
import os
import socket
import time
from types import SimpleNamespace

import gevent
import gevent.socket
import pytest

from kiln import activation, admin, config, metrics, sessions
from kiln.errors import ConfigError

FIRST = 150         # tests cannot give their own process descriptors 3 and up: the same protocol from here


@pytest.fixture
def passed():
    """passed(kinds...) -> environment with LISTEN_FDS for sockets placed at FIRST, FIRST+1, ... kinds: 'tcp'
    (listening), 'idle' (bound, not listening), 'udp', 'unix', 'file'."""
    placed = []

    def make(*kinds, names=None):
        for i, kind in enumerate(kinds):
            if kind == "file":
                obj = open(os.devnull, "rb")
                fd = obj.fileno()
            else:
                family = socket.AF_UNIX if kind == "unix" else socket.AF_INET
                obj = socket.socket(family, socket.SOCK_DGRAM if kind == "udp" else socket.SOCK_STREAM)
                if kind != "unix":
                    obj.bind(("127.0.0.1", 0))
                if kind == "tcp":
                    obj.listen(8)
                fd = obj.fileno()
            os.dup2(fd, FIRST + i)
            obj.close()
            placed.append(FIRST + i)
        env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": str(len(kinds))}
        if names is not None:
            env["LISTEN_FDNAMES"] = ":".join(names)
        return env

    yield make
    for fd in placed:
        try:
            os.close(fd)
        except OSError:
            pass


def test_no_variables_means_no_activation():
    env = {"HOME": "/x"}
    assert activation.inherited(env, pid=123, first_fd=FIRST) is None
    assert env == {"HOME": "/x"}


def test_zero_sockets_means_no_activation():
    env = {"LISTEN_PID": "123", "LISTEN_FDS": "0"}
    assert activation.inherited(env, pid=123, first_fd=FIRST) is None
    assert env == {}


@pytest.mark.parametrize("pid", [None, "", "1", "abc", "123x"])
def test_listen_fds_for_another_process_is_refused(pid):
    env = {"LISTEN_FDS": "1"}
    if pid is not None:
        env["LISTEN_PID"] = pid
    with pytest.raises(ConfigError) as e:
        activation.inherited(env, pid=123, first_fd=FIRST)
    assert "LISTEN_PID=%s is not this process (123)" % (pid if pid is not None else "(unset)") in str(e.value)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("count", ["x", "-1", "1.0", "999", " 1", "\u0661"])
def test_malformed_listen_fds_is_refused(count):
    with pytest.raises(ConfigError, match="LISTEN_FDS="):
        activation.inherited({"LISTEN_PID": "123", "LISTEN_FDS": count}, pid=123, first_fd=FIRST)


def test_names_must_match_the_count(passed):
    env = passed("tcp", "tcp", names=["ssh"])
    with pytest.raises(ConfigError, match="names 1 sockets, LISTEN_FDS=2"):
        activation.inherited(env, first_fd=FIRST)


def test_named_sockets_are_chosen_by_name_and_the_variables_consumed(passed):
    env = passed("tcp", "tcp", "tcp", names=["admin", "other", "ssh"])
    got = activation.inherited(env, first_fd=FIRST)
    try:
        assert got.ssh.fileno() == FIRST + 2 and got.admin.fileno() == FIRST
        assert got.name_of(got.ssh) == "ssh" and got.name_of(got.admin) == "admin"
        assert got.unused == [(FIRST + 1, "other")]
        with pytest.raises(OSError):
            os.fstat(FIRST + 1)            # the unused one is closed
        assert not got.ssh.get_inheritable() and not got.admin.get_inheritable()
        assert isinstance(got.ssh, gevent.socket.socket)
        assert env == {}                   # children (local git/hg) do not see descriptors that are not theirs
    finally:
        got.close()


def test_without_names_the_first_socket_serves_ssh(passed):
    got = activation.inherited(passed("tcp"), first_fd=FIRST)
    try:
        assert got.ssh.fileno() == FIRST and got.admin is None and got.unused == []
    finally:
        got.close()


def test_without_an_ssh_name_the_first_socket_not_named_admin_serves_ssh(passed):
    got = activation.inherited(passed("tcp", "tcp", names=["admin", "web"]), first_fd=FIRST)
    try:
        assert got.admin.fileno() == FIRST and got.ssh.fileno() == FIRST + 1
    finally:
        got.close()


def test_only_an_admin_socket_leaves_ssh_to_proxy_listen(passed):
    got = activation.inherited(passed("tcp", names=["admin"]), first_fd=FIRST)
    try:
        assert got.ssh is None and got.admin.fileno() == FIRST
    finally:
        got.close()


@pytest.mark.parametrize("kind, why", [("idle", "is not listening"), ("udp", "is not a TCP socket"),
                                       ("unix", "is not a TCP socket"), ("file", "is not a socket")])
def test_a_descriptor_that_is_not_a_listening_tcp_socket_is_refused(passed, kind, why):
    with pytest.raises(ConfigError) as e:
        activation.inherited(passed(kind, names=["ssh"]), first_fd=FIRST)
    assert ("inherited descriptor %d (ssh) %s" % (FIRST, why)) in str(e.value)


def test_a_missing_descriptor_is_refused():
    env = {"LISTEN_PID": str(os.getpid()), "LISTEN_FDS": "1"}
    with pytest.raises(ConfigError, match="inherited descriptor 149: Bad file descriptor"):
        activation.inherited(env, first_fd=FIRST - 1)


def test_admin_server_serves_on_a_socket_made_elsewhere(tmp_path):
    listener = gevent.socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(16)
    port = listener.getsockname()[1]
    cfg = config.build({"admin": {"listen": "127.0.0.1:1", "max_blocking_time": 0}}, str(tmp_path))
    server = SimpleNamespace(draining=False, started=time.time(), metrics=metrics.Metrics())
    adm = admin.AdminServer(cfg, server, sessions.Registry(), "0.1.0-test")
    adm.start(listener)
    try:
        assert adm.address == ("127.0.0.1", port)          # admin.listen (port 1) was not bound
        client = gevent.socket.create_connection(("127.0.0.1", port), timeout=10)
        try:
            client.sendall(b"GET /healthz HTTP/1.0\r\nHost: 127.0.0.1:%d\r\n\r\n" % port)
            reply = b""
            with gevent.Timeout(10):
                while True:
                    data = client.recv(4096)
                    if not data:
                        break
                    reply += data
        finally:
            client.close()
        assert reply.startswith(b"HTTP/1.1 200") or reply.startswith(b"HTTP/1.0 200"), reply[:200]
    finally:
        adm.stop()
        listener.close()
