"""Local repository resolution (lib/kiln/localrepo.py): the repository git/hg would open, every path checked."""
import os
import shutil
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

import pytest  # noqa: E402

import harness  # noqa: E402
from kiln import commands, localrepo  # noqa: E402
from kiln.errors import CommandRejected  # noqa: E402

ACCOUNT = "initech"
DENIED = "repository not found or access denied"


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    r = tmp_path_factory.mktemp("template") / "repos"
    (r / "initech").mkdir(parents=True)
    harness.make_git_repo(str(r), "umbrella/secret.git")
    harness.make_hg_repo(str(r), "umbrella/hgsecret")
    return r


@pytest.fixture
def root(template, tmp_path):
    """A repo_root with both accounts' folders, and a victim repository of each kind in the other account."""
    r = tmp_path / "repos"
    shutil.copytree(template, r, symlinks=True)
    return r


def git(root, path, verb="upload-pack"):
    return localrepo.resolve(str(root), commands.parse("git-%s '%s'" % (verb, path), ACCOUNT))


def hg(root, path):
    return localrepo.resolve(str(root), commands.parse("hg -R %s serve --stdio" % path, ACCOUNT))


def refused(call, *args, **kw):
    with pytest.raises(CommandRejected) as info:
        call(*args, **kw)
    return str(info.value)


def real(path):
    return os.path.realpath(str(path))


# -- git: what still works --------------------------------------------------------------------------------------
def test_plain_bare_repository(root):
    harness.make_git_repo(str(root), "initech/p.git")
    assert git(root, "initech/p.git") == ["git", "upload-pack", "--strict", real(root / "initech/p.git")]
    for verb in ("receive-pack", "upload-archive"):     # no --strict there: the exact git dir
        assert git(root, "initech/p.git", verb) == ["git", verb, real(root / "initech/p.git")]


def test_p_resolves_to_p_git(root):
    harness.make_git_repo(str(root), "initech/p.git")
    assert git(root, "initech/p")[-1] == real(root / "initech/p.git")


def test_p_resolves_to_p_slash_git_first(root):
    subprocess.run(["git", "init", "-q", str(root / "initech/work")], check=True)
    harness.make_git_repo(str(root), "initech/work.git")     # enter_repo tries P/.git before P.git
    assert git(root, "initech/work")[-1] == real(root / "initech/work/.git")
    assert git(root, "initech/work", "receive-pack")[-1] == real(root / "initech/work/.git")


def test_gitfile_inside_account_is_followed(root):
    harness.make_git_repo(str(root), "initech/store/real.git")
    (root / "initech/alias.git").write_text("gitdir: store/real.git\n")
    (root / "initech/abs.git").write_text("gitdir: %s\n" % (root / "initech/store/real.git"))
    assert git(root, "initech/alias")[-1] == real(root / "initech/store/real.git")
    assert git(root, "initech/abs.git", "receive-pack")[-1] == real(root / "initech/store/real.git")


def test_symlink_inside_account_is_followed(root):
    harness.make_git_repo(str(root), "initech/store/real.git")
    os.symlink("store/real.git", root / "initech/alias.git")
    assert git(root, "initech/alias")[-1] == real(root / "initech/store/real.git")


def test_worktree_gitdir_with_commondir_inside(root):
    main = root / "initech/main"
    subprocess.run(["git", "init", "-q", "-b", "main", str(main)], check=True)
    harness.run(["git", "-C", str(main), "commit", "-q", "--allow-empty", "-m", "i"], env=harness.client_env("x"),
                check=True)
    subprocess.run(["git", "-C", str(main), "worktree", "add", "-q", str(root / "initech/wt")], check=True)
    assert git(root, "initech/wt")[-1] == real(main / ".git/worktrees/wt")


def test_alternates_inside_account(root):
    harness.make_git_repo(str(root), "initech/base.git")
    harness.make_git_repo(str(root), "initech/fork.git")
    (root / "initech/fork.git/objects/info/alternates").write_text("../../base.git/objects\n")
    assert git(root, "initech/fork.git")[-1] == real(root / "initech/fork.git")


# -- git: what is refused ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("request_path", ["initech/evil", "initech/evil.git"])
def test_symlinked_p_git_to_other_account(root, request_path):
    os.symlink(root / "umbrella/secret.git", root / "initech/evil.git")
    assert refused(git, root, request_path) == DENIED


def test_p_slash_git_symlink_to_other_account(root):
    (root / "initech/evil").mkdir()
    os.symlink(root / "umbrella/secret.git", root / "initech/evil/.git")
    assert refused(git, root, "initech/evil") == DENIED


def test_p_git_slash_git_symlink_to_other_account(root):
    (root / "initech/evil.git").mkdir()
    os.symlink(root / "umbrella/secret.git", root / "initech/evil.git/.git")
    assert refused(git, root, "initech/evil") == DENIED


@pytest.mark.parametrize("where", ["evil.git", "evil/.git"])
@pytest.mark.parametrize("target", ["absolute", "relative"])
def test_gitfile_to_other_account(root, where, target):
    gitfile = root / "initech" / where
    gitfile.parent.mkdir(parents=True, exist_ok=True)
    dest = str(root / "umbrella/secret.git") if target == "absolute" else \
        os.path.relpath(root / "umbrella/secret.git", gitfile.parent)
    gitfile.write_text("gitdir: %s\n" % dest)
    assert refused(git, root, "initech/evil") == DENIED
    assert refused(git, root, "initech/" + where.split("/")[0], "receive-pack") == DENIED


def test_symlink_outside_repo_root(root, tmp_path):
    outside = harness.make_git_repo(str(tmp_path), "elsewhere.git")
    os.symlink(outside, root / "initech/out.git")
    assert refused(git, root, "initech/out") == DENIED
    assert refused(git, root, "initech/out.git", "receive-pack") == DENIED


def test_symlinked_folder_on_the_way(root):
    os.symlink(root / "umbrella", root / "initech/sub")
    assert refused(git, root, "initech/sub/secret.git") == DENIED
    # whether the other account has that repository or not: the same answer
    assert refused(git, root, "initech/sub/no-such.git") == DENIED


def test_account_folder_that_is_a_link_is_refused(root, tmp_path):
    harness.make_git_repo(str(tmp_path), "real-initech/p.git")
    other = tmp_path / "other-root"
    other.mkdir()
    os.symlink(tmp_path / "real-initech", other / "initech")
    assert refused(git, other, "initech/p.git") == DENIED


def test_commondir_to_other_account(root):
    harness.make_git_repo(str(root), "initech/wt.git")
    (root / "initech/wt.git/commondir").write_text(os.path.relpath(root / "umbrella/secret.git",
                                                                    root / "initech/wt.git") + "\n")
    assert refused(git, root, "initech/wt.git") == DENIED


@pytest.mark.parametrize("name", ["objects", "refs", "packed-refs", "HEAD"])
def test_data_path_symlinked_to_other_account(root, name):
    harness.make_git_repo(str(root), "initech/p.git")
    target = root / "initech/p.git" / name
    if target.is_dir():
        os.rename(target, str(target) + ".orig")
    elif target.exists():
        target.unlink()
    os.symlink(root / "umbrella/secret.git" / name, target)
    assert refused(git, root, "initech/p.git") == DENIED


@pytest.mark.parametrize("line", ["%(victim)s", "../../../umbrella/secret.git/objects",
                                  "../../ok.git/objects\n%(victim)s"])
def test_alternates_to_other_account(root, line):
    harness.make_git_repo(str(root), "initech/ok.git")
    harness.make_git_repo(str(root), "initech/fork.git")
    (root / "initech/fork.git/objects/info/alternates").write_text(
        line % {"victim": root / "umbrella/secret.git/objects"} + "\n")
    assert refused(git, root, "initech/fork.git") == DENIED


def test_nested_alternates_to_other_account(root):
    harness.make_git_repo(str(root), "initech/base.git")
    harness.make_git_repo(str(root), "initech/fork.git")
    (root / "initech/fork.git/objects/info/alternates").write_text("../../base.git/objects\n")
    (root / "initech/base.git/objects/info/alternates").write_text("%s\n" % (root / "umbrella/secret.git/objects"))
    assert refused(git, root, "initech/fork.git") == DENIED


def test_non_strict_verbs_check_where_git_dwim_could_go(root):
    # upload-pack gets --strict and the exact path; receive-pack would try p.git.git if it disliked p.git
    harness.make_git_repo(str(root), "initech/p.git")
    os.symlink(root / "umbrella/secret.git", root / "initech/p.git.git")
    assert git(root, "initech/p.git")[-1] == real(root / "initech/p.git")
    assert refused(git, root, "initech/p.git", "receive-pack") == DENIED
    assert refused(git, root, "initech/p.git", "upload-archive") == DENIED


def test_dot_git_inside_a_git_dir_is_refused_for_non_strict_verbs(root):
    # the gitfile leads to real.git; receive-pack, given that path, would try real.git/.git first
    harness.make_git_repo(str(root), "initech/store/real.git")
    (root / "initech/alias.git").write_text("gitdir: store/real.git\n")
    (root / "initech/store/real.git/.git").write_text("gitdir: %s\n" % (root / "umbrella/secret.git"))
    assert git(root, "initech/alias")[-1] == real(root / "initech/store/real.git")   # --strict: no DWIM
    assert refused(git, root, "initech/alias", "receive-pack") == DENIED
    # and as a candidate of the client's own path, it is refused for every verb
    assert refused(git, root, "initech/store/real.git") == DENIED


# -- missing ----------------------------------------------------------------------------------------------------
def test_missing_repository(root):
    assert "does not appear to be a git repository" in refused(git, root, "initech/none.git")
    assert "does not appear to be a git repository" in refused(git, root, "initech/nodir/none.git")
    (root / "initech/plain").mkdir()                      # a folder that is no repository
    assert "does not appear to be a git repository" in refused(git, root, "initech/plain")
    (root / "initech/junk.git").write_text("not a gitfile\n")
    assert "does not appear to be a git repository" in refused(git, root, "initech/junk")
    assert "not found" in refused(hg, root, "initech/none")
    assert "not found" in refused(hg, root, "initech/plain")


def test_dangling_links_do_not_tell_what_exists_elsewhere(root):
    os.symlink(root / "umbrella/secret.git", root / "initech/a.git")
    os.symlink(root / "umbrella/no-such.git", root / "initech/b.git")
    assert refused(git, root, "initech/a") == refused(git, root, "initech/b") == DENIED
    (root / "initech/c.git").write_text("gitdir: %s\n" % (root / "umbrella/no-such.git"))
    assert refused(git, root, "initech/c") == DENIED


def test_fifo_does_not_block(root):
    (root / "initech/f.git").mkdir()
    os.mkfifo(root / "initech/f.git/HEAD")
    os.mkfifo(root / "initech/g.git")
    started = time.monotonic()
    assert "does not appear" in refused(git, root, "initech/f")
    assert "does not appear" in refused(git, root, "initech/g")
    assert time.monotonic() - started < 5


# -- hg ---------------------------------------------------------------------------------------------------------
def hg_share(source, dest, relative=False):
    subprocess.run(["hg", "--config", "extensions.share=", "share", "-q", "-U"] + (["--relative"] if relative else [])
                   + [str(source), str(dest)], check=True)


def test_hg_plain_and_share_inside(root):
    harness.make_hg_repo(str(root), "initech/h")
    assert hg(root, "initech/h") == ["hg", "-R", real(root / "initech/h"), "serve", "--stdio"]
    hg_share(root / "initech/h", root / "initech/shared")
    hg_share(root / "initech/h", root / "initech/relshared", relative=True)
    assert hg(root, "initech/shared")[2] == real(root / "initech/shared")
    assert hg(root, "initech/relshared")[2] == real(root / "initech/relshared")


def test_hg_dot_hg_symlink_to_other_account(root):
    (root / "initech/h").mkdir()
    os.symlink(root / "umbrella/hgsecret/.hg", root / "initech/h/.hg")
    assert refused(hg, root, "initech/h") == DENIED


def test_hg_repo_symlink_to_other_account(root):
    os.symlink(root / "umbrella/hgsecret", root / "initech/h")
    assert refused(hg, root, "initech/h") == DENIED


@pytest.mark.parametrize("relative", [False, True])
def test_hg_share_of_other_account(root, relative):
    hg_share(root / "umbrella/hgsecret", root / "initech/h", relative=relative)
    assert refused(hg, root, "initech/h") == DENIED


def test_hg_sharedpath_read_as_cwd_relative(root):
    # `shared` (not relshared) with a relative path: hg resolves it from its cwd, repo_root
    harness.make_hg_repo(str(root), "initech/h")
    (root / "initech/h/.hg/sharedpath").write_text("umbrella/hgsecret/.hg")
    with open(root / "initech/h/.hg/requires", "a") as f:
        f.write("shared\n")
    assert refused(hg, root, "initech/h") == DENIED


def test_hg_store_symlink_to_other_account(root):
    harness.make_hg_repo(str(root), "initech/h")
    os.rename(root / "initech/h/.hg/store", root / "initech/h/.hg/store.orig")
    os.symlink(root / "umbrella/hgsecret/.hg/store", root / "initech/h/.hg/store")
    assert refused(hg, root, "initech/h") == DENIED
