"""Connect + hello generator for the cluster benchmark: connect N devices, close them, connect them again.

    python benchmarks/cluster/connectgen.py --url ws://127.0.0.1:P/v1 [--url ...] --devices 600 --per-user 5

Device i connects to ``--url`` number ``i % len(urls)`` (round robin over the nodes, as a load balancer
without stickiness would). Each phase connects every device (``--concurrency`` connects under way at once,
each one TCP connect + WebSocket upgrade + ``hello`` -> ``welcome``) and reports the wall time from the first
connect to the last ``welcome`` and the CPU seconds of the ``--watch-pid`` processes (the nodes, Redis) over
that time. Phase ``first``: the devices are new (the node registers them); phase ``again``: the same devices
connect once more after all were closed, each with the token it had the first time (as a device that
reconnects after a network blip). One JSON line on stdout. Tokens are minted with ``RCCS_TOKEN_SECRET``
before the first phase. Connects to 127.0.0.0/8 URLs only (the runner gives them).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import uvloop
from picows import ws_connect

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "e2e"))
from loadgen import RccsDevice, Shared, server_cpu_times  # noqa: E402

REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))
from rccs.auth import TokenAuthority  # noqa: E402


def cpu(pids: list[int]) -> dict[str, float]:
    return {str(pid): sum(server_cpu_times(pid)) for pid in pids}


async def phase(name: str, names: list[tuple[str, str]], urls: list[str], tokens: dict[str, str],
                args: argparse.Namespace) -> tuple[dict[str, Any], list[RccsDevice]]:
    shared = Shared()
    queue = list(enumerate(names))
    queue.reverse()
    devices: list[RccsDevice] = []
    welcomed: list[RccsDevice] = []
    failures: list[str] = []

    async def connector() -> None:
        while queue:
            i, (_, device) = queue.pop()
            factory = functools.partial(RccsDevice, shared, device, tokens[device], False)
            try:
                _, listener = await ws_connect(factory, urls[i % len(urls)], websocket_handshake_timeout=20)
                assert isinstance(listener, RccsDevice)
                devices.append(listener)  # closed at the end, welcomed or not
                await asyncio.wait_for(listener.ready, 20)
                welcomed.append(listener)
            except (OSError, TimeoutError, ConnectionError) as exc:
                failures.append(f"{device}: {type(exc).__name__}: {exc}")

    cpu0, gen0, wall0 = cpu(args.watch_pid), time.process_time(), time.monotonic()
    await asyncio.wait_for(asyncio.gather(*(connector() for _ in range(args.concurrency))), args.timeout)
    wall1, gen1, cpu1 = time.monotonic(), time.process_time(), cpu(args.watch_pid)
    seconds = wall1 - wall0
    connected = len(welcomed)
    return {
        "phase": name,
        "devices": len(names),
        "connected": connected,
        "failures": failures[:5],
        "errors": shared.errors + len(failures),
        "seconds": seconds,
        "per_s": connected / seconds,
        "watched_cpu_s": {pid: cpu1[pid] - cpu0[pid] for pid in cpu0},
        "generator_cpu_util": (gen1 - gen0) / seconds,
    }, devices


async def close_all(devices: list[RccsDevice]) -> None:
    for device in devices:
        device.shared.running = False
        device.close()
    waits = [d.transport.wait_disconnected() for d in devices if d.transport is not None]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*waits), 10)


async def run(args: argparse.Namespace) -> dict[str, Any]:
    secret = os.environ.get("RCCS_TOKEN_SECRET", "")
    if not secret:
        raise SystemExit("connectgen: set RCCS_TOKEN_SECRET to the nodes' token secret")
    authority = TokenAuthority(secret.encode())
    names = [(f"{args.prefix}-u{i // args.per_user}", f"{args.prefix}-d{i}") for i in range(args.devices)]
    # One token per device for both phases, as a real device keeps its token when it reconnects.
    tokens = {device: authority.issue(user, device, 3600) for user, device in names}
    phases = []
    first, devices = await phase("first", names, args.url, tokens, args)
    phases.append(first)
    await close_all(devices)
    await asyncio.sleep(args.pause)  # the nodes finish with the closes (session and presence writes)
    again, devices = await phase("again", names, args.url, tokens, args)
    phases.append(again)
    await close_all(devices)
    return {"phases": phases}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", action="append", required=True, help="ws://127.0.0.1:PORT/v1, repeatable")
    parser.add_argument("--devices", type=int, default=600)
    parser.add_argument("--per-user", type=int, default=5, help="devices per user (default 5)")
    parser.add_argument("--concurrency", type=int, default=32, help="connects under way at once (default 32)")
    parser.add_argument("--prefix", default="c0", help="unique per run: users and devices are new")
    parser.add_argument("--watch-pid", type=int, action="append", default=[], help="report this process's CPU")
    parser.add_argument("--pause", type=float, default=2.0, help="seconds between closing and reconnecting")
    parser.add_argument("--timeout", type=float, default=60.0, help="bound of each phase in seconds")
    args = parser.parse_args()
    if args.devices < 1 or args.per_user < 1 or args.concurrency < 1:
        parser.error("--devices, --per-user and --concurrency must be >= 1")
    result = uvloop.run(run(args))
    print(json.dumps(result), flush=True)
    if any(p["errors"] for p in result["phases"]):
        sys.exit(3)


if __name__ == "__main__":
    main()
