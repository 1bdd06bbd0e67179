"""The ``notifyrelay`` command: run, check-config, watch, demo, sql, --version.

Exit status: 0 after a clean shutdown, 2 for a usage or configuration error, 1 for anything unexpected.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import structlog

from . import __version__
from .config import load_config, to_toml
from .exceptions import EXIT_ERROR, EXIT_OK, EXIT_USAGE, ConfigError
from .ops.log import configure_logging


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="notifyrelay", description="Relay PostgreSQL LISTEN/NOTIFY to websocket clients, coalesced."
    )
    parser.add_argument("--version", action="version", version=f"notifyrelay {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = commands.add_parser("run", help="run the relay daemon")
    _config_option(run)
    run.add_argument("--dsn", help="PostgreSQL DSN (overrides the file and NOTIFYRELAY_DSN)")
    run.add_argument("--listen", metavar="HOST:PORT", help="websocket address (server.listen)")
    run.add_argument("--log-level", choices=["debug", "info", "warning", "error"])
    run.add_argument("--log-format", choices=["json", "console"])

    check = commands.add_parser("check-config", help="validate the configuration and print it, secrets redacted")
    _config_option(check)

    watch = commands.add_parser(
        "watch", help="follow keys on a relay: progress bars on a terminal, one line per change through a pipe"
    )
    watch.add_argument("url", metavar="URL", help="the relay's websocket URL, e.g. ws://127.0.0.1:8765/ws")
    watch.add_argument("--channel", help="channel to follow (default: the first the relay offers)")
    watch.add_argument("--key", action="append", default=[], help="key to follow; repeat it; none means every key")
    watch.add_argument("--token", default=os.environ.get("NOTIFYRELAY_TOKEN"),
                       help="bearer token (auth mode jwt; default: $NOTIFYRELAY_TOKEN)")
    watch.add_argument("--until-done", action="store_true",
                       help="exit once every followed key has ended: 0 if none failed, 1 if any did")
    watch.add_argument("--json", action="store_true", help="print the relay's frames as NDJSON, one per line")

    demo = commands.add_parser("demo", help="an embedded PostgreSQL, a simulated worker and the relay, in one go")
    demo.add_argument("--listen", metavar="HOST:PORT", default="127.0.0.1:8765")

    sql = commands.add_parser("sql", help="print, install or uninstall the SQL in sql/ (trigger function, examples)")
    sql.add_argument("action", choices=["print", "install", "uninstall"])
    sql.add_argument("--dsn", help="PostgreSQL DSN (default: $NOTIFYRELAY_DSN, $NOTIFYRELAY_DSN_FILE, PG* variables)")
    sql.add_argument("--example", action="append", default=[], metavar="NAME",
                     help="also apply sql/examples/NAME.sql (e.g. activities); repeat it, in order")
    return parser


def _config_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", metavar="PATH", default=os.environ.get("NOTIFYRELAY_CONFIG"),
        help="TOML configuration file (default: $NOTIFYRELAY_CONFIG)",
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "run":
            return _run(args)
        if args.command == "check-config":
            from .auth import Authenticator
            from .config import resolve_dsn

            config = load_config(args.config)
            # What run reads besides the file fails here as it would there: the DSN (file) and the auth keys.
            resolve_dsn(config)
            Authenticator.from_config(config.auth)
            sys.stdout.write(to_toml(config))
            return EXIT_OK
        if args.command == "sql":
            from .sqlcmd import run_sql_command

            return run_sql_command(args)
        if args.command == "watch":
            from .watch import watch

            return asyncio.run(watch(args.url, channel=args.channel, keys=args.key, token=args.token,
                                     until_done=args.until_done, json_output=args.json))
        from .demo import run_demo

        return run_demo(args.listen)
    except ConfigError as exc:
        print(f"notifyrelay: configuration error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        return EXIT_OK


def event_loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's event loop when it is installed (``pip install notifyrelay[fast]``), unless
    ``NOTIFYRELAY_EVENT_LOOP=asyncio``; None (asyncio's own loop) otherwise. ``=uvloop`` without uvloop is an error."""
    choice = os.environ.get("NOTIFYRELAY_EVENT_LOOP", "auto")
    if choice not in ("auto", "asyncio", "uvloop"):
        raise ConfigError("must be auto, asyncio or uvloop", source="environment variable NOTIFYRELAY_EVENT_LOOP")
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise ConfigError("uvloop is not installed: pip install 'notifyrelay[fast]'",
                              source="environment variable NOTIFYRELAY_EVENT_LOOP") from None
        return None
    return uvloop.new_event_loop


def _run(args: argparse.Namespace) -> int:
    from .ops.workers import is_worker, run_supervisor

    overrides: dict[str, Any] = {}
    for flag, key in (("dsn", "dsn"), ("listen", "server.listen"), ("log_level", "log.level"),
                      ("log_format", "log.format")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    config = load_config(args.config, overrides=overrides)
    configure_logging(config.log.level, config.log.format)
    log = structlog.get_logger("notifyrelay.cli")
    if config.server.workers > 1 and not is_worker():  # a supervisor of N workers (docs/scaling.md)
        return run_supervisor(config, args, overrides)
    from .app import Relay, run_until_signalled  # here: a supervisor has no use for the relay's modules

    try:
        relay = Relay(config, config_path=args.config, overrides=overrides)
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            runner.run(run_until_signalled(relay))
    except ConfigError:
        raise
    except OSError as exc:
        log.error("relay.cannot_start", error=str(exc))
        return EXIT_ERROR
    except BaseException as exc:  # the last boundary: say why before exiting non-zero
        if isinstance(exc, KeyboardInterrupt):
            return EXIT_OK
        log.exception("relay.crashed", error=str(exc))
        return EXIT_ERROR
    return EXIT_OK
