"""A device that stops reading cannot make the server's memory grow: it is dropped, others go on."""

import asyncio

import msgpack
from rawws import masked_frame, open_raw, read_frame

from rccs.client import Client
from rccs.testing import running_server


async def device_that_stops_reading(server, user, device):
    reader, writer = await open_raw(server.ws_url)
    hello = {"op": "hello", "token": server.issue_token(user, device), "device": {"type": "desktop"}}
    writer.write(masked_frame(msgpack.packb(hello)))
    assert msgpack.unpackb((await read_frame(reader))[1])["op"] == "welcome"
    writer.transport.pause_reading()
    return writer


async def test_slow_consumer_is_dropped_and_the_sender_is_unaffected():
    async with running_server(max_outbound_bytes=256 * 1024) as server:
        writer = await device_that_stops_reading(server, "sam", "sam-stuck")
        flooder = Client(server.ws_url, server.issue_token("sam", "sam-flood"), {"type": "mobile"})
        bystander = Client(server.ws_url, server.issue_token("sam", "sam-ok"), {"type": "web"})
        await flooder.connect()
        await bystander.connect()
        body = b"x" * (256 * 1024)
        for _ in range(2000):  # bounded: the kernel's socket buffers fill long before this
            if server.hub.online("sam", "sam-stuck") is None:
                break
            await flooder.send({"device": "sam-stuck"}, "bulk", body)
            await flooder.ping()  # the server has processed (and flushed) everything sent so far
        assert server.hub.online("sam", "sam-stuck") is None
        assert server.hub.closes_sent[4413] == 1
        receipts, message = await asyncio.gather(
            flooder.send({"device": "sam-ok"}, "t", "still here", ack=True), bystander.next_message(timeout=5)
        )
        assert message.body == "still here" and receipts[0].status == "delivered"
        writer.close()
        await flooder.close()
        await bystander.close()
        await asyncio.wait_for(server.hub.wait_idle(), 5)
        assert len(server.hub.routing) == 0
