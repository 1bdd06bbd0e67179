"""The LISTEN side: one dedicated asyncpg connection (never a pool) feeding a bounded ingest queue.

The notification callback is synchronous and only appends to the queue: asyncpg would start a task per
notification for an async callback, with no backpressure. When the queue is full the notification is dropped and
its channel marked, so that its subscribers are told to resync instead of missing it silently.

The connection is proven to be *listening*, not merely open, by a heartbeat: a ``NOTIFY`` to a private channel
that must come back within ``heartbeat_timeout_s`` (the command, not ``pg_notify()``, so that it needs no
privilege). A lost connection (termination callback, failed heartbeat, any error at all) is replaced forever;
every channel is LISTENed again, because asyncpg forgets listeners with the connection.

Every path back to connecting goes through one wait (``_retry_wait``): while PostgreSQL is down (connections
refused, timing out, or "starting up") the relay tries again every ``probe_interval_s`` at most, so it listens
again within that of the database coming back, at no cost to it; when PostgreSQL answers but the attempt fails
(authentication, privileges, a full NOTIFY queue, a failed heartbeat, anything unexpected) the wait grows
exponentially with jitter to ``reconnect_max_s``, so a database in trouble is never hammered.

The NOTIFY queue's usage is sampled on every connection and before every heartbeat, as a query of its own: its
value stays fresh while heartbeats fail (which is when it matters), and a refused sample never costs the LISTEN.

The connection is an ``InlineNotifyConnection``: the callback runs as asyncpg parses each notification, not one
``loop.call_soon`` later (which was about 40 % of the relay's CPU per notification).
"""

from __future__ import annotations

import asyncio
import math
import os
import random
import re
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable
from datetime import UTC, datetime
from typing import Any, Protocol
from urllib.parse import urlsplit

import asyncpg
import structlog

from ..config import ListenerConfig
from ..ops.metrics import Metrics
from . import payload_guard
from .ingest import IngestQueue
from .inline_notify import INLINE_NOTIFY, InlineNotifyConnection

log = structlog.get_logger("notifyrelay.listener")


class ListenerObserver(Protocol):
    """Told about the listener's state changes (the hub, which turns them into status and resync frames)."""

    def listener_down(self) -> None: ...

    def listener_up(self, channels: list[str], gap_start: datetime, gap_end: datetime, reason: str) -> None: ...


class ConnectionLost(Exception):
    """The LISTEN connection can no longer be trusted; the reason is the message."""


Connect = Callable[..., Awaitable[Any]]

# Errors that say PostgreSQL is not there (yet): retried on the short probe interval, which costs it nothing.
_UNREACHABLE = (OSError, TimeoutError, asyncpg.CannotConnectNowError, asyncpg.ConnectionDoesNotExistError)
# Errors the listener expects from a database or a link in trouble; anything else is logged with its traceback.
_EXPECTED = (ConnectionLost, OSError, TimeoutError, ValueError, asyncpg.PostgresError, asyncpg.InterfaceError)

# Settings the LISTEN session needs whatever the database or role defaults say (docs/operations.md). Only those
# this server knows are set (idle_session_timeout came with PostgreSQL 14, transaction_timeout with 17).
_SESSION_SETTINGS = """
SELECT count(set_config(name, value, false)) FROM (VALUES
  ('idle_session_timeout', '0'), ('idle_in_transaction_session_timeout', '0'), ('transaction_timeout', '0'),
  ('statement_timeout', $1::text)) AS wanted(name, value)
WHERE name IN (SELECT name FROM pg_settings)
"""




def _hint(exc: BaseException, role: str, database: str) -> str | None:
    """What to do about an error, for the errors a person can fix."""
    message = str(exc)
    if isinstance(exc, asyncpg.InsufficientPrivilegeError):
        if "database" in message:
            return f"GRANT CONNECT ON DATABASE {database} TO {role}"
        if "pg_notification_queue_usage" in message:
            return f"GRANT EXECUTE ON FUNCTION pg_notification_queue_usage() TO {role}"
        return f"the role {role} lacks a privilege the relay needs: see docs/security.md"
    if isinstance(exc, asyncpg.ProgramLimitExceededError) and "NOTIFY queue" in message:
        return ("PostgreSQL's NOTIFY queue is full: a session that LISTENs while holding a transaction open keeps "
                "it from draining; find it in pg_stat_activity (state 'idle in transaction') and end it")
    if isinstance(exc, asyncpg.TooManyConnectionsError):
        return "PostgreSQL has no connection slot left: raise max_connections or the role's CONNECTION LIMIT"
    hints: dict[type[BaseException], str] = {
        asyncpg.InvalidPasswordError: "authentication failed: check the user and password in the DSN (or dsn_file)",
        asyncpg.InvalidAuthorizationSpecificationError: "the server refused this user: check the DSN and pg_hba.conf",
        asyncpg.InvalidCatalogNameError: "the database does not exist: check the database name in the DSN",
        asyncpg.ClientConfigurationError: "the DSN's options are invalid: check it (sslmode, sslrootcert, ...)",
        ValueError: "the DSN is malformed: check it",
    }
    return next((hint for kind, hint in hints.items() if isinstance(exc, kind)), None)


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
        # One query at a time on the connection: LISTEN/UNLISTEN (connect, reload), the queue sample and the
        # heartbeat share it, and asyncpg refuses a second operation while one is in progress.
        self._lock = asyncio.Lock()
        self._listened: set[str] = set()  # channels LISTENed on the current connection
        self._closing = False
        self._last_proof = time.time()  # the last moment we knew we were listening (heartbeat or notification)
        self._tracebacks_logged: set[type[BaseException]] = set()
        self._undecodable_logged_at = -math.inf
        self._last_logged_error, self._last_logged_at, self._unlogged = "", -math.inf, 0
        self.up = False
        self.down_reason = "not connected yet"
        self.last_heartbeat: float | None = None  # time.time() of the last heartbeat that came back
        self.connect_attempts = 0
        # The NOTIFY queue, as last sampled (0-1; None before the first sample), when, and why it cannot be.
        self.queue_usage: float | None = None
        self.queue_sampled_at: float | None = None
        self.queue_sample_error: str | None = None

    @property
    def channels(self) -> list[str]:
        return list(self._channels)

    async def run(self) -> None:
        """Listen until cancelled, replacing the connection whenever it is lost; nothing the driver raises ends it."""
        reason = "listener_started"
        if not INLINE_NOTIFY:
            log.warning("listener.inline_notify_unavailable", asyncpg=asyncpg.__version__,
                        effect="notifications go through asyncpg's call_soon: correct, about 40 % more CPU each",
                        fix="report this asyncpg version to notifyrelay; or install asyncpg 0.29-0.32")
        failures = 0  # attempts in a row that did not give a connection which held for a heartbeat interval
        try:
            while not self._closing:
                up_since: float | None = None
                listening = False
                error: Exception | None = None
                try:
                    conn = await self._connect_and_listen()
                    listening = True
                    gap_end = time.time()  # LISTEN is in force from here on
                    try:
                        gap_start = self._last_proof  # only proofs while up count, so this is the old connection's
                        # Prove the new session receives before telling anyone it is up (and make /readyz fresh).
                        await self._heartbeat(conn)
                        up_since = time.monotonic()
                        self._set_up(True, "")
                        if reason == "listener_reconnected":
                            self._metrics.listener_gap_seconds.observe(gap_end - gap_start)
                        log.info("listener.up", channels=self._channels, reason=reason, attempts=failures + 1)
                        self._observer.listener_up(list(self._channels), _utc(gap_start), _utc(gap_end), reason)
                        await self._supervise(conn)
                    finally:
                        self._conn = None
                        _terminate(conn)
                        if self.up:
                            self._set_up(False, "LISTEN connection lost")  # _note_failure says why
                            reason = "listener_reconnected"
                            if not self._closing:
                                self._metrics.listener_reconnects.inc()
                                self._observer.listener_down()
                except Exception as exc:  # the task boundary: every error becomes a reconnect
                    error = exc
                # Every path back to connecting goes through here: a connection that held for a heartbeat
                # interval is replaced at once, anything else waits (see the module docstring).
                held = up_since is not None and time.monotonic() - up_since >= self.settings.heartbeat_interval_s
                failures = 0 if held else failures + 1
                wait_s = self._retry_wait_s(failures, error, was_up=up_since is not None)
                if self._closing:
                    break
                if error is not None:
                    self._note_failure(error, was_up=up_since is not None, listening=listening, wait_s=wait_s)
                if wait_s:
                    await asyncio.sleep(wait_s)
        finally:
            self._set_up(False, "shutting down" if self._closing else self.down_reason)

    async def close(self) -> None:
        """Close the connection politely (shutdown); idempotent."""
        self._closing = True
        conn, self._conn = self._conn, None
        if conn is not None and not conn.is_closed():
            try:
                await asyncio.wait_for(conn.close(), timeout=2)
            except Exception:  # shutting down: whatever went wrong, cut the link
                _terminate(conn)

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
        except Exception as exc:  # the supervisor sees the terminated connection and reconnects
            log.warning("listener.relisten_failed", error=str(exc) or type(exc).__name__)
            _terminate(conn)
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

    def _retry_wait_s(self, failures: int, error: BaseException | None, *, was_up: bool) -> float:
        """How long to wait before the next attempt: 0 after a connection that held, at most the probe interval
        after any other loss of a connection that was up or while PostgreSQL is down, else exponential backoff
        with equal jitter (spread out, yet never a tight loop)."""
        if not failures:
            return 0.0
        settings = self.settings
        ceiling = min(settings.reconnect_max_s, settings.reconnect_initial_s * 2 ** min(failures - 1, 60))
        wait_s = random.uniform(ceiling / 2, ceiling)
        # A connection that was up and is lost says little about the next attempt (the database may be restarting,
        # and a backoff grown by an earlier outage must not delay its return); that attempt's own error decides.
        if was_up or isinstance(error, _UNREACHABLE):
            wait_s = min(wait_s, random.uniform(0.5, 1.0) * settings.probe_interval_s)
        return wait_s

    def _note_failure(self, exc: Exception, *, was_up: bool, listening: bool, wait_s: float) -> None:
        """Log a failed attempt or a lost connection (an unexpected error once with its traceback; the same
        'PostgreSQL is down' error at most every 30 s) and say why in ``down_reason``, for /readyz."""
        error = str(exc) or type(exc).__name__
        hint = _hint(exc, *self._role_and_database())
        fields: dict[str, Any] = {"attempt": self.connect_attempts, "wait_s": round(wait_s, 3), "error": error,
                                  "error_type": type(exc).__name__}
        if hint:
            fields["fix"] = hint
        what = ("LISTEN connection lost" if was_up else
                "LISTENing, but the first heartbeat failed" if listening else "cannot connect and LISTEN")
        self.down_reason = f"{what}: {error}" + (f" (fix: {hint})" if hint else "")
        if not was_up:
            self._metrics.listener_connect_failures.inc()
        if not isinstance(exc, _EXPECTED):
            self._metrics.listener_unexpected_errors.inc()
            first = type(exc) not in self._tracebacks_logged
            self._tracebacks_logged.add(type(exc))
            log.error("listener.unexpected_error", exc_info=exc if first else False, **fields)
        elif was_up:
            log.warning("listener.lost", **fields)
        elif hint:
            log.error("listener.connect_failed", **fields)
        else:
            # While PostgreSQL is down the probe fails every half second: one line per change or per 30 s.
            now = time.monotonic()
            if error == self._last_logged_error and now - self._last_logged_at < 30:
                self._unlogged += 1
                return
            if self._unlogged:
                fields["repeated"] = self._unlogged
            self._last_logged_error, self._last_logged_at, self._unlogged = error, now, 0
            log.warning("listener.reconnect_scheduled", **fields)

    def _role_and_database(self) -> tuple[str, str]:
        """The role and database the DSN names (libpq's defaults otherwise), for the fixes we suggest."""
        parts = urlsplit(self._dsn) if "://" in self._dsn else None
        fields = dict(re.findall(r"(\w+)\s*=\s*'?([^'\s]*)", self._dsn)) if parts is None else {}
        role = (parts.username if parts else fields.get("user")) or os.environ.get("PGUSER") or "<role>"
        database = (parts.path.lstrip("/") if parts else fields.get("dbname")) or os.environ.get("PGDATABASE")
        return role, database or role

    async def _connect_and_listen(self) -> Any:
        """One attempt: connect, set the session up, sample the queue, LISTEN on every channel."""
        settings = self.settings
        self.connect_attempts += 1
        self._metrics.listener_connect_attempts.inc()
        options: dict[str, Any] = {"connection_class": InlineNotifyConnection} if INLINE_NOTIFY else {}
        conn = await self._connect_fn(
            self._dsn or None,
            timeout=settings.connect_timeout_s,
            server_settings={"application_name": settings.application_name},
            **options,
        )
        try:
            _enable_keepalive(conn, settings)
            sql_ascii = conn.get_settings().server_encoding == "SQL_ASCII"
            if sql_ascii and not payload_guard.install(conn, self._on_undecodable):
                # Then a payload that is not UTF-8 costs the connection, as it would without the guard.
                transport = type(getattr(conn, "_transport", None)).__name__
                log.warning("listener.payload_guard_unavailable", transport=transport)
            self._conn = conn
            self._listened = set()
            conn.add_termination_listener(self._on_termination)
            async with asyncio.timeout(settings.connect_timeout_s), self._lock:
                if sql_ascii:
                    # A SQL_ASCII server checks each payload against a UTF8 client's encoding, and a payload that
                    # fails ends the session (FATAL); with a SQL_ASCII client it sends the bytes as they are, and
                    # the guard drops those that are not UTF-8.
                    await conn.execute("SET client_encoding = 'SQL_ASCII'")
                statement_timeout_ms = int(1000 * max(settings.heartbeat_timeout_s, settings.connect_timeout_s))
                await conn.fetchval(_SESSION_SETTINGS, str(statement_timeout_ms))
                await self._sample_queue(conn)
                await conn.add_listener(self._heartbeat_channel, self._on_notification)
                await self._sync_listens(conn)
        except BaseException:
            self._conn = None
            _terminate(conn)
            raise
        return conn

    async def _supervise(self, conn: Any) -> None:
        """Return never; raise ConnectionLost when the connection dies or a heartbeat fails."""
        loop = asyncio.get_running_loop()
        while True:
            self._supervisor_wakeup = wakeup = loop.create_future()
            try:
                async with asyncio.timeout(self.settings.heartbeat_interval_s):
                    await wakeup
            except TimeoutError:
                pass
            else:
                raise ConnectionLost("the connection was terminated")
            finally:
                self._supervisor_wakeup = None
            if conn.is_closed():
                raise ConnectionLost("the connection was closed")
            try:
                async with asyncio.timeout(self.settings.heartbeat_timeout_s), self._lock:
                    await self._sample_queue(conn)
            except TimeoutError:
                raise ConnectionLost("the NOTIFY queue sample did not answer in time") from None
            await self._heartbeat(conn)

    async def _sample_queue(self, conn: Any) -> None:
        """Sample pg_notification_queue_usage() on its own: a refusal (a revoked privilege) is logged with its fix
        and leaves the listener alone. Hold the lock."""
        try:
            usage = float(await conn.fetchval("SELECT pg_notification_queue_usage()"))
        except asyncpg.InsufficientPrivilegeError as exc:
            problem = f"{exc} (fix: {_hint(exc, *self._role_and_database())})"
            if problem != self.queue_sample_error:
                log.error("listener.queue_sample_refused", error=str(exc), fix=_hint(exc, *self._role_and_database()))
            self.queue_sample_error = problem
            self.queue_usage = None
            self._metrics.pg_notification_queue_usage.set(math.nan)
            return
        self.queue_sample_error = None
        self.queue_usage, self.queue_sampled_at = usage, time.time()
        self._metrics.pg_notification_queue_usage.set(usage)
        self._metrics.pg_notification_queue_sampled.set(self.queue_sampled_at)

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
                    # The command, not pg_notify(): NOTIFY needs no privilege. The channel is ours, the token digits.
                    await conn.execute(f"NOTIFY \"{self._heartbeat_channel}\", '{token}'")
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

    def _on_notification(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        # Runs inside asyncpg's protocol (InlineNotifyConnection): it must not raise, nor await.
        if channel == self._heartbeat_channel:
            waiter = self._heartbeat_waiter
            if waiter is not None and waiter[0] == payload and not waiter[1].done():
                waiter[1].set_result(None)
            return
        if self.up:  # while connecting, proofs would belong to the new connection and hide the gap
            self._last_proof = time.time()
        self._queue.put(channel, payload)

    def _on_undecodable(self, channel: str, pid: int) -> None:
        """A notification whose payload is not UTF-8 (SQL_ASCII databases): counted, logged (at most every 10 s),
        dropped; the connection carries on."""
        self._metrics.listener_undecodable_payloads.labels(channel).inc()
        now = time.monotonic()
        if now - self._undecodable_logged_at >= 10:
            self._undecodable_logged_at = now
            log.warning("listener.undecodable_payload", channel=channel, sender_pid=pid,
                        fix="send UTF-8 payloads (the key as text); this database's encoding is SQL_ASCII")

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


def _terminate(conn: Any) -> None:
    try:
        conn.terminate()
    except Exception as exc:  # a connection beyond saving; nothing else to do with it
        log.debug("listener.terminate_failed", error=str(exc))


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
