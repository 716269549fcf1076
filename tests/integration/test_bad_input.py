"""Bad input of every kind gets its documented error or close code, is counted, and harms no one else."""

import asyncio
import json
import time

import jwt
import msgpack
import picows
import pytest
import websockets
import websockets.exceptions

from rccs.auth import TokenAuthority
from rccs.hub import Hub
from rccs.testing import running_server


def _refuse_constant(name):
    raise ValueError(name)


async def recv_json(ws, timeout=5):
    """The next envelope other than a ``presence`` event (those come whenever a device of the user changes)."""
    while True:
        envelope = json.loads(await asyncio.wait_for(ws.recv(), timeout))
        if envelope.get("op") != "presence":
            return envelope


async def json_device(server, user, device, **device_fields):
    ws = await websockets.connect(server.ws_url)
    await ws.send(json.dumps({"op": "hello", "token": server.issue_token(user, device),
                              "device": {"type": "web", **device_fields}}))
    welcome = await recv_json(ws)
    assert welcome["op"] == "welcome"
    return ws


async def msgpack_device(server, user, device):
    ws = await websockets.connect(server.ws_url)
    await ws.send(msgpack.packb({"op": "hello", "token": server.issue_token(user, device), "device": {"type": "web"}}))
    assert msgpack.unpackb(await asyncio.wait_for(ws.recv(), 5))["op"] == "welcome"
    return ws


async def assert_alive_json(ws):
    await ws.send(json.dumps({"op": "ping", "id": "alive"}))
    assert (await recv_json(ws)) == {"op": "pong", "server_time": pytest.approx(time.time() * 1000, abs=60000),
                                     "id": "alive"}


async def close_code(ws, timeout=5):
    with pytest.raises(websockets.exceptions.ConnectionClosed) as info:
        while True:
            await asyncio.wait_for(ws.recv(), timeout)
    return info.value.rcvd.code if info.value.rcvd else None


@pytest.fixture
async def bystanders(server, connect):
    """Two healthy devices that must keep talking whatever the others do."""
    a = await connect("carol", "carol-a")
    b = await connect("carol", "carol-b")

    async def still_fine():
        receipts, message = await asyncio.gather(
            a.send({"device": "carol-b"}, "check", "ok", ack=True), b.next_message(timeout=5)
        )
        assert message.body == "ok"
        assert receipts[0].status == "delivered"

    await still_fine()
    return still_fine


@pytest.mark.parametrize(
    ("frame", "code"),
    [
        ("{not json", "bad_request"),
        ("[1, 2]", "bad_request"),
        ('"just a string"', "bad_request"),
        ('{"no_op": 1}', "bad_request"),
        ('{"op": 5}', "bad_request"),
        ('{"op": {"send": 1}}', "bad_request"),  # unhashable: once a TypeError in dispatch, answered internal
        ('{"op": ["send"]}', "bad_request"),
        ('{"op": "teleport"}', "unknown_op"),
        ('{"op": "ack", "seq": "one"}', "bad_request"),
        ('{"op": "ack", "seq": [1, "x"]}', "bad_request"),
        ('{"op": "ack", "seq": []}', "bad_request"),
        ('{"op": "send", "id": "x", "type": "t", "to": "carol-b"}', "bad_request"),
        ('{"op": "send", "id": "x", "type": "t", "to": {}}', "bad_request"),
        ('{"op": "send", "id": "x", "type": "t", "to": {"device": "a", "all": true}}', "bad_request"),
        ('{"op": "send", "id": "x", "type": "t", "to": {"all": false}}', "bad_request"),
        ('{"op": "send", "id": "x", "type": "t", "to": {"all": true, "pick": "some"}}', "bad_request"),
        ('{"op": "send", "id": "x", "type": "t", "to": {"all": true, "self": "yes"}}', "bad_request"),
        ('{"op": "send", "id": "x", "type": "t", "to": {"devices": []}}', "bad_request"),
        ('{"op": "send", "id": "x", "type": "t", "to": {"devices": ["a", 1]}}', "bad_request"),
        ('{"op": "send", "id": true, "type": "t", "to": {"all": true}}', "bad_request"),
        ('{"op": "send", "type": "t", "to": {"all": true}}', "bad_request"),
        ('{"op": "send", "id": "x", "type": 5, "to": {"all": true}}', "bad_request"),
        ('{"op": "send", "id": "x", "to": {"all": true}}', "bad_request"),
        ('{"op": "send", "id": "x", "type": "t", "to": {"all": true}, "ack": "yes"}', "bad_request"),
        ('{"op": "send", "id": "x", "type": "' + "t" * 129 + '", "to": {"all": true}}', "too_large"),
        ('{"op": "send", "id": "' + "i" * 129 + '", "type": "t", "to": {"all": true}}', "too_large"),
        ('{"op": "send", "id": "x", "type": "t", "to": {"all": true}, "body": NaN}', "bad_request"),
        ('{"op": "hello", "token": "t", "device": {"type": "web"}}', "bad_request"),
    ],
)
async def test_bad_json_envelopes_get_errors_and_the_connection_lives(server, bystanders, frame, code):
    ws = await json_device(server, "dave", "dave-web")
    before = server.hub.errors_sent[code]
    await ws.send(frame)
    error = await recv_json(ws)
    assert error["op"] == "error"
    assert error["code"] == code
    assert isinstance(error["message"], str) and error["message"]
    try:
        sent = json.loads(frame, parse_constant=_refuse_constant)
    except ValueError:
        sent = None
    if isinstance(sent, dict) and isinstance(sent.get("id"), str) and len(sent["id"]) <= 128:
        assert error["id"] == sent["id"]
    assert server.hub.errors_sent[code] == before + 1
    await assert_alive_json(ws)
    await bystanders()
    await ws.close()


@pytest.mark.parametrize(
    ("frame", "reason"),
    [
        (b"\xc1", "envelope must be a map"),
        (b"\x92\x01\x02", "envelope must be a map"),
        (b"\x81\xa2op", "truncated"),
        (b"\x81\x01\xa4ping", "keys must be strings"),
        (msgpack.packb({"op": "ping"}) + b"\x00", "trailing bytes"),
        (b"\x81\xa2op\xa4\xff\xfe\xfd\xfc", "UTF-8"),
        (msgpack.packb({"op": "send", "id": b"bin", "type": "t", "to": {"all": True}}), "binary"),
        (msgpack.packb({"op": "send", "id": "x", "type": "t", "to": {"all": True},
                        "body": [[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[[1]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]]}), "nesting"),
    ],
)
async def test_bad_msgpack_envelopes_get_errors_and_the_connection_lives(server, bystanders, frame, reason):
    ws = await msgpack_device(server, "erin", "erin-web")
    before = server.hub.errors_sent["bad_request"]
    await ws.send(frame)
    error = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 5))
    assert error["op"] == "error"
    assert error["code"] == "bad_request"
    assert reason in error["message"]
    assert server.hub.errors_sent["bad_request"] == before + 1
    await ws.send(msgpack.packb({"op": "ping"}))
    assert msgpack.unpackb(await asyncio.wait_for(ws.recv(), 5))["op"] == "pong"
    await bystanders()
    await ws.close()


async def test_invalid_utf8_text_frame_is_bad_request(server, bystanders):
    transport, listener = await picows.ws_connect(_Collector, server.ws_url)
    hello = {"op": "hello", "token": server.issue_token("fay", "fay-1"), "device": {"type": "web"}}
    transport.send(picows.WSMsgType.TEXT, json.dumps(hello).encode())
    assert (await listener.next())["op"] == "welcome"
    transport.send(picows.WSMsgType.TEXT, b'{"op":"ping","x":"\xff"}')
    error = await listener.next()
    assert (error["op"], error["code"]) == ("error", "bad_request")
    await bystanders()
    transport.disconnect()
    await transport.wait_disconnected()


class _Collector(picows.WSListener):
    """A bare picows client listener that queues decoded envelopes and the close code."""

    def __init__(self):
        super().__init__()
        self.queue = asyncio.Queue()
        self.close_code = None

    def on_ws_frame(self, transport, frame):
        if frame.msg_type == picows.WSMsgType.TEXT:
            self.queue.put_nowait(json.loads(frame.get_payload_as_bytes()))
        elif frame.msg_type == picows.WSMsgType.BINARY:
            self.queue.put_nowait(msgpack.unpackb(frame.get_payload_as_bytes()))
        elif frame.msg_type == picows.WSMsgType.CLOSE:
            self.close_code = int(frame.get_close_code())
            transport.disconnect()

    async def next(self):
        return await asyncio.wait_for(self.queue.get(), 5)


async def test_ops_before_hello_close_4400(server, bystanders):
    ws = await websockets.connect(server.ws_url)
    await ws.send(json.dumps({"op": "send", "id": "early", "to": {"all": True}, "type": "t"}))
    error = await recv_json(ws)
    assert error["code"] == "unauthorized"
    assert await close_code(ws) == 4400
    assert server.hub.closes_sent[4400] >= 1
    await bystanders()


VALID_TOKEN = object()  # replaced by a token the server accepts, so the device description is what is judged


@pytest.mark.parametrize(
    ("hello", "error", "close"),
    [
        # A token that is not a string is a malformed token: unauthorized (section 4).
        ({"op": "hello", "device": {"type": "web"}, "token": 42}, "unauthorized", 4401),
        ({"op": "hello", "device": {"type": "web"}}, "unauthorized", 4401),
        # A good token with a missing or badly shaped device: bad_request, closed 4400.
        ({"op": "hello", "token": VALID_TOKEN}, "bad_request", 4400),
        ({"op": "hello", "token": VALID_TOKEN, "device": {"type": ""}}, "bad_request", 4400),
        ({"op": "hello", "token": VALID_TOKEN, "device": {"type": "web", "capabilities": "file_sync"}},
         "bad_request", 4400),
        ({"op": "hello", "token": VALID_TOKEN, "device": {"type": "web", "capabilities": [1]}}, "bad_request", 4400),
        ({"op": "hello", "token": VALID_TOKEN, "device": {"type": "web", "name": 7}}, "bad_request", 4400),
    ],
)
async def test_malformed_hello_is_refused(server, hello, error, close):
    if hello.get("token") is VALID_TOKEN:
        hello = {**hello, "token": server.issue_token("carol", "carol-x")}
    ws = await websockets.connect(server.ws_url)
    await ws.send(json.dumps(hello))
    refusal = await recv_json(ws)
    assert (refusal["op"], refusal["code"]) == ("error", error)
    assert await close_code(ws) == close


async def test_undecodable_first_message_closes_4400(server):
    ws = await websockets.connect(server.ws_url)
    await ws.send(b"\xc1\xc1")
    error = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 5))
    assert error["code"] == "bad_request"
    assert await close_code(ws) == 4400


@pytest.mark.parametrize("kind", ["garbage", "forged", "expired", "wrong_type"])
async def test_bad_tokens_close_4401(server, bystanders, kind):
    if kind == "garbage":
        token = "not-a-jwt"
    elif kind == "forged":
        token = TokenAuthority(b"some-other-secret-0123456789abcdefghij").issue("carol", "carol-x", 60)
    elif kind == "expired":
        token = server.node.tokens.issue("carol", "carol-x", 60, now=time.time() - 3600)
    else:
        token = jwt.encode({"sub": "carol", "dev": "carol-x", "exp": int(time.time()) + 60, "typ": "other"},
                           server.node.tokens._secret, algorithm="HS256")
    ws = await websockets.connect(server.ws_url)
    await ws.send(json.dumps({"op": "hello", "token": token, "device": {"type": "web"}}))
    error = await recv_json(ws)
    assert error["code"] == "unauthorized"
    assert await close_code(ws) == 4401
    assert server.hub.errors_sent["unauthorized"] >= 1
    await bystanders()


async def test_device_of_another_user_closes_4403(server, connect):
    await connect("alice", "shared-id")
    ws = await websockets.connect(server.ws_url)
    await ws.send(json.dumps({"op": "hello", "token": server.issue_token("mallory", "shared-id"),
                              "device": {"type": "web"}}))
    assert (await recv_json(ws))["code"] == "forbidden"
    assert await close_code(ws) == 4403


async def test_hello_timeout_closes_4408():
    async with running_server(hello_timeout=0.2) as server:
        ws = await websockets.connect(server.ws_url)
        assert await close_code(ws) == 4408
        assert server.hub.closes_sent[4408] == 1


async def test_server_full_closes_1013():
    async with running_server(max_connections=1) as server:
        first = await json_device(server, "gus", "gus-1")
        second = await websockets.connect(server.ws_url)
        assert await close_code(second) == 1013
        await assert_alive_json(first)
        await first.close()


async def test_oversized_message_closes_1009_and_others_continue():
    async with running_server(max_message_bytes=4096) as server:
        big = await json_device(server, "hal", "hal-big")
        small = await json_device(server, "hal", "hal-small")
        await big.send(json.dumps({"op": "send", "id": "big", "type": "t", "to": {"all": True}, "body": "x" * 5000}))
        assert await close_code(big) == 1009
        await assert_alive_json(small)
        await small.close()


async def test_fragmented_messages_are_reassembled_and_bounded():
    async with running_server(max_message_bytes=4096) as server:
        ws = await json_device(server, "ida", "ida-1")
        await ws.send(iter(['{"op":"ping",', '"id":"frag"}']))
        assert (await recv_json(ws))["id"] == "frag"
        await ws.send(iter(["[" * 2000, "1" * 2000, "]" * 2000]))
        assert await close_code(ws) == 1009


async def test_exception_in_a_handler_is_contained(server, connect, monkeypatch):
    a = await connect("jo", "jo-a")
    b = await connect("jo", "jo-b")

    def explode(conn, header):
        raise RuntimeError("injected fault")

    monkeypatch.setitem(server.hub.ops, "ack", explode)
    await a.ack([1])
    error = await asyncio.wait_for(a.errors.get(), 5)
    assert error.code == "internal"
    assert server.hub.errors_sent["internal"] == 1
    monkeypatch.undo()
    receipts, _message = await asyncio.gather(a.send({"device": "jo-b"}, "t", 1, ack=True), b.next_message(timeout=5))
    assert receipts[0].status == "delivered"


async def test_silent_client_is_dropped_by_heartbeat():
    # The client is silent from its first byte: if the test stalls for two heartbeats before its hello, the
    # server drops it before the welcome. A 1 s heartbeat makes that a 2 s stall, not 0.4 s.
    async with running_server(heartbeat=1.0) as server:
        transport, listener = await picows.ws_connect(_Collector, server.ws_url, enable_auto_pong=False)
        hello = {"op": "hello", "token": server.issue_token("kim", "kim-1"), "device": {"type": "web"}}
        transport.send(picows.WSMsgType.TEXT, json.dumps(hello).encode())
        assert (await listener.next())["heartbeat"] == 1.0
        await asyncio.wait_for(transport.wait_disconnected(), 10)  # a bound: dropped after about 2 s
        await asyncio.wait_for(server.hub.wait_idle(), 5)
        assert len(server.hub.routing) == 0


async def test_exception_on_the_direct_path_is_contained(server, connect, monkeypatch):
    sender = await connect("jo", "jo-sender")
    receiver = await connect("jo", "jo-receiver", auto_ack=False)

    def explode(self, user, device, receipt):
        raise RuntimeError("injected fault")

    send = asyncio.ensure_future(sender.send({"device": "jo-receiver"}, "t", 1, ack=True))
    message = await receiver.next_message(timeout=5)
    monkeypatch.setattr(Hub, "send_receipt", explode)
    await receiver.ack(message.seq)
    error = await asyncio.wait_for(receiver.errors.get(), 5)
    assert error.code == "internal"
    monkeypatch.undo()
    send.cancel()  # the fault ate its receipt; the connection itself lives on:
    assert await receiver.ping() > 0
    other = await connect("jo", "jo-other")
    receipts, reply = await asyncio.gather(sender.send({"device": "jo-other"}, "t", 2, ack=True),
                                           other.next_message(timeout=5))
    assert receipts[0].status == "delivered" and reply.body == 2
