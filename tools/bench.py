#!/usr/bin/env python3
"""KilnProxy benchmark: the same git work straight to OpenSSH and through the proxy, interleaved, in one run.

Starts an OpenSSH backend and a proxy (ssh backend) on 127.0.0.1 with tests/harness.py, builds its repositories of
random (incompressible) data once and caches them under bench-cache/, then measures:

  clone    `git clone` of a ~100 MB repository: wall time, MB/s, ratio
  stream   a ~1 GB git-upload-pack response (want HEAD, no capabilities: the raw pack) read to EOF: MB/s, ratio
  setup    `git ls-remote` session setup time, p50 / p95, ratio
  rate     `git ls-remote` sessions per second at concurrency 1 and 20; the proxy's CPU milliseconds per session
  idle     the proxy's RSS idle, with 100 and 1,000 idle sessions (ssh clients that exec git-receive-pack and then
           send nothing), KiB and greenlets per session, its CPU % with 1,000 idle sessions, RSS after they closed

Direct runs use the proxy's own backend key against the same sshd (its ForceCommand wrapper runs the command in the
repository root), so both paths run the same git on the same repositories; only the SSH hop(s) differ.

--haproxy adds a third path to setup and stream: through a real HAProxy (mode tcp, send-proxy-v2, health checks) in
front of the proxy, which then runs with proxy.proxy_protocol = "optional" (the direct "proxy" path goes through the
same header check: it finds no header).

    tools/bench.py                      # full run (~10 minutes the first time: it builds 1.1 GB of repositories)
    tools/bench.py --quick              # small sizes, under a minute
    tools/bench.py --phases clone,setup --json /tmp/b.json
    tools/bench.py --phases setup,stream --haproxy --stream-mb 256

Prints a table, writes JSON (--json, default bench-cache/bench-results.json), shows progress on stderr when it is a
terminal (or --progress), stops at --max-seconds (phases left are reported as not run) and stops everything it
started, by PID, on every path.
"""
import argparse
import concurrent.futures
import fcntl
import json
import os
import platform
import re
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402
from _common import NA, Admin, Progress, cell, median, percentile, proc_stats, table  # noqa: E402

CACHE = os.path.join(_common.ROOT, "bench-cache")
REPO_FORMAT = "v2"          # bump when make_random_repo changes: cached repositories are rebuilt
ACCOUNT = "initech"
PHASES = ("setup", "rate", "clone", "stream", "idle")
F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
# paramiko has no chacha20-poly1305, OpenSSH's favourite: the stream phase also runs direct with the cipher and MAC
# the client negotiated with the proxy ("direct-same-cipher"), to separate cipher cost from proxy cost.
# OpenSSH 9.x prefers the post-quantum hybrid sntrup761x25519 key exchange (~110 ms of CPU per connection here);
# paramiko offers curve25519-sha256 at best. The setup phase also runs direct with it, to separate the two.
CURVE_KEX = "curve25519-sha256"
IDLE_BATCH = 50             # idle sessions started at once: keeps both sshd's and the proxy's unauthenticated
                            # connections far below their limits (MaxStartups 500, limits.max_startups)

FULL = {"clone_mb": 100, "stream_mb": 1024, "clone_reps": 3, "stream_reps": 2, "setup_runs": 30,
        "rate_sessions": {1: 40, 20: 200}, "idle_counts": [100, 1000], "idle_cpu_seconds": 10.0}
QUICK = {"clone_mb": 8, "stream_mb": 32, "clone_reps": 1, "stream_reps": 1, "setup_runs": 5,
         "rate_sessions": {1: 5, 20: 20}, "idle_counts": [10, 50], "idle_cpu_seconds": 2.0}


class OutOfTime(Exception):
    pass


class Bench:
    def __init__(self, args, progress):
        self.args = args
        self.progress = progress
        self.deadline = time.monotonic() + args.max_seconds
        self.results = {"phases": {}, "not_run": {}}
        self.hosted = None
        self.haproxy = None
        self.admin = None
        self.idle_procs = []
        self.work = None
        self.settle = 0.5 if args.quick else 2.0

    # -- time ---------------------------------------------------------------------------------------------------
    def left(self):
        return self.deadline - time.monotonic()

    def timeout(self, cap):
        """A child's wait, bounded by --max-seconds; OutOfTime once the run has no time left."""
        if self.left() <= 0:
            raise OutOfTime()
        return _common.time_left(self.deadline, cap, floor=0.0)

    # -- setup --------------------------------------------------------------------------------------------------
    def repo(self, name, total_bytes, blob_bytes):
        """bench-cache/repos/initech/<name>, built once for this size (marker file inside the bare repository)."""
        path = os.path.join(CACHE, "repos", ACCOUNT, name)
        marker = os.path.join(path, "kiln-bench-bytes")
        try:
            with open(marker) as f:
                if f.read().split() == [str(total_bytes), REPO_FORMAT] and _common.import_harness().git_rev(path):
                    return path
        except (OSError, ValueError):
            pass
        n = max(1, -(-total_bytes // blob_bytes))
        self.progress.stage("building %s (%d MB, cached)" % (name, total_bytes >> 20), n)
        _common.make_random_repo(path, total_bytes, blob_bytes, self.progress)
        with open(marker, "w") as f:
            f.write("%d %s\n" % (total_bytes, REPO_FORMAT))
        return path

    def start(self):
        a = self.args
        os.makedirs(CACHE, exist_ok=True)
        h = _common.import_harness()
        self.clone_repo = "%s/clone-%dm.git" % (ACCOUNT, a.clone_mb)
        self.stream_repo = "%s/stream-%dm.git" % (ACCOUNT, a.stream_mb)
        self.small_repo = "%s/small.git" % ACCOUNT
        if "clone" in a.phases:
            self.repo("clone-%dm.git" % a.clone_mb, a.clone_mb << 20, 4 << 20)
        if "stream" in a.phases:
            self.repo("stream-%dm.git" % a.stream_mb, a.stream_mb << 20, 8 << 20)
        small = os.path.join(CACHE, "repos", ACCOUNT, "small.git")
        if not h.git_rev(small):
            shutil.rmtree(small, ignore_errors=True)
            h.make_git_repo(os.path.dirname(small), "small.git", {"README": b"bench\n"})
        self.work = tempfile.mkdtemp(prefix="work-", dir=CACHE)
        settings = {
            "timeouts": {"idle": 3600, "session": 7200, "login": 60, "dial": 30, "drain": 5},
            "limits": {"max_connections": 5000, "per_account": 5000, "max_startups": 2000,
                       "penalty_failures": 1000000},
        }
        if a.haproxy:
            settings["proxy"] = {"proxy_protocol": "optional"}
        self.progress.stage("starting OpenSSH backend and proxy")
        self.hosted = _common.SelfHosted(settings, workdir=os.path.join(self.work, "hosted"), dev_mode=False,
                                         routed="routed" if a.routed else None)
        self.hosted.start()
        self.results["proxy_settings"] = {"given": self.hosted.settings, "dropped": self.hosted.dropped,
                                          "everything else": "defaults"}
        if self.hosted.dropped:
            self.progress.message("bench: this proxy does not declare %s; left out" % ", ".join(self.hosted.dropped))
        if a.haproxy and "proxy.proxy_protocol" in self.hosted.dropped:
            raise RuntimeError("--haproxy: this proxy has no proxy.proxy_protocol setting")
        # the backend serves the cached repositories
        os.symlink(os.path.join(CACHE, "repos", ACCOUNT), os.path.join(self.hosted.backend.repo_root, ACCOUNT))
        self.admin = Admin(self.hosted.proxy.admin_url, pid=self.hosted.pid)
        self.pid = self.hosted.pid
        b = self.hosted.backend
        self.paths = {
            "direct": {"key": self.hosted.backend_key, "user": b.user, "port": b.port,
                       "env": h.client_env(self.hosted.backend_key, GIT_SSH_COMMAND="%s -p %d" % (
                           h.ssh_command(self.hosted.backend_key), b.port))},
            "proxy": {"key": self.hosted.user_key, "user": "git", "port": self.hosted.proxy.port,
                      "env": h.client_env(self.hosted.user_key)},
        }
        self.paths["direct-curve"] = dict(self.paths["direct"], env=h.client_env(
            self.hosted.backend_key, GIT_SSH_COMMAND="%s -p %d -o KexAlgorithms=%s" % (
                h.ssh_command(self.hosted.backend_key), b.port, CURVE_KEX)))
        if a.haproxy:
            self.progress.stage("starting HAProxy (send-proxy-v2)")
            self.haproxy = h.HAProxy(os.path.join(self.work, "haproxy"), self.hosted.proxy.port,
                                     {"v2": "send-proxy-v2 check inter 2s"}).start()
            self.paths["haproxy"] = dict(self.paths["proxy"], port=self.haproxy.port("v2"))
            self.results["haproxy"] = subprocess.run([h.HAPROXY, "-v"], capture_output=True,
                                                     text=True).stdout.splitlines()[0]
        self.results["ciphers"] = {p: self.cipher(p) for p in ("direct", "proxy")}
        for p in self.paths:        # warm-up: first connections pay for lazy imports and caches
            self.ls_remote(p)
        if a.routed and "backend routed ssh connected" not in self.hosted.proxy.read_log():
            raise RuntimeError("--routed: the warm-up session did not go to [backends.routed] (proxy log)")

    def url(self, path, repo):
        if path.startswith("direct"):        # scp form: the backend wrapper runs the command in the repository root
            return "%s@127.0.0.1:%s" % (self.paths[path]["user"], repo)
        return "ssh://git@127.0.0.1:%d/%s" % (self.paths[path]["port"], repo)

    def ssh(self, path, command):
        if path == "direct-same-cipher":
            return ["ssh"] + self.proxy_cipher_options() + self.ssh("direct", command)[1:]
        p = self.paths[path]
        return _common.ssh_base(p["key"], p["port"], p["user"]) + [command]

    def cipher(self, path):
        """The cipher the OpenSSH client negotiated on this path's first hop (from ssh -v)."""
        cmd = [("LogLevel=DEBUG1" if a == "LogLevel=ERROR" else a)
               for a in self.ssh(path, "git-upload-pack '%s'" % self.small_repo)]
        out = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, timeout=self.timeout(30))
        m = re.search(rb"kex: server->client cipher: (\S+) MAC: (\S+)", out.stderr)
        k = re.search(rb"kex: algorithm: (\S+)", out.stderr)
        if not m:
            return NA
        return "%s, MAC %s, kex %s" % (m.group(1).decode(), m.group(2).decode(), k.group(1).decode() if k else NA)

    def proxy_cipher_options(self):
        """ssh options selecting the cipher (and MAC, unless the cipher is an AEAD) negotiated with the proxy."""
        m = re.match(r"(\S+), MAC (\S+),", self.results.get("ciphers", {}).get("proxy", ""))
        if not m:
            raise RuntimeError("the cipher negotiated with the proxy is unknown")
        opts = ["-c", m.group(1)]
        if not m.group(2).startswith("<"):
            opts += ["-m", m.group(2)]
        return opts

    def stop(self):
        self.close_idle()
        if self.haproxy is not None:
            self.haproxy.stop()
            self.haproxy = None
        if self.hosted is not None:
            self.hosted.stop()
            self.hosted = None
        if self.work:
            shutil.rmtree(self.work, ignore_errors=True)

    # -- one operation --------------------------------------------------------------------------------------------
    def ls_remote(self, path):
        t0 = time.monotonic()
        out = subprocess.run(["git", "ls-remote", self.url(path, self.small_repo)], env=self.paths[path]["env"],
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=self.timeout(60))
        if out.returncode != 0 or b"refs/heads/main" not in out.stdout:
            raise RuntimeError("%s ls-remote failed: %s" % (path, out.stderr.decode(errors="replace")[-300:]))
        return time.monotonic() - t0

    def clone(self, path, repo):
        dest = os.path.join(self.work, "clone-%s" % path)
        shutil.rmtree(dest, ignore_errors=True)
        t0 = time.monotonic()
        try:
            out = subprocess.run(["git", "clone", "-q", self.url(path, repo), dest], env=self.paths[path]["env"],
                                 stdin=subprocess.DEVNULL, capture_output=True, timeout=self.timeout(900))
            seconds = time.monotonic() - t0
            if out.returncode != 0:
                raise RuntimeError("%s clone failed: %s" % (path, out.stderr.decode(errors="replace")[-300:]))
        finally:
            shutil.rmtree(dest, ignore_errors=True)
        return seconds

    def upload_pack(self, path, repo):
        """ssh ... git-upload-pack: read the ref advertisement, want the first ref without capabilities (so the
        answer is NAK and the raw pack), read to EOF. Returns (bytes, seconds)."""
        err = tempfile.TemporaryFile(dir=self.work)
        t0 = time.monotonic()
        p = subprocess.Popen(self.ssh(path, "git-upload-pack '%s'" % repo), stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=err, bufsize=0)
        try:
            fd = p.stdout.fileno()
            try:
                fcntl.fcntl(fd, F_SETPIPE_SZ, 1 << 20)
            except OSError:
                pass
            give_up = time.monotonic() + self.timeout(900)
            buf = bytearray()

            def fill(n):
                while len(buf) < n:
                    wait = give_up - time.monotonic()
                    if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                        raise RuntimeError("%s upload-pack: timed out" % path)
                    chunk = os.read(fd, 1 << 20)
                    if not chunk:
                        raise RuntimeError("%s upload-pack: EOF in the advertisement" % path)
                    buf.extend(chunk)

            first = None
            while True:
                fill(4)
                size = int(buf[:4], 16)
                if size == 0:
                    del buf[:4]
                    break
                fill(size)
                if first is None:
                    first = bytes(buf[4:44])
                del buf[:size]
            p.stdin.write(b"0032want " + first + b"\n0000" + b"0009done\n")
            total = len(buf)
            while True:
                wait = give_up - time.monotonic()
                if wait <= 0 or not select.select([fd], [], [], wait)[0]:
                    raise RuntimeError("%s upload-pack: timed out after %d bytes" % (path, total))
                chunk = os.read(fd, 1 << 20)
                if not chunk:
                    break
                total += len(chunk)
            seconds = time.monotonic() - t0
            p.stdin.close()
            rc = p.wait(self.timeout(30))
            if rc != 0:
                err.seek(0)
                raise RuntimeError("%s upload-pack exit %s: %s" % (path, rc, err.read()[-300:]))
            return total, seconds
        finally:
            _common.stop_process(p)
            err.close()

    # -- phases -------------------------------------------------------------------------------------------------
    def order(self, rep):
        """Interleave: direct first on even repetitions, proxy first on odd ones."""
        return ("direct", "proxy") if rep % 2 == 0 else ("proxy", "direct")

    def phase_clone(self):
        a = self.args
        size = _common.repo_size(os.path.join(CACHE, "repos", self.clone_repo))
        times = {"direct": [], "proxy": []}
        self.progress.stage("clone %d MB" % a.clone_mb, 2 * a.clone_reps)
        for rep in range(a.clone_reps):
            for path in self.order(rep):
                times[path].append(self.clone(path, self.clone_repo))
                self.progress.advance(1, "%s %.1fs" % (path, times[path][-1]))
        r = {"repo_bytes": size, "runs": times}
        for path in times:
            r[path] = {"median_s": median(times[path]), "mb_per_s": size / 1e6 / median(times[path])}
        r["ratio_time"] = r["proxy"]["median_s"] / r["direct"]["median_s"]
        return r

    def phase_stream(self):
        a = self.args
        runs = {"direct": [], "proxy": [], "direct-same-cipher": []}
        extra = ("direct-same-cipher",)
        if "haproxy" in self.paths:
            runs["haproxy"] = []
            extra += ("haproxy",)
        self.progress.stage("stream %d MB" % a.stream_mb, len(runs) * a.stream_reps)
        for rep in range(a.stream_reps):
            for path in self.order(rep) + extra:
                cpu0 = proc_stats(self.pid)["cpu"] if path == "proxy" else None
                n, s = self.upload_pack(path, self.stream_repo)
                run = {"bytes": n, "seconds": s, "mb_per_s": n / 1e6 / s}
                if cpu0 is not None:
                    cpu1 = proc_stats(self.pid)["cpu"]
                    if cpu1 is not None:
                        run["proxy_cpu_s_per_gb"] = (cpu1 - cpu0) / (n / 1e9)
                runs[path].append(run)
                self.progress.advance(1, "%s %.0f MB/s" % (path, n / 1e6 / s))
        r = {"runs": runs}
        for path in runs:
            r[path] = {"bytes": runs[path][0]["bytes"], "median_mb_per_s": median([x["mb_per_s"] for x in runs[path]]),
                       "median_s": median([x["seconds"] for x in runs[path]])}
        r["ratio_throughput"] = r["proxy"]["median_mb_per_s"] / r["direct"]["median_mb_per_s"]
        r["ratio_throughput_same_cipher"] = (r["proxy"]["median_mb_per_s"] /
                                             r["direct-same-cipher"]["median_mb_per_s"])
        r["same_cipher_options"] = " ".join(self.proxy_cipher_options())
        cpu = [x["proxy_cpu_s_per_gb"] for x in runs["proxy"] if "proxy_cpu_s_per_gb" in x]
        if cpu:
            r["proxy"]["median_cpu_s_per_gb"] = median(cpu)
        if "haproxy" in runs:
            r["ratio_throughput_haproxy"] = r["haproxy"]["median_mb_per_s"] / r["direct"]["median_mb_per_s"]
            r["ratio_throughput_haproxy_vs_proxy"] = r["haproxy"]["median_mb_per_s"] / r["proxy"]["median_mb_per_s"]
        return r

    def phase_setup(self):
        n = self.args.setup_runs
        times = {"direct": [], "proxy": [], "direct-curve": []}
        extra = ("direct-curve",)
        if "haproxy" in self.paths:
            times["haproxy"] = []
            extra += ("haproxy",)
        self.progress.stage("session setup (git ls-remote)", len(times) * n)
        for rep in range(n):
            for path in self.order(rep) + extra:
                times[path].append(self.ls_remote(path))
                self.progress.advance(1)
        r = {"runs": n}
        for path in times:
            r[path] = {"p50_ms": 1000 * percentile(times[path], 50), "p95_ms": 1000 * percentile(times[path], 95),
                       "min_ms": 1000 * min(times[path]), "max_ms": 1000 * max(times[path])}
        r["ratio_p50"] = r["proxy"]["p50_ms"] / r["direct"]["p50_ms"]
        r["ratio_p95"] = r["proxy"]["p95_ms"] / r["direct"]["p95_ms"]
        r["ratio_p50_same_kex"] = r["proxy"]["p50_ms"] / r["direct-curve"]["p50_ms"]
        if "haproxy" in times:
            r["ratio_p50_haproxy"] = r["haproxy"]["p50_ms"] / r["direct"]["p50_ms"]
            r["ratio_p50_haproxy_vs_proxy"] = r["haproxy"]["p50_ms"] / r["proxy"]["p50_ms"]
        return r

    def phase_rate(self):
        r = {"by_concurrency": {}}
        for conc, n in sorted(self.args.rate_sessions.items()):
            r["by_concurrency"]["c%d" % conc] = row = {"concurrency": conc, "sessions": n}
            for path in ("direct", "proxy"):
                self.progress.stage("sessions/s %s c=%d" % (path, conc), n)
                cpu0 = proc_stats(self.pid)["cpu"]
                t0 = time.monotonic()
                with concurrent.futures.ThreadPoolExecutor(max_workers=conc) as pool:
                    futures = [pool.submit(self.ls_remote, path) for _ in range(n)]
                    for f in concurrent.futures.as_completed(futures):
                        f.result()
                        self.progress.advance(1)
                wall = time.monotonic() - t0
                cpu1 = proc_stats(self.pid)["cpu"]
                row[path] = {"wall_s": wall, "sessions_per_s": n / wall}
                if cpu0 is not None and cpu1 is not None:
                    row[path]["proxy_cpu_ms_per_session"] = 1000 * (cpu1 - cpu0) / n
            row["ratio_rate"] = row["proxy"]["sessions_per_s"] / row["direct"]["sessions_per_s"]
        return r

    def phase_idle(self):
        a = self.args
        r = {"counts": a.idle_counts}
        self.wait_sessions(0, 30)
        time.sleep(self.settle)
        r["before"] = self.vitals()
        for target in sorted(a.idle_counts):
            self.open_idle(target)
            time.sleep(self.settle)     # let the last handshakes' garbage go
            r["at_%d" % target] = v = self.vitals()
            n = v["running"] or target
            v["kib_per_session"] = (v["rss"] - r["before"]["rss"]) / 1024.0 / n
            v["greenlets_per_session"] = ((v["greenlets"] - r["before"]["greenlets"]) / float(n)
                                          if v["greenlets"] is not None and r["before"]["greenlets"] is not None
                                          else None)
        top = max(a.idle_counts)
        self.progress.stage("idle CPU with %d idle sessions" % top)
        cpu0, t0 = proc_stats(self.pid)["cpu"], time.monotonic()
        time.sleep(min(a.idle_cpu_seconds, max(0.5, self.left() - 60)))
        cpu1, t1 = proc_stats(self.pid)["cpu"], time.monotonic()
        r["idle_cpu_percent_at_%d" % top] = 100.0 * (cpu1 - cpu0) / (t1 - t0)
        r["idle_cpu_window_s"] = t1 - t0
        r["after_close"] = self.close_and_settle(r["before"])
        if a.idle_rounds > 1:
            # RSS rarely drops after the sessions close (the allocator keeps its arenas); a second round shows
            # whether that memory is reused (RSS stays put) or leaked (RSS grows again by as much)
            self.open_idle(top)
            time.sleep(self.settle)
            r["round2_at_%d" % top] = self.vitals()
            r["round2_after_close"] = self.close_and_settle(r["before"])
        # pooled backend connections stay open for backend.pool_idle after their last session: wait that long
        # (bounded) to see greenlets and descriptors return to where they were before the idle test
        pool_idle = backend_pool_idle()
        if pool_idle is not None and not a.quick:
            r["pool_idle_s"] = pool_idle
            r["after_pool_drained"] = self.close_and_settle(r["before"], wait=pool_idle + 15, fds=True)
        return r

    def close_and_settle(self, before, wait=15.0, fds=False):
        self.progress.stage("closing %d idle sessions" % len(self.idle_procs))
        self.close_idle()
        closed = self.wait_sessions(0, 120)
        # gevent's threadpool workers (the backend dials' getaddrinfo) linger ~5 s after the last dial
        started = time.monotonic()
        give_up = started + min(wait, max(0.0, self.left() - 5))
        while True:
            time.sleep(self.settle)
            v = self.vitals()
            back = [v[k] <= before[k] for k in (("greenlets", "fds") if fds else ("greenlets",))]
            if all(back) or time.monotonic() > give_up:
                break
        v["seconds_after_close"] = time.monotonic() - started
        v["all_closed"] = closed
        return v

    # -- idle sessions ------------------------------------------------------------------------------------------
    def vitals(self):
        return self.admin.vitals()

    def running_sessions(self):
        return self.vitals()["running"]

    def open_idle(self, target):
        """Start ssh clients that exec git-receive-pack and then send nothing, until `target` sessions run."""
        self.progress.stage("opening idle sessions", target)
        cmd = self.ssh("proxy", "git-receive-pack '%s'" % self.small_repo)
        cmd[1:1] = ["-o", "ServerAliveInterval=0"]
        while len(self.idle_procs) < target:
            for _ in range(min(IDLE_BATCH, target - len(self.idle_procs))):
                self.idle_procs.append(subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL,
                                                        stderr=subprocess.DEVNULL, start_new_session=True))
            want = len(self.idle_procs)
            give_up = time.monotonic() + self.timeout(120)
            while True:
                running = self.running_sessions()
                self.progress.set(running)
                if running >= want:
                    break
                dead = [p for p in self.idle_procs if p.poll() is not None]
                if dead:
                    raise RuntimeError("%d idle ssh clients exited (first exit status %s)"
                                       % (len(dead), dead[0].returncode))
                if time.monotonic() > give_up:
                    raise RuntimeError("only %d of %d idle sessions running after 120s" % (running, want))
                time.sleep(0.2)

    def close_idle(self):
        procs, self.idle_procs = self.idle_procs, []
        for p in procs:
            if p.poll() is None:
                p.terminate()
        for p in procs:
            _common.stop_process(p, timeout=5)

    def wait_sessions(self, target, seconds):
        return self.admin.wait_sessions(target, time.monotonic() + min(seconds, max(1.0, self.left())))

    # -- the run ------------------------------------------------------------------------------------------------
    def run(self):
        self.results["machine"] = machine_info()
        self.results["settings"] = {k: getattr(self.args, k) for k in (
            "quick", "clone_mb", "stream_mb", "clone_reps", "stream_reps", "setup_runs", "idle_counts",
            "idle_cpu_seconds", "idle_rounds", "max_seconds", "phases", "haproxy", "routed")}
        self.results["settings"]["rate_sessions"] = {str(k): v for k, v in self.args.rate_sessions.items()}
        t0 = time.monotonic()
        self.start()
        self.results["proxy_rss_fresh"] = proc_stats(self.pid)["rss"]
        self.results["proxy_greenlets_fresh"] = self.admin.greenlets()[0]
        for phase in PHASES:
            if phase not in self.args.phases:
                continue
            if self.left() <= 0:
                self.results["not_run"][phase] = "--max-seconds ran out"
                continue
            try:
                started = time.monotonic()
                self.results["phases"][phase] = getattr(self, "phase_" + phase)()
                self.results["phases"][phase]["phase_seconds"] = time.monotonic() - started
            except OutOfTime:
                self.results["not_run"][phase] = "--max-seconds ran out during the phase"
                self.close_idle()
            except _common.AdminAPIError:
                raise               # the admin API is not what this tool reads: no figure of this run is sound
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                self.results["not_run"][phase] = "failed: %s" % e
                self.progress.message("bench: %s failed: %s" % (phase, e))
                self.close_idle()
        self.results["total_seconds"] = time.monotonic() - t0
        self.results["machine"]["loadavg_at_end"] = os.getloadavg()
        return self.results


def backend_pool_idle():
    """The proxy's default backend.pool_idle (seconds), or None when this checkout has no backend pool."""
    if _common.LIB not in sys.path:
        sys.path.insert(0, _common.LIB)
    try:
        from kiln import config
        return next((s.default for s in config.SETTINGS if (s.section, s.name) == ("backend", "pool_idle")), None)
    except Exception:
        return None


def wait_quiet(seconds, progress):
    limit = 0.5 * (os.cpu_count() or 1)
    give_up = time.monotonic() + seconds
    progress.stage("waiting for load < %.1f" % limit)
    while time.monotonic() < give_up and os.getloadavg()[0] >= limit:
        progress.set(note="load %.2f" % os.getloadavg()[0])
        time.sleep(5)


def machine_info():
    info = {"nproc": os.cpu_count(), "python": platform.python_version(), "platform": platform.platform(),
            "loadavg_at_start": os.getloadavg()}
    try:
        with open("/proc/cpuinfo") as f:
            m = re.search(r"^model name\s*:\s*(.+)$", f.read(), re.M)
            info["cpu"] = m.group(1).strip() if m else NA
        with open("/proc/meminfo") as f:
            m = re.search(r"^MemTotal:\s*(\d+) kB", f.read(), re.M)
            info["mem_gib"] = round(int(m.group(1)) / 1048576.0, 1) if m else None
    except OSError:
        pass
    from importlib import metadata
    for pkg in ("paramiko", "gevent", "greenlet", "cryptography", "bottle"):
        try:
            info[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            info[pkg] = None
    for name, cmd in (("openssh", ["ssh", "-V"]), ("git", ["git", "--version"]),
                      ("code_commit", ["git", "-C", _common.ROOT, "rev-parse", "--short=10", "HEAD"]),
                      ("code_uncommitted", ["git", "-C", _common.ROOT, "status", "--porcelain", "--", "lib",
                                            "kilnproxy.py"])):
        try:
            out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            lines = (out.stdout + out.stderr).strip().splitlines()
            info[name] = [ln.strip() for ln in lines] if name == "code_uncommitted" else lines[0]
        except (OSError, subprocess.TimeoutExpired, IndexError):
            info[name] = None
    return info


# -- report -------------------------------------------------------------------------------------------------------
def report(res):
    ph = res["phases"]
    rows = []

    def add(name, direct, proxy, ratio, note=""):
        rows.append([name, direct, proxy, ratio, note])

    f1 = lambda v: cell(v, "%.1f")      # noqa: E731
    f2 = lambda v: cell(v, "%.2f")      # noqa: E731
    if "setup" in ph:
        s = ph["setup"]
        add("session setup p50, ms (git ls-remote)", f1(s["direct"]["p50_ms"]), f1(s["proxy"]["p50_ms"]),
            f2(s["ratio_p50"]), "%d runs each" % s["runs"])
        add("session setup p95, ms", f1(s["direct"]["p95_ms"]), f1(s["proxy"]["p95_ms"]), f2(s["ratio_p95"]))
        if "direct-curve" in s:
            add("  direct with kex %s: p50, ms" % CURVE_KEX, f1(s["direct-curve"]["p50_ms"]),
                f1(s["proxy"]["p50_ms"]), f2(s["ratio_p50_same_kex"]), "the proxy's key exchange on the direct path")
        if "haproxy" in s:
            add("  through HAProxy send-proxy-v2: p50, ms", f1(s["direct"]["p50_ms"]), f1(s["haproxy"]["p50_ms"]),
                f2(s["ratio_p50_haproxy"]), "%.2f x the proxy without HAProxy; p95 %.1f ms" % (
                    s["ratio_p50_haproxy_vs_proxy"], s["haproxy"]["p95_ms"]))
    if "rate" in ph:
        for key, r in sorted(ph["rate"]["by_concurrency"].items(), key=lambda kv: kv[1]["concurrency"]):
            add("sessions/s at concurrency %d" % r["concurrency"], f1(r["direct"]["sessions_per_s"]),
                f1(r["proxy"]["sessions_per_s"]), f2(r["ratio_rate"]), "%d sessions" % r["sessions"])
            add("  proxy CPU ms per session (c=%d)" % r["concurrency"], "",
                f1(r["proxy"].get("proxy_cpu_ms_per_session")), "")
    if "clone" in ph:
        c = ph["clone"]
        mb = c["repo_bytes"] / 1e6
        add("clone %.0f MB: wall s (median)" % mb, f2(c["direct"]["median_s"]), f2(c["proxy"]["median_s"]),
            f2(c["ratio_time"]), "%d runs each" % len(c["runs"]["direct"]))
        add("clone %.0f MB: MB/s" % mb, f1(c["direct"]["mb_per_s"]), f1(c["proxy"]["mb_per_s"]),
            f2(c["proxy"]["mb_per_s"] / c["direct"]["mb_per_s"]))
    if "stream" in ph:
        s = ph["stream"]
        add("upload-pack stream %.0f MB: MB/s (median)" % (s["proxy"]["bytes"] / 1e6),
            f1(s["direct"]["median_mb_per_s"]), f1(s["proxy"]["median_mb_per_s"]), f2(s["ratio_throughput"]),
            "%d runs each" % len(s["runs"]["direct"]))
        add("upload-pack stream: wall s (median)", f2(s["direct"]["median_s"]), f2(s["proxy"]["median_s"]), "")
        if "median_cpu_s_per_gb" in s["proxy"]:
            add("  proxy CPU s per GB relayed (median)", "", f2(s["proxy"]["median_cpu_s_per_gb"]), "",
                "/proc of the proxy around each proxy stream")
        if "direct-same-cipher" in s:
            add("  direct with ssh %s: MB/s" % s["same_cipher_options"],
                f1(s["direct-same-cipher"]["median_mb_per_s"]), f1(s["proxy"]["median_mb_per_s"]),
                f2(s["ratio_throughput_same_cipher"]), "the proxy's cipher on the direct path")
        if "haproxy" in s:
            add("  through HAProxy send-proxy-v2: MB/s", f1(s["direct"]["median_mb_per_s"]),
                f1(s["haproxy"]["median_mb_per_s"]), f2(s["ratio_throughput_haproxy"]),
                "%.2f x the proxy without HAProxy" % s["ratio_throughput_haproxy_vs_proxy"])
    text = [table(["measure", "direct", "proxy", "proxy/direct", "note"], rows)] if rows else []
    if "idle" in ph:
        i = ph["idle"]
        mib = lambda v: cell(None if v is None else v / 1048576.0, "%.1f")   # noqa: E731
        irows = [["fresh (after start and warm-up)", mib(res.get("proxy_rss_fresh")), "", "",
                  cell(res.get("proxy_greenlets_fresh")), "", ""],
                 ["idle, before the idle test", mib(i["before"]["rss"]), "", "", cell(i["before"]["greenlets"]),
                  "", cell(i["before"]["fds"])]]
        for n in i["counts"]:
            v = i.get("at_%d" % n)
            if v:
                irows.append(["%d idle sessions" % n, mib(v["rss"]), f1(v["kib_per_session"]), cell(v["running"]),
                              cell(v["greenlets"]), f2(v["greenlets_per_session"]), cell(v["fds"])])
        top = max(i["counts"])
        for label, key in (("after all closed", "after_close"),
                           ("%d idle sessions again (2nd round)" % top, "round2_at_%d" % top),
                           ("after all closed again", "round2_after_close"),
                           ("after pooled backend connections closed", "after_pool_drained")):
            v = i.get(key)
            if v:
                if key == "after_pool_drained":
                    label += " (%.0fs after; pool_idle %gs)" % (v.get("seconds_after_close", 0), i["pool_idle_s"])
                irows.append([label, mib(v["rss"]), "", cell(v["running"]), cell(v["greenlets"]), "",
                              cell(v["fds"])])
        text += ["", table(["proxy (ssh backend)", "RSS MiB", "KiB/session", "running", "greenlets",
                            "greenlets/session", "fds"], irows)]
        cpu = i.get("idle_cpu_percent_at_%d" % top)
        text.append("proxy CPU with %d idle sessions: %s%% of one core (over %.1fs)" % (
            top, cell(cpu, "%.1f"), i.get("idle_cpu_window_s", 0)))
    if res.get("haproxy"):
        text.append("HAProxy: %s (mode tcp, send-proxy-v2, health checks every 2 s)" % res["haproxy"])
    if res.get("ciphers"):
        text.append("OpenSSH client's first hop: " + "; ".join("%s: %s" % kv for kv in res["ciphers"].items()))
    for phase, why in res["not_run"].items():
        text.append("not measured: %s (%s)" % (phase, why))
    text.append("total %.0fs" % res.get("total_seconds", 0))
    return "\n".join(text)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="bench.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: a smoke run in under a minute")
    p.add_argument("--phases", default=",".join(PHASES), help="comma list of %s (default all)" % ", ".join(PHASES))
    p.add_argument("--clone-mb", type=int, help="clone repository size (default 100; quick 8)")
    p.add_argument("--stream-mb", type=int, help="upload-pack stream size (default 1024; quick 32)")
    p.add_argument("--clone-reps", type=int, help="clones per path (default 3; quick 1)")
    p.add_argument("--stream-reps", type=int, help="streams per path (default 2; quick 1)")
    p.add_argument("--setup-runs", type=int, help="ls-remote runs per path (default 30; quick 5)")
    p.add_argument("--idle", dest="idle_counts", help="idle session counts (default 100,1000; quick 10,50)")
    p.add_argument("--idle-cpu-seconds", type=float, help="CPU sampling window with idle sessions (default 10)")
    p.add_argument("--idle-rounds", type=int, default=2,
                   help="2 (default): after closing them, open the largest count of idle sessions again, to see "
                        "whether the memory kept after the first round is reused; 1: one round")
    p.add_argument("--haproxy", action="store_true",
                   help="setup and stream also through a real HAProxy (send-proxy-v2) in front of the proxy")
    p.add_argument("--routed", action="store_true",
                   help="route the bench account to a named backend [backends.routed] (the same sshd)")
    p.add_argument("--max-seconds", type=float, default=1500.0, help="bound on the whole run (default 1500)")
    p.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                   help="first wait up to SECONDS for the 1-minute load average to drop below half the CPUs "
                        "(other work on the machine skews every figure); not counted in --max-seconds")
    p.add_argument("--json", default=os.path.join(CACHE, "bench-results.json"),
                   help="where to write the results (default bench-cache/bench-results.json)")
    p.add_argument("--progress", dest="progress", action="store_true", default=None,
                   help="progress on stderr (default: only when stderr is a terminal)")
    p.add_argument("--no-progress", dest="progress", action="store_false")
    args = p.parse_args(argv)
    base = QUICK if args.quick else FULL
    for k in ("clone_mb", "stream_mb", "clone_reps", "stream_reps", "setup_runs", "idle_cpu_seconds"):
        if getattr(args, k) is None:
            setattr(args, k, base[k])
    args.rate_sessions = dict(base["rate_sessions"])
    if args.idle_counts is None:
        args.idle_counts = list(base["idle_counts"])
    else:
        try:
            args.idle_counts = sorted({int(x) for x in args.idle_counts.split(",") if x.strip()})
        except ValueError:
            p.error("--idle: expected counts like 100,1000")
        if not args.idle_counts or min(args.idle_counts) < 1:
            p.error("--idle: counts must be at least 1")
    args.phases = [x.strip() for x in args.phases.split(",") if x.strip()]
    unknown = [x for x in args.phases if x not in PHASES]
    if unknown:
        p.error("unknown phase(s) %s (phases: %s)" % (", ".join(unknown), ", ".join(PHASES)))
    if min(args.clone_mb, args.stream_mb, args.clone_reps, args.stream_reps, args.setup_runs) < 1:
        p.error("sizes and repetition counts must be at least 1")
    return args


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    progress = Progress(Progress.wanted(args.progress))
    wait_quiet(args.wait_quiet, progress)
    bench = Bench(args, progress)
    status = 0
    try:
        results = bench.run()
    except OutOfTime:
        results = bench.results
        results["not_run"]["setup"] = "--max-seconds ran out while starting"
        status = 1
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        progress.close()
        print("bench: %s" % e, file=sys.stderr)
        return 2
    finally:
        progress.close()
        bench.stop()
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as f:
        json.dump(results, f, indent=2, sort_keys=True)
    m = results.get("machine", {})
    print("KilnProxy bench%s: %s, %s CPUs, %s GiB; Python %s, paramiko %s, gevent %s; %s" % (
        " (--quick)" if args.quick else "", m.get("cpu"), m.get("nproc"), m.get("mem_gib"), m.get("python"),
        m.get("paramiko"), m.get("gevent"), m.get("openssh")))
    load = [m.get("loadavg_at_start"), m.get("loadavg_at_end")]
    print("code: %s%s" % (m.get("code_commit"), " + uncommitted changes in %s" % ", ".join(
        x.split()[-1] for x in m["code_uncommitted"]) if m.get("code_uncommitted") else ""))
    print("load average (1, 5, 15 min) at start %s, at end %s" % tuple(
        NA if x is None else "%.2f %.2f %.2f" % tuple(x) for x in load))
    if load[0] and m.get("nproc") and load[0][0] > 0.5 * m["nproc"]:
        print("WARNING: the machine was busy with other work at the start; figures are not representative")
    print(report(results))
    print("JSON: %s" % args.json)
    return 1 if results["not_run"] else status


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(1))
    sys.exit(main())
