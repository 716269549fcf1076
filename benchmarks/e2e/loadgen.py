"""Load generator for the e2e benchmark: P pairs of devices bouncing messages.

Each pair starts with W messages in flight (split between its two devices);
a device that receives a message answers its partner with a new one, so
every pair keeps W messages in flight. The body carries
``time.monotonic_ns()`` at send time (CLOCK_MONOTONIC is system-wide on
Linux), so the receiver computes the one-way latency.

Modes:

* ``rccs``: protocol v1 over msgpack: ``hello`` with a token minted from
  ``RCCS_TOKEN_SECRET``, ``send`` with ``to: {"device": partner}``. With
  ``--ack`` the send asks for receipts, the receiver acks every ``msg`` and the
  sender consumes the ``routed`` and ``delivered`` receipts.
* ``baseline``: the framing of ``baseline_router.py`` (4-byte target
  connection number, then the msgpack body).

After connecting (and, with ``--sync-stdin``, after a line on stdin, so that
several generator processes start together), traffic runs for ``--warmup``
seconds, then for ``--seconds`` measured seconds. Everything reported covers
the measured window only. The result is one JSON line on stdout.

    python benchmarks/e2e/loadgen.py --mode baseline --url ws://127.0.0.1:9000/ --pairs 50 --inflight 4
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import math
import os
import sys
import time
from array import array
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgpack
import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

_BINARY = WSMsgType.BINARY
_CLOSE = WSMsgType.CLOSE
_CLK_TCK = os.sysconf("SC_CLK_TCK")
_packb = msgpack.packb
_unpackb = msgpack.unpackb
_monotonic_ns = time.monotonic_ns


def server_cpu_times(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a whole process (all threads), from /proc/<pid>/stat."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        raise SystemExit(f"loadgen: server process {pid} is gone (it exited during the run)") from None
    # The command name (field 2) may contain spaces; the fields after it start past its closing ")".
    fields = text[text.rindex(")") + 2:].split()
    utime, stime = int(fields[11]), int(fields[12])  # fields 14 and 15 of proc(5), 1-based
    return utime / _CLK_TCK, stime / _CLK_TCK


def percentile(sorted_values: list[int], q: float) -> int:
    """Nearest-rank percentile of already sorted values."""
    if not sorted_values:
        return 0
    rank = min(len(sorted_values), max(1, math.ceil(q * len(sorted_values))))
    return sorted_values[rank - 1]


class Shared:
    """Counters of one generator process; the measured window resets them."""

    def __init__(self) -> None:
        self.running = True  # False once the window ends: received messages are no longer answered
        self.latency_ns = array("q")
        self.delivered_latency_ns = array("q")
        self.received = 0
        self.sent = 0
        self.receipts_routed = 0
        self.receipts_delivered = 0
        self.receipts_failed = 0
        self.receipts_kept = 0  # accepted / queued: kept in the shared inbox first (several nodes, protocol.md 12)
        self.repeats = 0  # ack:true messages received again (same id)
        self.errors = 0
        self.unexpected_disconnects = 0
        self.problems: list[str] = []  # first few error envelopes / disconnects, for the report

    def reset(self) -> None:
        self.latency_ns = array("q")
        self.delivered_latency_ns = array("q")
        self.received = self.sent = 0
        self.receipts_routed = self.receipts_delivered = self.receipts_failed = self.receipts_kept = 0
        self.repeats = 0

    def problem(self, text: str) -> None:
        if len(self.problems) < 10:
            self.problems.append(text)


class Device(WSListener):
    """One client connection; ``ready`` resolves on ``welcome`` (rccs) or on the assigned number (baseline)."""

    def __init__(self, shared: Shared, name: str):
        super().__init__()
        self.shared = shared
        self.name = name
        self.transport: WSTransport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"{self.name}: disconnected before being ready"))
        if self.shared.running:
            self.shared.unexpected_disconnects += 1
            self.shared.problem(f"{self.name}: disconnected during the run")

    def on_close_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if self.shared.running:
            self.shared.problem(f"{self.name}: server closed with {frame.get_close_code()} {frame.get_close_reason()}")
        transport.disconnect()

    def send_one(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.send_close(WSCloseCode.OK)
            self.transport.disconnect()


class RccsDevice(Device):
    def __init__(self, shared: Shared, name: str, token: str, ack: bool):
        super().__init__(shared, name)
        self.token = token
        self.ack = ack
        self.to: dict[str, str] = {}
        self.next_id = 0
        self.sent_at: dict[int, int] = {}  # msg id -> send time, only with ack, for the delivered latency
        self.seen: set[int] = set()  # ids of ack:true messages received (the partner is the only sender)

    def on_ws_connected(self, transport: WSTransport) -> None:
        super().on_ws_connected(transport)
        hello = {"op": "hello", "token": self.token, "device": {"type": "bench"}}
        transport.send(_BINARY, _packb(hello))

    def send_one(self) -> None:
        self.next_id += 1
        now = _monotonic_ns()
        envelope: dict[str, Any] = {"op": "send", "id": self.next_id, "to": self.to, "type": "bench",
                                    "body": {"sent_ns": now}}
        if self.ack:
            envelope["ack"] = True
            self.sent_at[self.next_id] = now
        self.transport.send(_BINARY, _packb(envelope))  # type: ignore[union-attr]
        self.shared.sent += 1

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != _BINARY:
            if frame.msg_type == _CLOSE:
                self.on_close_frame(transport, frame)
            return
        envelope = _unpackb(frame.get_payload_as_memoryview())
        op = envelope["op"]
        shared = self.shared
        if op == "msg":
            if envelope["ack"]:
                transport.send(_BINARY, _packb({"op": "ack", "seq": envelope["seq"]}))
                # At least once: a repeat (same id) is acked again but neither counted nor answered, or the
                # loop would carry more than W messages from then on.
                if envelope["id"] in self.seen:
                    shared.repeats += 1
                    return
                self.seen.add(envelope["id"])
            shared.latency_ns.append(_monotonic_ns() - envelope["body"]["sent_ns"])
            shared.received += 1
            if shared.running:
                self.send_one()
        elif op == "receipt":
            status = envelope["status"]
            if status == "routed":
                shared.receipts_routed += 1
            elif status == "delivered":
                shared.receipts_delivered += 1
                sent = self.sent_at.pop(envelope["id"], None)
                if sent is not None:
                    shared.delivered_latency_ns.append(_monotonic_ns() - sent)
            elif status in ("accepted", "queued"):
                shared.receipts_kept += 1
            else:
                shared.receipts_failed += 1
                shared.problem(f"{self.name}: receipt {envelope}")
        elif op == "welcome":
            if not self.ready.done():
                self.ready.set_result(None)
        elif op == "error":
            shared.errors += 1
            shared.problem(f"{self.name}: error {envelope.get('code')}: {envelope.get('message')}")


class BaselineDevice(Device):
    def __init__(self, shared: Shared, name: str):
        super().__init__(shared, name)
        self.number = -1
        self.partner_prefix = b""

    def send_one(self) -> None:
        body = _packb({"sent_ns": _monotonic_ns()})
        self.transport.send(_BINARY, self.partner_prefix + body)  # type: ignore[union-attr]
        self.shared.sent += 1

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != _BINARY:
            if frame.msg_type == _CLOSE:
                self.on_close_frame(transport, frame)
            return
        payload = frame.get_payload_as_memoryview()
        if self.number < 0:
            self.number = int.from_bytes(payload, "little")
            self.ready.set_result(None)
            return
        shared = self.shared
        shared.latency_ns.append(_monotonic_ns() - _unpackb(payload[4:])["sent_ns"])
        shared.received += 1
        if shared.running:
            self.send_one()


async def connect_all(factories: list[Callable[[], Device]], urls: list[str], timeout: float) -> list[Device]:
    """Open every connection (a few at a time) and wait until each is ready; device i connects to ``urls[i]``."""
    gate = asyncio.Semaphore(16)

    async def one(factory: Callable[[], Device], url: str) -> Device:
        async with gate:
            _, listener = await ws_connect(factory, url, websocket_handshake_timeout=timeout)
            assert isinstance(listener, Device)
            await asyncio.wait_for(listener.ready, timeout)
            return listener

    return list(await asyncio.gather(*(one(f, u) for f, u in zip(factories, urls, strict=True))))


def device_urls(args: argparse.Namespace) -> list[str]:
    """The URL each device connects to: ``--url`` (one), or the ``--placement`` digit of each device (several)."""
    count = 2 * args.pairs
    if not args.placement:
        return [args.url[0]] * count
    return [args.url[int(digit)] for digit in args.placement]


def cpu_of(pids: list[int]) -> dict[str, float]:
    return {str(pid): sum(server_cpu_times(pid)) for pid in pids}


def make_pairs(args: argparse.Namespace, shared: Shared) -> list[Callable[[], Device]]:
    prefix = args.device_prefix
    names = [f"{prefix}-p{i}-{side}" for i in range(args.pairs) for side in "ab"]
    if args.mode == "baseline":
        return [functools.partial(BaselineDevice, shared, name) for name in names]
    secret = os.environ.get("RCCS_TOKEN_SECRET", "")
    if not secret:
        raise SystemExit("loadgen: mode rccs needs RCCS_TOKEN_SECRET (the server's token secret)")
    from rccs.auth import TokenAuthority

    authority = TokenAuthority(secret.encode())
    tokens = {name: authority.issue(args.user, name, 3600) for name in names}
    return [functools.partial(RccsDevice, shared, name, tokens[name], args.ack) for name in names]


def link(devices: list[Device]) -> None:
    for a, b in zip(devices[0::2], devices[1::2], strict=True):
        for me, partner in ((a, b), (b, a)):
            if isinstance(me, RccsDevice):
                me.to = {"device": partner.name}
            elif isinstance(me, BaselineDevice) and isinstance(partner, BaselineDevice):
                me.partner_prefix = partner.number.to_bytes(4, "little")


async def run(args: argparse.Namespace) -> dict[str, Any]:
    shared = Shared()
    started = time.monotonic()
    devices = await connect_all(make_pairs(args, shared), device_urls(args), args.connect_timeout)
    connect_seconds = time.monotonic() - started
    link(devices)
    # Several nodes: a device that has just said hello on one node is known to the others a moment later
    # (presence travels through Redis Pub/Sub); a send before that answers offline / no_route.
    await asyncio.sleep(args.settle)
    if args.sync_stdin:
        print(json.dumps({"event": "ready", "connections": len(devices)}), flush=True)
        line = await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        if not line:
            raise SystemExit("loadgen: stdin closed before the start signal")

    for pair_start in range(0, len(devices), 2):
        for k in range(args.inflight):
            devices[pair_start + k % 2].send_one()
    await asyncio.sleep(args.warmup)

    shared.reset()
    cpu0 = time.process_time()
    server0 = server_cpu_times(args.server_pid) if args.server_pid else (0.0, 0.0)
    watched0 = cpu_of(args.watch_pid)
    wall0 = time.monotonic()
    await asyncio.sleep(args.seconds)
    wall1 = time.monotonic()
    watched1 = cpu_of(args.watch_pid)
    server1 = server_cpu_times(args.server_pid) if args.server_pid else (0.0, 0.0)
    cpu1 = time.process_time()
    received, sent = shared.received, shared.sent
    routed, delivered, failed = shared.receipts_routed, shared.receipts_delivered, shared.receipts_failed
    kept, repeats = shared.receipts_kept, shared.repeats
    latency = sorted(shared.latency_ns[:received])
    delivered_latency = sorted(shared.delivered_latency_ns)
    shared.running = False

    # Let the messages still in flight land, so the server sees orderly closes, not resets mid-frame.
    await asyncio.sleep(0.2)
    for device in devices:
        device.close()
    waits = [d.transport.wait_disconnected() for d in devices if d.transport is not None]
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(asyncio.gather(*waits), 5)

    if args.samples_out:
        Path(args.samples_out).write_bytes(array("q", latency).tobytes())
    window = wall1 - wall0
    result: dict[str, Any] = {
        "mode": args.mode,
        "ack": bool(args.ack),
        "pairs": args.pairs,
        "inflight": args.inflight,
        "connect_seconds": round(connect_seconds, 3),
        "window_seconds": round(window, 4),
        "received": received,
        "sent": sent,
        "msgs_per_s": received / window,
        "latency_us": {name: percentile(latency, q) / 1000 for name, q in
                       (("p50", 0.50), ("p99", 0.99), ("p999", 0.999), ("max", 1.0))},
        "generator_cpu_s": cpu1 - cpu0,
        "generator_cpu_util": (cpu1 - cpu0) / window,
        "errors": shared.errors,
        "unexpected_disconnects": shared.unexpected_disconnects,
        "problems": shared.problems,
    }
    if args.watch_pid:
        result["watched_cpu_s"] = {pid: watched1[pid] - watched0[pid] for pid in watched0}
    if args.server_pid:
        user, system = server1[0] - server0[0], server1[1] - server0[1]
        result["server_user_s"] = user
        result["server_sys_s"] = system
        result["server_cpu_s"] = user + system
        result["server_cpu_util"] = (user + system) / window
        result["server_cpu_us_per_msg"] = (user + system) * 1e6 / received if received else None
    if args.ack:
        result["receipts"] = {"routed": routed, "kept": kept, "delivered": delivered, "failed": failed}
        result["repeats"] = repeats
        result["delivered_latency_us"] = {name: percentile(delivered_latency, q) / 1000 for name, q in
                                          (("p50", 0.50), ("p99", 0.99), ("p999", 0.999))}
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mode", choices=("rccs", "baseline"), required=True)
    parser.add_argument("--url", required=True, action="append",
                        help="ws://127.0.0.1:PORT/v1 (rccs) or ws://127.0.0.1:PORT/; repeated: several servers "
                             "(with --placement)")
    parser.add_argument("--placement", default="",
                        help="one digit per device (p0-a, p0-b, p1-a, ...): the index of the --url it connects to")
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--inflight", type=int, default=4, help="messages in flight per pair")
    parser.add_argument("--seconds", type=float, default=5.0, help="measured window")
    parser.add_argument("--warmup", type=float, default=1.0, help="traffic before the measured window")
    parser.add_argument("--ack", action="store_true", help="rccs: ask for receipts and ack every msg")
    parser.add_argument("--server-pid", type=int, default=0, help="read this process's CPU time over the window")
    parser.add_argument("--watch-pid", type=int, action="append", default=[],
                        help="also report this process's CPU seconds over the window (repeatable: watched_cpu_s)")
    parser.add_argument("--user", default="bench")
    parser.add_argument("--device-prefix", default="g0", help="unique per generator process")
    parser.add_argument("--samples-out", help="write the window's one-way latencies (int64 ns) to this file")
    parser.add_argument("--sync-stdin", action="store_true", help="after connecting, wait for a line on stdin")
    parser.add_argument("--connect-timeout", type=float, default=10.0)
    parser.add_argument("--settle", type=float, default=0.0, help="seconds to wait after connecting, before sending")
    args = parser.parse_args(argv)
    if args.pairs < 1 or args.inflight < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("--pairs and --inflight must be >= 1, --seconds > 0, --warmup >= 0")
    if args.placement and (len(args.placement) != 2 * args.pairs
                           or any(not c.isdigit() or int(c) >= len(args.url) for c in args.placement)):
        parser.error("--placement needs one digit per device (2 x --pairs), each the index of a --url")
    if len(args.url) > 1 and not args.placement:
        parser.error("several --url need --placement")
    if args.ack and args.mode != "rccs":
        parser.error("--ack only applies to --mode rccs")
    return args


def main() -> None:
    args = parse_args()
    result = uvloop.run(run(args))
    print(json.dumps(result), flush=True)
    if result["errors"] or result["unexpected_disconnects"]:
        sys.exit(3)


if __name__ == "__main__":
    main()
