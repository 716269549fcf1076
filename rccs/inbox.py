"""Durable delivery: per-device inboxes, receipts for offline senders, redelivery, dead letters, idempotency.

Which messages are kept: a ``send`` with ``ack: true`` is the sender asking to be
told what happened, so its targets that are offline get it in their durable
inbox (receipt ``queued``), and with ``durable: true`` even online targets get
it through the inbox (receipt ``accepted`` once committed). Messages without
``ack`` are live only. A live ``ack: true`` message that is not acked in time
(or whose device goes away for good) moves to the inbox as well.

Group commit: inbox writes requested during one event-loop turn become one
store call, one transaction; acks (removals) likewise.

Redelivery: every message written to a device and not acked has a deadline
(``ack_timeout``, doubling with each attempt, with jitter). Past it the message
is written again on the same connection (with its seq: a client that already
processed it acks again), and when a device connects, its inbox is delivered.
Each delivery counts as an attempt; after ``max_delivery_attempts`` the message
becomes a dead letter and its sender gets ``failed``/``undeliverable``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import random
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, NamedTuple

from ._fastpath import EnvelopeError, RememberedIds, decode_envelope
from .errors import ErrorCode, ProtocolError, ReceiptReason
from .outgoing import Outgoing
from .protocol import NIL, Selector, json_loads, json_value_to_msgpack, receipt
from .store.base import IdMemory, QueuedMessage, StoreError

if TYPE_CHECKING:
    from collections.abc import Callable, Mapping

    from .contracts import Core, LiveSession, PendingAck
    from .router import Router

log = logging.getLogger("rccs.inbox")

INBOX_PAGE = 1000
STORE_RETRY_FIRST = 0.5  # seconds before writing acks and receipts again after the store failed
STORE_RETRY_MAX = 5.0
INBOX_DOORBELL = "inbox.new"  # broker channel: [user, device, what] has new messages and/or kept receipts
RING_MESSAGES = 1  # ``what`` of a doorbell: bits; a doorbell without one means both
RING_RECEIPTS = 2
RING_BOTH = RING_MESSAGES | RING_RECEIPTS


class ToKeep(NamedTuple):
    """An inbox write waiting for the next group commit."""

    message: QueuedMessage
    status: str  # the sender's receipt once it is stored
    new_send: bool  # from a send just now: a store shared by several nodes checks its id
    from_device: str | None  # a pick-one message moving from that device: its receipt is moved
    replaces: int | None = None  # ... and the inbox id it moves from, removed once this one is stored
    # ... and what puts it back where it was when the move is refused (None: the next device's inbox is
    # full) or the store failed (the error): the sender was never told of the device it did not reach.
    undo: Callable[[BaseException | None], None] | None = None


class ToRemember(NamedTuple):
    """A first_ack send whose id the shared store checks at the next group commit."""

    user: str
    sender_device: str
    msg_id: str | int
    body: bytes  # msgpack
    then: Callable[[str | StoreError | None], None]  # the verdict (None: new), or the store's failure


class Deliveries:
    """The node's durable delivery machinery. Event loop thread only.

    ``live`` is the hub's table of open sessions (session id -> session), swept for redelivery.
    ``receipt_takers`` see every receipt for a sender first; one that returns True has taken it (the
    admin API takes those of its backend sender)."""

    def __init__(self, core: Core, router: Router, live: Mapping[str, LiveSession]):
        self.core = core
        self.router = router
        self.live = live
        self.settings = core.settings
        self.receipt_takers: list[Callable[[str, str, dict[str, Any]], bool]] = []
        self._to_enqueue: list[ToKeep] = []
        self._to_remember: list[ToRemember] = []
        self._to_remove: list[int] = []
        # Acked inbox ids until their removal is written: an inbox read in between (a doorbell's catch-up,
        # another page) still finds them in the store and must not write them again.
        self._acked: set[int] = set()
        # Connections whose inbox and/or kept receipts are being looked at after a doorbell, with what the
        # doorbells that rang meanwhile asked for (RING_* bits; 0: nothing: the look ends).
        self._looking: dict[LiveSession, int] = {}
        self._to_count: list[int] = []
        # (sender device, receipt, sender's user) to keep in the store: the doorbell after the write names the
        # user, also for a device this node's registry has not heard of yet (it connected elsewhere just now).
        self._receipts: list[tuple[str, dict[str, Any], str]] = []
        # Write requests (the four lists above) are numbered; ``flush()`` waits until a write round has taken
        # every request made before it. One round at a time, each taking everything pending: under load a
        # caller waits for at most the round under way and the next, not for one round per earlier caller.
        self._requested = 0
        self._attempted = 0  # requests up to this number were taken by a finished write round
        self._writer: asyncio.Task[None] | None = None
        self._flush_waiters: list[tuple[int, asyncio.Future[None]]] = []
        self._welcomed: list[LiveSession] = []  # welcomed this loop turn: their inboxes are not read yet
        self._store_retry = STORE_RETRY_FIRST
        self.in_flight: dict[int, LiveSession] = {}  # inbox id -> the connection it was last written to
        # Pick-one messages in an inbox whose move to a device was refused (its inbox full): inbox id -> those
        # devices, passed over by the next move (the message in the store still lists what it tried before).
        self._refused_moves: dict[int, set[str]] = {}
        # Idempotency: per sender device, recent ack:true message ids (key, time, body digest).
        self.ids = RememberedIds(self.settings)
        self.stats = {"enqueued": 0, "rejected": 0, "dropped": 0, "expired": 0, "dead_lettered": 0,
                      "redelivered": 0, "duplicates": 0, "receipts_kept": 0, "conflicts_unanswered": 0}

    # ---- batching ------------------------------------------------------

    def _schedule(self) -> None:
        self._requested += 1
        self._start_writer()

    def _start_writer(self) -> None:
        if self._writer is None or self._writer.done():  # done: cancelled before it ever ran
            self._writer = self.core.spawn(self._write_rounds())

    async def flush(self) -> None:
        """Return once everything asked for before the call was written (or, if the store failed, put back
        to be written again later): a device's hello relies on this before it reads its inbox and receipts."""
        target = self._requested
        if self._attempted >= target:
            return
        waiter = asyncio.get_running_loop().create_future()
        self._flush_waiters.append((target, waiter))
        self._start_writer()
        await waiter

    async def _write_rounds(self) -> None:
        cancelled = False
        try:
            while self._attempted < self._requested:
                taken = self._requested
                try:
                    await self._write_round()
                finally:
                    self._attempted = taken
                    waiting, self._flush_waiters = self._flush_waiters, []
                    for target, waiter in waiting:
                        if target > taken:
                            self._flush_waiters.append((target, waiter))
                        elif not waiter.done():
                            waiter.set_result(None)
        except asyncio.CancelledError:
            cancelled = True
            raise
        finally:
            self._writer = None
            if not cancelled and self._attempted < self._requested:  # a round failed: what came meanwhile
                self._start_writer()

    async def _write_round(self) -> None:
        """Write what was asked for so far: first_ack ids, one enqueue batch, one removal batch, attempt counts,
        kept receipts."""
        remember, self._to_remember = self._to_remember, []
        enqueue, self._to_enqueue = self._to_enqueue, []
        remove, self._to_remove = self._to_remove, []
        count, self._to_count = self._to_count, []
        receipts, self._receipts = self._receipts, []
        store = self.core.store
        # Independent writes: asked for together, they share the store's round trips (RedisStore pipelines
        # the calls made in one turn, in this order); each one's failure is handled on its own.
        writes: list[Awaitable[Any]] = [
            self._remember(remember) if remember else _nothing(),
            self._commit(enqueue) if enqueue else _nothing(),
            store.remove_queued(remove) if remove else _nothing(),
            store.count_attempts(count) if count else _nothing(),
            store.add_receipts([(device, envelope) for device, envelope, _ in receipts]) if receipts else _nothing()]
        outcomes: list[Any] = await asyncio.gather(*writes, return_exceptions=True)
        for outcome in outcomes:
            if isinstance(outcome, BaseException) and not isinstance(outcome, StoreError):
                # A bug, not the store: said loudly, and its part is handled like a refused write (kept
                # receipts and acks wait and are tried again), never dropped.
                log.error("writing a round of inbox changes failed", exc_info=outcome)
        _, committed, removed, counted, kept = outcomes  # _remember answers its own sends
        if isinstance(committed, BaseException):
            self._not_kept(enqueue, committed)
        if not isinstance(removed, BaseException):
            self._acked.difference_update(remove)
            remove = []
        if not isinstance(counted, BaseException):
            count = []
        if not isinstance(kept, BaseException):
            self._ring_for_receipts(receipts)
            receipts = []
        failure = next((o for o in (removed, counted, kept) if isinstance(o, BaseException)), None)
        if failure is None:
            self._store_retry = STORE_RETRY_FIRST
        else:
            # An ack not yet written costs a repeat (at least once), a kept receipt must not be lost:
            # both wait in memory, ahead of newer ones, and are written when the store answers again.
            log.warning("store unavailable (%s): %d acks, %d attempt counts and %d receipts wait; "
                        "retrying in %.1f s", failure, len(remove), len(count), len(receipts), self._store_retry)
            self._to_remove[:0] = remove
            self._to_count[:0] = count
            self._receipts[:0] = receipts
            asyncio.get_running_loop().call_later(self._store_retry, self._schedule)
            self._store_retry = min(self._store_retry * 2, STORE_RETRY_MAX)

    async def _remember(self, batch: list[ToRemember]) -> None:
        settings = self.settings
        ids = IdMemory(self.core.now(), int(settings.idempotency_window * 1000), settings.idempotency_cache,
                       [True] * len(batch))
        verdicts: list[str | None] | list[StoreError]
        try:
            verdicts = await self.core.store.remember_sends(
                [(item.user, item.sender_device, item.msg_id, item.body) for item in batch], ids)
        except StoreError as exc:
            log.warning("store unavailable: %d first_ack sends refused (%s)", len(batch), exc)
            verdicts = [exc] * len(batch)
        for item, verdict in zip(batch, verdicts, strict=True):
            if isinstance(verdict, str):
                self.stats["duplicates"] += 1
            try:
                item.then(verdict)
            except Exception:  # one send's failure must not keep the rest of the commit from being answered
                log.exception("answering a first_ack send after its id check failed")

    def _not_kept(self, batch: list[ToKeep], exc: BaseException) -> None:
        """The store refused a batch of inbox writes: nothing of it was kept, and each sender hears so
        (``failed``/``unavailable``, final for that device) with its id forgotten, so that sending the same
        message again is not taken for a repeat."""
        log.warning("store unavailable: %d inbox writes refused (%s)", len(batch), exc)
        for message, *_, undo in batch:
            if undo is not None:
                undo(exc)  # a pick-one message moving on stays where it was
                continue
            self.stats["rejected"] += 1
            self.forget_id(message.sender_device, message.msg_id)
            self.send_receipt(message.user, message.sender_device,
                              receipt(message.msg_id, "failed", message.device, ReceiptReason.UNAVAILABLE.value))

    async def _commit(self, batch: list[ToKeep]) -> None:
        settings = self.settings
        ids = IdMemory(self.core.now(), int(settings.idempotency_window * 1000), settings.idempotency_cache,
                       [item.new_send for item in batch])
        outcome = await self.core.store.enqueue([item.message for item in batch], settings.inbox_max_messages,
                                               settings.inbox_max_bytes, settings.inbox_overflow, ids)
        rejected = {(m.device, m.sender_device, m.msg_id) for m in outcome.rejected}
        repeats = {(m.device, m.sender_device, m.msg_id) for m in outcome.repeated + outcome.conflicting}
        if repeats:
            self._answer_repeats(outcome.repeated, outcome.conflicting)
        stored = iter(outcome.stored)
        for message, status, _, from_device, replaces, undo in batch:
            key = (message.device, message.sender_device, message.msg_id)
            if key in repeats:
                continue  # answered once per send above
            if key in rejected and undo is not None:
                undo(None)  # a pick-one message moving on stays where it was; the next move passes this device
                continue
            if key in rejected:
                self.stats["rejected"] += 1
                self.send_receipt(message.user, message.sender_device,
                                  receipt(message.msg_id, "failed", message.device, ReceiptReason.INBOX_FULL.value))
                continue
            kept = next(stored)
            self.stats["enqueued"] += 1
            if replaces is not None:
                self._to_remove.append(replaces)  # (still in ``_acked``: no inbox read writes it again)
                self._refused_moves.pop(replaces, None)
                self._schedule()
            if from_device is not None:
                self.core.events["work_moved"] += 1
            kept_receipt = receipt(kept.msg_id, status, kept.device)
            if from_device is not None:
                kept_receipt["from_device"] = from_device
            self.send_receipt(message.user, message.sender_device, kept_receipt)
            target = self.router.online(kept.user, kept.device)
            if target is not None and target.inbox_loaded:
                self.deliver(target, kept)
            elif target is not None:
                # Connected a moment ago: its first inbox read may have come just before this write.
                self.ring([kept.user, kept.device, RING_MESSAGES])
            elif self.router.broker.spans_nodes:
                # Perhaps connected to another node (maybe so recently that this one has not heard of it):
                # the node that holds it writes it from the shared inbox now.
                self.router.broker.publish(INBOX_DOORBELL, [kept.user, kept.device, RING_MESSAGES])
        for message in outcome.dropped:
            self.stats["dropped"] += 1
            self.in_flight.pop(message.id, None)
            self.send_receipt(message.user, message.sender_device,
                              receipt(message.msg_id, "failed", message.device, ReceiptReason.DROPPED.value))

    def _answer_repeats(self, repeated: list[QueuedMessage], conflicting: list[QueuedMessage]) -> None:
        """The shared store knew these ids (sent through another node, perhaps): each send is answered once,
        as ``send`` answers a repeat its own node caught (``duplicate``, or the error ``duplicate_id``)."""
        answered: set[tuple[str, str | int]] = set()
        for message, verdict in [(m, "duplicate") for m in repeated] + [(m, "conflict") for m in conflicting]:
            send = (message.sender_device, message.msg_id)
            if send in answered:
                continue
            answered.add(send)
            self.stats["duplicates"] += 1
            if verdict == "duplicate":
                self.send_receipt(message.user, message.sender_device,
                                  {"op": "receipt", "id": message.msg_id, "status": "duplicate"})
            elif not self.router.send_to_device(message.user, message.sender_device, {
                    "op": "error", "code": ErrorCode.DUPLICATE_ID.value, "id": message.msg_id,
                    "message": "this message id was used for a different message recently"}):
                self.stats["conflicts_unanswered"] += 1  # its sender left: an error is not kept like a receipt

    # ---- receipts ------------------------------------------------------

    def send_receipt(self, user: str, device: str, envelope: dict[str, Any]) -> None:
        """To the sender device now, or kept in the store until it connects. Final failures are events.

        On several nodes a receipt for a sender connected to another node is kept in the shared store and
        that node's doorbell rung (``_ring_for_receipts``): a Pub/Sub message to a node that has just died
        can still count as heard (Redis has not yet noticed the dead connection), and would be lost."""
        for take in self.receipt_takers:
            if take(user, device, envelope):
                return
        status = envelope.get("status")
        if status in ("failed", "expired"):
            self.core.bus.emit("message.expired" if status == "expired" else "message.failed", user=user,
                               sender=device, id=envelope.get("id"), device=envelope.get("device"),
                               reason=envelope.get("reason"))
        if self.router.broker.spans_nodes:
            if self.router.write_to_device(user, device, envelope):
                return
        elif self.router.send_to_device(user, device, envelope):
            return
        self.keep_receipt(user, device, envelope)

    def keep_receipt(self, user: str, device: str, envelope: dict[str, Any]) -> None:
        """A receipt whose sender has no connection here: kept in the store until the device connects."""
        self.stats["receipts_kept"] += 1  # counted: not delivered at once (kept in the store)
        self._receipts.append((device, envelope, user))
        self._schedule()

    # ---- idempotency -----------------------------------------------------

    def first_time(self, sender_device: str, msg_id: str | int, body: bytes, now: int) -> str | None:
        """None for a new ack:true message id; ``"duplicate"`` for one seen with the same body within the
        window (do not deliver again); ``"conflict"`` for one seen with a different body. ``body`` is only
        read, here and now: the compiled direct path passes a read-only buffer over the body inside the msg
        it has just encoded (bytes-like, not bytes)."""
        repeated = self.ids.check(sender_device, msg_id, body, now)
        if repeated is not None:
            self.stats["duplicates"] += 1
        return repeated

    def remember_send(self, user: str, sender_device: str, msg_id: str | int, body: bytes,
                      then: Callable[[str | StoreError | None], None]) -> None:
        """Several nodes: a first_ack send (kept in no inbox, whose id ``enqueue`` would check) has its id
        checked and remembered in the shared store at the next group commit; ``then`` gets the verdict (None:
        new; ``"duplicate"``, ``"conflict"``) or the StoreError, in the flush, before ``flush()`` returns."""
        self._to_remember.append(ToRemember(user, sender_device, msg_id, body, then))
        self._schedule()

    def forget_id(self, sender_device: str, msg_id: str | int) -> None:
        """Take back ``first_time``'s record of an id whose message was not kept after all."""
        self.ids.forget(sender_device, msg_id)

    def sweep_ids(self, now: int) -> int:
        """Drop the remembered ids of devices that sent nothing within the window."""
        return self.ids.sweep(now)

    async def save_message_ids(self) -> None:
        """At shutdown: the idempotency window survives a graceful restart (not a crash)."""
        await self.core.store.save_message_ids(self.ids.saved())

    async def load_message_ids(self) -> None:
        since = self.core.now() - int(self.settings.idempotency_window * 1000)
        self.ids.load(await self.core.store.load_message_ids(since))

    # ---- queueing ------------------------------------------------------------

    def enqueue(self, message: QueuedMessage, status: str, new_send: bool = False,
                from_device: str | None = None) -> None:
        """Keep a message in its target's inbox; ``status`` (queued/accepted/moved) is the sender's receipt.
        ``new_send``: it comes from a ``send`` now (not from a session that ended), so a store shared by
        several nodes checks its id. ``from_device``: a pick-one message moving here from that device."""
        self._to_enqueue.append(ToKeep(message, status, new_send, from_device))
        self._schedule()

    def move(self, message: QueuedMessage, from_device: str | None,
             undo: Callable[[BaseException | None], None]) -> None:
        """A pick-one message taken back from ``from_device`` (not in an inbox) for ``message.device``'s inbox;
        ``undo`` puts it back if that inbox refuses it or the store fails (the sender hears ``moved`` only
        once it is kept)."""
        self._to_enqueue.append(ToKeep(message, "moved", False, from_device, None, undo))
        self._schedule()

    def deliver(self, session: LiveSession, message: QueuedMessage) -> None:
        """Write an inbox message to its device's connection (once per connection until acked)."""
        if (message.id in self.in_flight and self.in_flight[message.id] is session) or message.id in self._acked:
            return
        if message.attempts >= self.settings.max_delivery_attempts:
            self.dead_letter([message])
            return
        outgoing = Outgoing(message.msg_id, message.sender_device, message.type, True, message.body, None, False,
                            message.ts)
        try:
            session.deliver(outgoing, message.user)
        except ProtocolError:  # its body has no form in this device's encoding
            return
        seq = session.next_seq - 1
        if session.inbox_ids is None:
            session.inbox_ids = {}
        session.inbox_ids[seq] = message.id
        self.in_flight[message.id] = session
        message.attempts += 1
        self._to_count.append(message.id)
        self._schedule()
        # The sweep counts on from the writes of earlier connections, so that max_delivery_attempts bounds
        # every write of the message, not the writes of each connection.
        if session.retry is None:
            session.retry = {}
        session.retry[seq] = [self.core.now() + int(self.backoff(message.attempts) * 1000), message.attempts]
        if message.work is not None and self.router.broker.spans_nodes:
            session.track(seq, InboxWorkItem(self, message))

    def move_on(self, session: LiveSession, seq: int, message: QueuedMessage, device: str) -> None:
        """A pick-one message written from ``session``'s inbox (``seq``) and not acked moves to ``device``:
        taken back from this one (``retract``; a late ack is ignored), kept in ``device``'s inbox (its node
        writes it from there), then removed from this device's inbox; the sender gets ``moved``."""
        inbox_id = session.inbox_ids.pop(seq, None) if session.inbox_ids else None
        assert inbox_id is not None and message.work is not None and session.device is not None
        session.withdraw(seq, message.msg_id, message.sender_device)
        self.in_flight.pop(inbox_id, None)
        self._acked.add(inbox_id)  # not written again from the inbox it leaves (unless the move fails)
        kind, value, include_self, order, tried = message.work
        moving = dataclasses.replace(message, device=device, attempts=0, id=0,
                                     work=[kind, value, include_self, order, sorted({*tried, session.device, device})])
        doorbell = [message.user, session.device, RING_MESSAGES]

        def stay(failure: BaseException | None) -> None:
            self._acked.discard(inbox_id)
            if failure is None:  # refused by the device's full inbox: the next move passes it over
                self._refused_moves.setdefault(inbox_id, set()).add(device)
                self.ring(doorbell)
            else:  # the store: read again once it may answer
                asyncio.get_running_loop().call_later(self._store_retry, self.ring, doorbell)

        self._to_enqueue.append(ToKeep(moving, "moved", False, session.device, inbox_id, stay))
        self._schedule()
        if session.inbox_more and not session.inbox_ids:  # as after an ack: the next page
            session.inbox_more = False
            self.core.spawn(self._load_after_flush(session))

    def refused_moves(self, session: LiveSession, seq: int) -> set[str]:
        inbox_id = session.inbox_ids.get(seq) if session.inbox_ids else None
        return self._refused_moves.get(inbox_id, set()) if inbox_id is not None else set()

    def on_online(self, session: LiveSession) -> None:
        """A device said welcome: its kept receipts, then its inbox. The devices welcomed in one loop turn
        are read together, in one store round trip (``welcome_reads``)."""
        self._welcomed.append(session)
        if len(self._welcomed) == 1:
            self.core.spawn(self._read_for_welcomed())

    async def _read_for_welcomed(self) -> None:
        # Taken before the flush: what was asked for before these welcomes is in the store when they read.
        sessions, self._welcomed = self._welcomed, []
        await self.flush()
        device_ids = [session.device or "" for session in sessions]
        reads = await self.core.store.welcome_reads(device_ids, self.core.now(), INBOX_PAGE)
        for session, (receipts, messages) in zip(sessions, reads, strict=True):
            for envelope in receipts:
                session.send_control(envelope)
            self._write_page(session, messages)

    async def load_inbox(self, session: LiveSession) -> None:
        assert session.device is not None
        self._write_page(session, await self.core.store.inbox(session.device, self.core.now(), INBOX_PAGE))

    async def _receipts_and_inbox(self, session: LiveSession, wanted: int) -> list[QueuedMessage] | None:
        """Write the device's kept receipts (RING_RECEIPTS) and return its inbox's first page (RING_MESSAGES,
        else None), both read together: one round trip on RedisStore."""
        store = self.core.store
        assert session.device is not None
        receipts: Awaitable[list[dict[str, Any]]] = (
            store.take_receipts(session.device) if wanted & RING_RECEIPTS else _nothing([]))
        messages: Awaitable[list[QueuedMessage] | None] = (
            store.inbox(session.device, self.core.now(), INBOX_PAGE) if wanted & RING_MESSAGES else _nothing())
        outcomes: list[Any] = await asyncio.gather(receipts, messages, return_exceptions=True)
        kept, page = outcomes
        if not isinstance(kept, BaseException):
            for envelope in kept:  # taken out of the store: written even when the inbox read failed
                session.send_control(envelope)
        for outcome in (kept, page):
            if isinstance(outcome, BaseException):
                raise outcome
        result: list[QueuedMessage] | None = page
        return result

    def _write_page(self, session: LiveSession, messages: list[QueuedMessage]) -> None:
        session.inbox_loaded = True
        session.inbox_more = len(messages) >= INBOX_PAGE
        for message in messages:
            if session.state_is_open():
                self.deliver(session, message)

    def ring(self, doorbell: list[Any]) -> None:
        """Another node put messages into the inbox, or receipts into the store, of a device connected here
        (``[user, device, what]``, ``what`` the RING_* bits, both when left out): write them now."""
        user, device = doorbell[0], doorbell[1]
        wanted = doorbell[2] if len(doorbell) > 2 and doorbell[2] in (RING_MESSAGES, RING_RECEIPTS) else RING_BOTH
        session = self.router.online(user, device)
        if session is None:
            return
        # Even before its first inbox read (that read may have come too early). Doorbells that ring while a
        # look is under way make one more look after it, not one each: a burst of messages from another node
        # must not read the inbox once per message.
        if session in self._looking:
            self._looking[session] |= wanted
            return
        self._looking[session] = 0
        self.core.spawn(self._catch_up(session, wanted))

    async def _catch_up(self, session: LiveSession, wanted: int) -> None:
        try:
            while wanted:
                await self.flush()
                if not session.state_is_open():
                    return
                assert session.device is not None
                page = await self._receipts_and_inbox(session, wanted)
                if page is not None:
                    self._write_page(session, page)
                wanted, self._looking[session] = self._looking.get(session, 0), 0
        finally:
            self._looking.pop(session, None)

    def _ring_for_receipts(self, kept: list[tuple[str, dict[str, Any], str]]) -> None:
        """Several nodes: a receipt kept for a sender this node thought offline may be for a device that has
        just connected to another node (after that node read its kept receipts): its node looks again."""
        if not self.router.broker.spans_nodes:
            return
        for device, user in dict.fromkeys((device, user) for device, _, user in kept):
            self.router.broker.publish(INBOX_DOORBELL, [user, device, RING_RECEIPTS])

    def on_acked(self, session: LiveSession, inbox_id: int) -> None:
        self.in_flight.pop(inbox_id, None)
        self._refused_moves.pop(inbox_id, None)
        self._acked.add(inbox_id)
        self._to_remove.append(inbox_id)
        self._schedule()
        if session.inbox_more and not session.inbox_ids:
            session.inbox_more = False
            self.core.spawn(self._load_after_flush(session))

    async def _load_after_flush(self, session: LiveSession) -> None:
        await self.flush()
        if session.state_is_open():
            await self.load_inbox(session)

    def count_attempt(self, inbox_id: int) -> None:
        self._to_count.append(inbox_id)
        self._schedule()

    def dead_letter_ids(self, ids: list[int], entry: PendingAck, device: str | None) -> None:
        """Inbox messages (written from the inbox, ``entry`` their pending tuple) that were never acked."""
        for inbox_id in ids:
            self.in_flight.pop(inbox_id, None)
            self._refused_moves.pop(inbox_id, None)
        self.stats["dead_lettered"] += len(ids)
        self.core.bus.emit("message.dead_lettered", user=entry[0], sender=entry[1], id=entry[2], device=device)
        self.send_receipt(entry[0], entry[1], receipt(entry[2], "failed", device, ReceiptReason.UNDELIVERABLE.value))
        self.core.spawn(self.core.store.dead_letter(ids, ReceiptReason.UNDELIVERABLE.value, self.core.now()))

    def kept_expiry(self) -> int:
        """When a live message that moves to the store now (inbox or dead letters) expires: it carries no
        ttl of its own any more, so it gets ``default_ttl`` from now, as if it had been sent now."""
        return self.core.now() + int(self.settings.default_ttl * 1000)

    def dead_letter_live(self, session: LiveSession, entry: PendingAck, writes: int) -> None:
        """A live message (never in the inbox), written ``writes`` times and never acked: stored straight
        into the dead letters, with those writes as its attempts."""
        assert session.device is not None and session.user is not None
        message = queued_from_frame(entry[3], entry[4], session.device, session.user, self.kept_expiry())
        if message is not None:
            message.attempts = writes
        self.stats["dead_lettered"] += 1
        self.core.bus.emit("message.dead_lettered", user=entry[0], sender=entry[1], id=entry[2],
                           device=session.device)
        self.send_receipt(entry[0], entry[1], receipt(entry[2], "failed", session.device,
                                                      ReceiptReason.UNDELIVERABLE.value))
        if message is not None:
            self.core.spawn(self._store_dead(message))

    async def _store_dead(self, message: QueuedMessage) -> None:
        store = self.core.store
        outcome = await store.enqueue([message], 2**62, 2**62, "reject")
        await store.dead_letter([m.id for m in outcome.stored], ReceiptReason.UNDELIVERABLE.value, self.core.now())

    def dead_letter(self, messages: list[QueuedMessage]) -> None:
        for message in messages:
            self.in_flight.pop(message.id, None)
            self.stats["dead_lettered"] += 1
            self.core.bus.emit("message.dead_lettered", user=message.user, sender=message.sender_device,
                               id=message.msg_id, device=message.device)
            self.send_receipt(message.user, message.sender_device, receipt(
                message.msg_id, "failed", message.device, ReceiptReason.UNDELIVERABLE.value))
        self.core.spawn(self.core.store.dead_letter([m.id for m in messages], ReceiptReason.UNDELIVERABLE.value,
                                                    self.core.now()))

    # ---- periodic work ---------------------------------------------------------

    def backoff(self, attempts: int) -> float:
        """Seconds until the next redelivery after ``attempts`` unacked deliveries (with +-20% jitter)."""
        base = self.settings.ack_timeout * (2 ** max(0, attempts - 1))
        return float(base * random.uniform(0.8, 1.2))

    def retry_due(self, now: int) -> None:
        """Redeliver, on the same connection, what has waited for an ack past its deadline."""
        for session in list(self.live.values()):
            if session.pending:
                self._retry_session(session, now)
            elif session.retry:
                session.retry = None  # all acked: the deadlines of what was acked go (they were kept until now)

    def _retry_session(self, session: LiveSession, now: int) -> None:
        """Write again what waited for an ack past its deadline; too many attempts make a dead letter."""
        if session.retry is None:
            session.retry = {}
        retry = session.retry
        for seq in [seq for seq in retry if seq not in session.pending]:
            del retry[seq]
        for seq, entry in list(session.pending.items()):
            state = retry.get(seq)
            if state is None:
                retry[seq] = [now + int(self.backoff(1) * 1000), 1]
                continue
            if now < state[0]:
                continue
            work = session.work.get(seq) if session.work else None
            if work is not None and work.overdue(session, seq):
                continue  # moved to another device
            inbox_id = session.inbox_ids.get(seq) if session.inbox_ids else None
            attempts = state[1] + 1
            if attempts > self.settings.max_delivery_attempts:
                del session.pending[seq]
                del retry[seq]
                if work is not None:
                    session.work.pop(seq, None)  # type: ignore[union-attr]
                if inbox_id is not None:
                    del session.inbox_ids[seq]  # type: ignore[union-attr]
                    self.dead_letter_ids([inbox_id], entry, session.device)
                else:
                    self.dead_letter_live(session, entry, state[1])
                continue
            state[0] = now + int(self.backoff(attempts) * 1000)
            state[1] = attempts
            self.stats["redelivered"] += 1
            session.send_frame(entry[3], entry[4])
            if inbox_id is not None:
                self.count_attempt(inbox_id)

    async def expire(self, now: int) -> None:
        for message in await self.core.store.take_expired(now):
            if message.id in self.in_flight:
                continue  # already written to its device: the ack decides
            self.stats["expired"] += 1
            self.send_receipt(message.user, message.sender_device, receipt(message.msg_id, "expired", message.device))

    async def fail_inbox(self, device: str, reason: ReceiptReason) -> None:
        """A revoked device's inbox: every sender is told, then it is purged."""
        store = self.core.store
        messages = await store.inbox(device, 0, 1_000_000)
        await store.purge(device)
        for message in messages:
            self.in_flight.pop(message.id, None)
            self.send_receipt(message.user, message.sender_device, receipt(message.msg_id, "failed", device,
                                                                           reason.value))


class InboxWorkItem:
    """Several nodes: a pick-one message written from its device's inbox (it came from another node, or moved
    here through an inbox). If its device does not ack in time it moves on, as on one node: to a matching
    device not tried yet, online here or on another node (``Router.next_pick``), through that device's inbox."""

    __slots__ = ("deliveries", "message")

    def __init__(self, deliveries: Deliveries, message: QueuedMessage):
        self.deliveries = deliveries
        self.message = message

    def acked(self, session: LiveSession) -> None:
        """The ack path sends ``delivered`` and removes it from the inbox."""

    def overdue(self, session: LiveSession, seq: int) -> bool:
        """Move on (True), or False (written again to this device) when no other device can take it."""
        message = self.message
        deliveries = self.deliveries
        assert message.work is not None
        if not deliveries.router.broker.available or (
                message.expires_at is not None and message.expires_at <= deliveries.core.now()):
            return False  # written again here: a move needs the store, and an expired message goes nowhere
        kind, value, include_self, order, tried = message.work
        selector = Selector(kind, value, True, include_self)
        passed = {*tried, session.device or "", *deliveries.refused_moves(session, seq)}
        chosen = deliveries.router.next_pick(message.user, selector, order, passed,
                                             None if include_self else message.sender_device)
        if chosen is None:
            return False
        deliveries.move_on(session, seq, message, chosen)
        return True


def queued_from_frame(frame: bytes, text: bool, device: str, user: str, expires_at: int | None) -> QueuedMessage | None:
    """The inbox form of a ``msg`` frame the server wrote (None if its body cannot be kept as msgpack)."""
    try:
        if text:
            envelope = json_loads(frame)
            body = json_value_to_msgpack(envelope.get("body"))
        else:
            envelope, start, end = decode_envelope(frame)
            body = frame[start:end] if start >= 0 else NIL
    except (ProtocolError, EnvelopeError):
        return None
    return QueuedMessage(device=device, user=user, sender_device=envelope["from"], msg_id=envelope["id"],
                         type=envelope["type"], body=body, ts=envelope["ts"], expires_at=expires_at, receipt=True)


async def _nothing(value: Any = None) -> Any:
    """An awaitable in place of a store call that has nothing to do."""
    return value

