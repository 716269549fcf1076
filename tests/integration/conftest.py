import asyncio

import pytest

from rccs.client import Client
from rccs.testing import running_server


@pytest.fixture
def server_settings():
    """Override in a test module to change the server's settings."""
    return {}


@pytest.fixture
async def server(server_settings):
    async with running_server(**server_settings) as running:
        yield running


@pytest.fixture
async def connect(server):
    """``await connect(user, device, type=..., capabilities=..., encoding=...)`` -> a connected Client.

    At teardown every client is closed and the hub must be empty again.
    """
    clients: list[Client] = []

    async def _connect(user, device, type="desktop", capabilities=(), encoding="msgpack", **kwargs):
        client = Client(
            server.ws_url,
            server.issue_token(user, device),
            {"type": type, "name": device, "capabilities": list(capabilities)},
            encoding=encoding,
            **kwargs,
        )
        clients.append(client)
        await client.connect()
        return client

    yield _connect
    for client in clients:
        await client.close()
    await asyncio.wait_for(server.hub.wait_idle(), 5)
    assert len(server.hub.routing) == 0
    assert server.hub.routing.count_by_type() == {}
