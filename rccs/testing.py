"""Run a real rccs server on port 0 inside the current event loop, for tests and examples.

    async with running_server() as server:
        token = server.issue_token("alice", "alice-phone")
        async with Client(server.ws_url, token, {"type": "mobile"}) as phone:
            ...

After the block the server is stopped; ``server.hub`` stays readable so a
test can check that no connection or routing entry was left behind.

A test that kills or restarts the server runs ``rccs serve`` as a child process instead:

    server = ServerProcess(data_dir)
    await server.start()
    ...
    server.kill()

Tests of the Redis engines start a throw-away ``redis-server`` the same way (``RedisServer``).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from types import ModuleType
from typing import IO, Any

from ._fastpath import IMPLEMENTATION
from .config import Settings
from .node import Node


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Ports the kernel picks as free; all sockets stay bound until every port is chosen, so they differ.

    For starting ``rccs serve`` as a separate process (benchmarks, load tests, ``ServerProcess``); in-process
    servers use port 0. The ports are free when chosen, not reserved: another process may take one before the
    child binds it, so a caller must be ready to try again on new ports (``ServerProcess.start`` does).
    """
    sockets = []
    try:
        for _ in range(count):
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind((host, 0))
            sockets.append(sock)
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


def child_environment(**settings: str) -> dict[str, str]:
    """The environment for an ``rccs`` child process: this one's without its ``RCCS_`` settings, so that the
    child gets exactly the ``settings`` given here, but with ``RCCS_PUREPYTHON``, so that it runs the fast
    path this process runs."""
    env = {name: value for name, value in os.environ.items() if not name.startswith("RCCS_")}
    if "RCCS_PUREPYTHON" in os.environ:
        env["RCCS_PUREPYTHON"] = os.environ["RCCS_PUREPYTHON"]
    env.update(settings)
    return env


# The line ``rccs serve`` logs once both of its ports listen (README), as text or inside a JSON line.
STARTUP_LINE = re.compile(r"fastpath=(?P<implementation>\w+) listening on (?P<ws_url>wss?://[^\s,]+), "
                          r"http on (?P<http_url>https?://[^\s,\"]+)")
PORT_ATTEMPTS = 5


class _Startup:
    """Set once the child logged its startup line, or closed its output (it exited)."""

    def __init__(self) -> None:
        self.done = threading.Event()
        self.line: re.Match[str] | None = None


def _copy_output(stream: IO[bytes], log_path: Path, startup: _Startup) -> None:
    try:
        with stream, open(log_path, "wb") as log:
            for raw in stream:
                log.write(raw)
                log.flush()
                if startup.line is None:
                    startup.line = STARTUP_LINE.search(raw.decode("utf-8", "replace"))
                    if startup.line is not None:
                        startup.done.set()
    finally:
        startup.done.set()


class ServerProcess:
    """``rccs serve`` as a child process on a data directory, for tests that stop, kill and restart it.

    ``start()`` has the child listen on ports from ``choose_ports`` (``free_ports`` by default). ``free_ports``
    closes its sockets before the child binds them, so another process may take one in between: the child then
    fails with "address already in use" and ``start()`` tries again on new ports. Only the child's own startup
    line (logged at INFO) counts as started, not a readiness probe, which whoever took the port could answer.
    That line names the fast path the child runs; ``start()`` fails unless it is the one this process runs.

    Each process's output (stdout and stderr) goes to ``<log_dir>/server-<n>.log``, ``n`` counting every
    process started, retries included; ``log_dir`` is the data directory's parent unless given.
    ``command`` is how ``rccs`` is run: this interpreter's ``-m rccs`` unless given (e.g. the ``rccs`` script
    of another installation).
    """

    def __init__(self, data_dir: str | os.PathLike[str], *serve_args: str, env: dict[str, str] | None = None,
                 log_dir: str | os.PathLike[str] | None = None,
                 choose_ports: Callable[[], Sequence[int]] = lambda: free_ports(2),
                 command: Sequence[str] = (sys.executable, "-m", "rccs")):
        self.command = list(command)
        self.data_dir = Path(data_dir)
        self.serve_args = serve_args
        self.env = child_environment() if env is None else env
        self.log_dir = self.data_dir.parent if log_dir is None else Path(log_dir)
        self.choose_ports = choose_ports
        self.proc: subprocess.Popen[bytes] | None = None
        self.processes = 0
        self.ws_url = ""
        self.http_url = ""
        self.implementation = ""
        self._output: threading.Thread | None = None

    @property
    def log_path(self) -> Path:
        """The output of the latest process."""
        return self.log_dir / f"server-{self.processes}.log"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self, timeout: float = 20.0) -> None:
        """Start ``rccs serve`` and return once it listens on both ports; ``timeout`` seconds per attempt."""
        if self.running():
            raise RuntimeError("the server is already running")
        for _attempt in range(PORT_ATTEMPTS):
            port, http_port = self.choose_ports()
            startup = self._spawn(port, http_port)
            if not await asyncio.to_thread(startup.done.wait, timeout):
                self.kill()
                raise AssertionError(f"rccs serve did not start within {timeout} s:\n{self.logs()}")
            if startup.line is not None:
                self.ws_url, self.http_url = startup.line["ws_url"], startup.line["http_url"]
                self.implementation = startup.line["implementation"]
                if self.implementation != IMPLEMENTATION:
                    self.kill()
                    raise AssertionError(f"rccs serve runs the {self.implementation} fast path, this process the "
                                         f"{IMPLEMENTATION} one (is RCCS_PUREPYTHON passed on?)")
                return
            returncode = await asyncio.to_thread(self.wait, timeout)  # its output ended: it exited
            if "address already in use" not in self.log_path.read_text(errors="replace").lower():
                raise AssertionError(f"rccs serve exited with {returncode}:\n{self.logs()}")
        raise AssertionError(f"rccs serve found no free ports in {PORT_ATTEMPTS} attempts:\n{self.logs()}")

    def _spawn(self, port: int, http_port: int) -> _Startup:
        self.processes += 1
        self.proc = subprocess.Popen(
            [*self.command, "serve", "--port", str(port), "--http-port", str(http_port),
             "--data-dir", str(self.data_dir), *self.serve_args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=self.env,
        )
        assert self.proc.stdout is not None
        startup = _Startup()
        self._output = threading.Thread(target=_copy_output, args=(self.proc.stdout, self.log_path, startup),
                                        name=f"rccs serve output {self.processes}", daemon=True)
        self._output.start()
        return startup

    def send_signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def wait(self, timeout: float) -> int:
        """Wait until the process exits and its output is in the log; its exit code."""
        assert self.proc is not None
        returncode = self.proc.wait(timeout)
        if self._output is not None:
            self._output.join(timeout)
        return returncode

    def kill(self) -> None:
        """SIGKILL (kill -9), and reap it."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.wait(10)

    def logs(self, tail: int = 4000) -> str:
        """The last ``tail`` characters of every process's output."""
        parts = []
        for n in range(1, self.processes + 1):
            path = self.log_dir / f"server-{n}.log"
            if path.exists():
                parts.append(f"--- server process {n} ---\n" + path.read_text(errors="replace")[-tail:])
        return "\n".join(parts)


class RedisServer:
    """A throw-away ``redis-server`` (6.2 or newer, from PATH) on a free port, its files in ``directory``.

    ``start()`` returns once it accepts connections (its own log line says so); a port taken between
    ``free_ports`` and the bind costs another attempt on a new port, as for ``ServerProcess``. Persistence is
    the one production uses for rccs (append-only file, fsync on every write) unless told otherwise, so that
    a test can SIGKILL it and start it again on the same directory and port.
    """

    def __init__(self, directory: str | os.PathLike[str], *extra_config: str):
        self.directory = Path(directory)
        self.extra_config = extra_config
        self.port = 0
        self.proc: subprocess.Popen[bytes] | None = None
        self.processes = 0

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def log_path(self) -> Path:
        return self.directory / f"redis-{self.processes}.log"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    async def start(self, timeout: float = 20.0, port: int | None = None) -> str:
        """Start it (on ``port``, e.g. the one it had before a kill, else a free one); its URL."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH: install it (Debian: apt-get install redis-server; "
                               "`make test` does this when it is missing)")
        self.directory.mkdir(parents=True, exist_ok=True)
        for _attempt in range(PORT_ATTEMPTS):
            self.port = port if port is not None else free_ports(1)[0]
            self.processes += 1
            self.proc = subprocess.Popen(
                [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                 "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--logfile", "",
                 "--maxmemory-policy", "noeviction", *self.extra_config],
                stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
            assert self.proc.stdout is not None
            ready = threading.Event()
            threading.Thread(target=_copy_redis_output, args=(self.proc.stdout, self.log_path, ready),
                             name=f"redis-server output {self.processes}", daemon=True).start()
            if not await asyncio.to_thread(ready.wait, timeout):
                self.kill()
                raise AssertionError(f"redis-server did not start within {timeout} s:\n{self.logs()}")
            if self.running():
                return self.url
            if "address already in use" not in self.logs().lower() or port is not None:
                raise AssertionError(f"redis-server exited:\n{self.logs()}")
        raise AssertionError(f"redis-server found no free port in {PORT_ATTEMPTS} attempts:\n{self.logs()}")

    def kill(self) -> None:
        """SIGKILL: what a crash does."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
        if self.proc is not None:
            self.proc.wait(10)

    def stop(self) -> None:
        """SIGTERM: a clean shutdown."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
        if self.proc is not None:
            self.proc.wait(10)

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path.exists() else ""


def _copy_redis_output(stream: IO[bytes], path: Path, ready: threading.Event) -> None:
    with path.open("wb") as log:
        for line in stream:
            log.write(line)
            log.flush()
            if b"Ready to accept connections" in line:
                ready.set()
    ready.set()  # it exited


class RunningServer:
    def __init__(self, node: Node):
        self.node = node
        self.hub = node.hub

    @property
    def ws_url(self) -> str:
        return self.node.ws_url

    @property
    def http_url(self) -> str:
        return self.node.http_url

    def issue_token(self, user: str, device: str, ttl_seconds: float = 3600) -> str:
        return self.node.tokens.issue(user, device, ttl_seconds)


@contextlib.asynccontextmanager
async def running_server(listener: ModuleType | None = None, **overrides: Any) -> AsyncIterator[RunningServer]:
    """Start a server on free ports with a throw-away data dir; settings may be overridden.

    ``listener``: the listener module to serve with (default: the fast path's choice)."""
    with tempfile.TemporaryDirectory(prefix="rccs-test-") as data_dir:
        # RCCS_STORE=memory runs the suite's servers on the in-memory store instead of SQLite.
        settings = Settings(port=0, http_port=0, data_dir=data_dir, store=os.environ.get("RCCS_STORE", "sqlite"))
        settings = settings.replace(**overrides)
        node = Node(settings, listener)
        await node.start()
        try:
            yield RunningServer(node)
        finally:
            await node.stop()
