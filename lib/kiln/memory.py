"""Giving freed memory back to the operating system, and keeping what a session costs small.

After a burst of sessions closes, CPython has not freed all of it: paramiko's Transport, Packetizer and Channel
objects are reference cycles, reclaimed only by a full collection, which the generational collector may not run for
a long while (measured: 300 idle sessions closed, 10 s later all 300 client Transports still in memory). And what
Python has freed, glibc's malloc keeps (paramiko's packet buffers, deque blocks and greenlet stack copies are above
pymalloc's 512-byte limit and come from malloc): RSS stays near the peak. So when the proxy has gone quiet after
enough sessions, `Trimmer` runs one full `gc.collect()` and then `malloc_trim(0)`, which returns free heap pages.
It waits `delay` seconds after the last session ends first: the transports' reader greenlets finish just after their
handler, and what they still hold would otherwise miss the collection. The collection holds the hub once, when no
session runs (the log line gives its time). gc.freeze() after start-up would make it cheaper but hides the frozen
objects from gc.get_objects(), which /debug/greenlets and /debug/heap count with: not used.
"""
import ctypes
import ctypes.util
import gc
import logging
import os
import sys
import time

import gevent

log = logging.getLogger("kiln.memory")
ALLOCATOR = "malloc"
QUIET_DELAY = 1.0     # seconds without sessions before the collection and trim


def use_system_allocator(environ=os.environ, execv=os.execv, ignore_environment=None):
    """Restart this process (same PID, same command line, os.execv) with PYTHONMALLOC=malloc unless PYTHONMALLOC is
    already set (by us before the exec, or by an operator: `PYTHONMALLOC=pymalloc` keeps CPython's allocator).

    Why: CPython's small-object allocator gives memory back only in whole 1 MiB arenas, and after a burst of sessions
    a few long-lived objects allocated during it (metric values, samples, pool connections) pin most arenas: 1,000
    idle sessions closed left 51% of their growth resident even after gc.collect() and malloc_trim(). With every
    allocation in glibc's malloc, malloc_trim(0) returns each free page: 15% left (BENCHMARKS.md). The price is a
    few % more CPU per relayed byte. Called first thing by `serve`, before anything is opened or started.
    Under `python -I` (or -E) the interpreter ignores PYTHONMALLOC, so restarting would change nothing: not done."""
    if ignore_environment is None:
        ignore_environment = bool(sys.flags.ignore_environment)
    if environ.get("PYTHONMALLOC") or ignore_environment:
        return False
    environ["PYTHONMALLOC"] = ALLOCATOR
    argv = list(getattr(sys, "orig_argv", None) or [sys.executable] + sys.argv)
    execv(sys.executable, argv)
    return True          # only reached with a substitute execv (tests)


def _load_trim():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):     # not glibc (musl, macOS): nothing to trim
        return None


class Trimmer:
    """After at least `every` sessions ended and the session count dropped to zero, waits `delay` seconds and, if
    still no session runs (`live()`), collects cycles and calls malloc_trim."""

    def __init__(self, every=50, trim=None, collect=gc.collect, live=None, delay=QUIET_DELAY,
                 spawn_later=gevent.spawn_later):
        self.every = every
        self._trim = trim if trim is not None else _load_trim()
        self._collect = collect
        self._live = live
        self.delay = delay
        self._spawn_later = spawn_later
        self._pending = None
        self.ended_since_trim = 0
        self.trims = 0

    def session_ended(self, live_sessions):
        self.ended_since_trim += 1
        if live_sessions != 0 or self.ended_since_trim < self.every or self._pending is not None:
            return
        if self.delay <= 0 or self._live is None:
            self.trim()
        else:
            self._schedule()

    def backend_drained(self):
        """The backend closed its last pooled connection (pool_idle after a burst): what those connections held
        is free only now, after the trim that followed the sessions; collect and trim again once quiet."""
        if self._pending is None and self.delay > 0 and self._live is not None:
            self._schedule()

    def _schedule(self):
        self._pending = self._spawn_later(self.delay, self._when_quiet)

    def _when_quiet(self):
        self._pending = None
        if self._live() == 0:
            self.trim()

    def cancel(self):
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.kill(block=False)

    def trim(self):
        self.ended_since_trim = 0
        started = time.monotonic()
        found = self._collect() if self._collect is not None else 0
        collected = time.monotonic()
        released = bool(self._trim(0)) if self._trim is not None else False
        self.trims += 1
        log.info("after quiet: gc found %d unreachable objects in %.1f ms; malloc_trim released=%s in %.1f ms",
                 found, (collected - started) * 1000, released, (time.monotonic() - collected) * 1000)
        return released
