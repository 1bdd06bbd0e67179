"""Scenario 4, memory: relay RSS per idle connection, as the slope between 1,000 and 10,000 connections.

Client processes open idle connections in steps (each subscribes to its own key at connect time, then sends and
receives nothing); after each step the relay's RSS (psutil) is sampled once it has settled. The figure is
(RSS at 10,000 - RSS at 1,000) / 9,000; a least-squares slope over every step is reported beside it.
Target: <= 12 KiB per connection (issue 13; aim 10).

With ``--breakdown`` (a separate run: tracemalloc inflates RSS) the relay starts tracemalloc at the first step
(bench/memtrace/sitecustomize.py) and, at the last, writes the allocations made since and still live, grouped by
traceback; per connection added, they are attributed to the first frame (innermost outward) that belongs to a
known part: the asyncio transport and socket, asyncio timers, h11, websockets' ServerProtocol (its parser
generator and buffers included), the relay's HttpConnection, WebSocketTransport, Session and hub. What RSS grows
by beyond the traced total is the allocator's own overhead and fragmentation.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import sys
import time
from typing import Any

import benchlib as bl

CHANNEL = "bench_memory"
MEMTRACE = bl.BENCH_DIR / "memtrace"
# Room for 10,000 clients within a 20,000 RLIMIT_NOFILE (max_connections + max_handshakes + 66 must fit it).
SERVER = {"max_connections": 12000}
# Innermost frame first: the first rule whose path fragment is in a frame's file names the allocation's part.
PARTS = (
    ("/h11/", "h11 Connection (HTTP/1.1 parser)"),
    ("/websockets/", "websockets ServerProtocol (parser generator, buffers)"),
    ("asyncio/events.py", "asyncio timers (TimerHandle, loop heap)"),
    ("asyncio/base_events.py", "asyncio timers (TimerHandle, loop heap)"),
    ("asyncio/selector_events.py", "asyncio transport, socket, selector"),
    ("asyncio/transports.py", "asyncio transport, socket, selector"),
    ("/selectors.py", "asyncio transport, socket, selector"),
    ("/socket.py", "asyncio transport, socket, selector"),
    ("notifyrelay/transports/http.py", "HttpConnection"),
    ("notifyrelay/transports/websocket.py", "WebSocketTransport"),
    ("notifyrelay/transports/capacity.py", "handshake bookkeeping (capacity.py)"),
    ("notifyrelay/transports/gate.py", "admission (gate.py)"),
    ("notifyrelay/delivery/session.py", "Session"),
    ("notifyrelay/delivery/hub.py", "hub (transports dict, Session objects)"),
    ("notifyrelay/delivery/subscriptions.py", "subscription index"),
    ("notifyrelay/", "other relay code"),
)


def settled_rss(stack: bl.Stack, settle_s: float) -> int:
    """The median of a few RSS samples taken after ``settle_s`` of quiet."""
    time.sleep(settle_s)
    samples = []
    for _ in range(5):
        samples.append(stack.rss())
        time.sleep(0.1)
    return int(statistics.median(samples))


def traced(stack: bl.Stack, path: str, number: int, settle_s: float) -> dict[tuple[str, ...], list[int]]:
    """Ask the relay (SIGUSR1) for its live allocations; traceback -> [bytes, blocks]."""
    time.sleep(settle_s)
    assert stack.relay is not None
    os.kill(stack.relay.pid, signal.SIGUSR1)
    target = f"{path}.{number}"
    deadline = time.monotonic() + 120
    while not os.path.exists(target):
        if time.monotonic() > deadline:
            raise RuntimeError("the relay wrote no tracemalloc snapshot (is bench/memtrace on its PYTHONPATH?)")
        time.sleep(0.2)
    with open(target) as file:
        rows = json.load(file)
    os.unlink(target)
    return {tuple(frames): [size, count] for size, count, frames in rows}


def part_of(frames: tuple[str, ...]) -> str:
    for frame in reversed(frames):  # tracemalloc lists the oldest frame first
        for fragment, part in PARTS:
            if fragment in frame:
                return part
    return "other: " + (frames[-1].rsplit("/", 1)[-1] if frames else "?")


def breakdown(args: argparse.Namespace, result: dict[str, Any]) -> None:
    """Per-connection bytes by part, from tracemalloc in the relay at the first and the last step."""
    steps = [int(s) for s in args.steps.split(",")]
    first, last = steps[0], steps[-1]
    out = str(bl.RESULTS_DIR / "memory.tracemalloc")
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(MEMTRACE), os.environ.get("PYTHONPATH")]))
    os.environ["BENCH_TRACEMALLOC_OUT"] = out
    result["config"] = {"connections": [first, last], "client_processes": args.client_processes,
                        "subscription_per_connection": "one key, at connect time", "tracemalloc_frames": 8,
                        "event_loop": args.loop or "relay default"}
    env = {"NOTIFYRELAY_EVENT_LOOP": args.loop} if args.loop else None
    with bl.Stack("memory", [{"name": CHANNEL}], server=SERVER, env=env) as stack:
        clients = bl.start_clients(args.client_processes, "seq", lifetime_s=600, name="idle-clients")
        with bl.workers_stopped(clients):
            bl.connect_clients(clients, [stack.ws_url(CHANNEL, [f"k{i}"]) for i in range(first)], timeout=300)
            before = traced(stack, out, 1, args.settle_seconds)
            rss_before = stack.rss()
            urls = [stack.ws_url(CHANNEL, [f"k{i}"]) for i in range(first, last)]
            bl.connect_clients(clients, urls, timeout=300)
            after = traced(stack, out, 2, args.settle_seconds)
            rss_after = stack.rss()
    added = last - first
    parts: dict[str, float] = {}
    sites: dict[str, list[float]] = {}
    for frames, (size, count) in after.items():
        size0, count0 = before.get(frames, (0, 0))
        grown, blocks = size - size0, count - count0
        if not grown and not blocks:
            continue
        part = part_of(frames)
        parts[part] = parts.get(part, 0) + grown
        site = f"{part} <- {frames[-1].split('site-packages/')[-1].split('/src/')[-1]}"
        entry = sites.setdefault(site, [0, 0])
        entry[0] += grown
        entry[1] += blocks
    traced_total = sum(parts.values())
    result["tracemalloc_bytes_per_connection"] = {
        part: round(size / added) for part, size in sorted(parts.items(), key=lambda item: -item[1])
        if abs(size / added) >= 8
    }
    result["tracemalloc_total_per_connection_kib"] = round(traced_total / added / 1024, 2)
    result["rss_per_connection_kib_with_tracemalloc"] = round((rss_after - rss_before) / added / 1024, 2)
    result["top_allocation_sites"] = [
        {"site": site, "bytes_per_connection": round(size / added), "blocks_per_connection": round(count / added, 2)}
        for site, (size, count) in sorted(sites.items(), key=lambda item: -item[1][0])[:25]
    ]


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    if args.breakdown:
        breakdown(args, result)
        return
    steps = [int(s) for s in args.steps.split(",")]
    settle = 1.0 if args.quick else args.settle_seconds
    procs = args.client_processes
    result["config"] = {"steps": steps, "settle_seconds": settle, "client_processes": procs,
                        "subscription_per_connection": "one key, at connect time"}
    figures: dict[str, Any] = {}
    result["figures"] = figures
    env = {"NOTIFYRELAY_EVENT_LOOP": args.loop} if args.loop else None
    result["config"]["event_loop"] = args.loop or "relay default"
    with bl.Stack("memory", [{"name": CHANNEL}], server=SERVER, env=env) as stack:
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
    figures["rss_per_connection_kib"] = bl.figure(round(slope, 2), "KiB", 12,
                                                  note=f"(RSS at {n2} - RSS at {n1}) / {n2 - n1}")
    figures["rss_per_connection_fit_kib"] = bl.figure(round(fit, 2), "KiB", note="least squares over the steps")
    figures["rss_at_0_mib"] = bl.figure(round(points[0][1] / 2**20, 1), "MiB")
    figures["rss_at_max_mib"] = bl.figure(round(r2 / 2**20, 1), "MiB")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", default="1000,2500,5000,7500,10000", help="connection counts (first to last)")
    parser.add_argument("--settle-seconds", type=float, default=2.0)
    parser.add_argument("--client-processes", type=int, default=4)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"],
                        help="the relay's event loop (NOTIFYRELAY_EVENT_LOOP); default: the relay's own choice")
    parser.add_argument("--breakdown", action="store_true",
                        help="tracemalloc in the relay: bytes per connection by part (not an RSS figure)")
    return bl.scenario_main("memory", 420, run, parser)


if __name__ == "__main__":
    raise SystemExit(main())
