"""The admin HTTP API: JSON endpoints under ``/admin/`` on the HTTP port, for operators and backends.

Off unless ``admin_key`` is set (then every ``/admin/`` path is a plain 404).
Every request must carry ``Authorization: Bearer <admin_key>`` (compared in
constant time; the key is never logged); without it, or with a wrong one, 401.
Errors are ``{"error": {"code": .., "message": ..}}`` with the protocol's error
codes (``rccs/errors.py``). ``docs/openapi.json`` describes every endpoint;
``docs/operations.md`` ("Admin HTTP API") explains them.

Everything here runs in the server process, so it sees live state: presence,
live sessions' counters, revocations that close sockets at once. Revocations
go through ``Hub.revoke_device``/``Hub.revoke_session``; inbox and dead-letter
operations through ``rccs.admin`` (the CLI's functions), with the ids checked
here first so that each mistake gets its own status code.

``POST /admin/publish`` sends a message from the backend with the routing and
delivery semantics of a device's ``send``: ``Messaging.publish`` with a backend
sender whose device id is ``SERVER_SENDER`` (``"server"``, the ``from`` receivers
see). Receipts meant for that sender never reach a socket: the ones produced
before the response (failed, routed, queued/accepted once the inbox write is
committed, delivered if a device acked that fast) are returned in the response;
later ones are counted and, for failures and expiries, emitted on the event bus
(webhooks) as for any sender (``messaging.BackendReceipts``).
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import hmac
import logging
import secrets
import sys
import urllib.parse
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from . import admin
from .auth import valid_id
from .clock import now_ms
from .errors import ErrorCode, ProtocolError
from .messaging import SERVER_SENDER
from .protocol import MAX_ID_CHARS, check_message_id, json_loads
from .store import DeviceRecord, SessionRecord, StoreError
from .transport.http import Request, Response, json_error, json_response

if TYPE_CHECKING:
    from .hub import Hub
    from .messaging import Messaging
    from .pairing import Pairing
    from .tasks import Tasks

log = logging.getLogger("rccs.admin_api")

PUBLISH_FIELDS = frozenset({"user", "to", "type", "body", "id", "ack", "ttl", "priority", "durable", "first_ack"})
DEFAULT_LIMIT = 1000
MAX_LIMIT = 100_000
MAX_REDRIVE_IDS = 10_000
CATCH_UP_TIMEOUT = 2.0  # seconds to wait for the store's change feed when an id is not known in memory yet

# HTTP status for each protocol error code an endpoint can answer with.
HTTP_STATUS = {
    ErrorCode.BAD_REQUEST: 400,
    ErrorCode.TOO_LARGE: 400,  # a field over its limit; a body over the size limit is 413
    ErrorCode.UNAUTHORIZED: 401,
    ErrorCode.FORBIDDEN: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.REVOKED: 409,
    ErrorCode.DUPLICATE_ID: 409,
    ErrorCode.NO_ROUTE: 422,
    ErrorCode.UNCONVERTIBLE: 422,
    ErrorCode.RATE_LIMITED: 429,
    ErrorCode.INTERNAL: 500,
}


class ApiError(Exception):
    def __init__(self, code: ErrorCode, message: str, status: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status if status is not None else HTTP_STATUS.get(code, 400)


def _check_id(kind: str, value: str) -> str:
    if not valid_id(value):
        raise ApiError(ErrorCode.BAD_REQUEST, f"invalid {kind} id {value[:140]!r}: {admin.ID_RULE}")
    return value


def _query(request: Request, allowed: set[str]) -> dict[str, str]:
    try:
        params = request.query_params()
    except (ValueError, UnicodeDecodeError):
        raise ApiError(ErrorCode.BAD_REQUEST, "malformed query string") from None
    unknown = set(params) - allowed
    if unknown:
        raise ApiError(ErrorCode.BAD_REQUEST, f"unknown query parameter {sorted(unknown)[0][:64]!r}")
    single: dict[str, str] = {}
    for name, values in params.items():
        if len(values) != 1:
            raise ApiError(ErrorCode.BAD_REQUEST, f"query parameter {name!r} given more than once")
        single[name] = values[0]
    return single


def _limit(params: dict[str, str]) -> int:
    raw = params.get("limit")
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isascii() or not raw.isdigit() or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(ErrorCode.BAD_REQUEST, f"'limit' must be an integer from 1 to {MAX_LIMIT}")
    return int(raw)


def _flag(params: dict[str, str], name: str) -> bool:
    raw = params.get(name, "false").lower()
    if raw in ("1", "true", "yes"):
        return True
    if raw in ("0", "false", "no"):
        return False
    raise ApiError(ErrorCode.BAD_REQUEST, f"'{name}' must be true or false")


def _json_body(request: Request) -> dict[str, Any]:
    if not request.body.strip():
        raise ApiError(ErrorCode.BAD_REQUEST, "a JSON object body is required")
    try:
        value = json_loads(request.body)
    except ProtocolError as exc:
        raise ApiError(ErrorCode.BAD_REQUEST, exc.message) from None
    if not isinstance(value, dict):
        raise ApiError(ErrorCode.BAD_REQUEST, "the body must be a JSON object")
    return value


def _session_state(record: SessionRecord, now: int) -> str:
    if record.revoked_at is not None:
        return "revoked"
    if record.connected_at is not None:
        return "connected"
    if record.expires_at < now:
        return "expired"
    return "disconnected"


Route = Callable[[Request, list[str]], Awaitable[Response]]


class AdminAPI:
    """The ``/admin/`` handler of one node."""

    def __init__(self, hub: Hub, key: str, is_ready: Callable[[], bool], messaging: Messaging, pairing: Pairing,
                 tasks: Tasks):
        if not key:
            raise ValueError("the admin API needs a non-empty key")
        self.hub = hub
        self._key = key.encode()
        self.is_ready = is_ready
        self.messaging = messaging
        self.pairing = pairing
        self.tasks = tasks
        self.receipts = messaging.backend
        # (method, path template); "{}" is one path segment, handed to the handler in order.
        self.routes: list[tuple[str, tuple[str, ...], Route]] = [
            ("GET", ("stats",), self.stats),
            ("GET", ("users",), self.users),
            ("GET", ("users", "{}", "devices"), self.user_devices),
            ("GET", ("users", "{}", "tasks"), self.user_tasks),
            ("GET", ("sessions",), self.sessions),
            ("POST", ("sessions", "{}", "revoke"), self.revoke_session),
            ("GET", ("devices", "{}", "inbox"), self.inbox),
            ("POST", ("devices", "{}", "inbox", "purge"), self.purge_inbox),
            ("POST", ("devices", "{}", "revoke"), self.revoke_device),
            ("GET", ("deadletters",), self.dead_letters),
            ("POST", ("deadletters", "redrive"), self.redrive),
            ("POST", ("publish",), self.publish),
        ]

    # ---- dispatch ----------------------------------------------------------

    def authorized(self, request: Request) -> bool:
        values = request.header("authorization")
        if len(values) != 1:
            return False
        scheme, _, token = values[0].strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        return hmac.compare_digest(token.strip().encode("latin-1"), self._key)

    async def __call__(self, request: Request) -> Response:
        if not self.authorized(request):
            return json_error(401, ErrorCode.UNAUTHORIZED.value,
                              "a valid 'Authorization: Bearer <admin key>' is required",
                              (("WWW-Authenticate", 'Bearer realm="rccs-admin"'),))
        try:
            try:
                segments = [urllib.parse.unquote(part, errors="strict") for part in request.path.split("/")[2:]]
            except UnicodeDecodeError:
                raise ApiError(ErrorCode.BAD_REQUEST, "the path is not valid percent-encoded UTF-8") from None
            allowed: list[str] = []
            for method, template, handler in self.routes:
                if len(template) != len(segments):
                    continue
                params = []
                for expected, actual in zip(template, segments, strict=True):
                    if expected == "{}":
                        if not actual:
                            break
                        params.append(actual)
                    elif expected != actual:
                        break
                else:
                    if method == request.method:
                        return await handler(request, params)
                    allowed.append(method)
            if allowed:
                return json_error(405, ErrorCode.BAD_REQUEST.value, f"use {' or '.join(allowed)} here",
                                  (("Allow", ", ".join(allowed)),))
            raise ApiError(ErrorCode.NOT_FOUND, "no such admin endpoint")
        except ApiError as exc:
            return json_error(exc.status, exc.code.value, exc.message)

    # ---- lookups -------------------------------------------------------------

    async def _catch_up(self) -> None:
        """Let changes other processes (the CLI) made a moment ago reach this node's memory."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(CATCH_UP_TIMEOUT):
                await self.hub.catch_up()

    async def _stored_user(self, user: str) -> bool:
        """Several nodes: a user this node has not heard of may have registered on another node a moment ago."""
        if not self.hub.broker.spans_nodes:
            return False
        try:
            return await self.hub.store.get_user(user) is not None
        except StoreError:
            raise ApiError(ErrorCode.UNAVAILABLE, "the store cannot be reached; nothing was sent", 503) from None

    async def _known_user(self, user: str) -> bool:
        """A user that exists, or existed (its revoked devices outlive it)."""
        hub = self.hub
        if user in hub.registry.users or any(d.user == user for d in hub.registry.devices.values()):
            return True
        store = hub.store
        return await store.get_user(user) is not None or bool(await store.list_devices(user, include_revoked=True))

    async def _device(self, device_id: str) -> DeviceRecord:
        """A known device (revoked or not), from memory or the store; 400 for an invalid id, 404 for an unknown one."""
        _check_id("device", device_id)
        record = self.hub.registry.get(device_id)
        if record is None:
            record = await self.hub.store.get_device(device_id)
        if record is None:
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown device {device_id!r}")
        return record

    def _device_view(self, record: DeviceRecord) -> dict[str, Any]:
        view = admin.device_view(record)
        view["status"] = "revoked" if record.revoked_at is not None else self.hub.router.status_of(record.id)
        session = self.hub.online(record.user, record.id)
        view["session"] = session.id if session is not None else None
        return view

    async def _merged_devices(self, user: str | None) -> dict[str, DeviceRecord]:
        """Devices as the store has them, overlaid with this node's fresher in-memory records."""
        records = {device.id: device for device in await self.hub.store.list_devices(user, include_revoked=True)}
        for device in self.hub.registry.devices.values():
            if user is not None and device.user != user:
                continue
            stored = records.get(device.id)
            if stored is not None and stored.revoked_at is not None and device.revoked_at is None:
                continue  # revoked by another process; this node hears of it within a second
            records[device.id] = device
        return records

    # ---- read-only endpoints -------------------------------------------------------

    async def stats(self, request: Request, params: list[str]) -> Response:
        _query(request, set())
        hub = self.hub
        now = now_ms()
        devices = hub.registry.devices.values()
        revoked = sum(1 for device in devices if device.revoked_at is not None)
        route_stats: dict[str, Any] = hub.stats.snapshot()
        info = hub.server_info()
        return json_response(200, {
            "version": info["version"],
            "implementation": info["implementation"],
            "started_at": int(hub.started_at * 1000),
            "uptime_seconds": round(max(0.0, now / 1000 - hub.started_at), 3),
            "ready": self.is_ready(),
            "connections": {
                "open": hub.connection_count,
                "authenticated": len(hub.routing),
                "by_device_type": dict(sorted(hub.routing.count_by_type().items())),
                "max": hub.settings.max_connections,
            },
            "sessions": {"live": len(hub.live), "resumable": len(hub.detached)},
            "registry": {"users": len(hub.registry.users), "devices": len(hub.registry.devices) - revoked,
                         "revoked_devices": revoked},
            "pairing_requests_pending": len(self.pairing.requests),
            "routing": {"results": route_stats["results"], "frames_in": route_stats["frames_in"],
                        "frames_out": route_stats["frames_out"]},
            "events": dict(sorted(hub.events.items())),
            "bus_events": dict(sorted(hub.bus.counts.items())),
            "errors_sent": dict(sorted(hub.errors_sent.items())),
            "closes_sent": {str(code): count for code, count in sorted(hub.closes_sent.items())},
            "deliveries": {**hub.deliveries.stats, "in_flight": len(hub.deliveries.in_flight),
                           "receipts_undeliverable": hub.receipts_undeliverable},
            "backend": {"published": self.receipts.published, "receipts": dict(sorted(self.receipts.counts.items()))},
        })

    async def users(self, request: Request, params: list[str]) -> Response:
        _query(request, set())
        hub = self.hub
        created = {user.id: user.created for user in await hub.store.list_users()}
        for user in hub.registry.users:
            created.setdefault(user, 0)  # registered by a dev token a moment ago; the store follows
        counts: dict[str, list[int]] = {user: [0, 0] for user in created}
        for device in (await self._merged_devices(None)).values():
            if device.revoked_at is None and device.user in counts:
                counts[device.user][0] += 1
                counts[device.user][1] += hub.router.status_of(device.id) != "offline"
        views = [{"id": user, "created": created[user], "devices": counts[user][0], "online": counts[user][1]}
                 for user in sorted(created)]
        return json_response(200, {"users": views})

    async def user_devices(self, request: Request, params: list[str]) -> Response:
        include_revoked = _flag(_query(request, {"all"}), "all")
        user = _check_id("user", params[0])
        if not await self._known_user(user):
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown user {user!r}")
        records = await self._merged_devices(user)
        views = [self._device_view(device) for device in sorted(records.values(), key=lambda d: (d.created, d.id))
                 if include_revoked or device.revoked_at is None]
        return json_response(200, {"user": user, "devices": views})

    async def _user_device_filter(self, query: dict[str, str]) -> tuple[str | None, str | None]:
        """The ``user`` and ``device`` query parameters, checked: 400 if malformed, 404 if unknown."""
        user = query.get("user")
        device = query.get("device")
        if user is not None:
            _check_id("user", user)
            if not await self._known_user(user):
                raise ApiError(ErrorCode.NOT_FOUND, f"unknown user {user!r}")
        if device is not None:
            await self._device(device)
        return user, device

    async def user_tasks(self, request: Request, params: list[str]) -> Response:
        _query(request, set())
        user = _check_id("user", params[0])
        if not await self._known_user(user):
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown user {user!r}")
        return json_response(200, {"user": user, "tasks": await self.tasks.list_tasks(user)})

    async def sessions(self, request: Request, params: list[str]) -> Response:
        hub = self.hub
        user, device = await self._user_device_filter(_query(request, {"user", "device"}))
        now = now_ms()
        views = []
        for record in await hub.list_sessions(user, device):
            view = admin.session_view(record)
            view["state"] = _session_state(record, now)
            view["resumable"] = record.id in hub.detached
            views.append(view)
        return json_response(200, {"sessions": views})

    async def inbox(self, request: Request, params: list[str]) -> Response:
        limit = _limit(_query(request, {"limit"}))
        device = await self._device(params[0])
        messages, count, size = await admin.device_inbox(self.hub.store, device.id, now_ms(), limit + 1)
        return json_response(200, {"device": device.id, "count": count, "bytes": size,
                                    "messages": [admin.queued_view(m) for m in messages[:limit]],
                                    "more": len(messages) > limit})

    async def dead_letters(self, request: Request, params: list[str]) -> Response:
        query = _query(request, {"user", "device", "limit"})
        limit = _limit(query)
        user, device = await self._user_device_filter(query)
        letters = await self.hub.store.dead_letters(user, device, limit + 1)
        return json_response(200, {"dead_letters": [admin.dead_letter_view(d) for d in letters[:limit]],
                                    "more": len(letters) > limit})

    # ---- changes -------------------------------------------------------------------

    async def revoke_device(self, request: Request, params: list[str]) -> Response:
        _query(request, set())
        hub = self.hub
        device_id = _check_id("device", params[0])
        if hub.registry.get(device_id) is None:
            await self._catch_up()
        record = hub.registry.get(device_id)
        if record is None:
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown device {device_id!r}")
        if record.revoked_at is not None or not hub.revoke_device(device_id, now_ms()):
            raise ApiError(ErrorCode.REVOKED, f"device {device_id!r} is already revoked")
        log.info("admin API: revoked device %s of user %s", device_id, record.user)
        return json_response(200, {"device": self._device_view(record)})

    async def revoke_session(self, request: Request, params: list[str]) -> Response:
        _query(request, set())
        hub = self.hub
        session_id = params[0]
        if len(session_id) > MAX_ID_CHARS:
            raise ApiError(ErrorCode.BAD_REQUEST, f"session ids are at most {MAX_ID_CHARS} characters")
        live = hub.live.get(session_id)
        record: SessionRecord | None = live.snapshot(with_pending=False) if live is not None \
            else hub.detached.get(session_id)
        if record is None:
            record = await hub.store.get_session(session_id)
            if record is None:
                raise ApiError(ErrorCode.NOT_FOUND, f"unknown session {session_id!r}")
            if record.revoked_at is not None:
                raise ApiError(ErrorCode.REVOKED, f"session {session_id!r} is already revoked")
        now = now_ms()
        hub.revoke_session(session_id, now)
        log.info("admin API: revoked session %s of device %s", session_id, record.device)
        return json_response(200, {"session": session_id, "user": record.user, "device": record.device,
                                    "revoked_at": now})

    async def purge_inbox(self, request: Request, params: list[str]) -> Response:
        _query(request, set())
        device = await self._device(params[0])
        purged = await admin.purge_inbox(self.hub.store, device.id)
        log.info("admin API: purged %d message(s) from the inbox of device %s", purged, device.id)
        return json_response(200, {"device": device.id, "purged": purged})

    async def redrive(self, request: Request, params: list[str]) -> Response:
        _query(request, set())
        body = _json_body(request)
        unknown = set(body) - {"ids", "device"}
        if unknown:
            raise ApiError(ErrorCode.BAD_REQUEST, f"unknown field {sorted(unknown)[0][:64]!r}")
        if ("ids" in body) == ("device" in body):
            raise ApiError(ErrorCode.BAD_REQUEST, "give 'ids' (a list of dead letter ids) or 'device', not both")
        store = self.hub.store
        try:
            if "device" in body:
                if not isinstance(body["device"], str):
                    raise ApiError(ErrorCode.BAD_REQUEST, "'device' must be a device id")
                device = await self._device(body["device"])
                if device.revoked_at is not None:
                    raise ApiError(ErrorCode.REVOKED, f"device {device.id!r} is revoked: its messages can never "
                                                      "be delivered")
                moved = await admin.redrive_dead_letters(store, device_id=device.id)
            else:
                ids = body["ids"]
                if not isinstance(ids, list) or not ids or len(ids) > MAX_REDRIVE_IDS or not all(
                        isinstance(i, int) and not isinstance(i, bool) and 0 < i < 2**63 for i in ids):
                    raise ApiError(ErrorCode.BAD_REQUEST, f"'ids' must be a list of 1 to {MAX_REDRIVE_IDS} "
                                                          "dead letter ids (positive integers)")
                dead = {letter.message.id: letter.message for letter in await store.dead_letters(limit=sys.maxsize)}
                missing = [str(i) for i in sorted(set(ids)) if i not in dead]
                if missing:
                    raise ApiError(ErrorCode.NOT_FOUND, f"no dead letter with id {', '.join(missing[:20])}")
                moved = await admin.redrive_dead_letters(store, ids=ids)
        except admin.AdminError as exc:  # e.g. a dead letter of a revoked device, or a race with the CLI
            raise ApiError(ErrorCode.REVOKED if "revoked" in str(exc) else ErrorCode.BAD_REQUEST, str(exc),
                           409) from None
        now = now_ms()
        per_device: collections.Counter[str] = collections.Counter()
        expired = 0
        for message in moved:
            per_device[message.device] += 1
            if message.expires_at is not None and message.expires_at <= now:
                expired += 1
                continue
            # In the server's own process a connected device need not reconnect: it gets them now.
            target = self.hub.online(message.user, message.device)
            if target is not None and target.inbox_loaded and target.state_is_open():
                self.hub.deliveries.deliver(target, message)
        log.info("admin API: redrove %d dead letter(s)", len(moved))
        return json_response(200, {"redriven": len(moved), "devices": dict(sorted(per_device.items())),
                                    "expired": expired})

    async def publish(self, request: Request, params: list[str]) -> Response:
        _query(request, set())
        body = _json_body(request)
        hub = self.hub
        unknown = set(body) - PUBLISH_FIELDS
        if unknown:
            raise ApiError(ErrorCode.BAD_REQUEST, f"unknown field {sorted(unknown)[0][:64]!r}")
        user = body.get("user")
        if not isinstance(user, str):
            raise ApiError(ErrorCode.BAD_REQUEST, "'user' must be a user id")
        _check_id("user", user)
        if user not in hub.registry.users and not hub.registry.user_devices(user) and not await self._stored_user(user):
            raise ApiError(ErrorCode.NOT_FOUND, f"unknown user {user!r}")
        if self.receipts.owns_server_device(user):
            raise ApiError(ErrorCode.FORBIDDEN, f"user {user!r} has a device named {SERVER_SENDER!r}, the sender id "
                                                "of backend messages; revoke that device to publish to this user")
        ack = body.get("ack", False)
        ttl = body.get("ttl")
        if isinstance(ttl, int) and not isinstance(ttl, bool) and ttl > hub.settings.max_ttl:
            # checked here too: an integer too big for a float would not compare in the send path
            raise ApiError(ErrorCode.TOO_LARGE,
                           f"'ttl' is longer than the server's max_ttl ({hub.settings.max_ttl:g} s)")
        msg_id = body.get("id")
        if msg_id is None:
            msg_id = "srv-" + secrets.token_urlsafe(12)
        try:
            msg_id = check_message_id(msg_id)
        except ProtocolError as exc:
            raise ApiError(exc.code, exc.message) from None
        header: dict[str, Any] = {"op": "send", "id": msg_id}
        header.update((key, value) for key, value in body.items() if key not in ("user", "id"))
        looked_up = self.messaging.unknown_devices(header)
        if looked_up:  # registered on another node a moment ago: in the shared store
            try:
                await hub.router.look_up_devices(looked_up)
            except StoreError:
                raise ApiError(ErrorCode.UNAVAILABLE, "the store cannot be reached; nothing was sent", 503) from None
        key = (user, msg_id)
        collected: list[dict[str, Any]] = []
        if ack is True and key not in self.receipts.waiting:
            self.receipts.waiting[key] = collected
        try:
            try:
                sender = self.messaging.publish(user, header)
            except ProtocolError as exc:
                raise ApiError(exc.code, exc.message) from None
            if ack is not True:
                return json_response(200, {"id": msg_id, "ack": False})
            # The inbox write is committed within this flush; its queued/accepted/inbox_full receipts come meanwhile.
            await hub.deliveries.flush()
        finally:
            if self.receipts.waiting.get(key) is collected:
                del self.receipts.waiting[key]
        errors = [envelope for envelope in sender.envelopes if envelope.get("op") == "error"]
        if errors:  # answered like a device would be (e.g. duplicate_id): nothing was sent
            code = str(errors[0].get("code"))
            known = {member.value for member in ErrorCode}
            raise ApiError(ErrorCode(code) if code in known else ErrorCode.BAD_REQUEST,
                           str(errors[0].get("message", "")))
        receipts = sender.envelopes + collected
        if any(r.get("status") == "duplicate" for r in receipts):
            return json_response(200, {"id": msg_id, "ack": True, "duplicate": True, "routed": [], "queued": [],
                                       "failed": [], "receipts": receipts})
        routed = next((r for r in receipts if r.get("status") == "routed"), {})
        failed = [{"device": r.get("device"), "reason": r.get("reason")} for r in receipts
                  if r.get("status") == "failed"]
        return json_response(200, {
            "id": msg_id, "ack": True, "duplicate": False,
            "routed": routed.get("devices", []), "queued": routed.get("queued", []), "failed": failed,
            "receipts": receipts,
        })


def admin_handler(hub: Hub, key: str, is_ready: Callable[[], bool], messaging: Messaging, pairing: Pairing,
                  tasks: Tasks) -> Callable[[Request], Awaitable[Response]] | None:
    """The ``/admin/`` handler, or None when ``key`` is empty (the API is off)."""
    if not key:
        return None
    return AdminAPI(hub, key, is_ready, messaging, pairing, tasks)

