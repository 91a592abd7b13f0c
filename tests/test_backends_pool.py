"""The ssh backend's connection pool, with fake transports (no sockets): reservation, retirement, reaping."""
import os
import sys
import time

import gevent
import paramiko
from paramiko.buffered_pipe import BufferedPipe

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

from kiln import backends  # noqa: E402
from kiln.commands import parse  # noqa: E402


class FakeChannel:
    def __init__(self):
        self.closed = False
        self.env = {}
        self.command = None
        self.in_buffer = BufferedPipe()          # replaced by ChunkPipes when the backend opens the channel
        self.in_stderr_buffer = BufferedPipe()

    def set_environment_variable(self, k, v):
        self.env[k] = v

    def exec_command(self, command):
        self.command = command

    def close(self):
        self.closed = True


class FakeTransport:
    def __init__(self, open_delay=0.0, refuse=False):
        self.open_delay, self.refuse = open_delay, refuse
        self.active = True

    def is_active(self):
        return self.active

    def open_session(self, timeout=None):
        gevent.sleep(self.open_delay)        # a real open waits for the backend's confirmation
        if self.refuse:
            raise paramiko.ChannelException(1, "administratively prohibited")
        return FakeChannel()

    def close(self):
        self.active = False


def make_backend(pool_idle=0.01, max_sessions=8, pool_max_idle=8):
    b = object.__new__(backends.SSHBackend)
    b.max_sessions, b.pool_idle, b.pool_max_idle = max_sessions, pool_idle, pool_max_idle
    b._pool, b._reaper = [], None
    return b


CMD = parse("git-upload-pack 'initech/x.git'", "initech")


def test_reaper_spares_a_connection_while_a_channel_is_being_opened():
    b = make_backend(pool_idle=0.01)
    conn = backends.BackendConnection(None, FakeTransport(open_delay=0.2))
    conn.idle_since = time.monotonic() - 10          # idle long past pool_idle
    b._pool.append(conn)
    opening = gevent.spawn(b._exec, conn, CMD, {"KILN_SESSION": "abcd1234"}, 5)
    gevent.sleep(0.05)                               # the open is under way
    b._close_expired()
    assert conn in b._pool and conn.transport.is_active()
    chan = opening.get(timeout=5)
    assert chan is not None and chan.command == "git-upload-pack 'initech/x.git'"
    assert chan.env == {"KILN_SESSION": "abcd1234"}
    assert conn.channels == 1


def test_refused_channel_retires_a_busy_connection_without_closing_it():
    b = make_backend()
    conn = backends.BackendConnection(None, FakeTransport(refuse=True))
    conn.channels = 3                                 # three sessions running on it
    b._pool.append(conn)
    assert b._exec(conn, CMD, {}, 5) is None
    assert conn.channels == 3
    b._retire(conn)
    assert conn.retired and conn.transport.is_active() and conn in b._pool
    assert not conn.usable(8)


def test_release_closes_idle_connection_when_pooling_is_off():
    b = make_backend(pool_idle=0)
    conn = backends.BackendConnection(None, FakeTransport())
    b._pool.append(conn)
    chan = b._exec(conn, CMD, {}, 5)
    proc = b._track(conn, chan, reused=False)
    assert conn.channels == 1
    transport = conn.transport
    proc.close()
    assert chan.closed and conn.channels == 0
    assert conn not in b._pool and not transport.is_active()


def test_retired_connection_closes_when_its_last_session_ends():
    b = make_backend(pool_idle=60)
    conn = backends.BackendConnection(None, FakeTransport())
    b._pool.append(conn)
    proc = b._track(conn, b._exec(conn, CMD, {}, 5), reused=False)
    b._retire(conn)                                   # e.g. SIGHUP re-pinned the host keys
    assert conn in b._pool and conn.alive()           # its running session is not cut
    assert not conn.usable(8)
    transport = conn.transport
    proc.close()
    assert conn not in b._pool and not transport.is_active()
    assert b._reaper is None                          # nothing idle is left to wait for


def test_pool_reports_when_it_drained():
    b = make_backend(pool_idle=0.01)
    drained = []
    b.on_drained = lambda: drained.append(len(b._pool))
    busy, idle = (backends.BackendConnection(None, FakeTransport()) for _ in range(2))
    busy.channels = 1
    for conn in (busy, idle):
        conn.idle_since = time.monotonic() - 10
        b._pool.append(conn)
    b._close_expired()
    assert b._pool == [busy] and drained == []          # one connection still serves a session
    b._release_slot(busy)
    busy.idle_since -= 10
    b._close_expired()
    assert b._pool == [] and drained == [0]
    b._close_expired()                                   # nothing closed: no second report
    assert drained == [0]


def test_pool_keeps_at_most_pool_max_idle_idle_connections():
    """After a burst, idle connections beyond pool_max_idle close at once (the longest idle first); busy ones and
    the most recently used idle ones stay for pool_idle."""
    b = make_backend(pool_idle=60, pool_max_idle=3)
    now = time.monotonic()
    conns = [backends.BackendConnection(None, FakeTransport()) for _ in range(8)]
    for i, conn in enumerate(conns):
        conn.idle_since = now - 8 + i                    # conns[0] idle longest
        b._pool.append(conn)
    conns[0].channels = conns[1].channels = 1          # busy: never closed for being idle
    transports = [c.transport for c in conns]
    b._close_expired()
    assert b._pool == [conns[0], conns[1], conns[5], conns[6], conns[7]]
    assert [t.is_active() for t in transports] == [True, True, False, False, False, True, True, True]
