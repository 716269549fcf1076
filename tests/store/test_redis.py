"""What only the Redis store promises (the contract itself is in test_contract.py): several processes share
it, it loses nothing it acknowledged when Redis is killed, it fails fast and recovers while Redis is away,
and it owns every key it writes."""

import asyncio
import os
import signal
import time

import pytest
import redis.asyncio as aioredis

from rccs.config import ConfigError, load_settings
from rccs.store import (
    OVERFLOW_REJECT,
    DeviceRecord,
    IdMemory,
    PairingCode,
    QueuedMessage,
    SessionRecord,
    StateConflict,
    StoreError,
    TaskLease,
    UserRecord,
    open_store,
)
from rccs.store.redis import RedisStore
from rccs.testing import RedisServer

NOW = 1_700_000_000_000
HOUR = 3_600_000


@pytest.fixture
async def server(tmp_path):
    started = RedisServer(tmp_path / "redis")
    await started.start()
    yield started
    started.kill()


@pytest.fixture
async def node_a(server):
    store = RedisStore(server.url)
    await store.open()
    yield store
    await store.close()


@pytest.fixture
async def node_b(server):
    store = RedisStore(server.url)
    await store.open()
    yield store
    await store.close()


def message(msg_id, device="laptop", **fields):
    return QueuedMessage(device=device, user="alice", sender_device="phone", msg_id=msg_id, type="note",
                         body=b"body", ts=NOW, **fields)


async def enqueue(store, *messages):
    return await store.enqueue(list(messages), 1_000_000, 1 << 30, OVERFLOW_REJECT)


# ---- opening one --------------------------------------------------------------------------


def test_open_store_makes_a_redis_store_of_a_redis_url(tmp_path):
    store = open_store("redis://127.0.0.1:6390/2", str(tmp_path))
    assert isinstance(store, RedisStore)
    assert store.url == "redis://127.0.0.1:6390/2"


@pytest.mark.parametrize(("url", "complaint"), [
    ("redis://:6379/0", "names no host"),
    ("redis://127.0.0.1:port/0", "port that is not a number"),
    ("redis://127.0.0.1:6379/zero", "database after the / must be a number"),
    ("http://127.0.0.1:6379/0", "must start with redis://"),
])
def test_a_malformed_store_url_is_refused_saying_what_is_wrong(tmp_path, url, complaint):
    with pytest.raises(ValueError, match=complaint):
        open_store(url, str(tmp_path))
    with pytest.raises(ConfigError, match=complaint):
        load_settings(environ={"RCCS_STORE": url})


def test_the_store_setting_accepts_a_redis_url_and_names_it_when_refusing(tmp_path):
    assert load_settings(environ={"RCCS_STORE": "redis://10.0.0.5:6379/1"}).store == "redis://10.0.0.5:6379/1"
    with pytest.raises(ConfigError, match="redis://HOST:PORT/DB"):
        load_settings(environ={"RCCS_STORE": "postgres"})


async def test_an_unreachable_redis_fails_open_with_a_store_error_naming_it():
    store = RedisStore("redis://user:secret@127.0.0.1:1/0")  # port 1: nothing listens there
    with pytest.raises(StoreError, match=r"redis://127\.0\.0\.1:1/0") as refused:
        await store.open()
    assert "secret" not in str(refused.value)  # the password stays out of logs
    await store.close()


# ---- two nodes on one Redis ------------------------------------------------------------------


async def test_two_stores_on_one_redis_see_each_other_s_writes(node_a, node_b):
    await node_a.add_user(UserRecord(id="alice", created=NOW))
    await node_b.put_device(DeviceRecord(id="laptop", user="alice", type="desktop", created=NOW,
                                         credential_hash="c-laptop"))
    cursor = await node_b.last_change()
    [stored] = (await enqueue(node_a, message("m-1"))).stored

    assert (await node_b.get_user("alice")).created == NOW
    assert (await node_a.find_device_by_credential("c-laptop")).id == "laptop"
    assert await node_b.inbox("laptop", NOW) == [stored]
    await node_b.remove_queued([stored.id])  # the ack lands on the other node
    assert await node_a.inbox("laptop", NOW) == []

    assert await node_b.revoke_device("laptop", NOW) is True
    assert await node_a.revoke_device("laptop", NOW) is False  # revoked once, whichever node asks
    assert [(change.kind, change.key) for change in await node_a.changes_since(cursor)] == [("device", "laptop")]


async def test_concurrent_enqueues_from_two_stores_get_distinct_increasing_ids(node_a, node_b):
    outcomes = await asyncio.gather(*(enqueue(node, message(n)) for n in range(50) for node in (node_a, node_b)))
    ids = [outcome.stored[0].id for outcome in outcomes]
    assert len(set(ids)) == 100
    inbox = await node_a.inbox("laptop", NOW)
    assert [queued.id for queued in inbox] == sorted(ids)  # delivery order is commit order


async def test_of_two_concurrent_patches_on_the_same_revision_exactly_one_wins(node_a, node_b):
    await node_a.patch_state("alice", "user/doc", {"n": 0}, "phone", None, None, NOW, 1 << 20, 1 << 22, 100)
    results = await asyncio.gather(
        *(node.patch_state("alice", "user/doc", {"by": name}, name, None, 1, NOW, 1 << 20, 1 << 22, 100)
          for node, name in ((node_a, "a"), (node_b, "b")) for _ in range(5)),
        return_exceptions=True)
    winners = [result for result in results if not isinstance(result, BaseException)]
    assert len(winners) == 1
    assert all(isinstance(result, StateConflict) for result in results if result not in winners)
    doc = await node_b.get_state("alice", "user/doc")
    assert (doc.rev, doc.value["by"]) == (2, winners[0].change.by)


async def test_concurrent_patches_from_two_stores_each_get_their_own_revision(node_a, node_b):
    results = await asyncio.gather(
        *(node.patch_state("alice", "user/counter", {f"k{n}": n}, "phone", f"p{n}", None, NOW, 1 << 20, 1 << 22, 1000)
          for n, node in enumerate([node_a, node_b] * 20)))
    assert sorted(result.rev for result in results) == list(range(1, 41))
    [caught] = await node_a.state_catch_up("alice", {"user/counter": 0}, doc="user/counter")
    assert [change.rev for change in caught.changes] == list(range(1, 41))
    assert caught.doc.value == {f"k{n}": n for n in range(40)}


# ---- Redis killed, hung, flushed ---------------------------------------------------------------


async def test_what_a_call_returned_from_survives_a_sigkill_of_redis(server, node_a):
    await node_a.add_user(UserRecord(id="alice", created=NOW))
    await node_a.put_device(DeviceRecord(id="laptop", user="alice", type="desktop", created=NOW))
    [stored] = (await enqueue(node_a, message("m-1", receipt=True))).stored
    await node_a.patch_state("alice", "user/doc", {"a": 1}, "phone", "p1", None, NOW, 1 << 20, 1 << 22, 10)
    await node_a.put_task(TaskLease(user="alice", task="build", owner="laptop", epoch=7, expires=NOW))
    last_change = await node_a.last_change()

    server.kill()
    await server.start(port=server.port)

    # The same store, not reopened: its pooled connections went with the old process and are replaced.
    assert await node_a.inbox("laptop", NOW) == [stored]
    assert (await node_a.get_state("alice", "user/doc")).value == {"a": 1}
    assert [lease.epoch for lease in await node_a.load_tasks("alice")] == [7]
    assert await node_a.last_change() == last_change
    [after] = (await enqueue(node_a, message("m-2"))).stored
    assert after.id > stored.id  # the id counter came back too: no id is handed out twice


async def test_calls_while_redis_is_down_fail_fast_and_work_again_once_it_is_back(server, node_a):
    await node_a.add_user(UserRecord(id="alice", created=NOW))
    server.kill()

    started = time.monotonic()
    with pytest.raises(StoreError, match=rf"redis store redis://127\.0\.0\.1:{server.port}/0: enqueue failed"):
        await enqueue(node_a, message("m-1"))
    with pytest.raises(StoreError, match="get_user failed"):
        await node_a.get_user("alice")
    assert time.monotonic() - started < node_a.connect_timeout  # refused at once, no retry loop

    await server.start(port=server.port)
    assert (await node_a.get_user("alice")).created == NOW
    assert len((await enqueue(node_a, message("m-1"))).stored) == 1


async def test_a_hung_redis_fails_a_call_after_the_command_timeout(server):
    store = RedisStore(server.url, command_timeout=0.5)
    await store.open()
    os.kill(server.proc.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(StoreError, match="Timeout"):
            await store.get_user("alice")
        assert 0.4 < time.monotonic() - started < 3
    finally:
        os.kill(server.proc.pid, signal.SIGCONT)
    assert await store.get_user("alice") is None  # and it answers again once Redis does
    await store.close()


async def test_scripts_are_loaded_again_after_redis_forgets_them(server, node_a):
    await node_a.add_user(UserRecord(id="alice", created=NOW))
    admin = aioredis.from_url(server.url)
    try:
        await admin.script_flush()
        await node_a.add_user(UserRecord(id="bob", created=NOW))  # NOSCRIPT, then loaded and run once
        assert [user.id for user in await node_a.list_users()] == ["alice", "bob"]
        assert await node_a.last_change() == 2  # ran exactly once
    finally:
        await admin.aclose()


# ---- every key has an owner --------------------------------------------------------------------


async def test_the_owners_delete_what_they_own_and_only_tombstones_and_counters_remain(server, node_a):
    store = node_a
    await store.add_user(UserRecord(id="alice", created=NOW))
    await store.put_device(DeviceRecord(id="laptop", user="alice", type="desktop", created=NOW,
                                        credential_hash="c-laptop"))
    await store.put_sessions([SessionRecord(id="s-1", user="alice", device="laptop", created=NOW, expires_at=NOW)])
    await store.add_pairing_code(PairingCode(id="ABCD", secret_hash="x", user="alice", issuer_device=None,
                                             created=NOW, expires_at=NOW, approve=False))
    stored = (await enqueue(store, message(1), message(2), message(3, expires_at=NOW), message(4, "phone"))).stored
    await store.dead_letter([stored[1].id], "undeliverable", NOW)
    await store.add_receipts([("phone", {"id": 1})])
    await store.patch_state("alice", "user/doc", {"a": 1}, "phone", None, None, NOW, 1 << 20, 1 << 22, 10)
    await store.put_task(TaskLease(user="alice", task="build", owner="laptop", epoch=1, expires=NOW, handoff="h"))

    # What the server's sweepers, acks and the operator do:
    assert len(await store.take_expired(NOW)) == 1
    await store.remove_queued([stored[0].id])
    await store.purge("laptop", dead_letters=True)
    await store.purge("phone")
    await store.take_receipts("phone")
    await store.delete_stale_sessions(NOW + HOUR, 0)
    await store.delete_pairing_codes_before(NOW + 1)
    await store.remove_user("alice", NOW)

    admin = aioredis.from_url(server.url)
    try:
        keys = sorted(key.decode() for key in await admin.keys("*"))
    finally:
        await admin.aclose()
    assert keys == sorted([
        "rccs:schema", "rccs:change-seq", "rccs:changes", "rccs:queued-seq",  # counters and the feed
        "rccs:devices", "rccs:device:laptop", "rccs:{alice}:devices",  # the revoked device's tombstone
    ])


async def test_calls_of_one_store_run_in_the_order_they_were_made(node_a):
    # As the hub does for a device first seen with a dev token: two background tasks, the user first.
    add = asyncio.create_task(node_a.add_user(UserRecord(id="alice", created=NOW)))
    put = asyncio.create_task(node_a.put_device(DeviceRecord(id="laptop", user="alice", type="desktop",
                                                             created=NOW)))
    await asyncio.gather(add, put)
    assert (await node_a.get_device("laptop")).user == "alice"


def remembering(count, now=NOW, window=HOUR, per_sender=10_000, new_sends=True):
    return IdMemory(now=now, window_ms=window, per_sender=per_sender, checked=[new_sends] * count)


async def test_a_new_sends_id_is_remembered_across_stores_and_a_repeat_is_not_kept_again(node_a, node_b):
    taken = await node_a.enqueue([message("m-1"), message("m-1", "tablet")], 100, 1 << 20, OVERFLOW_REJECT,
                                 remembering(2))
    assert len(taken.stored) == 2  # one send to two devices: its copies share the verdict
    again = await node_b.enqueue([message("m-1")], 100, 1 << 20, OVERFLOW_REJECT, remembering(1, NOW + 1))
    assert (again.stored, [m.msg_id for m in again.repeated], again.conflicting) == ([], ["m-1"], [])
    other_body = message("m-1")
    other_body.body = b"another body"
    changed = await node_b.enqueue([other_body], 100, 1 << 20, OVERFLOW_REJECT, remembering(1, NOW + 2))
    assert ([m.msg_id for m in changed.conflicting], changed.stored) == (["m-1"], [])
    # 1 and "1" are different ids; a message moving to an inbox (its session ended) is not a new send.
    numbered = await node_a.enqueue([message(1), message("1")], 100, 1 << 20, OVERFLOW_REJECT, remembering(2))
    assert len(numbered.stored) == 2
    moved = await node_a.enqueue([message("m-1")], 100, 1 << 20, OVERFLOW_REJECT, remembering(1, new_sends=False))
    assert len(moved.stored) == 1
    assert len(await node_a.inbox("laptop", NOW)) == 4


async def test_a_first_ack_sends_id_is_remembered_with_the_others_across_stores(node_a, node_b):
    # A first_ack send is kept in no inbox: remember_sends checks its id as enqueue checks the others', in the
    # same memory, so a repeat through another node is caught whichever kind of send came first.
    assert await node_a.remember_sends([("alice", "phone", "fa", b"body"), ("alice", "phone", 7, b"body")],
                                       remembering(2)) == [None, None]
    assert await node_b.remember_sends([("alice", "phone", "fa", b"body"), ("alice", "phone", "fa", b"other"),
                                        ("alice", "phone", "7", b"body"), ("alice", "desk", "fa", b"body")],
                                       remembering(4, NOW + 1)) == ["duplicate", "conflict", None, None]
    repeat = await node_b.enqueue([message("fa")], 100, 1 << 20, OVERFLOW_REJECT, remembering(1, NOW + 2))
    assert [m.msg_id for m in repeat.repeated] == ["fa"]
    await node_a.enqueue([message("queued-first")], 100, 1 << 20, OVERFLOW_REJECT, remembering(1, NOW + 3))
    assert await node_b.remember_sends([("alice", "phone", "queued-first", b"body")],
                                       remembering(1, NOW + 4)) == ["duplicate"]
    assert await node_b.remember_sends([("alice", "phone", "fa", b"body")], remembering(1, NOW + HOUR)) == [None]


async def test_remembered_ids_end_with_their_window_and_beyond_the_cap(node_a):
    await node_a.enqueue([message("old")], 100, 1 << 20, OVERFLOW_REJECT, remembering(1))
    later = await node_a.enqueue([message("old")], 100, 1 << 20, OVERFLOW_REJECT, remembering(1, NOW + HOUR))
    assert len(later.stored) == 1  # the window (one hour) passed: a new message
    for n in range(3):
        await node_a.enqueue([message(f"c-{n}")], 100, 1 << 20, OVERFLOW_REJECT,
                             remembering(1, NOW + HOUR + 1 + n, per_sender=2))
    repeats = await node_a.enqueue([message("c-0"), message("c-2")], 100, 1 << 20, OVERFLOW_REJECT,
                                   remembering(2, NOW + HOUR + 10, per_sender=2))
    assert [m.msg_id for m in repeats.stored] == ["c-0"]  # the oldest id fell out past two per sender
    assert [m.msg_id for m in repeats.repeated] == ["c-2"]


async def test_ids_saved_at_shutdown_by_several_nodes_are_merged(node_a, node_b):
    await node_a.save_message_ids([("phone", "a", NOW, 1)])
    await node_b.save_message_ids([("laptop", 7, NOW + 1, 2), ("phone", "old", NOW - HOUR, 3)])
    assert await node_a.load_message_ids(NOW - 1) == [("phone", "a", NOW, 1), ("laptop", 7, NOW + 1, 2)]
    assert await node_b.load_message_ids(NOW - 2 * HOUR) == [("phone", "a", NOW, 1), ("laptop", 7, NOW + 1, 2)]


async def test_calls_made_together_after_redis_forgot_the_scripts_each_run_once(server, node_a):
    admin = aioredis.from_url(server.url)
    try:
        await admin.script_flush()
        # One turn of the event loop: one pipeline of scripts and plain reads, all answered NOSCRIPT or run.
        added = await asyncio.gather(*(node_a.add_user(UserRecord(id=f"user-{i}", created=NOW)) for i in range(20)),
                                     node_a.get_user("user-0"), node_a.list_users())
        assert len(added) == 22
        assert [user.id for user in await node_a.list_users()] == sorted(f"user-{i}" for i in range(20))
        assert await node_a.last_change() == 20  # every script ran exactly once
    finally:
        await admin.aclose()


async def test_after_redis_forgot_the_scripts_a_later_call_does_not_overtake_an_earlier_one(server, node_a):
    admin = aioredis.from_url(server.url)
    try:
        await admin.script_flush()  # as after a restart
        with pytest.raises(StoreError):  # one call finds its script missing: every script is loaded again
            await node_a.put_device(DeviceRecord(id="x", user="nobody", type="cli", created=NOW))
        # As the hub spawns them for a device first seen with a dev token: the user first, in one turn.
        await asyncio.gather(node_a.add_user(UserRecord(id="alice", created=NOW)),
                             node_a.put_device(DeviceRecord(id="laptop", user="alice", type="desktop", created=NOW)))
        assert (await node_a.get_device("laptop")).user == "alice"
    finally:
        await admin.aclose()
