"""Version strings (lib/kiln/version.py): the format, the git fallback and the build stamp."""
import calendar
import os
import re
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

import pytest  # noqa: E402

from kiln import version  # noqa: E402

VERSION_RE = re.compile(r"^\d+\.\d+\.\d+-[0-9a-f]{10}-\d{8}\.\d{6}$")
SHA = "b244a2b9b8c0ffee00112233445566778899aabb"


@pytest.fixture
def stamp_file(tmp_path, monkeypatch):
    """Point the stamp at a temporary file so the real lib/kiln/_version_stamp.py is never touched."""
    path = tmp_path / "_version_stamp.py"
    monkeypatch.setattr(version, "_STAMP_FILE", str(path))
    monkeypatch.setattr(version, "_STAMP_RESOURCE", False)
    return path


def test_format_version_example():
    epoch = calendar.timegm((2015, 2, 2, 16, 34, 49, 0, 0, 0))
    v = version.format_version(275, SHA, epoch)
    assert v == "%s.275-b244a2b9b8-20150202.163449" % version.MAJOR_MINOR
    assert VERSION_RE.match(v)


def test_format_version_is_utc_whatever_the_local_zone(monkeypatch):
    epoch = calendar.timegm((2015, 2, 2, 23, 59, 59, 0, 0, 0))
    monkeypatch.setenv("TZ", "Asia/Tokyo")
    time.tzset()
    try:
        assert version.format_version(1, SHA, epoch).endswith("-20150202.235959")
    finally:
        monkeypatch.undo()
        time.tzset()


@pytest.mark.parametrize("count, epoch", [(0, 0), (1, 1), (99999, 4102444799)])
def test_format_version_shape(count, epoch):
    v = version.format_version(count, SHA, epoch)
    assert VERSION_RE.match(v), v
    assert v.startswith(version.MAJOR_MINOR + ".%d-" % count)


def test_major_minor_form():
    assert re.match(r"^\d+\.\d+$", version.MAJOR_MINOR)
    assert version.UNKNOWN == "0.0.0-dev"


def _git(repo, *args, env=None):
    return subprocess.run(["git", "-C", str(repo)] + list(args), check=True, capture_output=True, text=True,
                          env=env, timeout=30).stdout.strip()


@pytest.fixture
def git_env(tmp_path, monkeypatch):
    env = {
        "GIT_AUTHOR_NAME": "T", "GIT_AUTHOR_EMAIL": "t@example.com",
        "GIT_COMMITTER_NAME": "T", "GIT_COMMITTER_EMAIL": "t@example.com",
        "GIT_CONFIG_GLOBAL": os.devnull, "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CEILING_DIRECTORIES": str(tmp_path),
    }
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return dict(os.environ)


def test_from_git_on_a_fresh_repository(tmp_path, git_env):
    repo = tmp_path / "repo"
    repo.mkdir()
    _git(repo, "init", "-q")
    dates = ["2015-02-01T10:00:00+00:00", "2015-02-02T12:00:00+00:00", "2015-02-02T16:34:49+00:00"]
    for i, date in enumerate(dates):
        env = dict(git_env, GIT_COMMITTER_DATE=date, GIT_AUTHOR_DATE=date)
        (repo / "f").write_text(str(i))
        _git(repo, "add", "f", env=env)
        _git(repo, "commit", "-q", "-m", "c%d" % i, env=env)
    sha = _git(repo, "rev-parse", "HEAD")
    assert version.from_git(str(repo)) == "%s.3-%s-20150202.163449" % (version.MAJOR_MINOR, sha[:10])


def test_from_git_without_history(tmp_path, git_env):
    empty = tmp_path / "empty"
    empty.mkdir()
    _git(empty, "init", "-q")
    assert version.from_git(str(empty)) is None
    plain = tmp_path / "plain"
    plain.mkdir()
    assert version.from_git(str(plain)) is None
    assert version.from_git(str(tmp_path / "missing")) is None


def test_from_git_without_git(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # no git there
    assert version.from_git(version.project_root()) is None


def test_stamp_round_trip(stamp_file):
    assert version.read_stamp() is None
    v = version.format_version(12, SHA, 1422894889)
    version.write_stamp(v)
    assert stamp_file.exists()
    assert version.read_stamp() == v
    assert version.current() == v
    namespace = {}
    exec(compile(stamp_file.read_text(), str(stamp_file), "exec"), namespace)  # it is a Python module
    assert namespace["VERSION"] == v
    real = os.path.join(os.path.dirname(version.__file__), "_version_stamp.py")
    assert str(stamp_file) != real


def test_current_falls_back_to_git_then_unknown(stamp_file, monkeypatch):
    monkeypatch.setattr(version, "from_git", lambda repo_dir: "9.9.9-0123456789-20200101.000000")
    assert version.current() == "9.9.9-0123456789-20200101.000000"
    monkeypatch.setattr(version, "from_git", lambda repo_dir: None)
    assert version.current() == version.UNKNOWN
    stamp_file.write_text("# nothing useful\n")
    assert version.current() == version.UNKNOWN


def test_current_of_this_checkout_has_the_documented_form(stamp_file):
    v = version.current()
    assert VERSION_RE.match(v) or v == version.UNKNOWN, v


def test_project_root_holds_kilnproxy():
    assert os.path.isfile(os.path.join(version.project_root(), "kilnproxy.py"))
