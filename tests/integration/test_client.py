"""notifyrelay.client against live relays: state, resume through a relay restart, a database outage, refusals."""

from __future__ import annotations

import asyncio
import secrets
import socket
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import asyncpg
import jwt
import pytest

from notifyrelay.client import Event, RelayClient, RelayRefused, url_hint
from notifyrelay.pgembed import free_port
from tests.conftest import Database, RelayFactory, wait_until

HINT = "activity_progress"


class Jobs:
    """A table of this test's own whose changes are NOTIFYed on a channel of the same name, keyed by id."""

    def __init__(self, dsn: str) -> None:
        self.dsn = dsn
        self.name = f"jobs_{secrets.token_hex(4)}"

    async def create(self) -> Jobs:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(f"""
                CREATE OR REPLACE FUNCTION {self.name}_notify() RETURNS trigger LANGUAGE plpgsql AS $$
                BEGIN PERFORM pg_notify(TG_TABLE_NAME, NEW.id::text); RETURN NULL; END $$;
                CREATE TABLE {self.name} (id int PRIMARY KEY, status text NOT NULL DEFAULT 'queued',
                                          done int NOT NULL DEFAULT 0, total int, message text);
                CREATE TRIGGER notify AFTER INSERT OR UPDATE ON {self.name} FOR EACH ROW
                    EXECUTE FUNCTION {self.name}_notify();
            """)
        finally:
            await conn.close()
        return self

    async def set(self, key: int, status: str, done: int, total: int | None, message: str = "") -> None:
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(
                f"INSERT INTO {self.name} (id, status, done, total, message) VALUES ($1, $2, $3, $4, $5) "
                "ON CONFLICT (id) DO UPDATE SET status = $2, done = $3, total = $4, message = $5",
                key, status, done, total, message,
            )
        finally:
            await conn.close()

    def channel(self) -> dict[str, Any]:
        """The relay's configuration of this table as a state channel with progress."""
        return {
            "name": self.name,
            "state": {
                "table": self.name, "key_column": "id", "columns": ["status", "done", "total", "message"],
                "list_query": f"SELECT id::text AS key, status, done, total, message FROM {self.name} "
                              "WHERE status NOT IN ('complete', 'failed')",
            },
            "progress": {"done": "done", "total": "total", "status": "status",
                         "terminal": ["complete", "failed"], "failed": ["failed"]},
        }


@pytest.fixture
async def jobs(database: Database) -> Jobs:
    return await Jobs(database.dsn).create()


@pytest.fixture
async def clients() -> AsyncIterator[Callable[..., RelayClient]]:
    """Make RelayClients (fast backoff for tests); each is closed at the end of the test."""
    made: list[RelayClient] = []

    def make(url: str, **kwargs: Any) -> RelayClient:
        kwargs.setdefault("backoff_initial_s", 0.05)
        kwargs.setdefault("backoff_max_s", 0.3)
        client = RelayClient(url, **kwargs)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.__aexit__(None, None, None)


async def port_released(port: int) -> None:
    """Wait until a stopped relay has closed its listening socket, so that another may bind the port."""

    def free() -> bool:
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                return False
            return True

    await wait_until(free, timeout=10)


async def until(client: RelayClient, predicate: Callable[[Event], bool], timeout: float = 10) -> Event:
    """The first event (from now) for which ``predicate`` holds."""
    async with asyncio.timeout(timeout):
        async for event in client:
            if predicate(event):
                return event
    raise AssertionError("the client stopped before the event came")


async def test_applies_snapshot_rows_and_progress_of_a_state_channel(
    make_relay: RelayFactory, clients: Callable[..., RelayClient], jobs: Jobs
) -> None:
    """A followed key's row and progress arrive in a snapshot on subscribe and follow every update into state."""
    await jobs.set(1, "running", 10, 100, "copying")
    relay = await make_relay(channels=[jobs.channel()])
    client = clients(relay.server.url, follow={jobs.name: ["1"]})
    await until(client, lambda e: e.type == "snapshot" and e.keys == ("1",))
    state = client.state[jobs.name]["1"]
    assert state.row is not None and state.row["message"] == "copying"
    assert state.progress is not None and (state.progress.done, state.progress.total) == (10, 100)
    assert state.progress.percent == pytest.approx(10.0) and not state.progress.terminal
    await jobs.set(1, "running", 50, 100, "copying")
    await until(client, lambda e: e.type == "notify" and "1" in e.keys)
    assert client.state[jobs.name]["1"].progress.done == 50  # type: ignore[union-attr]
    await jobs.set(1, "failed", 60, 100, "disk full")
    await until(client, lambda e: e.type == "notify" and "1" in e.keys)
    progress = client.state[jobs.name]["1"].progress
    assert progress is not None and progress.terminal and progress.failed and progress.status == "failed"


async def test_star_follower_starts_from_the_list_query(
    make_relay: RelayFactory, clients: Callable[..., RelayClient], jobs: Jobs
) -> None:
    """Following "*" fills the state with list_query's active keys, then adds keys as they appear."""
    await jobs.set(1, "running", 1, None)
    await jobs.set(2, "complete", 5, 5)
    relay = await make_relay(channels=[jobs.channel()])
    client = clients(relay.server.url, follow={jobs.name: ["*"]})
    await until(client, lambda e: e.type == "snapshot")
    assert set(client.state[jobs.name]) == {"1"}
    assert client.state[jobs.name]["1"].progress.total is None  # type: ignore[union-attr]  # indeterminate
    await jobs.set(3, "queued", 0, 10)
    await until(client, lambda e: e.type == "notify" and "3" in e.keys)
    assert set(client.state[jobs.name]) == {"1", "3"}


async def test_resumes_through_a_relay_restart_with_what_changed_meanwhile(
    make_relay: RelayFactory, clients: Callable[..., RelayClient], jobs: Jobs
) -> None:
    """Stopped and replaced by a relay on the same port, the client reconnects, resumes with since, and its state
    shows the change made while no relay ran; a hint channel is told to refetch."""
    await jobs.set(7, "running", 1, 10)
    channels = [jobs.channel(), {"name": HINT}]
    first = await make_relay(channels=channels)
    port = first.server.port
    client = clients(first.server.url, follow={jobs.name: ["7"], HINT: ["42"]})
    await until(client, lambda e: e.type == "snapshot")
    before = client.positions[jobs.name]
    first_instance = client.instance
    first.request_stop()
    await until(client, lambda e: e.type == "disconnected")
    assert not client.live
    await jobs.set(7, "running", 6, 10)  # while no relay is listening
    await port_released(port)
    await make_relay(channels=channels, **{"server.listen": f"127.0.0.1:{port}"})
    resyncs: list[Event] = []

    def caught_up(event: Event) -> bool:
        resyncs.extend([event] if event.type == "resync" else [])
        progress = client.state[jobs.name]["7"].progress
        return bool(resyncs) and progress is not None and progress.done == 6

    await until(client, caught_up)
    assert [(e.channel, e.refetch, e.keys) for e in resyncs] == [(HINT, True, ("42",))]
    # Resumed with a position the new relay cannot replay from (or before its listener was up).
    assert resyncs[0].frame["reason"] in ("history_gap", "listener_started")
    assert client.instance != first_instance and client.reconnects >= 1 and client.live
    assert client.positions[jobs.name] >= before


async def test_reconnect_with_no_resume_position_asks_to_refetch(
    make_relay: RelayFactory, clients: Callable[..., RelayClient]
) -> None:
    """A hint channel that never carried a frame has no position to resume from: after a relay restart the client
    itself yields a refetch for what it follows there, since the relay cannot know what was missed."""
    first = await make_relay()
    port = first.server.port
    client = clients(first.server.url, follow={HINT: ["42", "43"]})
    await until(client, lambda e: e.type == "ack")
    first.request_stop()
    await until(client, lambda e: e.type == "disconnected")
    # The client reconnects only as it is iterated: the new relay is listening before it comes back.
    await port_released(port)
    await make_relay(**{"server.listen": f"127.0.0.1:{port}"})
    resync = await until(client, lambda e: e.type == "resync")
    assert (resync.channel, resync.keys, resync.refetch) == (HINT, ("42", "43"), True)
    assert "no resume position" in resync.detail and not resync.frame


async def test_database_outage_polls_meanwhile_and_refetches_after(
    make_relay: RelayFactory, clients: Callable[..., RelayClient], own_database: Database
) -> None:
    """While PostgreSQL is down the client is not live and yields poll events; once it is back, a resync asks to
    refetch, the client is live again, polls stop and notifications flow."""
    assert own_database.server is not None
    relay = await make_relay(dsn=own_database.dsn)
    client = clients(relay.server.url, follow={HINT: ["42"]}, poll_interval_s=0.1)
    await until(client, lambda e: e.type == "ack")
    assert client.live
    await asyncio.to_thread(own_database.server.stop, "fast")
    await until(client, lambda e: e.type == "status" and e.frame["listener"] == "down")
    assert not client.live
    polls = 0
    async with asyncio.timeout(5):
        async for event in client:
            polls += event.type == "poll"
            if polls == 2:
                break
    await asyncio.to_thread(own_database.server.start)
    resync = await until(client, lambda e: e.type == "resync", timeout=15)
    assert resync.refetch and resync.keys == ("42",) and resync.frame["reason"] == "listener_reconnected"
    await until(client, lambda e: e.type == "status" and e.frame["listener"] == "up")
    assert client.live
    await own_database.notify(HINT, "42")
    seen = await until(client, lambda e: e.type in ("notify", "poll"))
    assert seen.type == "notify" and seen.keys == ("42",)


async def test_unknown_channel_is_refused_with_the_relays_sentence(
    make_relay: RelayFactory, clients: Callable[..., RelayClient]
) -> None:
    """A subscribe to a channel the relay does not relay raises RelayRefused with code and sentence."""
    relay = await make_relay()
    client = clients(relay.server.url, follow={"no_such_channel": ["*"]})
    with pytest.raises(RelayRefused) as refused:
        await until(client, lambda e: False)
    assert refused.value.code == "unknown_channel" and refused.value.channel == "no_such_channel"
    assert "no_such_channel" in refused.value.message


async def test_forbidden_key_and_bad_token_are_refused(
    make_relay: RelayFactory, clients: Callable[..., RelayClient], tmp_path: Path
) -> None:
    """In auth mode jwt, a key outside the token's claim raises forbidden; a token that is not accepted, 401."""
    secret = "client-test secret, at least thirty-two bytes long"
    (tmp_path / "secret").write_text(secret)
    relay = await make_relay(**{"auth.mode": "jwt", "auth.jwt_secret_file": str(tmp_path / "secret")})
    token = jwt.encode({"sub": "t", "exp": int(time.time()) + 60, "channels": {HINT: ["42"]}}, secret, "HS256")
    allowed = clients(relay.server.url, follow={HINT: ["42"]}, token=token)
    await until(allowed, lambda e: e.type == "ack")
    forbidden = clients(relay.server.url, follow={HINT: ["43"]}, token=token)
    with pytest.raises(RelayRefused) as refused:
        await until(forbidden, lambda e: False)
    assert refused.value.code == "forbidden" and refused.value.message
    stranger = clients(relay.server.url, follow={HINT: ["42"]}, token=token + "x")
    with pytest.raises(RelayRefused) as refused:
        await until(stranger, lambda e: False)
    assert refused.value.message.startswith("HTTP 401")


async def test_unreachable_relay_is_retried_with_capped_jittered_backoff(clients: Callable[..., RelayClient]) -> None:
    """With nothing listening, the client retries forever with delays under the exponential cap, polls meanwhile,
    and close() ends the iteration."""
    client = clients(f"ws://127.0.0.1:{free_port()}/ws", follow={HINT: ["*"]}, poll_interval_s=0.05,
                     backoff_initial_s=0.01, backoff_max_s=0.08)
    delays: list[float] = []
    polls = 0
    async with asyncio.timeout(10):
        async for event in client:
            if event.type == "disconnected":
                assert event.retry_in_s is not None
                delays.append(event.retry_in_s)
            polls += event.type == "poll"
            if len(delays) == 6:
                break
    caps = [min(0.08, 0.01 * 2**attempt) for attempt in range(6)]
    assert all(0 <= delay <= cap for delay, cap in zip(delays, caps, strict=True)), delays
    assert polls >= 1 and client.connection == "backoff"
    await client.close()
    async with asyncio.timeout(5):
        assert [event async for event in client if event.type not in ("poll", "disconnected")] == []
    assert client.connection == "closed"


async def test_cancelled_wait_loses_no_event(
    make_relay: RelayFactory, clients: Callable[..., RelayClient], database: Database
) -> None:
    """A caller that gives up waiting for the next event (a timeout) can iterate again and gets every event."""
    relay = await make_relay(**{"coalesce.window_ms": 0})
    client = clients(relay.server.url, follow={HINT: ["42"]})
    await until(client, lambda e: e.type == "ack")
    with pytest.raises(TimeoutError):
        async with asyncio.timeout(0.2):
            await anext(client)
    await database.notify(HINT, "42")
    assert (await until(client, lambda e: True)).keys == ("42",)


def test_url_hint_names_the_websocket_url() -> None:
    """A page, probe or bare host URL gets the relay's websocket URL as a hint; a right one gets none."""
    assert url_hint("http://relay:8765") == "ws://relay:8765/ws"
    assert url_hint("https://relay/ui") == "wss://relay/ws"
    assert url_hint("ws://relay:8765/") == "ws://relay:8765/ws"
    assert url_hint("http://relay:8765/ws") == "ws://relay:8765/ws"
    assert url_hint("ws://relay:8765/ws") is None
    assert url_hint("not a url") is None
    # A path of a reverse proxy's own may well lead to /ws: only a 404 makes the guess worth saying.
    assert url_hint("wss://example.com/live") is None
    assert url_hint("wss://example.com/live", certain=False) == "wss://example.com/live/ws"
