"""The throw-away redis-server the Redis engines' tests use keeps what it acknowledged across a SIGKILL."""

import redis.asyncio as aioredis

from rccs.testing import RedisServer


async def test_an_acknowledged_write_survives_a_sigkill_and_restart(tmp_path):
    server = RedisServer(tmp_path / "redis")
    url = await server.start()
    try:
        client = aioredis.from_url(url)
        await client.set("accepted", "kept")
        await client.aclose()
        port = server.port
        server.kill()
        assert await server.start(port=port) == url
        client = aioredis.from_url(url)
        assert await client.get("accepted") == b"kept"
        await client.aclose()
    finally:
        server.kill()
