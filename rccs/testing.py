"""Run a real rccs server on port 0 inside the current event loop, for tests and examples.

    async with running_server() as server:
        token = server.issue_token("alice", "alice-phone")
        async with Client(server.ws_url, token, {"type": "mobile"}) as phone:
            ...

After the block the server is stopped; ``server.hub`` stays readable so a
test can check that no connection or routing entry was left behind.
"""

from __future__ import annotations

import contextlib
import os
import socket
import tempfile
from collections.abc import AsyncIterator
from typing import Any

from .config import Settings
from .node import Node


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel picks as free; all sockets stay bound until every port is chosen, so they differ.

    For starting ``rccs serve`` as a separate process (benchmarks, load tests); in-process servers use port 0.
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


class RunningServer:
    def __init__(self, node: Node):
        self.node = node
        self.hub = node.hub

    @property
    def ws_url(self) -> str:
        return self.node.ws_url

    @property
    def http_url(self) -> str:
        return self.node.http_url

    def issue_token(self, user: str, device: str, ttl_seconds: float = 3600) -> str:
        return self.node.tokens.issue(user, device, ttl_seconds)


@contextlib.asynccontextmanager
async def running_server(**overrides: Any) -> AsyncIterator[RunningServer]:
    """Start a server on free ports with a throw-away data dir; settings may be overridden."""
    with tempfile.TemporaryDirectory(prefix="rccs-test-") as data_dir:
        # RCCS_STORE=memory runs the suite's servers on the in-memory store instead of SQLite.
        settings = Settings(port=0, http_port=0, data_dir=data_dir, store=os.environ.get("RCCS_STORE", "sqlite"))
        settings = settings.replace(**overrides)
        node = Node(settings)
        await node.start()
        try:
            yield RunningServer(node)
        finally:
            await node.stop()
