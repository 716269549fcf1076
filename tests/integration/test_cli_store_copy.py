"""``rccs store copy``, run as a real process: a single node's SQLite data directory moves into a real
redis-server, everything in it arrives equal, and a node serving the Redis store lets the devices carry on
with their old credential, a dev token issued before the move and their sessions. And the refusals.
"""

import asyncio
import dataclasses
import signal
import subprocess
import sys

import pytest

from rccs.auth import read_secret
from rccs.client import Client, pair
from rccs.store import DeviceRecord, PairingCode, QueuedMessage, StateDoc, TaskLease, UserRecord, open_store
from rccs.testing import RedisServer, ServerProcess, child_environment

NOW = 1_700_000_000_000
HOUR = 3_600_000


def rccs(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "rccs", *args], capture_output=True, text=True, timeout=120,
                          env=child_environment(), cwd=cwd)


@pytest.fixture
async def redis_url(tmp_path):
    server = RedisServer(tmp_path / "redis")
    url = await server.start()
    yield url
    server.kill()


async def on_store(kind, data_dir, operation):
    store = open_store(kind, str(data_dir))
    await store.open()
    try:
        return await operation(store)
    finally:
        await store.close()


async def dump(store):
    """Everything a copy carries, comparable across stores: inbox ids differ by design (each store counts its
    own), so messages are compared without them, in their order."""
    devices = await store.list_devices(include_revoked=True)
    revoked = {device.id for device in devices if device.revoked_at is not None}
    users = await store.list_users()
    inboxes, receipts = {}, {}
    for device in devices:
        count, size = await store.inbox_size(device.id)
        if count:
            messages = await store.inbox(device.id, 0, count)
            inboxes[device.id] = ([dataclasses.replace(message, id=0) for message in messages], size)
        kept = await store.kept_receipts(device.id)
        if kept:
            receipts[device.id] = kept
    return {
        "users": users,
        "devices": devices,
        "sessions": [session for session in await store.list_sessions() if session.device not in revoked],
        "inboxes": inboxes,
        "dead letters": [(dataclasses.replace(letter.message, id=0), letter.reason, letter.at)
                         for letter in await store.dead_letters()],
        "receipts": receipts,
        "pairing codes": await store.list_pairing_codes(),
        "state": {user.id: await store.list_state(user.id) for user in users},
        "tasks": {user.id: await store.load_tasks(user.id) for user in users},
        "message ids": await store.load_message_ids(0),
    }


async def add_what_no_client_made(store, now):
    """What the node's own traffic in this test leaves out: a revoked device, the tombstone of a removed user's
    device, a dead letter, an expired inbox message, a kept receipt, a pairing code, a deleted document."""
    await store.add_user(UserRecord(id="bob", created=now))
    await store.put_device(DeviceRecord(id="bob-old", user="bob", type="mobile", created=now))
    await store.revoke_device("bob-old", now + 1)
    await store.add_user(UserRecord(id="carol", created=now))
    await store.put_device(DeviceRecord(id="carol-pc", user="carol", type="desktop", created=now,
                                        metadata={"room": "attic"}))
    await store.remove_user("carol", now + 2)
    base = dict(user="alice", sender_device="laptop", type="job", body=b"\x81\xa1k\x01", ts=now)
    outcome = await store.enqueue([
        QueuedMessage(device="phone", msg_id="dead-1", priority=3, attempts=5, receipt=True, **base),
        QueuedMessage(device="phone", msg_id="old-1", expires_at=now - HOUR, **base),
    ], 100, 1 << 20, "reject")
    await store.dead_letter([outcome.stored[0].id], "undeliverable", now + 3)
    await store.add_receipts([("laptop", {"op": "receipt", "id": "r-1", "status": "delivered", "device": "phone"})])
    await store.add_pairing_code(PairingCode(id="WXYZ1234", secret_hash="ab" * 32, user="alice",
                                             issuer_device="laptop", created=now, expires_at=now + HOUR, approve=True))
    await store.patch_state("alice", "user/gone", {"a": 1}, "laptop", "p-1", None, now, 1 << 20, 1 << 22, 100)
    await store.patch_state("alice", "user/gone", None, "laptop", "p-2", None, now, 1 << 20, 1 << 22, 100)


@pytest.mark.timeout(120)
async def test_a_single_node_moves_into_redis_and_its_devices_carry_on(tmp_path, redis_url):
    data_dir = tmp_path / "single"
    added = rccs("users", "add", "alice", "--device", "phone", "--type", "mobile", "--data-dir", str(data_dir))
    assert added.returncode == 0, added.stderr
    credential = next(line.split(": ", 1)[1] for line in added.stdout.splitlines() if line.startswith("credential:"))
    issued = rccs("token", "issue", "--user", "alice", "--device", "laptop", "--ttl", "1h", "--data-dir",
                  str(data_dir))
    assert issued.returncode == 0, issued.stderr
    token = issued.stdout.strip()

    # The single node's own life: the laptop (dev token) sends to the offline phone (its inbox), writes a
    # state document and claims a task; then the node stops as an operator stops it (SIGTERM).
    node = ServerProcess(data_dir)
    await node.start()
    try:
        laptop = Client(node.ws_url, token, {"type": "desktop"}, reconnect=False)
        await laptop.connect()
        session = laptop.session_id
        receipts = await laptop.send({"device": "phone"}, "note", {"text": "from before the move"}, ack=True,
                                     id="m-1", priority="HIGH", ttl=3600)
        assert [receipt.status for receipt in receipts] == ["queued"]
        await laptop.state_patch("user/notes", {"text": "one"})
        await laptop.state_patch("user/notes", {"more": 2})
        lease = await laptop.task_claim("build", ttl=600)
        node.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(node.wait, 30) == 0, node.logs()
        await laptop.close()
    finally:
        node.kill()
    paired = rccs("users", "pair", "alice", "--ttl", "1h", "--data-dir", str(data_dir))
    assert paired.returncode == 0, paired.stderr
    code = next(line.split(": ", 1)[1] for line in paired.stdout.splitlines() if line.startswith("pairing code:"))
    await on_store("sqlite", data_dir, lambda store: add_what_no_client_made(store, lease.expires - 600_000))
    before = await on_store("sqlite", data_dir, dump)
    assert before["message ids"] and before["sessions"] and before["inboxes"]["phone"]  # the test covers them

    copied = rccs("store", "copy", "--from", str(data_dir), "--to", redis_url)
    assert copied.returncode == 0, copied.stderr
    lines = copied.stdout.splitlines()
    assert lines[0] == f"copied the data directory {data_dir} to {redis_url}:"
    counts = {line[2:18].strip(): line[19:] for line in lines[1:12]}
    assert counts["users"] == "2"  # carol was removed: her device stays as a tombstone
    assert counts["devices"] == "4 (2 of them revoked)"
    assert counts["inbox messages"] == "2"
    assert counts["dead letters"] == "1"
    assert counts["kept receipts"] == "1"
    assert counts["pairing codes"] == "2"
    assert counts["state documents"] == "2 (4 changes in their logs)"
    assert counts["task leases"] == "1"
    assert counts["token secret"] == "copied: dev tokens issued before stay valid"
    assert copied.stderr == ""

    assert await on_store(redis_url, "", dump) == before
    assert await on_store("sqlite", data_dir, dump) == before  # the source is left as it was
    assert await on_store(redis_url, "", lambda store: store.token_secret()) == read_secret(str(data_dir))

    # A node of the cluster, on the Redis store: the devices carry on as if nothing had moved.
    cluster_node = ServerProcess(tmp_path / "node-1", "--store", redis_url)
    await cluster_node.start()
    clients = []
    try:
        laptop = Client(cluster_node.ws_url, token, {"type": "desktop"}, reconnect=False)  # issued before the copy
        laptop.session_id = session
        clients.append(laptop)
        welcome = await laptop.connect()
        assert welcome.get("resumed") is True and welcome["session"] == session, welcome
        phone = Client(cluster_node.ws_url, None, {"type": "mobile"}, credential=credential, reconnect=False)
        clients.append(phone)
        await phone.connect()
        message = await phone.next_message(timeout=10)
        assert (message.id, message.sender, message.body) == ("m-1", "laptop", {"text": "from before the move"})
        tablet = await pair(cluster_node.ws_url, code, {"type": "tablet"}, reconnect=False)  # a code from before
        clients.append(tablet)
        assert tablet.paired is not None and tablet.paired["user"] == "alice", tablet.paired
        assert (await laptop.state_get("user/notes")).rev == 2
        [status] = await laptop.task_list("build")
        assert (status.owner, status.epoch) == ("laptop", lease.epoch)
    except BaseException:
        print(cluster_node.logs())
        raise
    finally:
        for client in clients:
            await client.close()
        cluster_node.kill()


async def test_a_copy_back_into_a_data_directory_is_equal_and_keeps_the_token_secret(tmp_path, redis_url):
    source = tmp_path / "source"
    assert rccs("token", "issue", "--user", "alice", "--device", "laptop", "--data-dir", str(source)).returncode == 0
    await on_store("sqlite", source, lambda store: store.put_device(DeviceRecord(id="phone", user="alice",
                                                                                  type="mobile", created=NOW)))
    await on_store("sqlite", source, lambda store: add_what_no_client_made(store, NOW))
    await on_store("sqlite", source, lambda store: store.put_task(TaskLease(user="alice", task="build",
                                                                             owner="phone", epoch=7, expires=NOW)))
    await on_store("sqlite", source, lambda store: store.restore_state(
        StateDoc(user="alice", name="user/x", rev=41, value=[1], by="phone", updated=NOW), []))
    before = await on_store("sqlite", source, dump)
    assert rccs("store", "copy", "--from", str(source), "--to", redis_url).returncode == 0
    back = tmp_path / "back"
    result = rccs("store", "copy", "--from", redis_url, "--to", str(back))
    assert result.returncode == 0, result.stderr
    assert await on_store("sqlite", back, dump) == before
    assert read_secret(str(back)) == read_secret(str(source))


def refused(result, message):
    assert result.returncode == 2, (result.stdout, result.stderr)
    assert result.stderr.startswith("rccs: error: ") and message in result.stderr, result.stderr
    assert len(result.stderr.splitlines()) == 1, result.stderr  # one line, no traceback


async def test_copies_that_would_lose_or_mix_data_are_refused(tmp_path, redis_url):
    source = tmp_path / "source"
    assert rccs("users", "add", "alice", "--device", "phone", "--data-dir", str(source)).returncode == 0
    refused(rccs("store", "copy", "--from", str(tmp_path / "nothing"), "--to", redis_url), "no store at")
    await on_store("sqlite", tmp_path / "empty", lambda store: store.last_change())
    refused(rccs("store", "copy", "--from", str(tmp_path / "empty"), "--to", str(tmp_path / "never")),
            "holds no data")
    assert not (tmp_path / "never").exists()  # the source is checked before the target is touched
    refused(rccs("store", "copy", "--from", "memory", "--to", redis_url), "memory store")
    refused(rccs("store", "copy", "--from", str(source), "--to", "redis://host:port/0"), "port that is not a number")
    refused(rccs("store", "copy", "--from", str(source), "--to", str(source)), "are both")
    refused(rccs("store", "copy", "--from", "sqlite", "--data-dir", "source", "--to", "./source", cwd=tmp_path),
            "are both")

    # Another token secret in an otherwise empty target: the dev tokens of the source would stop working there.
    assert rccs("token", "issue", "--user", "alice", "--device", "laptop", "--data-dir", str(source)).returncode == 0
    await on_store(redis_url, "", lambda store: store.adopt_token_secret(b"f" * 64))
    refused(rccs("store", "copy", "--from", str(source), "--to", redis_url), "another token secret")
    assert await on_store(redis_url, "", lambda store: store.list_users()) == []

    # A server on the source: a copy would miss what it writes meanwhile.
    node = ServerProcess(source)
    await node.start()
    try:
        refused(rccs("store", "copy", "--from", str(source), "--to", str(tmp_path / "other")),
                "server is running on the source")
    finally:
        node.kill()

    target = tmp_path / "target"
    assert rccs("store", "copy", "--from", str(source), "--to", str(target)).returncode == 0
    refused(rccs("store", "copy", "--from", str(source), "--to", str(target)), "already holds data")

    # Nodes serving the Redis of the target (or source): refused while they run.
    cluster_node = ServerProcess(tmp_path / "node-1", "--store", redis_url)
    await cluster_node.start()
    try:
        refused(rccs("store", "copy", "--from", str(target), "--to", redis_url), "nodes are serving on the target")
    finally:
        cluster_node.kill()


def test_an_unreachable_redis_is_one_line_and_exit_1(tmp_path):
    source = tmp_path / "source"
    assert rccs("users", "add", "alice", "--device", "phone", "--data-dir", str(source)).returncode == 0
    result = rccs("store", "copy", "--from", str(source), "--to", "redis://127.0.0.1:1/0")
    assert result.returncode == 1, (result.stdout, result.stderr)
    assert result.stderr.startswith("rccs: error: store: ") and len(result.stderr.splitlines()) == 1, result.stderr
