"""The Broker contract (rccs/broker/base.py), written once and run against every engine.

An engine passes when every test here passes with it. The nodes attached here are plain recorders of
what the broker hands them (the broker's other side, ``contracts.BrokerNode``); each holds some
devices, as a node holds connections. ``await broker.flush()`` is the barrier: once it returns, what was
published before has arrived (at once for memory; after a round trip for an engine with a server).
"""

from typing import Any

import pytest

from rccs.broker import Broker, MemoryBroker, open_broker
from rccs.contracts import BrokerNode

from .recording import RecordingNode

ENGINES = {"memory": MemoryBroker}


@pytest.fixture(params=sorted(ENGINES))
async def broker(request):
    engine: Broker = ENGINES[request.param]()
    await engine.start()
    yield engine
    await engine.stop()


def _attach(broker: Broker, *nodes: RecordingNode) -> None:
    for node in nodes:
        checked: BrokerNode = node  # the recorder is a BrokerNode (mypy checks the shape)
        broker.attach(checked)


async def test_to_device_reaches_only_the_node_holding_the_device(broker):
    a, b = RecordingNode(("alice", "phone")), RecordingNode(("alice", "laptop"))
    _attach(broker, a, b)
    assert broker.to_device("alice", "laptop", {"op": "handoff.offer"}) is True
    await broker.flush()
    assert a.seen == [] and b.seen == [("device", "alice", "laptop", {"op": "handoff.offer"})]


async def test_to_device_without_a_holder_is_false_so_the_caller_keeps_it(broker):
    a = RecordingNode(("alice", "phone"))
    _attach(broker, a)
    assert broker.to_device("alice", "tablet", {"op": "receipt"}) is False
    assert broker.to_device("bob", "phone", {"op": "receipt"}) is False  # another user's device of that name
    await broker.flush()
    assert a.seen == []


async def test_to_user_reaches_every_device_of_the_user_on_every_node_but_the_excluded_one(broker):
    a = RecordingNode(("alice", "phone"), ("bob", "phone-b"))
    b = RecordingNode(("alice", "laptop"), ("alice", "web"))
    _attach(broker, a, b)
    envelope = {"op": "presence", "device": "web", "status": "online"}
    assert broker.to_user("alice", envelope, exclude="web") == 2
    await broker.flush()
    assert a.seen == [("device", "alice", "phone", envelope)]
    assert b.seen == [("device", "alice", "laptop", envelope)]
    assert broker.to_user("carol", {"op": "presence"}) == 0


async def test_revocations_reach_every_node(broker):
    a, b = RecordingNode(), RecordingNode()
    _attach(broker, a, b)
    broker.revoke_device("phone", 1000)
    broker.revoke_session("s-1", 1001)
    await broker.flush()
    for node in (a, b):
        assert node.seen == [("revoked device", "phone", 1000), ("revoked session", "s-1", 1001)]


async def test_one_publishers_events_arrive_in_publishing_order(broker):
    a = RecordingNode(("alice", "phone"))
    _attach(broker, a)
    for rev in range(1, 51):
        broker.publish("state", {"user": "alice", "rev": rev})
        if rev % 10 == 0:
            broker.to_device("alice", "phone", {"op": "marker", "rev": rev})
    await broker.flush()
    order = [item[2]["rev"] if item[0] == "event" else ("marker", item[3]["rev"]) for item in a.seen]
    expected: list[Any] = []
    for rev in range(1, 51):
        expected.append(rev)
        if rev % 10 == 0:
            expected.append(("marker", rev))
    assert order == expected


async def test_a_detached_node_gets_nothing_more(broker):
    a, b = RecordingNode(("alice", "phone")), RecordingNode(("alice", "laptop"))
    _attach(broker, a, b)
    broker.detach(b)
    assert broker.to_user("alice", {"op": "presence"}) == 1
    assert broker.to_device("alice", "laptop", {"op": "receipt"}) is False
    broker.publish("state", {"rev": 1})
    broker.revoke_device("laptop", 5)
    await broker.flush()
    assert b.seen == []
    assert a.seen == [("device", "alice", "phone", {"op": "presence"}), ("event", "state", {"rev": 1}),
                      ("revoked device", "laptop", 5)]


async def test_attaching_twice_delivers_once(broker):
    a = RecordingNode(("alice", "phone"))
    _attach(broker, a, a)
    assert broker.to_user("alice", {"op": "presence"}) == 1
    await broker.flush()
    assert len(a.seen) == 1


def test_open_broker_names_the_engines_it_has():
    assert isinstance(open_broker("memory"), MemoryBroker)
    with pytest.raises(ValueError, match="memory"):
        open_broker("redis://127.0.0.1:6379/0")
