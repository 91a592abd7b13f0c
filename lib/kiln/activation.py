"""Socket activation (systemd's sd_listen_fds protocol): listening sockets inherited from the service manager.

When LISTEN_PID is this process and LISTEN_FDS = N >= 1, descriptors 3 .. 3+N-1 are listening sockets, named by the
colon-separated LISTEN_FDNAMES (FileDescriptorName= in the .socket unit). The one named `ssh` serves SSH (else the
first one not named `admin`), the one named `admin` serves the admin API; the others are closed, logged. Whatever
is served from an inherited socket binds nothing: proxy.listen / admin.listen are then ignored for it.

Bad input is a ConfigError (exit status 2, one line): LISTEN_FDS without a LISTEN_PID naming this process (the
descriptors were meant for another process: a wrapper between systemd and us), a malformed count or name list, or a
descriptor that is not a listening TCP socket. The variables are removed from the environment once read, so that
child processes (local git/hg) do not see descriptors that are not theirs; the sockets are made non-inheritable.
"""
import os
import socket
import stat

import gevent.socket

from .errors import ConfigError

LISTEN_FDS_START = 3
MAX_FDS = 64


class Inherited:
    """The sockets handed over: `ssh` and `admin` (each a socket or None), and `unused` [(fd, name)]."""

    def __init__(self, ssh=None, admin=None, unused=(), names=()):
        self.ssh, self.admin, self.unused, self.names = ssh, admin, list(unused), dict(names)

    def name_of(self, sock):
        return self.names.get(sock.fileno(), "")

    def close(self):
        for sock in (self.ssh, self.admin):
            if sock is not None:
                sock.close()


def _parse(environ, pid, first_fd):
    """(fds, names) from the environment, or None when no socket was passed to this process."""
    count = environ.get("LISTEN_FDS")
    if count is None:
        return None
    if not (count.isascii() and count.isdigit()) or int(count) > MAX_FDS:
        raise ConfigError("socket activation: LISTEN_FDS=%r is not a number of descriptors" % count)
    owner = environ.get("LISTEN_PID")
    if owner is None or not (owner.isascii() and owner.isdigit()) or int(owner) != pid:
        raise ConfigError("socket activation: LISTEN_FDS=%s is set but LISTEN_PID=%s is not this process (%d): "
                          "the sockets were passed to another process; start kilnproxy directly from the service "
                          "manager, or unset LISTEN_FDS" % (count, owner if owner is not None else "(unset)", pid))
    n = int(count)
    if n == 0:
        return None
    raw_names = environ.get("LISTEN_FDNAMES")
    names = raw_names.split(":") if raw_names is not None else [""] * n
    if len(names) != n:
        raise ConfigError("socket activation: LISTEN_FDNAMES=%r names %d sockets, LISTEN_FDS=%d"
                          % (raw_names, len(names), n))
    return list(range(first_fd, first_fd + n)), names


def _check_listening_tcp(fd, name):
    what = "inherited descriptor %d%s" % (fd, " (%s)" % name if name else "")
    try:
        mode = os.fstat(fd).st_mode
    except OSError as e:
        raise ConfigError("socket activation: %s: %s" % (what, e.strerror)) from None
    if not stat.S_ISSOCK(mode):
        raise ConfigError("socket activation: %s is not a socket" % what)
    sock = gevent.socket.socket(fileno=fd)
    try:
        if sock.type != socket.SOCK_STREAM or sock.family not in (socket.AF_INET, socket.AF_INET6):
            raise ConfigError("socket activation: %s is not a TCP socket (ListenStream= with an address or port)"
                              % what)
        if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
            raise ConfigError("socket activation: %s is not listening" % what)
    except ConfigError:
        sock.detach()       # not ours to close: the error ends the process anyway
        raise
    sock.set_inheritable(False)
    return sock


def inherited(environ=None, pid=None, first_fd=LISTEN_FDS_START):
    """The sockets passed by the service manager (an Inherited), or None without socket activation.

    Call after the gevent monkey-patch (the sockets are gevent sockets) and at most once: it consumes the variables.
    first_fd is 3 but for tests, which cannot hand descriptors 3 and up to their own process.
    """
    environ = os.environ if environ is None else environ
    pid = os.getpid() if pid is None else pid
    parsed = _parse(environ, pid, first_fd)
    for var in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        environ.pop(var, None)
    if parsed is None:
        return None
    fds, names = parsed
    named = dict(zip(fds, names))
    ssh_fd = next((fd for fd in fds if named[fd] == "ssh"), None)
    if ssh_fd is None:
        ssh_fd = next((fd for fd in fds if named[fd] != "admin"), None)
    admin_fd = next((fd for fd in fds if named[fd] == "admin"), None)
    ssh = _check_listening_tcp(ssh_fd, named[ssh_fd]) if ssh_fd is not None else None
    try:
        admin = _check_listening_tcp(admin_fd, named[admin_fd]) if admin_fd is not None else None
    except ConfigError:
        if ssh is not None:
            ssh.close()
        raise
    unused = [(fd, named[fd]) for fd in fds if fd not in (ssh_fd, admin_fd)]
    for fd, _name in unused:
        try:
            os.close(fd)
        except OSError:
            pass
    return Inherited(ssh, admin, unused, named)
