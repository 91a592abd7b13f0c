"""Command line: argument parsing and the `keys`, `accounts` and `version` commands. `serve` is wired in kilnproxy.py.

Every operator error (bad arguments, bad config, malformed or duplicate key, unknown backend, a store schema newer
than the code) is one line on stderr and exit status 2; a key store that cannot be reached (cannot be opened, locked,
corrupt) is one line and exit status 1.
"""
import argparse
import json
import os
import sys

from . import config as config_mod
from . import version as version_mod
from . import keystore as keystore_mod
from .errors import ConfigError, KeyStoreError, KeyStoreUnavailable
from .keystore import DEFAULT_BACKEND, check_account, check_backend_name, check_label, parse_public_key

EXIT_UNAVAILABLE = 1
EXIT_USAGE = 2
MAX_PUBKEY_BYTES = 65536


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise ConfigError("%s: %s" % (self.prog, message))


def build_parser():
    p = _Parser(prog="kilnproxy.py", description="KilnProxy: SSH reverse proxy for Git and Mercurial hosting")
    sub = p.add_subparsers(dest="command", parser_class=_Parser)
    serve = sub.add_parser("serve", help="run the proxy in the foreground")
    serve.add_argument("--config", help="TOML config file (default ./kilnproxy.toml if present)")
    keys = sub.add_parser("keys", help="manage the key store")
    ksub = keys.add_subparsers(dest="keys_command", parser_class=_Parser)
    add = ksub.add_parser("add", help="add a public key")
    add.add_argument("--config")
    add.add_argument("--account", required=True)
    add.add_argument("--name", required=True, help="the user's full name")
    add.add_argument("--key-name", required=True, help="a label for this key, e.g. Laptop")
    add.add_argument("pubkey_file", help="OpenSSH public key file, or - for stdin")
    lst = ksub.add_parser("list", help="list keys")
    lst.add_argument("--config")
    lst.add_argument("--json", action="store_true")
    rm = ksub.add_parser("remove", help="remove a key by fingerprint")
    rm.add_argument("--config")
    rm.add_argument("fingerprint")
    accounts = sub.add_parser("accounts", help="accounts and the backends they are routed to")
    asub = accounts.add_subparsers(dest="accounts_command", parser_class=_Parser)
    route = asub.add_parser("route", help="route an account's sessions to a backend (default: [backend])")
    route.add_argument("--config")
    route.add_argument("--account", required=True)
    route.add_argument("--backend", required=True, help="a [backends.NAME] of the config, or default")
    alst = asub.add_parser("list", help="list accounts with keys or a route")
    alst.add_argument("--config")
    alst.add_argument("--json", action="store_true")
    ver = sub.add_parser("version", help="print the version")
    ver.add_argument("--stamp", action="store_true", help="build step: compute the version from git and store it")
    return p


def parse_args(argv):
    args = build_parser().parse_args(argv)
    if args.command is None:
        args = build_parser().parse_args(["serve"])
    if args.command == "keys" and args.keys_command is None:
        raise ConfigError("kilnproxy.py keys: expected add, list or remove")
    if args.command == "accounts" and args.accounts_command is None:
        raise ConfigError("kilnproxy.py accounts: expected route or list")
    return args


def exit_status(error):
    """The exit status for an error a command ended with: 1 when the store could not be reached, else 2."""
    return EXIT_UNAVAILABLE if isinstance(error, KeyStoreUnavailable) else EXIT_USAGE


def backend_names(cfg):
    """The backend names this config knows: "default" ([backend]) and every [backends.NAME]."""
    return {DEFAULT_BACKEND} | set(getattr(cfg, "backends", {}))


def default_config_path(args):
    if getattr(args, "config", None):
        return args.config
    return "kilnproxy.toml" if os.path.exists("kilnproxy.toml") else None


def _read_pubkey(path, stdin=None):
    """The text of a public key file (`-`: stdin), read as bytes so that any encoding problem is one clear error."""
    what = "standard input" if path == "-" else path
    try:
        if path == "-":
            stdin = stdin if stdin is not None else sys.stdin
            data = getattr(stdin, "buffer", stdin).read(MAX_PUBKEY_BYTES + 1)
        else:
            with open(path, "rb") as f:
                data = f.read(MAX_PUBKEY_BYTES + 1)
    except OSError as e:
        raise KeyStoreError("cannot read %s: %s" % (path, e.strerror)) from None
    if isinstance(data, str):
        return data
    if len(data) > MAX_PUBKEY_BYTES:
        raise KeyStoreError("%s is too large for a public key" % what)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        raise KeyStoreError("%s is not a text public key" % what) from None


def run_keys(args, out=sys.stdout):
    cfg = config_mod.load(default_config_path(args))
    if args.keys_command == "add":
        # Check everything before the store is opened: a rejected key must not create the state folder or database.
        check_account(args.account)
        check_label(args.name, "name")
        check_label(args.key_name, "key name")
        pubkey_text = _read_pubkey(args.pubkey_file)
        parse_public_key(pubkey_text)
    # Listing or removing must not create an empty key store either.
    store = keystore_mod.create(cfg, create_missing=args.keys_command == "add")
    if store is None:
        if args.keys_command == "remove":
            raise KeyStoreError("no key with fingerprint %s" % args.fingerprint)
        if args.json:
            out.write("[]\n")
        return 0
    try:
        if args.keys_command == "add":
            fp = store.add(args.account, args.name, args.key_name, pubkey_text)
            print(fp, file=out)
        elif args.keys_command == "list":
            records = store.list()
            if args.json:
                json.dump([{"fingerprint": r.fingerprint, "account": r.account, "name": r.name,
                            "key_name": r.key_name} for r in records], out, indent=2)
                out.write("\n")
            else:
                for r in records:
                    print("%s\t%s\t%s\t%s\t%s" % (r.fingerprint, r.key_type, r.account, r.name, r.key_name), file=out)
        elif args.keys_command == "remove":
            store.remove(args.fingerprint)
            print("removed %s" % args.fingerprint, file=out)
    finally:
        store.close()
    return 0


def run_accounts(args, out=sys.stdout):
    cfg = config_mod.load(default_config_path(args))
    if args.accounts_command == "route":
        # Checked before the store is opened: a refused route writes nothing, not even a new store.
        check_account(args.account)
        check_backend_name(args.backend)
        known = backend_names(cfg)
        if args.backend not in known:
            raise ConfigError("unknown backend %r: this config has %s" % (args.backend, ", ".join(sorted(known))))
    # Listing, or resetting a route to default, must not create an empty key store.
    store = keystore_mod.create(cfg, create_missing=args.accounts_command == "route"
                                and args.backend != DEFAULT_BACKEND)
    if store is None:
        if args.accounts_command == "route":
            print("%s -> %s" % (args.account, args.backend), file=out)
        elif args.json:
            out.write("[]\n")
        return 0
    try:
        if args.accounts_command == "route":
            store.set_route(args.account, args.backend)
            print("%s -> %s" % (args.account, args.backend), file=out)
        else:
            records = store.accounts()
            if args.json:
                json.dump([{"account": r.account, "backend": r.backend, "keys": r.keys} for r in records], out,
                          indent=2)
                out.write("\n")
            else:
                for r in records:
                    print("%s\t%s\t%d" % (r.account, r.backend, r.keys), file=out)
    finally:
        store.close()
    return 0


def run_version(args, out=sys.stdout):
    if args.stamp:
        v = version_mod.from_git(version_mod.project_root())
        if v is None:
            raise ConfigError("version --stamp: not a git checkout")
        version_mod.write_stamp(v)
    print(version_mod.current(), file=out)
    return 0
