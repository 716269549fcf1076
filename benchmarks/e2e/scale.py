"""Scale benchmarks of rccs: many connections, latency under load, fan-out, scaling. One command.

    python benchmarks/e2e/scale.py all            # every part (about 4 minutes)
    python benchmarks/e2e/scale.py connect        # 1. 19,000 devices: memory per device, connect + hello rate
    python benchmarks/e2e/scale.py latency        # 2. 10,000 idle devices: max throughput, open-loop latency at 50%
    python benchmarks/e2e/scale.py fanout         # 3. all/type/capability to 1..1000 devices: CPU per delivery
    python benchmarks/e2e/scale.py scaling        # 4. throughput and p99 at 100/1,000/10,000 connections + PNG

Every part starts a fresh rccs server process (``run.py``'s ``Server``: free
ports, random ``RCCS_TOKEN_SECRET``, ``--log-level WARNING``, data dir in a
temp dir) and load generator processes (``scale_worker.py``) that hold the
devices and act in step on absolute CLOCK_MONOTONIC times. Everything stays
on 127.0.0.0/8, every phase is bounded in time, and servers and generators
are stopped at the end, on errors and on Ctrl-C/SIGTERM. See SCALE.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import platform
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from pathlib import Path
from typing import Any

# This file's directory is on sys.path when it runs as a script: reuse the e2e harness's pieces.
from loadgen import percentile, server_cpu_times
from run import BenchmarkError, Scenario, Server, base_env, fastpath_in_use, stop_process, tail
from scale_worker import raise_nofile_limit

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKER = HERE / "scale_worker.py"
DEFAULT_OUT = HERE / "scale-results.json"
DEFAULT_PLOT = REPO / "docs" / "scaling.png"
RCCS = Scenario("rccs", "rccs", description="rccs, default fast path")
WELCOME_ONLY = Scenario("welcome-only", "welcome-only",
                        description="bare picows server answering every hello with a fixed welcome")
PARTS = ("connect", "latency", "fanout", "scaling")
SELECTORS = {"all": {"all": True}, "type": {"type": "rx"}, "capability": {"capability": "fan"}}


# ---- measuring the server from outside ---------------------------------------


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of the server process, from /proc/<pid>/stat."""
    try:
        return server_cpu_times(pid)
    except SystemExit as exc:  # loadgen's helper exits when the process is gone
        raise BenchmarkError(str(exc)) from None


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, RssAnon and RssFile of a process in KiB, from /proc/<pid>/status."""
    wanted = {"VmRSS", "RssAnon", "RssFile", "VmHWM"}
    values: dict[str, int] = {}
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            key, _, rest = line.partition(":")
            if key in wanted:
                values[key] = int(rest.split()[0])
    if "VmRSS" not in values:
        raise BenchmarkError(f"cannot read /proc/{pid}/status: the server process is gone")
    return values


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return -1


def listen_overflows() -> dict[str, int]:
    """TcpExt ListenOverflows/ListenDrops (system-wide): SYNs dropped because an accept queue was full."""
    try:
        lines = Path("/proc/net/netstat").read_text().splitlines()
    except OSError:
        return {}
    for names, values in zip(lines[0::2], lines[1::2], strict=False):
        if names.startswith("TcpExt:"):
            table = dict(zip(names.split()[1:], (int(v) for v in values.split()[1:]), strict=False))
            return {k: table.get(k, 0) for k in ("ListenOverflows", "ListenDrops")}
    return {}


def machine_ticks() -> list[int]:
    """The machine's CPU time so far by state (the ``cpu`` line of /proc/stat, in clock ticks)."""
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/stat").read_text().splitlines():
            if line.startswith("cpu "):
                return [int(v) for v in line.split()[1:9]]
    return [0] * 8


class CpuWindow:
    """Server CPU over a window, read by this process at the window's start and end; also the whole machine's."""

    def __init__(self, pid: int):
        self.pid = pid
        self.start = cpu_seconds(pid)
        self.machine0 = machine_ticks()
        self.wall0 = time.monotonic()

    def stop(self) -> dict[str, float]:
        user1, sys1 = cpu_seconds(self.pid)
        machine = [b - a for a, b in zip(self.machine0, machine_ticks(), strict=True)]
        wall = time.monotonic() - self.wall0
        user, system = user1 - self.start[0], sys1 - self.start[1]
        total = sum(machine) or 1
        # /proc/stat order: user nice system idle iowait irq softirq steal
        return {"server_cpu_s": user + system, "server_user_s": user, "server_sys_s": system,
                "server_wall_s": wall, "server_cpu_util": (user + system) / wall if wall > 0 else 0.0,
                "machine_busy": 1 - (machine[3] + machine[4]) / total, "machine_steal": machine[7] / total,
                "machine_softirq": machine[6] / total}


async def sleep_until(when: float) -> None:
    delay = when - time.monotonic()
    if delay > 0:
        await asyncio.sleep(delay)


def merged_percentiles(paths: list[Path]) -> dict[str, float]:
    """p50/p99/p99.9/max in microseconds over the int64 ns samples of several generator processes."""
    samples = array("q")
    for path in paths:
        with contextlib.suppress(FileNotFoundError):
            samples.frombytes(path.read_bytes())
    ordered = sorted(samples)
    return {name: percentile(ordered, q) / 1000 for name, q in
            (("p50", 0.50), ("p99", 0.99), ("p999", 0.999), ("max", 1.0))} | {"samples": len(ordered)}


# ---- a server and its generator processes ----------------------------------------


class Generators:
    """``count`` scale_worker.py processes attached to one server; one JSON command/answer per line."""

    def __init__(self, count: int, server: Server, workdir: Path):
        self.count = count
        self.server = server
        self.workdir = workdir
        self.procs: list[asyncio.subprocess.Process] = []
        self.logs = [workdir / f"worker-{i}.log" for i in range(count)]

    async def start(self) -> None:
        env = base_env()
        env["RCCS_TOKEN_SECRET"] = self.server.secret
        env["PYTHONPATH"] = os.pathsep.join([str(REPO), str(HERE)])
        for i in range(self.count):
            with self.logs[i].open("wb") as log:
                self.procs.append(await asyncio.create_subprocess_exec(
                    sys.executable, str(WORKER), "--url", self.server.url, "--index", str(i),
                    cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                    limit=16 * 1024 * 1024,
                ))

    async def call(self, i: int, cmd: dict[str, Any], timeout: float) -> dict[str, Any]:
        proc = self.procs[i]
        assert proc.stdin is not None and proc.stdout is not None
        try:
            proc.stdin.write(json.dumps(cmd).encode() + b"\n")
            await proc.stdin.drain()
            line = await asyncio.wait_for(proc.stdout.readline(), timeout)
        except TimeoutError:
            raise BenchmarkError(f"generator {i} gave no answer to {cmd['cmd']!r} within {timeout:.0f} s; "
                                 f"its stderr:\n{tail(self.logs[i])}\n{self.server.report()}") from None
        except (BrokenPipeError, ConnectionResetError):
            line = b""
        if not line:
            await proc.wait()
            raise BenchmarkError(f"generator {i} exited with code {proc.returncode} during {cmd['cmd']!r}; "
                                 f"its stderr:\n{tail(self.logs[i])}\n{self.server.report()}")
        reply: dict[str, Any] = json.loads(line)
        if reply.get("errors") or reply.get("unexpected_disconnects"):
            raise BenchmarkError(f"generator {i} during {cmd['cmd']!r}: errors={reply.get('errors')} "
                                 f"disconnects={reply.get('unexpected_disconnects')} {reply.get('problems')}\n"
                                 f"{self.server.report()}")
        return reply

    async def call_all(self, cmds: list[dict[str, Any]], timeout: float) -> list[dict[str, Any]]:
        return list(await asyncio.gather(*(self.call(i, cmd, timeout) for i, cmd in enumerate(cmds))))

    async def stop(self) -> None:
        async def one(proc: asyncio.subprocess.Process) -> None:
            if proc.returncode is None and proc.stdin is not None:
                with contextlib.suppress(Exception):
                    proc.stdin.write(b'{"cmd": "quit"}\n')
                    await proc.stdin.drain()
                    proc.stdin.close()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(proc.wait(), 15)
            await stop_process(proc)

        await asyncio.gather(*(one(p) for p in self.procs), return_exceptions=True)


class Bench:
    """A fresh rccs server plus generator processes, stopped on exit (also on errors and cancellation)."""

    def __init__(self, name: str, max_connections: int, workers: int, scenario: Scenario = RCCS):
        self.name = name
        self.max_connections = max_connections
        self.workers = workers
        self.workdir = Path(tempfile.mkdtemp(prefix=f"rccs-scale-{name}-"))
        self.server = Server(scenario, self.workdir, secrets.token_hex(32), max_connections)
        self.gens = Generators(workers, self.server, self.workdir)

    @property
    def pid(self) -> int:
        assert self.server.proc is not None
        return self.server.proc.pid

    async def __aenter__(self) -> Bench:
        try:
            await self.server.start()
            await self.gens.start()
        except BaseException:
            await self.close()
            raise
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        try:
            await self.gens.stop()
        finally:
            try:
                await self.server.stop()
            finally:
                shutil.rmtree(self.workdir, ignore_errors=True)

    def check_server(self) -> None:
        assert self.server.proc is not None
        if self.server.proc.returncode is not None:
            raise BenchmarkError(f"{self.name}: the server ended during the run; {self.server.report()}")

    async def prepare(self, per_worker: list[list[dict[str, Any]]]) -> float:
        replies = await self.gens.call_all([{"cmd": "prepare", "devices": d} for d in per_worker], 120)
        return float(max(r["seconds"] for r in replies))

    async def connect(self, concurrency: int, local_addrs: list[str], timeout: float) -> dict[str, Any]:
        """Connect every prepared device of every worker, all starting at one instant; return the combined timing."""
        start_at = time.monotonic() + 0.3
        cmd = {"cmd": "connect", "start_at": start_at, "concurrency": concurrency, "local_addrs": local_addrs,
               "timeout": timeout}
        await sleep_until(start_at - 0.05)
        cpu = CpuWindow(self.pid)
        replies = await self.gens.call_all([cmd] * self.workers, timeout + 30)
        server = cpu.stop()
        failed = sum(r["failed"] for r in replies)
        if failed:
            raise BenchmarkError(f"{self.name}: {failed} devices could not connect: "
                                 f"{[f for r in replies for f in r['failures']][:5]}\n{self.server.report()}")
        connected = sum(r["connected"] for r in replies)
        first = min(r["first_connect"] for r in replies)
        last = max(r["last_welcome"] for r in replies)
        span = max(last - first, 1e-9)
        gen_cpu = [r["generator_cpu_s"] for r in replies]
        return {
            "devices": connected,
            "seconds": span,
            "devices_per_s": connected / span,
            "server_cpu_s": server["server_cpu_s"],
            "server_cpu_util": server["server_cpu_util"],
            "server_user_s": server["server_user_s"],
            "server_sys_s": server["server_sys_s"],
            "generator_cpu_s": sum(gen_cpu),
            "generator_cpu_util": sum(gen_cpu) / span,
            "generator_cpu_util_per_process": [c / max(r["done"] - r["first_connect"], 1e-9)
                                               for c, r in zip(gen_cpu, replies, strict=True)],
            "machine_busy": server["machine_busy"],
            "machine_steal": server["machine_steal"],
            "concurrency_per_process": concurrency,
            "generator_processes": self.workers,
        }


def deal(items: list[Any], buckets: int) -> list[list[Any]]:
    """Round robin into ``buckets`` lists."""
    return [items[i::buckets] for i in range(buckets)]


def device_spec(user: str, device: str, device_type: str = "bench", caps: list[str] | None = None,
                idle: bool = False) -> dict[str, Any]:
    """One device for a generator; ``idle`` ones use the minimal client (see scale_worker.IdleDevice)."""
    return {"user": user, "device": device, "type": device_type, "caps": caps or [], "idle": idle}


def idle_and_pairs(idle: int, pairs: int, workers: int, users: int, tag: str
                   ) -> tuple[list[list[dict[str, Any]]], list[list[list[str]]]]:
    """Per worker: the device specs and the pairs (device names) it holds. Pairs stay within one worker."""
    specs: list[list[dict[str, Any]]] = [[] for _ in range(workers)]
    pair_names: list[list[list[str]]] = [[] for _ in range(workers)]
    for k in range(idle):
        w = k % workers
        specs[w].append(device_spec(f"user{k % users:03d}", f"{tag}-idle{k}", idle=True))
    for p in range(pairs):
        w = p % workers
        user = f"user{p % users:03d}"
        a, b = f"{tag}-p{p}a", f"{tag}-p{p}b"
        specs[w] += [device_spec(user, a), device_spec(user, b)]
        pair_names[w].append([a, b])
    return specs, pair_names


def local_addrs(count: int) -> list[str]:
    return [f"127.0.0.{2 + i}" for i in range(count)] if count > 0 else []


# ---- traffic phases -----------------------------------------------------------------


async def closed_loop(bench: Bench, pairs: list[list[list[str]]], inflight: int, warmup: float,
                      seconds: float) -> dict[str, Any]:
    """Closed loop on every worker's pairs; server CPU is read by this process over the same window."""
    start_at = time.monotonic() + 0.2
    paths = [bench.workdir / f"closed-{i}-{time.monotonic_ns()}.bin" for i in range(bench.workers)]
    cmds = [{"cmd": "closed", "pairs": pairs[i], "inflight": inflight, "start_at": start_at, "warmup": warmup,
             "seconds": seconds, "samples_out": str(paths[i])} for i in range(bench.workers)]
    replies, server = await measured_window(bench, cmds, start_at + warmup, start_at + warmup + seconds,
                                            warmup + seconds + 60)
    window = statistics.fmean(r["window_seconds"] for r in replies)
    received = sum(r["received"] for r in replies)
    return {
        "inflight": inflight,
        "pairs": sum(len(p) for p in pairs),
        "window_seconds": window,
        "received": received,
        "msgs_per_s": received / window,
        "latency_us": merged_percentiles(paths),
        "server_cpu_util": server["server_cpu_util"],
        "server_cpu_us_per_msg": server["server_cpu_s"] * 1e6 / received if received else float("nan"),
        "generator_cpu_util": sum(r["generator_cpu_util"] for r in replies),
        "machine_busy": server["machine_busy"], "machine_steal": server["machine_steal"],
    }


async def measured_window(bench: Bench, cmds: list[dict[str, Any]], window_start: float, window_end: float,
                          timeout: float) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Send ``cmds`` to the generators and read the server's CPU over [window_start, window_end]
    (``time.monotonic()`` instants); returns the generators' replies and the server CPU window."""
    task = asyncio.ensure_future(bench.gens.call_all(cmds, timeout))
    try:
        await sleep_until(window_start)
        cpu = CpuWindow(bench.pid)
        await sleep_until(window_end)
        server = cpu.stop()
    finally:
        replies = await task
    bench.check_server()
    return replies, server


async def open_loop(bench: Bench, pairs: list[list[list[str]]], rate: float, warmup: float,
                    seconds: float) -> dict[str, Any]:
    """Paced sends at ``rate`` msgs/s in total (shared between workers by their number of pairs)."""
    total_pairs = sum(len(p) for p in pairs)
    start_at = time.monotonic() + 0.2
    paths = [bench.workdir / f"open-{i}-{time.monotonic_ns()}.bin" for i in range(bench.workers)]
    cmds = [{"cmd": "open", "pairs": pairs[i], "rate": rate * len(pairs[i]) / total_pairs, "start_at": start_at,
             "warmup": warmup, "seconds": seconds, "samples_out": str(paths[i])} for i in range(bench.workers)]
    replies, server = await measured_window(bench, cmds, start_at + warmup, start_at + warmup + seconds,
                                            warmup + seconds + 60)
    window = statistics.fmean(r["window_seconds"] for r in replies)
    received = sum(r["received"] for r in replies)
    sent = sum(r["sent"] for r in replies)
    return {
        "target_rate": rate,
        "sent_per_s": sent / window,
        "received_per_s": received / window,
        "window_seconds": window,
        "received": received,
        "latency_us": merged_percentiles(paths),
        "sched_latency_us": merged_percentiles([Path(str(p) + ".sched") for p in paths]),
        "max_batch_per_tick": max(r["max_batch"] for r in replies),
        "generator_tick_gap_us": {q: max(r["tick_gap_us"][q] for r in replies) for q in ("p50", "p99", "p999", "max")},
        "server_cpu_util": server["server_cpu_util"],
        "server_cpu_us_per_msg": server["server_cpu_s"] * 1e6 / received if received else float("nan"),
        "generator_cpu_util": sum(r["generator_cpu_util"] for r in replies),
        "machine_busy": server["machine_busy"], "machine_steal": server["machine_steal"],
    }


# ---- part 1: connect ----------------------------------------------------------------


async def part_connect(args: argparse.Namespace) -> dict[str, Any]:
    """The storm at each ``--connect-per-user`` (default 5 and 190 devices per user), then the generator's own
    ceiling: the same storm against a server that only answers hellos (``baseline_router.py --welcome``)."""
    result: dict[str, Any] = {"per_user": {}}
    for per_user in [int(x) for x in args.connect_per_user.split(",")]:
        users = max(1, args.devices // per_user)
        result["per_user"][str(per_user)] = await connect_storms(args, users, RCCS, args.connect_rounds)
    if args.generator_rounds > 0:
        result["generator_floor"] = await connect_storms(args, max(1, args.devices // 5), WELCOME_ONLY,
                                                         args.generator_rounds)
    return result


async def connect_storms(args: argparse.Namespace, users: int, scenario: Scenario, rounds_wanted: int
                         ) -> dict[str, Any]:
    concurrency = max(1, args.concurrency // args.workers)
    print(f"[connect] {scenario.name}: {args.devices} devices of {users} users, {args.workers} generator processes "
          f"x {concurrency} concurrent connects, source addresses "
          f"{', '.join(local_addrs(args.source_addrs)) or '127.0.0.1'}; {rounds_wanted} rounds, fresh server "
          f"each", flush=True)
    rounds = []
    for round_no in range(rounds_wanted):
        run = await connect_round(args, concurrency, users, scenario)
        rounds.append(run)
        print(f"[connect] round {round_no}: {run['devices_per_s']:,.0f} devices/s, "
              f"{run['rss_bytes_per_device'] / 1024:.2f} KiB per device, server CPU {run['server_cpu_util']:.0%}, "
              f"generators {run['generator_cpu_util']:.0%}", flush=True)
    keys = ("rss_bytes_per_device", "rss_anon_bytes_per_device", "devices_per_s", "seconds", "server_cpu_util",
            "server_us_per_device", "server_user_us_per_device", "server_sys_us_per_device", "generator_cpu_util",
            "generator_us_per_device", "machine_busy")
    median = {key: statistics.median(r[key] for r in rounds) for key in keys}
    result = {"server": scenario.name, "devices": args.devices, "users": users, "generator_processes": args.workers,
              "concurrency_per_process": concurrency, "rounds": rounds, "median": median,
              "devices_per_s_range": [min(r["devices_per_s"] for r in rounds), max(r["devices_per_s"] for r in rounds)],
              "goals": {"rss_bytes_per_device_max": 6 * 1024, "devices_per_s_min": 5000}}
    print(connect_table(result), flush=True)
    return result


async def connect_round(args: argparse.Namespace, concurrency: int, users: int, scenario: Scenario
                        ) -> dict[str, Any]:
    """One fresh server, ``--devices`` idle devices of ``users`` users connected at once; memory and timing."""
    n, workers = args.devices, args.workers
    names = [(f"user{k % users:03d}", f"c{k}") for k in range(n)]
    specs = deal([device_spec(u, d, idle=True) for u, d in names], workers)
    async with Bench("connect", n + 100, workers, scenario) as bench:
        mint = await bench.prepare(specs)
        await asyncio.sleep(0.5)
        before = memory_kib(bench.pid)
        fds_before = open_fds(bench.pid)
        overflows0 = listen_overflows()
        timing = await bench.connect(concurrency, local_addrs(args.source_addrs), timeout=60 + n / 500)
        overflows1 = listen_overflows()
        await asyncio.sleep(1.0)
        after = memory_kib(bench.pid)
        fds_after = open_fds(bench.pid)
        bench.check_server()
        await asyncio.sleep(1.0)
        settled = memory_kib(bench.pid)
        close_started = time.monotonic()
        await bench.gens.stop()
        close_seconds = time.monotonic() - close_started
        await asyncio.sleep(0.5)
        after_close = memory_kib(bench.pid) if bench.server.proc and bench.server.proc.returncode is None else {}
    per_device = {key: (settled[key] - before[key]) * 1024 / n for key in ("VmRSS", "RssAnon", "RssFile")}
    return {
        "token_mint_seconds": mint,
        "rss_kib": {"before": before, "connected": after, "connected_plus_1s": settled, "after_close": after_close},
        "server_open_fds": {"before": fds_before, "connected": fds_after},
        "rss_bytes_per_device": per_device["VmRSS"],
        "rss_anon_bytes_per_device": per_device["RssAnon"],
        "rss_file_bytes_per_device": per_device["RssFile"],
        "server_us_per_device": timing["server_cpu_s"] * 1e6 / n,
        "server_user_us_per_device": timing["server_user_s"] * 1e6 / n,
        "server_sys_us_per_device": timing["server_sys_s"] * 1e6 / n,
        "generator_us_per_device": timing["generator_cpu_s"] * 1e6 / n,
        "listen_overflows": sum(overflows1.get(k, 0) - overflows0.get(k, 0) for k in ("ListenOverflows",)),
        "listen_drops": sum(overflows1.get(k, 0) - overflows0.get(k, 0) for k in ("ListenDrops",)),
        "disconnect_seconds": close_seconds,
    } | timing


def connect_table(r: dict[str, Any]) -> str:
    lines = ["", f"Part 1: connect to {r['server']} ({r['devices']:,} devices of {r['users']} users per round, "
                 f"{r['generator_processes']} generator processes x {r['concurrency_per_process']} concurrent "
                 f"connects; medians of {len(r['rounds'])} rounds)", "-" * 118,
             f"{'round':<8}{'RSS/device':>12}{'anon':>8}{'devices/s':>11}{'seconds':>9}{'srv us/dev':>11}"
             f"{'usr+sys':>10}{'srv CPU':>9}{'gen us/dev':>11}{'gen CPU':>9}{'machine':>9}{'listen ovfl':>13}"]

    def row(label: str, x: dict[str, Any], overflows: str) -> str:
        return (f"{label:<8}{x['rss_bytes_per_device'] / 1024:>8.2f} KiB{x['rss_anon_bytes_per_device'] / 1024:>8.2f}"
                f"{x['devices_per_s']:>11,.0f}{x['seconds']:>9.2f}{x['server_us_per_device']:>11.0f}"
                f"{x['server_user_us_per_device']:>5.0f}+{x['server_sys_us_per_device']:<4.0f}"
                f"{x['server_cpu_util']:>9.0%}{x['generator_us_per_device']:>11.0f}{x['generator_cpu_util']:>9.0%}"
                f"{x['machine_busy']:>9.0%}{overflows:>13}")

    for i, x in enumerate(r["rounds"]):
        lines.append(row(str(i), x, str(x["listen_overflows"])))
    m = r["median"]
    lines.append(row("median", m, ""))
    first = r["rounds"][0]
    low, high = r["devices_per_s_range"]
    lines += [
        f"RSS per device {m['rss_bytes_per_device'] / 1024:.2f} KiB (goal <= 6 KiB): "
        f"{'ok' if m['rss_bytes_per_device'] <= 6 * 1024 else 'MISSED'}; server RSS "
        f"{first['rss_kib']['before']['VmRSS'] / 1024:.1f} MiB before, "
        f"{first['rss_kib']['connected_plus_1s']['VmRSS'] / 1024:.1f} MiB with {r['devices']:,} devices (round 0)",
        f"connect + hello rate {m['devices_per_s']:,.0f} devices/s ({low:,.0f}-{high:,.0f}) (goal >= 5,000/s): "
        f"{'ok' if m['devices_per_s'] >= 5000 else 'MISSED'}; the server is the limit when its CPU is near 100% "
        f"while the generators' is not",
        f"server fds before / connected (round 0): {first['server_open_fds']['before']} / "
        f"{first['server_open_fds']['connected']}",
    ]
    return "\n".join(lines)


# ---- part 2: latency under load -----------------------------------------------------


async def part_latency(args: argparse.Namespace) -> dict[str, Any]:
    workers = args.traffic_workers
    specs, pairs = idle_and_pairs(args.idle, args.pairs, workers, args.users, "l")
    inflights = [int(x) for x in args.max_inflight.split(",")]
    print(f"[latency] {args.idle} idle devices + {args.pairs} active pairs, {workers} generator processes; "
          f"closed loop at in-flight {inflights} per pair, then open loop at {args.load_fraction:.0%} of the best",
          flush=True)
    async with Bench("latency", args.idle + 2 * args.pairs + 100, workers) as bench:
        await bench.prepare(specs)
        connect = await bench.connect(max(1, args.concurrency // workers), local_addrs(args.source_addrs),
                                      timeout=60 + args.idle / 500)
        print(f"[latency] connected {connect['devices']} devices in {connect['seconds']:.1f} s", flush=True)
        closed = []
        for inflight in inflights:
            run = await closed_loop(bench, pairs, inflight, args.warmup, args.closed_seconds)
            closed.append(run)
            print(f"[latency] closed loop, {inflight} in flight per pair: {run['msgs_per_s']:,.0f} msgs/s, "
                  f"p99 {run['latency_us']['p99']:.0f} us, server CPU {run['server_cpu_util']:.0%}, "
                  f"generators {run['generator_cpu_util']:.0%}", flush=True)
        best = max(closed, key=lambda r: r["msgs_per_s"])
        rate = best["msgs_per_s"] * args.load_fraction
        opened = []
        for window in range(args.open_windows):
            run = await open_loop(bench, pairs, rate, args.warmup, args.open_seconds)
            opened.append(run)
            lat = run["latency_us"]
            print(f"[latency] open loop window {window}: {run['received_per_s']:,.0f} msgs/s, p50 {lat['p50']:.0f} us, "
                  f"p99 {lat['p99']:.0f} us, p99.9 {lat['p999']:.0f} us", flush=True)
    median = {key: {q: statistics.median(w[key][q] for w in opened) for q in ("p50", "p99", "p999")}
              for key in ("latency_us", "sched_latency_us")}
    result = {"idle_devices": args.idle, "pairs": args.pairs, "connect": connect, "closed_loop": closed,
              "max_msgs_per_s": best["msgs_per_s"], "load_fraction": args.load_fraction, "open_rate": rate,
              "open_loop": opened, "open_loop_median": median, "goals": {"p99_us_max": 5000}}
    print(latency_table(result), flush=True)
    return result


def latency_table(r: dict[str, Any]) -> str:
    lines = ["", f"Part 2: latency under load ({r['idle_devices']:,} idle devices + {r['pairs']} active pairs)",
             "-" * 109,
             f"{'run':<34}{'msgs/s':>10}{'p50 us':>9}{'p99 us':>9}{'p99.9 us':>10}{'srv us/msg':>11}"
             f"{'srv CPU':>9}{'gen CPU':>9}{'machine':>9}"]
    for c in r["closed_loop"]:
        lat = c["latency_us"]
        lines.append(f"{'closed loop, ' + str(c['inflight']) + ' in flight/pair':<34}{c['msgs_per_s']:>10,.0f}"
                     f"{lat['p50']:>9.0f}{lat['p99']:>9.0f}{lat['p999']:>10.0f}{c['server_cpu_us_per_msg']:>11.2f}"
                     f"{c['server_cpu_util']:>9.0%}{c['generator_cpu_util']:>9.0%}{c['machine_busy']:>9.0%}")
    for i, o in enumerate(r["open_loop"]):
        lat = o["latency_us"]
        label = f"open loop {r['load_fraction']:.0%} = {o['target_rate']:,.0f}/s, #{i}"
        lines.append(f"{label:<34}{o['received_per_s']:>10,.0f}{lat['p50']:>9.0f}{lat['p99']:>9.0f}"
                     f"{lat['p999']:>10.0f}{o['server_cpu_us_per_msg']:>11.2f}{o['server_cpu_util']:>9.0%}"
                     f"{o['generator_cpu_util']:>9.0%}{o['machine_busy']:>9.0%}")
    lat, sched = r["open_loop_median"]["latency_us"], r["open_loop_median"]["sched_latency_us"]
    lines.append(f"{'open loop, median of windows':<34}{'':>10}{lat['p50']:>9.0f}{lat['p99']:>9.0f}"
                 f"{lat['p999']:>10.0f}")
    lines.append(f"{'  same, from scheduled send time':<34}{'':>10}{sched['p50']:>9.0f}{sched['p99']:>9.0f}"
                 f"{sched['p999']:>10.0f}")
    ok = "ok" if lat["p99"] <= 5000 else "MISSED"
    lines.append(f"open-loop one-way p99 (median of {len(r['open_loop'])} windows) {lat['p99'] / 1000:.2f} ms "
                 f"(goal <= 5 ms): {ok}; {sum(o['latency_us']['samples'] for o in r['open_loop']):,} samples; "
                 f"at most {max(o['max_batch_per_tick'] for o in r['open_loop'])} sends in one 1 ms pacing tick")
    gaps = [o["generator_tick_gap_us"] for o in r["open_loop"]]
    lines.append("generator pacing ticks (1 ms asked): gap p99 " + " / ".join(f"{g['p99'] / 1000:.1f}" for g in gaps)
                 + " ms, max " + " / ".join(f"{g['max'] / 1000:.1f}" for g in gaps) + " ms per window (a long gap is "
                 "time the generator itself could not run: its sends queue up and its receive stamps are late)")
    return "\n".join(lines)


# ---- part 3: fan-out ----------------------------------------------------------------


async def part_fanout(args: argparse.Namespace) -> dict[str, Any]:
    workers = args.traffic_workers
    sizes = [int(x) for x in args.recipients.split(",")]
    specs: list[list[dict[str, Any]]] = [[] for _ in range(workers)]
    for size in sizes:
        user = f"fan{size}"
        specs[0].append(device_spec(user, f"f{size}-tx", "tx"))
        for j in range(size):
            specs[(j + 1) % workers].append(device_spec(user, f"f{size}-rx{j}", "rx", ["fan"]))
    total = sum(len(s) for s in specs)
    print(f"[fanout] users with 1 sender + {sizes} recipients ({total} devices), {workers} generator processes, "
          f"{args.fanout_seconds:g} s per window at <= {args.fanout_deliveries:,} deliveries/s "
          f"and <= {args.fanout_send_rate:,} sends/s, {args.fanout_rounds} rounds", flush=True)
    runs: list[dict[str, Any]] = []
    async with Bench("fanout", total + 100, workers) as bench:
        await bench.prepare(specs)
        await bench.connect(max(1, args.concurrency // workers), [], timeout=120)
        await asyncio.sleep(0.5)
        idle = CpuWindow(bench.pid)
        await asyncio.sleep(args.fanout_idle_seconds)
        idle_cpu = idle.stop()
        print(f"[fanout] idle server CPU with {total} devices: {idle_cpu['server_cpu_util']:.2%}", flush=True)
        window_no = 0
        for round_no in range(args.fanout_rounds):
            order = sizes if round_no % 2 == 0 else sizes[::-1]
            for size in order:
                for selector, to in SELECTORS.items():
                    window_no += 1
                    rate = min(float(args.fanout_send_rate), args.fanout_deliveries / size)
                    count = max(1, round(rate * args.fanout_seconds))
                    id_base = window_no * 1_000_000
                    start_at = time.monotonic() + 0.2
                    end_at = start_at + count / rate + 0.3  # the last sends' deliveries land within the drain
                    cmds = [{"cmd": "fanout", "sender": f"f{size}-tx" if i == 0 else None, "to": to,
                             "count": count, "rate": rate, "start_at": start_at, "end_at": end_at,
                             "id_base": id_base, "fingerprint_ids": [str(id_base + k + 1) for k in range(3)]}
                            for i in range(workers)]
                    replies, server = await measured_window(bench, cmds, start_at, end_at, count / rate + 60)
                    runs.append(fanout_run(round_no, size, selector, count, rate, server, replies, idle_cpu))
                    run = runs[-1]
                    print(f"[fanout] round {round_no} {selector:<10} -> {size:>4}: {run['delivered']:>7} delivered, "
                          f"{run['server_cpu_us_per_delivery']:6.2f} us/delivery, {run['server_cpu_us_per_send']:8.1f}"
                          f" us/send, p99 {run['latency_us']['p99']:.0f} us", flush=True)
    summary = fanout_summary(runs, sizes)
    result = {"recipients": sizes, "idle_server_cpu_util": idle_cpu["server_cpu_util"], "runs": runs,
              "summary": summary, "window_seconds": args.fanout_seconds,
              "deliveries_per_s": args.fanout_deliveries, "max_send_rate": args.fanout_send_rate}
    print(fanout_table(result), flush=True)
    return result


def fanout_run(round_no: int, size: int, selector: str, count: int, rate: float, server: dict[str, float],
               replies: list[dict[str, Any]], idle_cpu: dict[str, float]) -> dict[str, Any]:
    delivered = sum(r["received"] for r in replies)
    sent = sum(r["sent"] for r in replies)
    fingerprints: dict[str, set[str]] = {}
    for reply in replies:
        for msg_id, digests in reply["fingerprints"].items():
            fingerprints.setdefault(msg_id, set()).update(digests)
    cpu = server["server_cpu_s"]
    # Latency over all deliveries of the window: the per-worker percentiles merged conservatively (their max).
    net = max(0.0, cpu - idle_cpu["server_cpu_util"] * server["server_wall_s"])
    return {
        "round": round_no, "recipients": size, "selector": selector, "sends": sent, "send_rate": rate,
        "expected": count * size, "delivered": delivered,
        "server_cpu_s": cpu, "server_cpu_util": server["server_cpu_util"],
        "server_cpu_us_per_send": cpu * 1e6 / sent if sent else float("nan"),
        "server_cpu_us_per_delivery": cpu * 1e6 / delivered if delivered else float("nan"),
        "server_cpu_us_per_delivery_net_of_idle": net * 1e6 / delivered if delivered else float("nan"),
        "server_user_us_per_delivery": server["server_user_s"] * 1e6 / delivered if delivered else float("nan"),
        "server_sys_us_per_delivery": server["server_sys_s"] * 1e6 / delivered if delivered else float("nan"),
        "machine_busy": server["machine_busy"],
        "identical_frames": all(len(v) == 1 for v in fingerprints.values()) and len(fingerprints) > 0,
        "fingerprinted_messages": len(fingerprints),
        "latency_us": {q: max((r["latency_us"][q] for r in replies if r["received"]), default=float("nan"))
                       for q in ("p50", "p99")},
        "generator_cpu_util": sum(r["generator_cpu_util"] for r in replies),
    }


def fanout_summary(runs: list[dict[str, Any]], sizes: list[int]) -> dict[str, Any]:
    summary: dict[str, Any] = {}
    for selector in SELECTORS:
        rows = {}
        for size in sizes:
            mine = [r for r in runs if r["selector"] == selector and r["recipients"] == size]
            rows[str(size)] = {
                "rounds": len(mine),
                "delivered_all": all(r["delivered"] == r["expected"] for r in mine),
                "identical_frames": all(r["identical_frames"] for r in mine),
                "send_rate": mine[0]["send_rate"],
                "server_cpu_util": statistics.median(r["server_cpu_util"] for r in mine),
                "server_cpu_us_per_send": statistics.median(r["server_cpu_us_per_send"] for r in mine),
                "server_cpu_us_per_delivery": statistics.median(r["server_cpu_us_per_delivery"] for r in mine),
                "server_cpu_us_per_delivery_net_of_idle": statistics.median(
                    r["server_cpu_us_per_delivery_net_of_idle"] for r in mine),
                "server_user_us_per_delivery": statistics.median(r["server_user_us_per_delivery"] for r in mine),
                "server_sys_us_per_delivery": statistics.median(r["server_sys_us_per_delivery"] for r in mine),
                "latency_us_p50": statistics.median(r["latency_us"]["p50"] for r in mine),
                "latency_us_p99": statistics.median(r["latency_us"]["p99"] for r in mine),
            }
        per_delivery = [rows[str(s)]["server_cpu_us_per_delivery"] for s in sizes]
        per_send = [rows[str(s)]["server_cpu_us_per_send"] for s in sizes]
        for row in rows.values():
            row["cpu_per_delivery_vs_fewest"] = row["server_cpu_us_per_delivery"] / per_delivery[0]
        summary[selector] = {
            "by_recipients": rows,
            # Below the single-recipient cost at every larger fan-out: the per-send work (decode, resolve,
            # encode) is paid once per send, not once per recipient.
            "cpu_per_delivery_below_fewest": all(c < per_delivery[0] for c in per_delivery[1:]),
            "cpu_per_delivery_falls_monotonically": all(b < a for a, b in itertools.pairwise(per_delivery)),
            # CPU each extra recipient adds to one send, between successive recipient counts.
            "marginal_us_per_extra_recipient": {
                f"{a}-{b}": (cb - ca) / (b - a)
                for (a, ca), (b, cb) in itertools.pairwise(zip(sizes, per_send, strict=True))},
        }
    return summary


def fanout_table(r: dict[str, Any]) -> str:
    lines = ["", f"Part 3: fan-out (medians of {max(x['round'] for x in r['runs']) + 1} rounds; idle server CPU "
                 f"{r['idle_server_cpu_util']:.2%})", "-" * 113,
             f"{'selector':<11}{'recipients':>11}{'sends/s':>9}{'deliv/s':>9}{'srv CPU':>9}{'us/send':>10}"
             f"{'us/deliv':>10}{'usr+sys':>12}{'vs 1':>7}{'p50 us':>9}{'p99 us':>9}  {'all delivered, same bytes':<10}"]
    for selector, entry in r["summary"].items():
        for size, row in entry["by_recipients"].items():
            lines.append(
                f"{selector:<11}{int(size):>11,}{row['send_rate']:>9.0f}{row['send_rate'] * int(size):>9.0f}"
                f"{row['server_cpu_util']:>9.0%}{row['server_cpu_us_per_send']:>10.1f}"
                f"{row['server_cpu_us_per_delivery']:>10.2f}"
                f"{row['server_user_us_per_delivery']:>6.2f}+{row['server_sys_us_per_delivery']:<5.2f}"
                f"{row['cpu_per_delivery_vs_fewest']:>7.2f}"
                f"{row['latency_us_p50']:>9.0f}{row['latency_us_p99']:>9.0f}  "
                f"{'yes' if row['delivered_all'] else 'NO'}, {'yes' if row['identical_frames'] else 'NO'}")
        marginal = ", ".join(f"{k}: {v:.1f}" for k, v in entry["marginal_us_per_extra_recipient"].items())
        lines.append(f"{'':<11}per delivery below the 1-recipient cost at every fan-out: "
                     f"{'yes' if entry['cpu_per_delivery_below_fewest'] else 'NO'}; falls at every step: "
                     f"{'yes' if entry['cpu_per_delivery_falls_monotonically'] else 'no'}; "
                     f"us per extra recipient ({marginal})")
    return "\n".join(lines)


# ---- part 4: scaling ----------------------------------------------------------------


async def part_scaling(args: argparse.Namespace) -> dict[str, Any]:
    workers = args.traffic_workers
    levels = [int(x) for x in args.connections.split(",")]
    active = 2 * args.scaling_pairs
    if min(levels) < active:
        raise BenchmarkError(f"--connections must all be >= 2 x --scaling-pairs ({active})")
    print(f"[scaling] {levels} connections, of which {args.scaling_pairs} pairs ({active} devices) are active "
          f"(closed loop, {args.scaling_inflight} in flight per pair) and the rest idle; {args.scaling_rounds} rounds, "
          f"fresh server per run", flush=True)
    runs = []
    for round_no in range(args.scaling_rounds):
        order = levels if round_no % 2 == 0 else levels[::-1]
        for level in order:
            specs, pairs = idle_and_pairs(level - active, args.scaling_pairs, workers, args.users, "s")
            async with Bench(f"scaling-{level}", level + 100, workers) as bench:
                await bench.prepare(specs)
                await bench.connect(max(1, args.concurrency // workers), local_addrs(args.source_addrs),
                                    timeout=60 + level / 500)
                await asyncio.sleep(0.3)
                run = await closed_loop(bench, pairs, args.scaling_inflight, args.warmup, args.scaling_seconds)
            run |= {"round": round_no, "connections": level}
            runs.append(run)
            print(f"[scaling] round {round_no} {level:>6} connections: {run['msgs_per_s']:>8,.0f} msgs/s, "
                  f"p99 {run['latency_us']['p99']:>6.0f} us, {run['server_cpu_us_per_msg']:.2f} us/msg, "
                  f"server CPU {run['server_cpu_util']:.0%}, generators {run['generator_cpu_util']:.0%}", flush=True)
    summary = {}
    for level in levels:
        mine = [r for r in runs if r["connections"] == level]
        summary[str(level)] = {
            "runs": len(mine),
            "msgs_per_s": statistics.median(r["msgs_per_s"] for r in mine),
            "latency_us": {q: statistics.median(r["latency_us"][q] for r in mine) for q in ("p50", "p99", "p999")},
            "server_cpu_us_per_msg": statistics.median(r["server_cpu_us_per_msg"] for r in mine),
            "server_cpu_util": statistics.median(r["server_cpu_util"] for r in mine),
            "generator_cpu_util": statistics.median(r["generator_cpu_util"] for r in mine),
            "machine_busy": statistics.median(r["machine_busy"] for r in mine),
        }
    first = summary[str(levels[0])]
    for entry in summary.values():
        entry["msgs_per_s_vs_smallest"] = entry["msgs_per_s"] / first["msgs_per_s"]
        entry["cpu_per_msg_vs_smallest"] = entry["server_cpu_us_per_msg"] / first["server_cpu_us_per_msg"]
    result = {"connections": levels, "active_pairs": args.scaling_pairs, "inflight": args.scaling_inflight,
              "runs": runs, "summary": summary}
    if args.plot:
        plot_scaling(result, Path(args.plot))
        result["plot"] = str(args.plot)
    print(scaling_table(result), flush=True)
    return result


def scaling_table(r: dict[str, Any]) -> str:
    lines = ["", f"Part 4: scaling ({r['active_pairs']} active pairs, {r['inflight']} in flight each, the rest idle; "
                 f"medians of {r['summary'][str(r['connections'][0])]['runs']} runs)", "-" * 111,
             f"{'connections':>11}{'msgs/s':>10}{'vs ' + str(r['connections'][0]):>9}{'p50 us':>9}{'p99 us':>9}"
             f"{'p99.9 us':>10}{'srv us/msg':>11}{'vs ' + str(r['connections'][0]):>9}{'srv CPU':>9}{'gen CPU':>9}"
             f"{'machine':>9}"]
    for level, s in r["summary"].items():
        lat = s["latency_us"]
        lines.append(f"{int(level):>11,}{s['msgs_per_s']:>10,.0f}{s['msgs_per_s_vs_smallest']:>9.2f}{lat['p50']:>9.0f}"
                     f"{lat['p99']:>9.0f}{lat['p999']:>10.0f}{s['server_cpu_us_per_msg']:>11.2f}"
                     f"{s['cpu_per_msg_vs_smallest']:>9.2f}{s['server_cpu_util']:>9.0%}{s['generator_cpu_util']:>9.0%}"
                     f"{s['machine_busy']:>9.0%}")
    if "plot" in r:
        lines.append(f"plot: {r['plot']}")
    return "\n".join(lines)


def plot_scaling(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    levels = result["connections"]
    runs = result["runs"]
    summary = result["summary"]
    fig, axes = plt.subplots(1, 3, figsize=(14, 4.2))
    panels = (
        ("msgs/s (closed loop, direct send)", lambda r: r["msgs_per_s"], lambda s: s["msgs_per_s"]),
        ("one-way latency p99 (ms)", lambda r: r["latency_us"]["p99"] / 1000, lambda s: s["latency_us"]["p99"] / 1000),
        ("server CPU per message (us)", lambda r: r["server_cpu_us_per_msg"], lambda s: s["server_cpu_us_per_msg"]),
    )
    axes[0].yaxis.set_major_formatter(matplotlib.ticker.StrMethodFormatter("{x:,.0f}"))
    for ax, (title, of_run, of_summary) in zip(axes, panels, strict=True):
        ax.scatter([r["connections"] for r in runs], [of_run(r) for r in runs], color="tab:gray", s=14,
                   label="single runs", zorder=2)
        ax.plot(levels, [of_summary(summary[str(level)]) for level in levels], marker="o", color="tab:blue",
                label="median", zorder=3)
        ax.set_xscale("log")
        ax.set_xticks(levels)
        ax.set_xticklabels([f"{level:,}" for level in levels])
        ax.set_xlabel("open connections")
        ax.set_title(title)
        ax.set_ylim(bottom=0)
        ax.grid(True, alpha=0.3)
    axes[0].legend(loc="lower left")
    fig.suptitle(f"rccs scaling: {result['active_pairs']} active pairs x {result['inflight']} in flight, "
                 f"the other connections idle (one server process, 2-core shared machine)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---- command line -------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("part", choices=(*PARTS, "all"), help="which part to run")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="JSON results (default %(default)s)")
    parser.add_argument("--max-seconds", type=float, default=900, help="stop everything after this long (default 900)")
    common = parser.add_argument_group("all parts")
    common.add_argument("--users", type=int, default=100, help="users the devices belong to (default 100)")
    common.add_argument("--concurrency", type=int, default=96,
                        help="connects in progress at once, over all generator processes (default 96: the server's "
                             "listen backlog is 100)")
    common.add_argument("--source-addrs", type=int, default=4,
                        help="bind client sockets to 127.0.0.2 .. 127.0.0.(1+N), round robin; 0 = let the kernel pick "
                             "(default 4)")
    common.add_argument("--traffic-workers", type=int, default=1,
                        help="generator processes for parts 2-4 (default 1: with the server that makes two busy "
                             "processes on two cores; a third one makes them preempt each other)")
    common.add_argument("--warmup", type=float, default=1.0, help="traffic before each measured window (default 1)")
    p1 = parser.add_argument_group("part 1: connect")
    p1.add_argument("--devices", type=int, default=19000, help="devices to connect (default 19000)")
    p1.add_argument("--workers", type=int, default=4, help="generator processes (default 4)")
    p1.add_argument("--connect-rounds", type=int, default=3, help="rounds, each on a fresh server (default 3)")
    p1.add_argument("--connect-per-user", default="5,190",
                    help="devices per user, one storm series each (default 5,190; --users is for the other parts)")
    p1.add_argument("--generator-rounds", type=int, default=2,
                    help="rounds against a server that only answers hellos: the generator's ceiling (default 2)")
    p2 = parser.add_argument_group("part 2: latency")
    p2.add_argument("--idle", type=int, default=10000, help="idle devices (default 10000)")
    p2.add_argument("--pairs", type=int, default=200, help="active pairs (default 200)")
    p2.add_argument("--max-inflight", default="1,4",
                    help="closed-loop in-flight levels tried for the max (default 1,4)")
    p2.add_argument("--closed-seconds", type=float, default=3.0, help="closed-loop window (default 3)")
    p2.add_argument("--load-fraction", type=float, default=0.5,
                    help="open-loop rate as a fraction of max (default 0.5)")
    p2.add_argument("--open-seconds", type=float, default=5.0, help="open-loop window (default 5)")
    p2.add_argument("--open-windows", type=int, default=3, help="open-loop windows, medians reported (default 3)")
    p3 = parser.add_argument_group("part 3: fan-out")
    p3.add_argument("--recipients", default="1,10,100,1000", help="recipient counts (default 1,10,100,1000)")
    p3.add_argument("--fanout-seconds", type=float, default=3.0, help="sending time per window (default 3)")
    p3.add_argument("--fanout-deliveries", type=int, default=20000,
                    help="deliveries per second aimed at (sends/s = this / recipients; default 20000)")
    p3.add_argument("--fanout-send-rate", type=int, default=2000, help="at most this many sends/s (default 2000)")
    p3.add_argument("--fanout-rounds", type=int, default=2, help="rounds over all windows (default 2)")
    p3.add_argument("--fanout-idle-seconds", type=float, default=2.0, help="idle CPU measurement (default 2)")
    p4 = parser.add_argument_group("part 4: scaling")
    p4.add_argument("--connections", default="100,1000,10000", help="connection counts (default 100,1000,10000)")
    p4.add_argument("--scaling-pairs", type=int, default=50, help="active pairs at every level (default 50)")
    p4.add_argument("--scaling-inflight", type=int, default=4, help="in flight per pair (default 4)")
    p4.add_argument("--scaling-seconds", type=float, default=4.0, help="measured window (default 4)")
    p4.add_argument("--scaling-rounds", type=int, default=3, help="runs per level (default 3)")
    p4.add_argument("--plot", default=str(DEFAULT_PLOT), help="PNG path, '' for none (default %(default)s)")
    args = parser.parse_args(argv)
    if args.devices < 1 or args.workers < 1 or args.traffic_workers < 1 or args.users < 1 or args.concurrency < 1:
        parser.error("--devices, --workers, --traffic-workers, --users and --concurrency must be >= 1")
    if args.source_addrs > 250:
        parser.error("--source-addrs: at most 250")
    return args


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    parts = PARTS if args.part == "all" else (args.part,)
    fastpath = fastpath_in_use(False)
    nofile = raise_nofile_limit()
    print(f"scale.py {', '.join(parts)}: fast path {fastpath}, {os.cpu_count()} CPUs, open files limit {nofile}",
          flush=True)
    results: dict[str, Any] = {
        "environment": {"cpus": os.cpu_count(), "python": platform.python_version(), "fastpath": fastpath,
                        "nofile_limit": nofile, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "config": {k: v for k, v in vars(args).items() if k not in ("out",)},
        "durations_s": {},
    }
    runners = {"connect": part_connect, "latency": part_latency, "fanout": part_fanout, "scaling": part_scaling}
    for part in parts:
        started = time.monotonic()
        results[part] = await runners[part](args)
        results["durations_s"][part] = round(time.monotonic() - started, 1)
        print(f"[{part}] took {results['durations_s'][part]:.0f} s", flush=True)
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")  # keep what is done if a later part fails
    return results


async def main_guarded(args: argparse.Namespace) -> dict[str, Any]:
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, task.cancel)
    try:
        return await asyncio.wait_for(main_async(args), args.max_seconds)
    except TimeoutError:
        raise BenchmarkError(f"stopped after --max-seconds {args.max_seconds:g} s") from None


def leftover_children() -> list[int]:
    """Processes whose parent is this one (servers and generators are started as direct children)."""
    mine = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError):
                status = Path(f"/proc/{entry}/status").read_text()
                if f"\nPPid:\t{os.getpid()}\n" in status and "\nState:\tZ" not in status:
                    mine.append(int(entry))
    return mine


def kill_leftovers() -> None:
    """Last resort after the run: every child should already be stopped; SIGKILL any that is not, by pid."""
    for pid in leftover_children():
        print(f"scale.py: child process {pid} was still running; killing it", file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def main() -> int:
    args = parse_args()
    started = time.monotonic()
    try:
        results = asyncio.run(main_guarded(args))
    except BenchmarkError as exc:
        print(f"scale.py: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("scale.py: interrupted", file=sys.stderr)
        return 130
    finally:
        kill_leftovers()
    total = time.monotonic() - started
    results["durations_s"]["total"] = round(total, 1)
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"\nresults written to {args.out}; total {total:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
