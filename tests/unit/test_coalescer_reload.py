"""The coalescer across reloads: no pending key lost, seq never restarting."""

from __future__ import annotations

from datetime import datetime

from notifyrelay.config import ChannelConfig, CoalesceConfig
from notifyrelay.ops.metrics import Metrics
from notifyrelay.pipeline.coalescer import Batch, Coalescer
from notifyrelay.pipeline.ingest import IngestQueue


class Sink:
    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.resyncs: list[tuple[str, str]] = []

    def publish(self, batch: Batch) -> None:
        self.batches.append(batch)

    def resync(self, channel: str, reason: str, gap_start: datetime, gap_end: datetime) -> None:
        self.resyncs.append((channel, reason))


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


def test_sustained_overflow_sends_at_most_one_resync_per_window() -> None:
    """Overflow marks arriving on every drain yield one resync per channel per window, none lost."""
    coalescer, sink, clock = make([ChannelConfig(name="c")])
    queue = coalescer._queue
    for step in range(10):  # ten drains 10 ms apart, each finding the queue overflowed
        clock[0] = 100.0 + step * 0.01
        queue._overflow["c"] = datetime.now()
        coalescer.ingest([])
    assert sink.resyncs == [("c", "overflow")]
    clock[0] = 100.5
    coalescer.ingest([])  # the deferred one goes out once the window has passed
    assert sink.resyncs == [("c", "overflow"), ("c", "overflow")]
