"""Telling the service manager (systemd's sd_notify protocol) what the proxy is doing, without a library.

The protocol is one datagram per message to the AF_UNIX socket named in $NOTIFY_SOCKET (a leading '@' means the
abstract namespace), holding newline-separated VAR=value lines: READY=1, RELOADING=1 with MONOTONIC_USEC=, STOPPING=1,
STATUS=<text a person reads>, WATCHDOG=1. Without NOTIFY_SOCKET every call is a no-op, so `serve` calls them
unconditionally. A socket that cannot be reached (gone, refused, not a path) is logged once as a WARNING and the
proxy carries on without notifications: the service manager's problem must not stop the service.

The watchdog ping comes from a greenlet on the event loop, every WATCHDOG_USEC/2: a hub blocked by a runaway greenlet
stops the pings and systemd (WatchdogSec=) restarts the service. It runs only when WATCHDOG_USEC is set and
WATCHDOG_PID is unset or this process.
"""
import logging
import os
import socket
import time

import gevent

log = logging.getLogger("kiln.notify")
STATUS_EVERY = 5.0       # seconds between STATUS= refreshes while serving (sent only when the text changed)


def _address(value):
    """The socket address for a NOTIFY_SOCKET value, or None when it names nothing we can send to."""
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    return None


def watchdog_interval(environ, pid):
    """Seconds between WATCHDOG=1 pings (half of WATCHDOG_USEC), or None when the watchdog is not ours."""
    usec = environ.get("WATCHDOG_USEC", "")
    if not usec.isdigit() or int(usec) == 0:
        return None
    owner = environ.get("WATCHDOG_PID", "")
    if owner and (not owner.isdigit() or int(owner) != pid):
        return None
    return int(usec) / 1e6 / 2


class Notifier:
    """sd_notify for one process. `from_environ()` reads NOTIFY_SOCKET and the watchdog variables once."""

    def __init__(self, socket_path=None, watchdog=None, clock_usec=None):
        self.socket_path = socket_path or None
        self.watchdog_every = watchdog
        self._clock_usec = clock_usec or (lambda: time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000)
        self._sock = None
        self._broken = False
        self._last_status = None
        self._greenlets = []
        self.sent = 0

    @classmethod
    def from_environ(cls, environ=os.environ, pid=None):
        pid = os.getpid() if pid is None else pid
        path = environ.get("NOTIFY_SOCKET") or None
        return cls(path, watchdog_interval(environ, pid) if path else None)

    @property
    def enabled(self):
        return self.socket_path is not None and not self._broken

    def send(self, *lines):
        """Send VAR=value lines as one datagram; False when there is nowhere (or no longer anywhere) to send."""
        if not self.enabled:
            return False
        address = _address(self.socket_path)
        try:
            if address is None:
                raise OSError("not an absolute path or @abstract name")
            if self._sock is None:
                self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
            self._sock.sendto("\n".join(lines).encode("utf-8", "replace"), address)
        except OSError as e:
            self._broken = True
            self.close()
            log.warning("sd_notify: cannot send to NOTIFY_SOCKET=%s (%s); carrying on without service manager "
                        "notifications", self.socket_path, e.strerror or e)
            return False
        self.sent += 1
        return True

    # -- the lifecycle messages serve() sends ---------------------------------------------------------------------
    def status(self, text):
        self._last_status = text
        return self.send("STATUS=" + text)

    def ready(self, status):
        self._last_status = status
        return self.send("READY=1", "STATUS=" + status)

    def reloading(self):
        self._last_status = "reloading"
        return self.send("RELOADING=1", "MONOTONIC_USEC=%d" % self._clock_usec(), "STATUS=reloading")

    def stopping(self, status):
        self._last_status = status
        return self.send("STOPPING=1", "STATUS=" + status)

    # -- greenlets on the event loop ------------------------------------------------------------------------------
    def start(self, describe, status_every=STATUS_EVERY):
        """Start the watchdog pings (if ours) and a STATUS= refresh from describe() (sent when it changed)."""
        if not self.enabled:
            return
        if self.watchdog_every:
            self._greenlets.append(gevent.spawn(self._ping_loop, self.watchdog_every))
            log.info("sd_notify: watchdog ping every %gs", self.watchdog_every)
        self._greenlets.append(gevent.spawn(self._status_loop, describe, status_every))

    def _ping_loop(self, every):
        while self.send("WATCHDOG=1"):
            gevent.sleep(every)

    def _status_loop(self, describe, every):
        while self.enabled:
            gevent.sleep(every)
            text = describe()
            if text != self._last_status:
                self.status(text)

    def stop(self):
        greenlets, self._greenlets = self._greenlets, []
        gevent.killall(greenlets)

    def close(self):
        sock, self._sock = self._sock, None
        if sock is not None:
            sock.close()
