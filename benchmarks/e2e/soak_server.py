"""``rccs`` with allocations traced, for ``soak.py --tracemalloc``: ``soak_server.py DIR serve ...``.

On SIGUSR1 it writes ``DIR/<n>.json``: the traced bytes, the live allocations per site (file:line of the
innermost frame, or of the ``SOAK_TRACEMALLOC_FRAMES`` innermost ones) and the live objects per type
(``gc.get_objects()``, sizes by ``sys.getsizeof``). The snapshot is taken on the event loop's thread, between
two callbacks (the handler only schedules it).
"""

from __future__ import annotations

import collections
import gc
import json
import os
import signal
import sys
import tracemalloc
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))


def snapshot(directory: Path, counter: list[int]) -> None:
    counter[0] += 1
    snap = tracemalloc.take_snapshot().filter_traces([tracemalloc.Filter(False, tracemalloc.__file__)])
    sites: dict[str, list[int]] = {}
    for stat in snap.statistics("traceback" if tracemalloc.get_traceback_limit() > 1 else "lineno"):
        where = " < ".join(f"{frame.filename.rsplit('/', 2)[-1]}:{frame.lineno}" for frame in stat.traceback)
        sites[where] = [stat.size, stat.count]
    types: dict[str, list[int]] = collections.defaultdict(lambda: [0, 0])
    for obj in gc.get_objects():
        entry = types[type(obj).__qualname__]
        entry[0] += sys.getsizeof(obj)
        entry[1] += 1
    data: dict[str, Any] = {"traced": tracemalloc.get_traced_memory()[0], "sites": sites, "types": dict(types)}
    directory.mkdir(parents=True, exist_ok=True)
    tmp = directory / f"{counter[0]}.json.tmp"
    tmp.write_text(json.dumps(data))
    tmp.rename(directory / f"{counter[0]}.json")


def main() -> None:
    directory = Path(sys.argv[1])
    sys.argv = ["rccs", *sys.argv[2:]]
    tracemalloc.start(int(os.environ.get("SOAK_TRACEMALLOC_FRAMES", "1")))
    counter = [0]

    def on_signal(signum: int, frame: Any) -> None:
        import asyncio
        try:
            asyncio.get_running_loop().call_soon_threadsafe(snapshot, directory, counter)
        except RuntimeError:
            snapshot(directory, counter)

    signal.signal(signal.SIGUSR1, on_signal)
    from rccs.cli import main as rccs_main
    sys.exit(rccs_main())


if __name__ == "__main__":
    main()
