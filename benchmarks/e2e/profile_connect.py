"""Where a connect goes: py-spy on the server of ``scale.py connect``, samples split by what a hello does.

    python benchmarks/e2e/profile_connect.py --users 3800          # 5 devices per user
    python benchmarks/e2e/profile_connect.py --users 100           # 190 devices per user
    python benchmarks/e2e/profile_connect.py --raw prof.txt        # split an earlier recording again

Runs one round of ``scale.py connect`` (19,000 idle devices by default), attaches ``py-spy record --native``
to its server once the first connections are open and prints the share of the samples of each step of a
hello (accept, WebSocket handshake, token check, registry, session open, store round trips, inbox read,
presence, writing, garbage collection). Samples of the store's worker thread waiting for work, and of any
thread waiting for the GIL, are counted apart: they are not CPU. py-spy is not a dependency of the project:
``pip install --target /tmp/pyspy py-spy`` and pass ``--py-spy /tmp/pyspy/bin/py-spy``.
"""

from __future__ import annotations

import argparse
import collections
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent

# (step, markers): a sample belongs to the first step with a marker in its stack (outermost frame first:
# a frame deeper in the stack decides only when no earlier step matched).
STEPS: list[tuple[str, tuple[str, ...]]] = [
    ("waiting (store thread idle, GIL waits)", ("_queue_SimpleQueue_get", "take_gil", "pthread_cond_timedwait")),
    ("store thread: SQLite work", ("Thread._bootstrap",)),
    ("garbage collection", ("gc_collect_main",)),
    ("token check (JWT)", ("TokenAuthority.verify",)),
    ("credential check, registry (rest of authenticate)", ("Login.authenticate",)),
    ("store round trips on the loop (hops, futures)", ("SqliteStore.", "run_in_executor", "_copy_future_state",
                                                        "_call_set_state", "Future._invoke_callbacks")),
    ("registry writes (put_device, add_user tasks)", ("Router._put_device", "Router._add_user_if_missing",
                                                       "Router._write_registry")),
    ("inbox and kept receipts read (on_online)", ("Deliveries.on_online", "Deliveries._welcome_reads")),
    ("presence (encode, queue frames)", ("Router.set_presence", "write_to_user", "send_shared")),
    ("session open (rest)", ("Session.open",)),
    ("hello dispatch (rest)", ("Session.on_frame", "ServerConnection_on_ws_frame")),
    ("WebSocket handshake", ("negotiate",)),
    ("writing frames (writev)", ("writelines", "ServerConnection_flush")),
    ("accept, connection setup", ("accept", "connection_made", "_on_listen")),
    ("event loop, other", ()),
]


def split(path: Path) -> tuple[int, collections.Counter[str]]:
    total = 0
    shares: collections.Counter[str] = collections.Counter()
    with path.open() as raw:
        for line in raw:
            stack, _, count = line.rstrip().rpartition(" ")
            if not stack:
                continue
            samples = int(count)
            total += samples
            for step, markers in STEPS:
                if not markers or any(marker in stack for marker in markers):
                    shares[step] += samples
                    break
    return total, shares


def report(path: Path) -> None:
    total, shares = split(path)
    busy = total - shares[STEPS[0][0]]
    print(f"{total} samples, {busy} not waiting")
    print(f"{'step':52} {'of all':>7} {'of busy':>8}")
    for step, _ in STEPS:
        share_of_busy = "" if step == STEPS[0][0] else f"{100 * shares[step] / max(busy, 1):7.1f}%"
        print(f"{step:52} {100 * shares[step] / max(total, 1):6.1f}% {share_of_busy:>8}")


def server_of(parent: int) -> int | None:
    found = subprocess.run(["pgrep", "-P", str(parent), "-f", "rccs serve"], capture_output=True, text=True)
    pids = found.stdout.split()
    return int(pids[0]) if pids else None


def open_fds(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/fd"))
    except OSError:
        return 0


def record(args: argparse.Namespace, out: Path) -> None:
    with tempfile.TemporaryDirectory(prefix="rccs-profile-connect-") as tmp:
        scale = subprocess.Popen(
            [sys.executable, str(HERE / "scale.py"), "connect", "--connect-rounds", "1", "--generator-rounds", "0",
             "--connect-per-user", str(max(1, args.devices // args.users)), "--devices", str(args.devices),
             "--out", str(Path(tmp) / "scale.json"), "--plot", ""])
        try:
            deadline = time.monotonic() + 60
            server = None
            while server is None or open_fds(server) < 300:  # the connect storm has begun
                if time.monotonic() > deadline or scale.poll() is not None:
                    raise SystemExit("the connect benchmark ended or did not start its server in time")
                server = server or server_of(scale.pid)
                time.sleep(0.05)
            subprocess.run([args.py_spy, "record", "--pid", str(server), "--duration", str(args.seconds),
                            "--rate", "200", "--native", "--format", "raw", "-o", str(out)], check=True)
            scale.wait(timeout=600)
        finally:
            if scale.poll() is None:
                scale.terminate()
                scale.wait(timeout=30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=3800, help="users of the 19,000 devices (default 3800)")
    parser.add_argument("--devices", type=int, default=19000)
    parser.add_argument("--seconds", type=int, default=10, help="how long to sample (default 10)")
    parser.add_argument("--py-spy", default="py-spy", help="the py-spy executable")
    parser.add_argument("--out", type=Path, default=Path("profile-connect.txt"), help="raw py-spy samples")
    parser.add_argument("--raw", type=Path, help="split this recording instead of making one")
    args = parser.parse_args()
    if args.raw is None:
        record(args, args.out)
    report(args.raw or args.out)


if __name__ == "__main__":
    main()
