"""Prometheus metrics, all prefixed ``notifyrelay_``. Labels are low-cardinality: channel, frame type, code; never key.

Each relay owns its registry, so several relays (tests) can live in one process.
"""

from __future__ import annotations

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    GCCollector,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    disable_created_metrics,
    generate_latest,
)

from .. import __version__

# The *_created series double the exposition for no operator benefit.
disable_created_metrics()  # type: ignore[no-untyped-call]  # untyped in prometheus_client

# The [server] limits, each counted by its own metric: config key -> (metric name, help).
LIMITS = {
    "max_connections": ("connection_limit_rejections", "Connections refused (503 or 1013) at server.max_connections."),
    "max_subscriptions": ("subscription_limit_rejections", "Subscribes refused past server.max_subscriptions."),
    "max_message_bytes": ("oversized_frames", "Connections closed (1009) for a frame over server.max_message_bytes."),
    "max_key_bytes": ("oversized_keys", "Frames refused for a key over server.max_key_bytes."),
    "rate_limit": ("rate_limited_frames", "Client frames dropped by the per-connection rate limit."),
    "handshake_timeout_s": ("handshake_timeouts", "Opening handshakes not finished within server.handshake_timeout_s."),
    "ping_timeout_s": ("keepalive_timeouts", "Connections closed (1011) for no pong within server.ping_timeout_s."),
    # Hardening.
    "max_total_subscriptions": ("total_subscription_limit_rejections",
                                "Subscribes refused at server.max_total_subscriptions (held over all connections)."),
    "max_handshakes": ("handshakes_shed", "Connections in their handshake closed past server.max_handshakes, oldest "
                       "first."),
}
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 1.0, 2.5, 5.0)
# Commit to delivery also spans the database's commit and the network, and clocks on two hosts: a wider range.
COMMIT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.25, 0.3, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)


class Metrics:
    """Every metric the relay exports, on one registry."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        p = "notifyrelay_"
        # process_* (CPU, memory, file descriptors) and python_* (GC, version), as the default registry has them.
        ProcessCollector(registry=r)
        PlatformCollector(registry=r)
        GCCollector(registry=r)
        self.build_info = Gauge(f"{p}build_info", "Always 1; the version is a label.", ["version"], registry=r)
        self.build_info.labels(__version__).set(1)
        # Ingest and coalescing.
        self.notifications_received = Counter(
            f"{p}notifications_received", "Notifications taken off the LISTEN connection.", ["channel"], registry=r
        )
        self.notifications_coalesced = Counter(
            f"{p}notifications_coalesced", "Notifications folded into a key already pending.", ["channel"], registry=r
        )
        self.batches = Counter(f"{p}batches", "Batches flushed.", ["channel"], registry=r)
        self.bad_payloads = Counter(
            f"{p}bad_payloads", "Notifications dropped because no key could be taken from them.", ["channel"],
            registry=r,
        )
        self.ingest_queue_depth = Gauge(f"{p}ingest_queue_depth", "Notifications waiting to be coalesced.", registry=r)
        self.ingest_overflows = Counter(
            f"{p}ingest_overflows", "Times a channel lost notifications to a full ingest queue.", ["channel"],
            registry=r,
        )
        # Listener.
        self.listener_up = Gauge(
            f"{p}listener_up", "1 while every channel is LISTENed on a live connection.", registry=r
        )
        self.listener_reconnects = Counter(f"{p}listener_reconnects", "Reconnects after a lost connection.", registry=r)
        self.listener_connect_failures = Counter(
            f"{p}listener_connect_failures", "Failed attempts to connect and LISTEN.", registry=r
        )
        self.listener_last_heartbeat = Gauge(
            f"{p}listener_last_heartbeat_timestamp_seconds", "Unix time of the last heartbeat that came back.",
            registry=r,
        )
        self.listener_gap_seconds = Histogram(
            f"{p}listener_gap_seconds", "From the last proof of listening to LISTEN in force again, per loss.",
            buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300), registry=r,
        )
        self.heartbeat_seconds = Histogram(
            f"{p}heartbeat_seconds", "Round trip of the listener's self-NOTIFY heartbeat.",
            buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1, 5), registry=r,
        )
        self.pg_notification_queue_usage = Gauge(
            f"{p}pg_notification_queue_usage", "pg_notification_queue_usage() (0-1), sampled before "
            "every heartbeat and connection attempt.",
            registry=r,
        )
        # Listener hardening.
        self.listener_connect_attempts = Counter(
            f"{p}listener_connect_attempts", "Attempts to connect and LISTEN (each opens a PostgreSQL backend).",
            registry=r,
        )
        self.listener_unexpected_errors = Counter(
            f"{p}listener_unexpected_errors", "Unexpected exceptions in the listener, each turned into a reconnect.",
            registry=r,
        )
        self.listener_undecodable_payloads = Counter(
            f"{p}listener_undecodable_payloads", "Notifications dropped because their payload is not UTF-8.",
            ["channel"], registry=r,
        )
        self.pg_notification_queue_sampled = Gauge(
            f"{p}pg_notification_queue_sampled_timestamp_seconds",
            "Unix time of the last pg_notification_queue_usage() sample (taken on each connection and heartbeat).",
            registry=r,
        )
        # Clients.
        self.clients = Gauge(f"{p}clients", "Connected clients, by transport (websocket, sse, ndjson).", ["transport"],
                             registry=r)
        self.subscriptions = Gauge(f"{p}subscriptions", "Subscriptions (key or *) held.", ["channel"], registry=r)
        self.connections_opened = Counter(f"{p}connections_opened", "Websocket connections accepted.", registry=r)
        self.connections_closed = Counter(
            f"{p}connections_closed", "Websocket connections closed, by close code.", ["code"], registry=r
        )
        self.handshake_rejections = Counter(
            f"{p}handshake_rejections", "Upgrade requests refused before the websocket opened.", ["reason"],
            registry=r,
        )
        self.client_errors = Counter(f"{p}client_errors", "Error frames sent, by code.", ["code"], registry=r)
        self.messages_sent = Counter(
            f"{p}messages_sent", "Frames written to clients, by frame type and transport.", ["type", "transport"],
            registry=r,
        )
        self.bytes_sent = Counter(f"{p}bytes_sent", "Payload bytes of frames written to clients.", ["type"], registry=r)
        self.slow_clients = Counter(
            f"{p}slow_clients", "Times a client's write buffer passed its high-water mark.", registry=r
        )
        self.slow_client_disconnects = Counter(
            f"{p}slow_client_disconnects", "Clients closed for staying stalled past stall_timeout_s.", registry=r
        )
        # Limits and authentication (docs/security.md): one counter per [server] limit, keyed by that limit's name.
        self.limit_hits: dict[str, Counter] = {
            limit: Counter(f"{p}{name}", help_text, registry=r) for limit, (name, help_text) in LIMITS.items()
        }
        self.auth_failures = Counter(
            f"{p}auth_failures", "Upgrade requests refused with 401, by reason (missing, expired, signature, ...).",
            ["reason"], registry=r,
        )
        self.token_expirations = Counter(
            f"{p}token_expirations", "Connections closed (4001) because their token expired.", registry=r
        )
        # Hardening.
        self.handshakes = Gauge(
            f"{p}handshakes", "TCP connections not (yet) a websocket or a stream: in their handshake, or idle "
            "keep-alive (bounded by server.max_handshakes).", registry=r,
        )
        self.accept_errors = Counter(
            f"{p}accept_errors", "Failed accepts on a listening socket, by errno (EMFILE: out of file descriptors).",
            ["errno"], registry=r,
        )
        self.delivery_latency = Histogram(
            f"{p}delivery_latency_seconds",
            "From the receipt of a batch's oldest notification to the batch's frames being written (one per batch).",
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.commit_to_delivery = Histogram(
            f"{p}commit_to_delivery_seconds",
            "From the commit timestamp a JSON payload carries (channel commit_time_field) to its frames being written.",
            ["channel"], buckets=COMMIT_BUCKETS, registry=r,
        )
        # Live state.
        self.state_queries = Counter(
            f"{p}state_queries", "State queries, by outcome: ok, timeout, query_failed, too_large (rows left out).",
            ["channel", "outcome"], registry=r,
        )
        self.state_query_seconds = Histogram(
            f"{p}state_query_seconds", "Duration of state queries, pool wait included.", ["channel"],
            buckets=LATENCY_BUCKETS, registry=r,
        )
        self.state_rows_dropped = Counter(
            f"{p}state_rows_dropped", "Rows a state query returned that reach no client, by reason: unasked_key, "
            "duplicate_key, too_large.", ["channel", "reason"], registry=r,
        )
        self.snapshots = Counter(f"{p}snapshots", "Snapshot frames sent.", ["channel"], registry=r)
        self.stalled_keys = Gauge(
            f"{p}stalled_keys", "Active keys whose row has not changed for stall_after_s.", ["channel"], registry=r
        )

        # Resume.
        self.resumes = Counter(
            f"{p}resumes", "Resume requests (since=TS), by outcome: replayed, snapshot, resync.", ["outcome"],
            registry=r,
        )
        self.history_keys = Gauge(
            f"{p}history_keys", "Keys whose last change this process remembers, for resume.", ["channel"], registry=r
        )

    def declare_channel(self, channel: str, *, commit_time: bool = False) -> None:
        """Create a channel's series at zero, so that rate() and alerts see them before its first notification."""
        for family in (self.notifications_received, self.notifications_coalesced, self.batches, self.bad_payloads,
                       self.ingest_overflows, self.subscriptions):
            family.labels(channel)
        if commit_time:
            self.commit_to_delivery.labels(channel)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)
