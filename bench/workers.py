"""What several workers cost and how fast they come back: ``notifyrelay run`` with ``[server] workers = N``.

For each N (default 1, 2, 4): the time from starting ``notifyrelay run`` to ``/readyz`` 200 (every worker listening
and LISTENing), the resident memory of the supervisor and of each idle worker, and, with N > 1, the time from
SIGKILL of one worker to ``/readyz`` 200 again with its successor (the supervisor's backoff of 0.5 s included), and
the time from SIGTERM to the whole tree having exited. One embedded PostgreSQL serves every run.
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


def body(args: argparse.Namespace, result: dict[str, Any]) -> None:
    from notifyrelay.pgembed import EmbeddedPostgres

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
    return bl.scenario_main("workers", 300, body, parser)


if __name__ == "__main__":
    raise SystemExit(main())
