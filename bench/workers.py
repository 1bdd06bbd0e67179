"""What several workers cost and how fast they come back: ``notifyrelay run`` with ``[server] workers = N``.

For each N (default 1, 2, 4): the time from starting ``notifyrelay run`` to ``/readyz`` 200 (every worker listening
and LISTENing), the resident memory of the supervisor and of each idle worker, and, with N > 1, the time from
SIGKILL of one worker to ``/readyz`` 200 again with its successor (the supervisor's backoff of 0.5 s included), and
the time from SIGTERM to the whole tree having exited. One embedded PostgreSQL serves every run.

With ``--fanout``, instead: deliveries per second with 1 and 2 workers, fanout.py's mixed phase scaled down (clients
following one key each and some following ``*``, a generator updating keys at ``--rate``), the relay's CPU being the
supervisor's and every worker's, and frames written the sum of every worker's ``messages_sent_total``.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import benchlib as bl


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


class WorkerStack(bl.Stack):
    """``bl.Stack`` whose relay may be a supervisor: CPU and memory include its workers, metrics sum over them."""

    def _tree(self) -> list[Any]:
        return [p for process in self.processes for p in (process, *process.children(recursive=True))]

    def cpu_seconds(self) -> float:
        return float(sum(t.user + t.system for t in (p.cpu_times() for p in self._tree())))

    def rss(self) -> int:
        return int(sum(p.memory_info().rss for p in self._tree()))

    def metrics(self) -> dict[str, float]:
        summed: dict[str, float] = {}
        for name, value in super().metrics().items():
            name = re.sub(r'worker="\d+",?', "", name).replace(",}", "}").replace("{}", "")
            summed[name] = summed.get(name, 0.0) + value
        return summed


def notify_frames(metrics: dict[str, float]) -> float:
    """notify frames written, over every transport (and worker)."""
    return sum(value for name, value in metrics.items()
               if name.startswith("notifyrelay_messages_sent_total{") and 'type="notify"' in name)


def fanout(workers: int, args: argparse.Namespace) -> dict[str, Any]:
    """fanout.py's mixed phase, scaled down to what a shared 2-core machine runs beside its clients."""
    channel = "bench_workers_fanout"
    keys = [f"k{i}" for i in range(args.keys)]
    with WorkerStack(f"workers-fanout-{workers}", [{"name": channel}], server={"workers": workers}) as stack:
        clients = bl.start_clients(args.client_processes, "seq", lifetime_s=600, name="clients", impl="sansio")
        generators = bl.start_generators(1, stack.dsn, connections=2, lifetime_s=600)
        with bl.workers_stopped(clients + generators):
            urls = [stack.ws_url(channel, [] if i < args.wildcard else [keys[i % len(keys)]])
                    for i in range(args.clients)]
            bl.connect_clients(clients, urls, timeout=120)
            time.sleep(1)
            bl.call_all(clients, ("reset",), timeout=30)
            time.sleep(1.5)  # as below: every worker's exposition fresh
            before, cpu_before, started = stack.metrics(), stack.cpu_seconds(), time.monotonic()
            generators[0].call(
                "paced", {"channel": channel, "rate": args.rate, "duration": args.seconds, "batch": 100,
                          "n_keys": len(keys), "prefix": "k", "seed": 3},
                timeout=args.seconds * 3 + 60,
            )
            wall = time.monotonic() - started
            cpu = (stack.cpu_seconds() - cpu_before) / wall
            time.sleep(1.5)  # every worker's exposition rewritten since (they are up to a second old)
            after = stack.metrics()
            written = notify_frames(after) - notify_frames(before)
            received = sum(a["frames"] for a in bl.call_all(clients, ("collect",), timeout=60))
            return {"workers": workers, "deliveries_per_s": round(written / wall),
                    "relay_cpu_percent": round(cpu * 100, 1),
                    "deliveries_per_s_per_core": round(written / wall / cpu) if cpu > 0 else None,
                    # The clients' own count, beside the relay's (they differed by 8-25 % on a loaded machine).
                    "received_per_s_per_core": round(received / wall / cpu) if cpu > 0 else None,
                    "frames_written": int(written), "frames_received": received, "seconds": round(wall, 2),
                    "relay_rss_mib": round(stack.rss() / 2**20, 1)}


def body(args: argparse.Namespace, result: dict[str, Any]) -> None:
    from notifyrelay.pgembed import EmbeddedPostgres

    if args.fanout:
        result["settings"] = {k: getattr(args, k) for k in ("clients", "wildcard", "keys", "rate", "seconds",
                                                            "client_processes")}
        result["columns"] = [fanout(int(n), args) for n in args.workers.split(",")]
        result["figures"] = {f"deliveries_per_s_{c['workers']}_workers": bl.figure(c["deliveries_per_s"], "frames/s")
                             for c in result["columns"]}
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
    parser.add_argument("--clients", type=int, default=2000)
    parser.add_argument("--wildcard", type=int, default=200, help="clients following *")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--rate", type=int, default=5000, help="notifications/s")
    parser.add_argument("--seconds", type=float, default=8)
    parser.add_argument("--client-processes", type=int, default=2)
    return bl.scenario_main("workers", 300, body, parser)


if __name__ == "__main__":
    raise SystemExit(main())
