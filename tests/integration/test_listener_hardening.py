"""The listener on a hostile or unlucky day (issue 14 items 1, 2, 5, 9), against a real PostgreSQL.

Each test counts what the listener does (connection attempts, observer events, metrics) over a bounded time rather
than timing it: a loop that reconnects without backoff shows up as hundreds of attempts in a few seconds.
"""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import asyncpg
import pytest
import structlog

from notifyrelay.config import ListenerConfig
from notifyrelay.ops.health import Readiness
from notifyrelay.ops.metrics import Metrics
from notifyrelay.pipeline.ingest import IngestQueue
from notifyrelay.pipeline.listener import Listener
from tests.conftest import ClientFactory, Database, RelayFactory, sample, wait_until
from tests.integration.test_listener import Recorder

ROLE = "relay_limited"


@dataclass
class Harness:
    """A listener running as a task, with what it reported and how often it connected."""

    listener: Listener
    queue: IngestQueue
    recorder: Recorder
    metrics: Metrics
    attempts: list[float]
    task: asyncio.Task[None]

    def kinds(self) -> list[str]:
        return [kind for kind, _ in self.recorder.events]


@pytest.fixture
async def start_listener() -> AsyncIterator[Callable[..., Awaitable[Harness]]]:
    """Start listeners (``await start_listener(dsn, channels, **settings)``), each counting its connect calls."""
    running: list[Harness] = []

    async def start(dsn: str, channels: list[str], *, connect: Any = asyncpg.connect, **settings: Any) -> Harness:
        attempts: list[float] = []

        async def counting_connect(*args: Any, **kwargs: Any) -> Any:
            attempts.append(asyncio.get_running_loop().time())
            return await connect(*args, **kwargs)

        values = {"heartbeat_interval_s": 0.2, "heartbeat_timeout_s": 1.0, "reconnect_initial_s": 0.1,
                  "reconnect_max_s": 1.0, **settings}
        queue, recorder, metrics = IngestQueue(1000), Recorder(), Metrics()
        listener = Listener(dsn, channels, ListenerConfig(**values), queue, recorder, metrics, connect=counting_connect)
        recorder.listener = listener
        harness = Harness(listener, queue, recorder, metrics, attempts, asyncio.create_task(listener.run()))
        running.append(harness)
        return harness

    yield start
    for harness in running:
        harness.task.cancel()
        await harness.listener.close()
        await asyncio.gather(harness.task, return_exceptions=True)


def dsn_for(dsn: str, *, user: str | None = None, database: str | None = None) -> str:
    base, _, name = dsn.rpartition("/")
    if user:
        base = base.replace("postgres@", f"{user}@")
    return f"{base}/{database or name}"


async def admin_execute(dsn: str, *statements: str) -> None:
    conn = await asyncpg.connect(dsn)
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


# Item 1: one backoff for every path back to connecting; privilege problems named with their fix.

async def test_revoked_pg_notify_costs_the_listener_nothing(
    start_listener: Callable[..., Awaitable[Harness]], own_database: Database
) -> None:
    """With EXECUTE on pg_notify revoked from the relay's role, the listener comes up once and stays up."""
    await admin_execute(own_database.dsn, f"CREATE ROLE {ROLE} LOGIN",
                        "REVOKE EXECUTE ON FUNCTION pg_notify(text, text) FROM PUBLIC")
    harness = await start_listener(dsn_for(own_database.dsn, user=ROLE), ["a"])
    await wait_until(lambda: harness.listener.up, timeout=5)
    await asyncio.sleep(1.5)  # several heartbeats at 0.2 s
    assert len(harness.attempts) == 1 and harness.kinds() == ["up"]
    await own_database.notify("a", "42")
    await wait_until(lambda: len(harness.queue) == 1)


async def test_revoked_queue_sampling_is_named_with_its_fix_and_not_a_reconnect(
    start_listener: Callable[..., Awaitable[Harness]], own_database: Database
) -> None:
    """Without EXECUTE on pg_notification_queue_usage(), the listener stays up; the log and /readyz give the GRANT."""
    await admin_execute(own_database.dsn, f"CREATE ROLE {ROLE} LOGIN",
                        "REVOKE EXECUTE ON FUNCTION pg_notification_queue_usage() FROM PUBLIC")
    with structlog.testing.capture_logs() as logs:
        harness = await start_listener(dsn_for(own_database.dsn, user=ROLE), ["a"])
        await wait_until(lambda: harness.listener.up, timeout=5)
        await asyncio.sleep(1.5)
    fix = f"GRANT EXECUTE ON FUNCTION pg_notification_queue_usage() TO {ROLE}"
    assert len(harness.attempts) == 1 and harness.kinds() == ["up"]
    refused = [entry for entry in logs if entry["event"] == "listener.queue_sample_refused"]
    assert len(refused) == 1 and refused[0]["fix"] == fix  # once, not once per heartbeat
    report = Readiness(harness.listener).report()
    assert report["ready"] and any(fix in warning for warning in report["warnings"])


async def test_refused_connect_privilege_backs_off_and_readyz_names_the_grant(
    start_listener: Callable[..., Awaitable[Harness]], own_database: Database
) -> None:
    """A role without CONNECT is retried with a growing wait (a handful of attempts in 3 s), and /readyz says what
    to GRANT."""
    await admin_execute(own_database.dsn, f"CREATE ROLE {ROLE} LOGIN",
                        "REVOKE CONNECT ON DATABASE postgres FROM PUBLIC")
    harness = await start_listener(dsn_for(own_database.dsn, user=ROLE), ["a"])
    await asyncio.sleep(3)
    # Equal jitter from 0.1 s doubling to 1 s: at most 9 attempts fit in 3 s (the waits' lower bounds add up).
    assert 3 <= len(harness.attempts) <= 9, len(harness.attempts)
    reasons = Readiness(harness.listener).reasons()
    assert any(f"GRANT CONNECT ON DATABASE postgres TO {ROLE}" in reason for reason in reasons), reasons


@pytest.fixture
async def full_notify_queue(own_database: Database) -> AsyncIterator[Callable[[], Awaitable[None]]]:
    """PostgreSQL's NOTIFY queue really full: 64 pages (512 KiB) instead of 8 GB, held by a session that LISTENs
    inside an open transaction while another fills the queue. Yields a function that releases it."""
    assert own_database.server is not None
    await admin_execute(own_database.dsn, "ALTER SYSTEM SET max_notify_queue_pages = 64")
    await asyncio.to_thread(own_database.server.restart)
    blocker = await asyncpg.connect(own_database.dsn)
    await blocker.execute("LISTEN filler")
    transaction = blocker.transaction()
    await transaction.start()
    await blocker.execute("SELECT 1")
    filler = await asyncpg.connect(own_database.dsn)
    try:
        for n in range(10_000):
            await filler.execute("SELECT pg_notify('filler', repeat('x', 7000) || $1::text)", str(n))
    except asyncpg.ProgramLimitExceededError:
        pass
    assert await filler.fetchval("SELECT pg_notification_queue_usage()") > 0.95
    await filler.close()

    async def release() -> None:
        await transaction.rollback()  # the blocker reads its backlog once idle, and the queue drains

    yield release
    await blocker.close()


async def test_full_notify_queue_is_retried_with_backoff_not_in_a_loop(
    start_listener: Callable[..., Awaitable[Harness]], own_database: Database,
    full_notify_queue: Callable[[], Awaitable[None]],
) -> None:
    """A heartbeat failing right after connecting (NOTIFY queue full) goes through the backoff: a handful of
    attempts in 3 s, not hundreds; once the queue drains the listener comes up."""
    harness = await start_listener(own_database.dsn, ["a"])
    await asyncio.sleep(3)
    assert harness.kinds() == [] and 3 <= len(harness.attempts) <= 9, len(harness.attempts)
    await full_notify_queue()
    await wait_until(lambda: harness.listener.up, timeout=5)


async def test_full_notify_queue_shows_in_the_gauge_and_in_readyz(
    start_listener: Callable[..., Awaitable[Harness]], own_database: Database,
    full_notify_queue: Callable[[], Awaitable[None]],
) -> None:
    """While heartbeats fail because the NOTIFY queue is full, the gauge says 1.0 (sampled on its own query) and
    /readyz says the queue is the reason, with what to do."""
    harness = await start_listener(own_database.dsn, ["a"])
    await wait_until(lambda: len(harness.attempts) >= 2, timeout=5)
    assert sample(harness.metrics, "notifyrelay_pg_notification_queue_usage") > 0.95
    reasons = Readiness(harness.listener).reasons()
    assert any("too many notifications in the NOTIFY queue" in reason for reason in reasons), reasons
    assert any("NOTIFY queue is 100% full" in reason and "transaction open" in reason for reason in reasons), reasons
    await full_notify_queue()
    await wait_until(lambda: harness.listener.up, timeout=5)
    await wait_until(lambda: sample(harness.metrics, "notifyrelay_pg_notification_queue_usage") < 0.5, timeout=5)
    assert Readiness(harness.listener).reasons() == []


# Item 5: one bad payload or one database setting must not resync everyone.

async def test_invalid_utf8_payloads_are_counted_and_dropped_not_fatal(
    start_listener: Callable[..., Awaitable[Harness]], database: Database
) -> None:
    """In a SQL_ASCII database, 21 payloads that are not UTF-8 are counted and dropped; the connection carries on
    and the good notifications around them arrive in order."""
    name = f"ascii_{secrets.token_hex(4)}"
    await admin_execute(database.dsn, f"CREATE DATABASE {name} ENCODING SQL_ASCII TEMPLATE template0 "
                                      "LC_COLLATE 'C' LC_CTYPE 'C'")
    try:
        dsn = dsn_for(database.dsn, database=name)
        harness = await start_listener(dsn, ["a"])
        await wait_until(lambda: harness.listener.up, timeout=5)
        sender = await asyncpg.connect(dsn)
        try:
            await sender.execute("SELECT pg_notify('a', 'before')")
            for n in range(21):
                await sender.execute("SELECT pg_notify('a', convert_from($1::bytea, 'SQL_ASCII'))", b"\xff%d" % n)
            await sender.execute("SELECT pg_notify('a', 'after')")
        finally:
            await sender.close()
        await wait_until(lambda: len(harness.queue) == 2, timeout=5)
        await asyncio.sleep(0.5)  # heartbeats keep passing over the same connection
        assert [payload for _, payload, _ in harness.queue.take_nowait()] == ["before", "after"]
        assert harness.kinds() == ["up"] and len(harness.attempts) == 1
        assert sample(harness.metrics, "notifyrelay_listener_undecodable_payloads_total", channel="a") == 21
    finally:
        await harness.listener.close()
        await admin_execute(database.dsn, f"DROP DATABASE {name} WITH (FORCE)")


async def test_idle_session_timeout_of_the_database_does_not_drop_the_listener(
    start_listener: Callable[..., Awaitable[Harness]], own_database: Database
) -> None:
    """A database-wide idle_session_timeout shorter than the heartbeat interval does not touch the LISTEN session,
    which sets its own (and a statement_timeout for its heartbeat)."""
    await admin_execute(own_database.dsn, "ALTER DATABASE postgres SET idle_session_timeout = '200ms'")
    harness = await start_listener(own_database.dsn, ["a"], heartbeat_interval_s=0.6)
    await wait_until(lambda: harness.listener.up, timeout=5)
    await asyncio.sleep(2)
    assert harness.kinds() == ["up"] and len(harness.attempts) == 1
    async with harness.listener._lock:
        conn = harness.listener._conn
        assert await conn.fetchval("SHOW idle_session_timeout") == "0"
        assert await conn.fetchval("SHOW statement_timeout") == "5s"


# Item 9: no exception from the driver ends the listener.

class Injected(asyncpg.InternalClientError):  # type: ignore[misc]
    """Stands for asyncpg's 'cannot switch to state 12' after a fast restart."""


class FlakyConnection:
    """A real asyncpg connection whose Nth awaited call (counted across connections) raises an unexpected error."""

    calls = 0

    def __init__(self, conn: Any, fail_at: int, error: BaseException) -> None:
        self._conn = conn
        self._fail_at = fail_at
        self._error = error

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._conn, name)
        if name not in {"execute", "fetchval", "fetchrow", "add_listener", "remove_listener"}:
            return attribute

        async def call(*args: Any, **kwargs: Any) -> Any:
            FlakyConnection.calls += 1
            if FlakyConnection.calls == self._fail_at:
                raise self._error
            return await attribute(*args, **kwargs)

        return call

    def add_termination_listener(self, callback: Callable[[Any], None]) -> None:
        self._conn.add_termination_listener(lambda _conn: callback(self))


AWAITS = ["settings", "queue sample", "LISTEN heartbeat", "LISTEN a", "first heartbeat", "supervised sample",
          "supervised heartbeat"]


@pytest.mark.parametrize("error", [Injected("cannot switch to state 12"), RuntimeError("surprise")],
                         ids=["InternalClientError", "RuntimeError"])
@pytest.mark.parametrize("fail_at", range(len(AWAITS) + 1), ids=["connect", *AWAITS])
async def test_an_unexpected_error_at_any_await_becomes_a_reconnect(
    start_listener: Callable[..., Awaitable[Harness]], database: Database, fail_at: int, error: BaseException
) -> None:
    """An unexpected exception at any await of the listener is logged once with its traceback and becomes a
    reconnect (down, then up again to the observer if it had been up); the listener keeps running."""
    FlakyConnection.calls = 0
    connects = 0

    async def flaky_connect(*args: Any, **kwargs: Any) -> Any:
        nonlocal connects
        connects += 1
        if fail_at == 0 and connects == 1:
            raise error
        return FlakyConnection(await asyncpg.connect(*args, **kwargs), fail_at, error)

    with structlog.testing.capture_logs() as logs:
        harness = await start_listener(database.dsn, ["a"], connect=flaky_connect)
        await wait_until(lambda: harness.listener.up and len(harness.attempts) == 2, timeout=5)
    assert not harness.task.done()
    was_up_first = fail_at > AWAITS.index("first heartbeat") + 1
    assert harness.kinds() == (["up", "down", "up"] if was_up_first else ["up"])
    unexpected = [entry for entry in logs if entry["event"] == "listener.unexpected_error"]
    assert len(unexpected) == 1 and unexpected[0]["exc_info"] is error
    assert sample(harness.metrics, "notifyrelay_listener_unexpected_errors_total") == 1
    await database.notify("a", "still listening")
    await wait_until(lambda: len(harness.queue) == 1)


async def test_an_unexpected_error_during_a_reload_becomes_a_reconnect(
    start_listener: Callable[..., Awaitable[Harness]], database: Database
) -> None:
    """An unexpected exception from the LISTEN of a reload (SIGHUP) replaces the connection, which then listens on
    the new channel list; the listener keeps running."""
    FlakyConnection.calls = 0
    fail_at = len(AWAITS) + 100  # far past the first connection's awaits; set below to the reload's LISTEN

    async def flaky_connect(*args: Any, **kwargs: Any) -> Any:
        return FlakyConnection(await asyncpg.connect(*args, **kwargs), fail_at, Injected("cannot switch to state 12"))

    harness = await start_listener(database.dsn, ["a"], connect=flaky_connect, heartbeat_interval_s=5.0)
    await wait_until(lambda: harness.listener.up, timeout=5)
    harness.listener._conn._fail_at = FlakyConnection.calls + 1  # the next awaited call: the reload's LISTEN b
    await harness.listener.set_channels(["a", "b"])
    await wait_until(lambda: harness.kinds() == ["up", "down", "up"], timeout=5)
    assert not harness.task.done() and len(harness.attempts) == 2
    await database.notify("b", "new channel")
    await wait_until(lambda: len(harness.queue) == 1)


async def test_clients_see_status_and_resync_when_an_unexpected_error_hits_the_listener(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """End to end: an unexpected exception inside the running listener reaches clients as status down, resync
    (listener_reconnected), status up, and delivery resumes; the relay keeps running."""
    relay = await make_relay()
    client = await make_client(relay, "?channel=activity_progress")
    await client.recv_type("ack")
    listener = relay.listener
    sample_queue = listener._sample_queue

    async def fail_once(conn: Any) -> None:
        del listener._sample_queue  # back to the real method for every later call
        raise Injected("cannot switch to state 12")

    listener._sample_queue = fail_once  # type: ignore[method-assign]  # the next supervised heartbeat
    assert (await client.recv_type("status"))["listener"] == "down"
    resync = await client.recv_type("resync")
    assert resync["reason"] == "listener_reconnected" and resync["channel"] == "activity_progress"
    assert (await client.recv_type("status"))["listener"] == "up"
    assert listener._sample_queue == sample_queue
    assert sample(relay.metrics, "notifyrelay_listener_unexpected_errors_total") == 1
    await database.notify("activity_progress", "42")
    assert (await client.recv_type("notify"))["keys"] == ["42"]
