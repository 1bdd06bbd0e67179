"""Subscription bookkeeping at scale (issue 14 item 3): does a subscribe cost more when others hold many keys?

300 clients each hold 1,000 keys of one channel (300,000 subscriptions). Then, in one run:
- a bystander's subscribe round trip (subscribe one key, wait for its ack), median and max of 50;
- the same bystander's ping round trip while all 300 clients disconnect at once (the worst one).
Before the fix every subscribe, unsubscribe and disconnect recounted the channel's keys for the gauge.

Run it against the tree (default) or against another checkout's sources, to put the before and after side by side:
``python bench/subscribe_scale.py --src /tmp/old/src`` (e.g. a ``git worktree`` of an older commit).
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from typing import Any

import benchlib as bl
import msgspec
from websockets.asyncio.client import connect

CHANNEL = "bench_subscribe"


async def measure(url: str, clients: int, keys: int) -> dict[str, Any]:
    holders = []
    for c in range(clients):
        ws = await connect(url, max_size=2**24, ping_interval=None)
        await ws.recv()  # welcome
        frame = {"op": "subscribe", "channel": CHANNEL, "keys": [f"c{c}-k{k}" for k in range(keys)]}
        await ws.send(msgspec.json.encode(frame).decode())
        while msgspec.json.decode(await ws.recv())["type"] != "ack":
            pass
        holders.append(ws)
        if c % 20 == 0:
            print(f"holder {c} subscribed", file=sys.stderr, flush=True)
    bystander = await connect(url, ping_interval=None)
    await bystander.recv()
    round_trips = []
    for n in range(50):
        started = time.perf_counter()
        await bystander.send(msgspec.json.encode({"op": "subscribe", "channel": CHANNEL, "keys": [f"b{n}"]}).decode())
        while msgspec.json.decode(await bystander.recv())["type"] != "ack":
            pass
        round_trips.append(time.perf_counter() - started)
    # Everyone leaves at once; the bystander pings all the while.
    pings: list[float] = []

    async def ping_loop(stop: asyncio.Event) -> None:
        while not stop.is_set():
            started = time.perf_counter()
            await bystander.send('{"op":"ping"}')
            while msgspec.json.decode(await bystander.recv())["type"] != "pong":
                pass
            pings.append(time.perf_counter() - started)
            await asyncio.sleep(0.005)

    stop = asyncio.Event()
    pinger = asyncio.create_task(ping_loop(stop))
    await asyncio.sleep(0.2)
    for ws in holders:
        ws.transport.abort()
    await asyncio.sleep(2.0)
    stop.set()
    await pinger
    await bystander.close()
    return {
        "subscribe_round_trip_ms": {"median": round(statistics.median(round_trips) * 1000, 3),
                                    "max": round(max(round_trips) * 1000, 3)},
        "ping_while_all_leave_ms": {"median": round(statistics.median(pings) * 1000, 3),
                                    "max": round(max(pings) * 1000, 3)},
    }


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    clients = 60 if args.quick else args.clients
    env = {"PYTHONPATH": args.src} if args.src else {}
    if args.event_loop:
        env["NOTIFYRELAY_EVENT_LOOP"] = args.event_loop
    # The bystander pings every few milliseconds: a rate limit above that, so that only the bookkeeping is measured.
    server = {"max_subscriptions": args.keys, "max_connections": 1000, "rate_limit_per_s": 1000.0,
              "rate_limit_burst": 1000}
    if args.src:  # an older relay knows none of the newer [server] keys
        server.update(max_handshakes=None)
    else:
        server.update(max_total_subscriptions=clients * args.keys + 1000)
    result["config"] = {"clients": clients, "keys_per_client": args.keys, "src": args.src or "this tree"}
    with bl.Stack("subscribe_scale", [{"name": CHANNEL}], server=server, env=env) as stack:
        measured = asyncio.run(measure(stack.url, clients, args.keys))
    result["measured"] = measured
    result["figures"] = {
        "subscribe_round_trip_median_ms": bl.figure(measured["subscribe_round_trip_ms"]["median"], "ms"),
        "subscribe_round_trip_max_ms": bl.figure(measured["subscribe_round_trip_ms"]["max"], "ms"),
        "ping_while_all_leave_max_ms": bl.figure(measured["ping_while_all_leave_ms"]["max"], "ms"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=300)
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--src", default="", help="run the relay from this src/ directory (an older checkout)")
    parser.add_argument("--event-loop", default="", help="asyncio or uvloop (default: the relay's own choice)")
    return bl.scenario_main("subscribe_scale", 300, run, parser)


if __name__ == "__main__":
    raise SystemExit(main())
