"""The per-client session, driven as a pure object: events in, frames out, no sockets and no event loop."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from notifyrelay.delivery.session import Grants, RateLimit, Session
from notifyrelay.exceptions import SubscriptionError
from notifyrelay.pipeline.streams import Refresh
from notifyrelay.protocol import Subscribe, Unsubscribe

MOMENT = datetime(2026, 11, 30, 12, 0, 0, tzinfo=UTC)
LATER = datetime(2026, 11, 30, 12, 0, 5, tzinfo=UTC)


def make(
    *, grants: Grants | None = None, stateful: tuple[str, ...] = (), rate_per_s: float = 10, burst: int = 5
) -> Session:
    return Session(grants=grants, rate_per_s=rate_per_s, burst=burst, now=0.0, stateful=stateful)


def follow(session: Session, channel: str, *keys: str, limit: int = 1000) -> list[str]:
    return session.subscribe(Subscribe(channel, keys), limit=limit)


def decoded(frames: list[tuple[str, bytes, int]]) -> list[tuple[str, dict[str, Any], int]]:
    return [(kind, msgspec.json.decode(body), ts) for kind, body, ts in frames]


# Subscriptions, grants and the limit.


def test_subscribe_returns_only_new_keys_and_is_idempotent() -> None:
    """A subscribe returns the keys not held before, so re-subscribing held keys indexes nothing twice."""
    session = make()
    assert follow(session, "c", "1", "2") == ["1", "2"]
    assert follow(session, "c", "2", "3") == ["3"]
    assert follow(session, "c", "1") == []
    assert session.count() == 3
    assert session.followed("c") == frozenset({"1", "2", "3"})


def test_follows_key_honours_the_wildcard_and_the_channel() -> None:
    """A "*" subscription follows every key of its channel and none of another channel."""
    session = make()
    follow(session, "c", "*")
    follow(session, "d", "7")
    assert session.follows_key("c", "anything")
    assert session.follows_key("d", "7") and not session.follows_key("d", "8")
    assert not session.follows_key("e", "7")


def test_the_limit_is_all_or_nothing_and_counts_over_channels() -> None:
    """A subscribe that would pass the limit (counted over every channel) takes none of its keys."""
    session = make()
    follow(session, "c", "1", "2", limit=4)
    follow(session, "d", "1", limit=4)
    with pytest.raises(SubscriptionError) as caught:
        session.subscribe(Subscribe("d", ("2", "3"), id="s9"), limit=4)
    assert caught.value.code == "too_many_subscriptions"
    assert caught.value.limit == "max_subscriptions"
    assert caught.value.request_id == "s9"
    assert "4" in caught.value.message
    assert session.count() == 3 and session.followed("d") == frozenset({"1"})
    assert follow(session, "d", "1", "2", limit=4) == ["2"]  # held keys cost nothing: exactly at the limit


def test_grants_forbid_keys_and_channels_outside_the_token() -> None:
    """A token grants listed keys of listed channels, or every key with None; anything else is forbidden, whole."""
    session = make(grants={"c": frozenset({"1", "2"}), "d": None})
    assert follow(session, "c", "1") == ["1"]
    assert follow(session, "d", "*", "x") == ["*", "x"]
    for channel, keys in [("c", ("2", "3")), ("c", ("*",)), ("e", ("1",))]:
        with pytest.raises(SubscriptionError) as caught:
            session.subscribe(Subscribe(channel, keys, id="g"), limit=100)
        assert caught.value.code == "forbidden" and caught.value.request_id == "g"
    assert session.followed("c") == frozenset({"1"})


def test_unsubscribe_returns_what_was_held_and_forgets_an_emptied_channel() -> None:
    """Unsubscribing returns only held keys; the last key of a channel drops the channel and its folded keys."""
    session = make()
    follow(session, "c", "1", "2")
    session.stalled = True
    session.fold("c", 1, 10, ["1"], None, max_keys=10, now=MOMENT)
    assert session.unsubscribe(Unsubscribe("c", ("2", "nope"))) == ["2"]
    assert "c" in session.pending
    assert session.unsubscribe(Unsubscribe("c", ("1",))) == ["1"]
    assert "c" not in session.follows and "c" not in session.pending
    assert session.unsubscribe(Unsubscribe("never", ("1",))) == []


def test_forget_channel_drops_subscriptions_and_pending() -> None:
    """A channel removed by a reload is forgotten whole: its keys are returned and its folded keys dropped."""
    session = make()
    follow(session, "c", "1", "2")
    session.begin_refresh("c")
    assert sorted(session.forget_channel("c")) == ["1", "2"]
    assert session.follows == {} and session.pending == {}
    assert session.forget_channel("c") == []


# The rate limit, with an injected clock.


def test_rate_limit_refuses_past_the_burst_with_a_sentence() -> None:
    """Past its burst a client's frames are refused until tokens come back at the configured rate."""
    session = make(rate_per_s=10, burst=5)
    assert [session.admit(0.0) for _ in range(6)] == [True] * 5 + [False]
    assert session.admit(0.1)  # one token back after 1/rate seconds
    assert not session.admit(0.1)
    refusal = session.refusal()
    assert refusal.code == "rate_limited" and refusal.limit == "rate_limit"
    assert "10 a second" in refusal.message and "bursts of 5" in refusal.message


def test_rate_limit_is_exhausted_after_three_bursts_of_refusals() -> None:
    """More than 3 x burst refusals without a pause mark the client for closing (1008)."""
    rate = RateLimit(rate_per_s=10, burst=5, now=0.0)
    for _ in range(5):
        assert rate.take(0.0)
    for _ in range(15):
        assert not rate.take(0.0)
    assert not rate.exhausted
    assert not rate.take(0.0)
    assert rate.exhausted


def test_rate_limit_accumulates_strikes_at_a_steady_double_rate() -> None:
    """A client pushing steadily at twice the rate never refills its bucket, so its strikes add up to exhaustion."""
    rate = RateLimit(rate_per_s=10, burst=5, now=0.0)
    now = 0.0
    frames = 0
    while not rate.exhausted:
        rate.take(now)
        now += 0.05  # 20 frames a second
        frames += 1
        assert frames < 1000
    assert frames > 3 * 5  # it took more than the bare strikes: half its frames were accepted


def test_rate_limit_forgives_a_client_that_pauses() -> None:
    """Strikes are forgiven once the bucket has refilled during a pause, so an occasional burst never closes."""
    rate = RateLimit(rate_per_s=10, burst=5, now=0.0)
    now = 0.0
    for _ in range(10):  # ten bursts, each well past the bucket, with a pause between them
        refused = sum(not rate.take(now) for _ in range(20))
        assert refused == 15
        assert not rate.exhausted
        now += 0.5  # burst / rate: the bucket is full again
    assert rate.strikes == 15


@settings(max_examples=200)
@given(st.lists(st.floats(min_value=0, max_value=2, allow_nan=False), min_size=1, max_size=200))
def test_rate_limit_never_admits_more_than_burst_plus_rate_times_elapsed(gaps: list[float]) -> None:
    """Whatever the arrival pattern, admitted frames never exceed burst + rate x elapsed time."""
    rate = RateLimit(rate_per_s=10, burst=5, now=0.0)
    now = 0.0
    admitted = 0
    for gap in gaps:
        now += gap
        admitted += rate.take(now)
        assert admitted <= 5 + 10 * now + 1e-6


# Live frames, folding and catch-up.


def test_a_session_takes_live_frames_unless_stalled_or_refreshing() -> None:
    """Live frames are written only while the transport is not stalled and no refresh of the channel is queued."""
    session = make()
    follow(session, "c", "1")
    assert session.takes_live("c")
    session.stalled = True
    assert not session.takes_live("c")
    session.stalled = False
    session.begin_refresh("c")
    assert not session.takes_live("c") and session.takes_live("d")
    session.end_refresh("c")
    assert session.takes_live("c") and session.pending == {}


def test_stalled_then_drained_catches_up_with_one_notify_of_the_newest_seq_and_ts() -> None:
    """Batches folded while stalled go out as one notify: keys once, first-seen order, last payloads, newest seq/ts."""
    session = make()
    follow(session, "c", "*")
    session.stalled = True
    session.fold("c", 4, 1004, ["a", "b"], {"a": "a1", "b": "b1"}, max_keys=10, now=MOMENT)
    session.fold("c", 5, 1005, ["c", "a"], {"c": "c1", "a": "a2"}, max_keys=10, now=MOMENT)
    frames, refreshes = session.catch_up(LATER, 2000)
    assert refreshes == []
    assert decoded(frames) == [(
        "notify",
        {"type": "notify", "channel": "c", "seq": 5, "ts": 1005, "keys": ["a", "b", "c"],
         "payloads": {"a": "a2", "b": "b1", "c": "c1"}},
        1005,
    )]
    assert session.pending == {}
    assert session.catch_up(LATER, 2001) == ([], [])


def test_catch_up_leaves_out_keys_unsubscribed_meanwhile() -> None:
    """A key the client unsubscribed while stalled is not in its catch-up (nor its payload)."""
    session = make()
    follow(session, "c", "1", "2", "3")
    session.stalled = True
    session.fold("c", 1, 100, ["1", "2", "3"], {"1": "p1", "2": "p2", "3": "p3"}, max_keys=10, now=MOMENT)
    session.unsubscribe(Unsubscribe("c", ("2",)))
    frames, _ = session.catch_up(LATER, 200)
    [(_, frame, _)] = decoded(frames)
    assert frame["keys"] == ["1", "3"] and frame["payloads"] == {"1": "p1", "3": "p3"}


def test_catch_up_sends_nothing_when_every_folded_key_was_unsubscribed() -> None:
    """When none of the folded keys is still followed, the catch-up is empty rather than an empty notify."""
    session = make()
    follow(session, "c", "1", "2")
    session.stalled = True
    session.fold("c", 1, 100, ["1"], None, max_keys=10, now=MOMENT)
    session.unsubscribe(Unsubscribe("c", ("1",)))
    assert session.catch_up(LATER, 200) == ([], [])
    assert session.pending == {}


def test_past_max_pending_keys_a_hint_channel_catches_up_with_a_slow_client_resync() -> None:
    """Folding more than max_pending_keys lags the channel: it keeps no keys and catches up with a resync."""
    session = make()
    follow(session, "c", "*")
    session.stalled = True
    session.fold("c", 1, 101, ["1", "2"], None, max_keys=3, now=MOMENT)
    session.fold("c", 2, 102, ["3", "4"], None, max_keys=3, now=LATER)
    pending = session.pending["c"]
    assert pending.keys == {} and pending.lagged_since == LATER
    session.fold("c", 3, 103, ["5"], None, max_keys=3, now=datetime.now(UTC))  # lagged: seq/ts move, nothing kept
    assert pending.keys == {} and pending.lagged_since == LATER and (pending.seq, pending.ts) == (3, 103)
    gap_end = datetime(2026, 11, 30, 12, 1, 0, tzinfo=UTC)
    frames, refreshes = session.catch_up(gap_end, 5000)
    assert refreshes == []
    assert decoded(frames) == [(
        "resync",
        {"type": "resync", "channel": "c", "reason": "slow_client", "gap_start": "2026-11-30T12:00:05.000+00:00",
         "gap_end": "2026-11-30T12:01:00.000+00:00", "ts": 5000},
        5000,
    )]
    assert session.pending == {}


def test_a_state_channel_catches_up_with_a_refresh_of_its_folded_keys() -> None:
    """On a state channel the catch-up is a refresh request for the folded keys, and the channel stays folded."""
    session = make(stateful=("s",))
    follow(session, "s", "1", "2")
    session.stalled = True
    session.fold("s", 1, 100, ["2", "1"], None, max_keys=10, now=MOMENT)
    frames, refreshes = session.catch_up(LATER, 200)
    assert frames == []
    assert refreshes == [Refresh("s", ("2", "1"), None, "slow_client")]
    session.stalled = False
    assert not session.takes_live("s")  # its refresh is on its way: live batches wait for it
    assert session.catch_up(LATER, 300) == ([], [])  # and a second drain asks for no second refresh
    assert session.claim_pending("s") == (["2", "1"], False, None)
    session.end_refresh("s")
    assert session.takes_live("s") and session.pending == {}


def test_a_lagged_state_channel_asks_for_a_refresh_of_everything() -> None:
    """A state channel that lagged past max_pending_keys asks for a refresh of everything the client follows."""
    session = make(stateful=("s",))
    follow(session, "s", "*")
    session.stalled = True
    session.fold("s", 1, 100, ["1", "2", "3"], None, max_keys=2, now=MOMENT)
    frames, refreshes = session.catch_up(LATER, 200)
    assert frames == [] and refreshes == [Refresh("s", None, None, "slow_client")]
    assert session.claim_pending("s") == ([], True, None)
    assert session.pending["s"].lagged_since is None  # claimed: the refresh covers the lag


def test_refreshing_channels_stay_folded_until_end_refresh() -> None:
    """A channel whose snapshot or replay is queued is skipped by catch-up; what it folds is claimed with it."""
    session = make()
    follow(session, "c", "*")
    follow(session, "d", "*")
    session.begin_refresh("c")
    session.stalled = True
    session.fold("c", 1, 100, ["x"], None, max_keys=10, now=MOMENT)
    session.fold("d", 1, 100, ["y"], None, max_keys=10, now=MOMENT)
    frames, refreshes = session.catch_up(LATER, 200)
    assert [frame["channel"] for _, frame, _ in decoded(frames)] == ["d"] and refreshes == []
    session.stalled = False
    assert not session.takes_live("c")
    assert session.claim_pending("c") == (["x"], False, None)
    session.end_refresh("c")
    assert session.takes_live("c") and "c" not in session.pending


def test_end_refresh_keeps_keys_folded_after_the_claim_for_catch_up() -> None:
    """Keys folded after a refresh claimed its keys are kept, and sent by the next catch-up once it has ended."""
    session = make()
    follow(session, "c", "*")
    session.begin_refresh("c")
    assert session.claim_pending("c") == ([], False, None)
    session.fold("c", 2, 200, ["late"], None, max_keys=10, now=MOMENT)
    session.end_refresh("c")
    assert not session.pending["c"].refreshing
    frames, _ = session.catch_up(LATER, 300)
    assert [(frame["keys"], frame["seq"]) for _, frame, _ in decoded(frames)] == [(["late"], 2)]


def test_claim_pending_filters_unfollowed_keys_and_resets_the_lag() -> None:
    """Claiming hands over only still-followed keys and clears both keys and lag, so nothing is sent twice."""
    session = make()
    follow(session, "c", "1")
    session.begin_refresh("c")
    session.fold("c", 1, 100, ["1", "2"], None, max_keys=10, now=MOMENT)
    assert session.claim_pending("c") == (["1"], False, None)
    assert session.claim_pending("c") == ([], False, None)
    assert session.claim_pending("never") == ([], False, None)


def test_claim_pending_hands_over_the_last_payloads_of_the_folded_keys() -> None:
    """On a payload channel the claimed keys come with their last payloads, even when the refresh was queued
    before anything was folded, so a replay or catch-up built from them drops no payload."""
    session = make()
    follow(session, "c", "1", "2")
    session.begin_refresh("c")
    session.fold("c", 1, 100, ["1", "2"], {"1": "p1", "2": "q1"}, max_keys=10, now=MOMENT)
    session.fold("c", 2, 200, ["1"], {"1": "p2"}, max_keys=10, now=MOMENT)
    keys, lagged, payloads = session.claim_pending("c")
    assert (keys, lagged) == (["1", "2"], False)
    assert payloads is not None and {key: payloads[key] for key in keys} == {"1": "p2", "2": "q1"}
    assert session.claim_pending("c")[:2] == ([], False)  # handed over once


@settings(max_examples=200)
@given(
    st.lists(st.lists(st.sampled_from("abcdefghij"), min_size=1, max_size=5, unique=True), min_size=1, max_size=30),
    st.integers(min_value=1, max_value=12),
)
def test_catch_up_is_exactly_the_fold_of_what_was_missed(batches: list[list[str]], max_keys: int) -> None:
    """Whatever was folded, the catch-up names every missed key once in first-seen order, or resyncs when too many."""
    session = make()
    follow(session, "c", "*")
    session.stalled = True
    for seq, keys in enumerate(batches, start=1):
        session.fold("c", seq, 1000 + seq, keys, {key: f"{key}{seq}" for key in keys}, max_keys=max_keys, now=MOMENT)
    frames, _ = session.catch_up(LATER, 9999)
    missed = list(dict.fromkeys(key for keys in batches for key in keys))
    [(kind, frame, ts)] = decoded(frames)
    if len(missed) > max_keys:
        assert kind == "resync" and frame["reason"] == "slow_client" and ts == 9999
        return
    last = {key: f"{key}{seq}" for seq, keys in enumerate(batches, start=1) for key in keys}
    assert kind == "notify" and frame["keys"] == missed and frame["payloads"] == last
    assert frame["seq"] == len(batches) and ts == frame["ts"] == 1000 + len(batches)
