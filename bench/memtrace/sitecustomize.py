"""Loaded by the relay when bench/memory.py --breakdown puts this folder on PYTHONPATH. The first SIGUSR1 starts
tracemalloc (from the start, imports would take half a minute) and writes an empty list; each later one writes the
allocations made since then and still live, grouped by traceback, as JSON to $BENCH_TRACEMALLOC_OUT.N (N = 1, 2...).

Grouping happens here, in the relay, so the file holds a few thousand tracebacks instead of every allocation.
"""

from __future__ import annotations

import json
import os
import signal
import tracemalloc

_OUT = os.environ.get("BENCH_TRACEMALLOC_OUT")

if _OUT:
    _dumps = [0]

    def _dump(signum: int, frame: object) -> None:
        _dumps[0] += 1
        if not tracemalloc.is_tracing():
            tracemalloc.start(int(os.environ.get("BENCH_TRACEMALLOC_FRAMES", "8")))
            with open(f"{_OUT}.{_dumps[0]}", "w") as out:
                out.write("[]")
            return
        snapshot = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
        rows = [[stat.size, stat.count, [f"{f.filename}:{f.lineno}" for f in stat.traceback]]
                for stat in snapshot.statistics("traceback")]
        path = f"{_OUT}.{_dumps[0]}"
        with open(path + ".tmp", "w") as out:
            json.dump(rows, out)
        os.replace(path + ".tmp", path)

    signal.signal(signal.SIGUSR1, _dump)
