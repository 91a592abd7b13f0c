"""The relay: three greenlets move stdin, stdout and stderr between a client channel and a BackendProcess.

EOF passes on in each direction (client EOF -> backend close_stdin); output EOF on both backend streams ends the
relay; the connection's handler then forwards the exit status. Any failure of the client side (it vanished) or a
timeout stops all three pumps, and the handler closes the backend. The relay does not know which backend it drives.
"""
import functools
import time

import gevent
from gevent.event import Event

from . import sshcompat
from .outcomes import Reason

CHUNK = 256 * 1024


class Relay:
    def __init__(self, channel, process, counters, idle_timeout, deadline):
        """counters: an object with bytes_in, bytes_out and last_activity (monotonic) attributes to update.
        deadline: monotonic time at which the whole session must end."""
        self.channel, self.process, self.counters = channel, process, counters
        self.idle_timeout, self.deadline = idle_timeout, deadline
        self.outputs_done = 0
        self.failure = None            # close reason when the relay stopped early
        self._finished = Event()

    # -- pumps ----------------------------------------------------------------------------------------------------
    def _stdin(self):
        chan, proc, c = self.channel, self.process, self.counters
        while True:
            try:
                data = chan.recv(CHUNK)
            except sshcompat.SSH_ERRORS:
                return self._fail(Reason.CLIENT_LOST)
            if not data:
                proc.close_stdin()
                return
            c.bytes_in += len(data)
            c.last_activity = time.monotonic()
            try:
                proc.write(data)
            except sshcompat.SSH_ERRORS:
                # the backend stopped reading (it may have finished); its exit status tells the rest
                proc.close_stdin()
                return

    def _output(self, read, send):
        c = self.counters
        while True:
            try:
                data = read(CHUNK)
            except sshcompat.SSH_ERRORS:
                data = b""
            if not data:
                break
            try:
                send(data)
            except sshcompat.SSH_ERRORS:
                return self._fail(Reason.CLIENT_LOST)
            c.bytes_out += len(data)
            c.last_activity = time.monotonic()
        self.outputs_done += 1
        if self.outputs_done == 2:
            self._finished.set()

    def _fail(self, reason):
        if self.failure is None:
            self.failure = reason
        self._finished.set()

    # -- driver ---------------------------------------------------------------------------------------------------
    def run(self):
        """Relay until the backend's output ends, the client fails, or a timeout. Returns None when the backend
        finished normally, else the close reason. Always stops its greenlets before returning."""
        chan, proc = self.channel, self.process
        pumps = [gevent.spawn(self._stdin),
                 gevent.spawn(self._output, proc.read_stdout, functools.partial(sshcompat.send_all, chan)),
                 gevent.spawn(self._output, proc.read_stderr,
                              functools.partial(sshcompat.send_all, chan, stderr=True))]
        try:
            while not self._finished.is_set():
                now = time.monotonic()
                idle_at = self.counters.last_activity + self.idle_timeout
                if now >= self.deadline:
                    self._fail(Reason.SESSION_TIMEOUT)
                elif now >= idle_at:
                    self._fail(Reason.IDLE_TIMEOUT)
                else:
                    self._finished.wait(min(idle_at, self.deadline) - now)
        finally:
            # stdin may still be blocked on a client that never sends EOF (git fetch does not need to)
            gevent.killall(pumps, block=True, timeout=5)
        return self.failure
