"""The service version string: <major>.<minor>.<commit count>-<sha10>-<YYYYMMDD>.<HHMMSS>.

A build step (`make version`, i.e. `python kilnproxy.py version --stamp`) writes it into
`_version_stamp.py`; an unstamped checkout computes the same form from git, or reports 0.0.0-dev.
"""
import os
import subprocess
import time

MAJOR_MINOR = "0.1"
UNKNOWN = "0.0.0-dev"
_STAMP_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_version_stamp.py")


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
        with open(_STAMP_FILE, encoding="utf-8") as f:
            for line in f:
                if line.startswith("VERSION = "):
                    return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    return None


def write_stamp(version):
    with open(_STAMP_FILE, "w", encoding="utf-8") as f:
        f.write('"""Written by the build step; do not edit."""\nVERSION = "%s"\n' % version)


def project_root():
    return os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def current():
    """The stamped version, else the one git computes, else 0.0.0-dev."""
    return read_stamp() or from_git(project_root()) or UNKNOWN
