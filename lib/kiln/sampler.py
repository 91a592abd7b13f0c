"""Process probes and the dashboard's sampler: what the process looks like now, and over the last 15 minutes.

`Probes` (one per AdminServer) owns the "heavy" lock, GC pause measurement (gc.callbacks: the GODEBUG=gctrace
analogue), the count of hub-blocked reports from gevent's monitor thread, and the greenlet census. Finding greenlets
means walking gc.get_objects(), which holds the hub in proportion to the whole heap (~0.1 s at 600k objects), so:
a walk runs only under the heavy lock, the cheap readers (/metrics, the sampler) walk at most ~1% of the time and
otherwise reuse the last count, and the stack dump gives the hub back between slices of its work.

`Sampler` is one greenlet that appends a sample every `interval` seconds to a ring buffer (deque(maxlen)) covering
`window` seconds, which the dashboard charts.
"""
import contextlib
import gc
import linecache
import logging
import math
import sys
import time
from collections import Counter, deque

import gevent
import gevent.monkey
import greenlet
import psutil
from gevent.lock import BoundedSemaphore
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

log = logging.getLogger("kiln.sampler")

CENSUS_DUTY = 0.01          # a cached greenlet count is reused until a new walk would exceed this share of hub time
SLICE_GREENLETS = 200       # stack dump: greenlets formatted per slice before giving the hub a turn
PAUSE_SECS = 0.0005         # > 0 on purpose: sleep(0) may resume us before the loop has polled any socket
GC_RECENT = 64              # individual collections kept for /debug/gc


class Busy(Exception):
    """Another heavy job holds the heavy lock."""


class Stint:
    """How long one heavy job holds the hub. A job that can be split calls pause() between slices so other greenlets
    run; `hub_held_secs` is then its longest slice, the figure that decides everyone else's latency."""

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self.started = clock()
        self._slice = self.started
        self.longest = 0.0
        self.busy = 0.0
        self.pauses = 0

    def _end_slice(self):
        if self._slice is not None:
            held = self._clock() - self._slice
            self.busy += held
            self.longest = max(self.longest, held)
            self._slice = None

    def pause(self):
        self._end_slice()
        self.pauses += 1
        gevent.sleep(PAUSE_SECS)
        self._slice = self._clock()

    def finish(self):
        self._end_slice()
        return {"hub_held_secs": round(self.longest, 6), "hub_busy_secs": round(self.busy, 6),
                "wall_secs": round(self._clock() - self.started, 6), "pauses": self.pauses}


class GcWatch:
    """Pause times of the cyclic garbage collector, measured with gc.callbacks.

    The callback only updates plain attributes: a collection can start inside any allocation, including one made
    while a lock is held (a prometheus metric's, the logging handler's), so it must neither take locks nor log."""

    def __init__(self, clock=time.perf_counter):
        self._clock = clock
        self._started = None
        self._installed = False
        generations = len(gc.get_stats())
        self.collections = [0] * generations
        self.pause_total = [0.0] * generations
        self.pause_max = [0.0] * generations
        self.recent = deque(maxlen=GC_RECENT)
        self.since = None
        self._window = [0, 0.0, 0.0]            # collections, total and longest pause since take_window()

    def install(self):
        if not self._installed:
            gc.callbacks.append(self._on_gc)
            self._installed = True
            self.since = time.time()

    def uninstall(self):
        if self._installed:
            self._installed = False
            try:
                gc.callbacks.remove(self._on_gc)
            except ValueError:      # someone cleared gc.callbacks
                pass

    def _on_gc(self, phase, info):
        if phase == "start":
            self._started = self._clock()
            return
        if self._started is None:    # installed while a collection was running
            return
        pause = self._clock() - self._started
        self._started = None
        gen = min(max(int(info.get("generation", 0)), 0), len(self.collections) - 1)
        self.collections[gen] += 1
        self.pause_total[gen] += pause
        self.pause_max[gen] = max(self.pause_max[gen], pause)
        self.recent.append((time.time(), gen, pause, info.get("collected", 0), info.get("uncollectable", 0)))
        window = self._window
        window[0] += 1
        window[1] += pause
        window[2] = max(window[2], pause)

    def take_window(self):
        """(collections, total pause, longest pause) since the previous call; the sampler is the only caller."""
        window, self._window = self._window, [0, 0.0, 0.0]
        return tuple(window)

    def as_json(self):
        stats = gc.get_stats()
        generations = []
        for gen, st in enumerate(stats):
            generations.append({
                "generation": gen,
                "collections": st.get("collections", 0),
                "collected": st.get("collected", 0),
                "uncollectable": st.get("uncollectable", 0),
                "measured_collections": self.collections[gen] if gen < len(self.collections) else 0,
                "pause_total_secs": round(self.pause_total[gen], 6) if gen < len(self.pause_total) else 0.0,
                "pause_max_secs": round(self.pause_max[gen], 6) if gen < len(self.pause_max) else 0.0,
            })
        count = sum(self.collections)
        total = sum(self.pause_total)
        return {
            "enabled": gc.isenabled(),
            "thresholds": list(gc.get_threshold()),
            "counts": list(gc.get_count()),
            "garbage": len(gc.garbage),
            "frozen": gc.get_freeze_count(),
            "measuring": self._installed,
            "measured_since": self.since,
            "generations": generations,
            "pauses": {"count": count, "total_secs": round(total, 6), "max_secs": round(max(self.pause_max), 6),
                       "mean_secs": round(total / count, 6) if count else 0.0},
            "recent": [{"time": round(t, 3), "generation": g, "pause_secs": round(p, 6), "collected": c,
                        "uncollectable": u} for t, g, p, c, u in list(self.recent)],
        }


# -- greenlets -----------------------------------------------------------------------------------------------------
def live_greenlets():
    """Every greenlet in the process that has not finished. Walks every gc-tracked object: call under the heavy lock."""
    return [o for o in gc.get_objects() if isinstance(o, greenlet.greenlet) and not o.dead]


def _stack(frame):
    """((filename, lineno, function), ...) outermost first; works on frames and on gevent's spawning_stack records."""
    out = []
    while frame is not None:
        code = frame.f_code
        out.append((code.co_filename, frame.f_lineno, code.co_name))
        frame = frame.f_back
    out.reverse()
    return tuple(out)


def _root(g):
    while g.parent is not None:
        g = g.parent
    return g


def _state(g, current, home):
    if g is current:
        return "running"
    if g.gr_frame is not None:
        return "suspended"
    # greenlet's own truth value (started and not dead); gevent's Greenlet redefines bool() as "scheduled or running"
    if not greenlet.greenlet.__bool__(g):
        return "not started"
    if _root(g) is not home:
        return "running in another thread"
    return "suspended"          # in compiled code only (e.g. a greenlet spawned on Event.wait): no Python frames


def _entry(g):
    """What a gevent Greenlet was spawned to run ("module.qualname"), the only clue when it has no Python frames."""
    run = getattr(g, "_run", None)
    if run is None:
        return ""
    name = getattr(run, "__qualname__", None) or type(run).__qualname__
    module = getattr(run, "__module__", None)
    return "%s.%s" % (module, name) if module else name


def survey(stint, with_spawn=False):
    """Describe every live greenlet: [{"label", "state", "stack", "entry", "spawned"}]. Slices itself with
    stint.pause(); a greenlet that finished during a pause is left out."""
    current = greenlet.getcurrent()
    home = _root(current)
    here = _stack(sys._getframe(1))
    found = live_greenlets()
    entries = []
    for i, g in enumerate(found):
        if i and i % SLICE_GREENLETS == 0:
            stint.pause()
        if g.dead:
            continue
        state = _state(g, current, home)
        if state == "running":
            stack = here
        elif g.gr_frame is not None:
            stack = _stack(g.gr_frame)
        else:
            stack = ()
        spawned = ()
        if with_spawn:
            spawned = _stack(getattr(g, "spawning_stack", None))
        entries.append({"label": repr(g)[:200], "state": state, "stack": stack,
                        "entry": "" if stack else _entry(g), "spawned": spawned})
    del found       # the list keeps every greenlet alive; drop it before the formatting below
    return entries


def group_stacks(entries):
    """[((state, stack, entry), count)] most common first: identical stacks are usually the same kind of work."""
    return Counter((e["state"], e["stack"], e["entry"]) for e in entries).most_common()


def _short(frame):
    filename, lineno, name = frame
    return "%s (%s:%d)" % (name, filename, lineno)


def stacks_json(groups, limit):
    out = []
    for (state, stack, entry), count in groups[:limit]:
        item = {"count": count, "state": state, "stack": [_short(f) for f in reversed(stack)][:30]}
        if entry:
            item["entry"] = entry
        out.append(item)
    return out


def format_frames(frames, indent="  "):
    lines = []
    for filename, lineno, name in frames:
        lines.append('%sFile "%s", line %d, in %s' % (indent, filename, lineno, name))
        source = linecache.getline(filename, lineno).strip()
        if source:
            lines.append("%s  %s" % (indent, source))
    return lines


def _no_frames(entry, indent):
    return ["%s(no Python frames%s)" % (indent, "; spawned to run " + entry if entry else "")]


def format_groups(groups, stint):
    """pprof's debug=1: each distinct stack once, with how many greenlets share it."""
    lines = []
    for i, ((state, stack, entry), count) in enumerate(groups):
        if i and i % SLICE_GREENLETS == 0:
            stint.pause()
        lines.append("%d @ %s" % (count, state))
        lines.extend(format_frames(stack, "#   ") or _no_frames(entry, "#   "))
        lines.append("")
    return lines


def format_entries(entries, stint):
    """pprof's debug=2: every greenlet with its own stack and where it was spawned."""
    lines = []
    for i, e in enumerate(entries):
        if i and i % SLICE_GREENLETS == 0:
            stint.pause()
        lines.append("greenlet %s [%s]:" % (e["label"], e["state"]))
        lines.extend(format_frames(e["stack"]) or _no_frames(e["entry"], "  "))
        if e["spawned"]:
            lines.append("Spawned at:")
            lines.extend(format_frames(e["spawned"]))
        lines.append("")
    return lines


def format_threads():
    """Native threads other than ours (gevent's monitor thread, threadpool workers)."""
    get_ident = gevent.monkey.get_original("_thread", "get_ident")
    me = get_ident()
    lines = []
    for ident, frame in sorted(sys._current_frames().items()):
        if ident == me:
            continue
        lines.append("native thread 0x%x:" % ident)
        lines.extend(format_frames(_stack(frame)) or ["  (no Python frames)"])
        lines.append("")
    return lines


# -- probes --------------------------------------------------------------------------------------------------------
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


def _session_bytes(registry, metrics):
    """Bytes relayed so far: ended sessions (from metrics) plus the live ones' running counters."""
    total_in = getattr(metrics, "ended_bytes_in", 0)
    total_out = getattr(metrics, "ended_bytes_out", 0)
    for s in registry:
        total_in += s.bytes_in
        total_out += s.bytes_out
    return total_in, total_out


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


# -- the sampler ---------------------------------------------------------------------------------------------------
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
