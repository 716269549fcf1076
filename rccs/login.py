"""Proving who a device is: the credential and dev-token check of ``hello`` and ``refresh``, once.

A credential (from pairing or the CLI) is looked up by its hash in the registry; one this node has not
seen yet (made by the CLI a moment ago) is looked up in the store once (``look_up_credential``) before it
is refused. A dev token (``dev_tokens``) is verified with the server's secret; a device first seen with a
token is registered with its user. Hellos are rate-limited per client address (``hello_rate_per_address``).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from .auth import Identity, TokenError
from .clock import now_ms
from .credentials import looks_like_credential, secret_hash
from .errors import CloseCode, CredentialNotCached, ErrorCode, HelloRefused, ProtocolError
from .limits import AddressLimiter
from .protocol import parse_device_fields

if TYPE_CHECKING:
    from .contracts import Conn, Handler
    from .hub import Hub
    from .store import DeviceRecord

log = logging.getLogger("rccs.login")


class Login:
    """The hello check of one node (``hub.login``) and the ``refresh`` op."""

    def __init__(self, hub: Hub):
        self.hub = hub
        settings = hub.settings
        self.hello_limiter = AddressLimiter(max(1.0, 5 * settings.hello_rate_per_address),
                                            settings.hello_rate_per_address)
        self.ops: dict[str, Handler] = {"refresh": self.op_refresh}

    def hello_wait(self, peer: str) -> float:
        """0 if a hello from ``peer``'s address may go ahead now, else the seconds until one may."""
        if self.hub.settings.hello_rate_per_address <= 0:
            return 0.0
        return self.hello_limiter.take(peer.rsplit(":", 1)[0], time.monotonic())

    # ---- the two proofs ----------------------------------------------------------

    def _credential_device(self, credential: Any, looked_up: bool) -> DeviceRecord | None:
        """The live device a well-formed credential belongs to; None if unknown or revoked. Raises
        CredentialNotCached when the store has not been asked yet (``looked_up`` False)."""
        credential_hash = secret_hash(credential)
        device = self.hub.registry.by_credential(credential_hash)
        if device is None and not looked_up:
            raise CredentialNotCached(credential_hash)
        return device

    def _token_identity(self, token: Any) -> Identity:
        """A verified dev token's identity. Raises HelloRefused (4401)."""
        if not self.hub.settings.dev_tokens:
            raise HelloRefused(ErrorCode.UNAUTHORIZED, "this server does not accept dev tokens; use a credential",
                               CloseCode.UNAUTHORIZED)
        try:
            return self.hub.tokens.verify(token)
        except TokenError as exc:
            raise HelloRefused(ErrorCode.UNAUTHORIZED, str(exc), CloseCode.UNAUTHORIZED) from None

    # ---- hello ----------------------------------------------------------------------

    def authenticate(self, header: dict[str, Any], device_map: Any,
                     looked_up: bool = True) -> tuple[DeviceRecord, int]:
        """The device a hello proves, and when that proof expires (ms). Raises HelloRefused, or
        CredentialNotCached (ask the store: ``look_up_credential``, then call again with ``looked_up``).

        Applies ``device_map`` (the device's self-description) to the registry; a dev token for an
        unknown device registers it (and its user).
        """
        hub = self.hub
        router = hub.router
        settings = hub.settings
        now = now_ms()
        credential = header.get("credential")
        token = header.get("token")
        if credential is not None:
            if not looks_like_credential(credential):
                raise HelloRefused(ErrorCode.UNAUTHORIZED, "malformed credential", CloseCode.UNAUTHORIZED)
            device = self._credential_device(credential, looked_up)
            if device is None:
                raise HelloRefused(ErrorCode.UNAUTHORIZED, "unknown or revoked credential", CloseCode.UNAUTHORIZED)
            expires_at = now + int(settings.session_ttl * 1000)
            fields = {} if device_map is None else parse_device_fields(device_map, settings.max_metadata_bytes, False)
        else:
            if token is None:
                raise HelloRefused(ErrorCode.UNAUTHORIZED, "a 'credential' or 'token' is required",
                                   CloseCode.UNAUTHORIZED)
            identity = self._token_identity(token)
            known = hub.registry.get(identity.device)
            fields = {} if device_map is None and known is not None else \
                parse_device_fields(device_map, settings.max_metadata_bytes, known is None)
            if known is not None and known.user != identity.user:
                raise HelloRefused(ErrorCode.FORBIDDEN, "this device id belongs to another user", CloseCode.FORBIDDEN)
            if known is not None and known.revoked_at is not None:
                raise HelloRefused(ErrorCode.REVOKED, "this device was revoked", CloseCode.REVOKED)
            device = known if known is not None else router.register_device(identity.user, identity.device, now)
            expires_at = identity.expires_at * 1000
        if fields:
            router.update_device(device, fields)
        return device, expires_at

    async def look_up_credential(self, credential_hash: str) -> None:
        """Bring a credential's device from the store into the registry, if it is there and not revoked."""
        hub = self.hub
        try:
            device = await hub.store.find_device_by_credential(credential_hash)
        except Exception:
            log.exception("looking up a credential failed")
            return
        known = hub.registry.get(device.id) if device is not None else None
        if device is not None and device.revoked_at is None and (known is None or known.revoked_at is None):
            hub.router.adopt(device)

    # ---- refresh ------------------------------------------------------------------------

    def op_refresh(self, conn: Conn, header: dict[str, Any]) -> None:
        """A fresh credential or token extends the session without reconnecting."""
        credential = header.get("credential")
        token = header.get("token")
        if credential is not None:
            device = self._credential_device(credential, True) if looks_like_credential(credential) else None
            if device is None:
                raise ProtocolError(ErrorCode.UNAUTHORIZED, "unknown or revoked credential")
            expires_at = now_ms() + int(self.hub.settings.session_ttl * 1000)
            device_id = device.id
        elif token is not None:
            try:
                identity = self._token_identity(token)
            except HelloRefused as refusal:
                raise ProtocolError(refusal.error, refusal.message) from None
            device_id = identity.device
            expires_at = identity.expires_at * 1000
        else:
            raise ProtocolError(ErrorCode.BAD_REQUEST, "refresh needs a 'credential' or a 'token'")
        if device_id != conn.device:
            raise ProtocolError(ErrorCode.FORBIDDEN, "the credential or token is for another device")
        conn.extend(expires_at)
        conn.reply(header, {"op": "refreshed", "expires_at": expires_at})
