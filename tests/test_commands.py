"""Command policy (lib/kiln/commands.py): the allowed exec forms, path rules and the rebuilt backend command."""
import os
import shlex
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

import pytest  # noqa: E402
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kiln import commands  # noqa: E402
from kiln.errors import CommandRejected  # noqa: E402

ACCOUNT = "alice"
GIT_VERBS = ("upload-pack", "receive-pack", "upload-archive")


def parse(command, account=ACCOUNT):
    return commands.parse(command, account)


def reject(command, account=ACCOUNT):
    with pytest.raises(CommandRejected) as info:
        commands.parse(command, account)
    message = str(info.value)
    # the message goes to the client on one stderr line
    assert message and "\n" not in message and "\r" not in message
    return message


def backend_words(cmd):
    """The words an SSH backend must see for a parsed command (argv, with git's verb spelled git-<verb>)."""
    if cmd.vcs == "git":
        return ["git-" + cmd.verb, cmd.repo]
    return list(cmd.argv)


def check_invariants(cmd, account):
    parts = cmd.repo.split("/")
    assert parts[0] == account
    assert len(parts) >= 2
    for part in parts:
        assert part, cmd.repo
        assert part != ".."
        assert not part.startswith((".", "-")), cmd.repo
        assert all(c.isascii() and (c.isalnum() or c in "._-") for c in part), cmd.repo
    assert not cmd.repo.startswith("/")
    if cmd.vcs == "git":
        assert cmd.verb in GIT_VERBS
        assert cmd.argv == ["git", cmd.verb, cmd.repo]
    else:
        assert (cmd.vcs, cmd.verb) == ("hg", "serve")
        assert cmd.argv == ["hg", "-R", cmd.repo, "serve", "--stdio"]
    assert shlex.split(cmd.backend_command) == backend_words(cmd)
    assert not any(c in cmd.backend_command for c in "\n\r\0")


# ---------------------------------------------------------------------------------------------------------------
# Allowed forms


@pytest.mark.parametrize("command, vcs, verb, repo, argv, backend", [
    ("git-upload-pack 'alice/project.git'", "git", "upload-pack", "alice/project.git",
     ["git", "upload-pack", "alice/project.git"], "git-upload-pack 'alice/project.git'"),
    ("git-receive-pack 'alice/project.git'", "git", "receive-pack", "alice/project.git",
     ["git", "receive-pack", "alice/project.git"], "git-receive-pack 'alice/project.git'"),
    ("git-upload-archive 'alice/project.git'", "git", "upload-archive", "alice/project.git",
     ["git", "upload-archive", "alice/project.git"], "git-upload-archive 'alice/project.git'"),
    ("git upload-pack 'alice/project.git'", "git", "upload-pack", "alice/project.git",
     ["git", "upload-pack", "alice/project.git"], "git-upload-pack 'alice/project.git'"),
    ("git receive-pack 'alice/project.git'", "git", "receive-pack", "alice/project.git",
     ["git", "receive-pack", "alice/project.git"], "git-receive-pack 'alice/project.git'"),
    ("git upload-archive 'alice/project.git'", "git", "upload-archive", "alice/project.git",
     ["git", "upload-archive", "alice/project.git"], "git-upload-archive 'alice/project.git'"),
    ("hg -R alice/project serve --stdio", "hg", "serve", "alice/project",
     ["hg", "-R", "alice/project", "serve", "--stdio"], "hg -R alice/project serve --stdio"),
    # what git and hg clients send when the URL has an absolute path
    ("git-upload-pack '/alice/project.git'", "git", "upload-pack", "alice/project.git",
     ["git", "upload-pack", "alice/project.git"], "git-upload-pack 'alice/project.git'"),
    ("hg -R /alice/project serve --stdio", "hg", "serve", "alice/project",
     ["hg", "-R", "alice/project", "serve", "--stdio"], "hg -R alice/project serve --stdio"),
    # other quotings of the same path
    ("git-upload-pack alice/project.git", "git", "upload-pack", "alice/project.git",
     ["git", "upload-pack", "alice/project.git"], "git-upload-pack 'alice/project.git'"),
    ('git-upload-pack "alice/project.git"', "git", "upload-pack", "alice/project.git",
     ["git", "upload-pack", "alice/project.git"], "git-upload-pack 'alice/project.git'"),
    ("hg -R 'alice/project' serve --stdio", "hg", "serve", "alice/project",
     ["hg", "-R", "alice/project", "serve", "--stdio"], "hg -R alice/project serve --stdio"),
    # nested folders, every allowed character
    ("git-upload-pack 'alice/group/sub/Re_po-1.2.git'", "git", "upload-pack", "alice/group/sub/Re_po-1.2.git",
     ["git", "upload-pack", "alice/group/sub/Re_po-1.2.git"], "git-upload-pack 'alice/group/sub/Re_po-1.2.git'"),
    ("git-upload-pack 'alice/_private'", "git", "upload-pack", "alice/_private",
     ["git", "upload-pack", "alice/_private"], "git-upload-pack 'alice/_private'"),
    ("git-upload-pack 'alice/a..b'", "git", "upload-pack", "alice/a..b",
     ["git", "upload-pack", "alice/a..b"], "git-upload-pack 'alice/a..b'"),
    # extra blanks between words are not significant
    ("  git-upload-pack \t 'alice/project.git'  ", "git", "upload-pack", "alice/project.git",
     ["git", "upload-pack", "alice/project.git"], "git-upload-pack 'alice/project.git'"),
], ids=[
    "git-upload-pack", "git-receive-pack", "git-upload-archive", "git upload-pack", "git receive-pack",
    "git upload-archive", "hg", "git leading slash", "hg leading slash", "git bare path", "git double quotes",
    "hg quoted path", "nested", "underscore start", "dots inside", "extra blanks"])
def test_allowed_forms(command, vcs, verb, repo, argv, backend):
    cmd = parse(command)
    assert (cmd.vcs, cmd.verb, cmd.repo, cmd.argv, cmd.backend_command) == (vcs, verb, repo, argv, backend)
    check_invariants(cmd, ACCOUNT)


def test_bytes_command_is_decoded():
    cmd = parse(b"git-receive-pack '/alice/project.git'")
    assert cmd.repo == "alice/project.git"
    assert cmd.backend_command == "git-receive-pack 'alice/project.git'"


def test_interface_examples_of_the_backend_command():
    """interface.md: `git-upload-pack 'initech/project.git'` and `hg -R initech/project serve --stdio`."""
    assert commands.parse("git-upload-pack '/initech/project.git'", "initech").backend_command == \
        "git-upload-pack 'initech/project.git'"
    assert commands.parse("git upload-pack 'initech/project.git'", "initech").backend_command == \
        "git-upload-pack 'initech/project.git'"
    assert commands.parse("hg -R /initech/project serve --stdio", "initech").backend_command == \
        "hg -R initech/project serve --stdio"


def test_backend_command_quotes_as_shlex_quote_does():
    for command in ("git-upload-pack 'alice/x.git'", "git receive-pack alice/a/b/c", "git-upload-archive alice/r"):
        cmd = parse(command)
        quoted = "'%s'" % cmd.repo  # shlex.quote's quoting form; the path never holds a quote itself
        assert cmd.backend_command == "git-%s %s" % (cmd.verb, quoted)
        assert shlex.split(cmd.backend_command) == ["git-" + cmd.verb, cmd.repo]
    cmd = parse("hg -R /alice/x serve --stdio")
    assert cmd.backend_command == "hg -R %s serve --stdio" % shlex.quote("alice/x")


def test_leading_slash_removed_only_once():
    assert parse("git-upload-pack '/alice/r'").repo == "alice/r"
    reject("git-upload-pack '//alice/r'")
    reject("hg -R //alice/r serve --stdio")


def test_account_is_compared_exactly():
    assert commands.parse("git-upload-pack 'Bob.Smith-2/r'", "Bob.Smith-2").repo == "Bob.Smith-2/r"
    reject("git-upload-pack 'bob.smith-2/r'", "Bob.Smith-2")
    reject("git-upload-pack 'Alice/r'")
    reject("git-upload-pack 'alice2/r'")
    reject("git-upload-pack 'alic/r'")


# ---------------------------------------------------------------------------------------------------------------
# Rejections (account "alice")

REJECTED = {
    # another account, or no repository under the account
    "other account": "git-upload-pack 'bob/project.git'",
    "other account, hg": "hg -R bob/project serve --stdio",
    "other account, slash": "git-receive-pack '/bob/project.git'",
    "account only": "git-upload-pack 'alice'",
    "account only, slash": "git-upload-pack '/alice'",
    "account only, trailing slash": "git-upload-pack 'alice/'",
    "root": "git-upload-pack '/'",
    "empty path": "git-upload-pack ''",
    "missing path": "git-upload-pack",
    "missing path, hg": "hg -R serve --stdio",
    # traversal and hidden or option-like components
    "dotdot": "git-upload-pack 'alice/../bob/project.git'",
    "dotdot last": "git-upload-pack 'alice/project/..'",
    "dotdot first": "git-upload-pack '../alice/project'",
    "dotdot hg": "hg -R alice/../bob/project serve --stdio",
    "dot": "git-upload-pack 'alice/./project'",
    "dot first": "git-upload-pack './alice/project'",
    "hidden component": "git-upload-pack 'alice/.hidden'",
    "dot git": "git-upload-pack 'alice/project/.git'",
    "dash component": "git-upload-pack 'alice/-project'",
    "dash account": "git-upload-pack '-alice/project'",
    "option as path": "git-upload-pack '--upload-pack=touch /tmp/pwned'",
    "option as component": "git-upload-pack 'alice/--upload-pack=id'",
    "trailing slash": "git-upload-pack 'alice/project.git/'",
    "double slash": "git-upload-pack 'alice//project.git'",
    "double leading slash": "git-upload-pack '//alice/project.git'",
    "backslash": "git-upload-pack 'alice/pro\\\\ject'",
    "space in path": "git-upload-pack 'alice/my project'",
    "tilde": "git-upload-pack '~alice/project'",
    "non-ascii letter": "git-upload-pack 'alice/pr\u00f6ject'",
    "fullwidth digit": "git-upload-pack 'alice/\uff11'",
    "no-break space": "git-upload-pack 'alice/a\u00a0b'",
    "too long component": "git-upload-pack 'alice/%s'" % ("a" * 256),
    "too long path": "git-upload-pack 'alice/%s'" % "/".join(["a" * 200] * 6),
    "too long command": "git-upload-pack 'alice/%s'" % ("a" * 5000),
    # control characters
    "newline at end": "git-upload-pack 'alice/project.git'\n",
    "newline then command": "git-upload-pack 'alice/project.git'\nrm -rf /",
    "newline in path": "git-upload-pack 'alice/pro\nject.git'",
    "newline in hg path": "hg -R 'alice/project\n' serve --stdio",
    "carriage return": "git-upload-pack 'alice/project.git'\r",
    "carriage return in path": "git-upload-pack 'alice/pro\rject'",
    "nul": "git-upload-pack 'alice/project.git'\0",
    "nul in path": "git-upload-pack 'alice/pro\0ject'",
    "escape char": "git-upload-pack 'alice/pro\x1bject'",
    # option injection
    "git option before path": "git-upload-pack --upload-pack=touch 'alice/project.git'",
    "git option after verb": "git upload-pack --upload-pack='touch /tmp/x' 'alice/project.git'",
    "git -c sshCommand": "git -c core.sshCommand=touch upload-pack 'alice/project.git'",
    "git -c glued": "git -ccore.sshCommand=touch upload-pack 'alice/project.git'",
    "git --exec-path": "git --exec-path=/tmp upload-pack 'alice/project.git'",
    "git -C": "git -C /tmp upload-pack 'alice/project.git'",
    "option after path": "git-upload-pack 'alice/project.git' --upload-pack=id",
    "strict option": "git-upload-pack --strict 'alice/project.git'",
    # Mercurial: exactly `hg -R P serve --stdio`
    "hg --debugger last": "hg -R alice/project serve --stdio --debugger",
    "hg --debugger first": "hg --debugger -R alice/project serve --stdio",
    "hg --debugger middle": "hg -R alice/project --debugger serve --stdio",
    "hg --debugger as path": "hg -R --debugger serve --stdio",
    "hg --config": "hg --config=ui.foo=bar -R alice/project serve --stdio",
    "hg -R glued": "hg -Ralice/project serve --stdio",
    "hg --repository": "hg --repository alice/project serve --stdio",
    "hg --cwd": "hg --cwd alice -R project serve --stdio",
    "hg no --stdio": "hg -R alice/project serve",
    "hg --stdio first": "hg -R alice/project --stdio serve",
    "hg extra arg": "hg -R alice/project serve --stdio extra",
    "hg serve --daemon": "hg -R alice/project serve --daemon",
    "hg init": "hg init alice/project",
    "hg clone": "hg clone alice/project",
    "hg alone": "hg",
    # extra arguments
    "extra arg": "git-upload-pack 'alice/project.git' extra",
    "two paths": "git-upload-pack 'alice/a.git' 'alice/b.git'",
    "git extra arg": "git upload-pack 'alice/project.git' extra",
    # unbalanced quotes and shell syntax (shlex, never a shell)
    "unbalanced single": "git-upload-pack 'alice/project.git",
    "unbalanced double": 'git-upload-pack "alice/project.git',
    "trailing backslash": "git-upload-pack alice/project.git\\",
    "semicolon": "git-upload-pack 'alice/project.git'; id",
    "and-and": "git-upload-pack 'alice/project.git' && id",
    "pipe": "git-upload-pack 'alice/project.git' | id",
    "pipe in path": "git-upload-pack 'alice/project.git|id'",
    "subshell": "git-upload-pack $(id)",
    "backticks": "git-upload-pack `id`",
    "redirect": "git-upload-pack 'alice/project.git' > /tmp/x",
    "glob": "git-upload-pack 'alice/*'",
    "dollar var": "git-upload-pack alice/$HOME",
    # verbs not allowed
    "shell": "sh -c 'git-upload-pack alice/project.git'",
    "bash": "bash",
    "git-shell": "git-shell -c \"git-upload-pack 'alice/project.git'\"",
    "unknown git verb": "git-http-backend 'alice/project.git'",
    "git verb suffix": "git-upload-packx 'alice/project.git'",
    "git verb prefix": "xgit-upload-pack 'alice/project.git'",
    "git bare verb": "git upload-pack",
    "git other verb": "git config 'alice/project.git'",
    "git-dash verb spaced": "git- upload-pack 'alice/project.git'",
    "absolute git": "/usr/bin/git-upload-pack 'alice/project.git'",
    "upper case verb": "GIT-UPLOAD-PACK 'alice/project.git'",
    "scp": "scp -t alice/project.git",
    "rsync": "rsync --server . alice/",
    "git alone": "git",
    # empty
    "empty": "",
    "blank": "   ",
    "tab only": "\t",
}


@pytest.mark.parametrize("command", list(REJECTED.values()), ids=list(REJECTED.keys()))
def test_rejected(command):
    reject(command)


@pytest.mark.parametrize("command", [
    b"git-upload-pack 'alice/\xff'",
    b"git-upload-pack 'alice/proj\xc3'",
    b"\xfe\xffgit-upload-pack 'alice/x'",
    b"git-upload-pack 'alice/\xed\xa0\x80'",  # an encoded surrogate is not UTF-8 either
], ids=["ff", "truncated-sequence", "bom-like", "surrogate"])
def test_non_utf8_bytes_rejected(command):
    assert "UTF-8" in reject(command)


def test_empty_bytes_and_none_rejected():
    reject(b"")
    reject(None)


def test_other_account_message_does_not_tell_existence():
    """A stranger's repository and a missing one read the same to the client."""
    assert reject("git-upload-pack 'bob/project.git'") == reject("git-upload-pack 'alice2/nothing.git'")


def _path_of_length(n):
    """'alice/' followed by components of at most 255 characters, n characters in all."""
    path = "alice/"
    while len(path) < n:
        room = n - len(path)
        take = min(255, room)
        if room - take == 1:  # never leave room for just a '/'
            take -= 1
        path += "a" * take
        if len(path) < n:
            path += "/"
    assert len(path) == n
    return path


def test_length_limits():
    longest = _path_of_length(commands.MAX_PATH)
    assert parse("git-upload-pack '%s'" % longest).repo == longest
    assert "too long" in reject("git-upload-pack '%s'" % _path_of_length(commands.MAX_PATH + 1))
    assert parse("git-upload-pack 'alice/%s'" % ("c" * 255)).repo == "alice/" + "c" * 255
    reject("git-upload-pack 'alice/%s'" % ("c" * 256))
    assert "too long" in reject("x" * (commands.MAX_COMMAND + 1))
    assert "too long" in reject(b"x" * (commands.MAX_COMMAND + 1))
    assert "too long" in reject("git-upload-pack 'alice/x'" + " " * commands.MAX_COMMAND)


# ---------------------------------------------------------------------------------------------------------------
# check_repo_path on its own


@pytest.mark.parametrize("path", [
    "alice/project\n", "alice/project\r", "alice\n/project", "alice/\nproject", "alice/pro\0ject", "alice/project ",
])
def test_check_repo_path_rejects_control_and_blank_characters(path):
    with pytest.raises(CommandRejected):
        commands.check_repo_path(path, ACCOUNT)


def test_check_repo_path_normalises_and_rejects_non_strings():
    assert commands.check_repo_path("/alice/x/y", ACCOUNT) == "alice/x/y"
    for bad in (None, b"alice/x", 5, "", "/"):
        with pytest.raises(CommandRejected):
            commands.check_repo_path(bad, ACCOUNT)


# ---------------------------------------------------------------------------------------------------------------
# GIT_PROTOCOL


@pytest.mark.parametrize("value, expected", [
    ("version=2", "version=2"),
    ("version=1", "version=1"),
    (b"version=2", "version=2"),
    ("version=2:object-format=sha256", "version=2:object-format=sha256"),
    ("version=2:agent=git/2.39.5", None),  # '/' is outside the allowed set
    ("", None),
    (b"", None),
    ("version=2\n", None),
    ("version=2\nX=1", None),
    ("version=2\r", None),
    ("version=2\0", None),
    ("version=2;id", None),
    ("version=2 ", None),
    ("version 2", None),
    ("$(id)", None),
    (":version=2", None),
    ("version=2:", None),
    ("version=2::x", None),
    ("v\u00e9rsion=2", None),
    (b"version=\xff", None),
    ("a" * 257, None),
    (None, None),
    (2, None),
])
def test_check_git_protocol(value, expected):
    assert commands.check_git_protocol(value) == expected


def test_check_git_protocol_length_limit():
    assert commands.check_git_protocol("a" * 256) == "a" * 256
    assert commands.check_git_protocol("a" * 257) is None


@settings(deadline=None)
@given(st.one_of(st.text(max_size=300), st.binary(max_size=300), st.none(), st.integers()))
def test_check_git_protocol_property(value):
    result = commands.check_git_protocol(value)
    if result is not None:
        assert isinstance(result, str) and 0 < len(result) <= 256
        assert all(c.isascii() and (c.isalnum() or c in "._=-:") for c in result)
        assert not result.startswith(":") and not result.endswith(":") and "::" not in result


# ---------------------------------------------------------------------------------------------------------------
# Properties

COMPONENT = st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,20}", fullmatch=True)
ACCOUNTS = st.one_of(st.sampled_from(["alice", "bob", "a", "_x", "a.b-c"]), COMPONENT, st.text(max_size=10))

# pieces that a hostile or confused client might glue together; most combinations must be rejected
PIECES = st.one_of(
    st.sampled_from([
        "git-upload-pack", "git-receive-pack", "git-upload-archive", "git", "upload-pack", "receive-pack", "hg",
        "-R", "serve", "--stdio", "--debugger", "--upload-pack=id", "-c", "core.sshCommand=id", " ", "  ", "\t",
        "'", '"', "\\", "/", "//", "..", ".", "-", "alice", "bob", "alice/", "/alice/", "alice/repo", "x.git",
        "\n", "\r", "\0", ";", "$(id)", "`", "*", "~", "\u00e9", "#",
    ]),
    COMPONENT,
)
STRUCTURED = st.lists(PIECES, max_size=12).map("".join)


def _check_parse_result(command, account):
    try:
        cmd = commands.parse(command, account)
    except CommandRejected as e:
        assert str(e)
        return None
    check_invariants(cmd, account)
    return cmd


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(st.text(max_size=200), st.binary(max_size=200), STRUCTURED), ACCOUNTS)
def test_parse_never_breaks_its_rules(command, account):
    _check_parse_result(command, account)


BAD_COMPONENTS = st.sampled_from(["..", ".", "-x", "--upload-pack=id", ".git", "", "a b", "x\n", "x'y", "\u00e9"])


@st.composite
def near_valid_commands(draw):
    """A valid command for alice or bob, then (half the time) damaged in a few places."""
    damaged = draw(st.booleans())
    parts = [draw(st.sampled_from(["alice", "bob"]))] + draw(st.lists(COMPONENT, min_size=1, max_size=3))
    lead, trail, quote, sep = "", "", "'%s'", " "
    if damaged:
        parts += draw(st.lists(st.one_of(COMPONENT, BAD_COMPONENTS), max_size=2))
        for _ in range(draw(st.integers(0, 2))):
            parts.insert(draw(st.integers(0, len(parts))), draw(BAD_COMPONENTS))
        lead = draw(st.sampled_from(["", "/", "//", "./", "../"]))
        trail = draw(st.sampled_from(["", "/", "/.."]))
        quote = draw(st.sampled_from(["'%s'", '"%s"', "%s", "'%s", "%s'", "'%s\\'"]))
        sep = draw(st.sampled_from([" ", "\t", "", "\n", " ; "]))
    path = quote % (lead + "/".join(parts) + trail)
    form = draw(st.sampled_from(["git-dash", "git-space", "hg"]))
    verb = draw(st.sampled_from(GIT_VERBS))
    words = {"git-dash": ["git-" + verb, path], "git-space": ["git", verb, path],
             "hg": ["hg", "-R", path, "serve", "--stdio"]}[form]
    if damaged:
        for _ in range(draw(st.integers(0, 2))):
            words.insert(draw(st.integers(0, len(words))), draw(PIECES))
    return sep.join(words)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(STRUCTURED, near_valid_commands()), st.sampled_from(["alice", "bob"]))
def test_parse_never_breaks_its_rules_near_valid_commands(command, account):
    _check_parse_result(command, account)
    _check_parse_result(command.encode("utf-8"), account)


@st.composite
def valid_commands(draw):
    account = draw(COMPONENT)
    rest = draw(st.lists(COMPONENT, min_size=1, max_size=4))
    repo = "/".join([account] + rest)
    path = draw(st.sampled_from(["", "/"])) + repo
    quoting = draw(st.sampled_from(["'%s'", '"%s"', "%s"]))
    form = draw(st.sampled_from(["git-%s %s", "git %s %s", "hg"]))
    verb = draw(st.sampled_from(GIT_VERBS))
    if form == "hg":
        command = "hg -R %s serve --stdio" % (quoting % path)
    else:
        command = form % (verb, quoting % path)
    return account, repo, form, verb, command


@settings(max_examples=200, deadline=None)
@given(valid_commands())
def test_valid_commands_are_accepted(case):
    account, repo, form, verb, command = case
    cmd = commands.parse(command, account)
    assert cmd.repo == repo
    check_invariants(cmd, account)
    if form == "hg":
        assert cmd.argv == ["hg", "-R", repo, "serve", "--stdio"]
        assert cmd.backend_command == "hg -R %s serve --stdio" % shlex.quote(repo)
    else:
        assert (cmd.vcs, cmd.verb) == ("git", verb)
        assert cmd.backend_command == "git-%s '%s'" % (verb, repo)
    # the rebuilt command parses back to itself
    again = commands.parse(cmd.backend_command, account)
    assert again == cmd
    # and nobody else may use it
    other = account + "x"
    with pytest.raises(CommandRejected):
        commands.parse(command, other)


@settings(deadline=None)
@given(st.text(max_size=300), ACCOUNTS)
def test_check_repo_path_property(path, account):
    try:
        repo = commands.check_repo_path(path, account)
    except CommandRejected:
        return
    assert repo.split("/")[0] == account
    assert repo == (path[1:] if path.startswith("/") else path)
    assert all(p and p != ".." and not p.startswith((".", "-")) for p in repo.split("/"))
