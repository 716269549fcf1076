"""first_ack between devices on different nodes (issue 13): the first ack anywhere wins, decided in Redis;
every other copy is taken back on whichever node holds it. What the sender and the devices see is the
single-node contract of protocol.md 4.2 (`first_ack`) and 5.6 (`retract`)."""

import asyncio

import pytest
from clusters import DEVICES, running_cluster

from rccs.client import ClientError

DESK = "alice-desk"  # a fourth device, so that the sender's node holds a copy too


@pytest.fixture
async def cluster(tmp_path):
    async with running_cluster(tmp_path, devices=(*DEVICES, DESK)) as running:
        yield running


async def until_online(watcher, devices: set[str]) -> None:
    """Once ``watcher`` heard these devices come online, its node knows which nodes hold them."""
    waiting = set(devices)
    while waiting:
        event = await watcher.next_event("presence", timeout=10)
        if event["status"] == "online":
            waiting.discard(event["device"])


async def test_the_first_ack_on_one_node_retracts_the_copies_on_the_others(cluster):
    phone = await cluster.connect(0, "alice", "alice-phone")
    desk = await cluster.connect(0, "alice", DESK, auto_ack=False)
    laptop = await cluster.connect(1, "alice", "alice-laptop", auto_ack=False)
    tablet = await cluster.connect(2, "alice", "alice-tablet", auto_ack=False)
    await until_online(phone, {DESK, "alice-laptop", "alice-tablet"})
    # The send is answered once Redis has its id: what the phone sends next waits for it, so a live message
    # sent after it reaches the desk after it too.
    sending = asyncio.gather(
        phone.send({"all": True}, "q", "who?", ack=True, first_ack=True, id="fa", timeout=20),
        phone.send({"device": DESK}, "note", "sent after"))
    on_desk, on_laptop, on_tablet = await asyncio.gather(
        desk.next_message(timeout=10), laptop.next_message(timeout=10), tablet.next_message(timeout=10))
    assert on_desk.id == on_laptop.id == on_tablet.id == "fa"
    await laptop.ack(on_laptop.seq)  # on node 1: neither the sender's node nor the other copy's
    retracted = await asyncio.gather(desk.next_event("retract", timeout=10), tablet.next_event("retract", timeout=10))
    assert [(event["id"], event["seq"]) for event in retracted] == [("fa", on_desk.seq), ("fa", on_tablet.seq)]
    receipts, _ = await sending
    assert (await desk.next_message(timeout=10)).body == "sent after"
    assert sorted((r.status, r.device) for r in receipts) == [
        ("delivered", "alice-laptop"), ("retracted", DESK), ("retracted", "alice-tablet")]
    # A late ack of a copy that was taken back is ignored: no second `delivered`. The desk's node has handled
    # the ack once the desk's ping is answered; a receipt written to the phone before that precedes its pong.
    await desk.ack(on_desk.seq)
    await desk.ping()
    await phone.ping()
    assert phone.receipts.empty()


async def test_a_first_ack_id_sent_again_through_another_node_is_a_repeat(cluster):
    phone = await cluster.connect(0, "alice", "alice-phone", reconnect=False)
    laptop = await cluster.connect(1, "alice", "alice-laptop")
    await until_online(phone, {"alice-laptop"})
    receipts, taken = await asyncio.gather(
        phone.send({"all": True}, "q", "who?", ack=True, first_ack=True, id="fa", timeout=20),
        laptop.next_message(timeout=10))
    assert taken.id == "fa" and [(r.status, r.device) for r in receipts] == [("delivered", "alice-laptop")]
    await phone.close()
    phone = await cluster.connect(2, "alice", "alice-phone")  # not knowing whether the first one counted
    again = await phone.send({"all": True}, "q", "who?", ack=True, first_ack=True, id="fa", timeout=20)
    assert [r.status for r in again] == ["duplicate"]
    with pytest.raises(ClientError) as refused:
        await phone.send({"all": True}, "q", "what?", ack=True, first_ack=True, id="fa", timeout=20)
    assert refused.value.code == "duplicate_id"
    # Nothing was written again: the next message the laptop gets is the one sent after.
    await phone.send({"device": "alice-laptop"}, "q", "next", ack=True, id="after", timeout=20)
    assert (await laptop.next_message(timeout=10)).id == "after"


async def test_two_acks_at_once_on_two_nodes_make_one_delivered(cluster):
    phone = await cluster.connect(0, "alice", "alice-phone")
    laptop = await cluster.connect(1, "alice", "alice-laptop")  # both ack as soon as they take the copy
    tablet = await cluster.connect(2, "alice", "alice-tablet")
    await until_online(phone, {"alice-laptop", "alice-tablet"})
    for n in range(3):
        msg_id = f"race-{n}"
        receipts, *_ = await asyncio.gather(
            phone.send({"devices": ["alice-laptop", "alice-tablet"]}, "q", n, ack=True, first_ack=True, id=msg_id,
                       timeout=20),
            laptop.next_message(timeout=10), tablet.next_message(timeout=10))
        statuses = sorted(r.status for r in receipts)
        assert statuses == ["delivered", "retracted"], receipts
        loser = next(r.device for r in receipts if r.status == "retracted")
        # The loser acked too (it may have processed the message), yet it is told it was taken back.
        retract = await (laptop if loser == "alice-laptop" else tablet).next_event("retract", timeout=10)
        assert retract["id"] == msg_id
