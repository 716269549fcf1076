"""Envelope codec, pure-Python twin of ``_codec.pyx``.

Theory of operation: a msgpack envelope is a map. The router needs every
top-level field *except* ``body`` (the routing header), and must forward
``body`` byte-for-byte to receivers that speak msgpack. So the decoder walks
the map once: header values are decoded into Python objects, the ``body``
value is only validated (well-formed msgpack, valid UTF-8 in strings, bounded
nesting) and returned as a byte span into the original frame.

Both implementations must give the same results and raise ``EnvelopeError``
with the same message for the same input; ``tests/fastpath`` checks that.
"""

from __future__ import annotations

import struct

from .errors import EnvelopeError

MAX_DEPTH = 32

_FLOAT32 = struct.Struct(">f")
_FLOAT64 = struct.Struct(">d")

ERR_TRUNCATED = "truncated msgpack data"
ERR_DEPTH = "msgpack nesting deeper than 32 levels"
ERR_TRAILING = "trailing bytes after the envelope"
ERR_NOT_MAP = "envelope must be a map"
ERR_KEY_TYPE = "envelope keys must be strings"
ERR_UTF8 = "invalid UTF-8 in a msgpack string"
ERR_EXT_IN_HEADER = "ext types are only allowed inside body"
ERR_HEADER_MAP_KEY = "map keys outside body must be strings"
ERR_BIN_IN_HEADER = "binary values are only allowed inside body"
ERR_TIMESTAMP = "invalid msgpack timestamp in body"

_TIMESTAMP_TYPE = 0xFF  # ext type -1
_MAX_NANOSECONDS = 999_999_999


def _invalid_byte(b: int) -> str:
    return f"invalid msgpack type byte 0x{b:02x}"


def _need(data: bytes, pos: int, n: int) -> None:
    if pos + n > len(data):
        raise EnvelopeError(ERR_TRUNCATED)


def _uint(data: bytes, pos: int, n: int) -> int:
    _need(data, pos, n)
    return int.from_bytes(data[pos:pos + n], "big")


def _container_len(data: bytes, pos: int, b: int) -> tuple[int, int, int]:
    """For a map/array type byte: (kind, length, position after the length). kind 1=map 2=array."""
    if 0x80 <= b <= 0x8F:
        return 1, b & 0x0F, pos
    if 0x90 <= b <= 0x9F:
        return 2, b & 0x0F, pos
    if b == 0xDC:
        return 2, _uint(data, pos, 2), pos + 2
    if b == 0xDD:
        return 2, _uint(data, pos, 4), pos + 4
    if b == 0xDE:
        return 1, _uint(data, pos, 2), pos + 2
    if b == 0xDF:
        return 1, _uint(data, pos, 4), pos + 4
    return 0, 0, pos


def _str_len(data: bytes, pos: int, b: int) -> tuple[int, int]:
    """For a str type byte: (length, position after the length); length -1 if not a str."""
    if 0xA0 <= b <= 0xBF:
        return b & 0x1F, pos
    if b == 0xD9:
        return _uint(data, pos, 1), pos + 1
    if b == 0xDA:
        return _uint(data, pos, 2), pos + 2
    if b == 0xDB:
        return _uint(data, pos, 4), pos + 4
    return -1, pos


def _read_str(data: bytes, pos: int, n: int) -> str:
    _need(data, pos, n)
    try:
        return data[pos:pos + n].decode("utf-8")
    except UnicodeDecodeError:
        raise EnvelopeError(ERR_UTF8) from None


def _check_timestamp(data: bytes, pos: int, n: int) -> None:
    """Refuse an ext -1 payload ``data[pos:pos + n]`` (known to be there) that is no msgpack timestamp.

    Bodies are forwarded byte for byte, and standard msgpack decoders refuse a whole message holding an
    invalid timestamp: the receiver would lose the envelope, and an ack:true one would be redelivered until
    dead-lettered. So the sender is told instead.
    """
    if n == 4:
        return
    if n == 8:
        nanoseconds = int.from_bytes(data[pos:pos + 4], "big") >> 2
    elif n == 12:
        nanoseconds = int.from_bytes(data[pos:pos + 4], "big")
    else:
        raise EnvelopeError(f"{ERR_TIMESTAMP}: ext -1 of {n} bytes (a timestamp has 4, 8 or 12)")
    if nanoseconds > _MAX_NANOSECONDS:
        raise EnvelopeError(f"{ERR_TIMESTAMP}: {nanoseconds} nanoseconds (at most {_MAX_NANOSECONDS})")


def skip_value(data: bytes, pos: int, depth: int) -> int:
    """Validate the msgpack value at ``pos`` (nested ``depth`` levels deep) and return the position after it."""
    if type(data) is not bytes:
        raise TypeError("skip_value() needs bytes")
    if type(pos) is not int or type(depth) is not int or pos < 0 or depth < 0:
        raise ValueError("pos and depth must be non-negative ints")
    return _skip(data, pos, depth)


def _skip(data: bytes, pos: int, depth: int) -> int:
    if depth > MAX_DEPTH:
        raise EnvelopeError(ERR_DEPTH)
    _need(data, pos, 1)
    b = data[pos]
    pos += 1
    if b <= 0x7F or b >= 0xE0 or b in (0xC0, 0xC2, 0xC3):
        return pos
    n, p = _str_len(data, pos, b)
    if n >= 0:
        _read_str(data, p, n)
        return p + n
    kind, count, p = _container_len(data, pos, b)
    if kind:
        items = count * 2 if kind == 1 else count
        for _ in range(items):
            p = _skip(data, p, depth + 1)
        return p
    if b in (0xC4, 0xC5, 0xC6):
        width = 1 << (b - 0xC4)
        n = _uint(data, pos, width)
        _need(data, pos + width, n)
        return pos + width + n
    if b in (0xC7, 0xC8, 0xC9):
        width = 1 << (b - 0xC7)
        n = _uint(data, pos, width)
        _need(data, pos + width, n + 1)
        if data[pos + width] == _TIMESTAMP_TYPE:
            _check_timestamp(data, pos + width + 1, n)
        return pos + width + 1 + n
    if 0xD4 <= b <= 0xD8:
        n = 1 << (b - 0xD4)
        _need(data, pos, n + 1)
        if data[pos] == _TIMESTAMP_TYPE:
            _check_timestamp(data, pos + 1, n)
        return pos + 1 + n
    if b in (0xCA, 0xCE, 0xD2):
        _need(data, pos, 4)
        return pos + 4
    if b in (0xCB, 0xCF, 0xD3):
        _need(data, pos, 8)
        return pos + 8
    if b in (0xCC, 0xD0):
        _need(data, pos, 1)
        return pos + 1
    if b in (0xCD, 0xD1):
        _need(data, pos, 2)
        return pos + 2
    raise EnvelopeError(_invalid_byte(b))


def _decode_value(data: bytes, pos: int, depth: int) -> tuple[object, int]:
    """Decode a header value: nil, bool, int, float, str, array, map with str keys."""
    if depth > MAX_DEPTH:
        raise EnvelopeError(ERR_DEPTH)
    _need(data, pos, 1)
    b = data[pos]
    pos += 1
    if b <= 0x7F:
        return b, pos
    if b >= 0xE0:
        return b - 0x100, pos
    if b == 0xC0:
        return None, pos
    if b == 0xC2:
        return False, pos
    if b == 0xC3:
        return True, pos
    n, p = _str_len(data, pos, b)
    if n >= 0:
        return _read_str(data, p, n), p + n
    kind, count, p = _container_len(data, pos, b)
    if kind == 2:
        items: list[object] = []
        for _ in range(count):
            item, p = _decode_value(data, p, depth + 1)
            items.append(item)
        return items, p
    if kind == 1:
        mapping: dict[str, object] = {}
        for _ in range(count):
            _need(data, p, 1)
            kn, kp = _str_len(data, p + 1, data[p])
            if kn < 0:
                raise EnvelopeError(ERR_HEADER_MAP_KEY)
            key = _read_str(data, kp, kn)
            value, p = _decode_value(data, kp + kn, depth + 1)
            mapping[key] = value
        return mapping, p
    if 0xCC <= b <= 0xCF:
        width = 1 << (b - 0xCC)
        return _uint(data, pos, width), pos + width
    if 0xD0 <= b <= 0xD3:
        width = 1 << (b - 0xD0)
        _need(data, pos, width)
        return int.from_bytes(data[pos:pos + width], "big", signed=True), pos + width
    if b == 0xCA:
        _need(data, pos, 4)
        return _FLOAT32.unpack_from(data, pos)[0], pos + 4
    if b == 0xCB:
        _need(data, pos, 8)
        return _FLOAT64.unpack_from(data, pos)[0], pos + 8
    if b in (0xC4, 0xC5, 0xC6):
        raise EnvelopeError(ERR_BIN_IN_HEADER)
    if 0xC7 <= b <= 0xC9 or 0xD4 <= b <= 0xD8:
        raise EnvelopeError(ERR_EXT_IN_HEADER)
    raise EnvelopeError(_invalid_byte(b))


def decode_envelope(data: bytes) -> tuple[dict[str, object], int, int]:
    """Decode a msgpack envelope.

    Returns ``(header, body_start, body_end)``: ``header`` holds every
    top-level field except ``body``; ``data[body_start:body_end]`` is the
    ``body`` value's msgpack encoding, untouched (``-1, -1`` when absent).
    Raises ``EnvelopeError`` for anything that is not one well-formed map.
    """
    if not isinstance(data, bytes):
        raise TypeError("decode_envelope() needs bytes")
    _need(data, 0, 1)
    kind, count, pos = _container_len(data, 1, data[0])
    if kind != 1:
        raise EnvelopeError(ERR_NOT_MAP)
    header: dict[str, object] = {}
    body_start = body_end = -1
    for _ in range(count):
        _need(data, pos, 1)
        kn, kp = _str_len(data, pos + 1, data[pos])
        if kn < 0:
            raise EnvelopeError(ERR_KEY_TYPE)
        key = _read_str(data, kp, kn)
        pos = kp + kn
        if key == "body":
            body_start = pos
            pos = _skip(data, pos, 1)
            body_end = pos
        else:
            header[key], pos = _decode_value(data, pos, 1)
    if pos != len(data):
        raise EnvelopeError(ERR_TRAILING)
    return header, body_start, body_end


def _pack_uint_header(out: bytearray, n: int, fix: int, fix_max: int, b8: int | None, b16: int, b32: int) -> None:
    if n <= fix_max:
        out.append(fix | n)
    elif b8 is not None and n <= 0xFF:
        out.append(b8)
        out.append(n)
    elif n <= 0xFFFF:
        out.append(b16)
        out += n.to_bytes(2, "big")
    else:
        out.append(b32)
        out += n.to_bytes(4, "big")


def _pack_str(out: bytearray, value: str) -> None:
    raw = value.encode("utf-8")
    if len(raw) > 0xFFFFFFFF:
        raise ValueError("string too long for msgpack")
    _pack_uint_header(out, len(raw), 0xA0, 31, 0xD9, 0xDA, 0xDB)
    out += raw


def _pack_int(out: bytearray, value: int) -> None:
    if 0 <= value <= 0x7F:
        out.append(value)
    elif -32 <= value < 0:
        out.append(value & 0xFF)
    elif 0 < value <= 0xFF:
        out.append(0xCC)
        out.append(value)
    elif 0 < value <= 0xFFFF:
        out.append(0xCD)
        out += value.to_bytes(2, "big")
    elif 0 < value <= 0xFFFFFFFF:
        out.append(0xCE)
        out += value.to_bytes(4, "big")
    elif 0 < value <= 0xFFFFFFFFFFFFFFFF:
        out.append(0xCF)
        out += value.to_bytes(8, "big")
    elif -0x80 <= value < 0:
        out.append(0xD0)
        out += value.to_bytes(1, "big", signed=True)
    elif -0x8000 <= value < 0:
        out.append(0xD1)
        out += value.to_bytes(2, "big", signed=True)
    elif -0x80000000 <= value < 0:
        out.append(0xD2)
        out += value.to_bytes(4, "big", signed=True)
    elif -0x8000000000000000 <= value < 0:
        out.append(0xD3)
        out += value.to_bytes(8, "big", signed=True)
    else:
        raise OverflowError("integer out of msgpack range")


def _pack_scalar(out: bytearray, value: object) -> None:
    if value is None:
        out.append(0xC0)
    elif value is True:
        out.append(0xC3)
    elif value is False:
        out.append(0xC2)
    elif type(value) is int:
        _pack_int(out, value)
    elif type(value) is str:
        _pack_str(out, value)
    else:
        raise TypeError("only None, bool, int and str can be packed here")


def _pack_msg(msg_id: object, sender: str, app_type: str, body: bytes, ts: int, ack: bool) -> bytearray:
    """A ``msg`` envelope up to its ``ack`` field; the map header announces 8 entries (``seq`` is the last)."""
    if type(sender) is not str or type(app_type) is not str:
        raise TypeError("sender and app_type must be str")
    if type(ts) is not int:
        raise TypeError("ts must be int")
    if type(body) is not bytes:
        raise TypeError("body must be bytes")
    out = bytearray(b"\x88\xa2op\xa3msg\xa2id")
    _pack_scalar(out, msg_id)
    out += b"\xa4from"
    _pack_str(out, sender)
    out += b"\xa4type"
    _pack_str(out, app_type)
    out += b"\xa4body"
    out += body
    out += b"\xa2ts"
    _pack_int(out, ts)
    out += b"\xa3ack"
    out.append(0xC3 if ack else 0xC2)
    return out


def _pack_seq(out: bytearray, seq: int) -> bytes:
    if type(seq) is not int or seq < 0:
        raise ValueError("seq must be a non-negative int")
    out += b"\xa3seq"
    _pack_int(out, seq)
    return bytes(out)


def encode_msg_prefix(msg_id: object, sender: str, app_type: str, body: bytes, ts: int, ack: bool) -> bytes:
    """Encode a ``msg`` envelope without its ``seq``, once for every receiver.

    ``body`` is an already-encoded msgpack value and is copied untouched.
    The map header announces 8 entries; ``append_seq`` adds the last one.
    """
    return bytes(_pack_msg(msg_id, sender, app_type, body, ts, ack))


def encode_msg(msg_id: object, sender: str, app_type: str, body: bytes, ts: int, ack: bool, seq: int) -> bytes:
    """A whole ``msg`` envelope for one receiver: ``append_seq(encode_msg_prefix(...), seq)``, same errors.

    The compiled twin writes it in one buffer (the body copied once); the direct path uses it.
    """
    return _pack_seq(_pack_msg(msg_id, sender, app_type, body, ts, ack), seq)


def append_seq(prefix: bytes, seq: int) -> bytes:
    """Complete a ``msg`` envelope from ``encode_msg_prefix`` with its per-session ``seq``."""
    if type(seq) is not int or seq < 0:
        raise ValueError("seq must be a non-negative int")
    if type(prefix) is not bytes:
        raise TypeError("prefix must be bytes")
    return _pack_seq(bytearray(prefix), seq)
