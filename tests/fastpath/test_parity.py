"""Parity of the compiled fast path (``_codec``, ``_routing``) with its pure-Python twins.

Golden vectors pin the behaviour of both implementations; differential tests
(hypothesis) feed both the same inputs and require the same value (type-exact,
floats bit-exact) or the same exception class and message.
"""

import importlib
import inspect
import math
import os
import struct

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rccs._fastpath
from rccs._fastpath.errors import EnvelopeError

if os.environ.get("RCCS_PUREPYTHON") == "1":
    cy_codec = pytest.importorskip("rccs._fastpath._codec")
    cy_routing = pytest.importorskip("rccs._fastpath._routing")
else:
    # Without RCCS_PUREPYTHON=1 the compiled modules must exist: fail loudly, never skip.
    from rccs._fastpath import _codec as cy_codec
    from rccs._fastpath import _routing as cy_routing


def _pure_twin(name):
    """The module ``rccs/_fastpath/<name>.py`` itself.

    ``rccs._fastpath`` binds its attributes ``codec`` and ``routing`` to the implementation in
    use, so ``from rccs._fastpath import codec`` gives the *compiled* module whenever it is
    importable. Import the submodule explicitly, then restore the package's own choice.
    """
    package = rccs._fastpath
    chosen = package.__dict__.get(name)
    module = importlib.import_module(f"rccs._fastpath.{name}")
    if chosen is not None:
        setattr(package, name, chosen)
    return module


py_codec = _pure_twin("codec")
py_routing = _pure_twin("routing")

CODECS = pytest.mark.parametrize("codec", [py_codec, cy_codec], ids=["python", "cython"])
ROUTINGS = pytest.mark.parametrize("routing", [py_routing, cy_routing], ids=["python", "cython"])



def fuzz(examples):
    """Explicit, moderate hypothesis settings (no example database written into the repository)."""
    return settings(max_examples=examples, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


TRUNCATED = "truncated msgpack data"
DEPTH = "msgpack nesting deeper than 32 levels"
TRAILING = "trailing bytes after the envelope"
NOT_MAP = "envelope must be a map"
KEY_TYPE = "envelope keys must be strings"
UTF8 = "invalid UTF-8 in a msgpack string"
EXT = "ext types are only allowed inside body"
HEADER_MAP_KEY = "map keys outside body must be strings"
BIN = "binary values are only allowed inside body"
BAD_C1 = "invalid msgpack type byte 0xc1"
TIMESTAMP = "invalid msgpack timestamp in body"


def h(text):
    return bytes.fromhex(text)


def canon(value):
    """A comparable form of ``value`` that tells apart types (1 vs True vs 1.0), float bits and dict order."""
    kind = type(value)
    if kind is float:
        return ("float", struct.pack(">d", value))
    if kind is dict:
        return ("dict", tuple((canon(k), canon(v)) for k, v in value.items()))
    if kind in (list, tuple):
        return (kind.__name__, tuple(canon(item) for item in value))
    if kind is Handle:
        return ("handle", value.name)
    return (kind.__name__, value)


def outcome(fn, *args):
    try:
        result = fn(*args)
    except Exception as exc:
        return ("raised", type(exc), str(exc))
    return ("returned", canon(result))


def expect(fn, args, expected):
    """``expected`` is a value or an (exception class, message) pair."""
    if isinstance(expected, tuple) and len(expected) == 2 and isinstance(expected[0], type):
        exc_type, message = expected
        with pytest.raises(exc_type) as info:
            fn(*args)
        assert type(info.value) is exc_type
        assert str(info.value) == message
    else:
        assert canon(fn(*args)) == canon(expected)


# ---- module surface ---------------------------------------------------------

CODEC_CONSTANTS = [
    "MAX_DEPTH", "ERR_TRUNCATED", "ERR_DEPTH", "ERR_TRAILING", "ERR_NOT_MAP", "ERR_KEY_TYPE", "ERR_UTF8",
    "ERR_EXT_IN_HEADER", "ERR_HEADER_MAP_KEY", "ERR_BIN_IN_HEADER", "ERR_TIMESTAMP",
]
CODEC_FUNCTIONS = ["decode_envelope", "skip_value", "encode_msg_prefix", "encode_msg", "append_seq"]
ROUTING_CONSTANTS = [
    "SELECT_ALL", "SELECT_TYPE", "SELECT_CAPABILITY", "RESULT_ROUTED", "RESULT_NO_ROUTE", "RESULT_OFFLINE",
    "RESULT_REJECTED", "RESULT_NAMES", "LATENCY_BUCKETS_US",
]


def _public(module, incidental):
    return {name for name in vars(module) if not name.startswith("_")} - incidental


def test_the_twins_are_distinct_modules():
    assert py_codec.__file__.endswith("codec.py")
    assert py_routing.__file__.endswith("routing.py")
    assert cy_codec.__name__ == "rccs._fastpath._codec"
    assert cy_routing.__name__ == "rccs._fastpath._routing"
    assert not cy_codec.__file__.endswith(".py")
    assert not cy_routing.__file__.endswith(".py")


def test_codec_surface():
    assert _public(cy_codec, set()) == _public(py_codec, {"annotations", "struct"})
    assert set(CODEC_CONSTANTS + CODEC_FUNCTIONS + ["EnvelopeError"]) <= _public(cy_codec, set())
    for name in CODEC_CONSTANTS:
        assert canon(getattr(cy_codec, name)) == canon(getattr(py_codec, name)), name
    assert cy_codec.EnvelopeError is EnvelopeError
    assert py_codec.EnvelopeError is EnvelopeError
    for name in CODEC_FUNCTIONS:
        assert inspect.signature(getattr(cy_codec, name)).parameters.keys() == (
            inspect.signature(getattr(py_codec, name)).parameters.keys()
        ), name


def test_routing_surface():
    assert _public(cy_routing, set()) == _public(py_routing, {"annotations", "Iterable"})
    for name in ROUTING_CONSTANTS:
        assert canon(getattr(cy_routing, name)) == canon(getattr(py_routing, name)), name
    for cls in ("RoutingTable", "RouteStats"):
        py_cls, cy_cls = getattr(py_routing, cls), getattr(cy_routing, cls)
        methods = [n for n in vars(py_cls) if callable(getattr(py_cls, n)) and not n.startswith("_")]
        assert methods
        for name in [*methods, "__len__"] if cls == "RoutingTable" else methods:
            assert inspect.signature(getattr(cy_cls, name)).parameters.keys() == (
                inspect.signature(getattr(py_cls, name)).parameters.keys()
            ), (cls, name)


# ---- decode: golden vectors -------------------------------------------------

def _nested_list(levels, leaf):
    for _ in range(levels):
        leaf = [leaf]
    return leaf


# (msgpack of one header value, the decoded value)
HEADER_VALUES = [
    ("00", 0), ("7f", 127), ("e0", -32), ("ff", -1),
    ("c0", None), ("c2", False), ("c3", True),
    ("cc 00", 0), ("cc 80", 128), ("cc ff", 255), ("cd 01 00", 256), ("cd ff ff", 65535),
    ("ce 00 01 00 00", 65536), ("ce ff ff ff ff", 4294967295),
    ("cf 00 00 00 01 00 00 00 00", 4294967296), ("cf ff ff ff ff ff ff ff ff", 18446744073709551615),
    ("d0 7f", 127), ("d0 df", -33), ("d0 80", -128), ("d1 ff 7f", -129), ("d1 80 00", -32768),
    ("d2 ff ff 7f ff", -32769), ("d2 80 00 00 00", -2147483648), ("d2 7f ff ff ff", 2147483647),
    ("d3 ff ff ff ff 7f ff ff ff", -2147483649), ("d3 80 00 00 00 00 00 00 00", -9223372036854775808),
    ("d3 7f ff ff ff ff ff ff ff", 9223372036854775807), ("d3 ff ff ff ff ff ff ff ff", -1),
    ("ca 3f c0 00 00", 1.5), ("ca 3d cc cc cd", 0.10000000149011612), ("ca ff 80 00 00", -math.inf),
    ("ca 00 00 00 01", 1.401298464324817e-45), ("ca 7f c0 00 00", math.nan),
    ("cb 3f f8 00 00 00 00 00 00", 1.5), ("cb 3f b9 99 99 99 99 99 9a", 0.1), ("cb 80 00 00 00 00 00 00 00", -0.0),
    ("cb 7f f0 00 00 00 00 00 00", math.inf),
    ("a0", ""), ("a3 61 62 63", "abc"), ("a2 c3 a9", "\u00e9"), ("a4 f0 9f 98 80", "\U0001f600"),
    ("a3 ef bf bf", "\uffff"), ("a4 f4 8f bf bf", "\U0010ffff"), ("a2 6f 70", "op"), ("a4 73 65 6e 64", "send"),
    ("d9 00", ""), ("d9 03 61 62 63", "abc"), ("da 00 03 61 62 63", "abc"), ("db 00 00 00 03 61 62 63", "abc"),
    ("d9 20" + " 78" * 32, "x" * 32), ("da 01 00" + " 79" * 256, "y" * 256),
    ("90", []), ("92 01 a1 78", [1, "x"]), ("dc 00 02 c0 c3", [None, True]), ("dd 00 00 00 01 90", [[]]),
    ("dc 00 00", []), ("dd 00 00 00 00", []),
    ("80", {}), ("81 a1 6b 91 01", {"k": [1]}), ("de 00 01 a1 6b c0", {"k": None}), ("de 00 00", {}),
    ("df 00 00 00 02 a1 61 01 a1 62 81 a1 63 02", {"a": 1, "b": {"c": 2}}),
    ("81 d9 01 6b 02", {"k": 2}), ("81 da 00 01 6b 02", {"k": 2}), ("81 db 00 00 00 01 6b 02", {"k": 2}),
    ("83 a1 62 01 a1 61 02 a1 63 03", {"b": 1, "a": 2, "c": 3}),
    ("82 a1 61 01 a1 61 02", {"a": 2}),
    ("91" * 31 + " c0", _nested_list(31, None)),
    ("91" * 31 + " 90", _nested_list(31, [])),
]


@CODECS
@pytest.mark.parametrize(("value_hex", "value"), HEADER_VALUES)
def test_decode_header_value(codec, value_hex, value):
    data = h("81 a1 61 " + value_hex)
    expect(codec.decode_envelope, (data,), ({"a": value}, -1, -1))


@CODECS
def test_decode_golden_envelopes(codec):
    expect(codec.decode_envelope, (h("80"),), ({}, -1, -1))
    expect(codec.decode_envelope, (h("de 00 00"),), ({}, -1, -1))
    expect(codec.decode_envelope, (h("df 00 00 00 00"),), ({}, -1, -1))
    expect(codec.decode_envelope, (h("81 a2 6f 70 a4 73 65 6e 64"),), ({"op": "send"}, -1, -1))
    expect(codec.decode_envelope, (h("81 a4 62 6f 64 79 c0"),), ({}, 6, 7))
    # Top-level keys in str8/16/32 form, "body" included.
    expect(codec.decode_envelope, (h("81 d9 04 62 6f 64 79 01"),), ({}, 7, 8))
    expect(codec.decode_envelope, (h("81 da 00 04 62 6f 64 79 01"),), ({}, 8, 9))
    expect(codec.decode_envelope, (h("81 db 00 00 00 02 6f 70 01"),), ({"op": 1}, -1, -1))
    # A repeated body: the last one wins.
    expect(codec.decode_envelope, (h("82 a4 62 6f 64 79 01 a4 62 6f 64 79 02"),), ({}, 12, 13))
    # "Body" is not "body"; neither is "bod".
    expect(codec.decode_envelope, (h("82 a4 42 6f 64 79 01 a3 62 6f 64 02"),), ({"Body": 1, "bod": 2}, -1, -1))
    expect(codec.decode_envelope, (h("83 a4 62 6f 64 61 01 a4 78 6f 64 79 02 a5 62 6f 64 79 73 03"),),
           ({"boda": 1, "xody": 2, "bodys": 3}, -1, -1))
    send = msgpack.packb({"op": "send", "id": "m-1", "to": {"type": "phone"}, "type": "clip", "ack": True,
                          "body": {"text": "hi", "n": [1, 2.5, None]}})
    body_start = send.index(b"\xa4body") + 5
    expect(codec.decode_envelope, (send,),
           ({"op": "send", "id": "m-1", "to": {"type": "phone"}, "type": "clip", "ack": True},
            body_start, len(send)))
    assert msgpack.unpackb(send[body_start:]) == {"text": "hi", "n": [1, 2.5, None]}


BODY_PREFIX = "82 a2 6f 70 a1 78 a4 62 6f 64 79"  # {"op": "x", "body": ...}: the body starts at 11

BODIES = [
    "00", "7f", "e0", "ff", "c0", "c2", "c3",
    "cc ff", "cd 01 00", "ce 00 01 00 00", "cf ff ff ff ff ff ff ff ff",
    "d0 80", "d1 80 00", "d2 80 00 00 00", "d3 80 00 00 00 00 00 00 00",
    "ca 3f c0 00 00", "ca 7f 80 00 01", "cb 3f f8 00 00 00 00 00 00",
    "a0", "a3 61 62 63", "a2 c3 a9", "d9 00", "d9 03 61 62 63", "da 00 03 61 62 63", "db 00 00 00 03 61 62 63",
    "c4 00", "c4 02 01 02", "c5 00 02 01 02", "c6 00 00 00 02 01 02", "c4 03 ff fe c1",
    "d4 01 00", "d5 01 00 00", "d6 ff 00 00 00 00", "d7 01" + " 00" * 8, "d8 01" + " 00" * 16,
    "c7 00 05", "c7 02 05 01 02", "c8 00 02 05 01 02", "c9 00 00 00 02 05 01 02",
    "d6 ff 00 00 00 01",  # timestamp 32
    "90", "93 01 02 03", "dc 00 02 01 02", "dd 00 00 00 02 01 02", "dc 00 00",
    "80", "81 01 02", "81 c0 c0", "81 91 01 c4 00", "de 00 01 a1 61 c0", "df 00 00 00 01 c4 01 00 c0",
    "91 81 a1 61 92 c4 01 00 d4 01 00",
    "82 a4 74 65 78 74 a5 68 65 6c 6c 6f a1 6e 93 01 cb 40 04 00 00 00 00 00 00 c0",
    "91" * 31 + " c0", "81 01" * 31 + " c0", "91" * 31 + " 90", "91" * 31 + " 80",
]


@CODECS
@pytest.mark.parametrize("body_hex", BODIES)
def test_decode_body_of_every_type(codec, body_hex):
    body = h(body_hex)
    data = h(BODY_PREFIX) + body
    expect(codec.decode_envelope, (data,), ({"op": "x"}, 11, len(data)))
    # Body first, header after it.
    data = h("82 a4 62 6f 64 79") + body + h("a2 6f 70 a1 78")
    expect(codec.decode_envelope, (data,), ({"op": "x"}, 6, 6 + len(body)))
    expect(codec.skip_value, (body, 0, 1), len(body))


# (frame hex, error message)
ENVELOPE_ERRORS = [
    ("", TRUNCATED),
    ("90", NOT_MAP), ("c0", NOT_MAP), ("c1", NOT_MAP), ("a1 61", NOT_MAP), ("01", NOT_MAP), ("c4 00", NOT_MAP),
    ("dc", TRUNCATED), ("dc 00", TRUNCATED), ("dc 00 00", NOT_MAP), ("dd 00 00 00", TRUNCATED),
    ("dd 00 00 00 00", NOT_MAP), ("de", TRUNCATED), ("de 00", TRUNCATED), ("df 00 00 00", TRUNCATED),
    ("81", TRUNCATED), ("8f", TRUNCATED), ("de 00 01", TRUNCATED), ("df ff ff ff ff a1 61 01", TRUNCATED),
    ("81 01 c0", KEY_TYPE), ("81 c0 c0", KEY_TYPE), ("81 c4 01 61 c0", KEY_TYPE), ("81 c1", KEY_TYPE),
    ("81 91 a1 61 c0", KEY_TYPE), ("82 a1 61 01 02 03", KEY_TYPE),
    ("81 a1", TRUNCATED), ("81 d9", TRUNCATED), ("81 da 00", TRUNCATED), ("81 db 00 00 00", TRUNCATED),
    ("81 a2 62", TRUNCATED), ("81 a4 62 6f 64", TRUNCATED), ("81 a4 62 6f 64 79", TRUNCATED),
    ("81 a1 61", TRUNCATED), ("81 a1 61 c1", BAD_C1),
    ("81 a1 61 c4 00", BIN), ("81 a1 61 c4", BIN), ("81 a1 61 c5", BIN), ("81 a1 61 c6 00 00 00 00", BIN),
    ("81 a1 61 c7 00 01", EXT), ("81 a1 61 c7", EXT), ("81 a1 61 c8", EXT), ("81 a1 61 c9", EXT),
    ("81 a1 61 d4", EXT), ("81 a1 61 d5", EXT), ("81 a1 61 d6", EXT), ("81 a1 61 d7", EXT), ("81 a1 61 d8", EXT),
    ("81 a1 61 91 c4 00", BIN), ("81 a1 61 81 a1 62 d4 01 00", EXT), ("81 a1 61 91 c1", BAD_C1),
    ("81 a1 61 81 01 02", HEADER_MAP_KEY), ("81 a1 61 81 c0 c0", HEADER_MAP_KEY),
    ("81 a1 61 81 c4 01 61 c0", HEADER_MAP_KEY), ("81 a1 61 81 c1", HEADER_MAP_KEY),
    ("81 a1 61 81", TRUNCATED), ("81 a1 61 81 a1", TRUNCATED), ("81 a1 61 81 a1 62", TRUNCATED),
    ("80 00", TRAILING), ("80 c1", TRAILING), ("81 a1 61 01 01", TRAILING), ("81 a4 62 6f 64 79 c0 c0", TRAILING),
    ("81 a1 ff c0", UTF8), ("81 a2 c0 80 c0", UTF8), ("81 a1 80 c0", UTF8),
    ("81 a1 61 a3 ed a0 80", UTF8), ("81 a1 61 a3 ed bf bf", UTF8), ("81 a1 61 a4 f4 90 80 80", UTF8),
    ("81 a1 61 a2 e2 82", UTF8), ("81 a1 61 a1 80", UTF8), ("81 a1 61 a3 e0 80 80", UTF8),
    ("81 a1 61 a4 f0 80 80 80", UTF8), ("81 a1 61 a1 f8", UTF8), ("81 a1 61 81 a1 ff c0", UTF8),
    ("81 a1 61 91 a1 ff", UTF8), ("81 a1 61 d9 01 ff", UTF8),
    ("81 a1 61 cc", TRUNCATED), ("81 a1 61 cd 00", TRUNCATED), ("81 a1 61 ce 00 00 00", TRUNCATED),
    ("81 a1 61 cf" + " 00" * 7, TRUNCATED), ("81 a1 61 d0", TRUNCATED), ("81 a1 61 d1 00", TRUNCATED),
    ("81 a1 61 d2 00", TRUNCATED), ("81 a1 61 d3 00", TRUNCATED), ("81 a1 61 ca 00 00 00", TRUNCATED),
    ("81 a1 61 cb 00", TRUNCATED), ("81 a1 61 a2 61", TRUNCATED), ("81 a1 61 d9 02 61", TRUNCATED),
    ("81 a1 61 92 01", TRUNCATED), ("81 a1 61 dc 00", TRUNCATED), ("81 a1 61 dd ff ff ff ff", TRUNCATED),
    ("81 a1 61 a2 ff", TRUNCATED),  # the length check comes before UTF-8 validation
    ("81 a1 61" + " 91" * 32 + " c0", DEPTH), ("81 a1 61" + " 91" * 32, DEPTH), ("81 a1 61" + " 91" * 31, TRUNCATED),
    ("81 a1 61" + " 91" * 32 + " 90", DEPTH), ("81 a1 61" + " 81 a1 61" * 32 + " c0", DEPTH),
    ("81 a1 61" + " 91" * 40 + " c1", DEPTH),
    # body
    ("81 a4 62 6f 64 79 c1", BAD_C1), ("81 a4 62 6f 64 79 a1 ff", UTF8), ("81 a4 62 6f 64 79 a3 ed b0 80", UTF8),
    ("81 a4 62 6f 64 79 a2 c1 81", UTF8), ("81 a4 62 6f 64 79 81 a1 ff c0", UTF8),
    ("81 a4 62 6f 64 79 92 a1 61 a1 ff", UTF8), ("81 a4 62 6f 64 79 a2 ff", TRUNCATED),
    ("81 a4 62 6f 64 79 c4 02 00", TRUNCATED), ("81 a4 62 6f 64 79 c4", TRUNCATED),
    ("81 a4 62 6f 64 79 c5 00", TRUNCATED), ("81 a4 62 6f 64 79 c6 00 00 00 01", TRUNCATED),
    ("81 a4 62 6f 64 79 c6 ff ff ff ff", TRUNCATED),
    ("81 a4 62 6f 64 79 c7 00", TRUNCATED), ("81 a4 62 6f 64 79 c7 01 05", TRUNCATED),
    ("81 a4 62 6f 64 79 c8 00", TRUNCATED), ("81 a4 62 6f 64 79 c9 00 00 00 00", TRUNCATED),
    ("81 a4 62 6f 64 79 d4 01", TRUNCATED), ("81 a4 62 6f 64 79 d8 01" + " 00" * 15, TRUNCATED),
    ("81 a4 62 6f 64 79 ca 00 00 00", TRUNCATED), ("81 a4 62 6f 64 79 cb", TRUNCATED),
    ("81 a4 62 6f 64 79 cf 00", TRUNCATED), ("81 a4 62 6f 64 79 d3 00", TRUNCATED),
    ("81 a4 62 6f 64 79 d1 00", TRUNCATED), ("81 a4 62 6f 64 79 cd 00", TRUNCATED),
    ("81 a4 62 6f 64 79 cc", TRUNCATED), ("81 a4 62 6f 64 79 d0", TRUNCATED),
    ("81 a4 62 6f 64 79 ce 00 00 00", TRUNCATED), ("81 a4 62 6f 64 79 d2 00 00", TRUNCATED),
    ("81 a4 62 6f 64 79 93 01 02", TRUNCATED), ("81 a4 62 6f 64 79 82 01 02 03", TRUNCATED),
    ("81 a4 62 6f 64 79 dc 00", TRUNCATED), ("81 a4 62 6f 64 79 df 00 00 00", TRUNCATED),
    ("81 a4 62 6f 64 79 d9", TRUNCATED), ("81 a4 62 6f 64 79 db 00 00 00 05 61", TRUNCATED),
    ("81 a4 62 6f 64 79 91 c1", BAD_C1), ("81 a4 62 6f 64 79 81 c1 00", BAD_C1),
    ("81 a4 62 6f 64 79" + " 91" * 32 + " c0", DEPTH), ("81 a4 62 6f 64 79" + " 91" * 32, DEPTH),
    ("81 a4 62 6f 64 79" + " 91" * 32 + " 90", DEPTH), ("81 a4 62 6f 64 79" + " 81 01" * 32 + " c0", DEPTH),
    ("81 a4 62 6f 64 79" + " 91" * 31, TRUNCATED),
]


@CODECS
@pytest.mark.parametrize(("data_hex", "message"), ENVELOPE_ERRORS)
def test_decode_errors(codec, data_hex, message):
    expect(codec.decode_envelope, (h(data_hex),), (EnvelopeError, message))


# ---- timestamps in the body (ext -1): standard msgpack decoders refuse an invalid one ------------------------------

def _seconds_nanos_8(nanoseconds, seconds=0):
    return ((nanoseconds << 34) | seconds).to_bytes(8, "big").hex()


def _seconds_nanos_12(nanoseconds, seconds=-1):
    return nanoseconds.to_bytes(4, "big").hex() + seconds.to_bytes(8, "big", signed=True).hex()


def _length_of(n):
    return f"{TIMESTAMP}: ext -1 of {n} bytes (a timestamp has 4, 8 or 12)"


def _nanoseconds(n):
    return f"{TIMESTAMP}: {n} nanoseconds (at most 999999999)"


# (body hex, error message): every form of ext -1 whose payload is no timestamp, also deep inside the body
BAD_TIMESTAMPS = [
    ("c7 03 ff 01 02 03", _length_of(3)), ("c7 00 ff", _length_of(0)), ("c8 00 05 ff" + " 00" * 5, _length_of(5)),
    ("c9 00 00 00 10 ff" + " 00" * 16, _length_of(16)), ("d4 ff 00", _length_of(1)), ("d5 ff 00 00", _length_of(2)),
    ("d8 ff" + " 00" * 16, _length_of(16)), ("c7 0d ff" + " 00" * 13, _length_of(13)),
    ("d7 ff" + _seconds_nanos_8(10**9), _nanoseconds(10**9)), ("d7 ff" + "ff" * 8, _nanoseconds(2**30 - 1)),
    ("c7 08 ff" + _seconds_nanos_8(10**9), _nanoseconds(10**9)),
    ("c7 0c ff" + _seconds_nanos_12(10**9), _nanoseconds(10**9)),
    ("c7 0c ff ff ff ff ff" + " 00" * 7 + " 01", _nanoseconds(2**32 - 1)),
    ("c9 00 00 00 0c ff" + _seconds_nanos_12(10**9), _nanoseconds(10**9)),
    ("93 01 a1 61 c7 03 ff 01 02 03", _length_of(3)),  # in an array
    ("81 a1 74 d7 ff" + _seconds_nanos_8(10**9), _nanoseconds(10**9)),  # a map value
    ("81 c7 03 ff 01 02 03 c0", _length_of(3)),  # a map key
    ("91" * 30 + " 81 a1 74 d4 ff 00", _length_of(1)),  # as deep as a body goes
]

# Valid timestamps in every form, and ext types other than -1 of any length: accepted as before
GOOD_EXTS = [
    "d6 ff 00 00 00 00", "d6 ff ff ff ff ff", "c7 04 ff 00 00 00 01", "c8 00 04 ff 00 00 00 01",
    "d7 ff" + _seconds_nanos_8(10**9 - 1, 2**34 - 1), "c7 08 ff" + _seconds_nanos_8(0, 1),
    "c7 0c ff" + _seconds_nanos_12(10**9 - 1), "c9 00 00 00 0c ff" + _seconds_nanos_12(0, -(2**63)),
    "c7 03 fe 01 02 03", "c7 03 01 01 02 03", "d4 7f 00", "d4 80 00", "d8 fe" + " ff" * 16, "c7 00 05",
    "d7 fe" + " ff" * 8, "c7 0c 00" + " ff" * 12,
    "93 d6 ff 00 00 00 01 c7 03 02 01 02 03 81 a1 74 d7 ff" + _seconds_nanos_8(5, 5),
    "81 d6 ff 00 00 00 01 c0", "91" * 30 + " 81 a1 74 c7 0c ff" + _seconds_nanos_12(1),
]


@CODECS
@pytest.mark.parametrize(("body_hex", "message"), BAD_TIMESTAMPS)
def test_an_invalid_timestamp_in_the_body_is_refused(codec, body_hex, message):
    body = h(body_hex)
    with pytest.raises(ValueError, match=r"timestamp|nanoseconds"):  # what a receiver's msgpack library does with it
        msgpack.unpackb(body, strict_map_key=False)
    expect(codec.decode_envelope, (h(BODY_PREFIX) + body,), (EnvelopeError, message))
    expect(codec.decode_envelope, (h("82 a4 62 6f 64 79") + body + h("a2 6f 70 a1 78"),), (EnvelopeError, message))
    expect(codec.skip_value, (body, 0, 1), (EnvelopeError, message))


@CODECS
@pytest.mark.parametrize("body_hex", GOOD_EXTS)
def test_valid_timestamps_and_other_ext_types_pass_the_body_check(codec, body_hex):
    body = h(body_hex)
    msgpack.unpackb(body, strict_map_key=False, ext_hook=lambda code, data: (code, data))  # any code: -2 too
    data = h(BODY_PREFIX) + body
    expect(codec.decode_envelope, (data,), ({"op": "x"}, 11, len(data)))
    expect(codec.skip_value, (body, 0, 1), len(body))


@CODECS
def test_a_cut_timestamp_is_truncated_not_invalid(codec):
    for body_hex in ("c7 03 ff 01 02", "d7 ff 00", "c7 0c ff" + _seconds_nanos_12(10**9)[:-2]):
        expect(codec.decode_envelope, (h(BODY_PREFIX + body_hex),), (EnvelopeError, TRUNCATED))


@CODECS
def test_decode_truncated_at_every_position(codec):
    frame = msgpack.packb({
        "op": "send", "id": 2**40, "to": {"devices": ["a", "b" * 40]}, "n": -129, "f": 1.5, "g": None, "ok": True,
        "s": "x" * 300, "body": [b"\x00" * 300, msgpack.ExtType(5, b"abc"), {1: "\u00e9", "k": [0.25, -2**63]}],
        "tail": "\U0001f600" * 3,
    })
    codec.decode_envelope(frame)
    for cut in range(len(frame)):
        expect(codec.decode_envelope, (frame[:cut],), (EnvelopeError, TRUNCATED))


@CODECS
def test_decode_needs_bytes(codec):
    for data in (bytearray(b"\x80"), memoryview(b"\x80"), "\x80", None, 0x80, [0x80]):
        expect(codec.decode_envelope, (data,), (TypeError, "decode_envelope() needs bytes"))

    class Frame(bytes):
        pass

    expect(codec.decode_envelope, (Frame(h("81 a1 61 01")),), ({"a": 1}, -1, -1))


# (data hex, pos, depth, result or error)
SKIPS = [
    ("01", 0, 0, 1), ("93 01 02 03", 0, 0, 4), ("c4 02 00 00 01", 0, 0, 4), ("00 a1 61", 1, 0, 3),
    ("90", 0, 32, 1), ("91 01", 0, 31, 2), ("91 01", 0, 32, (EnvelopeError, DEPTH)),
    ("01", 0, 33, (EnvelopeError, DEPTH)), ("01", 5, 33, (EnvelopeError, DEPTH)),
    ("", 0, 0, (EnvelopeError, TRUNCATED)), ("01", 1, 0, (EnvelopeError, TRUNCATED)),
    ("01", 2**70, 0, (EnvelopeError, TRUNCATED)), ("01", 0, 2**70, (EnvelopeError, DEPTH)),
    ("c1", 0, 0, (EnvelopeError, BAD_C1)), ("a1 ff", 0, 0, (EnvelopeError, UTF8)),
    ("c7 01 05 00 c0", 0, 0, 4), ("d8 00" + " 00" * 16, 0, 0, 18), ("81 c4 00 c1", 0, 0, (EnvelopeError, BAD_C1)),
]


@CODECS
@pytest.mark.parametrize(("data_hex", "pos", "depth", "expected"), SKIPS)
def test_skip_value_golden(codec, data_hex, pos, depth, expected):
    expect(codec.skip_value, (h(data_hex), pos, depth), expected)


@CODECS
def test_skip_value_refuses_arguments_outside_its_domain(codec):
    for data in (bytearray(b"\x93\x01\x02\x03"), memoryview(b"\xa1a"), [0x91, 0x01], "\x01", None):
        expect(codec.skip_value, (data, 0, 0), (TypeError, "skip_value() needs bytes"))
    for pos, depth in ((-1, 0), (-(2**80), 0), (0, -5), (1.0, 0), (0, 1.5), (None, 0), (0, None), (True, 0)):
        expect(codec.skip_value, (b"\x01", pos, depth), (ValueError, "pos and depth must be non-negative ints"))


# ---- decode: differential ---------------------------------------------------

INT_RANGE = st.integers(min_value=-(2**63), max_value=2**64 - 1)
INTERESTING_BYTES = [
    0x00, 0x01, 0x7F, 0x80, 0x81, 0x82, 0x8F, 0x90, 0x91, 0x92, 0x9F, 0xA0, 0xA1, 0xA2, 0xA4, 0xBF, 0xC0, 0xC1,
    0xC2, 0xC3, 0xC4, 0xC5, 0xC6, 0xC7, 0xC8, 0xC9, 0xCA, 0xCB, 0xCC, 0xCD, 0xCE, 0xCF, 0xD0, 0xD1, 0xD2, 0xD3,
    0xD4, 0xD8, 0xD9, 0xDA, 0xDB, 0xDC, 0xDD, 0xDE, 0xDF, 0xE0, 0xED, 0xF0, 0xF4, 0xFF,
]
KEYS = st.one_of(st.sampled_from(["op", "id", "to", "type", "ack", "ts", "body"]), st.text(max_size=6))
LEAVES = st.one_of(
    st.none(), st.booleans(), INT_RANGE, st.floats(), st.text(max_size=24), st.binary(max_size=24),
    st.builds(msgpack.ExtType, st.integers(0, 127), st.binary(max_size=17)),
)
VALUES = st.recursive(
    LEAVES,
    lambda inner: st.one_of(
        st.lists(inner, max_size=4),
        st.dictionaries(st.one_of(st.text(max_size=6), st.integers(-5, 5)), inner, max_size=4),
    ),
    max_leaves=12,
)
HEADER_SAFE = st.recursive(
    st.one_of(st.none(), st.booleans(), INT_RANGE, st.floats(), st.text(max_size=24)),
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=10,
)


@st.composite
def envelopes(draw):
    header = draw(st.dictionaries(KEYS, HEADER_SAFE if draw(st.booleans()) else VALUES, max_size=6))
    if draw(st.booleans()):
        header["body"] = draw(VALUES)
    if draw(st.booleans()):
        try:
            return msgpack.packb(header, use_single_float=True)  # float32 everywhere
        except OverflowError:
            pass
    return msgpack.packb(header)


@st.composite
def structured_bytes(draw):
    return bytes(draw(st.lists(st.one_of(st.sampled_from(INTERESTING_BYTES), st.integers(0, 255)), max_size=40)))


@st.composite
def mutated_envelopes(draw):
    data = bytearray(draw(envelopes()))
    for _ in range(draw(st.integers(1, 3))):
        action = draw(st.sampled_from(["set", "insert", "delete", "truncate", "append"]))
        where = draw(st.integers(0, len(data)))
        byte = draw(st.one_of(st.sampled_from(INTERESTING_BYTES), st.integers(0, 255)))
        if action == "set" and where < len(data):
            data[where] = byte
        elif action == "insert":
            data.insert(where, byte)
        elif action == "delete" and where < len(data):
            del data[where]
        elif action == "truncate":
            del data[where:]
        else:
            data += draw(structured_bytes())
    return bytes(data)


@st.composite
def deep_frames(draw):
    levels = draw(st.integers(28, 36))
    opener = draw(st.sampled_from(["91", "dc 00 01", "81 a1 61", "de 00 01 a1 61", "81 01"]))
    leaf = draw(st.sampled_from(["c0", "90", "80", "a1 61", "c1", "a1 ff", "", "c4 00", "d4 01 00"]))
    where = draw(st.sampled_from(["81 a1 61", "81 a4 62 6f 64 79"]))
    return h(where + (" " + opener) * levels + " " + leaf)


FRAMES = st.one_of(
    envelopes(),
    envelopes(),
    mutated_envelopes(),
    mutated_envelopes(),
    structured_bytes(),
    st.binary(max_size=48),
    VALUES.map(msgpack.packb),
    structured_bytes().map(lambda tail: h("81 a4 62 6f 64 79") + tail),
    structured_bytes().map(lambda tail: h("81 a1 61") + tail),
    deep_frames(),
)


@fuzz(1500)
@given(FRAMES)
def test_decode_envelope_differential(data):
    assert outcome(py_codec.decode_envelope, data) == outcome(cy_codec.decode_envelope, data)


@fuzz(600)
@given(FRAMES, st.integers(-4, 50), st.integers(-2, 35))
def test_skip_value_differential(data, pos, depth):
    assert outcome(py_codec.skip_value, data, pos, depth) == outcome(cy_codec.skip_value, data, pos, depth)


UTF8_PIECES = [
    b"\xc3\xa9", b"\xe2\x82\xac", b"\xf0\x9f\x98\x80", b"\xef\xbf\xbf", b"\xf4\x8f\xbf\xbf",  # valid
    b"\xff", b"\x80", b"\xc0\x80", b"\xc1\xbf", b"\xed\xa0\x80", b"\xed\xbf\xbf", b"\xe0\x80\x80",
    b"\xf0\x80\x80\x80", b"\xf4\x90\x80\x80", b"\xf5\x80\x80\x80", b"\xe2\x82", b"\xc3", b"\xf0\x9f\x98",
]
# Mostly ASCII with a few multi-byte or invalid pieces anywhere (the C validator checks ASCII 8 bytes at a time).
MOSTLY_ASCII = st.lists(
    st.one_of(st.integers(1, 17).map(lambda n: b"a" * n), st.sampled_from(UTF8_PIECES)), max_size=6,
).map(b"".join)


@fuzz(400)
@given(st.one_of(st.binary(max_size=40), MOSTLY_ASCII))
def test_utf8_validation_matches_python(raw):
    # Body strings are validated in C, header strings decoded by CPython: both must agree with bytes.decode.
    data = h("82 a1 61 db") + len(raw).to_bytes(4, "big") + raw + h("a4 62 6f 64 79 db") + len(raw).to_bytes(4, "big")
    data += raw
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        expected = (EnvelopeError, UTF8)
    else:
        expected = ({"a": text}, 13 + len(raw), len(data))
    expect(py_codec.decode_envelope, (data,), expected)
    expect(cy_codec.decode_envelope, (data,), expected)
    for codec in (py_codec, cy_codec):
        expect(codec.decode_envelope, (h("81 a4 62 6f 64 79 db") + len(raw).to_bytes(4, "big") + raw,),
               expected if expected[0] is EnvelopeError else ({}, 6, 11 + len(raw)))


# ---- encode: golden -----------------------------------------------------------

INT_BOUNDARIES = [
    0, 1, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63 - 1, 2**63, 2**64 - 1,
    -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**63),
]
STR_LENGTHS = [0, 1, 31, 32, 255, 256, 65535, 65536]


def reference_frame(msg_id, sender, app_type, body_value, ts, ack, seq):
    return msgpack.packb({"op": "msg", "id": msg_id, "from": sender, "type": app_type, "body": body_value,
                          "ts": ts, "ack": ack, "seq": seq})


@CODECS
def test_encode_golden_bytes(codec):
    prefix = codec.encode_msg_prefix("m1", "phone", "clip", b"\xc0", 5, False)
    assert prefix == h("88 a2 6f 70 a3 6d 73 67 a2 69 64 a2 6d 31 a4 66 72 6f 6d a5 70 68 6f 6e 65"
                       " a4 74 79 70 65 a4 63 6c 69 70 a4 62 6f 64 79 c0 a2 74 73 05 a3 61 63 6b c2")
    assert codec.append_seq(prefix, 0) == prefix + h("a3 73 65 71 00")
    assert codec.append_seq(prefix, 2**64 - 1) == prefix + h("a3 73 65 71 cf ff ff ff ff ff ff ff ff")
    prefix = codec.encode_msg_prefix(None, "", "", b"", -1, 1)
    assert prefix == h("88 a2 6f 70 a3 6d 73 67 a2 69 64 c0 a4 66 72 6f 6d a0 a4 74 79 70 65 a0"
                       " a4 62 6f 64 79 a2 74 73 ff a3 61 63 6b c3")
    assert codec.encode_msg_prefix(True, "a", "b", b"", 0, 0)[11] == 0xC3
    assert codec.encode_msg_prefix(False, "a", "b", b"", 0, 0)[11] == 0xC2


@CODECS
@pytest.mark.parametrize("number", INT_BOUNDARIES)
def test_encode_int_boundaries(codec, number):
    body = msgpack.packb({"k": [1, "x"]})
    seq = abs(number)
    frame = codec.append_seq(codec.encode_msg_prefix(number, "dev", "app", body, number, True), seq)
    assert frame == reference_frame(number, "dev", "app", {"k": [1, "x"]}, number, True, seq)


@CODECS
@pytest.mark.parametrize("length", STR_LENGTHS)
def test_encode_str_lengths(codec, length):
    for text in ("s" * length, ("\u00e9" * length)[: max(length // 2, 0)]):
        frame = codec.append_seq(codec.encode_msg_prefix(text, text, text, b"\xa0", 1715000000000, False), 7)
        assert frame == reference_frame(text, text, text, "", 1715000000000, False, 7)


class Explosive:
    def __bool__(self):
        raise RuntimeError("no truth here")


ENCODE_ERRORS = [
    (("x", b"s", "t", b"", 0, True), (TypeError, "sender and app_type must be str")),
    (("x", "s", None, b"", 0, True), (TypeError, "sender and app_type must be str")),
    (("x", "s", "t", b"", True, True), (TypeError, "ts must be int")),
    (("x", "s", "t", b"", 1.0, True), (TypeError, "ts must be int")),
    (("x", "s", "t", bytearray(), 0, True), (TypeError, "body must be bytes")),
    (("x", "s", "t", "body", 0, True), (TypeError, "body must be bytes")),
    ((1.5, "s", "t", b"", 0, True), (TypeError, "only None, bool, int and str can be packed here")),
    ((b"id", "s", "t", b"", 0, True), (TypeError, "only None, bool, int and str can be packed here")),
    ((2**64, "s", "t", b"", 0, True), (OverflowError, "integer out of msgpack range")),
    ((-(2**63) - 1, "s", "t", b"", 0, True), (OverflowError, "integer out of msgpack range")),
    (("x", "s", "t", b"", 2**64, True), (OverflowError, "integer out of msgpack range")),
    (("x", "s", "t", b"", 0, Explosive()), (RuntimeError, "no truth here")),
    (("x", "s", "t", b"", 2**64, Explosive()), (OverflowError, "integer out of msgpack range")),
    ((1.5, "s", "t", b"", 2**64, True), (TypeError, "only None, bool, int and str can be packed here")),
    (("\ud800", "s", "t", b"", 0, True),
     (UnicodeEncodeError, "'utf-8' codec can't encode character '\\ud800' in position 0: surrogates not allowed")),
    (("x", "a\udfff\udc00", "t", b"", 0, True),
     (UnicodeEncodeError, "'utf-8' codec can't encode characters in position 1-2: surrogates not allowed")),
]


@CODECS
@pytest.mark.parametrize(("args", "expected"), ENCODE_ERRORS)
def test_encode_errors(codec, args, expected):
    expect(codec.encode_msg_prefix, args, expected)


APPEND_CASES = [
    ((b"p", -1), (ValueError, "seq must be a non-negative int")),
    ((b"p", True), (ValueError, "seq must be a non-negative int")),
    ((b"p", 1.0), (ValueError, "seq must be a non-negative int")),
    ((b"p", None), (ValueError, "seq must be a non-negative int")),
    ((None, 1), (TypeError, "prefix must be bytes")),
    (("p", 1), (TypeError, "prefix must be bytes")),
    ((None, -1), (ValueError, "seq must be a non-negative int")),
    ((3, 1), (TypeError, "prefix must be bytes")),
    ((bytearray(b"pq"), 128), (TypeError, "prefix must be bytes")),
    ((memoryview(b"pq"), 65536), (TypeError, "prefix must be bytes")),
    ((b"pq", 128), b"pq\xa3seq\xcc\x80"),
    ((b"pq", 65536), b"pq\xa3seq\xce\x00\x01\x00\x00"),
    ((b"", 2**32), b"\xa3seq\xcf\x00\x00\x00\x01\x00\x00\x00\x00"),
]


@CODECS
@pytest.mark.parametrize(("args", "expected"), APPEND_CASES)
def test_append_seq_cases(codec, args, expected):
    expect(codec.append_seq, args, expected)


# seq of every msgpack width; bodies from absent (nil) to well past 64 KiB (the 8-byte frame length).
SEQ_WIDTHS = [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**63, 2**64 - 1]
BODY_VALUES = [None, "", "b" * 120, "b" * 65_535, "b" * 65_536, "b" * 300_000, {"k": [1, "x"]}]


@CODECS
@pytest.mark.parametrize("seq", SEQ_WIDTHS)
@pytest.mark.parametrize("body_value", BODY_VALUES, ids=lambda value: type(value).__name__ + str(len(value or "")))
def test_encode_msg_is_the_prefix_with_its_seq(codec, seq, body_value):
    # The direct path encodes a whole msg in one buffer; it must be byte for byte the general path's
    # prefix + append_seq (which fan-out keeps: one prefix for every receiver).
    body = msgpack.packb(body_value)
    ack = seq % 2 == 0
    frame = codec.encode_msg("m", "phone", "clip", body, 1715000000000, ack, seq)
    assert frame == codec.append_seq(codec.encode_msg_prefix("m", "phone", "clip", body, 1715000000000, ack), seq)
    assert frame == reference_frame("m", "phone", "clip", body_value, 1715000000000, ack, seq)


ENCODE_MSG_ERRORS = [
    (("x", "s", "t", b"", 0, True, -1), (ValueError, "seq must be a non-negative int")),
    (("x", "s", "t", b"", 0, True, True), (ValueError, "seq must be a non-negative int")),
    (("x", "s", "t", b"", 0, True, 2**64), (OverflowError, "integer out of msgpack range")),
    # The envelope's own errors come first, as in append_seq(encode_msg_prefix(...), seq).
    ((1.5, "s", "t", b"", 0, True, -1), (TypeError, "only None, bool, int and str can be packed here")),
    (("x", "s", "t", b"", 0, Explosive(), -1), (RuntimeError, "no truth here")),
    (("x", "s", "t", bytearray(), 0, True, None), (TypeError, "body must be bytes")),
]


@CODECS
@pytest.mark.parametrize(("args", "expected"), ENCODE_MSG_ERRORS)
def test_encode_msg_errors(codec, args, expected):
    expect(codec.encode_msg, args, expected)


# ---- encode: differential -----------------------------------------------------

TEXTS = st.one_of(
    st.text(max_size=40),
    st.lists(st.sampled_from(["a", "\u00e9", "\U0001f600", "\ud800", "\udfff", "\x00"]), max_size=6).map("".join),
    st.sampled_from(STR_LENGTHS).map(lambda n: "z" * n),
)
INTS = st.one_of(st.integers(-(2**70), 2**70), st.sampled_from(INT_BOUNDARIES), st.integers(-40, 300))
ANYTHING = st.one_of(st.none(), st.booleans(), INTS, TEXTS, st.floats(), st.binary(max_size=8),
                     st.builds(bytearray, st.binary(max_size=8)), st.lists(st.integers(0, 3), max_size=2))


@fuzz(500)
@given(
    msg_id=st.one_of(st.none(), st.booleans(), INTS, TEXTS, ANYTHING),
    sender=st.one_of(TEXTS, ANYTHING),
    app_type=st.one_of(TEXTS, ANYTHING),
    body=st.one_of(VALUES.map(msgpack.packb), st.binary(max_size=20), ANYTHING),
    ts=st.one_of(INTS, ANYTHING),
    ack=ANYTHING,
    seq=st.one_of(INTS, ANYTHING),
)
def test_encode_differential(msg_id, sender, app_type, body, ts, ack, seq):
    args = (msg_id, sender, app_type, body, ts, ack)
    expected = outcome(py_codec.encode_msg_prefix, *args)
    assert outcome(cy_codec.encode_msg_prefix, *args) == expected
    prefix = py_codec.encode_msg_prefix(*args) if expected[0] == "returned" else b"\x88"
    assert outcome(cy_codec.append_seq, prefix, seq) == outcome(py_codec.append_seq, prefix, seq)
    whole = outcome(py_codec.encode_msg, *args, seq)
    assert outcome(cy_codec.encode_msg, *args, seq) == whole
    assert whole == outcome(lambda: py_codec.append_seq(py_codec.encode_msg_prefix(*args), seq))


# bytearray(n) allocates n zero bytes: keep int prefixes small.
PREFIXES = st.one_of(st.binary(max_size=16), st.builds(bytearray, st.binary(max_size=8)),
                     st.builds(memoryview, st.binary(max_size=8)), st.integers(-3, 64), st.none(), st.booleans(),
                     TEXTS, st.floats(), st.lists(st.integers(-1, 256), max_size=3))


@fuzz(300)
@given(prefix=PREFIXES, seq=st.one_of(INTS, ANYTHING))
def test_append_seq_differential(prefix, seq):
    assert outcome(cy_codec.append_seq, prefix, seq) == outcome(py_codec.append_seq, prefix, seq)


# ---- routing table --------------------------------------------------------------

class Handle:
    """A session stand-in; tables compare handles by identity."""

    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def __repr__(self):
        return f"Handle({self.name})"


USERS = ["u1", "u2"]
DEVICES = ["d1", "d2", "d3", "d4"]
TYPES = ["phone", "laptop", "tv"]
CAPS = ["clip", "files", "notify"]

USER = st.one_of(st.sampled_from(USERS), st.sampled_from(USERS), st.sampled_from([1, None, ("u1",)]))
DEVICE = st.one_of(st.sampled_from(DEVICES), st.sampled_from(DEVICES), st.sampled_from([2, None]))
CAPABILITIES = st.one_of(
    st.lists(st.sampled_from(CAPS), max_size=4),
    st.lists(st.sampled_from(CAPS), max_size=3).map(tuple),
    st.sampled_from(["clip", 5, None, [["unhashable"]], ["clip", 3], ("files", "files")]),
)
OPERATIONS = st.one_of(
    st.tuples(st.just("add"), USER, DEVICE, st.one_of(st.sampled_from(TYPES), st.sampled_from([None, 3])),
              CAPABILITIES),
    st.tuples(st.just("add"), st.sampled_from(USERS), st.sampled_from(DEVICES), st.sampled_from(TYPES),
              st.lists(st.sampled_from(CAPS), max_size=3)),
    st.tuples(st.just("remove"), USER, DEVICE, st.integers(0, 40)),
    st.tuples(st.just("touch"), USER, DEVICE),
    st.tuples(st.just("get"), USER, DEVICE),
    st.tuples(st.just("devices"), USER),
    st.tuples(st.just("most_recent"), USER,
              st.one_of(st.lists(st.sampled_from(DEVICES), max_size=5), st.sampled_from([None, "d1", [["x"]], [3]]))),
    st.tuples(
        st.just("select"), USER,
        st.sampled_from([0, 1, 2, 0, 1, 2, 3, -1, True, False, 1.0, 2.0, "1", None]),
        st.one_of(st.sampled_from(TYPES + CAPS), st.sampled_from([None, 1, ["unhashable"], ("tv",)])),
        st.sampled_from([True, False, True, False, 0, 1, None, "", "yes"]),
        st.one_of(st.sampled_from(DEVICES), st.sampled_from([None, None, 3, "zz"])),
    ),
    st.tuples(st.just("count_by_type")),
    st.tuples(st.just("len")),
)


def _apply(table, op, handles):
    name = op[0]
    if name == "add":
        return table.add(op[1], op[2], op[3], op[4], handles[-1])
    if name == "remove":
        return table.remove(op[1], op[2], handles[op[3] % len(handles)])
    if name == "len":
        return len(table)
    return getattr(table, name)(*op[1:])


def _state(table):
    """Everything the public API shows about a table."""
    view = [len(table), table.count_by_type()]
    for user in USERS:
        view.append(table.devices(user))
        for device in DEVICES:
            view.append(table.get(user, device))
        view.append(table.most_recent(user, DEVICES))
        view.append(table.most_recent(user, DEVICES[::-1]))
        for pick_one in (False, True):
            view.append(table.select(user, 0, None, pick_one, None))
            for value in TYPES:
                view.append(table.select(user, 1, value, pick_one, "d1"))
            for value in CAPS:
                view.append(table.select(user, 2, value, pick_one, None))
    return canon(view)


@fuzz(400)
@given(st.lists(OPERATIONS, max_size=40))
def test_routing_table_differential(operations):
    py_table, cy_table = py_routing.RoutingTable(), cy_routing.RoutingTable()
    handles = [Handle("never-added")]
    for index, op in enumerate(operations):
        if op[0] == "add":
            handles.append(Handle(f"h{index}"))
        assert outcome(_apply, cy_table, op, handles) == outcome(_apply, py_table, op, handles), op
    assert _state(cy_table) == _state(py_table)


@ROUTINGS
def test_routing_table_golden(routing):
    table = routing.RoutingTable()
    a, b, c, d = Handle("a"), Handle("b"), Handle("c"), Handle("d")
    assert table.add("u", "d1", "phone", ["clip", "clip", "files"], a) is None
    assert table.add("u", "d2", "laptop", ("clip",), b) is None
    assert table.add("u", "d3", "phone", [], c) is None
    assert table.add("v", "d1", "phone", iter(["clip"]), d) is None
    assert len(table) == 4
    assert table.count_by_type() == {"phone": 3, "laptop": 1}
    assert table.devices("u") == ["d1", "d2", "d3"]
    assert table.select("u", routing.SELECT_ALL, None, False, None) == [a, b, c]
    assert table.select("u", routing.SELECT_ALL, None, False, "d2") == [a, c]
    assert table.select("u", routing.SELECT_TYPE, "phone", False, None) == [a, c]
    assert table.select("u", routing.SELECT_CAPABILITY, "clip", False, None) == [a, b]
    assert table.select("u", routing.SELECT_ALL, None, True, None) == [c]  # most recently added
    table.touch("u", "d1")
    assert table.select("u", routing.SELECT_ALL, None, True, None) == [a]
    assert table.select("u", routing.SELECT_ALL, None, True, "d1") == [c]
    assert table.select("u", routing.SELECT_CAPABILITY, "clip", True, None) == [a]
    assert table.select("w", routing.SELECT_ALL, None, True, None) == []
    assert table.most_recent("u", ["d3", "d2", "d9"]) is c
    assert table.most_recent("u", iter(["d1", "d2"])) is a
    assert table.most_recent("u", []) is None
    assert table.most_recent("w", None) is None  # an unknown user: devices is not even iterated
    # Replacing a device moves it to the end of the insertion order and returns the old handle.
    e = Handle("e")
    assert table.add("u", "d1", "tv", ["files"], e) is a
    assert table.select("u", routing.SELECT_ALL, None, False, None) == [b, c, e]
    assert table.select("u", routing.SELECT_TYPE, "phone", False, None) == [c]
    assert table.select("u", routing.SELECT_CAPABILITY, "clip", False, None) == [b]
    assert table.count_by_type() == {"phone": 2, "laptop": 1, "tv": 1}
    assert table.remove("u", "d1", a) is False
    assert table.remove("u", "d1", e) is True
    assert table.get("u", "d1") is None
    assert table.remove("v", "d1", d) is True
    assert table.devices("v") == []
    assert table.count_by_type() == {"phone": 1, "laptop": 1}
    assert len(table) == 2
    with pytest.raises(ValueError, match=r"^unknown selector kind 7$"):
        table.select("u", 7, None, False, None)
    with pytest.raises(TypeError, match=r"^user, device and device_type must be str$"):
        table.add("u", 1, "tv", [], a)
    with pytest.raises(TypeError, match=r"^capabilities must be str$"):
        table.add("u", "d9", "tv", ["ok", 1], a)
    assert len(table) == 2


# ---- route stats ----------------------------------------------------------------

@ROUTINGS
def test_route_stats_buckets(routing):
    stats = routing.RouteStats()
    latencies = [0, -5, 5000, 5001, 10000, 10001, 25000, 25001, 99_999_999, 100_000_000, 100_000_001, 10**15]
    clamped = [min(max(x, 0), routing.MAX_LATENCY_NS) for x in latencies]
    for i, latency in enumerate(latencies):
        stats.record_route(i % 4, latency)
    stats.count_frames(3, 7)
    stats.count_frames(1, 0)
    assert stats.snapshot() == {
        "results": {"routed": 3, "no_route": 3, "offline": 3, "rejected": 3},
        "latency_buckets": [3, 2, 2, 1, 0, 0, 0, 0, 0, 0, 0, 0, 2, 2],
        "latency_sum_ns": sum(clamped),
        "frames_in": 4,
        "frames_out": 7,
    }
    for bad in (4, -1, 2**70, 1.0, True, None, "1"):
        with pytest.raises(ValueError, match=r"^unknown result "):
            stats.record_route(bad, 1)
    for bad_latency in (1.5, None, "1", True):
        with pytest.raises(TypeError, match=r"^latency_ns must be an int$"):
            stats.record_route(0, bad_latency)
    for frames in ((-1, 0), (0, 2**32), (1.0, 0), (None, 1), (True, 0)):
        with pytest.raises(ValueError, match=r"^frame counts must be ints in"):
            stats.count_frames(*frames)
    assert stats.snapshot()["results"] == {"routed": 3, "no_route": 3, "offline": 3, "rejected": 3}
    empty = routing.RouteStats().snapshot()
    assert empty == {"results": dict.fromkeys(routing.RESULT_NAMES, 0), "latency_buckets": [0] * 14,
                     "latency_sum_ns": 0, "frames_in": 0, "frames_out": 0}


LATENCIES = st.one_of(
    st.integers(-10_000, 200_000_000), st.sampled_from([5000, 5001, 10000, 10001, 100_000_000, 100_000_001]),
    st.integers(-(2**70), 2**70), st.floats(), st.sampled_from([10**400, True, None, "1"]),
)
FRAME_COUNTS = st.one_of(st.integers(-10, 10**6), st.integers(-(2**70), 2**70), st.floats(allow_nan=False),
                         st.sampled_from([None, True, "x", 2**63 - 1]))
STATS_OPERATIONS = st.one_of(
    st.tuples(st.just("record_route"),
              st.one_of(st.integers(-2, 5), st.sampled_from([True, False, 1.0, 2.5, None, "1", 2**70])), LATENCIES),
    st.tuples(st.just("record_route"), st.integers(0, 3), st.integers(0, 10**9)),
    st.tuples(st.just("count_frames"), FRAME_COUNTS, FRAME_COUNTS),
    st.tuples(st.just("count_frames"), st.integers(0, 10), st.integers(0, 10)),
)


@fuzz(300)
@given(st.lists(STATS_OPERATIONS, max_size=25))
def test_route_stats_differential(operations):
    py_stats, cy_stats = py_routing.RouteStats(), cy_routing.RouteStats()
    for op in operations:
        assert outcome(getattr(cy_stats, op[0]), *op[1:]) == outcome(getattr(py_stats, op[0]), *op[1:]), op
        assert canon(cy_stats.snapshot()) == canon(py_stats.snapshot()), op


def test_route_stats_clamps_latency_so_sums_stay_exact():
    py_stats, cy_stats = py_routing.RouteStats(), cy_routing.RouteStats()
    for stats in (py_stats, cy_stats):
        for _ in range(3):
            stats.record_route(0, 2**62)
            stats.record_route(1, 2**70)
            stats.count_frames(2**32 - 1, 0)
    assert canon(cy_stats.snapshot()) == canon(py_stats.snapshot())
    assert cy_stats.snapshot()["latency_sum_ns"] == 6 * py_routing.MAX_LATENCY_NS
    assert cy_stats.snapshot()["frames_in"] == 3 * (2**32 - 1)


# ---- listener ---------------------------------------------------------------------

py_listener = _pure_twin("listener")
if os.environ.get("RCCS_PUREPYTHON") == "1":
    cy_listener = pytest.importorskip("rccs._fastpath._listener")
else:
    from rccs._fastpath import _listener as cy_listener


@pytest.mark.parametrize("length", [0, 1, 125, 126, 127, 65535, 65536, 2**32, 2**40])
@pytest.mark.parametrize("text", [True, False])
def test_frame_header_golden(length, text):
    header = py_listener.frame_header(length, text)
    assert cy_listener.frame_header(length, text) == header
    assert header[0] == (0x81 if text else 0x82)
    if length < 126:
        assert header[1:] == bytes([length])
    elif length < 65536:
        assert header[1:] == b"\x7e" + length.to_bytes(2, "big")
    else:
        assert header[1:] == b"\x7f" + length.to_bytes(8, "big")


@pytest.mark.parametrize("length", [-1, 1.0, None, "3"])
def test_frame_header_refuses_bad_lengths(length):
    for module in (py_listener, cy_listener):
        with pytest.raises(ValueError, match="length must be a non-negative int"):
            module.frame_header(length, True)


def test_listener_twins_expose_the_same_names():
    for name in ("ServerConnection", "WriteCoalescer", "frame_header"):
        assert hasattr(py_listener, name) and hasattr(cy_listener, name)
    for method in ("on_ws_connected", "on_ws_frame", "on_ws_disconnected", "send_frame", "flush", "close",
                   "hello_done"):
        assert hasattr(py_listener.ServerConnection, method) and hasattr(cy_listener.ServerConnection, method)


@fuzz(500)
@given(st.one_of(st.integers(0, 200), st.integers(65_000, 66_000), st.integers(0, 2**63 - 1)), st.booleans())
def test_frame_header_differential(length, text):
    header = cy_listener.frame_header(length, text)
    assert header == py_listener.frame_header(length, text)
    # The shortest form RFC 6455 allows, and it decodes back to the length.
    code = header[1]
    assert code == (length if length < 126 else 126 if length < 65536 else 127)
    if code >= 126:
        assert int.from_bytes(header[2:], "big") == length
    else:
        assert len(header) == 2
