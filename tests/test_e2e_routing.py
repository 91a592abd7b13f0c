"""End to end: accounts routed to named backends ([backends.NAME]) by routes kept in the key store. Two real OpenSSH
sshd backends with different contents; clones land on the routed one (content and the backend's own KILN_* record);
a route change applies to new sessions within seconds, without a signal; a dead backend breaks only its accounts; a
route naming a backend this instance does not have is 'backend unavailable', logged with the name."""
import json
import os
import re
import sqlite3
import time

import pytest

import harness
from test_e2e_lifecycle import finish, held_session

pytestmark = pytest.mark.e2e
APPLY_WITHIN = 2.0       # the interface's promise: a route change reaches new connections within 2 s


def _clone(proxy, key, repo, dest):
    return harness.run(["git", "clone", "-q", proxy.url(repo), str(dest)], env=harness.client_env(key))


def _content_until(proxy, key, repo, tmp_path, want, timeout=15.0):
    """Clone repeatedly until the clone holds `want` (bounded); returns the last content seen."""
    give_up = time.monotonic() + timeout
    n = 0
    while True:
        n += 1
        dest = tmp_path / ("try%d" % n)
        r = _clone(proxy, key, repo, dest)
        got = (dest / "where").read_bytes() if r.returncode == 0 else r.stderr
        if got == want or time.monotonic() > give_up:
            return got
        time.sleep(0.2)


@pytest.fixture
def second(tmp_path_factory, keys):
    backend = harness.OpenSSHBackend(str(tmp_path_factory.mktemp("sshd-second")), keys["backend"] + ".pub").start()
    yield backend
    backend.stop()


def test_sessions_follow_their_account_route(tmp_path, tmp_path_factory, keys, sshd_backend, second):
    repo = "initech/routed-%d.git" % os.getpid()
    harness.make_git_repo(sshd_backend.repo_root, repo, {"where": b"default\n"})
    harness.make_git_repo(second.repo_root, repo, {"where": b"second\n"})
    other_repo = "umbrella/stays-%d.git" % os.getpid()
    harness.make_git_repo(sshd_backend.repo_root, other_repo, {"where": b"default\n"})
    proxy = harness.Proxy(str(tmp_path_factory.mktemp("proxy-routing")), backend=sshd_backend,
                          backend_key=keys["backend"],
                          extra={"backends.second": {"kind": "ssh", "address": "127.0.0.1:%d" % second.port,
                                                     "user": second.user, "identity": keys["backend"],
                                                     "known_hosts": second.known_hosts,
                                                     "pool_idle": 0},    # a stopped sshd: no pooled way in
                                 "timeouts": {"dial": 3}})
    proxy.add_key(keys["user"] + ".pub")
    proxy.add_key(keys["other"] + ".pub", account="umbrella", name="Albert Wesker", key_name="Desktop")
    proxy.start()
    try:
        assert _content_until(proxy, keys["user"], repo, tmp_path / "a", b"default\n", 0) == b"default\n"
        # route initech to "second" with the CLI while the proxy runs: no SIGHUP
        before = time.time()
        out = proxy.cli("accounts", "route", "--account", "initech", "--backend", "second")
        routed = time.time()
        assert out.returncode == 0, out.stderr
        assert proxy.logged_after("key store changed: 2 keys, 1 routes", before) - routed < APPLY_WITHIN
        assert _content_until(proxy, keys["user"], repo, tmp_path / "b", b"second\n") == b"second\n"
        m = re.findall(r"(\w{8}) backend second ssh connected", proxy.read_log())
        assert m and second.env_record(m[-1])["KILN_ACCOUNT"] == "initech"     # it ran on the second sshd
        listed = proxy.cli("accounts", "list", "--json").stdout
        assert '"backend": "second"' in listed
        # a running session names its backend in /connections; a key added meanwhile (pushed, no signal) does not
        # retire the pooled backend connections: the next session on "second" reuses one
        held = held_session(proxy, keys["user"], repo)
        try:
            entries = json.loads(harness.admin_get(proxy, "/connections")[1])["CurrentlyAuthenticatedUsers"]
            assert [e["Backend"] for e in entries if e["Account"] == "initech"] == ["second"], entries
            before = time.time()
            proxy.add_key(keys["user_rsa"] + ".pub", key_name="Spare")
            proxy.logged_after("key store changed: 3 keys, 1 routes", before)
            # (pool_idle = 0 for "second": the held session's connection is the one a pooled session can share)
            assert _content_until(proxy, keys["user"], repo, tmp_path / "b2", b"second\n", 0) == b"second\n"
            last = re.findall(r"backend second ssh connected in \S+(.*)", proxy.read_log())[-1]
            assert last == " (pooled connection)", proxy.read_log()[-2000:]
        finally:
            assert finish(held)[0] == 0
        # the other account still goes to the default backend
        assert _content_until(proxy, keys["other"], other_repo, tmp_path / "c", b"default\n", 0) == b"default\n"
        # the second backend dies: only initech's sessions fail, and they say so
        second.stop()
        r = _clone(proxy, keys["user"], repo, tmp_path / "d")
        assert r.returncode != 0 and b"kilnproxy: backend unavailable" in r.stderr
        assert _content_until(proxy, keys["other"], other_repo, tmp_path / "e", b"default\n", 0) == b"default\n"
        metrics = harness.admin_get(proxy, "/metrics")[1]
        assert re.search(rb'kiln_backend_errors_total\{backend="second"\} [1-9]', metrics), metrics[-3000:]
        assert re.search(rb'kiln_backend_errors_total\{backend="default"\} 0', metrics)
        # a route to a backend this instance's config does not have (another instance's name, written by any
        # writer of the store): backend unavailable, logged with the name
        with sqlite3.connect(os.path.join(proxy.state_dir, "keys.db")) as db:
            db.execute("UPDATE routes SET backend = 'elsewhere' WHERE account = 'initech'")
        got = _content_until(proxy, keys["user"], repo, tmp_path / "f", b"never", 5)
        assert b"kilnproxy: backend unavailable" in got
        proxy.wait_for_log(r"routed to backend 'elsewhere', which this instance's config does not have")
        # back to default: served again
        out = proxy.cli("accounts", "route", "--account", "initech", "--backend", "default")
        assert out.returncode == 0, out.stderr
        assert _content_until(proxy, keys["user"], repo, tmp_path / "g", b"default\n") == b"default\n"
    finally:
        assert proxy.stop() == 0
    assert not proxy.problems()
