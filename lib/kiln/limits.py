"""Process and per-source limits: descriptor limit at start, per-source penalties after failed logins."""
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
