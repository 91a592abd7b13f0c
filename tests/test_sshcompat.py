"""sshcompat against real paramiko transports paired over a socketpair (as paramiko's own tests do)."""
import os
import socket
import subprocess
import sys
import textwrap
import threading

import paramiko
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

from kiln import sshcompat  # noqa: E402


class _Server(paramiko.ServerInterface):
    def __init__(self):
        self.exec_event = threading.Event()

    def get_allowed_auths(self, username):
        return "none"

    def check_auth_none(self, username):
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind, chanid):
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel, command):
        self.exec_event.set()
        return True


@pytest.fixture
def pair():
    """(server transport, client transport, server channel, client channel) with an exec running."""
    a, b = socket.socketpair()
    server_t = sshcompat.harden(sshcompat.Transport(a, disabled_algorithms=sshcompat.DISABLED))
    server_t.add_server_key(paramiko.Ed25519Key.from_private_key_file(_host_key()))
    client_t = sshcompat.harden(sshcompat.Transport(b, disabled_algorithms=sshcompat.DISABLED))
    sshcompat.capture_exit_signal(client_t)
    server = _Server()
    server_t.start_server(event=threading.Event(), server=server)   # returns at once; the client drives it
    client_t.start_client(timeout=10)
    client_t.auth_none("u")
    client_chan = client_t.open_session(timeout=10)
    client_chan.exec_command("x")
    server_chan = server_t.accept(10)
    assert server.exec_event.wait(10)
    yield server_t, client_t, server_chan, client_chan
    for obj in (client_chan, server_chan, client_t, server_t, a, b):
        obj.close()


_KEY = {}


def _host_key():
    if "path" not in _KEY:
        import tempfile
        d = tempfile.mkdtemp()
        path = os.path.join(d, "hk")
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", path], check=True)
        _KEY["path"] = path
    return _KEY["path"]


def test_negotiates_aes_gcm(pair):
    server_t, client_t, _, _ = pair
    assert client_t.remote_cipher == "aes128-gcm@openssh.com"
    assert server_t.local_cipher == "aes128-gcm@openssh.com"


def test_weak_algorithms_are_gone():
    t = sshcompat.harden(sshcompat.Transport(socket.socket(), disabled_algorithms=sshcompat.DISABLED))
    try:
        opts = t.get_security_options()
        assert not [c for c in opts.ciphers if "cbc" in c or "3des" in c]
        assert not [m for m in opts.digests if "sha1" in m or "md5" in m]
        assert not [k for k in t.preferred_kex if "sha1" in k]
        assert opts.ciphers[0] == "aes128-gcm@openssh.com"
    finally:
        t.sock.close()


def test_exit_signal_crosses_the_wire(pair):
    _, _, server_chan, client_chan = pair
    sshcompat.send_exit_signal(server_chan, "KILL")
    assert client_chan.status_event.wait(10)
    assert sshcompat.exit_signal(client_chan) == "KILL"


def test_exit_status_still_handled(pair):
    _, _, server_chan, client_chan = pair
    server_chan.send_exit_status(3)
    assert client_chan.recv_exit_status() == 3
    assert sshcompat.exit_signal(client_chan) is None


def test_slow_poll_but_close_is_immediate_under_gevent():
    """With the 2 s socket poll, closing a transport must still end its reader greenlet at once under gevent."""
    script = textwrap.dedent("""
        from gevent import monkey; monkey.patch_all()
        import socket, sys, time
        sys.path.insert(0, %r)
        import paramiko
        from kiln import sshcompat
        a, b = socket.socketpair()
        st = sshcompat.Transport(a)
        st.add_server_key(paramiko.Ed25519Key.from_private_key_file(%r))
        class S(paramiko.ServerInterface):
            def get_allowed_auths(self, u): return "none"
            def check_auth_none(self, u): return paramiko.AUTH_SUCCESSFUL
        import threading; st.start_server(event=threading.Event(), server=S())
        ct = sshcompat.Transport(b)
        ct.start_client(timeout=10)
        ct.auth_none("u")
        assert st._active_check_timeout == 2.0
        time.sleep(0.3)
        started = time.monotonic()
        st.close()
        st.join(5)
        elapsed = time.monotonic() - started
        ct.close(); a.close(); b.close()
        print("alive=%%s elapsed=%%.3f" %% (st.is_alive(), elapsed))
    """) % (os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"), _host_key())
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    alive, elapsed = out.stdout.split()
    assert alive == "alive=False"
    assert float(elapsed.split("=")[1]) < 1.0


# -- the relay's fast path ---------------------------------------------------------------------------------------
from hypothesis import given, settings, strategies as st  # noqa: E402
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout  # noqa: E402


@settings(max_examples=300, deadline=None)
@given(st.lists(st.one_of(st.tuples(st.just("feed"), st.binary(max_size=40)),
                          st.tuples(st.just("read"), st.integers(min_value=1, max_value=60))), max_size=40))
def test_chunk_pipe_delivers_the_same_stream_as_buffered_pipe(ops):
    """Whatever the pattern of feeds and reads, the bytes come out in order, none lost or repeated; a read never
    returns more than asked, and returns something whenever something is buffered (it may return less than
    BufferedPipe would: whole chunks, never a copy it does not need)."""
    ours, theirs = sshcompat.ChunkPipe(), BufferedPipe()
    fed, got, got_theirs = bytearray(), bytearray(), bytearray()
    for op, arg in ops:
        if op == "feed":
            ours.feed(arg)
            theirs.feed(arg)
            fed += arg
        else:
            before = len(ours)
            out = ours.read(arg, timeout=0.0) if before else b""
            assert len(out) <= arg
            assert (len(out) > 0) == (before > 0)
            assert len(ours) == before - len(out)
            assert ours.read_ready() == (len(ours) > 0)
            got += out
            if len(theirs):
                got_theirs += theirs.read(arg, timeout=0.0)
    got += ours.empty()
    got_theirs += theirs.empty()
    assert bytes(got) == bytes(fed) == bytes(got_theirs)
    assert len(ours) == 0 and not ours.read_ready()


def test_chunk_pipe_reads_whole_chunks_without_copying():
    pipe = sshcompat.ChunkPipe()
    chunk = os.urandom(1000)
    pipe.feed(chunk)
    assert pipe.read(4096) is chunk                      # handed back as it came
    pipe.feed(b"abc")
    pipe.feed(b"defg")
    pipe.feed(b"hij")
    assert pipe.read(8) == b"abcdefg"                    # joined while whole chunks fit
    assert pipe.read(2) == b"hi"                         # the last one split
    assert pipe.read(2) == b"j"


def test_chunk_pipe_timeout_close_and_event():
    pipe = sshcompat.ChunkPipe()
    with pytest.raises(PipeTimeout):
        pipe.read(10, timeout=0.0)
    with pytest.raises(PipeTimeout):
        pipe.read(10, timeout=0.05)
    event = threading.Event()
    pipe.set_event(event)
    assert not event.is_set()
    pipe.feed(b"x")
    assert event.is_set()
    assert pipe.read(10) == b"x"
    assert not event.is_set()
    pipe.feed(b"tail")
    pipe.close()
    assert event.is_set()
    assert pipe.read(10) == b"tail"                      # data before close is still delivered
    assert pipe.read(10) == b""                          # then EOF, at once
    assert pipe.read(10, timeout=0.0) == b""


def test_chunk_pipe_wakes_a_blocked_reader():
    pipe = sshcompat.ChunkPipe()
    result = []
    reader = threading.Thread(target=lambda: result.append(pipe.read(100, timeout=10)))
    reader.start()
    threading.Timer(0.1, pipe.feed, args=(b"late",)).start()
    reader.join(10)
    assert result == [b"late"]


def test_use_chunk_pipes_keeps_what_already_arrived(pair):
    _, _, server_chan, client_chan = pair
    server_chan.sendall(b"early")
    server_chan.sendall_stderr(b"err")
    for _ in range(200):
        if client_chan.recv_ready() and client_chan.recv_stderr_ready():
            break
        threading.Event().wait(0.01)
    assert sshcompat.use_chunk_pipes(client_chan) is client_chan
    assert isinstance(client_chan.in_buffer, sshcompat.ChunkPipe)
    assert isinstance(client_chan.in_stderr_buffer, sshcompat.ChunkPipe)
    assert client_chan.recv(100) == b"early"
    assert client_chan.recv_stderr(100) == b"err"


def test_send_all_relays_megabytes_intact_over_real_channels(pair):
    """3 MiB through paramiko channels (several windows and many 32 KiB packets) with the fast path on both ends."""
    _, _, server_chan, client_chan = pair
    sshcompat.use_chunk_pipes(client_chan)
    payload = os.urandom(3 << 20)
    writer = threading.Thread(target=lambda: (sshcompat.send_all(server_chan.send, payload), server_chan.shutdown_write()))
    writer.start()
    received = bytearray()
    while True:
        data = client_chan.recv(256 * 1024)
        if not data:
            break
        received += data
    writer.join(30)
    assert bytes(received) == payload


def test_send_all_raises_instead_of_spinning_after_eof(pair):
    _, _, server_chan, _ = pair
    server_chan.shutdown_write()
    with pytest.raises(EOFError):
        sshcompat.send_all(server_chan.send, b"more")
