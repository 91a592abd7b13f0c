"""End to end: limits (per account, unauthenticated, per-source penalties), timeouts, signals (drain, SIGHUP)."""
import json
import re
import signal
import socket
import subprocess
import time

import pytest

import harness

pytestmark = pytest.mark.e2e


def held_session(proxy, key, repo):
    """An ssh running git-receive-pack that keeps stdin open and silent: a session that lasts until we end it.
    Returns the Popen after the ref advertisement arrived (the session is running)."""
    args = harness.ssh_args(key) + ["-p", str(proxy.port), "git@127.0.0.1", "git-receive-pack '%s'" % repo]
    proc = subprocess.Popen(args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = proc.stdout.readline()
    assert first, proc.stderr.read()
    return proc


def finish(proc, timeout=20):
    """End a held receive-pack cleanly (flush packet = no updates), return (status, stderr)."""
    try:
        proc.stdin.write(b"0000")
        proc.stdin.close()
    except BrokenPipeError:
        pass
    proc.wait(timeout)
    err = proc.stderr.read()
    proc.stdout.close()
    proc.stderr.close()
    return proc.returncode, err


def ls_remote(proxy, key, repo):
    return harness.run(["git", "ls-remote", proxy.url(repo)], env=harness.client_env(key), timeout=60)


def test_per_account_limit(make_proxy, keys):
    proxy = make_proxy("local", limits={"per_account": 2})
    harness.make_git_repo(proxy.repo_root, "initech/lim.git", {"a": b"a"})
    harness.make_git_repo(proxy.repo_root, "umbrella/lim.git", {"a": b"a"})
    held = [held_session(proxy, keys["user"], "initech/lim.git") for _ in range(2)]
    try:
        r = ls_remote(proxy, keys["user"], "initech/lim.git")
        assert r.returncode != 0
        assert b"kilnproxy: too many connections for account" in r.stderr
        # another account is not affected
        assert ls_remote(proxy, keys["other"], "umbrella/lim.git").returncode == 0
        users = harness.admin_json(proxy, "/connections")
        assert sum(u["Account"] == "initech" for u in users["CurrentlyAuthenticatedUsers"]) == 2
    finally:
        for p in held:
            assert finish(p)[0] == 0
    assert ls_remote(proxy, keys["user"], "initech/lim.git").returncode == 0


def test_max_startups_queues_excess_unauthenticated(make_proxy, keys):
    """Beyond limits.max_startups handshakes a connection waits for a slot (it has our banner, but no key exchange
    starts) instead of being reset; beyond limits.per_source_queue unauthenticated connections from one source, new
    ones are refused at once."""
    proxy = make_proxy("local", limits={"max_startups": 2, "per_source_queue": 3}, timeouts={"login": 30.0})
    harness.make_git_repo(proxy.repo_root, "initech/ms.git", {"a": b"a"})
    silent = [socket.create_connection(("127.0.0.1", proxy.port)) for _ in range(2)]
    try:
        for s in silent:
            s.settimeout(5)
            assert s.recv(100).startswith(b"SSH-2.0-KilnProxy")
        third = socket.create_connection(("127.0.0.1", proxy.port), timeout=5)
        try:
            assert third.recv(100) == b"SSH-2.0-KilnProxy\r\n"
            third.sendall(b"SSH-2.0-OpenSSH_9.2\r\n")
            third.settimeout(1)
            with pytest.raises(socket.timeout):
                third.recv(100)                       # waits: no KEXINIT while both slots are taken
            proxy.wait_for_log(r"start remote=127\.0\.0\.1:%d" % third.getsockname()[1])
            with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as fourth:
                assert fourth.recv(100) == b""        # a fourth unauthenticated one from this source: refused
            proxy.wait_for_log(r"refused source=127\.0\.0\.1 reason=max_startups \(3 unauthenticated")
            silent.pop().close()                      # a slot comes free: the waiting one gets its banner
            third.settimeout(10)
            assert third.recv(100)[5] == 20          # SSH_MSG_KEXINIT: its handshake started
            proxy.wait_for_log(r"waited [\d.]+s for a handshake slot")
        finally:
            third.close()
    finally:
        for s in silent:
            s.close()
    harness.wait_for_baseline(proxy, (10**6, 0, 10**6))
    assert ls_remote(proxy, keys["user"], "initech/ms.git").returncode == 0


def test_penalty_after_failed_logins(make_proxy, keys):
    proxy = make_proxy("local", limits={"penalty_failures": 3, "penalty_seconds": 3.0})
    harness.make_git_repo(proxy.repo_root, "initech/pen.git", {"a": b"a"})
    for _ in range(3):
        assert ls_remote(proxy, keys["unknown"], "initech/pen.git").returncode != 0
    proxy.wait_for_log(r"\w{8} penalty source=127\.0\.0\.1 seconds=3 failures=3")
    # a penalised source is refused before the handshake, even with a good key
    assert ls_remote(proxy, keys["user"], "initech/pen.git").returncode != 0
    penalised_at = time.monotonic()
    proxy.wait_for_log(r"refused source=127\.0\.0\.1 reason=penalty")
    give_up = penalised_at + 15          # the penalty is 3 s: poll for its end instead of sleeping through it
    while True:
        r = ls_remote(proxy, keys["user"], "initech/pen.git")
        if r.returncode == 0 or time.monotonic() > give_up:
            break
        time.sleep(0.2)
    assert r.returncode == 0, r.stderr


def test_auth_failure_lines_for_fail2ban(proxy_local, keys):
    ls_remote(proxy_local, keys["unknown"], "initech/x.git")
    proxy_local.wait_for_log(r"WARNING [0-9a-f]{8} auth failed source=127\.0\.0\.1 login='git' failures=\d+")


def test_session_timeout(make_proxy, keys):
    proxy = make_proxy("ssh", timeouts={"session": 2.0, "idle": 60.0})
    harness.make_git_repo(proxy.repo_root, "initech/st.git", {"a": b"a"})
    p = held_session(proxy, keys["user"], "initech/st.git")
    p.wait(15)
    err = p.stderr.read()
    harness.reap(p)
    assert p.returncode != 0
    assert b"kilnproxy: session timeout" in err
    proxy.wait_for_log(r"\w{8} end .*reason=session timeout")


def test_sigterm_drains(make_proxy, keys):
    proxy = make_proxy("ssh", timeouts={"drain": 20.0})
    harness.make_git_repo(proxy.repo_root, "initech/drain.git", {"a": b"a"})
    held = held_session(proxy, keys["user"], "initech/drain.git")
    assert harness.admin_get(proxy, "/healthz")[0] == 200
    proxy.proc.send_signal(signal.SIGTERM)
    proxy.wait_for_log(r"signal SIGTERM: draining")
    status, _ = harness.admin_get(proxy, "/healthz")
    assert status == 503
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", proxy.port), timeout=2).close()
    assert proxy.proc.poll() is None            # still running: a session is in flight
    assert finish(held)[0] == 0                 # the in-flight session completes normally
    assert proxy.proc.wait(15) == 0
    assert "drained" in proxy.read_log()


def test_drain_timeout_closes_leftovers(make_proxy, keys):
    proxy = make_proxy("local", timeouts={"drain": 1.0})
    harness.make_git_repo(proxy.repo_root, "initech/drain2.git", {"a": b"a"})
    held = held_session(proxy, keys["user"], "initech/drain2.git")
    started = time.monotonic()
    proxy.proc.send_signal(signal.SIGTERM)
    assert proxy.proc.wait(15) == 0
    assert time.monotonic() - started < 10
    held.wait(10)
    harness.reap(held)
    assert held.returncode != 0
    proxy.wait_for_log(r"\w{8} end .*reason=shutdown")


def test_second_signal_exits_at_once(make_proxy, keys):
    proxy = make_proxy("local", timeouts={"drain": 60.0})
    harness.make_git_repo(proxy.repo_root, "initech/drain3.git", {"a": b"a"})
    held = held_session(proxy, keys["user"], "initech/drain3.git")
    try:
        proxy.proc.send_signal(signal.SIGTERM)
        proxy.wait_for_log(r"signal SIGTERM: draining")
        proxy.expected_exit = 1
        proxy.proc.send_signal(signal.SIGINT)
        assert proxy.proc.wait(10) == 1
        proxy.wait_for_log(r"second signal SIGINT: exiting now")
    finally:
        harness.reap(held)


def test_sighup_reloads_keys_without_dropping_sessions(make_proxy, keys, tmp_path):
    proxy = make_proxy("ssh")
    harness.make_git_repo(proxy.repo_root, "initech/hup.git", {"a": b"a"})
    newkey = harness.keygen(str(tmp_path / "id_new"))
    assert ls_remote(proxy, newkey, "initech/hup.git").returncode != 0
    held = held_session(proxy, keys["user"], "initech/hup.git")
    fp_new = proxy.add_key(newkey + ".pub", key_name="New laptop")
    fp_user = [k["fingerprint"] for k in json.loads(proxy.cli("keys", "list", "--json").stdout)
               if k["key_name"] == "Laptop"][0]
    proxy.cli("keys", "remove", fp_user)
    proxy.proc.send_signal(signal.SIGHUP)
    proxy.wait_for_log(r"reloaded: \d+ keys")
    r = ls_remote(proxy, newkey, "initech/hup.git")
    assert r.returncode == 0, r.stderr               # the added key opens sessions
    assert ls_remote(proxy, keys["user"], "initech/hup.git").returncode != 0     # the removed one cannot
    assert finish(held)[0] == 0                      # the session that was running survived the reload
    assert fp_new.startswith("SHA256:")


def test_client_sockets_carry_tcp_keepalive(make_proxy, keys):
    """Half-open connections (a client whose machine vanished) are found by TCP keepalives: the kernel's view of
    the proxy's accepted socket shows the keepalive timer armed with timeouts.keepalive."""
    proxy = make_proxy("local", timeouts={"keepalive": 7.0, "keepalive_max": 2})
    harness.make_git_repo(proxy.repo_root, "initech/ka.git", {"a": b"a"})
    held = held_session(proxy, keys["user"], "initech/ka.git")
    try:
        # while bytes are in flight the kernel shows the retransmit timer instead ("timer:(on,...)"): look again
        give_up = time.monotonic() + 10
        while True:
            out = subprocess.run(["ss", "-tno", "state", "established", "( sport = :%d )" % proxy.port],
                                 capture_output=True, text=True, check=True).stdout
            if "timer:(keepalive," in out or time.monotonic() > give_up:
                break
            time.sleep(0.1)
        assert "timer:(keepalive," in out, out

        m = re.search(r"timer:\(keepalive,(?:(\d+)min)?([\d.]+)(ms|sec)", out)
        assert m, out
        secs = int(m.group(1) or 0) * 60 + float(m.group(2)) * (0.001 if m.group(3) == "ms" else 1)
        assert 0 < secs <= 7.0, out          # the default (15 s) would show here if the setting were ignored
    finally:
        assert finish(held)[0] == 0


def test_serve_runs_on_glibc_malloc_under_its_own_pid(proxy_local, keys):
    """`serve` re-executes itself once with PYTHONMALLOC=malloc (memory.use_system_allocator): same PID (the one the
    operator's supervisor started), same command line (-X dev and -W kept), and it serves."""
    with open("/proc/%d/environ" % proxy_local.proc.pid, "rb") as f:
        environ = f.read().split(b"\0")
    assert b"PYTHONMALLOC=malloc" in environ
    with open("/proc/%d/cmdline" % proxy_local.proc.pid, "rb") as f:
        cmdline = f.read().split(b"\0")
    assert b"-X" in cmdline and b"dev" in cmdline and b"serve" in cmdline
    harness.make_git_repo(proxy_local.repo_root, "initech/alloc.git", {"a": b"a"})
    out = ls_remote(proxy_local, keys["user"], "initech/alloc.git")
    assert out.returncode == 0 and b"refs/heads/main" in out.stdout


def test_burst_of_200_from_one_address_on_default_limits(make_proxy, keys):
    """Issue 11: 200 concurrent ls-remote from one address, default limits and timeouts (per_account raised):
    connections beyond the handshake budget wait for a slot instead of being reset; every one succeeds."""
    proxy = make_proxy("ssh", limits={"per_account": 250})
    harness.make_git_repo(proxy.repo_root, "initech/burst.git", {"a": b"a"})
    env = harness.client_env(keys["user"])
    procs = [subprocess.Popen(["git", "ls-remote", proxy.url("initech/burst.git")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for _ in range(200)]
    failures = []
    try:
        for p in procs:
            out, err = p.communicate(timeout=240)
            if p.returncode != 0 or b"refs/heads/main" not in out:
                failures.append(err[-300:])
    finally:
        for p in procs:
            harness.reap(p)
    assert not failures, "%d of 200 failed: %r" % (len(failures), failures[:3])
    harness.wait_for_baseline(proxy, (10**6, 0, 10**6))      # every session has ended (and logged its end)
    log = proxy.read_log()
    assert "refused source=" not in log
    assert len(re.findall(r"end .*reason=completed", log)) >= 200


def test_max_connections_holds_new_ones_in_the_backlog_and_counts(make_proxy, keys):
    proxy = make_proxy("local", limits={"max_connections": 2}, timeouts={"login": 30.0})
    held = [socket.create_connection(("127.0.0.1", proxy.port), timeout=5) for _ in range(2)]
    try:
        for s in held:
            assert s.recv(100).startswith(b"SSH-2.0-")
        proxy.wait_for_log(r"limit max_connections=2 reached")
        with socket.create_connection(("127.0.0.1", proxy.port), timeout=5) as third:   # the kernel's backlog
            third.settimeout(1)
            with pytest.raises(socket.timeout):
                third.recv(100)                    # not served (nor reset) while both handlers are busy
            held.pop().close()
            third.settimeout(10)
            assert third.recv(100).startswith(b"SSH-2.0-")
        status, body = harness.admin_get(proxy, "/metrics")
        assert re.search(rb'kiln_limit_rejections_total\{limit="max_connections"\} [1-9]', body), body[-2000:]
    finally:
        for s in held:
            s.close()
    harness.wait_for_baseline(proxy, (10**6, 0, 10**6))
