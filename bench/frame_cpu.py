"""CPU per delivered frame when every frame differs per client: 1,000 clients, each following its own key.

One generator updates the 1,000 keys at ``--rate`` notifications/s (statements of 100 consecutive keys, so at the
default 5,000/s each key changes about once per 200 ms window and every flush writes one frame to each client:
about 5,000 distinct frames a second). The relay's CPU (user + system from ``/proc/PID/stat``) over the phase,
divided by the notify frames it wrote (its own ``messages_sent_total``, cross-checked with what the clients
counted), is the figure. Target (issue 13): <= 15 us per frame. Its user and system shares are printed apart (the
system time is mostly the kernel's ``send()``, one per frame).

The same load is first sent with no client connected, so the relay's cost of taking the notifications in (ingest
and coalescing) is known and can be told apart from the delivery's own: ``delivery_only_us_per_frame`` subtracts
it, and ``ingest_us_per_notification`` is that load's CPU per notification. The client processes' own CPU over the
phase is reported too (they share the machine's cores).
"""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

import benchlib as bl

CHANNEL = "bench_frame_cpu"
TICK = os.sysconf("SC_CLK_TCK")


def proc_times(pid: int) -> tuple[float, float]:
    """utime and stime of a process, seconds (fields 14 and 15 of /proc/PID/stat)."""
    with open(f"/proc/{pid}/stat") as file:
        fields = file.read().rsplit(")", 1)[1].split()
    return int(fields[11]) / TICK, int(fields[12]) / TICK


def proc_cpu(pid: int) -> float:
    return sum(proc_times(pid))


def paced(stack: bl.Stack, generator: bl.Worker, args: argparse.Namespace, seconds: float,
          pids: list[int]) -> dict[str, Any]:
    """Send the load for ``seconds``; the relay's CPU, frames written and the other processes' CPU over it."""
    before = stack.metrics()
    assert stack.relay is not None
    (user_before, system_before), wall_before = proc_times(stack.relay.pid), time.monotonic()
    others_before = sum(proc_cpu(pid) for pid in pids)
    answer = generator.call(
        "paced", {"channel": CHANNEL, "rate": args.rate, "duration": seconds, "batch": 100,
                  "n_keys": args.clients, "prefix": "k", "seed": 5},
        timeout=seconds * 3 + 60,
    )
    time.sleep(0.5)  # the last window flushes
    user, system = proc_times(stack.relay.pid)
    user, system = user - user_before, system - system_before
    relay_cpu = user + system
    wall = time.monotonic() - wall_before
    others = sum(proc_cpu(pid) for pid in pids) - others_before
    frames = bl.notify_frames(stack.metrics()) - bl.notify_frames(before)
    return {"notifications_sent": answer["sent"], "max_late_s": round(answer["max_late_s"], 3),
            "seconds": round(wall, 2), "relay_cpu_s": round(relay_cpu, 3),
            "relay_user_s": round(user, 3), "relay_system_s": round(system, 3), "frames_written": int(frames),
            "clients_cpu_s": round(others, 3)}


def run(args: argparse.Namespace, result: dict[str, Any]) -> None:
    seconds = 4.0 if args.quick else args.seconds
    result["config"] = {"clients": args.clients, "keys": args.clients, "follows": "one key each, its own",
                        "rate_per_s": args.rate, "seconds": seconds, "window_ms": 200, "client_impl": "sansio",
                        "client_processes": args.client_processes, "event_loop": args.loop}
    figures: dict[str, Any] = {}
    result["figures"] = figures
    env = {"NOTIFYRELAY_EVENT_LOOP": args.loop} if args.loop else None
    with bl.Stack("frame_cpu", [{"name": CHANNEL}], server={"max_connections": 12000}, env=env) as stack:
        clients = bl.start_clients(args.client_processes, "seq", lifetime_s=600, name="clients", impl="sansio")
        generators = bl.start_generators(1, stack.dsn, connections=2, lifetime_s=600)
        with bl.workers_stopped(clients + generators):
            pids = [w.process.pid for w in clients if w.process.pid]
            assert stack.relay is not None
            idle_before = proc_cpu(stack.relay.pid)
            time.sleep(5)
            result["idle_relay_cpu_percent"] = round((proc_cpu(stack.relay.pid) - idle_before) / 5 * 100, 2)
            profiler = bl.Profiler(args.profile, stack.relay.pid, "frame_cpu-ingest", seconds)
            ingest = paced(stack, generators[0], args, seconds, [])
            profile = profiler.finish()
            result["ingest_only"] = ingest
            if profile:
                result["profile_ingest_only"] = profile
            urls = [stack.ws_url(CHANNEL, [f"k{i}"]) for i in range(args.clients)]
            bl.connect_clients(clients, urls, timeout=120)
            time.sleep(1)
            bl.call_all(clients, ("reset",), timeout=30)
            profiler = bl.Profiler(args.profile, stack.relay.pid, "frame_cpu", seconds)
            phase = paced(stack, generators[0], args, seconds, pids)
            profile = profiler.finish()
            answers = bl.call_all(clients, ("collect",), timeout=60)
            phase["frames_received"] = sum(a["frames"] for a in answers)
            result["delivery"] = phase
            if profile:
                result["profile"] = profile
    frames = phase["frames_written"]
    per_frame = phase["relay_cpu_s"] / frames * 1e6 if frames else None
    ingest_share = ingest["relay_cpu_s"] * phase["notifications_sent"] / max(1, ingest["notifications_sent"])
    delivery_only = (phase["relay_cpu_s"] - ingest_share) / frames * 1e6 if frames else None
    figures["relay_cpu_us_per_frame"] = bl.figure(
        None if per_frame is None else round(per_frame, 2), "us", 15,
        note="relay CPU (utime + stime) over the phase / notify frames written; ingest included")
    figures["delivery_only_us_per_frame"] = bl.figure(
        None if delivery_only is None else round(delivery_only, 2), "us",
        note="the same, less the relay's CPU for the same load with no client (ingest and coalescing)")
    for part, note in (("user", "the relay's user time over the phase / notify frames written"),
                       ("system", "its system time / notify frames written: mostly the kernel's send(), one a frame")):
        figures[f"relay_{part}_us_per_frame"] = bl.figure(
            round(phase[f"relay_{part}_s"] / frames * 1e6, 2) if frames else None, "us", note=note)
    figures["ingest_us_per_notification"] = bl.figure(
        round(ingest["relay_cpu_s"] / max(1, ingest["notifications_sent"]) * 1e6, 2), "us",
        note="the relay's CPU with no client connected, per notification sent (ingest and coalescing)")
    figures["frames_per_s"] = bl.figure(round(frames / phase["seconds"]), "frames/s")
    figures["clients_cpu_percent"] = bl.figure(round(phase["clients_cpu_s"] / phase["seconds"] * 100, 1),
                                               "% of one core", note="the client processes' own load")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=5000, help="notifications/s over the clients' keys")
    parser.add_argument("--seconds", type=float, default=10)
    parser.add_argument("--client-processes", type=int, default=2)
    parser.add_argument("--loop", choices=["asyncio", "uvloop"],
                        help="the relay's event loop (NOTIFYRELAY_EVENT_LOOP); default: the relay's own choice")
    return bl.scenario_main("frame_cpu", 300, run, parser)


if __name__ == "__main__":
    raise SystemExit(main())
