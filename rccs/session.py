"""One connection's protocol state machine.

Theory of operation: a Session is fed whole WebSocket messages
(``on_frame(payload, is_text)``) and answers through a ``Sink`` (send a frame,
close). It never touches sockets, so tests can drive it without any.

States (every change of ``state`` happens in this file)::

    AWAIT_HELLO --hello ok--> OPEN --close/disconnect--> CLOSED
    AWAIT_HELLO --pair.redeem / unknown credential: store lookup--> AWAIT_APPROVAL
    AWAIT_APPROVAL --approved, paired--> OPEN;  --lookup done / refused--> AWAIT_HELLO
    AWAIT_HELLO --anything else / bad credential / timeout--> CLOSED (close 44xx)

A session (its id, seq counter, unacked messages, counters) outlives its
connection: when a connection drops without the device saying goodbye (close
1000), the hub keeps the session resumable for ``session_grace`` seconds and a
``hello`` with ``resume`` continues it on a new connection.

In OPEN, an envelope's ``op`` names its handler in one table (``hub.ops``,
merged by node.py from the features' own tables); the session imports no
feature. ``send`` and ``ack`` are handled by ``messaging`` (or by the listener's
direct path); the session keeps only what is per connection: its next ``seq``,
its unacked messages (``pending``) and the writing of frames.
"""

from __future__ import annotations

import contextlib
import logging
import secrets
from collections import deque
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

import msgpack

from ._fastpath import EnvelopeError, append_seq, decode_envelope
from .clock import now_ms
from .contracts import Outgoing, PendingAck, Sink
from .errors import (
    STORE_RETRY_AFTER,
    CloseCode,
    CredentialNotCached,
    ErrorCode,
    HelloRefused,
    ProtocolError,
    ReceiptReason,
)
from .messaging import answer_repeated
from .protocol import (
    JSON,
    MSGPACK,
    NIL,
    PROTOCOL_VERSION,
    check_message_id,
    convert_frame,
    json_dumps,
    json_loads,
    parse_resume,
)
from .store import STATUS_OFFLINE, STATUS_ONLINE, DeviceRecord, PendingMessage, SessionRecord, StoreError

if TYPE_CHECKING:
    import asyncio

    from .hub import Hub

__all__ = ["AWAIT_APPROVAL", "AWAIT_HELLO", "CLOSED", "OPEN", "Session", "Sink"]

log = logging.getLogger("rccs.session")

AWAIT_HELLO = 0
OPEN = 1
CLOSED = 2
AWAIT_APPROVAL = 3

# Envelopes that may wait behind a request still running (section 2: answers come in order). A client
# that pipelines more than this gets the connection closed with 1008 instead of growing the server.
MAX_HELD_ENVELOPES = 1000
MAX_HELD_BYTES = 16 * 1024 * 1024


class Session:
    """Protocol state of one connection. All methods run on the event loop thread."""

    __slots__ = ("__weakref__", "base_counters", "connected_at", "connected_ms", "created", "device", "encoding",
                 "ended", "expired", "expires_at", "flushed_total", "frame", "held", "held_bytes", "hub", "id",
                 "inbox_ids", "inbox_loaded", "inbox_more", "last_activity", "moved", "next_seq",
                 "peer_said_goodbye", "pending", "retry", "revoked", "sink", "state", "user", "work")

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
        self.frame: tuple[bytes, int, int, bool] | None = None  # the envelope being dispatched (payload, body)
        # While a request runs in the background (run_request), later envelopes wait here, so that every
        # answer leaves in the order the envelopes came: None when nothing runs. The listener's direct path
        # is off meanwhile (it reads this field).
        self.held: deque[tuple[Any, ...]] | None = None
        self.held_bytes = 0
        hub.attach(self)

    # ---- what a handler sees (contracts.Conn) ----------------------------

    @property
    def peer(self) -> str:
        return self.sink.peer

    @property
    def closed(self) -> bool:
        return self.state == CLOSED

    def frame_body(self) -> tuple[bool, bytes | None]:
        assert self.frame is not None, "frame_body() is valid only while a handler runs"
        payload, body_start, body_end, is_text = self.frame
        if is_text:
            return True, None
        return False, payload[body_start:body_end] if body_start >= 0 else NIL

    def extend(self, expires_at: int) -> None:
        self.expires_at = expires_at
        self.hub.watch_expiry(self)
        self.hub.dirty(self.id)

    def await_approval(self) -> None:
        """Nothing but the pending answer is handled (pairing: the store answers, or a person approves)."""
        self.state = AWAIT_APPROVAL

    def back_to_hello(self) -> None:
        """A refused redemption: the connection may try again (or hello) until the hello timeout."""
        if self.state != CLOSED:
            self.state = AWAIT_HELLO

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

    def send_frame(self, data: bytes, text: bool) -> None:
        """A frame already in this connection's encoding (nothing once it is closed)."""
        if self.state != CLOSED:
            self.sink.send_frame(data, text)

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
        if self.held is None:
            self.held = deque()

        async def run() -> None:
            try:
                await work()
            except ProtocolError as exc:
                extra = {"retry_after": exc.retry_after} if exc.retry_after is not None else {}
                self.send_error(exc.code, exc.message, msg_id, **extra, **exc.extra)
            except StoreError as exc:
                if type(exc) is not StoreError:  # a refusal the feature should have answered: a bug
                    log.exception("internal error in %r from %s", header.get("op"), self.sink.peer)
                    self.send_error(ErrorCode.INTERNAL, "internal server error", msg_id)
                    return
                log.warning("store unavailable for %r from %s: %s", header.get("op"), self.sink.peer, exc)
                self.send_error(ErrorCode.UNAVAILABLE, "the store cannot be reached; try again", msg_id,
                                retry_after=STORE_RETRY_AFTER)
            except Exception:
                log.exception("internal error in %r from %s", header.get("op"), self.sink.peer)
                self.send_error(ErrorCode.INTERNAL, "internal server error", msg_id)
            finally:
                self._release_held()

        self.hub.spawn(run())

    def _hold(self, entry: tuple[Any, ...], size: int) -> None:
        assert self.held is not None
        self.held.append(entry)
        self.held_bytes += size
        if len(self.held) > MAX_HELD_ENVELOPES or self.held_bytes > MAX_HELD_BYTES:
            self.close(CloseCode.POLICY_VIOLATION, "too many envelopes waiting behind a running request")

    def _release_held(self) -> None:
        """The running request answered: handle what waited behind it, until one starts another request."""
        held, self.held = self.held, None
        self.held_bytes = 0
        while held and self.state != CLOSED:
            entry = held.popleft()
            if len(entry) == 2:
                self.on_frame(entry[0], entry[1])
            else:
                self.on_envelope(entry[0], entry[1], entry[2], entry[3], entry[4])
            if self.held is not None:  # that envelope started a request: the rest wait for it in turn
                self.held = held
                self.held_bytes = sum(len(entry[0] if len(entry) == 2 else entry[1]) for entry in held)
                return

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
        if self.held is not None:
            self._hold((payload, is_text), len(payload))
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
        if self.held is not None:
            self._hold((header, payload, body_start, body_end, is_text), len(payload))
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
            handler = self.hub.ops.get(op) if isinstance(op, str) else None
            if handler is not None:
                self.frame = (payload, body_start, body_end, is_text)
                try:
                    handler(self, header)
                finally:
                    self.frame = None
            elif op == "ping":
                pong: dict[str, Any] = {"op": "pong", "server_time": now_ms()}
                if header.get("id") is not None:  # echoed only when it is a valid id (section 3)
                    pong["id"] = check_message_id(header["id"])
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
        hello_op = self.hub.hello_ops.get(op) if isinstance(op, str) else None
        if hello_op is not None:
            hello_op(self, header)
            return
        if op != "hello":
            self._refuse(ErrorCode.UNAUTHORIZED, "the first message must be a hello", CloseCode.BAD_HELLO)
            return
        login = self.hub.login
        wait = 0.0 if looked_up else login.hello_wait(self.sink.peer)
        if wait:
            self.send_error(ErrorCode.RATE_LIMITED, "too many hellos from this address", header.get("id"),
                            retry_after=round(wait, 3))
            self.close(CloseCode.TOO_MANY_HELLOS, "too many hellos from this address")
            return
        resume = parse_resume(header.get("resume"))
        try:
            device, auth_expires_at = login.authenticate(header, header.get("device"), looked_up)
        except HelloRefused as refusal:
            self._refuse(refusal.error, refusal.message, refusal.close_code)
            return
        except CredentialNotCached as missing:
            self.state = AWAIT_APPROVAL  # nothing else is handled while the store answers
            self.hub.spawn(self._hello_after_lookup(header, is_text, missing.credential_hash))
            return
        hub = self.hub
        if hub.broker.spans_nodes:
            registering = hub.router.registry_written(device.id)
            if registering is not None or (resume is not None and resume[0] not in hub.live
                                           and resume[0] not in hub.detached):
                self.state = AWAIT_APPROVAL  # as above, while the store answers
                if self.held is None:
                    self.held = deque()  # what the device sends meanwhile is handled after its welcome, in order
                hub.spawn(self._open_from_store(header, is_text, device, auth_expires_at, resume, registering))
                return
        self.open(device, auth_expires_at, resume)

    async def _open_from_store(self, header: dict[str, Any], is_text: bool, device: DeviceRecord,
                               auth_expires_at: int, resume: tuple[str, int] | None,
                               registering: asyncio.Future[StoreError | None] | None) -> None:
        """Several nodes: a device that registered (or changed) with this hello is in the shared store before
        its welcome, so that a send from any node finds it from then on; a session this node does not hold,
        perhaps dropped on another node, is read from the store."""
        hub = self.hub
        try:
            failure = await registering if registering is not None else None
            if failure is not None:
                self._store_unavailable_at_hello(header, is_text, failure)
                return
            if resume is not None and resume[0] not in hub.live and resume[0] not in hub.detached:
                try:
                    record = await hub.store.get_session(resume[0])
                except StoreError as exc:
                    self._store_unavailable_at_hello(header, is_text, exc)
                    return
                if self.state == CLOSED:
                    return
                if record is not None and record.device == device.id:
                    hub.adopt_resumable(record, now_ms())
            if self.state == CLOSED:
                return
            self.state = AWAIT_HELLO
            self.open(device, auth_expires_at, resume)
        finally:
            self._release_held()

    def _store_unavailable_at_hello(self, header: dict[str, Any], is_text: bool, exc: StoreError) -> None:
        if self.state != CLOSED:
            log.warning("store unavailable for the hello of %s: %s", self.sink.peer, exc)
            self.encoding = JSON if is_text else MSGPACK
            self.send_error(ErrorCode.UNAVAILABLE, "the store cannot be reached; try again", header.get("id"),
                            retry_after=STORE_RETRY_AFTER)
            self.close(CloseCode.TRY_AGAIN_LATER, "store unavailable")

    async def _hello_after_lookup(self, header: dict[str, Any], is_text: bool, credential_hash: str) -> None:
        """A credential this node does not know yet (made by the CLI a moment ago?): ask the store once."""
        try:
            await self.hub.login.look_up_credential(credential_hash)
        except StoreError as exc:
            self._store_unavailable_at_hello(header, is_text, exc)
            return
        if self.state == CLOSED:
            return
        self.state = AWAIT_HELLO
        try:
            self._on_hello("hello", header, is_text, looked_up=True)
        except ProtocolError as exc:
            self._on_protocol_error(exc, header, is_text)

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
        takeover: Any = None
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
        hub.router.set_presence(self.user, self.device, STATUS_ONLINE, now)
        hub.bus.emit("device.connected", user=self.user, device=self.device, session=self.id,
                     resumed=resumed_from is not None, peer=self.sink.peer)
        hub.deliveries.on_online(self)
        for opened in hub.on_open:
            opened(self)
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

    # ---- writing messages (the bookkeeping of this connection's seqs and unacked messages) ----

    def deliver(self, outgoing: Outgoing, sender_user: str) -> None:
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
    def deliver_msgpack(self, prefix: bytes, ack: bool, sender_user: str, sender_device: str,
                        msg_id: str | int) -> None:
        """Write one msgpack ``msg`` (``prefix`` from encode_msg_prefix) with this session's next seq."""
        seq = self.next_seq
        frame = append_seq(prefix, seq)
        self.sink.send_frame(frame, False)
        self.next_seq = seq + 1
        if ack:
            self.pending[seq] = (sender_user, sender_device, msg_id, frame, False)
    def track(self, seq: int, item: Any) -> None:
        if self.work is None:
            self.work = {}
        self.work[seq] = item

    def withdraw(self, seq: int, msg_id: str | int, sender: str) -> PendingAck | None:
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
        """An ack:true send whose id was used recently (the listener's direct path asks)."""
        answer_repeated(self, msg_id, repeated)

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
        if previous_state != OPEN:
            if previous_state == AWAIT_APPROVAL:
                for abandoned in hub.on_abandon:
                    abandoned(self)
            return
        hub.unregister(self)
        for closed in hub.on_close:
            closed(self)
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
            hub.router.set_presence(self.user, self.device, STATUS_OFFLINE, now)
        log.debug("device %s of user %s disconnected", self.device, self.user,
                  extra={"user": self.user, "device": self.device, "session": self.id, "peer": self.sink.peer})


