"""The embedded store: one SQLite file, ``<data_dir>/rccs.db``, shared by the server and the CLI.

Threading: the connection is made, used and closed by one dedicated worker thread. Each public
method sends one function to that thread, and the function runs all its statements as one
transaction (``BEGIN IMMEDIATE`` for writes, committed at the end, rolled back on any error).
So a store call costs one thread hop and one commit however many statements it needs, and a
batch (``put_sessions``, ``update_presence``, and ``enqueue``: the durable inboxes' group commit)
is one transaction. A per-statement async wrapper
such as aiosqlite would cost a hop per statement and leave transactions open across awaits.
Calls run one after another in the order they were made, which the hub relies on.

Two processes: the CLI opens the same file while the server runs. WAL lets readers go on while
one writer writes, and ``busy_timeout`` makes a writer wait for the other process's write
transaction instead of failing; ``BEGIN IMMEDIATE`` takes the write lock up front, so a
transaction never has to upgrade a read lock (which SQLite cannot wait for).

Schema: ``MIGRATIONS`` lists SQL scripts; ``PRAGMA user_version`` counts how many a file has.
``open`` applies the missing ones, each in its own transaction, and refuses a file from a newer
rccs. Append to ``MIGRATIONS``; never edit a script that has shipped.
"""

from __future__ import annotations

import asyncio
import copy
import hmac
import json
import os
import sqlite3
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import msgpack

from ..mergepatch import json_size
from .base import (
    CHANGE_DEVICE,
    CHANGE_SESSION,
    CHANGE_USER,
    OVERFLOW_REJECT,
    STATUS_AWAY,
    STATUS_OFFLINE,
    STATUS_ONLINE,
    AlreadyExists,
    Change,
    DeadLetter,
    DeviceRecord,
    DeviceRefused,
    EnqueueOutcome,
    FenceMoved,
    IdMemory,
    PairingCode,
    PendingMessage,
    QueuedMessage,
    SessionRecord,
    StateCatchUp,
    StateChange,
    StateDoc,
    StatePatched,
    Store,
    StoreError,
    TaskLease,
    TaskRaced,
    UserRecord,
    check_policy,
    lease_fields,
    pack_receipt,
    plan_state_patch,
    session_is_stale,
    state_patch_text,
    unpack_receipt,
)

DB_FILE = "rccs.db"
BUSY_TIMEOUT_MS = 5000

MIGRATIONS: list[str] = [
    # 1: the first schema. Devices keep no foreign key to users: a removed user's devices stay
    # behind as revoked tombstones, so their ids are never handed out again.
    """
    CREATE TABLE users (
        id TEXT PRIMARY KEY,
        created INTEGER NOT NULL
    );

    CREATE TABLE devices (
        id TEXT PRIMARY KEY,
        user TEXT NOT NULL,
        type TEXT NOT NULL,
        name TEXT NOT NULL,
        platform TEXT NOT NULL,
        version TEXT NOT NULL,
        capabilities TEXT NOT NULL,
        metadata TEXT NOT NULL,
        created INTEGER NOT NULL,
        last_seen INTEGER NOT NULL,
        status TEXT NOT NULL,
        credential_hash TEXT,
        revoked_at INTEGER
    );
    CREATE INDEX devices_by_user ON devices (user, created, id);
    CREATE UNIQUE INDEX devices_by_credential ON devices (credential_hash) WHERE credential_hash IS NOT NULL;

    CREATE TABLE sessions (
        id TEXT PRIMARY KEY,
        user TEXT NOT NULL,
        device TEXT NOT NULL,
        created INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        next_seq INTEGER NOT NULL,
        last_activity INTEGER NOT NULL,
        connected_at INTEGER,
        disconnected_at INTEGER,
        revoked_at INTEGER,
        connected_ms INTEGER NOT NULL,
        messages_in INTEGER NOT NULL,
        messages_out INTEGER NOT NULL,
        bytes_in INTEGER NOT NULL,
        bytes_out INTEGER NOT NULL,
        pending BLOB
    );
    CREATE INDEX sessions_by_user ON sessions (user, device, created, id);
    CREATE INDEX sessions_by_device ON sessions (device, created, id);

    CREATE TABLE pairing_codes (
        id TEXT PRIMARY KEY,
        secret_hash TEXT NOT NULL,
        user TEXT NOT NULL,
        issuer_device TEXT,
        created INTEGER NOT NULL,
        expires_at INTEGER NOT NULL,
        approve INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        used_at INTEGER
    );
    CREATE INDEX pairing_codes_by_user ON pairing_codes (user);
    CREATE INDEX pairing_codes_by_expiry ON pairing_codes (expires_at);

    CREATE TABLE changes (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        kind TEXT NOT NULL,
        key TEXT NOT NULL
    );
    """,
    # 2: durable inboxes, dead letters, receipts kept for offline senders. Inbox ids come from
    # AUTOINCREMENT, so an id is never handed out twice (not after a delete, not after a reopen);
    # a dead letter keeps its message's id, and a redriven one goes back under it. msg_id has BLOB
    # affinity, which keeps a text id text and an integer id an integer (an integer beyond 64 signed
    # bits is stored msgpack-encoded). inbox_totals keeps each inbox's (count, bytes) for the caps,
    # kept right by triggers whoever writes (the server, or the CLI from another process).
    """
    CREATE TABLE inbox (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device TEXT NOT NULL,
        user TEXT NOT NULL,
        sender_device TEXT NOT NULL,
        msg_id BLOB NOT NULL,
        type TEXT NOT NULL,
        body BLOB NOT NULL,
        ts INTEGER NOT NULL,
        priority INTEGER NOT NULL,
        expires_at INTEGER,
        receipt INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        size INTEGER NOT NULL
    );
    CREATE INDEX inbox_by_delivery ON inbox (device, priority DESC, id);
    CREATE INDEX inbox_by_expiry ON inbox (expires_at) WHERE expires_at IS NOT NULL;

    CREATE TABLE inbox_totals (
        device TEXT PRIMARY KEY,
        count INTEGER NOT NULL,
        bytes INTEGER NOT NULL
    ) WITHOUT ROWID;
    CREATE TRIGGER inbox_totals_on_insert AFTER INSERT ON inbox BEGIN
        INSERT INTO inbox_totals (device, count, bytes) VALUES (NEW.device, 1, NEW.size)
        ON CONFLICT (device) DO UPDATE SET count = count + 1, bytes = bytes + excluded.bytes;
    END;
    CREATE TRIGGER inbox_totals_on_delete AFTER DELETE ON inbox BEGIN
        UPDATE inbox_totals SET count = count - 1, bytes = bytes - OLD.size WHERE device = OLD.device;
    END;

    CREATE TABLE dead_letters (
        id INTEGER PRIMARY KEY,
        device TEXT NOT NULL,
        user TEXT NOT NULL,
        sender_device TEXT NOT NULL,
        msg_id BLOB NOT NULL,
        type TEXT NOT NULL,
        body BLOB NOT NULL,
        ts INTEGER NOT NULL,
        priority INTEGER NOT NULL,
        expires_at INTEGER,
        receipt INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        size INTEGER NOT NULL,
        reason TEXT NOT NULL,
        at INTEGER NOT NULL
    );
    CREATE INDEX dead_letters_by_device ON dead_letters (device, id);
    CREATE INDEX dead_letters_by_user ON dead_letters (user, id);

    CREATE TABLE receipts (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        device TEXT NOT NULL,
        envelope BLOB NOT NULL
    );
    CREATE INDEX receipts_by_device ON receipts (device, id);
    """,
    # 3: the idempotency window's message ids, saved at shutdown (msg_id msgpack-encoded: str or int).
    """
    CREATE TABLE message_ids (
        sender_device TEXT NOT NULL,
        msg_id BLOB NOT NULL,
        at INTEGER NOT NULL,
        digest INTEGER NOT NULL
    );
    """,
    # 4: state documents (value NULL: deleted, the row kept as a tombstone for its rev) and their change
    # logs (patch and patch_id as JSON text).
    """
    CREATE TABLE state_docs (
        user TEXT NOT NULL,
        name TEXT NOT NULL,
        rev INTEGER NOT NULL,
        value TEXT,
        size INTEGER NOT NULL,
        by TEXT NOT NULL,
        updated INTEGER NOT NULL,
        PRIMARY KEY (user, name)
    ) WITHOUT ROWID;

    CREATE TABLE state_changes (
        user TEXT NOT NULL,
        doc TEXT NOT NULL,
        rev INTEGER NOT NULL,
        patch TEXT NOT NULL,
        by TEXT NOT NULL,
        patch_id TEXT,
        at INTEGER NOT NULL,
        PRIMARY KEY (user, doc, rev)
    ) WITHOUT ROWID;
    """,
    # 5: task leases (owner NULL: released; the row stays so that the epoch never goes back).
    """
    CREATE TABLE tasks (
        user TEXT NOT NULL,
        task TEXT NOT NULL,
        owner TEXT,
        epoch INTEGER NOT NULL,
        expires INTEGER NOT NULL,
        handoff TEXT,
        updated INTEGER NOT NULL,
        PRIMARY KEY (user, task)
    ) WITHOUT ROWID;
    """,
]

T = TypeVar("T")
Work = Callable[[sqlite3.Connection], T]

USER_COLUMNS = ("id", "created")
DEVICE_COLUMNS = ("id", "user", "type", "name", "platform", "version", "capabilities", "metadata", "created",
                  "last_seen", "status", "credential_hash", "revoked_at")
SESSION_COLUMNS = ("id", "user", "device", "created", "expires_at", "next_seq", "last_activity", "connected_at",
                   "disconnected_at", "revoked_at", "connected_ms", "messages_in", "messages_out", "bytes_in",
                   "bytes_out", "pending")
PAIRING_COLUMNS = ("id", "secret_hash", "user", "issuer_device", "created", "expires_at", "approve", "attempts",
                   "used_at")
QUEUED_COLUMNS = ("id", "device", "user", "sender_device", "msg_id", "type", "body", "ts", "priority", "expires_at",
                  "receipt", "attempts", "size")


SELECT_STATE_DOC = "SELECT rev, value, size, by, updated FROM state_docs WHERE user = ? AND name = ?"
SELECT_STATE_CHANGES = ("SELECT rev, patch, by, patch_id, at FROM state_changes WHERE user = ? AND doc = ? AND rev > ?"
                        " ORDER BY rev")


def _state_doc(user: str, name: str, row: Sequence[Any] | None) -> StateDoc:
    if row is None:
        return StateDoc(user=user, name=name)
    rev, value, _, by, updated = row
    return StateDoc(user=user, name=name, rev=rev, value=None if value is None else json.loads(value), by=by,
                    updated=updated)


def _state_changes(db: sqlite3.Connection, user: str, doc: str, after: int) -> list[StateChange]:
    return [StateChange(user=user, doc=doc, rev=rev, prev_rev=rev - 1, patch=json.loads(patch), by=by,
                        patch_id=None if patch_id is None else json.loads(patch_id), at=at)
            for rev, patch, by, patch_id, at in db.execute(SELECT_STATE_CHANGES, (user, doc, after))]


def _select(table: str, columns: Sequence[str]) -> str:
    return f"SELECT {', '.join(columns)} FROM {table}"


def _insert(table: str, columns: Sequence[str]) -> str:
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"


def _upsert(table: str, columns: Sequence[str], overrides: dict[str, str] | None = None) -> str:
    """INSERT, or UPDATE every column of the row with the same id (an expression in ``overrides``
    replaces ``excluded.<column>``). Unlike INSERT OR REPLACE, a clash on another unique index
    fails instead of deleting the other row."""
    overrides = overrides or {}
    updates = ", ".join(f"{column} = {overrides.get(column, 'excluded.' + column)}"
                        for column in columns if column != "id")
    return f"{_insert(table, columns)} ON CONFLICT (id) DO UPDATE SET {updates}"


SELECT_USER = _select("users", USER_COLUMNS)
SELECT_DEVICE = _select("devices", DEVICE_COLUMNS)
SELECT_SESSION = _select("sessions", SESSION_COLUMNS)
SELECT_PAIRING = _select("pairing_codes", PAIRING_COLUMNS)
UPSERT_DEVICE = _upsert("devices", DEVICE_COLUMNS)
# A revoked session stays revoked whatever the server, which may not know yet, writes over it.
UPSERT_SESSION = _upsert("sessions", SESSION_COLUMNS,
                         {"revoked_at": "COALESCE(sessions.revoked_at, excluded.revoked_at)"})
INSERT_PAIRING = _insert("pairing_codes", PAIRING_COLUMNS)
INSERT_CHANGE = "INSERT INTO changes (kind, key) VALUES (?, ?)"
QUEUED_LIST = ", ".join(QUEUED_COLUMNS)
SELECT_QUEUED = _select("inbox", QUEUED_COLUMNS)
INSERT_QUEUED = _insert("inbox", QUEUED_COLUMNS[1:])  # the id comes from AUTOINCREMENT
SELECT_DEAD = _select("dead_letters", (*QUEUED_COLUMNS, "reason", "at"))
REDRIVEN_LIST = ", ".join("0" if column == "attempts" else column for column in QUEUED_COLUMNS)  # attempts reset
# Each inbox's lowest priority present, then its oldest message of that priority: two index seeks
# on inbox_by_delivery (one ORDER BY priority, id would sort the whole inbox).
SELECT_LOWEST_PRIORITY = "SELECT MIN(priority) FROM inbox WHERE device = ?"
SELECT_OLDEST_OF_PRIORITY = f"{SELECT_QUEUED} WHERE device = ? AND priority = ? ORDER BY id LIMIT 1"
SELECT_INBOX_PAGE = (f"{SELECT_QUEUED} WHERE device = ? AND (expires_at IS NULL OR expires_at > ?)"
                     " ORDER BY priority DESC, id LIMIT ?")
# Without INDEXED BY the planner may walk the whole table in id order to skip the sort.
SELECT_EXPIRED_IDS = "SELECT id FROM inbox INDEXED BY inbox_by_expiry WHERE expires_at <= ? ORDER BY id LIMIT ?"
TAKE_RECEIPTS = ("DELETE FROM receipts WHERE id IN (SELECT id FROM receipts WHERE device = ? ORDER BY id LIMIT ?)"
                 " RETURNING id, envelope")
MAX_PARAMETERS = 500  # per IN (...) list: SQLite caps the number of bound parameters
INT64_MIN = -(2**63)
INT64_MAX = 2**63 - 1


def _user_device_filter(user_id: str | None, device_id: str | None) -> tuple[str, list[Any]]:
    """A WHERE clause (or "") and its parameters for the optional user / device filters of the list calls."""
    conditions: list[str] = []
    parameters: list[Any] = []
    if user_id is not None:
        conditions.append("user = ?")
        parameters.append(user_id)
    if device_id is not None:
        conditions.append("device = ?")
        parameters.append(device_id)
    return (f" WHERE {' AND '.join(conditions)}" if conditions else ""), parameters


# ---- rows <-> records ------------------------------------------------


def _json_text(value: Any, what: str) -> str:
    try:
        return json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise StoreError(f"{what} is not JSON: {exc}") from None


def _add_user_if_missing(db: sqlite3.Connection, user: UserRecord) -> bool:
    """Insert a user with its change; False (nothing written) if the id exists."""
    if db.execute("SELECT 1 FROM users WHERE id = ?", (user.id,)).fetchone() is not None:
        return False
    db.execute(_insert("users", USER_COLUMNS), (user.id, user.created))
    db.execute(INSERT_CHANGE, (CHANGE_USER, user.id))
    return True


def _put_device(db: sqlite3.Connection, device: DeviceRecord, row: tuple[Any, ...]) -> None:
    if device.revoked_at is None and \
            db.execute("SELECT 1 FROM users WHERE id = ?", (device.user,)).fetchone() is None:
        raise DeviceRefused(f"cannot store device {device.id!r}: unknown user {device.user!r}")
    existing = db.execute("SELECT revoked_at FROM devices WHERE id = ?", (device.id,)).fetchone()
    if existing is not None and existing[0] is not None:
        raise DeviceRefused(f"device {device.id!r} is revoked and cannot be replaced")
    if device.credential_hash is not None:
        holder = db.execute("SELECT id FROM devices WHERE credential_hash = ? AND id != ?",
                            (device.credential_hash, device.id)).fetchone()
        if holder is not None:
            raise DeviceRefused(f"cannot store device {device.id!r}: its credential belongs to another device")
    db.execute(UPSERT_DEVICE, row)
    db.execute(INSERT_CHANGE, (CHANGE_DEVICE, device.id))


def _device_row(device: DeviceRecord) -> tuple[Any, ...]:
    return (device.id, device.user, device.type, device.name, device.platform, device.version,
            _json_text(list(device.capabilities), f"capabilities of device {device.id!r}"),
            _json_text(device.metadata, f"metadata of device {device.id!r}"),
            device.created, device.last_seen, device.status, device.credential_hash, device.revoked_at)


def _device_record(row: Sequence[Any]) -> DeviceRecord:
    (device_id, user, device_type, name, platform, version, capabilities, metadata, created, last_seen, status,
     credential_hash, revoked_at) = row
    return DeviceRecord(id=device_id, user=user, type=device_type, name=name, platform=platform, version=version,
                        capabilities=tuple(json.loads(capabilities)), metadata=json.loads(metadata), created=created,
                        last_seen=last_seen, status=status, credential_hash=credential_hash, revoked_at=revoked_at)


def _session_row(session: SessionRecord) -> tuple[Any, ...]:
    # NULL for no pending messages: the hub's frequent counter snapshots then skip msgpack entirely.
    pending = None
    if session.pending:
        pending = msgpack.packb(
            [(m.seq, m.sender_user, m.sender_device, m.msg_id, m.frame, m.text) for m in session.pending],
            use_bin_type=True,
        )
    return (session.id, session.user, session.device, session.created, session.expires_at, session.next_seq,
            session.last_activity, session.connected_at, session.disconnected_at, session.revoked_at,
            session.connected_ms, session.messages_in, session.messages_out, session.bytes_in, session.bytes_out,
            pending)


def _session_record(row: Sequence[Any]) -> SessionRecord:
    *fields, pending = row
    record = SessionRecord(**dict(zip(SESSION_COLUMNS[:-1], fields, strict=True)))
    if pending is not None:
        record.pending = [
            PendingMessage(seq=seq, sender_user=sender_user, sender_device=sender_device, msg_id=msg_id,
                           frame=frame, text=text)
            for seq, sender_user, sender_device, msg_id, frame, text in msgpack.unpackb(pending, raw=False)
        ]
    return record


def _pairing_row(code: PairingCode) -> tuple[Any, ...]:
    return (code.id, code.secret_hash, code.user, code.issuer_device, code.created, code.expires_at,
            int(code.approve), code.attempts, code.used_at)


def _pairing_record(row: Sequence[Any]) -> PairingCode:
    code_id, secret_hash, user, issuer_device, created, expires_at, approve, attempts, used_at = row
    return PairingCode(id=code_id, secret_hash=secret_hash, user=user, issuer_device=issuer_device, created=created,
                       expires_at=expires_at, approve=bool(approve), attempts=attempts, used_at=used_at)


def _msg_id_value(msg_id: str | int) -> str | int | bytes:
    # SQLite integers are signed 64-bit; the protocol also allows unsigned 64-bit ids.
    if isinstance(msg_id, int) and not INT64_MIN <= msg_id <= INT64_MAX:
        packed: bytes = msgpack.packb(msg_id)
        return packed
    return msg_id


def _msg_id_of(value: str | int | bytes) -> str | int:
    if isinstance(value, bytes):
        msg_id: int = msgpack.unpackb(value)
        return msg_id
    return value


def _queued_values(message: QueuedMessage) -> tuple[Any, ...]:
    """Every column of ``inbox`` but the id."""
    return (message.device, message.user, message.sender_device, _msg_id_value(message.msg_id), message.type,
            bytes(message.body), message.ts, message.priority, message.expires_at, int(message.receipt),
            message.attempts, message.size)


def _queued_record(row: Sequence[Any]) -> QueuedMessage:
    (queued_id, device, user, sender_device, msg_id, message_type, body, ts, priority, expires_at, receipt, attempts,
     _size) = row
    return QueuedMessage(device=device, user=user, sender_device=sender_device, msg_id=_msg_id_of(msg_id),
                         type=message_type, body=body, ts=ts, priority=priority, expires_at=expires_at,
                         receipt=bool(receipt), attempts=attempts, id=queued_id)


def _dead_letter_record(row: Sequence[Any]) -> DeadLetter:
    *queued, reason, at = row
    return DeadLetter(message=_queued_record(queued), reason=reason, at=at)



def _id_chunks(ids: Sequence[int]) -> Iterator[tuple[str, list[int]]]:
    """The distinct ``ids`` in chunks small enough to bind: (``?,?,...`` for an IN list, the chunk)."""
    distinct = sorted(set(ids))
    for start in range(0, len(distinct), MAX_PARAMETERS):
        chunk = distinct[start:start + MAX_PARAMETERS]
        yield ",".join("?" * len(chunk)), chunk


def _delete_queued(db: sqlite3.Connection, ids: Sequence[int]) -> list[QueuedMessage]:
    """Delete these inbox messages; the ones that existed, by id."""
    removed: list[QueuedMessage] = []
    for marks, chunk in _id_chunks(ids):
        rows = db.execute(f"DELETE FROM inbox WHERE id IN ({marks}) RETURNING {QUEUED_LIST}", chunk).fetchall()
        removed.extend(_queued_record(row) for row in rows)
    removed.sort(key=lambda message: message.id)  # RETURNING comes in no particular order
    return removed


def _inbox_totals(db: sqlite3.Connection, device_ids: set[str]) -> dict[str, list[int] | None]:
    """Per device: None if it is revoked, else [count, bytes] of its inbox."""
    totals: dict[str, list[int] | None] = {device_id: [0, 0] for device_id in device_ids}
    ordered = sorted(device_ids)
    for start in range(0, len(ordered), MAX_PARAMETERS):
        chunk = ordered[start:start + MAX_PARAMETERS]
        marks = ",".join("?" * len(chunk))
        for device_id, count, size in db.execute(
                f"SELECT device, count, bytes FROM inbox_totals WHERE device IN ({marks})", chunk):
            totals[device_id] = [count, size]
        for (device_id,) in db.execute(
                f"SELECT id FROM devices WHERE id IN ({marks}) AND revoked_at IS NOT NULL", chunk):
            totals[device_id] = None
    return totals


def _drop_oldest_of_lowest_priority(db: sqlite3.Connection, device_id: str) -> QueuedMessage:
    """Delete and return the oldest message of the lowest priority in a device's inbox, which must not be empty."""
    (priority,) = db.execute(SELECT_LOWEST_PRIORITY, (device_id,)).fetchone()
    victim = _queued_record(db.execute(SELECT_OLDEST_OF_PRIORITY, (device_id, priority)).fetchone())
    db.execute("DELETE FROM inbox WHERE id = ?", (victim.id,))
    return victim


def _sql_session_is_stale(connected_at: int | None, expires_at: int, revoked_at: int | None,
                          disconnected_at: int | None, cutoff: int, grace_ms: int) -> bool:
    # The rule lives in base.session_is_stale; SQL calls it instead of restating it.
    probe = SessionRecord(id="", user="", device="", created=0, expires_at=expires_at, connected_at=connected_at,
                          revoked_at=revoked_at, disconnected_at=disconnected_at)
    return session_is_stale(probe, cutoff, grace_ms)


def _statements(script: str) -> list[str]:
    """Split a migration script into statements: Python's executescript would commit the
    transaction the migration has to run in."""
    statements: list[str] = []
    current = ""
    for piece in script.split(";"):
        current += piece + ";"
        if sqlite3.complete_statement(current):
            if current.strip(" \t\r\n;"):
                statements.append(current.strip())
            current = ""
    if current.strip(" \t\r\n;"):
        raise ValueError(f"incomplete SQL statement in a migration: {current!r}")
    return statements


def _schema_version(db: sqlite3.Connection) -> int:
    version: int = db.execute("PRAGMA user_version").fetchone()[0]
    return version


def _migrate(db: sqlite3.Connection, path: str) -> None:
    def refuse_newer(version: int) -> None:
        if version > len(MIGRATIONS):
            raise StoreError(
                f"{path} has schema version {version}, but this rccs knows versions up to {len(MIGRATIONS)}:"
                " it was written by a newer rccs; upgrade rccs to open it"
            )

    refuse_newer(_schema_version(db))
    for target in range(1, len(MIGRATIONS) + 1):
        if _schema_version(db) >= target:
            continue
        db.execute("BEGIN IMMEDIATE")
        try:
            # Read again under the write lock: another process may have migrated meanwhile.
            current = _schema_version(db)
            refuse_newer(current)
            if current < target:
                for statement in _statements(MIGRATIONS[target - 1]):
                    db.execute(statement)
                db.execute(f"PRAGMA user_version = {target}")
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:
                db.rollback()
            raise


# ---- the store -------------------------------------------------------


class SqliteStore(Store):
    def __init__(self, path: str) -> None:
        self.path = path
        self._executor: ThreadPoolExecutor | None = None
        self._db: sqlite3.Connection | None = None  # made, used and closed in the worker thread only

    # ---- plumbing ------------------------------------------------------

    async def open(self) -> None:
        if self._executor is not None:
            raise StoreError(f"store {self.path} is already open")
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rccs-sqlite")
        self._executor = executor
        try:
            await self._submit(self._connect)
        except BaseException as exc:
            self._executor = None
            executor.submit(self._disconnect)  # a cancelled _connect may still succeed: close what it opens
            # After a failure the worker is idle and joining it is immediate; after a cancellation
            # _connect may still be waiting for another process's lock, which the loop must not wait for.
            executor.shutdown(wait=not isinstance(exc, asyncio.CancelledError))
            raise

    async def close(self) -> None:
        executor = self._executor
        if executor is None:
            return
        self._executor = None  # later calls fail at once; those already queued still run first
        try:
            await asyncio.get_running_loop().run_in_executor(executor, self._disconnect)
        except BaseException:
            executor.shutdown(wait=False)  # cancelled: the queued writes and the close still run, in the background
            raise
        executor.shutdown(wait=True)  # the worker is idle: this only joins its thread

    def _connect(self) -> None:
        directory = os.path.dirname(os.path.abspath(self.path))
        try:
            os.makedirs(directory, exist_ok=True)
        except OSError as exc:
            raise StoreError(f"cannot create the store's directory {directory}: {exc}") from None
        try:
            db = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            raise StoreError(f"{self.path}: {exc}") from exc
        try:
            # busy_timeout first: switching to WAL needs a lock that another process may hold.
            db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            db.execute("PRAGMA journal_mode = WAL")
            db.execute("PRAGMA synchronous = NORMAL")
            db.execute("PRAGMA foreign_keys = ON")
            db.create_function("rccs_session_is_stale", 6, _sql_session_is_stale, deterministic=True)
            _migrate(db, self.path)
        except sqlite3.Error as exc:
            db.close()
            raise StoreError(f"{self.path}: {exc}") from exc
        except BaseException:
            db.close()
            raise
        self._db = db

    def _disconnect(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            db.close()

    async def _submit(self, call: Callable[[], T]) -> T:
        executor = self._executor
        if executor is None:
            raise StoreError(f"store {self.path} is not open")
        return await asyncio.get_running_loop().run_in_executor(executor, call)

    def _connection(self) -> sqlite3.Connection:
        if self._db is None:
            raise StoreError(f"store {self.path} is not open")
        return self._db

    async def _read(self, work: Work[T]) -> T:
        """``work`` on the worker thread; its one statement is its own transaction."""
        def run() -> T:
            try:
                return work(self._connection())
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc

        return await self._submit(run)

    async def _write(self, work: Work[T], unless: Callable[[sqlite3.Connection], T | None] | None = None) -> T:
        """``work`` on the worker thread, in one write transaction: committed if it returns,
        rolled back if it raises. ``unless``, run first on the same thread, may answer instead (not None):
        a common case that writes nothing then costs no transaction (a commit is most of a small write)."""
        def run() -> T:
            db = self._connection()
            try:
                if unless is not None:
                    answer = unless(db)
                    if answer is not None:
                        return answer
                db.execute("BEGIN IMMEDIATE")
                try:
                    result = work(db)
                    db.execute("COMMIT")
                except BaseException:
                    if db.in_transaction:
                        db.rollback()
                    raise
            except sqlite3.Error as exc:
                raise StoreError(f"{self.path}: {exc}") from exc
            return result

        return await self._submit(run)

    # ---- users -------------------------------------------------------

    async def add_user(self, user: UserRecord) -> None:
        def work(db: sqlite3.Connection) -> None:
            if not _add_user_if_missing(db, user):
                raise AlreadyExists(f"user {user.id!r} already exists")

        await self._write(work)

    async def get_user(self, user_id: str) -> UserRecord | None:
        def work(db: sqlite3.Connection) -> UserRecord | None:
            row = db.execute(f"{SELECT_USER} WHERE id = ?", (user_id,)).fetchone()
            return None if row is None else UserRecord(*row)

        return await self._read(work)

    async def list_users(self) -> list[UserRecord]:
        def work(db: sqlite3.Connection) -> list[UserRecord]:
            return [UserRecord(*row) for row in db.execute(f"{SELECT_USER} ORDER BY id")]

        return await self._read(work)

    async def remove_user(self, user_id: str, now: int) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            if db.execute("DELETE FROM users WHERE id = ?", (user_id,)).rowcount == 0:
                return False
            db.execute(INSERT_CHANGE, (CHANGE_USER, user_id))
            live_devices = [row[0] for row in db.execute(
                "SELECT id FROM devices WHERE user = ? AND revoked_at IS NULL ORDER BY created, id", (user_id,))]
            db.execute(
                "UPDATE devices SET revoked_at = ?, credential_hash = NULL, status = ?"
                " WHERE user = ? AND revoked_at IS NULL",
                (now, STATUS_OFFLINE, user_id),
            )
            db.executemany(INSERT_CHANGE, [(CHANGE_DEVICE, device_id) for device_id in live_devices])
            db.execute("DELETE FROM sessions WHERE user = ?", (user_id,))
            db.execute("DELETE FROM pairing_codes WHERE user = ?", (user_id,))
            db.execute("DELETE FROM state_docs WHERE user = ?", (user_id,))
            db.execute("DELETE FROM state_changes WHERE user = ?", (user_id,))
            db.execute("DELETE FROM tasks WHERE user = ?", (user_id,))
            return True

        return await self._write(work)

    # ---- devices -----------------------------------------------------

    async def put_device(self, device: DeviceRecord) -> None:
        row = _device_row(device)  # before the transaction: a bad record fails without touching the file

        def work(db: sqlite3.Connection) -> None:
            _put_device(db, device, row)

        await self._write(work)

    async def register(self, users: Sequence[UserRecord], devices: Sequence[DeviceRecord]) -> None:
        try:
            rows = [_device_row(device) for device in devices]
        except StoreError:
            rows = None
        if rows is not None:
            def work(db: sqlite3.Connection) -> bool:
                for user in users:
                    _add_user_if_missing(db, user)
                for device, row in zip(devices, rows, strict=True):
                    _put_device(db, device, row)
                return True

            try:
                await self._write(work)  # one commit for a loop turn's hellos
                return
            except StoreError:
                pass
        await super().register(users, devices)  # one refused: the others are kept, each on its own

    async def get_device(self, device_id: str) -> DeviceRecord | None:
        def work(db: sqlite3.Connection) -> DeviceRecord | None:
            row = db.execute(f"{SELECT_DEVICE} WHERE id = ?", (device_id,)).fetchone()
            return None if row is None else _device_record(row)

        return await self._read(work)

    async def list_devices(self, user_id: str | None = None, include_revoked: bool = False) -> list[DeviceRecord]:
        conditions: list[str] = []
        parameters: list[Any] = []
        if user_id is not None:
            conditions.append("user = ?")
            parameters.append(user_id)
        if not include_revoked:
            conditions.append("revoked_at IS NULL")
        where = f" WHERE {' AND '.join(conditions)}" if conditions else ""
        query = f"{SELECT_DEVICE}{where} ORDER BY user, created, id"

        def work(db: sqlite3.Connection) -> list[DeviceRecord]:
            return [_device_record(row) for row in db.execute(query, parameters)]

        return await self._read(work)

    async def find_device_by_credential(self, credential_hash: str) -> DeviceRecord | None:
        def work(db: sqlite3.Connection) -> DeviceRecord | None:
            row = db.execute(f"{SELECT_DEVICE} WHERE credential_hash = ? AND revoked_at IS NULL",
                             (credential_hash,)).fetchone()
            return None if row is None else _device_record(row)

        return await self._read(work)

    async def revoke_device(self, device_id: str, now: int) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            revoked = db.execute(
                "UPDATE devices SET revoked_at = ?, credential_hash = NULL, status = ?"
                " WHERE id = ? AND revoked_at IS NULL",
                (now, STATUS_OFFLINE, device_id),
            )
            if revoked.rowcount == 0:
                return False
            db.execute(INSERT_CHANGE, (CHANGE_DEVICE, device_id))
            live_sessions = [row[0] for row in db.execute(
                "SELECT id FROM sessions WHERE device = ? AND revoked_at IS NULL ORDER BY user, created, id",
                (device_id,))]
            db.execute("UPDATE sessions SET revoked_at = ? WHERE device = ? AND revoked_at IS NULL", (now, device_id))
            db.executemany(INSERT_CHANGE, [(CHANGE_SESSION, session_id) for session_id in live_sessions])
            return True

        return await self._write(work)

    async def update_presence(self, updates: Sequence[tuple[str, str, int]]) -> None:
        rows = [(status, last_seen, device_id) for device_id, status, last_seen in updates]
        if not rows:
            return

        def work(db: sqlite3.Connection) -> None:
            db.executemany("UPDATE devices SET status = ?, last_seen = ? WHERE id = ? AND revoked_at IS NULL", rows)

        await self._write(work)

    # ---- sessions ----------------------------------------------------

    async def put_sessions(self, sessions: Sequence[SessionRecord]) -> None:
        rows = [_session_row(session) for session in sessions]
        if not rows:
            return

        def work(db: sqlite3.Connection) -> None:
            devices = sorted({row[2] for row in rows})
            revoked: set[str] = set()
            for start in range(0, len(devices), 500):  # SQLite caps the number of bound parameters
                chunk = devices[start:start + 500]
                marks = ",".join("?" * len(chunk))
                revoked.update(device for (device,) in db.execute(
                    f"SELECT id FROM devices WHERE id IN ({marks}) AND revoked_at IS NOT NULL", chunk))
            db.executemany(UPSERT_SESSION, [row for row in rows if row[2] not in revoked])

        await self._write(work)

    async def get_session(self, session_id: str) -> SessionRecord | None:
        def work(db: sqlite3.Connection) -> SessionRecord | None:
            row = db.execute(f"{SELECT_SESSION} WHERE id = ?", (session_id,)).fetchone()
            return None if row is None else _session_record(row)

        return await self._read(work)

    async def list_sessions(self, user_id: str | None = None, device_id: str | None = None) -> list[SessionRecord]:
        where, parameters = _user_device_filter(user_id, device_id)
        query = f"{SELECT_SESSION}{where} ORDER BY user, device, created, id"

        def work(db: sqlite3.Connection) -> list[SessionRecord]:
            return [_session_record(row) for row in db.execute(query, parameters)]

        return await self._read(work)

    async def revoke_session(self, session_id: str, now: int) -> bool:
        def work(db: sqlite3.Connection) -> bool:
            revoked = db.execute("UPDATE sessions SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                                 (now, session_id))
            if revoked.rowcount == 0:
                return False
            db.execute(INSERT_CHANGE, (CHANGE_SESSION, session_id))
            return True

        return await self._write(work)

    async def delete_stale_sessions(self, now: int, grace_ms: int) -> int:
        def work(db: sqlite3.Connection) -> int:
            deleted = db.execute(
                "DELETE FROM sessions WHERE connected_at IS NULL AND"
                " rccs_session_is_stale(connected_at, expires_at, revoked_at, disconnected_at, ?, ?)",
                (now, grace_ms),
            )
            count: int = deleted.rowcount
            return count

        return await self._write(work)

    async def reset_live_state(self, now: int) -> None:
        def work(db: sqlite3.Connection) -> None:
            db.execute("UPDATE devices SET status = ? WHERE status IN (?, ?)",
                       (STATUS_OFFLINE, STATUS_ONLINE, STATUS_AWAY))
            # All right-hand sides see the old row, so connected_at is still set where it is read.
            db.execute(
                "UPDATE sessions SET"
                " connected_ms = connected_ms + MAX(0, COALESCE(NULLIF(last_activity, 0), :now) - connected_at),"
                " disconnected_at = COALESCE(NULLIF(last_activity, 0), :now),"
                " connected_at = NULL"
                " WHERE connected_at IS NOT NULL",
                {"now": now},
            )

        await self._write(work)

    # ---- pairing -----------------------------------------------------

    async def add_pairing_code(self, code: PairingCode) -> None:
        row = _pairing_row(code)

        def work(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM pairing_codes WHERE id = ?", (code.id,)).fetchone() is not None:
                raise AlreadyExists(f"pairing code {code.id!r} already exists")
            db.execute(INSERT_PAIRING, row)

        await self._write(work)

    async def redeem_pairing_code(self, code_id: str, secret_hash: str, now: int,
                                  max_attempts: int) -> PairingCode | None:
        def work(db: sqlite3.Connection) -> PairingCode | None:
            row = db.execute(f"{SELECT_PAIRING} WHERE id = ?", (code_id,)).fetchone()
            if row is None:
                return None
            code = _pairing_record(row)
            if code.used_at is not None or code.expires_at <= now or code.attempts >= max_attempts:
                return None
            if not hmac.compare_digest(code.secret_hash.encode(), secret_hash.encode()):
                db.execute("UPDATE pairing_codes SET attempts = attempts + 1 WHERE id = ?", (code_id,))
                return None
            db.execute("UPDATE pairing_codes SET used_at = ? WHERE id = ?", (now, code_id))
            code.used_at = now
            return code

        return await self._write(work)

    async def delete_pairing_codes_before(self, cutoff: int) -> int:
        def work(db: sqlite3.Connection) -> int:
            count: int = db.execute("DELETE FROM pairing_codes WHERE expires_at < ?", (cutoff,)).rowcount
            return count

        return await self._write(work)

    async def list_pairing_codes(self) -> list[PairingCode]:
        def work(db: sqlite3.Connection) -> list[PairingCode]:
            return [_pairing_record(row) for row in db.execute(f"{SELECT_PAIRING} ORDER BY id")]

        return await self._read(work)

    # ---- durable inboxes ----------------------------------------------

    async def enqueue(self, messages: Sequence[QueuedMessage], max_count: int, max_bytes: int,
                      policy: str, ids: IdMemory | None = None) -> EnqueueOutcome:
        """Every message given ends up in ``stored`` or ``rejected``. ``dropped`` may also list messages
        stored earlier in the same batch: a batch does what the same messages enqueued one call at a
        time would do."""
        check_policy(policy)
        # Copied and converted before the transaction: a bad record fails without touching the file.
        prepared: list[tuple[QueuedMessage, tuple[Any, ...]]] = []
        for message in messages:
            copied = copy.copy(message)
            copied.body = bytes(message.body)  # a bytearray or memoryview would stay shared with the caller
            prepared.append((copied, _queued_values(copied)))
        if not prepared:
            return EnqueueOutcome(stored=[], rejected=[], dropped=[])

        def work(db: sqlite3.Connection) -> EnqueueOutcome:
            outcome = EnqueueOutcome(stored=[], rejected=[], dropped=[])
            # Per target device, read once per batch: None if revoked, else its inbox's [count, bytes],
            # kept up to date here as the batch adds and drops messages.
            totals = _inbox_totals(db, {message.device for message, _ in prepared})
            for message, values in prepared:
                total = totals[message.device]
                size = message.size
                if total is None or size > max_bytes or max_count < 1:
                    outcome.rejected.append(message)
                    continue
                if total[0] >= max_count or total[1] + size > max_bytes:
                    if policy == OVERFLOW_REJECT:
                        outcome.rejected.append(message)
                        continue
                    while total[0] >= max_count or total[1] + size > max_bytes:
                        victim = _drop_oldest_of_lowest_priority(db, message.device)
                        outcome.dropped.append(victim)
                        total[0] -= 1
                        total[1] -= victim.size
                queued_id = db.execute(INSERT_QUEUED, values).lastrowid
                assert queued_id is not None
                total[0] += 1
                total[1] += size
                message.id = queued_id  # the store's own copy, handed out once
                outcome.stored.append(message)
            return outcome

        return await self._write(work)

    async def inbox(self, device_id: str, now: int, limit: int = 1000) -> list[QueuedMessage]:
        if limit <= 0:
            return []

        def work(db: sqlite3.Connection) -> list[QueuedMessage]:
            rows = db.execute(SELECT_INBOX_PAGE, (device_id, now, limit))
            return [_queued_record(row) for row in rows]

        return await self._read(work)

    async def inbox_size(self, device_id: str) -> tuple[int, int]:
        def work(db: sqlite3.Connection) -> tuple[int, int]:
            row = db.execute("SELECT count, bytes FROM inbox_totals WHERE device = ?", (device_id,)).fetchone()
            return (0, 0) if row is None else (row[0], row[1])

        return await self._read(work)

    async def remove_queued(self, ids: Sequence[int]) -> list[QueuedMessage]:
        """The removed messages come back by id."""
        if not ids:
            return []

        def work(db: sqlite3.Connection) -> list[QueuedMessage]:
            return _delete_queued(db, ids)

        return await self._write(work)

    async def count_attempts(self, ids: Sequence[int]) -> None:
        """An id given twice still counts one attempt."""
        if not ids:
            return

        def work(db: sqlite3.Connection) -> None:
            for marks, chunk in _id_chunks(ids):
                db.execute(f"UPDATE inbox SET attempts = attempts + 1 WHERE id IN ({marks})", chunk)

        await self._write(work)

    async def take_expired(self, now: int, limit: int = 1000) -> list[QueuedMessage]:
        if limit <= 0:
            return []

        def work(db: sqlite3.Connection) -> list[QueuedMessage]:
            expired = [row[0] for row in db.execute(SELECT_EXPIRED_IDS, (now, limit))]
            return _delete_queued(db, expired)

        return await self._write(work)

    async def dead_letter(self, ids: Sequence[int], reason: str, now: int) -> list[QueuedMessage]:
        """The moved messages come back by id."""
        if not ids:
            return []

        def work(db: sqlite3.Connection) -> list[QueuedMessage]:
            for marks, chunk in _id_chunks(ids):
                db.execute(
                    f"INSERT INTO dead_letters ({QUEUED_LIST}, reason, at)"
                    f" SELECT {QUEUED_LIST}, ?, ? FROM inbox WHERE id IN ({marks})",
                    [reason, now, *chunk],
                )
            return _delete_queued(db, ids)

        return await self._write(work)

    async def dead_letters(self, user_id: str | None = None, device_id: str | None = None,
                           limit: int = 1000) -> list[DeadLetter]:
        if limit <= 0:
            return []
        where, parameters = _user_device_filter(user_id, device_id)
        query = f"{SELECT_DEAD}{where} ORDER BY id LIMIT ?"

        def work(db: sqlite3.Connection) -> list[DeadLetter]:
            return [_dead_letter_record(row) for row in db.execute(query, [*parameters, limit])]

        return await self._read(work)

    async def redrive(self, ids: Sequence[int] | None = None, device_id: str | None = None) -> list[QueuedMessage]:
        """With both ``ids`` and ``device_id``, the dead letters among ``ids`` of that device. The
        messages come back by id."""
        if ids is not None and not ids:
            return []

        def work(db: sqlite3.Connection) -> list[QueuedMessage]:
            if ids is None and device_id is None:
                chosen = [row[0] for row in db.execute("SELECT id FROM dead_letters")]
            elif ids is None:
                chosen = [row[0] for row in db.execute("SELECT id FROM dead_letters WHERE device = ?", (device_id,))]
            else:
                device_filter = "" if device_id is None else " AND device = ?"
                device_parameters = [] if device_id is None else [device_id]
                chosen = []
                for marks, chunk in _id_chunks(ids):
                    chosen.extend(row[0] for row in db.execute(
                        f"SELECT id FROM dead_letters WHERE id IN ({marks}){device_filter}",
                        [*chunk, *device_parameters]))
            moved: list[QueuedMessage] = []
            for marks, chunk in _id_chunks(chosen):
                db.execute(f"INSERT INTO inbox ({QUEUED_LIST}) SELECT {REDRIVEN_LIST} FROM dead_letters"
                           f" WHERE id IN ({marks})", chunk)
                rows = db.execute(f"DELETE FROM dead_letters WHERE id IN ({marks}) RETURNING {QUEUED_LIST}",
                                  chunk).fetchall()
                moved.extend(_queued_record(row) for row in rows)
            for message in moved:
                message.attempts = 0
            moved.sort(key=lambda message: message.id)
            return moved

        return await self._write(work)

    async def purge(self, device_id: str, dead_letters: bool = False) -> int:
        table = "dead_letters" if dead_letters else "inbox"

        def work(db: sqlite3.Connection) -> int:
            count: int = db.execute(f"DELETE FROM {table} WHERE device = ?", (device_id,)).rowcount
            return count

        return await self._write(work)

    # ---- receipts for offline senders ----------------------------------

    async def add_receipts(self, receipts: Sequence[tuple[str, dict[str, Any]]]) -> None:
        rows = [(device_id, pack_receipt(device_id, envelope)) for device_id, envelope in receipts]
        if not rows:
            return

        def work(db: sqlite3.Connection) -> None:
            db.executemany("INSERT INTO receipts (device, envelope) VALUES (?, ?)", rows)

        await self._write(work)

    async def devices_with_kept_receipts(self) -> list[str]:
        def work(db: sqlite3.Connection) -> list[str]:
            return [row[0] for row in db.execute("SELECT DISTINCT device FROM receipts ORDER BY device")]

        return await self._read(work)

    async def take_receipts(self, device_id: str, limit: int = 10000) -> list[dict[str, Any]]:
        if limit <= 0:
            return []

        def work(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute(TAKE_RECEIPTS, (device_id, limit)).fetchall()
            rows.sort(key=lambda row: row[0])  # RETURNING comes in no particular order
            return [unpack_receipt(envelope) for _, envelope in rows]

        def none_kept(db: sqlite3.Connection) -> list[dict[str, Any]] | None:
            # every hello asks; almost always there is nothing, and then no write transaction is needed
            kept = db.execute("SELECT 1 FROM receipts WHERE device = ? LIMIT 1", (device_id,)).fetchone()
            return [] if kept is None else None

        return await self._write(work, unless=none_kept)

    async def welcome_reads(self, device_ids: Sequence[str], now: int,
                            limit: int) -> list[tuple[list[dict[str, Any]], list[QueuedMessage]]]:
        def inbox_pages(db: sqlite3.Connection) -> list[list[QueuedMessage]]:
            return [[_queued_record(row) for row in db.execute(SELECT_INBOX_PAGE, (device_id, now, limit))]
                    for device_id in device_ids]

        def work(db: sqlite3.Connection) -> list[tuple[list[dict[str, Any]], list[QueuedMessage]]]:
            taken = []
            for device_id in device_ids:
                rows = db.execute(TAKE_RECEIPTS, (device_id, 10000)).fetchall()
                rows.sort(key=lambda row: row[0])  # RETURNING comes in no particular order
                taken.append([unpack_receipt(envelope) for _, envelope in rows])
            return list(zip(taken, inbox_pages(db), strict=True))

        def none_kept(db: sqlite3.Connection) -> list[tuple[list[dict[str, Any]], list[QueuedMessage]]] | None:
            # almost always no device has kept receipts, and then no write transaction is needed
            for device_id in device_ids:
                if db.execute("SELECT 1 FROM receipts WHERE device = ? LIMIT 1", (device_id,)).fetchone():
                    return None
            return [([], page) for page in inbox_pages(db)]

        return await self._write(work, unless=none_kept)

    async def kept_receipts(self, device_id: str) -> list[dict[str, Any]]:
        def work(db: sqlite3.Connection) -> list[dict[str, Any]]:
            rows = db.execute("SELECT envelope FROM receipts WHERE device = ? ORDER BY id", (device_id,))
            return [unpack_receipt(envelope) for (envelope,) in rows]

        return await self._read(work)

    # ---- idempotency keys --------------------------------------------

    async def save_message_ids(self, entries: Sequence[tuple[str, str | int, int, int]]) -> None:
        rows = [(device, msgpack.packb(msg_id), at, digest) for device, msg_id, at, digest in entries]

        def work(db: sqlite3.Connection) -> None:
            db.execute("DELETE FROM message_ids")
            db.executemany("INSERT INTO message_ids (sender_device, msg_id, at, digest) VALUES (?, ?, ?, ?)", rows)

        await self._write(work)

    async def load_message_ids(self, since: int) -> list[tuple[str, str | int, int, int]]:
        def work(db: sqlite3.Connection) -> list[tuple[str, str | int, int, int]]:
            rows = db.execute("SELECT sender_device, msg_id, at, digest FROM message_ids WHERE at >= ? ORDER BY at",
                              (since,)).fetchall()
            return [(device, msgpack.unpackb(msg_id), at, digest) for device, msg_id, at, digest in rows]

        return await self._read(work)

    # ---- state documents -----------------------------------------------

    async def get_state(self, user_id: str, doc: str) -> StateDoc:
        def work(db: sqlite3.Connection) -> StateDoc:
            return _state_doc(user_id, doc, db.execute(SELECT_STATE_DOC, (user_id, doc)).fetchone())

        return await self._read(work)

    async def patch_state(self, user_id: str, doc: str, patch: Any, by: str, patch_id: str | int | None,
                          if_rev: int | None, now: int, max_doc_bytes: int, max_user_bytes: int,
                          keep_changes: int, fence: tuple[str, int] | None = None) -> StatePatched:
        patch_text = state_patch_text(patch)
        id_text = None if patch_id is None else json.dumps(patch_id)
        patch_value = json.loads(patch_text)

        def work(db: sqlite3.Connection) -> StatePatched:
            if fence is not None:
                held = db.execute("SELECT owner, epoch FROM tasks WHERE user = ? AND task = ?",
                                  (user_id, fence[0])).fetchone()
                if held is None or tuple(held) != (by, fence[1]):
                    raise FenceMoved(f"{by!r} no longer holds task {fence[0]!r} at epoch {fence[1]}")
            row = db.execute(SELECT_STATE_DOC, (user_id, doc)).fetchone()
            current = _state_doc(user_id, doc, row)
            if row is not None and id_text is not None:
                earlier = db.execute(
                    "SELECT rev FROM state_changes WHERE user = ? AND doc = ? AND by = ? AND patch_id = ?"
                    " AND patch = ? ORDER BY rev DESC LIMIT 1", (user_id, doc, by, id_text, patch_text)).fetchone()
                if earlier is not None:
                    return StatePatched(doc=current, rev=earlier[0], prev_rev=earlier[0] - 1, duplicate=True)
            current_size = 0 if row is None else row[2]
            user_bytes: int = db.execute("SELECT COALESCE(SUM(size), 0) FROM state_docs WHERE user = ?",
                                         (user_id,)).fetchone()[0]
            planned = plan_state_patch(current, current_size, user_bytes, patch_value, if_rev, max_doc_bytes,
                                       max_user_bytes)
            if planned is None:
                return StatePatched(doc=current, rev=current.rev, prev_rev=current.rev, noop=True)
            merged, size = planned
            rev = current.rev + 1
            value = None if merged is None else json.dumps(merged, ensure_ascii=False, allow_nan=False)
            db.execute("INSERT INTO state_docs (user, name, rev, value, size, by, updated) VALUES (?, ?, ?, ?, ?, ?, ?)"
                       " ON CONFLICT (user, name) DO UPDATE SET rev = excluded.rev, value = excluded.value,"
                       " size = excluded.size, by = excluded.by, updated = excluded.updated",
                       (user_id, doc, rev, value, size, by, now))
            db.execute("INSERT INTO state_changes (user, doc, rev, patch, by, patch_id, at)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)",
                       (user_id, doc, rev, patch_text, by, id_text, now))
            db.execute("DELETE FROM state_changes WHERE user = ? AND doc = ? AND rev <= ?",
                       (user_id, doc, rev - max(keep_changes, 0)))
            change = StateChange(user=user_id, doc=doc, rev=rev, prev_rev=rev - 1, patch=patch_value, by=by,
                                 patch_id=patch_id, at=now)
            stored = StateDoc(user=user_id, name=doc, rev=rev, value=merged, by=by, updated=now)
            return StatePatched(doc=stored, rev=rev, prev_rev=rev - 1, change=change)

        return await self._write(work)

    async def list_state(self, user_id: str) -> list[tuple[StateDoc, list[StateChange]]]:
        def work(db: sqlite3.Connection) -> list[tuple[StateDoc, list[StateChange]]]:
            rows = db.execute("SELECT name, rev, value, size, by, updated FROM state_docs WHERE user = ?"
                              " ORDER BY name", (user_id,)).fetchall()
            return [(_state_doc(user_id, name, row), _state_changes(db, user_id, name, 0)) for name, *row in rows]

        return await self._write(work)  # one transaction: the documents and their logs as of one moment

    async def restore_state(self, doc: StateDoc, changes: Sequence[StateChange]) -> None:
        value = None if doc.value is None else _json_text(doc.value, f"state document {doc.name!r}")
        size = json_size(doc.value)
        log = [(doc.user, doc.name, change.rev, state_patch_text(change.patch), change.by,
                None if change.patch_id is None else json.dumps(change.patch_id), change.at) for change in changes]

        def work(db: sqlite3.Connection) -> None:
            db.execute("INSERT OR REPLACE INTO state_docs (user, name, rev, value, size, by, updated)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?)", (doc.user, doc.name, doc.rev, value, size, doc.by, doc.updated))
            db.execute("DELETE FROM state_changes WHERE user = ? AND doc = ?", (doc.user, doc.name))
            db.executemany("INSERT INTO state_changes (user, doc, rev, patch, by, patch_id, at)"
                           " VALUES (?, ?, ?, ?, ?, ?, ?)", log)

        await self._write(work)

    async def state_catch_up(self, user_id: str, since: Mapping[str, int], doc: str | None = None,
                             prefix: str | None = None) -> list[StateCatchUp]:
        wanted = dict(since)

        def work(db: sqlite3.Connection) -> list[StateCatchUp]:
            if doc is not None:
                rows = [(doc, db.execute(SELECT_STATE_DOC, (user_id, doc)).fetchone())]
            else:
                start = prefix or ""
                rows = [(name, row) for name, *row in db.execute(
                    "SELECT name, rev, value, size, by, updated FROM state_docs"
                    " WHERE user = ? AND substr(name, 1, ?) = ? ORDER BY name", (user_id, len(start), start))
                        if row[1] is not None or name in wanted]
            caught: list[StateCatchUp] = []
            for name, row in rows:
                current = _state_doc(user_id, name, row)
                have = wanted.get(name)
                changes: list[StateChange] | None = None
                if have is not None and have <= current.rev:
                    if have == current.rev:
                        changes = []
                    else:
                        oldest = db.execute("SELECT MIN(rev) FROM state_changes WHERE user = ? AND doc = ?",
                                            (user_id, name)).fetchone()[0]
                        if oldest is not None and oldest <= have + 1:
                            changes = _state_changes(db, user_id, name, have)
                caught.append(StateCatchUp(doc=current, changes=changes))
            return caught

        return await self._write(work)  # one transaction: the documents and their logs as of one moment

    # ---- task leases -------------------------------------------------

    async def load_tasks(self, user_id: str) -> list[TaskLease]:
        def work(db: sqlite3.Connection) -> list[TaskLease]:
            rows = db.execute("SELECT task, owner, epoch, expires, handoff, updated FROM tasks WHERE user = ?"
                              " ORDER BY task", (user_id,))
            return [TaskLease(user=user_id, task=task, owner=owner, epoch=epoch, expires=expires, handoff=handoff,
                              updated=updated) for task, owner, epoch, expires, handoff, updated in rows]

        return await self._read(work)

    async def users_with_task_notices(self) -> list[str]:
        def work(db: sqlite3.Connection) -> list[str]:
            return [user for (user,) in db.execute(
                "SELECT DISTINCT user FROM tasks WHERE handoff IS NOT NULL ORDER BY user")]

        return await self._read(work)

    async def put_task(self, lease: TaskLease, if_unchanged: bool = False, previous: TaskLease | None = None) -> None:
        row = (lease.user, lease.task, lease.owner, lease.epoch, lease.expires, lease.handoff, lease.updated)

        def work(db: sqlite3.Connection) -> None:
            if db.execute("SELECT 1 FROM users WHERE id = ?", (lease.user,)).fetchone() is None:
                raise StoreError(f"unknown user {lease.user!r}")
            if if_unchanged:
                stored = db.execute("SELECT owner, epoch, expires, handoff, updated FROM tasks WHERE user = ? AND "
                                    "task = ?", (lease.user, lease.task)).fetchone()
                if (None if stored is None else tuple(stored)) != lease_fields(previous):
                    raise TaskRaced(f"task {lease.task!r} of {lease.user!r} changed meanwhile")
            db.execute("INSERT INTO tasks (user, task, owner, epoch, expires, handoff, updated)"
                       " VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (user, task) DO UPDATE SET owner = excluded.owner,"
                       " epoch = excluded.epoch, expires = excluded.expires, handoff = excluded.handoff,"
                       " updated = excluded.updated", row)

        await self._write(work)

    # ---- change feed -------------------------------------------------

    async def changes_since(self, cursor: int, limit: int = 1000) -> list[Change]:
        if limit <= 0:
            return []

        def work(db: sqlite3.Connection) -> list[Change]:
            rows = db.execute("SELECT seq, kind, key FROM changes WHERE seq > ? ORDER BY seq LIMIT ?", (cursor, limit))
            return [Change(seq=seq, kind=kind, key=key) for seq, kind, key in rows]

        return await self._read(work)

    async def last_change(self) -> int:
        def work(db: sqlite3.Connection) -> int:
            seq: int = db.execute("SELECT COALESCE(MAX(seq), 0) FROM changes").fetchone()[0]
            return seq

        return await self._read(work)
