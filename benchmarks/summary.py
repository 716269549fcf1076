"""Print the issue's goals next to what the last end-to-end and scale runs measured.

    python benchmarks/summary.py    # reads benchmarks/e2e/results.json and benchmarks/e2e/scale-results.json

``make bench`` runs it last, after ``run.py`` and ``scale.py all`` have rewritten both files, so
the table always describes the run just finished. It only reads and compares: every number
comes from those JSON files (whose ``environment.time`` says when they were measured).
Exit status 0 whether goals are met or not: a missed goal is a finding, not a failed command.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
E2E = HERE / "e2e"

# The targets ("performance you can reproduce").
DIRECT_RATIO_MAX = 1.2
DIRECT_RATIO_GOAL = 1.0
ACK_RATIO_MAX = 2.5
RSS_PER_DEVICE_MAX = 6 * 1024
CONNECT_RATE_MIN = 5000
IDLE_P99_MAX_US = 5000


def load(path: Path) -> dict[str, Any] | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data


def verdict(ok: bool, miss: str) -> str:
    return "met" if ok else f"MISSED ({miss})"


def ratio_rows(e2e: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    summary = e2e.get("summary", {})
    direct = summary.get("rccs", {}).get("cpu_per_msg_vs_baseline")
    if direct:
        median = direct["median"]
        status = verdict(median <= DIRECT_RATIO_MAX, f"{median / DIRECT_RATIO_MAX - 1:.0%} over {DIRECT_RATIO_MAX}")
        if median <= DIRECT_RATIO_MAX and median > DIRECT_RATIO_GOAL:
            status += f" (the {DIRECT_RATIO_GOAL} goal: {'in the best round' if direct['min'] <= 1 else 'not reached'})"
        rows.append(("direct routing, CPU/msg vs bare forwarder <= 1.2 (goal 1.0)",
                     f"{median:.2f}x ({direct['min']:.2f}-{direct['max']:.2f})", status))
    ack = summary.get("rccs-ack", {}).get("cpu_per_msg_vs_baseline")
    if ack:
        median = ack["median"]
        rows.append(("with receipts, CPU/msg vs bare forwarder <= 2.5",
                     f"{median:.2f}x ({ack['min']:.2f}-{ack['max']:.2f})",
                     verdict(median <= ACK_RATIO_MAX, f"{median / ACK_RATIO_MAX - 1:.0%} over")))
    pure = summary.get("rccs-pure", {}).get("cpu_per_msg_vs_baseline")
    if pure:
        rows.append(("pure-Python twin, CPU/msg vs bare forwarder (no goal)",
                     f"{pure['median']:.2f}x ({pure['min']:.2f}-{pure['max']:.2f})", "-"))
    return rows


def scale_rows(scale: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    connect = scale.get("connect")
    if connect:
        median = connect["median"]
        per_device = median["rss_bytes_per_device"]
        rows.append((f"{connect['devices']:,} devices held ({connect['users']} users)",
                     f"{len(connect['rounds'])} rounds", "met"))
        over = f"by {(per_device - RSS_PER_DEVICE_MAX) / 1024:.1f} KiB, {per_device / RSS_PER_DEVICE_MAX:.1f}x"
        rows.append(("RSS per connected device <= 6 KiB", f"{per_device / 1024:.2f} KiB",
                     verdict(per_device <= RSS_PER_DEVICE_MAX, over)))
        rate = median["devices_per_s"]
        low, high = connect["devices_per_s_range"]
        rows.append(("connect + hello >= 5,000 devices/s",
                     f"{rate:,.0f}/s ({low:,.0f}-{high:,.0f}); server {median['server_us_per_device']:.0f} us/device",
                     verdict(rate >= CONNECT_RATE_MIN, f"by {1 - rate / CONNECT_RATE_MIN:.0%}")))
    latency = scale.get("latency")
    if latency:
        windows = [w["latency_us"]["p99"] for w in latency["open_loop"]]
        p99 = latency["open_loop_median"]["latency_us"]["p99"]
        rows.append((f"{latency['idle_devices']:,} idle devices, direct p99 <= 5 ms at 50 % of max",
                     f"{p99 / 1000:.2f} ms (windows: {', '.join(f'{w / 1000:.2f}' for w in windows)}; "
                     f"max {latency['max_msgs_per_s']:,.0f} msgs/s)",
                     verdict(p99 <= IDLE_P99_MAX_US, f"by {p99 / 1000 - IDLE_P99_MAX_US / 1000:.2f} ms")))
    fanout = scale.get("fanout")
    if fanout:
        by_recipients = fanout["summary"]["all"]["by_recipients"]
        counts = sorted(by_recipients, key=int)
        first, last = by_recipients[counts[0]], by_recipients[counts[-1]]
        same = all(r["identical_frames"] and r["delivered_all"] for s in fanout["summary"].values()
                   for r in s["by_recipients"].values())
        rows.append(("fan-out encoded once (user CPU per delivery falls with recipients)",
                     f"{first['server_user_us_per_delivery']:.1f} us ({counts[0]}) -> "
                     f"{last['server_user_us_per_delivery']:.1f} us ({counts[-1]}); identical frames: {same}",
                     verdict(last["server_user_us_per_delivery"] < first["server_user_us_per_delivery"] and same,
                             "per-delivery work does not fall")))
    scaling = scale.get("scaling")
    if scaling:
        levels = sorted(scaling["summary"], key=int)
        cells = [f"{int(n):,}: {scaling['summary'][n]['msgs_per_s']:,.0f}/s p99 "
                 f"{scaling['summary'][n]['latency_us']['p99'] / 1000:.1f} ms" for n in levels]
        rows.append(("throughput and p99 by connections (plot: docs/scaling.png)", "; ".join(cells), "-"))
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--e2e", type=Path, default=E2E / "results.json", help="run.py's JSON")
    parser.add_argument("--scale", type=Path, default=E2E / "scale-results.json", help="scale.py's JSON")
    args = parser.parse_args()
    e2e, scale = load(args.e2e), load(args.scale)
    if e2e is None and scale is None:
        print(f"summary: neither {args.e2e} nor {args.scale} could be read", file=sys.stderr)
        return 2
    rows: list[tuple[str, str, str]] = []
    for name, data, make_rows in (("e2e", e2e, ratio_rows), ("scale", scale, scale_rows)):
        if data is None:
            print(f"summary: no {name} results ({args.e2e if name == 'e2e' else args.scale})", file=sys.stderr)
            continue
        print(f"{name} results measured {data.get('environment', {}).get('time', '?')}")
        rows.extend(make_rows(data))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    print()
    print("Goals of issue 5 against this run")
    print("-" * (sum(widths) + 4))
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
