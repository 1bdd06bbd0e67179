"""Every [server] limit against a live relay: what the client sees, and the metric that counts it."""

from __future__ import annotations

import asyncio

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from notifyrelay.app import Relay
from notifyrelay.ops.metrics import LIMITS
from tests.conftest import ClientFactory, Database, RelayFactory, sample, wait_until

CHANNEL = "activity_progress"


def hits(relay: Relay, limit: str) -> float:
    return sample(relay.metrics, f"notifyrelay_{LIMITS[limit][0]}_total")


async def test_max_connections_refuses_with_503(make_relay: RelayFactory, make_client: ClientFactory) -> None:
    """Past server.max_connections the handshake gets 503 with Retry-After; a freed slot admits the next client."""
    relay = await make_relay(**{"server.max_connections": 2})
    first = await make_client(relay)
    await make_client(relay)
    with pytest.raises(InvalidStatus) as caught:
        async with connect(relay.server.url):
            pass
    assert caught.value.response.status_code == 503
    assert caught.value.response.headers["Retry-After"] == "5"
    assert hits(relay, "max_connections") == 1
    await first.connection.close()
    await wait_until(lambda: len(relay.hub.transports) == 1)
    await make_client(relay)


async def test_max_subscriptions(make_relay: RelayFactory, make_client: ClientFactory) -> None:
    """Past server.max_subscriptions a subscribe gets too_many_subscriptions, all or nothing, and stays open."""
    relay = await make_relay(**{"server.max_subscriptions": 3})
    client = await make_client(relay)
    assert (await client.subscribe(CHANNEL, ["1", "2"]))["type"] == "ack"
    answer = await client.subscribe(CHANNEL, ["3", "4"], "s")
    assert (answer["type"], answer["code"], answer["id"]) == ("error", "too_many_subscriptions", "s")
    assert next(iter(relay.hub.transports)).count() == 2
    assert (await client.subscribe(CHANNEL, ["2", "3"]))["type"] == "ack"  # 2 is held already: three in all
    assert hits(relay, "max_subscriptions") == 1


async def test_frame_over_max_message_bytes_closes_1009(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """A frame over server.max_message_bytes closes that connection with 1009; another client is still served."""
    relay = await make_relay(**{"server.max_message_bytes": 1024, "coalesce.window_ms": 0})
    bystander = await make_client(relay, f"?channel={CHANNEL}")
    await bystander.recv()
    big = await make_client(relay)
    await big.send({"op": "ping", "id": "x" * 1100})
    with pytest.raises(ConnectionClosed):
        await big.recv()
    assert big.connection.close_code == 1009
    await wait_until(lambda: hits(relay, "max_message_bytes") == 1)
    await database.notify(CHANNEL, "7")
    assert (await bystander.recv_type("notify"))["keys"] == ["7"]


async def test_max_key_bytes(make_relay: RelayFactory, make_client: ClientFactory) -> None:
    """A key over server.max_key_bytes (counted in UTF-8 bytes) gets bad_request; one at the limit is accepted."""
    relay = await make_relay(**{"server.max_key_bytes": 8})
    client = await make_client(relay)
    assert (await client.subscribe(CHANNEL, ["12345678"]))["type"] == "ack"
    for key in ("123456789", "ééééé"):
        answer = await client.subscribe(CHANNEL, [key])
        assert (answer["type"], answer["code"]) == ("error", "bad_request")
        assert "longer than the limit of 8 bytes" in answer["message"]
    assert hits(relay, "max_key_bytes") == 2


async def test_rate_limit_answers_rate_limited_then_closes_1008(
    make_relay: RelayFactory, make_client: ClientFactory
) -> None:
    """Over the token bucket a frame gets rate_limited; pausing restores service; persisting closes with 1008."""
    relay = await make_relay(**{"server.rate_limit_per_s": 10.0, "server.rate_limit_burst": 5})
    bystander = await make_client(relay)
    client = await make_client(relay)
    for n in range(8):
        await client.send({"op": "ping", "id": str(n)})
    answers = [await client.recv() for _ in range(8)]
    assert [a["type"] for a in answers[:5]] == ["pong"] * 5
    # The bucket refills by one every 0.1 s, so on a slow machine one of the rest may pass too.
    assert {a.get("code", a["type"]) for a in answers[5:]} <= {"rate_limited", "pong"}
    assert sum(a.get("code") == "rate_limited" for a in answers) >= 2
    await asyncio.sleep(0.6)  # the bucket refills: the client is forgiven
    await client.send({"op": "ping", "id": "again"})
    assert (await client.recv())["type"] == "pong"
    # A flood: 5 tokens, then 3 x 5 refusals are tolerated, the next one closes.
    for n in range(40):
        try:
            await client.send({"op": "ping", "id": f"f{n}"})
        except ConnectionClosed:
            break
    with pytest.raises(ConnectionClosed):
        while True:
            await client.recv()
    assert client.connection.close_code == 1008
    assert hits(relay, "rate_limit") >= 16
    await bystander.send({"op": "ping", "id": "b"})
    assert (await bystander.recv())["type"] == "pong"


async def test_handshake_timeout(make_relay: RelayFactory) -> None:
    """A peer that opens TCP and never finishes the handshake is dropped after server.handshake_timeout_s."""
    relay = await make_relay(**{"server.handshake_timeout_s": 0.3})
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    await writer.drain()
    assert await asyncio.wait_for(reader.read(), 3) == b""
    writer.close()
    await wait_until(lambda: hits(relay, "handshake_timeout_s") == 1)


async def test_dead_peer_is_closed_after_ping_timeout(make_relay: RelayFactory, make_client: ClientFactory) -> None:
    """A peer that stops answering pings gets close 1011 after ping_interval_s + ping_timeout_s; a live one stays."""
    relay = await make_relay(**{"server.ping_interval_s": 0.2, "server.ping_timeout_s": 0.3})
    alive = await make_client(relay)
    dead = await make_client(relay, ping_interval=None)
    dead.connection.transport.pause_reading()  # as if the peer vanished: nothing it receives is answered
    await asyncio.sleep(1.0)
    # A vanished peer would be dropped after the close timeout; resuming lets it read the close frame at once.
    dead.connection.transport.resume_reading()
    with pytest.raises(ConnectionClosed):
        while True:
            await dead.recv()
    assert dead.connection.close_code == 1011
    await wait_until(lambda: hits(relay, "ping_timeout_s") == 1)
    await alive.send({"op": "ping"})
    assert (await alive.recv())["type"] == "pong"
    assert len(relay.hub.transports) == 1


def test_defaults_are_sane() -> None:
    """The limits default to values a production relay can start with (SPEC's where it names them)."""
    from notifyrelay.config import ServerConfig

    settings = ServerConfig()
    assert (settings.max_connections, settings.max_subscriptions) == (10000, 250)  # 250: issue 14, item 4
    assert (settings.max_message_bytes, settings.max_key_bytes) == (65536, 1024)
    assert settings.rate_limit_per_s == 20.0 and settings.rate_limit_burst == 100
    assert settings.handshake_timeout_s == 10.0 and settings.ping_interval_s == settings.ping_timeout_s == 20.0


async def test_keepalive_pings_of_connections_opened_together_are_spread(
    make_relay: RelayFactory, make_client: ClientFactory
) -> None:
    """Clients that connect at once are not all pinged at once: first pings fall across their second interval."""
    relay = await make_relay(**{"server.ping_interval_s": 1.0, "server.ping_timeout_s": 2.0})
    for _ in range(30):
        await make_client(relay)
    await asyncio.sleep(1.5)  # halfway through the second interval
    pinged = sum(1 for transport in relay.hub.transports.values() if transport.latency > 0)  # type: ignore[attr-defined]
    assert 0 < pinged < 30, pinged
