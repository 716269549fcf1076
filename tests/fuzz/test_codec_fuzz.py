"""A short run of the codec fuzzer (``make fuzz`` runs it for minutes: tests/fuzz/run.py)."""

import importlib
import os

import pytest
from codec_fuzz import check_json, check_msgpack, json_texts, msgpack_inputs, pure_codec
from hypothesis import HealthCheck, given, settings

if os.environ.get("RCCS_PUREPYTHON") == "1":
    try:  # the pure run compares with the compiled codec when it was built, and checks the twin alone if not
        compiled_codec = importlib.import_module("rccs._fastpath._codec")
    except ImportError:
        compiled_codec = None
else:
    from rccs._fastpath import _codec as compiled_codec  # must exist in the compiled run: fail, never skip

PURE = pure_codec()
SHORT = settings(max_examples=int(os.environ.get("RCCS_FUZZ_EXAMPLES", "1000")), deadline=None, database=None,
                 suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])

REGRESSIONS = [  # inputs the fuzzers found, kept
    bytes.fromhex("81a4626f6479c703ff010203"),  # a 3-byte timestamp in the body: refused by both (issue 16)
    bytes.fromhex("81a4626f6479d7ffee6b280000000000"),  # an 8-byte timestamp with 10**9 nanoseconds: refused
    bytes.fromhex("81a4626f6479d48007"),  # ext type -128
    bytes.fromhex("81a4626f647981920102a161"),  # an array as a map key
    bytes.fromhex("81a4626f64798201a161c3a162"),  # keys 1 and true
    bytes.fromhex("81a4626f64798201a161a131a162"),  # keys 1 and "1": unconvertible
    bytes.fromhex("81a4626f6479dbffffffff"),  # a huge string length
    bytes.fromhex("81a4626f6479dfffffffff"),  # a huge map length
]


@pytest.mark.parametrize("data", REGRESSIONS, ids=lambda d: d.hex())
def test_found_inputs(data):
    check_msgpack(compiled_codec, PURE, data)


@SHORT
@given(msgpack_inputs())
def test_the_codecs_agree_and_never_crash(data):
    check_msgpack(compiled_codec, PURE, data)


@SHORT
@given(json_texts())
def test_text_frames_parse_to_strict_json_or_bad_request(data):
    check_json(data)
