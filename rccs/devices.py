"""Ops about the user's devices and sessions: discovery, self-description, presence, revocation.

Each handler takes the open connection and the request envelope; it answers with ``conn.reply`` or
raises ProtocolError (the session turns that into an ``error`` with the request's id). Handlers that
need the store run in the background through ``conn.run_request`` and answer when done.
"""

from __future__ import annotations

import collections
from typing import TYPE_CHECKING, Any

from . import admin
from .clock import now_ms
from .errors import ErrorCode, ProtocolError
from .protocol import MAX_ID_CHARS, parse_device_fields
from .store import STATUS_AWAY, STATUS_ONLINE, DeviceRecord, SessionRecord

if TYPE_CHECKING:
    from .contracts import Conn, Handler
    from .hub import Hub

MAX_COUNTED_DEAD_LETTERS = 10_000  # ``devices`` with ``counts``: dead letters read per request, at most
DEVICE_FIELDS = frozenset({"type", "name", "platform", "version", "capabilities", "metadata"})


def _device_id(header: dict[str, Any], field: str = "device") -> str:
    value = header.get(field)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_ID_CHARS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'{field}' must be a device id string")
    return value


def _session_view(record: SessionRecord, resumable: bool, current: str) -> dict[str, Any]:
    view = admin.session_view(record)
    del view["user"]
    view["resumable"] = resumable
    view["current"] = record.id == current
    return view


class Devices:
    """``devices``, ``device.update``, ``device.revoke``, ``sessions``, ``session.revoke``, ``presence.set``."""

    def __init__(self, hub: Hub):
        self.hub = hub
        self.ops: dict[str, Handler] = {
            "devices": self.op_devices,
            "device.update": self.op_device_update,
            "device.revoke": self.op_device_revoke,
            "sessions": self.op_sessions,
            "session.revoke": self.op_session_revoke,
            "presence.set": self.op_presence_set,
        }

    def _own_device(self, conn: Conn, device_id: str) -> DeviceRecord:
        """One of the connection's user's devices; another user's device is forbidden, an unknown one not found."""
        device = self.hub.registry.get(device_id)
        if device is None or (device.revoked_at is not None and device.user == conn.user):
            raise ProtocolError(ErrorCode.NOT_FOUND, f"no device {device_id!r}")
        if device.user != conn.user:
            raise ProtocolError(ErrorCode.FORBIDDEN, f"device {device_id!r} belongs to another user")
        return device

    def op_devices(self, conn: Conn, header: dict[str, Any]) -> None:
        user = conn.user
        assert user is not None
        router = self.hub.router
        devices = [router.device_info(device) for device in router.registry.user_devices(user)]
        counts = header.get("counts", False)
        if not isinstance(counts, bool):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'counts' must be a boolean")
        if not counts:
            conn.reply(header, {"op": "devices", "devices": devices})
            return
        store = self.hub.store

        async def work() -> None:
            # The counts come from the store: messages waiting in each device's durable inbox, and its dead
            # letters (the user's first MAX_COUNTED_DEAD_LETTERS, so a device's count is at most that).
            letters = await store.dead_letters(user, None, MAX_COUNTED_DEAD_LETTERS)
            dead = collections.Counter(letter.message.device for letter in letters)
            for view in devices:
                view["inbox"] = (await store.inbox_size(view["id"]))[0]
                view["dead_letters"] = dead[view["id"]]
            conn.reply(header, {"op": "devices", "devices": devices})

        conn.run_request(header, work)

    def op_device_update(self, conn: Conn, header: dict[str, Any]) -> None:
        router = self.hub.router
        target = self._own_device(conn, _device_id(header)) if "device" in header else \
            router.registry.devices[conn.device]  # type: ignore[index]
        changes = header.get("set")
        if not isinstance(changes, dict) or not changes:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'set' must be a non-empty map of device fields")
        unknown = set(changes) - DEVICE_FIELDS
        if unknown:
            raise ProtocolError(ErrorCode.BAD_REQUEST,
                                f"'set' has unknown fields: {', '.join(sorted(map(str, unknown)))}")
        fields = parse_device_fields(changes, self.hub.settings.max_metadata_bytes, False)
        router.update_device(target, fields)
        conn.reply(header, {"op": "device", "device": router.device_info(target)})

    def op_device_revoke(self, conn: Conn, header: dict[str, Any]) -> None:
        device = self._own_device(conn, _device_id(header))
        conn.reply(header, {"op": "ok"})
        self.hub.revoke_device(device.id, now_ms())

    def op_sessions(self, conn: Conn, header: dict[str, Any]) -> None:
        hub = self.hub
        user = conn.user
        assert user is not None

        async def work() -> None:
            views = [_session_view(record, record.id in hub.detached, conn.id)
                     for record in await hub.list_sessions(user)]
            conn.reply(header, {"op": "sessions", "sessions": views})

        conn.run_request(header, work)

    def op_session_revoke(self, conn: Conn, header: dict[str, Any]) -> None:
        hub = self.hub
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
            if owner != conn.user:  # another user's session is not confirmed to exist
                raise ProtocolError(ErrorCode.NOT_FOUND, f"no session {session_id!r}")
            conn.reply(header, {"op": "ok"})
            hub.revoke_session(session_id, now_ms())

        conn.run_request(header, work)

    def op_presence_set(self, conn: Conn, header: dict[str, Any]) -> None:
        status = header.get("status")
        if status not in (STATUS_ONLINE, STATUS_AWAY):
            raise ProtocolError(ErrorCode.BAD_REQUEST, "'status' must be \"online\" or \"away\"")
        assert conn.user is not None and conn.device is not None
        self.hub.router.set_presence(conn.user, conn.device, status, now_ms())
        if "id" in header:
            conn.reply(header, {"op": "ok"})
