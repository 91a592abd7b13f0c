"""End to end: the admin API of a real proxy process with real SSH sessions."""
import json
import signal
import subprocess
import sys
import time

import pytest

import harness
from test_e2e_lifecycle import finish, held_session

pytestmark = pytest.mark.e2e
TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def tokened(make_proxy):
    return make_proxy("ssh", admin={"token": TOKEN}, backend={"pool_idle": 0.5})


def request(proxy, path, method="GET", token=TOKEN):
    return harness.admin_get(proxy, path, token, method=method)


def test_token_required_except_healthz(tokened):
    assert request(tokened, "/info", token=None)[0] == 401
    assert request(tokened, "/connections", token="wrong")[0] == 401
    assert request(tokened, "/healthz", token=None) == (200, b"ok\n")
    status, body = request(tokened, "/info")
    assert status == 200
    info = json.loads(body)
    assert set(info) >= {"Version", "StartTimeEpochSecs", "CurrentTimeEpochSecs", "Uptime"}


def test_version_matches_cli(tokened):
    info = json.loads(request(tokened, "/info")[1])
    cli = subprocess.run([sys.executable, harness.KILNPROXY, "version"], capture_output=True, text=True, check=True)
    assert info["Version"] == cli.stdout.strip()


def test_connections_and_delete_end_a_real_session(tokened, keys):
    harness.make_git_repo(tokened.repo_root, "initech/admin.git", {"a": b"a"})
    before = json.loads(request(tokened, "/debug/greenlets")[1])["count"]
    held = held_session(tokened, keys["user"], "initech/admin.git")
    try:
        conns = json.loads(request(tokened, "/connections")[1])
        assert conns["CurrentUserCount"] == 1
        (user,) = conns["CurrentlyAuthenticatedUsers"]
        assert user["Account"] == "initech"
        assert user["Name"] == "Peter Gibbons"
        assert user["PublicKeyName"] == "Laptop"
        assert user["Command"] == "git-receive-pack 'initech/admin.git'"
        assert user["Repository"] == "initech/admin.git"
        assert user["BytesOut"] > 0
        assert user["RemoteAddr"].startswith("127.0.0.1:")
        assert user["SessionDuration"].endswith("s")
        key = user["SessionKey"]
        assert request(tokened, "/connections/nope1234", "DELETE")[0] == 404
        assert request(tokened, "/connections/%s" % key, "DELETE")[0] == 200
        held.wait(10)
        assert held.returncode != 0
        tokened.wait_for_log(r"%s end .*reason=closed by admin" % key)
    finally:
        harness.reap(held)
    assert json.loads(request(tokened, "/connections")[1])["CurrentUserCount"] == 0
    give_up = time.monotonic() + 15
    while json.loads(request(tokened, "/debug/greenlets")[1])["count"] > before:
        assert time.monotonic() < give_up, "greenlets did not return to baseline"
        time.sleep(0.1)


def test_metrics_count_real_sessions(tokened, keys):
    from prometheus_client.parser import text_string_to_metric_families
    harness.make_git_repo(tokened.repo_root, "initech/metrics.git", {"a": b"a"})

    def sample(name, **labels):
        text = request(tokened, "/metrics")[1].decode()
        for fam in text_string_to_metric_families(text):
            for s in fam.samples:
                if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                    return s.value
        return 0.0

    completed = sample("kiln_sessions_total", outcome="completed")
    failed = sample("kiln_auth_failures_total")
    r = harness.run(["git", "ls-remote", tokened.url("initech/metrics.git")], env=harness.client_env(keys["user"]))
    assert r.returncode == 0
    harness.run(["git", "ls-remote", tokened.url("initech/metrics.git")], env=harness.client_env(keys["unknown"]))
    tokened.wait_for_log(r"auth failed source=")
    give_up = time.monotonic() + 10
    while sample("kiln_sessions_total", outcome="completed") < completed + 1 and time.monotonic() < give_up:
        time.sleep(0.1)
    assert sample("kiln_sessions_total", outcome="completed") >= completed + 1
    assert sample("kiln_auth_failures_total") >= failed + 1


def test_debug_dumps(tokened):
    status, body = request(tokened, "/debug/greenlets?debug=2")
    assert status == 200
    assert b"serve_forever" in body or b"_do_read" in body     # the listener's accept loop is among the stacks
    heap = json.loads(request(tokened, "/debug/heap")[1])
    assert heap["most_common_types"] and "growth" in heap
    gcs = json.loads(request(tokened, "/debug/gc")[1])
    assert gcs


def test_healthz_503_while_draining(make_proxy, keys):
    proxy = make_proxy("local", timeouts={"drain": 10.0})
    harness.make_git_repo(proxy.repo_root, "initech/h.git", {"a": b"a"})
    held = held_session(proxy, keys["user"], "initech/h.git")
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.wait_for_log("draining")
    assert harness.admin_get(proxy, "/healthz")[0] == 503
    assert finish(held)[0] == 0
    assert proxy.proc.wait(15) == 0
