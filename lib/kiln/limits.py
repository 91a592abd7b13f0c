"""Pure limit logic: the descriptor limit at start, per-source penalties after failed logins, random early drop.

admission.py applies them to connections."""
import resource


def raise_nofile(log):
    """Raise the soft RLIMIT_NOFILE to the hard limit (each connection holds a socket, and a local child 3 pipes)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError) as e:
            log.warning("cannot raise RLIMIT_NOFILE from %d to %d: %s", soft, hard, e)
        else:
            soft = hard
    log.info("descriptor limit: soft=%d hard=%d", soft, hard)
    return soft, hard


class SourcePenalties:
    """Per-source penalties after repeated failed logins, in the spirit of OpenSSH 9.8's PerSourcePenalties.

    A source address that fails `threshold` logins is refused at accept for `seconds`. Memory is bounded: at most
    `max_sources` addresses are tracked; the oldest entries go first.
    """

    def __init__(self, threshold, seconds, clock, max_sources=65536):
        self.threshold, self.seconds, self.clock, self.max_sources = threshold, seconds, clock, max_sources
        self._failures = {}      # source -> count of failures since its last penalty
        self._until = {}         # source -> clock time its penalty ends

    def penalised(self, source):
        until = self._until.get(source)
        if until is None:
            return False
        if self.clock() >= until:
            del self._until[source]
            return False
        return True

    def failure(self, source):
        """Record a failed login; returns True when this failure starts a penalty."""
        count = self._failures.pop(source, 0) + 1     # re-insert: dict order doubles as age order
        if count >= self.threshold:
            self._until.pop(source, None)
            self._until[source] = self.clock() + self.seconds
            self._trim(self._until)
            return True
        self._failures[source] = count
        self._trim(self._failures)
        return False

    def success(self, source):
        self._failures.pop(source, None)

    def _trim(self, table):
        while len(table) > self.max_sources:
            del table[next(iter(table))]

    def __len__(self):
        return len(self._until)


def parse_startups_drop(text):
    """'start:rate:full' (OpenSSH MaxStartups) -> (start, rate, full); raises ValueError."""
    parts = text.split(":") if isinstance(text, str) else []
    if len(parts) != 3 or not all(p.isascii() and p.isdigit() for p in parts):
        raise ValueError("expected start:rate:full (e.g. 400:30:1000), got %r" % (text,))
    start, rate, full = (int(p) for p in parts)
    if not (1 <= start <= full and 0 <= rate <= 100):
        raise ValueError("expected 1 <= start <= full and rate 0..100, got %r" % (text,))
    return start, rate, full


def drop_probability(unauthenticated, start, rate, full):
    """OpenSSH's random early drop: none below start, rate% at start rising linearly to 100% at full."""
    if unauthenticated < start:
        return 0.0
    if unauthenticated >= full:
        return 1.0
    return (rate + (100 - rate) * (unauthenticated - start) / (full - start)) / 100.0
