"""The HTTP side: ``/healthz``, ``/readyz``, ``/metrics``, the web console (``/console/``) and, when an admin
key is set, the admin API.

A small asyncio HTTP/1.1 server on top of h11 (a sans-I/O HTTP/1.1 protocol
implementation: it parses and frames, this module does the I/O). One task per
connection reads a request (head and body), hands it to a handler coroutine
and writes the response; connections are kept alive between requests.

Limits: request heads up to ``MAX_HEAD_BYTES`` (else 431), bodies up to
``max_body_bytes`` (1 MiB: else 413 and the connection is closed), a whole
request within ``request_timeout`` once its head arrived, and an idle
keep-alive connection is closed after ``idle_timeout``. Anything h11 cannot
parse is answered 400 and the connection closed. With an ``ssl`` context the
listener speaks HTTPS only.

Never logged: request headers (the admin API's bearer key travels in one) and bodies.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import http
import json
import logging
import ssl
import time
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import h11

from ..metrics import CONTENT_TYPE, render

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

log = logging.getLogger("rccs.http")

TEXT = "text/plain; charset=utf-8"
JSON_TYPE = "application/json"
MAX_BODY_BYTES = 1024 * 1024
MAX_HEAD_BYTES = 16 * 1024
READ_CHUNK = 64 * 1024
REQUEST_TIMEOUT = 10.0  # seconds to receive a whole request once its first bytes came
IDLE_TIMEOUT = 30.0  # seconds a kept-alive connection may wait for its next request
CLOSE_GRACE = 5.0  # seconds wait_closed() gives requests in progress before cancelling them
LINGER_TIMEOUT = 2.0  # seconds a refused upload may go on being read (and dropped) before the close


@dataclasses.dataclass
class Request:
    method: str  # upper case, as sent
    target: str  # the request target as sent (path and query)
    path: str  # the target's path, not percent-decoded
    query: str  # the target's query string, not decoded
    headers: list[tuple[str, str]]  # names lower-cased
    body: bytes
    peer: str

    def header(self, name: str) -> list[str]:
        """Every value of header ``name`` (lower case)."""
        return [value for key, value in self.headers if key == name]

    def query_params(self) -> dict[str, list[str]]:
        """The query decoded (``+`` is a space); raises ValueError for a malformed one."""
        return urllib.parse.parse_qs(self.query, keep_blank_values=True, strict_parsing=bool(self.query),
                                     errors="strict", max_num_fields=64)


@dataclasses.dataclass
class Response:
    status: int
    body: bytes = b""
    content_type: str = TEXT
    headers: tuple[tuple[str, str], ...] = ()
    close: bool = False  # close the connection after this response


def text_response(status: int, text: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    return Response(status, text.encode(), TEXT, headers)


def json_response(status: int, value: Any, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    body = json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()
    return Response(status, body, JSON_TYPE, headers)


def json_error(status: int, code: str, message: str, headers: tuple[tuple[str, str], ...] = ()) -> Response:
    """The admin API's error shape: ``{"error": {"code": .., "message": ..}}``."""
    return json_response(status, {"error": {"code": code, "message": message}}, headers)


Handler = Callable[[Request], Awaitable[Response]]


class _BodyTooLarge(Exception):
    """The request body passed the limit: answered 413."""


class _Connection:
    __slots__ = ("busy", "writer")

    def __init__(self, writer: asyncio.StreamWriter):
        self.writer = writer
        self.busy = False  # between the first bytes of a request and the end of its response


class HttpServer:
    """An HTTP/1.1 listener serving one handler. ``await start(...)``, then ``close()`` and ``wait_closed()``."""

    def __init__(self, handler: Handler, *, max_body_bytes: int = MAX_BODY_BYTES,
                 request_timeout: float = REQUEST_TIMEOUT, idle_timeout: float = IDLE_TIMEOUT):
        self.handler = handler
        self.max_body_bytes = max_body_bytes
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self._server: asyncio.Server | None = None
        self._connections: dict[asyncio.Task[Any], _Connection] = {}
        self._closing = False

    async def start(self, host: str, port: int, ssl_context: ssl.SSLContext | None = None) -> None:
        self._server = await asyncio.start_server(
            self._serve, host, port, ssl=ssl_context,
            ssl_handshake_timeout=self.request_timeout if ssl_context is not None else None,
            limit=READ_CHUNK, backlog=512,
        )

    @property
    def sockets(self) -> tuple[Any, ...]:
        assert self._server is not None
        return tuple(self._server.sockets)

    def close(self) -> None:
        """Stop listening; idle keep-alive connections are closed now, busy ones after their response."""
        self._closing = True
        if self._server is not None:
            self._server.close()
        for connection in list(self._connections.values()):
            if not connection.busy:
                connection.writer.transport.abort()

    async def wait_closed(self) -> None:
        tasks = list(self._connections)
        if tasks:
            _, pending = await asyncio.wait(tasks, timeout=CLOSE_GRACE)
            for task in pending:
                task.cancel()
            if pending:
                await asyncio.wait(pending)
        if self._server is not None:
            await self._server.wait_closed()

    # ---- one connection ------------------------------------------------

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        connection = _Connection(writer)
        self._connections[task] = connection
        peername = writer.get_extra_info("peername")
        peer = f"{peername[0]}:{peername[1]}" if isinstance(peername, tuple) else str(peername)
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEAD_BYTES)
        try:
            while not self._closing:
                if not await self._one_exchange(conn, connection, reader, writer, peer):
                    break
                try:
                    conn.start_next_cycle()
                except h11.LocalProtocolError:
                    break
        except (ConnectionError, asyncio.IncompleteReadError, ssl.SSLError):
            pass  # the client went away mid-exchange
        except Exception:
            log.exception("HTTP connection from %s failed", peer)
        finally:
            del self._connections[task]
            if self._closing:
                writer.transport.abort()
            else:
                writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()

    async def _one_exchange(self, conn: h11.Connection, connection: _Connection, reader: asyncio.StreamReader,
                            writer: asyncio.StreamWriter, peer: str) -> bool:
        """Read one request, answer it; False when the connection is to be closed."""
        loop = asyncio.get_running_loop()
        event: Any = None
        started = 0.0
        try:
            try:
                async with asyncio.timeout(self.idle_timeout) as deadline:

                    def request_started() -> None:  # its first bytes: the whole request must follow in time
                        nonlocal started
                        connection.busy = True
                        started = time.perf_counter()
                        deadline.reschedule(loop.time() + self.request_timeout)

                    event = await self._next_event(conn, reader, request_started)
                    if not isinstance(event, h11.Request):
                        return False  # the client closed the connection between requests
                    if not connection.busy:  # pipelined: its bytes came with the previous request
                        request_started()
                    body = await self._read_body(conn, reader, event, writer)
            except TimeoutError:
                if connection.busy:  # idle connections are closed without a word
                    method = event.method if isinstance(event, h11.Request) else b"GET"
                    await self._send(conn, writer, text_response(408, "request timeout\n"), method, close=True)
                return False
        except h11.RemoteProtocolError as exc:
            if conn.our_state in (h11.IDLE, h11.SEND_RESPONSE):
                status = exc.error_status_hint if 400 <= exc.error_status_hint < 500 else 400
                await self._send(conn, writer, text_response(status, "bad request\n"), b"GET", close=True)
            return False
        except _BodyTooLarge:
            response = json_error(413, "too_large", f"request body over {self.max_body_bytes} bytes")
            await self._send(conn, writer, response, b"GET", close=True)
            await self._linger(reader, writer)
            return False
        if event.http_version != b"1.1":  # HTTP/1.0 (no keep-alive, no Host) is not served: said in the docs
            await self._send(conn, writer, text_response(400, "HTTP/1.1 only\n"), event.method, close=True)
            return False
        request = Request(
            method=event.method.decode("ascii", "replace"),
            target=event.target.decode("ascii", "replace"),
            path="", query="",
            headers=[(name.decode("latin-1").lower(), value.decode("latin-1")) for name, value in event.headers],
            body=body,
            peer=peer,
        )
        request.path, _, request.query = request.target.partition("?")
        try:
            response = await self.handler(request)
        except Exception:
            log.exception("HTTP handler failed for %s %s", request.method, request.path)
            response = json_error(500, "internal", "internal server error") \
                if request.path.startswith("/admin/") else text_response(500, "internal server error\n")
        keep = await self._send(conn, writer, response, event.method, close=response.close or self._closing)
        connection.busy = False
        if log.isEnabledFor(logging.DEBUG):
            log.debug("%s %s %s -> %d in %.1f ms", peer, request.method, request.path, response.status,
                      (time.perf_counter() - started) * 1000)
        return keep

    async def _linger(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """After refusing a body mid-upload: stop writing, then read and drop what the client still sends for a
        moment, so that closing does not reset the connection before the client has read the answer."""
        if writer.can_write_eof():
            writer.write_eof()
        with contextlib.suppress(TimeoutError, ConnectionError):
            async with asyncio.timeout(LINGER_TIMEOUT):
                dropped = 0
                while dropped <= 4 * self.max_body_bytes:
                    data = await reader.read(READ_CHUNK)
                    if not data:
                        break
                    dropped += len(data)

    async def _next_event(self, conn: h11.Connection, reader: asyncio.StreamReader,
                          on_first_data: Callable[[], None] | None = None) -> Any:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(READ_CHUNK)
                if data and on_first_data is not None:
                    on_first_data()
                    on_first_data = None
                conn.receive_data(data)
                continue
            return event

    async def _read_body(self, conn: h11.Connection, reader: asyncio.StreamReader, request: h11.Request,
                         writer: asyncio.StreamWriter) -> bytes:
        for name, value in request.headers:
            if name == b"content-length" and int(value) > self.max_body_bytes:
                raise _BodyTooLarge
        if conn.they_are_waiting_for_100_continue:
            writer.write(conn.send(h11.InformationalResponse(status_code=100, headers=[])) or b"")
        chunks: list[bytes] = []
        size = 0
        while True:
            event = await self._next_event(conn, reader)
            if isinstance(event, h11.Data):
                size += len(event.data)
                if size > self.max_body_bytes:
                    raise _BodyTooLarge
                chunks.append(bytes(event.data))
            elif isinstance(event, h11.EndOfMessage):
                return b"".join(chunks)
            elif isinstance(event, h11.ConnectionClosed):
                raise ConnectionResetError("client closed mid-request")

    async def _send(self, conn: h11.Connection, writer: asyncio.StreamWriter, response: Response, method: bytes,
                    close: bool) -> bool:
        """Write a response; True if the connection may serve another request."""
        # Nothing is cached unless the response says otherwise (the console's files do).
        own_cache_control = any(name.lower() == "cache-control" for name, _ in response.headers)
        headers = [
            ("Content-Type", response.content_type),
            ("Content-Length", str(len(response.body))),
            *(() if own_cache_control else (("Cache-Control", "no-store"),)),
            *response.headers,
        ]
        if close:
            headers.append(("Connection", "close"))
        try:
            reason = http.HTTPStatus(response.status).phrase.encode()
        except ValueError:
            reason = b""
        try:
            data = conn.send(h11.Response(status_code=response.status, headers=headers, reason=reason)) or b""
            if method != b"HEAD" and response.body:
                data += conn.send(h11.Data(data=response.body)) or b""
            data += conn.send(h11.EndOfMessage()) or b""
        except h11.LocalProtocolError:
            log.debug("cannot send a response in state %s", conn.our_state)
            return False
        writer.write(data)
        await writer.drain()
        return conn.our_state is h11.DONE and conn.their_state is h11.DONE and not close


def http_router(registry: CollectorRegistry, is_ready: Callable[[], bool],
                admin: Handler | None = None, console: Handler | None = None) -> Handler:
    """The request handler: health, readiness and metrics (GET only, as always), ``/admin/`` to ``admin``,
    ``/console/`` to ``console`` (the web console's files)."""

    async def route(request: Request) -> Response:
        path = request.path
        if path == "/admin" or path.startswith("/admin/"):
            if admin is None:
                return text_response(404, "not found\n")  # the admin API is off: nothing is there
            return await admin(request)
        if console is not None and (path == "/console" or path.startswith("/console/")):
            return await console(request)
        if request.method != "GET":
            return text_response(405, "only GET is supported\n", (("Allow", "GET"),))
        if path == "/healthz":
            return text_response(200, "ok\n")
        if path == "/readyz":
            if is_ready():
                return text_response(200, "ready\n")
            return text_response(503, "not ready\n")
        if path == "/metrics":
            return Response(200, render(registry), CONTENT_TYPE)
        return text_response(404, "not found\n")

    return route
