"""Probes and metrics through a database outage, the [admin] address, the commit-to-delivery histogram, promtool.

Everything is real: PostgreSQL (stopped and started for the outage), the relay on port 0, websocket clients, HTTP
requests with urllib, and the promtool binary (Debian's ``prometheus`` package) when it is installed.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client.parser import text_string_to_metric_families

from notifyrelay.app import Relay
from tests.conftest import ClientFactory, Database, RelayFactory, sample, wait_until

CHANNEL = "activity_progress"
ROOT = Path(__file__).resolve().parents[2]
ALERTS = ROOT / "deploy" / "prometheus" / "alerts.yml"
ALERT_TESTS = ROOT / "deploy" / "prometheus" / "alerts.test.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "notifyrelay.json"
PROMTOOL = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(
    PROMTOOL is None,
    reason="promtool is not installed (Debian/Ubuntu: apt-get install -y --no-install-recommends prometheus)",
)


def http_get(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as response:
            return response.status, response.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def get(port: int, path: str) -> tuple[int, str]:
    """GET http://127.0.0.1:PORT/PATH with a real HTTP client (in a thread, urllib being blocking)."""
    return await asyncio.to_thread(http_get, f"http://127.0.0.1:{port}{path}")


async def readyz(port: int) -> tuple[int, dict[str, Any]]:
    status, body = await get(port, "/readyz")
    report: dict[str, Any] = json.loads(body)
    return status, report


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    """/metrics parsed by prometheus_client's own text parser: (sample name, labels) -> value."""
    status, body = await get(port, "/metrics")
    assert status == 200
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    if name == "clients" and not labels:  # clients are counted per transport
        return sum(v for (metric, _), v in samples.items() if metric == "notifyrelay_clients")
    return samples[(f"notifyrelay_{name}", frozenset(labels.items()))]


async def test_probes_and_metrics_follow_the_listener_through_a_database_outage(
    make_relay: RelayFactory, make_client: ClientFactory, own_database: Database
) -> None:
    """start -> ready -> database stopped -> not ready -> database started -> ready, asserting probes and metrics."""
    server = own_database.server
    assert server is not None
    relay = await make_relay(dsn=own_database.dsn, wait_ready=False, **{"listener.heartbeat_interval_s": 0.5})
    port = relay.server.port

    # Started: alive at once, and ready once the listener is up and its first heartbeat came back.
    assert await get(port, "/healthz") == (200, "ok\n")
    await wait_until(lambda: relay.listener.last_heartbeat is not None, timeout=10)
    status, report = await readyz(port)
    assert status == 200
    assert report["ready"] is True and report["reasons"] == [] and report["listener"] == "up"
    assert report["channels"] == [CHANNEL]
    assert abs(datetime.fromisoformat(report["last_heartbeat"]).timestamp() - time.time()) < 5
    client = await make_client(relay, f"?channel={CHANNEL}")
    assert (await client.recv())["type"] == "ack"
    await own_database.notify(CHANNEL, "1", "2")
    delivered: list[str] = []
    while len(delivered) < 2:  # a leading-edge batch, then the rest of the window
        delivered += (await client.recv_type("notify"))["keys"]
    assert delivered == ["1", "2"]
    await wait_until(lambda: sample(relay.metrics, "notifyrelay_notifications_received_total", channel=CHANNEL) == 2)
    samples = await scrape(port)
    assert value(samples, "listener_up") == 1
    assert value(samples, "listener_reconnects_total") == 0
    assert value(samples, "listener_connect_failures_total") == 0
    assert value(samples, "listener_gap_seconds_count") == 0
    assert time.time() - value(samples, "listener_last_heartbeat_timestamp_seconds") < 5
    assert value(samples, "pg_notification_queue_usage") == 0
    assert value(samples, "clients") == 1
    assert value(samples, "subscriptions", channel=CHANNEL) == 1
    assert value(samples, "notifications_received_total", channel=CHANNEL) == 2
    assert value(samples, "batches_total", channel=CHANNEL) >= 1
    assert value(samples, "messages_sent_total", type="notify", transport="websocket") >= 1
    assert value(samples, "delivery_latency_seconds_count") >= 1
    assert value(samples, "ingest_queue_depth") == 0
    assert value(samples, "build_info", version=relay_version()) == 1

    # Database stopped: still alive, not ready (the reason names the listener), and the metrics say so.
    await asyncio.to_thread(server.stop, "fast")
    stopped_at = time.monotonic()
    assert await client.recv_type("status") == {"type": "status", "listener": "down"}
    assert await get(port, "/healthz") == (200, "ok\n")
    status, report = await readyz(port)
    assert status == 503
    assert report["ready"] is False and report["listener"] == "down"
    assert len(report["reasons"]) == 1 and report["reasons"][0].startswith("listener down: ")
    await wait_until(lambda: sample(relay.metrics, "notifyrelay_listener_connect_failures_total") >= 1, timeout=10)
    status, report = await readyz(port)
    assert status == 503 and "cannot connect and LISTEN" in report["reasons"][0]
    samples = await scrape(port)
    assert value(samples, "listener_up") == 0
    assert value(samples, "listener_reconnects_total") == 1
    assert value(samples, "listener_connect_failures_total") >= 1
    assert value(samples, "messages_sent_total", type="status", transport="websocket") == 1
    assert value(samples, "clients") == 1  # clients stay connected and are told; they poll meanwhile

    # Database started again: ready again, one gap measured, clients resynced, delivery resumed.
    await asyncio.to_thread(server.start)
    assert (await client.recv_type("resync", timeout=15))["reason"] == "listener_reconnected"
    assert await client.recv() == {"type": "status", "listener": "up"}
    downtime = time.monotonic() - stopped_at
    heartbeat_before = relay.listener.last_heartbeat or 0.0
    await wait_until(lambda: (relay.listener.last_heartbeat or 0.0) > heartbeat_before, timeout=10)
    status, report = await readyz(port)
    assert status == 200 and report["ready"] is True and report["listener"] == "up"
    await own_database.notify(CHANNEL, "3")
    assert (await client.recv_type("notify"))["keys"] == ["3"]
    await wait_until(lambda: sample(relay.metrics, "notifyrelay_notifications_received_total", channel=CHANNEL) == 3)
    samples = await scrape(port)
    assert value(samples, "listener_up") == 1
    assert value(samples, "listener_reconnects_total") == 1
    assert value(samples, "listener_gap_seconds_count") == 1
    assert 0 < value(samples, "listener_gap_seconds_sum") <= downtime + 2
    assert value(samples, "messages_sent_total", type="resync", transport="websocket") == 1
    assert value(samples, "messages_sent_total", type="status", transport="websocket") == 2
    assert value(samples, "notifications_received_total", channel=CHANNEL) == 3
    assert time.time() - value(samples, "listener_last_heartbeat_timestamp_seconds") < 5


def relay_version() -> str:
    from notifyrelay import __version__

    return __version__


async def test_probes_are_served_only_on_the_admin_address_when_set(
    make_relay: RelayFactory, make_client: ClientFactory
) -> None:
    """With [admin] listen set, /healthz /readyz /metrics answer there and are 404 on the websocket port."""
    relay = await make_relay(**{"admin.listen": "127.0.0.1:0"})
    admin_port = relay.server.admin_port
    assert admin_port is not None and admin_port != relay.server.port
    await make_client(relay)  # the websocket port still serves /ws
    for path in ("/healthz", "/readyz", "/metrics"):
        assert (await get(relay.server.port, path))[0] == 404, path
    assert await get(admin_port, "/healthz") == (200, "ok\n")
    await wait_until(lambda: relay.listener.last_heartbeat is not None, timeout=10)
    status, report = await readyz(admin_port)
    assert status == 200 and report["ready"] is True
    assert value(await scrape(admin_port), "clients") == 1
    assert (await get(admin_port, "/ws"))[0] == 404
    assert (await get(admin_port, "/nope"))[0] == 404


async def test_commit_to_delivery_is_observed_for_a_configured_commit_time_field(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """A JSON payload carrying the channel's commit_time_field feeds the per-channel commit-to-delivery histogram."""
    relay = await make_relay(channels=[
        {"name": "orders_obs", "key": "json:id", "commit_time_field": "committed_at"},
        {"name": CHANNEL},
    ])
    client = await make_client(relay, "?channel=orders_obs")
    assert (await client.recv())["type"] == "ack"
    conn = await asyncpg.connect(database.dsn)
    try:
        # The shapes a trigger produces: a timestamptz in JSON (ISO 8601) and epoch seconds.
        await conn.execute(
            "SELECT pg_notify('orders_obs', json_build_object('id', 7, 'committed_at', clock_timestamp())::text)"
        )
        assert (await client.recv_type("notify"))["keys"] == ["7"]
        await conn.execute(
            "SELECT pg_notify('orders_obs', json_build_object('id', 8, "
            "'committed_at', extract(epoch from clock_timestamp()))::text)"
        )
        assert (await client.recv_type("notify"))["keys"] == ["8"]
        await conn.execute("SELECT pg_notify('orders_obs', '{\"id\": 9}')")  # no commit time: not observed
        assert (await client.recv_type("notify"))["keys"] == ["9"]
    finally:
        await conn.close()
    samples = await scrape(relay.server.port)
    assert value(samples, "commit_to_delivery_seconds_count", channel="orders_obs") == 2
    assert 0 <= value(samples, "commit_to_delivery_seconds_sum", channel="orders_obs") < 5
    assert ("notifyrelay_commit_to_delivery_seconds_count", frozenset({("channel", CHANNEL)})) not in samples


async def busy_exposition(relay: Relay, make_client: ClientFactory, database: Database) -> str:
    """/metrics after some traffic, so that the labelled families have samples too."""
    client = await make_client(relay, f"?channel={CHANNEL}")
    await client.recv()
    await client.send("not json")
    assert (await client.recv())["code"] == "bad_json"
    await database.notify(CHANNEL, "1", "1", "2")
    await client.recv_type("notify")
    await client.connection.close()
    await wait_until(lambda: not relay.hub.transports)
    status, body = await get(relay.server.port, "/metrics")
    assert status == 200
    return body


@needs_promtool
async def test_live_metrics_pass_promtool_check_metrics(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """promtool check metrics finds nothing to lint in a live /metrics page."""
    assert PROMTOOL is not None
    body = await busy_exposition(await make_relay(), make_client, database)
    result = subprocess.run([PROMTOOL, "check", "metrics"], input=body, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0 and result.stdout + result.stderr == "", result.stdout + result.stderr


@needs_promtool
def test_alert_rules_pass_promtool_check_and_unit_tests() -> None:
    """deploy/prometheus/alerts.yml is valid, and its promtool unit tests (alerts.test.yml) pass."""
    assert PROMTOOL is not None
    check = subprocess.run([PROMTOOL, "check", "rules", str(ALERTS)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
    assert "SUCCESS" in check.stdout
    tests = subprocess.run(
        [PROMTOOL, "test", "rules", ALERT_TESTS.name], cwd=ALERT_TESTS.parent, capture_output=True, text=True,
        timeout=30,
    )
    assert tests.returncode == 0, tests.stdout + tests.stderr


def dashboard_queries() -> list[str]:
    """Every PromQL expression of the Grafana dashboard, with Grafana's variables replaced by plain values."""
    dashboard = json.loads(DASHBOARD.read_text())
    exprs = [target["expr"] for panel in dashboard["panels"] for target in panel.get("targets", [])]
    exprs += [v["query"]["query"] for v in dashboard["templating"]["list"] if v["type"] == "query"]
    plain = []
    for expr in exprs:
        expr = expr.replace("$__rate_interval", "5m").replace("$__interval", "1m").replace("$__range", "1h")
        expr = re.sub(r"\$\{?(\w+)(:\w+)?\}?", "x", expr)
        if expr.startswith("label_values("):  # a Grafana function: check the metric inside it
            expr = expr.removeprefix("label_values(").rsplit(",", 1)[0]
        plain.append(expr)
    return plain


def metric_names(text: str) -> set[str]:
    return {re.sub(r"_(bucket|sum|count)$", "", name) for name in re.findall(r"\bnotifyrelay_\w+", text)}


async def test_dashboard_and_alerts_use_only_exported_metrics(
    make_relay: RelayFactory, make_client: ClientFactory, database: Database
) -> None:
    """The dashboard and the alerts query only metrics the relay exports, and the dashboard shows every one."""
    body = await busy_exposition(await make_relay(), make_client, database)
    # The parser names counter families without _total: compare names without it.
    families = text_string_to_metric_families(body)
    exported = {family.name for family in families if family.name.startswith("notifyrelay_")}
    on_dashboard = {name.removesuffix("_total") for name in metric_names("\n".join(dashboard_queries()))}
    in_alerts = {name.removesuffix("_total") for name in metric_names(ALERTS.read_text())}
    assert in_alerts and in_alerts <= exported, in_alerts - exported
    assert on_dashboard == exported, (on_dashboard - exported, exported - on_dashboard)
    panels = json.loads(DASHBOARD.read_text())["panels"]
    assert len({panel["id"] for panel in panels}) == len(panels)


def test_dashboard_json_is_what_its_generator_writes() -> None:
    """deploy/grafana/notifyrelay.json was regenerated after the last edit of deploy/grafana/dashboard.py."""
    spec = importlib.util.spec_from_file_location("dashboard", DASHBOARD.with_name("dashboard.py"))
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert json.loads(DASHBOARD.read_text()) == module.build(), "run: python deploy/grafana/dashboard.py"


@needs_promtool
def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    """promtool parses every dashboard query (checked as recording rules, its PromQL parser being the real one)."""
    assert PROMTOOL is not None
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{index}", "expr": expr} for index, expr in enumerate(dashboard_queries())
    ]}]}
    path = tmp_path / "dashboard_rules.yml"
    path.write_text(json.dumps(rules))  # JSON is YAML
    check = subprocess.run([PROMTOOL, "check", "rules", str(path)], capture_output=True, text=True, timeout=30)
    assert check.returncode == 0, check.stdout + check.stderr
