"""ConnectionPolicy: the paramiko ServerInterface decisions, without sockets."""
import os
import sys

import paramiko
import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "lib"))

from kiln import keystore  # noqa: E402
from kiln.errors import CommandRejected  # noqa: E402
from kiln.policy import ConnectionPolicy  # noqa: E402


class FakeTransport:
    def __init__(self, authenticated):
        self.authenticated = authenticated

    def is_authenticated(self):
        return self.authenticated


def _key():
    from cryptography.hazmat.primitives.asymmetric import ed25519
    from cryptography.hazmat.primitives import serialization
    pub = ed25519.Ed25519PrivateKey.generate().public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH).decode()
    kind, b64 = pub.split()[:2]
    return paramiko.PKey.from_type_string(kind, __import__("base64").b64decode(b64))


@pytest.fixture
def keys():
    a, b, unknown = _key(), _key(), _key()
    records = [keystore.KeyRecord(keystore.fingerprint(k.asbytes()), acct, name, kn, k.get_name(), k.asbytes(), 0)
               for k, acct, name, kn in ((a, "initech", "Peter", "Laptop"), (b, "umbrella", "Albert", "Desk"))]
    return a, b, unknown, keystore.KeyIndex(records)


def test_identity_is_the_last_key_checked_once_authenticated(keys):
    a, b, _, index = keys
    policy = ConnectionPolicy(index)
    # paramiko asks about A (unsigned query), then B is signed and verified: the identity must be B's
    assert policy.check_auth_publickey("git", a) == paramiko.AUTH_SUCCESSFUL
    assert policy.check_auth_publickey("git", b) == paramiko.AUTH_SUCCESSFUL
    assert policy.identity(FakeTransport(True)).account == "umbrella"


def test_no_identity_before_authentication(keys):
    a, _, _, index = keys
    policy = ConnectionPolicy(index)
    policy.check_auth_publickey("git", a)
    assert policy.identity(FakeTransport(False)) is None
    assert policy.identity(None) is None


def test_unknown_key_fails_and_counts(keys):
    _, _, unknown, index = keys
    failures = []
    policy = ConnectionPolicy(index, on_auth_failure=lambda: failures.append(1))
    assert policy.check_auth_publickey("git", unknown) == paramiko.AUTH_FAILED
    assert policy.check_auth_password("git", "hunter2") == paramiko.AUTH_FAILED
    assert policy.auth_failures == 2 and len(failures) == 2
    assert policy.check_auth_none("git") == paramiko.AUTH_FAILED
    assert policy.get_allowed_auths("git") == "publickey"


def test_one_session_channel_one_exec(keys):
    policy = ConnectionPolicy(keys[3])
    assert policy.check_channel_request("session", 0) == paramiko.OPEN_SUCCEEDED
    assert policy.check_channel_request("session", 1) == paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
    assert policy.check_channel_request("direct-tcpip", 2) == paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
    assert policy.check_channel_exec_request(None, b"git-upload-pack 'initech/x.git'") is True
    assert policy.decided.is_set()
    assert policy.check_channel_exec_request(None, b"git-upload-pack 'initech/y.git'") is False
    assert policy.parsed_command("initech").repo == "initech/x.git"


def test_refusals(keys):
    policy = ConnectionPolicy(keys[3])
    assert policy.check_channel_pty_request(None, b"xterm", 80, 24, 0, 0, b"") is False
    assert policy.check_channel_x11_request(None, False, "MIT", "c", 0) is False
    assert policy.check_channel_forward_agent_request(None) is False
    assert policy.check_port_forward_request("127.0.0.1", 0) is False
    assert policy.check_global_request("tcpip-forward", None) is False
    assert policy.check_channel_shell_request(None) is False
    assert policy.decided.is_set()
    with pytest.raises(CommandRejected, match="interactive shells"):
        policy.parsed_command("initech")


def test_env_only_valid_git_protocol(keys):
    policy = ConnectionPolicy(keys[3])
    assert policy.check_channel_env_request(None, b"LD_PRELOAD", b"/tmp/x.so") is False
    assert policy.check_channel_env_request(None, b"GIT_PROTOCOL", b"version=2; rm -rf /") is False
    assert policy.git_protocol is None
    assert policy.check_channel_env_request(None, b"GIT_PROTOCOL", b"version=2") is True
    assert policy.git_protocol == "version=2"
