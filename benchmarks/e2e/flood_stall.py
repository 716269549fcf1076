"""Misbehaving devices: one floods, one stalls, 1,000 others keep talking.

    python benchmarks/e2e/flood_stall.py [--pairs 500 --rate 20 --baseline 10 --loaded 10]

Starts ``rccs serve`` (SQLite store, default limits) on free ports of
127.0.0.1 and two load processes (this script with ``--worker``):

* ``good``: 1,000 devices of 10 users, 500 pairs, each pair exchanging 20
  direct msgpack ``send``\\ s per second (open loop, paced every 2 ms); the
  body carries ``time.monotonic_ns()``, so the receiver records the one-way
  latency.
* ``bad`` (loaded phase only): a **flooder** that keeps its socket full of
  small ``send``\\ s to a sink device (pre-encoded frames, written whenever
  the kernel takes them; reconnects, with ``resume``, whenever it is closed),
  and a **pusher** that sends 32 KiB messages at 500/s to a **staller**, a
  device that stops reading its socket right after ``welcome``. When the
  server drops the staller (its outbound buffer passed ``max_outbound_bytes``:
  abort, counted as close 4413) the pusher gets ``no_route``; the staller then
  reconnects with ``resume`` and stalls again.

Timeline: connect, 2 s warm-up, baseline window, bad load starts, 2 s
settling, loaded window, stop. The server's RSS (``VmRSS``) is sampled every
0.5 s; ``/metrics`` is read at the phase boundaries.

Targets (exit status 1 when one is missed):

* p99 one-way latency of the well-behaved devices, loaded / baseline <= 2.0;
* server RSS growth (max in the loaded phase minus max in the baseline
  window) <= N x ``max_outbound_bytes`` + ``--slack-mib`` (4 MiB), N = 2
  with both misbehaving devices: the cap is per device, and each may hold
  one full outbound buffer (the staller its unread messages, the flooder
  the ``rate_limited`` errors it has not read yet). The slack covers one
  flush batch past the cap, read buffers and allocator overhead. The peak
  (``VmHWM``) growth is checked against the same bound;
* the well-behaved devices get every message, no error, no disconnect;
* the scenario was exercised: at least one ``rate_limited`` error (flood)
  and one 4413 drop (stall).

``--misbehave flood`` or ``--misbehave stall`` runs one of the two alone.

Exit status 2: the benchmark could not run (server did not start, a worker
failed). Everything is stopped after at most ``--deadline`` (85) seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import functools
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from array import array
from pathlib import Path
from typing import Any

import msgpack
import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for _path in (str(HERE), str(REPO)):  # run as a script from a checkout: this tree's rccs and loadgen/run helpers
    if _path not in sys.path:
        sys.path.insert(0, _path)

from loadgen import percentile, server_cpu_times  # noqa: E402
from run import base_env, owns_listening_port, stop_process, tail  # noqa: E402

from rccs.auth import TokenAuthority, load_or_create_secret  # noqa: E402
from rccs.config import Settings  # noqa: E402
from rccs.testing import free_ports  # noqa: E402

_BINARY = WSMsgType.BINARY
_CLOSE = WSMsgType.CLOSE
_packb = msgpack.packb
_unpackb = msgpack.unpackb
_monotonic_ns = time.monotonic_ns

BAD_USER = "fs-bad"
FLOODER, SINK, PUSHER, STALLER = "fs-flooder", "fs-flood-sink", "fs-pusher", "fs-staller"
PUSH_BODY_BYTES = 32 * 1024
PUSH_RATE = 500  # messages per second to the staller: 16 MB/s, well under send_rate
STALL_GIVE_UP = 8.0  # seconds a stall may last without a drop before the staller reconnects anyway
FLOOD_FRAMES_PER_WRITE = 1000
SERVER_START_TIMEOUT = 20.0


class BenchError(RuntimeError):
    """The benchmark could not run; the message says why."""


# ---- shared client pieces ---------------------------------------------------------


class Client(WSListener):
    """A picows client that says hello and resolves ``ready`` on ``welcome``."""

    def __init__(self, name: str, token: str, resume: str | None = None):
        super().__init__()
        self.name = name
        self.token = token
        self.resume = resume
        self.session: str | None = None
        self.transport: WSTransport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.close_code: int | None = None
        self.gone = asyncio.Event()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        hello: dict[str, Any] = {"op": "hello", "token": self.token, "device": {"type": "bench"}}
        if self.resume:
            hello["resume"] = {"session": self.resume}
        transport.send(_BINARY, _packb(hello))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"{self.name}: disconnected before welcome"))
        self.gone.set()

    def on_close(self, transport: WSTransport, frame: WSFrame) -> None:
        self.close_code = int(frame.get_close_code())  # type: ignore[call-overload]
        transport.disconnect()

    def on_welcome(self, envelope: dict[str, Any]) -> None:
        self.session = envelope["session"]
        if not self.ready.done():
            self.ready.set_result(None)

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.send_close(WSCloseCode.OK)
            self.transport.disconnect()


async def open_client(factory: Any, url: str, timeout: float = 10.0) -> Any:
    _, client = await ws_connect(factory, url, websocket_handshake_timeout=timeout)
    await asyncio.wait_for(client.ready, timeout)
    return client


async def read_command(expected: str) -> None:
    line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
    if line.strip() != expected:
        raise SystemExit(f"worker: expected {expected!r} on stdin, got {line!r}")


def emit(event: dict[str, Any]) -> None:
    print(json.dumps(event), flush=True)


# ---- the well-behaved devices ---------------------------------------------------


class GoodShared:
    def __init__(self) -> None:
        self.recv_ns = array("q")
        self.latency_ns = array("q")
        self.sent = 0
        self.errors = 0
        self.disconnects = 0
        self.running = True
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        if len(self.problems) < 10:
            self.problems.append(text)


class GoodDevice(Client):
    def __init__(self, shared: GoodShared, name: str, token: str):
        super().__init__(name, token)
        self.shared = shared
        self.to: dict[str, str] = {}
        self.next_id = 0

    def send_one(self) -> None:
        self.next_id += 1
        envelope = {"op": "send", "id": self.next_id, "to": self.to, "type": "chat", "body": {"t": _monotonic_ns()}}
        self.transport.send(_BINARY, _packb(envelope))  # type: ignore[union-attr]
        self.shared.sent += 1

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != _BINARY:
            if frame.msg_type == _CLOSE:
                self.shared.problem(f"{self.name}: closed with {frame.get_close_code()}")
                self.on_close(transport, frame)
            return
        envelope = _unpackb(frame.get_payload_as_memoryview())
        op = envelope["op"]
        if op == "msg":
            now = _monotonic_ns()
            self.shared.recv_ns.append(now)
            self.shared.latency_ns.append(now - envelope["body"]["t"])
        elif op == "welcome":
            self.on_welcome(envelope)
        elif op == "error":
            self.shared.errors += 1
            self.shared.problem(f"{self.name}: error {envelope.get('code')}: {envelope.get('message')}")

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        super().on_ws_disconnected(transport)
        if self.shared.running:
            self.shared.disconnects += 1
            self.shared.problem(f"{self.name}: disconnected during the run")


async def good_worker(args: argparse.Namespace) -> None:
    authority = TokenAuthority(load_or_create_secret(args.data_dir))
    shared = GoodShared()
    names = [f"fs-u{p % args.users}-p{p}-{side}" for p in range(args.pairs) for side in "ab"]
    gate = asyncio.Semaphore(16)

    async def connect(name: str) -> GoodDevice:
        user = name.split("-p", 1)[0]
        token = authority.issue(user, name, 3600)
        async with gate:
            return await open_client(lambda: GoodDevice(shared, name, token), args.url)  # type: ignore[no-any-return]

    started = time.monotonic()
    devices: list[GoodDevice] = list(await asyncio.gather(*(connect(n) for n in names)))
    for a, b in zip(devices[0::2], devices[1::2], strict=True):
        a.to, b.to = {"device": b.name}, {"device": a.name}
    emit({"event": "ready", "devices": len(devices), "connect_seconds": round(time.monotonic() - started, 2)})
    await read_command("start")

    stop = asyncio.ensure_future(read_command("stop"))
    rate = args.pairs * args.rate  # messages per second over all devices
    lag_ns = array("q")
    t0 = _monotonic_ns()
    due_total = 0
    cursor = 0
    tick_ns = 2_000_000
    next_tick = t0
    while not stop.done():
        now = _monotonic_ns()
        lag_ns.append(now - next_tick)
        due = (now - t0) * rate // 1_000_000_000 - due_total
        due_total += due
        for _ in range(due):
            devices[cursor].send_one()
            cursor = cursor + 1 if cursor + 1 < len(devices) else 0
        next_tick += tick_ns
        await asyncio.sleep(max(0.0, (next_tick - _monotonic_ns()) / 1e9))
    await stop
    await asyncio.sleep(1.0)  # the messages in flight land
    shared.running = False
    Path(args.samples).write_bytes(shared.recv_ns.tobytes() + shared.latency_ns.tobytes())
    for device in devices:
        device.close()
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*(d.gone.wait() for d in devices)), 5)
    lags = sorted(lag_ns)
    emit({"event": "result", "sent": shared.sent, "received": len(shared.recv_ns), "errors": shared.errors,
          "disconnects": shared.disconnects, "problems": shared.problems,
          "tick_lag_ms": {"p50": percentile(lags, 0.5) / 1e6, "p99": percentile(lags, 0.99) / 1e6,
                          "max": percentile(lags, 1.0) / 1e6}})


# ---- the misbehaving devices ------------------------------------------------------


class BadStats:
    def __init__(self) -> None:
        self.flood_frames_written = 0
        self.rate_limited = 0
        self.flooder_close_codes: collections.Counter[int] = collections.Counter()
        self.flooder_dropped = 0  # connection lost without a close frame
        self.flooder_connects = 0
        self.sink_received = 0
        self.stall_cycles = 0
        self.staller_drops = 0
        self.stall_timeouts = 0
        self.time_to_drop: list[float] = []
        self.pushed = 0
        self.pusher_errors: collections.Counter[str] = collections.Counter()
        self.problems: list[str] = []


class Flooder(Client):
    def __init__(self, stats: BadStats, token: str, resume: str | None):
        super().__init__(FLOODER, token, resume)
        self.stats = stats

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == _BINARY:
            payload = frame.get_payload_as_bytes()
            if b"rate_limited" in payload:  # cheaper than decoding every refusal
                self.stats.rate_limited += 1
            elif not self.ready.done():
                envelope = _unpackb(payload)
                if envelope.get("op") == "welcome":
                    self.on_welcome(envelope)
        elif frame.msg_type == _CLOSE:
            self.on_close(transport, frame)


class Sink(Client):
    def __init__(self, stats: BadStats, token: str):
        super().__init__(SINK, token)
        self.stats = stats

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == _BINARY:
            if self.ready.done():
                self.stats.sink_received += 1
            else:
                self.on_welcome(_unpackb(frame.get_payload_as_memoryview()))
        elif frame.msg_type == _CLOSE:
            self.on_close(transport, frame)


class Staller(Client):
    """Stops reading its socket as soon as it is welcome."""

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type == _BINARY and not self.ready.done():
            envelope = _unpackb(frame.get_payload_as_memoryview())
            if envelope.get("op") == "welcome":
                transport.underlying_transport.pause_reading()
                self.on_welcome(envelope)
        elif frame.msg_type == _CLOSE:
            self.on_close(transport, frame)


class Pusher(Client):
    def __init__(self, stats: BadStats, token: str):
        super().__init__(PUSHER, token)
        self.stats = stats
        self.cycle = 0
        self.dropped = asyncio.Event()

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != _BINARY:
            if frame.msg_type == _CLOSE:
                self.on_close(transport, frame)
            return
        envelope = _unpackb(frame.get_payload_as_memoryview())
        op = envelope.get("op")
        if op == "welcome":
            self.on_welcome(envelope)
        elif op == "error":
            code = str(envelope.get("code"))
            self.stats.pusher_errors[code] += 1
            # no_route for a message of the current stall: the staller is gone (the server dropped it).
            if code == "no_route" and envelope.get("id") == self.cycle:
                self.dropped.set()


def masked_frame(payload: bytes, mask: bytes = b"\x5a\x17\xc3\x8e") -> bytes:
    """One client-to-server binary frame (clients must mask), built once and written many times."""
    size = len(payload)
    if size < 126:
        header = bytes([0x82, 0x80 | size])
    elif size < 65536:
        header = bytes([0x82, 0x80 | 126]) + size.to_bytes(2, "big")
    else:
        header = bytes([0x82, 0x80 | 127]) + size.to_bytes(8, "big")
    masked = bytes(b ^ mask[i % 4] for i, b in enumerate(payload))
    return header + mask + masked


async def flood(args: argparse.Namespace, stats: BadStats, token: str, running: asyncio.Event) -> None:
    envelope = {"op": "send", "id": 1, "to": {"device": SINK}, "type": "flood", "body": {"n": 0}}
    blob = masked_frame(_packb(envelope)) * FLOOD_FRAMES_PER_WRITE
    session: str | None = None
    while running.is_set():
        try:
            flooder: Flooder = await open_client(functools.partial(Flooder, stats, token, session), args.url)
        except (OSError, TimeoutError, ConnectionError) as exc:
            stats.problems.append(f"flooder: reconnect failed: {exc!r}")
            await asyncio.sleep(0.1)
            continue
        stats.flooder_connects += 1
        session = flooder.session
        assert flooder.transport is not None
        underlying = flooder.transport.underlying_transport
        while running.is_set() and not flooder.gone.is_set():
            writes = 0
            # Keep the kernel's send buffer full: write while it takes everything, at most 16 blobs a tick.
            while underlying.get_write_buffer_size() == 0 and writes < 16 and not flooder.transport.is_disconnected:
                underlying.write(blob)
                stats.flood_frames_written += FLOOD_FRAMES_PER_WRITE
                writes += 1
            await asyncio.sleep(0.001)
        if flooder.gone.is_set():
            if flooder.close_code is None:
                stats.flooder_dropped += 1
            else:
                stats.flooder_close_codes[flooder.close_code] += 1
        else:
            flooder.close()


async def stall(args: argparse.Namespace, stats: BadStats, pusher: Pusher, token: str,
                running: asyncio.Event) -> None:
    session: str | None = None
    body = os.urandom(PUSH_BODY_BYTES)
    per_tick = PUSH_RATE // 100
    while running.is_set():
        try:
            staller: Staller = await open_client(functools.partial(Staller, STALLER, token, session), args.url)
        except (OSError, TimeoutError, ConnectionError) as exc:
            stats.problems.append(f"staller: reconnect failed: {exc!r}")
            await asyncio.sleep(0.1)
            continue
        session = staller.session
        stats.stall_cycles += 1
        pusher.cycle += 1
        pusher.dropped.clear()
        frame = _packb({"op": "send", "id": pusher.cycle, "to": {"device": STALLER}, "type": "bulk", "body": body})
        started = time.monotonic()
        assert pusher.transport is not None
        while running.is_set() and not pusher.dropped.is_set():
            if time.monotonic() - started > STALL_GIVE_UP:
                stats.stall_timeouts += 1
                break
            for _ in range(per_tick):
                pusher.transport.send(_BINARY, frame)
            stats.pushed += per_tick
            await asyncio.sleep(0.01)
        if pusher.dropped.is_set():
            stats.staller_drops += 1
            stats.time_to_drop.append(time.monotonic() - started)
        assert staller.transport is not None
        staller.transport.disconnect(False)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(staller.gone.wait(), 2)


async def bad_worker(args: argparse.Namespace) -> None:
    authority = TokenAuthority(load_or_create_secret(args.data_dir))
    tokens = {name: authority.issue(BAD_USER, name, 3600) for name in (FLOODER, SINK, PUSHER, STALLER)}
    stats = BadStats()
    sink: Sink = await open_client(lambda: Sink(stats, tokens[SINK]), args.url)
    pusher: Pusher = await open_client(lambda: Pusher(stats, tokens[PUSHER]), args.url)
    emit({"event": "ready"})
    await read_command("start")
    running = asyncio.Event()
    running.set()
    started = time.monotonic()
    tasks = []
    if "flood" in args.misbehave:
        tasks.append(asyncio.ensure_future(flood(args, stats, tokens[FLOODER], running)))
    if "stall" in args.misbehave:
        tasks.append(asyncio.ensure_future(stall(args, stats, pusher, tokens[STALLER], running)))
    await read_command("stop")
    running.clear()
    seconds = time.monotonic() - started
    done, _ = await asyncio.wait(tasks, timeout=10)
    for task in done:
        if task.exception() is not None:
            stats.problems.append(f"task failed: {task.exception()!r}")
    sink.close()
    pusher.close()
    drops = sorted(stats.time_to_drop)
    emit({"event": "result", "seconds": round(seconds, 2),
          "flood_frames_written": stats.flood_frames_written, "rate_limited_seen": stats.rate_limited,
          "flooder_connects": stats.flooder_connects,
          "flooder_close_codes": {str(k): v for k, v in stats.flooder_close_codes.items()},
          "flooder_dropped": stats.flooder_dropped, "sink_received": stats.sink_received,
          "stall_cycles": stats.stall_cycles, "staller_drops": stats.staller_drops,
          "stall_timeouts": stats.stall_timeouts, "pushed": stats.pushed,
          "time_to_drop_s": {"median": statistics.median(drops) if drops else None,
                             "max": drops[-1] if drops else None},
          "pusher_errors": dict(stats.pusher_errors), "problems": stats.problems[:10]})


# ---- the orchestrator -------------------------------------------------------------


def status_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) of a process in KiB."""
    values = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(("VmRSS:", "VmHWM:")):
            key, value = line.split(":", 1)
            values[key] = int(value.split()[0])
    return values["VmRSS"], values["VmHWM"]


def cpu_seconds(pid: int) -> float:
    user, system = server_cpu_times(pid)
    return user + system


def scrape(http_port: int) -> dict[str, float]:
    """The rccs_* counters of interest from /metrics, keyed like 'rccs_closes_total{code="4413"}'."""
    with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/metrics", timeout=5) as response:
        text = response.read().decode()
    wanted = ("rccs_closes_total", "rccs_errors_total", "rccs_messages_routed_total", "rccs_sessions")
    out = {}
    for line in text.splitlines():
        if line.startswith(wanted):
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


class Worker:
    def __init__(self, role: str, args: argparse.Namespace, url: str, workdir: Path):
        self.role = role
        self.args = args
        self.url = url
        self.workdir = workdir
        self.log = workdir / f"worker-{role}.log"
        self.samples = workdir / f"samples-{role}.bin"
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", self.role, "--url", self.url,
               "--data-dir", str(self.workdir / "data"), "--samples", str(self.samples),
               "--pairs", str(self.args.pairs), "--rate", str(self.args.rate), "--users", str(self.args.users),
               "--misbehave", self.args.misbehave]
        with self.log.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *cmd, cwd=REPO, env=base_env(), stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log)

    async def read(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        try:
            line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        except TimeoutError:
            raise BenchError(f"worker {self.role} gave no answer within {timeout:.0f} s:\n{tail(self.log)}") from None
        if not line:
            await self.proc.wait()
            raise BenchError(f"worker {self.role} exited with {self.proc.returncode}:\n{tail(self.log)}")
        result: dict[str, Any] = json.loads(line)
        return result

    async def command(self, text: str) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\n")
        await self.proc.stdin.drain()

    async def stop(self) -> None:
        if self.proc is not None:
            await stop_process(self.proc)


async def start_server(workdir: Path) -> tuple[asyncio.subprocess.Process, int, int]:
    data_dir = workdir / "data"
    load_or_create_secret(str(data_dir))  # the server signs and checks tokens with this same <data_dir>/token.key
    port, http_port = free_ports(2)
    env = base_env()
    env.update({"RCCS_STORE": "sqlite", "RCCS_LOG_LEVEL": "WARNING", "PYTHONFAULTHANDLER": "1"})
    cmd = [sys.executable, "-m", "rccs", "serve", "--port", str(port), "--http-port", str(http_port),
           "--data-dir", str(data_dir)]
    with (workdir / "server.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(*cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                                    stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while not owns_listening_port(proc.pid, port):
        if proc.returncode is not None or time.monotonic() > deadline:
            await stop_process(proc)
            raise BenchError(f"server did not start listening on {port}:\n{tail(workdir / 'server.log')}")
        await asyncio.sleep(0.05)
    return proc, port, http_port


def window_latencies(samples: bytes, start_ns: int, end_ns: int) -> list[int]:
    half = len(samples) // 2
    recv = array("q")
    recv.frombytes(samples[:half])
    latency = array("q")
    latency.frombytes(samples[half:])
    return sorted(lat for t, lat in zip(recv, latency, strict=True) if start_ns <= t < end_ns)


def timeline(samples: bytes, origin_ns: int, rss: list[tuple[int, int]]) -> list[dict[str, float]]:
    """Per second since ``origin_ns``: messages received, their p50/p99 latency (ms), the server's last RSS (MiB)."""
    half = len(samples) // 2
    recv = array("q")
    recv.frombytes(samples[:half])
    latency = array("q")
    latency.frombytes(samples[half:])
    buckets: dict[int, list[int]] = collections.defaultdict(list)
    for t, lat in zip(recv, latency, strict=True):
        buckets[(t - origin_ns) // 1_000_000_000].append(lat)
    rows = []
    for second in sorted(buckets):
        values = sorted(buckets[second])
        end = origin_ns + (second + 1) * 1_000_000_000
        rows.append({"second": second, "received": len(values), "p50_ms": percentile(values, 0.5) / 1e6,
                     "p99_ms": percentile(values, 0.99) / 1e6,
                     "rss_mib": next((k for t, k in reversed(rss) if t <= end), 0) / 1024})
    return rows


def mib(kib: float) -> float:
    return kib / 1024


async def orchestrate(args: argparse.Namespace) -> dict[str, Any]:
    settings = Settings()
    loop = asyncio.get_running_loop()
    workdir = Path(tempfile.mkdtemp(prefix="rccs-flood-stall-"))
    procs: list[Worker] = []
    server: asyncio.subprocess.Process | None = None
    rss: list[tuple[int, int]] = []  # (monotonic ns, VmRSS KiB)
    sampling = True

    async def sample_rss(pid: int) -> None:
        while sampling:
            with contextlib.suppress(OSError, KeyError):
                rss.append((_monotonic_ns(), status_kib(pid)[0]))
            await asyncio.sleep(0.5)

    try:
        server, port, http_port = await start_server(workdir)
        url = f"ws://127.0.0.1:{port}/v1"
        sampler = asyncio.ensure_future(sample_rss(server.pid))
        good, bad = Worker("good", args, url, workdir), Worker("bad", args, url, workdir)
        procs += [good, bad]
        await good.start()
        ready = await good.read(60)
        await bad.start()
        await bad.read(30)
        print(f"connected {ready['devices']} well-behaved devices in {ready['connect_seconds']} s", flush=True)

        def snapshot() -> dict[str, Any]:
            assert server is not None and good.proc is not None and bad.proc is not None
            return {"t": _monotonic_ns(), "server_cpu": cpu_seconds(server.pid),
                    "good_cpu": cpu_seconds(good.proc.pid), "bad_cpu": cpu_seconds(bad.proc.pid),
                    "hwm": status_kib(server.pid)[1]}

        await good.command("start")
        traffic0 = _monotonic_ns()
        await asyncio.sleep(args.warmup)
        base0 = snapshot()
        metrics0 = await loop.run_in_executor(None, scrape, http_port)
        print(f"baseline: {args.baseline:g} s ...", flush=True)
        await asyncio.sleep(args.baseline)
        base1 = snapshot()
        metrics1 = await loop.run_in_executor(None, scrape, http_port)
        await bad.command("start")
        print(f"{args.misbehave} started; settling {args.settle:g} s, then loaded: {args.loaded:g} s ...", flush=True)
        await asyncio.sleep(args.settle)
        load0 = snapshot()
        await asyncio.sleep(args.loaded)
        load1 = snapshot()
        metrics2 = await loop.run_in_executor(None, scrape, http_port)
        await bad.command("stop")
        bad_result = await bad.read(30)
        await asyncio.sleep(1.0)
        rss_after = status_kib(server.pid)[0]
        await good.command("stop")
        good_result = await good.read(30)
        sampling = False
        await sampler
        if server.returncode is not None:
            raise BenchError(f"the server exited with {server.returncode}:\n{tail(workdir / 'server.log')}")
        samples = good.samples.read_bytes()
    finally:
        sampling = False
        for worker in procs:
            await worker.stop()
        if server is not None:
            await stop_process(server)
        shutil.rmtree(workdir, ignore_errors=True)

    baseline = window_latencies(samples, base0["t"], base1["t"])
    loaded = window_latencies(samples, load0["t"], load1["t"])

    def lat(values: list[int]) -> dict[str, float]:
        return {q: percentile(values, v) / 1e6 for q, v in (("p50", 0.5), ("p99", 0.99), ("p999", 0.999))}

    def rss_max(start: int, end: int) -> int:
        return max((kib for t, kib in rss if start <= t <= end), default=0)

    def phase_cpu(a: dict[str, Any], b: dict[str, Any]) -> dict[str, float]:
        seconds = (b["t"] - a["t"]) / 1e9
        return {k: (b[k] - a[k]) / seconds for k in ("server_cpu", "good_cpu", "bad_cpu")}

    def delta(key: str) -> float:
        return metrics2.get(key, 0.0) - metrics1.get(key, 0.0)

    rss_base = rss_max(base0["t"], base1["t"])
    rss_loaded = rss_max(base1["t"], load1["t"])  # from the start of the bad load to the end of the window
    # Each misbehaving device may hold one outbound buffer up to the cap: the staller its unread messages,
    # the flooder the rate_limited errors it reads too slowly.
    buffers = len({"flood", "stall"} & set(args.misbehave.split(",")))
    bound_kib = buffers * settings.max_outbound_bytes / 1024 + args.slack_mib * 1024
    return {
        "devices": 2 * args.pairs, "rate_per_pair": args.rate, "users": args.users, "misbehave": args.misbehave,
        "settings": {"max_outbound_bytes": settings.max_outbound_bytes, "send_rate": settings.send_rate,
                     "send_burst": settings.send_burst},
        "latency_ms": {"baseline": lat(baseline), "loaded": lat(loaded)},
        "received": {"baseline": len(baseline), "loaded": len(loaded)},
        "cpu": {"baseline": phase_cpu(base0, base1), "loaded": phase_cpu(load0, load1)},
        "rss_kib": {"baseline_max": rss_base, "loaded_max": rss_loaded, "growth": rss_loaded - rss_base,
                    "hwm_baseline": base1["hwm"], "hwm_loaded": load1["hwm"],
                    "hwm_growth": load1["hwm"] - base1["hwm"], "after": rss_after, "bound": bound_kib,
                    "bound_buffers": buffers, "slack_mib": args.slack_mib,
                    "loaded_first": next((k for t, k in rss if t >= load0["t"]), 0),
                    "loaded_last": next((k for t, k in reversed(rss) if t <= load1["t"]), 0)},
        "server": {
            "rate_limited": delta('rccs_errors_total{code="rate_limited"}'),
            "closes_4413": delta('rccs_closes_total{code="4413"}'),
            "closes_1008": delta('rccs_closes_total{code="1008"}'),
            "closes_4413_in_baseline": metrics1.get('rccs_closes_total{code="4413"}', 0.0)
            - metrics0.get('rccs_closes_total{code="4413"}', 0.0),
            "sessions_resumable": metrics2.get('rccs_sessions{state="resumable"}', 0.0),
        },
        "good": good_result,
        "bad": bad_result,
        "phases_s": {name: (t - traffic0) / 1e9 for name, t in (("baseline", base0["t"]), ("bad_start", base1["t"]),
                                                               ("loaded", load0["t"]), ("end", load1["t"]))},
        "timeline": timeline(samples, traffic0, rss),
    }


def report(r: dict[str, Any], max_ratio: float) -> list[str]:
    """Print the results; return the missed targets."""
    lb, ll = r["latency_ms"]["baseline"], r["latency_ms"]["loaded"]
    cb, cl = r["cpu"]["baseline"], r["cpu"]["loaded"]
    m, g, b, s = r["rss_kib"], r["good"], r["bad"], r["server"]
    ratio = ll["p99"] / lb["p99"] if lb["p99"] else float("inf")
    print()
    print(f"{r['devices']} well-behaved devices ({r['users']} users, {r['devices'] // 2} pairs x "
          f"{r['rate_per_pair']} msgs/s); limits: max_outbound_bytes {r['settings']['max_outbound_bytes']}, "
          f"send_rate {r['settings']['send_rate']:g}/s burst {r['settings']['send_burst']}")
    print(f"{'':<28}{'baseline':>12}{'loaded':>12}")
    for q in ("p50", "p99", "p999"):
        print(f"{'one-way latency ' + q + ' (ms)':<28}{lb[q]:>12.2f}{ll[q]:>12.2f}")
    print(f"{'messages received':<28}{r['received']['baseline']:>12}{r['received']['loaded']:>12}")
    print(f"{'server RSS max (MiB)':<28}{mib(m['baseline_max']):>12.1f}{mib(m['loaded_max']):>12.1f}")
    print(f"{'server VmHWM (MiB)':<28}{mib(m['hwm_baseline']):>12.1f}{mib(m['hwm_loaded']):>12.1f}")
    for key, label in (("server_cpu", "server CPU"), ("good_cpu", "good generator CPU"), ("bad_cpu", "bad worker CPU")):
        print(f"{label:<28}{cb[key]:>12.0%}{cl[key]:>12.0%}")
    print()
    print(f"p99 ratio loaded/baseline: {ratio:.2f} (target <= {max_ratio:g})")
    print(f"RSS growth: {mib(m['growth']):.1f} MiB sampled, {mib(m['hwm_growth']):.1f} MiB peak (VmHWM); bound "
          f"{mib(m['bound']):.1f} MiB = {m['bound_buffers']} x max_outbound_bytes + {m['slack_mib']:g} MiB slack; "
          f"RSS over the loaded window "
          f"{mib(m['loaded_first']):.1f} -> {mib(m['loaded_last']):.1f} MiB, 1 s after the bad load "
          f"{mib(m['after']):.1f} MiB")
    print(f"flooder: {b['flood_frames_written']:,} frames written in {b['seconds']} s, {b['rate_limited_seen']:,} "
          f"rate_limited seen ({s['rate_limited']:,.0f} by /metrics), {b['sink_received']:,} delivered to the sink "
          f"({b['sink_received'] / b['seconds']:,.0f}/s), connects {b['flooder_connects']}, closes "
          f"{b['flooder_close_codes'] or 'none'} (/metrics 1008: {s['closes_1008']:.0f}), dropped "
          f"{b['flooder_dropped']}")
    ttd = b["time_to_drop_s"]
    ttd_text = f"median {ttd['median']:.2f} s, max {ttd['max']:.2f} s" if ttd["median"] is not None else "n/a"
    print(f"staller: {b['stall_cycles']} stalls, {b['staller_drops']} drops seen by the pusher (/metrics 4413: "
          f"{s['closes_4413']:.0f}), time to drop {ttd_text}, {b['stall_timeouts']} stalls not dropped within "
          f"{STALL_GIVE_UP:g} s, {b['pushed']:,} x 32 KiB pushed, pusher errors {b['pusher_errors']}")
    print(f"good devices: sent {g['sent']:,}, received {g['received']:,}, errors {g['errors']}, disconnects "
          f"{g['disconnects']}; generator tick lag p99 {g['tick_lag_ms']['p99']:.1f} ms, max "
          f"{g['tick_lag_ms']['max']:.1f} ms")
    for problem in g["problems"][:5] + b["problems"][:5]:
        print(f"  problem: {problem}")

    missed = []
    if not ratio <= max_ratio:
        missed.append(f"p99 ratio {ratio:.2f} > {max_ratio:g}")
    if m["growth"] > m["bound"]:
        missed.append(f"RSS growth {mib(m['growth']):.1f} MiB > {mib(m['bound']):.1f} MiB")
    if m["hwm_growth"] > m["bound"]:
        missed.append(f"peak RSS growth {mib(m['hwm_growth']):.1f} MiB > {mib(m['bound']):.1f} MiB")
    if g["errors"] or g["disconnects"] or g["received"] != g["sent"]:
        missed.append(f"well-behaved devices: {g['sent'] - g['received']} messages lost, {g['errors']} errors, "
                      f"{g['disconnects']} disconnects")
    if ("flood" in r["misbehave"] and not s["rate_limited"]) or ("stall" in r["misbehave"] and not s["closes_4413"]):
        missed.append("scenario not exercised (no rate_limited error or no 4413 drop)")
    print()
    print("targets: " + ("all met" if not missed else "MISSED: " + "; ".join(missed)))
    return missed


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=500, help="well-behaved device pairs (default 500)")
    parser.add_argument("--rate", type=int, default=20, help="messages per second per pair (default 20)")
    parser.add_argument("--users", type=int, default=10, help="users the pairs are spread over (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--baseline", type=float, default=10.0, help="baseline window, seconds")
    parser.add_argument("--settle", type=float, default=2.0, help="bad load before the loaded window, seconds")
    parser.add_argument("--loaded", type=float, default=10.0, help="loaded window, seconds")
    parser.add_argument("--max-ratio", type=float, default=2.0, help="p99 loaded/baseline target")
    parser.add_argument("--slack-mib", type=float, default=4.0, help="RSS growth allowed beyond max_outbound_bytes")
    parser.add_argument("--deadline", type=float, default=85.0, help="stop everything after this many seconds")
    parser.add_argument("--misbehave", default="flood,stall",
                        help="which misbehaving devices run in the loaded phase: flood,stall (default), flood, stall")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=("good", "bad"), help=argparse.SUPPRESS)
    parser.add_argument("--url", help=argparse.SUPPRESS)
    parser.add_argument("--data-dir", help=argparse.SUPPRESS)
    parser.add_argument("--samples", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


async def guarded(args: argparse.Namespace) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    for signum in (signal.SIGTERM, signal.SIGHUP):
        asyncio.get_running_loop().add_signal_handler(signum, task.cancel)
    try:
        return await asyncio.wait_for(orchestrate(args), args.deadline)
    except TimeoutError:
        raise BenchError(f"not finished within {args.deadline:g} s") from None


def main() -> int:
    args = parse_args()
    if args.worker:
        uvloop.run(good_worker(args) if args.worker == "good" else bad_worker(args))
        return 0
    try:
        results = uvloop.run(guarded(args))
    except BenchError as exc:
        print(f"flood_stall.py: error: {exc}", file=sys.stderr)
        return 2
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("flood_stall.py: interrupted", file=sys.stderr)
        return 130
    missed = report(results, args.max_ratio)
    if args.json:
        Path(args.json).write_text(json.dumps(results | {"missed": missed}, indent=2) + "\n")
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
