"""PROXY protocol headers (HAProxy's doc/proxy-protocol.txt, versions 1 and 2): a strict parser without I/O.

A load balancer sends the header before the client's first byte; it names the client the balancer accepted. The
reader (frontdoor.py) reads exactly the header's bytes from the socket, because the SSH code reads the socket directly
after it; the functions here tell it how many bytes belong to the header and what they say:

- `sniff(first_byte)`: V1 ("P"), V2 ("\\r") or None (no header: an SSH client's first byte is "S");
- v1: `v1_header_end(data)` finds the end of the line (the first LF, within V1_MAX_LINE bytes), `parse_v1(line)`;
- v2: `v2_length(first16)` checks the fixed part and gives the length of the rest, `parse_v2(whole)`;
- `parse(data)`: a whole header at the start of data -> (Header, bytes it took), for tests and tools.

Anything that does not match the specification exactly raises HeaderError (the connection is then refused; nothing
is guessed). A header that is valid but carries no usable client address (v1 UNKNOWN, v2 LOCAL, AF_UNSPEC, AF_UNIX,
datagram protocols) gives a Header whose `source` is None: keep the socket's address, as the specification says.
"""
import ipaddress
import re
import socket
import struct

V1 = 1
V2 = 2
V1_PREFIX = b"PROXY "
V1_MAX_LINE = 107           # the longest valid line, CRLF included ("PROXY UNKNOWN" + two IPv6 addresses + ports)
V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V2_FIXED = 16               # signature, version/command, family/protocol, length
V2_MAX_LENGTH = 2048        # our bound on the v2 length field (addresses + TLVs); senders use well under 600 bytes
PP2_TYPE_CRC32C = 0x03

_V2_ADDRESS_LENGTH = {1: 12, 2: 36, 3: 216}        # AF_INET, AF_INET6, AF_UNIX
_FAMILY_NAMES = {0: "UNSPEC", 1: "INET", 2: "INET6", 3: "UNIX"}
_V1_IPV4 = re.compile(rb"(?:0|[1-9][0-9]{0,2})(?:\.(?:0|[1-9][0-9]{0,2})){3}\Z")
_V1_IPV6 = re.compile(rb"[0-9A-Fa-f:.]{2,45}\Z")
_V1_PORT = re.compile(rb"(?:0|[1-9][0-9]{0,4})\Z")


class HeaderError(ValueError):
    """Not a valid PROXY protocol header; the message says why, in a few words fit for a log line."""


class Header:
    """One parsed header. `source`/`dest`: (ip text, port) of the proxied connection, or None when the header says to
    keep the socket's own addresses (`local` is True for a v2 LOCAL command: the balancer's health check)."""

    __slots__ = ("version", "command", "family", "source", "dest", "tlvs")

    def __init__(self, version, command, family, source=None, dest=None, tlvs=()):
        self.version, self.command, self.family = version, command, family
        self.source, self.dest, self.tlvs = source, dest, tuple(tlvs)

    @property
    def local(self):
        return self.command == "LOCAL"

    def describe(self):
        """A short summary for logs: 'v2 PROXY INET', 'v1 UNKNOWN', 'v2 LOCAL'."""
        return " ".join(str(p) for p in ("v%d" % self.version, self.command, self.family) if p)

    def __repr__(self):
        return "Header(%s, source=%r, dest=%r)" % (self.describe(), self.source, self.dest)


def sniff(first):
    """What the first byte of a connection says: V1, V2, or None (not a PROXY header)."""
    if first[:1] == V1_PREFIX[:1]:
        return V1
    if first[:1] == V2_SIGNATURE[:1]:
        return V2
    return None


# -- version 1 -------------------------------------------------------------------------------------------------------
def v1_header_end(data):
    """The length of the v1 line at the start of data (up to and including its LF), or None when more bytes are needed.
    Raises HeaderError as soon as the bytes cannot start a valid line, so a reader never waits for more of them."""
    head = bytes(data[:len(V1_PREFIX)])
    if head != V1_PREFIX[:len(head)]:
        raise HeaderError("v1: line does not start with 'PROXY '")
    end = bytes(data[:V1_MAX_LINE]).find(b"\n")
    if end >= 0:
        return end + 1
    if len(data) >= V1_MAX_LINE:
        raise HeaderError("v1: no CRLF within %d bytes" % V1_MAX_LINE)
    return None


def parse_v1(line):
    """Parse one v1 line, CRLF included (as v1_header_end delimits it)."""
    line = bytes(line)
    if len(line) > V1_MAX_LINE:
        raise HeaderError("v1: line longer than %d bytes" % V1_MAX_LINE)
    if not line.startswith(V1_PREFIX):
        raise HeaderError("v1: line does not start with 'PROXY '")
    if not line.endswith(b"\r\n"):
        raise HeaderError("v1: line does not end in CRLF")
    body = line[len(V1_PREFIX):-2]
    if b"\r" in body or b"\n" in body:
        raise HeaderError("v1: stray CR or LF in the line")
    if body == b"UNKNOWN" or body.startswith(b"UNKNOWN "):
        # "the receiver must ignore anything presented before the CRLF": keep the socket's addresses
        return Header(V1, "UNKNOWN", None)
    parts = body.split(b" ")
    if parts[0] not in (b"TCP4", b"TCP6"):
        raise HeaderError("v1: unknown protocol %s" % _show(parts[0]))
    if len(parts) != 5:
        raise HeaderError("v1: expected 4 fields after %s, got %d" % (parts[0].decode(), len(parts) - 1))
    family, src, dst, sport, dport = parts
    if family == b"TCP4":
        src, dst = _v1_ipv4(src), _v1_ipv4(dst)
    else:
        src, dst = _v1_ipv6(src), _v1_ipv6(dst)
    return Header(V1, "PROXY", family.decode(), (src, _v1_port(sport)), (dst, _v1_port(dport)))


def _v1_ipv4(text):
    if not _V1_IPV4.match(text) or any(int(octet) > 255 for octet in text.split(b".")):
        raise HeaderError("v1: bad IPv4 address %s" % _show(text))
    return text.decode("ascii")


def _v1_ipv6(text):
    if not _V1_IPV6.match(text):
        raise HeaderError("v1: bad IPv6 address %s" % _show(text))
    try:
        packed = socket.inet_pton(socket.AF_INET6, text.decode("ascii"))
    except (OSError, ValueError):
        raise HeaderError("v1: bad IPv6 address %s" % _show(text)) from None
    return _ipv6_text(packed)


def _v1_port(text):
    if not _V1_PORT.match(text) or int(text) > 65535:
        raise HeaderError("v1: bad port %s" % _show(text))
    return int(text)


# -- version 2 -------------------------------------------------------------------------------------------------------
def v2_length(fixed):
    """Check the 16 fixed bytes of a v2 header; returns how many bytes follow them (the length field, bounded)."""
    fixed = bytes(fixed)
    if len(fixed) < V2_FIXED:
        raise HeaderError("v2: header shorter than %d bytes" % V2_FIXED)
    if fixed[:12] != V2_SIGNATURE:
        raise HeaderError("v2: bad signature")
    version, command = fixed[12] >> 4, fixed[12] & 0x0F
    if version != 2:
        raise HeaderError("v2: unsupported version %d" % version)
    if command not in (0, 1):
        raise HeaderError("v2: unknown command %d" % command)
    family, protocol = fixed[13] >> 4, fixed[13] & 0x0F
    length = struct.unpack_from("!H", fixed, 14)[0]
    if length > V2_MAX_LENGTH:
        raise HeaderError("v2: length %d above our limit of %d" % (length, V2_MAX_LENGTH))
    if command == 1:
        if family not in _FAMILY_NAMES:
            raise HeaderError("v2: unknown address family %d" % family)
        if protocol not in (0, 1, 2):
            raise HeaderError("v2: unknown transport protocol %d" % protocol)
        need = _V2_ADDRESS_LENGTH.get(family, 0) if protocol else 0
        if length < need:
            raise HeaderError("v2: length %d too short for %s addresses (%d)" % (length, _FAMILY_NAMES[family], need))
    return length


def parse_v2(data):
    """Parse a whole v2 header (the 16 fixed bytes and exactly the length they announce)."""
    data = bytes(data)
    length = v2_length(data[:V2_FIXED])
    if len(data) != V2_FIXED + length:
        raise HeaderError("v2: expected %d bytes, got %d" % (V2_FIXED + length, len(data)))
    if data[12] & 0x0F == 0:
        # LOCAL: "the receiver must ... use the real connection endpoints and discard the protocol block including
        # the family which is ignored"
        return Header(V2, "LOCAL", None)
    family, protocol = data[13] >> 4, data[13] & 0x0F
    name = _FAMILY_NAMES[family]
    if protocol == 0 or family == 0:
        # UNSPEC: "the receiver should ignore address information"
        return Header(V2, "PROXY", name)
    addresses_end = V2_FIXED + _V2_ADDRESS_LENGTH[family]
    tlvs = _tlvs(data, addresses_end)
    if family == 3 or protocol != 1:
        # AF_UNIX has no address we can use, and a datagram (UDP) client is not an SSH client: the specification
        # lets a receiver fall back to UNSPEC for the combinations it does not implement
        return Header(V2, "PROXY", name, tlvs=tlvs)
    block = data[V2_FIXED:addresses_end]
    if family == 1:
        src, dst, sport, dport = struct.unpack("!4s4sHH", block)
        src, dst = socket.inet_ntop(socket.AF_INET, src), socket.inet_ntop(socket.AF_INET, dst)
    else:
        src, dst, sport, dport = struct.unpack("!16s16sHH", block)
        src, dst = _ipv6_text(src), _ipv6_text(dst)
    return Header(V2, "PROXY", name, (src, sport), (dst, dport), tlvs)


def _tlvs(data, start):
    """The (type, value) pairs after the addresses; they must fill the rest exactly. A CRC32C one is checked."""
    tlvs = []
    i = start
    while i < len(data):
        if len(data) - i < 3:
            raise HeaderError("v2: truncated TLV")
        kind, size = data[i], struct.unpack_from("!H", data, i + 1)[0]
        if i + 3 + size > len(data):
            raise HeaderError("v2: TLV type 0x%02x longer than the header" % kind)
        value = data[i + 3:i + 3 + size]
        if kind == PP2_TYPE_CRC32C:
            if size != 4:
                raise HeaderError("v2: CRC32C TLV of %d bytes" % size)
            zeroed = data[:i + 3] + b"\0\0\0\0" + data[i + 7:]
            if crc32c(zeroed) != struct.unpack("!I", value)[0]:
                raise HeaderError("v2: CRC32C mismatch")
        tlvs.append((kind, value))
        i += 3 + size
    return tlvs


def _ipv6_text(packed):
    """An IPv6 address in its compressed form; an IPv4-mapped one (::ffff:a.b.c.d) as the IPv4 address, so a client
    counts as one source whichever family the balancer reported it in."""
    address = ipaddress.IPv6Address(packed)
    return str(address.ipv4_mapped or address)


def _show(text):
    return repr(bytes(text[:40]))[1:]


# -- both --------------------------------------------------------------------------------------------------------------
def parse(data):
    """The header at the start of data -> (Header, number of bytes it took). HeaderError when data does not start with
    a whole, valid header (a partial one included)."""
    data = bytes(data)
    kind = sniff(data[:1])
    if kind == V1:
        end = v1_header_end(data)
        if end is None:
            raise HeaderError("v1: incomplete line")
        return parse_v1(data[:end]), end
    if kind == V2:
        if len(data) < V2_FIXED:
            raise HeaderError("v2: incomplete header")
        end = V2_FIXED + v2_length(data[:V2_FIXED])
        if len(data) < end:
            raise HeaderError("v2: incomplete header")
        return parse_v2(data[:end]), end
    raise HeaderError("no PROXY protocol header")


def _crc32c_table():
    table = []
    for n in range(256):
        c = n
        for _ in range(8):
            c = (c >> 1) ^ 0x82F63B78 if c & 1 else c >> 1
        table.append(c)
    return tuple(table)


_CRC32C_TABLE = _crc32c_table()


def crc32c(data):
    """CRC32c (Castagnoli, RFC 4960 appendix B), as PP2_TYPE_CRC32C uses it. Headers are small: a table is enough."""
    crc = 0xFFFFFFFF
    table = _CRC32C_TABLE
    for byte in data:
        crc = table[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


# -- trusted sources (proxy.proxy_trusted) ----------------------------------------------------------------------------
def parse_networks(values, what="proxy_trusted"):
    """CIDR texts -> ip_network objects; ValueError naming the first bad one. Host bits set ('10.0.0.1/8') are an error:
    that is usually a typo for /32, and guessing either way would trust the wrong machines."""
    if not isinstance(values, list):
        raise ValueError("%s: expected a list of CIDR strings, got %r" % (what, values))
    networks = []
    for value in values:
        if not isinstance(value, str) or not value.isascii() or not value.isprintable() or "%" in value:
            raise ValueError("%s: bad CIDR %r" % (what, value))
        try:
            networks.append(ipaddress.ip_network(value))
        except ValueError as e:
            raise ValueError("%s: bad CIDR %r (%s)" % (what, value, e)) from None
    return networks


class Trusted:
    """Membership of a source address in proxy.proxy_trusted. An IPv4-mapped IPv6 address (a dual-stack listener's
    view of an IPv4 client) matches as its IPv4 address."""

    def __init__(self, networks):
        self.networks = tuple(parse_networks(list(networks)))

    def __contains__(self, host):
        try:
            address = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        mapped = getattr(address, "ipv4_mapped", None)
        return any(address in net or (mapped is not None and mapped in net) for net in self.networks)
