"""Hardening (issue 14, items 4, 6 and 8): memory bounded relay-wide, file descriptors and half-open handshakes,
and hostile requests answered 400/401 with a sentence instead of a 500 and a traceback."""

from __future__ import annotations

import asyncio
import errno
import logging
import re
import time
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import jwt
import msgspec
import pytest
from structlog.testing import capture_logs
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.conftest import ClientFactory, Database, RelayFactory, sample, wait_until
from tests.daemon import Daemon

CHANNEL = "activity_progress"
SECRET = "a hardening secret of at least thirty-two bytes"


async def raw_request(port: int, request: bytes, timeout: float = 5.0) -> tuple[int, Any]:
    """Send bytes as they are and read the answer: its status and its body (decoded when it is JSON)."""
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
    return int(head.split(b" ")[1]), msgspec.json.decode(body) if b"application/json" in head else body


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
    assert sample(relay.metrics, "notifyrelay_total_subscription_limit_rejections_total") == 2
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


# Item 6: file descriptors and half-open handshakes.


async def start_daemon(tmp_path: Path, server: str, *, nofile: tuple[int, int], dsn: str) -> Daemon:
    """A relay process on port 0 with ``server`` lines in its [server] table, under its own RLIMIT_NOFILE."""
    config = tmp_path / "relay.toml"
    config.write_text(f'dsn = "{dsn}"\n[server]\nlisten = "127.0.0.1:0"\n{server}\n[log]\nformat = "json"\n'
                      f'[[channels]]\nname = "{CHANNEL}"\n')
    return await Daemon.start("--config", str(config), nofile=nofile)


async def started_port(daemon: Daemon) -> int:
    await wait_until(lambda: bool(daemon.count("relay.started")) or daemon.process.returncode is not None, timeout=10)
    return daemon.port


async def test_slow_handshakes_beyond_the_fd_limit_leave_probes_and_clients_served(
    tmp_path: Path, database: Database, daemons: list[Daemon]
) -> None:
    """Under a 300-fd limit, 400 connections stuck in their handshake are shed oldest first (max_handshakes 50):
    /healthz still answers, a websocket client still connects, and nothing logs an error or a traceback."""
    daemon = await start_daemon(tmp_path, "max_connections = 100\nmax_handshakes = 50\nhandshake_timeout_s = 30",
                                nofile=(300, 300), dsn=database.dsn)
    daemons.append(daemon)
    port = await started_port(daemon)
    slow: list[asyncio.StreamWriter] = []
    try:
        for _ in range(400):
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /ws HTTP/1.1\r\nHost: relay\r\n")  # and never the rest
            slow.append(writer)
        await asyncio.sleep(0.2)  # let the relay accept them all (a fixed backlog would otherwise hold some)
        assert await raw_request(port, b"GET /healthz HTTP/1.1\r\nHost: relay\r\n\r\n", timeout=3) == (200, b"ok\n")
        async with connect(f"ws://127.0.0.1:{port}/ws", open_timeout=3) as client:
            assert msgspec.json.decode(await client.recv())["type"] == "welcome"
        metrics = await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}/metrics")
        shed = float(re.search(r"^notifyrelay_handshakes_shed_total (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
        assert shed >= 350, shed
        waiting = float(re.search(r"^notifyrelay_handshakes (\S+)$", metrics, re.M).group(1))  # type: ignore[union-attr]
        assert waiting <= 50, waiting
    finally:
        for writer in slow:
            writer.close()
    assert await daemon.stop() == 0
    text = "".join(daemon.lines)
    assert "Traceback" not in text and '"level": "error"' not in text and '"level":"error"' not in text, text[-2000:]


def http_get(url: str) -> str:
    with urllib.request.urlopen(url, timeout=5) as response:
        return response.read().decode()  # type: ignore[no-any-return]


async def test_start_is_refused_when_max_connections_cannot_fit_the_fd_limit(
    tmp_path: Path, daemons: list[Daemon]
) -> None:
    """Under a 256-fd hard limit the default max_connections (10000) stops the start with exit 2, naming the key,
    both numbers and the fix."""
    daemon = await start_daemon(tmp_path, "", nofile=(256, 256), dsn="postgresql://127.0.0.1:1/none")
    daemons.append(daemon)
    assert await daemon.exited() == 2
    text = "".join(daemon.lines)
    assert "server.max_connections" in text and "10000 connections" in text, text
    assert "RLIMIT_NOFILE is 256 (hard limit 256)" in text and "LimitNOFILE" in text, text


async def test_soft_fd_limit_is_raised_to_the_hard_one(
    tmp_path: Path, database: Database, daemons: list[Daemon]
) -> None:
    """A relay started with a soft limit of 256 under a hard one of 4096 raises its soft limit to 4096 and starts."""
    daemon = await start_daemon(tmp_path, "max_connections = 3000", nofile=(256, 4096), dsn=database.dsn)
    daemons.append(daemon)
    await started_port(daemon)
    limits = Path(f"/proc/{daemon.process.pid}/limits").read_text()
    assert re.search(r"^Max open files\s+4096\s+4096\s", limits, re.M), limits
    assert await daemon.stop() == 0


async def test_accept_errors_are_logged_once_per_interval_with_a_count(
    make_relay: RelayFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A thousand EMFILE accepts (as asyncio reports them) make one log line with a count, no traceback; other
    loop errors still reach the handler the relay replaced."""
    relay = await make_relay()
    loop = asyncio.get_running_loop()
    emfile = {"message": "socket.accept() out of system resource",
              "exception": OSError(errno.EMFILE, "Too many open files")}
    with capture_logs() as events, caplog.at_level(logging.WARNING):
        for _ in range(1000):
            loop.call_exception_handler(emfile)
        loop.call_exception_handler({"message": "something else entirely"})
    failed = [e for e in events if e["event"] == "server.accept_failed"]
    assert len(failed) == 1 and failed[0]["errno"] == "EMFILE" and "exc_info" not in failed[0], failed
    assert sample(relay.metrics, "notifyrelay_accept_errors_total", errno="EMFILE") == 1000
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == ["something else entirely"]


def test_handshakes_shed_the_oldest_and_requeue_on_progress() -> None:
    """Past the limit the oldest waiting connection is shed (never the new one), and one that was answered goes to
    the back of the line, so a keep-alive prober outlives the slow handshakes that came after it."""
    from notifyrelay.transports.capacity import Handshakes

    waiting: Handshakes[str] = Handshakes()
    assert [waiting.arrive(name, 3) for name in ("probe", "slow1", "slow2")] == [None, None, None]
    waiting.progressed("probe")  # answered: it waits for its next request behind the others
    assert waiting.arrive("slow3", 3) == "slow1"
    assert waiting.arrive("slow4", 3) == "slow2"
    waiting.done("slow3")  # upgraded
    assert waiting.arrive("new", 3) is None and len(waiting) == 3
    assert waiting.arrive("newer", 3) == "probe"
    waiting.progressed("gone")  # not waiting: nothing to do
    assert waiting.arrive("alone", 1) == "slow4" and len(waiting) == 3  # a lowered limit sheds one per arrival


async def test_a_reload_applies_max_connections_and_allowed_origins_to_the_next_handshake(
    make_relay: RelayFactory, make_client: ClientFactory, tmp_path: Path, database: Database
) -> None:
    """After a reload that lowers server.max_connections and sets allowed_origins (both documented as live), the
    next handshakes are judged by the new values: 503 past the new limit, 403 from another origin."""
    relay = await make_relay()
    await make_client(relay)
    config = tmp_path / "relay.toml"
    config.write_text(f'dsn = "{database.dsn}"\n[server]\nmax_connections = 2\n'
                      f'allowed_origins = ["https://app.example"]\n[[channels]]\nname = "{CHANNEL}"\n')
    relay.config_path = str(config)
    relay.overrides = {"server.listen": "127.0.0.1:0"}
    assert await relay.reload() is True
    with pytest.raises(InvalidStatus) as caught:
        await connect(relay.server.url, origin="https://evil.example")  # type: ignore[arg-type]
    assert caught.value.response.status_code == 403
    await make_client(relay, origin="https://app.example")
    with pytest.raises(InvalidStatus) as caught:
        await connect(relay.server.url)
    assert caught.value.response.status_code == 503


async def test_a_ping_flood_counts_against_the_rate_limit_and_closes_with_1008(make_relay: RelayFactory) -> None:
    """Item 7: websocket pings are frames like any other: a client flooding them (and reading the pongs) is
    refused past its rate and closed with 1008, while a polite client beside it is served."""
    relay = await make_relay(**{"server.rate_limit_per_s": 5.0, "server.rate_limit_burst": 10})
    polite = await connect(relay.server.url)
    flooder = await connect(relay.server.url, ping_interval=None)
    try:
        await flooder.recv()  # welcome
        for _ in range(200):
            flooder.protocol.send_ping(b"p")
        flooder.send_data()
        await asyncio.wait_for(flooder.wait_closed(), 5)
        assert flooder.close_code == 1008
        assert sample(relay.metrics, "notifyrelay_rate_limited_frames_total") > 30
        await polite.recv()  # welcome
        await polite.send(msgspec.json.encode({"op": "ping", "id": "still"}).decode())
        assert msgspec.json.decode(await polite.recv())["id"] == "still"
    finally:
        await polite.close()
        flooder.transport.abort()
