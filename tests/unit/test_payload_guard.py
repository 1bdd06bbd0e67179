"""The payload guard's framing: whatever the chunking, good messages pass intact and only bad notifications go."""

from __future__ import annotations

from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from notifyrelay.pipeline.payload_guard import PayloadGuard


class Sink:
    """Stands in for asyncpg's protocol: keeps every byte it is given."""

    def __init__(self) -> None:
        self.received = bytearray()

    def data_received(self, data: bytes) -> None:
        self.received += data


def message(kind: bytes, body: bytes) -> bytes:
    return kind + (len(body) + 4).to_bytes(4, "big") + body


def notification(channel: bytes, payload: bytes, pid: int = 4242) -> bytes:
    return message(b"A", pid.to_bytes(4, "big") + channel + b"\0" + payload + b"\0")


good_text = st.text(min_size=0, max_size=40).map(lambda s: s.replace("\0", "").encode())
bad_bytes = st.binary(min_size=1, max_size=20).map(lambda b: b"\xff" + b.replace(b"\0", b"."))
messages = st.lists(
    st.one_of(
        st.tuples(st.just("good"), good_text.map(lambda p: notification(b"chan", p))),
        st.tuples(st.just("bad"), bad_bytes.map(lambda p: notification(b"chan", p))),
        st.tuples(st.just("good"), st.binary(max_size=300).map(lambda b: message(b"D", b))),
        st.tuples(st.just("good"), st.just(message(b"Z", b"I"))),
    ),
    max_size=12,
)


@given(messages, st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=30))
def test_any_chunking_forwards_exactly_the_good_messages(stream: list[tuple[str, bytes]], cuts: list[int]) -> None:
    """Cut anywhere, the stream reaches asyncpg minus exactly the undecodable notifications, each reported once."""
    sink = Sink()
    reported: list[tuple[str, int]] = []
    guard = PayloadGuard(sink, lambda channel, pid: reported.append((channel, pid)))
    data = b"".join(raw for _, raw in stream)
    position, index = 0, 0
    while position < len(data):
        size = cuts[index % len(cuts)]
        guard.data_received(data[position:position + size])
        position, index = position + size, index + 1
    assert bytes(sink.received) == b"".join(raw for kind, raw in stream if kind == "good")
    assert reported == [("chan", 4242)] * sum(kind == "bad" for kind, _ in stream)


def test_a_clean_chunk_is_forwarded_as_the_same_object() -> None:
    """On the common path (whole messages, nothing bad) the guard hands asyncpg the very bytes it got, uncopied."""
    forwarded: list[Any] = []

    class Keep:
        def data_received(self, data: bytes) -> None:
            forwarded.append(data)

    chunk = notification(b"chan", b"42") + message(b"Z", b"I")
    PayloadGuard(Keep(), lambda channel, pid: None).data_received(chunk)
    assert forwarded == [chunk] and forwarded[0] is chunk
