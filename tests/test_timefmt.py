"""Go-style durations (lib/kiln/timefmt.py), as /info Uptime and /connections SessionDuration print them."""
import os
import re
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

import pytest  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from kiln.timefmt import go_duration  # noqa: E402

GO_FORM = re.compile(r"^(?:(\d+)h)?(?:(\d+)m)?(\d+)s$")


@pytest.mark.parametrize("seconds, expected", [
    (0, "0s"),
    (5, "5s"),
    (59, "59s"),
    (60, "1m0s"),
    (187, "3m7s"),
    (3599, "59m59s"),
    (3600, "1h0m0s"),
    (3601, "1h0m1s"),
    (3660, "1h1m0s"),
    (167 * 3600 + 10 * 60 + 2, "167h10m2s"),
    (1000 * 3600, "1000h0m0s"),
    (5.9, "5s"),        # whole seconds, truncated
    (0.4, "0s"),
    (187.999, "3m7s"),
    (-1, "0s"),
    (-0.5, "0s"),
    (-3600 * 5, "0s"),
])
def test_go_duration(seconds, expected):
    assert go_duration(seconds) == expected


@settings(deadline=None)
@given(st.integers(min_value=0, max_value=10 ** 9))
def test_go_duration_round_trips(n):
    text = go_duration(n)
    m = GO_FORM.match(text)
    assert m, text
    h, mi, s = (int(g) if g else 0 for g in m.groups())
    assert h * 3600 + mi * 60 + s == n
    assert s < 60
    if m.group(1):
        assert m.group(2) is not None and mi < 60   # Go always prints minutes once there are hours
    if m.group(2):
        assert mi < 60
    if n < 60:
        assert text == "%ds" % n


@settings(deadline=None)
@given(st.floats(min_value=-1e9, max_value=1e9, allow_nan=False))
def test_go_duration_of_floats(x):
    assert go_duration(x) == go_duration(max(0, int(x)))
