"""``[server] workers = N``: one supervisor and N worker processes sharing the port with ``SO_REUSEPORT``.

    notifyrelay run (the supervisor)
      reserves the port: a socket bound with SO_REUSEPORT, never listening (the kernel routes connections only to
      listening sockets of the group, so it takes none; port 0 becomes a real port the workers can share)
      starts N workers: python -m notifyrelay run --listen HOST:PORT, with NOTIFYRELAY_WORKER=I/N; each is a full
      relay with its own LISTEN connection, bound to the same port with SO_REUSEPORT
      restarts a worker that dies (backoff 0.5 s doubling to 10 s), kills one whose event loop stops turning
      forwards SIGHUP and SIGTERM/SIGINT to every worker; exits 0 when all have stopped cleanly
      tells systemd READY=1 only when every worker is ready (workers never see NOTIFY_SOCKET)

Workers run in their own process group, so that a Ctrl-C at a terminal reaches the supervisor alone (which passes
it on as one SIGTERM) rather than every worker twice. The probes and metrics that cover every worker, and the files
the workers meet in, are in ``worker_reports.py``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import structlog
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from ..config import Config, load_config, parse_listen
from ..exceptions import ConfigError
from .sdnotify import SystemdNotifier
from .worker_reports import (
    SUPERVISOR_METRICS,
    WorkerSlot,
    WorkerState,
    forget_worker,
    read_workers,
    write_atomically,
)

log = structlog.get_logger("notifyrelay.supervisor")

EXIT_OK, EXIT_ERROR, EXIT_USAGE = 0, 1, 2
WATCH_INTERVAL_S = 0.25
RESTART_INITIAL_S, RESTART_MAX_S = 0.5, 10.0
STEADY_S = 10.0  # a worker that ran this long before dying is restarted after the initial backoff again
GIVE_UP_AFTER = 5  # workers dying within STEADY_S this many times in a row: the supervisor exits 1
HANG_TIMEOUT_S = 30.0  # a worker silent this long (its loop does not turn) is killed and restarted
# The variables a worker must not inherit: systemd's notify socket and watchdog belong to the supervisor.
SYSTEMD_ONLY = ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID")


def is_worker(environ: Mapping[str, str] | None = None) -> bool:
    """True in a process a supervisor started as one of its workers."""
    return WorkerSlot.from_environ(environ) is not None


def reserve_port(listen: str, key: str) -> tuple[socket.socket, str]:
    """Bind (never listen) a SO_REUSEPORT socket on ``listen``; the socket, and ``HOST:PORT`` with the real port.

    Kept bound, it holds the port (port 0 included) for the workers, which can join it only with SO_REUSEPORT."""
    host, port = parse_listen(listen, key)
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        # SO_REUSEADDR as asyncio's servers set it: without it, TIME_WAIT connections of a previous relay (without
        # SO_REUSEPORT, workers = 1) would keep the port from being reserved for a minute.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    port = sock.getsockname()[1]
    return sock, (f"[{host}]:{port}" if ":" in host else f"{host}:{port}")


def worker_command(args: argparse.Namespace, listen: str) -> list[str]:
    """The command line of a worker: this one's ``run`` flags, with the reserved address. A ``--dsn`` is passed in
    the environment instead (see ``Supervisor``), so that no password shows in ``ps``."""
    command = [sys.executable, "-m", "notifyrelay", "run", "--listen", listen]
    for flag in ("config", "log_level", "log_format"):
        value = getattr(args, flag, None)
        if value is not None:
            command += [f"--{flag.replace('_', '-')}", value]
    return command


class Supervisor:
    """Runs ``config.server.workers`` workers until ``request_stop()``; ``run()`` returns the exit status."""

    def __init__(
        self,
        config: Config,
        args: argparse.Namespace,
        *,
        overrides: Mapping[str, Any] | None = None,
        hang_timeout_s: float = HANG_TIMEOUT_S,
    ) -> None:
        self.config = config
        self.args = args
        self.overrides = dict(overrides or {})
        self.count = config.server.workers
        self.hang_timeout_s = hang_timeout_s
        self.systemd = SystemdNotifier.from_environ()
        self.processes: dict[int, asyncio.subprocess.Process] = {}
        self.url = ""
        self.directory: Path | None = None
        self._sockets: list[socket.socket] = []
        self._stop = asyncio.Event()
        self._exit_status = EXIT_OK
        self._ready = False
        self._registry = CollectorRegistry()
        self._workers_gauge = Gauge("notifyrelay_workers", "Relay worker processes running.",
                                    registry=self._registry)
        self._restarts = Counter("notifyrelay_worker_restarts", "Worker processes restarted after they exited.",
                                 registry=self._registry)

    def request_stop(self, status: int = EXIT_OK) -> None:
        if not self._stop.is_set():
            self._exit_status = status
        self._stop.set()

    async def run(self) -> int:
        """Reserve the ports, start the workers, keep them running until asked to stop, then stop them all."""
        # systemd's RuntimeDirectory= (private, removed at stop) when set; it may list several: the first.
        runtime = os.environ.get("RUNTIME_DIRECTORY", "").split(":")[0] or None
        self.directory = Path(tempfile.mkdtemp(prefix="notifyrelay-workers-", dir=runtime))
        try:
            listen, admin = self._reserve_ports()
            scheme = "wss" if self.config.server.tls_cert_file else "ws"
            host, port = parse_listen(listen)
            shown = "127.0.0.1" if host == "0.0.0.0" else f"[{host}]" if ":" in host else host
            self.url = f"{scheme}://{shown}:{port}/ws"
            log.info("supervisor.started", url=self.url, listen=listen, admin_listen=admin, workers=self.count,
                     pid=os.getpid())
            command = worker_command(self.args, listen)
            async with asyncio.TaskGroup() as group:
                keepers = [group.create_task(self._keep(index, command, admin), name=f"worker-{index}")
                           for index in range(self.count)]
                watch = group.create_task(self._watch(), name="watch")
                watchdog = group.create_task(self.systemd.watchdog(), name="watchdog")
                await self._stop.wait()
                await self._stop_workers()
                for task in (*keepers, watch, watchdog):
                    task.cancel()
        finally:
            for process in self.processes.values():  # only if something above failed: never leave one behind
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
            for sock in self._sockets:
                sock.close()
            shutil.rmtree(self.directory, ignore_errors=True)
            self.systemd.close()
        log.info("supervisor.stopped", exit_status=self._exit_status)
        return self._exit_status

    def _reserve_ports(self) -> tuple[str, str]:
        sock, listen = reserve_port(self.config.server.listen, "server.listen")
        self._sockets.append(sock)
        admin = ""
        if self.config.admin.listen:
            sock, admin = reserve_port(self.config.admin.listen, "admin.listen")
            self._sockets.append(sock)
        return listen, admin

    def _environ(self, index: int, admin: str) -> dict[str, str]:
        assert self.directory is not None
        environ = {name: value for name, value in os.environ.items() if name not in SYSTEMD_ONLY}
        environ.update(WorkerSlot(index, self.count, self.directory).environ())
        if admin:
            environ["NOTIFYRELAY_ADMIN__LISTEN"] = admin
        dsn = getattr(self.args, "dsn", None)
        if dsn is not None:
            environ["NOTIFYRELAY_DSN"] = dsn  # as --dsn would, it outranks the file; not on the command line
        return environ

    async def _keep(self, index: int, command: list[str], admin: str) -> None:
        """Keep worker ``index`` running: start it, and when it dies, restart it after a backoff."""
        loop = asyncio.get_running_loop()
        backoff, quick_deaths = RESTART_INITIAL_S, 0
        while not self._stop.is_set():
            started = loop.time()
            process = await asyncio.create_subprocess_exec(*command, env=self._environ(index, admin),
                                                           process_group=0)
            self.processes[index] = process
            self._publish_metrics()
            log.info("supervisor.worker_started", worker=index, worker_pid=process.pid)
            status = await process.wait()
            # Forget it at once: a dead worker is not ready, and its series are gone from /metrics.
            del self.processes[index]
            assert self.directory is not None
            forget_worker(self.directory, index)
            if self._stop.is_set():
                return
            lived = loop.time() - started
            log.warning("supervisor.worker_exited", worker=index, worker_pid=process.pid, exit_status=status,
                        signal=signal.Signals(-status).name if status < 0 else None, lived_s=round(lived, 2))
            if status == EXIT_USAGE:  # a configuration error: every restart would meet it again
                log.error("supervisor.worker_config_error", worker=index)
                self.request_stop(EXIT_USAGE)
                return
            if lived >= STEADY_S:
                backoff, quick_deaths = RESTART_INITIAL_S, 0
            else:
                quick_deaths += 1
                if quick_deaths >= GIVE_UP_AFTER:
                    log.error("supervisor.giving_up", worker=index, deaths=quick_deaths)
                    self.request_stop(EXIT_ERROR)
                    return
            self._restarts.inc()
            self._publish_metrics()
            self.systemd.status(f"worker {index} exited ({status}): restarting in {backoff:g}s")
            log.info("supervisor.worker_restart_scheduled", worker=index, wait_s=backoff)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), backoff)
            backoff = min(backoff * 2, RESTART_MAX_S)

    async def _watch(self) -> None:
        """Follow the workers' reports: READY=1 once all are ready, a STATUS= line on every change, and kill a
        worker whose report has stopped coming (its event loop is stuck) so that it is restarted."""
        assert self.directory is not None
        status = ""
        while True:
            states = read_workers(self.directory, self.count)
            not_ready = [state for state in states if not state.ready]
            if not not_ready:
                line = f"relaying: {self.count} workers ready"
                if not self._ready:
                    self._ready = True
                    log.info("supervisor.ready", workers=self.count)
                    self.systemd.ready(line)
            else:
                line = "; ".join(f"worker {state.index}: {state.reason}" for state in not_ready)
            if line != status and self._ready:
                status = line
                self.systemd.status(line)
            self._kill_hung(states)
            await asyncio.sleep(WATCH_INTERVAL_S)

    def _kill_hung(self, states: list[WorkerState]) -> None:
        for state in states:
            process = self.processes.get(state.index)
            if process is None:
                continue
            index = state.index
            # Only a worker that reported (under this pid) and then fell silent: a starting one has not reported.
            if state.pid == process.pid and state.age > self.hang_timeout_s:
                log.error("supervisor.worker_hung", worker=index, worker_pid=process.pid, silent_s=round(state.age, 1))
                with contextlib.suppress(ProcessLookupError):
                    process.kill()

    def _publish_metrics(self) -> None:
        self._workers_gauge.set(len(self.processes))
        if self.directory is not None:
            with contextlib.suppress(OSError):
                write_atomically(self.directory / SUPERVISOR_METRICS, generate_latest(self._registry))

    def forward(self, signum: int) -> None:
        """Pass a signal on to every worker."""
        for index, process in self.processes.items():
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signum)
                log.debug("supervisor.signal_forwarded", worker=index, signal=signal.Signals(signum).name)

    async def _stop_workers(self) -> None:
        """SIGTERM to every worker (each shuts down in order: not ready, 1001 to its clients, ...), then wait; a
        worker still running past ``[shutdown] timeout_s`` + 10 s is killed, and the stop is not clean."""
        self.systemd.stopping(f"shutting down {len(self.processes)} worker(s)")
        log.info("supervisor.stopping", workers=len(self.processes))
        self.forward(signal.SIGTERM)
        processes = list(self.processes.items())
        waits = [asyncio.ensure_future(process.wait()) for _, process in processes]
        if not waits:
            return
        _, pending = await asyncio.wait(waits, timeout=self.config.shutdown.timeout_s + 10)
        for (index, process), wait in zip(processes, waits, strict=True):
            if wait in pending:
                log.error("supervisor.worker_kill", worker=index, worker_pid=process.pid)
                with contextlib.suppress(ProcessLookupError):
                    process.kill()
                self._exit_status = self._exit_status or EXIT_ERROR
            elif wait.result() not in (0, -signal.SIGTERM):  # -SIGTERM: stopped before its handlers were set
                log.warning("supervisor.worker_unclean_exit", worker=index, exit_status=wait.result())
                self._exit_status = self._exit_status or EXIT_ERROR
        if pending:
            await asyncio.wait(pending, timeout=5)

    def reload(self) -> None:
        """SIGHUP: every worker re-reads the configuration itself. The worker count needs a restart: say so."""
        self.forward(signal.SIGHUP)
        try:
            workers = load_config(self.args.config, overrides=self.overrides).server.workers
        except Exception as exc:  # the workers log the details of a bad file; here it only hides the count
            log.warning("supervisor.reload_unreadable", error=str(exc))
            return
        if workers != self.count:
            log.warning("supervisor.reload_needs_restart", keys=["server.workers"], running=self.count, new=workers)


async def supervise(supervisor: Supervisor) -> int:
    """Run the supervisor with SIGTERM/SIGINT (stop every worker; a second one kills them) and SIGHUP (forwarded)."""
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_stop(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        log.info("supervisor.signal", signal=signal.Signals(signum).name)
        if signals_seen > 1:  # the workers take a second signal as "exit at once", as a single relay does
            supervisor.forward(signal.SIGTERM)
            return
        supervisor.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop, signum)
    loop.add_signal_handler(signal.SIGHUP, supervisor.reload)
    try:
        return await supervisor.run()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)


def run_supervisor(config: Config, args: argparse.Namespace, overrides: Mapping[str, Any]) -> int:
    """``notifyrelay run`` with ``[server] workers`` > 1: the exit status of the whole tree."""
    try:
        return asyncio.run(supervise(Supervisor(config, args, overrides=overrides)))
    except ConfigError:
        raise
    except OSError as exc:  # the port is taken, a worker cannot be started
        log.error("supervisor.cannot_start", error=str(exc))
        return EXIT_ERROR
    except Exception as exc:  # the last boundary: say why before exiting non-zero (the workers are killed by now)
        log.exception("supervisor.crashed", error=str(exc))
        return EXIT_ERROR
