"""Command line (lib/kiln/cli.py through kilnproxy.py): keys add/list/remove, version, errors, patch order.

These run `python kilnproxy.py ...` as child processes, as an operator would.
"""
import ast
import base64
import hashlib
import json
import os
import re
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "lib"))

import pytest  # noqa: E402

PYTHON = os.path.join(ROOT, ".venv", "bin", "python")
if not os.path.exists(PYTHON):
    PYTHON = sys.executable
KILNPROXY = os.path.join(ROOT, "kilnproxy.py")
VERSION_RE = re.compile(r"^\d+\.\d+\.\d+-[0-9a-f]{10}-\d{8}\.\d{6}$")


def run(args, cwd, stdin=None, timeout=60):
    p = subprocess.run([PYTHON, KILNPROXY] + list(args), cwd=str(cwd), input=stdin, capture_output=True,
                       timeout=timeout)
    return p.returncode, p.stdout.decode("utf-8", "replace"), p.stderr.decode("utf-8", "replace")


def assert_usage_error(rc, out, err, *words):
    """Exit 2, exactly one stderr line starting `kilnproxy: `, naming the problem, no traceback, nothing on stdout."""
    assert rc == 2, (rc, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kilnproxy: "), err
    assert "Traceback" not in err
    for w in words:
        assert w in lines[0], (w, err)
    return lines[0]


def assert_unavailable(rc, out, err, *words):
    """Exit 1 (the store cannot be reached), exactly one stderr line starting `kilnproxy: `, nothing on stdout."""
    assert rc == 1, (rc, out, err)
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("kilnproxy: ") and "Traceback" not in err, err
    for w in words:
        assert w in lines[0], (w, err)
    return lines[0]


def keygen(folder, name, *args):
    path = os.path.join(str(folder), name)
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-C", name + "@test", "-f", path] + list(args), check=True,
                   capture_output=True, timeout=60)
    fp = subprocess.run(["ssh-keygen", "-lf", path + ".pub"], check=True, capture_output=True, text=True,
                        timeout=30).stdout.split()[1]
    return path + ".pub", fp


@pytest.fixture(scope="module")
def pubkeys(tmp_path_factory):
    d = tmp_path_factory.mktemp("cli-keys")
    return {
        "ed25519": keygen(d, "ed25519", "-t", "ed25519"),
        "ecdsa": keygen(d, "ecdsa", "-t", "ecdsa"),
        "rsa": keygen(d, "rsa", "-t", "rsa", "-b", "3072"),
    }


@pytest.fixture
def env(tmp_path):
    """A config file whose state_dir is inside tmp_path; work from another folder to prove paths follow the file."""
    cfgdir = tmp_path / "etc"
    cfgdir.mkdir()
    cfg = cfgdir / "kilnproxy.toml"
    cfg.write_text('state_dir = "../state"\n[admin]\ntoken = "x"\n', encoding="utf-8")
    work = tmp_path / "work"
    work.mkdir()

    class Env:
        config = str(cfg)
        state = tmp_path / "state"
        db = tmp_path / "state" / "keys.db"
        cwd = work

        def __call__(self, *args, stdin=None):
            return run(args, work, stdin=stdin)

        def add(self, pub, account="alice", name="Alice Smith", key_name="Laptop", stdin=None):
            return self("keys", "add", "--config", self.config, "--account", account, "--name", name,
                        "--key-name", key_name, pub, stdin=stdin)

        def list_json(self):
            rc, out, err = self("keys", "list", "--config", self.config, "--json")
            assert rc == 0, err
            return json.loads(out)

        def route(self, account, backend):
            return self("accounts", "route", "--config", self.config, "--account", account, "--backend", backend)

        def accounts_json(self):
            rc, out, err = self("accounts", "list", "--config", self.config, "--json")
            assert (rc, err) == (0, ""), err
            return json.loads(out)

    return Env()


def db_bytes(path):
    return path.read_bytes() if path.exists() else None


# ---------------------------------------------------------------------------------------------------------------
# keys add / list / remove


def test_keys_add_prints_the_ssh_keygen_fingerprint(env, pubkeys):
    for kind, (pub, fp) in sorted(pubkeys.items()):
        rc, out, err = env.add(pub, key_name=kind)
        assert (rc, err) == (0, "")
        assert out == fp + "\n"
        assert re.match(r"^SHA256:[A-Za-z0-9+/]{43}$", out.strip())
    assert env.db.is_file()
    assert {e["fingerprint"] for e in env.list_json()} == {fp for _, fp in pubkeys.values()}


def test_fingerprint_is_sha256_of_the_blob(env, pubkeys):
    pub, fp = pubkeys["ed25519"]
    with open(pub) as f:
        blob = base64.b64decode(f.read().split()[1])
    rc, out, _ = env.add(pub)
    assert rc == 0
    assert out.strip() == "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode().rstrip("=") == fp


def test_keys_list_json_exact_fields(env, pubkeys):
    assert env.list_json() == []
    env.add(pubkeys["ed25519"][0], account="alice", name="Alice Smith", key_name="Laptop")
    env.add(pubkeys["rsa"][0], account="bob", name="Bob Jones", key_name="Desk \u00e9")
    listed = env.list_json()
    assert listed == [
        {"fingerprint": pubkeys["ed25519"][1], "account": "alice", "name": "Alice Smith", "key_name": "Laptop"},
        {"fingerprint": pubkeys["rsa"][1], "account": "bob", "name": "Bob Jones", "key_name": "Desk \u00e9"},
    ]
    for entry in listed:
        assert list(entry) == ["fingerprint", "account", "name", "key_name"]


def test_keys_list_plain_has_one_row_per_key(env, pubkeys):
    env.add(pubkeys["ed25519"][0])
    env.add(pubkeys["ecdsa"][0], key_name="Phone")
    rc, out, err = env("keys", "list", "--config", env.config)
    assert (rc, err) == (0, "")
    rows = out.splitlines()
    assert len(rows) == 2
    assert any(pubkeys["ed25519"][1] in r and "alice" in r and "Laptop" in r for r in rows)
    assert any(pubkeys["ecdsa"][1] in r and "Phone" in r for r in rows)


def test_keys_list_of_a_new_store_writes_nothing(env):
    rc, out, err = env("keys", "list", "--config", env.config)
    assert (rc, out, err) == (0, "", "")
    assert env.list_json() == []
    assert not env.state.exists()


def test_duplicate_add_exits_2_and_changes_nothing(env, pubkeys):
    pub, fp = pubkeys["ed25519"]
    assert env.add(pub)[0] == 0
    before_db, before_list = db_bytes(env.db), env.list_json()
    rc, out, err = env.add(pub, account="bob", name="Bob", key_name="Stolen")
    assert_usage_error(rc, out, err, fp)
    assert db_bytes(env.db) == before_db
    assert env.list_json() == before_list


def test_malformed_key_exits_2_and_writes_nothing(env, tmp_path, pubkeys):
    bad = tmp_path / "bad.pub"
    bad.write_text("ssh-ed25519 AAAAnotakey me@host\n")
    rc, out, err = env.add(str(bad))
    assert_usage_error(rc, out, err)
    assert not env.state.exists()  # not even an empty key store
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-t", "rsa", "-b", "1024", "-f", str(tmp_path / "short")],
                   check=True, capture_output=True, timeout=60)
    assert_usage_error(*env.add(str(tmp_path / "short.pub")), "RSA")
    assert not env.state.exists()
    rc, out, err = env.add(str(tmp_path / "missing.pub"))
    assert_usage_error(rc, out, err, "missing.pub")
    assert not env.state.exists()
    # and with keys already stored, still nothing changes
    env.add(pubkeys["ed25519"][0])
    before = db_bytes(env.db)
    assert_usage_error(*env.add(str(bad)))
    assert db_bytes(env.db) == before


@pytest.mark.parametrize("account, name, key_name", [
    ("-alice", "Alice", "Laptop"), ("alice/x", "Alice", "Laptop"), ("alice", "", "Laptop"), ("alice", "A", " "),
])
def test_bad_identity_exits_2_and_writes_nothing(env, pubkeys, account, name, key_name):
    assert_usage_error(*env.add(pubkeys["ed25519"][0], account=account, name=name, key_name=key_name))
    assert not env.state.exists()


def test_dash_reads_stdin(env, pubkeys):
    pub, fp = pubkeys["ecdsa"]
    with open(pub, "rb") as f:
        text = f.read()
    rc, out, err = env.add("-", stdin=text)
    assert (rc, out, err) == (0, fp + "\n", "")
    assert env.list_json()[0]["fingerprint"] == fp
    # an authorized_keys line with options, on stdin
    pub2, fp2 = pubkeys["rsa"]
    with open(pub2, "rb") as f:
        line = b'no-pty,command="echo hi there" ' + f.read()
    rc, out, err = env.add("-", key_name="Other", stdin=line)
    assert (rc, out.strip()) == (0, fp2), err


def test_stdin_that_is_not_text_exits_2(env):
    assert_usage_error(*env.add("-", stdin=b"\xff\xfe\x00garbage"))
    assert_usage_error(*env.add("-", stdin=b""))
    assert not env.state.exists()


def test_keys_remove(env, pubkeys):
    env.add(pubkeys["ed25519"][0])
    env.add(pubkeys["rsa"][0], key_name="Desk")
    fp = pubkeys["ed25519"][1]
    rc, out, err = env("keys", "remove", "--config", env.config, fp)
    assert (rc, err) == (0, "")
    assert fp in out
    assert [e["fingerprint"] for e in env.list_json()] == [pubkeys["rsa"][1]]
    before = db_bytes(env.db)
    assert_usage_error(*env("keys", "remove", "--config", env.config, fp), fp)
    assert db_bytes(env.db) == before


def test_keys_remove_on_a_new_store_writes_nothing(env):
    assert_usage_error(*env("keys", "remove", "--config", env.config, "SHA256:nothing"), "SHA256:nothing")
    assert not env.state.exists()


def test_default_config_is_kilnproxy_toml_in_the_current_folder(tmp_path, pubkeys):
    (tmp_path / "kilnproxy.toml").write_text('state_dir = "here"\n')
    rc, out, err = run(["keys", "add", "--account", "alice", "--name", "A", "--key-name", "L",
                        pubkeys["ed25519"][0]], tmp_path)
    assert (rc, out.strip(), err) == (0, pubkeys["ed25519"][1], "")
    assert (tmp_path / "here" / "keys.db").is_file()


def test_without_a_config_file_state_goes_to_var(tmp_path, pubkeys):
    rc, out, err = run(["keys", "add", "--account", "alice", "--name", "A", "--key-name", "L",
                        pubkeys["ed25519"][0]], tmp_path)
    assert (rc, err) == (0, "")
    assert (tmp_path / "var" / "keys.db").is_file()


# ---------------------------------------------------------------------------------------------------------------
# accounts route / list


def test_accounts_list_of_a_new_store_writes_nothing(env):
    assert env.accounts_json() == []
    assert env("accounts", "list", "--config", env.config) == (0, "", "")
    assert not env.state.exists()


def test_accounts_list_json_exact_fields(env, pubkeys):
    env.add(pubkeys["ed25519"][0], account="alice")
    env.add(pubkeys["ecdsa"][0], account="alice", key_name="Phone")
    env.add(pubkeys["rsa"][0], account="bob", name="Bob", key_name="Desk")
    listed = env.accounts_json()
    assert listed == [{"account": "alice", "backend": "default", "keys": 2},
                      {"account": "bob", "backend": "default", "keys": 1}]
    for entry in listed:
        assert list(entry) == ["account", "backend", "keys"]
    rc, out, err = env("accounts", "list", "--config", env.config)
    assert (rc, err) == (0, "")
    assert out.splitlines() == ["alice\tdefault\t2", "bob\tdefault\t1"]


def test_accounts_route_to_an_unknown_backend_exits_2_and_writes_nothing(env, pubkeys):
    assert_usage_error(*env.route("alice", "eu"), "eu", "default")
    assert not env.state.exists()
    env.add(pubkeys["ed25519"][0])
    before = db_bytes(env.db)
    for name in ("eu", "Default", "e.u", "a b"):
        assert_usage_error(*env.route("alice", name))
    assert_usage_error(*env.route(".alice", "default"), ".alice")
    assert db_bytes(env.db) == before
    assert env.accounts_json() == [{"account": "alice", "backend": "default", "keys": 1}]


def test_accounts_route_default(env, pubkeys):
    rc, out, err = env.route("alice", "default")       # on a new store: nothing to reset, nothing created
    assert (rc, out, err) == (0, "alice -> default\n", "")
    assert not env.state.exists()
    env.add(pubkeys["ed25519"][0])
    assert env.route("alice", "default") == (0, "alice -> default\n", "")
    assert env.accounts_json() == [{"account": "alice", "backend": "default", "keys": 1}]


def _with_backends(monkeypatch, *names):
    """The config as the loader will give it once it knows [backends.NAME] tables: cfg.backends, name -> settings."""
    from types import SimpleNamespace
    from kiln import cli
    load = cli.config_mod.load

    def load_with_backends(path):
        cfg = load(path)
        cfg.backends = {"default": cfg.backend}
        cfg.backends.update((n, SimpleNamespace(kind="local")) for n in names)
        return cfg

    monkeypatch.setattr(cli.config_mod, "load", load_with_backends)


def _run_in_process(*argv):
    import io
    from kiln import cli
    out = io.StringIO()
    args = cli.parse_args(list(argv))
    status = cli.run_accounts(args, out=out) if args.command == "accounts" else cli.run_keys(args, out=out)
    return status, out.getvalue()


def test_accounts_route_to_named_backends(env, pubkeys, monkeypatch):
    from kiln import cli
    from kiln.errors import ConfigError
    _with_backends(monkeypatch, "eu", "us-east")
    env.add(pubkeys["ed25519"][0], account="alice")
    assert cli.backend_names(cli.config_mod.load(env.config)) == {"default", "eu", "us-east"}
    assert _run_in_process("accounts", "route", "--config", env.config, "--account", "alice", "--backend", "eu") \
        == (0, "alice -> eu\n")
    assert _run_in_process("accounts", "route", "--config", env.config, "--account", "carol",
                           "--backend", "us-east") == (0, "carol -> us-east\n")
    status, out = _run_in_process("accounts", "list", "--config", env.config, "--json")
    assert json.loads(out) == [{"account": "alice", "backend": "eu", "keys": 1},
                               {"account": "carol", "backend": "us-east", "keys": 0}]
    before = db_bytes(env.db)
    with pytest.raises(ConfigError, match="asia"):
        _run_in_process("accounts", "route", "--config", env.config, "--account", "alice", "--backend", "asia")
    assert db_bytes(env.db) == before
    _run_in_process("accounts", "route", "--config", env.config, "--account", "alice", "--backend", "default")
    assert env.accounts_json() == [{"account": "alice", "backend": "default", "keys": 1},
                                   {"account": "carol", "backend": "us-east", "keys": 0}]


def test_accounts_route_with_backends_tables_in_the_config(env, pubkeys):
    """Through the real config file and its [backends.NAME] tables."""
    with open(env.config, "a") as f:
        f.write('[backends.eu]\nkind = "local"\n')
    assert env.route("alice", "eu") == (0, "alice -> eu\n", "")
    assert env.accounts_json() == [{"account": "alice", "backend": "eu", "keys": 0}]
    assert_usage_error(*env.route("alice", "us"), "us")


# ---------------------------------------------------------------------------------------------------------------
# the store's schema, and a store that cannot be reached (exit 1)


def test_a_wave1_store_is_migrated_by_any_command(env, pubkeys):
    import sqlite3
    env.state.mkdir()
    conn = sqlite3.connect(str(env.db), isolation_level=None)
    conn.executescript("CREATE TABLE keys (fingerprint TEXT PRIMARY KEY, account TEXT NOT NULL, name TEXT NOT NULL,"
                       " key_name TEXT NOT NULL, key_type TEXT NOT NULL, key_blob BLOB NOT NULL, added REAL NOT NULL);"
                       " CREATE INDEX keys_account ON keys(account);")
    with open(pubkeys["ed25519"][0]) as f:
        key_type, b64 = f.read().split()[:2]
    conn.execute("INSERT INTO keys VALUES (?, 'alice', 'Alice', 'Laptop', ?, ?, 0)",
                 (pubkeys["ed25519"][1], key_type, base64.b64decode(b64)))
    conn.close()
    assert [e["fingerprint"] for e in env.list_json()] == [pubkeys["ed25519"][1]]
    conn = sqlite3.connect(str(env.db))
    try:
        assert conn.execute("SELECT version FROM schema_version").fetchall() == [(2,)]
    finally:
        conn.close()
    assert env.accounts_json() == [{"account": "alice", "backend": "default", "keys": 1}]


def test_a_newer_schema_exits_2_for_every_command(env, pubkeys):
    import sqlite3
    env.add(pubkeys["ed25519"][0])
    conn = sqlite3.connect(str(env.db))
    conn.execute("UPDATE schema_version SET version = 99")
    conn.commit()
    conn.close()
    before = db_bytes(env.db)
    for args in (["keys", "list", "--config", env.config], ["accounts", "list", "--config", env.config, "--json"],
                 ["keys", "remove", "--config", env.config, pubkeys["ed25519"][1]],
                 ["accounts", "route", "--config", env.config, "--account", "a", "--backend", "default"]):
        assert_usage_error(*env(*args), "schema version 99", "upgrade")
    assert_usage_error(*env.add(pubkeys["rsa"][0]), "schema version 99")
    rc, out, err = env("serve", "--config", env.config)    # serve logs its start-up before it opens the store
    assert rc == 2 and "Traceback" not in err, err
    assert err.splitlines()[-1].startswith("kilnproxy: ") and "schema version 99" in err.splitlines()[-1]
    assert db_bytes(env.db) == before


@pytest.mark.parametrize("damage", ["directory", "junk"])
def test_a_store_that_cannot_be_opened_exits_1(env, pubkeys, damage):
    env.state.mkdir()
    if damage == "directory":
        env.db.mkdir()
    else:
        env.db.write_bytes(b"this is not a database " * 100)
    for args in (["keys", "list", "--config", env.config], ["keys", "list", "--config", env.config, "--json"],
                 ["keys", "remove", "--config", env.config, pubkeys["ed25519"][1]],
                 ["accounts", "list", "--config", env.config, "--json"],
                 ["accounts", "route", "--config", env.config, "--account", "alice", "--backend", "default"]):
        assert_unavailable(*env(*args), "key store", str(env.db))
    assert_unavailable(*env.add(pubkeys["ed25519"][0]), "key store")
    if damage == "junk":
        assert env.db.read_bytes() == b"this is not a database " * 100


def test_a_locked_store_exits_1_after_the_busy_timeout(env, pubkeys):
    import sqlite3
    env.add(pubkeys["ed25519"][0])
    locker = sqlite3.connect(str(env.db), isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        assert_unavailable(*env.add(pubkeys["rsa"][0], key_name="Desk"), "locked")
    finally:
        locker.close()
    assert [e["key_name"] for e in env.list_json()] == ["Laptop"]


# ---------------------------------------------------------------------------------------------------------------
# configuration errors and bad arguments


def test_unknown_config_key_exits_2_naming_it(env, pubkeys):
    with open(env.config, "a") as f:
        f.write("[proxy]\nlisten_adress = \"127.0.0.1:2222\"\n")
    for args in (["keys", "list", "--config", env.config],
                 ["keys", "add", "--config", env.config, "--account", "a", "--name", "A", "--key-name", "L",
                  pubkeys["ed25519"][0]],
                 ["serve", "--config", env.config]):
        assert_usage_error(*env(*args), "proxy.listen_adress")
    assert not env.state.exists()


def test_bad_config_value_exits_2_naming_it(env):
    with open(env.config, "a") as f:
        f.write("[limits]\nper_account = true\n")
    assert_usage_error(*env("keys", "list", "--config", env.config), "limits.per_account")


def test_invalid_toml_exits_2(env):
    with open(env.config, "w") as f:
        f.write("state_dir = \n")
    assert_usage_error(*env("keys", "list", "--config", env.config), "TOML")
    with open(env.config, "wb") as f:
        f.write(b'state_dir = "\xff"\n')
    assert_usage_error(*env("keys", "list", "--config", env.config))


def test_missing_config_file_exits_2(env, tmp_path):
    missing = str(tmp_path / "nope.toml")
    assert_usage_error(*env("keys", "list", "--config", missing), missing)
    assert_usage_error(*env("serve", "--config", missing), missing)


BAD_ARGS = [
    ["frobnicate"],
    ["keys"],
    ["keys", "frob"],
    ["keys", "add", "--account", "alice", "x.pub"],                       # --name and --key-name missing
    ["keys", "add", "--name", "A", "--key-name", "L", "x.pub"],           # --account missing
    ["keys", "add", "--account", "a", "--name", "A", "--key-name", "L"],  # file missing
    ["keys", "add", "--account", "a", "--name", "A", "--key-name", "L", "a.pub", "b.pub"],
    ["keys", "remove"],
    ["keys", "list", "--jsn"],
    ["keys", "list", "extra"],
    ["accounts"],
    ["accounts", "frob"],
    ["accounts", "route", "--account", "a"],                              # --backend missing
    ["accounts", "route", "--backend", "default"],                        # --account missing
    ["accounts", "list", "extra"],
    ["version", "extra"],
    ["serve", "--nope"],
    ["serve", "extra"],
    ["--config"],
]


@pytest.mark.parametrize("args", BAD_ARGS, ids=lambda a: " ".join(a))
def test_bad_arguments_are_config_errors(args):
    from kiln import cli
    from kiln.errors import ConfigError
    with pytest.raises(ConfigError) as info:
        cli.parse_args(args)
    assert str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("args", [BAD_ARGS[0], BAD_ARGS[1], BAD_ARGS[4], BAD_ARGS[10], ["accounts"],
                                  ["accounts", "route", "--account", "a"]], ids=lambda a: " ".join(a))
def test_bad_arguments_exit_2(tmp_path, args):
    assert_usage_error(*run(args, tmp_path))
    assert os.listdir(str(tmp_path)) == []


def test_parse_args_defaults():
    from kiln import cli
    assert cli.parse_args([]).command == "serve"
    args = cli.parse_args(["keys", "add", "--config", "c.toml", "--account", "a", "--name", "N", "--key-name", "K",
                           "-"])
    assert (args.command, args.keys_command, args.config, args.account, args.name, args.key_name, args.pubkey_file) \
        == ("keys", "add", "c.toml", "a", "N", "K", "-")
    assert cli.parse_args(["keys", "list", "--json"]).json is True


# ---------------------------------------------------------------------------------------------------------------
# version


def test_version(tmp_path):
    rc, out, err = run(["version"], tmp_path)
    assert (rc, err) == (0, "")
    v = out.strip()
    assert out == v + "\n"
    assert VERSION_RE.match(v) or v == "0.0.0-dev", v


# ---------------------------------------------------------------------------------------------------------------
# gevent monkey-patching comes first


def test_importing_kilnproxy_patches_socket_and_threading(tmp_path):
    code = (
        "import sys; sys.argv = ['kilnproxy.py', 'version']\n"
        "import importlib.util\n"
        "spec = importlib.util.spec_from_file_location('kp', %r)\n"
        "m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)\n"
        "import gevent.monkey, socket, threading, select, time\n"
        "assert gevent.monkey.is_module_patched('socket')\n"
        "assert gevent.monkey.is_module_patched('threading')\n"
        "assert gevent.monkey.is_module_patched('select')\n"
        "assert gevent.monkey.is_module_patched('time')\n"
        "import gevent.socket; assert socket.socket is gevent.socket.socket\n"
        "print('patched')\n" % KILNPROXY
    )
    p = subprocess.run([PYTHON, "-c", code], cwd=str(tmp_path), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip().splitlines()[-1] == "patched"


def test_kilnproxy_patches_before_anything_else():
    with open(KILNPROXY, encoding="utf-8") as f:
        tree = ast.parse(f.read())
    body = list(tree.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]
    first, second = body[0], body[1]
    assert isinstance(first, ast.ImportFrom) and first.module == "gevent" and first.level == 0
    assert [(a.name, a.asname) for a in first.names] == [("monkey", None)]
    assert isinstance(second, ast.Expr) and isinstance(second.value, ast.Call)
    func = second.value.func
    assert isinstance(func, ast.Attribute) and func.attr == "patch_all"
    assert isinstance(func.value, ast.Name) and func.value.id == "monkey"
    assert second.value.args == [] and second.value.keywords == []  # all of it, not a partial patch
