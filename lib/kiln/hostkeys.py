"""Host keys: load the configured ones; generate ed25519 and RSA 3072 keys (mode 0600, new folders 0700) on first
start."""
import logging
import os

from .errors import ConfigError
from .keystore import ensure_private_dir, fingerprint

log = logging.getLogger("kiln.hostkeys")


def generate(path, kind):
    """Write a new unencrypted OpenSSH private key (0600) and its .pub; kind is 'ed25519' or 'rsa'."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ed25519, rsa

    if kind == "ed25519":
        key = ed25519.Ed25519PrivateKey.generate()
    else:
        key = rsa.generate_private_key(public_exponent=65537, key_size=3072)
    private = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    ensure_private_dir(os.path.dirname(path) or ".")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)   # O_EXCL: no symlink follow
    with os.fdopen(fd, "wb") as f:
        f.write(private)
    with open(path + ".pub", "wb") as f:
        f.write(public + b" kilnproxy\n")


def _kind_for(path):
    return "rsa" if "rsa" in os.path.basename(path) else "ed25519"


def load(paths, generate_missing):
    """Return paramiko keys for the given files, generating absent defaults when generate_missing."""
    import paramiko

    keys = []
    for path in paths:
        if generate_missing and not os.path.exists(path):
            kind = _kind_for(path)
            try:
                generate(path, kind)
            except OSError as e:
                raise ConfigError("cannot create host key %s: %s" % (path, e.strerror)) from None
            log.info("generated %s host key %s", kind, path)
        try:
            key = paramiko.PKey.from_path(path)
        except FileNotFoundError:
            raise ConfigError("host key not found: %s" % path) from None
        except (OSError, paramiko.SSHException, ValueError) as e:
            raise ConfigError("cannot load host key %s: %s" % (path, e)) from None
        log.info("host key %s %s %s", key.get_name(), fingerprint(key.asbytes()), path)
        keys.append(key)
    return keys
