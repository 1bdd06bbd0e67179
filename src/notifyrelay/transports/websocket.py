"""The websocket transport: websockets' Sans-I/O protocol on a connection the relay owns.

The HTTP layer (transports/http.py) hands over an upgrade request; from then on this object turns bytes into
frames with ``websockets.server.ServerProtocol`` and writes through the asyncio transport itself. Owning the
transport is what lets a frame shared by many clients be framed once and written as the same bytes to each, with
public APIs only. Keepalive pings, the stall watchdog and the close handshake are timers, not tasks: an idle
connection costs no coroutine.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog
from websockets.extensions.permessage_deflate import ServerPerMessageDeflateFactory
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import Request
from websockets.protocol import Protocol, State
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from .. import protocol
from ..delivery.hub import Hub
from ..delivery.transport import WEBSOCKET, OutFrame
from ..exceptions import ProtocolError
from ..ops.metrics import Metrics
from .flow import ClientTransport
from .gate import StreamRequest

if TYPE_CHECKING:
    from ..config import ServerConfig

log = structlog.get_logger("notifyrelay.websocket")
_quiet = logging.getLogger("websockets.server")  # it logs every open and close at info: keep it to warnings
KNOWN_CLOSE_CODES = frozenset(
    {1000, 1001, 1002, 1003, 1006, 1007, 1008, 1009, 1010, 1011, 1012, 1013, 1014,
     protocol.CLOSE_SLOW_CLIENT, protocol.CLOSE_TOKEN_EXPIRED}
)


def handshake(
    request_head: bytes, settings: ServerConfig, subprotocol: str | None
) -> tuple[ServerProtocol, bytes, bool]:
    """Run the opening handshake on an upgrade request's head (as h11 parsed it, serialised again): the protocol,
    the bytes to write, and whether it opened. The protocol parses the head itself, so that its parser moves on to
    frames exactly as it would on a connection it had accepted."""
    ws = ServerProtocol(
        select_subprotocol=lambda _, offered: (
            Subprotocol(subprotocol) if subprotocol is not None and subprotocol in offered else None
        ),
        extensions=[ServerPerMessageDeflateFactory()] if settings.compression else None,
        max_size=settings.max_message_bytes,
        logger=_quiet,
    )
    ws.receive_data(request_head)
    request = next((event for event in ws.events_received() if isinstance(event, Request)), None)
    if request is None:  # h11 accepted what websockets does not: answer as websockets would
        return ws, b"".join(ws.data_to_send()), False
    response = ws.accept(request)
    ws.send_response(response)
    opened = response.status_code == 101
    if opened:
        # ServerProtocol.parse parses the request, then goes on with ``yield from super().parse()``: its suspended
        # frame would keep the request and its headers (about 2 KiB) for as long as the connection lives. Go on
        # with the frame parser alone instead, replaced the way websockets itself replaces ``parser``.
        ws.parser = Protocol.parse(ws)
        next(ws.parser)
    return ws, b"".join(ws.data_to_send()), opened


class WebSocketTransport(ClientTransport):
    """One open websocket: frames in to the hub, frames out from it (the hub's Transport interface)."""

    name = "websocket"
    unidirectional = False
    __slots__ = ("_fragments", "_ping", "_ping_sent_at", "latency", "ws")

    def __init__(
        self, transport: asyncio.Transport, ws: ServerProtocol, hub: Hub, settings: ServerConfig, metrics: Metrics,
        peer: str,
    ) -> None:
        super().__init__(transport, hub, settings, metrics, peer)
        self.ws = ws
        self._ping: bytes | None = None
        self._fragments: list[bool | bytes] | None = None  # a fragmented message: is it text, then its parts
        self._ping_sent_at = 0.0
        self.latency = 0.0  # the last keepalive round trip, seconds

    def start(self, grant_channels: dict[str, frozenset[str] | None] | None, request: StreamRequest | None,
              error: ProtocolError | None) -> None:
        """Open the session: welcome, then the query string's subscriptions (or its error)."""
        session = self.session = self.hub.open(self, grant_channels)
        self._metrics.connections_opened.inc()
        if error is not None:
            self.hub.reply_error(session, error)
        for subscribe in request.subscribes if request else ():
            self.hub.execute(session, subscribe)
        # The first ping falls at a random point of the second interval, so that connections opened together
        # (a deploy, a reconnect storm) do not ping together for as long as they live.
        interval = self.settings.ping_interval_s
        self._schedule(self._send_ping, interval + random.uniform(0, interval))

    # The hub's Transport interface.

    def write(self, frame: OutFrame) -> bool:
        ws = self.ws
        if ws.state is not State.OPEN:
            return False
        if ws.extensions:  # permessage-deflate: this connection's own compressed frame
            ws.send_text(frame.body)
            self._flush()
        else:
            self.transport.write(frame.wire(WEBSOCKET))
        return True

    def close(self, code: int, reason: str) -> None:
        if self.ws.state is State.OPEN:
            self.ws.send_close(code, reason)
            self._flush()
        self._cut_off_later()  # a peer that does not answer the close (or never drains our buffer)

    # Bytes from the peer.

    def data_received(self, data: bytes) -> None:
        ws = self.ws
        ws.receive_data(data)
        for event in ws.events_received():
            if isinstance(event, Frame):
                self._frame(event)
        self._flush()

    def eof_received(self) -> None:
        self.ws.receive_eof()
        self._flush()

    def _frame(self, frame: Frame) -> None:
        session = self.session
        if session is None or self.ws.state is not State.OPEN:
            return
        opcode = frame.opcode
        if opcode is Opcode.TEXT or opcode is Opcode.BINARY or opcode is Opcode.CONT:
            # Fragments are put back together; websockets' protocol bounds the whole message by max_size (1009).
            if opcode is not Opcode.CONT:
                self._fragments = [opcode is Opcode.TEXT]
            elif self._fragments is None:
                return  # a continuation of nothing: the protocol has failed the connection already
            self._fragments.append(bytes(frame.data))
            if not frame.fin:
                return
            is_text, *parts = self._fragments
            self._fragments = None
            data = b"".join(parts)  # type: ignore[arg-type]
            if not is_text:
                message: str | bytes = data
            else:
                try:
                    message = data.decode()
                except UnicodeDecodeError:
                    self.close(CloseCode.INVALID_DATA, "invalid UTF-8 in a text frame")
                    return
            if not self.hub.receive(session, message):
                self._rate_close()
        elif opcode is Opcode.PING:
            # websockets answers pings itself; a flood of them counts against the rate like any frame.
            if not session.admit(asyncio.get_running_loop().time()):
                self._metrics.limit_hits["rate_limit"].inc()
                if session.rate.exhausted:
                    self._rate_close()
        elif opcode is Opcode.PONG and self._ping is not None and frame.data == self._ping:
            self._ping = None
            self.latency = asyncio.get_running_loop().time() - self._ping_sent_at
            self._schedule(self._send_ping, self.settings.ping_interval_s)

    def _rate_close(self) -> None:
        log.info("server.rate_limit_close", client=self.session.id if self.session else None, remote=self.peer,
                 rate_limit_per_s=self.settings.rate_limit_per_s)
        self.close(CloseCode.POLICY_VIOLATION, "rate limit exceeded")

    def _flush(self) -> None:
        done = False
        for data in self.ws.data_to_send():
            if data:
                self.transport.write(data)
            else:  # the protocol has nothing more to send: the close handshake is over (or it failed)
                done = True
        if done or self.ws.state is State.CLOSED:
            self.transport.close()

    # Keepalive: a ping every ping_interval_s; no pong within ping_timeout_s closes with 1011.

    def _schedule(self, callback: Callable[[], None], delay: float) -> None:
        if self._keepalive is not None:
            self._keepalive.cancel()
        self._keepalive = asyncio.get_running_loop().call_later(delay, callback)

    def _send_ping(self) -> None:
        if self.ws.state is not State.OPEN:
            return
        self._ping = os.urandom(4)
        self._ping_sent_at = asyncio.get_running_loop().time()
        self.ws.send_ping(self._ping)
        self._flush()
        self._schedule(self._ping_timeout, self.settings.ping_timeout_s)

    def _ping_timeout(self) -> None:
        self._metrics.limit_hits["ping_timeout_s"].inc()
        self.close(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")

    # Flow control, from the asyncio transport through the HTTP connection.

    def _writes_paused(self) -> None:
        # Stop reading too: a peer that floods frames or pings and reads none of the answers then fills its own
        # buffers, not ours.
        self.transport.pause_reading()

    def _writes_resumed(self) -> None:
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def connection_lost(self) -> None:
        self._gone()
        if self.ws.state is not State.CLOSED:
            self.ws.receive_eof()  # the protocol learns the TCP connection is gone, so close_code is final
        code = self.ws.close_code or 1006
        self._metrics.connections_closed.labels(str(code) if code in KNOWN_CLOSE_CODES else "other").inc()
        sent = self.ws.close_sent
        if sent is not None and sent.code == CloseCode.MESSAGE_TOO_BIG:
            self._metrics.limit_hits["max_message_bytes"].inc()
