"""Composition root: builds every layer, merges the features' ops tables, starts and stops the listeners.

Nothing below this module knows the features: the hub gets their merged ``ops`` table and the hooks they
register for a session's open and close, a removed user, the start, and their broker channels. Adding an
op means adding it to its feature's ``ops`` (and to docs/protocol.md); adding a feature means building it in
``Node.__init__``, merging its ``ops`` and registering its hooks there.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import secrets
import socket
import ssl
from types import ModuleType
from typing import Any

from . import __version__
from ._fastpath import IMPLEMENTATION, listener_impl
from .admin_api import admin_handler
from .auth import TokenAuthority, load_or_create_secret
from .broker import FIRST_ACK_SETTLED, open_broker
from .config import ConfigError, Settings
from .contracts import Handler
from .devices import Devices
from .errors import CloseCode
from .hub import Hub
from .inbox import INBOX_DOORBELL
from .login import Login
from .messaging import Messaging
from .metrics import build_registry
from .pairing import PAIRING_REQUESTS, Pairing
from .protocol import WS_PATH
from .rpc import RESULTS as RPC_RESULTS
from .rpc import Rpc
from .session import Session
from .state import CHANGES as STATE_CHANGES
from .state import State
from .store import is_store_url, open_store
from .store.base import url_without_password
from .tasks import HANDOFFS, Tasks
from .transport.console import console_handler
from .transport.handshake import create_ws_server
from .transport.http import HttpServer, http_router
from .transport.ws import ServerConnection

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


SERVE_LOCK_FILE = "rccs.serve.lock"


def store_description(store: str) -> str:
    """The store setting as it may be logged: a URL's password left out."""
    return url_without_password(store) if is_store_url(store) else store


class DataDirLock:
    """One ``rccs serve`` per SQLite data directory: an exclusive lock on a file in it, held while serving.

    A second server on the same directory would keep its own sessions and routing table and never see the
    first one's devices (sends between them would answer ``offline``), so it refuses to start. The CLI's
    other commands do not take the lock: they work on the store beside a running server by design.
    """

    def __init__(self, data_dir: str):
        self.directory = data_dir
        self.path = os.path.join(data_dir, SERVE_LOCK_FILE)
        self._fd: int | None = None

    def acquire(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise ConfigError(
                f"another rccs server is serving the data directory {self.directory!r}: one directory serves "
                "one process; to run several nodes, give each the same --store redis://HOST:PORT/DB") from None
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the lock
            self._fd = None


def merge_ops(*tables: dict[str, Handler]) -> dict[str, Handler]:
    """One table from the features' own; an op claimed twice is a wiring mistake, refused at start."""
    merged: dict[str, Handler] = {}
    for table in tables:
        for name, handler in table.items():
            if name in merged:
                raise ValueError(f"op {name!r} is handled by two features")
            merged[name] = handler
    return merged


class Node:
    """One rccs server process: ``await start()``, then ``await stop()``."""

    def __init__(self, settings: Settings, listener: ModuleType | None = None):
        """``listener`` is the module whose ServerConnection serves WebSocket connections: the fast path's
        choice by default; tests pass one twin or the other to compare them on the same traffic."""
        self.settings = settings
        self._listener = listener or listener_impl
        self.ssl_context = server_ssl_context(settings)  # first: a bad certificate fails before anything is written
        self.shared_store = is_store_url(settings.store)
        self.node_id = settings.node_id or f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"
        # A cluster's nodes share the store's secret (read at start); one node keeps it in its data directory.
        if settings.token_secret:
            secret = settings.token_secret.encode()
        elif self.shared_store:
            secret = secrets.token_bytes(32)  # replaced by the store's at start, before anything is verified
        else:
            secret = load_or_create_secret(settings.data_dir)
        self.tokens = TokenAuthority(secret)
        self.store = open_store(settings.store, settings.data_dir)
        self.broker = open_broker(settings.store if self.shared_store else "memory", self.node_id)
        hub = self.hub = Hub(settings, self.tokens, self.store, self.broker)
        hub.node_id = self.node_id
        self.messaging = Messaging(hub, hub.router, hub.deliveries)
        self.login = Login(hub)
        self.devices = Devices(hub)
        self.pairing = Pairing(hub)
        self.rpc = Rpc(hub)
        self.tasks = Tasks(hub)
        self.state = State(hub, self.tasks.fenced)
        hub.login = self.login
        hub.ops = merge_ops(self.messaging.ops, self.login.ops, self.devices.ops, self.pairing.ops, self.rpc.ops,
                            self.state.ops, self.tasks.ops)
        hub.hello_ops = merge_ops(self.pairing.hello_ops)
        # The order of the close hooks is the order a connection's calls, documents and handoffs are settled.
        hub.on_close += [self.rpc.on_close, self.state.on_close, self.tasks.on_close]
        hub.on_open.append(self.tasks.on_open)
        hub.on_abandon.append(self.pairing.on_abandon)
        hub.on_user_removed.append(self.tasks.forget_user)
        hub.on_device_gone += [self.state.on_device_gone, self.tasks.on_device_gone]
        hub.on_start.append(self.tasks.on_start)
        hub.on_event[STATE_CHANGES] = self.state.on_change
        hub.on_event[INBOX_DOORBELL] = hub.deliveries.ring
        hub.on_event[PAIRING_REQUESTS] = self.pairing.on_event
        hub.deliver_remote_message = self.messaging.deliver_from_elsewhere
        hub.on_event[FIRST_ACK_SETTLED] = self.messaging.on_first_ack_settled
        hub.on_event[RPC_RESULTS] = self.rpc.on_result_from_elsewhere
        hub.on_event[HANDOFFS] = self.tasks.on_event
        self.registry = build_registry(hub, lambda: len(self.pairing.requests))
        self._ws_server: asyncio.Server | None = None
        self._http_server: HttpServer | None = None
        self._ready = False
        self._coalescer = self._listener.WriteCoalescer()
        self._data_dir_lock = DataDirLock(settings.data_dir) if settings.store == "sqlite" else None

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
        """Started, not draining, and (on several nodes) Redis reachable: a load balancer sends devices
        elsewhere while a node could not keep what they send."""
        return self._ready and self.hub.accepting and self.hub.broker.available

    def _accept(self, request: Any) -> ServerConnection | None:
        if request.path.split(b"?", 1)[0] != WS_PATH.encode():
            return None  # picows answers 404
        connection: ServerConnection = self._listener.ServerConnection(self.hub, self._coalescer, Session)
        return connection

    async def start(self) -> None:
        settings = self.settings
        if self._data_dir_lock is not None:
            self._data_dir_lock.acquire()
        try:
            await self._start(settings)
        except BaseException:
            if self._data_dir_lock is not None:
                self._data_dir_lock.release()
            raise

    def _count_refused_upgrade(self, reason: str) -> None:
        self.hub.events[reason] += 1

    async def _start(self, settings: Settings) -> None:
        await self.store.open()
        if self.shared_store and not settings.token_secret:
            self.tokens = self.hub.tokens = TokenAuthority(await self.store.token_secret())
        await self.broker.start()
        await self.hub.start()
        tls: dict[str, Any] = {} if self.ssl_context is None else {
            "ssl": self.ssl_context, "ssl_handshake_timeout": settings.hello_timeout}
        self._ws_server = await create_ws_server(
            self._accept,
            settings.host,
            settings.port,
            max_frame_size=settings.max_message_bytes,
            # picows' per-connection receive buffer starts at 16 KiB; most envelopes are far smaller and
            # the buffer grows on demand, so start small to keep idle devices cheap.
            read_buffer_init_size=2048,
            use_aiofastnet=settings.socket_transport == "aiofastnet",
            websocket_handshake_timeout=settings.hello_timeout,
            auto_ping_idle_timeout=settings.heartbeat,
            auto_ping_reply_timeout=settings.heartbeat,
            logger_name="rccs.picows",
            # The default accept backlog (100) overflows when many devices reconnect at once
            # (e.g. after a restart); a dropped SYN costs the client a 1 s retransmit.
            backlog=2048,
            on_refused=self._count_refused_upgrade,
            **tls,
        )
        self._http_server = HttpServer(
            http_router(self.registry, self.is_ready, admin_handler(
                self.hub, settings.admin_key, self.is_ready, self.messaging, self.pairing, self.tasks),
                console_handler(lambda: self.ws_port, self.ssl_context is not None, settings.public_url)))
        await self._http_server.start(settings.http_host, settings.http_port, self.ssl_context)
        self._ready = True
        log.info(
            "rccs %s fastpath=%s listening on %s, http on %s, admin API %s, data dir %s, store %s, node %s",
            __version__, IMPLEMENTATION, self.ws_url, self.http_url, "on" if settings.admin_key else "off",
            settings.data_dir, store_description(settings.store), self.node_id,
        )

    async def stop(self) -> None:
        """Stop accepting, close every connection with 1001 (going away), close the listeners, save sessions."""
        self._ready = False
        self.hub.accepting = False
        if self._ws_server is not None:
            self._ws_server.close()
        self.tasks.abort_all("shutdown")
        self.hub.close_all(CloseCode.GOING_AWAY, "server shutting down")
        if self._ws_server is not None:
            await self._ws_server.wait_closed()
        if self._http_server is not None:
            self._http_server.close()
            await self._http_server.wait_closed()
        # Sessions closed by the shutdown stay resumable: written down with their unacked messages.
        await self.hub.stop()
        await self.broker.stop()
        await self.store.close()
        if self._data_dir_lock is not None:
            self._data_dir_lock.release()
        log.info("rccs stopped")

    async def __aenter__(self) -> Node:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.stop()
