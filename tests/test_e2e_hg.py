"""End to end: real Mercurial clients through KilnProxy (hg -R P serve --stdio)."""
import pytest

import harness

pytestmark = pytest.mark.e2e


def hg(*args, key, cwd=None):
    return harness.run(["hg", "--config", "ui.ssh=%s" % harness.ssh_command(key)] + list(args),
                       env=harness.client_env(key), cwd=cwd)


def test_hg_clone_and_push(proxy, repo_name, keys, tmp_path):
    backend_repo = harness.make_hg_repo(proxy.repo_root, repo_name, {"hello.txt": b"hg says hi\n"})
    dest = tmp_path / "clone"
    r = hg("clone", "-q", proxy.hg_url(repo_name), str(dest), key=keys["user"])
    assert r.returncode == 0, r.stderr
    assert (dest / "hello.txt").read_bytes() == b"hg says hi\n"
    (dest / "second.txt").write_text("more\n")
    assert hg("commit", "-A", "-q", "-m", "second", "-u", "T <t@e.com>", key=keys["user"], cwd=str(dest)).returncode == 0
    r = hg("push", "-q", key=keys["user"], cwd=str(dest))
    assert r.returncode == 0, r.stderr
    log = harness.run(["hg", "-R", backend_repo, "log", "-T", "{desc}\\n"]).stdout
    assert b"second" in log.splitlines()[0]


def test_hg_other_account_refused(proxy_local, keys, tmp_path):
    harness.make_hg_repo(proxy_local.repo_root, "umbrella/hgsecret", {"s": b"s"})
    r = hg("clone", proxy_local.hg_url("umbrella/hgsecret"), str(tmp_path / "c"), key=keys["user"])
    assert r.returncode != 0
    assert b"kilnproxy: repository not found or access denied" in r.stderr
