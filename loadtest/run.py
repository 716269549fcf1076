#!/usr/bin/env python3
"""Run the rccs Locust load test against a fresh local rccs server, then stop everything.

    python loadtest/run.py --smoke     # 20 users = 40 devices, 10 s (CI)
    python loadtest/run.py             # 600 users = 1,200 devices, 60 s

Starts ``python -m rccs serve`` from this checkout (PYTHONPATH = repo root) on
free 127.0.0.1 ports with a random token secret and a temporary data dir, waits
for ``/readyz``, runs ``locust --headless`` (found next to ``sys.executable``),
stops the server and exits with Locust's exit code (1 when a check in the
locustfile fails). Arguments after ``--`` go to Locust, e.g.
``-- --wait-min 1 --wait-max 3``. Nothing is left running, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import importlib.util
import os
import re
import secrets
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO_ROOT = HERE.parent
if str(REPO_ROOT) not in sys.path:  # run as a script from a checkout: use this tree's rccs
    sys.path.insert(0, str(REPO_ROOT))
from rccs.testing import free_ports  # noqa: E402

LOCUSTFILE = HERE / "locustfile.py"
PROFILES = {
    "smoke": {"users": 20, "spawn_rate": 20.0, "duration": 10},
    "full": {"users": 600, "spawn_rate": 100.0, "duration": 60},
}
STOP_TIMEOUT = 5  # seconds Locust gives running round trips to finish at the end
SERVER_START_TIMEOUT = 20.0
SERVER_STOP_TIMEOUT = 15.0


_LIBC: Any = None
if sys.platform.startswith("linux"):
    with contextlib.suppress(OSError):
        _LIBC = ctypes.CDLL(None, use_errno=True)


class Interrupted(Exception):
    """SIGTERM/SIGHUP, handled like Ctrl-C."""


def _interrupt(signum: int, _frame: Any) -> None:
    raise Interrupted(signal.Signals(signum).name)


def _die_with_parent() -> None:
    """In the child, before exec: get SIGTERM if this runner dies (Linux), so a killed runner leaves nothing behind."""
    if _LIBC is not None:
        _LIBC.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn(argv: list[str], env: dict[str, str], cwd: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    # Own session: a terminal's Ctrl-C reaches only this runner, which then stops the children in order.
    return subprocess.Popen(argv, env=env, cwd=cwd, stdin=subprocess.DEVNULL, start_new_session=True,
                            preexec_fn=_die_with_parent, **kwargs)


def _reap(proc: subprocess.Popen[bytes], timeout: float) -> Any:
    """Wait up to ``timeout`` s for ``proc``; its resource usage once it has exited, else None."""
    if proc.returncode is not None:
        return getattr(proc, "rusage", None)
    if not hasattr(os, "wait4"):
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout)
        return None
    deadline = time.monotonic() + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            proc.returncode = os.waitstatus_to_exitcode(status)
            proc.rusage = usage  # type: ignore[attr-defined]
            return usage
        if time.monotonic() >= deadline:
            return None
        time.sleep(0.05)


def _stop(proc: subprocess.Popen[bytes] | None, sig: int, name: str, timeout: float) -> Any:
    """Signal ``proc`` (its whole session) with ``sig``, then SIGKILL after ``timeout`` s; return its rusage."""
    if proc is None:
        return None
    if proc.returncode is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        usage = _reap(proc, timeout)
        if proc.returncode is None:
            print(f"loadtest: {name} did not stop within {timeout:g} s, killing it", file=sys.stderr)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            usage = _reap(proc, 5.0)
        return usage
    return _reap(proc, 0)  # already exited and reaped: never signal a pid that may have been reused


_NO_PROXY = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # 127.0.0.1 only, never via a proxy


def _http_get(url: str, timeout: float = 2.0) -> str | None:
    try:
        with _NO_PROXY.open(url, timeout=timeout) as response:
            return str(response.read().decode())
    except OSError:
        return None


def _server_devices(http_base: str) -> tuple[int | None, str]:
    """Authenticated connections (sum of ``rccs_connections``) and the fast-path implementation, from /metrics."""
    text = _http_get(http_base + "/metrics")
    if text is None:
        return None, "?"
    devices = sum(float(v) for v in re.findall(r"^rccs_connections\{[^}]*\} ([0-9.e+]+)$", text, re.M))
    impl = re.search(r'^rccs_info\{[^}]*implementation="([^"]*)"', text, re.M)
    return int(devices), impl.group(1) if impl else "?"


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def _cpu(usage: Any) -> float | None:
    return None if usage is None else float(usage.ru_utime + usage.ru_stime)


def _check_requirements(server_python: str, env: dict[str, str]) -> str | None:
    exe = Path(sys.executable).parent / ("locust.exe" if os.name == "nt" else "locust")
    install = f"install it with: {sys.executable} -m pip install -r {HERE / 'requirements.txt'}"
    if not exe.is_file():
        return f"locust is not installed next to {sys.executable} (no {exe}); {install}"
    missing = [mod for mod in ("websocket", "msgpack", "jwt") if importlib.util.find_spec(mod) is None]
    if missing:
        return f"python modules missing for the locustfile: {', '.join(missing)}; {install}"
    check = subprocess.run([server_python, "-c", "import uvloop, picows, msgpack, prometheus_client, jwt, rccs.node"],
                           env=env, cwd=REPO_ROOT, capture_output=True, text=True, check=False)
    if check.returncode != 0:
        last = (check.stderr.strip().splitlines() or ["?"])[-1]
        return (f"{server_python} cannot run the rccs server ({last}); install rccs' dependencies there "
                f"or pick another interpreter with --server-python")
    return None


def _start_server(server_python: str, env: dict[str, str], workdir: Path, max_connections: int
                  ) -> tuple[subprocess.Popen[bytes], int, str, Path]:
    """Start the server on free ports (a few tries: a free port can be taken before the server binds it)."""
    for attempt in range(1, 4):
        ws_port, http_port = free_ports(2)
        log_path = workdir / f"server-{attempt}.log"
        argv = [server_python, "-m", "rccs", "serve", "--host", "127.0.0.1", "--port", str(ws_port),
                "--http-host", "127.0.0.1", "--http-port", str(http_port), "--data-dir", str(workdir / "data"),
                "--max-connections", str(max_connections), "--log-level", "WARNING"]
        with log_path.open("wb") as log:
            server = _spawn(argv, env, REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
        http_base = f"http://127.0.0.1:{http_port}"
        deadline = time.monotonic() + SERVER_START_TIMEOUT
        while time.monotonic() < deadline:
            _reap(server, 0)
            if server.returncode is not None:
                break
            if _http_get(http_base + "/readyz", timeout=0.5) == "ready\n":
                return server, ws_port, http_base, log_path
            time.sleep(0.1)
        _stop(server, signal.SIGKILL, "server", 5.0)
        print(f"loadtest: server did not become ready (attempt {attempt}, exit code {server.returncode}):\n"
              f"{_tail(log_path)}", file=sys.stderr)
    raise RuntimeError("the rccs server did not start")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    extra: list[str] = []
    if "--" in argv:
        at = argv.index("--")
        argv, extra = argv[:at], argv[at + 1:]
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     epilog="Arguments after -- are passed to locust.")
    parser.add_argument("--smoke", action="store_true", help="short run for CI: 20 users = 40 devices, 10 s")
    parser.add_argument("--users", type=int, help="Locust users, 2 devices each (full: 600, smoke: 20)")
    parser.add_argument("--spawn-rate", type=float, help="users started per second (full: 100, smoke: 20)")
    parser.add_argument("--duration", type=int, help="run time in seconds (full: 60, smoke: 10)")
    parser.add_argument("--min-devices", type=int,
                        help="devices that must be online at once for a pass (default: 2 x users)")
    parser.add_argument("--server-python", default=sys.executable,
                        help="interpreter for the server, with rccs' dependencies (default: this one)")
    args = parser.parse_args(argv)
    profile = PROFILES["smoke" if args.smoke else "full"]
    users = args.users if args.users is not None else int(profile["users"])
    spawn_rate = args.spawn_rate if args.spawn_rate is not None else float(profile["spawn_rate"])
    duration = args.duration if args.duration is not None else int(profile["duration"])
    min_devices = args.min_devices if args.min_devices is not None else 2 * users
    if users < 1 or spawn_rate <= 0 or duration < 1:
        parser.error("--users, --spawn-rate and --duration must be positive")

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO_ROOT), env.get("PYTHONPATH", "")) if p)
    env["RCCS_TOKEN_SECRET"] = secrets.token_hex(32)
    problem = _check_requirements(args.server_python, env)
    if problem:
        print(f"loadtest: {problem}", file=sys.stderr)
        return 2

    for signum in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(signum, _interrupt)
    server = locust = None
    locust_usage = server_usage = None
    code = 1
    started = time.monotonic()
    peak_devices = 0
    impl = "?"
    locust_wall = 0.0
    locust_started: float | None = None
    with tempfile.TemporaryDirectory(prefix="rccs-loadtest-") as tmp:
        workdir = Path(tmp)
        log_path = workdir / "server.log"
        try:
            server, ws_port, http_base, log_path = _start_server(args.server_python, env, workdir,
                                                                 max(4 * users + 100, 1000))
            command = [str(Path(sys.executable).parent / "locust"), "-f", str(LOCUSTFILE), "--headless",
                       "-u", str(users), "-r", f"{spawn_rate:g}", "-t", f"{duration}s",
                       "--host", f"ws://127.0.0.1:{ws_port}", "--only-summary", "--stop-timeout", str(STOP_TIMEOUT),
                       "--exit-code-on-error", "1", "--min-devices", str(min_devices), *extra]
            print(f"loadtest: server ws://127.0.0.1:{ws_port}/v1 ({http_base}); {users} users = {2 * users} devices, "
                  f"spawn {spawn_rate:g}/s, {duration} s", flush=True)
            print("loadtest: " + " ".join(command), flush=True)
            # cwd = scratch dir: no stray locust.conf / pyproject.toml [tool.locust] changes the run
            locust = _spawn(command, env, workdir)
            locust_started = time.monotonic()
            deadline = time.monotonic() + duration + users / spawn_rate + STOP_TIMEOUT + 60
            next_poll = 0.0
            while True:
                locust_usage = _reap(locust, 0.5)
                if locust.returncode is not None:
                    break
                if time.monotonic() >= next_poll:  # cheap server-side view of the devices held
                    next_poll = time.monotonic() + 1.0
                    devices, impl = _server_devices(http_base)
                    peak_devices = max(peak_devices, devices or 0)
                if time.monotonic() > deadline:
                    print("loadtest: locust overran its time limit, stopping it", file=sys.stderr)
                    locust_usage = _stop(locust, signal.SIGTERM, "locust", 15.0)
                    break
                _reap(server, 0)
                if server.returncode is not None:
                    print(f"loadtest: the server exited during the run (code {server.returncode})", file=sys.stderr)
                    locust_usage = _stop(locust, signal.SIGTERM, "locust", 15.0)
                    break
            code = locust.returncode if locust.returncode is not None else 1
            if server.returncode is not None:
                code = code or 1
        except (KeyboardInterrupt, Interrupted) as exc:
            print(f"loadtest: interrupted ({str(exc) or 'SIGINT'}), stopping", file=sys.stderr)
            code = 130
        except RuntimeError as exc:
            print(f"loadtest: {exc}", file=sys.stderr)
            code = 1
        finally:
            with contextlib.suppress(KeyboardInterrupt, Interrupted):
                signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not skip the cleanup
                for signum in (signal.SIGTERM, signal.SIGHUP):
                    signal.signal(signum, signal.SIG_IGN)
                locust_usage = _stop(locust, signal.SIGTERM, "locust", 15.0) or locust_usage
                if locust_started is not None:
                    locust_wall = time.monotonic() - locust_started
                server_usage = _stop(server, signal.SIGINT, "server", SERVER_STOP_TIMEOUT)
                if server is not None and server.returncode not in (0, -signal.SIGINT):
                    print(f"loadtest: server exit code {server.returncode}; its log:\n{_tail(log_path)}",
                          file=sys.stderr)
                    code = code or 1
                elif code != 0 and log_path.exists() and _tail(log_path):
                    print(f"loadtest: server log (tail):\n{_tail(log_path)}", file=sys.stderr)
                signal.signal(signal.SIGINT, signal.default_int_handler)
    wall = time.monotonic() - started
    parts = [f"exit code {code}", f"wall {wall:.1f} s (locust {locust_wall:.1f} s)",
             f"server peak devices (from /metrics) {peak_devices}", f"fastpath {impl}"]
    for name, usage in (("locust", locust_usage), ("server", server_usage)):
        cpu = _cpu(usage)
        if cpu is not None and locust_wall > 0:
            parts.append(f"{name} CPU {cpu:.1f} s ({100 * cpu / locust_wall:.0f}% of one core over the locust run)")
    print("loadtest: " + "; ".join(parts), flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
