"""The pieces of several workers that need no worker: merging reports and expositions, reserving the port."""

from __future__ import annotations

import socket
import time
from pathlib import Path
from typing import Any

import msgspec
import pytest
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from notifyrelay.config import load_config
from notifyrelay.ops.health import Readiness
from notifyrelay.ops.worker_reports import (
    STALE_S,
    WorkerMetrics,
    WorkerReadiness,
    WorkerReporter,
    WorkerSlot,
    join_supervisor,
    merge_expositions,
    merge_readiness,
    read_worker,
    relay_metrics,
    relay_readiness,
    report_path,
)
from notifyrelay.ops.workers import is_worker, reserve_port


def exposition(clients: int, channel_batches: int) -> str:
    registry = CollectorRegistry()
    Gauge("notifyrelay_clients", "Connected clients.", registry=registry).set(clients)
    Counter("notifyrelay_batches", "Batches.", ["channel"], registry=registry).labels("a").inc(channel_batches)
    Histogram("notifyrelay_delivery_latency_seconds", "Latency.", buckets=(0.1, 1.0), registry=registry).observe(0.5)
    return generate_latest(registry).decode()


def ready_report(ready: bool = True) -> dict[str, Any]:
    return {"ready": ready, "reasons": [] if ready else ["listener down: connection refused"],
            "listener": "up" if ready else "down", "channels": ["a"], "last_heartbeat": None}


def test_merged_exposition_keeps_each_family_once_with_every_workers_samples() -> None:
    """Two workers' expositions merge into one valid exposition whose samples carry a worker label each."""
    supervisor = 'notifyrelay_workers 2.0\n'
    merged = merge_expositions([("0", exposition(3, 5)), ("1", exposition(4, 7)),
                                (None, "# HELP notifyrelay_workers Workers.\n# TYPE notifyrelay_workers gauge\n"
                                 + supervisor)])
    families = {family.name: family for family in text_string_to_metric_families(merged)}
    assert merged.count("# TYPE notifyrelay_clients gauge") == 1
    clients = {sample.labels["worker"]: sample.value for sample in families["notifyrelay_clients"].samples}
    assert clients == {"0": 3.0, "1": 4.0}
    batches = {(s.labels["worker"], s.labels["channel"]): s.value for s in families["notifyrelay_batches"].samples}
    assert batches == {("0", "a"): 5.0, ("1", "a"): 7.0}
    buckets = [s for s in families["notifyrelay_delivery_latency_seconds"].samples if s.name.endswith("_bucket")]
    assert {(s.labels["worker"], s.labels["le"]) for s in buckets} == {
        (w, le) for w in ("0", "1") for le in ("0.1", "1.0", "+Inf")}
    assert [s.labels for s in families["notifyrelay_workers"].samples] == [{}]


def test_readiness_is_ready_only_when_every_worker_is() -> None:
    """One worker not ready makes the merged report not ready, naming that worker and its reason."""
    states = [read_worker(Path("/nonexistent"), 1)]
    merged = merge_readiness(ready_report(), 0, states)
    assert merged["ready"] is False
    assert merged["reasons"] == ["worker 1: not reporting (starting, or restarted)"]
    assert merged["listener"] == "down"
    assert [w["worker"] for w in merged["workers"]] == [0, 1]


def test_worker_reports_are_judged_for_freshness(tmp_path: Path) -> None:
    """A report newer than STALE_S counts with its own reasons; an older one is a stuck or dead worker."""
    now = time.time()
    report_path(tmp_path, 0).write_bytes(msgspec.json.encode({"pid": 7, "time": now, "report": ready_report()}))
    report_path(tmp_path, 1).write_bytes(msgspec.json.encode(
        {"pid": 8, "time": now, "report": ready_report(ready=False)}))
    assert read_worker(tmp_path, 0, now=now).ready
    assert read_worker(tmp_path, 1, now=now).reason == "listener down: connection refused"
    stale = read_worker(tmp_path, 0, now=now + STALE_S + 1)
    assert not stale.ready and stale.reason.startswith("silent for") and stale.pid == 7
    merged = merge_readiness(ready_report(), 2, [read_worker(tmp_path, i, now=now) for i in (0, 1)])
    assert merged["reasons"] == ["worker 1: listener down: connection refused"]


class FakeListener:
    """Just what Readiness reads of a listener: up, with a fresh heartbeat."""

    def __init__(self) -> None:
        self.up = True
        self.down_reason = ""
        self.last_heartbeat: float | None = time.time()
        self.queue_usage: float | None = None
        self.queue_sampled_at: float | None = None
        self.queue_sample_error: str | None = None
        self.channels = ["a"]
        self.settings = load_config(None, environ={}, overrides={"dsn": "postgresql://x@h/db",
                                                                 "channels": [{"name": "a"}]}).listener


def test_a_worker_publishes_what_the_others_merge(tmp_path: Path) -> None:
    """What one worker publishes is what another answers /readyz and /metrics with, beside its own live state."""
    first_slot, second_slot = WorkerSlot(0, 2, tmp_path), WorkerSlot(1, 2, tmp_path)
    first = (relay_readiness(FakeListener(), first_slot), relay_metrics(first_slot))
    second = (relay_readiness(FakeListener(), second_slot), relay_metrics(second_slot))
    first[1].clients.labels("websocket").set(2)
    second[1].clients.labels("websocket").set(5)
    assert second[0].report()["ready"] is False  # worker 0 has not published yet
    reporter = WorkerReporter(*first, on_orphaned=lambda: None)
    assert isinstance(first[0], WorkerReadiness) and isinstance(first[1], WorkerMetrics)
    reporter.publish(first[0], first[1])
    report = second[0].report()
    assert report["ready"] is True and [w["worker"] for w in report["workers"]] == [0, 1]
    merged = second[1].exposition().decode()
    assert 'notifyrelay_clients{worker="0",transport="websocket"} 2.0' in merged
    assert 'notifyrelay_clients{worker="1",transport="websocket"} 5.0' in merged
    assert "notifyrelay_workers" not in merged  # the supervisor's to say, and it has not


def test_alone_the_probes_are_the_process_own() -> None:
    """Outside a supervisor the relay's readiness and metrics are its own, with notifyrelay_workers 1."""
    slot = join_supervisor({})
    assert slot is None and not is_worker({})
    readiness, metrics = relay_readiness(FakeListener(), slot), relay_metrics(slot)
    assert type(readiness) is Readiness and "workers" not in readiness.report()
    assert b"notifyrelay_workers 1.0" in metrics.exposition()


def test_worker_slot_round_trips_through_the_environment(tmp_path: Path) -> None:
    """The variables the supervisor sets make the child this worker; the config loader ignores them."""
    slot = WorkerSlot(3, 4, tmp_path)
    assert WorkerSlot.from_environ(slot.environ()) == slot
    assert is_worker(slot.environ())
    load_config(None, environ=slot.environ(), overrides={"dsn": "postgresql://x@h/db", "channels": [{"name": "a"}]})


def test_a_reserved_port_takes_no_connection_from_its_listening_workers() -> None:
    """A bound, never-listening SO_REUSEPORT socket holds port 0's real port for the workers, and the kernel routes
    every connection to the sockets that listen (the supervisor's reservation takes none)."""
    reserved, listen = reserve_port("127.0.0.1:0", "server.listen")
    port = int(listen.rsplit(":", 1)[1])
    listeners: list[socket.socket] = []
    try:
        assert port > 0 and reserved.getsockname()[1] == port
        with pytest.raises(ConnectionRefusedError):  # before a worker listens, nobody answers
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
        for _ in range(2):
            listeners.append(socket.create_server(("127.0.0.1", port), reuse_port=True, backlog=256))
        with pytest.raises(OSError):  # a server without SO_REUSEPORT cannot join them
            socket.create_server(("127.0.0.1", port))
        connections = [socket.create_connection(("127.0.0.1", port), timeout=2) for _ in range(200)]
        accepted = []
        for listener in listeners:
            listener.setblocking(False)
            count = 0
            while True:
                try:
                    listener.accept()[0].close()
                except BlockingIOError:
                    break
                count += 1
            accepted.append(count)
        assert sum(accepted) == len(connections)
        assert all(accepted), accepted  # both workers got some (the kernel hashes by the client's port)
        for connection in connections:
            connection.close()
    finally:
        reserved.close()
        for listener in listeners:
            listener.close()


@pytest.mark.parametrize("listen", ["127.0.0.1:0", "[::1]:0"])
def test_reserve_port_names_a_concrete_address(listen: str) -> None:
    """The reserved address is HOST:PORT with a real port, brackets kept for IPv6."""
    if listen.startswith("[") and not socket.has_ipv6:
        pytest.skip("no IPv6")
    try:
        sock, address = reserve_port(listen, "server.listen")
    except OSError as exc:  # an IPv6-less container
        pytest.skip(str(exc))
    sock.close()
    assert address.startswith(listen[:-1]) and int(address.rsplit(":", 1)[1]) > 0
