"""A third-party client written only from docs/protocol.md.

Everything protocol-related in this file (envelope shapes, selectors, receipts,
error codes, close codes, encoding conversion) comes from the document, not from
rccs' own client or server code. The client is the plain ``websockets`` library:
JSON envelopes are hand-built with ``json.dumps`` and sent as text frames, msgpack
envelopes with ``msgpack.packb`` as binary frames.

Only the ``server`` fixture (and ``rccs.testing.running_server`` for custom
settings) comes from rccs, to start a real server and mint tokens.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import hmac
import json
import math
import struct
import time
from typing import Any

import msgpack
import pytest
import websockets
from websockets.exceptions import ConnectionClosed, InvalidStatus

from rccs.testing import running_server

TIMEOUT = 5.0
MAX_SIGNED = 2**63 - 1
MAX_UNSIGNED = 2**64 - 1
MIN_SIGNED = -(2**63)


def _refuse_constant(name: str) -> Any:
    raise AssertionError(f"server sent non-strict JSON constant {name!r} (protocol.md section 1)")


def decode_json(text: str) -> Any:
    return json.loads(text, parse_constant=_refuse_constant)


def matches(env: dict[str, Any], expected: dict[str, Any], absent: tuple[str, ...] = ()) -> bool:
    """`env` holds every field of `expected` (extra fields are allowed: section 1) and none of `absent`."""
    return all(key in env and env[key] == value for key, value in expected.items()) and not any(
        key in env for key in absent
    )


def now_ms() -> int:
    return int(time.time() * 1000)


class Device:
    """One hand-built protocol connection."""

    def __init__(self, ws: Any, encoding: str):
        self.ws = ws
        self.encoding = encoding  # the encoding of the hello, i.e. of every server answer
        self.welcome: dict[str, Any] = {}
        self.presence: list[dict[str, Any]] = []
        self._ping_no = 0

    @property
    def id(self) -> str:
        return self.welcome["device"]

    async def send(self, envelope: Any, encoding: str | None = None) -> None:
        encoding = encoding or self.encoding
        if encoding == "json":
            await self.ws.send(json.dumps(envelope, allow_nan=False))
        else:
            await self.ws.send(msgpack.packb(envelope, use_bin_type=True))

    async def send_raw(self, frame: str | bytes) -> None:
        await self.ws.send(frame)

    async def recv_frame(self, timeout: float = TIMEOUT) -> str | bytes:
        """The next frame that is not a ``presence`` event (section 5.5: those may arrive at any time;
        this client sets them aside in ``self.presence``)."""
        while True:
            frame = await asyncio.wait_for(self.ws.recv(), timeout)
            try:
                envelope = decode_json(frame) if isinstance(frame, str) else msgpack.unpackb(frame, raw=False)
            except Exception:
                return frame
            if isinstance(envelope, dict) and envelope.get("op") == "presence":
                self.presence.append(envelope)
                continue
            return frame

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        frame = await self.recv_frame(timeout)
        # section 1: "The server answers every envelope on that connection in that encoding."
        if self.encoding == "json":
            assert isinstance(frame, str), f"expected a text frame on a JSON connection, got {frame!r}"
            envelope = decode_json(frame)
        else:
            assert isinstance(frame, bytes), f"expected a binary frame on a msgpack connection, got {frame!r}"
            envelope = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        assert isinstance(envelope, dict), envelope
        return envelope

    async def recv_op(self, op: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        envelope = await self.recv(timeout)
        assert envelope.get("op") == op, f"expected {op!r}, got {envelope!r}"
        return envelope

    async def ping(self, ping_id: Any = None) -> dict[str, Any]:
        if ping_id is None:
            self._ping_no += 1
            ping_id = f"ping-{self._ping_no}"
        await self.send({"op": "ping", "id": ping_id})
        pong = await self.recv()
        assert matches(pong, {"op": "pong", "id": ping_id}) and type(pong["server_time"]) is int, pong
        return pong

    async def expect_nothing(self) -> None:
        """Barrier: the next envelope on this connection must be the pong of a fresh ping.

        Anything the server wrote to this connection before it handled the ping
        (e.g. a ``msg`` that was routed before the sender got its ``routed``
        receipt) would arrive first and fail the check.
        """
        await self.ping()

    async def expect_close(self, code: int, timeout: float = TIMEOUT) -> None:
        with pytest.raises(ConnectionClosed) as info:
            while True:
                frame = await self.recv_frame(timeout)
                raise AssertionError(f"expected close {code}, got another message: {frame!r}")
        assert info.value.rcvd is not None, f"connection dropped without a close frame, expected {code}"
        assert info.value.rcvd.code == code, f"expected close code {code}, got {info.value.rcvd.code}"


@pytest.fixture
async def client(server):
    """``await client(user, device, type=..., capabilities=..., encoding=...)`` -> Device after welcome."""
    opened: list[Any] = []

    async def _open_ws(url: str | None = None) -> Any:
        ws = await websockets.connect(url or server.ws_url, proxy=None)
        opened.append(ws)
        return ws

    async def _client(
        user: str,
        device: str,
        type: str = "desktop",
        capabilities: list[str] | None = None,
        encoding: str = "json",
        token: str | None = None,
    ) -> Device:
        ws = await _open_ws()
        dev = Device(ws, encoding)
        hello_device: dict[str, Any] = {"type": type, "name": device}
        if capabilities is not None:
            hello_device["capabilities"] = capabilities
        await dev.send({"op": "hello", "token": token or server.issue_token(user, device), "device": hello_device})
        dev.welcome = await dev.recv_op("welcome")
        assert dev.welcome["user"] == user
        assert dev.welcome["device"] == device
        return dev

    _client.open_ws = _open_ws  # type: ignore[attr-defined]
    yield _client
    for ws in opened:
        await ws.close()


async def send_with_ack(sender: Device, envelope: dict[str, Any]) -> tuple[list[dict[str, Any]], list[str]]:
    """Send with ack:true; return (failed receipts before `routed`, routed.devices) per section 4.2."""
    envelope = {**envelope, "ack": True}
    await sender.send(envelope)
    failed: list[dict[str, Any]] = []
    while True:
        receipt = await sender.recv_op("receipt")
        assert receipt["id"] == envelope["id"], receipt
        if receipt["status"] == "routed":
            assert isinstance(receipt["devices"], list), receipt
            return failed, receipt["devices"]
        assert receipt["status"] == "failed", f"only `failed` receipts may precede `routed`: {receipt!r}"
        failed.append(receipt)


async def receive_and_ack(receiver: Device, msg_id: Any, sender: Device, **expect: Any) -> dict[str, Any]:
    msg = await receiver.recv_op("msg")
    assert msg["id"] == msg_id, msg
    assert msg["from"] == sender.id, msg
    for key, value in expect.items():
        assert msg[key] == value, (key, msg)
    if msg["ack"]:
        await receiver.send({"op": "ack", "seq": msg["seq"]})
    return msg


async def collect_delivered(sender: Device, msg_id: Any, devices: list[str]) -> None:
    pending = set(devices)
    while pending:
        receipt = await sender.recv_op("receipt")
        assert receipt["id"] == msg_id, receipt
        assert receipt["status"] == "delivered", receipt
        assert receipt["device"] in pending, receipt
        pending.discard(receipt["device"])


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def make_token(user: str, device: str, secret: bytes, ttl: int = 3600, **claim_overrides: Any) -> str:
    """An HS256 JWT with the section-8 claims."""
    header = b64url(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
    now = int(time.time())
    claims = {"typ": "rccs-device", "sub": user, "dev": device, "iat": now, "exp": now + ttl, **claim_overrides}
    payload = b64url(json.dumps(claims).encode())
    signature = hmac.new(secret, f"{header}.{payload}".encode(), hashlib.sha256).digest()
    return f"{header}.{payload}.{b64url(signature)}"


# section 8: the `token_secret` setting, so this file can mint (expired, wrong-typ) tokens itself
TOKEN_SECRET = "third-party-client-test-secret-0123456789"


@pytest.fixture
def server_settings():
    return {"token_secret": TOKEN_SECRET}


# ---------------------------------------------------------------------------
# 1. Two JSON devices of one user
# ---------------------------------------------------------------------------


async def test_json_hello_welcome_send_ack_receipts(server, client):
    before = now_ms()
    phone = await client("alice", "alice-phone", type="mobile", capabilities=["file_sync", "notifications"])
    desktop = await client("alice", "alice-desktop", type="desktop")
    after = now_ms()

    # section 4.1: every welcome field
    for dev, device_id in ((phone, "alice-phone"), (desktop, "alice-desktop")):
        w = dev.welcome
        assert set(w) >= {
            "op", "protocol", "session", "user", "device", "heartbeat", "server_time", "encoding", "max_message_bytes",
        }, w
        assert w["op"] == "welcome"
        assert w["protocol"] == 1 and type(w["protocol"]) is int
        assert isinstance(w["session"], str) and w["session"]
        assert w["user"] == "alice"
        assert w["device"] == device_id
        assert type(w["heartbeat"]) in (int, float) and w["heartbeat"] == 30.0
        assert type(w["server_time"]) is int and before - 5000 <= w["server_time"] <= after + 5000
        assert w["encoding"] == "json"
        assert w["max_message_bytes"] == 1048576 and type(w["max_message_bytes"]) is int
        # section 1: no extensions (no compression), even though websockets offers permessage-deflate
        assert not dev.ws.protocol.extensions
    assert phone.welcome["session"] != desktop.welcome["session"]

    # section 4.2: direct send with ack:true
    sent_at = now_ms()
    await phone.send({
        "op": "send", "id": "m-17", "to": {"device": "alice-desktop"}, "type": "task_start",
        "body": {"task": "build", "n": [1, 2.5, None, True]}, "ack": True,
    })

    # section 5.1: the msg and its documented fields; seq starts at 1 on a new connection
    msg = await desktop.recv_op("msg")
    assert set(msg) >= {"op", "id", "from", "type", "body", "ts", "ack", "seq"}, msg
    assert msg["id"] == "m-17"
    assert msg["from"] == "alice-phone"
    assert msg["type"] == "task_start"
    assert msg["body"] == {"task": "build", "n": [1, 2.5, None, True]}
    assert type(msg["ts"]) is int and sent_at - 5000 <= msg["ts"] <= now_ms() + 5000
    assert msg["ack"] is True
    assert msg["seq"] == 1

    # section 4.2: routed first (nothing failed), then delivered once the receiver acks
    routed = await phone.recv_op("receipt")
    assert matches(routed, {"op": "receipt", "id": "m-17", "status": "routed", "devices": ["alice-desktop"]}), routed
    await phone.expect_nothing()  # no `delivered` before the ack

    await desktop.send({"op": "ack", "seq": msg["seq"]})
    delivered = await phone.recv_op("receipt")
    assert matches(delivered, {"op": "receipt", "id": "m-17", "status": "delivered", "device": "alice-desktop"})

    # acking twice is ignored (section 4.3): no error, no second receipt
    await desktop.send({"op": "ack", "seq": [msg["seq"]]})
    await desktop.expect_nothing()
    await phone.expect_nothing()

    # section 3: seq increases by exactly 1 per msg; ack:false -> msg.ack false and no receipts;
    # integer ids at both ends of the 64-bit range are echoed; a missing body means null
    for n, msg_id in enumerate((MAX_UNSIGNED, MIN_SIGNED, "m-18"), start=2):
        envelope = {"op": "send", "id": msg_id, "to": {"devices": ["alice-desktop"]}, "type": "note"}
        await phone.send(envelope)
        msg = await desktop.recv_op("msg")
        assert msg["seq"] == n
        assert msg["id"] == msg_id
        assert msg["ack"] is False
        assert msg["body"] is None
    await phone.expect_nothing()

    # the reverse direction also starts its own seq at 1 (phone had no msg yet)
    await desktop.send({"op": "send", "id": "r1", "to": {"device": "alice-phone"}, "type": "user_response"})
    assert (await phone.recv_op("msg"))["seq"] == 1


# ---------------------------------------------------------------------------
# 2. Selectors
# ---------------------------------------------------------------------------


class SelectorWorld:
    """Four JSON devices of alice; `a` is the sender in every check."""

    def __init__(self, a: Device, b: Device, c: Device, d: Device):
        self.a = a
        self.everyone = {"a-sender": a, "b-mobile": b, "c-mobile": c, "d-desktop": d}
        self.counter = 0

    async def check(self, to: dict[str, Any], expected: set[str]) -> None:
        """Send with ack:true to `to`; exactly `expected` get the msg, no `failed` receipt, all delivered."""
        a = self.a
        self.counter += 1
        msg_id = f"sel-{self.counter}"
        body = {"n": self.counter}
        await a.send({"op": "send", "id": msg_id, "to": to, "type": "probe", "body": body, "ack": True})
        routed = None
        self_msg = None
        failed = []
        # with `self`, a's own msg and its routed receipt may interleave
        while routed is None or ("a-sender" in expected and self_msg is None):
            env = await a.recv()
            if env["op"] == "msg":
                assert self_msg is None, env
                self_msg = env
            else:
                assert env["op"] == "receipt" and env["id"] == msg_id, (to, env)
                if env["status"] == "failed":
                    failed.append(env)
                else:
                    assert env["status"] == "routed", (to, env)
                    routed = env
        # section 4.2: `failed` receipts only for targets it could not reach; every expected one is reachable
        assert failed == [], (to, failed)
        assert set(routed["devices"]) == expected, (to, routed)
        assert len(routed["devices"]) == len(expected), routed
        for device_id in expected:
            dev = self.everyone[device_id]
            if dev is a:
                msg = self_msg
                await a.send({"op": "ack", "seq": msg["seq"]})
            else:
                msg = await receive_and_ack(dev, msg_id, a)
            assert msg["from"] == "a-sender" and msg["body"] == body, msg
        await collect_delivered(a, msg_id, sorted(expected))
        for device_id, dev in self.everyone.items():
            if device_id not in expected:
                await dev.expect_nothing()


@pytest.fixture
async def world(client):
    a = await client("alice", "a-sender", type="desktop", capabilities=["file_sync"])
    b = await client("alice", "b-mobile", type="mobile", capabilities=["notifications"])
    c = await client("alice", "c-mobile", type="mobile", capabilities=["notifications", "file_sync"])
    d = await client("alice", "d-desktop", type="desktop", capabilities=["file_sync"])
    return SelectorWorld(a, b, c, d)


async def test_selector_device_and_devices(world):
    # devices: each listed device, duplicates ignored
    await world.check({"devices": ["b-mobile", "c-mobile", "c-mobile"]}, {"b-mobile", "c-mobile"})
    await world.check({"devices": ["d-desktop"]}, {"d-desktop"})
    await world.check({"device": "d-desktop"}, {"d-desktop"})


async def test_selector_all_and_self(world):
    # all: every online device of the user, the sender excluded...
    await world.check({"all": True}, {"b-mobile", "c-mobile", "d-desktop"})
    await world.check({"all": True, "pick": "all", "self": False}, {"b-mobile", "c-mobile", "d-desktop"})
    # ...unless self
    await world.check({"all": True, "self": True}, {"a-sender", "b-mobile", "c-mobile", "d-desktop"})
    await world.check({"device": "a-sender", "self": True}, {"a-sender"})
    await world.check({"devices": ["a-sender", "b-mobile"], "self": True}, {"a-sender", "b-mobile"})


async def test_selector_names_sender_without_self(world):
    # DISCREPANCY (protocol.md 4.2 / 5.2): the doc says the sender never receives its own message without
    # `self`, `failed` receipts are only for targets that could not be reached, and `no_route` is for a
    # selector that matched no online device "or named only the sender". Here the selector also names an
    # online device (b-mobile), yet the server adds a receipt
    # {"status":"failed","reason":"no_route","device":"a-sender"} before `routed`.
    await world.check({"devices": ["a-sender", "b-mobile"]}, {"b-mobile"})


async def test_selector_type_and_capability(world):
    await world.check({"type": "mobile"}, {"b-mobile", "c-mobile"})
    await world.check({"type": "desktop"}, {"d-desktop"})  # a is a desktop too, but it is the sender
    await world.check({"type": "desktop", "self": True}, {"a-sender", "d-desktop"})
    await world.check({"capability": "file_sync"}, {"c-mobile", "d-desktop"})
    await world.check({"capability": "notifications", "pick": "all"}, {"b-mobile", "c-mobile"})


async def test_selector_pick_one_prefers_most_recently_active(world):
    # NB: world.check() ends with barrier pings from the non-receivers, which are activity too, so every
    # pick-one check below first makes its intended device the most recently active one explicitly.
    a = world.a
    b, c, d = (world.everyone[k] for k in ("b-mobile", "c-mobile", "d-desktop"))
    await d.ping()
    await world.check({"capability": "file_sync", "pick": "one"}, {"d-desktop"})
    await c.ping()
    await world.check({"capability": "file_sync", "pick": "one"}, {"c-mobile"})
    await b.ping()
    await world.check({"type": "mobile", "pick": "one"}, {"b-mobile"})
    await b.ping()
    await world.check({"capability": "notifications", "pick": "one"}, {"b-mobile"})
    await b.ping()
    await world.check({"all": True, "pick": "one"}, {"b-mobile"})
    # the sender is never picked without self, even when it is the most recently active desktop
    await d.ping()
    await a.ping()
    await world.check({"type": "desktop", "pick": "one"}, {"d-desktop"})
    # with self it may be picked
    await d.ping()
    await a.ping()
    await world.check({"type": "desktop", "pick": "one", "self": True}, {"a-sender"})

    # an `ack` is a message to the server, so it counts as activity too ("last message to the server")
    await b.ping()
    await a.send({"op": "send", "id": "direct", "to": {"device": "c-mobile"}, "type": "x", "ack": True})
    assert (await a.recv_op("receipt"))["status"] == "routed"
    await receive_and_ack(c, "direct", a)
    await collect_delivered(a, "direct", ["c-mobile"])
    await world.check({"type": "mobile", "pick": "one"}, {"c-mobile"})


async def test_selector_devices_pick_one(world):
    # DISCREPANCY (protocol.md 4.2 selector table, `pick` applies to any selector; 5.3 `internal` = server bug):
    # a `devices` selector with "pick": "one" gets {"op":"error","code":"internal","id":...} instead of a
    # routed receipt (server log: AttributeError: 'rccs._fastpath._routing.RoutingTable' object has no
    # attribute 'most_recent').
    b, d = world.everyone["b-mobile"], world.everyone["d-desktop"]
    await b.ping()
    await d.ping()
    await world.check({"devices": ["b-mobile", "d-desktop"], "pick": "one"}, {"d-desktop"})
    await d.ping()
    await b.ping()
    await world.check({"devices": ["b-mobile", "d-desktop"], "pick": "one"}, {"b-mobile"})
    await world.check({"device": "d-desktop", "pick": "one"}, {"d-desktop"})


async def test_selector_no_match(world):
    a = world.a
    # no match: failed/no_route (no `device` field, section 5.2) then routed with an empty list
    failed, routed = await send_with_ack(a, {"op": "send", "id": "none-1", "to": {"type": "tablet"}, "type": "x"})
    assert len(failed) == 1, failed
    # section 5.2: `device` is absent for `no_route`
    assert matches(failed[0], {"id": "none-1", "status": "failed", "reason": "no_route"}, absent=("device",)), failed
    assert routed == []
    failed, routed = await send_with_ack(a, {"op": "send", "id": "none-2", "to": {"capability": "nope"}, "type": "x"})
    assert len(failed) == 1, failed
    # section 5.2: `device` is absent for `no_route`
    assert matches(failed[0], {"id": "none-2", "status": "failed", "reason": "no_route"}, absent=("device",)), failed
    assert routed == []
    for dev in world.everyone.values():
        await dev.expect_nothing()


async def test_selector_only_sender_without_self_is_no_route(world):
    # DISCREPANCY (protocol.md 5.2, status table: `failed` ... "`device` ... absent for `no_route`"):
    # the server sends {"status":"failed","reason":"no_route","device":"a-sender"}, i.e. with `device`.
    a = world.a
    failed, routed = await send_with_ack(a, {"op": "send", "id": "none-3", "to": {"device": "a-sender"}, "type": "x"})
    assert len(failed) == 1, failed
    # section 5.2: `device` is absent for `no_route`
    assert matches(failed[0], {"id": "none-3", "status": "failed", "reason": "no_route"}, absent=("device",)), failed
    assert routed == []
    await a.expect_nothing()


async def test_selector_offline_own_device(world):
    a, b = world.a, world.everyone["b-mobile"]
    # an own device that is not connected: failed/offline for it, routed for the rest
    failed, routed = await send_with_ack(
        a, {"op": "send", "id": "off-1", "to": {"devices": ["b-mobile", "z-laptop"]}, "type": "x"}
    )
    assert len(failed) == 1, failed
    assert matches(failed[0], {"id": "off-1", "status": "failed", "reason": "offline", "device": "z-laptop"}), failed
    assert routed == ["b-mobile"]
    await receive_and_ack(b, "off-1", a)
    await collect_delivered(a, "off-1", ["b-mobile"])
    for dev in world.everyone.values():
        await dev.expect_nothing()


async def test_disconnect_before_ack_queues_the_message(server, client):
    a = await client("alice", "a1")
    b = await client("alice", "b1")
    failed, routed = await send_with_ack(a, {"op": "send", "id": 7, "to": {"device": "b1"}, "type": "x"})
    assert (failed, routed) == ([], ["b1"])
    assert (await b.recv_op("msg"))["id"] == 7
    await b.ws.close()
    receipt = await a.recv_op("receipt")
    assert matches(receipt, {"op": "receipt", "id": 7, "status": "queued", "device": "b1"})


# ---------------------------------------------------------------------------
# 3. JSON <-> msgpack
# ---------------------------------------------------------------------------


async def test_json_and_msgpack_devices(server, client):
    web = await client("alice", "alice-web", type="web", encoding="json")
    mp = await client("alice", "alice-desktop", type="desktop", encoding="msgpack")
    assert web.welcome["encoding"] == "json"
    assert mp.welcome["encoding"] == "msgpack"
    assert mp.welcome["protocol"] == 1 and mp.welcome["max_message_bytes"] == 1048576

    # msgpack -> JSON: bin becomes standard base64 with padding
    blob = b"\x00\x01\xfe\xff\x10"
    body = {"blob": blob, "nested": [{"raw": b"\xfb\xff"}], "text": "héllo", "n": -3, "f": 1.5, "t": True, "z": None}
    await mp.send({"op": "send", "id": "mp-1", "to": {"device": "alice-web"}, "type": "file_chunk",
                   "body": body, "ack": True})
    msg = await web.recv_op("msg")
    assert msg["from"] == "alice-desktop" and msg["type"] == "file_chunk" and msg["seq"] == 1
    assert msg["body"] == {
        "blob": base64.b64encode(blob).decode(),  # "AAH+/xA="
        "nested": [{"raw": "+/8="}],
        "text": "héllo", "n": -3, "f": 1.5, "t": True, "z": None,
    }
    assert msg["body"]["blob"] == "AAH+/xA="
    await web.send({"op": "ack", "seq": msg["seq"]})
    assert matches(await mp.recv_op("receipt"), {"op": "receipt", "id": "mp-1", "status": "routed",
                                          "devices": ["alice-web"]})
    assert matches(await mp.recv_op("receipt"), {"op": "receipt", "id": "mp-1", "status": "delivered",
                                          "device": "alice-web"})

    # JSON -> msgpack: the standard mapping
    await web.send({"op": "send", "id": 42, "to": {"device": "alice-desktop"}, "type": "reply",
                    "body": {"s": "ok", "i": MAX_UNSIGNED, "neg": MIN_SIGNED, "f": 2.0, "e": 1e3, "l": [None, False]},
                    "ack": True})
    frame = await mp.recv_frame()
    assert isinstance(frame, bytes)
    msg = msgpack.unpackb(frame, raw=False)
    assert msg["op"] == "msg" and msg["id"] == 42 and msg["from"] == "alice-web" and msg["seq"] == 1
    assert msg["body"] == {"s": "ok", "i": MAX_UNSIGNED, "neg": MIN_SIGNED, "f": 2.0, "e": 1000.0, "l": [None, False]}
    assert isinstance(msg["body"]["f"], float) and isinstance(msg["body"]["e"], float)  # fraction/exponent -> float
    await mp.send({"op": "ack", "seq": msg["seq"]})
    assert (await web.recv_op("receipt"))["status"] == "routed"
    assert matches(await web.recv_op("receipt"), {"op": "receipt", "id": 42, "status": "delivered",
                                           "device": "alice-desktop"})


async def test_msgpack_to_json_conversion_table(server, client):
    web = await client("alice", "w", type="web", encoding="json")
    mp = await client("alice", "m", type="desktop", encoding="msgpack")
    mp2 = await client("alice", "m2", type="desktop", encoding="msgpack")

    # ext, non-string keys, NaN/inf; a body packed by hand so float 32 can be used
    ext_payload = b"\x01\x02\x03"
    ts_payload = struct.pack(">I", 1_700_000_000)  # timestamp 32
    body_obj = {
        "ext": msgpack.ExtType(5, ext_payload),
        "ts": msgpack.Timestamp(1_700_000_000),  # ext -1, 4-byte payload
        "keys": {2: "two", True: "t", None: "n", b"\x00\xff": "bin"},
        "nan": math.nan, "inf": math.inf, "ninf": -math.inf,
    }
    await mp.send({"op": "send", "id": "c-1", "to": {"device": "w"}, "type": "t", "body": body_obj})
    msg = await web.recv_op("msg")
    assert msg["body"] == {
        "ext": {"$ext": 5, "data": base64.b64encode(ext_payload).decode()},
        "ts": {"$ext": -1, "data": base64.b64encode(ts_payload).decode()},
        "keys": {"2": "two", "true": "t", "null": "n", "AP8=": "bin"},
        "nan": None, "inf": None, "ninf": None,
    }

    # float 32 -> the same number as a JSON number
    body_f32 = msgpack.packb({"f": 0.25, "g": -3.5}, use_single_float=True)
    assert b"\xca" in body_f32
    envelope = msgpack.packb({"op": "send", "id": "c-2", "to": {"device": "w"}, "type": "t"})
    envelope = bytes([envelope[0] + 1]) + envelope[1:] + msgpack.packb("body") + body_f32  # fixmap n -> n+1
    await mp.send_raw(envelope)
    msg = await web.recv_op("msg")
    assert msg["body"] == {"f": 0.25, "g": -3.5}

    # msgpack -> msgpack: the body bytes are forwarded exactly (a non-canonical uint64 1 stays uint64)
    odd_body = b"\x81\xa1k\xcf" + (1).to_bytes(8, "big")  # {"k": 1} with 1 as uint 64
    envelope = msgpack.packb({"op": "send", "id": "c-3", "to": {"device": "m2"}, "type": "t"})
    envelope = bytes([envelope[0] + 1]) + envelope[1:] + msgpack.packb("body") + odd_body
    await mp.send_raw(envelope)
    frame = await mp2.recv_frame()
    assert odd_body in frame, frame
    assert msgpack.unpackb(frame)["body"] == {"k": 1}

    # JSON -> msgpack: an integer outside the 64-bit range is unconvertible
    too_big = 2**64
    await web.send(
        {"op": "send", "id": "big-1", "to": {"device": "m"}, "type": "t", "body": {"x": too_big}, "ack": True}
    )
    assert matches(await web.recv_op("receipt"), {"op": "receipt", "id": "big-1", "status": "failed",
                                           "reason": "unconvertible", "device": "m"})
    assert matches(await web.recv_op("receipt"), {"op": "receipt", "id": "big-1", "status": "routed", "devices": []})
    await web.send({"op": "send", "id": "big-2", "to": {"device": "m"}, "type": "t", "body": [-(2**63) - 1]})
    err = await web.recv_op("error")
    assert err["code"] == "unconvertible" and err["id"] == "big-2", err
    # ...while a JSON receiver of the same send still gets it
    web2 = await client("alice", "w2", type="web", encoding="json")
    failed, routed = await send_with_ack(
        web, {"op": "send", "id": "big-3", "to": {"devices": ["m", "w2", "m2"]}, "type": "t", "body": too_big}
    )
    assert sorted(r["device"] for r in failed) == ["m", "m2"], failed
    assert all(matches(r, {"status": "failed", "reason": "unconvertible"}) for r in failed), failed
    assert routed == ["w2"]
    assert (await receive_and_ack(web2, "big-3", web))["body"] == too_big
    await collect_delivered(web, "big-3", ["w2"])
    await mp.expect_nothing()
    await mp2.expect_nothing()

    # section 1: an envelope in the other encoding is accepted, answers keep the hello encoding
    await web.send({"op": "ping", "id": "x-enc"}, encoding="msgpack")
    frame = await web.recv_frame()
    assert isinstance(frame, str), frame
    assert decode_json(frame)["op"] == "pong" and decode_json(frame)["id"] == "x-enc"
    await mp.send({"op": "ping", "id": "x-enc"}, encoding="json")
    frame = await mp.recv_frame()
    assert isinstance(frame, bytes), frame
    assert msgpack.unpackb(frame)["id"] == "x-enc"

    # section 6: bin outside `body` in a msgpack envelope -> bad_request
    await mp.send({"op": "ping", "id": b"\x01"})
    err = await mp.recv_op("error")
    assert err["code"] == "bad_request", err
    await mp.expect_nothing()


def nested_list(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


async def test_msgpack_envelope_rules(server, client):
    mp = await client("alice", "m", encoding="msgpack")
    other = await client("alice", "o", encoding="msgpack")
    # section 6: nesting limited to 32 levels "anywhere, including body". Assumed: the envelope map is
    # level 1, so a body of 31 nested arrays is the deepest allowed (the doc does not say what counts).
    await mp.send({"op": "send", "id": "deep-ok", "to": {"device": "o"}, "type": "t", "body": nested_list(31)})
    assert (await other.recv_op("msg"))["body"] == nested_list(31)
    for frame in (
        msgpack.packb({"op": "send", "id": "deep", "to": {"device": "o"}, "type": "t", "body": nested_list(32)}),
        msgpack.packb({"op": "ping", "id": "x"}).replace(b"\xa1x", b"\xa1\xff"),  # invalid UTF-8
        msgpack.packb({"op": "ping", "id": "x"}) + b"\x00",  # trailing bytes
        msgpack.packb([1, 2]),  # not a map
        msgpack.packb({"op": "send", "id": "k", "to": {1: "o"}, "type": "t"}),  # non-string key outside body
    ):
        await mp.send_raw(frame)
        err = await mp.recv_op("error")
        # the doc names no code for these; `bad_request` ("malformed msgpack") is assumed
        assert err["code"] == "bad_request", (frame, err)
        await mp.expect_nothing()
    await other.expect_nothing()


# ---------------------------------------------------------------------------
# 4. Errors and close codes
# ---------------------------------------------------------------------------


async def test_errors_keep_connection_open(server, client):
    alice = await client("alice", "alice-phone")

    async def expect_error(frame: str | bytes, code: str, **fields: Any) -> dict[str, Any]:
        await alice.send_raw(frame)
        err = await alice.recv_op("error")
        assert err["code"] == code, err
        assert isinstance(err.get("message"), str), err
        for key, value in fields.items():
            assert err.get(key) == value, (key, err)
        await alice.expect_nothing()  # still open
        return err

    # malformed JSON, not an object, missing op, non-strict JSON
    await expect_error("{not json", "bad_request")
    await expect_error("[1, 2, 3]", "bad_request")
    await expect_error('"ping"', "bad_request")
    await expect_error('{"id": "no-op"}', "bad_request", id="no-op")
    await expect_error('{"op": "ping", "id": NaN}', "bad_request")
    await expect_error('{"op": "ping", "id": "p", "x": Infinity}', "bad_request")
    await expect_error(b"\xc1", "bad_request")  # malformed msgpack
    # unknown op
    await expect_error(json.dumps({"op": "frobnicate", "id": "u-1"}), "unknown_op", id="u-1")
    # send missing / wrongly typed fields, id echoed
    await expect_error(json.dumps({"op": "send", "id": "m-18", "type": "x"}), "bad_request", id="m-18")
    await expect_error(json.dumps({"op": "send", "id": "m-19", "to": "alice-phone", "type": "x"}),
                       "bad_request", id="m-19")
    await expect_error(json.dumps({"op": "send", "id": "m-20", "to": {"all": True}}), "bad_request", id="m-20")
    await expect_error(json.dumps({"op": "send", "id": "m-21", "to": {"all": True}, "type": "x", "ack": "yes"}),
                       "bad_request", id="m-21")
    await expect_error(json.dumps({"op": "send", "id": "m-22", "to": {}, "type": "x"}), "bad_request", id="m-22")
    await expect_error(json.dumps({"op": "send", "id": "m-23", "to": {"device": "a", "all": True}, "type": "x"}),
                       "bad_request", id="m-23")
    await expect_error(json.dumps({"op": "send", "id": "m-24", "to": {"all": True, "pick": "two"}, "type": "x"}),
                       "bad_request", id="m-24")
    await expect_error(json.dumps({"op": "send", "to": {"all": True}, "type": "x"}), "bad_request")  # no id
    await expect_error(json.dumps({"op": "send", "id": "", "to": {"all": True}, "type": "x"}), "bad_request")
    await expect_error(json.dumps({"op": "send", "id": 2**64, "to": {"all": True}, "type": "x"}), "bad_request")
    # wrongly typed ack seq
    await expect_error(json.dumps({"op": "ack", "seq": "5"}), "bad_request")
    await expect_error(json.dumps({"op": "ack"}), "bad_request")
    # too_large
    await expect_error(json.dumps({"op": "send", "id": "t-1", "to": {"all": True}, "type": "x" * 129}),
                       "too_large", id="t-1")
    await expect_error(json.dumps({"op": "send", "id": "t-2", "to": {"devices": [f"d{i}" for i in range(257)]},
                                   "type": "x"}), "too_large", id="t-2")
    await expect_error(json.dumps({"op": "ack", "seq": list(range(1, 4098))}), "too_large")
    await expect_error(json.dumps({"op": "send", "id": "i" * 129, "to": {"all": True}, "type": "x"}), "too_large")

    # a second hello
    await expect_error(json.dumps({"op": "hello", "token": server.issue_token("alice", "alice-phone"),
                                   "device": {"type": "mobile"}}), "bad_request")

    # acking unknown seqs is harmless
    await alice.send({"op": "ack", "seq": [5, 6, 7]})
    await alice.send({"op": "ack", "seq": 99})
    await alice.expect_nothing()

    # unknown fields are ignored
    await alice.send({"op": "ping", "id": "fwd", "future_field": {"x": 1}})
    pong = await alice.recv_op("pong")
    assert pong["id"] == "fwd"


async def test_ping_pong(server, client):
    alice = await client("alice", "alice-phone")
    before = now_ms()
    pong = await alice.ping("p1")
    assert pong["op"] == "pong" and pong["id"] == "p1"
    assert type(pong["server_time"]) is int and before - 5000 <= pong["server_time"] <= now_ms() + 5000
    assert (await alice.ping(MAX_SIGNED))["id"] == MAX_SIGNED
    await alice.send({"op": "ping"})
    pong = await alice.recv_op("pong")
    assert "id" not in pong and type(pong["server_time"]) is int
    # fragmented messages are reassembled (section 1)
    await alice.ws.send(['{"op":"pi', 'ng","id":"frag', 'mented"}'])
    assert (await alice.recv_op("pong"))["id"] == "fragmented"


async def test_no_route_and_forbidden(server, client):
    alice = await client("alice", "alice-phone")
    alice2 = await client("alice", "alice-desktop")
    bob = await client("bob", "bob-phone")

    # ack:false to an own device that is offline (never connected) -> error no_route with the id
    await alice.send({"op": "send", "id": "nr-1", "to": {"device": "alice-laptop"}, "type": "x"})
    err = await alice.recv_op("error")
    assert err["code"] == "no_route" and err["id"] == "nr-1", err
    await alice.send({"op": "send", "id": "nr-2", "to": {"type": "tablet"}, "type": "x"})
    err = await alice.recv_op("error")
    assert err["code"] == "no_route" and err["id"] == "nr-2", err
    await alice.expect_nothing()

    # another user's device (connected) -> forbidden, nothing delivered to anyone
    for n, to in enumerate(({"device": "bob-phone"}, {"devices": ["alice-desktop", "bob-phone"]})):
        for ack in (False, True):
            msg_id = f"fb-{n}-{ack}"
            await alice.send({"op": "send", "id": msg_id, "to": to, "type": "x", "ack": ack})
            err = await alice.recv_op("error")
            assert err["code"] == "forbidden" and err["id"] == msg_id, err
            await alice.expect_nothing()
            await alice2.expect_nothing()
            await bob.expect_nothing()

    # ...and still forbidden once that device is offline again (it has connected once)
    await bob.ws.close()
    await alice.send({"op": "send", "id": "fb-off", "to": {"device": "bob-phone"}, "type": "x", "ack": True})
    err = await alice.recv_op("error")
    assert err["code"] == "forbidden" and err["id"] == "fb-off", err
    await alice.expect_nothing()

    # all/type/capability only ever reach the sender's own user
    failed, routed = await send_with_ack(alice, {"op": "send", "id": "own", "to": {"all": True}, "type": "x"})
    assert (failed, routed) == ([], ["alice-desktop"])


async def _raw_device(client, encoding: str = "json") -> Device:
    return Device(await client.open_ws(), encoding)


async def test_op_before_hello_closes_4400(server, client):
    dev = await _raw_device(client)
    await dev.send({"op": "ping", "id": "early"})
    err = await dev.recv_op("error")
    # section 5.3: `unauthorized` -- "first message is not a hello" -- closed 4400
    assert err["code"] == "unauthorized", err
    await dev.expect_close(4400)

    dev = await _raw_device(client)
    await dev.send({"op": "send", "id": "early", "to": {"all": True}, "type": "x"})
    err = await dev.recv_op("error")
    assert err["code"] == "unauthorized", err
    await dev.expect_close(4400)


async def test_bad_first_message_closes_4400(server, client):
    # malformed JSON as the first message: bad_request, closed 4400, error in JSON (text)
    dev = await _raw_device(client)
    await dev.send_raw("{nope")
    err = await dev.recv_op("error")
    assert err["code"] == "bad_request", err
    await dev.expect_close(4400)

    # malformed msgpack as the first message: the error comes as msgpack (encoding of the offending message)
    dev = await _raw_device(client, encoding="msgpack")
    await dev.send_raw(b"\xc1")
    err = await dev.recv_op("error")
    assert err["code"] == "bad_request", err
    await dev.expect_close(4400)

    # a hello without device.type
    dev = await _raw_device(client)
    await dev.send({"op": "hello", "token": server.issue_token("alice", "alice-phone"), "device": {}})
    err = await dev.recv_op("error")
    assert err["code"] == "bad_request", err
    await dev.expect_close(4400)


async def test_token_format_matches_section_8(server):
    """Section 8: HS256 JWT signed with the server secret, claims typ/sub/dev/iat/exp."""
    before = int(time.time())
    token = server.issue_token("alice", "alice-phone", ttl_seconds=600)
    header_b64, payload_b64, sig_b64 = token.split(".")
    assert json.loads(b64url_decode(header_b64))["alg"] == "HS256"
    claims = json.loads(b64url_decode(payload_b64))
    assert claims["typ"] == "rccs-device" and claims["sub"] == "alice" and claims["dev"] == "alice-phone"
    assert before - 5 <= claims["iat"] <= time.time() + 5
    assert claims["exp"] - claims["iat"] == 600
    # the doc does not say how the `token_secret` string becomes the HMAC key; UTF-8 bytes is assumed
    expected_sig = hmac.new(TOKEN_SECRET.encode(), f"{header_b64}.{payload_b64}".encode(), hashlib.sha256).digest()
    assert b64url_decode(sig_b64) == expected_sig


async def test_self_minted_token_is_accepted(server, client):
    dev = await client("alice", "alice-minted", token=make_token("alice", "alice-minted", TOKEN_SECRET.encode()))
    assert dev.welcome["device"] == "alice-minted"


@pytest.mark.parametrize(
    "token_kind", ["garbage", "garbage_jwt", "forged", "expired", "wrong_typ", "missing", "wrong_type", "empty"]
)
async def test_bad_token_closes_4401(server, client, token_kind):
    secret = TOKEN_SECRET.encode()
    tokens: dict[str, Any] = {
        "garbage": "not-a-token",
        "garbage_jwt": "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl",
        "forged": make_token("alice", "alice-phone", b"not-the-server-secret"),
        "expired": make_token("alice", "alice-phone", secret, ttl=-60),
        "wrong_typ": make_token("alice", "alice-phone", secret, typ="something-else"),
        "wrong_type": 12345,
        "empty": "",
    }
    hello: dict[str, Any] = {"op": "hello", "device": {"type": "mobile"}}
    if token_kind != "missing":
        hello["token"] = tokens[token_kind]
    dev = await _raw_device(client)
    await dev.send(hello)
    err = await dev.recv_op("error")
    # section 5.3/7: token missing, malformed, forged or expired -> `unauthorized`, closed 4401
    # (the section 8 `typ` check is assumed to fail the same way; a non-string token is read as "malformed")
    assert err["code"] == "unauthorized", err
    await dev.expect_close(4401)


async def test_device_of_other_user_closes_4403(server, client):
    await client("alice", "shared-id")
    dev = await _raw_device(client)
    await dev.send({"op": "hello", "token": server.issue_token("bob", "shared-id"), "device": {"type": "web"}})
    err = await dev.recv_op("error")
    assert err["code"] == "forbidden", err
    await dev.expect_close(4403)


async def test_reconnect_replaces_older_connection_4409(server, client):
    old = await client("alice", "alice-phone")
    other = await client("alice", "alice-desktop")
    new = await client("alice", "alice-phone")
    assert new.welcome["session"] != old.welcome["session"]
    await old.expect_close(4409)
    # messages now go to the new connection, whose seq restarts at 1
    await other.send({"op": "send", "id": "after", "to": {"device": "alice-phone"}, "type": "x"})
    msg = await new.recv_op("msg")
    assert msg["id"] == "after" and msg["seq"] == 1


async def test_message_too_large_closes_1009(server, client):
    alice = await client("alice", "alice-phone")
    limit = alice.welcome["max_message_bytes"]
    frame = json.dumps({"op": "ping", "id": "big", "pad": "x" * limit})
    assert len(frame.encode()) > limit
    with contextlib.suppress(ConnectionClosed):  # the server may close before the whole frame is written
        await alice.send_raw(frame)
    await alice.expect_close(1009)


async def test_other_path_is_404(server, client):
    with pytest.raises(InvalidStatus) as info:
        await client.open_ws(server.ws_url.rsplit("/", 1)[0] + "/v2")
    assert info.value.response.status_code == 404


async def test_hello_timeout_closes_4408():
    async with running_server(hello_timeout=0.3) as srv, websockets.connect(srv.ws_url, proxy=None) as ws:
        dev = Device(ws, "json")
        # section 2 says the server "sends an error and closes" on a hello timeout; section 7 lists
        # the error only before 4400/4401/4403. Accept an optional error envelope, then require 4408.
        with pytest.raises(ConnectionClosed) as info:
            while True:
                env = await dev.recv(timeout=TIMEOUT)
                assert env["op"] == "error", env
        assert info.value.rcvd is not None and info.value.rcvd.code == 4408, info.value
