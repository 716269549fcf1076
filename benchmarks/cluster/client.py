"""Redis client cost in one process: redis-py's asyncio client, with hiredis or with its pure-Python parser.

    python benchmarks/cluster/client.py --url redis://127.0.0.1:PORT/0 [--no-hiredis] [--seconds 2]

Run by ``run.py`` (part ``client``) once with and once without hiredis per round, against the benchmark's
redis-server. Workloads, each for ``--seconds`` (after a short warm-up), one call at a time and in
pipelines of 50 (what a node does when it batches a loop turn's writes):

* ``script``: ``EVALSHA`` of a small Lua script that writes a hash and answers a 3-element array
  (the shape of an inbox enqueue: an id, a sequence number, a status);
* ``page``: ``LRANGE`` of 100 elements of 200 bytes (the shape of an inbox page on reconnect).

Reported per workload: calls per second and this process's CPU µs per call (``time.process_time``:
what the client costs the node, parser included). One JSON line on stdout.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

SCRIPT = """
redis.call('HSET', KEYS[1], 'body', ARGV[1], 'seq', ARGV[2])
return {ARGV[2], redis.call('HLEN', KEYS[1]), 'accepted'}
"""
PIPELINE = 50


async def measure(name: str, call: Any, seconds: float, per_call: int) -> dict[str, Any]:
    warm_until = time.monotonic() + 0.3
    while time.monotonic() < warm_until:
        await call()
    calls = 0
    cpu0, wall0 = time.process_time(), time.monotonic()
    while time.monotonic() - wall0 < seconds:
        await call()
        calls += per_call
    cpu, wall = time.process_time() - cpu0, time.monotonic() - wall0
    return {"workload": name, "calls": calls, "calls_per_s": calls / wall, "client_us_per_call": cpu * 1e6 / calls}


async def run(args: argparse.Namespace) -> dict[str, Any]:
    import redis.asyncio as aioredis
    import redis.utils

    client = aioredis.Redis.from_url(args.url)
    try:
        script = client.register_script(SCRIPT)
        body = "x" * 64
        page_key = f"{args.prefix}:page"
        await client.delete(page_key)
        await client.rpush(page_key, *(b"y" * 200 for _ in range(100)))
        counter = 0

        async def one_script() -> None:
            nonlocal counter
            counter += 1
            await script(keys=[f"{args.prefix}:m:{counter % 1000}"], args=[body, counter])

        async def many_scripts() -> None:
            nonlocal counter
            pipe = client.pipeline(transaction=False)
            for _ in range(PIPELINE):
                counter += 1
                await script(keys=[f"{args.prefix}:m:{counter % 1000}"], args=[body, counter], client=pipe)
            await pipe.execute()

        async def one_page() -> None:
            await client.lrange(page_key, 0, -1)

        async def many_pages() -> None:
            pipe = client.pipeline(transaction=False)
            for _ in range(PIPELINE):
                pipe.lrange(page_key, 0, -1)
            await pipe.execute()

        results = [
            await measure("script", one_script, args.seconds, 1),
            await measure(f"script x{PIPELINE} pipelined", many_scripts, args.seconds, PIPELINE),
            await measure("page", one_page, args.seconds, 1),
            await measure(f"page x{PIPELINE} pipelined", many_pages, args.seconds, PIPELINE),
        ]
        keys = [key async for key in client.scan_iter(f"{args.prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()
    return {"hiredis": bool(redis.utils.HIREDIS_AVAILABLE), "results": results}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True, help="redis://127.0.0.1:PORT/0")
    parser.add_argument("--no-hiredis", action="store_true", help="make hiredis unimportable: redis-py's own parser")
    parser.add_argument("--seconds", type=float, default=2.0)
    parser.add_argument("--prefix", default="bench-client")
    args = parser.parse_args()
    if not args.url.startswith(("redis://127.", "redis://localhost")):
        parser.error("--url must point at 127.0.0.0/8")
    if args.no_hiredis:
        sys.modules["hiredis"] = None  # type: ignore[assignment]  # before redis-py is imported
    import uvloop

    print(json.dumps(uvloop.run(run(args))), flush=True)


if __name__ == "__main__":
    main()
