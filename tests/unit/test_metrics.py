"""The metric catalogue: SPEC's names, types and labels, the naming rules, and the commit-time extraction."""

from __future__ import annotations

from datetime import UTC, datetime

import msgspec
import pytest
from prometheus_client.parser import text_string_to_metric_families

from notifyrelay import __version__
from notifyrelay.config import ChannelConfig
from notifyrelay.ops.metrics import Metrics
from notifyrelay.ops.worker_reports import relay_metrics
from notifyrelay.pipeline.coalescer import ChannelWindow, KeyExtractor

# SPEC's list: name (without the prefix) -> (type, label names). v2 labels clients and messages_sent by transport.
SPEC_METRICS = {
    "notifications_received": ("counter", {"channel"}),
    "notifications_coalesced": ("counter", {"channel"}),
    "batches": ("counter", {"channel"}),
    "messages_sent": ("counter", {"type", "transport"}),
    "clients": ("gauge", {"transport"}),
    "subscriptions": ("gauge", {"channel"}),
    "listener_up": ("gauge", set()),
    "listener_reconnects": ("counter", set()),
    "delivery_latency_seconds": ("histogram", set()),
    "pg_notification_queue_usage": ("gauge", set()),
    "build_info": ("gauge", {"version"}),
}
# SPEC v2's additions: live state, resume, several workers.
SPEC_V2_METRICS = {
    "state_queries": ("counter", {"channel", "outcome"}),
    "state_query_seconds": ("histogram", {"channel"}),
    "snapshots": ("counter", {"channel"}),
    "resumes": ("counter", {"outcome"}),
    "history_keys": ("gauge", {"channel"}),
    "stalled_keys": ("gauge", {"channel"}),
    "workers": ("gauge", set()),
}
# What issue 4 and the hardening add for operators.
OPERATOR_METRICS = {
    "listener_last_heartbeat_timestamp_seconds": ("gauge", set()),
    "listener_connect_failures": ("counter", set()),
    "listener_connect_attempts": ("counter", set()),
    "listener_unexpected_errors": ("counter", set()),
    "listener_undecodable_payloads": ("counter", {"channel"}),
    "listener_gap_seconds": ("histogram", set()),
    "heartbeat_seconds": ("histogram", set()),
    "pg_notification_queue_sampled_timestamp_seconds": ("gauge", set()),
    "ingest_queue_depth": ("gauge", set()),
    "ingest_overflows": ("counter", {"channel"}),
    "bad_payloads": ("counter", {"channel"}),
    "bytes_sent": ("counter", {"type"}),
    "slow_clients": ("counter", set()),
    "slow_client_disconnects": ("counter", set()),
    "client_errors": ("counter", {"code"}),
    "connections_opened": ("counter", set()),
    "connections_closed": ("counter", {"code"}),
    "handshake_rejections": ("counter", {"reason"}),
    "handshakes": ("gauge", set()),
    "accept_errors": ("counter", {"errno"}),
    "commit_to_delivery_seconds": ("histogram", {"channel"}),
    "auth_failures": ("counter", {"reason"}),
    "token_expirations": ("counter", set()),
    "connection_limit_rejections": ("counter", set()),
    "subscription_limit_rejections": ("counter", set()),
    "total_subscription_limit_rejections": ("counter", set()),
    "handshakes_shed": ("counter", set()),
    "oversized_frames": ("counter", set()),
    "oversized_keys": ("counter", set()),
    "rate_limited_frames": ("counter", set()),
    "handshake_timeouts": ("counter", set()),
    "keepalive_timeouts": ("counter", set()),
    "state_rows_dropped": ("counter", {"channel", "reason"}),
}


def families(metrics: Metrics) -> dict[str, tuple[str, set[str]]]:
    """Every family of the exposition as name -> (type, label names seen on its samples, bucket label aside)."""
    found: dict[str, tuple[str, set[str]]] = {}
    for family in text_string_to_metric_families(metrics.exposition().decode()):
        labels = {name for sample in family.samples for name in sample.labels} - {"le"}
        found[family.name] = (family.type, labels)
    return found


def populated() -> Metrics:
    """The metrics a relay running alone exports, with one sample in every labelled family, so that their label
    names show."""
    metrics = relay_metrics(None)
    metrics.declare_channel("activity_progress", commit_time=True)
    metrics.clients.labels("websocket").set(1)
    metrics.messages_sent.labels("notify", "sse").inc()
    metrics.bytes_sent.labels("notify").inc(10)
    metrics.client_errors.labels("bad_json").inc()
    metrics.connections_closed.labels("1000").inc()
    metrics.handshake_rejections.labels("origin").inc()
    metrics.auth_failures.labels("expired").inc()
    metrics.accept_errors.labels("EMFILE").inc()
    metrics.listener_undecodable_payloads.labels("activity_progress").inc()
    metrics.state_queries.labels("activity_progress", "ok").inc()
    metrics.state_query_seconds.labels("activity_progress").observe(0.01)
    metrics.state_rows_dropped.labels("activity_progress", "too_large").inc()
    metrics.snapshots.labels("activity_progress").inc()
    metrics.stalled_keys.labels("activity_progress").set(1)
    metrics.resumes.labels("replayed").inc()
    metrics.history_keys.labels("activity_progress").set(3)
    return metrics


@pytest.mark.parametrize(
    "catalogue", [SPEC_METRICS, SPEC_V2_METRICS, OPERATOR_METRICS], ids=["spec", "spec_v2", "operator"]
)
def test_every_metric_exists_with_its_type_and_labels(catalogue: dict[str, tuple[str, set[str]]]) -> None:
    """Each metric SPEC (v1 and v2) and the operator issues name is exported under notifyrelay_ with the right type
    and label names."""
    found = families(populated())
    for name, (kind, labels) in catalogue.items():
        assert found.get(f"notifyrelay_{name}") == (kind, labels), name


def test_no_metric_is_labelled_by_key() -> None:
    """Labels stay low-cardinality (channel, frame type, transport, code, errno, reason, outcome or version), never
    a notification key."""
    allowed = {"channel", "type", "transport", "code", "errno", "reason", "outcome", "version"}
    for name, (_, labels) in families(populated()).items():
        if name.startswith("notifyrelay_"):
            assert labels <= allowed, name


def test_names_follow_the_prometheus_conventions() -> None:
    """Relay metrics carry the prefix, counters end in _total, and process/python metrics sit beside them."""
    exposition = populated().exposition().decode()
    for family in text_string_to_metric_families(exposition):
        assert family.name.startswith(("notifyrelay_", "process_", "python_")), family.name
        for sample in family.samples:
            if family.type == "counter":
                assert sample.name.endswith("_total"), sample.name
    assert "process_resident_memory_bytes" in exposition
    assert f'notifyrelay_build_info{{version="{__version__}"}} 1.0' in exposition


def test_declare_channel_creates_zero_series() -> None:
    """A configured channel has its series at zero before its first notification, so rate() and alerts see it."""
    metrics = Metrics()
    metrics.declare_channel("quiet")
    exposition = metrics.exposition().decode()
    for name in ("notifications_received_total", "notifications_coalesced_total", "batches_total",
                 "bad_payloads_total", "ingest_overflows_total", "subscriptions"):
        assert f'notifyrelay_{name}{{channel="quiet"}} 0.0' in exposition, name
    assert 'commit_to_delivery_seconds_count{channel="quiet"}' not in exposition


COMMITTED = datetime(2026, 11, 22, 22, 8, 40, 593000, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("stamp", "expected"),
    [
        (COMMITTED, COMMITTED),
        (int(COMMITTED), float(int(COMMITTED))),
        ("2026-11-22T22:08:40.593+00:00", COMMITTED),
        ("2026-11-22T23:08:40.593+01:00", COMMITTED),
        ("2026-11-22T22:08:40.593Z", COMMITTED),
        ("2026-11-22T22:08:40.593", COMMITTED),  # PostgreSQL timestamp without time zone: taken as UTC
        ("yesterday", None),
        (True, None),
        (None, None),
        ({"nested": 1}, None),
    ],
)
def test_commit_time_is_read_from_a_json_channel(stamp: object, expected: float | None) -> None:
    """A json: channel's commit_time_field is read as Unix seconds or ISO 8601; anything else is no commit time."""
    extract = KeyExtractor(
        ChannelConfig(name="c", key="json:id", commit_time_field="committed_at", include_payload=True)
    ).extract
    key, value, committed = extract(msgspec.json.encode({"id": 42, "committed_at": stamp}).decode())
    assert key == "42"
    assert isinstance(value, msgspec.Raw)
    assert committed == (pytest.approx(expected) if expected is not None else None)


def test_commit_time_is_optional() -> None:
    """Without commit_time_field nothing is parsed; a payload channel reads it only from payloads that are JSON."""
    assert KeyExtractor(ChannelConfig(name="c", key="json:id", include_payload=True)).extract('{"id":"a","t":1}') == (
        "a", msgspec.Raw(b'{"id":"a","t":1}'), None)
    # Without include_payload no copy of the payload is kept: frames do not carry it.
    assert KeyExtractor(ChannelConfig(name="c", key="json:id")).extract('{"id":"a"}') == ("a", None, None)
    payload_channel = KeyExtractor(ChannelConfig(name="c", commit_time_field="t", include_payload=True))
    assert payload_channel.extract('{"t": 5}') == ('{"t": 5}', '{"t": 5}', 5.0)
    assert payload_channel.extract("42") == ("42", "42", None)
    assert payload_channel.extract("not json") == ("not json", "not json", None)


def test_window_carries_every_commit_time_into_its_batch() -> None:
    """Coalesced notifications keep their own commit times, and a flush starts the next batch empty."""
    window = ChannelWindow("c", window_s=0.2, leading_edge=True, with_payloads=False)
    first = window.add("42", None, 10.0, committed=1.0)
    assert first is not None
    assert first.committed_at == [1.0]
    assert window.add("42", None, 10.05, committed=2.0) is None
    assert window.add("43", None, 10.06) is None
    assert window.add("42", None, 10.07, committed=3.0) is None
    second = window.flush(10.2)
    assert second.keys == ["42", "43"]
    assert second.committed_at == [2.0, 3.0]
    assert window.flush(10.4).committed_at == []
