"""memory.Trimmer: collects and trims only when the proxy has gone quiet after enough sessions."""
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "lib"))

from kiln.memory import Trimmer, _load_trim  # noqa: E402


class FakeLater:
    """Records spawn_later calls; run() fires them."""

    def __init__(self):
        self.calls = []
        self.killed = 0

    def __call__(self, delay, func):
        self.calls.append((delay, func))
        return self

    def kill(self, block=True):
        self.killed += 1

    def run(self):
        calls, self.calls = self.calls, []
        for _, func in calls:
            func()


def test_trims_when_quiet_after_enough_sessions():
    calls = []
    t = Trimmer(every=3, trim=lambda pad: calls.append(pad) or 1, collect=lambda: calls.append("gc") or 7)
    t.session_ended(live_sessions=5)
    t.session_ended(live_sessions=0)      # quiet, but only 2 sessions ended
    assert calls == []
    t.session_ended(live_sessions=1)      # 3 ended, but not quiet
    assert calls == []
    t.session_ended(live_sessions=0)
    assert calls == ["gc", 0] and t.trims == 1 and t.ended_since_trim == 0   # collect first, then trim


def test_waits_for_the_delay_and_trims_only_if_still_quiet():
    calls, live, later = [], [0], FakeLater()
    t = Trimmer(every=2, trim=lambda pad: calls.append("trim") or 1, collect=lambda: calls.append("gc") or 0,
                live=lambda: live[0], delay=1.5, spawn_later=later)
    t.session_ended(live_sessions=1)
    t.session_ended(live_sessions=0)
    assert calls == [] and [d for d, _ in later.calls] == [1.5]
    t.session_ended(live_sessions=0)      # one pending check is enough
    assert len(later.calls) == 1
    live[0] = 1                           # a new session arrived during the delay: no collection under load
    later.run()
    assert calls == [] and t.trims == 0
    live[0] = 0
    t.session_ended(live_sessions=0)      # the counter kept counting: quiet again, schedules again
    assert len(later.calls) == 1
    later.run()
    assert calls == ["gc", "trim"] and t.trims == 1 and t.ended_since_trim == 0


def test_cancel_kills_the_pending_check():
    later = FakeLater()
    t = Trimmer(every=1, trim=lambda pad: 1, collect=lambda: 0, live=lambda: 0, delay=1.0, spawn_later=later)
    t.session_ended(live_sessions=0)
    t.cancel()
    assert later.killed == 1
    t.cancel()                            # idempotent
    assert later.killed == 1


def test_real_malloc_trim_is_found_on_glibc():
    trim = _load_trim()
    assert trim is not None               # this project runs on glibc (Debian); elsewhere Trimmer is a no-op
    assert Trimmer(trim=trim).trim() in (True, False)


def test_backend_drained_collects_and_trims_once_quiet():
    """The pool's connections are freed pool_idle after the burst, after the sessions' trim: trim again."""
    calls, live, later = [], [0], FakeLater()
    t = Trimmer(every=50, trim=lambda pad: calls.append("trim") or 1, collect=lambda: calls.append("gc") or 0,
                live=lambda: live[0], delay=1.0, spawn_later=later)
    t.backend_drained()
    t.backend_drained()                   # one pending check is enough
    assert len(later.calls) == 1 and calls == []
    live[0] = 2                           # sessions again by then: not now
    later.run()
    assert calls == []
    live[0] = 0
    t.backend_drained()
    later.run()
    assert calls == ["gc", "trim"] and t.trims == 1


def test_use_system_allocator_reexecs_once_with_the_same_command_line():
    from kiln.memory import use_system_allocator
    env, calls = {}, []
    assert use_system_allocator(environ=env, execv=lambda path, argv: calls.append((path, argv))) is True
    assert env["PYTHONMALLOC"] == "malloc"
    assert calls == [(sys.executable, list(sys.orig_argv))]
    calls.clear()
    assert use_system_allocator(environ=env, execv=lambda path, argv: calls.append(argv)) is False   # after the exec
    assert calls == []
    env = {"PYTHONMALLOC": "pymalloc"}                              # the operator's choice stands
    assert use_system_allocator(environ=env, execv=lambda path, argv: calls.append(argv)) is False
    assert env == {"PYTHONMALLOC": "pymalloc"} and calls == []


def test_use_system_allocator_does_nothing_when_python_ignores_the_environment():
    """`python -I` / `-E` (as `python3 -I kilnproxy.pyz serve`): PYTHONMALLOC would be ignored after the exec."""
    from kiln.memory import use_system_allocator
    env, calls = {}, []
    assert use_system_allocator(environ=env, execv=lambda path, argv: calls.append(argv),
                                ignore_environment=True) is False
    assert env == {} and calls == []
