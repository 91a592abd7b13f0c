"""End to end, local backend: links planted in an account's folder do not lead git or hg into another account.

git's DWIM (P/.git, P.git/.git, P.git), gitfiles, hg's .hg and sharedpath: each form points from initech's folder to
an umbrella repository; clone and push through the real proxy are refused and the victim is untouched.
"""
import itertools
import os
import subprocess

import pytest

import harness

pytestmark = pytest.mark.e2e

DENIED = b"kilnproxy: repository not found or access denied"
_n = itertools.count(1)


def hg(*args, key, cwd=None):
    return harness.run(["hg", "--config", "ui.ssh=%s" % harness.ssh_command(key)] + list(args),
                       env=harness.client_env(key), cwd=cwd)


def refs(repo):
    return harness.run(["git", "-C", repo, "for-each-ref"], check=True).stdout


def hg_heads(repo):
    return harness.run(["hg", "-R", repo, "log", "-T", "{node}\\n"], check=True).stdout


def plant_git(root, form, victim, outside):
    """Plant one link form in initech's folder; return the path the client asks for."""
    name = "initech/evil-%d" % next(_n)
    base = os.path.join(root, name)
    os.makedirs(os.path.dirname(base), exist_ok=True)
    if form == "P.git symlink":
        os.symlink(victim, base + ".git")
    elif form == "P/.git symlink":
        os.makedirs(base)
        os.symlink(victim, base + "/.git")
    elif form == "P.git/.git symlink":
        os.makedirs(base + ".git")
        os.symlink(victim, base + ".git/.git")
    elif form == "P.git gitfile":
        with open(base + ".git", "w") as f:
            f.write("gitdir: %s\n" % victim)
    elif form == "P/.git gitfile, relative":
        os.makedirs(base)
        with open(base + "/.git", "w") as f:
            f.write("gitdir: %s\n" % os.path.relpath(victim, base))
    elif form == "symlink outside repo_root":
        os.symlink(outside, base + ".git")
    return name


GIT_FORMS = ["P.git symlink", "P/.git symlink", "P.git/.git symlink", "P.git gitfile", "P/.git gitfile, relative",
             "symlink outside repo_root"]


@pytest.mark.parametrize("form", GIT_FORMS)
def test_git_link_forms_refused(proxy_local, keys, tmp_path, form):
    root = proxy_local.repo_root
    victim = harness.make_git_repo(root, "umbrella/victim-%d.git" % next(_n), {"secret": b"s"})
    outside = harness.make_git_repo(str(tmp_path), "outside.git", {"secret": b"s"})
    target = outside if form == "symlink outside repo_root" else victim
    before = refs(target)
    name = plant_git(root, form, victim, outside)
    env = harness.client_env(keys["user"])
    for path in (name, name + ".git") if form.startswith("P.git") or "outside" in form else (name,):
        r = harness.run(["git", "clone", proxy_local.url(path), str(tmp_path / "c")], env=env)
        assert r.returncode != 0, path
        assert DENIED in r.stderr, r.stderr
        assert not (tmp_path / "c" / "secret").exists()
    # a push from an unrelated history, to a new branch: refused, nothing written
    work = tmp_path / "w"
    harness.run(["git", "init", "-q", "-b", "main", str(work)], check=True)
    (work / "pwned").write_text("x\n")
    harness.run(["git", "-C", str(work), "add", "-A"], env=env, check=True)
    harness.run(["git", "-C", str(work), "commit", "-qm", "pwned"], env=env, check=True)
    r = harness.run(["git", "-C", str(work), "push", proxy_local.url(name), "main:refs/heads/pwned"], env=env)
    assert r.returncode != 0
    assert DENIED in r.stderr, r.stderr
    assert refs(target) == before
    # the archive service too
    r = harness.run(["git", "archive", "--remote", proxy_local.url(name), "main"], env=env)
    assert r.returncode != 0 and DENIED in r.stderr, r.stderr


@pytest.mark.parametrize("form", [".hg symlink", "hg share", "hg share --relative"])
def test_hg_link_forms_refused(proxy_local, keys, tmp_path, form):
    root = proxy_local.repo_root
    victim = harness.make_hg_repo(root, "umbrella/hgvictim-%d" % next(_n), {"secret": b"s"})
    before = hg_heads(victim)
    name = "initech/hgevil-%d" % next(_n)
    dest = os.path.join(root, name)
    if form == ".hg symlink":
        os.makedirs(dest)
        os.symlink(os.path.join(victim, ".hg"), os.path.join(dest, ".hg"))
    else:
        subprocess.run(["hg", "--config", "extensions.share=", "share", "-q", "-U"]
                       + (["--relative"] if "relative" in form else []) + [victim, dest], check=True)
    r = hg("clone", proxy_local.hg_url(name), str(tmp_path / "c"), key=keys["user"])
    assert r.returncode != 0
    assert DENIED in r.stderr, r.stderr
    assert not (tmp_path / "c" / "secret").exists()
    mine = harness.make_hg_repo(str(tmp_path), "mine", {"pwned": b"x"})
    r = hg("push", "-f", proxy_local.hg_url(name), key=keys["user"], cwd=mine)
    assert r.returncode != 0
    assert DENIED in r.stderr, r.stderr
    assert hg_heads(victim) == before


def test_legitimate_paths_still_work(proxy_local, keys, tmp_path):
    root = proxy_local.repo_root
    name = "initech/legit-%d" % next(_n)
    bare = harness.make_git_repo(root, name + ".git", {"a.txt": b"one\n"})
    env = harness.client_env(keys["user"])
    for i, path in enumerate((name, name + ".git")):
        r = harness.run(["git", "clone", "-q", proxy_local.url(path), str(tmp_path / ("c%d" % i))], env=env)
        assert r.returncode == 0, r.stderr
        assert (tmp_path / ("c%d" % i) / "a.txt").read_bytes() == b"one\n"
    work = tmp_path / "c0"
    (work / "a.txt").write_text("two\n")
    harness.run(["git", "-C", str(work), "commit", "-qam", "second"], env=env, check=True)
    r = harness.run(["git", "-C", str(work), "push", "-q", "origin", "main"], env=env)
    assert r.returncode == 0, r.stderr
    assert harness.git_rev(bare) == harness.git_rev(str(work), "HEAD")
    # an alias inside the account is fine
    os.symlink(os.path.basename(bare), os.path.join(root, name + "-alias.git"))
    r = harness.run(["git", "ls-remote", proxy_local.url(name + "-alias")], env=env)
    assert r.returncode == 0, r.stderr
    assert harness.git_rev(bare).encode() in r.stdout
    hg_name = "initech/hglegit-%d" % next(_n)
    harness.make_hg_repo(root, hg_name, {"h.txt": b"hg\n"})
    r = hg("clone", "-q", proxy_local.hg_url(hg_name), str(tmp_path / "h"), key=keys["user"])
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "h" / "h.txt").read_bytes() == b"hg\n"
