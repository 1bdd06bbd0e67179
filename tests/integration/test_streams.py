"""Server-Sent Events (/sse) and NDJSON (/stream) end to end: real PostgreSQL, real HTTP clients on the wire.

Most tests run over both framings (``framing`` is "sse" or "ndjson") with the raw client of ``stream_client.py``;
one reads SSE with a real SSE client library (httpx-sse), and one with ``curl -N`` against the daemon as users run
it, stopped with SIGTERM.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import jwt
import msgspec
import pytest
from httpx_sse import aconnect_sse

from notifyrelay.app import Relay
from notifyrelay.delivery.session import Session
from notifyrelay.pgembed import free_port
from tests.conftest import ClientFactory, Database, RelayFactory, wait_until
from tests.integration.stream_client import Item, StreamClient, StreamEnded, path_of

CHANNEL = "activity_progress"
SECRET = "stream-test secret, at least thirty-two bytes long"
ROOT = Path(__file__).resolve().parents[2]
FRAMINGS = pytest.mark.parametrize("framing", ["sse", "ndjson"])

StreamFactory = Callable[..., Awaitable[StreamClient]]


@pytest.fixture
async def open_stream() -> AsyncIterator[StreamFactory]:
    """Open raw HTTP requests (``await open_stream(relay, target, headers)``); each is closed at the end."""
    opened: list[StreamClient] = []

    async def open_one(relay: Relay | int, target: str, headers: dict[str, str] | None = None,
                       method: str = "GET") -> StreamClient:
        client = await StreamClient.open(relay, target, headers, method)
        opened.append(client)
        return client

    yield open_one
    for client in opened:
        await client.close()


def token(**overrides: Any) -> str:
    claims: dict[str, Any] = {"sub": "script-1", "exp": int(time.time()) + 60, "channels": {CHANNEL: ["42", "43"]}}
    claims.update(overrides)
    return jwt.encode(claims, SECRET, algorithm="HS256")


@pytest.fixture
def secret_file(tmp_path: Path) -> str:
    path = tmp_path / "jwt-secret"
    path.write_text(SECRET + "\n")
    return str(path)


def sample(relay: Relay, name: str, **labels: str) -> float:
    value = relay.metrics.registry.get_sample_value(f"notifyrelay_{name}", labels)
    return 0.0 if value is None else float(value)


def notify_keys(items: list[Item]) -> list[list[str]]:
    return [item.frame["keys"] for item in items if item.kind == "notify" and item.frame is not None]


# What arrives.


@FRAMINGS
async def test_only_followed_keys_arrive(
    framing: str, make_relay: RelayFactory, database: Database, open_stream: StreamFactory,
) -> None:
    """A stream following keys 42 and 43 gets notify frames naming only those keys, with ts (SSE: as the id)."""
    relay = await make_relay(**{"coalesce.window_ms": 0})
    stream = await open_stream(relay, f"{path_of(framing)}?channel={CHANNEL}&key=42&key=43")
    assert stream.status == 200
    assert stream.headers["content-type"].startswith(
        "text/event-stream" if framing == "sse" else "application/x-ndjson")
    assert stream.headers["transfer-encoding"] == "chunked"
    assert stream.headers["cache-control"] == "no-store"
    opening = await stream.opening()
    welcome = opening[-2].frame
    assert welcome is not None and welcome["protocol"] == 2 and welcome["instance"] == relay.instance
    assert opening[-1].frame == {"type": "ack", "op": "subscribe", "channel": CHANNEL, "keys": ["42", "43"]}
    await database.notify(CHANNEL, "41", "42", "44", "43", "45")
    notifies = [await stream.next_frame("notify"), await stream.next_frame("notify")]
    assert [item.frame["keys"] for item in notifies if item.frame] == [["42"], ["43"]]
    for item in notifies:
        assert item.frame is not None and isinstance(item.frame["ts"], int)
        assert item.event_id == (str(item.frame["ts"]) if framing == "sse" else None)
    assert notify_keys(await stream.items_for(0.3)) == []
    assert sample(relay, "clients", transport=framing) == 1
    assert sample(relay, "messages_sent_total", type="notify", transport=framing) == 2


async def test_several_channels_in_one_url(
    make_relay: RelayFactory, database: Database, open_stream: StreamFactory,
) -> None:
    """Each channel parameter of a stream URL is one subscription (with the same keys), acked in order."""
    relay = await make_relay(**{"coalesce.window_ms": 0, "channels": [{"name": CHANNEL}, {"name": "system_stability"}]})
    stream = await open_stream(relay, f"/stream?channel={CHANNEL}&channel=system_stability&key=1")
    opening = await stream.opening(subscribes=2)
    assert [item.frame["channel"] for item in opening[1:] if item.frame] == [CHANNEL, "system_stability"]
    await database.notify("system_stability", "2", "1")
    await database.notify(CHANNEL, "1")
    frames = [(await stream.next_frame("notify")).frame for _ in range(2)]
    assert [(f["channel"], f["keys"]) for f in frames if f] == [("system_stability", ["1"]), (CHANNEL, ["1"])]


@FRAMINGS
async def test_a_client_that_goes_away_is_forgotten_at_once(
    framing: str, make_relay: RelayFactory, open_stream: StreamFactory,
) -> None:
    """When a stream's client closes its connection, the relay drops its session and subscriptions right away."""
    relay = await make_relay()
    stream = await open_stream(relay, f"{path_of(framing)}?channel={CHANNEL}&key=a")
    await stream.opening()
    assert sample(relay, "subscriptions", channel=CHANNEL) == 1
    await stream.close()
    await wait_until(lambda: len(relay.hub) == 0, timeout=2)
    assert sample(relay, "clients", transport=framing) == 0
    assert sample(relay, "subscriptions", channel=CHANNEL) == 0


@FRAMINGS
async def test_coalescing_holds(
    framing: str, make_relay: RelayFactory, database: Database, open_stream: StreamFactory,
) -> None:
    """Thirty notifications of one key in one transaction reach a stream in at most three frames, each naming the
    key once, the last carrying the last payload."""
    relay = await make_relay(**{
        "coalesce.window_ms": 300,
        "channels": [{"name": CHANNEL, "key": "json:k", "include_payload": True}],
    })
    stream = await open_stream(relay, f"{path_of(framing)}?channel={CHANNEL}&key=a")
    await stream.opening()
    conn = await asyncpg.connect(database.dsn)
    try:
        await conn.execute(
            "SELECT pg_notify($1, json_build_object('k', 'a', 'n', n)::text) FROM generate_series(0, 29) n", CHANNEL
        )
    finally:
        await conn.close()
    frames = [item.frame for item in await stream.items_for(1.2) if item.kind == "notify" and item.frame]
    assert 1 <= len(frames) <= 3, frames
    assert all(frame["keys"] == ["a"] for frame in frames)
    assert frames[-1]["payloads"] == {"a": {"k": "a", "n": 29}}
    assert [frame["seq"] for frame in frames] == sorted(frame["seq"] for frame in frames)


@FRAMINGS
async def test_keepalives_arrive_on_an_idle_stream(
    framing: str, make_relay: RelayFactory, open_stream: StreamFactory,
) -> None:
    """An idle stream gets a keepalive every keepalive_s: an SSE comment line, or a {"type":"keepalive"} line."""
    relay = await make_relay(**{"server.keepalive_s": 0.2})
    stream = await open_stream(relay, f"{path_of(framing)}?channel={CHANNEL}")
    await stream.opening()
    items = await stream.items_for(1.0)
    assert len(items) >= 3, items
    assert {item.kind for item in items} == {"keepalive"}
    if framing == "ndjson":
        assert all(item.frame == {"type": "keepalive"} for item in items)


async def test_http_1_0_stream_is_delimited_by_close(make_relay: RelayFactory, database: Database) -> None:
    """An HTTP/1.0 client gets the stream without chunking, and the relay closes the connection to end it."""
    relay = await make_relay(**{"coalesce.window_ms": 0})
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    try:
        writer.write(f"GET /stream?channel={CHANNEL}&key=a HTTP/1.0\r\n\r\n".encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.0 200") or head.startswith(b"HTTP/1.1 200")
        assert b"transfer-encoding" not in head.lower() and b"connection: close" in head.lower()
        lines = [msgspec.json.decode(await asyncio.wait_for(reader.readline(), 5)) for _ in range(2)]
        assert [line["type"] for line in lines] == ["welcome", "ack"]
        await database.notify(CHANNEL, "a")
        assert msgspec.json.decode(await asyncio.wait_for(reader.readline(), 5))["keys"] == ["a"]
        relay.request_stop()
        rest = await asyncio.wait_for(reader.read(), 10)  # to EOF: the close delimits the body
        assert msgspec.json.decode(rest.splitlines()[-1])["code"] == 1001
    finally:
        writer.close()


# Refusals: an HTTP answer with a JSON body {"code", "message"}.


def assert_refused(stream: StreamClient, status: int, code: str) -> dict[str, Any]:
    assert stream.status == status, (stream.status, stream.body)
    assert stream.headers["content-type"] == "application/json"
    body = stream.json()
    assert body["code"] == code, body
    assert isinstance(body["message"], str) and body["message"], body
    return body


@FRAMINGS
@pytest.mark.parametrize(
    ("query", "code", "says"),
    [
        ("", "bad_request", "channel=NAME"),
        ("?key=42", "bad_request", "no channel"),
        (f"?channel={CHANNEL}&since=yesterday", "bad_request", "since"),
        (f"?channel={CHANNEL}&until=forever", "bad_request", "until=done"),
        (f"?channel={CHANNEL}&until=done", "bad_request", "progress"),
        (f"?channel={CHANNEL}&key=" + "k" * 40, "bad_request", "longer than the limit"),
        ("?channel=nope", "unknown_channel", CHANNEL),
    ],
    ids=["no-channel", "keys-without-channel", "bad-since", "bad-until", "until-done-without-progress",
         "key-too-long", "unknown-channel"],
)
async def test_bad_requests_are_answered_400(
    framing: str, query: str, code: str, says: str, make_relay: RelayFactory, open_stream: StreamFactory,
) -> None:
    """Every malformed stream URL gets a 400 whose JSON body has the code and a sentence that names the problem."""
    relay = await make_relay(**{"server.max_key_bytes": 32})
    body = assert_refused(await open_stream(relay, path_of(framing) + query), 400, code)
    assert says in body["message"]
    assert len(relay.hub) == 0


async def test_unknown_paths_and_methods(make_relay: RelayFactory, open_stream: StreamFactory) -> None:
    """Any other path is a 404 and a POST to a stream a 405, both with JSON bodies."""
    relay = await make_relay()
    assert_refused(await open_stream(relay, "/events?channel=x"), 404, "not_found")
    refused = await open_stream(relay, f"/sse?channel={CHANNEL}", method="POST")
    assert_refused(refused, 405, "bad_request")
    assert refused.headers["allow"] == "GET"


@FRAMINGS
async def test_over_capacity_is_503_with_retry_after(
    framing: str, make_relay: RelayFactory, open_stream: StreamFactory,
) -> None:
    """Past max_connections a stream is refused 503 over_capacity with Retry-After; the first one keeps streaming."""
    relay = await make_relay(**{"server.max_connections": 1, "server.keepalive_s": 0.2})
    first = await open_stream(relay, f"{path_of(framing)}?channel={CHANNEL}")
    await first.opening()
    refused = await open_stream(relay, f"{path_of(framing)}?channel={CHANNEL}")
    assert_refused(refused, 503, "over_capacity")
    assert refused.headers["retry-after"] == "5"
    assert (await first.next()).kind == "keepalive"


@FRAMINGS
async def test_shutting_down_is_503(framing: str, make_relay: RelayFactory, open_stream: StreamFactory) -> None:
    """Once shutdown has stopped accepting (its second step), a new stream is refused 503 shutting_down."""
    relay = await make_relay()
    relay.server.stop_accepting()
    assert_refused(await open_stream(relay, f"{path_of(framing)}?channel={CHANNEL}"), 503, "shutting_down")


@FRAMINGS
async def test_too_many_keys_in_the_url_is_a_400(
    framing: str, make_relay: RelayFactory, open_stream: StreamFactory,
) -> None:
    """A stream URL with more keys than max_subscriptions is refused before the stream starts, with a JSON body."""
    relay = await make_relay(**{"server.max_subscriptions": 2})
    refused = await open_stream(relay, f"{path_of(framing)}?channel={CHANNEL}&key=a&key=b&key=c")
    assert_refused(refused, 400, "too_many_subscriptions")


# Tokens (auth mode jwt).


@FRAMINGS
async def test_tokens_by_header_and_by_query(
    framing: str, make_relay: RelayFactory, secret_file: str, database: Database, open_stream: StreamFactory,
) -> None:
    """A token in Authorization or in the token query parameter opens the stream; none or a bad one is 401 with a
    Bearer challenge; keys beyond the grant are 403 forbidden."""
    relay = await make_relay(**{"auth.mode": "jwt", "auth.jwt_secret_file": secret_file, "coalesce.window_ms": 0})
    path = f"{path_of(framing)}?channel={CHANNEL}&key=42"
    by_header = await open_stream(relay, path, {"Authorization": f"Bearer {token()}"})
    by_query = await open_stream(relay, f"{path}&token={token()}")
    for stream in (by_header, by_query):
        assert stream.status == 200
        await stream.opening()
    await database.notify(CHANNEL, "43", "42")
    for stream in (by_header, by_query):
        assert (await stream.next_frame("notify")).frame["keys"] == ["42"]  # type: ignore[index]
    for refused in (await open_stream(relay, path),
                    await open_stream(relay, f"{path}&token=not-a-jwt"),
                    await open_stream(relay, path, {"Authorization": f"Bearer {token(exp=int(time.time()) - 5)}"})):
        assert_refused(refused, 401, "unauthorized")
        assert refused.headers["www-authenticate"].startswith("Bearer")
    body = assert_refused(await open_stream(relay, f"{path}&key=44&token={token()}"), 403, "forbidden")
    assert CHANNEL in body["message"]
    assert_refused(await open_stream(relay, f"{path_of(framing)}?channel={CHANNEL}&token={token()}"), 403,
                   "forbidden")  # "*" is more than keys 42 and 43


@FRAMINGS
async def test_a_stream_ends_with_4001_when_its_token_expires(
    framing: str, make_relay: RelayFactory, secret_file: str, open_stream: StreamFactory,
) -> None:
    """When the token of an open stream expires, the stream ends with a close frame of code 4001 and the chunked
    terminator, so that the client reconnects with a fresh token."""
    relay = await make_relay(**{"auth.mode": "jwt", "auth.jwt_secret_file": secret_file})
    expiring = token(exp=int(time.time()) + 2)
    stream = await open_stream(relay, f"{path_of(framing)}?channel={CHANNEL}&key=42&token={expiring}")
    await stream.opening()
    close = await stream.next_frame("close", timeout=5)
    assert close.frame is not None and (close.frame["code"], close.frame["reason"]) == (4001, "token expired")
    with pytest.raises(StreamEnded) as ended:
        await stream.next()
    assert ended.value.clean
    assert sample(relay, "token_expirations_total") == 1


# Cross-origin browsers.


@FRAMINGS
async def test_cors_for_allowed_origins(framing: str, make_relay: RelayFactory, open_stream: StreamFactory) -> None:
    """An allowed Origin gets Access-Control-Allow-Origin on the stream and a 204 preflight naming GET and the
    Authorization and Last-Event-ID headers; another origin is 403 on both."""
    allowed = "https://app.example"
    relay = await make_relay(**{"server.allowed_origins": [allowed]})
    path = f"{path_of(framing)}?channel={CHANNEL}"
    stream = await open_stream(relay, path, {"Origin": allowed})
    assert stream.status == 200
    assert stream.headers["access-control-allow-origin"] == allowed
    assert "Origin" in stream.headers["vary"]
    same_origin = await open_stream(relay, path)
    assert same_origin.status == 200 and "access-control-allow-origin" not in same_origin.headers
    preflight = await open_stream(relay, path, {
        "Origin": allowed, "Access-Control-Request-Method": "GET",
        "Access-Control-Request-Headers": "authorization, last-event-id",
    }, method="OPTIONS")
    assert preflight.status == 204
    assert preflight.headers["access-control-allow-origin"] == allowed
    assert preflight.headers["access-control-allow-methods"] == "GET"
    allow_headers = {h.strip().lower() for h in preflight.headers["access-control-allow-headers"].split(",")}
    assert {"authorization", "last-event-id"} <= allow_headers
    for method in ("GET", "OPTIONS"):
        refused = await open_stream(relay, path, {"Origin": "https://evil.example"}, method=method)
        assert_refused(refused, 403, "forbidden")
        assert "access-control-allow-origin" not in refused.headers


async def test_refusals_to_an_allowed_origin_carry_cors_headers(
    make_relay: RelayFactory, open_stream: StreamFactory,
) -> None:
    """A refusal answered to a page on an allowed origin carries Access-Control-Allow-Origin, so that the page can
    read why it was refused."""
    allowed = "https://app.example"
    relay = await make_relay(**{"server.allowed_origins": [allowed]})
    refused = await open_stream(relay, "/stream?channel=nope", {"Origin": allowed})
    assert_refused(refused, 400, "unknown_channel")
    assert refused.headers.get("access-control-allow-origin") == allowed


# A stalled stream next to a websocket bystander.


def stalled_session(relay: Relay) -> Session | None:
    return next((s for s, t in relay.hub.transports.items() if t.name == "sse"), None)


async def test_a_stalled_sse_client_neither_delays_a_bystander_nor_grows_and_is_closed(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database,
) -> None:
    """While 2,000 notifications of 1 KB flow, an SSE client that never reads is folded (its pending keys and write
    buffer stay bounded), a websocket bystander gets every key before the stalled one is closed, and the stalled
    one is closed after stall_timeout_s."""
    stall_timeout_s, high_water, max_pending = 4.0, 1024, 100
    relay = await make_relay(**{
        "coalesce.window_ms": 0,
        "server.write_high_water_bytes": high_water,
        "server.stall_timeout_s": stall_timeout_s,
        "server.max_pending_keys": max_pending,
        "server.keepalive_s": 60.0,
        "channels": [{"name": CHANNEL, "key": "json:k", "include_payload": True}],
    })
    bystander = await make_client(relay, f"?channel={CHANNEL}")
    assert (await bystander.recv())["type"] == "ack"
    # A raw socket with a tiny receive buffer that sends its request and never reads.
    loop = asyncio.get_running_loop()
    stalled = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.setblocking(False)
    try:
        await loop.sock_connect(stalled, ("127.0.0.1", relay.server.port))
        await loop.sock_sendall(stalled, f"GET /sse?channel={CHANNEL} HTTP/1.1\r\nHost: relay\r\n\r\n".encode())
        await wait_until(lambda: stalled_session(relay) is not None)
        session = stalled_session(relay)
        assert session is not None
        socket_transport = relay.hub.transports[session].transport  # type: ignore[attr-defined]
        # Loopback send buffers grow to megabytes and would swallow the whole flow: give this connection the
        # buffer of a slow network path, so that the relay's own flow control is what gets tested.
        socket_transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 8192)
        peaks = {"pending_keys": 0, "write_buffer": 0}
        stalled_at: list[float] = []  # when it (last) went from draining to stalled

        async def watch() -> None:
            while True:
                pending = session.pending.get(CHANNEL)
                peaks["pending_keys"] = max(peaks["pending_keys"], len(pending.keys) if pending else 0)
                peaks["write_buffer"] = max(peaks["write_buffer"], socket_transport.get_write_buffer_size())
                if session.stalled != (len(stalled_at) % 2 == 1):
                    stalled_at.append(loop.time())
                await asyncio.sleep(0.002)

        watcher = asyncio.create_task(watch())
        seen: set[str] = set()
        conn = await asyncpg.connect(database.dsn)
        try:
            for start in range(0, 2000, 100):
                await conn.execute(
                    "SELECT pg_notify($1, json_build_object('k', 'k' || g, 'pad', repeat('x', 1000))::text) "
                    "FROM generate_series($2::int, $2::int + 99) g", CHANNEL, start,
                )
        finally:
            await conn.close()
        async with asyncio.timeout(stall_timeout_s + 5):
            while len(seen) < 2000:
                frame = await bystander.recv_type("notify")
                assert all(len(frame["payloads"][key]["pad"]) == 1000 for key in frame["keys"])
                seen.update(frame["keys"])
        bystander_done = loop.time()
        # The bystander got every key while the stalled client was still connected, its flow going on after the
        # stall began: nothing waited for the stalled one.
        assert relay.hub.is_connected(session), "the bystander was only served once the stalled client was gone"
        assert stalled_at and stalled_at[0] < bystander_done, "the SSE client never stalled: the test proved nothing"
        # Bounded: its folded keys by max_pending_keys, its write buffer by the high-water mark plus one frame (at
        # most a catch-up of max_pending_keys keys), however long the flow (2,000 x 1 KB).
        assert peaks["pending_keys"] <= max_pending
        assert peaks["write_buffer"] <= high_water + max_pending * 1200, peaks
        # Notifications keep coming (one a tenth of a second) until the relay gives up on the stalled client: a
        # client whose last frames fit under the high-water mark is not stalled, by definition.
        draining = asyncio.create_task(bystander.frames_for(stall_timeout_s + 5))
        async with asyncio.timeout(stall_timeout_s + 5):
            while relay.hub.is_connected(session):
                await database.notify(CHANNEL, '{"k": "trickle", "pad": "%s"}' % ("x" * 1000))
                await asyncio.sleep(0.1)
        closed_after = loop.time() - stalled_at[-1]
        watcher.cancel()
        draining.cancel()
        assert closed_after >= stall_timeout_s * 0.9
        assert sample(relay, "slow_client_disconnects_total") == 1
    finally:
        stalled.close()


# Shutdown.


async def test_shutdown_ends_streams_with_a_close_and_the_chunked_terminator(
    make_relay: RelayFactory, database: Database, open_stream: StreamFactory,
) -> None:
    """On shutdown, an SSE stream ends with an event: close (code 1001) and an NDJSON stream with a close line, each
    after the last notify and followed by HTTP's chunked terminator."""
    relay = await make_relay(**{"coalesce.window_ms": 0})
    sse = await open_stream(relay, f"/sse?channel={CHANNEL}")
    ndjson = await open_stream(relay, f"/stream?channel={CHANNEL}")
    for stream in (sse, ndjson):
        await stream.opening()
    await database.notify(CHANNEL, "last")
    for stream in (sse, ndjson):
        assert (await stream.next_frame("notify")).frame["keys"] == ["last"]  # type: ignore[index]
    relay.request_stop()
    for stream in (sse, ndjson):
        items = []
        with pytest.raises(StreamEnded) as ended:
            while True:
                items.append(await stream.next(10))
        assert ended.value.clean, "the body ended without the chunked terminator"
        assert items and items[-1].kind == "close", items
        close = items[-1].frame
        assert close is not None and close["code"] == 1001 and close["reason"]


def write_config(path: Path, dsn: str, port: int) -> None:
    path.write_text(
        f'dsn = "{dsn}"\n[server]\nlisten = "127.0.0.1:{port}"\nkeepalive_s = 60\n'
        f"[coalesce]\nwindow_ms = 0\n[listener]\nheartbeat_interval_s = 1\nheartbeat_timeout_s = 1\n"
        f'[[channels]]\nname = "{CHANNEL}"\n'
    )


def ready(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=1) as response:
            return bool(response.status == 200)
    except OSError:
        return False


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
async def test_curl_follows_a_stream_until_sigterm_ends_it_cleanly(database: Database, tmp_path: Path) -> None:
    """`curl -N` on /stream and /sse prints each notify as it comes; SIGTERM to the daemon ends both with a close
    (1001) and the chunked terminator, so curl exits 0, and so does the daemon."""
    port = free_port()
    config = tmp_path / "relay.toml"
    write_config(config, database.dsn, port)
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    log = tmp_path / "relay.log"  # a file, not a pipe: a pipe nobody reads would block the daemon once full
    with log.open("wb") as log_file:
        daemon = subprocess.Popen(
            [sys.executable, "-m", "notifyrelay", "run", "--config", str(config), "--log-format", "json"],
            stdout=subprocess.DEVNULL, stderr=log_file, env=env,
        )
    curls: list[asyncio.subprocess.Process] = []
    try:
        deadline = time.monotonic() + 30
        while not await asyncio.to_thread(ready, port):
            if daemon.poll() is not None or time.monotonic() > deadline:
                daemon.kill()
                pytest.fail(f"the daemon did not get ready:\n{log.read_text()[-3000:]}")
            await asyncio.sleep(0.1)
        for path in ("/stream", "/sse"):
            curls.append(await asyncio.create_subprocess_exec(
                "curl", "-N", "-sS", "--fail-with-body", f"http://127.0.0.1:{port}{path}?channel={CHANNEL}&key=42",
                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
            ))
        ndjson, sse = curls

        async def line(process: asyncio.subprocess.Process) -> bytes:
            assert process.stdout is not None
            return await asyncio.wait_for(process.stdout.readline(), 5)

        assert msgspec.json.decode(await line(ndjson))["type"] == "welcome"
        assert msgspec.json.decode(await line(ndjson))["type"] == "ack"
        assert await line(sse) == b"retry: 2000\n"
        while await line(sse) != b"event: ack\n":
            pass
        assert (await line(sse)).startswith(b"data: ") and await line(sse) == b"\n"
        await database.notify(CHANNEL, "41", "42")
        notify = msgspec.json.decode(await line(ndjson))
        assert (notify["type"], notify["keys"]) == ("notify", ["42"])
        assert (await line(sse), await line(sse)) == (b"event: notify\n", f"id: {notify['ts']}\n".encode())
        daemon.send_signal(signal.SIGTERM)
        outputs = [await asyncio.wait_for(curl.communicate(), 10) for curl in curls]
        for curl, (_, stderr) in zip(curls, outputs, strict=True):
            assert curl.returncode == 0, stderr  # 18 would mean the body was cut off before its terminator
        ndjson_rest, sse_rest = (out for out, _ in outputs)
        assert msgspec.json.decode(ndjson_rest.splitlines()[-1])["code"] == 1001
        assert b"event: close\n" in sse_rest and b'"code":1001' in sse_rest
        assert await asyncio.to_thread(daemon.wait, 10) == 0
    finally:
        for curl in curls:
            if curl.returncode is None:
                curl.kill()
                await curl.wait()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait(10)


# A real SSE client library.


async def test_an_sse_client_library_reads_events_ids_and_the_close(
    make_relay: RelayFactory, database: Database,
) -> None:
    """httpx-sse, as a Python program would use it, parses the relay's events: the welcome, notify frames with the
    ts as the event id, and the close event at shutdown."""
    relay = await make_relay(**{"coalesce.window_ms": 0})
    url = f"http://127.0.0.1:{relay.server.port}/sse?channel={CHANNEL}&key=42"
    events = []
    async with httpx.AsyncClient(timeout=10) as http, aconnect_sse(http, "GET", url) as source:
        assert source.response.status_code == 200
        async for event in source.aiter_sse():
            events.append(event)
            if event.event == "ack":
                await database.notify(CHANNEL, "41", "42")
            elif event.event == "notify":
                relay.request_stop()
    # The stream opens with a lone "retry:" block; a browser's EventSource dispatches no event for it (its data is
    # empty), httpx-sse hands it over as an empty "message".
    assert (events[0].retry, events[0].data) == (2000, "")
    kinds = [event.event for event in events[1:]]
    assert kinds == ["welcome", "ack", "notify", "close"], kinds
    assert events[1].json()["protocol"] == 2
    notify = events[3].json()
    assert notify["keys"] == ["42"] and events[3].id == str(notify["ts"])
    assert events[4].json()["code"] == 1001
