"""The errors notifyrelay raises on purpose.

    NotifyRelayError
    ├── ConfigError          bad configuration: names the key and the file; the CLI exits 2
    ├── AuthError            a token missing or not acceptable (auth mode jwt): 401 at the handshake
    └── ProtocolError        a client frame the relay cannot act on: becomes an ``error`` frame
        └── SubscriptionError  a well-formed subscribe the relay refuses (unknown channel, limits, forbidden)

Anything else that escapes a task is a bug: it is logged at the task boundary and the process exits 1.
"""

from __future__ import annotations

# Exit statuses of every command: a clean stop, anything unexpected, a usage or configuration error.
EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2


class NotifyRelayError(Exception):
    """Base of every error notifyrelay raises deliberately."""


class ConfigError(NotifyRelayError):
    """The configuration is invalid. ``key`` is the dotted key, ``source`` the file or environment it came from."""

    def __init__(self, message: str, *, key: str | None = None, source: str | None = None) -> None:
        self.key = key
        self.source = source
        where = ""
        if key:
            where += f"{key}: "
        super().__init__(f"{where}{message}" + (f" (in {source})" if source else ""))


class AuthError(NotifyRelayError):
    """A token was missing or not acceptable. ``reason`` is a metric label, ``message`` a sentence for the client."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


class ProtocolError(NotifyRelayError):
    """A client frame is malformed; ``code`` is one of the documented error codes. ``limit`` names the [server]
    limit the frame ran into, if that is why it is refused (each limit has its own metric)."""

    def __init__(
        self, code: str, message: str, *, request_id: str | None = None, limit: str | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.request_id = request_id
        self.limit = limit


class SubscriptionError(ProtocolError):
    """A well-formed subscribe that the relay refuses."""
