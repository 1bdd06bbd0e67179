"""The hub's fan-out against stand-in transports: what a batch writes, and what it observes."""

from __future__ import annotations

import time

from notifyrelay import protocol
from notifyrelay.config import ServerConfig
from notifyrelay.delivery.hub import Hub
from notifyrelay.delivery.session import Session
from notifyrelay.delivery.transport import WEBSOCKET, OutFrame
from notifyrelay.ops.metrics import Metrics
from notifyrelay.pipeline.coalescer import Batch
from notifyrelay.protocol import Subscribe


class Recording:
    """A websocket-framed Transport that keeps the frames written to it."""

    name = "websocket"
    unidirectional = False
    paused = False
    peer = "test"

    def __init__(self) -> None:
        self.frames: list[OutFrame] = []

    def write(self, frame: OutFrame) -> bool:
        frame.wire(WEBSOCKET)
        self.frames.append(frame)
        return True

    def close(self, code: int, reason: str) -> None:
        pass


def hub_with(*follows: tuple[str, ...]) -> tuple[Hub, Metrics, list[Recording]]:
    metrics = Metrics()
    hub = Hub(ServerConfig(), ["c"], metrics, instance="i", window_ms=200)
    transports = []
    for keys in follows:
        transport = Recording()
        session: Session = hub.open(transport, None)
        hub.subscribe(session, Subscribe("c", keys))
        transport.frames.clear()
        transports.append(transport)
    return hub, metrics, transports


def latency(metrics: Metrics, suffix: str) -> float:
    value = metrics.registry.get_sample_value(f"notifyrelay_delivery_latency_seconds_{suffix}")
    assert value is not None
    return value


def test_each_client_gets_the_frame_of_its_own_keys_byte_for_byte() -> None:
    """Clients following different keys of a batch each get notify's frame of their keys, in batch order."""
    hub, _, (one, both, everything) = hub_with(("2",), ("3", "1"), ("*",))
    hub.publish(Batch(channel="c", seq=7, keys=["1", "2", "3"], payloads=None, ts=99))
    assert [f.body for f in one.frames] == [protocol.notify("c", 7, 99, ["2"])]
    assert [f.body for f in both.frames] == [protocol.notify("c", 7, 99, ["1", "3"])]
    assert [f.body for f in everything.frames] == [protocol.notify("c", 7, 99, ["1", "2", "3"])]


def test_delivery_latency_is_observed_once_per_batch_from_its_oldest_notification() -> None:
    """One observation per batch that reached a client, measured from the batch's oldest receipt; none otherwise."""
    hub, metrics, _ = hub_with(("1",), ("2",))
    now = time.monotonic()
    hub.publish(Batch(channel="c", seq=1, keys=["1", "2"], payloads=None, ts=1, received_at=[now - 0.5, now - 0.1]))
    assert latency(metrics, "count") == 1
    assert 0.5 <= latency(metrics, "sum") < 0.6
    hub.publish(Batch(channel="c", seq=2, keys=["9"], payloads=None, ts=2, received_at=[now]))  # nobody follows 9
    assert latency(metrics, "count") == 1
