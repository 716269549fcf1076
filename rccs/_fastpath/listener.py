"""picows listener, pure-Python twin of ``_listener.pyx``.

Turns WebSocket frames into whole messages for a Session: copies payloads
(a picows ``WSFrame`` is only valid inside ``on_ws_frame``), reassembles
fragmented messages up to ``max_message_bytes``, answers CLOSE frames, and
implements the session's ``Sink``.

Direct path: once the session is open on msgpack, a binary ``send`` to one
named, online msgpack device with a string id is routed here without the
general session machinery (selector parsing, fan-out bookkeeping): decode,
look up, encode the whole ``msg`` once (``encode_msg``), queue. The compiled
twin decodes straight from picows' buffer and copies the body once, into that
``msg``; this one copies it as Python must. Anything else, and any doubt, goes to
``Session.on_envelope`` with the already-decoded header, which applies the
full rules. Both paths produce the same frames, receipts and counters.

Write coalescing: outgoing data frames are queued per connection; the first
frame queued in an event-loop iteration schedules one ``call_soon`` flush
(``WriteCoalescer``) that writes every queued connection's batch with a
single ``writelines``: one send syscall per connection per iteration instead
of one per message. Server frames are unmasked, so framing them is a 2, 4 or
10 byte header. Control frames (close, pong) go through picows; a
connection's batch is flushed before its close frame.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from picows import WSFrame, WSListener, WSMsgType, WSTransport

from ..errors import CloseCode, ErrorCode
from ..transport.linger import close_code_not_echoed, close_gently_after_1009
from .codec import decode_envelope, encode_msg
from .errors import EnvelopeError
from .routing import RESULT_ROUTED

if TYPE_CHECKING:
    from ..contracts import FastPathHub, FastPathSession

log = logging.getLogger("rccs.session")

_BINARY = WSMsgType.BINARY
_TEXT = WSMsgType.TEXT
_CONTINUATION = WSMsgType.CONTINUATION
_CLOSE = WSMsgType.CLOSE

_FIN_TEXT = 0x81
_FIN_BINARY = 0x82
_SHORT_TEXT_HEADERS = [bytes((_FIN_TEXT, n)) for n in range(126)]
_SHORT_BINARY_HEADERS = [bytes((_FIN_BINARY, n)) for n in range(126)]

MAX_ID_CHARS = 128
MAX_REFUSED_PER_SECOND = 1000  # rate-limited messages within one second before the connection is closed (1008)
MIN_INT_ID = -(2**63)
MAX_INT_ID = 2**64 - 1
_NIL = b"\xc0"


def _reply_close_code(frame: WSFrame) -> int:
    """The code to answer a peer's close with: its own, or 1000 when it sent none (1005 must not be sent)."""
    code = int(frame.get_close_code())  # type: ignore[call-overload]
    return 1000 if code in (0, 1005, 1006) else code


def frame_header(length: int, text: bool) -> bytes:
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

    def __init__(self) -> None:
        self._dirty: list[Any] = []
        self._loop: asyncio.AbstractEventLoop | None = None

    def schedule(self, connection: Any) -> None:
        if not self._dirty:
            if self._loop is None:
                self._loop = asyncio.get_running_loop()
            self._loop.call_soon(self.flush)
        self._dirty.append(connection)

    def flush(self) -> None:
        dirty, self._dirty = self._dirty, []
        for connection in dirty:
            connection.flush()


class ServerConnection(WSListener):
    """One accepted WebSocket connection; the Sink of its Session.

    ``session_factory(hub, connection)`` builds the Session when the
    WebSocket handshake completes (the connection does not import sessions).
    """

    def __init__(self, hub: FastPathHub, coalescer: WriteCoalescer,
                 session_factory: Callable[[Any, Any], FastPathSession]):
        super().__init__()
        self.hub = hub
        self.coalescer = coalescer
        self.session_factory = session_factory
        self.transport: WSTransport | None = None
        self.session: FastPathSession = None  # type: ignore[assignment]  # set by the handshake, None until then
        self.peer = "?"
        self._outbox: list[bytes] | None = None
        # Looked up once per connection, not per flush (as the compiled twin and picows itself do).
        self._writelines: Any = None
        self._write_buffer_size: Any = None
        self._max_outbound_bytes = 0
        self._fragments: bytearray | None = None
        self._fragments_text = False
        self._aborted = False
        self._close_counted = False  # the close frame sent was asked for by the session, which counted it
        self._hello_timer: asyncio.TimerHandle | None = None
        # Set by hello_done when the session is open on msgpack: the direct path's state.
        self._direct = False
        self._live_acks = True
        self._user: str = ""
        self._device: str = ""
        self._routing: Any = None
        self._stats: Any = None
        # Whole messages and payload bytes in and out (the session's counters read these).
        self.frames_in = 0
        self.frames_out = 0
        self.bytes_in = 0
        self.bytes_out = 0
        # Messages the direct path handled itself (sends routed, acks settled): tests check it is taken.
        self.direct_sends = 0
        self.direct_acks = 0
        # Per-device token bucket over every message after hello (send_rate per second, send_burst deep).
        self._rate = 0.0
        self._burst = 0.0
        self._tokens = 0.0
        self._stamp_ns = 0
        self._refused_in_a_row = 0  # refusals since the last accepted message: only the first is answered
        self._refused_in_window = 0  # refusals in the current one-second window
        self._window_ns = 0

    # ---- picows callbacks ----------------------------------------------

    def on_ws_connected(self, transport: WSTransport) -> None:
        self.transport = transport
        # The compiled twin drops picows' retained upgrade request/response here (~1 KB per idle
        # device); their attributes are read-only from Python, so this one keeps them.
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
            transport.send_close(int(code), b"server full" if hub.accepting else b"shutting down")  # type: ignore[arg-type]
            transport.disconnect()
            return
        # A 1009 close (an oversized message, still arriving) drains before the socket closes, so the
        # client reads the close frame rather than a reset.
        close_gently_after_1009(transport)
        self.session = self.session_factory(hub, self)
        self._hello_timer = asyncio.get_running_loop().call_later(
            hub.settings.hello_timeout, self.session.on_hello_timeout
        )

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        session = self.session
        if session is None or transport.is_close_frame_sent:
            # picows keeps parsing after it refused an oversized frame and may
            # still deliver that frame; nothing is accepted once we are closing.
            return
        if frame.rsv1 or frame.rsv2 or frame.rsv3:  # no extension is negotiated (RFC 6455 section 5.2)
            session.close(CloseCode.PROTOCOL_ERROR, "reserved bits set")
            return
        msg_type = frame.msg_type
        if msg_type in (_BINARY, _TEXT):
            if self._fragments is not None:
                session.close(CloseCode.PROTOCOL_ERROR, "new message inside a fragmented message")
                return
            if frame.fin:
                payload = frame.get_payload_as_bytes()
                self.frames_in += 1
                self.bytes_in += len(payload)
                if self._rate > 0.0 and not self._take_token():
                    self._refuse(payload, msg_type == _TEXT)
                    return
                if self._direct and msg_type == _BINARY and session.held is None:
                    self._on_binary(payload)
                else:
                    session.on_frame(payload, msg_type == _TEXT)
            else:
                self._fragments = bytearray(frame.get_payload_as_memoryview())
                self._fragments_text = msg_type == _TEXT
        elif msg_type == _CONTINUATION:
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
        elif msg_type == _CLOSE:
            if int(frame.get_close_code()) >= 5000:  # type: ignore[call-overload]  # picows checks those below
                session.close(CloseCode.PROTOCOL_ERROR, "invalid close code")
                return
            session.on_peer_close(int(frame.get_close_code()))  # type: ignore[call-overload]
            self.flush()  # what was queued before the peer's close still goes out, ahead of our reply
            if not transport.is_close_frame_sent:
                transport.send_close(_reply_close_code(frame))  # type: ignore[arg-type]
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
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

    # ---- rate limit ---------------------------------------------------------

    def _take_token(self) -> bool:
        now = time.monotonic_ns()
        tokens = min(self._burst, self._tokens + (now - self._stamp_ns) * 1e-9 * self._rate)
        self._stamp_ns = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
            self._refused_in_a_row = 0
            return True
        self._tokens = tokens
        return False

    def _refuse(self, payload: bytes, text: bool) -> None:
        """Over the device's rate: not handled. The first refusal of a streak is answered (rate_limited);
        the rest are dropped unanswered, so a flood cannot make the server write an error per frame.
        More than MAX_REFUSED_PER_SECOND refusals within a second close the connection (1008)."""
        now = self._stamp_ns
        if now - self._window_ns > 1_000_000_000:
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

    # ---- direct path --------------------------------------------------------

    def _on_binary(self, payload: bytes) -> None:
        """A whole binary message on an open msgpack session."""
        started = time.perf_counter_ns()
        try:
            header, body_start, body_end = decode_envelope(payload)
        except EnvelopeError:
            self.session.on_frame(payload, False)  # the session reports the error
            return
        op = header.get("op")
        try:
            if op == "send":
                if self._send_direct(header, payload, body_start, body_end, started):
                    return
            elif op == "ack" and self._ack_direct(header):
                return
        except Exception:
            # Contained like the session's own handlers: logged, answered, the connection lives on.
            log.exception("internal error handling a frame from %s", self.peer)
            self.session.send_error(ErrorCode.INTERNAL, "internal server error", header.get("id"))
            return
        self.session.on_envelope(header, payload, body_start, body_end, False)

    def _ack_direct(self, header: dict[str, Any]) -> bool:
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

    def _send_direct(self, header: dict[str, Any], payload: bytes, body_start: int, body_end: int,
                     started: int) -> bool:
        """Route the common ``send``; False (having done nothing) for anything else."""
        to = header.get("to")
        msg_id = header.get("id")
        app_type = header.get("type")
        ack = header.get("ack", False)
        if not (type(to) is dict and len(to) == 1 and type(app_type) is str
                and (ack is False or (ack is True and self._live_acks))):
            return False
        # Any key beyond op, id, to, type, ack (body is not in the header) is a delivery option
        # (ttl, priority, durable, first_ack, ...): validated and applied by the general path.
        if len(header) > 5 or (len(header) == 5 and "ack" not in header):
            return False
        if type(msg_id) is str:
            if not 0 < len(msg_id) <= MAX_ID_CHARS:
                return False
        elif type(msg_id) is not int or not MIN_INT_ID <= msg_id <= MAX_INT_ID:
            return False
        name = to.get("device")
        if not (type(name) is str and 0 < len(name) <= MAX_ID_CHARS and 0 < len(app_type) <= MAX_ID_CHARS
                and name != self._device):
            return False
        # Online under this user means owned by this user: ownership is recorded at hello.
        target = self._routing.get(self._user, name)
        if target is None:
            return False
        target_connection = target.sink
        if not (type(target_connection) is ServerConnection and target_connection._direct):
            return False
        self._routing.touch(self._user, self._device)
        body = payload[body_start:body_end] if body_start >= 0 else _NIL
        # One clock reading for the idempotency window and the msg's ts; the msg is encoded, with the seq
        # it would take, before the duplicate check (the compiled twin reads the body from it there).
        now_ms = time.time_ns() // 1_000_000
        seq = target.next_seq
        frame = encode_msg(msg_id, self._device, app_type, body, now_ms, ack, seq)
        if ack:
            repeated = self.hub.deliveries.first_time(self._device, msg_id, body, now_ms)
            if repeated is not None:
                self.session.on_repeated_send(msg_id, repeated)
                self.direct_sends += 1
                return True
        target.next_seq = seq + 1
        target_connection.send_frame(frame, False)
        if ack:
            target.pending[seq] = (self._user, self._device, msg_id, frame, False)
        stats = self._stats
        stats.count_frames(1, 1)
        stats.record_route(RESULT_ROUTED, time.perf_counter_ns() - started)
        self.direct_sends += 1
        if ack:
            self.session.send_control({"op": "receipt", "id": msg_id, "status": "routed", "devices": [name]})
        return True

    # ---- Sink ---------------------------------------------------------------

    def send_frame(self, data: bytes, text: bool) -> None:
        transport = self.transport
        if transport is None or transport.is_close_frame_sent:
            return
        self.frames_out += 1
        self.bytes_out += len(data)
        outbox = self._outbox
        if outbox is None:
            self._outbox = [frame_header(len(data), text), data]
            self.coalescer.schedule(self)
        else:
            outbox.append(frame_header(len(data), text))
            outbox.append(data)

    def flush(self) -> None:
        """Write the frames queued since the last flush in one go."""
        outbox = self._outbox
        if outbox is None:
            return
        self._outbox = None
        transport = self.transport
        if transport is not None and not transport.is_disconnected and not transport.is_close_frame_sent:
            self._writelines(outbox)
            if self._write_buffer_size() > self._max_outbound_bytes:
                self._drop_slow_consumer()

    def _drop_slow_consumer(self) -> None:
        """A device that does not read must not grow the server's memory: abort its connection.

        Aborted, not closed: a close frame would queue behind the unread data.
        """
        self._direct = False
        self._aborted = True
        self.hub.closes_sent[int(CloseCode.SLOW_CONSUMER)] += 1
        log.warning("dropping %s: more than %d bytes waiting to be written", self.peer, self._max_outbound_bytes)
        assert self.transport is not None
        self.transport.disconnect(False)
        if self.session is not None:
            self.session.on_closed()

    def close(self, code: int, reason: str) -> None:
        self._direct = False
        transport = self.transport
        if transport is None:
            return
        self.flush()
        if self._aborted:  # the flush found a slow consumer and aborted the connection
            return
        if not transport.is_close_frame_sent:
            self._close_counted = True
            transport.send_close(int(code), reason.encode("utf-8")[:123])  # type: ignore[arg-type]
        transport.disconnect()
        if self.session is not None:
            self.session.on_closed()

    def hello_done(self) -> None:
        """The session said welcome: stop the hello timer; enable the direct path on msgpack."""
        if self._hello_timer is not None:
            self._hello_timer.cancel()
            self._hello_timer = None
        session = self.session
        assert session.user is not None and session.device is not None  # welcome names them
        self._user = session.user
        self._device = session.device
        self._routing = self.hub.routing
        self._stats = self.hub.stats
        self._direct = session.encoding == "msgpack"
        self._live_acks = self.hub.live_acks
        settings = self.hub.settings
        self._rate = float(settings.send_rate)
        self._burst = float(max(1, settings.send_burst))
        # The bucket belongs to the device, not the connection: reconnecting does not refill it.
        self._tokens, self._stamp_ns = self.hub.rate_buckets.pop(session.device, (self._burst, time.monotonic_ns()))
