"""Fixtures for end-to-end tests: an OpenSSH backend and KilnProxy processes (local and ssh backends).

Each fixture owns what it starts and stops it by PID. Session-scoped proxies are shared; tests that change timeouts or
limits start their own with `make_proxy`.
"""
import itertools
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import harness  # noqa: E402

_counter = itertools.count(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "e2e: end-to-end test with real sshd, ssh, git and hg")
    config.addinivalue_line("markers", "dist: builds and runs dist/kilnproxy.pyz (slow: `make test-dist`)")


@pytest.fixture(scope="session")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    return {
        "user": harness.keygen(str(d / "id_user")),
        "user_rsa": harness.keygen(str(d / "id_user_rsa"), "rsa"),
        "user_ecdsa": harness.keygen(str(d / "id_user_ecdsa"), "ecdsa"),
        "other": harness.keygen(str(d / "id_other")),
        "unknown": harness.keygen(str(d / "id_unknown")),
        "backend": harness.keygen(str(d / "id_backend")),
    }


def _register_keys(proxy, keys):
    proxy.add_key(keys["user"] + ".pub")
    proxy.add_key(keys["user_rsa"] + ".pub", key_name="RSA laptop")
    proxy.add_key(keys["user_ecdsa"] + ".pub", key_name="ECDSA laptop")
    proxy.add_key(keys["other"] + ".pub", account="umbrella", name="Albert Wesker", key_name="Desktop")


@pytest.fixture(scope="session")
def sshd_backend(tmp_path_factory, keys):
    backend = harness.OpenSSHBackend(str(tmp_path_factory.mktemp("sshd")), keys["backend"] + ".pub").start()
    yield backend
    backend.stop()


@pytest.fixture(scope="session")
def make_proxy(tmp_path_factory, keys, sshd_backend):
    """Factory: make_proxy(kind='local'|'ssh', sshd=None, **sections) -> a started Proxy with the test keys
    registered; sections are config tables (timeouts={...}); sshd replaces the shared OpenSSH backend."""
    started = []

    def make(kind="local", sshd=None, **extra):
        d = str(tmp_path_factory.mktemp("proxy-%s" % kind))
        if kind == "ssh":
            proxy = harness.Proxy(d, backend=sshd or sshd_backend, backend_key=keys["backend"], extra=extra)
        else:
            proxy = harness.Proxy(d, extra=extra)
        _register_keys(proxy, keys)
        started.append(proxy)
        return proxy.start()

    yield make
    problems = []
    for proxy in started:
        status = proxy.stop()
        if status not in (0, None, proxy.expected_exit):
            problems.append("%s exited %s" % (proxy.dir, status))
        problems += ["%s: %s" % (proxy.dir, line) for line in proxy.problems()]
    assert not problems, "proxy problems:\n" + "\n".join(problems)


@pytest.fixture(scope="session")
def proxy_local(make_proxy):
    return make_proxy("local")


@pytest.fixture(scope="session")
def proxy_ssh(make_proxy):
    return make_proxy("ssh")


@pytest.fixture(params=["local", "ssh"])
def proxy(request):
    """Both backends: each test using this runs once through each."""
    return request.getfixturevalue("proxy_%s" % request.param)


@pytest.fixture
def repo_name():
    """A fresh repository path in the test account."""
    return "%s/repo-%d" % (harness.ACCOUNT, next(_counter))
