"""What only the SQLite store has: a file that outlives the process, WAL, migrations, a second process."""

import asyncio
import contextlib
import sqlite3
import threading

import pytest

from rccs.store import (
    CHANGE_DEVICE,
    CHANGE_SESSION,
    OVERFLOW_DROP_OLDEST,
    OVERFLOW_REJECT,
    PRIORITY_EMERGENCY,
    PRIORITY_LOW,
    STATUS_AWAY,
    DeadLetter,
    DeviceRecord,
    PairingCode,
    PendingMessage,
    QueuedMessage,
    SessionRecord,
    SqliteStore,
    StoreError,
    UserRecord,
)
from rccs.store import sqlite as sqlite_module
from rccs.store.sqlite import MIGRATIONS

NOW = 1_700_000_000_000


@contextlib.asynccontextmanager
async def opened(path):
    store = SqliteStore(str(path))
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def read_file(path, query):
    with contextlib.closing(sqlite3.connect(str(path))) as db:
        return db.execute(query).fetchall()


def worker_threads():
    return [thread for thread in threading.enumerate() if thread.name.startswith("rccs-sqlite")]


async def test_everything_survives_closing_and_reopening(tmp_path):
    path = tmp_path / "rccs.db"
    device = DeviceRecord(id="laptop", user="alice", type="desktop", name="Laptop", capabilities=("shell",),
                          metadata={"k": [1, "two"]}, created=NOW, last_seen=NOW, status=STATUS_AWAY,
                          credential_hash="c-laptop")
    session = SessionRecord(id="s-1", user="alice", device="laptop", created=NOW, expires_at=NOW + 1000,
                            next_seq=3, disconnected_at=NOW, messages_in=2, pending=[
                                PendingMessage(seq=2, sender_user="alice", sender_device="phone", msg_id=5,
                                               frame=b"\x00\x01", text=False)])
    code = PairingCode(id="ABCD", secret_hash="right", user="alice", issuer_device="laptop", created=NOW,
                       expires_at=NOW + 1000, approve=True)
    async with opened(path) as store:
        await store.add_user(UserRecord(id="alice", created=NOW))
        await store.put_device(device)
        await store.put_sessions([session])
        await store.add_pairing_code(code)
        changes = await store.changes_since(0)

    async with opened(path) as store:
        assert await store.list_users() == [UserRecord(id="alice", created=NOW)]
        assert await store.get_device("laptop") == device
        assert await store.find_device_by_credential("c-laptop") == device
        assert await store.get_session("s-1") == session
        assert await store.changes_since(0) == changes
        assert await store.last_change() == changes[-1].seq
        assert (await store.redeem_pairing_code("ABCD", "right", NOW, 5)).issuer_device == "laptop"


async def test_open_creates_missing_parent_directories(tmp_path):
    path = tmp_path / "a" / "b" / "rccs.db"
    async with opened(path):
        pass
    assert path.is_file()


async def test_the_file_is_in_wal_mode(tmp_path):
    path = tmp_path / "rccs.db"
    async with opened(path):
        assert read_file(path, "PRAGMA journal_mode") == [("wal",)]


async def test_a_new_file_gets_every_migration_and_reopening_changes_nothing(tmp_path):
    path = tmp_path / "rccs.db"
    async with opened(path) as store:
        await store.add_user(UserRecord(id="alice", created=NOW))
    assert read_file(path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    schema = read_file(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name")
    assert {"users", "devices", "sessions", "pairing_codes", "changes"} <= {name for _, name, _ in schema}

    async with opened(path) as store:
        assert [user.id for user in await store.list_users()] == ["alice"]
    assert read_file(path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert read_file(path, "SELECT type, name, sql FROM sqlite_master ORDER BY name") == schema


async def test_an_older_file_is_migrated_and_keeps_its_data(tmp_path, monkeypatch):
    path = tmp_path / "rccs.db"
    async with opened(path) as store:
        await store.add_user(UserRecord(id="alice", created=NOW))
    upgrade = "CREATE TABLE notes (user TEXT NOT NULL, note TEXT NOT NULL);\nINSERT INTO notes VALUES ('alice', 'hi;');"
    monkeypatch.setattr(sqlite_module, "MIGRATIONS", [*MIGRATIONS, upgrade])

    async with opened(path) as store:
        assert [user.id for user in await store.list_users()] == ["alice"]
    assert read_file(path, "PRAGMA user_version") == [(len(MIGRATIONS) + 1,)]
    assert read_file(path, "SELECT user, note FROM notes") == [("alice", "hi;")]


async def test_a_failing_migration_leaves_the_file_at_the_version_before(tmp_path, monkeypatch):
    path = tmp_path / "rccs.db"
    async with opened(path):
        pass
    broken = "CREATE TABLE notes (note TEXT);\nINSERT INTO no_such_table VALUES (1);"
    monkeypatch.setattr(sqlite_module, "MIGRATIONS", [*MIGRATIONS, broken])
    threads_before = len(worker_threads())

    with pytest.raises(StoreError, match="no_such_table"):
        await SqliteStore(str(path)).open()

    assert read_file(path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    assert read_file(path, "SELECT name FROM sqlite_master WHERE name = 'notes'") == []
    assert len(worker_threads()) == threads_before


async def test_a_file_from_a_newer_rccs_is_refused(tmp_path):
    path = tmp_path / "rccs.db"
    with contextlib.closing(sqlite3.connect(str(path))) as db:
        db.execute(f"PRAGMA user_version = {len(MIGRATIONS) + 1}")
    threads_before = len(worker_threads())

    with pytest.raises(StoreError, match="newer rccs") as refused:
        await SqliteStore(str(path)).open()

    assert f"version {len(MIGRATIONS) + 1}" in str(refused.value)
    assert read_file(path, "PRAGMA user_version") == [(len(MIGRATIONS) + 1,)]
    assert read_file(path, "SELECT name FROM sqlite_master") == []
    assert len(worker_threads()) == threads_before


async def test_a_file_that_is_not_a_database_is_refused_with_a_store_error(tmp_path):
    path = tmp_path / "rccs.db"
    path.write_bytes(b"this is not a database, just some text long enough to have a header" * 10)
    with pytest.raises(StoreError, match="not a database"):
        await SqliteStore(str(path)).open()


async def test_one_worker_thread_while_open_none_after_close(tmp_path):
    threads_before = len(worker_threads())
    store = SqliteStore(str(tmp_path / "rccs.db"))
    await store.open()
    await asyncio.gather(*(store.add_user(UserRecord(id=f"u{n}", created=NOW)) for n in range(20)))
    assert len(worker_threads()) == threads_before + 1
    await store.close()
    assert len(worker_threads()) == threads_before
    with pytest.raises(StoreError, match="not open"):
        await store.list_users()
    await store.close()  # a second close is harmless


async def test_calls_are_applied_in_the_order_they_were_made(tmp_path):
    async with opened(tmp_path / "rccs.db") as store:
        await store.add_user(UserRecord(id="alice", created=NOW))
        await asyncio.gather(*(
            store.put_device(DeviceRecord(id="laptop", user="alice", type="desktop", name=f"name-{n}"))
            for n in range(50)
        ))
        assert (await store.get_device("laptop")).name == "name-49"


async def test_a_second_store_on_the_same_file_shares_data_and_the_change_feed(tmp_path):
    """The CLI opens the server's file from another process; two stores here are two connections."""
    path = tmp_path / "rccs.db"
    async with opened(path) as server, opened(path) as cli:
        await server.add_user(UserRecord(id="alice", created=NOW))
        await server.put_device(DeviceRecord(id="laptop", user="alice", type="desktop", credential_hash="c-laptop"))
        await server.put_sessions([SessionRecord(id="s-1", user="alice", device="laptop", created=NOW,
                                                 expires_at=NOW + 1000)])
        cursor = await server.last_change()

        assert (await cli.get_device("laptop")).credential_hash == "c-laptop"
        assert [session.id for session in await cli.list_sessions("alice")] == ["s-1"]
        assert await cli.revoke_device("laptop", NOW + 1) is True

        assert [(change.kind, change.key) for change in await server.changes_since(cursor)] == [
            (CHANGE_DEVICE, "laptop"), (CHANGE_SESSION, "s-1"),
        ]
        assert await server.find_device_by_credential("c-laptop") is None
        # The server's next flush, written before it read the feed, does not undo the revocation.
        await server.put_sessions([SessionRecord(id="s-1", user="alice", device="laptop", created=NOW,
                                                 expires_at=NOW + 1000, messages_in=4)])
        assert (await cli.get_session("s-1")).revoked_at == NOW + 1
        assert await server.revoke_device("laptop", NOW + 2) is False


async def test_two_stores_writing_at_once_both_succeed(tmp_path):
    path = tmp_path / "rccs.db"
    async with opened(path) as first, opened(path) as second:
        await first.add_user(UserRecord(id="alice", created=NOW))

        def device(store_name, n):
            return DeviceRecord(id=f"{store_name}-{n}", user="alice", type="desktop", created=n)

        await asyncio.gather(*(
            write for n in range(100)
            for write in (first.put_device(device("first", n)), second.put_device(device("second", n)))
        ))

        assert len(await first.list_devices("alice")) == 200
        seqs = [change.seq for change in await second.changes_since(0, limit=10_000)]
        assert len(seqs) == len(set(seqs)) == 201


# ---- durable inboxes and receipts ---------------------------------------------------


def queued(msg_id, device="laptop", **fields):
    fields.setdefault("user", "alice")
    fields.setdefault("ts", NOW)
    return QueuedMessage(device=device, sender_device="phone", msg_id=msg_id, type="note", body=b"\x00body", **fields)


async def enqueue(store, *messages, max_count=1_000_000, max_bytes=1_000_000_000, policy=OVERFLOW_REJECT):
    return await store.enqueue(list(messages), max_count, max_bytes, policy)


def inbox_totals_by_counting(path):
    """(device, count, bytes) of every inbox, counted from its rows rather than read from inbox_totals."""
    return read_file(path, "SELECT device, COUNT(*), SUM(size) FROM inbox GROUP BY device ORDER BY device")


def inbox_totals_kept(path):
    return read_file(path, "SELECT device, count, bytes FROM inbox_totals WHERE count > 0 ORDER BY device")


async def test_queued_ids_are_never_reused_across_a_reopen(tmp_path):
    path = tmp_path / "rccs.db"
    async with opened(path) as store:
        stored = (await enqueue(store, queued(1), queued(2), queued(3))).stored
        # The newest message ends as a purged dead letter, the others acked: no row keeps the highest id.
        await store.dead_letter([stored[2].id], "undeliverable", NOW)
        await store.purge("laptop", dead_letters=True)
        await store.remove_queued([message.id for message in stored])
        assert read_file(path, "SELECT COUNT(*) FROM inbox") == [(0,)]

    async with opened(path) as store:
        [again] = (await enqueue(store, queued(4))).stored
        assert again.id > stored[2].id


async def test_receipt_ids_are_never_reused_so_order_survives_deletes_and_a_reopen(tmp_path):
    path = tmp_path / "rccs.db"
    async with opened(path) as store:
        await store.add_receipts([("phone", {"n": 1}), ("phone", {"n": 2})])
        await store.take_receipts("phone")
    async with opened(path) as store:
        await store.add_receipts([("phone", {"n": 3}), ("phone", {"n": 4})])
        assert await store.take_receipts("phone") == [{"n": 3}, {"n": 4}]
    assert read_file(path, "SELECT seq FROM sqlite_sequence WHERE name = 'receipts'") == [(4,)]


async def test_inboxes_dead_letters_and_receipts_survive_closing_and_reopening(tmp_path):
    path = tmp_path / "rccs.db"
    async with opened(path) as store:
        stored = (await enqueue(store, queued("m-1", priority=PRIORITY_LOW, expires_at=NOW + 5, receipt=True),
                                queued(2**64 - 1, priority=PRIORITY_EMERGENCY), queued(-5, "phone"))).stored
        await store.count_attempts([stored[2].id])
        [dead] = await store.dead_letter([stored[2].id], "undeliverable", NOW + 1)
        await store.add_receipts([("phone", {"op": "receipt", "id": 7, "nested": {1: [b"\x00"]}})])
        sizes = [await store.inbox_size(device) for device in ("laptop", "phone")]

    async with opened(path) as store:
        assert await store.inbox("laptop", NOW) == [stored[1], stored[0]]
        assert [await store.inbox_size(device) for device in ("laptop", "phone")] == sizes
        assert await store.dead_letters() == [DeadLetter(message=dead, reason="undeliverable", at=NOW + 1)]
        assert dead.attempts == 1
        assert await store.take_receipts("phone") == [{"op": "receipt", "id": 7, "nested": {1: [b"\x00"]}}]
        assert await store.take_expired(NOW + 5) == [stored[0]]


async def test_a_file_of_schema_version_1_gets_the_inbox_tables_and_keeps_its_data(tmp_path, monkeypatch):
    path = tmp_path / "rccs.db"
    monkeypatch.setattr(sqlite_module, "MIGRATIONS", MIGRATIONS[:1])
    async with opened(path) as store:
        await store.add_user(UserRecord(id="alice", created=NOW))
    assert read_file(path, "PRAGMA user_version") == [(1,)]
    monkeypatch.setattr(sqlite_module, "MIGRATIONS", MIGRATIONS)

    async with opened(path) as store:
        assert [user.id for user in await store.list_users()] == ["alice"]
        assert (await enqueue(store, queued(1))).stored[0].id == 1

    assert read_file(path, "PRAGMA user_version") == [(len(MIGRATIONS),)]
    names = {name for (name,) in read_file(path, "SELECT name FROM sqlite_master")}
    assert {"inbox", "inbox_totals", "dead_letters", "receipts", "inbox_by_delivery", "inbox_by_expiry",
            "dead_letters_by_device", "dead_letters_by_user", "receipts_by_device"} <= names


async def test_a_batch_is_one_transaction_a_failing_message_stores_none_of_it(tmp_path):
    path = tmp_path / "rccs.db"
    async with opened(path) as store:
        unbindable = queued("bad", ts=[NOW])  # SQLite cannot bind a list: fails inside the transaction
        with pytest.raises(StoreError, match="binding"):
            await enqueue(store, queued(1), queued(2, "phone"), unbindable)
        assert await store.inbox_size("laptop") == (0, 0)
        assert await store.inbox_size("phone") == (0, 0)
        assert read_file(path, "SELECT COUNT(*) FROM inbox") == [(0,)]
        assert (await enqueue(store, queued(3))).stored[0].msg_id == 3


async def test_the_kept_inbox_totals_match_the_rows_after_every_kind_of_write(tmp_path):
    path = tmp_path / "rccs.db"
    async with opened(path) as store:
        stored = (await enqueue(store, *(queued(n, "laptop" if n % 3 else "phone", expires_at=NOW + n)
                                         for n in range(30)))).stored
        await enqueue(store, *(queued(f"d{n}", priority=PRIORITY_LOW) for n in range(10)),
                      max_count=25, policy=OVERFLOW_DROP_OLDEST)
        await store.remove_queued([message.id for message in stored[:4]])
        await store.take_expired(NOW + 10)
        await store.dead_letter([message.id for message in stored[20:26]], "undeliverable", NOW)
        await store.redrive(device_id="phone")
        await store.purge("tablet")
        counted = inbox_totals_by_counting(path)
        assert counted  # something is left to compare
        assert inbox_totals_kept(path) == counted
        assert [(device, *await store.inbox_size(device)) for device, _, _ in counted] == counted
        await store.purge("phone")
        await store.purge("laptop")
        assert inbox_totals_kept(path) == []


async def test_another_process_s_inbox_writes_count_in_the_server_s_caps(tmp_path):
    """The CLI redrives or purges from its own connection; the server's next enqueue must see that."""
    path = tmp_path / "rccs.db"
    async with opened(path) as server, opened(path) as cli:
        stored = (await enqueue(server, queued(1), queued(2), max_count=2)).stored
        assert (await enqueue(server, queued(3), max_count=2)).rejected
        await cli.dead_letter([stored[0].id], "undeliverable", NOW)
        assert [message.msg_id for message in (await enqueue(server, queued(3), max_count=2)).stored] == [3]
        await cli.redrive()
        assert await server.inbox_size("laptop") == (3, 3 * queued(1).size)
        await cli.purge("laptop")
        assert await server.inbox_size("laptop") == (0, 0)


@pytest.mark.parametrize(("query", "index"), [
    (sqlite_module.SELECT_INBOX_PAGE, "inbox_by_delivery"),
    (sqlite_module.SELECT_LOWEST_PRIORITY, "inbox_by_delivery"),
    (sqlite_module.SELECT_OLDEST_OF_PRIORITY, "inbox_by_delivery"),
    (sqlite_module.SELECT_EXPIRED_IDS, "inbox_by_expiry"),
    (f"{sqlite_module.SELECT_DEAD} WHERE device = ? ORDER BY id LIMIT ?", "dead_letters_by_device"),
    (f"{sqlite_module.SELECT_DEAD} WHERE user = ? ORDER BY id LIMIT ?", "dead_letters_by_user"),
    (sqlite_module.TAKE_RECEIPTS, "receipts_by_device"),
])
async def test_the_inbox_queries_use_their_index_and_sort_nothing_they_need_not(tmp_path, query, index):
    """A page of a long inbox must not sort or scan the whole inbox."""
    path = tmp_path / "rccs.db"
    async with opened(path):
        pass
    parameters = ["x"] * query.count("?")
    with contextlib.closing(sqlite3.connect(str(path))) as db:
        plan = " / ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {query}", parameters))
    assert f"INDEX {index}" in plan
    assert "SCAN" not in plan
    if index != "inbox_by_expiry":  # the expired set is sorted by id: it is small, the inbox may not be
        assert "TEMP B-TREE" not in plan
