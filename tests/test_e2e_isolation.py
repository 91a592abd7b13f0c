"""Isolation under attack, end to end: one test per finding of the security review.

Each test runs one attack from tests/attackers.py, from a loopback source address of its own, against one of the
module's proxies, and meanwhile measures a legitimate user from 127.0.0.2: the SSH banner must arrive within
BANNER_BOUND and a `git ls-remote` through the proxy must finish within LS_REMOTE_BOUND, every time it is sampled,
and the proxy's RSS must stay within RSS_BOUND of where it started. Then the finding's own expectation (the
connection is closed, the log line is there, the kex is refused) and, afterwards, the proxy is back at its
greenlet/descriptor baseline and still serves. Bounds are generous: these are isolation tests, not benchmarks.
"""
import os
import re
import subprocess
import threading
import time

import paramiko
import pytest

import attackers
import harness

pytestmark = pytest.mark.e2e

LEGIT = "127.0.0.2"             # the legitimate user's source address; attackers use others
BANNER_BOUND = 1.0
LS_REMOTE_BOUND = 3.0
RSS_BOUND = 64 * 1024 * 1024
ATTACK_SECONDS = 5.0
PROBE_REPO = "initech/probe.git"


# -- measuring the legitimate user ---------------------------------------------------------------------------------
def rss(pid):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS for %d" % pid)


def banner_time(proxy, timeout=3.0):
    """Seconds from connect (from LEGIT) to the proxy's `SSH-2.0-` line, or (None, why)."""
    started = time.monotonic()
    try:
        with attackers.connect(proxy.port, LEGIT, timeout) as s:
            line, _ = attackers.read_banner(s, timeout)
    except (OSError, EOFError) as e:
        return None, "%s after %.2fs" % (e.__class__.__name__, time.monotonic() - started)
    elapsed = time.monotonic() - started
    if not line.startswith(b"SSH-2.0-"):
        return None, "not a banner: %r" % line[:40]
    return elapsed, None


def legit_env(keys):
    env = harness.client_env(keys["user"])
    env["GIT_SSH_COMMAND"] += " -o BindAddress=" + LEGIT
    return env


def ls_remote_time(proxy, keys, timeout=6.0):
    """Seconds for `git ls-remote` of PROBE_REPO from LEGIT, or (None, why)."""
    started = time.monotonic()
    try:
        r = harness.run(["git", "ls-remote", proxy.url(PROBE_REPO)], env=legit_env(keys), timeout=timeout)
    except subprocess.TimeoutExpired:
        return None, "timed out after %gs" % timeout
    elapsed = time.monotonic() - started
    if r.returncode != 0 or b"refs/heads/main" not in r.stdout:
        err = " | ".join(ln for ln in r.stderr.decode(errors="replace").splitlines() if ln.strip())
        return None, "exit %d after %.2fs: %s" % (r.returncode, elapsed, err[:160])
    return elapsed, None


class Probe:
    """The legitimate user, in the background: banner and ls-remote samples one after the other (a short pause
    between) until stop(), and the proxy's RSS every 50 ms."""

    def __init__(self, proxy, keys, pause=0.2):
        self.proxy, self.keys, self.pause = proxy, keys, pause
        self.banners, self.ls_remotes = [], []
        self.rss_start = rss(proxy.proc.pid)
        self.rss_max = self.rss_start
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._sample, daemon=True),
                         threading.Thread(target=self._memory, daemon=True)]

    def start(self, delay=0.0):
        self._delay = delay
        for t in self._threads:
            t.start()
        return self

    def _sample(self):
        if self._stop.wait(self._delay):
            return
        for _ in range(200):
            if self._stop.is_set():
                break
            self.banners.append(banner_time(self.proxy))
            if self._stop.is_set():
                break
            self.ls_remotes.append(ls_remote_time(self.proxy, self.keys))
            self._stop.wait(self.pause)

    def _memory(self):
        for _ in range(20 * 120):
            try:
                self.rss_max = max(self.rss_max, rss(self.proxy.proc.pid))
            except (OSError, AssertionError):     # the proxy died: the test says so
                return
            if self._stop.wait(0.05):
                return

    def stop(self):
        self._stop.set()
        for t in self._threads:
            t.join(30)
        assert not any(t.is_alive() for t in self._threads), "probe did not stop"

    def problems(self):
        """The isolation bounds this run broke, each with what was measured."""
        out = []
        for what, samples, bound in (("banner", self.banners, BANNER_BOUND),
                                     ("ls-remote", self.ls_remotes, LS_REMOTE_BOUND)):
            if len(samples) < 2:
                out.append("only %d %s sample(s) in the attack (each took too long)" % (len(samples), what))
            bad = []
            for elapsed, why in samples:
                if elapsed is None:
                    bad.append("%s from %s failed: %s" % (what, LEGIT, why))
                elif elapsed >= bound:
                    bad.append("%s from %s took %.2fs (bound %gs)" % (what, LEGIT, elapsed, bound))
            out += bad[:3]
            if len(bad) > 3:
                out.append("... %d of %d %s samples broke the bound" % (len(bad), len(samples), what))
        growth = self.rss_max - self.rss_start
        if growth >= RSS_BOUND:
            out.append("proxy RSS grew by %d MiB (%d -> %d MiB; bound %d MiB)"
                       % (growth >> 20, self.rss_start >> 20, self.rss_max >> 20, RSS_BOUND >> 20))
        return out

    def summary(self):
        def fmt(samples):
            return "[%s]" % ", ".join("%.2f" % e if e is not None else "FAIL" for e, _ in samples)
        return "banner %s ls-remote %s rss %d -> max %d MiB" % (fmt(self.banners), fmt(self.ls_remotes),
                                                                 self.rss_start >> 20, self.rss_max >> 20)


# -- the proxies -------------------------------------------------------------------------------------------------------
# Three proxies for the whole module (starting one costs seconds: host keys, key registration). Each attack comes from
# a source address of its own, so that one test's penalties or per-source counts cannot help or hurt another.
PLAIN = {"timeouts": {"login": 3.0, "idle": 20.0}}
SLOW_LOGIN = {"timeouts": {"login": 10.0, "idle": 30.0}}      # the login timeout must not be what ends the attack
PENALISED = {"timeouts": {"login": 1.5, "idle": 20.0}, "limits": {"penalty_failures": 10, "penalty_seconds": 60.0}}


@pytest.fixture(scope="module")
def proxies(make_proxy, keys):
    """Factory: the module's proxy for a config (started on first use, with PROBE_REPO, warmed up from LEGIT);
    all stopped at the module's end."""
    started = {}

    def get(name, sections):
        if name not in started:
            proxy = make_proxy("local", backend={"pool_idle": 0.5}, **sections)
            started[name] = proxy
            harness.make_git_repo(proxy.repo_root, PROBE_REPO, {"a": b"a\n"})
            elapsed, why = ls_remote_time(proxy, keys)
            assert elapsed is not None, why
        return started[name]

    yield get
    for proxy in started.values():
        status = proxy.stop()
        assert status in (0, None), "proxy exited %s" % status
        assert not proxy.problems()


@pytest.fixture
def plain(proxies):
    return proxies("plain", PLAIN)


@pytest.fixture
def slow_login(proxies):
    return proxies("slow_login", SLOW_LOGIN)


@pytest.fixture
def penalised(proxies):
    return proxies("penalised", PENALISED)


def baseline(proxy):
    return harness.wait_for_baseline(proxy, harness.proxy_vitals(proxy))


def under_attack(proxy, keys, attack, seconds=ATTACK_SECONDS, probe_delay=0.5, until=None, min_seconds=2.5):
    """Run `attack` for `seconds` (or until `until()` is true, checked every 0.1 s, but at least `min_seconds` so
    that the probe has samples) with the Probe measuring from LEGIT; returns the stopped Probe. probe_delay lets
    the attack take hold first."""
    probe = Probe(proxy, keys)
    attack.start()
    probe.start(probe_delay)
    try:
        started = time.monotonic()
        while time.monotonic() < started + seconds:
            if until and until() and time.monotonic() >= started + min_seconds:
                break
            time.sleep(0.1)
    finally:
        probe.stop()
        attack.stop()
    return probe


def afterwards(proxy, keys, base):
    """The proxy is up, back at its baseline, and serves the legitimate user."""
    assert proxy.proc.poll() is None, "proxy exited %s" % proxy.proc.returncode
    # paramiko starts a handshake timer (a greenlet, handshake_timeout = 15 s) after the banner and never cancels it
    # when the handshake fails: after a flood of failed handshakes the greenlet count is back only after that long
    harness.wait_for_baseline(proxy, base, timeout=25)
    elapsed, why = ls_remote_time(proxy, keys)
    assert elapsed is not None, why


def check(problems, probe, attack):
    """Fail with every broken expectation and what was measured (the numbers also print, for -rP)."""
    print("measured: %s\nattack: %r" % (probe.summary(), attack.stats))
    if attack.error is not None:
        problems.append("the attack itself broke: %r" % attack.error)
    assert not problems, "\n".join(problems + ["measured: " + probe.summary(), "attack: %r" % (attack.stats,)])


def log_has(proxy, pattern, timeout=3.0):
    """Whether the proxy log matches pattern within timeout (the proxy logs a connection's end after closing it)."""
    give_up = time.monotonic() + timeout
    while True:
        if re.search(pattern, proxy.read_log()):
            return True
        if time.monotonic() >= give_up:
            return False
        time.sleep(0.1)


def refused_lines(proxy):
    return [ln for ln in proxy.read_log().splitlines() if " WARNING " in ln and "refused" in ln]


# -- 1: banner line ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("prefix", [b"SSH-2.0-", b""], ids=["identification-line", "pre-banner-line"])
def test_endless_banner_line_is_cut_off(plain, keys, prefix):
    """`SSH-2.0-` (or a pre-banner line) followed by megabytes and no newline: the proxy closes the connection once
    the line is past 8 KiB, and nobody else notices."""
    proxy = plain
    base = baseline(proxy)
    attack = attackers.BannerFlood(proxy.port, prefix=prefix, source="127.0.0.11" if prefix else "127.0.0.12")
    probe = under_attack(proxy, keys, attack)
    problems = probe.problems()
    if attack.stats.get("closed_by_proxy", 0) < 1:
        problems.append("the proxy never closed a connection sending an endless banner line")
    if attack.stats.get("longest_open", 0) > 2.0:
        problems.append("a connection sending an endless banner line stayed open %.1fs"
                        % attack.stats["longest_open"])
    check(problems, probe, attack)
    afterwards(proxy, keys, base)


# -- 2: fast sender before key exchange ---------------------------------------------------------------------------
def test_ignore_flood_before_kexinit_is_bounded(slow_login, keys):
    """SSH_MSG_IGNORE packets in the clear, as fast as loopback goes, before any KEXINIT: the proxy keeps serving
    others and disconnects the sender once it has sent its pre-authentication allowance (256 KiB), long before
    the login timeout."""
    proxy = slow_login
    base = baseline(proxy)
    attack = attackers.IgnoreFlood(proxy.port, source="127.0.0.13")
    probe = under_attack(proxy, keys, attack)
    problems = probe.problems()
    if attack.stats.get("closed_by_proxy", 0) < 1:
        problems.append("the proxy never disconnected a client streaming SSH_MSG_IGNORE before KEXINIT")
    if attack.stats.get("longest_open", 0) > 3.0:
        problems.append("a client streaming SSH_MSG_IGNORE before KEXINIT stayed connected %.1fs (%d bytes sent)"
                        % (attack.stats["longest_open"], attack.stats.get("bytes", 0)))
    check(problems, probe, attack)
    afterwards(proxy, keys, base)


# -- 3: channel window -----------------------------------------------------------------------------------------------
def many_refs_repo(proxy, name, count=40000):
    """A repository whose ref advertisement (~2.5 MB) is far bigger than what a client that never reads lets
    through: git-upload-pack blocks writing it and never reads its stdin."""
    bare = harness.make_git_repo(proxy.repo_root, name, {"a": b"a\n"})
    rev = harness.git_rev(bare)
    with open(os.path.join(bare, "packed-refs"), "w") as f:
        f.write("# pack-refs with: peeled fully-peeled sorted \n")
        f.write("".join("%s refs/heads/branch-%06d\n" % (rev, i) for i in range(count)))
    return name


@pytest.mark.parametrize("mode", ["before_exec", "stdin", "extended"])
def test_channel_window_overrun_disconnects(plain, keys, mode):
    """An authenticated client that ignores the 2 MiB channel window (data before exec; stdin to a command that
    does not read it; CHANNEL_EXTENDED_DATA from the client): it is disconnected ("peer ignored channel window"),
    nothing beyond the window is buffered, and the proxy's memory stays flat."""
    proxy = plain
    if mode == "stdin":
        repo = many_refs_repo(proxy, "initech/many-refs.git")
    else:
        repo = PROBE_REPO
    command = ("git-upload-pack '%s'" % repo).encode()
    base = baseline(proxy)
    source = {"before_exec": "127.0.0.14", "stdin": "127.0.0.15", "extended": "127.0.0.16"}[mode]
    attack = attackers.WindowOverrun(proxy.port, keys["user"], mode, command=command, source=source)
    probe = under_attack(proxy, keys, attack)
    problems = probe.problems()
    closes = attack.stats.get("closes", [])
    if attack.stats.get("disconnected", 0) < 1:
        problems.append("the proxy never disconnected a client that overran the channel window (%d MiB sent)"
                        % (attack.stats.get("bytes", 0) >> 20))
    for sent, seconds in closes:
        # a disconnect for the overrun comes with the first bytes past the window; the login timeout (4 s) or the
        # idle timeout would come later and only after the proxy buffered everything
        if sent > 64 * 1024 * 1024:
            problems.append("a client sent %d MiB past a 2 MiB window before the proxy disconnected it (%.1fs)"
                            % (sent >> 20, seconds))
            break
    if not log_has(proxy, r"ignored channel window"):
        problems.append("no 'peer ignored channel window' in the proxy log")
    check(problems, probe, attack)
    afterwards(proxy, keys, base)


# -- 4: silent sockets ----------------------------------------------------------------------------------------------
def test_silent_sockets_from_one_source_do_not_lock_out_others(plain, keys):
    """Silent TCP connections from 127.0.0.1, opened at up to 100/s and held (the review saw 10/s keep
    limits.max_startups full): a login from another address still works; the refusals are logged as counts,
    not a line each."""
    proxy = plain
    base = baseline(proxy)
    before = len(refused_lines(proxy))
    attack = attackers.SilentSockets(proxy.port, rate=100.0, max_open=150, source="127.0.0.17")
    probe = under_attack(proxy, keys, attack, seconds=7.0, probe_delay=1.5)
    problems = probe.problems()
    refused = attack.stats.get("refused", 0)
    if refused < 200:
        problems.append("the attack saw only %d refusals (want hundreds, to judge the log)" % refused)
    lines = refused_lines(proxy)[before:]
    if len(lines) >= 200:
        problems.append("%d 'refused' WARNING lines for %d refusals (want a count per interval); e.g. %s"
                        % (len(lines), refused, lines[-1]))
    check(problems, probe, attack)
    afterwards(proxy, keys, base)


# -- 5: Diffie-Hellman ---------------------------------------------------------------------------------------------
FINITE_FIELD = ["diffie-hellman-group14-sha256", "diffie-hellman-group16-sha512",
                "diffie-hellman-group-exchange-sha256"]


def test_finite_field_dh_not_offered_by_default(plain):
    """(The timeouts differ from the defaults; the key exchange algorithms do not.)"""
    kex = attackers.server_kexinit(plain.port, source="127.0.0.18")[0]
    offered = [k for k in kex if k.startswith("diffie-hellman-")]
    accepted = [k for k in FINITE_FIELD if attackers.kex_offer_accepted(plain.port, k, source="127.0.0.18")]
    assert not offered and not accepted, "offered %s; accepted when offered alone: %s" % (offered, accepted)


def test_dh_flood_does_not_starve_others(plain, keys):
    """8 threads doing diffie-hellman-group16-sha512 exchanges with a constant e (DHEat): the legitimate user
    does not notice, because the proxy refuses the key exchange (and bounds handshakes per source)."""
    proxy = plain
    base = baseline(proxy)
    attack = attackers.DHFlood(proxy.port, workers=8, source="127.0.0.19")
    probe = under_attack(proxy, keys, attack)
    problems = probe.problems()
    if attack.stats["replies"]:
        problems.append("the proxy answered %d group16 key exchanges (refused %d)"
                        % (attack.stats["replies"], attack.stats["refused"]))
    check(problems, probe, attack)
    afterwards(proxy, keys, base)


def test_client_rekeys_are_bounded(slow_login, keys):
    """An authenticated client running a command asks for new keys 200 times in a row: the proxy disconnects it
    before the 200th."""
    proxy = slow_login
    base = baseline(proxy)
    attack = attackers.RekeyFlood(proxy.port, keys["user"], ("git-upload-pack '%s'" % PROBE_REPO).encode(),
                                  max_rekeys=200, max_seconds=20.0, source="127.0.0.20")
    probe = under_attack(proxy, keys, attack, seconds=15.0, probe_delay=0.2,
                         until=lambda: bool(attack.stats["seconds"]))
    problems = probe.problems()
    if not attack.stats["disconnected"]:
        problems.append("the proxy allowed %d client-initiated rekeys on one connection in %.1fs"
                        % (attack.stats["rekeys"], attack.stats["seconds"]))
    check(problems, probe, attack)
    afterwards(proxy, keys, base)


# -- 8: penalties --------------------------------------------------------------------------------------------------
def penalty_flow(proxy, keys, source, bad_keys, idle_until_closed):
    base = baseline(proxy)
    src = re.escape(source)
    penalty = re.compile(r"penalty source=%s\b" % src)
    attack = attackers.FailedLogins(proxy.port, source, bad_keys, idle_until_closed, workers=2, max_connections=10,
                                    done=lambda: bool(penalty.search(proxy.read_log())), max_seconds=40.0)
    probe = under_attack(proxy, keys, attack, seconds=30.0, probe_delay=0.2, until=lambda: attack.done()
                         or attack.stats["connections"] >= 10 and not any(t.is_alive() for t in attack._threads))
    problems = probe.problems()
    if attack.stats["attempts"] < 9:
        problems.append("the attack made only %d failed attempts" % attack.stats["attempts"])
    if not log_has(proxy, r" WARNING .*auth failed source=%s\b" % src):
        reasons = sorted(set(re.findall(r" end .*reason=(.*)", proxy.read_log())))
        problems.append("no 'auth failed source=%s' line after %d failed attempts on %d connections "
                        "(end reasons in the log: %s)" % (source, attack.stats["attempts"],
                                                          attack.stats["connections"], reasons))
    if not log_has(proxy, penalty):
        problems.append("no 'penalty source=%s' line after %d failed attempts on %d connections"
                        % (source, attack.stats["attempts"], attack.stats["connections"]))
    else:
        closed, got = attackers.refused_at_accept(proxy.port, source)
        if not closed or got:
            problems.append("a penalised source was not refused at accept (closed=%s, received %r)"
                            % (closed, got[:40]))
    check(problems, probe, attack)
    afterwards(proxy, keys, base)


def test_failures_then_idle_until_login_timeout_are_penalised(penalised, keys):
    """Nine unregistered keys per connection, then silence until the login timeout: every failure counts."""
    bad = [paramiko.ECDSAKey.generate() for _ in range(9)]
    penalty_flow(penalised, keys, "127.0.0.3", bad, idle_until_closed=True)


def test_invalid_signatures_with_a_registered_key_are_penalised(penalised, keys):
    """A registered key's blob with a garbage signature, nine times per connection, then hang up."""
    bad = [attackers.GarbageSignatureKey(filename=keys["user"]) for _ in range(9)]
    penalty_flow(penalised, keys, "127.0.0.4", bad, idle_until_closed=False)
