"""The listener against a real PostgreSQL: reloads racing connection setup and heartbeats, gap bookkeeping."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

import asyncpg
import pytest
import structlog

from notifyrelay.config import ListenerConfig
from notifyrelay.ops.metrics import Metrics
from notifyrelay.pipeline import listener as listener_module
from notifyrelay.pipeline.ingest import IngestQueue
from notifyrelay.pipeline.listener import InlineNotifyConnection, Listener
from tests.conftest import Database, wait_until


class Recorder:
    """A ListenerObserver that remembers what it was told, and the heartbeat time at each 'up'."""

    def __init__(self) -> None:
        self.events: list[tuple[str, Any]] = []
        self.listener: Listener | None = None

    def listener_down(self) -> None:
        self.events.append(("down", None))

    def listener_up(self, channels: list[str], gap_start: datetime, gap_end: datetime, reason: str) -> None:
        assert self.listener is not None
        self.events.append(("up", (reason, self.listener.last_heartbeat)))


def make_listener(dsn: str, channels: list[str], **settings: Any) -> tuple[Listener, IngestQueue, Recorder]:
    queue = IngestQueue(1000)
    recorder = Recorder()
    connect = settings.pop("connect", asyncpg.connect)
    config = ListenerConfig(heartbeat_interval_s=settings.pop("interval", 1.0), heartbeat_timeout_s=1.0,
                            reconnect_max_s=0.2, **settings)
    listener = Listener(dsn, channels, config, queue, recorder, Metrics(), connect=connect)
    recorder.listener = listener
    return listener, queue, recorder


async def received_channels(queue: IngestQueue, seconds: float = 0.5) -> set[str]:
    await asyncio.sleep(seconds)
    return {channel for channel, _, _ in queue.take_nowait()}


async def test_reload_during_connection_setup_listens_on_the_new_list(database: Database) -> None:
    """A channel list changed while the connection is LISTENing is honoured before the listener reports up."""
    listener: Listener | None = None

    class ReloadMidway(InlineNotifyConnection):
        async def add_listener(self, channel: str, callback: Any) -> None:
            await super().add_listener(channel, callback)
            if channel == "a" and listener is not None and "new" not in listener.channels:
                # A SIGHUP landing between two LISTENs of the first connection.
                asyncio.get_running_loop().create_task(listener.set_channels(["a", "new"]))
                await asyncio.sleep(0.05)

    async def connect(*args: Any, **kwargs: Any) -> Any:
        return await asyncpg.connect(*args, **{**kwargs, "connection_class": ReloadMidway})

    listener, queue, _ = make_listener(database.dsn, ["a", "old"], connect=connect)
    task = asyncio.create_task(listener.run())
    try:
        await wait_until(lambda: listener.up, timeout=10)
        await asyncio.sleep(0.2)
        await database.notify("new", "1")
        await database.notify("old", "1")
        await database.notify("a", "1")
        assert await received_channels(queue) == {"a", "new"}
    finally:
        task.cancel()
        await listener.close()


async def test_reloads_do_not_collide_with_heartbeats(database: Database) -> None:
    """Many reloads while heartbeats run every 50 ms never make the listener drop its connection."""
    listener, queue, recorder = make_listener(database.dsn, ["a"], interval=0.05)
    task = asyncio.create_task(listener.run())
    try:
        await wait_until(lambda: listener.up, timeout=10)
        for n in range(100):
            await listener.set_channels(["a", "b"] if n % 2 == 0 else ["a"])
            await asyncio.sleep(0.003)
        assert [kind for kind, _ in recorder.events] == ["up"]
        await listener.set_channels(["a", "b"])
        await database.notify("b", "1")
        assert await received_channels(queue) == {"b"}
    finally:
        task.cancel()
        await listener.close()


async def test_up_is_reported_only_after_a_heartbeat_came_back(database: Database) -> None:
    """When the listener reports up, a heartbeat has just proven it receives (so /readyz is not stale)."""
    listener, _, recorder = make_listener(database.dsn, ["a"])
    task = asyncio.create_task(listener.run())
    try:
        await wait_until(lambda: bool(recorder.events), timeout=10)
        kind, (reason, last_heartbeat) = recorder.events[0]
        assert (kind, reason) == ("up", "listener_started") and last_heartbeat is not None
    finally:
        task.cancel()
        await listener.close()


async def test_notifications_while_reconnecting_do_not_count_as_proof(database: Database) -> None:
    """Only notifications received while up move gap_start: those on a connection still LISTENing do not."""
    listener, queue, _ = make_listener(database.dsn, ["a"])
    proof = listener._last_proof
    listener._on_notification(None, 0, "a", "1")  # as asyncpg would, before the listener is up
    assert listener._last_proof == proof and len(queue) == 1
    listener.up = True
    listener._on_notification(None, 0, "a", "2")
    assert listener._last_proof > proof


async def test_notifications_reach_the_queue_inline_and_in_order(database: Database) -> None:
    """The connection hands each notification to the queue as asyncpg parses it (no call_soon), in commit order."""
    listener, queue, _ = make_listener(database.dsn, ["a"])
    task = asyncio.create_task(listener.run())
    try:
        await wait_until(lambda: listener.up, timeout=10)
        assert type(listener._conn) is InlineNotifyConnection
        listener._conn._process_notification(0, "a", "parsed")  # as asyncpg's protocol calls it
        assert [payload for _, payload, _ in queue.take_nowait()] == ["parsed"]  # queued already: no loop turn
        await database.notify("a", *(str(n) for n in range(300)))
        await wait_until(lambda: len(queue) == 300, timeout=5)
        assert [payload for _, payload, _ in queue.take_nowait()] == [str(n) for n in range(300)]
    finally:
        task.cancel()
        await listener.close()


async def test_a_callback_that_raises_costs_neither_the_connection_nor_the_notification(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Callbacks now run inside asyncpg's protocol: one that raises is logged there (once per interval, not once per
    notification), and the LISTEN carries on."""
    monkeypatch.setattr(InlineNotifyConnection, "_failures_logged_at", float("-inf"))
    listener, queue, recorder = make_listener(database.dsn, ["a"])
    task = asyncio.create_task(listener.run())

    def broken(conn: Any, pid: int, channel: str, payload: str) -> None:
        raise RuntimeError("a bug in a callback")

    try:
        await wait_until(lambda: listener.up, timeout=10)
        await listener._conn.add_listener("a", broken)  # "a" is LISTENed already: no query
        with structlog.testing.capture_logs() as logs:
            await database.notify("a", "1")
            await database.notify("a", "2")
            await wait_until(lambda: len(queue) == 2, timeout=5)
        assert [payload for _, payload, _ in queue.take_nowait()] == ["1", "2"]
        assert [entry["event"] for entry in logs] == ["listener.notification_callback_failed"]  # then quiet
        await asyncio.sleep(0.1)
        assert listener.up and [kind for kind, _ in recorder.events] == ["up"]
    finally:
        task.cancel()
        await listener.close()


async def test_without_the_private_hook_the_listener_connects_as_before(
    database: Database, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An asyncpg whose private hook changed gets asyncpg's own connection class (call_soon), and still delivers."""
    monkeypatch.setattr(listener_module, "INLINE_NOTIFY", False)
    options: list[dict[str, Any]] = []

    async def connect(*args: Any, **kwargs: Any) -> Any:
        options.append(kwargs)
        return await asyncpg.connect(*args, **kwargs)

    with structlog.testing.capture_logs() as logs:
        listener, queue, _ = make_listener(database.dsn, ["a"], connect=connect)
        task = asyncio.create_task(listener.run())
        try:
            await wait_until(lambda: listener.up, timeout=10)
            assert "connection_class" not in options[0] and type(listener._conn) is asyncpg.Connection
            await database.notify("a", "1", "2")
            await wait_until(lambda: len(queue) == 2, timeout=5)
            assert [payload for _, payload, _ in queue.take_nowait()] == ["1", "2"]
        finally:
            task.cancel()
            await listener.close()
    assert "listener.inline_notify_unavailable" in [entry["event"] for entry in logs]
