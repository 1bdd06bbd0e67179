"""Fan-out: batches, snapshots, status and resync frames to the sessions that follow them, over any transport.

Each distinct frame is encoded once (and framed once per framing, delivery/transport.py) and written to every
client that takes it. Writes never wait for a client: while a client's transport is paused (its write buffer above
the high-water mark) its live batches are folded into its session (delivery/session.py) and sent as one catch-up
when it drains; its transport closes it after ``stall_timeout_s``. So one stalled client can neither delay nor
bloat the others.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Iterable, Mapping
from datetime import UTC, datetime
from typing import Any

import structlog

from .. import protocol
from ..config import ServerConfig
from ..exceptions import ProtocolError, SubscriptionError
from ..ops.metrics import Metrics
from ..pipeline.coalescer import Batch
from ..pipeline.streams import Refresh
from ..protocol import Command, Ping, Subscribe, Unsubscribe
from .session import Grants, Session
from .subscriptions import SubscriptionIndex
from .transport import OutFrame, Transport

log = structlog.get_logger("notifyrelay.hub")

FRAME_TYPES = ("welcome", "ack", "pong", "error", "notify", "snapshot", "status", "resync", "close")
TRANSPORTS = ("websocket", "sse", "ndjson")


class Hub:
    """Sessions and their transports, the subscription index, and the fan-out of everything the relay says."""

    def __init__(
        self, settings: ServerConfig, channels: Iterable[str], metrics: Metrics, *, instance: str, window_ms: int,
    ) -> None:
        self.settings = settings
        self.channels = list(channels)
        self.instance = instance
        self.window_ms = window_ms
        self.index: SubscriptionIndex[Session] = SubscriptionIndex()
        self.transports: dict[Session, Transport] = {}
        self.stateful: set[str] = set()  # state channels: catch-ups are refetches; shared with every session
        self.progress_channels: set[str] = set()  # state channels with [channels.progress]
        self.listener_is_up = False
        # Snapshot and replay requests go back up to the channel's stream (app.py wires Pipeline.request here).
        self.request: Callable[[Session, Refresh], None] = lambda session, refresh: None
        self._metrics = metrics
        self._empty = asyncio.Event()
        self._sent = {(kind, name): metrics.messages_sent.labels(kind, name) for kind in FRAME_TYPES
                      for name in TRANSPORTS}
        self._bytes = {kind: metrics.bytes_sent.labels(kind) for kind in FRAME_TYPES}
        self._clients = {name: metrics.clients.labels(name) for name in TRANSPORTS}

    # Sessions.

    def open(self, transport: Transport, grants: Grants | None) -> Session:
        """A client connected: make its session and send its welcome."""
        settings = self.settings
        session = Session(
            grants=grants, rate_per_s=settings.rate_limit_per_s, burst=settings.rate_limit_burst,
            now=time.monotonic(), stateful=self.stateful, transport=transport.name,
        )
        self.transports[session] = transport
        self._clients[transport.name].inc()
        self.send(session, "welcome", protocol.welcome(
            window_ms=self.window_ms, channels=self.channels, listener_up=self.listener_is_up, instance=self.instance,
        ))
        return session

    def close(self, session: Session) -> None:
        """A client is gone: forget it everywhere (idempotent)."""
        transport = self.transports.pop(session, None)
        if transport is None:
            return
        if not self.transports:
            self._empty.set()
        self._clients[transport.name].dec()
        for channel, keys in list(session.follows.items()):
            self.index.discard(session, channel, keys)
            self._metrics.subscriptions.labels(channel).set(self.index.count(channel))
        session.follows.clear()
        session.pending.clear()

    def is_connected(self, session: Session) -> bool:
        return session in self.transports

    def subscribers(self, channel: str) -> list[Session]:
        return self.index.subscribers(channel)

    def __len__(self) -> int:
        return len(self.transports)

    # Commands.

    def receive(self, session: Session, message: str | bytes) -> bool:
        """A frame from a client: answer it. False when the client keeps pushing past its rate: close it (1008)."""
        if not session.admit(time.monotonic()):
            self._metrics.limit_hits["rate_limit"].inc()
            if session.rate.exhausted:
                return False
            self.reply_error(session, session.refusal())
            return True
        try:
            command = protocol.parse_frame(message, max_key_bytes=self.settings.max_key_bytes)
        except ProtocolError as exc:
            self.reply_error(session, exc)
        else:
            self.execute(session, command)
        return True

    def execute(self, session: Session, command: Command) -> None:
        if isinstance(command, Ping):
            self.send(session, "pong", protocol.pong(command.id))
            return
        try:
            if isinstance(command, Subscribe):
                self.subscribe(session, command)
                return
            self.unsubscribe(session, command)
        except ProtocolError as exc:
            self.reply_error(session, exc)

    def subscribe(self, session: Session, command: Subscribe) -> None:
        """Take a subscribe, ack it, and queue its snapshot (state channels) or replay (``since``); or raise
        SubscriptionError with the code the client is told."""
        self._check_channel(command.channel, command.id)
        settings = self.settings
        new = session.subscribe(command, limit=settings.max_subscriptions, relay_limit=settings.max_total_subscriptions,
                                relay_held=sum(self.index.count(channel) for channel in self.channels))
        self.index.add(session, command.channel, new)
        self._metrics.subscriptions.labels(command.channel).set(self.index.count(command.channel))
        self.send(session, "ack", protocol.ack(command))
        if command.since is not None:
            self.request(session, Refresh(command.channel, command.keys, command.since, "resume"))
        elif command.channel in self.stateful:
            self.request(session, Refresh(command.channel, command.keys, None, "subscribe"))

    def unsubscribe(self, session: Session, command: Unsubscribe) -> None:
        self._check_channel(command.channel, command.id)
        gone = session.unsubscribe(command)
        self.index.discard(session, command.channel, gone)
        self._metrics.subscriptions.labels(command.channel).set(self.index.count(command.channel))
        self.send(session, "ack", protocol.ack(command))

    def _check_channel(self, channel: str, request_id: str | None) -> None:
        if channel not in self.channels:
            raise SubscriptionError(
                "unknown_channel",
                f"channel {channel[:64]!r} is not relayed here; relayed channels: {', '.join(self.channels)}",
                request_id=request_id,
            )

    def reply_error(self, session: Session, exc: ProtocolError) -> None:
        self._metrics.client_errors.labels(exc.code).inc()
        if exc.limit is not None and exc.limit != "rate_limit":  # rate refusals are counted where they happen
            self._metrics.limit_hits[exc.limit].inc()
        self.send(session, "error", protocol.error(exc.code, exc.message, exc.request_id))

    def set_channels(self, channels: Iterable[str], stateful: Iterable[str], *, progress: Iterable[str] = ()) -> None:
        """Adopt a channel list (start, reload); subscribers of a removed channel are told with an error frame.
        ``stateful``: channels whose rows are fetched; ``progress``: those with progress (``until=done``)."""
        self.channels = list(channels)
        self.stateful.clear()
        self.stateful.update(stateful)
        self.progress_channels = set(progress) & self.stateful
        for session in list(self.transports):
            for channel in [c for c in session.follows if c not in self.channels]:
                self.index.discard(session, channel, session.forget_channel(channel))
                self._metrics.subscriptions.labels(channel).set(0)
                self.send(session, "error", protocol.error(
                    "unknown_channel", f"channel {channel!r} is no longer relayed; unsubscribed"
                ))

    # Fan-out.

    def publish(self, batch: Batch) -> None:
        """Send a batch to its followers: one frame for those that take every key, one per distinct key set."""
        wildcard, partial = self.index.route(batch.channel, batch.keys)
        if wildcard or partial:
            everything = list(wildcard)
            groups: dict[tuple[str, ...], list[Session]] = {}
            for session, keys in partial.items():
                if len(keys) == len(batch.keys):
                    everything.append(session)
                else:
                    groups.setdefault(tuple(keys), []).append(session)
            # Frames written, by transport, and their bytes: counted here, added to the metrics once per batch (a
            # prometheus increment takes a lock; with a frame per client it was a fifth of the relay's time).
            written: dict[str, int] = {}
            size = 0
            frames = protocol.NotifyFrames(batch.channel, batch.seq, batch.ts, batch.payloads, state=batch.state)
            if everything:
                size += self._deliver(everything, batch, frames, batch.keys, written)
            for group_keys, sessions in groups.items():
                size += self._deliver(sessions, batch, frames, list(group_keys), written)
            for name, count in written.items():
                self._sent["notify", name].inc(count)
            if size:
                self._bytes["notify"].inc(size)
            if written and batch.received_at:
                # Once per batch, from its oldest notification: how long its longest-waiting change took to go out
                # (one observation per key took prometheus-client's lock once per key of every batch).
                self._metrics.delivery_latency.observe(time.monotonic() - min(batch.received_at))
        if batch.committed_at:
            # Wall clock against the database's: skew between the hosts shows here, so clamp it at zero.
            wall, since_commit = time.time(), self._metrics.commit_to_delivery.labels(batch.channel).observe
            for committed in batch.committed_at:
                since_commit(max(0.0, wall - committed))

    def _deliver(
        self, sessions: list[Session], batch: Batch, frames: protocol.NotifyFrames, keys: list[str],
        written: dict[str, int],
    ) -> int:
        """Write one frame of ``keys`` to ``sessions`` (or fold it for those that cannot take it now); count the
        frames written into ``written`` by transport, and return their bytes. The hot loop of fan-out: _write is
        inlined."""
        frame: OutFrame | None = None
        channel = batch.channel
        fold_at = None
        transports = self.transports
        count = 0
        for session in sessions:
            if session.stalled or (session.pending and not session.takes_live(channel)):
                fold_at = fold_at or datetime.now(UTC)
                session.fold(channel, batch.seq, batch.ts, keys, batch.payloads,
                             max_keys=self.settings.max_pending_keys, now=fold_at)
                continue
            if frame is None:
                frame = OutFrame("notify", frames.frame(keys), batch.ts)
            transport = transports.get(session)
            if transport is not None and transport.write(frame):
                written[transport.name] = written.get(transport.name, 0) + 1
                count += 1
            if session.done is not None and batch.state is not None:  # until=done streams only: rare, off the hot path
                self._note_progress(session, channel, protocol.finished(batch.state) or {})
        return len(frame.body) * count if frame is not None else 0

    def send(
        self, session: Session, kind: str, body: bytes, ts: int | None = None, *, channel: str = "",
        progress: Mapping[str, Any] | None = None,
    ) -> None:
        """Write one frame of type ``kind`` to one client now (``progress``: what it says of ``channel``'s keys,
        for ``until=done``)."""
        self._write(session, OutFrame(kind, body, ts))
        if progress and session.done is not None:
            self._note_progress(session, channel, progress)

    def _note_progress(self, session: Session, channel: str, progress: Mapping[str, Any]) -> None:
        mine = {key: figures for key, figures in progress.items() if session.follows_key(channel, key)}
        if session.note_progress(channel, mine):
            transport = self.transports.get(session)
            if transport is not None:
                transport.close(1000, "done: every followed key reached a terminal status")

    def _write(self, session: Session, frame: OutFrame) -> None:
        transport = self.transports.get(session)
        if transport is not None and transport.write(frame):
            self._sent[frame.kind, transport.name].inc()
            self._bytes[frame.kind].inc(len(frame.body))

    def broadcast(self, sessions: Iterable[Session], kind: str, body: bytes, ts: int | None = None) -> None:
        frame = OutFrame(kind, body, ts)
        for session in sessions:
            self._write(session, frame)

    def resync(self, channel: str, reason: str, gap_start: datetime, gap_end: datetime, ts: int) -> None:
        """Tell every subscriber of a (hint) channel to refetch: notifications may have been missed."""
        subscribers = self.index.subscribers(channel)
        if subscribers:
            self.broadcast(subscribers, "resync", protocol.resync(channel, reason, gap_start, gap_end, ts), ts)

    # Slow clients: their transport says when they stall and drain.

    def stalled(self, session: Session) -> None:
        if not session.stalled:
            session.stalled = True
            self._metrics.slow_clients.inc()
            log.info("hub.client_stalled", client=session.id, transport=session.transport)

    def drained(self, session: Session) -> None:
        """The client's transport can take frames again: send what it missed (refetches go to the streams)."""
        if not session.stalled or session not in self.transports:
            return
        session.stalled = False
        frames, refreshes = session.catch_up(datetime.now(UTC), int(time.time() * 1000))
        for kind, body, ts in frames:
            self.send(session, kind, body, ts)
        for refresh in refreshes:
            self.request(session, refresh)
        log.info("hub.client_caught_up", client=session.id)

    # The listener's state (through the pipeline, which orders it after every channel's resync).

    def listener_down(self) -> None:
        self.listener_is_up = False
        self.broadcast(list(self.transports), "status", protocol.status(False))

    def listener_up(self) -> None:
        self.listener_is_up = True
        self.broadcast(list(self.transports), "status", protocol.status(True))

    def close_all(self, code: int, reason: str) -> None:
        """Start closing every client with ``code`` (the transports bound how long that may take)."""
        for transport in list(self.transports.values()):
            transport.close(code, reason)

    async def emptied(self) -> None:
        """Wait until every client is gone."""
        while self.transports:
            self._empty.clear()
            await self._empty.wait()

