"""Admission: the limits a connection passes through on its way in, behind one object.

A connection takes a `Lease` at accept. The lease is refused (`Refused`) for a penalised source, by random early drop
when too many connections are unauthenticated (`limits.startups_drop`, OpenSSH's MaxStartups start:rate:full), or
when its source already has `limits.per_source_queue` connections waiting. Otherwise the lease waits for a handshake
slot: at most `limits.max_startups` handshakes run at once, and at most `limits.per_source_startups` from one source
(OpenSSH's PerSourceMaxStartups). A connection beyond those waits, before our banner, instead of being reset; sources
take turns, so one source's silent sockets delay only that source. The slot is given back when the login ends.
Once authenticated the lease holds one of the account's `limits.per_account` slots until it is released; a backend
dial takes one of `limits.max_dials` slots (`dial_slot`). `limits.max_connections` is enforced by the server's handler
pool (the accept loop pauses, connections wait in the backlog); a lease says when it filled it.

Failed logins (every rejected key or signature, and a login that timed out) count toward the source's penalty
(`limits.penalty_failures` in a row: refused at accept for `limits.penalty_seconds`). Refusals are logged through
`RefusalLog`: at most one line per reason and second, with a count, so a flood cannot flood the log.

The remote address a lease counts against can be changed after accept (`Lease.set_source`: a PROXY protocol header
names the real client after the TCP accept). Greenlets switch only where they wait, so the counters need no locks.
The wave-2 variants (one limit for all workers, one for a fleet on PostgreSQL) implement the same interface.
"""
import collections
import contextlib
import logging
import random
import time

from gevent.event import Event
from gevent.lock import BoundedSemaphore

from .limits import SourcePenalties, drop_probability, parse_startups_drop

log = logging.getLogger("kiln.admission")
REFUSAL_LOG_INTERVAL = 1.0      # seconds: at most one "refused" line per reason per interval


class Refused(Exception):
    """A connection or session refused by a limit; `limit` is the metrics label, `detail` says why."""

    def __init__(self, limit, detail=""):
        super().__init__(detail or limit)
        self.limit, self.detail = limit, detail


class RefusalLog:
    """Logs refusals at most once per reason and interval: the first at once, the rest of the interval as one line
    with a count, written when the interval ends (`schedule(delay, fn)` arranges that; gevent.spawn_later)."""

    def __init__(self, logger=log, interval=REFUSAL_LOG_INTERVAL, clock=time.monotonic, schedule=None):
        self.log, self.interval, self.clock = logger, interval, clock
        self.schedule = schedule or _spawn_later
        self._open = {}          # reason -> [interval end, count since the last line, last source, detail]

    def refused(self, source, reason, detail=""):
        now = self.clock()
        entry = self._open.get(reason)
        if entry is not None and now < entry[0]:
            if not entry[1]:
                self.schedule(entry[0] - now, lambda: self._flush(reason, entry))
            entry[1] += 1
            entry[2], entry[3] = source, detail
            return
        self._flush(reason)
        self._emit(reason, source, detail, 1)
        self._open[reason] = [now + self.interval, 0, None, ""]

    def _flush(self, reason, only=None):
        if only is not None and self._open.get(reason) is not only:
            return
        entry = self._open.pop(reason, None)
        if entry is not None and entry[1]:
            self._emit(reason, entry[2], entry[3], entry[1])

    def flush(self):
        """Write every pending count now (at shutdown)."""
        for reason in list(self._open):
            self._flush(reason)

    def _emit(self, reason, source, detail, count):
        why = "%s (%s)" % (reason, detail) if detail else reason
        if count == 1:
            self.log.warning("refused source=%s reason=%s", source, why)
        else:
            self.log.warning("refused source=%s reason=%s count=%d in the last %gs", source, why, count,
                             self.interval)


def _spawn_later(delay, fn):
    import gevent
    gevent.spawn_later(delay, fn)


class Admission:
    """The one home of every per-connection limit of this process (see the module docstring)."""

    def __init__(self, limits, clock=time.monotonic, rng=random.random, refusal_log=None):
        self.max_startups = limits.max_startups
        self.per_source_startups = limits.per_source_startups
        self.per_source_queue = limits.per_source_queue
        self.startups_drop = parse_startups_drop(limits.startups_drop)
        self.per_account = limits.per_account
        self.penalty_failures, self.penalty_seconds = limits.penalty_failures, limits.penalty_seconds
        self.max_connections, self.max_dials = limits.max_connections, limits.max_dials
        self.connections = 0                     # leases not yet released
        self._dial_slots = BoundedSemaphore(limits.max_dials)
        self.clock, self.rng = clock, rng
        self.penalties = SourcePenalties(limits.penalty_failures, limits.penalty_seconds, clock)
        self.refusals = refusal_log or RefusalLog(clock=clock)
        self.unauthenticated = 0                 # leases not yet authenticated (waiting or in a handshake)
        self.handshakes = 0                      # leases holding a handshake slot
        self._source_handshakes = collections.Counter()
        self._source_unauthenticated = collections.Counter()
        self._waiting = collections.OrderedDict()    # source -> deque of waiting leases, sources in turn order
        self._accounts = collections.Counter()

    # -- at accept ------------------------------------------------------------------------------------------------
    def connect(self, source):
        """A Lease for a new connection from source, or Refused."""
        self.check_source(source)
        if self._source_unauthenticated[source] >= self.per_source_queue:
            raise Refused("max_startups", "%d unauthenticated from this source" % self._source_unauthenticated[source])
        p = drop_probability(self.unauthenticated, *self.startups_drop)
        if p and self.rng() < p:
            raise Refused("max_startups", "random early drop at %d unauthenticated" % self.unauthenticated)
        return Lease(self, source)

    @contextlib.contextmanager
    def dial_slot(self, timeout):
        """One of limits.max_dials backend dials at once (handshakes are CPU-bound: a burst of dials progressing in
        lockstep would all miss their deadline together); Refused('max_dials') after waiting timeout seconds."""
        if not self._dial_slots.acquire(timeout=timeout):
            raise Refused("max_dials", "no dial slot free within %gs (limits.max_dials=%d)" % (timeout, self.max_dials))
        try:
            yield
        finally:
            self._dial_slots.release()

    def check_source(self, source):
        if self.penalties.penalised(source):
            raise Refused("penalty")

    def refused(self, source, refusal):
        self.refusals.refused(source, refusal.limit, refusal.detail)

    # -- failed and successful logins -----------------------------------------------------------------------------
    def login_failed(self, source, failures=1):
        """Record failed logins from source; True when they start a penalty."""
        started = False
        for _ in range(max(1, failures)):
            started = self.penalties.failure(source) or started
        return started

    def login_succeeded(self, source):
        self.penalties.success(source)

    # -- handshake slots ------------------------------------------------------------------------------------------
    def _can_start(self, source):
        return self.handshakes < self.max_startups and self._source_handshakes[source] < self.per_source_startups

    def _take_slot(self, lease):
        self.handshakes += 1
        self._source_handshakes[lease.source] += 1
        lease.in_handshake = True

    def _give_slot(self, lease):
        lease.in_handshake = False
        self.handshakes -= 1
        self._source_handshakes[lease.source] -= 1
        if self._source_handshakes[lease.source] <= 0:
            del self._source_handshakes[lease.source]
        self._wake()

    def _wake(self):
        """Hand free slots to waiting leases, one source at a time in turn."""
        for source in list(self._waiting):
            if self.handshakes >= self.max_startups:
                return
            queue = self._waiting[source]
            if self._source_handshakes[source] >= self.per_source_startups:
                continue
            lease = queue.popleft()
            if not queue:
                del self._waiting[source]
            else:
                self._waiting.move_to_end(source)     # its next one waits for the other sources' turns
            self._take_slot(lease)
            lease._woken.set()

    def _enqueue(self, lease):
        self._waiting.setdefault(lease.source, collections.deque()).append(lease)

    def _dequeue(self, lease):
        queue = self._waiting.get(lease.source)
        if queue is not None and lease in queue:
            queue.remove(lease)
            if not queue:
                del self._waiting[lease.source]

    def waiting(self):
        return sum(len(q) for q in self._waiting.values())

    # -- accounting -----------------------------------------------------------------------------------------------
    def _count_unauthenticated(self, source, delta):
        self.unauthenticated += delta
        self._source_unauthenticated[source] += delta
        if self._source_unauthenticated[source] <= 0:
            del self._source_unauthenticated[source]


class Lease:
    """One connection's hold on the limits. release() is idempotent and gives back whatever is held."""

    def __init__(self, admission, source):
        self._a = admission
        self.source = source
        self.account = None
        self.in_handshake = False
        self._woken = Event()
        self._released = False
        admission._count_unauthenticated(source, +1)
        admission.connections += 1
        # limits.max_connections is the server's handler pool: at the limit its accept loop pauses and new
        # connections wait in the listen backlog (not refused); the moment it fills is what is counted
        self.at_max_connections = admission.connections >= admission.max_connections

    def set_source(self, source):
        """Count this connection against another source address (before its handshake starts)."""
        if source == self.source or self._released:
            return
        assert not self.in_handshake and self.account is None, "set_source after the handshake started"
        self._a._count_unauthenticated(self.source, -1)
        self.source = source
        self._a._count_unauthenticated(source, +1)

    def wait_handshake(self, timeout):
        """Wait for a handshake slot for up to timeout seconds; True when waiting was needed. Raises Refused when
        no slot came free in time, or when the source was penalised meanwhile."""
        a = self._a
        if a._can_start(self.source) and self.source not in a._waiting:
            a._take_slot(self)
            return False
        a._enqueue(self)
        try:
            if not self._woken.wait(timeout):
                raise Refused("max_startups", "no handshake slot within %gs" % timeout)
        finally:
            if not self.in_handshake:
                a._dequeue(self)
        a.check_source(self.source)       # its source may have been penalised while it waited
        return True

    def end_handshake(self):
        if self.in_handshake:
            self._a._give_slot(self)

    def authenticate(self, account):
        """Take one of the account's slots (Refused 'per_account' when none is free); the handshake slot goes back."""
        a = self._a
        self.end_handshake()
        if a._accounts[account] >= a.per_account:
            raise Refused("per_account", "account=%s" % account)
        a._accounts[account] += 1
        a._count_unauthenticated(self.source, -1)
        self.account = account

    def release(self):
        if self._released:
            return
        self._released = True
        a = self._a
        a.connections -= 1
        if self.in_handshake:
            a._give_slot(self)
        a._dequeue(self)
        if self.account is None:
            a._count_unauthenticated(self.source, -1)
        else:
            a._accounts[self.account] -= 1
            if a._accounts[self.account] <= 0:
                del a._accounts[self.account]
