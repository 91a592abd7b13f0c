"""Attack clients for the isolation tests (tests/test_e2e_isolation.py), one per finding of the security review.

Each attack is a thread with a stop event and a hard time bound: `start()`, let it run, `stop()` (which closes what
it holds, so that nothing it does can block past the bound, and joins). Every loop is bounded in count and time and
every socket is closed. They speak only to 127.0.0.0/8, from a source address of their choosing, so that a
legitimate user can be measured from another one. Counters live in `self.stats` (read them after stop()).

Raw-socket attacks build RFC 4253 packets by hand (cleartext, before any key exchange); the authenticated ones use a
paramiko client and its internals (`Transport._send_user_message`, `Channel.remote_chanid`) to break the rules a
well-behaved client keeps.
"""
import os
import socket
import struct
import threading
import time

import paramiko
from paramiko.common import cMSG_CHANNEL_DATA, cMSG_CHANNEL_EXTENDED_DATA

HOST = "127.0.0.1"
ATTACKER = "127.0.0.1"

MSG_DISCONNECT, MSG_IGNORE, MSG_KEXINIT, MSG_KEXDH_INIT, MSG_KEXDH_REPLY = 1, 2, 20, 30, 31


# -- sockets ------------------------------------------------------------------------------------------------------
def connect(port, source=ATTACKER, timeout=5.0):
    """A TCP connection to the proxy from the given loopback source address."""
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(timeout)
        s.bind((source, 0))
        s.connect((HOST, port))
    except BaseException:
        s.close()
        raise
    return s


def close_hard(sock):
    """Close with RST (what an attacker that does not care does; also discards what we queued)."""
    if sock is None:
        return
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    except OSError:
        pass
    sock.close()


def peer_closed(sock):
    """Non-blocking: True if the peer closed (FIN or RST), False if the connection is open; received bytes are
    discarded."""
    saved = sock.gettimeout()
    sock.settimeout(0.0)        # with a timeout, Python waits out EAGAIN even with MSG_DONTWAIT
    try:
        for _ in range(64):                         # drain at most 256 KiB of whatever the proxy sent
            data = sock.recv(4096)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:                                 # ECONNRESET and friends
        return True
    finally:
        sock.settimeout(saved)
    return False


def read_banner(sock, timeout=5.0):
    """Read the peer's identification line (bytes, without CR LF); raises EOFError or socket.timeout."""
    sock.settimeout(timeout)
    buf = b""
    while b"\n" not in buf:
        if len(buf) > 64 * 1024:
            raise EOFError("no banner within 64 KiB")
        chunk = sock.recv(4096)
        if not chunk:
            raise EOFError("closed before the banner")
        buf += chunk
    line, _, rest = buf.partition(b"\n")
    return line.rstrip(b"\r"), rest


# -- RFC 4253 cleartext packets --------------------------------------------------------------------------------
def ssh_string(data):
    if isinstance(data, str):
        data = data.encode()
    return struct.pack(">I", len(data)) + data


def mpint(n):
    if n == 0:
        return struct.pack(">I", 0)
    raw = n.to_bytes((n.bit_length() + 8) // 8, "big")      # a leading zero byte when the top bit is set
    return struct.pack(">I", len(raw)) + raw


def packet(payload, block=8):
    """uint32 packet_length, byte padding_length, payload, random padding (>= 4 bytes; total a multiple of block)."""
    padding = block - (len(payload) + 5) % block
    if padding < 4:
        padding += block
    return struct.pack(">IB", len(payload) + padding + 1, padding) + payload + os.urandom(padding)


def ignore_packet(size):
    """SSH_MSG_IGNORE carrying `size` bytes."""
    return packet(bytes((MSG_IGNORE,)) + ssh_string(b"\0" * size))


def kexinit(kex, host_keys="ssh-ed25519,rsa-sha2-256,rsa-sha2-512",
            ciphers="aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes256-ctr",
            macs="hmac-sha2-256-etm@openssh.com,hmac-sha2-256,hmac-sha2-512"):
    lists = [kex, host_keys, ciphers, ciphers, macs, macs, "none", "none", "", ""]
    return (bytes((MSG_KEXINIT,)) + os.urandom(16) + b"".join(ssh_string(x) for x in lists)
            + b"\0" + struct.pack(">I", 0))


class PacketReader:
    """Reads cleartext packets (before NEWKEYS) from a socket: (type, payload) or EOFError."""

    def __init__(self, sock, pending=b""):
        self.sock, self.buf = sock, bytearray(pending)

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                raise EOFError("closed")
            self.buf += chunk

    def read(self):
        self._need(4)
        length = struct.unpack_from(">I", self.buf)[0]
        if not 5 <= length <= 256 * 1024:
            raise EOFError("bad packet length %d" % length)
        self._need(4 + length)
        pad = self.buf[4]
        payload = bytes(self.buf[5:4 + length - pad])
        del self.buf[:4 + length]
        return payload[0], payload


def parse_kexinit(payload):
    """The ten name-lists of a KEXINIT payload, as lists of names."""
    pos, lists = 17, []
    for _ in range(10):
        n = struct.unpack_from(">I", payload, pos)[0]
        lists.append([x for x in payload[pos + 4:pos + 4 + n].decode().split(",") if x])
        pos += 4 + n
    return lists


def server_kexinit(port, source=ATTACKER, timeout=5.0):
    """Connect, exchange banners and return the proxy's KEXINIT name-lists (kex first)."""
    with connect(port, source, timeout) as s:
        s.sendall(b"SSH-2.0-kiln-isolation-test\r\n")
        _, rest = read_banner(s, timeout)
        reader = PacketReader(s, rest)
        for _ in range(8):
            kind, payload = reader.read()
            if kind == MSG_KEXINIT:
                return parse_kexinit(payload)
    raise AssertionError("no KEXINIT from the proxy")


def kex_offer_accepted(port, kex, source=ATTACKER, wait=1.5):
    """Offer only `kex`; True if the proxy keeps the connection for `wait` seconds after both KEXINITs (it waits
    for our key exchange message: it accepted the algorithm), False if it closes (no common algorithm)."""
    with connect(port, source) as s:
        s.sendall(b"SSH-2.0-kiln-isolation-test\r\n")
        try:
            _, rest = read_banner(s)
            s.sendall(packet(kexinit(kex)))
            reader = PacketReader(s, rest)
            s.settimeout(wait)
            give_up = time.monotonic() + wait
            while time.monotonic() < give_up:
                kind, _ = reader.read()
                if kind == MSG_DISCONNECT:
                    return False
        except socket.timeout:
            return True
        except (EOFError, OSError):
            return False
    return True


# -- the thread every attack runs in ---------------------------------------------------------------------------
class Attack:
    """One attack in a daemon thread: `attack()` runs until stop() or `max_seconds`; everything it opens it
    registers with `hold()` so that stop() can close it from outside (unblocking any send or recv)."""

    max_seconds = 30.0          # hard bound, whatever the test does

    def __init__(self, port, source=ATTACKER, max_seconds=None):
        self.port, self.source = port, source
        if max_seconds is not None:
            self.max_seconds = max_seconds
        self.stop_event = threading.Event()
        self.stats = {}
        self.error = None
        self._held = {}             # what stop() must close -> the thread that opened it
        self._lock = threading.Lock()
        self._threads = []
        self.started = None

    # subclasses
    def attack(self):
        raise NotImplementedError

    def threads(self):
        return 1

    # control
    def start(self):
        self.started = time.monotonic()
        self.deadline = self.started + self.max_seconds
        for i in range(self.threads()):
            t = threading.Thread(target=self._run, name="%s-%d" % (type(self).__name__, i), daemon=True)
            self._threads.append(t)
            t.start()
        return self

    def running(self):
        return not self.stop_event.is_set() and time.monotonic() < self.deadline

    def stop(self, join_timeout=15.0):
        self.stop_event.set()
        with self._lock:
            held = list(self._held)
        for obj in held:
            self._close(obj)
        for t in self._threads:
            t.join(join_timeout)
        alive = [t.name for t in self._threads if t.is_alive()]
        assert not alive, "attack threads did not stop: %s" % alive
        return self.stats

    def _run(self):
        try:
            self.attack()
        except Exception as e:          # an attack that broke is reported by the test, not printed
            self.error = e
        finally:
            me = threading.get_ident()
            with self._lock:
                mine = [obj for obj, owner in self._held.items() if owner == me]
            for obj in mine:
                self.release(obj)

    def count(self, name, n=1):
        with self._lock:
            self.stats[name] = self.stats.get(name, 0) + n

    def note(self, name, value):
        with self._lock:
            self.stats.setdefault(name, []).append(value)

    def hold(self, obj):
        with self._lock:
            self._held[obj] = threading.get_ident()
        if self.stop_event.is_set():            # stop() ran while we were opening it
            self._close(obj)
        return obj

    def release(self, obj):
        with self._lock:
            self._held.pop(obj, None)
        self._close(obj)

    @staticmethod
    def _close(obj):
        try:
            if isinstance(obj, socket.socket):
                close_hard(obj)
            else:
                obj.close()
        except (OSError, EOFError, paramiko.SSHException):
            pass

    def sleep(self, seconds):
        self.stop_event.wait(max(0.0, min(seconds, self.deadline - time.monotonic())))


class _Stream(Attack):
    """Connect, send `opening()`, then `filler()` chunks as fast as the proxy takes them, up to `per_connection`
    bytes; then wait for the proxy to close. On close, note (bytes sent, seconds open) and reconnect after
    `reconnect_delay`. `longest_open` is how long any connection stayed open, the current one included."""

    per_connection = 2 * 1024 * 1024
    reconnect_delay = 0.05
    max_connections = 500

    def opening(self):
        return b""

    def filler(self):
        raise NotImplementedError

    def attack(self):
        self.stats.update(connections=0, closed_by_proxy=0, bytes=0, longest_open=0.0)
        chunk = memoryview(self.filler())
        while self.running() and self.stats["connections"] < self.max_connections:
            try:
                s = self.hold(connect(self.port, self.source))
            except OSError:
                self.count("connect_errors")
                self.sleep(0.1)
                continue
            opened = time.monotonic()
            self.count("connections")
            sent, closed = 0, False
            try:
                s.sendall(self.opening())
                s.settimeout(0.2)
                offset = 0                       # where in `chunk` the stream is: packets stay whole
                while self.running() and sent < self.per_connection and not closed:
                    try:
                        n = s.send(chunk[offset:])
                    except socket.timeout:       # the proxy is not reading (busy, or blocked)
                        closed = peer_closed(s)
                        continue
                    offset = (offset + n) % len(chunk)
                    sent += n
                    self.count("bytes", n)
                while self.running() and not closed:
                    closed = peer_closed(s)
                    if not closed:
                        self.sleep(0.02)
            except OSError:                      # EPIPE, ECONNRESET: the proxy closed on us
                closed = True
            finally:
                lasted = time.monotonic() - opened
                with self._lock:
                    self.stats["longest_open"] = max(self.stats["longest_open"], lasted)
                self.release(s)
            if closed and not self.stop_event.is_set():     # stop() closing our socket is not the proxy
                self.count("closed_by_proxy")
                self.note("closes", (sent, round(lasted, 3)))
            self.sleep(self.reconnect_delay)


class BannerFlood(_Stream):
    """Finding 1: an identification line (`SSH-2.0-` + endless bytes, or a pre-banner line with no prefix) that
    never ends. paramiko reads it 128 bytes at a time, re-scanning and re-copying the whole line each time."""

    def __init__(self, port, prefix=b"SSH-2.0-", **kw):
        super().__init__(port, **kw)
        self.prefix = prefix

    def opening(self):
        return self.prefix

    def filler(self):
        return b"A" * 65536


class IgnoreFlood(_Stream):
    """Finding 2: our banner, then SSH_MSG_IGNORE packets in the clear before any KEXINIT, as fast as the proxy
    takes them, for as long as the connection lasts (no byte cap of our own). Small packets (40 bytes each): the
    cost is per packet, and paramiko's own "ignoring rekey requests" cut-off (after 512 MiB) is never reached."""

    per_connection = 1 << 40

    def __init__(self, port, payload_size=20, **kw):
        super().__init__(port, **kw)
        self.payload_size = payload_size

    def opening(self):
        return b"SSH-2.0-kiln-ignore-flood\r\n"

    def filler(self):
        one = ignore_packet(self.payload_size)
        return one * max(1, (256 * 1024) // len(one))         # ~256 KiB of whole packets per send


class SilentSockets(Attack):
    """Finding 4: TCP connections that never say a word, opened at up to `rate` per second and kept until the
    proxy closes them, at most `max_open` at a time and `max_total` in all. A connection that the proxy closes
    within `refusal_window` seconds counts as refused (at accept, whatever it sent first)."""

    def __init__(self, port, rate=100.0, max_open=150, max_total=3000, refusal_window=1.0, **kw):
        super().__init__(port, **kw)
        self.rate, self.max_open, self.max_total, self.refusal_window = rate, max_open, max_total, refusal_window

    def attack(self):
        self.stats.update(connections=0, refused=0, banners=0, closed_later=0, connect_errors=0, max_open=0)
        open_socks = {}                  # socket -> (opened at, banner seen)
        interval = 1.0 / self.rate
        next_at = time.monotonic()
        try:
            while self.running():
                now = time.monotonic()
                if now >= next_at and len(open_socks) < self.max_open and self.stats["connections"] < self.max_total:
                    next_at = max(next_at + interval, now - 1.0)
                    try:
                        s = self.hold(connect(self.port, self.source, timeout=2.0))
                        s.settimeout(0.0)      # polled below; with a timeout recv would wait out EAGAIN
                    except OSError:
                        self.count("connect_errors")
                    else:
                        self.count("connections")
                        open_socks[s] = [time.monotonic(), False]
                for s, state in list(open_socks.items()):
                    if not self.running():          # stop() closes our sockets under us: not refusals
                        break
                    try:
                        data = s.recv(4096)
                    except BlockingIOError:
                        continue
                    except OSError:
                        data = b""
                    if data:
                        if not state[1]:
                            state[1] = True
                            self.count("banners")
                        continue
                    del open_socks[s]
                    self.release(s)
                    lasted = time.monotonic() - state[0]
                    self.count("refused" if lasted < self.refusal_window else "closed_later")
                with self._lock:
                    self.stats["max_open"] = max(self.stats["max_open"], len(open_socks))
                self.sleep(min(interval, 0.01))
        finally:
            for s in list(open_socks):
                self.release(s)


class DHFlood(Attack):
    """Finding 5 (DHEat, CVE-2002-20001): banner, a KEXINIT offering only `kex`, KEXDH_INIT with a constant e,
    read the reply, hang up, repeat; `workers` threads at once. Costs us nothing, the server two modular
    exponentiations and a signature. A refused offer (the proxy closes) is retried only every `retry_delay`."""

    def __init__(self, port, kex="diffie-hellman-group16-sha512", workers=8, retry_delay=0.25, max_exchanges=5000,
                 **kw):
        super().__init__(port, **kw)
        self.kex, self.workers, self.retry_delay, self.max_exchanges = kex, workers, retry_delay, max_exchanges
        self.stats.update(attempts=0, replies=0, refused=0, errors=0)

    def threads(self):
        return self.workers

    def attack(self):
        init = packet(bytes((MSG_KEXDH_INIT,)) + mpint(2))
        while self.running() and self.stats["attempts"] < self.max_exchanges:
            self.count("attempts")
            s = None
            try:
                s = self.hold(connect(self.port, self.source, timeout=10.0))
                s.sendall(b"SSH-2.0-kiln-dh-flood\r\n")
                _, rest = read_banner(s, timeout=10.0)
                s.sendall(packet(kexinit(self.kex)) + init)
                reader = PacketReader(s, rest)
                for _ in range(8):
                    kind, _ = reader.read()
                    if kind == MSG_KEXDH_REPLY:
                        self.count("replies")
                        break
                    if kind == MSG_DISCONNECT:
                        raise EOFError("disconnect")
                else:
                    self.count("errors")
            except (EOFError, ConnectionError):
                self.count("refused")
                self.sleep(self.retry_delay)
            except OSError:
                self.count("errors")
                self.sleep(self.retry_delay)
            finally:
                if s is not None:
                    self.release(s)


# -- paramiko clients --------------------------------------------------------------------------------------------
def client_transport(port, source=ATTACKER, timeout=10.0):
    """A started paramiko client Transport over a socket bound to `source` (the caller closes it)."""
    sock = connect(port, source, timeout)
    t = paramiko.Transport(sock)
    try:
        t.start_client(timeout=timeout)
    except BaseException:
        t.close()
        sock.close()
        raise
    return t


def authenticate(t, key_path, user="git"):
    t.auth_publickey(user, paramiko.PKey.from_path(key_path))


class WindowOverrun(Attack):
    """Finding 3: an authenticated client that sends channel data far beyond the window the proxy granted.

    mode "before_exec": open a session channel and push MSG_CHANNEL_DATA without ever sending exec;
    mode "stdin": exec `command` (a git-upload-pack whose ref advertisement is far bigger than the small window we
      grant the proxy, and which we never read: upload-pack blocks writing it and never reads its stdin) and push
      MSG_CHANNEL_DATA;
    mode "extended": exec `command` and push MSG_CHANNEL_EXTENDED_DATA (type 1), which the relay never reads.
    Each packet is `chunk` bytes (within the proxy's maximum packet size); the window is ignored. When the proxy
    disconnects we note how much we had sent and reconnect. At most `per_connection` bytes per connection (then we
    wait for the proxy to close it) and `max_bytes` in all: enough to show the proxy buffering everything without
    making it take gigabytes."""

    def __init__(self, port, key_path, mode, command=b"", chunk=32 * 1024, per_connection=256 << 20,
                 max_bytes=1 << 30, max_connections=50, **kw):
        super().__init__(port, **kw)
        self.key_path, self.mode, self.command = key_path, mode, command
        self.chunk, self.per_connection, self.max_connections = chunk, per_connection, max_connections
        self.max_bytes = max_bytes
        self.stats.update(connections=0, disconnected=0, bytes=0)

    def attack(self):
        key = paramiko.PKey.from_path(self.key_path)
        data = os.urandom(self.chunk)
        while (self.running() and self.stats["connections"] < self.max_connections
               and self.stats["bytes"] < self.max_bytes):
            try:
                t = self.hold(client_transport(self.port, self.source))
            except (paramiko.SSHException, EOFError, OSError):
                self.count("connect_errors")
                self.sleep(0.1)
                continue
            self.count("connections")
            sent, opened = 0, time.monotonic()
            try:
                t.auth_publickey("git", key)
                # a small window toward us: the proxy can send us little, and we never read (nor adjust it)
                chan = t.open_session(window_size=32 * 1024, max_packet_size=32 * 1024, timeout=10)
                if self.mode != "before_exec":
                    chan.exec_command(self.command)
                if self.mode == "extended":
                    head = cMSG_CHANNEL_EXTENDED_DATA + struct.pack(">II", chan.remote_chanid, 1)
                else:
                    head = cMSG_CHANNEL_DATA + struct.pack(">I", chan.remote_chanid)
                payload = head + ssh_string(data)
                while (self.running() and t.is_active() and sent < self.per_connection
                       and self.stats["bytes"] < self.max_bytes):
                    t._send_user_message(paramiko.Message(payload))
                    sent += len(data)
                    self.count("bytes", len(data))
                while self.running() and t.is_active():         # capped: wait for the proxy to hang up
                    self.sleep(0.05)
            except (paramiko.SSHException, EOFError, OSError):
                pass
            finally:
                if not t.is_active() and not self.stop_event.is_set():     # the proxy hung up, not stop()
                    self.count("disconnected")
                    self.note("closes", (sent, round(time.monotonic() - opened, 3)))
                self.release(t)
            self.sleep(0.05)


class RekeyFlood(Attack):
    """Finding 5, second half: an authenticated client running a command asks for new keys over and over."""

    def __init__(self, port, key_path, command, max_rekeys=200, **kw):
        super().__init__(port, **kw)
        self.key_path, self.command, self.max_rekeys = key_path, command, max_rekeys
        self.stats.update(rekeys=0, disconnected=False, seconds=0.0)

    def attack(self):
        t = self.hold(client_transport(self.port, self.source))
        started = time.monotonic()
        try:
            authenticate(t, self.key_path)
            chan = t.open_session(timeout=10)
            chan.exec_command(self.command)
            while self.running() and self.stats["rekeys"] < self.max_rekeys:
                t.renegotiate_keys()
                self.count("rekeys")
        except (paramiko.SSHException, EOFError, OSError):
            pass
        finally:
            self.stats["seconds"] = round(time.monotonic() - started, 3)
            self.stats["disconnected"] = not t.is_active() and not self.stop_event.is_set()
            self.release(t)


# -- authentication failures -------------------------------------------------------------------------------------
class GarbageSignatureKey(paramiko.Ed25519Key):
    """A registered key's public half with a signature that cannot verify (64 random bytes)."""

    def sign_ssh_data(self, data, algorithm=None):
        m = paramiko.Message()
        m.add_string("ssh-ed25519")
        m.add_string(os.urandom(64))
        return m


def failed_logins(port, source, keys, idle_until_closed=False, max_idle=15.0, attack=None):
    """One connection from `source` that tries each key (each attempt fails), then either sits idle until the proxy
    closes it (`idle_until_closed`, bounded by max_idle) or hangs up. Returns (attempts made, seconds idle).
    With `attack`, the transport is held by it (its stop() closes it)."""
    t = client_transport(port, source)
    if attack is not None:
        attack.hold(t)
    attempts, idle = 0, 0.0
    try:
        for key in keys:
            try:
                t.auth_publickey("git", key)
            except paramiko.AuthenticationException:
                attempts += 1
                continue
            except (paramiko.SSHException, EOFError, OSError):
                break                   # the proxy hung up on us: fine, it may limit attempts per connection
            raise AssertionError("authentication with a bad key succeeded")
        if idle_until_closed:
            started = time.monotonic()
            while t.is_active() and time.monotonic() - started < max_idle:
                time.sleep(0.05)
            idle = time.monotonic() - started
    finally:
        if attack is not None:
            attack.release(t)
        t.close()
    return attempts, idle


def refused_at_accept(port, source, timeout=2.0):
    """(closed within timeout, bytes received): a refusal closes at once and sends nothing."""
    with connect(port, source) as s:
        s.settimeout(timeout)
        got = b""
        give_up = time.monotonic() + timeout
        try:
            while time.monotonic() < give_up:
                chunk = s.recv(4096)
                if not chunk:
                    return True, got
                got += chunk
        except socket.timeout:
            return False, got
        except OSError:
            return True, got
    return False, got


class FailedLogins(Attack):
    """Finding 8: connections from `source` that each fail `len(keys)` authentication attempts and then sit idle
    until the proxy closes them (`idle_until_closed`) or hang up; `workers` at a time, at most `max_connections`,
    until `done()` says so (the test's condition, e.g. the penalty line is in the log)."""

    def __init__(self, port, source, keys, idle_until_closed, workers=2, max_connections=10, done=None, **kw):
        super().__init__(port, source, **kw)
        self.keys, self.idle_until_closed, self.workers = keys, idle_until_closed, workers
        self.max_connections, self.done = max_connections, done or (lambda: False)
        self.stats.update(connections=0, attempts=0, idle=[], connect_errors=0)

    def threads(self):
        return self.workers

    def attack(self):
        while self.running() and not self.done():
            with self._lock:
                if self.stats["connections"] >= self.max_connections:
                    return
                self.stats["connections"] += 1
            try:
                attempts, idle = failed_logins(self.port, self.source, self.keys, self.idle_until_closed,
                                               max_idle=min(15.0, max(0.0, self.deadline - time.monotonic())),
                                               attack=self)
            except (paramiko.SSHException, EOFError, OSError):
                self.count("connect_errors")        # refused (penalised) at accept, for instance
                self.sleep(0.2)
                continue
            self.count("attempts", attempts)
            self.note("idle", round(idle, 2))
