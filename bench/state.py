"""Live state: what fetching rows costs the database and the latency, with rows in every frame.

A state channel over a real table: every UPDATE commits, its trigger NOTIFYs ``{"k": key, "n": n}``, and the relay
fetches the batch's rows with one query before sending. Frames carry ``rows`` (and the payload, which is how a
delivery is matched to its update: the row it carries is at least as new).

(a) idle: lone updates, each after more than one window of silence, to a few followers: commit to client with rows.
    Target: p99 under 5 ms.
(b) busy: 1,000 clients following 500 keys (two per key), 2,000 updates/s: commit to client p99 (target: window +
    30 ms), and state queries per second (target: at most one per channel per window, whatever the number of
    clients).
(c) quiet: the same clients connected while nothing changes: state queries (target: none).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import benchlib as bl
from latency import add_load_arguments, join, join_busy

CHANNEL = "bench_state"
UPDATE = ("UPDATE bench_state SET n = ($2::jsonb->>'n')::bigint "
          "WHERE k = ($2::jsonb->>'k') AND $1::text IS NOT NULL")


def setup_sql(keys: list[str]) -> str:
    values = ", ".join(f"('{key}')" for key in keys)
    return f"""
        CREATE TABLE bench_state (k text PRIMARY KEY, n bigint NOT NULL DEFAULT -1);
        INSERT INTO bench_state (k) VALUES {values};
        CREATE FUNCTION bench_state_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('{CHANNEL}', json_build_object('k', NEW.k, 'n', NEW.n)::text);
            RETURN NULL;
        END $$;
        CREATE TRIGGER bench_state_notify AFTER UPDATE ON bench_state FOR EACH ROW
            WHEN (OLD.n IS DISTINCT FROM NEW.n) EXECUTE FUNCTION bench_state_notify();
    """


def state_queries(stack: bl.Stack) -> float:
    return sum(value for name, value in stack.metrics().items()
               if name.startswith("notifyrelay_state_queries_total{") and f'channel="{CHANNEL}"' in name)


def query_seconds(stack: bl.Stack) -> tuple[float, float]:
    """state_query_seconds' sum and count for the channel (the mean time one batch waits for its rows)."""
    values = stack.metrics()
    label = f'{{channel="{CHANNEL}"}}'
    return (values.get(f"notifyrelay_state_query_seconds_sum{label}", 0.0),
            values.get(f"notifyrelay_state_query_seconds_count{label}", 0.0))


def batches(stack: bl.Stack) -> float:
    return stack.metrics().get(f'notifyrelay_batches_total{{channel="{CHANNEL}"}}', 0.0)


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    window_ms = 200
    idle_count = 40 if args.quick else args.idle_samples
    busy_s = 8.0 if args.quick else args.busy_seconds
    quiet_s = 3.0
    busy_keys = [f"k{i}" for i in range(args.keys)]
    idle_keys = [f"idle-{n}" for n in range(idle_count)]
    result["config"] = {"window_ms": window_ms, "idle_updates": idle_count, "idle_followers": args.idle_clients,
                        "busy_rate_per_s": args.rate, "busy_keys": args.keys, "busy_clients": args.clients,
                        "busy_seconds": busy_s, "quiet_seconds": quiet_s,
                        "generator_connections": args.generator_connections}
    figures: dict[str, Any] = {}
    result["figures"] = figures
    channel: dict[str, Any] = {"name": CHANNEL, "key": "json:k", "include_payload": True}
    if not args.without_state:  # --without-state: the same updates and trigger, keys only (the control run)
        channel["state"] = {"table": "bench_state", "key_column": "k", "columns": ["n"]}
    with bl.Stack("state", [channel], window_ms=window_ms, setup_sql=setup_sql(busy_keys + idle_keys)) as stack:
        result["relay_pid"] = stack.relay.pid if stack.relay else None
        # UPDATEs that fire a trigger cost more than a bare pg_notify: more connections keep 2,000/s offered.
        generators = bl.start_generators(1, stack.dsn, connections=args.generator_connections, lifetime_s=300)
        with bl.workers_stopped(generators):
            # (a) idle: a few followers of the lone keys, one lone update every 250-300 ms.
            idle_clients = bl.start_clients(1, "payload", lifetime_s=300, name="idle-clients")
            with bl.workers_stopped(idle_clients):
                bl.connect_clients(idle_clients, [stack.ws_url(CHANNEL, idle_keys)] * args.idle_clients)
                answer = generators[0].call(
                    "lone", {"channel": CHANNEL, "count": idle_count, "interval": 0.25, "jitter": 0.05, "json": True,
                             "prefix": "idle", "seed": 1, "sql": UPDATE},
                    timeout=idle_count * 0.3 + 60,
                )
                time.sleep(0.5)
                got = idle_clients[0].call("collect")
            followers = {key: list(range(args.idle_clients)) for key, *_ in answer["records"]}
            from_commit, _, missing = join(answer["records"], got["per_conn"], followers)
            idle = bl.summary_ms(from_commit)
            result["idle"] = {"commit_to_client_ms": idle, "undelivered": missing}
            figures["idle_with_rows_p50_ms"] = bl.figure(idle.get("p50"), "ms")
            figures["idle_with_rows_p99_ms"] = bl.figure(idle.get("p99"), "ms", 5)
            figures["idle_undelivered"] = bl.figure(missing, "updates", 0)

            # (b) busy: 1,000 clients, each following one of 500 keys; 2,000 updates/s.
            urls = [stack.ws_url(CHANNEL, [busy_keys[i % len(busy_keys)]]) for i in range(args.clients)]
            busy_clients = bl.start_clients(2, "payload", lifetime_s=300, name="busy-clients")
            with bl.workers_stopped(busy_clients):
                bl.connect_clients(busy_clients, urls)
                time.sleep(1.0)  # the subscribes' snapshots are done
                # (c) quiet: nothing changes, so nothing is fetched.
                quiet_before = state_queries(stack)
                time.sleep(quiet_s)
                quiet_queries = state_queries(stack) - quiet_before
                queries_before, batches_before = state_queries(stack), batches(stack)
                seconds_before, counted_before = query_seconds(stack)
                cpu_before, wall_before = stack.cpu_seconds(), time.monotonic()
                answer = generators[0].call(
                    "paced", {"channel": CHANNEL, "rate": args.rate, "duration": busy_s, "keys": busy_keys,
                              "json": True, "record": True, "seed": 2, "sql": UPDATE},
                    timeout=busy_s * 3 + 60,
                )
                elapsed = time.monotonic() - wall_before
                cpu = (stack.cpu_seconds() - cpu_before) / elapsed
                time.sleep(window_ms / 1000 + 0.5)
                queries = state_queries(stack) - queries_before
                seconds_after, counted_after = query_seconds(stack)
                mean_query_ms = 1000 * (seconds_after - seconds_before) / max(1.0, counted_after - counted_before)
                flushed = batches(stack) - batches_before
                answers = bl.call_all(busy_clients, ("collect",), timeout=60)
            from_commit, _, missing = join_busy(answer["records"], answers, args.clients, busy_keys)
            busy = bl.summary_ms(from_commit)
            achieved = answer["sent"] / max(1e-9, answer["ended"] - answer["began"])
            windows = elapsed / (window_ms / 1000)
            result["busy"] = {"commit_to_client_ms": busy, "undelivered": missing, "updates_sent": answer["sent"],
                              "achieved_rate_per_s": round(achieved), "state_queries": queries,
                              "batches": flushed, "windows": round(windows, 1),
                              "relay_cpu_percent": round(cpu * 100, 1)}
            figures["busy_rate_per_s"] = bl.figure(round(achieved), "updates/s", args.rate * 0.95, ">=",
                                                   note="the load actually offered")
            figures["busy_with_rows_p50_ms"] = bl.figure(busy.get("p50"), "ms")
            figures["busy_with_rows_p99_ms"] = bl.figure(busy.get("p99"), "ms", window_ms + 30)
            figures["busy_undelivered"] = bl.figure(missing, "deliveries", 0)
            figures["state_queries_per_s"] = bl.figure(round(queries / elapsed, 2), "queries/s",
                                                       1000 / window_ms + 0.5, "<=",
                                                       note=f"one channel, {args.clients} clients")
            figures["state_queries_per_batch"] = bl.figure(round(queries / max(1.0, flushed), 3), "queries", 1.0,
                                                           "<=")
            figures["quiet_state_queries"] = bl.figure(quiet_queries, "queries", 0, "<=",
                                                       note=f"{quiet_s:g} s with every client connected, no change")
            figures["busy_relay_cpu"] = bl.figure(round(cpu * 100, 1), "% of one core")
            figures["busy_mean_state_query_ms"] = bl.figure(round(mean_query_ms, 2), "ms",
                                                            note="pool wait included: what each batch waits for rows")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser)
    parser.add_argument("--generator-connections", type=int, default=16)
    parser.add_argument("--without-state", action="store_true",
                        help="the control run: the same table, trigger and load on a keys-only channel")
    return bl.scenario_main("state", 420, run, parser)


if __name__ == "__main__":
    raise SystemExit(main())
