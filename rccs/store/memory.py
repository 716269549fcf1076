"""A store in the process's memory: for tests and for servers that may forget everything at exit.

It follows the same contract as ``SqliteStore`` (tests/store/test_contract.py runs one suite
against both). Records are copied on the way in and on the way out, so neither the caller nor
the store can change the other's objects; device metadata goes through a JSON round trip on the
way in, which validates and normalizes it exactly as the SQLite store's JSON column does, and
receipts are held msgpack-encoded, as the SQLite store holds them. Inbox ids come from one counter
that only goes up, so, as in SQLite, an id is never handed out twice.
"""

from __future__ import annotations

import collections
import copy
import dataclasses
import hmac
import json
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from ..mergepatch import json_size
from .base import (
    CHANGE_DEVICE,
    CHANGE_SESSION,
    CHANGE_USER,
    OVERFLOW_REJECT,
    STATUS_AWAY,
    STATUS_OFFLINE,
    STATUS_ONLINE,
    AlreadyExists,
    Change,
    DeadLetter,
    DeviceRecord,
    DeviceRefused,
    EnqueueOutcome,
    FenceMoved,
    IdMemory,
    PairingCode,
    QueuedMessage,
    SessionRecord,
    StateCatchUp,
    StateChange,
    StateDoc,
    StatePatched,
    Store,
    StoreError,
    TaskLease,
    TaskRaced,
    UserRecord,
    check_policy,
    holds_fence,
    lease_fields,
    pack_receipt,
    plan_state_patch,
    session_is_stale,
    state_patch_text,
    unpack_receipt,
)


def device_order(device: DeviceRecord) -> tuple[str, int, str]:
    return device.user, device.created, device.id


def session_order(session: SessionRecord) -> tuple[str, str, int, str]:
    return session.user, session.device, session.created, session.id


def _device_in(device: DeviceRecord) -> DeviceRecord:
    stored = copy.copy(device)
    stored.capabilities = tuple(device.capabilities)
    try:
        stored.metadata = json.loads(json.dumps(device.metadata, allow_nan=False))
    except (TypeError, ValueError) as exc:
        raise StoreError(f"metadata of device {device.id!r} is not JSON: {exc}") from None
    return stored


def _device_out(device: DeviceRecord) -> DeviceRecord:
    copied = copy.copy(device)
    copied.metadata = copy.deepcopy(device.metadata)
    return copied


def _session_copy(session: SessionRecord) -> SessionRecord:
    copied = copy.copy(session)
    copied.pending = [copy.copy(message) for message in session.pending]
    return copied


def _session_in(session: SessionRecord) -> SessionRecord:
    stored = _session_copy(session)
    for message in stored.pending:
        message.frame = bytes(message.frame)  # a bytearray or memoryview would stay shared with the caller
    return stored


def _queued_in(message: QueuedMessage) -> QueuedMessage:
    stored = copy.copy(message)
    stored.body = bytes(message.body)  # a bytearray or memoryview would stay shared with the caller
    return stored



class _Inbox:
    """One device's messages: priority -> {id: message} with ids ascending, and its running totals."""

    __slots__ = ("buckets", "bytes", "count")

    def __init__(self) -> None:
        self.buckets: dict[int, dict[int, QueuedMessage]] = {}
        self.count = 0
        self.bytes = 0

    def add(self, message: QueuedMessage) -> None:
        bucket = self.buckets.setdefault(message.priority, {})
        in_order = not bucket or next(reversed(bucket)) < message.id
        bucket[message.id] = message
        if not in_order:  # a redriven message with an old id: rare, so re-sort the bucket
            self.buckets[message.priority] = dict(sorted(bucket.items()))
        self.count += 1
        self.bytes += message.size

    def remove(self, message: QueuedMessage) -> None:
        bucket = self.buckets[message.priority]
        del bucket[message.id]
        if not bucket:
            del self.buckets[message.priority]
        self.count -= 1
        self.bytes -= message.size

    def oldest_of_lowest_priority(self) -> QueuedMessage | None:
        if not self.buckets:
            return None
        return next(iter(self.buckets[min(self.buckets)].values()))

    def in_delivery_order(self) -> Iterable[QueuedMessage]:
        for priority in sorted(self.buckets, reverse=True):
            yield from self.buckets[priority].values()


class _StateEntry:
    """A document as the memory store keeps it: JSON text (so nothing is shared), and its change log as
    (rev, patch text, by, patch id, at), oldest first."""

    __slots__ = ("by", "changes", "rev", "size", "updated", "value")

    def __init__(self) -> None:
        self.rev = 0
        self.value: str | None = None
        self.size = 0
        self.by = ""
        self.updated = 0
        self.changes: collections.deque[tuple[int, str, str, str | int | None, int]] = collections.deque()

    def record(self, user: str, name: str) -> StateDoc:
        value = None if self.value is None else json.loads(self.value)
        return StateDoc(user=user, name=name, rev=self.rev, value=value, by=self.by, updated=self.updated)

    def change_records(self, user: str, name: str, after: int) -> list[StateChange]:
        return [StateChange(user=user, doc=name, rev=rev, prev_rev=rev - 1, patch=json.loads(patch), by=by,
                            patch_id=patch_id, at=at)
                for rev, patch, by, patch_id, at in self.changes if rev > after]


class MemoryStore(Store):
    def __init__(self) -> None:
        self._users: dict[str, UserRecord] = {}
        self._devices: dict[str, DeviceRecord] = {}
        self._message_ids: list[tuple[str, str | int, int, int]] = []
        self._device_by_credential: dict[str, str] = {}
        self._sessions: dict[str, SessionRecord] = {}
        self._pairing_codes: dict[str, PairingCode] = {}
        self._changes: list[Change] = []
        self._queued: dict[int, QueuedMessage] = {}  # every message in an inbox, by id
        self._inboxes: dict[str, _Inbox] = {}
        self._expiring: dict[int, QueuedMessage] = {}  # the queued messages that have an expires_at
        self._dead: dict[int, DeadLetter] = {}
        self._last_queued_id = 0  # ids are never reused: neither after a delete nor by a dead letter
        self._state: dict[str, dict[str, _StateEntry]] = {}  # user -> document name -> document
        self._receipts: dict[str, list[bytes]] = {}  # device -> packed envelopes, oldest first
        self._tasks: dict[str, dict[str, TaskLease]] = {}  # user -> task -> lease (copies, never shared)

    async def open(self) -> None:
        """Nothing to create: the dictionaries exist from the start."""

    async def close(self) -> None:
        """Nothing to release: the data goes with the object."""

    def _append_change(self, kind: str, key: str) -> None:
        # seq == position + 1, so changes_since can slice instead of search.
        self._changes.append(Change(seq=len(self._changes) + 1, kind=kind, key=key))

    # ---- users -------------------------------------------------------

    async def add_user(self, user: UserRecord) -> None:
        if user.id in self._users:
            raise AlreadyExists(f"user {user.id!r} already exists")
        self._users[user.id] = copy.copy(user)
        self._append_change(CHANGE_USER, user.id)

    async def get_user(self, user_id: str) -> UserRecord | None:
        user = self._users.get(user_id)
        return None if user is None else copy.copy(user)

    async def list_users(self) -> list[UserRecord]:
        return [copy.copy(self._users[user_id]) for user_id in sorted(self._users)]

    async def remove_user(self, user_id: str, now: int) -> bool:
        if self._users.pop(user_id, None) is None:
            return False
        self._append_change(CHANGE_USER, user_id)
        live_devices = sorted(
            (device for device in self._devices.values() if device.user == user_id and device.revoked_at is None),
            key=device_order,
        )
        for device in live_devices:
            self._mark_device_revoked(device, now)
            self._append_change(CHANGE_DEVICE, device.id)
        for session_id in [sid for sid, session in self._sessions.items() if session.user == user_id]:
            del self._sessions[session_id]
        for code_id in [cid for cid, code in self._pairing_codes.items() if code.user == user_id]:
            del self._pairing_codes[code_id]
        self._state.pop(user_id, None)
        self._tasks.pop(user_id, None)
        return True

    # ---- devices -----------------------------------------------------

    async def put_device(self, device: DeviceRecord) -> None:
        if device.user not in self._users and device.revoked_at is None:
            raise DeviceRefused(f"cannot store device {device.id!r}: unknown user {device.user!r}")
        existing = self._devices.get(device.id)
        if existing is not None and existing.revoked_at is not None:
            raise DeviceRefused(f"device {device.id!r} is revoked and cannot be replaced")
        if device.credential_hash is not None:
            holder = self._device_by_credential.get(device.credential_hash)
            if holder is not None and holder != device.id:
                raise DeviceRefused(f"cannot store device {device.id!r}: its credential belongs to another device")
        stored = _device_in(device)
        if existing is not None and existing.credential_hash is not None:
            del self._device_by_credential[existing.credential_hash]
        if stored.credential_hash is not None:
            self._device_by_credential[stored.credential_hash] = stored.id
        self._devices[stored.id] = stored
        self._append_change(CHANGE_DEVICE, stored.id)

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        device = self._devices.get(device_id)
        return None if device is None else _device_out(device)

    async def list_devices(self, user_id: str | None = None, include_revoked: bool = False) -> list[DeviceRecord]:
        chosen = [
            device for device in self._devices.values()
            if (user_id is None or device.user == user_id) and (include_revoked or device.revoked_at is None)
        ]
        chosen.sort(key=device_order)
        return [_device_out(device) for device in chosen]

    async def find_device_by_credential(self, credential_hash: str) -> DeviceRecord | None:
        device_id = self._device_by_credential.get(credential_hash)
        if device_id is None:
            return None
        device = self._devices[device_id]
        # A device put already revoked may still carry a credential; it must not sign anyone in.
        return None if device.revoked_at is not None else _device_out(device)

    async def revoke_device(self, device_id: str, now: int) -> bool:
        device = self._devices.get(device_id)
        if device is None or device.revoked_at is not None:
            return False
        self._mark_device_revoked(device, now)
        self._append_change(CHANGE_DEVICE, device_id)
        live_sessions = sorted(
            (session for session in self._sessions.values()
             if session.device == device_id and session.revoked_at is None),
            key=session_order,
        )
        for session in live_sessions:
            session.revoked_at = now
            self._append_change(CHANGE_SESSION, session.id)
        return True

    def _mark_device_revoked(self, device: DeviceRecord, now: int) -> None:
        device.revoked_at = now
        device.status = STATUS_OFFLINE  # presence updates skip revoked devices: it would stay "online" forever
        if device.credential_hash is not None:
            del self._device_by_credential[device.credential_hash]
            device.credential_hash = None

    async def update_presence(self, updates: Sequence[tuple[str, str, int]]) -> None:
        for device_id, status, last_seen in updates:
            device = self._devices.get(device_id)
            if device is not None and device.revoked_at is None:
                device.status = status
                device.last_seen = last_seen

    # ---- sessions ----------------------------------------------------

    async def put_sessions(self, sessions: Sequence[SessionRecord]) -> None:
        # Copied before anything is stored: a failure part-way must not leave half a batch.
        incoming = [_session_in(session) for session in sessions]
        for stored in incoming:
            device = self._devices.get(stored.device)
            if device is not None and device.revoked_at is not None:
                continue
            existing = self._sessions.get(stored.id)
            if existing is not None and existing.revoked_at is not None:
                stored.revoked_at = existing.revoked_at
            self._sessions[stored.id] = stored

    async def get_session(self, session_id: str) -> SessionRecord | None:
        session = self._sessions.get(session_id)
        return None if session is None else _session_copy(session)

    async def list_sessions(self, user_id: str | None = None, device_id: str | None = None) -> list[SessionRecord]:
        chosen = [
            session for session in self._sessions.values()
            if (user_id is None or session.user == user_id) and (device_id is None or session.device == device_id)
        ]
        chosen.sort(key=session_order)
        return [_session_copy(session) for session in chosen]

    async def revoke_session(self, session_id: str, now: int) -> bool:
        session = self._sessions.get(session_id)
        if session is None or session.revoked_at is not None:
            return False
        session.revoked_at = now
        self._append_change(CHANGE_SESSION, session_id)
        return True

    async def delete_stale_sessions(self, now: int, grace_ms: int) -> int:
        stale = [sid for sid, session in self._sessions.items() if session_is_stale(session, now, grace_ms)]
        for session_id in stale:
            del self._sessions[session_id]
        return len(stale)

    async def reset_live_state(self, now: int) -> None:
        for device in self._devices.values():
            if device.status in (STATUS_ONLINE, STATUS_AWAY):
                device.status = STATUS_OFFLINE
        for session in self._sessions.values():
            if session.connected_at is not None:
                ended = session.last_activity or now
                session.connected_ms += max(0, ended - session.connected_at)
                session.disconnected_at = ended
                session.connected_at = None

    # ---- pairing -----------------------------------------------------

    async def add_pairing_code(self, code: PairingCode) -> None:
        if code.id in self._pairing_codes:
            raise AlreadyExists(f"pairing code {code.id!r} already exists")
        self._pairing_codes[code.id] = copy.copy(code)

    async def redeem_pairing_code(self, code_id: str, secret_hash: str, now: int,
                                  max_attempts: int) -> PairingCode | None:
        code = self._pairing_codes.get(code_id)
        if code is None or code.used_at is not None or code.expires_at <= now or code.attempts >= max_attempts:
            return None
        if not hmac.compare_digest(code.secret_hash.encode(), secret_hash.encode()):
            code.attempts += 1
            return None
        code.used_at = now
        return copy.copy(code)

    async def delete_pairing_codes_before(self, cutoff: int) -> int:
        expired = [cid for cid, code in self._pairing_codes.items() if code.expires_at < cutoff]
        for code_id in expired:
            del self._pairing_codes[code_id]
        return len(expired)

    async def list_pairing_codes(self) -> list[PairingCode]:
        return [copy.copy(self._pairing_codes[code_id]) for code_id in sorted(self._pairing_codes)]

    # ---- durable inboxes ----------------------------------------------

    def _queue(self, message: QueuedMessage) -> None:
        self._queued[message.id] = message
        if message.expires_at is not None:
            self._expiring[message.id] = message
        inbox = self._inboxes.get(message.device)
        if inbox is None:
            inbox = self._inboxes[message.device] = _Inbox()
        inbox.add(message)

    def _unqueue(self, message: QueuedMessage) -> None:
        del self._queued[message.id]
        self._expiring.pop(message.id, None)
        self._inboxes[message.device].remove(message)

    def _queued_by_ids(self, ids: Sequence[int]) -> list[QueuedMessage]:
        """The queued messages with these ids, each once, by id."""
        return [self._queued[queued_id] for queued_id in sorted(set(ids)) if queued_id in self._queued]

    async def enqueue(self, messages: Sequence[QueuedMessage], max_count: int, max_bytes: int,
                      policy: str, ids: IdMemory | None = None) -> EnqueueOutcome:
        """Every message given ends up in ``stored`` or ``rejected``. ``dropped`` may also list messages
        stored earlier in the same batch: a batch does what the same messages enqueued one call at a
        time would do."""
        check_policy(policy)
        incoming = [_queued_in(message) for message in messages]
        outcome = EnqueueOutcome(stored=[], rejected=[], dropped=[])
        for message in incoming:
            device = self._devices.get(message.device)
            size = message.size
            if (device is not None and device.revoked_at is not None) or size > max_bytes or max_count < 1:
                outcome.rejected.append(message)
                continue
            inbox = self._inboxes.get(message.device)
            if inbox is not None and (inbox.count >= max_count or inbox.bytes + size > max_bytes):
                if policy == OVERFLOW_REJECT:
                    outcome.rejected.append(message)
                    continue
                while inbox.count >= max_count or inbox.bytes + size > max_bytes:
                    victim = inbox.oldest_of_lowest_priority()
                    assert victim is not None  # an empty inbox fits any message that passed the checks above
                    self._unqueue(victim)
                    outcome.dropped.append(copy.copy(victim))
            self._last_queued_id += 1
            message.id = self._last_queued_id
            self._queue(message)
            outcome.stored.append(copy.copy(message))
        return outcome

    async def inbox(self, device_id: str, now: int, limit: int = 1000) -> list[QueuedMessage]:
        inbox = self._inboxes.get(device_id)
        if inbox is None or limit <= 0:
            return []
        chosen: list[QueuedMessage] = []
        for message in inbox.in_delivery_order():
            if message.expires_at is None or message.expires_at > now:
                chosen.append(copy.copy(message))
                if len(chosen) >= limit:
                    break
        return chosen

    async def inbox_size(self, device_id: str) -> tuple[int, int]:
        inbox = self._inboxes.get(device_id)
        return (0, 0) if inbox is None else (inbox.count, inbox.bytes)

    async def remove_queued(self, ids: Sequence[int]) -> list[QueuedMessage]:
        """The removed messages come back by id."""
        removed = self._queued_by_ids(ids)
        for message in removed:
            self._unqueue(message)
        return [copy.copy(message) for message in removed]

    async def count_attempts(self, ids: Sequence[int]) -> None:
        """An id given twice still counts one attempt."""
        for message in self._queued_by_ids(ids):
            message.attempts += 1

    async def take_expired(self, now: int, limit: int = 1000) -> list[QueuedMessage]:
        if limit <= 0:
            return []
        expired = sorted(queued_id for queued_id, message in self._expiring.items()
                         if message.expires_at is not None and message.expires_at <= now)
        return await self.remove_queued(expired[:limit])

    async def dead_letter(self, ids: Sequence[int], reason: str, now: int) -> list[QueuedMessage]:
        """The moved messages come back by id."""
        moved = self._queued_by_ids(ids)
        for message in moved:
            self._unqueue(message)
            self._dead[message.id] = DeadLetter(message=message, reason=reason, at=now)
        return [copy.copy(message) for message in moved]

    async def dead_letters(self, user_id: str | None = None, device_id: str | None = None,
                           limit: int = 1000) -> list[DeadLetter]:
        if limit <= 0:
            return []
        chosen: list[DeadLetter] = []
        for dead_id in sorted(self._dead):
            letter = self._dead[dead_id]
            if (user_id is None or letter.message.user == user_id) and (
                    device_id is None or letter.message.device == device_id):
                chosen.append(DeadLetter(message=copy.copy(letter.message), reason=letter.reason, at=letter.at))
                if len(chosen) >= limit:
                    break
        return chosen

    async def redrive(self, ids: Sequence[int] | None = None, device_id: str | None = None) -> list[QueuedMessage]:
        """With both ``ids`` and ``device_id``, the dead letters among ``ids`` of that device. The
        messages come back by id."""
        candidates = sorted(self._dead) if ids is None else sorted(set(ids) & self._dead.keys())
        moved: list[QueuedMessage] = []
        for dead_id in candidates:
            message = self._dead[dead_id].message
            if device_id is not None and message.device != device_id:
                continue
            del self._dead[dead_id]
            message.attempts = 0
            self._queue(message)
            moved.append(copy.copy(message))
        return moved

    async def purge(self, device_id: str, dead_letters: bool = False) -> int:
        if dead_letters:
            doomed = [dead_id for dead_id, letter in self._dead.items() if letter.message.device == device_id]
            for dead_id in doomed:
                del self._dead[dead_id]
            return len(doomed)
        inbox = self._inboxes.pop(device_id, None)
        if inbox is None:
            return 0
        for message in inbox.in_delivery_order():
            del self._queued[message.id]
            self._expiring.pop(message.id, None)
        return inbox.count

    # ---- receipts for offline senders ----------------------------------

    async def add_receipts(self, receipts: Sequence[tuple[str, dict[str, Any]]]) -> None:
        packed = [(device_id, pack_receipt(device_id, envelope)) for device_id, envelope in receipts]
        for device_id, envelope in packed:  # packed first: a bad receipt keeps none of the batch
            self._receipts.setdefault(device_id, []).append(envelope)

    async def take_receipts(self, device_id: str, limit: int = 10000) -> list[dict[str, Any]]:
        kept = self._receipts.get(device_id)
        if not kept or limit <= 0:
            return []
        taken, rest = kept[:limit], kept[limit:]
        if rest:
            self._receipts[device_id] = rest
        else:
            del self._receipts[device_id]
        return [unpack_receipt(envelope) for envelope in taken]

    async def devices_with_kept_receipts(self) -> list[str]:
        return sorted(self._receipts)

    async def kept_receipts(self, device_id: str) -> list[dict[str, Any]]:
        return [unpack_receipt(envelope) for envelope in self._receipts.get(device_id, [])]

    # ---- idempotency keys --------------------------------------------

    async def save_message_ids(self, entries: Sequence[tuple[str, str | int, int, int]]) -> None:
        self._message_ids = [(device, msg_id, at, digest) for device, msg_id, at, digest in entries]

    async def load_message_ids(self, since: int) -> list[tuple[str, str | int, int, int]]:
        kept = [entry for entry in self._message_ids if entry[2] >= since]
        kept.sort(key=lambda entry: entry[2])
        return kept

    # ---- task leases -------------------------------------------------

    async def load_tasks(self, user_id: str) -> list[TaskLease]:
        return [dataclasses.replace(lease) for _, lease in sorted(self._tasks.get(user_id, {}).items())]

    async def users_with_task_notices(self) -> list[str]:
        return sorted(user for user, leases in self._tasks.items()
                      if any(lease.handoff is not None for lease in leases.values()))

    async def put_task(self, lease: TaskLease, if_unchanged: bool = False, previous: TaskLease | None = None) -> None:
        if lease.user not in self._users:
            raise StoreError(f"unknown user {lease.user!r}")
        leases = self._tasks.setdefault(lease.user, {})
        stored = leases.get(lease.task)
        if if_unchanged and (lease_fields(stored), stored and stored.open_handoff) != (
                lease_fields(previous), previous and previous.open_handoff):
            raise TaskRaced(f"task {lease.task!r} of {lease.user!r} changed meanwhile")
        leases[lease.task] = dataclasses.replace(lease)

    # ---- state documents -----------------------------------------------

    async def get_state(self, user_id: str, doc: str) -> StateDoc:
        entry = self._state.get(user_id, {}).get(doc)
        return StateDoc(user=user_id, name=doc) if entry is None else entry.record(user_id, doc)

    async def patch_state(self, user_id: str, doc: str, patch: Any, by: str, patch_id: str | int | None,
                          if_rev: int | None, now: int, max_doc_bytes: int, max_user_bytes: int,
                          keep_changes: int, fence: tuple[str, int] | None = None) -> StatePatched:
        patch_text = state_patch_text(patch)
        if fence is not None and not holds_fence(self._tasks.get(user_id, {}).get(fence[0]), by, fence[1]):
            raise FenceMoved(f"{by!r} no longer holds task {fence[0]!r} at epoch {fence[1]}")
        docs = self._state.get(user_id, {})
        entry = docs.get(doc)
        if entry is not None and patch_id is not None:
            for rev, text, change_by, change_id, _ in entry.changes:
                if change_by == by and change_id == patch_id and type(change_id) is type(patch_id) \
                        and text == patch_text:
                    return StatePatched(doc=entry.record(user_id, doc), rev=rev, prev_rev=rev - 1, duplicate=True)
        current = StateDoc(user=user_id, name=doc) if entry is None else entry.record(user_id, doc)
        user_bytes = sum(other.size for other in docs.values())
        planned = plan_state_patch(current, 0 if entry is None else entry.size, user_bytes, json.loads(patch_text),
                                   if_rev, max_doc_bytes, max_user_bytes)
        if planned is None:
            return StatePatched(doc=current, rev=current.rev, prev_rev=current.rev, noop=True)
        merged, size = planned
        if entry is None:
            entry = self._state.setdefault(user_id, {})[doc] = _StateEntry()
        entry.rev += 1
        entry.value = None if merged is None else json.dumps(merged, ensure_ascii=False, allow_nan=False)
        entry.size = size
        entry.by = by
        entry.updated = now
        entry.changes.append((entry.rev, patch_text, by, patch_id, now))
        while len(entry.changes) > max(keep_changes, 0):
            entry.changes.popleft()
        change = StateChange(user=user_id, doc=doc, rev=entry.rev, prev_rev=entry.rev - 1,
                             patch=json.loads(patch_text), by=by, patch_id=patch_id, at=now)
        return StatePatched(doc=entry.record(user_id, doc), rev=entry.rev, prev_rev=entry.rev - 1, change=change)

    async def list_state(self, user_id: str) -> list[tuple[StateDoc, list[StateChange]]]:
        docs = self._state.get(user_id, {})
        return [(docs[name].record(user_id, name), docs[name].change_records(user_id, name, 0))
                for name in sorted(docs)]

    async def restore_state(self, doc: StateDoc, changes: Sequence[StateChange]) -> None:
        entry = _StateEntry()
        try:
            entry.value = None if doc.value is None else json.dumps(doc.value, ensure_ascii=False, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise StoreError(f"state document {doc.name!r} is not JSON: {exc}") from None
        entry.rev, entry.size, entry.by, entry.updated = doc.rev, json_size(doc.value), doc.by, doc.updated
        entry.changes.extend((change.rev, state_patch_text(change.patch), change.by, change.patch_id, change.at)
                             for change in changes)
        self._state.setdefault(doc.user, {})[doc.name] = entry

    async def state_catch_up(self, user_id: str, since: Mapping[str, int], doc: str | None = None,
                             prefix: str | None = None) -> list[StateCatchUp]:
        docs = self._state.get(user_id, {})
        if doc is not None:
            names = [doc]
        else:
            start = prefix or ""
            names = sorted(name for name, entry in docs.items()
                           if name.startswith(start) and (entry.value is not None or name in since))
        caught: list[StateCatchUp] = []
        for name in names:
            entry = docs.get(name)
            if entry is None:
                caught.append(StateCatchUp(doc=StateDoc(user=user_id, name=name),
                                           changes=[] if since.get(name) == 0 else None))
                continue
            have = since.get(name)
            changes: list[StateChange] | None = None
            if have is not None and have <= entry.rev:
                oldest = entry.changes[0][0] if entry.changes else entry.rev + 1
                if have == entry.rev or oldest <= have + 1:
                    changes = entry.change_records(user_id, name, have)
            caught.append(StateCatchUp(doc=entry.record(user_id, name), changes=changes))
        return caught

    # ---- change feed -------------------------------------------------

    async def changes_since(self, cursor: int, limit: int = 1000) -> list[Change]:
        if limit <= 0:
            return []
        start = max(cursor, 0)
        return self._changes[start:start + limit]

    async def last_change(self) -> int:
        return len(self._changes)
