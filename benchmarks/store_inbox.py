"""Durable inbox throughput: MemoryStore against SqliteStore (a fresh file in a temp dir), under uvloop.

    python benchmarks/store_inbox.py [--seconds 2] [--replay 50000] [--check] [--redis]

``--redis`` adds RedisStore on a throw-away local redis-server (rccs.testing.RedisServer: append-only file,
``appendfsync always``, as production runs it), each run under its own key prefix.

Two workloads, each on a fresh, opened store, awaiting one call at a time as the server does:

    enqueue xN   ``enqueue`` of N messages per call (one transaction: the group commit), spread over
                 100 devices of one user, 200-byte bodies, caps far away; runs for ``--seconds``;
                 reports messages stored per second
    replay       one device's inbox filled with ``--replay`` messages (200-byte bodies, not timed),
                 then drained as a reconnecting device is: ``inbox(device, now, limit=1000)`` reads
                 the first page, ``remove_queued`` deletes it (the acks), until the inbox is empty;
                 reports messages per second

The SQLite store runs as in production: WAL, synchronous=NORMAL (a commit survives the process
crashing, not the machine losing power), one transaction and one thread hop per call.

Targets for SqliteStore: 20,000 messages/s enqueued at batches of 100; 50,000 messages/s replayed.
With ``--check`` the exit status is 1 when one is missed.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import uvloop

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout: use this tree's rccs
    sys.path.insert(0, str(REPO))
from rccs.store import (  # noqa: E402
    OVERFLOW_REJECT,
    DeviceRecord,
    MemoryStore,
    QueuedMessage,
    SqliteStore,
    Store,
    UserRecord,
)

NOW = 1_700_000_000_000
DEVICES = 100
BODY = b"\xa4body" + b"x" * 195  # 200 bytes
MAX_COUNT = 1_000_000  # caps far away: this measures writing, not overflow handling
MAX_BYTES = 1 << 40
PAGE = 1000
FILL_BATCH = 1000
BATCHES = (1, 10, 100)
TARGET_ENQUEUE = 20_000  # messages/s at batches of 100, SqliteStore
TARGET_REPLAY = 50_000  # messages/s, SqliteStore

# A workload runs on a fresh, opened store and returns its rate in messages per second.
Workload = Callable[[Store], Awaitable[float]]


def message(n: int, device: str) -> QueuedMessage:
    return QueuedMessage(device=device, user="alice", sender_device="sender", msg_id=n, type="note", body=BODY,
                         ts=NOW + n, receipt=n % 2 == 0)


async def prepare(store: Store) -> None:
    await store.add_user(UserRecord(id="alice", created=NOW))
    await store.put_device(DeviceRecord(id="sender", user="alice", type="desktop", created=NOW))
    for n in range(DEVICES):
        await store.put_device(DeviceRecord(id=f"device-{n}", user="alice", type="desktop", created=NOW + n))


async def enqueue_rate(store: Store, batch: int, seconds: float) -> float:
    await prepare(store)
    sent = 0

    async def step() -> int:
        nonlocal sent
        messages = [message(sent + n, f"device-{(sent + n) % DEVICES}") for n in range(batch)]
        sent += batch
        outcome = await store.enqueue(messages, MAX_COUNT, MAX_BYTES, OVERFLOW_REJECT)
        if len(outcome.stored) != batch:
            raise RuntimeError(f"{len(outcome.rejected)} of {batch} messages were rejected")
        return batch

    await step()  # warm up: first inserts, statement cache
    stored = 0
    started = time.perf_counter()
    deadline = started + seconds
    while (now := time.perf_counter()) < deadline:
        stored += await step()
    return stored / (now - started)


async def replay_rate(store: Store, count: int) -> float:
    await prepare(store)
    for first in range(0, count, FILL_BATCH):
        batch = [message(n, "device-0") for n in range(first, min(first + FILL_BATCH, count))]
        await store.enqueue(batch, MAX_COUNT, MAX_BYTES, OVERFLOW_REJECT)
    if await store.inbox_size("device-0") != (count, sum(message(n, "device-0").size for n in range(count))):
        raise RuntimeError("the inbox was not filled as expected")

    replayed = 0
    started = time.perf_counter()
    while page := await store.inbox("device-0", NOW, limit=PAGE):
        removed = await store.remove_queued([queued.id for queued in page])
        replayed += len(removed)
    elapsed = time.perf_counter() - started
    if replayed != count or await store.inbox_size("device-0") != (0, 0):
        raise RuntimeError(f"replayed {replayed} of {count} messages")
    return replayed / elapsed


def enqueue_workload(batch: int, seconds: float) -> Workload:
    async def run(store: Store) -> float:
        return await enqueue_rate(store, batch, seconds)

    return run


def replay_workload(count: int) -> Workload:
    async def run(store: Store) -> float:
        return await replay_rate(store, count)

    return run


async def measure(make_store: Callable[[], Store], workload: Workload) -> float:
    store = make_store()
    await store.open()
    try:
        return await workload(store)
    finally:
        await store.close()


async def main(seconds: float, replay: int, with_redis: bool) -> bool:
    with tempfile.TemporaryDirectory(prefix="rccs-inbox-bench-") as directory:
        runs = 0

        def fresh_sqlite() -> Store:
            nonlocal runs
            runs += 1
            return SqliteStore(str(Path(directory) / f"run-{runs}" / "rccs.db"))

        stores: list[tuple[str, Callable[[], Store]]] = [("MemoryStore", MemoryStore), ("SqliteStore", fresh_sqlite)]
        redis_server = None
        if with_redis:
            from rccs.store.redis import RedisStore
            from rccs.testing import RedisServer

            redis_server = RedisServer(Path(directory) / "redis")
            redis_url = await redis_server.start()

            def fresh_redis() -> Store:
                nonlocal runs
                runs += 1
                return RedisStore(redis_url, prefix=f"bench-{runs}:")

            stores.insert(2, ("RedisStore", fresh_redis))
        workloads: list[tuple[str, Workload]] = [
            *((f"enqueue x{batch}", enqueue_workload(batch, seconds)) for batch in BATCHES),
            (f"replay {replay:,}", replay_workload(replay)),
        ]
        print(f"messages per second, {seconds:g} s per enqueue measurement, uvloop, Python {sys.version.split()[0]}")
        header = f"{'workload':<16}" + "".join(f"{name:>14}" for name, _ in stores)
        print(header)
        print("-" * len(header))
        sqlite_rates: dict[str, float] = {}
        for workload_name, workload in workloads:
            rates = [await measure(make_store, workload) for _, make_store in stores]
            sqlite_rates[workload_name] = rates[1]
            print(f"{workload_name:<16}" + "".join(f"{rate:>14,.0f}" for rate in rates), flush=True)
        if redis_server is not None:
            redis_server.kill()

    print()
    met = True
    for what, rate, target in (
        (f"SqliteStore enqueue x{BATCHES[-1]}", sqlite_rates[f"enqueue x{BATCHES[-1]}"], TARGET_ENQUEUE),
        ("SqliteStore replay", sqlite_rates[f"replay {replay:,}"], TARGET_REPLAY),
    ):
        ok = rate >= target
        met = met and ok
        print(f"{what:<28} {rate:>10,.0f}/s  target {target:,}/s: {'met' if ok else 'MISSED'}")
    return met


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=2.0, help="how long each enqueue measurement runs (default 2)")
    parser.add_argument("--replay", type=int, default=50_000, help="messages in the replayed inbox (default 50000)")
    parser.add_argument("--check", action="store_true", help="exit with status 1 when a target is missed")
    parser.add_argument("--redis", action="store_true", help="add RedisStore on a throw-away local redis-server")
    arguments = parser.parse_args()
    all_met = uvloop.run(main(arguments.seconds, arguments.replay, arguments.redis))
    sys.exit(1 if arguments.check and not all_met else 0)
