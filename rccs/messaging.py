"""Messages between a user's devices: ``send`` and ``ack`` (docs/protocol.md sections 4, 5 and 12).

Theory of operation. ``send`` resolves the selector once through the router, builds the ``msg`` frame
once per receiver encoding (the msgpack ``body`` bytes are copied untouched), and writes it to each
online receiver with that receiver's next ``seq``. With ``ack: true`` the sender hears what happened:
``failed`` receipts for what could not be reached, then ``routed`` (and ``queued``/``accepted`` once the
inbox write is committed); registered offline targets get the message in their durable inbox
(``inbox.Deliveries``). An ``ack`` settles the message: the sender gets ``delivered`` through the broker.

Two variants keep more state per message. ``first_ack`` writes to every matching device and retracts the
copies of the losers when one acks (``FirstAckGroup``); on several nodes, when some of those devices are
connected to other nodes, Redis decides which ack was first (``SharedFirstAck``). ``pick: "one"`` with ack
is a work item: if its device does not ack in time, the redelivery sweep moves it to the next suitable
device (``WorkItem``) and the sender gets ``moved``.

``publish`` is the same send for the operator's backend (the admin API): its sender is not a connection
but a ``BackendSender`` whose device id is ``SERVER_SENDER``; receipts addressed to it after the call are
taken by ``BackendReceipts`` instead of being kept for a device.

The compiled listener has its own direct path for the commonest send and ack (``rccs._fastpath``); it
falls back to these handlers for anything else, and both give the same frames, receipts and counters.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import time
import weakref
from typing import TYPE_CHECKING, Any

from ._fastpath import routing as fast_routing
from .broker import BrokerUnavailable
from .clock import now_ms
from .errors import STORE_RETRY_AFTER, ErrorCode, ProtocolError, ReceiptReason
from .inbox import STORE_RETRY_FIRST, STORE_RETRY_MAX, Deliveries
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
    receipt,
    selector_order,
)
from .router import selector_matches
from .store.base import QueuedMessage, StoreError

if TYPE_CHECKING:
    from collections.abc import Callable, Coroutine, Iterable

    from .config import Settings
    from .contracts import Conn, Core, Handler, LiveSession, Sender
    from .router import Router

    # A connection's run_request: handles a request in the background, holding what the connection sends next.
    RequestRunner = Callable[[dict[str, Any], Callable[[], Coroutine[Any, Any, None]]], None]

_RESULT_ROUTED = fast_routing.RESULT_ROUTED
_RESULT_NO_ROUTE = fast_routing.RESULT_NO_ROUTE
_RESULT_OFFLINE = fast_routing.RESULT_OFFLINE
_RESULT_REJECTED = fast_routing.RESULT_REJECTED

SERVER_SENDER = "server"  # the ``from`` of messages published by the backend (admin API)


def first_ack_claim_ms(settings: Settings) -> int:
    """How long the winner of a first_ack message with copies on several nodes is kept: as long as its id is
    remembered, and at least as long as a copy can still be acked (every redelivery, then a resume)."""
    writes = settings.ack_timeout * 1.2 * (2 ** min(settings.max_delivery_attempts, 32)) + settings.session_grace
    return int(min(max(settings.idempotency_window, writes), 365 * 86400) * 1000)


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
        # This node's copies of first_ack messages with copies on other nodes, by (user, sender, msg id): kept
        # while a session still tracks one of them.
        self.shared_first_acks: weakref.WeakValueDictionary[tuple[str, str, str | int], SharedFirstAck] = \
            weakref.WeakValueDictionary()

    # ---- send -------------------------------------------------------------------

    def op_send(self, conn: Conn, header: dict[str, Any]) -> None:
        is_text, raw = conn.frame_body()
        unknown = self.unknown_devices(header)
        if not unknown:
            self.send(conn, header, raw, is_text, conn.run_request)
            return

        async def look_up_then_send() -> None:
            await self.router.look_up_devices(unknown)
            answers: list[Callable[[], Coroutine[Any, Any, None]]] = []
            # This connection is held already: what the send waits for (a first_ack id check) is awaited here.
            self.send(conn, header, raw, is_text, lambda _header, work: answers.append(work))
            for answer in answers:
                await answer()

        conn.run_request(header, look_up_then_send)

    def unknown_devices(self, header: dict[str, Any]) -> list[str]:
        """Several nodes: the devices an ``ack: true`` send names by id that this node has not heard of. One
        that registered on another node a moment ago is in the shared store before its welcome, and must not
        be answered ``offline`` here: ``send`` waits until they were looked up there."""
        if header.get("ack") is not True or not self.router.broker.spans_nodes:
            return []
        return self.router.unknown_devices(header.get("to"))

    def send(self, sender: Sender, header: dict[str, Any], raw_body: bytes | None, is_text: bool,
             hold: RequestRunner | None = None) -> None:
        """Route one ``send`` envelope from ``sender`` (``raw_body``: the msgpack body bytes, None for
        JSON, whose body is in ``header``). Raises ProtocolError for what the sender gets as an ``error``.
        ``hold``: a connection's ``run_request``, for a send answered only after the store was asked (what
        the connection sends next waits for it, so its answers and messages keep their order)."""
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
            if first_ack and router.broker.spans_nodes:
                self._check_first_ack(sender, header, outgoing, selector, started, hold)
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
                work = None
                if selector.pick_one and router.broker.spans_nodes and router.broker.holder(user, offline[0].id):
                    # Online on another node: there it moves on, if not acked in time (InboxWorkItem).
                    work = stored_work(selector, order, {offline[0].id})
                self._enqueue(user, device, outgoing, offline, ttl, priority, "accepted" if durable else "queued",
                              failures, work)
            offline = offline + online
        self._write(sender, outgoing, selector, order, first_ack, targets, failures, offline, [], started)

    def _check_first_ack(self, sender: Sender, header: dict[str, Any], outgoing: Outgoing, selector: Selector,
                         started: int, hold: RequestRunner | None) -> None:
        """Several nodes: a first_ack send is kept in no inbox, whose write would check its id in the shared
        store, so its id is checked there first (``Deliveries.remember_send``): a repeat sent through another
        node is answered as one, and no copy is written. The targets are resolved once the store answered."""
        user, device, msg_id = sender.user, sender.device, outgoing.msg_id
        assert user is not None and device is not None
        try:
            body = outgoing.body_raw if outgoing.body_raw is not None else json_value_to_msgpack(outgoing.body_json)
        except ProtocolError:
            body = json_dumps(outgoing.body_json)  # no msgpack form: its JSON text tells repeats apart as well

        def checked(verdict: str | StoreError | None) -> None:
            if verdict is not None:
                self.router.stats.record_route(_RESULT_REJECTED, time.perf_counter_ns() - started)
            if isinstance(verdict, StoreError):
                self.deliveries.forget_id(device, msg_id)  # nothing was sent: sending it again is no repeat
                sender.send_error(ErrorCode.UNAVAILABLE, "the store cannot be reached; nothing was sent", msg_id,
                                  retry_after=STORE_RETRY_AFTER)
            elif verdict is not None:
                answer_repeated(sender, msg_id, verdict)
            else:
                router = self.router
                targets, failures, offline = router.resolve(user, device, selector, True)
                # Devices connected to other nodes get their copies from there.
                elsewhere = [record.id for record in offline if router.broker.holder(user, record.id) is not None]
                try:
                    self._write(sender, outgoing, selector, "", True, targets, failures, [], elsewhere, started)
                except ProtocolError as exc:
                    sender.send_error(exc.code, exc.message, msg_id)

        if hold is None:  # the backend's sender: the admin API waits for the flush that answers it
            self.deliveries.remember_send(user, device, msg_id, body, checked)
            return
        answered = asyncio.get_running_loop().create_future()

        def checked_then_release(verdict: str | StoreError | None) -> None:
            try:
                checked(verdict)
            finally:
                answered.set_result(None)

        async def until_answered() -> None:
            await answered

        self.deliveries.remember_send(user, device, msg_id, body, checked_then_release)
        hold(header, until_answered)

    def _write(self, sender: Sender, outgoing: Outgoing, selector: Selector, order: str, first_ack: bool,
               targets: list[LiveSession], failures: list[tuple[str | None, ReceiptReason]], offline: list[Any],
               elsewhere: list[str], started: int) -> None:
        """Write a send's message to its online ``targets`` here (and, ``elsewhere``, first_ack copies to other
        nodes' devices), then answer the sender: receipts with ack, else an error if nothing was reached.
        ``offline``: the devices whose inbox keeps it."""
        router = self.router
        stats = router.stats
        user, device, msg_id, ack = sender.user, sender.device, outgoing.msg_id, outgoing.ack
        assert user is not None and device is not None
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
        if elsewhere:
            copied = self._first_ack_elsewhere(user, outgoing, elsewhere, failures)
            delivered += copied
            if copied and written:
                shared = self._shared_first_ack(user, device, msg_id)
                for target, seq in written:
                    shared.add(target, seq)
                written = []
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

    def _first_ack_elsewhere(self, user: str, outgoing: Outgoing, devices: list[str],
                             failures: list[tuple[str | None, ReceiptReason]]) -> list[str]:
        """The copies of a first_ack message for devices connected to other nodes: sent to their nodes, which
        write and track them (``deliver_from_elsewhere``). Returns the devices sent to."""
        try:
            body = outgoing.body_raw if outgoing.body_raw is not None else json_value_to_msgpack(outgoing.body_json)
        except ProtocolError:
            failures.extend((name, ReceiptReason.UNCONVERTIBLE) for name in devices)
            return []
        message = {"id": outgoing.msg_id, "from": outgoing.sender, "type": outgoing.app_type, "body": body,
                   "ts": outgoing.ts, "first_ack": True}
        return [name for name in devices if self.router.broker.message_to_device(user, name, message)]

    def _shared_first_ack(self, user: str, sender: str, msg_id: str | int) -> SharedFirstAck:
        key = (user, sender, msg_id)
        group = self.shared_first_acks.get(key)
        if group is None:
            group = self.shared_first_acks[key] = SharedFirstAck(self, key)
        return group

    def on_first_ack_settled(self, payload: list[Any]) -> None:
        """Another node's ack won a first_ack message (``Broker.claim_first_ack``): this node's copies go."""
        user, sender, msg_id, winner = payload
        group = self.shared_first_acks.get((user, sender, msg_id))
        if group is not None:
            group.settle(winner)

    def deliver_from_elsewhere(self, user: str, device: str, message: dict[str, Any]) -> bool:
        """A live message another node sent for a device connected here (``Broker.message_to_device``);
        a first_ack copy is written with ``ack`` and tracked here until the message is settled."""
        session = self.router.online(user, device)
        if message.get("first_ack"):
            return self._first_ack_copy(session, user, device, message)
        if session is None:
            return False
        outgoing = Outgoing(message["id"], message["from"], message["type"], False, message["body"], None, False,
                            message["ts"])
        try:
            session.deliver(outgoing, user)
        except ProtocolError:  # its body has no form in this device's encoding: a live message is not kept
            return False
        return True

    def _first_ack_copy(self, session: LiveSession | None, user: str, device: str, message: dict[str, Any]) -> bool:
        """A first_ack copy from the sender's node for ``device``. Its sender counts on a final receipt for it
        (the device is in its ``routed``): a device that left meanwhile, or whose encoding cannot carry the
        body, is answered ``failed`` from here."""
        sender = message["from"]
        if session is None:
            self.deliveries.send_receipt(user, sender, receipt(message["id"], "failed", device,
                                                               ReceiptReason.OFFLINE.value))
            return False
        outgoing = Outgoing(message["id"], sender, message["type"], True, message["body"], None, False, message["ts"])
        try:
            session.deliver(outgoing, user)
        except ProtocolError:
            self.deliveries.send_receipt(user, sender, receipt(message["id"], "failed", device,
                                                               ReceiptReason.UNCONVERTIBLE.value))
            return False
        self._shared_first_ack(user, sender, message["id"]).add(session, session.next_seq - 1)
        return True

    def _enqueue(self, user: str, device: str, outgoing: Outgoing, devices: list[Any], ttl: float, priority: int,
                 status: str, failures: list[tuple[str | None, ReceiptReason]], work: list[Any] | None = None) -> None:
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
                receipt=True, work=work), status, new_send=True)

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
                if session.work and isinstance(session.work.get(seq), SharedFirstAck):
                    session.work.pop(seq).claim(session, seq)  # its receipt follows the claim
                    continue
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


def stored_work(selector: Selector, order: str, tried: Iterable[str | None]) -> list[Any]:
    """What a pick-one message carries into an inbox on several nodes (``QueuedMessage.work``): the node that
    writes it to its device moves it on if that device does not ack in time (``inbox.InboxWorkItem``)."""
    return [selector.kind, selector.value, selector.include_self, order, sorted(name for name in tried if name)]


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
        through its inbox (its node writes it from there and moves it on if it is not acked in time:
        ``InboxWorkItem``). ``moved`` follows the inbox write."""
        messaging = self.messaging
        router = messaging.router
        user = self.sender_user
        if not router.broker.spans_nodes:
            return False
        # Every matching device of this node was tried by ``overdue``: what is left is on other nodes.
        name = router.next_pick(user, self.selector, self.order, self.tried, exclude)
        if name is None:
            return False
        outgoing = self.outgoing
        self.tried.add(name)
        try:
            body = outgoing.body_raw if outgoing.body_raw is not None else json_value_to_msgpack(outgoing.body_json)
        except ProtocolError:
            return False  # no msgpack form: it stays where it is
        moving = QueuedMessage(
            device=name, user=user, sender_device=self.sender_device, msg_id=outgoing.msg_id,
            type=outgoing.app_type, body=body, ts=outgoing.ts, expires_at=messaging.deliveries.kept_expiry(),
            receipt=True, work=stored_work(self.selector, self.order, self.tried))
        session.withdraw(seq, outgoing.msg_id, self.sender_device)
        messaging.deliveries.move(moving, session.device, functools.partial(self._stay, session, moving))
        return True

    def _stay(self, session: LiveSession, moving: QueuedMessage, failure: BaseException | None) -> None:
        """The move to another node's device was refused (its inbox full) or not written (the store): the
        message goes back to the device it left, written again on its connection if that is still open, else
        kept in its inbox as a live message is when its session ends (``queued``)."""
        messaging = self.messaging
        if session.state_is_open():
            try:
                session.deliver(self.outgoing, self.sender_user)
            except ProtocolError:
                pass  # (it could take it before; a closing connection) kept in its inbox below
            else:
                session.track(session.next_seq - 1, self)
                return
        assert session.device is not None
        messaging.deliveries.enqueue(dataclasses.replace(moving, device=session.device), "queued")


class SharedFirstAck:
    """This node's copies of a first_ack message whose copies are spread over several nodes (each node that
    holds some has one of these). Which ack was first is decided in Redis (``Broker.claim_first_ack``), by
    the node where the ack arrived: if it won, it sends ``delivered`` and every other node hears the winner
    and takes back its copies (``retract``, and ``retracted`` for the sender); if it lost, the copy that was
    acked is retracted as well (the device may have processed it, but another one was first).

    A copy is settled exactly once, by whoever takes its entry out of ``session.pending``: the ack (then the
    claim answers for it) or the withdrawal. A winner heard before an ack arrives makes that ack a late one,
    ignored as on one node. If the notice of a winner does not arrive (a broken subscription), a copy still
    waiting for its ack learns the winner when it is due to be written again (``overdue``)."""

    __slots__ = ("__weakref__", "copies", "key", "messaging", "winner")

    def __init__(self, messaging: Messaging, key: tuple[str, str, str | int]):
        self.messaging = messaging
        self.key = key  # (user, sender device, msg id)
        self.copies: list[tuple[LiveSession, int]] = []
        self.winner: str | None = None

    def add(self, session: LiveSession, seq: int) -> None:
        self.copies.append((session, seq))
        session.track(seq, self)

    def claim(self, session: LiveSession, seq: int) -> None:
        """``session``'s device acked its copy (``seq``): was it the first, anywhere?"""
        self.messaging.core.spawn(self._claim(session, seq))

    async def _claim(self, session: LiveSession, seq: int) -> None:
        messaging = self.messaging
        user, sender, msg_id = self.key
        device = session.device
        assert device is not None
        keep_ms = first_ack_claim_ms(messaging.core.settings)
        delay = STORE_RETRY_FIRST
        while True:
            # Redis unreachable: the ack waits here, as an ack waits in memory for the store, and is decided
            # when Redis answers again (lost if this node dies meanwhile: operations.md "Several nodes").
            try:
                winner = await messaging.router.broker.claim_first_ack(user, sender, msg_id, device, keep_ms)
                break
            except BrokerUnavailable:
                await asyncio.sleep(delay)  # backoff between attempts, not synchronisation
                delay = min(delay * 2, STORE_RETRY_MAX)
        if winner == device:
            if self.winner != device:  # (not if another copy of this device's won already)
                messaging.deliveries.send_receipt(user, sender, {
                    "op": "receipt", "id": msg_id, "status": "delivered", "device": device})
        else:
            if session.state_is_open():
                session.send_control({"op": "retract", "seq": seq, "id": msg_id, "from": sender})
            messaging.deliveries.send_receipt(user, sender, {
                "op": "receipt", "id": msg_id, "status": "retracted", "device": device})
        self.settle(winner or device)

    def settle(self, winner: str) -> None:
        """``winner``'s ack was first: the copies still waiting here for an ack are taken back."""
        if self.winner is not None:
            return
        self.winner = winner
        user, sender, msg_id = self.key
        copies, self.copies = self.copies, []
        for session, seq in copies:
            if not session.state_is_open():
                continue  # as on one node: a copy whose connection ended goes on like any unacked message
            # (A second copy of the winner's own, if it has one, goes too, with no receipt: its sender has one.)
            if session.withdraw(seq, msg_id, sender) is not None and session.device != winner:
                self.messaging.deliveries.send_receipt(user, sender, {
                    "op": "receipt", "id": msg_id, "status": "retracted", "device": session.device})

    def acked(self, session: LiveSession) -> None:
        """Not called: an ack of a copy is a claim (``Messaging.op_ack``)."""

    def overdue(self, session: LiveSession, seq: int) -> bool:
        """Written again like any unacked copy; meanwhile Redis is asked whether another device won."""
        if self.winner is None:
            self.messaging.core.spawn(self._look())
        return False

    async def _look(self) -> None:
        user, sender, msg_id = self.key
        try:
            winner = await self.messaging.router.broker.claim_first_ack(
                user, sender, msg_id, None, first_ack_claim_ms(self.messaging.core.settings))
        except BrokerUnavailable:
            return  # asked again when the copy is next due
        if winner is not None:
            self.settle(winner)
