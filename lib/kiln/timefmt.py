"""Go-style duration formatting used by /info, /connections and log lines (pure logic)."""


def go_duration(seconds):
    """Format whole seconds the way Go's time.Duration prints them: 167h10m2s, 3m7s, 5s, 0s."""
    total = int(seconds)
    if total < 0:
        total = 0
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return "%dh%dm%ds" % (hours, minutes, secs)
    if minutes:
        return "%dm%ds" % (minutes, secs)
    return "%ds" % secs
