"""Logging to stderr; every line about a connection carries its session key right after timestamp and level."""
import logging
import re
import sys
import time

FORMAT = "%(asctime)s.%(msecs)03dZ %(levelname)s %(message)s"
DATEFMT = "%Y-%m-%dT%H:%M:%S"


def setup(level=logging.INFO, stream=None, fmt="text"):
    """Configure the root logger once (called by kilnproxy.py, never at import). fmt: `[log] format`, text or json
    (jsonlog.py)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if fmt == "json":
        from .jsonlog import JsonFormatter
        formatter = JsonFormatter()
    else:
        formatter = logging.Formatter(FORMAT, DATEFMT)
        formatter.converter = time.gmtime
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # paramiko logs scanner noise ("Error reading SSH protocol banner") with tracebacks at ERROR on its own
    # logger, once per connection; each connection logs its own one-line outcome instead. What paramiko says at
    # ERROR is still shown, once per distinct message, as a WARNING without its traceback lines.
    logging.getLogger("paramiko").setLevel(logging.ERROR)
    handler.addFilter(OncePerMessage("paramiko"))


class OncePerMessage(logging.Filter):
    """For the records of logger `name` and its children: passes each distinct message once (bounded memory), drops traceback lines (paramiko logs a traceback one line
    per record). Digits are ignored when comparing, so "unknown channel 7" and "unknown channel 9" are one message."""
    LIMIT = 1000

    def __init__(self, name):
        super().__init__()
        self.prefix = name
        self._seen = set()

    def filter(self, record):
        if record.name != self.prefix and not record.name.startswith(self.prefix + "."):
            return True
        msg = record.getMessage()
        stripped = msg.strip()
        if (not stripped or msg.startswith((" ", "\t", "Traceback")) or _EXCEPTION_LINE.match(msg)):
            return False
        key = _DIGITS.sub("#", stripped)[:200]
        if key in self._seen:
            return False
        if len(self._seen) < self.LIMIT:
            self._seen.add(key)
        # paramiko's ERROR is the connection's trouble, and that connection logs its own outcome: one WARNING
        record.msg, record.args = "paramiko: %s (logged once)", (stripped,)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_DIGITS = re.compile(r"\d+")
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(Error|Exception|Exit|Interrupt|Failure)(: |$)")


class SessionLog(logging.LoggerAdapter):
    """Prefixes every message with the session key."""

    def __init__(self, logger, session_key):
        super().__init__(logger, {"session": session_key})
        self.session_key = session_key

    def process(self, msg, kwargs):
        kwargs["extra"] = dict(self.extra, **kwargs.get("extra") or {})    # record.session (the json format's)
        return "%s %s" % (self.session_key, msg), kwargs


def for_session(session_key, name="kiln.session"):
    return SessionLog(logging.getLogger(name), session_key)
