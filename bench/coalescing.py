"""Scenario 5, coalescing: one key updated 1,000 times/s for 10 s; frames per second its follower receives.

A generator sends ``pg_notify`` for the same key 1,000 times a second, each its own transaction (PostgreSQL folds
duplicates only within one transaction). A client following that key counts the notify frames it receives.
Target: at most 1000 / window_ms + 1 frames in any one second (6 with the default 200 ms window), judged on the
busiest one-second span; the mean rate, the closest two frames and how soon the last update arrives after the
load stops (the trailing edge: nothing is lost by folding) are reported beside it.
"""

from __future__ import annotations

import argparse
import itertools
import time
from typing import Any

import benchlib as bl

CHANNEL = "bench_coalesce"
KEY = "hot"


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    window_ms = args.window_ms
    seconds = 5.0 if args.quick else args.seconds
    result["config"] = {"window_ms": window_ms, "rate_per_s": args.rate, "seconds": seconds, "key": KEY}
    figures: dict[str, Any] = {}
    result["figures"] = figures
    with bl.Stack("coalescing", [{"name": CHANNEL}], window_ms=window_ms) as stack:
        clients = bl.start_clients(1, "seq", lifetime_s=300, name="follower")
        generators = bl.start_generators(1, stack.dsn, connections=1, lifetime_s=300)
        with bl.workers_stopped(clients + generators):
            bl.connect_clients(clients, [stack.ws_url(CHANNEL, [KEY])])
            before = stack.metrics()
            profiler = bl.Profiler(args.profile, stack.relay.pid if stack.relay else 0, "coalescing", seconds)
            answer = generators[0].call(
                "paced", {"channel": CHANNEL, "rate": args.rate, "duration": seconds, "keys": [KEY]},
                timeout=seconds * 3 + 60,
            )
            time.sleep(window_ms / 1000 + 0.5)
            after = stack.metrics()
            got = clients[0].call("collect")
            profile = profiler.finish()
    if profile:
        result["profile"] = profile
    arrivals = sorted(entry[1] for entry in got["by_seq"].values())
    during = [t for t in arrivals if answer["began"] <= t]
    busiest = max((sum(1 for u in during[i:] if u < t + 1.0) for i, t in enumerate(during)), default=0)
    gaps = [b - a for a, b in itertools.pairwise(during)]
    span = answer["ended"] - answer["began"]
    received = (bl.counter(after, "notifyrelay_notifications_received_total", channel=CHANNEL)
                - bl.counter(before, "notifyrelay_notifications_received_total", channel=CHANNEL))
    result["detail"] = {
        "notifications_sent": answer["sent"], "notifications_received_by_relay": int(received),
        "achieved_rate_per_s": round(answer["sent"] / span), "frames_received": len(during),
        "load_seconds": round(span, 2), "notifications_per_frame": round(answer["sent"] / max(1, len(during)), 1),
        "last_frame_after_last_commit_ms": round((during[-1] - answer["ended"]) * 1000, 1) if during else None,
    }
    limit = 1000 / window_ms + 1
    figures["frames_per_s_busiest_second"] = bl.figure(busiest, "frames/s", limit)
    figures["frames_per_s_mean"] = bl.figure(round(len(during) / span, 2), "frames/s", limit)
    figures["notifications_per_s_sent"] = bl.figure(round(answer["sent"] / span), "notifications/s",
                                                    args.rate * 0.95, ">=", note="the load actually offered")
    figures["min_gap_between_frames_ms"] = bl.figure(round(min(gaps) * 1000, 1) if gaps else None, "ms")
    figures["last_update_delivered"] = bl.figure(
        1 if during and during[-1] >= answer["ended"] else 0, "bool", 1, ">=",
        note="a frame arrives after the last COMMIT: the trailing window is flushed")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rate", type=int, default=1000)
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--window-ms", type=int, default=200)
    return bl.scenario_main("coalescing", 180, run, parser)


if __name__ == "__main__":
    raise SystemExit(main())
