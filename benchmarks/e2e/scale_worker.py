"""Load generator process for ``scale.py``: holds many devices and runs commands read from stdin.

One process holds thousands of rccs devices (msgpack, picows clients). It
reads one JSON command per line on stdin and answers each with one JSON line
on stdout; ``scale.py`` drives several of these processes in step. Times in
commands (``start_at``) are ``time.monotonic()`` values: CLOCK_MONOTONIC is
system-wide on Linux, so every process starts its phase at the same instant.

Commands (``cmd``):

* ``prepare``: mint a token for each listed device (``user``, ``device``,
  ``type``, ``caps``, ``idle``); nothing is connected yet.
* ``connect``: connect every prepared device not yet connected (``hello``,
  wait for ``welcome``), ``concurrency`` at a time per process, each socket
  bound to one of ``local_addrs`` (round robin) so that many devices do not
  exhaust the ephemeral ports of one source address.
* ``closed``: closed loop between the listed ``pairs``: every pair keeps
  ``inflight`` messages in flight; a device answers every message with a
  new one to its partner (as ``loadgen.py``).
* ``open``: open loop: messages are sent to the pairs' partners at a fixed
  total ``rate`` (paced every millisecond, round robin over the pairs'
  devices); receivers do not answer.
* ``fanout``: ``sender`` (if this process holds it) sends ``count`` messages
  with selector ``to`` at ``rate`` per second; every device in this process
  counts what it receives, and the first few messages' frames are fingerprinted
  so ``scale.py`` can check that every recipient got the same bytes.
* ``quit``: close every connection and exit.

Two kinds of device: ``active`` ones (picows clients, as in ``loadgen.py``)
send and receive traffic; ``idle`` ones use ``IdleDevice``, a minimal
WebSocket client on a plain asyncio protocol that connects, says hello, and
then only answers PINGs and CLOSE. A picows connect costs the generator about
as much CPU as the server spends accepting it (~240 µs), which made the
generator, not the server, the limit of the connect rate; the minimal client
costs under a third of that. It follows RFC 6455 as a client must:
it sends ``hello`` only after the ``101`` answer and masks every frame (with
an all-zero key, which XORs to the same bytes, so frames are built once).

Message bodies carry ``{"t": send time in ns}`` (and ``"s"``, the scheduled
send time, in the open loop); receivers record the one-way latency. Send ids
are strings, like real clients' ``"m-17"``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import hashlib
import json
import os
import resource
import sys
import time
from array import array
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import msgpack
import uvloop
from loadgen import Device, Shared, percentile  # this file's directory is on sys.path when it runs as a script
from picows import WSFrame, WSMsgType, WSTransport, ws_connect

_BINARY = WSMsgType.BINARY
_CLOSE = WSMsgType.CLOSE
_packb = msgpack.packb
_unpackb = msgpack.unpackb
_monotonic_ns = time.monotonic_ns


class ScaleShared(Shared):
    """loadgen's counters plus what the open loop and fan-out need."""

    def __init__(self) -> None:
        super().__init__()
        self.bouncing = False  # closed loop: received messages are answered
        self.sched_latency_ns = array("q")  # open loop: receive time minus scheduled send time
        self.last_welcome = 0.0
        self.welcomed = 0
        self.fingerprint_ids: set[str] = set()
        self.fingerprints: dict[str, set[str]] = {}

    def reset(self) -> None:
        super().reset()
        self.sched_latency_ns = array("q")


class ScaleDevice(Device):
    """One device: hello with its own type and capabilities; answers messages only while bouncing."""

    def __init__(self, shared: ScaleShared, name: str, token: str, device_type: str, caps: list[str]):
        super().__init__(shared, name)
        self.shared: ScaleShared = shared
        self.hello = _packb({"op": "hello", "token": token, "device": {"type": device_type, "capabilities": caps}})
        self.to: dict[str, Any] = {}
        self.next_id = 0
        self.connected = False

    def on_ws_connected(self, transport: WSTransport) -> None:
        super().on_ws_connected(transport)
        transport.send(_BINARY, self.hello)

    async def open(self, worker: Worker, addr: str | None) -> None:
        extra: dict[str, Any] = {"local_addr": (addr, 0)} if addr else {}
        # picows first calls the factory with (request, response): accept that, so it needs no retry.
        await ws_connect(lambda *_: self, worker.url, websocket_handshake_timeout=20, **extra)
        await self.ready
        self.connected = True

    def send_one(self) -> None:
        self.next_id += 1
        envelope = {"op": "send", "id": str(self.next_id), "to": self.to, "type": "bench",
                    "body": {"t": _monotonic_ns()}}
        self.transport.send(_BINARY, _packb(envelope))  # type: ignore[union-attr]
        self.shared.sent += 1

    def send_scheduled(self, scheduled_ns: int) -> None:
        self.next_id += 1
        envelope = {"op": "send", "id": str(self.next_id), "to": self.to, "type": "bench",
                    "body": {"t": _monotonic_ns(), "s": scheduled_ns}}
        self.transport.send(_BINARY, _packb(envelope))  # type: ignore[union-attr]
        self.shared.sent += 1

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != _BINARY:
            if frame.msg_type == _CLOSE:
                self.on_close_frame(transport, frame)
            return
        payload = frame.get_payload_as_bytes()
        envelope = _unpackb(payload)
        op = envelope["op"]
        shared = self.shared
        if op == "msg":
            now = _monotonic_ns()
            body = envelope["body"]
            shared.latency_ns.append(now - body["t"])
            scheduled = body.get("s")
            if scheduled is not None:
                shared.sched_latency_ns.append(now - scheduled)
            shared.received += 1
            if shared.fingerprint_ids and envelope["id"] in shared.fingerprint_ids:
                digest = hashlib.blake2b(payload, digest_size=8).hexdigest()
                shared.fingerprints.setdefault(envelope["id"], set()).add(digest)
            if shared.bouncing:
                self.send_one()
        elif op == "welcome":
            if not self.ready.done():
                shared.last_welcome = time.monotonic()
                shared.welcomed += 1
                self.ready.set_result(None)
        elif op == "error":
            shared.errors += 1
            shared.problem(f"{self.name}: error {envelope.get('code')}: {envelope.get('message')}")


def client_frame(opcode: int, payload: bytes) -> bytes:
    """A final client frame, masked with the all-zero key (so the payload bytes stay as they are)."""
    n = len(payload)
    if n < 126:
        head = bytes((0x80 | opcode, 0x80 | n))
    elif n < 65536:
        head = bytes((0x80 | opcode, 0x80 | 126)) + n.to_bytes(2, "big")
    else:
        head = bytes((0x80 | opcode, 0x80 | 127)) + n.to_bytes(8, "big")
    return head + b"\0\0\0\0" + payload


_CLOSE_OK = client_frame(0x8, (1000).to_bytes(2, "big"))


class IdleDevice(asyncio.Protocol):
    """A device that connects, says hello and then idles: answers PING with PONG and CLOSE with CLOSE."""

    __slots__ = ("buffer", "connected", "hello", "name", "ready", "shared", "state", "transport")

    def __init__(self, shared: ScaleShared, name: str, token: str, device_type: str, caps: list[str]):
        self.shared = shared
        self.name = name
        self.hello = client_frame(0x2, _packb({"op": "hello", "token": token,
                                                "device": {"type": device_type, "capabilities": caps}}))
        self.buffer = b""
        self.state = 0  # 0: upgrade sent, 1: hello sent, 2: welcomed, 3: closing
        self.transport: asyncio.Transport | None = None
        self.ready: asyncio.Future[None] | None = None
        self.connected = False

    async def open(self, worker: Worker, addr: str | None) -> None:
        loop = asyncio.get_running_loop()
        self.ready = loop.create_future()
        await loop.create_connection(lambda: self, worker.host, worker.port,
                                     local_addr=(addr, 0) if addr else None)  # type: ignore[arg-type]
        await self.ready
        self.connected = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert hasattr(transport, "write")  # uvloop's TCP transport, which is not an asyncio.Transport subclass
        self.transport = transport  # type: ignore[assignment]
        self.transport.write(WORKER_REQUEST[0])  # type: ignore[union-attr]

    def fail(self, why: str) -> None:
        if self.ready is not None and not self.ready.done():
            self.ready.set_exception(ConnectionError(f"{self.name}: {why}"))
        if self.transport is not None:
            self.transport.close()

    def data_received(self, data: bytes) -> None:
        buffer = self.buffer + data if self.buffer else data
        if self.state == 0:
            end = buffer.find(b"\r\n\r\n")
            if end < 0:
                self.buffer = buffer
                return
            if not buffer.startswith(b"HTTP/1.1 101"):
                self.fail(f"upgrade refused: {buffer[:60]!r}")
                return
            buffer = buffer[end + 4:]
            self.state = 1
            self.transport.write(self.hello)  # type: ignore[union-attr]
        while len(buffer) >= 2:  # server frames are unmasked
            length, offset = buffer[1] & 0x7F, 2
            if length == 126:
                length, offset = int.from_bytes(buffer[2:4], "big"), 4
            elif length == 127:
                length, offset = int.from_bytes(buffer[2:10], "big"), 10
            if len(buffer) < offset + length:
                break
            opcode, payload = buffer[0] & 0x0F, buffer[offset:offset + length]
            buffer = buffer[offset + length:]
            self.on_frame(opcode, payload)
        self.buffer = buffer

    def on_frame(self, opcode: int, payload: bytes) -> None:
        shared = self.shared
        if opcode == 0x2 or opcode == 0x1:
            envelope = _unpackb(payload) if opcode == 0x2 else json.loads(payload)
            op = envelope.get("op")
            if op == "welcome" and self.state == 1:
                self.state = 2
                shared.last_welcome = time.monotonic()
                shared.welcomed += 1
                assert self.ready is not None
                self.ready.set_result(None)
            elif op == "error":
                shared.errors += 1
                shared.problem(f"{self.name}: error {envelope.get('code')}: {envelope.get('message')}")
            elif op == "msg":
                shared.problem(f"{self.name}: an idle device got a message")
        elif opcode == 0x9:
            self.transport.write(client_frame(0xA, payload))  # type: ignore[union-attr]
        elif opcode == 0x8:
            if self.state != 3:
                if shared.running:
                    shared.problem(f"{self.name}: server closed with {payload[:2].hex()} {payload[2:]!r}")
                self.state = 3
                self.transport.write(client_frame(0x8, payload[:2]))  # type: ignore[union-attr]
            self.transport.close()  # type: ignore[union-attr]

    def connection_lost(self, exc: Exception | None) -> None:
        if self.ready is not None and not self.ready.done():
            self.fail("disconnected before welcome")
        elif self.state != 3 and self.shared.running:
            self.shared.unexpected_disconnects += 1
            self.shared.problem(f"{self.name}: disconnected during the run")
        self.state = 3
        self.transport = None

    def close(self) -> None:
        if self.transport is not None and self.state != 3:
            self.state = 3
            self.transport.write(_CLOSE_OK)
            self.transport.close()


# The upgrade request, the same for every idle connection of this process (set in Worker.__init__).
WORKER_REQUEST: list[bytes] = [b""]


class Worker:
    def __init__(self, args: argparse.Namespace):
        self.url = args.url
        parts = urlsplit(args.url)
        self.host, self.port = parts.hostname or "127.0.0.1", parts.port or 80
        # A fixed Sec-WebSocket-Key: the server answers any valid one, and the answer is not checked here.
        WORKER_REQUEST[0] = (f"GET {parts.path or '/'} HTTP/1.1\r\nHost: {self.host}:{self.port}\r\n"
                             "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                             "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
                             ).encode()
        self.index = args.index
        self.shared = ScaleShared()
        self.devices: dict[str, ScaleDevice] = {}
        self.idle: list[IdleDevice] = []
        self.pending: list[ScaleDevice | IdleDevice] = []  # prepared, not connected yet

    # ---- helpers ------------------------------------------------------------

    async def sleep_until(self, when: float) -> None:
        delay = when - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    def window(self, started: float, received: int, sent: int, cpu: float, samples_out: str | None,
               sched: array[int] | None = None) -> dict[str, Any]:
        """The measured window's numbers; latency samples go to ``samples_out`` (int64 ns) for merging."""
        shared = self.shared
        latency = sorted(shared.latency_ns[:received])
        wall = time.monotonic() - started
        if samples_out:
            Path(samples_out).write_bytes(array("q", latency).tobytes())
        result: dict[str, Any] = {
            "received": received, "sent": sent, "window_seconds": wall,
            "latency_us": {name: percentile(latency, q) / 1000 for name, q in
                           (("p50", 0.50), ("p99", 0.99), ("p999", 0.999), ("max", 1.0))},
            "generator_cpu_s": cpu, "generator_cpu_util": cpu / wall if wall > 0 else 0.0,
        }
        if sched is not None:
            ordered = sorted(sched)
            if samples_out:
                Path(samples_out + ".sched").write_bytes(array("q", ordered).tobytes())
            result["sched_latency_us"] = {name: percentile(ordered, q) / 1000 for name, q in
                                          (("p50", 0.50), ("p99", 0.99), ("p999", 0.999), ("max", 1.0))}
        return result

    def health(self) -> dict[str, Any]:
        shared = self.shared
        return {"errors": shared.errors, "unexpected_disconnects": shared.unexpected_disconnects,
                "problems": shared.problems[:5]}

    def link(self, pairs: list[list[str]]) -> list[ScaleDevice]:
        devices = []
        for a_name, b_name in pairs:
            a, b = self.devices[a_name], self.devices[b_name]
            a.to = {"device": b.name}
            b.to = {"device": a.name}
            devices += [a, b]
        return devices

    # ---- commands -----------------------------------------------------------

    async def prepare(self, cmd: dict[str, Any]) -> dict[str, Any]:
        from rccs.auth import TokenAuthority

        secret = os.environ.get("RCCS_TOKEN_SECRET", "")
        if not secret:
            raise SystemExit("scale_worker: RCCS_TOKEN_SECRET must be the server's token secret")
        authority = TokenAuthority(secret.encode())
        started = time.monotonic()
        for spec in cmd["devices"]:
            name = spec["device"]
            token = authority.issue(spec["user"], name, 3600)
            args = (self.shared, name, token, spec.get("type", "bench"), spec.get("caps", []))
            device: ScaleDevice | IdleDevice
            if spec.get("idle"):
                device = IdleDevice(*args)
                self.idle.append(device)
            else:
                device = ScaleDevice(*args)
                self.devices[name] = device
            self.pending.append(device)
        return {"prepared": len(cmd["devices"]), "seconds": time.monotonic() - started}

    async def connect(self, cmd: dict[str, Any]) -> dict[str, Any]:
        todo, self.pending = self.pending, []
        addrs = cmd.get("local_addrs") or [None]
        queue = iter(enumerate(todo))
        failures: list[str] = []
        await self.sleep_until(cmd["start_at"])
        cpu0 = time.process_time()
        first = time.monotonic()

        async def connector() -> None:
            # A fixed number of connectors each taking the next device: bounded concurrency, no task per device.
            for i, device in queue:
                try:
                    await device.open(self, addrs[i % len(addrs)])
                except (OSError, ConnectionError) as exc:
                    failures.append(f"{device.name}: {type(exc).__name__}: {exc}")

        connectors = asyncio.gather(*(connector() for _ in range(max(1, int(cmd.get("concurrency", 16))))))
        try:
            await asyncio.wait_for(connectors, float(cmd.get("timeout", 60.0)))
        except TimeoutError:
            failures.append(f"not all devices connected within {cmd.get('timeout', 60.0)} s")
        done = time.monotonic()
        cpu = time.process_time() - cpu0
        connected = sum(1 for d in todo if d.connected)
        # The devices live until the end: keep them out of the collector's way. Traffic phases also turn the
        # collector off (their garbage is freed by reference counting), so no collection pauses this process.
        gc.collect()
        gc.freeze()
        if connected < len(todo) and not failures:
            failures.append(f"{len(todo) - connected} devices did not connect")
        return {"connected": connected, "failed": len(todo) - connected, "failures": failures[:5],
                "first_connect": first, "last_welcome": self.shared.last_welcome if connected else first,
                "done": done, "generator_cpu_s": cpu} | self.health()

    async def closed(self, cmd: dict[str, Any]) -> dict[str, Any]:
        shared = self.shared
        devices = self.link(cmd["pairs"])
        await self.sleep_until(cmd["start_at"])
        shared.bouncing = True
        for start in range(0, len(devices), 2):
            for k in range(int(cmd["inflight"])):
                devices[start + k % 2].send_one()
        await self.sleep_until(cmd["start_at"] + cmd["warmup"])
        shared.reset()
        cpu0, started = time.process_time(), time.monotonic()
        await self.sleep_until(cmd["start_at"] + cmd["warmup"] + cmd["seconds"])
        received, sent = shared.received, shared.sent
        cpu = time.process_time() - cpu0
        shared.bouncing = False
        result = self.window(started, received, sent, cpu, cmd.get("samples_out"))
        await asyncio.sleep(0.3)  # let the messages in flight land before the next phase
        return result | self.health()

    async def open(self, cmd: dict[str, Any]) -> dict[str, Any]:
        shared = self.shared
        devices = self.link(cmd["pairs"])
        rate = float(cmd["rate"])
        start_at = cmd["start_at"]
        window_start = start_at + cmd["warmup"]
        end = window_start + cmd["seconds"]
        await self.sleep_until(start_at)
        start_ns = _monotonic_ns()
        period_ns = 1e9 / rate
        count = len(devices)
        k = 0
        measuring = False
        cpu0 = started = 0.0
        max_batch = 0  # most messages sent in one pacing tick during the window
        gaps = array("q")  # ns between pacing ticks in the window: long ones mean this process was stalled
        last_tick = _monotonic_ns()
        while True:
            now = time.monotonic()
            tick = _monotonic_ns()
            if measuring:
                gaps.append(tick - last_tick)
            last_tick = tick
            if not measuring and now >= window_start:
                shared.reset()
                cpu0, started, measuring = time.process_time(), now, True
            if now >= end:
                break
            due = int((_monotonic_ns() - start_ns) / period_ns) + 1
            if measuring and due - k > max_batch:
                max_batch = due - k
            while k < due:
                devices[k % count].send_scheduled(start_ns + int(k * period_ns))
                k += 1
            await asyncio.sleep(0.001)
        received, sent = shared.received, shared.sent
        sched = shared.sched_latency_ns[:received]
        cpu = time.process_time() - cpu0
        result = self.window(started, received, sent, cpu, cmd.get("samples_out"), sched=sched)
        result["max_batch"] = max_batch
        ordered_gaps = sorted(gaps)
        result["tick_gap_us"] = {name: percentile(ordered_gaps, q) / 1000 for name, q in
                                 (("p50", 0.50), ("p99", 0.99), ("p999", 0.999), ("max", 1.0))}
        await asyncio.sleep(0.3)
        return result | self.health()

    async def fanout(self, cmd: dict[str, Any]) -> dict[str, Any]:
        shared = self.shared
        sender = self.devices.get(cmd["sender"] or "")
        count, rate = int(cmd["count"]), float(cmd["rate"])
        shared.reset()
        shared.fingerprint_ids = set(cmd.get("fingerprint_ids", []))
        shared.fingerprints = {}
        await self.sleep_until(cmd["start_at"])
        cpu0, started = time.process_time(), time.monotonic()
        if sender is not None:
            sender.to = cmd["to"]
            sender.next_id = int(cmd.get("id_base", 0))
            start_ns = _monotonic_ns()
            period_ns = 1e9 / rate
            k = 0
            while k < count:
                due = min(count, int((_monotonic_ns() - start_ns) / period_ns) + 1)
                while k < due:
                    sender.send_one()
                    k += 1
                if k < count:
                    await asyncio.sleep(0.001)
        await self.sleep_until(cmd["end_at"])
        received = shared.received
        cpu = time.process_time() - cpu0
        result = self.window(started, received, shared.sent, cpu, None)
        result["fingerprints"] = {k: sorted(v) for k, v in shared.fingerprints.items()}
        shared.fingerprint_ids = set()
        return result | self.health()

    async def quit(self) -> dict[str, Any]:
        shared = self.shared
        shared.running = False
        for device in self.devices.values():
            device.close()
        for idle in self.idle:
            idle.close()
        waits = [d.transport.wait_disconnected() for d in self.devices.values() if d.transport is not None]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*waits), 10)
        deadline = time.monotonic() + 10
        while any(d.transport is not None for d in self.idle) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return {"closed": len(waits) + len(self.idle)}


async def serve(args: argparse.Namespace) -> None:
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader(limit=64 * 1024 * 1024)
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    worker = Worker(args)
    handlers = {"prepare": worker.prepare, "connect": worker.connect, "closed": worker.closed,
                "open": worker.open, "fanout": worker.fanout}
    while True:
        line = await reader.readline()
        if not line:
            await worker.quit()
            return
        cmd = json.loads(line)
        name = cmd["cmd"]
        if name == "quit":
            reply = await worker.quit()
        elif name in ("closed", "open", "fanout"):
            gc.disable()
            try:
                reply = await handlers[name](cmd)
            finally:
                gc.enable()
        else:
            reply = await handlers[name](cmd)
        reply["worker"] = args.index
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()
        if name == "quit":
            return


def raise_nofile_limit() -> int:
    """Raise this process's soft open-files limit to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = hard if hard != resource.RLIM_INFINITY else 1 << 20
    if soft != resource.RLIM_INFINITY and soft < target:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", required=True)
    parser.add_argument("--index", type=int, default=0)
    args = parser.parse_args()
    raise_nofile_limit()
    with contextlib.suppress(KeyboardInterrupt):
        uvloop.run(serve(args))


if __name__ == "__main__":
    main()
