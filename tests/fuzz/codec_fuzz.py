"""Differential fuzzing of the envelope codec: the compiled ``_codec`` and its pure-Python twin get the same
bytes and must agree (the same header, body span and float bits, or the same EnvelopeError message); neither
may raise anything else, recurse without bound or take long. What they accept must also convert to strict
JSON (protocol.md section 6) or be refused as ``unconvertible``, and any text frame must parse to a value
that can be written back as JSON, or be refused as ``bad_request``.

Inputs are msgpack built on purpose (every format, including non-minimal length headers, ext types from
-128 to 127, timestamps of odd lengths, non-string and duplicate keys, NaN, 64-bit edges, invalid UTF-8,
nesting around the 32-level limit), then possibly damaged (bytes flipped, cut, inserted, huge lengths).
"""

from __future__ import annotations

import importlib
import json
import math
import struct
import time
from typing import Any

from hypothesis import strategies as st

import rccs._fastpath
from rccs.errors import ErrorCode, ProtocolError
from rccs.protocol import json_dumps, json_loads, msgpack_body_to_json_value

SLOW_SECONDS = 2.0  # one input through both codecs and the conversions; far above the real cost


def pure_codec():
    """``rccs/_fastpath/codec.py`` itself, whatever the package chose to bind (see tests/fastpath/test_parity)."""
    package = rccs._fastpath
    chosen = package.__dict__.get("codec")
    module = importlib.import_module("rccs._fastpath.codec")
    if chosen is not None:
        package.codec = chosen
    return module


# ---- building msgpack --------------------------------------------------------------------------------------------

def _uint(n: int, width: int) -> bytes:
    return n.to_bytes(width, "big")


def _with_length(n: int, fix: tuple[int, int] | None, codes: tuple[int | None, ...], wide: int) -> bytes:
    """A length header: the fix form when it fits and ``wide`` is 0, else the ``wide``-th wider form."""
    if fix is not None and wide == 0 and n <= fix[1]:
        return bytes([fix[0] | n])
    for index, code in enumerate(codes):
        width = (1, 2, 4)[index]
        if code is not None and n < 256 ** width and index + 1 >= wide:
            return bytes([code]) + _uint(n, width)
    raise ValueError("too long")


def encode(node: Any) -> bytes:
    """msgpack bytes of a tagged node: (tag, value, wide) tuples from ``nodes()``."""
    tag, value, wide = node
    if tag == "nil":
        return b"\xc0"
    if tag == "bool":
        return b"\xc3" if value else b"\xc2"
    if tag == "int":
        if 0 <= value < 128 and wide == 0:
            return bytes([value])
        if -32 <= value < 0 and wide == 0:
            return bytes([value & 0xFF])
        if value >= 0:
            for code, width in ((0xCC, 1), (0xCD, 2), (0xCE, 4), (0xCF, 8)):
                if value < 256 ** width and width >= (1 << wide) // 2:
                    return bytes([code]) + _uint(value, width)
        for code, width in ((0xD0, 1), (0xD1, 2), (0xD2, 4), (0xD3, 8)):
            if -(2 ** (8 * width - 1)) <= value < 2 ** (8 * width - 1):
                return bytes([code]) + value.to_bytes(width, "big", signed=True)
        raise AssertionError(value)
    if tag == "float32":
        return b"\xca" + struct.pack(">f", value)
    if tag == "float64":
        return b"\xcb" + struct.pack(">d", value)
    if tag == "str":  # value: the raw bytes (maybe not UTF-8)
        return _with_length(len(value), (0xA0, 31), (0xD9, 0xDA, 0xDB), wide) + value
    if tag == "bin":
        return _with_length(len(value), None, (0xC4, 0xC5, 0xC6), wide) + value
    if tag == "ext":
        code, data = value
        size = len(data)
        if wide == 0 and size in (1, 2, 4, 8, 16):
            return bytes([0xD4 + (1, 2, 4, 8, 16).index(size), code & 0xFF]) + data
        return _with_length(size, None, (0xC7, 0xC8, 0xC9), wide) + bytes([code & 0xFF]) + data
    if tag == "array":
        return _with_length(len(value), (0x90, 15), (None, 0xDC, 0xDD), wide) + b"".join(encode(v) for v in value)
    if tag == "map":
        return _with_length(len(value), (0x80, 15), (None, 0xDE, 0xDF), wide) + b"".join(
            encode(k) + encode(v) for k, v in value)
    raise AssertionError(tag)


WIDE = st.sampled_from([0, 0, 0, 1, 2, 3])
INT_EDGES = [0, 1, 127, 128, -1, -32, -33, 255, 256, 2**16, 2**31, 2**32, 2**53, 2**63 - 1, 2**63, 2**64 - 1,
             -(2**7), -(2**15) - 1, -(2**31), -(2**63)]
TEXTS = st.one_of(
    st.text(max_size=20).map(lambda s: s.encode("utf-8", "surrogatepass")),  # lone surrogates: not UTF-8
    st.sampled_from([b"op", b"id", b"body", b"to", b"type", b"ack", b"send", b"ping", b"hello", b"device"]),
    st.binary(max_size=12),  # mostly invalid UTF-8
)
SCALARS = st.one_of(
    st.just(("nil", None, 0)),
    st.builds(lambda v: ("bool", v, 0), st.booleans()),
    st.builds(lambda v, w: ("int", v, w), st.one_of(st.sampled_from(INT_EDGES),
                                                    st.integers(-(2**63), 2**64 - 1)), WIDE),
    st.builds(lambda v: ("float64", v, 0), st.floats(allow_nan=True, allow_infinity=True)),
    st.builds(lambda v: ("float32", v, 0), st.floats(width=32, allow_nan=True, allow_infinity=True)),
    st.builds(lambda v, w: ("str", v, w), TEXTS, WIDE),
    st.builds(lambda v, w: ("bin", v, w), st.binary(max_size=12), WIDE),
    st.builds(lambda c, d, w: ("ext", (c, d), w), st.one_of(st.sampled_from([-1, -128, 127, 0]),
                                                           st.integers(-128, 127)),
              st.one_of(st.binary(max_size=20), st.sampled_from([b"\x01\x02\x03", b"\xff" * 12, b"\0" * 8])), WIDE),
)


def nodes(max_leaves: int = 12) -> st.SearchStrategy[Any]:
    return st.recursive(
        SCALARS,
        lambda children: st.one_of(
            st.builds(lambda v, w: ("array", v, w), st.lists(children, max_size=4), WIDE),
            st.builds(lambda v, w: ("map", v, w), st.lists(st.tuples(children, children), max_size=4), WIDE),
        ),
        max_leaves=max_leaves,
    )


def nested(depth: int, leaf: Any, as_map: bool) -> Any:
    node = leaf
    for _ in range(depth):
        node = ("map", [(("str", b"k", 0), node)], 0) if as_map else ("array", [node], 0)
    return node


NODES = nodes()
KEYS = st.one_of(st.sampled_from(["op", "id", "body", "to", "type", "ack", "seq", "doc", "task", "epoch"]),
                 st.text(max_size=6))


@st.composite
def envelopes(draw: st.DrawFn) -> bytes:
    """A msgpack envelope: a map of mostly string keys, values of every kind, sometimes nested near the limit."""
    fields: list[tuple[Any, Any]] = []
    for key in draw(st.lists(KEYS, max_size=6)):
        fields.append((("str", key.encode("utf-8", "surrogatepass"), draw(WIDE)), draw(NODES)))
    if draw(st.booleans()):
        depth = draw(st.integers(28, 36))
        fields.append((("str", b"body", 0), nested(depth, draw(SCALARS), draw(st.booleans()))))
    if draw(st.integers(0, 9)) == 0:  # a key that is not a string
        fields.append((draw(SCALARS), draw(SCALARS)))
    return encode(("map", fields, draw(WIDE)))


HUGE_HEADERS = [b"\xdb\xff\xff\xff\xff", b"\xdd\xff\xff\xff\xff", b"\xdf\xff\xff\xff\xff", b"\xc6\xff\xff\xff\xff",
                b"\xc9\xff\xff\xff\xff\x01", b"\xdc\xff\xff", b"\xde\xff\xff", b"\xc1"]


@st.composite
def damaged(draw: st.DrawFn, source: st.SearchStrategy[bytes]) -> bytes:
    data = bytearray(draw(source))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "insert", "huge", "trail"]))
        at = draw(st.integers(0, len(data)))
        if kind == "flip" and data:
            data[min(at, len(data) - 1)] = draw(st.integers(0, 255))
        elif kind == "cut":
            del data[at:]
        elif kind == "insert":
            data[at:at] = draw(st.binary(min_size=1, max_size=4))
        elif kind == "huge":
            data[at:at] = draw(st.sampled_from(HUGE_HEADERS))
        else:
            data += draw(st.binary(min_size=1, max_size=3))
    return bytes(data)


MSGPACK_INPUTS = st.one_of(envelopes(), damaged(envelopes()), st.binary(max_size=64), st.builds(encode, nodes(20)))


def msgpack_inputs() -> st.SearchStrategy[bytes]:
    return MSGPACK_INPUTS


def json_texts() -> st.SearchStrategy[bytes]:
    """Text frames: JSON with odd numbers, escapes and nesting, sometimes damaged, sometimes not UTF-8."""
    escapes = st.sampled_from(['"\\ud800"', '"\\udfff"', '"\\ud83d\\ude00"', '"\\u0000"', "1e999999", "-1e400",
                               "1e-999", "NaN", "Infinity", "-0", "123456789012345678901234567890", "1.5",
                               "18446744073709551616", "[" * 40 + "]" * 40, '"\\\\ud800"', "true", "null"])
    value = st.recursive(
        st.one_of(escapes, st.text(max_size=8).map(json.dumps), st.integers().map(str)),
        lambda children: st.one_of(
            st.lists(children, max_size=3).map(lambda items: "[" + ",".join(items) + "]"),
            st.lists(st.tuples(st.one_of(st.text(max_size=4).map(json.dumps), escapes.filter(
                lambda e: e.startswith('"'))), children), max_size=3).map(
                lambda pairs: "{" + ",".join(f"{k}:{v}" for k, v in pairs) + "}"),
        ),
        max_leaves=8,
    )
    text = value.map(lambda body: '{"op":"ping","id":' + body + "}")
    return st.one_of(text.map(lambda t: t.encode("utf-8", "surrogatepass")),
                     damaged(text.map(lambda t: t.encode("utf-8", "surrogatepass"))))


# ---- the checks --------------------------------------------------------------------------------------------------

def canon(value: Any) -> Any:
    """A comparable form that tells apart 1, True and 1.0, float bits and dict order."""
    kind = type(value)
    if kind is float:
        return ("float", struct.pack(">d", value))
    if kind is dict:
        return ("dict", [(canon(k), canon(v)) for k, v in value.items()])
    if kind is list:
        return ("list", [canon(v) for v in value])
    return (kind.__name__, value)


def outcome(codec: Any, data: bytes) -> tuple[str, Any]:
    try:
        header, start, end = codec.decode_envelope(data)
    except rccs._fastpath.EnvelopeError as exc:
        return "error", str(exc)
    return "ok", (canon(header), start, end)


def check_msgpack(compiled: Any, pure: Any, data: bytes) -> None:
    """The two codecs agree on ``data``; what they accept converts to strict JSON or is unconvertible."""
    started = time.perf_counter()
    expected = outcome(pure, data)
    if compiled is not None:
        got = outcome(compiled, data)
        assert got == expected, f"codecs disagree on {data.hex()}: compiled {got!r}, pure {expected!r}"
    if expected[0] == "ok":
        _, start, end = expected[1]
        if start >= 0:
            try:
                json_dumps(msgpack_body_to_json_value(data[start:end]))
            except ProtocolError as exc:
                assert exc.code == ErrorCode.UNCONVERTIBLE, (exc.code, data.hex())
    elapsed = time.perf_counter() - started
    assert elapsed < SLOW_SECONDS, f"{elapsed:.1f} s for {len(data)} bytes: {data[:64].hex()}"


def check_json(data: bytes) -> None:
    """A text frame parses to something that writes back as strict JSON, or is refused as bad_request."""
    try:
        value = json_loads(data)
    except ProtocolError as exc:
        assert exc.code == ErrorCode.BAD_REQUEST, (exc.code, data)
        return
    written = json_dumps(value)  # what the server would echo or forward: must not fail
    assert not any(isinstance(v, float) and not math.isfinite(v) for v in _leaves(value)), data
    assert json.loads(written) == value or value != value, data  # NaN never gets here


def _leaves(value: Any) -> list[Any]:
    if isinstance(value, dict):
        return [leaf for item in value.values() for leaf in _leaves(item)]
    if isinstance(value, list):
        return [leaf for item in value for leaf in _leaves(item)]
    return [value]
