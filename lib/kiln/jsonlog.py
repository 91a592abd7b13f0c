"""The "json" log format (`[log] format = "json"`): one JSON object per line, for log shippers.

The text format (log.py, the default) writes:
    2026-12-04T03:19:03.871Z INFO 0a1b2c3d end duration=1.234s bytes_in=10 bytes_out=20 exit=0 reason=completed
the json format the same record as:
    {"ts": "2026-12-04T03:19:03.871Z", "level": "INFO", "logger": "kiln.session", "session": "0a1b2c3d",
     "msg": "end duration=1.234s ...", "duration": 1.234, "bytes_in": 10, "bytes_out": 20, "exit": "0",
     "reason": "completed"}
The key=value fields of a line become members, taken from the call's format string and its arguments rather than
parsed back out of the text (a value may hold spaces: reason=protocol violation): `key=%d` gives a number,
`key=%.3fs` a number of seconds, `key=%s` / `key=%r` the argument itself (a string stays a string, so `exit` is
"0" or "signal:TERM"), several placeholders in one value (`remote=%s:%d`) the text they make, and a literal
`key=word` in the format string the word. A field never replaces ts, level, logger, session, msg or exc.
"""
import json
import logging
import math
import re
import time

DATEFMT = "%Y-%m-%dT%H:%M:%S"
RESERVED = frozenset(("ts", "level", "logger", "session", "msg", "exc", "stack"))

_CONVERSION = re.compile(r"%(?:\((?P<key>[^)]*)\))?[#0\- +]*(?P<width>\*|\d+)?(?:\.(?P<prec>\*|\d+))?[hlL]?"
                         r"(?P<type>[diouxXeEfFgGcrsa%])")
_FIELD = re.compile(r"(?<![\w.=%/?&])(?P<name>[A-Za-z_][\w.]*)=(?P<value>\S*)")
_UNIT = re.compile(r"(?:s|ms)?")


def rfc3339(created):
    """UTC, millisecond precision, as the text format's timestamp: 2026-12-04T03:19:03.871Z."""
    seconds = int(created)
    return "%s.%03dZ" % (time.strftime(DATEFMT, time.gmtime(seconds)), int((created - seconds) * 1000))


def _jsonable(value):
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else str(value)
    return str(value)


def _typed(conversion, arg):
    kind = conversion.group("type")
    try:
        if kind in "diu":
            return int(arg)
        if kind in "eEfFgG":
            value = float(arg)
            if not math.isfinite(value):
                return str(value)
            prec = conversion.group("prec")
            return round(value, int(prec)) if kind in "fF" and prec and prec.isdigit() else value
    except (TypeError, ValueError):
        return str(arg)
    return _jsonable(arg)


def fields(template, args):
    """The key=value fields of a log call (its format string and arguments) as {name: value}; see the docstring."""
    if not isinstance(template, str):
        return {}
    mapping = args if isinstance(args, dict) else None
    positional = args if isinstance(args, tuple) else ()
    conversions = []            # (start, end, match, argument) in template order
    index = 0
    # without arguments logging does not %-format the message: every % in it is literal
    for m in _CONVERSION.finditer(template) if args else ():
        if m.group("type") == "%":
            conversions.append((m.start(), m.end(), m, None))
            continue
        if mapping is not None:
            arg = mapping.get(m.group("key"))
        else:
            index += (m.group("width") == "*") + (m.group("prec") == "*")
            if index >= len(positional):
                return {}           # logging would fail to format it too
            arg = positional[index]
            index += 1
        conversions.append((m.start(), m.end(), m, arg))
    out = {}
    for f in _FIELD.finditer(template):
        name, start, end = f.group("name"), f.start("value"), f.end("value")
        inside = [c for c in conversions if c[0] >= start and c[1] <= end]
        if any(c[0] < end and c[1] > start for c in conversions if c not in inside):
            continue                # a placeholder straddles the field: not a field after all
        value_template = template[start:end]
        real = [c for c in inside if c[2].group("type") != "%"]
        if not real:
            value = value_template.replace("%%", "%") if args else value_template
        elif len(real) == 1 and real[0][0] == start and _UNIT.fullmatch(template, real[0][1], end):
            value = _typed(real[0][2], real[0][3])
        else:
            value = _render(template, start, end, inside, mapping)
        if name not in RESERVED and value != "":
            out[name] = value
    return out


def _render(template, start, end, inside, mapping):
    """The text one field's value makes: its slice of the format string filled with its own arguments."""
    pieces, at = [], start
    for c_start, c_end, m, arg in inside:
        pieces.append(template[at:c_start])
        spec = template[c_start:c_end]
        if m.group("key") is not None:
            spec = spec.replace("(%s)" % m.group("key"), "", 1)
        try:
            pieces.append("%" if m.group("type") == "%" else spec % (arg,))
        except (TypeError, ValueError):
            pieces.append(str(arg))
        at = c_end
    pieces.append(template[at:end])
    return "".join(pieces)


class JsonFormatter(logging.Formatter):
    """One JSON object per record, on one line (newlines in messages and tracebacks are escaped)."""

    def format(self, record):
        msg = record.getMessage()
        session = getattr(record, "session", None)
        template = record.msg
        if session is not None:
            prefix = "%s " % session
            if msg.startswith(prefix):
                msg = msg[len(prefix):]
            if isinstance(template, str) and template.startswith(prefix):
                template = template[len(prefix):]
        obj = {"ts": rfc3339(record.created), "level": record.levelname, "logger": record.name}
        if session is not None:
            obj["session"] = str(session)
        obj["msg"] = msg
        try:
            extra = fields(template, record.args)
        except Exception:           # a log line must never be lost to its own fields
            extra = {}
        obj.update(extra)
        if record.exc_info:
            obj["exc"] = self.formatException(record.exc_info)
        elif record.exc_text:
            obj["exc"] = record.exc_text
        if record.stack_info:
            obj["stack"] = self.formatStack(record.stack_info)
        return json.dumps(obj, ensure_ascii=True, separators=(", ", ": "))
