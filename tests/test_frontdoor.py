"""frontdoor.FrontDoor on gevent socket pairs: the policy (off/optional/required, trusted sources), admission against
the real client's address, and byte-exact reads: what is left in the socket after the header is exactly what the
client sent after it, however the header was split, dribbled or cut short."""
import itertools
import struct
from types import SimpleNamespace

import gevent
import pytest
from gevent import socket

from kiln import proxyproto
from kiln.admission import Admission, Refused
from kiln.frontdoor import FrontDoor

BALANCER = ("127.0.0.1", 40000)
STRANGER = ("192.0.2.50", 40001)
SSH = b"SSH-2.0-OpenSSH_9.2p1\r\n" + bytes(range(256)) * 4
V1 = b"PROXY TCP4 198.51.100.7 127.0.0.1 51234 2222\r\n"
V2 = (proxyproto.V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", 12 + 8) + bytes([198, 51, 100, 8, 127, 0, 0, 1])
      + struct.pack("!HH", 51235, 2222) + b"\x05\x00\x05abcde")
V2_LOCAL = proxyproto.V2_SIGNATURE + b"\x20\x00\x00\x00"


def admission(**over):
    limits = dict(max_connections=1000, max_dials=16, max_startups=10, per_source_startups=10, per_source_queue=10,
                  startups_drop="100:30:200", per_account=2, penalty_failures=2, penalty_seconds=30.0)
    limits.update(over)
    return Admission(SimpleNamespace(**limits))


@pytest.fixture
def pair():
    ours, theirs = socket.socketpair()
    yield ours, theirs
    ours.close()
    theirs.close()


def rest_of(sock, n):
    """The next n bytes left in sock (what the SSH code would read)."""
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        assert chunk
        data += chunk
    return data


def feed(sock, data, pieces=None, pause=0.0):
    """Send data from a greenlet, split at the given lengths (then the rest)."""
    def run():
        rest = data
        for n in pieces or ():
            sock.sendall(rest[:n])
            rest = rest[n:]
            gevent.sleep(pause)
        sock.sendall(rest)
    return gevent.spawn(run)


@pytest.mark.parametrize("header, client", [(V1, ("198.51.100.7", 51234)), (V2, ("198.51.100.8", 51235))])
@pytest.mark.parametrize("split", ["whole", "bytewise", "odd"])
def test_header_is_read_exactly_and_the_lease_counts_the_client(pair, header, client, split):
    ours, theirs = pair
    pieces = {"whole": None, "bytewise": [1] * (len(header) + 3), "odd": [1, 5, 7, 3, 11]}[split]
    sender = feed(theirs, header + SSH, pieces)
    a = admission()
    arrival = FrontDoor("optional", ["127.0.0.1/32"]).admit(ours, BALANCER, a, 5)
    assert arrival.addr == client and arrival.via == BALANCER
    assert arrival.lease.source == client[0] and a._source_unauthenticated == {client[0]: 1}
    assert rest_of(ours, len(SSH)) == SSH
    sender.get(timeout=5)
    arrival.lease.release()


@pytest.mark.parametrize("mode", ["optional", "required"])
def test_v2_local_and_v1_unknown_keep_the_socket_address(pair, mode):
    for header in (V2_LOCAL, b"PROXY UNKNOWN\r\n"):
        ours, theirs = socket.socketpair()
        with ours, theirs:
            theirs.sendall(header + SSH)
            arrival = FrontDoor(mode, ["127.0.0.0/8"]).admit(ours, BALANCER, admission(), 5)
            assert arrival.addr == BALANCER and arrival.via is None and arrival.header.source is None
            assert rest_of(ours, len(SSH)) == SSH
            arrival.lease.release()


def test_optional_without_a_header_leaves_every_byte(pair):
    ours, theirs = pair
    theirs.sendall(SSH)
    for source in (BALANCER, STRANGER):          # trusted or not, a direct client is served as it came
        arrival = FrontDoor("optional", ["127.0.0.1/32"]).admit(ours, source, admission(), 5)
        assert arrival.addr == source and arrival.via is None
        arrival.lease.release()
    assert rest_of(ours, len(SSH)) == SSH


def test_off_reads_nothing(pair):
    ours, theirs = pair
    theirs.sendall(V1 + SSH)
    arrival = FrontDoor("off", ["127.0.0.1/32"]).admit(ours, BALANCER, admission(), 5)
    assert arrival.addr == BALANCER
    assert rest_of(ours, len(V1)) == V1
    arrival.lease.release()


def refusal(pair, data, mode="optional", source=BALANCER, trusted=("127.0.0.1/32",), timeout=5, a=None,
            close=False):
    ours, theirs = pair
    if data:
        theirs.sendall(data)
    if close:
        theirs.close()
    a = a or admission()
    with pytest.raises(Refused) as info:
        FrontDoor(mode, list(trusted)).admit(ours, source, a, timeout)
    assert info.value.limit == "proxy_protocol" and info.value.source == source[0]
    assert not a._source_unauthenticated, "a refused connection holds no lease"
    return info.value.detail


@pytest.mark.parametrize("data, why", [
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\n" + SSH, "CRLF"),
    (b"PROXY TCP4 300.2.3.4 5.6.7.8 1 2\r\n" + SSH, "IPv4"),
    (b"PROXY " + b"x" * 200, "107"),
    (b"PRXY", "PROXY"),
    (proxyproto.V2_SIGNATURE + b"\x31\x11\x00\x0c" + b"\0" * 12, "version 3"),
    (proxyproto.V2_SIGNATURE + b"\x21\x11\xff\xff", "above our limit"),
    (proxyproto.V2_SIGNATURE[:8] + b"XXXX\x21\x11\x00\x0c" + b"\0" * 12, "signature"),
])
def test_malformed_headers_are_refused(pair, data, why):
    assert why in refusal(pair, data)


def test_header_cut_short_by_a_close(pair):
    assert "closed inside the header" in refusal(pair, V1[:20], close=True)
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert "closed inside the header" in refusal((ours, theirs), V2[:20], close=True)


def test_header_from_an_untrusted_source_is_refused_not_ignored(pair):
    assert refusal(pair, V2 + SSH, source=STRANGER) == "header from untrusted source"
    ours, theirs = socket.socketpair()
    with ours, theirs:
        assert refusal((ours, theirs), V1 + SSH, trusted=()) == "header from untrusted source"


def test_required(pair):
    assert refusal(pair, SSH, mode="required") == "no PROXY header"
    ours, theirs = socket.socketpair()
    with ours, theirs:
        # an untrusted source is refused at once, before anything is read
        assert refusal((ours, theirs), b"", mode="required", source=STRANGER) == "untrusted source"


def test_dribbled_header_ends_at_the_deadline(pair):
    ours, theirs = pair
    sender = feed(theirs, V1, [1] * len(V1), pause=0.05)
    detail = refusal((ours, theirs), b"", timeout=0.3)
    assert detail == "no complete header within 0.3s"
    sender.kill()


def test_silent_untrusted_client_under_optional_counts_as_a_login_timeout(pair):
    a = admission(penalty_failures=1)
    assert refusal(pair, b"", source=STRANGER, timeout=0.2, a=a) == "nothing received within 0.2s"
    with pytest.raises(Refused, match="penalty"):
        a.connect(STRANGER[0])


def test_penalty_applies_to_the_client_not_the_balancer(pair):
    a = admission()
    a.penalties.failure("198.51.100.7")
    a.penalties.failure("198.51.100.7")
    ours, theirs = pair
    theirs.sendall(V1 + SSH)
    with pytest.raises(Refused) as info:
        FrontDoor("optional", ["127.0.0.1/32"]).admit(ours, BALANCER, a, 5)
    assert (info.value.limit, info.value.source) == ("penalty", "198.51.100.7")
    ours2, theirs2 = socket.socketpair()
    with ours2, theirs2:
        theirs2.sendall(V2 + SSH)
        arrival = FrontDoor("optional", ["127.0.0.1/32"]).admit(ours2, BALANCER, a, 5)
        assert arrival.addr[0] == "198.51.100.8"
        arrival.lease.release()


def test_generated_splits_never_lose_or_take_a_byte():
    """Every way of cutting a header plus SSH bytes into three sends leaves exactly the SSH bytes."""
    for header in (V1, V2, V2_LOCAL):
        data = header + SSH[:40]
        for i, j in itertools.combinations(range(1, len(header) + 2, 3), 2):
            ours, theirs = socket.socketpair()
            with ours, theirs:
                sender = feed(theirs, data, [i, j - i])
                arrival = FrontDoor("required", ["127.0.0.1/32"]).admit(ours, BALANCER, admission(), 5)
                assert rest_of(ours, 40) == SSH[:40]
                sender.get(timeout=5)
                arrival.lease.release()


def test_bad_mode():
    with pytest.raises(ValueError):
        FrontDoor("sometimes")
