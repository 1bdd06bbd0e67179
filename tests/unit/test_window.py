"""The coalescing window's rules, checked on generated notification streams."""

from __future__ import annotations

import itertools

from hypothesis import given, settings
from hypothesis import strategies as st

from notifyrelay.pipeline.coalescer import Batch, ChannelWindow

WINDOW = 0.2

# A stream: (gap in seconds before the notification, key). Gaps range from bursts to idle periods.
streams = st.lists(
    st.tuples(st.sampled_from([0.0, 0.001, 0.05, 0.15, 0.25, 1.0]), st.sampled_from(list("abcdefgh"))),
    min_size=1,
    max_size=200,
)


def simulate(stream: list[tuple[float, str]], *, window_s: float, leading_edge: bool) -> list[tuple[float, Batch]]:
    """Run a window as the coalescer would: flush whatever is due before each arrival, and at the end."""
    window = ChannelWindow("c", window_s=window_s, leading_edge=leading_edge, with_payloads=True)
    batches: list[tuple[float, Batch]] = []
    now = 0.0
    for index, (gap, key) in enumerate(stream):
        arrival = now + gap
        deadline = window.deadline()
        if deadline is not None and deadline <= arrival:
            batches.append((deadline, window.flush(deadline)))
        now = arrival
        batch = window.add(key, index, now)
        if batch is not None:
            batches.append((now, batch))
    deadline = window.deadline()
    if deadline is not None:
        batches.append((deadline, window.flush(deadline)))
    return batches


@settings(max_examples=300)
@given(streams, st.booleans())
def test_no_key_lost_none_twice_and_windows_respected(stream: list[tuple[float, str]], leading_edge: bool) -> None:
    """Every key reaches a batch, no batch names a key twice, and batches are at least a window apart."""
    batches = simulate(stream, window_s=WINDOW, leading_edge=leading_edge)
    seen = [key for _, batch in batches for key in batch.keys]
    assert set(seen) == {key for _, key in stream}
    for _, batch in batches:
        assert len(batch.keys) == len(set(batch.keys))
    times = [at for at, _ in batches]
    assert all(later - earlier >= WINDOW - 1e-9 for earlier, later in itertools.pairwise(times))
    assert [batch.seq for _, batch in batches] == list(range(1, len(batches) + 1))
    assert all(earlier.ts <= later.ts for (_, earlier), (_, later) in itertools.pairwise(batches))


@settings(max_examples=200)
@given(streams)
def test_last_payload_wins_and_first_seen_order(stream: list[tuple[float, str]]) -> None:
    """Inside a batch keys keep first-seen order and carry the payload of their last notification."""
    batches = simulate(stream, window_s=WINDOW, leading_edge=True)
    position = 0
    for _, batch in batches:
        assert batch.payloads is not None
        for key in batch.keys:
            assert stream[batch.payloads[key]][1] == key
        covered = [k for _, k in stream[position : max(batch.payloads.values()) + 1]]
        assert batch.keys == list(dict.fromkeys(covered))
        position = max(batch.payloads.values()) + 1


def test_leading_edge_flushes_an_idle_channel_at_once() -> None:
    """A notification on a channel idle for a window goes out immediately, the rest of the window is folded."""
    window = ChannelWindow("c", window_s=WINDOW, leading_edge=True, with_payloads=False)
    first = window.add("42", None, 10.0)
    assert first is not None and first.keys == ["42"] and first.seq == 1
    assert window.add("42", None, 10.01) is None
    assert window.add("43", None, 10.02) is None
    assert window.deadline() == 10.0 + WINDOW
    second = window.flush(10.2)
    assert second.keys == ["42", "43"] and second.seq == 2


def test_without_leading_edge_the_first_notification_waits_a_window() -> None:
    """With leading_edge off, even an idle channel's first notification waits for its window to end."""
    window = ChannelWindow("c", window_s=WINDOW, leading_edge=False, with_payloads=False)
    assert window.add("42", None, 10.0) is None
    assert window.deadline() == 10.0 + WINDOW


def test_window_zero_makes_every_notification_a_batch() -> None:
    """window_ms = 0 passes every notification through, repeats included."""
    window = ChannelWindow("c", window_s=0, leading_edge=True, with_payloads=True)
    batches = [window.add("k", n, 1.0) for n in range(3)]
    assert [b.seq for b in batches if b] == [1, 2, 3]
    assert all(b is not None and b.keys == ["k"] for b in batches)


@settings(max_examples=300)
@given(st.lists(st.floats(min_value=0, max_value=2e9, allow_nan=False), min_size=1, max_size=50))
def test_batch_ts_never_goes_back_whatever_the_wall_clock_does(readings: list[float]) -> None:
    """A batch's ts (the resume position) is the wall clock in Unix ms, but never goes back when the clock stands
    still or steps back: it is the highest reading so far, shared by batches within one millisecond."""
    clock = iter(readings)
    window = ChannelWindow("c", window_s=0, leading_edge=True, with_payloads=False, wall_clock=lambda: next(clock))
    batches = [window.add("k", None, float(n)) for n in range(len(readings))]
    stamps = [batch.ts for batch in batches if batch is not None]
    assert len(stamps) == len(readings)
    assert all(earlier <= later for earlier, later in itertools.pairwise(stamps))
    assert stamps == list(itertools.accumulate((int(reading * 1000) for reading in readings), max))
    assert window.ts == stamps[-1]


def test_batch_ts_is_the_wall_clock_in_milliseconds() -> None:
    """With a clock that moves forward, ts is simply its reading in Unix milliseconds."""
    readings = iter([1764504000.1234, 1764504001.5])
    window = ChannelWindow("c", window_s=0, leading_edge=True, with_payloads=False, wall_clock=lambda: next(readings))
    first, second = window.add("a", None, 1.0), window.add("b", None, 2.0)
    assert first is not None and second is not None
    assert (first.ts, second.ts) == (1764504000123, 1764504001500)


def test_batch_ts_never_runs_ahead_of_the_wall_clock_at_3000_batches_a_second() -> None:
    """With window_ms = 0 at 3,000 notifications a second, ts never runs ahead of the wall clock (the three batches
    of each millisecond share it), so a resume on another replica skips no real change."""
    start = 1_764_504_000.0
    flushes = 0

    def wall_clock() -> float:
        return start + (flushes // 3) / 1000  # 3 flushes per wall-clock millisecond

    window = ChannelWindow("c", window_s=0, leading_edge=True, with_payloads=False, wall_clock=wall_clock)
    stamps = []
    for _ in range(6000):  # two seconds of load
        batch = window.add("k", None, 0.0)
        assert batch is not None
        assert batch.ts <= int(wall_clock() * 1000)
        stamps.append(batch.ts)
        flushes += 1
    assert len(set(stamps)) == 2000 and all(earlier <= later for earlier, later in itertools.pairwise(stamps))
