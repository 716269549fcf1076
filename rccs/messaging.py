"""Messages between a user's devices: ``send`` and ``ack`` (docs/protocol.md sections 4, 5 and 12).

Theory of operation. ``send`` resolves the selector once through the router, builds the ``msg`` frame
once per receiver encoding (the msgpack ``body`` bytes are copied untouched), and writes it to each
online receiver with that receiver's next ``seq``. With ``ack: true`` the sender hears what happened:
``failed`` receipts for what could not be reached, then ``routed`` (and ``queued``/``accepted`` once the
inbox write is committed); registered offline targets get the message in their durable inbox
(``inbox.Deliveries``). An ``ack`` settles the message: the sender gets ``delivered`` through the broker.

Two variants keep more state per message. ``first_ack`` writes to every matching device and retracts the
copies of the losers when one acks (``FirstAckGroup``). ``pick: "one"`` with ack is a work item: if its
device does not ack in time, the redelivery sweep moves it to the next suitable device (``WorkItem``) and
the sender gets ``moved``.

``publish`` is the same send for the operator's backend (the admin API): its sender is not a connection
but a ``BackendSender`` whose device id is ``SERVER_SENDER``; receipts addressed to it after the call are
taken by ``BackendReceipts`` instead of being kept for a device.

The compiled listener has its own direct path for the commonest send and ack (``rccs._fastpath``); it
falls back to these handlers for anything else, and both give the same frames, receipts and counters.
"""

from __future__ import annotations

import collections
import time
from typing import TYPE_CHECKING, Any

from ._fastpath import routing as fast_routing
from .clock import now_ms
from .errors import STORE_RETRY_AFTER, ErrorCode, ProtocolError, ReceiptReason
from .inbox import Deliveries
from .outgoing import Outgoing
from .protocol import (
    JSON,
    MAX_ACK_BATCH,
    MAX_ID_CHARS,
    NIL,
    Selector,
    check_message_id,
    json_dumps,
    json_value_to_msgpack,
    parse_delivery_options,
    parse_selector,
    selector_order,
)
from .router import selector_matches
from .store.base import QueuedMessage

if TYPE_CHECKING:
    from .contracts import Conn, Core, Handler, LiveSession, Sender
    from .router import Router

_RESULT_ROUTED = fast_routing.RESULT_ROUTED
_RESULT_NO_ROUTE = fast_routing.RESULT_NO_ROUTE
_RESULT_OFFLINE = fast_routing.RESULT_OFFLINE
_RESULT_REJECTED = fast_routing.RESULT_REJECTED

SERVER_SENDER = "server"  # the ``from`` of messages published by the backend (admin API)


def answer_repeated(sender: Sender, msg_id: str | int, repeated: str) -> None:
    """An ack:true send whose id was used recently: never delivered twice."""
    if repeated == "duplicate":
        sender.send_control({"op": "receipt", "id": msg_id, "status": "duplicate"})
    else:
        sender.send_error(ErrorCode.DUPLICATE_ID, "this message id was used for a different message recently",
                          msg_id)


class Messaging:
    """The send/ack handlers of one node, and ``publish`` for its backend."""

    def __init__(self, core: Core, router: Router, deliveries: Deliveries):
        self.core = core
        self.router = router
        self.deliveries = deliveries
        self.backend = BackendReceipts(core, router)
        deliveries.receipt_takers.append(self.backend.take)
        self.ops: dict[str, Handler] = {"send": self.op_send, "ack": self.op_ack}

    # ---- send -------------------------------------------------------------------

    def op_send(self, conn: Conn, header: dict[str, Any]) -> None:
        is_text, raw = conn.frame_body()
        self.send(conn, header, raw, is_text)

    def send(self, sender: Sender, header: dict[str, Any], raw_body: bytes | None, is_text: bool) -> None:
        """Route one ``send`` envelope from ``sender`` (``raw_body``: the msgpack body bytes, None for
        JSON, whose body is in ``header``). Raises ProtocolError for what the sender gets as an ``error``."""
        started = time.perf_counter_ns()
        router = self.router
        stats = router.stats
        user, device = sender.user, sender.device
        assert user is not None and device is not None
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
            settings = self.core.settings
            ttl, priority, durable = parse_delivery_options(header, settings.default_ttl, settings.max_ttl)
            selector = parse_selector(header.get("to"))
            first_ack = header.get("first_ack", False)
            if not isinstance(first_ack, bool):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "'first_ack' must be a boolean")
            if first_ack and (not ack or selector.pick_one or durable):
                raise ProtocolError(ErrorCode.BAD_REQUEST,
                                    "'first_ack' needs 'ack': true, pick \"all\" and no 'durable'")
            order = selector_order(header.get("to"), selector)
            if ack and not router.broker.available:
                raise ProtocolError(ErrorCode.UNAVAILABLE, "the store cannot be reached; nothing was sent",
                                    retry_after=STORE_RETRY_AFTER)
            targets, failures, offline = router.resolve(user, device, selector, ack)
            if first_ack:
                offline = []  # the first online device to ack wins; nothing waits in inboxes
        except ProtocolError:
            stats.record_route(_RESULT_REJECTED, time.perf_counter_ns() - started)
            raise
        if is_text:
            outgoing = Outgoing(msg_id, device, app_type, ack, None, header.get("body"), True)
        else:
            outgoing = Outgoing(msg_id, device, app_type, ack, NIL if raw_body is None else raw_body, None, False)
        if ack:
            body_key = json_dumps(outgoing.body_json) if is_text else outgoing.body_raw
            repeated = self.deliveries.first_time(device, msg_id, body_key or b"", now_ms())
            if repeated is not None:
                stats.record_route(_RESULT_REJECTED, time.perf_counter_ns() - started)
                answer_repeated(sender, msg_id, repeated)
                return
            # Several nodes: a node may die holding what it routed, so the online targets' copies are kept
            # in the shared inbox first too (not first_ack and pick one, whose state is this node's).
            if targets and (durable or (router.broker.spans_nodes and not (first_ack or selector.pick_one))):
                online = [router.registry.devices[t.device] for t in targets]  # type: ignore[index]
                self._enqueue(user, device, outgoing, online, ttl, priority, "accepted", failures)
                targets = []
            else:
                online = []
            if offline:
                self._enqueue(user, device, outgoing, offline, ttl, priority, "accepted" if durable else "queued",
                              failures)
            offline = offline + online
        delivered: list[str] = []
        written: list[tuple[LiveSession, int]] = []
        for target in targets:
            try:
                target.deliver(outgoing, user)
            except ProtocolError as exc:
                if exc.code != ErrorCode.UNCONVERTIBLE:
                    raise
                failures.append((target.device, ReceiptReason.UNCONVERTIBLE))
            else:
                delivered.append(target.device)  # type: ignore[arg-type]
                written.append((target, target.next_seq - 1))
        if not ack and self.router.broker.spans_nodes and not (selector.pick_one and delivered):
            delivered += self._send_elsewhere(user, device, selector, outgoing, failures)
        if ack and written:
            if first_ack and len(written) > 1:
                group = FirstAckGroup(self, user, device, msg_id, written)
                for target, seq in written:
                    target.track(seq, group)
            elif selector.pick_one:
                target, seq = written[0]
                target.track(seq, WorkItem(self, user, device, outgoing, selector, order, target))
        stats.count_frames(1, len(delivered))
        if delivered or offline:
            result = _RESULT_ROUTED
        elif failures and all(reason == ReceiptReason.OFFLINE for _, reason in failures):
            result = _RESULT_OFFLINE
        else:
            result = _RESULT_NO_ROUTE
        stats.record_route(result, time.perf_counter_ns() - started)
        if ack:
            for failed_device, reason in failures:
                receipt: dict[str, Any] = {"op": "receipt", "id": msg_id, "status": "failed", "reason": reason.value}
                if failed_device is not None:
                    receipt["device"] = failed_device
                sender.send_control(receipt)
            routed: dict[str, Any] = {"op": "receipt", "id": msg_id, "status": "routed", "devices": delivered}
            if offline:
                routed["queued"] = [record.id for record in offline]
            sender.send_control(routed)
        elif not delivered:
            if failures and all(reason == ReceiptReason.UNCONVERTIBLE for _, reason in failures):
                raise ProtocolError(ErrorCode.UNCONVERTIBLE, "the body cannot be converted for any receiver")
            raise ProtocolError(ErrorCode.NO_ROUTE, "no online device matched 'to'")

    def _send_elsewhere(self, user: str, sender: str, selector: Selector, outgoing: Outgoing,
                        failures: list[tuple[str | None, ReceiptReason]]) -> list[str]:
        """A live (ack:false) message for the devices the selector names that other nodes hold: sent there
        through the broker (their node gives it their seq). Returns them; their failures are dropped."""
        router = self.router
        exclude = None if selector.include_self else sender
        if selector.kind in ("device", "devices"):
            names = [name for name, reason in failures if name is not None and reason == ReceiptReason.OFFLINE]
        else:
            names = [record.id for record in router.registry.user_devices(user)
                     if record.id != exclude and router.online(user, record.id) is None
                     and selector_matches(record, selector)]
        elsewhere = [name for name in names if router.broker.holder(user, name) is not None]
        if selector.pick_one:
            elsewhere = elsewhere[:1]
        if not elsewhere:
            return []
        try:
            body = outgoing.body_raw if outgoing.body_raw is not None else json_value_to_msgpack(outgoing.body_json)
        except ProtocolError:
            return []  # no msgpack form: the local rules (unconvertible) already answered for this body
        message = {"id": outgoing.msg_id, "from": outgoing.sender, "type": outgoing.app_type, "body": body,
                   "ts": outgoing.ts}
        sent = [name for name in elsewhere if router.broker.message_to_device(user, name, message)]
        failures[:] = [(name, reason) for name, reason in failures if name not in sent and name is not None]
        return sent

    def deliver_from_elsewhere(self, user: str, device: str, message: dict[str, Any]) -> bool:
        """A live message another node sent for a device connected here (``Broker.message_to_device``)."""
        session = self.router.online(user, device)
        if session is None:
            return False
        outgoing = Outgoing(message["id"], message["from"], message["type"], False, message["body"], None, False,
                            message["ts"])
        try:
            session.deliver(outgoing, user)
        except ProtocolError:  # its body has no form in this device's encoding: a live message is not kept
            return False
        return True

    def _enqueue(self, user: str, device: str, outgoing: Outgoing, devices: list[Any], ttl: float, priority: int,
                 status: str, failures: list[tuple[str | None, ReceiptReason]]) -> None:
        """Keep the message in these devices' inboxes; receipts follow once it is committed."""
        try:
            body = outgoing.body_raw if outgoing.body_raw is not None else json_value_to_msgpack(outgoing.body_json)
        except ProtocolError:
            failures.extend((record.id, ReceiptReason.UNCONVERTIBLE) for record in devices)
            return
        expires_at = outgoing.ts + int(ttl * 1000)
        for record in devices:
            self.deliveries.enqueue(QueuedMessage(
                device=record.id, user=user, sender_device=device, msg_id=outgoing.msg_id,
                type=outgoing.app_type, body=body, ts=outgoing.ts, priority=priority, expires_at=expires_at,
                receipt=True), status, new_send=True)

    # ---- ack --------------------------------------------------------------------

    def op_ack(self, conn: Conn, header: dict[str, Any]) -> None:
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
        session: LiveSession = conn  # type: ignore[assignment]  # acks come from open sessions only
        for seq in seqs:
            pending = session.pending.pop(seq, None)
            if pending is not None:
                self.deliveries.send_receipt(pending[0], pending[1], {
                    "op": "receipt", "id": pending[2], "status": "delivered", "device": session.device,
                })
                if session.inbox_ids:
                    inbox_id = session.inbox_ids.pop(seq, None)
                    if inbox_id is not None:
                        self.deliveries.on_acked(session, inbox_id)
                if session.work:
                    item = session.work.pop(seq, None)
                    if item is not None:
                        item.acked(session)

    # ---- the backend's messages -----------------------------------------------------

    def publish(self, user: str, header: dict[str, Any]) -> BackendSender:
        """Send ``header`` (a ``send`` envelope whose body is a JSON value) from the backend to ``user``'s
        devices; returns the sender, holding what the send answered at once. Raises ProtocolError."""
        sender = BackendSender(user)
        self.send(sender, header, None, True)
        self.backend.published += 1
        return sender


class BackendSender:
    """The sender of a message the backend publishes: not a connection, and never reachable by a selector.
    What the send answers at once (receipts, an error) is collected in ``envelopes``."""

    encoding = JSON

    def __init__(self, user: str):
        self.user: str | None = user
        self.device: str | None = SERVER_SENDER
        self.envelopes: list[dict[str, Any]] = []

    def send_control(self, envelope: dict[str, Any]) -> None:
        self.envelopes.append(envelope)

    def send_error(self, code: ErrorCode, message: str, msg_id: Any = None, **extra: Any) -> None:
        self.envelopes.append({"op": "error", "code": code.value, "message": message, "id": msg_id, **extra})


class BackendReceipts:
    """Takes the receipts meant for ``SERVER_SENDER`` before they would be delivered to or kept for a device:
    while a publish call waits, they are collected for its answer; later ones are counted (and failures and
    expiries emitted as events, as for any sender)."""

    def __init__(self, core: Core, router: Router):
        self.core = core
        self.router = router
        self.waiting: dict[tuple[str, str | int], list[dict[str, Any]]] = {}
        self.counts: collections.Counter[str] = collections.Counter()  # receipts taken, by status
        self.published = 0

    def owns_server_device(self, user: str) -> bool:
        """True if ``user`` has a live device whose id is ``SERVER_SENDER`` (its receipts are its own, then)."""
        record = self.router.registry.get(SERVER_SENDER)
        return record is not None and record.user == user and record.revoked_at is None

    def take(self, user: str, device: str, envelope: dict[str, Any]) -> bool:
        if device != SERVER_SENDER or self.owns_server_device(user):
            return False
        status = str(envelope.get("status"))
        self.counts[status] += 1
        if status in ("failed", "expired"):
            self.core.bus.emit("message.expired" if status == "expired" else "message.failed", user=user,
                               sender=SERVER_SENDER, id=envelope.get("id"), device=envelope.get("device"),
                               reason=envelope.get("reason"))
        collected = self.waiting.get((user, envelope.get("id")))  # type: ignore[arg-type]
        if collected is not None:
            collected.append(envelope)
        return True


class FirstAckGroup:
    """One message written to several devices with ``first_ack``: the first ack wins, the others are retracted."""

    __slots__ = ("copies", "done", "messaging", "msg_id", "sender_device", "sender_user")

    def __init__(self, messaging: Messaging, sender_user: str, sender_device: str, msg_id: str | int,
                 copies: list[tuple[LiveSession, int]]):
        self.messaging = messaging
        self.sender_user = sender_user
        self.sender_device = sender_device
        self.msg_id = msg_id
        self.copies = copies
        self.done = False

    def acked(self, winner: LiveSession) -> None:
        if self.done:
            return
        self.done = True
        for session, seq in self.copies:
            if session is winner or not session.state_is_open():
                continue
            if session.withdraw(seq, self.msg_id, self.sender_device) is not None:
                self.messaging.deliveries.send_receipt(self.sender_user, self.sender_device, {
                    "op": "receipt", "id": self.msg_id, "status": "retracted", "device": session.device})

    def overdue(self, session: LiveSession, seq: int) -> bool:
        return False  # each copy is written again like any unacked message


class WorkItem:
    """A pick-one message with ack: if its device does not ack in time, it moves to the next suitable device."""

    __slots__ = ("messaging", "order", "outgoing", "selector", "sender_device", "sender_user", "tried")

    def __init__(self, messaging: Messaging, sender_user: str, sender_device: str, outgoing: Outgoing,
                 selector: Selector, order: str, first: LiveSession):
        self.messaging = messaging
        self.sender_user = sender_user
        self.sender_device = sender_device
        self.outgoing = outgoing
        self.selector = selector
        self.order = order
        self.tried = {first.device}

    def acked(self, session: LiveSession) -> None:
        """The receipt ``delivered`` (sent by the ack path) names the device that processed it."""

    def overdue(self, session: LiveSession, seq: int) -> bool:
        """Move to the next online candidate; False (keep retrying here) when none can take it.

        The message is written to the new device before it is taken back from this one, so a candidate
        that cannot take it (its encoding cannot carry the body) leaves it where it was, still awaiting
        this device's ack. ``moved`` is the final receipt for ``session``'s device (protocol.md 4.2):
        its copy is retracted, and a late ack of it is ignored."""
        messaging = self.messaging
        router = messaging.router
        user = self.sender_user
        exclude = None if self.selector.include_self else self.sender_device
        candidates = [name for name in router.online_matching(user, self.selector)
                      if name not in self.tried and name != exclude and router.online(user, name) is not None]
        while candidates:
            if self.order == "listed":
                chosen = router.online(user, candidates[0])
            else:
                chosen = router.routing.most_recent(user, candidates)  # type: ignore[assignment]
            assert chosen is not None and chosen.device is not None
            candidates.remove(chosen.device)
            self.tried.add(chosen.device)
            try:
                chosen.deliver(self.outgoing, user)
            except ProtocolError:
                continue  # unconvertible for this device: try the next one
            chosen.track(chosen.next_seq - 1, self)
            session.withdraw(seq, self.outgoing.msg_id, self.sender_device)
            messaging.core.events["work_moved"] += 1
            messaging.deliveries.send_receipt(user, self.sender_device, {
                "op": "receipt", "id": self.outgoing.msg_id, "status": "moved", "device": chosen.device,
                "from_device": session.device})
            return True
        return self._move_elsewhere(session, seq, exclude)

    def _move_elsewhere(self, session: LiveSession, seq: int, exclude: str | None) -> bool:
        """Several nodes, no candidate left on this one: a matching device online on another node gets it
        through its inbox (its node writes it from there; it does not move again). ``moved`` follows the
        inbox write."""
        messaging = self.messaging
        router = messaging.router
        user = self.sender_user
        if not router.broker.spans_nodes:
            return False
        if self.selector.kind in ("device", "devices"):
            names = [self.selector.value] if self.selector.kind == "device" else list(self.selector.value)
        else:
            names = [record.id for record in router.registry.user_devices(user)
                     if selector_matches(record, self.selector)]
        outgoing = self.outgoing
        for name in names:
            record = router.registry.get(name)
            if (name in self.tried or name == exclude or record is None or record.revoked_at is not None
                    or router.online(user, name) is not None or router.broker.holder(user, name) is None):
                continue
            self.tried.add(name)
            try:
                body = outgoing.body_raw if outgoing.body_raw is not None else json_value_to_msgpack(outgoing.body_json)
            except ProtocolError:
                return False  # no msgpack form: it stays where it is
            messaging.deliveries.enqueue(QueuedMessage(
                device=name, user=user, sender_device=self.sender_device, msg_id=outgoing.msg_id,
                type=outgoing.app_type, body=body, ts=outgoing.ts, expires_at=messaging.deliveries.kept_expiry(),
                receipt=True), "moved", from_device=session.device)
            session.withdraw(seq, outgoing.msg_id, self.sender_device)
            messaging.core.events["work_moved"] += 1
            return True
        return False
