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

# The targets of issue 15 ("connect storms and memory"), which tightened issue 5's (direct 1.2x, receipts 2.5x).
DIRECT_RATIO_MAX = 1.0
ACK_RATIO_MAX = 2.0
RSS_PER_DEVICE_MAX = 6 * 1024  # at 5 devices per user
CONNECT_RATE_MIN = {5: 5000, 190: 2500}  # devices per user -> connect + hello per second
IDLE_P99_MAX_US = 5000  # in every open-loop window


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
        status = verdict(median <= DIRECT_RATIO_MAX, f"{median / DIRECT_RATIO_MAX - 1:.0%} over")
        rows.append((f"direct routing, CPU/msg vs bare forwarder <= {DIRECT_RATIO_MAX}",
                     f"{median:.2f}x ({direct['min']:.2f}-{direct['max']:.2f})", status))
    ack = summary.get("rccs-ack", {}).get("cpu_per_msg_vs_baseline")
    if ack:
        median = ack["median"]
        rows.append((f"with receipts, CPU/msg vs bare forwarder <= {ACK_RATIO_MAX}",
                     f"{median:.2f}x ({ack['min']:.2f}-{ack['max']:.2f})",
                     verdict(median <= ACK_RATIO_MAX, f"{median / ACK_RATIO_MAX - 1:.0%} over")))
    pure = summary.get("rccs-pure", {}).get("cpu_per_msg_vs_baseline")
    if pure:
        rows.append(("pure-Python twin, CPU/msg vs bare forwarder (no goal)",
                     f"{pure['median']:.2f}x ({pure['min']:.2f}-{pure['max']:.2f})", "-"))
    return rows


def scale_rows(scale: dict[str, Any]) -> list[tuple[str, str, str]]:
    rows = []
    connect = scale.get("connect", {})
    for per_user, storms in sorted(connect.get("per_user", {}).items(), key=lambda item: int(item[0])):
        median = storms["median"]
        per_device = median["rss_bytes_per_device"]
        if int(per_user) == 5:
            over = f"by {(per_device - RSS_PER_DEVICE_MAX) / 1024:.1f} KiB, {per_device / RSS_PER_DEVICE_MAX:.1f}x"
            rows.append((f"RSS per idle device <= 6 KiB ({storms['devices']:,} devices, 5 per user)",
                         f"{per_device / 1024:.2f} KiB", verdict(per_device <= RSS_PER_DEVICE_MAX, over)))
        else:
            rows.append((f"RSS per idle device, {per_user} per user (no goal)", f"{per_device / 1024:.2f} KiB", "-"))
        rate = median["devices_per_s"]
        low, high = storms["devices_per_s_range"]
        wanted = CONNECT_RATE_MIN.get(int(per_user))
        rows.append((f"connect + hello, {per_user} per user" + (f" >= {wanted:,}/s" if wanted else " (no goal)"),
                     f"{rate:,.0f}/s ({low:,.0f}-{high:,.0f}); server {median['server_us_per_device']:.0f} us/device "
                     f"at {median['server_cpu_util']:.0%} of a core",
                     verdict(rate >= wanted, f"by {1 - rate / wanted:.0%}, {wanted / rate:.1f}x") if wanted else "-"))
    floor = connect.get("generator_floor")
    if floor:
        median = floor["median"]
        low, high = floor["devices_per_s_range"]
        rows.append(("the generator against a server that only welcomes (its ceiling here)",
                     f"{median['devices_per_s']:,.0f}/s ({low:,.0f}-{high:,.0f}); server "
                     f"{median['server_us_per_device']:.0f} us/device",
                     verdict(median["devices_per_s"] > max(CONNECT_RATE_MIN.values()),
                             "the generator cannot show the goal")))
    latency = scale.get("latency")
    if latency:
        windows = [w["latency_us"]["p99"] for w in latency["open_loop"]]
        slow = [w for w in windows if w > IDLE_P99_MAX_US]
        rows.append((f"{latency['idle_devices']:,} idle devices, direct p99 <= 5 ms at 50 % of max, every window",
                     f"windows {', '.join(f'{w / 1000:.2f}' for w in windows)} ms "
                     f"(max {latency['max_msgs_per_s']:,.0f} msgs/s)",
                     verdict(not slow, f"met in {len(windows) - len(slow)} of {len(windows)} windows")))
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
    print("Goals of issue 15 against this run")
    print("-" * (sum(widths) + 4))
    for row in rows:
        print(f"{row[0]:<{widths[0]}}  {row[1]:<{widths[1]}}  {row[2]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
