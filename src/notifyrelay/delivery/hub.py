"""Fan-out: batches, status and resync frames to the websocket clients that follow them.

Each distinct frame is encoded once and written to every client that takes it. Writes never wait for a client:
while a client's write buffer is above its high-water mark (websockets pauses the connection), its notify frames
are not queued; their keys are folded into a per-client pending set per channel, bounded by what the client
follows (or by ``max_pending_keys``), and sent as one catch-up frame when it drains. A client stalled longer than
``stall_timeout_s`` is closed with 4000 by its connection (server.RelayConnection). So one stalled client can
neither delay nor bloat the others.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from websockets.asyncio.server import ServerConnection
from websockets.exceptions import ConnectionClosed
from websockets.frames import Frame, Opcode
from websockets.protocol import State

from .. import protocol
from ..config import ServerConfig
from ..delivery.subscriptions import SubscriptionIndex, TooManySubscriptions
from ..exceptions import SubscriptionError
from ..ops.metrics import Metrics
from ..pipeline.coalescer import Batch
from ..protocol import Subscribe, Unsubscribe

log = structlog.get_logger("notifyrelay.hub")

_ids = itertools.count(1)
FRAME_TYPES = ("welcome", "ack", "pong", "error", "notify", "status", "resync")


@dataclass(slots=True)
class Deferred:
    """Keys a stalled client has not been sent yet on one channel, folded like a window (last payload wins)."""

    seq: int
    keys: dict[str, Any] = field(default_factory=dict)
    with_payloads: bool = False


class Client:
    """One websocket connection as the hub sees it."""

    __slots__ = ("__weakref__", "catch_up", "connection", "deferred", "grants", "id", "lagged", "stalled_since")

    def __init__(self, connection: ServerConnection, grants: dict[str, frozenset[str] | None] | None = None) -> None:
        self.connection = connection
        self.id = next(_ids)
        # None: may follow anything. Else channel -> allowed keys, None meaning every key (auth mode jwt).
        self.grants = grants
        self.deferred: dict[str, Deferred] = {}
        self.lagged: dict[str, datetime] = {}  # channels whose deferred keys passed the bound: resync instead
        self.stalled_since: float | None = None
        self.catch_up: asyncio.Task[None] | None = None

    def write(self, frame: bytes) -> bool:
        """Write a text frame now, without waiting for the peer; False when the connection is not open."""
        connection = self.connection
        if connection.protocol.state is not State.OPEN:
            return False
        try:
            connection.protocol.send_text(frame)
            connection.send_data()
        except Exception:  # the transport is going away; its handler will notice and clean up
            return False
        return True

    def write_shared(self, frame: bytes, wire: bytes) -> bool:
        """Write a frame shared by many clients: ``wire`` is it already framed, used unless an extension
        (permessage-deflate) must transform it for this connection."""
        connection = self.connection
        protocol_ = connection.protocol
        if protocol_.extensions or protocol_.expect_continuation_frame:
            return self.write(frame)
        if protocol_.state is not State.OPEN:
            return False
        try:
            connection.transport.write(wire)
        except Exception:  # the transport is going away; its handler will notice and clean up
            return False
        return True


def wire_frame(frame: bytes) -> bytes:
    """A text frame as a server writes it (unmasked, no extensions): the same bytes for every client."""
    return Frame(Opcode.TEXT, frame).serialize(mask=False)


class Hub:
    """Clients, their subscriptions, and the fan-out of everything the relay tells them."""

    def __init__(self, settings: ServerConfig, channels: Iterable[str], metrics: Metrics) -> None:
        self.settings = settings
        self.channels = list(channels)
        self.index: SubscriptionIndex[Client] = SubscriptionIndex()
        self.clients: set[Client] = set()
        self.listener_is_up = False
        self._metrics = metrics
        self._sent = {kind: metrics.messages_sent.labels(kind) for kind in FRAME_TYPES}
        self._bytes = {kind: metrics.bytes_sent.labels(kind) for kind in FRAME_TYPES}

    # Clients and subscriptions.

    def add(self, client: Client) -> None:
        self.clients.add(client)
        self._metrics.clients.set(len(self.clients))

    def remove(self, client: Client) -> None:
        channels = self.index.channels_of(client)
        self.index.remove(client)
        self.clients.discard(client)
        if client.catch_up is not None:
            client.catch_up.cancel()
        self._metrics.clients.set(len(self.clients))
        for channel in channels:
            self._metrics.subscriptions.labels(channel).set(self.index.channel_count(channel))

    def subscribe(self, client: Client, command: Subscribe) -> None:
        """Apply a subscribe, or raise SubscriptionError with the code the client is told."""
        self._check_channel(command.channel, command.id)
        if client.grants is not None:
            allowed = client.grants.get(command.channel, frozenset())
            if allowed is not None and not all(key in allowed for key in command.keys):
                raise SubscriptionError(
                    "forbidden", f"your token does not allow following these keys on {command.channel!r}",
                    request_id=command.id,
                )
        try:
            self.index.subscribe(client, command.channel, command.keys, limit=self.settings.max_subscriptions)
        except TooManySubscriptions as exc:
            raise SubscriptionError(
                "too_many_subscriptions", str(exc), request_id=command.id, limit="max_subscriptions"
            ) from None
        self._metrics.subscriptions.labels(command.channel).set(self.index.channel_count(command.channel))

    def unsubscribe(self, client: Client, command: Unsubscribe) -> None:
        self._check_channel(command.channel, command.id)
        self.index.unsubscribe(client, command.channel, command.keys)
        self._metrics.subscriptions.labels(command.channel).set(self.index.channel_count(command.channel))

    def _check_channel(self, channel: str, request_id: str | None) -> None:
        if channel not in self.channels:
            raise SubscriptionError(
                "unknown_channel",
                f"channel {channel[:64]!r} is not relayed here; relayed channels: {', '.join(self.channels)}",
                request_id=request_id,
            )

    def set_channels(self, channels: Iterable[str]) -> None:
        """Adopt a new channel list (reload); subscribers of a removed channel are told with an error frame."""
        self.channels = list(channels)
        for channel in self.index.channels():
            if channel in self.channels:
                continue
            for client in self.index.drop_channel(channel):
                client.deferred.pop(channel, None)
                client.lagged.pop(channel, None)
                self.send(client, "error", protocol.error(
                    "unknown_channel", f"channel {channel!r} is no longer relayed; unsubscribed"
                ))
            self._metrics.subscriptions.labels(channel).set(0)

    # Fan-out (the coalescer's BatchSink).

    def publish(self, batch: Batch) -> None:
        wildcard, partial = self.index.route(batch.channel, batch.keys)
        if not wildcard and not partial:
            return
        everything = list(wildcard)
        groups: dict[tuple[str, ...], list[Client]] = {}
        for client, keys in partial.items():
            if len(keys) == len(batch.keys):
                everything.append(client)
            else:
                groups.setdefault(tuple(keys), []).append(client)
        if everything:
            self._deliver(everything, batch, batch.keys)
        for group_keys, clients in groups.items():
            self._deliver(clients, batch, list(group_keys))
        now = time.monotonic()
        observe = self._metrics.delivery_latency.observe
        for received in batch.received_at:
            observe(now - received)
        if batch.committed_at:
            # Wall clock against the database's: skew between the hosts shows here, so clamp it at zero.
            wall, since_commit = time.time(), self._metrics.commit_to_delivery.labels(batch.channel).observe
            for committed in batch.committed_at:
                since_commit(max(0.0, wall - committed))

    def _deliver(self, clients: list[Client], batch: Batch, keys: list[str]) -> None:
        frame = protocol.notify(batch.channel, batch.seq, keys, batch.payloads)
        wire = wire_frame(frame)  # framed once: server frames are unmasked, so every client gets the same bytes
        written = 0
        for client in clients:
            if client.stalled_since is not None or client.connection.paused:
                self._defer(client, batch, keys)
            elif client.write_shared(frame, wire):
                written += 1
        self._sent["notify"].inc(written)
        self._bytes["notify"].inc(written * len(frame))

    def _defer(self, client: Client, batch: Batch, keys: list[str]) -> None:
        if client.stalled_since is None:
            client.stalled_since = time.monotonic()
            self._metrics.slow_clients.inc()
            log.info("hub.client_stalled", client=client.id, remote=peer(client.connection))
            client.catch_up = asyncio.get_running_loop().create_task(self._catch_up(client))
        if batch.channel in client.lagged:
            return
        deferred = client.deferred.get(batch.channel)
        if deferred is None:
            deferred = client.deferred[batch.channel] = Deferred(batch.seq, with_payloads=batch.payloads is not None)
        deferred.seq = batch.seq
        payloads = batch.payloads
        for key in keys:
            deferred.keys[key] = payloads[key] if payloads is not None else None
        if len(deferred.keys) > self.settings.max_pending_keys:
            # A "*" follower of a busy channel (or one following more keys than the bound): keep no keys, tell it
            # to refetch when it drains.
            del client.deferred[batch.channel]
            client.lagged[batch.channel] = datetime.now(UTC)

    async def _catch_up(self, client: Client) -> None:
        """Wait for a stalled client to drain, then send what it missed as one frame per channel. One that never
        drains is closed by its connection's stall watchdog (server.RelayConnection), which ends this wait."""
        connection = client.connection
        try:
            while True:
                await connection.drain()
                if connection.protocol.state is not State.OPEN:
                    return
                now = datetime.now(UTC)
                lagged, client.lagged = client.lagged, {}
                deferred, client.deferred = client.deferred, {}
                for channel, since in lagged.items():
                    self.send(client, "resync", protocol.resync(channel, "slow_client", since, now))
                for channel, keys in deferred.items():
                    # Only what the client still follows: it may have unsubscribed, or a reload removed the channel.
                    still = [key for key in keys.keys if self.index.follows(client, channel, key)]
                    if still:
                        payloads = keys.keys if keys.with_payloads else None
                        self.send(client, "notify", protocol.notify(channel, keys.seq, still, payloads))
                if not connection.paused:
                    client.stalled_since = None
                    log.info("hub.client_caught_up", client=client.id)
                    return
        except (ConnectionClosed, OSError):
            return
        finally:
            client.catch_up = None

    def send(self, client: Client, kind: str, frame: bytes) -> None:
        """Write one frame of type ``kind`` to one client now, counted in the metrics."""
        self._broadcast((client,), kind, frame)

    def _broadcast(self, clients: Iterable[Client], kind: str, frame: bytes) -> None:
        """Write one frame of type ``kind`` to each of ``clients`` now, counted in the metrics."""
        written = sum(1 for client in clients if client.write(frame))
        self._sent[kind].inc(written)
        self._bytes[kind].inc(written * len(frame))

    def resync(self, channel: str, reason: str, gap_start: datetime, gap_end: datetime) -> None:
        """Tell every subscriber of a channel to refetch: notifications may have been missed."""
        subscribers = self.index.subscribers(channel)
        if subscribers:
            self._broadcast(subscribers, "resync", protocol.resync(channel, reason, gap_start, gap_end))

    # The listener's observer.

    def listener_down(self) -> None:
        self.listener_is_up = False
        self._broadcast(self.clients, "status", protocol.status(False))

    def listener_up(self, channels: list[str], gap_start: datetime, gap_end: datetime, reason: str) -> None:
        # Order matters to clients: resync for every channel first, then status up.
        for channel in channels:
            self.resync(channel, reason, gap_start, gap_end)
        self.listener_is_up = True
        self._broadcast(self.clients, "status", protocol.status(True))

    async def close_all(self, code: int, reason: str) -> None:
        """Close every client with ``code`` and wait (bounded by the connections' close timeout)."""
        await asyncio.gather(*(close_bounded(c.connection, code, reason) for c in list(self.clients)))


async def close_bounded(connection: ServerConnection, code: int, reason: str, grace_s: float = 2.0) -> None:
    """Close with ``code``; a peer that does not finish the handshake within ``grace_s`` is cut off.

    websockets' close() first waits for the write buffer to drain, which a stalled peer never lets happen.
    """
    try:
        async with asyncio.timeout(grace_s):
            await connection.close(code, reason)
    except Exception:  # the grace ran out (TimeoutError), or the connection was already going: cut it
        connection.transport.abort()


def peer(connection: ServerConnection) -> str:
    """The peer's address as host:port, for log lines."""
    try:
        host, port = connection.remote_address[:2]
        return f"{host}:{port}"
    except (TypeError, ValueError):
        return "?"
