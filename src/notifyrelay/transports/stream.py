"""Server-Sent Events (``/sse``) and NDJSON (``/stream``): the same frames as the websocket, one way, over HTTP.

The subscription is the URL. The response is a stream: chunked on HTTP/1.1 (ended by the last chunk), or
delimited by the connection's close on HTTP/1.0. SSE sends a ``retry:`` line first, each frame as one event
(``event: TYPE``, ``id: TS`` when it carries a ``ts``, ``data: JSON``) and a comment line every ``keepalive_s``;
NDJSON sends one frame per line and ``{"type":"keepalive"}`` lines. The slow-client policy is the websocket's: a
stalled stream's batches are folded, and past ``stall_timeout_s`` it is closed. A stream ends with a close event
(SSE) or a close line (NDJSON) saying why, on shutdown, token expiry, stall, or ``until=done``.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from .. import protocol
from ..delivery.hub import Hub
from ..delivery.session import Session
from ..delivery.transport import NDJSON, SSE, OutFrame, chunk
from ..ops.metrics import Metrics
from .flow import ClientTransport

if TYPE_CHECKING:
    from ..config import ServerConfig

log = structlog.get_logger("notifyrelay.stream")
SSE_RETRY_MS = 2000


class StreamTransport(ClientTransport):
    """One SSE or NDJSON response stream (the hub's Transport interface)."""

    unidirectional = True
    __slots__ = ("chunked", "closed", "framing", "name")

    def __init__(
        self, kind: str, transport: asyncio.Transport, *, chunked: bool, hub: Hub, settings: ServerConfig,
        metrics: Metrics, peer: str,
    ) -> None:
        super().__init__(transport, hub, settings, metrics, peer)
        self.name = kind  # "sse" or "ndjson"
        self.framing = f"{kind}+chunked" if chunked else kind
        self.chunked = chunked
        self.closed = False

    def start(self, head: bytes, grant_channels: dict[str, frozenset[str] | None] | None,
              subscribes: list[protocol.Subscribe], *, until_done: bool = False) -> Session:
        """Write the response head, then the welcome and the URL's subscriptions. With ``until_done`` the stream
        ends (close code 1000) once every key it follows has reached a terminal status."""
        self.transport.write(head)
        if self.name == SSE:
            self._raw(b"retry: %d\n\n" % SSE_RETRY_MS)
        session = self.session = self.hub.open(self, grant_channels)
        if until_done:
            session.done = {}
        self._metrics.connections_opened.inc()
        for subscribe in subscribes:
            self.hub.execute(session, subscribe)
        self._keepalive = asyncio.get_running_loop().call_later(self.settings.keepalive_s, self._send_keepalive)
        return session

    def _raw(self, data: bytes) -> None:
        self.transport.write(chunk(data) if self.chunked else data)

    # The hub's Transport interface.

    def write(self, frame: OutFrame) -> bool:
        if self.closed or self.transport.is_closing():
            return False
        self.transport.write(frame.wire(self.framing))
        return True

    def close(self, code: int, reason: str) -> None:
        """End the stream after a last frame saying why (SSE: ``event: close``; NDJSON: a close line)."""
        if self.closed:
            return
        self.write(OutFrame("close", protocol.close(code, reason)))
        self.closed = True
        if self.chunked:
            self.transport.write(b"0\r\n\r\n")
        self.transport.close()  # after the buffer is flushed; a peer that never drains it is cut off
        self._cut_off_later()

    def _send_keepalive(self) -> None:
        if self.closed or self.transport.is_closing():
            return
        if not self.paused:  # a stalled stream's buffer needs no more
            self._raw(b": keepalive\n\n" if self.name == SSE else protocol.keepalive() + b"\n")
            if self.session is not None:
                self._metrics.messages_sent.labels("keepalive", self.name).inc()
        self._keepalive = asyncio.get_running_loop().call_later(self.settings.keepalive_s, self._send_keepalive)

    # Flow control.

    def _stalled_too_long(self, timeout: float) -> None:
        super()._stalled_too_long(timeout)
        self.transport.abort()  # its buffer will not drain: the close line cannot reach it anyway

    def connection_lost(self) -> None:
        self.closed = True
        self._gone()
        self._metrics.connections_closed.labels("stream").inc()


__all__ = ["NDJSON", "SSE", "StreamTransport"]
