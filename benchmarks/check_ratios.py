"""Fail unless the compiled fast path is clearly faster than its pure-Python twin.

Runs the pytest-benchmark micro-benchmarks in a short mode, then compares,
per benchmark group, the median time of the ``[python]`` case with the
``[cython]`` case measured in the same run. A ratio, never an absolute time:
the machine may be slow or busy, but both sides see the same conditions.

    python benchmarks/check_ratios.py            # part of `make test`

A group that falls short is measured again, up to three times, and judged by its best ratio: load from
elsewhere only slows a side down, and the two sides run one after the other.
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


ROUNDS = 3  # measurements of a group that falls short before it counts as a failure


def measure(names: list[str] | None = None) -> dict[str, float] | None:
    """Median seconds per benchmark (only the groups in ``names`` when given); None if they failed to run."""
    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "bench.json"
        command = [
            sys.executable, "-m", "pytest", str(ROOT / "benchmarks" / "test_fastpath.py"), "-q", "-p",
            "no:cacheprovider", "--benchmark-only", "--benchmark-min-rounds=200", "--benchmark-max-time=0.2",
            "--benchmark-warmup=on", f"--benchmark-json={report}",
        ]
        if names:
            command += ["-k", " or ".join(name.split("[")[0] for name in names)]
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True)
        if result.returncode != 0:
            print(result.stdout[-4000:], result.stderr[-4000:], sep="\n")
            return None
        return {bench["fullname"].split("::")[-1]: bench["stats"]["median"]
                for bench in json.loads(report.read_text())["benchmarks"]}


def ratio_of(name: str, medians: dict[str, float]) -> tuple[float, float, float]:
    if "{impl}" in name:
        python_name, cython_name = name.format(impl="python"), name.format(impl="cython")
    else:
        python_name, cython_name = f"{name}[python]", f"{name}[cython]"
    python_median, cython_median = medians[python_name], medians[cython_name]
    return python_median / cython_median, python_median, cython_median


def main() -> int:
    medians = measure()
    if medians is None:
        print("check_ratios: the micro-benchmarks failed to run")
        return 1
    best = {name: ratio_of(name, medians) for name in REQUIRED}
    # A busy machine only ever slows a side down, and the two sides of a group run one after the other: a
    # group that falls short is measured again, and judged by its best round.
    for _round in range(ROUNDS - 1):
        short = [name for name, needed in REQUIRED.items() if best[name][0] < needed]
        if not short:
            break
        again = measure(short)
        if again is None:
            print("check_ratios: the micro-benchmarks failed to run")
            return 1
        for name in short:
            measured = ratio_of(name, again)
            if measured[0] > best[name][0]:
                best[name] = measured
    failures = 0
    print(f"{'benchmark':55} {'python':>12} {'cython':>12} {'ratio':>7} {'needed':>7}")
    for name, needed in REQUIRED.items():
        ratio, python_median, cython_median = best[name]
        verdict = "ok" if ratio >= needed else "TOO SLOW"
        failures += ratio < needed
        print(f"{name.format(impl='*'):55} {python_median * 1e9:10.0f}ns {cython_median * 1e9:10.0f}ns "
              f"{ratio:6.1f}x {needed:6.1f}x {verdict}")
    if failures:
        print(f"check_ratios: {failures} benchmark(s) where the compiled path is not clearly faster "
              f"(best of {ROUNDS} measurements)")
        return 1
    print("check_ratios: the compiled fast path is clearly faster everywhere checked")
    return 0

if __name__ == "__main__":
    sys.exit(main())
