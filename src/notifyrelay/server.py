"""The websocket endpoint ``/ws`` and the HTTP probes, on the websockets asyncio server.

Plain HTTP requests (probes, metrics, 404s) are answered in ``process_request`` before any handshake. Each
websocket connection gets a welcome, may subscribe from its query string, and then sends frames that are answered
with ack, pong or error frames; a bad frame never closes the connection unless docs/protocol.md says so.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from collections.abc import Iterator
from http import HTTPStatus
from urllib.parse import parse_qs, urlsplit

import msgspec
import structlog
from prometheus_client import CONTENT_TYPE_LATEST
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from . import protocol
from .config import Config, parse_listen
from .exceptions import ProtocolError
from .health import Readiness
from .hub import Client, Hub
from .metrics import Metrics
from .protocol import Command, Ping, Subscribe

log = structlog.get_logger("notifyrelay.server")
WS_PATH = "/ws"
PROBE_PATHS = ("/healthz", "/readyz", "/metrics")


def query_subscriptions(path: str, *, max_key_bytes: int) -> Iterator[Subscribe]:
    """``/ws?channel=C&key=K&key=K2`` as subscribe commands (no key: ``*``); raise ProtocolError when malformed."""
    query = parse_qs(urlsplit(path).query, keep_blank_values=True)
    channels = query.get("channel", [])
    keys = query.get("key", [])
    if keys and not channels:
        raise ProtocolError("bad_request", "the query string has key parameters but no channel parameter")
    for channel in channels:
        if not channel:
            raise ProtocolError("bad_request", "the query string's channel parameter is empty")
        wanted = protocol.validate_keys(
            keys or [protocol.WILDCARD], op="subscribe", max_key_bytes=max_key_bytes
        )
        yield Subscribe(channel=channel, keys=wanted)


class RelayServer:
    """Serves /ws (and the probes, unless ``[admin] listen`` moves them to their own address)."""

    def __init__(self, config: Config, hub: Hub, readiness: Readiness, metrics: Metrics) -> None:
        self.config = config
        self.hub = hub
        self.readiness = readiness
        self.metrics = metrics
        self._servers: list[Server] = []
        self.ws_server: Server | None = None
        self.admin_server: Server | None = None
        # websockets logs every refused request (probes included) at info: keep it to warnings and up.
        self._ws_logger = logging.getLogger("websockets.server")

    # Addresses, once started.

    @property
    def port(self) -> int:
        assert self.ws_server is not None
        return int(next(iter(self.ws_server.sockets)).getsockname()[1])

    @property
    def admin_port(self) -> int | None:
        if self.admin_server is None:
            return None
        return int(next(iter(self.admin_server.sockets)).getsockname()[1])

    @property
    def url(self) -> str:
        host, _ = parse_listen(self.config.server.listen)
        scheme = "wss" if self.config.server.tls_cert_file else "ws"
        host = "127.0.0.1" if host in ("", "0.0.0.0") else host
        host = f"[{host}]" if ":" in host else host
        return f"{scheme}://{host}:{self.port}{WS_PATH}"

    async def start(self) -> None:
        """Bind and start accepting (raises OSError when the address is taken)."""
        settings = self.config.server
        host, port = parse_listen(settings.listen)
        tls = _tls_context(settings.tls_cert_file, settings.tls_key_file)
        admin = self.config.admin.listen
        self.ws_server = await serve(
            self._handle,
            host or None,
            port,
            process_request=self._route,
            compression="deflate" if settings.compression else None,
            max_size=settings.max_message_bytes,
            max_queue=4,
            write_limit=settings.write_high_water_bytes,
            open_timeout=settings.handshake_timeout_s,
            ping_interval=settings.ping_interval_s,
            ping_timeout=settings.ping_timeout_s,
            close_timeout=5,
            ssl=tls,
            logger=self._ws_logger,
            server_header=None,
        )
        self._servers.append(self.ws_server)
        if admin:
            admin_host, admin_port = parse_listen(admin, "admin.listen")
            self.admin_server = await serve(
                self._refuse_websocket, admin_host or None, admin_port, process_request=self._route_admin,
                ssl=tls, logger=self._ws_logger, server_header=None,
            )
            self._servers.append(self.admin_server)

    def stop_accepting(self) -> None:
        """Close the listening sockets; open connections stay."""
        for server in self._servers:
            server.close(close_connections=False)

    async def close(self) -> None:
        for server in self._servers:
            server.close()
        for server in self._servers:
            try:
                await asyncio.wait_for(server.wait_closed(), timeout=10)
            except TimeoutError:
                log.warning("server.close_timeout")
        self._servers.clear()

    # HTTP routing.

    def _probe(self, connection: ServerConnection, path: str) -> Response:
        if path == "/healthz":
            return connection.respond(HTTPStatus.OK, "ok\n")
        if path == "/readyz":
            report = self.readiness.report()
            status = HTTPStatus.OK if report["ready"] else HTTPStatus.SERVICE_UNAVAILABLE
            return _response(connection, status, msgspec.json.encode(report) + b"\n", "application/json")
        return _response(connection, HTTPStatus.OK, self.metrics.exposition(), CONTENT_TYPE_LATEST)

    def _route(self, connection: ServerConnection, request: Request) -> Response | None:
        path = urlsplit(request.path).path
        if path in PROBE_PATHS and not self.config.admin.listen:
            return self._probe(connection, path)
        if path != WS_PATH:
            return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")
        settings = self.config.server
        origin = request.headers.get("Origin")
        if settings.allowed_origins and origin is not None and origin not in settings.allowed_origins:
            self.metrics.handshake_rejections.labels("origin").inc()
            return connection.respond(HTTPStatus.FORBIDDEN, "origin not allowed\n")
        if len(self.hub.clients) >= settings.max_connections:
            self.metrics.handshake_rejections.labels("capacity").inc()
            response = connection.respond(HTTPStatus.SERVICE_UNAVAILABLE, "too many connections, try later\n")
            response.headers["Retry-After"] = "5"
            return response
        return None

    def _route_admin(self, connection: ServerConnection, request: Request) -> Response:
        path = urlsplit(request.path).path
        if path in PROBE_PATHS:
            return self._probe(connection, path)
        return connection.respond(HTTPStatus.NOT_FOUND, "not found\n")

    async def _refuse_websocket(self, connection: ServerConnection) -> None:  # pragma: no cover - never reached
        await connection.close()

    # Websocket connections.

    async def _handle(self, connection: ServerConnection) -> None:
        client = Client(connection)
        self.hub.add(client)
        self.metrics.connections_opened.inc()
        try:
            client.write(
                protocol.welcome(
                    window_ms=self.config.coalesce.window_ms,
                    channels=self.hub.channels,
                    listener_up=self.hub.listener_is_up,
                )
            )
            try:
                for command in query_subscriptions(
                    connection.request.path if connection.request else "", max_key_bytes=self.config.server.max_key_bytes
                ):
                    self._execute(client, command)
            except ProtocolError as exc:
                self._reply_error(client, exc)
            async for message in connection:
                try:
                    command = protocol.parse_frame(message, max_key_bytes=self.config.server.max_key_bytes)
                except ProtocolError as exc:
                    self._reply_error(client, exc)
                else:
                    self._execute(client, command)
                if connection.paused:
                    # The client sends but does not read our answers: stop reading it until it drains.
                    await connection.drain()
        except ConnectionClosed:
            pass
        except Exception:
            log.exception("server.connection_failed", client=client.id)
            await connection.close(1011, "internal error")
        finally:
            self.hub.remove(client)
            self.metrics.connections_closed.labels(str(connection.close_code or 1006)).inc()

    def _execute(self, client: Client, command: Command) -> None:
        if isinstance(command, Ping):
            client.write(protocol.pong(command.id))
            return
        try:
            if isinstance(command, Subscribe):
                self.hub.subscribe(client, command)
            else:
                self.hub.unsubscribe(client, command)
        except ProtocolError as exc:
            self._reply_error(client, exc)
        else:
            client.write(protocol.ack(command))

    def _reply_error(self, client: Client, exc: ProtocolError) -> None:
        self.metrics.client_errors.labels(exc.code).inc()
        client.write(protocol.error(exc.code, exc.message, exc.request_id))


def _response(connection: ServerConnection, status: HTTPStatus, body: bytes, content_type: str) -> Response:
    response = connection.respond(status, "")
    del response.headers["Content-Type"]
    del response.headers["Content-Length"]
    response.headers["Content-Type"] = content_type
    response.headers["Content-Length"] = str(len(body))
    response.headers["Cache-Control"] = "no-store"
    return Response(response.status_code, response.reason_phrase, response.headers, body)


def _tls_context(cert_file: str, key_file: str) -> ssl.SSLContext | None:
    if not cert_file:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    return context
