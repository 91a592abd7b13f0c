"""The watchdog: a session that outlives its timeouts is a bug, and the proxy reports it about itself.

Every phase of a connection is meant to be bounded by timeouts.login, timeouts.dial, timeouts.idle or
timeouts.session. One greenlet looks at the session registry every `interval` seconds; a session older than
timeouts.session + timeouts.grace, or idle (no payload either way, Session.last_activity) for longer than
timeouts.idle + timeouts.grace, sits in a phase that no timeout covers. It is logged at ERROR with its state and its
handler greenlet's stack (formatted as /debug/greenlets?debug=2 formats stacks), counted (metrics.watchdog_closed)
and closed (Session.close, which kills its handler). One still registered `grace` seconds later is reported once
more: its handler did not even end when killed.
"""
import logging
import time

import gevent

from . import log as kiln_log
from .outcomes import Reason
from .census import format_frames

log = logging.getLogger("kiln.watchdog")
INTERVAL = 1.0


def _frames(frame):
    """((filename, lineno, function), ...) outermost first, as the admin API's stack dumps take them."""
    out = []
    while frame is not None:
        out.append((frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
        frame = frame.f_back
    out.reverse()
    return out


def describe_greenlet(g):
    """A greenlet's stack as /debug/greenlets?debug=2 shows it: a header line, then one File/source pair per frame."""
    if g is None:
        return ["(no handler greenlet recorded)"]
    if g.dead:
        return ["greenlet %s [dead]" % (repr(g)[:200],)]
    frame = g.gr_frame
    state = "suspended" if frame is not None else "running" if g is gevent.getcurrent() else "not started"
    return ["greenlet %s [%s]:" % (repr(g)[:200], state)] + (format_frames(_frames(frame)) or ["  (no Python frames)"])


class Watchdog:
    """Finds, reports and closes sessions past their timeouts (see the module docstring). `check()` is one round,
    used by the loop and by tests; the clock is injectable for the same reason."""

    def __init__(self, registry, idle, session, grace, metrics=None, interval=INTERVAL, clock=time.monotonic):
        self.registry = registry
        self.idle, self.session, self.grace = idle, session, grace
        self.metrics = metrics
        self.interval = interval
        self.clock = clock
        self.closed = 0                # sessions this watchdog closed, for tests and the shutdown log line
        self._flagged = {}             # session -> when the watchdog closed it
        self._greenlet = None

    def start(self):
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._loop)
        return self

    def stop(self):
        g, self._greenlet = self._greenlet, None
        if g is not None:
            g.kill(block=True, timeout=1)

    def _loop(self):
        while True:
            gevent.sleep(self.interval)
            try:
                self.check()
            except Exception:          # the watchdog's own boundary: it must outlive any one odd session
                log.exception("watchdog round failed")

    def overdue(self, s, now):
        """'session' or 'idle' when the session is past that timeout plus grace, else None."""
        if now - s.started > self.session + self.grace:
            return "session"
        # before authentication timeouts.login bounds a connection (the handshake queue and the login each), not
        # timeouts.idle; idle time counts from authentication on (Session.last_activity is set then)
        if s.identity is not None and now - s.last_activity > self.idle + self.grace:
            return "idle"
        return None

    def check(self):
        """One round; returns the sessions closed in it."""
        now = self.clock()
        for s in [s for s in self._flagged if self.registry.get(s.key) is not s]:
            del self._flagged[s]           # it ended
        closed = []
        for s in self.registry:
            if s in self._flagged:
                self._still_there(s, now)
                continue
            which = self.overdue(s, now)
            if which is None:
                continue
            self._flagged[s] = now
            self._report(s, which, now)
            self.closed += 1
            closed.append(s)
            hook = getattr(self.metrics, "watchdog_closed", None)
            if hook is not None:
                hook(which)
            s.close(Reason.WATCHDOG)
        return closed

    def _report(self, s, which, now):
        limit = "timeouts.session %gs" % self.session if which == "session" else "timeouts.idle %gs" % self.idle
        kiln_log.for_session(s.key, "kiln.watchdog").error(
            "watchdog: session past %s + grace %gs: age %.1fs, idle %.1fs, state %s, account %s, command %r, "
            "bytes_in %d, bytes_out %d; closing it. Handler stack:\n%s",
            limit, self.grace, now - s.started, now - s.last_activity, s.state,
            s.identity.account if s.identity is not None else None, s.command, s.bytes_in, s.bytes_out,
            "\n".join(describe_greenlet(getattr(s, "handler", None))))

    def _still_there(self, s, now):
        since = self._flagged[s]
        if since is not None and now - since > self.grace:
            self._flagged[s] = None        # reported twice now: once is enough from here on
            kiln_log.for_session(s.key, "kiln.watchdog").error(
                "watchdog: session still registered %.1fs after it was closed (state %s). Handler stack:\n%s",
                now - since, s.state, "\n".join(describe_greenlet(getattr(s, "handler", None))))
