"""End to end: a real HAProxy (send-proxy-v2, send-proxy, health checks) in front of a real KilnProxy, real ssh and git
clients bound to other loopback addresses than HAProxy's (127.0.0.2, 127.0.0.3), and raw sockets for every way a
header can be wrong. The client's address must be the remote address everywhere (log lines, /connections, penalties);
refusals are logged with the socket's address, counted on /metrics, and leave nothing behind."""
import re
import socket
import struct
import subprocess
import threading
import time

import pytest

import harness
from kiln import proxyproto

pytestmark = pytest.mark.e2e

SERVERS = {"v2": "send-proxy-v2 check inter 300ms", "v1": "send-proxy",
           "v2crc": "send-proxy-v2 proxy-v2-options crc32c,authority"}


@pytest.fixture
def front(tmp_path):
    """start(proxy) -> a running HAProxy in front of it; stopped afterwards."""
    started = []

    def start(proxy, servers=None):
        h = harness.HAProxy(str(tmp_path / ("haproxy%d" % len(started))), proxy.port, servers or SERVERS).start()
        started.append(h)
        return h
    yield start
    for h in started:
        h.stop()


def client_env(key, bind):
    return harness.client_env(key, GIT_SSH_COMMAND=harness.ssh_command(key) + " -o BindAddress=" + bind)


def ls_remote(url, key, bind):
    return harness.run(["git", "ls-remote", url], env=client_env(key, bind), timeout=60)


def metric(proxy, name, labels=""):
    status, body = harness.admin_get(proxy, "/metrics")
    assert status == 200
    m = re.search(r"^%s%s (\S+)$" % (re.escape(name), re.escape(labels)), body.decode(), re.M)
    return float(m.group(1)) if m else None


def refusals(proxy):
    return metric(proxy, "kiln_limit_rejections_total", '{limit="proxy_protocol"}')


@pytest.mark.parametrize("variant", ["v2", "v1", "v2crc"])
def test_client_address_through_haproxy(make_proxy, front, keys, variant):
    proxy = make_proxy("local", proxy={"proxy_protocol": "required"})
    haproxy = front(proxy)
    harness.make_git_repo(proxy.repo_root, "initech/pp.git", {"a": b"a"})
    r = ls_remote(haproxy.url(variant, "initech/pp.git"), keys["user"], "127.0.0.2")
    assert r.returncode == 0, r.stderr
    assert b"refs/heads/main" in r.stdout
    m = proxy.wait_for_log(r"(\w{8}) start remote=127\.0\.0\.2:(\d+) via=127\.0\.0\.1:\d+")
    key, port = m.groups()
    proxy.wait_for_log(r"%s end remote=127\.0\.0\.2:%s via=127\.0\.0\.1:\d+ duration=.* reason=completed" % (key, port))
    # /connections shows the client's address while its session runs
    args = harness.ssh_args(keys["user"]) + ["-o", "BindAddress=127.0.0.3", "-p", str(haproxy.port(variant)),
                                             "git@127.0.0.1", "git-receive-pack 'initech/pp.git'"]
    held = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert held.stdout.readline(), held.stderr.read()
        (user,) = harness.admin_json(proxy, "/connections")["CurrentlyAuthenticatedUsers"]
        assert user["RemoteAddr"].startswith("127.0.0.3:"), user
    finally:
        harness.reap(held)
    assert not proxy.problems()


def test_penalty_is_the_clients_not_the_balancers(make_proxy, front, keys):
    proxy = make_proxy("local", proxy={"proxy_protocol": "optional"},
                       limits={"penalty_failures": 2, "penalty_seconds": 60.0})
    haproxy = front(proxy)
    harness.make_git_repo(proxy.repo_root, "initech/pen.git", {"a": b"a"})
    url = haproxy.url("v2", "initech/pen.git")
    for _ in range(2):
        assert ls_remote(url, keys["unknown"], "127.0.0.2").returncode != 0
    proxy.wait_for_log(r"\w{8} penalty source=127\.0\.0\.2 seconds=60 failures=2")
    # 127.0.0.2 is refused even with a good key, through HAProxy and via v1 too ...
    assert ls_remote(url, keys["user"], "127.0.0.2").returncode != 0
    assert ls_remote(haproxy.url("v1", "initech/pen.git"), keys["user"], "127.0.0.2").returncode != 0
    proxy.wait_for_log(r"refused source=127\.0\.0\.2 reason=penalty")
    # ... while 127.0.0.3 behind the same HAProxy, and HAProxy's own address, still get in
    r = ls_remote(url, keys["user"], "127.0.0.3")
    assert r.returncode == 0, r.stderr
    r = harness.run(["git", "ls-remote", proxy.url("initech/pen.git")], env=harness.client_env(keys["user"]))
    assert r.returncode == 0, r.stderr
    assert "source=127.0.0.1 reason=penalty" not in proxy.read_log()
    assert metric(proxy, "kiln_limit_rejections_total", '{limit="penalty"}') >= 2


def test_health_checks_are_neither_errors_nor_failed_logins(make_proxy, front, keys):
    proxy = make_proxy("local", proxy={"proxy_protocol": "required"}, limits={"penalty_failures": 1})
    before = proxy.read_log().count(" start ")
    front(proxy, {"v2": "send-proxy-v2 check inter 200ms", "v1": "send-proxy check inter 200ms"})
    give_up = time.monotonic() + 60
    while proxy.read_log().count(" start ") - before < 20 and time.monotonic() < give_up:
        time.sleep(0.2)
    log = proxy.read_log()
    assert log.count(" start ") - before >= 20, log[-3000:]
    # v2 checks are LOCAL (the socket's address, no via=); v1 checks name HAProxy's own connection
    assert re.search(r"start remote=127\.0\.0\.1:\d+\n", log)
    assert not re.search(r"(ERROR|auth failed|penalty|refused)", log), log[-3000:]
    assert metric(proxy, "kiln_auth_failures_total") == 0
    assert refusals(proxy) == 0
    assert not proxy.problems()
    harness.make_git_repo(proxy.repo_root, "initech/hc.git", {"a": b"a"})


def v2_header(src="203.0.113.9", sport=4242, dst="127.0.0.1", dport=2222):
    body = socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport)
    return proxyproto.V2_SIGNATURE + b"\x21\x11" + struct.pack("!H", len(body)) + body


def refused_raw(proxy, data, bind="127.0.0.1", pace=None):
    """Connect (from bind), send data (one byte every `pace` seconds if given) and return what the proxy sent back
    before it closed the connection."""
    got = b""
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30, source_address=(bind, 0)) as s:
        try:
            if pace is None:
                s.sendall(data)
            else:
                for i in range(len(data)):
                    s.sendall(data[i:i + 1])
                    time.sleep(pace)
            while True:
                chunk = s.recv(4096)
                if not chunk:
                    break
                got += chunk
        except (ConnectionResetError, BrokenPipeError):
            pass
    return got


MALFORMED = [
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2\nSSH-2.0-x\r\n", "v1: line does not end in CRLF"),
    (b"PROXY TCP4 1.2.3.456 5.6.7.8 1 2\r\nSSH-2.0-x\r\n", "v1: bad IPv4 address"),
    (b"PROXY TCP4 " + b"9" * 120, "v1: no CRLF within 107 bytes"),
    (b"PROXY TCP9 1.2.3.4 5.6.7.8 1 2\r\nSSH-2.0-x\r\n", "v1: unknown protocol"),
    (v2_header()[:12] + b"\x11" + v2_header()[13:] + b"SSH-2.0-x\r\n", "v2: unsupported version 1"),
    (v2_header()[:12] + b"\x23" + v2_header()[13:] + b"SSH-2.0-x\r\n", "v2: unknown command 3"),
    (v2_header()[:14] + b"\x40\x00" + b"\0" * 64, "v2: length 16384 above our limit"),
    (v2_header()[:15] + b"\x08" + v2_header()[16:24], "v2: length 8 too short for INET"),
    (v2_header()[:15] + b"\x0e" + v2_header()[16:] + b"\x05\x00", "v2: truncated TLV"),
]


def test_raw_refusals(make_proxy, keys):
    proxy = make_proxy("local", proxy={"proxy_protocol": "optional"}, timeouts={"login": 3.0})
    harness.make_git_repo(proxy.repo_root, "initech/raw.git", {"a": b"a"})
    baseline = harness.proxy_vitals(proxy)
    for n, (data, why) in enumerate(MALFORMED, 1):
        time.sleep(1.05)                  # refusal lines are rate-limited to one per reason and second
        assert refused_raw(proxy, data) == b"", why      # closed before our banner: nothing was authenticated
        proxy.wait_for_log(r"refused source=127\.0\.0\.1 reason=proxy_protocol \(%s" % re.escape(why))
        assert refusals(proxy) == n
    # a header dribbled one byte a second: the login timeout ends it, and it holds up no one else meanwhile
    time.sleep(1.05)
    started = time.monotonic()
    dribbled = []
    dribbler = threading.Thread(target=lambda: dribbled.append(
        refused_raw(proxy, b"PROXY TCP4 203.0.113.1 127.0.0.1 1 2\r\n", pace=1.0)))
    dribbler.start()
    try:
        r = harness.run(["git", "ls-remote", proxy.url("initech/raw.git")], env=harness.client_env(keys["user"]))
        assert r.returncode == 0, r.stderr
    finally:
        dribbler.join(60)
    assert dribbled == [b""]
    assert time.monotonic() - started < 30
    proxy.wait_for_log(r"refused source=127\.0\.0\.1 reason=proxy_protocol \(no complete header within 3s\)")
    assert refusals(proxy) == len(MALFORMED) + 1
    harness.wait_for_baseline(proxy, baseline)
    # still serving, with and without a header
    assert harness.run(["git", "ls-remote", proxy.url("initech/raw.git")],
                       env=harness.client_env(keys["user"])).returncode == 0
    assert not proxy.problems()


def test_header_from_an_untrusted_source(make_proxy, keys):
    proxy = make_proxy("local", proxy={"proxy_protocol": "optional", "proxy_trusted": ["10.0.0.0/8"]})
    harness.make_git_repo(proxy.repo_root, "initech/untrusted.git", {"a": b"a"})
    baseline = harness.proxy_vitals(proxy)
    assert refused_raw(proxy, v2_header() + b"SSH-2.0-x\r\n") == b""
    proxy.wait_for_log(r"refused source=127\.0\.0\.1 reason=proxy_protocol \(header from untrusted source\)")
    time.sleep(1.05)
    assert refused_raw(proxy, b"PROXY TCP4 203.0.113.1 127.0.0.1 1 2\r\nSSH-2.0-x\r\n", bind="127.0.0.2") == b""
    proxy.wait_for_log(r"refused source=127\.0\.0\.2 reason=proxy_protocol \(header from untrusted source\)")
    assert refusals(proxy) == 2
    assert "203.0.113" not in proxy.read_log()          # the claimed address is never believed, not even logged
    harness.wait_for_baseline(proxy, baseline)
    # without a header the same source is an ordinary direct client
    r = harness.run(["git", "ls-remote", proxy.url("initech/untrusted.git")], env=harness.client_env(keys["user"]))
    assert r.returncode == 0, r.stderr
    assert not proxy.problems()


def test_required_refuses_a_connection_without_a_header(make_proxy, keys):
    proxy = make_proxy("local", proxy={"proxy_protocol": "required"})
    harness.make_git_repo(proxy.repo_root, "initech/req.git", {"a": b"a"})
    baseline = harness.proxy_vitals(proxy)
    r = harness.run(["git", "ls-remote", proxy.url("initech/req.git")], env=harness.client_env(keys["user"]))
    assert r.returncode != 0
    proxy.wait_for_log(r"refused source=127\.0\.0\.1 reason=proxy_protocol \(no PROXY header\)")
    time.sleep(1.05)
    assert refused_raw(proxy, b"SSH-2.0-x\r\n", bind="127.0.0.2") == b""
    proxy.wait_for_log(r"refused source=127\.0\.0\.2 reason=proxy_protocol \(untrusted source\)")
    assert refusals(proxy) == 2
    assert "auth failed" not in proxy.read_log()
    harness.wait_for_baseline(proxy, baseline)
    # a header from the trusted address, then a real SSH client's bytes: served, as the client in the header
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as s:
        s.sendall(v2_header(src="198.51.100.77", sport=5555))
        s.settimeout(10)
        assert s.recv(64).startswith(b"SSH-2.0-")
    proxy.wait_for_log(r"start remote=198\.51\.100\.77:5555 via=127\.0\.0\.1:\d+")
    # a v2 LOCAL header (a health check) followed by SSH: served with the socket's own address
    with socket.create_connection(("127.0.0.1", proxy.port), timeout=30) as s:
        s.sendall(proxyproto.V2_SIGNATURE + b"\x20\x00\x00\x00" + b"SSH-2.0-OpenSSH_9.2p1\r\n")
        s.settimeout(10)
        assert s.recv(64).startswith(b"SSH-2.0-")
        local_port = s.getsockname()[1]
    proxy.wait_for_log(r"start remote=127\.0\.0\.1:%d\n" % local_port)
    harness.wait_for_baseline(proxy, baseline)
    assert not proxy.problems()


@pytest.mark.parametrize("line", ['proxy_trusted = ["10.0.0.1/8"]', 'proxy_trusted = ["10.0.0.0/33"]',
                                  'proxy_trusted = "10.0.0.0/8"', 'proxy_protocol = "yes"'])
def test_bad_proxy_settings_are_config_errors(tmp_path, line):
    path = tmp_path / "kilnproxy.toml"
    path.write_text('state_dir = "var"\n[proxy]\nlisten = "127.0.0.1:0"\n%s\n' % line)
    r = subprocess.run([harness.PYTHON, harness.KILNPROXY, "serve", "--config", str(path)], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 2, r
    assert len(r.stderr.strip().splitlines()) == 1 and "proxy.proxy_" in r.stderr, r.stderr
    assert not (tmp_path / "var").exists()
