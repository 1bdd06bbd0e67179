"""``notifyrelay sql print|install|uninstall``: apply sql/ to a database without psql.

``install`` runs ``install.sql`` and then each ``--example`` in one transaction, under an advisory lock so that
two installs at once (several replicas starting together) cannot trip over each other; running it again is
harmless. ``uninstall`` runs ``uninstall.sql`` the same way. ``print`` writes what ``install`` would run, for
review or for psql.

The DSN comes from ``--dsn``, else ``NOTIFYRELAY_DSN``, else the file named by ``NOTIFYRELAY_DSN_FILE``, else
libpq's PG* variables (as for the daemon). It is never printed with its password.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
from collections.abc import Mapping
from typing import TextIO

from .config import check_dsn, dsn_password, read_dsn_file, redact_dsn
from .exceptions import EXIT_ERROR, EXIT_OK, EXIT_USAGE, ConfigError
from .ops.log import register_secret, scrub
from .sqlfiles import example_names, read_sql

# Any constant will do, as long as every installer uses the same one.
INSTALL_LOCK_KEY = 0x6E72_7371  # "nrsq"


def install_script(examples: list[str]) -> list[tuple[str, str]]:
    """``(file, text)`` for ``install.sql`` followed by each example, in the order given."""
    known = example_names()
    for name in examples:
        if name not in known:
            raise ConfigError(f"unknown example {name!r}; the examples are: {', '.join(known)}", key="--example")
    return [("install.sql", read_sql("install.sql"))] + [
        (f"examples/{name}.sql", read_sql(f"examples/{name}.sql")) for name in dict.fromkeys(examples)
    ]


def resolve_sql_dsn(flag: str | None, environ: Mapping[str, str] = os.environ) -> str:
    """The DSN for the sql command: flag, NOTIFYRELAY_DSN, NOTIFYRELAY_DSN_FILE, else "" (PG* variables)."""
    if flag:
        return flag
    if environ.get("NOTIFYRELAY_DSN"):
        return environ["NOTIFYRELAY_DSN"]
    dsn_file = environ.get("NOTIFYRELAY_DSN_FILE")
    return read_dsn_file(dsn_file, source="NOTIFYRELAY_DSN_FILE") if dsn_file else ""


async def apply(dsn: str, scripts: list[tuple[str, str]]) -> int | None:
    """Run ``scripts`` in one transaction; returns the installed SQL version afterwards (None when absent)."""
    import asyncpg

    conn = await asyncpg.connect(dsn or None)
    try:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", INSTALL_LOCK_KEY)
            for _name, text in scripts:
                await conn.execute(text)
        if await conn.fetchval("SELECT to_regprocedure('notifyrelay.version()') IS NOT NULL"):
            version: int = await conn.fetchval("SELECT notifyrelay.version()")
            return version
        return None
    finally:
        await conn.close()


def run_sql_command(args: argparse.Namespace, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The ``sql`` subcommand: ``args.action`` is print, install or uninstall; ``args.example`` a list of names."""
    out, err = out or sys.stdout, err or sys.stderr
    examples: list[str] = list(args.example or [])
    if args.action == "uninstall" and examples:
        print("notifyrelay: sql uninstall takes no --example: examples create your own tables and triggers; "
              "drop them yourself", file=err)
        return EXIT_USAGE
    try:
        scripts = [("uninstall.sql", read_sql("uninstall.sql"))] if args.action == "uninstall" else (
            install_script(examples)
        )
        if args.action == "print":
            for name, text in scripts:
                out.write(f"-- sql/{name}\n{text.rstrip()}\n\n")
            return EXIT_OK
        dsn = resolve_sql_dsn(args.dsn)
        check_dsn(dsn)  # a malformed DSN fails here, in words that quote no part of a password
        register_secret(dsn_password(dsn))
    except ConfigError as exc:
        print(f"notifyrelay: {exc}", file=err)
        return EXIT_USAGE
    target = redact_dsn(dsn) if dsn else "the database named by the PG* environment variables"
    try:
        version = asyncio.run(apply(dsn, scripts))
    except Exception as exc:  # the command's boundary: say what failed and where, never the password
        reason = scrub(str(exc)) or type(exc).__name__
        print(f"notifyrelay: sql {args.action} failed on {target}: {reason}", file=err)
        return EXIT_ERROR
    if args.action == "install":
        done = ", ".join(name for name, _ in scripts)
        print(f"notifyrelay: installed SQL version {version} into {target} ({done})", file=out)
    else:
        print(f"notifyrelay: uninstalled the notifyrelay schema from {target}", file=out)
    return EXIT_OK

