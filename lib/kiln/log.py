"""Logging to stderr; every line about a connection carries its session key right after timestamp and level."""
import logging
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
    # logger; each connection logs its own one-line outcome instead.
    logging.getLogger("paramiko").setLevel(logging.CRITICAL)


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
