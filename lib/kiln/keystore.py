"""The key store: public keys with the identity they stand for (account, full name, key name).

`KeyStore` is the small interface the rest of the proxy uses; `SQLiteKeyStore` is today's module (a PostgreSQL one
can arrive beside it). The auth path never touches the database: it reads a `KeyIndex`, an in-memory snapshot that
`reload()` replaces atomically (at start and on SIGHUP).

SQLite work never runs on the event loop of a monkey-patched process (the proxy, and the CLI through kilnproxy.py):
it goes to gevent's native threadpool, where SQLite's busy wait for another process's lock (up to BUSY_TIMEOUT) blocks
a real thread with the GIL released while the hub keeps serving. Each call opens its own connection in that thread
(sqlite3's check_same_thread), so no connection is shared between threads. State files are private: folders this
module creates are 0700, the database 0600 (SQLite gives its -journal/-wal/-shm files the database's mode).
"""
import base64
import binascii
import hashlib
import os
import re
import sqlite3
import sys
import time
import unicodedata
import urllib.parse
from collections import namedtuple

from .errors import DuplicateKeyError, KeyStoreError

ALLOWED_KEY_TYPES = (
    "ssh-ed25519",
    "ecdsa-sha2-nistp256",
    "ecdsa-sha2-nistp384",
    "ecdsa-sha2-nistp521",
    "ssh-rsa",
)
MIN_RSA_BITS = 2048
ACCOUNT_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,63}")  # fullmatch: `$` would accept a trailing newline
BUSY_TIMEOUT = 5.0   # seconds SQLite waits for another process's lock before "database is locked" (off the loop)
# Label characters refused: every Unicode "other" (Cc controls incl. C1; Cf format: bidi embeddings, overrides and
# isolates U+202A-U+202E and U+2066-U+2069, zero-width U+200B-U+200D and U+FEFF, soft hyphen; Cs lone surrogates,
# which undecodable argv bytes become; Co private use; Cn unassigned) and the line/paragraph separators Zl, Zp. They
# break `keys list` rows, logs and KILN_* env values, or make the dashboard show other text than what is stored.
REFUSED_LABEL_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))

Identity = namedtuple("Identity", "fingerprint account name key_name")
KeyRecord = namedtuple("KeyRecord", "fingerprint account name key_name key_type blob added")


def fingerprint(blob):
    """SHA256 fingerprint as `ssh-keygen -l` prints it: 'SHA256:' + unpadded base64."""
    return "SHA256:" + base64.b64encode(hashlib.sha256(blob).digest()).decode("ascii").rstrip("=")


def parse_public_key(text):
    """Parse one OpenSSH public key (.pub or authorized_keys line, options allowed) -> (key_type, blob).

    Raises KeyStoreError naming the problem for anything else, including more than one key.
    """
    import paramiko  # imported here so that pure callers (tests of account rules) need not load it

    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and not ln.strip().startswith("#")]
    if not lines:
        raise KeyStoreError("no public key found")
    if len(lines) > 1:
        raise KeyStoreError("expected one public key, found %d lines" % len(lines))
    fields = _skip_options(lines[0]).split()
    if not fields or not _looks_like_key_type(fields[0]):
        raise KeyStoreError("not an OpenSSH public key")
    key_type = fields[0]
    if len(fields) < 2:
        raise KeyStoreError("public key data missing after %s" % key_type)
    b64 = fields[1]
    if key_type not in ALLOWED_KEY_TYPES:
        raise KeyStoreError("unsupported key type %s (allowed: %s)" % (key_type, ", ".join(ALLOWED_KEY_TYPES)))
    try:
        blob = base64.b64decode(b64, validate=True)
    except (binascii.Error, ValueError):
        raise KeyStoreError("public key data is not valid base64") from None
    try:
        key = paramiko.PKey.from_type_string(key_type, blob)
    except Exception as e:  # paramiko raises many types for mangled blobs; all mean "malformed"
        raise KeyStoreError("malformed %s public key (%s)" % (key_type, e.__class__.__name__)) from None
    if key.get_name() != key_type and not (key_type == "ssh-rsa" and key.get_name().startswith("rsa")):
        raise KeyStoreError("key type %s does not match its data (%s)" % (key_type, key.get_name()))
    # paramiko ignores bytes after the key; such a blob would never equal the one a client offers at login.
    if key.asbytes() != blob:
        raise KeyStoreError("malformed %s public key (unexpected data after the key)" % key_type)
    if key_type == "ssh-rsa" and key.get_bits() < MIN_RSA_BITS:
        raise KeyStoreError("RSA key too short (%d bits; at least %d)" % (key.get_bits(), MIN_RSA_BITS))
    return key_type, blob


def _looks_like_key_type(field):
    return field in ALLOWED_KEY_TYPES or field.startswith(("ssh-", "ecdsa-", "sk-"))


# authorized_keys options OpenSSH knows (sshd(8)); anything else makes sshd ignore the line, so we refuse it too
KNOWN_OPTIONS = frozenset((
    "agent-forwarding", "command", "environment", "expiry-time", "from", "no-agent-forwarding",
    "no-port-forwarding", "no-pty", "no-user-rc", "no-x11-forwarding", "permitlisten", "permitopen",
    "port-forwarding", "principals", "pty", "no-touch-required", "verify-required", "restrict", "tunnel", "user-rc",
    "x11-forwarding",
))


def _skip_options(line):
    """The line without a leading authorized_keys options field (which may hold quoted spaces, as in
    `command="a b"`); unchanged when it starts with a key type. The options are checked, not applied."""
    first = line.split(None, 1)[0]
    if _looks_like_key_type(first):
        return line
    quoted = False
    items, start = [], 0
    i = 0
    while i < len(line):
        c = line[i]
        if quoted and c == "\\" and line[i + 1:i + 2] == '"':
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif c == "," and not quoted:
            items.append(line[start:i])
            start = i + 1
        elif c in " \t" and not quoted:
            break
        i += 1
    if quoted:
        raise KeyStoreError("unbalanced quotes in the key options")
    items.append(line[start:i])
    for item in items:
        name = item.split("=", 1)[0].lower()
        if name == "cert-authority":
            raise KeyStoreError("cert-authority keys are not supported")
        if name not in KNOWN_OPTIONS:
            raise KeyStoreError("not an OpenSSH public key (unknown option %r)" % name[:40])
    return line[i:]


def check_account(account):
    if not isinstance(account, str) or not ACCOUNT_RE.fullmatch(account):
        raise KeyStoreError("invalid account %r: use letters, digits, '.', '_', '-', not starting with '.' or '-'"
                            % (account,))
    return account


def check_label(value, what):
    """A full name or key name: 1-200 characters, none of REFUSED_LABEL_CATEGORIES (letters of any script are fine)."""
    if not isinstance(value, str) or not value.strip() or len(value) > 200:
        raise KeyStoreError("invalid %s %r: 1-200 printable characters" % (what, value))
    for c in value:
        if unicodedata.category(c) in REFUSED_LABEL_CATEGORIES:
            # %r escapes the character, so the message shows what is there instead of applying it
            raise KeyStoreError("invalid %s %r: %s is not allowed (no control, format, bidi, zero-width or "
                                "separator characters)" % (what, value, _describe_char(c)))
    return value


def _describe_char(c):
    name = unicodedata.name(c, "")
    return "U+%04X%s" % (ord(c), " " + name if name else "")


def ensure_private_dir(path):
    """Create folder `path` and its missing parents 0700 (whatever the umask); returns path.

    A folder that already exists is left as it is: its mode and owner are the operator's choice (a shared
    /var/lib, a group-readable state folder), and chmod-ing it behind their back would surprise more than help."""
    missing = []
    p = os.path.abspath(path)
    while not os.path.lexists(p):
        missing.append(p)
        parent = os.path.dirname(p)
        if parent == p:
            break
        p = parent
    for p in reversed(missing):
        try:
            os.mkdir(p, 0o700)
        except FileExistsError:
            if os.path.isdir(p):
                continue   # made meanwhile by someone else: theirs, left alone
            raise
        os.chmod(p, 0o700)   # mkdir's mode is masked by the umask; this only restores owner bits
    return path


def _create_private_file(path):
    """Create an empty file 0600 unless something is at path already (then left as it is)."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
    except FileExistsError:
        return
    os.close(fd)


def _off_loop(fn):
    """fn() in gevent's native threadpool when the process is monkey-patched; directly otherwise (unpatched callers,
    such as unit tests, have no event loop to protect). Exceptions from fn are raised here."""
    monkey = sys.modules.get("gevent.monkey")
    if monkey is None or not monkey.is_module_patched("threading"):
        return fn()
    import gevent

    def task():
        # An exception leaving a threadpool task is printed to stderr by the hub as a crash: the expected ones (the
        # operator's problems) travel back as a value instead. Anything else is a bug and is printed, then raised.
        try:
            return fn(), None
        except KeyStoreError as e:
            return None, e

    value, error = gevent.get_hub().threadpool.apply(task)
    if error is not None:
        raise error
    return value


class KeyIndex:
    """Immutable in-memory map from key blob to Identity; the only thing the auth path reads."""

    def __init__(self, records=()):
        self._by_blob = {bytes(r.blob): Identity(r.fingerprint, r.account, r.name, r.key_name) for r in records}

    def __len__(self):
        return len(self._by_blob)

    def lookup(self, blob):
        """The Identity of the public key whose SSH wire blob is given (the blob names the key type), or None."""
        return self._by_blob.get(bytes(blob))


class KeyStore:
    """Interface of a key store. Implementations raise KeyStoreError for anything the operator must fix."""

    def add(self, account, name, key_name, pubkey_text):
        raise NotImplementedError

    def list(self):
        raise NotImplementedError

    def remove(self, fp):
        raise NotImplementedError

    def index(self):
        """A fresh KeyIndex of every stored key."""
        return KeyIndex(self.list())

    def close(self):
        pass


class SQLiteKeyStore(KeyStore):
    SCHEMA = """
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

    def __init__(self, path, busy_timeout=BUSY_TIMEOUT):
        self.path = path
        self.busy_timeout = busy_timeout
        # mode=rw: a per-call connection never creates the file (a deleted keys.db is an error, not a new 0644 one)
        self._uri = "file:%s?mode=rw" % urllib.parse.quote(os.path.abspath(path))

        def create():
            try:
                folder = os.path.dirname(path)
                if folder:
                    ensure_private_dir(folder)
                _create_private_file(path)
            except OSError as e:
                raise KeyStoreError("cannot open key store %s: %s" % (path, e)) from None
            self._with_connection("open", lambda conn: conn.executescript(self.SCHEMA), off_loop=False)

        _off_loop(create)

    def _with_connection(self, action, work, off_loop=True):
        """work(conn) on a connection of its own, opened, used and closed in one thread (off the loop unless told);
        sqlite3 errors become KeyStoreError "cannot <action> key store"."""
        def call():
            try:
                conn = sqlite3.connect(self._uri, uri=True, timeout=self.busy_timeout, isolation_level=None)
            except sqlite3.Error as e:
                raise KeyStoreError("cannot open key store %s: %s" % (self.path, e)) from None
            try:
                return work(conn)
            except sqlite3.Error as e:
                raise KeyStoreError("cannot %s key store %s: %s" % (action, self.path, e)) from None
            finally:
                conn.close()   # also rolls back a transaction that work() did not commit

        return _off_loop(call) if off_loop else call()

    def add(self, account, name, key_name, pubkey_text):
        check_account(account)
        check_label(name, "name")
        check_label(key_name, "key name")
        key_type, blob = parse_public_key(pubkey_text)
        fp = fingerprint(blob)

        def insert(conn):
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute(
                    "INSERT INTO keys (fingerprint, account, name, key_name, key_type, key_blob, added)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)", (fp, account, name, key_name, key_type, blob, time.time()))
            except sqlite3.IntegrityError:
                raise DuplicateKeyError("key %s is already stored" % fp) from None
            conn.execute("COMMIT")

        self._with_connection("write", insert)
        return fp

    SELECT = ("SELECT fingerprint, account, name, key_name, key_type, key_blob, added FROM keys"
              " ORDER BY account, name, key_name, fingerprint")

    def list(self):
        return self._with_connection("read", lambda conn: [KeyRecord(*row) for row in conn.execute(self.SELECT)])

    def index(self):
        # built in the worker too: a large store's dict is made without holding up the loop
        return self._with_connection("read", lambda conn: KeyIndex(KeyRecord(*r) for r in conn.execute(self.SELECT)))

    def remove(self, fp):
        def delete(conn):
            conn.execute("BEGIN IMMEDIATE")
            count = conn.execute("DELETE FROM keys WHERE fingerprint = ?", (fp,)).rowcount
            conn.execute("COMMIT")
            return count

        if self._with_connection("write", delete) != 1:
            raise KeyStoreError("no key with fingerprint %s" % fp)

    def close(self):
        """Nothing to release (connections are per call); kept for the KeyStore interface, safe to repeat."""
