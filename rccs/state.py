"""Cross-device state documents: ``state.get``, ``state.patch``, ``state.subscribe``, ``state.unsubscribe``
(docs/protocol.md section 14).

Theory of operation. A user's documents are named ``user/<name>`` (any of the user's devices writes),
``device/<id>/<name>`` (only device ``<id>`` writes) and ``live/<id>/<name>`` (only device ``<id>``
writes; kept in this process's memory only and removed when the connection that wrote it ends). Every
device of the user reads all of them; another user's documents are simply not visible (names are per user).

Durable documents live in the store: ``patch_state`` merges, checks ``if_rev`` and the limits, assigns
the next revision and appends to the document's change log in one transaction on the store's single
worker, which makes the store the one sequencer of every document. A change is answered (``state.ok``)
and announced (``state.changed``) only after that transaction committed. Store calls complete in the
order they were made, so the announcements of one document go out in revision order.

Subscriptions. ``state.subscribe`` registers the subscription at once, in catch-up mode: live changes
that match it are buffered. Then the store read (changes after ``since`` or a snapshot) runs; every change
committed before that read is in it, every change committed after it was buffered. The catch-up is sent,
then ``state.subscribed``, then the buffered changes newer than what the catch-up covered (by revision),
and the subscription goes live: nothing is lost and nothing is sent twice. A connection gets a change
once even when several of its subscriptions match it, except that a subscription still catching up may
repeat a change another, live, subscription of the same connection already delivered (``rev`` tells).

``live/`` documents have revisions too (in memory: they start again after a restart, when all live
documents are gone). Their removal is announced as a change with ``patch`` null. They have no change log:
catching up on one is always a snapshot.
"""

from __future__ import annotations

import collections
import contextlib
import functools
from collections.abc import Callable, Coroutine
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .clock import now_ms
from .errors import ErrorCode, ProtocolError
from .mergepatch import canonical_json, json_problem, json_size, merge_patch
from .protocol import check_message_id, parse_fence
from .store import FenceMoved, StateCatchUp, StateConflict, StateTooLarge

if TYPE_CHECKING:
    from .contracts import Conn, Handler
    from .hub import Hub

# Holds the user's task lock while a write for (task, epoch) happens; refuses a stale epoch (tasks.py).
Fence = Callable[["Conn", str, int], AbstractAsyncContextManager[None]]


KEEP_CHANGES = 1000  # changes kept per durable document for catch-up
MAX_DOC_NAME_CHARS = 256
MAX_SUBSCRIPTIONS = 256  # per connection
LIVE_RECENT_PATCH_IDS = 100  # per live document, for retries
CHANGES = "state.changed"  # the broker channel of committed changes

# a subscription: ("doc", name) or ("prefix", prefix)
SubKey = tuple[str, str]


@dataclass
class _Subscription:
    key: SubKey
    ready: bool = False
    buffer: list[tuple[str, int, dict[str, Any]]] = field(default_factory=list)  # (doc, rev, envelope)

    def matches(self, doc: str) -> bool:
        kind, name = self.key
        return doc == name if kind == "doc" else doc.startswith(name)


@dataclass
class _LiveDoc:
    owner: Conn | None  # the connection that wrote it last; None once removed (a tombstone)
    rev: int = 0
    value: Any = None
    recent: collections.deque[tuple[str, str | int, str, int]] = field(
        default_factory=lambda: collections.deque(maxlen=LIVE_RECENT_PATCH_IDS))  # (by, id, patch text, rev)


class State:
    """The subscriptions and live documents of one node, and the ``state.*`` ops."""

    def __init__(self, hub: Hub, fence: Fence):
        self.hub = hub
        self.fence = fence
        self.subscriptions: dict[str, dict[Conn, dict[SubKey, _Subscription]]] = {}  # user -> connection -> ..
        self.live: dict[str, dict[str, _LiveDoc]] = {}  # user -> live document name -> document or tombstone
        self.ops: dict[str, Handler] = {
            "state.get": functools.partial(op_get, self),
            "state.patch": functools.partial(op_patch, self),
            "state.subscribe": functools.partial(op_subscribe, self),
            "state.unsubscribe": functools.partial(op_unsubscribe, self),
        }

    def on_close(self, session: Conn) -> None:
        on_closed(self, session)

    def notify(self, user: str, doc: str, rev: int, envelope: dict[str, Any], live_value: Any = None) -> None:
        """A committed change goes to every node (the broker's ``CHANGES`` channel): ``on_change`` there.
        A ``live/`` document's change carries its whole new value: the other nodes keep a copy of it."""
        change: tuple[Any, ...] = (user, doc, rev, envelope)
        if _is_live(doc):
            change += (live_value,)
        self.hub.broker.publish(CHANGES, change)

    def on_change(self, change: tuple[Any, ...]) -> None:
        """Send a committed change to every connection of its user subscribed to its document (once each)."""
        user, doc, rev, envelope = change[:4]
        if len(change) == 5:
            self._mirror(user, doc, rev, change[4])
        for session, subs in list(self.subscriptions.get(user, {}).items()):
            matching = [sub for sub in subs.values() if sub.matches(doc)]
            if not matching:
                continue
            if any(sub.ready for sub in matching):
                session.send_control(dict(envelope))
            else:
                for sub in matching:
                    sub.buffer.append((doc, rev, envelope))

    def _mirror(self, user: str, doc: str, rev: int, value: Any) -> None:
        """Several nodes: the copy of another node's ``live/`` document follows its changes (this node's own
        changes come back here too, at a revision it already has)."""
        docs = self.live.setdefault(user, {})
        live = docs.get(doc)
        if live is None:
            live = docs[doc] = _LiveDoc(owner=None)
        elif rev <= live.rev:
            return
        live.rev = rev
        live.value = value
        live.owner = None  # written elsewhere last: no connection of this node removes it when it ends
        live.recent.clear()

    def on_device_gone(self, user: str, device: str) -> None:
        """Several nodes: the node holding ``device`` died, and this node speaks for it: the device's
        ``live/`` documents go, as they would have when its connection ended."""
        prefix = f"live/{device}/"
        for name, live in sorted(self.live.get(user, {}).items()):
            if name.startswith(prefix) and live.value is not None:
                _remove_live(self, user, name, live, device)

    def drop(self, session: Conn) -> None:
        by_session = self.subscriptions.get(session.user or "")
        if by_session is not None:
            by_session.pop(session, None)
            if not by_session:
                del self.subscriptions[session.user or ""]


# ---- parsing --------------------------------------------------------------


def _doc_name(header: dict[str, Any], field_name: str = "doc") -> str:
    name = header.get(field_name)
    if not isinstance(name, str) or not name:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{field_name}' must be a document name string")
    if len(name) > MAX_DOC_NAME_CHARS:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"'{field_name}' is longer than {MAX_DOC_NAME_CHARS} characters")
    kind, _, rest = name.partition("/")
    if kind == "user" and rest:
        return name
    if kind in ("device", "live"):
        device, _, local = rest.partition("/")
        if device and local:
            return name
    raise ProtocolError(ErrorCode.BAD_REQUEST, f"document name {name[:64]!r} must be user/<name>, "
                                               "device/<device id>/<name> or live/<device id>/<name>")


def _writer_of(name: str) -> str | None:
    """The only device that may write ``name``, or None for ``user/`` documents."""
    kind, _, rest = name.partition("/")
    return None if kind == "user" else rest.partition("/")[0]


def _is_live(name: str) -> bool:
    return name.startswith("live/")


def _revision(header: dict[str, Any], field_name: str) -> int | None:
    value = header.get(field_name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < 2**63:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{field_name}' must be a revision: an integer >= 0")
    return value


def _changed(doc: str, rev: int, patch: Any, by: str) -> dict[str, Any]:
    return {"op": "state.changed", "doc": doc, "rev": rev, "prev_rev": rev - 1, "patch": patch, "by": by}


def _snapshot(doc: str, rev: int, value: Any) -> dict[str, Any]:
    return {"op": "state", "doc": doc, "rev": rev, "value": value}


def _run(session: Conn, header: dict[str, Any], work: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Background work that needs the store; its refusals become the request's error."""
    async def run() -> None:
        try:
            await work()
        except StateConflict as exc:
            raise ProtocolError(ErrorCode.CONFLICT, str(exc), rev=exc.rev, value=exc.value) from None
        except StateTooLarge as exc:
            raise ProtocolError(ErrorCode.TOO_LARGE, str(exc), limit=exc.limit, max=exc.max_bytes,
                                size=exc.size) from None

    session.run_request(header, run)


# ---- ops --------------------------------------------------------------------


def op_get(state: State, session: Conn, header: dict[str, Any]) -> None:
    user = session.user
    assert user is not None
    doc = _doc_name(header)
    if _is_live(doc):
        live = state.live.get(user, {}).get(doc)
        rev, value = (0, None) if live is None else (live.rev, live.value)
        session.reply(header, _snapshot(doc, rev, value))
        return

    async def work() -> None:
        stored = await state.hub.store.get_state(user, doc)
        session.reply(header, _snapshot(doc, stored.rev, stored.value))

    _run(session, header, work)


def op_patch(state: State, session: Conn, header: dict[str, Any]) -> None:
    user, device = session.user, session.device
    assert user is not None and device is not None
    patch_id = check_message_id(header.get("id"))
    doc = _doc_name(header)
    if "patch" not in header:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'patch' is required: a JSON merge patch (null deletes)")
    patch = header["patch"]
    problem = json_problem(patch)
    if problem is not None:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"malformed patch: {problem}")
    if_rev = _revision(header, "if_rev")
    writer = _writer_of(doc)
    if writer is not None and writer != device:
        raise ProtocolError(ErrorCode.FORBIDDEN, f"{doc[:64]!r} is written only by device {writer!r}")
    fence = parse_fence(header)
    hub = state.hub
    settings = hub.settings
    if _is_live(doc):
        if fence is None:
            _patch_live(state, session, header, user, device, doc, patch, patch_id, if_rev)
            return

        async def fenced_live() -> None:
            async with state.fence(session, *fence):
                _patch_live(state, session, header, user, device, doc, patch, patch_id, if_rev)

        _run(session, header, fenced_live)
        return

    async def work() -> None:
        try:
            # The fence is checked twice: here, in order with this node's task ops (a handoff's steps), and in
            # the store's transaction with the write (a lease changed through another node in between).
            async with state.fence(session, *fence) if fence is not None else contextlib.nullcontext():
                outcome = await hub.store.patch_state(user, doc, patch, device, patch_id, if_rev, now_ms(),
                                                      settings.state_max_doc_bytes, settings.state_max_user_bytes,
                                                      KEEP_CHANGES, fence=fence)
        except FenceMoved:
            assert fence is not None
            async with state.fence(session, *fence):  # reads the lease as it is now: its refusal says why
                pass
            raise ProtocolError(ErrorCode.STALE_EPOCH, f"epoch {fence[1]} of task {fence[0][:64]!r} is stale",
                                task=fence[0]) from None
        session.reply(header, {"op": "state.ok", "doc": doc, "rev": outcome.rev, "prev_rev": outcome.prev_rev,
                               "noop": outcome.noop})
        change = outcome.change
        if change is not None:
            state.notify(user, doc, change.rev, _changed(doc, change.rev, change.patch, change.by))

    _run(session, header, work)


def _patch_live(state: State, session: Conn, header: dict[str, Any], user: str, device: str, doc: str,
                patch: Any, patch_id: str | int, if_rev: int | None) -> None:
    docs = state.live.setdefault(user, {})
    live = docs.get(doc)
    patch_text = canonical_json(patch)
    if live is not None:
        for by, earlier_id, text, rev in live.recent:
            if by == device and earlier_id == patch_id and type(earlier_id) is type(patch_id) and text == patch_text:
                session.reply(header, {"op": "state.ok", "doc": doc, "rev": rev, "prev_rev": rev - 1, "noop": False})
                return
    rev, value = (0, None) if live is None else (live.rev, live.value)
    if if_rev is not None and if_rev != rev:
        session.send_error(ErrorCode.CONFLICT, f"the document is at revision {rev}", header.get("id"),
                           rev=rev, value=value)
        return
    merged = merge_patch(value, patch)
    if canonical_json(merged) == canonical_json(value):
        session.reply(header, {"op": "state.ok", "doc": doc, "rev": rev, "prev_rev": rev, "noop": True})
        return
    size, limit = json_size(merged), state.hub.settings.state_max_doc_bytes
    if size > limit and size > json_size(value):
        session.send_error(ErrorCode.TOO_LARGE, f"state_max_doc_bytes is {limit} bytes; the result would be "
                           f"{size} bytes", header.get("id"), limit="state_max_doc_bytes", max=limit, size=size)
        return
    if live is None:
        live = docs[doc] = _LiveDoc(owner=session)
    live.rev += 1
    live.value = merged
    live.owner = session if merged is not None else None
    live.recent.append((device, patch_id, patch_text, live.rev))
    session.reply(header, {"op": "state.ok", "doc": doc, "rev": live.rev, "prev_rev": live.rev - 1, "noop": False})
    state.notify(user, doc, live.rev, _changed(doc, live.rev, patch, device), merged)


def op_subscribe(state: State, session: Conn, header: dict[str, Any]) -> None:
    user = session.user
    assert user is not None
    since: dict[str, int] = {}
    if "doc" in header and "prefix" in header:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "give 'doc' or 'prefix', not both")
    if "prefix" in header:
        prefix = header["prefix"]
        if not isinstance(prefix, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'prefix' must be a string")
        if len(prefix) > MAX_DOC_NAME_CHARS:
            raise ProtocolError(ErrorCode.TOO_LARGE, f"'prefix' is longer than {MAX_DOC_NAME_CHARS} characters")
        key: SubKey = ("prefix", prefix)
        given = header.get("since")
        if given is not None:
            if not isinstance(given, dict):
                raise ProtocolError(ErrorCode.BAD_REQUEST, "'since' of a prefix subscription must map document "
                                                           "names to revisions")
            for name, rev in given.items():
                if not isinstance(name, str) or _revision({"since": rev}, "since") is None:
                    raise ProtocolError(ErrorCode.BAD_REQUEST, "'since' must map document names to revisions")
                since[name] = rev
    else:
        doc = _doc_name(header)
        key = ("doc", doc)
        rev = _revision(header, "since")
        if rev is not None:
            since[doc] = rev
    subs = state.subscriptions.setdefault(user, {}).setdefault(session, {})
    if key not in subs and len(subs) >= MAX_SUBSCRIPTIONS:
        raise ProtocolError(ErrorCode.TOO_LARGE, f"more than {MAX_SUBSCRIPTIONS} subscriptions on one connection")
    sub = subs[key] = _Subscription(key)  # a repeated subscribe starts over
    kind, name = key
    needs_store = not (_is_live(name) if kind == "doc" else name.startswith("live/"))

    async def work() -> None:
        caught: list[StateCatchUp] = []
        if needs_store:
            store = state.hub.store
            caught = await (store.state_catch_up(user, since, doc=name) if kind == "doc"
                            else store.state_catch_up(user, since, prefix=name))
        if state.subscriptions.get(user, {}).get(session, {}).get(key) is not sub:
            return  # unsubscribed, subscribed again, or the connection ended meanwhile
        covered: dict[str, int] = {}
        for item in caught:
            doc_name = item.doc.name
            covered[doc_name] = item.doc.rev
            if item.changes is None:
                session.send_control(_snapshot(doc_name, item.doc.rev, item.doc.value))
            else:
                for change in item.changes:
                    session.send_control(_changed(doc_name, change.rev, change.patch, change.by))
        for doc_name, live in sorted(state.live.get(user, {}).items()):
            if not sub.matches(doc_name) or (live.value is None and doc_name not in since):
                continue
            covered[doc_name] = live.rev
            if since.get(doc_name) != live.rev:
                session.send_control(_snapshot(doc_name, live.rev, live.value))
        if kind == "doc" and not needs_store and name not in covered:
            covered[name] = 0
            if since.get(name) != 0:
                session.send_control(_snapshot(name, 0, None))
        sub.ready = True
        session.reply(header, {"op": "state.subscribed", kind: name})
        buffered, sub.buffer = sub.buffer, []
        for doc_name, rev, envelope in buffered:
            if rev > covered.get(doc_name, 0):
                session.send_control(dict(envelope))

    _run(session, header, work)


def op_unsubscribe(state: State, session: Conn, header: dict[str, Any]) -> None:
    user = session.user
    assert user is not None
    if "prefix" in header:
        prefix = header["prefix"]
        if not isinstance(prefix, str):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'prefix' must be a string")
        key: SubKey = ("prefix", prefix)
    else:
        key = ("doc", _doc_name(header))
    subs = state.subscriptions.get(user, {}).get(session)
    if subs is not None:
        subs.pop(key, None)
        if not subs:
            state.drop(session)
    session.reply(header, {"op": "ok"})


def on_closed(state: State, session: Conn) -> None:
    """A connection ended: its subscriptions end, its ``live/`` documents go away."""
    if session.user is None:
        return
    state.drop(session)
    docs = state.live.get(session.user)
    if not docs:
        return
    device = session.device or ""
    for name, live in sorted(docs.items()):
        if live.owner is session:
            _remove_live(state, session.user, name, live, device)


def _remove_live(state: State, user: str, name: str, live: _LiveDoc, device: str) -> None:
    live.owner = None
    live.value = None
    live.rev += 1
    live.recent.clear()
    state.notify(user, name, live.rev, _changed(name, live.rev, None, device))
