"""What a device sees when part of a cluster dies: a node SIGKILLed holding unacked messages, Redis
SIGKILLed and restarted. The failure table of docs/operations.md ("Several nodes") is this file's claim."""

import asyncio
import contextlib

import pytest

from rccs.client import ClientError, ConnectionClosed


async def test_a_killed_nodes_unacked_messages_reach_its_devices_on_another_node(cluster):
    # Both devices on node 1: the message never crosses nodes, yet it must survive node 1's death.
    phone = await cluster.connect(1, "alice", "alice-phone", reconnect=False)
    laptop = await cluster.connect(1, "alice", "alice-laptop", reconnect=False, auto_ack=False)
    sending = asyncio.create_task(
        phone.send({"device": "alice-laptop"}, "note", {"n": 1}, ack=True, id="m-1", timeout=60))
    held = await laptop.next_message(timeout=10)  # written to the laptop, not acked
    assert (held.id, held.ack) == ("m-1", True)
    cluster.nodes[1].kill()  # SIGKILL while the laptop holds the message unacked
    await asyncio.wait_for(laptop.closed, 10)
    with contextlib.suppress(ConnectionClosed):
        await sending  # the phone's connection died with its node
    # The laptop reconnects to another node: the message comes again with its id (at least once)...
    laptop_again = await cluster.connect(2, "alice", "alice-laptop")
    message = await laptop_again.next_message(timeout=20)
    assert (message.id, message.sender, message.body) == ("m-1", "alice-phone", {"n": 1})
    # ... and the phone, reconnected to a third node, hears that it was delivered.
    phone_again = await cluster.connect(0, "alice", "alice-phone")
    while (receipt := await asyncio.wait_for(phone_again.receipts.get(), 20)).status != "delivered":
        assert receipt.status == "accepted"  # kept for the phone if its node died before sending it
    assert (receipt.id, receipt.device) == ("m-1", "alice-laptop")


async def test_while_redis_is_down_sends_are_refused_retryably_and_nothing_accepted_is_lost(cluster):
    phone = await cluster.connect(0, "alice", "alice-phone")
    # Accepted for the offline laptop before Redis dies: on disk (append-only file, fsync always).
    receipts = await phone.send({"device": "alice-laptop"}, "note", {"n": 1}, ack=True, id="before", timeout=10)
    assert [(r.status, r.device) for r in receipts] == [("queued", "alice-laptop")]
    port = cluster.redis.port
    cluster.redis.kill()
    await cluster.until_readiness(503)  # a load balancer stops sending devices to the nodes
    with pytest.raises(ClientError) as refused:
        await phone.send({"device": "alice-tablet"}, "note", {"n": 2}, ack=True, id="during", timeout=10)
    assert refused.value.code == "unavailable" and refused.value.details["retry_after"] > 0
    with pytest.raises(ClientError) as refused:  # any request that needs the store
        await phone.state_patch("user/draft", {"line": 1})
    assert refused.value.code == "unavailable"
    # A device new to the cluster is welcomed only once its record is in Redis (any node may send to it then).
    with pytest.raises(ConnectionClosed) as closed:
        await cluster.connect(1, "alice", "alice-watch", reconnect=False)
    assert closed.value.code == 1013
    await cluster.redis.start(port=port)
    await cluster.until_readiness(200)  # every node recovers by itself, without a restart
    watch = await cluster.connect(1, "alice", "alice-watch")  # written now, at its next hello
    receipts, message = await asyncio.gather(
        phone.send({"device": "alice-watch"}, "note", {"n": 3}, ack=True, id="new", timeout=20),
        watch.next_message(timeout=20))
    assert [(r.status, r.device) for r in receipts] == [("queued", "alice-watch")]
    assert (message.id, message.body) == ("new", {"n": 3})
    laptop = await cluster.connect(1, "alice", "alice-laptop")
    message = await laptop.next_message(timeout=20)
    assert (message.id, message.body) == ("before", {"n": 1})
    # The refused send, sent again with the same id, is taken now: it was never remembered.
    tablet = await cluster.connect(2, "alice", "alice-tablet")
    receipts = await phone.send({"device": "alice-tablet"}, "note", {"n": 2}, ack=True, id="during", timeout=20)
    taken = await tablet.next_message(timeout=20)
    assert (taken.id, taken.body) == ("during", {"n": 2})
    assert receipts[-1].status in ("queued", "delivered")


async def test_a_session_dropped_with_its_node_is_resumed_on_another_node(cluster):
    phone = await cluster.connect(2, "alice", "alice-phone")
    laptop = await cluster.connect(0, "alice", "alice-laptop")
    session = laptop.session_id
    receipts = await phone.send({"device": "alice-laptop"}, "note", {"n": 1}, ack=True, id="m-1", timeout=10)
    assert [r.status for r in receipts] == ["queued"]
    await cluster.until_stored(session)  # nodes write session records within a second (FLUSH_INTERVAL)
    # The laptop's application has not taken the message yet when its node dies; its client reconnects
    # through the load balancer, which now sends it to node 1, asking to resume its session there.
    laptop.url = cluster.nodes[1].ws_url
    laptop.reconnected.clear()
    cluster.nodes[0].kill()
    await asyncio.wait_for(laptop.reconnected.wait(), 20)
    assert laptop.welcome["resumed"] is True and laptop.session_id == session
    message = await laptop.next_message(timeout=10)  # written again on the resumed session, taken once
    assert (message.id, message.body) == ("m-1", {"n": 1})
    while (receipt := await asyncio.wait_for(phone.receipts.get(), 10)).status != "delivered":
        pass
    assert (receipt.id, receipt.device) == ("m-1", "alice-laptop")
