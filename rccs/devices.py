"""Ops about the user's devices and sessions: discovery, self-description, presence, revocation, refresh.

Each handler takes the open Session and the request envelope; it answers with
``session.reply`` or raises ProtocolError (the session turns that into an
``error`` with the request's id). Handlers that need the store run in the
background through ``hub.spawn`` and answer when done.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import TYPE_CHECKING, Any

from . import admin, pairing
from .auth import TokenError
from .credentials import looks_like_credential, secret_hash
from .errors import ErrorCode, ProtocolError
from .hub import now_ms
from .protocol import MAX_ID_CHARS, parse_device_fields
from .store import STATUS_AWAY, STATUS_ONLINE, AlreadyExists, DeviceRecord, SessionRecord, UserRecord

if TYPE_CHECKING:
    from .hub import Hub
    from .session import Session

log = logging.getLogger("rccs.devices")


# ---- registry changes the hub makes for a hello ------------------------


def register_device(hub: Hub, user: str, device_id: str, now: int) -> DeviceRecord:
    """A device first seen with a dev token: registered (with its user) as the token says."""
    if user not in hub.registry.users:
        hub.registry.users.add(user)
        hub.spawn(_add_user_if_missing(hub, user, now))
    record = DeviceRecord(id=device_id, user=user, type="", created=now, last_seen=now)
    hub.registry.put(record)
    hub.bus.emit("device.registered", user=user, device=device_id, via="token")
    return record


async def _add_user_if_missing(hub: Hub, user: str, now: int) -> None:
    with contextlib.suppress(AlreadyExists):
        await hub.store.add_user(UserRecord(id=user, created=now))


def update_device(hub: Hub, device: DeviceRecord, fields: dict[str, Any]) -> bool:
    """Apply validated device fields; the store and the routing indexes follow. True if anything changed."""
    changed = {name: value for name, value in fields.items() if getattr(device, name) != value}
    if not changed:
        return False
    for name, value in changed.items():
        setattr(device, name, value)
    if "type" in changed or "capabilities" in changed:
        hub.reindex(device)
    hub.spawn(hub.store.put_device(hub.registry.snapshot(device.id)))
    return True


def device_info(hub: Hub, device: DeviceRecord) -> dict[str, Any]:
    """A device as other devices of its user see it (``devices``, ``pair.joined``)."""
    return {
        "id": device.id,
        "type": device.type,
        "name": device.name,
        "platform": device.platform,
        "version": device.version,
        "capabilities": list(device.capabilities),
        "metadata": device.metadata,
        "created": device.created,
        "last_seen": device.last_seen,
        "status": hub.status_of(device.id),
    }


# ---- helpers -----------------------------------------------------------


def _device_id(header: dict[str, Any], field: str = "device") -> str:
    value = header.get(field)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{field}' must be a device id string")
    return value


def _own_device(session: Session, device_id: str) -> DeviceRecord:
    """One of the session's user's devices; another user's device is forbidden, an unknown one not found."""
    device = session.hub.registry.get(device_id)
    if device is None or (device.revoked_at is not None and device.user == session.user):
        raise ProtocolError(ErrorCode.NOT_FOUND, f"no device {device_id!r}")
    if device.user != session.user:
        raise ProtocolError(ErrorCode.FORBIDDEN, f"device {device_id!r} belongs to another user")
    return device


def in_background(session: Session, header: dict[str, Any],
                  work: Callable[[], Coroutine[Any, Any, None]]) -> None:
    """Run an op that needs the store; its ProtocolError or failure becomes the request's error."""

    async def run() -> None:
        try:
            await work()
        except ProtocolError as exc:
            session.send_error(exc.code, exc.message, header.get("id"))
        except Exception:
            log.exception("internal error in %r from %s", header.get("op"), session.sink.peer)
            session.send_error(ErrorCode.INTERNAL, "internal server error", header.get("id"))

    session.hub.spawn(run())


# ---- ops ---------------------------------------------------------------


def op_devices(session: Session, header: dict[str, Any]) -> None:
    assert session.user is not None
    hub = session.hub
    devices = [device_info(hub, device) for device in hub.registry.user_devices(session.user)]
    session.reply(header, {"op": "devices", "devices": devices})


def op_device_update(session: Session, header: dict[str, Any]) -> None:
    hub = session.hub
    target = _own_device(session, _device_id(header)) if "device" in header else \
        hub.registry.devices[session.device]  # type: ignore[index]
    changes = header.get("set")
    if not isinstance(changes, dict) or not changes:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'set' must be a non-empty map of device fields")
    unknown = set(changes) - {"type", "name", "platform", "version", "capabilities", "metadata"}
    if unknown:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'set' has unknown fields: {', '.join(sorted(map(str, unknown)))}")
    fields = parse_device_fields(changes, hub.settings.max_metadata_bytes, False)
    update_device(hub, target, fields)
    session.reply(header, {"op": "device", "device": device_info(hub, target)})


def op_device_revoke(session: Session, header: dict[str, Any]) -> None:
    device = _own_device(session, _device_id(header))
    session.reply(header, {"op": "ok"})
    session.hub.revoke_device(device.id, now_ms())


def _session_view(record: SessionRecord, resumable: bool, current: str) -> dict[str, Any]:
    view = admin.session_view(record)
    del view["user"]
    view["resumable"] = resumable
    view["current"] = record.id == current
    return view


def op_sessions(session: Session, header: dict[str, Any]) -> None:
    hub = session.hub
    user = session.user
    assert user is not None

    async def work() -> None:
        records = {record.id: record for record in await hub.store.list_sessions(user_id=user)}
        for session_id, detached in hub.detached.items():
            if detached.user == user:
                records[session_id] = detached
        for live in list(hub.live.values()):
            if live.user == user:
                records[live.id] = live.snapshot(with_pending=True)
        views = [_session_view(record, record.id in hub.detached, session.id)
                 for record in sorted(records.values(), key=lambda r: (r.device, r.created, r.id))]
        session.reply(header, {"op": "sessions", "sessions": views})

    in_background(session, header, work)


def op_session_revoke(session: Session, header: dict[str, Any]) -> None:
    hub = session.hub
    session_id = header.get("session")
    if not isinstance(session_id, str) or not 0 < len(session_id) <= MAX_ID_CHARS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'session' must be a session id string")

    async def work() -> None:
        live = hub.live.get(session_id)
        detached = hub.detached.get(session_id)
        owner = live.user if live is not None else detached.user if detached is not None else None
        if owner is None:
            stored = await hub.store.get_session(session_id)
            owner = stored.user if stored is not None and stored.revoked_at is None else None
        if owner != session.user:  # another user's session is not confirmed to exist
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no session {session_id!r}")
        session.reply(header, {"op": "ok"})
        hub.revoke_session(session_id, now_ms())

    in_background(session, header, work)


def op_presence_set(session: Session, header: dict[str, Any]) -> None:
    status = header.get("status")
    if status not in (STATUS_ONLINE, STATUS_AWAY):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'status' must be \"online\" or \"away\"")
    assert session.user is not None and session.device is not None
    session.hub.set_presence(session.user, session.device, status, now_ms())
    if "id" in header:
        session.reply(header, {"op": "ok"})


def op_refresh(session: Session, header: dict[str, Any]) -> None:
    """A fresh credential or token extends the session without reconnecting."""
    hub = session.hub
    credential = header.get("credential")
    token = header.get("token")
    if credential is not None:
        device = hub.registry.by_credential(secret_hash(credential)) if looks_like_credential(credential) else None
        if device is None:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "unknown or revoked credential")
        expires_at = now_ms() + int(hub.settings.session_ttl * 1000)
        device_id = device.id
    elif token is not None:
        if not hub.settings.dev_tokens:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, "this server does not accept dev tokens; use a credential")
        try:
            identity = hub.tokens.verify(token)
        except TokenError as exc:
            raise ProtocolError(ErrorCode.UNAUTHORIZED, str(exc)) from None
        device_id = identity.device
        expires_at = identity.expires_at * 1000
    else:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "refresh needs a 'credential' or a 'token'")
    if device_id != session.device:
        raise ProtocolError(ErrorCode.FORBIDDEN, "the credential or token is for another device")
    session.expires_at = expires_at
    hub.watch_expiry(session)
    hub.dirty(session.id)
    session.reply(header, {"op": "refreshed", "expires_at": expires_at})


DEVICE_OPS: dict[str, Callable[[Session, dict[str, Any]], None]] = {
    "devices": op_devices,
    "device.update": op_device_update,
    "device.revoke": op_device_revoke,
    "sessions": op_sessions,
    "session.revoke": op_session_revoke,
    "presence.set": op_presence_set,
    "refresh": op_refresh,
    "pair.create": pairing.op_create,
    "pair.approve": pairing.op_approve,
    "pair.deny": pairing.op_deny,
}
