"""How a connection ended: the one set of close reasons, shared by the server, the relay, the watchdog, the admin
API and the metrics (which turn each into a bounded label). A Reason is a str (StrEnum): log lines show its text."""
import enum


class Reason(enum.StrEnum):
    COMPLETED = "completed"                          # the backend command ran and its exit status was passed on
    CLIENT_LOST = "client connection lost"
    IDLE_TIMEOUT = "idle timeout"
    SESSION_TIMEOUT = "session timeout"
    LOGIN_TIMEOUT = "login timeout"
    HANDSHAKE_FAILED = "handshake failed"
    AUTH_FAILED = "auth failed"
    CLIENT_LEFT_IN_LOGIN = "client disconnected during login"
    PROTOCOL_ERROR = "protocol error"
    PROTOCOL_VIOLATION = "protocol violation"        # a bound of the security model (README)
    REFUSED_REQUEST = "refused request"              # shell, pty, subsystem... (policy.refusal)
    COMMAND_REJECTED = "command rejected"
    PER_ACCOUNT = "per-account limit"
    MAX_STARTUPS = "max_startups"                    # no handshake slot within timeouts.login
    PENALTY = "penalty"                              # its source was penalised while it waited
    BACKEND_UNAVAILABLE = "backend unavailable"
    CLOSED_BY_ADMIN = "closed by admin"
    SHUTDOWN = "shutdown"                            # drain timeout
    WATCHDOG = "watchdog"                            # a session past its timeouts, closed by the watchdog
    KILLED = "killed"
    INTERNAL_ERROR = "internal error"
    UNKNOWN = "unknown"

    @property
    def label(self):
        return self.value.replace(" ", "_").replace("-", "_")
