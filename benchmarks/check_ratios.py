"""Fail unless the compiled fast path is clearly faster than its pure-Python twin.

Runs the pytest-benchmark micro-benchmarks in a short mode, then compares,
per benchmark group, the median time of the ``[python]`` case with the
``[cython]`` case measured in the same run. A ratio, never an absolute time:
the machine may be slow or busy, but both sides see the same conditions.

    python benchmarks/check_ratios.py            # part of `make test`
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# Minimum python/cython median ratio per benchmark (measured ratios on the
# development machine are 2.3x to 25x; these floors leave room for noise).
# RoutingTable.get is left out: it is one dict lookup in both twins, and the
# two measure the same (~120 ns).
REQUIRED = {
    "test_decode_envelope": 5.0,
    "test_encode_msg": 2.5,
    "test_fanout_encode_once_for_100_receivers": 2.0,
    "test_route_stats_record": 3.0,
    "test_routing_touch": 1.5,
    "test_routing_select_capability[{impl}-4]": 1.5,
}


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "bench.json"
        command = [
            sys.executable, "-m", "pytest", str(ROOT / "benchmarks" / "test_fastpath.py"), "-q", "-p",
            "no:cacheprovider", "--benchmark-only", "--benchmark-min-rounds=200", "--benchmark-max-time=0.2",
            "--benchmark-warmup=on", f"--benchmark-json={report}",
        ]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
            print("check_ratios: the micro-benchmarks failed to run")
            return 1
        medians = {bench["fullname"].split("::")[-1]: bench["stats"]["median"]
                   for bench in json.loads(report.read_text())["benchmarks"]}
    failures = 0
    print(f"{'benchmark':55} {'python':>12} {'cython':>12} {'ratio':>7} {'needed':>7}")
    for name, needed in REQUIRED.items():
        if "{impl}" in name:
            python_name, cython_name = name.format(impl="python"), name.format(impl="cython")
        else:
            python_name, cython_name = f"{name}[python]", f"{name}[cython]"
        python_median, cython_median = medians[python_name], medians[cython_name]
        ratio = python_median / cython_median
        verdict = "ok" if ratio >= needed else "TOO SLOW"
        failures += ratio < needed
        print(f"{name.format(impl='*'):55} {python_median * 1e9:10.0f}ns {cython_median * 1e9:10.0f}ns "
              f"{ratio:6.1f}x {needed:6.1f}x {verdict}")
    if failures:
        print(f"check_ratios: {failures} benchmark(s) where the compiled path is not clearly faster")
        return 1
    print("check_ratios: the compiled fast path is clearly faster everywhere checked")
    return 0


if __name__ == "__main__":
    sys.exit(main())
