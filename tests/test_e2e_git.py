"""End to end: real git clients through a real KilnProxy to local and OpenSSH backends."""
import os
import re
import stat

import pytest

import harness

pytestmark = pytest.mark.e2e


@pytest.fixture(scope="module")
def big_blob():
    return os.urandom(20 * 1024 * 1024)


def test_clone_20mb_binary(proxy, repo_name, big_blob, keys, tmp_path):
    harness.make_git_repo(proxy.repo_root, repo_name + ".git", {"big.bin": big_blob, "README": b"hello\n"})
    dest = tmp_path / "clone"
    r = harness.run(["git", "clone", "-q", proxy.url(repo_name + ".git"), str(dest)], env=harness.client_env(keys["user"]))
    assert r.returncode == 0, r.stderr
    assert harness.sha256_file(dest / "big.bin") == harness.hashlib.sha256(big_blob).hexdigest()
    assert (dest / "README").read_bytes() == b"hello\n"


def test_push_moves_ref(proxy, repo_name, keys, tmp_path):
    bare = harness.make_git_repo(proxy.repo_root, repo_name + ".git", {"a.txt": b"one\n"})
    # a pre-receive hook records the identity the backend received (local child env or sshd env requests)
    hook = os.path.join(bare, "hooks", "pre-receive")
    record = tmp_path / "hook-env"
    with open(hook, "w") as f:
        f.write("#!/bin/sh\nenv | grep '^KILN_' | sort > %s\ncat >/dev/null\n" % record)
    os.chmod(hook, os.stat(hook).st_mode | stat.S_IEXEC)
    before = harness.git_rev(bare)
    env = harness.client_env(keys["user"])
    work = tmp_path / "w"
    assert harness.run(["git", "clone", "-q", proxy.url(repo_name + ".git"), str(work)], env=env).returncode == 0
    (work / "a.txt").write_text("two\n")
    harness.run(["git", "-C", str(work), "commit", "-qam", "second"], env=env, check=True)
    r = harness.run(["git", "-C", str(work), "push", "-q", "origin", "main"], env=env)
    assert r.returncode == 0, r.stderr
    after = harness.git_rev(bare)
    assert after != before
    assert after == harness.git_rev(str(work), "HEAD")
    env_seen = dict(line.split("=", 1) for line in record.read_text().splitlines())
    assert env_seen["KILN_ACCOUNT"] == "initech"
    assert env_seen["KILN_USER"] == "Peter Gibbons"
    assert env_seen["KILN_KEY_NAME"] == "Laptop"
    assert re.fullmatch(r"[0-9a-f]{8}", env_seen["KILN_SESSION"])


def test_protocol_v2_and_identity_env(proxy, repo_name, keys):
    harness.make_git_repo(proxy.repo_root, repo_name + ".git", {"a.txt": b"x\n"})
    env = harness.client_env(keys["user"], GIT_TRACE_PACKET="1")
    r = harness.run(["git", "-c", "protocol.version=2", "ls-remote", proxy.url(repo_name + ".git")], env=env)
    assert r.returncode == 0, r.stderr
    assert b"refs/heads/main" in r.stdout
    # the server answered in protocol v2 (capability advertisement starts with "version 2")
    assert b"< version 2" in r.stderr
    m = proxy.wait_for_log(r"INFO (\w{8}) command git-upload-pack '%s\.git'" % re.escape(repo_name))
    key = m.group(1)
    if proxy.backend is not None:
        rec = proxy.backend.env_record(key)
        assert rec["KILN_ACCOUNT"] == "initech"
        assert rec["KILN_USER"] == "Peter Gibbons"
        assert rec["KILN_KEY_NAME"] == "Laptop"
        assert rec["KILN_SESSION"] == key
        assert rec["GIT_PROTOCOL"] == "version=2"
        assert rec["SSH_ORIGINAL_COMMAND"] == "git-upload-pack '%s.git'" % repo_name


def test_archive_remote(proxy, repo_name, keys, tmp_path):
    harness.make_git_repo(proxy.repo_root, repo_name + ".git", {"hello.txt": b"archived\n"})
    out = tmp_path / "a.tar"
    r = harness.run(["git", "archive", "--remote", proxy.url(repo_name + ".git"), "-o", str(out), "main"],
                    env=harness.client_env(keys["user"]))
    assert r.returncode == 0, r.stderr
    import tarfile
    with tarfile.open(out) as t:
        assert t.extractfile("hello.txt").read() == b"archived\n"


def test_backend_connections_are_pooled(make_proxy, keys, sshd_backend):
    proxy = make_proxy("ssh", backend={"max_sessions": 2, "pool_idle": 1.0})
    harness.make_git_repo(proxy.repo_root, "initech/pool.git", {"a": b"a"})
    env = harness.client_env(keys["user"])
    for _ in range(3):
        r = harness.run(["git", "ls-remote", proxy.url("initech/pool.git")], env=env)
        assert r.returncode == 0, r.stderr
    log = proxy.read_log()
    assert log.count("backend connection opened") == 1       # three sessions, one backend handshake
    assert log.count("(pooled connection)") == 2
    proxy.wait_for_log(r"backend connection closed after 3 sessions \(0 pooled\)")   # pool_idle expired
    # a session after that dials afresh
    assert harness.run(["git", "ls-remote", proxy.url("initech/pool.git")], env=env).returncode == 0
    assert proxy.read_log().count("backend connection opened") == 2
