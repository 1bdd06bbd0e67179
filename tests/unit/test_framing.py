"""Frames on the wire: one JSON frame framed once per framing (websocket, SSE, NDJSON, chunked or not) and shared."""

from __future__ import annotations

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from websockets.frames import Frame, Opcode
from websockets.streams import StreamReader

from notifyrelay import protocol
from notifyrelay.delivery.transport import NDJSON, SSE, WEBSOCKET, OutFrame, chunk

BODY = b'{"type":"notify","channel":"c","seq":1,"ts":1764504000000,"keys":["42"]}'


def parse_websocket(wire: bytes) -> Frame:
    """Parse bytes as a client would (server frames are unmasked), with websockets' own parser."""
    reader = StreamReader()
    reader.feed_data(wire)
    reader.feed_eof()
    parser = Frame.parse(reader.read_exact, mask=False)
    try:
        next(parser)
    except StopIteration as done:
        frame: Frame = done.value
        assert reader.at_eof()  # nothing left over: exactly one frame
        return frame
    raise AssertionError("the bytes do not hold one whole frame")


def unchunk(wire: bytes) -> bytes:
    """The data of one HTTP/1.1 chunk, checking its framing."""
    size, _, rest = wire.partition(b"\r\n")
    length = int(size, 16)
    assert rest[length:] == b"\r\n"
    return rest[:length]


@pytest.mark.parametrize("size", [10, 200, 70_000])  # the 7-bit, 16-bit and 64-bit length forms
def test_websocket_wire_is_one_unmasked_text_frame(size: int) -> None:
    """On a websocket the frame is one final, unmasked text frame holding the JSON as is, whatever its length."""
    body = b'"' + b"x" * (size - 2) + b'"'
    frame = parse_websocket(OutFrame("notify", body).wire(WEBSOCKET))
    assert frame.opcode is Opcode.TEXT and frame.fin and frame.data == body


def test_websocket_wire_ignores_chunked() -> None:
    """A websocket frame is the same bytes whatever is asked of it: chunking is only for HTTP stream bodies."""
    frame = OutFrame("notify", BODY, 1)
    assert frame.wire(WEBSOCKET + "+chunked") == frame.wire(WEBSOCKET)


def test_sse_event_names_the_type_and_carries_ts_as_its_id() -> None:
    """An SSE event has the frame type as event, ts as id (for Last-Event-ID), and the JSON on one data line."""
    wire = OutFrame("notify", BODY, 1764504000000).wire(SSE)
    assert wire == b"event: notify\nid: 1764504000000\ndata: " + BODY + b"\n\n"


def test_sse_event_without_ts_has_no_id() -> None:
    """Frames without a ts (welcome, ack, status, error) carry no id, so they never move the resume position."""
    wire = OutFrame("welcome", b'{"type":"welcome"}').wire(SSE)
    assert wire == b'event: welcome\ndata: {"type":"welcome"}\n\n'
    assert b"id:" not in wire


def test_sse_event_with_ts_zero_still_has_an_id() -> None:
    """A ts of 0 is a position like any other: only a missing ts leaves the id out."""
    assert OutFrame("resync", b"{}", 0).wire(SSE) == b"event: resync\nid: 0\ndata: {}\n\n"


def test_ndjson_line_is_the_json_and_a_newline() -> None:
    """On an NDJSON stream a frame is its JSON on one line."""
    assert OutFrame("notify", BODY, 5).wire(NDJSON) == BODY + b"\n"


@pytest.mark.parametrize("framing", [SSE, NDJSON])
def test_chunked_framing_wraps_exactly_the_unchunked_bytes(framing: str) -> None:
    """With +chunked, the bytes are one HTTP/1.1 chunk (hex size, CRLF, data, CRLF) of the plain framing."""
    frame = OutFrame("notify", BODY, 7)
    wire = frame.wire(framing + "+chunked")
    assert wire.startswith(b"%x\r\n" % len(frame.wire(framing)))
    assert unchunk(wire) == frame.wire(framing)


@pytest.mark.parametrize("framing", [WEBSOCKET, SSE, NDJSON, SSE + "+chunked", NDJSON + "+chunked"])
def test_the_same_bytes_object_is_reused_for_a_second_client(framing: str) -> None:
    """A frame is framed once per framing: every later client gets the very same bytes object."""
    frame = OutFrame("notify", BODY, 7)
    first = frame.wire(framing)
    assert frame.wire(framing) is first


def test_each_framing_is_cached_separately() -> None:
    """Asking for one framing neither changes nor replaces another's bytes."""
    frame = OutFrame("notify", BODY, 7)
    wires = {framing: frame.wire(framing) for framing in [WEBSOCKET, SSE, NDJSON, SSE + "+chunked"]}
    assert len({id(wire) for wire in wires.values()}) == 4
    assert all(frame.wire(framing) is wire for framing, wire in wires.items())


@settings(max_examples=200)
@given(
    st.text(min_size=1, max_size=20),
    st.dictionaries(st.text(min_size=1, max_size=8), st.text(max_size=40), max_size=5),
    st.integers(min_value=0, max_value=2**53 - 1),
)
def test_any_notify_is_one_sse_data_line_and_one_ndjson_line(channel: str, payloads: dict[str, str], ts: int) -> None:
    """Whatever the keys and payloads (newlines, CR, U+2028 included), a frame's JSON never breaks an SSE event
    or an NDJSON line, and decodes back from both, chunked or not."""
    keys = list(payloads) or ["k"]
    body = protocol.notify(channel, 1, ts, keys, payloads or None)
    frame = OutFrame("notify", body, ts)
    event = unchunk(frame.wire(SSE + "+chunked"))
    assert event == frame.wire(SSE)
    lines = event.split(b"\n")
    assert lines[:2] == [b"event: notify", b"id: %d" % ts] and lines[3:] == [b"", b""]
    assert b"\r" not in event
    assert lines[2].startswith(b"data: ")
    assert msgspec.json.decode(lines[2][len(b"data: "):]) == msgspec.json.decode(body)
    line = unchunk(frame.wire(NDJSON + "+chunked"))
    assert line.count(b"\n") == 1 and line.endswith(b"\n")
    assert msgspec.json.decode(line) == msgspec.json.decode(body)


@given(st.binary(max_size=300))
def test_chunk_frames_any_data(data: bytes) -> None:
    """chunk() gives the hex length, CRLF, the data and CRLF, for any data."""
    assert unchunk(chunk(data)) == data
