"""The few places where KilnProxy needs more of SSH than paramiko's public API offers: the only module that touches
paramiko internals. `PRIVATE_NAMES` (end of this module) lists every private name it uses, by what it serves, and
`configure()` probes them at start-up: what a different paramiko lacks is switched off with one WARNING that says so
(the relay fast path falls back to paramiko's own, slower code).

- exit-signal: paramiko's Channel can send `exit-status` but not `exit-signal`, and on the client side it drops an
  incoming `exit-signal` (a backend command killed by a signal would look like "no status"). Both are RFC 4254
  section 6.10 channel requests, built and read here with paramiko's own Message type.
- The bounds of the security model (README): an identification line read in linear time and bounded, a limit on
  what a peer may send before authenticating, a yield to the event loop every so much input, channel windows
  enforced, client stderr discarded, client rekeys rate-limited, no finite-field Diffie-Hellman.
- The relay's fast path, measured with tools/bench.py and py-spy (BENCHMARKS.md): paramiko's BufferedPipe,
  Channel.sendall and Packetizer copy every relayed byte several times and pay Python's per-call costs once per SSH
  packet; ChunkPipe, send_all and FastPacketizer below avoid most of that. Tested in tests/test_sshcompat.py against
  paramiko's own Packetizer and real paramiko transports, and end to end against OpenSSH by the e2e tests.
"""
import errno
import os
import socket
import struct
import threading
import time

import gevent
import paramiko
from cryptography.exceptions import InvalidTag
from paramiko.buffered_pipe import BufferedPipe, PipeTimeout
from paramiko.common import (MSG_CHANNEL_DATA as _MSG_DATA, MSG_CHANNEL_EXTENDED_DATA, MSG_CHANNEL_REQUEST,
                             MSG_KEXINIT, cMSG_CHANNEL_REQUEST, xffffffff)
from paramiko.common import MSG_NEWKEYS
from paramiko.message import Message
from paramiko.packet import NeedRekeyException, Packetizer

# What a paramiko transport, channel or their socket raises when the peer or the connection goes away.
SSH_ERRORS = (paramiko.SSHException, EOFError, OSError)


DONE, FAILED, TIMED_OUT = "done", "failed", "timed out"


def bounded(seconds, fn, *args):
    """fn(*args) for at most `seconds` under a Timeout of its own: DONE, FAILED (it raised one of SSH_ERRORS) or
    TIMED_OUT. paramiko's sends can wait for ever (a peer whose window is 0) or 30 s (a key exchange); only this
    call's own Timeout is caught, any other (a caller's deadline) goes on up."""
    timer = gevent.Timeout(seconds)
    timer.start()
    try:
        fn(*args)
    except SSH_ERRORS:
        return FAILED
    except gevent.Timeout as t:
        if t is not timer:
            raise
        return TIMED_OUT
    finally:
        timer.close()
    return DONE


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
    # Finite-field Diffie-Hellman costs 100+ ms of pure-Python pow per exchange on the event loop and nothing to a
    # client that sends a constant e (DHEat, CVE-2002-20001); the group-exchange one also needs a moduli file that
    # paramiko's server does not have. curve25519 (~2 ms), mlkem768x25519 (~3 ms) and ECDH serve every current
    # client (OpenSSH >= 6.5, PuTTY >= 0.68, Go, JSch >= 0.1.54 with ecdh).
    "kex": ["diffie-hellman-group1-sha1", "diffie-hellman-group14-sha1", "diffie-hellman-group-exchange-sha1",
            "diffie-hellman-group14-sha256", "diffie-hellman-group16-sha512", "diffie-hellman-group18-sha512",
            "diffie-hellman-group-exchange-sha256"],
    "keys": ["ssh-rsa", "ssh-dss"],
    "pubkeys": ["ssh-rsa", "ssh-dss"],
}


# Toward the backend we are the client and choose how big the server's data packets may be: fewer, bigger packets
# mean fewer per-packet costs in paramiko's packetizer (measured with tools/bench.py; see BENCHMARKS.md).
BACKEND_MAX_PACKET = 128 * 1024
BACKEND_WINDOW = 4 * 1024 * 1024


class ProtocolViolation(paramiko.SSHException):
    """The peer broke a rule that bounds what one connection may cost the proxy; the connection is dropped."""


# What one connection may make the proxy do (the security review, README "Security model"):
PREAUTH_LIMIT = 256 * 1024       # bytes a peer may send before it has authenticated (a real login is < 50 KiB)
REKEY_BURST = 3                  # key exchanges a client may start after the first one ...
REKEY_REFILL = 60.0              # ... one more per this many seconds (each costs the proxy ~2-3 ms of CPU) ...
REKEY_BYTES_FREE = 64 * 1024 * 1024   # ... and one whenever this much crossed the connection since its last one
                                      # (OpenSSH rekeys by volume, every 1-4 GB by default)


def _channel_data(channel, m):
    data = m.get_binary()
    _check_window(channel, len(data))
    channel.in_buffer.feed(data)


def _channel_extended_data(channel, m):
    code = m.get_int()
    data = m.get_binary()
    _check_window(channel, len(data))
    if channel.transport.server_mode:
        # A client's stderr has no reader (the relay forwards stdin only): drop it, but as consumed, so that
        # the window is given back with the next stdin read instead of the data piling up.
        channel.in_window_sofar += len(data)
        return
    if code != 1:
        return
    if channel.combine_stderr:
        channel.in_buffer.feed(data)
    else:
        channel.in_stderr_buffer.feed(data)


def _check_window(channel, n):
    """A peer may send only what the window we granted allows: received-but-unread bytes plus read bytes we have
    not yet given back. paramiko buffers whatever arrives (a client ignoring the window grew the proxy by 3 GB)."""
    used = len(channel.in_buffer) + len(channel.in_stderr_buffer) + channel.in_window_sofar + n
    if used > channel.in_window_size:
        raise ProtocolViolation("peer ignored channel window (%d bytes over %d)" % (used, channel.in_window_size))


class Transport(paramiko.Transport):
    """paramiko's Transport with a longer socket poll, the FastPacketizer below (through paramiko's own
    `packetizer_class` argument), and the bounds of the security model: channel windows enforced, client stderr
    discarded, at most PREAUTH_LIMIT bytes before authentication, peer-initiated rekeys rate-limited, and a banner
    that does not name our library's version.

    paramiko's reader loop wakes every `_active_check_timeout` (0.1 s) on an idle connection just to look at its
    own closed flag: 10 wake-ups a second per session, ~5% of a core at 1,000 idle sessions. Under gevent, closing the
    socket (Transport.close does) wakes a blocked reader at once, so the poll only paces keepalive and rekey checks,
    for which 2 s is ample. Set on the class because paramiko applies it in __init__.
    """
    _active_check_timeout = 2.0
    _CLIENT_ID = "KilnProxy"
    _channel_handler_table = dict(paramiko.Transport._channel_handler_table)
    _channel_handler_table[_MSG_DATA] = _channel_data
    _channel_handler_table[MSG_CHANNEL_EXTENDED_DATA] = _channel_extended_data

    def _send_user_message(self, data):
        """paramiko's, except on the transport's own (reader) thread during a key exchange. paramiko answers a
        peer's CHANNEL_CLOSE (also a refused channel request, and a request that wants a reply) from the reader,
        and its _send_user_message waits for the exchange to end, which only the reader can make happen
        (paramiko#822): a pooled backend connection that rekeyed (every 512 MiB) as a session ended stood still for
        clear_to_send_timeout (30 s), then died with "Key-exchange timed out". Channel opens on it missed the dial
        timeout, its sessions hit their idle timeout and then hung in close (issue 11). Held here, those replies
        go out right after the new keys are in, as RFC 4253 7.1 wants."""
        if FEATURES["kex"] and threading.current_thread() is self and not self.clear_to_send.is_set():
            self._held.append(data)
            return
        super()._send_user_message(data)

    def _parse_newkeys_then_send_held(self, m):
        paramiko.Transport._parse_newkeys(self, m)
        held, self._held = self._held, []
        for data in held:
            # straight out under paramiko's gate lock, not through _send_user_message: its clear_to_send.wait(),
            # right after this thread set that event, parks the thread until gevent has woken the event's other
            # waiters, and a reader parked there did not come back (8 s and counting in a greenlet dump; its
            # connection stood still)
            with self.clear_to_send_lock:
                if not self.active:
                    return
                self._send_message(data)

    def __init__(self, sock, *args, preauth_limit=None, banner_sent=False, **kwargs):
        """preauth_limit: bytes the peer may send before authenticating. banner_sent: the caller already wrote
        `banner()` to the socket (a server does, before waiting for a handshake slot, so that clients whose
        ConnectTimeout also covers the banner exchange wait for the slot instead of giving up)."""
        if FEATURES["reader"]:
            kwargs.setdefault("packetizer_class", FastPacketizer)
        super().__init__(sock, *args, **kwargs)
        self._held = []              # the reader's replies held back during a key exchange (_send_user_message)
        if FEATURES["kex"]:
            self._handler_table[MSG_NEWKEYS] = self._parse_newkeys_then_send_held
        if isinstance(self.packetizer, FastPacketizer):
            self.packetizer.recv_limit = preauth_limit
            if banner_sent:
                self.packetizer.skip_write = (self.local_version + "\r\n").encode()
        elif banner_sent:
            raise ValueError("banner_sent needs the FastPacketizer")
        if not FEATURES["window"]:
            self._channel_handler_table = paramiko.Transport._channel_handler_table
        self._kexinits = 0
        self._rekey_tokens = float(REKEY_BURST)
        self._rekey_clock = time.monotonic()
        self._rekey_received = 0
        if FEATURES["kex"]:
            self._handler_table[MSG_KEXINIT] = self._rate_limited_kexinit

    def _rate_limited_kexinit(self, m):
        """Clients may start key re-exchanges only so often (server side; a backend is trusted to rekey)."""
        self._kexinits += 1
        if self.server_mode and self._kexinits > 1 and self.local_kex_init is None:   # the client starts one
            if not self.authenticated:
                raise ProtocolViolation("key re-exchange before authentication")
            now = time.monotonic()
            # by volume both ways: a client downloading a clone rekeys by what it received from us
            received = getattr(self.packetizer, "_received", 0) + getattr(self.packetizer, "_sent", 0)
            self._rekey_tokens = min(REKEY_BURST, self._rekey_tokens + (now - self._rekey_clock) / REKEY_REFILL)
            self._rekey_clock = now
            if received - self._rekey_received < REKEY_BYTES_FREE:
                if self._rekey_tokens < 1:
                    raise ProtocolViolation("too many key re-exchanges")
                self._rekey_tokens -= 1
            self._rekey_received = received
        self._negotiate_keys(m)

    def _log(self, level, msg, *args):
        # paramiko logs a traceback as a list of lines after its one-line summary ("Exception (server): ..."):
        # the summary says it, the traceback is paramiko's own stack, noise for an operator
        if not isinstance(msg, list):
            super()._log(level, msg, *args)

    def start_server(self, *args, **kwargs):
        # RFC 4253 4.2 lets only a server send lines before its identification: a client's first line must be
        # it (as sshd requires), so an HTTP request or a port scanner's garbage fails at once
        if isinstance(self.packetizer, FastPacketizer):
            self.packetizer.max_banner_lines = 1
        return super().start_server(*args, **kwargs)

    def _auth_trigger(self):
        if isinstance(self.packetizer, FastPacketizer):
            self.packetizer.recv_limit = None
        super()._auth_trigger()


def banner():
    """The identification line our transports send (without naming paramiko or its version)."""
    return ("SSH-%s-%s\r\n" % (Transport._PROTO_ID, Transport._CLIENT_ID)).encode()


def auth_failures(transport):
    """Failed authentication attempts on a server transport (rejected keys and bad signatures alike); 0 when this
    paramiko does not count them."""
    handler = getattr(transport, "auth_handler", None)
    return getattr(handler, "auth_fail_count", 0) if handler is not None else 0


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
    if not FEATURES["requests"]:
        return transport
    table = dict(type(transport)._channel_handler_table)
    table[MSG_CHANNEL_REQUEST] = _handle_request
    transport._channel_handler_table = table
    return transport


def exit_signal(channel):
    return getattr(channel, "kiln_exit_signal", None)


# -- the relay's fast path ---------------------------------------------------------------------------------------
SMALL_FEED = 512             # ChunkPipe: received data shorter than this is copied into a shared buffer
COALESCE_LIMIT = 64 * 1024  # ... of at most this size


class ChunkPipe(BufferedPipe):
    """A drop-in BufferedPipe that keeps received data as the bytes objects it came in.

    paramiko's BufferedPipe appends every received packet to one array (a copy, and a realloc as it grows), and a
    read copies twice and then moves the rest of the array to the front: with a 4 MiB window full of backend output
    that move alone was 8% of the proxy's CPU in a 1 GB fetch (py-spy). Here a read hands back a received chunk
    as it is when it fits (no copy), joins several when they fit together, and splits only the last one. Readers
    wait on an Event rather than the base class's Condition (whose deque is ~0.6 KiB; a session has four pipes).
    Same blocking, timeout, event and close semantics as the base class.
    """

    def __init__(self):                 # not BufferedPipe.__init__: no array, no Condition
        self._lock = threading.Lock()
        self._ready = threading.Event()  # set while data is buffered or the pipe is closed
        self._event = None
        self._closed = False
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
                chunks = self._chunks
                if len(data) >= SMALL_FEED:
                    chunks.append(bytes(data))
                elif chunks and isinstance(chunks[-1], bytearray) and len(chunks[-1]) < COALESCE_LIMIT:
                    chunks[-1] += data               # small packets share one buffer: a bytes object per
                else:                                # 1-byte packet cost ~40 bytes of memory per byte
                    chunks.append(bytearray(data))
                self._size += len(data)
            self._ready.set()

    def read_ready(self):
        with self._lock:
            return self._size > 0

    def read(self, nbytes, timeout=None):
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            with self._lock:
                if self._size:
                    out = self._take(nbytes)
                    if not self._size:
                        if not self._closed:
                            self._ready.clear()
                            if self._event is not None:
                                self._event.clear()
                    return out
                if self._closed:
                    return b""
                self._ready.clear()
            wait = None if deadline is None else deadline - time.monotonic()
            if (wait is not None and wait <= 0) or not self._ready.wait(wait):
                raise PipeTimeout()

    def _take(self, nbytes):
        chunks = self._chunks
        if not chunks or nbytes <= 0:
            return b""
        first = chunks[0]
        if len(first) > nbytes:                     # split the first chunk: the only partial copy
            chunks[0] = first[nbytes:]
            self._size -= nbytes
            return bytes(first[:nbytes])
        taken, count = len(first), 1
        while count < len(chunks) and taken + len(chunks[count]) <= nbytes:
            taken += len(chunks[count])
            count += 1
        out = bytes(first) if count == 1 else b"".join(chunks[:count])      # bytes(b) is b itself
        del chunks[:count]
        self._size -= taken
        return out

    def empty(self):
        with self._lock:
            out = b"".join(self._chunks)
            self._chunks = []
            self._size = 0
            if not self._closed:
                self._ready.clear()
                if self._event is not None:
                    self._event.clear()
            return out

    def close(self):
        with self._lock:
            self._closed = True
            self._ready.set()
            if self._event is not None:
                self._event.set()

    def __len__(self):
        with self._lock:
            return self._size


def use_chunk_pipes(channel):
    """Give a channel ChunkPipes for its stdout and stderr, moving over anything already received (the caller runs
    between two switches, so nothing can arrive while it swaps). Returns the channel."""
    if not FEATURES["fast"]:
        return channel
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


SEND_BATCH = 256 * 1024


class _Batch:
    """Several channel-data messages for FastPacketizer.send_message to encrypt and write in one go: a list of
    (header, data) pairs, each the payload of one SSH packet. Passed through paramiko's Transport._send_user_message
    so that its key-exchange gate (clear_to_send) applies unchanged."""
    __slots__ = ("parts",)

    def __init__(self, parts):
        self.parts = parts

    def payloads(self):
        return [header + bytes(data) for header, data in self.parts]


def send_all(channel, data, stderr=False):
    """Channel.sendall / sendall_stderr, cheaper per byte. paramiko re-slices the unsent rest after every packet
    (copies), and takes the channel lock, the key-exchange gate, the write lock and a socket write for each packet
    (the client's 32 KiB maximum: 8 of each per 256 KiB relayed). Here the data is cut with memoryviews, and every
    packet the peer's window already allows is reserved under one channel lock (paramiko's own
    _wait_for_send_window, which blocks only for the first one: nothing reserved is ever held while waiting) and
    sent as one batch. Raises EOFError when the channel can take no more (closed, or EOF already sent), where
    paramiko's own loop would spin."""
    view = memoryview(data)
    if not FEATURES["fast"] or not isinstance(channel.transport.packetizer, FastPacketizer):   # plain paramiko
        send = channel.send_stderr if stderr else channel.send
        while view:
            sent = send(view)
            if not sent:
                raise EOFError("channel closed")
            view = view[sent:]
        return
    header = (bytes((paramiko.common.MSG_CHANNEL_EXTENDED_DATA,)) + struct.pack(">II", channel.remote_chanid, 1)
              if stderr else bytes((MSG_CHANNEL_DATA,)) + struct.pack(">I", channel.remote_chanid))
    while view:
        parts, reserved = [], 0
        with channel.lock:
            if channel.closed:
                raise OSError("Socket is closed")
            while reserved < len(view) and reserved < SEND_BATCH and (not parts or channel.out_window_size > 0):
                size = channel._wait_for_send_window(len(view) - reserved)
                if not size:
                    break
                parts.append((header + struct.pack(">I", size), view[reserved:reserved + size]))
                reserved += size
        if not parts:
            raise EOFError("channel closed")
        channel.transport._send_user_message(_Batch(parts))
        view = view[reserved:]


# OpenSSH's PACKET_MAX_SIZE: a bigger length field is garbage or an attack (RFC 4253 6.1 lets us drop it)
MAX_PACKET = 256 * 1024
MAX_BANNER_LINE = 8192       # OpenSSH bounds the identification line to 8 KiB ...
MAX_BANNER_LINES = 20        # ... and the lines a peer may send before it
# A transport's reader never blocks while data is waiting, so one fast sender would hold the event loop for as
# long as it keeps sending: let the others run after this much input (costs one loop pass per 256 KiB relayed).
YIELD_BYTES = 256 * 1024
YIELD_PACKETS = 64
READ_AHEAD = 256 * 1024
MERGE_LIMIT = 256 * 1024
MSG_CHANNEL_DATA = paramiko.common.MSG_CHANNEL_DATA


def _channel_data(packet, end):
    """(recipient channel bytes, data view) when a decrypted packet is a well-formed SSH_MSG_CHANNEL_DATA, else
    (None, None). Layout: padding length, type, uint32 channel, uint32 length, data, padding."""
    if packet[1] != MSG_CHANNEL_DATA or end < 10 or struct.unpack_from(">I", packet, 6)[0] != end - 10:
        return None, None
    return packet[2:6], memoryview(packet)[10:end]


def _message(packet, end, seqno):
    """The Message paramiko's read_message returns: the payload after the type byte."""
    msg = Message(packet[2:end])
    msg.seqno = seqno
    return msg


class FastPacketizer(Packetizer):
    """paramiko's Packetizer with buffered reads and a copy-light AES-GCM path.

    Profiled (py-spy) on a 1 GB fetch, paramiko's Packetizer made two recv calls per packet (the backend's sshd sends
    8 KiB packets: ~130,000 per GB), grew each packet by bytes concatenation, and copied every payload four to five
    times each way around the cipher call. Here:
    - reads go through one buffer refilled with up to READ_AHEAD bytes per recv (one syscall for many packets);
    - with AES-GCM (the cipher KilnProxy prefers on both legs) and no compression, read_message decrypts straight
      out of that buffer, and send_message encrypts straight into the buffer it sends (cryptography's
      encrypt_into); packets longer than MAX_PACKET are refused, as OpenSSH does;
    - any other cipher, compression, or packet dumping takes paramiko's own code (which reads through the same
      buffer).
    Sequence numbers, IV counters, rekey accounting and the handshake/keepalive/closed checks are paramiko's, kept
    line for line; the state lives in paramiko's own (name-mangled) attributes, so the two paths mix freely.
    tests/test_sshcompat.py runs both against each other, through rekeys, and against OpenSSH end to end.
    """

    def __init__(self, sock):
        super().__init__(sock)
        self._rbuf = bytearray()
        self._pending = None         # (plaintext, end, seqno): decrypted while merging channel data, taken next
        self.recv_limit = None       # bytes the peer may send in all (before authentication), None = no limit
        self.max_banner_lines = MAX_BANNER_LINES    # 1 on the server side: clients send no lines before theirs
        self.skip_write = None       # bytes already written for paramiko (our banner): its own write is skipped
        self._received = 0
        self._sent = 0
        self._since_yield = 0
        self._packets_since_yield = 0
        self._banner_lines = 0

    def close(self):
        # paramiko's handshake timer (a 15 s threading.Timer, a greenlet here) is cancelled only by a completed
        # handshake: every connection that failed before that left one behind for 15 s (floods: hundreds)
        timer = getattr(self, "_Packetizer__timer", None)
        if timer is not None:
            timer.cancel()
        super().close()

    def _got(self, n):
        self._received += n
        self._since_yield += n
        if self.recv_limit is not None and self._received > self.recv_limit:
            raise ProtocolViolation("peer sent more than %d bytes before authenticating" % self.recv_limit)

    def _maybe_yield(self):
        self._packets_since_yield += 1
        if self._since_yield >= YIELD_BYTES or self._packets_since_yield >= YIELD_PACKETS:
            self._since_yield = self._packets_since_yield = 0
            gevent.sleep(0)

    def readline(self, timeout):
        """The peer's identification line (and the lines before it), at most MAX_BANNER_LINE bytes each and
        MAX_BANNER_LINES lines. paramiko's own readline appends 128 bytes at a time and rescans the whole buffer for
        the newline: a 10 MB line without one held the event loop for 137 s. Reads ahead into the packet buffer."""
        self._banner_lines += 1
        if self._banner_lines > self.max_banner_lines:
            raise ProtocolViolation("more than %d lines before the identification line" % (self.max_banner_lines - 1))
        buf = self._rbuf
        if self._Packetizer__remainder:
            buf += self._Packetizer__remainder
            self._Packetizer__remainder = b""
        scanned = 0
        give_up = time.monotonic() + timeout
        while True:
            n = buf.find(b"\n", scanned)
            if n >= 0:
                break
            scanned = len(buf)
            if scanned > MAX_BANNER_LINE:
                raise ProtocolViolation("identification line longer than %d bytes" % MAX_BANNER_LINE)
            try:
                x = self._Packetizer__socket.recv(MAX_BANNER_LINE + 1 - scanned + 1024)
            except socket.timeout:
                x = None
            if x is not None:
                if not x:
                    raise EOFError()
                self._got(len(x))
                buf += x
                continue
            if self._Packetizer__closed:
                raise EOFError()
            if time.monotonic() >= give_up:
                raise socket.timeout()
        if n > MAX_BANNER_LINE:
            raise ProtocolViolation("identification line longer than %d bytes" % MAX_BANNER_LINE)
        line = bytes(buf[:n])
        del buf[:n + 1]
        if line.endswith(b"\r"):
            line = line[:-1]
        try:
            return line.decode("utf-8")
        except UnicodeDecodeError:
            raise ProtocolViolation("identification line is not text") from None

    # -- reading ------------------------------------------------------------------------------------------------
    def _fill(self, n, check_rekey=False):
        """Buffer at least n bytes: paramiko's read_all loop (timeouts, EAGAIN, rekey, keepalive, EOF), reading
        ahead. Refuses to wait for more than a packet can hold: paramiko's own read_message asks for whatever
        length the peer announced, before authentication too (a cleartext header claiming 2 GiB)."""
        if n > MAX_PACKET + 1024:
            raise paramiko.SSHException("Packet too large (%d bytes)" % n)
        buf = self._rbuf
        if self._Packetizer__remainder:                  # what the banner read took beyond the banner line
            buf += self._Packetizer__remainder
            self._Packetizer__remainder = b""
        while len(buf) < n:
            if self.handshake_timed_out():
                raise EOFError()
            got_timeout = False
            try:
                x = self._Packetizer__socket.recv(max(READ_AHEAD, n - len(buf)))   # n is bounded above
                if not x:
                    raise EOFError()
                self._got(len(x))
                buf += x
            except socket.timeout:
                got_timeout = True
            except OSError as e:
                if e.errno == errno.EAGAIN:
                    got_timeout = True
                elif self._Packetizer__closed:
                    raise EOFError()
                else:
                    raise
            if got_timeout:
                if self._Packetizer__closed:
                    raise EOFError()
                if check_rekey and not buf and self._Packetizer__need_rekey:
                    raise NeedRekeyException()
                self._check_keepalive()
        return buf

    def read_all(self, n, check_rekey=False):
        buf = self._fill(n, check_rekey)
        out = bytes(buf[:n])
        del buf[:n]
        return out

    def read_message(self):
        self._maybe_yield()
        if self._pending is not None:
            (first, first_end, seqno), self._pending = self._pending, None
        elif (not FEATURES["fast"] or not self._Packetizer__aead_in or self._Packetizer__compress_engine_in is not None
              or self._Packetizer__dump_packets):
            return super().read_message()
        else:
            first, first_end, seqno = self._read_packet()
        chanid, data = _channel_data(first, first_end)
        if data is None:
            return first[1], _message(first, first_end, seqno)
        # Channel data: merge the channel-data packets for the same channel that are already buffered into one
        # message (sshd sends a fetch as 8 KiB packets; one dispatch, feed and wake-up per packet was the biggest
        # per-packet cost left). The first other packet decrypted on the way is taken by the next call.
        parts, size = [data], len(data)
        while size < MERGE_LIMIT and self._packet_buffered():
            packet, end, seq = self._read_packet()
            more_chanid, more = _channel_data(packet, end)
            if more is None or more_chanid != chanid:
                self._pending = (packet, end, seq)
                break
            parts.append(more)
            size += len(more)
        if len(parts) == 1:
            return MSG_CHANNEL_DATA, _message(first, first_end, seqno)
        msg = Message(b"".join([chanid, struct.pack(">I", size)] + parts))
        msg.seqno = seqno
        return MSG_CHANNEL_DATA, msg

    def _packet_buffered(self):
        buf = self._rbuf
        return len(buf) >= 4 and len(buf) >= 4 + struct.unpack_from(">I", buf)[0] + self._Packetizer__mac_size_in

    def _read_packet(self):
        """Read, check and decrypt one AES-GCM packet: (plaintext, end of payload, sequence number), with paramiko's
        IV, sequence number and rekey bookkeeping."""
        buf = self._fill(4, check_rekey=True)
        packet_size = struct.unpack_from(">I", buf)[0]
        if packet_size > MAX_PACKET:
            raise paramiko.SSHException("Packet too large (%d bytes)" % packet_size)
        if packet_size < 16 or packet_size % 16:           # RFC 5647: whole AES blocks, at least one
            raise paramiko.SSHException("Invalid packet blocking")
        mac_size = self._Packetizer__mac_size_in
        total = 4 + packet_size + mac_size
        self._fill(total)
        with memoryview(buf) as view:
            try:
                packet = self._Packetizer__block_engine_in.decrypt(
                    self._Packetizer__iv_in, view[4:total], bytes(view[:4]))
            except InvalidTag:
                raise paramiko.SSHException("Mismatched MAC") from None
        del buf[:total]
        self._Packetizer__iv_in = self._inc_iv_counter(self._Packetizer__iv_in)
        end = packet_size - packet[0]                       # payload ends where the padding starts
        if packet[0] < 4 or end < 2:                        # RFC 4253 6: at least 4 bytes of padding
            raise paramiko.SSHException("Invalid packet padding")
        seqno = self._Packetizer__sequence_number_in
        next_seq = (seqno + 1) & xffffffff
        if next_seq == 0 and not self._initial_kex_done:
            raise paramiko.SSHException("Sequence number rolled over during initial kex!")
        self._Packetizer__sequence_number_in = next_seq
        self._count_received(packet_size + mac_size + 4)
        return packet, end, seqno

    def _count_received(self, raw_packet_size):
        """paramiko's rekey accounting for a received packet (read_message's tail)."""
        self._Packetizer__received_bytes += raw_packet_size
        self._Packetizer__received_packets += 1
        if self._Packetizer__need_rekey:
            self._Packetizer__received_bytes_overflow += raw_packet_size
            self._Packetizer__received_packets_overflow += 1
            if (self._Packetizer__received_packets_overflow >= self.REKEY_PACKETS_OVERFLOW_MAX
                    or self._Packetizer__received_bytes_overflow >= self.REKEY_BYTES_OVERFLOW_MAX):
                raise paramiko.SSHException("Remote transport is ignoring rekey requests")
        elif (self._Packetizer__received_packets >= self.REKEY_PACKETS
              or self._Packetizer__received_bytes >= self.REKEY_BYTES):
            self._Packetizer__received_bytes_overflow = 0
            self._Packetizer__received_packets_overflow = 0
            self._trigger_rekey()

    # -- writing ------------------------------------------------------------------------------------------------
    def write_all(self, out):
        """paramiko's write_all, slicing with a memoryview instead of copying the unsent rest."""
        self._Packetizer__keepalive_last = time.time()
        if self.skip_write is not None:
            skip, self.skip_write = self.skip_write, None
            if bytes(out) == skip:
                return
        view = memoryview(out)
        total, zero_sends = len(view), 0
        self._sent += total
        try:
            while view:
                try:
                    n = self._Packetizer__socket.send(view)
                except socket.timeout:
                    n = -1 if self._Packetizer__closed else 0
                except OSError as e:
                    if e.errno == errno.EAGAIN:
                        n = -1 if self._Packetizer__closed else 0
                    else:
                        n = -1
                else:
                    if n == 0:
                        zero_sends += 1
                        if zero_sends > 10:
                            n = -1
                if n < 0:
                    raise EOFError()
                view = view[n:]
        except BaseException:
            # Stopped part way through (the writing greenlet killed by a timeout, the peer gone): the peer now
            # waits for the rest of a packet that will never come, and any later packet would be read as its
            # tail. The connection is unusable for every channel on it (a pooled backend connection carries up
            # to backend.max_sessions): close it so that nobody writes after the fragment.
            if 0 < len(view) < total:
                self.close()
            raise

    def send_message(self, data):
        fast = (FEATURES["fast"] and self._Packetizer__aead_out and self._Packetizer__compress_engine_out is None
                and not self._Packetizer__dump_packets)
        if not fast:
            if isinstance(data, _Batch):
                with self._Packetizer__write_lock:
                    for payload in data.payloads():
                        super().send_message(Message(payload))
                return
            return super().send_message(data)
        parts = data.parts if isinstance(data, _Batch) else [(data.asbytes(), b"")]
        bsize, mac_size = self._Packetizer__block_size_out, self._Packetizer__mac_size_out
        sizes = []
        for header, body in parts:
            padding = 3 + bsize - ((len(header) + len(body) + 4) % bsize)   # paramiko's _build_packet, AEAD case
            sizes.append((padding, len(header) + len(body) + padding + 1))
        out = bytearray(sum(4 + size + mac_size for _, size in sizes))
        with self._Packetizer__write_lock, memoryview(out) as view:
            offset = 0
            for (header, body), (padding, size) in zip(parts, sizes):
                struct.pack_into(">I", out, offset, size)
                self._Packetizer__block_engine_out.encrypt_into(
                    self._Packetizer__iv_out, b"".join((bytes((padding,)), header, body, os.urandom(padding))),
                    bytes(view[offset:offset + 4]), view[offset + 4:offset + 4 + size + mac_size])
                offset += 4 + size + mac_size
                self._Packetizer__iv_out = self._inc_iv_counter(self._Packetizer__iv_out)
                next_seq = (self._Packetizer__sequence_number_out + 1) & xffffffff
                if next_seq == 0 and not self._initial_kex_done:
                    raise paramiko.SSHException("Sequence number rolled over during initial kex!")
                self._Packetizer__sequence_number_out = next_seq
                self._Packetizer__sent_bytes += 4 + size + mac_size
                self._Packetizer__sent_packets += 1
            self.write_all(view)
            if ((self._Packetizer__sent_packets >= self.REKEY_PACKETS
                 or self._Packetizer__sent_bytes >= self.REKEY_BYTES) and not self._Packetizer__need_rekey):
                self._Packetizer__received_bytes_overflow = 0
                self._Packetizer__received_packets_overflow = 0
                self._trigger_rekey()


# -- the guard on paramiko's internals ------------------------------------------------------------------------------
# Exactly the private names this module uses, by what they serve. The version pin is the first guard; `probe()` at
# start-up is the second: a paramiko that renamed one of them would otherwise fail as "internal error" on the client
# leg and, silently, as "backend unavailable" on the backend leg.
PRIVATE_NAMES = {
    # FastPacketizer's buffered, bounded reader (banner bound, pre-auth limit, yields); without it: paramiko's own
    # Packetizer, and those bounds are not enforced (an ERROR says so)
    "reader": ("Packetizer._Packetizer__remainder", "Packetizer._Packetizer__socket", "Packetizer._Packetizer__closed",
               "Packetizer._Packetizer__timer",
               "Packetizer._Packetizer__need_rekey", "Packetizer.handshake_timed_out", "Packetizer._check_keepalive",
               "Packetizer.read_all", "Packetizer.readline", "Packetizer.read_message", "Transport(packetizer_class)"),
    # the relay's fast path (AES-GCM packets, batched sends, ChunkPipe); without it: paramiko's per-packet code
    "fast": ("Packetizer._Packetizer__aead_in", "Packetizer._Packetizer__compress_engine_in",
             "Packetizer._Packetizer__dump_packets", "Packetizer._Packetizer__mac_size_in",
             "Packetizer._Packetizer__block_engine_in", "Packetizer._Packetizer__iv_in",
             "Packetizer._Packetizer__sequence_number_in", "Packetizer._Packetizer__received_bytes",
             "Packetizer._Packetizer__received_packets", "Packetizer._Packetizer__received_bytes_overflow",
             "Packetizer._Packetizer__received_packets_overflow", "Packetizer._Packetizer__keepalive_last",
             "Packetizer._Packetizer__aead_out", "Packetizer._Packetizer__compress_engine_out",
             "Packetizer._Packetizer__block_size_out", "Packetizer._Packetizer__mac_size_out",
             "Packetizer._Packetizer__block_engine_out", "Packetizer._Packetizer__iv_out",
             "Packetizer._Packetizer__sequence_number_out", "Packetizer._Packetizer__sent_bytes",
             "Packetizer._Packetizer__sent_packets", "Packetizer._Packetizer__write_lock",
             "Packetizer._inc_iv_counter", "Packetizer._trigger_rekey", "Packetizer._initial_kex_done",
             "Packetizer.REKEY_PACKETS", "Packetizer.REKEY_BYTES", "Packetizer.REKEY_PACKETS_OVERFLOW_MAX",
             "Packetizer.REKEY_BYTES_OVERFLOW_MAX", "Channel.lock", "Channel.closed", "Channel.out_window_size",
             "Channel._wait_for_send_window", "Channel.remote_chanid", "Transport._send_user_message",
             "BufferedPipe._closed", "BufferedPipe.empty"),
    # channel windows enforced, client stderr discarded
    "window": ("Transport._channel_handler_table", "Channel.in_buffer", "Channel.in_stderr_buffer",
               "Channel.in_window_size", "Channel.in_window_sofar", "Channel.combine_stderr", "Transport.server_mode"),
    # client rekeys rate-limited, failed logins counted, the banner
    "kex": ("Transport._handler_table", "Transport._negotiate_keys", "Transport._parse_newkeys",
            "Transport.clear_to_send", "Transport.clear_to_send_lock", "Transport._send_message", "Transport.local_kex_init",
            "Transport.authenticated", "Transport._auth_trigger", "Transport._CLIENT_ID", "Transport._PROTO_ID",
            "AuthHandler.auth_fail_count"),
    # exit-signal both ways, the slow poll
    "requests": ("Channel._handle_request", "Channel.status_event", "Transport._active_check_timeout"),
}
FEATURES = dict.fromkeys(PRIVATE_NAMES, True)      # what probe() found usable; all on until it runs


def _probe_objects():
    """Instances to look names up on (paramiko sets most of them in __init__): a Transport over one end of a
    socketpair (never started), its packetizer, a Channel, a BufferedPipe, an AuthHandler."""
    import inspect
    from paramiko.auth_handler import AuthHandler
    a, b = socket.socketpair()
    transport = paramiko.Transport(a)
    channel = paramiko.Channel(0)
    channel._set_transport(transport)
    objects = {"Transport": transport, "Packetizer": transport.packetizer, "Channel": channel,
               "BufferedPipe": BufferedPipe(), "AuthHandler": AuthHandler(transport)}
    takes_packetizer = "packetizer_class" in inspect.signature(paramiko.Transport.__init__).parameters
    return objects, (a, b, transport), takes_packetizer


def probe(names=None):
    """{feature: [missing private names]} for the installed paramiko (empty lists when all are there)."""
    names = PRIVATE_NAMES if names is None else names
    objects, owned, takes_packetizer = _probe_objects()
    try:
        missing = {}
        for feature, wanted in names.items():
            missing[feature] = []
            for name in wanted:
                owner, _, attr = name.partition(".")
                if attr == "Transport(packetizer_class)" or name == "Transport(packetizer_class)":
                    ok = takes_packetizer
                else:
                    obj = objects.get(owner)
                    ok = obj is not None and hasattr(obj, attr)
                if not ok:
                    missing[feature].append(name)
        return missing
    finally:
        for obj in owned:
            obj.close()


def configure(log, names=None):
    """Run probe() and turn off what cannot work on this paramiko, logging once what and why (start-up)."""
    missing = probe(names)
    for feature, gone in missing.items():
        FEATURES[feature] = not gone
    if missing.get("reader"):
        FEATURES["fast"] = False
    if any(missing.values()):
        for feature, gone in missing.items():
            if gone:
                log.warning("paramiko %s lacks %s: %s off (%s)", paramiko.__version__, ", ".join(gone), feature,
                            _FALLBACK[feature])
    else:
        log.info("paramiko %s: all %d private names sshcompat uses are present", paramiko.__version__,
                 sum(len(v) for v in (names or PRIVATE_NAMES).values()))
    return missing


_FALLBACK = {
    "reader": "paramiko's own Packetizer: the banner, pre-authentication and fairness bounds are NOT enforced",
    "fast": "relaying through paramiko's per-packet code, slower but correct",
    "window": "channel windows are NOT enforced against peers",
    "kex": "client rekeys are not rate-limited, failed logins may be undercounted",
    "requests": "exit signals are reported as no exit status",
}
