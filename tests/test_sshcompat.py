"""sshcompat against real paramiko transports paired over a socketpair (as paramiko's own tests do)."""
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time

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


def _transport_pair(client_window=None, ciphers=sshcompat.CIPHERS, transport_class=sshcompat.Transport):
    """(server transport, client transport, server channel, client channel, sockets) over a socketpair, as
    paramiko's own tests pair them, with an exec running."""
    a, b = socket.socketpair()
    server_t = sshcompat.harden(transport_class(a, disabled_algorithms=sshcompat.DISABLED), ciphers)
    server_t.add_server_key(paramiko.Ed25519Key.from_private_key_file(_host_key()))
    kwargs = {"default_window_size": client_window} if client_window else {}
    client_t = sshcompat.harden(transport_class(b, disabled_algorithms=sshcompat.DISABLED, **kwargs), ciphers)
    server = _Server()
    server_t.start_server(event=threading.Event(), server=server)   # returns at once; the client drives it
    client_t.start_client(timeout=10)
    client_t.auth_none("u")
    client_chan = client_t.open_session(timeout=10)
    client_chan.exec_command("x")
    server_chan = server_t.accept(10)
    assert server.exec_event.wait(10)
    return server_t, client_t, server_chan, client_chan, (a, b)


def _drain(recv):
    received = bytearray()
    while True:
        data = recv(256 * 1024)
        if not data:
            return bytes(received)
        received += data


def _relay(server_chan, client_chan, payload):
    """send_all payload from the server channel, then EOF; what the client channel read until EOF."""
    writer = threading.Thread(target=lambda: (sshcompat.send_all(server_chan, payload), server_chan.shutdown_write()))
    writer.start()
    received = _drain(client_chan.recv)
    writer.join(30)
    assert not writer.is_alive()
    return received


@pytest.fixture
def pair():
    """(server transport, client transport, server channel, client channel) with an exec running."""
    server_t, client_t, server_chan, client_chan, socks = _transport_pair()
    sshcompat.capture_exit_signal(client_t)
    yield server_t, client_t, server_chan, client_chan
    for obj in (client_chan, server_chan, client_t, server_t) + socks:
        sshcompat.close_quietly(obj)      # a test may have broken the connection on purpose


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
    a, b, c = (os.urandom(600) for _ in range(3))       # >= SMALL_FEED: kept as separate chunks
    for x in (a, b, c):
        pipe.feed(x)
    assert pipe.read(1300) == a + b                      # joined while whole chunks fit
    assert pipe.read(100) == c[:100]                     # the last one split
    assert pipe.read(1000) == c[100:]


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
    give_up = time.monotonic() + 10
    while not (client_chan.recv_ready() and client_chan.recv_stderr_ready()):
        assert time.monotonic() < give_up, "the data never arrived"
        time.sleep(0.01)
    client_chan.settimeout(10)
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
    assert _relay(server_chan, client_chan, payload) == payload


def test_send_all_raises_instead_of_spinning_after_eof(pair):
    _, _, server_chan, _ = pair
    server_chan.shutdown_write()
    with pytest.raises(EOFError):
        sshcompat.send_all(server_chan, b"more")


# -- FastPacketizer: wire-compatible with paramiko's Packetizer, and merging buffered channel data ----------------
import struct  # noqa: E402

from cryptography.hazmat.primitives.ciphers.aead import AESGCM  # noqa: E402
from paramiko.common import MSG_CHANNEL_DATA, MSG_CHANNEL_EOF, MSG_IGNORE  # noqa: E402
from paramiko.packet import Packetizer  # noqa: E402


def _gcm_pair(sender_class, receiver_class):
    """Two packetizers over a socketpair, keyed for AES-128-GCM one way (as after a key exchange)."""
    a, b = socket.socketpair()
    for s in (a, b):
        s.settimeout(5)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    key, iv = os.urandom(16), os.urandom(12)
    sender, receiver = sender_class(a), receiver_class(b)
    sender.set_outbound_cipher(AESGCM(key), 16, None, 16, None, aead=True, iv_out=iv)
    receiver.set_inbound_cipher(AESGCM(key), 16, None, 16, None, aead=True, iv_in=iv)
    return sender, receiver, (a, b)


def _data_message(chanid, data):
    m = paramiko.Message()
    m.add_byte(bytes((MSG_CHANNEL_DATA,)))
    m.add_int(chanid)
    m.add_string(data)
    return m


def _other_message(kind=MSG_CHANNEL_EOF, chanid=0):
    m = paramiko.Message()
    m.add_byte(bytes((kind,)))
    m.add_int(chanid)
    return m


@pytest.mark.parametrize("sender_class,receiver_class", [
    (sshcompat.FastPacketizer, Packetizer), (Packetizer, sshcompat.FastPacketizer),
    (sshcompat.FastPacketizer, sshcompat.FastPacketizer)], ids=["fast-to-paramiko", "paramiko-to-fast", "fast-both"])
def test_fast_packetizer_speaks_paramikos_wire_format(sender_class, receiver_class):
    sender, receiver, socks = _gcm_pair(sender_class, receiver_class)
    try:
        sizes = [0, 1, 15, 16, 17, 1000, 32768, 100000]

        def send():                          # alternate data and other messages so that nothing is merged
            for n in sizes:
                sender.send_message(_data_message(7, bytes(range(256)) * (n // 256) + b"x" * (n % 256)))
                sender.send_message(_other_message(MSG_IGNORE))
        writer = threading.Thread(target=send)
        writer.start()
        for n in sizes:
            cmd, m = receiver.read_message()
            assert cmd == MSG_CHANNEL_DATA and m.get_int() == 7
            assert m.get_binary() == bytes(range(256)) * (n // 256) + b"x" * (n % 256)
            assert receiver.read_message()[0] == MSG_IGNORE
        writer.join(10)
        assert not writer.is_alive()
    finally:
        for s in socks:
            s.close()


def test_fast_packetizer_merges_buffered_channel_data_in_order():
    sender, receiver, socks = _gcm_pair(Packetizer, sshcompat.FastPacketizer)
    try:
        chunks = [os.urandom(8192) for _ in range(10)]
        for c in chunks[:6]:
            sender.send_message(_data_message(3, c))
        sender.send_message(_other_message(MSG_CHANNEL_EOF, 3))      # stops a merge, comes next on its own
        for c in chunks[6:8]:
            sender.send_message(_data_message(3, c))
        for c in chunks[8:]:
            sender.send_message(_data_message(4, c))                   # another channel: never merged with 3
        socks[1].settimeout(None)
        got = []
        while len(got) < 4 or sum(len(d or b"") for _, (_, d), _ in got) < 10 * 8192:
            cmd, m = receiver.read_message()
            if cmd == MSG_CHANNEL_DATA:
                got.append((cmd, (m.get_int(), m.get_binary()), m.seqno))
            else:
                got.append((cmd, (m.get_int(), None), m.seqno))
        # all buffered by the first read (it reads ahead): 6 packets -> 1 message, then EOF, 2 -> 1, 2 -> 1
        assert [(c, ch) for c, (ch, _), _ in got] == [(MSG_CHANNEL_DATA, 3), (MSG_CHANNEL_EOF, 3),
                                                      (MSG_CHANNEL_DATA, 3), (MSG_CHANNEL_DATA, 4)]
        assert got[0][1][1] == b"".join(chunks[:6])
        assert got[2][1][1] == b"".join(chunks[6:8])
        assert got[3][1][1] == b"".join(chunks[8:])
        assert [s for _, _, s in got] == [0, 6, 7, 9]          # each message keeps its first packet's number
    finally:
        for s in socks:
            s.close()


def test_fast_packetizer_refuses_oversized_and_forged_packets():
    sender, receiver, socks = _gcm_pair(Packetizer, sshcompat.FastPacketizer)
    try:
        socks[0].sendall(struct.pack(">I", sshcompat.MAX_PACKET + 16) + b"\0" * 64)
        with pytest.raises(paramiko.SSHException, match="too large"):
            receiver.read_message()
    finally:
        for s in socks:
            s.close()
    sender, receiver, socks = _gcm_pair(Packetizer, sshcompat.FastPacketizer)
    try:
        sender.send_message(_data_message(1, b"hello"))
        wire = socks[1].recv(4096)
        forged = wire[:-1] + bytes((wire[-1] ^ 1,))                  # flip one bit of the tag
        receiver._rbuf += forged
        with pytest.raises(paramiko.SSHException, match="Mismatched MAC"):
            receiver.read_message()
    finally:
        for s in socks:
            s.close()


def test_fast_packetizer_survives_rekeys_mid_transfer(monkeypatch):
    """Rekey every 256 KiB (paramiko's limit is 512 MiB) while 4 MiB cross a fast-path transport pair."""
    monkeypatch.setattr(Packetizer, "REKEY_BYTES", 256 * 1024)
    monkeypatch.setattr(sshcompat, "REKEY_BYTES_FREE", 256 * 1024)     # the client's rekeys are by volume too
    server_t, client_t, server_chan, client_chan, socks = _transport_pair()
    try:
        sshcompat.use_chunk_pipes(client_chan)
        engine_before = client_t.packetizer._Packetizer__block_engine_in
        payload = os.urandom(4 << 20)
        assert _relay(server_chan, client_chan, payload) == payload
        assert client_t.packetizer._Packetizer__block_engine_in is not engine_before     # new keys were taken
        assert isinstance(client_t.packetizer, sshcompat.FastPacketizer)
    finally:
        for obj in (client_t, server_t) + socks:
            obj.close()


def test_fast_packetizer_other_ciphers_take_paramikos_path():
    """CTR + HMAC (what proxy.ciphers may add for old clients) goes through paramiko's own read/send code."""
    server_t, client_t, server_chan, client_chan, socks = _transport_pair(ciphers=("aes128-ctr",))
    try:
        assert client_t.remote_cipher == "aes128-ctr"
        payload = os.urandom(1 << 20)
        sshcompat.send_all(client_chan, payload)
        received = bytearray()
        while len(received) < len(payload):
            received += server_chan.recv(65536)
        assert bytes(received) == payload
    finally:
        for obj in (client_t, server_t) + socks:
            obj.close()


def test_send_all_batches_stdout_and_stderr_through_a_small_window():
    """A 40,000-byte window (one and a bit packets): send_all must wait for window adjusts between batches, never
    hold reserved data while waiting, and keep both streams intact."""
    server_t, client_t, server_chan, client_chan, socks = _transport_pair(client_window=40000)
    try:
        sshcompat.use_chunk_pipes(client_chan)
        out, err = os.urandom(2 << 20), os.urandom(300 * 1024)

        def write():
            sshcompat.send_all(server_chan, out[:1 << 20])
            sshcompat.send_all(server_chan, err, stderr=True)
            sshcompat.send_all(server_chan, out[1 << 20:])
            server_chan.shutdown_write()
            server_chan.send_exit_status(0)
        writer = threading.Thread(target=write)
        writer.start()
        got_err = []
        reader = threading.Thread(target=lambda: got_err.append(_drain(client_chan.recv_stderr)))
        reader.start()
        assert _drain(client_chan.recv) == out
        reader.join(30)
        writer.join(30)
        assert got_err == [err]
        assert client_chan.recv_exit_status() == 0
    finally:
        for obj in (client_t, server_t) + socks:
            obj.close()


def test_send_all_on_a_plain_paramiko_transport():
    """Outside KilnProxy's transports (no FastPacketizer) send_all falls back to Channel.send."""
    server_t, client_t, server_chan, client_chan, socks = _transport_pair(transport_class=paramiko.Transport)
    try:
        assert not isinstance(server_t.packetizer, sshcompat.FastPacketizer)
        payload = os.urandom(500 * 1024)
        assert _relay(server_chan, client_chan, payload) == payload
    finally:
        for obj in (client_t, server_t) + socks:
            obj.close()


def test_chunk_pipe_coalesces_small_packets():
    """1-byte packets (a client typing, or an attack) share one buffer instead of a bytes object each."""
    pipe = sshcompat.ChunkPipe()
    for i in range(3000):
        pipe.feed(bytes((i % 256,)))
    assert len(pipe._chunks) == 1 and len(pipe) == 3000
    big = os.urandom(4096)
    pipe.feed(big)
    pipe.feed(b"z")
    assert len(pipe._chunks) == 3
    out = pipe.read(1 << 20)
    assert type(out) is bytes and out == bytes(i % 256 for i in range(3000)) + big + b"z"


def test_fast_packetizer_refuses_huge_cleartext_lengths():
    """Before the first key exchange paramiko's reader asks for whatever length the peer announced."""
    a, b = socket.socketpair()
    try:
        receiver = sshcompat.FastPacketizer(b)
        b.settimeout(5)
        a.sendall(struct.pack(">I", 0x7FFFFFF4) + b"\x04" + b"\0" * 4096)
        with pytest.raises(paramiko.SSHException, match="too large"):
            receiver.read_message()
        assert len(receiver._rbuf) < 64 * 1024
    finally:
        a.close()
        b.close()


def test_fast_packetizer_refuses_packets_that_are_not_whole_blocks():
    sender, receiver, socks = _gcm_pair(Packetizer, sshcompat.FastPacketizer)
    try:
        socks[0].sendall(struct.pack(">I", 0) + b"\0" * 16)
        with pytest.raises(paramiko.SSHException, match="blocking"):
            receiver.read_message()
    finally:
        for s in socks:
            s.close()


def test_batches_are_valid_packets_for_paramikos_reader_and_on_the_wire():
    """A _Batch of channel data (send_all's unit) read back by paramiko's own Packetizer, and the raw bytes checked
    against RFC 4253/5647 rules paramiko does not check: whole AES blocks, 4 to 19 bytes of padding."""
    a, b = socket.socketpair()
    for sock in (a, b):
        sock.settimeout(5)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
    key, iv = os.urandom(16), os.urandom(12)
    sender = sshcompat.FastPacketizer(a)
    sender.set_outbound_cipher(AESGCM(key), 16, None, 16, None, aead=True, iv_out=iv)
    sizes = [1, 15, 16, 17, 100, 32704]
    datas = [os.urandom(n) for n in sizes]
    header = bytes((MSG_CHANNEL_DATA,)) + struct.pack(">I", 5)
    try:
        sender.send_message(sshcompat._Batch([(header + struct.pack(">I", len(d)), memoryview(d)) for d in datas]))
        wire = bytearray()
        while True:
            try:
                chunk = b.recv(1 << 20)
            except socket.timeout:
                break
            wire += chunk
            if len(wire) >= sum(4 + 16 + len(d) + 9 + 1 + 4 for d in datas):
                b.settimeout(0.2)
        # replay the raw bytes into paramiko's reader
        c, d = socket.socketpair()
        for sock in (c, d):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 21)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 21)
        d.settimeout(5)
        reader = Packetizer(d)
        reader.set_inbound_cipher(AESGCM(key), 16, None, 16, None, aead=True, iv_in=iv)
        c.sendall(bytes(wire))
        for n, data in zip(sizes, datas):
            cmd, m = reader.read_message()
            assert cmd == MSG_CHANNEL_DATA and m.get_int() == 5 and m.get_binary() == data
        c.close()
        d.close()
        # and check every packet's framing by hand
        engine, nonce, offset = AESGCM(key), iv, 0
        for data in datas:
            size = struct.unpack_from(">I", wire, offset)[0]
            assert size % 16 == 0 and size >= 16
            plain = engine.decrypt(nonce, bytes(wire[offset + 4:offset + 4 + size + 16]), bytes(wire[offset:offset + 4]))
            assert 4 <= plain[0] <= 19 and plain[1] == MSG_CHANNEL_DATA
            offset += 4 + size + 16
            nonce = nonce[:4] + (int.from_bytes(nonce[4:], "big") + 1).to_bytes(8, "big")
        assert offset == len(wire)
    finally:
        a.close()
        b.close()


class _StalledSocket:
    """Takes 1,000 bytes, then the writer is interrupted (as a gevent kill interrupts a blocked send)."""

    def __init__(self, interrupt):
        self.interrupt, self.sent, self.closed = interrupt, 0, False

    def send(self, data):
        if self.sent:
            raise self.interrupt
        self.sent = 1000
        return 1000

    def close(self):
        self.closed = True


class _Killed(BaseException):
    pass


def test_a_write_cut_short_closes_the_connection():
    """The peer would wait for the rest of the packet and read the next one as its tail: every channel on the
    connection (a pooled backend connection carries several sessions) would break later, and obscurely."""
    sock = _StalledSocket(_Killed())
    packetizer = sshcompat.FastPacketizer(sock)
    with pytest.raises(_Killed):
        packetizer.write_all(b"x" * 5000)
    assert sock.closed and packetizer.closed


def test_a_write_interrupted_before_any_byte_leaves_the_connection_open():
    class Untouched(_StalledSocket):
        def send(self, data):
            raise self.interrupt
    sock = Untouched(_Killed())
    packetizer = sshcompat.FastPacketizer(sock)
    with pytest.raises(_Killed):
        packetizer.write_all(b"x" * 5000)
    assert not sock.closed and not packetizer.closed


# -- the security model's bounds (README "Security model") --------------------------------------------------------
def _cleartext_packet(payload):
    """An RFC 4253 binary packet before any key exchange (block size 8, no MAC)."""
    padding = 8 - (len(payload) + 5) % 8
    padding += 8 if padding < 4 else 0
    return struct.pack(">IB", len(payload) + padding + 1, padding) + payload + b"\0" * padding


def test_banner_line_is_bounded_and_read_in_linear_time():
    a, b = socket.socketpair()
    try:
        receiver = sshcompat.FastPacketizer(b)
        b.settimeout(5)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        a.sendall(b"SSH-2.0-" + b"x" * (sshcompat.MAX_BANNER_LINE + 100))     # no newline
        with pytest.raises(sshcompat.ProtocolViolation, match="longer than 8192"):
            receiver.readline(5)
        assert len(receiver._rbuf) < 2 * sshcompat.MAX_BANNER_LINE         # read no further than the bound
    finally:
        a.close()
        b.close()


def test_banner_lines_before_the_identification_are_bounded():
    a, b = socket.socketpair()
    try:
        receiver = sshcompat.FastPacketizer(b)
        b.settimeout(5)
        a.sendall(b"hello\r\n" * (sshcompat.MAX_BANNER_LINES + 1))
        for _ in range(sshcompat.MAX_BANNER_LINES):
            assert receiver.readline(5) == "hello"
        with pytest.raises(sshcompat.ProtocolViolation, match="lines before"):
            receiver.readline(5)
    finally:
        a.close()
        b.close()


def test_banner_then_packets_keep_every_byte():
    a, b = socket.socketpair()
    try:
        receiver = sshcompat.FastPacketizer(b)
        b.settimeout(5)
        ignore = bytes((paramiko.common.MSG_IGNORE,)) + struct.pack(">I", 3) + b"abc"
        a.sendall(b"SSH-2.0-Test_1.0\r\n" + _cleartext_packet(ignore))
        assert receiver.readline(5) == "SSH-2.0-Test_1.0"
        ptype, m = receiver.read_message()
        assert ptype == paramiko.common.MSG_IGNORE and m.get_binary() == b"abc"
    finally:
        a.close()
        b.close()


def test_bytes_before_authentication_are_bounded():
    a, b = socket.socketpair()
    try:
        receiver = sshcompat.FastPacketizer(b)
        receiver.recv_limit = 64 * 1024
        b.settimeout(5)
        a.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 20)
        ignore = bytes((paramiko.common.MSG_IGNORE,)) + struct.pack(">I", 1000) + b"i" * 1000
        a.sendall(_cleartext_packet(ignore) * 100)
        with pytest.raises(sshcompat.ProtocolViolation, match="before authenticating"):
            for _ in range(100):
                receiver.read_message()
        assert receiver._received <= 64 * 1024 + sshcompat.READ_AHEAD
    finally:
        a.close()
        b.close()


def test_a_fast_sender_lets_other_greenlets_run():
    """With input always waiting a reader never blocks; it must still hand the loop to others every so often."""
    import gevent
    import gevent.socket
    a, b = gevent.socket.socketpair()
    ticks, done = [], [0]
    try:
        receiver = sshcompat.FastPacketizer(b)
        ignore = bytes((paramiko.common.MSG_IGNORE,)) + struct.pack(">I", 100) + b"i" * 100
        burst = _cleartext_packet(ignore) * 2000          # ~240 KB, all buffered before the reader starts
        sender = gevent.spawn(a.sendall, burst)
        def tick():
            for _ in range(100000):
                ticks.append(done[0])
                gevent.sleep(0)

        ticker = gevent.spawn(tick)
        gevent.sleep(0.05)
        ticks.clear()
        for _ in range(2000):
            receiver.read_message()
            done[0] += 1
        sender.join(5)
        ticker.kill()
        # the ticker ran while the reader was busy, not only after it finished
        assert len(ticks) >= 2000 // sshcompat.YIELD_PACKETS - 2
        assert len(set(t for t in ticks if 0 < t < 2000)) > 10
    finally:
        a.close()
        b.close()


def test_window_overrun_drops_the_connection(pair):
    server_t, client_t, server_chan, client_chan = pair
    window = server_chan.in_window_size
    chunk = b"w" * 32768
    m_for = lambda kind: _raw_channel_message(kind, client_chan.remote_chanid, chunk)  # noqa: E731
    for i in range(window // len(chunk) + 8):          # ignore out_window_size: send past it
        try:
            client_t._send_user_message(m_for(MSG_CHANNEL_DATA))
        except (EOFError, OSError, paramiko.SSHException):
            break
    deadline = time.monotonic() + 10
    while server_t.is_active() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not server_t.is_active()
    assert isinstance(server_t.get_exception(), sshcompat.ProtocolViolation)
    assert len(server_chan.in_buffer) <= window


def test_client_stderr_is_discarded_but_its_window_comes_back(pair):
    server_t, client_t, server_chan, client_chan = pair
    window = server_chan.in_window_size
    sender = threading.Thread(target=lambda: (client_chan.sendall_stderr(b"e" * (window * 3 // 4)),
                                              client_chan.sendall(b"x")))
    sender.start()
    assert server_chan.recv(10) == b"x"                 # the stdin read gives the discarded bytes back
    sender.join(10)
    assert len(server_chan.in_stderr_buffer) == 0
    more = threading.Thread(target=client_chan.sendall_stderr, args=(b"f" * (window * 3 // 4),))
    more.start()                                        # would block forever on a window never given back
    more.join(10)
    assert not more.is_alive() and server_t.is_active()
    client_chan.sendall(b"y")
    assert server_chan.recv(10) == b"y"


def test_client_rekeys_are_rate_limited(pair, monkeypatch):
    server_t, client_t, _, _ = pair
    for _ in range(sshcompat.REKEY_BURST):
        client_t.renegotiate_keys()
    assert server_t.is_active()
    with pytest.raises((EOFError, paramiko.SSHException)):
        client_t.renegotiate_keys()
    deadline = time.monotonic() + 10
    while server_t.is_active() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert "too many key re-exchanges" in str(server_t.get_exception())


def test_banner_does_not_name_the_library():
    t = sshcompat.Transport(socket.socket(), disabled_algorithms=sshcompat.DISABLED)
    try:
        assert t.local_version == "SSH-2.0-KilnProxy"
        assert not [k for k in t.preferred_kex if k.startswith("diffie-hellman")]
    finally:
        t.sock.close()


def _raw_channel_message(kind, chanid, data):
    m = paramiko.Message()
    m.add_byte(bytes((kind,)))
    m.add_int(chanid)
    m.add_string(data)
    return m


def test_probe_finds_every_private_name_on_the_pinned_paramiko():
    missing = sshcompat.probe()
    assert missing == {feature: [] for feature in sshcompat.PRIVATE_NAMES}
    assert sum(len(v) for v in sshcompat.PRIVATE_NAMES.values()) > 40


def test_configure_turns_off_what_a_paramiko_lacks(monkeypatch, caplog):
    import logging
    names = {k: tuple(v) for k, v in sshcompat.PRIVATE_NAMES.items()}
    names["fast"] += ("Packetizer._Packetizer__renamed",)
    names["window"] += ("Channel.in_window_gone",)
    monkeypatch.setattr(sshcompat, "FEATURES", dict(sshcompat.FEATURES))
    with caplog.at_level(logging.WARNING):
        missing = sshcompat.configure(logging.getLogger("test.guard"), names)
    assert missing["fast"] == ["Packetizer._Packetizer__renamed"] and missing["window"] == ["Channel.in_window_gone"]
    assert sshcompat.FEATURES["fast"] is False and sshcompat.FEATURES["window"] is False
    assert sshcompat.FEATURES["reader"] is True
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "Packetizer._Packetizer__renamed: fast off" in text and "windows are NOT enforced" in text
    # with the fast path off, channels keep paramiko's pipes and send_all takes paramiko's per-packet path
    server_t, client_t, server_chan, client_chan, socks = _transport_pair()
    try:
        assert sshcompat.use_chunk_pipes(client_chan).in_buffer.__class__ is not sshcompat.ChunkPipe
        payload = os.urandom(300000)
        assert _relay(server_chan, client_chan, payload) == payload
    finally:
        for obj in (client_t, server_t) + socks:
            obj.close()


def test_close_cancels_the_handshake_timer():
    """paramiko cancels its 15 s handshake timer only when a handshake completes; a failed one left it running."""
    a, b = socket.socketpair()
    try:
        p = sshcompat.FastPacketizer(b)
        p.start_handshake(15)
        timer = p._Packetizer__timer
        assert timer.is_alive()
        p.close()
        timer.join(5)
        assert not timer.is_alive()
    finally:
        a.close()
        b.close()
