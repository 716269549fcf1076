"""Per-device send rate and per-address hello rate: refused with rate_limited, counted, others unaffected."""

import asyncio
import json

import msgpack
import pytest
from rawws import masked_frame, open_raw, read_frame

from rccs.client import Client, ConnectionClosed
from rccs.errors import CloseCode
from rccs.testing import running_server


async def _raw_device(server, device, encoding="json"):
    reader, writer = await open_raw(server.ws_url)
    hello = {"op": "hello", "token": server.issue_token("alice", device), "device": {"type": "desktop"}}
    if encoding == "json":
        writer.write(masked_frame(json.dumps(hello).encode(), 1))
    else:
        writer.write(masked_frame(msgpack.packb(hello)))
    await read_frame(reader)  # welcome
    return reader, writer


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_a_device_over_its_send_rate_is_refused_and_others_are_not(tmp_path, encoding):
    # One message earned per 100 s: however slow the machine, no token comes back during the test,
    # so exactly the burst of 5 passes and the other 3 are refused.
    async with running_server(data_dir=str(tmp_path), send_rate=0.01, send_burst=5) as server:
        other = Client(server.ws_url, server.issue_token("alice", "other"), {"type": "desktop"})
        await other.connect()
        reader, writer = await _raw_device(server, "flooder", encoding)
        for n in range(8):
            ping = {"op": "ping", "id": f"p{n}"}
            writer.write(masked_frame(json.dumps(ping).encode(), 1) if encoding == "json"
                         else masked_frame(msgpack.packb(ping)))
        # Close frames are not rate limited, and the server answers ours after handling every frame before it.
        writer.write(masked_frame((1000).to_bytes(2, "big"), 0x8))
        answers = []
        while True:
            opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
            if opcode == 0x8:
                break
            answers.append(json.loads(payload) if encoding == "json" else msgpack.unpackb(payload))
        assert [a["id"] for a in answers if a["op"] == "pong"] == ["p0", "p1", "p2", "p3", "p4"]
        # Only the first refusal of a streak is answered (a flood must not make the server write an
        # error per frame); it names the message and says when to retry.
        refused = [a for a in answers if a["op"] == "error"]
        assert len(refused) == 1 and len(answers) == 6
        assert refused[0]["code"] == "rate_limited" and refused[0]["retry_after"] > 0
        assert refused[0]["id"] == "p5"
        assert server.hub.rate_refused == 3
        assert server.hub.errors_sent["rate_limited"] == 1
        assert await other.ping() > 0  # another device of the same user is not affected
        writer.close()
        await other.close()


async def test_a_device_that_keeps_flooding_is_closed(tmp_path):
    async with running_server(data_dir=str(tmp_path), send_rate=1, send_burst=1) as server:
        reader, writer = await _raw_device(server, "flooder")
        writer.write(b"".join(masked_frame(b'{"op":"ping"}', 1) for _ in range(1200)))
        while True:
            opcode, payload = await asyncio.wait_for(read_frame(reader), 10)
            if opcode == 0x8:
                break
        assert int.from_bytes(payload[:2], "big") == CloseCode.POLICY_VIOLATION
        assert server.hub.closes_sent[1008] == 1
        writer.close()


async def test_hello_rate_per_address(tmp_path):
    # 0.4 hellos a second: a burst of five seconds' worth is two. The third hello is refused only if it comes
    # before the next one is earned, 2.5 s after the first: time for three hellos on a loaded machine.
    async with running_server(data_dir=str(tmp_path), hello_rate_per_address=0.4) as server:
        clients = []
        for n in range(2):  # five seconds' worth of burst
            client = Client(server.ws_url, server.issue_token("alice", f"d{n}"), {"type": "desktop"},
                            reconnect=False)
            await client.connect()
            clients.append(client)
        refused = Client(server.ws_url, server.issue_token("alice", "d2"), {"type": "desktop"}, reconnect=False)
        with pytest.raises(ConnectionClosed) as closed:
            await refused.connect()
        assert closed.value.code == CloseCode.TOO_MANY_HELLOS
        assert server.hub.errors_sent["rate_limited"] == 1
        for client in clients:
            await client.close()
