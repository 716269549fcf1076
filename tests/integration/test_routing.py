"""Routing through a real server with real clients: every selector, pick, self, receipts, interop, isolation."""

import asyncio
import json

import msgpack
import picows
import pytest
import websockets
from rawws import masked_frame, open_raw, read_frame

from rccs.client import ClientError


async def assert_nothing_pending(sender, receiver):
    """Prove ``receiver`` got nothing before now: a marker sent now must be the next message it sees."""
    await sender.send({"device": receiver.welcome["device"], "self": True}, "marker", None)
    message = await receiver.next_message(timeout=5)
    assert message.type == "marker", f"unexpected message {message}"


async def test_direct_message_and_delivered_receipt(connect):
    phone = await connect("alice", "alice-phone", type="mobile")
    desktop = await connect("alice", "alice-desktop", type="desktop")
    receipts, message = await asyncio.gather(
        phone.send({"device": "alice-desktop"}, "user_message", {"text": "hi"}, ack=True, id="m-1"),
        desktop.next_message(timeout=5),
    )
    assert message.sender == "alice-phone"
    assert message.type == "user_message"
    assert message.body == {"text": "hi"}
    assert message.id == "m-1"
    assert message.ack is True
    assert message.seq == 1
    assert [(r.status, r.device) for r in receipts] == [("delivered", "alice-desktop")]


async def test_seq_increases_by_one_per_message(connect):
    phone = await connect("alice", "p")
    desktop = await connect("alice", "d")
    for n in range(5):
        await phone.send({"device": "d"}, "n", n)
    seqs = [(await desktop.next_message(timeout=5)).seq for _ in range(5)]
    assert seqs == [1, 2, 3, 4, 5]


async def test_devices_selector_reaches_each_listed_device(connect):
    a = await connect("alice", "a")
    b = await connect("alice", "b")
    c = await connect("alice", "c")
    d = await connect("alice", "d")
    receipts, mb, mc = await asyncio.gather(
        a.send({"devices": ["b", "c", "ghost"]}, "t", 1, ack=True),
        b.next_message(timeout=5),
        c.next_message(timeout=5),
    )
    assert mb.body == mc.body == 1
    assert sorted((r.status, r.device, r.reason) for r in receipts) == [
        ("delivered", "b", None), ("delivered", "c", None), ("failed", "ghost", "offline"),
    ]
    await assert_nothing_pending(a, d)


async def test_all_selector_excludes_sender_unless_self(connect):
    a = await connect("alice", "a")
    b = await connect("alice", "b")
    c = await connect("alice", "c")
    await a.send({"all": True}, "broadcast", "x")
    assert (await b.next_message(timeout=5)).body == "x"
    assert (await c.next_message(timeout=5)).body == "x"
    await assert_nothing_pending(b, a)

    await a.send({"all": True, "self": True}, "broadcast", "y")
    for client in (a, b, c):
        assert (await client.next_message(timeout=5)).body == "y"


async def test_type_selector_pick_all_and_one(connect):
    sender = await connect("alice", "ext", type="extension")
    d1 = await connect("alice", "d1", type="desktop")
    d2 = await connect("alice", "d2", type="desktop")
    phone = await connect("alice", "phone", type="mobile")

    await sender.send({"type": "desktop"}, "task_start", 1)
    assert (await d1.next_message(timeout=5)).body == 1
    assert (await d2.next_message(timeout=5)).body == 1
    await assert_nothing_pending(sender, phone)

    # pick one prefers the most recently active device: make d1 active, then d2.
    await d1.ping()
    receipts, message = await asyncio.gather(
        sender.send({"type": "desktop", "pick": "one"}, "task_start", 2, ack=True),
        d1.next_message(timeout=5),
    )
    assert [r.device for r in receipts] == ["d1"]
    assert message.body == 2
    await d2.ping()
    receipts, message = await asyncio.gather(
        sender.send({"type": "desktop", "pick": "one"}, "task_start", 3, ack=True),
        d2.next_message(timeout=5),
    )
    assert [r.device for r in receipts] == ["d2"]
    await assert_nothing_pending(sender, d1)


async def test_capability_selector_pick_all_and_one(connect):
    sender = await connect("alice", "web", type="web")
    sync1 = await connect("alice", "s1", capabilities=["file_sync", "notifications"])
    sync2 = await connect("alice", "s2", type="mobile", capabilities=["file_sync"])
    plain = await connect("alice", "plain", capabilities=["notifications"])

    await sender.send({"capability": "file_sync"}, "file_sync", "f")
    assert (await sync1.next_message(timeout=5)).body == "f"
    assert (await sync2.next_message(timeout=5)).body == "f"
    await assert_nothing_pending(sender, plain)

    await sync2.ping()
    receipts, message = await asyncio.gather(
        sender.send({"capability": "file_sync", "pick": "one"}, "file_sync", "g", ack=True),
        sync2.next_message(timeout=5),
    )
    assert message.body == "g"
    assert [(r.status, r.device) for r in receipts] == [("delivered", "s2")]
    await assert_nothing_pending(sender, sync1)


async def test_devices_selector_pick_one_prefers_most_recent(connect):
    sender = await connect("alice", "sender")
    a = await connect("alice", "a")
    b = await connect("alice", "b")
    await b.ping()
    await a.ping()
    receipts, _message = await asyncio.gather(
        sender.send({"devices": ["b", "a"], "pick": "one"}, "t", 1, ack=True),
        a.next_message(timeout=5),
    )
    assert [r.device for r in receipts] == ["a"]
    await assert_nothing_pending(sender, b)


async def test_no_route_and_offline_receipts(connect):
    a = await connect("alice", "a")
    receipts = await a.send({"capability": "teleport"}, "t", None, ack=True)
    assert [(r.status, r.reason, r.device) for r in receipts] == [("failed", "no_route", None)]
    receipts = await a.send({"device": "never-seen"}, "t", None, ack=True)
    assert [(r.status, r.reason, r.device) for r in receipts] == [("failed", "offline", "never-seen")]
    # Without ack the sender learns that nothing was reached from an error carrying its id.
    await a.send({"device": "never-seen"}, "t", None, id="lost-1")
    error = await asyncio.wait_for(a.errors.get(), 5)
    assert error.code == "no_route"


async def test_receiver_disconnect_before_ack_queues_the_message(connect):
    a = await connect("alice", "a")
    b = await connect("alice", "b", auto_ack=False)
    send = asyncio.ensure_future(a.send({"device": "b"}, "t", 1, ack=True))
    message = await b.next_message(timeout=5)
    assert message.ack is True
    await b.close()
    receipts = await send
    assert [(r.status, r.device) for r in receipts] == [("queued", "b")]  # kept in b's inbox
    again = await connect("alice", "b")
    redelivered = await again.next_message(timeout=5)
    assert (redelivered.id, redelivered.body) == (message.id, 1)
    assert (await asyncio.wait_for(a.receipts.get(), 5)).status == "delivered"


async def test_manual_ack_with_list_of_seqs(connect):
    a = await connect("alice", "a")
    b = await connect("alice", "b", auto_ack=False)
    first = asyncio.ensure_future(a.send({"device": "b"}, "t", 1, ack=True))
    second = asyncio.ensure_future(a.send({"device": "b"}, "t", 2, ack=True))
    m1 = await b.next_message(timeout=5)
    m2 = await b.next_message(timeout=5)
    await b.ack([m1.seq, m2.seq])
    assert [r.status for r in await first] == ["delivered"]
    assert [r.status for r in await second] == ["delivered"]


async def test_cross_user_isolation(connect):
    alice = await connect("alice", "alice-phone")
    alice2 = await connect("alice", "alice-laptop")
    bob = await connect("bob", "bob-phone")
    with pytest.raises(ClientError) as info:
        await alice.send({"device": "bob-phone"}, "t", 1, ack=True)
    assert info.value.code == "forbidden"
    with pytest.raises(ClientError) as info:
        await alice.send({"devices": ["alice-laptop", "bob-phone"]}, "t", 1, ack=True)
    assert info.value.code == "forbidden"
    # Broadcasts, types and capabilities never cross users.
    await alice.send({"all": True}, "t", "for alice only")
    await alice.send({"type": "desktop"}, "t", "for alice only")
    assert (await alice2.next_message(timeout=5)).body == "for alice only"
    assert (await alice2.next_message(timeout=5)).body == "for alice only"
    await assert_nothing_pending(bob, bob)
    # The refused sends reached nobody, so alice2's next message is the marker.
    await assert_nothing_pending(alice, alice2)


async def test_json_and_msgpack_devices_interoperate(connect):
    packer = await connect("alice", "packer", encoding="msgpack")
    jsoner = await connect("alice", "jsoner", encoding="json")
    body = {"text": "héllo", "n": 2**40, "f": 1.5, "raw": b"\x00\xff", "list": [None, True], 7: "int key",
            "ext": msgpack.ExtType(5, b"ab")}
    receipts, message = await asyncio.gather(
        packer.send({"device": "jsoner"}, "t", body, ack=True),
        jsoner.next_message(timeout=5),
    )
    assert receipts[0].status == "delivered"
    assert message.body == {"text": "héllo", "n": 2**40, "f": 1.5, "raw": "AP8=", "list": [None, True],
                            "7": "int key", "ext": {"$ext": 5, "data": "YWI="}}

    receipts, message = await asyncio.gather(
        jsoner.send({"device": "packer"}, "t", {"a": [1, 2.5, "x", None, False]}, ack=True),
        packer.next_message(timeout=5),
    )
    assert receipts[0].status == "delivered"
    assert message.body == {"a": [1, 2.5, "x", None, False]}


async def test_msgpack_body_bytes_are_forwarded_untouched(server, connect):
    sender = await connect("alice", "a")
    async with websockets.connect(server.ws_url) as raw:
        hello = {"op": "hello", "token": server.issue_token("alice", "raw"), "device": {"type": "web"}}
        await raw.send(msgpack.packb(hello))
        assert msgpack.unpackb(await raw.recv())["op"] == "welcome"
        # 1 as a uint16 and 1.5 as a float32: a re-encoding would shorten both.
        body = b"\x92\xcd\x00\x01\xca\x3f\xc0\x00\x00"
        frame = (b"\x85\xa2op\xa4send\xa2id\xa1x\xa2to\x81\xa6device\xa3raw\xa4type\xa1t\xa4body" + body)
        sender._transport.send(picows.WSMsgType.BINARY, frame)
        received = await raw.recv()
        assert b"\xa4body" + body in received
        assert msgpack.unpackb(received)["body"] == [1, 1.5]


async def test_json_body_with_huge_int_is_unconvertible_for_msgpack_receiver(connect):
    jsoner = await connect("alice", "j", encoding="json")
    await connect("alice", "m", encoding="msgpack")
    receipts = await jsoner.send({"device": "m"}, "t", 2**70, ack=True)
    assert [(r.status, r.reason) for r in receipts] == [("failed", "unconvertible")]


async def test_same_device_reconnecting_replaces_old_connection(server, connect):
    old = await connect("alice", "dup", reconnect=True)
    new = await connect("alice", "dup")
    closed = await asyncio.wait_for(old.closed, 5)
    assert closed.code == 4409
    other = await connect("alice", "other")
    await other.send({"device": "dup"}, "t", "to the new one")
    assert (await new.next_message(timeout=5)).body == "to the new one"


@pytest.mark.parametrize("msg_id", [0, 2**64 - 1, -(2**63), "s" * 128])
async def test_direct_send_with_boundary_ids(connect, msg_id):
    a = await connect("alice", "a")
    b = await connect("alice", "b")
    receipts, message = await asyncio.gather(
        a.send({"device": "b"}, "t", [msg_id], ack=True, id=msg_id), b.next_message(timeout=5)
    )
    assert message.id == msg_id and message.body == [msg_id]
    assert [(r.id, r.status) for r in receipts] == [(msg_id, "delivered")]


async def test_frames_queued_before_a_peer_close_are_sent_before_the_reply(server, connect):
    await connect("alice", "target")
    reader, writer = await open_raw(server.ws_url)
    hello = {"op": "hello", "token": server.issue_token("alice", "closer"), "device": {"type": "web"}}
    writer.write(masked_frame(msgpack.packb(hello)))
    assert msgpack.unpackb((await read_frame(reader))[1])["op"] == "welcome"
    send = {"op": "send", "id": "last", "to": {"device": "target"}, "type": "t", "ack": True}
    writer.write(masked_frame(msgpack.packb(send)) + masked_frame(b"", opcode=0x8))  # one write, one read
    opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
    assert opcode == 0x2 and msgpack.unpackb(payload)["status"] == "routed"
    opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
    assert opcode == 0x8
    assert int.from_bytes(payload[:2], "big") == 1000  # an empty close is answered with 1000, never 1005
    writer.close()


async def test_reconnecting_device_gets_welcome_before_receipts_of_its_old_connection(server, connect):
    old = await connect("alice", "dup", auto_ack=False, reconnect=False)
    await old.send({"device": "dup", "self": True}, "note", 1)
    assert (await old.next_message(timeout=5)).body == 1  # pending on the old connection, never acked
    pending_self = asyncio.ensure_future(old.send({"device": "dup", "self": True}, "note", 2, ack=True, id="mine"))
    assert (await old.next_message(timeout=5)).body == 2
    async with websockets.connect(server.ws_url) as new:
        await new.send(json.dumps({"op": "hello", "token": server.issue_token("alice", "dup"),
                                   "device": {"type": "desktop"}}))
        assert json.loads(await asyncio.wait_for(new.recv(), 5))["op"] == "welcome"
        receipt = json.loads(await asyncio.wait_for(new.recv(), 5))
        assert (receipt["op"], receipt["id"], receipt["status"]) == ("receipt", "mine", "queued")
    pending_self.cancel()
