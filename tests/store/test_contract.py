"""The Store contract (rccs/store/base.py), written once and run against every implementation.

A rule in a docstring of base.py has a test here; a store passes when it passes all of them.
SQLite-only behaviour (files, WAL, migrations, a second process) is in test_sqlite.py.
"""

import dataclasses

import pytest

from rccs.store import (
    CHANGE_DEVICE,
    CHANGE_SESSION,
    CHANGE_USER,
    OVERFLOW_DROP_OLDEST,
    OVERFLOW_REJECT,
    PRIORITY_EMERGENCY,
    PRIORITY_HIGH,
    PRIORITY_LOW,
    PRIORITY_NORMAL,
    STATUS_AWAY,
    STATUS_OFFLINE,
    STATUS_ONLINE,
    AlreadyExists,
    DeadLetter,
    DeviceRecord,
    DeviceRefused,
    FenceMoved,
    MemoryStore,
    OpenHandoff,
    PairingCode,
    PendingMessage,
    QueuedMessage,
    SessionRecord,
    SqliteStore,
    StateChange,
    StateConflict,
    StateDoc,
    StateTooLarge,
    StoreError,
    TaskLease,
    TaskRaced,
    UserRecord,
    open_store,
    session_is_stale,
)
from rccs.testing import RedisServer

NOW = 1_700_000_000_000
MINUTE = 60_000
HOUR = 60 * MINUTE
GRACE = 5 * MINUTE


@pytest.fixture(params=["memory", "sqlite", "redis"])
async def store(request, tmp_path):
    server = None
    kind = request.param
    if kind == "redis":  # a throw-away redis-server of its own: no test sees another's keys
        server = RedisServer(tmp_path / "redis")
        kind = await server.start()
    # A data directory that does not exist yet: the SQLite store must create it.
    opened = open_store(kind, str(tmp_path / "data"))
    try:
        await opened.open()
        yield opened
        await opened.close()
    finally:
        if server is not None:
            server.kill()


def make_device(device_id, user="alice", created=NOW, **fields):
    return DeviceRecord(id=device_id, user=user, type="desktop", created=created, **fields)


def make_session(session_id, user="alice", device="laptop", created=NOW, expires_at=NOW + HOUR, **fields):
    return SessionRecord(id=session_id, user=user, device=device, created=created, expires_at=expires_at, **fields)


def make_code(code_id="ABCD", secret_hash="right", user="alice", expires_at=NOW + MINUTE, **fields):
    fields.setdefault("issuer_device", None)
    fields.setdefault("approve", False)
    return PairingCode(id=code_id, secret_hash=secret_hash, user=user, created=NOW, expires_at=expires_at, **fields)


def pending_messages():
    return [
        PendingMessage(seq=7, sender_user="alice", sender_device="phone", msg_id=42,
                       frame=b"\x82\xa2op\xa3msg\x00\xff", text=False),
        PendingMessage(seq=8, sender_user="bob", sender_device="tablet", msg_id="m-8",
                       frame=b'{"op":"msg","body":"\xc3\xa9"}', text=True),
    ]


async def add_users(store, *user_ids):
    for user_id in user_ids:
        await store.add_user(UserRecord(id=user_id, created=NOW))


async def new_changes(store, cursor):
    """(kind, key) of every change after ``cursor``, oldest first."""
    return [(change.kind, change.key) for change in await store.changes_since(cursor)]


async def ids_of_devices(store, user_id=None, include_revoked=False):
    return [device.id for device in await store.list_devices(user_id, include_revoked=include_revoked)]


async def ids_of_sessions(store, user_id=None, device_id=None):
    return [session.id for session in await store.list_sessions(user_id, device_id)]


# ---- the factory -----------------------------------------------------------


def test_open_store_makes_each_kind_without_opening_it(tmp_path):
    assert isinstance(open_store("memory", str(tmp_path)), MemoryStore)
    sqlite_store = open_store("sqlite", str(tmp_path / "data"))
    assert isinstance(sqlite_store, SqliteStore)
    assert sqlite_store.path == str(tmp_path / "data" / "rccs.db")
    assert not (tmp_path / "data").exists()


def test_open_store_refuses_an_unknown_kind_naming_the_allowed_ones(tmp_path):
    with pytest.raises(ValueError, match="redis") as refused:
        open_store("redis", str(tmp_path))
    assert "sqlite" in str(refused.value)
    assert "memory" in str(refused.value)


# ---- users -------------------------------------------------------------------


async def test_a_user_added_can_be_read_back(store):
    await store.add_user(UserRecord(id="alice", created=NOW))
    assert await store.get_user("alice") == UserRecord(id="alice", created=NOW)
    assert await store.get_user("bob") is None


async def test_adding_a_taken_user_id_raises_already_exists_and_keeps_the_first(store):
    await store.add_user(UserRecord(id="alice", created=NOW))
    cursor = await store.last_change()
    with pytest.raises(AlreadyExists):
        await store.add_user(UserRecord(id="alice", created=NOW + 1))
    assert issubclass(AlreadyExists, StoreError)
    assert await store.get_user("alice") == UserRecord(id="alice", created=NOW)
    assert await new_changes(store, cursor) == []


async def test_users_are_listed_by_id(store):
    for user_id in ("carol", "alice", "bob"):
        await store.add_user(UserRecord(id=user_id, created=NOW))
    assert [user.id for user in await store.list_users()] == ["alice", "bob", "carol"]


async def test_removing_an_unknown_user_returns_false_and_appends_nothing(store):
    assert await store.remove_user("nobody", NOW) is False
    assert await store.last_change() == 0


async def test_removing_a_user_revokes_its_devices_and_deletes_its_sessions_and_codes(store):
    await add_users(store, "alice", "bob")
    await store.put_device(make_device("tablet", created=NOW - 2, credential_hash="c-tablet"))
    await store.put_device(make_device("phone", created=NOW, credential_hash="c-phone", status=STATUS_ONLINE))
    await store.put_device(make_device("laptop", created=NOW - 1, credential_hash="c-laptop"))
    await store.put_device(make_device("bob-pc", user="bob", credential_hash="c-bob"))
    await store.revoke_device("tablet", NOW - 100)
    await store.put_sessions([
        make_session("s-phone", device="phone"),
        make_session("s-laptop", device="laptop", revoked_at=NOW - 5),
        make_session("s-bob", user="bob", device="bob-pc"),
    ])
    await store.add_pairing_code(make_code("ALIC"))
    await store.add_pairing_code(make_code("BOBB", user="bob"))
    cursor = await store.last_change()

    assert await store.remove_user("alice", NOW) is True

    assert await store.get_user("alice") is None
    assert await store.remove_user("alice", NOW) is False
    assert await ids_of_devices(store, "alice") == []
    tombstones = {device.id: device for device in await store.list_devices("alice", include_revoked=True)}
    assert set(tombstones) == {"tablet", "laptop", "phone"}
    assert tombstones["laptop"].revoked_at == NOW
    assert tombstones["phone"].revoked_at == NOW
    assert tombstones["tablet"].revoked_at == NOW - 100  # revoked before: keeps its time
    assert all(device.credential_hash is None for device in tombstones.values())
    assert await store.find_device_by_credential("c-phone") is None
    assert await ids_of_sessions(store) == ["s-bob"]
    assert await store.redeem_pairing_code("ALIC", "right", NOW, 5) is None
    await store.add_pairing_code(make_code("ALIC"))  # the id is free again: the code was deleted
    # Bob is untouched.
    assert (await store.get_device("bob-pc")).revoked_at is None
    assert (await store.redeem_pairing_code("BOBB", "right", NOW, 5)) is not None
    # One user change, then one device change per device revoked now (in list order), none for
    # the device revoked before, none for the deleted sessions.
    assert await new_changes(store, cursor) == [
        (CHANGE_USER, "alice"), (CHANGE_DEVICE, "laptop"), (CHANGE_DEVICE, "phone"),
    ]


async def test_device_ids_of_a_removed_user_stay_dead(store):
    await add_users(store, "alice")
    await store.put_device(make_device("laptop"))
    await store.remove_user("alice", NOW)
    with pytest.raises(DeviceRefused):
        await store.put_device(make_device("laptop"))  # no such user any more
    await add_users(store, "alice")
    with pytest.raises(DeviceRefused):
        await store.put_device(make_device("laptop"))  # the user is back, the device id is still revoked
    assert (await store.get_device("laptop")).revoked_at == NOW


# ---- devices -------------------------------------------------------------------


async def test_a_device_round_trips_every_field(store):
    await add_users(store, "alice")
    device = DeviceRecord(
        id="laptop", user="alice", type="desktop", name="Work laptop ✓", platform="linux", version="1.2.3",
        capabilities=("shell", "notifications"), metadata={"screen": {"w": 2560, "h": 1440}, "tags": ["a", 1.5],
                                                           "dark": True, "none": None},
        created=NOW, last_seen=NOW + 5, status=STATUS_AWAY, credential_hash="ab" * 32, revoked_at=None,
    )
    await store.put_device(device)
    assert await store.get_device("laptop") == device
    assert await store.get_device("unknown") is None


async def test_a_device_put_as_a_list_of_capabilities_comes_back_as_a_tuple(store):
    await add_users(store, "alice")
    await store.put_device(make_device("laptop", capabilities=["shell", "files"]))
    assert (await store.get_device("laptop")).capabilities == ("shell", "files")


async def test_a_device_of_an_unknown_user_is_refused(store):
    with pytest.raises(StoreError, match="nobody"):
        await store.put_device(make_device("laptop", user="nobody"))
    assert await store.get_device("laptop") is None
    assert await store.last_change() == 0


async def test_a_revoked_device_of_an_unknown_user_is_kept_as_a_tombstone(store):
    # What a removed user leaves behind, as rccs store copy writes it into another store: the id stays dead.
    tombstone = make_device("laptop", user="gone", revoked_at=NOW + 5, last_seen=NOW + 1)
    await store.put_device(tombstone)
    assert await store.get_device("laptop") == tombstone
    assert await store.list_devices(include_revoked=True) == [tombstone]
    with pytest.raises(DeviceRefused):
        await store.put_device(make_device("laptop", user="gone"))


async def test_putting_a_device_again_replaces_it_and_appends_a_change_each_time(store):
    await add_users(store, "alice")
    cursor = await store.last_change()
    await store.put_device(make_device("laptop", name="Old", credential_hash="c-old"))
    await store.put_device(make_device("laptop", name="New", credential_hash="c-new"))
    assert (await store.get_device("laptop")).name == "New"
    assert await ids_of_devices(store) == ["laptop"]
    assert await store.find_device_by_credential("c-old") is None
    assert (await store.find_device_by_credential("c-new")).id == "laptop"
    assert await new_changes(store, cursor) == [(CHANGE_DEVICE, "laptop"), (CHANGE_DEVICE, "laptop")]


async def test_a_revoked_device_cannot_be_replaced(store):
    await add_users(store, "alice")
    await store.put_device(make_device("laptop", name="Old"))
    await store.revoke_device("laptop", NOW)
    cursor = await store.last_change()
    with pytest.raises(StoreError, match="revoked"):
        await store.put_device(make_device("laptop", name="New"))
    stored = await store.get_device("laptop")
    assert (stored.name, stored.revoked_at) == ("Old", NOW)
    assert await new_changes(store, cursor) == []


async def test_a_credential_cannot_belong_to_two_devices(store):
    await add_users(store, "alice")
    await store.put_device(make_device("laptop", credential_hash="shared"))
    with pytest.raises(DeviceRefused):
        await store.put_device(make_device("phone", credential_hash="shared"))
    assert await store.get_device("phone") is None
    assert (await store.find_device_by_credential("shared")).id == "laptop"


async def test_device_metadata_that_is_not_json_is_refused(store):
    await add_users(store, "alice")
    with pytest.raises(StoreError, match="JSON"):
        await store.put_device(make_device("laptop", metadata={"raw": b"bytes"}))
    with pytest.raises(StoreError, match="JSON"):
        await store.put_device(make_device("laptop", metadata={"ratio": float("nan")}))
    assert await store.get_device("laptop") is None


async def test_devices_are_listed_by_user_then_created_then_id(store):
    await add_users(store, "alice", "bob")
    await store.put_device(make_device("zeta", user="alice", created=NOW - 10))
    await store.put_device(make_device("beta", user="bob", created=NOW - 20))
    await store.put_device(make_device("delta", user="alice", created=NOW))
    await store.put_device(make_device("alpha", user="alice", created=NOW))
    await store.put_device(make_device("gone", user="alice", created=NOW - 30))
    await store.revoke_device("gone", NOW)
    assert await ids_of_devices(store) == ["zeta", "alpha", "delta", "beta"]
    assert await ids_of_devices(store, include_revoked=True) == ["gone", "zeta", "alpha", "delta", "beta"]
    assert await ids_of_devices(store, "alice") == ["zeta", "alpha", "delta"]
    assert await ids_of_devices(store, "alice", include_revoked=True) == ["gone", "zeta", "alpha", "delta"]
    assert await ids_of_devices(store, "bob") == ["beta"]
    assert await ids_of_devices(store, "nobody") == []


async def test_a_revoked_device_is_still_returned_by_id(store):
    await add_users(store, "alice")
    await store.put_device(make_device("laptop"))
    await store.revoke_device("laptop", NOW)
    assert (await store.get_device("laptop")).revoked_at == NOW


async def test_a_device_is_found_by_its_credential_until_revoked(store):
    await add_users(store, "alice")
    await store.put_device(make_device("laptop", credential_hash="c-laptop"))
    await store.put_device(make_device("phone", credential_hash="c-phone"))
    assert (await store.find_device_by_credential("c-laptop")).id == "laptop"
    assert (await store.find_device_by_credential("c-phone")).id == "phone"
    assert await store.find_device_by_credential("c-unknown") is None
    await store.revoke_device("laptop", NOW)
    assert await store.find_device_by_credential("c-laptop") is None
    assert (await store.find_device_by_credential("c-phone")).id == "phone"


async def test_a_device_stored_as_revoked_is_not_found_by_its_credential(store):
    await add_users(store, "alice")
    await store.put_device(make_device("laptop", credential_hash="c-laptop", revoked_at=NOW))
    assert await store.find_device_by_credential("c-laptop") is None


async def test_revoking_a_device_drops_its_credential_and_revokes_its_live_sessions(store):
    await add_users(store, "alice")
    await store.put_device(make_device("laptop", credential_hash="c-laptop", status=STATUS_ONLINE, last_seen=NOW))
    await store.put_device(make_device("phone", credential_hash="c-phone"))
    await store.put_sessions([
        make_session("s-2", created=NOW + 1),
        make_session("s-1", created=NOW + 2),
        make_session("s-old", created=NOW, revoked_at=NOW - 50),
        make_session("s-phone", device="phone"),
    ])
    cursor = await store.last_change()

    assert await store.revoke_device("laptop", NOW + 10) is True

    device = await store.get_device("laptop")
    assert device.revoked_at == NOW + 10
    assert device.credential_hash is None
    assert device.status == STATUS_OFFLINE  # presence updates skip it from now on: it must not stay online
    assert device.last_seen == NOW
    sessions = {session.id: session for session in await store.list_sessions()}
    assert sessions["s-1"].revoked_at == NOW + 10
    assert sessions["s-2"].revoked_at == NOW + 10
    assert sessions["s-old"].revoked_at == NOW - 50
    assert sessions["s-phone"].revoked_at is None
    assert (await store.get_device("phone")).revoked_at is None
    # The device change first, then one session change per session revoked now, in list order.
    assert await new_changes(store, cursor) == [
        (CHANGE_DEVICE, "laptop"), (CHANGE_SESSION, "s-2"), (CHANGE_SESSION, "s-1"),
    ]


async def test_revoking_twice_or_an_unknown_device_returns_false_and_changes_nothing(store):
    await add_users(store, "alice")
    await store.put_device(make_device("laptop"))
    assert await store.revoke_device("laptop", NOW) is True
    cursor = await store.last_change()
    assert await store.revoke_device("laptop", NOW + 1) is False
    assert await store.revoke_device("unknown", NOW + 1) is False
    assert (await store.get_device("laptop")).revoked_at == NOW
    assert await new_changes(store, cursor) == []


async def test_presence_updates_skip_unknown_and_revoked_devices_and_append_nothing(store):
    await add_users(store, "alice")
    await store.put_device(make_device("laptop"))
    await store.put_device(make_device("phone", status=STATUS_ONLINE, last_seen=NOW - 1))
    await store.put_device(make_device("gone", last_seen=NOW - 2))
    await store.revoke_device("gone", NOW - 1)
    cursor = await store.last_change()

    await store.update_presence([
        ("laptop", STATUS_ONLINE, NOW + 1),
        ("unknown", STATUS_ONLINE, NOW + 1),
        ("gone", STATUS_ONLINE, NOW + 1),
        ("phone", STATUS_AWAY, NOW + 2),
        ("phone", STATUS_OFFLINE, NOW + 3),  # a later entry for the same device wins
    ])
    await store.update_presence([])

    laptop, phone, gone = [await store.get_device(device_id) for device_id in ("laptop", "phone", "gone")]
    assert (laptop.status, laptop.last_seen) == (STATUS_ONLINE, NOW + 1)
    assert (phone.status, phone.last_seen) == (STATUS_OFFLINE, NOW + 3)
    assert (gone.status, gone.last_seen) == (STATUS_OFFLINE, NOW - 2)
    assert await store.get_device("unknown") is None
    assert await new_changes(store, cursor) == []


# ---- sessions ---------------------------------------------------------------------


async def test_a_session_round_trips_every_field_including_pending_messages(store):
    session = SessionRecord(
        id="s-1", user="alice", device="laptop", created=NOW, expires_at=NOW + HOUR, next_seq=9,
        last_activity=NOW + 30, connected_at=NOW + 20, disconnected_at=NOW + 10, revoked_at=None,
        connected_ms=1234, messages_in=5, messages_out=6, bytes_in=700, bytes_out=800, pending=pending_messages(),
    )
    await store.put_sessions([session])
    stored = await store.get_session("s-1")
    assert stored == session
    assert type(stored.pending[0].msg_id) is int
    assert type(stored.pending[1].msg_id) is str
    assert type(stored.pending[0].frame) is bytes
    assert await store.get_session("unknown") is None


async def test_a_session_without_pending_messages_comes_back_with_an_empty_list(store):
    await store.put_sessions([make_session("s-1")])
    assert (await store.get_session("s-1")).pending == []


async def test_a_pending_frame_given_as_a_bytearray_comes_back_as_bytes(store):
    frame = bytearray(b"\x01\x02")
    message = PendingMessage(seq=1, sender_user="alice", sender_device="phone", msg_id=1, frame=frame, text=False)
    await store.put_sessions([make_session("s-1", pending=[message])])
    frame[0] = 0xFF
    stored = (await store.get_session("s-1")).pending[0].frame
    assert (type(stored), stored) == (bytes, b"\x01\x02")


async def test_sessions_are_put_as_a_batch_and_replaced_by_id(store):
    await store.put_sessions([make_session(f"s-{n}", messages_in=n) for n in range(100)])
    assert len(await store.list_sessions()) == 100
    await store.put_sessions([make_session("s-7", messages_in=70, pending=pending_messages()),
                              make_session("s-8", messages_in=80)])
    assert (await store.get_session("s-7")).messages_in == 70
    assert len((await store.get_session("s-7")).pending) == 2
    await store.put_sessions([make_session("s-7", messages_in=71)])
    assert (await store.get_session("s-7")).pending == []  # replaced, not merged
    assert (await store.get_session("s-8")).messages_in == 80
    assert len(await store.list_sessions()) == 100
    await store.put_sessions([])


async def test_putting_sessions_appends_no_change(store):
    await store.put_sessions([make_session("s-1"), make_session("s-2")])
    await store.put_sessions([make_session("s-1", messages_out=3)])
    assert await store.last_change() == 0


async def test_a_revoked_session_stays_revoked_when_put_again(store):
    await store.put_sessions([make_session("s-1")])
    await store.revoke_session("s-1", NOW + 5)
    await store.put_sessions([make_session("s-1", messages_in=3, revoked_at=None)])
    stored = await store.get_session("s-1")
    assert (stored.messages_in, stored.revoked_at) == (3, NOW + 5)
    # The first revocation time wins over a later one given by the caller too.
    await store.put_sessions([make_session("s-1", revoked_at=NOW + 9)])
    assert (await store.get_session("s-1")).revoked_at == NOW + 5


async def test_a_session_may_be_put_already_revoked(store):
    await store.put_sessions([make_session("s-1", revoked_at=NOW)])
    assert (await store.get_session("s-1")).revoked_at == NOW


async def test_sessions_are_listed_by_user_device_created_id_and_filtered(store):
    await store.put_sessions([
        make_session("s-e", user="bob", device="bob-pc"),
        make_session("s-d", user="alice", device="phone", created=NOW - 5),
        make_session("s-c", user="alice", device="laptop", created=NOW - 1),
        make_session("s-b", user="alice", device="laptop", created=NOW),
        make_session("s-a", user="alice", device="laptop", created=NOW, revoked_at=NOW),
    ])
    assert await ids_of_sessions(store) == ["s-c", "s-a", "s-b", "s-d", "s-e"]
    assert await ids_of_sessions(store, "alice") == ["s-c", "s-a", "s-b", "s-d"]
    assert await ids_of_sessions(store, device_id="laptop") == ["s-c", "s-a", "s-b"]
    assert await ids_of_sessions(store, "alice", "phone") == ["s-d"]
    assert await ids_of_sessions(store, "bob", "phone") == []
    assert await ids_of_sessions(store, "nobody") == []


async def test_revoking_a_session_appends_a_change_once(store):
    await store.put_sessions([make_session("s-1"), make_session("s-2")])
    assert await store.revoke_session("s-1", NOW) is True
    assert await store.revoke_session("s-1", NOW + 1) is False
    assert await store.revoke_session("unknown", NOW) is False
    assert (await store.get_session("s-1")).revoked_at == NOW
    assert (await store.get_session("s-2")).revoked_at is None
    assert await new_changes(store, 0) == [(CHANGE_SESSION, "s-1")]


# One session per branch of session_is_stale, each just inside or just outside its limit.
STALE_CASES = {
    "connected-and-expired": (dict(connected_at=NOW - HOUR, expires_at=NOW - 1, revoked_at=NOW - 1), False),
    "expired": (dict(expires_at=NOW - 1), True),
    "expires-at-the-cutoff": (dict(expires_at=NOW), False),
    "revoked": (dict(revoked_at=NOW - 1), True),
    "revoked-at-the-cutoff": (dict(revoked_at=NOW), False),
    "disconnected-past-the-grace": (dict(disconnected_at=NOW - GRACE - 1), True),
    "disconnected-at-the-end-of-the-grace": (dict(disconnected_at=NOW - GRACE), False),
    "never-connected": (dict(), False),
}


async def test_stale_sessions_are_deleted_by_the_rule_in_session_is_stale(store):
    sessions = [make_session(name, **fields) for name, (fields, _) in STALE_CASES.items()]
    for session in sessions:  # the cases themselves must agree with the rule
        assert session_is_stale(session, NOW, GRACE) is STALE_CASES[session.id][1], session.id
    await store.put_sessions(sessions)

    deleted = await store.delete_stale_sessions(NOW, GRACE)

    stale = sorted(name for name, (_, is_stale) in STALE_CASES.items() if is_stale)
    kept = sorted(name for name, (_, is_stale) in STALE_CASES.items() if not is_stale)
    assert deleted == len(stale)
    assert sorted(await ids_of_sessions(store)) == kept
    assert await store.delete_stale_sessions(NOW, GRACE) == 0
    assert await store.last_change() == 0


async def test_resetting_live_state_disconnects_everything_a_previous_run_left_connected(store):
    await add_users(store, "alice")
    await store.put_device(make_device("laptop", status=STATUS_ONLINE, last_seen=NOW - 3))
    await store.put_device(make_device("phone", status=STATUS_AWAY, last_seen=NOW - 2))
    await store.put_device(make_device("tablet", status=STATUS_OFFLINE, last_seen=NOW - 1))
    await store.put_sessions([
        make_session("active", connected_at=NOW - 100, last_activity=NOW - 40, connected_ms=1000),
        make_session("silent", connected_at=NOW - 100, last_activity=0, connected_ms=7),
        make_session("resumed", connected_at=NOW - 100, last_activity=NOW - 200, connected_ms=5),
        make_session("detached", disconnected_at=NOW - 50, last_activity=NOW - 60, connected_ms=3),
    ])
    cursor = await store.last_change()

    await store.reset_live_state(NOW)

    for device_id, last_seen in (("laptop", NOW - 3), ("phone", NOW - 2), ("tablet", NOW - 1)):
        device = await store.get_device(device_id)
        assert (device.status, device.last_seen) == (STATUS_OFFLINE, last_seen), device_id
    sessions = {session.id: session for session in await store.list_sessions()}
    assert all(session.connected_at is None for session in sessions.values())
    assert (sessions["active"].disconnected_at, sessions["active"].connected_ms) == (NOW - 40, 1000 + 60)
    assert (sessions["silent"].disconnected_at, sessions["silent"].connected_ms) == (NOW, 7 + 100)
    # Activity older than the connection (resumed, then silent) adds no negative time.
    assert (sessions["resumed"].disconnected_at, sessions["resumed"].connected_ms) == (NOW - 200, 5)
    assert (sessions["detached"].disconnected_at, sessions["detached"].connected_ms) == (NOW - 50, 3)
    assert await new_changes(store, cursor) == []


# ---- pairing codes -------------------------------------------------------------------


async def test_a_pairing_code_id_can_be_added_once(store):
    await store.add_pairing_code(make_code("ABCD"))
    with pytest.raises(AlreadyExists):
        await store.add_pairing_code(make_code("ABCD", secret_hash="other"))
    assert await store.redeem_pairing_code("ABCD", "right", NOW, 5) is not None
    with pytest.raises(AlreadyExists):  # a used code still holds its id
        await store.add_pairing_code(make_code("ABCD"))


async def test_redeeming_a_code_returns_it_marked_used_and_only_once(store):
    code = make_code("ABCD", issuer_device="laptop", approve=True)
    await store.add_pairing_code(code)
    redeemed = await store.redeem_pairing_code("ABCD", "right", NOW + 1, 5)
    assert redeemed == dataclasses.replace(code, used_at=NOW + 1)
    assert await store.redeem_pairing_code("ABCD", "right", NOW + 2, 5) is None


async def test_a_code_from_the_cli_round_trips_its_fields(store):
    code = make_code("ABCD", issuer_device=None, approve=False)
    await store.add_pairing_code(code)
    assert await store.redeem_pairing_code("ABCD", "right", NOW, 5) == dataclasses.replace(code, used_at=NOW)


async def test_wrong_secrets_count_attempts_up_to_the_limit(store):
    await store.add_pairing_code(make_code("ABCD"))
    await store.add_pairing_code(make_code("EFGH"))
    for _ in range(2):
        assert await store.redeem_pairing_code("ABCD", "wrong", NOW, 3) is None
    redeemed = await store.redeem_pairing_code("ABCD", "right", NOW, 3)
    assert (redeemed.attempts, redeemed.used_at) == (2, NOW)

    for _ in range(3):
        assert await store.redeem_pairing_code("EFGH", "wrong", NOW, 3) is None
    assert await store.redeem_pairing_code("EFGH", "right", NOW, 3) is None  # burnt: even the right secret fails
    # The limit is the caller's: a larger one lets the code be used again.
    assert (await store.redeem_pairing_code("EFGH", "right", NOW, 4)).attempts == 3


async def test_an_expired_or_unknown_code_redeems_to_none(store):
    await store.add_pairing_code(make_code("ABCD", expires_at=NOW))
    await store.add_pairing_code(make_code("EFGH", expires_at=NOW + 1))
    assert await store.redeem_pairing_code("ABCD", "right", NOW, 5) is None
    assert await store.redeem_pairing_code("EFGH", "right", NOW, 5) is not None
    assert await store.redeem_pairing_code("ZZZZ", "right", NOW, 5) is None


async def test_a_wrong_secret_on_a_dead_code_changes_nothing(store):
    await store.add_pairing_code(make_code("ABCD", expires_at=NOW + 10))
    for _ in range(3):  # expired: no attempt is counted
        assert await store.redeem_pairing_code("ABCD", "wrong", NOW + 10, 3) is None
    assert (await store.redeem_pairing_code("ABCD", "right", NOW, 3)).attempts == 0


async def test_codes_expired_before_the_cutoff_are_deleted(store):
    await store.add_pairing_code(make_code("OLD1", expires_at=NOW - 2))
    await store.add_pairing_code(make_code("OLD2", expires_at=NOW - 1))
    await store.add_pairing_code(make_code("EDGE", expires_at=NOW))
    await store.add_pairing_code(make_code("NEW1", expires_at=NOW + 1))
    assert await store.delete_pairing_codes_before(NOW) == 2
    assert await store.delete_pairing_codes_before(NOW) == 0
    await store.add_pairing_code(make_code("OLD1"))  # its id is free again
    for kept in ("EDGE", "NEW1"):
        with pytest.raises(AlreadyExists):
            await store.add_pairing_code(make_code(kept))


async def test_pairing_codes_are_listed_by_id_with_every_field(store):
    await add_users(store, "alice", "bob")
    assert await store.list_pairing_codes() == []
    await store.add_pairing_code(make_code("ZZZZ", user="bob", issuer_device="phone", approve=True))
    await store.add_pairing_code(make_code("AAAA"))
    await store.add_pairing_code(make_code("MMMM", expires_at=NOW - 1, attempts=2, used_at=NOW - 5))
    await store.redeem_pairing_code("AAAA", "wrong", NOW, 5)
    listed = await store.list_pairing_codes()
    assert listed == [make_code("AAAA", attempts=1),
                      make_code("MMMM", expires_at=NOW - 1, attempts=2, used_at=NOW - 5),
                      make_code("ZZZZ", user="bob", issuer_device="phone", approve=True)]
    listed[0].attempts = 99  # a copy
    assert (await store.list_pairing_codes())[0].attempts == 1


async def test_pairing_codes_append_no_change(store):
    await store.add_pairing_code(make_code("ABCD"))
    await store.redeem_pairing_code("ABCD", "wrong", NOW, 5)
    await store.redeem_pairing_code("ABCD", "right", NOW, 5)
    await store.delete_pairing_codes_before(NOW + HOUR)
    assert await store.last_change() == 0


# ---- change feed ----------------------------------------------------------------------


async def test_an_empty_store_has_no_changes(store):
    assert await store.last_change() == 0
    assert await store.changes_since(0) == []


async def test_changes_come_oldest_first_after_the_cursor_at_most_limit(store):
    await add_users(store, "alice")
    await store.put_device(make_device("laptop"))
    await store.put_sessions([make_session("s-1")])
    await store.revoke_session("s-1", NOW)
    await store.revoke_device("laptop", NOW)
    await store.remove_user("alice", NOW)

    changes = await store.changes_since(0)
    assert [(change.kind, change.key) for change in changes] == [
        (CHANGE_USER, "alice"), (CHANGE_DEVICE, "laptop"), (CHANGE_SESSION, "s-1"),
        (CHANGE_DEVICE, "laptop"), (CHANGE_USER, "alice"),
    ]
    seqs = [change.seq for change in changes]
    assert seqs == sorted(seqs)
    assert len(set(seqs)) == len(seqs)
    assert seqs[0] >= 1
    assert await store.last_change() == seqs[-1]

    assert await store.changes_since(0, limit=2) == changes[:2]
    assert await store.changes_since(seqs[1], limit=2) == changes[2:4]
    assert await store.changes_since(seqs[3]) == changes[4:]
    assert await store.changes_since(seqs[-1]) == []
    assert await store.changes_since(0, limit=0) == []
    assert await store.changes_since(0, limit=-1) == []  # SQLite would read LIMIT -1 as no limit


async def test_a_cursor_read_once_sees_only_later_changes(store):
    await add_users(store, "alice")
    cursor = await store.last_change()
    await add_users(store, "bob")
    assert await new_changes(store, cursor) == [(CHANGE_USER, "bob")]
    assert (await store.changes_since(cursor))[0].seq == await store.last_change()


# ---- records are copies -------------------------------------------------------------------


async def test_records_handed_out_are_copies(store):
    await add_users(store, "alice")
    await store.put_device(make_device("laptop", name="Laptop", capabilities=("shell",),
                                       metadata={"nested": {"k": [1]}}, credential_hash="c-laptop"))
    await store.put_sessions([make_session("s-1", pending=pending_messages())])
    await store.add_pairing_code(make_code("ABCD"))

    user = await store.get_user("alice")
    user.created = 0
    for device in (await store.get_device("laptop"), (await store.list_devices())[0]):
        device.name = "changed"
        device.metadata["nested"]["k"].append(2)
        device.metadata["new"] = True
    for session in (await store.get_session("s-1"), (await store.list_sessions())[0]):
        session.messages_in = 99
        session.pending[0].seq = 99
        session.pending.append(session.pending[0])
    found = await store.find_device_by_credential("c-laptop")
    found.metadata.clear()
    redeemed = await store.redeem_pairing_code("ABCD", "right", NOW, 5)
    redeemed.used_at = None

    assert (await store.get_user("alice")).created == NOW
    device = await store.get_device("laptop")
    assert (device.name, device.metadata) == ("Laptop", {"nested": {"k": [1]}})
    session = await store.get_session("s-1")
    assert session.messages_in == 0
    assert session.pending == pending_messages()
    assert await store.redeem_pairing_code("ABCD", "right", NOW, 5) is None  # still used


async def test_records_given_to_the_store_are_copied(store):
    user = UserRecord(id="alice", created=NOW)
    await store.add_user(user)
    user.created = 0
    metadata = {"nested": {"k": [1]}}
    device = make_device("laptop", name="Laptop", metadata=metadata, credential_hash="c-laptop")
    await store.put_device(device)
    device.name = "changed"
    metadata["nested"]["k"].append(2)
    session = make_session("s-1", pending=pending_messages())
    await store.put_sessions([session])
    session.messages_in = 99
    session.pending[0].seq = 99
    session.pending.clear()
    code = make_code("ABCD")
    await store.add_pairing_code(code)
    code.secret_hash = "changed"

    assert (await store.get_user("alice")).created == NOW
    stored_device = await store.find_device_by_credential("c-laptop")
    assert (stored_device.name, stored_device.metadata) == ("Laptop", {"nested": {"k": [1]}})
    stored_session = await store.get_session("s-1")
    assert (stored_session.messages_in, stored_session.pending) == (0, pending_messages())
    assert await store.redeem_pairing_code("ABCD", "right", NOW, 5) is not None


async def test_sessions_of_a_revoked_device_are_not_written_back(store):
    """A hub flushing late after a user was removed must not bring the deleted sessions back."""
    await store.add_user(UserRecord("alice", NOW))
    await store.put_device(make_device("phone"))
    await store.put_device(make_device("laptop"))
    await store.put_sessions([make_session("s-phone", device="phone"), make_session("s-laptop", device="laptop")])
    await store.remove_user("alice", NOW + 1)
    await store.put_sessions([make_session("s-phone", device="phone", messages_in=9),
                              make_session("s-other", user="bob", device="bob-pc")])
    assert await ids_of_sessions(store) == ["s-other"]


# ---- durable inboxes -----------------------------------------------------------------------

ANY_COUNT = 1_000_000
ANY_BYTES = 1_000_000_000
POLICIES = (OVERFLOW_REJECT, OVERFLOW_DROP_OLDEST)


def queued(msg_id, device="laptop", priority=PRIORITY_NORMAL, body=b"body", user="alice", **fields):
    return QueuedMessage(device=device, user=user, sender_device="phone", msg_id=msg_id, type="note", body=body,
                         ts=NOW, priority=priority, **fields)


def sized(msg_id, size, device="laptop", priority=PRIORITY_NORMAL):
    """A message of exactly ``size`` against the byte cap."""
    message = queued(msg_id, device, priority, body=b"")
    message.body = b"x" * (size - message.size)
    assert message.size == size
    return message


async def enqueue(store, *messages, max_count=ANY_COUNT, max_bytes=ANY_BYTES, policy=OVERFLOW_REJECT):
    return await store.enqueue(list(messages), max_count, max_bytes, policy)


def msg_ids(messages):
    return [message.msg_id for message in messages]


async def msg_ids_in(store, device_id="laptop", now=NOW, limit=1000):
    return msg_ids(await store.inbox(device_id, now, limit))


async def dead_msg_ids(store, user_id=None, device_id=None, limit=1000):
    return msg_ids(letter.message for letter in await store.dead_letters(user_id, device_id, limit))


async def test_an_enqueued_message_round_trips_every_field(store):
    message = QueuedMessage(device="laptop", user="alice", sender_device="phone", msg_id="m-1", type="task_start",
                            body=b"\x81\xa4task\xa5build\x00\xff", ts=NOW, priority=PRIORITY_EMERGENCY,
                            expires_at=NOW + HOUR, receipt=True, attempts=2)
    outcome = await store.enqueue([message], ANY_COUNT, ANY_BYTES, OVERFLOW_REJECT)
    assert (outcome.rejected, outcome.dropped) == ([], [])
    [stored] = outcome.stored
    assert stored.id > 0
    assert stored == dataclasses.replace(message, id=stored.id)
    assert message.id == 0  # the caller's record is left alone
    assert await store.inbox("laptop", NOW) == [stored]
    assert await store.inbox_size("laptop") == (1, message.size)
    assert await store.inbox_size("phone") == (0, 0)


@pytest.mark.parametrize("msg_id", ["m-1", "5", "", "é✓", 5, 0, -1, -(2**63), 2**63 - 1, 2**63, 2**64 - 1])
async def test_a_message_id_keeps_its_type_and_value_also_through_the_dead_letters(store, msg_id):
    [stored] = (await enqueue(store, queued(msg_id))).stored
    [listed] = await store.inbox("laptop", NOW)
    await store.dead_letter([stored.id], "undeliverable", NOW)
    [letter] = await store.dead_letters()
    [redriven] = await store.redrive()
    [removed] = await store.remove_queued([stored.id])
    for message in (stored, listed, letter.message, redriven, removed):
        assert (type(message.msg_id), message.msg_id) == (type(msg_id), msg_id)


async def test_a_body_given_as_a_bytearray_is_copied_and_comes_back_as_bytes(store):
    body = bytearray(b"\x01\x02")
    outcome = await enqueue(store, queued(1, body=body))
    body[0] = 0xFF
    for message in (outcome.stored[0], (await store.inbox("laptop", NOW))[0]):
        assert (type(message.body), message.body) == (bytes, b"\x01\x02")


async def test_ids_increase_in_the_order_given_across_inboxes_and_priorities(store):
    outcome = await enqueue(store, queued(1, "laptop"), queued(2, "phone", PRIORITY_LOW),
                            queued(3, "laptop", PRIORITY_EMERGENCY), queued(4, "tablet"))
    assert msg_ids(outcome.stored) == [1, 2, 3, 4]
    ids = [message.id for message in outcome.stored]
    assert ids == sorted(set(ids))
    assert ids[0] > 0
    [later] = (await enqueue(store, queued(5, "phone"))).stored
    assert later.id > ids[-1]


async def test_ids_are_never_reused_after_any_kind_of_delete(store):
    stored = (await enqueue(store, *(queued(n) for n in range(5)), queued("expiring", expires_at=NOW))).stored
    highest = stored[-1].id
    # The newest messages leave by every way out of an inbox.
    assert msg_ids(await store.take_expired(NOW)) == ["expiring"]
    await store.remove_queued([stored[4].id])
    await store.dead_letter([stored[3].id], "undeliverable", NOW)
    await store.purge("laptop", dead_letters=True)
    await store.purge("laptop")
    assert await store.inbox_size("laptop") == (0, 0)
    [again] = (await enqueue(store, queued("again"))).stored
    assert again.id > highest


async def test_the_inbox_comes_in_delivery_order_priority_high_to_low_then_id(store):
    await enqueue(store, queued("n1"), queued("l1", priority=PRIORITY_LOW), queued("e1", priority=PRIORITY_EMERGENCY),
                  queued("n2"), queued("other", "phone", PRIORITY_EMERGENCY), queued("l2", priority=PRIORITY_LOW),
                  queued("e2", priority=PRIORITY_EMERGENCY), queued("h1", priority=PRIORITY_HIGH))
    assert await msg_ids_in(store) == ["e1", "e2", "h1", "n1", "n2", "l1", "l2"]
    assert await msg_ids_in(store, limit=3) == ["e1", "e2", "h1"]  # the first page
    assert await msg_ids_in(store, limit=0) == []
    assert await msg_ids_in(store, limit=-1) == []  # SQLite would read LIMIT -1 as no limit
    assert await msg_ids_in(store, "phone") == ["other"]
    assert await msg_ids_in(store, "nobody") == []


async def test_expired_messages_leave_the_inbox_at_once_but_count_until_taken(store):
    stored = (await enqueue(store, queued("gone", expires_at=NOW - 1), queued("edge", expires_at=NOW),
                            queued("later", expires_at=NOW + 1), queued("never"))).stored
    assert await msg_ids_in(store, now=NOW) == ["later", "never"]
    assert await msg_ids_in(store, now=NOW - 1) == ["edge", "later", "never"]
    assert await msg_ids_in(store, now=NOW, limit=1) == ["later"]  # a page is of unexpired messages
    assert await store.inbox_size("laptop") == (4, sum(message.size for message in stored))

    assert await store.take_expired(NOW) == stored[:2]

    assert await store.inbox_size("laptop") == (2, stored[2].size + stored[3].size)
    assert await store.take_expired(NOW) == []
    assert await msg_ids_in(store, now=NOW) == ["later", "never"]


async def test_expired_messages_are_taken_oldest_id_first_across_inboxes_at_most_limit(store):
    # "a" is older by id but expired later than "b": the order is by id.
    await enqueue(store, queued("a", "phone", PRIORITY_LOW, expires_at=NOW - 1),
                  queued("b", "laptop", PRIORITY_EMERGENCY, expires_at=NOW - 5),
                  queued("c", "phone", expires_at=NOW - 3), queued("kept", "phone", expires_at=NOW + 1))
    assert msg_ids(await store.take_expired(NOW, limit=2)) == ["a", "b"]
    assert await store.take_expired(NOW, limit=0) == []
    assert await store.take_expired(NOW, limit=-1) == []
    assert msg_ids(await store.take_expired(NOW)) == ["c"]
    assert msg_ids(await store.take_expired(NOW + 1)) == ["kept"]


async def test_expired_messages_still_count_against_the_caps(store):
    await enqueue(store, queued("gone", expires_at=NOW - 1))
    outcome = await enqueue(store, queued("new"), max_count=1)
    assert msg_ids(outcome.rejected) == ["new"]
    await store.take_expired(NOW)
    assert msg_ids((await enqueue(store, queued("new"), max_count=1)).stored) == ["new"]


async def test_a_full_inbox_refuses_new_messages_under_the_reject_policy(store):
    await enqueue(store, queued(1), queued(2), max_count=2)
    outcome = await enqueue(store, queued(3, priority=PRIORITY_EMERGENCY), queued(4, "phone"), max_count=2)
    assert msg_ids(outcome.rejected) == [3]
    assert outcome.rejected[0].id == 0  # never stored, so no id
    assert msg_ids(outcome.stored) == [4]
    assert outcome.dropped == []
    assert await msg_ids_in(store) == [1, 2]


async def test_the_byte_cap_is_the_sum_of_the_message_sizes(store):
    await enqueue(store, sized("a", 30), sized("b", 30), max_bytes=100)
    outcome = await enqueue(store, sized("c", 41), sized("d", 40), sized("e", 10), max_bytes=100)
    assert msg_ids(outcome.rejected) == ["c", "e"]  # 101 bytes; then full to the byte
    assert msg_ids(outcome.stored) == ["d"]
    assert await store.inbox_size("laptop") == (3, 100)


async def test_drop_oldest_removes_the_oldest_message_of_the_lowest_priority_present(store):
    stored = (await enqueue(store, queued("n1"), queued("l1", priority=PRIORITY_LOW),
                            queued("e1", priority=PRIORITY_EMERGENCY), queued("l2", priority=PRIORITY_LOW),
                            queued("n2"))).stored

    async def push(msg_id, priority=PRIORITY_NORMAL):
        outcome = await enqueue(store, queued(msg_id, priority=priority), max_count=5, policy=OVERFLOW_DROP_OLDEST)
        assert (msg_ids(outcome.stored), outcome.rejected) == ([msg_id], [])
        return outcome.dropped

    assert await push("n3") == [stored[1]]  # l1, whole
    assert msg_ids(await push("n4")) == ["l2"]
    assert msg_ids(await push("e2", PRIORITY_EMERGENCY)) == ["n1"]  # no low message left: the oldest normal one
    # The rule looks at the inbox only: a low newcomer still makes room, here by dropping a normal message,
    assert msg_ids(await push("l3", PRIORITY_LOW)) == ["n2"]
    # and then it is the lowest priority present, so it goes first although it is the newest.
    assert msg_ids(await push("n5")) == ["l3"]
    assert await msg_ids_in(store) == ["e1", "e2", "n3", "n4", "n5"]
    assert await store.inbox_size("laptop") == (5, sum(message.size for message in await store.inbox("laptop", NOW)))


async def test_drop_oldest_drops_as_many_messages_as_the_newcomer_needs(store):
    await enqueue(store, sized("b", 30), sized("a", 30, priority=PRIORITY_LOW), sized("c", 30), sized("x", 30, "phone"))
    outcome = await enqueue(store, sized("d", 70), max_bytes=100, policy=OVERFLOW_DROP_OLDEST)
    assert msg_ids(outcome.dropped) == ["a", "b"]
    assert msg_ids(outcome.stored) == ["d"]
    assert await msg_ids_in(store) == ["c", "d"]
    assert await store.inbox_size("laptop") == (2, 100)
    assert await store.inbox_size("phone") == (1, 30)


@pytest.mark.parametrize("policy", POLICIES)
async def test_a_message_alone_larger_than_max_bytes_is_rejected_under_either_policy(store, policy):
    await enqueue(store, sized("a", 40), max_bytes=100, policy=policy)
    outcome = await enqueue(store, sized("huge", 101), sized("b", 60), max_bytes=100, policy=policy)
    assert msg_ids(outcome.rejected) == ["huge"]
    assert msg_ids(outcome.stored) == ["b"]
    assert outcome.dropped == []  # nothing was dropped for a message that could never fit
    assert await msg_ids_in(store) == ["a", "b"]
    exact = await enqueue(store, sized("exact", 100, "phone"), max_bytes=100, policy=policy)
    assert msg_ids(exact.stored) == ["exact"]


@pytest.mark.parametrize("policy", POLICIES)
async def test_no_message_fits_an_inbox_capped_at_zero_messages(store, policy):
    await enqueue(store, queued("old"))
    outcome = await enqueue(store, queued("new"), max_count=0, policy=policy)
    assert (msg_ids(outcome.rejected), outcome.stored, outcome.dropped) == (["new"], [], [])
    assert await msg_ids_in(store) == ["old"]


async def test_the_caps_count_earlier_messages_of_the_same_batch(store):
    await enqueue(store, queued("old"))
    outcome = await enqueue(store, *(queued(n) for n in range(4)), queued("p", "phone"), max_count=3)
    assert msg_ids(outcome.stored) == [0, 1, "p"]
    assert msg_ids(outcome.rejected) == [2, 3]
    ids = [message.id for message in outcome.stored]
    assert ids == sorted(ids)
    assert await msg_ids_in(store) == ["old", 0, 1]


async def test_drop_oldest_in_one_batch_may_drop_messages_of_that_batch(store):
    """A batch does what the same messages enqueued one call at a time would do: each message given is
    stored or rejected, and ``dropped`` also lists those of the batch that later ones pushed out."""
    outcome = await enqueue(store, *(queued(n) for n in range(5)), max_count=3, policy=OVERFLOW_DROP_OLDEST)
    assert msg_ids(outcome.stored) == [0, 1, 2, 3, 4]
    assert outcome.dropped == outcome.stored[:2]
    assert outcome.rejected == []
    assert await msg_ids_in(store) == [2, 3, 4]
    assert await store.inbox_size("laptop") == (3, sum(message.size for message in outcome.stored[2:]))


async def test_an_empty_batch_stores_nothing(store):
    outcome = await store.enqueue([], 1, 1, OVERFLOW_REJECT)
    assert (outcome.stored, outcome.rejected, outcome.dropped) == ([], [], [])


async def test_an_unknown_overflow_policy_is_refused(store):
    with pytest.raises(ValueError, match="drop_newest"):
        await store.enqueue([queued(1)], ANY_COUNT, ANY_BYTES, "drop_newest")
    assert await store.inbox_size("laptop") == (0, 0)


@pytest.mark.parametrize("policy", POLICIES)
async def test_messages_for_a_revoked_device_are_rejected(store, policy):
    await add_users(store, "alice", "bob")
    for device in (make_device("laptop"), make_device("phone"), make_device("bob-pc", user="bob")):
        await store.put_device(device)
    await store.revoke_device("laptop", NOW)
    await store.remove_user("bob", NOW)  # revokes bob-pc
    cursor = await store.last_change()

    outcome = await enqueue(store, queued(1, "laptop"), queued(2, "phone"), queued(3, "bob-pc", user="bob"),
                            queued(4, "unknown"), policy=policy)

    assert msg_ids(outcome.rejected) == [1, 3]
    # The rule rejects revoked devices only; a device the store does not know is not revoked.
    assert msg_ids(outcome.stored) == [2, 4]
    assert outcome.dropped == []
    assert await store.inbox_size("laptop") == (0, 0)
    assert await store.inbox_size("bob-pc") == (0, 0)
    assert await new_changes(store, cursor) == []


async def test_revoking_a_device_or_removing_its_user_keeps_its_inbox_and_dead_letters(store):
    """The server fails what is left to its senders, then purges: the store must not delete it first."""
    await add_users(store, "alice", "bob")
    await store.put_device(make_device("laptop"))
    await store.put_device(make_device("bob-pc", user="bob"))
    stored = (await enqueue(store, queued(1), queued(2), queued(3, "bob-pc", user="bob"),
                            queued(4, "bob-pc", user="bob"))).stored
    await store.dead_letter([stored[1].id, stored[3].id], "undeliverable", NOW)

    await store.revoke_device("laptop", NOW)
    await store.remove_user("bob", NOW)

    assert await store.inbox("laptop", NOW) == [stored[0]]
    assert await store.inbox("bob-pc", NOW) == [stored[2]]
    assert await store.inbox_size("bob-pc") == (1, stored[2].size)
    assert await dead_msg_ids(store) == [2, 4]
    assert await store.purge("laptop") == 1
    assert await store.purge("bob-pc", dead_letters=True) == 1
    assert await dead_msg_ids(store) == [2]


async def test_removing_queued_messages_returns_the_ones_that_existed_by_id(store):
    stored = (await enqueue(store, queued(1), queued(2), queued(3, priority=PRIORITY_EMERGENCY),
                            queued(4, "phone"))).stored
    removed = await store.remove_queued([stored[2].id, stored[0].id, stored[0].id, 999_999_999])
    assert removed == [stored[0], stored[2]]
    assert await store.remove_queued([stored[0].id]) == []
    assert await store.remove_queued([]) == []
    assert await msg_ids_in(store) == [2]
    assert await store.inbox_size("laptop") == (1, stored[1].size)
    assert await msg_ids_in(store, "phone") == [4]


async def test_counting_attempts_adds_one_per_message(store):
    stored = (await enqueue(store, queued(1), queued(2), queued(3, "phone"))).stored
    await store.count_attempts([stored[0].id, stored[0].id, stored[2].id, 999_999_999])  # twice in one call: once
    await store.count_attempts([stored[0].id])
    await store.count_attempts([])
    assert [message.attempts for message in await store.inbox("laptop", NOW)] == [2, 0]
    assert [message.attempts for message in await store.inbox("phone", NOW)] == [1]
    assert [message.attempts for message in await store.remove_queued([stored[0].id])] == [2]


async def test_dead_lettering_moves_messages_out_of_the_inboxes(store):
    stored = (await enqueue(store, queued(1), queued(2), queued(3, "phone"), queued(4, "bob-pc", user="bob"))).stored
    await store.count_attempts([stored[1].id])

    moved = await store.dead_letter([stored[3].id, stored[1].id, stored[2].id, 999_999_999], "undeliverable", NOW + 5)

    assert moved == [dataclasses.replace(stored[1], attempts=1), stored[2], stored[3]]  # by id, attempts kept
    assert await msg_ids_in(store) == [1]
    assert await store.inbox_size("laptop") == (1, stored[0].size)
    assert await store.inbox_size("phone") == (0, 0)
    assert await store.remove_queued([stored[1].id]) == []
    assert await store.dead_letter([stored[1].id], "again", NOW + 6) == []  # not in an inbox any more
    assert await store.dead_letter([], "none", NOW) == []
    assert await store.dead_letters() == [DeadLetter(message=message, reason="undeliverable", at=NOW + 5)
                                          for message in moved]


async def test_dead_letters_are_listed_oldest_id_first_by_device_user_or_all(store):
    stored = (await enqueue(store, queued(1, "phone"), queued(2, "laptop"), queued(3, "bob-pc", user="bob"),
                            queued(4, "phone"))).stored
    # Moved newest first, in two calls: the listing goes by id, not by when a message was moved.
    await store.dead_letter([stored[3].id], "expired", NOW + 2)
    await store.dead_letter([message.id for message in stored[:3]], "undeliverable", NOW + 1)

    assert await dead_msg_ids(store) == [1, 2, 3, 4]
    assert await dead_msg_ids(store, user_id="alice") == [1, 2, 4]
    assert await dead_msg_ids(store, device_id="phone") == [1, 4]
    assert await dead_msg_ids(store, user_id="alice", device_id="phone") == [1, 4]
    assert await dead_msg_ids(store, user_id="bob", device_id="phone") == []
    assert await dead_msg_ids(store, user_id="nobody") == []
    assert await dead_msg_ids(store, limit=2) == [1, 2]
    assert await dead_msg_ids(store, limit=0) == []
    assert await dead_msg_ids(store, limit=-1) == []
    assert [(letter.reason, letter.at) for letter in await store.dead_letters(device_id="phone")] == [
        ("undeliverable", NOW + 1), ("expired", NOW + 2),
    ]


async def test_redrive_puts_dead_letters_back_under_their_ids_with_no_attempts(store):
    stored = (await enqueue(store, queued(1), queued(2), queued(3))).stored
    await store.count_attempts([stored[0].id])
    await store.dead_letter([stored[0].id, stored[1].id], "undeliverable", NOW)
    await enqueue(store, queued(4))

    assert await store.redrive([stored[0].id, 999_999_999]) == [stored[0]]  # attempts back to 0

    assert await msg_ids_in(store) == [1, 3, 4]  # back in its place: delivery order goes by id
    assert await dead_msg_ids(store) == [2]
    assert await store.redrive([]) == []  # no ids is nothing, not everything
    assert await dead_msg_ids(store) == [2]
    assert await store.redrive() == [stored[1]]
    assert await msg_ids_in(store) == [1, 2, 3, 4]
    assert await store.inbox_size("laptop") == (4, sum(message.size for message in await store.inbox("laptop", NOW)))
    assert await store.redrive() == []


async def test_redrive_ignores_the_caps_which_then_count_the_redriven_messages(store):
    stored = (await enqueue(store, queued(1), queued(2), max_count=2)).stored
    await store.dead_letter([stored[0].id], "undeliverable", NOW)
    await enqueue(store, queued(3), max_count=2)

    assert msg_ids(await store.redrive()) == [1]

    assert await msg_ids_in(store) == [1, 2, 3]
    assert (await store.inbox_size("laptop"))[0] == 3
    outcome = await enqueue(store, queued(4), max_count=2, policy=OVERFLOW_DROP_OLDEST)
    assert msg_ids(outcome.dropped) == [1, 2]
    assert await msg_ids_in(store) == [3, 4]


async def test_redrive_by_device_or_by_ids_of_one_device(store):
    stored = (await enqueue(store, queued(1), queued(2, "phone"), queued(3))).stored
    await store.dead_letter([message.id for message in stored], "undeliverable", NOW)

    assert msg_ids(await store.redrive(device_id="laptop")) == [1, 3]
    assert await dead_msg_ids(store) == [2]
    assert await store.redrive([stored[1].id], device_id="laptop") == []  # both given: those ids of that device
    assert await dead_msg_ids(store) == [2]
    assert msg_ids(await store.redrive([stored[1].id], device_id="phone")) == [2]
    assert await msg_ids_in(store, "phone") == [2]


async def test_purge_deletes_one_device_s_whole_inbox_or_its_dead_letters(store):
    stored = (await enqueue(store, queued(1), queued(2, expires_at=NOW - 1), queued(3), queued(4, "phone"))).stored
    await store.dead_letter([stored[2].id], "undeliverable", NOW)

    assert await store.purge("laptop") == 2  # the expired message too

    assert await store.inbox_size("laptop") == (0, 0)
    assert await store.take_expired(NOW) == []
    assert await msg_ids_in(store, "phone") == [4]
    assert await dead_msg_ids(store) == [3]
    assert await store.purge("laptop", dead_letters=True) == 1
    assert await store.dead_letters() == []
    assert await store.purge("laptop") == 0
    assert await store.purge("nobody", dead_letters=True) == 0
    # The purged inbox counts nothing against the caps.
    assert msg_ids((await enqueue(store, queued(5), max_count=1, max_bytes=queued(5).size)).stored) == [5]


async def test_inboxes_append_no_change(store):
    stored = (await enqueue(store, queued(1), queued(2), queued(3, expires_at=NOW))).stored
    await store.count_attempts([stored[0].id])
    await store.dead_letter([stored[0].id], "undeliverable", NOW)
    await store.redrive()
    await store.remove_queued([stored[0].id])
    await store.take_expired(NOW)
    await store.purge("laptop")
    await store.add_receipts([("phone", {"op": "receipt"})])
    await store.take_receipts("phone")
    assert await store.last_change() == 0


async def test_queued_records_given_and_handed_out_are_copies(store):
    def scribble(*messages):
        for message in messages:
            message.priority = PRIORITY_LOW
            message.attempts = 9
            message.msg_id = "changed"

    async def unchanged():
        [message] = await store.inbox("laptop", NOW)
        assert (message.msg_id, message.priority, message.attempts) == (1, PRIORITY_NORMAL, 0)
        return message

    message = queued(1)
    outcome = await enqueue(store, message, queued("too-big", body=b"x" * 100), max_bytes=50)
    scribble(message, *outcome.stored)
    assert message.id == 0
    assert outcome.rejected[0] is not message
    stored = await unchanged()

    scribble(*await store.inbox("laptop", NOW))
    await unchanged()

    moved = await store.dead_letter([stored.id], "undeliverable", NOW)
    scribble(*moved)
    letters = await store.dead_letters()
    scribble(*(letter.message for letter in letters))
    letters[0].reason = "changed"
    [letter] = await store.dead_letters()
    assert (letter.message.msg_id, letter.message.attempts, letter.reason) == (1, 0, "undeliverable")

    scribble(*await store.redrive())
    await unchanged()


# ---- receipts for offline senders -------------------------------------------------------------


async def test_receipts_are_kept_per_device_and_taken_oldest_first_once(store):
    delivered = {"op": "receipt", "id": "m-1", "status": "delivered", "device": "laptop"}
    failed = {"op": "receipt", "id": 7, "status": "failed", "reason": "expired", "device": "laptop"}
    routed = {"op": "receipt", "id": 2**64 - 1, "status": "routed", "devices": ["laptop", "tv"],
              "extra": {"nested": {"k": [1, 2.5, None, True, -(2**63)]}, 3: b"\x00\xff", "empty": {}}}
    await store.add_receipts([("phone", delivered), ("tablet", failed)])
    await store.add_receipts([("phone", routed)])
    await store.add_receipts([])

    taken = await store.take_receipts("phone")

    assert taken == [delivered, routed]
    assert (type(taken[0]["id"]), type(taken[1]["id"])) == (str, int)
    assert type(taken[1]["extra"][3]) is bytes
    assert await store.take_receipts("phone") == []  # taken means deleted
    assert await store.take_receipts("tablet") == [failed]
    assert await store.take_receipts("nobody") == []


async def test_the_devices_with_kept_receipts_are_those_whose_receipts_are_not_all_taken(store):
    assert await store.devices_with_kept_receipts() == []
    await store.add_receipts([("phone", {"id": 1}), ("laptop", {"id": 2}), ("phone", {"id": 3})])
    assert await store.devices_with_kept_receipts() == ["laptop", "phone"]
    await store.take_receipts("phone", limit=1)
    assert await store.devices_with_kept_receipts() == ["laptop", "phone"]  # one is still kept
    await store.take_receipts("phone")
    await store.take_receipts("laptop")
    assert await store.devices_with_kept_receipts() == []


async def test_kept_receipts_are_read_oldest_first_and_stay_kept(store):
    await store.add_receipts([("phone", {"id": "m-1", "extra": {3: b"\x00"}}), ("tablet", {"id": 2})])
    await store.add_receipts([("phone", {"id": 2**64 - 1})])
    kept = await store.kept_receipts("phone")
    assert kept == [{"id": "m-1", "extra": {3: b"\x00"}}, {"id": 2**64 - 1}]
    kept[0]["id"] = "changed"  # a copy
    assert await store.kept_receipts("phone") == [{"id": "m-1", "extra": {3: b"\x00"}}, {"id": 2**64 - 1}]
    assert await store.kept_receipts("nobody") == []
    assert await store.take_receipts("phone") == [{"id": "m-1", "extra": {3: b"\x00"}}, {"id": 2**64 - 1}]
    assert await store.kept_receipts("phone") == []
    assert await store.kept_receipts("tablet") == [{"id": 2}]


async def test_receipts_are_taken_at_most_limit_at_a_time(store):
    await store.add_receipts([("phone", {"id": n}) for n in range(5)])
    assert await store.take_receipts("phone", limit=2) == [{"id": 0}, {"id": 1}]
    assert await store.take_receipts("phone", limit=0) == []
    assert await store.take_receipts("phone", limit=-1) == []
    await store.add_receipts([("phone", {"id": 5})])
    assert await store.take_receipts("phone") == [{"id": n} for n in range(2, 6)]


async def test_receipts_come_back_as_msgpack_gives_them(store):
    await store.add_receipts([("phone", {"devices": ("laptop", "tv"), "body": bytearray(b"\x01")})])
    assert await store.take_receipts("phone") == [{"devices": ["laptop", "tv"], "body": b"\x01"}]


async def test_a_receipt_that_is_not_msgpack_is_refused_with_its_whole_batch(store):
    with pytest.raises(StoreError, match="msgpack"):
        await store.add_receipts([("phone", {"ok": 1}), ("phone", {"bad": object()})])
    assert await store.take_receipts("phone") == []


async def test_receipts_given_and_handed_out_are_copies(store):
    envelope = {"op": "receipt", "nested": {"k": [1]}}
    await store.add_receipts([("phone", envelope), ("phone", envelope)])
    envelope["nested"]["k"].append(2)
    first = await store.take_receipts("phone", limit=1)
    first[0]["nested"]["k"].append(3)
    assert await store.take_receipts("phone") == [{"op": "receipt", "nested": {"k": [1]}}]


async def test_message_ids_round_trip_and_are_replaced_or_merged(store):
    await store.save_message_ids([("phone", "m-1", NOW - 10, 7), ("phone", 2**63 + 5, NOW, 8), ("pc", -3, NOW - 99, 9)])
    assert await store.load_message_ids(NOW - 50) == [("phone", "m-1", NOW - 10, 7), ("phone", 2**63 + 5, NOW, 8)]
    await store.save_message_ids([("pc", "x", NOW + 1, 1), ("phone", "m-1", NOW + 2, 3)])
    if store.shared_by_nodes:  # another node's shutdown adds its ids to those saved before
        assert await store.load_message_ids(NOW - 50) == [
            ("phone", 2**63 + 5, NOW, 8), ("pc", "x", NOW + 1, 1), ("phone", "m-1", NOW + 2, 3)]
    else:  # the one node saves all it remembers
        assert await store.load_message_ids(0) == [("pc", "x", NOW + 1, 1), ("phone", "m-1", NOW + 2, 3)]


# ---- state documents ----------------------------------------------------

KIB = 1024


async def patch(store, doc, value, by="phone", patch_id=None, if_rev=None, user="alice", at=NOW,
                max_doc=256 * KIB, max_user=4096 * KIB, keep=1000):
    return await store.patch_state(user, doc, value, by, patch_id, if_rev, at, max_doc, max_user, keep)


async def test_a_document_never_written_is_at_revision_zero_with_value_null(store):
    doc = await store.get_state("alice", "user/draft")
    assert (doc.rev, doc.value) == (0, None)


async def test_patches_merge_and_each_change_bumps_the_revision_by_one(store):
    first = await patch(store, "user/draft", {"text": "hi", "tags": ["a"]}, patch_id="p1")
    assert (first.rev, first.prev_rev, first.noop, first.duplicate) == (1, 0, False, False)
    assert first.change is not None and first.change.patch == {"tags": ["a"], "text": "hi"}
    assert first.change.by == "phone" and first.change.patch_id == "p1"
    second = await patch(store, "user/draft", {"tags": ["b"], "text": None, "n": 1}, by="desktop", at=NOW + 1)
    assert (second.rev, second.prev_rev) == (2, 1)
    doc = await store.get_state("alice", "user/draft")
    assert (doc.rev, doc.value, doc.by, doc.updated) == (2, {"tags": ["b"], "n": 1}, "desktop", NOW + 1)


async def test_documents_belong_to_one_user(store):
    await patch(store, "user/draft", {"a": 1})
    assert (await store.get_state("bob", "user/draft")).rev == 0
    assert await store.state_catch_up("bob", {}, prefix="") == []


async def test_a_patch_that_changes_nothing_bumps_nothing_and_logs_nothing(store):
    await patch(store, "user/x", {"a": 1, "b": [1, 2]})
    for same in ({"a": 1}, {"b": [1, 2]}, {"c": None}, {}):
        outcome = await patch(store, "user/x", same)
        assert (outcome.rev, outcome.prev_rev, outcome.noop, outcome.change) == (1, 1, True, None)
    # 1.0 and true are not 1: a changed type is a change
    assert (await patch(store, "user/x", {"a": 1.0})).rev == 2
    assert (await patch(store, "user/x", {"a": True})).rev == 3
    assert (await patch(store, "user/never", None)).noop
    caught = await store.state_catch_up("alice", {"user/x": 0}, doc="user/x")
    assert [change.rev for change in caught[0].changes] == [1, 2, 3]


async def test_if_rev_other_than_the_current_revision_is_a_conflict_with_the_current_value(store):
    await patch(store, "user/x", {"a": 1})
    for wrong in (0, 2, 99):
        with pytest.raises(StateConflict) as caught:
            await patch(store, "user/x", {"a": 2}, if_rev=wrong)
        assert (caught.value.rev, caught.value.value) == (1, {"a": 1})
    assert (await patch(store, "user/x", {"a": 2}, if_rev=1)).rev == 2
    assert (await store.get_state("alice", "user/x")).value == {"a": 2}


async def test_a_retried_patch_with_the_same_id_from_the_same_device_is_applied_once(store):
    await patch(store, "user/n", {"n": 1}, patch_id="p1")
    await patch(store, "user/n", {"n": 2}, by="desktop", patch_id="d1")
    again = await patch(store, "user/n", {"n": 1}, patch_id="p1")
    assert (again.rev, again.prev_rev, again.duplicate, again.change) == (1, 0, True, None)
    assert (await store.get_state("alice", "user/n")).value == {"n": 2}
    # the same id from another device, another patch under a reused id, or an int id "1" vs 1: new patches
    assert not (await patch(store, "user/n", {"n": 1}, by="tablet", patch_id="p1")).duplicate
    assert (await patch(store, "user/n", {"n": 3}, patch_id="p1")).rev == 4
    await patch(store, "user/n", {"k": 1}, patch_id=7)
    assert not (await patch(store, "user/n", {"k": 2}, patch_id="7")).duplicate
    assert (await patch(store, "user/n", {"k": 1}, patch_id=7)).duplicate


async def test_a_deleted_document_keeps_its_revision_and_a_re_created_one_continues_it(store):
    await patch(store, "user/x", {"a": 1})
    deleted = await patch(store, "user/x", None)
    assert (deleted.rev, deleted.change.patch) == (2, None)
    doc = await store.get_state("alice", "user/x")
    assert (doc.rev, doc.value) == (2, None)
    assert (await patch(store, "user/x", {"b": 2})).rev == 3


async def test_limits_are_measured_on_the_merged_document_and_a_shrinking_patch_is_accepted(store):
    await patch(store, "user/big", {"a": "x" * 80})
    with pytest.raises(StateTooLarge) as caught:
        await patch(store, "user/big", {"b": "y" * 10}, max_doc=100)
    assert caught.value.limit == "state_max_doc_bytes" and caught.value.max_bytes == 100
    assert caught.value.size == len('{"a":"' + "x" * 80 + '","b":"' + "y" * 10 + '"}')
    assert (await store.get_state("alice", "user/big")).rev == 1
    # already over a (lowered) limit: a patch that does not grow it is accepted
    assert (await patch(store, "user/big", {"a": "x" * 70}, max_doc=50)).rev == 2
    await patch(store, "user/other", {"c": "z" * 40})
    with pytest.raises(StateTooLarge) as caught:
        await patch(store, "user/third", {"d": 1}, max_user=120)
    assert caught.value.limit == "state_max_user_bytes" and caught.value.size > 120
    assert (await store.get_state("alice", "user/third")).rev == 0


async def test_the_change_log_keeps_the_newest_changes_and_older_catch_ups_need_a_snapshot(store):
    for n in range(1, 11):
        await patch(store, "user/c", {"n": n}, keep=4)
    [caught] = await store.state_catch_up("alice", {"user/c": 6}, doc="user/c")
    assert [(c.rev, c.prev_rev, c.patch) for c in caught.changes] == [(7, 6, {"n": 7}), (8, 7, {"n": 8}),
                                                                      (9, 8, {"n": 9}), (10, 9, {"n": 10})]
    assert (caught.doc.rev, caught.doc.value) == (10, {"n": 10})
    for too_old_or_missing in ({"user/c": 5}, {"user/c": 11}, {}):
        [caught] = await store.state_catch_up("alice", too_old_or_missing, doc="user/c")
        assert caught.changes is None and caught.doc.rev == 10
    [caught] = await store.state_catch_up("alice", {"user/c": 10}, doc="user/c")
    assert caught.changes == []


async def test_catch_up_by_prefix_lists_existing_documents_and_deleted_ones_the_caller_knows(store):
    await patch(store, "user/a", {"v": 1})
    await patch(store, "user/b", {"v": 1})
    await patch(store, "user/b", None)
    await patch(store, "users/z", {"v": 1})
    await patch(store, "device/phone/x", {"v": 1})
    assert [c.doc.name for c in await store.state_catch_up("alice", {}, prefix="user/")] == ["user/a"]
    caught = await store.state_catch_up("alice", {"user/b": 1}, prefix="user/")
    assert [(c.doc.name, c.doc.rev) for c in caught] == [("user/a", 1), ("user/b", 2)]
    assert [c.rev for c in caught[1].changes] == [2] and caught[1].changes[0].patch is None
    assert len(await store.state_catch_up("alice", {}, prefix="")) == 3
    [missing] = await store.state_catch_up("alice", {}, doc="user/none")
    assert (missing.doc.rev, missing.doc.value, missing.changes) == (0, None, None)


async def test_a_patch_that_is_not_json_is_refused(store):
    with pytest.raises(StoreError):
        await patch(store, "user/x", {"a": float("nan")})
    with pytest.raises(StoreError):
        await patch(store, "user/x", {"a": b"bytes"})
    assert (await store.get_state("alice", "user/x")).rev == 0


async def test_state_is_listed_with_tombstones_and_change_logs_by_name(store):
    await add_users(store, "alice", "bob")
    await patch(store, "user/b", {"x": 1}, patch_id="p1", at=NOW + 1)
    await patch(store, "user/b", {"y": [1, 2]}, by="laptop", patch_id=7, at=NOW + 2)
    await patch(store, "user/a", {"gone": True}, at=NOW + 3)
    await patch(store, "user/a", None, at=NOW + 4)  # deleted: a tombstone at revision 2
    await patch(store, "user/b", {"other": "user"}, user="bob")
    listed = await store.list_state("alice")
    assert [(doc.name, doc.rev, doc.value, doc.by, doc.updated) for doc, _ in listed] == [
        ("user/a", 2, None, "phone", NOW + 4), ("user/b", 2, {"x": 1, "y": [1, 2]}, "laptop", NOW + 2)]
    assert [(change.rev, change.patch, change.by, change.patch_id, change.at) for change in listed[1][1]] == [
        (1, {"x": 1}, "phone", "p1", NOW + 1), (2, {"y": [1, 2]}, "laptop", 7, NOW + 2)]
    assert [change.rev for change in listed[0][1]] == [1, 2]
    assert await store.list_state("carol") == []


async def test_restored_state_keeps_its_revisions_log_and_duplicate_detection(store):
    await add_users(store, "alice")
    doc = StateDoc(user="alice", name="user/draft", rev=7, value={"text": "hi"}, by="laptop", updated=NOW)
    changes = [StateChange(user="alice", doc="user/draft", rev=6, prev_rev=5, patch={"n": None}, by="phone",
                           patch_id="p6", at=NOW - 1),
               StateChange(user="alice", doc="user/draft", rev=7, prev_rev=6, patch={"text": "hi"}, by="laptop",
                           patch_id=7, at=NOW)]
    await store.restore_state(doc, changes)
    assert await store.get_state("alice", "user/draft") == doc
    assert await store.list_state("alice") == [(doc, changes)]
    (caught,) = await store.state_catch_up("alice", {"user/draft": 5}, doc="user/draft")
    assert caught.changes == changes
    (too_old,) = await store.state_catch_up("alice", {"user/draft": 4}, doc="user/draft")
    assert too_old.changes is None
    repeat = await patch(store, "user/draft", {"text": "hi"}, by="laptop", patch_id=7)
    assert (repeat.duplicate, repeat.rev) == (True, 7)
    assert (await patch(store, "user/draft", {"more": 1}, if_rev=7)).rev == 8
    tombstone = StateDoc(user="alice", name="user/old", rev=3, value=None, by="phone", updated=NOW)
    await store.restore_state(tombstone, [])
    assert await store.get_state("alice", "user/old") == tombstone
    assert (await patch(store, "user/old", {"back": True})).rev == 4  # revisions go on from the tombstone's
    # A restore replaces the document and its whole log.
    await store.restore_state(doc, changes[1:])
    assert (await store.list_state("alice"))[0] == (doc, changes[1:])
    assert (await store.get_state("alice", "user/draft")).rev == 7


async def test_restored_state_counts_against_the_user_limit(store):
    await add_users(store, "alice")
    big = {"text": "x" * 100}
    await store.restore_state(StateDoc(user="alice", name="user/big", rev=1, value=big, by="pc", updated=NOW), [])
    with pytest.raises(StateTooLarge):
        await patch(store, "user/other", {"text": "y" * 100}, max_user=150)


# ---- task leases -----------------------------------------------------------


async def test_task_leases_round_trip_and_are_replaced_whole(store):
    await add_users(store, "alice", "bob")
    assert await store.load_tasks("alice") == []
    await store.put_task(TaskLease(user="alice", task="build", owner="laptop", epoch=1, expires=NOW + MINUTE,
                                   updated=NOW))
    await store.put_task(TaskLease(user="alice", task="agent/main", owner="phone", epoch=4, expires=NOW + HOUR,
                                   handoff="h1", updated=NOW))
    await store.put_task(TaskLease(user="bob", task="build", owner="pc", epoch=9, expires=NOW, updated=NOW))
    await store.put_task(TaskLease(user="alice", task="build", owner=None, epoch=1, expires=0, updated=NOW + 1))
    assert await store.load_tasks("alice") == [
        TaskLease(user="alice", task="agent/main", owner="phone", epoch=4, expires=NOW + HOUR, handoff="h1",
                  updated=NOW),
        TaskLease(user="alice", task="build", owner=None, epoch=1, expires=0, updated=NOW + 1),
    ]
    assert [lease.epoch for lease in await store.load_tasks("bob")] == [9]


async def test_a_lease_written_only_if_unchanged_is_refused_once_another_writer_changed_it(store):
    await add_users(store, "alice")
    first = TaskLease(user="alice", task="build", owner="laptop", epoch=1, expires=NOW + MINUTE, updated=NOW)
    with pytest.raises(TaskRaced):  # expected: a lease there; none is
        await store.put_task(first, if_unchanged=True, previous=dataclasses.replace(first, epoch=0))
    await store.put_task(first, if_unchanged=True, previous=None)
    # Two writers read epoch 1; the first to write wins, the second is refused and writes nothing.
    mine = dataclasses.replace(first, owner="phone", epoch=2, updated=NOW + 1)
    theirs = dataclasses.replace(first, owner="tablet", epoch=2, updated=NOW + 2)
    await store.put_task(mine, if_unchanged=True, previous=first)
    with pytest.raises(TaskRaced):
        await store.put_task(theirs, if_unchanged=True, previous=first)
    with pytest.raises(TaskRaced):  # none expected, one is there
        await store.put_task(theirs, if_unchanged=True, previous=None)
    assert await store.load_tasks("alice") == [mine]
    renewed = dataclasses.replace(mine, expires=NOW + HOUR, updated=NOW + 3)
    await store.put_task(renewed, if_unchanged=True, previous=(await store.load_tasks("alice"))[0])
    assert await store.load_tasks("alice") == [renewed]


async def test_a_fenced_state_patch_is_written_only_while_its_writer_holds_the_lease_at_that_epoch(store):
    await add_users(store, "alice")
    limits = (NOW, 256 * KIB, 4096 * KIB, 1000)
    with pytest.raises(FenceMoved):  # nobody ever claimed the task
        await store.patch_state("alice", "user/plan", {"step": 0}, "laptop", None, None, *limits, fence=("build", 1))
    await store.put_task(TaskLease(user="alice", task="build", owner="laptop", epoch=1, expires=NOW + MINUTE))
    written = await store.patch_state("alice", "user/plan", {"step": 1}, "laptop", None, None, *limits,
                                      fence=("build", 1))
    assert written.rev == 1
    # An expired lease still fences: nobody took the task since.
    await store.put_task(TaskLease(user="alice", task="build", owner="laptop", epoch=1, expires=NOW - MINUTE))
    assert (await store.patch_state("alice", "user/plan", {"step": 2}, "laptop", None, None, *limits,
                                    fence=("build", 1))).rev == 2
    # Taken over (e.g. through another node) after the writer's own check: refused in the write itself.
    await store.put_task(TaskLease(user="alice", task="build", owner="phone", epoch=2, expires=NOW + MINUTE))
    for by, epoch in (("laptop", 1), ("laptop", 2), ("phone", 1), ("phone", 3)):
        with pytest.raises(FenceMoved):
            await store.patch_state("alice", "user/plan", {"step": 9}, by, None, None, *limits, fence=("build", epoch))
    with pytest.raises(FenceMoved):  # refused first, also where the patch would change nothing
        await store.patch_state("alice", "user/plan", {"step": 2}, "laptop", None, None, *limits, fence=("build", 1))
    doc = await store.get_state("alice", "user/plan")
    assert (doc.rev, doc.value) == (2, {"step": 2})  # nothing of the refused patches was written
    assert (await store.patch_state("alice", "user/plan", {"step": 3}, "phone", None, None, *limits,
                                    fence=("build", 2))).rev == 3


async def test_a_store_shared_by_nodes_keeps_a_leases_open_handoff_and_a_write_sees_it_change(store):
    if not store.shared_by_nodes and not isinstance(store, MemoryStore):
        pytest.skip("a store that serves one process need not keep open handoffs (they live in its memory)")
    await add_users(store, "alice")
    lease = TaskLease(user="alice", task="build", owner="laptop", epoch=3, expires=NOW + MINUTE, updated=NOW)
    await store.put_task(lease)
    held = dataclasses.replace(lease, open_handoff=OpenHandoff("h1-x@n0", "prepare", NOW + MINUTE))
    await store.put_task(held, if_unchanged=True, previous=lease)
    assert await store.load_tasks("alice") == [held]
    # A claim on another node read the lease before the handoff opened: its write is refused, so it looks again.
    with pytest.raises(TaskRaced):
        await store.put_task(dataclasses.replace(lease, owner="tablet", epoch=4), if_unchanged=True, previous=lease)
    offered = dataclasses.replace(held, open_handoff=OpenHandoff("h1-x@n0", "offer", NOW + HOUR))
    await store.put_task(offered, if_unchanged=True, previous=held)
    with pytest.raises(TaskRaced):  # the stage moved on since this writer read it
        await store.put_task(dataclasses.replace(held, expires=NOW + HOUR), if_unchanged=True, previous=held)
    assert await store.load_tasks("alice") == [offered]


async def test_a_loaded_task_lease_is_a_copy(store):
    await add_users(store, "alice")
    lease = TaskLease(user="alice", task="build", owner="laptop", epoch=1, expires=NOW + MINUTE)
    await store.put_task(lease)
    lease.epoch = 99
    (loaded,) = await store.load_tasks("alice")
    loaded.owner = "mallory"
    assert await store.load_tasks("alice") == [
        TaskLease(user="alice", task="build", owner="laptop", epoch=1, expires=NOW + MINUTE)]


async def test_a_task_lease_needs_a_known_user(store):
    with pytest.raises(StoreError):
        await store.put_task(TaskLease(user="nobody", task="build", owner="laptop", epoch=1, expires=NOW))
    assert await store.load_tasks("nobody") == []


async def test_removing_a_user_deletes_its_state_documents_and_task_leases(store):
    await add_users(store, "alice", "bob")
    for user in ("alice", "bob"):
        await store.patch_state(user, "user/draft", {"text": "hi"}, "laptop", "p1", None, NOW, 1 << 20, 1 << 22, 10)
        await store.put_task(TaskLease(user=user, task="build", owner="laptop", epoch=3, expires=NOW + MINUTE))
    assert await store.remove_user("alice", NOW) is True
    assert await store.load_tasks("alice") == []
    assert (await store.get_state("alice", "user/draft")).rev == 0
    assert await store.state_catch_up("alice", {"user/draft": 0}, prefix="") == []
    await add_users(store, "alice")  # a new user of the same name starts empty
    assert await store.load_tasks("alice") == []
    assert (await store.get_state("bob", "user/draft")).value == {"text": "hi"}
    assert [lease.epoch for lease in await store.load_tasks("bob")] == [3]


async def test_users_with_task_notices_are_those_with_an_unconfirmed_handoff(store):
    await add_users(store, "alice", "bob", "carol")
    assert await store.users_with_task_notices() == []
    await store.put_task(TaskLease(user="carol", task="a", owner="pc", epoch=2, expires=NOW, handoff="h1"))
    await store.put_task(TaskLease(user="alice", task="a", owner="pc", epoch=1, expires=NOW))
    await store.put_task(TaskLease(user="alice", task="b", owner="pc", epoch=5, expires=NOW, handoff="h2"))
    await store.put_task(TaskLease(user="bob", task="a", owner="pc", epoch=1, expires=NOW))
    assert await store.users_with_task_notices() == ["alice", "carol"]
    await store.put_task(TaskLease(user="carol", task="a", owner="pc", epoch=2, expires=NOW))  # confirmed
    assert await store.users_with_task_notices() == ["alice"]


# ---- token secret --------------------------------------------------------------


async def test_a_shared_store_adopts_a_token_secret_only_when_it_has_none(store):
    if not store.shared_by_nodes:
        with pytest.raises(StoreError, match="data directory"):
            await store.adopt_token_secret(b"a" * 64)
        return
    assert await store.adopt_token_secret(b"a" * 64) == b"a" * 64
    assert await store.adopt_token_secret(b"b" * 64) == b"a" * 64  # never replaced
    assert await store.token_secret() == b"a" * 64


# ---- what a connect storm needs, batched ------------------------------------------------------


async def test_register_adds_the_missing_users_then_puts_the_devices(store):
    await store.add_user(UserRecord(id="alice", created=NOW - 5))
    cursor = await store.last_change()
    laptop, tv = make_device("laptop"), make_device("tv", user="bob")
    await store.register([UserRecord(id="alice", created=NOW), UserRecord(id="bob", created=NOW)], [laptop, tv])
    assert [(user.id, user.created) for user in await store.list_users()] == [("alice", NOW - 5), ("bob", NOW)]
    assert (await store.get_device("laptop"), await store.get_device("tv")) == (laptop, tv)
    assert await new_changes(store, cursor) == [(CHANGE_USER, "bob"), (CHANGE_DEVICE, "laptop"),
                                                (CHANGE_DEVICE, "tv")]


async def test_register_keeps_the_other_devices_when_one_is_refused(store):
    await add_users(store, "alice")
    with pytest.raises(StoreError, match="nobody"):
        await store.register([], [make_device("stray", user="nobody"), make_device("laptop")])
    assert await store.get_device("stray") is None
    assert (await store.get_device("laptop")).id == "laptop"


async def test_welcome_reads_take_each_devices_receipts_and_read_its_inbox(store):
    await add_users(store, "alice")
    for device_id in ("laptop", "phone"):
        await store.put_device(make_device(device_id))
    await enqueue(store, queued("m-1"), queued("m-2", priority=PRIORITY_HIGH))
    receipt = {"op": "receipt", "id": "m-0", "status": "delivered", "device": "laptop"}
    await store.add_receipts([("phone", receipt)])

    reads = await store.welcome_reads(["phone", "laptop", "phone", "nobody"], NOW, 1)

    assert [(receipts, msg_ids(page)) for receipts, page in reads] == [
        ([receipt], []), ([], ["m-2"]), ([], []), ([], [])]
    assert await store.take_receipts("phone") == []  # taken means deleted
    assert await msg_ids_in(store) == ["m-2", "m-1"]  # read, not taken


async def test_a_shared_inbox_keeps_a_pick_one_messages_plan_for_the_node_that_writes_it(store):
    # Several nodes (protocol.md 12): a pick-one message's selector, order and devices tried travel with it, so
    # whichever node writes it to its device can move it on. A store for one node need not keep them.
    plan = ["devices", ["laptop", "tablet"], False, "listed", ["laptop"]]
    await enqueue(store, queued("job", work=plan), queued("plain"))
    by_id = {message.msg_id: message.work for message in await store.inbox("laptop", NOW)}
    if store.shared_by_nodes:
        assert by_id == {"job": plan, "plain": None}
    else:
        assert by_id["plain"] is None


async def test_stale_sessions_are_found_among_many_pages_of_sessions(store):
    # More sessions than one page of the Redis store's scan (STALE_SCAN_PAGE): every stale one goes.
    stale = [make_session(f"gone-{n}", disconnected_at=NOW - GRACE - 1) for n in range(1_100)]
    kept = [make_session(f"here-{n}", connected_at=NOW - 5) for n in range(3)]
    await store.put_sessions(stale + kept)
    assert await store.delete_stale_sessions(NOW, GRACE) == 1_100
    assert sorted(await ids_of_sessions(store)) == sorted(session.id for session in kept)
