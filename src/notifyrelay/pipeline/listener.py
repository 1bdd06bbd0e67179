"""The LISTEN side: one dedicated asyncpg connection (never a pool) feeding a bounded ingest queue.

The notification callback is synchronous and only appends to the queue: asyncpg would start a task per
notification for an async callback, with no backpressure. When the queue is full the notification is dropped and
its channel marked, so that its subscribers are told to resync instead of missing it silently.

The connection is proven to be *listening*, not merely open, by a heartbeat: a NOTIFY to a private channel that
must come back within ``heartbeat_timeout_s``. A lost connection (termination callback, failed heartbeat or any
error) is replaced forever, with exponential backoff and full jitter; every channel is LISTENed again, because
asyncpg forgets listeners with the connection.
"""

from __future__ import annotations

import asyncio
import os
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol

import asyncpg
import structlog
from tenacity import AsyncRetrying, RetryCallState, retry_if_exception_type, wait_random_exponential

from ..config import ListenerConfig
from ..ops.metrics import Metrics
from .ingest import IngestQueue

log = structlog.get_logger("notifyrelay.listener")

class ListenerObserver(Protocol):
    """Told about the listener's state changes (the hub, which turns them into status and resync frames)."""

    def listener_down(self) -> None: ...

    def listener_up(self, channels: list[str], gap_start: datetime, gap_end: datetime, reason: str) -> None: ...


class ConnectionLost(Exception):
    """The LISTEN connection can no longer be trusted; the reason is the message."""


Connect = Callable[..., Awaitable[Any]]

_FATAL_HINTS: dict[type[BaseException], str] = {
    asyncpg.InvalidPasswordError: "authentication failed: check the user and password in the DSN (or dsn_file)",
    asyncpg.InvalidAuthorizationSpecificationError: "the server refused this user: check the DSN and pg_hba.conf",
    asyncpg.InvalidCatalogNameError: "the database does not exist: check the database name in the DSN",
    asyncpg.ClientConfigurationError: "the DSN's options are invalid: check it (sslmode, sslrootcert, ...)",
    ValueError: "the DSN is malformed: check it",
}


def _hint(exc: BaseException) -> str | None:
    return next((hint for kind, hint in _FATAL_HINTS.items() if isinstance(exc, kind)), None)


class Listener:
    """Holds the LISTEN connection, re-establishing it forever; reports up/down to an observer."""

    def __init__(
        self,
        dsn: str,
        channels: Iterable[str],
        settings: ListenerConfig,
        queue: IngestQueue,
        observer: ListenerObserver,
        metrics: Metrics,
        *,
        connect: Connect = asyncpg.connect,
    ) -> None:
        self._dsn = dsn
        self._channels = list(channels)
        self.settings = settings
        self._queue = queue
        self._observer = observer
        self._metrics = metrics
        self._connect_fn = connect
        self._heartbeat_channel = f"notifyrelay_heartbeat_{os.getpid()}_{secrets.token_hex(4)}"
        self._heartbeat_waiter: tuple[str, asyncio.Future[None]] | None = None
        self._supervisor_wakeup: asyncio.Future[None] | None = None
        self._heartbeat_count = 0
        self._conn: Any = None
        # One query at a time on the connection: LISTEN/UNLISTEN (connect, reload) and the heartbeat share it, and
        # asyncpg refuses a second operation while one is in progress.
        self._lock = asyncio.Lock()
        self._listened: set[str] = set()  # channels LISTENed on the current connection
        self._closing = False
        self._last_proof = time.time()  # the last moment we knew we were listening (heartbeat or notification)
        self.up = False
        self.down_reason = "not connected yet"
        self.last_heartbeat: float | None = None  # time.time() of the last heartbeat that came back

    @property
    def channels(self) -> list[str]:
        return list(self._channels)

    async def run(self) -> None:
        """Listen until cancelled, replacing the connection whenever it is lost."""
        reason = "listener_started"
        try:
            while not self._closing:
                conn = await self._connect_and_listen()
                gap_end = time.time()  # LISTEN is in force from here on
                try:
                    gap_start = self._last_proof  # only proofs while up count, so this is the old connection's
                    # Prove the new session receives before telling anyone it is up (and make /readyz fresh).
                    await self._heartbeat(conn)
                    self._set_up(True, "")
                    if reason == "listener_reconnected":
                        self._metrics.listener_gap_seconds.observe(gap_end - gap_start)
                    log.info("listener.up", channels=self._channels, reason=reason)
                    self._observer.listener_up(list(self._channels), _utc(gap_start), _utc(gap_end), reason)
                    await self._supervise(conn)
                except (ConnectionLost, OSError, asyncpg.PostgresError, asyncpg.InterfaceError, TimeoutError) as exc:
                    if not self._closing:
                        log.warning("listener.lost", error=str(exc) or type(exc).__name__)
                        self.down_reason = f"LISTEN connection lost: {exc or type(exc).__name__}"
                finally:
                    conn.terminate()
                    was_up = self.up
                    self._set_up(False, self.down_reason)
                    if was_up and not self._closing:
                        self._metrics.listener_reconnects.inc()
                        self._observer.listener_down()
                    if was_up:
                        reason = "listener_reconnected"
        finally:
            self._set_up(False, "shutting down" if self._closing else self.down_reason)

    async def close(self) -> None:
        """Close the connection politely (shutdown); idempotent."""
        self._closing = True
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=2)
            except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError):
                conn.terminate()

    async def set_channels(self, channels: Iterable[str]) -> None:
        """Adopt a new channel list (reload): LISTEN/UNLISTEN the difference now if connected (a failure forces a
        reconnect), else the next connection LISTENs the new list."""
        self._channels = list(dict.fromkeys(channels))
        conn = self._conn
        if conn is None or conn.is_closed():
            return
        try:
            async with self._lock:
                added, removed = await self._sync_listens(conn)
        except (OSError, TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            log.warning("listener.relisten_failed", error=str(exc))
            conn.terminate()
        else:
            log.info("listener.channels_changed", added=added, removed=removed)

    async def _sync_listens(self, conn: Any) -> tuple[list[str], list[str]]:
        """LISTEN/UNLISTEN until the connection listens on exactly the configured channels. Hold the lock."""
        added: list[str] = []
        removed: list[str] = []
        # A reload may change the list while we await; loop until what is LISTENed matches what is wanted.
        while (wanted := set(self._channels)) != self._listened:
            for channel in [c for c in self._channels if c not in self._listened]:
                await conn.add_listener(channel, self._on_notification)
                self._listened.add(channel)
                added.append(channel)
            for channel in [c for c in self._listened if c not in wanted]:
                await conn.remove_listener(channel, self._on_notification)
                self._listened.discard(channel)
                removed.append(channel)
        return added, removed

    def _set_up(self, up: bool, reason: str) -> None:
        self.up = up
        self.down_reason = reason
        self._metrics.listener_up.set(1 if up else 0)

    async def _connect_and_listen(self) -> Any:
        """Connect and LISTEN on every channel, retrying forever with exponential backoff and full jitter."""
        settings = self.settings
        retrying = AsyncRetrying(
            wait=wait_random_exponential(multiplier=settings.reconnect_initial_s, max=settings.reconnect_max_s),
            retry=retry_if_exception_type(
                (OSError, TimeoutError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError,
                 asyncpg.ClientConfigurationError)
            ),
            before_sleep=self._log_retry,
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                conn = await self._connect_fn(
                    self._dsn or None,
                    timeout=settings.connect_timeout_s,
                    server_settings={"application_name": settings.application_name},
                )
                try:
                    _enable_keepalive(conn, settings)
                    self._conn = conn
                    self._listened = set()
                    conn.add_termination_listener(self._on_termination)
                    async with asyncio.timeout(settings.connect_timeout_s), self._lock:
                        await conn.add_listener(self._heartbeat_channel, self._on_notification)
                        await self._sync_listens(conn)
                except BaseException:
                    self._conn = None
                    conn.terminate()
                    raise
                return conn
        raise AssertionError("unreachable: tenacity retries forever")  # pragma: no cover

    def _log_retry(self, state: RetryCallState) -> None:
        exc = state.outcome.exception() if state.outcome else None
        wait_s = round(state.next_action.sleep, 3) if state.next_action else None
        self._metrics.listener_connect_failures.inc()
        self.down_reason = f"cannot connect and LISTEN: {exc or 'unknown error'}"
        hint = _hint(exc) if exc else None
        if hint:
            log.error("listener.connect_failed", attempt=state.attempt_number, wait_s=wait_s, error=str(exc), fix=hint)
        else:
            log.warning("listener.reconnect_scheduled", attempt=state.attempt_number, wait_s=wait_s, error=str(exc))

    async def _supervise(self, conn: Any) -> None:
        """Return never; raise ConnectionLost when the connection dies or a heartbeat fails."""
        interval = self.settings.heartbeat_interval_s
        loop = asyncio.get_running_loop()
        while True:
            self._supervisor_wakeup = wakeup = loop.create_future()
            try:
                async with asyncio.timeout(interval):
                    await wakeup
            except TimeoutError:
                pass
            else:
                raise ConnectionLost("the connection was terminated")
            finally:
                self._supervisor_wakeup = None
            if conn.is_closed():
                raise ConnectionLost("the connection was closed")
            await self._heartbeat(conn)

    async def _heartbeat(self, conn: Any) -> None:
        """NOTIFY ourselves on the private channel and wait for it: proves the session still receives."""
        self._heartbeat_count += 1
        token = str(self._heartbeat_count)
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._heartbeat_waiter = (token, waiter)
        started = time.monotonic()
        timeout = self.settings.heartbeat_timeout_s
        try:
            async with asyncio.timeout(timeout):
                async with self._lock:
                    row = await conn.fetchrow(
                        "SELECT pg_notify($1, $2), pg_notification_queue_usage()", self._heartbeat_channel, token
                    )
                await waiter
        except TimeoutError:
            raise ConnectionLost(f"heartbeat did not come back within {timeout:g}s") from None
        finally:
            self._heartbeat_waiter = None
            if waiter.done() and not waiter.cancelled():
                waiter.exception()  # set by the termination callback after the query failed: already handled
        self._last_proof = self.last_heartbeat = time.time()
        self._metrics.heartbeat_seconds.observe(time.monotonic() - started)
        self._metrics.listener_last_heartbeat.set(self.last_heartbeat)
        self._metrics.pg_notification_queue_usage.set(float(row[1]))

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if channel == self._heartbeat_channel:
            waiter = self._heartbeat_waiter
            if waiter is not None and waiter[0] == payload and not waiter[1].done():
                waiter[1].set_result(None)
            return
        if self.up:  # while connecting, proofs would belong to the new connection and hide the gap
            self._last_proof = time.time()
        self._queue.put(channel, payload)

    def _on_termination(self, conn: Any) -> None:
        # Wake the supervisor now rather than at the next heartbeat. asyncpg calls this soon after the fact, so a
        # connection we already replaced may report in late: ignore it.
        if conn is not self._conn:
            return
        waiter = self._heartbeat_waiter
        if waiter is not None and not waiter[1].done():
            waiter[1].set_exception(ConnectionLost("the connection was terminated"))
        if self._supervisor_wakeup is not None and not self._supervisor_wakeup.done():
            self._supervisor_wakeup.set_result(None)


def _utc(timestamp: float) -> datetime:
    return datetime.fromtimestamp(timestamp, UTC)


def _enable_keepalive(conn: Any, settings: ListenerConfig) -> None:
    """TCP keepalive on the socket, so that even an idle dead link is noticed by the kernel (belt and braces)."""
    transport = getattr(conn, "_transport", None)
    sock = transport.get_extra_info("socket") if transport is not None else None
    if sock is None or sock.family not in (socket.AF_INET, socket.AF_INET6):
        return
    idle = max(1, int(settings.heartbeat_interval_s))
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    for option, value in (("TCP_KEEPIDLE", idle), ("TCP_KEEPINTVL", max(1, idle // 3)), ("TCP_KEEPCNT", 3)):
        if hasattr(socket, option):
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, option), value)
