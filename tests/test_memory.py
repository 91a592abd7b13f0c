"""memory.Trimmer: trims only when the proxy has gone quiet after enough sessions."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

from kiln.memory import Trimmer, _load_trim  # noqa: E402


def test_trims_when_quiet_after_enough_sessions():
    calls = []
    t = Trimmer(every=3, trim=lambda pad: calls.append(pad) or 1)
    t.session_ended(live_sessions=5)
    t.session_ended(live_sessions=0)      # quiet, but only 2 sessions ended
    assert calls == []
    t.session_ended(live_sessions=1)      # 3 ended, but not quiet
    assert calls == []
    t.session_ended(live_sessions=0)
    assert calls == [0] and t.trims == 1 and t.ended_since_trim == 0


def test_real_malloc_trim_is_found_on_glibc():
    trim = _load_trim()
    assert trim is not None               # this project runs on glibc (Debian); elsewhere Trimmer is a no-op
    assert Trimmer(trim=trim).trim() in (True, False)
