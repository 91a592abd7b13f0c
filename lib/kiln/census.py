"""The greenlet census and stack dumps: find every live greenlet, say what each is doing, and format the result
(Go's pprof goroutine debug=1 and debug=2, and native threads). Finding greenlets walks gc.get_objects(), which holds
the hub in proportion to the whole heap, so the callers run it under `probes.Probes.heavy()`, and `Stint` times a
job and gives the hub back between slices of it (`pause()`).
"""
import gc
import linecache
import sys
import time
from collections import Counter

import gevent
import gevent.monkey
import greenlet

SLICE_GREENLETS = 200       # stack dump: greenlets formatted per slice before giving the hub a turn
PAUSE_SECS = 0.0005         # > 0 on purpose: sleep(0) may resume us before the loop has polled any socket


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
