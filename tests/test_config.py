"""Configuration (lib/kiln/config.py): defaults, path resolution and one-line errors naming the key."""
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

import pytest  # noqa: E402

from kiln import config  # noqa: E402
from kiln.errors import ConfigError  # noqa: E402

# The example block of interface.md, verbatim: it must load as documented.
INTERFACE_EXAMPLE = '''
state_dir = "var"                       # host keys, key store, local repositories

[proxy]
listen = "127.0.0.1:2222"
host_keys = []                          # default: <state_dir>/ssh_host_ed25519_key and ssh_host_rsa_key, generated if absent

[admin]
listen = "127.0.0.1:6060"
token = ""                              # when set, every admin route but /healthz needs "Authorization: Bearer <token>"

[keystore]
path = "<state_dir>/keys.db"            # SQLite

[backend]
kind = "local"                          # "local": run git/hg here; "ssh": forward to an SSH backend
repo_root = "<state_dir>/repos"         # local: where repositories live
address = "127.0.0.1:22"                # ssh: backend sshd host:port
user = "git"                            # ssh: backend login
identity = "<state_dir>/backend_key"    # ssh: the proxy's private key toward the backend (OpenSSH format, unencrypted)
known_hosts = "<state_dir>/backend_known_hosts"   # ssh: pinned backend host keys, OpenSSH known_hosts format
                                        #      (a non-22 port is written "[host]:port", as OpenSSH writes it)

[timeouts]                              # seconds; fractions allowed
login = 10                              # TCP accept -> authenticated and command received
dial = 5                                # backend TCP connect + SSH handshake + auth
idle = 600                              # no payload bytes in either direction
session = 3600                          # whole connection
drain = 30                              # on SIGTERM: how long running sessions may finish

[limits]
max_connections = 1000                  # concurrent TCP connections
per_account = 20                        # concurrent authenticated sessions per account
'''


def write(tmp_path, text, name="kilnproxy.toml", folder="etc"):
    d = tmp_path / folder
    d.mkdir(parents=True, exist_ok=True)
    p = d / name
    p.write_text(text, encoding="utf-8")
    return p


def config_error(fn, *args):
    with pytest.raises(ConfigError) as info:
        fn(*args)
    message = str(info.value)
    assert message and "\n" not in message and "\r" not in message, repr(message)
    return message


def assert_defaults(cfg, base):
    state = os.path.join(base, "var")
    assert cfg.state_dir == state
    assert cfg.proxy.listen == ("127.0.0.1", 2222)
    assert cfg.proxy.host_keys == [os.path.join(state, "ssh_host_ed25519_key"), os.path.join(state, "ssh_host_rsa_key")]
    assert cfg.proxy.generate_host_keys is True
    assert cfg.admin.listen == ("127.0.0.1", 6060)
    assert cfg.admin.token == ""
    assert cfg.keystore.path == os.path.join(state, "keys.db")
    assert cfg.backend.kind == "local"
    assert cfg.backend.repo_root == os.path.join(state, "repos")
    assert cfg.backend.address == ("127.0.0.1", 22)
    assert cfg.backend.user == "git"
    assert cfg.backend.identity == os.path.join(state, "backend_key")
    assert cfg.backend.known_hosts == os.path.join(state, "backend_known_hosts")
    assert (cfg.timeouts.login, cfg.timeouts.dial, cfg.timeouts.idle, cfg.timeouts.session, cfg.timeouts.drain) == \
        (10.0, 5.0, 600.0, 3600.0, 30.0)
    assert all(isinstance(getattr(cfg.timeouts, k), float) for k in ("login", "dial", "idle", "session", "drain"))
    assert (cfg.limits.max_connections, cfg.limits.per_account) == (1000, 20)


# ---------------------------------------------------------------------------------------------------------------
# Defaults and paths


def test_no_config_file_means_defaults_in_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(None)
    assert_defaults(cfg, str(tmp_path))
    assert not (tmp_path / "var").exists()  # loading writes nothing


def test_empty_file_gives_defaults_relative_to_its_folder(tmp_path, monkeypatch):
    p = write(tmp_path, "")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    assert_defaults(config.load(str(p)), str(tmp_path / "etc"))


def test_relative_config_path_resolves_against_the_file_folder(tmp_path, monkeypatch):
    write(tmp_path, 'state_dir = "state"\n')
    monkeypatch.chdir(tmp_path)
    cfg = config.load(os.path.join("etc", "kilnproxy.toml"))
    assert cfg.state_dir == str(tmp_path / "etc" / "state")
    assert os.path.isabs(cfg.keystore.path)


def test_interface_example_loads_as_documented(tmp_path):
    p = write(tmp_path, INTERFACE_EXAMPLE)
    assert_defaults(config.load(str(p)), str(tmp_path / "etc"))


def test_state_dir_moves_every_derived_path(tmp_path):
    cfg = config.load(str(write(tmp_path, 'state_dir = "../state"\n')))
    state = str(tmp_path / "state")
    assert cfg.state_dir == state
    assert cfg.keystore.path == os.path.join(state, "keys.db")
    assert cfg.backend.repo_root == os.path.join(state, "repos")
    assert cfg.backend.identity == os.path.join(state, "backend_key")
    assert cfg.backend.known_hosts == os.path.join(state, "backend_known_hosts")
    assert cfg.proxy.host_keys == [os.path.join(state, "ssh_host_ed25519_key"), os.path.join(state, "ssh_host_rsa_key")]


def test_absolute_state_dir(tmp_path):
    state = tmp_path / "abs" / "state"
    cfg = config.load(str(write(tmp_path, 'state_dir = "%s"\n' % state)))
    assert cfg.state_dir == str(state)
    assert cfg.keystore.path == str(state / "keys.db")


def test_relative_paths_resolve_against_the_config_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = config.load(str(write(tmp_path, '''
[proxy]
host_keys = ["keys/host_ed25519", "/abs/host_rsa"]
[keystore]
path = "db/keys.db"
[backend]
kind = "ssh"
repo_root = "<state_dir>/../repositories"
identity = "id/backend"
known_hosts = "./kh"
''')))
    etc = str(tmp_path / "etc")
    assert cfg.proxy.host_keys == [os.path.join(etc, "keys", "host_ed25519"), "/abs/host_rsa"]
    assert cfg.proxy.generate_host_keys is False
    assert cfg.keystore.path == os.path.join(etc, "db", "keys.db")
    assert cfg.backend.repo_root == os.path.join(etc, "repositories")
    assert cfg.backend.identity == os.path.join(etc, "id", "backend")
    assert cfg.backend.known_hosts == os.path.join(etc, "kh")
    assert cfg.backend.kind == "ssh"


def test_home_folder_is_expanded(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    cfg = config.build({"keystore": {"path": "~/keys.db"}}, str(tmp_path))
    assert cfg.keystore.path == str(tmp_path / "home" / "keys.db")


def test_given_values_are_converted(tmp_path):
    cfg = config.build({
        "proxy": {"listen": "0.0.0.0:0"},
        "admin": {"listen": "[::1]:6061", "token": "s3cret", "tracemalloc": True},
        "backend": {"kind": "ssh", "address": "backend.example:2200", "user": "hg"},
        "timeouts": {"login": 2.5, "dial": 0, "idle": 1, "keepalive": 0},
        "limits": {"max_connections": 1, "per_account": 3},
    }, str(tmp_path))
    assert cfg.proxy.listen == ("0.0.0.0", 0)
    assert cfg.admin.listen == ("::1", 6061)
    assert (cfg.admin.token, cfg.admin.tracemalloc) == ("s3cret", True)
    assert cfg.backend.address == ("backend.example", 2200)
    assert cfg.backend.user == "hg"
    assert (cfg.timeouts.login, cfg.timeouts.dial, cfg.timeouts.idle) == (2.5, 0.0, 1.0)
    assert isinstance(cfg.timeouts.idle, float)
    assert (cfg.limits.max_connections, cfg.limits.per_account) == (1, 3)


def test_defaults_are_not_shared_between_loads(tmp_path):
    a = config.build({}, str(tmp_path))
    a.proxy.host_keys.append("x")
    b = config.build({}, str(tmp_path))
    assert "x" not in b.proxy.host_keys
    assert config.SETTINGS[[s.dotted for s in config.SETTINGS].index("proxy.host_keys")].default == []


def test_every_setting_is_documented():
    ref = config.reference()
    dotted = [s.dotted for s in config.SETTINGS]
    assert len(dotted) == len(set(dotted))
    for name in dotted:
        assert name in ref
    for s in config.SETTINGS:
        assert s.doc


def test_every_interface_key_exists():
    dotted = {s.dotted for s in config.SETTINGS}
    for key in ("state_dir", "proxy.listen", "proxy.host_keys", "admin.listen", "admin.token", "keystore.path",
                "backend.kind", "backend.repo_root", "backend.address", "backend.user", "backend.identity",
                "backend.known_hosts", "timeouts.login", "timeouts.dial", "timeouts.idle", "timeouts.session",
                "timeouts.drain", "limits.max_connections", "limits.per_account"):
        assert key in dotted


# ---------------------------------------------------------------------------------------------------------------
# Errors: ConfigError, one line, naming the key


@pytest.mark.parametrize("data, key", [
    ({"foo": 1}, "foo"),
    ({"statedir": "var"}, "statedir"),
    ({"nosuch": {"x": 1}}, "nosuch"),
    ({"proxy": {"listen_address": "127.0.0.1:1"}}, "proxy.listen_address"),
    ({"timeouts": {"connect": 5}}, "timeouts.connect"),
    ({"limits": {"max_connection": 5}}, "limits.max_connection"),
    ({"backend": {"kind": "local", "host": "x"}}, "backend.host"),
    ({"admin": {"listen": "127.0.0.1:1", "Token": "x"}}, "admin.Token"),
])
def test_unknown_keys(tmp_path, data, key):
    message = config_error(config.build, data, str(tmp_path))
    assert "unknown" in message and key in message


def test_unknown_key_with_a_newline_stays_on_one_line(tmp_path):
    message = config_error(config.load, str(write(tmp_path, '"a\\nb" = 1\n[proxy]\n"x\\ny" = 2\n')))
    assert "unknown" in message


@pytest.mark.parametrize("data, key", [
    ({"proxy": 1}, "proxy"),
    ({"timeouts": "fast"}, "timeouts"),
    ({"limits": [1, 2]}, "limits"),
])
def test_section_must_be_a_table(tmp_path, data, key):
    assert "[%s]" % key in config_error(config.build, data, str(tmp_path))


BAD_VALUES = [
    ("state_dir", 5), ("state_dir", ""), ("state_dir", ["var"]), ("state_dir", "a\0b"),
    ("proxy.listen", "localhost"), ("proxy.listen", 2222), ("proxy.listen", "127.0.0.1:"), ("proxy.listen", ":2222"),
    ("proxy.listen", "127.0.0.1:http"), ("proxy.listen", "127.0.0.1:70000"), ("proxy.listen", "127.0.0.1:-1"),
    ("proxy.listen", "127.0.0.1: 22"), ("proxy.listen", "127.0.0.1:+22"), ("proxy.listen", "127.0.0.1:\u0662\u0662"),
    ("proxy.listen", "bad host:22"), ("proxy.listen", ""), ("proxy.listen", True),
    ("proxy.host_keys", "ssh_host_key"), ("proxy.host_keys", [1]), ("proxy.host_keys", [""]),
    ("admin.listen", "6060"), ("admin.token", 5), ("admin.token", True), ("admin.tracemalloc", "yes"),
    ("admin.tracemalloc", 1), ("admin.max_blocking_time", -0.5),
    ("keystore.path", 1), ("keystore.path", ""), ("keystore.path", True),
    ("backend.kind", "docker"), ("backend.kind", "LOCAL"), ("backend.kind", 1), ("backend.kind", ""),
    ("backend.address", "backend"), ("backend.address", "backend:99999"), ("backend.user", 0),
    ("backend.identity", 3), ("backend.known_hosts", {}), ("backend.repo_root", []),
    ("timeouts.login", "10"), ("timeouts.login", "ten"), ("timeouts.dial", -1), ("timeouts.idle", -0.001),
    ("timeouts.session", True), ("timeouts.drain", False), ("timeouts.drain", float("inf")),
    ("timeouts.idle", float("nan")), ("timeouts.session", 10 ** 400), ("timeouts.keepalive", [1]),
    ("timeouts.keepalive_max", 0),
    ("limits.max_connections", True), ("limits.max_connections", 0), ("limits.max_connections", -5),
    ("limits.per_account", 1.5), ("limits.per_account", "20"), ("limits.per_account", False),
    ("limits.max_startups", 2.0), ("limits.penalty_seconds", -3),
]


def _data_for(dotted, value):
    if "." in dotted:
        section, name = dotted.split(".")
        return {section: {name: value}}
    return {dotted: value}


@pytest.mark.parametrize("dotted, value", BAD_VALUES, ids=["%s=%s" % (k, repr(v)[:20]) for k, v in BAD_VALUES])
def test_bad_values_name_the_key(tmp_path, dotted, value):
    message = config_error(config.build, _data_for(dotted, value), str(tmp_path))
    assert message.startswith(dotted + ":"), message


@pytest.mark.parametrize("setting", config.SETTINGS, ids=[s.dotted for s in config.SETTINGS])
def test_every_setting_rejects_a_wrong_type(tmp_path, setting):
    wrong = {"str": 1, "path": 1, "paths": "x", "address": "nope", "seconds": "ten", "count": True,
             "bool": "yes", "choice": "zzz", "ciphers": ["aes128-cbc"], "strs": "x",
             "startups": "10:30", "cidrs": "x"}[setting.kind]
    message = config_error(config.build, _data_for(setting.dotted, wrong), str(tmp_path))
    assert setting.dotted in message


def _value(cfg, setting):
    return getattr(getattr(cfg, setting.section), setting.name) if setting.section else getattr(cfg, setting.name)


@pytest.mark.parametrize("setting", config.SETTINGS, ids=[s.dotted for s in config.SETTINGS])
def test_every_default_is_valid_when_given_explicitly(tmp_path, setting):
    explicit = config.build(_data_for(setting.dotted, setting.default), str(tmp_path))
    assert _value(explicit, setting) == _value(config.build({}, str(tmp_path)), setting)


def test_toml_values_reach_the_checks(tmp_path):
    """Same checks through a real file: the parsed TOML types (int, float, bool, inf) are the ones checked."""
    cases = {
        "[timeouts]\nlogin = \"10\"\n": "timeouts.login",
        "[timeouts]\nidle = -5\n": "timeouts.idle",
        "[timeouts]\ndrain = inf\n": "timeouts.drain",
        "[timeouts]\ndial = nan\n": "timeouts.dial",
        "[limits]\nper_account = true\n": "limits.per_account",
        "[limits]\nmax_connections = 0\n": "limits.max_connections",
        "[proxy]\nlisten = \"localhost\"\n": "proxy.listen",
        "[backend]\nkind = \"docker\"\n": "backend.kind",
        "[backend]\naddress = \"10.0.0.1:port\"\n": "backend.address",
        "[proxy]\nlisten_address = \"127.0.0.1:22\"\n": "proxy.listen_address",
        "stat_dir = \"var\"\n": "stat_dir",
    }
    for text, key in cases.items():
        assert key in config_error(config.load, str(write(tmp_path, text))), text


def test_invalid_toml(tmp_path):
    p = write(tmp_path, "[proxy\nlisten = \n")
    message = config_error(config.load, str(p))
    assert "invalid TOML" in message and str(p) in message


def test_duplicate_toml_key_is_invalid(tmp_path):
    assert "invalid TOML" in config_error(config.load, str(write(tmp_path, "state_dir = 'a'\nstate_dir = 'b'\n")))


def test_file_that_is_not_utf8(tmp_path):
    p = tmp_path / "bad.toml"
    p.write_bytes(b'state_dir = "\xff\xfe"\n')
    message = config_error(config.load, str(p))
    assert str(p) in message


def test_missing_file(tmp_path):
    p = tmp_path / "nope.toml"
    message = config_error(config.load, str(p))
    assert "not found" in message and str(p) in message


def test_unreadable_path(tmp_path):
    message = config_error(config.load, str(tmp_path))  # a folder
    assert str(tmp_path) in message


def test_top_level_must_be_a_table(tmp_path):
    config_error(config.build, ["state_dir"], str(tmp_path))


@pytest.mark.parametrize("text, expected", [
    ("127.0.0.1:22", ("127.0.0.1", 22)),
    ("[::1]:2222", ("::1", 2222)),
    ("[fe80::1%eth0]:22", ("fe80::1%eth0", 22)),
    ("localhost:0", ("localhost", 0)),
    ("host.example:65535", ("host.example", 65535)),
])
def test_parse_address(text, expected):
    assert config.parse_address(text, "x") == expected


def test_named_backends_are_tables_of_tables(tmp_path):
    cfg = config.build({"backend": {"kind": "ssh", "address": "10.0.0.1:22"},
                        "backends": {"eu-1": {"kind": "ssh", "address": "10.0.0.2:2222", "identity": "keys/eu"},
                                     "local_2": {"repo_root": "/srv/repos"}}}, str(tmp_path))
    assert set(cfg.backends) == {"default", "eu-1", "local_2"}
    assert cfg.backends["default"] is cfg.backend and cfg.backend.name == "default"
    eu = cfg.backends["eu-1"]
    assert (eu.name, eu.kind, eu.address, eu.max_sessions) == ("eu-1", "ssh", ("10.0.0.2", 2222), 8)
    assert eu.identity == str(tmp_path / "keys" / "eu")                   # relative to the config's folder
    assert eu.known_hosts == str(tmp_path / "var" / "backend_known_hosts")  # defaults follow state_dir
    assert cfg.backends["local_2"].kind == "local"
    assert set(config.build({}, str(tmp_path)).backends) == {"default"}


@pytest.mark.parametrize("data,message", [
    ({"backends": {"default": {}}}, "backends.default"),
    ({"backends": {"a b": {}}}, "backend name"),
    ({"backends": {"x" * 33: {}}}, "backend name"),
    ({"backends": {"x": {"nope": 1}}}, "unknown key backends.x.nope"),
    ({"backends": {"x": {"kind": "zz"}}}, "backends.x.kind"),
    ({"backends": {"x": {"max_sessions": 0}}}, "backends.x.max_sessions"),
    ({"backends": {"x": 3}}, "[backends.x] must be a table"),
    ({"backends": 3}, "[backends] must hold tables"),
])
def test_named_backend_errors(tmp_path, data, message):
    assert message in config_error(config.build, data, str(tmp_path))
