"""``rccs store copy``: everything a server needs, from one store into another, so that the devices keep
working without pairing again (the way from a single node's SQLite data directory to a Redis cluster).

The copy goes through the Store contract only, so any store copies into any other. What it copies, in this
order, and why the order:

1. users;
2. inbox messages and dead letters, together in the order of their source ids: the target hands out new
   ids (each store has its own counter), so order is kept, ids are not. They go in before the devices
   because ``enqueue`` refuses messages for a revoked device, and a revoked device's inbox and dead letters
   are copied like any other's. A dead letter is enqueued and moved to the dead letters with its reason and
   time. Expired messages are copied too: the target's sweeper tells their senders ``expired``, as the
   source's would have;
3. devices, revoked ones (tombstones, also of removed users) included: their ids stay dead;
4. sessions, so that devices resume; the sessions of a revoked device are not copied (they can never be
   resumed again, and every store skips them: ``put_sessions``);
5. kept receipts (``kept_receipts``: read without taking them from the source);
6. pairing codes, state documents at their revisions with their change logs (``restore_state``), task
   leases with their epochs, the remembered message ids (``save_message_ids``);
7. ``reset_live_state`` on the target: nothing is connected there yet.

Not copied here: the change feed (each store numbers its own; a server starts reading it at its end), and
the token secret, which a local store keeps beside it, not in it: ``run_copy`` below copies that. The
caller makes sure that nothing writes to either store meanwhile (``run_copy`` does).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from typing import TypeVar

from .auth import adopt_secret, read_secret
from .config import ConfigError
from .node import DataDirLock
from .store import DB_FILE, DeadLetter, QueuedMessage, Store, StoreError, is_store_url, open_store, parse_redis_url
from .store.base import OVERFLOW_REJECT, url_without_password

EVERY_MESSAGE = 0  # inbox(..., now=0): at time 0 no message has expired yet, so the expired ones are listed too
NO_CAP = 1 << 50  # inbox caps for the copy: the source's inboxes were within the caps of their time
BATCH = 500  # records per store call: one transaction each, and within what one Redis script call takes
ALL = 1 << 50  # "no limit" for the contract's list calls

T = TypeVar("T")


@dataclasses.dataclass
class Copied:
    """How many of each kind were copied (what ``rccs store copy`` prints)."""

    users: int = 0
    devices: int = 0
    revoked_devices: int = 0
    sessions: int = 0
    sessions_not_copied: int = 0  # of revoked devices
    inbox_messages: int = 0
    dead_letters: int = 0
    receipts: int = 0
    pairing_codes: int = 0
    state_documents: int = 0
    state_changes: int = 0
    task_leases: int = 0
    message_ids: int = 0


async def holds_data(store: Store) -> bool:
    """Whether a store has anything a copy could clash with or overwrite: a user or device (also a tombstone),
    a dead letter, a pairing code, a remembered message id, or any change ever recorded."""
    return bool(await store.last_change() or await store.list_users()
                or await store.list_devices(include_revoked=True) or await store.dead_letters(limit=1)
                or await store.list_pairing_codes() or await store.load_message_ids(0))


def _batches(items: Sequence[T]) -> list[Sequence[T]]:
    return [items[start:start + BATCH] for start in range(0, len(items), BATCH)]


async def copy_store(source: Store, target: Store, now: int | None = None) -> Copied:
    """Copy everything from ``source`` into ``target``, which should hold nothing (see ``holds_data``)."""
    copied = Copied()
    now = int(time.time() * 1000) if now is None else now
    users = await source.list_users()
    for user in users:
        await target.add_user(user)
    copied.users = len(users)

    devices = await source.list_devices(include_revoked=True)
    await _copy_messages(source, target, [device.id for device in devices], copied)

    for device in devices:
        await target.put_device(device)
    copied.devices = len(devices)
    revoked = {device.id for device in devices if device.revoked_at is not None}
    copied.revoked_devices = len(revoked)

    sessions = await source.list_sessions()
    resumable = [session for session in sessions if session.device not in revoked]
    for batch in _batches(resumable):
        await target.put_sessions(batch)
    copied.sessions = len(resumable)
    copied.sessions_not_copied = len(sessions) - len(resumable)

    for device in devices:
        receipts = await source.kept_receipts(device.id)
        if receipts:
            await target.add_receipts([(device.id, receipt) for receipt in receipts])
            copied.receipts += len(receipts)

    codes = await source.list_pairing_codes()
    for code in codes:
        await target.add_pairing_code(code)
    copied.pairing_codes = len(codes)

    for user in users:
        for doc, changes in await source.list_state(user.id):
            await target.restore_state(doc, changes)
            copied.state_documents += 1
            copied.state_changes += len(changes)
        leases = await source.load_tasks(user.id)
        for lease in leases:
            await target.put_task(lease)
        copied.task_leases += len(leases)

    message_ids = await source.load_message_ids(0)
    if message_ids:
        await target.save_message_ids(message_ids)
    copied.message_ids = len(message_ids)

    await target.reset_live_state(now)
    return copied


async def _copy_messages(source: Store, target: Store, device_ids: Sequence[str], copied: Copied) -> None:
    """Inbox messages and dead letters, in the order of their source ids (see the module docstring)."""
    queued: list[QueuedMessage] = []
    for device_id in device_ids:
        count, _ = await source.inbox_size(device_id)
        if count:
            queued.extend(await source.inbox(device_id, EVERY_MESSAGE, count))
    letters = await source.dead_letters(limit=ALL)
    dead: dict[int, DeadLetter] = {letter.message.id: letter for letter in letters}
    in_order = sorted([*queued, *(letter.message for letter in letters)], key=lambda message: message.id)
    for batch in _batches(in_order):
        outcome = await target.enqueue(batch, NO_CAP, NO_CAP, OVERFLOW_REJECT)
        if outcome.rejected or outcome.dropped or len(outcome.stored) != len(batch):
            raise StoreError(f"the target refused {len(batch) - len(outcome.stored)} of the inbox messages and dead "
                             "letters it was given")
        # Dead letters go to the dead letters with their own reason and time: one call per (reason, time).
        moves: dict[tuple[str, int], list[int]] = {}
        for original, stored in zip(batch, outcome.stored, strict=True):
            letter = dead.get(original.id)
            if letter is not None:
                moves.setdefault((letter.reason, letter.at), []).append(stored.id)
        for (reason, at), ids in moves.items():
            await target.dead_letter(ids, reason, at)
    copied.inbox_messages = len(queued)
    copied.dead_letters = len(letters)


# ---- the command: where from, where to, and the checks around the copy ----------------------------------


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """One side of a copy: a Redis store URL, or the SQLite store of a data directory (``url`` empty)."""

    url: str = ""
    data_dir: str = ""

    @property
    def description(self) -> str:
        return url_without_password(self.url) if self.url else f"the data directory {self.data_dir}"

    def open(self) -> Store:
        return open_store(self.url, "") if self.url else open_store("sqlite", self.data_dir)


def endpoint(value: str, default_data_dir: str, flag: str) -> Endpoint:
    """``--from``/``--to``: a redis:// URL, ``sqlite`` (the data directory of --data-dir or the settings), or
    the path of a data directory. ConfigError or ValueError saying what is wrong."""
    if value == "memory":
        raise ConfigError(f"{flag} memory: a memory store lives inside its server process and cannot be copied")
    if not value:
        raise ConfigError(f"{flag} is empty: give a data directory or a redis://HOST:PORT/DB URL")
    if is_store_url(value):
        return Endpoint(url=parse_redis_url(value))
    return Endpoint(data_dir=os.path.abspath(default_data_dir if value == "sqlite" else value))


@dataclasses.dataclass
class CopyReport:
    copied: Copied
    secret: str  # "copied" (or the target had the same already) or "none" (the source has none)


@contextlib.contextmanager
def _at_rest(side: Endpoint, role: str) -> Iterator[None]:
    """Hold the serve lock of a data directory while the copy runs: a server running on it refuses the copy,
    and no server starts on it meanwhile. (A Redis side is checked for live nodes instead.)"""
    if side.url:
        yield
        return
    lock = DataDirLock(side.data_dir)
    try:
        lock.acquire()
    except ConfigError:
        raise ConfigError(f"an rccs server is running on the {role}, {side.description}: stop it first (a copy "
                          "needs both stores at rest)") from None
    try:
        yield
    finally:
        lock.release()


@contextlib.asynccontextmanager
async def _opened(side: Endpoint, role: str) -> AsyncIterator[Store]:
    with _at_rest(side, role):
        store = side.open()
        await store.open()
        try:
            if side.url:
                await _refuse_live_nodes(side, role)
            yield store
        finally:
            await store.close()


async def _refuse_live_nodes(side: Endpoint, role: str) -> None:
    from redis.exceptions import RedisError  # redis-py is needed only for a Redis side

    from .broker.redis import live_nodes

    try:
        nodes = await live_nodes(side.url)
    except RedisError as exc:
        raise StoreError(f"{side.description}: {exc}") from None
    if nodes:
        raise ConfigError(f"rccs nodes are serving on the {role}, {side.description} ({', '.join(nodes)}): stop "
                          "them first (a copy needs both stores at rest)")


async def _source_secret(source: Endpoint, store: Store) -> bytes | None:
    return await store.token_secret() if source.url else read_secret(source.data_dir)


async def _adopt_secret(target: Endpoint, store: Store, secret: bytes) -> bytes:
    return await store.adopt_token_secret(secret) if target.url else adopt_secret(target.data_dir, secret)


async def run_copy(source: Endpoint, target: Endpoint) -> CopyReport:
    """The whole command: refuses (ConfigError) a copy onto itself, from a source with no store or no data,
    into a target that holds data or another token secret, and while a server runs on either side. The
    source is checked before the target is touched, so a refused copy leaves no empty store behind."""
    if source == target:
        raise ConfigError(f"--from and --to are both {source.description}")
    if not source.url and not os.path.exists(os.path.join(source.data_dir, DB_FILE)):
        raise ConfigError(f"no store at {os.path.join(source.data_dir, DB_FILE)} (is --from right?)")
    async with _opened(source, "source") as source_store:
        if not await holds_data(source_store):
            raise ConfigError(f"the source, {source.description}, holds no data (is --from right?)")
        async with _opened(target, "target") as target_store:
            if await holds_data(target_store):
                raise ConfigError(
                    f"the target, {target.description}, already holds data: a copy goes into an empty store only "
                    "(merging two could clash on ids and would reorder inboxes); use an empty Redis database "
                    "(another /DB number, or FLUSHDB after checking) or a new data directory")
            secret = await _source_secret(source, source_store)
            outcome = "none"
            if secret is not None:
                if await _adopt_secret(target, target_store, secret) != secret:
                    raise ConfigError(
                        f"the target, {target.description}, has another token secret already: dev tokens issued "
                        "with the source's would be refused there; copy into a store without one")
                outcome = "copied"
            copied = await copy_store(source_store, target_store)
    return CopyReport(copied=copied, secret=outcome)
