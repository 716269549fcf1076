"""picows listener, compiled twin of ``listener.py``.

Same class and behaviour as the pure-Python module (read its docstring for
the theory of operation). Compiled as a subclass of picows' cdef
``WSListener``, so picows calls ``on_ws_frame`` without a Python-level
dispatch, and the direct routing path runs as C with calls into the compiled
codec. Built against picows' ``picows.pxd``; the package pins the picows
version it was built with because the class layout is shared at C level.
"""

import asyncio

cimport cython
from cpython.buffer cimport PyBUF_FORMAT, PyBUF_ND, PyBUF_WRITABLE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize
from libc.time cimport time_t
from picows.picows cimport WSCloseCode, WSFrame, WSListener, WSMsgType, WSTransport

from rccs._fastpath._codec cimport decode_envelope_from, encode_msg_from
from rccs._fastpath._routing cimport RoutingTable, RouteStats
from rccs._fastpath.errors import EnvelopeError
import logging

from rccs.errors import CloseCode, ErrorCode
from rccs.transport.linger import close_code_not_echoed, close_gently_after_1009

log = logging.getLogger("rccs.session")

cdef extern from *:
    """
    #ifndef RCCS_PICOWS_BUILD_VERSION
    #define RCCS_PICOWS_BUILD_VERSION ""
    #endif
    """
    const char* RCCS_PICOWS_BUILD_VERSION

# The picows version whose picows.pxd this module was compiled against (set by setup.py; "" when built
# some other way). This module reads and writes picows' C fields, whose layout is only known to match
# that version: rccs._fastpath loads it only when the installed picows is the same.
PICOWS_BUILD_VERSION = RCCS_PICOWS_BUILD_VERSION.decode("ascii")

cdef extern from "<time.h>" nogil:
    ctypedef int clockid_t
    cdef struct timespec:
        time_t tv_sec
        long tv_nsec
    int clock_gettime(clockid_t clk_id, timespec* tp)
    clockid_t CLOCK_MONOTONIC
    clockid_t CLOCK_REALTIME

MAX_ID_CHARS = 128
MAX_REFUSED_PER_SECOND = 1000  # rate-limited messages within one second before the connection is closed (1008)
MIN_INT_ID = -(2**63)
MAX_INT_ID = 2**64 - 1

cdef enum:
    C_MAX_ID_CHARS = 128
    RESULT_ROUTED = 0

cdef const char* _NIL = b"\xc0"  # the body of a send without one
cdef int _FIN_TEXT = 0x81
cdef int _FIN_BINARY = 0x82
cdef list _SHORT_TEXT_HEADERS = [bytes((0x81, n)) for n in range(126)]
cdef list _SHORT_BINARY_HEADERS = [bytes((0x82, n)) for n in range(126)]
cdef str _MSGPACK = "msgpack"
cdef str _SEND = "send"
cdef str _ACK = "ack"


cdef inline long long _monotonic_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <long long>ts.tv_sec * 1000000000 + ts.tv_nsec


cdef inline long long _now_ms() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <long long>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef bytes _frame_header(Py_ssize_t length, bint text):
    cdef int first
    if length < 126:
        return <bytes>(_SHORT_TEXT_HEADERS if text else _SHORT_BINARY_HEADERS)[length]
    first = _FIN_TEXT if text else _FIN_BINARY
    if length < 65536:
        return bytes((first, 126)) + (<object>length).to_bytes(2, "big")
    return bytes((first, 127)) + (<object>length).to_bytes(8, "big")


cdef int _reply_close_code(WSFrame frame) except -1:
    """The code to answer a peer's close with: its own, or 1000 when it sent none (1005 must not be sent)."""
    cdef int code = <int>frame.get_close_code()
    return 1000 if code == 0 or code == 1005 or code == 1006 else code


cdef inline bytes _payload_bytes(WSFrame frame):
    """The frame's payload as bytes: a copy, since picows reuses its buffer once on_ws_frame returns."""
    return PyBytes_FromStringAndSize(frame.payload_ptr, frame.payload_size)


cdef char* _UNSIGNED_BYTES = "B"  # the struct format of a buffer of bytes


@cython.final
@cython.no_gc  # holds only a bytes object, which cannot be part of a cycle
cdef class _BodyView:
    """The body inside an encoded msg as a read-only buffer that keeps the msg alive.

    What the idempotency check digests: the body is neither copied out of the msg nor sliced through a
    memoryview (two views and a managed buffer, all tracked by the garbage collector, cost more per
    message than the rest of an ack'd direct send's codec work).
    """
    cdef bytes _msg
    cdef Py_ssize_t _offset
    cdef Py_ssize_t _size
    cdef Py_ssize_t _stride

    def __getbuffer__(self, Py_buffer* buffer, int flags):
        if flags & PyBUF_WRITABLE:
            raise BufferError("the body of a msg is read-only")
        buffer.buf = PyBytes_AS_STRING(self._msg) + self._offset
        buffer.obj = self
        buffer.len = self._size
        buffer.readonly = 1
        buffer.itemsize = 1
        buffer.format = NULL
        if flags & PyBUF_FORMAT:
            buffer.format = _UNSIGNED_BYTES
        buffer.ndim = 1
        buffer.shape = NULL
        buffer.strides = NULL
        if flags & PyBUF_ND:
            buffer.shape = &self._size
            buffer.strides = &self._stride
        buffer.suboffsets = NULL
        buffer.internal = NULL


cdef _BodyView _body_view(bytes msg, Py_ssize_t offset, Py_ssize_t size):
    cdef _BodyView view = _BodyView.__new__(_BodyView)
    view._msg = msg
    view._offset = offset
    view._size = size
    view._stride = 1
    return view


def frame_header(length, text):
    """RFC 6455 header of an unmasked, final text or binary frame carrying ``length`` bytes."""
    if type(length) is not int or length < 0:
        raise ValueError("length must be a non-negative int")
    if length < 126:
        return (_SHORT_TEXT_HEADERS if text else _SHORT_BINARY_HEADERS)[length]
    first = _FIN_TEXT if text else _FIN_BINARY
    if length < 65536:
        return bytes((first, 126)) + length.to_bytes(2, "big")
    return bytes((first, 127)) + length.to_bytes(8, "big")


class WriteCoalescer:
    """Flushes every connection that queued frames during this loop iteration, once."""

    def __init__(self):
        self._dirty = []
        self._loop = None

    def schedule(self, connection):
        if not self._dirty:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self.flush)
        self._dirty.append(connection)

    def flush(self):
        dirty, self._dirty = self._dirty, []
        for connection in dirty:
            connection.flush()


cdef class ServerConnection(WSListener):
    """One accepted WebSocket connection; the Sink of its Session.

    ``session_factory(hub, connection)`` builds the Session when the
    WebSocket handshake completes (the connection does not import sessions).
    ``hub`` and ``session`` are used only through the fields and methods that
    ``rccs.contracts.FastPathHub`` and ``FastPathSession`` declare; the pure
    twin is annotated with them, so mypy checks what both touch.
    """

    cdef public object hub
    cdef public object coalescer
    cdef public object session_factory
    cdef public object transport
    cdef public object session
    cdef public object peer
    cdef list _outbox
    # Looked up once per connection, not per flush (picows keeps its transport's methods the same way).
    cdef object _writelines
    cdef object _write_buffer_size
    cdef Py_ssize_t _max_outbound_bytes
    cdef object _fragments
    cdef bint _fragments_text
    cdef bint _aborted
    cdef bint _close_counted
    cdef object _hello_timer
    cdef bint _direct
    cdef bint _live_acks
    cdef object _user
    cdef object _device
    cdef RoutingTable _routing
    cdef RouteStats _stats
    # Whole messages and payload bytes in and out (the session's counters read these).
    cdef public long long frames_in
    cdef public long long frames_out
    cdef public long long bytes_in
    cdef public long long bytes_out
    # Messages the direct path handled itself (sends routed, acks settled): tests check it is taken.
    cdef public long long direct_sends
    cdef public long long direct_acks
    cdef double _rate
    cdef double _burst
    cdef double _tokens
    cdef long long _stamp_ns
    cdef long long _refused_in_a_row
    cdef long long _refused_in_window
    cdef long long _window_ns

    def __init__(self, hub, coalescer, session_factory):
        self.hub = hub
        self.coalescer = coalescer
        self.session_factory = session_factory
        self.transport = None
        self.session = None
        self.peer = "?"
        self._outbox = None
        self._writelines = None
        self._write_buffer_size = None
        self._max_outbound_bytes = 0
        self._fragments = None
        self._fragments_text = False
        self._aborted = False
        self._close_counted = False  # the close frame sent was asked for by the session, which counted it
        self._hello_timer = None
        self._direct = False
        self._user = ""
        self._device = ""
        self._routing = None
        self._stats = None
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        self.direct_sends = 0
        self.direct_acks = 0
        self._rate = 0.0
        self._burst = 0.0
        self._tokens = 0.0
        self._stamp_ns = 0
        self._refused_in_a_row = 0
        self._refused_in_window = 0
        self._window_ns = 0

    # ---- picows callbacks ----------------------------------------------

    cpdef on_ws_connected(self, WSTransport transport):
        self.transport = transport
        # picows keeps the parsed upgrade request and our 101 response (header dicts, ~1 KB) for the
        # connection's lifetime; nothing reads them after the handshake, and idle devices are many.
        # (Read-only from Python: the pure-Python twin cannot drop them.)
        transport.request = None
        transport.response = None
        underlying = transport.underlying_transport
        self._writelines = underlying.writelines
        self._write_buffer_size = underlying.get_write_buffer_size
        hub = self.hub
        self._max_outbound_bytes = hub.settings.max_outbound_bytes
        peername = underlying.get_extra_info("peername")
        if peername:
            self.peer = f"{peername[0]}:{peername[1]}"
        if hub.is_full() or not hub.accepting:
            code = CloseCode.TRY_AGAIN_LATER if hub.accepting else CloseCode.GOING_AWAY
            hub.closes_sent[int(code)] += 1
            transport.send_close(int(code), b"server full" if hub.accepting else b"shutting down")
            transport.disconnect()
            return
        # A 1009 close (an oversized message, still arriving) drains before the socket closes, so the
        # client reads the close frame rather than a reset.
        close_gently_after_1009(transport)
        self.session = self.session_factory(hub, self)
        self._hello_timer = asyncio.get_running_loop().call_later(
            hub.settings.hello_timeout, self.session.on_hello_timeout
        )

    cpdef on_ws_frame(self, WSTransport transport, WSFrame frame):
        cdef WSMsgType msg_type
        session = self.session
        if session is None or transport.is_close_frame_sent:
            # picows keeps parsing after it refused an oversized frame and may
            # still deliver that frame; nothing is accepted once we are closing.
            return
        if frame.rsv1 or frame.rsv2 or frame.rsv3:  # no extension is negotiated (RFC 6455 section 5.2)
            session.close(CloseCode.PROTOCOL_ERROR, "reserved bits set")
            return
        msg_type = frame.msg_type
        if msg_type == WSMsgType.BINARY or msg_type == WSMsgType.TEXT:
            if self._fragments is not None:
                session.close(CloseCode.PROTOCOL_ERROR, "new message inside a fragmented message")
                return
            if frame.fin:
                self.frames_in += 1
                self.bytes_in += frame.payload_size
                if self._rate > 0.0 and not self._take_token():
                    self._refuse(_payload_bytes(frame), msg_type == WSMsgType.TEXT)
                    return
                if self._direct and msg_type == WSMsgType.BINARY and session.held is None:
                    self._on_binary(frame)
                else:
                    session.on_frame(_payload_bytes(frame), msg_type == WSMsgType.TEXT)
            else:
                self._fragments = bytearray(frame.get_payload_as_memoryview())
                self._fragments_text = msg_type == WSMsgType.TEXT
        elif msg_type == WSMsgType.CONTINUATION:
            fragments = self._fragments
            if fragments is None:
                session.close(CloseCode.PROTOCOL_ERROR, "continuation frame without a message")
                return
            if len(fragments) + frame.payload_size > self.hub.settings.max_message_bytes:
                session.close(CloseCode.MESSAGE_TOO_BIG, "message too big")
                return
            fragments += frame.get_payload_as_memoryview()
            if frame.fin:
                self._fragments = None
                self.frames_in += 1
                self.bytes_in += len(fragments)
                if self._rate > 0.0 and not self._take_token():
                    self._refuse(bytes(fragments), self._fragments_text)
                    return
                session.on_frame(bytes(fragments), self._fragments_text)
        elif msg_type == WSMsgType.CLOSE:
            if <int>frame.get_close_code() >= 5000:  # picows checks those below
                session.close(CloseCode.PROTOCOL_ERROR, "invalid close code")
                return
            session.on_peer_close(<int>frame.get_close_code())
            self.flush()  # what was queued before the peer's close still goes out, ahead of our reply
            if not transport.is_close_frame_sent:
                transport.send_close(<WSCloseCode>_reply_close_code(frame))
            transport.disconnect()

    cpdef on_ws_disconnected(self, WSTransport transport):
        self._direct = False
        if self._rate > 0.0 and self._device:
            buckets = self.hub.rate_buckets
            if len(buckets) > 50000:  # they would have refilled long ago; keep the table small
                buckets.clear()
            buckets[self._device] = (self._tokens, self._stamp_ns)
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        if self.session is not None and not self._close_counted:
            # A close the session did not ask for (it counts those itself) nor an echo of the client's:
            # picows' own (1002 bad framing, 1007, 1009 a frame header over max_message_bytes, 1011).
            code = close_code_not_echoed(transport)
            if code is not None:
                self.hub.closes_sent[code] += 1
        if self.session is not None:
            self.session.on_closed()

    # ---- direct path --------------------------------------------------------

    cdef _on_binary(self, WSFrame frame):
        """A whole binary message on an open msgpack session.

        Decoded and routed straight from picows' buffer: a direct send copies the body once, into the
        receiver's ``msg``. Only what goes to the session gets the payload as bytes.
        """
        cdef long long started = _monotonic_ns()
        cdef dict header
        cdef Py_ssize_t body_start, body_end
        try:
            header = decode_envelope_from(<const unsigned char*>frame.payload_ptr, frame.payload_size,
                                          &body_start, &body_end)
        except EnvelopeError:
            self.session.on_frame(_payload_bytes(frame), False)  # the session reports the error
            return
        op = header.get("op")
        try:
            if op == _SEND:
                if self._send_direct(header, frame.payload_ptr, body_start, body_end, started):
                    return
            elif op == _ACK and self._ack_direct(header):
                return
        except Exception:
            # Contained like the session's own handlers: logged, answered, the connection lives on.
            log.exception("internal error handling a frame from %s", self.peer)
            self.session.send_error(ErrorCode.INTERNAL, "internal server error", header.get("id"))
            return
        self.session.on_envelope(header, _payload_bytes(frame), body_start, body_end, False)

    cdef bint _take_token(self) noexcept:
        cdef long long now = _monotonic_ns()
        cdef double tokens = self._tokens + (now - self._stamp_ns) * 1e-9 * self._rate
        if tokens > self._burst:
            tokens = self._burst
        self._stamp_ns = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            self._refused_in_a_row = 0
            return True
        self._tokens = tokens
        return False

    cdef _refuse(self, bytes payload, bint text):
        """Over the device's rate: not handled. The first refusal of a streak is answered (rate_limited);
        the rest are dropped unanswered, so a flood cannot make the server write an error per frame.
        More than MAX_REFUSED_PER_SECOND refusals within a second close the connection (1008)."""
        cdef long long now = self._stamp_ns
        if now - self._window_ns > 1000000000:
            self._window_ns = now
            self._refused_in_window = 0
        self._refused_in_window += 1
        self._refused_in_a_row += 1
        self.hub.rate_refused += 1
        if self._refused_in_window > MAX_REFUSED_PER_SECOND:
            self.session.close(CloseCode.POLICY_VIOLATION, "flooding: far over the send rate")
            return
        if self._refused_in_a_row == 1:
            self.session.on_rate_limited(payload, text, (1.0 - self._tokens) / self._rate)

    cdef bint _ack_direct(self, dict header) except -1:
        """An ack of one seq: settle it and give the sender its ``delivered`` receipt."""
        seq = header.get("seq")
        if type(seq) is not int or self.session.inbox_ids or self.session.work:
            return False
        self._routing.touch(self._user, self._device)
        pending = self.session.pending.pop(seq, None)
        if pending is not None:
            self.hub.send_receipt(pending[0], pending[1], {
                "op": "receipt", "id": pending[2], "status": "delivered", "device": self._device,
            })
        self.direct_acks += 1
        return True

    cdef bint _send_direct(self, dict header, const char* payload, Py_ssize_t body_start, Py_ssize_t body_end,
                           long long started) except -1:
        """Route the common ``send``; False (having done nothing) for anything else.

        ``payload`` is picows' buffer, valid until on_ws_frame returns: the body is copied from it once,
        into the ``msg`` (encoded whole, seq included), which is queued and kept for redelivery as is.
        """
        cdef ServerConnection target_connection
        cdef object ack
        cdef const char* body
        cdef Py_ssize_t body_size
        cdef Py_ssize_t body_offset = 0
        cdef long long now_ms
        cdef bytes frame
        to = header.get("to")
        msg_id = header.get("id")
        app_type = header.get("type")
        ack = header.get("ack", False)
        if not (type(to) is dict and len(<dict>to) == 1 and type(app_type) is str
                and (ack is False or (ack is True and self._live_acks))):
            return False
        # Any key beyond op, id, to, type, ack (body is not in the header) is a delivery option
        # (ttl, priority, durable, first_ack, ...): validated and applied by the general path.
        if len(header) > 5 or (len(header) == 5 and "ack" not in header):
            return False
        if type(msg_id) is str:
            if not 0 < len(<str>msg_id) <= C_MAX_ID_CHARS:
                return False
        elif type(msg_id) is not int or not MIN_INT_ID <= msg_id <= MAX_INT_ID:
            return False
        name = (<dict>to).get("device")
        if not (type(name) is str and 0 < len(<str>name) <= C_MAX_ID_CHARS and 0 < len(<str>app_type) <= C_MAX_ID_CHARS
                and name != self._device):
            return False
        # Online under this user means owned by this user: ownership is recorded at hello.
        target = self._routing.get(self._user, name)
        if target is None:
            return False
        sink = target.sink
        if type(sink) is not ServerConnection or not (<ServerConnection>sink)._direct:
            return False
        target_connection = <ServerConnection>sink
        self._routing.touch(self._user, self._device)
        if body_start >= 0:
            body = payload + body_start
            body_size = body_end - body_start
        else:
            body = _NIL
            body_size = 1
        # One clock reading for the idempotency window and the msg's ts. The msg is encoded before the
        # duplicate check, with the seq it would take, so the check reads the body from the msg.
        now_ms = _now_ms()
        seq = target.next_seq
        frame = encode_msg_from(msg_id, self._device, app_type, body, body_size, now_ms, ack is True, seq,
                                &body_offset)
        if ack is True:
            repeated = self.hub.deliveries.first_time(
                self._device, msg_id, _body_view(frame, body_offset, body_size), now_ms)
            if repeated is not None:
                self.session.on_repeated_send(msg_id, repeated)
                self.direct_sends += 1
                return True
        target.next_seq = seq + 1
        target_connection._queue_frame(frame, False)
        if ack is True:
            target.pending[seq] = (self._user, self._device, msg_id, frame, False)
        self._stats.add_frames(1, 1)
        self._stats.add_route(RESULT_ROUTED, _monotonic_ns() - started)
        self.direct_sends += 1
        if ack is True:
            self.session.send_control({"op": "receipt", "id": msg_id, "status": "routed", "devices": [name]})
        return True

    # ---- Sink ---------------------------------------------------------------

    cpdef send_frame(self, bytes data, bint text):
        self._queue_frame(data, text)

    cdef int _queue_frame(self, bytes data, bint text) except -1:
        transport = self.transport
        if transport is None or (<WSTransport>transport).is_close_frame_sent:
            return 0
        self.frames_out += 1
        self.bytes_out += len(data)
        if self._outbox is None:
            self._outbox = [_frame_header(len(data), text), data]
            self.coalescer.schedule(self)
        else:
            self._outbox.append(_frame_header(len(data), text))
            self._outbox.append(data)
        return 0

    cpdef flush(self):
        """Write the frames queued since the last flush in one go."""
        cdef WSTransport transport
        outbox = self._outbox
        if outbox is None:
            return
        self._outbox = None
        if self.transport is None:
            return
        transport = <WSTransport>self.transport
        if not transport.is_disconnected and not transport.is_close_frame_sent:
            self._writelines(outbox)
            if <Py_ssize_t>self._write_buffer_size() > self._max_outbound_bytes:
                self._drop_slow_consumer()

    cdef _drop_slow_consumer(self):
        """A device that does not read must not grow the server's memory: abort its connection.

        Aborted, not closed: a close frame would queue behind the unread data.
        """
        self._direct = False
        self._aborted = True
        self.hub.closes_sent[int(CloseCode.SLOW_CONSUMER)] += 1
        log.warning("dropping %s: more than %d bytes waiting to be written", self.peer, self._max_outbound_bytes)
        (<WSTransport>self.transport).disconnect(False)
        if self.session is not None:
            self.session.on_closed()

    cpdef close(self, code, reason):
        self._direct = False
        transport = self.transport
        if transport is None:
            return
        self.flush()
        if self._aborted:  # the flush found a slow consumer and aborted the connection
            return
        if not (<WSTransport>transport).is_close_frame_sent:
            self._close_counted = True
            (<WSTransport>transport).send_close(int(code), reason.encode("utf-8")[:123])
        (<WSTransport>transport).disconnect()
        if self.session is not None:
            self.session.on_closed()

    cpdef hello_done(self):
        """The session said welcome: stop the hello timer; enable the direct path on msgpack."""
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        session = self.session
        self._user = session.user
        self._device = session.device
        self._routing = self.hub.routing
        self._stats = self.hub.stats
        self._direct = session.encoding == _MSGPACK
        self._live_acks = self.hub.live_acks
        settings = self.hub.settings
        self._rate = settings.send_rate
        self._burst = max(1, settings.send_burst)
        # The bucket belongs to the device, not the connection: reconnecting does not refill it.
        self._tokens, self._stamp_ns = self.hub.rate_buckets.pop(session.device, (self._burst, _monotonic_ns()))
