"""The SSH front: a StreamServer whose per-connection greenlet owns everything the connection opens.

handle() runs login (handshake, public-key auth, one exec request) under the login deadline, binds the identity,
applies the command policy and limits, opens the backend under the dial timeout, relays, forwards the exit status,
and closes everything in `finally`. It has exactly one catch-all, which logs the stack with the session key.
"""
import logging
import socket
import time

import gevent
from gevent.lock import BoundedSemaphore
from gevent.pool import Pool
from gevent.server import StreamServer

from . import log as kiln_log
from . import sshcompat
from .admission import Admission, Refused
from .errors import BackendUnavailable, CommandRejected
from .memory import Trimmer
from .metrics import NullMetrics
from .policy import ConnectionPolicy
from .relay import Relay
from .sessions import Session, new_session_key

log = logging.getLogger("kiln.server")
LINGER_AFTER_CLOSE = 2.0      # seconds to let the client read our last packets before the socket closes
EXIT_STATUS_WAIT = 10.0       # after the backend's output ended, how long its exit status may take
LISTEN_BACKLOG = 4096


class LoginFailed(Exception):
    """The connection ended before a command could run; the message is the close reason."""


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
    """Best effort: a 'kilnproxy: ' line on the client's stderr and an exit status."""
    if chan is None:
        return
    try:
        chan.sendall_stderr(("kilnproxy: %s\n" % message).encode("utf-8"))
        chan.send_exit_status(status)
    except sshcompat.SSH_ERRORS:
        pass


class ProxyServer:
    def __init__(self, cfg, keystore, backend, registry, host_keys, metrics=None):
        self.cfg = cfg
        self.keystore = keystore
        self.backend = backend
        self.registry = registry
        self.host_keys = host_keys
        self.metrics = metrics or NullMetrics()
        self.key_index = keystore.index()
        self.pool = Pool(cfg.limits.max_connections)
        self.dial_slots = BoundedSemaphore(cfg.limits.max_dials)
        self.trimmer = Trimmer(live=lambda: len(self.registry))
        backend.on_drained = self.trimmer.backend_drained
        self.admission = Admission(cfg.limits)
        self.stream_server = None
        self.draining = False
        self.started = time.time()

    # -- lifecycle ------------------------------------------------------------------------------------------------
    def start(self, listener=None):
        """listener: a bound, listening socket made elsewhere (socket activation) instead of proxy.listen."""
        # gevent's default backlog (128) overflows under a burst of clones while the hub is busy with handshakes;
        # dropped SYNs cost clients 1 s, 3 s, 7 s retransmits. The kernel caps this at net.core.somaxconn.
        if listener is None:
            self.stream_server = StreamServer(self.cfg.proxy.listen, self.handle, spawn=self.pool,
                                              backlog=LISTEN_BACKLOG)
        else:       # its backlog is the one it was made with (systemd: Backlog=)
            self.stream_server = StreamServer(listener, self.handle, spawn=self.pool)
        self.stream_server.start()
        log.info("listening for SSH on %s:%d (backend %s, %d keys)", *self.address, self.backend.kind,
                 len(self.key_index))

    @property
    def address(self):
        return self.stream_server.address[:2]

    def reload(self):
        """Re-read the key store (and backend known hosts); running sessions are untouched."""
        self.key_index = self.keystore.index()
        self.backend.reload()
        log.info("reloaded: %d keys", len(self.key_index))

    def stop_accepting(self):
        self.draining = True
        self.trimmer.cancel()
        if self.stream_server is not None:
            self.stream_server.close()

    def drain(self, timeout):
        """Stop accepting, let sessions finish for up to timeout seconds, then close what is left."""
        self.stop_accepting()
        log.info("draining: %d connections, up to %gs", len(self.pool), timeout)
        if not self.pool.join(timeout=timeout):
            left = list(self.registry)
            log.warning("drain timeout: closing %d sessions", len(left))
            for session in left:
                session.close("shutdown")
            self.pool.join(timeout=5)
        log.info("drained")

    # -- one connection -------------------------------------------------------------------------------------------
    def handle(self, sock, addr):
        source = addr[0]
        try:
            lease = self.admission.connect(source)
        except Refused as refusal:
            self.admission.refused(source, refusal)
            self.metrics.limit_rejected(refusal.limit)
            sshcompat.close_quietly(sock)
            return
        session = self.registry.add(Session(new_session_key(), addr))
        slog = kiln_log.for_session(session.key)
        me = gevent.getcurrent()
        session.set_closer(lambda: me.kill(block=False))
        slog.info("start remote=%s:%d", source, addr[1])
        self.metrics.connection_opened()
        transport = chan = proc = policy = None
        status = None
        reason = "unknown"
        try:
            _tune_socket(sock, self.cfg.timeouts.keepalive, self.cfg.timeouts.keepalive_max)
            session.state = "waiting"
            try:
                sock.sendall(sshcompat.banner())
            except OSError:
                raise LoginFailed("client disconnected during login") from None
            try:
                if lease.wait_handshake(self.cfg.timeouts.login):
                    slog.info("waited %.3fs for a handshake slot", session.duration())
            except Refused as refusal:
                self.admission.refused(source, refusal)
                self.metrics.limit_rejected(refusal.limit)
                raise LoginFailed(refusal.limit) from None
            session.state = "login"
            transport = self._new_transport(sock)
            policy = ConnectionPolicy(self.key_index)
            chan = self._login(transport, policy, slog)
            identity = policy.identity(transport)
            session.username = policy.username
            slog.info("auth account=%s user=%r key_name=%r fingerprint=%s login=%r", identity.account,
                      identity.name, identity.key_name, identity.fingerprint, policy.username)
            try:
                lease.authenticate(identity.account)
            except Refused:
                slog.warning("limit per_account=%d reached for account=%s", self.cfg.limits.per_account,
                             identity.account)
                self.metrics.limit_rejected("per_account")
                _tell_client(chan, "too many connections for account")
                raise LoginFailed("per-account limit") from None
            self.registry.authenticate(session, identity)
            try:
                parsed = policy.parsed_command(identity.account)
            except CommandRejected as e:
                slog.warning("command rejected: %s (%r)", e, (policy.exec_command or b"")[:200])
                _tell_client(chan, str(e))
                raise LoginFailed("command rejected") from None
            session.command, session.repo = parsed.backend_command, parsed.repo
            slog.info("command %s", parsed.backend_command)
            env = {"KILN_ACCOUNT": identity.account, "KILN_USER": identity.name,
                   "KILN_KEY_NAME": identity.key_name, "KILN_SESSION": session.key}
            if policy.git_protocol:
                env["GIT_PROTOCOL"] = policy.git_protocol
            dial_started = time.monotonic()
            try:
                proc = self._dial(parsed, env)
            except CommandRejected as e:
                slog.warning("command rejected by backend: %s", e)
                _tell_client(chan, str(e))
                raise LoginFailed("command rejected") from None
            except BackendUnavailable as e:
                slog.error("backend unavailable: %s", e)
                self.metrics.backend_error()
                _tell_client(chan, "backend unavailable")
                raise LoginFailed("backend unavailable") from None
            slog.info("backend %s connected in %.3fs%s", self.backend.kind, time.monotonic() - dial_started,
                      " (pooled connection)" if proc.reused else "")
            self.metrics.session_established(session.duration())
            session.state = "running"
            session.last_activity = time.monotonic()
            failure = Relay(chan, proc, session, self.cfg.timeouts.idle,
                            session.started + self.cfg.timeouts.session).run()
            if failure is not None:
                reason = failure
                if failure != "client connection lost":
                    _tell_client(chan, failure)
            else:
                status = proc.wait(EXIT_STATUS_WAIT)
                self._forward_status(chan, status, slog)
                reason = "completed"
            self._close_channel(chan, transport)
        except LoginFailed as e:
            reason = str(e)
            self._close_channel(chan, transport)
        except gevent.GreenletExit:
            reason = session.close_reason or "killed"
            raise
        except Exception:
            slog.exception("internal error")
            reason = "internal error"
        finally:
            session.state = "closing"
            lease.end_handshake()
            if proc is not None:
                proc.close()
            sshcompat.close_quietly(chan)
            sshcompat.close_quietly(transport)
            sshcompat.close_quietly(sock)
            violation = transport.get_exception() if transport is not None else None
            if isinstance(violation, sshcompat.ProtocolViolation):
                slog.warning("protocol violation: %s", violation)
                reason = "protocol violation"
            self.registry.remove(session)
            session.set_closer(None)
            self._count_login(session, policy, transport, reason, slog)
            lease.release()
            self.metrics.connection_closed()
            self.metrics.session_ended(reason, session.duration(), session.bytes_in, session.bytes_out)
            slog.info("end duration=%.3fs bytes_in=%d bytes_out=%d exit=%s reason=%s", session.duration(),
                      session.bytes_in, session.bytes_out, _describe(status), reason)
            self.trimmer.session_ended(len(self.registry))

    def _count_login(self, session, policy, transport, reason, slog):
        """Every failed login counts toward its source's penalty, whatever ended the connection: each rejected key
        or bad signature, a login that timed out, a protocol violation before authenticating."""
        source = session.remote_addr[0]
        if session.identity is not None:
            self.admission.login_succeeded(source)
            return
        failures = max(policy.auth_failures if policy is not None else 0, sshcompat.auth_failures(transport))
        if failures:
            self.metrics.auth_failed()
            slog.warning("auth failed source=%s login=%r failures=%d", source, policy.username, failures)
        elif reason in ("login timeout", "protocol violation"):
            failures = 1
        else:
            return
        if self.admission.login_failed(source, failures):
            slog.warning("penalty source=%s seconds=%g failures=%d", source, self.cfg.limits.penalty_seconds,
                         self.cfg.limits.penalty_failures)

    def _dial(self, parsed, env):
        """Open the backend under timeouts.dial, at most limits.max_dials at once. Handshakes are CPU-bound: a burst
        of 200 dials progressing in lockstep would all miss their deadline together, while a bounded number
        complete in turn. Waiting for a slot is bounded by timeouts.dial_queue."""
        if not self.dial_slots.acquire(timeout=self.cfg.timeouts.dial_queue):
            self.metrics.limit_rejected("max_dials")
            raise BackendUnavailable("no dial slot free within %gs (limits.max_dials=%d)"
                                     % (self.cfg.timeouts.dial_queue, self.cfg.limits.max_dials))
        try:
            return self.backend.open(parsed, env, self.cfg.timeouts.dial)
        finally:
            self.dial_slots.release()

    def _new_transport(self, sock):
        transport = sshcompat.Transport(sock, disabled_algorithms=sshcompat.DISABLED,
                                        preauth_limit=sshcompat.PREAUTH_LIMIT, banner_sent=True)
        sshcompat.harden(transport, self.cfg.proxy.ciphers)
        for key in self.host_keys:
            transport.add_server_key(key)
        return transport

    def _login(self, transport, policy, slog):
        """Handshake, authentication and the exec request, all under timeouts.login. Returns the channel; raises
        LoginFailed with the close reason. The caller owns and closes the transport."""
        deadline = gevent.Timeout(min(self.cfg.timeouts.login, self.cfg.timeouts.session))
        deadline.start()
        try:
            try:
                transport.start_server(server=policy)
            except sshcompat.SSH_ERRORS as e:
                slog.info("handshake failed: %s", str(e) or e.__class__.__name__)
                raise LoginFailed("handshake failed") from None
            while not policy.decided.wait(0.2):
                if not transport.is_active():
                    if policy.auth_failures or sshcompat.auth_failures(transport):
                        raise LoginFailed("auth failed")
                    raise LoginFailed("client disconnected during login")
            chan = transport.accept(1)
            if chan is None or policy.identity(transport) is None:
                raise LoginFailed("protocol error")
            sshcompat.use_chunk_pipes(chan)
            if policy.refusal is not None:
                slog.warning("refused: %s", policy.refusal)
                _tell_client(chan, policy.refusal)
                self._close_channel(chan, transport)
                raise LoginFailed("refused request")
            return chan
        except gevent.Timeout as t:
            if t is not deadline:
                raise
            slog.info("login timeout after %gs", self.cfg.timeouts.login)
            raise LoginFailed("login timeout") from None
        finally:
            deadline.close()
            if policy.refused_certificate:
                slog.warning("refused certificate %s: certificates are not accepted; offer the plain key",
                             policy.refused_certificate)

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
        try:
            chan.shutdown_write()
            chan.close()
        except sshcompat.SSH_ERRORS:
            return
        give_up = time.monotonic() + LINGER_AFTER_CLOSE
        while transport.is_active() and time.monotonic() < give_up:
            gevent.sleep(0.02)


def _describe(status):
    if status is None:
        return "none"
    if status.signal is not None:
        return "signal:" + status.signal
    return str(status.code)
