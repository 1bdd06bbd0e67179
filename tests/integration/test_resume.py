"""Resume end to end: ``since=``, ``Last-Event-ID`` and ``"since"`` in a subscribe give back what changed while a
client was away (a replay), or say that this process cannot vouch for it (``history_gap``), on one relay process
or from one to another on the same database."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import asyncpg
import httpx
import pytest
from httpx_sse import aconnect_sse

from notifyrelay.app import Relay
from notifyrelay.pipeline.history import ChannelHistory
from tests.conftest import ClientFactory, Database, RelayFactory, wait_until
from tests.integration.stream_client import StreamClient, path_of

CHANNEL = "activity_progress"
TRANSPORTS = pytest.mark.parametrize("transport", ["websocket", "sse", "ndjson"])

Follow = Callable[..., Awaitable["Follower"]]


class Follower:
    """One client on any transport, subscribed by its URL: the frames after its opening (welcome and ack)."""

    def __init__(self, transport: str, next_frame: Callable[[float], Awaitable[dict[str, Any] | None]],
                 event_ids: list[str | None]) -> None:
        self.transport = transport
        self._next = next_frame
        self.event_ids = event_ids  # SSE: the id: line of each frame returned, in order

    async def next(self, timeout: float = 5.0) -> dict[str, Any]:
        """The next frame that is not a keepalive."""
        while True:
            frame = await self._next(timeout)
            if frame is not None:
                return frame

    async def frames_for(self, seconds: float) -> list[dict[str, Any]]:
        frames = []
        try:
            while True:
                frames.append(await self.next(seconds))
        except TimeoutError:
            return frames


@pytest.fixture
async def follow(make_client: ClientFactory) -> AsyncIterator[Follow]:
    """Open a follower (``await follow(relay, transport, query, headers)``) past its opening; closed at the end."""
    streams: list[StreamClient] = []

    async def open_one(relay: Relay, transport: str, query: str, headers: dict[str, str] | None = None,
                       ) -> Follower:
        if transport == "websocket":
            client = await make_client(relay, query, additional_headers=headers)
            assert (await client.recv())["type"] == "ack"

            async def next_ws(timeout: float) -> dict[str, Any] | None:
                return await client.recv(timeout)

            return Follower(transport, next_ws, [])
        stream = await StreamClient.open(relay, path_of(transport) + query, headers)
        streams.append(stream)
        assert stream.status == 200, stream.body
        await stream.opening()
        ids: list[str | None] = []

        async def next_item(timeout: float) -> dict[str, Any] | None:
            item = await stream.next(timeout)
            if item.frame is None or item.kind == "keepalive":
                return None
            ids.append(item.event_id)
            return item.frame

        return Follower(transport, next_item, ids)

    yield open_one
    for stream in streams:
        await stream.close()


async def last_ts(follower: Follower, database: Database, key: str) -> int:
    """Notify ``key`` and return the ts of the frame that brings it: the client's resume position."""
    await database.notify(CHANNEL, key)
    frame = await follower.next()
    assert frame["type"] == "notify" and frame["keys"] == [key], frame
    ts: int = frame["ts"]
    return ts


async def seen(follower: Follower, *keys: str) -> None:
    """Read until every key has arrived: the relay has taken those notifications (database.notify returns at
    commit, before the relay hears of them)."""
    missing = set(keys)
    while missing:
        frame = await follower.next()
        missing.difference_update(frame.get("keys", ()))


def after(position_key: str, keys: list[str]) -> list[str]:
    """A replay's keys without the key of the resume position itself: batches within one millisecond share a ts, so
    a replay from TS may repeat what changed at TS (a superset, never a loss)."""
    return [key for key in keys if key != position_key]


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds")


@TRANSPORTS
async def test_since_replays_what_changed_while_away(
    transport: str, make_relay: RelayFactory, database: Database, follow: Follow,
) -> None:
    """A client back with since=TS first gets one notify with "replay": true folding exactly the followed keys that
    changed after TS (overlap 0; the key it saw at TS may repeat), then live frames."""
    relay = await make_relay(**{"coalesce.window_ms": 0, "history.overlap_ms": 0})
    query = f"?channel={CHANNEL}&key=a&key=b&key=c"
    first = await follow(relay, transport, query)
    since = await last_ts(first, database, "a")
    await database.notify(CHANNEL, "b", "x", "c", "b")  # while it is away; x is not followed
    assert [(await first.next())["keys"] for _ in range(3)] == [["b"], ["c"], ["b"]]  # the relay has them all
    back = await follow(relay, transport, f"{query}&since={since}")
    replay = await back.next()
    assert replay["type"] == "notify" and replay.get("replay") is True, replay
    assert after("a", replay["keys"]) == ["c", "b"]  # oldest change first; b changed last
    assert replay["ts"] > since
    if transport == "sse":
        assert back.event_ids[-1] == str(replay["ts"])
    await database.notify(CHANNEL, "a")
    live = await back.next()
    assert (live["keys"], "replay" in live) == (["a"], False)
    assert live["ts"] >= replay["ts"]


@TRANSPORTS
async def test_default_overlap_replays_a_superset(
    transport: str, make_relay: RelayFactory, database: Database, follow: Follow,
) -> None:
    """With an overlap a replay may repeat keys the client saw just before TS, never miss one."""
    relay = await make_relay(**{"coalesce.window_ms": 0, "history.overlap_ms": 300})
    await asyncio.sleep(0.35)  # the relay must have been listening since TS - overlap to vouch for the span
    query = f"?channel={CHANNEL}&key=a&key=b&key=c"
    first = await follow(relay, transport, query)
    since = await last_ts(first, database, "a")
    await database.notify(CHANNEL, "b")
    await seen(first, "b")
    replay = await (await follow(relay, transport, f"{query}&since={since}")).next()
    assert replay.get("replay") is True
    assert {"b"} <= set(replay["keys"]) <= {"a", "b"}


@TRANSPORTS
async def test_nothing_changed_means_no_replay(
    transport: str, make_relay: RelayFactory, database: Database, follow: Follow,
) -> None:
    """Resuming from a position after the last change sends no replay frame, and live frames follow."""
    relay = await make_relay(**{"coalesce.window_ms": 0, "history.overlap_ms": 0})
    query = f"?channel={CHANNEL}&key=a"
    since = await last_ts(await follow(relay, transport, query), database, "a") + 1
    back = await follow(relay, transport, f"{query}&since={since}")
    assert await back.frames_for(0.4) == []
    await database.notify(CHANNEL, "a")
    assert "replay" not in await back.next()


@TRANSPORTS
async def test_a_resume_amid_live_traffic_comes_first_and_misses_nothing(
    transport: str, make_relay: RelayFactory, database: Database, follow: Follow,
) -> None:
    """A client resuming while notifications keep coming gets the replay before any live frame of the channel,
    and the replay and the live frames together name every key notified after its position."""
    relay = await make_relay(**{"coalesce.window_ms": 0, "history.overlap_ms": 0})
    first = await follow(relay, transport, f"?channel={CHANNEL}")
    since = await last_ts(first, database, "k0")
    keys = [f"n{i}" for i in range(1, 301)]
    conn = await asyncpg.connect(database.dsn)

    async def notify_all() -> None:
        for key in keys:
            await conn.execute("SELECT pg_notify($1, $2)", CHANNEL, key)

    flow = asyncio.create_task(notify_all())
    try:
        await seen(first, "n50")  # the flow is under way
        back = await follow(relay, transport, f"?channel={CHANNEL}&since={since}")
        frames = []
        missing = set(keys)
        async with asyncio.timeout(10):
            while missing:
                frame = await back.next()
                frames.append(frame)
                missing.difference_update(frame.get("keys", ()))
        await flow
        await seen(first, keys[-1])  # drained, so that its close handshake is not stuck behind unread frames
    finally:
        flow.cancel()
        await conn.close()
    assert frames[0].get("replay") is True, frames[0]
    assert not any(frame.get("replay") for frame in frames[1:])
    assert after("k0", frames[0]["keys"])[:1] == ["n1"] and "n50" in frames[0]["keys"]


async def test_last_event_id_resumes_an_event_source(
    make_relay: RelayFactory, database: Database, follow: Follow,
) -> None:
    """A reconnecting EventSource's Last-Event-ID header (the id of the last event it saw) resumes like since."""
    relay = await make_relay(**{"coalesce.window_ms": 0, "history.overlap_ms": 0})
    query = f"?channel={CHANNEL}&key=a&key=b"
    first = await follow(relay, "sse", query)
    await last_ts(first, database, "a")
    last_event_id = first.event_ids[-1]
    assert last_event_id is not None
    await database.notify(CHANNEL, "b")
    await seen(first, "b")
    back = await follow(relay, "sse", query, {"Last-Event-ID": last_event_id})
    replay = await back.next()
    assert (after("a", replay["keys"]), replay.get("replay")) == (["b"], True)


async def test_since_in_the_query_wins_over_last_event_id(
    make_relay: RelayFactory, database: Database, follow: Follow,
) -> None:
    """When a URL carries since= and the request Last-Event-ID, the URL's position is the one used."""
    relay = await make_relay(**{"coalesce.window_ms": 0, "history.overlap_ms": 0})
    query = f"?channel={CHANNEL}&key=a&key=b&key=c"
    first = await follow(relay, "sse", query)
    early = await last_ts(first, database, "a")
    await last_ts(first, database, "b")
    late = await last_ts(first, database, "c")
    back = await follow(relay, "sse", f"{query}&since={early}", {"Last-Event-ID": str(late)})
    assert after("a", (await back.next())["keys"]) == ["b", "c"]  # from late, b would not be in it


async def test_since_in_a_subscribe_frame(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database,
) -> None:
    """A websocket client resumes by putting "since" in its subscribe frame: ack, then the replay."""
    relay = await make_relay(**{"coalesce.window_ms": 0, "history.overlap_ms": 0})
    first = await make_client(relay, f"?channel={CHANNEL}&key=a&key=b")
    assert (await first.recv())["type"] == "ack"
    await database.notify(CHANNEL, "a")
    since = (await first.recv_type("notify"))["ts"]
    await database.notify(CHANNEL, "b")
    assert (await first.recv_type("notify"))["keys"] == ["b"]  # the relay has it
    back = await make_client(relay)
    await back.send({"op": "subscribe", "channel": CHANNEL, "keys": ["a", "b"], "since": since, "id": "r1"})
    assert (await back.recv(2))["type"] == "ack"
    replay = await back.recv(2)
    assert (after("a", replay["keys"]), replay.get("replay")) == (["b"], True)


@pytest.fixture
async def table(database: Database) -> AsyncIterator[str]:
    """A table of this test's own with two rows; its name is also the state channel's."""
    name = f"resume_{int(time.time() * 1000) % 10_000_000}"
    conn = await asyncpg.connect(database.dsn)
    try:
        await conn.execute(f"CREATE TABLE {name} (id bigint PRIMARY KEY, status text NOT NULL, done integer);"
                           f"INSERT INTO {name} VALUES (1, 'running', 0), (2, 'running', 0)")
        yield name
    finally:
        await conn.execute(f"DROP TABLE IF EXISTS {name}")
        await conn.close()


@TRANSPORTS
async def test_on_a_state_channel_a_replay_carries_fresh_rows_else_a_snapshot(
    transport: str, make_relay: RelayFactory, database: Database, follow: Follow, table: str,
) -> None:
    """On a state channel, a resume the relay can vouch for is a replay carrying the changed keys' current rows; one
    it cannot is a snapshot of every followed key (not a resync)."""
    relay = await make_relay(**{
        "coalesce.window_ms": 0, "history.overlap_ms": 0,
        "channels": [{"name": table, "state": {"table": table, "columns": ["status", "done"]}}],
    })
    query = f"?channel={table}&key=1&key=2"
    first = await follow(relay, transport, query)
    assert (await first.next())["type"] == "snapshot"

    async def done(key: int, value: int) -> int:
        conn = await asyncpg.connect(database.dsn)
        try:
            async with conn.transaction():
                await conn.execute(f"UPDATE {table} SET done = $2 WHERE id = $1", key, value)
                await conn.execute("SELECT pg_notify($1, $2)", table, str(key))
        finally:
            await conn.close()
        frame = await first.next()
        assert frame["keys"] == [str(key)] and frame["rows"][str(key)]["done"] == value, frame
        ts: int = frame["ts"]
        return ts

    since = await done(1, 10)
    await done(2, 7)  # while the client is away
    replay = await (await follow(relay, transport, f"{query}&since={since}")).next()
    assert (replay["type"], replay.get("replay"), after("1", replay["keys"])) == ("notify", True, ["2"])
    assert replay["rows"]["2"] == {"status": "running", "done": 7}
    snapshot = await (await follow(relay, transport, f"{query}&since={since - 3_600_000}")).next()
    assert snapshot["type"] == "snapshot", snapshot
    assert snapshot["rows"] == {"1": {"status": "running", "done": 10}, "2": {"status": "running", "done": 7}}
    assert relay.metrics.registry.get_sample_value("notifyrelay_resumes_total", {"outcome": "snapshot"}) == 1


# When this process cannot vouch for the span: resync with reason history_gap.


@TRANSPORTS
async def test_history_gap_when_since_is_older_than_listening(
    transport: str, make_relay: RelayFactory, follow: Follow,
) -> None:
    """A position from before this process began listening gets resync history_gap, gap_start being that
    position and gap_end now, with a ts to resume from next time."""
    relay = await make_relay()
    since = int(time.time() * 1000) - 3_600_000
    back = await follow(relay, transport, f"?channel={CHANNEL}&key=a&since={since}")
    resync = await back.next()
    assert resync["type"] == "resync" and resync["reason"] == "history_gap", resync
    assert resync["channel"] == CHANNEL and resync["gap_start"] == iso(since)
    assert resync["ts"] >= int(time.time() * 1000) - 5000
    assert datetime.fromisoformat(resync["gap_end"]) >= datetime.fromisoformat(resync["gap_start"])
    if transport == "sse":
        assert back.event_ids[-1] == str(resync["ts"])
    assert relay.metrics.registry.get_sample_value("notifyrelay_resumes_total", {"outcome": "resync"}) == 1


@TRANSPORTS
async def test_history_gap_when_changed_keys_were_forgotten(
    transport: str, make_relay: RelayFactory, database: Database, follow: Follow,
) -> None:
    """With history.max_keys = 3, five keys changed after TS push one out of memory: resync history_gap instead
    of a replay that could miss it; a position after every forgotten change still replays."""
    relay = await make_relay(**{"coalesce.window_ms": 0, "history.overlap_ms": 0, "history.max_keys": 3})
    first = await follow(relay, transport, f"?channel={CHANNEL}")
    positions = {key: await last_ts(first, database, key) for key in ("k0", "k1", "k2", "k3", "k4", "k5")}
    gap = await (await follow(relay, transport, f"?channel={CHANNEL}&since={positions['k0']}")).next()
    assert (gap["type"], gap["reason"]) == ("resync", "history_gap")
    replay = await (await follow(relay, transport, f"?channel={CHANNEL}&since={positions['k3']}")).next()
    assert (after("k3", replay["keys"]), replay.get("replay")) == (["k4", "k5"], True)


def test_a_key_forgotten_at_the_resume_position_is_a_gap() -> None:
    """A client at position 100 that saw batch x but not batch a (both at 100) must not get a replay without a,
    which the memory forgot: history_gap (None) instead."""
    history = ChannelHistory(max_keys=2)
    history.gap(50)  # listening since 50
    history.record(["x"], 1, 100)  # the client saw this frame: its position is 100
    history.record(["a"], 2, 100)  # the same millisecond; the client was gone
    history.record(["x"], 3, 105)
    history.record(["y"], 4, 106)  # a is forgotten (max_keys = 2)
    assert history.changed_since(100, lambda key: True) is None


# From one relay process to another on the same database.


async def test_resume_from_one_relay_to_another(make_relay: RelayFactory, database: Database) -> None:
    """An SSE client (httpx-sse) that saw relay A's event ids reconnects to relay B with Last-Event-ID and gets
    every key that changed while it was away; a relay that started listening after that position says
    history_gap."""
    settings = {"coalesce.window_ms": 0, "history.overlap_ms": 200}
    a = await make_relay(**settings)
    b = await make_relay(**settings)
    assert a.instance != b.instance
    await asyncio.sleep(0.25)  # B must have been listening since TS - overlap to vouch for the span
    query = f"/sse?channel={CHANNEL}&key=k1&key=k2&key=k3"
    async with httpx.AsyncClient(timeout=10) as http:
        async with aconnect_sse(http, "GET", f"http://127.0.0.1:{a.server.port}{query}") as source:
            async for event in source.aiter_sse():
                if event.event == "welcome":
                    assert event.json()["instance"] == a.instance
                elif event.event == "ack":
                    await database.notify(CHANNEL, "k1")
                elif event.event == "notify":
                    last_event_id = event.id
                    break
        await database.notify(CHANNEL, "k2", "k9", "k3")
        await wait_until(lambda: b.pipeline.streams[CHANNEL].history.seq >= 4)  # B has taken all four
        c = await make_relay(**settings)  # listening only from now on
        answers: dict[str, dict[str, Any]] = {}
        for name, relay in (("b", b), ("c", c)):
            url = f"http://127.0.0.1:{relay.server.port}{query}"
            async with aconnect_sse(http, "GET", url, headers={"Last-Event-ID": last_event_id}) as source:
                async for event in source.aiter_sse():
                    if event.event in ("notify", "resync"):
                        answers[name] = {"event": event.event, "id": event.id, **event.json()}
                        break
    replay = answers["b"]
    assert replay["event"] == "notify" and replay["replay"] is True, replay
    assert {"k2", "k3"} <= set(replay["keys"]) <= {"k1", "k2", "k3"}  # k1 may repeat (overlap), k9 never
    assert replay["id"] == str(replay["ts"]) and replay["ts"] > int(last_event_id)
    assert (answers["c"]["event"], answers["c"]["reason"]) == ("resync", "history_gap")
    assert answers["c"]["gap_start"] == iso(int(last_event_id))
