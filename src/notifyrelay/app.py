"""Wiring: the one place that builds the stages, runs them together and shuts them down in order.

    PostgreSQL --LISTEN--> Listener --IngestQueue--> Coalescer --Batch--> Pipeline (a stream per channel:
    history, state) --> Hub --> Sessions --> transports (websocket, SSE, NDJSON on one HTTP server)
"""

from __future__ import annotations

import asyncio
import os
import secrets
import signal
from collections.abc import Mapping
from typing import Any

import msgspec
import structlog

from .config import Config, dsn_password, load_config, resolve_dsn
from .config import state_dsn as config_state_dsn
from .delivery.hub import Hub
from .exceptions import ConfigError
from .ops import log as logging_setup
from .ops.sdnotify import ListenerStatusReporter, SystemdNotifier
from .ops.worker_reports import WorkerReporter, join_supervisor, relay_metrics, relay_readiness
from .pipeline.coalescer import Coalescer
from .pipeline.ingest import IngestQueue
from .pipeline.listener import Listener
from .pipeline.state import StatePool, channel_states, watch_stalls
from .pipeline.streams import Pipeline
from .transports.http import RelayServer

log = structlog.get_logger("notifyrelay.app")


class Relay:
    """The daemon: listener, coalescer, hub and server, run by ``run()`` until ``request_stop()``."""

    def __init__(
        self,
        config: Config,
        *,
        config_path: str | None = None,
        overrides: Mapping[str, Any] | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.overrides = dict(overrides or {})
        names = [c.name for c in config.channels]
        dsn = self.dsn = resolve_dsn(config)
        logging_setup.register_secret(dsn_password(dsn))
        self.worker = join_supervisor()  # set when a supervisor runs this process as one of its workers
        self.metrics = relay_metrics(self.worker)  # as a worker, /metrics and /readyz cover every worker
        self.instance = secrets.token_hex(6)  # this process's life, in welcome frames and logs
        self.queue = IngestQueue(config.listener.queue_size)
        self.metrics.ingest_queue_depth.set_function(lambda: len(self.queue))
        self.hub = Hub(config.server, names, self.metrics, instance=self.instance, window_ms=config.coalesce.window_ms)
        # State channels fetch rows on their own small pool (never the LISTEN connection).
        state_dsn = self.state_dsn = config_state_dsn(config)
        logging_setup.register_secret(dsn_password(state_dsn))
        self.state_pool = StatePool(state_dsn, config.state.pool_size, self.metrics)
        self.states = channel_states(config.channels, self.state_pool, self.metrics)
        self.pipeline = Pipeline(config.channels, history=config.history, delivery=self.hub, metrics=self.metrics,
                                 states=dict(self.states))
        self.hub.request = self.pipeline.request  # snapshot and replay requests go back up to the channel's stream
        self.hub.set_channels(names, self.pipeline.stateful(), progress=_progress_channels(config))
        self.coalescer = Coalescer(config.channels, config.coalesce, self.queue, self.pipeline, self.metrics)
        # systemd (Type=notify) hears READY=1 when the listener is first up, STATUS= on every change after.
        self.systemd = SystemdNotifier.from_environ()
        reporter = ListenerStatusReporter(self.pipeline, self.systemd)
        self.listener = Listener(dsn, names, config.listener, self.queue, reporter, self.metrics)
        self.readiness = relay_readiness(self.listener, self.worker)
        self.server = RelayServer(config, self.hub, self.readiness, self.metrics,
                                  reuse_port=config.server.workers > 1)
        self._stop = asyncio.Event()
        self._reload_lock = asyncio.Lock()
        self.started = asyncio.Event()

    def request_stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        """Serve until ``request_stop()``, then shut down in order. A crashed stage raises out of here."""
        await self.state_pool.start()
        await self.server.start()
        log.info("relay.started", url=self.server.url, admin_port=self.server.admin_port, instance=self.instance,
                 channels=self.hub.channels, window_ms=self.config.coalesce.window_ms)
        try:
            async with asyncio.TaskGroup() as group:
                stages = [
                    group.create_task(self.listener.run(), name="listener"),
                    group.create_task(self.coalescer.run(), name="coalescer"),
                    group.create_task(self.pipeline.run(), name="pipeline"),
                    group.create_task(self._check_states(self.config), name="state_check"),
                    group.create_task(watch_stalls(lambda: self.states, self.pipeline.restate), name="stalls"),
                    group.create_task(self.systemd.watchdog(), name="watchdog"),
                    group.create_task(WorkerReporter(self.readiness, self.metrics, on_orphaned=self.request_stop)
                                      .run(), name="worker_reports"),
                ]
                self.started.set()
                await self._stop.wait()
                await self._shutdown()
                for stage in stages:
                    stage.cancel()
        finally:
            await self.listener.close()
            await self.state_pool.close()
            await self.server.close()
            self.systemd.close()
        log.info("relay.stopped")

    async def _shutdown(self) -> None:
        timeout = self.config.shutdown.timeout_s
        self.systemd.stopping(f"shutting down: closing {len(self.hub)} client(s)")
        log.info("relay.shutting_down", timeout_s=timeout, clients=len(self.hub))
        # 1. Stop being ready, so that load balancers stop sending new clients.
        self.readiness.shutting_down = True
        # 2. Stop accepting connections.
        self.server.stop_accepting()
        try:
            async with asyncio.timeout(timeout):
                # 3. Flush the last window through every channel's stream, so nothing received is kept from clients.
                self.coalescer.flush_all()
                await self.pipeline.idle()
                # 4. Close every client with 1001 (going away): websockets with a close frame, streams with a
                #    close event or line; each transport cuts off a peer that does not finish within its grace.
                self.hub.close_all(1001, "server shutting down")
                await self.hub.emptied()
                # 5. Close the database connection.
                await self.listener.close()
        except TimeoutError:
            log.warning("relay.shutdown_timeout", timeout_s=timeout)

    async def reload(self) -> bool:
        """Re-read the configuration file (SIGHUP) and apply what can change live; keep the old one if invalid.

        Reloads run one at a time; nothing they meet escapes (a failure is logged and the old config stays)."""
        async with self._reload_lock:
            self.systemd.reloading()
            try:
                return await self._reload()
            except Exception:
                log.exception("relay.reload_failed")
                return False
            finally:
                # The status after a reload says what is true now: a listener that is down stays reported down.
                self.systemd.reloaded(
                    f"relaying {len(self.hub.channels)} channel(s): configuration reloaded" if self.listener.up
                    else "listener down: reconnecting to PostgreSQL; configuration reloaded"
                )

    async def _reload(self) -> bool:
        try:
            new = load_config(self.config_path, overrides=self.overrides)
            new_dsn = resolve_dsn(new)
        except ConfigError as exc:
            log.error("relay.reload_rejected", error=str(exc))
            return False
        # What needs a restart keeps its running value, so that the config in force (welcome frames, probes,
        # the next reload's comparison) says what the relay really does.
        new, restart_needed = keep_restart_only(self.config, new)
        if new_dsn != self.dsn:
            restart_needed.insert(0, "dsn")
        if restart_needed:
            log.warning("relay.reload_needs_restart", keys=restart_needed)
        logging_setup.set_level(new.log.level)
        names = [c.name for c in new.channels]
        self.hub.settings = new.server
        self.states = channel_states(new.channels, self.state_pool, self.metrics, previous=self.states)
        self.pipeline.set_channels(new.channels, dict(self.states))
        self.hub.set_channels(names, self.pipeline.stateful(), progress=_progress_channels(new))
        self.coalescer.set_channels(new.channels)
        self.listener.settings = new.listener
        added = [name for name in names if name not in self.listener.channels]
        await self.listener.set_channels(names)
        if self.listener.up:
            self.pipeline.mark_listening(added)
        self.server.config = self.config = new
        log.info("relay.reloaded", channels=names)
        await self._check_states(new)
        return True

    async def _check_states(self, config: Config) -> None:
        """Ask PostgreSQL whether each state query can work; a channel whose query cannot (unknown table or
        column, no key column, no grant) runs keys-only until a reload fixes it, and the log says why."""
        broken = []
        for name, state in list(self.states.items()):
            problem = await state.check()
            if problem is not None:
                log.error("state.channel_keys_only", channel=name, problem=problem,
                          fix="correct [channels.state] (or the role's grants) and reload (SIGHUP)")
                broken.append(name)
        if broken and config is self.config:
            working = {name: state for name, state in self.states.items() if name not in broken}
            self.pipeline.set_channels(config.channels, working)
            self.hub.set_channels([c.name for c in config.channels], self.pipeline.stateful(),
                                  progress=_progress_channels(config) - set(broken))


def _progress_channels(config: Config) -> set[str]:
    return {c.name for c in config.channels if c.state is not None and c.progress is not None}


# What a running relay cannot change (sockets and their options, the queue, the coalescer's windows, the keys):
# a reload keeps the running values and logs these keys as needing a restart. None: the whole section.
RESTART_ONLY: dict[str, tuple[str, ...] | None] = {
    "admin": None,
    "auth": None,
    "coalesce": None,
    "state": None,
    "log": ("format",),
    "listener": ("queue_size",),
    "server": ("listen", "tls_cert_file", "tls_key_file", "max_message_bytes", "compression",
               "write_high_water_bytes", "ping_interval_s", "ping_timeout_s", "handshake_timeout_s", "workers"),
}


def keep_restart_only(old: Config, new: Config) -> tuple[Config, list[str]]:
    """``new`` with every restart-only key set back to its running value, and the dotted keys that differed."""
    changed: list[str] = []
    sections: dict[str, Any] = {}
    for section, keys in RESTART_ONLY.items():
        before, after = getattr(old, section), getattr(new, section)
        if keys is None:
            changed += [section] if before != after else []
            sections[section] = before
        else:
            changed += [f"{section}.{key}" for key in keys if getattr(before, key) != getattr(after, key)]
            sections[section] = msgspec.structs.replace(after, **{key: getattr(before, key) for key in keys})
    return msgspec.structs.replace(new, dsn=old.dsn, dsn_file=old.dsn_file, **sections), changed


async def run_until_signalled(relay: Relay) -> None:
    """Run the relay with SIGTERM/SIGINT (graceful stop; a second one exits at once) and SIGHUP (reload)."""
    loop = asyncio.get_running_loop()
    signals_seen = 0

    def on_stop(signum: int) -> None:
        nonlocal signals_seen
        signals_seen += 1
        if signals_seen > 1:
            log.warning("relay.forced_exit", signal=signal.Signals(signum).name)
            os._exit(1)
        log.info("relay.signal", signal=signal.Signals(signum).name)
        relay.request_stop()

    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, on_stop, signum)
    reloads: set[asyncio.Task[bool]] = set()

    def on_reload() -> None:
        task = loop.create_task(relay.reload())
        reloads.add(task)  # keep a reference until it finishes
        task.add_done_callback(reloads.discard)

    loop.add_signal_handler(signal.SIGHUP, on_reload)
    try:
        await relay.run()
    finally:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(signum)
