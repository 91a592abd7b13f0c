"""Test and tool harness: real OpenSSH backends, real KilnProxy processes, real ssh/git/hg clients.

Everything here starts processes that it owns and stops them by PID. Used by tests/conftest.py and tools/*.py.
"""
import calendar
import getpass
import hashlib
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PYTHON = sys.executable
KILNPROXY = os.path.join(ROOT, "kilnproxy.py")
SSHD = shutil.which("sshd") or "/usr/sbin/sshd"
ACCOUNT = "initech"


def keygen(path, kind="ed25519"):
    if not os.path.exists(path):
        args = ["ssh-keygen", "-q", "-N", "", "-f", path, "-t", kind]
        if kind == "rsa":
            args += ["-b", "3072"]
        subprocess.run(args, check=True, stdin=subprocess.DEVNULL)
    return path


def wait_for_port(host, port, timeout=10.0, proc=None):
    give_up = time.monotonic() + timeout
    while time.monotonic() < give_up:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError("process exited with %s before listening" % proc.returncode)
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("nothing listening on %s:%d after %gs" % (host, port, timeout))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def stop_process(proc, sig=signal.SIGTERM, timeout=15):
    """Stop a process we started, by PID: `sig`, then SIGKILL after `timeout` seconds; reaps it and closes its pipes.
    Returns its exit status (None for no process). Safe on a process that already ended."""
    if proc is None:
        return None
    if proc.poll() is None:
        try:
            proc.send_signal(sig)
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            try:
                stream.close()
            except OSError:      # a pipe to a client that died: nothing left to flush
                pass
    return proc.returncode


WRAPPER = """#!/bin/sh
# Backend ForceCommand: record what the proxy sent, then run the command in the repository root, as
# gitlab-shell-style backends do.
log="{log_dir}/${{KILN_SESSION:-nosession}}.env"
{{
  echo "KILN_ACCOUNT=$KILN_ACCOUNT"
  echo "KILN_USER=$KILN_USER"
  echo "KILN_KEY_NAME=$KILN_KEY_NAME"
  echo "KILN_SESSION=$KILN_SESSION"
  echo "GIT_PROTOCOL=$GIT_PROTOCOL"
  echo "SSH_ORIGINAL_COMMAND=$SSH_ORIGINAL_COMMAND"
}} > "$log"
cd "{repo_root}" || exit 1
exec /bin/sh -c "$SSH_ORIGINAL_COMMAND"
"""


class OpenSSHBackend:
    """An OpenSSH sshd on a loopback port with its own host key, config and repository root."""

    def __init__(self, workdir, client_pubkey_path):
        self.dir = workdir
        os.makedirs(self.dir, exist_ok=True)
        self.repo_root = os.path.join(self.dir, "repos")
        self.log_dir = os.path.join(self.dir, "envlog")
        os.makedirs(self.repo_root, exist_ok=True)
        os.makedirs(self.log_dir, exist_ok=True)
        self.host_key = keygen(os.path.join(self.dir, "ssh_host_ed25519_key"))
        self.user = getpass.getuser()
        self.port = free_port()
        self.proc = None
        self.authorized_keys = os.path.join(self.dir, "authorized_keys")
        shutil.copyfile(client_pubkey_path, self.authorized_keys)
        self.wrapper = os.path.join(self.dir, "backend-command.sh")
        with open(self.wrapper, "w") as f:
            f.write(WRAPPER.format(log_dir=self.log_dir, repo_root=self.repo_root))
        os.chmod(self.wrapper, 0o755)
        self.config = os.path.join(self.dir, "sshd_config")
        with open(self.config, "w") as f:
            f.write("\n".join([
                "Port %d" % self.port,
                "ListenAddress 127.0.0.1",
                "HostKey %s" % self.host_key,
                "PidFile %s" % os.path.join(self.dir, "sshd.pid"),
                "AuthorizedKeysFile %s" % self.authorized_keys,
                "PubkeyAuthentication yes",
                "PasswordAuthentication no",
                "KbdInteractiveAuthentication no",
                "PermitRootLogin prohibit-password",
                "StrictModes no",
                "UsePAM no",
                "AcceptEnv KILN_* GIT_PROTOCOL",
                "ForceCommand %s" % self.wrapper,
                "MaxStartups 500:30:1000",
                "MaxSessions 100",
                "LogLevel INFO",
                # sshd runs commands through the login shell; with SHLVL set, root's ~/.bashrc here (pyenv init,
                # ~0.3 s of CPU) is skipped, as a real git account's would not exist
                "SetEnv SHLVL=1",
                "",
            ]))
        self.known_hosts = os.path.join(self.dir, "known_hosts")
        with open(self.host_key + ".pub") as f:
            kind, blob = f.read().split()[:2]
        with open(self.known_hosts, "w") as f:
            f.write("[127.0.0.1]:%d %s %s\n" % (self.port, kind, blob))

    def start(self):
        os.makedirs("/run/sshd", exist_ok=True) if os.geteuid() == 0 else None
        self.stderr = open(os.path.join(self.dir, "sshd.log"), "wb")
        self.proc = subprocess.Popen([SSHD, "-D", "-e", "-f", self.config], stdin=subprocess.DEVNULL,
                                     stdout=self.stderr, stderr=subprocess.STDOUT)
        wait_for_port("127.0.0.1", self.port, proc=self.proc)
        return self

    def stop(self):
        stop_process(self.proc)
        if getattr(self, "stderr", None):
            self.stderr.close()

    def env_record(self, session_key):
        path = os.path.join(self.log_dir, "%s.env" % session_key)
        with open(path) as f:
            return dict(line.rstrip("\n").split("=", 1) for line in f if "=" in line)


class Proxy:
    """A real `kilnproxy.py serve` process with its own config and state dir. Listens on ephemeral ports."""

    def __init__(self, workdir, backend=None, backend_key=None, extra=None, dev_mode=True, script=None):
        self.dir = workdir
        os.makedirs(self.dir, exist_ok=True)
        self.state_dir = os.path.join(self.dir, "var")
        self.config_path = os.path.join(self.dir, "kilnproxy.toml")
        self.log_path = os.path.join(self.dir, "proxy.log")
        sections = {"proxy": {"listen": "127.0.0.1:0"}, "admin": {"listen": "127.0.0.1:0"},
                    "timeouts": {}, "limits": {}}
        if backend is not None:
            sections["backend"] = {"kind": "ssh", "address": "127.0.0.1:%d" % backend.port, "user": backend.user,
                                   "identity": backend_key, "known_hosts": backend.known_hosts}
            self.repo_root = backend.repo_root
        else:
            self.repo_root = os.path.join(self.state_dir, "repos")
        for section, values in (extra or {}).items():
            sections.setdefault(section, {}).update(values)
        self.sections = sections
        self.backend = backend
        self.proc = None
        self.expected_exit = 0      # a test that makes the proxy exit otherwise on purpose says so here
        self.dev_mode = dev_mode    # tests: -X dev with ResourceWarning as error; benchmarks: as operators run it
        self.script = script or KILNPROXY   # what `serve` and cli() run (a test or tool may wrap kilnproxy.py)
        self.write_config()

    def write_config(self):
        lines = ['state_dir = "var"']
        for section, values in self.sections.items():
            lines.append("[%s]" % section)
            for k, v in values.items():
                lines.append("%s = %s" % (k, _toml(v)))
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")

    def cli(self, *args, input=None, check=True):
        return subprocess.run([PYTHON, self.script] + list(args[:2]) + ["--config", self.config_path] + list(args[2:]),
                              input=input, capture_output=True, text=True, check=check, timeout=60)

    def add_key(self, pubkey_path, account=ACCOUNT, name="Peter Gibbons", key_name="Laptop"):
        out = self.cli("keys", "add", "--account", account, "--name", name, "--key-name", key_name, pubkey_path)
        return out.stdout.strip()

    def start(self, timeout=30):
        self.log = open(self.log_path, "ab")
        # Development mode with ResourceWarning as an error: an unclosed socket, file or child in the proxy prints
        # "Exception ignored ... ResourceWarning", which problems() reports and the fixtures fail on.
        dev = ["-X", "dev", "-W", "error::ResourceWarning"] if self.dev_mode else []
        self.proc = subprocess.Popen([PYTHON] + dev + [self.script, "serve", "--config", self.config_path],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=self.dir)
        give_up = time.monotonic() + timeout
        self.port = self.admin_port = None
        while time.monotonic() < give_up and (self.port is None or self.admin_port is None):
            if self.proc.poll() is not None:
                raise RuntimeError("proxy exited %s:\n%s" % (self.proc.returncode, self.read_log()))
            text = self.read_log()
            m = re.search(r"listening for SSH on [\d.]+:(\d+)", text)
            self.port = int(m.group(1)) if m else None
            m = re.search(r"admin API on http://[\d.]+:(\d+)/", text)
            self.admin_port = int(m.group(1)) if m else None
            time.sleep(0.05)
        if self.port is None or self.admin_port is None:
            raise RuntimeError("proxy did not start:\n" + self.read_log())
        return self

    def stop(self, sig=signal.SIGTERM):
        status = stop_process(self.proc, sig)
        if getattr(self, "log", None):
            self.log.close()
        return status

    PROBLEMS = ("ResourceWarning", "Exception ignored", "Traceback", "internal error", "Error in atexit")

    def problems(self):
        """Log lines that mean a defect: leaked resources, uncaught exceptions, the per-connection catch-all."""
        return [ln for ln in self.read_log().splitlines() if any(p in ln for p in self.PROBLEMS)]

    def read_log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    @property
    def admin_url(self):
        return "http://127.0.0.1:%d" % self.admin_port

    def url(self, path):
        return "ssh://git@127.0.0.1:%d/%s" % (self.port, path)

    def hg_url(self, path):
        return "ssh://git@127.0.0.1:%d/%s" % (self.port, path)

    def session_lines(self, key):
        return [ln for ln in self.read_log().splitlines() if " %s " % key in ln]

    def wait_for_log(self, pattern, timeout=10.0):
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            m = re.search(pattern, self.read_log())
            if m:
                return m
            time.sleep(0.05)
        raise AssertionError("log never matched %r:\n%s" % (pattern, self.read_log()[-4000:]))

    def logged_after(self, text, since, timeout=20.0):
        """Epoch time of the first log line containing `text` stamped at or after `since` (epoch seconds);
        waits for it (bounded). The line's own timestamp says when the proxy did it, whatever the poll's delay."""
        give_up = time.monotonic() + timeout
        while time.monotonic() < give_up:
            for line in self.read_log().splitlines():
                m = LOG_TIME.match(line)
                if m and text in line:
                    at = calendar.timegm(time.strptime(m.group(1), "%Y-%m-%dT%H:%M:%S")) + int(m.group(2)) / 1000.0
                    if at >= since - 0.002:
                        return at
            time.sleep(0.05)
        raise AssertionError("never logged %r after %.3f:\n%s" % (text, since, self.read_log()[-3000:]))


LOG_TIME = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d)\.(\d{3})Z ")     # a text log line's UTC timestamp


def _toml(v):
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_toml(x) for x in v) + "]"
    return '"%s"' % str(v).replace("\\", "\\\\").replace('"', '\\"')


def ssh_command(key_path):
    """The ssh client command line (as a string for GIT_SSH_COMMAND / hg --ssh)."""
    return " ".join(shlex.quote(a) for a in ssh_args(key_path))


def ssh_args(key_path):
    return ["ssh", "-i", key_path, "-o", "IdentitiesOnly=yes", "-o", "StrictHostKeyChecking=no",
            "-o", "UserKnownHostsFile=/dev/null", "-o", "LogLevel=ERROR", "-o", "BatchMode=yes",
            "-o", "ConnectTimeout=10"]


def client_env(key_path, **extra):
    env = dict(os.environ)
    env.update({"GIT_SSH_COMMAND": ssh_command(key_path), "GIT_TERMINAL_PROMPT": "0",
                "GIT_CONFIG_NOSYSTEM": "1", "HGPLAIN": "1",
                "GIT_AUTHOR_NAME": "Test", "GIT_AUTHOR_EMAIL": "t@example.com",
                "GIT_COMMITTER_NAME": "Test", "GIT_COMMITTER_EMAIL": "t@example.com"})
    env.update(extra)
    return env


def run(args, env=None, cwd=None, timeout=120, input=None, check=False):
    return subprocess.run(args, env=env, cwd=cwd, capture_output=True, timeout=timeout, input=input, check=check)


def make_git_repo(repo_root, path, files=None, bare_only=False):
    """Create a bare repository at repo_root/path, optionally with one commit holding files {name: bytes}."""
    target = os.path.join(repo_root, path)
    subprocess.run(["git", "init", "-q", "--bare", "-b", "main", target], check=True)
    if files:
        work = target + ".work"
        subprocess.run(["git", "init", "-q", "-b", "main", work], check=True)
        for name, data in files.items():
            with open(os.path.join(work, name), "wb") as f:
                f.write(data)
        env = client_env("/dev/null")
        subprocess.run(["git", "-C", work, "add", "-A"], check=True, env=env)
        subprocess.run(["git", "-C", work, "commit", "-q", "-m", "initial"], check=True, env=env)
        subprocess.run(["git", "-C", work, "push", "-q", target, "main"], check=True, env=env)
        shutil.rmtree(work)
    return target


def make_hg_repo(repo_root, path, files=None):
    target = os.path.join(repo_root, path)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    subprocess.run(["hg", "init", target], check=True)
    if files:
        for name, data in files.items():
            with open(os.path.join(target, name), "wb") as f:
                f.write(data)
        subprocess.run(["hg", "-R", target, "commit", "-A", "-q", "-m", "initial", "-u", "Test <t@example.com>"],
                       check=True, env=client_env("/dev/null"))
    return target


def sha256_file(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def git_rev(repo, ref="main"):
    out = subprocess.run(["git", "-C", repo, "rev-parse", "--verify", "-q", ref], capture_output=True, text=True)
    return out.stdout.strip() or None


# -- the admin API client (tests and tools) ------------------------------------------------------------------------
class AdminAPIError(RuntimeError):
    """The admin API did not answer as ../shared/design/interface.md says: unreachable, an error status, or a shape
    the tools do not know (a renamed field, a missing route). The tools stop on it rather than report blanks."""


def admin_call(url, path, token=None, timeout=10, method="GET", headers=None):
    """One admin request; returns (status, body bytes) for any HTTP answer. `headers` are sent as given (a "Host"
    one replaces urllib's). Raises OSError (urllib's URLError is one) when nothing answered."""
    req = urllib.request.Request(url.rstrip("/") + path, method=method, headers={"Connection": "close"})
    if token:
        req.add_header("Authorization", "Bearer " + token)
    for name, value in (headers or {}).items():
        req.add_header(name, value)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as e:
        body = e.read()
        e.close()
        return e.code, body


def admin_get(proxy, path, token=None, timeout=10, method="GET", headers=None):
    """admin_call on a harness Proxy's admin API."""
    return admin_call(proxy.admin_url, path, token, timeout, method, headers)


def admin_json(proxy, path, token=None):
    status, body = admin_get(proxy, path, token)
    assert status == 200, (path, status, body)
    return json.loads(body)


def _need(doc, path, name, kind):
    value = doc.get(name) if isinstance(doc, dict) else None
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise AdminAPIError("GET %s: no %s %r in the answer (has the admin API changed?): %.300s"
                            % (path, kind.__name__, name, json.dumps(doc)))
    return value


class Admin:
    """The admin API's readers the tests and tools share. Every reader checks the fields it uses and raises
    AdminAPIError when one is missing or of another type; nothing is silently read as "no data"."""

    def __init__(self, url, token=None, timeout=10.0, pid=None):
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.pid = pid          # the proxy's PID when it runs here (process figures by psutil), else None

    def get(self, path):
        """(status, body bytes); AdminAPIError when nothing answered."""
        try:
            return admin_call(self.url, path, self.token, self.timeout)
        except OSError as e:
            raise AdminAPIError("GET %s%s: %s" % (self.url, path, getattr(e, "reason", e))) from None

    def json(self, path, retries=10):
        """The parsed 200 answer. 429 (another heavy debug request is running) is retried after a pause."""
        for _ in range(retries):
            status, body = self.get(path)
            if status != 429:
                break
            time.sleep(0.2)
        if status != 200:
            raise AdminAPIError("GET %s%s: HTTP %s: %.200s" % (self.url, path, status, body))
        try:
            return json.loads(body)
        except ValueError:
            raise AdminAPIError("GET %s%s: not JSON: %.200s" % (self.url, path, body)) from None

    def greenlets_doc(self):
        """/debug/greenlets, with its integer `count`, `sessions` and `authenticated` checked."""
        doc = self.json("/debug/greenlets")
        for name in ("count", "sessions", "authenticated"):
            _need(doc, "/debug/greenlets", name, int)
        return doc

    def greenlets(self):
        """(live greenlets, live sessions)."""
        doc = self.greenlets_doc()
        return doc["count"], doc["sessions"]

    def connections(self):
        """(CurrentUserCount, CurrentlyAuthenticatedUsers)."""
        doc = self.json("/connections")
        return _need(doc, "/connections", "CurrentUserCount", int), \
            _need(doc, "/connections", "CurrentlyAuthenticatedUsers", list)

    def metrics(self):
        """{series: value} of /metrics."""
        status, body = self.get("/metrics")
        if status != 200:
            raise AdminAPIError("GET %s/metrics: HTTP %s" % (self.url, status))
        return parse_prometheus(body.decode("utf-8", "replace"))

    def heap(self, limit=500):
        """{type name: count} of /debug/heap's `most_common_types` (asking for the `limit` most common types)."""
        return parse_heap(self.json("/debug/heap?limit=%d" % limit))

    def wait_sessions(self, at_most, deadline, on_poll=None):
        """Poll until at most `at_most` sessions are live (or the monotonic `deadline` passes); True when they are.
        on_poll(sessions) runs after each reading (progress lines, stuck-session watches)."""
        while True:
            sessions = self.greenlets()[1]
            if on_poll is not None:
                on_poll(sessions)
            if sessions <= at_most:
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.25)

    def vitals(self):
        """The proxy's figures now: greenlets, sessions (live), authenticated, running (sessions relaying), and
        rss / fds / cpu / threads of its process (psutil when it runs here, else /metrics' kiln_process_* series;
        cpu and threads None then), and which of the two it was ("source")."""
        doc = self.greenlets_doc()
        _, users = self.connections()
        v = {"greenlets": doc["count"], "sessions": doc["sessions"], "authenticated": doc["authenticated"],
             "running": sum(1 for u in users if u.get("State") == "running")}
        v.update(proc_stats(self.pid))
        v["source"] = "psutil"
        if v["rss"] is None or v["fds"] is None:
            v["source"] = "/metrics"
            m = self.metrics()
            for key, name in (("rss", "kiln_process_rss_bytes"), ("fds", "kiln_process_open_fds")):
                if name not in m:
                    raise AdminAPIError("GET %s/metrics: no %s series" % (self.url, name))
                v[key] = int(m[name])
        return v


def parse_prometheus(text):
    """{'name' or 'name{labels}': float} from the Prometheus text format (comments skipped)."""
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        if "}" in line:
            name, _, rest = line.rpartition("}")
            name += "}"
        else:
            name, _, rest = line.partition(" ")
        fields = rest.split()
        if not fields:
            continue
        try:
            out[name.strip()] = float(fields[0])
        except ValueError:
            continue
    return out


def parse_heap(doc):
    """{type name: count} from a /debug/heap answer's `most_common_types` ([{"type", "count"}]); AdminAPIError when
    the answer has another shape."""
    table = doc.get("most_common_types") if isinstance(doc, dict) else None
    if not isinstance(table, list) or not all(
            isinstance(e, dict) and isinstance(e.get("type"), str) and isinstance(e.get("count"), int)
            for e in table):
        raise AdminAPIError("GET /debug/heap: no most_common_types [{type, count}] (has the admin API changed?): "
                            "%.300s" % json.dumps(doc))
    return {e["type"]: e["count"] for e in table}


def proc_stats(pid):
    """{'rss', 'fds', 'cpu', 'threads'} of a process by PID via psutil (None values when pid is None or the process
    cannot be read, e.g. another user's)."""
    import psutil
    out = {"rss": None, "fds": None, "cpu": None, "threads": None}
    if pid is None:
        return out
    try:
        p = psutil.Process(pid)
        with p.oneshot():
            out["rss"] = p.memory_info().rss
            out["fds"] = p.num_fds()
            t = p.cpu_times()
            out["cpu"] = t.user + t.system
            out["threads"] = p.num_threads()
    except (psutil.Error, OSError):
        pass
    return out


def proxy_vitals(proxy):
    """(live greenlets, authenticated sessions, open descriptors) of a running harness Proxy."""
    v = Admin(proxy.admin_url, pid=proxy.proc.pid).vitals()
    return v["greenlets"], v["authenticated"], v["fds"]


def wait_for_baseline(proxy, baseline, timeout=15.0):
    """Poll until greenlets and descriptors are back to at most the baseline; returns the last reading."""
    give_up = time.monotonic() + timeout
    while True:
        now = proxy_vitals(proxy)
        if now[0] <= baseline[0] and now[1] == 0 and now[2] <= baseline[2]:
            return now
        if time.monotonic() > give_up:
            raise AssertionError("proxy did not return to baseline (greenlets, sessions, fds): %s -> %s"
                                 % (baseline, now))
        time.sleep(0.1)


def reap(proc):
    """Kill a client process we started if it still runs, wait for it, close its pipes; returns its exit status."""
    return stop_process(proc, signal.SIGKILL)


HAPROXY = shutil.which("haproxy") or "/usr/sbin/haproxy"


class HAProxy:
    """A real haproxy (the distribution's package) in the foreground on loopback ports, in TCP mode in front of one
    server port. `servers` maps a name to its server-line options, e.g. {"v2": "send-proxy-v2 check inter 1s"}:
    each gets its own listening port, `port(name)`. haproxy connects from 127.0.0.1."""

    def __init__(self, workdir, target_port, servers):
        self.dir = workdir
        os.makedirs(self.dir, exist_ok=True)
        self.config_path = os.path.join(self.dir, "haproxy.cfg")
        self.log_path = os.path.join(self.dir, "haproxy.log")
        self.ports = {name: free_port() for name in servers}
        lines = ["global", "    log stdout format raw local0 info", "    maxconn 4000",
                 "defaults", "    mode tcp", "    log global", "    option tcplog", "    timeout connect 5s",
                 "    timeout client 120s", "    timeout server 120s", "    timeout check 2s"]
        for name, options in servers.items():
            lines += ["listen %s" % name, "    bind 127.0.0.1:%d" % self.ports[name],
                      "    server kiln 127.0.0.1:%d %s" % (target_port, options)]
        with open(self.config_path, "w") as f:
            f.write("\n".join(lines) + "\n")
        self.proc = None

    def port(self, name):
        return self.ports[name]

    def start(self):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([HAPROXY, "-db", "-f", self.config_path], stdin=subprocess.DEVNULL,
                                     stdout=self.log, stderr=subprocess.STDOUT, cwd=self.dir)
        for port in self.ports.values():
            wait_for_port("127.0.0.1", port, proc=self.proc)
        return self

    def stop(self):
        status = stop_process(self.proc)
        if getattr(self, "log", None):
            self.log.close()
        return status

    def read_log(self):
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def url(self, name, path):
        return "ssh://git@127.0.0.1:%d/%s" % (self.ports[name], path)
