"""The service version string: <major>.<minor>.<commit count>-<sha10>-<YYYYMMDD>.<HHMMSS>.

A build step (`make version`, i.e. `python kilnproxy.py version --stamp`, or `make dist` into the copy it packs)
writes it into `_version_stamp.py`; an unstamped checkout computes the same form from git, or reports 0.0.0-dev.
The stamp is read as a package resource (importlib.resources), so that it is found inside dist/kilnproxy.pyz too.
"""
import importlib.resources
import os
import subprocess
import time

MAJOR_MINOR = "0.1"
UNKNOWN = "0.0.0-dev"
STAMP_NAME = "_version_stamp.py"
_STAMP_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), STAMP_NAME)   # where a checkout's stamp goes
_STAMP_RESOURCE = True      # read the stamp as this package's resource; tests set False to read _STAMP_FILE


def format_version(commit_count, sha, epoch):
    stamp = time.strftime("%Y%m%d.%H%M%S", time.gmtime(epoch))
    return "%s.%d-%s-%s" % (MAJOR_MINOR, commit_count, sha[:10], stamp)


def from_git(repo_dir):
    """The version computed from the checkout at repo_dir, or None when git cannot tell."""
    try:
        out = subprocess.run(
            ["git", "-C", repo_dir, "log", "-1", "--format=%H %ct"],
            capture_output=True, text=True, timeout=10, check=True).stdout.split()
        count = subprocess.run(
            ["git", "-C", repo_dir, "rev-list", "--count", "HEAD"],
            capture_output=True, text=True, timeout=10, check=True).stdout.strip()
        return format_version(int(count), out[0], int(out[1]))
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def read_stamp():
    try:
        if _STAMP_RESOURCE:
            text = importlib.resources.files(__package__).joinpath(STAMP_NAME).read_text(encoding="utf-8")
        else:
            with open(_STAMP_FILE, encoding="utf-8") as f:
                text = f.read()
    except (OSError, UnicodeDecodeError):
        return None
    for line in text.splitlines():
        if line.startswith("VERSION = "):
            return line.split("=", 1)[1].strip().strip('"')
    return None


def write_stamp(version, path=None):
    """Write the stamp into this checkout's package (or into `path`: the build's copy of it)."""
    with open(path or _STAMP_FILE, "w", encoding="utf-8") as f:
        f.write('"""Written by the build step; do not edit."""\nVERSION = "%s"\n' % version)


def project_root():
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def current():
    """The stamped version, else the one git computes, else 0.0.0-dev."""
    return read_stamp() or from_git(project_root()) or UNKNOWN
