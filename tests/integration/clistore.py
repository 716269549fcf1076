"""For the CLI tests: run one operation on the SQLite store of a data directory, as the CLI does."""

import asyncio
import time

from rccs.store import open_store


def with_store(data_dir, operation):
    async def run():
        store = open_store("sqlite", data_dir)
        await store.open()
        try:
            return await operation(store)
        finally:
            await store.close()

    return asyncio.run(run())


def now_ms():
    return int(time.time() * 1000)
