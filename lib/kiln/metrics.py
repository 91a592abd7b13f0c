"""Metrics hooks called by the server. `NullMetrics` records nothing; `Metrics` keeps Prometheus series for /metrics.

`Metrics` owns a private CollectorRegistry (never prometheus_client's global default registry), so two instances in
one process (tests, or a proxy restarted in-process) never collide. Every label takes values from a fixed set: an
unknown close reason or limit name is counted as "other", so a bug elsewhere cannot grow the series without bound.
Process-level gauges (greenlets, RSS, sessions, GC pauses) are not kept here: the admin API registers a collector
that computes them at scrape time (`attach`).
"""
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import choose_encoder

from .outcomes import Reason

# The close reasons (outcomes.Reason), as label values.
OUTCOMES = tuple(reason.label for reason in Reason if reason is not Reason.UNKNOWN) + ("other",)
WATCHDOG_TIMEOUTS = ("idle", "session", "other")
LIMITS = ("max_connections", "max_startups", "max_dials", "per_account", "penalty", "proxy_protocol",
          "other")

# Seconds. A git clone of a big repository can run for most of timeouts.session (3600 s by default).
SESSION_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200)
# Accept -> backend command running: handshake + auth + dial, normally well under a second.
ESTABLISH_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


def outcome_label(reason):
    """Map a close reason ("idle timeout", "closed by admin", ...) to its bounded label value."""
    label = str(reason or "").strip().lower().replace(" ", "_").replace("-", "_")
    return label if label in OUTCOMES else "other"


def limit_label(limit):
    label = str(limit or "").strip().lower().replace("-", "_").replace(".", "_")
    if label.startswith("limits_"):
        label = label[len("limits_"):]
    return label if label in LIMITS else "other"


class NullMetrics:
    def connection_opened(self):
        pass

    def connection_closed(self):
        pass

    def auth_failed(self):
        pass

    def limit_rejected(self, limit):
        """limit: 'per_account', 'max_startups', 'max_dials', 'penalty', 'max_connections', 'proxy_protocol'."""

    def backend_error(self, backend="default"):
        """backend: the name of the backend ([backend] is "default", else a [backends.NAME])."""

    def watchdog_closed(self, timeout):
        """The watchdog closed a session past timeouts.<timeout> + timeouts.grace ('idle' or 'session'): a bug."""

    def session_established(self, seconds):
        """Time from TCP accept to a running backend command."""

    def session_ended(self, outcome, seconds, bytes_in, bytes_out):
        """outcome: a close reason from a bounded set (completed, auth failed, login timeout, ...)."""


class Metrics(NullMetrics):
    """Prometheus series fed by the server's hooks. Hooks are cheap and never raise on odd input."""

    def __init__(self, backends=("default",)):
        """backends: the configured backend names, the label values of the backend series (others: "other")."""
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self._in_flight = Gauge("kiln_connections_in_flight", "TCP connections being handled now.", registry=r)
        self._connections = Counter("kiln_connections", "TCP connections accepted.", registry=r)
        self._sessions = Counter("kiln_sessions", "Connections ended, by outcome (close reason).", ["outcome"],
                                 registry=r)
        self._auth_failures = Counter("kiln_auth_failures", "Failed public-key logins.", registry=r)
        self._keystore_up = Gauge("kiln_keystore_up", "1 while the key store can be read (its changes reach this "
                                  "process), 0 while it is serving with the keys it loaded last.", registry=r)
        self._keystore_up.set(1)
        self._backend_errors = Counter("kiln_backend_errors", "Backends that could not be reached or refused us.",
                                       ["backend"], registry=r)
        self._backend_names = frozenset(backends)
        for name in sorted(self._backend_names) + ["other"]:
            self._backend_errors.labels(name)
        self._watchdog = Counter("kiln_watchdog_closed", "Sessions the watchdog found past their timeouts plus "
                                 "timeouts.grace and closed (each is a bug; the log has its stack).", ["timeout"],
                                 registry=r)
        self._limit_rejections = Counter("kiln_limit_rejections", "Connections refused by a limit.", ["limit"],
                                         registry=r)
        self._bytes = Counter("kiln_relayed_bytes", "Payload bytes relayed by ended sessions (in: client to "
                              "backend, out: backend to client).", ["direction"], registry=r)
        self._duration = Histogram("kiln_session_duration_seconds", "Whole connection duration.",
                                   buckets=SESSION_BUCKETS, registry=r)
        self._establish = Histogram("kiln_session_establish_seconds", "TCP accept to running backend command.",
                                    buckets=ESTABLISH_BUCKETS, registry=r)
        # Create every labelled child now: a series that appears only after its first event breaks rate() and
        # makes "no data" ambiguous on dashboards.
        for outcome in OUTCOMES:
            self._sessions.labels(outcome)
        for limit in LIMITS:
            self._limit_rejections.labels(limit)
        for timeout in WATCHDOG_TIMEOUTS:
            self._watchdog.labels(timeout)
        self._bytes_in = self._bytes.labels("in")
        self._bytes_out = self._bytes.labels("out")
        # Plain totals for the dashboard sampler (reading a prometheus child's value needs private API).
        self.ended_bytes_in = 0
        self.ended_bytes_out = 0

    # -- hooks (see NullMetrics) ----------------------------------------------------------------------------------
    def connection_opened(self):
        self._connections.inc()
        self._in_flight.inc()

    def connection_closed(self):
        self._in_flight.dec()

    def auth_failed(self):
        self._auth_failures.inc()

    def limit_rejected(self, limit):
        self._limit_rejections.labels(limit_label(limit)).inc()

    def backend_error(self, backend="default"):
        self._backend_errors.labels(backend if backend in self._backend_names else "other").inc()

    def watch_keystore(self, store):
        """kiln_keystore_up follows store.up at every scrape."""
        self._keystore_up.set_function(lambda: 1.0 if store.up else 0.0)

    def watchdog_closed(self, timeout):
        self._watchdog.labels(timeout if timeout in WATCHDOG_TIMEOUTS else "other").inc()

    def session_established(self, seconds):
        self._establish.observe(max(0.0, float(seconds)))

    def session_ended(self, outcome, seconds, bytes_in, bytes_out):
        self._sessions.labels(outcome_label(outcome)).inc()
        self._duration.observe(max(0.0, float(seconds)))
        bytes_in, bytes_out = max(0, int(bytes_in)), max(0, int(bytes_out))
        self._bytes_in.inc(bytes_in)
        self._bytes_out.inc(bytes_out)
        self.ended_bytes_in += bytes_in
        self.ended_bytes_out += bytes_out

    # -- exposition -----------------------------------------------------------------------------------------------
    def attach(self, collector):
        """Register a scrape-time collector; returns a function that unregisters it (safe to call twice)."""
        self.registry.register(collector)

        def detach():
            try:
                self.registry.unregister(collector)
            except KeyError:    # already detached
                pass
        return detach

    def render(self, accept=None):
        """(body bytes, content type) of everything in this object's registry: the Prometheus text format, or
        OpenMetrics when the scraper's Accept header asks for it."""
        encoder, content_type = choose_encoder(accept or "")
        return encoder(self.registry), content_type
