"""The ordered, asynchronous stages between the coalescer and the fan-out: one stream per channel.

    coalescer --Batch--> ChannelStream(channel) --> [history] --> [state: one query] --> hub

Each channel has its own queue and worker task, so a slow state query on one channel never delays another, and
the coalescer only appends (it never waits). Inside a channel everything goes in one order: batches, snapshot and
replay requests, and listener gaps. That single order is what makes the promises hold: a client never receives a
row older than one it already has (rows are fetched and sent in stream order), a replay is sent before any live
frame of its channel (the client's live batches are folded meanwhile and sent with it), and after a listener gap
the clients hear ``resync`` (or get a snapshot) for every channel before ``status`` up.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NamedTuple, Protocol

import structlog

from .. import protocol
from ..config import ChannelConfig, HistoryConfig
from ..ops.metrics import Metrics
from .coalescer import Batch
from .history import ChannelHistory

log = structlog.get_logger("notifyrelay.streams")


class Refresh(NamedTuple):
    """A request to a stream: send one client the current state of a channel's keys.

    ``keys`` None means everything the client follows; ``since`` asks for a replay from that resume position;
    ``reason`` is why (subscribe, slow_client, a gap's reason)."""

    channel: str
    keys: tuple[str, ...] | None
    since: int | None
    reason: str


class Follower(Protocol):
    """A client as the streams see it (delivery/session.py's Follower)."""

    def follows_key(self, channel: str, key: str) -> bool: ...

    def followed(self, channel: str) -> frozenset[str]: ...

    def begin_refresh(self, channel: str) -> None: ...

    def claim_pending(self, channel: str) -> tuple[list[str], bool, dict[str, Any] | None]: ...

    def end_refresh(self, channel: str) -> None: ...


class StateSource(Protocol):
    """A state channel's row fetcher (pipeline/state.py's ChannelState). Never raises."""

    async def fetch(self, keys: Sequence[str]) -> protocol.Rows: ...

    async def fetch_list(self) -> protocol.Rows | None: ...


class Delivery(Protocol):
    """Where the streams deliver (the hub). Its sessions are Followers; typed Any here so that the hub may name
    its own session class."""

    def publish(self, batch: Batch) -> None: ...

    def resync(self, channel: str, reason: str, gap_start: datetime, gap_end: datetime, ts: int) -> None: ...

    def subscribers(self, channel: str) -> list[Any]: ...

    def is_connected(self, session: Any) -> bool: ...

    def send(
        self, session: Any, kind: str, body: bytes, ts: int | None = None, *, channel: str = "",
        progress: Mapping[str, Any] | None = None,
    ) -> None: ...

    def listener_down(self) -> None: ...

    def listener_up(self) -> None: ...


@dataclass(slots=True)
class Gap:
    """Notifications of a channel may have been missed between ``gap_start`` and ``gap_end``."""

    channel: str
    reason: str
    gap_start: datetime
    gap_end: datetime
    done: asyncio.Future[None] | None = None


@dataclass(slots=True)
class Order:
    """One client's refresh request (a snapshot or a replay), served in stream order."""

    session: Follower
    refresh: Refresh


Event = Batch | Gap | Order


@dataclass(slots=True)
class Plan:
    """How one refresh request is served: a frame ``kind`` (snapshot, replay, catch_up, resync) over ``keys``,
    plus ``list_query``'s rows when ``listed`` (a "*" follower)."""

    order: Order
    kind: str
    keys: list[str] = field(default_factory=list)
    listed: bool = False
    payloads: dict[str, Any] | None = None
    reason: str = ""


@dataclass(slots=True)
class Merged:
    """list_query's rows overlaid with the newer rows of a keys' query (its ``gone`` removes listed keys)."""

    rows: dict[str, Any]
    gone: list[str]
    progress: dict[str, Any] | None
    error: str | None
    error_keys: list[str]

    @classmethod
    def of(cls, listed: protocol.Rows, newer: protocol.Rows | None) -> Merged:
        if newer is None:
            return cls(dict(listed.rows), list(listed.gone), listed.progress, listed.error, list(listed.error_keys))
        rows = {**listed.rows, **newer.rows}
        for key in newer.gone:
            rows.pop(key, None)
        progress = None
        if listed.progress is not None or newer.progress is not None:
            progress = {**(listed.progress or {}), **(newer.progress or {})}
        return cls(rows, list(newer.gone), progress, newer.error or listed.error,
                   [*listed.error_keys, *newer.error_keys])


def _unique(*groups: Iterable[str]) -> list[str]:
    return list(dict.fromkeys(key for group in groups for key in group))


def _ms(moment: datetime) -> int:
    return int(moment.timestamp() * 1000)


def _utc_ms(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)


class ChannelStream:
    """One channel's queue and the worker that takes its events through history, state and delivery in order."""

    def __init__(
        self,
        channel: str,
        *,
        history: ChannelHistory,
        delivery: Delivery,
        metrics: Metrics,
        overlap_ms: int,
        state: StateSource | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.channel = channel
        self.history = history
        self.state = state
        self.overlap_ms = overlap_ms
        self._delivery = delivery
        self._metrics = metrics
        self._wall_clock = wall_clock
        self._events: deque[Event] = deque()
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._events)

    def put(self, event: Event) -> None:
        """Append an event (never blocks)."""
        self._events.append(event)
        self._idle.clear()
        self._wake.set()

    async def idle(self) -> None:
        """Wait until everything put so far has been delivered."""
        await self._idle.wait()

    async def run(self) -> None:
        """Deliver events in order until cancelled."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._events:
                event = self._events.popleft()
                try:
                    if isinstance(event, Batch):
                        await self._batch(self._merge_backlog(event))
                    elif isinstance(event, Order):
                        await self._refresh(self._take_orders(event))
                    else:
                        await self._gap(event)
                except asyncio.CancelledError:
                    raise
                except Exception:  # a bug in one event must not stop the channel
                    log.exception("streams.event_failed", channel=self.channel, kind=type(event).__name__)
                finally:
                    if isinstance(event, Gap) and event.done is not None and not event.done.done():
                        event.done.set_result(None)
            self._idle.set()

    def _merge_backlog(self, batch: Batch) -> Batch:
        """Batches that queued up behind a slow state query are fetched as one: the newest seq and ts, every key
        once (the last payload wins). Hint channels never wait, so they never queue up."""
        if self.state is None:
            return batch
        while self._events and isinstance(self._events[0], Batch):
            later = self._events.popleft()
            assert isinstance(later, Batch)
            keys = dict.fromkeys(batch.keys)
            keys.update(dict.fromkeys(later.keys))
            payloads = None
            if batch.payloads is not None or later.payloads is not None:
                payloads = {**(batch.payloads or {}), **(later.payloads or {})}
            batch = Batch(
                channel=batch.channel, seq=later.seq, keys=list(keys), payloads=payloads, ts=later.ts,
                received_at=batch.received_at + later.received_at, committed_at=batch.committed_at + later.committed_at,
            )
        return batch

    def _take_orders(self, first: Order) -> list[Order]:
        """Refresh requests queued together are served by one query."""
        orders = [first]
        while self._events and isinstance(self._events[0], Order):
            order = self._events.popleft()
            assert isinstance(order, Order)
            orders.append(order)
        return orders

    async def _batch(self, batch: Batch) -> None:
        self.history.record(batch.keys, batch.seq, batch.ts)
        self._metrics.history_keys.labels(self.channel).set(len(self.history))
        if self.state is not None:
            batch.state = await self.state.fetch(batch.keys)
        self._delivery.publish(batch)

    async def _gap(self, gap: Gap) -> None:
        if self.state is None:
            self._delivery.resync(self.channel, gap.reason, gap.gap_start, gap.gap_end, self._now_ms())
            return
        # A state channel refetches for its clients instead: every subscriber gets a snapshot of what it follows.
        orders = [
            Order(session, Refresh(self.channel, None, None, gap.reason))
            for session in self._delivery.subscribers(self.channel)
        ]
        for order in orders:
            order.session.begin_refresh(self.channel)
        if orders:
            await self._refresh(orders)

    async def _refresh(self, orders: list[Order]) -> None:
        """Serve snapshot and replay requests: decide each one's keys, fetch them all with one query (and
        ``list_query`` once, first, when a ``*`` follower needs it), then send each client its frame."""
        plans = []
        for order in orders:
            plan = self._plan(order)
            if plan is None:
                order.session.end_refresh(self.channel)
            else:
                plans.append(plan)
        if not plans:
            return
        listed: protocol.Rows | None = None
        fetched: protocol.Rows | None = None
        if self.state is not None:
            # list_query first and the keys' query second, so that where both return a key the newer row wins:
            # rows are sent in the order they were fetched, never backwards.
            if any(plan.listed for plan in plans):
                listed = await self.state.fetch_list()
            wanted = list(dict.fromkeys(key for plan in plans for key in plan.keys))
            fetched = await self.state.fetch(wanted) if wanted else None
        for plan in plans:
            session = plan.order.session
            if self._delivery.is_connected(session):
                self._send(plan, listed, fetched)
            session.end_refresh(self.channel)

    def _plan(self, order: Order) -> Plan | None:
        """What one request needs, or None when there is nothing to send."""
        session, refresh = order.session, order.refresh
        if not self._delivery.is_connected(session):
            return None
        claimed, lagged, payloads = session.claim_pending(self.channel)
        followed = session.followed(self.channel)
        state = self.state is not None

        def everything(reason: str) -> Plan:
            if not state:
                return Plan(order, "resync", reason=reason)
            if protocol.WILDCARD in followed:
                return Plan(order, "snapshot", claimed, listed=True, reason=reason)
            return Plan(order, "snapshot", sorted(followed))

        if refresh.since is not None:
            changed = self.history.changed_since(
                refresh.since - self.overlap_ms, lambda key: session.follows_key(self.channel, key)
            )
            if changed is not None and not lagged:
                self._metrics.resumes.labels("replayed").inc()
                keys = _unique(changed, claimed)
                return Plan(order, "replay", keys, payloads=payloads) if keys else None
            self._metrics.resumes.labels("snapshot" if state else "resync").inc()
            return everything("history_gap")
        if lagged:
            return everything(refresh.reason if refresh.reason != "subscribe" else "slow_client")
        if refresh.reason == "subscribe":
            if not state:
                return Plan(order, "catch_up", claimed, payloads=payloads) if claimed else None
            if refresh.keys is None or protocol.WILDCARD in refresh.keys:
                return Plan(order, "snapshot", claimed, listed=True, reason="subscribe")
            return Plan(order, "snapshot", _unique(refresh.keys, claimed))
        if refresh.keys is None:
            return everything(refresh.reason)
        keys = [key for key in _unique(refresh.keys, claimed) if session.follows_key(self.channel, key)]
        return Plan(order, "catch_up", keys, payloads=payloads) if keys else None

    def _send(self, plan: Plan, listed: protocol.Rows | None, fetched: protocol.Rows | None) -> None:
        session, refresh = plan.order.session, plan.order.refresh
        ts = self._now_ms()
        no_list = plan.listed and listed is None  # a "*" follower of a state channel without list_query
        if plan.kind == "resync" or (no_list and plan.reason != "subscribe"):
            # A hint channel, or "*" without list_query after a gap or a lag: the client refetches.
            start = _utc_ms(refresh.since) if refresh.since is not None else _utc_ms(ts)
            body = protocol.resync(self.channel, plan.reason, start, _utc_ms(ts), ts)
            self._delivery.send(session, "resync", body, ts)
            return
        source: protocol.Rows | None = fetched
        keys = plan.keys
        if plan.listed and listed is not None:
            source = Merged.of(listed, fetched)
            keys = _unique(list(source.rows), keys)
        keys = [key for key in keys if session.follows_key(self.channel, key)]
        kind = "snapshot" if plan.kind == "snapshot" and (listed is not None or not plan.listed) else "notify"
        if source is None and self.state is not None:
            return  # nothing was asked of the database for this one
        if kind == "snapshot":
            assert source is not None
            body = protocol.snapshot(self.channel, self.history.seq, ts, keys, source)
            self._metrics.snapshots.labels(self.channel).inc()
        elif keys:
            ts = ts if source is not None else (self.history.ts or ts)
            body = protocol.notify(self.channel, self.history.seq, ts, keys, plan.payloads, state=source,
                                   replay=plan.kind == "replay")
        else:
            return
        self._delivery.send(session, kind, body, ts, channel=self.channel, progress=protocol.finished(source))

    def _now_ms(self) -> int:
        return max(int(self._wall_clock() * 1000), self.history.ts)


class Pipeline:
    """Every channel's stream, and the listener's observer: its ups and downs become ordered stream events."""

    def __init__(
        self,
        channels: Iterable[ChannelConfig],
        *,
        history: HistoryConfig,
        delivery: Delivery,
        metrics: Metrics,
        states: Mapping[str, StateSource] | None = None,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self._history_settings = history
        self._delivery = delivery
        self._metrics = metrics
        self._wall_clock = wall_clock
        self.streams: dict[str, ChannelStream] = {}
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._running = False
        self._status_up: asyncio.Task[None] | None = None
        self._failure: asyncio.Future[None] | None = None
        self.listening = False  # LISTEN is in force: channels a reload adds are vouched for from then on
        self.set_channels(channels, states or {})

    def set_channels(self, channels: Iterable[ChannelConfig], states: Mapping[str, StateSource]) -> None:
        """Adopt a channel list (start, reload): new channels get a stream, removed ones stop after their queue."""
        wanted = {c.name for c in channels}
        for name in list(self.streams):
            if name not in wanted:
                stream = self.streams.pop(name)
                task = self._tasks.pop(name, None)
                if task is not None:
                    asyncio.get_running_loop().create_task(_stop_after_idle(stream, task))
        for name in wanted:
            existing = self.streams.get(name)
            if existing is None:
                stream = self.streams[name] = ChannelStream(
                    name, history=ChannelHistory(self._history_settings.max_keys), delivery=self._delivery,
                    metrics=self._metrics, overlap_ms=self._history_settings.overlap_ms,
                    wall_clock=self._wall_clock,
                )
                if self._running:
                    self._start(stream)
            else:
                stream = existing
            stream.state = states.get(name)
            stream.overlap_ms = self._history_settings.overlap_ms

    def stateful(self) -> set[str]:
        return {name for name, stream in self.streams.items() if stream.state is not None}

    def _start(self, stream: ChannelStream) -> None:
        task = asyncio.get_running_loop().create_task(stream.run(), name=f"stream:{stream.channel}")
        task.add_done_callback(self._worker_ended)
        self._tasks[stream.channel] = task

    def _worker_ended(self, task: asyncio.Task[None]) -> None:
        # A worker only ends by cancellation (shutdown, a removed channel). Anything else is a bug that would leave
        # its channel silent: end run() with it, so that the relay exits non-zero and is restarted.
        failure = self._failure
        if not task.cancelled() and task.exception() is not None and failure is not None and not failure.done():
            failure.set_exception(task.exception() or RuntimeError("a channel stream ended"))

    async def run(self) -> None:
        """Run every channel's worker until cancelled; raise what ended a worker that should not have ended."""
        self._running = True
        self._failure = asyncio.get_running_loop().create_future()
        for stream in self.streams.values():
            self._start(stream)
        try:
            await self._failure  # the workers run as their own tasks; reloads add and remove them
        finally:
            self._running = False
            for task in self._tasks.values():
                task.cancel()
            await asyncio.gather(*self._tasks.values(), return_exceptions=True)
            self._tasks.clear()

    async def idle(self) -> None:
        """Wait until every stream has delivered what it holds (shutdown)."""
        await asyncio.gather(*(stream.idle() for stream in self.streams.values()))

    # The coalescer's sink.

    def publish(self, batch: Batch) -> None:
        stream = self.streams.get(batch.channel)
        if stream is not None:
            stream.put(batch)

    def overflow(self, channel: str, gap_start: datetime, gap_end: datetime) -> None:
        stream = self.streams.get(channel)
        if stream is not None:
            stream.history.gap(_ms(gap_end))
            stream.put(Gap(channel, "overflow", gap_start, gap_end))

    def restate(self, channel: str, keys: list[str]) -> None:
        """Keys whose progress became stalled: fetch and send them again (their frames now say so). Not a new
        batch of the channel: it carries the newest seq, and a ts of its own."""
        stream = self.streams.get(channel)
        if stream is not None and keys:
            ts = max(int(self._wall_clock() * 1000), stream.history.ts)
            stream.put(Batch(channel=channel, seq=stream.history.seq, keys=list(keys), payloads=None, ts=ts))

    # The hub's requests.

    def request(self, session: Follower, refresh: Refresh) -> None:
        """Queue a snapshot or replay for one client; its live batches of that channel are folded meanwhile."""
        stream = self.streams.get(refresh.channel)
        if stream is None:
            return
        session.begin_refresh(refresh.channel)
        stream.put(Order(session, refresh))

    # The listener's observer.

    def mark_listening(self, channels: Iterable[str]) -> None:
        """Channels a reload added are LISTENed now: resumes on them can be vouched for from this moment."""
        now = int(self._wall_clock() * 1000)
        for channel in channels:
            stream = self.streams.get(channel)
            if stream is not None and self.listening:
                stream.history.gap(now)

    def listener_down(self) -> None:
        self.listening = False
        for stream in self.streams.values():
            stream.history.listening_since = None  # no replay can be vouched for until LISTEN is back
        self._delivery.listener_down()

    def listener_up(self, channels: list[str], gap_start: datetime, gap_end: datetime, reason: str) -> None:
        self.listening = True
        loop = asyncio.get_running_loop()
        done: list[asyncio.Future[None]] = []
        for channel in channels:
            stream = self.streams.get(channel)
            if stream is None:
                continue
            stream.history.gap(_ms(gap_end))
            future: asyncio.Future[None] = loop.create_future()
            done.append(future)
            stream.put(Gap(channel, reason, gap_start, gap_end, future))
        if self._status_up is not None:
            self._status_up.cancel()
        # Status up only once every channel's resync (or snapshot) has gone out, so clients refetch first.
        self._status_up = loop.create_task(self._announce_up(done))

    async def _announce_up(self, done: list[asyncio.Future[None]]) -> None:
        if done:
            await asyncio.wait(done)
        self._delivery.listener_up()


async def _stop_after_idle(stream: ChannelStream, task: asyncio.Task[None]) -> None:
    try:
        async with asyncio.timeout(5):
            await stream.idle()
    except TimeoutError:
        pass
    task.cancel()

