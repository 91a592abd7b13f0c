"""The few places where KilnProxy needs more of SSH than paramiko's public API offers.

paramiko's Channel can send `exit-status` but not `exit-signal`, and on the client side it drops an incoming
`exit-signal` (a backend command killed by a signal would look like "no status"). Both are RFC 4254 section 6.10
channel requests; this module builds and reads them with paramiko's own Message type, and is the only module that
touches paramiko internals (`Channel.remote_chanid`, `Transport._send_user_message`,
`Transport._channel_handler_table`, `Transport._active_check_timeout`, `Channel.in_buffer` and the BufferedPipe's
`_lock`, `_cv`, `_event` and `_closed`).

It also holds the relay's fast path, measured with tools/bench.py and py-spy (BENCHMARKS.md): paramiko's BufferedPipe
and Channel.sendall copy every relayed byte several times (ChunkPipe and send_all below avoid that). Tested in tests/test_sshcompat.py against real paramiko transports.
"""
import time

import paramiko
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout
from paramiko.common import MSG_CHANNEL_REQUEST, cMSG_CHANNEL_REQUEST

# What a paramiko transport, channel or their socket raises when the peer or the connection goes away.
SSH_ERRORS = (paramiko.SSHException, EOFError, OSError)


def close_quietly(obj):
    """Close a socket, transport, channel or process handle that may be None or already broken (idempotent)."""
    if obj is not None:
        try:
            obj.close()
        except SSH_ERRORS:
            pass


# The algorithms KilnProxy negotiates, both sides: AES-GCM first (fastest here), no CBC, no 3DES, no SHA-1 or MD5 MACs.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr")
# Toward clients the *client's* order decides, and OpenSSH lists aes*-ctr before aes*-gcm: offering CTR at all means
# OpenSSH clients pick it, at ~25% less relay throughput (BENCHMARKS.md). Every current client does AES-GCM
# (OpenSSH >= 6.2, PuTTY >= 0.76, libssh, Go, MINA); proxy.ciphers can add CTR back for legacy ones.
CLIENT_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com", "hmac-sha2-256", "hmac-sha2-512")
DISABLED = {
    "ciphers": ["aes128-cbc", "aes192-cbc", "aes256-cbc", "3des-cbc"],
    "macs": ["hmac-sha1", "hmac-md5", "hmac-sha1-96", "hmac-md5-96"],
    "kex": ["diffie-hellman-group1-sha1", "diffie-hellman-group14-sha1", "diffie-hellman-group-exchange-sha1"],
    "keys": ["ssh-rsa", "ssh-dss"],
    "pubkeys": ["ssh-rsa", "ssh-dss"],
}


# Toward the backend we are the client and choose how big the server's data packets may be: fewer, bigger packets
# mean fewer per-packet costs in paramiko's packetizer (measured with tools/bench.py; see BENCHMARKS.md).
BACKEND_MAX_PACKET = 128 * 1024
BACKEND_WINDOW = 4 * 1024 * 1024


class Transport(paramiko.Transport):
    """paramiko's Transport with a longer socket poll.

    paramiko's reader loop wakes every `_active_check_timeout` (0.1 s) on an idle connection just to look at its
    own closed flag: 10 wake-ups a second per session, ~5% of a core at 1,000 idle sessions. Under gevent, closing the
    socket (Transport.close does) wakes a blocked reader at once, so the poll only paces keepalive and rekey checks,
    for which 2 s is ample. Set on the class because paramiko applies it in __init__.
    """
    _active_check_timeout = 2.0


def harden(transport, ciphers=CIPHERS):
    """Restrict a Transport to the algorithms above, in KilnProxy's order of preference."""
    opts = transport.get_security_options()
    opts.ciphers = [c for c in ciphers if c in opts.ciphers]
    opts.digests = [m for m in MACS if m in opts.digests]
    return transport


def send_exit_signal(channel, signame, core_dumped=False, message=""):
    """Send RFC 4254 `exit-signal` (signame without the SIG prefix, e.g. 'KILL')."""
    m = paramiko.Message()
    m.add_byte(cMSG_CHANNEL_REQUEST)
    m.add_int(channel.remote_chanid)
    m.add_string("exit-signal")
    m.add_boolean(False)
    m.add_string(signame)
    m.add_boolean(core_dumped)
    m.add_string(message)
    m.add_string("")
    channel.transport._send_user_message(m)


def _handle_request(channel, m):
    start = m.packet.tell()
    if m.get_text() == "exit-signal":
        m.get_boolean()
        channel.kiln_exit_signal = m.get_text()
        channel.status_event.set()
        return
    m.packet.seek(start)
    paramiko.Channel._handle_request(channel, m)


def capture_exit_signal(transport):
    """Make this client Transport record a peer's `exit-signal` as channel.kiln_exit_signal (e.g. 'TERM')."""
    table = dict(type(transport)._channel_handler_table)
    table[MSG_CHANNEL_REQUEST] = _handle_request
    transport._channel_handler_table = table
    return transport


def exit_signal(channel):
    return getattr(channel, "kiln_exit_signal", None)


# -- the relay's fast path ---------------------------------------------------------------------------------------
class ChunkPipe(BufferedPipe):
    """A drop-in BufferedPipe that keeps received data as the bytes objects it came in.

    paramiko's BufferedPipe appends every received packet to one array (a copy, and a realloc as it grows), and a
    read copies twice and then moves the rest of the array to the front: with a 4 MiB window full of backend output
    that move alone was 8% of the proxy's CPU in a 1 GB fetch (py-spy). Here a read hands back a received chunk
    as it is when it fits (no copy), joins several when they fit together, and splits only the last one. Same
    locking, blocking, timeout, event and close semantics as the base class, whose lock and condition it uses.
    """

    def __init__(self):
        super().__init__()
        self._buffer = None      # the base class's array: unused here, and any code path still using it fails loudly
        self._chunks = []
        self._size = 0

    def set_event(self, event):
        with self._lock:
            self._event = event
            if self._closed or self._size:
                event.set()
            else:
                event.clear()

    def feed(self, data):
        with self._lock:
            if self._event is not None:
                self._event.set()
            if data:
                self._chunks.append(bytes(data))
                self._size += len(data)
            self._cv.notify_all()

    def read_ready(self):
        with self._lock:
            return self._size > 0

    def read(self, nbytes, timeout=None):
        with self._lock:
            if not self._size:
                if self._closed:
                    return b""
                if timeout == 0.0:
                    raise PipeTimeout()
                while not self._size and not self._closed:
                    then = time.time()
                    self._cv.wait(timeout)
                    if timeout is not None:
                        timeout -= time.time() - then
                        if timeout <= 0.0:
                            raise PipeTimeout()
            out = self._take(nbytes)
            if not self._size and self._event is not None and not self._closed:
                self._event.clear()
            return out

    def _take(self, nbytes):
        chunks = self._chunks
        if not chunks or nbytes <= 0:
            return b""
        first = chunks[0]
        if len(first) > nbytes:                     # split the first chunk: the only partial copy
            chunks[0] = first[nbytes:]
            self._size -= nbytes
            return first[:nbytes]
        taken, count = len(first), 1
        while count < len(chunks) and taken + len(chunks[count]) <= nbytes:
            taken += len(chunks[count])
            count += 1
        out = first if count == 1 else b"".join(chunks[:count])
        del chunks[:count]
        self._size -= taken
        return out

    def empty(self):
        with self._lock:
            out = b"".join(self._chunks)
            self._chunks = []
            self._size = 0
            if self._event is not None and not self._closed:
                self._event.clear()
            return out

    def __len__(self):
        with self._lock:
            return self._size


def use_chunk_pipes(channel):
    """Give a channel ChunkPipes for its stdout and stderr, moving over anything already received (the caller runs
    between two switches, so nothing can arrive while it swaps). Returns the channel."""
    for name in ("in_buffer", "in_stderr_buffer"):
        old = getattr(channel, name)
        if isinstance(old, ChunkPipe):
            continue
        new = ChunkPipe()
        pending = old.empty()
        if pending:
            new.feed(pending)
        if old._closed:
            new.close()
        setattr(channel, name, new)
    return channel


def send_all(send, data):
    """Channel.sendall / sendall_stderr without their copies: paramiko's loop re-slices the unsent rest of the data
    after every packet (a 256 KiB read sent as 32 KiB packets was copied 3.5 times over); memoryview slices copy
    nothing, and paramiko's Message takes them as they are. `send` is channel.send or channel.send_stderr.
    Raises EOFError when the channel can take no more (closed, or EOF already sent), where paramiko's own loop
    would spin."""
    view = memoryview(data)
    while view:
        sent = send(view)
        if not sent:
            raise EOFError("channel closed")
        view = view[sent:]
