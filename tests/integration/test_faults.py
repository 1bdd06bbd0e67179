"""Surviving faults: lost and silent database links, restarts, a database absent at start, overflow.

Each test prints the detection or recovery time it measured, so that `pytest -s` shows the figures.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import datetime

import asyncpg
import pytest

from tests.conftest import ClientFactory, Database, RelayFactory, sample, wait_until
from tests.integration.test_relay import probe
from tests.proxy import Proxy

CHANNEL = "activity_progress"


@pytest.fixture
async def proxy(own_database: Database) -> AsyncIterator[Proxy]:
    assert own_database.server is not None
    link = await Proxy(own_database.server.port).start()
    yield link
    await link.close()


async def expect_gap_frames(client: object, timeout: float = 10) -> tuple[dict, dict, dict]:  # type: ignore[type-arg]
    """Read status down, then resync, then status up (SPEC's order), skipping anything else."""
    down = await client.recv_type("status", timeout)  # type: ignore[attr-defined]
    assert down["listener"] == "down"
    resync = await client.recv_type("resync", timeout)  # type: ignore[attr-defined]
    up = await client.recv(timeout)  # type: ignore[attr-defined]
    assert up == {"type": "status", "listener": "up"}
    return down, resync, up


async def test_terminated_backend_is_replaced_and_clients_told(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """pg_terminate_backend of the listener: status down, resync, status up, then delivery resumes."""
    relay = await make_relay()
    client = await make_client(relay, f"?channel={CHANNEL}")
    await client.recv()
    admin = await asyncpg.connect(database.dsn)
    try:
        await database.notify(CHANNEL, "before")
        assert (await client.recv_type("notify"))["keys"] == ["before"]
        started = time.monotonic()
        killed = await admin.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity WHERE application_name = 'notifyrelay'"
        )
        assert killed == 1
        _, resync, _ = await expect_gap_frames(client)
        recovered = time.monotonic() - started
        assert resync["channel"] == CHANNEL and resync["reason"] == "listener_reconnected"
        gap_start = datetime.fromisoformat(resync["gap_start"])
        gap_end = datetime.fromisoformat(resync["gap_end"])
        assert gap_start.utcoffset() is not None and gap_start <= gap_end
        await database.notify(CHANNEL, "after")
        assert (await client.recv_type("notify"))["keys"] == ["after"]
        assert sample(relay.metrics, "notifyrelay_listener_reconnects_total") == 1
        print(f"\nrecovery after pg_terminate_backend: {recovered * 1000:.0f} ms")
        assert recovered < 5
    finally:
        await admin.close()


async def test_database_restart_is_survived_and_readyz_reflects_it(
    make_relay: RelayFactory, make_client: ClientFactory, own_database: Database
) -> None:
    """PostgreSQL stopped for a few seconds then started: 503 meanwhile, then resync, status up, delivery."""
    assert own_database.server is not None
    relay = await make_relay(dsn=own_database.dsn)
    client = await make_client(relay, f"?channel={CHANNEL}&key=1")
    await client.recv()
    started = time.monotonic()
    await asyncio.to_thread(own_database.server.stop, "fast")
    assert (await client.recv_type("status"))["listener"] == "down"
    detected = time.monotonic() - started
    status, _, body = await probe(relay, "/readyz")
    assert status == 503 and "listener down" in body
    await asyncio.sleep(2)
    assert (await probe(relay, "/readyz"))[0] == 503
    restarted = time.monotonic()
    await asyncio.to_thread(own_database.server.start)
    resync = await client.recv_type("resync", timeout=15)
    assert await client.recv() == {"type": "status", "listener": "up"}
    recovered = time.monotonic() - restarted
    assert resync["reason"] == "listener_reconnected"
    assert (await probe(relay, "/readyz"))[0] == 200
    await own_database.notify(CHANNEL, "1")
    assert (await client.recv_type("notify"))["keys"] == ["1"]
    print(f"\ndatabase stop detected in {detected * 1000:.0f} ms; ready again {recovered * 1000:.0f} ms after start")


async def test_silent_link_is_detected_within_interval_plus_timeout(
    make_relay: RelayFactory, make_client: ClientFactory, proxy: Proxy, own_database: Database
) -> None:
    """A blackholed link (no RST, no FIN) is declared lost by the heartbeat within interval + timeout."""
    interval, timeout = 0.5, 0.5
    relay = await make_relay(
        dsn=proxy.dsn(),
        **{"listener.heartbeat_interval_s": interval, "listener.heartbeat_timeout_s": timeout,
           "listener.connect_timeout_s": 1.0},
    )
    client = await make_client(relay, f"?channel={CHANNEL}")
    await client.recv()
    await asyncio.sleep(0.1)
    started = time.monotonic()
    proxy.blackhole()
    assert (await client.recv_type("status", timeout=5))["listener"] == "down"
    detected = time.monotonic() - started
    print(f"\nsilent link detected in {detected * 1000:.0f} ms (interval {interval}s + timeout {timeout}s)")
    assert detected <= interval + timeout + 0.5
    proxy.blackhole(False)
    proxy.cut()  # the old, silent connections: gone for good
    await client.recv_type("resync", timeout=10)
    assert await client.recv() == {"type": "status", "listener": "up"}
    await own_database.notify(CHANNEL, "back")
    assert (await client.recv_type("notify"))["keys"] == ["back"]


async def test_cut_link_is_detected_by_the_termination_callback(
    make_relay: RelayFactory, make_client: ClientFactory, proxy: Proxy
) -> None:
    """A reset link is noticed at once (no heartbeat needed) and replaced."""
    relay = await make_relay(dsn=proxy.dsn(), **{"listener.heartbeat_interval_s": 30.0})
    client = await make_client(relay, f"?channel={CHANNEL}")
    await client.recv()
    started = time.monotonic()
    proxy.cut()
    assert (await client.recv_type("status", timeout=5))["listener"] == "down"
    detected = time.monotonic() - started
    await expect_gap_frames_after_down(client)
    print(f"\nreset link detected in {detected * 1000:.0f} ms")
    assert detected < 5  # far below the 30 s heartbeat interval


async def expect_gap_frames_after_down(client: object) -> None:
    await client.recv_type("resync", timeout=10)  # type: ignore[attr-defined]
    assert await client.recv() == {"type": "status", "listener": "up"}  # type: ignore[attr-defined]


async def test_database_absent_at_startup_then_appearing(
    make_relay: RelayFactory, make_client: ClientFactory, own_database: Database
) -> None:
    """The daemon starts without its database, is not ready, and becomes ready when the database appears."""
    assert own_database.server is not None
    await asyncio.to_thread(own_database.server.stop, "fast")
    relay = await make_relay(dsn=own_database.dsn, wait_ready=False)
    client = await make_client(relay, f"?channel={CHANNEL}")
    await client.recv()
    await asyncio.sleep(1)
    status, _, body = await probe(relay, "/readyz")
    assert status == 503 and "cannot connect" in body
    started = time.monotonic()
    await asyncio.to_thread(own_database.server.start)
    resync = await client.recv_type("resync", timeout=15)
    assert resync["reason"] == "listener_started"
    assert await client.recv() == {"type": "status", "listener": "up"}
    print(f"\nready {(time.monotonic() - started) * 1000:.0f} ms after the database started")
    await wait_until(lambda: relay.readiness.reasons() == [])


async def test_ingest_overflow_tells_subscribers_to_resync(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """When the bounded ingest queue is full, notifications are dropped and the channel's subscribers resync."""
    relay = await make_relay(**{"listener.queue_size": 16})
    client = await make_client(relay, f"?channel={CHANNEL}")
    await client.recv()
    conn = await asyncpg.connect(database.dsn)
    try:
        await conn.execute("SELECT pg_notify($1, g::text) FROM generate_series(1, 5000) g", CHANNEL)
    finally:
        await conn.close()
    resync = await client.recv_type("resync", timeout=5)
    assert resync["reason"] == "overflow" and resync["channel"] == CHANNEL
    assert sample(relay.metrics, "notifyrelay_ingest_overflows_total", channel=CHANNEL) >= 1


async def test_every_notification_reaches_every_client_that_keeps_up(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """5,000 distinct keys, committed while listening, all reach each of three clients (counted)."""
    relay = await make_relay()
    clients = [await make_client(relay, f"?channel={CHANNEL}") for _ in range(3)]
    for client in clients:
        await client.recv()
    conn = await asyncpg.connect(database.dsn)
    try:
        for start in range(0, 5000, 500):
            await conn.execute(
                "SELECT pg_notify($1, g::text) FROM generate_series($2::int, $3::int) g", CHANNEL, start, start + 499
            )
    finally:
        await conn.close()
    for client in clients:
        keys: set[str] = set()
        async with asyncio.timeout(10):
            while len(keys) < 5000:
                frame = await client.recv()
                assert frame["type"] == "notify", frame
                keys.update(frame["keys"])
        assert keys == {str(n) for n in range(5000)}


async def test_missing_database_keeps_retrying_and_says_what_to_fix(
    make_relay: RelayFactory, database: Database
) -> None:
    """A DSN naming a database that does not exist: the relay keeps retrying and /readyz says why."""
    relay = await make_relay(dsn=database.dsn.rsplit("/", 1)[0] + "/no_such_db", wait_ready=False)
    await wait_until(lambda: sample(relay.metrics, "notifyrelay_listener_connect_failures_total") >= 2, timeout=10)
    status, _, body = await probe(relay, "/readyz")
    assert status == 503 and "no_such_db" in body and "does not exist" in body


async def test_listen_socket_has_tcp_keepalive(make_relay: RelayFactory, proxy: Proxy) -> None:
    """The LISTEN connection's TCP socket has keepalive on, so even an idle dead link is noticed by the kernel."""
    import socket

    relay = await make_relay(dsn=proxy.dsn())
    sock = relay.listener._conn._transport.get_extra_info("socket")
    assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == 1
