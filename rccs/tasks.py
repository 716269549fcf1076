"""Task leases with fencing epochs, and the four-step handoff (docs/protocol.md section 15).

Theory of operation. A task is owned through a lease: an owner device, an ``epoch`` and an expiry. The
epoch is the fencing token: it grows by one with every new owner and never goes back (the lease record
stays in the store after a release, and a restart reloads it). Every op that acts for a task carries the
epoch its sender believes it holds; an older one is ``stale_epoch``, so a device that lost a task, while
it was disconnected or paused, cannot act on it any more.

All changes to one user's leases run one at a time under that user's lock (``_Book.lock``): read the
lease (loaded from the store on first use), decide, write the new lease to the store, and only then
change the copy in memory and answer. So the store always holds what a device has been told, and two
changes can never both see the same old lease. Fenced ``state.patch`` takes the same lock around its
store write, so a write at epoch E and a handoff to epoch E+1 are ordered.

A handoff is coordinated by the server and lives in memory only (a restart aborts it; the lease stays
where it was). Its steps run under the same per-user lock, so they are ordered with the parties' other
task ops (a fenced write sent before ``prepared`` is judged before it) and never overtake a commit:

    request -> PREPARE: the owner got handoff.prepare; its disconnect, refusal or timeout fails it.
            -> OFFER: the owner answered prepared (it has paused); the target got handoff.offer. The target's
               disconnect, rejection or timeout fails it; the owner's disconnect does not any more.
            -> COMMIT: the target accepted; the new lease (target, E+1) is being written. Nothing fails it but
               a store error.

While a handoff is open it holds the task: claims by others get ``handoff_busy`` even if the lease
expires meanwhile, the owner cannot release, and after ``prepared`` the owner's fenced writes are refused
(it promised to pause). The owner may renew. When a handoff fails, the old owner keeps its lease at the
same epoch. The new owner gets ``handoff.committed`` at once when connected and again after each of its
hellos until it has used the lease (claim, renew, release or a fenced write), so a notice lost with a
dropped connection is never lost for good.

Several nodes. The requester's node coordinates the handoff: its id ends in ``@<node id>``, its timers and
stages live there, and it writes the lease (with the store's compare-and-set, as every lease change on
several nodes). That the task is held is in the stored lease (``TaskLease.open_handoff``: id, stage, and
``until``, the stage's deadline plus a margin), written when the handoff opens and when it moves to the
offer, so every node's claims, releases, requests and fenced writes see it; ended, it is cleared. A party
connected to another node is reached through that node (``Broker.to_node`` on ``HANDOFFS``): the first
message (with ``prepare`` for the owner) has it watch the party's connection, whose end it reports back
(``gone``); a step the party sends there is forwarded to the coordinator, judged there under the user's
lock as on one node, and its error (if any) comes back as the answer to the party's request. A party's node
that dies is reported by the node that speaks for it (``device-gone``). If the coordinating node dies, its
handoffs end silently: the stored hold lapses at ``until`` and the owner keeps the lease at its epoch.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import secrets
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Any

import msgpack

from .clock import now_ms
from .errors import STORE_RETRY_AFTER, ErrorCode, ProtocolError
from .mergepatch import canonical_json, json_problem
from .protocol import MAX_ID_CHARS, check_message_id, parse_epoch, parse_selector, parse_task_name
from .store import OpenHandoff, StoreError, TaskLease, TaskRaced

if TYPE_CHECKING:
    from .contracts import Conn, Handler
    from .hub import Hub

log = logging.getLogger("rccs.tasks")

MAX_TASKS_PER_USER = 10_000  # lease records per user (released ones count: they keep the epoch)
MAX_LEASE_TTL = 3600.0  # seconds
RACE_ATTEMPTS = 5  # several nodes: a lease change decided again after another node's change won

PREPARE = "prepare"
OFFER = "offer"
COMMIT = "commit"
OWNER = "owner"  # the parties a step comes from
TARGET = "target"

HANDOFFS = "tasks.handoff"  # broker channel between nodes: parties watched, steps forwarded and answered
HOLD_MARGIN_MS = 2000  # a stored hold outlives its stage's deadline by this much: the coordinator's timer may be late
STEP_ANSWER_TIMEOUT = 5.0  # seconds a step forwarded to the coordinating node waits for its answer


@dataclass(eq=False)  # identity: kept in sets
class Handoff:
    id: str
    user: str
    task: str
    requester: str  # devices; messages go to whichever connection of the device is open when they are sent
    owner: str
    target: str
    epoch: int  # the owner's epoch; the target gets epoch + 1
    owner_session: Conn | None  # None: the party is connected to another node (its ``*_node``)
    target_session: Conn | None
    stage: str = PREPARE
    timer: asyncio.TimerHandle | None = None
    owner_node: str | None = None
    target_node: str | None = None

    def session_of(self, role: str) -> Conn | None:
        return self.owner_session if role == OWNER else self.target_session

    def node_of(self, role: str) -> str | None:
        return self.owner_node if role == OWNER else self.target_node

    def device_of(self, role: str) -> str:
        return self.owner if role == OWNER else self.target


@dataclass
class _Book:
    """One user's leases (None until loaded from the store) and open handoffs."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    leases: dict[str, TaskLease] | None = None
    handoffs: dict[str, Handoff] = field(default_factory=dict)  # task -> its open handoff


class Tasks:
    """The task books and open handoffs of one node, and the ``task.*``/``handoff.*`` ops."""

    def __init__(self, hub: Hub):
        self.hub = hub
        self.books: dict[str, _Book] = {}
        self.handoffs: dict[str, Handoff] = {}  # handoff id -> handoff
        self.by_session: dict[Conn, set[Handoff]] = {}  # owner and target connections of open handoffs
        # Users that may have a committed notice to send again; the others' hellos need not load their leases.
        self.notice_users: set[str] = set()
        # Several nodes: the connections here of parties of handoffs another node coordinates, by (handoff id,
        # role) and the other way round; those handoffs whose owner here answered prepared (its fenced writes
        # are refused from then on); the answers awaited for steps forwarded to a coordinating node.
        self.watches: dict[tuple[str, str], Conn] = {}
        self.watched: dict[Conn, set[tuple[str, str]]] = {}
        self.paused: set[str] = set()
        self.answers: dict[str, asyncio.Future[list[Any] | None]] = {}
        self._serial = itertools.count(1)
        # The ops are module functions that take the feature first.
        self.ops: dict[str, Handler] = {
            "task.claim": functools.partial(op_claim, self),
            "task.renew": functools.partial(op_renew, self),
            "task.release": functools.partial(op_release, self),
            "task.list": functools.partial(op_list, self),
            "handoff.request": functools.partial(op_handoff_request, self),
            "handoff.prepared": functools.partial(op_handoff_prepared, self),
            "handoff.refuse": functools.partial(op_handoff_refuse, self),
            "handoff.accept": functools.partial(op_handoff_accept, self),
            "handoff.reject": functools.partial(op_handoff_reject, self),
        }

    def fenced(self, session: Conn, task: str, epoch: int) -> contextlib.AbstractAsyncContextManager[None]:
        """For ``state.patch``: hold the user's task lock while a write at ``epoch`` happens."""
        return fenced(self, session, task, epoch)

    def on_open(self, session: Conn) -> None:
        on_welcome(self, session)

    def on_close(self, session: Conn) -> None:
        on_closed(self, session)

    def on_event(self, message: list[Any]) -> None:
        """What another node sends about handoffs (``HANDOFFS``)."""
        on_handoff_event(self, message)

    def on_device_gone(self, user: str, device: str) -> None:
        """The node holding ``device`` died (said by this node): every coordinator hears it."""
        self.hub.broker.publish(HANDOFFS, ["device-gone", user, device])

    async def on_start(self) -> None:
        """Which users have committed notices to send again after a hello."""
        self.notice_users.update(await self.hub.store.users_with_task_notices())

    def abort_all(self, reason: str) -> None:
        """Fail every open handoff (the server is shutting down; leases stay as they are)."""
        for handoff in list(self.handoffs.values()):
            if handoff.stage != COMMIT:
                _fail(self, handoff, reason, at_once=True)

    def forget_user(self, user: str) -> None:
        """The user was removed: its leases went with it from the store; drop the copy and fail its handoffs."""
        book = self.books.get(user)
        if book is not None:
            for handoff in list(book.handoffs.values()):
                _fail(self, handoff, "revoked")
            del self.books[user]

    async def list_tasks(self, user: str) -> list[dict[str, Any]]:
        """The user's tasks as ``task.list`` shows them (for the admin API)."""
        book = self.book(user)
        async with book.lock:
            return _listing(self, await _leases(self.hub, user, book), book, now_ms())

    def book(self, user: str) -> _Book:
        book = self.books.get(user)
        if book is None:
            book = self.books[user] = _Book()
        return book

    def new_handoff_id(self) -> str:
        # unique across restarts, so a step meant for an aborted handoff can never hit a new one; on several
        # nodes it names the coordinating node, where the other nodes forward its steps
        handoff_id = f"h{next(self._serial)}-{secrets.token_urlsafe(9)}"
        return f"{handoff_id}@{self.hub.node_id}" if self.hub.broker.spans_nodes else handoff_id

    def coordinator_elsewhere(self, handoff_id: str) -> str | None:
        """The node coordinating ``handoff_id`` if that is another node (several nodes only), else None."""
        if not self.hub.broker.spans_nodes:
            return None
        _, at, node = handoff_id.rpartition("@")
        return node if at and node and node != self.hub.node_id else None


# ---- parsing ----------------------------------------------------------------

_task_name = parse_task_name
_epoch = parse_epoch


def _ttl_ms(tasks: Tasks, header: dict[str, Any]) -> int:
    value = header.get("ttl")
    if value is None:
        return int(tasks.hub.settings.task_lease_ttl * 1000)
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'ttl' must be a positive number of seconds")
    if value > MAX_LEASE_TTL:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"'ttl' is longer than {MAX_LEASE_TTL:g} seconds")
    return max(1, int(value * 1000))


def _handoff_id(header: dict[str, Any]) -> str:
    value = header.get("handoff")
    if not isinstance(value, str) or not value or len(value) > MAX_ID_CHARS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'handoff' must be the handoff's id")
    return value


# ---- envelopes ----------------------------------------------------------------


def _lease_envelope(lease: TaskLease) -> dict[str, Any]:
    return {"op": "task.lease", "task": lease.task, "owner": lease.owner, "epoch": lease.epoch,
            "expires": lease.expires}


def _is_live(lease: TaskLease | None, now: int) -> bool:
    return lease is not None and lease.owner is not None and lease.expires > now


def _tell(hub: Hub, handoff: Handoff, devices: list[str], envelope: dict[str, Any]) -> None:
    for device in dict.fromkeys(devices):  # once per device, in order
        hub.router.send_to_device(handoff.user, device, envelope)


# ---- the serialised part ------------------------------------------------------


async def _leases(hub: Hub, user: str, book: _Book) -> dict[str, TaskLease]:
    """The user's leases; call with ``book.lock`` held. On several nodes they are read again every time:
    another node may have changed them (its lock is not this one)."""
    if book.leases is None or hub.broker.spans_nodes:
        book.leases = {lease.task: lease for lease in await hub.store.load_tasks(user)}
    return book.leases


async def _write(hub: Hub, book: _Book, lease: TaskLease) -> None:
    """Store ``lease``, then adopt it; call with ``book.lock`` held. On several nodes only if the stored lease
    is still the one read (TaskRaced otherwise: another node changed it meanwhile)."""
    assert book.leases is not None
    await hub.store.put_task(lease, if_unchanged=hub.broker.spans_nodes, previous=book.leases.get(lease.task))
    book.leases[lease.task] = lease


Work = Callable[[dict[str, TaskLease], _Book], Coroutine[Any, Any, None]]


async def _locked(tasks: Tasks, user: str, work: Work) -> None:
    """Run ``work`` under the user's lock on the user's leases as stored now."""
    hub = tasks.hub
    book = tasks.book(user)
    async with book.lock:
        for attempt in range(RACE_ATTEMPTS):
            try:
                await work(await _leases(hub, user, book), book)
                return
            except TaskRaced:
                # Another node changed the lease between this node's read and write: decide again on
                # what is stored now (the work writes before it answers or tells anyone anything).
                if attempt == RACE_ATTEMPTS - 1:
                    raise


def _serialised(tasks: Tasks, session: Conn, header: dict[str, Any], work: Work) -> None:
    """Run ``work`` under the user's lock, in the background; its ProtocolError answers the request."""
    user = session.user
    assert user is not None
    session.run_request(header, functools.partial(_locked, tasks, user, work))


def _holding(tasks: Tasks, book: _Book, task: str, lease: TaskLease | None, now: int) -> tuple[str, str] | None:
    """The open handoff that holds ``task``, as (id, stage), or None: one this node coordinates, or (several
    nodes) one another node coordinates, as the stored lease says, until its ``until``."""
    here = book.handoffs.get(task)
    if here is not None:
        return here.id, here.stage
    hold = None if lease is None else lease.open_handoff
    if hold is None or hold.until <= now or tasks.coordinator_elsewhere(hold.id) is None:
        return None  # none; or its node died; or this node coordinated it and it has ended (the clearing write
        # may still be on its way)
    return hold.id, hold.stage


def _check_holder(lease: TaskLease | None, task: str, device: str, epoch: int) -> TaskLease:
    """The lease ``device`` holds at ``epoch`` (live or expired, as long as nobody took the task since)."""
    if lease is None or epoch > lease.epoch:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"task {task[:64]!r} has no epoch {epoch} yet")
    if epoch < lease.epoch or lease.owner != device:
        raise ProtocolError(ErrorCode.STALE_EPOCH, f"epoch {epoch} of task {task[:64]!r} is stale"
                            + ("" if lease.owner is None else f": {lease.owner!r} holds epoch {lease.epoch}"),
                            task=task, epoch=lease.epoch, owner=lease.owner)
    return lease


def _confirmed(lease: TaskLease, now: int, **changes: Any) -> TaskLease:
    return replace(lease, handoff=None, updated=now, **changes)


# ---- lease ops ----------------------------------------------------------------


def op_claim(tasks: Tasks, session: Conn, header: dict[str, Any]) -> None:
    device = session.device
    assert device is not None
    task = _task_name(header)
    ttl = _ttl_ms(tasks, header)
    hub = tasks.hub

    async def work(leases: dict[str, TaskLease], book: _Book) -> None:
        now = now_ms()
        lease = leases.get(task)
        if lease is not None and lease.owner == device:
            new = _confirmed(lease, now, expires=now + ttl)
        elif (holding := _holding(tasks, book, task, lease, now)) is not None:
            # the handoff holds the task, even past the lease's expiry
            raise ProtocolError(ErrorCode.HANDOFF_BUSY, f"task {task[:64]!r} is being handed off",
                                task=task, handoff=holding[0])
        elif _is_live(lease, now):
            assert lease is not None
            raise ProtocolError(ErrorCode.CONFLICT, f"task {task[:64]!r} is held by {lease.owner!r} at epoch "
                                f"{lease.epoch}", task=task, owner=lease.owner, epoch=lease.epoch,
                                expires=lease.expires)
        else:
            if lease is None and len(leases) >= MAX_TASKS_PER_USER:
                raise ProtocolError(ErrorCode.TOO_LARGE, f"more than {MAX_TASKS_PER_USER} tasks for one user")
            new = TaskLease(user=session.user or "", task=task, owner=device,
                            epoch=(0 if lease is None else lease.epoch) + 1, expires=now + ttl, updated=now)
        await _write(hub, book, new)
        hub.events["task_claims"] += 1
        session.reply(header, _lease_envelope(new))

    _serialised(tasks, session, header, work)


def op_renew(tasks: Tasks, session: Conn, header: dict[str, Any]) -> None:
    device = session.device
    assert device is not None
    task = _task_name(header)
    epoch = _epoch(header)
    ttl = _ttl_ms(tasks, header)
    hub = tasks.hub

    async def work(leases: dict[str, TaskLease], book: _Book) -> None:
        lease = _check_holder(leases.get(task), task, device, epoch)
        now = now_ms()
        new = _confirmed(lease, now, expires=now + ttl)
        await _write(hub, book, new)
        session.reply(header, _lease_envelope(new))

    _serialised(tasks, session, header, work)


def op_release(tasks: Tasks, session: Conn, header: dict[str, Any]) -> None:
    device = session.device
    assert device is not None
    task = _task_name(header)
    epoch = _epoch(header)
    hub = tasks.hub

    async def work(leases: dict[str, TaskLease], book: _Book) -> None:
        lease = _check_holder(leases.get(task), task, device, epoch)
        now = now_ms()
        holding = _holding(tasks, book, task, lease, now)
        if holding is not None:
            raise ProtocolError(ErrorCode.HANDOFF_BUSY, f"task {task[:64]!r} is being handed off: refuse or "
                                "let it finish first", task=task, handoff=holding[0])
        await _write(hub, book, _confirmed(lease, now, owner=None, expires=0))
        session.reply(header, {"op": "task.released", "task": task, "epoch": epoch})

    _serialised(tasks, session, header, work)


def _listing(tasks: Tasks, leases: dict[str, TaskLease], book: _Book, now: int,
             only: str | None = None) -> list[dict[str, Any]]:
    listed = []
    for name in sorted(leases) if only is None else [only] if only in leases else []:
        lease = leases[name]
        entry: dict[str, Any] = {"task": name, "owner": lease.owner, "epoch": lease.epoch, "expires": lease.expires,
                                 "live": _is_live(lease, now)}
        holding = _holding(tasks, book, name, lease, now)
        if holding is not None:
            entry["handoff"] = holding[0]
        listed.append(entry)
    return listed


def op_list(tasks: Tasks, session: Conn, header: dict[str, Any]) -> None:
    only = _task_name(header) if "task" in header else None

    async def work(leases: dict[str, TaskLease], book: _Book) -> None:
        now = now_ms()
        session.reply(header, {"op": "tasks", "tasks": _listing(tasks, leases, book, now, only), "server_time": now})

    _serialised(tasks, session, header, work)


@contextlib.asynccontextmanager
async def fenced(tasks: Tasks, session: Conn, task: str, epoch: int) -> AsyncIterator[None]:
    """Hold the user's task lock while a write for ``task`` at ``epoch`` happens; refuse a stale one."""
    hub = tasks.hub
    user, device = session.user, session.device
    assert user is not None and device is not None
    book = tasks.book(user)
    async with book.lock:
        for attempt in range(RACE_ATTEMPTS):
            leases = await _leases(hub, user, book)
            lease = _check_holder(leases.get(task), task, device, epoch)
            holding = _holding(tasks, book, task, lease, now_ms())
            # paused: the owner's prepared went to the coordinating node, which may not have moved on yet
            if holding is not None and (holding[1] != PREPARE or holding[0] in tasks.paused):
                raise ProtocolError(ErrorCode.HANDOFF_BUSY, f"task {task[:64]!r} is being handed off and its "
                                    "owner said it paused", task=task, handoff=holding[0])
            if lease.handoff is None:
                break
            try:
                await _write(hub, book, _confirmed(lease, now_ms()))
                break
            except TaskRaced:
                if attempt == RACE_ATTEMPTS - 1:
                    raise
        yield


# ---- handoff --------------------------------------------------------------------

Act = Callable[[Handoff, dict[str, TaskLease], _Book], Coroutine[Any, Any, None]]


def op_handoff_request(tasks: Tasks, session: Conn, header: dict[str, Any]) -> None:
    device = session.device
    user = session.user
    assert device is not None and user is not None
    check_message_id(header.get("id"))
    task = _task_name(header)
    selector = parse_selector(header.get("to"))
    hub = tasks.hub
    registry = tasks

    async def work(leases: dict[str, TaskLease], book: _Book) -> None:
        now = now_ms()
        lease = leases.get(task)
        if not _is_live(lease, now):
            raise ProtocolError(ErrorCode.NOT_FOUND, f"task {task[:64]!r} has no owner: claim it instead", task=task)
        assert lease is not None and lease.owner is not None
        holding = _holding(tasks, book, task, lease, now)
        if holding is not None:
            raise ProtocolError(ErrorCode.HANDOFF_BUSY, f"task {task[:64]!r} is already being handed off",
                                task=task, handoff=holding[0])
        owner = lease.owner
        if selector.kind == "device" and selector.value == owner:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{owner!r} already owns task {task[:64]!r}")
        owner_session = hub.online(user, owner)
        owner_node = None if owner_session is not None else hub.broker.holder(user, owner)
        if owner_session is None and owner_node is None:
            raise ProtocolError(ErrorCode.OFFLINE, f"the owner {owner!r} is not connected: it cannot hand the task "
                                "over (its lease ends at 'expires' unless it renews)", task=task, owner=owner,
                                epoch=lease.epoch, expires=lease.expires)
        # the target may be the requester itself (a pull); never the owner; one connected here first
        target_session = hub.router.resolve_one(user, selector, exclude=owner)
        target_node = None
        if target_session is not None and target_session.device is not None:
            target: str | None = target_session.device
        else:
            target_session = None
            target = hub.router.resolve_elsewhere(user, selector, exclude=owner)
            target_node = None if target is None else hub.broker.holder(user, target)
        if target is None or (target_session is None and target_node is None):
            raise ProtocolError(ErrorCode.OFFLINE, "no online device other than the owner matched 'to'")
        timeout = hub.settings.handoff_prepare_timeout
        deadline = now + int(timeout * 1000)
        handoff = Handoff(id=registry.new_handoff_id(), user=user, task=task, requester=device, owner=owner,
                          target=target, epoch=lease.epoch, owner_session=owner_session,
                          target_session=target_session, owner_node=owner_node, target_node=target_node)
        if hub.broker.spans_nodes:  # every node's claims must see it before anyone hears of it
            await _write(hub, book, replace(lease, open_handoff=OpenHandoff(handoff.id, PREPARE,
                                                                            deadline + HOLD_MARGIN_MS)))
        book.handoffs[task] = handoff
        registry.handoffs[handoff.id] = handoff
        for party in (owner_session, target_session):
            if party is not None:
                registry.by_session.setdefault(party, set()).add(handoff)
        handoff.timer = asyncio.get_running_loop().call_later(timeout, _on_timeout, tasks, handoff, PREPARE)
        hub.events["handoffs_requested"] += 1
        session.reply(header, {"op": "handoff.started", "handoff": handoff.id, "task": task, "from": owner,
                               "to": handoff.target, "epoch": lease.epoch})
        _to_party(tasks, handoff, OWNER, {"op": "handoff.prepare", "handoff": handoff.id, "task": task,
                                          "to": handoff.target, "epoch": lease.epoch, "deadline": deadline},
                  first=True)
        if target_node is not None:
            _to_party(tasks, handoff, TARGET, None, first=True)  # its connection is watched from now on
        for role in (OWNER, TARGET):  # a connection here that ended while the hold was being written
            connection = handoff.session_of(role)
            if connection is not None and connection.closed:
                _disconnected(tasks, handoff, role)

    _serialised(tasks, session, header, work)


def _open_handoff(tasks: Tasks, user: str | None, device: str | None, handoff_id: str, party: str,
                  stage: str) -> Handoff:
    """The handoff a step names, checked: it exists for this user, ``party`` is this device, at ``stage``."""
    handoff = tasks.handoffs.get(handoff_id)
    if handoff is None or handoff.user != user:
        raise ProtocolError(ErrorCode.NOT_FOUND, "no open handoff has this id (unknown, finished or failed)",
                            handoff=handoff_id)
    expected = handoff.device_of(party)
    if device != expected:
        raise ProtocolError(ErrorCode.FORBIDDEN, f"only {expected!r} answers this step of handoff {handoff_id}",
                            handoff=handoff_id)
    if handoff.stage != stage:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"handoff {handoff_id} is not waiting for this step "
                            f"(it is at '{handoff.stage}')", handoff=handoff_id)
    return handoff


async def _run_step(tasks: Tasks, user: str, device: str, handoff_id: str, op: str, act: Act) -> None:
    """A step of a handoff this node coordinates, from ``device`` (connected here or to another node), under
    the user's lock: in order with the sender's earlier task ops (a fenced write sent before ``prepared`` is
    judged before it), and never in the middle of a commit."""
    party, stage, _ = _STEPS[op]

    async def work(leases: dict[str, TaskLease], book: _Book) -> None:
        await act(_open_handoff(tasks, user, device, handoff_id, party, stage), leases, book)

    await _locked(tasks, user, work)


def _step(tasks: Tasks, session: Conn, header: dict[str, Any], op: str) -> None:
    handoff_id = _handoff_id(header)
    act = _STEPS[op][2](tasks, header)  # a malformed step is refused here, before anything is sent anywhere
    coordinator = tasks.coordinator_elsewhere(handoff_id)
    if coordinator is not None:
        _forward(tasks, session, header, op, handoff_id, coordinator)
        return
    assert session.user is not None and session.device is not None
    session.run_request(header, functools.partial(_run_step, tasks, session.user, session.device, handoff_id, op,
                                                  act))


def _checkpoint_size(checkpoint: Any) -> int:
    """The larger of the checkpoint's msgpack and compact JSON sizes: the offer goes out in either."""
    return max(len(msgpack.packb(checkpoint, use_bin_type=True)), len(canonical_json(checkpoint).encode()))


def _still_open(tasks: Tasks, handoff: Handoff) -> bool:
    """After a store write: the handoff did not end meanwhile (a timer or a disconnect does not wait for the
    lock)."""
    return tasks.handoffs.get(handoff.id) is handoff


def _prepared(tasks: Tasks, header: dict[str, Any]) -> Act:
    handoff_id = _handoff_id(header)
    checkpoint = header.get("checkpoint")
    problem = json_problem(checkpoint)
    if problem is not None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"the checkpoint must be a JSON value: {problem}",
                            handoff=handoff_id)
    hub = tasks.hub

    async def act(handoff: Handoff, leases: dict[str, TaskLease], book: _Book) -> None:
        limit = hub.settings.handoff_max_checkpoint_bytes
        size = _checkpoint_size(checkpoint)
        if size > limit:
            _fail(tasks, handoff, "checkpoint_too_large")
            raise ProtocolError(ErrorCode.TOO_LARGE, f"the checkpoint is {size} bytes; "
                                f"handoff_max_checkpoint_bytes is {limit}: the handoff failed",
                                handoff=handoff.id, limit="handoff_max_checkpoint_bytes", max=limit, size=size)
        timeout = hub.settings.handoff_accept_timeout
        deadline = now_ms() + int(timeout * 1000)
        if hub.broker.spans_nodes:
            lease = leases.get(handoff.task)
            if lease is None or lease.open_handoff is None or lease.open_handoff.id != handoff.id:
                _fail(tasks, handoff, "lease_changed")  # its hold lapsed (this node was stalled) and was taken
                return
            await _write(hub, book, replace(lease, open_handoff=OpenHandoff(handoff.id, OFFER,
                                                                            deadline + HOLD_MARGIN_MS)))
            if not _still_open(tasks, handoff):
                return
        _cancel_timer(handoff)
        handoff.stage = OFFER
        handoff.timer = asyncio.get_running_loop().call_later(timeout, _on_timeout, tasks, handoff, OFFER)
        _to_party(tasks, handoff, TARGET, {
            "op": "handoff.offer", "handoff": handoff.id, "task": handoff.task, "from": handoff.owner,
            "checkpoint": checkpoint, "epoch": handoff.epoch + 1, "deadline": deadline})

    return act


def _refused(tasks: Tasks, header: dict[str, Any]) -> Act:
    async def act(handoff: Handoff, leases: dict[str, TaskLease], book: _Book) -> None:
        _fail(tasks, handoff, "refused", header.get("reason"))

    return act


def _rejected(tasks: Tasks, header: dict[str, Any]) -> Act:
    async def act(handoff: Handoff, leases: dict[str, TaskLease], book: _Book) -> None:
        _fail(tasks, handoff, "rejected", header.get("reason"))

    return act


def _held_as_started(tasks: Tasks, handoff: Handoff, lease: TaskLease | None) -> bool:
    """The lease is the one the handoff started from, still held by it."""
    if lease is None or lease.epoch != handoff.epoch or lease.owner != handoff.owner:
        return False
    return not tasks.hub.broker.spans_nodes or (lease.open_handoff is not None
                                                and lease.open_handoff.id == handoff.id)


def _accepted(tasks: Tasks, header: dict[str, Any]) -> Act:
    hub = tasks.hub

    async def act(handoff: Handoff, leases: dict[str, TaskLease], book: _Book) -> None:
        _cancel_timer(handoff)
        handoff.stage = COMMIT  # from here on, only a store failure ends it without a commit
        now = now_ms()
        new = TaskLease(user=handoff.user, task=handoff.task, owner=handoff.target, epoch=handoff.epoch + 1,
                        expires=now + int(hub.settings.task_lease_ttl * 1000), handoff=handoff.id, updated=now)
        tasks.notice_users.add(handoff.user)
        if hub.broker.spans_nodes:
            # the new owner's hellos on any node send the notice again; told before the commit is written, so
            # that the other nodes know it even if this node dies right after writing it
            hub.broker.publish(HANDOFFS, ["notices", handoff.user])
        for attempt in range(RACE_ATTEMPTS):
            if not _held_as_started(tasks, handoff, leases.get(handoff.task)):
                _fail(tasks, handoff, "lease_changed")  # cannot happen while the handoff holds the task
                return
            try:
                await _write(hub, book, new)
                break
            except TaskRaced:
                # another node changed the lease meanwhile (the owner renewed it): look again
                if attempt == RACE_ATTEMPTS - 1:
                    _fail(tasks, handoff, "lease_changed")
                    return
            except Exception:
                log.exception("handoff %s of task %r could not be committed", handoff.id, handoff.task)
                _fail(tasks, handoff, "internal")
                return
            try:
                leases = await _leases(hub, handoff.user, book)
            except Exception:
                log.exception("handoff %s of task %r could not be committed", handoff.id, handoff.task)
                _fail(tasks, handoff, "internal")
                return
        _forget(tasks, handoff)
        hub.events["handoffs_committed"] += 1
        committed = {"op": "handoff.committed", "handoff": handoff.id, "task": handoff.task, "owner": new.owner,
                     "epoch": new.epoch, "expires": new.expires}
        _tell(hub, handoff, [handoff.target, handoff.requester], committed)
        hub.router.send_to_device(handoff.user, handoff.owner, {
            "op": "handoff.revoked", "handoff": handoff.id, "task": handoff.task, "epoch": new.epoch,
            "owner": new.owner})
        hub.bus.emit("task.handed_off", user=handoff.user, task=handoff.task, owner=new.owner,
                     previous=handoff.owner, epoch=new.epoch)

    return act


# op -> (the party that sends it, the stage it answers, what it does)
_STEPS: dict[str, tuple[str, str, Callable[[Tasks, dict[str, Any]], Act]]] = {
    "handoff.prepared": (OWNER, PREPARE, _prepared),
    "handoff.refuse": (OWNER, PREPARE, _refused),
    "handoff.accept": (TARGET, OFFER, _accepted),
    "handoff.reject": (TARGET, OFFER, _rejected),
}


def op_handoff_prepared(tasks: Tasks, session: Conn, header: dict[str, Any]) -> None:
    _step(tasks, session, header, "handoff.prepared")


def op_handoff_refuse(tasks: Tasks, session: Conn, header: dict[str, Any]) -> None:
    _step(tasks, session, header, "handoff.refuse")


def op_handoff_reject(tasks: Tasks, session: Conn, header: dict[str, Any]) -> None:
    _step(tasks, session, header, "handoff.reject")


def op_handoff_accept(tasks: Tasks, session: Conn, header: dict[str, Any]) -> None:
    _step(tasks, session, header, "handoff.accept")


def _cancel_timer(handoff: Handoff) -> None:
    if handoff.timer is not None:
        handoff.timer.cancel()
        handoff.timer = None


def _forget(registry: Tasks, handoff: Handoff, ended_elsewhere: bool = True) -> bool:
    """Remove an open handoff; False if it was not open any more. ``ended_elsewhere``: the parties' nodes
    hear now that it ended (else the caller has them told)."""
    if registry.handoffs.get(handoff.id) is not handoff:
        return False
    del registry.handoffs[handoff.id]
    book = registry.book(handoff.user)
    if book.handoffs.get(handoff.task) is handoff:
        del book.handoffs[handoff.task]
    for party in (handoff.owner_session, handoff.target_session):
        open_here = registry.by_session.get(party) if party is not None else None
        if party is not None and open_here is not None:
            open_here.discard(handoff)
            if not open_here:
                del registry.by_session[party]
    _cancel_timer(handoff)
    if ended_elsewhere:
        _end_elsewhere(registry, handoff)
    return True


def _end_elsewhere(tasks: Tasks, handoff: Handoff) -> None:
    """The parties' nodes stop watching their connections for ``handoff``."""
    for node in dict.fromkeys([handoff.owner_node, handoff.target_node]):
        if node is not None:
            tasks.hub.broker.to_node(node, HANDOFFS, ["end", handoff.id])


def _fail(tasks: Tasks, handoff: Handoff, reason: str, detail: Any = None, at_once: bool = False) -> None:
    """End ``handoff`` without a commit. Several nodes: the parties hear it once its hold is cleared in the
    store, unless ``at_once`` (this node is shutting down: its connections close next)."""
    hub = tasks.hub
    deferred = hub.broker.spans_nodes and not at_once
    if not _forget(tasks, handoff, ended_elsewhere=not deferred):
        return
    hub.events["handoffs_failed"] += 1
    envelope: dict[str, Any] = {"op": "handoff.failed", "handoff": handoff.id, "task": handoff.task,
                                "reason": reason}
    if isinstance(detail, str) and detail:
        envelope["detail"] = detail[:256]
    if hub.broker.spans_nodes:
        hub.spawn(_release_then_tell(tasks, handoff, envelope if deferred else None))
    if not deferred:
        _tell(hub, handoff, [handoff.requester, handoff.owner, handoff.target], envelope)


async def _release_then_tell(tasks: Tasks, handoff: Handoff, failed: dict[str, Any] | None) -> None:
    """Several nodes: a failed handoff stops holding the task in the store, and the parties' nodes stop
    watching, before anyone hears ``failed`` (if given): the owner resumes on it, and its fenced writes (judged
    on its node against the stored lease) must not be refused then."""
    hub = tasks.hub
    book = tasks.book(handoff.user)
    try:
        async with book.lock:
            for _ in range(RACE_ATTEMPTS):
                lease = (await _leases(hub, handoff.user, book)).get(handoff.task)
                if lease is None or lease.open_handoff is None or lease.open_handoff.id != handoff.id:
                    break
                try:
                    await _write(hub, book, replace(lease, open_handoff=None))
                    break
                except TaskRaced:
                    continue  # the owner renewed meanwhile: clear it from that
    except StoreError as exc:
        log.warning("handoff %s of task %r: its hold stays in the store until it lapses: %s", handoff.id,
                    handoff.task, exc)
    if failed is not None:
        _end_elsewhere(tasks, handoff)
        _tell(hub, handoff, [handoff.requester, handoff.owner, handoff.target], failed)


def _on_timeout(tasks: Tasks, handoff: Handoff, stage: str) -> None:
    if handoff.stage == stage:
        handoff.timer = None
        _fail(tasks, handoff, "prepare_timeout" if stage == PREPARE else "accept_timeout")


def _disconnected(tasks: Tasks, handoff: Handoff, role: str) -> None:
    """The owner gone before ``prepared`` or the target gone before ``accept`` fails the handoff."""
    if role == TARGET and handoff.stage in (PREPARE, OFFER):
        _fail(tasks, handoff, "target_disconnected")
    elif role == OWNER and handoff.stage == PREPARE:
        _fail(tasks, handoff, "owner_disconnected")


def on_closed(registry: Tasks, session: Conn) -> None:
    """A party's connection ended: its handoffs here are judged at once, those another node coordinates there."""
    for handoff in list(registry.by_session.get(session, ())):
        _disconnected(registry, handoff, OWNER if session is handoff.owner_session else TARGET)
    for key in registry.watched.pop(session, ()):
        handoff_id, role = key
        if registry.watches.get(key) is session:
            del registry.watches[key]
        _tell_coordinator(registry, handoff_id, ["gone", handoff_id, session.user, role])


def on_welcome(registry: Tasks, session: Conn) -> None:
    """Send ``handoff.committed`` again for every lease a handoff gave this device that it has not used yet."""
    hub, user, device = registry.hub, session.user, session.device
    assert user is not None and device is not None
    book = registry.books.get(user)
    if hub.broker.spans_nodes or book is None or book.leases is None:
        # (on several nodes the copy here may be older than a commit made on another node)
        if user not in registry.notice_users:
            return  # the common hello: nothing to load, nothing to send
        book = registry.book(user)
    elif not any(lease.owner == device and lease.handoff is not None for lease in book.leases.values()):
        return

    async def resend() -> None:
        async with book.lock:
            leases = await _leases(hub, user, book)
            for lease in leases.values():
                if lease.owner == device and lease.handoff is not None:
                    session.send_control({"op": "handoff.committed", "handoff": lease.handoff, "task": lease.task,
                                          "owner": device, "epoch": lease.epoch, "expires": lease.expires})

    hub.spawn(resend())


# ---- several nodes: parties and steps on other nodes than the coordinating one -------------------


def _to_party(tasks: Tasks, handoff: Handoff, role: str, envelope: dict[str, Any] | None,
              first: bool = False) -> None:
    """``envelope`` (if any) to the party's connection that the handoff started with, here or on its node;
    ``first``: that node starts watching that connection."""
    session = handoff.session_of(role)
    if session is not None:
        if envelope is not None:
            session.send_control(envelope)
        return
    node = handoff.node_of(role)
    assert node is not None
    if not tasks.hub.broker.to_node(node, HANDOFFS, ["watch", handoff.id, handoff.user, handoff.device_of(role),
                                                      role, envelope, first]):
        _party_gone(tasks, handoff.user, handoff.id, role)  # its node is not alive any more


def _tell_coordinator(tasks: Tasks, handoff_id: str, message: list[Any]) -> None:
    node = tasks.coordinator_elsewhere(handoff_id)
    if node is not None:
        tasks.hub.broker.to_node(node, HANDOFFS, message)  # a dead coordinator has nothing to hear


def _party_gone(tasks: Tasks, user: str, handoff_id: str, role: str) -> None:
    """The connection of a party on another node ended (or its node died): judged under the user's lock, after
    the steps that node forwarded before (a ``prepared`` sent just before the owner left counts)."""
    async def judge() -> None:
        async with tasks.book(user).lock:
            handoff = tasks.handoffs.get(handoff_id)
            if handoff is not None and handoff.user == user and handoff.node_of(role) is not None:
                _disconnected(tasks, handoff, role)

    tasks.hub.spawn(judge())


def _on_watch(tasks: Tasks, handoff_id: str, user: str, device: str, role: str, envelope: dict[str, Any] | None,
              first: bool) -> None:
    key = (handoff_id, role)
    session = tasks.watches.get(key)
    if session is None and first:
        session = tasks.hub.online(user, device)
        if session is not None:
            tasks.watches[key] = session
            tasks.watched.setdefault(session, set()).add(key)
    if session is None:  # the party's connection ended before this arrived: the handoff fails
        _tell_coordinator(tasks, handoff_id, ["gone", handoff_id, user, role])
    elif envelope is not None:
        session.send_control(envelope)


def _on_end(tasks: Tasks, handoff_id: str) -> None:
    tasks.paused.discard(handoff_id)
    for role in (OWNER, TARGET):
        session = tasks.watches.pop((handoff_id, role), None)
        keys = tasks.watched.get(session) if session is not None else None
        if session is not None and keys is not None:
            keys.discard((handoff_id, role))
            if not keys:
                del tasks.watched[session]


def _forward(tasks: Tasks, session: Conn, header: dict[str, Any], op: str, handoff_id: str,
             coordinator: str) -> None:
    """A step of a handoff another node coordinates: judged there; its error, if any, answers it here."""
    hub = tasks.hub
    user, device = session.user, session.device
    assert user is not None and device is not None
    fields = {name: header[name] for name in ("handoff", "checkpoint", "reason") if name in header}

    async def forward() -> None:
        token = secrets.token_urlsafe(9)
        answer: asyncio.Future[list[Any] | None] = asyncio.get_running_loop().create_future()
        tasks.answers[token] = answer
        try:
            async with tasks.book(user).lock:  # after this device's earlier task ops here: a fenced write sent
                # before prepared was judged before it; one sent after it is refused from now on
                if op == "handoff.prepared":
                    tasks.paused.add(handoff_id)
                sent = hub.broker.to_node(coordinator, HANDOFFS,
                                          ["step", token, hub.node_id, user, device, op, fields])
            if not sent:
                error: list[Any] | None = [ErrorCode.NOT_FOUND.value, "no open handoff has this id (its node is "
                                           "gone)", {"handoff": handoff_id}]
            else:
                try:
                    error = await asyncio.wait_for(answer, STEP_ANSWER_TIMEOUT)
                except TimeoutError:
                    raise ProtocolError(ErrorCode.UNAVAILABLE, f"the node coordinating handoff {handoff_id} did "
                                        "not answer in time; the handoff's outcome is told when it ends",
                                        retry_after=STORE_RETRY_AFTER, handoff=handoff_id) from None
        finally:
            tasks.answers.pop(token, None)
        if error is not None:
            if op == "handoff.prepared":
                tasks.paused.discard(handoff_id)
            code, message, extra = error
            raise ProtocolError(ErrorCode(code), message, **extra)

    session.run_request(header, forward)


def _on_forwarded_step(tasks: Tasks, token: str, origin: str, user: str, device: str, op: str,
                       header: dict[str, Any]) -> None:
    """A step another node's party sent for a handoff coordinated here; the answer goes back to ``origin``."""
    async def judge() -> None:
        error: list[Any] | None = None
        try:
            if op not in _STEPS:
                raise ProtocolError(ErrorCode.BAD_REQUEST, f"{op!r} is not a step of a handoff")
            handoff_id = _handoff_id(header)
            await _run_step(tasks, user, device, handoff_id, op, _STEPS[op][2](tasks, header))
        except ProtocolError as exc:
            extra = dict(exc.extra)
            if exc.retry_after is not None:
                extra["retry_after"] = exc.retry_after
            error = [exc.code.value, exc.message, extra]
        except StoreError as exc:
            if type(exc) is StoreError:
                error = [ErrorCode.UNAVAILABLE.value, "the store cannot be reached; try again",
                         {"retry_after": STORE_RETRY_AFTER}]
            else:
                log.exception("internal error in a forwarded %r", op)
                error = [ErrorCode.INTERNAL.value, "internal server error", {}]
        except Exception:
            log.exception("internal error in a forwarded %r", op)
            error = [ErrorCode.INTERNAL.value, "internal server error", {}]
        tasks.hub.broker.to_node(origin, HANDOFFS, ["answer", token, error])

    tasks.hub.spawn(judge())


def on_handoff_event(tasks: Tasks, message: list[Any]) -> None:
    kind = message[0]
    if kind == "watch":
        _on_watch(tasks, *message[1:])
    elif kind == "gone":
        _, handoff_id, user, role = message
        _party_gone(tasks, user, handoff_id, role)
    elif kind == "end":
        _on_end(tasks, message[1])
    elif kind == "step":
        _on_forwarded_step(tasks, *message[1:])
    elif kind == "answer":
        answer = tasks.answers.get(message[1])
        if answer is not None and not answer.done():
            answer.set_result(message[2])
    elif kind == "device-gone":
        _, user, device = message
        for handoff in list(tasks.handoffs.values()):
            for role in (OWNER, TARGET):
                if handoff.user == user and handoff.device_of(role) == device and handoff.node_of(role) is not None:
                    _party_gone(tasks, user, handoff.id, role)
    elif kind == "notices":
        tasks.notice_users.add(message[1])
