"""What a connection costs before it is a client: its file descriptor, its handshake, and the accepts that fail.

Every TCP connection holds a file descriptor from accept to close. Open websockets and streams are bounded by
``max_connections`` at the gate (transports/gate.py); connections still in their handshake, or idle between
keep-alive requests, by ``max_handshakes`` here. Past it the oldest of them is shed: one that finishes its request
in a round trip is never the oldest for long, so a flood of slow handshakes pushes out only its own kind, never
the probes or a client that talks. Both limits, plus headroom for the relay itself, must fit ``RLIMIT_NOFILE``,
whose soft value is raised to the hard one at start; a relay that cannot hold them refuses to start (exit 2). An
accept that fails anyway (EMFILE: out of descriptors) is logged once per interval with a count, not once per try.
"""

from __future__ import annotations

import asyncio
import errno
import time
from collections.abc import Callable
from typing import Any, Generic, TypeVar

import structlog
from prometheus_client import Counter

from ..config import Config
from ..exceptions import ConfigError

try:
    import resource
except ImportError:  # pragma: no cover - Windows has no RLIMIT_NOFILE
    resource = None  # type: ignore[assignment]

log = structlog.get_logger("notifyrelay.server")
C = TypeVar("C")
# Besides clients: the listening sockets, the LISTEN connection, the event loop's own, log files, /proc reads for
# the process metrics, a supervisor's pipes. The state pool's connections are added to it.
FD_HEADROOM = 64
ACCEPT_ERROR_INTERVAL_S = 10.0
_ACCEPT_OUT_OF_RESOURCES = "socket.accept() out of system resource"  # asyncio's message for EMFILE and the like


class Handshakes(Generic[C]):
    """Connections that are not (yet) a websocket or a stream, oldest first (pure: the caller closes the shed)."""

    def __init__(self) -> None:
        self._waiting: dict[C, None] = {}  # insertion order: the least recent progress first

    def arrive(self, connection: C, limit: int) -> C | None:
        """Count a new connection; past ``limit``, return the oldest one (the new one never is) to be shed."""
        self._waiting[connection] = None
        if len(self._waiting) <= max(limit, 1):
            return None
        oldest = next(iter(self._waiting))
        del self._waiting[oldest]
        return oldest

    def progressed(self, connection: C) -> None:
        """A request was answered and the connection waits for the next: it goes to the back of the line."""
        if connection in self._waiting:
            del self._waiting[connection]
            self._waiting[connection] = None

    def done(self, connection: C) -> None:
        """Upgraded or closed: no longer counted."""
        self._waiting.pop(connection, None)

    def __len__(self) -> int:
        return len(self._waiting)


def raise_nofile_limit() -> tuple[int, int]:
    """Raise the soft RLIMIT_NOFILE to the hard one (where the system allows it); return (soft, hard) after."""
    if resource is None:  # pragma: no cover
        return (2**31, 2**31)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # An unlimited hard value (macOS) cannot be the soft one: try the largest values a system takes.
    for wanted in ([hard] if hard != resource.RLIM_INFINITY else [1_048_576, 65_536, 24_576, 10_240]):
        if soft != resource.RLIM_INFINITY and soft >= wanted:
            break
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
        except (ValueError, OSError):
            continue
        break
    return current_nofile_limit()


def current_nofile_limit() -> tuple[int, int]:
    """RLIMIT_NOFILE as (soft, hard), an unlimited value as 2**31."""
    if resource is None:  # pragma: no cover
        return (2**31, 2**31)
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    unlimited = resource.RLIM_INFINITY
    return (2**31 if soft == unlimited else soft, 2**31 if hard == unlimited else hard)


def check_file_descriptors(config: Config, *, raise_limit: bool = True) -> int:
    """Raise the soft RLIMIT_NOFILE (unless told not to), then refuse to start (ConfigError naming
    ``server.max_connections``) when it cannot hold max_connections + max_handshakes + headroom. Returns the limit
    in force."""
    soft, hard = raise_nofile_limit() if raise_limit else current_nofile_limit()
    settings = config.server
    headroom = FD_HEADROOM + config.state.pool_size
    needed = settings.max_connections + settings.max_handshakes + headroom
    if needed > soft:
        raise ConfigError(
            f"{settings.max_connections} connections, plus {settings.max_handshakes} in their handshake "
            f"(server.max_handshakes) and {headroom} for the relay itself, need {needed} file descriptors, but "
            f"RLIMIT_NOFILE is {soft} (hard limit {hard}): raise it (systemd LimitNOFILE=, docker run --ulimit "
            f"nofile=N:N, ulimit -n N) or lower server.max_connections to at most "
            f"{max(0, soft - settings.max_handshakes - headroom)}",
            key="server.max_connections",
        )
    log.debug("server.file_descriptors", limit=soft, hard_limit=hard, needed=needed)
    return soft


class AcceptErrors:
    """The event loop's exception handler while the server runs: a failed accept is counted and logged at most once
    per interval (with how many failed since the last line); anything else goes to the handler it replaced."""

    def __init__(self, counter: Counter, *, interval_s: float = ACCEPT_ERROR_INTERVAL_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.counter = counter
        self.interval_s = interval_s
        self._clock = clock
        self._last_logged: float | None = None
        self._unlogged = 0
        self._previous: Callable[[asyncio.AbstractEventLoop, dict[str, Any]], object] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._previous = loop.get_exception_handler()
        loop.set_exception_handler(self)

    def uninstall(self) -> None:
        """Put the replaced handler back (unless another was installed since: then that one stays)."""
        loop = self._loop
        if loop is not None and loop.get_exception_handler() is self:
            loop.set_exception_handler(self._previous)
        self._loop = None

    def __call__(self, loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        if not is_accept_error(context):
            if self._previous is not None:
                self._previous(loop, context)
            else:
                loop.default_exception_handler(context)
            return
        name = errno.errorcode.get(exc.errno, "unknown") if isinstance(exc, OSError) and exc.errno else "unknown"
        self.counter.labels(name).inc()
        self._unlogged += 1
        now = self._clock()
        if self._last_logged is None or now - self._last_logged >= self.interval_s:
            log.error("server.accept_failed", error=str(exc), errno=name, count=self._unlogged,
                      hint="out of file descriptors: raise RLIMIT_NOFILE (LimitNOFILE=) or lower "
                           "server.max_connections and server.max_handshakes")
            self._last_logged = now
            self._unlogged = 0


def is_accept_error(context: dict[str, Any]) -> bool:
    """Does an exception handler's context come from a listening socket's accept?"""
    if context.get("message") == _ACCEPT_OUT_OF_RESOURCES:
        return True
    # Another OSError out of accept() escapes asyncio's accept callback, which the loop reports with its handle.
    return isinstance(context.get("exception"), OSError) and "_accept_connection" in repr(context.get("handle"))
