"""Async Python client for rccs protocol v1 (over picows).

    async with Client(url, token, {"type": "desktop", "capabilities": ["file_sync"]}) as client:
        receipts = await client.send({"type": "mobile"}, "notify", {"text": "hi"}, ack=True)
        async for message in client.messages():
            ...

Devices registered by pairing connect with their credential instead of a token::

    client = await pair(url, "ABCD-EFGH", {"type": "mobile", "name": "Phone"})
    save(client.credential)  # shown once; later: Client(url, None, device, credential=...)

After a dropped connection the client reconnects with ``resume``, so its
session (seq numbers, unacked messages) continues; messages redelivered after
a resume that the application already saw are not handed to it again.
Server events (``presence``, ``pair.request``, ``pair.joined``, ...) arrive on
``client.events``.

Devices call each other (protocol.md section 13)::

    client.handle("battery", lambda params: {"level": 87})   # answer calls of this method
    level = await other.call({"type": "mobile"}, "battery")  # -> {"level": 87}, or ClientError

Incoming messages are acked automatically when the application takes them
(from ``messages()``/``next_message()``, or after an ``on_message`` callback
returns) unless ``auto_ack=False``. The client reconnects with exponential
backoff and full jitter after a connection is lost, except when the server
refused it for good (bad token, forbidden device, replaced by a newer
connection) or ``close()`` was called.

Shared state documents (protocol.md section 14) continue across devices and reconnects::

    draft = await client.state_get("user/draft")                    # StateDoc(doc, rev, value)
    await client.state_patch("user/draft", {"text": "Dear Bob"}, if_rev=draft.rev)  # or StateConflict
    async for change in await client.state_subscribe("user/draft"):  # a snapshot, then every change
        ...

Tasks that one device at a time should do (protocol.md section 15) are held through leases with a
fencing epoch, and moved between devices in a handoff the server coordinates::

    lease = await client.task_claim("agent")                       # TaskLease, or TaskConflict
    keeper = client.keep_task(lease)                                # renews it until it is lost or stopped
    await client.state_patch("user/agent", {"step": 3}, task="agent", epoch=lease.epoch)  # fenced write
    client.on_handoff_prepare(lambda prepare: {"step": 3})        # pause; the checkpoint for the target
    other.on_handoff_offer(lambda offer: True)                    # accept: continue from offer.checkpoint
    other.on_task_gained(lambda result: ...)                      # the handoff committed: it owns the task
    result = await client.handoff("agent", {"device": "alice-phone"})  # HandoffResult, or HandoffFailed

A device without an ``on_handoff_prepare`` callback refuses every handoff of its tasks, and one without
an ``on_handoff_offer`` callback rejects every task offered to it.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import json
import logging
import random
import secrets
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from ssl import SSLContext
from typing import Any

import msgpack
from picows import WSFrame, WSListener, WSMsgType, WSTransport, ws_connect

from .errors import CloseCode
from .mergepatch import merge_patch
from .protocol import JSON, MSGPACK

log = logging.getLogger("rccs.client")

# Close codes after which reconnecting cannot help.
FATAL_CLOSE_CODES = frozenset({
    int(CloseCode.BAD_HELLO), int(CloseCode.UNAUTHORIZED), int(CloseCode.FORBIDDEN), int(CloseCode.REPLACED),
    int(CloseCode.REVOKED),
})
# Receipt statuses after which ``send(ack=True)`` stops waiting for a device: final ones, and ``queued``
# (stored for an offline device; its final receipt arrives later on ``client.receipts``).
SEEN_MESSAGES = 10000  # (sender, id) pairs the client remembers to drop redelivered duplicates
SETTLED_STATUSES = frozenset({"delivered", "failed", "expired", "queued", "retracted"})
# Replies to requests, matched to the request by ``id``.
REPLY_OPS = frozenset({"devices", "device", "ok", "sessions", "refreshed", "pair.code", "pair.pending",
                       "state", "state.ok", "state.subscribed", "task.lease", "task.released", "tasks"})
EVENT_OPS = frozenset({"presence", "pair.request", "pair.joined", "pair.withdrawn", "retract"})
# How much longer than a call's timeout ``call()`` waits for the server's answer before giving up itself.
CALL_GRACE = 5.0
CallHandler = Callable[[Any], Any]  # params -> result, or an awaitable of it
# How long ``handoff()`` waits for the outcome by default: the server's default prepare (10 s) and accept
# (30 s) timeouts, after which it reports ``handoff.failed`` itself, and some time for the messages.
HANDOFF_TIMEOUT = 10.0 + 30.0 + CALL_GRACE
SEEN_HANDOFFS = 1000  # handoff ids the client remembers to act on a re-sent handoff.committed once


@dataclass(frozen=True, slots=True)
class Message:
    seq: int
    id: str | int
    sender: str
    type: str
    body: Any
    ts: int
    ack: bool


@dataclass(slots=True)
class _SeenMessage:
    """An ack:true message this client received: the seq the server wrote it with last, in which session
    generation, and whether the application has taken it (queued -> handling -> taken)."""
    seq: int
    generation: int
    stage: str = "queued"


@dataclass(frozen=True, slots=True)
class Receipt:
    id: str | int
    status: str
    device: str | None = None
    reason: str | None = None
    from_device: str | None = None  # ``moved``: the device the message was taken back from

    @classmethod
    def from_envelope(cls, envelope: Mapping[str, Any]) -> Receipt:
        return cls(envelope["id"], str(envelope.get("status")), envelope.get("device"), envelope.get("reason"),
                   envelope.get("from_device"))


class ClientError(Exception):
    """The server answered with an ``error`` envelope; ``details`` holds its other fields (``task``, ...)."""

    def __init__(self, code: str, message: str, details: Mapping[str, Any] | None = None):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        self.details: dict[str, Any] = dict(details or {})


class StateConflict(ClientError):
    """``state_patch`` with ``if_rev`` found the document at another revision: ``rev`` and ``value`` are current."""

    def __init__(self, message: str, rev: int, value: Any):
        super().__init__("conflict", message, {"rev": rev, "value": value})
        self.rev = rev
        self.value = value


class TaskConflict(ClientError):
    """``task_claim`` found another device holding a live lease: ``owner``, its ``epoch`` and ``expires`` (ms)."""

    def __init__(self, message: str, task: str, owner: str, epoch: int, expires: int):
        super().__init__("conflict", message, {"task": task, "owner": owner, "epoch": epoch, "expires": expires})
        self.task = task
        self.owner = owner
        self.epoch = epoch
        self.expires = expires


class StaleEpoch(ClientError):
    """This device does not hold the task at the epoch it named any more: the task is at ``epoch``, held by
    ``owner`` (None: released). Stop acting for the task."""

    def __init__(self, message: str, task: str, epoch: int, owner: str | None):
        super().__init__("stale_epoch", message, {"task": task, "epoch": epoch, "owner": owner})
        self.task = task
        self.epoch = epoch
        self.owner = owner


class HandoffBusy(ClientError):
    """A handoff of the task is open (``handoff`` is its id): claims by others, a release, another handoff
    request, and the owner's fenced writes after it answered ``prepared`` wait until it ends."""

    def __init__(self, message: str, task: str | None, handoff: str | None):
        super().__init__("handoff_busy", message, {"task": task, "handoff": handoff})
        self.task = task
        self.handoff = handoff


class HandoffFailed(ClientError):
    """A handoff ended without moving the task (the old owner keeps it): ``reason`` is the server's
    (``refused``, ``rejected``, ``prepare_timeout``, ``accept_timeout``, ``owner_disconnected``, ...),
    ``detail`` the refusing or rejecting device's reason, if it gave one."""

    def __init__(self, handoff: str, task: str, reason: str, detail: str | None = None):
        super().__init__("handoff_failed", f"handoff {handoff} of task {task!r} failed: {reason}"
                         + (f" ({detail})" if detail else ""),
                         {"handoff": handoff, "task": task, "reason": reason, "detail": detail})
        self.handoff = handoff
        self.task = task
        self.reason = reason
        self.detail = detail


class HandoffRefusal(Exception):
    """Raise it in an ``on_handoff_prepare`` callback to refuse the handoff, or in an ``on_handoff_offer``
    callback to reject the task; ``reason`` reaches the other devices as the failure's ``detail``."""

    def __init__(self, reason: str = ""):
        super().__init__(reason)
        self.reason = reason


def _error_from(envelope: dict[str, Any]) -> ClientError:
    """The ClientError (or the subclass with the fields its code carries) for an ``error`` envelope."""
    code, message = str(envelope.get("code")), str(envelope.get("message", ""))
    details = {key: value for key, value in envelope.items() if key not in ("op", "code", "message", "id")}
    error: ClientError
    if code == "conflict" and "rev" in envelope:
        error = StateConflict(message, int(envelope["rev"]), envelope.get("value"))
    elif code == "conflict" and "owner" in envelope:
        error = TaskConflict(message, str(envelope.get("task")), str(envelope["owner"]), int(envelope["epoch"]),
                             int(envelope["expires"]))
    elif code == "stale_epoch":
        owner = envelope.get("owner")
        error = StaleEpoch(message, str(envelope.get("task")), int(envelope.get("epoch", 0)),
                           None if owner is None else str(owner))
    elif code == "handoff_busy":
        task, handoff = envelope.get("task"), envelope.get("handoff")
        error = HandoffBusy(message, None if task is None else str(task), None if handoff is None else str(handoff))
    else:
        error = ClientError(code, message)
    error.details.update(details)
    return error


@dataclass(frozen=True, slots=True)
class TaskLease:
    """A lease this device holds: ``epoch`` is the fencing token to name in ops for the task, ``expires`` the
    end of the lease in ms since the Unix epoch by the server's clock."""

    task: str
    owner: str
    epoch: int
    expires: int


@dataclass(frozen=True, slots=True)
class TaskStatus:
    """One task of the user, as ``task_list`` reports it: ``owner`` None once released, ``live`` when owned and
    not expired, ``handoff`` the id of an open handoff."""

    task: str
    owner: str | None
    epoch: int
    expires: int
    live: bool
    handoff: str | None = None


@dataclass(frozen=True, slots=True)
class HandoffResult:
    """A committed handoff: ``owner`` holds ``task`` at ``epoch`` now (``expires`` is None in a revocation)."""

    handoff: str
    task: str
    owner: str
    epoch: int
    expires: int | None = None

    @property
    def lease(self) -> TaskLease:
        return TaskLease(self.task, self.owner, self.epoch, self.expires or 0)


@dataclass(frozen=True, slots=True)
class HandoffPrepare:
    """The server asks this device, the owner at ``epoch``, to pause ``task`` for device ``to``."""

    handoff: str
    task: str
    to: str
    epoch: int
    deadline: int  # ms since the Unix epoch (server clock): answer before it


@dataclass(frozen=True, slots=True)
class HandoffOffer:
    """Device ``from_device`` paused ``task`` at ``checkpoint``; accepting gives this device ``epoch``."""

    handoff: str
    task: str
    from_device: str
    checkpoint: Any
    epoch: int
    deadline: int  # ms since the Unix epoch (server clock): answer before it


@dataclass(frozen=True, slots=True)
class StateDoc:
    doc: str
    rev: int  # 0 for a document that does not exist
    value: Any  # None: the document does not exist (or was deleted)


@dataclass(frozen=True, slots=True)
class StatePatchResult:
    doc: str
    rev: int
    prev_rev: int
    noop: bool


@dataclass(frozen=True, slots=True)
class StateChange:
    """One step of a subscribed document: a change (``patch`` applied, by device ``by``) or, with ``snapshot``,
    the whole document (after a subscribe or reconnect the log could not bridge). ``value`` is the document
    after it, kept by the client."""

    doc: str
    rev: int
    prev_rev: int
    patch: Any
    by: str | None
    value: Any
    snapshot: bool = False


class StateSubscription:
    """``async for change in subscription``: the documents' changes, gap-free across reconnects (the client
    subscribes again with ``since`` after every reconnect). Ends when the client is closed for good."""

    def __init__(self, client: Client, doc: str | None, prefix: str | None):
        self.client = client
        self.doc = doc
        self.prefix = prefix
        self.revs: dict[str, int] = {}  # document -> revision the application has seen
        self.values: dict[str, Any] = {}
        self._queue: asyncio.Queue[StateChange | ConnectionClosed] = asyncio.Queue()

    def matches(self, doc: str) -> bool:
        return doc == self.doc if self.doc is not None else doc.startswith(self.prefix or "")

    def subscribe_fields(self) -> dict[str, Any]:
        if self.doc is not None:
            fields: dict[str, Any] = {"doc": self.doc}
            if self.doc in self.revs:
                fields["since"] = self.revs[self.doc]
            return fields
        return {"prefix": self.prefix, "since": dict(self.revs)}

    def _on_envelope(self, envelope: dict[str, Any]) -> None:
        doc, rev = str(envelope["doc"]), int(envelope["rev"])
        if envelope["op"] == "state":
            if self.revs.get(doc) == rev:
                return
            value = envelope.get("value")
            change = StateChange(doc, rev, self.revs.get(doc, 0), None, None, value, True)
        else:
            if rev <= self.revs.get(doc, 0):
                return  # seen already (a repeated catch-up)
            value = merge_patch(self.values.get(doc), envelope.get("patch"))
            change = StateChange(doc, rev, int(envelope["prev_rev"]), envelope.get("patch"), envelope.get("by"),
                                 value)
        self.revs[doc] = rev
        self.values[doc] = value
        self._queue.put_nowait(change)

    async def next(self, timeout: float | None = None) -> StateChange:
        item = await asyncio.wait_for(self._queue.get(), timeout)
        if isinstance(item, ConnectionClosed):
            self._queue.put_nowait(item)
            raise item
        return item

    def __aiter__(self) -> AsyncIterator[StateChange]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[StateChange]:
        while True:
            try:
                yield await self.next()
            except ConnectionClosed:
                return

    async def close(self) -> None:
        """Stop the subscription (``state.unsubscribe``)."""
        client = self.client
        if self in client._state_subs:
            client._state_subs.remove(self)
            fields = {"doc": self.doc} if self.doc is not None else {"prefix": self.prefix}
            if not any((other.doc, other.prefix) == (self.doc, self.prefix) for other in client._state_subs):
                with contextlib.suppress(ConnectionError, ConnectionClosed, ClientError, TimeoutError):
                    await client.request("state.unsubscribe", **fields)
        self._queue.put_nowait(ConnectionClosed(None, "unsubscribed"))


TRANSIENT_ERRORS = frozenset({"rate_limited", "internal", "overloaded"})  # a renewal refused for now, not for good


class TaskKeeper:
    """Renews a lease (``Client.keep_task``) at a third of its lifetime until ``stop()``, or until the lease
    is lost. ``lease`` is the latest lease; ``renewed`` is set after every renewal (clear it to wait for the
    next); ``ended`` resolves to the StaleEpoch (or other ClientError) that ended it: the task was handed off
    or claimed by another device after the lease ran out; None after ``stop()`` or a release."""

    def __init__(self, client: Client, lease: TaskLease, ttl: float | None):
        self.client = client
        self.lease = lease
        self.ttl = ttl
        self.renewed = asyncio.Event()
        loop = asyncio.get_running_loop()
        self.ended: asyncio.Future[ClientError | None] = loop.create_future()
        self._runner = loop.create_task(self._run())

    def _interval(self) -> float:
        if self.ttl is not None:
            return self.ttl / 3
        remaining_ms = self.lease.expires - self.client.server_time()
        return max(0.05, remaining_ms / 3000)

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval())
            # wait no longer than the lease lasts: a renewal lost with a connection is sent again at once
            remaining = (self.lease.expires - self.client.server_time()) / 1000
            try:
                self.lease = await self.client.task_renew(self.lease.task, self.lease.epoch, ttl=self.ttl,
                                                          timeout=max(1.0, remaining))
            except ConnectionClosed:
                self._end(None)
                return
            except ClientError as exc:
                if exc.code in TRANSIENT_ERRORS:
                    log.debug("renewing task %r refused for now, will retry: %s", self.lease.task, exc)
                    continue
                self._end(exc)
                return
            except (ConnectionError, TimeoutError) as exc:
                # not connected right now: try again (the lease lasts a while yet) after a shorter wait
                log.debug("renewing task %r failed, will retry: %s", self.lease.task, exc)
                continue
            self.renewed.set()

    def _end(self, reason: ClientError | None) -> None:
        if not self.ended.done():
            self.ended.set_result(reason)
        if self.client._keepers.get(self.lease.task) is self:
            del self.client._keepers[self.lease.task]
        if self._runner is not asyncio.current_task():
            self._runner.cancel()

    async def stop(self) -> None:
        """Stop renewing (the lease stays until it expires; ``task_release`` gives it up at once)."""
        self._end(None)
        with contextlib.suppress(asyncio.CancelledError):
            await self._runner


class ConnectionClosed(Exception):
    """The connection ended and will not be re-established."""

    def __init__(self, code: int | None, reason: str):
        super().__init__(f"connection closed ({code}): {reason}")
        self.code = code
        self.reason = reason


class ReceiptTimeout(asyncio.TimeoutError):
    """Not every expected receipt arrived in time; ``receipts`` holds those that did."""

    def __init__(self, receipts: list[Receipt]):
        super().__init__(f"timed out waiting for receipts ({len(receipts)} received)")
        self.receipts = receipts


@dataclass
class _ReceiptWaiter:
    future: asyncio.Future[list[Receipt]]
    receipts: list[Receipt] = field(default_factory=list)
    expected: set[str] | None = None  # devices the message was routed to, once known
    settled: set[str] = field(default_factory=set)

    def add(self, envelope: dict[str, Any]) -> None:
        if self.future.done():
            return
        status = envelope.get("status")
        if status == "routed":
            self.expected = set(envelope.get("devices") or ()) | set(envelope.get("queued") or ())
        else:
            receipt = Receipt.from_envelope(envelope)
            self.receipts.append(receipt)
            if status == "duplicate":  # an earlier send with this id was taken: nothing more comes
                self.future.set_result(self.receipts)
                return
            if status == "moved" and self.expected is not None:  # a work item went to another device
                self.expected.discard(envelope.get("from_device"))
                self.expected.add(str(envelope.get("device")))
            if receipt.device is not None and status in SETTLED_STATUSES:
                self.settled.add(receipt.device)
        if self.expected is not None and self.expected <= self.settled:
            self.future.set_result(self.receipts)


class _Listener(WSListener):
    def __init__(self, client: Client):
        super().__init__()
        self.client = client
        self.close_code: int | None = None
        self.close_reason = ""

    def on_ws_frame(self, transport: WSTransport, frame: WSFrame) -> None:
        msg_type = frame.msg_type
        if msg_type == WSMsgType.BINARY:
            self.client._on_envelope(msgpack.unpackb(frame.get_payload_as_bytes(), raw=False, strict_map_key=False))
        elif msg_type == WSMsgType.TEXT:
            self.client._on_envelope(json.loads(frame.get_payload_as_bytes()))
        elif msg_type == WSMsgType.CLOSE:
            close_code: Any = frame.get_close_code()  # a plain int for codes picows has no name for
            self.close_code = int(close_code)
            self.close_reason = frame.get_close_reason() or ""
            if not transport.is_close_frame_sent:
                transport.send_close(frame.get_close_code())
            transport.disconnect()

    def on_ws_disconnected(self, transport: WSTransport) -> None:
        self.client._on_disconnected(self)


class Client:
    """A device's connection to rccs. Create (inside or outside a running event loop), then ``await connect()``
    (or ``async with``) in the loop it is to run in."""

    def __init__(
        self,
        url: str,
        token: str | None,
        device: Mapping[str, Any] | None = None,
        *,
        credential: str | None = None,
        pairing_code: str | None = None,
        encoding: str = MSGPACK,
        auto_ack: bool = True,
        reconnect: bool = True,
        backoff_initial: float = 0.2,
        backoff_max: float = 15.0,
        receipt_timeout: float = 30.0,
        on_message: Callable[[Message], Awaitable[None] | None] | None = None,
        ssl: SSLContext | None = None,
    ):
        if encoding not in (MSGPACK, JSON):
            raise ValueError("encoding must be 'msgpack' or 'json'")
        if token is None and credential is None and pairing_code is None:
            raise ValueError("give a token, a credential or a pairing code")
        self.url = url
        self.token = token
        self.credential = credential
        self.pairing_code = pairing_code
        self.device = None if device is None else dict(device)
        self.session_id: str | None = None
        self.last_seq = 0  # highest seq received in the current session
        self.encoding = encoding
        self.auto_ack = auto_ack
        self.reconnect = reconnect
        self.backoff_initial = backoff_initial
        self.backoff_max = backoff_max
        self.receipt_timeout = receipt_timeout
        self.on_message = on_message
        self.ssl = ssl  # for wss:// URLs: e.g. a context trusting a private CA (None: the system's defaults)
        self.welcome: dict[str, Any] | None = None
        self.errors: asyncio.Queue[ClientError] = asyncio.Queue()
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self.receipts: asyncio.Queue[Receipt] = asyncio.Queue()  # receipts no send() is waiting for any more
        # Recent (sender, id) of ack:true messages and where each stands. A repeat of one the application has
        # not finished taking is never acked: only taking it acks (with the seq the server wrote it with last).
        self._seen_messages: dict[tuple[str, str | int], _SeenMessage] = {}
        self._session_generation = 0  # +1 for every new (not resumed) session: seqs of older ones mean nothing
        self.duplicates = 0  # redelivered messages not handed to the application again
        self._requests: dict[str | int, asyncio.Future[dict[str, Any]]] = {}
        self.reconnects = 0
        self.reconnected = asyncio.Event()  # set after every successful reconnect; clear it to wait again
        self._inbox: asyncio.Queue[Message | ConnectionClosed] = asyncio.Queue()
        self._waiters: dict[str | int, _ReceiptWaiter] = {}
        self._pings: dict[str, asyncio.Future[int]] = {}
        self._calls: dict[str | int, asyncio.Future[Any]] = {}  # our calls waiting for their result
        self._handlers: dict[str, CallHandler] = {}
        self._handling: set[asyncio.Task[None]] = set()  # calls to us being answered
        self._ids = itertools.count(1)
        self._id_prefix = secrets.token_hex(4)
        self._transport: WSTransport | None = None
        self._listener: _Listener | None = None
        self._connected = asyncio.Event()
        self._welcomed: asyncio.Future[dict[str, Any]] | None = None
        self._runner: asyncio.Task[None] | None = None
        self._closing = False
        self.paired: dict[str, Any] | None = None  # the ``paired`` envelope (user, device, credential)
        self._closed: asyncio.Future[ConnectionClosed] | None = None  # made on first use: see ``closed``
        self._state_subs: list[StateSubscription] = []
        self.device_id: str | None = None  # this device's id, from the latest welcome
        self._clock_offset_ms = 0.0  # the server's clock minus ours, from the latest welcome
        self._handoff_requests: dict[str | int, asyncio.Future[HandoffResult]] = {}  # request id -> outcome
        self._handoff_outcomes: dict[str, asyncio.Future[HandoffResult]] = {}  # handoff id -> outcome
        self._handoffs_seen: dict[tuple[str, str], None] = {}  # recent (op, handoff id) told to the application
        self._keepers: dict[str, TaskKeeper] = {}  # task -> its renewer
        self._on_prepare: Callable[[HandoffPrepare], Any] | None = None
        self._on_offer: Callable[[HandoffOffer], Any] | None = None
        self._on_gained: Callable[[HandoffResult], Any] | None = None
        self._on_lost: Callable[[HandoffResult], Any] | None = None
        self._on_failed: Callable[[HandoffFailed], Any] | None = None

    # ---- lifecycle ----------------------------------------------------

    @property
    def closed(self) -> asyncio.Future[ConnectionClosed]:
        """Resolves with ConnectionClosed once the client has stopped for good (``close()``, or a refusal)."""
        # Created on first use, in the loop the client runs in, so that a Client can be made before any
        # loop runs (at import time, in synchronous set-up code). Its queues and events need no such care:
        # asyncio binds them to a loop only when they are first waited on.
        if self._closed is None:
            self._closed = asyncio.get_running_loop().create_future()
        return self._closed

    async def connect(self) -> dict[str, Any]:
        """Connect and say hello; returns the ``welcome``. Raises ConnectionClosed if refused."""
        welcome = await self._connect_once()
        self._runner = asyncio.get_running_loop().create_task(self._supervise())
        return welcome

    async def _connect_once(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        self._welcomed = loop.create_future()
        transport, listener = await ws_connect(lambda: _Listener(self), self.url, enable_auto_ping=False,
                                               ssl_context=self.ssl)
        assert isinstance(listener, _Listener)
        self._transport, self._listener = transport, listener
        if self.credential is None and self.token is None:
            assert self.pairing_code is not None
            self._send({"op": "pair.redeem", "id": "pair", "code": self.pairing_code, "device": self.device})
        else:
            hello: dict[str, Any] = {"op": "hello"}
            if self.credential is not None:
                hello["credential"] = self.credential
            else:
                hello["token"] = self.token
            if self.device is not None:
                hello["device"] = self.device
            if self.session_id is not None:
                hello["resume"] = {"session": self.session_id, "last_seq": self.last_seq}
            self._send(hello)
        try:
            # Pairing may wait for a person to approve it; a hello does not wait long.
            welcome = await asyncio.wait_for(asyncio.shield(self._welcomed),
                                             None if self.credential is None and self.token is None else 30)
        except BaseException:
            transport.disconnect()
            raise
        if not welcome.get("resumed"):
            self.last_seq = 0
            self._session_generation += 1
        self.session_id = welcome.get("session")
        self.welcome = welcome
        self._connected.set()
        return welcome

    async def _supervise(self) -> None:
        """Wait for each connection to end; reconnect with backoff unless that cannot help."""
        delay = self.backoff_initial
        while True:
            listener = self._listener
            assert self._transport is not None and listener is not None
            await self._transport.wait_disconnected()
            self._connected.clear()
            code = listener.close_code
            if self._closing or not self.reconnect or (code is not None and code in FATAL_CLOSE_CODES):
                self._finish(ConnectionClosed(code, listener.close_reason or "closed"))
                return
            while True:
                await asyncio.sleep(random.uniform(0, delay))
                try:
                    await self._connect_once()
                except ConnectionClosed as exc:
                    if exc.code in FATAL_CLOSE_CODES:
                        self._finish(exc)
                        return
                except (TimeoutError, OSError, Exception) as exc:
                    log.debug("reconnect to %s failed: %s", self.url, exc)
                else:
                    self.reconnects += 1
                    self._resubscribe_state()
                    self.reconnected.set()
                    delay = self.backoff_initial
                    break
                if self._closing:
                    self._finish(ConnectionClosed(None, "closed"))
                    return
                delay = min(delay * 2, self.backoff_max)

    def _finish(self, reason: ConnectionClosed) -> None:
        if not self.closed.done():
            self.closed.set_result(reason)
        self._inbox.put_nowait(reason)
        for subscription in self._state_subs:
            subscription._queue.put_nowait(reason)
        for waiter in self._waiters.values():
            if not waiter.future.done():
                waiter.future.set_exception(reason)
        futures: list[asyncio.Future[Any]] = [*self._pings.values(), *self._requests.values(),
                                              *self._calls.values(), *self._handoff_requests.values(),
                                              *self._handoff_outcomes.values()]
        for keeper in list(self._keepers.values()):
            keeper._end(None)
        for future in futures:
            if not future.done():
                future.set_exception(reason)

    async def close(self) -> None:
        """Close the connection for good (1000) and stop reconnecting."""
        self._closing = True
        transport = self._transport
        if transport is not None and not transport.is_disconnected:
            if not transport.is_close_frame_sent:
                transport.send_close(1000)  # type: ignore[arg-type]
            transport.disconnect()
            await transport.wait_disconnected()
        if self._runner is not None:
            with contextlib.suppress(asyncio.CancelledError, ConnectionClosed):
                await self._runner
        self._finish(ConnectionClosed(1000, "closed by client"))

    async def __aenter__(self) -> Client:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    # ---- output -------------------------------------------------------

    def _send(self, envelope: dict[str, Any]) -> None:
        transport = self._transport
        if transport is None or transport.is_disconnected:
            raise ConnectionError("not connected")
        if self.encoding == MSGPACK:
            transport.send(WSMsgType.BINARY, msgpack.packb(envelope, use_bin_type=True))
        else:
            transport.send(WSMsgType.TEXT, json.dumps(envelope, separators=(",", ":")).encode())

    async def _send_when_connected(self, envelope: dict[str, Any]) -> None:
        if not self._connected.is_set():
            if self.closed.done():
                raise self.closed.result()
            await asyncio.wait_for(self._connected.wait(), self.receipt_timeout)
        self._send(envelope)

    def new_id(self) -> str:
        return f"{self._id_prefix}-{next(self._ids)}"

    async def send(
        self,
        to: Mapping[str, Any],
        type: str,
        body: Any = None,
        *,
        ack: bool = False,
        id: str | int | None = None,
        timeout: float | None = None,
        ttl: float | None = None,
        priority: int | str | None = None,
        durable: bool = False,
        first_ack: bool = False,
    ) -> list[Receipt]:
        """Send a message. With ``ack=True``, wait until every target device has a settled receipt
        (``delivered``, ``failed``, ``expired``, or ``queued`` for an offline device: its final receipt
        arrives later on ``client.receipts``) and return the receipts so far. ``ttl`` (seconds),
        ``priority`` (0-4 or LOW..EMERGENCY) and ``durable`` are the delivery options of protocol.md 4.2.
        Raises ClientError if the server refuses the send, ReceiptTimeout after ``timeout``.
        """
        msg_id = self.new_id() if id is None else id
        envelope: dict[str, Any] = {"op": "send", "id": msg_id, "to": dict(to), "type": type, "body": body}
        if ttl is not None:
            envelope["ttl"] = ttl
        if priority is not None:
            envelope["priority"] = priority
        if durable:
            envelope["durable"] = True
        if first_ack:
            envelope["first_ack"] = True
        if not ack:
            await self._send_when_connected(envelope)
            return []
        envelope["ack"] = True
        waiter = _ReceiptWaiter(asyncio.get_running_loop().create_future())
        self._waiters[msg_id] = waiter
        try:
            await self._send_when_connected(envelope)
            try:
                return await asyncio.wait_for(asyncio.shield(waiter.future), timeout or self.receipt_timeout)
            except TimeoutError:
                raise ReceiptTimeout(list(waiter.receipts)) from None
        finally:
            self._waiters.pop(msg_id, None)

    async def ack(self, seq: int | list[int]) -> None:
        await self._send_when_connected({"op": "ack", "seq": seq})

    async def request(self, op: str, **fields: Any) -> dict[str, Any]:
        """Send a request op and return its reply; raises ClientError for an ``error`` reply."""
        return await self.request_with_id(f"req-{self.new_id()}", op, **fields)

    async def devices(self) -> list[dict[str, Any]]:
        """The user's devices with their status and capabilities."""
        reply = await self.request("devices")
        return list(reply["devices"])

    async def update_device(self, device: str | None = None, **changes: Any) -> dict[str, Any]:
        """Change name, capabilities, metadata, ... of this device (or another of the user's)."""
        fields: dict[str, Any] = {"set": changes}
        if device is not None:
            fields["device"] = device
        return dict((await self.request("device.update", **fields))["device"])

    async def revoke_device(self, device: str) -> None:
        await self.request("device.revoke", device=device)

    async def sessions(self) -> list[dict[str, Any]]:
        return list((await self.request("sessions"))["sessions"])

    async def revoke_session(self, session: str) -> None:
        await self.request("session.revoke", session=session)

    async def set_presence(self, status: str) -> None:
        """``"away"`` when the app goes to the background, ``"online"`` when it is back."""
        await self.request("presence.set", status=status)

    async def refresh(self, *, token: str | None = None, credential: str | None = None) -> int:
        """Extend the session with a fresh token (or the credential) in band; returns the new expiry (ms)."""
        if token is not None:
            reply = await self.request("refresh", token=token)
            self.token = token
        else:
            reply = await self.request("refresh", credential=credential or self.credential)
        return int(reply["expires_at"])

    async def create_pairing_code(self, *, approve: bool = False, ttl: float | None = None) -> dict[str, Any]:
        """A code (and URI) a new device can redeem to join this user."""
        fields: dict[str, Any] = {"approve": approve}
        if ttl is not None:
            fields["ttl"] = ttl
        return await self.request("pair.create", **fields)

    async def approve_pairing(self, request: str) -> None:
        await self.request("pair.approve", request=request)

    async def deny_pairing(self, request: str) -> None:
        await self.request("pair.deny", request=request)

    async def next_event(self, op: str | None = None, timeout: float | None = None) -> dict[str, Any]:
        """The next server event (``presence``, ``pair.request``, ...), optionally of one op; others are dropped."""
        while True:
            event = await asyncio.wait_for(self.events.get(), timeout)
            if op is None or event.get("op") == op:
                return event

    async def ping(self) -> int:
        """Round trip to the server; returns its clock (ms since the epoch)."""
        ping_id = f"ping-{self.new_id()}"
        future: asyncio.Future[int] = asyncio.get_running_loop().create_future()
        self._pings[ping_id] = future
        try:
            await self._send_when_connected({"op": "ping", "id": ping_id})
            return await asyncio.wait_for(future, self.receipt_timeout)
        finally:
            self._pings.pop(ping_id, None)

    # ---- state documents (protocol.md section 14) ------------------------

    async def state_get(self, doc: str) -> StateDoc:
        reply = await self.request("state.get", doc=doc)
        return StateDoc(doc, int(reply["rev"]), reply.get("value"))

    async def state_patch(self, doc: str, patch: Any, *, if_rev: int | None = None,
                          id: str | int | None = None, task: str | None = None,
                          epoch: int | None = None) -> StatePatchResult:
        """Apply a JSON merge patch (RFC 7396: null deletes a member, arrays are replaced whole; ``None`` as
        the whole patch deletes the document). If the connection drops before the answer, the patch is sent
        again with the same ``id`` after the reconnect: the server applies it once. Raises StateConflict
        (``if_rev`` is not the current revision), ClientError ``too_large``, ``forbidden``, ``bad_request``.

        With ``task`` and ``epoch`` the write is fenced: applied only while this device holds the task at that
        epoch, else StaleEpoch (it lost the task) or HandoffBusy (it answered a handoff's prepare and must stay
        paused until the handoff ends)."""
        if (task is None) != (epoch is None):
            raise ValueError("a fenced patch names both task and epoch")
        patch_id = f"patch-{self.new_id()}" if id is None else id
        envelope: dict[str, Any] = {"op": "state.patch", "id": patch_id, "doc": doc, "patch": patch}
        if if_rev is not None:
            envelope["if_rev"] = if_rev
        if task is not None:
            envelope["task"] = task
            envelope["epoch"] = epoch
        reply = await self._request_resent(envelope, self.receipt_timeout)
        return StatePatchResult(doc, int(reply["rev"]), int(reply["prev_rev"]), bool(reply["noop"]))

    async def _request_resent(self, envelope: dict[str, Any], timeout: float) -> dict[str, Any]:
        """Send a request that may safely arrive twice (its ``id`` makes the repeat harmless); if the connection
        drops before the answer, send it again after the reconnect. TimeoutError after ``timeout`` seconds."""
        request_id = envelope["id"]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            future: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._requests[request_id] = future
            try:
                await asyncio.wait_for(self._send_when_connected(envelope), max(0.0, deadline - loop.time()))
                transport = self._transport
                assert transport is not None
                lost: asyncio.Future[Any] = loop.create_task(transport.wait_disconnected())
                waiting: set[asyncio.Future[Any]] = {future, lost}
                try:
                    await asyncio.wait(waiting, timeout=max(0.0, deadline - loop.time()),
                                       return_when=asyncio.FIRST_COMPLETED)
                finally:
                    lost.cancel()
                if future.done():
                    return future.result()
                if not lost.done() or loop.time() >= deadline:
                    raise TimeoutError(f"no answer to {envelope.get('op')} {request_id!r}")
            finally:
                self._requests.pop(request_id, None)

    async def state_subscribe(self, doc: str | None = None, *, prefix: str | None = None,
                              known: Mapping[str, tuple[int, Any]] | None = None) -> StateSubscription:
        """Subscribe to one document or to every document whose name starts with ``prefix``; the returned
        subscription yields the current state first (a snapshot per document, or, for documents in ``known``:
        document -> (revision, value) the application already has, the changes since), then every change."""
        if (doc is None) == (prefix is None):
            raise ValueError("give a doc or a prefix")
        subscription = StateSubscription(self, doc, prefix)
        for name, (rev, value) in (known or {}).items():
            subscription.revs[name] = rev
            subscription.values[name] = value
        self._state_subs.append(subscription)
        try:
            await self.request("state.subscribe", **subscription.subscribe_fields())
        except BaseException:
            self._state_subs.remove(subscription)
            raise
        return subscription

    def _resubscribe_state(self) -> None:
        """After a reconnect: every subscription continues from what it has (``since``)."""
        for subscription in list(self._state_subs):
            task = asyncio.get_running_loop().create_task(self._resubscribe(subscription))
            self._handling.add(task)
            task.add_done_callback(self._handling.discard)

    async def _resubscribe(self, subscription: StateSubscription) -> None:
        try:
            await self.request("state.subscribe", **subscription.subscribe_fields())
        except (ClientError, ConnectionError, ConnectionClosed, TimeoutError) as exc:
            log.warning("could not subscribe again to %s: %s", subscription.doc or subscription.prefix, exc)

    def _on_state(self, envelope: dict[str, Any]) -> None:
        doc = envelope.get("doc")
        if not isinstance(doc, str):
            return
        for subscription in self._state_subs:
            if subscription.matches(doc):
                subscription._on_envelope(envelope)

    # ---- tasks: leases and handoff (protocol.md section 15) ---------------

    def server_time(self) -> float:
        """The server's clock now (ms since the Unix epoch), estimated from the latest ``welcome``."""
        return time.time() * 1000 + self._clock_offset_ms

    async def task_claim(self, task: str, *, ttl: float | None = None) -> TaskLease:
        """Own ``task``: a new lease at the next epoch, or this device's own lease extended (same epoch).
        ``ttl``: seconds the lease lasts (the server's ``task_lease_ttl``, 30 s, when None); renew it in
        time (``task_renew`` or ``keep_task``). Raises TaskConflict (another device holds a live lease),
        HandoffBusy (a handoff of the task is open), ClientError ``too_large`` / ``bad_request``."""
        fields: dict[str, Any] = {"task": task}
        if ttl is not None:
            fields["ttl"] = ttl
        return self._lease(await self.request("task.claim", **fields))

    async def task_renew(self, task: str, epoch: int, *, ttl: float | None = None,
                         timeout: float | None = None) -> TaskLease:
        """Extend this device's lease at ``epoch`` (also after it expired, if nobody claimed the task since).
        Raises StaleEpoch when the task moved on: stop acting for it; TimeoutError after ``timeout`` seconds
        (default ``receipt_timeout``) without an answer, across reconnects."""
        envelope: dict[str, Any] = {"op": "task.renew", "id": f"req-{self.new_id()}", "task": task, "epoch": epoch}
        if ttl is not None:
            envelope["ttl"] = ttl
        # a renewal may arrive twice: it is sent again after a reconnect instead of waiting out receipt_timeout
        return self._lease(await self._request_resent(envelope, timeout or self.receipt_timeout))

    async def task_release(self, task: str, epoch: int) -> None:
        """Give the lease up (and stop its ``keep_task`` renewer): nobody owns the task; the next claim gets the
        next epoch. Raises StaleEpoch, or HandoffBusy while a handoff of the task is open."""
        await self.request("task.release", task=task, epoch=epoch)
        keeper = self._keepers.get(task)
        if keeper is not None and keeper.lease.epoch == epoch:
            keeper._end(None)

    async def task_list(self, task: str | None = None) -> list[TaskStatus]:
        """Every task of the user ever claimed (or only ``task``): who owns it, at which epoch, until when."""
        reply = await self.request("task.list", **({} if task is None else {"task": task}))
        return [TaskStatus(str(entry["task"]), entry.get("owner"), int(entry["epoch"]), int(entry["expires"]),
                           bool(entry.get("live")), entry.get("handoff")) for entry in reply["tasks"]]

    def keep_task(self, lease: TaskLease, *, ttl: float | None = None) -> TaskKeeper:
        """Renew ``lease`` in the background at a third of its lifetime (``ttl`` seconds per renewal, or the
        server's default) until the lease is lost (handed off: ``keeper.ended`` gets a StaleEpoch) or
        ``keeper.stop()``. Replaces an earlier keeper of the same task."""
        earlier = self._keepers.get(lease.task)
        if earlier is not None:
            earlier._end(None)
        keeper = self._keepers[lease.task] = TaskKeeper(self, lease, ttl)
        return keeper

    @staticmethod
    def _lease(reply: dict[str, Any]) -> TaskLease:
        return TaskLease(str(reply["task"]), str(reply["owner"]), int(reply["epoch"]), int(reply["expires"]))

    async def handoff(self, task: str, to: Mapping[str, Any] | str, *,
                      timeout: float | None = HANDOFF_TIMEOUT) -> HandoffResult:
        """Move ``task`` from its owner to the device ``to`` selects (a selector, or a device id): push from
        the owner, pull to this device, or from a third device. Waits for the outcome: returns the committed
        HandoffResult (new owner, new epoch), raises HandoffFailed (the old owner keeps the task) or, if it
        cannot start, ClientError ``not_found`` (nobody holds the task), HandoffBusy, ``offline`` (the owner
        or every matching device is not connected), ``bad_request`` (``to`` names the owner). ``timeout``
        (seconds; the default outlasts the server's default prepare and accept timeouts) raises TimeoutError;
        the handoff may still finish then. The owner's ``on_handoff_prepare`` and the target's
        ``on_handoff_offer`` callbacks decide it; the new owner's ``on_task_gained`` hears the commit."""
        request_id = f"handoff-{self.new_id()}"
        loop = asyncio.get_running_loop()
        outcome: asyncio.Future[HandoffResult] = loop.create_future()
        self._handoff_requests[request_id] = outcome  # moved to _handoff_outcomes by handoff.started
        handoff_id: str | None = None
        try:
            started = await self.request_with_id(
                request_id, "handoff.request", task=task, to={"device": to} if isinstance(to, str) else dict(to))
            handoff_id = str(started["handoff"])
            try:
                return await asyncio.wait_for(outcome, timeout)
            except TimeoutError:
                raise TimeoutError(f"no outcome of handoff {handoff_id} of task {task!r} in time") from None
        finally:
            self._handoff_requests.pop(request_id, None)
            if handoff_id is not None:
                self._handoff_outcomes.pop(handoff_id, None)

    async def request_with_id(self, request_id: str, op: str, **fields: Any) -> dict[str, Any]:
        """``request`` with an ``id`` chosen by the caller."""
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        try:
            await self._send_when_connected({"op": op, "id": request_id, **fields})
            return await asyncio.wait_for(future, self.receipt_timeout)
        finally:
            self._requests.pop(request_id, None)

    def on_handoff_prepare(self, callback: Callable[[HandoffPrepare], Any] | None) -> None:
        """``callback(prepare)`` (sync or async) runs when a handoff asks this device to give up one of its
        tasks: pause the work at a safe point and return the checkpoint the target continues from (any
        JSON/msgpack value, at most 256 KiB), or raise HandoffRefusal(reason) to refuse (the task stays
        here). Until the handoff ends this device's fenced writes for the task get HandoffBusy; then either
        ``on_task_lost`` (the task moved) or ``on_handoff_failed`` (it stays: resume) follows. Without a
        callback (None removes it) every handoff of this device's tasks is refused; another exception
        refuses too (and is logged)."""
        self._on_prepare = callback

    def on_handoff_offer(self, callback: Callable[[HandoffOffer], Any] | None) -> None:
        """``callback(offer)`` (sync or async) runs when another device's task is offered to this one: return
        True to accept (the task becomes this device's at ``offer.epoch`` when ``on_task_gained`` fires),
        False, or raise HandoffRefusal(reason), to reject. Without a callback every offer is rejected."""
        self._on_offer = callback

    def on_task_gained(self, callback: Callable[[HandoffResult], Any] | None) -> None:
        """``callback(result)`` runs once per handoff that gave this device a task (``result.lease`` is its
        lease), also when the server repeats the news after a reconnect because this device has not used
        the lease yet (renew it, e.g. with ``keep_task(result.lease)``, or write fenced with it)."""
        self._on_gained = callback

    def on_task_lost(self, callback: Callable[[HandoffResult], Any] | None) -> None:
        """``callback(result)`` runs when a handoff moved one of this device's tasks to ``result.owner``: stop
        working on it (its ops at the old epoch get StaleEpoch from now on). A ``keep_task`` renewer of the
        task stops by itself."""
        self._on_lost = callback

    def on_handoff_failed(self, callback: Callable[[HandoffFailed], Any] | None) -> None:
        """``callback(failure)`` runs for every handoff this device took part in that failed; the owner keeps
        the task and, if it paused in ``on_handoff_prepare``, should resume."""
        self._on_failed = callback

    def _remember_handoff(self, op: str, handoff: str) -> bool:
        """True the first time (op, handoff) is seen: the server repeats ``handoff.committed``."""
        key = (op, handoff)
        if key in self._handoffs_seen:
            return False
        self._handoffs_seen[key] = None
        if len(self._handoffs_seen) > SEEN_HANDOFFS:
            del self._handoffs_seen[next(iter(self._handoffs_seen))]
        return True

    def _background(self, coroutine: Awaitable[None]) -> None:
        task = asyncio.ensure_future(coroutine)
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)

    async def _notify(self, name: str, callback: Callable[[Any], Any] | None, argument: Any) -> None:
        if callback is None:
            return
        try:
            result = callback(argument)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("%s callback failed", name)

    def _on_handoff(self, envelope: dict[str, Any]) -> None:
        op = envelope["op"]
        handoff, task = str(envelope.get("handoff")), str(envelope.get("task"))
        if op == "handoff.started":
            outcome = self._handoff_requests.pop(envelope.get("id"), None)  # type: ignore[arg-type]
            if outcome is not None:  # registered before any later envelope can report the outcome
                self._handoff_outcomes[handoff] = outcome
            request = self._requests.get(envelope.get("id"))  # type: ignore[arg-type]
            if request is not None and not request.done():
                request.set_result(envelope)
        elif op == "handoff.prepare":
            prepare = HandoffPrepare(handoff, task, str(envelope.get("to")), int(envelope.get("epoch", 0)),
                                     int(envelope.get("deadline", 0)))
            self._background(self._answer_prepare(prepare))
        elif op == "handoff.offer":
            offer = HandoffOffer(handoff, task, str(envelope.get("from")), envelope.get("checkpoint"),
                                 int(envelope.get("epoch", 0)), int(envelope.get("deadline", 0)))
            self._background(self._answer_offer(offer))
        elif op in ("handoff.committed", "handoff.revoked"):
            expires = envelope.get("expires")
            result = HandoffResult(handoff, task, str(envelope.get("owner")), int(envelope.get("epoch", 0)),
                                   None if expires is None else int(expires))
            outcome = self._handoff_outcomes.get(handoff)
            if op == "handoff.committed" and outcome is not None and not outcome.done():
                outcome.set_result(result)
            if op == "handoff.committed" and result.owner == self.device_id and self._remember_handoff(op, handoff):
                self._background(self._notify("on_task_gained", self._on_gained, result))
            elif op == "handoff.revoked" and self._remember_handoff(op, handoff):
                keeper = self._keepers.get(task)
                if keeper is not None and keeper.lease.epoch < result.epoch:
                    keeper._end(StaleEpoch(f"task {task!r} was handed off to {result.owner!r}", task,
                                           result.epoch, result.owner))
                self._background(self._notify("on_task_lost", self._on_lost, result))
        elif op == "handoff.failed":
            detail = envelope.get("detail")
            failure = HandoffFailed(handoff, task, str(envelope.get("reason")), None if detail is None else str(detail))
            outcome = self._handoff_outcomes.get(handoff)
            if outcome is not None and not outcome.done():
                outcome.set_exception(failure)
            if self._remember_handoff(op, handoff):
                self._background(self._notify("on_handoff_failed", self._on_failed, failure))

    async def _answer_prepare(self, prepare: HandoffPrepare) -> None:
        def refuse(reason: str) -> dict[str, Any]:
            return {"op": "handoff.refuse", "handoff": prepare.handoff, "reason": reason}

        callback = self._on_prepare
        if callback is None:
            answer = refuse("this device hands off no tasks (it has no on_handoff_prepare callback)")
        else:
            try:
                checkpoint = callback(prepare)
                if inspect.isawaitable(checkpoint):
                    checkpoint = await checkpoint
            except HandoffRefusal as exc:
                answer = refuse(exc.reason)
            except Exception as exc:
                log.exception("on_handoff_prepare callback failed for task %r", prepare.task)
                answer = refuse(f"{type(exc).__name__}: {exc}")
            else:
                answer = {"op": "handoff.prepared", "handoff": prepare.handoff, "checkpoint": checkpoint}
        with contextlib.suppress(ConnectionError):  # gone: the server fails the handoff (owner_disconnected)
            try:
                if self.encoding == JSON and "checkpoint" in answer:
                    json.dumps(answer["checkpoint"], allow_nan=False)  # the server refuses NaN in JSON
                self._send(answer)
            except (TypeError, ValueError, OverflowError) as exc:  # a checkpoint this encoding cannot carry
                self._send(refuse(f"the checkpoint cannot be encoded: {exc}"))

    async def _answer_offer(self, offer: HandoffOffer) -> None:
        callback = self._on_offer
        accepted, reason = False, "this device takes no tasks (it has no on_handoff_offer callback)"
        if callback is not None:
            try:
                verdict = callback(offer)
                if inspect.isawaitable(verdict):
                    verdict = await verdict
                accepted, reason = bool(verdict), "declined"
            except HandoffRefusal as exc:
                reason = exc.reason
            except Exception as exc:
                log.exception("on_handoff_offer callback failed for task %r", offer.task)
                reason = f"{type(exc).__name__}: {exc}"
        answer: dict[str, Any] = {"op": "handoff.accept" if accepted else "handoff.reject", "handoff": offer.handoff}
        if not accepted:
            answer["reason"] = reason
        with contextlib.suppress(ConnectionError):  # gone: the server fails the handoff (target_disconnected)
            self._send(answer)

    # ---- RPC ----------------------------------------------------------

    async def call(self, to: Mapping[str, Any] | str, method: str, params: Any = None,
                   timeout: float | None = 30.0, *, id: str | int | None = None) -> Any:
        """Call ``method`` on one online device (``to`` is a selector, or a device id) and return its result.

        The most recently active matching device answers (protocol.md section 13). Raises ClientError:
        ``offline`` (no device got the call), ``timeout`` (no answer within ``timeout`` seconds; the
        server's default when None), ``disconnected`` (the target, or this connection, went away before
        the answer: the method may or may not have run), ``forbidden``, ``bad_request``, ... or the code
        of the target's error (``unknown_method``, ``handler_error``, or whatever its handler raised).
        """
        call_id = self.new_id() if id is None else id
        envelope: dict[str, Any] = {"op": "call", "id": call_id, "to": {"device": to} if isinstance(to, str)
                                    else dict(to), "method": method, "params": params}
        if timeout is not None:
            envelope["timeout"] = timeout
        if call_id in self._calls:
            raise ValueError(f"a call with id {call_id!r} is already waiting")
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._calls[call_id] = future
        try:
            await self._send_when_connected(envelope)
            wait = (30.0 if timeout is None else timeout) + CALL_GRACE
            try:
                return await asyncio.wait_for(future, wait)
            except TimeoutError:
                raise ClientError("timeout", "the server did not answer the call in time") from None
        finally:
            self._calls.pop(call_id, None)

    def handle(self, method: str, handler: CallHandler | None) -> None:
        """Answer calls of ``method`` with ``handler(params)`` (a function or a coroutine function; None removes it).

        Its return value is the result. A ClientError it raises becomes an error result with that code and
        message; any other exception an error result with code ``handler_error``. Calls of methods without
        a handler are answered with code ``unknown_method``. Sync handlers run on the event loop: keep them short.
        """
        if handler is None:
            self._handlers.pop(method, None)
        else:
            self._handlers[method] = handler

    def _on_call(self, envelope: dict[str, Any]) -> None:
        task = asyncio.get_running_loop().create_task(self._answer(envelope))
        self._handling.add(task)
        task.add_done_callback(self._handling.discard)

    async def _answer(self, envelope: dict[str, Any]) -> None:
        call_id = envelope.get("id")
        method = envelope.get("method")
        handler = self._handlers.get(method) if isinstance(method, str) else None
        answer: dict[str, Any] = {"op": "result", "id": call_id}
        if handler is None:
            answer["error"] = {"code": "unknown_method", "message": f"no handler for method {method!r}"}
        else:
            try:
                result = handler(envelope.get("params"))
                if inspect.isawaitable(result):
                    result = await result
            except ClientError as exc:
                answer["error"] = {"code": exc.code, "message": exc.message}
            except Exception as exc:
                log.exception("handler for method %r failed", method)
                answer["error"] = {"code": "handler_error", "message": f"{type(exc).__name__}: {exc}"}
            else:
                answer["result"] = result
        with contextlib.suppress(ConnectionError):  # the caller hears "disconnected" from the server
            try:
                if self.encoding == JSON and "result" in answer:
                    json.dumps(answer["result"], allow_nan=False)  # the server refuses NaN in JSON
                self._send(answer)
            except (TypeError, ValueError, OverflowError) as exc:  # a result this encoding cannot carry
                self._send({"op": "result", "id": call_id, "error": {
                    "code": "handler_error", "message": f"the result cannot be encoded: {exc}"}})

    # ---- input --------------------------------------------------------

    async def next_message(self, timeout: float | None = None) -> Message:
        """The next incoming message (acked now if it asked for an ack and auto_ack is on)."""
        item = await asyncio.wait_for(self._inbox.get(), timeout)
        if isinstance(item, ConnectionClosed):
            self._inbox.put_nowait(item)
            raise item
        return self._taken(item)

    async def messages(self) -> AsyncIterator[Message]:
        """Iterate incoming messages until the client is closed for good."""
        while True:
            try:
                yield await self.next_message()
            except ConnectionClosed:
                return

    def _taken(self, message: Message) -> Message:
        """The application has taken ``message``: ack it now (auto_ack), with the seq the server wrote it with
        last. Returns the message carrying that seq, for an application that acks by hand."""
        if not message.ack:
            return message
        seen = self._seen_messages.get((message.sender, message.id))
        if seen is None:  # forgotten (more than SEEN_MESSAGES since): its own seq is all there is
            self._ack_now(message.seq)
            return message
        seen.stage = "taken"
        if seen.generation != self._session_generation:
            # Written in a session that is gone: the server writes it again in this one, and that repeat
            # (recognised as taken) is acked when it arrives.
            return message
        self._ack_now(seen.seq)
        return message if seen.seq == message.seq else replace(message, seq=seen.seq)

    def _ack_now(self, seq: int) -> None:
        if self.auto_ack:
            with contextlib.suppress(ConnectionError):
                self._send({"op": "ack", "seq": seq})

    def _on_envelope(self, envelope: Any) -> None:
        if not isinstance(envelope, dict):
            log.warning("ignoring a non-map envelope from the server")
            return
        op = envelope.get("op")
        if op == "msg":
            message = Message(envelope["seq"], envelope["id"], envelope["from"], envelope["type"],
                              envelope.get("body"), envelope["ts"], bool(envelope.get("ack")))
            key = (message.sender, message.id)
            seen = self._seen_messages.get(key) if message.ack else None
            if seen is not None:
                # Redelivered (after a resume, an ack timeout, or from the inbox after a reconnect): never handed
                # to the application twice. Acked again only once the application has taken it (the first ack
                # may be lost); until then the ack that taking it sends uses this latest seq.
                self.duplicates += 1
                self.last_seq = max(self.last_seq, message.seq)
                if seen.stage == "taken":
                    self._ack_now(message.seq)
                else:
                    seen.seq, seen.generation = message.seq, self._session_generation
                return
            if not message.ack and message.seq <= self.last_seq:
                self.duplicates += 1
                return
            self.last_seq = max(self.last_seq, message.seq)
            if message.ack:
                self._seen_messages[key] = _SeenMessage(message.seq, self._session_generation)
                if len(self._seen_messages) > SEEN_MESSAGES:
                    del self._seen_messages[next(iter(self._seen_messages))]
            if self.on_message is not None:
                asyncio.get_running_loop().create_task(self._dispatch(message))
            else:
                self._inbox.put_nowait(message)
        elif op == "receipt":
            waiter = self._waiters.get(envelope.get("id"))  # type: ignore[arg-type]
            if waiter is not None and not waiter.future.done():
                waiter.add(envelope)
            elif envelope.get("status") != "routed":
                self.receipts.put_nowait(Receipt.from_envelope(envelope))
        elif op == "welcome":
            # Taken here, not when connect() resumes: envelopes that follow in the same read need them.
            self.device_id = envelope.get("device")
            if isinstance(envelope.get("server_time"), int | float):
                self._clock_offset_ms = envelope["server_time"] - time.time() * 1000
            if self._welcomed is not None and not self._welcomed.done():
                self._welcomed.set_result(envelope)
        elif op == "result":
            call = self._calls.get(envelope.get("id"))  # type: ignore[arg-type]
            if call is not None and not call.done():
                error = envelope.get("error")
                if isinstance(error, dict):
                    call.set_exception(ClientError(str(error.get("code")), str(error.get("message", ""))))
                else:
                    call.set_result(envelope.get("result"))
        elif op == "call":
            self._on_call(envelope)
        elif op == "pong":
            future = self._pings.get(envelope.get("id"))  # type: ignore[arg-type]
            if future is not None and not future.done():
                future.set_result(envelope["server_time"])
        elif isinstance(op, str) and op.startswith("handoff."):
            self._on_handoff(envelope)
        elif op == "state.changed" or (op == "state" and envelope.get("id") not in self._requests):
            self._on_state(envelope)
        elif op in REPLY_OPS and envelope.get("id") in self._requests:
            request = self._requests[envelope["id"]]
            if not request.done():
                request.set_result(envelope)
        elif op == "paired":
            self.credential = envelope["credential"]
            self.paired = envelope
        elif op in EVENT_OPS or op == "pair.pending":
            self.events.put_nowait(envelope)
        elif op == "error":
            error = _error_from(envelope)
            msg_id = envelope.get("id")
            waiter = self._waiters.get(msg_id)  # type: ignore[arg-type]
            failed_request = self._requests.get(msg_id)  # type: ignore[arg-type]
            failed_call = self._calls.get(msg_id)  # type: ignore[arg-type]
            if waiter is not None and not waiter.future.done():
                waiter.future.set_exception(error)
            elif failed_request is not None and not failed_request.done():
                failed_request.set_exception(error)
            elif failed_call is not None and not failed_call.done():
                failed_call.set_exception(error)
            elif msg_id == "pair" and self._welcomed is not None and not self._welcomed.done():
                self._welcomed.set_exception(error)
            else:
                self.errors.put_nowait(error)
        else:
            log.debug("ignoring unknown op %r", op)

    async def _dispatch(self, message: Message) -> None:
        assert self.on_message is not None
        key = (message.sender, message.id)
        seen = self._seen_messages.get(key) if message.ack else None
        if seen is not None:
            seen.stage = "handling"
        try:
            result = self.on_message(message)
            if result is not None:
                await result
        except Exception:
            log.exception("on_message callback failed for message %r", message.id)
            if seen is not None and self._seen_messages.get(key) is seen:
                del self._seen_messages[key]  # not taken: the server's next write of it gets another try
            return
        self._taken(message)

    def _on_disconnected(self, listener: _Listener) -> None:
        if self._welcomed is not None and not self._welcomed.done():
            self._welcomed.set_exception(ConnectionClosed(listener.close_code, listener.close_reason or "refused"))
        for call in self._calls.values():  # the server forgets the calls of a connection that ended
            if not call.done():
                call.set_exception(ClientError("disconnected", "the connection ended before the result arrived"))


async def pair(url: str, code: str, device: Mapping[str, Any], **options: Any) -> Client:
    """Join a user as a new device with a pairing code; returns the connected client.

    ``client.credential`` (and ``client.paired``) hold the new device's credential: store it, it is
    shown once. Raises ClientError: ``invalid_code``, ``rate_limited``, ``forbidden`` (denied).
    Waits as long as the issuing device takes to approve, if approval is needed.
    """
    client = Client(url, None, device, pairing_code=code, **options)
    await client.connect()
    return client
