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


# ---------------------------------------------------------------------------------------------------------------
# OpenSSH certificates (security review, finding 9): refused, never taken as the plain key inside them


def _keygen(*args, timeout=60):
    import subprocess
    subprocess.run(["ssh-keygen", "-q"] + list(args), check=True, capture_output=True, timeout=timeout,
                   stdin=subprocess.DEVNULL)


@pytest.fixture(scope="module")
def ca(tmp_path_factory):
    d = tmp_path_factory.mktemp("ca")
    _keygen("-N", "", "-t", "ed25519", "-f", str(d / "ca"))
    return str(d / "ca")


@pytest.fixture(scope="module")
def user_keys(tmp_path_factory):
    d = tmp_path_factory.mktemp("users")
    for kind in ("ed25519", "ecdsa", "rsa"):
        _keygen("-N", "", "-t", kind, "-f", str(d / kind))
    return {kind: str(d / kind) for kind in ("ed25519", "ecdsa", "rsa")}


def _pub(path):
    import base64
    with open(path) as f:
        kind, b64 = f.read().split()[:2]
    return kind, base64.b64decode(b64)


def _as_the_server_sees_it(algorithm, blob):
    """What paramiko's server-side auth handler builds from a userauth request (_generate_key_from_request)."""
    return paramiko.Transport._key_info[algorithm](paramiko.Message(blob))


CERT_CASES = {
    "valid for git": ["-n", "git"],
    "wrong principal": ["-n", "root"],
    "expired": ["-n", "git", "-V", "20000101:20000102"],
}


@pytest.mark.parametrize("kind, algorithm", [
    ("ed25519", "ssh-ed25519-cert-v01@openssh.com"),
    ("ecdsa", "ecdsa-sha2-nistp256-cert-v01@openssh.com"),
    ("rsa", "rsa-sha2-512-cert-v01@openssh.com"),
])
@pytest.mark.parametrize("case", sorted(CERT_CASES))
def test_certificates_are_refused(tmp_path, ca, user_keys, kind, algorithm, case):
    import shutil
    user = str(tmp_path / "user")
    shutil.copyfile(user_keys[kind] + ".pub", user + ".pub")
    _keygen("-s", ca, "-I", "peter@initech", *CERT_CASES[case], user + ".pub")
    plain_type, plain_blob = _pub(user + ".pub")
    cert_type, cert_blob = _pub(user + "-cert.pub")
    assert cert_type.endswith("-cert-v01@openssh.com")
    fp = keystore.fingerprint(plain_blob)
    index = keystore.KeyIndex([keystore.KeyRecord(fp, "initech", "Peter", "Laptop", plain_type, plain_blob, 0)])

    cert_key = _as_the_server_sees_it(algorithm, cert_blob)
    assert cert_key.asbytes() == plain_blob     # why a lookup by asbytes() alone took the certificate for the key
    failures = []
    policy = ConnectionPolicy(index, on_auth_failure=lambda: failures.append(1))
    assert policy.check_auth_publickey("git", cert_key) == paramiko.AUTH_FAILED
    assert policy.candidate is None and policy.identity(FakeTransport(True)) is None
    assert policy.auth_failures == 1 and failures == [1]
    assert policy.refused_certificate == "%s %s" % (cert_type, fp)
    assert "peter@initech" not in policy.refused_certificate     # the client-chosen key id is not repeated

    # the same key offered plainly still logs in
    plain_key = _as_the_server_sees_it(plain_type if kind != "rsa" else "rsa-sha2-512", plain_blob)
    assert policy.check_auth_publickey("git", plain_key) == paramiko.AUTH_SUCCESSFUL
    assert policy.identity(FakeTransport(True)).account == "initech"


def test_plain_keys_record_no_refused_certificate(keys):
    a, _, unknown, index = keys
    policy = ConnectionPolicy(index)
    policy.check_auth_publickey("git", unknown)
    policy.check_auth_publickey("git", a)
    assert policy.refused_certificate is None
