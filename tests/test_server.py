"""server.py's phases without sockets: outcomes, admission at accept, counting failed logins, the end of a session.
End-to-end behaviour (real clients, real sshd) is in tests/test_e2e_*.py."""
import logging
from types import SimpleNamespace

import pytest

from kiln import config, metrics, sessions
from kiln.outcomes import Reason
from kiln.server import Connection, ProxyServer, SessionEnded


class FakeIndex(dict):
    def route(self, account):
        return "default"


class FakeStore:
    def index(self):
        return FakeIndex()


class FakeBackend:
    kind = "fake"
    on_drained = None


class CountingMetrics(metrics.NullMetrics):
    def __init__(self):
        self.rejected, self.auth_failures, self.ended = [], 0, []

    def limit_rejected(self, limit):
        self.rejected.append(limit)

    def auth_failed(self):
        self.auth_failures += 1

    def session_ended(self, outcome, seconds, bytes_in, bytes_out):
        self.ended.append(outcome)


class FakeSock:
    closed = False

    def close(self):
        self.closed = True


@pytest.fixture
def server(tmp_path):
    cfg = config.build({"limits": {"penalty_failures": 3}}, str(tmp_path))
    return ProxyServer(cfg, FakeStore(), FakeBackend(), sessions.Registry(), [], metrics=CountingMetrics())


def test_every_reason_has_a_bounded_metrics_label():
    for reason in Reason:
        if reason is not Reason.UNKNOWN:
            assert reason.label in metrics.OUTCOMES
            assert metrics.outcome_label(reason) == reason.label
    assert Reason.CLIENT_LOST == "client connection lost"       # log lines and the relay speak plain text
    assert Reason("idle timeout") is Reason.IDLE_TIMEOUT


def test_session_ended_carries_its_reason():
    e = SessionEnded(Reason.PER_ACCOUNT)
    assert e.reason is Reason.PER_ACCOUNT and str(e) == "per-account limit"


def test_admit_refuses_a_penalised_source_and_closes_its_socket(server):
    server.admission.login_failed("10.1.1.1", 3)
    sock = FakeSock()
    assert server._arrive(sock, ("10.1.1.1", 5000)) is None
    assert sock.closed and server.metrics.rejected == ["penalty"]
    arrival = server._arrive(FakeSock(), ("10.1.1.2", 5000))     # proxy_protocol off: the socket's address
    assert arrival.lease.source == "10.1.1.2" and arrival.addr == ("10.1.1.2", 5000) and arrival.via is None
    arrival.lease.release()


def _conn(server, source="10.2.2.2"):
    lease = server.admission.connect(source)
    session = server.registry.add(sessions.Session(sessions.new_session_key(), (source, 4000)))
    return Connection(FakeSock(), (source, 4000), lease, session)


def test_failed_logins_count_whatever_ended_the_connection(server, caplog):
    conn = _conn(server)
    conn.policy = SimpleNamespace(auth_failures=2, username="git")
    conn.reason = Reason.LOGIN_TIMEOUT              # not "auth failed": the failures count all the same
    with caplog.at_level(logging.WARNING):
        server._count_login(conn)
    assert server.metrics.auth_failures == 1
    assert "auth failed source=10.2.2.2 login='git' failures=2" in caplog.text
    assert not server.admission.penalties.penalised("10.2.2.2")
    conn2 = _conn(server)
    conn2.reason = Reason.LOGIN_TIMEOUT             # a silent connection that timed out: one failure
    with caplog.at_level(logging.WARNING):
        server._count_login(conn2)
    assert "penalty source=10.2.2.2 seconds=30 failures=3" in caplog.text
    assert server.admission.penalties.penalised("10.2.2.2")


def test_a_success_resets_and_other_endings_do_not_count(server):
    conn = _conn(server, "10.3.3.3")
    conn.reason = Reason.CLIENT_LEFT_IN_LOGIN       # a port scanner that hung up: not a failed login
    server._count_login(conn)
    server.admission.login_failed("10.3.3.3", 2)
    ok = _conn(server, "10.3.3.3")
    ok.session.identity = SimpleNamespace(account="initech")
    server._count_login(ok)
    assert not server.admission.login_failed("10.3.3.3", 2)     # 2 after the reset: still below 3


def test_finish_releases_everything_and_counts_the_outcome(server, caplog):
    conn = _conn(server, "10.4.4.4")
    conn.reason = Reason.HANDSHAKE_FAILED
    assert len(server.registry) == 1 and server.admission.unauthenticated == 1
    with caplog.at_level(logging.INFO):
        server._finish(conn)
    assert len(server.registry) == 0 and server.admission.unauthenticated == 0
    assert conn.sock.closed and conn.session.state == "closing"
    assert server.metrics.ended == [Reason.HANDSHAKE_FAILED]
    assert "end duration=" in caplog.text and "exit=none reason=handshake failed" in caplog.text
