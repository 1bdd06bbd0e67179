"""Shared fixtures: a real PostgreSQL (embedded, or NOTIFYRELAY_TEST_DSN), relays on port 0, websocket clients."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import TYPE_CHECKING, Any

import asyncpg
import msgspec
import pytest
from websockets.asyncio.client import ClientConnection, connect

from notifyrelay.app import Relay
from notifyrelay.config import load_config
from notifyrelay.pgembed import EmbeddedPostgres

if TYPE_CHECKING:
    from tests.daemon import Daemon


class Database:
    """A PostgreSQL to test against; ``server`` is None when it came from NOTIFYRELAY_TEST_DSN."""

    def __init__(self, dsn: str, server: EmbeddedPostgres | None) -> None:
        self.dsn = dsn
        self.server = server

    async def notify(self, channel: str, *payloads: str) -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            for payload in payloads:
                await conn.execute("SELECT pg_notify($1, $2)", channel, payload)
        finally:
            await conn.close()


@pytest.fixture(scope="session")
def database() -> Iterator[Database]:
    dsn = os.environ.get("NOTIFYRELAY_TEST_DSN")
    if dsn:
        yield Database(dsn, None)
        return
    with EmbeddedPostgres() as server:
        yield Database(server.dsn, server)


@pytest.fixture
def own_database() -> Iterator[Database]:
    """A PostgreSQL of this test's own, which it may stop and restart."""
    with EmbeddedPostgres() as server:
        yield Database(server.dsn, server)


def relay_config(dsn: str, **overrides: Any) -> Any:
    """A validated Config for tests: loopback port 0, fast heartbeats, one channel unless told otherwise."""
    values: dict[str, Any] = {
        "dsn": dsn,
        "server.listen": "127.0.0.1:0",
        "listener.heartbeat_interval_s": 1.0,
        "listener.heartbeat_timeout_s": 1.0,
        "listener.reconnect_max_s": 0.5,
        "shutdown.timeout_s": 5.0,
        "channels": [{"name": "activity_progress"}],
    }
    values.update(overrides)
    return load_config(None, environ={}, overrides=values)


RelayFactory = Callable[..., Awaitable[Relay]]


@pytest.fixture
async def make_relay(database: Database) -> AsyncIterator[RelayFactory]:
    """Start relays (``await make_relay(**overrides)``); each is stopped at the end of the test."""
    running: list[tuple[Relay, asyncio.Task[None]]] = []

    async def start(*, dsn: str | None = None, wait_ready: bool = True, **overrides: Any) -> Relay:
        relay = Relay(relay_config(database.dsn if dsn is None else dsn, **overrides))
        task = asyncio.create_task(relay.run())
        running.append((relay, task))
        await asyncio.wait_for(relay.started.wait(), 10)
        if wait_ready:
            await wait_until(lambda: relay.hub.listener_is_up, timeout=10)
        return relay

    yield start
    for relay, task in running:
        relay.request_stop()
        await asyncio.wait_for(task, 15)


async def wait_until(predicate: Callable[[], bool], *, timeout: float = 5.0, interval: float = 0.02) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(interval)


class Client:
    """A real websocket client with helpers to read JSON frames."""

    def __init__(self, connection: ClientConnection) -> None:
        self.connection = connection

    async def send(self, frame: dict[str, Any] | str) -> None:
        await self.connection.send(frame if isinstance(frame, str) else msgspec.json.encode(frame).decode())

    async def recv(self, timeout: float = 5.0) -> dict[str, Any]:
        message = await asyncio.wait_for(self.connection.recv(), timeout)
        frame: dict[str, Any] = msgspec.json.decode(message)
        return frame

    async def recv_type(self, kind: str, timeout: float = 5.0) -> dict[str, Any]:
        """Skip frames until one of type ``kind`` arrives."""
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv(timeout)
                if frame["type"] == kind:
                    return frame

    async def frames_for(self, seconds: float) -> list[dict[str, Any]]:
        """Every frame that arrives within ``seconds``."""
        frames: list[dict[str, Any]] = []
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        while (left := deadline - loop.time()) > 0:
            try:
                frames.append(await self.recv(left))
            except TimeoutError:
                break
        return frames

    async def subscribe(self, channel: str, keys: list[str], request_id: str | None = None) -> dict[str, Any]:
        frame: dict[str, Any] = {"op": "subscribe", "channel": channel, "keys": keys}
        if request_id:
            frame["id"] = request_id
        await self.send(frame)
        return await self.recv()


ClientFactory = Callable[..., Awaitable[Client]]


@pytest.fixture
async def make_client() -> AsyncIterator[ClientFactory]:
    """Connect real websocket clients (``await make_client(relay, query="?channel=x")``); the welcome is read."""
    clients: list[Client] = []

    async def open_client(relay: Relay, query: str = "", **kwargs: Any) -> Client:
        connection = await connect(relay.server.url + query, **kwargs)
        client = Client(connection)
        clients.append(client)
        welcome = await client.recv()
        assert welcome["type"] == "welcome", welcome
        return client

    yield open_client
    for client in clients:
        await client.connection.close()


def sample(metrics: Any, name: str, **labels: str) -> float:
    """A metric's value read through the registry's public API (0 before its first sample)."""
    value = metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else float(value)


@pytest.fixture
async def daemons() -> AsyncIterator[list[Daemon]]:
    """Relay processes a test started (tests/daemon.py); any still running at the end is killed."""
    running: list[Daemon] = []
    yield running
    for daemon in running:
        if daemon.process.returncode is None:
            daemon.process.kill()
            await daemon.process.wait()
