"""Progress figures (pipeline/progress.py): percent, measured rate, ETA, terminal and failed, stalls, bounded memory."""

from __future__ import annotations

from typing import Any

import msgspec
from hypothesis import given, settings
from hypothesis import strategies as st

from notifyrelay.config import ProgressConfig
from notifyrelay.pipeline.progress import ProgressTracker

CONFIG = msgspec.convert(
    {"done": "done", "total": "total", "status": "status", "stall_after_s": 10}, ProgressConfig
)


def row(done: Any = 0, total: Any = 100, status: Any = "running", **extra: Any) -> dict[str, Any]:
    return {"done": done, "total": total, "status": status, **extra}


def test_percent_rate_and_eta_from_successive_rows() -> None:
    """Percent is done/total, the rate is measured between rows, the ETA is what remains at that rate."""
    tracker = ProgressTracker(CONFIG)
    first = tracker.observe("1", row(120, 500), now=0.0)
    assert first == {"done": 120, "total": 500, "percent": 24.0, "rate_per_s": None, "eta_s": None,
                     "status": "running", "terminal": False, "failed": False, "stalled": False}
    second = tracker.observe("1", row(190, 500), now=2.0)
    assert (second["percent"], second["rate_per_s"], second["eta_s"]) == (38.0, 35.0, 8.9)


def test_indeterminate_totals_give_no_percent_and_no_eta() -> None:
    """A total of 0 or NULL (or a done that is not a number) leaves percent and ETA null; a rate is still known."""
    tracker = ProgressTracker(CONFIG)
    for total in (0, None, "many"):
        tracker.observe(f"k{total}", row(0, total), now=0.0)
        later = tracker.observe(f"k{total}", row(10, total), now=1.0)
        assert (later["percent"], later["eta_s"], later["rate_per_s"]) == (None, None, 10.0)
    nan = tracker.observe("nan", row("NaN", 100), now=0.0)
    assert (nan["percent"], nan["rate_per_s"]) == (None, None)


def test_percent_is_clamped_to_0_100() -> None:
    """A done past its total reports 100 percent and an ETA of zero, never more."""
    tracker = ProgressTracker(CONFIG)
    tracker.observe("1", row(90, 100), now=0.0)
    over = tracker.observe("1", row(120, 100), now=1.0)
    assert (over["percent"], over["eta_s"]) == (100.0, 0.0)


def test_the_rate_is_measured_over_the_recent_window() -> None:
    """Old samples leave the window, so a job that slowed down reports its new rate (and a slow one keeps an anchor)."""
    tracker = ProgressTracker(CONFIG, rate_window_s=10.0)
    for second in range(0, 21):
        fast_then_slow = second * 10 if second <= 10 else 100 + (second - 10)
        progress = tracker.observe("1", row(fast_then_slow, 1000), now=float(second))
    assert progress["rate_per_s"] == 1.0
    tracker.observe("slow", row(0, 10), now=0.0)
    assert tracker.observe("slow", row(1, 10), now=60.0)["rate_per_s"] == round(1 / 60, 3)


def test_done_going_backwards_restarts_the_rate() -> None:
    """A job whose done drops (it restarted) forgets its old samples instead of reporting a negative rate."""
    tracker = ProgressTracker(CONFIG)
    tracker.observe("1", row(50), now=0.0)
    restarted = tracker.observe("1", row(5), now=1.0)
    assert restarted["rate_per_s"] is None
    assert tracker.observe("1", row(15), now=2.0)["rate_per_s"] == 10.0


def test_terminal_and_failed_statuses_and_the_key_is_then_forgotten() -> None:
    """A terminal status is reported once (failed when listed), with no ETA, and the key is no longer tracked."""
    tracker = ProgressTracker(CONFIG)
    tracker.observe("ok", row(5, 10), now=0.0)
    tracker.observe("bad", row(5, 10), now=0.0)
    assert len(tracker) == 2
    done = tracker.observe("ok", row(10, 10, "complete"), now=1.0)
    failed = tracker.observe("bad", row(7, 10, "failed"), now=1.0)
    assert (done["terminal"], done["failed"], done["eta_s"], done["percent"]) == (True, False, None, 100.0)
    assert (failed["terminal"], failed["failed"]) == (True, True)
    assert len(tracker) == 0


def test_a_key_unchanged_for_stall_after_s_is_reported_stalled_once_and_clears_when_it_moves() -> None:
    """newly_stalled names a quiet non-terminal key once; its progress says stalled until its row changes."""
    tracker = ProgressTracker(CONFIG)
    tracker.observe("quiet", row(1), now=0.0)
    tracker.observe("busy", row(1), now=0.0)
    tracker.observe("busy", row(2), now=5.0)
    assert tracker.newly_stalled(9.9) == []
    assert tracker.newly_stalled(10.0) == ["quiet"]
    assert tracker.newly_stalled(12.0) == []
    assert tracker.stalled_count == 1
    # The same row again (a refetch) does not count as a change.
    assert tracker.observe("quiet", row(1), now=12.0)["stalled"] is True
    assert tracker.newly_stalled(15.0) == ["busy"]
    moved = tracker.observe("quiet", row(2), now=16.0)
    assert moved["stalled"] is False and tracker.stalled_count == 1
    assert tracker.newly_stalled(25.9) == []
    assert tracker.newly_stalled(26.0) == ["quiet"]


def test_any_column_change_counts_as_movement() -> None:
    """A row whose message changed while done stayed the same is not stalled."""
    tracker = ProgressTracker(CONFIG)
    tracker.observe("1", row(1, message="scanning"), now=0.0)
    tracker.observe("1", row(1, message="writing"), now=9.0)
    assert tracker.newly_stalled(10.0) == []


def test_forget_and_the_key_limit_bound_memory() -> None:
    """A gone key is forgotten, and past max_keys the least recently changed key is dropped first."""
    tracker = ProgressTracker(CONFIG, max_keys=3)
    for index in range(5):
        tracker.observe(str(index), row(index), now=float(index))
    assert len(tracker) == 3
    tracker.forget("4")
    tracker.forget("absent")
    assert len(tracker) == 2
    assert tracker.newly_stalled(100.0) == ["2", "3"]


def test_status_only_progress() -> None:
    """With only a status column, progress carries status, terminal and failed, and no numbers."""
    tracker = ProgressTracker(msgspec.convert({"status": "state"}, ProgressConfig))
    progress = tracker.observe("1", {"state": "failed"}, now=0.0)
    assert progress == {"done": None, "total": None, "percent": None, "rate_per_s": None, "eta_s": None,
                        "status": "failed", "terminal": True, "failed": True, "stalled": False}


values = st.one_of(st.none(), st.integers(-10, 10**6), st.floats(allow_nan=True), st.text(max_size=3), st.booleans())
events = st.lists(
    st.tuples(
        st.sampled_from(["a", "b", "c", "d"]),
        st.sampled_from(["observe", "observe", "observe", "forget", "stall"]),
        values, values, st.sampled_from(["running", "queued", "complete", "failed", None]),
        st.floats(0, 30),
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None)
@given(events)
def test_properties_over_any_sequence_of_rows(sequence: list[tuple[str, str, Any, Any, Any, float]]) -> None:
    """Whatever the rows: nothing raises, figures stay in range, only active keys are kept, stalls are counted right."""
    tracker = ProgressTracker(CONFIG, max_keys=3)
    now = 0.0
    active: set[str] = set()
    for key, action, done, total, status, step in sequence:
        now += step
        if action == "forget":
            tracker.forget(key)
            active.discard(key)
        elif action == "stall":
            for stalled in tracker.newly_stalled(now):
                assert stalled in active
        else:
            progress = tracker.observe(key, row(done, total, status), now)
            assert progress["percent"] is None or 0.0 <= progress["percent"] <= 100.0
            assert progress["eta_s"] is None or progress["eta_s"] >= 0.0
            assert progress["terminal"] == (status in CONFIG.terminal)
            assert not (progress["terminal"] and progress["stalled"])
            if progress["terminal"]:
                active.discard(key)
            else:
                active.add(key)
        assert len(tracker) <= min(len(active), 3)
        assert 0 <= tracker.stalled_count <= len(tracker)
        msgspec.json.encode(tracker.observe("probe", row(), now))  # every figure is JSON-ready
        tracker.forget("probe")
