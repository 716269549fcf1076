"""Soak: steady acked traffic plus connection churn for minutes; does the server's memory stay flat?

    python benchmarks/e2e/soak.py [--minutes 30 --warmup-minutes 5 --pairs 100 --rate 5 --churn 20]

Starts ``rccs serve`` (SQLite store, default settings but ``idempotency_cache``, see below) on free ports
of 127.0.0.1 and, in this process, the devices:

* ``--pairs`` (100) pairs of one user each: the first device of a pair sends ``--rate`` (5) ``"ack": true``
  messages a second to the second (msgpack, ``--body-bytes`` (200) of body), which acks every ``msg``;
  each send is paced (open loop), with a new id.
* churn: ``--churn`` (20) connections a second from a pool of ``--churn-devices`` (1,000) other devices
  (of 10 users): each says ``hello``, waits for ``welcome``, stays ``--churn-hold`` (2) seconds and
  closes with 1000, which ends its session. The pool is fixed: the soak churns connections and
  sessions, not the set of known devices (each new device is a registry entry kept for good).

The server's RSS (``VmRSS``) is sampled every ``--sample-seconds`` (5). After ``--warmup-minutes`` the
growth is judged: the mean RSS of the last minute against the mean of the first minute after the warm-up,
and the least-squares slope over everything after the warm-up (MiB per hour). It fails (exit status 1)
when the last minute is more than ``--tolerance`` (10 %) above the first, when any sample after the
warm-up passes that bound by more than the same tolerance, or when traffic failed (a message not
delivered, an error, a disconnect of a pair device, a churn connection that did not get ``welcome``).

``idempotency_cache``: at 5 sends a second a device reaches the default cap (10,000 ids) after 33 min,
longer than the soak. The remembered ids are memory that grows, by design, up to the cap; the soak wants
the steady state, so it runs with ``--idempotency-cache`` (1,000: reached after 200 s, within the
warm-up) and the ids are then replaced at the rate they are sent. ``--idempotency-cache 10000`` measures
the default instead (growth expected: ids x the bytes per id of docs/operations.md "Memory").

``--tracemalloc``: the server runs under ``benchmarks/e2e/soak_server.py``, which traces allocations and
writes a snapshot (top allocation sites and live objects per type) on SIGUSR1; the soak takes one after
the warm-up and one at the end and prints what grew in between. Tracing makes the server slower and
bigger: RSS figures of such a run are not the ones to quote.

Results: one JSON document (``--json``, default ``soak-<UTC time>.json`` in the work directory, which is
printed) and a line for docs/performance.md. Exit status 2: the soak could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import msgpack
import uvloop
from picows import WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
for _path in (str(HERE), str(REPO)):  # run as a script from a checkout: this tree's rccs and run helpers
    if _path not in sys.path:
        sys.path.insert(0, _path)

from run import base_env, owns_listening_port, stop_process, tail  # noqa: E402

from rccs.auth import TokenAuthority, load_or_create_secret  # noqa: E402
from rccs.testing import free_ports  # noqa: E402

_BINARY = WSMsgType.BINARY
_CLOSE = WSMsgType.CLOSE
_packb = msgpack.packb
_unpackb = msgpack.unpackb
SERVER_START_TIMEOUT = 30.0
CONNECT_TIMEOUT = 10.0
CHURN_USERS = 10


class SoakError(RuntimeError):
    """The soak could not run; the message says why."""


class Stats:
    def __init__(self) -> None:
        self.sent = 0
        self.received = 0
        self.routed = 0
        self.delivered = 0
        self.other_receipts = 0
        self.errors = 0
        self.pair_disconnects = 0
        self.churn_connects = 0
        self.churn_failed = 0
        self.running = True
        self.problems: list[str] = []

    def problem(self, text: str) -> None:
        if len(self.problems) < 20:
            self.problems.append(text)


class Device(WSListener):
    def __init__(self, stats: Stats, name: str, token: str, pair: bool):
        super().__init__()
        self.stats = stats
        self.name = name
        self.token = token
        self.pair = pair
        self.transport: WSTransport | None = None
        self.ready: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self.gone = asyncio.get_running_loop().create_future()
        self.to: dict[str, str] = {}
        self.next_id = 0
        self.acks = True  # ack every msg that asks for it

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        transport.send(_BINARY, _packb({"op": "hello", "token": self.token, "device": {"type": "soak"}}))

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        if not self.ready.done():
            self.ready.set_exception(ConnectionError(f"{self.name}: disconnected before welcome"))
        if not self.gone.done():
            self.gone.set_result(None)
        if self.pair and self.stats.running:
            self.stats.pair_disconnects += 1
            self.stats.problem(f"{self.name}: disconnected during the soak")

    def send(self, body: bytes) -> None:
        self.next_id += 1
        self.transport.send(_BINARY, _packb({"op": "send", "id": self.next_id, "to": self.to,  # type: ignore[union-attr]
                                             "type": "soak", "ack": True, "body": body}))
        self.stats.sent += 1

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        if frame.msg_type != _BINARY:
            if frame.msg_type == _CLOSE:
                transport.disconnect()
            return
        envelope = _unpackb(frame.get_payload_as_memoryview())
        op = envelope["op"]
        stats = self.stats
        if op == "msg":
            stats.received += 1
            if envelope.get("ack") and self.acks:
                transport.send(_BINARY, _packb({"op": "ack", "seq": envelope["seq"]}))
        elif op == "receipt":
            status = envelope["status"]
            if status == "routed" and envelope.get("devices"):
                stats.routed += 1
            elif status == "delivered":
                stats.delivered += 1
            else:
                stats.other_receipts += 1
                stats.problem(f"{self.name}: receipt {envelope}")
        elif op == "welcome":
            if not self.ready.done():
                self.ready.set_result(None)
        elif op == "error":
            stats.errors += 1
            stats.problem(f"{self.name}: error {envelope.get('code')}: {envelope.get('message')}")

    def close(self) -> None:
        if self.transport is not None and not self.transport.is_disconnected:
            self.transport.send_close(WSCloseCode.OK)
            self.transport.disconnect()


async def open_device(stats: Stats, name: str, token: str, pair: bool, url: str) -> Device:
    transport, device = await ws_connect(lambda: Device(stats, name, token, pair), url,
                                         websocket_handshake_timeout=CONNECT_TIMEOUT)
    try:
        await asyncio.wait_for(device.ready, CONNECT_TIMEOUT)
    except BaseException:
        transport.disconnect()  # no welcome in time: not left open (it would hold a session and its buffers)
        raise
    return device  # type: ignore[no-any-return]


def status_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise SoakError(f"no VmRSS for {pid}")


async def start_server(args: argparse.Namespace, workdir: Path) -> tuple[asyncio.subprocess.Process, int, int]:
    data_dir = workdir / "data"
    load_or_create_secret(str(data_dir))  # the server signs and checks tokens with this same <data_dir>/token.key
    port, http_port = free_ports(2)
    env = base_env()
    env.update({"RCCS_STORE": "sqlite", "RCCS_LOG_LEVEL": "WARNING", "PYTHONFAULTHANDLER": "1",
                "RCCS_IDEMPOTENCY_CACHE": str(args.idempotency_cache)})
    if "RCCS_PUREPYTHON" in os.environ:
        env["RCCS_PUREPYTHON"] = os.environ["RCCS_PUREPYTHON"]
    program = [str(HERE / "soak_server.py"), str(workdir / "tracemalloc")] if args.tracemalloc else ["-m", "rccs"]
    cmd = [sys.executable, *program, "serve", "--port", str(port), "--http-port", str(http_port),
           "--data-dir", str(data_dir)]
    with (workdir / "server.log").open("wb") as log:
        proc = await asyncio.create_subprocess_exec(*cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                                    stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + SERVER_START_TIMEOUT
    while not owns_listening_port(proc.pid, port):
        if proc.returncode is not None or time.monotonic() > deadline:
            await stop_process(proc)
            raise SoakError(f"server did not start listening on {port}:\n{tail(workdir / 'server.log')}")
        await asyncio.sleep(0.05)
    return proc, port, http_port


async def pace(period: float, until: float, tick: Any) -> None:
    """Call ``tick()`` every ``period`` seconds (open loop: late ticks are caught up) until ``until``."""
    next_at = time.monotonic()
    while next_at < until:
        tick()
        next_at += period
        delay = next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)


async def tracemalloc_snapshot(proc: asyncio.subprocess.Process, workdir: Path, name: str) -> dict[str, Any]:
    """Ask the traced server for a snapshot; its JSON once written."""
    directory = workdir / "tracemalloc"
    before = set(directory.glob("*.json")) if directory.exists() else set()
    proc.send_signal(signal.SIGUSR1)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        await asyncio.sleep(0.5)
        if directory.exists():
            new = [p for p in directory.glob("*.json") if p not in before and not p.name.endswith(".tmp")]
            if new:
                data: dict[str, Any] = json.loads(new[0].read_text())
                new[0].rename(directory / f"{name}.json")
                return data
    raise SoakError("the traced server wrote no snapshot")


def diff_snapshots(first: dict[str, Any], last: dict[str, Any], top: int = 15) -> dict[str, Any]:
    def growth(a: dict[str, list[int]], b: dict[str, list[int]]) -> list[dict[str, Any]]:
        rows = []
        for key in set(a) | set(b):
            size0, count0 = a.get(key, [0, 0])
            size1, count1 = b.get(key, [0, 0])
            rows.append({"where": key, "bytes": size1 - size0, "count": count1 - count0, "bytes_now": size1})
        rows.sort(key=lambda row: -row["bytes"])
        return rows[:top]
    return {"sites": growth(first["sites"], last["sites"]), "types": growth(first["types"], last["types"]),
            "traced_bytes": last["traced"] - first["traced"]}


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def slope_per_hour(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (seconds, MiB): MiB per hour."""
    if len(points) < 2:
        return 0.0
    mx = mean([t for t, _ in points])
    my = mean([v for _, v in points])
    var = sum((t - mx) ** 2 for t, _ in points)
    if var == 0:
        return 0.0
    return sum((t - mx) * (v - my) for t, v in points) / var * 3600


async def soak(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    proc, port, _ = await start_server(args, workdir)
    url = f"ws://127.0.0.1:{port}/v1"
    stats = Stats()
    authority = TokenAuthority(load_or_create_secret(str(workdir / "data")))
    body = os.urandom(args.body_bytes)
    samples: list[tuple[float, int]] = []  # (seconds since traffic started, VmRSS KiB)
    snapshots: dict[str, Any] = {}
    devices: list[Device] = []
    churners: set[Device] = set()
    tasks: list[asyncio.Future[Any]] = []
    try:
        gate = asyncio.Semaphore(16)

        async def connect(name: str, user: str) -> Device:
            async with gate:
                return await open_device(stats, name, authority.issue(user, name, 86400), True, url)

        names = [(f"soak-p{p}-{side}", f"soak-u{p}") for p in range(args.pairs) for side in "ab"]
        devices = list(await asyncio.gather(*(connect(n, u) for n, u in names)))
        senders = devices[0::2]
        for a, b in zip(devices[0::2], devices[1::2], strict=True):
            a.to = {"device": b.name}
        churn_names = [(f"soak-c{i}", f"soak-cu{i % CHURN_USERS}") for i in range(args.churn_devices)]
        churn_tokens = {name: authority.issue(user, name, 86400) for name, user in churn_names}
        start = time.monotonic()
        end = start + args.minutes * 60
        warm_end = start + args.warmup_minutes * 60

        def send_all() -> None:
            for sender in senders:
                sender.send(body)

        async def churn_one(name: str) -> None:
            try:
                device = await open_device(stats, name, churn_tokens[name], False, url)
            except (OSError, TimeoutError, ConnectionError) as exc:
                stats.churn_failed += 1
                stats.problem(f"{name}: churn connect failed: {exc!r}")
                return
            stats.churn_connects += 1
            churners.add(device)
            try:
                await asyncio.sleep(args.churn_hold)
            finally:
                device.close()
                churners.discard(device)

        churn_index = 0

        def churn() -> None:
            nonlocal churn_index
            name = churn_names[churn_index % len(churn_names)][0]
            churn_index += 1
            tasks.append(asyncio.ensure_future(churn_one(name)))
            if len(tasks) > 1000:
                tasks[:] = [t for t in tasks if not t.done()]

        async def sample() -> None:
            while time.monotonic() < end:
                samples.append((time.monotonic() - start, status_kib(proc.pid)))
                await asyncio.sleep(args.sample_seconds)
            samples.append((time.monotonic() - start, status_kib(proc.pid)))

        async def snapshot_after_warmup() -> None:
            await asyncio.sleep(max(0.0, warm_end - time.monotonic()))
            snapshots["warm"] = await tracemalloc_snapshot(proc, workdir, "after-warmup")

        async def progress() -> None:
            while time.monotonic() < end:
                await asyncio.sleep(60)
                rss = samples[-1][1] / 1024 if samples else 0
                print(f"  {(time.monotonic() - start) / 60:5.1f} min: RSS {rss:6.1f} MiB, sent {stats.sent:,}, "
                      f"delivered {stats.delivered:,}, churn {stats.churn_connects:,}", flush=True)

        jobs = [pace(1 / args.rate, end, send_all), pace(1 / args.churn, end, churn), sample(), progress()]
        if args.tracemalloc:
            jobs.append(snapshot_after_warmup())
        await asyncio.gather(*jobs)
        # Drain: the last sends are delivered and acked, the last churners leave.
        drain_until = time.monotonic() + 30
        while time.monotonic() < drain_until and (stats.delivered < stats.sent or churners):
            await asyncio.sleep(0.2)
        if args.tracemalloc:
            snapshots["end"] = await tracemalloc_snapshot(proc, workdir, "end")
        stats.running = False
    finally:
        stats.running = False
        for task in tasks:
            task.cancel()
        for device in devices + list(churners):
            device.close()
        if proc.returncode is not None:
            raise SoakError(f"the server exited with {proc.returncode}:\n{tail(workdir / 'server.log')}")
        await stop_process(proc)

    warm_s = args.warmup_minutes * 60
    after = [(t, kib / 1024) for t, kib in samples if t >= warm_s]
    first = [v for t, v in after if t < warm_s + 60]
    last = [v for t, v in after if t >= args.minutes * 60 - 60]
    result: dict[str, Any] = {
        "when": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "implementation": "python" if os.environ.get("RCCS_PUREPYTHON") else "compiled unless not built",
        "settings": {"minutes": args.minutes, "warmup_minutes": args.warmup_minutes, "pairs": args.pairs,
                     "rate_per_sender": args.rate, "body_bytes": args.body_bytes, "churn_per_s": args.churn,
                     "churn_devices": args.churn_devices, "churn_hold_s": args.churn_hold,
                     "idempotency_cache": args.idempotency_cache, "tolerance": args.tolerance},
        "traffic": {"sent": stats.sent, "received": stats.received, "routed": stats.routed,
                    "delivered": stats.delivered, "other_receipts": stats.other_receipts, "errors": stats.errors,
                    "pair_disconnects": stats.pair_disconnects, "churn_connects": stats.churn_connects,
                    "churn_failed": stats.churn_failed, "problems": stats.problems},
        "rss_mib": {"start": samples[0][1] / 1024 if samples else 0,
                    "after_warmup_first_minute": round(mean(first), 2), "last_minute": round(mean(last), 2),
                    "max_after_warmup": round(max((v for _, v in after), default=0), 2),
                    "growth_per_hour_after_warmup": round(slope_per_hour(after), 2)},
        "samples": [[round(t, 1), kib] for t, kib in samples],
    }
    if "warm" in snapshots and "end" in snapshots:
        result["tracemalloc_growth"] = diff_snapshots(snapshots["warm"], snapshots["end"])
    return result


def judge(result: dict[str, Any], tolerance: float) -> list[str]:
    missed = []
    rss, traffic = result["rss_mib"], result["traffic"]
    base = rss["after_warmup_first_minute"]
    if base <= 0 or rss["last_minute"] <= 0:
        missed.append("too few RSS samples after the warm-up (is --minutes > --warmup-minutes + 1?)")
        return missed
    if rss["last_minute"] > base * (1 + tolerance):
        missed.append(f"RSS grew {100 * (rss['last_minute'] / base - 1):.1f} % after the warm-up "
                      f"({base:.1f} -> {rss['last_minute']:.1f} MiB), more than {100 * tolerance:.0f} %")
    if rss["max_after_warmup"] > base * (1 + tolerance) ** 2:
        missed.append(f"RSS peaked at {rss['max_after_warmup']:.1f} MiB after the warm-up ({base:.1f} MiB at its end)")
    if traffic["delivered"] != traffic["sent"] or traffic["received"] < traffic["sent"]:
        missed.append(f"{traffic['sent']:,} sent, {traffic['received']:,} received, {traffic['delivered']:,} delivered")
    for key in ("errors", "other_receipts", "pair_disconnects", "churn_failed"):
        if traffic[key]:
            missed.append(f"{key}: {traffic[key]}")
    return missed


def report(result: dict[str, Any]) -> None:
    s, t, r = result["settings"], result["traffic"], result["rss_mib"]
    print(f"soak {result['when']}: {s['minutes']} min ({s['warmup_minutes']} warm-up), {s['pairs']} pairs x "
          f"{s['rate_per_sender']}/s acked, {s['body_bytes']} B bodies, churn {s['churn_per_s']}/s over "
          f"{s['churn_devices']} devices, idempotency_cache {s['idempotency_cache']}")
    print(f"traffic: {t['sent']:,} sent, {t['delivered']:,} delivered, {t['churn_connects']:,} churn connections")
    print(f"RSS (MiB): start {r['start']:.1f}, first minute after warm-up {r['after_warmup_first_minute']:.1f}, "
          f"last minute {r['last_minute']:.1f}, max {r['max_after_warmup']:.1f}; "
          f"slope after warm-up {r['growth_per_hour_after_warmup']:+.1f} MiB/h")
    if "tracemalloc_growth" in result:
        growth = result["tracemalloc_growth"]
        print(f"tracemalloc: traced bytes {growth['traced_bytes']:+,} between the warm-up and the end")
        for row in growth["sites"][:10]:
            print(f"  {row['bytes']:+12,} B {row['count']:+9,} blocks  {row['where']}")
        for row in growth["types"][:10]:
            print(f"  {row['bytes']:+12,} B {row['count']:+9,} objects {row['where']}")
    base = r["after_warmup_first_minute"] or 1
    print(f"docs line: | {result['when']} | {s['minutes']} min, {s['pairs']} pairs x {s['rate_per_sender']}/s + "
          f"{s['churn_per_s']} connections/s | {t['sent']:,} sent, {t['delivered']:,} delivered | RSS "
          f"{r['after_warmup_first_minute']:.1f} -> {r['last_minute']:.1f} MiB "
          f"({100 * (r['last_minute'] / base - 1):+.1f} %), {r['growth_per_hour_after_warmup']:+.1f} MiB/h |")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=30.0)
    parser.add_argument("--warmup-minutes", type=float, default=None,
                        help="default: 5, or a third of --minutes when that is shorter than 15")
    parser.add_argument("--pairs", type=int, default=100)
    parser.add_argument("--rate", type=float, default=5.0, help="acked sends a second per sending device")
    parser.add_argument("--body-bytes", type=int, default=200)
    parser.add_argument("--churn", type=float, default=20.0, help="connections a second")
    parser.add_argument("--churn-devices", type=int, default=1000)
    parser.add_argument("--churn-hold", type=float, default=2.0, help="seconds a churn connection stays")
    parser.add_argument("--idempotency-cache", type=int, default=1000)
    parser.add_argument("--sample-seconds", type=float, default=5.0)
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--tracemalloc", action="store_true")
    parser.add_argument("--json", type=Path, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="kept after the run (default: a temporary one)")
    args = parser.parse_args(argv)
    if args.warmup_minutes is None:
        args.warmup_minutes = 5.0 if args.minutes >= 15 else args.minutes / 3
    return args


def main() -> None:
    args = parse_args()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="rccs-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    try:
        result = uvloop.run(soak(args, workdir))
    except SoakError as exc:
        print(f"soak could not run: {exc}", file=sys.stderr)
        raise SystemExit(2) from exc
    report(result)
    missed = judge(result, args.tolerance)
    result["missed"] = missed
    path = args.json or workdir / f"soak-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(f"results: {path}")
    if args.workdir is None:
        with contextlib.suppress(OSError):
            shutil.rmtree(workdir / "data")
    if missed:
        print("MISSED: " + "; ".join(missed))
        raise SystemExit(1)
    print("flat: every target met")


if __name__ == "__main__":
    main()
