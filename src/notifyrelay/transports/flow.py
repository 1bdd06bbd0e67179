"""What every client transport shares: its connection, the hub, its timers, and the one stall watchdog.

asyncio tells a protocol when its write buffer passes the high-water mark (``pause_writing``) and when it has
drained (``resume_writing``). A transport passes both on to the hub, which folds the client's batches meanwhile and
catches it up after, and starts a ``stall_timeout_s`` timer that closes a client that never drains, whichever way
it stopped (notify frames, answers to its own frames, pongs to its pings). Websockets and streams differ only in
what pausing means for reading (a websocket stops reading its peer too), in their keepalive and in how they end.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

import structlog

from .. import protocol

if TYPE_CHECKING:
    from ..config import ServerConfig
    from ..delivery.hub import Hub
    from ..delivery.session import Session
    from ..ops.metrics import Metrics

log = structlog.get_logger("notifyrelay.server")
CLOSE_GRACE_S = 2.0  # a peer that neither answers a close nor drains its buffer is cut off after this


class ClientTransport:
    """One client's connection as the hub sees it (a websocket or a stream), less what differs between them."""

    __slots__ = ("_close_timer", "_keepalive", "_metrics", "_stall_timer", "hub", "paused", "peer", "session",
                 "settings", "transport")
    name: str

    def __init__(self, transport: asyncio.Transport, hub: Hub, settings: ServerConfig, metrics: Metrics,
                 peer: str) -> None:
        self.transport = transport
        self.hub = hub
        self.settings = settings
        self.peer = peer
        self.session: Session | None = None
        self.paused = False
        self._metrics = metrics
        self._stall_timer: asyncio.TimerHandle | None = None
        self._close_timer: asyncio.TimerHandle | None = None
        self._keepalive: asyncio.TimerHandle | None = None

    def _cut_off_later(self) -> None:
        """Abort the connection after ``CLOSE_GRACE_S``, unless it is gone by then."""
        if self._close_timer is None:
            self._close_timer = asyncio.get_running_loop().call_later(CLOSE_GRACE_S, self.transport.abort)

    def _gone(self) -> None:
        """The TCP connection is gone: stop every timer, and leave the hub."""
        for timer in (self._stall_timer, self._close_timer, self._keepalive):
            if timer is not None:
                timer.cancel()
        if self.session is not None:
            self.hub.close(self.session)

    def pause_writing(self) -> None:
        self.paused = True
        self._writes_paused()
        if self.session is not None:
            self.hub.stalled(self.session)
        timeout = self.settings.stall_timeout_s
        self._stall_timer = asyncio.get_running_loop().call_later(timeout, self._stalled_too_long, timeout)

    def resume_writing(self) -> None:
        self.paused = False
        if self._stall_timer is not None:
            self._stall_timer.cancel()
            self._stall_timer = None
        self._writes_resumed()
        if self.session is not None:
            self.hub.drained(self.session)

    def _stalled_too_long(self, timeout: float) -> None:
        self._metrics.slow_client_disconnects.inc()
        log.warning("server.client_too_slow", remote=self.peer, stall_timeout_s=timeout, transport=self.name)
        self.close(protocol.CLOSE_SLOW_CLIENT, f"too slow: stalled over {timeout:g}s")

    def _writes_paused(self) -> None:
        """What else pausing means for this transport (nothing, by default)."""

    def _writes_resumed(self) -> None:
        """What else draining means for this transport (nothing, by default)."""

    def close(self, code: int, reason: str) -> None:  # pragma: no cover - every transport has its own
        raise NotImplementedError
