import math

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rccs.errors import ErrorCode, ProtocolError
from rccs.protocol import json_loads, json_value_to_msgpack, msgpack_body_to_json_value, parse_selector, to_json_value


def test_msgpack_only_values_have_documented_json_forms():
    raw = msgpack.packb({"b": b"\x01\x02", 2: "two", None: 0, True: 1, "e": msgpack.ExtType(3, b"z"),
                         "nan": math.nan, "inf": -math.inf})
    assert msgpack_body_to_json_value(raw) == {"b": "AQI=", "2": "two", "null": 0, "true": 1,
                                               "e": {"$ext": 3, "data": "eg=="}, "nan": None, "inf": None}


def test_timestamp_ext_becomes_ext_minus_one():
    raw = msgpack.packb(msgpack.Timestamp(1, 0))
    value = msgpack_body_to_json_value(raw)
    assert value["$ext"] == -1


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text(),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_json_values_survive_a_trip_through_msgpack(value):
    assert msgpack_body_to_json_value(json_value_to_msgpack(value)) == to_json_value(value)


def test_huge_json_int_is_unconvertible():
    with pytest.raises(ProtocolError) as info:
        json_value_to_msgpack(2**64)
    assert info.value.code == ErrorCode.UNCONVERTIBLE


@pytest.mark.parametrize("text", [b"{", b"NaN", b'{"a": Infinity}', b"\xff"])
def test_strict_json(text):
    with pytest.raises(ProtocolError) as info:
        json_loads(text)
    assert info.value.code == ErrorCode.BAD_REQUEST


def test_selector_options():
    selector = parse_selector({"type": "desktop", "pick": "one", "self": True})
    assert (selector.kind, selector.value, selector.pick_one, selector.include_self) == ("type",
                                                                                          "desktop", True, True)
    assert parse_selector({"devices": ["a", "a", "b"]}).value == ["a", "b"]
