"""Hardening (issue 14, items 4, 6 and 8): memory bounded relay-wide, file descriptors and half-open handshakes,
and hostile requests answered 400/401 with a sentence instead of a 500 and a traceback."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
from structlog.testing import capture_logs

from tests.conftest import ClientFactory, RelayFactory, wait_until

CHANNEL = "activity_progress"
SECRET = "a hardening secret of at least thirty-two bytes"


async def raw_request(port: int, request: bytes, timeout: float = 5.0) -> tuple[int, dict[str, Any]]:
    """Send bytes as they are and read the answer: its status and its JSON body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), timeout)
        length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                      if line.lower().startswith(b"content-length:"))
        body = await asyncio.wait_for(reader.readexactly(length), timeout)
    finally:
        writer.close()
    return int(head.split(b" ")[1]), msgspec.json.decode(body)


def upgrade(target: str) -> bytes:
    return (f"GET {target} HTTP/1.1\r\nHost: relay\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").encode()


def assert_no_error_logged(events: Sequence[Mapping[str, Any]], caplog: pytest.LogCaptureFixture) -> None:
    """Neither structlog nor a stdlib logger (asyncio's included) said anything at error level or with a traceback."""
    loud = [e for e in events if e.get("log_level") in ("error", "critical") or "exc_info" in e]
    assert not loud, loud
    records = [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert not records, [r.getMessage() for r in records]


# Item 8: small 500s.


async def test_unparsable_url_is_a_400_with_a_sentence(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """GET //[x/ws (and other targets urlsplit cannot read) is answered 400 with a JSON sentence, and nothing logs."""
    relay = await make_relay()
    with capture_logs() as events, caplog.at_level(logging.WARNING):
        for target in ("//[x/ws", "//[x/sse?channel=activity_progress", "http://[::1/ws", "//[x"):
            status, body = await raw_request(relay.server.port, upgrade(target))
            assert status == 400, (target, body)
            assert body["code"] == "bad_request" and body["message"].endswith("not a valid URL"), body
    assert_no_error_logged(events, caplog)


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "jwt.secret"
    path.write_text(SECRET)
    return str(path)


def token(**claims: Any) -> str:
    return jwt.encode({"channels": {CHANNEL: "*"}, "exp": int(time.time()) + 60, **claims}, SECRET, algorithm="HS256")


async def test_huge_and_future_time_claims_are_401_with_a_sentence(
    make_relay: RelayFactory, make_client: ClientFactory, secret_file: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Validly signed tokens with exp, nbf or iat of 10^400, or an iat an hour ahead, get 401 naming the claim."""
    relay = await make_relay(**{"auth.mode": "jwt", "auth.jwt_secret_file": secret_file})
    now = int(time.time())
    cases = [
        (token(exp=10**400), '"exp" claim lies past the year 9999'),
        (token(exp=10**400, nbf=10**400, iat=10**400), "(nbf)"),
        (token(iat=10**400), '"iat" claim lies past the year 9999'),
        (token(iat=now + 3600), "iat (issued at) is in the future"),
    ]
    with capture_logs() as events, caplog.at_level(logging.WARNING):
        for bearer, sentence in cases:
            status, body = await raw_request(relay.server.port, upgrade(f"/ws?token={bearer}"))
            assert (status, body["code"]) == (401, "unauthorized"), body
            assert sentence in body["message"], body
            sse = f"GET /sse?channel={CHANNEL} HTTP/1.1\r\nHost: relay\r\nAuthorization: Bearer {bearer}\r\n\r\n"
            status, body = await raw_request(relay.server.port, sse.encode())
            assert (status, sentence in body["message"]) == (401, True), body
    assert_no_error_logged(events, caplog)
    assert "nbf" not in cases[3][1]
    await make_client(relay, f"?token={token(iat=now - 1)}")  # a good token still opens


# Item 4: memory inside the documented limits.


async def test_relay_wide_subscription_cap(make_relay: RelayFactory, make_client: ClientFactory) -> None:
    """Past server.max_total_subscriptions (over all connections) a subscribe gets too_many_subscriptions naming
    the relay-wide limit, all or nothing; what others release is available again."""
    relay = await make_relay(**{"server.max_subscriptions": 4, "server.max_total_subscriptions": 6})
    first, second, third = [await make_client(relay) for _ in range(3)]
    assert (await first.subscribe(CHANNEL, ["1", "2", "3", "4"]))["type"] == "ack"
    assert (await second.subscribe(CHANNEL, ["1", "5"]))["type"] == "ack"  # six held over all connections
    answer = await third.subscribe(CHANNEL, ["9"], "over")
    assert (answer["type"], answer["code"], answer["id"]) == ("error", "too_many_subscriptions", "over")
    assert "relay-wide limit of 6" in answer["message"]
    answer = await second.subscribe(CHANNEL, ["6", "7"])  # all or nothing: neither key is taken
    assert answer["code"] == "too_many_subscriptions"
    assert relay.metrics.limit_hits["max_total_subscriptions"]._value.get() == 2
    assert (await second.subscribe(CHANNEL, ["5"]))["type"] == "ack"  # held already: costs nothing
    await first.send({"op": "unsubscribe", "channel": CHANNEL, "keys": ["1", "2"]})
    assert (await first.recv())["type"] == "ack"
    assert (await third.subscribe(CHANNEL, ["9", "*"]))["type"] == "ack"
    await first.connection.close()  # a client that leaves frees what it held
    await wait_until(lambda: len(relay.hub) == 2)
    assert (await third.subscribe(CHANNEL, ["10", "11"]))["type"] == "ack"


def test_default_limits_fit_a_small_host() -> None:
    """At the defaults, all subscriptions at their worst (1.62 KiB each at 1 KiB keys, measured) take under 512 MiB."""
    from notifyrelay.config import ServerConfig

    settings = ServerConfig()
    held = min(settings.max_connections * settings.max_subscriptions, settings.max_total_subscriptions)
    assert held * (settings.max_key_bytes + 640) < 512 * 2**20
