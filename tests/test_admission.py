"""admission.Admission and RefusalLog without sockets: handshake slots and their queue, per-source caps, random early
drop, per-account slots, penalties, rate-limited refusal lines (injected clock, rng and scheduler)."""
import logging
from types import SimpleNamespace

import gevent
import pytest

from kiln.admission import Admission, Refused, RefusalLog
from kiln.limits import drop_probability, parse_startups_drop


def limits(**over):
    base = dict(max_startups=4, per_source_startups=2, per_source_queue=5, startups_drop="100:30:200",
                max_connections=1000, max_dials=16,
                per_account=2, penalty_failures=3, penalty_seconds=30.0)
    base.update(over)
    return SimpleNamespace(**base)


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


def test_parse_startups_drop():
    assert parse_startups_drop("10:30:100") == (10, 30, 100)
    for bad in ("10:30", "a:b:c", "10:130:100", "100:30:10", "0:30:10", "-1:3:4", 10, "1:2:3:4"):
        with pytest.raises(ValueError):
            parse_startups_drop(bad)


def test_drop_probability_is_openssh_random_early_drop():
    assert drop_probability(9, 10, 30, 100) == 0.0
    assert drop_probability(10, 10, 30, 100) == pytest.approx(0.30)
    assert drop_probability(55, 10, 30, 100) == pytest.approx(0.65)
    assert drop_probability(100, 10, 30, 100) == 1.0


def test_handshake_slots_per_source_then_in_turn():
    a = Admission(limits())
    first = [a.connect("10.0.0.1") for _ in range(2)]
    for lease in first:
        assert lease.wait_handshake(0) is False
    # a third from the same source must wait, although the global budget (4) has room
    third = a.connect("10.0.0.1")
    with pytest.raises(Refused) as e:
        third.wait_handshake(0.01)
    assert e.value.limit == "max_startups"
    # another source is not held up by that one
    other = a.connect("10.0.0.2")
    assert other.wait_handshake(0) is False
    assert (a.handshakes, a.unauthenticated) == (3, 4)
    for lease in first + [third, other]:
        lease.release()
    assert (a.handshakes, a.unauthenticated, a.waiting()) == (0, 0, 0)


def test_waiting_lease_gets_the_freed_slot():
    a = Admission(limits(max_startups=1))
    holder = a.connect("10.0.0.1")
    holder.wait_handshake(0)
    waiter = a.connect("10.0.0.2")
    g = gevent.spawn(waiter.wait_handshake, 5)
    gevent.sleep(0.01)
    assert a.waiting() == 1 and not g.ready()
    holder.authenticate("acme")                      # its handshake slot goes to the waiter
    assert g.get(timeout=1) is True
    assert waiter.in_handshake and a.handshakes == 1 and a.waiting() == 0
    holder.release()
    waiter.release()
    assert a.handshakes == 0 and a.unauthenticated == 0


def test_sources_take_turns():
    a = Admission(limits(max_startups=1, per_source_startups=1))
    holder = a.connect("busy")
    holder.wait_handshake(0)
    order = []

    def wait(lease, name):
        lease.wait_handshake(5)
        order.append(name)

    leases = [(a.connect("busy"), "busy-1"), (a.connect("busy"), "busy-2"), (a.connect("quiet"), "quiet-1")]
    by_name = {name: lease for lease, name in leases}
    gs = [gevent.spawn(wait, lease, name) for lease, name in leases]
    gevent.sleep(0.01)
    holder.release()
    for _ in range(3):                  # each time, the one that got the slot finishes its handshake
        gevent.sleep(0.01)
        by_name[order[-1]].release()
    gevent.joinall(gs, timeout=2)
    assert order == ["busy-1", "quiet-1", "busy-2"]
    assert a.handshakes == 0 and a.waiting() == 0


def test_per_source_queue_refuses_at_connect():
    a = Admission(limits(per_source_queue=2))
    leases = [a.connect("10.0.0.1"), a.connect("10.0.0.1")]
    with pytest.raises(Refused) as e:
        a.connect("10.0.0.1")
    assert e.value.limit == "max_startups" and "2 unauthenticated" in e.value.detail
    assert a.connect("10.0.0.2") is not None       # another source is unaffected
    leases[0].release()
    assert a.connect("10.0.0.1") is not None


def test_random_early_drop_uses_the_rng():
    rolls = iter([0.99, 0.10])
    a = Admission(limits(startups_drop="2:50:10", per_source_queue=100), rng=lambda: next(rolls))
    a.connect("a")
    a.connect("b")                                  # 2 unauthenticated: p = 0.5
    assert a.connect("c") is not None               # roll 0.99 >= p: admitted
    with pytest.raises(Refused) as e:               # 3 unauthenticated, p ~ 0.56; roll 0.10: dropped
        a.connect("d")
    assert "random early drop" in e.value.detail


def test_per_account_slots():
    a = Admission(limits(per_account=2))
    leases = [a.connect("s") for _ in range(3)]
    leases[0].authenticate("acme")
    leases[1].authenticate("acme")
    with pytest.raises(Refused) as e:
        leases[2].authenticate("acme")
    assert e.value.limit == "per_account"
    a.connect("s").authenticate("other")            # another account has its own slots
    leases[0].release()
    leases[0].release()                             # idempotent
    leases[2].authenticate("acme")
    assert a._accounts["acme"] == 2


def test_set_source_moves_the_accounting():
    a = Admission(limits(per_source_queue=1))
    lease = a.connect("balancer")
    lease.set_source("client")
    assert a.connect("balancer") is not None       # the balancer's count went to the client
    with pytest.raises(Refused):
        a.connect("client")
    lease.release()
    assert a.unauthenticated == 1


def test_penalty_after_failures_and_reset_on_success():
    clock = Clock()
    a = Admission(limits(penalty_failures=3, penalty_seconds=30.0), clock=clock)
    assert a.login_failed("x", 2) is False
    a.login_succeeded("x")                          # a success forgets the earlier failures
    assert a.login_failed("x", 2) is False
    assert a.login_failed("x", 1) is True
    with pytest.raises(Refused) as e:
        a.connect("x")
    assert e.value.limit == "penalty"
    clock.now += 31
    assert a.connect("x") is not None


def test_waiting_lease_of_a_penalised_source_is_refused():
    clock = Clock()
    a = Admission(limits(max_startups=1, penalty_failures=1), clock=clock)
    holder = a.connect("x")
    holder.wait_handshake(0)
    waiter = a.connect("x")
    g = gevent.spawn(waiter.wait_handshake, 5)
    gevent.sleep(0.01)
    a.login_failed("x")
    holder.release()
    with pytest.raises(Refused) as e:
        g.get(timeout=1)
    assert e.value.limit == "penalty"
    waiter.release()
    assert a.handshakes == 0 and a.unauthenticated == 0


def test_refusal_log_is_rate_limited(caplog):
    clock = Clock()
    scheduled = []
    rl = RefusalLog(logger=logging.getLogger("test.refusals"), interval=1.0, clock=clock,
                    schedule=lambda delay, fn: scheduled.append((delay, fn)))
    with caplog.at_level(logging.WARNING, logger="test.refusals"):
        for i in range(500):
            rl.refused("10.0.0.%d" % (i % 3), "penalty")
        rl.refused("10.0.0.9", "max_startups", "random early drop")
        assert [r.getMessage() for r in caplog.records] == [
            "refused source=10.0.0.0 reason=penalty",
            "refused source=10.0.0.9 reason=max_startups (random early drop)"]
        assert len(scheduled) == 1                  # one pending count, written when its interval ends
        clock.now += 1.0
        scheduled[0][1]()
        assert caplog.records[-1].getMessage() == "refused source=10.0.0.1 reason=penalty count=499 in the last 1s"
        rl.refused("10.0.0.5", "penalty")            # a new interval logs its first refusal at once
        assert caplog.records[-1].getMessage() == "refused source=10.0.0.5 reason=penalty"
    assert len(caplog.records) == 4


def test_dial_slots_bound_concurrent_dials():
    a = Admission(limits(max_dials=1, max_connections=1000))
    with a.dial_slot(1):
        with pytest.raises(Refused) as e:
            with a.dial_slot(0.01):
                pass
        assert e.value.limit == "max_dials" and "limits.max_dials=1" in e.value.detail
    with a.dial_slot(0.01):                          # given back
        pass


def test_the_lease_that_fills_max_connections_says_so():
    a = Admission(limits(max_connections=2, max_dials=1))
    first, second = a.connect("s"), a.connect("t")
    assert not first.at_max_connections and second.at_max_connections and a.connections == 2
    second.release()
    assert a.connections == 1
