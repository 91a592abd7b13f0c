"""Test helpers playing the service manager's part: the sd_notify socket, a proxy started with a command line and
environment of the test's own (socket activation, the pyz). Used by test_e2e_systemd.py and test_dist.py."""
import os
import shutil
import socket
import subprocess
import tempfile
import time
import urllib.request

import harness

SERVE_TIMEOUT = 60


class NotifySocket:
    """The service manager's end: an AF_UNIX datagram socket (a path, or an abstract '@name')."""

    def __init__(self, abstract=False):
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        if abstract:
            self.value = "@kiln-test-%d-%s" % (os.getpid(), os.urandom(4).hex())
            self.sock.bind("\0" + self.value[1:])
            self.dir = None
        else:
            self.dir = tempfile.mkdtemp(prefix="kn", dir="/tmp")       # short: AF_UNIX paths are <= 107 bytes
            self.value = os.path.join(self.dir, "notify")
            self.sock.bind(self.value)
        self.messages = []

    def recv(self, timeout=SERVE_TIMEOUT):
        self.sock.settimeout(timeout)
        lines = self.sock.recv(65536).decode().split("\n")
        self.messages.append(lines)
        return lines

    def until(self, line, timeout=SERVE_TIMEOUT):
        """Messages received up to and including the first one holding `line`."""
        got = []
        give_up = time.monotonic() + timeout
        while True:
            lines = self.recv(max(0.1, give_up - time.monotonic()))
            got.append(lines)
            if line in lines:
                return got

    def close(self):
        self.sock.close()
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class Launched(harness.Proxy):
    """A harness.Proxy started with a command line and environment of the test's choosing."""

    def serve_argv(self, python=harness.PYTHON):
        return [python, "-X", "dev", "-W", "error::ResourceWarning", harness.KILNPROXY, "serve",
                "--config", self.config_path]

    def launch(self, argv, env=None, pass_fds=()):
        self.log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=self.dir, env=env, pass_fds=pass_fds)
        return self

    def ports(self):
        self.port = int(self.wait_for_log(r"listening for SSH on [\d.]+:(\d+)", SERVE_TIMEOUT).group(1))
        self.admin_port = int(self.wait_for_log(r"admin API on http://[\d.]+:(\d+)/", SERVE_TIMEOUT).group(1))
        return self.port, self.admin_port


def ssh_banner(port):
    with socket.create_connection(("127.0.0.1", port), timeout=SERVE_TIMEOUT) as s:
        return s.makefile("rb").readline()


def healthz(port):
    with urllib.request.urlopen("http://127.0.0.1:%d/healthz" % port, timeout=SERVE_TIMEOUT) as r:
        return r.status


def clone_through(proxy, keys, tmp_path, name):
    harness.make_git_repo(proxy.repo_root, "%s/%s.git" % (harness.ACCOUNT, name), {"a.txt": b"through\n"})
    dest = tmp_path / ("clone-" + name)
    r = harness.run(["git", "clone", "-q", proxy.url("%s/%s.git" % (harness.ACCOUNT, name)), str(dest)],
                    env=harness.client_env(keys["user"]))
    assert r.returncode == 0, r.stderr
    assert (dest / "a.txt").read_bytes() == b"through\n"


def monotonic_usec():
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
