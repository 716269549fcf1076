"""A device that stops reading cannot make the server's memory grow: it is dropped, others go on."""

import asyncio
import base64
import os
import struct
from urllib.parse import urlparse

import msgpack

from rccs.client import Client
from rccs.testing import running_server


def masked_binary_frame(payload: bytes) -> bytes:
    """A client frame with the all-zero mask key (valid, and the payload stays as it is)."""
    length = len(payload)
    if length < 126:
        header = struct.pack("!BB", 0x82, 0x80 | length)
    elif length < 65536:
        header = struct.pack("!BBH", 0x82, 0x80 | 126, length)
    else:
        header = struct.pack("!BBQ", 0x82, 0x80 | 127, length)
    return header + b"\x00\x00\x00\x00" + payload


async def read_frame(reader) -> bytes:
    _opcode, second = await reader.readexactly(2)
    length = second & 0x7F
    if length == 126:
        (length,) = struct.unpack("!H", await reader.readexactly(2))
    elif length == 127:
        (length,) = struct.unpack("!Q", await reader.readexactly(8))
    return await reader.readexactly(length)


async def device_that_stops_reading(server, user, device):
    url = urlparse(server.ws_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET /v1 HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                  f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n").encode())
    assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 101")
    hello = {"op": "hello", "token": server.issue_token(user, device), "device": {"type": "desktop"}}
    writer.write(masked_binary_frame(msgpack.packb(hello)))
    assert msgpack.unpackb(await read_frame(reader))["op"] == "welcome"
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
