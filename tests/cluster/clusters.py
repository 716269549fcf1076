"""Clusters for tests: a throw-away redis-server and three `rccs serve` node processes on it."""

import asyncio
import contextlib
import time
import urllib.error
import urllib.request

from rccs import admin
from rccs.auth import TokenAuthority
from rccs.client import Client
from rccs.store import open_store
from rccs.testing import RedisServer, ServerProcess, child_environment

NODES = 3
DEVICES = ("alice-phone", "alice-laptop", "alice-tablet")


class Cluster:
    def __init__(self, redis: RedisServer, nodes: list[ServerProcess], tokens: TokenAuthority):
        self.redis = redis
        self.redis_url = redis.url
        self.nodes = nodes
        self.tokens = tokens
        self.clients: list[Client] = []

    async def connect(self, node: int, user: str, device: str, prepare=None, **options) -> Client:
        """A connected client; ``prepare(client)`` runs before it connects (handlers for what its hello brings)."""
        client = Client(self.nodes[node].ws_url, self.tokens.issue(user, device, 600), {"type": "desktop"},
                        **options)
        self.clients.append(client)
        if prepare is not None:
            prepare(client)
        await client.connect()
        return client

    async def readiness(self, node: int) -> int:
        """The HTTP status of the node's /readyz."""
        def probe() -> int:
            try:
                with urllib.request.urlopen(self.nodes[node].http_url + "/readyz", timeout=5) as response:
                    return int(response.status)
            except urllib.error.HTTPError as refused:
                return refused.code
        return await asyncio.to_thread(probe)

    async def until_readiness(self, status: int, timeout: float = 30.0) -> None:
        """Wait (bounded) until every node's /readyz answers ``status``."""
        deadline = time.monotonic() + timeout
        while True:
            seen = [await self.readiness(n) for n in range(len(self.nodes))]
            if all(code == status for code in seen):
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"/readyz still {seen} after {timeout} s, expected {status} everywhere")
            await asyncio.sleep(0.1)  # polling an HTTP probe: the interval between looks, not synchronisation


    async def until_stored(self, session_id: str, timeout: float = 10.0) -> None:
        """Wait (bounded) until the session's record is in the cluster's store."""
        store = open_store(self.redis_url, "")
        await store.open()
        try:
            deadline = time.monotonic() + timeout
            while await store.get_session(session_id) is None:
                if time.monotonic() > deadline:
                    raise AssertionError(f"session {session_id} not stored after {timeout} s")
                await asyncio.sleep(0.05)  # polling the store: the interval between looks, not synchronisation
        finally:
            await store.close()


@contextlib.asynccontextmanager
async def running_cluster(directory, devices: tuple[str, ...] = DEVICES, **settings: str):
    """A redis-server and NODES node processes with ``settings`` (RCCS_... environment variables); alice's
    ``devices`` are registered before they start."""
    redis_server = RedisServer(directory / "redis")
    url = await redis_server.start()
    # The devices are registered before the nodes start, as `rccs token issue --store` does, so that every
    # node's registry knows them from its first moment.
    store = open_store(url, "")
    await store.open()
    for device in devices:
        await admin.ensure_device_for_token(store, "alice", device, 1)
    tokens = TokenAuthority(await store.token_secret())
    await store.close()
    nodes = []
    for n in range(NODES):
        (directory / f"logs{n}").mkdir()  # each node's output apart: log file names count per ServerProcess
        nodes.append(ServerProcess(directory / f"node{n}", "--store", url, "--node-id", f"n{n}",
                                   env=child_environment(**settings), log_dir=directory / f"logs{n}"))
    await asyncio.gather(*(node.start() for node in nodes))
    running = Cluster(redis_server, nodes, tokens)
    try:
        yield running
    finally:
        for client in running.clients:
            await client.close()
        for node in nodes:
            node.kill()
        redis_server.kill()
        for n, node in enumerate(nodes):  # shown by pytest when the test failed
            print(f"===== node n{n} =====\n{node.logs()}")
