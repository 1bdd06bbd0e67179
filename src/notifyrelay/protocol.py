"""The websocket protocol: parsing client frames and encoding server frames (pure, no I/O).

Frames are JSON text. Encoders return UTF-8 bytes so that one encoded frame can be written to many connections.
Every way a client frame can be wrong maps to a ProtocolError with a documented code and a sentence.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import msgspec

from .exceptions import ProtocolError

PROTOCOL_VERSION = 1
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
        return Subscribe(channel=channel, keys=keys, id=request_id)
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


def _with_id(frame: dict[str, Any], request_id: str | None) -> dict[str, Any]:
    if request_id is not None:
        frame["id"] = request_id
    return frame


def welcome(*, window_ms: int, channels: Sequence[str], listener_up: bool) -> bytes:
    return _encode(
        {
            "type": "welcome",
            "protocol": PROTOCOL_VERSION,
            "window_ms": window_ms,
            "channels": list(channels),
            "listener": "up" if listener_up else "down",
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


def notify(channel: str, seq: int, keys: Iterable[str], payloads: Mapping[str, Any] | None = None) -> bytes:
    """A notify frame. ``payloads`` values are strings or ``msgspec.Raw`` JSON, written as they are."""
    keys = list(keys)
    frame: dict[str, Any] = {"type": "notify", "channel": channel, "seq": seq, "keys": keys}
    if payloads is not None:
        frame["payloads"] = {key: payloads[key] for key in keys}
    return _encode(frame)


def status(listener_up: bool) -> bytes:
    return _encode({"type": "status", "listener": "up" if listener_up else "down"})


def resync(channel: str, reason: str, gap_start: datetime, gap_end: datetime) -> bytes:
    return _encode(
        {
            "type": "resync",
            "channel": channel,
            "reason": reason,
            "gap_start": gap_start.isoformat(timespec="milliseconds"),
            "gap_end": gap_end.isoformat(timespec="milliseconds"),
        }
    )
