"""Parsing client frames and encoding server frames."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest

from notifyrelay import protocol
from notifyrelay.exceptions import ProtocolError
from notifyrelay.protocol import Ping, Subscribe, Unsubscribe


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


def test_notify_frame_carries_only_the_given_keys_and_raw_json_payloads() -> None:
    """A notify frame names its keys in order and embeds JSON payloads without re-encoding them."""
    payloads = {"1": msgspec.Raw(b'{"id":1,"n":2}'), "2": "plain"}
    frame = msgspec.json.decode(protocol.notify("c", 3, ["2", "1"], payloads))
    assert frame == {"type": "notify", "channel": "c", "seq": 3, "keys": ["2", "1"],
                     "payloads": {"2": "plain", "1": {"id": 1, "n": 2}}}


def test_resync_times_are_iso8601_utc_with_offset() -> None:
    """gap_start and gap_end are ISO 8601 with a UTC offset."""
    start = datetime(2026, 1, 2, 3, 4, 5, 600000, tzinfo=UTC)
    frame = msgspec.json.decode(protocol.resync("c", "overflow", start, start))
    assert frame["gap_start"] == "2026-01-02T03:04:05.600+00:00"
