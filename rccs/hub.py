"""The sessions of this node: live ones, dropped ones that may still be resumed, their expiry,
revocation, and writing them down.

Theory of operation. Sessions reach the hub through ``register``/``unregister`` (the routing table
itself belongs to the router); the hub keeps them by id, keeps dropped ones resumable for
``session_grace`` seconds, closes expired ones, and turns revocations (its own, or another process's
through the store's change feed, or another node's through the broker) into closed sockets.

Persistence is write-behind: the hub changes memory at once and hands the store copies in the
background. Structural session changes and presence are flushed every second, session counters every
five, everything at ``stop``. Other processes (the CLI) write to the store; ``_watch_changes`` polls the
store's change feed and brings their revocations, renames and removals in.

The hub is also this node's ``BrokerNode``: what the broker brings for local connections is written
here (through the router), and features register for their own broker channels (``on_event``).
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine
from typing import TYPE_CHECKING, Any

from . import __version__
from ._fastpath import IMPLEMENTATION, RouteStats, RoutingTable
from .auth import TokenAuthority
from .broker import Broker
from .clock import now_ms
from .config import Settings
from .errors import CloseCode, ReceiptReason
from .events import EventBus, Webhooks
from .inbox import RING_BOTH, RING_RECEIPTS, Deliveries, queued_from_frame
from .registry import Registry
from .router import DEVICE_CHANGED, STATUS_REVOKED, Router
from .store import (
    CHANGE_DEVICE,
    CHANGE_SESSION,
    CHANGE_USER,
    STATUS_OFFLINE,
    STATUS_ONLINE,
    PendingMessage,
    SessionRecord,
    Store,
)

if TYPE_CHECKING:
    from .contracts import Handler, LiveSession

__all__ = ["Hub", "now_ms"]

log = logging.getLogger("rccs.hub")

FLUSH_INTERVAL = 1.0
SESSION_MOVED = "session.moved"  # broker channel: a node adopted a session another node held ([id, node])
COUNTER_FLUSH_EVERY = 5  # flush intervals between writes of session counters
CHANGE_POLL_INTERVAL = 0.25  # revocations made by the CLI reach live connections within this (plus a flush)
FLUSH_SLICE = 500  # sessions snapshotted per event-loop turn when flushing
MAX_CHANGE_RETRIES = 40  # polls (10 s) before a change that keeps failing is skipped
RECEIPT_SWEEP_EVERY = 2  # flush intervals between looks for kept receipts of devices held here (several nodes)
CLEANUP_EVERY = 60  # flush intervals between deletions of stale sessions and pairing codes


class Hub:
    """Connections and sessions of one node. Runs on the event loop thread only."""

    def __init__(self, settings: Settings, tokens: TokenAuthority, store: Store, broker: Broker):
        self.settings = settings
        self.tokens = tokens
        self.store = store
        self.broker = broker
        # On several nodes a node may die holding what it routed: every ack:true message is kept in the
        # shared inbox first (the listener's direct path leaves those sends to messaging then).
        self.live_acks = not broker.spans_nodes
        self.node_id = settings.node_id  # node.py names an unnamed node before the first scrape
        self.bus = EventBus()
        self.events: Counter[str] = Counter()  # sessions opened/resumed, pairings, revocations, ...
        self.router = Router(self, broker)
        self.sessions: set[LiveSession] = set()  # every connection, before and after hello
        self.live: dict[str, LiveSession] = {}  # session id -> its open connection
        self.detached: dict[str, SessionRecord] = {}  # dropped sessions that may still be resumed
        self.deliveries = Deliveries(self, self.router, self.live)
        self.webhooks: Webhooks | None = None
        if settings.webhook_url:
            kinds = {k.strip() for k in settings.webhook_events.split(",") if k.strip()} or None
            self.webhooks = Webhooks(settings.webhook_url, settings.webhook_secret, kinds)
            self.bus.subscribe(self.webhooks)
        # What node.py wires in: the merged ops tables of the features, the hello check, and the hooks
        # features register for a session's open and close, a removed user, start, and broker events.
        self.ops: dict[str, Handler] = {}  # op name -> handler, for open sessions
        self.hello_ops: dict[str, Handler] = {}  # ops allowed in place of a hello (pair.redeem)
        self.login: Any = None  # a login.Login: the credential and token check of hello and refresh
        self.on_open: list[Callable[[LiveSession], None]] = []
        self.on_close: list[Callable[[LiveSession], None]] = []
        self.on_abandon: list[Callable[[LiveSession], None]] = []  # closed before hello completed
        self.on_user_removed: list[Callable[[str], None]] = []
        # (user, device): a device held by a node that died (several nodes; said by one surviving node)
        self.on_device_gone: list[Callable[[str, str], None]] = []
        self.on_start: list[Callable[[], Awaitable[None]]] = []
        self.on_event: dict[str, Callable[[Any], None]] = {}  # broker channel -> its feature's handler
        # Messaging's writer of a live message from another node (set by node.py; messaging sits below).
        self.deliver_remote_message: Callable[[str, str, dict[str, Any]], bool] | None = None
        self.errors_sent: Counter[str] = Counter()
        self.closes_sent: Counter[int] = Counter()
        self.rate_refused = 0  # messages refused over a device's send rate (answered or not)
        # Send-rate buckets of disconnected devices: (tokens, monotonic ns); a reconnect does not refill them.
        self.rate_buckets: dict[str, tuple[float, int]] = {}
        # Messages in/out and bytes in/out of connections that have closed (metrics add the open ones).
        self.closed_traffic = [0, 0, 0, 0]
        self.started_at = time.time()
        self.accepting = True
        self._idle = asyncio.Event()
        self._idle.set()
        self._dirty_sessions: set[str] = set()
        self._expiries: list[tuple[int, str]] = []
        self._change_cursor = 0
        self._change_failures = 0
        self._tasks: set[asyncio.Task[Any]] = set()
        self._loops: list[asyncio.Task[None]] = []
        self._flush_lock = asyncio.Lock()
        self._changes_applied = asyncio.Condition()
        broker.attach(self)

    # The router's tables, read by the listener, metrics and tests through the hub.

    @property
    def registry(self) -> Registry:
        return self.router.registry

    @property
    def routing(self) -> RoutingTable:
        return self.router.routing

    @property
    def stats(self) -> RouteStats:
        return self.router.stats

    @property
    def receipts_undeliverable(self) -> int:
        """Receipts that found no connection of their sender at once (kept in the store for it)."""
        return self.deliveries.stats["receipts_kept"]

    # ---- lifecycle ---------------------------------------------------

    async def start(self) -> None:
        store = self.store
        now = now_ms()
        if not self.broker.spans_nodes:
            # After a crash nothing is connected any more. A cluster's store is also the other nodes'
            # state: devices connected there stay as they are (a dead node's go offline by its heartbeat).
            await store.reset_live_state(now)
        self._change_cursor = await store.last_change()
        await self.registry.load(store)
        for _user, device in self.broker.held_elsewhere():
            self.router.presence[device] = STATUS_ONLINE  # the devices op of a node just started knows them
        grace_ms = int(self.settings.session_grace * 1000)
        # A cluster's stored sessions may be held by other nodes: they are adopted when a device resumes one.
        for record in [] if self.broker.spans_nodes else await store.list_sessions():
            resumable = (record.revoked_at is None and record.expires_at > now
                         and record.disconnected_at is not None and record.disconnected_at + grace_ms >= now)
            if resumable:
                self.detached[record.id] = record
        await self.deliveries.load_message_ids()
        for starting in self.on_start:
            await starting()
        if self.webhooks is not None:
            self.webhooks.start()
        self._loops = [asyncio.create_task(self._maintain()), asyncio.create_task(self._watch_changes())]

    async def stop(self) -> None:
        """After every connection is closed: write everything down, stop the background work."""
        for task in self._loops:
            task.cancel()
        for task in self._loops:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.deliveries.flush()
        await self.deliveries.save_message_ids()
        await self.flush(all_sessions=True)
        if self.webhooks is not None:
            await self.webhooks.stop()
        self.broker.detach(self)

    async def settle(self) -> None:
        """Wait for the background writes started so far, then flush (tests and shutdown use this)."""
        while True:
            await self.deliveries.flush()
            if not self._tasks:
                break
            await asyncio.gather(*list(self._tasks), return_exceptions=True)
        await self.flush()

    async def catch_up(self) -> None:
        """Return once every change in the store's feed so far has been applied (e.g. after a CLI command)."""
        target = await self.store.last_change()
        async with self._changes_applied:
            await self._changes_applied.wait_for(lambda: self._change_cursor >= target)

    def spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[Any]:
        """Run background work; ``stop`` waits for it and failures are logged, never lost."""
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._task_done)
        return task

    def _task_done(self, task: asyncio.Task[Any]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())

    # ---- connections -------------------------------------------------

    @property
    def connection_count(self) -> int:
        return len(self.sessions)

    def is_full(self) -> bool:
        return len(self.sessions) >= self.settings.max_connections

    def attach(self, session: LiveSession) -> None:
        self.sessions.add(session)
        self._idle.clear()

    def detach(self, session: LiveSession) -> None:
        self.sessions.discard(session)
        if not self.sessions:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Return once no connection is open (used by shutdown and tests)."""
        await self._idle.wait()

    def register(self, session: LiveSession) -> LiveSession | None:
        """Make ``session`` the online connection of its device; returns the one it replaces."""
        previous = self.router.add(session)
        self.live[session.id] = session
        self.dirty(session.id)
        assert session.user is not None and session.device is not None
        self.broker.device_online(session.user, session.device)
        return previous

    def unregister(self, session: LiveSession) -> None:
        self.router.remove(session)
        if self.live.get(session.id) is session:
            del self.live[session.id]
        if session.user is not None and session.device is not None \
                and self.router.online(session.user, session.device) is None:
            self.broker.device_offline(session.user, session.device)

    def online(self, user: str, device: str) -> LiveSession | None:
        return self.router.online(user, device)

    def now(self) -> int:
        return now_ms()

    def send_receipt(self, user: str, device: str, receipt: dict[str, Any]) -> None:
        """Give a receipt to the sender device now, or keep it until the device connects."""
        self.deliveries.send_receipt(user, device, receipt)

    def requeue(self, record: SessionRecord, reason: ReceiptReason | None) -> None:
        """A session ends with unacked messages: they go to the device's inbox (or fail with ``reason``)."""
        expires_at = self.deliveries.kept_expiry()
        for pending in record.pending:
            message = None if reason is not None else queued_from_frame(
                pending.frame, pending.text, record.device, record.user, expires_at)
            if message is None:
                self.send_receipt(pending.sender_user, pending.sender_device, {
                    "op": "receipt", "id": pending.msg_id, "status": "failed", "device": record.device,
                    "reason": (reason or ReceiptReason.UNCONVERTIBLE).value})
            else:
                self.deliveries.enqueue(message, "queued")

    def fail_pending(self, device: str | None, pending: list[PendingMessage] | dict[int, Any],
                     reason: ReceiptReason) -> None:
        """Tell the senders of never-acked messages that ``device`` will not ack them."""
        entries = pending.values() if isinstance(pending, dict) else [
            (p.sender_user, p.sender_device, p.msg_id) for p in pending
        ]
        for entry in entries:
            self.send_receipt(entry[0], entry[1], {
                "op": "receipt", "id": entry[2], "status": "failed", "reason": reason.value, "device": device,
            })

    def close_all(self, code: int, reason: str) -> None:
        for session in list(self.sessions):
            session.close(code, reason)

    def server_info(self) -> dict[str, Any]:
        return {"version": __version__, "implementation": IMPLEMENTATION, "node": self.node_id}

    # ---- sessions ----------------------------------------------------

    async def list_sessions(self, user: str | None = None, device: str | None = None) -> list[SessionRecord]:
        """Every session of ``user``/``device`` (None: any) as it is now: stored, resumable or live,
        ordered by user, device, creation."""

        def wanted(record: SessionRecord) -> bool:
            return (user is None or record.user == user) and (device is None or record.device == device)

        records = {record.id: record for record in await self.store.list_sessions(user_id=user, device_id=device)}
        for session_id, detached in self.detached.items():
            if wanted(detached):
                records[session_id] = detached
        for live in list(self.live.values()):
            if live.user is not None and live.device is not None:
                snapshot = live.snapshot(with_pending=True)
                if wanted(snapshot):
                    records[live.id] = snapshot
        return sorted(records.values(), key=lambda r: (r.user, r.device, r.created, r.id))


    def dirty(self, session_id: str) -> None:
        self._dirty_sessions.add(session_id)

    def watch_expiry(self, session: LiveSession) -> None:
        heapq.heappush(self._expiries, (session.expires_at, session.id))
        if len(self._expiries) > 2 * len(self.live) + 1024:  # closed sessions and refreshes leave entries
            self._expiries = [(live.expires_at, live.id) for live in self.live.values()]
            heapq.heapify(self._expiries)

    def keep_resumable(self, record: SessionRecord) -> None:
        self.detached[record.id] = record
        self.dirty(record.id)

    def adopt_resumable(self, record: SessionRecord, now: int) -> None:
        """Several nodes: a device resumes here a session it held on another node (``record``, from the
        store). It becomes resumable here; the node that held it lets it go, moving the messages it still
        had in memory for it to the inbox (they reach the device from there)."""
        grace_ms = int(self.settings.session_grace * 1000)
        if record.revoked_at is not None or (record.disconnected_at is not None
                                             and record.disconnected_at + grace_ms < now):
            return  # ended: the resume answers unknown_session
        record.pending = []
        self.detached[record.id] = record
        self.broker.publish(SESSION_MOVED, [record.id, self.node_id])

    def _session_moved(self, moved: list[str]) -> None:
        session_id, node = moved
        if node != self.node_id and session_id in self.detached:
            self.end_detached(session_id, None)

    def take_resumable(self, session_id: str, device: str, now: int) -> SessionRecord | str:
        """The dropped session ``session_id`` of ``device``, removed from the resumable ones; or why not."""
        record = self.detached.get(session_id)
        if record is None:
            return "unknown_session"
        if record.device != device:
            return "unknown_session"  # another device's session id is not confirmed to exist
        del self.detached[session_id]
        if record.expires_at <= now:
            self.requeue(record, None)
            record.pending = []
            self.dirty(record.id)
            return "expired"
        return record

    def end_detached(self, session_id: str, reason: ReceiptReason | None) -> None:
        """A resumable session ends: its unacked messages go to the inbox (or fail with ``reason``)."""
        record = self.detached.pop(session_id, None)
        if record is not None:
            self.requeue(record, reason)
            record.pending = []
            self._write_records([record])

    def revoke_session(self, session_id: str, now: int) -> None:
        """Close a live session or forget a resumable one, on whichever node; the store is told too."""
        self.broker.revoke_session(session_id, now)
        self.events["session_revoked"] += 1
        self.spawn(self.store.revoke_session(session_id, now))

    def revoke_device(self, device_id: str, now: int, write: bool = True) -> bool:
        """Revoke a device: its credential stops working at once, its connection closes with 4410 (on
        whichever node), its resumable sessions are dropped. False if unknown or already revoked."""
        record = self.registry.get(device_id)
        if record is None or record.revoked_at is not None:
            return False
        self.broker.revoke_device(device_id, now)
        if write:
            self.spawn(self.store.revoke_device(device_id, now))
        return True

    # ---- the broker's deliveries to this node (BrokerNode) ------------------

    def deliver_to_device(self, user: str, device: str, envelope: dict[str, Any]) -> bool:
        return self.router.write_to_device(user, device, envelope)

    def deliver_to_user(self, user: str, envelope: dict[str, Any], exclude: str | None) -> int:
        return self.router.write_to_user(user, envelope, exclude)

    def session_revoked(self, session_id: str, at: int) -> None:
        live = self.live.get(session_id)
        if live is not None:
            live.revoked = True
            live.close(CloseCode.REVOKED, "session revoked")
        self.end_detached(session_id, None)

    def device_revoked(self, device_id: str, at: int) -> None:
        record = self.registry.get(device_id)
        if record is None or record.revoked_at is not None:
            return
        record.revoked_at = at
        record.credential_hash = None
        self.registry.put(record)
        # Announced before the close, so the user's devices hear "revoked" and not a plain "offline".
        self.router.set_presence(record.user, device_id, STATUS_REVOKED, at)
        live = self.router.online(record.user, device_id)
        if live is not None:
            live.revoked = True
            live.close(CloseCode.REVOKED, "device revoked")
        for session_id in [sid for sid, rec in self.detached.items() if rec.device == device_id]:
            self.end_detached(session_id, ReceiptReason.REVOKED)
        self.spawn(self.deliveries.fail_inbox(device_id, ReceiptReason.REVOKED))
        self.events["device_revoked"] += 1
        self.bus.emit("device.revoked", user=record.user, device=device_id)
        log.info("device %s of user %s revoked", device_id, record.user,
                 extra={"user": record.user, "device": device_id})

    def deliver_event(self, channel: str, payload: Any) -> None:
        if channel == DEVICE_CHANGED:
            self.spawn(self._reload_device(payload))
            return
        if channel == SESSION_MOVED:
            self._session_moved(payload)
            return
        handler = self.on_event.get(channel)
        if handler is not None:
            handler(payload)

    def resubscribed(self) -> None:
        for session in list(self.live.values()):
            if session.user is not None and session.device is not None:
                self.deliveries.ring([session.user, session.device, RING_BOTH])

    def undeliverable(self, user: str, device: str, envelope: dict[str, Any]) -> None:
        if envelope.get("op") == "receipt":
            self.deliveries.keep_receipt(user, device, envelope)
        else:
            self.events["broker_undeliverable"] += 1  # a notice for a connection that is gone

    def deliver_message(self, user: str, device: str, message: dict[str, Any]) -> bool:
        return self.deliver_remote_message is not None and self.deliver_remote_message(user, device, message)

    def device_gone(self, user: str, device: str) -> None:
        if self.router.online(user, device) is None:
            self.router.set_presence(user, device, STATUS_OFFLINE, now_ms(), announce=True)
            for gone in self.on_device_gone:
                gone(user, device)

    def device_moved(self, user: str, device: str) -> None:
        older = self.router.online(user, device)
        if older is not None:
            older.ended = True
            older.close(CloseCode.REPLACED, "replaced by a newer connection of this device")

    # ---- background: flush, expiry, cleanup, change feed ---------------

    async def flush(self, all_sessions: bool = False) -> None:
        """Write dirty sessions and presence to the store (every live session's counters if asked)."""
        async with self._flush_lock:
            ids = set(self._dirty_sessions)
            self._dirty_sessions.clear()
            if all_sessions:
                ids.update(self.live)
                ids.update(self.detached)
            writes = self.router.presence_writes
            presence = [(device, status, seen) for device, (status, seen) in writes.items()]
            writes.clear()
            if presence:
                await self.store.update_presence(presence)
            # Snapshots are built on the loop: in slices, so 20,000 sessions never stall routing for long.
            ordered = list(ids)
            for start in range(0, len(ordered), FLUSH_SLICE):
                records = []
                for session_id in ordered[start:start + FLUSH_SLICE]:
                    live = self.live.get(session_id)
                    if live is not None:
                        records.append(live.snapshot(with_pending=False))
                    elif session_id in self.detached:
                        records.append(self.detached[session_id])
                if records:
                    await self.store.put_sessions(records)

    def _write_records(self, records: list[SessionRecord]) -> None:
        self.spawn(self.store.put_sessions(records))

    async def _maintain(self) -> None:
        ticks = 0
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            ticks += 1
            try:
                now = now_ms()
                self.expire_sessions(now)
                self._expire_detached(now)
                self.deliveries.retry_due(now)
                await self.deliveries.expire(now)
                if ticks % COUNTER_FLUSH_EVERY == 0:
                    for session in self.live.values():
                        if session.counters_changed():
                            self._dirty_sessions.add(session.id)
                await self.flush()
                if ticks % RECEIPT_SWEEP_EVERY == 0 and self.broker.spans_nodes:
                    await self._look_for_kept_receipts()
                if ticks % CLEANUP_EVERY == 0:
                    await self.store.delete_stale_sessions(now, int(self.settings.session_grace * 1000))
                    await self.store.delete_pairing_codes_before(now)
                    self.deliveries.sweep_ids(now)
            except Exception:
                log.exception("session maintenance failed; retrying next interval")

    async def _look_for_kept_receipts(self) -> None:
        """Several nodes: a receipt kept in Redis for a device held here is written to it even when its
        doorbell was lost (Redis is the truth; a doorbell only saves the wait for this sweep)."""
        for device in await self.store.devices_with_kept_receipts():
            record = self.router.registry.get(device)
            if record is not None and self.router.online(record.user, device) is not None:
                self.deliveries.ring([record.user, device, RING_RECEIPTS])

    def expire_sessions(self, now: int) -> None:
        expiries = self._expiries
        while expiries and expiries[0][0] <= now:
            _, session_id = heapq.heappop(expiries)
            live = self.live.get(session_id)
            if live is not None and live.expires_at <= now:
                live.expired = True
                live.close(CloseCode.SESSION_EXPIRED, "session expired: refresh before expires_at or hello again")
                self.events["session_expired"] += 1
                self.bus.emit("session.expired", user=live.user, device=live.device, session=live.id)

    def _expire_detached(self, now: int) -> None:
        grace_ms = int(self.settings.session_grace * 1000)
        stale = [sid for sid, rec in self.detached.items()
                 if (rec.disconnected_at or 0) + grace_ms < now or rec.expires_at <= now]
        for session_id in stale:
            self.end_detached(session_id, None)

    async def _watch_changes(self) -> None:
        while True:
            await asyncio.sleep(CHANGE_POLL_INTERVAL)
            try:
                changes = await self.store.changes_since(self._change_cursor)
                for change in changes:
                    try:
                        if change.kind == CHANGE_DEVICE:
                            await self._reload_device(change.key)
                        elif change.kind == CHANGE_SESSION:
                            await self._reload_session(change.key)
                        elif change.kind == CHANGE_USER:
                            await self._reload_user(change.key)
                    except Exception:
                        # Not skipped: a revocation must not be lost to a transient store error. Retried
                        # from this change at the next poll (a change that fails for good is skipped after
                        # MAX_CHANGE_RETRIES polls, loudly).
                        self._change_failures += 1
                        if self._change_failures < MAX_CHANGE_RETRIES:
                            log.exception("applying %s change %r failed; retrying", change.kind, change.key)
                            break
                        log.error("giving up on %s change %r after %d tries", change.kind, change.key,
                                  self._change_failures)
                    self._change_failures = 0
                    self._change_cursor = change.seq
                async with self._changes_applied:
                    self._changes_applied.notify_all()
            except Exception:
                log.exception("reading the store's change feed failed; retrying")

    async def _reload_device(self, device_id: str) -> None:
        stored = await self.store.get_device(device_id)
        if stored is None:
            return
        if stored.revoked_at is not None:
            self.revoke_device(device_id, stored.revoked_at, write=False)
            return
        current = self.registry.get(device_id)
        if current is not None and current.revoked_at is not None:
            return  # a read older than our own revocation: revocation is for good
        if current is not None:
            stored.status = current.status
            stored.last_seen = max(stored.last_seen, current.last_seen)
        self.router.adopt(stored)

    async def _reload_session(self, session_id: str) -> None:
        stored = await self.store.get_session(session_id)
        # Only revocations append session changes; a row already deleted by cleanup was revoked too.
        if stored is None or stored.revoked_at is not None:
            revoked_at = stored.revoked_at if stored is not None else None
            self.session_revoked(session_id, revoked_at if revoked_at is not None else now_ms())

    async def _reload_user(self, user_id: str) -> None:
        if await self.store.get_user(user_id) is None:
            self.registry.users.discard(user_id)
            for device in self.registry.user_devices(user_id):
                self.revoke_device(device.id, now_ms(), write=False)
            for forget in self.on_user_removed:
                forget(user_id)
        else:
            self.registry.users.add(user_id)
