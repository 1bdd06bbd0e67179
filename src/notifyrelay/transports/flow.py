"""Flow control every transport shares: the one stall watchdog per client.

asyncio tells a protocol when its write buffer passes the high-water mark (``pause_writing``) and when it has
drained (``resume_writing``). A transport passes both on to the hub, which folds the client's batches meanwhile and
catches it up after, and starts a ``stall_timeout_s`` timer that closes a client that never drains, whichever way
it stopped (notify frames, answers to its own frames, pongs to its pings). Websockets and streams differ only in
what pausing means for reading (a websocket stops reading its peer too) and in how they end.
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


class Backpressure:
    """The write side's pause, drain and stall watchdog, for a transport class that has these attributes."""

    __slots__ = ("_stall_timer", "paused")
    hub: Hub
    session: Session | None
    settings: ServerConfig
    peer: str
    name: str
    _metrics: Metrics

    def __init__(self) -> None:
        self.paused = False
        self._stall_timer: asyncio.TimerHandle | None = None

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
