"""What an idle device costs the server, and what a bare picows connection costs: RSS and traced bytes.

    python benchmarks/e2e/idle_memory.py [--devices 4000 --per-user 5]

Two server processes, one after the other, each measured alone with ``--devices`` idle connections from
this process (picows clients, nothing sent after the hello):

* ``rccs``: ``rccs serve`` under ``soak_server.py`` (tracemalloc on, 1 frame), devices of ``--per-user``
  devices per user that say hello and wait. Snapshots before and after the connects give the traced bytes
  per device by allocation site and the objects per device by type (``gc.get_objects``);
* ``bare``: a picows server that accepts the WebSocket and does nothing else, with rccs' picows settings
  (``read_buffer_init_size=2048``, auto ping): the floor of a connection on this transport.

RSS per device is (VmRSS after - VmRSS before) / devices, read once the last welcome (or upgrade) is in.
The difference between RSS and traced bytes is what Python's tracer cannot see: the malloc'd memory of
uvloop, libuv and the kernel-facing buffers, plus allocator overhead and fragmentation. Prints a table
and one JSON line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for _path in (str(HERE), str(REPO)):
    if _path not in sys.path:
        sys.path.insert(0, _path)

import msgpack  # noqa: E402
import uvloop  # noqa: E402
from picows import WSListener, WSMsgType, WSTransport, ws_connect, ws_create_server  # noqa: E402
from run import base_env  # noqa: E402

from rccs.auth import TokenAuthority  # noqa: E402
from rccs.testing import free_ports  # noqa: E402


class IdleDevice(WSListener):  # type: ignore[misc]
    def __init__(self, hello: bytes | None):
        self.hello = hello
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        if self.hello is None:
            self.ready.set_result(None)
        else:
            transport.send(WSMsgType.BINARY, self.hello)

    def on_ws_frame(self, transport: WSTransport, frame: Any) -> None:
        if not self.ready.done() and frame.msg_type == WSMsgType.BINARY:
            self.ready.set_result(None)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for {pid}")


async def wait_for_port(port: int, proc: subprocess.Popen[bytes]) -> None:
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError("the server exited at start")
        try:
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.close()
            return
        except OSError:
            await asyncio.sleep(0.05)
    raise RuntimeError("the server did not listen in time")


async def connect_all(url: str, hellos: list[bytes | None], concurrency: int = 64) -> list[Any]:
    transports: list[Any] = []
    gate = asyncio.Semaphore(concurrency)

    async def one(hello: bytes | None) -> None:
        async with gate:
            transport, device = await ws_connect(lambda: IdleDevice(hello), url)
            await asyncio.wait_for(device.ready, 30)
            transports.append(transport)

    await asyncio.gather(*(one(hello) for hello in hellos))
    return transports


async def snapshot(proc: subprocess.Popen[bytes], directory: Path, number: int) -> dict[str, Any]:
    proc.send_signal(signal.SIGUSR1)
    path = directory / f"{number}.json"
    deadline = time.monotonic() + 120
    while not path.exists():
        if time.monotonic() > deadline:
            raise RuntimeError("no snapshot from the server")
        await asyncio.sleep(0.05)
    return json.loads(path.read_text())  # type: ignore[no-any-return]


def per_device(before: dict[str, list[int]], after: dict[str, list[int]], devices: int,
               top: int) -> list[tuple[str, float, float]]:
    """(key, bytes per device, count per device) of the largest growths."""
    grown = [(key, (size - before.get(key, [0, 0])[0]) / devices, (count - before.get(key, [0, 0])[1]) / devices)
             for key, (size, count) in after.items()]
    grown.sort(key=lambda entry: -entry[1])
    return grown[:top]


async def measure_rccs(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    secret = secrets.token_urlsafe(32)
    port, http_port = free_ports(2)
    env = base_env()
    env.update({"RCCS_TOKEN_SECRET": secret, "RCCS_LOG_LEVEL": "WARNING"})
    snapshots = workdir / "snapshots"
    proc = subprocess.Popen(
        [sys.executable, str(HERE / "soak_server.py"), str(snapshots), "serve", "--port", str(port),
         "--http-port", str(http_port), "--data-dir", str(workdir / "data"),
         "--max-connections", str(args.devices + args.warmup + 100), "--socket-transport", args.transport],
        env=env)
    try:
        await wait_for_port(port, proc)
        url = f"ws://127.0.0.1:{port}/v1"
        authority = TokenAuthority(secret.encode())

        def hellos(prefix: str, count: int) -> list[bytes | None]:
            return [msgpack.packb({"op": "hello", "token": authority.issue(f"{prefix}u{n // args.per_user}",
                                                                           f"{prefix}d{n}", 3600),
                                   "device": {"type": "phone", "capabilities": ["push"]}})
                    for n in range(count)]

        warm, measured = hellos("w", args.warmup), hellos("m", args.devices)
        held = await connect_all(url, warm)  # the first connections fill free lists and caches
        first = await snapshot(proc, snapshots, 1)
        rss_before = rss_kib(proc.pid)
        held += await connect_all(url, measured)
        await asyncio.sleep(args.settle)  # presence frames and store writes of the last hellos drain
        rss_after = rss_kib(proc.pid)
        second = await snapshot(proc, snapshots, 2)
        for transport in held:
            transport.disconnect()
        return {
            "rss_kib_per_device": (rss_after - rss_before) / args.devices,
            "traced_bytes_per_device": (second["traced"] - first["traced"]) / args.devices,
            "sites": per_device(first["sites"], second["sites"], args.devices, args.top),
            "types": per_device(first["types"], second["types"], args.devices, args.top),
        }
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def run_bare_server(port: int, use_aiofastnet: bool) -> None:
    class Quiet(WSListener):  # type: ignore[misc]
        pass

    server = await ws_create_server(lambda request: Quiet(), "127.0.0.1", port, read_buffer_init_size=2048,
                                    enable_auto_ping=True, auto_ping_idle_timeout=25, auto_ping_reply_timeout=25,
                                    backlog=2048, use_aiofastnet=use_aiofastnet)
    await server.serve_forever()


async def measure_bare(args: argparse.Namespace) -> dict[str, Any]:
    (port,) = free_ports(1)
    proc = subprocess.Popen([sys.executable, __file__, "--bare-server", str(port), "--transport", args.transport],
                            env=base_env())
    try:
        await wait_for_port(port, proc)
        url = f"ws://127.0.0.1:{port}/"
        held = await connect_all(url, [None] * args.warmup)
        rss_before = rss_kib(proc.pid)
        held += await connect_all(url, [None] * args.devices)
        await asyncio.sleep(args.settle)
        rss_after = rss_kib(proc.pid)
        for transport in held:
            transport.disconnect()
        return {"rss_kib_per_device": (rss_after - rss_before) / args.devices}
    finally:
        proc.terminate()
        proc.wait(timeout=30)


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory(prefix="rccs-idle-memory-") as tmp:
        bare = await measure_bare(args)
        if args.bare_only:
            print(f"bare picows connection ({args.transport}): {bare['rss_kib_per_device']:.2f} KiB RSS per connection")
            return
        rccs = await measure_rccs(args, Path(tmp))
    print(f"{args.devices} idle devices ({args.per_user} per user) after {args.warmup} warm-up connections")
    print(f"bare picows connection: {bare['rss_kib_per_device']:.2f} KiB RSS per connection")
    print(f"rccs: {rccs['rss_kib_per_device']:.2f} KiB RSS, {rccs['traced_bytes_per_device'] / 1024:.2f} KiB "
          "traced per device")
    for title in ("sites", "types"):
        print(f"  largest traced growth per device by {title[:-1]}:")
        for key, size, count in rccs[title]:
            print(f"    {size:8.1f} B  {count:6.2f}x  {key}")
    print(json.dumps({"devices": args.devices, "per_user": args.per_user, "bare": bare, "rccs": rccs}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--devices", type=int, default=4000)
    parser.add_argument("--per-user", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=200)
    parser.add_argument("--settle", type=float, default=2.0, help="seconds after the last welcome (default 2)")
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--transport", choices=("aiofastnet", "uvloop"), default="aiofastnet",
                        help="both servers' socket transport (default aiofastnet, rccs' default)")
    parser.add_argument("--bare-only", action="store_true", help="measure only the bare picows server")
    parser.add_argument("--bare-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    os.environ.setdefault("PYTHONFAULTHANDLER", "1")
    if args.bare_server:
        uvloop.run(run_bare_server(args.bare_server, args.transport == "aiofastnet"))
        return
    uvloop.run(main_async(args))


if __name__ == "__main__":
    main()
