"""The SSH front: a StreamServer whose per-connection greenlet owns everything the connection opens.

`ProxyServer.handle` runs one connection through named phases, each a method below:

    admit -> login -> bind -> dial -> relay -> finish

admit (limits at accept: `admission.Admission`, and the PROXY protocol header: `frontdoor.FrontDoor`), login (banner, a handshake slot, key exchange, public-key auth and
one exec request, all under timeouts.login), bind (the identity, the account's slot, the command policy), dial (the
backend under timeouts.dial), relay (three pumps under the idle and session timeouts, then the exit status), finish
(close everything, count the outcome, log the end line: always, in `finally`). A `Connection` holds everything one
connection owns; a phase that ends the session early raises `SessionEnded` with its `outcomes.Reason`. There is
exactly one catch-all, which logs the stack with the session key.
"""
import logging
import socket
import time

import gevent
from gevent.pool import Pool
from gevent.server import StreamServer

from . import log as kiln_log
from . import sshcompat
from .admission import Admission, Refused
from .errors import BackendUnavailable, CommandRejected, ConfigError, KeyStoreError
from .frontdoor import FrontDoor
from .memory import Trimmer
from .metrics import NullMetrics
from .outcomes import Reason
from .policy import ConnectionPolicy
from .relay import Relay
from .watchdog import Watchdog
from .sessions import Session, new_session_key

log = logging.getLogger("kiln.server")
LINGER_AFTER_CLOSE = 2.0      # seconds to let the client read our last packets before the socket closes
EXIT_STATUS_WAIT = 10.0       # after the backend's output ended, how long its exit status may take
TELL_CLIENT_WAIT = 2.0        # our last words to a client, and our close: one that stopped reading must not hold us
FINISH_FLOOR = 2.0            # the exit status and the close still get this long when timeouts.idle is all but used
LISTEN_BACKLOG = 4096


class SessionEnded(Exception):
    """A phase ended the connection before or instead of the relay; `reason` is its outcomes.Reason."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class Connection:
    """Everything one client connection owns, from accept to the end line; its handler greenlet closes all of it."""

    def __init__(self, sock, addr, lease, session):
        self.sock, self.addr, self.lease, self.session = sock, addr, lease, session
        self.log = kiln_log.for_session(session.key)
        self.transport = self.chan = self.proc = self.policy = None
        self.identity = None          # keystore.Identity once authenticated
        self.parsed = None            # commands.ParsedCommand once the command passed the policy
        self.status = None            # backends.ExitStatus when the command ended
        self.via = None               # the balancer's address when a PROXY protocol header named the client
        self.reason = Reason.UNKNOWN

    @property
    def source(self):
        return self.addr[0]


def _tune_socket(sock, keepalive, keepalive_max):
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    if keepalive > 0:
        # TCP keepalives find half-open connections (a client whose machine vanished) long before timeouts.idle
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        interval = max(1, int(keepalive))
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL, interval)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT, keepalive_max)


def _tell_client(chan, message, status=1):
    """Best effort, for at most TELL_CLIENT_WAIT: a 'kilnproxy: ' line on the client's stderr and an exit status.
    paramiko's sendall_stderr waits for ever while the client's window is 0, send_exit_status up to 30 s for a key
    exchange."""
    if chan is None:
        return

    def say():
        chan.sendall_stderr(("kilnproxy: %s\n" % message).encode("utf-8"))
        chan.send_exit_status(status)
    sshcompat.bounded(TELL_CLIENT_WAIT, say)


class ProxyServer:
    def __init__(self, cfg, keystore, backends, registry, host_keys, metrics=None, trimmer=None):
        """backends: {name: Backend} with "default" ([backend]) and every [backends.NAME] (a lone Backend is the
        default one). trimmer: the memory.Trimmer the backends report their drained pools to (made by the caller,
        which gives its `backend_drained` to the backends); a private one when None."""
        self.cfg = cfg
        self.keystore = keystore
        self.backends = backends if isinstance(backends, dict) else {"default": backends}
        self.backend = self.backends["default"]
        self.registry = registry
        self.host_keys = host_keys
        self.metrics = metrics or NullMetrics()
        self.key_index = keystore.index()
        self.handlers = Pool(cfg.limits.max_connections)     # the connection greenlets (StreamServer's spawn)
        self.trimmer = trimmer if trimmer is not None else Trimmer(live=lambda: len(self.registry))
        self.admission = Admission(cfg.limits)
        self.front_door = FrontDoor(cfg.proxy.proxy_protocol, cfg.proxy.proxy_trusted)
        self.stream_server = None
        self.draining = False
        self.started = time.time()
        self.watchdog = Watchdog(registry, cfg.timeouts.idle, cfg.timeouts.session, cfg.timeouts.grace, self.metrics)

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self, listener=None):
        """listener: a bound, listening socket made elsewhere (socket activation) instead of proxy.listen."""
        # gevent's default backlog (128) overflows under a burst of clones while the hub is busy with handshakes;
        # dropped SYNs cost clients 1 s, 3 s, 7 s retransmits. The kernel caps this at net.core.somaxconn.
        if listener is None:
            self.stream_server = StreamServer(self.cfg.proxy.listen, self.handle, spawn=self.handlers,
                                              backlog=LISTEN_BACKLOG)
        else:       # its backlog is the one it was made with (systemd: Backlog=)
            self.stream_server = StreamServer(listener, self.handle, spawn=self.handlers)
        self.stream_server.start()
        self.watchdog.start()
        log.info("listening for SSH on %s:%d (backend %s, %d keys)", *self.address,
                 ", ".join("%s: %s" % (name, b.kind) for name, b in self.backends.items()) if len(self.backends) > 1
                 else self.backend.kind, len(self.key_index))

    @property
    def address(self):
        return self.stream_server.address[:2]

    def reload(self):
        """Re-read the key store (delivered to its watchers too) and every backend's known hosts, each on its own:
        one that cannot be read keeps what it had, and the others reload all the same. Running sessions are
        untouched. Returns what failed, as lines for the log (empty when everything reloaded)."""
        problems = []
        try:
            self.key_index = self.keystore.refresh()
        except KeyStoreError as e:
            problems.append("reload failed, keeping the previous keys: %s" % e)
        for name, backend in self.backends.items():
            try:
                backend.reload()
            except ConfigError as e:
                problems.append("reload of backend %s failed, keeping its previous host keys: %s" % (name, e))
        log.info("reloaded: %d keys%s", len(self.key_index), ", %d failed" % len(problems) if problems else "")
        return problems

    def stop_accepting(self):
        self.draining = True
        self.trimmer.cancel()
        if self.stream_server is not None:
            self.stream_server.close()

    def drain(self, timeout):
        """Stop accepting, let sessions finish for up to timeout seconds, then close what is left."""
        self.stop_accepting()
        log.info("draining: %d connections, up to %gs", len(self.handlers), timeout)
        if not self.handlers.join(timeout=timeout):
            left = list(self.registry)
            log.warning("drain timeout: closing %d sessions", len(left))
            for session in left:
                session.close(Reason.SHUTDOWN)
            self.handlers.join(timeout=5)
        self.admission.refusals.flush()
        self.watchdog.stop()
        log.info("drained")

    # -- one connection -------------------------------------------------------------------------------------------
    def handle(self, sock, addr):
        arrival = self._arrive(sock, addr)
        if arrival is None:
            return
        if arrival.lease.at_max_connections:
            log.warning("limit max_connections=%d reached: new connections wait in the listen backlog",
                        self.cfg.limits.max_connections)
            self.metrics.limit_rejected("max_connections")
        session = self.registry.add(Session(new_session_key(), arrival.addr))
        conn = Connection(sock, arrival.addr, arrival.lease, session)
        conn.via = arrival.via
        me = gevent.getcurrent()
        session.handler = me
        conn.session.set_closer(lambda: me.kill(block=False))
        if conn.via:     # one format per shape: JSON logs take the key=value fields from the format string
            conn.log.info("start remote=%s via=%s", _hostport(conn.addr), _hostport(conn.via))
        else:
            conn.log.info("start remote=%s", _hostport(conn.addr))
        self.metrics.connection_opened()
        try:
            self._login(conn)
            self._bind(conn)
            self._dial(conn)
            self._relay(conn)
        except SessionEnded as e:
            conn.reason = e.reason
            self._close_channel(conn.chan, conn.transport)
        except gevent.GreenletExit:
            conn.reason = conn.session.close_reason or Reason.KILLED
            raise
        except Exception:
            conn.log.exception("internal error")
            conn.reason = Reason.INTERNAL_ERROR
        finally:
            self._finish(conn)

    def _arrive(self, sock, addr):
        """Admission at accept and the PROXY protocol header (frontdoor.py): an Arrival (the lease, the client's
        address, the balancer's), or None when refused (logged once per reason and second, counted, socket closed)."""
        try:
            return self.front_door.admit(sock, addr, self.admission, self.cfg.timeouts.login)
        except Refused as refusal:
            self.admission.refused(getattr(refusal, "source", addr[0]), refusal)
            self.metrics.limit_rejected(refusal.limit)
            sshcompat.close_quietly(sock)
            return None
        except BaseException:
            sshcompat.close_quietly(sock)
            raise

    def _login(self, conn):
        """Banner, a handshake slot, then key exchange, authentication and the exec request under timeouts.login.
        Sets conn.transport, conn.policy, conn.chan and conn.identity."""
        session = conn.session
        _tune_socket(conn.sock, self.cfg.timeouts.keepalive, self.cfg.timeouts.keepalive_max)
        session.state = "waiting"
        try:
            # our banner goes out at once: a client whose ConnectTimeout covers the banner exchange (OpenSSH's
            # does) then waits for a handshake slot instead of giving up
            conn.sock.sendall(sshcompat.banner())
        except OSError:
            raise SessionEnded(Reason.CLIENT_LEFT_IN_LOGIN) from None
        try:
            if conn.lease.wait_handshake(self.cfg.timeouts.login):
                conn.log.info("waited %.3fs for a handshake slot", session.duration())
        except Refused as refusal:
            self.admission.refused(conn.source, refusal)
            self.metrics.limit_rejected(refusal.limit)
            raise SessionEnded(Reason(refusal.limit)) from None
        session.state = "login"
        conn.transport = self._new_transport(conn.sock)
        conn.policy = ConnectionPolicy(self.key_index)
        deadline = gevent.Timeout(min(self.cfg.timeouts.login, self.cfg.timeouts.session))
        deadline.start()
        try:
            conn.chan, conn.identity = self._authenticate(conn.transport, conn.policy, conn.log)
        except gevent.Timeout as t:
            if t is not deadline:
                raise
            conn.log.info("login timeout after %gs", self.cfg.timeouts.login)
            raise SessionEnded(Reason.LOGIN_TIMEOUT) from None
        finally:
            deadline.close()
            if conn.policy.refused_certificate:
                conn.log.warning("refused certificate %s: certificates are not accepted; offer the plain key",
                                 conn.policy.refused_certificate)
        session.username = conn.policy.username

    def _authenticate(self, transport, policy, slog):
        """Key exchange, public-key auth and the one exec request: (channel, identity), or SessionEnded."""
        try:
            transport.start_server(server=policy)
        except sshcompat.SSH_ERRORS as e:
            slog.info("handshake failed: %s", str(e) or e.__class__.__name__)
            raise SessionEnded(Reason.HANDSHAKE_FAILED) from None
        while not policy.decided.wait(0.2):
            if not transport.is_active():
                if policy.auth_failures or sshcompat.auth_failures(transport):
                    raise SessionEnded(Reason.AUTH_FAILED)
                raise SessionEnded(Reason.CLIENT_LEFT_IN_LOGIN)
        chan = transport.accept(1)
        identity = policy.identity(transport)
        if chan is None or identity is None:
            raise SessionEnded(Reason.PROTOCOL_ERROR)
        sshcompat.use_chunk_pipes(chan)
        if policy.refusal is not None:
            slog.warning("refused: %s", policy.refusal)
            _tell_client(chan, policy.refusal)
            self._close_channel(chan, transport)
            raise SessionEnded(Reason.REFUSED_REQUEST)
        return chan, identity

    def _bind(self, conn):
        """The identity takes one of its account's slots; the command must pass the policy for that account."""
        identity, policy = conn.identity, conn.policy
        conn.log.info("auth account=%s user=%r key_name=%r fingerprint=%s login=%r", identity.account, identity.name,
                      identity.key_name, identity.fingerprint, policy.username)
        try:
            conn.lease.authenticate(identity.account)
        except Refused:
            conn.log.warning("limit per_account=%d reached for account=%s", self.cfg.limits.per_account,
                             identity.account)
            self.metrics.limit_rejected("per_account")
            _tell_client(conn.chan, "too many connections for account")
            raise SessionEnded(Reason.PER_ACCOUNT) from None
        self.registry.authenticate(conn.session, identity)
        conn.session.last_activity = time.monotonic()     # idle time counts from here (the watchdog's view too)
        try:
            conn.parsed = policy.parsed_command(identity.account)
        except CommandRejected as e:
            conn.log.warning("command rejected: %s (%r)", e, (policy.exec_command or b"")[:200])
            _tell_client(conn.chan, str(e))
            raise SessionEnded(Reason.COMMAND_REJECTED) from None
        conn.session.command, conn.session.repo = conn.parsed.backend_command, conn.parsed.repo
        conn.log.info("command %s", conn.parsed.backend_command)

    def _dial(self, conn):
        """Open the backend under timeouts.dial, at most limits.max_dials at once. Handshakes are CPU-bound: a burst
        of 200 dials progressing in lockstep would all miss their deadline together, while a bounded number
        complete in turn. Waiting for a slot is bounded by timeouts.dial_queue."""
        identity = conn.identity
        env = {"KILN_ACCOUNT": identity.account, "KILN_USER": identity.name, "KILN_KEY_NAME": identity.key_name,
               "KILN_SESSION": conn.session.key}
        if conn.policy.git_protocol:
            env["GIT_PROTOCOL"] = conn.policy.git_protocol
        started = time.monotonic()
        name = self.key_index.route(identity.account)        # a dict lookup: no store access per session
        conn.session.backend = name
        backend = self.backends.get(name)
        try:
            if backend is None:
                raise BackendUnavailable("account %s is routed to backend %r, which this instance's config does not "
                                         "have" % (identity.account, name))
            # waiting for a slot counts as idle time: a session must not outlive timeouts.idle in the queue
            with self.admission.dial_slot(min(self.cfg.timeouts.dial_queue, self.cfg.timeouts.idle)):
                conn.proc = backend.open(conn.parsed, env, self.cfg.timeouts.dial)
        except Refused as refusal:
            self.metrics.limit_rejected(refusal.limit)
            conn.log.error("backend unavailable: %s", refusal.detail)
            _tell_client(conn.chan, "backend unavailable")
            raise SessionEnded(Reason.BACKEND_UNAVAILABLE) from None
        except CommandRejected as e:
            conn.log.warning("command rejected by backend: %s", e)
            _tell_client(conn.chan, str(e))
            raise SessionEnded(Reason.COMMAND_REJECTED) from None
        except BackendUnavailable as e:
            conn.log.error("backend unavailable: %s", e)
            self.metrics.backend_error(name)
            _tell_client(conn.chan, "backend unavailable")
            raise SessionEnded(Reason.BACKEND_UNAVAILABLE) from None
        conn.log.info("backend %s connected in %.3fs%s", backend.kind if name == "default"
                      else "%s %s" % (name, backend.kind), time.monotonic() - started,
                      " (pooled connection)" if conn.proc.reused else "")
        self.metrics.session_established(conn.session.duration())

    def _relay(self, conn):
        """The three pumps until the command's output ends (or a timeout, or the client goes), then its status."""
        session = conn.session
        session.state = "running"
        session.last_activity = time.monotonic()
        deadline = session.started + self.cfg.timeouts.session
        failure = Relay(conn.chan, conn.proc, session, self.cfg.timeouts.idle, deadline).run()
        if failure is not None:
            if failure != Reason.CLIENT_LOST:
                _tell_client(conn.chan, failure)
            raise SessionEnded(Reason(failure))
        # The exit status and the close must also come within timeouts.idle of the last payload and within
        # timeouts.session: a backend that never sends its status, or a client that stopped reading, would hold the
        # session (it did for 30 s: paramiko's key-exchange wait, issue 11).
        finish = gevent.Timeout(max(FINISH_FLOOR, min(session.last_activity + self.cfg.timeouts.idle, deadline)
                                    - time.monotonic()))
        finish.start()
        try:
            conn.status = conn.proc.wait(EXIT_STATUS_WAIT)
            self._forward_status(conn.chan, conn.status, conn.log)
            conn.reason = Reason.COMPLETED
            self._close_channel(conn.chan, conn.transport)
        except gevent.Timeout as t:
            if t is not finish:
                raise
            if conn.reason is not Reason.COMPLETED:
                conn.reason = Reason.SESSION_TIMEOUT if time.monotonic() >= deadline else Reason.IDLE_TIMEOUT
            conn.log.info("%s after the command's output ended: %s", conn.reason,
                          "no exit status" if conn.status is None else "the client did not take the end")
        finally:
            finish.close()

    def _finish(self, conn):
        """Close everything the connection opened, count its outcome, log its end line (always runs)."""
        session = conn.session
        session.state = "closing"
        session.set_closer(None)        # nothing may kill the clean-up half-way: every step below is bounded
        conn.lease.end_handshake()
        if conn.proc is not None:
            conn.proc.close()
        sshcompat.close_quietly(conn.transport)     # first: it drops the channel without a round trip to a client
        sshcompat.close_quietly(conn.chan)          # that may have stopped reading (the polite close went out above)
        sshcompat.close_quietly(conn.sock)
        violation = conn.transport.get_exception() if conn.transport is not None else None
        if isinstance(violation, sshcompat.ProtocolViolation):
            conn.log.warning("protocol violation: %s", violation)
            conn.reason = Reason.PROTOCOL_VIOLATION
        self.registry.remove(session)
        self._count_login(conn)
        conn.lease.release()
        self.metrics.connection_closed()
        self.metrics.session_ended(conn.reason, session.duration(), session.bytes_in, session.bytes_out)
        fields = (session.duration(), session.bytes_in, session.bytes_out, _describe(conn.status), conn.reason)
        if conn.via:
            conn.log.info("end remote=%s via=%s duration=%.3fs bytes_in=%d bytes_out=%d exit=%s reason=%s",
                          _hostport(conn.addr), _hostport(conn.via), *fields)
        else:
            conn.log.info("end duration=%.3fs bytes_in=%d bytes_out=%d exit=%s reason=%s", *fields)
        self.trimmer.session_ended(len(self.registry))

    def _count_login(self, conn):
        """Every failed login counts toward its source's penalty, whatever ended the connection: each rejected key
        or bad signature, a login that timed out, a protocol violation before authenticating."""
        if conn.session.identity is not None:
            self.admission.login_succeeded(conn.source)
            return
        policy = conn.policy
        failures = max(policy.auth_failures if policy is not None else 0, sshcompat.auth_failures(conn.transport))
        if failures:
            self.metrics.auth_failed()
            conn.log.warning("auth failed source=%s login=%r failures=%d", conn.source, policy.username, failures)
        elif conn.reason in (Reason.LOGIN_TIMEOUT, Reason.PROTOCOL_VIOLATION):
            failures = 1
        else:
            return
        if self.admission.login_failed(conn.source, failures):
            conn.log.warning("penalty source=%s seconds=%g failures=%d", conn.source,
                             self.cfg.limits.penalty_seconds, self.cfg.limits.penalty_failures)

    def _new_transport(self, sock):
        transport = sshcompat.Transport(sock, disabled_algorithms=sshcompat.DISABLED,
                                        preauth_limit=sshcompat.PREAUTH_LIMIT, banner_sent=True)
        sshcompat.harden(transport, self.cfg.proxy.ciphers)
        for key in self.host_keys:
            transport.add_server_key(key)
        return transport

    @staticmethod
    def _forward_status(chan, status, slog):
        try:
            if status is None:
                chan.sendall_stderr(b"kilnproxy: backend ended without an exit status\n")
                chan.send_exit_status(255)
            elif status.signal is not None:
                sshcompat.send_exit_signal(chan, status.signal)
            else:
                chan.send_exit_status(status.code)
        except sshcompat.SSH_ERRORS as e:
            slog.info("could not send exit status: %s", e)

    @staticmethod
    def _close_channel(chan, transport):
        """EOF and close toward the client, then give it a moment to read them and hang up first: closing a socket
        with unread input sends RST, which can destroy our last packets in flight."""
        if chan is None or transport is None:
            return

        def close():
            chan.shutdown_write()
            chan.close()
        if sshcompat.bounded(TELL_CLIENT_WAIT, close) != sshcompat.DONE:
            return
        give_up = time.monotonic() + LINGER_AFTER_CLOSE
        while transport.is_active() and time.monotonic() < give_up:
            gevent.sleep(0.02)


def _hostport(addr):
    return "%s:%d" % tuple(addr[:2])


def _describe(status):
    if status is None:
        return "none"
    if status.signal is not None:
        return "signal:" + status.signal
    return str(status.code)
