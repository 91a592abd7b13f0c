"""The admin HTTP API and dashboard: a Bottle app served by gevent's WSGI server inside the proxy's process.

Routes (interface.md): GET /info, GET /connections, DELETE /connections/<SessionKey>, GET /debug/greenlets
(?debug=1 grouped stacks, ?debug=2 every stack), GET /debug/heap, GET /metrics, GET /healthz. Extensions: GET / (the
dashboard), GET /debug/gc, GET /debug/samples, POST /debug/tracemalloc/start and /stop.

Auth: with admin.token set, every route but /healthz needs "Authorization: Bearer <token>". A browser cannot add that
header to a typed URL, so the token is also accepted as ?token=...; the dashboard reads it from its own URL and sends
the header on its fetches. The default stays "" (no token, interface.md): generating one would break every operator's
curl script on upgrade; what protects a tokenless admin from web pages is the browser safety below, not the token.

Browser safety (one Bottle plugin, AdminGuard, on every route but /healthz):
- Host allow-list against DNS rebinding: the Host must be the bound listen address, localhost, 127.0.0.1 or [::1],
  each with the bound port, or an admin.hosts entry ("name" matches on any port, "name:port" only there); a Host
  without a port means port 80. Anything else, or no Host at all, gets 421 Misdirected Request before the token is
  even looked at.
- No cross-site browser requests on routes that change state or do heavy work (every non-GET route, /debug/heap and
  /debug/greenlets with or without ?debug: each walks every gc object): 403 when Sec-Fetch-Site is anything but
  same-origin or none (same-site included: another port on localhost is the same site), or when an Origin is sent
  that is not one of the allowed names above (http or https). curl and scripts send neither header and pass; the
  dashboard's own fetches are same-origin. Other GETs stay open to cross-site requests: the browser does not let
  that page read the answer, and operators follow links to them.

Connections (AdminHTTPServer): at most MAX_CONNECTIONS at once (a gevent Pool; beyond it new ones wait in the listen
backlog). While the pool is full and a connection waits in the backlog, the connection that has waited longest for
its next request is closed to make room, so idle or slowloris connections cannot lock operators out. A request line
and its headers must arrive within HEADER_TIMEOUT and fit MAX_HEADER_BYTES; bodies beyond MAX_BODY_BYTES are refused
unread (no route reads one); any other socket read or write may stall for IO_TIMEOUT. Refused and dropped connections
are logged one line each, at most one line per kind every REPORT_EVERY seconds (with a count of the rest).

Heavy routes (/debug/heap, /debug/greenlets) share one lock. A request that finds it taken gets 429 with Retry-After
at once rather than waiting: queued walks would hold the hub back to back. Each reports how long it held the hub.
"""
import hmac
import http
import http.client
import importlib.resources
import ipaddress
import json
import logging
import os
import pathlib
import secrets
import socket
import sys
import time
import traceback
import tracemalloc
import urllib.parse

import bottle
import gevent
import gevent.events
import gevent.socket
import objgraph
from gevent.pool import Pool
from gevent.pywsgi import MAX_REQUEST_LINE, WSGIHandler, WSGIServer

from . import log as kiln_log
from .census import format_entries, format_groups, format_threads, group_stacks, stacks_json, survey
from .errors import ConfigError
from .metrics import Metrics
from .outcomes import Reason
from .probes import Busy, Probes, RuntimeCollector
from .sampler import Sampler
from .timefmt import go_duration

log = logging.getLogger("kiln.admin")
monitor_log = logging.getLogger("kiln.monitor")

# A package resource, not a path next to __file__: inside a zip (dist/kilnproxy.pyz) there is no such folder
DASHBOARD_DIR = importlib.resources.files(__package__).joinpath("dashboard")
SAMPLE_INTERVAL = 5.0       # seconds between dashboard samples
SAMPLE_WINDOW = 900.0       # the dashboard shows the last 15 minutes
TRACE_FRAMES = 1            # tracemalloc frames per allocation: 'lineno' statistics only use the innermost one
RETRY_AFTER = 1             # seconds, for 429 on a heavy route
MAX_CONNECTIONS = 64        # concurrent admin connections (pool size)
HEADER_TIMEOUT = 10.0       # seconds for a request line and its headers (also between requests on a kept-alive one)
IO_TIMEOUT = 30.0           # seconds any other single socket read or write may stall (body, response)
MAX_HEADER_BYTES = 32768    # request line + headers; below http.client's 64 KiB line limit, so this check refuses
MAX_BODY_BYTES = 65536      # no route reads a body: one announced bigger than this, or chunked, is refused unread
LINGER = (1.0, 1 << 20)     # after refusing a request: read and discard up to 1 s / 1 MiB of what the client still
                            # sends, so that closing with unread data (a TCP reset) does not destroy the answer
REPORT_EVERY = 10.0         # seconds between log lines about refused or dropped connections of one kind
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def configure_monitor(seconds):
    """Turn on gevent's monitor thread, reporting a hub blocked for longer than `seconds` (<= 0 leaves it off).

    gevent starts the thread when the hub first runs if config.monitor_thread is set by then; for a hub that already
    runs we start it here, so this works whenever it is called from the hub's thread. Returns the monitor thread
    object, or None when off. Idempotent."""
    if seconds is None or seconds <= 0:
        return None
    gevent.config.monitor_thread = True
    gevent.config.max_blocking_time = float(seconds)
    thread = gevent.get_hub().start_periodic_monitoring_thread()
    _install_blocking_check(thread)
    return thread


class _BlockingCheck:
    """Stands in for gevent's own blocking check on its monitor thread; emits the same EventLoopBlocked event.

    gevent's check builds its report with format_run_info(), which pprints every greenlet's gevent.local values.
    Bottle keeps its request in such a local, holding an environ whose repr reads bottle.request from the monitor
    thread, where it is unbound: the repr raises, and since an exception escaping a monitoring function ends gevent's
    monitor thread, the first blocked hub printed one traceback and switched monitoring off for good (seen with
    gevent 26.9 + bottle 0.13). This check reports only the blocked thread's stack, which is also all we log, and
    keeps request environs (with their Authorization headers) out of the report."""

    def __init__(self, tracer):
        self._tracer = tracer
        self._culprit = None        # the greenlet of the blocking episode being reported, if any
        self._since = None

    def __call__(self, hub):
        try:
            blocked = self._tracer.did_block_hub(hub)
            if not blocked:
                if self._culprit is not None:
                    monitor_log.info("hub unblocked after about %.2fs (blocked by %r)",
                                     time.perf_counter() - self._since, self._culprit)
                    self._culprit = self._since = None
                return
            if blocked[1] is self._culprit:     # still the same episode: one event each, not one per check
                return
            self._culprit = blocked[1]
            self._since = time.perf_counter() - gevent.config.max_blocking_time
            frame = sys._current_frames().get(hub.thread_ident)
            stack = traceback.format_stack(frame) if frame is not None else ["(no frame for the hub's thread)\n"]
            del frame
            report = ["Blocked stack (thread 0x%x):" % hub.thread_ident] + "".join(stack).rstrip("\n").split("\n")
            gevent.events.notify(gevent.events.EventLoopBlocked(blocked[1], gevent.config.max_blocking_time, report,
                                                                hub=hub))
        except Exception:   # the boundary: anything escaping would end gevent's monitor thread for good
            monitor_log.exception("hub monitor check failed")


def _install_blocking_check(thread):
    """Replace gevent's blocking check on `thread` by _BlockingCheck (once), using only the monitor's public
    add_monitoring_function(). gevent treats entry 0 of its schedule as the blocking check (it resets that entry's
    period to max_blocking_time on every round), so ours must end up first."""
    entries = thread.monitoring_functions()
    if any(isinstance(e.function, _BlockingCheck) for e in entries):
        return
    tracer = getattr(thread, "_greenlet_tracer", None)     # the tracer gevent installed for this hub; no public name
    if tracer is None:
        monitor_log.warning("gevent's monitor has no greenlet tracer here; keeping its own blocking report")
        return
    others = [(e.function, e.period) for e in entries if e.function != thread.monitor_blocking]
    thread.add_monitoring_function(_BlockingCheck(tracer), gevent.config.max_blocking_time)
    thread.add_monitoring_function(thread.monitor_blocking, None)
    for function, period in others:     # move each behind ours; the schedule is never empty meanwhile
        thread.add_monitoring_function(function, None)
        thread.add_monitoring_function(function, period)


class BlockedHubWatch:
    """Subscribes to gevent's EventLoopBlocked events: logs the blocked stack on "kiln.monitor" and counts it.

    Events arrive on gevent's monitor thread (a native thread) while the hub is stuck, so the subscriber only logs and
    bumps a plain counter that it alone writes."""

    def __init__(self, probes):
        self.probes = probes
        self._subscribed = False
        self._started_monitor = False

    def start(self, seconds):
        if seconds <= 0 or self._subscribed:
            return
        already = gevent.get_hub().periodic_monitoring_thread is not None
        configure_monitor(seconds)
        self._started_monitor = not already
        gevent.events.subscribers.append(self)
        self._subscribed = True

    def stop(self):
        if not self._subscribed:
            return
        self._subscribed = False
        try:
            gevent.events.subscribers.remove(self)
        except ValueError:
            pass
        if self._started_monitor:
            self._started_monitor = False
            hub = gevent.get_hub()
            thread, hub.periodic_monitoring_thread = hub.periodic_monitoring_thread, None
            if thread is not None:
                thread.kill()
            gevent.config.monitor_thread = False

    def __call__(self, event):
        if not isinstance(event, gevent.events.EventLoopBlocked):
            return
        self.probes.hub_blocked += 1
        lines = []
        for line in event.info:
            if line.startswith("Info:"):    # in gevent's own report the rest is every greenlet: too much to log
                break
            if line.strip("=* \n"):
                lines.append(line.rstrip("\n"))
        monitor_log.warning("hub blocked for more than %gs by %r\n%s", event.blocking_time, event.greenlet,
                            "\n".join(lines))


def _canonical_host(host):
    """Lower-case name, or an IP literal in its canonical form (so that [0:0::1] is [::1])."""
    try:
        return str(ipaddress.ip_address(host))
    except ValueError:
        return host.lower()


def parse_authority(text):
    """'host', 'host:port', '[v6]' or '[v6]:port' (a Host header, an Origin's or an admin.hosts entry's) ->
    (canonical host, port or None); None when malformed."""
    if not text or not text.isascii() or any(c.isspace() or c in "/?#@\\" for c in text):
        return None
    if text.startswith("["):
        host, bracket, rest = text[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            return None
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            return None
        port = rest[1:] if rest else None
    else:
        host, colon, port = text.partition(":")
        port = port if colon else None
    if not host:
        return None
    if port is not None:
        if not (port.isdigit() and len(port) <= 5 and 0 < int(port) <= 65535):
            return None
        port = int(port)
    return _canonical_host(host), port


class HostRules:
    """The authorities (Host header, Origin) that name this admin server: the bound listen address, localhost,
    127.0.0.1 and [::1] with the bound port, and admin.hosts. An admin.hosts entry with a port matches exactly that
    host:port; one without matches the name on any port (behind a reverse proxy the Host carries the proxy's port or
    none; an ssh tunnel has its own). A Host without a port means port 80 (plain HTTP)."""

    def __init__(self, extra=()):
        self._exact, self._any_port, self._own = set(), set(), set()
        for entry in extra:
            parsed = parse_authority(entry.strip())
            if parsed is None:
                raise ConfigError("admin.hosts: expected a host name, host:port or [IPv6]:port, got %r" % entry)
            if parsed[1] is None:
                self._any_port.add(parsed[0])
            else:
                self._exact.add(parsed)

    def bind(self, host, port):
        """The address as actually bound (port 0 in the config means the ephemeral one the kernel chose)."""
        self._own = {(_canonical_host(name), port) for name in LOOPBACK_NAMES + (host,)}

    def allows(self, authority, default_port=80):
        parsed = parse_authority(authority) if authority else None
        if parsed is None:
            return False
        host, port = parsed
        if host in self._any_port:
            return True
        key = (host, default_port if port is None else port)
        return key in self._own or key in self._exact

    def own_origin(self, origin):
        """Whether an Origin header names this server ("null", other schemes, anything malformed: no)."""
        try:
            parts = urllib.parse.urlsplit(origin)
        except ValueError:
            return False
        if parts.scheme not in ("http", "https") or parts.path or parts.query or parts.fragment:
            return False
        return self.allows(parts.netloc, 443 if parts.scheme == "https" else 80)


class _Reports:
    """Logs refused or dropped connections: one line per kind at most every REPORT_EVERY seconds, then how many were
    left out. A flood of slowloris connections or of rebinding attempts must not become a flood of log lines."""

    def __init__(self, every=REPORT_EVERY, clock=time.monotonic):
        self._every, self._clock = every, clock
        self._state = {}        # kind -> (time of its last line, how many since that were not logged)

    def __call__(self, kind, what, *args):
        now = self._clock()
        last, unlogged = self._state.get(kind, (None, 0))
        if last is not None and now - last < self._every:
            self._state[kind] = (last, unlogged + 1)
            return
        self._state[kind] = (now, 0)
        more = " (%d more like it since the previous line)" % unlogged if unlogged else ""
        log.warning(what + more, *args)


def _peer(address):
    if isinstance(address, tuple) and len(address) >= 2:
        return ("[%s]:%s" if ":" in str(address[0]) else "%s:%s") % address[:2]
    return str(address)


def _shown(text, limit=100):
    """Client-sent text for a log line: bounded, and repr() so that it cannot forge lines."""
    return repr(text[:limit] + ("..." if len(text) > limit else ""))


class AdminGuard:
    """Bottle plugin wrapping every route but the public ones (/healthz): the Host allow-list (421), the admin token
    (401) and, on routes that change something or do heavy work, no cross-site browser requests (403). See the
    module docstring for the rules and why."""
    name = "kiln_guard"
    api = 2

    def __init__(self, token, hosts=()):
        self._token = token.encode("utf-8") if token else b""
        self.hosts = HostRules(hosts)
        self._reports = _Reports()

    def _token_ok(self, request):
        scheme, _, given = request.get_header("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            given = request.query.getunicode("token", default="") or ""
        return hmac.compare_digest(given.strip().encode("utf-8"), self._token)

    def _cross_site(self, request):
        """A browser request from a page that is not this server's own. curl and scripts send neither header."""
        site = request.get_header("Sec-Fetch-Site")
        if site is not None and site not in ("same-origin", "none"):    # "none": typed URL or bookmark
            return True
        origin = request.get_header("Origin")
        return origin is not None and not self.hosts.own_origin(origin)

    def apply(self, callback, route):
        if route.config.get("public"):
            return callback
        needs_token = bool(self._token)
        guarded = route.method not in ("GET", "HEAD") or bool(route.config.get("heavy"))

        def checked(*args, **kwargs):
            request, response = bottle.request, bottle.response
            host = request.get_header("Host")
            if not self.hosts.allows(host):
                # REMOTE_ADDR, not bottle's remote_addr: that one believes X-Forwarded-For
                peer = _peer((request.environ.get("REMOTE_ADDR", "?"), request.environ.get("REMOTE_PORT", "?")))
                self._reports("host", "admin request from %s refused: Host %s is not one of this server's names "
                              "(admin.hosts adds more)", peer, _shown(host or ""))
                response.status = 421
                return {"error": "misdirected request: the Host header does not name this server (see admin.hosts)"}
            if needs_token and not self._token_ok(request):
                response.status = 401
                response.set_header("WWW-Authenticate", 'Bearer realm="kilnproxy admin"')
                return {"error": "unauthorized: send 'Authorization: Bearer <admin.token>'"}
            if guarded and self._cross_site(request):
                response.status = 403
                return {"error": "cross-site request refused"}
            return callback(*args, **kwargs)
        return checked


def _json_error(res):
    bottle.response.content_type = "application/json"
    body = res.body if isinstance(res.body, str) and res.body else res.status_line
    return json.dumps({"error": body})


def _int_query(name, default, low, high):
    raw = bottle.request.query.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise bottle.HTTPError(400, "%s: expected a whole number" % name) from None
    return min(max(value, low), high)


def _float_query(name):
    raw = bottle.request.query.get(name)
    if raw is None or raw == "":
        return None
    try:
        return float(raw)
    except ValueError:
        raise bottle.HTTPError(400, "%s: expected a number" % name) from None


def _busy():
    bottle.response.status = 429
    bottle.response.set_header("Retry-After", str(RETRY_AFTER))
    return {"error": "another heavy debug request is running; retry shortly", "RetryAfterSecs": RETRY_AFTER}


def _text(lines):
    bottle.response.content_type = "text/plain; charset=utf-8"
    return "\n".join(lines) + "\n"


def _type_name(name):
    return name[len("builtins."):] if name.startswith("builtins.") else name


def _tracemalloc_json(limit):
    if not tracemalloc.is_tracing():
        return {"tracing": False}
    current, peak = tracemalloc.get_traced_memory()
    snapshot = tracemalloc.take_snapshot().filter_traces((
        tracemalloc.Filter(False, tracemalloc.__file__),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap>"),
        tracemalloc.Filter(False, "<frozen importlib._bootstrap_external>"),
        tracemalloc.Filter(False, "<unknown>"),
    ))
    top = []
    for stat in snapshot.statistics("lineno")[:limit]:
        frame = stat.traceback[0]
        top.append({"file": frame.filename, "line": frame.lineno, "size_bytes": stat.size, "count": stat.count})
    return {"tracing": True, "frames": tracemalloc.get_traceback_limit(), "traced_bytes": current,
            "peak_bytes": peak, "overhead_bytes": tracemalloc.get_tracemalloc_memory(), "top": top}


class AdminApi:
    """The routes and their state; `app` is the WSGI callable (tests call it in-process)."""

    def __init__(self, cfg, server, registry, version, metrics, probes, sampler, dashboard_dir=DASHBOARD_DIR):
        self.cfg, self.server, self.registry, self.version = cfg, server, registry, version
        self.metrics, self.probes, self.sampler = metrics, probes, sampler
        self.dashboard_dir = dashboard_dir
        # objgraph.growth() remembers peaks in this dict; its default argument is one dict shared by every caller.
        self.peak_stats = {}
        self.owns_tracing = False       # tracemalloc was started by us (config or API), so stop() may end it
        self.app = self._build()

    def _build(self):
        app = bottle.Bottle()
        self.guard = AdminGuard(self.cfg.admin.token, self.cfg.admin.hosts)
        app.install(self.guard)
        app.default_error_handler = _json_error
        app.route("/healthz", "GET", self.healthz, public=True)
        app.route("/", "GET", self.dashboard)
        app.route("/info", "GET", self.info)
        app.route("/connections", "GET", self.connections)
        app.route("/connections/<key>", "DELETE", self.close_connection)
        app.route("/metrics", "GET", self.prometheus)
        app.route("/debug/greenlets", "GET", self.greenlets, heavy=True)
        app.route("/debug/heap", "GET", self.heap, heavy=True)
        app.route("/debug/gc", "GET", self.gc_stats)
        app.route("/debug/samples", "GET", self.samples)
        app.route("/debug/tracemalloc/start", "POST", self.tracemalloc_start)
        app.route("/debug/tracemalloc/stop", "POST", self.tracemalloc_stop)
        return app

    # -- the interface ------------------------------------------------------------------------------------------
    def healthz(self):
        bottle.response.content_type = "text/plain; charset=utf-8"
        if self.server.draining:
            bottle.response.status = 503
            return "draining\n"
        return "ok\n"

    def info(self):
        now = time.time()
        started = self.server.started
        return {"Version": self.version, "StartTimeEpochSecs": int(started), "CurrentTimeEpochSecs": int(now),
                "Uptime": go_duration(now - started)}

    def connections(self):
        users = [s.as_json() for s in self.registry.authenticated()]
        return {"CurrentUserCount": len(users), "CurrentlyAuthenticatedUsers": users,
                "UnauthenticatedCount": self.registry.unauthenticated}

    def close_connection(self, key):
        session = self.registry.get(key)
        if session is None:
            bottle.response.status = 404
            return {"error": "no such session", "SessionKey": key}
        kiln_log.for_session(session.key, "kiln.admin").info("closed by admin (request from %s)",
                                                             bottle.request.remote_addr)
        session.close(Reason.CLOSED_BY_ADMIN)
        return {"closed": key}

    def prometheus(self):
        body, content_type = self.metrics.render(bottle.request.get_header("Accept"))
        bottle.response.content_type = content_type
        return body

    def greenlets(self):
        debug = _int_query("debug", 0, 0, 2)
        try:
            with self.probes.heavy() as stint:
                entries = survey(stint, with_spawn=debug == 2)
                if debug == 0:
                    groups = group_stacks(entries)
                    states = {}
                    for e in entries:
                        states[e["state"]] = states.get(e["state"], 0) + 1
                    body = {"count": len(entries), "sessions": len(self.registry),
                            "authenticated": len(self.registry.authenticated()), "states": states,
                            "stacks": stacks_json(groups, 20)}
                elif debug == 1:
                    lines = format_groups(group_stacks(entries), stint)
                else:
                    lines = format_entries(entries, stint) + format_threads()
                timing = stint.finish()
        except Busy:
            return _busy()
        self.probes.record_census(len(entries), timing["hub_held_secs"])
        if debug == 0:
            body.update(timing)
            return body
        header = ["greenlet profile: total %d (sessions %d)" % (len(entries), len(self.registry)),
                  "hub held %.6fs at most (busy %.6fs over %d pauses, wall %.6fs)" % (
                      timing["hub_held_secs"], timing["hub_busy_secs"], timing["pauses"], timing["wall_secs"]),
                  ""]
        return _text(header + lines)

    def heap(self):
        limit = _int_query("limit", 20, 1, 500)
        try:
            with self.probes.heavy() as stint:
                # growth() runs gc.collect() first, so the counts below are of live objects.
                growth = objgraph.growth(limit=limit, peak_stats=self.peak_stats, shortnames=False)
                stint.pause()
                types = objgraph.most_common_types(limit=None, shortnames=False)
                stint.pause()
                traced = _tracemalloc_json(limit)
                timing = stint.finish()
        except Busy:
            return _busy()
        body = {
            "objects": sum(count for _, count in types),
            "most_common_types": [{"type": _type_name(name), "count": count} for name, count in types[:limit]],
            "growth": [{"type": _type_name(name), "count": count, "delta": delta} for name, count, delta in growth],
            "tracemalloc": traced,
        }
        body.update(timing)
        return body

    # -- extensions ---------------------------------------------------------------------------------------------
    def gc_stats(self):
        return self.probes.gc.as_json()

    def samples(self):
        body = self.sampler.as_json(_float_query("since"))
        body["running"] = self.sampler.running
        return body

    def tracemalloc_start(self):
        frames = _int_query("frames", TRACE_FRAMES, 1, 64)
        if tracemalloc.is_tracing():
            return {"tracing": True, "frames": tracemalloc.get_traceback_limit(), "changed": False}
        tracemalloc.start(frames)
        self.owns_tracing = True
        log.info("tracemalloc started (%d frames)", frames)
        return {"tracing": True, "frames": frames, "changed": True}

    def tracemalloc_stop(self):
        was = tracemalloc.is_tracing()
        tracemalloc.stop()
        self.owns_tracing = False
        if was:
            log.info("tracemalloc stopped")
        return {"tracing": False, "changed": was}

    def dashboard(self):
        folder = self.dashboard_dir
        if isinstance(folder, (str, os.PathLike)):
            folder = pathlib.Path(folder)
        try:
            page = folder.joinpath("index.html").read_text(encoding="utf-8")
            css = folder.joinpath("dashboard.css").read_text(encoding="utf-8")
            js = folder.joinpath("dashboard.js").read_text(encoding="utf-8")
        except OSError as e:
            log.error("dashboard files unreadable: %s", e)
            raise bottle.HTTPError(500, "dashboard files missing") from None
        # A fresh nonce lets the inline script and style run under a CSP that forbids everything else (no CDN, no
        # injected markup). The token never enters the page: the script reads it from location.
        nonce = secrets.token_urlsafe(16)
        page = page.replace("__NONCE__", nonce).replace("/*__CSS__*/", css).replace("//__JS__", js)
        r = bottle.response
        r.content_type = "text/html; charset=utf-8"
        r.set_header("Content-Security-Policy",
                     "default-src 'none'; script-src 'nonce-%s'; style-src 'nonce-%s'; connect-src 'self'; "
                     "img-src 'self' data:; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
                     % (nonce, nonce))
        r.set_header("Referrer-Policy", "no-referrer")      # the URL may carry ?token=
        r.set_header("Cache-Control", "no-store")
        r.set_header("X-Content-Type-Options", "nosniff")
        return page


class _Refused(ValueError):
    """A request refused while its head is read; pywsgi passes ValueErrors to _handle_client_error."""

    def __init__(self, status, why):
        super().__init__(why)
        self.status = status


class _Dropped(ValueError):
    """The connection was closed under the handler (_AdminHandler.drop: to make room, or at stop)."""


def _plain_response(status):
    phrase = http.HTTPStatus(status).phrase
    body = ("%d %s\n" % (status, phrase)).encode("ascii")
    return ("HTTP/1.1 %d %s\r\nConnection: close\r\nContent-Type: text/plain\r\nContent-Length: %d\r\n\r\n"
            % (status, phrase, len(body))).encode("ascii") + body


class _HeaderBudget:
    """Stands in for the handler's rfile while http.client parses the headers: refuses more than `left` bytes."""

    def __init__(self, rfile, left):
        self._rfile, self._left = rfile, left

    def readline(self, size=-1):
        want = self._left + 1 if size is None or size < 0 else min(size, self._left + 1)
        line = self._rfile.readline(want)
        self._left -= len(line)
        if self._left < 0:
            raise _Refused(431, "request headers longer than %d bytes" % MAX_HEADER_BYTES)
        return line


class _AdminHandler(WSGIHandler):
    """pywsgi's handler with deadlines and limits (module docstring): while it waits for a request line and headers
    it is listed in server.waiting (oldest first) and may be closed to make room; it never leaves a traceback for a
    client's mistake, only a line through server.report."""

    _dropped = False
    _deadline = None

    def handle(self):
        self.socket.settimeout(self.server.io_timeout)
        super().handle()

    def drop(self):
        """Close this connection from another greenlet: its blocked read ends, and it leaves without answering."""
        self._dropped = True
        self.server.waiting.pop(self, None)
        sock = getattr(self, "socket", None)
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _head_done(self):
        if self._deadline is not None:
            self._deadline.cancel()
        self.server.waiting.pop(self, None)

    def handle_one_request(self):
        server = self.server
        deadline = self._deadline = gevent.Timeout(server.header_timeout)
        server.waiting[self] = None         # (re)listed as the newest
        deadline.start()
        try:
            return super().handle_one_request()
        except gevent.Timeout as t:
            if t is not deadline:
                raise
            server.report("timeout", "admin connection from %s closed: no complete request within %gs",
                          _peer(self.client_address), server.header_timeout)
            return None
        finally:
            deadline.close()
            self._deadline = None
            server.waiting.pop(self, None)

    def read_requestline(self):
        line = super().read_requestline()
        if self._dropped:
            return ""
        if len(line) >= MAX_REQUEST_LINE:       # pywsgi would answer 414 itself, silently, and reset what is unread
            self._refuse(414, "request line longer than %d bytes" % (MAX_REQUEST_LINE - 1))
            return ""
        return line

    def read_request(self, raw_requestline):
        rfile = self.rfile
        self.rfile = _HeaderBudget(rfile, MAX_HEADER_BYTES - len(raw_requestline))
        try:
            parsed = super().read_request(raw_requestline)
        finally:
            self.rfile = rfile
        if self._dropped:
            raise _Dropped()
        chunked = self.headers.get("transfer-encoding", "").lower() == "chunked"
        if chunked or (self.content_length or 0) > MAX_BODY_BYTES:
            raise _Refused(413, "request body over %d bytes or chunked (admin routes read none)" % MAX_BODY_BYTES)
        self._head_done()
        return parsed

    def _handle_client_error(self, ex):
        """pywsgi's hook for whatever read_request raised (it prints a traceback for non-ValueErrors). Answers and
        closes itself; None tells handle_one_request that nothing is left to send."""
        if self._dropped or isinstance(ex, (_Dropped, OSError)):   # OSError: the client went away mid-headers
            return None
        if isinstance(ex, _Refused):
            status, why = ex.status, str(ex)
        elif isinstance(ex, http.client.HTTPException):     # "got more than 100 headers"
            status, why = 431, str(ex) or type(ex).__name__
        else:
            status, why = 400, getattr(ex, "formatted_message", None) or str(ex) or type(ex).__name__
        self._refuse(status, why)
        return None

    def _refuse(self, status, why):
        """Answer `status`, log one line, and linger: the client may still be sending what we refused to read."""
        self._head_done()
        self.server.report("refused %d" % status, "admin request from %s refused: %d %s",
                           _peer(self.client_address), status, _shown(why, 200))
        sock = self.socket
        seconds, left = LINGER
        try:
            sock.sendall(_plain_response(status))
            sock.shutdown(socket.SHUT_WR)
            with gevent.Timeout(seconds, False):        # False: ends the block quietly
                while left > 0:
                    data = sock.recv(min(65536, left))
                    if not data:
                        break
                    left -= len(data)
        except OSError:
            pass

    def handle_error(self, t, v, tb):
        if isinstance(v, TimeoutError):     # socket timeout: a client that stopped reading its response
            self.server.report("stalled", "admin connection from %s closed: stalled for %gs",
                               _peer(self.client_address), self.server.io_timeout)
            self.close_connection = True
            return
        super().handle_error(t, v, tb)


class AdminHTTPServer(WSGIServer):
    """gevent's WSGI server with a connection cap that idle connections cannot exhaust (module docstring)."""

    def __init__(self, listener, application, max_connections=MAX_CONNECTIONS, header_timeout=HEADER_TIMEOUT,
                 io_timeout=IO_TIMEOUT):
        super().__init__(listener, application, spawn=Pool(max_connections), handler_class=_AdminHandler,
                         log=None, error_log=log)
        self.header_timeout, self.io_timeout = header_timeout, io_timeout
        self.waiting = {}           # _AdminHandler -> None, in the order they began waiting for a request
        self.report = _Reports()
        self._room = None           # the greenlet watching the backlog while the pool is full

    def do_handle(self, *args):
        super().do_handle(*args)
        if self.pool.full() and self._room is None:
            self._room = gevent.spawn(self._make_room)

    def _make_room(self):
        """While the pool is full: each time a connection waits in the backlog, close the one that has waited longest
        for a request; when every connection is mid-request, wait for one to finish (the backlog waits too)."""
        try:
            while self.pool.full() and not self.closed:
                gevent.socket.wait_read(self.socket.fileno())
                if not self.pool.full():
                    break
                victim = next(iter(self.waiting), None)
                if victim is not None:
                    victim.drop()
                    self.report("evicted", "admin connection from %s closed while waiting for a request: "
                                "%d connections open, the most allowed", _peer(victim.client_address),
                                self.pool.size)
                self.pool.wait_available()
        finally:
            self._room = None

    def drop_waiting(self):
        for handler in list(self.waiting):
            handler.drop()

    def close(self):
        room, self._room = self._room, None
        if room is not None:
            self.stop_accepting()
            room.kill()         # and wait: it watches the listener's descriptor, which must not close under it
        super().close()

    def stop(self, timeout=None):
        self.close()
        self.drop_waiting()     # idle kept-alive connections and half-sent requests: nothing worth waiting for
        super().stop(timeout)   # closes again (harmless), waits for the pool, kills what is left


class AdminServer:
    """Owns the admin API's lifecycle: WSGI server, sampler greenlet, gc callbacks, /metrics collector, monitor."""

    def __init__(self, cfg, server, registry, version, metrics=None, sample_interval=SAMPLE_INTERVAL,
                 sample_window=SAMPLE_WINDOW, max_connections=MAX_CONNECTIONS, header_timeout=HEADER_TIMEOUT,
                 io_timeout=IO_TIMEOUT):
        if metrics is None:
            metrics = getattr(server, "metrics", None)
        if not isinstance(metrics, Metrics):
            # The server records into NullMetrics: its hooks count nothing, but /metrics still serves the
            # scrape-time series (sessions, greenlets, RSS, GC, hub blocked).
            metrics = Metrics()
        self.cfg = cfg
        self.registry = registry
        self.metrics = metrics
        self.probes = Probes()
        self.sampler = Sampler(self.probes, registry, metrics, sample_interval, sample_window)
        self.api = AdminApi(cfg, server, registry, version, metrics, self.probes, self.sampler)
        self.app = self.api.app
        self.monitor = BlockedHubWatch(self.probes)
        self.limits = {"max_connections": max_connections, "header_timeout": header_timeout,
                       "io_timeout": io_timeout}
        self.wsgi = None
        self._detach = None

    @property
    def address(self):
        return self.wsgi.address[:2] if self.wsgi is not None else None

    def start(self, listener=None):
        """listener: a bound, listening socket made elsewhere (socket activation) instead of admin.listen."""
        self.probes.install()
        self._detach = self.metrics.attach(RuntimeCollector(self.probes, self.registry))
        self.monitor.start(self.cfg.admin.max_blocking_time)
        if self.cfg.admin.tracemalloc and not tracemalloc.is_tracing():
            tracemalloc.start(TRACE_FRAMES)
            self.api.owns_tracing = True
        self.wsgi = AdminHTTPServer(listener if listener is not None else self.cfg.admin.listen, self.app,
                                    **self.limits)
        self.wsgi.start()
        self.api.guard.hosts.bind(*self.address)
        self.sampler.start()
        log.info("admin API on http://%s:%d/", *self.address)

    def stop(self):
        """Undo start(); safe after a failed or partial start and safe twice."""
        wsgi, self.wsgi = self.wsgi, None
        if wsgi is not None:
            wsgi.stop(timeout=2)
        self.sampler.stop()
        self.monitor.stop()
        detach, self._detach = self._detach, None
        if detach is not None:
            detach()
        self.probes.uninstall()
        if self.api.owns_tracing:
            self.api.owns_tracing = False
            tracemalloc.stop()
