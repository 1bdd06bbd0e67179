"""Server edges found in review: a sender that never reads, repeated headers, probes during shutdown."""

from __future__ import annotations

import asyncio
import socket

import msgspec
from websockets.asyncio.client import connect

from tests.conftest import ClientFactory, RelayFactory, sample, wait_until
from tests.integration.test_relay import probe


async def raw_get(port: int, headers: list[tuple[str, str]]) -> int:
    """The status code of a websocket upgrade request with exactly these extra headers (repeats allowed)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    lines = ["GET /ws HTTP/1.1", f"Host: 127.0.0.1:{port}", "Upgrade: websocket", "Connection: Upgrade",
             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==", "Sec-WebSocket-Version: 13"]
    lines += [f"{name}: {value}" for name, value in headers]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    status = await asyncio.wait_for(reader.readline(), 5)
    writer.close()
    return int(status.split()[1])


async def test_a_sender_that_never_reads_loses_its_slot(make_relay: RelayFactory, make_client: ClientFactory) -> None:
    """A client that keeps sending but never reads the answers is closed after stall_timeout_s, freeing its slot."""
    relay = await make_relay(**{"server.stall_timeout_s": 0.5, "server.write_high_water_bytes": 1024,
                                "server.rate_limit_per_s": 100000.0, "server.rate_limit_burst": 100000,
                                "server.max_connections": 2, "server.max_subscriptions": 1000})
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", relay.server.port))
    hog = await connect(relay.server.url, sock=sock, max_queue=1)
    frame = msgspec.json.encode({"op": "subscribe", "channel": "activity_progress",
                                 "keys": [f"key-{n:05d}" for n in range(900)]}).decode()
    try:
        async with asyncio.timeout(20):
            while sample(relay.metrics, "notifyrelay_slow_client_disconnects_total") == 0:
                await hog.send(frame)  # every ack is as big as the frame, and none is read
    except Exception:  # the relay cut us off mid-send: that is the point
        pass
    await wait_until(lambda: sample(relay.metrics, "notifyrelay_slow_client_disconnects_total") == 1, timeout=10)
    await wait_until(lambda: not relay.hub.transports, timeout=10)
    hog.transport.abort()
    client = await make_client(relay)  # the slot is free again
    await client.send({"op": "ping"})
    assert (await client.recv())["type"] == "pong"


async def test_repeated_origin_or_authorization_headers_are_refused_cleanly(make_relay: RelayFactory) -> None:
    """A repeated Origin gets 403 and a repeated Authorization 401, not a 500 with a traceback."""
    relay = await make_relay(**{"server.allowed_origins": ["https://app.example"]})
    port = relay.server.port
    assert await raw_get(port, [("Origin", "https://app.example"), ("Origin", "https://evil.example")]) == 403
    assert await raw_get(port, [("Origin", "https://app.example")]) == 101


async def test_probes_answer_during_shutdown(make_relay: RelayFactory, make_client: ClientFactory) -> None:
    """While shutdown waits for a client that does not answer the close, /healthz is 200, /readyz 503 saying why,
    and new websocket handshakes get 503."""
    relay = await make_relay()
    client = await make_client(relay)
    client.connection.transport.pause_reading()  # it will not answer the 1001 close: shutdown waits its grace
    relay.request_stop()
    await wait_until(lambda: relay.readiness.shutting_down)
    assert (await probe(relay, "/healthz"))[0] == 200
    status, _, body = await probe(relay, "/readyz")
    assert status == 503 and "shutting down" in body
    assert await raw_get(relay.server.port, []) == 503
    client.connection.transport.resume_reading()


async def test_head_and_keep_alive_requests_are_answered_on_one_connection(make_relay: RelayFactory) -> None:
    """HEAD on a probe gets headers only, and a second request on the same kept-alive connection is answered too
    (no traceback, no dropped connection)."""
    relay = await make_relay()
    reader, writer = await asyncio.open_connection("127.0.0.1", relay.server.port)
    try:
        writer.write(b"HEAD /healthz HTTP/1.1\r\nHost: x\r\n\r\nGET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and b"content-length: 3" in head.lower()
        second = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert second.startswith(b"HTTP/1.1 200")
        assert await asyncio.wait_for(reader.readexactly(3), 5) == b"ok\n"
    finally:
        writer.close()
