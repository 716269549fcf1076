"""Device credentials and pairing codes: how they look, how they are made, how they are checked.

A device credential is ``rccs_`` plus 43 URL-safe characters (256 random bits).
The store keeps only its SHA-256: with that much entropy a fast hash is as good
as a slow one (nothing to brute-force), and a lookup by hash needs no device id
in the credential.

A pairing code is eight characters of Crockford's base32 shown as ``ABCD-EFGH``:
the first half finds the code, the second half (20 random bits) proves it. A
wrong second half counts against that code, which is burnt after a few tries, so
guessing one code succeeds with probability about ``max_attempts / 2**20``;
guessing blind must also hit one of the few live first halves (1 in 2**20 each).
Input is forgiving the way Crockford intended: case, spaces and dashes are
ignored, ``I``/``L`` read as ``1`` and ``O`` as ``0``.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import urlencode

CREDENTIAL_PREFIX = "rccs_"
CODE_ALPHABET = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_HALF = 4
_CODE_READS_AS = str.maketrans({"I": "1", "L": "1", "O": "0", "-": None, " ": None})


def secret_hash(secret: str) -> str:
    return hashlib.sha256(secret.encode("utf-8")).hexdigest()


def new_credential() -> tuple[str, str]:
    """A fresh device credential and the hash the store keeps."""
    credential = CREDENTIAL_PREFIX + secrets.token_urlsafe(32)
    return credential, secret_hash(credential)


def looks_like_credential(value: object) -> bool:
    return isinstance(value, str) and value.startswith(CREDENTIAL_PREFIX) and 20 <= len(value) <= 128


def same_hash(a: str, b: str) -> bool:
    return hmac.compare_digest(a.encode(), b.encode())


def _random_half() -> str:
    return "".join(secrets.choice(CODE_ALPHABET) for _ in range(CODE_HALF))


def new_pairing_code() -> tuple[str, str, str]:
    """(code as shown ``ABCD-EFGH``, its lookup id ``ABCD``, the hash of its secret half)."""
    code_id, secret = _random_half(), _random_half()
    return f"{code_id}-{secret}", code_id, secret_hash(secret)


def parse_pairing_code(text: object) -> tuple[str, str] | None:
    """(lookup id, secret hash) of what a user typed, or None if it cannot be a code."""
    if not isinstance(text, str) or len(text) > 32:
        return None
    normal = text.upper().translate(_CODE_READS_AS)
    if len(normal) != 2 * CODE_HALF or any(ch not in CODE_ALPHABET for ch in normal):
        return None
    return normal[:CODE_HALF], secret_hash(normal[CODE_HALF:])


def pairing_uri(code: str, server_url: str = "") -> str:
    """A URI for a QR code: ``rccs:pair?code=ABCD-EFGH`` (plus ``&server=`` when the public URL is known)."""
    query = {"code": code}
    if server_url:
        query["server"] = server_url
    return "rccs:pair?" + urlencode(query)
