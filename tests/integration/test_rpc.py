"""RPC between devices through a real server (protocol.md section 13): results, errors, timeouts,
disconnects, bad input, encodings, concurrency."""

import asyncio
import json
import math
import time

import msgpack
import pytest
import websockets

from rccs import rpc
from rccs.client import ClientError


class RawDevice:
    """A device speaking the wire protocol by hand (JSON or msgpack), to control every field."""

    def __init__(self, ws, encoding):
        self.ws = ws
        self.encoding = encoding

    async def send(self, envelope):
        if self.encoding == "json":
            await self.ws.send(json.dumps(envelope))
        else:
            await self.ws.send(msgpack.packb(envelope, use_bin_type=True))

    async def recv(self, timeout=5):
        """The next envelope other than ``presence`` (those come whenever another device of the user changes)."""
        while True:
            frame = await asyncio.wait_for(self.ws.recv(), timeout)
            envelope = json.loads(frame) if isinstance(frame, str) else msgpack.unpackb(frame, raw=False)
            if envelope.get("op") != "presence":
                return envelope

    async def next_op(self, op):
        envelope = await self.recv()
        assert envelope["op"] == op, envelope
        return envelope

    async def assert_nothing_more(self):
        """Nothing was sent to this device before now: a ping's pong is the next envelope."""
        await self.send({"op": "ping", "id": "sync"})
        envelope = await self.recv()
        assert (envelope["op"], envelope.get("id")) == ("pong", "sync"), envelope


@pytest.fixture
async def raw(server, connect):
    """``await raw(user, device, encoding="json")`` -> a RawDevice after its welcome; closed at teardown."""
    opened = []

    async def _raw(user, device, encoding="json", type="desktop"):
        ws = await websockets.connect(server.ws_url)
        opened.append(ws)
        device_ = RawDevice(ws, encoding)
        await device_.send({"op": "hello", "token": server.issue_token(user, device), "device": {"type": type}})
        await device_.next_op("welcome")
        return device_

    yield _raw
    for ws in opened:
        await ws.close()


async def sync(client):
    """Every envelope the server sent this client before now has been handled: a ping round trip."""
    await client.ping()


async def until(condition, client, rounds=1000):
    """Ping round trips with ``client`` until ``condition()`` holds (the server has handled what it waits for)."""
    for _ in range(rounds):
        if condition():
            return
        await sync(client)
    raise AssertionError("condition never held")


async def test_call_returns_the_targets_result(server, connect):
    phone = await connect("alice", "phone", type="mobile")
    desktop = await connect("alice", "desktop")
    seen = []

    def add(params):
        seen.append(params)
        return params["a"] + params["b"]

    async def echo(params):
        await asyncio.sleep(0)
        return {"echo": params}

    phone.handle("add", add)
    phone.handle("echo", echo)
    assert await desktop.call({"device": "phone"}, "add", {"a": 2, "b": 3}) == 5
    assert await desktop.call("phone", "echo", [1, "two", None, {"x": 1.5}]) == {"echo": [1, "two", None, {"x": 1.5}]}
    assert await desktop.call({"type": "mobile"}, "echo") == {"echo": None}
    assert seen == [{"a": 2, "b": 3}]
    assert server.hub.events["rpc_calls"] == 3
    assert server.hub.events["rpc_results"] == 3
    assert len(server.node.rpc.registry) == 0


async def test_the_target_sees_the_caller_and_a_server_id_and_the_caller_sees_who_answered(server, connect, raw):
    target = await raw("alice", "target", "json")
    caller = await raw("alice", "caller", "msgpack")
    before = time.time() * 1000
    await caller.send({"op": "call", "id": 17, "to": {"device": "target"}, "method": "m", "params": {"p": 1},
                       "timeout": 10})
    call = await target.next_op("call")
    assert call["from"] == "caller" and call["method"] == "m" and call["params"] == {"p": 1}
    assert isinstance(call["id"], str) and call["id"] != 17
    assert before + 9000 <= call["deadline"] <= time.time() * 1000 + 10000
    await target.send({"op": "result", "id": call["id"], "result": ["ok"]})
    assert await caller.next_op("result") == {"op": "result", "id": 17, "from": "target", "result": ["ok"]}
    await target.assert_nothing_more()


async def test_error_results_are_relayed_with_their_code(server, connect):
    phone = await connect("alice", "phone")
    desktop = await connect("alice", "desktop")

    def refuse(params):
        raise ClientError("not_supported", "no battery here")

    def crash(params):
        raise ValueError("boom")

    phone.handle("refuse", refuse)
    phone.handle("crash", crash)
    with pytest.raises(ClientError) as info:
        await desktop.call("phone", "refuse")
    assert (info.value.code, info.value.message) == ("not_supported", "no battery here")
    with pytest.raises(ClientError) as info:
        await desktop.call("phone", "crash")
    assert info.value.code == "handler_error" and "boom" in info.value.message
    with pytest.raises(ClientError) as info:
        await desktop.call("phone", "no.such.method")
    assert info.value.code == "unknown_method"
    phone.handle("refuse", None)
    with pytest.raises(ClientError) as info:
        await desktop.call("phone", "refuse")
    assert info.value.code == "unknown_method"
    assert server.hub.events["rpc_results"] == 4


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_a_result_the_client_cannot_encode_becomes_handler_error(server, connect, encoding):
    phone = await connect("alice", "phone", encoding=encoding)
    desktop = await connect("alice", "desktop")
    phone.handle("set", lambda params: {1, 2})
    phone.handle("nan", lambda params: math.nan)
    with pytest.raises(ClientError) as info:
        await desktop.call("phone", "set")
    assert info.value.code == "handler_error"
    if encoding == "json":  # strict JSON has no NaN
        with pytest.raises(ClientError) as info:
            await desktop.call("phone", "nan")
        assert info.value.code == "handler_error"
    else:
        assert math.isnan(await desktop.call("phone", "nan"))


async def test_raw_error_result_is_relayed_as_a_result_with_error(server, connect, raw):
    target = await raw("alice", "target")
    caller = await raw("alice", "caller")
    await caller.send({"op": "call", "id": "q", "to": {"device": "target"}, "method": "m"})
    call = await target.next_op("call")
    assert call["params"] is None
    await target.send({"op": "result", "id": call["id"], "error": {"code": "nope", "extra": 1}})
    assert await caller.next_op("result") == {"op": "result", "id": "q", "from": "target",
                                              "error": {"code": "nope", "message": ""}}


async def test_timeout_then_the_late_result_is_dropped_quietly(server, connect):
    phone = await connect("alice", "phone")
    desktop = await connect("alice", "desktop")
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(params):
        started.set()
        await release.wait()
        return "late"

    phone.handle("slow", slow)
    begin = time.monotonic()
    with pytest.raises(ClientError) as info:
        await desktop.call("phone", "slow", timeout=0.2)
    assert info.value.code == "timeout"
    assert time.monotonic() - begin >= 0.19
    assert started.is_set()
    assert server.hub.events["rpc_timeouts"] == 1
    release.set()
    await until(lambda: server.hub.events["rpc_late_results"] == 1, phone)  # the handler's result came
    await sync(phone)
    assert phone.errors.empty()  # no error for the late result
    assert len(server.node.rpc.registry) == 0
    phone.handle("fast", lambda params: "fast")
    assert await desktop.call("phone", "fast") == "fast"


async def test_a_result_after_the_grace_period_is_an_unknown_call(server, connect, raw, monkeypatch):
    monkeypatch.setattr(rpc, "LATE_RESULT_GRACE", 0.05)
    target = await raw("alice", "target")
    caller = await raw("alice", "caller")
    await caller.send({"op": "call", "id": "q", "to": {"device": "target"}, "method": "m", "timeout": 0.05})
    call = await target.next_op("call")
    assert (await caller.next_op("error"))["code"] == "timeout"
    # The grace period runs out: the server forgets the call. Bounded by time, not by a count of round trips
    # (1,000 pings could all come back within the 50 ms grace on a fast machine).
    deadline = time.monotonic() + 10
    while server.node.rpc.registry.calls:
        assert time.monotonic() < deadline, "the server still remembers the call after 10 s"
        await target.assert_nothing_more()
    await target.send({"op": "result", "id": call["id"], "result": "much too late"})
    error = await target.next_op("error")
    assert (error["code"], error["id"]) == ("unknown_call", call["id"])
    await caller.assert_nothing_more()


async def test_no_online_target_is_offline(server, connect):
    desktop = await connect("alice", "desktop")
    laptop = await connect("alice", "laptop")
    await laptop.close()  # registered, now offline
    await until(lambda: server.hub.online("alice", "laptop") is None, desktop)
    for to in ({"device": "laptop"}, {"device": "never-seen"}, {"devices": ["laptop", "ghost"]},
               {"type": "mobile"}, {"capability": "camera"}, {"all": True}, {"device": "desktop"}):
        with pytest.raises(ClientError) as info:
            await desktop.call(to, "m")
        assert info.value.code == "offline", to
    assert server.hub.events["rpc_offline"] == 7
    assert server.hub.events["rpc_calls"] == 0
    desktop.handle("me", lambda params: "myself")
    assert await desktop.call({"device": "desktop", "self": True}, "me") == "myself"


async def test_a_call_goes_to_the_most_recently_active_match_only(server, connect):
    first = await connect("alice", "first", type="desktop", capabilities=["shell"])
    second = await connect("alice", "second", type="desktop", capabilities=["shell"])
    caller = await connect("alice", "caller", type="mobile")
    calls = []
    for client in (first, second):
        name = client.welcome["device"]
        client.handle("who", lambda params, name=name: calls.append(name) or name)
    assert await caller.call({"type": "desktop"}, "who") == "second"
    await first.ping()  # activity makes "first" the most recent
    assert await caller.call({"capability": "shell", "pick": "all"}, "who") == "first"
    assert await caller.call({"devices": ["first", "second"]}, "who") == "first"
    await second.ping()
    assert await caller.call({"all": True}, "who") == "second"
    assert calls == ["second", "first", "first", "second"]


async def test_target_disconnect_mid_call_is_disconnected(server, connect):
    phone = await connect("alice", "phone")
    desktop = await connect("alice", "desktop")
    started, release = asyncio.Event(), asyncio.Event()

    async def hang(params):
        started.set()
        await release.wait()

    phone.handle("hang", hang)
    call = asyncio.create_task(desktop.call("phone", "hang", timeout=30))
    await started.wait()
    await phone.close()
    with pytest.raises(ClientError) as info:
        await call
    assert info.value.code == "disconnected"
    release.set()  # its result cannot be sent any more: the client drops it
    assert server.hub.events["rpc_disconnected"] == 1
    assert len(server.node.rpc.registry) == 0


async def test_target_connection_lost_mid_call_is_disconnected_even_if_it_resumes(server, connect, raw):
    phone = await connect("alice", "phone", backoff_initial=0.01)
    caller = await raw("alice", "caller")
    started, release = asyncio.Event(), asyncio.Event()

    async def hang(params):
        started.set()
        await release.wait()
        return "too late"

    phone.handle("hang", hang)
    await caller.send({"op": "call", "id": "q", "to": {"device": "phone"}, "method": "hang"})
    await asyncio.wait_for(started.wait(), 5)
    phone.reconnected.clear()
    server.hub.online("alice", "phone").close(1011, "injected")
    error = await caller.next_op("error")
    assert (error["code"], error["id"]) == ("disconnected", "q")
    await asyncio.wait_for(phone.reconnected.wait(), 5)
    assert phone.welcome["resumed"] is True
    release.set()  # the answer goes out on the resumed connection: the server knows no such call there
    assert (await asyncio.wait_for(phone.errors.get(), 5)).code == "unknown_call"
    phone.handle("ping", lambda params: "pong")
    await caller.send({"op": "call", "id": "q2", "to": {"device": "phone"}, "method": "ping"})
    assert (await caller.next_op("result"))["result"] == "pong"


async def test_caller_disconnect_drops_the_call_and_the_late_result_quietly(server, connect):
    phone = await connect("alice", "phone")
    desktop = await connect("alice", "desktop")
    other = await connect("alice", "other")
    started, release = asyncio.Event(), asyncio.Event()

    async def slow(params):
        started.set()
        await release.wait()
        return "late"

    phone.handle("slow", slow)
    call = asyncio.create_task(desktop.call("phone", "slow", timeout=30))
    await started.wait()
    await desktop.close()
    with pytest.raises(ClientError) as info:
        await call
    assert info.value.code == "disconnected"  # the client's own connection ended
    await until(lambda: server.hub.events["rpc_abandoned"] == 1, phone)
    release.set()
    await until(lambda: server.hub.events["rpc_late_results"] == 1, phone)
    await sync(phone)
    assert phone.errors.empty()
    assert len(server.node.rpc.registry) == 0
    phone.handle("fast", lambda params: "still here")
    assert await other.call("phone", "fast") == "still here"


async def test_result_for_an_unknown_call_or_from_a_device_not_asked_is_refused(server, connect, raw):
    target = await raw("alice", "target")
    intruder = await raw("alice", "intruder", "msgpack")
    caller = await raw("alice", "caller")
    await intruder.send({"op": "result", "id": "c999", "result": 1})
    error = await intruder.next_op("error")
    assert (error["code"], error["id"]) == ("unknown_call", "c999")
    await caller.send({"op": "call", "id": "q", "to": {"device": "target"}, "method": "m"})
    call = await target.next_op("call")
    await intruder.send({"op": "result", "id": call["id"], "result": "forged"})
    error = await intruder.next_op("error")
    assert (error["code"], error["id"]) == ("unknown_call", call["id"])
    await target.send({"op": "result", "id": call["id"], "result": "real"})
    assert (await caller.next_op("result"))["result"] == "real"
    await target.send({"op": "result", "id": call["id"], "result": "twice"})  # already answered
    assert (await target.next_op("error"))["code"] == "unknown_call"
    await caller.assert_nothing_more()
    assert server.hub.errors_sent["unknown_call"] == 3


async def test_call_to_another_users_device_is_forbidden(server, connect):
    alice = await connect("alice", "alice-desktop")
    bob = await connect("bob", "bob-phone")
    bob.handle("secret", lambda params: "bob's secret")
    for to in ({"device": "bob-phone"}, {"devices": ["alice-desktop", "bob-phone"], "self": True}):
        with pytest.raises(ClientError) as info:
            await alice.call(to, "secret")
        assert info.value.code == "forbidden"
    with pytest.raises(ClientError) as info:  # selectors only ever see the caller's own user
        await alice.call({"all": True}, "secret")
    assert info.value.code == "offline"
    assert server.hub.events["rpc_calls"] == 0
    await sync(bob)
    assert bob.errors.empty()
    assert await bob.call({"all": True, "self": True}, "secret") == "bob's secret"


@pytest.mark.parametrize(("caller_encoding", "target_encoding"),
                         [("json", "msgpack"), ("msgpack", "json"), ("json", "json"), ("msgpack", "msgpack")])
async def test_params_and_results_cross_encodings(server, connect, caller_encoding, target_encoding):
    target = await connect("alice", "target", encoding=target_encoding)
    caller = await connect("alice", "caller", encoding=caller_encoding)
    received = []

    def echo(params):
        received.append(params)
        return {"got": params, "from": "target"}

    target.handle("echo", echo)
    params = {"text": "héllo ✓", "n": -(2**63), "big": 2**64 - 1, "f": 0.25, "list": [True, False, None, []],
              "nested": {"a": {"b": {"c": [1, 2, 3]}}}}
    assert await caller.call("target", "echo", params) == {"got": params, "from": "target"}
    assert received == [params]


async def test_msgpack_nan_becomes_null_for_a_json_target(server, connect, raw):
    target = await connect("alice", "target", encoding="json")
    caller = await raw("alice", "caller", "msgpack")
    target.handle("echo", lambda params: params)
    await caller.send({"op": "call", "id": 1, "to": {"device": "target"}, "method": "echo",
                       "params": [math.nan, math.inf, 1.5]})
    assert (await caller.next_op("result"))["result"] == [None, None, 1.5]


async def test_unconvertible_params_and_results(server, connect, raw):
    msgpack_target = await connect("alice", "mp-target", encoding="msgpack")
    msgpack_target.handle("echo", lambda params: params)
    json_caller = await connect("alice", "json-caller", encoding="json")
    with pytest.raises(ClientError) as info:
        await json_caller.call("mp-target", "echo", {"huge": 2**70})
    assert info.value.code == "unconvertible"
    assert server.hub.events["rpc_calls"] == 0
    # A JSON target answering a msgpack caller with an integer msgpack cannot carry: both sides hear of it.
    json_target = await raw("alice", "json-target", "json")
    msgpack_caller = await raw("alice", "mp-caller", "msgpack")
    await msgpack_caller.send({"op": "call", "id": "q", "to": {"device": "json-target"}, "method": "m"})
    call = await json_target.next_op("call")
    await json_target.send({"op": "result", "id": call["id"], "result": 2**70})
    error = await json_target.next_op("error")
    assert (error["code"], error["id"]) == ("unconvertible", call["id"])
    error = await msgpack_caller.next_op("error")
    assert (error["code"], error["id"]) == ("unconvertible", "q")
    assert len(server.node.rpc.registry) == 0


async def test_binary_params_from_msgpack_are_refused_like_other_header_fields(server, connect, raw):
    await raw("alice", "target")
    caller = await raw("alice", "caller", "msgpack")
    await caller.send({"op": "call", "id": "q", "to": {"device": "target"}, "method": "m", "params": b"\x00\x01"})
    error = await caller.next_op("error")
    assert error["code"] == "bad_request" and "binary" in error["message"]


@pytest.mark.parametrize(("timeout", "code"), [
    (0, "bad_request"), (-1, "bad_request"), ("5", "bad_request"), (True, "bad_request"), ([1], "bad_request"),
    (math.nan, "bad_request"), (math.inf, "bad_request"), (300.5, "too_large"), (10**6, "too_large"),
])
async def test_bad_timeouts_are_refused(server, connect, raw, timeout, code):
    await raw("alice", "target")
    caller = await raw("alice", "caller", "msgpack")
    await caller.send({"op": "call", "id": "q", "to": {"device": "target"}, "method": "m", "timeout": timeout})
    error = await caller.next_op("error")
    assert (error["code"], error["id"]) == (code, "q")
    assert server.hub.events["rpc_calls"] == 0


async def test_timeout_limits_and_default_are_accepted(server, connect, raw):
    target = await raw("alice", "target")
    caller = await raw("alice", "caller")
    for n, timeout in enumerate((None, 300, 0.001, 1)):
        envelope = {"op": "call", "id": n, "to": {"device": "target"}, "method": "m"}
        if timeout is not None:
            envelope["timeout"] = timeout
        await caller.send(envelope)
        call = await target.next_op("call")
        wanted = 30.0 if timeout is None else timeout
        assert call["deadline"] == pytest.approx(time.time() * 1000 + wanted * 1000, abs=2000)
        await target.send({"op": "result", "id": call["id"], "result": n})
        answer = await caller.recv()
        if timeout == 0.001 and answer["op"] == "error":  # the timer may win the race against the result
            assert answer["code"] == "timeout"
        else:
            assert answer == {"op": "result", "id": n, "from": "target", "result": n}


@pytest.mark.parametrize(("envelope", "code"), [
    ({"op": "call", "to": {"device": "target"}, "method": "m"}, "bad_request"),
    ({"op": "call", "id": "q", "method": "m"}, "bad_request"),
    ({"op": "call", "id": "q", "to": "target", "method": "m"}, "bad_request"),
    ({"op": "call", "id": "q", "to": {"device": "target"}}, "bad_request"),
    ({"op": "call", "id": "q", "to": {"device": "target"}, "method": ""}, "bad_request"),
    ({"op": "call", "id": "q", "to": {"device": "target"}, "method": 7}, "bad_request"),
    ({"op": "call", "id": "q", "to": {"device": "target"}, "method": "m" * 129}, "too_large"),
    ({"op": "result", "result": 1}, "bad_request"),
    ({"op": "result", "id": "c1", "result": 1, "error": {"code": "x"}}, "bad_request"),
    ({"op": "result", "id": "c1", "error": "broken"}, "bad_request"),
    ({"op": "result", "id": "c1", "error": {"message": "no code"}}, "bad_request"),
    ({"op": "result", "id": "c1", "error": {"code": "x", "message": 5}}, "bad_request"),
    ({"op": "result", "id": "c1", "error": {"code": "x" * 129}}, "too_large"),
])
async def test_malformed_calls_and_results_get_errors_and_change_nothing(server, connect, raw, envelope, code):
    target = await raw("alice", "target")
    sender = await raw("alice", "sender")
    await sender.send(envelope)
    error = await sender.next_op("error")
    assert error["code"] == code
    assert error.get("id") == envelope.get("id")
    await target.assert_nothing_more()
    await sender.assert_nothing_more()
    assert len(server.node.rpc.registry) == 0


async def test_a_malformed_result_leaves_the_call_waiting_for_a_good_one(server, connect, raw):
    target = await raw("alice", "target")
    caller = await raw("alice", "caller")
    await caller.send({"op": "call", "id": "q", "to": {"device": "target"}, "method": "m"})
    call = await target.next_op("call")
    await target.send({"op": "result", "id": call["id"], "error": {"code": ""}})
    assert (await target.next_op("error"))["code"] == "bad_request"
    await target.send({"op": "result", "id": call["id"], "result": "good"})
    assert (await caller.next_op("result"))["result"] == "good"


async def test_a_waiting_call_id_cannot_be_reused_but_a_finished_one_can(server, connect, raw):
    target = await raw("alice", "target")
    caller = await raw("alice", "caller")
    await caller.send({"op": "call", "id": "q", "to": {"device": "target"}, "method": "m"})
    call = await target.next_op("call")
    await caller.send({"op": "call", "id": "q", "to": {"device": "target"}, "method": "m"})
    error = await caller.next_op("error")
    assert (error["code"], error["id"]) == ("duplicate_id", "q")
    await target.send({"op": "result", "id": call["id"], "result": 1})
    assert (await caller.next_op("result"))["result"] == 1
    await target.assert_nothing_more()  # the refused call never reached the target
    await caller.send({"op": "call", "id": "q", "to": {"device": "target"}, "method": "m"})
    call = await target.next_op("call")
    await target.send({"op": "result", "id": call["id"], "result": 2})
    assert (await caller.next_op("result"))["result"] == 2


async def test_callers_using_the_same_ids_do_not_clash(server, connect, raw):
    target = await raw("alice", "target")
    first = await raw("alice", "first")
    second = await raw("alice", "second", "msgpack")
    await first.send({"op": "call", "id": "same", "to": {"device": "target"}, "method": "m", "params": 1})
    await second.send({"op": "call", "id": "same", "to": {"device": "target"}, "method": "m", "params": 2})
    calls = [await target.next_op("call"), await target.next_op("call")]
    assert calls[0]["id"] != calls[1]["id"]
    for call in reversed(calls):
        await target.send({"op": "result", "id": call["id"], "result": call["params"] * 10})
    assert (await first.next_op("result"))["result"] == 10
    assert (await second.next_op("result"))["result"] == 20


async def test_many_concurrent_calls_to_one_target(server, connect):
    target = await connect("alice", "target")
    callers = [await connect("alice", f"caller-{n}", encoding=("json", "msgpack")[n % 2]) for n in range(4)]

    async def square(params):
        await asyncio.sleep(0)
        return params * params

    target.handle("square", square)
    calls = [caller.call("target", "square", n) for n in range(100) for caller in callers]
    results = await asyncio.gather(*calls)
    assert results == [n * n for n in range(100) for _ in callers]
    assert server.hub.events["rpc_calls"] == server.hub.events["rpc_results"] == 400
    assert len(server.node.rpc.registry) == 0


async def test_the_client_refuses_to_reuse_a_waiting_call_id(server, connect):
    target = await connect("alice", "target")
    caller = await connect("alice", "caller")
    started, release = asyncio.Event(), asyncio.Event()

    async def wait(params):
        started.set()
        await release.wait()
        return "done"

    target.handle("wait", wait)
    first = asyncio.create_task(caller.call("target", "wait", id="mine"))
    await asyncio.wait_for(started.wait(), 5)
    with pytest.raises(ValueError):
        await caller.call("target", "wait", id="mine")
    release.set()
    assert await first == "done"
