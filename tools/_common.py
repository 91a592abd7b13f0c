"""Shared helpers for tools/leakcheck.py and tools/bench.py: a progress line on stderr, a self-hosted OpenSSH backend +
proxy, repositories of random data, a CPU burner, and tables. The admin API client, process figures and the process
stopper are tests/harness.py's (re-exported here): one copy serves the tests and the tools.

Nothing here starts a process at import time. Every process a helper starts is stopped by its PID by the same
helper's owner.
"""
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TESTS = os.path.join(ROOT, "tests")
LIB = os.path.join(ROOT, "lib")
NA = "n/a"


def import_harness():
    if TESTS not in sys.path:
        sys.path.insert(0, TESTS)
    import harness
    return harness


# One copy of each piece, in tests/harness.py: the admin API client (strict: AdminAPIError when the API's shape
# changed), process figures, stopping a child by PID.
_h = import_harness()
Admin, AdminAPIError, proc_stats, stop_process = _h.Admin, _h.AdminAPIError, _h.proc_stats, _h.stop_process


def time_left(deadline, cap, floor=0.1):
    """Seconds a child's wait may take: what is left until the monotonic `deadline`, at most `cap`, at least
    `floor` (so a wait past the deadline still polls once instead of raising)."""
    return max(floor, min(cap, deadline - time.monotonic()))


# -- progress ---------------------------------------------------------------------------------------------------
class Progress:
    """One self-rewriting line on stderr: `label [#####.....] done/total note elapsed`. Quiet unless enabled."""

    def __init__(self, enabled, width=30, stream=None):
        self.enabled = enabled
        self.width = width
        self.stream = stream or sys.stderr
        self.started = time.monotonic()
        self.label, self.total, self.done, self.note = "", 0, 0, ""
        self._last_draw = 0.0
        self._drawn = False

    @staticmethod
    def wanted(flag):
        """flag: True (--progress), False (--no-progress) or None (only when stderr is a terminal)."""
        if flag is not None:
            return flag
        try:
            return sys.stderr.isatty()
        except (AttributeError, ValueError):
            return False

    def stage(self, label, total=0):
        self.label, self.total, self.done, self.note = label, total, 0, ""
        self.draw(force=True)

    def advance(self, n=1, note=None):
        self.done += n
        if note is not None:
            self.note = note
        self.draw()

    def set(self, done=None, note=None):
        if done is not None:
            self.done = done
        if note is not None:
            self.note = note
        self.draw()

    def draw(self, force=False):
        if not self.enabled:
            return
        now = time.monotonic()
        if not force and now - self._last_draw < 0.1 and self.done < self.total:
            return
        self._last_draw = now
        if self.total:
            filled = int(self.width * min(self.done, self.total) / self.total)
            bar = "[%s%s] %d/%d" % ("#" * filled, "." * (self.width - filled), self.done, self.total)
        else:
            bar = ""
        line = "%s %s %s %5.1fs" % (self.label, bar, self.note, now - self.started)
        cols = shutil.get_terminal_size((120, 20)).columns
        self.stream.write("\r" + line[:cols - 1].ljust(cols - 1))
        self.stream.flush()
        self._drawn = True

    def message(self, text):
        """A permanent line (the progress line is redrawn below it)."""
        if self.enabled and self._drawn:
            self.stream.write("\r" + " " * (shutil.get_terminal_size((120, 20)).columns - 1) + "\r")
        self.stream.write(text + "\n")
        self.stream.flush()
        self.draw(force=True)

    def close(self):
        if self.enabled and self._drawn:
            self.stream.write("\n")
            self.stream.flush()
            self._drawn = False


# -- processes ----------------------------------------------------------------------------------------------------
def kill_group(proc, sig=signal.SIGKILL):
    """Signal the process group of a child we started with start_new_session=True (its group id is its PID)."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


BURN_CODE = "while True: pass"


class CPUBurner:
    """Keeps one core busy (a child spinning in Python) while it runs, as other work on the machine would: the
    proxy, the backend and the clients then share what is left. Started and stopped by its PID; stop() is safe to
    call twice, and a context manager."""

    def __init__(self):
        self.proc = None

    def start(self):
        if self.proc is None:
            self.proc = subprocess.Popen([sys.executable, "-c", BURN_CODE], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                         start_new_session=True)
        return self

    @property
    def pid(self):
        return self.proc.pid if self.proc is not None else None

    def cpu_seconds(self):
        return proc_stats(self.pid)["cpu"]

    def stop(self):
        proc, self.proc = self.proc, None
        stop_process(proc, timeout=5)

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()


# -- configuration ------------------------------------------------------------------------------------------------
def known_settings():
    """{(section, name)} the proxy's config declares, or None if kiln.config cannot be imported right now."""
    if LIB not in sys.path:
        sys.path.insert(0, LIB)
    try:
        from kiln import config
        return {(s.section, s.name) for s in config.SETTINGS}
    except Exception:      # the module is being edited by someone else: pass everything through
        return None


def filter_settings(sections):
    """Drop settings this checkout's proxy does not declare yet (unknown keys are a config error). Returns (kept,
    dropped names)."""
    known = known_settings()
    if known is None:
        return sections, []
    kept, dropped = {}, []
    for section, values in sections.items():
        for name, value in values.items():
            if (section, name) in known:
                kept.setdefault(section, {})[name] = value
            else:
                dropped.append("%s.%s" % (section, name))
    return kept, dropped


class SelfHosted:
    """An OpenSSH backend and a KilnProxy (ssh backend) on loopback, started with harness.py in a temporary folder.

    The proxy's backend identity is also authorised on the backend, so `backend_key` works for direct runs.
    dev_mode: run the proxy with -X dev and ResourceWarning as an error (leak hunting); False runs it as operators
    do (benchmarks: -X dev's debug allocator alone adds ~12 KiB to each idle session and slows every allocation).
    routed: a backend name; the same OpenSSH backend is also configured as `[backends.<routed>]` and the account is
    routed to it in the key store (measures the routed path: route lookup, a named backend's own pool).
    Use as a context manager; stop() stops both by PID and is safe to call twice."""

    def __init__(self, settings, workdir=None, keep=False, proxy_script=None, dev_mode=True, routed=None):
        self.h = import_harness()
        self.routed = routed
        self.proxy_script = proxy_script
        self.own_dir = workdir is None
        self.dir = workdir or tempfile.mkdtemp(prefix="kiln-tool-")
        self.keep = keep
        self.settings, self.dropped = filter_settings(settings)
        self.dev_mode = dev_mode
        self.backend = self.proxy = None

    def start(self):
        h = self.h
        keys = os.path.join(self.dir, "keys")
        os.makedirs(keys, exist_ok=True)
        self.user_key = h.keygen(os.path.join(keys, "id_user"))
        self.unknown_key = h.keygen(os.path.join(keys, "id_unknown"))
        self.backend_key = h.keygen(os.path.join(keys, "id_backend"))
        self.backend = h.OpenSSHBackend(os.path.join(self.dir, "sshd"), self.backend_key + ".pub")
        self.backend.start()
        self.proxy = h.Proxy(os.path.join(self.dir, "proxy"), backend=self.backend, backend_key=self.backend_key,
                             extra=self.settings, dev_mode=self.dev_mode,
                             script=os.path.abspath(self.proxy_script) if self.proxy_script else None)
        self.proxy.add_key(self.user_key + ".pub")
        if self.routed:
            self.proxy.sections["backends." + self.routed] = dict(self.proxy.sections["backend"])
            self.proxy.write_config()
            self.proxy.cli("accounts", "route", "--account", self.h.ACCOUNT, "--backend", self.routed)
        self.proxy.start()
        return self

    @property
    def pid(self):
        return self.proxy.proc.pid if self.proxy and self.proxy.proc else None

    @property
    def ssh_address(self):
        return ("127.0.0.1", self.proxy.port)

    def stop(self):
        proxy, backend, self.proxy, self.backend = self.proxy, self.backend, None, None
        try:
            if proxy is not None:
                proxy.stop()
                self.proxy_log_tail = proxy.read_log()[-4000:]
        finally:
            if backend is not None:
                backend.stop()
            if self.own_dir and not self.keep:
                shutil.rmtree(self.dir, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    def __exit__(self, *exc):
        self.stop()


# -- repositories -------------------------------------------------------------------------------------------------
def make_random_repo(target, total_bytes, blob_bytes=8 << 20, progress=None):
    """A bare repository at target whose one commit holds ceil(total/blob) incompressible files (os.urandom), written
    straight into one pack with `git fast-import` (no work tree, no second copy on disk). Returns target.

    core.bigFileThreshold=1m: git sends these blobs as they are stored instead of searching for deltas between random
    blobs (13 s of CPU for 100 MB here, on the server, identical for both paths of a benchmark), as a host would
    configure a repository of binary assets. fastimport.unpackLimit=0 keeps the pack even with few objects."""
    if os.path.exists(target):
        shutil.rmtree(target)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", target], check=True)
    # random data does not compress: level 0 saves the zlib time on both build and clone
    for key, value in (("core.compression", "0"), ("core.bigFileThreshold", "1m"), ("fastimport.unpackLimit", "0")):
        subprocess.run(["git", "-C", target, "config", key, value], check=True)
    fi = subprocess.Popen(["git", "-C", target, "fast-import", "--quiet", "--depth=0"], stdin=subprocess.PIPE)
    try:
        n = max(1, -(-total_bytes // blob_bytes))
        left = total_bytes
        for i in range(n):
            size = min(blob_bytes, left) if i < n - 1 else max(left, 1)
            left -= size
            fi.stdin.write(b"blob\nmark :%d\ndata %d\n" % (i + 1, size))
            while size:
                chunk = min(size, 1 << 20)
                fi.stdin.write(os.urandom(chunk))
                size -= chunk
            fi.stdin.write(b"\n")
            if progress is not None:
                progress.advance(1)
        msg = b"random data for benchmarks\n"
        fi.stdin.write(b"commit refs/heads/main\ncommitter Bench <b@example.com> 1700000000 +0000\n")
        fi.stdin.write(b"data %d\n%s" % (len(msg), msg))
        for i in range(n):
            fi.stdin.write(b"M 100644 :%d data-%04d.bin\n" % (i + 1, i))
        fi.stdin.write(b"\n")
        fi.stdin.close()
        if fi.wait(600) != 0:
            raise RuntimeError("git fast-import failed for %s" % target)
    finally:
        if fi.poll() is None:
            fi.kill()
            fi.wait()
    subprocess.run(["git", "-C", target, "symbolic-ref", "HEAD", "refs/heads/main"], check=True)
    return target


def repo_size(path):
    total = 0
    for d, _, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(d, f))
            except OSError:
                pass
    return total


# -- numbers and tables -------------------------------------------------------------------------------------------
def percentile(values, p):
    """Nearest-rank percentile (p in 0..100) of a non-empty list; None for an empty one."""
    if not values:
        return None
    s = sorted(values)
    k = max(0, min(len(s) - 1, int(-(-p * len(s) // 100)) - 1))
    return s[k]


def median(values):
    if not values:
        return None
    s = sorted(values)
    mid = len(s) // 2
    return s[mid] if len(s) % 2 else (s[mid - 1] + s[mid]) / 2


def cell(value, fmt="%s"):
    if value is None:
        return NA
    try:
        return fmt % value
    except TypeError:
        return str(value)


def table(headers, rows):
    """Plain-text table with right-aligned numeric-looking cells."""
    rows = [[str(c) for c in r] for r in rows]
    widths = [max(len(str(h)), *(len(r[i]) for r in rows)) if rows else len(str(h)) for i, h in enumerate(headers)]

    def fmt_row(r):
        out = []
        for i, c in enumerate(r):
            numeric = c[:1].isdigit() or c[:1] in "+-" and c[1:2].isdigit()
            out.append(c.rjust(widths[i]) if numeric and i else c.ljust(widths[i]))
        return "  ".join(out).rstrip()

    lines = [fmt_row([str(h) for h in headers]), "  ".join("-" * w for w in widths)]
    lines += [fmt_row(r) for r in rows]
    return "\n".join(lines)


def ssh_base(key_path, port, user="git", host="127.0.0.1"):
    """The ssh argument list (harness options + port + destination) up to the remote command."""
    h = import_harness()
    return h.ssh_args(key_path) + ["-p", str(port), "%s@%s" % (user, host)]
