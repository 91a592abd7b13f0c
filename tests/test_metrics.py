"""metrics.Metrics without sockets: every series exists from the start, label values stay in their bounded sets
whatever the callers pass, byte counts never go backwards, and each Metrics object has its own registry."""
import pytest
from prometheus_client.parser import text_string_to_metric_families

from kiln import metrics
from kiln.outcomes import Reason


def parse(text):
    """{'name' or 'name{label="value"}': value} by prometheus_client's own parser."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = ",".join('%s="%s"' % kv for kv in sorted(sample.labels.items()))
            out[sample.name + ("{%s}" % labels if labels else "")] = sample.value
    return out


@pytest.fixture
def m():
    return metrics.Metrics(backends=("default", "second"))


def series(m):
    return parse(m.render()[0].decode())


def test_every_labelled_series_is_there_at_zero_before_any_event(m):
    s = series(m)
    for reason in Reason:
        if reason is not Reason.UNKNOWN:
            assert s['kiln_sessions_total{outcome="%s"}' % reason.label] == 0
    for limit in metrics.LIMITS:
        assert s['kiln_limit_rejections_total{limit="%s"}' % limit] == 0
    for name in ("default", "second", "other"):
        assert s['kiln_backend_errors_total{backend="%s"}' % name] == 0
    for timeout in metrics.WATCHDOG_TIMEOUTS:
        assert s['kiln_watchdog_closed_total{timeout="%s"}' % timeout] == 0
    assert s["kiln_keystore_up"] == 1


@pytest.mark.parametrize("given, label", [
    (Reason.COMPLETED, "completed"), (Reason.PER_ACCOUNT, "per_account_limit"),
    (Reason.CLIENT_LEFT_IN_LOGIN, "client_disconnected_during_login"), ("Idle Timeout", "idle_timeout"),
    ("no such reason", "other"), (None, "other"), ("", "other"), (Reason.UNKNOWN, "other"),
])
def test_outcome_labels_are_bounded(given, label):
    assert metrics.outcome_label(given) == label


@pytest.mark.parametrize("given, label", [
    ("per_account", "per_account"), ("limits.per_account", "per_account"), ("max-startups", "max_startups"),
    ("proxy_protocol", "proxy_protocol"), ("limits.nonsense", "other"), (None, "other"),
])
def test_limit_labels_are_bounded(given, label):
    assert metrics.limit_label(given) == label


def test_hooks_count_into_their_series(m):
    m.connection_opened()
    m.connection_opened()
    m.connection_closed()
    m.auth_failed()
    m.limit_rejected("limits.max_connections")
    m.limit_rejected("made up")
    m.backend_error("second")
    m.backend_error("a name from another instance's config")
    m.watchdog_closed("idle")
    m.watchdog_closed("weird")
    m.session_ended(Reason.COMPLETED, 2.0, 100, 5000)
    m.session_ended("something new", 1.0, 1, 2)
    s = series(m)
    assert s["kiln_connections_total"] == 2 and s["kiln_connections_in_flight"] == 1
    assert s["kiln_auth_failures_total"] == 1
    assert s['kiln_limit_rejections_total{limit="max_connections"}'] == 1
    assert s['kiln_limit_rejections_total{limit="other"}'] == 1
    assert s['kiln_backend_errors_total{backend="second"}'] == 1
    assert s['kiln_backend_errors_total{backend="other"}'] == 1
    assert s['kiln_backend_errors_total{backend="default"}'] == 0
    assert s['kiln_watchdog_closed_total{timeout="idle"}'] == 1
    assert s['kiln_watchdog_closed_total{timeout="other"}'] == 1
    assert s['kiln_sessions_total{outcome="completed"}'] == 1 and s['kiln_sessions_total{outcome="other"}'] == 1
    assert s['kiln_relayed_bytes_total{direction="in"}'] == 101
    assert s['kiln_relayed_bytes_total{direction="out"}'] == 5002
    assert s["kiln_session_duration_seconds_count"] == 2 and s["kiln_session_duration_seconds_sum"] == 3.0
    assert (m.ended_bytes_in, m.ended_bytes_out) == (101, 5002)
    # no label value outside the fixed sets appeared
    assert not [k for k in s if "made up" in k or "another instance" in k or "weird" in k or "something" in k]


def test_odd_input_never_raises_or_counts_backwards(m):
    m.session_ended(Reason.COMPLETED, -5, -10, -1)
    m.session_established(-1)
    s = series(m)
    assert s['kiln_relayed_bytes_total{direction="in"}'] == 0
    assert s["kiln_session_duration_seconds_sum"] == 0 and s["kiln_session_establish_seconds_sum"] == 0


def test_keystore_up_follows_the_store_at_scrape_time(m):
    class Store:
        up = True
    store = Store()
    m.watch_keystore(store)
    assert series(m)["kiln_keystore_up"] == 1
    store.up = False
    assert series(m)["kiln_keystore_up"] == 0


def test_two_objects_have_their_own_registries():
    a, b = metrics.Metrics(), metrics.Metrics()
    a.auth_failed()
    assert series(a)["kiln_auth_failures_total"] == 1 and series(b)["kiln_auth_failures_total"] == 0


def test_attach_and_detach_a_collector(m):
    from prometheus_client.core import GaugeMetricFamily

    class C:
        def collect(self):
            yield GaugeMetricFamily("kiln_test_gauge", "a test gauge", value=7)

    detach = m.attach(C())
    assert series(m)["kiln_test_gauge"] == 7
    detach()
    detach()                    # safe twice
    assert "kiln_test_gauge" not in series(m)


def test_openmetrics_when_the_scraper_asks(m):
    body, ctype = m.render("application/openmetrics-text; version=1.0.0")
    assert ctype.startswith("application/openmetrics-text") and body.rstrip().endswith(b"# EOF")
    body, ctype = m.render()
    assert ctype.startswith("text/plain") and b"# EOF" not in body
