"""Device tokens: JWT HS256 (PyJWT) naming a user and one of its devices.

The signing secret comes from settings, or is generated once into
``<data_dir>/token.key`` (mode 0600) by whichever of ``rccs serve`` or
``rccs token issue`` runs first.
"""

from __future__ import annotations

import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

import jwt

TOKEN_TYPE = "rccs-device"
ALGORITHM = "HS256"
SECRET_FILE = "token.key"
# Verdicts kept for tokens seen recently: a device that reconnects (a network blip reconnects every device of
# a region at once) presents the same token again, and PyJWT's check is ~100 us of a hello's ~450.
VERIFIED_TOKENS = 4096
_ID_PATTERN = re.compile(r"[A-Za-z0-9._:@-]{1,128}")


class TokenError(Exception):
    """A token that does not prove anything: malformed, forged, expired or of the wrong kind."""


@dataclass(frozen=True)
class Identity:
    user: str
    device: str
    expires_at: int


def valid_id(value: object) -> bool:
    """User and device ids: 1-128 characters from ``A-Z a-z 0-9 . _ : @ -``."""
    return isinstance(value, str) and _ID_PATTERN.fullmatch(value) is not None


def load_or_create_secret(data_dir: str) -> bytes:
    """Return the token secret stored in ``data_dir``, creating it atomically if missing."""
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / SECRET_FILE
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        secret = path.read_text().strip()
        if len(secret) < 32:
            raise TokenError(f"{path} holds no usable secret (expected 64 hex characters)") from None
        return secret.encode()
    secret = secrets.token_hex(32)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret + "\n")
    return secret.encode()


def read_secret(data_dir: str) -> bytes | None:
    """The token secret kept in ``data_dir``, or None if there is none (nothing is created)."""
    path = Path(data_dir) / SECRET_FILE
    if not path.exists():
        return None
    return load_or_create_secret(data_dir)


def adopt_secret(data_dir: str, secret: bytes) -> bytes:
    """Keep ``secret`` in ``data_dir`` unless it holds a secret already; returns the one it holds after."""
    directory = Path(data_dir)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(directory / SECRET_FILE, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return load_or_create_secret(data_dir)
    with os.fdopen(fd, "w") as fh:
        fh.write(secret.decode() + "\n")
    return secret


class TokenAuthority:
    """Issues and verifies device tokens with one secret.

    A token that verified is remembered (its identity, up to ``verified_tokens`` of them, the oldest
    forgotten first) until it expires: presented again, it is answered without PyJWT. Only tokens this
    secret signed get in, so forged or malformed ones cannot fill it; a revoked device is refused after
    this check, from the registry."""

    def __init__(self, secret: bytes, verified_tokens: int = VERIFIED_TOKENS):
        if len(secret) < 16:
            raise ValueError("token secret must be at least 16 bytes")
        self._secret = secret
        self._verified: dict[str, Identity] = {}
        self._verified_max = verified_tokens

    def issue(self, user: str, device: str, ttl_seconds: float, now: float | None = None) -> str:
        if not valid_id(user):
            raise ValueError(f"invalid user id {user!r}: use 1-128 characters from A-Z a-z 0-9 . _ : @ -")
        if not valid_id(device):
            raise ValueError(f"invalid device id {device!r}: use 1-128 characters from A-Z a-z 0-9 . _ : @ -")
        if ttl_seconds <= 0:
            raise ValueError("ttl must be positive")
        issued = int(time.time() if now is None else now)
        claims = {"typ": TOKEN_TYPE, "sub": user, "dev": device, "iat": issued, "exp": issued + int(ttl_seconds)}
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)

    def verify(self, token: object) -> Identity:
        if not isinstance(token, str) or not token:
            raise TokenError("token missing")
        known = self._verified.get(token)
        if known is not None:
            if time.time() < known.expires_at:  # PyJWT's rule: expired once exp <= now
                return known
            del self._verified[token]
            raise TokenError("token expired")
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=[ALGORITHM], options={"require": ["exp", "sub", "dev", "typ"]}
            )
        except jwt.ExpiredSignatureError:
            raise TokenError("token expired") from None
        except jwt.InvalidTokenError as exc:
            raise TokenError(f"invalid token: {exc}") from None
        if claims.get("typ") != TOKEN_TYPE or not valid_id(claims.get("sub")) or not valid_id(claims.get("dev")):
            raise TokenError("invalid token: not an rccs device token")
        identity = Identity(user=claims["sub"], device=claims["dev"], expires_at=int(claims["exp"]))
        if self._verified_max > 0:
            if len(self._verified) >= self._verified_max:
                del self._verified[next(iter(self._verified))]
            self._verified[token] = identity
        return identity

    @property
    def remembered(self) -> int:
        """How many verified tokens are remembered now."""
        return len(self._verified)


def parse_duration(text: str) -> float:
    """``90``, ``90s``, ``15m``, ``12h``, ``30d`` -> seconds."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    text = text.strip().lower()
    factor = 1
    if text and text[-1] in units:
        factor = units[text[-1]]
        text = text[:-1]
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"invalid duration {text!r}: use e.g. 90s, 15m, 12h, 30d") from None
    if value <= 0:
        raise ValueError("duration must be positive")
    return value * factor
