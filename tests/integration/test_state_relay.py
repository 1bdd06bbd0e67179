"""State channels end to end: a relay on a real PostgreSQL, real websocket clients, rows/gone/progress/snapshots."""

from __future__ import annotations

import itertools
import time
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest

from ..conftest import ClientFactory, Database, RelayFactory

_names = itertools.count()


@pytest.fixture
async def table(database: Database) -> AsyncIterator[str]:
    """A fresh activities table of this test's own, with three rows; its name (also used as the channel name)."""
    name = f"acts_{next(_names)}_{int(time.time() * 1000) % 1_000_000}"
    conn = await asyncpg.connect(database.dsn)
    try:
        await conn.execute(
            f"""CREATE TABLE {name} (id bigint PRIMARY KEY, status text NOT NULL, done integer, total integer,
                                     message text);
                INSERT INTO {name} VALUES (1, 'running', 10, 100, 'one'), (2, 'queued', 0, NULL, NULL),
                                          (3, 'complete', 5, 5, 'three')"""
        )
        yield name
    finally:
        await conn.close()


def state_channel(table: str, **state: Any) -> dict[str, Any]:
    return {
        "name": table,
        "state": {"table": table, "columns": ["status", "done", "total", "message"], **state},
        "progress": {"done": "done", "total": "total", "status": "status"},
    }


async def update(database: Database, table: str, key: str, sql: str) -> None:
    """Change a row and notify its key, as the activities trigger would."""
    conn = await asyncpg.connect(database.dsn)
    try:
        async with conn.transaction():
            await conn.execute(f"UPDATE {table} SET {sql} WHERE id = $1", int(key))
            await conn.execute("SELECT pg_notify($1, $2)", table, key)
    finally:
        await conn.close()


async def test_subscribe_gets_a_snapshot_and_changes_bring_rows_and_progress(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database, table: str
) -> None:
    """After the ack, a snapshot of the keys' rows (gone for a missing one); a change brings its row and progress."""
    relay = await make_relay(channels=[state_channel(table)])
    client = await make_client(relay)
    ack = await client.subscribe(table, ["1", "404"])
    assert ack["type"] == "ack"
    snapshot = await client.recv_type("snapshot")
    assert snapshot["rows"] == {"1": {"status": "running", "done": 10, "total": 100, "message": "one"}}
    assert snapshot["gone"] == ["404"]
    assert snapshot["progress"]["1"]["percent"] == 10.0 and isinstance(snapshot["ts"], int)
    await update(database, table, "1", "done = 50, message = 'half'")
    notify = await client.recv_type("notify")
    assert notify["keys"] == ["1"]
    assert notify["rows"] == {"1": {"status": "running", "done": 50, "total": 100, "message": "half"}}
    assert notify["progress"]["1"]["percent"] == 50.0


async def test_a_client_gets_only_the_rows_of_keys_it_follows(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database, table: str
) -> None:
    """A batch holding two keys gives each client only its own key's row."""
    relay = await make_relay(channels=[state_channel(table)], **{"coalesce.window_ms": 300})
    one, two = await make_client(relay), await make_client(relay)
    for client, key in ((one, "1"), (two, "2")):
        await client.subscribe(table, [key])
        await client.recv_type("snapshot")
    await update(database, table, "1", "done = 11")
    await update(database, table, "2", "done = 1")
    for client, key in ((one, "1"), (two, "2")):
        frames = [frame for frame in await client.frames_for(1.0) if frame["type"] == "notify"]
        assert frames and all(set(frame["rows"]) <= {key} and set(frame["keys"]) == {key} for frame in frames)


async def test_star_followers_get_list_query_rows_or_no_snapshot(
    make_relay: RelayFactory, make_client: ClientFactory, table: str
) -> None:
    """A "*" subscribe gets list_query's rows as its snapshot; a channel without list_query sends none."""
    listed = state_channel(table, list_query=f"SELECT id AS key, status, done, total, message FROM {table} "
                                              "WHERE status <> 'complete'")
    relay = await make_relay(channels=[listed, {"name": f"{table}_plain", "state": {"table": table,
                                                                                    "columns": ["status"]}}])
    client = await make_client(relay)
    await client.subscribe(table, ["*"])
    snapshot = await client.recv_type("snapshot")
    assert set(snapshot["rows"]) == {"1", "2"}
    await client.subscribe(f"{table}_plain", ["*"])
    assert not [frame for frame in await client.frames_for(0.5) if frame["type"] == "snapshot"]


async def test_a_slow_state_query_sends_the_keys_with_state_error_timeout(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database, table: str
) -> None:
    """A query slower than timeout_ms: the notify still goes out, with its keys and state_error timeout."""
    slow = {
        "name": table,
        "state": {"query": f"SELECT id::text AS key, status, pg_sleep(CASE WHEN status = 'running' THEN 5 ELSE 0 END)"
                           f"::text AS slept FROM {table} WHERE id::text = ANY($1::text[])", "timeout_ms": 300},
    }
    relay = await make_relay(channels=[slow])
    client = await make_client(relay)
    await client.subscribe(table, ["2"])
    assert (await client.recv_type("snapshot"))["rows"] == {"2": {"status": "queued", "slept": ""}}
    await client.subscribe(table, ["1"])
    await client.recv_type("snapshot")
    await database.notify(table, "1")
    notify = await client.recv_type("notify")
    assert (notify["keys"], notify["state_error"]) == (["1"], "timeout")
    assert not notify.get("rows")


async def test_a_state_query_that_cannot_work_leaves_the_channel_keys_only(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database, table: str
) -> None:
    """A state table that does not exist is reported at start and the channel still relays its keys."""
    broken = {"name": table, "state": {"table": f"{table}_missing", "columns": ["status"]}}
    relay = await make_relay(channels=[broken])
    client = await make_client(relay)
    await client.subscribe(table, ["1"])
    await database.notify(table, "1")
    notify = await client.recv_type("notify")
    assert notify["keys"] == ["1"]


async def test_a_stalled_key_gets_a_notify_and_another_when_it_moves(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database, table: str
) -> None:
    """With no change for stall_after_s, followers get a notify saying stalled; the next change says it moves again."""
    channel = state_channel(table)
    channel["progress"]["stall_after_s"] = 1.0
    relay = await make_relay(channels=[channel])
    client = await make_client(relay)
    await client.subscribe(table, ["1"])
    assert (await client.recv_type("snapshot"))["progress"]["1"]["stalled"] is False
    stalled = await client.recv_type("notify", timeout=5)
    assert stalled["keys"] == ["1"] and stalled["progress"]["1"]["stalled"] is True
    await update(database, table, "1", "done = 12")
    moving = await client.recv_type("notify")
    assert moving["progress"]["1"]["stalled"] is False and moving["rows"]["1"]["done"] == 12


async def test_a_row_over_max_row_bytes_is_named_in_state_error_keys(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database, table: str
) -> None:
    """A row larger than max_row_bytes reaches its follower as too_large with its key listed, not as a row."""
    relay = await make_relay(channels=[state_channel(table, max_row_bytes=256)])
    client = await make_client(relay)
    await client.subscribe(table, ["1"])
    await client.recv_type("snapshot")
    await update(database, table, "1", "message = repeat('x', 1000)")
    notify = await client.recv_type("notify")
    assert (notify["state_error"], notify["state_error_keys"]) == ("too_large", ["1"])
    assert "1" not in notify.get("rows", {})


async def test_rows_never_go_backwards_while_a_worker_counts_and_clients_come_and_go(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database, table: str
) -> None:
    """Each client sees key 1's counter only grow (snapshot, notifies, a resubscribe, a reconnect with since)."""
    relay = await make_relay(channels=[state_channel(table)], **{"coalesce.window_ms": 20})
    steady, late, reconnecting = [await make_client(relay) for _ in range(3)]
    seen: dict[str, list[int]] = {"steady": [], "late": [], "reconnecting": []}

    def record(name: str, frames: list[dict[str, Any]]) -> None:
        for frame in frames:
            if frame["type"] in ("snapshot", "notify") and "1" in frame.get("rows", {}):
                seen[name].append(frame["rows"]["1"]["done"])

    await steady.subscribe(table, ["1"])
    conn = await asyncpg.connect(database.dsn)
    try:
        for step in range(1, 121):
            async with conn.transaction():
                await conn.execute(f"UPDATE {table} SET done = $1 WHERE id = 1", 10 + step)
                await conn.execute("SELECT pg_notify($1, '1')", table)
            if step == 30:
                await late.subscribe(table, ["1"])
            if step == 60:
                await reconnecting.subscribe(table, ["1"])
            if step == 80:  # it drops its connection and comes back from the last position it saw
                frames = await reconnecting.frames_for(0.2)
                record("reconnecting", frames)
                since = max(frame["ts"] for frame in frames if "ts" in frame)
                await reconnecting.connection.close()
                reconnecting = await make_client(relay, f"?channel={table}&key=1&since={since}")
    finally:
        await conn.close()
    for name, client in (("steady", steady), ("late", late), ("reconnecting", reconnecting)):
        record(name, await client.frames_for(1.0))
    for name, values in seen.items():
        assert values, name
        assert values == sorted(values), (name, values)
        assert values[-1] == 130, (name, values[-3:])
