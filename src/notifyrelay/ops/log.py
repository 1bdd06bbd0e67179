"""Structured logging: JSON lines when stderr is not a terminal, readable console output when it is.

Event names are dotted and stable (``listener.reconnect_scheduled``). The stdlib loggers of asyncpg and websockets
go through the same pipeline. Secrets (the DSN's password, tokens) are scrubbed from every line.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import Any
from urllib.parse import unquote

import structlog
from structlog.typing import EventDict, WrappedLogger

from ..config import redact_dsn

_secrets: set[str] = set()
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_QUERY_TOKEN = re.compile(r"(?i)([?&]token=)[^&\s\"]+")
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]*")  # a JWT wherever it appears


def register_secret(secret: str) -> None:
    """Never print this string (a password, a token) in any log line, nor its percent-decoded form (from a URL)."""
    for form in (secret, unquote(secret)):
        if form and len(form) >= 4:
            _secrets.add(form)


def scrub(text: str) -> str:
    for secret in _secrets:
        if secret in text:
            text = text.replace(secret, "***")
    text = redact_dsn(text)
    text = _BEARER.sub(r"\1***", text)
    text = _QUERY_TOKEN.sub(r"\1***", text)
    return _JWT.sub("***", text)


def _scrub_value(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, BaseException):
        return scrub(str(value))
    if isinstance(value, dict):
        return {key: _scrub_value(item) for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_scrub_value(item) for item in value]
    return value


def _scrub_event(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    for key, value in event_dict.items():
        if not key.startswith("_"):  # structlog's own bookkeeping (_record, _from_structlog) stays as is
            event_dict[key] = _scrub_value(value)
    return event_dict


def configure_logging(level: str = "info", fmt: str = "auto", *, stream: Any = None) -> None:
    """Set up structlog and route the stdlib loggers (asyncpg, websockets) through it."""
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
        _scrub_event,
    ]
    renderer: Any = (
        structlog.processors.JSONRenderer() if use_json else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        # Library records get the same chain: their exceptions rendered to text (then scrubbed), not repr'd tuples.
        foreign_pre_chain=[*shared[:-2], structlog.stdlib.ExtraAdder(), *shared[-2:]],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    handler = logging.StreamHandler(stream)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    root.handlers[:] = [handler]
    set_level(level)


def set_level(level: str) -> None:
    """Change the level live (SIGHUP reload). Libraries stay one notch quieter: their info is per-connection noise."""
    numeric = logging.getLevelName(level.upper())
    logging.getLogger().setLevel(numeric)
    for noisy in ("websockets", "asyncpg"):
        logging.getLogger(noisy).setLevel(max(numeric, logging.WARNING))
