"""One connection's protocol logic.

Theory of operation: a Session is fed whole WebSocket messages
(``on_frame(payload, is_text)``) and answers through a ``Sink`` (send a frame,
close). It never touches sockets, so tests can drive it without any.

States::

    AWAIT_HELLO --hello ok--> OPEN --close/disconnect--> CLOSED
    AWAIT_HELLO --anything else / bad token / timeout--> CLOSED (close 44xx)

In OPEN, ``send`` resolves the selector through the hub's routing table,
encodes the ``msg`` envelope once per receiver encoding (the msgpack ``body``
bytes are copied untouched), and gives each receiver its next ``seq``.
Messages sent with ``ack: true`` are remembered per receiver by ``seq`` until
it acks (the sender gets ``delivered``) or disconnects (``failed``).
"""

from __future__ import annotations

import contextlib
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from ._fastpath import EnvelopeError, append_seq, decode_envelope, encode_msg_prefix
from ._fastpath import routing as fast_routing
from .auth import TokenError
from .errors import CloseCode, ErrorCode, ProtocolError, ReceiptReason
from .protocol import (
    JSON,
    MAX_ACK_BATCH,
    MAX_ID_CHARS,
    MSGPACK,
    NIL,
    PROTOCOL_VERSION,
    DeviceInfo,
    check_message_id,
    json_dumps,
    json_loads,
    json_value_to_msgpack,
    msgpack_body_to_json_value,
    parse_device_info,
    parse_selector,
)

if TYPE_CHECKING:
    from .hub import Hub

log = logging.getLogger("rccs.session")

AWAIT_HELLO = 0
OPEN = 1
CLOSED = 2

_SELECT_KIND = {
    "all": fast_routing.SELECT_ALL,
    "type": fast_routing.SELECT_TYPE,
    "capability": fast_routing.SELECT_CAPABILITY,
}
_RESULT_ROUTED = fast_routing.RESULT_ROUTED
_RESULT_NO_ROUTE = fast_routing.RESULT_NO_ROUTE
_RESULT_OFFLINE = fast_routing.RESULT_OFFLINE
_RESULT_REJECTED = fast_routing.RESULT_REJECTED


class Sink(Protocol):
    """What a session needs from its transport."""

    peer: str

    def send_frame(self, data: bytes, text: bool) -> None: ...

    def close(self, code: int, reason: str) -> None: ...

    def hello_done(self) -> None: ...


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# A message awaiting the receiver's ack: (sender user, sender device, the sender's message id).
PendingAck = tuple[str, str, str | int]


class _Outgoing:
    """One ``send`` being routed: its body in whichever encodings receivers need, built lazily once."""

    __slots__ = ("ack", "app_type", "body_json", "body_raw", "from_json", "json_prefix", "msg_id",
                 "msgpack_prefix", "sender", "ts")

    def __init__(self, msg_id: str | int, sender: str, app_type: str, ack: bool,
                 body_raw: bytes | None, body_json: Any, from_json: bool):
        self.msg_id = msg_id
        self.sender = sender
        self.app_type = app_type
        self.ack = ack
        self.ts = now_ms()
        self.body_raw = body_raw
        self.body_json = body_json
        self.from_json = from_json
        self.msgpack_prefix: bytes | None = None
        self.json_prefix: bytes | None = None

    def msgpack_frame_prefix(self) -> bytes:
        if self.msgpack_prefix is None:
            if self.body_raw is None:
                self.body_raw = json_value_to_msgpack(self.body_json)
            self.msgpack_prefix = encode_msg_prefix(
                self.msg_id, self.sender, self.app_type, self.body_raw, self.ts, self.ack
            )
        return self.msgpack_prefix

    def json_frame_prefix(self) -> bytes:
        if self.json_prefix is None:
            if not self.from_json:
                assert self.body_raw is not None
                self.body_json = msgpack_body_to_json_value(self.body_raw)
            head = {"op": "msg", "id": self.msg_id, "from": self.sender, "type": self.app_type,
                    "body": self.body_json, "ts": self.ts, "ack": self.ack}
            self.json_prefix = json_dumps(head)[:-1] + b',"seq":'
        return self.json_prefix


class Session:
    """Protocol state of one connection. All methods run on the event loop thread."""

    __slots__ = ("__weakref__", "device", "encoding", "hub", "id", "info", "next_seq", "pending", "sink",
                 "state", "user")

    def __init__(self, hub: Hub, sink: Sink):
        self.hub = hub
        self.sink = sink
        self.state = AWAIT_HELLO
        self.encoding = MSGPACK
        self.id = ""
        self.user: str | None = None
        self.device: str | None = None
        self.info: DeviceInfo | None = None
        self.next_seq = 1
        self.pending: dict[int, PendingAck] = {}
        hub.attach(self)

    # ---- output -------------------------------------------------------

    def send_control(self, envelope: dict[str, Any]) -> None:
        """Send a server-generated envelope in this connection's encoding."""
        if self.state == CLOSED:
            return
        if self.encoding == MSGPACK:
            self.sink.send_frame(msgpack.packb(envelope, use_bin_type=True), False)
        else:
            self.sink.send_frame(json_dumps(envelope), True)

    def send_error(self, code: ErrorCode, message: str, msg_id: Any = None) -> None:
        self.hub.errors_sent[code.value] += 1
        envelope: dict[str, Any] = {"op": "error", "code": code.value, "message": message}
        if msg_id is not None:
            with contextlib.suppress(ProtocolError):  # an invalid id is not echoed
                envelope["id"] = check_message_id(msg_id)
        self.send_control(envelope)

    def close(self, code: int, reason: str) -> None:
        """Close the connection; ``on_closed`` follows when the transport reports it."""
        if self.state == CLOSED:
            return
        self.hub.closes_sent[int(code)] += 1
        self.sink.close(code, reason)
        self.on_closed()

    def _refuse(self, error: ErrorCode, message: str, close_code: CloseCode) -> None:
        self.send_error(error, message)
        self.close(close_code, message[:120])

    # ---- input --------------------------------------------------------

    def on_frame(self, payload: bytes, is_text: bool) -> None:
        """Handle one whole WebSocket message. Never raises."""
        if self.state == CLOSED:
            return
        try:
            if is_text:
                header = json_loads(payload)
                if not isinstance(header, dict):
                    raise ProtocolError(ErrorCode.BAD_REQUEST, "envelope must be a JSON object")
                body_start = body_end = -1
            else:
                try:
                    header, body_start, body_end = decode_envelope(payload)
                except EnvelopeError as exc:
                    raise ProtocolError(ErrorCode.BAD_REQUEST, f"malformed msgpack envelope: {exc}") from None
        except ProtocolError as exc:
            self._on_protocol_error(exc, None, is_text)
            return
        self.on_envelope(header, payload, body_start, body_end, is_text)

    def on_envelope(self, header: dict[str, Any], payload: bytes, body_start: int, body_end: int,
                    is_text: bool) -> None:
        """Handle one decoded envelope (``body`` bytes at ``payload[body_start:body_end]`` for msgpack,
        inside ``header`` for JSON). Never raises."""
        if self.state == CLOSED:
            return
        try:
            op = header.get("op")
            if self.state == AWAIT_HELLO:
                self._on_hello(op, header, is_text)
                return
            assert self.user is not None and self.device is not None
            self.hub.routing.touch(self.user, self.device)
            if op == "send":
                self._on_send(header, payload, body_start, body_end, is_text)
            elif op == "ack":
                self._on_ack(header)
            elif op == "ping":
                pong: dict[str, Any] = {"op": "pong", "server_time": now_ms()}
                if "id" in header:
                    pong["id"] = header["id"]
                self.send_control(pong)
            elif op == "hello":
                raise ProtocolError(ErrorCode.BAD_REQUEST, "hello was already accepted on this connection")
            elif isinstance(op, str):
                raise ProtocolError(ErrorCode.UNKNOWN_OP, f"unknown op {op[:64]!r}")
            else:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "envelope needs an 'op' string")
        except ProtocolError as exc:
            self._on_protocol_error(exc, header, is_text)
        except Exception:
            log.exception("internal error handling a frame from %s", self.sink.peer)
            self.send_error(ErrorCode.INTERNAL, "internal server error", header.get("id"))

    def _on_protocol_error(self, exc: ProtocolError, header: dict[str, Any] | None, is_text: bool) -> None:
        if self.state == AWAIT_HELLO:
            if is_text:
                self.encoding = JSON
            self._refuse(exc.code, exc.message, CloseCode.BAD_HELLO)
        else:
            self.send_error(exc.code, exc.message, None if header is None else header.get("id"))

    def _on_hello(self, op: Any, header: dict[str, Any], is_text: bool) -> None:
        self.encoding = JSON if is_text else MSGPACK
        if op != "hello":
            self._refuse(ErrorCode.UNAUTHORIZED, "the first message must be a hello", CloseCode.BAD_HELLO)
            return
        info = parse_device_info(header.get("device"))
        try:
            identity = self.hub.tokens.verify(header.get("token"))
        except TokenError as exc:
            self._refuse(ErrorCode.UNAUTHORIZED, str(exc), CloseCode.UNAUTHORIZED)
            return
        owner = self.hub.owner_of(identity.device)
        if owner is not None and owner != identity.user:
            self._refuse(ErrorCode.FORBIDDEN, "this device id belongs to another user", CloseCode.FORBIDDEN)
            return
        self.user = identity.user
        self.device = identity.device
        self.info = info
        self.id = secrets.token_urlsafe(12)
        self.state = OPEN
        self.sink.hello_done()
        previous = self.hub.register(self)
        self.send_control({
            "op": "welcome",
            "protocol": PROTOCOL_VERSION,
            "session": self.id,
            "user": self.user,
            "device": self.device,
            "heartbeat": self.hub.settings.heartbeat,
            "server_time": now_ms(),
            "encoding": self.encoding,
            "max_message_bytes": self.hub.settings.max_message_bytes,
        })
        if previous is not None:
            # After the welcome: closing it fails its unacked messages, and those receipts may be ours.
            previous.close(CloseCode.REPLACED, "replaced by a newer connection of this device")
        log.debug("device %s of user %s connected from %s (%s)", self.device, self.user, self.sink.peer, info.type)

    def on_hello_timeout(self) -> None:
        if self.state == AWAIT_HELLO:
            self.encoding = JSON
            self.close(CloseCode.HELLO_TIMEOUT, "no hello in time")

    # ---- send ---------------------------------------------------------

    def _on_send(self, header: dict[str, Any], payload: bytes, body_start: int, body_end: int, is_text: bool) -> None:
        started = time.perf_counter_ns()
        stats = self.hub.stats
        try:
            msg_id = check_message_id(header.get("id"))
            app_type = header.get("type")
            if not isinstance(app_type, str) or not app_type:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "'type' must be a non-empty string")
            if len(app_type) > MAX_ID_CHARS:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"'type' is longer than {MAX_ID_CHARS} characters")
            ack = header.get("ack", False)
            if not isinstance(ack, bool):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "'ack' must be a boolean")
            selector = parse_selector(header.get("to"))
            targets, failures = self._resolve(selector)
        except ProtocolError:
            stats.record_route(_RESULT_REJECTED, time.perf_counter_ns() - started)
            raise
        assert self.device is not None and self.user is not None
        if is_text:
            outgoing = _Outgoing(msg_id, self.device, app_type, ack, None, header.get("body"), True)
        else:
            raw = payload[body_start:body_end] if body_start >= 0 else NIL
            outgoing = _Outgoing(msg_id, self.device, app_type, ack, raw, None, False)
        delivered: list[str] = []
        for target in targets:
            try:
                target.deliver(outgoing, self.user)
            except ProtocolError as exc:
                if exc.code != ErrorCode.UNCONVERTIBLE:
                    raise
                failures.append((target.device, ReceiptReason.UNCONVERTIBLE))
            else:
                delivered.append(target.device)  # type: ignore[arg-type]
        stats.count_frames(1, len(delivered))
        if delivered:
            result = _RESULT_ROUTED
        elif failures and all(reason == ReceiptReason.OFFLINE for _, reason in failures):
            result = _RESULT_OFFLINE
        else:
            result = _RESULT_NO_ROUTE
        stats.record_route(result, time.perf_counter_ns() - started)
        if ack:
            for device, reason in failures:
                receipt: dict[str, Any] = {"op": "receipt", "id": msg_id, "status": "failed", "reason": reason.value}
                if device is not None:
                    receipt["device"] = device
                self.send_control(receipt)
            self.send_control({"op": "receipt", "id": msg_id, "status": "routed", "devices": delivered})
        elif not delivered:
            if failures and all(reason == ReceiptReason.UNCONVERTIBLE for _, reason in failures):
                raise ProtocolError(ErrorCode.UNCONVERTIBLE, "the body cannot be converted for any receiver")
            raise ProtocolError(ErrorCode.NO_ROUTE, "no online device matched 'to'")

    def deliver_msgpack(self, prefix: bytes, ack: bool, sender_user: str, sender_device: str,
                        msg_id: str | int) -> None:
        """Write one msgpack ``msg`` (``prefix`` from encode_msg_prefix) with this session's next seq."""
        seq = self.next_seq
        self.sink.send_frame(append_seq(prefix, seq), False)
        self.next_seq = seq + 1
        if ack:
            self.pending[seq] = (sender_user, sender_device, msg_id)

    def _resolve(self, selector: Any) -> tuple[list[Session], list[tuple[str | None, ReceiptReason]]]:
        """Receivers of a selector and the devices it could not reach, with why."""
        hub = self.hub
        user = self.user
        assert user is not None
        exclude = None if selector.include_self else self.device
        if selector.kind in ("device", "devices"):
            names = [selector.value] if selector.kind == "device" else selector.value
            for name in names:
                owner = hub.owner_of(name)
                if owner is not None and owner != user:
                    raise ProtocolError(ErrorCode.FORBIDDEN, f"device {name!r} belongs to another user")
            targets: list[Session] = []
            online: list[str] = []
            failures: list[tuple[str | None, ReceiptReason]] = []
            for name in names:
                if name == exclude:
                    continue
                session = hub.online(user, name)
                if session is None:
                    failures.append((name, ReceiptReason.OFFLINE))
                else:
                    targets.append(session)
                    online.append(name)
            if selector.pick_one and len(targets) > 1:
                targets = [hub.routing.most_recent(user, online)]  # type: ignore[list-item]
            if not targets and not failures:
                failures.append((None, ReceiptReason.NO_ROUTE))
            return targets, failures
        found: list[Session] = hub.routing.select(  # type: ignore[assignment]
            user, _SELECT_KIND[selector.kind], selector.value, selector.pick_one, exclude
        )
        if not found:
            return found, [(None, ReceiptReason.NO_ROUTE)]
        return found, []

    def deliver(self, outgoing: _Outgoing, sender_user: str) -> None:
        """Write one ``msg`` to this receiver, remembering it if the sender wants a receipt."""
        if self.encoding == MSGPACK:
            self.deliver_msgpack(outgoing.msgpack_frame_prefix(), outgoing.ack, sender_user, outgoing.sender,
                                 outgoing.msg_id)
            return
        seq = self.next_seq
        self.sink.send_frame(outgoing.json_frame_prefix() + str(seq).encode() + b"}", True)
        self.next_seq = seq + 1
        if outgoing.ack:
            self.pending[seq] = (sender_user, outgoing.sender, outgoing.msg_id)

    # ---- ack ----------------------------------------------------------

    def _on_ack(self, header: dict[str, Any]) -> None:
        seqs = header.get("seq")
        if isinstance(seqs, int) and not isinstance(seqs, bool):
            seqs = [seqs]
        elif not isinstance(seqs, list) or not seqs:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'seq' must be an integer or a non-empty list of integers")
        if len(seqs) > MAX_ACK_BATCH:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"more than {MAX_ACK_BATCH} seqs in one ack")
        for seq in seqs:
            if not isinstance(seq, int) or isinstance(seq, bool):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "'seq' must be an integer or a list of integers")
        for seq in seqs:
            pending = self.pending.pop(seq, None)
            if pending is not None:
                sender_user, sender_device, msg_id = pending
                self.hub.send_receipt(sender_user, sender_device, {
                    "op": "receipt", "id": msg_id, "status": "delivered", "device": self.device,
                })

    # ---- end ----------------------------------------------------------

    def on_closed(self) -> None:
        """The connection is gone: leave the routing table and fail what was never acked."""
        if self.state == CLOSED:
            return
        was_open = self.state == OPEN
        self.state = CLOSED
        self.hub.detach(self)
        if not was_open:
            return
        self.hub.unregister(self)
        pending, self.pending = self.pending, {}
        for sender_user, sender_device, msg_id in pending.values():
            self.hub.send_receipt(sender_user, sender_device, {
                "op": "receipt", "id": msg_id, "status": "failed",
                "reason": ReceiptReason.DISCONNECTED.value, "device": self.device,
            })
        log.debug("device %s of user %s disconnected", self.device, self.user)
