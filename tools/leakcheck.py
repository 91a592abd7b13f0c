#!/usr/bin/env python3
"""Game day in a box: does KilnProxy give back what each connection took?

Takes a baseline of the proxy (live greenlets, sessions, objgraph type counts, RSS, open descriptors), runs N real
sessions in a mix of kinds (full clones, ls-remote, clones killed mid-transfer, forbidden commands, unknown keys,
sessions left idle until the proxy's idle timeout closes them), waits for every session to end, takes a second
snapshot and compares. Exit status:

    0  clean: greenlets, sessions and descriptors back at the baseline, RSS within --rss-slack-mib plus
       --rss-per-session-kib per session, no objgraph type growing steadily (see --type-growth-per-session)
    1  a leak (the table says which figure)
    2  bad arguments, or the proxy / self-hosted setup could not be used
    3  no leak seen, but sessions did not behave as their kind expects (the check is not trustworthy)
    4  --max-seconds ran out before the check completed

    tools/leakcheck.py --self-hosted --sessions 100
    tools/leakcheck.py --self-hosted --sessions 3000 --load --max-seconds 2400
    tools/leakcheck.py --ssh 127.0.0.1:2222 --admin http://127.0.0.1:6060 --token T --key ~/.ssh/id_ed25519 \
        --repo initech/project.git --pid 1234 --drain-wait 62

--self-hosted starts its own OpenSSH backend and proxy (tests/harness.py) with timeouts.idle=3 and
backend.pool_idle=2, registers a key, creates the repositories, and stops both by PID at the end. Against a running
proxy: run it on an otherwise idle proxy; pass --drain-wait of backend.pool_idle + 2 so that pooled backend
connections are closed at both snapshots; mind limits.per_account and the failed-login penalties (the unknown-key kind
fails logins on purpose); the idle kind needs --idle-hold above the proxy's timeouts.idle. gevent's thread resolver
sends every backend dial through the hub's threadpool (even for an IP address): its workers add greenlets for ~5 s,
which the after-snapshot waits out (--settle).

--load keeps one core busy (a CPU burner child, started and stopped by its PID) while the sessions run, as other
work on the machine would. Sessions seen live for longer than --stuck-after seconds (self-hosted: timeouts.idle + 12)
are stuck: they are printed with their /connections entry and state, and so is the proxy's own count of sessions its
watchdog closed (kiln_watchdog_closed_total); either makes the verdict UNEXPECTED when nothing leaked.
"""
import argparse
import concurrent.futures
import os
import random
import json
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter, OrderedDict

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
from _common import NA, Admin, Progress, cell, percentile, table  # noqa: E402

KINDS = ("clone", "ls-remote", "abort", "forbidden", "unknown-key", "idle")
DEFAULT_MIX = "clone=4,ls-remote=4,abort=1,forbidden=1,unknown-key=1,idle=1"
EXIT_CLEAN, EXIT_LEAK, EXIT_USAGE, EXIT_UNEXPECTED, EXIT_TIMEOUT = 0, 1, 2, 3, 4
SELF_HOSTED_ACCOUNT = "initech"
SELF_HOSTED_TOKEN = "leakcheck-token"
ABORT_REPO_MB = 4
# timeouts.idle for --self-hosted. 1 s closed ordinary clones on this 2-core machine: at concurrency 8 a backend
# git can take over a second to say its first byte. 3 s is still short enough for idle sessions to be cheap.
SELF_HOSTED_IDLE = 3.0
# backend.pool_idle for --self-hosted: pooled backend connections close this long after their last session, so the
# baseline and the after-snapshot are both taken with an empty pool (and the pool's own clean-up is checked too).
SELF_HOSTED_POOL_IDLE = 2.0


# -- pure logic ---------------------------------------------------------------------------------------------------
def parse_mix(text):
    """'clone=4,idle=1' -> OrderedDict(kind -> weight); raises ValueError naming the problem."""
    mix = OrderedDict()
    for part in filter(None, (p.strip() for p in text.split(","))):
        kind, sep, weight = part.partition("=")
        kind = kind.strip()
        if kind not in KINDS:
            raise ValueError("unknown session kind %r (kinds: %s)" % (kind, ", ".join(KINDS)))
        try:
            w = int(weight) if sep else 1
        except ValueError:
            raise ValueError("bad weight in %r" % part) from None
        if w < 0:
            raise ValueError("negative weight in %r" % part)
        if w:
            mix[kind] = mix.get(kind, 0) + w
    if not mix:
        raise ValueError("the mix has no session kind with a weight above 0")
    return mix


def plan(mix, n, seed=1):
    """n session kinds in proportion to the weights (largest remainder), shuffled with a fixed seed so runs repeat."""
    total = sum(mix.values())
    counts = {k: n * w // total for k, w in mix.items()}
    rest = sorted(mix, key=lambda k: (n * mix[k] % total), reverse=True)
    for k in rest[:n - sum(counts.values())]:
        counts[k] += 1
    kinds = [k for k in mix for _ in range(counts[k])]
    random.Random(seed).shuffle(kinds)
    return kinds


def compare(before, after, sessions_run, rss_per_session_kib=64.0, greenlet_tolerance=0, fd_tolerance=0,
            type_growth_per_session=0.5, type_growth_min=20, top=15, rss_slack_mib=0.0, mid=None,
            second_half=None):
    """Compare snapshots ({'greenlets', 'sessions', 'authenticated', 'rss', 'fds', 'heap': {type: count}}, any value
    may be None). Greenlets, sessions, descriptors and RSS: after vs before, over all sessions_run. Object types:
    when `mid` (a snapshot after the first half of the sessions) is given, the growth from mid to after over the
    `second_half` sessions is judged, and a type is a leak only if it also grew by half that limit in the first half:
    one-time and bounded growth (caches, pools, rings filled by some sessions) is not mistaken for a leak, while
    steady per-session growth still shows. Returns {'rows', 'types', 'failed', 'reasons', 'unchecked',
    'type_limit', 'type_sessions', 'halves'}; a row is (metric, before, after, delta, limit, verdict), verdict 'ok',
    'LEAK' or 'n/a'; a type is a dict."""
    rows, reasons, unchecked = [], [], []

    def check(metric, limit):
        b, a = before.get(metric), after.get(metric)
        if b is None or a is None:
            rows.append((metric, b, a, None, limit, NA))
            unchecked.append(metric)
            return
        delta = a - b
        leak = delta > limit
        rows.append((metric, b, a, delta, limit, "LEAK" if leak else "ok"))
        if leak and metric == "rss":
            reasons.append("rss %+.0f KiB (limit %+.0f KiB)" % (delta / 1024.0, limit / 1024.0))
        elif leak:
            reasons.append("%s %+g (limit %+g)" % (metric, delta, limit))

    check("greenlets", greenlet_tolerance)
    check("sessions", 0)
    check("authenticated", 0)
    check("fds", fd_tolerance)
    check("rss", rss_slack_mib * 1048576 + rss_per_session_kib * 1024 * sessions_run)

    types = []
    judged_from = mid if mid is not None else before
    type_sessions = second_half if mid is not None and second_half is not None else sessions_run
    type_limit = max(type_growth_min, type_growth_per_session * type_sessions)
    hb, hj, ha = before.get("heap"), judged_from.get("heap"), after.get("heap")
    if hj is None or ha is None:
        unchecked.append("heap types")
    else:
        grown = sorted(((t, ha[t] - hj[t]) for t in ha if t in hj and ha[t] > hj[t]), key=lambda r: (-r[1], r[0]))
        for t, g in grown[:top]:
            first = None
            if mid is not None and hb is not None and t in hb:
                first = hj[t] - hb[t]
            leak = g >= type_limit
            # a leak grows steadily: in the first half too. Growth in one half only is a one-off (a pool or cache
            # reaching a new high-water mark, e.g. gevent's threadpool under load) and is reported, not failed.
            one_off = leak and first is not None and first < type_limit / 2.0
            types.append({"type": t, "before": hb.get(t) if hb else None, "mid": hj[t] if mid is not None else None,
                          "after": ha[t], "growth_first_half": first, "growth": g,
                          "per_session": g / type_sessions if type_sessions else None,
                          "verdict": "ok (one-off)" if one_off else "LEAK" if leak else "ok"})
            leak = leak and not one_off
            if leak:
                reasons.append("type %s %+d (limit %d)" % (t, g, type_limit))
    return {"rows": rows, "types": types, "failed": bool(reasons), "reasons": reasons, "unchecked": unchecked,
            "type_limit": type_limit, "type_sessions": type_sessions, "halves": mid is not None}


def format_report(result, sessions_run, peak=None):
    """The before/after table and the top growing types, as text."""
    peak = peak or {}
    mib = lambda v: NA if v is None else "%.1f MiB" % (v / 1048576.0)     # noqa: E731
    out_rows = []
    for metric, b, a, delta, limit, verdict in result["rows"]:
        if metric == "rss":
            cells = [mib(b), mib(a), NA if delta is None else "%+.1f KiB" % (delta / 1024.0),
                     "%+.0f KiB" % (limit / 1024.0), mib(peak.get(metric))]
            per = NA if delta is None or not sessions_run else "%+.2f KiB" % (delta / 1024.0 / sessions_run)
        else:
            cells = [cell(b), cell(a), cell(delta, "%+d"), "%+d" % limit, cell(peak.get(metric))]
            per = NA if delta is None or not sessions_run else "%+.3f" % (delta / sessions_run)
        out_rows.append([metric] + cells[:3] + [per, cells[3], cells[4], verdict])
    text = [table(["metric", "baseline", "after", "delta", "per session", "limit", "peak", "verdict"], out_rows)]
    text.append("")
    if result["types"]:
        if result.get("halves"):
            text.append("top growing types over the second half (%d sessions; objgraph counts after gc; LEAK at "
                        ">= %d):" % (result["type_sessions"], result["type_limit"]))
            text.append(table(
                ["type", "baseline", "half-way", "after", "1st half", "2nd half", "per session", "verdict"],
                [[r["type"], cell(r["before"]), r["mid"], r["after"], cell(r["growth_first_half"], "%+d"),
                  "%+d" % r["growth"], cell(r["per_session"], "%.3f"), r["verdict"]] for r in result["types"]]))
        else:
            text.append("top growing types (objgraph counts after gc; LEAK at >= %d):" % result["type_limit"])
            text.append(table(["type", "baseline", "after", "growth", "per session", "verdict"],
                              [[r["type"], cell(r["before"]), r["after"], "%+d" % r["growth"],
                                cell(r["per_session"], "%.3f"), r["verdict"]] for r in result["types"]]))
    elif "heap types" in result["unchecked"]:
        text.append("top growing types: n/a (no usable /debug/heap answer)")
    else:
        text.append("top growing types: none grew")
    return "\n".join(text)


# -- snapshots ----------------------------------------------------------------------------------------------------
def snapshot(admin):
    """The proxy's figures now. /debug/heap first: objgraph's walk (and gc) runs before the greenlets are counted."""
    s = {"heap": admin.heap()}
    s.update(admin.vitals())
    s["sources"] = {"rss": s["source"], "fds": s["source"]}
    m = admin.metrics()
    s["outcomes"] = proxy_outcomes(m)
    s["watchdog"] = watchdog_closed(m)
    return s


OUTCOME_SAMPLE = re.compile(r'^kiln_sessions_total\{.*outcome="([^"]+)".*\}$')


def proxy_outcomes(metrics):
    """{close reason label: count} from /metrics kiln_sessions_total; AdminAPIError when the series is missing."""
    out = {}
    for name, value in (metrics or {}).items():
        m = OUTCOME_SAMPLE.match(name)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0) + int(value)
    if not out:
        raise _common.AdminAPIError("/metrics has no kiln_sessions_total{outcome=...} series (has it changed?)")
    return out


def outcome_deltas(before, after):
    """'completed +68, idle_timeout +8, ...' (largest first), or None."""
    b, a = before.get("outcomes"), after.get("outcomes")
    if a is None or b is None:
        return None
    deltas = [(k, v - b.get(k, 0)) for k, v in a.items() if v - b.get(k, 0)]
    deltas.sort(key=lambda kv: (-kv[1], kv[0]))
    return ", ".join("%s %+d" % kv for kv in deltas) or "none"


WATCHDOG_SAMPLE = re.compile(r'^kiln_watchdog_closed_total(\{.*\})?$')


def watchdog_closed(metrics):
    """Sessions the proxy's watchdog closed (/metrics kiln_watchdog_closed_total, all labels)."""
    values = [v for name, v in metrics.items() if WATCHDOG_SAMPLE.match(name)]
    if not values:
        raise _common.AdminAPIError("/metrics has no kiln_watchdog_closed_total series (has it changed?)")
    return int(sum(values))


def parse_go_duration(text):
    """Seconds in a Go-style duration as /connections prints it ("1h2m3s", "4m5s", "13s"), or None."""
    m = re.match(r"^(?:(\d+)h)?(?:(\d+)m)?(?:(\d+(?:\.\d+)?)s)?$", str(text or ""))
    if not m or not any(m.groups()):
        return None
    h, mi, sec = m.groups()
    return int(h or 0) * 3600 + int(mi or 0) * 60 + float(sec or 0)


class StuckWatch:
    """Sessions seen in /connections for longer than `after` seconds, each with its latest entry (polled at most
    every `every` seconds by observe()). None disables it."""

    def __init__(self, after, every=1.0):
        self.after, self.every = after, every
        self.stuck = OrderedDict()        # SessionKey -> the latest /connections entry
        self._last = 0.0

    def observe(self, admin, force=False):
        if self.after is None or (not force and time.monotonic() - self._last < self.every):
            return
        self._last = time.monotonic()
        _, users = admin.connections()
        for entry in users:
            seconds = parse_go_duration(entry.get("SessionDuration"))
            if seconds is not None and seconds > self.after and entry.get("SessionKey"):
                self.stuck[entry["SessionKey"]] = entry

    def report(self):
        """Lines describing the stuck sessions (empty when none)."""
        if not self.stuck:
            return []
        lines = ["stuck sessions (live for more than --stuck-after %gs), with their last /connections entry:"
                 % self.after]
        for key, e in self.stuck.items():
            lines.append("  %s state=%s duration=%s command=%s bytes_in=%s bytes_out=%s remote=%s" % (
                key, e.get("State"), e.get("SessionDuration"), e.get("Command"), e.get("BytesIn"), e.get("BytesOut"),
                e.get("RemoteAddr")))
            lines.append("    " + json.dumps(e, sort_keys=True))
        return lines


def wait_quiet(admin, baseline_sessions, deadline, progress=None, stuck=None):
    """Poll until live sessions are back to the baseline; True when they are."""
    def polled(sessions):
        if stuck is not None:
            stuck.observe(admin)
        if progress is not None and sessions > baseline_sessions:
            progress.set(note="waiting for %s live sessions to end" % cell(sessions))
    return admin.wait_sessions(baseline_sessions, deadline, polled)


# -- sessions -----------------------------------------------------------------------------------------------------
class Outcome:
    def __init__(self, kind, ok, detail, seconds):
        self.kind, self.ok, self.detail, self.seconds = kind, ok, detail, seconds


class Sessions:
    """Runs one session of a kind with real ssh/git clients; every child is started in its own process group and
    registered so that a time-out can stop it by PID."""

    def __init__(self, host, port, user, key, unknown_key, repo, abort_repo, workdir, idle_hold):
        h = _common.import_harness()
        self.h = h
        self.host, self.port, self.user = host, port, user
        self.key, self.unknown_key = key, unknown_key
        self.repo, self.abort_repo = repo.strip("/"), abort_repo.strip("/")
        self.account = self.repo.split("/")[0]
        self.workdir = workdir
        self.idle_hold = idle_hold
        self.env = h.client_env(key)
        self.live = set()
        self.lock = threading.Lock()
        self.stopping = False
        self.counter = 0

    def url(self, path):
        return "ssh://%s@%s:%d/%s" % (self.user, self.host, self.port, path)

    def ssh(self, key, command):
        return _common.ssh_base(key, self.port, self.user, self.host) + [command]

    def _spawn(self, args, **kw):
        with self.lock:
            if self.stopping:
                raise RuntimeError("stopping")
            p = subprocess.Popen(args, start_new_session=True, **kw)
            self.live.add(p)
        return p

    def _done(self, p):
        with self.lock:
            self.live.discard(p)
        _common.stop_process(p, timeout=5)

    def stop_all(self):
        with self.lock:
            self.stopping = True
            procs = list(self.live)
        for p in procs:
            _common.kill_group(p)

    def _dest(self):
        with self.lock:
            self.counter += 1
            return os.path.join(self.workdir, "clone-%d" % self.counter)

    def run(self, kind, deadline):
        started = time.monotonic()
        try:
            ok, detail = getattr(self, "_" + kind.replace("-", "_"))(deadline)
        except RuntimeError as e:
            ok, detail = False, str(e)
        except subprocess.TimeoutExpired:
            ok, detail = False, "client timed out"
        return Outcome(kind, ok, detail, time.monotonic() - started)

    def _timeout(self, deadline, cap=120.0):
        return _common.time_left(deadline, cap)

    def _collect(self, p, deadline):
        try:
            out, err = p.communicate(timeout=self._timeout(deadline))
        finally:
            self._done(p)
        return p.returncode, out or b"", err or b""

    def _clone(self, deadline):
        dest = self._dest()
        try:
            p = self._spawn(["git", "clone", "-q", self.url(self.abort_repo), dest], env=self.env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
            rc, _, err = self._collect(p, deadline)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        return rc == 0, "cloned" if rc == 0 else "git clone exit %s: %s" % (rc, _last_line(err))

    def _ls_remote(self, deadline):
        p = self._spawn(["git", "ls-remote", self.url(self.repo)], env=self.env, stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        rc, out, err = self._collect(p, deadline)
        ok = rc == 0 and b"refs/heads/" in out
        return ok, "listed" if ok else "git ls-remote exit %s: %s" % (rc, _last_line(err))

    def _abort(self, deadline):
        """A clone whose whole client (git and its ssh) is SIGKILLed as soon as pack data starts to arrive."""
        dest = self._dest()
        killed = False
        try:
            p = self._spawn(["git", "clone", "--progress", self.url(self.abort_repo), dest], env=self.env,
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            try:
                seen = b""
                give_up = min(deadline, time.monotonic() + 60)
                while time.monotonic() < give_up:
                    ready, _, _ = select.select([p.stderr], [], [], 0.2)
                    if not ready:
                        continue
                    chunk = os.read(p.stderr.fileno(), 65536)
                    if not chunk:
                        break
                    seen = (seen + chunk)[-4096:]
                    if b"Receiving objects" in seen:
                        _common.kill_group(p)
                        killed = True
                        break
                rc = p.wait(self._timeout(deadline, 30))
            finally:
                self._done(p)
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        if killed:
            return True, "killed mid-transfer"
        if rc == 0:
            return True, "completed before the kill (not aborted)"
        return False, "git clone exit %s before any pack data" % rc

    def _forbidden(self, deadline):
        with self.lock:
            self.counter += 1
            n = self.counter
        command = ["ls -la /", "git-upload-pack 'not-%s/secret.git'" % self.account,
                   "git-upload-pack '%s/../../etc'" % self.account][n % 3]
        p = self._spawn(self.ssh(self.key, command), stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE)
        rc, _, err = self._collect(p, deadline)
        ok = rc not in (0, None) and b"kilnproxy: " in err
        return ok, "refused" if ok else "exit %s: %s" % (rc, _last_line(err))

    def _unknown_key(self, deadline):
        p = self._spawn(self.ssh(self.unknown_key, "git-upload-pack '%s'" % self.repo), stdin=subprocess.DEVNULL,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        rc, _, err = self._collect(p, deadline)
        ok = rc == 255 and b"kilnproxy: " not in err
        return ok, "authentication refused" if ok else "exit %s: %s" % (rc, _last_line(err))

    def _idle(self, deadline):
        """git-receive-pack, read the ref advertisement, then send nothing (stdin stays open) until the proxy's idle
        timeout closes the session; after --idle-hold seconds we give up and hang up ourselves."""
        p = self._spawn(self.ssh(self.key, "git-receive-pack '%s'" % self.repo), stdin=subprocess.PIPE,
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        out, err = b"", b""
        advertised = False
        try:
            give_up = min(deadline, time.monotonic() + self.idle_hold)
            open_streams = [p.stdout, p.stderr]
            while open_streams and time.monotonic() < give_up:
                ready, _, _ = select.select(open_streams, [], [], 0.2)
                for stream in ready:
                    chunk = os.read(stream.fileno(), 65536)
                    if not chunk:
                        open_streams.remove(stream)
                    elif stream is p.stdout:
                        out += chunk
                        advertised = advertised or b"0000" in out
                    else:
                        err += chunk
            closed_by_proxy = not open_streams
            if closed_by_proxy:
                p.wait(self._timeout(deadline, 10))
        finally:
            self._done(p)
        if not closed_by_proxy:
            return False, "not closed by the proxy within --idle-hold %gs" % self.idle_hold
        if b"kilnproxy: idle timeout" in err:
            # before the advertisement too: the backend was slower than timeouts.idle, still the idle path
            return True, "closed by the proxy: idle timeout" + ("" if advertised else " (before the advertisement)")
        return False, "exit %s, advertisement %s: %s" % (p.returncode, "seen" if advertised else "not seen",
                                                       _last_line(err))


def _last_line(data):
    """The telling line of a client's stderr: the proxy's own message if any, else the first line."""
    lines = [ln.strip() for ln in data.decode("utf-8", "replace").replace("\r", "\n").splitlines() if ln.strip()]
    for ln in lines:
        if "kilnproxy: " in ln:
            return ln[ln.index("kilnproxy: "):][:160]
    return lines[0][:160] if lines else "(no stderr)"


# -- the run ------------------------------------------------------------------------------------------------------
def run_sessions(runner, kinds, concurrency, deadline, admin, progress, peak, label="sessions", stuck=None):
    """Run the planned sessions; returns the list of Outcomes (short when the deadline cut it)."""
    outcomes = []
    failures = 0
    progress.stage(label, len(kinds))
    pool = concurrent.futures.ThreadPoolExecutor(max_workers=concurrency)
    try:
        pending = {pool.submit(runner.run, k, deadline) for k in kinds}
        last_poll = 0.0
        live = None
        while pending:
            if time.monotonic() >= deadline:
                break
            done, pending = concurrent.futures.wait(pending, timeout=0.25,
                                                    return_when=concurrent.futures.FIRST_COMPLETED)
            for f in done:
                o = f.result()
                outcomes.append(o)
                failures += not o.ok
            if stuck is not None:
                stuck.observe(admin)
            if time.monotonic() - last_poll >= 0.5:
                last_poll = time.monotonic()
                v = admin.vitals()
                live = v["sessions"]
                for key in ("greenlets", "sessions", "authenticated", "rss", "fds"):
                    if peak.get(key) is None or v[key] > peak[key]:
                        peak[key] = v[key]
            progress.set(len(outcomes), "unexpected %d, live %s" % (failures, cell(live)))
        if pending:             # out of time: stop the clients still running
            runner.stop_all()
    except BaseException:       # SIGTERM (SystemExit), Ctrl-C: the clients go too, then the proxy (main's finally)
        runner.stop_all()
        raise
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    return outcomes


def outcome_table(outcomes):
    rows = []
    by_kind = OrderedDict()
    for o in outcomes:
        by_kind.setdefault(o.kind, []).append(o)
    for kind, os_ in by_kind.items():
        details = Counter(o.detail for o in os_)
        bad = [o for o in os_ if not o.ok]
        common = "; ".join("%s x%d" % (d, n) for d, n in details.most_common(2))
        rows.append([kind, len(os_), len(os_) - len(bad), len(bad),
                     "%.2f" % percentile([o.seconds for o in os_], 50),
                     "%.2f" % max(o.seconds for o in os_), common[:110]])
    return table(["kind", "runs", "ok", "unexpected", "p50 s", "max s", "outcomes"], rows)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="leakcheck.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    target = p.add_argument_group("target (a running proxy) or --self-hosted")
    target.add_argument("--self-hosted", action="store_true",
                        help="start an OpenSSH backend and a proxy here (timeouts.idle=3, backend.pool_idle=2) "
                             "and stop them at the end")
    target.add_argument("--ssh", metavar="HOST:PORT", help="the proxy's SSH address (use 127.0.0.1, not a name)")
    target.add_argument("--user", default="git", help="SSH login name (default git)")
    target.add_argument("--admin", metavar="URL", help="the proxy's admin API, e.g. http://127.0.0.1:6060")
    target.add_argument("--token", default=None, help="admin bearer token")
    target.add_argument("--key", metavar="PATH", help="a registered client private key")
    target.add_argument("--unknown-key", metavar="PATH",
                        help="an unregistered private key (default: a fresh one generated here)")
    target.add_argument("--repo", metavar="ACCOUNT/REPO.git", help="a repository of the key's account")
    target.add_argument("--abort-repo", metavar="ACCOUNT/REPO.git",
                        help="repository for clone and abort sessions; a few MB so a clone can be cut (default --repo)")
    target.add_argument("--pid", type=int, help="the proxy's PID (RSS and descriptors via psutil, else /metrics)")
    run = p.add_argument_group("the run")
    run.add_argument("--sessions", type=int, default=100, help="sessions to run after warm-up (default 100)")
    run.add_argument("--concurrency", type=int, default=8, help="sessions at a time (default 8)")
    run.add_argument("--mix", default=DEFAULT_MIX, help="kind=weight,... (default %s)" % DEFAULT_MIX)
    run.add_argument("--warmup", type=int, default=None,
                     help="warm-up sessions before the baseline: one of each kind in turn, then the rest at "
                          "--concurrency, so one-time allocations (lazy imports, caches, allocator arenas sized by "
                          "the peak) are not counted (default 3 x concurrency, at least one per kind)")
    run.add_argument("--idle-hold", type=float, default=None,
                     help="seconds an idle session waits for the proxy to close it (default: 15, or idle+10 "
                          "self-hosted)")
    run.add_argument("--settle", type=float, default=20.0,
                     help="seconds to wait for sessions to end and figures to return to the baseline (default 20, "
                          "at least --drain-wait + 10)")
    run.add_argument("--drain-wait", type=float, default=None,
                     help="seconds to wait after sessions end before the baseline and half-way snapshots, so "
                          "pooled backend connections close: backend.pool_idle + 2 (self-hosted: %g; against a "
                          "running proxy default 0, so pass e.g. 62 for the default pool_idle 60)"
                          % (SELF_HOSTED_POOL_IDLE + 1.5))
    run.add_argument("--max-seconds", type=float, default=300.0, help="bound on the whole run (default 300)")
    run.add_argument("--seed", type=int, default=1, help="shuffle seed for the session order")
    run.add_argument("--load", action="store_true",
                     help="keep one core busy with a CPU burner (a child process, stopped by its PID) while the "
                          "sessions run, as other work on the machine would")
    run.add_argument("--stuck-after", type=float, default=None,
                     help="a session live for longer than this many seconds is stuck: printed with its "
                          "/connections entry, and the verdict is UNEXPECTED (default: self-hosted timeouts.idle "
                          "+ 12 = %g, else off)" % (SELF_HOSTED_IDLE + 12))
    limits = p.add_argument_group("pass/fail")
    limits.add_argument("--rss-per-session-kib", type=float, default=64.0,
                        help="allowed RSS growth per session, KiB (default 64)")
    limits.add_argument("--rss-slack-mib", type=float, default=8.0,
                        help="RSS allowance on top of the per-session one, MiB (default 8). The proxy's RSS moves "
                             "by a few MiB between quiet moments without any trend (63-66 MiB over 400 sessions "
                             "here): allocator fragmentation, not growth with sessions")
    limits.add_argument("--greenlet-tolerance", type=int, default=0,
                        help="greenlets allowed above the baseline (default 0). gevent's thread resolver runs "
                             "every backend dial through the hub's threadpool, even for an IP address: its worker "
                             "adds 2 greenlets for ~5 s after the last dial; the after-snapshot waits (--settle) "
                             "for it instead of tolerating it")
    limits.add_argument("--fd-tolerance", type=int, default=0, help="descriptors allowed above the baseline")
    limits.add_argument("--type-growth-per-session", type=float, default=0.5,
                        help="an objgraph type growing over the second half of the sessions by this many objects "
                             "per session (and at least --type-growth-min) is a leak (default 0.5). The first half "
                             "is not judged: one-time and bounded growth (caches, thread pools, the dashboard's "
                             "sample ring) happens there")
    limits.add_argument("--type-growth-min", type=int, default=20, help="(default 20)")
    out = p.add_argument_group("output")
    out.add_argument("--progress", dest="progress", action="store_true", default=None,
                     help="progress line on stderr (default: only when stderr is a terminal)")
    out.add_argument("--no-progress", dest="progress", action="store_false")
    out.add_argument("--keep", action="store_true", help="self-hosted: keep the work folder (logs) at the end")
    out.add_argument("--proxy-script", metavar="PATH", help=argparse.SUPPRESS)   # self-hosted: run this instead
    # of kilnproxy.py (tests/test_leakcheck.py uses a deliberately leaky wrapper to prove the check can fail)
    args = p.parse_args(argv)
    try:
        args.mix_weights = parse_mix(args.mix)
    except ValueError as e:
        p.error(str(e))
    if args.sessions < 1 or args.concurrency < 1:
        p.error("--sessions and --concurrency must be at least 1")
    if not args.self_hosted:
        missing = [n for n in ("ssh", "admin", "key", "repo") if getattr(args, n) is None]
        if missing:
            p.error("without --self-hosted, give " + ", ".join("--" + n for n in missing))
        host, _, port = args.ssh.rpartition(":")
        if not host or not port.isdigit():
            p.error("--ssh: expected HOST:PORT, got %r" % args.ssh)
        args.host, args.port = host.strip("[]"), int(port)
        if len(args.repo.strip("/").split("/")) < 2:
            p.error("--repo: expected ACCOUNT/REPO.git")
    return args


def self_hosted_settings(concurrency):
    return {
        "admin": {"token": SELF_HOSTED_TOKEN},
        "timeouts": {"idle": SELF_HOSTED_IDLE, "login": 5, "dial": 5, "drain": 2, "session": 120},
        "backend": {"pool_idle": SELF_HOSTED_POOL_IDLE},
        # the unknown-key kind fails logins on purpose; per-source penalties would refuse the sessions after it
        "limits": {"per_account": max(20, 2 * concurrency), "max_startups": 1000, "max_connections": 1000,
                   "penalty_failures": 1000000},
    }


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    started = time.monotonic()
    deadline = started + args.max_seconds
    progress = Progress(Progress.wanted(args.progress))
    workdir = tempfile.mkdtemp(prefix="kiln-leakcheck-")
    hosted = None
    try:
        if args.self_hosted:
            progress.stage("starting OpenSSH backend and proxy")
            hosted = _common.SelfHosted(self_hosted_settings(args.concurrency), keep=args.keep,
                                        proxy_script=args.proxy_script)
            try:
                hosted.start()
            except Exception as e:
                print("leakcheck: self-hosted setup failed: %s" % e, file=sys.stderr)
                return EXIT_USAGE
            h = hosted.h
            repo = "%s/leak.git" % SELF_HOSTED_ACCOUNT
            abort_repo = "%s/data.git" % SELF_HOSTED_ACCOUNT
            h.make_git_repo(hosted.backend.repo_root, repo, {"README": b"leakcheck\n", "a.txt": b"a" * 1000})
            progress.stage("creating a %d MB random repository" % ABORT_REPO_MB)
            _common.make_random_repo(os.path.join(hosted.backend.repo_root, abort_repo), ABORT_REPO_MB << 20,
                                     blob_bytes=512 << 10)
            admin = Admin(hosted.proxy.admin_url, SELF_HOSTED_TOKEN, pid=hosted.pid)
            host, port, key, unknown_key = "127.0.0.1", hosted.proxy.port, hosted.user_key, hosted.unknown_key
            idle_hold = args.idle_hold if args.idle_hold is not None else SELF_HOSTED_IDLE + 10
            pooled = "backend.pool_idle" not in hosted.dropped
            drain_wait = args.drain_wait if args.drain_wait is not None else (
                SELF_HOSTED_POOL_IDLE + 1.5 if pooled else 0.0)
            if hosted.dropped:
                progress.message("leakcheck: this proxy does not declare %s; left out of its config"
                                 % ", ".join(hosted.dropped))
        else:
            admin = Admin(args.admin, args.token, pid=args.pid)
            host, port, key, repo = args.host, args.port, args.key, args.repo.strip("/")
            abort_repo = (args.abort_repo or repo).strip("/")
            unknown_key = args.unknown_key or _common.import_harness().keygen(os.path.join(workdir, "id_unknown"))
            idle_hold = args.idle_hold if args.idle_hold is not None else 15.0
            drain_wait = args.drain_wait or 0.0
            if host not in ("127.0.0.1", "::1") and not host[:1].isdigit():
                progress.message("leakcheck: %s is a name; gevent's resolver threadpool may add greenlets" % host)
        try:
            status, body = admin.get("/healthz")
            if status != 200:
                raise _common.AdminAPIError("GET %s/healthz: HTTP %s: %.200s" % (admin.url, status, body))
            admin.vitals()          # every figure the check reads is there, in the shape it knows
        except _common.AdminAPIError as e:
            print("leakcheck: %s" % e, file=sys.stderr)
            return EXIT_USAGE
        runner = Sessions(host, port, "git" if args.self_hosted else args.user, key, unknown_key, repo, abort_repo,
                          workdir, idle_hold)
        args.drain_wait = drain_wait
        if args.stuck_after is None and args.self_hosted:
            # longer than any session of the mix may take: login, dial and timeouts.idle after the last byte
            args.stuck_after = SELF_HOSTED_IDLE + 12
        args.settle = max(args.settle, drain_wait + 10)
        return check(args, admin, runner, progress, deadline, started)
    finally:
        progress.close()
        if hosted is not None:
            hosted.stop()
        shutil.rmtree(workdir, ignore_errors=True)


def drain(seconds, deadline):
    """Let pooled backend connections age out (backend.pool_idle) before a snapshot."""
    time.sleep(max(0.0, min(seconds, deadline - time.monotonic())))


def check(args, admin, runner, progress, deadline, started):
    kinds = list(args.mix_weights)
    quiet_by = lambda: min(deadline, time.monotonic() + args.settle)  # noqa: E731

    # warm-up: each kind once (a broken kind shows here), then a batch at full concurrency, so one-time
    # allocations and the allocator's high-water mark at this concurrency are in the baseline
    warm = []
    n_warm = 3 * args.concurrency if args.warmup is None else args.warmup
    if n_warm:
        progress.stage("warm-up", max(n_warm, len(kinds)))
        for kind in kinds[:n_warm] if args.warmup is not None else kinds:
            warm.append(runner.run(kind, deadline))
            progress.advance(1)
        rest = n_warm - len(warm)
        if rest > 0:
            warm += run_sessions(runner, plan(args.mix_weights, rest, args.seed + 1), args.concurrency, deadline,
                                 admin, progress, {}, label="warm-up")
    bad_warm = [o for o in warm if not o.ok]
    if bad_warm:
        progress.message("leakcheck: warm-up sessions did not behave: " +
                         "; ".join("%s: %s" % (o.kind, o.detail) for o in bad_warm))
    progress.stage("baseline")
    if not wait_quiet(admin, 0, quiet_by(), progress):
        progress.message("leakcheck: live sessions did not reach 0 before the baseline; using what is there")
    drain(args.drain_wait, deadline)
    _, base_sessions = admin.greenlets()
    before = snapshot(admin)
    peak = {}

    planned = plan(args.mix_weights, args.sessions, args.seed)
    half = len(planned) // 2
    stuck = StuckWatch(args.stuck_after)
    burner = _common.CPUBurner() if args.load else None
    load_cpu = None
    try:
        if burner is not None:
            burner.start()
        run_started = time.monotonic()
        # two halves with a heap snapshot between them: object types are judged on the second half (see compare)
        outcomes = run_sessions(runner, planned[:half], args.concurrency, deadline, admin, progress, peak,
                                label="sessions, first half", stuck=stuck)
        mid = None
        if half and len(outcomes) == half:
            progress.stage("half-way snapshot")
            wait_quiet(admin, base_sessions, quiet_by(), progress, stuck)
            drain(args.drain_wait, deadline)
            mid = {"heap": admin.heap()}
        second = run_sessions(runner, planned[half:], args.concurrency, deadline, admin, progress, peak,
                              label="sessions, second half", stuck=stuck)
        outcomes += second
        run_seconds = time.monotonic() - run_started
    finally:
        if burner is not None:
            load_cpu = burner.cpu_seconds()
            load_pid = burner.pid
            burner.stop()
    timed_out = len(outcomes) < len(planned)

    progress.stage("waiting for sessions to end")
    quiet = wait_quiet(admin, base_sessions, quiet_by(), progress, stuck)
    stuck.observe(admin, force=True)
    # sessions are out of the registry; give their greenlets and descriptors until --settle to go too
    settle_started = time.monotonic()
    settle_by = quiet_by()
    while True:
        after = snapshot(admin)
        back = all(after.get(k) is None or before.get(k) is None or after[k] <= before[k]
                   for k in ("greenlets", "sessions", "authenticated", "fds"))
        if back or time.monotonic() >= settle_by:
            break
        progress.set(note="greenlets %s, fds %s: waiting for the baseline" % (cell(after.get("greenlets")),
                                                                            cell(after.get("fds"))))
        time.sleep(0.5)
    settled = time.monotonic() - settle_started
    progress.close()

    result = compare(before, after, len(outcomes), args.rss_per_session_kib, args.greenlet_tolerance,
                     args.fd_tolerance, args.type_growth_per_session, args.type_growth_min,
                     rss_slack_mib=args.rss_slack_mib, mid=mid if mid and mid["heap"] else None,
                     second_half=len(second))
    unexpected = [o for o in outcomes if not o.ok]
    mix_text = ", ".join("%s %d" % (k, n) for k, n in Counter(o.kind for o in outcomes).most_common())
    print("leakcheck: %d sessions (%s), concurrency %d, in %.1fs (two halves); %d unexpected outcomes; warm-up %d "
          "sessions" % (len(outcomes), mix_text, args.concurrency, run_seconds, len(unexpected), len(warm)))
    if outcomes:
        print(outcome_table(outcomes))
    print()
    print(format_report(result, len(outcomes), peak))
    per_conn = None
    if peak.get("greenlets") is not None and before.get("greenlets") is not None and peak.get("sessions"):
        per_conn = (peak["greenlets"] - before["greenlets"]) / float(peak["sessions"] - (base_sessions) or 1)
    print()
    print("peak during the run: %s live sessions, %s greenlets (%s greenlets per live session); sources: rss %s, "
          "fds %s" % (cell(peak.get("sessions")), cell(peak.get("greenlets")), cell(per_conn, "%.1f"),
                      before["sources"]["rss"] or NA, before["sources"]["fds"] or NA))
    print("the proxy's own count of how those sessions ended (/metrics kiln_sessions_total): %s"
          % cell(outcome_deltas(before, after)))
    if result["unchecked"]:
        print("not checked (the proxy did not report them): %s" % ", ".join(result["unchecked"]))
    print("after-snapshot taken %.1fs after the last session ended (waits up to --settle %gs for figures to return "
          "to the baseline; baseline and half-way snapshots %gs after sessions ended, --drain-wait); RSS limit = %g "
          "MiB slack + %g KiB x %d sessions" % (settled, args.settle, args.drain_wait, args.rss_slack_mib,
                                                 args.rss_per_session_kib, len(outcomes)))
    if burner is not None:
        print("load: a CPU burner (pid %d) kept a core busy while the sessions ran (%s s of CPU in %.0f s)"
              % (load_pid, cell(load_cpu, "%.0f"), run_seconds))
    if not quiet:
        print("sessions still live after --settle %gs" % args.settle)
    for line in stuck.report():
        print(line)
    watchdog = None
    if after.get("watchdog") is not None:
        watchdog = after["watchdog"] - (before.get("watchdog") or 0)
        print("the proxy's watchdog closed %d sessions past their timeouts plus timeouts.grace%s" % (
            watchdog, " (each is a bug: the proxy log has its stack)" if watchdog else ""))
    total = time.monotonic() - started
    if result["failed"]:
        verdict, code = "LEAK: " + "; ".join(result["reasons"]), EXIT_LEAK
    elif timed_out:
        verdict, code = "INCOMPLETE: --max-seconds %g ran out after %d of %d sessions" % (
            args.max_seconds, len(outcomes), len(planned)), EXIT_TIMEOUT
    elif unexpected:
        verdict, code = "UNEXPECTED: %d sessions did not behave as their kind expects (e.g. %s: %s)" % (
            len(unexpected), unexpected[0].kind, unexpected[0].detail), EXIT_UNEXPECTED
    elif stuck.stuck or watchdog:
        verdict, code = "UNEXPECTED: %d sessions stuck past --stuck-after, %d closed by the proxy's watchdog" % (
            len(stuck.stuck), watchdog or 0), EXIT_UNEXPECTED
    else:
        verdict, code = "CLEAN", EXIT_CLEAN
    print("verdict: %s (total %.1fs)" % (verdict, total))
    sys.stdout.flush()
    return code


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(EXIT_TIMEOUT))
    sys.exit(main())
