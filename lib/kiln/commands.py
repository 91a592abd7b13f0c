"""Command policy: which exec commands a client may run, on which repository (pure logic, no I/O).

The client's string is tokenised with shlex (never a shell), the verb allow-listed, the repository path checked
component by component, and the backend command rebuilt from the parsed parts with shlex.quote.
"""
import re
import shlex
from collections import namedtuple

from .errors import CommandRejected

GIT_VERBS = ("upload-pack", "receive-pack", "upload-archive")
# Used with fullmatch: a `$` anchor would also accept a trailing newline.
COMPONENT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,254}")
GIT_PROTOCOL_RE = re.compile(r"[A-Za-z0-9._=-]+(:[A-Za-z0-9._=-]+)*")
MAX_COMMAND = 4096
MAX_PATH = 1024

ParsedCommand = namedtuple("ParsedCommand", "vcs verb repo argv backend_command")
ParsedCommand.__doc__ = """vcs: 'git' or 'hg'; verb: 'upload-pack' .. or 'serve'; repo: normalised relative path;
argv: argument list for a local child; backend_command: the string an SSH backend execs."""


def check_repo_path(path, account):
    """Normalise and check a repository path; return it relative (no leading '/')."""
    if not isinstance(path, str) or not path:
        raise CommandRejected("missing repository path")
    if len(path) > MAX_PATH:
        raise CommandRejected("repository path too long")
    if path.startswith("/"):
        path = path[1:]
    parts = path.split("/")
    if len(parts) < 2:
        raise CommandRejected("repository path must be <account>/<repository>")
    for part in parts:
        if not COMPONENT_RE.fullmatch(part):
            raise CommandRejected("invalid repository path")
    if parts[0] != account:
        raise CommandRejected("repository not found or access denied")
    return "/".join(parts)


def parse(command, account):
    """Parse a client's exec request (str or bytes) for the given account; raise CommandRejected if not allowed."""
    if isinstance(command, bytes):
        try:
            command = command.decode("utf-8")
        except UnicodeDecodeError:
            raise CommandRejected("command is not valid UTF-8") from None
    if not isinstance(command, str) or not command.strip():
        raise CommandRejected("no command given; this server only runs git and hg")
    if len(command) > MAX_COMMAND:
        raise CommandRejected("command too long")
    if any(c in command for c in "\n\r\0"):
        raise CommandRejected("command contains a control character")
    try:
        words = shlex.split(command, comments=False, posix=True)
    except ValueError:
        raise CommandRejected("command is not well formed") from None
    if len(words) == 2 and words[0].startswith("git-") and words[0][4:] in GIT_VERBS:
        verb, path = words[0][4:], words[1]
    elif len(words) == 3 and words[0] == "git" and words[1] in GIT_VERBS:
        verb, path = words[1], words[2]
    elif len(words) == 5 and words[0] == "hg" and words[1] == "-R" and words[3:] == ["serve", "--stdio"]:
        repo = check_repo_path(words[2], account)
        return ParsedCommand("hg", "serve", repo, ["hg", "-R", repo, "serve", "--stdio"],
                             "hg -R %s serve --stdio" % shlex.quote(repo))
    else:
        raise CommandRejected("command not allowed; this server only runs git and hg")
    repo = check_repo_path(path, account)
    return ParsedCommand("git", verb, repo, ["git", verb, repo], "git-%s %s" % (verb, _git_quote(repo)))


def _git_quote(repo):
    """Single-quote the path the way git's ssh transport sends it (`git-upload-pack 'a/b.git'`).

    shlex.quote leaves a path of safe characters bare, but backends such as gitolite only accept the quoted form.
    check_repo_path allows no quote characters, so this is exactly what shlex.quote writes when it quotes.
    """
    return "'%s'" % repo if "'" not in repo else shlex.quote(repo)


def check_git_protocol(value):
    """Validate a GIT_PROTOCOL env value (e.g. 'version=2'); return it or None when unacceptable."""
    if isinstance(value, bytes):
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return None
    if not isinstance(value, str) or len(value) > 256 or not GIT_PROTOCOL_RE.fullmatch(value):
        return None
    return value
