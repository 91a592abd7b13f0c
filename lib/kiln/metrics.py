"""Metrics hooks called by the server. `NullMetrics` records nothing; admin's Prometheus metrics implement them."""


class NullMetrics:
    def connection_opened(self):
        pass

    def connection_closed(self):
        pass

    def auth_failed(self):
        pass

    def limit_rejected(self, limit):
        """limit: 'per_account', 'max_startups', 'penalty', 'max_connections'."""

    def backend_error(self):
        pass

    def session_established(self, seconds):
        """Time from TCP accept to a running backend command."""

    def session_ended(self, outcome, seconds, bytes_in, bytes_out):
        """outcome: a close reason from a bounded set (completed, auth failed, login timeout, ...)."""
