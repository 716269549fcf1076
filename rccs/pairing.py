"""Pairing: how a new device joins a user with a short code.

1. A signed-in device sends ``pair.create``; the code is stored (hash only) and
   returned with a URI for a QR code. ``rccs users add``/``users pair`` make
   codes from the command line the same way.
2. The new device connects and, instead of ``hello``, sends ``pair.redeem``
   with the code and its self-description. Attempts are rate-limited per client
   address; the store burns a code after ``pairing_max_attempts`` wrong secrets.
   A wrong, expired, used or burnt code all get the same ``invalid_code``.
3. If the code needs approval, the user's online devices get ``pair.request``
   and the new device ``pair.pending``; ``pair.approve`` or ``pair.deny`` from
   any of them decides (no answer before the deadline is a denial).
4. The device is registered with a fresh credential: the new device gets
   ``paired`` (its id and credential, shown once) and then ``welcome``; the
   user's other online devices get ``pair.joined``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import secrets
import time
from typing import TYPE_CHECKING, Any

from . import admin
from .clock import now_ms
from .credentials import parse_pairing_code
from .errors import CloseCode, ErrorCode, ProtocolError
from .limits import AddressLimiter
from .protocol import MAX_ID_CHARS, parse_device_fields

if TYPE_CHECKING:
    from .contracts import Conn, Handler
    from .hub import Hub

log = logging.getLogger("rccs.pairing")

MAX_CODE_TTL = 3600.0
# Broker channel (several nodes): requests waiting on a node ("open"/"closed") and decisions made on
# another node ("decide"), so that any device of the user can approve wherever the new device waits.
PAIRING_REQUESTS = "pair.requests"
INVALID_CODE_MESSAGE = "invalid pairing code: wrong, expired or already used"


@dataclasses.dataclass
class PairingRequest:
    """A redeemed code that waits for one of the user's devices to approve the new device."""

    id: str
    user: str
    session: Conn
    fields: dict[str, Any]
    expires_at: int
    redeem: dict[str, Any]  # the pair.redeem envelope: its id is echoed in the answers
    timer: asyncio.TimerHandle | None = None


class Pairing:
    """The pairing requests waiting for approval and the redemption rate limit of one node; the ``pair.*``
    ops (``pair.redeem`` in place of a hello)."""

    def __init__(self, hub: Hub):
        self.hub = hub
        settings = hub.settings
        self.requests: dict[str, PairingRequest] = {}
        self.elsewhere: dict[str, tuple[str, int]] = {}  # request id -> (user, expires_at), waiting on other nodes
        self.limiter = AddressLimiter(settings.pairing_attempts_per_minute, settings.pairing_attempts_per_minute / 60.0)
        # The ops are module functions that take the feature first.
        self.ops: dict[str, Handler] = {
            "pair.create": functools.partial(op_create, self),
            "pair.approve": functools.partial(op_approve, self),
            "pair.deny": functools.partial(op_deny, self),
        }
        self.hello_ops: dict[str, Handler] = {"pair.redeem": functools.partial(redeem, self)}

    def on_abandon(self, session: Conn) -> None:
        abandon(self, session)

    def announce(self, event: list[Any]) -> None:
        if self.hub.broker.spans_nodes:
            self.hub.broker.publish(PAIRING_REQUESTS, event)

    def on_event(self, event: list[Any]) -> None:
        """What another node said about its pairing requests (this node's own announcements come back too)."""
        kind = event[0]
        if kind == "open":
            _, request_id, user, expires_at = event
            now = now_ms()  # requests of a node that died are never closed: they go when they expire
            for stale in [key for key, (_, until) in self.elsewhere.items() if until <= now]:
                del self.elsewhere[stale]
            if request_id not in self.requests:
                self.elsewhere[request_id] = (user, expires_at)
        elif kind == "closed":
            self.elsewhere.pop(event[1], None)
        elif kind == "decide":
            _, request_id, approved, by_device = event
            request = self.requests.get(request_id)
            if request is None:
                return  # decided already, withdrawn, or waiting on another node
            if approved:
                approve(self, request, by_device)
            else:
                deny(self, request, "pairing denied", "denied")


def _address(session: Conn) -> str:
    return session.peer.rsplit(":", 1)[0]


# ---- the issuing side ----------------------------------------------------


def op_create(pairing: Pairing, session: Conn, header: dict[str, Any]) -> None:
    hub = pairing.hub
    settings = hub.settings
    approve = header.get("approve", False)
    if not isinstance(approve, bool):
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'approve' must be a boolean")
    ttl = header.get("ttl", settings.pairing_code_ttl)
    if isinstance(ttl, bool) or not isinstance(ttl, int | float) or not 0 < ttl <= MAX_CODE_TTL:
        raise ProtocolError(ErrorCode.BAD_REQUEST, f"'ttl' must be a number of seconds in (0, {MAX_CODE_TTL:g}]")
    approve = approve or settings.pairing_approval
    assert session.user is not None

    async def work() -> None:
        code = await admin.create_pairing_code(
            hub.store, session.user, issuer_device=session.device, ttl_seconds=float(ttl),  # type: ignore[arg-type]
            approve=approve, public_url=settings.public_url, now=now_ms(),
        )
        session.reply(header, {"op": "pair.code", "approve": approve, **code})

    session.run_request(header, work)


def _request(pairing: Pairing, session: Conn, header: dict[str, Any]) -> PairingRequest | str:
    """The user's pending request the op names: waiting here, or (its id) waiting on another node."""
    request_id = header.get("request")
    if not isinstance(request_id, str) or not 0 < len(request_id) <= MAX_ID_CHARS:
        raise ProtocolError(ErrorCode.BAD_REQUEST, "'request' must be a pairing request id string")
    request = pairing.requests.get(request_id)
    if request is not None and request.user == session.user:
        return request
    waiting = pairing.elsewhere.get(request_id)
    if waiting is not None and waiting[0] == session.user and waiting[1] > now_ms():
        return request_id
    raise ProtocolError(ErrorCode.NOT_FOUND, f"no pending pairing request {request_id!r}")


def _decide(pairing: Pairing, session: Conn, header: dict[str, Any], approved: bool) -> None:
    request = _request(pairing, session, header)
    session.reply(header, {"op": "ok"})
    if isinstance(request, str):  # its node decides; a second decision from here is not_found
        pairing.elsewhere.pop(request, None)
        pairing.announce(["decide", request, approved, session.device])
    elif approved:
        approve(pairing, request, session.device)
    else:
        deny(pairing, request, "pairing denied", "denied")


def op_approve(pairing: Pairing, session: Conn, header: dict[str, Any]) -> None:
    _decide(pairing, session, header, True)


def op_deny(pairing: Pairing, session: Conn, header: dict[str, Any]) -> None:
    _decide(pairing, session, header, False)


def approve(pairing: Pairing, request: PairingRequest, approver: str | None) -> None:
    _forget(pairing, request)
    pairing.hub.spawn(_complete_safely(pairing, request.session, request.user, request.fields, request.redeem,
                                       approver))


def deny(pairing: Pairing, request: PairingRequest, reason: str, why: str) -> None:
    """Refuse the waiting device; the user's devices learn that the request is gone (``why``)."""
    _forget(pairing, request)
    pairing.hub.events["pairing_denied"] += 1
    pairing.hub.router.notify_user(request.user, {"op": "pair.withdrawn", "request": request.id, "reason": why})
    request.session.send_error(ErrorCode.FORBIDDEN, reason, request.redeem.get("id"))
    request.session.close(CloseCode.FORBIDDEN, reason)


def _forget(pairing: Pairing, request: PairingRequest) -> None:
    if pairing.requests.pop(request.id, None) is not None:
        pairing.announce(["closed", request.id])
    if request.timer is not None:
        request.timer.cancel()


def abandon(pairing: Pairing, session: Conn) -> None:
    """The new device went away while waiting: its request is withdrawn."""
    for request in [r for r in pairing.requests.values() if r.session is session]:
        _forget(pairing, request)
        pairing.hub.router.notify_user(request.user, {"op": "pair.withdrawn", "request": request.id,
                                                      "reason": "left"})


# ---- the new device's side ---------------------------------------------


def redeem(pairing: Pairing, session: Conn, header: dict[str, Any]) -> None:
    """``pair.redeem`` in place of hello. Failures answer with an error and leave the connection waiting
    for another attempt (or a hello) until the hello timeout."""
    hub = pairing.hub
    msg_id = header.get("id")
    try:
        wait = pairing.limiter.take(_address(session), time.monotonic())
        if wait:
            hub.events["pairing_rate_limited"] += 1
            raise ProtocolError(ErrorCode.RATE_LIMITED, "too many pairing attempts from this address",
                                retry_after=round(wait, 1))
        fields = parse_device_fields(header.get("device"), hub.settings.max_metadata_bytes, True)
        parsed = parse_pairing_code(header.get("code"))
        if parsed is None:
            hub.events["pairing_failed"] += 1
            raise ProtocolError(ErrorCode.INVALID_CODE, INVALID_CODE_MESSAGE)
    except ProtocolError as exc:
        extra = {"retry_after": exc.retry_after} if exc.retry_after is not None else {}
        session.send_error(exc.code, exc.message, msg_id, **extra)
        return
    session.await_approval()  # no hello or second redeem while the store answers
    hub.spawn(_redeem_safely(pairing, session, header, parsed[0], parsed[1], fields))


async def _redeem_safely(pairing: Pairing, session: Conn, header: dict[str, Any], code_id: str, code_hash: str,
                         fields: dict[str, Any]) -> None:
    """A failure (e.g. the store) must not leave an unauthenticated connection waiting forever."""
    try:
        await _redeem(pairing, session, header, code_id, code_hash, fields)
    except Exception:
        log.exception("pairing redemption from %s failed", session.peer)
        session.send_error(ErrorCode.INTERNAL, "internal server error", header.get("id"))
        session.close(CloseCode.INTERNAL_ERROR, "pairing failed")


async def _issuer_is_valid(hub: Hub, user: str, issuer: str | None) -> bool:
    """The code's user exists and its issuing device (if any) was not revoked since it made the code."""
    if user not in hub.registry.users:
        if await hub.store.get_user(user) is None:  # the CLI may have added the user a moment ago
            return False
        hub.registry.users.add(user)
    if issuer is None:
        return True
    device = hub.registry.get(issuer) or await hub.store.get_device(issuer)
    return device is not None and device.revoked_at is None and device.user == user


async def _redeem(pairing: Pairing, session: Conn, header: dict[str, Any], code_id: str, code_hash: str,
                  fields: dict[str, Any]) -> None:
    hub = pairing.hub
    settings = hub.settings
    code = await hub.store.redeem_pairing_code(code_id, code_hash, now_ms(), settings.pairing_max_attempts)
    if session.closed:
        return  # the code is used up; the user makes another
    if code is None or not await _issuer_is_valid(hub, code.user, code.issuer_device):
        hub.events["pairing_failed"] += 1
        session.back_to_hello()
        session.send_error(ErrorCode.INVALID_CODE, INVALID_CODE_MESSAGE, header.get("id"))
        if now_ms() - session.connected_at > settings.hello_timeout * 1000:
            session.close(CloseCode.HELLO_TIMEOUT, "no hello in time")
        return
    now = now_ms()
    if not code.approve:
        await _complete(pairing, session, code.user, fields, header, code.issuer_device)
        return
    if session.closed:
        return
    request = PairingRequest(id=secrets.token_urlsafe(9), user=code.user, session=session, fields=fields,
                             expires_at=now + int(settings.pairing_code_ttl * 1000), redeem=header)
    request.timer = asyncio.get_running_loop().call_later(
        settings.pairing_code_ttl, deny, pairing, request, "pairing not approved in time", "expired"
    )
    pairing.requests[request.id] = request
    pairing.announce(["open", request.id, code.user, request.expires_at])
    session.reply(header, {"op": "pair.pending", "request": request.id, "expires_at": request.expires_at})
    hub.router.notify_user(code.user, {
        "op": "pair.request", "request": request.id, "issuer": code.issuer_device,
        "device": {name: (list(value) if name == "capabilities" else value) for name, value in fields.items()},
        "address": _address(session), "expires_at": request.expires_at,
    })


async def _complete_safely(pairing: Pairing, session: Conn, user: str, fields: dict[str, Any],
                           header: dict[str, Any], approver: str | None) -> None:
    try:
        await _complete(pairing, session, user, fields, header, approver)
    except Exception:
        log.exception("completing a pairing for user %s failed", user)
        session.send_error(ErrorCode.INTERNAL, "internal server error", header.get("id"))
        session.close(CloseCode.INTERNAL_ERROR, "pairing failed")


async def _complete(pairing: Pairing, session: Conn, user: str, fields: dict[str, Any], header: dict[str, Any],
                    approver: str | None) -> None:
    """Register the new device with a fresh credential and open its session."""
    hub = pairing.hub
    now = now_ms()
    try:
        record, credential = await admin.create_device(
            hub.store, user, device_type=fields["type"], name=fields.get("name", ""),
            platform=fields.get("platform", ""), version=fields.get("version", ""),
            capabilities=fields.get("capabilities", ()), metadata=fields.get("metadata"), now=now,
        )
    except admin.AdminError as exc:  # the user was removed meanwhile
        log.info("pairing for user %s failed: %s", user, exc)
        session.send_error(ErrorCode.INVALID_CODE, INVALID_CODE_MESSAGE, header.get("id"))
        session.close(CloseCode.FORBIDDEN, "pairing failed")
        return
    if session.closed:
        # Nobody holds the credential: do not leave a device behind that no one can use or see revoked.
        await hub.store.revoke_device(record.id, now)
        return
    hub.registry.put(record)
    hub.events["pairing_completed"] += 1
    hub.bus.emit("device.registered", user=user, device=record.id, via="pairing")
    hub.bus.emit("pairing.completed", user=user, device=record.id, approved_by=approver)
    session.reply(header, {"op": "paired", "user": user, "device": record.id, "credential": credential})
    session.open(record, now + int(hub.settings.session_ttl * 1000), None)
    hub.router.notify_user(user, {"op": "pair.joined", "device": hub.router.device_info(record),
                                  "approved_by": approver}, exclude=record.id)
    log.info("device %s joined user %s by pairing", record.id, user)
