"""Hostile input against a live relay: every malformed thing gets an error frame or a documented close, the log
records no crash, and a well-behaved client beside it is served throughout."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import pytest
from structlog.testing import capture_logs
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from notifyrelay.app import Relay
from tests.conftest import Client, ClientFactory, Database, RelayFactory, sample, wait_until

CHANNEL = "activity_progress"
NESTED = "[" * 20000 + "]" * 20000

# frame -> the error code it must get; the connection stays open after each.
ANSWERED: list[tuple[str | bytes, str]] = [
    (b"\x00\x01binary", "bad_request"),
    (b"", "bad_request"),
    ("", "bad_json"),
    ("not json", "bad_json"),
    ('{"op": "ping"', "bad_json"),
    ("[1, 2]", "bad_request"),
    ('"ping"', "bad_request"),
    ("null", "bad_request"),
    ("{}", "bad_request"),
    ('{"op": 5}', "bad_request"),
    ('{"op": null}', "bad_request"),
    ('{"op": "explode"}', "unknown_op"),
    ('{"op": "' + "x" * 5000 + '"}', "unknown_op"),
    ('{"op": "subscribe", "channel": "nope", "keys": ["1"]}', "unknown_channel"),
    ('{"op": "unsubscribe", "channel": "nope", "keys": ["1"]}', "unknown_channel"),
    ('{"op": "subscribe", "channel": "activity_progress"}', "bad_request"),
    ('{"op": "subscribe", "channel": "", "keys": ["1"]}', "bad_request"),
    ('{"op": "subscribe", "channel": 7, "keys": ["1"]}', "bad_request"),
    ('{"op": "subscribe", "channel": "activity_progress", "keys": "1"}', "bad_request"),
    ('{"op": "subscribe", "channel": "activity_progress", "keys": []}', "bad_request"),
    ('{"op": "subscribe", "channel": "activity_progress", "keys": [""]}', "bad_request"),
    ('{"op": "subscribe", "channel": "activity_progress", "keys": [1]}', "bad_request"),
    ('{"op": "subscribe", "channel": "activity_progress", "keys": [["1"]]}', "bad_request"),
    ('{"op": "subscribe", "channel": "activity_progress", "keys": [{"a": 1}]}', "bad_request"),
    ('{"op": "subscribe", "channel": "activity_progress", "keys": ["' + "k" * 2000 + '"]}', "bad_request"),
    ('{"op": "ping", "id": 5}', "bad_request"),
    ('{"op": "ping", "id": "' + "i" * 200 + '"}', "bad_request"),
    ('{"op": "ping", "id": 1e400}', "bad_json"),
    ('{"op": "ping", "id": "\\ud800"}', "bad_json"),
    (NESTED, "bad_json"),
    ('{"op": "ping", "x": ' + NESTED + "}", "bad_json"),
    ('{"op": "subscribe", "channel": "activity_progress", "keys": [' + ",".join(f'"k{n}"' for n in range(5000)) + "]}",
     "too_many_subscriptions"),
]


@pytest.fixture
async def relay(make_relay: RelayFactory) -> Relay:
    return await make_relay(**{"coalesce.window_ms": 0, "server.rate_limit_per_s": 1000.0,
                               "server.rate_limit_burst": 1000})


@pytest.fixture
async def bystander(relay: Relay, make_client: ClientFactory) -> AsyncIterator[Client]:
    """A well-behaved client following key "ok"; after the test it must still get a notification for it."""
    client = await make_client(relay, f"?channel={CHANNEL}&key=ok")
    assert (await client.recv())["type"] == "ack"
    yield client


async def still_served(bystander: Client, database: Database) -> None:
    await database.notify(CHANNEL, "ok")
    assert (await bystander.recv_type("notify"))["keys"] == ["ok"]


async def test_malformed_frames_get_error_frames(
    relay: Relay, make_client: ClientFactory, bystander: Client, database: Database
) -> None:
    """Binary frames, bad JSON, wrong shapes, unknown ops and channels, empty, enormous and too many keys, deep
    nesting: each gets an error frame with its code, the connection stays open, and nothing is logged as a crash."""
    with capture_logs() as events:
        client = await make_client(relay)
        for frame, code in ANSWERED:
            await client.connection.send(frame)
            answer = await client.recv()
            assert (answer["type"], answer["code"]) == ("error", code), (str(frame)[:80], answer)
            assert isinstance(answer["message"], str) and answer["message"]
        await client.send({"op": "ping", "id": "after"})
        assert await client.recv() == {"type": "pong", "id": "after"}
    assert not [e for e in events if e["log_level"] in ("error", "critical", "exception")]
    await still_served(bystander, database)


async def test_invalid_utf8_closes_1007(
    relay: Relay, make_client: ClientFactory, bystander: Client, database: Database
) -> None:
    """A text frame that is not UTF-8 closes that connection with 1007 (websockets' rule, documented); others stay."""
    client = await make_client(relay)
    await client.connection.send(b'{"op": "ping", "id": "\xff\xfe"}', text=True)
    with pytest.raises(ConnectionClosed):
        await client.recv()
    assert client.connection.close_code == 1007
    await still_served(bystander, database)


async def test_fragmented_frames_are_reassembled_and_bounded(
    make_relay: RelayFactory, make_client: ClientFactory
) -> None:
    """A message in many fragments is answered once; fragments adding up past max_message_bytes close with 1009."""
    relay = await make_relay(**{"server.max_message_bytes": 1024})
    client = await make_client(relay)
    await client.connection.send(['{"op": ', '"ping", ', '"id": "frag"}'])
    assert await client.recv() == {"type": "pong", "id": "frag"}
    await client.connection.send(["[" * 400] * 4)
    with pytest.raises(ConnectionClosed):
        await client.recv()
    assert client.connection.close_code == 1009


async def test_frame_flood_does_not_delay_others(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """A client flooding junk as fast as it can is cut off with 1008, while another is answered promptly."""
    relay = await make_relay(**{"coalesce.window_ms": 0})
    bystander = await make_client(relay, f"?channel={CHANNEL}&key=ok")
    await bystander.recv()
    flooder = await make_client(relay)

    async def flood() -> int:
        sent = 0
        try:
            while True:
                await flooder.connection.send('{"op": "subscribe", "channel": "nope", "keys": ["x"]}')
                sent += 1
                if sent % 100 == 0:
                    await asyncio.sleep(0)
        except ConnectionClosed:
            return sent

    async def read_answers() -> None:  # a flooder that also reads, so that it sees the close frame
        with contextlib.suppress(ConnectionClosed):
            while True:
                await flooder.connection.recv()

    flooding, reading = asyncio.create_task(flood()), asyncio.create_task(read_answers())
    loop = asyncio.get_running_loop()
    started = loop.time()
    await bystander.send({"op": "ping", "id": "b"})
    assert (await bystander.recv_type("pong"))["id"] == "b"
    await database.notify(CHANNEL, "ok")
    assert (await bystander.recv_type("notify"))["keys"] == ["ok"]
    assert loop.time() - started < 2
    assert await asyncio.wait_for(flooding, 10) > 0
    await asyncio.wait_for(reading, 10)
    assert flooder.connection.close_code == 1008


async def test_ping_flood_from_a_peer_that_reads_nothing_stays_bounded(
    make_relay: RelayFactory, make_client: ClientFactory
) -> None:
    """Websocket pings from a peer that never reads the pongs stop being read, so the relay's buffer stays bounded."""
    relay = await make_relay(**{"server.write_high_water_bytes": 16384})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", relay.server.port))
    flooder = await connect(relay.server.url, sock=sock, ping_interval=None, max_queue=1)
    flooder.transport.pause_reading()
    payload = b"p" * 125
    for _ in range(40):
        for _ in range(1000):  # 5 MB of pings in all, 5 MB of pongs owed
            flooder.protocol.send_ping(payload)
        flooder.send_data()
        await asyncio.sleep(0.01)
    await wait_until(lambda: len(relay.hub.transports) == 1)
    (server_side,) = relay.hub.transports.values()
    await asyncio.sleep(0.3)
    assert server_side.transport.get_write_buffer_size() < 256 * 1024
    other = await make_client(relay)
    await other.send({"op": "ping"})
    assert (await other.recv())["type"] == "pong"
    flooder.transport.abort()


async def test_oversized_handshake_is_refused(relay: Relay) -> None:
    """An upgrade request with an enormous header is refused by the HTTP parser, not by a crash."""
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Junk: " + b"j" * 20000 + b"\r\n\r\n")
    await writer.drain()
    response: Any = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert response == b"" or response.startswith(b"HTTP/1.1 4")


async def test_ping_flooder_that_never_reads_is_closed_after_the_stall_timeout(
    make_relay: RelayFactory, make_client: ClientFactory
) -> None:
    """A peer stalled by the pongs it owes (not by anything the relay chose to send) is still closed after
    stall_timeout_s, so it cannot hold its connection slot forever."""
    relay = await make_relay(**{"server.write_high_water_bytes": 16384, "server.stall_timeout_s": 0.5})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", relay.server.port))
    flooder = await connect(relay.server.url, sock=sock, ping_interval=None, max_queue=1)
    flooder.transport.pause_reading()
    for _ in range(40):
        for _ in range(1000):
            flooder.protocol.send_ping(b"p" * 125)
        flooder.send_data()
        await asyncio.sleep(0.01)
    await wait_until(lambda: sample(relay.metrics, "notifyrelay_slow_client_disconnects_total") == 1, timeout=10)
    await wait_until(lambda: not relay.hub.transports, timeout=10)
    flooder.transport.abort()
