"""End to end: the admin API of a real proxy process with real SSH sessions."""
import json
import os
import selectors
import signal
import socket
import subprocess
import sys
import time

import pytest

import harness
from kiln.admin import HEADER_TIMEOUT
from test_e2e_lifecycle import finish, held_session

pytestmark = pytest.mark.e2e
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def tokened(make_proxy):
    return make_proxy("ssh", admin={"token": TOKEN}, backend={"pool_idle": 0.5})


def request(proxy, path, method="GET", token=TOKEN):
    return harness.admin_get(proxy, path, token, method=method)


def test_token_required_except_healthz(tokened):
    assert request(tokened, "/info", token=None)[0] == 401
    assert request(tokened, "/connections", token="wrong")[0] == 401
    assert request(tokened, "/healthz", token=None) == (200, b"ok\n")
    status, body = request(tokened, "/info")
    assert status == 200
    info = json.loads(body)
    assert set(info) >= {"Version", "StartTimeEpochSecs", "CurrentTimeEpochSecs", "Uptime"}


def test_version_matches_cli(tokened):
    info = json.loads(request(tokened, "/info")[1])
    cli = subprocess.run([sys.executable, harness.KILNPROXY, "version"], capture_output=True, text=True, check=True)
    assert info["Version"] == cli.stdout.strip()


def test_connections_and_delete_end_a_real_session(tokened, keys):
    harness.make_git_repo(tokened.repo_root, "initech/admin.git", {"a": b"a"})
    before = json.loads(request(tokened, "/debug/greenlets")[1])["count"]
    held = held_session(tokened, keys["user"], "initech/admin.git")
    try:
        conns = json.loads(request(tokened, "/connections")[1])
        assert conns["CurrentUserCount"] == 1
        (user,) = conns["CurrentlyAuthenticatedUsers"]
        assert user["Account"] == "initech"
        assert user["Name"] == "Peter Gibbons"
        assert user["PublicKeyName"] == "Laptop"
        assert user["Command"] == "git-receive-pack 'initech/admin.git'"
        assert user["Repository"] == "initech/admin.git"
        assert user["BytesOut"] > 0
        assert user["RemoteAddr"].startswith("127.0.0.1:")
        assert user["SessionDuration"].endswith("s")
        key = user["SessionKey"]
        assert request(tokened, "/connections/nope1234", "DELETE")[0] == 404
        assert request(tokened, "/connections/%s" % key, "DELETE")[0] == 200
        held.wait(10)
        assert held.returncode != 0
        tokened.wait_for_log(r"%s end .*reason=closed by admin" % key)
    finally:
        harness.reap(held)
    assert json.loads(request(tokened, "/connections")[1])["CurrentUserCount"] == 0
    give_up = time.monotonic() + 15
    while json.loads(request(tokened, "/debug/greenlets")[1])["count"] > before:
        assert time.monotonic() < give_up, "greenlets did not return to baseline"
        time.sleep(0.1)


def test_metrics_count_real_sessions(tokened, keys):
    from prometheus_client.parser import text_string_to_metric_families
    harness.make_git_repo(tokened.repo_root, "initech/metrics.git", {"a": b"a"})

    def sample(name, **labels):
        text = request(tokened, "/metrics")[1].decode()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    completed = sample("kiln_sessions_total", outcome="completed")
    failed = sample("kiln_auth_failures_total")
    r = harness.run(["git", "ls-remote", tokened.url("initech/metrics.git")], env=harness.client_env(keys["user"]))
    assert r.returncode == 0
    harness.run(["git", "ls-remote", tokened.url("initech/metrics.git")], env=harness.client_env(keys["unknown"]))
    tokened.wait_for_log(r"auth failed source=")
    give_up = time.monotonic() + 10
    while sample("kiln_sessions_total", outcome="completed") < completed + 1 and time.monotonic() < give_up:
        time.sleep(0.1)
    assert sample("kiln_sessions_total", outcome="completed") >= completed + 1
    assert sample("kiln_auth_failures_total") >= failed + 1


def test_debug_dumps(tokened):
    status, body = request(tokened, "/debug/greenlets?debug=2")
    assert status == 200
    assert b"serve_forever" in body or b"_do_read" in body     # the listener's accept loop is among the stacks
    heap = json.loads(request(tokened, "/debug/heap")[1])
    assert heap["most_common_types"] and "growth" in heap
    gcs = json.loads(request(tokened, "/debug/gc")[1])
    assert gcs


def test_healthz_503_while_draining(make_proxy, keys):
    proxy = make_proxy("local", timeouts={"drain": 10.0})
    harness.make_git_repo(proxy.repo_root, "initech/h.git", {"a": b"a"})
    held = held_session(proxy, keys["user"], "initech/h.git")
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.wait_for_log("draining")
    assert harness.admin_get(proxy, "/healthz")[0] == 503
    assert finish(held)[0] == 0
    assert proxy.proc.wait(15) == 0


# -- browser safety and connection limits (security findings 7 and 9) ----------------------------------------------
def test_dns_rebinding_and_cross_site_requests_are_refused(proxy_local):
    # no admin.token (the default): a page that rebinds evil.example to 127.0.0.1 sends Host: evil.example:PORT
    proxy = proxy_local
    evil = {"Host": "evil.example:%d" % proxy.admin_port}
    for method, path in (("GET", "/connections"), ("GET", "/info"), ("GET", "/debug/heap"),
                         ("GET", "/debug/greenlets?debug=2"), ("DELETE", "/connections/abcd1234"),
                         ("POST", "/debug/tracemalloc/start")):
        status, body = harness.admin_get(proxy, path, method=method, headers=evil)
        assert status == 421, (method, path, status, body)
    assert harness.admin_get(proxy, "/healthz", headers=evil) == (200, b"ok\n")
    # a page on another site (or another port of localhost) cannot make the browser do heavy work or writes
    for headers in ({"Sec-Fetch-Site": "cross-site"}, {"Sec-Fetch-Site": "same-site"},
                    {"Origin": "http://evil.example"}, {"Origin": "http://localhost:%d" % (proxy.admin_port + 1)}):
        assert harness.admin_get(proxy, "/debug/heap", headers=headers)[0] == 403, headers
        assert harness.admin_get(proxy, "/debug/greenlets?debug=2", headers=headers)[0] == 403, headers
        assert harness.admin_get(proxy, "/debug/tracemalloc/start", method="POST", headers=headers)[0] == 403
        assert harness.admin_get(proxy, "/connections/abcd1234", method="DELETE", headers=headers)[0] == 403
    # curl-like clients, the operator's own names and the dashboard's same-origin fetches pass
    port = proxy.admin_port
    for headers in (None, {"Host": "localhost:%d" % port}, {"Host": "[::1]:%d" % port},
                    {"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:%d" % port}):
        assert harness.admin_get(proxy, "/connections", headers=headers)[0] == 200, headers
        assert harness.admin_get(proxy, "/debug/greenlets?debug=2", headers=headers)[0] == 200, headers
        assert harness.admin_get(proxy, "/connections/abcd1234", method="DELETE", headers=headers)[0] == 404


def test_configured_admin_hosts_are_answered(make_proxy):
    proxy = make_proxy("local", admin={"hosts": ["kiln-admin.example.net", "tunnel.example:8443"]})
    for host in ("kiln-admin.example.net", "kiln-admin.example.net:443", "tunnel.example:8443"):
        assert harness.admin_get(proxy, "/info", headers={"Host": host})[0] == 200, host
    for host in ("tunnel.example:%d" % proxy.admin_port, "evil.example:%d" % proxy.admin_port):
        assert harness.admin_get(proxy, "/info", headers={"Host": host})[0] == 421, host


def _open_fds(proxy):
    return len(os.listdir("/proc/%d/fd" % proxy.proc.pid))


def test_slowloris_connections_neither_lock_out_operators_nor_stay(make_proxy):
    proxy = make_proxy("local")
    baseline = _open_fds(proxy)
    partial = b"GET /info HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nX-Slow: " % proxy.admin_port
    held = []
    sel = selectors.DefaultSelector()
    try:
        for _ in range(1000):
            sock = socket.create_connection(("127.0.0.1", proxy.admin_port), timeout=10)
            held.append(sock)
            try:
                sock.sendall(partial)
            except OSError:         # already closed by the server to make room: that is allowed
                pass
        opened = began = time.monotonic()
        status, body = harness.admin_get(proxy, "/info", timeout=5)
        took = time.monotonic() - began
        assert status == 200 and json.loads(body)["Version"]
        assert took < 1.0, "GET /info took %.2fs while 1000 slowloris connections were held" % took
        # every one of them is closed by the server: to make room, or at the header deadline
        for sock in held:
            sock.setblocking(False)
            sel.register(sock, selectors.EVENT_READ)
        open_ones = len(held)
        give_up = opened + HEADER_TIMEOUT + 10
        while open_ones and time.monotonic() < give_up:
            for key, _ in sel.select(timeout=0.5):
                try:
                    data = key.fileobj.recv(4096)
                except BlockingIOError:
                    continue
                except ConnectionResetError:
                    data = b""
                assert data == b"", data[:100]      # closed without an answer, never a response to a half request
                sel.unregister(key.fileobj)
                open_ones -= 1
        assert open_ones == 0, "%d slowloris connections still open %.0fs after the last was opened" % (
            open_ones, time.monotonic() - opened)
    finally:
        sel.close()
        for sock in held:
            sock.close()
    assert harness.admin_get(proxy, "/info")[0] == 200
    give_up = time.monotonic() + 10
    while _open_fds(proxy) > baseline + 2:
        assert time.monotonic() < give_up, "admin descriptors not released: %d vs %d" % (_open_fds(proxy), baseline)
        time.sleep(0.1)
    lines = [ln for ln in proxy.read_log().splitlines() if "admin connection from" in ln]
    assert lines and len(lines) <= 10, lines        # rate-limited: not a line per connection


OVERSIZED = [     # the first made pywsgi print a traceback; the second of one status is counted, not logged
    ("many headers", b"GET /info HTTP/1.1\r\nHost: H\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(150))
     + b"\r\n", 431),
    ("long header", b"GET /info HTTP/1.1\r\nHost: H\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n", 431),
    ("long request line", b"GET /" + b"a" * 10_000 + b" HTTP/1.1\r\nHost: H\r\n\r\n", 414),
    ("huge body", b"POST /debug/tracemalloc/start HTTP/1.1\r\nHost: H\r\nContent-Length: 10000000000\r\n\r\n", 413),
]


def test_oversized_requests_get_a_4xx_and_one_log_line(make_proxy):
    proxy = make_proxy("local")
    for name, request_bytes, status in OVERSIZED:
        request_bytes = request_bytes.replace(b"Host: H", b"Host: 127.0.0.1:%d" % proxy.admin_port)
        with socket.create_connection(("127.0.0.1", proxy.admin_port), timeout=10) as sock:
            sock.sendall(request_bytes)
            answer = b""
            while len(answer) < 100_000:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 %d " % status), (name, answer[:200])
        proxy.wait_for_log(r"admin request from 127\.0\.0\.1:\d+ refused: %d " % status)
        assert harness.admin_get(proxy, "/info")[0] == 200
    log = proxy.read_log()
    assert "Traceback" not in log, log[-4000:]
    refused = [ln for ln in log.splitlines() if "refused: 4" in ln]
    assert len(refused) == 3 and all(len(ln) < 400 for ln in refused), refused     # one short line per status
    assert "refused: 431 'got more than 100 headers'" in refused[0]
    assert json.loads(harness.admin_get(proxy, "/debug/tracemalloc/stop", method="POST")[1])["changed"] is False
