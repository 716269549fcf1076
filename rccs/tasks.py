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
from .errors import ErrorCode, ProtocolError
from .mergepatch import canonical_json, json_problem
from .protocol import MAX_ID_CHARS, check_message_id, parse_epoch, parse_selector, parse_task_name
from .store import TaskLease, TaskRaced

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


@dataclass(eq=False)  # identity: kept in sets
class Handoff:
    id: str
    user: str
    task: str
    requester: str  # devices; messages go to whichever connection of the device is open when they are sent
    owner: str
    target: str
    epoch: int  # the owner's epoch; the target gets epoch + 1
    owner_session: Conn
    target_session: Conn
    stage: str = PREPARE
    timer: asyncio.TimerHandle | None = None


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

    async def on_start(self) -> None:
        """Which users have committed notices to send again after a hello."""
        self.notice_users.update(await self.hub.store.users_with_task_notices())

    def abort_all(self, reason: str) -> None:
        """Fail every open handoff (the server is shutting down; leases stay as they are)."""
        for handoff in list(self.handoffs.values()):
            if handoff.stage != COMMIT:
                _fail(self, handoff, reason)

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
            return _listing(await _leases(self.hub, user, book), book, now_ms())

    def book(self, user: str) -> _Book:
        book = self.books.get(user)
        if book is None:
            book = self.books[user] = _Book()
        return book

    def new_handoff_id(self) -> str:
        # unique across restarts, so a step meant for an aborted handoff can never hit a new one
        return f"h{next(self._serial)}-{secrets.token_urlsafe(9)}"


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


def _serialised(tasks: Tasks, session: Conn, header: dict[str, Any],
                work: Callable[[dict[str, TaskLease], _Book], Coroutine[Any, Any, None]]) -> None:
    """Run ``work`` under the user's lock, in the background; its ProtocolError answers the request."""
    hub = tasks.hub
    user = session.user
    assert user is not None
    book = tasks.book(user)

    async def locked() -> None:
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

    session.run_request(header, locked)


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
        elif task in book.handoffs:  # the handoff holds the task, even past the lease's expiry
            raise ProtocolError(ErrorCode.HANDOFF_BUSY, f"task {task[:64]!r} is being handed off",
                                task=task, handoff=book.handoffs[task].id)
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
        if task in book.handoffs:
            raise ProtocolError(ErrorCode.HANDOFF_BUSY, f"task {task[:64]!r} is being handed off: refuse or "
                                "let it finish first", task=task, handoff=book.handoffs[task].id)
        await _write(hub, book, _confirmed(lease, now_ms(), owner=None, expires=0))
        session.reply(header, {"op": "task.released", "task": task, "epoch": epoch})

    _serialised(tasks, session, header, work)


def _listing(leases: dict[str, TaskLease], book: _Book, now: int, only: str | None = None) -> list[dict[str, Any]]:
    listed = []
    for name in sorted(leases) if only is None else [only] if only in leases else []:
        lease = leases[name]
        entry: dict[str, Any] = {"task": name, "owner": lease.owner, "epoch": lease.epoch, "expires": lease.expires,
                                 "live": _is_live(lease, now)}
        if name in book.handoffs:
            entry["handoff"] = book.handoffs[name].id
        listed.append(entry)
    return listed


def op_list(tasks: Tasks, session: Conn, header: dict[str, Any]) -> None:
    only = _task_name(header) if "task" in header else None

    async def work(leases: dict[str, TaskLease], book: _Book) -> None:
        now = now_ms()
        session.reply(header, {"op": "tasks", "tasks": _listing(leases, book, now, only), "server_time": now})

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
            handoff = book.handoffs.get(task)
            if handoff is not None and handoff.stage != PREPARE:
                raise ProtocolError(ErrorCode.HANDOFF_BUSY, f"task {task[:64]!r} is being handed off and its "
                                    "owner said it paused", task=task, handoff=handoff.id)
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
        if task in book.handoffs:
            raise ProtocolError(ErrorCode.HANDOFF_BUSY, f"task {task[:64]!r} is already being handed off",
                                task=task, handoff=book.handoffs[task].id)
        owner = lease.owner
        if selector.kind == "device" and selector.value == owner:
            raise ProtocolError(ErrorCode.BAD_REQUEST, f"{owner!r} already owns task {task[:64]!r}")
        owner_session = hub.online(user, owner)
        if owner_session is None:
            raise ProtocolError(ErrorCode.OFFLINE, f"the owner {owner!r} is not connected: it cannot hand the task "
                                "over (its lease ends at 'expires' unless it renews)", task=task, owner=owner,
                                epoch=lease.epoch, expires=lease.expires)
        # the target may be the requester itself (a pull); never the owner
        target_session = hub.router.resolve_one(user, selector, exclude=owner)
        if target_session is None or target_session.device is None:
            raise ProtocolError(ErrorCode.OFFLINE, "no online device other than the owner matched 'to'")
        handoff = Handoff(id=registry.new_handoff_id(), user=user, task=task, requester=device, owner=owner,
                          target=target_session.device, epoch=lease.epoch, owner_session=owner_session,
                          target_session=target_session)
        book.handoffs[task] = handoff
        registry.handoffs[handoff.id] = handoff
        for party in (owner_session, target_session):
            registry.by_session.setdefault(party, set()).add(handoff)
        timeout = hub.settings.handoff_prepare_timeout
        handoff.timer = asyncio.get_running_loop().call_later(timeout, _on_timeout, tasks, handoff, PREPARE)
        hub.events["handoffs_requested"] += 1
        session.reply(header, {"op": "handoff.started", "handoff": handoff.id, "task": task, "from": owner,
                               "to": handoff.target, "epoch": lease.epoch})
        owner_session.send_control({"op": "handoff.prepare", "handoff": handoff.id, "task": task,
                                    "to": handoff.target, "epoch": lease.epoch,
                                    "deadline": now + int(timeout * 1000)})

    _serialised(tasks, session, header, work)


def _open_handoff(tasks: Tasks, session: Conn, header: dict[str, Any], party: str, stage: str) -> Handoff:
    """The handoff a step names, checked: it exists for this user, ``party`` is this device, at ``stage``."""
    handoff_id = _handoff_id(header)
    handoff = tasks.handoffs.get(handoff_id)
    if handoff is None or handoff.user != session.user:
        raise ProtocolError(ErrorCode.NOT_FOUND, "no open handoff has this id (unknown, finished or failed)",
                            handoff=handoff_id)
    expected = handoff.owner if party == "owner" else handoff.target
    if session.device != expected:
        raise ProtocolError(ErrorCode.FORBIDDEN, f"only {expected!r} answers this step of handoff {handoff_id}",
                            handoff=handoff_id)
    if handoff.stage != stage:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"handoff {handoff_id} is not waiting for this step "
                            f"(it is at '{handoff.stage}')", handoff=handoff_id)
    return handoff


def _step(tasks: Tasks, session: Conn, header: dict[str, Any], party: str, stage: str,
          act: Callable[[Handoff, dict[str, TaskLease], _Book], Coroutine[Any, Any, None]]) -> None:
    """Run a handoff step under the user's lock: in order with the sender's earlier task ops (a fenced write
    sent before ``prepared`` is judged before it), and never in the middle of a commit."""
    _handoff_id(header)

    async def work(leases: dict[str, TaskLease], book: _Book) -> None:
        await act(_open_handoff(tasks, session, header, party, stage), leases, book)

    _serialised(tasks, session, header, work)


def _checkpoint_size(checkpoint: Any) -> int:
    """The larger of the checkpoint's msgpack and compact JSON sizes: the offer goes out in either."""
    return max(len(msgpack.packb(checkpoint, use_bin_type=True)), len(canonical_json(checkpoint).encode()))


def op_handoff_prepared(tasks: Tasks, session: Conn, header: dict[str, Any]) -> None:
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
        _cancel_timer(handoff)
        timeout = hub.settings.handoff_accept_timeout
        handoff.target_session.send_control({
            "op": "handoff.offer", "handoff": handoff.id, "task": handoff.task, "from": handoff.owner,
            "checkpoint": checkpoint, "epoch": handoff.epoch + 1, "deadline": now_ms() + int(timeout * 1000)})
        handoff.stage = OFFER
        handoff.timer = asyncio.get_running_loop().call_later(timeout, _on_timeout, tasks, handoff, OFFER)

    _step(tasks, session, header, "owner", PREPARE, act)


def op_handoff_refuse(tasks: Tasks, session: Conn, header: dict[str, Any]) -> None:
    async def act(handoff: Handoff, leases: dict[str, TaskLease], book: _Book) -> None:
        _fail(tasks, handoff, "refused", header.get("reason"))

    _step(tasks, session, header, "owner", PREPARE, act)


def op_handoff_reject(tasks: Tasks, session: Conn, header: dict[str, Any]) -> None:
    async def act(handoff: Handoff, leases: dict[str, TaskLease], book: _Book) -> None:
        _fail(tasks, handoff, "rejected", header.get("reason"))

    _step(tasks, session, header, "target", OFFER, act)


def op_handoff_accept(tasks: Tasks, session: Conn, header: dict[str, Any]) -> None:
    hub = tasks.hub

    async def act(handoff: Handoff, leases: dict[str, TaskLease], book: _Book) -> None:
        _cancel_timer(handoff)
        handoff.stage = COMMIT  # from here on, only a store failure ends it without a commit
        lease = leases.get(handoff.task)
        if lease is None or lease.epoch != handoff.epoch or lease.owner != handoff.owner:
            _fail(tasks, handoff, "lease_changed")  # cannot happen while the handoff holds the task
            return
        now = now_ms()
        new = TaskLease(user=handoff.user, task=handoff.task, owner=handoff.target, epoch=handoff.epoch + 1,
                        expires=now + int(hub.settings.task_lease_ttl * 1000), handoff=handoff.id, updated=now)
        tasks.notice_users.add(handoff.user)
        try:
            await _write(hub, book, new)
        except TaskRaced:
            _fail(tasks, handoff, "lease_changed")  # another node changed the lease meanwhile
            return
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

    _step(tasks, session, header, "target", OFFER, act)


def _cancel_timer(handoff: Handoff) -> None:
    if handoff.timer is not None:
        handoff.timer.cancel()
        handoff.timer = None


def _forget(registry: Tasks, handoff: Handoff) -> bool:
    """Remove an open handoff; False if it was not open any more."""
    if registry.handoffs.get(handoff.id) is not handoff:
        return False
    del registry.handoffs[handoff.id]
    book = registry.book(handoff.user)
    if book.handoffs.get(handoff.task) is handoff:
        del book.handoffs[handoff.task]
    for party in (handoff.owner_session, handoff.target_session):
        open_here = registry.by_session.get(party)
        if open_here is not None:
            open_here.discard(handoff)
            if not open_here:
                del registry.by_session[party]
    _cancel_timer(handoff)
    return True


def _fail(tasks: Tasks, handoff: Handoff, reason: str, detail: Any = None) -> None:
    if not _forget(tasks, handoff):
        return
    hub = tasks.hub
    hub.events["handoffs_failed"] += 1
    envelope: dict[str, Any] = {"op": "handoff.failed", "handoff": handoff.id, "task": handoff.task,
                                "reason": reason}
    if isinstance(detail, str) and detail:
        envelope["detail"] = detail[:256]
    _tell(hub, handoff, [handoff.requester, handoff.owner, handoff.target], envelope)


def _on_timeout(tasks: Tasks, handoff: Handoff, stage: str) -> None:
    if handoff.stage == stage:
        handoff.timer = None
        _fail(tasks, handoff, "prepare_timeout" if stage == PREPARE else "accept_timeout")


def on_closed(registry: Tasks, session: Conn) -> None:
    """The owner gone before ``prepared`` or the target gone before ``accept`` fails its handoffs."""
    for handoff in list(registry.by_session.get(session, ())):
        if session is handoff.target_session and handoff.stage in (PREPARE, OFFER):
            _fail(registry, handoff, "target_disconnected")
        elif session is handoff.owner_session and handoff.stage == PREPARE:
            _fail(registry, handoff, "owner_disconnected")


def on_welcome(registry: Tasks, session: Conn) -> None:
    """Send ``handoff.committed`` again for every lease a handoff gave this device that it has not used yet."""
    hub, user, device = registry.hub, session.user, session.device
    assert user is not None and device is not None
    book = registry.books.get(user)
    if book is None or book.leases is None:
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
