"""Giving freed memory back to the operating system.

After a burst of sessions closes, CPython has freed the objects but glibc's malloc keeps the pages (paramiko's
packet buffers and channel pipes are above pymalloc's 512-byte limit and come from malloc): RSS stays near the peak.
`malloc_trim(0)` returns free heap pages; it costs milliseconds and only runs when the proxy has just become quiet
after enough sessions. (Measured: 200 idle sessions, base 55 MiB, peak 75 MiB, after close 72 MiB without the trim,
65 MiB with it; a gc.collect() first gained nothing and held the hub 69 ms.)
"""
import ctypes
import ctypes.util
import logging
import time

log = logging.getLogger("kiln.memory")


def _load_trim():
    name = ctypes.util.find_library("c")
    if not name:
        return None
    try:
        return ctypes.CDLL(name).malloc_trim
    except (OSError, AttributeError):     # not glibc (musl, macOS): nothing to trim
        return None


class Trimmer:
    """Calls malloc_trim when the session count drops to zero after at least `every` sessions ended."""

    def __init__(self, every=50, trim=None):
        self.every = every
        self._trim = trim if trim is not None else _load_trim()
        self.ended_since_trim = 0
        self.trims = 0

    def session_ended(self, live_sessions):
        self.ended_since_trim += 1
        if live_sessions == 0 and self.ended_since_trim >= self.every:
            self.trim()

    def trim(self):
        self.ended_since_trim = 0
        if self._trim is None:
            return False
        started = time.monotonic()
        released = self._trim(0)
        self.trims += 1
        log.info("malloc_trim after quiet: released=%s in %.1f ms", bool(released),
                 (time.monotonic() - started) * 1000)
        return bool(released)
