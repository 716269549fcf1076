"""``make fuzz``: the codec fuzzer, then the protocol fuzzer, for a bounded time (default 10 minutes in all).

    python tests/fuzz/run.py [--minutes 10] [--seed N] [--codec-share 0.3]

The codec fuzzer gets ``--codec-share`` of the time (hypothesis, new seeds round after round), the protocol
fuzzer against a live server the rest. Seeds are printed; the exit code is 1 if anything was found.
"""

from __future__ import annotations

import argparse
import importlib
import os
import secrets
import sys
import time
import traceback

import uvloop
from codec_fuzz import check_json, check_msgpack, json_texts, msgpack_inputs, pure_codec
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hypothesis_seed
from protocol_fuzz import fuzz

ROUND_EXAMPLES = 2000


def compiled_codec():
    if os.environ.get("RCCS_PUREPYTHON") == "1":
        try:
            return importlib.import_module("rccs._fastpath._codec")
        except ImportError:
            return None
    return importlib.import_module("rccs._fastpath._codec")


def run_codec(seconds: float, seed: int) -> list[str]:
    compiled, pure = compiled_codec(), pure_codec()
    print(f"codec fuzzer: seed {seed}, {seconds:.0f} s, compiled codec {'present' if compiled else 'absent'}",
          flush=True)
    every = settings(max_examples=ROUND_EXAMPLES, deadline=None, database=None,
                     suppress_health_check=list(HealthCheck))
    deadline = time.monotonic() + seconds
    rounds = 0
    findings: list[str] = []
    while time.monotonic() < deadline:
        round_seed = seed + rounds

        @every
        @hypothesis_seed(round_seed)
        @given(msgpack_inputs())
        def msgpack_round(data: bytes) -> None:
            check_msgpack(compiled, pure, data)

        @every
        @hypothesis_seed(round_seed)
        @given(json_texts())
        def json_round(data: bytes) -> None:
            check_json(data)

        for check in (msgpack_round, json_round):
            try:
                check()
            except Exception:  # a finding: hypothesis has shrunk it and says how to reproduce it
                findings.append(f"codec fuzzer round seed {round_seed}:\n{traceback.format_exc()}")
                print(findings[-1], flush=True)
        rounds += 1
    print(f"codec fuzzer: {rounds} rounds of {ROUND_EXAMPLES} msgpack and {ROUND_EXAMPLES} text inputs, "
          f"{len(findings)} findings", flush=True)
    return findings


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--codec-share", type=float, default=0.3)
    parser.add_argument("--rss-growth-mib", type=int, default=150)
    args = parser.parse_args()
    seed = args.seed if args.seed is not None else secrets.randbelow(2**31)
    print(f"fuzz: seed {seed}, {args.minutes:g} minutes (repeat with --seed {seed})", flush=True)
    total = args.minutes * 60
    findings = run_codec(total * args.codec_share, seed)
    protocol, _ = uvloop.run(fuzz(seed, total * (1 - args.codec_share), None, args.rss_growth_mib))
    findings += protocol.items
    for item in findings:
        print("-" * 60 + "\n" + item)
    print(f"fuzz: seed {seed}: {'no finding' if not findings else f'{len(findings)} findings'}")
    return 1 if findings else 0


if __name__ == "__main__":
    sys.exit(main())
