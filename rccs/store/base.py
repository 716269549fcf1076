"""The persistence seam: what rccs keeps across restarts, behind one narrow async interface.

Implementations: ``MemoryStore`` (tests, ephemeral servers) and ``SqliteStore``
(the embedded default, ``<data_dir>/rccs.db``). A Redis store for many nodes
comes later, so the interface speaks in records, never in SQL, and every
method is one atomic step.

Times are integer milliseconds since the epoch. Records are plain dataclasses;
a store never hands out objects it keeps (callers may mutate what they get).

Change feed: operations an operator may run from another process (add or
remove a user, change or revoke a device, revoke a session) append a
``Change``; a running server polls ``changes_since`` and reconciles, which is
how ``rccs devices revoke`` reaches a live connection. High-rate writes the
server makes itself (presence, session counters) append nothing.
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import dataclasses
import urllib.parse
from collections.abc import Mapping, Sequence
from typing import Any

import msgpack

from ..mergepatch import canonical_json, json_size, merge_patch

STATUS_ONLINE = "online"
STATUS_AWAY = "away"
STATUS_OFFLINE = "offline"
STATUSES = (STATUS_ONLINE, STATUS_AWAY, STATUS_OFFLINE)

REDIS_URL_SCHEMES = ("redis", "rediss")

CHANGE_USER = "user"
CHANGE_DEVICE = "device"
CHANGE_SESSION = "session"


class StoreError(Exception):
    """The store cannot do what was asked (e.g. a unique id is taken)."""


class AlreadyExists(StoreError):
    """A record with this id exists already (users, pairing codes)."""


class DeviceRefused(StoreError):
    """``put_device`` refused the record (its user is unknown, the device is revoked, or its credential is
    another device's): the store answered, unlike a plain StoreError, which may mean it could not be reached."""


class TaskRaced(StoreError):
    """``put_task(..., if_unchanged=True)``: the stored lease is no longer the one the caller read (another
    node changed it meanwhile); nothing was written."""


@dataclasses.dataclass
class UserRecord:
    id: str
    created: int


@dataclasses.dataclass
class DeviceRecord:
    id: str
    user: str
    type: str
    name: str = ""
    platform: str = ""
    version: str = ""
    capabilities: tuple[str, ...] = ()
    metadata: dict[str, Any] = dataclasses.field(default_factory=dict)  # JSON-compatible values
    created: int = 0
    last_seen: int = 0
    status: str = STATUS_OFFLINE
    credential_hash: str | None = None  # hex SHA-256 of the device credential's secret
    revoked_at: int | None = None  # set once, never cleared: a revoked device id stays dead


@dataclasses.dataclass
class PendingMessage:
    """A message written to a session that its device has not acked yet (redelivered on resume)."""

    seq: int
    sender_user: str
    sender_device: str
    msg_id: str | int
    frame: bytes  # the whole envelope as it was sent
    text: bool  # True: JSON text frame; False: msgpack binary frame


@dataclasses.dataclass
class SessionRecord:
    id: str
    user: str
    device: str
    created: int
    expires_at: int  # the session's authentication ends here unless refreshed
    next_seq: int = 1
    last_activity: int = 0
    connected_at: int | None = None  # start of the current connection; None while disconnected
    disconnected_at: int | None = None  # end of the last connection (resumable until + grace)
    revoked_at: int | None = None
    connected_ms: int = 0  # total connected time of finished connections
    messages_in: int = 0
    messages_out: int = 0
    bytes_in: int = 0
    bytes_out: int = 0
    pending: list[PendingMessage] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class PairingCode:
    id: str  # the public lookup half of the code
    secret_hash: str  # hex SHA-256 of the secret half
    user: str
    issuer_device: str | None  # None when made by the CLI
    created: int
    expires_at: int
    approve: bool  # the issuer must approve the new device before it gets a credential
    attempts: int = 0  # wrong secrets tried against this code
    used_at: int | None = None


PRIORITY_LOW = 0
PRIORITY_NORMAL = 1
PRIORITY_HIGH = 2
PRIORITY_URGENT = 3
PRIORITY_EMERGENCY = 4
PRIORITY_NAMES = ("LOW", "NORMAL", "HIGH", "URGENT", "EMERGENCY")
OVERFLOW_REJECT = "reject"  # a full inbox refuses the new message
OVERFLOW_DROP_OLDEST = "drop_oldest"  # a full inbox drops its oldest message of the lowest priority present


@dataclasses.dataclass
class QueuedMessage:
    """A message in a device's durable inbox, waiting to be delivered and acked."""

    device: str  # the target device
    user: str  # the user of both ends
    sender_device: str
    msg_id: str | int  # the sender's id
    type: str
    body: bytes  # the body, msgpack-encoded (as a msgpack sender sent it)
    ts: int  # when the server accepted it
    priority: int = PRIORITY_NORMAL  # 0 (LOW) .. 4 (EMERGENCY)
    expires_at: int | None = None  # never delivered after this
    receipt: bool = False  # the sender asked for receipts
    attempts: int = 0  # deliveries so far that were not acked
    id: int = 0  # assigned by the store: increasing, unique across the store, never reused
    # Several nodes: a pick-one message that moves on from this device if it does not ack in time
    # (``messaging.stored_work``: selector, order, devices tried). Kept by the stores nodes share (Redis)
    # and by the memory store; SQLite serves one node, where the sender's node moves it itself.
    work: list[Any] | None = None

    @property
    def size(self) -> int:
        """What the message costs against an inbox's byte cap."""
        plan = len(str(self.work)) if self.work is not None else 0  # a pick-one plan (up to 256 device ids)
        return len(self.body) + len(self.type) + len(str(self.msg_id)) + len(self.sender_device) + plan


@dataclasses.dataclass
class EnqueueOutcome:
    stored: list[QueuedMessage]  # with ``id`` set, in the order given
    rejected: list[QueuedMessage]  # the target's inbox was full (policy reject)
    dropped: list[QueuedMessage]  # removed from inboxes to make room (policy drop_oldest)
    # With ``IdMemory`` (stores shared by several nodes): not stored, their sender used the id recently,
    # with the same body (a repeat) or another one.
    repeated: list[QueuedMessage] = dataclasses.field(default_factory=list)
    conflicting: list[QueuedMessage] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class IdMemory:
    """How a store shared by several nodes remembers the ids of new sends per sender device (protocol.md
    section 12, idempotency): for ``window_ms`` before ``now``, at most ``per_sender`` ids. ``checked`` says,
    for each message of the batch, whether it is a new send (True) or one already taken that moves to an
    inbox (its session ended): only new sends are checked and remembered."""
    now: int
    window_ms: int
    per_sender: int
    checked: Sequence[bool]


@dataclasses.dataclass
class DeadLetter:
    message: QueuedMessage
    reason: str  # e.g. "undeliverable"
    at: int


@dataclasses.dataclass(frozen=True)
class Change:
    seq: int
    kind: str  # CHANGE_USER, CHANGE_DEVICE or CHANGE_SESSION
    key: str  # the user, device or session id


@dataclasses.dataclass
class StateDoc:
    """A durable state document. ``value`` None: deleted, or never written (``rev`` 0). A deleted document
    keeps its ``rev`` (a tombstone), so revisions never go backwards across delete and re-create."""

    user: str
    name: str
    rev: int = 0
    value: Any = None  # a JSON value
    by: str = ""  # the device that made the last change
    updated: int = 0  # ms of the last change


@dataclasses.dataclass
class StateChange:
    """One change of a document, kept in its change log (the newest ``keep_changes`` per document)."""

    user: str
    doc: str
    rev: int
    prev_rev: int
    patch: Any  # the merge patch as applied
    by: str  # the device that sent it
    patch_id: str | int | None  # the id of its ``state.patch`` (a retry with the same id is applied once)
    at: int


@dataclasses.dataclass
class StatePatched:
    """What ``patch_state`` did: ``change`` None when nothing changed (``noop``) or for a retry
    (``duplicate``: the patch with this id was applied before, ``rev`` is what it made then)."""

    doc: StateDoc
    rev: int
    prev_rev: int
    noop: bool = False
    duplicate: bool = False
    change: StateChange | None = None


@dataclasses.dataclass
class StateCatchUp:
    """One document of ``state_catch_up``: ``changes`` after the caller's revision (oldest first), or None
    when the caller needs the whole ``doc`` (no revision given, older than the change log, or newer than
    the document)."""

    doc: StateDoc
    changes: list[StateChange] | None


class FenceMoved(StoreError):
    """``patch_state(..., fence=(task, epoch))``: the writer no longer holds ``task`` at ``epoch`` (another
    device took it, or a handoff moved it, since the caller checked); nothing was written."""


class StateConflict(StoreError):
    """``if_rev`` is not the document's revision: the current revision and value come with it."""

    def __init__(self, rev: int, value: Any):
        super().__init__(f"the document is at revision {rev}")
        self.rev = rev
        self.value = value


class StateTooLarge(StoreError):
    """The merged document, or the user's documents with it, would exceed a limit."""

    def __init__(self, limit: str, max_bytes: int, size: int):
        super().__init__(f"{limit} is {max_bytes} bytes; the result would be {size} bytes")
        self.limit = limit
        self.max_bytes = max_bytes
        self.size = size


@dataclasses.dataclass(frozen=True)
class OpenHandoff:
    """A handoff that holds a task while it is open, as every node of a cluster sees it: its ``id`` (which
    names the node coordinating it), the ``stage`` it is at, and ``until`` (ms since the epoch) when it stops
    holding the task if its node has not ended it by then (that node died)."""

    id: str
    stage: str
    until: int


@dataclasses.dataclass
class TaskLease:
    """Who owns a task (docs/protocol.md section 15). ``epoch`` is the fencing token: it grows by one with every
    new owner and never goes back, so the record is kept after a release (``owner`` None) for as long as the
    user exists. ``handoff``: the handoff that gave ``owner`` the lease, until the owner has used it (its
    ``handoff.committed`` is sent again after each of its hellos until then). ``open_handoff``: several nodes
    only, the handoff of the task open now (one node keeps its handoffs in memory; a store that serves one
    process need not keep it)."""

    user: str
    task: str
    owner: str | None  # the device, None once released
    epoch: int
    expires: int  # ms since the epoch; 0 once released
    handoff: str | None = None
    updated: int = 0
    open_handoff: OpenHandoff | None = None


class Store(abc.ABC):
    """Persistent users, devices, sessions and pairing codes. Safe to call from one event loop."""

    shared_by_nodes = False  # True for a store several server processes use at once (Redis)

    @abc.abstractmethod
    async def open(self) -> None:
        """Create or migrate what the store needs. Called once before any other method."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Finish pending writes and release resources."""

    # ---- users -------------------------------------------------------

    @abc.abstractmethod
    async def add_user(self, user: UserRecord) -> None:
        """Create a user; AlreadyExists if the id is taken. Appends a user change."""

    @abc.abstractmethod
    async def get_user(self, user_id: str) -> UserRecord | None: ...

    @abc.abstractmethod
    async def list_users(self) -> list[UserRecord]:
        """All users, ordered by id."""

    @abc.abstractmethod
    async def remove_user(self, user_id: str, now: int) -> bool:
        """Delete a user: its devices are revoked (kept as tombstones), its sessions, pairing codes,
        state documents (with their change logs) and task leases deleted. False if there was no such
        user. Appends a user change and a device change per revoked device."""

    # ---- devices -----------------------------------------------------

    @abc.abstractmethod
    async def put_device(self, device: DeviceRecord) -> None:
        """Insert or replace a device (its user must exist, else StoreError, unless the record given is
        revoked: a tombstone, as a removed user leaves behind). Appends a device change. A revoked device
        cannot be replaced (StoreError)."""

    async def register(self, users: Sequence[UserRecord], devices: Sequence[DeviceRecord]) -> None:
        """Add the users that do not exist yet (an existing one is left as it is), then put the devices:
        what ``add_user`` and ``put_device`` one by one do, for the hellos of one loop turn. A store may do
        it in one transaction. A device refused by ``put_device`` does not keep the others out: the first
        refusal is raised after the rest are stored."""
        for user in users:
            with contextlib.suppress(AlreadyExists):
                await self.add_user(user)
        refusal: StoreError | None = None
        for device in devices:
            try:
                await self.put_device(device)
            except StoreError as exc:
                refusal = refusal or exc
        if refusal is not None:
            raise refusal

    @abc.abstractmethod
    async def get_device(self, device_id: str) -> DeviceRecord | None:
        """The device, also when revoked."""

    @abc.abstractmethod
    async def list_devices(self, user_id: str | None = None, include_revoked: bool = False) -> list[DeviceRecord]:
        """Devices of one user (or all users), ordered by (user, created, id)."""

    @abc.abstractmethod
    async def find_device_by_credential(self, credential_hash: str) -> DeviceRecord | None:
        """The non-revoked device whose credential hashes to ``credential_hash``."""

    @abc.abstractmethod
    async def revoke_device(self, device_id: str, now: int) -> bool:
        """Mark revoked, drop its credential, revoke its sessions. False if unknown or already
        revoked. Appends a device change and a session change per revoked session."""

    @abc.abstractmethod
    async def update_presence(self, updates: Sequence[tuple[str, str, int]]) -> None:
        """Batch of (device id, status, last_seen); unknown or revoked devices are skipped.
        No change is appended."""

    # ---- sessions ----------------------------------------------------

    @abc.abstractmethod
    async def put_sessions(self, sessions: Sequence[SessionRecord]) -> None:
        """Insert or replace sessions, in one transaction. A revoked session stays revoked (its
        ``revoked_at`` is kept even if the record given has None). Sessions of a revoked device are
        skipped (a removed user's sessions must not come back from a late write). No change is appended."""

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> SessionRecord | None: ...

    @abc.abstractmethod
    async def list_sessions(self, user_id: str | None = None, device_id: str | None = None) -> list[SessionRecord]:
        """Sessions (revoked ones included), ordered by (user, device, created, id)."""

    @abc.abstractmethod
    async def revoke_session(self, session_id: str, now: int) -> bool:
        """False if unknown or already revoked. Appends a session change."""

    @abc.abstractmethod
    async def delete_stale_sessions(self, now: int, grace_ms: int) -> int:
        """Delete every session ``session_is_stale(session, now, grace_ms)``. Returns how many."""

    @abc.abstractmethod
    async def reset_live_state(self, now: int) -> None:
        """At server start: whatever a previous run left connected is not. Devices that are
        ``online``/``away`` become ``offline`` (``last_seen`` kept); connected sessions become
        disconnected at their ``last_activity`` (or ``now`` if none), their connected time added
        to ``connected_ms``. No change is appended."""

    # ---- pairing -----------------------------------------------------

    @abc.abstractmethod
    async def add_pairing_code(self, code: PairingCode) -> None:
        """AlreadyExists if a code with this id exists (used or not)."""

    @abc.abstractmethod
    async def redeem_pairing_code(self, code_id: str, secret_hash: str, now: int,
                                  max_attempts: int) -> PairingCode | None:
        """Atomically use a code: returns it (now marked used) if the id exists, the secret matches,
        it is unused and unexpired and has fewer than ``max_attempts`` wrong tries. A wrong secret
        counts an attempt. Anything else returns None and changes nothing else."""

    @abc.abstractmethod
    async def delete_pairing_codes_before(self, cutoff: int) -> int:
        """Delete codes that expired before ``cutoff``. Returns how many."""

    @abc.abstractmethod
    async def list_pairing_codes(self) -> list[PairingCode]:
        """Every pairing code kept (used, expired and burnt ones too, until deleted), ordered by id."""

    # ---- durable inboxes ----------------------------------------------

    @abc.abstractmethod
    async def enqueue(self, messages: Sequence[QueuedMessage], max_count: int, max_bytes: int,
                      policy: str, ids: IdMemory | None = None) -> EnqueueOutcome:
        """Add messages to their targets' inboxes in ONE transaction (group commit), in order.

        ``ids``: a store that several nodes share (Redis) checks and remembers the senders' ids in the same
        step, so that a repeat sent through another node is caught (``repeated``/``conflicting``); a store
        of one node ignores it (the node remembers ids in memory: ``inbox.Deliveries.first_time``).

        Each inbox holds at most ``max_count`` messages and ``max_bytes`` (sum of ``size``). A message
        that does not fit: with OVERFLOW_REJECT it is not stored (``rejected``); with
        OVERFLOW_DROP_OLDEST the inbox's oldest message of its lowest priority is removed (``dropped``)
        until it fits; a message alone larger than ``max_bytes`` is rejected under either policy.
        Messages of revoked devices are rejected. No change is appended."""

    @abc.abstractmethod
    async def inbox(self, device_id: str, now: int, limit: int = 1000) -> list[QueuedMessage]:
        """Unexpired messages of one device in delivery order: priority high to low, then ``id``."""

    @abc.abstractmethod
    async def inbox_size(self, device_id: str) -> tuple[int, int]:
        """(count, bytes) of a device's inbox, expired messages included until removed."""

    @abc.abstractmethod
    async def remove_queued(self, ids: Sequence[int]) -> list[QueuedMessage]:
        """Delete messages (acked); returns the ones that existed."""

    @abc.abstractmethod
    async def count_attempts(self, ids: Sequence[int]) -> None:
        """Add one to ``attempts`` of each message (a delivery that was not acked in time)."""

    @abc.abstractmethod
    async def take_expired(self, now: int, limit: int = 1000) -> list[QueuedMessage]:
        """Delete and return messages whose ``expires_at <= now``, oldest ``id`` first."""

    @abc.abstractmethod
    async def dead_letter(self, ids: Sequence[int], reason: str, now: int) -> list[QueuedMessage]:
        """Move messages from inboxes to the dead letters; returns the ones moved."""

    @abc.abstractmethod
    async def dead_letters(self, user_id: str | None = None, device_id: str | None = None,
                           limit: int = 1000) -> list[DeadLetter]:
        """Dead letters, oldest ``id`` first, of one device, one user or all."""

    @abc.abstractmethod
    async def redrive(self, ids: Sequence[int] | None = None, device_id: str | None = None) -> list[QueuedMessage]:
        """Move dead letters (these ids, or all of one device, or all) back to their inboxes with
        ``attempts`` 0, keeping their ids; caps are not applied. Returns them."""

    @abc.abstractmethod
    async def purge(self, device_id: str, dead_letters: bool = False) -> int:
        """Delete a device's whole inbox (or its dead letters). Returns how many."""

    # ---- receipts for offline senders ----------------------------------

    @abc.abstractmethod
    async def add_receipts(self, receipts: Sequence[tuple[str, dict[str, Any]]]) -> None:
        """Keep receipts (device id, receipt envelope: msgpack-compatible) for senders that are offline."""

    @abc.abstractmethod
    async def take_receipts(self, device_id: str, limit: int = 10000) -> list[dict[str, Any]]:
        """Delete and return a device's kept receipts, oldest first."""

    @abc.abstractmethod
    async def devices_with_kept_receipts(self) -> list[str]:
        """The devices that have kept receipts now, sorted (nodes of a cluster look for the ones they hold,
        in case a doorbell was lost)."""

    async def welcome_reads(self, device_ids: Sequence[str], now: int,
                            limit: int) -> list[tuple[list[dict[str, Any]], list[QueuedMessage]]]:
        """What the hellos of one loop turn read, per device in order: its kept receipts, taken as
        ``take_receipts`` takes them, then the first ``limit`` messages of its inbox (``inbox``). A store may
        answer all of them in one round trip (this default asks for all at once: one pipeline on Redis).
        Raises only before anything was taken: a device whose receipts could not be taken gets none now (they
        stay in the store for its next look)."""
        pages = await asyncio.gather(*(self.inbox(device_id, now, limit) for device_id in device_ids))
        taken = await asyncio.gather(*(self.take_receipts(device_id) for device_id in device_ids),
                                     return_exceptions=True)
        for outcome in taken:
            if isinstance(outcome, BaseException) and not isinstance(outcome, StoreError):
                raise outcome  # a bug, not the store: loud
        return [([] if isinstance(receipts, BaseException) else receipts, page)
                for receipts, page in zip(taken, pages, strict=True)]

    @abc.abstractmethod
    async def kept_receipts(self, device_id: str) -> list[dict[str, Any]]:
        """A device's kept receipts, oldest first, left where they are (``rccs store copy`` reads the source)."""

    # ---- idempotency keys --------------------------------------------

    async def remember_sends(self, sends: Sequence[tuple[str, str, str | int, bytes]],
                             ids: IdMemory) -> list[str | None]:
        """For sends that keep nothing in an inbox (``first_ack``): check and remember each (user, sender
        device, message id, msgpack body) as ``enqueue`` does with ``ids``, in one atomic step. Returns a
        verdict per send: None (new, remembered now), ``"duplicate"`` (the same body within the window) or
        ``"conflict"`` (another body). A store that is not ``shared_by_nodes`` has no other node to
        remember them for (the node's own memory catches repeats): every send is new."""
        return [None] * len(sends)


    @abc.abstractmethod
    async def save_message_ids(self, entries: Sequence[tuple[str, str | int, int, int]]) -> None:
        """Replace the remembered message ids: (sender device, message id, time ms, body digest). A store
        ``shared_by_nodes`` adds them instead (each node saves its own at its shutdown; the same device
        and id again replaces that one entry)."""

    @abc.abstractmethod
    async def load_message_ids(self, since: int) -> list[tuple[str, str | int, int, int]]:
        """The remembered message ids with time >= ``since``, oldest first."""

    # ---- state documents -----------------------------------------------

    @abc.abstractmethod
    async def get_state(self, user_id: str, doc: str) -> StateDoc:
        """The document (``rev`` 0, ``value`` None if it was never written)."""

    @abc.abstractmethod
    async def patch_state(self, user_id: str, doc: str, patch: Any, by: str, patch_id: str | int | None,
                          if_rev: int | None, now: int, max_doc_bytes: int, max_user_bytes: int,
                          keep_changes: int, fence: tuple[str, int] | None = None) -> StatePatched:
        """Apply an RFC 7396 merge patch (JSON values only, else StoreError) in one transaction, following
        ``plan_state_patch``. A change gets ``rev`` = the old rev + 1, is appended to the document's change
        log, and the log is cut to the newest ``keep_changes``. A patch whose ``(by, patch_id)`` and patch
        equal a change still in the log is not applied again: it returns that change's revisions with
        ``duplicate`` set. ``fence`` (task, epoch): written only if ``by`` holds that task's lease at that
        epoch in the same transaction (``holds_fence``), else FenceMoved. Raises StateConflict /
        StateTooLarge / FenceMoved and changes nothing then."""

    @abc.abstractmethod
    async def list_state(self, user_id: str) -> list[tuple[StateDoc, list[StateChange]]]:
        """Every document of the user, deleted ones (tombstones) included, with its change log (oldest first);
        ordered by name."""

    @abc.abstractmethod
    async def restore_state(self, doc: StateDoc, changes: Sequence[StateChange]) -> None:
        """Write a document as it is given (revision, value or tombstone, ``by``, ``updated``) with this change
        log (oldest first), replacing the document and its log: how ``rccs store copy`` moves documents
        without changing their revisions. The caller keeps the revisions consistent (the log's newest is the
        document's ``rev``). No limit is applied and no change is appended."""

    @abc.abstractmethod
    async def state_catch_up(self, user_id: str, since: Mapping[str, int], doc: str | None = None,
                             prefix: str | None = None) -> list[StateCatchUp]:
        """In one read: the document ``doc`` (always, also when it does not exist), or every document of the
        user whose name starts with ``prefix`` and that exists, or is deleted but named in ``since``;
        ordered by name. ``since`` maps document names to the revision the caller has (see StateCatchUp)."""

    # ---- task leases -------------------------------------------------

    @abc.abstractmethod
    async def load_tasks(self, user_id: str) -> list[TaskLease]:
        """Every task lease of the user, released ones included, ordered by task name."""

    @abc.abstractmethod
    async def users_with_task_notices(self) -> list[str]:
        """The users that have a lease with ``handoff`` set (a committed notice not yet confirmed), sorted."""

    @abc.abstractmethod
    async def put_task(self, lease: TaskLease, if_unchanged: bool = False, previous: TaskLease | None = None) -> None:
        """Create or replace the lease of ``(lease.user, lease.task)``. StoreError for an unknown user. The
        caller serialises the changes of one user (the server holds one lock per user around each). With
        ``if_unchanged`` (several nodes, whose locks are their own), only if the stored lease is still
        ``previous`` (None: there is none; compared by owner, epoch, expires, handoff and updated), else
        TaskRaced and nothing is written."""

    # ---- change feed -------------------------------------------------

    @abc.abstractmethod
    async def changes_since(self, cursor: int, limit: int = 1000) -> list[Change]:
        """Changes with ``seq > cursor``, oldest first, at most ``limit``."""

    async def token_secret(self) -> bytes:
        """The token signing secret every process on this store shares, created by the first that asks (at
        once: two asking together get the same one). Only a store shared over the network has one (Redis);
        a local store's processes share the data directory's ``token.key`` instead."""
        raise StoreError(f"{type(self).__name__} keeps no token secret: it is in the data directory")

    async def adopt_token_secret(self, secret: bytes) -> bytes:
        """Make ``secret`` the store's token secret unless it has one already; returns the secret it has after
        the call (so the caller sees whether it was adopted). Only a store with ``token_secret`` has one: how
        ``rccs store copy`` keeps the dev tokens of a single node valid in a cluster."""
        raise StoreError(f"{type(self).__name__} keeps no token secret: it is in the data directory")

    @abc.abstractmethod
    async def last_change(self) -> int:
        """The newest change's seq (0 when none)."""


def holds_fence(lease: TaskLease | None, by: str, epoch: int) -> bool:
    """The rule every store applies to a fenced write: ``by`` owns the lease at exactly ``epoch`` (expired or
    not: nobody took the task since)."""
    return lease is not None and lease.owner == by and lease.epoch == epoch


def lease_fields(lease: TaskLease | None) -> tuple[str | None, int, int, str | None, int] | None:
    """What ``put_task(..., if_unchanged=True)`` compares of a lease."""
    return None if lease is None else (lease.owner, lease.epoch, lease.expires, lease.handoff, lease.updated)


def session_is_stale(session: SessionRecord, cutoff: int, grace_ms: int) -> bool:
    """The one rule every store uses for ``delete_stale_sessions``.

    A session is stale when it is not connected and either its authentication expired before
    ``cutoff``, it was revoked before ``cutoff``, or it disconnected more than ``grace_ms``
    before ``cutoff`` (no longer resumable).
    """
    if session.connected_at is not None:
        return False
    if session.expires_at < cutoff:
        return True
    if session.revoked_at is not None and session.revoked_at < cutoff:
        return True
    return session.disconnected_at is not None and session.disconnected_at + grace_ms < cutoff


def plan_state_patch(current: StateDoc, current_size: int, user_bytes: int, patch: Any, if_rev: int | None,
                     max_doc_bytes: int, max_user_bytes: int) -> tuple[Any, int] | None:
    """The one rule every store uses for ``patch_state``: the merged value and its size, or None for a
    patch that changes nothing. ``if_rev`` other than the current revision (also one in the future):
    StateConflict. Limits are measured on the merged document (``json_size``) and on the user's total
    (``user_bytes`` includes ``current_size``); a result over a limit is refused (StateTooLarge) unless it
    is no larger than the document was, so a patch that shrinks an oversized document is accepted."""
    if if_rev is not None and if_rev != current.rev:
        raise StateConflict(current.rev, current.value)
    merged = merge_patch(current.value, patch)
    if (merged is None) == (current.value is None) and canonical_json(merged) == canonical_json(current.value):
        return None
    size = json_size(merged)
    if size > current_size:
        if size > max_doc_bytes:
            raise StateTooLarge("state_max_doc_bytes", max_doc_bytes, size)
        total = user_bytes - current_size + size
        if total > max_user_bytes:
            raise StateTooLarge("state_max_user_bytes", max_user_bytes, total)
    return merged, size


def state_patch_text(patch: Any) -> str:
    """A patch as stores keep it; StoreError if it is not JSON."""
    try:
        return canonical_json(patch)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"the patch is not JSON: {exc}") from None


def check_policy(policy: str) -> None:
    """The overflow policies every store accepts."""
    if policy not in (OVERFLOW_REJECT, OVERFLOW_DROP_OLDEST):
        raise ValueError(f"unknown overflow policy {policy!r}: use {OVERFLOW_REJECT!r} or {OVERFLOW_DROP_OLDEST!r}")


def pack_receipt(device_id: str, envelope: dict[str, Any]) -> bytes:
    """A kept receipt as every store holds it: msgpack, so the same values are refused everywhere and the
    same come back changed (tuples as lists), and nothing is shared with the caller."""
    try:
        packed: bytes = msgpack.packb(envelope, use_bin_type=True)
    except (TypeError, ValueError, OverflowError) as exc:
        raise StoreError(f"receipt for device {device_id!r} is not msgpack: {exc}") from None
    return packed


def unpack_receipt(packed: bytes) -> dict[str, Any]:
    envelope: dict[str, Any] = msgpack.unpackb(packed, raw=False, strict_map_key=False)
    return envelope


def url_without_password(url: str) -> str:
    """A store URL as it may be logged or shown: the password (and user) left out."""
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    port = f":{parts.port}" if parts.port else ""
    return urllib.parse.urlunsplit((parts.scheme, f"{host}{port}", parts.path, "", ""))


def parse_redis_url(url: str) -> str:
    """A redis:// URL as given, if it names a host and a database number; ValueError saying what is wrong."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in REDIS_URL_SCHEMES:
        raise ValueError(f"store URL {url!r} must start with redis:// or rediss://")
    if not parts.hostname:
        raise ValueError(f"store URL {url!r} names no host: use redis://HOST:PORT/DB")
    try:
        parts.port  # noqa: B018 (parsing it validates it)
    except ValueError:
        raise ValueError(f"store URL {url!r} has a port that is not a number: use redis://HOST:PORT/DB") from None
    database = parts.path.lstrip("/")
    if database and not database.isdigit():
        raise ValueError(f"store URL {url!r}: the database after the / must be a number, as in redis://HOST:PORT/0")
    return url
