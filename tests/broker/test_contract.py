"""The Broker contract (rccs/broker/base.py), written once and run against every engine.

A cluster here is a list of brokers, one per node: the memory engine is one process, so its nodes share
one broker; the Redis engine gives every node its own broker on one (throw-away) redis-server. The nodes
are recorders of what the broker hands them (the broker's other side, ``contracts.BrokerNode``), each
holding some devices as a node holds connections. ``settle`` is the barrier: each broker's ``flush``, in
turn, so that everything published before has been processed by every node.
"""

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from rccs.broker import Broker, MemoryBroker, open_broker
from rccs.broker.redis import RedisBroker
from rccs.contracts import BrokerNode
from rccs.testing import RedisServer

from .recording import RecordingNode

Cluster = Callable[[int], Awaitable[list[Broker]]]


@pytest.fixture(params=["memory", "redis"])
async def cluster(request, tmp_path):
    started: list[Broker] = []
    redis_server: RedisServer | None = None

    async def make(count: int) -> list[Broker]:
        nonlocal redis_server
        if request.param == "memory":
            shared = MemoryBroker()
            await shared.start()
            started.append(shared)
            return [shared] * count
        if redis_server is None:
            redis_server = RedisServer(tmp_path / "redis")
            await redis_server.start()
        brokers: list[Broker] = [RedisBroker(redis_server.url, f"node-{n}") for n in range(count)]
        for broker in brokers:
            await broker.start()
            started.append(broker)
        return brokers

    yield make
    for broker in started:
        await broker.stop()
    if redis_server is not None:
        redis_server.kill()


async def settle(brokers: list[Broker]) -> None:
    for broker in dict.fromkeys(brokers):
        await broker.flush()


async def attach(broker: Broker, node: RecordingNode) -> None:
    checked: BrokerNode = node  # the recorder is a BrokerNode (mypy checks the shape)
    broker.attach(checked)
    for user, device in sorted(node.devices):
        broker.device_online(user, device)


async def test_to_device_reaches_only_the_node_holding_the_device(cluster: Cluster):
    brokers = await cluster(2)
    a, b = RecordingNode(("alice", "phone")), RecordingNode(("alice", "laptop"))
    await attach(brokers[0], a)
    await attach(brokers[1], b)
    await settle(brokers)
    assert brokers[0].to_device("alice", "laptop", {"op": "handoff.offer"}) is True
    await settle(brokers)
    assert a.seen == [] and b.seen == [("device", "alice", "laptop", {"op": "handoff.offer"})]


async def test_to_device_without_a_holder_is_false_so_the_caller_keeps_it(cluster: Cluster):
    brokers = await cluster(2)
    a = RecordingNode(("alice", "phone"))
    await attach(brokers[0], a)
    await settle(brokers)
    assert brokers[1].to_device("alice", "tablet", {"op": "receipt"}) is False
    assert brokers[1].to_device("bob", "phone", {"op": "receipt"}) is False  # another user's device of that name
    await settle(brokers)
    assert a.seen == []


async def test_to_user_reaches_every_device_of_the_user_on_every_node_but_the_excluded_one(cluster: Cluster):
    brokers = await cluster(2)
    a = RecordingNode(("alice", "phone"), ("bob", "phone-b"))
    b = RecordingNode(("alice", "laptop"), ("alice", "web"))
    await attach(brokers[0], a)
    await attach(brokers[1], b)
    await settle(brokers)
    envelope = {"op": "presence", "device": "web", "status": "online"}
    assert brokers[1].to_user("alice", envelope, exclude="web") == 2
    await settle(brokers)
    assert a.seen == [("device", "alice", "phone", envelope)]
    assert b.seen == [("device", "alice", "laptop", envelope)]
    assert brokers[0].to_user("carol", {"op": "presence"}) == 0


async def test_revocations_reach_every_node(cluster: Cluster):
    brokers = await cluster(2)
    a, b = RecordingNode(), RecordingNode()
    await attach(brokers[0], a)
    await attach(brokers[1], b)
    brokers[0].revoke_device("phone", 1000)
    brokers[0].revoke_session("s-1", 1001)
    await settle(brokers)
    for node in (a, b):
        assert node.seen == [("revoked device", "phone", 1000), ("revoked session", "s-1", 1001)]


async def test_to_node_reaches_only_that_node_and_is_false_for_no_other_live_node(cluster: Cluster):
    brokers = await cluster(3)
    nodes = [RecordingNode((f"user-{n}", "phone")) for n in range(3)]  # announced: each is known alive
    for broker, node in zip(brokers, nodes, strict=True):
        await attach(broker, node)
    await settle(brokers)
    if isinstance(brokers[0], RedisBroker):  # several nodes: the handoff's coordinator sends a party's node a step
        assert brokers[0].to_node("node-2", "tasks.handoff", ["watch", "h1"]) is True
        await settle(brokers)
        assert [node.seen for node in nodes] == [[], [], [("event", "tasks.handoff", ["watch", "h1"])]]
    assert brokers[0].to_node("node-0", "tasks.handoff", ["watch"]) is False  # not another node
    assert brokers[0].to_node("node-9", "tasks.handoff", ["watch"]) is False  # no such live node
    await settle(brokers)
    assert all(item[0] != "event" or item[2] == ["watch", "h1"] for node in nodes for item in node.seen)


async def test_one_publishers_messages_arrive_in_publishing_order(cluster: Cluster):
    brokers = await cluster(2)
    here, there = RecordingNode(), RecordingNode(("alice", "phone"))
    await attach(brokers[0], here)
    await attach(brokers[1], there)
    await settle(brokers)
    for rev in range(1, 51):
        brokers[0].publish("state", {"user": "alice", "rev": rev})
        if rev % 10 == 0:
            brokers[0].to_device("alice", "phone", {"op": "marker", "rev": rev})
    await settle(brokers)
    order = [item[2]["rev"] if item[0] == "event" else ("marker", item[3]["rev"]) for item in there.seen]
    expected: list[Any] = []
    for rev in range(1, 51):
        expected.append(rev)
        if rev % 10 == 0:
            expected.append(("marker", rev))
    assert order == expected
    assert [item[2]["rev"] for item in here.seen] == list(range(1, 51))


async def test_a_node_that_left_gets_nothing_more(cluster: Cluster):
    brokers = await cluster(2)
    a, b = RecordingNode(("alice", "phone")), RecordingNode(("alice", "laptop"))
    await attach(brokers[0], a)
    await attach(brokers[1], b)
    await settle(brokers)
    brokers[1].device_offline("alice", "laptop")
    brokers[1].detach(b)
    await settle(brokers)
    assert brokers[0].to_user("alice", {"op": "presence"}) == 1
    assert brokers[0].to_device("alice", "laptop", {"op": "receipt"}) is False
    brokers[0].publish("state", {"rev": 1})
    brokers[0].revoke_device("laptop", 5)
    await settle(brokers)
    assert b.seen == []
    assert a.seen == [("device", "alice", "phone", {"op": "presence"}), ("event", "state", {"rev": 1}),
                      ("revoked device", "laptop", 5)]


async def test_attaching_twice_delivers_once(cluster: Cluster):
    (broker,) = await cluster(1)
    a = RecordingNode(("alice", "phone"))
    await attach(broker, a)
    await attach(broker, a)
    assert broker.to_user("alice", {"op": "presence"}) == 1
    await settle([broker])
    assert len(a.seen) == 1


async def test_the_first_claim_of_a_first_ack_message_wins_on_every_node(cluster: Cluster):
    brokers = await cluster(2)
    assert await brokers[1].claim_first_ack("alice", "phone", "m-1", None, 60_000) is None  # a look: nobody yet
    assert await brokers[0].claim_first_ack("alice", "phone", "m-1", "laptop", 60_000) == "laptop"
    assert await brokers[1].claim_first_ack("alice", "phone", "m-1", "tablet", 60_000) == "laptop"  # too late
    assert await brokers[1].claim_first_ack("alice", "phone", "m-1", None, 60_000) == "laptop"
    assert await brokers[0].claim_first_ack("alice", "phone", "m-1", "laptop", 60_000) == "laptop"  # asked again
    # Another message: another sender, another id, an id of another type.
    assert await brokers[1].claim_first_ack("alice", "desk", "m-1", "tablet", 60_000) == "tablet"
    assert await brokers[1].claim_first_ack("alice", "phone", "m-2", "tablet", 60_000) == "tablet"
    assert await brokers[1].claim_first_ack("alice", "phone", 7, "tablet", 60_000) == "tablet"
    assert await brokers[0].claim_first_ack("alice", "phone", "7", "laptop", 60_000) == "laptop"


async def test_a_first_ack_claim_is_forgotten_after_its_time(cluster: Cluster):
    brokers = await cluster(2)
    assert await brokers[0].claim_first_ack("alice", "phone", "m-1", "laptop", 1) == "laptop"
    deadline = time.monotonic() + 5
    while await brokers[1].claim_first_ack("alice", "phone", "m-1", None, 1) is not None:
        assert time.monotonic() < deadline, "the claim was kept past its time"
        await asyncio.sleep(0.01)  # polling the claim's expiry: the interval between looks, not synchronisation


def test_open_broker_names_the_engines_it_has():
    assert isinstance(open_broker("memory"), MemoryBroker)
    assert isinstance(open_broker("redis://127.0.0.1:6379/0", "n1"), RedisBroker)
    with pytest.raises(ValueError, match="memory"):
        open_broker("kafka://127.0.0.1")
