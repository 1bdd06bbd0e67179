"""Parsing client frames and encoding server frames."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import msgspec
import pytest
from hypothesis import given
from hypothesis import strategies as st

from notifyrelay import protocol
from notifyrelay.exceptions import ProtocolError
from notifyrelay.protocol import Ping, Subscribe, Unsubscribe

from .fakes import Rows


def parse(text: str | bytes) -> protocol.Command:
    return protocol.parse_frame(text, max_key_bytes=16)


def test_parses_the_three_ops() -> None:
    """subscribe, unsubscribe and ping parse to commands; duplicate keys are dropped, order kept."""
    assert parse('{"op":"subscribe","channel":"c","keys":["2","1","2"],"id":"x"}') == Subscribe("c", ("2", "1"), "x")
    assert parse('{"op":"unsubscribe","channel":"c","keys":["*"]}') == Unsubscribe("c", ("*",))
    assert parse('{"op":"ping","id":"p"}') == Ping("p")


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{", "bad_json"),
        ("[" * 5000 + "]" * 5000, "bad_json"),
        (b'{"op":"ping"}', "bad_request"),
        ("[1,2]", "bad_request"),
        ('{"channel":"c"}', "bad_request"),
        ('{"op":5}', "bad_request"),
        ('{"op":"dance"}', "unknown_op"),
        ('{"op":"subscribe","keys":["1"]}', "bad_request"),
        ('{"op":"subscribe","channel":"c"}', "bad_request"),
        ('{"op":"subscribe","channel":"c","keys":[]}', "bad_request"),
        ('{"op":"subscribe","channel":"c","keys":"1"}', "bad_request"),
        ('{"op":"subscribe","channel":"c","keys":[1]}', "bad_request"),
        ('{"op":"subscribe","channel":"c","keys":[""]}', "bad_request"),
        ('{"op":"subscribe","channel":"c","keys":["' + "k" * 17 + '"]}', "bad_request"),
        ('{"op":"ping","id":7}', "bad_request"),
        ('{"op":"ping","id":"' + "i" * 200 + '"}', "bad_request"),
    ],
)
def test_malformed_frames_get_a_code_and_a_sentence(frame: str | bytes, code: str) -> None:
    """Every kind of malformed frame maps to its documented error code and a readable message."""
    with pytest.raises(ProtocolError) as caught:
        parse(frame)
    assert caught.value.code == code
    assert len(caught.value.message) > 10


def test_error_keeps_the_request_id_when_it_is_valid() -> None:
    """An error about a frame with a usable id echoes that id."""
    with pytest.raises(ProtocolError) as caught:
        parse('{"op":"subscribe","channel":"c","keys":[],"id":"c9"}')
    assert caught.value.request_id == "c9"
    frame = msgspec.json.decode(protocol.error(caught.value.code, caught.value.message, caught.value.request_id))
    assert frame == {"type": "error", "id": "c9", "code": "bad_request", "message": caught.value.message}


def decode(body: bytes) -> Any:
    return msgspec.json.decode(body)


def test_welcome_says_protocol_2_and_the_instance() -> None:
    """welcome announces protocol 2, the window, the channels, the listener's state and this process's instance."""
    frame = decode(protocol.welcome(window_ms=200, channels=["a", "b"], listener_up=False, instance="i-1"))
    assert frame == {"type": "welcome", "protocol": 2, "window_ms": 200, "channels": ["a", "b"], "listener": "down",
                     "instance": "i-1"}
    assert decode(protocol.welcome(window_ms=0, channels=[], listener_up=True, instance="x"))["listener"] == "up"


def test_ack_pong_and_status_frames() -> None:
    """ack echoes the op, id, channel and keys; pong echoes the id only when given; status names the listener."""
    assert decode(protocol.ack(Subscribe("c", ("1", "2"), "s1", since=5))) == {
        "type": "ack", "op": "subscribe", "id": "s1", "channel": "c", "keys": ["1", "2"]}
    assert decode(protocol.ack(Unsubscribe("c", ("*",)))) == {
        "type": "ack", "op": "unsubscribe", "channel": "c", "keys": ["*"]}
    assert decode(protocol.pong("p")) == {"type": "pong", "id": "p"}
    assert decode(protocol.pong(None)) == {"type": "pong"}
    assert decode(protocol.status(True)) == {"type": "status", "listener": "up"}
    assert decode(protocol.status(False)) == {"type": "status", "listener": "down"}


def test_notify_frame_carries_ts_and_only_the_given_keys_and_raw_json_payloads() -> None:
    """A notify frame names seq, ts and its keys in order, and embeds JSON payloads without re-encoding them."""
    payloads = {"1": msgspec.Raw(b'{"id":1,"n":2}'), "2": "plain", "3": "not sent"}
    frame = decode(protocol.notify("c", 3, 1764504000123, ["2", "1"], payloads))
    assert frame == {"type": "notify", "channel": "c", "seq": 3, "ts": 1764504000123, "keys": ["2", "1"],
                     "payloads": {"2": "plain", "1": {"id": 1, "n": 2}}}


def test_notify_without_payloads_or_replay_has_neither_member() -> None:
    """A plain v1-style notify gains only ts: no payloads, replay or state members appear uninvited."""
    assert decode(protocol.notify("c", 1, 2, iter(["k"]))) == {
        "type": "notify", "channel": "c", "seq": 1, "ts": 2, "keys": ["k"]}


def test_replay_notify_says_replay_true() -> None:
    """A resume's notify is marked replay: true."""
    assert decode(protocol.notify("c", 1, 2, ["k"], replay=True))["replay"] is True


def test_notify_on_a_state_channel_carries_only_the_clients_keys_rows() -> None:
    """rows, gone, progress and state_error_keys are cut down to the frame's keys: no row of an unfollowed key."""
    state = Rows(
        rows={"1": {"n": 1}, "2": {"n": 2}, "9": {"n": 9}}, gone=["3", "8"],
        progress={"1": {"percent": 10.0}, "9": {"percent": 90.0}}, error="too_large", error_keys=["2", "7"],
    )
    frame = decode(protocol.notify("c", 4, 5, ["1", "2", "3"], state=state))
    assert frame == {
        "type": "notify", "channel": "c", "seq": 4, "ts": 5, "keys": ["1", "2", "3"],
        "rows": {"1": {"n": 1}, "2": {"n": 2}}, "gone": ["3"], "progress": {"1": {"percent": 10.0}},
        "state_error": "too_large", "state_error_keys": ["2"],
    }


_texts = st.text(min_size=1, max_size=6)


@given(
    channel=_texts, seq=st.integers(0, 2**53), ts=st.integers(0, 2**53),
    batch=st.lists(_texts, min_size=1, max_size=6, unique=True), data=st.data(),
    with_payloads=st.booleans(), with_state=st.booleans(),
)
def test_a_batch_s_notify_frames_are_byte_for_byte_notify(
    channel: str, seq: int, ts: int, batch: list[str], data: st.DataObject, with_payloads: bool, with_state: bool,
) -> None:
    """The hub's per-batch encoder writes exactly the bytes notify writes, for any subset of the batch's keys."""
    keys = data.draw(st.lists(st.sampled_from(batch), min_size=1, unique=True))
    payloads: dict[str, Any] | None = None
    if with_payloads:
        values = st.sampled_from([key * 2 for key in batch] + [msgspec.Raw(b'{"n":[1,"\\u00e9"]}')])
        payloads = {key: data.draw(values) for key in batch[1:]}
    state = None
    if with_state:
        state = Rows(rows={key: {"n": n} for n, key in enumerate(batch[::2])}, gone=batch[1::3],
                     progress={batch[0]: {"percent": 1.5}}, error=data.draw(st.sampled_from([None, "timeout"])),
                     error_keys=batch[-1:])
    frames = protocol.NotifyFrames(channel, seq, ts, payloads, state=state)
    assert frames.frame(keys) == protocol.notify(channel, seq, ts, keys, payloads, state=state)


def test_a_failed_state_query_still_sends_the_keys() -> None:
    """When the state query failed the notify keeps its keys and says state_error, with empty rows."""
    frame = decode(protocol.notify("c", 1, 2, ["1"], state=Rows(error="timeout")))
    assert frame["keys"] == ["1"] and frame["rows"] == {} and frame["state_error"] == "timeout"
    assert "gone" not in frame and "progress" not in frame and "state_error_keys" not in frame


def test_snapshot_frame_has_seq_ts_rows_and_always_gone() -> None:
    """A snapshot carries seq, ts, the rows of its keys, and gone (empty when nothing is gone)."""
    frame = decode(protocol.snapshot("c", 17, 99, ["1", "2"], Rows(rows={"1": {"n": 1}, "5": {"n": 5}})))
    assert frame == {"type": "snapshot", "channel": "c", "seq": 17, "ts": 99, "rows": {"1": {"n": 1}}, "gone": []}
    frame = decode(protocol.snapshot("c", 1, 2, ["1"], Rows(gone=["1", "2"], progress={})))
    assert frame["gone"] == ["1"] and frame["progress"] == {}


def test_resync_carries_iso8601_utc_times_and_ts() -> None:
    """gap_start and gap_end are ISO 8601 with a UTC offset, and the frame carries its ts."""
    start = datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
    end = datetime(2026, 1, 2, 3, 4, 7, tzinfo=UTC)
    frame = decode(protocol.resync("c", "overflow", start, end, 1767323047000))
    assert frame == {"type": "resync", "channel": "c", "reason": "overflow",
                     "gap_start": "2026-01-02T03:04:05.600+00:00", "gap_end": "2026-01-02T03:04:07.000+00:00",
                     "ts": 1767323047000}


def test_keepalive_and_close_lines() -> None:
    """An NDJSON keepalive is {"type":"keepalive"}; a stream's close frame says code and reason."""
    assert decode(protocol.keepalive()) == {"type": "keepalive"}
    assert decode(protocol.close(1001, "shutting down")) == {"type": "close", "code": 1001, "reason": "shutting down"}


# Resume positions.


def test_subscribe_takes_since_as_an_integer_or_a_digit_string() -> None:
    """A subscribe's since may be an integer or a string of digits (as in a query string); absent means None."""
    assert parse('{"op":"subscribe","channel":"c","keys":["1"],"since":1764504000000}') == Subscribe(
        "c", ("1",), since=1764504000000)
    assert parse('{"op":"subscribe","channel":"c","keys":["1"],"since":"17"}') == Subscribe("c", ("1",), since=17)
    assert parse('{"op":"subscribe","channel":"c","keys":["1"],"since":0}') == Subscribe("c", ("1",), since=0)
    assert parse('{"op":"subscribe","channel":"c","keys":["1"],"since":null}') == Subscribe("c", ("1",))


@pytest.mark.parametrize(
    "since", [-1, 1.5, 1.0, True, False, "", "abc", "-5", "1e3", " 12", "1" * 17, 2**53, [1], {"ts": 1}],
)
def test_bad_since_is_a_bad_request_with_the_request_id(since: Any) -> None:
    """A since that is not a non-negative integer below 2**53 (or such a digit string) is refused with bad_request."""
    frame = msgspec.json.encode({"op": "subscribe", "channel": "c", "keys": ["1"], "since": since, "id": "r1"})
    with pytest.raises(ProtocolError) as caught:
        parse(frame.decode())
    assert caught.value.code == "bad_request" and caught.value.request_id == "r1"
    assert "since" in caught.value.message


def test_validate_since_accepts_the_edges() -> None:
    """validate_since accepts 0, 2**53 - 1 and a 16-digit string below it, and passes None through."""
    assert protocol.validate_since(None) is None
    assert protocol.validate_since(0) == 0
    assert protocol.validate_since(2**53 - 1) == 2**53 - 1
    assert protocol.validate_since("1" * 16) == 1_111_111_111_111_111


def test_validate_since_refuses_a_16_digit_string_past_2_to_the_53() -> None:
    """A digit string is held to the same bound as an integer: 16 nines are past 2**53 and refused."""
    with pytest.raises(ProtocolError):
        protocol.validate_since("9" * 16)


@pytest.mark.parametrize("since", ["²", "①", "¹²³"])
def test_a_unicode_digit_since_is_a_bad_request_not_a_crash(since: str) -> None:
    """A since of Unicode digits that int() cannot read is a bad_request, never an escaping ValueError."""
    with pytest.raises(ProtocolError) as caught:
        protocol.validate_since(since, "r2")
    assert caught.value.code == "bad_request"


@given(st.integers(min_value=0, max_value=2**53 - 1))
def test_any_valid_ts_round_trips_through_a_query_string(ts: int) -> None:
    """Every ts the relay can send is accepted back as since, as an integer or as its decimal string."""
    assert protocol.validate_since(ts) == ts
    assert protocol.validate_since(str(ts)) == ts
