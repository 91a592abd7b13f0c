"""Admin API tests.

Route tests call the Bottle WSGI app in-process (a wsgiref-style environ and start_response): no socket, no monkey
patching of the test process, a real session Registry with real Sessions, and a minimal fake server object. The
AdminServer is started (its WSGI server listens on 127.0.0.1:0 but is never connected to), so gc callbacks, the
/metrics collector and the sampler are wired exactly as in production; the sampler only runs when a test yields to the
hub (gevent.sleep).

Tests that need a real socket use `AdminFixture`: tests/admin_fixture_server.py in its own monkey-patched process
(test_dashboard.py imports it from here).
"""
import gc
import io
import json
import os
import queue
import re
import subprocess
import sys
import threading
import time
import tracemalloc
import urllib.error
import urllib.request
from types import SimpleNamespace
from wsgiref.util import setup_testing_defaults

import gevent
import gevent.events
import gevent.socket
import objgraph
import prometheus_client
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiln import admin, config, metrics, sessions
from kiln.keystore import Identity
from kiln.probes import Busy, Probes
from kiln.sampler import Sampler

TOKEN = "s3cret-token"
VERSION = "0.1.7-0123456789-20260101.120000"
GO_DURATION = re.compile(r"^(\d+h\d+m\d+s|\d+m\d+s|\d+s)$")
HERE = os.path.dirname(os.path.abspath(__file__))
FIXTURE_SCRIPT = os.path.join(HERE, "admin_fixture_server.py")
PROBLEMS = ("ResourceWarning", "Exception ignored", "Traceback")


# -- in-process plumbing -------------------------------------------------------------------------------------------
class Response:
    def __init__(self, status, headers, body):
        self.status = int(status.split()[0])
        self.headers = {k.lower(): v for k, v in headers}
        self.body = body

    @property
    def text(self):
        return self.body.decode("utf-8")

    def json(self):
        assert self.headers["content-type"].startswith("application/json"), self.headers
        return json.loads(self.body)


def call(adm, method, path, token=None, headers=None):
    """One request to a started AdminServer's WSGI app, in-process. The Host defaults to 127.0.0.1 with the port it
    is bound to, as curl sends it; headers={"Host": None} sends none."""
    path, _, query = path.partition("?")
    errors = io.StringIO()
    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "QUERY_STRING": query, "wsgi.input": io.BytesIO(b""),
               "CONTENT_LENGTH": "0", "wsgi.errors": errors, "HTTP_HOST": "127.0.0.1:%d" % adm.address[1]}
    setup_testing_defaults(environ)
    if token is not None:
        environ["HTTP_AUTHORIZATION"] = "Bearer " + token
    for name, value in (headers or {}).items():
        if value is None:
            environ.pop("HTTP_" + name.upper().replace("-", "_"), None)
        else:
            environ["HTTP_" + name.upper().replace("-", "_")] = value
    started = {}

    def start_response(status, response_headers, exc_info=None):
        started["status"], started["headers"] = status, response_headers

    chunks = adm.app(environ, start_response)
    try:
        body = b"".join(chunks)
    finally:
        if hasattr(chunks, "close"):
            chunks.close()
    return Response(started["status"], started["headers"], body)


def make_cfg(tmp_path, **admin_settings):
    settings = {"listen": "127.0.0.1:0", "token": TOKEN, "max_blocking_time": 0}
    settings.update(admin_settings)
    return config.build({"admin": settings}, str(tmp_path))


def add_session(registry, key, account="initech", name="Peter Gibbons", key_name="Laptop", authenticate=True):
    session = registry.add(sessions.Session(key, ("192.0.2.10", 40000)))
    if authenticate:
        registry.authenticate(session, Identity("SHA256:" + key, account, name, key_name))
        session.command, session.repo = "git-upload-pack 'initech/project.git'", "initech/project.git"
    session.closed = []
    session.set_closer(lambda: session.closed.append(session.close_reason))
    return session


@pytest.fixture
def registry():
    reg = sessions.Registry()
    add_session(reg, "aaaa0001")
    add_session(reg, "aaaa0002", account="umbrella", name="Albert Wesker", key_name="Build Server")
    add_session(reg, "aaaa0003", authenticate=False)
    return reg


@pytest.fixture
def fake_server():
    return SimpleNamespace(draining=False, started=time.time() - 3725, metrics=metrics.Metrics())


@pytest.fixture
def make_admin(tmp_path, registry, fake_server):
    started = []

    def make(sample_interval=5.0, limits=None, **admin_settings):
        server = admin.AdminServer(make_cfg(tmp_path, **admin_settings), fake_server, registry, VERSION,
                                   sample_interval=sample_interval, **(limits or {}))
        started.append(server)
        server.start()
        return server

    yield make
    for server in started:
        server.stop()


@pytest.fixture
def adm(make_admin):
    return make_admin()


def get(adm, path, token=TOKEN, **kw):
    return call(adm, "GET", path, token=token, **kw)


# -- auth ------------------------------------------------------------------------------------------------------------
PROTECTED = [("GET", "/"), ("GET", "/info"), ("GET", "/connections"), ("DELETE", "/connections/aaaa0001"),
             ("GET", "/metrics"), ("GET", "/debug/greenlets"), ("GET", "/debug/greenlets?debug=2"),
             ("GET", "/debug/heap"), ("GET", "/debug/gc"), ("GET", "/debug/samples"),
             ("POST", "/debug/tracemalloc/start"), ("POST", "/debug/tracemalloc/stop")]


@pytest.mark.parametrize("method,path", PROTECTED)
def test_every_route_but_healthz_needs_the_token(adm, registry, method, path):
    for token in (None, "wrong", TOKEN + "x", ""):
        r = call(adm, method, path, token=token)
        assert r.status == 401, (method, path, token)
        assert "unauthorized" in r.json()["error"]
        assert r.headers["www-authenticate"].startswith("Bearer")
    assert registry.get("aaaa0001").closed == []      # the refused DELETE did nothing
    assert not tracemalloc.is_tracing()


def test_the_token_opens_routes_as_header_or_query(adm):
    assert get(adm, "/info").status == 200
    assert call(adm, "GET", "/info", headers={"Authorization": "bearer " + TOKEN}).status == 200
    assert call(adm, "GET", "/info?token=" + TOKEN).status == 200       # how the browser opens the dashboard
    assert call(adm, "GET", "/info?token=nope").status == 401


def test_healthz_is_open_and_reports_draining(adm, fake_server):
    r = call(adm, "GET", "/healthz")
    assert (r.status, r.text.strip()) == (200, "ok")
    assert r.headers["content-type"].startswith("text/plain")
    fake_server.draining = True
    r = call(adm, "GET", "/healthz")
    assert r.status == 503
    assert r.text.strip() == "draining"


def test_no_token_configured_means_open(make_admin):
    adm = make_admin(token="")
    assert call(adm, "GET", "/info").status == 200
    assert call(adm, "GET", "/connections").status == 200


def test_cross_site_writes_are_refused_even_without_a_token(make_admin, registry):
    adm = make_admin(token="")
    own = "127.0.0.1:%d" % adm.address[1]
    evil = {"Origin": "http://evil.example"}
    r = call(adm, "DELETE", "/connections/aaaa0001", headers=evil)
    assert r.status == 403 and "cross-site" in r.json()["error"]
    assert call(adm, "POST", "/debug/tracemalloc/start", headers=evil).status == 403
    assert call(adm, "POST", "/debug/tracemalloc/start", headers={"Origin": "null"}).status == 403
    assert registry.get("aaaa0001").closed == [] and not tracemalloc.is_tracing()
    # the dashboard's own fetches (same origin) and clients that send no Origin are fine
    same = {"Origin": "http://" + own, "Sec-Fetch-Site": "same-origin"}
    assert call(adm, "DELETE", "/connections/aaaa0001", headers=same).status == 200
    assert call(adm, "DELETE", "/connections/aaaa0002").status == 200
    assert call(adm, "GET", "/info", headers=evil).status == 200       # reads are not writes


# -- browser safety: Host allow-list (DNS rebinding) and cross-site heavy routes -------------------------------------
def test_a_foreign_host_is_refused_on_every_route_but_healthz(make_admin, registry):
    adm = make_admin(token="")      # the default: no token, so this is all that stands in a rebinding page's way
    port = adm.address[1]
    for host in ("evil.example:%d" % port, "evil.example", "127.0.0.1:%d" % (port + 1), "127.0.0.1", "localhost",
                 "127.0.0.1.evil.example:%d" % port, "localhost:%d.evil.example" % port, "[::2]:%d" % port,
                 "127.0.0.1:%d:%d" % (port, port), "", "LOCALHOST:99999", None):
        for method, path in PROTECTED:
            r = call(adm, method, path, headers={"Host": host})
            assert r.status == 421, (host, method, path, r.status)
            assert "Host" in r.json()["error"]
        r = call(adm, "GET", "/healthz", headers={"Host": host})      # load balancers send their own Host
        assert (r.status, r.text) == (200, "ok\n")
    assert registry.get("aaaa0001").closed == [] and not tracemalloc.is_tracing()


def test_the_admin_s_own_names_pass(make_admin):
    adm = make_admin(token="")
    port = adm.address[1]
    for host in ("127.0.0.1:%d" % port, "localhost:%d" % port, "LocalHost:%d" % port, "[::1]:%d" % port,
                 "[0:0::1]:%d" % port):
        for path in ("/connections", "/debug/greenlets?debug=2", "/info", "/"):
            assert call(adm, "GET", path, headers={"Host": host}).status == 200, (host, path)
        assert call(adm, "DELETE", "/connections/ffffffff", headers={"Host": host}).status == 404


def test_configured_hosts_pass_with_or_without_a_port(make_admin):
    adm = make_admin(token="", hosts=["Admin.Example.com", "tunnel.example:8443", "[2001:db8::5]", "192.0.2.7:80"])
    port = adm.address[1]
    allowed = ["admin.example.com", "admin.example.com:443", "ADMIN.example.com:%d" % port, "tunnel.example:8443",
               "[2001:db8::5]:1234", "[2001:db8:0::5]", "192.0.2.7", "192.0.2.7:80"]
    for host in allowed:
        assert call(adm, "GET", "/connections", headers={"Host": host}).status == 200, host
        assert call(adm, "GET", "/debug/greenlets", headers={"Host": host}).status == 200, host
    assert call(adm, "GET", "/debug/heap", headers={"Host": "admin.example.com"}).status == 200
    for host in ("tunnel.example", "tunnel.example:%d" % port, "192.0.2.7:%d" % port, "sub.admin.example.com",
                 "evil.example:%d" % port):
        assert call(adm, "GET", "/connections", headers={"Host": host}).status == 421, host
    # an Origin on one of the configured names is this server's own (a reverse proxy terminating TLS)
    r = call(adm, "DELETE", "/connections/aaaa0001",
             headers={"Host": "admin.example.com", "Origin": "https://admin.example.com",
                      "Sec-Fetch-Site": "same-origin"})
    assert r.status == 200


@pytest.mark.parametrize("entry", ["a:b:c", "host:", "host:0", "host:99999", "[::1", "[nope]:80", "a/b", "user@host",
                                   "::1"])
def test_malformed_configured_hosts_are_a_config_error(tmp_path, registry, fake_server, entry):
    with pytest.raises(config.ConfigError, match="admin.hosts"):
        admin.AdminServer(make_cfg(tmp_path, hosts=[entry]), fake_server, registry, VERSION)


GUARDED = [("DELETE", "/connections/aaaa0001"), ("POST", "/debug/tracemalloc/start"),
           ("POST", "/debug/tracemalloc/stop"), ("GET", "/debug/heap"), ("GET", "/debug/heap?limit=3"),
           ("GET", "/debug/greenlets?debug=2"), ("GET", "/debug/greenlets?debug=1"), ("GET", "/debug/greenlets")]


@pytest.mark.parametrize("method,path", GUARDED)
def test_cross_site_browser_requests_cannot_change_state_or_do_heavy_work(make_admin, registry, method, path):
    adm = make_admin(token="")
    port = adm.address[1]
    cross = [{"Sec-Fetch-Site": "cross-site"},
             {"Sec-Fetch-Site": "same-site"},          # another port on localhost is the same site
             {"Sec-Fetch-Site": "same-site", "Origin": "http://localhost:%d" % (port + 1)},
             {"Sec-Fetch-Site": "something-new"},
             {"Origin": "http://evil.example"},
             {"Origin": "http://evil.example:%d" % port},
             {"Origin": "http://localhost:%d" % (port + 1)},
             {"Origin": "null"},
             {"Origin": "file://"},
             {"Origin": "http://127.0.0.1:%d/path" % port},
             {"Origin": "http://127.0.0.1:%d" % port, "Sec-Fetch-Site": "cross-site"}]
    for headers in cross:
        r = call(adm, method, path, headers=headers)
        assert r.status == 403, (headers, r.status)
        assert "cross-site" in r.json()["error"]
    assert registry.get("aaaa0001").closed == [] and not tracemalloc.is_tracing()
    # curl (no Origin, no Sec-Fetch-Site), a typed URL (none) and the page's own fetches (same-origin) pass
    for headers in ({}, {"Sec-Fetch-Site": "none"}, {"Sec-Fetch-Site": "same-origin"},
                    {"Sec-Fetch-Site": "same-origin", "Origin": "http://127.0.0.1:%d" % port},
                    {"Origin": "http://localhost:%d" % port}, {"Origin": "http://[::1]:%d" % port}):
        r = call(adm, method, path, headers=headers)
        assert r.status == 200, (headers, r.status, r.body[:200])
    tracemalloc.stop()


def test_light_reads_stay_open_to_cross_site_requests_but_not_to_foreign_hosts(make_admin):
    # the browser does not let the other site read these; a link from a wiki to the dashboard must still open it
    adm = make_admin(token="")
    cross = {"Sec-Fetch-Site": "cross-site", "Origin": "http://evil.example"}
    for path in ("/", "/info", "/connections", "/metrics", "/debug/gc", "/debug/samples"):
        assert call(adm, "GET", path, headers=cross).status == 200, path
        assert call(adm, "GET", path, headers=dict(cross, Host="evil.example:%d" % adm.address[1])).status == 421


def test_host_is_checked_before_the_token(make_admin):
    adm = make_admin()
    foreign = {"Host": "evil.example:%d" % adm.address[1]}
    assert call(adm, "GET", "/info", headers=foreign).status == 421
    assert call(adm, "GET", "/info", token=TOKEN, headers=foreign).status == 421
    assert call(adm, "GET", "/info").status == 401
    assert call(adm, "GET", "/debug/heap", token=TOKEN, headers={"Sec-Fetch-Site": "cross-site"}).status == 403


def test_refused_hosts_are_logged_without_flooding(make_admin, caplog):
    adm = make_admin(token="")
    with caplog.at_level("WARNING", logger="kiln.admin"):
        for _ in range(50):
            call(adm, "GET", "/info", headers={"Host": "evil.example\r\nFAKE LINE"})
    lines = [r.getMessage() for r in caplog.records if "not one of this server's names" in r.getMessage()]
    assert len(lines) == 1, lines
    assert "\n" not in lines[0] and "\\r\\n" in lines[0]


# -- the HTTP server: connection cap, header deadline, oversized requests (cooperative sockets on this hub) ----------
def _connect(adm):
    return gevent.socket.create_connection(adm.address, timeout=5)


def _read_all(sock, limit=1 << 20):
    """Everything the server sends until it closes (b"" if it closes at once); raises socket.timeout otherwise."""
    data = b""
    while len(data) < limit:
        chunk = sock.recv(65536)
        if not chunk:
            return data
        data += chunk
    return data


def _exchange(adm, request):
    sock = _connect(adm)
    try:
        sock.sendall(request)
        return _read_all(sock)
    finally:
        sock.close()


def _get(adm, path="/info"):
    return _exchange(adm, b"GET %s HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nConnection: close\r\n\r\n"
                     % (path.encode(), adm.address[1]))


def test_a_half_sent_request_is_closed_at_the_header_deadline(make_admin, caplog):
    adm = make_admin(token="", limits={"header_timeout": 0.5})
    slow = [_connect(adm) for _ in range(3)]
    try:
        slow[0].sendall(b"GET /inf")
        slow[1].sendall(b"GET /info HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
        began = time.monotonic()
        for sock in slow[:2]:       # trickling more does not help: it is a deadline, not an idle timeout
            sock.sendall(b"a")
        gevent.sleep(0.3)
        for sock in slow[:2]:
            sock.sendall(b"a")
        with caplog.at_level("WARNING", logger="kiln.admin"):
            assert [_read_all(sock) for sock in slow] == [b"", b"", b""]
        assert 0.3 < time.monotonic() - began < 2.0
    finally:
        for sock in slow:
            sock.close()
    lines = [r.getMessage() for r in caplog.records if "no complete request within 0.5s" in r.getMessage()]
    assert len(lines) == 1, lines           # one line, then counted
    assert _get(adm).startswith(b"HTTP/1.1 200 ")


def test_kept_alive_connections_serve_requests_and_close_when_idle(make_admin):
    adm = make_admin(token="", limits={"header_timeout": 0.5})
    sock = _connect(adm)
    try:
        f = sock.makefile("rb")
        for _ in range(3):
            gevent.sleep(0.3)       # 0.9 s in all: each request gets its own deadline, the app's time is not counted
            sock.sendall(b"GET /info HTTP/1.1\r\nHost: 127.0.0.1:%d\r\n\r\n" % adm.address[1])
            assert f.readline().startswith(b"HTTP/1.1 200 ")
            length = None
            while True:
                line = f.readline()
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
                if line == b"\r\n":
                    break
            assert json.loads(f.read(length))["Version"] == VERSION
        began = time.monotonic()
        assert f.read() == b""      # idle past the deadline: closed
        assert time.monotonic() - began < 2.0
        f.close()
    finally:
        sock.close()


def test_idle_connections_cannot_lock_operators_out(make_admin, caplog):
    adm = make_admin(token="", limits={"max_connections": 4, "header_timeout": 30})
    idle = []
    try:
        with caplog.at_level("WARNING", logger="kiln.admin"):
            for _ in range(12):
                sock = _connect(adm)
                sock.sendall(b"GET /info HTTP/1.1\r\n")
                idle.append(sock)
                gevent.sleep(0.01)
            began = time.monotonic()
            assert _get(adm).startswith(b"HTTP/1.1 200 ")
            assert time.monotonic() - began < 1.0
            gevent.sleep(0.1)
            assert len(adm.wsgi.pool) <= 4
            # the oldest were closed to make room; the newest still wait for their request
            for sock in idle[:8]:
                assert _read_all(sock) == b""
        lines = [r.getMessage() for r in caplog.records if "closed while waiting for a request" in r.getMessage()]
        assert len(lines) == 1 and "4 connections open" in lines[0], lines
        idle[-1].sendall(b"Host: 127.0.0.1:%d\r\nConnection: close\r\n\r\n" % adm.address[1])
        assert _read_all(idle[-1]).startswith(b"HTTP/1.1 200 ")
    finally:
        for sock in idle:
            sock.close()
    began = time.monotonic()
    adm.stop()      # the waiting ones are closed at once, not after the 2 s stop timeout
    assert time.monotonic() - began < 1.0


OVERSIZED = [
    (b"GET /" + b"a" * 9000 + b" HTTP/1.1\r\n\r\n", 414),
    (b"GET /info HTTP/1.1\r\nHost: h\r\nX-Big: " + b"a" * 40000 + b"\r\n\r\n", 431),
    (b"GET /info HTTP/1.1\r\nHost: h\r\nX-Huge: " + b"a" * 70000 + b"\r\n\r\n", 431),
    (b"GET /info HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"a" * 200) for i in range(150)) + b"\r\n", 431),
    (b"GET /info HTTP/1.1\r\n" + b"".join(b"X-%d: a\r\n" % i for i in range(150)) + b"\r\n", 431),
    (b"POST /debug/tracemalloc/start HTTP/1.1\r\nHost: h\r\nContent-Length: 1000000000\r\n\r\nabc", 413),
    (b"POST /debug/tracemalloc/start HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n1\r\na", 413),
    (b"GET /info HTTP/1.1\r\nHost: h\r\nContent-Length: x\r\n\r\n", 400),
    (b"NOT HTTP AT ALL\r\n\r\n", 400),
]


@pytest.mark.parametrize("request_bytes,status", OVERSIZED, ids=[str(i) for i in range(len(OVERSIZED))])
def test_oversized_or_malformed_requests_get_a_4xx_and_one_log_line(make_admin, caplog, capfd, request_bytes,
                                                                     status):
    adm = make_admin(token="")
    with caplog.at_level("WARNING", logger="kiln.admin"):
        answer = _exchange(adm, request_bytes)
    assert answer.startswith(b"HTTP/1.1 %d " % status), answer[:100]
    lines = [r.getMessage() for r in caplog.records if r.name == "kiln.admin"]
    assert len(lines) == 1 and ("refused: %d" % status) in lines[0], lines
    assert len(lines[0]) < 400
    out, err = capfd.readouterr()
    assert "Traceback" not in out + err and "Traceback" not in caplog.text
    assert not tracemalloc.is_tracing()
    assert _get(adm).startswith(b"HTTP/1.1 200 ")


def test_a_small_body_is_still_accepted(make_admin):
    adm = make_admin(token="")
    answer = _exchange(adm, b"POST /debug/tracemalloc/stop HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Length: 2\r\n"
                            b"Connection: close\r\n\r\n{}" % adm.address[1])
    assert answer.startswith(b"HTTP/1.1 200 ")


def test_errors_are_json(adm):
    r = get(adm, "/no/such/route")
    assert r.status == 404 and "error" in r.json()
    r = get(adm, "/debug/heap?limit=lots")
    assert r.status == 400 and "limit" in r.json()["error"]
    r = get(adm, "/debug/samples?since=yesterday")
    assert r.status == 400


# -- the interface ---------------------------------------------------------------------------------------------------
def test_info(adm):
    before = int(time.time())
    body = get(adm, "/info").json()
    assert set(body) == {"Version", "StartTimeEpochSecs", "CurrentTimeEpochSecs", "Uptime"}
    assert body["Version"] == VERSION
    assert isinstance(body["StartTimeEpochSecs"], int) and isinstance(body["CurrentTimeEpochSecs"], int)
    assert before <= body["CurrentTimeEpochSecs"] <= int(time.time())
    assert GO_DURATION.match(body["Uptime"])
    assert re.match(r"^1h2m([5-9]|1\d)s$", body["Uptime"]), body["Uptime"]


def test_connections_lists_authenticated_sessions(adm, registry):
    registry.get("aaaa0001").bytes_in, registry.get("aaaa0001").bytes_out = 1234, 5678
    body = get(adm, "/connections").json()
    assert body["CurrentUserCount"] == 2
    assert body["UnauthenticatedCount"] == 1
    users = {u["SessionKey"]: u for u in body["CurrentlyAuthenticatedUsers"]}
    assert set(users) == {"aaaa0001", "aaaa0002"}
    peter = users["aaaa0001"]
    for field in ("Account", "Name", "PublicKeyName", "SessionKey", "SessionDuration", "RemoteAddr", "Command",
                  "Repository", "BytesIn", "BytesOut"):
        assert field in peter
    assert (peter["Account"], peter["Name"], peter["PublicKeyName"]) == ("initech", "Peter Gibbons", "Laptop")
    assert (peter["BytesIn"], peter["BytesOut"]) == (1234, 5678)
    assert peter["RemoteAddr"] == "192.0.2.10:40000"
    assert GO_DURATION.match(peter["SessionDuration"])
    assert users["aaaa0002"]["PublicKeyName"] == "Build Server"


def test_delete_closes_the_session(adm, registry):
    session = registry.get("aaaa0002")
    r = call(adm, "DELETE", "/connections/aaaa0002", token=TOKEN)
    assert r.status == 200
    assert r.json() == {"closed": "aaaa0002"}
    assert session.closed == ["closed by admin"]
    assert registry.get("aaaa0001").closed == []


def test_delete_unknown_session_is_404(adm):
    r = call(adm, "DELETE", "/connections/ffffffff", token=TOKEN)
    assert r.status == 404
    assert r.json()["SessionKey"] == "ffffffff"


def parked_in_a_test():
    gevent.sleep(60)


def test_greenlets_count_and_dumps(adm):
    base = get(adm, "/debug/greenlets").json()
    assert isinstance(base["count"], int) and base["count"] >= 2
    assert base["sessions"] == 3 and base["authenticated"] == 2
    assert base["hub_held_secs"] >= 0 and "wall_secs" in base
    parked = [gevent.spawn(parked_in_a_test) for _ in range(25)]
    try:
        gevent.sleep(0)         # let them start and park
        now = get(adm, "/debug/greenlets").json()
        assert now["count"] >= base["count"] + 25
        assert now["states"]["suspended"] >= 25
        assert any(s["count"] >= 25 and "parked_in_a_test" in " ".join(s["stack"]) for s in now["stacks"])

        r = get(adm, "/debug/greenlets?debug=2")
        assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
        assert r.text.startswith("greenlet profile: total ")
        assert re.search(r"hub held [\d.]+s", r.text)
        assert r.text.count("in parked_in_a_test") >= 25
        assert "Spawned at:" in r.text

        grouped = get(adm, "/debug/greenlets?debug=1").text
        assert re.search(r"^(2[5-9]|[3-9]\d|\d{3,}) @ suspended$", grouped, re.M), grouped
    finally:
        gevent.killall(parked)


def test_heap_types_and_growth_use_the_apps_own_peak_stats(adm):
    objgraph_default = objgraph.growth.__defaults__[1]
    before = dict(objgraph_default)
    first = get(adm, "/debug/heap?limit=10").json()
    assert first["objects"] > 1000
    assert len(first["most_common_types"]) == 10
    assert all(set(t) == {"type", "count"} for t in first["most_common_types"])
    assert {"hub_held_secs", "hub_busy_secs", "wall_secs"} <= set(first)
    assert first["tracemalloc"] == {"tracing": False}

    class LeakyThing:
        pass
    hoard = [LeakyThing() for _ in range(3000)]
    second = get(adm, "/debug/heap?limit=50").json()
    grown = {g["type"]: g for g in second["growth"]}
    name = [n for n in grown if n.endswith("LeakyThing")]
    assert name and grown[name[0]]["delta"] >= 3000, second["growth"]
    assert adm.api.peak_stats                                   # ours was used ...
    assert objgraph.growth.__defaults__[1] == before            # ... and objgraph's shared default was not
    assert objgraph.growth.__defaults__[1] is objgraph_default
    del hoard


def test_tracemalloc_can_be_switched_at_run_time(adm):
    assert not tracemalloc.is_tracing()
    try:
        r = call(adm, "POST", "/debug/tracemalloc/start?frames=2", token=TOKEN)
        assert r.json() == {"tracing": True, "frames": 2, "changed": True}
        keep = [bytearray(1000) for _ in range(200)]
        heap = get(adm, "/debug/heap?limit=5").json()
        tm = heap["tracemalloc"]
        assert tm["tracing"] and tm["traced_bytes"] > 0 and len(tm["top"]) == 5
        assert set(tm["top"][0]) == {"file", "line", "size_bytes", "count"}
        assert call(adm, "POST", "/debug/tracemalloc/start", token=TOKEN).json()["changed"] is False
        r = call(adm, "POST", "/debug/tracemalloc/stop", token=TOKEN)
        assert r.json() == {"tracing": False, "changed": True}
        assert not tracemalloc.is_tracing()
        del keep
    finally:
        tracemalloc.stop()


def test_config_tracemalloc_traces_from_start_until_stop(tmp_path, registry, fake_server):
    server = admin.AdminServer(make_cfg(tmp_path, tracemalloc=True), fake_server, registry, VERSION)
    try:
        server.start()
        assert tracemalloc.is_tracing()
    finally:
        server.stop()
    assert not tracemalloc.is_tracing()


def test_gc_pauses_are_measured(adm):
    gc.collect()
    body = get(adm, "/debug/gc").json()
    assert body["measuring"] is True
    assert [g["generation"] for g in body["generations"]] == [0, 1, 2]
    assert body["generations"][2]["measured_collections"] >= 1
    assert body["pauses"]["count"] >= 1
    assert body["pauses"]["max_secs"] > 0 and body["pauses"]["total_secs"] >= body["pauses"]["max_secs"]
    last = body["recent"][-1]
    assert set(last) == {"time", "generation", "pause_secs", "collected", "uncollectable"}


def test_gc_callback_is_removed_on_stop(tmp_path, registry, fake_server):
    before = list(gc.callbacks)
    server = admin.AdminServer(make_cfg(tmp_path), fake_server, registry, VERSION)
    server.start()
    assert len(gc.callbacks) == len(before) + 1
    server.stop()
    server.stop()               # twice is fine
    assert gc.callbacks == before


# -- /metrics --------------------------------------------------------------------------------------------------------
def scrape(adm):
    r = get(adm, "/metrics")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/plain")
    samples = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_counters_move_with_the_hooks(adm, fake_server, registry):
    m = fake_server.metrics
    assert adm.metrics is m                     # the server's Metrics object is the one served
    before = scrape(adm)
    m.connection_opened()
    m.connection_opened()
    m.connection_closed()
    m.auth_failed()
    m.backend_error()
    m.backend_error("a backend this config does not have")
    m.limit_rejected("per_account")
    m.limit_rejected("something new")
    m.session_established(0.2)
    m.session_ended("completed", 12.0, 100, 2000)
    m.session_ended("closed by admin", 1.0, 1, 2)
    m.session_ended("a reason nobody planned", 1.0, 0, 0)
    after = scrape(adm)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("kiln_connections_total") == 2
    assert value(after, "kiln_connections_in_flight") == value(before, "kiln_connections_in_flight") + 1
    assert delta("kiln_auth_failures_total") == 1
    assert delta("kiln_backend_errors_total", backend="default") == 1
    assert delta("kiln_backend_errors_total", backend="other") == 1      # the label set stays the configured names
    assert delta("kiln_limit_rejections_total", limit="per_account") == 1
    assert delta("kiln_limit_rejections_total", limit="other") == 1
    assert delta("kiln_sessions_total", outcome="completed") == 1
    assert delta("kiln_sessions_total", outcome="closed_by_admin") == 1
    assert delta("kiln_sessions_total", outcome="other") == 1
    assert delta("kiln_relayed_bytes_total", direction="in") == 101
    assert delta("kiln_relayed_bytes_total", direction="out") == 2002
    assert delta("kiln_session_duration_seconds_count") == 3
    assert delta("kiln_session_duration_seconds_bucket", le="10.0") == 2
    assert delta("kiln_session_establish_seconds_count") == 1
    assert delta("kiln_session_establish_seconds_bucket", le="0.25") == 1

    # scrape-time series
    assert value(after, "kiln_sessions_live") == len(registry) == 3
    assert value(after, "kiln_sessions_authenticated") == 2
    assert value(after, "kiln_greenlets") >= 2
    assert value(after, "kiln_process_rss_bytes") > 1_000_000
    assert value(after, "kiln_process_open_fds") > 0
    assert value(after, "kiln_hub_blocked_events_total") == 0
    assert ("kiln_gc_pause_seconds_total", (("generation", "2"),)) in after


def test_metric_labels_stay_in_fixed_sets(adm, fake_server):
    for i in range(50):
        fake_server.metrics.session_ended("weird reason %d" % i, 1, 0, 0)
        fake_server.metrics.limit_rejected("limit-%d" % i)
    samples = scrape(adm)
    outcomes = {dict(labels)["outcome"] for name, labels in samples if name == "kiln_sessions_total"}
    limits = {dict(labels)["limit"] for name, labels in samples if name == "kiln_limit_rejections_total"}
    assert outcomes == set(metrics.OUTCOMES)
    assert limits == set(metrics.LIMITS)


def test_metrics_use_a_private_registry(adm):
    default_names = {m.name for m in prometheus_client.REGISTRY.collect()}
    assert not any(n.startswith("kiln_") for n in default_names)
    a, b = metrics.Metrics(), metrics.Metrics()     # two in one process must not collide
    a.auth_failed()
    assert b"kiln_auth_failures_total 0.0" in b.render()[0]


def test_openmetrics_when_asked(adm):
    r = get(adm, "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"})
    assert r.headers["content-type"].startswith("application/openmetrics-text")
    assert r.text.rstrip().endswith("# EOF")


@pytest.mark.parametrize("reason,label", [("completed", "completed"), ("idle timeout", "idle_timeout"),
                                          ("per-account limit", "per_account_limit"), ("Auth Failed", "auth_failed"),
                                          ("", "other"), (None, "other"), ("x" * 500, "other")])
def test_outcome_label(reason, label):
    assert metrics.outcome_label(reason) == label


def test_null_metrics_has_every_hook():
    hooks = [n for n in vars(metrics.NullMetrics) if not n.startswith("_")]
    assert set(hooks) == {"connection_opened", "connection_closed", "auth_failed", "limit_rejected", "backend_error",
                          "watchdog_closed", "session_established", "session_ended"}
    for name in hooks:
        assert getattr(metrics.Metrics, name) is not getattr(metrics.NullMetrics, name), name


def test_admin_serves_fresh_metrics_when_the_server_has_none(tmp_path, registry):
    server = admin.AdminServer(make_cfg(tmp_path), SimpleNamespace(draining=False, started=time.time(),
                                                                   metrics=metrics.NullMetrics()), registry, VERSION)
    try:
        server.start()
        samples = scrape(server)
        assert value(samples, "kiln_sessions_live") == 3
    finally:
        server.stop()


# -- heavy endpoints -------------------------------------------------------------------------------------------------
def test_heavy_routes_refuse_while_one_runs(adm):
    with adm.probes.heavy():
        for path in ("/debug/heap", "/debug/greenlets", "/debug/greenlets?debug=2"):
            r = get(adm, path)
            assert r.status == 429, path
            assert r.headers["retry-after"] == "1"
            assert "heavy" in r.json()["error"]
        assert get(adm, "/metrics").status == 200      # scrapes reuse the last greenlet count instead
        assert get(adm, "/info").status == 200
    assert get(adm, "/debug/heap").status == 200


def test_heavy_lock_is_released_when_the_job_fails(adm, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("boom")
    monkeypatch.setattr(objgraph, "growth", broken)
    assert get(adm, "/debug/heap").status == 500
    assert not adm.probes.heavy_running()
    monkeypatch.undo()
    assert get(adm, "/debug/heap").status == 200


def test_heavy_lock_raises_busy_instead_of_waiting():
    probes = Probes()
    with probes.heavy():
        with pytest.raises(Busy):
            with probes.heavy():
                pass


def test_greenlet_census_is_cached_within_its_budget():
    clock = [100.0]
    probes = Probes(clock=lambda: clock[0])
    first = probes.greenlet_count()
    assert first >= 1
    probes.record_census(12345, 0.05)       # a walk that held the hub 50 ms may run again after 5 s
    clock[0] += 1
    assert probes.greenlet_count() == 12345
    clock[0] += 10
    assert probes.greenlet_count() != 12345


# -- sampler ---------------------------------------------------------------------------------------------------------
SAMPLE_KEYS = {"t", "rss_bytes", "open_fds", "cpu_percent", "greenlets", "sessions", "authenticated",
               "bytes_in_per_sec", "bytes_out_per_sec", "gc_collections", "gc_pause_secs", "gc_pause_max_secs",
               "hub_blocked"}


def test_sampler_fills_a_bounded_ring_and_stops(make_admin, registry):
    adm = make_admin(sample_interval=0.05)
    assert adm.sampler.samples.maxlen == 18000         # 15 minutes at 0.05 s
    give_up = time.monotonic() + 10
    while len(adm.sampler.samples) < 3 and time.monotonic() < give_up:
        gevent.sleep(0.05)
    body = get(adm, "/debug/samples").json()
    assert body["interval_secs"] == 0.05 and body["window_secs"] == 900 and body["running"] is True
    assert len(body["samples"]) >= 3
    assert set(body["samples"][-1]) == SAMPLE_KEYS
    assert body["samples"][-1]["sessions"] == 3 and body["samples"][-1]["rss_bytes"] > 0
    since = body["samples"][-2]["t"]
    newer = get(adm, "/debug/samples?since=%r" % since).json()["samples"]
    assert [s["t"] for s in newer] == [s["t"] for s in body["samples"] if s["t"] > since]

    adm.stop()
    assert not adm.sampler.running
    count = len(adm.sampler.samples)
    gevent.sleep(0.2)
    assert len(adm.sampler.samples) == count


def test_sampler_computes_byte_rates(adm, registry, fake_server):
    sampler = adm.sampler
    sampler.sample()
    registry.get("aaaa0001").bytes_out += 500_000
    # an ended session's bytes move from the live sum to the metrics total: still counted once
    gone = registry.get("aaaa0002")
    gone.bytes_in += 1000
    registry.remove(gone)
    fake_server.metrics.session_ended("completed", 1, gone.bytes_in, gone.bytes_out)
    time.sleep(0.05)
    s = sampler.sample()
    assert s["bytes_out_per_sec"] > 50_000      # 500 kB within (much less than) 10 s
    # both rates share one interval: the ended session's 1000 bytes in were counted exactly once
    assert s["bytes_in_per_sec"] == pytest.approx(s["bytes_out_per_sec"] * 1000 / 500_000, rel=0.01)
    assert s["sessions"] == 2


def test_samples_window_is_bounded():
    sampler = Sampler(Probes(), sessions.Registry(), metrics.NullMetrics(), interval=5, window=900)
    assert sampler.samples.maxlen == 180
    for _ in range(200):
        sampler.sample()
    assert len(sampler.samples) == 180


# -- gevent monitor --------------------------------------------------------------------------------------------------
def test_blocked_hub_reports_are_logged_and_counted(caplog):
    probes = Probes()
    watch = admin.BlockedHubWatch(probes)
    info = ["=" * 80, "", "2026-01-01T00:00:00Z : Greenlet <x> appears to be blocked",
            "Blocked Stack (for thread id 0x1):", '  File "proxy.py", line 1, in busy_loop', "    while True: pass",
            "", "Info:", "*" * 80, "* Threads", "every other stack"]
    with caplog.at_level("WARNING", logger="kiln.monitor"):
        watch(gevent.events.EventLoopBlocked("<greenlet>", 0.5, info))
        watch(object())                         # other gevent events are not ours
    assert probes.hub_blocked == 1
    [record] = [r for r in caplog.records if r.name == "kiln.monitor"]
    text = record.getMessage()
    assert "hub blocked for more than 0.5s" in text and "busy_loop" in text
    assert "every other stack" not in text


def test_monitor_off_changes_nothing():
    assert admin.configure_monitor(0) is None
    assert admin.configure_monitor(-1) is None


# -- dashboard page --------------------------------------------------------------------------------------------------
def test_dashboard_page_is_self_contained(adm):
    r = call(adm, "GET", "/?token=" + TOKEN)
    assert r.status == 200 and r.headers["content-type"].startswith("text/html")
    page = r.text
    for placeholder in ("__NONCE__", "/*__CSS__*/", "//__JS__"):
        assert placeholder not in page
    nonce = re.search(r"script-src 'nonce-([^']+)'", r.headers["content-security-policy"]).group(1)
    assert '<script nonce="%s">' % nonce in page and '<style nonce="%s">' % nonce in page
    assert "default-src 'none'" in r.headers["content-security-policy"]
    assert not re.search(r"(src|href)=\"https?:", page)         # nothing from a CDN
    assert TOKEN not in page                                    # the script reads it from location
    for canvas in ("chart-rss", "chart-greenlets", "chart-sessions", "chart-bytes", "chart-gc"):
        assert 'id="%s"' % canvas in page
    assert r.headers["referrer-policy"] == "no-referrer"


# -- a real server in a real (monkey-patched) process ----------------------------------------------------------------
class AdminFixture:
    """Runs tests/admin_fixture_server.py in dev mode with ResourceWarning as an error; owns and stops the process."""

    def __init__(self, *args, startup_timeout=20.0):
        self.proc = subprocess.Popen(
            [sys.executable, "-X", "dev", "-W", "error::ResourceWarning", FIXTURE_SCRIPT] + list(args),
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=HERE)
        self.stdout = queue.Queue()
        self.stderr = []
        self._readers = [threading.Thread(target=self._pump, args=(self.proc.stdout, self.stdout.put), daemon=True),
                         threading.Thread(target=self._pump, args=(self.proc.stderr, self.stderr.append),
                                          daemon=True)]
        for t in self._readers:
            t.start()
        try:
            self.port = int(self.wait_for(r"^READY (\d+)$", startup_timeout).group(1))
        except AssertionError:
            self.stop()
            raise

    @staticmethod
    def _pump(stream, sink):
        for line in stream:
            sink(line.rstrip("\n"))

    def wait_for(self, pattern, timeout=10.0):
        """The first stdout line matching pattern (lines before it are consumed)."""
        give_up = time.monotonic() + timeout
        while True:
            left = give_up - time.monotonic()
            if left <= 0:
                raise AssertionError("fixture server: no line matching %r; stderr:\n%s"
                                     % (pattern, "\n".join(self.stderr[-40:])))
            try:
                line = self.stdout.get(timeout=min(left, 0.5))
            except queue.Empty:
                if self.proc.poll() is not None:
                    raise AssertionError("fixture server exited %s; stderr:\n%s"
                                         % (self.proc.returncode, "\n".join(self.stderr[-40:]))) from None
                continue
            m = re.search(pattern, line)
            if m:
                return m

    def url(self, path):
        return "http://127.0.0.1:%d%s" % (self.port, path)

    def request(self, path, token=None, method="GET", timeout=10):
        """(status, headers, body bytes)."""
        req = urllib.request.Request(self.url(path), method=method)
        if token:
            req.add_header("Authorization", "Bearer " + token)
        try:
            with urllib.request.urlopen(req, timeout=timeout) as resp:
                return resp.status, dict(resp.headers), resp.read()
        except urllib.error.HTTPError as e:
            with e:
                return e.code, dict(e.headers), e.read()

    def problems(self):
        return [line for line in self.stderr if any(p in line for p in PROBLEMS)]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.stdin.close()             # the server stops when its stdin closes
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for t in self._readers:
            t.join(timeout=5)
        for stream in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            stream.close()
        return self.proc.returncode


@pytest.fixture
def fixture_server():
    started = []

    def start(*args):
        server = AdminFixture(*args)
        started.append(server)
        return server

    yield start
    for server in started:
        status = server.stop()
        assert status == 0, "fixture server exited %s:\n%s" % (status, "\n".join(server.stderr[-40:]))
        assert not server.problems(), "\n".join(server.stderr)


def test_real_server_serves_routes_over_http(fixture_server):
    srv = fixture_server("--token", TOKEN)
    status, _, body = srv.request("/healthz")
    assert (status, body) == (200, b"ok\n")
    assert srv.request("/info")[0] == 401
    status, headers, body = srv.request("/info", token=TOKEN)
    assert status == 200 and json.loads(body)["Uptime"].startswith("1h2m")
    status, headers, body = srv.request("/metrics", token=TOKEN)
    assert status == 200
    names = {f.name for f in text_string_to_metric_families(body.decode())}
    assert {"kiln_sessions_live", "kiln_greenlets", "kiln_process_rss_bytes", "kiln_hub_blocked_events"} <= names
    status, _, body = srv.request("/connections/c10e0002", token=TOKEN, method="DELETE")
    assert status == 200
    assert srv.wait_for(r"^CLOSED (\w+) (.*)$").groups() == ("c10e0002", "closed by admin")
    users = json.loads(srv.request("/connections", token=TOKEN)[2])["CurrentlyAuthenticatedUsers"]
    assert [u["SessionKey"] for u in users] == ["c10e0001"]


def test_real_server_heavy_dumps_do_not_overlap(fixture_server):
    srv = fixture_server("--greenlets", "3000")
    barrier = threading.Barrier(4)
    results = []

    def fetch():
        barrier.wait()
        results.append(srv.request("/debug/greenlets?debug=2", timeout=30))
    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    statuses = sorted(r[0] for r in results)
    assert len(statuses) == 4 and set(statuses) <= {200, 429}, statuses
    assert 200 in statuses
    for status, headers, body in results:
        if status == 200:
            total = int(re.match(rb"greenlet profile: total (\d+)", body).group(1))
            assert total >= 3000
            assert re.search(rb"hub held [\d.]+s at most \(busy [\d.]+s over (\d+) pauses", body)
        else:
            assert headers["Retry-After"] == "1"
    # the dump gave the hub back while it worked, so cheap routes kept answering
    assert srv.request("/healthz")[0] == 200


def test_real_server_reports_a_blocked_hub(fixture_server):
    srv = fixture_server("--max-blocking-time", "0.05", "--block-hub", "0.3")
    give_up = time.monotonic() + 15
    blocked = 0
    while time.monotonic() < give_up:
        body = srv.request("/metrics")[2].decode()
        for family in text_string_to_metric_families(body):
            if family.name == "kiln_hub_blocked_events":
                blocked = family.samples[0].value
        if blocked >= 1:
            break
        time.sleep(0.1)
    assert blocked >= 1
    samples = json.loads(srv.request("/debug/samples")[2])["samples"]
    assert sum(s["hub_blocked"] for s in samples) >= 1
    srv.stop()
    log = "\n".join(srv.stderr)
    assert "hub blocked for more than 0.05s" in log
    assert "block_hub" in log           # the blocked stack names the guilty function
