"""Scenario 4, memory: relay RSS per idle connection, as the slope between 1,000 and 10,000 connections.

Client processes open idle connections in steps (each subscribes to its own key at connect time, then sends and
receives nothing); after each step the relay's RSS (psutil) is sampled once it has settled. The figure is
(RSS at 10,000 - RSS at 1,000) / 9,000; a least-squares slope over every step is reported beside it.
Target: <= 20 KiB per connection.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import benchlib as bl

CHANNEL = "bench_memory"


def settled_rss(stack: bl.Stack, settle_s: float) -> int:
    """The median of a few RSS samples taken after ``settle_s`` of quiet."""
    time.sleep(settle_s)
    samples = []
    for _ in range(5):
        samples.append(stack.rss())
        time.sleep(0.1)
    return int(statistics.median(samples))


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    steps = [int(s) for s in args.steps.split(",")]
    settle = 1.0 if args.quick else args.settle_seconds
    procs = args.client_processes
    result["config"] = {"steps": steps, "settle_seconds": settle, "client_processes": procs,
                        "subscription_per_connection": "one key, at connect time"}
    figures: dict[str, Any] = {}
    result["figures"] = figures
    with bl.Stack("memory", [{"name": CHANNEL}]) as stack:
        clients = bl.start_clients(procs, "seq", lifetime_s=600, name="idle-clients")
        with bl.workers_stopped(clients):
            points = [(0, settled_rss(stack, settle))]
            for target in steps:
                have = points[-1][0]
                urls = [stack.ws_url(CHANNEL, [f"k{i}"]) for i in range(have, target)]
                bl.connect_clients(clients, urls, timeout=300)
                points.append((target, settled_rss(stack, settle)))
                print(f"memory: {target} connections, rss {points[-1][1] / 2**20:.1f} MiB", file=sys.stderr,
                      flush=True)
            metrics = stack.metrics()
    result["rss_mib"] = {str(n): round(rss / 2**20, 2) for n, rss in points}
    (n1, r1), (n2, r2) = points[1], points[-1]
    slope = (r2 - r1) / (n2 - n1) / 1024
    xs = [n for n, _ in points[1:]]
    ys = [r for _, r in points[1:]]
    fit = statistics.linear_regression(xs, ys).slope / 1024 if len(xs) > 1 else slope
    result["relay_clients_gauge"] = bl.counter(metrics, "notifyrelay_clients")
    figures["rss_per_connection_kib"] = bl.figure(round(slope, 2), "KiB", 20,
                                                  note=f"(RSS at {n2} - RSS at {n1}) / {n2 - n1}")
    figures["rss_per_connection_fit_kib"] = bl.figure(round(fit, 2), "KiB", note="least squares over the steps")
    figures["rss_at_0_mib"] = bl.figure(round(points[0][1] / 2**20, 1), "MiB")
    figures["rss_at_max_mib"] = bl.figure(round(r2 / 2**20, 1), "MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="1000,2500,5000,7500,10000", help="connection counts (first to last)")
    parser.add_argument("--settle-seconds", type=float, default=2.0)
    parser.add_argument("--client-processes", type=int, default=4)
    return bl.scenario_main("memory", 420, run, parser)


if __name__ == "__main__":
    raise SystemExit(main())
