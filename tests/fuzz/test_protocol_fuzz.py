"""A short run of the protocol fuzzer against a live server (``make fuzz`` runs it for minutes)."""

import os
import tempfile

from protocol_fuzz import TEMPLATES, fuzz

from rccs.config import Settings
from rccs.node import Node

SECONDS = float(os.environ.get("RCCS_FUZZ_SECONDS", "15"))
SEED = int(os.environ.get("RCCS_FUZZ_SEED", "16"))


def test_the_fuzzer_knows_every_op_the_server_takes():
    with tempfile.TemporaryDirectory() as data_dir:
        node = Node(Settings(data_dir=data_dir, store="memory"))
        accepted = set(node.hub.ops) | set(node.hub.hello_ops) | {"hello", "ping"}
    assert accepted <= set(TEMPLATES), f"ops the fuzzer never sends: {sorted(accepted - set(TEMPLATES))}"


async def test_a_short_protocol_fuzz_run_finds_nothing():
    findings, fuzzer = await fuzz(SEED, SECONDS)
    assert not findings.items, f"seed {SEED}:\n" + "\n".join(findings.items[:20])
    # It did fuzz, and the witnesses did talk, all the while.
    assert fuzzer.inputs > 20 * SECONDS, fuzzer.inputs
    assert fuzzer.witnessed > 5 * SECONDS, fuzzer.witnessed
    assert set(findings.counts) == {"act_op", "act_before_hello", "act_frames", "act_handshake", "act_http"}
