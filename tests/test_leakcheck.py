"""tools/leakcheck.py: the game-day check runs clean against the real proxy, and it can fail.

The end-to-end tests run the tool as an operator would (a subprocess, --self-hosted: its own OpenSSH backend and
proxy). The rest test its pure parts (mix, comparison, parsing) on synthetic data.
"""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOOLS = os.path.join(ROOT, "tools")
LEAKCHECK = os.path.join(TOOLS, "leakcheck.py")
sys.path.insert(0, TOOLS)

import _common  # noqa: E402
import harness  # noqa: E402
import leakcheck  # noqa: E402


def run_leakcheck(*args, timeout):
    return subprocess.run([sys.executable, LEAKCHECK, "--self-hosted", "--no-progress"] + list(args),
                          capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# -- end to end ---------------------------------------------------------------------------------------------------
@pytest.mark.e2e
@pytest.mark.timeout(170)
def test_leakcheck_self_hosted_100_mixed_sessions_is_clean():
    # 100 sessions: a leak of one object, greenlet or descriptor per session (or per clone, 34 of them) shows.
    out = run_leakcheck("--sessions", "100", "--max-seconds", "150", timeout=165)
    report = out.stdout + "\n--- stderr ---\n" + out.stderr
    assert out.returncode == 0, report
    assert "verdict: CLEAN" in out.stdout, report
    for heading in ("metric", "baseline", "after", "greenlets", "sessions", "fds", "rss"):
        assert heading in out.stdout, report
    assert "leakcheck: 100 sessions" in out.stdout, report
    for kind in leakcheck.KINDS:
        assert "\n%s " % kind in out.stdout, (kind, report)
    # every figure was measured (no n/a verdict): the admin API and psutil both answered
    assert "not checked" not in out.stdout, report


LEAKY_PROXY = '''
"""kilnproxy.py with a deliberate leak: one object kept per connection."""
from gevent import monkey
monkey.patch_all()
import runpy, sys
sys.path.insert(0, {lib!r})
import kiln.server

KEPT = []


class LeakedConnectionState:
    pass


_handle = kiln.server.ProxyServer.handle


def handle(self, sock, addr):
    try:
        return _handle(self, sock, addr)
    finally:
        KEPT.append(LeakedConnectionState())


kiln.server.ProxyServer.handle = handle
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
'''


@pytest.mark.e2e
@pytest.mark.timeout(120)
def test_leakcheck_fails_on_a_proxy_that_keeps_one_object_per_connection(tmp_path):
    script = tmp_path / "leaky_kilnproxy.py"
    script.write_text(LEAKY_PROXY.format(lib=os.path.join(ROOT, "lib"), script=os.path.join(ROOT, "kilnproxy.py")))
    out = run_leakcheck("--sessions", "60", "--warmup", "6", "--mix", "ls-remote=2,forbidden=1,unknown-key=1",
                        "--proxy-script", str(script), "--max-seconds", "100", timeout=115)
    report = out.stdout + "\n--- stderr ---\n" + out.stderr
    assert out.returncode == leakcheck.EXIT_LEAK, report
    assert "LeakedConnectionState" in out.stdout, report
    assert "verdict: LEAK" in out.stdout, report


# -- the comparison -----------------------------------------------------------------------------------------------
def snap(greenlets=10, sessions=0, authenticated=0, fds=20, rss=50 << 20, heap=None):
    return {"greenlets": greenlets, "sessions": sessions, "authenticated": authenticated, "fds": fds, "rss": rss,
            "heap": {"dict": 5000, "function": 11000, "paramiko.transport.Transport": 0} if heap is None else heap}


def verdicts(result):
    return {row[0]: row[-1] for row in result["rows"]}


def test_compare_same_figures_is_clean():
    result = leakcheck.compare(snap(), snap(), 100)
    assert not result["failed"], result
    assert set(verdicts(result).values()) == {"ok"}


@pytest.mark.parametrize("grown", [1, 100])
def test_compare_fails_when_greenlets_grow(grown):
    result = leakcheck.compare(snap(), snap(greenlets=10 + grown), 100)
    assert result["failed"]
    assert verdicts(result)["greenlets"] == "LEAK"
    assert any(r.startswith("greenlets +%d" % grown) for r in result["reasons"]), result["reasons"]


def test_compare_greenlet_tolerance_allows_exactly_that_many():
    assert not leakcheck.compare(snap(), snap(greenlets=12), 100, greenlet_tolerance=2)["failed"]
    assert leakcheck.compare(snap(), snap(greenlets=13), 100, greenlet_tolerance=2)["failed"]


@pytest.mark.parametrize("field", ["sessions", "authenticated", "fds"])
def test_compare_fails_when_sessions_or_descriptors_stay(field):
    after = snap(**{field: snap()[field] + 1})
    result = leakcheck.compare(snap(), after, 100)
    assert result["failed"] and verdicts(result)[field] == "LEAK"


def test_compare_rss_limit_is_per_session():
    kib = 1024
    ok = leakcheck.compare(snap(), snap(rss=(50 << 20) + 100 * 64 * kib), 100, rss_per_session_kib=64)
    assert not ok["failed"], ok["reasons"]
    bad = leakcheck.compare(snap(), snap(rss=(50 << 20) + 100 * 64 * kib + 1), 100, rss_per_session_kib=64)
    assert bad["failed"] and verdicts(bad)["rss"] == "LEAK"
    slack = leakcheck.compare(snap(), snap(rss=(50 << 20) + 100 * 64 * kib + (8 << 20)), 100,
                              rss_per_session_kib=64, rss_slack_mib=8)
    assert not slack["failed"], slack["reasons"]


def test_compare_fails_when_a_type_grows_by_one_object_per_session():
    before = snap()
    after = snap(heap=dict(before["heap"], **{"paramiko.transport.Transport": 100, "dict": 5003}))
    result = leakcheck.compare(before, after, 100)
    assert result["failed"]
    rows = {t["type"]: t for t in result["types"]}
    assert rows["paramiko.transport.Transport"]["growth"] == 100
    assert rows["paramiko.transport.Transport"]["verdict"] == "LEAK"
    assert rows["dict"]["verdict"] == "ok"          # +3 over 100 sessions is noise, below the limit
    assert result["types"][0]["type"] == "paramiko.transport.Transport"   # largest growth first


def test_compare_judges_types_on_the_second_half_only():
    before = snap()
    # a cache filled once by the first sessions (+40 dicts), then flat; and a steady leak of one object per session
    mid = snap(heap=dict(before["heap"], **{"dict": 5040, "paramiko.transport.Transport": 50}))
    after = snap(heap=dict(before["heap"], **{"dict": 5041, "paramiko.transport.Transport": 100}))
    result = leakcheck.compare(before, after, 100, mid=mid, second_half=50, type_growth_min=10)
    rows = {t["type"]: t for t in result["types"]}
    assert rows["paramiko.transport.Transport"]["growth"] == 50
    assert rows["paramiko.transport.Transport"]["growth_first_half"] == 50
    assert rows["paramiko.transport.Transport"]["verdict"] == "LEAK"
    assert rows["dict"]["verdict"] == "ok"
    assert result["reasons"] == ["type paramiko.transport.Transport +50 (limit 25)"]
    text = leakcheck.format_report(result, 100)
    assert "second half (50 sessions" in text and "+40" in text


def test_compare_growth_in_the_second_half_only_is_a_one_off():
    before = snap()
    mid = snap(heap=dict(before["heap"]))
    after = snap(heap=dict(before["heap"], **{"builtin_function_or_method": 41}))
    before["heap"]["builtin_function_or_method"] = mid["heap"]["builtin_function_or_method"] = 0
    result = leakcheck.compare(before, after, 100, mid=mid, second_half=50, type_growth_min=10)
    assert not result["failed"], result["reasons"]
    assert result["types"][0]["verdict"] == "ok (one-off)"


def test_compare_missing_figures_are_not_checked_rather_than_passed_or_failed():
    after = snap(fds=None, heap=None)
    after["heap"] = None
    result = leakcheck.compare(snap(), after, 100)
    assert not result["failed"]
    assert verdicts(result)["fds"] == "n/a"
    assert "fds" in result["unchecked"] and "heap types" in result["unchecked"]
    text = leakcheck.format_report(result, 100)
    assert "n/a" in text


def test_format_report_names_the_leak():
    result = leakcheck.compare(snap(), snap(greenlets=110), 100)
    text = leakcheck.format_report(result, 100, {"greenlets": 300})
    line = next(ln for ln in text.splitlines() if ln.startswith("greenlets"))
    assert "+100" in line and "LEAK" in line and "300" in line


# -- mix and parsing ----------------------------------------------------------------------------------------------
def test_parse_mix_and_plan_follow_the_weights():
    mix = leakcheck.parse_mix(leakcheck.DEFAULT_MIX)
    kinds = leakcheck.plan(mix, 100)
    assert len(kinds) == 100
    counts = {k: kinds.count(k) for k in mix}
    assert counts == {"clone": 34, "ls-remote": 34, "abort": 8, "forbidden": 8, "unknown-key": 8, "idle": 8}
    assert leakcheck.plan(mix, 100) == kinds                 # the same seed, the same order


@pytest.mark.parametrize("text", ["", "clone=0", "teleport=1", "clone=x", "clone=-1"])
def test_parse_mix_rejects_bad_mixes(text):
    with pytest.raises(ValueError):
        leakcheck.parse_mix(text)


def test_parse_args_needs_a_target():
    with pytest.raises(SystemExit) as e:
        leakcheck.parse_args(["--sessions", "3"])
    assert e.value.code == 2


def test_parse_heap_reads_most_common_types():
    doc = {"most_common_types": [{"type": "dict", "count": 7}, {"type": "list", "count": 3}], "tracemalloc": {}}
    assert harness.parse_heap(doc) == {"dict": 7, "list": 3}


@pytest.mark.parametrize("doc", [
    None, {"error": "unauthorized"}, {"most_common": [["dict", 7]]}, {"most_common_types": {"dict": 7}},
    {"most_common_types": [{"name": "dict", "count": 7}]}, {"most_common_types": [{"type": "dict", "count": "7"}]},
])
def test_parse_heap_of_another_shape_fails_loudly(doc):
    with pytest.raises(_common.AdminAPIError, match="most_common_types"):
        harness.parse_heap(doc)


def test_parse_prometheus():
    text = ("# HELP kiln_process_open_fds x\n# TYPE kiln_process_open_fds gauge\nkiln_process_open_fds 17.0\n"
            'kiln_sessions_total{outcome="completed"} 3\nkiln_process_rss_bytes 1.5e+07\n')
    m = harness.parse_prometheus(text)
    assert m == {"kiln_process_open_fds": 17, 'kiln_sessions_total{outcome="completed"}': 3,
                 "kiln_process_rss_bytes": 1.5e7}


class _Served:
    """A loopback HTTP server answering fixed JSON per path: an admin API whose shape has changed."""

    def __init__(self, answers):
        import http.server
        import threading
        answers = {path: json.dumps(doc).encode() for path, doc in answers.items()}

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                body = answers.get(self.path)
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Length", str(len(body or b"")))
                self.end_headers()
                self.wfile.write(body or b"")

            def log_message(self, *args):
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.mark.parametrize("answers, message", [
    ({"/debug/greenlets": {"greenlets": 5, "sessions": 0, "authenticated": 0}}, "no int 'count'"),
    ({"/debug/greenlets": {"count": 5, "sessions": "0", "authenticated": 0}}, "no int 'sessions'"),
    ({"/debug/greenlets": {"count": 5, "sessions": 0, "authenticated": 0},
      "/connections": {"CurrentUserCount": 0, "Users": []}}, "no list 'CurrentlyAuthenticatedUsers'"),
    ({"/debug/greenlets": {"count": 5, "sessions": 0, "authenticated": 0}}, "/connections: HTTP 404"),
])
def test_the_admin_client_fails_loudly_when_the_api_changes(answers, message):
    served = _Served(answers)
    try:
        with pytest.raises(_common.AdminAPIError, match=message):
            _common.Admin(served.url).vitals()
    finally:
        served.close()


def test_the_admin_client_says_when_nothing_answers():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]           # bound, not listening: connection refused
        with pytest.raises(_common.AdminAPIError, match="/debug/greenlets"):
            _common.Admin("http://127.0.0.1:%d" % port, timeout=2).greenlets()


def test_percentile_nearest_rank():
    values = list(range(1, 101))
    assert _common.percentile(values, 50) == 50
    assert _common.percentile(values, 95) == 95
    assert _common.percentile([3.0], 95) == 3.0
    assert _common.percentile([], 50) is None


# -- --load and stuck sessions (issue 11) -------------------------------------------------------------------------
def test_cpu_burner_runs_until_stopped_by_its_pid():
    import psutil
    burner = _common.CPUBurner().start()
    pid = burner.pid
    try:
        p = psutil.Process(pid)
        assert p.status() != psutil.STATUS_ZOMBIE
        give_up = time.monotonic() + 30
        while (burner.cpu_seconds() or 0) < 0.2:       # it burns
            assert time.monotonic() < give_up
            time.sleep(0.1)
    finally:
        burner.stop()
    burner.stop()                                       # twice is fine
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE


@pytest.mark.parametrize("text, seconds", [("13s", 13), ("4m5s", 245), ("1h2m3s", 3723), ("0s", 0), ("", None),
                                            ("soon", None)])
def test_parse_go_duration(text, seconds):
    assert leakcheck.parse_go_duration(text) == seconds


class FakeAdmin:
    def __init__(self, users):
        self.users = users

    def connections(self):
        return len(self.users), self.users


def test_stuck_watch_keeps_sessions_live_past_the_limit_with_their_entry():
    users = [{"SessionKey": "aaaa0001", "SessionDuration": "3s", "State": "running"},
             {"SessionKey": "bbbb0002", "SessionDuration": "21s", "State": "closing", "Command": "git-upload-pack"}]
    watch = leakcheck.StuckWatch(15)
    watch.observe(FakeAdmin(users), force=True)
    assert list(watch.stuck) == ["bbbb0002"]
    text = "\n".join(watch.report())
    assert "bbbb0002 state=closing duration=21s" in text and '"State": "closing"' in text
    assert leakcheck.StuckWatch(None).report() == []
    off = leakcheck.StuckWatch(None)
    off.observe(FakeAdmin(users), force=True)
    assert not off.stuck


def test_watchdog_count_from_metrics():
    m = harness.parse_prometheus('kiln_watchdog_closed_total{timeout="idle"} 2.0\n'
                                 'kiln_watchdog_closed_total{timeout="session"} 1.0\nkiln_sessions_total 5\n')
    assert leakcheck.watchdog_closed(m) == 3
    with pytest.raises(_common.AdminAPIError, match="kiln_watchdog_closed_total"):
        leakcheck.watchdog_closed({"kiln_sessions_total": 5.0})


def test_parse_args_load_and_stuck_after():
    args = leakcheck.parse_args(["--self-hosted", "--load", "--stuck-after", "30"])
    assert args.load and args.stuck_after == 30
    args = leakcheck.parse_args(["--self-hosted"])
    assert not args.load and args.stuck_after is None
