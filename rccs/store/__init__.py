"""Persistence: the ``Store`` interface (base), and the memory and SQLite stores behind it."""

from __future__ import annotations

import os

from .base import (
    CHANGE_DEVICE,
    CHANGE_SESSION,
    CHANGE_USER,
    OVERFLOW_DROP_OLDEST,
    OVERFLOW_REJECT,
    PRIORITY_EMERGENCY,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_NAMES,
    PRIORITY_NORMAL,
    PRIORITY_URGENT,
    STATUS_AWAY,
    STATUS_OFFLINE,
    STATUS_ONLINE,
    STATUSES,
    AlreadyExists,
    Change,
    DeadLetter,
    DeviceRecord,
    DeviceRefused,
    EnqueueOutcome,
    FenceMoved,
    IdMemory,
    OpenHandoff,
    PairingCode,
    PendingMessage,
    QueuedMessage,
    SessionRecord,
    StateCatchUp,
    StateChange,
    StateConflict,
    StateDoc,
    StatePatched,
    StateTooLarge,
    Store,
    StoreError,
    TaskLease,
    TaskRaced,
    UserRecord,
    parse_redis_url,
    session_is_stale,
)
from .memory import MemoryStore
from .sqlite import DB_FILE, SqliteStore

STORE_KINDS = ("sqlite", "memory")
STORE_URL_FORM = "redis://HOST:PORT/DB"

__all__ = [
    "CHANGE_DEVICE",
    "CHANGE_SESSION",
    "CHANGE_USER",
    "DB_FILE",
    "OVERFLOW_DROP_OLDEST",
    "OVERFLOW_REJECT",
    "PRIORITY_EMERGENCY",
    "PRIORITY_HIGH",
    "PRIORITY_LOW",
    "PRIORITY_NAMES",
    "PRIORITY_NORMAL",
    "PRIORITY_URGENT",
    "STATUSES",
    "STATUS_AWAY",
    "STATUS_OFFLINE",
    "STATUS_ONLINE",
    "STORE_KINDS",
    "STORE_URL_FORM",
    "AlreadyExists",
    "Change",
    "DeadLetter",
    "DeviceRecord",
    "DeviceRefused",
    "EnqueueOutcome",
    "FenceMoved",
    "IdMemory",
    "MemoryStore",
    "OpenHandoff",
    "PairingCode",
    "PendingMessage",
    "QueuedMessage",
    "SessionRecord",
    "SqliteStore",
    "StateCatchUp",
    "StateChange",
    "StateConflict",
    "StateDoc",
    "StatePatched",
    "StateTooLarge",
    "Store",
    "StoreError",
    "TaskLease",
    "TaskRaced",
    "UserRecord",
    "is_store_url",
    "open_store",
    "parse_redis_url",
    "session_is_stale",
]


def is_store_url(kind: str) -> bool:
    """Whether the ``store`` setting is a URL (a server) rather than the name of an embedded store; only
    redis:// URLs are accepted, but any URL gets ``parse_redis_url``'s message saying what is wrong."""
    return "://" in kind


def open_store(kind: str, data_dir: str) -> Store:
    """A new, not yet opened store of ``kind``: "sqlite" keeps ``<data_dir>/rccs.db``, "memory" keeps nothing,
    a ``redis://HOST:PORT/DB`` URL keeps everything in that Redis, shared by every node that names it."""
    if kind == "sqlite":
        return SqliteStore(os.path.join(data_dir, DB_FILE))
    if kind == "memory":
        return MemoryStore()
    if is_store_url(kind):
        parse_redis_url(kind)
        try:
            from .redis import RedisStore  # redis-py is an optional dependency: only a Redis store needs it
        except ImportError as exc:
            raise ValueError(f"store {kind!r} needs redis-py, which is not installed ({exc}): "
                             "pip install 'rccs[redis]'") from None
        return RedisStore(kind)
    raise ValueError(f"unknown store kind {kind!r}: use one of {', '.join(STORE_KINDS)} or a {STORE_URL_FORM} URL")
