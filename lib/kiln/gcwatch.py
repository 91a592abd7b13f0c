"""GC pause measurement: gc.callbacks timing every collection of the cyclic garbage collector (the GODEBUG=gctrace
analogue), kept as totals per generation, the recent collections, and a window the dashboard's sampler takes."""
import gc
import time
from collections import deque

GC_RECENT = 64              # individual collections kept for /debug/gc


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
