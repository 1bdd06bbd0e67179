"""Run every bench scenario, one after the other, and report each figure against its target.

    .venv/bin/python bench/run_all.py            # the suite, about five minutes on 2 cores
    .venv/bin/python bench/run_all.py --quick    # shorter phases, about two minutes
    .venv/bin/python bench/run_all.py --full     # ingest held for the full 60 s
    .venv/bin/python bench/run_all.py --profile  # also py-spy the relay in each scenario's main phase

Each scenario is its own process (bench/<name>.py) that prints one JSON object; this collects them into one JSON
object on stdout and bench/results/summary.json, with a table on stderr. Exit status: 0 when every scenario ran,
1 when one crashed or timed out, and with ``--strict`` also 1 when a target was missed.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
SCENARIOS = {  # name -> (bound in seconds, extra flags for the default suite)
    "latency": (480, []),
    "transports": (600, []),  # idle latency over SSE and NDJSON beside the websocket's (issue 10)
    "coalescing": (240, []),
    "ingest": (660, ["--duration", "30"]),
    "memory": (480, []),
    "frame_cpu": (300, []),  # relay CPU per frame when every frame differs per client (issue 13)
    "fanout": (660, []),
    "send_floor": (120, []),  # no relay and no targets: the machine's floor under fan-out, to read fanout by
}


def run_scenario(name: str, flags: list[str], bound_s: int) -> dict[str, Any]:
    command = [sys.executable, str(BENCH_DIR / f"{name}.py"), *flags]
    print(f"bench: {' '.join(command[1:])}", file=sys.stderr, flush=True)
    started = time.monotonic()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=sys.stderr, text=True)
    try:
        out, _ = process.communicate(timeout=bound_s)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGTERM)  # the scenario cleans up on SIGTERM
        try:
            out, _ = process.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
            out, _ = process.communicate()
        return {"scenario": name, "error": f"timed out after {bound_s} s", "pass": False}
    except KeyboardInterrupt:
        try:  # Ctrl-C reached the scenario too: let it clean up
            process.communicate(timeout=40)
        except subprocess.TimeoutExpired:
            process.kill()
        raise
    try:
        result: dict[str, Any] = json.loads(out)
    except json.JSONDecodeError:
        result = {"scenario": name, "error": f"exit {process.returncode}, no JSON: {out[-500:]!r}", "pass": False}
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    return result


def table(results: list[dict[str, Any]]) -> str:
    lines = [f"{'scenario':<11} {'figure':<34} {'value':>14}  {'target':<34} result"]
    for result in results:
        name = result.get("scenario", "?")
        if "error" in result:
            lines.append(f"{name:<11} ERROR: {result['error'][:100]}")
        for key, fig in result.get("figures", {}).items():
            verdict = "" if "pass" not in fig else ("pass" if fig["pass"] else "MISS")
            value = f"{fig['value']} {fig['unit']}" if fig["unit"] not in ("bool",) else str(fig["value"])
            lines.append(f"{name:<11} {key:<34} {value:>14}  {fig.get('target', ''):<34} {verdict}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="shorter phases, fewer samples")
    parser.add_argument("--full", action="store_true", help="hold the ingest rate for the full 60 s")
    parser.add_argument("--profile", action="store_true", help="py-spy the relay in each scenario's main phase")
    parser.add_argument("--only", help="comma-separated scenarios to run: " + ",".join(SCENARIOS))
    parser.add_argument("--strict", action="store_true", help="exit 1 when any target is missed")
    args = parser.parse_args()
    names = args.only.split(",") if args.only else list(SCENARIOS)
    unknown = [n for n in names if n not in SCENARIOS]
    if unknown:
        parser.error(f"unknown scenario(s): {', '.join(unknown)}")
    started = time.monotonic()
    results = []
    for name in names:
        bound, extra = SCENARIOS[name]
        flags = ["--quick"] if args.quick else ([] if args.full and name == "ingest" else list(extra))
        if name == "send_floor":
            flags = ["--rounds", "3"] if args.quick else []
        elif args.profile:
            flags.append("--profile")
        results.append(run_scenario(name, flags, bound))
    summary = {
        "suite": "notifyrelay bench",
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": " ".join([os.path.relpath(sys.executable), *sys.argv]),
        "seconds": round(time.monotonic() - started, 1),
        "machine": next((r["machine"] for r in results if "machine" in r), {}),
        "pass": all(r.get("pass") is not False for r in results),
        "scenarios": {r.get("scenario", "?"): r for r in results},
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    text = json.dumps(summary, indent=2)
    (RESULTS_DIR / "summary.json").write_text(text + "\n")
    (RESULTS_DIR / f"summary-{datetime.now(UTC).strftime('%Y%m%dT%H%M%SZ')}.json").write_text(text + "\n")
    print(table(results), file=sys.stderr)
    print(text)
    crashed = any("error" in r for r in results)
    return 1 if crashed or (args.strict and not summary["pass"]) else 0


if __name__ == "__main__":
    raise SystemExit(main())
