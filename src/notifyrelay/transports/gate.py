"""Who may open a websocket or a stream, and what the URL asks for: the same rules on all three transports.

A request passes the gate when the relay is accepting, its ``Origin`` (if any) is allowed, its token (auth mode
``jwt``) is valid, and the relay is under ``max_connections``. A refusal is an HTTP answer with a JSON body
``{"code": ..., "message": ...}``. The query string (``channel``, ``key``, ``since``, ``until``) is read here too.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from http import HTTPStatus
from urllib.parse import parse_qs

import msgspec
import structlog
from websockets.datastructures import Headers

from .. import protocol
from ..auth import Authenticator, Grant, find_token
from ..config import ServerConfig
from ..exceptions import AuthError, ProtocolError
from ..ops.metrics import Metrics
from ..protocol import Subscribe

log = structlog.get_logger("notifyrelay.gate")


@dataclass(slots=True)
class Refusal(Exception):
    """An HTTP answer instead of a websocket or a stream."""

    status: HTTPStatus
    code: str
    message: str
    headers: list[tuple[str, str]] = field(default_factory=list)

    def body(self) -> bytes:
        return msgspec.json.encode({"code": self.code, "message": self.message}) + b"\n"


@dataclass(slots=True)
class Admission:
    """A request that passed the gate: its grant (auth mode jwt) and the subprotocol to echo (a browser token)."""

    grant: Grant | None = None
    subprotocol: str | None = None


@dataclass(slots=True)
class StreamRequest:
    """What a URL asks for: the subscriptions, a resume position, and whether to end when everything is done."""

    subscribes: list[Subscribe]
    since: int | None = None
    until_done: bool = False


def parse_query(query: str, *, max_key_bytes: int, last_event_id: str | None = None) -> StreamRequest:
    """``?channel=C&key=K&key=K2&since=TS&until=done`` as subscribe commands (no key: ``*``; several channels take
    the same keys); raise ProtocolError (a 400) when malformed."""
    params = parse_qs(query, keep_blank_values=True)
    channels = params.get("channel", [])
    keys = params.get("key", [])
    if keys and not channels:
        raise ProtocolError("bad_request", "the query string has key parameters but no channel parameter")
    since_values = params.get("since") or ([last_event_id] if last_event_id else [])
    since = protocol.validate_since(since_values[-1]) if since_values else None
    until = params.get("until", [])
    if until and until != ["done"]:
        raise ProtocolError("bad_request", "until takes one value: until=done")
    subscribes = []
    for channel in channels:
        if not channel:
            raise ProtocolError("bad_request", "the query string's channel parameter is empty")
        wanted = protocol.validate_keys(keys or [protocol.WILDCARD], op="subscribe", max_key_bytes=max_key_bytes)
        subscribes.append(Subscribe(channel=channel, keys=wanted, since=since))
    return StreamRequest(subscribes, since, bool(until))


class Gate:
    """Admission for /ws, /sse and /stream."""

    def __init__(self, settings: ServerConfig, authenticator: Authenticator | None, metrics: Metrics) -> None:
        self.settings = settings
        self.authenticator = authenticator
        self.accepting = True
        self._metrics = metrics

    def admit(self, headers: Headers, target: str, clients: int, peer: str) -> Admission:
        """Admit a request or raise Refusal; each refusal is counted by its reason."""
        if not self.accepting:
            raise self._refuse("shutting_down", HTTPStatus.SERVICE_UNAVAILABLE, "shutting_down",
                               "the relay is shutting down; reconnect to another instance or retry shortly")
        if not self.origin_allowed(headers):
            raise self._refuse("origin", HTTPStatus.FORBIDDEN, "forbidden", "origin not allowed")
        admission = Admission()
        if self.authenticator is not None:
            found = None
            try:
                found = find_token(headers, target)
                admission.grant = self.authenticator.authenticate(found.token if found else None)
            except AuthError as exc:
                self._metrics.auth_failures.labels(exc.reason).inc()
                # Never the token itself: the reason and where it came from are enough to debug a client.
                log.info("server.auth_failed", reason=exc.reason, source=found.source if found else None, remote=peer)
                raise self._refuse(
                    "unauthorized", HTTPStatus.UNAUTHORIZED, "unauthorized", exc.message,
                    [("WWW-Authenticate", 'Bearer realm="notifyrelay", error="invalid_token"')],
                ) from None
            admission.subprotocol = found.subprotocol if found else None
        if clients >= self.settings.max_connections:
            self._metrics.limit_hits["max_connections"].inc()
            raise self._refuse("capacity", HTTPStatus.SERVICE_UNAVAILABLE, "over_capacity",
                               "too many connections, try later", [("Retry-After", "5")])
        return admission

    def origin_allowed(self, headers: Headers) -> bool:
        origins = headers.get_all("Origin")  # get() would raise on a repeated header
        allowed = self.settings.allowed_origins
        if len(origins) > 1:
            return False
        return not (allowed and origins and origins[0] not in allowed)

    def cors_headers(self, headers: Headers) -> list[tuple[str, str]]:
        """CORS for a browser on another origin (EventSource, fetch of /stream), when its origin is allowed."""
        origins = headers.get_all("Origin")
        if len(origins) != 1 or not self.origin_allowed(headers):
            return []
        return [("Access-Control-Allow-Origin", origins[0]), ("Vary", "Origin")]

    def _refuse(
        self, reason: str, status: HTTPStatus, code: str, message: str, headers: Sequence[tuple[str, str]] = (),
    ) -> Refusal:
        self._metrics.handshake_rejections.labels(reason).inc()
        return Refusal(status, code, message, list(headers))


def headers_of(raw: Sequence[tuple[bytes, bytes]]) -> Headers:
    """h11's header list as websockets' Headers (which the auth helpers and the websocket handshake read)."""
    headers = Headers()
    for name, value in raw:
        headers[name.decode("latin-1")] = value.decode("latin-1")
    return headers

