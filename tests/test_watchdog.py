"""The watchdog: sessions past their timeouts plus grace are reported (ERROR, state, handler stack), counted and
closed; sessions within their timeouts are left alone. A fake clock and real registry and sessions, no sockets."""
import logging
import os
import sys

import gevent
import gevent.event
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

from kiln import watchdog  # noqa: E402
from kiln.keystore import Identity  # noqa: E402
from kiln.sessions import Registry, Session  # noqa: E402


class Clock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


class Counts:
    def __init__(self):
        self.closed = []

    def watchdog_closed(self, timeout):
        self.closed.append(timeout)


def stuck_in_a_phase_nobody_times_out(event):
    event.wait()                  # the handler's frame the report must show


@pytest.fixture
def world():
    clock = Clock()
    registry = Registry()
    counts = Counts()
    dog = watchdog.Watchdog(registry, idle=3.0, session=60.0, grace=10.0, metrics=counts, clock=clock)
    handlers = []

    def add(started_ago=0.0, idle_for=0.0, state="running", authenticated=True):
        s = registry.add(Session("%08x" % (len(handlers) + 1), ("127.0.0.1", 40000 + len(handlers))))
        if authenticated:
            registry.authenticate(s, Identity("SHA256:x", "initech", "Peter Gibbons", "Laptop"))
        s.started = clock.now - started_ago
        s.last_activity = clock.now - idle_for
        s.state = state
        s.command = "git-upload-pack 'initech/x.git'"
        g = gevent.spawn(stuck_in_a_phase_nobody_times_out, gevent.event.Event())
        gevent.sleep(0)                                  # let it reach its wait
        s.handler = g
        s.set_closer(lambda: g.kill(block=False))
        handlers.append(g)
        return s

    yield clock, registry, counts, dog, add
    gevent.killall(handlers)


def test_sessions_within_their_timeouts_are_left_alone(world):
    clock, registry, counts, dog, add = world
    add(started_ago=5, idle_for=2.9)
    add(started_ago=69.9, idle_for=12.9)          # past idle and session, but not past them plus grace
    assert dog.check() == []
    assert counts.closed == [] and all(s.close_reason is None for s in registry)


def test_idle_session_past_idle_plus_grace_is_reported_counted_and_closed(world, caplog):
    clock, registry, counts, dog, add = world
    ok = add(started_ago=20, idle_for=1)
    stuck = add(started_ago=20, idle_for=13.5, state="closing")
    with caplog.at_level(logging.ERROR, logger="kiln.watchdog"):
        assert dog.check() == [stuck]
    assert counts.closed == ["idle"]
    assert stuck.close_reason == "watchdog" and ok.close_reason is None
    gevent.sleep(0)
    assert stuck.handler.dead and not ok.handler.dead       # closing it killed its handler
    text = caplog.text
    assert stuck.key in text and "timeouts.idle 3s + grace 10s" in text and "state closing" in text
    # the stack as /debug/greenlets?debug=2 prints it: a greenlet header, then File/source lines
    assert "[suspended]:" in text and "in stuck_in_a_phase_nobody_times_out" in text
    assert "event.wait()" in text


def test_before_authentication_idle_time_is_not_judged(world):
    """timeouts.login bounds a connection until it authenticates (its wait for a handshake slot and its login)."""
    clock, registry, counts, dog, add = world
    add(started_ago=14, idle_for=14, state="waiting", authenticated=False)
    assert dog.check() == [] and counts.closed == []
    late = add(started_ago=70.5, idle_for=70.5, state="login", authenticated=False)
    assert dog.check() == [late] and counts.closed == ["session"]


def test_old_session_past_session_plus_grace_is_closed_even_when_busy(world):
    clock, registry, counts, dog, add = world
    s = add(started_ago=70.5, idle_for=0)
    assert dog.check() == [s]
    assert counts.closed == ["session"]


def test_a_session_is_closed_once_and_reported_again_if_it_will_not_end(world, caplog):
    clock, registry, counts, dog, add = world
    s = add(started_ago=20, idle_for=14)
    s.set_closer(None)                              # a handler the kill cannot reach
    assert dog.check() == [s]
    clock.now += 5
    with caplog.at_level(logging.ERROR, logger="kiln.watchdog"):
        assert dog.check() == []
        assert "still registered" not in caplog.text
        clock.now += 6
        assert dog.check() == []
        assert "still registered 11.0s after it was closed" in caplog.text
        caplog.clear()
        clock.now += 60
        dog.check()
        assert caplog.text == ""                    # twice is enough
    assert counts.closed == ["idle"]
    registry.remove(s)
    dog.check()
    assert dog._flagged == {}                       # forgets sessions that ended


def test_loop_runs_rounds_and_survives_a_failing_one(world, monkeypatch):
    clock, registry, counts, dog, add = world
    rounds = []

    def check():
        rounds.append(1)
        if len(rounds) == 1:
            raise RuntimeError("odd session")
    monkeypatch.setattr(dog, "check", check)
    dog.interval = 0.01
    dog.start()
    try:
        gevent.sleep(0.2)
    finally:
        dog.stop()
    assert len(rounds) >= 3
    n = len(rounds)
    gevent.sleep(0.05)
    assert len(rounds) == n                         # stopped


def test_describe_greenlet_without_a_handler():
    assert watchdog.describe_greenlet(None) == ["(no handler greenlet recorded)"]
    g = gevent.spawn(lambda: None)
    g.join()
    assert "[dead]" in watchdog.describe_greenlet(g)[0]


# -- end to end: a real proxy whose relay ignores its timeouts ---------------------------------------------------
STUCK_RELAY_PROXY = r'''
"""kilnproxy.py whose relay never returns (a phase no timeout covers), so that only the watchdog can end it."""
from gevent import monkey
monkey.patch_all()
import runpy, sys
sys.path.insert(0, {lib!r})
import gevent
import kiln.relay


def run_for_ever(self):
    gevent.sleep(3600)


kiln.relay.Relay.run = run_for_ever
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
'''


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_watchdog_reports_and_closes_a_stuck_session_of_a_real_proxy(tmp_path, keys, monkeypatch):
    import harness
    script = tmp_path / "stuck_kilnproxy.py"
    script.write_text(STUCK_RELAY_PROXY.format(lib=os.path.join(os.path.dirname(harness.KILNPROXY), "lib"),
                                               script=harness.KILNPROXY))
    monkeypatch.setattr(harness, "KILNPROXY", str(script))
    proxy = harness.Proxy(str(tmp_path / "proxy"), extra={"timeouts": {"idle": 1, "grace": 1},
                                                          "admin": {"token": "t"}})
    proxy.add_key(keys["user"] + ".pub")
    harness.make_git_repo(proxy.repo_root, "%s/stuck.git" % harness.ACCOUNT, {"README": b"x\n"})
    try:
        proxy.start()
        out = harness.run(harness.ssh_args(keys["user"]) + ["-p", str(proxy.port), "git@127.0.0.1",
                                                            "git-upload-pack '%s/stuck.git'" % harness.ACCOUNT],
                          input=b"", timeout=60)
        assert out.returncode != 0            # ended by the proxy, long before the relay's hour
        m = proxy.wait_for_log(r"ERROR (\w+) watchdog: session past timeouts.idle 1s \+ grace 1s")
        key = m.group(1)
        proxy.wait_for_log(r"%s end .*reason=watchdog" % key)     # the client may see the close first
        log = proxy.read_log()
        assert "state running" in log and "in run_for_ever" in log and "gevent.sleep(3600)" in log, log[-3000:]
        status, body = harness.admin_get(proxy, "/metrics", token="t")
        assert status == 200
        assert 'kiln_watchdog_closed_total{timeout="idle"} 1.0' in body.decode(), body.decode()[-2000:]
        assert harness.admin_json(proxy, "/connections", token="t")["CurrentlyAuthenticatedUsers"] == []
    finally:
        proxy.stop()
    assert not [ln for ln in proxy.problems() if "watchdog" not in ln], proxy.problems()
