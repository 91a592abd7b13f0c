"""Process probes: the process as the admin API sees it, one `Probes` per AdminServer. It owns the "heavy" lock
(one heap or greenlet walk at a time; a second is refused with `Busy` rather than queued behind a job that already
stalls the hub), the GC watch, the count of hub-blocked reports from gevent's monitor thread, the cached greenlet
count (cheap readers such as /metrics and the sampler walk at most ~1% of the time and otherwise reuse the last
count), and psutil's process figures. `RuntimeCollector` turns them into Prometheus series at scrape time.
"""
import contextlib
import logging
import time

import psutil
from gevent.lock import BoundedSemaphore
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from .census import Stint, live_greenlets
from .gcwatch import GcWatch

log = logging.getLogger("kiln.probes")

CENSUS_DUTY = 0.01          # a cached greenlet count is reused until a new walk would exceed this share of hub time


class Busy(Exception):
    """Another heavy job holds the heavy lock."""


class Probes:
    """The process as the admin API sees it. One per AdminServer; install()/uninstall() hook into gc."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._heavy = BoundedSemaphore(1)
        self.gc = GcWatch()
        self.hub_blocked = 0        # written by gevent's monitor thread only (one writer), read at scrape time
        self._process = psutil.Process()
        self._census = (0, None, 0.0)     # greenlet count, when it was taken (clock), seconds it held the hub

    def install(self):
        self.gc.install()

    def uninstall(self):
        self.gc.uninstall()

    @contextlib.contextmanager
    def heavy(self):
        """Hold the heavy lock for one job or raise Busy at once (waiting would let requests pile up behind a job
        that already stalls the hub). Yields a Stint that times the job."""
        if not self._heavy.acquire(blocking=False):
            raise Busy()
        try:
            yield Stint()
        finally:
            self._heavy.release()

    def heavy_running(self):
        return self._heavy.locked()

    def record_census(self, count, hub_secs):
        self._census = (count, self._clock(), hub_secs)

    @property
    def census_cost(self):
        return self._census[2]

    def greenlet_count(self):
        """Live greenlets, from a fresh walk when the walk budget allows and no heavy job runs, else the last one."""
        count, taken, cost = self._census
        if taken is not None and self._clock() - taken < cost / CENSUS_DUTY:
            return count
        try:
            with self.heavy() as stint:
                count = len(live_greenlets())
                self.record_census(count, stint.finish()["hub_held_secs"])
        except Busy:
            pass
        return self._census[0]

    def process_stats(self):
        """(rss bytes, open descriptors, cpu seconds user+system)."""
        with self._process.oneshot():
            rss = self._process.memory_info().rss
            fds = self._process.num_fds()
            cpu = self._process.cpu_times()
        return rss, fds, cpu.user + cpu.system


class RuntimeCollector:
    """Prometheus collector computed at scrape time from the registry and the probes."""

    def __init__(self, probes, registry):
        self._probes = probes
        self._registry = registry

    @staticmethod
    def _families():
        return {
            "sessions": GaugeMetricFamily("kiln_sessions_live", "Connections in the session registry."),
            "authenticated": GaugeMetricFamily("kiln_sessions_authenticated", "Authenticated connections."),
            "greenlets": GaugeMetricFamily("kiln_greenlets", "Live greenlets (counted by a gc walk, cached)."),
            "census": GaugeMetricFamily("kiln_greenlet_census_seconds",
                                        "How long the last greenlet walk held the hub."),
            "rss": GaugeMetricFamily("kiln_process_rss_bytes", "Resident set size (psutil)."),
            "fds": GaugeMetricFamily("kiln_process_open_fds", "Open file descriptors."),
            "cpu": CounterMetricFamily("kiln_process_cpu_seconds", "CPU time, user + system."),
            "blocked": CounterMetricFamily("kiln_hub_blocked_events",
                                           "gevent monitor reports of a hub blocked past admin.max_blocking_time."),
            "gc_collections": CounterMetricFamily("kiln_gc_collections", "Measured GC collections.",
                                                  labels=["generation"]),
            "gc_pause": CounterMetricFamily("kiln_gc_pause_seconds", "Time spent in GC pauses.",
                                            labels=["generation"]),
            "gc_pause_max": GaugeMetricFamily("kiln_gc_pause_max_seconds", "Longest GC pause seen.",
                                              labels=["generation"]),
        }

    def describe(self):
        # Without describe() the registry would call collect() at registration, i.e. walk the heap.
        return list(self._families().values())

    def collect(self):
        f = self._families()
        probes = self._probes
        f["sessions"].add_metric([], len(self._registry))
        f["authenticated"].add_metric([], len(self._registry.authenticated()))
        f["greenlets"].add_metric([], probes.greenlet_count())
        f["census"].add_metric([], probes.census_cost)
        try:
            rss, fds, cpu = probes.process_stats()
        except (psutil.Error, OSError) as e:
            log.warning("process stats unavailable: %s", e)
        else:
            f["rss"].add_metric([], rss)
            f["fds"].add_metric([], fds)
            f["cpu"].add_metric([], cpu)
        f["blocked"].add_metric([], probes.hub_blocked)
        watch = probes.gc
        for gen in range(len(watch.collections)):
            f["gc_collections"].add_metric([str(gen)], watch.collections[gen])
            f["gc_pause"].add_metric([str(gen)], watch.pause_total[gen])
            f["gc_pause_max"].add_metric([str(gen)], watch.pause_max[gen])
        return list(f.values())
