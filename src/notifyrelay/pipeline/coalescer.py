"""Folding notifications into per-channel batches: at most one batch per channel per ``window_ms``.

``ChannelWindow`` is the pure rule (no event loop, clocks passed in); ``Coalescer`` is the thin async shell that
drains the ingest queue, feeds the windows and hands each batch on, in ``seq`` order, to the channel's ordered
stream (pipeline/streams.py), which never blocks it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Protocol

import msgspec
import structlog

from ..config import ChannelConfig, CoalesceConfig
from ..ops.metrics import Metrics
from .ingest import IngestQueue

log = structlog.get_logger("notifyrelay.coalescer")

_json_decode = msgspec.json.Decoder().decode


class BadPayload(ValueError):
    """A notification payload from which no key can be taken; counted, logged and dropped."""


@dataclass(slots=True)
class Batch:
    """Keys of one channel flushed together. ``received_at[i]`` is when ``keys[i]`` was first seen (monotonic).

    ``ts`` is the relay's wall-clock time of the flush (Unix ms, growing per channel): the resume position clients
    give back as ``since``. ``committed_at`` holds the commit timestamps (Unix seconds) of the folded notifications
    that carried one. ``state`` is attached by the state stage on state channels (pipeline/state.py).
    """

    channel: str
    seq: int
    keys: list[str]
    payloads: dict[str, Any] | None
    received_at: list[float] = field(default_factory=list)
    committed_at: list[float] = field(default_factory=list)
    ts: int = 0
    state: Any = None


class KeyExtractor:
    """Takes the key (and the value a notify frame carries) out of a payload, per the channel's ``key`` mode."""

    def __init__(self, channel: ChannelConfig) -> None:
        self.field = channel.json_field
        self.commit_time_field = channel.commit_time_field
        self.include_payload = channel.include_payload

    def extract(self, payload: str) -> tuple[str, Any, float | None]:
        """The key, the value a notify frame carries, and the commit time (Unix seconds) when configured and given."""
        if self.field is None:
            committed = None
            if self.commit_time_field:
                with contextlib.suppress(msgspec.DecodeError, RecursionError):  # then it carries no commit time
                    committed = _commit_time(_json_decode(payload), self.commit_time_field)
            return payload, payload if self.include_payload else None, committed
        try:
            document = _json_decode(payload)
        except (msgspec.DecodeError, RecursionError):
            raise BadPayload("payload is not valid JSON") from None
        if not isinstance(document, dict) or self.field not in document:
            raise BadPayload(f"payload has no field {self.field!r}")
        key = document[self.field]
        if isinstance(key, bool) or not isinstance(key, (str, int)):
            raise BadPayload(f"field {self.field!r} is neither a string nor an integer")
        committed = _commit_time(document, self.commit_time_field) if self.commit_time_field else None
        # The payload is valid JSON: pass it through as raw bytes instead of re-encoding it per frame.
        value = msgspec.Raw(payload.encode()) if self.include_payload else None
        return (key if isinstance(key, str) else str(key)), value, committed


def _commit_time(document: Any, field_name: str) -> float | None:
    """A commit timestamp as Unix seconds: a number as is, an ISO 8601 string (UTC when it has no offset)."""
    value = document.get(field_name) if isinstance(document, dict) else None
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            moment = datetime.fromisoformat(value)
        except ValueError:
            return None
        return (moment if moment.tzinfo else moment.replace(tzinfo=UTC)).timestamp()
    return None


class ChannelWindow:
    """The coalescing rule for one channel.

    With ``leading_edge``, a notification that finds nothing flushed during the last window is flushed at once;
    the rest is folded and flushed when the window since the last flush ends. Without it, the first pending
    notification opens a window that is flushed when it ends. ``window_s == 0`` makes every notification a batch.
    """

    def __init__(
        self, channel: str, *, window_s: float, leading_edge: bool, with_payloads: bool,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        self.channel = channel
        self._wall_clock = wall_clock
        self.ts = 0
        self.window_s = window_s
        self.leading_edge = leading_edge
        self.with_payloads = with_payloads
        self.seq = 0
        self.last_flush = float("-inf")
        self._pending: dict[str, Any] = {}  # dicts keep first-insertion order, and assignment keeps the last value
        self._first_seen: list[float] = []
        self._committed: list[float] = []
        self._opened_at = 0.0
        self._folded = 0  # notifications folded into a key already pending, since take_folded() last asked

    @property
    def pending(self) -> int:
        return len(self._pending)

    def add(
        self, key: str, value: Any, now: float, received: float | None = None, committed: float | None = None
    ) -> Batch | None:
        """Fold one notification in; return a batch when it must go out immediately.

        ``now`` drives the window; ``received`` (default ``now``) and ``committed`` are only kept for the metrics.
        """
        if committed is not None:
            self._committed.append(committed)
        pending = self._pending
        folded = key in pending
        if not folded:
            if not pending:
                self._opened_at = now
            self._first_seen.append(now if received is None else received)
        pending[key] = value
        if self.window_s == 0 or (self.leading_edge and len(pending) == 1 and now - self.last_flush >= self.window_s):
            return self.flush(now)
        if folded:
            self._folded += 1
        return None

    def take_folded(self) -> int:
        """How many notifications were folded into an already pending key since the last call (for the metrics)."""
        folded, self._folded = self._folded, 0
        return folded

    def deadline(self) -> float | None:
        """When the pending keys are due (monotonic seconds), or None when nothing is pending."""
        if not self._pending:
            return None
        due = self.last_flush + self.window_s
        return due if self.leading_edge else max(due, self._opened_at + self.window_s)

    def flush(self, now: float) -> Batch:
        self.seq += 1
        self.last_flush = now
        # Never backwards, but never ahead of the clock either (a run of batches within one millisecond shares
        # it): a ts ahead of real time would make a resume on another replica skip real changes.
        self.ts = max(int(self._wall_clock() * 1000), self.ts)
        batch = Batch(
            ts=self.ts,
            channel=self.channel,
            seq=self.seq,
            keys=list(self._pending),
            payloads=self._pending if self.with_payloads else None,
            received_at=self._first_seen,
            committed_at=self._committed,
        )
        self._pending = {}
        self._first_seen = []
        self._committed = []
        return batch


class BatchSink(Protocol):
    """Where batches go (the channel streams). Called on the event loop; must not block."""

    def publish(self, batch: Batch) -> None: ...

    def overflow(self, channel: str, gap_start: datetime, gap_end: datetime) -> None: ...


class Coalescer:
    """Drains the ingest queue into channel windows and flushes them on time."""

    def __init__(
        self,
        channels: Iterable[ChannelConfig],
        settings: CoalesceConfig,
        queue: IngestQueue,
        sink: BatchSink,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._settings = settings
        self._queue = queue
        self._sink = sink
        self._metrics = metrics
        self._clock = clock
        self._windows: dict[str, ChannelWindow] = {}
        self._extractors: dict[str, KeyExtractor] = {}
        self._removed_seq: dict[str, tuple[int, int]] = {}
        # Overflow resyncs wait here until their channel may have one again (at most one per window, 0.2 s at
        # least), so sustained overflow does not flood clients; the earliest loss since the last one is kept.
        self._overflow: dict[str, datetime] = {}
        self._overflow_sent: dict[str, float] = {}
        self._last_bad_log = float("-inf")
        self._bad_since_log = 0
        self.set_channels(channels)

    def set_channels(self, channels: Iterable[ChannelConfig]) -> None:
        """Adopt a new channel list (reload). New channels get a window; removed ones are flushed and dropped; a
        channel whose include_payload changes is flushed first, so no pending key is lost or sent without its value.
        ``seq`` keeps growing per channel name, even across removal and re-adding."""
        wanted = {c.name: c for c in channels}
        now = self._clock()
        for name in list(self._windows):
            if name not in wanted:
                window = self._windows.pop(name)
                if window.pending:
                    self._publish(window.flush(now))
                self._removed_seq[name] = (window.seq, window.ts)
                del self._extractors[name]
        for name, channel in wanted.items():
            existing = self._windows.get(name)
            if existing is None:
                window = self._windows[name] = ChannelWindow(
                    name,
                    window_s=self._settings.window_ms / 1000,
                    leading_edge=self._settings.leading_edge,
                    with_payloads=channel.include_payload,
                )
                window.seq, window.ts = self._removed_seq.pop(name, (0, 0))
            elif existing.with_payloads != channel.include_payload:
                if existing.pending:
                    self._publish(existing.flush(now))
                existing.with_payloads = channel.include_payload
            self._extractors[name] = KeyExtractor(channel)
            self._metrics.declare_channel(name, commit_time=bool(channel.commit_time_field))

    async def run(self) -> None:
        """Run until cancelled."""
        while True:
            now = self._clock()
            deadlines = [d for w in self._windows.values() if (d := w.deadline()) is not None]
            deadlines += [self._overflow_sent[c] + self._overflow_spacing() for c in self._overflow]
            timeout = max(0.0, min(deadlines) - now) if deadlines else None
            items = await self._queue.get_all(timeout)
            self.ingest(items)  # also sends the overflow resyncs that are due
            self.flush_due()

    def ingest(self, items: Iterable[tuple[str, str, float]]) -> None:
        """Fold received notifications (channel, payload, monotonic receive time) into their windows."""
        now = self._clock()
        # Counted per drain, not per notification: a labels() lookup per notification costs more than the fold.
        received_count: dict[str, int] = {}
        windows, extractors = self._windows, self._extractors
        for channel, payload, received in items:
            window = windows.get(channel)
            if window is None:  # a channel removed by a reload while its notifications were queued
                continue
            received_count[channel] = received_count.get(channel, 0) + 1
            try:
                key, value, committed = extractors[channel].extract(payload)
            except BadPayload as exc:
                self._bad_payload(channel, str(exc), payload)
                continue
            batch = window.add(key, value, now, received, committed)
            if batch is not None:
                self._publish(batch)
        for channel, count in received_count.items():
            self._metrics.notifications_received.labels(channel).inc(count)
            window = windows[channel]
            if folded := window.take_folded():
                self._metrics.notifications_coalesced.labels(channel).inc(folded)
        for channel, since in self._queue.take_overflow().items():
            # Notifications were dropped because the queue was full: subscribers must refetch.
            self._metrics.ingest_overflows.labels(channel).inc()
            self._overflow.setdefault(channel, since)
        self._send_overflow_resyncs(now)

    def _overflow_spacing(self) -> float:
        return max(self._settings.window_ms / 1000, 0.2)

    def _send_overflow_resyncs(self, now: float) -> None:
        for channel, since in list(self._overflow.items()):
            if now - self._overflow_sent.get(channel, float("-inf")) >= self._overflow_spacing():
                del self._overflow[channel]
                self._overflow_sent[channel] = now
                log.warning("coalescer.overflow_resync", channel=channel)
                self._sink.overflow(channel, since, datetime.now(UTC))

    def flush_due(self) -> None:
        now = self._clock()
        for window in self._windows.values():
            deadline = window.deadline()
            if deadline is not None and deadline <= now:
                self._publish(window.flush(now))

    def flush_all(self) -> None:
        """Flush every pending key now (shutdown)."""
        self.ingest(self._queue.take_nowait())
        now = self._clock()
        for window in self._windows.values():
            if window.pending:
                self._publish(window.flush(now))

    def _publish(self, batch: Batch) -> None:
        self._metrics.batches.labels(batch.channel).inc()
        self._sink.publish(batch)

    def _bad_payload(self, channel: str, reason: str, payload: str) -> None:
        self._metrics.bad_payloads.labels(channel).inc()
        self._bad_since_log += 1
        now = self._clock()
        if now - self._last_bad_log >= 10:  # at most one log line per 10 s, with the count since the last
            log.warning(
                "coalescer.bad_payload", channel=channel, reason=reason, payload=payload[:200],
                dropped_since_last_log=self._bad_since_log,
            )
            self._last_bad_log = now
            self._bad_since_log = 0
