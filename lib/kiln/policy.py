"""The SSH server policy for one connection (paramiko ServerInterface).

Callbacks run on the Transport's greenlet and never block: they decide, record, and set `decided` for the
connection's handler to act on. The identity is bound only when authentication has completed: paramiko calls
check_auth_publickey for the unsigned query and again before verifying the signature, so the candidate identity is
read from `candidate` only once the transport reports authenticated, at which point the last candidate is the key
whose signature paramiko verified (after success paramiko ignores further auth requests).

OpenSSH certificates are refused: sshd matches a certificate only against a trusted CA (cert-authority), never against
a plain key entry, and we keep no CAs. paramiko's server parses a `*-cert-v01@openssh.com` blob into the plain key
class, returns the inner plain key from `asbytes()` and keeps the certificate as `key.public_blob`; looked up by
`asbytes()` an expired, wrongly-scoped or unknown-CA certificate would log in as the key inside it.
"""
import threading

import paramiko

from . import commands
from .errors import CommandRejected
from .keystore import fingerprint


CERT_SUFFIX = "-cert-v01@openssh.com"


def _is_certificate(key):
    # server side, a plain key has no public_blob: any attached blob means the client sent something else
    return getattr(key, "public_blob", None) is not None or CERT_SUFFIX in key.get_name()


def _certificate_type(key):
    blob = getattr(key, "public_blob", None)
    return blob.key_type if blob is not None else key.get_name()


class ConnectionPolicy(paramiko.ServerInterface):
    def __init__(self, key_index, on_auth_failure=None):
        self._key_index = key_index          # KeyIndex snapshot taken at accept
        self._on_auth_failure = on_auth_failure
        self.candidate = None                # Identity of the last key asked about
        self.username = None
        self.auth_failures = 0
        self.refused_certificate = None      # "<cert type> <fingerprint of the key inside>" of the last one refused
        self.channel = None                  # the one session channel
        self.exec_command = None             # raw bytes of the exec request
        self.refusal = None                  # text for the client when it asked for something we do not do
        self.git_protocol = None
        self.decided = threading.Event()     # exec received, or a refusal to report

    # -- authentication ---------------------------------------------------------------------------------------
    def get_allowed_auths(self, username):
        return "publickey"

    def check_auth_none(self, username):
        return paramiko.AUTH_FAILED

    def check_auth_password(self, username, password):
        self._failed()
        return paramiko.AUTH_FAILED

    def check_auth_interactive(self, username, submethods):
        return paramiko.AUTH_FAILED

    def check_auth_publickey(self, username, key):
        self.username = username
        if _is_certificate(key):
            self.candidate = None
            self.refused_certificate = "%s %s" % (_certificate_type(key), fingerprint(key.asbytes()))
            self._failed()
            return paramiko.AUTH_FAILED
        identity = self._key_index.lookup(key.asbytes())
        self.candidate = identity
        if identity is None:
            self._failed()
            return paramiko.AUTH_FAILED
        return paramiko.AUTH_SUCCESSFUL

    def _failed(self):
        self.auth_failures += 1
        if self._on_auth_failure is not None:
            self._on_auth_failure()

    def identity(self, transport):
        """The Identity bound to this connection, or None if authentication has not completed."""
        if transport is None or not transport.is_authenticated():
            return None
        return self.candidate

    # -- channels and requests ----------------------------------------------------------------------------------
    def check_channel_request(self, kind, chanid):
        if kind != "session" or self.channel is not None:
            return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED
        self.channel = chanid
        return paramiko.OPEN_SUCCEEDED

    def check_channel_exec_request(self, channel, command):
        if self.decided.is_set():
            return False
        self.exec_command = bytes(command)
        self.decided.set()
        return True

    def check_channel_shell_request(self, channel):
        return self._refuse("interactive shells are not provided; use git or hg")

    def check_channel_subsystem_request(self, channel, name):
        return self._refuse("subsystems are not provided; use git or hg")

    def _refuse(self, text):
        if not self.decided.is_set():
            self.refusal = text
            self.decided.set()
        return False

    def check_channel_env_request(self, channel, name, value):
        if name == b"GIT_PROTOCOL" or name == "GIT_PROTOCOL":
            value = commands.check_git_protocol(value)
            if value is not None:
                self.git_protocol = value
                return True
        return False

    def check_channel_pty_request(self, channel, term, width, height, pixelwidth, pixelheight, modes):
        return False

    def check_channel_x11_request(self, channel, single_connection, auth_protocol, auth_cookie, screen_number):
        return False

    def check_channel_forward_agent_request(self, channel):
        return False

    def check_channel_direct_tcpip_request(self, chanid, origin, destination):
        return paramiko.OPEN_FAILED_ADMINISTRATIVELY_PROHIBITED

    def check_port_forward_request(self, address, port):
        return False

    def check_global_request(self, kind, msg):
        return False

    def check_channel_window_change_request(self, channel, width, height, pixelwidth, pixelheight):
        return False

    # -- the decision -------------------------------------------------------------------------------------------
    def parsed_command(self, account):
        """Parse the exec request for the bound account (raises CommandRejected)."""
        if self.refusal is not None:
            raise CommandRejected(self.refusal)
        return commands.parse(self.exec_command, account)
