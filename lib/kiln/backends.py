"""Backends: where a command runs. Both kinds give the relay the same `BackendProcess` streams.

- `LocalBackend`: a gevent.subprocess child (argument list, no shell) in backend.repo_root.
- `SSHBackend`: a paramiko client to an OpenSSH server: identity and known_hosts loading (host key pinned), dialing,
  and the exec on a channel; its authenticated connections live in a `pool.ConnectionPool`, one per backend.

`Backend.open(parsed_command, env, timeout)` either returns a started process or raises BackendUnavailable; it
cleans up whatever it opened on every failure path. `BackendProcess.close()` is idempotent and never raises.
"""
import ipaddress
import logging
import os
import signal
import socket
import subprocess
import time
from collections import namedtuple

import gevent
import paramiko

from . import localrepo, sshcompat
from . import log as kiln_log
from .errors import BackendUnavailable, CommandRejected, ConfigError
from .pool import ConnectionPool

log = logging.getLogger("kiln.backend")

ExitStatus = namedtuple("ExitStatus", "code signal")   # one of them is None
READ_SIZE = 256 * 1024


class BackendProcess:
    """What the relay drives: stdin in, stdout and stderr out, an exit status."""
    description = "backend"
    reused = False          # True when it runs on a pooled backend connection

    def write(self, data):
        raise NotImplementedError

    def close_stdin(self):
        raise NotImplementedError

    def read_stdout(self, size=READ_SIZE):
        raise NotImplementedError

    def read_stderr(self, size=READ_SIZE):
        raise NotImplementedError

    def wait(self, timeout):
        """ExitStatus, or None if the command has not ended within timeout seconds."""
        raise NotImplementedError

    def close(self):
        raise NotImplementedError


class Backend:
    kind = "?"

    def open(self, parsed, env, timeout):
        raise NotImplementedError

    def reload(self):
        """Re-read what can change at run time (known hosts); default: nothing."""

    def close(self):
        """Release what the backend holds between sessions (pooled connections); default: nothing."""


# -- local ------------------------------------------------------------------------------------------------------
PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "TZ", "TMPDIR")


class LocalProcess(BackendProcess):
    description = "local"

    def __init__(self, popen):
        self._p = popen

    def write(self, data):
        self._p.stdin.write(data)

    def close_stdin(self):
        sshcompat.close_quietly(self._p.stdin)

    def read_stdout(self, size=READ_SIZE):
        return self._p.stdout.read(size)

    def read_stderr(self, size=READ_SIZE):
        return self._p.stderr.read(size)

    def wait(self, timeout):
        try:
            code = self._p.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            return None
        if code < 0:
            return ExitStatus(None, _signame(-code))
        return ExitStatus(code, None)

    def close(self):
        p, self._p = self._p, None
        if p is None:
            return
        if p.poll() is None:
            try:
                p.kill()
            except OSError:
                pass
        for stream in (p.stdin, p.stdout, p.stderr):
            sshcompat.close_quietly(stream)
        try:
            p.wait(timeout=5)
        except subprocess.TimeoutExpired:
            log.error("local child %d did not exit after SIGKILL", p.pid)


def _signame(num):
    try:
        return signal.Signals(num).name[3:]
    except ValueError:
        return "UNKNOWN"


class LocalBackend(Backend):
    kind = "local"

    def __init__(self, repo_root):
        self.repo_root = repo_root
        try:
            os.makedirs(repo_root, exist_ok=True)
        except OSError as e:
            raise ConfigError("cannot create backend.repo_root %s: %s" % (repo_root, e.strerror)) from None

    def open(self, parsed, env, timeout):
        # The policy vouches for the literal path only; git and hg also try other paths and follow gitfiles, .hg
        # and sharedpath. localrepo finds the repository as they will and checks every path they will use.
        argv = localrepo.resolve(self.repo_root, parsed)
        child_env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        child_env.update(env)
        try:
            popen = subprocess.Popen(argv, cwd=self.repo_root, env=child_env, stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, bufsize=0,
                                     close_fds=True, start_new_session=True)
        except OSError as e:
            raise BackendUnavailable("cannot start %s: %s" % (argv[0], e.strerror)) from None
        return LocalProcess(popen)


# -- ssh --------------------------------------------------------------------------------------------------------
# How long closing a backend channel may wait for its EOF and CLOSE to go out. They queue behind a key exchange and
# the connection's write lock: a connection that cannot send 40 bytes in this long is stuck for all its channels.
CLOSE_WAIT = 2.0
ABANDON_WAIT = 0.25        # the same for a channel given up while opening (its connection is retired anyway)


def _close_channel(chan, wait):
    """Close a backend channel, waiting at most `wait` seconds for its EOF and CLOSE to be sent. False when they
    were not (the channel is closed on our side all the same; the backend's side ends with the connection)."""
    if chan is None:
        return True
    return sshcompat.bounded(wait, chan.close) != sshcompat.TIMED_OUT


class SSHProcess(BackendProcess):
    """One exec channel on a (possibly shared) backend connection; close() closes the channel (waiting at most
    CLOSE_WAIT) and hands the connection back to its pool."""
    description = "ssh"

    def __init__(self, channel, release):
        self._chan, self._release = channel, release

    def write(self, data):
        sshcompat.send_all(self._chan, data)

    def close_stdin(self):
        try:
            self._chan.shutdown_write()
        except sshcompat.SSH_ERRORS:
            pass

    def read_stdout(self, size=READ_SIZE):
        return self._chan.recv(size)

    def read_stderr(self, size=READ_SIZE):
        return self._chan.recv_stderr(size)

    def wait(self, timeout):
        chan = self._chan
        if chan is None or not chan.status_event.wait(timeout):
            return None
        sig = sshcompat.exit_signal(chan)
        if sig is not None:
            return ExitStatus(None, sig)
        if chan.exit_status < 0:   # channel closed without a status
            return None
        return ExitStatus(chan.exit_status, None)

    def close(self):
        chan, release = self._chan, self._release
        self._chan = self._release = None
        sent = None
        try:
            sent = _close_channel(chan, CLOSE_WAIT)
        finally:
            # the slot goes back even when the close is cut short (the handler killed meanwhile)
            if release is not None:
                release(None if sent else "could not send a channel close within %gs" % CLOSE_WAIT
                        if sent is False else "a session was killed while closing its channel")


class BackendConnection:
    """One authenticated SSH connection to the backend; carries up to `max_sessions` exec channels at once."""

    def __init__(self, sock, transport):
        self.sock, self.transport = sock, transport
        self.channels = 0
        self.sessions_served = 0
        self.retired = False
        self.idle_since = time.monotonic()

    @property
    def closed(self):
        return self.transport is None

    def alive(self):
        return self.transport is not None and self.transport.is_active()

    def usable(self, max_sessions):
        return self.alive() and not self.retired and self.channels < max_sessions

    def close(self):
        transport, sock = self.transport, self.sock
        self.transport = self.sock = None
        sshcompat.close_quietly(transport)
        sshcompat.close_quietly(sock)


def _connect(address, timeout):
    """TCP connect; an IP literal is connected directly, because gevent sends even those through its resolver
    threadpool (two extra greenlets for ~5 s after every dial)."""
    host, port = address
    try:
        family = socket.AF_INET6 if ipaddress.ip_address(host).version == 6 else socket.AF_INET
    except ValueError:
        return socket.create_connection(address, timeout=timeout)
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.settimeout(timeout)
        sock.connect((host, port))
    except BaseException:
        sock.close()
        raise
    return sock


def _pins(host_keys, name):
    """The pinned keys for one host name, comparable: {(key type, key bytes)}."""
    entry = host_keys.lookup(name) or {}
    return {(kind, entry[kind].asbytes()) for kind in entry.keys()}


def known_hosts_name(host, port):
    return host if port == 22 else "[%s]:%d" % (host, port)


class SSHBackend(Backend):
    """Forwards to an OpenSSH server. Authenticated connections are pooled and multiplexed, as OpenSSH's
    ControlMaster does: a session costs one channel open instead of a TCP connect, key exchange and public-key auth
    (the proxy's CPU per session and the setup latency). Each connection carries at most `max_sessions` channels
    (keep it below the backend's sshd MaxSessions, default 10) and is closed after `pool_idle` seconds without
    one; `max_sessions = 1` with `pool_idle = 0` gives one backend connection per session (pool.ConnectionPool).
    on_drained: called when the pool has just closed its last connection (the server's Trimmer: those objects are
    freed long after the last session)."""
    kind = "ssh"

    def __init__(self, address, user, identity_path, known_hosts_path, max_sessions=8, pool_idle=60.0,
                 pool_max_idle=8, on_drained=None, name="default"):
        self.address, self.user, self.name = address, user, name
        self.identity_path, self.known_hosts_path = identity_path, known_hosts_path
        try:
            self.identity = paramiko.PKey.from_path(identity_path)
        except FileNotFoundError:
            raise ConfigError("backend.identity not found: %s" % identity_path) from None
        except (OSError, paramiko.SSHException, ValueError) as e:
            raise ConfigError("cannot load backend.identity %s: %s" % (identity_path, e)) from None
        self.host_keys = self._load_known_hosts()
        self.pool = ConnectionPool(self._dial, max_sessions, pool_idle, pool_max_idle, on_drained)

    def _load_known_hosts(self):
        name = known_hosts_name(*self.address)
        try:
            keys = paramiko.HostKeys(self.known_hosts_path)
        except FileNotFoundError:
            raise ConfigError("backend.known_hosts not found: %s" % self.known_hosts_path) from None
        except (OSError, paramiko.SSHException, ValueError) as e:
            raise ConfigError("cannot read backend.known_hosts %s: %s" % (self.known_hosts_path, e)) from None
        if keys.lookup(name) is None:
            raise ConfigError("backend.known_hosts %s has no key for %s" % (self.known_hosts_path, name))
        return keys

    def reload(self):
        """Re-read known_hosts; when this backend's pinned keys changed, connections made under the old pins take no
        new sessions (idle ones close now, busy ones when done). Unchanged pins keep the pool as it is: a reload of
        keys or of another backend's pins costs this one nothing."""
        name = known_hosts_name(*self.address)
        before = _pins(self.host_keys, name)
        self.host_keys = self._load_known_hosts()
        if _pins(self.host_keys, name) == before:
            return
        log.info("backend host keys for %s changed: retiring %d pooled connections", name, len(self.pool))
        self.pool.retire_all()

    def open(self, parsed, env, timeout):
        """A started exec channel, within `timeout` seconds in all (the pool shares the budget between pooled
        connections and a fresh one). Nothing has reached the client yet, so it sees one outcome either way."""
        slog = kiln_log.for_session(env.get("KILN_SESSION", "-"), "kiln.backend")
        conn, chan, reused = self.pool.open(lambda c, left: self._open_channel(c, parsed, env, left), timeout, slog)
        return self._track(conn, chan, reused)

    def _track(self, conn, chan, reused):
        pool = self.pool
        proc = SSHProcess(chan, lambda trouble=None: pool.release(conn, trouble))
        proc.reused = reused
        return proc

    def close(self):
        """Close every pooled connection (shutdown)."""
        self.pool.close()

    def _open_channel(self, conn, parsed, env, timeout):
        chan = why = None
        attempt = gevent.Timeout(timeout)
        attempt.start()
        try:
            chan = sshcompat.use_chunk_pipes(conn.transport.open_session(timeout=timeout))
            for key, value in env.items():
                chan.set_environment_variable(key, value)
            chan.exec_command(parsed.backend_command)
            return chan, None
        except sshcompat.SSH_ERRORS as e:
            why = "refused a session: %s" % (str(e) or e.__class__.__name__)
        except BaseException as e:
            attempt.close()         # before the clean-up below, which must not be cut by it
            if e is not attempt:    # the dial budget ran out, or the session is being killed
                _close_channel(chan, ABANDON_WAIT)
                raise
            why = "did not answer %s within %.2fs" % ("the exec" if chan else "a channel open", timeout)
        finally:
            attempt.close()
        _close_channel(chan, ABANDON_WAIT)
        return None, why

    def _dial(self, timeout):
        sock = transport = None
        name = known_hosts_name(*self.address)
        pinned = self.host_keys.lookup(name)
        try:
            try:
                sock = _connect(self.address, timeout)
            except OSError as e:
                raise BackendUnavailable("cannot connect to %s:%d: %s" % (self.address + (e,))) from None
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            transport = sshcompat.Transport(sock, disabled_algorithms=sshcompat.DISABLED,
                                            default_max_packet_size=sshcompat.BACKEND_MAX_PACKET,
                                            default_window_size=sshcompat.BACKEND_WINDOW)
            sshcompat.harden(transport)
            sshcompat.capture_exit_signal(transport)
            opts = transport.get_security_options()
            opts.key_types = [k for k in opts.key_types if k in pinned or
                              (k.startswith("rsa-sha2-") and "ssh-rsa" in pinned)]
            try:
                transport.start_client(timeout=timeout)
            except sshcompat.SSH_ERRORS as e:
                raise BackendUnavailable("SSH handshake with backend failed: %s" % (e,)) from None
            server_key = transport.get_remote_server_key()
            if not self.host_keys.check(name, server_key):
                log.error("BACKEND HOST KEY MISMATCH for %s: got %s %s; refusing (known_hosts %s)",
                          name, server_key.get_name(), server_key.fingerprint, self.known_hosts_path)
                raise BackendUnavailable("backend host key does not match known_hosts")
            try:
                transport.auth_publickey(self.user, self.identity)
            except sshcompat.SSH_ERRORS as e:
                raise BackendUnavailable("backend refused our key: %s" % (e,)) from None
        except BaseException:
            sshcompat.close_quietly(transport)
            sshcompat.close_quietly(sock)
            raise
        log.info("backend connection opened to %s:%d (%d pooled)", self.address[0], self.address[1],
                 len(self.pool) + 1)
        return BackendConnection(sock, transport)


def create(cfg, settings=None, on_drained=None, name="default"):
    """The backend one set of backend settings names ([backend] by default, or one of cfg.backends)."""
    b = settings if settings is not None else cfg.backend
    if b.kind == "ssh":
        return SSHBackend(b.address, b.user, b.identity, b.known_hosts, b.max_sessions, b.pool_idle, b.pool_max_idle,
                          on_drained=on_drained, name=name)
    backend = LocalBackend(b.repo_root)
    backend.name = name
    return backend


def create_all(cfg, on_drained=None):
    """{name: Backend} for "default" ([backend]) and every [backends.NAME]; each has its own connection pool, dial
    and host-key pins. on_drained: see SSHBackend. Closes what it made when one of them cannot be made."""
    made = {}
    try:
        for name, settings in getattr(cfg, "backends", {"default": cfg.backend}).items():
            made[name] = create(cfg, settings, on_drained, name)
    except BaseException:
        for backend in made.values():
            backend.close()
        raise
    return made
