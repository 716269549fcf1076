"""Protocol v1 vocabulary shared by the server and the client: ops, limits,
encodings, selector parsing and body conversion between msgpack and JSON.

``docs/protocol.md`` is the contract; this module is its executable form.
"""

from __future__ import annotations

import base64
import json
import math
import re
import struct
from dataclasses import dataclass
from typing import Any, NamedTuple

import msgpack

from .errors import ErrorCode, ProtocolError

PROTOCOL_VERSION = 1
WS_PATH = "/v1"

MSGPACK = "msgpack"
JSON = "json"

MAX_ID_CHARS = 128  # client message ids (str) and application types
MAX_DEVICE_TEXT_CHARS = 256  # device name, platform, version
MAX_CAPABILITIES = 64
MAX_CAPABILITY_CHARS = 64
MAX_SELECTOR_DEVICES = 256
MAX_ACK_BATCH = 4096

SELECTOR_KEYS = ("device", "devices", "all", "type", "capability")

# msgpack ext types have no JSON form; a JSON receiver gets this object instead.
EXT_MARKER = "$ext"
EXT_DATA = "data"

NIL = b"\xc0"


def json_dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON; the server only emits standard JSON (no NaN)."""
    return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode("utf-8")


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    number = float(text)
    if not math.isfinite(number):  # 1e999999: JSON has no infinity, and no receiver could get it back
        raise ValueError(f"number {text[:32]} is out of range")
    return number


# A \u escape of a surrogate (U+D800..U+DFFF): the only way a JSON text can carry a lone one, which no
# UTF-8 frame can hold. Pairs are joined by the parser; what is left after it is refused.
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")


def _has_lone_surrogate(value: Any) -> bool:
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return True
        return False
    if isinstance(value, dict):
        return any(_has_lone_surrogate(key) or _has_lone_surrogate(item) for key, item in value.items())
    if isinstance(value, list):
        return any(_has_lone_surrogate(item) for item in value)
    return False


def json_loads(data: bytes) -> Any:
    """Parse a text frame; raises ProtocolError(bad_request) for anything that is not strict JSON
    (NaN, infinities, numbers too large for a float, lone surrogates included)."""
    try:
        # Decoded first: json.loads would take UTF-16 and UTF-32 bytes too, and a text frame is UTF-8.
        text = data.decode("utf-8")
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except UnicodeDecodeError:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "text frame is not valid UTF-8") from None
    except (ValueError, RecursionError) as exc:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"malformed JSON: {exc}") from None
    if _SURROGATE_ESCAPE.search(text) is not None and _has_lone_surrogate(value):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "malformed JSON: a \\u escape of a lone surrogate")
    return value


def _json_key(key: Any) -> str:
    if isinstance(key, str):
        return key
    if isinstance(key, bytes | bytearray):
        return base64.b64encode(key).decode("ascii")
    return json.dumps(to_json_value(key), separators=(",", ":"))


def to_json_value(value: Any) -> Any:
    """Turn a decoded msgpack value into one JSON can carry (see docs/protocol.md, "Encodings").

    bin -> base64 string; ext (incl. timestamps) -> {"$ext": type, "data": base64};
    non-string map keys -> their JSON text; NaN and infinities -> null.
    """
    if value is None or isinstance(value, bool | int | str):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, bytes | bytearray):
        return base64.b64encode(value).decode("ascii")
    if isinstance(value, msgpack.ExtType):  # a tuple subclass: test it before tuples
        return {EXT_MARKER: value.code, EXT_DATA: base64.b64encode(value.data).decode("ascii")}
    if isinstance(value, list | tuple):
        return [to_json_value(item) for item in value]
    if isinstance(value, dict):
        return {_json_key(k): to_json_value(v) for k, v in value.items()}
    if isinstance(value, msgpack.Timestamp):
        return {EXT_MARKER: -1, EXT_DATA: base64.b64encode(value.to_bytes()).decode("ascii")}
    raise TypeError(f"unexpected msgpack value of type {type(value).__name__}")


# Conversion deeper than this is refused (unconvertible): bodies are at most 32 levels (the codec checks), a
# whole stored frame one more; the bound only keeps a corrupt input from exhausting the stack.
MAX_CONVERT_DEPTH = 64
_FLOAT32 = struct.Struct(">f")
_FLOAT64 = struct.Struct(">d")


def _unconvertible(why: str) -> ProtocolError:
    return ProtocolError(ErrorCode.UNCONVERTIBLE, f"body cannot be expressed in JSON: {why}")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _length(data: bytes, pos: int, width: int) -> tuple[int, int]:
    end = pos + width
    if end > len(data):
        raise _unconvertible("truncated msgpack data")
    return int.from_bytes(data[pos:end], "big"), end


def _take(data: bytes, pos: int, n: int) -> tuple[bytes, int]:
    end = pos + n
    if end > len(data):
        raise _unconvertible("truncated msgpack data")
    return data[pos:end], end


def _json_value_at(data: bytes, pos: int, depth: int) -> tuple[Any, int]:
    """The JSON form of the msgpack value at ``pos`` (section 6), read straight from the bytes: every ext
    type (the timestamp too, whatever its length) keeps its payload as it is, and map keys keep their
    identity (msgpack's own decoder would fold ``1`` and ``true`` into one Python key)."""
    if depth > MAX_CONVERT_DEPTH:
        raise _unconvertible("nested too deeply")
    if pos >= len(data):
        raise _unconvertible("truncated msgpack data")
    b = data[pos]
    pos += 1
    if b <= 0x7F:
        return b, pos
    if b >= 0xE0:
        return b - 0x100, pos
    if 0xA0 <= b <= 0xBF or b in (0xD9, 0xDA, 0xDB):
        if b <= 0xBF:
            n = b & 0x1F
        else:
            n, pos = _length(data, pos, 1 << (b - 0xD9))
        raw, pos = _take(data, pos, n)
        try:
            return raw.decode("utf-8"), pos
        except UnicodeDecodeError:
            raise _unconvertible("invalid UTF-8") from None
    if 0x90 <= b <= 0x9F or b in (0xDC, 0xDD):
        count, pos = (b & 0x0F, pos) if b <= 0x9F else _length(data, pos, 2 if b == 0xDC else 4)
        items = []
        for _ in range(count):
            item, pos = _json_value_at(data, pos, depth + 1)
            items.append(item)
        return items, pos
    if 0x80 <= b <= 0x8F or b in (0xDE, 0xDF):
        count, pos = (b & 0x0F, pos) if b <= 0x8F else _length(data, pos, 2 if b == 0xDE else 4)
        mapping: dict[str, Any] = {}
        for _ in range(count):
            key_is_text = 0xA0 <= data[pos] <= 0xBF or data[pos] in (0xC4, 0xC5, 0xC6, 0xD9, 0xDA, 0xDB) \
                if pos < len(data) else True
            key, pos = _json_value_at(data, pos, depth + 1)
            if not key_is_text:
                key = json.dumps(key, separators=(",", ":"), ensure_ascii=False)
            if key in mapping:
                raise _unconvertible(f"two keys of one map are both {key[:64]!r} in JSON")
            mapping[key], pos = _json_value_at(data, pos, depth + 1)
        return mapping, pos
    if b == 0xC0:
        return None, pos
    if b in (0xC2, 0xC3):
        return b == 0xC3, pos
    if b in (0xC4, 0xC5, 0xC6):
        n, pos = _length(data, pos, 1 << (b - 0xC4))
        raw, pos = _take(data, pos, n)
        return _b64(raw), pos
    if b in (0xC7, 0xC8, 0xC9) or 0xD4 <= b <= 0xD8:
        if b >= 0xD4:
            n = 1 << (b - 0xD4)
        else:
            n, pos = _length(data, pos, 1 << (b - 0xC7))
        code, pos = _take(data, pos, 1)
        raw, pos = _take(data, pos, n)
        return {EXT_MARKER: int.from_bytes(code, "big", signed=True), EXT_DATA: _b64(raw)}, pos
    if b in (0xCA, 0xCB):
        raw, pos = _take(data, pos, 4 if b == 0xCA else 8)
        number = (_FLOAT32 if b == 0xCA else _FLOAT64).unpack(raw)[0]
        return (number if math.isfinite(number) else None), pos
    if 0xCC <= b <= 0xD3:
        width = 1 << ((b - 0xCC) & 3)
        raw, pos = _take(data, pos, width)
        return int.from_bytes(raw, "big", signed=b >= 0xD0), pos
    raise _unconvertible(f"invalid msgpack type byte 0x{b:02x}")


def msgpack_body_to_json_value(raw: bytes) -> Any:
    """A msgpack body (or a whole msgpack frame) as a JSON-safe value (section 6).

    Raises ProtocolError(unconvertible) when it has no JSON form: two keys of one map that come out the
    same in JSON (``1`` and ``"1"``, or one key twice), or bytes that are not one msgpack value.
    """
    value, end = _json_value_at(raw, 0, 0)
    if end != len(raw):
        raise _unconvertible("trailing bytes")
    return value


def json_value_to_msgpack(value: Any) -> bytes:
    """Encode a JSON body for a msgpack receiver; integers beyond 64 bits cannot go."""
    try:
        packed: bytes = msgpack.packb(value, use_bin_type=True)
    except (OverflowError, ValueError, TypeError) as exc:
        raise ProtocolError(ErrorCode.UNCONVERTIBLE, f"body cannot be encoded as msgpack: {exc}") from None
    return packed


class Selector(NamedTuple):
    """A parsed ``to``. ``kind`` is one of SELECTOR_KEYS; ``value`` a device id, list, True or a name."""

    kind: str
    value: Any
    pick_one: bool
    include_self: bool


def _text(value: Any, field: str, limit: int) -> str:
    if not isinstance(value, str) or not value:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{field}' must be a non-empty string")
    if len(value) > limit:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"'{field}' is longer than {limit} characters")
    return value


def parse_selector(to: Any) -> Selector:
    if not isinstance(to, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'to' must be a map naming a selector")
    present = [key for key in SELECTOR_KEYS if key in to]
    if len(present) != 1:
        raise ProtocolError(
            ErrorCode.BAD_REQUEST, "'to' must hold exactly one of 'device', 'devices', 'all', 'type', 'capability'"
        )
    kind = present[0]
    value = to[kind]
    if kind == "device":
        value = _text(value, "to.device", MAX_ID_CHARS)
    elif kind == "devices":
        if not isinstance(value, list) or not value:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'to.devices' must be a non-empty list of device ids")
        if len(value) > MAX_SELECTOR_DEVICES:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"'to.devices' lists more than {MAX_SELECTOR_DEVICES} devices")
        value = list(dict.fromkeys(_text(item, "to.devices[]", MAX_ID_CHARS) for item in value))
    elif kind == "all":
        if value is not True:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'to.all' must be true")
    elif kind == "type":
        value = _text(value, "to.type", MAX_ID_CHARS)
    else:
        value = _text(value, "to.capability", MAX_CAPABILITY_CHARS)
    pick = to.get("pick", "all")
    if pick not in ("all", "one"):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'to.pick' must be \"all\" or \"one\"")
    include_self = to.get("self", False)
    if not isinstance(include_self, bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'to.self' must be a boolean")
    return Selector(kind, value, pick == "one", include_self)


def selector_order(to: Any, selector: Selector) -> str:
    """``to.order``: which device a pick-one work item moves to next ("recent" or, for ``devices``, "listed")."""
    order = to.get("order", "recent") if isinstance(to, dict) else "recent"
    if order not in ("recent", "listed") or (order == "listed" and selector.kind != "devices"):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'to.order' must be \"recent\", or \"listed\" with 'devices'")
    return str(order)


def parse_resume(resume: Any) -> tuple[str, int] | None:
    """A hello's ``resume``: (session id, last_seq), or None when there is none."""
    if resume is None:
        return None
    if not isinstance(resume, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'resume' must be a map with 'session' and 'last_seq'")
    session_id = resume.get("session")
    last_seq = resume.get("last_seq", 0)
    if not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_ID_CHARS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'resume.session' must be a session id string")
    if not isinstance(last_seq, int) or isinstance(last_seq, bool) or not 0 <= last_seq < 2**53:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'resume.last_seq' must be a non-negative integer")
    return session_id, last_seq


def receipt(msg_id: str | int, status: str, device: str | None = None, reason: str | None = None) -> dict[str, Any]:
    """A ``receipt`` envelope for a sender (docs/protocol.md section 5)."""
    envelope: dict[str, Any] = {"op": "receipt", "id": msg_id, "status": status}
    if device is not None:
        envelope["device"] = device
    if reason is not None:
        envelope["reason"] = reason
    return envelope


MAX_TASK_CHARS = 256


def parse_task_name(header: dict[str, Any]) -> str:
    """An op's ``task``: a non-empty string of at most MAX_TASK_CHARS characters."""
    name = header.get("task")
    if not isinstance(name, str) or not name:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'task' must be a non-empty string")
    if len(name) > MAX_TASK_CHARS:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"'task' is longer than {MAX_TASK_CHARS} characters")
    return name


def parse_epoch(header: dict[str, Any]) -> int:
    """An op's ``epoch``: the lease's fencing token, an integer >= 1."""
    value = header.get("epoch")
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value < 2**63:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'epoch' must be the lease's epoch: an integer >= 1")
    return value


def parse_fence(header: dict[str, Any]) -> tuple[str, int] | None:
    """``task`` and ``epoch`` of an op that acts for a task (a fenced ``state.patch``), or None."""
    if "task" not in header and "epoch" not in header:
        return None
    return parse_task_name(header), parse_epoch(header)


def check_message_id(value: Any) -> str | int:
    """Client ids: a non-empty string of at most 128 characters, or a 64-bit integer."""
    if isinstance(value, bool) or value is None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'id' is required: a string or an integer")
    if isinstance(value, int):
        if not -(2**63) <= value < 2**64:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'id' integer out of 64-bit range")
        return value
    return _text(value, "id", MAX_ID_CHARS)


@dataclass(frozen=True, slots=True)
class DeviceInfo:
    type: str
    name: str
    platform: str
    version: str
    capabilities: tuple[str, ...]

    def as_dict(self) -> dict[str, Any]:
        return {
            "type": self.type,
            "name": self.name,
            "platform": self.platform,
            "version": self.version,
            "capabilities": list(self.capabilities),
        }


def parse_device_info(device: Any) -> DeviceInfo:
    if not isinstance(device, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'device' must be a map with at least 'type'")
    device_type = _text(device.get("type"), "device.type", MAX_ID_CHARS)
    texts = []
    for field in ("name", "platform", "version"):
        value = device.get(field, "")
        if not isinstance(value, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"'device.{field}' must be a string")
        if len(value) > MAX_DEVICE_TEXT_CHARS:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"'device.{field}' is longer than {MAX_DEVICE_TEXT_CHARS}")
        texts.append(value)
    capabilities = device.get("capabilities", [])
    if not isinstance(capabilities, list):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'device.capabilities' must be a list of strings")
    if len(capabilities) > MAX_CAPABILITIES:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"more than {MAX_CAPABILITIES} capabilities")
    caps = tuple(dict.fromkeys(_text(cap, "device.capabilities[]", MAX_CAPABILITY_CHARS) for cap in capabilities))
    return DeviceInfo(device_type, texts[0], texts[1], texts[2], caps)


DEVICE_TEXT_FIELDS = ("name", "platform", "version")


def parse_device_fields(device: Any, max_metadata_bytes: int, require_type: bool) -> dict[str, Any]:
    """The fields of a ``device`` map that are present, validated: type, name, platform, version,
    capabilities (a tuple), metadata (a JSON-compatible dict of at most ``max_metadata_bytes`` as JSON)."""
    if not isinstance(device, dict):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'device' must be a map")
    fields: dict[str, Any] = {}
    if "type" in device or require_type:
        fields["type"] = _text(device.get("type"), "device.type", MAX_ID_CHARS)
    for field in DEVICE_TEXT_FIELDS:
        if field in device:
            value = device[field]
            if not isinstance(value, str):
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"'device.{field}' must be a string")
            if len(value) > MAX_DEVICE_TEXT_CHARS:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"'device.{field}' is longer than {MAX_DEVICE_TEXT_CHARS}")
            fields[field] = value
    if "capabilities" in device:
        capabilities = device["capabilities"]
        if not isinstance(capabilities, list):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'device.capabilities' must be a list of strings")
        if len(capabilities) > MAX_CAPABILITIES:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"more than {MAX_CAPABILITIES} capabilities")
        fields["capabilities"] = tuple(
            dict.fromkeys(_text(cap, "device.capabilities[]", MAX_CAPABILITY_CHARS) for cap in capabilities)
        )
    if "metadata" in device:
        metadata = device["metadata"]
        if not isinstance(metadata, dict) or not all(isinstance(key, str) for key in metadata):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'device.metadata' must be a map with string keys")
        try:
            metadata = to_json_value(metadata)
            size = len(json_dumps(metadata))
        except (TypeError, ValueError, RecursionError):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'device.metadata' must be JSON-compatible") from None
        if size > max_metadata_bytes:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"'device.metadata' is larger than {max_metadata_bytes} bytes")
        fields["metadata"] = metadata
    return fields


def convert_frame(frame: bytes, text: bool) -> bytes:
    """A whole server envelope in the other encoding (for redelivery after a resume that switched encoding).

    Raises ProtocolError(unconvertible) when the msgpack form cannot carry a JSON value.
    """
    if text:
        return json_value_to_msgpack(json_loads(frame))
    return json_dumps(msgpack_body_to_json_value(frame))


PRIORITIES = {"LOW": 0, "NORMAL": 1, "HIGH": 2, "URGENT": 3, "EMERGENCY": 4}


def parse_delivery_options(header: dict[str, Any], default_ttl: float, max_ttl: float) -> tuple[float, int, bool]:
    """(ttl seconds, priority 0..4, durable) of a send."""
    ttl = header.get("ttl", default_ttl)
    if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl > max_ttl:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"'ttl' is longer than the server's max_ttl ({max_ttl:g} s)")
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not math.isfinite(ttl) or ttl <= 0:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'ttl' must be a positive number of seconds")
    if ttl > max_ttl:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"'ttl' is longer than the server's max_ttl ({max_ttl:g} s)")
    priority = header.get("priority", PRIORITIES["NORMAL"])
    if isinstance(priority, str):
        if priority.upper() not in PRIORITIES:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"'priority' must be 0..4 or one of {', '.join(PRIORITIES)}")
        priority = PRIORITIES[priority.upper()]
    elif isinstance(priority, bool) or not isinstance(priority, int) or not 0 <= priority <= 4:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'priority' must be 0..4 or one of {', '.join(PRIORITIES)}")
    durable = header.get("durable", False)
    if not isinstance(durable, bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'durable' must be a boolean")
    if durable and header.get("ack") is not True:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'durable' needs 'ack': true (receipts say what happened)")
    return float(ttl), priority, durable
