"""The session registry: the one home of live state (connections, their identities and counters).

Used by the server (limits, close on drain), the admin API (/connections, DELETE) and metrics. Greenlets switch only
at I/O, so check-then-insert here is atomic without locks.
"""
import os
import time
from collections import Counter

from .timefmt import go_duration


def new_session_key():
    return os.urandom(4).hex()


class Session:
    def __init__(self, key, remote_addr):
        self.key = key
        self.remote_addr = remote_addr
        self.started_wall = time.time()
        self.started = time.monotonic()
        self.last_activity = self.started
        self.identity = None        # keystore.Identity once authenticated
        self.username = None        # the SSH login name the client gave (usually "git")
        self.command = None         # the client's exec string (validated) once parsed
        self.repo = None
        self.backend = None         # the name of the backend the session's account is routed to
        self.bytes_in = 0
        self.bytes_out = 0
        self.state = "login"        # waiting -> login -> authenticated -> running -> closing
        self.close_reason = None
        self._closer = None         # callable that ends this session from outside (admin DELETE, drain)
        self.handler = None         # the greenlet that handles it (the watchdog logs its stack)

    def duration(self):
        return time.monotonic() - self.started

    def set_closer(self, closer):
        self._closer = closer

    def close(self, reason):
        """Ask the session's handler to end it (idempotent)."""
        if self.close_reason is None:
            self.close_reason = reason
        closer, self._closer = self._closer, None
        if closer is not None:
            closer()

    def as_json(self):
        ident = self.identity
        return {
            "Account": ident.account if ident else None,
            "Name": ident.name if ident else None,
            "PublicKeyName": ident.key_name if ident else None,
            "Fingerprint": ident.fingerprint if ident else None,
            "SessionKey": self.key,
            "SessionDuration": go_duration(self.duration()),
            "RemoteAddr": "%s:%s" % self.remote_addr[:2] if self.remote_addr else None,
            "Command": self.command,
            "Repository": self.repo,
            "BytesIn": self.bytes_in,
            "BytesOut": self.bytes_out,
            "State": self.state,
            "Backend": self.backend,
        }


class Registry:
    def __init__(self):
        self._sessions = {}
        self._accounts = Counter()
        self.unauthenticated = 0

    def __len__(self):
        return len(self._sessions)

    def __iter__(self):
        return iter(list(self._sessions.values()))

    def get(self, key):
        return self._sessions.get(key)

    def add(self, session):
        while session.key in self._sessions:    # 8 hex chars can collide; keys must stay unique while live
            session.key = new_session_key()
        self._sessions[session.key] = session
        self.unauthenticated += 1
        return session

    def authenticate(self, session, identity):
        """Bind identity to session (the per-account limit was checked by the connection's admission lease)."""
        self._accounts[identity.account] += 1
        self.unauthenticated -= 1
        session.identity = identity
        session.state = "authenticated"

    def remove(self, session):
        if self._sessions.pop(session.key, None) is None:
            return
        if session.identity is None:
            self.unauthenticated -= 1
        else:
            account = session.identity.account
            self._accounts[account] -= 1
            if self._accounts[account] <= 0:
                del self._accounts[account]

    def authenticated(self):
        return [s for s in self._sessions.values() if s.identity is not None]
