"""Registry operations on a store, shared by the ``rccs`` command line and the server, and the
operator's view of durable inboxes and dead letters (``rccs inbox``, ``rccs deadletters``).

Each function checks what it is given, then makes one or a few store calls.
Anything the caller got wrong (an invalid or unknown id, a taken or revoked id,
a name that is too long) raises ``AdminError`` with a message meant for a
person; the store is not changed when that happens. Times are integer
milliseconds since the epoch, passed in as ``now`` so callers and tests
control the clock.
"""

from __future__ import annotations

import contextlib
import secrets
import sys
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .auth import valid_id
from .credentials import new_credential, new_pairing_code, pairing_uri
from .errors import ProtocolError
from .protocol import MAX_DEVICE_TEXT_CHARS, msgpack_body_to_json_value, parse_device_fields
from .store import (
    AlreadyExists,
    DeadLetter,
    DeviceRecord,
    PairingCode,
    QueuedMessage,
    SessionRecord,
    Store,
    StoreError,
    UserRecord,
)
from .store.base import PRIORITY_NAMES

ID_RULE = "use 1-128 characters from A-Z a-z 0-9 . _ : @ -"
UNKNOWN_DEVICE_TYPE = "unknown"  # devices made for a token before they ever said hello
GENERATED_DEVICE_PREFIX = "d-"
# Only the first half of a pairing code is a lookup id (32**4 ids); a collision with a stored
# code is rare, so a few fresh draws always find a free one unless the store is full of codes.
PAIRING_ID_DRAWS = 20


class AdminError(ValueError):
    """Something the operator (or device) asked for that cannot be done; the message says why."""


def check_id(kind: str, value: object) -> str:
    """``value`` if it is a valid user or device id (``kind`` names which, for the message)."""
    if not isinstance(value, str) or not valid_id(value):
        raise AdminError(f"invalid {kind} id {value!r}: {ID_RULE}")
    return value


def check_device_name(name: object) -> str:
    """A name given to a device on purpose: 1 to MAX_DEVICE_TEXT_CHARS characters."""
    if not isinstance(name, str) or not name:
        raise AdminError("a device name must not be empty")
    if len(name) > MAX_DEVICE_TEXT_CHARS:
        raise AdminError(f"a device name must be at most {MAX_DEVICE_TEXT_CHARS} characters (got {len(name)})")
    return name


def check_device_fields(
    device_type: str,
    name: str,
    platform: str,
    version: str,
    capabilities: Iterable[str],
    metadata: Mapping[str, Any] | None,
    max_metadata_bytes: int | None = None,
) -> dict[str, Any]:
    """The checks a device's hello gets (``protocol.parse_device_fields``), for a device made
    outside a connection, so both ways of making one accept the same devices.

    Returns every field validated: capabilities as a tuple without duplicates, metadata as JSON values.
    """
    device = {"type": device_type, "name": name, "platform": platform, "version": version,
              "capabilities": list(capabilities), "metadata": {} if metadata is None else dict(metadata)}
    try:
        return parse_device_fields(device, sys.maxsize if max_metadata_bytes is None else max_metadata_bytes, True)
    except ProtocolError as exc:
        raise AdminError(exc.message) from None


async def _existing_user(store: Store, user_id: str) -> UserRecord:
    check_id("user", user_id)
    user = await store.get_user(user_id)
    if user is None:
        raise AdminError(f"unknown user {user_id!r}")
    return user


async def _live_device(store: Store, device_id: str) -> DeviceRecord:
    device = await store.get_device(device_id)
    if device is None:
        raise AdminError(f"unknown device {device_id!r}")
    if device.revoked_at is not None:
        raise AdminError(f"device {device_id!r} is revoked")
    return device


async def check_device_id_free(store: Store, device_id: str) -> str:
    """``device_id`` if it is valid and no device, live or revoked, has it."""
    check_id("device", device_id)
    existing = await store.get_device(device_id)
    if existing is not None:
        if existing.revoked_at is not None:
            raise AdminError(f"device id {device_id!r} belonged to a revoked device and cannot be used again")
        raise AdminError(f"device {device_id!r} already exists")
    return device_id


async def _free_generated_device_id(store: Store) -> str:
    while True:
        candidate = GENERATED_DEVICE_PREFIX + secrets.token_hex(5)
        if await store.get_device(candidate) is None:
            return candidate


async def add_user(store: Store, user_id: str, now: int) -> UserRecord:
    check_id("user", user_id)
    user = UserRecord(id=user_id, created=now)
    try:
        await store.add_user(user)
    except AlreadyExists:
        raise AdminError(f"user {user_id!r} already exists") from None
    return user


async def remove_user(store: Store, user_id: str, now: int) -> list[DeviceRecord]:
    """Remove a user; returns the devices that were live and are now revoked with it."""
    await _existing_user(store, user_id)
    live_devices = await store.list_devices(user_id)
    if not await store.remove_user(user_id, now):
        raise AdminError(f"unknown user {user_id!r}")  # removed by someone else meanwhile
    return live_devices


async def create_device(
    store: Store,
    user_id: str,
    *,
    device_id: str | None = None,
    device_type: str = UNKNOWN_DEVICE_TYPE,
    name: str = "",
    platform: str = "",
    version: str = "",
    capabilities: Iterable[str] = (),
    metadata: Mapping[str, Any] | None = None,
    max_metadata_bytes: int | None = None,
    now: int,
) -> tuple[DeviceRecord, str]:
    """Register a device with a fresh credential: returns the record and the credential.

    The credential is the only copy: the store keeps just its hash.
    """
    await _existing_user(store, user_id)
    fields = check_device_fields(device_type, name, platform, version, capabilities, metadata, max_metadata_bytes)
    if device_id is None:
        device_id = await _free_generated_device_id(store)
    else:
        await check_device_id_free(store, device_id)
    credential, credential_hash = new_credential()
    device = DeviceRecord(
        id=device_id, user=user_id, type=fields["type"], name=fields["name"], platform=fields["platform"],
        version=fields["version"], capabilities=fields["capabilities"], metadata=fields["metadata"], created=now,
        credential_hash=credential_hash,
    )
    # put_device inserts or replaces: the free-id check above is what keeps this from overwriting
    # a device; a server registering the same id in the same instant is the one race left open.
    try:
        await store.put_device(device)
    except StoreError as exc:
        raise AdminError(f"cannot register device {device_id!r}: {exc}") from None
    return device, credential


async def add_user_with_device(
    store: Store, user_id: str, *, device_id: str, device_type: str = UNKNOWN_DEVICE_TYPE, name: str = "", now: int
) -> tuple[UserRecord, DeviceRecord, str]:
    """A new user and its first device with a credential, or neither: everything is checked first."""
    check_id("user", user_id)
    check_device_fields(device_type, name, "", "", (), None)
    if await store.get_user(user_id) is not None:
        raise AdminError(f"user {user_id!r} already exists")
    await check_device_id_free(store, device_id)
    user = await add_user(store, user_id, now)
    try:
        device, credential = await create_device(
            store, user_id, device_id=device_id, device_type=device_type, name=name, now=now
        )
    except AdminError:
        # Only a concurrent writer gets here (the checks above passed): do not leave half a user.
        await store.remove_user(user_id, now)
        raise
    return user, device, credential


async def ensure_device_for_token(store: Store, user_id: str, device_id: str, now: int) -> DeviceRecord:
    """The device a dev token names, registered (with its user) if missing, so the server knows it.

    Refuses a revoked device and a device registered to another user; such a token would be
    refused at hello anyway, so it is better not to hand it out.
    """
    check_id("user", user_id)
    check_id("device", device_id)
    device = await store.get_device(device_id)
    if device is not None:
        if device.revoked_at is not None:
            raise AdminError(f"device {device_id!r} is revoked; a revoked device id cannot be used again")
        if device.user != user_id:
            raise AdminError(f"device {device_id!r} belongs to another user")
        return device
    if await store.get_user(user_id) is None:
        with contextlib.suppress(AlreadyExists):  # added meanwhile by someone else: just as good
            await store.add_user(UserRecord(id=user_id, created=now))
    device = DeviceRecord(id=device_id, user=user_id, type=UNKNOWN_DEVICE_TYPE, created=now)
    try:
        await store.put_device(device)
    except StoreError as exc:
        raise AdminError(f"cannot register device {device_id!r}: {exc}") from None
    return device


async def create_pairing_code(
    store: Store,
    user_id: str,
    *,
    issuer_device: str | None = None,
    ttl_seconds: float,
    approve: bool = False,
    public_url: str = "",
    now: int,
) -> dict[str, Any]:
    """A new pairing code for ``user_id``: ``{"code": "ABCD-EFGH", "uri": ..., "expires_at": ms}``.

    The code itself is returned only here; the store keeps the hash of its secret half.
    """
    await _existing_user(store, user_id)
    if ttl_seconds <= 0:
        raise AdminError("a pairing code's lifetime must be positive")
    if issuer_device is not None:
        issuer = await _live_device(store, issuer_device)
        if issuer.user != user_id:
            raise AdminError(f"device {issuer_device!r} belongs to another user")
    expires_at = now + int(ttl_seconds * 1000)
    for _ in range(PAIRING_ID_DRAWS):
        code, code_id, secret_hash = new_pairing_code()
        record = PairingCode(
            id=code_id,
            secret_hash=secret_hash,
            user=user_id,
            issuer_device=issuer_device,
            created=now,
            expires_at=expires_at,
            approve=approve,
        )
        try:
            await store.add_pairing_code(record)
        except AlreadyExists:
            continue
        return {"code": code, "uri": pairing_uri(code, public_url), "expires_at": expires_at}
    raise AdminError(f"no free pairing code id after {PAIRING_ID_DRAWS} tries; try again")


async def rename_device(store: Store, device_id: str, name: str, now: int) -> DeviceRecord:
    """Give a live device a new name; returns the updated record.

    ``now`` is taken for the same call shape as every other operation; a rename records no time.
    """
    check_device_name(name)
    device = await _live_device(store, device_id)
    device.name = name
    try:
        await store.put_device(device)
    except StoreError as exc:
        raise AdminError(f"cannot rename device {device_id!r}: {exc}") from None
    return device


async def revoke_device(store: Store, device_id: str, now: int) -> DeviceRecord:
    """Revoke a live device (its credential and sessions stop working); returns the revoked record."""
    device = await store.get_device(device_id)
    if device is None:
        raise AdminError(f"unknown device {device_id!r}")
    # The store also answers False for a device revoked by someone else since the lookup.
    if device.revoked_at is not None or not await store.revoke_device(device_id, now):
        raise AdminError(f"device {device_id!r} is already revoked")
    return await store.get_device(device_id) or device


async def revoke_session(store: Store, session_id: str, now: int) -> SessionRecord:
    """Revoke a session; returns the revoked record."""
    session = await store.get_session(session_id)
    if session is None:
        raise AdminError(f"unknown session {session_id!r}")
    # The store also answers False for a session revoked by someone else since the lookup.
    if session.revoked_at is not None or not await store.revoke_session(session_id, now):
        raise AdminError(f"session {session_id!r} is already revoked")
    return await store.get_session(session_id) or session


# ---- durable inboxes and dead letters ---------------------------------------


async def _known_device(store: Store, device_id: str) -> DeviceRecord:
    """The device, revoked or not: its inbox and dead letters are still there to look at or delete."""
    check_id("device", device_id)
    device = await store.get_device(device_id)
    if device is None:
        raise AdminError(f"unknown device {device_id!r}")
    return device


async def _check_user_known(store: Store, user_id: str) -> None:
    """A user that exists, or existed: a removed user's revoked devices (and their dead letters) outlive it."""
    check_id("user", user_id)
    if await store.get_user(user_id) is None and not await store.list_devices(user_id, include_revoked=True):
        raise AdminError(f"unknown user {user_id!r}")


async def device_inbox(store: Store, device_id: str, now: int, limit: int) -> tuple[list[QueuedMessage], int, int]:
    """A device's unexpired inbox messages in delivery order (at most ``limit``), and the inbox's
    (count, bytes) as counted against its caps: expired messages included until the server removes them."""
    await _known_device(store, device_id)
    messages = await store.inbox(device_id, now, limit)
    count, size = await store.inbox_size(device_id)
    return messages, count, size


async def purge_inbox(store: Store, device_id: str) -> int:
    """Delete a device's whole inbox; returns how many messages. Nobody is told (no receipts)."""
    await _known_device(store, device_id)
    return await store.purge(device_id)


async def list_dead_letters(store: Store, user_id: str | None, device_id: str | None, limit: int) -> list[DeadLetter]:
    """Dead letters, oldest first, of one device and/or one user (or all), at most ``limit``."""
    if user_id is not None:
        await _check_user_known(store, user_id)
    if device_id is not None:
        await _known_device(store, device_id)
    return await store.dead_letters(user_id, device_id, limit)


async def redrive_dead_letters(
    store: Store, *, ids: Sequence[int] | None = None, device_id: str | None = None
) -> list[QueuedMessage]:
    """Move dead letters back to their inboxes with ``attempts`` 0: these ``ids``, or all of ``device_id``.

    All or nothing: an id that is not a dead letter, or a dead letter of a revoked device (whose
    inbox is never delivered), refuses the whole call. Returns the messages moved, by id.
    """
    if (ids is None) == (device_id is None):
        raise AdminError("name the dead letters to redrive: their ids or their device, not both")
    if device_id is not None:
        device = await _known_device(store, device_id)
        if device.revoked_at is not None:
            raise AdminError(f"device {device_id!r} is revoked: its messages can never be delivered")
        return await store.redrive(device_id=device_id)
    assert ids is not None
    wanted = sorted(set(ids))
    if not wanted:
        raise AdminError("no dead letter ids given")
    # The store looks dead letters up by device or user only, so an id is checked against all of them.
    dead = {letter.message.id: letter.message for letter in await store.dead_letters(limit=sys.maxsize)}
    missing = [str(dead_id) for dead_id in wanted if dead_id not in dead]
    if missing:
        raise AdminError(f"no dead letter with id {', '.join(missing)}")
    for target in sorted({dead[dead_id].device for dead_id in wanted}):
        record = await store.get_device(target)
        if record is None or record.revoked_at is not None:
            first = next(dead_id for dead_id in wanted if dead[dead_id].device == target)
            raise AdminError(f"dead letter {first} is for device {target!r}, which is revoked or gone: "
                             "it can never be delivered")
    return await store.redrive(ids=wanted)


async def purge_dead_letters(store: Store, device_id: str) -> int:
    """Delete a device's dead letters; returns how many."""
    await _known_device(store, device_id)
    return await store.purge(device_id, dead_letters=True)


def priority_name(priority: int) -> str:
    """LOW .. EMERGENCY; a number outside 0-4 (which no store should hold) as itself."""
    return PRIORITY_NAMES[priority] if 0 <= priority < len(PRIORITY_NAMES) else str(priority)


def queued_view(message: QueuedMessage) -> dict[str, Any]:
    """An inbox message as JSON-friendly data, the msgpack body decoded into JSON values (never bytes).

    A body that does not decode (the store should never hold one) is ``null`` with ``body_error``.
    """
    view: dict[str, Any] = {
        "id": message.id,
        "device": message.device,
        "user": message.user,
        "from": message.sender_device,
        "msg_id": message.msg_id,
        "type": message.type,
        "priority": message.priority,
        "priority_name": priority_name(message.priority),
        "size": message.size,
        "attempts": message.attempts,
        "receipt": message.receipt,
        "queued_at": message.ts,
        "expires_at": message.expires_at,
    }
    try:
        view["body"] = msgpack_body_to_json_value(message.body)
    except ProtocolError as exc:  # bytes that are no msgpack value, or a map whose keys meet in JSON
        view["body"] = None
        view["body_error"] = f"the body ({len(message.body)} bytes) is not valid msgpack or has no JSON form: " \
                             f"{exc.message}"
    return view


def dead_letter_view(dead: DeadLetter) -> dict[str, Any]:
    """A dead letter: its message (``queued_view``) with why and when it became one."""
    return {**queued_view(dead.message), "reason": dead.reason, "dead_at": dead.at}


def user_view(user: UserRecord) -> dict[str, Any]:
    return {"id": user.id, "created": user.created}


def device_view(device: DeviceRecord) -> dict[str, Any]:
    """A device as JSON-friendly data, without its credential hash."""
    return {
        "id": device.id,
        "user": device.user,
        "type": device.type,
        "name": device.name,
        "platform": device.platform,
        "version": device.version,
        "capabilities": list(device.capabilities),
        "metadata": dict(device.metadata),
        "created": device.created,
        "last_seen": device.last_seen,
        "status": device.status,
        "revoked_at": device.revoked_at,
    }


def session_view(session: SessionRecord) -> dict[str, Any]:
    """A session as JSON-friendly data: its counters and how many messages await an ack, not the messages."""
    return {
        "session": session.id,
        "user": session.user,
        "device": session.device,
        "created": session.created,
        "expires_at": session.expires_at,
        "connected": session.connected_at is not None,
        "connected_at": session.connected_at,
        "disconnected_at": session.disconnected_at,
        "revoked_at": session.revoked_at,
        "last_activity": session.last_activity,
        "next_seq": session.next_seq,
        "messages_in": session.messages_in,
        "messages_out": session.messages_out,
        "bytes_in": session.bytes_in,
        "bytes_out": session.bytes_out,
        "connected_ms": session.connected_ms,
        "pending": len(session.pending),
    }
