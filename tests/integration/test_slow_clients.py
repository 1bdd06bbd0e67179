"""A client that stops reading must neither delay the others nor grow the relay's memory with traffic."""

from __future__ import annotations

import asyncio
import socket
import time

import asyncpg
import msgspec
from websockets.asyncio.client import connect

from tests.conftest import Client, ClientFactory, Database, RelayFactory, sample, wait_until

CHANNEL = "jobs"
KEYS = 50
NOTIFICATIONS = 12_000
PAD = "x" * 1000


async def test_stalled_client_is_bounded_and_caught_up_once(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """Others get every key's last update while one client is stalled; it holds at most one pending set of keys,
    and when it reads again it gets the missed keys once, in one catch-up frame carrying the newest seq."""
    relay = await make_relay(
        channels=[{"name": CHANNEL, "key": "json:id", "include_payload": True}],
        **{"coalesce.window_ms": 0, "server.write_high_water_bytes": 16384},
    )
    # The stalled client: a tiny receive buffer, and websockets stops reading the socket after one queued frame.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", relay.server.port))
    stalled = Client(await connect(relay.server.url + f"?channel={CHANNEL}", sock=sock, max_queue=1))
    assert (await stalled.recv())["type"] == "welcome"
    assert (await stalled.recv())["type"] == "ack"
    good = await make_client(relay, f"?channel={CHANNEL}")
    await good.recv()

    latencies: list[float] = []
    newest: dict[str, int] = {}

    async def read_good() -> None:
        """Everything up to each key's last update (folded, if this client was itself briefly too slow)."""
        while len(newest) < KEYS or min(newest.values()) < NOTIFICATIONS - KEYS:
            frame = await good.recv(10)
            assert frame["type"] == "notify", frame
            for key in frame["keys"]:
                newest[key] = frame["payloads"][key]["n"]
                latencies.append(time.time() - frame["payloads"][key]["t"])

    reader = asyncio.create_task(read_good())
    conn = await asyncpg.connect(database.dsn)
    try:
        for start in range(0, NOTIFICATIONS, 1000):
            await conn.execute(
                "SELECT pg_notify($1, json_build_object('id', g % $2, 'n', g,"
                " 't', extract(epoch from clock_timestamp()), 'pad', $3::text)::text)"
                " FROM generate_series($4::int, $5::int) g",
                CHANNEL, KEYS, PAD, start, start + 999,
            )
    finally:
        await conn.close()
    received = "notifyrelay_notifications_received_total"
    await wait_until(lambda: sample(relay.metrics, received, channel=CHANNEL) == NOTIFICATIONS)
    await wait_until(lambda: relay.queue.take_overflow() == {} and len(relay.queue) == 0)
    final_seq = relay.coalescer._windows[CHANNEL].seq

    await asyncio.wait_for(reader, 20)
    assert set(newest) == {str(n) for n in range(KEYS)}
    assert all(n >= NOTIFICATIONS - KEYS for n in newest.values())  # each key's last update arrived

    hub_client = next(c for c in relay.hub.transports if c.stalled)
    deferred = hub_client.pending[CHANNEL]
    assert len(deferred.keys) <= KEYS  # bounded by what it follows, not by the 12,000 notifications
    buffered = relay.hub.transports[hub_client].transport.get_write_buffer_size()  # type: ignore[attr-defined]
    assert buffered < 16384 + 4096, buffered  # high-water mark plus at most one frame
    p50 = sorted(latencies)[len(latencies) // 2]
    print(f"\nin-process good client, notification age on arrival: p50 {p50 * 1000:.1f} ms,"
          f" max {max(latencies) * 1000:.1f} ms; stalled client's pending keys: {len(deferred.keys)},"
          f" write buffer {buffered} bytes")

    # The stalled client reads again: first what was already in flight, then one catch-up frame.
    frames = []
    async with asyncio.timeout(20):
        while True:
            frame = msgspec.json.decode(await stalled.connection.recv())
            frames.append(frame)
            if frame["type"] == "notify" and frame["seq"] == final_seq:
                break
    catch_up = frames[-1]
    assert len(catch_up["keys"]) == len(set(catch_up["keys"])) == len(deferred.keys)
    assert set(catch_up["keys"]) <= {str(n) for n in range(KEYS)}
    await wait_until(lambda: not hub_client.stalled)
    await stalled.connection.close()


async def test_client_stalled_past_the_limit_is_closed_with_4000(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """A client that stays stalled longer than stall_timeout_s is closed with the documented code 4000."""
    relay = await make_relay(
        channels=[{"name": CHANNEL, "key": "json:id", "include_payload": True}],
        **{"coalesce.window_ms": 0, "server.write_high_water_bytes": 4096, "server.stall_timeout_s": 0.5},
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", relay.server.port))
    stalled = await connect(relay.server.url + f"?channel={CHANNEL}", sock=sock, max_queue=1)
    conn = await asyncpg.connect(database.dsn)
    try:
        for start in range(0, 8000, 1000):
            await conn.execute(
                "SELECT pg_notify($1, json_build_object('id', g, 'pad', $2::text)::text)"
                " FROM generate_series($3::int, $4::int) g", CHANNEL, PAD, start, start + 999,
            )
    finally:
        await conn.close()
    await wait_until(lambda: sample(relay.metrics, "notifyrelay_slow_client_disconnects_total") == 1, timeout=10)
    await wait_until(lambda: not relay.hub.transports, timeout=10)
    await stalled.close()
