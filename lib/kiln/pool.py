"""ConnectionPool: the authenticated connections one SSH backend keeps between sessions, and the policy for them.

What it owns: which pooled connection a new session tries (the busiest with room first, so that idle ones can age
out), the share of the dial budget a pooled attempt may spend (`POOLED_SHARE`) before the session dials a fresh
connection, the channel count on each connection (taken before a channel open yields, given back on every path),
retirement (a connection that refused, stalled or could not close a channel takes no new sessions and closes when
its running ones end), and the reaper greenlet that closes idle connections after `pool_idle` seconds and those
beyond `pool_max_idle` at once. It knows nothing about SSH: `dial(timeout)` (injected) makes a connection, a
connection is anything with `channels`, `retired`, `idle_since`, `sessions_served`, `closed`, `alive()`,
`usable(n)` and `close()` (backends.BackendConnection), and `open(run, timeout)` is given the function that opens
a channel on one.
`on_drained()` (given to the constructor) is called when the pool has just closed its last connection.
"""
import logging
import time

import gevent

from .errors import BackendUnavailable

log = logging.getLogger("kiln.backend")

# A session's dial budget (timeouts.dial) is shared: a pooled connection has the first POOLED_SHARE of it for the
# channel open and exec (milliseconds; 0.44 s at worst in 3,000 sessions at concurrency 8 with one core busy), a
# fresh connection the rest (TCP connect, key exchange, auth: 0.31 s at worst in the same run).
POOLED_SHARE = 0.4


class ConnectionPool:
    """Connections of one backend, each carrying at most `max_sessions` sessions at once; closed after `pool_idle`
    seconds without one (and beyond `pool_max_idle` idle ones at once). `max_sessions = 1` with `pool_idle = 0`
    gives one connection per session."""

    def __init__(self, dial, max_sessions=8, pool_idle=60.0, pool_max_idle=8, on_drained=None):
        self.dial = dial
        self.max_sessions, self.pool_idle, self.pool_max_idle = max_sessions, pool_idle, pool_max_idle
        self.on_drained = on_drained
        self.connections = []
        self._reaper = None

    def __len__(self):
        return len(self.connections)

    def open(self, run, timeout, slog=log):
        """(connection, channel, reused) within `timeout` seconds in all. `run(conn, seconds)` opens a channel on
        conn: (channel, None), or (None, why) when conn is no good for it. Pooled connections with room have the
        first POOLED_SHARE of the time: one that refuses, turns out dead or does not answer in time is retired and
        a fresh connection is dialled with the rest. Raises BackendUnavailable; the channel slot is the caller's to
        give back with `release(conn)`."""
        started = time.monotonic()
        try:
            with gevent.Timeout(timeout, BackendUnavailable("backend did not answer within %gs" % timeout)):
                pooled_until = started + timeout * POOLED_SHARE
                for conn in self._candidates():
                    left = pooled_until - time.monotonic()
                    if left <= 0:
                        break
                    if not conn.usable(self.max_sessions):      # retired by another session meanwhile
                        continue
                    chan, why = self.attempt(conn, run, left)
                    if chan is not None:
                        conn.sessions_served += 1
                        return conn, chan, True
                    self.retire(conn, why, slog)
                conn = self.dial(max(0.001, started + timeout - time.monotonic()))
                self.connections.append(conn)
                chan, why = self.attempt(conn, run, max(0.001, started + timeout - time.monotonic()))
                if chan is None:
                    self.retire(conn, why, slog)       # closes it, unless another session took it meanwhile
                    raise BackendUnavailable("a new backend connection %s" % why)
                conn.sessions_served += 1
                return conn, chan, False
        except BaseException:
            self.settle()           # a connection dialled for this session may be left idle
            raise

    def attempt(self, conn, run, timeout):
        """run(conn, timeout) with conn's channel count taken from the start: opening yields, and the reaper must
        not close a connection that a session is opening a channel on (it did, under a burst: output cut short, no
        exit status). The count stays taken when a channel came back (the caller releases it)."""
        conn.channels += 1
        try:
            chan, why = run(conn, timeout)
        except BaseException:       # the dial budget ran out, or the session is being killed
            conn.retired = True     # a channel may still open on it after we gave up: it takes no more sessions
            self._release_slot(conn)
            raise
        if chan is None:
            self._release_slot(conn)
        return chan, why

    def release(self, conn, trouble=None):
        """A session on conn ended. trouble: why conn must take no chances (its channel may still count at the
        backend), which retires it."""
        if trouble is not None:
            self.retire(conn, trouble)
        self._release_slot(conn)
        self.settle()

    def retire(self, conn, why, slog=log):
        """conn takes no new sessions; it closes now if nothing runs on it, else when its running sessions end
        (closing it now would end them)."""
        if not conn.retired:
            slog.warning("backend connection retired after %d sessions (%d running): %s", conn.sessions_served,
                         conn.channels, why)
        conn.retired = True
        self.settle()

    def retire_all(self):
        """Every connection takes no new sessions (their backend's pinned host keys changed)."""
        for conn in self.connections:
            conn.retired = True
        self.settle()

    def close(self):
        """Close every connection (shutdown)."""
        for conn in list(self.connections):
            self._discard(conn)
        reaper, self._reaper = self._reaper, None
        if reaper is not None:
            reaper.kill(block=False)

    # -- policy ----------------------------------------------------------------------------------------------------
    def _candidates(self):
        self.close_expired()
        # busiest first: fills connections up to max_sessions so that idle ones can age out
        return sorted((c for c in self.connections if c.usable(self.max_sessions)), key=lambda c: -c.channels)

    def close_expired(self):
        """Close every connection without sessions that is dead, retired, or idle for pool_idle seconds, and the
        longest-idle ones beyond pool_max_idle (after a burst, 1,000 sessions left 125 idle connections holding
        ~25 MiB for a minute; a handful serves the next sessions as well)."""
        now = time.monotonic()
        closed = 0
        for conn in list(self.connections):
            if conn.channels == 0 and (conn.retired or not conn.alive() or now - conn.idle_since >= self.pool_idle):
                self._discard(conn)
                closed += 1
        idle = sorted((c for c in self.connections if c.channels == 0), key=lambda c: c.idle_since)
        for conn in idle[:max(0, len(idle) - self.pool_max_idle)]:
            self._discard(conn)
            closed += 1
        if closed and not self.connections and self.on_drained is not None:
            self.on_drained()

    def settle(self):
        """Close what should close now, and keep one reaper greenlet while idle connections wait out pool_idle."""
        self.close_expired()
        if self._reaper is None and any(c.channels == 0 for c in self.connections):
            self._reaper = gevent.spawn(self._reap_loop)

    @property
    def reaping(self):
        return self._reaper is not None

    def _reap_loop(self):
        try:
            while True:
                idle = [c.idle_since for c in self.connections if c.channels == 0]
                if not idle:
                    return
                gevent.sleep(max(0.05, min(idle) + self.pool_idle - time.monotonic()))
                self.close_expired()
        finally:
            self._reaper = None

    @staticmethod
    def _release_slot(conn):
        conn.channels -= 1
        conn.idle_since = time.monotonic()

    def _discard(self, conn):
        if conn in self.connections:
            self.connections.remove(conn)
        if not conn.closed:
            log.info("backend connection closed after %d sessions (%d pooled)", conn.sessions_served,
                     len(self.connections))
        conn.close()
