"""Writes notifyrelay.json, the Grafana dashboard, next to this file: ``python deploy/grafana/dashboard.py``.

Edit the panels here rather than in the JSON. tests/integration/test_observability.py checks that the dashboard
shows every metric the relay exports and that promtool parses each of its queries.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
SELECTOR = 'job=~"$job", instance=~"$instance"'
GREEN, YELLOW, RED = "green", "yellow", "red"
LIMIT_COUNTERS = (
    "connection_limit_rejections", "subscription_limit_rejections", "oversized_frames", "oversized_keys",
    "rate_limited_frames", "handshake_timeouts", "keepalive_timeouts", "token_expirations",
    "total_subscription_limit_rejections", "handshakes_shed",
)


def series(metric: str) -> str:
    return f"notifyrelay_{metric}{{{SELECTOR}}}"


def rate(metric: str, by: str = "", fn: str = "rate") -> str:
    """``sum [by (labels)] (rate(metric[$__rate_interval]))`` over the selected relays."""
    grouping = f" by ({by})" if by else ""
    return f"sum{grouping} ({fn}({series(metric)}[$__rate_interval]))"


def quantile(q: float, histogram: str, by: str = "", window: str = "$__rate_interval") -> str:
    labels = f"{by}, le" if by else "le"
    return f"histogram_quantile({q}, sum by ({labels}) (rate({series(histogram + '_bucket')}[{window}])))"


def steps(*pairs: tuple[str, float | None]) -> list[dict[str, Any]]:
    return [{"color": color, "value": value} for color, value in pairs]


class Dashboard:
    """Lays panels out left to right in rows of 24 grid units."""

    def __init__(self) -> None:
        self.panels: list[dict[str, Any]] = []
        self.y = 0

    def row(self, title: str) -> None:
        self.panels.append({"type": "row", "title": title, "id": len(self.panels) + 1, "collapsed": False,
                            "gridPos": {"h": 1, "w": 24, "x": 0, "y": self.y}, "panels": []})
        self.y += 1

    def next_line(self, height: int = 8) -> None:
        self.y += height

    def panel(
        self, kind: str, title: str, description: str, targets: list[tuple[str, str]], *, x: int, w: int = 8,
        h: int = 8, unit: str | None = None, thresholds: list[dict[str, Any]] | None = None,
        min_: float | None = None, max_: float | None = None, options: dict[str, Any] | None = None,
        defaults: dict[str, Any] | None = None, overrides: list[dict[str, Any]] | None = None,
    ) -> None:
        field: dict[str, Any] = {}
        if unit:
            field["unit"] = unit
        if min_ is not None:
            field["min"] = min_
        if max_ is not None:
            field["max"] = max_
        if thresholds:
            field["thresholds"] = {"mode": "absolute", "steps": thresholds}
        if kind == "timeseries":
            field["custom"] = {"drawStyle": "line", "lineWidth": 1, "fillOpacity": 10, "showPoints": "never",
                               "spanNulls": False, "stacking": {"mode": "none", "group": "A"}}
            if thresholds:
                field["custom"]["thresholdsStyle"] = {"mode": "line"}
            panel_options: dict[str, Any] = {
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "desc"},
            }
        else:
            panel_options = {"reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                             "colorMode": "background", "graphMode": "none", "textMode": "auto",
                             "justifyMode": "auto", "orientation": "auto"}
        field.update(defaults or {})
        panel_options.update(options or {})
        self.panels.append({
            "type": kind, "title": title, "description": description, "id": len(self.panels) + 1,
            "datasource": DATASOURCE, "gridPos": {"h": h, "w": w, "x": x, "y": self.y},
            "fieldConfig": {"defaults": field, "overrides": overrides or []},
            "options": panel_options,
            "targets": [
                {"datasource": DATASOURCE, "refId": chr(ord("A") + index), "expr": expr, "legendFormat": legend,
                 **({"instant": True} if kind == "stat" else {"range": True})}
                for index, (expr, legend) in enumerate(targets)
            ],
        })


def build() -> dict[str, Any]:
    d = Dashboard()

    d.row("Health")
    d.panel("stat", "Listener up", "1 while every channel is LISTENed on a live connection. Alert "
            "NotifyRelayListenerDown fires after a minute at 0.",
            [(f"min({series('listener_up')})", "")], x=0, w=4, h=4, thresholds=steps((RED, None), (GREEN, 1)),
            defaults={"mappings": [{"type": "value", "options": {
                "0": {"text": "DOWN", "color": RED}, "1": {"text": "UP", "color": GREEN}}}]})
    d.panel("stat", "Since last heartbeat", "Age of the newest heartbeat that came back; /readyz fails past "
            "interval + timeout + 5 s.",
            [(f"max(time() - {series('listener_last_heartbeat_timestamp_seconds')})", "heartbeat"),
             (f"max(time() - {series('pg_notification_queue_sampled_timestamp_seconds')})", "queue sample")],
            x=4, w=4, h=4,
            unit="s", thresholds=steps((GREEN, None), (YELLOW, 20), (RED, 60)))
    d.panel("stat", "Clients", "Connected websocket clients, all selected relays.",
            [(f"sum({series('clients')})", "")], x=8, w=4, h=4, thresholds=steps((GREEN, None)))
    d.panel("stat", "NOTIFY queue usage", "pg_notification_queue_usage() sampled on each heartbeat. Writers' "
            "commits fail at 100%.", [(f"max({series('pg_notification_queue_usage')})", "")], x=12, w=4, h=4,
            unit="percentunit", min_=0, max_=1, thresholds=steps((GREEN, None), (YELLOW, 0.5), (RED, 0.8)))
    d.panel("stat", "Delivery p99", "99th percentile, over the last 5 minutes and one sample per batch, "
            "from the receipt of a batch's oldest notification to its frames being written.",
            [(quantile(0.99, "delivery_latency_seconds", window="5m"), "")],
            x=16, w=4, h=4, unit="s", thresholds=steps((GREEN, None), (YELLOW, 0.5), (RED, 1)))
    d.panel("stat", "Version", "notifyrelay_build_info: the versions running.",
            [(f"count by (version) ({series('build_info')})", "{{version}}")], x=20, w=4, h=4,
            options={"colorMode": "none", "textMode": "name"})
    d.next_line(4)

    d.row("Flow")
    d.panel("timeseries", "Notifications received", "Per channel, per second, off the LISTEN connection.",
            [(rate("notifications_received_total", "channel"), "{{channel}}")], x=0, unit="ops")
    d.panel("timeseries", "Batches flushed", "Per channel, per second: at most one per window_ms.",
            [(rate("batches_total", "channel"), "{{channel}}")], x=8, unit="ops")
    d.panel("timeseries", "Coalesced share", "Share of notifications folded into a key already pending: the work "
            "coalescing saves.",
            [(f"{rate('notifications_coalesced_total', 'channel')} / {rate('notifications_received_total', 'channel')}",
              "{{channel}}")], x=16, unit="percentunit", min_=0, max_=1)
    d.next_line()
    d.panel("timeseries", "Frames sent", "Frames written to clients per second, by type and transport.",
            [(rate("messages_sent_total", "type, transport"), "{{type}} {{transport}}")], x=0, unit="ops")
    d.panel("timeseries", "Bytes sent", "Bytes of frames written to clients per second, by frame type.",
            [(rate("bytes_sent_total", "type"), "{{type}}")], x=8, unit="Bps")
    d.panel("timeseries", "Dropped or overflowed", "Notifications without a usable key (bad payloads) and ingest "
            "overflows (each one sends subscribers a resync).",
            [(rate("bad_payloads_total", "channel"), "bad payload {{channel}}"),
             (rate("ingest_overflows_total", "channel", fn="increase"), "overflow {{channel}}"),
             (rate("listener_undecodable_payloads_total", "channel"), "not UTF-8 {{channel}}")], x=16)
    d.next_line()

    d.row("Latency")
    d.panel("timeseries", "Delivery latency", "From the receipt of a batch's oldest notification to the batch's "
            "frames being written (one sample per batch), the coalescing window included. Alert "
            "NotifyRelayDeliveryLatencyHigh at p99 > 1 s.",
            [(quantile(q, "delivery_latency_seconds"), f"p{round(q * 100)}") for q in (0.5, 0.9, 0.99)],
            x=0, unit="s")
    d.panel("timeseries", "Commit to delivery (p99)", "Per channel with commit_time_field: from the commit "
            "timestamp in the payload to the frame written. Includes clock skew between database and relay hosts.",
            [(quantile(0.99, "commit_to_delivery_seconds", "channel"), "{{channel}}")], x=8, unit="s")
    d.panel("timeseries", "Heartbeat round trip (p99)", "The listener's self-NOTIFY round trip: the database's own "
            "notify latency.", [(quantile(0.99, "heartbeat_seconds", "instance"), "{{instance}}")], x=16, unit="s")
    d.next_line()

    d.row("Listener and database")
    d.panel("timeseries", "Listener up", "Per relay, 1 while listening.",
            [(series("listener_up"), "{{instance}}")], x=0, min_=0, max_=1,
            defaults={"custom": {"drawStyle": "line", "lineInterpolation": "stepAfter", "fillOpacity": 10,
                                 "showPoints": "never"}})
    d.panel("timeseries", "Reconnects and connect failures", "Lost LISTEN connections and failed attempts to "
            "connect, per interval. Alert NotifyRelayReconnectStorm at 3 losses in 15 minutes.",
            [(rate("listener_reconnects_total", "instance", fn="increase"), "reconnects {{instance}}"),
             (rate("listener_connect_failures_total", "instance", fn="increase"), "connect failures {{instance}}"),
             (rate("listener_connect_attempts_total", "instance", fn="increase"), "connect attempts {{instance}}"),
             (rate("listener_unexpected_errors_total", "instance", fn="increase"), "unexpected errors {{instance}}")],
            x=8)
    d.panel("timeseries", "Listener gaps", "Average length of the gaps (last proof of listening to LISTEN in force "
            "again) that ended in each interval; clients were resynced for each.",
            [(f"{rate('listener_gap_seconds_sum', 'instance', fn='increase')} / "
              f"{rate('listener_gap_seconds_count', 'instance', fn='increase')}", "{{instance}}")], x=16, unit="s")
    d.next_line()
    d.panel("timeseries", "PostgreSQL NOTIFY queue usage", "pg_notification_queue_usage(): a lagging listener "
            "anywhere fills it, and commits that NOTIFY fail when it is full. Alerts at 50% (5 min) and 80% (1 min).",
            [(f"max by (instance) ({series('pg_notification_queue_usage')})", "{{instance}}")], x=0, w=12,
            unit="percentunit", min_=0, thresholds=steps((GREEN, None), (YELLOW, 0.5), (RED, 0.8)))
    d.panel("timeseries", "Ingest queue depth", "Notifications received but not yet coalesced; near "
            "listener.queue_size means overflow and resyncs.",
            [(series("ingest_queue_depth"), "{{instance}}")], x=12, w=12)
    d.next_line()

    d.row("Live state and resume")
    d.panel("timeseries", "State queries", "Per channel and outcome, per second: at most one per channel per "
            "window whatever the number of clients, none while nothing changes. Rows left out reach no client.",
            [(rate("state_queries_total", "channel, outcome"), "{{channel}} {{outcome}}"),
             (rate("state_rows_dropped_total", "channel, reason"), "dropped {{channel}} {{reason}}")],
            x=0, unit="ops")
    d.panel("timeseries", "State query latency (p99)", "Per channel, pool wait included; past timeout_ms a batch "
            "goes out keys-only with state_error.",
            [(quantile(0.99, "state_query_seconds", "channel"), "{{channel}}")], x=8, unit="s")
    d.panel("timeseries", "Snapshots, resumes, stalls", "Snapshots sent per channel; resumes by outcome (replayed, "
            "snapshot, resync); keys remembered for resume; active keys that are stalled.",
            [(rate("snapshots_total", "channel"), "snapshots {{channel}}"),
             (rate("resumes_total", "outcome"), "resume {{outcome}}"),
             (f"sum by (channel) ({series('history_keys')})", "history {{channel}}"),
             (f"sum by (channel) ({series('stalled_keys')})", "stalled {{channel}}")], x=16)
    d.next_line()

    d.row("Clients")
    d.panel("timeseries", "Clients and subscriptions", "Connected clients by transport, relay processes (workers), "
            "and subscriptions (a key or *) per channel.",
            [(f"sum by (transport) ({series('clients')})", "clients {{transport}}"),
             (f"sum({series('workers')})", "workers"),
             (f"sum({series('handshakes')})", "in handshake"),
                         (f"sum by (channel) ({series('subscriptions')})", "subscriptions {{channel}}")], x=0)
    d.panel("timeseries", "Connections opened and closed", "Per second; closes by close code (1000 normal, 1001 "
            "going away, 1006 abnormal, 1008 policy, 4000 too slow ...).",
            [(rate("connections_opened_total"), "opened"),
             (rate("connections_closed_total", "code"), "closed {{code}}")],
            x=8, unit="ops")
    d.panel("timeseries", "Refusals and client errors", "Upgrade requests refused (origin, capacity, auth) and "
            "error frames sent, by code.",
            [(rate("handshake_rejections_total", "reason"), "refused {{reason}}"),
             (rate("client_errors_total", "code"), "error {{code}}")], x=16, unit="ops")
    d.next_line()
    d.panel("timeseries", "Limits and authentication", "Refusals by limit (server.max_connections, "
            "max_subscriptions, max_message_bytes, max_key_bytes, the rate limit, handshake and keepalive timeouts, "
            "max_total_subscriptions, max_handshakes), token expirations, 401s by reason, and failed accepts "
            "(EMFILE: out of file descriptors).",
            [(rate(f"{name}_total"), name.replace("_", " ")) for name in LIMIT_COUNTERS]
            + [(rate("auth_failures_total", "reason"), "401 {{reason}}"),
               (rate("accept_errors_total", "errno"), "accept failed {{errno}}")], x=0, w=12, unit="ops")
    d.panel("timeseries", "Slow clients", "Clients whose write buffer passed its high-water mark (they get one "
            "catch-up frame), and those closed for staying stalled past stall_timeout_s.",
            [(rate("slow_clients_total", fn="increase"), "stalled"),
             (rate("slow_client_disconnects_total", fn="increase"), "disconnected")], x=12, w=12)
    d.next_line()
    d.panel("timeseries", "Process", "Resident memory and CPU of each relay process.",
            [(f"process_resident_memory_bytes{{{SELECTOR}}}", "memory {{instance}}"),
             (f"rate(process_cpu_seconds_total{{{SELECTOR}}}[$__rate_interval])", "cpu {{instance}}")],
            x=0, w=24, unit="bytes",
            overrides=[{"matcher": {"id": "byRegexp", "options": "cpu.*"}, "properties": [
                {"id": "unit", "value": "percentunit"}, {"id": "custom.axisPlacement", "value": "right"}]}])

    def variable(name: str, label: str, query: str) -> dict[str, Any]:
        return {"name": name, "label": label, "type": "query", "datasource": DATASOURCE,
                "query": {"query": query, "refId": name}, "definition": query, "includeAll": True, "multi": True,
                "allValue": ".*", "current": {}, "refresh": 2, "sort": 1, "options": []}

    return {
        "annotations": {"list": [{"builtIn": 1, "datasource": {"type": "grafana", "uid": "-- Grafana --"},
                                  "enable": True, "hide": True, "iconColor": "rgba(0, 211, 255, 1)",
                                  "name": "Annotations & Alerts", "type": "dashboard"}]},
        "description": "notifyrelay: PostgreSQL LISTEN/NOTIFY relayed to websocket clients. Metrics are documented "
                       "in docs/observability.md; alerts live in deploy/prometheus/alerts.yml.",
        "editable": True,
        "graphTooltip": 1,
        "links": [],
        "panels": d.panels,
        "refresh": "30s",
        "schemaVersion": 39,
        "tags": ["notifyrelay", "postgresql", "websocket"],
        "templating": {"list": [
            {"name": "datasource", "label": "Data source", "type": "datasource", "query": "prometheus",
             "current": {}, "hide": 0, "refresh": 1, "options": []},
            variable("job", "Job", "label_values(notifyrelay_build_info, job)"),
            variable("instance", "Instance", 'label_values(notifyrelay_build_info{job=~"$job"}, instance)'),
        ]},
        "time": {"from": "now-3h", "to": "now"},
        "timepicker": {},
        "timezone": "",
        "title": "notifyrelay",
        "uid": "notifyrelay",
        "version": 1,
    }


if __name__ == "__main__":
    Path(__file__).with_name("notifyrelay.json").write_text(json.dumps(build(), indent=2) + "\n")
