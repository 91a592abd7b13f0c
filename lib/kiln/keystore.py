"""The key store: public keys with the identity they stand for (account, full name, key name).

`KeyStore` is the small interface the rest of the proxy uses; `SQLiteKeyStore` is today's module (a PostgreSQL one
can arrive beside it). The auth path never touches the database: it reads a `KeyIndex`, an in-memory snapshot that
`reload()` replaces atomically (at start and on SIGHUP).
"""
import base64
import binascii
import hashlib
import os
import re
import sqlite3
import time
import unicodedata
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
    # Control characters (C0, DEL, C1) and line separators would break `keys list` rows, logs and KILN_* env values.
    if (not isinstance(value, str) or not value.strip() or len(value) > 200
            or any(unicodedata.category(c) in ("Cc", "Zl", "Zp") for c in value)):
        raise KeyStoreError("invalid %s %r: 1-200 printable characters" % (what, value))
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

    def __init__(self, path):
        self.path = path
        self._conn = None
        folder = os.path.dirname(path)
        try:
            if folder:
                os.makedirs(folder, exist_ok=True)
            self._conn = sqlite3.connect(path, timeout=5, isolation_level=None)
            self._conn.executescript(self.SCHEMA)
        except (OSError, sqlite3.Error) as e:
            self.close()
            raise KeyStoreError("cannot open key store %s: %s" % (path, e)) from None

    def add(self, account, name, key_name, pubkey_text):
        check_account(account)
        check_label(name, "name")
        check_label(key_name, "key name")
        key_type, blob = parse_public_key(pubkey_text)
        fp = fingerprint(blob)
        try:
            with self._transaction():
                self._conn.execute(
                    "INSERT INTO keys (fingerprint, account, name, key_name, key_type, key_blob, added)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)", (fp, account, name, key_name, key_type, blob, time.time()))
        except sqlite3.IntegrityError:
            raise DuplicateKeyError("key %s is already stored" % fp) from None
        except sqlite3.Error as e:
            raise KeyStoreError("cannot write key store %s: %s" % (self.path, e)) from None
        return fp

    def list(self):
        try:
            rows = self._conn.execute(
                "SELECT fingerprint, account, name, key_name, key_type, key_blob, added FROM keys"
                " ORDER BY account, name, key_name, fingerprint").fetchall()
        except sqlite3.Error as e:
            raise KeyStoreError("cannot read key store %s: %s" % (self.path, e)) from None
        return [KeyRecord(*row) for row in rows]

    def remove(self, fp):
        try:
            with self._transaction():
                cur = self._conn.execute("DELETE FROM keys WHERE fingerprint = ?", (fp,))
        except sqlite3.Error as e:
            raise KeyStoreError("cannot write key store %s: %s" % (self.path, e)) from None
        if cur.rowcount != 1:
            raise KeyStoreError("no key with fingerprint %s" % fp)

    def _transaction(self):
        conn = self._conn

        class _Tx:
            def __enter__(self):
                conn.execute("BEGIN IMMEDIATE")

            def __exit__(self, exc_type, exc, tb):
                conn.execute("ROLLBACK" if exc_type else "COMMIT")
                return False

        return _Tx()

    def close(self):
        conn, self._conn = getattr(self, "_conn", None), None
        if conn is not None:
            conn.close()
