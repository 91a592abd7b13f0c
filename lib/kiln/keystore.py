"""The key store: public keys with the identity they stand for (account, full name, key name), and the backend each
account is routed to.

`KeyStore` is the small interface the rest of the proxy uses and `create(cfg)` picks the kind; `SQLiteKeyStore` is
today's (a PostgreSQL one can arrive beside it). The auth path never touches the database: it reads a `KeyIndex`, an
in-memory snapshot replaced atomically at start, on SIGHUP, and when the store's watcher sees a change (any writer:
the CLI, another instance, the sqlite3 shell). The schema is versioned and migrated forward when a store is opened.

SQLite work never runs on the event loop of a monkey-patched process (the proxy, and the CLI through kilnproxy.py):
it goes to gevent's native threadpool, where SQLite's busy wait for another process's lock (up to BUSY_TIMEOUT) blocks
a real thread with the GIL released while the hub keeps serving. Each call opens its own connection in that thread
(sqlite3's check_same_thread), so no connection is shared between threads; the watcher's one long-lived connection is
used by one check at a time. State files are private: folders this module creates are 0700, the database 0600 (SQLite
gives its -journal/-wal/-shm files the database's mode).
"""
import base64
import binascii
import hashlib
import logging
import os
import re
import sqlite3
import sys
import time
import types
import unicodedata
import urllib.parse
from collections import namedtuple

from .config import BACKEND_NAME_RE
from .errors import ConfigError, DuplicateKeyError, KeyStoreError, KeyStoreUnavailable, SchemaTooNewError

log = logging.getLogger("kiln.keystore")

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
POLL_INTERVAL = 0.5  # seconds between the watcher's checks for changes (changes must apply within 2 s)
MAX_BACKOFF = 4.0    # seconds between checks at most while the store cannot be read
ERROR_LOG_INTERVAL = 10.0   # at most one ERROR this often while the store cannot be read
DEFAULT_BACKEND = "default"
# Label characters refused: every Unicode "other" (Cc controls incl. C1; Cf format: bidi embeddings, overrides and
# isolates U+202A-U+202E and U+2066-U+2069, zero-width U+200B-U+200D and U+FEFF, soft hyphen; Cs lone surrogates,
# which undecodable argv bytes become; Co private use; Cn unassigned) and the line/paragraph separators Zl, Zp. They
# break `keys list` rows, logs and KILN_* env values, or make the dashboard show other text than what is stored.
REFUSED_LABEL_CATEGORIES = frozenset(("Cc", "Cf", "Cs", "Co", "Cn", "Zl", "Zp"))

Identity = namedtuple("Identity", "fingerprint account name key_name")
KeyRecord = namedtuple("KeyRecord", "fingerprint account name key_name key_type blob added")
AccountRecord = namedtuple("AccountRecord", "account backend keys")   # keys: how many


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
    """Immutable in-memory snapshot of the store: key blob -> Identity, and account -> backend name. The only thing
    the auth path and the router read; a reload makes a new one and swaps the reference."""

    def __init__(self, records=(), routes=None):
        self._by_blob = {bytes(r.blob): Identity(r.fingerprint, r.account, r.name, r.key_name) for r in records}
        self._routes = dict(routes or {})

    def __len__(self):
        return len(self._by_blob)

    def lookup(self, blob):
        """The Identity of the public key whose SSH wire blob is given (the blob names the key type), or None."""
        return self._by_blob.get(bytes(blob))

    def route(self, account):
        """The name of the backend the account's sessions go to: its route, else "default"."""
        return self._routes.get(account, DEFAULT_BACKEND)

    @property
    def routes(self):
        """account -> backend name for every routed account (read-only view)."""
        return types.MappingProxyType(self._routes)


def check_backend_name(name):
    """A backend name as routes store it: "default" or the NAME of a [backends.NAME] table (the config's rule)."""
    if not isinstance(name, str) or not BACKEND_NAME_RE.fullmatch(name):
        raise KeyStoreError("invalid backend name %r: 1-32 of A-Z a-z 0-9 _ -" % (name,))
    return name


def create(cfg, create_missing=True, **options):
    """The key store `cfg.keystore.kind` names. With create_missing=False, None when the store does not exist yet
    (for commands that only read or remove: they must not create it). options go to the store's constructor."""
    kind = getattr(cfg.keystore, "kind", "sqlite")
    if kind == "sqlite":
        if not create_missing and not os.path.exists(cfg.keystore.path):
            return None
        return SQLiteKeyStore(cfg.keystore.path, **options)
    if kind == "postgres":
        raise ConfigError('keystore.kind = "postgres" is not yet available in this version; use "sqlite"')
    raise ConfigError("keystore.kind: unknown kind %r" % (kind,))


class KeyStore:
    """Interface of a key store, and the change watching every kind shares.

    Implementations raise KeyStoreError for anything the operator must fix, KeyStoreUnavailable (a subclass) when the
    store cannot be reached at all. They provide add/list/remove, set_route/routes/accounts, index(), and
    `_check_for_change()` (a polling store) or their own `_watch_loop()` (a store that is told, such as PostgreSQL's
    LISTEN/NOTIFY), reporting through `_deliver`, `_failed` and `_recovered`.

    Watching: `watch(on_change)` registers a callback, `start_watching()` starts one greenlet that calls
    `on_change(index)` with a fresh KeyIndex soon after it starts (closing the gap since the caller's own `index()`),
    then after every change, and again once the store is readable after a failure. While the store fails, nothing is
    delivered (callers keep what they have), `up` is False and an ERROR is logged at most every ERROR_LOG_INTERVAL.
    """

    def __init__(self, clock=time.monotonic, poll_interval=POLL_INTERVAL):
        import gevent.lock

        self.poll_interval = poll_interval
        self._clock = clock              # monotonic seconds; injected by tests of the error rate limit
        self._listeners = []
        self._up = True
        self._last_error_log = None
        self._unlogged_errors = 0
        self._delivered = False
        self._watcher = None
        self._stopping = None
        # Held while an index is loaded and delivered, by the watcher and by refresh(): the last index delivered is
        # always the last one loaded, whichever of them loaded it.
        self._delivery = gevent.lock.Semaphore()

    # -- keys and accounts (each kind implements these) ----------------------------------------------------------
    def add(self, account, name, key_name, pubkey_text):
        raise NotImplementedError

    def list(self):
        raise NotImplementedError

    def remove(self, fp):
        raise NotImplementedError

    def set_route(self, account, backend):
        """Route the account's sessions to the backend named; "default" removes its route."""
        raise NotImplementedError

    def routes(self):
        """{account: backend name} for every routed account."""
        raise NotImplementedError

    def accounts(self):
        """AccountRecord(account, backend, keys) for every account with keys or a route, by account."""
        raise NotImplementedError

    def index(self):
        """A fresh KeyIndex of every stored key and route (one consistent snapshot)."""
        return KeyIndex(self.list(), self.routes())

    # -- change watching -----------------------------------------------------------------------------------------
    @property
    def up(self):
        """False while the store cannot be read (the last check failed); True once it can again."""
        return self._up

    def watch(self, on_change):
        """Call on_change(index) from the watcher greenlet with every new KeyIndex (see the class docstring)."""
        self._listeners.append(on_change)

    def start_watching(self):
        import gevent
        import gevent.event

        if self._watcher is None:
            self._stopping = gevent.event.Event()
            self._watcher = gevent.spawn(self._watch_loop)

    def stop(self, timeout=None):
        """Stop the watcher (safe to repeat). It finishes a check under way first (bounded by the store's own
        timeouts; `timeout` seconds at most, then it is killed). False when it had to be killed."""
        watcher, self._watcher = self._watcher, None
        if watcher is None:
            return True
        self._stopping.set()
        watcher.join(timeout if timeout is not None else self.stop_timeout)
        if watcher.dead:
            return True
        watcher.kill()
        return False

    stop_timeout = BUSY_TIMEOUT + 2.0

    def refresh(self):
        """Load a fresh index now and deliver it to the watchers too (SIGHUP); returns it. Raises KeyStoreError
        (and marks the store down) when it cannot be read."""
        with self._delivery:
            try:
                index = self.index()
            except KeyStoreError:
                self._up = False
                raise
            self._recovered()
            self._deliver(index)
        return index

    def poll_once(self):
        """One check for changes: deliver a new index when something changed. True when the store was readable."""
        with self._delivery:
            try:
                index = self._check_for_change()
            except KeyStoreError as e:
                self._failed(e)
                return False
            self._recovered()
            if index is not None:
                self._deliver(index)
        return True

    def close(self):
        """Stop watching and release what checks keep open. Safe to repeat."""
        if self.stop():
            with self._delivery:    # not while someone's poll_once() is under way
                self._release_watch()
        # else a killed watcher's check may still run in a worker thread: what it holds is left to the GC

    # -- for implementations -------------------------------------------------------------------------------------
    def _check_for_change(self):
        """A new KeyIndex when the store changed since the last call (always on the first), else None."""
        raise NotImplementedError

    def _release_watch(self):
        """Free what _check_for_change keeps between calls (called from the watcher when it stops cleanly)."""

    def _watch_loop(self):
        """Poll every poll_interval; after a failure back off (doubling, up to MAX_BACKOFF) until readable again."""
        delay = 0.0
        while not self._stopping.wait(delay):
            try:
                ok = self.poll_once()
            except Exception:   # the watcher's one boundary: a bug here or in a listener must not end the watching
                log.exception("key store watcher: internal error")
                ok = False
            delay = self.poll_interval if ok else min(max(delay, self.poll_interval) * 2, MAX_BACKOFF)
        # Only on a clean exit: when killed mid-check, a worker thread may still be using what this releases.
        with self._delivery:
            self._release_watch()

    def _deliver(self, index):
        log.info("key store %s: %d keys, %d routes", "changed" if self._delivered else "loaded", len(index),
                 len(index.routes))
        self._delivered = True
        for on_change in list(self._listeners):
            on_change(index)

    def _failed(self, error):
        self._up = False
        now = self._clock()
        if self._last_error_log is not None and now - self._last_error_log < ERROR_LOG_INTERVAL:
            self._unlogged_errors += 1
            return
        more = (" (%d more failed checks since the last message)" % self._unlogged_errors
                if self._unlogged_errors else "")
        log.error("key store unavailable, serving with what was loaded before: %s%s", error, more)
        self._last_error_log = now
        self._unlogged_errors = 0

    def _recovered(self):
        if not self._up:
            self._up = True
            log.info("key store readable again")


# The schema, step by step: MIGRATIONS[n] takes a store from version n-1 to n. Version 1 is wave 1's keys table
# (which had no version table: a store with `keys` and no `schema_version` is version 1); 0 is an empty file.
MIGRATIONS = {
    1: (
        """CREATE TABLE keys (
            fingerprint TEXT PRIMARY KEY,
            account     TEXT NOT NULL,
            name        TEXT NOT NULL,
            key_name    TEXT NOT NULL,
            key_type    TEXT NOT NULL,
            key_blob    BLOB NOT NULL,
            added       REAL NOT NULL
        )""",
        "CREATE INDEX keys_account ON keys(account)",
    ),
    2: (
        "CREATE TABLE schema_version (id INTEGER PRIMARY KEY CHECK (id = 1), version INTEGER NOT NULL)",
        "CREATE TABLE routes (account TEXT PRIMARY KEY, backend TEXT NOT NULL, changed REAL NOT NULL)",
    ),
}
SCHEMA_VERSION = max(MIGRATIONS)


class SQLiteKeyStore(KeyStore):
    """The store in one SQLite file. Changes by any writer (this process, the CLI, the sqlite3 shell) are seen by
    polling `PRAGMA data_version` on one long-lived connection: it changes when another connection commits, costs a
    shared lock and a header read, and is the only thing read while nothing changes."""

    def __init__(self, path, busy_timeout=BUSY_TIMEOUT, clock=time.monotonic, poll_interval=POLL_INTERVAL):
        super().__init__(clock=clock, poll_interval=poll_interval)
        self.path = path
        self.busy_timeout = busy_timeout
        self.stop_timeout = busy_timeout + 2.0
        # mode=rw: a per-call connection never creates the file (a deleted keys.db is an error, not a new 0644 one)
        self._uri = "file:%s?mode=rw" % urllib.parse.quote(os.path.abspath(path))
        # The watcher's connection, kept between polls (used by one check at a time, from pool threads in turn)
        self._wconn = self._wident = self._wversion = None

        def create():
            try:
                folder = os.path.dirname(path)
                if folder:
                    ensure_private_dir(folder)
                _create_private_file(path)
            except OSError as e:
                raise KeyStoreUnavailable("cannot open key store %s: %s" % (path, e.strerror or e)) from None
            self._with_connection("open", self._prepare, off_loop=False)

        _off_loop(create)

    def _connect(self, check_same_thread=True):
        try:
            return sqlite3.connect(self._uri, uri=True, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=check_same_thread)
        except sqlite3.Error as e:
            raise KeyStoreUnavailable("cannot open key store %s: %s" % (self.path, e)) from None

    def _with_connection(self, action, work, off_loop=True):
        """work(conn) on a connection of its own, opened, used and closed in one thread (off the loop unless told);
        sqlite3 errors become KeyStoreUnavailable "cannot <action> key store"."""
        def call():
            conn = self._connect()
            try:
                return work(conn)
            except sqlite3.Error as e:
                raise KeyStoreUnavailable("cannot %s key store %s: %s" % (action, self.path, e)) from None
            finally:
                conn.close()   # also rolls back a transaction that work() did not commit

        return _off_loop(call) if off_loop else call()

    # -- schema --------------------------------------------------------------------------------------------------
    def _schema_version(self, conn):
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        if "schema_version" in tables:
            row = conn.execute("SELECT max(version) FROM schema_version").fetchone()
            if row[0] is None:
                raise KeyStoreUnavailable("cannot open key store %s: its schema_version table is empty" % self.path)
            return row[0]
        return 1 if "keys" in tables else 0

    def _refuse_newer(self, version):
        if version > SCHEMA_VERSION:
            raise SchemaTooNewError("key store %s has schema version %d, newer than this KilnProxy knows (%d): "
                                    "upgrade KilnProxy" % (self.path, version, SCHEMA_VERSION))

    def _prepare(self, conn):
        """Create the schema, or migrate an older one forward, in one transaction; refuse a newer one."""
        version = self._schema_version(conn)
        if version == SCHEMA_VERSION:
            return
        self._refuse_newer(version)
        # BEGIN IMMEDIATE takes the write lock: of two processes migrating at once, the second waits here (busy
        # timeout), then finds the work done when it reads the version again.
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = self._schema_version(conn)
            self._refuse_newer(version)
            for step in range(version + 1, SCHEMA_VERSION + 1):
                for statement in MIGRATIONS[step]:
                    conn.execute(statement)
            if version < SCHEMA_VERSION:
                conn.execute("INSERT OR REPLACE INTO schema_version (id, version) VALUES (1, ?)", (SCHEMA_VERSION,))
                log.info("key store %s: schema migrated from version %d to %d", self.path, version, SCHEMA_VERSION)
            conn.execute("COMMIT")
        except (sqlite3.Error, KeyStoreError):
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise

    # -- keys ----------------------------------------------------------------------------------------------------
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

    def remove(self, fp):
        def delete(conn):
            conn.execute("BEGIN IMMEDIATE")
            count = conn.execute("DELETE FROM keys WHERE fingerprint = ?", (fp,)).rowcount
            conn.execute("COMMIT")
            return count

        if self._with_connection("write", delete) != 1:
            raise KeyStoreError("no key with fingerprint %s" % fp)

    # -- accounts ------------------------------------------------------------------------------------------------
    def set_route(self, account, backend):
        check_account(account)
        check_backend_name(backend)

        def write(conn):
            conn.execute("BEGIN IMMEDIATE")
            if backend == DEFAULT_BACKEND:
                conn.execute("DELETE FROM routes WHERE account = ?", (account,))
            else:
                conn.execute("INSERT OR REPLACE INTO routes (account, backend, changed) VALUES (?, ?, ?)",
                             (account, backend, time.time()))
            conn.execute("COMMIT")

        self._with_connection("write", write)

    def routes(self):
        return self._with_connection("read", lambda conn: dict(conn.execute("SELECT account, backend FROM routes")))

    ACCOUNTS = ("SELECT a.account, coalesce(r.backend, ?), (SELECT count(*) FROM keys k WHERE k.account = a.account)"
                " FROM (SELECT account FROM keys UNION SELECT account FROM routes) a"
                " LEFT JOIN routes r ON r.account = a.account ORDER BY a.account")

    def accounts(self):
        return self._with_connection("read", lambda conn: [AccountRecord(*row)
                                                           for row in conn.execute(self.ACCOUNTS, (DEFAULT_BACKEND,))])

    def _read_index(self, conn):
        conn.execute("BEGIN")   # one read transaction: keys and routes from the same state of the store
        index = KeyIndex((KeyRecord(*r) for r in conn.execute(self.SELECT)),
                         conn.execute("SELECT account, backend FROM routes"))
        conn.execute("COMMIT")
        return index

    def index(self):
        # built in the worker too: a large store's dict is made without holding up the loop
        return self._with_connection("read", self._read_index)

    # -- change watching -----------------------------------------------------------------------------------------
    def _check_for_change(self):
        def check():
            try:
                st = os.stat(self.path)
            except OSError as e:
                self._drop_watch_connection()
                raise KeyStoreUnavailable("cannot open key store %s: %s" % (self.path, e.strerror or e)) from None
            if self._wconn is not None and self._wident != (st.st_dev, st.st_ino):
                self._drop_watch_connection()   # another file at the path (restored, moved in place): follow it
            try:
                if self._wconn is None:
                    self._wconn = self._connect(check_same_thread=False)
                    self._wident, self._wversion = (st.st_dev, st.st_ino), None
                    self._prepare(self._wconn)
                version = self._wconn.execute("PRAGMA data_version").fetchone()[0]
                if version == self._wversion:
                    return None
                index = self._read_index(self._wconn)
                self._wversion = version     # read before the index: a commit in between is seen next time
                return index
            except sqlite3.Error as e:
                self._drop_watch_connection()
                raise KeyStoreUnavailable("cannot read key store %s: %s" % (self.path, e)) from None
            except KeyStoreError:
                self._drop_watch_connection()
                raise

        return _off_loop(check)

    def _drop_watch_connection(self):
        conn, self._wconn, self._wversion = self._wconn, None, None
        if conn is not None:
            conn.close()

    def _release_watch(self):
        _off_loop(self._drop_watch_connection)
