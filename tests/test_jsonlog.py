"""The json log format (lib/kiln/jsonlog.py, `[log] format = "json"`): one object per line, fields from the log
call's format string and arguments; the text format unchanged. The proxy's own lines are checked in
test_e2e_systemd.py."""
import io
import json
import logging
import re

import pytest

from kiln import config, jsonlog
from kiln import log as kiln_log


@pytest.fixture
def capture():
    """capture(fmt) -> the stream the root logger now writes to; restores the root logger afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    made = []

    def setup(fmt):
        stream = io.StringIO()
        kiln_log.setup(stream=stream, fmt=fmt)
        made.append(stream)
        return stream

    yield setup
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    logging.getLogger("paramiko").setLevel(logging.NOTSET)


def _objects(stream):
    lines = stream.getvalue().splitlines()
    return [json.loads(line) for line in lines]


END = "end duration=%.3fs bytes_in=%d bytes_out=%d exit=%s reason=%s"


def test_end_line_has_its_fields_as_members(capture):
    stream = capture("json")
    kiln_log.for_session("0a1b2c3d").info(END, 1.23456, 1000, 20, "0", "protocol violation")
    (obj,) = _objects(stream)
    assert obj["session"] == "0a1b2c3d" and obj["level"] == "INFO" and obj["logger"] == "kiln.session"
    assert obj["msg"] == "end duration=1.235s bytes_in=1000 bytes_out=20 exit=0 reason=protocol violation"
    assert obj["duration"] == 1.235 and obj["bytes_in"] == 1000 and obj["bytes_out"] == 20
    assert obj["exit"] == "0" and obj["reason"] == "protocol violation"       # a reason may hold spaces
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", obj["ts"]), obj["ts"]


def test_ts_is_utc_rfc3339_with_milliseconds():
    assert jsonlog.rfc3339(0) == "1970-01-01T00:00:00.000Z"
    assert jsonlog.rfc3339(1422894889.5049) == "2015-02-02T16:34:49.504Z"


@pytest.mark.parametrize("template, args, expected", [
    ("start remote=%s:%d", ("192.0.2.1", 5555), {"remote": "192.0.2.1:5555"}),
    ("auth account=%s user=%r key_name=%r fingerprint=%s login=%r",
     ("initech", "Peter Gibbons", "Laptop", "SHA256:abc=", "git"),
     {"account": "initech", "user": "Peter Gibbons", "key_name": "Laptop", "fingerprint": "SHA256:abc=",
      "login": "git"}),
    ("refused source=%s reason=%s count=%d in the last %gs", ("192.0.2.1", "max_startups", 3, 10.0),
     {"source": "192.0.2.1", "reason": "max_startups", "count": 3}),
    ("refused source=%s reason=proxy_protocol (%s)", ("192.0.2.1", "no header"),
     {"source": "192.0.2.1", "reason": "proxy_protocol"}),
    ("descriptor limit: soft=%d hard=%d", (1024, 4096), {"soft": 1024, "hard": 4096}),
    ("malloc_trim released=%s in %.1f ms", (True, 2.0), {"released": True}),
    ("penalty source=%s seconds=%g failures=%d", ("::1", 30.0, 10), {"source": "::1", "seconds": 30.0,
                                                                    "failures": 10}),
    ("x=%(a)s y=%(b)d", {"a": "A B", "b": 3}, {"x": "A B", "y": 3}),
    ("literal a=word b=%d pct=50%%", (2,), {"a": "word", "b": 2, "pct": "50%"}),
    ("no arguments a=1 pct=5%%", (), {"a": "1", "pct": "5%%"}),
    ("admin API on http://%s:%d/?token=x", ("127.0.0.1", 80), {}),
    ("level=%s msg=%s ts=%s session=%s", ("a", "b", "c", "d"), {}),          # never replaces the envelope
    ("odd=%s", (float("nan"),), {"odd": "nan"}),
    ("obj=%s", (ValueError("boom"),), {"obj": "boom"}),
    ("short=%d %d", (1,), {}),                                                  # logging could not format it
])
def test_fields(template, args, expected):
    assert jsonlog.fields(template, args) == expected


def test_every_line_is_one_object_even_with_newlines_and_tracebacks(capture):
    stream = capture("json")
    log = logging.getLogger("kiln.test")
    log.warning("hub blocked for more than %gs by %r\n%s", 0.5, "greenlet", "  File x\n  File y")
    try:
        raise ValueError("boom")
    except ValueError:
        log.exception("internal error n=%d", 7)
    lines = stream.getvalue().splitlines()
    assert len(lines) == 2
    first, second = (json.loads(line) for line in lines)
    assert first["msg"].endswith("  File x\n  File y") and "session" not in first
    assert second["n"] == 7 and "ValueError: boom" in second["exc"] and second["level"] == "ERROR"


def test_text_format_is_unchanged(capture):
    stream = capture("text")
    kiln_log.for_session("0a1b2c3d").info(END, 1.5, 1, 2, "0", "completed")
    line = stream.getvalue().rstrip("\n")
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z INFO 0a1b2c3d end duration=1\.500s bytes_in=1 "
                        r"bytes_out=2 exit=0 reason=completed", line), line


def test_log_format_setting(tmp_path):
    assert config.build({}, str(tmp_path)).log.format == "text"
    assert config.build({"log": {"format": "json"}}, str(tmp_path)).log.format == "json"
    with pytest.raises(Exception, match="log.format: expected one of text, json"):
        config.build({"log": {"format": "xml"}}, str(tmp_path))
    with pytest.raises(Exception, match="unknown key log.level"):
        config.build({"log": {"level": "debug"}}, str(tmp_path))
