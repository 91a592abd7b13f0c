"""Configuration: every setting declared once (section, name, type, default, doc), loaded from TOML and validated.

Pure logic apart from reading the file: `load(path)` returns a Config or raises ConfigError with one line naming the
problem. Relative paths resolve against the config file's folder; defaults that mention <state_dir> follow it.
"""
import math
import os
import re
import tomllib
from types import SimpleNamespace

from .errors import ConfigError


class Setting:
    def __init__(self, section, name, kind, default, doc, choices=None):
        self.section, self.name, self.kind, self.default, self.doc = section, name, kind, default, doc
        self.choices = choices

    @property
    def dotted(self):
        return "%s.%s" % (self.section, self.name) if self.section else self.name


# kind: "str", "strs", "startups", "path", "paths", "address", "seconds", "count", "bool", "choice", "ciphers", "cidrs"
SETTINGS = [
    Setting("", "state_dir", "path", "var", "host keys, key store, local repositories"),
    Setting("proxy", "listen", "address", "127.0.0.1:2222", "SSH listen address host:port"),
    Setting("proxy", "host_keys", "paths", [],
            "host key files; default <state_dir>/ssh_host_ed25519_key and ssh_host_rsa_key, generated if absent"),
    Setting("proxy", "ciphers", "ciphers", ["aes128-gcm@openssh.com", "aes256-gcm@openssh.com"],
            "ciphers offered to clients, from aes128-gcm@openssh.com, aes256-gcm@openssh.com, aes128-ctr, "
            "aes192-ctr, aes256-ctr (clients choose; add the CTR ones only for clients without AES-GCM)"),
    Setting("proxy", "proxy_protocol", "choice", "off",
            "PROXY protocol (v1 and v2, detected) from a load balancer: 'off'; 'optional': used when a connection "
            "starts with a header; 'required': a connection without one is refused",
            choices=("off", "optional", "required")),
    Setting("proxy", "proxy_trusted", "cidrs", ["127.0.0.1/32", "::1/128"],
            "sources allowed to send a PROXY header (CIDR list); a header from any other source refuses the "
            "connection"),
    Setting("admin", "listen", "address", "127.0.0.1:6060", "admin HTTP listen address host:port"),
    Setting("admin", "token", "str", "", "when set, every admin route but /healthz needs 'Authorization: Bearer <token>'"),
    Setting("admin", "hosts", "strs", [],
            "further Host header names the admin API answers to (besides its listen address, localhost, 127.0.0.1 "
            "and [::1]); 'name' matches on any port, 'name:port' only that port, a Host without a port means 80; "
            "a request for any other Host is refused with 421 (DNS rebinding)"),
    Setting("admin", "tracemalloc", "bool", False, "start tracemalloc at start-up (heap allocation sites on /debug/heap)"),
    Setting("admin", "max_blocking_time", "seconds", 0.5,
            "gevent monitor: report the hub blocked longer than this (0 turns the monitor off)", ),
    Setting("keystore", "kind", "choice", "sqlite", "'sqlite' (keystore.path) or 'postgres' (keystore.dsn)",
            choices=("sqlite", "postgres")),
    Setting("keystore", "dsn", "str", "", "postgres: libpq URI or key=value string; password via PGPASSWORD/.pgpass"),
    Setting("keystore", "path", "path", "<state_dir>/keys.db", "SQLite key store"),
    Setting("backend", "kind", "choice", "local", "'local' runs git/hg here; 'ssh' forwards to an SSH backend",
            choices=("local", "ssh")),
    Setting("backend", "repo_root", "path", "<state_dir>/repos", "local: where repositories live"),
    Setting("backend", "address", "address", "127.0.0.1:22", "ssh: backend sshd host:port"),
    Setting("backend", "user", "str", "git", "ssh: backend login"),
    Setting("backend", "identity", "path", "<state_dir>/backend_key", "ssh: the proxy's private key toward the backend"),
    Setting("backend", "known_hosts", "path", "<state_dir>/backend_known_hosts", "ssh: pinned backend host keys"),
    Setting("backend", "max_sessions", "count", 8,
            "ssh: sessions multiplexed on one backend connection (keep below the backend sshd's MaxSessions)"),
    Setting("backend", "pool_idle", "seconds", 60.0,
            "ssh: close a pooled backend connection after this long without sessions; 0 = never pool"),
    Setting("backend", "pool_max_idle", "count", 8,
            "ssh: at most this many pooled backend connections wait without sessions; the oldest beyond close"),
    Setting("timeouts", "login", "seconds", 10.0, "TCP accept -> authenticated and command received"),
    Setting("timeouts", "dial", "seconds", 5.0, "backend TCP connect + SSH handshake + auth"),
    Setting("timeouts", "dial_queue", "seconds", 30.0,
            "under a burst, how long a session may wait for one of limits.max_dials dial slots"),
    Setting("timeouts", "idle", "seconds", 600.0, "no payload bytes in either direction"),
    Setting("timeouts", "session", "seconds", 3600.0, "whole connection"),
    Setting("timeouts", "drain", "seconds", 30.0, "on SIGTERM: how long running sessions may finish"),
    Setting("timeouts", "grace", "seconds", 10.0,
            "watchdog: a session idle past timeouts.idle + grace, or older than timeouts.session + grace, is a bug; "
            "it is logged at ERROR with its stack and closed"),
    Setting("timeouts", "keepalive", "seconds", 15.0,
            "TCP keepalive idle time and probe interval toward clients (finds half-open connections); 0 = off"),
    Setting("timeouts", "keepalive_max", "count", 3,
            "unanswered TCP keepalive probes before a client's connection is dropped"),
    Setting("limits", "max_connections", "count", 1000, "concurrent TCP connections"),
    Setting("limits", "per_account", "count", 20, "concurrent authenticated sessions per account"),
    Setting("limits", "max_startups", "count", 100,
            "concurrent handshakes (TCP accept -> authenticated); more connections wait, before the banner, for up "
            "to timeouts.login instead of being reset"),
    Setting("limits", "per_source_startups", "count", 20,
            "concurrent handshakes from one source address (like OpenSSH PerSourceMaxStartups); more wait their turn"),
    Setting("limits", "per_source_queue", "count", 256,
            "unauthenticated connections (in a handshake or waiting) from one source address; more are refused"),
    Setting("limits", "startups_drop", "startups", "400:30:1000",
            "random early drop (OpenSSH MaxStartups start:rate:full): with start unauthenticated connections, "
            "refuse new ones with probability rate%, rising linearly to 100% at full"),
    Setting("limits", "max_dials", "count", 16,
            "concurrent backend dials (connect + handshake + auth); more wait up to timeouts.dial_queue"),
    Setting("limits", "penalty_failures", "count", 10,
            "failed logins from one source address before it is penalised (like OpenSSH PerSourcePenalties)"),
    Setting("limits", "penalty_seconds", "seconds", 30.0, "how long a penalised source address is refused"),
    Setting("log", "format", "choice", "text", "'text' lines, or 'json': one object per line", choices=("text", "json")),
]

_BY_SECTION = {}
for _s in SETTINGS:
    _BY_SECTION.setdefault(_s.section, {})[_s.name] = _s
del _s


def parse_address(text, what):
    if not isinstance(text, str) or ":" not in text:
        raise ConfigError("%s: expected host:port, got %r" % (what, text))
    host, _, port = text.rpartition(":")
    host = host.strip("[]")
    if not host or any(c.isspace() for c in host):
        raise ConfigError("%s: missing host in %r" % (what, text))
    # int() alone would also take " 22", "+22", "2_2" and non-ASCII digits
    if not (port.isascii() and port.isdigit()):
        raise ConfigError("%s: bad port in %r" % (what, text))
    port_num = int(port)
    if not 0 <= port_num <= 65535:
        raise ConfigError("%s: port out of range in %r" % (what, text))
    return host, port_num


def _finite(number):
    try:
        return math.isfinite(number)
    except OverflowError:  # an int too large for a float
        return False


def _convert(setting, value, base_dir, state_dir):
    what = setting.dotted
    kind = setting.kind

    def path(p):
        if not isinstance(p, str) or not p or "\0" in p:
            raise ConfigError("%s: expected a path, got %r" % (what, p))
        if state_dir is not None:
            p = p.replace("<state_dir>", state_dir)
        return os.path.normpath(os.path.join(base_dir, os.path.expanduser(p)))

    if kind == "str":
        if not isinstance(value, str):
            raise ConfigError("%s: expected a string, got %r" % (what, value))
        return value
    if kind == "strs":
        if not isinstance(value, list) or any(not isinstance(v, str) or not v or not v.isprintable() for v in value):
            raise ConfigError("%s: expected a list of non-empty strings, got %r" % (what, value))
        return list(value)
    if kind == "startups":
        from .limits import parse_startups_drop
        try:
            parse_startups_drop(value)
        except ValueError as e:
            raise ConfigError("%s: %s" % (what, e)) from None
        return value
    if kind == "cidrs":
        from .proxyproto import parse_networks
        try:
            return [str(net) for net in parse_networks(value, what)]
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if kind == "path":
        return path(value)
    if kind == "paths":
        if not isinstance(value, list):
            raise ConfigError("%s: expected a list of paths, got %r" % (what, value))
        return [path(v) for v in value]
    if kind == "address":
        return parse_address(value, what)
    if kind == "seconds":
        # TOML allows inf and nan; neither is a usable timeout
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not _finite(value) or value < 0:
            raise ConfigError("%s: expected a number of seconds >= 0, got %r" % (what, value))
        return float(value)
    if kind == "count":
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError("%s: expected a whole number >= 1, got %r" % (what, value))
        return value
    if kind == "ciphers":
        allowed = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr")
        if (not isinstance(value, list) or not value
                or any(not isinstance(c, str) or c not in allowed for c in value)):
            raise ConfigError("%s: expected a non-empty list from %s, got %r" % (what, ", ".join(allowed), value))
        return list(value)
    if kind == "bool":
        if not isinstance(value, bool):
            raise ConfigError("%s: expected true or false, got %r" % (what, value))
        return value
    if kind == "choice":
        if value not in setting.choices:
            raise ConfigError("%s: expected one of %s, got %r" % (what, ", ".join(setting.choices), value))
        return value
    raise AssertionError(kind)


def _show_key(key):
    """A TOML key as one printable token (quoted keys may hold newlines or spaces)."""
    return key if key and key.isprintable() and " " not in key else repr(key)


BACKEND_NAME_RE = re.compile(r"[A-Za-z0-9_-]{1,32}")


def _named_backends(data, base_dir, state_dir, default):
    """[backends.NAME] tables (the same keys as [backend], which is the one named "default") -> {name: namespace}."""
    tables = data.get("backends", {})
    if not isinstance(tables, dict):
        raise ConfigError("[backends] must hold tables: [backends.NAME]")
    named = {"default": default}
    for name, given in tables.items():
        if not BACKEND_NAME_RE.fullmatch(name) or name == "default":
            raise ConfigError("[backends.%s]: a backend name is 1-32 of A-Z a-z 0-9 _ - (and not 'default', which is "
                              "[backend])" % _show_key(name))
        if not isinstance(given, dict):
            raise ConfigError("[backends.%s] must be a table" % name)
        for sub in given:
            if sub not in _BY_SECTION["backend"]:
                raise ConfigError("unknown key backends.%s.%s" % (name, _show_key(sub)))
        values = {}
        for key, setting in _BY_SECTION["backend"].items():
            named_setting = Setting("backends.%s" % name, key, setting.kind, setting.default, setting.doc,
                                    setting.choices)
            values[key] = _convert(named_setting, given.get(key, setting.default), base_dir, state_dir)
        named[name] = SimpleNamespace(name=name, **values)
    return named


def build(data, base_dir):
    """Validate a parsed TOML mapping and return the Config namespace (config.section.name)."""
    if not isinstance(data, dict):
        raise ConfigError("configuration must be a table")
    for key, value in data.items():
        if key == "backends":
            continue                    # tables of tables, checked by _named_backends
        if key in _BY_SECTION and key != "":
            if not isinstance(value, dict):
                raise ConfigError("[%s] must be a table" % key)
            for sub in value:
                if sub not in _BY_SECTION[key]:
                    raise ConfigError("unknown key %s.%s" % (key, _show_key(sub)))
        elif key not in _BY_SECTION[""]:
            raise ConfigError("unknown key %s" % _show_key(key))
    top = _BY_SECTION[""]
    state_dir = _convert(top["state_dir"], data.get("state_dir", top["state_dir"].default), base_dir, None)
    cfg = SimpleNamespace(state_dir=state_dir, base_dir=base_dir)
    for section, settings in _BY_SECTION.items():
        if not section:
            continue
        given = data.get(section, {})
        values = {name: _convert(s, given.get(name, s.default), base_dir, state_dir) for name, s in settings.items()}
        setattr(cfg, section, SimpleNamespace(**values))
    cfg.backend.name = "default"
    cfg.backends = _named_backends(data, base_dir, state_dir, cfg.backend)
    if not cfg.proxy.host_keys:
        cfg.proxy.host_keys = [os.path.join(state_dir, "ssh_host_ed25519_key"), os.path.join(state_dir, "ssh_host_rsa_key")]
        cfg.proxy.generate_host_keys = True
    else:
        cfg.proxy.generate_host_keys = False
    return cfg


def load(path):
    """Load and validate the TOML file at path; None means built-in defaults relative to the current directory."""
    if path is None:
        return build({}, os.getcwd())
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError("config file not found: %s" % path) from None
    except OSError as e:
        raise ConfigError("cannot read config file %s: %s" % (path, e.strerror)) from None
    except tomllib.TOMLDecodeError as e:
        raise ConfigError("invalid TOML in %s: %s" % (path, e)) from None
    except UnicodeDecodeError:  # tomllib decodes the whole file first and lets this through
        raise ConfigError("invalid TOML in %s: not UTF-8 text" % path) from None
    return build(data, os.path.dirname(os.path.abspath(path)))


def reference():
    """Documentation of every setting, for README and `--help`."""
    lines = []
    for s in SETTINGS:
        lines.append("%-28s %-8s default %-32r %s" % (s.dotted, s.kind, s.default, s.doc))
    return "\n".join(lines)
