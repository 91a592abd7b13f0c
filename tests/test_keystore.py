"""Key store (lib/kiln/keystore.py): parsing real OpenSSH keys, fingerprints, the SQLite store and KeyIndex."""
import base64
import hashlib
import os
import struct
import subprocess
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

import pytest  # noqa: E402

from kiln import keystore  # noqa: E402
from kiln.errors import DuplicateKeyError, KeyStoreError  # noqa: E402
from kiln.keystore import Identity, KeyIndex, SQLiteKeyStore  # noqa: E402


def ssh_keygen(folder, name, *args):
    path = os.path.join(str(folder), name)
    subprocess.run(["ssh-keygen", "-q", "-N", "", "-C", "%s@test" % name, "-f", path] + list(args),
                   check=True, capture_output=True, timeout=60)
    return path


def keygen_fingerprint(pub_path):
    out = subprocess.run(["ssh-keygen", "-l", "-E", "sha256", "-f", pub_path], check=True, capture_output=True,
                         text=True, timeout=30).stdout
    return out.split()[1]


class Key:
    def __init__(self, path, kind):
        self.path, self.kind = path, kind
        self.pub_path = path + ".pub"
        with open(self.pub_path, encoding="utf-8") as f:
            self.text = f.read()
        self.key_type, self.b64, self.comment = self.text.split(None, 2)
        self.blob = base64.b64decode(self.b64)
        self.fingerprint = keygen_fingerprint(self.pub_path)


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("keys")
    made = {
        "ed25519": Key(ssh_keygen(d, "ed25519", "-t", "ed25519"), "ed25519"),
        "ed25519_b": Key(ssh_keygen(d, "ed25519_b", "-t", "ed25519"), "ed25519"),
        "ecdsa": Key(ssh_keygen(d, "ecdsa", "-t", "ecdsa"), "ecdsa"),
        "ecdsa384": Key(ssh_keygen(d, "ecdsa384", "-t", "ecdsa", "-b", "384"), "ecdsa"),
        "ecdsa521": Key(ssh_keygen(d, "ecdsa521", "-t", "ecdsa", "-b", "521"), "ecdsa"),
        "rsa": Key(ssh_keygen(d, "rsa", "-t", "rsa", "-b", "3072"), "rsa"),
        "rsa1024": Key(ssh_keygen(d, "rsa1024", "-t", "rsa", "-b", "1024"), "rsa"),
    }
    return made


@pytest.fixture(scope="module")
def dsa_text(tmp_path_factory):
    """An ssh-dss public key: from ssh-keygen when it still makes them, else built by hand (p, q, g, y)."""
    d = tmp_path_factory.mktemp("dsa")
    try:
        path = ssh_keygen(d, "dsa", "-t", "dsa")
        with open(path + ".pub", encoding="utf-8") as f:
            return f.read()
    except (subprocess.CalledProcessError, OSError):
        def s(b):
            return struct.pack(">I", len(b)) + b
        blob = s(b"ssh-dss") + s(b"\x00" + b"\xc5" * 128) + s(b"\x00" + b"\xd1" * 20) + s(b"\x02") + s(b"\x03")
        return "ssh-dss %s dsa@test\n" % base64.b64encode(blob).decode()


@pytest.fixture
def store(tmp_path):
    s = SQLiteKeyStore(str(tmp_path / "state" / "keys.db"))
    yield s
    s.close()


ALL_KINDS = ["ed25519", "ecdsa", "ecdsa384", "ecdsa521", "rsa"]


# ---------------------------------------------------------------------------------------------------------------
# parse_public_key and fingerprint


@pytest.mark.parametrize("name", ALL_KINDS)
def test_fingerprint_equals_ssh_keygen(keys, name):
    k = keys[name]
    assert k.fingerprint.startswith("SHA256:") and not k.fingerprint.endswith("=")
    key_type, blob = keystore.parse_public_key(k.text)
    assert (key_type, blob) == (k.key_type, k.blob)
    assert keystore.fingerprint(blob) == k.fingerprint


def test_fingerprint_form():
    fp = keystore.fingerprint(b"anything")
    digest = hashlib.sha256(b"anything").digest()
    assert fp == "SHA256:" + base64.b64encode(digest).decode().rstrip("=")
    assert len(fp) == len("SHA256:") + 43


@pytest.mark.parametrize("name", ALL_KINDS)
def test_blob_is_what_a_client_offers_at_login(keys, name):
    """The auth path looks keys up by the wire blob paramiko gets from the client: it must equal the stored one."""
    import paramiko
    k = keys[name]
    private = paramiko.PKey.from_path(k.path)
    assert private.asbytes() == keystore.parse_public_key(k.text)[1]


def test_parse_variants(keys):
    k = keys["ed25519"]
    expected = ("ssh-ed25519", k.blob)
    for text in (
        "%s %s" % (k.key_type, k.b64),                              # no comment
        "%s %s a comment with spaces\n" % (k.key_type, k.b64),
        "  \t%s   %s  \r\n" % (k.key_type, k.b64),                   # blanks and CRLF
        "# my laptop\n\n%s %s me@host\n\n" % (k.key_type, k.b64),   # comment lines and blank lines
    ):
        assert keystore.parse_public_key(text) == expected, text


@pytest.mark.parametrize("options", [
    "no-pty",
    "no-pty,no-port-forwarding,no-agent-forwarding,no-X11-forwarding",
    'from="10.0.0.0/8,192.168.1.*"',
    'command="echo hello world",no-pty',
    'command="echo ssh-ed25519 AAAA",no-pty',
    'command="say \\"hi there\\"",environment="A=b c"',
    'restrict,permitopen="host:22"',
    'expiry-time="20300101"',
])
def test_authorized_keys_lines_with_options(keys, options):
    for name in ("ed25519", "rsa"):
        k = keys[name]
        line = "%s %s %s" % (options, k.key_type, k.b64) + " " + k.comment
        assert keystore.parse_public_key(line) == (k.key_type, k.blob), line


def test_unbalanced_option_quotes(keys):
    k = keys["ed25519"]
    with pytest.raises(KeyStoreError):
        keystore.parse_public_key('command="echo hi %s %s' % (k.key_type, k.b64))


def _malformed_cases(keys, dsa_text):
    ed, rsa, ec = keys["ed25519"], keys["rsa"], keys["ecdsa"]
    trailing = base64.b64encode(ed.blob + b"\x00\x00\x00\x03abc").decode()
    return {
        "empty": "",
        "blank": "  \n\t\n",
        "comment only": "# nothing here\n",
        "garbage": "this is not a key",
        "binary-ish": "\x00\x01\x02",
        "type only": "ssh-ed25519",
        "type and comment-like": "ssh-ed25519 me@host",
        "not base64": "ssh-ed25519 !!!!notbase64!!!! me",
        "truncated base64": "ssh-ed25519 %s me" % ed.b64[:-7],
        "truncated blob": "ssh-ed25519 %s me" % base64.b64encode(ed.blob[:-8]).decode(),
        "truncated rsa blob": "ssh-rsa %s me" % base64.b64encode(rsa.blob[:len(rsa.blob) // 2]).decode(),
        "half rsa base64": "ssh-rsa %s me" % rsa.b64[:len(rsa.b64) // 2 // 4 * 4],
        "trailing data in blob": "ssh-ed25519 %s me" % trailing,
        "type mismatch ed25519/rsa": "ssh-ed25519 %s me" % rsa.b64,
        "type mismatch rsa/ed25519": "ssh-rsa %s me" % ed.b64,
        "type mismatch ecdsa curve": "ecdsa-sha2-nistp384 %s me" % ec.b64,
        "type mismatch ecdsa/ed25519": "ecdsa-sha2-nistp256 %s me" % ed.b64,
        "two keys": ed.text + rsa.text,
        "two keys one line": "%s %s %s %s" % (ed.key_type, ed.b64, rsa.key_type, rsa.b64) + "\n" + ec.text,
        "dsa": dsa_text,
        "rsa 1024": keys["rsa1024"].text,
        "security key": "sk-ssh-ed25519@openssh.com %s me" % ed.b64,
        "certificate": "ssh-ed25519-cert-v01@openssh.com %s me" % ed.b64,
        "unknown type": "ssh-foo %s me" % ed.b64,
        "private key": ("-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n"
                        "-----END OPENSSH PRIVATE KEY-----\n"),
        "ssh2 format": "---- BEGIN SSH2 PUBLIC KEY ----\n%s\n---- END SSH2 PUBLIC KEY ----\n" % ed.b64,
        "known_hosts line": "host.example %s %s" % (ed.key_type, ed.b64),
        "options then nothing": "no-pty",
        "cert-authority": "cert-authority %s %s" % (ed.key_type, ed.b64),
    }


MALFORMED_IDS = [
    "empty", "blank", "comment only", "garbage", "binary-ish", "type only", "type and comment-like", "not base64",
    "truncated base64", "truncated blob", "truncated rsa blob", "half rsa base64", "trailing data in blob",
    "type mismatch ed25519/rsa", "type mismatch rsa/ed25519", "type mismatch ecdsa curve",
    "type mismatch ecdsa/ed25519", "two keys", "two keys one line", "dsa", "rsa 1024", "security key", "certificate",
    "unknown type", "private key", "ssh2 format", "options then nothing", "cert-authority",
]


@pytest.mark.parametrize("case", MALFORMED_IDS)
def test_malformed_keys_rejected(keys, dsa_text, case):
    text = _malformed_cases(keys, dsa_text)[case]
    with pytest.raises(KeyStoreError) as info:
        keystore.parse_public_key(text)
    assert not isinstance(info.value, DuplicateKeyError)
    assert str(info.value) and "\n" not in str(info.value)


def test_specific_messages(keys, dsa_text):
    def msg(text):
        with pytest.raises(KeyStoreError) as info:
            keystore.parse_public_key(text)
        return str(info.value)
    assert "too short" in msg(keys["rsa1024"].text)
    assert "ssh-dss" in msg(dsa_text)
    assert "one public key" in msg(keys["ed25519"].text + keys["rsa"].text)
    assert "does not match" in msg("ecdsa-sha2-nistp384 %s" % keys["ecdsa"].b64)


@pytest.mark.parametrize("options", ["cert-authority", 'cert-authority,principals="alice"', "no-pty,bogus",
                                     "host.example", "no-pty,,no-pty"])
def test_unknown_or_ca_options_rejected(keys, options):
    k = keys["ed25519"]
    with pytest.raises(KeyStoreError):
        keystore.parse_public_key("%s %s %s" % (options, k.key_type, k.b64))


# ---------------------------------------------------------------------------------------------------------------
# account and labels


@pytest.mark.parametrize("account", ["alice", "a", "_svc", "a.b-c_d", "A1", "x" * 64])
def test_valid_accounts(account):
    assert keystore.check_account(account) == account


@pytest.mark.parametrize("account", ["", ".alice", "-alice", "a/b", "a b", "alice\n", "alice\r", "al\0ice", "x" * 65,
                                     "\u00e9", "alice/", "..", None, 5])
def test_invalid_accounts(account):
    with pytest.raises(KeyStoreError):
        keystore.check_account(account)


@pytest.mark.parametrize("value", ["Jane Doe", "Jos\u00e9 M\u00fcller", "Laptop (2024)", "x" * 200, "\u5c71\u7530"])
def test_valid_labels(value):
    assert keystore.check_label(value, "name") == value


@pytest.mark.parametrize("value", ["", "   ", "x" * 201, "a\nb", "a\rb", "a\tb", "a\0b", "a\x1bb", "a\x7fb", "a\x85b",
                                   "a\u2028b", "a\u2029b", None, 3])
def test_invalid_labels(value):
    with pytest.raises(KeyStoreError) as info:
        keystore.check_label(value, "key name")
    assert "key name" in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# SQLiteKeyStore


def test_add_list_remove_round_trip(store, keys):
    before = time.time()
    fps = {}
    for i, name in enumerate(ALL_KINDS):
        k = keys[name]
        fps[name] = store.add("acct%d" % (i % 2), "User %d" % i, "Key %s" % name, k.text)
        assert fps[name] == k.fingerprint
    records = store.list()
    assert len(records) == len(ALL_KINDS)
    by_fp = {r.fingerprint: r for r in records}
    for i, name in enumerate(ALL_KINDS):
        r = by_fp[keys[name].fingerprint]
        assert (r.account, r.name, r.key_name, r.key_type) == ("acct%d" % (i % 2), "User %d" % i, "Key %s" % name,
                                                               keys[name].key_type)
        assert bytes(r.blob) == keys[name].blob
        assert before - 1 <= r.added <= time.time() + 1
    # ordered by account, name, key name
    order = [(r.account, r.name, r.key_name) for r in records]
    assert order == sorted(order)

    store.remove(fps["rsa"])
    assert keys["rsa"].fingerprint not in {r.fingerprint for r in store.list()}
    assert len(store.list()) == len(ALL_KINDS) - 1
    with pytest.raises(KeyStoreError):
        store.remove(fps["rsa"])
    with pytest.raises(KeyStoreError):
        store.remove("SHA256:doesnotexist")
    assert len(store.list()) == len(ALL_KINDS) - 1


def test_store_persists_across_reopen(tmp_path, keys):
    path = str(tmp_path / "keys.db")
    s = SQLiteKeyStore(path)
    s.add("alice", "Alice", "Laptop", keys["ed25519"].text)
    s.close()
    s.close()  # idempotent
    s = SQLiteKeyStore(path)
    try:
        assert [(r.fingerprint, r.account) for r in s.list()] == [(keys["ed25519"].fingerprint, "alice")]
    finally:
        s.close()


def test_store_creates_its_folder(tmp_path, keys):
    path = tmp_path / "a" / "b" / "keys.db"
    s = SQLiteKeyStore(str(path))
    s.close()
    assert path.is_file()


def _db_state(store):
    return [tuple(r) for r in store.list()]


@pytest.mark.parametrize("variant", ["same text", "other comment", "other account", "with options", "with comments"])
def test_duplicate_raises_and_writes_nothing(store, keys, variant):
    k = keys["ed25519"]
    store.add("alice", "Alice", "Laptop", k.text)
    before_rows = _db_state(store)
    with open(store.path, "rb") as f:
        before_bytes = f.read()
    text = {
        "same text": k.text,
        "other comment": "%s %s other@host" % (k.key_type, k.b64),
        "other account": k.text,
        "with options": "no-pty %s %s" % (k.key_type, k.b64),
        "with comments": "# again\n" + k.text,
    }[variant]
    account = "bob" if variant == "other account" else "alice"
    with pytest.raises(DuplicateKeyError) as info:
        store.add(account, "Someone", "Other", text)
    assert k.fingerprint in str(info.value)
    assert _db_state(store) == before_rows
    with open(store.path, "rb") as f:
        assert f.read() == before_bytes


def test_malformed_add_writes_nothing(store, keys, dsa_text):
    store.add("alice", "Alice", "Laptop", keys["ed25519"].text)
    before = _db_state(store)
    for text in _malformed_cases(keys, dsa_text).values():
        with pytest.raises(KeyStoreError):
            store.add("bob", "Bob", "Desk", text)
    for account, name, key_name in (("-bob", "Bob", "Desk"), ("bob", "", "Desk"), ("bob", "Bob", "a\nb")):
        with pytest.raises(KeyStoreError):
            store.add(account, name, key_name, keys["rsa"].text)
    assert _db_state(store) == before


def test_open_failure_is_a_keystore_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(KeyStoreError):
        SQLiteKeyStore(str(tmp_path / "file" / "keys.db"))  # folder is a file
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(KeyStoreError):
        SQLiteKeyStore(str(tmp_path / "dir.db"))
    (tmp_path / "junk.db").write_bytes(b"this is not sqlite" * 100)
    with pytest.raises(KeyStoreError):
        SQLiteKeyStore(str(tmp_path / "junk.db"))


# ---------------------------------------------------------------------------------------------------------------
# KeyIndex


def test_index_lookup_by_blob(store, keys):
    store.add("alice", "Alice Smith", "Laptop", keys["ed25519"].text)
    store.add("bob", "Bob Jones", "Desktop", keys["rsa"].text)
    index = store.index()
    assert len(index) == 2
    k = keys["ed25519"]
    assert index.lookup(k.blob) == Identity(k.fingerprint, "alice", "Alice Smith", "Laptop")
    assert index.lookup(bytearray(k.blob)) == index.lookup(memoryview(k.blob)) == index.lookup(k.blob)
    assert index.lookup(keys["rsa"].blob).account == "bob"
    assert index.lookup(keys["ed25519_b"].blob) is None
    assert index.lookup(keys["ecdsa"].blob) is None
    assert index.lookup(b"") is None
    assert index.lookup(k.blob + b"\x00") is None


def test_index_is_a_snapshot(store, keys):
    store.add("alice", "Alice", "Laptop", keys["ed25519"].text)
    index = store.index()
    store.add("alice", "Alice", "Desk", keys["ecdsa"].text)
    store.remove(keys["ed25519"].fingerprint)
    assert index.lookup(keys["ed25519"].blob) is not None
    assert index.lookup(keys["ecdsa"].blob) is None
    fresh = store.index()
    assert fresh.lookup(keys["ed25519"].blob) is None
    assert fresh.lookup(keys["ecdsa"].blob).key_name == "Desk"


def test_index_from_paramiko_key_of_the_private_file(store, keys):
    """What the server will do: paramiko hands it the client's PKey; its asbytes() finds the identity."""
    import paramiko
    for name in ALL_KINDS:
        store.add("alice", "Alice", name, keys[name].text)
    index = store.index()
    for name in ALL_KINDS:
        pkey = paramiko.PKey.from_path(keys[name].path)
        identity = index.lookup(pkey.asbytes())
        assert identity is not None and identity.key_name == name and identity.fingerprint == keys[name].fingerprint


def test_empty_index():
    index = KeyIndex()
    assert len(index) == 0
    assert index.lookup(b"anything") is None


# ---------------------------------------------------------------------------------------------------------------
# labels: characters that show something other than what is stored (security review, finding 9)


@pytest.mark.parametrize("value", [
    "Jos\u00e9", "\u65e5\u672c", "\u00d8lsen \u00dcn\u00efc\u00f6d\u00e9", "e\u0301clair", "\u0645\u062d\u0645\u062f",
    "Laptop \U0001f4bb", "\u00a0nbsp inside", "Ren\u00e9e (\u6771\u4eac)",
])
def test_non_ascii_letters_stay_allowed(value):
    assert keystore.check_label(value, "name") == value


@pytest.mark.parametrize("char", [
    "\u202a", "\u202b", "\u202c", "\u202d", "\u202e",      # Cf: bidi embeddings and overrides
    "\u2066", "\u2067", "\u2068", "\u2069",                # Cf: bidi isolates
    "\u200b", "\u200c", "\u200d", "\ufeff", "\u200e",      # Cf: zero-width space/joiners, BOM, LRM
    "\u00ad", "\u2060",                                    # Cf: soft hyphen, word joiner
    "\x00", "\x1b", "\x7f", "\x85",                        # Cc
    "\u2028", "\u2029",                                    # Zl, Zp
    "\udcff",                                              # Cs: what an undecodable argv byte becomes
    "\ue000", "\u0378",                                    # Co private use, Cn unassigned
])
def test_format_control_and_separator_characters_refused(char):
    for value in ("Peter%sGibbons" % char, char + "Laptop", "Laptop" + char):
        with pytest.raises(KeyStoreError) as info:
            keystore.check_label(value, "key name")
        message = str(info.value)
        assert "key name" in message and "U+%04X" % ord(char) in message
        assert char not in message and message.isprintable()   # the message escapes it, never applies it


def test_store_add_refuses_bidi_names(store, keys):
    with pytest.raises(KeyStoreError):
        store.add("alice", "Alice \u202eevil", "Laptop", keys["ed25519"].text)
    with pytest.raises(KeyStoreError):
        store.add("alice", "Alice", "Lap\u200btop", keys["ed25519"].text)
    assert store.list() == []


# ---------------------------------------------------------------------------------------------------------------
# state file modes


@pytest.fixture(params=[0o000, 0o022, 0o077], ids=["umask000", "umask022", "umask077"])
def umask(request):
    old = os.umask(request.param)
    yield request.param
    os.umask(old)


def _mode(path):
    return os.stat(str(path)).st_mode & 0o777


def test_store_file_0600_and_new_folders_0700(tmp_path, umask, keys):
    path = tmp_path / "state" / "db" / "keys.db"
    s = SQLiteKeyStore(str(path))
    s.add("alice", "Alice", "Laptop", keys["ed25519"].text)
    assert _mode(path) == 0o600
    assert _mode(tmp_path / "state") == _mode(tmp_path / "state" / "db") == 0o700


def test_existing_folder_and_store_are_left_as_they_are(tmp_path, keys):
    state = tmp_path / "shared"
    state.mkdir()
    os.chmod(str(state), 0o750)                 # the operator's choice
    s = SQLiteKeyStore(str(state / "keys.db"))
    assert _mode(state) == 0o750
    assert _mode(state / "keys.db") == 0o600
    os.chmod(str(state / "keys.db"), 0o640)
    SQLiteKeyStore(str(state / "keys.db")).add("alice", "Alice", "Laptop", keys["ed25519"].text)
    assert _mode(state / "keys.db") == 0o640
    assert len(s.list()) == 1


def test_ensure_private_dir(tmp_path, umask):
    target = tmp_path / "a" / "b" / "c"
    assert keystore.ensure_private_dir(str(target)) == str(target)
    for p in (tmp_path / "a", tmp_path / "a" / "b", target):
        assert _mode(p) == 0o700
    keystore.ensure_private_dir(str(target))     # again: fine
    (tmp_path / "file").write_text("x")
    with pytest.raises(OSError):
        keystore.ensure_private_dir(str(tmp_path / "file" / "sub"))


def test_journal_gets_the_store_mode(tmp_path, umask, keys):
    import sqlite3
    path = str(tmp_path / "state" / "keys.db")
    SQLiteKeyStore(path)
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT INTO keys VALUES ('fp', 'a', 'n', 'k', 't', x'00', 0)")
        assert os.path.exists(path + "-journal")
        assert _mode(path + "-journal") == 0o600
        conn.execute("ROLLBACK")
    finally:
        conn.close()


def test_a_deleted_store_is_an_error_not_a_new_file(tmp_path, keys):
    path = tmp_path / "keys.db"
    s = SQLiteKeyStore(str(path))
    path.unlink()
    with pytest.raises(KeyStoreError, match="cannot open key store"):
        s.list()
    with pytest.raises(KeyStoreError):
        s.index()
    assert not path.exists()


# ---------------------------------------------------------------------------------------------------------------
# the store off the event loop: another process holding the lock must not freeze the hub


LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN EXCLUSIVE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("COMMIT")
print(time.time(), flush=True)
conn.close()
"""

# Runs monkey-patched, as the proxy does (this test process is not patched). Falls back to the store's default busy
# timeout when the constructor does not take one, so that the old store fails on isolation, not on a TypeError.
PATCHED_INDEX = """
from gevent import monkey
monkey.patch_all()
import json, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import gevent
from kiln.errors import KeyStoreError
from kiln.keystore import SQLiteKeyStore
db, pub, hold, busy, locker_code = sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]), sys.argv[6]
try:
    store = SQLiteKeyStore(db, busy_timeout=busy)
except TypeError:
    store = SQLiteKeyStore(db)
with open(pub) as f:
    store.add("alice", "Alice", "Laptop", f.read())
locker = subprocess.Popen([sys.executable, "-c", locker_code, db, hold], stdout=subprocess.PIPE, text=True)
assert locker.stdout.readline().strip() == "locked"
gaps = []
def tick():
    last = time.monotonic()
    while True:
        gevent.sleep(0.01)
        now = time.monotonic()
        gaps.append(now - last)
        last = now
ticker = gevent.spawn(tick)
gevent.sleep(0.05)
started = time.monotonic()
keys = error = None
try:
    keys = len(store.index())
except KeyStoreError as e:
    error = str(e)
elapsed = time.monotonic() - started
ended = time.time()
locked_still = locker.poll() is None
ticker.kill()
committed = float(locker.stdout.readline())
locker.wait()
locker.stdout.close()
# several greenlets at once: several worker threads, each with its own connection (check_same_thread)
jobs = [gevent.spawn(store.index) for _ in range(20)]
gevent.joinall(jobs, raise_error=True)
print(json.dumps({"keys": keys, "error": error, "elapsed": elapsed, "max_gap": max(gaps), "ticks": len(gaps),
                  "locked_still": locked_still, "ended_after_commit": ended >= committed,
                  "concurrent": sorted({len(j.value) for j in jobs})}))
"""


def _patched_index(tmp_path, keys, hold, busy):
    import json
    lib = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib")
    out = subprocess.run([sys.executable, "-X", "dev", "-c", PATCHED_INDEX, lib, str(tmp_path / "state" / "keys.db"),
                          keys["ed25519"].pub_path, str(hold), str(busy), LOCKER],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr, out.stderr
    return json.loads(out.stdout)


def test_index_waits_for_another_process_lock_off_the_loop(tmp_path, keys):
    r = _patched_index(tmp_path, keys, hold=1.5, busy=5.0)
    assert r["keys"] == 1 and r["error"] is None
    # it did wait for the lock (the test means something): it ended after the locker's COMMIT (the locker process
    # itself may still be exiting then: a reader whose busy wait ends at once after the commit is no failure)
    assert r["ended_after_commit"] and r["elapsed"] >= 0.5
    assert r["max_gap"] < 0.5, r                           # ... and the hub kept running meanwhile
    assert r["concurrent"] == [1]


def test_index_gives_up_after_the_busy_timeout_off_the_loop(tmp_path, keys):
    r = _patched_index(tmp_path, keys, hold=3.0, busy=0.5)
    assert r["keys"] is None and "database is locked" in r["error"] and "keys.db" in r["error"]
    assert r["locked_still"]                                # bounded: gave up while the lock was still held
    assert r["max_gap"] < 0.5, r
    assert r["concurrent"] == [1]


def test_busy_timeout_is_bounded(tmp_path):
    assert 0 < keystore.BUSY_TIMEOUT <= 10
    assert SQLiteKeyStore(str(tmp_path / "keys.db")).busy_timeout == keystore.BUSY_TIMEOUT


# ---------------------------------------------------------------------------------------------------------------
# schema versions and migration

# Wave 1's schema exactly as it shipped (SQLiteKeyStore.SCHEMA at 7c2b3b3), with no version table.
WAVE1_SCHEMA = """
CREATE TABLE IF NOT EXISTS keys (
    fingerprint TEXT PRIMARY KEY,
    account     TEXT NOT NULL,
    name        TEXT NOT NULL,
    key_name    TEXT NOT NULL,
    key_type    TEXT NOT NULL,
    key_blob    BLOB NOT NULL,
    added       REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS keys_account ON keys(account);
"""


def _sql(path, *statements, args=()):
    """Run statements on a connection of the test's own (another writer, as the sqlite3 shell would be)."""
    import sqlite3
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        rows = None
        for statement in statements:
            rows = conn.execute(statement, args).fetchall() if args else conn.execute(statement).fetchall()
        return rows
    finally:
        conn.close()


def make_wave1_store(path, keys, names=("ed25519", "rsa")):
    import sqlite3
    conn = sqlite3.connect(str(path), isolation_level=None)
    try:
        conn.executescript(WAVE1_SCHEMA)
        for i, name in enumerate(names):
            k = keys[name]
            conn.execute("INSERT INTO keys VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (k.fingerprint, "acct%d" % i, "User %d" % i, "Key %d" % i, k.key_type, k.blob, 1000.0 + i))
    finally:
        conn.close()
    os.chmod(str(path), 0o600)
    return path


def _tables(path):
    return {row[0] for row in _sql(path, "SELECT name FROM sqlite_master WHERE type = 'table'")}


def _version(path):
    return _sql(path, "SELECT version FROM schema_version")[0][0]


def test_a_new_store_gets_the_current_schema(store):
    assert _tables(store.path) == {"keys", "routes", "schema_version"}
    assert _version(store.path) == keystore.SCHEMA_VERSION == 2


def test_a_wave1_store_is_migrated_in_place(tmp_path, keys):
    path = make_wave1_store(tmp_path / "keys.db", keys)
    inode = os.stat(str(path)).st_ino
    s = SQLiteKeyStore(str(path))
    assert _tables(path) == {"keys", "routes", "schema_version"}
    assert _version(path) == keystore.SCHEMA_VERSION
    assert os.stat(str(path)).st_ino == inode and _mode(path) == 0o600     # the same file, in place
    records = s.list()
    assert [(r.fingerprint, r.account, r.name, r.key_name, r.added) for r in records] == [
        (keys["ed25519"].fingerprint, "acct0", "User 0", "Key 0", 1000.0),
        (keys["rsa"].fingerprint, "acct1", "User 1", "Key 1", 1001.0)]
    index = s.index()
    assert index.lookup(keys["rsa"].blob).account == "acct1" and index.route("acct1") == "default"
    s.set_route("acct1", "eu")                                     # the new table works
    assert SQLiteKeyStore(str(path)).index().route("acct1") == "eu"  # reopening migrates nothing again
    assert _version(path) == keystore.SCHEMA_VERSION


def test_a_newer_schema_is_refused_and_left_alone(tmp_path, keys):
    path = tmp_path / "keys.db"
    SQLiteKeyStore(str(path)).add("alice", "Alice", "Laptop", keys["ed25519"].text)
    _sql(path, "UPDATE schema_version SET version = %d" % (keystore.SCHEMA_VERSION + 1))
    before = path.read_bytes()
    with pytest.raises(keystore.SchemaTooNewError) as info:
        SQLiteKeyStore(str(path))
    assert not isinstance(info.value, keystore.KeyStoreUnavailable)   # bad input (exit 2), not "unreachable"
    message = str(info.value)
    assert "schema version 3" in message and str(path) in message and "upgrade" in message and "\n" not in message
    assert path.read_bytes() == before


def test_a_migration_under_way_elsewhere_is_waited_for_and_not_repeated(tmp_path, keys, monkeypatch):
    """Another process starts migrating (holding the write lock) after this one read version 1: this one waits for
    the lock, reads the version again and does nothing (running the migration twice would fail: CREATE TABLE)."""
    import sqlite3
    import threading
    path = make_wave1_store(tmp_path / "keys.db", keys)
    other = sqlite3.connect(str(path), isolation_level=None)
    other.execute("BEGIN IMMEDIATE")
    read_v1 = threading.Event()
    seen = []
    original = SQLiteKeyStore._schema_version

    def spy(self, conn):
        v = original(self, conn)
        seen.append(v)
        read_v1.set()
        return v

    monkeypatch.setattr(SQLiteKeyStore, "_schema_version", spy)
    result = {}

    def open_store():
        try:
            result["store"] = SQLiteKeyStore(str(path))
        except Exception as e:   # reported below
            result["error"] = e

    t = threading.Thread(target=open_store)
    t.start()
    assert read_v1.wait(30)
    for step in range(2, keystore.SCHEMA_VERSION + 1):
        for statement in keystore.MIGRATIONS[step]:
            other.execute(statement)
    other.execute("INSERT INTO schema_version VALUES (1, ?)", (keystore.SCHEMA_VERSION,))
    other.execute("COMMIT")
    other.close()
    t.join(30)
    assert "error" not in result, result
    assert seen == [1, keystore.SCHEMA_VERSION]
    assert len(result["store"].list()) == 2


MIGRATE_AT_ONCE = """
import os, sys, time
sys.path.insert(0, sys.argv[1])
from kiln.keystore import SQLiteKeyStore
while not os.path.exists(sys.argv[3]):
    time.sleep(0.001)
print(len(SQLiteKeyStore(sys.argv[2]).list()))
"""


def test_processes_starting_at_once_migrate_once(tmp_path, keys):
    path = make_wave1_store(tmp_path / "keys.db", keys)
    go = tmp_path / "go"
    lib = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib")
    procs = [subprocess.Popen([sys.executable, "-c", MIGRATE_AT_ONCE, lib, str(path), str(go)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(4)]
    go.write_text("")
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=60)
        outs.append((p.returncode, out.strip(), err))
    assert outs == [(0, "2", "")] * 4
    assert _version(path) == keystore.SCHEMA_VERSION
    assert _sql(path, "SELECT count(*) FROM schema_version") == [(1,)]


# ---------------------------------------------------------------------------------------------------------------
# routes


def test_routes_crud(store, keys):
    assert store.routes() == {} and store.accounts() == []
    store.add("alice", "Alice", "Laptop", keys["ed25519"].text)
    store.add("alice", "Alice", "Phone", keys["ecdsa"].text)
    store.add("bob", "Bob", "Desk", keys["rsa"].text)
    store.set_route("alice", "eu")
    store.set_route("carol", "us-east_2")          # an account with no keys (yet) may be routed
    assert store.routes() == {"alice": "eu", "carol": "us-east_2"}
    assert store.accounts() == [("alice", "eu", 2), ("bob", "default", 1), ("carol", "us-east_2", 0)]
    assert store.accounts()[0].backend == "eu" and store.accounts()[0].keys == 2
    store.set_route("alice", "us")                 # changed
    store.set_route("carol", "default")            # reset: the route is gone
    assert store.routes() == {"alice": "us"}
    assert store.accounts() == [("alice", "us", 2), ("bob", "default", 1)]
    store.remove(keys["rsa"].fingerprint)
    store.remove(keys["ed25519"].fingerprint)
    store.remove(keys["ecdsa"].fingerprint)
    assert store.accounts() == [("alice", "us", 0)]   # the route outlives the keys


@pytest.mark.parametrize("account, backend", [
    ("-alice", "eu"), ("alice/x", "eu"), ("alice", ""), ("alice", "e.u"), ("alice", "e u"), ("alice", "eu\n"),
    ("alice", "x" * 33), ("alice", None),
])
def test_bad_routes_refused_and_nothing_written(store, account, backend):
    store.set_route("dave", "eu")
    with open(store.path, "rb") as f:
        before = f.read()
    with pytest.raises(KeyStoreError):
        store.set_route(account, backend)
    with open(store.path, "rb") as f:
        assert f.read() == before


def test_index_route(store, keys):
    store.add("alice", "Alice", "Laptop", keys["ed25519"].text)
    store.set_route("alice", "eu")
    index = store.index()
    assert index.route("alice") == "eu"
    assert index.route("bob") == "default"       # no route, or no such account: the default backend
    assert dict(index.routes) == {"alice": "eu"}
    with pytest.raises(TypeError):
        index.routes["bob"] = "x"                # read-only
    store.set_route("alice", "default")
    assert index.route("alice") == "eu"          # a snapshot
    assert store.index().route("alice") == "default"
    assert KeyIndex().route("anyone") == "default" and dict(KeyIndex().routes) == {}


# ---------------------------------------------------------------------------------------------------------------
# keystore.create and the settings


def _cfg(tmp_path, **keystore_values):
    from kiln import config
    return config.build({"state_dir": str(tmp_path / "state"), "keystore": keystore_values}, str(tmp_path))


def test_create_sqlite(tmp_path):
    cfg = _cfg(tmp_path)
    assert (cfg.keystore.kind, cfg.keystore.dsn) == ("sqlite", "")
    assert keystore.create(cfg, create_missing=False) is None
    assert not (tmp_path / "state").exists()        # asked not to create: nothing written
    s = keystore.create(cfg)
    assert isinstance(s, SQLiteKeyStore) and s.path == cfg.keystore.path and os.path.isfile(cfg.keystore.path)
    assert isinstance(keystore.create(cfg, create_missing=False), SQLiteKeyStore)
    assert keystore.create(cfg, busy_timeout=1.0).busy_timeout == 1.0


def test_create_postgres_is_not_yet_available(tmp_path):
    from kiln.errors import ConfigError
    cfg = _cfg(tmp_path, kind="postgres", dsn="postgresql://kiln@db/kiln")
    assert cfg.keystore.dsn == "postgresql://kiln@db/kiln"
    with pytest.raises(ConfigError, match="not yet available"):
        keystore.create(cfg)
    assert not (tmp_path / "state").exists()


def test_keystore_kind_is_checked_by_the_config(tmp_path):
    from kiln.errors import ConfigError
    with pytest.raises(ConfigError, match="keystore.kind"):
        _cfg(tmp_path, kind="mysql")
    with pytest.raises(ConfigError, match="keystore.dsn"):
        _cfg(tmp_path, dsn=5)


# ---------------------------------------------------------------------------------------------------------------
# change watching: poll_once (deterministic), then the watcher greenlet


class Clock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self):
        return self.now


@pytest.fixture
def watched(tmp_path):
    """(store, deliveries, clock): a store with a listener, a short busy timeout and an injected clock."""
    clock = Clock()
    s = SQLiteKeyStore(str(tmp_path / "state" / "keys.db"), busy_timeout=0.2, clock=clock)
    deliveries = []
    s.watch(deliveries.append)
    yield s, deliveries, clock
    s.close()
    assert s._wconn is None


def _fps(index):
    return sorted(i.fingerprint for i in index._by_blob.values())


def test_poll_delivers_first_then_only_changes(watched, keys):
    s, deliveries, _ = watched
    s.add("alice", "Alice", "Laptop", keys["ed25519"].text)
    assert s.poll_once() is True
    assert len(deliveries) == 1 and _fps(deliveries[0]) == [keys["ed25519"].fingerprint]   # always a first index
    for _ in range(5):
        assert s.poll_once() is True
    assert len(deliveries) == 1                   # nothing changed: nothing loaded, nothing delivered
    assert s.up is True


def test_poll_sees_changes_through_another_store_object(watched, keys):
    s, deliveries, _ = watched
    s.poll_once()
    other = SQLiteKeyStore(s.path)                # another connection (the CLI, another instance)
    other.add("alice", "Alice", "Laptop", keys["ed25519"].text)
    assert s.poll_once() and len(deliveries) == 2
    assert deliveries[-1].lookup(keys["ed25519"].blob).account == "alice"
    other.set_route("alice", "eu")
    assert s.poll_once() and deliveries[-1].route("alice") == "eu"
    other.remove(keys["ed25519"].fingerprint)
    assert s.poll_once() and deliveries[-1].lookup(keys["ed25519"].blob) is None
    s.add("bob", "Bob", "Desk", keys["rsa"].text)    # this very object writes on a connection of its own: seen too
    assert s.poll_once() and _fps(deliveries[-1]) == [keys["rsa"].fingerprint]
    assert len(deliveries) == 5


def test_poll_sees_changes_by_any_other_writer(watched, keys):
    """The sqlite3 module directly, as the sqlite3 shell or a provisioning script would write."""
    s, deliveries, _ = watched
    s.poll_once()
    k = keys["ecdsa"]
    _sql(s.path, "INSERT INTO keys VALUES (?, 'carol', 'Carol', 'Laptop', ?, ?, 0)",
         args=(k.fingerprint, k.key_type, k.blob))
    assert s.poll_once() and deliveries[-1].lookup(k.blob).account == "carol"
    _sql(s.path, "INSERT INTO routes VALUES ('carol', 'eu', 0)")
    assert s.poll_once() and deliveries[-1].route("carol") == "eu"
    _sql(s.path, "DELETE FROM routes")
    assert s.poll_once() and deliveries[-1].route("carol") == "default"
    assert len(deliveries) == 4


def test_refresh_delivers_and_returns(watched, keys):
    s, deliveries, _ = watched
    s.add("alice", "Alice", "Laptop", keys["ed25519"].text)
    index = s.refresh()
    assert deliveries == [index] and len(index) == 1


def _errors(caplog):
    return [r for r in caplog.records if r.name == "kiln.keystore" and r.levelname == "ERROR"]


def test_corrupt_store_keeps_what_was_loaded_logs_every_10s_and_recovers(watched, keys, caplog):
    caplog.set_level("INFO", logger="kiln.keystore")
    s, deliveries, clock = watched
    s.add("alice", "Alice", "Laptop", keys["ed25519"].text)
    assert s.poll_once() and s.up
    with open(s.path, "rb") as f:
        good = f.read()
    with open(s.path, "r+b") as f:                # overwritten in place: the same file, junk inside
        f.write(b"not a database, not at all " * 200)
    assert s.poll_once() is False
    assert s.up is False and len(deliveries) == 1  # nothing delivered: callers keep the index they have
    assert len(_errors(caplog)) == 1
    assert "key store unavailable" in _errors(caplog)[0].getMessage() and s.path in _errors(caplog)[0].getMessage()
    for _ in range(20):                           # ... 9.5 s of failed checks: still one ERROR
        clock.now += 0.5
        if clock.now - 1000.0 < 10:
            assert s.poll_once() is False
    assert len(_errors(caplog)) == 1
    clock.now = 1010.0
    assert s.poll_once() is False
    assert len(_errors(caplog)) == 2 and "more failed checks" in _errors(caplog)[1].getMessage()
    with open(s.path, "r+b") as f:                # restored
        f.write(good)
        f.truncate()
    assert s.poll_once() is True and s.up is True
    assert len(deliveries) == 2 and len(deliveries[-1]) == 1   # everything reloaded once back
    assert any("readable again" in r.getMessage() for r in caplog.records)
    assert s.poll_once() and len(deliveries) == 2
    assert len(_errors(caplog)) == 2


def test_locked_store_flips_up_and_recovers(watched, keys, caplog):
    import sqlite3
    s, deliveries, clock = watched
    assert s.poll_once()
    locker = sqlite3.connect(s.path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")
        k = keys["rsa"]
        locker.execute("INSERT INTO keys VALUES (?, 'bob', 'Bob', 'Desk', ?, ?, 0)",
                       (k.fingerprint, k.key_type, k.blob))
        assert s.poll_once() is False and s.up is False
        clock.now += 3
        assert s.poll_once() is False
        assert len(_errors(caplog)) == 1 and "locked" in _errors(caplog)[0].getMessage()
        locker.execute("COMMIT")
    finally:
        locker.close()
    assert s.poll_once() is True and s.up is True
    assert deliveries[-1].lookup(keys["rsa"].blob).account == "bob"


def test_deleted_store_is_down_not_recreated_and_a_replaced_one_is_followed(watched, keys, tmp_path):
    s, deliveries, _ = watched
    assert s.poll_once()
    os.unlink(s.path)
    assert s.poll_once() is False and s.up is False
    assert not os.path.exists(s.path)
    replacement = SQLiteKeyStore(str(tmp_path / "new.db"))
    replacement.add("erin", "Erin", "Laptop", keys["ecdsa384"].text)
    os.rename(str(tmp_path / "new.db"), s.path)    # a restored backup moved into place
    assert s.poll_once() is True and s.up is True
    assert deliveries[-1].lookup(keys["ecdsa384"].blob).account == "erin"
    # replaced while readable (a new inode behind the open connection): followed as well
    other = SQLiteKeyStore(str(tmp_path / "other.db"))
    other.add("fred", "Fred", "Laptop", keys["ecdsa521"].text)
    os.rename(str(tmp_path / "other.db"), s.path)
    assert s.poll_once() is True
    assert deliveries[-1].lookup(keys["ecdsa521"].blob).account == "fred"


def test_refresh_failure_marks_down(watched):
    s, deliveries, _ = watched
    with open(s.path, "wb") as f:
        f.write(b"junk" * 1000)
    with pytest.raises(keystore.KeyStoreUnavailable):
        s.refresh()
    assert s.up is False and deliveries == []


def _wait_until(predicate, timeout):
    import gevent
    give_up = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > give_up:
            return False
        gevent.sleep(0.02)
    return True


def test_watcher_greenlet_applies_changes_within_2s(watched, keys):
    s, deliveries, _ = watched
    s.start_watching()
    s.start_watching()                            # once is enough: still one watcher
    assert _wait_until(lambda: len(deliveries) == 1, 5)     # the first index, at once
    other = SQLiteKeyStore(s.path)
    for step in (lambda: other.add("alice", "Alice", "Laptop", keys["ed25519"].text),
                 lambda: _sql(s.path, "INSERT INTO routes VALUES ('alice', 'eu', 0)"),
                 lambda: other.remove(keys["ed25519"].fingerprint)):
        n = len(deliveries)
        step()
        assert _wait_until(lambda: len(deliveries) > n, 2.0)
    assert deliveries[-1].route("alice") == "eu" and len(deliveries[-1]) == 0
    s.stop()
    s.stop()                                      # safe to repeat
    assert s._watcher is None and s._wconn is None  # stopped cleanly: its connection is closed
    n = len(deliveries)
    other.set_route("alice", "us")
    import gevent
    gevent.sleep(1.0)
    assert len(deliveries) == n                   # stopped means stopped


def test_watcher_survives_a_failing_listener(watched, keys, caplog):
    s, deliveries, _ = watched
    calls = []

    def broken(index):
        calls.append(index)
        raise RuntimeError("listener bug")

    s.watch(broken)
    s.poll_interval = 0.05
    s.start_watching()
    assert _wait_until(lambda: len(calls) >= 1, 5)
    s.add("alice", "Alice", "Laptop", keys["ed25519"].text)
    assert _wait_until(lambda: len(calls) >= 2, 5)        # still watching
    s.stop()
    assert any("internal error" in r.getMessage() and r.exc_info for r in caplog.records)


# Runs monkey-patched, as the proxy does: checks run in gevent's threadpool (a different thread each time), the hub
# keeps ticking, changes by another process arrive.
PATCHED_WATCH = """
from gevent import monkey
monkey.patch_all()
import json, subprocess, sys, time
sys.path.insert(0, sys.argv[1])
import gevent
from kiln.keystore import SQLiteKeyStore
db, writer = sys.argv[2], sys.argv[3]
store = SQLiteKeyStore(db)
got = []
store.watch(got.append)
store.start_watching()
def wait(n):
    give_up = time.monotonic() + 2.0
    while len(got) < n and time.monotonic() < give_up:
        gevent.sleep(0.01)
    return len(got) >= n
first = wait(1)
started = time.monotonic()
subprocess.run([sys.executable, "-c", writer, db], check=True)
second = wait(2)
latency = time.monotonic() - started
store.stop()
print(json.dumps({"first": first, "second": second, "latency": latency, "route": got[-1].route("zed"),
                  "closed": store._wconn is None}))
"""


def test_watcher_in_a_patched_process(tmp_path):
    import json
    lib = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib")
    writer = "import sqlite3, sys; c = sqlite3.connect(sys.argv[1]); c.execute(\"INSERT INTO routes VALUES " \
             "('zed', 'eu', 0)\"); c.commit(); c.close()"
    out = subprocess.run([sys.executable, "-X", "dev", "-W", "error::ResourceWarning", "-c", PATCHED_WATCH, lib,
                          str(tmp_path / "keys.db"), writer], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stderr and "Exception ignored" not in out.stderr, out.stderr
    r = json.loads(out.stdout)
    assert r["first"] and r["second"] and r["route"] == "eu" and r["closed"], r
