"""One connection's protocol logic.

Theory of operation: a Session is fed whole WebSocket messages
(``on_frame(payload, is_text)``) and answers through a ``Sink`` (send a frame,
close). It never touches sockets, so tests can drive it without any.

States::

    AWAIT_HELLO --hello ok--> OPEN --close/disconnect--> CLOSED
    AWAIT_HELLO --pair.redeem, code needs approval--> AWAIT_APPROVAL --approved--> OPEN
    AWAIT_HELLO --anything else / bad credential / timeout--> CLOSED (close 44xx)

A session (its id, seq counter, unacked messages, counters) outlives its
connection: when a connection drops without the device saying goodbye (close
1000), the hub keeps the session resumable for ``session_grace`` seconds and a
``hello`` with ``resume`` continues it on a new connection.

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
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

import msgpack

from . import pairing, rpc, state, tasks
from ._fastpath import EnvelopeError, append_seq, decode_envelope, encode_msg_prefix
from ._fastpath import routing as fast_routing
from .auth import TokenError
from .credentials import looks_like_credential, secret_hash
from .devices import DEVICE_OPS, register_device, update_device
from .errors import CloseCode, ErrorCode, ProtocolError, ReceiptReason
from .protocol import (
    JSON,
    MAX_ACK_BATCH,
    MAX_ID_CHARS,
    MSGPACK,
    NIL,
    PROTOCOL_VERSION,
    check_message_id,
    convert_frame,
    json_dumps,
    json_loads,
    json_value_to_msgpack,
    msgpack_body_to_json_value,
    parse_delivery_options,
    parse_device_fields,
    parse_selector,
)
from .store import STATUS_OFFLINE, STATUS_ONLINE, DeviceRecord, PendingMessage, SessionRecord, StoreError
from .store.base import QueuedMessage

if TYPE_CHECKING:
    from .hub import Hub

log = logging.getLogger("rccs.session")

AWAIT_HELLO = 0
OPEN = 1
CLOSED = 2
AWAIT_APPROVAL = 3

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
    # Whole WebSocket messages and their payload bytes, in and out, on this connection.
    frames_in: int
    frames_out: int
    bytes_in: int
    bytes_out: int

    def send_frame(self, data: bytes, text: bool) -> None: ...

    def close(self, code: int, reason: str) -> None: ...

    def hello_done(self) -> None: ...


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# A message awaiting the receiver's ack: (sender user, sender device, the sender's message id,
# the frame as written, True if that frame is JSON text) -- the frame is kept for redelivery on resume.
PendingAck = tuple[str, str, str | int, bytes, bool]


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


class _Refusal(Exception):
    """A hello that cannot open a session: answered with an error, then the close code."""

    def __init__(self, error: ErrorCode, message: str, close_code: CloseCode):
        super().__init__(message)
        self.error = error
        self.message = message
        self.close_code = close_code


class _CredentialNotCached(Exception):
    def __init__(self, credential_hash: str):
        super().__init__("credential not in the registry")
        self.credential_hash = credential_hash


class Session:
    """Protocol state of one connection. All methods run on the event loop thread."""

    __slots__ = ("__weakref__", "base_counters", "connected_at", "connected_ms", "created", "device", "encoding",
                 "ended", "expired", "expires_at", "flushed_total", "hub", "id", "inbox_ids", "inbox_loaded",
                 "inbox_more", "last_activity", "moved", "next_seq", "peer_said_goodbye", "pending", "retry",
                 "revoked", "sink", "state", "user", "work")

    def __init__(self, hub: Hub, sink: Sink):
        self.hub = hub
        self.sink = sink
        self.state = AWAIT_HELLO
        self.encoding = MSGPACK
        self.id = ""
        self.user: str | None = None
        self.device: str | None = None
        self.next_seq = 1
        self.pending: dict[int, PendingAck] = {}
        self.created = 0
        self.expires_at = 0
        self.connected_at = now_ms()  # of the connection until hello; of the session's connection after
        self.connected_ms = 0
        self.last_activity = 0
        self.base_counters = (0, 0, 0, 0)  # messages in/out, bytes in/out of earlier connections
        self.flushed_total = 0
        # Why the connection ends decides whether the session stays resumable.
        self.peer_said_goodbye = False
        self.revoked = False
        self.expired = False
        self.ended = False  # replaced by a new session of the same device
        self.moved = False  # resumed on a newer connection, which now owns the session
        # Durable delivery: seq -> inbox id of messages written from the inbox (None until one is);
        # seq -> [deadline ms, attempts] of unacked messages (None until the first redelivery sweep).
        self.inbox_ids: dict[int, int] | None = None
        self.retry: dict[int, list[int]] | None = None
        self.work: dict[int, Any] | None = None  # seq -> work item / first-ack group this message belongs to
        self.inbox_loaded = False  # the inbox was read after welcome: new inbox messages go out at once
        self.inbox_more = False  # the inbox held more than one page
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

    def send_shared(self, envelope: dict[str, Any], frames: dict[str, tuple[bytes, bool]]) -> None:
        """Send an envelope that goes to many connections, encoded once per encoding (``frames`` caches it)."""
        if self.state == CLOSED:
            return
        frame = frames.get(self.encoding)
        if frame is None:
            frame = frames[self.encoding] = ((msgpack.packb(envelope, use_bin_type=True), False)
                                             if self.encoding == MSGPACK else (json_dumps(envelope), True))
        self.sink.send_frame(frame[0], frame[1])

    def send_error(self, code: ErrorCode, message: str, msg_id: Any = None, **extra: Any) -> None:
        self.hub.errors_sent[code.value] += 1
        envelope: dict[str, Any] = {"op": "error", "code": code.value, "message": message, **extra}
        if msg_id is not None:
            with contextlib.suppress(ProtocolError):  # an invalid id is not echoed
                envelope["id"] = check_message_id(msg_id)
        self.send_control(envelope)

    def reply(self, header: dict[str, Any], envelope: dict[str, Any]) -> None:
        """Answer a request, echoing its ``id`` when it has a valid one."""
        msg_id = header.get("id")
        if msg_id is not None:
            with contextlib.suppress(ProtocolError):
                envelope["id"] = check_message_id(msg_id)
        self.send_control(envelope)

    def run_request(self, header: dict[str, Any], work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Handle a request in the background (it needs the store); a refusal ``work`` raises
        (ProtocolError, with its fields) answers the request, as does a failure (``internal``, logged)."""
        msg_id = header.get("id")

        async def run() -> None:
            try:
                await work()
            except ProtocolError as exc:
                self.send_error(exc.code, exc.message, msg_id, **exc.extra)
            except StoreError as exc:
                log.error("store failure in %r from %s: %s", header.get("op"), self.sink.peer, exc)
                self.send_error(ErrorCode.INTERNAL, "internal server error", msg_id)
            except Exception:
                log.exception("internal error in %r from %s", header.get("op"), self.sink.peer)
                self.send_error(ErrorCode.INTERNAL, "internal server error", msg_id)

        self.hub.spawn(run())

    def close(self, code: int, reason: str) -> None:
        """Close the connection; ``on_closed`` follows when the transport reports it."""
        if self.state == CLOSED:
            return
        self.hub.closes_sent[int(code)] += 1
        self.sink.close(code, reason)
        self.on_closed()

    def _refuse(self, error: ErrorCode, message: str, close_code: CloseCode) -> None:
        # A refused hello is worth a line (failed logins); never with the token or credential itself.
        log.info("refused %s: %s (close %d)", self.sink.peer, message, int(close_code),
                 extra={"peer": self.sink.peer, "reason": error.value, "close": int(close_code)})
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
            if self.state == AWAIT_APPROVAL:
                raise ProtocolError(ErrorCode.BAD_REQUEST, "waiting for the pairing to be approved")
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
            elif op in DEVICE_OPS:
                DEVICE_OPS[op](self, header)
            elif op in rpc.RPC_OPS:
                rpc.RPC_OPS[op](self, header)
            elif op in state.STATE_OPS:
                state.STATE_OPS[op](self, header)
            elif op in tasks.TASK_OPS:
                tasks.TASK_OPS[op](self, header)
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
            extra = {"retry_after": exc.retry_after} if exc.retry_after is not None else {}
            self.send_error(exc.code, exc.message, None if header is None else header.get("id"), **extra,
                            **exc.extra)

    def on_rate_limited(self, payload: bytes, is_text: bool, retry_after: float) -> None:
        """A message over the device's send rate: not handled; the error names its id when readable."""
        msg_id = None
        with contextlib.suppress(ProtocolError, EnvelopeError):  # an unreadable message gets an error without id
            if is_text:
                header = json_loads(payload)
                msg_id = header.get("id") if isinstance(header, dict) else None
            else:
                msg_id = decode_envelope(payload)[0].get("id")
        self.send_error(ErrorCode.RATE_LIMITED, "over this device's send rate; slow down", msg_id,
                        retry_after=round(max(retry_after, 0.001), 3))

    def state_is_open(self) -> bool:
        return self.state == OPEN

    def on_peer_close(self, code: int) -> None:
        """The device sent a close frame; 1000 means it is done with this session."""
        self.peer_said_goodbye = code == 1000

    # ---- hello --------------------------------------------------------

    def _on_hello(self, op: Any, header: dict[str, Any], is_text: bool, looked_up: bool = False) -> None:
        self.encoding = JSON if is_text else MSGPACK
        if op == "pair.redeem":
            pairing.redeem(self, header)
            return
        if op != "hello":
            self._refuse(ErrorCode.UNAUTHORIZED, "the first message must be a hello", CloseCode.BAD_HELLO)
            return
        if self.hub.settings.hello_rate_per_address > 0 and not looked_up:
            wait = self.hub.hello_limiter.take(self.sink.peer.rsplit(":", 1)[0], time.monotonic())
            if wait:
                self.send_error(ErrorCode.RATE_LIMITED, "too many hellos from this address", header.get("id"),
                                retry_after=round(wait, 3))
                self.close(CloseCode.TOO_MANY_HELLOS, "too many hellos from this address")
                return
        resume = parse_resume(header.get("resume"))
        try:
            device, auth_expires_at = self.authenticate(header, header.get("device"), looked_up)
        except _Refusal as refusal:
            self._refuse(refusal.error, refusal.message, refusal.close_code)
            return
        except _CredentialNotCached as missing:
            self.state = AWAIT_APPROVAL  # nothing else is handled while the store answers
            self.hub.spawn(self._hello_after_lookup(header, is_text, missing.credential_hash))
            return
        self.open(device, auth_expires_at, resume)

    async def _hello_after_lookup(self, header: dict[str, Any], is_text: bool, credential_hash: str) -> None:
        """A credential this node does not know yet (made by the CLI a moment ago?): ask the store once."""
        hub = self.hub
        try:
            device = await hub.store.find_device_by_credential(credential_hash)
        except Exception:
            log.exception("looking up a credential failed")
            device = None
        if self.state == CLOSED:
            return
        self.state = AWAIT_HELLO
        known = hub.registry.get(device.id) if device is not None else None
        if device is not None and device.revoked_at is None and (known is None or known.revoked_at is None):
            hub.registry.users.add(device.user)
            hub.registry.put(device)
        self.on_envelope_hello(header, is_text)

    def on_envelope_hello(self, header: dict[str, Any], is_text: bool) -> None:
        try:
            self._on_hello("hello", header, is_text, looked_up=True)
        except ProtocolError as exc:
            self._on_protocol_error(exc, header, is_text)

    def authenticate(self, header: dict[str, Any], device_map: Any,
                     looked_up: bool = True) -> tuple[DeviceRecord, int]:
        """The device a hello (or refresh) proves, and when that proof expires (ms). Raises _Refusal.

        Applies ``device_map`` (the device's self-description) to the registry; a dev token for an
        unknown device registers it (and its user).
        """
        hub = self.hub
        settings = hub.settings
        now = now_ms()
        credential = header.get("credential")
        token = header.get("token")
        if credential is not None:
            if not looks_like_credential(credential):
                raise _Refusal(ErrorCode.UNAUTHORIZED, "malformed credential", CloseCode.UNAUTHORIZED)
            device = hub.registry.by_credential(secret_hash(credential))
            if device is None and not looked_up:
                raise _CredentialNotCached(secret_hash(credential))
            if device is None:
                raise _Refusal(ErrorCode.UNAUTHORIZED, "unknown or revoked credential", CloseCode.UNAUTHORIZED)
            expires_at = now + int(settings.session_ttl * 1000)
            fields = {} if device_map is None else parse_device_fields(device_map, settings.max_metadata_bytes, False)
        else:
            if token is None:
                raise _Refusal(ErrorCode.UNAUTHORIZED, "a 'credential' or 'token' is required",
                               CloseCode.UNAUTHORIZED)
            if not settings.dev_tokens:
                raise _Refusal(ErrorCode.UNAUTHORIZED, "this server does not accept dev tokens; use a credential",
                               CloseCode.UNAUTHORIZED)
            try:
                identity = hub.tokens.verify(token)
            except TokenError as exc:
                raise _Refusal(ErrorCode.UNAUTHORIZED, str(exc), CloseCode.UNAUTHORIZED) from None
            known = hub.registry.get(identity.device)
            fields = {} if device_map is None and known is not None else \
                parse_device_fields(device_map, settings.max_metadata_bytes, known is None)
            if known is not None and known.user != identity.user:
                raise _Refusal(ErrorCode.FORBIDDEN, "this device id belongs to another user", CloseCode.FORBIDDEN)
            if known is not None and known.revoked_at is not None:
                raise _Refusal(ErrorCode.REVOKED, "this device was revoked", CloseCode.REVOKED)
            device = known if known is not None else register_device(hub, identity.user, identity.device, now)
            expires_at = identity.expires_at * 1000
        if fields:
            update_device(hub, device, fields)
        return device, expires_at

    def open(self, device: DeviceRecord, auth_expires_at: int, resume: tuple[str, int] | None,
             welcome_extra: dict[str, Any] | None = None) -> None:
        """Open (or resume) the device's session on this connection and say welcome."""
        hub = self.hub
        now = now_ms()
        self.user = device.user
        self.device = device.id
        self.expires_at = auth_expires_at
        self.connected_at = self.last_activity = now
        resumed_from: SessionRecord | None = None
        resume_error = None
        takeover: Session | None = None
        if resume is not None:
            session_id = resume[0]
            live = hub.live.get(session_id)
            if live is not None and live.device == device.id:
                takeover = live  # the old connection has not noticed it is dead yet
                resumed_from = live.snapshot(with_pending=True)
                live.moved = True
                live.pending = {}
            else:
                found = hub.take_resumable(session_id, device.id, now)
                if isinstance(found, str):
                    resume_error = found
                else:
                    resumed_from = found
        if resumed_from is not None:
            self.id = resumed_from.id
            self.created = resumed_from.created
            assert resume is not None
            # A record saved before a crash may lag the device: never reuse a seq it has seen.
            self.next_seq = max(resumed_from.next_seq, resume[1] + 1)
            self.connected_ms = resumed_from.connected_ms
            self.base_counters = (resumed_from.messages_in, resumed_from.messages_out,
                                  resumed_from.bytes_in, resumed_from.bytes_out)
            redeliver = resumed_from.pending
            hub.events["session_resumed"] += 1
        else:
            self.id = secrets.token_urlsafe(12)
            self.created = now
            redeliver = []
            hub.events["session_opened"] += 1
        self.state = OPEN
        self.sink.hello_done()
        previous = hub.register(self)
        hub.watch_expiry(self)
        welcome: dict[str, Any] = {
            "op": "welcome",
            "protocol": PROTOCOL_VERSION,
            "session": self.id,
            "resumed": resumed_from is not None,
            "user": self.user,
            "device": self.device,
            "heartbeat": hub.settings.heartbeat,
            "server_time": now,
            "expires_at": self.expires_at,
            "next_seq": self.next_seq,
            "encoding": self.encoding,
            "max_message_bytes": hub.settings.max_message_bytes,
        }
        if resume_error is not None:
            welcome["resume_error"] = resume_error
        if welcome_extra:
            welcome.update(welcome_extra)
        self.send_control(welcome)
        for message in sorted(redeliver, key=lambda m: m.seq):
            self._redeliver(message)
        if previous is not None and previous is not self:
            if previous is not takeover:
                previous.ended = True
            # After the welcome: closing it fails its unacked messages, and those receipts may be ours.
            previous.close(CloseCode.REPLACED, "replaced by a newer connection of this device")
        hub.set_presence(self.user, self.device, STATUS_ONLINE, now)
        hub.bus.emit("device.connected", user=self.user, device=self.device, session=self.id,
                     resumed=resumed_from is not None, peer=self.sink.peer)
        hub.spawn(hub.deliveries.on_online(self))
        tasks.on_welcome(self)
        log.debug("device %s of user %s connected from %s (session %s%s)", self.device, self.user,
                  self.sink.peer, self.id, ", resumed" if resumed_from else "",
                  extra={"user": self.user, "device": self.device, "session": self.id, "peer": self.sink.peer})

    def _redeliver(self, message: PendingMessage) -> None:
        frame, text = message.frame, message.text
        if text != (self.encoding == JSON):
            try:
                frame, text = convert_frame(frame, text), not text
            except ProtocolError:
                self.hub.send_receipt(message.sender_user, message.sender_device, {
                    "op": "receipt", "id": message.msg_id, "status": "failed",
                    "reason": ReceiptReason.UNCONVERTIBLE.value, "device": self.device,
                })
                return
        self.sink.send_frame(frame, text)
        self.pending[message.seq] = (message.sender_user, message.sender_device, message.msg_id, frame, text)

    def on_hello_timeout(self) -> None:
        if self.state == AWAIT_HELLO:
            self.encoding = JSON
            self.close(CloseCode.HELLO_TIMEOUT, "no hello in time")

    # ---- session record -----------------------------------------------

    def counters(self) -> tuple[int, int, int, int]:
        sink = self.sink
        base = self.base_counters
        return (base[0] + sink.frames_in, base[1] + sink.frames_out, base[2] + sink.bytes_in,
                base[3] + sink.bytes_out)

    def counters_changed(self) -> bool:
        """True (and the activity stamp moved) if messages went in or out since the last call."""
        total = self.sink.frames_in + self.sink.frames_out
        if total == self.flushed_total:
            return False
        self.flushed_total = total
        self.last_activity = now_ms()
        return True

    def snapshot(self, with_pending: bool) -> SessionRecord:
        assert self.user is not None and self.device is not None
        messages_in, messages_out, bytes_in, bytes_out = self.counters()
        from_inbox = self.inbox_ids or {}
        # Messages that came from the inbox stay there until acked: they are not part of the session.
        pending = [PendingMessage(seq, entry[0], entry[1], entry[2], entry[3], entry[4])
                   for seq, entry in self.pending.items() if seq not in from_inbox] if with_pending else []
        return SessionRecord(
            id=self.id, user=self.user, device=self.device, created=self.created, expires_at=self.expires_at,
            next_seq=self.next_seq, last_activity=self.last_activity,
            connected_at=self.connected_at if self.state == OPEN else None,
            connected_ms=self.connected_ms, messages_in=messages_in, messages_out=messages_out,
            bytes_in=bytes_in, bytes_out=bytes_out, pending=pending,
        )

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
            settings = self.hub.settings
            ttl, priority, durable = parse_delivery_options(header, settings.default_ttl, settings.max_ttl)
            selector = parse_selector(header.get("to"))
            first_ack = header.get("first_ack", False)
            if not isinstance(first_ack, bool):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "'first_ack' must be a boolean")
            if first_ack and (not ack or selector.pick_one or durable):
                raise ProtocolError(ErrorCode.BAD_REQUEST,
                                    "'first_ack' needs 'ack': true, pick \"all\" and no 'durable'")
            order = selector_order(header.get("to"), selector)
            targets, failures, offline = self._resolve(selector, ack)
            if first_ack:
                offline = []  # the first online device to ack wins; nothing waits in inboxes
        except ProtocolError:
            stats.record_route(_RESULT_REJECTED, time.perf_counter_ns() - started)
            raise
        assert self.device is not None and self.user is not None
        if is_text:
            outgoing = _Outgoing(msg_id, self.device, app_type, ack, None, header.get("body"), True)
        else:
            raw = payload[body_start:body_end] if body_start >= 0 else NIL
            outgoing = _Outgoing(msg_id, self.device, app_type, ack, raw, None, False)
        if ack:
            body_key = json_dumps(outgoing.body_json) if is_text else outgoing.body_raw
            repeated = self.hub.deliveries.first_time(self.device, msg_id, body_key or b"", now_ms())
            if repeated is not None:
                stats.record_route(_RESULT_REJECTED, time.perf_counter_ns() - started)
                self.on_repeated_send(msg_id, repeated)
                return
            if durable:
                offline = offline + [self.hub.registry.devices[t.device] for t in targets]  # type: ignore[index]
                targets = []
            if offline:
                self._enqueue(outgoing, offline, ttl, priority, "accepted" if durable else "queued", failures)
        delivered: list[str] = []
        written: list[tuple[Session, int]] = []
        for target in targets:
            try:
                target.deliver(outgoing, self.user)
            except ProtocolError as exc:
                if exc.code != ErrorCode.UNCONVERTIBLE:
                    raise
                failures.append((target.device, ReceiptReason.UNCONVERTIBLE))
            else:
                delivered.append(target.device)  # type: ignore[arg-type]
                written.append((target, target.next_seq - 1))
        if ack and written:
            if first_ack and len(written) > 1:
                group = FirstAckGroup(self.user, self.device, msg_id, written)
                for target, seq in written:
                    target.track(seq, group)
            elif selector.pick_one:
                target, seq = written[0]
                target.track(seq, WorkItem(self.user, self.device, outgoing, selector, order, target))
        stats.count_frames(1, len(delivered))
        if delivered or offline:
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
            routed: dict[str, Any] = {"op": "receipt", "id": msg_id, "status": "routed", "devices": delivered}
            if offline:
                routed["queued"] = [device.id for device in offline]
            self.send_control(routed)
        elif not delivered:
            if failures and all(reason == ReceiptReason.UNCONVERTIBLE for _, reason in failures):
                raise ProtocolError(ErrorCode.UNCONVERTIBLE, "the body cannot be converted for any receiver")
            raise ProtocolError(ErrorCode.NO_ROUTE, "no online device matched 'to'")

    def deliver_msgpack(self, prefix: bytes, ack: bool, sender_user: str, sender_device: str,
                        msg_id: str | int) -> None:
        """Write one msgpack ``msg`` (``prefix`` from encode_msg_prefix) with this session's next seq."""
        seq = self.next_seq
        frame = append_seq(prefix, seq)
        self.sink.send_frame(frame, False)
        self.next_seq = seq + 1
        if ack:
            self.pending[seq] = (sender_user, sender_device, msg_id, frame, False)

    def _enqueue(self, outgoing: _Outgoing, devices: list[DeviceRecord], ttl: float, priority: int, status: str,
                 failures: list[tuple[str | None, ReceiptReason]]) -> None:
        """Keep the message in these devices' inboxes; receipts follow once it is committed."""
        assert self.user is not None and self.device is not None
        try:
            body = outgoing.body_raw if outgoing.body_raw is not None else json_value_to_msgpack(outgoing.body_json)
        except ProtocolError:
            failures.extend((device.id, ReceiptReason.UNCONVERTIBLE) for device in devices)
            return
        expires_at = outgoing.ts + int(ttl * 1000)
        for device in devices:
            self.hub.deliveries.enqueue(QueuedMessage(
                device=device.id, user=self.user, sender_device=self.device, msg_id=outgoing.msg_id,
                type=outgoing.app_type, body=body, ts=outgoing.ts, priority=priority, expires_at=expires_at,
                receipt=True), status)

    def track(self, seq: int, item: Any) -> None:
        if self.work is None:
            self.work = {}
        self.work[seq] = item

    def withdraw(self, seq: int, msg_id: str | int, sender: str) -> tuple[Any, ...] | None:
        """Take back an unacked message: forget it and tell the device to stop (``retract``)."""
        entry = self.pending.pop(seq, None)
        if self.work:
            self.work.pop(seq, None)
        if self.retry:
            self.retry.pop(seq, None)
        if entry is not None:
            self.send_control({"op": "retract", "seq": seq, "id": msg_id, "from": sender})
        return entry

    def on_repeated_send(self, msg_id: str | int, repeated: str) -> None:
        """An ack:true send whose id was used recently: never delivered twice."""
        if repeated == "duplicate":
            self.send_control({"op": "receipt", "id": msg_id, "status": "duplicate"})
        else:
            self.send_error(ErrorCode.DUPLICATE_ID, "this message id was used for a different message recently",
                            msg_id)

    def deliver_queued(self, message: QueuedMessage) -> int | None:
        """Write an inbox message (acks required) with this session's next seq; returns the seq."""
        outgoing = _Outgoing(message.msg_id, message.sender_device, message.type, True, message.body, None, False)
        outgoing.ts = message.ts
        try:
            self.deliver(outgoing, message.user)
        except ProtocolError:
            return None
        seq = self.next_seq - 1
        if self.inbox_ids is None:
            self.inbox_ids = {}
        self.inbox_ids[seq] = message.id
        return seq

    def retry_due(self, now: int, deliveries: Any) -> None:
        """Write again what waited for an ack past its deadline; too many attempts make a dead letter."""
        if self.retry is None:
            self.retry = {}
        retry = self.retry
        for seq in [seq for seq in retry if seq not in self.pending]:
            del retry[seq]
        for seq, entry in list(self.pending.items()):
            state = retry.get(seq)
            if state is None:
                retry[seq] = [now + int(deliveries.backoff(1) * 1000), 1]
                continue
            if now < state[0]:
                continue
            work = self.work.get(seq) if self.work else None
            if work is not None and work.overdue(self, seq):
                continue  # moved to another device
            inbox_id = self.inbox_ids.get(seq) if self.inbox_ids else None
            attempts = state[1] + 1
            if attempts > self.hub.settings.max_delivery_attempts:
                del self.pending[seq]
                del retry[seq]
                if inbox_id is not None:
                    del self.inbox_ids[seq]  # type: ignore[union-attr]
                    deliveries.dead_letter_ids([inbox_id], entry, self.device)
                else:
                    deliveries.dead_letter_live(self, entry)
                continue
            state[0] = now + int(deliveries.backoff(attempts) * 1000)
            state[1] = attempts
            deliveries.stats["redelivered"] += 1
            self.sink.send_frame(entry[3], entry[4])
            if inbox_id is not None:
                deliveries.count_attempt(inbox_id)

    def _resolve(self, selector: Any, ack: bool) -> tuple[list[Session], list[tuple[str | None, ReceiptReason]],
                                                         list[DeviceRecord]]:
        """Online receivers of a selector, the devices it could not reach (with why), and -- for ``ack``
        sends -- the user's registered devices it names that are offline (they get it in their inbox)."""
        hub = self.hub
        user = self.user
        assert user is not None
        exclude = None if selector.include_self else self.device
        offline: list[DeviceRecord] = []
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
                if session is not None:
                    targets.append(session)
                    online.append(name)
                    continue
                record = hub.registry.get(name) if ack else None
                if record is not None and record.revoked_at is None:
                    offline.append(record)
                else:
                    failures.append((name, ReceiptReason.OFFLINE))
            if selector.pick_one:
                if len(targets) > 1:
                    targets = [hub.routing.most_recent(user, online)]  # type: ignore[list-item]
                if targets:
                    offline = []
                elif len(offline) > 1:
                    offline = [max(offline, key=lambda record: record.last_seen)]
                if targets or offline:
                    failures = []
            if not targets and not failures and not offline:
                failures.append((None, ReceiptReason.NO_ROUTE))
            return targets, failures, offline
        found: list[Session] = hub.routing.select(  # type: ignore[assignment]
            user, _SELECT_KIND[selector.kind], selector.value, selector.pick_one, exclude
        )
        if ack and not (found and selector.pick_one):
            offline = [record for record in hub.registry.user_devices(user)
                       if record.id != exclude and hub.online(user, record.id) is None
                       and _matches(record, selector)]
            if selector.pick_one and len(offline) > 1:
                offline = [max(offline, key=lambda record: record.last_seen)]
        if not found and not offline:
            return found, [(None, ReceiptReason.NO_ROUTE)], offline
        return found, [], offline

    def deliver(self, outgoing: _Outgoing, sender_user: str) -> None:
        """Write one ``msg`` to this receiver, remembering it if the sender wants a receipt."""
        if self.encoding == MSGPACK:
            self.deliver_msgpack(outgoing.msgpack_frame_prefix(), outgoing.ack, sender_user, outgoing.sender,
                                 outgoing.msg_id)
            return
        seq = self.next_seq
        frame = outgoing.json_frame_prefix() + str(seq).encode() + b"}"
        self.sink.send_frame(frame, True)
        self.next_seq = seq + 1
        if outgoing.ack:
            self.pending[seq] = (sender_user, outgoing.sender, outgoing.msg_id, frame, True)

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
                self.hub.send_receipt(pending[0], pending[1], {
                    "op": "receipt", "id": pending[2], "status": "delivered", "device": self.device,
                })
                if self.inbox_ids:
                    inbox_id = self.inbox_ids.pop(seq, None)
                    if inbox_id is not None:
                        self.hub.deliveries.on_acked(self, inbox_id)
                if self.work:
                    item = self.work.pop(seq, None)
                    if item is not None:
                        item.acked(self)

    # ---- end ----------------------------------------------------------

    def on_closed(self) -> None:
        """The connection is gone: leave the routing table; keep the session resumable or end it."""
        if self.state == CLOSED:
            return
        previous_state = self.state
        self.state = CLOSED
        hub = self.hub
        hub.detach(self)
        traffic, sink = hub.closed_traffic, self.sink
        traffic[0] += sink.frames_in
        traffic[1] += sink.frames_out
        traffic[2] += sink.bytes_in
        traffic[3] += sink.bytes_out
        if previous_state == AWAIT_APPROVAL:
            pairing.abandon(self)
        if previous_state != OPEN:
            return
        hub.unregister(self)
        rpc.on_closed(self)
        state.on_closed(self)
        tasks.on_closed(self)
        assert self.user is not None and self.device is not None
        now = now_ms()
        if not self.moved:
            record = self.snapshot(with_pending=True)
            record.connected_at = None
            record.disconnected_at = now
            record.connected_ms += max(0, now - self.connected_at)
            record.last_activity = max(record.last_activity, now if self.sink.frames_in else record.last_activity)
            resumable = not (self.peer_said_goodbye or self.revoked or self.expired or self.ended) \
                and hub.settings.session_grace > 0 and self.expires_at > now
            if self.inbox_ids:
                for inbox_id in self.inbox_ids.values():  # the next connection gets them from the inbox again
                    if hub.deliveries.in_flight.get(inbox_id) is self:
                        del hub.deliveries.in_flight[inbox_id]
            if resumable:
                hub.keep_resumable(record)
            else:
                hub.requeue(record, ReceiptReason.REVOKED if self.revoked else None)
                record.pending = []
                hub.spawn(hub.store.put_sessions([record]))
            self.pending = {}
        hub.bus.emit("device.disconnected", user=self.user, device=self.device, session=self.id)
        if hub.online(self.user, self.device) is None:
            hub.set_presence(self.user, self.device, STATUS_OFFLINE, now)
        log.debug("device %s of user %s disconnected", self.device, self.user,
                  extra={"user": self.user, "device": self.device, "session": self.id, "peer": self.sink.peer})


def parse_resume(resume: Any) -> tuple[str, int] | None:
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



def _matches(device: DeviceRecord, selector: Any) -> bool:
    if selector.kind == "type":
        return bool(device.type == selector.value)
    if selector.kind == "capability":
        return selector.value in device.capabilities
    return True  # all


def selector_order(to: Any, selector: Any) -> str:
    """``to.order``: which device a pick-one work item moves to next ("recent" or, for ``devices``, "listed")."""
    order = to.get("order", "recent") if isinstance(to, dict) else "recent"
    if order not in ("recent", "listed") or (order == "listed" and selector.kind != "devices"):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'to.order' must be \"recent\", or \"listed\" with 'devices'")
    return str(order)


class FirstAckGroup:
    """One message written to several devices with ``first_ack``: the first ack wins, the others are retracted."""

    __slots__ = ("copies", "done", "msg_id", "sender_device", "sender_user")

    def __init__(self, sender_user: str, sender_device: str, msg_id: str | int, copies: list[tuple[Session, int]]):
        self.sender_user = sender_user
        self.sender_device = sender_device
        self.msg_id = msg_id
        self.copies = copies
        self.done = False

    def acked(self, winner: Session) -> None:
        if self.done:
            return
        self.done = True
        for session, seq in self.copies:
            if session is winner or session.state != OPEN:
                continue
            if session.withdraw(seq, self.msg_id, self.sender_device) is not None:
                session.hub.send_receipt(self.sender_user, self.sender_device, {
                    "op": "receipt", "id": self.msg_id, "status": "retracted", "device": session.device})

    def overdue(self, session: Session, seq: int) -> bool:
        return False  # each copy is written again like any unacked message


class WorkItem:
    """A pick-one message with ack: if its device does not ack in time, it moves to the next suitable device."""

    __slots__ = ("order", "outgoing", "selector", "sender_device", "sender_user", "tried")

    def __init__(self, sender_user: str, sender_device: str, outgoing: _Outgoing, selector: Any, order: str,
                 first: Session):
        self.sender_user = sender_user
        self.sender_device = sender_device
        self.outgoing = outgoing
        self.selector = selector
        self.order = order
        self.tried = {first.device}

    def acked(self, session: Session) -> None:
        """The receipt ``delivered`` (sent by the ack path) names the device that processed it."""

    def overdue(self, session: Session, seq: int) -> bool:
        """Move to the next online candidate; False (keep retrying here) when there is none."""
        hub = session.hub
        user = self.sender_user
        selector = self.selector
        if selector.kind in ("device", "devices"):
            names = [selector.value] if selector.kind == "device" else list(selector.value)
        else:
            names = [target.device for target in hub.routing.select(  # type: ignore[attr-defined]
                user, _SELECT_KIND[selector.kind], selector.value, False, None)]
        exclude = None if selector.include_self else self.sender_device
        candidates = [name for name in names if name not in self.tried and name != exclude
                      and hub.online(user, name) is not None]
        if not candidates:
            return False
        if self.order == "listed":
            chosen = hub.online(user, candidates[0])
        else:
            chosen = hub.routing.most_recent(user, candidates)  # type: ignore[assignment]
        assert chosen is not None
        session.withdraw(seq, self.outgoing.msg_id, self.sender_device)
        try:
            chosen.deliver(self.outgoing, user)
        except ProtocolError:
            self.tried.add(chosen.device)
            return False
        self.tried.add(chosen.device)
        chosen.track(chosen.next_seq - 1, self)
        hub.events["work_moved"] += 1
        hub.send_receipt(user, self.sender_device, {"op": "receipt", "id": self.outgoing.msg_id, "status": "moved",
                                                    "device": chosen.device, "from_device": session.device})
        return True
