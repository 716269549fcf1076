"""Every error code and close code rccs sends, in one table each.

``docs/protocol.md`` documents the same tables; keep them in step.
"""

from __future__ import annotations

from enum import IntEnum, StrEnum
from typing import Any

STORE_RETRY_AFTER = 1.0  # the retry_after (seconds) of an ``unavailable`` answer


class ErrorCode(StrEnum):
    """Values of ``code`` in an ``{"op":"error"}`` envelope."""

    BAD_REQUEST = "bad_request"  # malformed frame, wrong field types, second hello
    UNKNOWN_OP = "unknown_op"  # "op" names no operation of this protocol version
    UNAUTHORIZED = "unauthorized"  # token missing, forged, expired; op before hello
    FORBIDDEN = "forbidden"  # a selector names a device of another user; acting on another user's device
    NOT_FOUND = "not_found"  # an op names a device, session or pairing request that does not exist
    TOO_LARGE = "too_large"  # a field is longer than its documented limit
    RATE_LIMITED = "rate_limited"  # over send_rate (any message) or pairing attempts; see retry_after
    INVALID_CODE = "invalid_code"  # a pairing code that is wrong, expired, used or burnt (one answer for all)
    REVOKED = "revoked"  # the credential, token or session belongs to a revoked device or session
    DUPLICATE_ID = "duplicate_id"  # an ack:true send reuses a recent message id with a different body
    OVERLOADED = "overloaded"  # reserved: the server sheds load
    NO_ROUTE = "no_route"  # a send without ack reached no device
    UNCONVERTIBLE = "unconvertible"  # a JSON body (or call params/result) that msgpack cannot carry
    OFFLINE = "offline"  # a call matched no online device: it reached nobody
    TIMEOUT = "timeout"  # a call got no result within its timeout
    DISCONNECTED = "disconnected"  # a call's target went away after it got the call, before it answered
    UNKNOWN_CALL = "unknown_call"  # a result for no call this connection was asked to answer
    CONFLICT = "conflict"  # state.patch with an if_rev that is not the document's revision (rev, value attached);
    # task.claim of a task another device holds (owner, epoch, expires attached)
    STALE_EPOCH = "stale_epoch"  # an op for a task with an epoch older than the task's, or of a released lease
    HANDOFF_BUSY = "handoff_busy"  # a handoff of this task is open (handoff attached)
    UNAVAILABLE = "unavailable"  # the store (Redis, disk) cannot be reached: nothing was done; see retry_after
    INTERNAL = "internal"  # a bug in the server; the connection stays usable


class CloseCode(IntEnum):
    """WebSocket close codes the server uses."""

    NORMAL = 1000
    GOING_AWAY = 1001  # the server is shutting down: reconnect later
    PROTOCOL_ERROR = 1002  # WebSocket-level violation (bad framing, reserved bits, a close code over 4999)
    INVALID_PAYLOAD = 1007  # sent by picows: a close frame whose reason is not UTF-8
    POLICY_VIOLATION = 1008  # over 1,000 refused as rate_limited in a second, or too many held behind a request
    MESSAGE_TOO_BIG = 1009  # a message exceeds max_message_bytes
    INTERNAL_ERROR = 1011
    TRY_AGAIN_LATER = 1013  # the server is full (max_connections), or its store is unreachable
    BAD_HELLO = 4400  # the first message was not a valid hello, or an op came before it
    UNAUTHORIZED = 4401  # the token is missing, malformed, forged or expired
    FORBIDDEN = 4403  # the token's device is registered to another user
    HELLO_TIMEOUT = 4408  # no hello within hello_timeout seconds
    REPLACED = 4409  # the same device connected again; the older connection is closed
    REVOKED = 4410  # the device or session was revoked; its credential and sessions no longer work
    SLOW_CONSUMER = 4413  # more than max_outbound_bytes waited to be written; the connection is aborted
    TOO_MANY_HELLOS = 4429  # hello_rate_per_address exceeded: retry after the error's retry_after
    SESSION_EXPIRED = 4440  # the session's authentication expired without a refresh; hello again


class ReceiptReason(StrEnum):
    """Values of ``reason`` in a receipt with status ``failed``."""

    OFFLINE = "offline"  # the named device is not connected
    NO_ROUTE = "no_route"  # the selector matched no online device
    UNCONVERTIBLE = "unconvertible"  # the body cannot be expressed in the receiver's encoding
    INBOX_FULL = "inbox_full"  # the offline device's inbox is full (overflow policy reject)
    DROPPED = "dropped"  # removed from a full inbox for a newer message (overflow policy drop_oldest)
    UNDELIVERABLE = "undeliverable"  # delivered max_delivery_attempts times without an ack: a dead letter now
    REVOKED = "revoked"  # the target device was revoked before it acked
    UNAVAILABLE = "unavailable"  # the store could not be reached to keep it: not kept; send it again


class ProtocolError(Exception):
    """An envelope the server answers with an ``error`` (the connection stays open)."""

    def __init__(self, code: ErrorCode, message: str, retry_after: float | None = None, **extra: Any):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after  # seconds, for rate_limited
        self.extra = extra  # more fields of the error envelope (the current lease of a stale_epoch, ...)


class HelloRefused(Exception):
    """A hello that cannot open a session: answered with an ``error``, then the close code."""

    def __init__(self, error: ErrorCode, message: str, close_code: CloseCode):
        super().__init__(message)
        self.error = error
        self.message = message
        self.close_code = close_code


class CredentialNotCached(Exception):
    """A hello's credential is not in this node's registry: the store must be asked before it is judged."""

    def __init__(self, credential_hash: str):
        super().__init__("credential not in the registry")
        self.credential_hash = credential_hash
