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
    def __init__(self, exec_delay=0.0, close_delay=0.0):
        self.closed = False
        self.env = {}
        self.command = None
        self.exec_delay, self.close_delay = exec_delay, close_delay
        self.in_buffer = BufferedPipe()          # replaced by ChunkPipes when the backend opens the channel
        self.in_stderr_buffer = BufferedPipe()

    def set_environment_variable(self, k, v):
        self.env[k] = v

    def exec_command(self, command):
        gevent.sleep(self.exec_delay)        # a real exec waits for the backend's reply
        self.command = command

    def close(self):
        self.closed = True                   # paramiko marks it closed first, then sends EOF and CLOSE
        gevent.sleep(self.close_delay)       # ... which wait behind a key exchange and the write lock


class FakeTransport:
    def __init__(self, open_delay=0.0, refuse=False, exec_delay=0.0, close_delay=0.0):
        self.open_delay, self.refuse = open_delay, refuse
        self.exec_delay, self.close_delay = exec_delay, close_delay
        self.active = True

    def is_active(self):
        return self.active

    def open_session(self, timeout=None):
        gevent.sleep(self.open_delay)        # a real open waits for the backend's confirmation
        if self.refuse:
            raise paramiko.ChannelException(1, "administratively prohibited")
        return FakeChannel(self.exec_delay, self.close_delay)

    def close(self):
        self.active = False


def make_backend(pool_idle=0.01, max_sessions=8, pool_max_idle=8, dial=None):
    """An SSHBackend without sockets; `dial` makes the transport of each freshly dialled connection."""
    b = object.__new__(backends.SSHBackend)
    b.max_sessions, b.pool_idle, b.pool_max_idle = max_sessions, pool_idle, pool_max_idle
    b._pool, b._reaper = [], None
    b.dialled = []

    def fake_dial(timeout):
        b.dialled.append(timeout)
        return backends.BackendConnection(None, (dial or FakeTransport)())
    b._dial = fake_dial
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
    chan, why = opening.get(timeout=5)
    assert why is None and chan is not None and chan.command == "git-upload-pack 'initech/x.git'"
    assert chan.env == {"KILN_SESSION": "abcd1234"}
    assert conn.channels == 1


def test_refused_channel_retires_a_busy_connection_without_closing_it():
    b = make_backend()
    conn = backends.BackendConnection(None, FakeTransport(refuse=True))
    conn.channels = 3                                 # three sessions running on it
    b._pool.append(conn)
    chan, why = b._exec(conn, CMD, {}, 5)
    assert chan is None and "administratively prohibited" in why
    assert conn.channels == 3
    b._retire(conn, why)
    assert conn.retired and conn.transport.is_active() and conn in b._pool
    assert not conn.usable(8)


def test_release_closes_idle_connection_when_pooling_is_off():
    b = make_backend(pool_idle=0)
    conn = backends.BackendConnection(None, FakeTransport())
    b._pool.append(conn)
    chan, _ = b._exec(conn, CMD, {}, 5)
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
    proc = b._track(conn, b._exec(conn, CMD, {}, 5)[0], reused=False)
    b._retire(conn, "reload")                         # e.g. SIGHUP re-pinned the host keys
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


# -- a pooled connection that misbehaves (issue 11) -------------------------------------------------------------
ENV = {"KILN_SESSION": "abcd1234"}


def pooled(b, **kw):
    conn = backends.BackendConnection(None, FakeTransport(**kw))
    conn.channels = 1                                 # one session runs on it, so it stays pooled
    b._pool.append(conn)
    return conn


def test_pooled_connection_that_never_confirms_the_channel_is_retired_and_a_fresh_one_serves():
    """A rekey stall (paramiko#822) looked like this: the channel open waits and waits on a connection that seems
    alive. The pooled attempt has its share of the budget, then the session moves on, within the budget."""
    b = make_backend(pool_idle=60)
    stuck = pooled(b, open_delay=3600)
    started = time.monotonic()
    proc = b.open(CMD, ENV, 2.0)
    assert time.monotonic() - started < 2.0
    assert not proc.reused
    assert stuck.retired and stuck in b._pool and stuck.alive()     # its running session is not cut
    assert len(b.dialled) == 1 and 0 < b.dialled[0] <= 2.0 * (1 - backends.POOLED_SHARE) + 0.05
    fresh = b._pool[-1]
    assert fresh is not stuck and fresh.channels == 1 and fresh.usable(8)
    proc.close()
    assert fresh.channels == 0 and stuck.channels == 1


def test_pooled_connection_that_accepts_the_channel_but_never_answers_the_exec_is_retired():
    b = make_backend(pool_idle=60)
    stuck = pooled(b, exec_delay=3600)
    proc = b.open(CMD, ENV, 2.0)
    assert not proc.reused and stuck.retired and stuck.channels == 1
    assert proc._chan.command == "git-upload-pack 'initech/x.git'"
    proc.close()


def test_backend_that_never_answers_fails_within_the_dial_budget():
    b = make_backend(pool_idle=60, dial=lambda: FakeTransport(exec_delay=3600))
    pooled(b, open_delay=3600)
    started = time.monotonic()
    try:
        b.open(CMD, ENV, 1.0)
    except backends.BackendUnavailable as e:
        message = str(e)
    else:
        raise AssertionError("opened")
    # the interface: a client hears "backend unavailable" within timeouts.dial + 1 s
    assert time.monotonic() - started < 1.0 + 1.0
    assert "did not answer" in message
    assert all(c.channels == (1 if c.retired else 0) for c in b._pool)
    assert len(b._pool) == 1                          # the fresh connection that failed is closed, not pooled


def test_close_that_cannot_go_out_is_bounded_and_retires_the_connection():
    b = make_backend(pool_idle=60)
    conn = backends.BackendConnection(None, FakeTransport(close_delay=3600))
    b._pool.append(conn)
    proc = b._track(conn, b._exec(conn, CMD, {}, 5)[0], reused=False)
    started = time.monotonic()
    proc.close()
    assert time.monotonic() - started < backends.CLOSE_WAIT + 1
    assert conn.channels == 0
    assert conn not in b._pool and not conn.alive()   # retired, and nothing else ran on it: closed
    proc.close()                                      # idempotent


def test_slot_is_released_when_the_handler_is_killed_during_close():
    b = make_backend(pool_idle=60)
    conn = backends.BackendConnection(None, FakeTransport(close_delay=3600))
    b._pool.append(conn)
    proc = b._track(conn, b._exec(conn, CMD, {}, 5)[0], reused=False)
    closing = gevent.spawn(proc.close)
    gevent.sleep(0.05)
    closing.kill(block=True, timeout=5)
    assert conn.channels == 0 and conn.retired


def test_reload_retires_pooled_connections_only_when_this_backends_pins_changed(tmp_path):
    import subprocess
    keys = []
    for n in range(2):
        path = tmp_path / ("hk%d" % n)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
        keys.append(" ".join((tmp_path / ("hk%d.pub" % n)).read_text().split()[:2]))
    known = tmp_path / "known_hosts"
    known.write_text("[127.0.0.1]:2200 %s\nother.example %s\n" % (keys[0], keys[0]))
    b = make_backend(pool_idle=60)
    b.address, b.known_hosts_path = ("127.0.0.1", 2200), str(known)
    b.host_keys = b._load_known_hosts()
    conn = backends.BackendConnection(None, FakeTransport())
    b._pool.append(conn)
    known.write_text("[127.0.0.1]:2200 %s\nother.example %s\n" % (keys[0], keys[1]))   # another host's pin
    b.reload()
    assert not conn.retired and conn in b._pool                   # SIGHUP for keys or others: pool kept
    known.write_text("[127.0.0.1]:2200 %s\n" % keys[1])           # this backend re-pinned
    b.reload()
    assert conn not in b._pool or conn.retired
    b.close()
