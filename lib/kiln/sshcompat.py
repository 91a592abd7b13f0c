"""The few places where KilnProxy needs more of SSH than paramiko's public API offers.

paramiko's Channel can send `exit-status` but not `exit-signal`, and on the client side it drops an incoming
`exit-signal` (a backend command killed by a signal would look like "no status"). Both are RFC 4254 section 6.10
channel requests; this module builds and reads them with paramiko's own Message type, and is the only module that
touches paramiko internals (`Channel.remote_chanid`, `Transport._send_user_message`,
`Transport._channel_handler_table`, `Transport._active_check_timeout`). Tested in tests/test_sshcompat.py against real paramiko transports.
"""
import paramiko
from paramiko.common import MSG_CHANNEL_REQUEST, cMSG_CHANNEL_REQUEST

# What a paramiko transport, channel or their socket raises when the peer or the connection goes away.
SSH_ERRORS = (paramiko.SSHException, EOFError, OSError)


def close_quietly(obj):
    """Close a socket, transport, channel or process handle that may be None or already broken (idempotent)."""
    if obj is not None:
        try:
            obj.close()
        except SSH_ERRORS:
            pass


# The algorithms KilnProxy negotiates, both sides: AES-GCM first (fastest here), no CBC, no 3DES, no SHA-1 or MD5 MACs.
CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com", "aes128-ctr", "aes192-ctr", "aes256-ctr")
# Toward clients the *client's* order decides, and OpenSSH lists aes*-ctr before aes*-gcm: offering CTR at all means
# OpenSSH clients pick it, at ~25% less relay throughput (BENCHMARKS.md). Every current client does AES-GCM
# (OpenSSH >= 6.2, PuTTY >= 0.76, libssh, Go, MINA); proxy.ciphers can add CTR back for legacy ones.
CLIENT_CIPHERS = ("aes128-gcm@openssh.com", "aes256-gcm@openssh.com")
MACS = ("hmac-sha2-256-etm@openssh.com", "hmac-sha2-512-etm@openssh.com", "hmac-sha2-256", "hmac-sha2-512")
DISABLED = {
    "ciphers": ["aes128-cbc", "aes192-cbc", "aes256-cbc", "3des-cbc"],
    "macs": ["hmac-sha1", "hmac-md5", "hmac-sha1-96", "hmac-md5-96"],
    "kex": ["diffie-hellman-group1-sha1", "diffie-hellman-group14-sha1", "diffie-hellman-group-exchange-sha1"],
    "keys": ["ssh-rsa", "ssh-dss"],
    "pubkeys": ["ssh-rsa", "ssh-dss"],
}


# Toward the backend we are the client and choose how big the server's data packets may be: fewer, bigger packets
# mean fewer per-packet costs in paramiko's packetizer (measured with tools/bench.py; see BENCHMARKS.md).
BACKEND_MAX_PACKET = 128 * 1024
BACKEND_WINDOW = 4 * 1024 * 1024


class Transport(paramiko.Transport):
    """paramiko's Transport with a longer socket poll.

    paramiko's reader loop wakes every `_active_check_timeout` (0.1 s) on an idle connection just to look at its
    own closed flag: 10 wake-ups a second per session, ~5% of a core at 1,000 idle sessions. Under gevent, closing the
    socket (Transport.close does) wakes a blocked reader at once, so the poll only paces keepalive and rekey checks,
    for which 2 s is ample. Set on the class because paramiko applies it in __init__.
    """
    _active_check_timeout = 2.0


def harden(transport, ciphers=CIPHERS):
    """Restrict a Transport to the algorithms above, in KilnProxy's order of preference."""
    opts = transport.get_security_options()
    opts.ciphers = [c for c in ciphers if c in opts.ciphers]
    opts.digests = [m for m in MACS if m in opts.digests]
    return transport


def send_exit_signal(channel, signame, core_dumped=False, message=""):
    """Send RFC 4254 `exit-signal` (signame without the SIG prefix, e.g. 'KILL')."""
    m = paramiko.Message()
    m.add_byte(cMSG_CHANNEL_REQUEST)
    m.add_int(channel.remote_chanid)
    m.add_string("exit-signal")
    m.add_boolean(False)
    m.add_string(signame)
    m.add_boolean(core_dumped)
    m.add_string(message)
    m.add_string("")
    channel.transport._send_user_message(m)


def _handle_request(channel, m):
    start = m.packet.tell()
    if m.get_text() == "exit-signal":
        m.get_boolean()
        channel.kiln_exit_signal = m.get_text()
        channel.status_event.set()
        return
    m.packet.seek(start)
    paramiko.Channel._handle_request(channel, m)


def capture_exit_signal(transport):
    """Make this client Transport record a peer's `exit-signal` as channel.kiln_exit_signal (e.g. 'TERM')."""
    table = dict(type(transport)._channel_handler_table)
    table[MSG_CHANNEL_REQUEST] = _handle_request
    transport._channel_handler_table = table
    return transport


def exit_signal(channel):
    return getattr(channel, "kiln_exit_signal", None)
