"""End to end: an ssh backend that misbehaves, and the proxy's timeouts ending every session and its pool recovering.

- A fake backend (a paramiko server in a subprocess, its host key in the proxy's known_hosts) that never confirms a
  channel open, or accepts the channel and never answers the exec: sessions get "backend unavailable" within
  timeouts.dial, the pooled connection is retired, and sessions succeed again once the backend behaves.
- A burst of clones on pooled connections to OpenSSH, with a core kept busy, through a proxy whose paramiko rekeys
  every MiB (in production every 512 MiB: a pooled connection carrying many clones rekeys several times an hour).
  paramiko answers a backend's CHANNEL_CLOSE from its reader thread and waited there for the key exchange that only
  that thread can finish (paramiko#822): the connection stood still for 30 s, sessions failed with "backend
  unavailable" and hung past timeouts.idle (issue 11).
- The OpenSSH backend killed with all its per-connection processes mid-load, and restarted.
Every proxy here must end with no live session, no watchdog report and no problem in its log.
"""
import concurrent.futures
import os
import signal
import subprocess
import sys
import threading
import time

import psutil
import pytest

import harness

pytestmark = pytest.mark.e2e

FAKE_BACKEND = r'''
"""A fake SSH backend: a paramiko server that accepts any public key; each channel does what the mode file says.
ok: answers an exec with "0000" and exit status 0. hang-open: never confirms a channel open. hang-exec: confirms
the channel, never answers the exec. (The hangs block that connection's transport thread, as a stuck sshd would.)"""
import os, socket, sys, threading, time, paramiko

port_file, host_key_path, mode_path = sys.argv[1:4]
host_key = paramiko.Ed25519Key.from_private_key_file(host_key_path)
forever = threading.Event()


def mode():
    try:
        with open(mode_path) as f:
            return f.read().strip()
    except OSError:
        return "ok"


def answer(channel):
    time.sleep(0.3)         # paramiko sends the exec's reply after check_channel_exec_request returns: output first
    channel.sendall(b"0000")
    channel.send_exit_status(0)
    channel.shutdown_write()
    channel.close()


class Backend(paramiko.ServerInterface):
    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_publickey(self, username, key):
        return paramiko.AUTH_SUCCESSFUL

    def check_channel_request(self, kind, chanid):
        if mode() == "hang-open":
            forever.wait()
        return paramiko.OPEN_SUCCEEDED

    def check_channel_env_request(self, channel, name, value):
        return True

    def check_channel_exec_request(self, channel, command):
        if mode() == "hang-exec":
            forever.wait()
        threading.Thread(target=answer, args=(channel,), daemon=True).start()
        return True


listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", 0))
listener.listen(64)
with open(port_file + ".tmp", "w") as f:
    f.write(str(listener.getsockname()[1]))
os.rename(port_file + ".tmp", port_file)
while True:
    sock, _ = listener.accept()
    t = paramiko.Transport(sock)
    t.add_server_key(host_key)
    t.start_server(server=Backend())
'''

REKEYING_PROXY = r'''
"""kilnproxy.py whose paramiko rekeys every KILN_TEST_REKEY_BYTES (both legs), to make key exchanges frequent."""
from gevent import monkey
monkey.patch_all()
import os, runpy, sys
from paramiko.packet import Packetizer
Packetizer.REKEY_BYTES = int(os.environ["KILN_TEST_REKEY_BYTES"])
sys.argv[0] = {script!r}
runpy.run_path({script!r}, run_name="__main__")
'''


class FakeBackend:
    """What make_proxy needs of a backend (port, user, known_hosts, repo_root), served by FAKE_BACKEND."""

    def __init__(self, workdir):
        self.dir = str(workdir)
        self.user = "git"
        self.repo_root = os.path.join(self.dir, "repos")
        os.makedirs(self.repo_root, exist_ok=True)
        self.host_key = harness.keygen(os.path.join(self.dir, "fake_host_key"))
        self.mode_path = os.path.join(self.dir, "mode")
        self.script = os.path.join(self.dir, "fake_backend.py")
        with open(self.script, "w") as f:
            f.write(FAKE_BACKEND)
        self.proc = None

    def start(self):
        port_file = os.path.join(self.dir, "port")
        self.set_mode("ok")
        self.log = open(os.path.join(self.dir, "fake_backend.log"), "wb")
        self.proc = subprocess.Popen([sys.executable, self.script, port_file, self.host_key, self.mode_path],
                                     stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT)
        give_up = time.monotonic() + 20
        while not os.path.exists(port_file):
            assert self.proc.poll() is None and time.monotonic() < give_up, "fake backend did not start"
            time.sleep(0.05)
        with open(port_file) as f:
            self.port = int(f.read())
        self.known_hosts = os.path.join(self.dir, "known_hosts")
        with open(self.host_key + ".pub") as f:
            kind, blob = f.read().split()[:2]
        with open(self.known_hosts, "w") as f:
            f.write("[127.0.0.1]:%d %s %s\n" % (self.port, kind, blob))
        return self

    def set_mode(self, mode):
        with open(self.mode_path, "w") as f:
            f.write(mode)

    def stop(self):
        harness.stop_process(self.proc, signal.SIGKILL)
        if getattr(self, "log", None):
            self.log.close()


@pytest.fixture
def fake_backend(tmp_path):
    backend = FakeBackend(tmp_path / "fake-backend").start()
    yield backend
    backend.stop()


def ssh_session(proxy, key, command="git-upload-pack 'initech/x.git'", timeout=60):
    """(exit status, stdout, stderr, seconds) of one ssh session through the proxy."""
    started = time.monotonic()
    out = harness.run(harness.ssh_args(key) + ["-p", str(proxy.port), "git@127.0.0.1", command], timeout=timeout,
                      input=b"")
    return out.returncode, out.stdout, out.stderr, time.monotonic() - started


def assert_clean_end(proxy, baseline=None, timeout=20.0):
    """No live session (and, given a baseline, greenlets and descriptors back to it), no watchdog report."""
    if baseline is not None:
        harness.wait_for_baseline(proxy, baseline, timeout=timeout)
    else:
        give_up = time.monotonic() + timeout
        while harness.admin_json(proxy, "/connections")["CurrentlyAuthenticatedUsers"]:
            assert time.monotonic() < give_up, harness.admin_json(proxy, "/connections")
            time.sleep(0.2)
    log = proxy.read_log()
    assert "watchdog:" not in log, log[-6000:]
    assert not proxy.problems(), proxy.problems()


@pytest.mark.timeout(180)
@pytest.mark.parametrize("mode", ["hang-open", "hang-exec"])
def test_backend_that_stops_answering_channels_fails_sessions_in_time_and_the_pool_recovers(
        make_proxy, keys, fake_backend, mode):
    dial = 3.0
    proxy = make_proxy("ssh", sshd=fake_backend, timeouts={"dial": dial, "idle": 3, "login": 5},
                       backend={"pool_idle": 60})
    rc, out, err, _ = ssh_session(proxy, keys["user"])
    assert rc == 0 and out == b"0000", err                  # and a pooled connection is left idle
    baseline = harness.proxy_vitals(proxy)

    fake_backend.set_mode(mode)                             # the pooled connection stops answering
    with concurrent.futures.ThreadPoolExecutor(3) as pool:
        results = list(pool.map(lambda _: ssh_session(proxy, keys["user"]), range(3)))
    for rc, out, err, seconds in results:
        assert rc != 0 and b"kilnproxy: backend unavailable" in err, (rc, out, err)
        # the interface: within timeouts.dial + 1 s (plus generous room for a loaded machine and ssh itself)
        assert seconds < dial + 1 + 5, seconds

    fake_backend.set_mode("ok")                             # the backend behaves again: so must the pool
    rc, out, err, _ = ssh_session(proxy, keys["user"])
    assert rc == 0 and out == b"0000", (rc, out, err, _telling_lines(proxy.read_log()))
    assert "backend connection retired" in proxy.read_log()
    assert_clean_end(proxy, baseline)


def _telling_lines(log, limit=60):
    """The log lines that say what went wrong: warnings, errors and sessions that did not complete."""
    lines = [ln for ln in log.splitlines() if " WARNING " in ln or " ERROR " in ln or
             (" end " in ln and "reason=completed" not in ln)]
    return "\n".join(lines[:limit])


def _burner():
    """A CPU burner on one core, stopped by PID by the caller."""
    return subprocess.Popen([sys.executable, "-c", "while True: pass"], stdin=subprocess.DEVNULL)


def _clone(proxy, key, repo, dest):
    started = time.monotonic()
    out = harness.run(["git", "clone", "-q", proxy.url(repo), dest], env=harness.client_env(key), timeout=120)
    subprocess.run(["rm", "-rf", dest])
    return out.returncode, out.stderr, time.monotonic() - started


@pytest.mark.timeout(300)
def test_burst_of_clones_on_pooled_connections_that_rekey_under_cpu_contention(
        tmp_path, keys, sshd_backend, monkeypatch):
    repo = "%s/rekey-%d.git" % (harness.ACCOUNT, os.getpid())
    harness.make_git_repo(sshd_backend.repo_root, repo, {"a.bin": os.urandom(1 << 20), "b.bin": os.urandom(1 << 20)})
    script = tmp_path / "rekeying_kilnproxy.py"
    script.write_text(REKEYING_PROXY.format(script=harness.KILNPROXY))
    monkeypatch.setattr(harness, "KILNPROXY", str(script))
    monkeypatch.setenv("KILN_TEST_REKEY_BYTES", str(1 << 20))
    proxy = harness.Proxy(str(tmp_path / "proxy"), backend=sshd_backend, backend_key=keys["backend"],
                          # idle 10 s: a loaded machine's git may think for seconds before its pack, while a
                          # stalled connection stands still for 30 s
                          extra={"timeouts": {"idle": 10, "dial": 5, "login": 10},
                                 "backend": {"pool_idle": 30, "max_sessions": 8}})
    proxy.add_key(keys["user"] + ".pub")
    burner = None
    try:
        proxy.start()
        burner = _burner()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            results = list(pool.map(lambda i: _clone(proxy, keys["user"], repo, str(tmp_path / ("c%d" % i))),
                                    range(48)))
        harness.stop_process(burner, signal.SIGKILL)
        failed = [(rc, err.decode(errors="replace").strip()[-200:]) for rc, err, _ in results if rc != 0]
        report = "%d of %d clones failed: %s\n%s" % (len(failed), len(results), failed[:5],
                                                    _telling_lines(proxy.read_log()))
        # Before the fix: most clones failed, with "backend unavailable" (channel opens stuck behind a connection
        # that stood still for 30 s) and idle timeouts, and sessions hung for 30 s in close. What is left under
        # this much load (1 MiB rekeys on both legs, a core burnt, the machine shared): now and then a clone or
        # two whose connection goes quiet right after a rekey, ended by their idle timeout (the report of issue
        # 11 says more); never "backend unavailable", never a session past its timeouts.
        assert not [f for f in failed if "backend unavailable" in f[1]], report
        assert all("kilnproxy: idle timeout" in err for _, err in failed) and len(failed) <= 2, report
        assert proxy.read_log().count("(pooled connection)") >= len(results) // 2, report   # the pool was used
        assert_clean_end(proxy, timeout=20)
    finally:
        harness.stop_process(burner, signal.SIGKILL)
        proxy.stop()


def _kill_tree(pid):
    """SIGKILL a process and every descendant. sshd's per-connection processes call setsid(), so neither the
    listener's death nor its process group reaches them: freeze the tree first (SIGSTOP, so nothing forks or gets
    re-parented while we look), collect it by parent PID, then kill it all. Returns how many processes died."""
    root = psutil.Process(pid)
    frozen = [root]
    root.send_signal(signal.SIGSTOP)
    for _ in range(10):                     # bounded: each pass freezes the children the last one found
        found = [c for c in root.children(recursive=True) if c not in frozen]
        if not found:
            break
        for c in found:
            try:
                c.send_signal(signal.SIGSTOP)
            except psutil.NoSuchProcess:
                pass
        frozen += found
    for p in frozen:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(frozen, timeout=10)
    return len(frozen)


@pytest.mark.timeout(240)
def test_backend_killed_with_all_its_children_mid_load_and_restarted(tmp_path, keys, make_proxy):
    sshd = harness.OpenSSHBackend(str(tmp_path / "sshd"), keys["backend"] + ".pub").start()
    repo = "%s/kill.git" % harness.ACCOUNT
    harness.make_git_repo(sshd.repo_root, repo, {"a.bin": os.urandom(2 << 20)})
    try:
        proxy = make_proxy("ssh", sshd=sshd, timeouts={"idle": 3, "dial": 3, "login": 10},
                           backend={"pool_idle": 30})
        assert _clone(proxy, keys["user"], repo, str(tmp_path / "warm"))[0] == 0
        stop = threading.Event()
        ended = []                          # (started, ended, rc) of each clone

        def load(n):
            while not stop.is_set():
                started = time.monotonic()
                rc, _, _ = _clone(proxy, keys["user"], repo, str(tmp_path / ("load-%d" % n)))
                ended.append((started, time.monotonic(), rc))

        threads = [threading.Thread(target=load, args=(n,)) for n in range(4)]
        for t in threads:
            t.start()
        try:
            time.sleep(2.0)
            killed_at = time.monotonic()
            assert _kill_tree(sshd.proc.pid) > 1      # the listener and per-connection processes
            sshd.proc.wait(10)
            time.sleep(3.0)                          # sessions in flight end; new ones fail
            sshd.stderr.close()
            sshd.start()                             # same port, host key and config
            restarted = time.monotonic()
            first_ok = None
            while first_ok is None and time.monotonic() < restarted + 30:
                started = time.monotonic()
                out = harness.run(["git", "ls-remote", proxy.url(repo)], env=harness.client_env(keys["user"]),
                                  timeout=60)
                if out.returncode == 0 and b"refs/heads/main" in out.stdout:
                    first_ok = started
            time.sleep(8.0)                          # the load goes on against the new backend
        finally:
            stop.set()
            for t in threads:
                t.join(120)
        in_flight = [(s, e, rc) for s, e, rc in ended if s < killed_at < e]
        assert in_flight, ended
        for s, e, rc in in_flight:
            assert e - killed_at < 15, (e - killed_at, rc)          # failed (or finished) within seconds
        assert first_ok is not None and first_ok - restarted < 5, (first_ok, restarted)
        after = [rc for s, e, rc in ended if s > restarted + 5]
        assert after and all(rc == 0 for rc in after), after
        assert_clean_end(proxy, timeout=20)
    finally:
        sshd.stop()
