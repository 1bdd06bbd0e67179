"""What several workers cost and how fast they come back: ``notifyrelay run`` with ``[server] workers = N``.

For each N (default 1, 2, 4): the time from starting ``notifyrelay run`` to ``/readyz`` 200 (every worker listening
and LISTENing), the resident memory of the supervisor and of each idle worker, and, with N > 1, the time from
SIGKILL of one worker to ``/readyz`` 200 again with its successor (the supervisor's backoff of 0.5 s included), and
the time from SIGTERM to the whole tree having exited. One embedded PostgreSQL serves every run.

With ``--fanout``, instead: deliveries per second with the relay saturated, per worker count (``--workers 1,2``),
beside the CPU the relay (supervisor and every worker), the client processes and the whole machine used; frames
counted are what the clients received over the middle of the load, relay saturated (the relay's own counter
would also count the backlog it writes after the load stops). The clients are the lightest the bench has
(``bench/fastclient.c``), so that as much of the two cores as possible is left to the relay; their load is reported
beside each figure.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import benchlib as bl

WINDOW_MS = 200  # bl.Stack's default coalescing window


def readyz(port: int) -> tuple[int, dict[str, Any]]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/readyz", timeout=2) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read() or b"{}")
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return 0, {}


def wait_ready(port: int, timeout: float, until: Any = lambda report: True) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        status, report = readyz(port)
        if status == 200 and until(report):
            return report
        time.sleep(0.01)
    raise RuntimeError(f"not ready within {timeout:g} s")


def rss_mib(pid: int) -> float:
    import psutil

    return round(psutil.Process(pid).memory_info().rss / 2**20, 1)


def measure(workers: int, dsn: str, directory: Path) -> dict[str, Any]:
    from notifyrelay.pgembed import free_port

    port = free_port()
    config = directory / f"workers-{workers}.toml"
    config.write_text(f'dsn = "{dsn}"\n[server]\nlisten = "127.0.0.1:{port}"\nworkers = {workers}\n'
                      '[log]\nformat = "json"\n[[channels]]\nname = "bench_workers"\n')
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFYRELAY_")}
    started = time.monotonic()
    with open(directory / f"workers-{workers}.log", "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "notifyrelay", "run", "--config", str(config)],
                                   stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        report = wait_ready(port, 30)
        result: dict[str, Any] = {"workers": workers, "start_to_ready_s": round(time.monotonic() - started, 2)}
        time.sleep(1)  # settle: imports done, first heartbeats passed
        pids = [worker["pid"] for worker in report.get("workers", [])] or [process.pid]
        result["supervisor_rss_mib"] = rss_mib(process.pid) if workers > 1 else None
        result["worker_rss_mib"] = [rss_mib(pid) for pid in pids]
        if workers > 1:
            victim = pids[-1]
            killed = time.monotonic()
            os.kill(victim, signal.SIGKILL)
            wait_ready(port, 30, lambda report: report["workers"][-1]["pid"] not in (victim, None))
            result["sigkill_to_ready_again_s"] = round(time.monotonic() - killed, 2)
        stopping = time.monotonic()
        process.send_signal(signal.SIGTERM)
        result["exit_status"] = process.wait(30)
        result["sigterm_to_exit_s"] = round(time.monotonic() - stopping, 2)
        return result
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(10)


def fanout(workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """Deliveries per second with the relay saturated: ``--clients`` clients follow ``*`` on ``--channels`` channels,
    and every statement NOTIFYs one key on every channel, often enough that each channel flushes a batch every
    window; so each client is offered channels x 1000 / window_ms frames a second, more than the relay writes (the
    result says whether it was: ``saturated``)."""
    import psutil

    names = [f"bench_workers_{i}" for i in range(args.channels)]
    server = {"workers": workers} if workers > 1 else {}
    with bl.Stack(f"workers-fanout-{workers}", [{"name": name} for name in names], server=server) as stack:
        clients = bl.start_clients(args.client_processes, "seq", lifetime_s=600, name="clients", impl="c",
                                   poll_s=args.poll_ms / 1000)
        generators = bl.start_generators(1, stack.dsn, connections=1, lifetime_s=600)
        with bl.workers_stopped(clients + generators):
            url = f"{stack.url}?" + urlencode([("channel", name) for name in names])
            bl.connect_clients(clients, [url] * args.clients, timeout=120)
            time.sleep(1.5)
            bl.call_all(clients, ("reset",), timeout=30)
            client_processes = [psutil.Process(client.process.pid) for client in clients]

            def clients_cpu() -> float:
                return sum(t.user + t.system for t in (p.cpu_times() for p in client_processes))

            def collect() -> tuple[int, int, dict[str, int]]:
                """Notify frames, keys and close codes the clients have seen so far."""
                frames = keys = 0
                closed: dict[str, int] = {}
                for answer in bl.call_all(clients, ("collect",), timeout=60):
                    frames += answer["frames"]
                    keys += sum(entry[4] * entry[0] for entry in answer["by_seq"].values())
                    for code, count in answer["closed"].items():
                        closed[code] = closed.get(code, 0) + count
                return frames, keys, closed

            generators[0].send(
                "paced", {"channel": "bench_workers_", "rate": args.rate, "duration": args.seconds, "seed": 3,
                          "keys": [f"k{i}" for i in range(1000)],
                          "sql": f"SELECT pg_notify($1::text || g::text, $2::text) "
                                 f"FROM generate_series(0, {args.channels - 1}) g"})
            # Measure inside the load, after the relay has filled up: a saturated relay holds a backlog of batches,
            # and what it writes after the load stops would flatter a count taken at the end.
            time.sleep(args.warmup)
            (frames_before, keys_before, _), started = collect(), time.monotonic()
            machine_before, relay_before, clients_before = psutil.cpu_times(), stack.cpu_seconds(), clients_cpu()
            time.sleep(args.seconds - args.warmup - 1)
            relay_after, clients_after, machine_after = stack.cpu_seconds(), clients_cpu(), psutil.cpu_times()
            (frames_after, keys_after, closed), wall = collect(), time.monotonic() - started
            frames, keys = frames_after - frames_before, keys_after - keys_before
            relay = (relay_after - relay_before) / wall
            client_load = (clients_after - clients_before) / wall
            busy = sum(getattr(machine_after, f) - getattr(machine_before, f)
                       for f in ("user", "system", "nice", "irq", "softirq", "steal")) / wall
            sent = generators[0].recv(args.seconds * 3 + 60)
            # Each channel flushes at most one batch a window: the most the clients can be offered.
            offered = args.clients * args.channels * 1000 / WINDOW_MS
            rate = frames / wall
            return {"workers": workers, "deliveries_per_s": round(rate),
                    "relay_cores": round(relay, 2), "clients_cores": round(client_load, 2),
                    "machine_busy_cores": round(busy, 2),
                    "deliveries_per_s_per_relay_core": round(rate / relay) if relay > 0 else None,
                    "clients_cpu_us_per_frame": round(client_load / rate * 1e6, 1) if rate else None,
                    "keys_per_frame": round(keys / frames, 2) if frames else None,
                    "frames_received": frames, "seconds": round(wall, 2), "offered_per_s": round(offered),
                    # Below the offer by more than noise: the relay, not the load, set the rate.
                    "saturated": rate < 0.9 * offered, "closed": closed,
                    "notifications_sent": sent["sent"], "generator_max_late_s": round(sent["max_late_s"], 3),
                    "relay_rss_mib": round(stack.rss() / 2**20, 1)}


def body(args: argparse.Namespace, result: dict[str, Any]) -> None:
    from notifyrelay.pgembed import EmbeddedPostgres

    if args.fanout:
        result["settings"] = {k: getattr(args, k) for k in ("clients", "channels", "rate", "seconds",
                                                            "warmup", "client_processes", "poll_ms")}
        result["columns"] = columns = [fanout(int(n), args) for n in args.workers.split(",")]
        figures = result["figures"] = {}
        for c in columns:
            figures[f"deliveries_per_s_{c['workers']}_workers"] = bl.figure(
                c["deliveries_per_s"], "frames/s",
                note=f"relay {c['relay_cores']} cores, clients {c['clients_cores']}, machine {c['machine_busy_cores']}"
                     " busy of 2")
        one = next((c for c in columns if c["workers"] == 1), None)
        two = next((c for c in columns if c["workers"] == 2), None)
        if one and two and one["deliveries_per_s"]:
            # Only a ratio of two saturated runs says what workers add; an unsaturated one measured the load.
            both = one["saturated"] and two["saturated"]
            ratio = two["deliveries_per_s"] / one["deliveries_per_s"]
            figures["two_workers_over_one"] = bl.figure(
                round(ratio, 2) if both else None, "x", 1.7, ">=",
                note="deliveries/s, 2 workers / 1 worker, clients on the same 2 cores" if both else
                f"not judged: a run was not saturated ({ratio:.2f}x)")
            if one["deliveries_per_s_per_relay_core"] and two["deliveries_per_s_per_relay_core"]:
                figures["per_relay_core_two_over_one"] = bl.figure(
                    round(two["deliveries_per_s_per_relay_core"] / one["deliveries_per_s_per_relay_core"], 2), "x",
                    note="deliveries per relay CPU-second, 2 workers / 1: what a second worker costs per frame")
        return
    counts = [int(n) for n in args.workers.split(",")]
    bl.RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    with EmbeddedPostgres() as server:
        result["columns"] = [measure(n, server.dsn, bl.RESULTS_DIR) for n in counts]
    result["figures"] = {
        f"start_to_ready_{c['workers']}_workers": bl.figure(c["start_to_ready_s"], "s") for c in result["columns"]
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", default="1,2,4", help="worker counts to run, one after the other")
    parser.add_argument("--fanout", action="store_true", help="deliveries per second instead (use --workers 1,2)")
    parser.add_argument("--clients", type=int, default=2000, help="with --fanout: clients following * everywhere")
    parser.add_argument("--channels", type=int, default=16, help="with --fanout: channels each client follows")
    parser.add_argument("--rate", type=int, default=40, help="with --fanout: statements/s, each NOTIFYing every "
                        "channel once")
    parser.add_argument("--seconds", type=float, default=8, help="with --fanout: the load's length")
    parser.add_argument("--poll-ms", type=int, default=50, help="with --fanout: the clients sweep their sockets "
                        "this often (0: each waits in epoll_wait); one read() then takes several frames")
    parser.add_argument("--warmup", type=float, default=2, help="with --fanout: seconds of load before counting")
    parser.add_argument("--client-processes", type=int, default=2)
    return bl.scenario_main("workers", 300, body, parser)


if __name__ == "__main__":
    raise SystemExit(main())
