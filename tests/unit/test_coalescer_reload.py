"""The coalescer across reloads and overflow: no pending key lost, seq and ts never restarting."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from notifyrelay.config import ChannelConfig, CoalesceConfig
from notifyrelay.ops.metrics import Metrics
from notifyrelay.pipeline.coalescer import Batch, Coalescer
from notifyrelay.pipeline.ingest import IngestQueue


class Sink:
    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.overflows: list[tuple[str, datetime, datetime]] = []

    def publish(self, batch: Batch) -> None:
        self.batches.append(batch)

    def overflow(self, channel: str, gap_start: datetime, gap_end: datetime) -> None:
        self.overflows.append((channel, gap_start, gap_end))


def make(channels: list[ChannelConfig]) -> tuple[Coalescer, Sink, list[float]]:
    clock = [100.0]
    sink = Sink()
    coalescer = Coalescer(channels, CoalesceConfig(), IngestQueue(100), sink, Metrics(), clock=lambda: clock[0])
    return coalescer, sink, clock


def test_flipping_include_payload_flushes_pending_keys_first() -> None:
    """A reload that turns payloads on sends the keys already pending instead of dropping them."""
    coalescer, sink, clock = make([ChannelConfig(name="c")])
    coalescer.ingest([("c", "1", 100.0), ("c", "2", 100.0)])  # "1" leads, "2" waits for the window
    coalescer.set_channels([ChannelConfig(name="c", include_payload=True)])
    assert [b.keys for b in sink.batches] == [["1"], ["2"]]
    clock[0] = 101.0
    coalescer.ingest([("c", "3", 101.0)])
    assert sink.batches[-1].payloads == {"3": "3"} and sink.batches[-1].seq == 3


def test_seq_continues_when_a_channel_is_removed_and_added_back() -> None:
    """seq keeps growing per channel name across reloads that remove and re-add it."""
    coalescer, sink, clock = make([ChannelConfig(name="c")])
    coalescer.ingest([("c", "1", 100.0)])
    coalescer.set_channels([ChannelConfig(name="d")])
    coalescer.set_channels([ChannelConfig(name="c")])
    clock[0] = 101.0
    coalescer.ingest([("c", "1", 101.0)])
    assert [b.seq for b in sink.batches] == [1, 2]


def test_ts_continues_when_a_channel_is_removed_and_added_back() -> None:
    """A channel re-added by a reload resumes from its last ts, so resume positions never go back, even when the
    wall clock did (the batch shares the last ts until the clock catches up)."""
    coalescer, sink, clock = make([ChannelConfig(name="c")])
    coalescer._windows["c"]._wall_clock = lambda: 2_000_000_000.0  # a clock far ahead, later set right
    coalescer.ingest([("c", "1", 100.0)])
    coalescer.set_channels([])
    coalescer.set_channels([ChannelConfig(name="c")])
    clock[0] = 101.0
    coalescer.ingest([("c", "2", 101.0)])
    assert [b.ts for b in sink.batches] == [2_000_000_000_000, 2_000_000_000_000]


def test_batches_carry_non_decreasing_ts_per_channel() -> None:
    """Every batch has a ts in Unix ms, never going back per channel however close together they flush (batches
    within one millisecond share it), and never ahead of the wall clock."""
    coalescer, sink, clock = make([ChannelConfig(name="c"), ChannelConfig(name="d")])
    for step in range(20):
        clock[0] = 100.0 + step * 0.25  # each one a window after the last: flushed at once
        coalescer.ingest([("c", str(step), clock[0]), ("d", str(step), clock[0])])
    for channel in ["c", "d"]:
        stamps = [b.ts for b in sink.batches if b.channel == channel]
        assert len(stamps) == 20 and stamps == sorted(stamps)
        assert -1 < datetime.now(UTC).timestamp() * 1000 - stamps[-1] < 60_000  # 1 ms: datetime rounds to µs


def test_sustained_overflow_is_reported_at_most_once_per_window() -> None:
    """Overflow marks arriving on every drain yield one overflow per channel per window, none lost, and the gap
    reported starts at the earliest loss since the last report."""
    coalescer, sink, clock = make([ChannelConfig(name="c")])
    queue = coalescer._queue
    first_loss = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)
    for step in range(10):  # ten drains 10 ms apart, each finding the queue overflowed
        clock[0] = 100.0 + step * 0.01
        queue._overflow["c"] = first_loss + timedelta(milliseconds=10 * step)
        coalescer.ingest([])
    assert [(channel, start) for channel, start, _ in sink.overflows] == [("c", first_loss)]
    clock[0] = 100.5
    coalescer.ingest([])  # the deferred one goes out once the window has passed
    assert len(sink.overflows) == 2
    channel, start, end = sink.overflows[1]
    assert channel == "c" and start == first_loss + timedelta(milliseconds=10) and start < end


def test_only_notifications_folded_into_a_pending_key_count_as_coalesced() -> None:
    """notifications_coalesced counts a notification whose key was already waiting, not one that went out at once
    (the leading edge), opened its key in the window, or found its pending key and flushed it on the leading edge."""
    coalescer, sink, clock = make([ChannelConfig(name="c"), ChannelConfig(name="d")])
    metrics = coalescer._metrics
    coalescer.ingest([("c", "a", 100.0), ("c", "a", 100.0), ("c", "a", 100.0), ("c", "b", 100.0), ("c", "b", 100.0),
                      ("d", "x", 100.0), ("d", "x", 100.0)])
    clock[0] = 100.5  # the windows are over, and no flush_due ran: c's "a" and "b" and d's "x" are still pending
    coalescer.ingest([("c", "a", 100.5), ("d", "x", 100.5)])  # "a" folds; "x", alone, goes out on the leading edge
    assert [b.keys for b in sink.batches] == [["a"], ["x"], ["x"]]

    def count(name: str, channel: str) -> float | None:
        return metrics.registry.get_sample_value(f"notifyrelay_notifications_{name}_total", {"channel": channel})

    assert (count("received", "c"), count("coalesced", "c")) == (6, 3)
    assert (count("received", "d"), count("coalesced", "d")) == (3, 0)
