"""The dashboard's sampler: one greenlet that appends a sample of the process (from `probes.Probes`, the session
registry and the metrics' byte totals) every `interval` seconds to a ring buffer (deque(maxlen)) covering `window`
seconds, which the dashboard charts (/debug/samples).
"""
import logging
import math
import time
from collections import deque

import gevent
import psutil

log = logging.getLogger("kiln.sampler")


def _session_bytes(registry, metrics):
    """Bytes relayed so far: ended sessions (from metrics) plus the live ones' running counters."""
    total_in = getattr(metrics, "ended_bytes_in", 0)
    total_out = getattr(metrics, "ended_bytes_out", 0)
    for s in registry:
        total_in += s.bytes_in
        total_out += s.bytes_out
    return total_in, total_out


class Sampler:
    def __init__(self, probes, registry, metrics, interval=5.0, window=900.0):
        if interval <= 0:
            raise ValueError("sample interval must be > 0")
        self.probes, self.registry, self.metrics = probes, registry, metrics
        self.interval = float(interval)
        self.window = float(window)
        self.samples = deque(maxlen=max(2, int(math.ceil(self.window / self.interval))))
        self._previous = None       # (monotonic, bytes in, bytes out, cpu seconds, hub blocked) of the last sample
        self._greenlet = None

    def sample(self):
        """Take one sample now and append it to the ring buffer."""
        now, mono = time.time(), time.monotonic()
        rss, fds, cpu = self.probes.process_stats()
        bytes_in, bytes_out = _session_bytes(self.registry, self.metrics)
        blocked = self.probes.hub_blocked
        collections, pause_total, pause_max = self.probes.gc.take_window()
        rate_in = rate_out = cpu_percent = 0.0
        blocked_delta = 0
        if self._previous is not None:
            mono0, in0, out0, cpu0, blocked0 = self._previous
            elapsed = mono - mono0
            if elapsed > 0:
                # A session that ended between samples moves its bytes from the live sum to metrics' ended total; if
                # the server's hook is missing they vanish for one sample, hence the clamp.
                rate_in = max(0, bytes_in - in0) / elapsed
                rate_out = max(0, bytes_out - out0) / elapsed
                cpu_percent = max(0.0, cpu - cpu0) / elapsed * 100
            blocked_delta = max(0, blocked - blocked0)
        self._previous = (mono, bytes_in, bytes_out, cpu, blocked)
        sample = {
            "t": round(now, 3),
            "rss_bytes": rss,
            "open_fds": fds,
            "cpu_percent": round(cpu_percent, 2),
            "greenlets": self.probes.greenlet_count(),
            "sessions": len(self.registry),
            "authenticated": len(self.registry.authenticated()),
            "bytes_in_per_sec": round(rate_in, 1),
            "bytes_out_per_sec": round(rate_out, 1),
            "gc_collections": collections,
            "gc_pause_secs": round(pause_total, 6),
            "gc_pause_max_secs": round(pause_max, 6),
            "hub_blocked": blocked_delta,
        }
        self.samples.append(sample)
        return sample

    def as_json(self, since=None):
        samples = list(self.samples)
        if since is not None:
            samples = [s for s in samples if s["t"] > since]
        return {"interval_secs": self.interval, "window_secs": self.window, "samples": samples}

    # -- the greenlet ---------------------------------------------------------------------------------------------
    @property
    def running(self):
        return self._greenlet is not None and not self._greenlet.dead

    def start(self):
        if self._greenlet is None:
            self._greenlet = gevent.spawn(self._run)
            self._greenlet.link_exception(self._died)

    def stop(self):
        g, self._greenlet = self._greenlet, None
        if g is not None:
            g.kill(block=True, timeout=2)

    def _run(self):
        while True:
            try:
                self.sample()
            except (psutil.Error, OSError) as e:
                log.warning("sample failed: %s", e)
            gevent.sleep(self.interval)

    @staticmethod
    def _died(g):
        # Otherwise the hub prints the traceback to stderr, outside our logs, and the charts silently stop.
        log.error("sampler stopped: %r", g.exception, exc_info=g.exc_info or None)
