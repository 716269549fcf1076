"""The Python client SDK against a real server: reconnect, callbacks, refusal."""

import asyncio

import pytest

from rccs.client import Client, ConnectionClosed
from rccs.errors import CloseCode


async def test_client_reconnects_after_the_server_drops_it(server, connect):
    phone = await connect("alice", "phone", backoff_initial=0.01)
    desktop = await connect("alice", "desktop")
    first_session = phone.welcome["session"]
    server.hub.online("alice", "phone").close(CloseCode.INTERNAL_ERROR, "injected")
    await asyncio.wait_for(phone.reconnected.wait(), 5)
    assert phone.reconnects == 1
    assert phone.welcome["session"] == first_session and phone.welcome["resumed"] is True
    receipts, message = await asyncio.gather(
        desktop.send({"device": "phone"}, "t", "after reconnect", ack=True), phone.next_message(timeout=5)
    )
    assert message.body == "after reconnect"
    assert receipts[0].status == "delivered"


async def test_on_message_callback_acks_after_it_returns(server, connect):
    handling, release = asyncio.Event(), asyncio.Event()
    seen = []

    async def handle(message):
        seen.append(message.body)
        handling.set()
        await release.wait()

    receiver = await connect("alice", "cb", on_message=handle)
    sender = await connect("alice", "sender")
    sending = asyncio.ensure_future(sender.send({"device": "cb"}, "t", {"k": 1}, ack=True))
    await asyncio.wait_for(handling.wait(), 5)
    # An ack written before the callback returned would reach the server ahead of this ping.
    await receiver.ping()
    assert len(server.hub.online("alice", "cb").pending) == 1, "acked while the callback was still running"
    assert not sending.done()
    release.set()
    receipts = await asyncio.wait_for(sending, 5)
    assert receipts[0].status == "delivered"
    assert seen == [{"k": 1}]
    assert not server.hub.online("alice", "cb").pending


async def test_refused_token_raises_connection_closed(server):
    client = Client(server.ws_url, "garbage", {"type": "web"})
    with pytest.raises(ConnectionClosed) as info:
        await client.connect()
    assert info.value.code == 4401


async def test_messages_iterator_ends_when_closed(server, connect):
    a = await connect("alice", "a")
    b = await connect("alice", "b")
    await a.send({"device": "b"}, "t", 1)
    await a.send({"device": "b"}, "t", 2)
    received = []
    async for message in b.messages():
        received.append(message.body)
        if len(received) == 2:
            await b.close()
    assert received == [1, 2]


async def test_a_client_made_outside_a_running_event_loop_works_in_the_loop_it_is_used_in(server):
    # Made where no loop runs (as in synchronous set-up code before asyncio.run), then used in this one.
    phone = await asyncio.to_thread(Client, server.ws_url, server.issue_token("alice", "phone"), {"type": "mobile"},
                                    reconnect=False)
    desktop = await asyncio.to_thread(Client, server.ws_url, server.issue_token("alice", "desktop"),
                                      {"type": "desktop"}, reconnect=False)
    assert not phone.closed.done()
    async with phone, desktop:
        receipts, message = await asyncio.gather(
            desktop.send({"device": "phone"}, "note", {"text": "hi"}, ack=True), phone.next_message(timeout=5))
        assert (message.sender, message.body) == ("desktop", {"text": "hi"})
        assert [receipt.status for receipt in receipts] == ["delivered"]
    assert isinstance(phone.closed.result(), ConnectionClosed)  # closed, and said so in this loop
