"""sessions.Registry and Session without sockets: the one home of live connections."""
from kiln import sessions
from kiln.keystore import Identity
from kiln.outcomes import Reason


def _identity(account="initech"):
    return Identity("SHA256:x", account, "Peter Gibbons", "Laptop")


def test_registry_counts_and_lists():
    reg = sessions.Registry()
    a = reg.add(sessions.Session("aaaa0001", ("127.0.0.1", 1)))
    b = reg.add(sessions.Session("aaaa0002", ("127.0.0.1", 2)))
    assert len(reg) == 2 and reg.unauthenticated == 2 and reg.authenticated() == []
    reg.authenticate(a, _identity())
    assert reg.unauthenticated == 1 and reg.authenticated() == [a] and a.state == "authenticated"
    assert reg.get("aaaa0002") is b
    reg.remove(a)
    reg.remove(a)                                    # idempotent
    reg.remove(b)
    assert len(reg) == 0 and reg.unauthenticated == 0 and not reg._accounts


def test_keys_stay_unique_while_live():
    reg = sessions.Registry()
    first = reg.add(sessions.Session("deadbeef", None))
    second = reg.add(sessions.Session("deadbeef", None))
    assert first.key == "deadbeef" and second.key != "deadbeef" and len(second.key) == 8
    assert reg.get(second.key) is second


def test_close_asks_the_handler_once_and_keeps_the_first_reason():
    s = sessions.Session("aaaa0003", None)
    calls = []
    s.set_closer(lambda: calls.append(1))
    s.close(Reason.CLOSED_BY_ADMIN)
    s.close(Reason.SHUTDOWN)
    assert calls == [1] and s.close_reason is Reason.CLOSED_BY_ADMIN


def test_as_json_fields():
    s = sessions.Session("aaaa0004", ("10.0.0.1", 2222))
    assert s.as_json()["Account"] is None and s.as_json()["RemoteAddr"] == "10.0.0.1:2222"
    s.identity = _identity()
    j = s.as_json()
    assert (j["Account"], j["Name"], j["PublicKeyName"], j["SessionKey"]) == ("initech", "Peter Gibbons", "Laptop",
                                                                              "aaaa0004")
    assert j["SessionDuration"].endswith("s")
