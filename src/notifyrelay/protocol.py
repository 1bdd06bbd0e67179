"""The relay's protocol: parsing client frames and encoding server frames (pure, no I/O).

Frames are JSON. Encoders return UTF-8 bytes so that one encoded frame can be written to many connections, over
any transport (websocket, SSE, NDJSON frame them differently; transports/framing.py). Every way a client frame
can be wrong maps to a ProtocolError with a documented code and a sentence.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal, Protocol

import msgspec

from .exceptions import ProtocolError

PROTOCOL_VERSION = 2
WILDCARD = "*"
MAX_ID_LENGTH = 128

# Close codes in the private range (RFC 6455 leaves 4000-4999 to applications); docs/protocol.md lists them.
CLOSE_SLOW_CLIENT = 4000
CLOSE_TOKEN_EXPIRED = 4001

_decoder = msgspec.json.Decoder()
_encode = msgspec.json.Encoder().encode


@dataclass(frozen=True, slots=True)
class Subscribe:
    channel: str
    keys: tuple[str, ...]
    id: str | None = None
    op: Literal["subscribe"] = "subscribe"
    since: int | None = None  # a resume position: the last ``ts`` the client saw (Unix ms)


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    channel: str
    keys: tuple[str, ...]
    id: str | None = None
    op: Literal["unsubscribe"] = "unsubscribe"


@dataclass(frozen=True, slots=True)
class Ping:
    id: str | None = None
    op: Literal["ping"] = "ping"


Command = Subscribe | Unsubscribe | Ping


def parse_frame(data: str | bytes, *, max_key_bytes: int) -> Command:
    """Parse one client frame, or raise ProtocolError saying what is wrong with it."""
    if isinstance(data, bytes):
        raise ProtocolError("bad_request", "binary frames are not supported; send JSON as a text frame")
    try:
        frame = _decoder.decode(data)
    except msgspec.DecodeError as exc:
        raise ProtocolError("bad_json", f"the frame is not valid JSON ({exc})") from None
    except RecursionError:
        raise ProtocolError("bad_json", "the frame nests JSON too deeply") from None
    if not isinstance(frame, dict):
        raise ProtocolError("bad_request", "a frame must be a JSON object such as {\"op\": \"ping\"}")
    request_id = frame.get("id")
    if request_id is not None and not (isinstance(request_id, str) and len(request_id) <= MAX_ID_LENGTH):
        raise ProtocolError("bad_request", f"\"id\" must be a string of at most {MAX_ID_LENGTH} characters")
    op = frame.get("op")
    if not isinstance(op, str):
        raise ProtocolError("bad_request", "the frame needs an \"op\" string", request_id=request_id)
    if op == "ping":
        return Ping(id=request_id)
    if op not in ("subscribe", "unsubscribe"):
        raise ProtocolError(
            "unknown_op", f"unknown op {op[:64]!r}; expected subscribe, unsubscribe or ping", request_id=request_id
        )
    channel = frame.get("channel")
    if not isinstance(channel, str) or not channel:
        raise ProtocolError("bad_request", f"{op} needs a non-empty \"channel\" string", request_id=request_id)
    keys = validate_keys(frame.get("keys"), op=op, max_key_bytes=max_key_bytes, request_id=request_id)
    if op == "subscribe":
        since = validate_since(frame.get("since"), request_id)
        return Subscribe(channel=channel, keys=keys, id=request_id, since=since)
    return Unsubscribe(channel=channel, keys=keys, id=request_id)


def validate_keys(keys: Any, *, op: str, max_key_bytes: int, request_id: str | None = None) -> tuple[str, ...]:
    """Check a ``keys`` list; duplicates are dropped, first-seen order kept."""
    if not isinstance(keys, list) or not keys:
        raise ProtocolError(
            "bad_request", f"{op} needs \"keys\": a non-empty list of strings, or [\"*\"] for every key",
            request_id=request_id,
        )
    for key in keys:
        if not isinstance(key, str) or not key:
            raise ProtocolError("bad_request", "every key must be a non-empty string", request_id=request_id)
        if len(key.encode()) > max_key_bytes:
            raise ProtocolError(
                "bad_request", f"a key is longer than the limit of {max_key_bytes} bytes", request_id=request_id,
                limit="max_key_bytes",
            )
    return tuple(dict.fromkeys(keys))


def validate_since(since: Any, request_id: str | None = None) -> int | None:
    """A resume position: a non-negative integer (Unix ms), or None when absent."""
    if since is None:
        return None
    if isinstance(since, str) and since.isascii() and since.isdigit() and len(since) <= 16:
        since = int(since)
    if isinstance(since, bool) or not isinstance(since, int) or not 0 <= since < 2**53:
        raise ProtocolError(
            "bad_request", "\"since\" must be the \"ts\" of a frame you received (Unix milliseconds, an integer)",
            request_id=request_id,
        )
    return since


def _with_id(frame: dict[str, Any], request_id: str | None) -> dict[str, Any]:
    if request_id is not None:
        frame["id"] = request_id
    return frame


def welcome(*, window_ms: int, channels: Sequence[str], listener_up: bool, instance: str) -> bytes:
    return _encode(
        {
            "type": "welcome",
            "protocol": PROTOCOL_VERSION,
            "window_ms": window_ms,
            "channels": list(channels),
            "listener": "up" if listener_up else "down",
            "instance": instance,
        }
    )


def ack(command: Subscribe | Unsubscribe) -> bytes:
    frame = _with_id({"type": "ack", "op": command.op}, command.id)
    frame["channel"] = command.channel
    frame["keys"] = list(command.keys)
    return _encode(frame)


def pong(request_id: str | None) -> bytes:
    return _encode(_with_id({"type": "pong"}, request_id))


def error(code: str, message: str, request_id: str | None = None) -> bytes:
    frame = _with_id({"type": "error"}, request_id)
    frame["code"] = code
    frame["message"] = message
    return _encode(frame)


class Rows(Protocol):
    """Fetched state for a batch's keys (pipeline/state.py's StateResult), as frames carry it."""

    rows: dict[str, Any]
    gone: list[str]
    progress: dict[str, Any] | None
    error: str | None
    error_keys: list[str]


def _add_rows(frame: dict[str, Any], keys: list[str], state: Rows) -> None:
    """Only ``keys``' part of ``state``: a client is never sent a row of a key it does not follow."""
    rows, progress = state.rows, state.progress
    frame["rows"] = {key: rows[key] for key in keys if key in rows}
    if state.gone:
        wanted = set(keys)
        frame["gone"] = [key for key in state.gone if key in wanted]
    if progress is not None:
        frame["progress"] = {key: progress[key] for key in keys if key in progress}
    if state.error is not None:
        frame["state_error"] = state.error
        if state.error_keys:
            wanted = set(keys)
            frame["state_error_keys"] = [key for key in state.error_keys if key in wanted]


def finished(state: Rows | None) -> dict[str, Any] | None:
    """``state``'s progress with its gone keys marked terminal: what ``until=done`` watches (a key whose row is gone
    will never finish, so waiting for it would never end)."""
    if state is None or (state.progress is None and not state.gone):
        return None
    marks: dict[str, Any] = dict(state.progress or {})
    for key in state.gone:
        marks[key] = {"terminal": True, "gone": True}
    return marks


def notify(
    channel: str,
    seq: int,
    ts: int,
    keys: Iterable[str],
    payloads: Mapping[str, Any] | None = None,
    *,
    state: Rows | None = None,
    replay: bool = False,
) -> bytes:
    """A notify frame. ``payloads`` values are strings or ``msgspec.Raw`` JSON, written as they are."""
    keys = list(keys)
    frame: dict[str, Any] = {"type": "notify", "channel": channel, "seq": seq, "ts": ts, "keys": keys}
    if replay:
        frame["replay"] = True
    if payloads is not None:
        frame["payloads"] = {key: payloads[key] for key in keys if key in payloads}
    if state is not None:
        _add_rows(frame, keys, state)
    return _encode(frame)


class NotifyFrames:
    """The notify frames of one batch, one per distinct key set (the hub's fan-out): the fields they share (type,
    channel, seq, ts) are encoded once, so that a frame for one client's keys costs an encode of those keys (and
    their payloads and rows) alone. Byte for byte what ``notify`` gives (tests/unit/test_protocol.py holds them
    together); ``notify`` stays the plain form for single frames and replays."""

    __slots__ = ("_head", "_payloads", "_plain", "_state")

    def __init__(
        self, channel: str, seq: int, ts: int, payloads: Mapping[str, Any] | None = None, *, state: Rows | None = None,
    ) -> None:
        # The object, left open after "keys": (seq and ts are integers, written as JSON writes them).
        self._head = b'{"type":"notify","channel":%s,"seq":%d,"ts":%d,"keys":' % (_encode(channel), seq, ts)
        self._payloads = payloads
        self._state = state
        self._plain = payloads is None and state is None

    def frame(self, keys: list[str]) -> bytes:
        if self._plain:  # a hint channel's live batch: the hot path of fan-out
            return self._head + _encode(keys) + b"}"
        parts = [self._head, _encode(keys)]
        payloads = self._payloads
        if payloads is not None:
            parts += (b',"payloads":', _encode({key: payloads[key] for key in keys if key in payloads}))
        if self._state is not None:
            rows: dict[str, Any] = {}
            _add_rows(rows, keys, self._state)  # never empty: "rows" is always there
            parts += (b",", _encode(rows)[1:-1])
        parts.append(b"}")
        return b"".join(parts)


def snapshot(channel: str, seq: int, ts: int, keys: Iterable[str], state: Rows) -> bytes:
    """The current rows of ``keys`` (after a subscribe, or instead of a resync on a state channel)."""
    frame: dict[str, Any] = {"type": "snapshot", "channel": channel, "seq": seq, "ts": ts}
    _add_rows(frame, list(keys), state)
    frame.setdefault("gone", [])
    return _encode(frame)


def status(listener_up: bool) -> bytes:
    return _encode({"type": "status", "listener": "up" if listener_up else "down"})


def resync(channel: str, reason: str, gap_start: datetime, gap_end: datetime, ts: int) -> bytes:
    return _encode(
        {
            "type": "resync",
            "channel": channel,
            "reason": reason,
            "gap_start": gap_start.isoformat(timespec="milliseconds"),
            "gap_end": gap_end.isoformat(timespec="milliseconds"),
            "ts": ts,
        }
    )


def keepalive() -> bytes:
    """An NDJSON stream's keepalive line (SSE sends a comment line instead)."""
    return b'{"type":"keepalive"}'


def close(code: int, reason: str) -> bytes:
    """The last frame of an SSE or NDJSON stream, saying why it ends (a websocket has its close frame instead)."""
    return _encode({"type": "close", "code": code, "reason": reason})
