"""proxyproto: the PROXY protocol parser, without sockets. Examples from HAProxy's proxy-protocol.txt, each malformed
case we refuse, and hypothesis-generated headers checked against an independent implementation (the `proxy-protocol`
package, a test-only dependency) and against the byte count the header really has."""
import ipaddress
import socket
import struct

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from proxyprotocol.detect import ProxyProtocolDetect
from proxyprotocol.result import ProxyResultIPv4, ProxyResultIPv6, ProxyResultLocal, ProxyResultUnknown
from proxyprotocol.v1 import ProxyProtocolV1
from proxyprotocol.v2 import ProxyProtocolV2

from kiln import config, proxyproto
from kiln.errors import ConfigError
from kiln.proxyproto import HeaderError, parse

SIG = proxyproto.V2_SIGNATURE
SSH = b"SSH-2.0-OpenSSH_9.2p1 Debian-2+deb12u7\r\n"


def v2(command=1, fam=0x11, body=b"", length=None, version=2):
    return SIG + bytes([version << 4 | command, fam]) + struct.pack("!H", len(body) if length is None else length) + body


def inet(src="192.0.2.1", dst="198.51.100.2", sport=51000, dport=22):
    return socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)


def tlv(kind, value):
    return struct.pack("!BH", kind, len(value)) + value


def with_crc(header_without_crc_tlv):
    """Append a CRC32C TLV to a v2 header (length field updated) and fill in its checksum."""
    h = bytearray(header_without_crc_tlv + tlv(proxyproto.PP2_TYPE_CRC32C, b"\0\0\0\0"))
    struct.pack_into("!H", h, 14, len(h) - 16)
    struct.pack_into("!I", h, len(h) - 4, proxyproto.crc32c(bytes(h)))
    return bytes(h)


# -- version 1 -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("line, source, dest", [
    (b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n", ("192.168.0.1", 56324), ("192.168.0.11", 443)),
    (b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n", ("255.255.255.255", 65535),
     ("255.255.255.255", 65535)),
    (b"PROXY TCP4 0.0.0.0 10.0.0.1 0 22\r\n", ("0.0.0.0", 0), ("10.0.0.1", 22)),
    (b"PROXY TCP6 2001:db8::1 2001:DB8:0:0:0:0:0:2 4000 22\r\n", ("2001:db8::1", 4000), ("2001:db8::2", 22)),
    (b"PROXY TCP6 ::ffff:203.0.113.7 ::1 4000 22\r\n", ("203.0.113.7", 4000), ("::1", 22)),
    (b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
     ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535), ("ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff", 65535)),
])
def test_v1_lines(line, source, dest):
    header, used = parse(line + SSH)
    assert used == len(line)
    assert (header.version, header.command, header.source, header.dest) == (1, "PROXY", source, dest)


@pytest.mark.parametrize("line", [
    b"PROXY UNKNOWN\r\n",
    b"PROXY UNKNOWN ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
    b"PROXY UNKNOWN whatever the sender likes\r\n",
])
def test_v1_unknown_keeps_the_socket_address(line):
    assert len(line) <= 107
    header, used = parse(line + SSH)
    assert used == len(line) and header.source is None and header.command == "UNKNOWN"


@pytest.mark.parametrize("line, why", [
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n", "CRLF"),                          # a lone LF
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\r\n", "stray"),                     # a lone CR
    (b"PROXY TCP4 1.2.3.4\r 5.6.7.8 1 2\r\n", "stray"),
    (b"PROXY  TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),                   # two spaces
    (b"PROXY TCP4 1.2.3.4  5.6.7.8 1 2\r\n", "fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2 \r\n", "fields"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "fields"),
    (b"PROXY TCP5 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
    (b"PROXY tcp4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
    (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "protocol"),
    (b"PROXY TCP4 01.2.3.4 5.6.7.8 1 2\r\n", "IPv4"),                       # leading zero (octal?)
    (b"PROXY TCP4 256.2.3.4 5.6.7.8 1 2\r\n", "IPv4"),
    (b"PROXY TCP4 1.2.3 5.6.7.8 1 2\r\n", "IPv4"),
    (b"PROXY TCP4 1.2.3.4.5 5.6.7.8 1 2\r\n", "IPv4"),
    (b"PROXY TCP4 ::1 5.6.7.8 1 2\r\n", "IPv4"),                            # family mismatch
    (b"PROXY TCP6 1.2.3.4 ::1 1 2\r\n", "IPv6"),
    (b"PROXY TCP6 fe80::1%eth0 ::1 1 2\r\n", "IPv6"),                       # scope ids are not addresses
    (b"PROXY TCP6 1:2:3:4:5:6:7:8:9 ::1 1 2\r\n", "IPv6"),
    (b"PROXY TCP6 ::1::2 ::1 1 2\r\n", "IPv6"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 022 2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 +22 2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "port"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n", "port"),                # Arabic-Indic digit one
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", "incomplete"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r", "incomplete"),
    (b"PROXY\r\n", "PROXY "),
    (b"PROXY \r\n", "protocol"),
    (b"PROXX TCP4 1.2.3.4 5.6.7.8 1 2\r\n", "PROXY "),
    (b"PROXY UNKNOWN " + b"f" * 92 + b"\r\n", "107"),                     # 108 bytes
    (b"PROXY TCP4 " + b"1" * 200, "107"),
])
def test_v1_malformed(line, why):
    with pytest.raises(HeaderError, match=why):
        parse(line + b"SSH-2.0-x\r\n" if line.endswith(b"\n") else line)


def test_v1_line_end_is_found_without_reading_past_it():
    line = b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\r\n"
    for n in range(1, len(line)):
        assert proxyproto.v1_header_end(line[:n]) is None
    assert proxyproto.v1_header_end(line + SSH) == len(line)
    with pytest.raises(HeaderError):        # refused at the first byte that cannot start a line
        proxyproto.v1_header_end(b"PRX")


# -- version 2 -------------------------------------------------------------------------------------------------------
def test_v2_inet_inet6_and_what_follows_is_left():
    header, used = parse(v2(body=inet()) + SSH)
    assert (used, header.source, header.dest, header.family) == (28, ("192.0.2.1", 51000), ("198.51.100.2", 22),
                                                                  "INET")
    body = ipaddress.IPv6Address("2001:db8::7").packed + ipaddress.IPv6Address("::1").packed + struct.pack("!HH", 1, 2)
    header, used = parse(v2(fam=0x21, body=body) + SSH)
    assert (used, header.source, header.dest) == (52, ("2001:db8::7", 1), ("::1", 2))
    mapped = ipaddress.IPv6Address("::ffff:192.0.2.9").packed
    header, _ = parse(v2(fam=0x21, body=mapped + mapped + struct.pack("!HH", 3, 4)))
    assert header.source == ("192.0.2.9", 3)


def test_v2_local_and_families_without_an_address_keep_the_socket_address():
    cases = [
        v2(command=0, fam=0x00),                          # HAProxy's health check
        v2(command=0, fam=0x11, body=inet()),             # LOCAL: the address block is ignored
        v2(command=0, fam=0xFF, body=b"\xff" * 300),      # LOCAL ignores the family byte and skips len bytes
        v2(command=1, fam=0x00, body=b"junk"),            # UNSPEC
        v2(command=1, fam=0x10, body=inet()),             # INET, protocol UNSPEC
        v2(command=1, fam=0x12, body=inet()),             # UDP over IPv4: not an SSH client's; UNSPEC fallback
        v2(command=1, fam=0x31, body=b"/run/a.sock".ljust(108, b"\0") * 2),   # AF_UNIX
    ]
    for header_bytes in cases:
        header, used = parse(header_bytes + SSH)
        assert used == len(header_bytes) and header.source is None, header
    assert parse(cases[0])[0].local and not parse(cases[3])[0].local


def test_v2_tlvs_are_skipped_and_crc32c_checked():
    body = inet() + tlv(0x04, b"") + tlv(0x05, b"unique-id") + tlv(0x20, b"\x01\0\0\0\0" + tlv(0x21, b"TLSv1.3"))
    header, used = parse(v2(body=body) + SSH)
    assert used == 16 + len(body) and header.source == ("192.0.2.1", 51000)
    assert [k for k, _ in header.tlvs] == [0x04, 0x05, 0x20]
    good = with_crc(v2(body=inet() + tlv(0x05, b"id")))
    assert parse(good + SSH)[1] == len(good)
    bad = bytearray(good)
    bad[20] ^= 1                                   # a changed source address no longer matches the checksum
    with pytest.raises(HeaderError, match="CRC32C mismatch"):
        parse(bytes(bad))
    with pytest.raises(HeaderError, match="CRC32C TLV of 3"):
        parse(v2(body=inet() + tlv(0x03, b"abc")))


def test_crc32c_known_answers():
    # RFC 3720 appendix B.4 and the usual check value
    assert proxyproto.crc32c(b"123456789") == 0xE3069283
    assert proxyproto.crc32c(b"\0" * 32) == 0x8A9136AA
    assert proxyproto.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert proxyproto.crc32c(bytes(range(32))) == 0x46DD794E


@pytest.mark.parametrize("data, why", [
    (SIG[:11] + b"X" + b"\x21\x11\x00\x0c" + inet(), "signature"),
    (v2(version=1, body=inet()), "version 1"),
    (v2(version=3, body=inet()), "version 3"),
    (v2(command=2, body=inet()), "command 2"),
    (v2(command=0xF, body=inet()), "command 15"),
    (v2(fam=0x41, body=inet()), "family 4"),
    (v2(fam=0x13, body=inet()), "protocol 3"),
    (v2(fam=0x11, body=inet()[:11]), "too short for INET"),
    (v2(fam=0x21, body=inet() * 2), "too short for INET6"),
    (v2(fam=0x31, body=b"\0" * 215), "too short for UNIX"),
    (v2(fam=0x11, body=inet(), length=0xFFFF), "above our limit"),
    (v2(command=0, fam=0, body=b"", length=proxyproto.V2_MAX_LENGTH + 1), "above our limit"),
    (v2(body=inet() + b"\x05\x00"), "truncated TLV"),
    (v2(body=inet() + b"\x05\x00\x09abc"), "longer than the header"),
    (v2(body=inet())[:20], "incomplete"),
    (SIG + b"\x21", "incomplete"),
])
def test_v2_malformed(data, why):
    with pytest.raises(HeaderError, match=why):
        parse(data)


def test_sniff():
    assert proxyproto.sniff(b"P") == proxyproto.V1
    assert proxyproto.sniff(b"\r") == proxyproto.V2
    assert proxyproto.sniff(b"S") is None and proxyproto.sniff(b"") is None
    with pytest.raises(HeaderError, match="no PROXY"):
        parse(SSH)


# -- trusted sources and the config kind ------------------------------------------------------------------------------
def test_trusted_networks():
    trusted = proxyproto.Trusted(["127.0.0.1/32", "::1/128", "10.1.0.0/16"])
    assert "127.0.0.1" in trusted and "::1" in trusted and "10.1.200.3" in trusted
    assert "127.0.0.2" not in trusted and "10.2.0.1" not in trusted and "::2" not in trusted
    assert "::ffff:10.1.2.3" in trusted                 # a dual-stack listener's view of an IPv4 peer
    assert "not an address" not in trusted
    assert "127.0.0.1" not in proxyproto.Trusted([])


@pytest.mark.parametrize("value", [["10.0.0.0/33"], ["10.0.0.1/8"], ["banana"], ["10.0.0.0/8 "], [""], [24],
                                   "127.0.0.1/32", ["fe80::1%eth0/128"], ["::/129"]])
def test_bad_cidrs_are_config_errors(tmp_path, value):
    with pytest.raises(ConfigError, match=r"^proxy\.proxy_trusted: "):
        config.build({"proxy": {"proxy_trusted": value}}, str(tmp_path))


def test_proxy_settings(tmp_path):
    cfg = config.build({}, str(tmp_path))
    assert cfg.proxy.proxy_protocol == "off" and cfg.proxy.proxy_trusted == ["127.0.0.1/32", "::1/128"]
    cfg = config.build({"proxy": {"proxy_protocol": "required", "proxy_trusted": ["10.0.0.0/8", "2001:db8::/32",
                                                                                   "192.0.2.7"]}}, str(tmp_path))
    assert cfg.proxy.proxy_protocol == "required"
    assert cfg.proxy.proxy_trusted == ["10.0.0.0/8", "2001:db8::/32", "192.0.2.7/32"]
    with pytest.raises(ConfigError, match="proxy.proxy_protocol"):
        config.build({"proxy": {"proxy_protocol": "on"}}, str(tmp_path))


# -- generated headers against the independent implementation ---------------------------------------------------------
ipv4s = st.builds(ipaddress.IPv4Address, st.integers(0, 2 ** 32 - 1))
ipv6s = st.builds(ipaddress.IPv6Address, st.integers(0, 2 ** 128 - 1))
ports = st.integers(0, 65535)
trailing = st.one_of(st.just(SSH), st.binary(max_size=64))
tlv_lists = st.lists(st.tuples(st.sampled_from([0x01, 0x02, 0x04, 0x05, 0x20, 0x30, 0xE0, 0xEE]),
                               st.binary(max_size=40)), max_size=4)


def _oracle_source(result):
    """The client address the independent implementation found, None for 'keep the socket's address'."""
    if isinstance(result, (ProxyResultLocal, ProxyResultUnknown)):
        return None
    if isinstance(result, (ProxyResultIPv4, ProxyResultIPv6)):
        address = result.source[0]
        address = getattr(address, "ipv4_mapped", None) or address
        return str(address), result.source[1]
    raise AssertionError(result)


@settings(max_examples=400, deadline=None)
@given(family=st.sampled_from(["v1-4", "v1-6", "v1-unknown", "v2-4", "v2-6", "v2-local"]),
       src4=ipv4s, dst4=ipv4s, src6=ipv6s, dst6=ipv6s, sport=ports, dport=ports, tlvs=tlv_lists,
       crc=st.booleans(), rest=trailing)
def test_generated_headers_agree_with_the_oracle(family, src4, dst4, src6, dst6, sport, dport, tlvs, crc, rest):
    if family.startswith("v1"):
        if family == "v1-unknown":
            result = ProxyResultUnknown()
        elif family == "v1-4":
            result = ProxyResultIPv4((src4, sport), (dst4, dport))
        else:
            result = ProxyResultIPv6((src6, sport), (dst6, dport))
        data = ProxyProtocolV1().pack(result)          # the oracle writes the line
    else:
        # our own writer (the oracle's needs the crc32c package for TLVs), read back by the oracle below
        if family == "v2-local":
            data = v2(command=0, fam=0x00)
        elif family == "v2-4":
            data = v2(fam=0x11, body=src4.packed + dst4.packed + struct.pack("!HH", sport, dport)
                      + b"".join(tlv(k, v) for k, v in tlvs))
        else:
            data = v2(fam=0x21, body=src6.packed + dst6.packed + struct.pack("!HH", sport, dport)
                      + b"".join(tlv(k, v) for k, v in tlvs))
        if crc and family != "v2-local":
            data = with_crc(data)
    header, used = parse(data + rest)
    assert used == len(data)                            # not one byte of what follows is taken
    assert header.source == _oracle_source(ProxyProtocolDetect().unpack(data))
    if family in ("v2-4", "v2-6"):
        assert [k for k, _ in header.tlvs] == [k for k, _ in tlvs] + ([proxyproto.PP2_TYPE_CRC32C] if crc else [])


def _mutants():
    base = st.sampled_from([
        b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 443\r\n",
        b"PROXY TCP6 2001:db8::1 2001:db8::2 4000 22\r\n",
        b"PROXY UNKNOWN\r\n",
        v2(body=inet()),
        v2(fam=0x21, body=b"\x20\x01" + b"\0" * 30 + b"\x01\x02\x03\x04"),
        v2(body=inet() + tlv(0x05, b"id")),
        v2(command=0, fam=0),
    ])

    def mutate(data, edits):
        data = bytearray(data)
        for where, what, kind in edits:
            if not data:
                break
            i = where % len(data)
            if kind == 0:
                data[i] = what
            elif kind == 1:
                del data[i]
            else:
                data.insert(i, what)
        return bytes(data)
    return st.builds(mutate, base, st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255),
                                                      st.integers(0, 2)), min_size=1, max_size=3))


@settings(max_examples=1500, deadline=None)
@given(data=_mutants(), rest=trailing)
@example(data=b"PROXY TCP4 1.2.3.4 5.6.7.8 01 2\r\n", rest=b"")
@example(data=b"PROXY TCP4 1.2.3.4 5.6.7.8  1 2\r\n", rest=b"")
def test_mutated_headers_are_refused_or_read_as_the_oracle_reads_them(data, rest):
    """Whatever we accept, the oracle accepts and reads the same; whatever it refuses, we refuse. (We refuse more:
    it is lenient about ports, TLV framing and unknown families; that direction is covered by the examples above.)"""
    try:
        ours = parse(data + rest)
    except HeaderError:
        ours = None
    try:
        end = ours[1] if ours else len(data)
        theirs = ProxyProtocolDetect().unpack((data + rest)[:end])
    except Exception:                                   # the oracle raises its own errors, struct's and ValueError
        theirs = None
    if ours is None:
        return
    header, used = ours
    if header.family in ("UNIX",) or (header.version == 2 and data[13] & 0x0F == 2):
        return                                          # we keep the socket's address; the oracle decodes these
    assert theirs is not None, (data, header)
    assert header.source == _oracle_source(theirs), (data, header, theirs)
