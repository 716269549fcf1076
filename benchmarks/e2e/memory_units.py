"""What one more thing costs the server in memory (operations.md "Memory"), traced with tracemalloc.

    python benchmarks/e2e/memory_units.py [--messages 2000 --devices 300]

A server runs in this process (``rccs.testing.running_server``, SQLite store, the fast path this process
runs); the devices are picows clients in the same process, which keep nothing of what they read. Measured,
each as the traced bytes after minus before (after ``gc.collect()``), divided by the count:

* an unacked message: ``--messages`` ``"ack": true`` sends (200-byte bodies) to an online device that
  reads but does not ack: what the server keeps until the ack (the written ``msg`` for redelivery, the
  pending and retry entries) plus the remembered id;
* once acked, what stays: measured over a second burst of as many messages, acked too (the first one leaves
  tuple free lists, dict tables and socket buffers at their peak, which a second one reuses): the remembered
  ids;
* a connected idle device: ``--devices`` more devices connected (hello, welcome), nothing sent. Both ends
  of each connection are in this process, so this is an upper bound: the client's picows transport counts
  too (RSS per connected device of a server alone: performance.md, scale.py).

Prints one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import sys
import tracemalloc
from pathlib import Path

import uvloop

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for _path in (str(HERE), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import msgpack  # noqa: E402
from picows import WSMsgType  # noqa: E402
from soak import Stats, open_device  # noqa: E402

from rccs._fastpath import IMPLEMENTATION  # noqa: E402
from rccs.hub import now_ms  # noqa: E402
from rccs.testing import running_server  # noqa: E402


def traced() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


async def until(predicate, timeout: float = 60.0) -> None:  # type: ignore[no-untyped-def]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise TimeoutError("the server did not get there in time")
        await asyncio.sleep(0.01)


async def measure(args: argparse.Namespace) -> dict[str, object]:
    stats = Stats()
    body = os.urandom(200)
    async with running_server() as server:
        url = server.ws_url
        sender = await open_device(stats, "mu-send", server.issue_token("mu", "mu-send"), True, url)
        receiver = await open_device(stats, "mu-recv", server.issue_token("mu", "mu-recv"), True, url)
        receiver.acks = False
        sender.to = {"device": "mu-recv"}
        for _ in range(50):  # warm-up: caches, the id ring's first arrays
            sender.send(body)
        await until(lambda: stats.received >= 50)
        hub = server.node.hub

        async def burst() -> None:
            expected = stats.received + args.messages
            for _ in range(args.messages):
                sender.send(body)
            await until(lambda: stats.received >= expected and stats.routed >= expected)

        async def ack_all() -> None:
            await receiver_acks_everything(server, receiver)
            await until(lambda: sum(len(s.pending) for s in hub.live.values()) == 0)
            hub.deliveries.retry_due(now_ms())  # the sweep (every second) that drops acked deadlines

        tracemalloc.start()
        before = traced()
        await burst()
        unacked = traced() - before
        pending = sum(len(s.pending) for s in hub.live.values())
        await ack_all()
        after_first = traced()
        first = tracemalloc.take_snapshot()
        # Once more: free lists, dict tables and socket buffers are at their peak from the first burst, so
        # what stays now is what each acked message leaves behind.
        await burst()
        await ack_all()
        acked = traced() - after_first
        if os.environ.get("MEMORY_UNITS_TOP"):
            for stat in tracemalloc.take_snapshot().compare_to(first, "lineno")[:12]:
                print(stat, file=sys.stderr)
        before = traced()
        devices = [await open_device(stats, f"mu-idle-{n}", server.issue_token("mu2", f"mu-idle-{n}"), False, url)
                   for n in range(args.devices)]
        idle = traced() - before
        tracemalloc.stop()
        for device in [sender, receiver, *devices]:
            device.close()
    return {"implementation": IMPLEMENTATION, "messages": args.messages, "pending_seen": pending,
            "bytes_per_unacked_message": round(unacked / args.messages),
            "bytes_per_acked_message_kept": round(acked / args.messages),
            "devices": args.devices, "bytes_per_connected_idle_device_both_ends": round(idle / args.devices)}


async def receiver_acks_everything(server, receiver) -> None:  # type: ignore[no-untyped-def]
    """Ack every seq the server waits for on the receiver's connection."""
    for session in list(server.node.hub.live.values()):
        if session.device == "mu-recv" and session.pending:
            seqs = sorted(session.pending)
            for start in range(0, len(seqs), 4096):
                receiver.transport.send(WSMsgType.BINARY,
                                        msgpack.packb({"op": "ack", "seq": seqs[start:start + 4096]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=2000)
    parser.add_argument("--devices", type=int, default=300)
    print(json.dumps(uvloop.run(measure(parser.parse_args()))))


if __name__ == "__main__":
    main()
