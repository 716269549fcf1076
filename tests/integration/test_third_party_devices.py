"""A third-party client for devices, sessions and pairing, written only from docs/protocol.md.

Everything protocol-related here (envelopes, answers, error codes, close codes, session
resume/expiry, pairing) comes from the document (sections 2, 3, 4.1, 4.5-4.9, 5.3, 5.5, 7, 8
and 11), not from rccs' own client or server code. The client is the plain ``websockets``
library; JSON envelopes are sent as text frames, msgpack envelopes as binary frames.

Only ``rccs.testing.running_server`` (through the ``server`` fixture of conftest.py) comes
from rccs: it starts a real server and mints dev tokens.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import contextlib
import json
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from rccs.testing import running_server

TIMEOUT = 5.0

# section 11.1: Crockford base32 without I L O U, two groups of four
CROCKFORD = "0123456789ABCDEFGHJKMNPQRSTVWXYZ"
CODE_RE = re.compile(rf"^[{CROCKFORD}]{{4}}[- ]?[{CROCKFORD}]{{4}}$")
# section 8: `rccs_` followed by 43 URL-safe characters
CREDENTIAL_RE = re.compile(r"^rccs_[A-Za-z0-9_-]{43}$")

# section 4.5
DEVICE_FIELDS = {
    "id", "type", "name", "platform", "version", "capabilities", "metadata", "created", "last_seen", "status",
}
# section 4.8
SESSION_FIELDS = {
    "session", "device", "created", "expires_at", "connected", "connected_at", "disconnected_at", "revoked_at",
    "last_activity", "next_seq", "messages_in", "messages_out", "bytes_in", "bytes_out", "connected_ms",
    "pending", "resumable", "current",
}
# section 4.1
WELCOME_FIELDS = {
    "op", "protocol", "session", "user", "device", "heartbeat", "server_time", "expires_at", "next_seq",
    "encoding", "max_message_bytes",
}
DAY_MS = 24 * 3600 * 1000  # section 9: session_ttl default


def now_ms() -> int:
    return int(time.time() * 1000)


def _refuse_constant(name: str) -> Any:
    raise AssertionError(f"server sent non-strict JSON constant {name!r} (section 1)")


def token_exp(token: str) -> int:
    """The `exp` claim of a dev token (section 8), seconds."""
    payload = token.split(".")[1]
    return int(json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))["exp"])


def is_int(value: Any) -> bool:
    return type(value) is int


class Conn:
    """One hand-built protocol connection.

    ``presence`` events (section 5.5) may arrive at any time: ``recv`` sets them aside in
    ``self.presence``, as the document says a client should. Envelopes read while waiting for a
    presence event are kept in ``self.backlog`` and returned by the next ``recv``.
    """

    def __init__(self, ws: Any, encoding: str):
        self.ws = ws
        self.encoding = encoding  # the encoding of the first message: every answer comes in it
        self.welcome: dict[str, Any] = {}
        self.presence: list[dict[str, Any]] = []
        self.backlog: collections.deque[dict[str, Any]] = collections.deque()
        self.last_frame: str | bytes | None = None
        self._n = 0

    # -- sending ---------------------------------------------------------------------------
    async def send(self, envelope: Any, encoding: str | None = None) -> None:
        if (encoding or self.encoding) == "json":
            await self.ws.send(json.dumps(envelope, allow_nan=False))
        else:
            await self.ws.send(msgpack.packb(envelope, use_bin_type=True))

    def next_id(self, prefix: str = "r") -> str:
        self._n += 1
        return f"{prefix}-{self._n}"

    # -- receiving -------------------------------------------------------------------------
    async def _read(self, timeout: float) -> dict[str, Any]:
        frame = await asyncio.wait_for(self.ws.recv(), timeout)
        self.last_frame = frame
        # section 1: "The server answers every envelope on that connection in that encoding."
        if self.encoding == "json":
            assert isinstance(frame, str), f"expected a text frame on a JSON connection, got {frame!r}"
            envelope = json.loads(frame, parse_constant=_refuse_constant)
        else:
            assert isinstance(frame, bytes), f"expected a binary frame on a msgpack connection, got {frame!r}"
            envelope = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        assert isinstance(envelope, dict), envelope
        return envelope

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        if self.backlog:
            return self.backlog.popleft()
        while True:
            envelope = await self._read(timeout)
            if envelope.get("op") == "presence":
                self.presence.append(envelope)
                continue
            return envelope

    async def recv_op(self, op: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        envelope = await self.recv(timeout)
        assert envelope.get("op") == op, f"expected {op!r}, got {envelope!r}"
        return envelope

    async def request(self, envelope: dict[str, Any], answer_op: str | None = None) -> dict[str, Any]:
        """Send a request with an `id` and return its answer (sections 4.5-4.9: the answer echoes it)."""
        envelope = {"id": self.next_id(envelope["op"]), **envelope}
        await self.send(envelope)
        answer = await self.recv()
        assert answer.get("id") == envelope["id"], (envelope, answer)
        if answer_op is not None:
            assert answer["op"] == answer_op, (envelope, answer)
        return answer

    async def expect_error(self, envelope: dict[str, Any], code: str) -> dict[str, Any]:
        answer = await self.request(envelope)
        assert answer["op"] == "error" and answer["code"] == code, (envelope, answer)
        assert isinstance(answer.get("message"), str), answer
        return answer

    async def ping(self) -> dict[str, Any]:
        ping_id = self.next_id("ping")
        await self.send({"op": "ping", "id": ping_id})
        pong = await self.recv()
        assert pong.get("op") == "pong" and pong.get("id") == ping_id, pong
        return pong

    async def expect_nothing(self) -> None:
        """Barrier: the next envelope on this connection must be the pong of a fresh ping."""
        assert not self.backlog, list(self.backlog)
        await self.ping()

    def mark(self) -> int:
        """Position in ``self.presence``: ``wait_presence(..., since=mark)`` only looks at later events."""
        return len(self.presence)

    async def wait_presence(self, device: str, status: str, since: int = 0,
                            timeout: float = TIMEOUT) -> dict[str, Any]:
        """Wait until a presence event `status` of `device` has arrived at index >= `since`."""
        for event in self.presence[since:]:
            if event.get("device") == device and event.get("status") == status:
                return event
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no presence {device}/{status}; got {self.presence!r}")
            envelope = await self._read(remaining)
            if envelope.get("op") != "presence":
                self.backlog.append(envelope)
                continue
            self.presence.append(envelope)
            if envelope.get("device") == device and envelope.get("status") == status:
                return envelope

    def statuses(self, device: str) -> list[str]:
        return [event["status"] for event in self.presence if event.get("device") == device]

    async def expect_close(self, code: int, timeout: float = TIMEOUT) -> None:
        """The server closes with `code`; nothing but presence events may come first."""
        assert not self.backlog, list(self.backlog)
        with pytest.raises(ConnectionClosed) as info:
            while True:
                envelope = await self.recv(timeout)
                raise AssertionError(f"expected close {code}, got another envelope first: {envelope!r}")
        assert info.value.rcvd is not None, f"connection dropped without a close frame, expected {code}"
        assert info.value.rcvd.code == code, f"expected close code {code}, got {info.value.rcvd.code}"

    async def expect_error_then_close(self, error_code: str, close_code: int) -> dict[str, Any]:
        err = await self.recv_op("error")
        assert err["code"] == error_code, err
        await self.expect_close(close_code)
        return err

    def abort(self) -> None:
        """Drop the TCP connection without a close frame (a network loss)."""
        self.ws.transport.abort()


class Net:
    """Opens connections to one server and closes them at the end."""

    def __init__(self, server: Any):
        self.server = server
        self.opened: list[Any] = []

    async def open(self, encoding: str = "json") -> Conn:
        ws = await websockets.connect(self.server.ws_url, proxy=None)
        self.opened.append(ws)
        return Conn(ws, encoding)

    def token(self, user: str, device: str, ttl_seconds: int = 3600) -> str:
        return self.server.issue_token(user, device, ttl_seconds=ttl_seconds)

    async def hello(
        self,
        user: str | None,
        device: str | None,
        encoding: str = "json",
        device_info: dict[str, Any] | None = None,
        no_device: bool = False,
        **fields: Any,
    ) -> Conn:
        """Open a connection and say `hello`; by default with a fresh dev token for user/device and a
        `device` map (section 4.1). Extra fields (credential=, token=, resume=) go into the hello."""
        conn = await self.open(encoding)
        hello: dict[str, Any] = {"op": "hello"}
        if "credential" not in fields and "token" not in fields:
            assert user is not None and device is not None
            hello["token"] = self.token(user, device)
        if not no_device:
            hello["device"] = device_info or {"type": "desktop", "name": device}
        hello.update(fields)
        await conn.send(hello)
        conn.welcome = await conn.recv_op("welcome")
        check_welcome(conn.welcome, encoding)
        if user is not None:
            assert conn.welcome["user"] == user, conn.welcome
        if device is not None:
            assert conn.welcome["device"] == device, conn.welcome
        return conn

    async def close_all(self) -> None:
        for ws in self.opened:
            with contextlib.suppress(Exception):
                await ws.close()


def check_welcome(welcome: dict[str, Any], encoding: str) -> None:
    assert set(welcome) >= WELCOME_FIELDS, welcome
    assert welcome["protocol"] == 1
    assert isinstance(welcome["session"], str) and 0 < len(welcome["session"]) <= 128, welcome
    assert welcome["encoding"] == encoding, welcome
    assert is_int(welcome["server_time"]) and is_int(welcome["expires_at"]) and is_int(welcome["next_seq"]), welcome
    assert welcome["expires_at"] > welcome["server_time"], welcome


@pytest.fixture
async def net(server) -> AsyncIterator[Net]:
    n = Net(server)
    yield n
    await n.close_all()


@contextlib.asynccontextmanager
async def custom_net(**settings: Any) -> AsyncIterator[Net]:
    """A server with section-9 settings overridden."""
    async with running_server(**settings) as srv:
        n = Net(srv)
        try:
            yield n
        finally:
            await n.close_all()


# ---------------------------------------------------------------------------
# pairing helpers (section 11)
# ---------------------------------------------------------------------------


async def pair_create(issuer: Conn, **options: Any) -> dict[str, Any]:
    answer = await issuer.request({"op": "pair.create", **options}, "pair.code")
    assert CODE_RE.match(answer["code"]), answer
    assert isinstance(answer["uri"], str) and answer["uri"].startswith("rccs:pair?"), answer
    assert is_int(answer["expires_at"]) and answer["expires_at"] > now_ms(), answer
    assert type(answer["approve"]) is bool, answer
    return answer


def sloppy(code: str) -> str:
    """The code as a user might type it (section 11.2: case, spaces, dashes, I/L -> 1, O -> 0)."""
    text = code.replace("-", " ").lower().replace("1", "l").replace("0", "o")
    return f" {text[:2]}-{text[2:]} "


def wrong_secret(code: str) -> str:
    """Same first half (the code's name), another second half (its secret)."""
    plain = code.replace("-", "").replace(" ", "")
    last = plain[-1]
    other = CROCKFORD[(CROCKFORD.index(last) + 1) % len(CROCKFORD)]
    return f"{plain[:4]}-{plain[4:7]}{other}"


LAPTOP = {"type": "desktop", "name": "Laptop", "platform": "macos", "capabilities": ["shell"]}


async def redeem(conn: Conn, code: str, device: dict[str, Any] | None = None) -> dict[str, Any]:
    """Send pair.redeem (as first message) and return the first answer."""
    rid = conn.next_id("redeem")
    await conn.send({"op": "pair.redeem", "id": rid, "code": code, "device": device or LAPTOP})
    answer = await conn.recv()
    assert answer.get("id") == rid, answer
    return answer


def check_paired(paired: dict[str, Any], user: str) -> None:
    assert paired["op"] == "paired", paired
    assert paired["user"] == user, paired
    assert isinstance(paired["device"], str) and paired["device"], paired
    assert CREDENTIAL_RE.match(paired["credential"]), paired


def check_device_entry(entry: dict[str, Any]) -> None:
    assert set(entry) >= DEVICE_FIELDS, entry
    assert entry["status"] in ("online", "away", "offline"), entry
    assert is_int(entry["created"]) and is_int(entry["last_seen"]), entry
    assert isinstance(entry["capabilities"], list) and isinstance(entry["metadata"], dict), entry


async def pair_new_device(net: Net, issuer: Conn, encoding: str = "json") -> tuple[Conn, dict[str, Any]]:
    """Pair a laptop with a code without approval; return its connection (after welcome) and `paired`."""
    code = await pair_create(issuer)
    laptop = await net.open(encoding)
    paired = await redeem(laptop, code["code"])
    check_paired(paired, issuer.welcome["user"])
    laptop.welcome = await laptop.recv_op("welcome")
    check_welcome(laptop.welcome, encoding)
    joined = await issuer.recv_op("pair.joined")
    assert joined["device"]["id"] == paired["device"], joined
    return laptop, paired


# ---------------------------------------------------------------------------
# 1. Pairing (section 11) and credentials (section 8)
# ---------------------------------------------------------------------------


async def test_pairing_without_approval_and_credential_hello(tmp_path: Path):
    async with custom_net(data_dir=str(tmp_path)) as net:
        phone = await net.hello("alice", "alice-phone", device_info={"type": "mobile", "name": "Phone"})
        desktop = await net.hello("alice", "alice-desktop")

        code = await pair_create(phone)
        assert code["approve"] is False, code
        assert "code=" in code["uri"], code

        # the new device redeems the code, typed sloppily, as its first message
        laptop = await net.open()
        started = now_ms()
        paired = await redeem(laptop, sloppy(code["code"]))
        check_paired(paired, "alice")
        welcome = await laptop.recv_op("welcome")
        check_welcome(welcome, "json")
        assert welcome["user"] == "alice" and welcome["device"] == paired["device"], welcome
        assert welcome["next_seq"] == 1, welcome
        # section 2: a session opened by a credential lasts session_ttl (24 h)
        assert abs(welcome["expires_at"] - (started + DAY_MS)) < 10_000, welcome
        laptop.welcome = welcome

        # every connected device of the user hears who joined; approved_by is the code's issuer
        for dev in (phone, desktop):
            joined = await dev.recv_op("pair.joined")
            check_device_entry(joined["device"])
            assert joined["device"]["id"] == paired["device"], joined
            assert joined["device"]["type"] == "desktop" and joined["device"]["name"] == "Laptop", joined
            assert joined["device"]["platform"] == "macos" and joined["device"]["capabilities"] == ["shell"]
            assert joined["approved_by"] == "alice-phone", joined
            await dev.wait_presence(paired["device"], "online")

        # the new device is reachable at once
        await phone.send({"op": "send", "id": "hi", "to": {"device": paired["device"]}, "type": "x", "ack": True})
        assert (await phone.recv_op("receipt"))["devices"] == [paired["device"]]
        hello_msg = await laptop.recv_op("msg")
        assert hello_msg["from"] == "alice-phone"
        await laptop.send({"op": "ack", "seq": hello_msg["seq"]})  # else it waits in the inbox for the next hello
        assert (await phone.recv_op("receipt"))["status"] == "delivered"

        # section 8: the server stores only the credential's SHA-256, never the credential itself
        for path in Path(net.server.node.settings.data_dir).rglob("*"):
            if path.is_file():
                assert paired["credential"].encode() not in path.read_bytes(), path

        # later sessions: hello with the credential, no device map needed for a known device
        await laptop.ws.close()
        for _ in range(2):
            again = await net.hello("alice", paired["device"], credential=paired["credential"], no_device=True)
            assert again.welcome["session"] != welcome["session"]
            assert abs(again.welcome["expires_at"] - (now_ms() + DAY_MS)) < 10_000, again.welcome
            await again.ping()
            await again.ws.close()

        # the paired device is registered: listed after the older ones
        devices = (await desktop.request({"op": "devices"}, "devices"))["devices"]
        assert [d["id"] for d in devices] == ["alice-phone", "alice-desktop", paired["device"]], devices


async def test_pairing_with_approval_approved_msgpack_newcomer(net):
    phone = await net.hello("alice", "alice-phone")
    desktop = await net.hello("alice", "alice-desktop")
    bob = await net.hello("bob", "bob-phone")

    code = await pair_create(phone, approve=True, ttl=600)
    assert code["approve"] is True, code
    assert abs(code["expires_at"] - (now_ms() + 600_000)) < 10_000, code

    # the new device speaks msgpack: every answer comes as msgpack
    laptop = await net.open("msgpack")
    pending = await redeem(laptop, code["code"])
    assert pending["op"] == "pair.pending", pending
    assert isinstance(pending["request"], str) and pending["request"], pending
    assert is_int(pending["expires_at"]), pending

    # every connected device of the user is asked
    for dev in (phone, desktop):
        request = await dev.recv_op("pair.request")
        assert request["request"] == pending["request"], request
        assert request["issuer"] == "alice-phone", request
        assert isinstance(request["address"], str) and request["address"], request
        assert request["device"]["type"] == "desktop" and request["device"]["name"] == "Laptop", request
        assert request["device"]["capabilities"] == ["shell"], request
        assert is_int(request["expires_at"]), request
    # ...and nobody else
    await bob.expect_nothing()

    ok = await desktop.request({"op": "pair.approve", "request": pending["request"]})
    assert ok["op"] == "ok", ok

    paired = await laptop.recv()
    check_paired(paired, "alice")
    assert paired["id"] == pending["id"], paired
    welcome = await laptop.recv_op("welcome")
    check_welcome(welcome, "msgpack")
    assert welcome["device"] == paired["device"], welcome
    for dev in (phone, desktop):
        joined = await dev.recv_op("pair.joined")
        assert joined["device"]["id"] == paired["device"], joined
        assert joined["approved_by"] == "alice-desktop", joined

    # an already decided request: not_found
    await phone.expect_error({"op": "pair.approve", "request": pending["request"]}, "not_found")
    await phone.expect_error({"op": "pair.deny", "request": pending["request"]}, "not_found")
    # an unknown request
    await phone.expect_error({"op": "pair.approve", "request": "no-such-request"}, "not_found")
    # another user cannot decide alice's requests either
    await bob.expect_error({"op": "pair.deny", "request": pending["request"]}, "not_found")

    # the msgpack credential works for a msgpack hello later
    await laptop.ws.close()
    later = await net.hello("alice", paired["device"], encoding="msgpack", credential=paired["credential"],
                            no_device=True)
    await later.ping()
    await bob.expect_nothing()
    assert bob.presence == [], bob.presence


async def test_pairing_with_approval_denied():
    # section 11.2: while waiting for approval "the hello timeout no longer applies"
    async with custom_net(hello_timeout=1) as net:
        phone = await net.hello("alice", "alice-phone")
        code = await pair_create(phone, approve=True)
        laptop = await net.open()
        pending = await redeem(laptop, code["code"])
        assert pending["op"] == "pair.pending", pending
        request = await phone.recv_op("pair.request")
        assert request["request"] == pending["request"], request

        # longer than hello_timeout: the pending device is neither answered nor closed
        with pytest.raises(TimeoutError):
            await laptop.recv(timeout=2.0)

        ok = await phone.request({"op": "pair.deny", "request": pending["request"]})
        assert ok["op"] == "ok", ok
        # section 11.3: the user's devices learn the request is closed
        withdrawn = await phone.recv_op("pair.withdrawn")
        assert (withdrawn["request"], withdrawn["reason"]) == (pending["request"], "denied"), withdrawn
        # section 11.2 / 5.3: denied -> error forbidden, close 4403
        await laptop.expect_error_then_close("forbidden", 4403)
        await phone.expect_error({"op": "pair.approve", "request": pending["request"]}, "not_found")

        # nobody joined
        devices = (await phone.request({"op": "devices"}, "devices"))["devices"]
        assert [d["id"] for d in devices] == ["alice-phone"], devices


async def test_pairing_request_withdrawn_when_newcomer_leaves(net):
    phone = await net.hello("alice", "alice-phone")
    code = await pair_create(phone, approve=True)
    laptop = await net.open()
    pending = await redeem(laptop, code["code"])
    assert pending["op"] == "pair.pending", pending
    assert (await phone.recv_op("pair.request"))["request"] == pending["request"]

    await laptop.ws.close()
    withdrawn = await phone.recv_op("pair.withdrawn")
    assert (withdrawn["request"], withdrawn["reason"]) == (pending["request"], "left"), withdrawn
    await phone.expect_error({"op": "pair.approve", "request": pending["request"]}, "not_found")


async def test_pairing_request_not_approved_in_time():
    # section 11.2: the request expires after pairing_code_ttl -> error forbidden and close 4403
    async with custom_net(pairing_code_ttl=1) as net:
        phone = await net.hello("alice", "alice-phone")
        code = await pair_create(phone, approve=True)
        laptop = await net.open()
        pending = await redeem(laptop, code["code"])
        assert pending["op"] == "pair.pending", pending
        assert (await phone.recv_op("pair.request"))["request"] == pending["request"]
        await laptop.expect_error_then_close("forbidden", 4403)
        withdrawn = await phone.recv_op("pair.withdrawn")
        assert (withdrawn["request"], withdrawn["reason"]) == (pending["request"], "expired"), withdrawn
        await phone.expect_error({"op": "pair.approve", "request": pending["request"]}, "not_found")


async def test_invalid_code_one_answer_for_all(net):
    phone = await net.hello("alice", "alice-phone")

    # a code works once
    used = await pair_create(phone)
    newcomer = await net.open()
    assert (await redeem(newcomer, used["code"]))["op"] == "paired"
    await newcomer.recv_op("welcome")
    await phone.recv_op("pair.joined")
    first_code = used["code"]

    other = await pair_create(phone)
    laptop = await net.open()
    errors = []
    for bad in (first_code, "ZZZZ-ZZZZ", "not a code!", "12", wrong_secret(other["code"])):
        err = await redeem(laptop, bad)
        assert err["op"] == "error" and err["code"] == "invalid_code", (bad, err)
        errors.append(err)
    # "one answer for all": the refusals differ in nothing but the echoed id
    shapes = [{k: v for k, v in err.items() if k != "id"} for err in errors]
    assert all(shape == shapes[0] for shape in shapes), shapes

    # the connection stayed open: the user retypes the right code
    paired = await redeem(laptop, other["code"])
    check_paired(paired, "alice")
    assert (await laptop.recv_op("welcome"))["device"] == paired["device"]


async def test_pairing_code_burnt_after_max_wrong_secrets(net):
    phone = await net.hello("alice", "alice-phone")
    code = await pair_create(phone)
    laptop = await net.open()
    for _ in range(5):  # section 9: pairing_max_attempts default 5
        err = await redeem(laptop, wrong_secret(code["code"]))
        assert err["op"] == "error" and err["code"] == "invalid_code", err
    err = await redeem(laptop, code["code"])
    assert err["op"] == "error" and err["code"] == "invalid_code", err


async def test_pairing_rate_limited():
    async with custom_net(pairing_attempts_per_minute=3) as net:
        phone = await net.hello("alice", "alice-phone")
        code = await pair_create(phone)
        laptop = await net.open()
        for _ in range(3):
            err = await redeem(laptop, "ZZZZ-ZZZZ")
            assert err["code"] == "invalid_code", err
        for attempt in (code["code"], "ZZZZ-ZZZZ"):  # the connection stays open
            err = await redeem(laptop, attempt)
            assert err["op"] == "error" and err["code"] == "rate_limited", err
            assert type(err["retry_after"]) in (int, float) and 0 < err["retry_after"] <= 60, err


async def test_pairing_approval_forced_by_server_setting():
    # section 11.1: "the server setting `pairing_approval = true` forces this for every code"
    async with custom_net(pairing_approval=True) as net:
        phone = await net.hello("alice", "alice-phone")
        code = await pair_create(phone)
        assert code["approve"] is True, code
        laptop = await net.open()
        assert (await redeem(laptop, code["code"]))["op"] == "pair.pending"


async def test_unknown_credential_closes_4401(net):
    for credential in ("rccs_" + "A" * 43, "not-a-credential"):
        conn = await net.open()
        await conn.send({"op": "hello", "credential": credential})
        await conn.expect_error_then_close("unauthorized", 4401)


# ---------------------------------------------------------------------------
# 2. devices, device.update, presence (4.5-4.7, 5.5)
# ---------------------------------------------------------------------------


async def test_devices_listing_and_status(net):
    phone_info = {
        "type": "mobile", "name": "Alice's phone", "platform": "ios", "version": "1.4.0",
        "capabilities": ["file_sync", "notifications"], "metadata": {"theme": "dark", "n": [1, 2]},
    }
    before = now_ms()
    phone = await net.hello("alice", "alice-phone", device_info=phone_info)
    desktop = await net.hello("alice", "alice-desktop", device_info={"type": "desktop", "name": "Desk"})
    tablet = await net.hello("alice", "alice-tablet", device_info={"type": "tablet"})
    bob = await net.hello("bob", "bob-phone")
    await tablet.ws.close()
    await phone.wait_presence("alice-tablet", "offline")

    answer = await phone.request({"op": "devices", "id": 1})
    assert answer["op"] == "devices" and answer["id"] == 1, answer  # integer id echoed
    devices = answer["devices"]
    for entry in devices:
        check_device_entry(entry)
    # the user's registered devices, oldest first; never another user's
    assert [d["id"] for d in devices] == ["alice-phone", "alice-desktop", "alice-tablet"], devices
    by_id = {d["id"]: d for d in devices}
    p = by_id["alice-phone"]
    assert (p["type"], p["name"], p["platform"], p["version"]) == ("mobile", "Alice's phone", "ios", "1.4.0"), p
    assert p["capabilities"] == ["file_sync", "notifications"] and p["metadata"] == phone_info["metadata"], p
    assert before - 5000 <= p["created"] <= now_ms() + 5000, p
    assert by_id["alice-desktop"]["name"] == "Desk"
    assert [by_id[k]["status"] for k in ("alice-phone", "alice-desktop", "alice-tablet")] == [
        "online", "online", "offline"]
    assert by_id["alice-tablet"]["last_seen"] >= by_id["alice-tablet"]["created"]

    # presence.set away shows up as status `away`
    assert (await phone.request({"op": "presence.set", "status": "away"}))["op"] == "ok"
    devices = (await desktop.request({"op": "devices"}, "devices"))["devices"]
    assert {d["id"]: d["status"] for d in devices}["alice-phone"] == "away", devices

    bob_devices = (await bob.request({"op": "devices"}, "devices"))["devices"]
    assert [d["id"] for d in bob_devices] == ["bob-phone"], bob_devices

    # section 4.1: a new hello's device fields replace the registered ones (others are kept)
    phone2 = await net.hello("alice", "alice-phone", device_info={"type": "mobile", "name": "Renamed"})
    await phone.expect_close(4409)
    entry = {d["id"]: d for d in (await phone2.request({"op": "devices"}, "devices"))["devices"]}["alice-phone"]
    assert entry["name"] == "Renamed" and entry["platform"] == "ios", entry
    assert entry["status"] == "online", entry

    # a known device may say hello with a token and no device map at all
    tablet2 = await net.hello("alice", "alice-tablet", no_device=True)
    await tablet2.ping()


async def test_device_update_then_capability_selector(net):
    desktop = await net.hello("alice", "alice-desktop",
                              device_info={"type": "desktop", "name": "Desk", "capabilities": ["shell"]})
    phone = await net.hello("alice", "alice-phone", device_info={"type": "mobile", "name": "Phone"})
    bob = await net.hello("bob", "bob-phone")

    # nobody has `camera` yet
    await phone.send({"op": "send", "id": "c0", "to": {"capability": "camera"}, "type": "snap", "ack": True})
    failed = await phone.recv_op("receipt")
    assert failed["status"] == "failed" and failed["reason"] == "no_route", failed
    routed = await phone.recv_op("receipt")
    assert routed["status"] == "routed" and routed["devices"] == [], routed

    # the desktop describes itself anew
    answer = await desktop.request(
        {"op": "device.update", "set": {"name": "Work laptop", "capabilities": ["shell", "camera"],
                                        "metadata": {"theme": "dark"}}}, "device")
    entry = answer["device"]
    check_device_entry(entry)
    assert entry["id"] == "alice-desktop" and entry["name"] == "Work laptop", entry
    assert entry["capabilities"] == ["shell", "camera"] and entry["metadata"] == {"theme": "dark"}, entry
    assert entry["type"] == "desktop", entry

    # "a capability selector sent after the answer sees the new values"
    await phone.send({"op": "send", "id": "c1", "to": {"capability": "camera"}, "type": "snap", "ack": True})
    routed = await phone.recv_op("receipt")
    assert routed["status"] == "routed" and routed["devices"] == ["alice-desktop"], routed
    msg = await desktop.recv_op("msg")
    assert msg["id"] == "c1" and msg["from"] == "alice-phone", msg

    # renaming / retyping another device of the same user, then a type selector reaches it
    answer = await desktop.request(
        {"op": "device.update", "device": "alice-phone", "set": {"name": "Old phone", "type": "tablet"}}, "device")
    assert answer["device"]["id"] == "alice-phone" and answer["device"]["name"] == "Old phone", answer
    assert answer["device"]["type"] == "tablet", answer
    await desktop.send({"op": "send", "id": "t1", "to": {"type": "tablet"}, "type": "x", "ack": True})
    routed = await desktop.recv_op("receipt")
    assert routed["status"] == "routed" and routed["devices"] == ["alice-phone"], routed
    assert (await phone.recv_op("msg"))["id"] == "t1"

    # refusals (the connection stays open)
    await desktop.expect_error({"op": "device.update", "set": {"colour": "red"}}, "bad_request")
    await desktop.expect_error({"op": "device.update", "set": {"name": "x" * 257}}, "too_large")
    await desktop.expect_error({"op": "device.update", "set": {"capabilities": ["c"] * 65}}, "too_large")
    await desktop.expect_error({"op": "device.update", "set": {"metadata": {"k": "v" * 5000}}}, "too_large")
    await desktop.expect_error({"op": "device.update", "device": "alice-nothing", "set": {"name": "n"}}, "not_found")
    await bob.expect_error({"op": "device.update", "device": "alice-desktop", "set": {"name": "pwn"}}, "forbidden")

    # nothing of the refused updates happened
    devices = {d["id"]: d for d in (await phone.request({"op": "devices"}, "devices"))["devices"]}
    assert devices["alice-desktop"]["name"] == "Work laptop", devices
    assert devices["alice-desktop"]["capabilities"] == ["shell", "camera"], devices
    await desktop.ping()


async def test_presence_order_and_scope(net):
    desktop = await net.hello("alice", "alice-desktop")
    bob = await net.hello("bob", "bob-phone")

    phone = await net.hello("alice", "alice-phone")
    online = await desktop.wait_presence("alice-phone", "online")
    assert is_int(online["last_seen"]), online

    mark = desktop.mark()
    ok = await phone.request({"op": "presence.set", "id": 3, "status": "away"})
    assert ok["op"] == "ok" and ok["id"] == 3, ok
    await desktop.wait_presence("alice-phone", "away", since=mark)
    # the same status again is not announced twice in a row
    assert (await phone.request({"op": "presence.set", "status": "away"}))["op"] == "ok"
    # without id: no answer (the next envelope is the pong)
    mark = desktop.mark()
    await phone.send({"op": "presence.set", "status": "online"})
    await phone.expect_nothing()
    await desktop.wait_presence("alice-phone", "online", since=mark)

    mark = desktop.mark()
    await phone.ws.close()
    offline = await desktop.wait_presence("alice-phone", "offline", since=mark)
    assert is_int(offline["last_seen"]), offline
    await desktop.expect_nothing()
    assert desktop.statuses("alice-phone") == ["online", "away", "online", "offline"], desktop.presence

    # a device is never told about itself; other users hear nothing
    await bob.expect_nothing()
    assert bob.presence == [], bob.presence
    assert [e for e in desktop.presence if e.get("device") != "alice-phone"] == [], desktop.presence
    assert all(e.get("device") != "bob-phone" for e in desktop.presence), desktop.presence

    # a bad status is refused
    await desktop.expect_error({"op": "presence.set", "status": "busy"}, "bad_request")


# ---------------------------------------------------------------------------
# 3. device.revoke, sessions, session.revoke (4.8)
# ---------------------------------------------------------------------------


async def test_device_revoke_closes_4410_and_credential_refused(net):
    phone = await net.hello("alice", "alice-phone")
    desktop = await net.hello("alice", "alice-desktop")
    bob = await net.hello("bob", "bob-phone")
    laptop, paired = await pair_new_device(net, phone)
    await desktop.recv_op("pair.joined")
    laptop_id = paired["device"]

    started = time.monotonic()
    ok = await phone.request({"op": "device.revoke", "device": laptop_id})
    assert ok["op"] == "ok", ok
    # its connection is closed with 4410 within a second, with no error envelope
    await laptop.expect_close(4410)
    assert time.monotonic() - started < 1.5, time.monotonic() - started
    for dev in (phone, desktop):
        event = await dev.wait_presence(laptop_id, "revoked")
        assert is_int(event["last_seen"]), event
    await bob.expect_nothing()
    assert bob.presence == [], bob.presence

    # its credential stops working at once: unauthorized, 4401
    conn = await net.open()
    await conn.send({"op": "hello", "credential": paired["credential"]})
    await conn.expect_error_then_close("unauthorized", 4401)
    # ...also in msgpack: the error comes in the encoding of the hello
    conn = await net.open("msgpack")
    await conn.send({"op": "hello", "credential": paired["credential"], "device": LAPTOP})
    await conn.expect_error_then_close("unauthorized", 4401)
    # its id is never reused: a dev token for it -> error `revoked`, close 4410
    conn = await net.open()
    await conn.send({"op": "hello", "token": net.token("alice", laptop_id), "device": LAPTOP})
    await conn.expect_error_then_close("revoked", 4410)

    # gone from the list; revoking again -> not_found
    devices = (await phone.request({"op": "devices"}, "devices"))["devices"]
    assert [d["id"] for d in devices] == ["alice-phone", "alice-desktop"], devices
    await phone.expect_error({"op": "device.revoke", "device": laptop_id}, "not_found")
    await phone.expect_error({"op": "device.revoke", "device": "alice-unknown"}, "not_found")

    # a device revoking itself gets `ok` before the close
    ok = await desktop.request({"op": "device.revoke", "device": "alice-desktop"})
    assert ok["op"] == "ok", ok
    await desktop.expect_close(4410)
    await phone.wait_presence("alice-desktop", "revoked")


async def test_device_revoke_of_other_users_device_is_forbidden(net):
    # sections 4.5-4.9 preamble: "naming another user's device gives `forbidden` (`device.update`,
    # `device.revoke`; ...)"; nothing changes.
    alice = await net.hello("alice", "alice-phone")
    bob = await net.hello("bob", "bob-phone")
    await bob.expect_error({"op": "device.revoke", "device": "alice-phone"}, "forbidden")
    await alice.ping()


async def test_sessions_listing_and_session_revoke(net):
    phone = await net.hello("alice", "alice-phone")
    desktop = await net.hello("alice", "alice-desktop")
    bob = await net.hello("bob", "bob-phone")
    await phone.send({"op": "send", "id": "s1", "to": {"device": "alice-desktop"}, "type": "x"})
    assert (await desktop.recv_op("msg"))["seq"] == 1

    answer = await phone.request({"op": "sessions", "id": 5})
    assert answer["op"] == "sessions" and answer["id"] == 5, answer
    sessions = {s["session"]: s for s in answer["sessions"]}
    for entry in sessions.values():
        assert set(entry) >= SESSION_FIELDS, entry
    # only the user's own sessions
    assert set(sessions) == {phone.welcome["session"], desktop.welcome["session"]}, answer
    mine, theirs = sessions[phone.welcome["session"]], sessions[desktop.welcome["session"]]
    assert mine["device"] == "alice-phone" and mine["current"] is True, mine
    assert theirs["device"] == "alice-desktop" and theirs["current"] is False, theirs
    for entry, welcome in ((mine, phone.welcome), (theirs, desktop.welcome)):
        assert entry["connected"] is True and entry["resumable"] is False, entry
        assert entry["disconnected_at"] is None and entry["revoked_at"] is None, entry
        assert entry["expires_at"] == welcome["expires_at"], (entry, welcome)
        assert entry["connected_ms"] == 0, entry  # no finished connection yet
        for key in ("created", "connected_at", "last_activity", "messages_in", "messages_out", "bytes_in",
                    "bytes_out", "pending"):
            assert is_int(entry[key]), (key, entry)
    assert theirs["next_seq"] == 2, theirs  # one msg sent in that session
    assert theirs["messages_out"] >= 1 and theirs["bytes_out"] > 0, theirs
    assert mine["messages_in"] >= 1 and mine["bytes_in"] > 0, mine

    # refusals: unknown id, another user's session
    await phone.expect_error({"op": "session.revoke", "session": "no-such-session"}, "not_found")
    await bob.expect_error({"op": "session.revoke", "session": desktop.welcome["session"]}, "not_found")
    await desktop.ping()

    # the answer to session.revoke is not spelled out (section 4.8); `ok` with the id is assumed
    mark = phone.mark()
    ok = await phone.request({"op": "session.revoke", "session": desktop.welcome["session"]})
    assert ok["op"] == "ok", ok
    await desktop.expect_close(4410)
    await phone.wait_presence("alice-desktop", "offline", since=mark)

    sessions = {s["session"]: s for s in (await phone.request({"op": "sessions"}, "sessions"))["sessions"]}
    old = sessions.get(desktop.welcome["session"])
    if old is not None:  # "ended ones not yet cleaned up"
        assert old["connected"] is False and old["resumable"] is False, old
        assert is_int(old["revoked_at"]) and is_int(old["disconnected_at"]), old

    # the device itself is not revoked: a hello works; the revoked session cannot be resumed
    again = await net.hello("alice", "alice-desktop",
                            resume={"session": desktop.welcome["session"], "last_seq": 1})
    assert again.welcome["resumed"] is False, again.welcome
    assert again.welcome["resume_error"] == "unknown_session", again.welcome
    assert again.welcome["session"] != desktop.welcome["session"], again.welcome
    assert again.welcome["next_seq"] == 1, again.welcome
    await phone.wait_presence("alice-desktop", "online", since=mark)
    await again.expect_nothing()


# ---------------------------------------------------------------------------
# 4. Session resume (section 2, 4.1)
# ---------------------------------------------------------------------------


async def test_resume_after_dropped_connection_msgpack(net):
    phone = await net.hello("alice", "alice-phone")
    desk = await net.hello("alice", "alice-desktop", encoding="msgpack")
    session = desk.welcome["session"]
    await phone.wait_presence("alice-desktop", "online")
    seen = phone.mark()
    assert desk.welcome.get("resumed", False) is False, desk.welcome
    assert desk.welcome["next_seq"] == 1, desk.welcome

    # seq 1 is processed and acked
    await phone.send({"op": "send", "id": "m1", "to": {"device": "alice-desktop"}, "type": "x", "ack": True})
    assert (await phone.recv_op("receipt"))["status"] == "routed"
    m1 = await desk.recv_op("msg")
    assert m1["seq"] == 1, m1
    await desk.send({"op": "ack", "seq": 1})
    assert (await phone.recv_op("receipt"))["status"] == "delivered"

    # seq 2 arrives but the network goes away before the device processes it
    await phone.send({"op": "send", "id": "m2", "to": {"device": "alice-desktop"}, "type": "x",
                      "body": {"n": 2, "blob": "z" * 50}, "ack": True})
    assert (await phone.recv_op("receipt"))["devices"] == ["alice-desktop"]
    m2 = await desk.recv_op("msg")
    m2_frame = desk.last_frame
    assert m2["seq"] == 2 and m2["id"] == "m2", m2
    desk.abort()

    # announced offline at once; no failed receipt while the session is resumable
    await phone.wait_presence("alice-desktop", "offline", since=seen)
    await phone.expect_nothing()
    sessions = {s["session"]: s for s in (await phone.request({"op": "sessions"}, "sessions"))["sessions"]}
    lost = sessions[session]
    assert lost["connected"] is False and lost["resumable"] is True, lost
    assert lost["pending"] == 1 and is_int(lost["disconnected_at"]), lost
    assert lost["next_seq"] == 3, lost

    # the device comes back with resume (msgpack): same session, unacked msg again with its seq
    back = await net.hello("alice", "alice-desktop", encoding="msgpack", no_device=True,
                           resume={"session": session, "last_seq": 1})
    assert back.welcome["resumed"] is True, back.welcome
    assert back.welcome["session"] == session, back.welcome
    assert "resume_error" not in back.welcome, back.welcome
    assert back.welcome["next_seq"] == 3, back.welcome
    again = await back.recv_op("msg")
    assert again == m2, (again, m2)  # same seq, id, ts, body
    assert back.last_frame == m2_frame  # "with its original `seq` and bytes"
    await phone.wait_presence("alice-desktop", "online", since=seen)
    assert [e["status"] for e in phone.presence[seen:]] == ["offline", "online"], phone.presence

    # the receipt comes only after the ack on the new connection
    await phone.expect_nothing()
    await back.send({"op": "ack", "seq": again["seq"]})
    delivered = await phone.recv_op("receipt")
    assert delivered["id"] == "m2" and delivered["status"] == "delivered", delivered
    assert delivered["device"] == "alice-desktop", delivered

    # numbering continues
    await phone.send({"op": "send", "id": "m3", "to": {"device": "alice-desktop"}, "type": "x"})
    assert (await back.recv_op("msg"))["seq"] == 3
    sessions = {s["session"]: s for s in (await phone.request({"op": "sessions"}, "sessions"))["sessions"]}
    entry = sessions[session]
    assert entry["connected"] is True and entry["pending"] == 0, entry
    assert is_int(entry["connected_ms"]) and entry["connected_ms"] >= 0, entry
    assert entry["messages_out"] >= 4, entry  # m1, m2, m2 again, m3 over the session's whole life


async def test_resume_takes_over_open_connection_4409(net):
    phone = await net.hello("alice", "alice-phone")
    desk = await net.hello("alice", "alice-desktop")
    await phone.wait_presence("alice-desktop", "online")
    await phone.send({"op": "send", "id": "u1", "to": {"device": "alice-desktop"}, "type": "x", "ack": True})
    assert (await phone.recv_op("receipt"))["status"] == "routed"
    msg = await desk.recv_op("msg")

    # the server still believes the old connection open
    back = await net.hello("alice", "alice-desktop", no_device=True,
                           resume={"session": desk.welcome["session"], "last_seq": 0})
    assert back.welcome["resumed"] is True and back.welcome["session"] == desk.welcome["session"], back.welcome
    assert (await back.recv_op("msg")) == msg
    await desk.expect_close(4409)
    # nothing is announced to other devices
    await phone.expect_nothing()
    assert phone.statuses("alice-desktop") == ["online"], phone.presence  # only the first connection's
    await back.send({"op": "ack", "seq": msg["seq"]})
    assert (await phone.recv_op("receipt"))["status"] == "delivered"


async def test_close_1000_ends_session(net):
    phone = await net.hello("alice", "alice-phone")
    desk = await net.hello("alice", "alice-desktop")
    await phone.send({"op": "send", "id": "e1", "to": {"device": "alice-desktop"}, "type": "x", "ack": True})
    assert (await phone.recv_op("receipt"))["status"] == "routed"
    assert (await desk.recv_op("msg"))["seq"] == 1

    await desk.ws.close(1000)
    # its unacked messages move to the device's inbox at once
    queued = await phone.recv_op("receipt")
    assert queued["id"] == "e1" and queued["status"] == "queued", queued
    assert queued["device"] == "alice-desktop", queued

    back = await net.hello("alice", "alice-desktop", no_device=True,
                           resume={"session": desk.welcome["session"], "last_seq": 0})
    assert back.welcome["resumed"] is False, back.welcome
    assert back.welcome["resume_error"] == "unknown_session", back.welcome
    assert back.welcome["session"] != desk.welcome["session"], back.welcome
    assert back.welcome["next_seq"] == 1, back.welcome
    # the new session gets the inbox: the message again, with a new seq
    again = await back.recv_op("msg")
    assert (again["id"], again["seq"]) == ("e1", 1), again
    await back.send({"op": "ack", "seq": 1})
    assert (await phone.recv_op("receipt"))["status"] == "delivered"
    await back.expect_nothing()

    # a session that never existed
    other = await net.hello("alice", "alice-tablet", resume={"session": "never-was", "last_seq": 3})
    assert other.welcome["resumed"] is False and other.welcome["resume_error"] == "unknown_session", other.welcome
    # another device's session is not this device's
    third = await net.hello("alice", "alice-watch", resume={"session": phone.welcome["session"]})
    assert third.welcome["resumed"] is False and third.welcome["resume_error"] == "unknown_session", third.welcome
    await phone.ping()


# ---------------------------------------------------------------------------
# 5. refresh and expiry (sections 2, 4.9, 7)
# ---------------------------------------------------------------------------


async def test_refresh_with_fresh_token_and_credential(net):
    phone_token = net.token("alice", "alice-phone", ttl_seconds=600)
    phone = await net.hello("alice", "alice-phone", token=phone_token, device_info={"type": "mobile"})
    assert phone.welcome["expires_at"] == token_exp(phone_token) * 1000, phone.welcome

    fresh = net.token("alice", "alice-phone", ttl_seconds=7200)
    answer = await phone.request({"op": "refresh", "id": 7, "token": fresh})
    assert answer["op"] == "refreshed" and answer["id"] == 7, answer
    assert answer["expires_at"] == token_exp(fresh) * 1000, answer
    current = [s for s in (await phone.request({"op": "sessions"}, "sessions"))["sessions"] if s["current"]]
    assert len(current) == 1 and current[0]["expires_at"] == answer["expires_at"], current

    # refusals keep the connection open and the old expiry
    await phone.expect_error({"op": "refresh", "token": net.token("alice", "alice-desktop")}, "forbidden")
    await phone.expect_error({"op": "refresh", "token": "garbage"}, "unauthorized")
    await phone.expect_error({"op": "refresh", "credential": "rccs_" + "B" * 43}, "unauthorized")
    current = [s for s in (await phone.request({"op": "sessions"}, "sessions"))["sessions"] if s["current"]]
    assert current[0]["expires_at"] == answer["expires_at"], current

    # a paired device refreshes with its credential: session_ttl from now
    laptop, paired = await pair_new_device(net, phone)
    answer = await laptop.request({"op": "refresh", "credential": paired["credential"]}, "refreshed")
    assert abs(answer["expires_at"] - (now_ms() + DAY_MS)) < 10_000, answer
    # someone else's credential / token
    await phone.expect_error({"op": "refresh", "credential": paired["credential"]}, "forbidden")
    await laptop.expect_error({"op": "refresh", "token": net.token("alice", "alice-phone")}, "forbidden")
    await laptop.ping()


async def test_session_expiry_closes_4440_and_refresh_prevents_it(net):
    observer = await net.hello("alice", "alice-observer")
    # Short tokens; the dropped one is minted first so it never expires later than the others. `exp` is whole
    # seconds (section 8) counted from an `iat` rounded down, so a ttl of n lives n-1 to n s: 3 leaves at
    # least 2 s for three hellos, a presence event and a refresh, also on a loaded machine.
    dropped_token = net.token("alice", "alice-dropped", ttl_seconds=3)
    expiring_token = net.token("alice", "alice-expiring", ttl_seconds=3)
    refreshed_token = net.token("alice", "alice-refreshed", ttl_seconds=3)
    assert token_exp(dropped_token) <= token_exp(expiring_token)
    dropped = await net.hello("alice", "alice-dropped", token=dropped_token, device_info={"type": "web"})
    expiring = await net.hello("alice", "alice-expiring", token=expiring_token, device_info={"type": "web"})
    refreshed = await net.hello("alice", "alice-refreshed", token=refreshed_token, device_info={"type": "web"})
    assert expiring.welcome["expires_at"] == token_exp(expiring_token) * 1000, expiring.welcome

    # one loses its network while still authenticated: its session stays resumable (grace 120 s)...
    dropped.abort()
    await observer.wait_presence("alice-dropped", "offline")
    # ...one refreshes in time...
    fresh = net.token("alice", "alice-refreshed", ttl_seconds=3600)
    assert (await refreshed.request({"op": "refresh", "token": fresh}, "refreshed"))["expires_at"] == (
        token_exp(fresh) * 1000)

    # ...and one just waits: at expires_at the server closes it with 4440 (no error first)
    await expiring.expect_close(4440, timeout=10.0)  # a bound, not a wait: expires_at is up to 3 s away
    assert now_ms() >= expiring.welcome["expires_at"] - 50, (now_ms(), expiring.welcome)

    # the refreshed one is still connected
    await refreshed.ping()

    # 4440: "hello with ... a fresh token (a new session)"
    again = await net.hello("alice", "alice-expiring", no_device=True)
    assert again.welcome["session"] != expiring.welcome["session"], again.welcome
    await again.ping()

    # Resuming the dropped session after its `expires_at` passed: section 4.1, a new session with
    # `resumed: false` and a resume_error ("unknown_session" once cleaned up, "expired" if just now).
    back = await net.hello("alice", "alice-dropped", no_device=True,
                           resume={"session": dropped.welcome["session"], "last_seq": 0})
    assert back.welcome["resumed"] is False, back.welcome
    assert back.welcome["resume_error"] in ("unknown_session", "expired"), back.welcome
    assert back.welcome["session"] != dropped.welcome["session"], back.welcome
