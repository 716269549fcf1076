"""Composition root: builds the hub, the WebSocket and HTTP listeners, starts and stops them."""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

from picows import WSAutoPingStrategy, ws_create_server

from . import __version__, tasks
from ._fastpath import IMPLEMENTATION
from .admin_api import admin_handler
from .auth import TokenAuthority, load_or_create_secret
from .config import ConfigError, Settings
from .errors import CloseCode
from .hub import Hub
from .metrics import build_registry
from .protocol import WS_PATH
from .session import Session
from .store import open_store
from .transport.http import HttpServer, http_router
from .transport.ws import ServerConnection, WriteCoalescer

log = logging.getLogger("rccs.node")


def server_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context both listeners use when ``tls_cert`` and ``tls_key`` are set (None: plain TCP)."""
    if not settings.tls_cert and not settings.tls_key:
        return None
    if not settings.tls_cert or not settings.tls_key:
        raise ConfigError("'tls_cert' and 'tls_key' go together: set both (or neither)")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(settings.tls_cert, settings.tls_key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"cannot load the TLS certificate {settings.tls_cert!r} / key {settings.tls_key!r}: "
                          f"{exc}") from None
    return context


class Node:
    """One rccs server process: ``await start()``, then ``await stop()``."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.ssl_context = server_ssl_context(settings)  # first: a bad certificate fails before anything is written
        secret = settings.token_secret.encode() if settings.token_secret else load_or_create_secret(settings.data_dir)
        self.tokens = TokenAuthority(secret)
        self.store = open_store(settings.store, settings.data_dir)
        self.hub = Hub(settings, self.tokens, self.store)
        self.registry = build_registry(self.hub)
        self._ws_server: asyncio.Server | None = None
        self._http_server: HttpServer | None = None
        self._ready = False
        self._coalescer = WriteCoalescer()

    @property
    def ws_port(self) -> int:
        assert self._ws_server is not None
        return int(self._ws_server.sockets[0].getsockname()[1])

    @property
    def http_port(self) -> int:
        assert self._http_server is not None
        return int(self._http_server.sockets[0].getsockname()[1])

    @property
    def ws_url(self) -> str:
        scheme = "ws" if self.ssl_context is None else "wss"
        return f"{scheme}://{self.settings.host}:{self.ws_port}{WS_PATH}"

    @property
    def http_url(self) -> str:
        scheme = "http" if self.ssl_context is None else "https"
        return f"{scheme}://{self.settings.http_host}:{self.http_port}"

    def is_ready(self) -> bool:
        return self._ready and self.hub.accepting

    def _accept(self, request: Any) -> ServerConnection | None:
        if request.path.split(b"?", 1)[0] != WS_PATH.encode():
            return None  # picows answers 404
        return ServerConnection(self.hub, self._coalescer, Session)

    async def start(self) -> None:
        settings = self.settings
        await self.store.open()
        await self.hub.start()
        tls: dict[str, Any] = {} if self.ssl_context is None else {
            "ssl": self.ssl_context, "ssl_handshake_timeout": settings.hello_timeout}
        self._ws_server = await ws_create_server(
            self._accept,
            settings.host,
            settings.port,
            max_frame_size=settings.max_message_bytes,
            # picows' per-connection receive buffer starts at 16 KiB; most envelopes are far smaller and
            # the buffer grows on demand, so start small to keep idle devices cheap.
            read_buffer_init_size=2048,
            websocket_handshake_timeout=settings.hello_timeout,
            enable_auto_ping=True,
            auto_ping_idle_timeout=settings.heartbeat,
            auto_ping_reply_timeout=settings.heartbeat,
            auto_ping_strategy=WSAutoPingStrategy.PING_WHEN_IDLE,
            logger_name="rccs.picows",
            # The default accept backlog (100) overflows when many devices reconnect at once
            # (e.g. after a restart); a dropped SYN costs the client a 1 s retransmit.
            backlog=2048,
            **tls,
        )
        self._http_server = HttpServer(
            http_router(self.registry, self.is_ready, admin_handler(self.hub, settings.admin_key, self.is_ready)))
        await self._http_server.start(settings.http_host, settings.http_port, self.ssl_context)
        self._ready = True
        log.info(
            "rccs %s fastpath=%s listening on %s, http on %s, admin API %s, data dir %s",
            __version__, IMPLEMENTATION, self.ws_url, self.http_url, "on" if settings.admin_key else "off",
            settings.data_dir,
        )

    async def stop(self) -> None:
        """Stop accepting, close every connection with 1001 (going away), close the listeners, save sessions."""
        self._ready = False
        self.hub.accepting = False
        if self._ws_server is not None:
            self._ws_server.close()
        tasks.abort_all(self.hub, "shutdown")
        self.hub.close_all(CloseCode.GOING_AWAY, "server shutting down")
        if self._ws_server is not None:
            await self._ws_server.wait_closed()
        if self._http_server is not None:
            self._http_server.close()
            await self._http_server.wait_closed()
        # Sessions closed by the shutdown stay resumable: written down with their unacked messages.
        await self.hub.stop()
        await self.store.close()
        log.info("rccs stopped")

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
