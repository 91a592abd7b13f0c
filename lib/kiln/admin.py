"""The admin HTTP API and dashboard: a Bottle app served by gevent's WSGI server inside the proxy's process.

Routes (interface.md): GET /info, GET /connections, DELETE /connections/<SessionKey>, GET /debug/greenlets
(?debug=1 grouped stacks, ?debug=2 every stack), GET /debug/heap, GET /metrics, GET /healthz. Extensions: GET / (the
dashboard), GET /debug/gc, GET /debug/samples, POST /debug/tracemalloc/start and /stop.

Auth: with admin.token set, every route but /healthz needs "Authorization: Bearer <token>". A browser cannot add that
header to a typed URL, so the token is also accepted as ?token=...; the dashboard reads it from its own URL and sends
the header on its fetches. One Bottle plugin (AdminGuard) enforces this for every route not declared public, and
refuses cross-site writes (DELETE/POST whose Origin is another site).

Heavy routes (/debug/heap, /debug/greenlets) share one lock. A request that finds it taken gets 429 with Retry-After
at once rather than waiting: queued walks would hold the hub back to back. Each reports how long it held the hub.
"""
import hmac
import json
import logging
import os
import secrets
import sys
import time
import traceback
import tracemalloc
import urllib.parse

import bottle
import gevent
import gevent.events
import objgraph
from gevent.pywsgi import WSGIServer

from . import log as kiln_log
from .metrics import Metrics
from .sampler import (Busy, Probes, RuntimeCollector, Sampler, format_entries, format_groups, format_threads,
                      group_stacks, stacks_json, survey)
from .timefmt import go_duration

log = logging.getLogger("kiln.admin")
monitor_log = logging.getLogger("kiln.monitor")

DASHBOARD_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "dashboard")
SAMPLE_INTERVAL = 5.0       # seconds between dashboard samples
SAMPLE_WINDOW = 900.0       # the dashboard shows the last 15 minutes
TRACE_FRAMES = 1            # tracemalloc frames per allocation: 'lineno' statistics only use the innermost one
RETRY_AFTER = 1             # seconds, for 429 on a heavy route


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


class AdminGuard:
    """Bottle plugin wrapping every route: the admin token (routes declared public=True are exempt) and, for routes
    that change something, no cross-site requests. A page on another site can make the operator's browser send a
    simple POST to 127.0.0.1 without any token (admin.token is empty by default); browsers mark such requests with
    their Origin, so a write whose Origin is not this server is refused."""
    name = "kiln_guard"
    api = 2

    def __init__(self, token):
        self._token = token.encode("utf-8") if token else b""

    def _token_ok(self, request):
        scheme, _, given = request.get_header("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not given.strip():
            given = request.query.getunicode("token", default="") or ""
        return hmac.compare_digest(given.strip().encode("utf-8"), self._token)

    @staticmethod
    def _same_origin(request):
        origin = request.get_header("Origin")
        if origin is None:          # not sent by curl, scripts, or same-origin GETs
            return True
        return urllib.parse.urlsplit(origin).netloc == request.get_header("Host", "")

    def apply(self, callback, route):
        needs_token = bool(self._token) and not route.config.get("public")
        writes = route.method not in ("GET", "HEAD")
        if not needs_token and not writes:
            return callback

        def guarded(*args, **kwargs):
            request, response = bottle.request, bottle.response
            if needs_token and not self._token_ok(request):
                response.status = 401
                response.set_header("WWW-Authenticate", 'Bearer realm="kilnproxy admin"')
                return {"error": "unauthorized: send 'Authorization: Bearer <admin.token>'"}
            if writes and not self._same_origin(request):
                response.status = 403
                return {"error": "cross-site request refused"}
            return callback(*args, **kwargs)
        return guarded


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
        app.install(AdminGuard(self.cfg.admin.token))
        app.default_error_handler = _json_error
        app.route("/healthz", "GET", self.healthz, public=True)
        app.route("/", "GET", self.dashboard)
        app.route("/info", "GET", self.info)
        app.route("/connections", "GET", self.connections)
        app.route("/connections/<key>", "DELETE", self.close_connection)
        app.route("/metrics", "GET", self.prometheus)
        app.route("/debug/greenlets", "GET", self.greenlets)
        app.route("/debug/heap", "GET", self.heap)
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
        session.close("closed by admin")
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
        try:
            with open(os.path.join(self.dashboard_dir, "index.html"), encoding="utf-8") as f:
                page = f.read()
            with open(os.path.join(self.dashboard_dir, "dashboard.css"), encoding="utf-8") as f:
                css = f.read()
            with open(os.path.join(self.dashboard_dir, "dashboard.js"), encoding="utf-8") as f:
                js = f.read()
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


class AdminServer:
    """Owns the admin API's lifecycle: WSGI server, sampler greenlet, gc callbacks, /metrics collector, monitor."""

    def __init__(self, cfg, server, registry, version, metrics=None, sample_interval=SAMPLE_INTERVAL,
                 sample_window=SAMPLE_WINDOW):
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
        self.wsgi = None
        self._detach = None

    @property
    def address(self):
        return self.wsgi.address[:2] if self.wsgi is not None else None

    def start(self):
        self.probes.install()
        self._detach = self.metrics.attach(RuntimeCollector(self.probes, self.registry))
        self.monitor.start(self.cfg.admin.max_blocking_time)
        if self.cfg.admin.tracemalloc and not tracemalloc.is_tracing():
            tracemalloc.start(TRACE_FRAMES)
            self.api.owns_tracing = True
        self.wsgi = WSGIServer(self.cfg.admin.listen, self.app, log=None, error_log=log)
        self.wsgi.start()
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
