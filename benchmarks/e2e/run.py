"""End-to-end benchmark: rccs against a bare picows router, in one command.

    python benchmarks/e2e/run.py [--pairs 50 --inflight 4 --seconds 5 --warmup 1 --rounds 5] [--quick]

Each measurement starts a fresh server process on free ports, runs the load
generator(s) against it (``loadgen.py``) and stops the server. Baseline runs
are interleaved with the rccs scenarios (B R1 B R2 B R3 B R1 ... B), so every
rccs run has a baseline run right before and right after it; its CPU-per-message
ratio is taken against the mean of those two, which cancels most of the drift
of a shared, noisy machine. See README.md for what is measured.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import secrets
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from array import array
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from loadgen import percentile  # run.py's directory is on sys.path when it runs as a script

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:  # run as a script from a checkout: use this tree's rccs
    sys.path.insert(0, str(REPO))
from rccs.testing import free_ports  # noqa: E402

LOADGEN = HERE / "loadgen.py"
ROUTER = HERE / "baseline_router.py"

SERVER_START_TIMEOUT = 20.0
STOP_GRACE = 5.0


@dataclass(frozen=True)
class Scenario:
    name: str
    server: str  # "baseline", "welcome-only" (baseline_router.py --welcome) or "rccs"
    ack: bool = False
    pure_python: bool = False
    description: str = ""


BASELINE = Scenario("baseline", "baseline", description="bare picows router, 4-byte target id, no decoding")
RCCS_SCENARIOS = (
    Scenario("rccs", "rccs", description="rccs direct send, no receipts, compiled fast path"),
    Scenario("rccs-ack", "rccs", ack=True, description="rccs ack:true, receiver acks, sender gets receipts"),
    Scenario("rccs-pure", "rccs", pure_python=True, description="rccs direct send, RCCS_PUREPYTHON=1"),
)


class BenchmarkError(RuntimeError):
    """A run that could not be measured; the message says why."""


# ---- processes ------------------------------------------------------------


def base_env() -> dict[str, str]:
    # Inherited RCCS_* settings would silently change what the server measures.
    env = {k: v for k, v in os.environ.items() if not k.startswith("RCCS_")}
    env["PYTHONPATH"] = str(REPO)
    return env


def owns_listening_port(pid: int, port: int) -> bool:
    """Whether process ``pid`` holds the socket listening on 127.0.0.1:``port``.

    Accepting a connection alone could mean someone else grabbed the port between
    our pick and the server's bind; then the server dies, but only after the poll succeeded.
    """
    inodes = set()
    with contextlib.suppress(OSError):
        for row in Path("/proc/net/tcp").read_text().splitlines()[1:]:
            fields = row.split()
            if fields[1] == f"0100007F:{port:04X}" and fields[3] == "0A":  # 0A: LISTEN
                inodes.add(fields[9])
    try:
        links = [os.readlink(f"/proc/{pid}/fd/{fd}") for fd in os.listdir(f"/proc/{pid}/fd")]
    except OSError:
        return False
    return any(link in {f"socket:[{inode}]" for inode in inodes} for link in links)


def tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


async def stop_process(proc: asyncio.subprocess.Process) -> None:
    """SIGTERM, then SIGKILL after a grace period; always reaps the process."""
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), STOP_GRACE)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
    await proc.wait()


class Server:
    """One server process under test, on fresh ports, with its log in ``workdir``."""

    def __init__(self, scenario: Scenario, workdir: Path, secret: str, max_connections: int):
        self.scenario = scenario
        self.workdir = workdir
        self.secret = secret
        self.max_connections = max_connections
        self.log_path = workdir / "server.log"
        self.proc: asyncio.subprocess.Process | None = None
        self.port = 0

    @property
    def url(self) -> str:
        path = "/v1" if self.scenario.server == "rccs" else "/"
        return f"ws://127.0.0.1:{self.port}{path}"

    def command(self, port: int, http_port: int) -> list[str]:
        if self.scenario.server == "baseline":
            return [sys.executable, str(ROUTER), "--port", str(port)]
        if self.scenario.server == "welcome-only":  # the floor of a connect (scale.py connect)
            return [sys.executable, str(ROUTER), "--port", str(port), "--welcome"]
        # RCCS_BENCH_SERVE_ARGS: more `rccs serve` flags for every rccs server (an A/B of a setting)
        return [sys.executable, "-m", "rccs", "serve", "--port", str(port), "--http-port", str(http_port),
                "--data-dir", str(self.workdir / "data"), "--max-connections", str(self.max_connections),
                "--log-level", "WARNING", *shlex.split(os.environ.get("RCCS_BENCH_SERVE_ARGS", ""))]

    def env(self) -> dict[str, str]:
        env = base_env()
        env["RCCS_TOKEN_SECRET"] = self.secret
        env["PYTHONFAULTHANDLER"] = "1"  # a crash in compiled code then leaves a traceback in the log
        if self.scenario.pure_python:
            env["RCCS_PUREPYTHON"] = "1"
        return env

    async def start(self) -> None:
        self.port, http_port = free_ports(2)
        with self.log_path.open("wb") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.command(self.port, http_port), cwd=REPO, env=self.env(),
                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while True:
            if self.proc.returncode is not None:
                raise BenchmarkError(
                    f"{self.scenario.name}: server exited with code {self.proc.returncode} before accepting "
                    f"connections on port {self.port}; its output:\n{tail(self.log_path)}"
                )
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", self.port), 1.0)
            except (OSError, TimeoutError):
                if time.monotonic() > deadline:
                    raise BenchmarkError(
                        f"{self.scenario.name}: server did not accept connections on port {self.port} within "
                        f"{SERVER_START_TIMEOUT:.0f} s; its output:\n{tail(self.log_path)}"
                    ) from None
                await asyncio.sleep(0.05)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            if owns_listening_port(self.proc.pid, self.port):
                return
            if time.monotonic() > deadline:
                raise BenchmarkError(f"{self.scenario.name}: port {self.port} is held by another process")
            await asyncio.sleep(0.05)

    def report(self) -> str:
        """The server's state and last output, for error messages."""
        assert self.proc is not None
        if self.proc.returncode is None:
            state = "the server is still running"
        elif self.proc.returncode < 0:
            state = f"the server was killed by signal {-self.proc.returncode}"
        else:
            state = f"the server exited with code {self.proc.returncode}"
        return f"{state}; server output:\n{tail(self.log_path)}"

    async def stop(self) -> None:
        if self.proc is not None:
            await stop_process(self.proc)


async def run_generators(scenario: Scenario, server: Server, args: argparse.Namespace,
                         workdir: Path) -> list[dict[str, Any]]:
    """Start the generator processes, release them together once all are connected, collect their results."""
    assert server.proc is not None
    count = args.generators
    env = base_env()
    env["RCCS_TOKEN_SECRET"] = server.secret
    procs: list[asyncio.subprocess.Process] = []
    logs = [workdir / f"loadgen-{i}.log" for i in range(count)]
    try:
        for i in range(count):
            pairs = args.pairs // count + (1 if i < args.pairs % count else 0)
            cmd = [sys.executable, str(LOADGEN), "--mode", scenario.server, "--url", server.url,
                   "--pairs", str(pairs), "--inflight", str(args.inflight), "--seconds", str(args.seconds),
                   "--warmup", str(args.warmup), "--server-pid", str(server.proc.pid),
                   "--device-prefix", f"g{i}", "--samples-out", str(workdir / f"samples-{i}.bin"), "--sync-stdin"]
            if scenario.ack:
                cmd.append("--ack")
            with logs[i].open("wb") as log:
                procs.append(await asyncio.create_subprocess_exec(
                    *cmd, cwd=REPO, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                ))

        async def read_json(i: int, timeout: float) -> dict[str, Any]:
            stdout = procs[i].stdout
            assert stdout is not None
            try:
                line = await asyncio.wait_for(stdout.readline(), timeout)
            except TimeoutError:
                raise BenchmarkError(f"{scenario.name}: generator {i} gave no answer within {timeout:.0f} s; "
                                     f"its stderr:\n{tail(logs[i])}\n{server.report()}") from None
            if not line:
                await procs[i].wait()
                raise BenchmarkError(f"{scenario.name}: generator {i} exited with code {procs[i].returncode}; "
                                     f"its stderr:\n{tail(logs[i])}\n{server.report()}")
            result: dict[str, Any] = json.loads(line)
            return result

        await asyncio.gather(*(read_json(i, 30.0) for i in range(count)))
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
        await asyncio.gather(*(p.stdin.drain() for p in procs if p.stdin is not None))
        results = await asyncio.gather(*(read_json(i, args.warmup + args.seconds + 30.0) for i in range(count)))
        for i, (proc, result) in enumerate(zip(procs, results, strict=True)):
            if await proc.wait() != 0:
                raise BenchmarkError(f"{scenario.name}: generator {i} exited with code {proc.returncode}: "
                                     f"errors={result['errors']} disconnects={result['unexpected_disconnects']} "
                                     f"{result['problems'][:3]}\n{server.report()}")
        return list(results)
    finally:
        for proc in procs:
            await stop_process(proc)


# ---- one measurement --------------------------------------------------------


def combine(scenario: Scenario, results: list[dict[str, Any]], workdir: Path) -> dict[str, Any]:
    """One run's numbers from its generators: counts add up, latency percentiles over all samples."""
    samples = array("q")
    for i in range(len(results)):
        samples.frombytes((workdir / f"samples-{i}.bin").read_bytes())
    latency = sorted(samples)
    window = statistics.fmean(r["window_seconds"] for r in results)
    received = sum(r["received"] for r in results)
    # The generators' windows start together (stdin barrier), so their server CPU readings cover the same time.
    server_cpu = statistics.fmean(r["server_cpu_s"] for r in results)
    server_user = statistics.fmean(r["server_user_s"] for r in results)
    run: dict[str, Any] = {
        "scenario": scenario.name,
        "window_seconds": window,
        "received": received,
        "msgs_per_s": received / window,
        "latency_us": {name: percentile(latency, q) / 1000 for name, q in
                       (("p50", 0.50), ("p99", 0.99), ("p999", 0.999))},
        "server_cpu_s": server_cpu,
        "server_cpu_util": server_cpu / window,
        "server_cpu_us_per_msg": server_cpu * 1e6 / received if received else float("nan"),
        "server_user_us_per_msg": server_user * 1e6 / received if received else float("nan"),
        "server_sys_us_per_msg": (server_cpu - server_user) * 1e6 / received if received else float("nan"),
        "generator_cpu_util": sum(r["generator_cpu_util"] for r in results),
        "generators": len(results),
    }
    if scenario.ack:
        run["receipts"] = {key: sum(r["receipts"][key] for r in results) for key in ("routed", "delivered", "failed")}
        run["delivered_latency_us_p50"] = statistics.median(r["delivered_latency_us"]["p50"] for r in results)
        run["delivered_latency_us_p99"] = max(r["delivered_latency_us"]["p99"] for r in results)
    return run


async def measure(scenario: Scenario, args: argparse.Namespace) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix=f"rccs-e2e-{scenario.name}-"))
    try:
        server = Server(scenario, workdir, secrets.token_hex(32), max_connections=2 * args.pairs + 16)
        try:
            await server.start()
            results = await run_generators(scenario, server, args, workdir)
            assert server.proc is not None
            if server.proc.returncode is not None:
                raise BenchmarkError(f"{scenario.name}: the server ended before the run did; {server.report()}")
        finally:
            await server.stop()
        return combine(scenario, results, workdir)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


# ---- the whole benchmark ----------------------------------------------------


def fastpath_in_use(pure_python: bool) -> str:
    """What ``rccs version`` reports under the scenario's environment: ``cython`` or ``python``."""
    env = base_env()
    if pure_python:
        env["RCCS_PUREPYTHON"] = "1"
    out = subprocess.run([sys.executable, "-m", "rccs", "version"], cwd=REPO, env=env, capture_output=True,
                         text=True, timeout=30, check=False)
    if out.returncode != 0:
        raise BenchmarkError(f"`python -m rccs version` failed:\n{out.stderr.strip()}")
    return out.stdout.strip().rsplit("fastpath: ", 1)[-1].rstrip(")")


def schedule(scenarios: list[Scenario], rounds: int) -> list[tuple[int, Scenario]]:
    """B R1 B R2 B R3 ... B: every rccs run sits between two baseline runs; the order rotates each round."""
    sequence: list[tuple[int, Scenario]] = []
    for round_no in range(rounds):
        shift = round_no % len(scenarios)
        for scenario in scenarios[shift:] + scenarios[:shift]:
            sequence += [(round_no, BASELINE), (round_no, scenario)]
    sequence.append((rounds - 1, BASELINE))
    return sequence


def spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def summarize(runs: list[dict[str, Any]], scenarios: list[Scenario]) -> dict[str, Any]:
    for i, run in enumerate(runs):
        if run["scenario"] == BASELINE.name:
            continue
        neighbours = [runs[j] for j in (i - 1, i + 1) if 0 <= j < len(runs) and runs[j]["scenario"] == "baseline"]
        base_cpu = statistics.fmean(n["server_cpu_us_per_msg"] for n in neighbours)
        base_rate = statistics.fmean(n["msgs_per_s"] for n in neighbours)
        run["cpu_per_msg_vs_baseline"] = run["server_cpu_us_per_msg"] / base_cpu
        run["msgs_per_s_vs_baseline"] = run["msgs_per_s"] / base_rate
    summary: dict[str, Any] = {}
    for scenario in [BASELINE, *scenarios]:
        mine = [r for r in runs if r["scenario"] == scenario.name]
        entry: dict[str, Any] = {
            "description": scenario.description,
            "runs": len(mine),
            "msgs_per_s": statistics.median(r["msgs_per_s"] for r in mine),
            "latency_us": {q: statistics.median(r["latency_us"][q] for r in mine) for q in ("p50", "p99", "p999")},
            "server_cpu_us_per_msg": statistics.median(r["server_cpu_us_per_msg"] for r in mine),
            "server_user_us_per_msg": statistics.median(r["server_user_us_per_msg"] for r in mine),
            "server_sys_us_per_msg": statistics.median(r["server_sys_us_per_msg"] for r in mine),
            "server_cpu_util": statistics.median(r["server_cpu_util"] for r in mine),
            "generator_cpu_util": statistics.median(r["generator_cpu_util"] for r in mine),
        }
        if scenario is not BASELINE:
            entry["cpu_per_msg_vs_baseline"] = spread([r["cpu_per_msg_vs_baseline"] for r in mine])
            entry["msgs_per_s_vs_baseline"] = spread([r["msgs_per_s_vs_baseline"] for r in mine])
        if scenario.ack:
            entry["delivered_latency_us_p50"] = statistics.median(r["delivered_latency_us_p50"] for r in mine)
        summary[scenario.name] = entry
    return summary


def table(summary: dict[str, Any]) -> str:
    header = (f"{'scenario':<11}{'msgs/s':>9}{'p50 us':>9}{'p99 us':>9}{'p99.9 us':>10}{'srv us/msg':>11}"
              f"{'usr+sys':>12}"
              f"{'srv CPU':>9}{'gen CPU':>9}   {'CPU/msg vs baseline':<22}{'msgs/s vs base':<18}")
    lines = [header, "-" * len(header)]
    for name, s in summary.items():
        ratio = rate = ""
        if "cpu_per_msg_vs_baseline" in s:
            c, m = s["cpu_per_msg_vs_baseline"], s["msgs_per_s_vs_baseline"]
            ratio = f"{c['median']:.2f}x ({c['min']:.2f}-{c['max']:.2f})"
            rate = f"{m['median']:.2f} ({m['min']:.2f}-{m['max']:.2f})"
        lat = s["latency_us"]
        lines.append(
            f"{name:<11}{s['msgs_per_s']:>9.0f}{lat['p50']:>9.0f}{lat['p99']:>9.0f}{lat['p999']:>10.0f}"
            f"{s['server_cpu_us_per_msg']:>11.2f}"
            f"{s['server_user_us_per_msg']:>7.2f}+{s['server_sys_us_per_msg']:<4.1f}"
            f"{s['server_cpu_util']:>8.0%} {s['generator_cpu_util']:>8.0%}"
            f"   {ratio:<22}{rate:<18}"
        )
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=50, help="device pairs (default 50)")
    parser.add_argument("--inflight", type=int, default=4, help="messages in flight per pair (default 4)")
    parser.add_argument("--seconds", type=float, help="measured window per run (default 5, --quick 2)")
    parser.add_argument("--warmup", type=float, help="traffic before the window (default 1, --quick 0.5)")
    parser.add_argument("--rounds", type=int, help="rounds over all scenarios (default 5, --quick 2)")
    parser.add_argument("--quick", action="store_true", help="short windows and 2 rounds, for a smoke test")
    parser.add_argument("--generators", type=int, default=1, help="load generator processes (default 1)")
    parser.add_argument("--retries", type=int, default=1, help="retries of a failed run before giving up (default 1)")
    parser.add_argument("--scenarios", default=",".join(s.name for s in RCCS_SCENARIOS),
                        help="comma-separated rccs scenarios to run besides the baseline")
    parser.add_argument("--out", default=str(HERE / "results.json"), help="JSON results (default %(default)s)")
    args = parser.parse_args(argv)
    args.seconds = args.seconds if args.seconds is not None else (2.0 if args.quick else 5.0)
    args.warmup = args.warmup if args.warmup is not None else (0.5 if args.quick else 1.0)
    args.rounds = args.rounds if args.rounds is not None else (2 if args.quick else 5)
    known = {s.name: s for s in RCCS_SCENARIOS}
    names = [n.strip() for n in args.scenarios.split(",") if n.strip()]
    if not names or any(n not in known for n in names):
        parser.error(f"--scenarios: choose from {', '.join(known)}")
    args.scenario_list = [known[n] for n in names]
    if args.pairs < args.generators or args.inflight < 1 or args.rounds < 1 or args.seconds <= 0 or args.warmup < 0:
        parser.error("need --pairs >= --generators, --inflight >= 1, --rounds >= 1, --seconds > 0, --warmup >= 0")
    return args


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    fastpath = {"rccs": fastpath_in_use(False), "rccs-pure": fastpath_in_use(True)}
    if fastpath["rccs"] != "cython":
        print(f"warning: the compiled fast path is not in use (rccs reports {fastpath['rccs']!r}); "
              "the 'rccs' scenario measures pure Python", file=sys.stderr)
    sequence = schedule(args.scenario_list, args.rounds)
    print(f"{len(sequence)} runs of {args.warmup:g}+{args.seconds:g} s, {args.pairs} pairs x {args.inflight} "
          f"in flight, {args.generators} generator process(es), fast path: {fastpath['rccs']}", flush=True)
    runs: list[dict[str, Any]] = []
    failures: list[dict[str, Any]] = []
    for index, (round_no, scenario) in enumerate(sequence, 1):
        for attempt in range(args.retries + 1):
            try:
                run = await measure(scenario, args)
                break
            except BenchmarkError as exc:
                # On a shared machine a run can die of causes outside the benchmark (OOM killer, a stray
                # kill); one retry keeps the schedule, and the failure stays in the results.
                failures.append({"index": index, "scenario": scenario.name, "error": str(exc)})
                if attempt == args.retries:
                    raise
                print(f"[{index:>2}/{len(sequence)}] {scenario.name} failed, retrying: {exc}", flush=True)
        run["round"] = round_no
        runs.append(run)
        lat = run["latency_us"]
        print(f"[{index:>2}/{len(sequence)}] round {round_no} {scenario.name:<10} {run['msgs_per_s']:>8.0f} msgs/s  "
              f"p50 {lat['p50']:>6.0f} us  p99 {lat['p99']:>6.0f} us  srv {run['server_cpu_us_per_msg']:6.2f} us/msg "
              f"(srv CPU {run['server_cpu_util']:.0%}, gen CPU {run['generator_cpu_util']:.0%})", flush=True)
    return {
        "config": {k: getattr(args, k) for k in ("pairs", "inflight", "seconds", "warmup", "rounds", "generators")},
        "environment": {"cpus": os.cpu_count(), "python": platform.python_version(), "fastpath": fastpath,
                        "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")},
        "order": [s.name for _, s in sequence],
        "runs": runs,
        "failures": failures,
        "summary": summarize(runs, args.scenario_list),
    }


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
        results = asyncio.run(main_guarded(args))
    except BenchmarkError as exc:
        print(f"run.py: error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("run.py: interrupted", file=sys.stderr)
        return 130
    print()
    print(table(results["summary"]))
    ack = results["summary"].get("rccs-ack")
    if ack:
        print(f"\nrccs-ack: send -> delivered receipt, median p50 {ack['delivered_latency_us_p50']:.0f} us")
    Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    print(f"results written to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
