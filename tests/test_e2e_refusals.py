"""End to end: what KilnProxy refuses, and that refusing has no side effect on the backend."""
import os
import subprocess

import pytest

import harness

pytestmark = pytest.mark.e2e


def ssh(proxy, key, *command, extra=(), timeout=30):
    args = harness.ssh_args(key) + list(extra) + ["-p", str(proxy.port), "git@127.0.0.1"] + list(command)
    return subprocess.run(args, capture_output=True, timeout=timeout, stdin=subprocess.DEVNULL)


def backend_sessions(proxy):
    return set(os.listdir(proxy.backend.log_dir)) if proxy.backend else set()


def test_unknown_key_fails_auth(proxy, repo_name, keys):
    harness.make_git_repo(proxy.repo_root, repo_name + ".git", {"a": b"a"})
    before = backend_sessions(proxy)
    r = ssh(proxy, keys["unknown"], "git-upload-pack '%s.git'" % repo_name)
    assert r.returncode == 255
    assert b"Permission denied (publickey)" in r.stderr
    proxy.wait_for_log(r"\w{8} end .*reason=auth failed")
    assert backend_sessions(proxy) == before


@pytest.mark.parametrize("key_kind", ["user_rsa", "user_ecdsa"])
def test_rsa_and_ecdsa_keys_authenticate(proxy_local, repo_name, keys, key_kind):
    harness.make_git_repo(proxy_local.repo_root, repo_name + ".git", {"a": b"a"})
    r = harness.run(["git", "ls-remote", proxy_local.url(repo_name + ".git")], env=harness.client_env(keys[key_kind]))
    assert r.returncode == 0, r.stderr
    assert b"refs/heads/main" in r.stdout


def test_other_accounts_repository_is_refused(proxy, keys, tmp_path):
    target = "umbrella/secret-%s.git" % os.urandom(3).hex()
    bare = harness.make_git_repo(proxy.repo_root, target, {"secret": b"s"})
    before = harness.git_rev(bare)
    r = harness.run(["git", "clone", proxy.url(target), str(tmp_path / "c")], env=harness.client_env(keys["user"]))
    assert r.returncode != 0
    assert b"kilnproxy: repository not found or access denied" in r.stderr
    assert not (tmp_path / "c" / "secret").exists()
    # the owner can reach it; nobody else's push moved it
    r = harness.run(["git", "ls-remote", proxy.url(target)], env=harness.client_env(keys["other"]))
    assert r.returncode == 0, r.stderr
    assert harness.git_rev(bare) == before


FORBIDDEN = [
    "ls -la",
    "sh -c id",
    "git-upload-pack 'initech/../umbrella/x.git'",
    "git-upload-pack '/etc'",
    "git-upload-pack '--help'",
    "git-upload-pack 'initech/-x.git'",
    "git-upload-pack 'initech/.hidden.git'",
    "git-upload-pack 'initech/x.git' extra",
    "git-upload-pack 'initech/x.git'; touch /tmp/kiln-pwned",
    "git-upload-pack \"initech/$(touch /tmp/kiln-pwned)\"",
    "git upload-pack --strict 'initech/x.git'",
    "git -c core.sshCommand=touch upload-pack 'initech/x.git'",
    "hg -R initech/x serve --stdio --debugger",
    "hg -R initech/x --debugger serve --stdio",
    "hg serve --stdio",
    "scp -t /tmp",
]


@pytest.mark.parametrize("command", FORBIDDEN)
def test_forbidden_command(proxy_local, keys, command):
    r = ssh(proxy_local, keys["user"], command)
    assert r.returncode != 0
    assert r.stderr.startswith(b"kilnproxy: "), r.stderr
    assert not os.path.exists("/tmp/kiln-pwned")


def test_forbidden_command_never_reaches_ssh_backend(proxy_ssh, keys):
    before = backend_sessions(proxy_ssh)
    for command in FORBIDDEN[:4]:
        r = ssh(proxy_ssh, keys["user"], command)
        assert r.returncode != 0 and r.stderr.startswith(b"kilnproxy: ")
    assert backend_sessions(proxy_ssh) == before


def test_shell_refused(proxy_local, keys):
    r = ssh(proxy_local, keys["user"])
    assert r.returncode != 0
    assert b"shell request failed" in r.stderr or b"kilnproxy: " in r.stderr
    proxy_local.wait_for_log(r"refused: interactive shells are not provided")


def test_pty_with_command_still_refuses_pty(proxy_local, repo_name, keys):
    r = ssh(proxy_local, keys["user"], "ls", extra=["-tt"])
    assert r.returncode != 0
    assert b"PTY allocation request failed" in r.stderr


def test_port_forwarding_refused(proxy_local, keys):
    # stdio forward = direct-tcpip channel
    r = ssh(proxy_local, keys["user"], extra=["-W", "127.0.0.1:%d" % proxy_local.admin_port])
    assert r.returncode != 0
    assert b"stdio forwarding failed" in r.stderr or b"administratively prohibited" in r.stderr
    # remote forward = tcpip-forward global request
    r = ssh(proxy_local, keys["user"], "true", extra=["-o", "ExitOnForwardFailure=yes", "-R", "0:127.0.0.1:9"])
    assert r.returncode != 0
    assert b"forwarding failed" in r.stderr


def test_subsystem_refused(proxy_local, keys):
    r = ssh(proxy_local, keys["user"], "sftp", extra=["-s"])
    assert r.returncode != 0


def test_traversal_push_moves_nothing(proxy, repo_name, keys, tmp_path):
    victim = harness.make_git_repo(proxy.repo_root, "umbrella/victim-%s.git" % os.urandom(3).hex(), {"a": b"a"})
    before = harness.git_rev(victim)
    env = harness.client_env(keys["user"])
    work = tmp_path / "w"
    harness.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    (work / "f").write_text("evil\n")
    harness.run(["git", "-C", str(work), "add", "f"], env=env, check=True)
    harness.run(["git", "-C", str(work), "commit", "-qm", "evil"], env=env, check=True)
    rel = os.path.relpath(victim, proxy.repo_root)
    for url in (proxy.url("initech/../" + rel), proxy.url("initech/%2e%2e/" + rel)):
        r = harness.run(["git", "-C", str(work), "push", url, "main:main"], env=env)
        assert r.returncode != 0
    assert harness.git_rev(victim) == before


def test_missing_repository_gets_gits_own_error(proxy, keys, tmp_path):
    r = harness.run(["git", "clone", proxy.url("initech/does-not-exist.git"), str(tmp_path / "c")],
                    env=harness.client_env(keys["user"]))
    assert r.returncode != 0
    assert b"does not appear to be a git repository" in r.stderr or b"not a git repository" in r.stderr.lower()


def test_symlink_out_of_account_refused(proxy_local, keys, tmp_path):
    victim = harness.make_git_repo(proxy_local.repo_root, "umbrella/linked-victim.git", {"secret": b"s"})
    link = os.path.join(proxy_local.repo_root, "initech", "sneaky.git")
    os.makedirs(os.path.dirname(link), exist_ok=True)
    os.symlink(victim, link)
    r = harness.run(["git", "clone", proxy_local.url("initech/sneaky.git"), str(tmp_path / "c")],
                    env=harness.client_env(keys["user"]))
    assert r.returncode != 0
    assert b"kilnproxy: repository not found or access denied" in r.stderr
    assert not (tmp_path / "c" / "secret").exists()


def test_ciphers_gcm_by_default_ctr_when_configured(proxy_local, make_proxy, keys):
    before = proxy_local.read_log().count("handshake failed: Incompatible ssh")
    r = ssh(proxy_local, keys["user"], "git-upload-pack 'initech/nothing.git'", extra=["-c", "aes128-ctr"])
    assert r.returncode == 255 and r.stdout == b""
    proxy_local.wait_for_log(r"handshake failed: Incompatible ssh")
    assert proxy_local.read_log().count("handshake failed: Incompatible ssh") == before + 1
    legacy = make_proxy("local", proxy={"ciphers": ["aes128-gcm@openssh.com", "aes128-ctr"]})
    harness.make_git_repo(legacy.repo_root, "initech/ctr.git", {"a": b"a"})
    r = ssh(legacy, keys["user"], "git-upload-pack 'initech/ctr.git'", extra=["-c", "aes128-ctr"])
    assert b"refs/heads/main" in r.stdout, r.stderr
