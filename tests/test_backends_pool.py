"""The ssh backend's connection pool (pool.ConnectionPool, as SSHBackend drives it), with fake transports (no
sockets): reservation, retirement, reaping. The backend is built by its constructor (real identity and known_hosts
files); only its pool's injected dial is replaced."""
import os
import subprocess
import sys
import time

import gevent
import gevent.event
import paramiko
import pytest
from paramiko.buffered_pipe import BufferedPipe

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

from kiln import backends, pool  # noqa: E402
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
        self.opening = gevent.event.Event()       # set when a channel open starts

    def is_active(self):
        return self.active

    def open_session(self, timeout=None):
        self.opening.set()
        gevent.sleep(self.open_delay)        # a real open waits for the backend's confirmation
        if self.refuse:
            raise paramiko.ChannelException(1, "administratively prohibited")
        return FakeChannel(self.exec_delay, self.close_delay)

    def close(self):
        self.active = False


def _keypair(folder, name):
    path = folder / name
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
    return path, " ".join((folder / (name + ".pub")).read_text().split()[:2])


@pytest.fixture(scope="module")
def keyfiles(tmp_path_factory):
    """(identity path, known_hosts path pinning [127.0.0.1]:2200)."""
    folder = tmp_path_factory.mktemp("pool-keys")
    identity, _ = _keypair(folder, "id")
    _, host_key = _keypair(folder, "hk")
    known = folder / "known_hosts"
    known.write_text("[127.0.0.1]:2200 %s\n" % host_key)
    return str(identity), str(known)


@pytest.fixture
def make_backend(keyfiles):
    """make(pool_idle, max_sessions, pool_max_idle, dial, on_drained, known_hosts): an SSHBackend whose pool dials
    fake connections; `dial` makes the transport of each."""
    made = []

    def make(pool_idle=0.01, max_sessions=8, pool_max_idle=8, dial=None, on_drained=None, known_hosts=None):
        b = backends.SSHBackend(("127.0.0.1", 2200), "git", keyfiles[0], known_hosts or keyfiles[1], max_sessions,
                                pool_idle, pool_max_idle, on_drained=on_drained)
        b.dialled = []

        def fake_dial(timeout):
            b.dialled.append(timeout)
            return backends.BackendConnection(None, (dial or FakeTransport)())
        b.pool.dial = fake_dial
        made.append(b)
        return b
    yield make
    for b in made:
        b.close()


def attempt(b, conn, env=None, timeout=5):
    """Open a channel on conn the way SSHBackend.open does: (channel, None) or (None, why)."""
    env = env or {}
    return b.pool.attempt(conn, lambda c, left: b._open_channel(c, CMD, env, left), timeout)


CMD = parse("git-upload-pack 'initech/x.git'", "initech")


def test_reaper_spares_a_connection_while_a_channel_is_being_opened(make_backend):
    b = make_backend(pool_idle=0.01)
    conn = backends.BackendConnection(None, FakeTransport(open_delay=0.2))
    conn.idle_since = time.monotonic() - 10          # idle long past pool_idle
    b.pool.connections.append(conn)
    opening = gevent.spawn(attempt, b, conn, {"KILN_SESSION": "abcd1234"}, 5)
    assert conn.transport.opening.wait(5)            # the open is under way
    b.pool.close_expired()
    assert conn in b.pool.connections and conn.transport.is_active()
    chan, why = opening.get(timeout=5)
    assert why is None and chan is not None and chan.command == "git-upload-pack 'initech/x.git'"
    assert chan.env == {"KILN_SESSION": "abcd1234"}
    assert conn.channels == 1


def test_refused_channel_retires_a_busy_connection_without_closing_it(make_backend):
    b = make_backend()
    conn = backends.BackendConnection(None, FakeTransport(refuse=True))
    conn.channels = 3                                 # three sessions running on it
    b.pool.connections.append(conn)
    chan, why = attempt(b, conn)
    assert chan is None and "administratively prohibited" in why
    assert conn.channels == 3
    b.pool.retire(conn, why)
    assert conn.retired and conn.transport.is_active() and conn in b.pool.connections
    assert not conn.usable(8)


def test_release_closes_idle_connection_when_pooling_is_off(make_backend):
    b = make_backend(pool_idle=0)
    conn = backends.BackendConnection(None, FakeTransport())
    b.pool.connections.append(conn)
    chan, _ = attempt(b, conn)
    proc = b._track(conn, chan, reused=False)
    assert conn.channels == 1
    transport = conn.transport
    proc.close()
    assert chan.closed and conn.channels == 0
    assert conn not in b.pool.connections and not transport.is_active()


def test_retired_connection_closes_when_its_last_session_ends(make_backend):
    b = make_backend(pool_idle=60)
    conn = backends.BackendConnection(None, FakeTransport())
    b.pool.connections.append(conn)
    proc = b._track(conn, attempt(b, conn)[0], reused=False)
    b.pool.retire(conn, "reload")                         # e.g. SIGHUP re-pinned the host keys
    assert conn in b.pool.connections and conn.alive()           # its running session is not cut
    assert not conn.usable(8)
    transport = conn.transport
    proc.close()
    assert conn not in b.pool.connections and not transport.is_active()
    assert not b.pool.reaping                          # nothing idle is left to wait for


def test_pool_reports_when_it_drained(make_backend):
    drained = []
    b = make_backend(pool_idle=0.01, on_drained=lambda: drained.append(len(b.pool.connections)))
    busy, idle = (backends.BackendConnection(None, FakeTransport()) for _ in range(2))
    busy.channels = 1
    for conn in (busy, idle):
        conn.idle_since = time.monotonic() - 10
        b.pool.connections.append(conn)
    b.pool.close_expired()
    assert b.pool.connections == [busy] and drained == []          # one connection still serves a session
    b.pool.release(busy)                               # its session ended: idle from now, for pool_idle
    assert b.pool.connections == [busy] and drained == []
    busy.idle_since -= 10
    b.pool.close_expired()
    assert b.pool.connections == [] and drained == [0]
    b.pool.close_expired()                                   # nothing closed: no second report
    assert drained == [0]


def test_pool_keeps_at_most_pool_max_idle_idle_connections(make_backend):
    """After a burst, idle connections beyond pool_max_idle close at once (the longest idle first); busy ones and
    the most recently used idle ones stay for pool_idle."""
    b = make_backend(pool_idle=60, pool_max_idle=3)
    now = time.monotonic()
    conns = [backends.BackendConnection(None, FakeTransport()) for _ in range(8)]
    for i, conn in enumerate(conns):
        conn.idle_since = now - 8 + i                    # conns[0] idle longest
        b.pool.connections.append(conn)
    conns[0].channels = conns[1].channels = 1          # busy: never closed for being idle
    transports = [c.transport for c in conns]
    b.pool.close_expired()
    assert b.pool.connections == [conns[0], conns[1], conns[5], conns[6], conns[7]]
    assert [t.is_active() for t in transports] == [True, True, False, False, False, True, True, True]


# -- a pooled connection that misbehaves (issue 11) -------------------------------------------------------------
ENV = {"KILN_SESSION": "abcd1234"}


def pooled(b, **kw):
    conn = backends.BackendConnection(None, FakeTransport(**kw))
    conn.channels = 1                                 # one session runs on it, so it stays pooled
    b.pool.connections.append(conn)
    return conn


def test_pooled_connection_that_never_confirms_the_channel_is_retired_and_a_fresh_one_serves(make_backend):
    """A rekey stall (paramiko#822) looked like this: the channel open waits and waits on a connection that seems
    alive. The pooled attempt has its share of the budget, then the session moves on, within the budget."""
    b = make_backend(pool_idle=60)
    stuck = pooled(b, open_delay=3600)
    started = time.monotonic()
    proc = b.open(CMD, ENV, 2.0)
    assert time.monotonic() - started < 2.0
    assert not proc.reused
    assert stuck.retired and stuck in b.pool.connections and stuck.alive()     # its running session is not cut
    assert len(b.dialled) == 1
    assert 0 < b.dialled[0] <= 2.0 * (1 - pool.POOLED_SHARE) + 0.05
    fresh = b.pool.connections[-1]
    assert fresh is not stuck and fresh.channels == 1 and fresh.usable(8)
    proc.close()
    assert fresh.channels == 0 and stuck.channels == 1


def test_pooled_connection_that_accepts_the_channel_but_never_answers_the_exec_is_retired(make_backend):
    b = make_backend(pool_idle=60)
    stuck = pooled(b, exec_delay=3600)
    proc = b.open(CMD, ENV, 2.0)
    assert not proc.reused and stuck.retired and stuck.channels == 1
    assert proc._chan.command == "git-upload-pack 'initech/x.git'"
    proc.close()


def test_backend_that_never_answers_fails_within_the_dial_budget(make_backend):
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
    assert all(c.channels == (1 if c.retired else 0) for c in b.pool.connections)
    assert len(b.pool.connections) == 1                          # the fresh connection that failed is closed, not pooled


def test_close_that_cannot_go_out_is_bounded_and_retires_the_connection(make_backend):
    b = make_backend(pool_idle=60)
    conn = backends.BackendConnection(None, FakeTransport(close_delay=3600))
    b.pool.connections.append(conn)
    proc = b._track(conn, attempt(b, conn)[0], reused=False)
    started = time.monotonic()
    proc.close()
    assert time.monotonic() - started < backends.CLOSE_WAIT + 1
    assert conn.channels == 0
    assert conn not in b.pool.connections and not conn.alive()   # retired, and nothing else ran on it: closed
    proc.close()                                      # idempotent


def test_slot_is_released_when_the_handler_is_killed_during_close(make_backend):
    b = make_backend(pool_idle=60)
    conn = backends.BackendConnection(None, FakeTransport(close_delay=3600))
    b.pool.connections.append(conn)
    chan = attempt(b, conn)[0]
    proc = b._track(conn, chan, reused=False)
    closing = gevent.spawn(proc.close)
    for _ in range(1000):                            # until the close is under way (waiting to send)
        if chan.closed:
            break
        gevent.sleep(0.001)
    assert chan.closed
    closing.kill(block=True, timeout=5)
    assert conn.channels == 0 and conn.retired


def test_reload_retires_pooled_connections_only_when_this_backends_pins_changed(make_backend, tmp_path):
    keys = []
    for n in range(2):
        path = tmp_path / ("hk%d" % n)
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(path)], check=True)
        keys.append(" ".join((tmp_path / ("hk%d.pub" % n)).read_text().split()[:2]))
    known = tmp_path / "known_hosts"
    known.write_text("[127.0.0.1]:2200 %s\nother.example %s\n" % (keys[0], keys[0]))
    b = make_backend(pool_idle=60, known_hosts=str(known))
    conn = backends.BackendConnection(None, FakeTransport())
    b.pool.connections.append(conn)
    known.write_text("[127.0.0.1]:2200 %s\nother.example %s\n" % (keys[0], keys[1]))   # another host's pin
    b.reload()
    assert not conn.retired and conn in b.pool.connections                   # SIGHUP for keys or others: pool kept
    known.write_text("[127.0.0.1]:2200 %s\n" % keys[1])           # this backend re-pinned
    b.reload()
    assert conn not in b.pool.connections or conn.retired
    b.close()


def test_connection_pool_alone_reuses_a_connection_with_room_and_dials_when_full():
    """pool.ConnectionPool knows nothing about SSH: any dial and any run(conn, seconds) will do."""
    dialled = []

    def dial(timeout):
        dialled.append(timeout)
        return backends.BackendConnection(None, FakeTransport())

    p = pool.ConnectionPool(dial, max_sessions=2, pool_idle=60)
    run = lambda conn, left: ("chan-%d" % conn.channels, None)       # noqa: E731
    first = p.open(run, 1.0)
    second = p.open(run, 1.0)
    third = p.open(run, 1.0)
    assert [reused for _, _, reused in (first, second, third)] == [False, True, False]
    assert first[0] is second[0] is not third[0] and len(dialled) == 2 and len(p) == 2
    assert first[0].channels == 2 and third[0].channels == 1
    for conn, _, _ in (first, second, third):
        p.release(conn)
    assert first[0].channels == third[0].channels == 0 and len(p) == 2       # idle, kept for pool_idle
    p.close()
    assert len(p) == 0 and not first[0].alive() and not p.reaping
