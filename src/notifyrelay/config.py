"""Configuration: a TOML file, ``NOTIFYRELAY_*`` environment variables and command-line flags, validated at start.

Precedence is flag > environment > file > default. Validation is msgspec's, so every error names the dotted key;
this module adds the file or variable it came from. ``config.example.toml`` documents every key.
"""

from __future__ import annotations

import ipaddress
import os
import re
import tomllib
from collections.abc import Callable, Mapping
from pathlib import Path
from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin, get_type_hints
from urllib.parse import parse_qs, urlsplit

import msgspec
import tomli_w
from msgspec import Meta, Struct

from .exceptions import ConfigError

PositiveInt = Annotated[int, Meta(ge=1)]
NonNegativeInt = Annotated[int, Meta(ge=0)]
Seconds = Annotated[float, Meta(gt=0)]
# PostgreSQL truncates identifiers past NAMEDATALEN-1 bytes; a longer channel name would LISTEN on another channel.
ChannelName = Annotated[str, Meta(min_length=1, max_length=63)]

ENV_PREFIX = "NOTIFYRELAY_"
# NOTIFYRELAY_WORKER and NOTIFYRELAY_WORKER_DIR: set by the supervisor for its workers (ops/workers.py).
ENV_NOT_CONFIG = {"NOTIFYRELAY_CONFIG", "NOTIFYRELAY_TEST_DSN", "NOTIFYRELAY_HEALTHCHECK_URL",
                  "NOTIFYRELAY_WORKER", "NOTIFYRELAY_WORKER_DIR", "NOTIFYRELAY_EVENT_LOOP"}  # cli.py
ENV_ALIASES = {
    "NOTIFYRELAY_DSN": ("dsn",),
    "NOTIFYRELAY_DSN_FILE": ("dsn_file",),
    "NOTIFYRELAY_LISTEN": ("server", "listen"),
    "NOTIFYRELAY_LOG_LEVEL": ("log", "level"),
    "NOTIFYRELAY_LOG_FORMAT": ("log", "format"),
}


class _Section(Struct, forbid_unknown_fields=True, kw_only=True):
    pass


class ServerConfig(_Section):
    listen: str = "127.0.0.1:8765"
    allowed_origins: list[str] = []
    max_connections: PositiveInt = 10000
    max_subscriptions: PositiveInt = 250
    # Over all connections: what bounds the memory subscriptions take (about 1.6 KiB each at max_key_bytes 1024;
    # docs/security.md has the worst case per connection, measured).
    max_total_subscriptions: PositiveInt = 250_000
    max_message_bytes: Annotated[int, Meta(ge=256)] = 65536
    max_key_bytes: PositiveInt = 1024
    tls_cert_file: str = ""
    tls_key_file: str = ""
    compression: bool = False
    write_high_water_bytes: Annotated[int, Meta(ge=1024)] = 65536
    stall_timeout_s: Seconds = 30.0
    max_pending_keys: PositiveInt = 10000
    ping_interval_s: Seconds = 20.0
    ping_timeout_s: Seconds = 20.0
    handshake_timeout_s: Seconds = 10.0
    # TCP connections not (yet) a websocket or a stream: in their handshake, or idle between keep-alive requests.
    # Past it the oldest is closed. max_connections + max_handshakes + 64 must fit RLIMIT_NOFILE, or no start.
    max_handshakes: PositiveInt = 1024
    # Client frames: a token bucket per connection refilled at rate_limit_per_s, holding rate_limit_burst. A frame
    # finding it empty is answered rate_limited; 3 x rate_limit_burst refused before it refills closes with 1008.
    rate_limit_per_s: Annotated[float, Meta(gt=0)] = 20.0
    rate_limit_burst: PositiveInt = 100
    # SSE and NDJSON streams: a comment line (SSE) or a {"type":"keepalive"} line (NDJSON) this often, so that
    # proxies keep an idle stream open.
    keepalive_s: Seconds = 15.0
    # The live page at /ui (off by default; the demo turns it on).
    ui: bool = False
    # Processes sharing the port (SO_REUSEPORT), each with its own LISTEN connection; 1 is a single process.
    workers: Annotated[int, Meta(ge=1, le=64)] = 1


class AdminConfig(_Section):
    listen: str = ""


class CoalesceConfig(_Section):
    window_ms: NonNegativeInt = 200
    leading_edge: bool = True


class ListenerConfig(_Section):
    heartbeat_interval_s: Seconds = 10.0
    heartbeat_timeout_s: Seconds = 5.0
    connect_timeout_s: Seconds = 5.0
    reconnect_initial_s: Seconds = 0.1
    reconnect_max_s: Seconds = 10.0
    probe_interval_s: Annotated[float, Meta(gt=0, le=1)] = 0.5
    queue_size: Annotated[int, Meta(ge=16)] = 100_000
    application_name: Annotated[str, Meta(min_length=1, max_length=63)] = "notifyrelay"


class AuthConfig(_Section):
    mode: Literal["none", "jwt"] = "none"
    jwt_secret_file: str = ""
    jwt_public_key_file: str = ""
    jwks_file: str = ""
    audience: str = ""
    issuer: str = ""


class LogConfig(_Section):
    level: Literal["debug", "info", "warning", "error"] = "info"
    format: Literal["auto", "json", "console"] = "auto"


class HistoryConfig(_Section):
    """What each process remembers of when keys changed, so that clients resume with ``since``."""

    max_keys: PositiveInt = 100_000
    overlap_ms: NonNegativeInt = 1000


class StateConfig(_Section):
    """The connection pool for state queries (never the LISTEN connection)."""

    dsn: str = ""
    pool_size: Annotated[int, Meta(ge=1, le=100)] = 2


class ChannelStateConfig(_Section):
    """How to fetch the current row of a key: ``table``/``key_column``/``columns``, or a full ``query``."""

    table: str = ""
    key_column: str = "id"
    columns: list[str] = []
    query: str = ""
    list_query: str = ""
    timeout_ms: PositiveInt = 1000
    max_row_bytes: PositiveInt = 8192


class ProgressConfig(_Section):
    """Progress semantics over a state channel's columns."""

    done: str = ""
    total: str = ""
    status: str = ""
    terminal: list[str] = msgspec.field(default_factory=lambda: ["complete", "failed", "cancelled"])
    failed: list[str] = msgspec.field(default_factory=lambda: ["failed"])
    stall_after_s: Seconds = 60.0


class ShutdownConfig(_Section):
    timeout_s: Seconds = 10.0


class ChannelConfig(_Section):
    name: ChannelName
    key: str = "payload"
    include_payload: bool = False
    # A JSON payload field holding when the change was committed (Unix seconds, or ISO 8601; no offset means UTC):
    # feeds notifyrelay_commit_to_delivery_seconds. Empty: not measured.
    commit_time_field: str = ""
    state: ChannelStateConfig | None = None
    progress: ProgressConfig | None = None

    @property
    def json_field(self) -> str | None:
        """The JSON field that holds the key, or None when the whole payload is the key."""
        return self.key[5:] if self.key.startswith("json:") else None


class Config(_Section):
    dsn: str = ""
    dsn_file: str = ""
    server: ServerConfig = msgspec.field(default_factory=ServerConfig)
    admin: AdminConfig = msgspec.field(default_factory=AdminConfig)
    coalesce: CoalesceConfig = msgspec.field(default_factory=CoalesceConfig)
    listener: ListenerConfig = msgspec.field(default_factory=ListenerConfig)
    auth: AuthConfig = msgspec.field(default_factory=AuthConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    shutdown: ShutdownConfig = msgspec.field(default_factory=ShutdownConfig)
    history: HistoryConfig = msgspec.field(default_factory=HistoryConfig)
    state: StateConfig = msgspec.field(default_factory=StateConfig)
    channels: list[ChannelConfig] = []


def parse_listen(value: str, key: str = "server.listen") -> tuple[str, int]:
    """Split ``HOST:PORT`` (``[::1]:PORT`` for IPv6) into its parts, or raise ConfigError naming ``key``."""
    match = re.fullmatch(r"\[([0-9a-fA-F:.]+)\]:(\d{1,5})|([^:\[\]]*):(\d{1,5})", value)
    if not match:
        raise ConfigError(f"expected HOST:PORT (or [IPv6]:PORT), got {value!r}", key=key)
    host = match.group(1) or match.group(3) or "0.0.0.0"
    port = int(match.group(2) or match.group(4))
    if port > 65535:
        raise ConfigError(f"port {port} is out of range (0-65535)", key=key)
    return host, port


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


_URL_PASSWORD = re.compile(r"(://[^:/@?#\s]*:)[^@\s]*@")  # user:password@ (a password may hold / ? #)
_KV_PASSWORD = re.compile(r"(?i)(password\s*=\s*)('(?:[^'\\]|\\.)*'|\S+)")  # password=... in key=value form
_QUERY_PASSWORD = re.compile(r"(?i)([?&]password=)[^&\s]*")


def redact_dsn(text: str) -> str:
    """``text`` with every DSN password in it replaced by ``***`` (URL, query and ``key=value`` forms). Safe on any
    text, a log line included: no pattern reaches past white space."""
    text = _URL_PASSWORD.sub(r"\1***@", text)
    text = _KV_PASSWORD.sub(r"\1***", text)
    return _QUERY_PASSWORD.sub(r"\1***", text)


def dsn_password(dsn: str) -> str:
    """The DSN's password ("" when it has none or cannot be parsed), to register as a secret for the logs."""
    try:
        return urlsplit(dsn).password or ""
    except ValueError:
        return ""


def _env_value(raw: str) -> Any:
    """An environment value as TOML would read it (numbers, booleans, arrays), else the plain string."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def _env_overrides(environ: Mapping[str, str]) -> dict[tuple[str, ...], tuple[Any, str]]:
    overrides: dict[tuple[str, ...], tuple[Any, str]] = {}
    for name, raw in environ.items():
        if not name.startswith(ENV_PREFIX) or name in ENV_NOT_CONFIG:
            continue
        path = ENV_ALIASES.get(name)
        if path is None:
            parts = name[len(ENV_PREFIX) :].lower().split("__")
            if len(parts) != 2 or not all(parts):
                raise ConfigError(
                    "unknown variable; use NOTIFYRELAY_<SECTION>__<KEY>, e.g. NOTIFYRELAY_COALESCE__WINDOW_MS",
                    source=f"environment variable {name}",
                )
            path = (parts[0], parts[1])
        # Strings stay strings where the field is a string (a DSN is not TOML); the rest is read as TOML.
        value = raw if path in {("dsn",), ("dsn_file",)} else _env_value(raw)
        overrides[path] = (value, f"environment variable {name}")
    return overrides


def _literal_values(key: str) -> tuple[Any, ...] | None:
    """The values a Literal-typed key accepts (``auth.mode``, ``channels[0].key``...), or None for other keys."""
    hint: Any = Config
    for part in re.findall(r"[^.\[\]]+|\[\d+\]", key):
        while get_origin(hint) in (Annotated, Union, UnionType):  # Annotated[...], an optional table
            hint = next(arg for arg in get_args(hint) if arg is not type(None))
        if part.startswith("["):
            hint = get_args(hint)[0] if get_origin(hint) is list else None
        elif isinstance(hint, type) and issubclass(hint, Struct):
            hint = get_type_hints(hint, include_extras=True).get(part)
        else:
            return None
    return get_args(hint) if get_origin(hint) is Literal else None  # in the order the code declares them


def _raise_validation(exc: msgspec.ValidationError, source: str, sources: Mapping[str, str]) -> None:
    text = str(exc)
    message, _, where = text.partition(" - at `")
    key = where.rstrip("`").removeprefix("$").lstrip(".") or None
    unknown = re.search(r"unknown field `([^`]+)`", message)
    if unknown:
        key = f"{key}.{unknown.group(1)}" if key else unknown.group(1)
        message = "unknown key"
    enum = re.fullmatch(r"Invalid enum value (.*)", message)
    choices = _literal_values(key) if enum and key else None
    if enum and choices:
        expected = ", ".join(msgspec.json.encode(choice).decode() for choice in choices)
        message = f"invalid value {enum.group(1)}: expected one of {expected}"
    raise ConfigError(message[0].lower() + message[1:], key=key, source=sources.get(key or "", source)) from exc


def load_config(
    path: str | os.PathLike[str] | None = None,
    *,
    environ: Mapping[str, str] | None = None,
    overrides: Mapping[str, Any] | None = None,
) -> Config:
    """Read and validate the configuration. ``overrides`` maps dotted keys (``server.listen``) to flag values."""
    environ = os.environ if environ is None else environ
    source = str(path) if path else "defaults"
    data: dict[str, Any] = {}
    if path:
        try:
            data = tomllib.loads(Path(path).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise ConfigError("configuration file not found", source=source) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read the configuration file: {exc}", source=source) from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"invalid TOML: {exc}", source=source) from None
        try:  # the file alone first, so that an error in it is blamed on it
            msgspec.convert(data, Config)
        except msgspec.ValidationError as exc:
            _raise_validation(exc, source, {})

    sources: dict[str, str] = {}
    layered = dict(_env_overrides(environ))
    for dotted, value in (overrides or {}).items():
        layered[tuple(dotted.split("."))] = (value, f"command-line flag for {dotted}")
    for keys, (value, origin) in layered.items():
        target = data
        for part in keys[:-1]:
            target = target.setdefault(part, {})
            if not isinstance(target, dict):
                raise ConfigError("is not a table", key=part, source=origin)
        target[keys[-1]] = value
        sources[".".join(keys)] = origin
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        _raise_validation(exc, source, sources)
        raise  # pragma: no cover - _raise_validation always raises
    if not path and not config.channels:
        raise ConfigError(
            "no configuration file was given: pass --config PATH or set NOTIFYRELAY_CONFIG to a file that lists the "
            "[[channels]] to relay (config.example.toml documents every key)"
        )
    _check(config, source, sources)
    return config


def _check(config: Config, source: str, sources: Mapping[str, str]) -> None:
    """Rules that span keys or need more than a type."""

    def fail(key: str, message: str) -> None:
        raise ConfigError(message, key=key, source=sources.get(key, source))

    for key, value in (("server.listen", config.server.listen), ("admin.listen", config.admin.listen)):
        if value:
            try:
                parse_listen(value, key)
            except ConfigError as exc:
                fail(key, str(exc).removeprefix(f"{key}: "))
    if not config.channels:
        fail("channels", "at least one [[channels]] entry is required: the relay forwards only configured channels")
    seen: set[str] = set()
    for index, channel in enumerate(config.channels):
        if channel.name in seen:
            fail(f"channels[{index}].name", f"channel {channel.name!r} is configured twice")
        seen.add(channel.name)
        if len(channel.name.encode()) > 63:
            fail(f"channels[{index}].name", "PostgreSQL channel names are at most 63 bytes")
        if channel.key != "payload" and not (channel.key.startswith("json:") and len(channel.key) > 5):
            fail(f"channels[{index}].key", f'expected "payload" or "json:FIELD", got {channel.key!r}')
    for index, channel in enumerate(config.channels):
        _check_state(channel, f"channels[{index}]", fail)
    if config.dsn and config.dsn_file:
        fail("dsn_file", "set either dsn or dsn_file, not both")
    for key, value in (("dsn", config.dsn), ("state.dsn", config.state.dsn)):
        try:
            check_dsn(value, key)
        except ConfigError as exc:
            fail(key, str(exc).removeprefix(f"{key}: "))
    if bool(config.server.tls_cert_file) != bool(config.server.tls_key_file):
        fail("server.tls_key_file", "tls_cert_file and tls_key_file must be set together")
    if config.listener.heartbeat_timeout_s > config.listener.heartbeat_interval_s * 10:
        fail("listener.heartbeat_timeout_s", "must not exceed ten heartbeat intervals")
    if config.listener.reconnect_max_s < config.listener.reconnect_initial_s:
        fail("listener.reconnect_max_s", "must be at least listener.reconnect_initial_s")
    if config.auth.mode == "jwt" and not (
        config.auth.jwt_secret_file or config.auth.jwt_public_key_file or config.auth.jwks_file
    ):
        fail("auth.mode", 'mode "jwt" needs auth.jwt_secret_file, auth.jwt_public_key_file or auth.jwks_file')


def _identifier_problem(name: str) -> str | None:
    """Why ``name`` cannot be a PostgreSQL identifier (it is quoted exactly as written), or None."""
    if not name:
        return "is empty"
    if "\x00" in name:
        return "contains a NUL character"
    if len(name.encode()) > 63:
        return f"{name!r} is longer than PostgreSQL's 63 bytes"
    return None


def _check_state(channel: ChannelConfig, prefix: str, fail: Callable[[str, str], None]) -> None:
    """[channels.state] and [channels.progress]: one form of query, real identifiers, progress over known columns."""
    state, progress = channel.state, channel.progress
    if state is None:
        if progress is not None:
            fail(f"{prefix}.progress", "[channels.progress] needs [channels.state]: progress is read from the row")
        return
    if state.table and state.query:
        fail(f"{prefix}.state.query", "set either table (with key_column and columns) or query, not both")
    if not state.table and not state.query:
        fail(f"{prefix}.state.table", "set table (with key_column and columns) or query")
    if state.table:
        parts = state.table.split(".", 1)
        for part in parts:
            if problem := _identifier_problem(part):
                fail(f"{prefix}.state.table", f"expected TABLE or SCHEMA.TABLE; the name {problem}")
        if problem := _identifier_problem(state.key_column):
            fail(f"{prefix}.state.key_column", f"the column name {problem}")
        if not state.columns:
            fail(f"{prefix}.state.columns", "list the columns to fetch, e.g. [\"status\", \"objects_processed\"]")
        for position, column in enumerate(state.columns):
            if problem := _identifier_problem(column):
                fail(f"{prefix}.state.columns[{position}]", f"the column name {problem}")
            if column == "key":
                fail(f"{prefix}.state.columns[{position}]", "\"key\" names the row's key in frames; write a query "
                     "that renames that column instead")
            if column in state.columns[:position]:
                fail(f"{prefix}.state.columns[{position}]", f"column {column!r} is listed twice")
    elif not re.search(r"\$1(?!\d)", state.query):
        fail(f"{prefix}.state.query", "the query takes the batch's keys as its one parameter: $1::text[]")
    if state.list_query and re.search(r"\$\d", state.list_query):
        fail(f"{prefix}.state.list_query", "list_query takes no parameters")
    if progress is None:
        return
    if not progress.done and not progress.status:
        fail(f"{prefix}.progress", "set done (with total) or status, or both")
    if progress.total and not progress.done:
        fail(f"{prefix}.progress.total", "total needs done")
    for name in ("done", "total", "status"):
        column = getattr(progress, name)
        if column and state.table and column not in state.columns:
            fail(f"{prefix}.progress.{name}", f"column {column!r} is not among {prefix}.state.columns")
    for status in progress.failed:
        if status not in progress.terminal:
            fail(f"{prefix}.progress.failed", f"{status!r} is not a terminal status (progress.terminal)")


_SSLMODES = ("disable", "allow", "prefer", "require", "verify-ca", "verify-full")


def check_dsn(dsn: str, key: str = "dsn", source: str | None = None) -> None:
    """Refuse a malformed DSN at start (and in check-config) rather than retrying it forever. ``source`` is the file
    or variable it came from, for the message."""
    try:
        _check_dsn(dsn, key)
    except ConfigError as exc:
        if source is None:
            raise
        raise ConfigError(str(exc).removeprefix(f"{key}: "), key=key, source=source) from None


def _check_dsn(dsn: str, key: str) -> None:
    if not dsn:
        return  # libpq's PG* variables
    if not re.match(r"postgres(ql)?://", dsn):
        raise ConfigError("expected a URL such as postgresql://user@host:5432/dbname", key=key)
    try:
        parts = urlsplit(dsn)
        parts.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        # Not the parser's words: they can quote part of a password that was not percent-encoded.
        raise ConfigError(
            "malformed DSN: its user:password@host:port part cannot be parsed (percent-encode / ? # @ in a password)",
            key=key,
        ) from None
    for mode in parse_qs(parts.query).get("sslmode", []):
        if mode not in _SSLMODES:
            raise ConfigError(f"sslmode {mode!r} is not one of {', '.join(_SSLMODES)}", key=key)


def read_dsn_file(path: str, *, key: str | None = None, source: str | None = None) -> str:
    """The DSN held in a file (a secret mounted for the relay), or ConfigError naming where the path came from."""
    try:
        return Path(path).read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(f"cannot read the DSN file: {exc.strerror}", key=key, source=source) from None


def resolve_dsn(config: Config) -> str:
    """The DSN to connect with: ``dsn``, else the contents of ``dsn_file``, else "" (libpq's PG* variables).
    Checked with check_dsn, so a malformed one is a ConfigError naming ``dsn`` or ``dsn_file``."""
    if config.dsn_file:
        dsn = read_dsn_file(config.dsn_file, key="dsn_file")
        check_dsn(dsn, "dsn_file", source=config.dsn_file)
        return dsn
    check_dsn(config.dsn, "dsn")
    return config.dsn


def state_dsn(config: Config) -> str:
    """The DSN of the state pool: ``[state] dsn``, else the main one (resolve_dsn)."""
    if config.state.dsn:
        check_dsn(config.state.dsn, "state.dsn")
        return config.state.dsn
    return resolve_dsn(config)


def toml_value(value: Any) -> str:
    """A TOML value on one line, for ``key = VALUE`` (bench/ writes relay configs with it): scalars as tomli-w writes
    them, lists as arrays, dicts as inline tables."""
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(str(key))} = {toml_value(item)}" for key, item in value.items())
        return "{ " + items + " }" if items else "{}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(item) for item in value) + "]"
    return tomli_w.dumps({"v": value}).removeprefix("v = ").rstrip("\n")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_value(key)


def _without_none(value: Any) -> Any:
    """TOML has no null: an unset optional table (``channels.state``) is left out."""
    if isinstance(value, dict):
        return {key: _without_none(item) for key, item in value.items() if item is not None}
    if isinstance(value, list):
        return [_without_none(item) for item in value]
    return value


def to_toml(config: Config) -> str:
    """The effective configuration as TOML (nested tables included), with every DSN password redacted."""
    data = msgspec.to_builtins(config)
    data["dsn"] = redact_dsn(data["dsn"])
    data["state"]["dsn"] = redact_dsn(data["state"]["dsn"])
    return tomli_w.dumps(_without_none(data))
