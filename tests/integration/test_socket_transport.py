"""``socket_transport = "uvloop"``: picows on uvloop's own transport instead of aiofastnet's.

An operator chooses it for memory (about 7 KiB less per idle connection, docs/operations.md "Memory");
devices must not see any other difference in what they send and receive, and the server's protections
(dropping a device that stops reading) work on it as on the default transport.
"""

import asyncio

import pytest
from test_backpressure import device_that_stops_reading

from rccs.client import Client
from rccs.config import ConfigError, load_settings
from rccs.testing import running_server


@pytest.fixture
def server_settings():
    return {"socket_transport": "uvloop"}


async def test_messages_large_and_small_go_both_ways_with_receipts(server, connect):
    assert type(server.node._ws_server).__module__.startswith("uvloop")  # not aiofastnet's server
    phone = await connect("alice", "alice-phone")
    laptop = await connect("alice", "alice-laptop", encoding="json")
    large = "x" * (300 * 1024)  # far past the 2 KiB a connection's read buffer starts with
    for body in ("hi", large, {"n": 1}):
        receipts, message = await asyncio.gather(
            phone.send({"device": "alice-laptop"}, "note", body, ack=True), laptop.next_message(timeout=5))
        assert (message.body, [r.status for r in receipts]) == (body, ["delivered"])
        _, answered = await asyncio.gather(
            laptop.send({"device": "alice-phone"}, "echo", body), phone.next_message(timeout=5))
        assert answered.body == body


async def test_a_device_that_stops_reading_is_dropped():
    async with running_server(max_outbound_bytes=256 * 1024, socket_transport="uvloop") as server:
        writer = await device_that_stops_reading(server, "sam", "sam-stuck")
        flooder = Client(server.ws_url, server.issue_token("sam", "sam-flood"), {"type": "mobile"})
        await flooder.connect()
        for _ in range(2000):  # bounded: the kernel's socket buffers fill long before this
            if server.hub.online("sam", "sam-stuck") is None:
                break
            await flooder.send({"device": "sam-stuck"}, "bulk", b"x" * (256 * 1024))
            await flooder.ping()  # the server has processed (and flushed) everything sent so far
        assert server.hub.online("sam", "sam-stuck") is None
        assert server.hub.closes_sent[4413] == 1
        writer.close()
        await flooder.close()
        await asyncio.wait_for(server.hub.wait_idle(), 5)


def test_an_unknown_socket_transport_is_refused():
    with pytest.raises(ConfigError, match="socket_transport"):
        load_settings(environ={"RCCS_SOCKET_TRANSPORT": "epoll"})
