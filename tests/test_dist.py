"""dist/kilnproxy.pyz (tools/build_dist.py, `make dist`): built here from the repository and again from a clean
clone (the same bytes), then copied alone into an empty folder and run with the distribution's python3 -I, which has
no gevent or paramiko of its own, and an empty HOME: every CLI command, serve with a real git clone, sd_notify and
socket activation, the gevent patch before anything else, the cache folder (PEX_ROOT; unusable; concurrent first
starts), damaged and truncated files, and MemoryDenyWriteExecute / NoNewPrivileges as the unit sets them.

Slow (each build takes tens of seconds): marked `dist`, run by `make test-dist` (and .ci/run), not `make test`.
"""
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import zipfile

import pytest

import harness
from servicemanager import SERVE_TIMEOUT, Launched, NotifySocket, clone_through, healthz, ssh_banner

pytestmark = [pytest.mark.dist, pytest.mark.e2e]
ROOT = harness.ROOT
PEX = os.path.abspath(os.environ.get("KILN_PEX") or os.path.join(ROOT, ".venv-dist", "bin", "pex"))
WHEELHOUSE = os.path.abspath(os.environ.get("KILN_WHEELHOUSE") or os.path.join(ROOT, "build", "wheelhouse"))
PACKED = ["kilnproxy.py", "lib/kiln", "requirements-runtime.txt", "tools/build_dist.py", "tools/pyz_preamble.py"]
THIRD_PARTY = ("paramiko", "cryptography", "bottle", "psutil", "prometheus_client", "nacl", "bcrypt", "objgraph",
               "invoke", "ssl", "_ssl", "kiln")


def _build_python():
    if not os.path.exists(PEX):
        pytest.skip("no pex at %s: run `make test-dist` (it makes .venv-dist)" % PEX)
    return os.path.join(os.path.dirname(PEX), "python")


def build(source_root, out_dir):
    """Build with source_root's own tools/build_dist.py and a fresh pex cache; returns (path, version, sha256)."""
    out = os.path.join(out_dir, "kilnproxy.pyz")
    r = subprocess.run([_build_python(), os.path.join(source_root, "tools", "build_dist.py"), "--out", out,
                        "--wheelhouse", WHEELHOUSE, "--pex", PEX, "--pex-root", os.path.join(out_dir, "pex-root")],
                       cwd=source_root, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stdout + r.stderr
    path, version, digest = r.stdout.strip().splitlines()[-1].split()
    assert path == out
    return out, version, digest


def _python_minor(python):
    r = subprocess.run([python, "-I", "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                       capture_output=True, text=True, timeout=60)
    return r.stdout.strip() if r.returncode == 0 else None


def _has(python, module):
    return subprocess.run([python, "-I", "-c", "import " + module], capture_output=True, timeout=60).returncode == 0


@pytest.fixture(scope="module")
def system_python():
    """The distribution's python3 of the build's minor version, with no gevent or paramiko of its own."""
    want = _python_minor(_build_python())
    for candidate in ("/usr/bin/python3", "/usr/bin/python" + want, "/usr/local/bin/python3"):
        if os.path.exists(candidate) and _python_minor(candidate) == want \
                and not _has(candidate, "gevent") and not _has(candidate, "paramiko"):
            return candidate
    message = "no system python%s without gevent and paramiko (install python3)" % want
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return build(ROOT, str(tmp_path_factory.mktemp("build-a")))


class Bare:
    """The pyz alone in an empty folder, run with the system python3 -I, a fresh empty HOME and a minimal PATH."""

    def __init__(self, pyz, folder, python):
        self.dir = str(folder)
        os.makedirs(self.dir, exist_ok=True)
        self.pyz = os.path.join(self.dir, "kilnproxy.pyz")
        shutil.copyfile(pyz, self.pyz)
        os.chmod(self.pyz, 0o755)
        self.home = os.path.join(self.dir, "home")
        os.mkdir(self.home)
        self.python = python
        self.env = {"PATH": "/usr/bin:/bin", "HOME": self.home, "LANG": "C.UTF-8"}

    def argv(self, *args, python_args=(), pyz="kilnproxy.pyz"):
        return [self.python, "-I"] + list(python_args) + [pyz] + list(args)

    def run(self, *args, env=None, python_args=(), input=None, check_clean=True):
        r = subprocess.run(self.argv(*args, python_args=python_args), cwd=self.dir, env=dict(self.env, **(env or {})),
                           capture_output=True, text=True, timeout=300, input=input)
        if check_clean:
            assert "Traceback" not in r.stderr, r.stderr
        return r


@pytest.fixture
def bare(built, system_python, tmp_path):
    return Bare(built[0], tmp_path / "bare", system_python)


def _dirty(paths):
    r = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "--"] + paths, capture_output=True, text=True,
                       timeout=60)
    return r.stdout.strip()


@pytest.mark.timeout(1200)        # two builds (the module's first and a clean clone's) on a busy machine
def test_two_builds_of_one_commit_are_byte_identical(built, tmp_path):
    path, version, digest = built
    dirty = _dirty(PACKED)
    if dirty:
        # uncommitted changes: a clean clone would build other bytes; build the work tree once more instead
        again = build(ROOT, str(tmp_path / "build-b"))
    else:
        clone = str(tmp_path / "clone")
        subprocess.run(["git", "clone", "-q", "--no-hardlinks", ROOT, clone], check=True, timeout=300)
        again = build(clone, str(tmp_path / "build-b"))
    assert again[1] == version
    assert again[2] == digest, "builds differ: %s vs %s" % (path, again[0])
    with open(path, "rb") as f:
        assert hashlib.sha256(f.read()).hexdigest() == digest
    with zipfile.ZipFile(path) as z:
        assert z.testzip() is None
        names = z.namelist()
        assert "kiln/_version_stamp.py" in names and "kiln/dashboard/index.html" in names
        assert not any(n.endswith(".pyc") for n in names)
        wheels = {n.split("/")[1] for n in names if n.startswith(".deps/")}
        for project in ("gevent-", "greenlet-", "cryptography-", "psutil-", "paramiko-", "bcrypt-", "pynacl-"):
            assert any(w.startswith(project) for w in wheels), (project, wheels)
        for tool in ("pytest", "hypothesis", "selenium"):          # tests and tools stay out
            assert not any(w.lower().startswith(tool) for w in wheels), wheels
        assert z.read("kiln/_version_stamp.py").decode().count(version) == 1


def test_every_cli_command_from_a_bare_folder(bare, built, keys, system_python):
    version = built[1]
    assert not _has(system_python, "gevent") and not _has(system_python, "paramiko")   # the pyz brings its own
    r = bare.run("version")
    assert (r.returncode, r.stdout, r.stderr) == (0, version + "\n", "")
    r = subprocess.run(["./kilnproxy.pyz", "version"], cwd=bare.dir, env=bare.env, capture_output=True, text=True,
                       timeout=120)
    assert (r.returncode, r.stdout) == (0, version + "\n"), r.stderr
    r = bare.run("keys", "add", "--account", "initech", "--name", "Peter Gibbons", "--key-name", "Laptop",
                 keys["user"] + ".pub")
    assert r.returncode == 0, r.stderr
    fingerprint = r.stdout.strip()
    r = bare.run("keys", "list", "--json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["fingerprint"] == fingerprint, r.stderr
    with open(keys["user"] + ".pub") as f:
        pubkey = f.read()
    r = bare.run("keys", "add", "--account", "initech", "--name", "Peter Gibbons", "--key-name", "Again", "-",
                 input=pubkey)
    assert r.returncode == 2 and r.stderr.count("\n") == 1, r.stderr          # a duplicate: one line, exit 2
    r = bare.run("keys", "remove", fingerprint)
    assert (r.returncode, r.stdout.strip()) == (0, "removed " + fingerprint), r.stderr
    r = bare.run("serve", "--config", "missing.toml")
    assert r.returncode == 2 and "config file not found: missing.toml" in r.stderr, r.stderr
    r = bare.run("nonsense")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert os.path.isdir(os.path.join(bare.home, ".cache", "pex"))   # the default cache folder, under HOME
    assert sorted(os.listdir(bare.dir)) == ["home", "kilnproxy.pyz", "var"]


class PyzProxy(Launched):
    """A proxy served by the bare pyz (local backend)."""

    def __init__(self, bare, **extra):
        super().__init__(os.path.join(bare.dir, "site"), extra=extra)
        self.bare = bare

    def cli(self, *args, input=None, check=True):
        r = self.bare.run(*(list(args[:2]) + ["--config", self.config_path] + list(args[2:])), input=input)
        if check:
            assert r.returncode == 0, r.stderr
        return r

    def serve_argv(self, python=None):
        # from the proxy's own folder, not the pyz's: any working folder will do
        return self.bare.argv("serve", "--config", self.config_path, pyz=self.bare.pyz)

    def env(self, **more):
        return dict(self.bare.env, **more)


def _stop_cleanly(proxy):
    assert proxy.stop() == 0, proxy.read_log()[-3000:]
    assert not proxy.problems(), proxy.problems()


def test_serve_and_clone_from_a_bare_folder(bare, built, keys, tmp_path):
    proxy = PyzProxy(bare)
    proxy.add_key(keys["user"] + ".pub")
    proxy.launch(proxy.serve_argv(), env=proxy.env())
    try:
        proxy.ports()
        clone_through(proxy, keys, tmp_path, "bare")
        status, body = harness.admin_get(proxy, "/info")
        assert status == 200 and json.loads(body)["Version"] == built[1]     # what `version` prints
        assert re.search(r"KilnProxy %s started \(pid %d\)" % (re.escape(built[1]), proxy.proc.pid), proxy.read_log())
    finally:
        _stop_cleanly(proxy)


def test_sd_notify_and_socket_activation_from_the_pyz(bare, keys, tmp_path):
    """pex and serve re-execute in place: LISTEN_PID and the NOTIFY_SOCKET main PID still hold."""
    activate = shutil.which("systemd-socket-activate")
    if activate is None:
        pytest.skip("systemd-socket-activate missing (apt-get install systemd)")
    ns = NotifySocket()
    proxy = PyzProxy(bare, log={"format": "json"})
    proxy.add_key(keys["user"] + ".pub")
    ssh_port, admin_port = harness.free_port(), harness.free_port()
    try:
        proxy.launch([activate, "-l", "127.0.0.1:%d" % ssh_port, "--fdname=ssh", "-l", "127.0.0.1:%d" % admin_port,
                      "--fdname=admin", "-E", "NOTIFY_SOCKET=" + ns.value, "-E", "WATCHDOG_USEC=1000000"]
                     + proxy.serve_argv(), env=proxy.env())
        harness.wait_for_port("127.0.0.1", admin_port, timeout=SERVE_TIMEOUT, proc=proxy.proc)   # starts it
        got = ns.until("READY=1")
        assert got[0] == ["STATUS=starting"] and got[-1] == ["READY=1", "STATUS=serving 0 sessions"]
        assert ssh_banner(ssh_port).startswith(b"SSH-2.0-KilnProxy") and healthz(admin_port) == 200
        ns.until("WATCHDOG=1")
        proxy.port, proxy.admin_port = ssh_port, admin_port
        clone_through(proxy, keys, tmp_path, "activated")
        proxy.proc.send_signal(signal.SIGHUP)
        got = ns.until("READY=1")
        assert any("RELOADING=1" in m for m in got)
        proxy.proc.send_signal(signal.SIGTERM)
        ns.until("STOPPING=1")
        assert proxy.proc.wait(SERVE_TIMEOUT) == 0
        lines = [json.loads(line) for line in proxy.read_log().splitlines() if line.startswith("{")]
        assert any(o["msg"].startswith("socket activation: SSH on inherited descriptor 3 (ssh)") for o in lines)
    finally:
        ns.close()
        _stop_cleanly(proxy)


def _import_order(stderr):
    """[(depth, module)] from python -X importtime, in the order the imports completed."""
    out = []
    for line in stderr.splitlines():
        if line.startswith("import time:") and "|" in line and "imported package" not in line:
            name = line.rsplit("|", 1)[1]
            out.append(((len(name) - len(name.lstrip(" "))) // 2, name.strip()))
    return out


def test_gevent_patch_comes_before_anything_else_in_the_pyz(bare, built):
    with zipfile.ZipFile(built[0]) as z, open(harness.KILNPROXY, "rb") as f:
        # pex runs kilnproxy.py as it is (test_cli checks that it patches first), after its own boot code
        assert z.read("__pex_executable__.py") == f.read()
    r = bare.run("version", python_args=("-X", "importtime"))
    assert r.returncode == 0, r.stderr
    assert "MonkeyPatchWarning" not in r.stderr
    order = _import_order(r.stderr)
    names = [name for _, name in order]
    # `from gevent import monkey` is kilnproxy.py's first statement: the subtree of the last top-level `gevent`
    # import before gevent.monkey (greenlet, zope.interface come with it) starts where our process begins importing
    monkey = names.index("gevent.monkey")
    top = max(i for i in range(monkey) if names[i] == "gevent")
    depth = order[top][0]
    start = top
    while start > 0 and order[start - 1][0] > depth:
        start -= 1
    before = [n for n in names[:start] if n.split(".")[0] in THIRD_PARTY + ("gevent", "greenlet", "zope")]
    assert before == [], before           # only pex's bootstrap and the standard library ran before the patch
    patched = names.index("gevent.monkey")
    assert names.index("ssl") > patched and names.index("gevent.ssl") > patched      # ssl only through the patch
    assert min(names.index(n) for n in names if n == "kiln" or n.startswith("kiln.")) > names.index("gevent.ssl")


def test_pex_root_moves_the_cache_and_an_unusable_one_is_one_line(bare, tmp_path):
    cache = str(tmp_path / "elsewhere")
    r = bare.run("version", env={"PEX_ROOT": cache})
    assert r.returncode == 0 and os.path.isdir(os.path.join(cache, "installed_wheels")), r.stderr
    assert not os.path.exists(os.path.join(bare.home, ".cache"))
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    for unusable in (str(blocker / "cache"), "/proc/kilnproxy-cache"):
        r = bare.run("version", env={"PEX_ROOT": unusable})
        assert r.returncode == 2, r.stderr
        assert r.stdout == "" and r.stderr.count("\n") == 1, r.stderr
        assert r.stderr.startswith("kilnproxy.pyz: cannot use the cache folder %s (" % unusable), r.stderr
        assert "set PEX_ROOT" in r.stderr


def test_concurrent_first_starts_share_one_cache(bare, built, tmp_path):
    cache = str(tmp_path / "fresh")
    procs = [subprocess.Popen(bare.argv("version"), cwd=bare.dir, env=dict(bare.env, PEX_ROOT=cache),
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(6)]
    results = [p.communicate(timeout=600) + (p.returncode,) for p in procs]
    for out, err, code in results:
        assert (code, out, err) == (0, built[1] + "\n", ""), err
    r = bare.run("version", env={"PEX_ROOT": cache})
    assert (r.returncode, r.stdout) == (0, built[1] + "\n")


def test_truncated_or_damaged_pyz_is_one_clear_error(bare, built, tmp_path):
    with open(built[0], "rb") as f:
        data = f.read()
    truncated = os.path.join(bare.dir, "kilnproxy.pyz")
    with open(truncated, "wb") as f:
        f.write(data[:len(data) * 2 // 3])
    r = bare.run("version", env={"PEX_ROOT": str(tmp_path / "c1")})
    assert r.returncode == 1
    assert "this file is truncated or damaged (Python found no zip archive in it): copy it again" in r.stderr
    assert "Traceback" not in r.stderr and len(r.stderr.splitlines()) <= 4, r.stderr

    with zipfile.ZipFile(built[0]) as z:       # damage inside a member pex unpacks (our server module)
        info = z.getinfo("kiln/server.py")
        at = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra) + info.compress_size // 2
    damaged = bytearray(data)
    for i in range(at, at + 16):
        damaged[i] ^= 0x5A
    with open(truncated, "wb") as f:
        f.write(bytes(damaged))
    r = bare.run("version", env={"PEX_ROOT": str(tmp_path / "c2")})
    assert r.returncode == 1
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("kilnproxy.pyz: cannot start from "), r.stderr
    assert "copy it again" in r.stderr


LAUNCH_HARDENED = """import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
PR_SET_NO_NEW_PRIVS, PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN = 38, 65, 1
if libc.prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) or libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0):
    sys.exit("prctl failed: errno %d" % ctypes.get_errno())
os.execv(sys.argv[1], sys.argv[1:])
"""


def test_serve_and_clone_under_memory_deny_write_execute(bare, keys, tmp_path):
    """MemoryDenyWriteExecute=yes and NoNewPrivileges=yes as the kernel applies them (prctl PR_SET_MDWE, the same
    rule systemd's seccomp filter enforces): no writable+executable mapping in pex, gevent, cffi, cryptography."""
    probe = subprocess.run([sys.executable, "-c", "import ctypes; print(ctypes.CDLL(None).prctl(66, 0, 0, 0, 0))"],
                           capture_output=True, text=True, timeout=60)
    if probe.returncode != 0 or probe.stdout.strip().startswith("-"):
        pytest.skip("this kernel has no PR_SET_MDWE (Linux >= 6.3)")
    proxy = PyzProxy(bare)
    proxy.add_key(keys["user"] + ".pub")
    proxy.launch([sys.executable, "-c", LAUNCH_HARDENED] + proxy.serve_argv(), env=proxy.env())
    try:
        proxy.ports()
        with open("/proc/%d/status" % proxy.proc.pid) as f:
            status = f.read()
        assert re.search(r"^NoNewPrivs:\s+1$", status, re.M), status
        clone_through(proxy, keys, tmp_path, "hardened")
    finally:
        _stop_cleanly(proxy)
