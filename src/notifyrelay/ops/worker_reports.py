"""What each worker process reports, and the probes that answer for all of them (``[server] workers`` > 1).

Every worker writes, into a runtime directory its supervisor made, its own ``/readyz`` report (every 0.25 s) and its
own registry's ``/metrics`` exposition (every second)::

    DIR/worker-0.json  {"worker": 0, "pid": 4242, "time": 1764510000.25, "report": {...}}
    DIR/worker-0.prom  the text exposition of worker 0's registry
    DIR/supervisor.prom  notifyrelay_workers, notifyrelay_worker_restarts_total (written by the supervisor)

The kernel hands a probe to any worker (SO_REUSEPORT), so whichever one gets it answers for every worker by reading
the others' files beside its own live state (``WorkerReadiness``, ``WorkerMetrics``: drop-ins for the relay's own):
``/readyz`` is ready only when every worker is, and one scrape of ``/metrics`` carries every worker's series with a
``worker`` label. A report older than ``STALE_S`` is a worker that stopped turning its event loop, or died: not
ready. The supervisor removes a dead worker's files as it reaps it.

Why files and not prometheus-client's multiprocess mode: see docs/scaling.md (it drops the process_* collectors and
``Gauge.set_function``, and sums away which worker holds which clients).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import msgspec
import structlog
from prometheus_client import Gauge

from .health import ListenerStatus, Readiness
from .metrics import Metrics

log = structlog.get_logger("notifyrelay.workers")

# Set by the supervisor for each worker it starts (config.ENV_NOT_CONFIG lists them).
ENV_WORKER = "NOTIFYRELAY_WORKER"  # "INDEX/COUNT", e.g. "1/4"
ENV_WORKER_DIR = "NOTIFYRELAY_WORKER_DIR"  # the runtime directory shared by the supervisor and its workers

REPORT_INTERVAL_S = 0.25  # a worker's readiness file is this fresh
METRICS_EVERY = 4  # reports; so its exposition file is at most a second old
STALE_S = 3.0  # a worker whose report is older than this is not ready (its loop is stuck, or it is gone)
SUPERVISOR_METRICS = "supervisor.prom"


@dataclass(frozen=True)
class WorkerSlot:
    """Which worker this process is, of how many, and where the workers meet."""

    index: int
    count: int
    directory: Path

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> WorkerSlot | None:
        """The slot the supervisor gave this process, or None when it runs on its own."""
        environ = os.environ if environ is None else environ
        value, directory = environ.get(ENV_WORKER), environ.get(ENV_WORKER_DIR)
        if not value or not directory:
            return None
        index, _, count = value.partition("/")
        return cls(int(index), int(count), Path(directory))

    def environ(self) -> dict[str, str]:
        """The variables that make a process started with them this worker."""
        return {ENV_WORKER: f"{self.index}/{self.count}", ENV_WORKER_DIR: str(self.directory)}


def report_path(directory: Path, index: int) -> Path:
    return directory / f"worker-{index}.json"


def exposition_path(directory: Path, index: int) -> Path:
    return directory / f"worker-{index}.prom"


def write_atomically(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` so that a reader sees the old file or the new one, never half of one."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_bytes(data)
    os.replace(temporary, path)


def forget_worker(directory: Path, index: int) -> None:
    """Remove a worker's files (the supervisor does so as it reaps it): a dead worker is not ready, at once."""
    for path in (report_path(directory, index), exposition_path(directory, index)):
        path.unlink(missing_ok=True)


@dataclass(frozen=True)
class WorkerState:
    """One worker's last report as its files say, judged for freshness."""

    index: int
    pid: int | None
    report: dict[str, Any] | None  # its own /readyz report, None when missing or stale
    reason: str  # why it is not ready, "" when it is
    age: float = 0.0  # seconds since it last reported

    @property
    def ready(self) -> bool:
        return not self.reason

    def summary(self) -> dict[str, Any]:
        summary: dict[str, Any] = {"worker": self.index, "pid": self.pid, "ready": self.ready}
        if self.reason:
            summary["reason"] = self.reason
        if self.report is not None:
            summary["listener"] = self.report.get("listener")
        return summary


def read_worker(directory: Path, index: int, *, now: float | None = None) -> WorkerState:
    """Worker ``index``'s state from its report file: missing, stale, not ready (with its reasons) or ready."""
    now = time.time() if now is None else now
    try:
        document = msgspec.json.decode(report_path(directory, index).read_bytes())
    except FileNotFoundError:
        return WorkerState(index, None, None, "not reporting (starting, or restarted)")
    except (OSError, msgspec.DecodeError) as exc:
        return WorkerState(index, None, None, f"unreadable report: {exc}")
    pid, report, age = document.get("pid"), document.get("report"), now - float(document.get("time", 0))
    if age > STALE_S:
        return WorkerState(index, pid, None, f"silent for {age:.1f}s (event loop stuck?)", age)
    reasons = report.get("reasons") or ([] if report.get("ready") else ["not ready"])
    return WorkerState(index, pid, report, "; ".join(reasons), age)


def read_workers(directory: Path, count: int) -> list[WorkerState]:
    now = time.time()
    return [read_worker(directory, index, now=now) for index in range(count)]


def merge_readiness(own: dict[str, Any], own_index: int, others: Iterable[WorkerState]) -> dict[str, Any]:
    """One /readyz report for every worker: ready only when each is; the single-process keys keep their meaning
    (``listener`` is up only when every worker's is), and ``workers`` lists each worker."""
    states = sorted([*others, WorkerState(own_index, os.getpid(), own, "; ".join(own["reasons"]))],
                    key=lambda state: state.index)
    reasons = [f"worker {state.index}: {state.reason}" for state in states if not state.ready]
    listeners_up = all(state.report is not None and state.report.get("listener") == "up" for state in states)
    return {
        **own,
        "ready": not reasons,
        "reasons": reasons,
        "listener": "up" if listeners_up else "down",
        "worker": own_index,
        "workers": [state.summary() for state in states],
    }


def merge_expositions(parts: Iterable[tuple[str | None, str]]) -> str:
    """Prometheus text expositions (format 0.0.4) as one: each family once, with the samples of every part; the
    samples of a part given a worker index get a ``worker`` label, so that series of different workers stay apart.

    The text format wants a family's lines together and its HELP and TYPE once, hence the grouping."""
    families: dict[str, list[str]] = {}  # name -> [HELP, TYPE, samples...], in order of first appearance
    for worker, text in parts:
        family: list[str] | None = None
        for line in text.splitlines():
            if not line:
                continue
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split(" ", 3)[2]
                known = families.get(name)
                if known is None:
                    families[name] = family = [line]
                else:
                    family = known
                    if line.startswith("# TYPE ") and not any(seen.startswith("# TYPE ") for seen in known):
                        known.insert(1, line)
                continue
            if line.startswith("#") or family is None:
                continue
            family.append(line if worker is None else _with_worker_label(line, worker))
    return "".join(line + "\n" for family in families.values() for line in family)


def _with_worker_label(sample: str, worker: str) -> str:
    """``name{a="1"} 2`` -> ``name{worker="W",a="1"} 2``; ``name 2`` -> ``name{worker="W"} 2``."""
    cut = min((i for i in (sample.find("{"), sample.find(" ")) if i >= 0), default=len(sample))
    name, rest = sample[:cut], sample[cut:]
    if rest.startswith("{"):
        separator = "" if rest.startswith("{}") else ","
        return f'{name}{{worker="{worker}"{separator}{rest[1:]}'
    return f'{name}{{worker="{worker}"}}{rest}'


def join_supervisor(environ: Mapping[str, str] | None = None) -> WorkerSlot | None:
    """The slot a supervisor gave this process, None when it runs alone. As a worker, its log lines carry
    ``worker=INDEX`` from now on (bound before the event loop starts, so that every task inherits it)."""
    slot = WorkerSlot.from_environ(environ)
    if slot is not None:
        structlog.contextvars.bind_contextvars(worker=slot.index)
    return slot


def relay_metrics(slot: WorkerSlot | None) -> Metrics:
    """The relay's metrics. Alone: its own registry, with ``notifyrelay_workers`` 1. As a worker: a Metrics whose
    exposition covers every worker (the supervisor reports ``notifyrelay_workers``)."""
    if slot is not None:
        return WorkerMetrics(slot)
    metrics = Metrics()
    Gauge("notifyrelay_workers", "Relay worker processes running.", registry=metrics.registry).set(1)
    return metrics


def relay_readiness(listener: ListenerStatus, slot: WorkerSlot | None) -> Readiness:
    """The relay's readiness: its own alone, every worker's as a worker."""
    return Readiness(listener) if slot is None else WorkerReadiness(listener, slot)


class WorkerMetrics(Metrics):
    """A worker's metrics: counted in its own registry, exposed (``/metrics``) for every worker, each series
    labelled with its worker, beside the supervisor's own."""

    def __init__(self, slot: WorkerSlot) -> None:
        super().__init__()
        self.slot = slot

    def own_exposition(self) -> bytes:
        return super().exposition()

    def exposition(self) -> bytes:
        slot = self.slot
        parts: list[tuple[str | None, str]] = []
        for index in range(slot.count):
            if index == slot.index:
                parts.append((str(index), self.own_exposition().decode()))
                continue
            try:
                parts.append((str(index), exposition_path(slot.directory, index).read_text()))
            except OSError:
                continue  # not started yet, or just died: its series are absent, and /readyz says why
        with contextlib.suppress(OSError):
            parts.append((None, (slot.directory / SUPERVISOR_METRICS).read_text()))
        return merge_expositions(parts).encode()


class WorkerReadiness(Readiness):
    """A worker's readiness: ``/readyz`` is ready only when every worker is."""

    def __init__(self, listener: ListenerStatus, slot: WorkerSlot) -> None:
        super().__init__(listener)
        self.slot = slot

    def own_report(self) -> dict[str, Any]:
        return super().report()

    def report(self) -> dict[str, Any]:
        slot = self.slot
        others = [read_worker(slot.directory, index) for index in range(slot.count) if index != slot.index]
        return merge_readiness(self.own_report(), slot.index, others)


class WorkerReporter:
    """Publishes a worker's own readiness and metrics for the other workers and the supervisor to read, and stops
    the relay if the supervisor dies (workers live in their own process group: nothing else would stop them)."""

    def __init__(self, readiness: Readiness, metrics: Metrics, *, on_orphaned: Callable[[], None]) -> None:
        self.readiness = readiness
        self.metrics = metrics
        self._on_orphaned: Callable[[], None] | None = on_orphaned
        self._parent = os.getppid()
        self._publishing = True  # False after a failed write, so that a lasting failure is logged once

    async def run(self) -> None:
        """Publish until cancelled; return at once when this process is no worker (it runs alone)."""
        readiness, metrics = self.readiness, self.metrics
        if not isinstance(readiness, WorkerReadiness) or not isinstance(metrics, WorkerMetrics):
            return
        ticks = 0
        try:
            while True:
                self.publish(readiness, metrics, with_metrics=ticks % METRICS_EVERY == 0)
                ticks += 1
                if os.getppid() != self._parent and self._on_orphaned is not None:
                    log.error("worker.orphaned", supervisor_pid=self._parent)
                    self._on_orphaned()
                    self._on_orphaned = None
                await asyncio.sleep(REPORT_INTERVAL_S)
        finally:
            # A worker on its way out is not ready: say so at once rather than after STALE_S.
            forget_worker(readiness.slot.directory, readiness.slot.index)

    def publish(self, readiness: WorkerReadiness, metrics: WorkerMetrics, *, with_metrics: bool = True) -> None:
        slot = readiness.slot
        try:
            if with_metrics:
                write_atomically(exposition_path(slot.directory, slot.index), metrics.own_exposition())
            document = {"worker": slot.index, "pid": os.getpid(), "time": time.time(),
                        "report": readiness.own_report()}
            write_atomically(report_path(slot.directory, slot.index), msgspec.json.encode(document))
        except OSError as exc:
            # The directory went away (the supervisor is gone, or cleaned up): the orphan check stops us.
            if self._publishing:
                log.warning("worker.report_failed", error=str(exc))
            self._publishing = False
        else:
            self._publishing = True
