"""Cluster benchmark: rccs nodes on one Redis, measured in one run (``make bench-cluster``, about 8-10 min).

    python benchmarks/cluster/run.py                 # every part
    python benchmarks/cluster/run.py --quick         # short windows, 2 rounds, small Locust run (about 2 min)
    python benchmarks/cluster/run.py --parts routing,nodes

Starts a throw-away ``redis-server`` (``rccs.testing.RedisServer``: append-only file, ``appendfsync always``,
``noeviction``, as docs/operations.md recommends) and these ``rccs serve`` processes on free 127.0.0.1 ports,
all with one random ``RCCS_TOKEN_SECRET`` and ``--log-level WARNING``:

* ``n0``, ``n1``, ``n2``: nodes on that Redis (``--store redis://...``), redis-py with hiredis;
* ``p0``, ``p1``: nodes on the same Redis whose redis-py runs without hiredis (its pure-Python reply parser);
  stopped after the ``routing`` part;
* ``s0``: one node on SQLite (the default store), the single-node reference.

Parts (see README.md):

``routing``   closed-loop pairs (``benchmarks/e2e/loadgen.py``), server CPU per routed message with both
              devices of each pair on one node (``same``) or on two (``cross``), ``ack: false`` and
              ``ack: true``; the same with the SQLite node and with the nodes without hiredis.
``nodes``     throughput with 1, 2 and 3 nodes: devices placed at random over the nodes (what a load
              balancer without stickiness does) and pairs kept within a node (the best case).
``connect``   connect + hello rate and CPU per device: SQLite node, one Redis node, three Redis nodes.
``locust``    ``loadtest/locustfile.py`` with the two devices of each user on different nodes of n0-n2.

Every scenario of a part runs once per round, in an order that rotates, and the ratios (cross/same,
N nodes/1 node, ...) are taken within a round, so drift of a shared machine cancels. CPU is read from
``/proc/<pid>/stat`` (utime + stime, all threads) over the measured window: the nodes' sum and Redis apart.
Everything is bounded in time and stopped at the end, on errors and on Ctrl-C/SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import itertools
import json
import os
import platform
import random
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
E2E = HERE.parent / "e2e"
sys.path.insert(0, str(E2E))
if str(REPO) not in sys.path:  # run as a script from a checkout: use this tree's rccs
    sys.path.insert(0, str(REPO))
import redis.asyncio as aioredis  # noqa: E402
from loadgen import server_cpu_times  # noqa: E402
from run import BenchmarkError, Scenario, Server, base_env, fastpath_in_use, stop_process, tail  # noqa: E402

from rccs.testing import RedisServer  # noqa: E402

LOADGEN = E2E / "loadgen.py"
CONNECTGEN = HERE / "connectgen.py"
CLIENT = HERE / "client.py"
LOCUSTFILE = REPO / "loadtest" / "locustfile.py"
PARTS = ("routing", "client", "nodes", "connect", "locust")
# A live (ack:false) message reaches a device of another node once that node's announcement arrived (Redis Pub/Sub):
# before that it is answered no_route. The routing generators wait this long after connecting.
SETTLE = 1.0
QUIET_CPU = 0.15  # fraction of one core: below it, the cluster counts as idle between runs
QUIET_TIMEOUT = 30.0
HIREDIS_NODES = ("n0", "n1", "n2")
PLAIN_NODES = ("p0", "p1")
# redis-py picks hiredis when it imports; a node started this way finds none and uses its own parser.
WITHOUT_HIREDIS = "import sys; sys.modules['hiredis'] = None; from rccs.cli import main; sys.exit(main())"
PARSER_CHECK = "import redis.utils; print(redis.utils.HIREDIS_AVAILABLE)"


# ---- processes ----------------------------------------------------------------


class Node(Server):
    """One ``rccs serve`` process: on the Redis store (``store_url``) or on SQLite in its own directory."""

    def __init__(self, name: str, root: Path, secret: str, store_url: str = "", hiredis: bool = True):
        workdir = root / name
        workdir.mkdir(parents=True)
        super().__init__(Scenario(name, "rccs"), workdir, secret, max_connections=4000)
        self.name = name
        self.store_url = store_url
        self.hiredis = hiredis

    def command(self, port: int, http_port: int) -> list[str]:
        cmd = super().command(port, http_port)
        if self.store_url:
            cmd += ["--store", self.store_url, "--node-id", self.name]
        if not self.hiredis:
            cmd[1:3] = ["-c", WITHOUT_HIREDIS]  # in place of "-m rccs"; the arguments stay
        return cmd

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid


def cpu_seconds(pid: int) -> float:
    return sum(server_cpu_times(pid))


class Cluster:
    def __init__(self, root: Path):
        self.root = root
        self.secret = secrets.token_hex(32)
        self.redis = RedisServer(root / "redis")
        self.nodes: dict[str, Node] = {}

    @property
    def redis_pid(self) -> int:
        assert self.redis.proc is not None
        return self.redis.proc.pid

    async def start(self, plain: bool) -> None:
        try:
            url = await self.redis.start()
        except AssertionError as exc:
            raise BenchmarkError(f"redis-server did not start: {exc}") from None
        names = [*HIREDIS_NODES, *(PLAIN_NODES if plain else ())]
        for name in names:
            self.nodes[name] = Node(name, self.root, self.secret, url, hiredis=not name.startswith("p"))
        self.nodes["s0"] = Node("s0", self.root, self.secret)
        await asyncio.gather(*(node.start() for node in self.nodes.values()))

    def check_alive(self) -> None:
        if not self.redis.running():
            raise BenchmarkError(f"redis-server ended during the run:\n{self.redis.logs()}")
        for node in self.nodes.values():
            if node.proc is not None and node.proc.returncode is not None:
                raise BenchmarkError(f"node {node.name} ended during the run; {node.report()}")

    async def quiet(self, limit: float = QUIET_TIMEOUT) -> float:
        """Wait (bounded) until the nodes and Redis together use under QUIET_CPU of a core: what a run left
        behind (receipts, inbox writes, closes) must not run into the next one. The seconds waited."""
        pids = [node.pid for node in self.nodes.values()] + [self.redis_pid]
        started = time.monotonic()
        before = sum(cpu_seconds(pid) for pid in pids)
        while time.monotonic() - started < limit:
            await asyncio.sleep(0.5)
            after = sum(cpu_seconds(pid) for pid in pids)
            if after - before < QUIET_CPU * 0.5:
                break
            before = after
        return time.monotonic() - started

    async def appendfsync(self, policy: str) -> None:
        client = aioredis.Redis.from_url(self.redis.url, socket_timeout=5)
        try:
            await client.config_set("appendfsync", policy)
        finally:
            await client.aclose()

    async def redis_stalls(self, reset: bool) -> list[dict[str, Any]]:
        """Redis's own latency monitor (events of 100 ms or more: ``aof-fsync-always``, ``command``, ...): reset
        before a Locust run, read after it, so that a stall of Redis shows up next to the failures it caused."""
        client = aioredis.Redis.from_url(self.redis.url, socket_timeout=5)
        try:
            if reset:
                await client.config_set("latency-monitor-threshold", 100)
                await client.execute_command("LATENCY", "RESET")
                return []
            latest = await client.execute_command("LATENCY", "LATEST")
        finally:
            await client.aclose()
        return [{"event": row[0].decode() if isinstance(row[0], bytes) else row[0], "at": int(row[1]),
                 "latest_ms": int(row[2]), "max_ms": int(row[3])} for row in latest]

    async def stop_node(self, name: str) -> None:
        node = self.nodes.pop(name)
        await node.stop()

    async def stop(self) -> None:
        await asyncio.gather(*(node.stop() for node in self.nodes.values()), return_exceptions=True)
        await asyncio.to_thread(self.redis.stop)


async def run_child(cmd: list[str], env: dict[str, str], timeout: float, log: Path,
                    what: str, cluster: Cluster) -> dict[str, Any]:
    """Run a generator process to its end (bounded), its last stdout line as JSON."""
    with log.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(*cmd, cwd=REPO, env=env, stdin=subprocess.DEVNULL,
                                                    stdout=subprocess.PIPE, stderr=err)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), timeout)
    except TimeoutError:
        raise BenchmarkError(f"{what}: no result within {timeout:.0f} s; its stderr:\n{tail(log)}") from None
    finally:
        await stop_process(proc)
    lines = out.decode().strip().splitlines()
    if not lines:
        cluster.check_alive()
        raise BenchmarkError(f"{what}: exited with {proc.returncode} without a result; stderr:\n{tail(log)}")
    result: dict[str, Any] = json.loads(lines[-1])
    if proc.returncode != 0:
        cluster.check_alive()
        problems = result.get("problems") or [p["failures"] for p in result.get("phases", [])]
        raise BenchmarkError(f"{what}: exited with {proc.returncode}: errors {result.get('errors')}, "
                             f"{json.dumps(problems)[:800]}\n{tail(log)}")
    return result


# ---- traffic scenarios (parts routing and nodes) ----------------------------------


def place_same(pairs: int, nodes: int, rng: random.Random) -> str:
    return "0" * (2 * pairs)


def place_cross(pairs: int, nodes: int, rng: random.Random) -> str:
    return "01" * pairs


def place_random(pairs: int, nodes: int, rng: random.Random) -> str:
    return "".join(str(rng.randrange(nodes)) for _ in range(2 * pairs))


def place_within(pairs: int, nodes: int, rng: random.Random) -> str:
    return "".join(str(k % nodes) * 2 for k in range(pairs))


@dataclass(frozen=True)
class Traffic:
    name: str
    nodes: tuple[str, ...]  # the nodes the devices connect to (placement digits index this)
    counted: tuple[str, ...]  # the nodes whose CPU is summed
    place: Callable[[int, int, random.Random], str]
    ack: bool = False
    description: str = ""
    fsync: str = "always"  # Redis's appendfsync during the run (CONFIG SET before, back to always after)


ROUTING = (
    Traffic("sqlite", ("s0",), ("s0",), place_same, description="one node on SQLite, both devices on it"),
    Traffic("sqlite-ack", ("s0",), ("s0",), place_same, True),
    Traffic("same", ("n0", "n1"), HIREDIS_NODES, place_same, description="Redis cluster, both devices on n0"),
    Traffic("same-ack", ("n0", "n1"), HIREDIS_NODES, place_same, True),
    Traffic("cross", ("n0", "n1"), HIREDIS_NODES, place_cross, description="Redis cluster, a on n0, b on n1"),
    Traffic("cross-ack", ("n0", "n1"), HIREDIS_NODES, place_cross, True),
    Traffic("same-ack-everysec", ("n0", "n1"), HIREDIS_NODES, place_same, True,
            "as same-ack, Redis with appendfsync everysec", "everysec"),
    Traffic("cross-ack-everysec", ("n0", "n1"), HIREDIS_NODES, place_cross, True,
            "as cross-ack, Redis with appendfsync everysec", "everysec"),
    Traffic("cross-plain", PLAIN_NODES, PLAIN_NODES, place_cross, description="as cross, redis-py without hiredis"),
    Traffic("cross-plain-ack", PLAIN_NODES, PLAIN_NODES, place_cross, True),
)
NODES = (
    Traffic("1-node", ("n0",), HIREDIS_NODES, place_random, description="every device on n0"),
    Traffic("2-nodes", ("n0", "n1"), HIREDIS_NODES, place_random, description="each device on a random node"),
    Traffic("3-nodes", HIREDIS_NODES, HIREDIS_NODES, place_random, description="each device on a random node"),
    Traffic("2-nodes-within", ("n0", "n1"), HIREDIS_NODES, place_within, description="pairs kept within a node"),
    Traffic("3-nodes-within", HIREDIS_NODES, HIREDIS_NODES, place_within, description="pairs kept within a node"),
)


async def traffic_run(cluster: Cluster, spec: Traffic, args: argparse.Namespace, index: int) -> dict[str, Any]:
    waited = await cluster.quiet()
    rng = random.Random(index)
    placement = spec.place(args.pairs, len(spec.nodes), rng)
    cross = sum(1 for k in range(args.pairs) if placement[2 * k] != placement[2 * k + 1])
    counted = [cluster.nodes[name].pid for name in spec.counted]
    cmd = [sys.executable, str(LOADGEN), "--mode", "rccs", "--pairs", str(args.pairs),
           "--inflight", str(args.inflight), "--seconds", str(args.seconds), "--warmup", str(args.warmup),
           "--user", f"u{index}", "--device-prefix", f"r{index}", "--placement", placement,
           "--settle", str(SETTLE)]
    for name in spec.nodes:
        cmd += ["--url", cluster.nodes[name].url]
    for pid in [*counted, cluster.redis_pid]:
        cmd += ["--watch-pid", str(pid)]
    if spec.ack:
        cmd.append("--ack")
    env = base_env()
    env["RCCS_TOKEN_SECRET"] = cluster.secret
    if spec.fsync != "always":
        await cluster.appendfsync(spec.fsync)
    try:
        result = await run_child(cmd, env, args.warmup + args.seconds + 60, cluster.root / f"loadgen-{index}.log",
                                 spec.name, cluster)
    finally:
        if spec.fsync != "always":
            await cluster.appendfsync("always")
    cluster.check_alive()
    received, window = result["received"], result["window_seconds"]
    watched = result["watched_cpu_s"]
    nodes_cpu = sum(watched[str(pid)] for pid in counted)
    redis_cpu = watched[str(cluster.redis_pid)]
    run = {
        "scenario": spec.name,
        "cross_pairs": cross / args.pairs,
        "msgs_per_s": received / window,
        "latency_us": {q: result["latency_us"][q] for q in ("p50", "p99")},
        "nodes_cpu_util": nodes_cpu / window,
        "redis_cpu_util": redis_cpu / window,
        "generator_cpu_util": result["generator_cpu_util"],
        "nodes_us_per_msg": nodes_cpu * 1e6 / received if received else float("nan"),
        "redis_us_per_msg": redis_cpu * 1e6 / received if received else float("nan"),
        "received": received,
        "window_seconds": window,
        "quiet_wait_s": waited,
        "cpu_util_by_node": {name: watched[str(cluster.nodes[name].pid)] / window for name in spec.counted},
    }
    run["total_us_per_msg"] = run["nodes_us_per_msg"] + run["redis_us_per_msg"]
    if spec.ack:
        run["receipts"] = result["receipts"]
        run["repeats"] = result["repeats"]
        run["delivered_latency_us_p50"] = result["delivered_latency_us"]["p50"]
    return run


def ratio(a: float, b: float) -> float:
    return a / b if b else float("nan")


def ratios_routing(by_name: dict[str, dict[str, Any]]) -> dict[str, float]:
    out = {}
    for ack in ("", "-ack"):
        everysec = by_name.get(f"same{ack}-everysec"), by_name.get(f"cross{ack}-everysec")
        for place, base, fast in (("same", by_name.get(f"same{ack}"), everysec[0]),
                                  ("cross", by_name.get(f"cross{ack}"), everysec[1])):
            if base and fast:
                out[f"everysec/always {place}{ack} msgs/s"] = ratio(fast["msgs_per_s"], base["msgs_per_s"])
                out[f"everysec/always {place}{ack} nodes+Redis CPU per msg"] = ratio(fast["total_us_per_msg"],
                                                                                   base["total_us_per_msg"])
        same, cross, sqlite, plain = (by_name.get(n + ack) for n in ("same", "cross", "sqlite", "cross-plain"))
        if same and cross:
            out[f"cross/same{ack} nodes CPU per msg"] = ratio(cross["nodes_us_per_msg"], same["nodes_us_per_msg"])
            out[f"cross/same{ack} nodes+Redis CPU per msg"] = ratio(cross["total_us_per_msg"], same["total_us_per_msg"])
            out[f"cross/same{ack} msgs/s"] = ratio(cross["msgs_per_s"], same["msgs_per_s"])
        if same and sqlite:
            out[f"same{ack}/sqlite{ack} nodes CPU per msg"] = ratio(same["nodes_us_per_msg"],
                                                                    sqlite["nodes_us_per_msg"])
            out[f"same{ack}/sqlite{ack} nodes+Redis CPU per msg"] = ratio(same["total_us_per_msg"],
                                                                          sqlite["nodes_us_per_msg"])
        if cross and plain:
            out[f"no-hiredis/hiredis{ack} (cross) nodes CPU per msg"] = ratio(plain["nodes_us_per_msg"],
                                                                             cross["nodes_us_per_msg"])
            out[f"no-hiredis/hiredis{ack} (cross) msgs/s"] = ratio(plain["msgs_per_s"], cross["msgs_per_s"])
    return out


def ratios_nodes(by_name: dict[str, dict[str, Any]]) -> dict[str, float]:
    one = by_name.get("1-node")
    if not one:
        return {}
    return {f"{name} / 1-node msgs/s": ratio(run["msgs_per_s"], one["msgs_per_s"])
            for name, run in by_name.items() if name != "1-node"}


# ---- connect + hello ----------------------------------------------------------------


@dataclass(frozen=True)
class Connect:
    name: str
    nodes: tuple[str, ...]
    counted: tuple[str, ...]
    description: str = ""


CONNECTS = (
    Connect("sqlite", ("s0",), ("s0",), "one node on SQLite"),
    Connect("redis-1", ("n0",), HIREDIS_NODES, "every device to n0 (n1, n2 run and hear its presence)"),
    Connect("redis-3", HIREDIS_NODES, HIREDIS_NODES, "round robin over n0, n1, n2"),
)


async def connect_run(cluster: Cluster, spec: Connect, args: argparse.Namespace, index: int) -> dict[str, Any]:
    waited = await cluster.quiet()
    counted = [cluster.nodes[name].pid for name in spec.counted]
    cmd = [sys.executable, str(CONNECTGEN), "--devices", str(args.connect_devices), "--per-user",
           str(args.connect_per_user), "--concurrency", str(args.connect_concurrency), "--prefix", f"c{index}"]
    for name in spec.nodes:
        cmd += ["--url", cluster.nodes[name].url]
    for pid in [*counted, cluster.redis_pid]:
        cmd += ["--watch-pid", str(pid)]
    env = base_env()
    env["RCCS_TOKEN_SECRET"] = cluster.secret
    result = await run_child(cmd, env, 150, cluster.root / f"connectgen-{index}.log", f"connect {spec.name}", cluster)
    cluster.check_alive()
    run: dict[str, Any] = {"scenario": spec.name, "quiet_wait_s": waited}
    for ph in result["phases"]:
        watched = ph["watched_cpu_s"]
        nodes_cpu = sum(watched[str(pid)] for pid in counted)
        redis_cpu = watched[str(cluster.redis_pid)]
        run[ph["phase"]] = {
            "per_s": ph["per_s"],
            "seconds": ph["seconds"],
            "nodes_us_per_device": nodes_cpu * 1e6 / ph["connected"],
            "redis_us_per_device": redis_cpu * 1e6 / ph["connected"],
            "nodes_cpu_util": nodes_cpu / ph["seconds"],
            "redis_cpu_util": redis_cpu / ph["seconds"],
            "generator_cpu_util": ph["generator_cpu_util"],
        }
    return run


# ---- the Redis client alone ----------------------------------------------------------------


async def client_runs(cluster: Cluster, args: argparse.Namespace, indexes: Any) -> list[dict[str, Any]]:
    """client.py with and without hiredis, alternating, ``args.rounds`` times each."""
    runs = []
    for round_no in range(args.rounds):
        for hiredis in rotated((True, False), round_no):
            await cluster.quiet()
            cmd = [sys.executable, str(CLIENT), "--url", cluster.redis.url, "--seconds", str(args.client_seconds),
                   "--prefix", f"bench-client-{next(indexes)}"]
            if not hiredis:
                cmd.append("--no-hiredis")
            result = await run_child(cmd, base_env(), 60, cluster.root / "client.log", "client", cluster)
            if result["hiredis"] != hiredis:
                raise BenchmarkError(f"client.py ran with hiredis={result['hiredis']}, expected {hiredis}")
            result["round"] = round_no
            runs.append(result)
            print(f"  {'hiredis' if hiredis else 'no hiredis':<11}" + "  ".join(
                f"{r['workload']}: {r['calls_per_s']:.0f}/s {r['client_us_per_call']:.0f} us"
                for r in result["results"]), flush=True)
    return runs


def ratios_client(runs: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for round_no in sorted({r["round"] for r in runs}):
        pair = {r["hiredis"]: r for r in runs if r["round"] == round_no}
        if len(pair) < 2:
            continue
        for fast, plain in zip(pair[True]["results"], pair[False]["results"], strict=True):
            key = f"no-hiredis/hiredis {fast['workload']} client CPU per call"
            out.setdefault(key, {})[str(round_no)] = ratio(plain["client_us_per_call"], fast["client_us_per_call"])
    return {key: spread(list(values.values())) for key, values in out.items()}


# ---- Locust over three nodes ------------------------------------------------------------

LOCUST_LINE = re.compile(r"rccs loadtest: send\+delivered n=(\d+) fail=(\d+) p50/p95/p99=(\d+)/(\d+)/(\d+) ms; "
                         r"hello n=(\d+) fail=(\d+) p50/p95/p99=(\d+)/(\d+)/(\d+) ms")


async def locust_run(cluster: Cluster, args: argparse.Namespace, placement: str) -> dict[str, Any]:
    locust = Path(sys.executable).parent / "locust"
    if not locust.is_file():
        raise BenchmarkError(f"locust is not installed next to {sys.executable}: "
                             f"pip install -r {REPO / 'loadtest' / 'requirements.txt'}")
    urls = [cluster.nodes[n].url.removesuffix("/v1") for n in HIREDIS_NODES]
    users, rate, duration = args.locust_users, 100.0, args.locust_seconds
    cmd = [str(locust), "-f", str(LOCUSTFILE), "--headless", "-u", str(users), "-r", f"{rate:g}",
           "-t", f"{duration}s", "--host", urls[0], "--rccs-hosts", ",".join(urls), "--only-summary",
           "--stop-timeout", "5", "--exit-code-on-error", "1", "--min-devices", str(2 * users),
           "--settle", "0", "--rccs-placement", placement,  # ack:true sends reach a device from its welcome on
           "--user-prefix", f"lt{placement}", "--csv", "locust", "--csv-full-history"]
    env = dict(os.environ)
    env["PYTHONPATH"] = str(REPO)
    env["RCCS_TOKEN_SECRET"] = cluster.secret
    await cluster.quiet()
    await cluster.redis_stalls(reset=True)
    log_sizes = {n: cluster.nodes[n].log_path.stat().st_size for n in HIREDIS_NODES}
    workdir = cluster.root / f"locust-{placement}"
    workdir.mkdir()
    log = workdir / "locust.log"
    pids = [cluster.nodes[n].pid for n in HIREDIS_NODES]
    cpu0 = {pid: cpu_seconds(pid) for pid in [*pids, cluster.redis_pid]}
    wall0 = time.monotonic()
    with log.open("wb") as out:
        # Own session, so that on a timeout the whole Locust process group (gevent, no children) is stopped.
        proc = await asyncio.create_subprocess_exec(*cmd, cwd=workdir, env=env, stdin=subprocess.DEVNULL,
                                                    stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        await asyncio.wait_for(proc.wait(), duration + users / rate + 90)
    except TimeoutError:
        raise BenchmarkError(f"locust overran its time limit:\n{tail(log)}") from None
    finally:
        await stop_process(proc)
    wall = time.monotonic() - wall0
    cpu1 = {pid: cpu_seconds(pid) for pid in cpu0}
    cluster.check_alive()
    stalls = await cluster.redis_stalls(reset=False)
    text = log.read_text(errors="replace")
    match = LOCUST_LINE.search(text)
    verdict = next((line for line in text.splitlines() if "=> PASS" in line or "=> FAIL" in line), "")
    if match is None:
        raise BenchmarkError(f"locust printed no summary (exit code {proc.returncode}):\n{tail(log)}")
    n, fail, p50, p95, p99, hn, hfail, hp50, hp95, hp99 = (int(g) for g in match.groups())
    # Locust's error report: "# occurrences | Error" then one line per kind of failure.
    errors = text.split("Error report", 1)[1].splitlines()[3:13] if "Error report" in text else []
    return {
        "placement": placement,
        "errors": [line.strip() for line in errors if line.strip() and not line.startswith("-")],
        "users": users, "devices": 2 * users, "seconds": duration, "nodes": len(urls),
        "exit_code": proc.returncode, "verdict": verdict.strip(),
        "roundtrips": n, "roundtrip_failures": fail, "roundtrip_ms": {"p50": p50, "p95": p95, "p99": p99},
        "hellos": hn, "hello_failures": hfail, "hello_ms": {"p50": hp50, "p95": hp95, "p99": hp99},
        "wall_seconds": wall,
        "nodes_cpu_util": sum(cpu1[p] - cpu0[p] for p in pids) / wall,
        "redis_cpu_util": (cpu1[cluster.redis_pid] - cpu0[cluster.redis_pid]) / wall,
        "redis_stalls": stalls,
        "failure_seconds": failure_seconds(workdir / "locust_stats_history.csv"),
        "node_warnings": node_warnings(cluster, log_sizes),
    }


def node_warnings(cluster: Cluster, since: dict[str, int]) -> list[str]:
    """The nodes' WARNING and ERROR log lines written during a run (the first 20), so that a failing run shows
    what its nodes complained of (a Pub/Sub reconnect, a store that did not answer, ...)."""
    found: list[str] = []
    for name, offset in since.items():
        with cluster.nodes[name].log_path.open("rb") as log:
            log.seek(offset)
            for line in log.read().decode(errors="replace").splitlines():
                if '"level": "WARNING"' in line or '"level": "ERROR"' in line:
                    found.append(f"{name}: {line[:300]}")
    return found[:20]


def failure_seconds(history: Path) -> list[list[int]]:
    """When round trips failed: [second of the run, failures counted in it] from Locust's per-second history
    (the aggregated row), so that failures bunched in one stall tell apart from failures spread out."""
    seen: list[list[int]] = []
    try:
        rows = list(csv.DictReader(history.open()))
    except OSError:
        return seen
    first: int | None = None
    previous = 0
    for row in rows:
        if row.get("Name") != "Aggregated":
            continue
        stamp, failures = int(row["Timestamp"]), int(row["Total Failure Count"])
        first = stamp if first is None else first
        if failures > previous:
            seen.append([stamp - first, failures - previous])
        previous = failures
    return seen


# ---- the whole benchmark ------------------------------------------------------------------


@dataclass
class Results:
    runs: dict[str, list[dict[str, Any]]] = field(default_factory=lambda: {p: [] for p in PARTS})
    ratios: dict[str, list[dict[str, float]]] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def rotated(items: tuple[Any, ...], round_no: int) -> list[Any]:
    shift = round_no % len(items)
    return list(items[shift:] + items[:shift])


async def with_retry(what: str, results: Results, attempt: Callable[[], Any], retries: int) -> Any:
    for tries in range(retries + 1):
        try:
            return await attempt()
        except BenchmarkError as exc:
            results.failures.append(f"{what}: {exc}")
            if tries == retries:
                raise
            print(f"  {what} failed, retrying: {str(exc)[:300]}", flush=True)
    raise AssertionError("unreachable")


def print_traffic(run: dict[str, Any]) -> None:
    lat = run["latency_us"]
    print(f"  {run['scenario']:<16}{run['msgs_per_s']:>8.0f} msgs/s  p50 {lat['p50']:>6.0f} p99 {lat['p99']:>7.0f} us  "
          f"nodes {run['nodes_us_per_msg']:6.2f} + redis {run['redis_us_per_msg']:5.2f} us/msg  "
          f"(nodes {run['nodes_cpu_util']:.0%}, redis {run['redis_cpu_util']:.0%}, "
          f"gen {run['generator_cpu_util']:.0%}; cross pairs {run['cross_pairs']:.0%}; "
          f"waited {run['quiet_wait_s']:.1f} s for quiet" + (f"; repeats {run['repeats']}" if "repeats" in run else "")
          + ")", flush=True)


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    results = Results()
    parser = {}
    for label, code in (("with", PARSER_CHECK), ("without", WITHOUT_HIREDIS.split("; from")[0] + "; " + PARSER_CHECK)):
        out = subprocess.run([sys.executable, "-c", code], env=base_env(), capture_output=True, text=True,
                             timeout=30, check=False)
        parser[label] = out.stdout.strip() or out.stderr.strip()[-200:]
    if parser["with"] != "True":
        print("warning: hiredis is not importable; the n* nodes run redis-py's pure-Python parser", file=sys.stderr)
    fastpath = fastpath_in_use(False)
    root = Path(tempfile.mkdtemp(prefix="rccs-bench-cluster-"))
    cluster = Cluster(root)
    indexes = itertools.count(1)  # every attempt gets new users, devices and message ids
    started = time.monotonic()
    try:
        await cluster.start(plain="routing" in args.parts)
        print(f"cluster: redis-server {cluster.redis.url}, nodes "
              + ", ".join(f"{n.name} {n.url}" for n in cluster.nodes.values()) + f"; fast path {fastpath}", flush=True)
        for part, specs, ratio in (("routing", ROUTING, ratios_routing), ("nodes", NODES, ratios_nodes)):
            if part not in args.parts:
                continue
            print(f"\n== {part}: {args.rounds} rounds, {args.pairs} pairs x {args.inflight} in flight, "
                  f"{args.warmup:g}+{args.seconds:g} s per run", flush=True)
            results.ratios[part] = []
            for round_no in range(args.rounds):
                print(f" round {round_no + 1}", flush=True)
                by_name = {}
                for spec in rotated(tuple(s for s in specs if not args.only or s.name in args.only), round_no):
                    run = await with_retry(f"{part} {spec.name}", results,
                                           lambda s=spec: traffic_run(cluster, s, args, next(indexes)), args.retries)
                    run["round"] = round_no
                    results.runs[part].append(run)
                    by_name[spec.name] = run
                    print_traffic(run)
                results.ratios[part].append(ratio(by_name))
            if part == "routing":
                for name in PLAIN_NODES:
                    if name in cluster.nodes:
                        await cluster.stop_node(name)  # they would otherwise hear every later presence change
        if "client" in args.parts:
            print(f"\n== client: redis-py with and without hiredis, {args.rounds} rounds", flush=True)
            results.runs["client"] = await client_runs(cluster, args, indexes)
        if "connect" in args.parts:
            print(f"\n== connect: {args.connect_rounds} rounds, {args.connect_devices} devices, "
                  f"{args.connect_per_user} per user, {args.connect_concurrency} connects at once", flush=True)
            for round_no in range(args.connect_rounds):
                for cspec in rotated(CONNECTS, round_no):
                    crun = await with_retry(f"connect {cspec.name}", results,
                                            lambda s=cspec: connect_run(cluster, s, args, next(indexes)), args.retries)
                    crun["round"] = round_no
                    results.runs["connect"].append(crun)
                    print(f"  {cspec.name:<9}" + "  ".join(
                        f"{ph}: {crun[ph]['per_s']:>5.0f}/s nodes {crun[ph]['nodes_us_per_device']:>5.0f} + redis "
                        f"{crun[ph]['redis_us_per_device']:>4.0f} us/device (gen {crun[ph]['generator_cpu_util']:.0%})"
                        for ph in ("first", "again")), flush=True)
        if "locust" in args.parts:
            print(f"\n== locust: {args.locust_users} users = {2 * args.locust_users} devices over n0, n1, n2, "
                  f"{args.locust_seconds} s", flush=True)
            for placement in args.locust_placements:
                lrun = await locust_run(cluster, args, placement)
                results.runs["locust"].append(lrun)
                print(f"  {placement}: {lrun['verdict']}\n  send+delivered n={lrun['roundtrips']} p50/p95/p99 "
                      f"{lrun['roundtrip_ms']['p50']}/{lrun['roundtrip_ms']['p95']}/{lrun['roundtrip_ms']['p99']} ms; "
                      f"hello p99 {lrun['hello_ms']['p99']} ms; nodes CPU {lrun['nodes_cpu_util']:.0%}, "
                      f"redis {lrun['redis_cpu_util']:.0%}" + "".join(f"\n    {e}" for e in lrun["errors"])
                      + (f"\n    failed [second, count]: {lrun['failure_seconds']}" if lrun["failure_seconds"] else "")
                      + "".join(f"\n    Redis stall: {s['event']} up to {s['max_ms']} ms"
                                for s in lrun["redis_stalls"])
                      + "".join(f"\n    {line}" for line in lrun["node_warnings"]),
                      flush=True)
    finally:
        await cluster.stop()
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)
    return {
        "config": {k: getattr(args, k) for k in ("pairs", "inflight", "seconds", "warmup", "rounds", "parts",
                                                  "connect_devices", "connect_per_user", "connect_concurrency",
                                                  "connect_rounds", "locust_users", "locust_seconds",
                                                  "client_seconds")},
        "environment": {"cpus": os.cpu_count(), "python": platform.python_version(), "fastpath": fastpath,
                        "hiredis_available": parser, "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                        "loadavg_at_end": os.getloadavg(), "seconds": time.monotonic() - started},
        "runs": results.runs,
        "ratios": {part: {key: spread([r[key] for r in rounds if key in r]) for key in rounds[0]}
                   for part, rounds in results.ratios.items() if rounds},
        "medians": medians(results.runs),
        "client_ratios": ratios_client(results.runs.get("client", [])),
        "failures": results.failures,
    }


def medians(runs: dict[str, list[dict[str, Any]]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for part in ("routing", "nodes"):
        for name in dict.fromkeys(r["scenario"] for r in runs[part]):
            mine = [r for r in runs[part] if r["scenario"] == name]
            out[f"{part}/{name}"] = {key: statistics.median(r[key] for r in mine) for key in
                                     ("msgs_per_s", "nodes_us_per_msg", "redis_us_per_msg", "total_us_per_msg",
                                      "nodes_cpu_util", "redis_cpu_util", "generator_cpu_util", "cross_pairs")}
            out[f"{part}/{name}"]["p99_us"] = statistics.median(r["latency_us"]["p99"] for r in mine)
    for name in dict.fromkeys(r["scenario"] for r in runs["connect"]):
        mine = [r for r in runs["connect"] if r["scenario"] == name]
        out[f"connect/{name}"] = {ph: {key: statistics.median(r[ph][key] for r in mine) for key in mine[0][ph]}
                                  for ph in ("first", "again")}
    return out


def report(data: dict[str, Any]) -> str:
    lines = []
    for part in ("routing", "nodes"):
        keys = [k for k in data["medians"] if k.startswith(part + "/")]
        if not keys:
            continue
        lines.append(f"\n{part} (medians over rounds)")
        lines.append(f"{'scenario':<18}{'msgs/s':>9}{'p99 us':>9}{'nodes us/msg':>14}{'redis us/msg':>14}"
                     f"{'nodes CPU':>11}{'redis CPU':>11}{'gen CPU':>9}")
        for key in keys:
            m = data["medians"][key]
            lines.append(f"{key.split('/', 1)[1]:<18}{m['msgs_per_s']:>9.0f}{m['p99_us']:>9.0f}"
                         f"{m['nodes_us_per_msg']:>14.2f}{m['redis_us_per_msg']:>14.2f}"
                         f"{m['nodes_cpu_util']:>11.0%}{m['redis_cpu_util']:>11.0%}{m['generator_cpu_util']:>9.0%}")
        for key, s in data["ratios"].get(part, {}).items():
            lines.append(f"  {key:<48} {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})")
    keys = [k for k in data["medians"] if k.startswith("connect/")]
    if keys:
        lines.append("\nconnect + hello (medians over rounds)")
        for key in keys:
            m = data["medians"][key]
            lines.append(f"{key.split('/', 1)[1]:<10}" + "  ".join(
                f"{ph}: {m[ph]['per_s']:.0f}/s, nodes {m[ph]['nodes_us_per_device']:.0f} + redis "
                f"{m[ph]['redis_us_per_device']:.0f} us/device" for ph in ("first", "again")))
    if data["client_ratios"]:
        lines.append("\nRedis client alone (client CPU per call, min/median/max over rounds)")
        for key, s in data["client_ratios"].items():
            lines.append(f"  {key:<60} {s['median']:.2f} ({s['min']:.2f}-{s['max']:.2f})")
    for lrun in data["runs"]["locust"]:
        lines.append(f"\nlocust over {lrun['nodes']} nodes, pairs {lrun['placement']}: {lrun['verdict']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", default=",".join(PARTS), help="comma-separated subset of " + ", ".join(PARTS))
    parser.add_argument("--only", type=lambda v: [n.strip() for n in v.split(",") if n.strip()], default=[],
                        help="comma-separated scenario names of the routing and nodes parts to run (default all)")
    parser.add_argument("--quick", action="store_true", help="short windows, 2 rounds, small Locust run")
    parser.add_argument("--pairs", type=int, default=50)
    parser.add_argument("--inflight", type=int, default=4)
    parser.add_argument("--seconds", type=float, help="measured window per run (default 3, --quick 1.5)")
    parser.add_argument("--warmup", type=float, help="traffic before the window (default 1, --quick 0.5)")
    parser.add_argument("--rounds", type=int, help="rounds of the routing and nodes parts (default 3, --quick 2)")
    parser.add_argument("--connect-devices", type=int, help="devices per connect run (default 600, --quick 200)")
    parser.add_argument("--connect-per-user", type=int, default=5)
    parser.add_argument("--connect-concurrency", type=int, default=32)
    parser.add_argument("--connect-rounds", type=int, default=2)
    parser.add_argument("--locust-users", type=int, help="Locust users, 2 devices each (default 600, --quick 50)")
    parser.add_argument("--locust-seconds", type=int, help="Locust run time (default 60, --quick 15)")
    parser.add_argument("--locust-placements", default="cross,within",
                        help="Locust runs: cross (the devices of a user on different nodes), within (on one node)")
    parser.add_argument("--client-seconds", type=float, default=1.0, help="per workload of the client part")
    parser.add_argument("--retries", type=int, default=1, help="retries of a failed run (default 1)")
    parser.add_argument("--keep", action="store_true", help="keep the temp directory (logs) at the end")
    parser.add_argument("--out", default=str(HERE / "results.json"))
    args = parser.parse_args(argv)
    quick = args.quick
    args.seconds = args.seconds if args.seconds is not None else (1.5 if quick else 3.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if quick else 1.0)
    args.rounds = args.rounds if args.rounds is not None else (2 if quick else 3)
    args.connect_devices = args.connect_devices or (200 if quick else 600)
    args.locust_users = args.locust_users or (50 if quick else 600)
    args.locust_seconds = args.locust_seconds or (15 if quick else 60)
    args.locust_placements = [p.strip() for p in args.locust_placements.split(",") if p.strip()]
    if any(p not in ("cross", "within") for p in args.locust_placements):
        parser.error("--locust-placements: cross, within")
    args.parts = [p.strip() for p in args.parts.split(",") if p.strip()]
    if not args.parts or any(p not in PARTS for p in args.parts):
        parser.error("--parts: choose from " + ", ".join(PARTS))
    if args.pairs < 1 or args.inflight < 1 or args.rounds < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("need --pairs, --inflight, --rounds >= 1, --seconds > 0, --warmup >= 0")
    return args


async def main_guarded(args: argparse.Namespace) -> dict[str, Any]:
    # SIGTERM/SIGHUP cancel the run like Ctrl-C does, so the finally blocks still stop every child process.
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGHUP):
        loop.add_signal_handler(signum, task.cancel)
    return await main_async(args)


def main() -> int:
    args = parse_args()
    try:
        data = asyncio.run(main_guarded(args))
    except BenchmarkError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("run.py: interrupted", file=sys.stderr)
        return 130
    print(report(data))
    Path(args.out).write_text(json.dumps(data, indent=2) + "\n")
    print(f"\nresults written to {args.out} ({data['environment']['seconds']:.0f} s)")
    locust = data["runs"]["locust"]
    return 1 if any(run["exit_code"] != 0 for run in locust) else 0


if __name__ == "__main__":
    sys.exit(main())
