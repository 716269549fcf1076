"""Envelope codec, compiled twin of ``codec.py``.

Same names, same results, same exceptions (class and message) as the
pure-Python module; read its docstring for the theory of operation. This
module walks a ``const unsigned char*`` into the frame with explicit length
checks (it is compiled without bounds checking), decodes header values
straight from the raw bytes and only validates the ``body`` value.

Every check happens in the same order as in ``codec.py`` so that a malformed
frame is reported with the same message by both implementations.
"""

from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.exc cimport PyErr_SetObject
from cpython.float cimport PyFloat_FromDouble
from cpython.long cimport (
    PyLong_AsLongLongAndOverflow,
    PyLong_AsUnsignedLongLong,
    PyLong_FromLong,
    PyLong_FromLongLong,
    PyLong_FromUnsignedLongLong,
)
from cpython.object cimport PyObject
from cpython.unicode cimport PyUnicode_AsUTF8AndSize
from libc.stdint cimport int8_t, int16_t, int32_t, int64_t, uint64_t
from libc.string cimport memcpy

from rccs._fastpath.errors import EnvelopeError

cdef extern from "Python.h":
    # Public since CPython 3.11; the same conversions ``struct`` uses for '>f' and '>d'.
    double PyFloat_Unpack4(const char* p, int le) except? -1.0
    double PyFloat_Unpack8(const char* p, int le) except? -1.0
    str PyUnicode_DecodeUTF8(const char* s, Py_ssize_t size, const char* errors)
    int Py_EnterRecursiveCall(const char* where) except -1
    void Py_LeaveRecursiveCall()

cdef extern from *:
    # Branch hint macro from Cython's own C preamble.
    bint unlikely(bint)

MAX_DEPTH = 32

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

cdef enum:
    C_MAX_DEPTH = 32
    KIND_NONE = 0
    KIND_MAP = 1
    KIND_ARRAY = 2
    TIMESTAMP_TYPE = 0xFF  # ext type -1
    MAX_NANOSECONDS = 999999999

ctypedef const unsigned char* cbuf


# ---- errors -----------------------------------------------------------------

cdef int _fail(object message) except -1:
    raise EnvelopeError(message)


cdef int _fail_byte(unsigned char b) except -1:
    raise EnvelopeError(f"invalid msgpack type byte 0x{b:02x}")


cdef object _ENVELOPE_ERROR = EnvelopeError
cdef object _TRUNCATED = ERR_TRUNCATED


cdef int _set_truncated() noexcept:
    # Sets the error without Cython's error-handling code, so that _need stays small enough to inline.
    PyErr_SetObject(_ENVELOPE_ERROR, _TRUNCATED)
    return -1


cdef inline int _need(Py_ssize_t size, Py_ssize_t pos, Py_ssize_t n) except -1:
    """``codec.py``'s ``_need``: EnvelopeError(ERR_TRUNCATED) unless ``n`` bytes are left at ``pos``."""
    if unlikely(pos + n > size):
        return _set_truncated()
    return 0


# ---- raw readers ------------------------------------------------------------

cdef inline uint64_t _be(cbuf p, int width) noexcept nogil:
    """Big-endian unsigned integer of ``width`` (1, 2, 4 or 8) bytes at ``p``."""
    if width == 1:
        return p[0]
    if width == 2:
        return (<uint64_t>p[0] << 8) | p[1]
    if width == 4:
        return (<uint64_t>p[0] << 24) | (<uint64_t>p[1] << 16) | (<uint64_t>p[2] << 8) | p[3]
    return ((<uint64_t>p[0] << 56) | (<uint64_t>p[1] << 48) | (<uint64_t>p[2] << 40) | (<uint64_t>p[3] << 32)
            | (<uint64_t>p[4] << 24) | (<uint64_t>p[5] << 16) | (<uint64_t>p[6] << 8) | p[7])


cdef inline bint _utf8_ok(cbuf s, Py_ssize_t n) noexcept nogil:
    """True if ``s[0:n]`` is what CPython's strict UTF-8 decoder accepts (no surrogates, no overlongs)."""
    cdef Py_ssize_t i = 0
    cdef uint64_t chunk = 0
    cdef unsigned char c, c1
    while i < n:
        if i + 8 <= n:
            memcpy(&chunk, s + i, 8)
            if (chunk & <uint64_t>0x8080808080808080ULL) == 0:
                i += 8
                continue
        c = s[i]
        if c < 0x80:
            i += 1
        elif c < 0xC2:
            return False
        elif c < 0xE0:
            if i + 1 >= n or (s[i + 1] & 0xC0) != 0x80:
                return False
            i += 2
        elif c < 0xF0:
            if i + 2 >= n:
                return False
            c1 = s[i + 1]
            if c == 0xE0:
                if c1 < 0xA0 or c1 > 0xBF:
                    return False
            elif c == 0xED:
                if c1 < 0x80 or c1 > 0x9F:
                    return False
            elif (c1 & 0xC0) != 0x80:
                return False
            if (s[i + 2] & 0xC0) != 0x80:
                return False
            i += 3
        elif c < 0xF5:
            if i + 3 >= n:
                return False
            c1 = s[i + 1]
            if c == 0xF0:
                if c1 < 0x90 or c1 > 0xBF:
                    return False
            elif c == 0xF4:
                if c1 < 0x80 or c1 > 0x8F:
                    return False
            elif (c1 & 0xC0) != 0x80:
                return False
            if (s[i + 2] & 0xC0) != 0x80 or (s[i + 3] & 0xC0) != 0x80:
                return False
            i += 4
        else:
            return False
    return True


cdef str _decode_utf8(cbuf s, Py_ssize_t n):
    try:
        return PyUnicode_DecodeUTF8(<const char*>s, n, NULL)
    except UnicodeDecodeError:
        raise EnvelopeError(ERR_UTF8) from None


# Header keys and values that recur in every frame are returned as these shared str objects
# instead of being decoded (and allocated and hashed) again. Equal strings: no visible difference.
_COMMON_STRINGS = (
    "op", "id", "to", "ts", "all", "ack", "seq", "body", "from", "type", "pick", "send", "ping", "name",
    "acks", "hello", "token", "device", "devices", "version", "platform", "protocol", "encoding", "capability",
    "capabilities", "msgpack", "json",
)

cdef enum:
    CACHE_MAX_LEN = 15
    CACHE_SLOTS = 128     # a power of two; direct-mapped, a string whose slot is taken is just not cached

# The cache below holds borrowed pointers (the str objects and their UTF-8 buffers, which live as long
# as their str). Their owner is this C-level reference, not the module global: Python code can rebind
# ``_COMMON_STRINGS`` (a test does) but cannot reach ``_cache_owner``, so the pointers stay valid for
# the life of the module.
cdef tuple _cache_owner = tuple(_COMMON_STRINGS)

cdef PyObject* _cache_str[CACHE_SLOTS]        # borrowed from _cache_owner
cdef const char* _cache_utf8[CACHE_SLOTS]     # inside those str objects (their cached UTF-8 form)
cdef Py_ssize_t _cache_len[CACHE_SLOTS]       # 0 for an empty slot


cdef inline Py_ssize_t _cache_slot(cbuf s, Py_ssize_t n) noexcept nogil:
    # n >= 1
    return (n * 4 + s[0] * 11 + s[n - 1]) & (CACHE_SLOTS - 1)   # no collisions among _COMMON_STRINGS


cdef int _init_cache() except -1:
    cdef Py_ssize_t slot
    cdef Py_ssize_t size = 0
    cdef const char* data
    for text in _cache_owner:
        data = PyUnicode_AsUTF8AndSize(text, &size)
        if 0 < size <= CACHE_MAX_LEN:
            slot = _cache_slot(<cbuf>data, size)
            if _cache_len[slot] == 0:
                _cache_str[slot] = <PyObject*>text   # kept alive by _cache_owner
                _cache_utf8[slot] = data
                _cache_len[slot] = size
    return 0


_init_cache()


cdef inline bint _same(cbuf a, cbuf b, Py_ssize_t n) noexcept nogil:
    """``memcmp(a, b, n) == 0`` for the few bytes of a key, without a libc call."""
    cdef Py_ssize_t i
    for i in range(n):
        if a[i] != b[i]:
            return False
    return True


cdef inline str _read_str(cbuf data, Py_ssize_t size, Py_ssize_t pos, Py_ssize_t n):
    cdef Py_ssize_t i
    _need(size, pos, n)
    if 0 < n <= CACHE_MAX_LEN:
        i = _cache_slot(data + pos, n)
        if _cache_len[i] == n and _same(<cbuf>_cache_utf8[i], data + pos, n):
            return <str>_cache_str[i]
    return _decode_utf8(data + pos, n)


cdef inline Py_ssize_t _str_len(cbuf data, Py_ssize_t size, Py_ssize_t* pos, unsigned char b) except -2:
    """For a str type byte: its length, with ``pos[0]`` moved past the length bytes; -1 if not a str."""
    cdef Py_ssize_t p = pos[0]
    if 0xA0 <= b <= 0xBF:
        return b & 0x1F
    if b == 0xD9:
        _need(size, p, 1)
        pos[0] = p + 1
        return data[p]
    if b == 0xDA:
        _need(size, p, 2)
        pos[0] = p + 2
        return <Py_ssize_t>_be(data + p, 2)
    if b == 0xDB:
        _need(size, p, 4)
        pos[0] = p + 4
        return <Py_ssize_t>_be(data + p, 4)
    return -1


cdef inline int _container(cbuf data, Py_ssize_t size, Py_ssize_t* pos, unsigned char b,
                           Py_ssize_t* count) except -1:
    """For a map/array type byte: KIND_MAP or KIND_ARRAY with ``count`` set and ``pos[0]`` moved
    past the length bytes; KIND_NONE for any other type byte."""
    cdef Py_ssize_t p = pos[0]
    if 0x80 <= b <= 0x8F:
        count[0] = b & 0x0F
        return KIND_MAP
    if 0x90 <= b <= 0x9F:
        count[0] = b & 0x0F
        return KIND_ARRAY
    if b == 0xDC or b == 0xDE:
        _need(size, p, 2)
        count[0] = <Py_ssize_t>_be(data + p, 2)
        pos[0] = p + 2
        return KIND_ARRAY if b == 0xDC else KIND_MAP
    if b == 0xDD or b == 0xDF:
        _need(size, p, 4)
        count[0] = <Py_ssize_t>_be(data + p, 4)
        pos[0] = p + 4
        return KIND_ARRAY if b == 0xDD else KIND_MAP
    return KIND_NONE


cdef inline bint _is_one_byte_value(unsigned char b) noexcept nogil:
    return b <= 0x7F or b >= 0xE0 or b == 0xC0 or b == 0xC2 or b == 0xC3


# ---- validation (body) ------------------------------------------------------

cdef int _check_timestamp(cbuf payload, Py_ssize_t n) except -1:
    """``codec.py``'s ``_check_timestamp`` on an ext -1 payload ``payload[0:n]`` (known to be there)."""
    cdef uint64_t nanoseconds = 0
    if n == 4:
        return 0
    if n == 8:
        nanoseconds = _be(payload, 4) >> 2
    elif n == 12:
        nanoseconds = _be(payload, 4)
    else:
        _fail(f"{ERR_TIMESTAMP}: ext -1 of {n} bytes (a timestamp has 4, 8 or 12)")
    if nanoseconds > MAX_NANOSECONDS:
        _fail(f"{ERR_TIMESTAMP}: {nanoseconds} nanoseconds (at most {MAX_NANOSECONDS})")
    return 0


cdef Py_ssize_t skip_raw(cbuf data, Py_ssize_t size, Py_ssize_t pos, int depth) except -1:
    cdef unsigned char b
    cdef Py_ssize_t p, n, items, i
    cdef Py_ssize_t count = 0
    cdef int kind, width
    if depth > C_MAX_DEPTH:
        _fail(ERR_DEPTH)
    _need(size, pos, 1)
    b = data[pos]
    pos += 1
    if _is_one_byte_value(b):
        return pos
    p = pos
    n = _str_len(data, size, &p, b)
    if n >= 0:
        _need(size, p, n)
        if not _utf8_ok(data + p, n):
            _fail(ERR_UTF8)
        return p + n
    kind = _container(data, size, &p, b, &count)
    if kind != KIND_NONE:
        items = count * 2 if kind == KIND_MAP else count
        if items > 0 and depth + 1 > C_MAX_DEPTH:
            _fail(ERR_DEPTH)
        for i in range(items):
            # One-byte items and fixstr inline; anything else recurses (same checks, same order).
            _need(size, p, 1)
            b = data[p]
            if _is_one_byte_value(b):
                p += 1
            elif 0xA0 <= b <= 0xBF:
                n = b & 0x1F
                _need(size, p + 1, n)
                if not _utf8_ok(data + p + 1, n):
                    _fail(ERR_UTF8)
                p += 1 + n
            else:
                p = skip_raw(data, size, p, depth + 1)
        return p
    if 0xC4 <= b <= 0xC6:
        width = 1 << (b - 0xC4)
        _need(size, pos, width)
        n = <Py_ssize_t>_be(data + pos, width)
        _need(size, pos + width, n)
        return pos + width + n
    if 0xC7 <= b <= 0xC9:
        width = 1 << (b - 0xC7)
        _need(size, pos, width)
        n = <Py_ssize_t>_be(data + pos, width)
        _need(size, pos + width, n + 1)
        if data[pos + width] == TIMESTAMP_TYPE:
            _check_timestamp(data + pos + width + 1, n)
        return pos + width + 1 + n
    if 0xD4 <= b <= 0xD8:
        n = 1 << (b - 0xD4)
        _need(size, pos, n + 1)
        if data[pos] == TIMESTAMP_TYPE:
            _check_timestamp(data + pos + 1, n)
        return pos + 1 + n
    if b == 0xCA or b == 0xCE or b == 0xD2:
        n = 4
    elif b == 0xCB or b == 0xCF or b == 0xD3:
        n = 8
    elif b == 0xCC or b == 0xD0:
        n = 1
    elif b == 0xCD or b == 0xD1:
        n = 2
    else:
        _fail_byte(b)
    _need(size, pos, n)
    return pos + n


def skip_value(data, pos, depth):
    """Validate the msgpack value at ``pos`` (nested ``depth`` levels deep) and return the position after it."""
    cdef Py_ssize_t size, p
    cdef int d
    if type(data) is not bytes:
        raise TypeError("skip_value() needs bytes")
    if type(pos) is not int or type(depth) is not int or pos < 0 or depth < 0:
        raise ValueError("pos and depth must be non-negative ints")
    size = PyBytes_GET_SIZE(data)
    # Any start at or past the end is "truncated" (after the depth check), as is any depth over the limit.
    p = size if pos > size else <Py_ssize_t>pos
    d = C_MAX_DEPTH + 1 if depth > C_MAX_DEPTH else <int>depth
    return skip_raw(<cbuf>PyBytes_AS_STRING(data), size, p, d)


# ---- decoding (header) ------------------------------------------------------

cdef object _decode_value(cbuf data, Py_ssize_t size, Py_ssize_t* ppos, int depth):
    """Decode the header value at ``ppos[0]`` and move ``ppos[0]`` past it."""
    cdef unsigned char b
    cdef Py_ssize_t pos = ppos[0]
    cdef Py_ssize_t p, n, i, kp, kn
    cdef Py_ssize_t count = 0
    cdef int kind, width
    cdef list items
    cdef dict mapping
    cdef str key
    cdef uint64_t raw
    if depth > C_MAX_DEPTH:
        _fail(ERR_DEPTH)
    _need(size, pos, 1)
    b = data[pos]
    pos += 1
    ppos[0] = pos
    if b <= 0x7F:
        return PyLong_FromLong(b)
    if b >= 0xE0:
        return PyLong_FromLong(<long>b - 0x100)
    if b == 0xC0:
        return None
    if b == 0xC2:
        return False
    if b == 0xC3:
        return True
    p = pos
    n = _str_len(data, size, &p, b)
    if n >= 0:
        key = _read_str(data, size, p, n)
        ppos[0] = p + n
        return key
    kind = _container(data, size, &p, b, &count)
    if kind == KIND_ARRAY:
        items = []
        for i in range(count):
            items.append(_decode_value(data, size, &p, depth + 1))
        ppos[0] = p
        return items
    if kind == KIND_MAP:
        mapping = {}
        for i in range(count):
            _need(size, p, 1)
            kp = p + 1
            kn = _str_len(data, size, &kp, data[p])
            if kn < 0:
                _fail(ERR_HEADER_MAP_KEY)
            key = _read_str(data, size, kp, kn)
            p = kp + kn
            mapping[key] = _decode_value(data, size, &p, depth + 1)
        ppos[0] = p
        return mapping
    if 0xCC <= b <= 0xCF:
        width = 1 << (b - 0xCC)
        _need(size, pos, width)
        ppos[0] = pos + width
        return PyLong_FromUnsignedLongLong(_be(data + pos, width))
    if 0xD0 <= b <= 0xD3:
        width = 1 << (b - 0xD0)
        _need(size, pos, width)
        ppos[0] = pos + width
        raw = _be(data + pos, width)
        if width == 1:
            return PyLong_FromLong(<int8_t>raw)
        if width == 2:
            return PyLong_FromLong(<int16_t>raw)
        if width == 4:
            return PyLong_FromLong(<int32_t>raw)
        return PyLong_FromLongLong(<int64_t>raw)
    if b == 0xCA:
        _need(size, pos, 4)
        ppos[0] = pos + 4
        return PyFloat_FromDouble(PyFloat_Unpack4(<const char*>(data + pos), 0))
    if b == 0xCB:
        _need(size, pos, 8)
        ppos[0] = pos + 8
        return PyFloat_FromDouble(PyFloat_Unpack8(<const char*>(data + pos), 0))
    if 0xC4 <= b <= 0xC6:
        _fail(ERR_BIN_IN_HEADER)
    if 0xC7 <= b <= 0xC9 or 0xD4 <= b <= 0xD8:
        _fail(ERR_EXT_IN_HEADER)
    _fail_byte(b)


cdef dict decode_envelope_from(const unsigned char* buf, Py_ssize_t size, Py_ssize_t* body_start,
                               Py_ssize_t* body_end):
    """``decode_envelope`` on ``buf[0:size]``, a buffer the caller holds: the header, and the body's span
    in ``body_start``/``body_end`` (-1, -1 when absent)."""
    cdef Py_ssize_t pos, i, kp, kn
    cdef Py_ssize_t count = 0
    cdef dict header
    cdef str key
    body_start[0] = -1
    body_end[0] = -1
    _need(size, 0, 1)
    pos = 1
    if _container(buf, size, &pos, buf[0], &count) != KIND_MAP:
        _fail(ERR_NOT_MAP)
    header = {}
    for i in range(count):
        _need(size, pos, 1)
        kp = pos + 1
        kn = _str_len(buf, size, &kp, buf[pos])
        if kn < 0:
            _fail(ERR_KEY_TYPE)
        if kn == 4 and kp + 4 <= size and _same(buf + kp, <cbuf>b"body", 4):
            pos = kp + 4
            body_start[0] = pos
            pos = skip_raw(buf, size, pos, 1)
            body_end[0] = pos
        else:
            key = _read_str(buf, size, kp, kn)
            pos = kp + kn
            header[key] = _decode_value(buf, size, &pos, 1)
    if pos != size:
        _fail(ERR_TRAILING)
    return header


cpdef tuple decode_envelope(object data):
    """Decode a msgpack envelope.

    Returns ``(header, body_start, body_end)``: ``header`` holds every
    top-level field except ``body``; ``data[body_start:body_end]`` is the
    ``body`` value's msgpack encoding, untouched (``-1, -1`` when absent).
    Raises ``EnvelopeError`` for anything that is not one well-formed map.
    """
    cdef Py_ssize_t body_start, body_end
    cdef dict header
    if not isinstance(data, bytes):
        raise TypeError("decode_envelope() needs bytes")
    header = decode_envelope_from(<cbuf>PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), &body_start, &body_end)
    return header, body_start, body_end


# ---- encoding ---------------------------------------------------------------

cdef struct _IntEnc:
    unsigned char tag   # 0: the value is a one-byte fixint held in ``bits``
    int width           # bytes after the tag
    uint64_t bits


cdef struct _StrEnc:
    const char* data
    Py_ssize_t size


cdef inline void _prep_ll(long long v, _IntEnc* e) noexcept nogil:
    """The smallest msgpack int encoding of ``v`` (same choices as codec.py)."""
    e.bits = <uint64_t>v
    if 0 <= v <= 0x7F or -32 <= v < 0:
        e.tag = 0
        e.width = 0
        e.bits &= 0xFF
    elif v > 0:
        if v <= 0xFF:
            e.tag = 0xCC
            e.width = 1
        elif v <= 0xFFFF:
            e.tag = 0xCD
            e.width = 2
        elif v <= 0xFFFFFFFFLL:
            e.tag = 0xCE
            e.width = 4
        else:
            e.tag = 0xCF
            e.width = 8
    elif v >= -0x80:
        e.tag = 0xD0
        e.width = 1
    elif v >= -0x8000:
        e.tag = 0xD1
        e.width = 2
    elif v >= -0x80000000LL:
        e.tag = 0xD2
        e.width = 4
    else:
        e.tag = 0xD3
        e.width = 8


cdef int _prep_int(object value, _IntEnc* e) except -1:
    """Choose the smallest msgpack int encoding of the exact int ``value`` (same choices as codec.py)."""
    cdef int overflow = 0
    cdef long long v = PyLong_AsLongLongAndOverflow(value, &overflow)
    if overflow == 0:
        _prep_ll(v, e)
        return 0
    if overflow > 0 and value <= 0xFFFFFFFFFFFFFFFF:
        e.tag = 0xCF
        e.width = 8
        e.bits = PyLong_AsUnsignedLongLong(value)
        return 0
    raise OverflowError("integer out of msgpack range")


cdef int _prep_seq(object seq, _IntEnc* e) except -1:
    if type(seq) is not int or seq < 0:
        raise ValueError("seq must be a non-negative int")
    return _prep_int(seq, e)


cdef inline Py_ssize_t _int_size(const _IntEnc* e) noexcept nogil:
    return 1 + e.width


cdef inline char* _write_int(char* w, const _IntEnc* e) noexcept nogil:
    cdef int i
    if e.tag == 0:
        w[0] = <char>e.bits
        return w + 1
    w[0] = <char>e.tag
    for i in range(e.width):
        w[1 + i] = <char>(e.bits >> (8 * (e.width - 1 - i)))
    return w + 1 + e.width


cdef int _prep_str(object value, _StrEnc* s) except -1:
    """UTF-8 of the exact str ``value`` (same errors as ``value.encode("utf-8")``)."""
    s.data = PyUnicode_AsUTF8AndSize(value, &s.size)
    if s.size > 0xFFFFFFFF:
        raise ValueError("string too long for msgpack")
    return 0


cdef inline Py_ssize_t _str_size(const _StrEnc* s) noexcept nogil:
    if s.size <= 31:
        return 1 + s.size
    if s.size <= 0xFF:
        return 2 + s.size
    if s.size <= 0xFFFF:
        return 3 + s.size
    return 5 + s.size


cdef inline char* _write_str(char* w, const _StrEnc* s) noexcept nogil:
    cdef Py_ssize_t n = s.size
    if n <= 31:
        w[0] = <char>(0xA0 | n)
        w += 1
    elif n <= 0xFF:
        w[0] = <char>0xD9
        w[1] = <char>n
        w += 2
    elif n <= 0xFFFF:
        w[0] = <char>0xDA
        w[1] = <char>(n >> 8)
        w[2] = <char>n
        w += 3
    else:
        w[0] = <char>0xDB
        w[1] = <char>(n >> 24)
        w[2] = <char>(n >> 16)
        w[3] = <char>(n >> 8)
        w[4] = <char>n
        w += 5
    memcpy(w, s.data, n)
    return w + n


cdef enum:
    SCALAR_NIL = 0
    SCALAR_TRUE = 1
    SCALAR_FALSE = 2
    SCALAR_INT = 3
    SCALAR_STR = 4

# Sizes of the fixed parts of a "msg" envelope, in key order op, id, from, type, body, ts, ack, seq.
cdef enum:
    HEAD_SIZE = 11    # \x88 (map of 8) \xa2op \xa3msg \xa2id
    FROM_SIZE = 5     # \xa4from
    TYPE_SIZE = 5     # \xa4type
    BODY_SIZE = 5     # \xa4body
    TS_SIZE = 3       # \xa2ts
    ACK_SIZE = 4      # \xa3ack
    SEQ_SIZE = 4      # \xa3seq


cdef struct _MsgFields:
    # A "msg" envelope's fields other than body and seq, converted and sized before any buffer exists.
    int id_kind
    _IntEnc id_int
    _StrEnc id_str
    _StrEnc sender
    _StrEnc app_type
    _IntEnc ts
    bint ack


cdef int _prep_names(_MsgFields* m, object msg_id, object sender, object app_type) except -1:
    """The id, sender and type of a ``msg`` (codec.py's order: id first; sender and app_type are str)."""
    if msg_id is None:
        m.id_kind = SCALAR_NIL
    elif msg_id is True:
        m.id_kind = SCALAR_TRUE
    elif msg_id is False:
        m.id_kind = SCALAR_FALSE
    elif type(msg_id) is int:
        m.id_kind = SCALAR_INT
        _prep_int(msg_id, &m.id_int)
    elif type(msg_id) is str:
        m.id_kind = SCALAR_STR
        _prep_str(msg_id, &m.id_str)
    else:
        raise TypeError("only None, bool, int and str can be packed here")
    _prep_str(sender, &m.sender)
    _prep_str(app_type, &m.app_type)
    return 0


cdef bytes _write_msg(const _MsgFields* m, const char* body, Py_ssize_t body_size, const _IntEnc* seq,
                      Py_ssize_t* body_offset):
    """The envelope in one new bytes object: ``body`` is copied once, straight into it. Without ``seq``
    (NULL) it ends after ``ack`` (a prefix for ``append_seq``). ``body_offset``, unless NULL, receives
    where the body starts in the result."""
    cdef Py_ssize_t total = HEAD_SIZE
    cdef bytes out
    cdef char* w
    cdef char* start
    if m.id_kind == SCALAR_INT:
        total += _int_size(&m.id_int)
    elif m.id_kind == SCALAR_STR:
        total += _str_size(&m.id_str)
    else:
        total += 1
    total += (FROM_SIZE + _str_size(&m.sender) + TYPE_SIZE + _str_size(&m.app_type) + BODY_SIZE + body_size
              + TS_SIZE + _int_size(&m.ts) + ACK_SIZE + 1)
    if seq != NULL:
        total += SEQ_SIZE + _int_size(seq)

    out = PyBytes_FromStringAndSize(NULL, total)
    start = PyBytes_AS_STRING(out)
    w = start
    memcpy(w, b"\x88\xa2op\xa3msg\xa2id", HEAD_SIZE)
    w += HEAD_SIZE
    if m.id_kind == SCALAR_NIL:
        w[0] = <char>0xC0
        w += 1
    elif m.id_kind == SCALAR_TRUE:
        w[0] = <char>0xC3
        w += 1
    elif m.id_kind == SCALAR_FALSE:
        w[0] = <char>0xC2
        w += 1
    elif m.id_kind == SCALAR_INT:
        w = _write_int(w, &m.id_int)
    else:
        w = _write_str(w, &m.id_str)
    memcpy(w, b"\xa4from", FROM_SIZE)
    w = _write_str(w + FROM_SIZE, &m.sender)
    memcpy(w, b"\xa4type", TYPE_SIZE)
    w = _write_str(w + TYPE_SIZE, &m.app_type)
    memcpy(w, b"\xa4body", BODY_SIZE)
    w += BODY_SIZE
    if body_offset != NULL:
        body_offset[0] = w - start
    memcpy(w, body, body_size)
    w += body_size
    memcpy(w, b"\xa2ts", TS_SIZE)
    w = _write_int(w + TS_SIZE, &m.ts)
    memcpy(w, b"\xa3ack", ACK_SIZE)
    w[ACK_SIZE] = <char>(0xC3 if m.ack else 0xC2)
    if seq != NULL:
        w += ACK_SIZE + 1
        memcpy(w, b"\xa3seq", SEQ_SIZE)
        _write_int(w + SEQ_SIZE, seq)
    return out


cdef int _prep_fields(_MsgFields* m, object msg_id, object sender, object app_type, object body, object ts,
                      object ack) except -1:
    """encode_msg_prefix's checks and conversions, in codec.py's order."""
    if type(sender) is not str or type(app_type) is not str:
        raise TypeError("sender and app_type must be str")
    if type(ts) is not int:
        raise TypeError("ts must be int")
    if type(body) is not bytes:
        raise TypeError("body must be bytes")
    _prep_names(m, msg_id, sender, app_type)
    _prep_int(ts, &m.ts)
    m.ack = ack
    return 0


cpdef bytes encode_msg_prefix(object msg_id, object sender, object app_type, object body, object ts, object ack):
    """Encode a ``msg`` envelope without its ``seq``, once for every receiver.

    ``body`` is an already-encoded msgpack value and is copied untouched.
    The map header announces 8 entries; ``append_seq`` adds the last one.
    """
    cdef _MsgFields m
    _prep_fields(&m, msg_id, sender, app_type, body, ts, ack)
    return _write_msg(&m, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), NULL, NULL)


cpdef bytes encode_msg(object msg_id, object sender, object app_type, object body, object ts, object ack,
                       object seq):
    """A whole ``msg`` envelope for one receiver: ``append_seq(encode_msg_prefix(...), seq)``, same errors.

    Written in one buffer: the body is copied once.
    """
    cdef _MsgFields m
    cdef _IntEnc seq_int
    _prep_fields(&m, msg_id, sender, app_type, body, ts, ack)
    _prep_seq(seq, &seq_int)
    return _write_msg(&m, PyBytes_AS_STRING(body), PyBytes_GET_SIZE(body), &seq_int, NULL)


cdef bytes encode_msg_from(object msg_id, str sender, str app_type, const char* body, Py_ssize_t body_size,
                           long long ts, bint ack, object seq, Py_ssize_t* body_offset):
    """``encode_msg`` for compiled callers whose body is a span of a buffer they hold (a received frame):
    the span is copied once, into the new envelope; ``body_offset`` receives where it starts there."""
    cdef _MsgFields m
    cdef _IntEnc seq_int
    _prep_names(&m, msg_id, sender, app_type)
    _prep_ll(ts, &m.ts)
    m.ack = ack
    _prep_seq(seq, &seq_int)
    return _write_msg(&m, body, body_size, &seq_int, body_offset)


cpdef bytes append_seq(object prefix, object seq):
    """Complete a ``msg`` envelope from ``encode_msg_prefix`` with its per-session ``seq``."""
    cdef _IntEnc seq_int
    cdef Py_ssize_t prefix_size
    cdef bytes out
    cdef char* w
    if type(seq) is not int or seq < 0:
        raise ValueError("seq must be a non-negative int")
    if type(prefix) is not bytes:
        raise TypeError("prefix must be bytes")
    _prep_int(seq, &seq_int)
    prefix_size = PyBytes_GET_SIZE(prefix)
    out = PyBytes_FromStringAndSize(NULL, prefix_size + SEQ_SIZE + _int_size(&seq_int))
    w = PyBytes_AS_STRING(out)
    memcpy(w, PyBytes_AS_STRING(prefix), prefix_size)
    w += prefix_size
    memcpy(w, b"\xa3seq", SEQ_SIZE)
    _write_int(w + SEQ_SIZE, &seq_int)
    return out
