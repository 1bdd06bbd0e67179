"""The one small interface every transport gives the hub, and frames encoded at most once per framing.

The hub never sees a socket: it writes ``OutFrame``s to ``Transport``s. An ``OutFrame`` is one JSON frame; each
transport asks it for its own wire bytes (a websocket text frame, an SSE event, an NDJSON line, in HTTP chunks or
not), which are built on first use and then shared by every client on that framing. So one batch to 10,000
clients is encoded once and framed once per framing, however many clients take it.
"""

from __future__ import annotations

from typing import Protocol

# Framings: how a transport puts a frame on the wire. "+chunked" is the HTTP/1.1 chunked body of a stream.
WEBSOCKET = "websocket"
SSE = "sse"
NDJSON = "ndjson"


class OutFrame:
    """One server frame: its type (for metrics and SSE's ``event:``), its JSON, and its ``ts`` (SSE's ``id:``)."""

    __slots__ = ("_wire", "body", "kind", "ts")

    def __init__(self, kind: str, body: bytes, ts: int | None = None) -> None:
        self.kind = kind
        self.body = body
        self.ts = ts
        self._wire: dict[str, bytes] = {}

    def wire(self, framing: str) -> bytes:
        """This frame's bytes on ``framing``, built once."""
        wire = self._wire.get(framing)
        if wire is None:
            wire = self._wire[framing] = encode(framing, self)
        return wire


def encode(framing: str, frame: OutFrame) -> bytes:
    kind, _, chunked = framing.partition("+")
    if kind == WEBSOCKET:
        # Server frames are unmasked, so every client gets the same bytes: a final text frame's header (RFC 6455
        # 5.2), written here because websockets' Frame.serialize costs several times more per distinct frame.
        return text_frame_header(len(frame.body)) + frame.body
    if kind == SSE:
        event_id = b"id: %d\n" % frame.ts if frame.ts is not None else b""
        data = b"event: %s\n%sdata: %s\n\n" % (frame.kind.encode(), event_id, frame.body)
    else:
        data = frame.body + b"\n"
    return chunk(data) if chunked else data


def text_frame_header(length: int) -> bytes:
    """FIN + text opcode, no mask, and the payload length in 7, 7+16 or 7+64 bits."""
    if length < 126:
        return bytes((0x81, length))
    if length < 65536:
        return b"\x81\x7e" + length.to_bytes(2, "big")
    return b"\x81\x7f" + length.to_bytes(8, "big")


def chunk(data: bytes) -> bytes:
    """``data`` as one HTTP/1.1 chunk."""
    return b"%x\r\n%s\r\n" % (len(data), data)


class Transport(Protocol):
    """What the hub needs of a client's connection, whatever carries it.

    A transport tells the hub when its write buffer passes its high-water mark (``Hub.stalled``) and when it has
    drained again (``Hub.drained``); the hub then folds, and later catches up. ``write`` never waits."""

    name: str  # websocket, sse or ndjson: the metric label
    unidirectional: bool  # SSE and NDJSON: the subscription is the URL, the client sends no frames

    def write(self, frame: OutFrame) -> bool:
        """Queue the frame's wire bytes now; False when the connection is closing or gone."""
        ...

    @property
    def paused(self) -> bool:
        """The write buffer is above its high-water mark."""
        ...

    def close(self, code: int, reason: str) -> None:
        """Start closing with ``code`` (websocket close code; streams end with a close event). Idempotent; a peer
        that does not finish closing within a grace period is cut off."""
        ...

    @property
    def peer(self) -> str:
        """host:port of the peer, for log lines."""
        ...
