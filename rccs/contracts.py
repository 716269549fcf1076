"""What the layers promise each other, as ``typing.Protocol`` classes and nothing else.

A module depends on these shapes, not on the module that implements them, so every import points down
(docs/architecture.md): a feature handler sees a ``Conn`` and never imports ``session.py``; the router,
the broker and the delivery machinery see ``LiveSession``; the compiled listener touches exactly the
fields of ``FastPathSession`` and ``FastPathHub``; the broker calls a ``BrokerNode``.
"""

from __future__ import annotations

from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    from collections import Counter

    from ._fastpath.routing import RouteStats, RoutingTable
    from .config import Settings
    from .errors import ErrorCode
    from .events import EventBus
    from .store import DeviceRecord, SessionRecord, Store
    from .store.base import QueuedMessage

# A message awaiting the receiver's ack: (sender user, sender device, the sender's message id,
# the frame as written, True if that frame is JSON text) -- the frame is kept for redelivery.
PendingAck = tuple[str, str, str | int, bytes, bool]

Handler = Callable[["Conn", dict[str, Any]], None]
"""An op's handler: takes the connection and the decoded envelope; answers through ``conn`` or raises
ProtocolError (the session answers that with an ``error`` carrying the request's id)."""


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


class Sender(Protocol):
    """Whoever sends a message: a device's connection, or the admin API's backend sender."""

    user: str | None
    device: str | None
    encoding: str

    def send_control(self, envelope: dict[str, Any]) -> None: ...

    def send_error(self, code: ErrorCode, message: str, msg_id: Any = None, **extra: Any) -> None: ...


class Conn(Sender, Protocol):
    """What a feature's handler sees of a connection. Event loop thread only."""

    id: str
    connected_at: int
    expires_at: int

    @property
    def peer(self) -> str: ...

    @property
    def closed(self) -> bool: ...

    def state_is_open(self) -> bool: ...

    def send_frame(self, data: bytes, text: bool) -> None:
        """Write a frame already encoded in this connection's encoding (nothing once it is not open)."""

    def reply(self, header: dict[str, Any], envelope: dict[str, Any]) -> None: ...

    def run_request(self, header: dict[str, Any], work: Callable[[], Coroutine[Any, Any, None]]) -> None:
        """Run ``work`` in the background; its ProtocolError (with fields) or failure answers ``header``."""

    def close(self, code: int, reason: str) -> None: ...

    def frame_body(self) -> tuple[bool, bytes | None]:
        """The envelope being handled: (is it JSON text, its raw msgpack ``body`` bytes or None). Valid only
        while its handler runs (the payload is not kept)."""

    def extend(self, expires_at: int) -> None:
        """A refresh proved the device again: the session now ends at ``expires_at``."""

    # Only before hello (pairing): the connection's state changes happen in session.py.
    def await_approval(self) -> None: ...

    def back_to_hello(self) -> None: ...

    def open(self, device: DeviceRecord, auth_expires_at: int, resume: tuple[str, int] | None,
             welcome_extra: dict[str, Any] | None = None) -> None: ...

    def snapshot(self, with_pending: bool) -> SessionRecord: ...


class FastPathSession(Protocol):
    """The fields and methods of a session that the listener (compiled or pure) touches on its direct path."""

    sink: Any
    user: str | None
    device: str | None
    encoding: str
    next_seq: int
    pending: dict[int, PendingAck]
    inbox_ids: dict[int, int] | None
    work: dict[int, Any] | None
    held: Any  # not None while envelopes wait behind a running request: the direct path stays off

    @property
    def closed(self) -> bool: ...

    def on_frame(self, payload: bytes, is_text: bool) -> None: ...

    def on_envelope(self, header: dict[str, Any], payload: bytes, body_start: int, body_end: int,
                    is_text: bool) -> None: ...

    def on_rate_limited(self, payload: bytes, is_text: bool, retry_after: float) -> None: ...

    def on_peer_close(self, code: int) -> None: ...

    def on_hello_timeout(self) -> None: ...

    def on_closed(self) -> None: ...

    def on_repeated_send(self, msg_id: str | int, repeated: str) -> None: ...

    def send_control(self, envelope: dict[str, Any]) -> None: ...

    def send_error(self, code: ErrorCode, message: str, msg_id: Any = None, **extra: Any) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


class Outgoing(Protocol):
    """One message being written: its frame prefixes per encoding (``seq`` is appended per receiver)."""

    msg_id: str | int
    sender: str
    ack: bool

    def msgpack_frame_prefix(self) -> bytes: ...

    def json_frame_prefix(self) -> bytes: ...


class LiveSession(Conn, FastPathSession, Protocol):
    """A session as the router, the hub and the delivery machinery see it."""

    inbox_loaded: bool
    inbox_more: bool
    retry: dict[int, list[int]] | None
    revoked: bool
    expired: bool
    ended: bool  # replaced by a new session of the same device
    moved: bool  # resumed on a newer connection, which now owns the session

    def deliver(self, outgoing: Outgoing, sender_user: str) -> None: ...

    def deliver_msgpack(self, prefix: bytes, ack: bool, sender_user: str, sender_device: str,
                        msg_id: str | int) -> None: ...

    def track(self, seq: int, item: Any) -> None: ...

    def withdraw(self, seq: int, msg_id: str | int, sender: str) -> PendingAck | None: ...

    def send_shared(self, envelope: dict[str, Any], frames: dict[str, tuple[bytes, bool]]) -> None: ...

    def counters_changed(self) -> bool: ...


class Core(Protocol):
    """The node's shared services, as the layers below the hub use them."""

    settings: Settings
    store: Store
    bus: EventBus
    events: Counter[str]

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> Any: ...

    def now(self) -> int: ...


class FastPathHub(Protocol):
    """What the listener (compiled or pure) touches of the hub."""

    settings: Settings
    accepting: bool
    closes_sent: Counter[int]
    rate_buckets: dict[str, tuple[float, int]]
    rate_refused: int
    routing: RoutingTable
    stats: RouteStats
    deliveries: Any  # .first_time(sender_device, msg_id, body, now) -> None | "duplicate" | "conflict"
    live_acks: bool  # False on several nodes: every ack:true message goes through the shared inbox

    def is_full(self) -> bool: ...

    def send_receipt(self, user: str, device: str, receipt: dict[str, Any]) -> None: ...


class BrokerNode(Protocol):
    """One node as its broker sees it: where what crosses connections is applied locally."""

    def deliver_to_device(self, user: str, device: str, envelope: dict[str, Any]) -> bool:
        """Write ``envelope`` to ``device``'s connection on this node; False if it has none here."""

    def deliver_to_user(self, user: str, envelope: dict[str, Any], exclude: str | None) -> int:
        """Write ``envelope`` to every connection of ``user`` on this node but ``exclude``'s; how many."""

    def device_revoked(self, device: str, at: int) -> None: ...

    def session_revoked(self, session_id: str, at: int) -> None: ...

    def deliver_event(self, channel: str, payload: Any) -> None:
        """A feature's event (a state change, a task notice) published on ``channel``."""

    def undeliverable(self, user: str, device: str, envelope: dict[str, Any]) -> None:
        """``envelope`` was sent here for ``device``, which has left: keep what must not be lost (receipts)."""

    def deliver_message(self, user: str, device: str, message: dict[str, Any]) -> bool:
        """A live message another node sent for ``device``: written with its next ``seq`` if it is here."""

    def device_gone(self, user: str, device: str) -> None:
        """The node that held ``device`` stopped beating: it is offline unless it is connected here."""

    def device_moved(self, user: str, device: str) -> None:
        """``device`` connected to another node: a connection of it held here is the older one."""

    def resubscribed(self) -> None:
        """The broker's subscription was broken and is back: what it may have missed meanwhile (doorbells of
        inbox messages and kept receipts) is looked up in the store for every device connected here."""


class Deliverer(Protocol):
    """What the inbox machinery needs to write a stored message to a live session."""

    def deliver_queued(self, session: LiveSession, message: QueuedMessage) -> int | None: ...
