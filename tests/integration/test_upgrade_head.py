"""The WebSocket upgrade request's head (issue 16): over 16 KiB it is answered 431 and the connection closes in
order, not with a TCP reset; within it the upgrade works as before, however the head arrives."""

import asyncio
import base64
import itertools
import json
import os
from urllib.parse import urlparse

import pytest
from picows.picows import WSProtocol
from rawws import masked_frame, read_frame

from rccs.metrics import render
from rccs.transport.handshake import MAX_HANDSHAKE_HEAD_BYTES

TEXT = 0x1
HELLO_TIMEOUT = 1.0


@pytest.fixture
def server_settings():
    return {"hello_timeout": HELLO_TIMEOUT}


def upgrade_head(ws_url, size=None):
    """An upgrade request head of exactly ``size`` bytes (the empty line included), padded with one header."""
    url = urlparse(ws_url)
    key = base64.b64encode(os.urandom(16)).decode()
    lines = (f"GET {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
             f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n")
    if size is not None:
        padding = size - len(lines) - len("X-Padding: \r\n\r\n")
        lines += "X-Padding: " + "a" * padding + "\r\n"
    head = (lines + "\r\n").encode()
    assert size is None or len(head) == size
    return head


def refusals(server, reason):
    """rccs_events_total for a refused upgrade request (operations.md: counted like every bad input)."""
    wanted = f'rccs_events_total{{event="{reason}"}} '
    for line in render(server.node.registry).decode().splitlines():
        if line.startswith(wanted):
            return float(line[len(wanted):])
    return 0.0


async def connect(ws_url):
    url = urlparse(ws_url)
    return await asyncio.open_connection(url.hostname, url.port)


async def read_to_eof(reader):
    """Everything the server sends until it closes; a reset raises ConnectionResetError."""
    return await asyncio.wait_for(reader.read(), 10)


def hello(server, device):
    return masked_frame(json.dumps({"op": "hello", "token": server.issue_token("u", device),
                                    "device": {"type": "web"}}).encode(), TEXT)


async def next_envelope(reader):
    while True:
        opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
        assert opcode == TEXT, (opcode, payload)
        envelope = json.loads(payload)
        if envelope["op"] != "presence":
            return envelope


async def assert_upgrades_and_serves(server, head, device, split_at=()):
    """The head (written in pieces cut at ``split_at``) is upgraded, and a hello sent right behind it is
    welcomed: the bytes after the head reach the WebSocket side too."""
    reader, writer = await connect(server.ws_url)
    data = head + hello(server, device)
    cuts = [0, *split_at, len(data)]
    for start, end in itertools.pairwise(cuts):
        writer.write(data[start:end])
        await writer.drain()
    assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 101 ")
    assert (await next_envelope(reader))["op"] == "welcome"
    writer.write(masked_frame(json.dumps({"op": "ping", "id": "p"}).encode(), TEXT))
    assert (await next_envelope(reader))["id"] == "p"
    writer.close()


@pytest.mark.parametrize("size", [None, 15 * 1024, MAX_HANDSHAKE_HEAD_BYTES],
                         ids=["ordinary", "15-KiB", "at-the-limit"])
async def test_a_head_within_the_limit_is_upgraded(server, size):
    await assert_upgrades_and_serves(server, upgrade_head(server.ws_url, size), f"d-{size}")


async def test_a_head_in_pieces_is_upgraded(server):
    head = upgrade_head(server.ws_url, 9000)
    # cut inside the request line, inside the padding, and inside the empty line that ends the head
    await assert_upgrades_and_serves(server, head, "pieces", split_at=(5, 4000, len(head) - 3, len(head) - 1))


@pytest.mark.parametrize("size", [MAX_HANDSHAKE_HEAD_BYTES + 1, 64 * 1024, 1024 * 1024],
                         ids=["one-over", "64-KiB", "1-MiB"])
async def test_an_oversized_head_is_answered_431_and_closed_in_order(server, size):
    for _ in range(5):  # a reset depends on timing: a few tries each
        reader, writer = await connect(server.ws_url)
        writer.write(upgrade_head(server.ws_url, size))
        answer = await read_to_eof(reader)  # the server's FIN ends it: a reset would raise here
        assert answer.startswith(b"HTTP/1.1 431 Request Header Fields Too Large\r\n"), answer[:200]
        head, body = answer.split(b"\r\n\r\n", 1)
        assert b"\r\nConnection: close\r\n" in head + b"\r\n"
        assert body == b"the request line and headers exceed 16384 bytes\n"
        writer.close()
    assert refusals(server, "upgrade_head_too_large") == 5
    await assert_upgrades_and_serves(server, upgrade_head(server.ws_url), "after")


async def test_an_oversized_head_without_its_end_is_answered_431(server):
    reader, writer = await connect(server.ws_url)
    writer.write(upgrade_head(server.ws_url, 64 * 1024)[:-4])  # still writing headers when refused
    assert (await read_to_eof(reader)).startswith(b"HTTP/1.1 431 ")
    writer.close()


async def test_a_head_not_complete_in_time_is_answered_408(server):
    reader, writer = await connect(server.ws_url)
    writer.write(upgrade_head(server.ws_url)[:40])
    answer = await read_to_eof(reader)  # after hello_timeout
    assert answer.startswith(b"HTTP/1.1 408 Request Timeout\r\n"), answer
    writer.close()
    assert refusals(server, "upgrade_head_too_slow") == 1


async def test_a_connection_that_sends_nothing_is_closed_after_the_timeout(server):
    reader, writer = await connect(server.ws_url)
    assert await read_to_eof(reader) == b""
    writer.close()



async def test_after_the_upgrade_frames_go_straight_to_picows(server):
    # The guard reads only the head: a connection's transport then talks to picows' protocol, so the
    # message path has no extra layer.
    reader, writer = await connect(server.ws_url)
    writer.write(upgrade_head(server.ws_url) + hello(server, "open"))
    await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert (await next_envelope(reader))["op"] == "welcome"
    (session,) = [s for s in server.hub.sessions if s.device == "open"]
    protocol = session.sink.transport.underlying_transport.get_protocol()
    assert type(protocol) is WSProtocol
    writer.close()
