"""Local backend: find a repository the way git or hg will, check every path they will use, build the argv.

The policy (commands.py) only vouches for the literal path. git's `enter_repo()` (path.c) then tries `P/.git`, `P`,
`P.git/.git` and `P.git`, follows a gitfile (`gitdir: X`), and inside the git dir follows `commondir` and
`objects/info/alternates`; hg opens `P/.hg`, whose `sharedpath` (hg share) names another repository's `.hg` and store.
A link in an account's folder on any of those steps would hand another account's repository to the client, so
`resolve()` walks the same steps without following anything it has not checked, and requires the real path of:

- each candidate git looks at, up to the one it enters, and the gitfile target;
- in the git dir it enters and its common dir: `commondir`, HEAD, objects, refs, packed-refs, logs, and each
  alternate object store (recursively); hooks and config are the operator's and are not checked;
- `.hg`, `.hg/requires`, `.hg/sharedpath` (read as hg reads it: relative to `.hg` for `relshared`, as it is for
  `shared`) and the store in use;

to be inside realpath(repo_root)/<account>/ (an account folder that is itself a link is refused). A named target is
checked before its existence, so the answer tells nothing about other accounts' folders. The child then gets the
resolved real path: `git upload-pack --strict`, so git does no DWIM of its own; receive-pack and upload-archive have
no --strict, so what their DWIM could reach from the path passed is checked too. No file outside the account's
folder is opened.

A repository that is not there gets the VCS's own wording ("... does not appear to be a git repository"), as from
the SSH backend; an escape gets "repository not found or access denied". That difference only says whether the
client's own folder holds something at that path.

TOCTOU: this is check-then-use. git and hg take a path, not a directory fd, so a component swapped for a link
between the check and the child's chdir is followed. Who can swap one: the operator and their tools (aliases,
migrations, hg share); clients write only through a push, and into a bare git repository receive-pack writes
objects, refs and logs as regular files, and `hg serve` writes the store without updating a working copy, so neither
can create a link. Not covered: a non-bare repository with receive.denyCurrentBranch=updateInstead, or a hook that
checks out a working tree: the push then checks out the client's symlinks (git 2.39 checked out a pushed link to
/etc/passwd), and the client can race this check. Keep such working trees out of repo_root. Links deeper inside a
repository (objects/pack, hgrc %include, ...) are the operator's and are not checked.
"""
import os
import stat

from .commands import GIT_VERBS
from .errors import CommandRejected

DENIED = "repository not found or access denied"
GIT_SUFFIXES = ("/.git", "", ".git/.git", ".git")     # enter_repo()'s order
GIT_DATA = ("commondir", "HEAD", "objects", "refs", "packed-refs", "logs")
MAX_READ = 1 << 20                                     # read_gitfile_gently's limit; ample for the others
MAX_ALTERNATES_DEPTH = 6                               # git stops at 5; checking one more level costs nothing


def resolve(repo_root, parsed):
    """Return the argv for `parsed` (run with cwd=repo_root), the repository path resolved and checked.

    Raise CommandRejected when git or hg would use a path outside the account's folder, or when there is no
    repository at that path."""
    guard = _Guard(repo_root, parsed.repo.split("/", 1)[0])
    path = os.path.join(guard.root, parsed.repo)
    guard.check(os.path.dirname(path), folder_ok=True)
    if parsed.vcs == "git" and parsed.verb in GIT_VERBS:
        gitdir = _git_repo(guard, path)
        if gitdir is None:
            raise CommandRejected("'%s' does not appear to be a git repository" % parsed.repo)
        if parsed.verb == "upload-pack":
            return ["git", "upload-pack", "--strict", gitdir]
        # No --strict: enter_repo(gitdir) tries gitdir/.git first (which must not exist), then gitdir, then, should
        # git not take gitdir for a git dir after all, the ".git" forms: check those as a repository of their own.
        if os.path.lexists(gitdir + "/.git"):
            raise CommandRejected(DENIED)
        _git_repo(guard, gitdir + ".git")
        return ["git", parsed.verb, gitdir]
    if parsed.vcs == "hg" and parsed.verb == "serve":
        repo = _hg_repo(guard, path)
        if repo is None:
            raise CommandRejected("repository %s not found" % parsed.repo)
        return ["hg", "-R", repo, "serve", "--stdio"]
    raise CommandRejected(DENIED)


class _Guard:
    def __init__(self, repo_root, account):
        self.root = os.path.realpath(repo_root)
        self.folder = os.path.join(self.root, account)

    def check(self, path, folder_ok=False):
        """Return realpath(path) if it is inside the account's folder, else refuse."""
        real = os.path.realpath(path)
        if not (real.startswith(self.folder + os.sep) or (folder_ok and real == self.folder)):
            raise CommandRejected(DENIED)
        return real


# -- git --------------------------------------------------------------------------------------------------------
def _git_repo(guard, path):
    """The real git dir enter_repo(path, 0) would enter, or None. Each candidate git looks at is checked."""
    for suffix in GIT_SUFFIXES:
        candidate = path + suffix
        if not os.path.lexists(candidate):
            continue
        real = guard.check(candidate)
        if os.path.isfile(real):        # enter_repo stops at a regular file: a gitfile, or git dies
            target = _gitfile_target(candidate, real)
            if target is None:
                return None
            gitdir = guard.check(target)
            break
        if os.path.isdir(real) and _is_git_dir(guard, real):
            gitdir = real
            break
    else:
        return None
    if not os.path.isdir(gitdir) or not _is_git_dir(guard, gitdir):
        return None
    common = _common_dir(guard, gitdir)
    for d in {gitdir, common}:
        for name in GIT_DATA:
            p = os.path.join(d, name)
            if os.path.lexists(p):
                guard.check(p)
    _check_alternates(guard, os.path.join(common, "objects"), 0, set())
    return gitdir


def _gitfile_target(candidate, real):
    """read_gitfile_gently: 'gitdir: X', X relative to the gitfile's folder as named; None if not a gitfile."""
    data = _read(real)
    if data is None or not data.startswith(b"gitdir: "):
        return None
    target = os.fsdecode(data[8:].rstrip(b"\r\n"))
    if not target or "\0" in target:
        return None
    return os.path.join(os.path.dirname(candidate), target)


def _is_git_dir(guard, d):
    """is_git_directory: a valid HEAD, and objects/ and refs/ in the common dir. Reads only checked files."""
    head = os.path.join(d, "HEAD")
    if not os.path.lexists(head):
        return False
    guard.check(head)
    if os.path.islink(head):
        if not os.readlink(head).startswith("refs/"):
            return False
    else:
        data = _read(head, 256)
        if data is None or len(data) < 4:
            return False
        if data.startswith(b"ref:"):
            if not data[4:].lstrip().startswith(b"refs/"):
                return False
        elif not (_is_hex_oid(data[:64]) or _is_hex_oid(data[:40])):
            return False
    common = _common_dir(guard, d)
    return all(os.access(os.path.join(common, name), os.X_OK) for name in ("objects", "refs"))


def _common_dir(guard, gitdir):
    """get_common_dir_noenv: `commondir` names the shared part of a worktree's git dir (relative to gitdir)."""
    p = os.path.join(gitdir, "commondir")
    if not os.path.lexists(p):
        return gitdir
    data = _read(guard.check(p))
    target = os.fsdecode(data.rstrip(b"\r\n")) if data else ""
    if not target or "\0" in target:
        return gitdir
    return guard.check(os.path.join(gitdir, target))


def _check_alternates(guard, objdir, depth, seen):
    """objects/info/alternates: one object store per line, relative ones to the real objects dir, recursively."""
    p = os.path.join(objdir, "info", "alternates")
    if depth > MAX_ALTERNATES_DEPTH or not os.path.lexists(p):
        return
    data = _read(guard.check(p)) or b""
    base = os.path.realpath(objdir)
    for line in data.split(b"\n"):
        if not line or line.startswith(b"#"):
            continue
        if line.startswith(b'"') or b"\0" in line:     # C-quoted entries are not worth unquoting here
            raise CommandRejected(DENIED)
        entry = os.path.normpath(os.path.join(base, os.fsdecode(line)))    # git: realpath(base) + lexical
        real = guard.check(entry)
        if real not in seen:
            seen.add(real)
            _check_alternates(guard, real, depth + 1, seen)


def _is_hex_oid(b):
    return len(b) in (40, 64) and all(c in b"0123456789abcdefABCDEF" for c in b)


# -- hg ---------------------------------------------------------------------------------------------------------
def _hg_repo(guard, path):
    """The real path hg -R path would open, or None; `.hg`, its sharedpath and the store are checked."""
    if not os.path.lexists(path):
        return None
    repo = guard.check(path)
    hgdir = os.path.join(repo, ".hg")
    if not os.path.isdir(repo) or not os.path.lexists(hgdir):
        return None      # a file would be opened as a bundle: not a repository here
    real_hg = guard.check(hgdir)
    if not os.path.isdir(real_hg):
        return None
    store = os.path.join(hgdir, "store")
    requires = _hg_requires(guard, hgdir)
    if "shared" in requires or "relshared" in requires:
        sharedpath = os.path.join(hgdir, "sharedpath")
        if not os.path.lexists(sharedpath):
            return None
        data = _read(guard.check(sharedpath))
        target = os.fsdecode(data.rstrip(b"\n")) if data else ""
        if not target or "\0" in target:
            return None
        # localrepo._getsharedvfs: relshared is relative to .hg, joined then normalised; shared is used as it is
        # (absolute, or relative to the cwd, which is repo_root)
        if "relshared" in requires:
            source = os.path.normpath(os.path.join(hgdir, target))
        else:
            source = os.path.join(guard.root, target)
        store = os.path.join(guard.check(source), "store")
    if os.path.lexists(store):
        guard.check(store)
    return repo


def _hg_requires(guard, hgdir):
    p = os.path.join(hgdir, "requires")
    if not os.path.lexists(p):
        return set()
    return set(os.fsdecode(_read(guard.check(p)) or b"").split())


def _read(path, limit=MAX_READ):
    """The bytes of a regular file no bigger than limit, else None (never raises, never blocks on a FIFO)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > limit:
            return None
        return os.read(fd, limit)
    except OSError:
        return None
    finally:
        os.close(fd)
