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
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
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
                       "state", "state.ok", "state.subscribed"})
EVENT_OPS = frozenset({"presence", "pair.request", "pair.joined", "pair.withdrawn", "retract"})
# How much longer than a call's timeout ``call()`` waits for the server's answer before giving up itself.
CALL_GRACE = 5.0
CallHandler = Callable[[Any], Any]  # params -> result, or an awaitable of it


@dataclass(frozen=True, slots=True)
class Message:
    seq: int
    id: str | int
    sender: str
    type: str
    body: Any
    ts: int
    ack: bool


@dataclass(frozen=True, slots=True)
class Receipt:
    id: str | int
    status: str
    device: str | None = None
    reason: str | None = None


class ClientError(Exception):
    """The server answered with an ``error`` envelope."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class StateConflict(ClientError):
    """``state_patch`` with ``if_rev`` found the document at another revision: ``rev`` and ``value`` are current."""

    def __init__(self, message: str, rev: int, value: Any):
        super().__init__("conflict", message)
        self.rev = rev
        self.value = value


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
            receipt = Receipt(envelope["id"], str(status), envelope.get("device"), envelope.get("reason"))
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
    """A device's connection to rccs. Create, then ``await connect()`` (or ``async with``)."""

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
        self._seen_messages: dict[tuple[str, str | int], None] = {}  # recent (sender, id) of ack:true messages
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
        self.closed: asyncio.Future[ConnectionClosed] = asyncio.get_running_loop().create_future()
        self._state_subs: list[StateSubscription] = []

    # ---- lifecycle ----------------------------------------------------

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
                                              *self._calls.values()]
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
        request_id = f"req-{self.new_id()}"
        future: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._requests[request_id] = future
        try:
            await self._send_when_connected({"op": op, "id": request_id, **fields})
            return await asyncio.wait_for(future, self.receipt_timeout)
        finally:
            self._requests.pop(request_id, None)

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
                          id: str | int | None = None) -> StatePatchResult:
        """Apply a JSON merge patch (RFC 7396: null deletes a member, arrays are replaced whole; ``None`` as
        the whole patch deletes the document). If the connection drops before the answer, the patch is sent
        again with the same ``id`` after the reconnect: the server applies it once. Raises StateConflict
        (``if_rev`` is not the current revision), ClientError ``too_large``, ``forbidden``, ``bad_request``."""
        patch_id = f"patch-{self.new_id()}" if id is None else id
        envelope: dict[str, Any] = {"op": "state.patch", "id": patch_id, "doc": doc, "patch": patch}
        if if_rev is not None:
            envelope["if_rev"] = if_rev
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.receipt_timeout
        while True:
            future: asyncio.Future[dict[str, Any]] = loop.create_future()
            self._requests[patch_id] = future
            try:
                await self._send_when_connected(envelope)
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
                    reply = future.result()
                    return StatePatchResult(doc, int(reply["rev"]), int(reply["prev_rev"]), bool(reply["noop"]))
                if not lost.done() or loop.time() >= deadline:
                    raise TimeoutError(f"no answer to state.patch {patch_id!r}")
            finally:
                self._requests.pop(patch_id, None)

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
        await self._auto_ack(item)
        return item

    async def messages(self) -> AsyncIterator[Message]:
        """Iterate incoming messages until the client is closed for good."""
        while True:
            try:
                yield await self.next_message()
            except ConnectionClosed:
                return

    async def _auto_ack(self, message: Message) -> None:
        if self.auto_ack and message.ack:
            with contextlib.suppress(ConnectionError):
                self._send({"op": "ack", "seq": message.seq})

    def _on_envelope(self, envelope: Any) -> None:
        if not isinstance(envelope, dict):
            log.warning("ignoring a non-map envelope from the server")
            return
        op = envelope.get("op")
        if op == "msg":
            message = Message(envelope["seq"], envelope["id"], envelope["from"], envelope["type"],
                              envelope.get("body"), envelope["ts"], bool(envelope.get("ack")))
            key = (message.sender, message.id)
            if message.seq <= self.last_seq or (message.ack and key in self._seen_messages):
                # Redelivered (after a resume, an ack timeout, or from the inbox after a reconnect) and already
                # seen: ack it again (the first ack may be lost), but do not hand it to the application twice.
                self.duplicates += 1
                if self.auto_ack and message.ack:
                    with contextlib.suppress(ConnectionError):
                        self._send({"op": "ack", "seq": message.seq})
                return
            self.last_seq = max(self.last_seq, message.seq)
            if message.ack:
                self._seen_messages[key] = None
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
                self.receipts.put_nowait(Receipt(envelope["id"], str(envelope.get("status")), envelope.get("device"),
                                                 envelope.get("reason")))
        elif op == "welcome":
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
            error = ClientError(str(envelope.get("code")), str(envelope.get("message")))
            if envelope.get("code") == "conflict" and "rev" in envelope:
                error = StateConflict(str(envelope.get("message")), int(envelope["rev"]), envelope.get("value"))
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
        try:
            result = self.on_message(message)
            if result is not None:
                await result
        except Exception:
            log.exception("on_message callback failed for message %r", message.id)
            return
        await self._auto_ack(message)

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
