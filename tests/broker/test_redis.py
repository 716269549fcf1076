"""What the Redis broker promises beyond the contract: where a device moved, a dead node, a lost connection."""

import time

import pytest
import redis.asyncio as aioredis

from rccs.broker import FIRST_ACK_SETTLED
from rccs.broker.redis import NODE_TTL, NODES, WHERE, RedisBroker
from rccs.testing import RedisServer

from .recording import RecordingNode


@pytest.fixture
async def redis_url(tmp_path):
    server = RedisServer(tmp_path / "redis")
    yield await server.start()
    server.kill()


@pytest.fixture
async def brokers(redis_url):
    started: list[RedisBroker] = []

    async def make(node_id: str) -> RedisBroker:
        broker = RedisBroker(redis_url, node_id)
        await broker.start()
        started.append(broker)
        return broker

    yield make
    for broker in started:
        await broker.stop()


async def settle(*brokers: RedisBroker) -> None:
    for broker in brokers:
        await broker.flush()


async def test_a_device_connecting_elsewhere_ends_its_older_connection(brokers):
    a, b = await brokers("node-a"), await brokers("node-b")
    here = RecordingNode(("alice", "phone"))
    a.attach(here)
    a.device_online("alice", "phone")
    await settle(a, b)
    there = RecordingNode(("alice", "phone"))
    b.attach(there)
    b.device_online("alice", "phone")  # the phone reconnected to node b; a has not noticed its socket died
    await settle(b, a)
    assert here.seen == [("moved", "alice", "phone")]
    a.device_offline("alice", "phone")  # a closes the older connection: b's entry must survive that
    await settle(a, b)
    c = await brokers("node-c")
    assert c.where[("alice", "phone")] == "node-b"
    assert c.to_device("alice", "phone", {"op": "receipt", "id": 1}) is True
    await settle(c, b)
    assert there.seen == [("device", "alice", "phone", {"op": "receipt", "id": 1})]


async def test_what_reaches_a_node_after_its_device_left_is_handed_back(brokers):
    a, b = await brokers("node-a"), await brokers("node-b")
    holder = RecordingNode(("alice", "laptop"))
    b.attach(holder)
    b.device_online("alice", "laptop")
    await settle(b, a)
    holder.devices.clear()  # the laptop's connection closed; b's announcement has not reached a yet
    assert a.to_device("alice", "laptop", {"op": "receipt", "id": "m1", "status": "delivered"}) is True
    await settle(a, b)
    assert holder.seen == [("undeliverable", "alice", "laptop", {"op": "receipt", "id": "m1",
                                                                  "status": "delivered"})]
    assert b.stats["undelivered"] == 1


async def test_the_devices_of_a_node_that_stopped_beating_are_not_targeted(brokers, redis_url):
    a, b = await brokers("node-a"), await brokers("node-b")
    survivor = RecordingNode()
    a.attach(survivor)
    b.attach(RecordingNode(("alice", "tablet")))
    b.device_online("alice", "tablet")
    await settle(b, a)
    assert a.to_device("alice", "tablet", {"op": "ping"}) is True
    # node b dies without a word: its heartbeat is left to expire (written as already expired)
    client = aioredis.from_url(redis_url)
    await client.zadd(NODES, {"node-b": time.time() - NODE_TTL})
    await client.aclose()
    b._tasks[2].cancel()  # its heartbeat task: a dead node does not beat
    await a._beat()
    assert "node-b" not in a.alive
    assert a.to_device("alice", "tablet", {"op": "receipt"}) is False  # the caller keeps it
    assert a.to_user("alice", {"op": "presence"}) == 0
    # node-a, the lowest-named survivor, speaks for the dead node: its device is gone, its entry removed
    assert ("gone", "alice", "tablet") in survivor.seen
    await settle(a)
    client = aioredis.from_url(redis_url)
    assert await client.hget(WHERE, "alice\x00tablet") is None
    await client.aclose()


async def test_a_lost_pubsub_connection_is_restored_with_the_directory(brokers, redis_url):
    a, b = await brokers("node-a"), await brokers("node-b")
    there = RecordingNode(("alice", "phone"))
    b.attach(there)
    client = aioredis.from_url(redis_url)
    killed = await client.client_kill_filter(_type="pubsub")
    assert killed >= 2
    b.device_online("alice", "phone")  # announced while a's subscription may be down: the reload finds it
    await settle(b, a)  # a's flush needs its subscription back: its barrier comes over it
    assert a.where[("alice", "phone")] == "node-b"
    assert a.to_device("alice", "phone", {"op": "receipt", "id": 7}) is True
    await settle(a, b)
    # Whatever rang while b's subscription was down, b's node looks it up in the store first.
    assert there.seen == [("resubscribed",), ("device", "alice", "phone", {"op": "receipt", "id": 7})]
    assert a.stats["reconnects"] >= 1 and b.stats["reconnects"] >= 1
    await client.aclose()


async def test_a_receipt_for_a_node_that_died_unnoticed_is_handed_back_to_be_kept(brokers):
    a = await brokers("node-a")
    here = RecordingNode()
    a.attach(here)
    # The directory still names a node that stopped without a word (its heartbeat has not expired yet).
    a.where[("alice", "phone")] = "node-gone"
    a.alive.add("node-gone")
    receipt = {"op": "receipt", "id": 7, "status": "delivered"}
    assert a.to_device("alice", "phone", receipt) is True  # published to node-gone's channel...
    await a.flush()
    assert here.seen == [("undeliverable", "alice", "phone", receipt)]  # ...which nobody heard: kept here


async def test_a_live_message_goes_to_the_node_holding_the_device(brokers):
    a, b = await brokers("node-a"), await brokers("node-b")
    there = RecordingNode(("alice", "laptop"))
    b.attach(there)
    b.device_online("alice", "laptop")
    await settle(b, a)
    message = {"id": "m1", "from": "alice-phone", "type": "note", "body": b"\x01", "ts": 5}
    assert a.message_to_device("alice", "laptop", message) is True
    assert a.message_to_device("alice", "tablet", message) is False  # nobody holds it: nothing is kept
    await settle(a, b)
    assert there.seen == [("msg", "alice", "laptop", message)]


async def test_a_message_that_fails_to_apply_does_not_stop_the_reader(brokers):
    a, b = await brokers("node-a"), await brokers("node-b")

    class Failing(RecordingNode):
        def deliver_event(self, channel, payload):
            if payload == "poison":
                raise RuntimeError("a bug in a handler")
            super().deliver_event(channel, payload)

    there = Failing()
    b.attach(there)
    a.publish("state", "poison")
    a.publish("state", "fine")
    await settle(a, b)
    assert there.seen == [("event", "state", "fine")]
    assert b.stats["failed"] == 1


async def test_a_device_taken_on_two_nodes_at_once_is_held_by_exactly_one(brokers):
    a, b = await brokers("node-a"), await brokers("node-b")
    devices = [("alice", f"phone-{n}") for n in range(20)]
    here, there = RecordingNode(*devices), RecordingNode(*devices)
    a.attach(here)
    b.attach(there)
    for user, device in devices:  # both nodes take each device in the same turn: neither has heard the other
        a.device_online(user, device)
        b.device_online(user, device)
    await settle(a, b)
    await settle(b, a)
    for key in devices:
        closed = [node for node, seen in (("node-a", here.seen), ("node-b", there.seen)) if ("moved", *key) in seen]
        assert len(closed) == 1, (key, here.seen, there.seen)  # the older connection closes, never both
        winner = "node-b" if closed == ["node-a"] else "node-a"
        assert a.where[key] == b.where[key] == winner


async def test_the_other_nodes_hear_a_winning_first_ack_claim_once(brokers):
    a, b = await brokers("node-a"), await brokers("node-b")
    here, there = RecordingNode(), RecordingNode()
    a.attach(here)
    b.attach(there)
    assert await a.claim_first_ack("alice", "phone", 17, "laptop", 60_000) == "laptop"
    assert await b.claim_first_ack("alice", "phone", 17, "tablet", 60_000) == "laptop"  # lost: no notice
    await settle(a, b)
    # The claimer's node settles its own copies; the id keeps its type on the way.
    assert here.seen == []
    assert there.seen == [("event", FIRST_ACK_SETTLED, ["alice", "phone", 17, "laptop"])]
