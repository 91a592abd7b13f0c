"""The front door: admission at accept, and the PROXY protocol header a load balancer sends before the client's bytes.

`FrontDoor.admit(sock, addr, admission, timeout)` is the first thing a connection goes through. It returns an
`Arrival`: the admission lease, the client's address (THE remote address from then on: logs, penalties, handshake
slots, /connections) and the balancer's address (`via`, None for a direct client). It raises `Refused` (with
`source`, the address to log) when admission or the PROXY protocol policy refuses the connection; the caller logs,
counts and closes.

Policy (proxy.proxy_protocol, proxy.proxy_trusted; decided once, before the SSH banner):
- "off": nothing is read; today's behaviour.
- a source in proxy_trusted: its header is read first, under `timeout` (timeouts.login), then the lease is taken
  for the address it names, so penalties and per-source limits apply to the real client. Without a header:
  refused under "required", the socket's address under "optional". Reading before the lease is safe for these: a
  balancer sends its header at once, and no one else connects from its address.
- any other source: refused at once under "required"; under "optional" the lease is taken for the socket's address
  (the usual limits apply while we wait for its first byte) and a header from it refuses the connection (it is
  never ignored: the specification forbids guessing). One that sends nothing within `timeout` is refused and
  counts as a failed login, as a login timeout does (a balancer's silent connection does not: that would penalise
  the balancer).

Reads are byte-exact: the SSH code reads the socket directly afterwards, so not one byte past the header may be
consumed. v1: peek at what has arrived, take the bytes up to the first LF at most (every byte before it belongs to
the header), repeat until the line is whole; v2: exactly 16 bytes, then exactly the length they announce. Each
peek is followed by a read of at least one byte, so a sender dribbling a byte at a time costs one wake-up per byte.
"""
import logging
import socket

import gevent

from . import proxyproto
from .admission import Refused

log = logging.getLogger("kiln.frontdoor")
LIMIT = "proxy_protocol"          # the refusal's reason in logs and its label on /metrics (kiln_limit_rejections)
MODES = ("off", "optional", "required")


class Arrival:
    __slots__ = ("lease", "addr", "via", "header")

    def __init__(self, lease, addr, via=None, header=None):
        self.lease, self.addr, self.via, self.header = lease, addr, via, header


def _refused(detail, source):
    refusal = Refused(LIMIT, detail)
    refusal.source = source
    return refusal


class FrontDoor:
    def __init__(self, mode="off", trusted=()):
        if mode not in MODES:
            raise ValueError("proxy_protocol: expected one of %s, got %r" % (", ".join(MODES), mode))
        self.mode = mode
        self.trusted = proxyproto.Trusted(trusted)

    def admit(self, sock, addr, admission, timeout):
        """Arrival for a new connection, or Refused (with .source). Nothing is held when it raises."""
        source = addr[0]
        if self.mode == "off":
            return Arrival(_connect(admission, source), addr)
        if source in self.trusted:
            header = self._read(sock, source, timeout)
            if header is None and self.mode == "required":
                raise _refused("no PROXY header", source)
            client = header.source if header is not None and header.source is not None else None
            if client is None:
                return Arrival(_connect(admission, source), addr, header=header)
            return Arrival(_connect(admission, client[0]), client, via=addr, header=header)
        if self.mode == "required":
            raise _refused("untrusted source", source)
        lease = _connect(admission, source)
        try:
            first = self._peek_first(sock, source, timeout)
        except Refused as refusal:
            lease.release()
            if getattr(refusal, "timed_out", False) and admission.login_failed(source):
                # silent for all of timeouts.login: a login timeout, which counts toward the source's penalty
                log.warning("penalty source=%s seconds=%g failures=%d", source, admission.penalty_seconds,
                            admission.penalty_failures)
            raise
        except BaseException:
            lease.release()
            raise
        if proxyproto.sniff(first) is not None:
            lease.release()
            raise _refused("header from untrusted source", source)
        return Arrival(lease, addr)

    # -- reading --------------------------------------------------------------------------------------------------
    def _peek_first(self, sock, source, timeout):
        """The connection's first byte, left in the socket (b'' when the peer closed without sending anything)."""
        with _deadline(timeout, source, "nothing received"):
            return _recv(sock, 1, source, socket.MSG_PEEK)

    def _read(self, sock, source, timeout):
        """The header at the start of sock, consumed exactly; None when the connection does not start with one."""
        with _deadline(timeout, source, "no complete header"):
            first = _recv(sock, 1, source, socket.MSG_PEEK)
            kind = proxyproto.sniff(first)
            try:
                if kind == proxyproto.V1:
                    return proxyproto.parse_v1(self._read_v1(sock, source))
                if kind == proxyproto.V2:
                    fixed = _recv_exactly(sock, proxyproto.V2_FIXED, source)
                    rest = _recv_exactly(sock, proxyproto.v2_length(fixed), source)
                    return proxyproto.parse_v2(fixed + rest)
            except proxyproto.HeaderError as e:
                raise _refused(str(e), source) from None
            return None

    @staticmethod
    def _read_v1(sock, source):
        line = b""
        while True:
            peeked = _recv(sock, proxyproto.V1_MAX_LINE - len(line), source, socket.MSG_PEEK)
            if not peeked:
                raise _refused("connection closed inside the header", source)
            end = proxyproto.v1_header_end(line + peeked)
            take = len(peeked) if end is None else end - len(line)
            line += _recv_exactly(sock, take, source)
            if end is not None:
                return line


class _deadline:
    """gevent.Timeout for the header read; its expiry becomes a Refused."""

    def __init__(self, seconds, source, what):
        self.seconds, self.source, self.what = seconds, source, what

    def __enter__(self):
        self.timeout = gevent.Timeout(self.seconds)
        self.timeout.start()

    def __exit__(self, kind, value, tb):
        self.timeout.close()
        if value is self.timeout:
            refusal = _refused("%s within %gs" % (self.what, self.seconds), self.source)
            refusal.timed_out = True
            raise refusal from None
        return False


def _connect(admission, source):
    try:
        return admission.connect(source)
    except Refused as refusal:
        refusal.source = source
        raise


def _recv(sock, n, source, flags=0):
    try:
        return sock.recv(n, flags)
    except OSError as e:
        raise _refused("connection lost in the header (%s)" % (e.strerror or e.__class__.__name__), source) from None


def _recv_exactly(sock, n, source):
    data = b""
    while len(data) < n:
        chunk = _recv(sock, n - len(data), source)
        if not chunk:
            raise _refused("connection closed inside the header", source)
        data += chunk
    return data
