"""Scenario 1, latency: from COMMIT returning in the generator to the notify frame arriving at a client.

(a) idle: lone notifications, each after more than one window of silence (so the leading edge flushes at once),
    to a few ``*`` followers. Target: p50 <= 5 ms, p99 <= 20 ms.
(b) busy: 2,000 notifications/s over 500 keys, 1,000 clients each following one key (two followers per key).
    Target: p99 <= window_ms + 30 ms.

A notification counts as delivered to a follower by the first frame that carries its key with a payload ``n`` at
least its own (the channel uses ``key = "json:k"`` with ``include_payload``, and each key's notifications come from
one generator connection, so ``n`` grows with commit order per key).
"""

from __future__ import annotations

import argparse
import bisect
import time
from collections import defaultdict
from typing import Any

import benchlib as bl

CHANNEL = "bench_latency"


def join(records: list[tuple[str, int, float, float]], per_conn: dict[int, list[tuple[float, dict[str, Any]]]],
         followers: dict[str, list[int]]) -> tuple[list[float], list[float], int]:
    """Latencies (from commit, from send) of every (notification, follower) pair, and the pairs never delivered."""
    # (connection, key) -> arrivals and payload n, in arrival order
    seen: dict[tuple[int, str], tuple[list[int], list[float]]] = {}
    for index, frames in per_conn.items():
        for arrival, payloads in frames:
            for key, n in payloads.items():
                ns, ts = seen.setdefault((index, key), ([], []))
                # n can only grow per key and connection; keep the running max so bisect stays valid
                ns.append(max(n, ns[-1]) if ns else n)
                ts.append(arrival)
    from_commit: list[float] = []
    from_send: list[float] = []
    missing = 0
    for key, n, sent_at, committed_at in records:
        for index in followers.get(key, ()):
            ns, ts = seen.get((index, key), ([], []))
            position = bisect.bisect_left(ns, n)
            if position == len(ns):
                missing += 1
                continue
            from_commit.append(ts[position] - committed_at)
            from_send.append(ts[position] - sent_at)
    return from_commit, from_send, missing


def join_busy(records: list[tuple[str, int, float, float]], answers: list[dict[str, Any]], clients: int,
              keys: list[str]) -> tuple[list[float], list[float], int]:
    """``join`` for the busy phase: client i follows ``keys[i % len(keys)]`` and was given to client process
    ``i % len(answers)`` (round robin in connect_clients); map each process's connection index back to i."""
    per_conn: dict[int, list[tuple[float, dict[str, Any]]]] = {}
    for w, got in enumerate(answers):
        for index, frames in got["per_conn"].items():
            per_conn[index * len(answers) + w] = frames
    followers = defaultdict(list)
    for i in range(clients):
        followers[keys[i % len(keys)]].append(i)
    return join(records, per_conn, followers)


def add_load_arguments(parser: argparse.ArgumentParser) -> None:
    """The idle and busy phases' flags, shared with bench/state.py."""
    parser.add_argument("--idle-samples", type=int, default=120)
    parser.add_argument("--idle-clients", type=int, default=5)
    parser.add_argument("--busy-seconds", type=float, default=15)
    parser.add_argument("--rate", type=int, default=2000)
    parser.add_argument("--keys", type=int, default=500)
    parser.add_argument("--clients", type=int, default=1000)


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    window_ms = 200
    idle_count = 40 if args.quick else args.idle_samples
    busy_s = 8.0 if args.quick else args.busy_seconds
    result["config"] = {"window_ms": window_ms, "idle_notifications": idle_count, "idle_followers": args.idle_clients,
                        "busy_rate_per_s": args.rate, "busy_keys": args.keys, "busy_clients": args.clients,
                        "busy_seconds": busy_s, "generator_connections": 4}
    figures: dict[str, Any] = {}
    result["figures"] = figures
    channel = {"name": CHANNEL, "key": "json:k", "include_payload": True}
    with bl.Stack("latency", [channel], window_ms=window_ms) as stack:
        result["relay_pid"] = stack.relay.pid if stack.relay else None
        generators = bl.start_generators(1, stack.dsn, connections=4, lifetime_s=300)
        with bl.workers_stopped(generators):
            # (a) idle: a few "*" followers, one lone notification every 250-300 ms.
            idle_clients = bl.start_clients(1, "payload", lifetime_s=300, name="idle-clients")
            with bl.workers_stopped(idle_clients):
                bl.connect_clients(idle_clients, [stack.ws_url(CHANNEL)] * args.idle_clients)
                answer = generators[0].call(
                    "lone", {"channel": CHANNEL, "count": idle_count, "interval": 0.25, "jitter": 0.05, "json": True,
                             "prefix": "idle", "seed": 1},
                    timeout=idle_count * 0.3 + 60,
                )
                time.sleep(0.5)
                got = idle_clients[0].call("collect")
            followers = {key: list(range(args.idle_clients)) for key, *_ in answer["records"]}
            from_commit, from_send, missing = join(answer["records"], got["per_conn"], followers)
            idle = bl.summary_ms(from_commit)
            result["idle"] = {"commit_to_client_ms": idle, "send_to_client_ms": bl.summary_ms(from_send),
                              "undelivered": missing}
            figures["idle_p50_ms"] = bl.figure(idle.get("p50"), "ms", 5)
            figures["idle_p90_ms"] = bl.figure(idle.get("p90"), "ms")
            figures["idle_p99_ms"] = bl.figure(idle.get("p99"), "ms", 20)
            figures["idle_max_ms"] = bl.figure(idle.get("max"), "ms")
            figures["idle_undelivered"] = bl.figure(missing, "notifications", 0)

            # (b) busy: 1,000 clients, each following one of 500 keys; 2,000 notifications/s.
            keys = [f"k{i}" for i in range(args.keys)]
            urls = [stack.ws_url(CHANNEL, [keys[i % len(keys)]]) for i in range(args.clients)]
            busy_clients = bl.start_clients(2, "payload", lifetime_s=300, name="busy-clients")
            with bl.workers_stopped(busy_clients):
                connected = bl.connect_clients(busy_clients, urls)
                result["busy_connect_seconds"] = connected["seconds"]
                cpu_before, wall_before = stack.cpu_seconds(), time.monotonic()
                profiler = bl.Profiler(args.profile, stack.relay.pid if stack.relay else 0, "latency-busy",
                                       busy_s)
                answer = generators[0].call(
                    "paced", {"channel": CHANNEL, "rate": args.rate, "duration": busy_s, "keys": keys, "json": True,
                              "record": True, "seed": 2},
                    timeout=busy_s * 3 + 60,
                )
                cpu = (stack.cpu_seconds() - cpu_before) / (time.monotonic() - wall_before)
                time.sleep(window_ms / 1000 + 0.5)
                answers = bl.call_all(busy_clients, ("collect",), timeout=60)
                profile = profiler.finish()
            from_commit, from_send, missing = join_busy(answer["records"], answers, args.clients, keys)
            busy = bl.summary_ms(from_commit)
            achieved = answer["sent"] / max(1e-9, answer["ended"] - answer["began"])
            result["busy"] = {"commit_to_client_ms": busy, "send_to_client_ms": bl.summary_ms(from_send),
                              "undelivered": missing, "notifications_sent": answer["sent"],
                              "achieved_rate_per_s": round(achieved), "generator_max_late_ms":
                              round(answer["max_late_s"] * 1000, 1), "relay_cpu_percent": round(cpu * 100, 1)}
            if profile:
                result["profile_busy"] = profile
            figures["busy_rate_per_s"] = bl.figure(round(achieved), "notifications/s", args.rate * 0.95, ">=",
                                                   note="the load actually offered")
            figures["busy_p50_ms"] = bl.figure(busy.get("p50"), "ms")
            figures["busy_p90_ms"] = bl.figure(busy.get("p90"), "ms")
            figures["busy_p99_ms"] = bl.figure(busy.get("p99"), "ms", window_ms + 30)
            figures["busy_max_ms"] = bl.figure(busy.get("max"), "ms")
            figures["busy_undelivered"] = bl.figure(missing, "deliveries", 0)
            figures["busy_relay_cpu"] = bl.figure(round(cpu * 100, 1), "% of one core")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_load_arguments(parser)
    return bl.scenario_main("latency", 420, run, parser)


if __name__ == "__main__":
    raise SystemExit(main())
