"""The per-channel key-change memory behind resume (since=TS): what it can vouch for, and what it must refuse."""

from __future__ import annotations

from hypothesis import example, given, settings
from hypothesis import strategies as st

from notifyrelay.pipeline.history import ChannelHistory


def everything(key: str) -> bool:
    return True


def listening(max_keys: int = 100, since: int = 0) -> ChannelHistory:
    history = ChannelHistory(max_keys)
    history.gap(since)
    return history


def test_nothing_is_vouched_for_before_the_channel_is_listened() -> None:
    """A history that never saw LISTEN in force refuses every resume, even one with no changes."""
    history = ChannelHistory(10)
    history.record(["a"], 1, 100)
    assert history.listening_since is None
    assert history.changed_since(0, everything) is None
    assert history.changed_since(10**12, everything) is None


def test_changed_since_returns_keys_changed_at_or_after_the_moment_oldest_first() -> None:
    """Keys changed at or after the moment come back once each, ordered by their last change."""
    history = listening()
    history.record(["a", "b"], 1, 100)
    history.record(["c"], 2, 200)
    history.record(["a"], 3, 300)
    assert history.changed_since(50, everything) == ["b", "c", "a"]
    assert history.changed_since(100, everything) == ["b", "c", "a"]  # a change at exactly the moment counts
    assert history.changed_since(101, everything) == ["c", "a"]
    assert history.changed_since(300, everything) == ["a"]
    assert history.changed_since(301, everything) == []
    assert (history.seq, history.ts, len(history)) == (3, 300, 3)


def test_batches_sharing_a_ts_are_all_replayed_from_that_moment() -> None:
    """Batches flushed within one millisecond share their ts, so a resume from that ts replays every one of them,
    including those after the frame the client last saw."""
    history = listening()
    history.record(["a"], 1, 100)
    history.record(["b"], 2, 100)
    history.record(["c"], 3, 100)
    assert history.changed_since(100, everything) == ["a", "b", "c"]
    assert (history.seq, history.ts) == (3, 100)


def test_changed_since_keeps_only_wanted_keys() -> None:
    """Only keys the client follows are replayed."""
    history = listening()
    history.record(["a", "b", "c"], 1, 100)
    assert history.changed_since(100, lambda key: key != "b") == ["a", "c"]


def test_a_moment_before_the_last_gap_is_refused() -> None:
    """A resume reaching back before the last listener gap (or overflow) cannot be vouched for."""
    history = listening(since=1000)
    history.record(["a"], 1, 1500)
    assert history.changed_since(999, everything) is None
    assert history.changed_since(1000, everything) == ["a"]
    history.gap(2000)
    assert history.changed_since(1999, everything) is None
    assert history.changed_since(2000, everything) == []


def test_a_gap_never_moves_listening_since_backwards() -> None:
    """An older gap reported late does not widen what the history vouches for."""
    history = listening(since=2000)
    history.gap(1000)
    assert history.listening_since == 2000


def test_forgetting_the_oldest_key_refuses_resumes_from_before_its_change() -> None:
    """Past max_keys the least recently changed key is forgotten, and no resume from before its change is replayed."""
    history = listening(max_keys=2)
    history.record(["a"], 1, 100)
    history.record(["b"], 2, 200)
    history.record(["c"], 3, 300)  # forgets "a", changed at 100
    assert len(history) == 2 and history.forgotten_until == 100
    assert history.changed_since(99, everything) is None
    assert history.changed_since(101, everything) == ["b", "c"]


def test_a_key_forgotten_at_the_very_moment_refuses_the_resume() -> None:
    """changed_since is inclusive, so a key forgotten with its change at exactly the moment would be a silent loss:
    the history refuses rather than answering without it."""
    history = listening(max_keys=2)
    history.record(["a"], 1, 100)
    history.record(["b"], 2, 100)  # the same millisecond
    history.record(["c"], 3, 200)  # forgets "a", changed at 100
    assert history.forgotten_until == 100
    assert history.changed_since(100, everything) is None


def test_a_key_changing_again_is_the_most_recent_and_not_forgotten() -> None:
    """A key that changes again moves to the newest end, so it is the last to be forgotten."""
    history = listening(max_keys=2)
    history.record(["a"], 1, 100)
    history.record(["b"], 2, 200)
    history.record(["a"], 3, 300)
    history.record(["c"], 4, 400)  # forgets "b", not "a"
    assert history.forgotten_until == 200
    assert history.changed_since(201, everything) == ["a", "c"]


def test_seq_and_ts_only_grow() -> None:
    """The history's seq and ts are the newest seen, even when a batch is recorded late."""
    history = listening()
    history.record(["a"], 5, 500)
    history.record(["b"], 4, 400)
    assert (history.seq, history.ts) == (5, 500)


# Generated histories against a plain model: "the last change of each key".

changes = st.lists(
    st.tuples(st.lists(st.sampled_from("abcdefgh"), min_size=1, max_size=4), st.integers(min_value=0, max_value=50)),
    max_size=40,
)


@settings(max_examples=300)
@given(changes, st.integers(min_value=1, max_value=8), st.integers(min_value=0, max_value=1500))
@example([(["a"], 99), (["b"], 0), (["c"], 100)], 2, 100)  # "a" forgotten, changed at exactly the moment
def test_a_replay_is_never_a_silent_loss(batches: list[tuple[list[str], int]], max_keys: int, moment: int) -> None:
    """Whenever the history answers, it names exactly the keys whose last change is at or after the moment; when
    it cannot, it says so (None) rather than answering with fewer keys."""
    history = listening(max_keys=max_keys, since=1)  # listening from a real moment: ts and moments are Unix ms
    last: dict[str, int] = {}
    ts = 1
    for seq, (keys, step) in enumerate(batches, start=1):
        ts += step  # batch ts never go back per channel, and repeat within a millisecond (coalescer.ChannelWindow)
        history.record(keys, seq, ts)
        for key in keys:
            last[key] = ts
    answer = history.changed_since(moment, everything)
    expected = sorted((ts, key) for key, ts in last.items() if ts >= moment)
    if answer is None:
        # Refused only for a moment before listening began, or because something changed at or after it was
        # forgotten.
        assert moment < 1 or (len(last) > max_keys and history.forgotten_until >= moment)
        return
    assert sorted(answer) == sorted(key for _, key in expected)
    assert [last[key] for key in answer] == sorted(last[key] for key in answer)
    assert len(history) == min(len(last), max_keys)
