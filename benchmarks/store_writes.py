"""Store write throughput: MemoryStore against SqliteStore (a fresh file in a temp dir), under uvloop.

    python benchmarks/store_writes.py [--seconds 2]

Each workload runs for ``--seconds`` on a fresh, opened store, awaiting one call at a time as the
hub's flush does, and reports records written per second (not calls: a batch of 100 counts 100):

    put_device             one device per call, replacing devices of a pool of 1000 (a rename, say)
    put_sessions x1        one session per call (sessions/s)
    put_sessions x100      100 sessions per call, as the hub's periodic flush writes them (sessions/s)
    update_presence x100   100 (device, status, last_seen) per call (updates/s)

Sessions are written without pending messages and with changing counters, like the hub's
snapshots. The SQLite store runs as in production: WAL, synchronous=NORMAL, one transaction and
one thread hop per call, so the difference between x1 and x100 is the per-call cost.
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
    STATUS_AWAY,
    STATUS_ONLINE,
    DeviceRecord,
    MemoryStore,
    SessionRecord,
    SqliteStore,
    Store,
    UserRecord,
)

NOW = 1_700_000_000_000
POOL = 1000
BATCH = 100

# A workload prepares a store, then returns one write step: awaiting it writes and returns how many records.
Step = Callable[[], Awaitable[int]]
Workload = Callable[[Store], Awaitable[Step]]


def device(n: int, name: str = "") -> DeviceRecord:
    return DeviceRecord(id=f"device-{n}", user="alice", type="desktop", name=name, capabilities=("shell",),
                        metadata={"os": "linux"}, created=NOW + n)


def session(n: int, round_number: int) -> SessionRecord:
    return SessionRecord(id=f"session-{n}", user="alice", device=f"device-{n % POOL}", created=NOW + n,
                         expires_at=NOW + 86_400_000, next_seq=round_number + 1, last_activity=NOW + round_number,
                         connected_at=NOW, messages_in=round_number, messages_out=round_number,
                         bytes_in=100 * round_number, bytes_out=100 * round_number)


async def with_user(store: Store) -> None:
    await store.add_user(UserRecord(id="alice", created=NOW))


async def put_device_workload(store: Store) -> Step:
    await with_user(store)
    calls = 0

    async def step() -> int:
        nonlocal calls
        await store.put_device(device(calls % POOL, name=f"name {calls}"))
        calls += 1
        return 1

    return step


def put_sessions_workload(batch: int) -> Workload:
    async def prepare(store: Store) -> Step:
        calls = 0

        async def step() -> int:
            nonlocal calls
            first = (calls * batch) % POOL
            await store.put_sessions([session(first + n, calls) for n in range(batch)])
            calls += 1
            return batch

        return step

    return prepare


async def update_presence_workload(store: Store) -> Step:
    await with_user(store)
    for n in range(BATCH):
        await store.put_device(device(n))
    calls = 0

    async def step() -> int:
        nonlocal calls
        status = STATUS_ONLINE if calls % 2 else STATUS_AWAY
        await store.update_presence([(f"device-{n}", status, NOW + calls) for n in range(BATCH)])
        calls += 1
        return BATCH

    return step


WORKLOADS: list[tuple[str, Workload]] = [
    ("put_device", put_device_workload),
    ("put_sessions x1", put_sessions_workload(1)),
    (f"put_sessions x{BATCH}", put_sessions_workload(BATCH)),
    (f"update_presence x{BATCH}", update_presence_workload),
]


async def records_per_second(make_store: Callable[[], Store], workload: Workload, seconds: float) -> float:
    store = make_store()
    await store.open()
    try:
        step = await workload(store)
        await step()  # warm up: first inserts, statement cache
        written = 0
        started = time.perf_counter()
        deadline = started + seconds
        while (now := time.perf_counter()) < deadline:
            written += await step()
        return written / (now - started)
    finally:
        await store.close()


async def main(seconds: float) -> None:
    with tempfile.TemporaryDirectory(prefix="rccs-store-bench-") as directory:
        runs = 0

        def fresh_sqlite() -> Store:
            nonlocal runs
            runs += 1
            return SqliteStore(str(Path(directory) / f"run-{runs}" / "rccs.db"))

        stores: list[tuple[str, Callable[[], Store]]] = [("MemoryStore", MemoryStore), ("SqliteStore", fresh_sqlite)]
        print(f"records written per second, {seconds:g} s per measurement, uvloop, Python {sys.version.split()[0]}")
        header = f"{'workload':<22}" + "".join(f"{name:>14}" for name, _ in stores)
        print(header)
        print("-" * len(header))
        for workload_name, workload in WORKLOADS:
            rates = [await records_per_second(make_store, workload, seconds) for _, make_store in stores]
            print(f"{workload_name:<22}" + "".join(f"{rate:>14,.0f}" for rate in rates), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--seconds", type=float, default=2.0, help="how long each measurement runs (default 2)")
    arguments = parser.parse_args()
    uvloop.run(main(arguments.seconds))
