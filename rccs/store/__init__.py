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
    EnqueueOutcome,
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
    UserRecord,
    session_is_stale,
)
from .memory import MemoryStore
from .sqlite import DB_FILE, SqliteStore

STORE_KINDS = ("sqlite", "memory")

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
    "AlreadyExists",
    "Change",
    "DeadLetter",
    "DeviceRecord",
    "EnqueueOutcome",
    "MemoryStore",
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
    "UserRecord",
    "open_store",
    "session_is_stale",
]


def open_store(kind: str, data_dir: str) -> Store:
    """A new, not yet opened store of ``kind``: "sqlite" keeps ``<data_dir>/rccs.db``, "memory" keeps nothing."""
    if kind == "sqlite":
        return SqliteStore(os.path.join(data_dir, DB_FILE))
    if kind == "memory":
        return MemoryStore()
    raise ValueError(f"unknown store kind {kind!r}: use one of {', '.join(STORE_KINDS)}")
