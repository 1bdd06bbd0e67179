"""Live state end to end: rows, gone, progress, snapshots, list_query, grants, failures and never-backwards, against a
real PostgreSQL with real websocket and NDJSON clients."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import msgspec
import pytest
from websockets.asyncio.client import connect

from notifyrelay.sqlfiles import read_sql
from tests.conftest import ClientFactory, Database, RelayFactory, wait_until

CHANNEL = "activity_progress"
COLUMNS = ["status", "objects_processed", "objects_to_process", "message"]


def state_channel(**state: Any) -> dict[str, Any]:
    """The activities channel as a state channel with progress (list_query: the unfinished activities)."""
    settings: dict[str, Any] = {
        "table": "activities", "key_column": "id", "columns": COLUMNS,
        "list_query": "SELECT id::text AS key, status, objects_processed, objects_to_process, message "
                      "FROM activities WHERE status NOT IN ('complete', 'failed')",
    }
    settings.update(state)
    return {"name": CHANNEL, "state": settings, "progress": {
        "done": "objects_processed", "total": "objects_to_process", "status": "status",
        "terminal": ["complete", "failed", "cancelled"], "failed": ["failed"], "stall_after_s": 60,
    }}


@pytest.fixture
async def db(database: Database) -> AsyncIterator[asyncpg.Connection]:
    """A connection to a fresh activities table (with its trigger)."""
    conn = await asyncpg.connect(database.dsn)
    await conn.execute(read_sql("install.sql"))
    await conn.execute("DROP TABLE IF EXISTS activities CASCADE")
    await conn.execute(read_sql("examples/activities.sql"))
    yield conn
    await conn.close()


async def add_activity(db: asyncpg.Connection, total: int = 100, status: str = "running") -> str:
    return str(await db.fetchval(
        "INSERT INTO activities (status, objects_to_process) VALUES ($1, $2) RETURNING id", status, total
    ))


async def test_subscribe_gets_a_snapshot_then_rows_and_progress_on_change(
    make_relay: RelayFactory, make_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """A subscribe is acked then answered with a snapshot of the key's row; a change brings a notify with the new
    row and progress figures (percent, status, terminal, failed, stalled)."""
    key = await add_activity(db)
    relay = await make_relay(channels=[state_channel()])
    client = await make_client(relay, f"?channel={CHANNEL}&key={key}")
    assert (await client.recv())["type"] == "ack"
    snapshot = await client.recv()
    assert snapshot["type"] == "snapshot" and snapshot["gone"] == []
    assert snapshot["rows"][key]["objects_processed"] == 0 and isinstance(snapshot["ts"], int)
    await db.execute("UPDATE activities SET objects_processed = 40 WHERE id = $1", int(key))
    notify = await client.recv_type("notify")
    assert notify["rows"][key] == {"status": "running", "objects_processed": 40, "objects_to_process": 100,
                                   "message": None}
    progress = notify["progress"][key]
    assert (progress["done"], progress["total"], progress["percent"]) == (40, 100, 40.0)
    assert (progress["terminal"], progress["failed"], progress["stalled"]) == (False, False, False)


async def test_a_deleted_row_is_gone(
    make_relay: RelayFactory, make_client: ClientFactory, db: asyncpg.Connection, database: Database
) -> None:
    """A key whose row the query no longer returns is listed in gone, with no row."""
    key = await add_activity(db)
    relay = await make_relay(channels=[state_channel()])
    client = await make_client(relay, f"?channel={CHANNEL}&key={key}")
    await client.recv_type("snapshot")
    await db.execute("DELETE FROM activities WHERE id = $1", int(key))
    await database.notify(CHANNEL, key)
    notify = await client.recv_type("notify")
    assert notify["gone"] == [key] and key not in notify["rows"]


async def test_wildcard_followers_get_list_query_rows(
    make_relay: RelayFactory, make_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """A "*" subscribe on a state channel gets list_query's rows as its snapshot (finished activities left out)."""
    running = [await add_activity(db) for _ in range(3)]
    await add_activity(db, status="complete")
    relay = await make_relay(channels=[state_channel()])
    client = await make_client(relay, f"?channel={CHANNEL}")
    snapshot = await client.recv_type("snapshot")
    assert sorted(snapshot["rows"]) == sorted(running)
    assert set(snapshot["progress"]) == set(running)


async def test_a_client_only_ever_receives_rows_of_keys_its_token_allows(
    make_relay: RelayFactory, make_client: ClientFactory, db: asyncpg.Connection, tmp_path: Any
) -> None:
    """In auth mode jwt, a client granted one key never sees another key's row, in snapshots or notifies."""
    import time

    import jwt

    secret = "a shared secret that is at least thirty-two bytes long"
    secret_file = tmp_path / "secret"
    secret_file.write_text(secret)
    mine, other = await add_activity(db), await add_activity(db)
    auth = {"auth.mode": "jwt", "auth.jwt_secret_file": str(secret_file)}
    relay = await make_relay(channels=[state_channel()], **auth)
    token = jwt.encode({"exp": int(time.time()) + 60, "channels": {CHANNEL: [mine]}}, secret, algorithm="HS256")
    client = await make_client(relay, f"?channel={CHANNEL}&key={mine}",
                               additional_headers={"Authorization": f"Bearer {token}"})
    await client.recv_type("snapshot")
    await client.send({"op": "subscribe", "channel": CHANNEL, "keys": ["*"], "id": "all"})
    assert (await client.recv_type("error"))["code"] == "forbidden"
    await db.execute("UPDATE activities SET objects_processed = objects_processed + 1 WHERE id = ANY($1)",
                     [int(mine), int(other)])
    frames = await client.frames_for(0.8)
    seen = {key for frame in frames for key in (*frame.get("rows", {}), *frame.get("keys", []))}
    assert seen == {mine}


@pytest.mark.parametrize(
    ("state", "error"),
    [
        ({"table": "", "query": "SELECT id::text AS key, pg_sleep(0.5) AS slept FROM activities "
                                "WHERE id::text = ANY($1::text[])", "columns": [], "timeout_ms": 100}, "timeout"),
        ({"table": "", "query": "SELECT id::text AS key, 1 / (objects_processed - objects_processed) AS boom "
                                "FROM activities WHERE id::text = ANY($1::text[])", "columns": []}, "query_failed"),
    ],
    ids=["timeout", "query_failed"],
)
async def test_a_failing_state_query_still_sends_the_keys_with_state_error(
    make_relay: RelayFactory, make_client: ClientFactory, db: asyncpg.Connection, state: dict[str, Any], error: str
) -> None:
    """A state query that times out or fails still delivers the batch's keys, with state_error, and the relay
    keeps serving (a later ping is answered)."""
    key = await add_activity(db)
    channel = state_channel(list_query="", **state)
    del channel["progress"]
    relay = await make_relay(channels=[channel])
    client = await make_client(relay, f"?channel={CHANNEL}&key={key}")
    await client.recv_type("ack")
    await db.execute("UPDATE activities SET objects_processed = 5 WHERE id = $1", int(key))
    notify = await client.recv_type("notify")
    assert notify["keys"] == [key] and notify["state_error"] == error and notify["rows"] == {}
    await client.send({"op": "ping", "id": "p"})
    assert (await client.recv_type("pong"))["id"] == "p"
    outcome = relay.metrics.registry.get_sample_value(
        "notifyrelay_state_queries_total", {"channel": CHANNEL, "outcome": error}
    )
    assert outcome is not None and outcome >= 1


async def test_a_query_that_cannot_work_leaves_the_channel_keys_only(
    make_relay: RelayFactory, make_client: ClientFactory, db: asyncpg.Connection
) -> None:
    """A state table that does not exist is reported at start and the channel runs keys-only: notifies carry keys
    and no rows, and subscribes get no snapshot."""
    key = await add_activity(db)
    channel = state_channel(table="no_such_table", list_query="")
    del channel["progress"]
    relay = await make_relay(channels=[channel])
    await wait_until(lambda: CHANNEL not in relay.hub.stateful, timeout=10)
    client = await make_client(relay, f"?channel={CHANNEL}&key={key}")
    await client.recv_type("ack")
    await db.execute("UPDATE activities SET objects_processed = 5 WHERE id = $1", int(key))
    notify = await client.recv_type("notify")
    assert notify["keys"] == [key] and "rows" not in notify


async def test_subscribes_arriving_together_share_one_query(
    make_relay: RelayFactory, db: asyncpg.Connection
) -> None:
    """Twenty clients subscribing at once are served by far fewer state queries than twenty (one per queue
    drain), and each gets its own key's snapshot."""
    keys = [await add_activity(db) for _ in range(20)]
    relay = await make_relay(channels=[state_channel(list_query="")])

    def queries() -> float:
        return relay.metrics.registry.get_sample_value(
            "notifyrelay_state_queries_total", {"channel": CHANNEL, "outcome": "ok"}
        ) or 0.0

    before = queries()
    connections = [await connect(relay.server.url) for _ in keys]
    try:
        for connection in connections:
            await connection.recv()  # welcome
        await asyncio.gather(*(
            connection.send(msgspec.json.encode({"op": "subscribe", "channel": CHANNEL, "keys": [key]}).decode())
            for connection, key in zip(connections, keys, strict=True)
        ))
        for connection, key in zip(connections, keys, strict=True):
            while (frame := msgspec.json.decode(await asyncio.wait_for(connection.recv(), 5)))["type"] != "snapshot":
                pass
            assert list(frame["rows"]) == [key]
    finally:
        for connection in connections:
            await connection.close()
    assert queries() - before < len(keys) / 2, queries() - before


async def test_until_done_ends_the_ndjson_stream_when_every_key_is_terminal(
    make_relay: RelayFactory, db: asyncpg.Connection
) -> None:
    """/stream?until=done ends cleanly with a close line (code 1000) once the followed key reaches a terminal status,
    and is refused with 400 on a channel without progress settings."""
    key = await add_activity(db)
    relay = await make_relay(channels=[state_channel(), {"name": "plain"}])
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    writer.write(f"GET /stream?channel={CHANNEL}&key={key}&until=done HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    await writer.drain()
    await asyncio.sleep(0.3)
    await db.execute("UPDATE activities SET objects_processed = 100, status = 'complete' WHERE id = $1", int(key))
    body = (await asyncio.wait_for(reader.read(), 5)).decode()
    writer.close()
    assert '"terminal":true' in body and '{"type":"close","code":1000' in body and body.endswith("0\r\n\r\n")
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    writer.write(b"GET /stream?channel=plain&until=done HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    answer = (await asyncio.wait_for(reader.read(), 5)).decode()
    writer.close()
    assert answer.startswith("HTTP/1.1 400") and "progress" in answer


async def test_rows_never_go_backwards_while_clients_subscribe_resume_and_reconnect(
    make_relay: RelayFactory, db: asyncpg.Connection, database: Database
) -> None:
    """A worker increments a counter as fast as it can while clients subscribe, unsubscribe, resume with since and
    reconnect at random: no client ever receives a row older than one it already received, and every client ends
    on the final value."""
    keys = [await add_activity(db, total=10**6) for _ in range(3)]
    relay = await make_relay(channels=[state_channel()], **{"coalesce.window_ms": 20})
    stop = asyncio.Event()

    async def worker() -> None:
        conn = await asyncpg.connect(database.dsn)
        try:
            while not stop.is_set():
                await conn.execute("UPDATE activities SET objects_processed = objects_processed + 1 "
                                   "WHERE id = $1", int(random.choice(keys)))
        finally:
            await conn.close()

    violations: list[str] = []

    async def client(seed: int) -> dict[str, int]:
        rng = random.Random(seed)
        latest: dict[str, int] = {}
        since: int | None = None
        for _ in range(4):  # connect, follow, maybe resume, drop: four lives
            query = f"?channel={CHANNEL}" + "".join(f"&key={k}" for k in keys)
            if since is not None and rng.random() < 0.7:
                query += f"&since={since}"
            async with connect(relay.server.url + query) as connection:
                deadline = asyncio.get_running_loop().time() + rng.uniform(0.2, 0.6)
                while (left := deadline - asyncio.get_running_loop().time()) > 0:
                    try:
                        frame = msgspec.json.decode(await asyncio.wait_for(connection.recv(), left))
                    except TimeoutError:
                        break
                    since = max(since or 0, frame.get("ts", 0))
                    for key, row in frame.get("rows", {}).items():
                        value = row["objects_processed"]
                        if value < latest.get(key, -1):
                            violations.append(f"client {seed} key {key}: {value} after {latest[key]}")
                        latest[key] = max(latest.get(key, -1), value)
        return latest

    work = asyncio.create_task(worker())
    try:
        await asyncio.gather(*(client(seed) for seed in range(6)))
    finally:
        stop.set()
        await work
    assert not violations, violations[:5]
    # And after the dust settles, a fresh client sees exactly the database's values.
    rows = await db.fetch("SELECT id, objects_processed FROM activities")
    final = {str(row["id"]): row["objects_processed"] for row in rows}
    async with connect(relay.server.url + f"?channel={CHANNEL}" + "".join(f"&key={k}" for k in keys)) as connection:
        while (frame := msgspec.json.decode(await asyncio.wait_for(connection.recv(), 5)))["type"] != "snapshot":
            pass
    assert {k: row["objects_processed"] for k, row in frame["rows"].items()} == {k: final[k] for k in keys}


async def test_until_done_also_ends_when_a_followed_row_is_gone(
    make_relay: RelayFactory, db: asyncpg.Connection
) -> None:
    """A key with no row (deleted, or never there) can never finish: /stream?until=done counts it as done instead of
    streaming keepalives forever."""
    relay = await make_relay(channels=[state_channel()])
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    writer.write(f"GET /stream?channel={CHANNEL}&key=999999&until=done HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    body = (await asyncio.wait_for(reader.read(), 5)).decode()
    writer.close()
    assert '"gone":["999999"]' in body and '{"type":"close","code":1000' in body


async def test_history_keys_gauge_counts_remembered_keys(
    make_relay: RelayFactory, database: Database
) -> None:
    """notifyrelay_history_keys{channel} says how many keys this process remembers for resume."""
    relay = await make_relay()
    await database.notify(CHANNEL, "a", "b", "c")
    await wait_until(lambda: relay.metrics.registry.get_sample_value(
        "notifyrelay_history_keys", {"channel": CHANNEL}) == 3)
