"""Delivery guarantees, tested by a third-party client written only from docs/protocol.md.

Everything protocol-related here (receipt sequences, inbox order, ttl, overflow policies,
idempotency, redelivery after `ack_timeout`, dead letters, error codes) comes from the document:
sections 2, 4.1, 4.2 (`send` with `ack`/`ttl`/`priority`/`durable`), 4.3 (`ack`), 5.2 (receipts),
5.3 (errors) and 12 (delivery guarantees). The client is the plain ``websockets`` library with
hand-built JSON (text frames) and msgpack (binary frames) envelopes.

Only ``rccs.testing.running_server`` comes from rccs: it starts a real server with overridden
settings (the names of section 12: ``ack_timeout``, ``inbox_max_messages``, ``inbox_overflow``,
``default_ttl``, ``max_delivery_attempts``) and mints dev tokens.

Every connection has a reader task that records each envelope as it arrives, so a test can wait
for conditions on several connections at once. ``presence`` events (section 5.5) may arrive at any
time: they are set aside in ``Conn.presence``.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgpack
import websockets
from websockets.exceptions import ConnectionClosed

from rccs.testing import running_server

TIMEOUT = 5.0
# section 4.2: priority names and numbers; default 1 (NORMAL)
PRIORITY = {"LOW": 0, "NORMAL": 1, "HIGH": 2, "URGENT": 3, "EMERGENCY": 4}
MAX_TTL = 30 * 24 * 3600  # section 4.2: `max_ttl` default, 30 days
FINAL = ("delivered", "expired", "failed")  # section 4.2 item 4 / section 12


def prio_value(priority: Any) -> int:
    if priority is None:
        return 1
    return PRIORITY[priority] if isinstance(priority, str) else priority


def _refuse_constant(name: str) -> Any:
    raise AssertionError(f"server sent non-strict JSON constant {name!r} (section 1)")


class Conn:
    """One hand-built protocol connection with a background reader.

    ``log`` holds every non-presence envelope in arrival order; ``recv`` reads it in order
    (position ``pos``), ``wait``/``until`` wait for a condition over everything received so far.
    """

    def __init__(self, ws: Any, encoding: str, label: str):
        self.ws = ws
        self.encoding = encoding
        self.label = label
        self.welcome: dict[str, Any] = {}
        self.log: list[dict[str, Any]] = []
        self.presence: list[dict[str, Any]] = []
        self.pos = 0
        self.closed: ConnectionClosed | None = None
        self.failure: BaseException | None = None
        self._changed = asyncio.Event()
        self._ping_no = 0
        self._task = asyncio.create_task(self._pump())

    # -- reading ---------------------------------------------------------------------------
    def _decode(self, frame: str | bytes) -> dict[str, Any]:
        # section 1: "The server answers every envelope on that connection in that encoding."
        if self.encoding == "json":
            assert isinstance(frame, str), f"{self.label}: binary frame on a JSON connection: {frame!r}"
            envelope = json.loads(frame, parse_constant=_refuse_constant)
        else:
            assert isinstance(frame, bytes), f"{self.label}: text frame on a msgpack connection: {frame!r}"
            envelope = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        assert isinstance(envelope, dict), envelope
        return envelope

    async def _pump(self) -> None:
        try:
            while True:
                frame = await self.ws.recv()
                envelope = self._decode(frame)
                if envelope.get("op") == "presence":
                    self.presence.append(envelope)
                else:
                    envelope["_t"] = time.monotonic()  # arrival time, for redelivery timing
                    self.log.append(envelope)
                self._changed.set()
        except ConnectionClosed as exc:
            self.closed = exc
        except BaseException as exc:  # an assertion about a frame: reported by the next wait
            self.failure = exc
        finally:
            self._changed.set()

    async def wait(self, predicate: Callable[[], bool], timeout: float = TIMEOUT) -> bool:
        """Wait until ``predicate()`` holds; False on timeout or when the connection ended first."""
        deadline = time.monotonic() + timeout
        while True:
            if self.failure is not None:
                raise self.failure
            self._changed.clear()
            if predicate():
                return True
            remaining = deadline - time.monotonic()
            if self.closed is not None or remaining <= 0:
                return False
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        if not await self.wait(predicate, timeout):
            state = f"closed {self.closed!r}" if self.closed is not None else f"timeout {timeout}s"
            raise AssertionError(f"{self.label}: {state} waiting for {what}; last envelopes: {self.log[-8:]!r}")

    async def recv(self, timeout: float = TIMEOUT) -> dict[str, Any]:
        await self.until(lambda: len(self.log) > self.pos, "an envelope", timeout)
        envelope = self.log[self.pos]
        self.pos += 1
        return envelope

    async def recv_op(self, op: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        envelope = await self.recv(timeout)
        assert envelope.get("op") == op, f"{self.label}: expected {op!r}, got {envelope!r}"
        return envelope

    def consume(self) -> None:
        """Mark everything received so far as read (after a test looked at it through ``log``)."""
        self.pos = len(self.log)

    # -- sending ---------------------------------------------------------------------------
    async def send(self, envelope: dict[str, Any]) -> None:
        if self.encoding == "json":
            await self.ws.send(json.dumps(envelope, allow_nan=False))
        else:
            await self.ws.send(msgpack.packb(envelope, use_bin_type=True))

    async def ack(self, seqs: int | list[int]) -> None:
        await self.send({"op": "ack", "seq": seqs})

    async def expect_nothing(self) -> None:
        """Barrier: everything unread so far must be nothing, and the next envelope the pong of a fresh ping.

        The server handles one connection's envelopes in order and answers in order (section 2),
        so anything it sent before handling the ping arrives before the pong.
        """
        assert self.pos == len(self.log), f"{self.label}: unexpected {self.log[self.pos:]!r}"
        self._ping_no += 1
        ping_id = f"barrier-{self._ping_no}"
        await self.send({"op": "ping", "id": ping_id})
        pong = await self.recv()
        assert pong.get("op") == "pong" and pong.get("id") == ping_id, f"{self.label}: expected pong, got {pong!r}"

    # -- views -----------------------------------------------------------------------------
    def receipts(self, msg_id: Any, status: str | None = None) -> list[dict[str, Any]]:
        return [
            e for e in self.log
            if e.get("op") == "receipt" and e.get("id") == msg_id and (status is None or e.get("status") == status)
        ]

    def finals(self, msg_id: Any) -> list[dict[str, Any]]:
        return [r for r in self.receipts(msg_id) if r["status"] in FINAL]

    def msgs(self) -> list[dict[str, Any]]:
        return [e for e in self.log if e.get("op") == "msg"]

    def has_presence(self, device: str, status: str) -> bool:
        return any(p.get("device") == device and p.get("status") == status for p in self.presence)

    # -- ending ----------------------------------------------------------------------------
    async def close(self) -> None:
        """Close with 1000 (section 2: ends the session)."""
        await self.ws.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, TIMEOUT)

    async def abort(self) -> None:
        """Drop the TCP connection without a close frame (a network loss: the session stays resumable)."""
        self.ws.transport.abort()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self._task, TIMEOUT)


class Net:
    def __init__(self, server: Any):
        self.server = server
        self.conns: list[Conn] = []

    async def hello(self, user: str, device: str, encoding: str = "json", **fields: Any) -> Conn:
        ws = await websockets.connect(self.server.ws_url, proxy=None)
        conn = Conn(ws, encoding, device)
        self.conns.append(conn)
        await conn.send({
            "op": "hello", "token": self.server.issue_token(user, device),
            "device": {"type": "desktop", "name": device}, **fields,
        })
        conn.welcome = await conn.recv_op("welcome")
        assert conn.welcome["device"] == device and conn.welcome["user"] == user, conn.welcome
        return conn

    async def register_offline(self, watcher: Conn, user: str, device: str) -> None:
        """Connect `device` once (so it is registered) and close with 1000; wait until `watcher`
        (another device of the user) has heard it go `offline` (section 5.5), so later sends see it offline."""
        conn = await self.hello(user, device)
        await watcher.until(lambda: watcher.has_presence(device, "online"), f"presence {device}/online")
        await conn.close()
        await watcher.until(lambda: watcher.has_presence(device, "offline"), f"presence {device}/offline")

    async def close_all(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.ws.close(), 2)
            conn._task.cancel()


@contextlib.asynccontextmanager
async def custom_net(**settings: Any) -> AsyncIterator[Net]:
    async with running_server(**settings) as srv:
        net = Net(srv)
        try:
            yield net
        finally:
            await net.close_all()


def send_env(msg_id: Any, to: dict[str, Any], body: Any = None, ack: bool = True, **fields: Any) -> dict[str, Any]:
    env: dict[str, Any] = {"op": "send", "id": msg_id, "to": to, "type": "note", "body": body, "ack": ack}
    env.update({k: v for k, v in fields.items() if v is not None})
    return env


def check_routed_to_inbox(receipt: dict[str, Any], device: str) -> None:
    """Section 4.2 item 2 for an offline target: nothing written now, the device in `queued`."""
    assert receipt["status"] == "routed", receipt
    assert receipt.get("devices") == [], receipt
    assert receipt.get("queued") == [device], receipt


async def send_queued(sender: Conn, env: dict[str, Any], device: str) -> None:
    """An ack:true send to an offline device: `routed` (queued=[device]) then `queued` (section 4.2)."""
    await sender.send(env)
    msg_id = env["id"]
    await sender.until(lambda: sender.receipts(msg_id, "queued"), f"`queued` for {msg_id!r}")
    receipts = sender.receipts(msg_id)
    assert len(receipts) == 2, receipts
    check_routed_to_inbox(receipts[0], device)
    assert receipts[1] == {**receipts[1], "status": "queued", "device": device}, receipts


# ---------------------------------------------------------------------------
# 1. offline delivery: priority order and the receipt sequence of section 4.2
# ---------------------------------------------------------------------------


async def test_offline_delivery_in_priority_order_with_receipt_sequence():
    async with custom_net() as net:
        a = await net.hello("alice", "a-desk")
        await net.register_offline(a, "alice", "a-phone")
        # (id, priority as sent): names and numbers mixed, None = default (NORMAL)
        plan: list[tuple[Any, Any]] = [
            ("m1", "LOW"), ("m2", 2), ("m3", None), ("m4", "EMERGENCY"), ("m5", 0), ("m6", "HIGH"),
            (7, 4), ("m8", "NORMAL"), ("m9", 3), ("m10", "URGENT"), ("m11", 1), ("m12", "LOW"),
        ]
        for msg_id, prio in plan:
            await a.send(send_env(msg_id, {"device": "a-phone"}, {"n": str(msg_id)}, priority=prio))
        await a.until(lambda: all(a.receipts(m, "queued") for m, _ in plan), "`queued` for every message")
        for msg_id, _ in plan:
            receipts = a.receipts(msg_id)
            # item 2: exactly one `routed`, first; item 3: `queued` per device in `queued`, later
            assert len(receipts) == 2, receipts
            check_routed_to_inbox(receipts[0], "a-phone")
            assert receipts[1]["status"] == "queued" and receipts[1]["device"] == "a-phone", receipts
        a.consume()

        # section 12: highest priority first, then oldest first
        order = [m for _, m in sorted(((-prio_value(p), i), m) for i, (m, p) in enumerate(plan))]
        phone = await net.hello("alice", "a-phone", encoding="msgpack")
        await phone.until(lambda: len(phone.msgs()) >= len(plan), f"{len(plan)} msgs")
        msgs = phone.msgs()
        assert [m["id"] for m in msgs] == order, [m["id"] for m in msgs]
        first_seq = phone.welcome["next_seq"]
        for k, m in enumerate(msgs):
            assert m["from"] == "a-desk" and m["type"] == "note" and m["body"] == {"n": str(m["id"])}, m
            assert m["ack"] is True, m
            # section 3: seq starts at next_seq and increases by exactly 1 per msg of the session
            assert m["seq"] == first_seq + k, (first_seq, msgs)
            assert type(m["ts"]) is int and m["ts"] <= phone.welcome["server_time"], (m, phone.welcome)
        await phone.ack([m["seq"] for m in msgs])
        phone.consume()
        await phone.expect_nothing()

        await a.until(lambda: all(a.receipts(m, "delivered") for m, _ in plan), "`delivered` for every message")
        for msg_id, _ in plan:
            finals = a.finals(msg_id)
            assert len(finals) == 1 and finals[0]["status"] == "delivered", finals
            assert finals[0].get("device") == "a-phone", finals
        a.consume()
        await a.expect_nothing()
        await phone.expect_nothing()


# ---------------------------------------------------------------------------
# 2. ttl
# ---------------------------------------------------------------------------


async def test_ttl_expiry_gives_expired_receipt_and_no_delivery():
    async with custom_net() as net:
        a = await net.hello("alice", "a-desk")
        await net.register_offline(a, "alice", "a-phone")
        sent_at = time.monotonic()
        short = send_env("short", {"device": "a-phone"}, "soon gone", ttl=1, priority="EMERGENCY")
        await send_queued(a, short, "a-phone")
        await send_queued(a, send_env("long", {"device": "a-phone"}, "stays", priority="LOW"), "a-phone")
        # the wait for `expired` is the behaviour under test (the server checks about once a second)
        await a.until(lambda: a.receipts("short", "expired"), "`expired` for 'short'", timeout=6)
        assert time.monotonic() - sent_at >= 0.9, "expired before its ttl of 1 s"
        expired = a.receipts("short", "expired")
        assert len(expired) == 1 and expired[0]["device"] == "a-phone", expired
        assert [r["status"] for r in a.receipts("short")] == ["routed", "queued", "expired"], a.receipts("short")
        assert a.finals("long") == [], a.receipts("long")

        # the expired EMERGENCY message would come before the LOW one if it were still in the inbox
        phone = await net.hello("alice", "a-phone")
        first = await phone.recv_op("msg")
        assert first["id"] == "long", first
        await phone.ack(first["seq"])
        await phone.expect_nothing()
        await a.until(lambda: a.receipts("long", "delivered"), "`delivered` for 'long'")
        assert [r["status"] for r in a.finals("short")] == ["expired"], a.receipts("short")
        a.consume()
        await a.expect_nothing()


async def test_default_ttl_applies_without_ttl():
    async with custom_net(default_ttl=1) as net:
        a = await net.hello("alice", "a-desk")
        await net.register_offline(a, "alice", "a-phone")
        await send_queued(a, send_env("d1", {"device": "a-phone"}, 1), "a-phone")
        await a.until(lambda: a.receipts("d1", "expired"), "`expired` for 'd1'", timeout=6)
        assert [r["status"] for r in a.receipts("d1")] == ["routed", "queued", "expired"], a.receipts("d1")
        assert a.receipts("d1", "expired")[0]["device"] == "a-phone"

        # an explicit ttl overrides the default: this one is still deliverable
        await send_queued(a, send_env("d2", {"device": "a-phone"}, 2, ttl=60), "a-phone")
        phone = await net.hello("alice", "a-phone")
        msg = await phone.recv_op("msg")
        assert msg["id"] == "d2", msg
        await phone.ack(msg["seq"])
        await phone.expect_nothing()
        await a.until(lambda: a.receipts("d2", "delivered"), "`delivered` for 'd2'")


# ---------------------------------------------------------------------------
# 3. inbox limits and overflow policies
# ---------------------------------------------------------------------------


async def test_inbox_full_reject_policy():
    async with custom_net(inbox_max_messages=3) as net:  # inbox_overflow defaults to reject
        a = await net.hello("alice", "a-desk")
        await net.register_offline(a, "alice", "a-phone")
        for n in (1, 2, 3):
            await send_queued(a, send_env(f"f{n}", {"device": "a-phone"}, n), "a-phone")
        await a.send(send_env("f4", {"device": "a-phone"}, 4, priority="EMERGENCY"))
        await a.until(lambda: a.finals("f4"), "a final receipt for 'f4'")
        receipts = a.receipts("f4")
        failed = [r for r in receipts if r["status"] == "failed"]
        assert len(failed) == 1 and failed[0]["reason"] == "inbox_full" and failed[0]["device"] == "a-phone", receipts
        routed = [r for r in receipts if r["status"] == "routed"]
        assert len(routed) == 1 and routed[0].get("devices") == [], receipts
        assert not a.receipts("f4", "queued"), receipts
        # section 4.2 lists `inbox_full` both as a failure before `routed` (item 1) and after it (item 3)
        if receipts[0]["status"] == "failed":
            assert "a-phone" not in (routed[0].get("queued") or []), receipts
        else:
            assert receipts[0]["status"] == "routed" and routed[0].get("queued") == ["a-phone"], receipts
        # the earlier messages are untouched
        assert all(not a.finals(f"f{n}") for n in (1, 2, 3)), a.log

        phone = await net.hello("alice", "a-phone")
        await phone.until(lambda: len(phone.msgs()) >= 3, "3 msgs")
        msgs = phone.msgs()
        assert [m["id"] for m in msgs] == ["f1", "f2", "f3"], msgs
        await phone.ack([m["seq"] for m in msgs])
        phone.consume()
        await phone.expect_nothing()
        await a.until(lambda: all(a.receipts(f"f{n}", "delivered") for n in (1, 2, 3)), "`delivered` f1-f3")
        assert len(a.finals("f4")) == 1, a.receipts("f4")
        a.consume()
        await a.expect_nothing()


async def test_inbox_full_drop_oldest_policy():
    async with custom_net(inbox_max_messages=3, inbox_overflow="drop_oldest") as net:
        a = await net.hello("alice", "a-desk")
        await net.register_offline(a, "alice", "a-phone")
        await send_queued(a, send_env("n1", {"device": "a-phone"}, 1, priority="NORMAL"), "a-phone")
        await send_queued(a, send_env("l2", {"device": "a-phone"}, 2, priority="LOW"), "a-phone")
        await send_queued(a, send_env("l3", {"device": "a-phone"}, 3, priority="LOW"), "a-phone")
        # full: the oldest message of the lowest priority present (l2) makes room
        await send_queued(a, send_env("h4", {"device": "a-phone"}, 4, priority="HIGH"), "a-phone")
        await a.until(lambda: a.finals("l2"), "a final receipt for 'l2'")
        # full again: the lowest priority present is still LOW, its oldest is now l3
        await send_queued(a, send_env("n5", {"device": "a-phone"}, 5, priority="NORMAL"), "a-phone")
        await a.until(lambda: a.finals("l3"), "a final receipt for 'l3'")
        for dropped in ("l2", "l3"):
            statuses = [(r["status"], r.get("reason"), r.get("device")) for r in a.receipts(dropped)]
            expected = [("routed", None, None), ("queued", None, "a-phone"), ("failed", "dropped", "a-phone")]
            assert statuses == expected, (dropped, a.receipts(dropped))
        for kept in ("n1", "h4", "n5"):
            assert not a.finals(kept), a.receipts(kept)

        phone = await net.hello("alice", "a-phone")
        await phone.until(lambda: len(phone.msgs()) >= 3, "3 msgs")
        msgs = phone.msgs()
        assert [m["id"] for m in msgs] == ["h4", "n1", "n5"], msgs
        await phone.ack([m["seq"] for m in msgs])
        phone.consume()
        await phone.expect_nothing()
        await a.until(lambda: all(a.receipts(m, "delivered") for m in ("n1", "h4", "n5")), "`delivered` n1/h4/n5")
        for msg_id in ("n1", "h4", "n5", "l2", "l3"):
            assert len(a.finals(msg_id)) == 1, a.receipts(msg_id)
        a.consume()
        await a.expect_nothing()


# ---------------------------------------------------------------------------
# 4. idempotent re-send
# ---------------------------------------------------------------------------


async def test_idempotent_resend_duplicate_and_duplicate_id():
    async with custom_net() as net:
        a = await net.hello("alice", "a-desk")
        await net.register_offline(a, "alice", "a-tab")
        b = await net.hello("alice", "a-phone", encoding="msgpack")

        # online target: first send routed, the msg is written
        await a.send(send_env("i1", {"device": "a-phone"}, {"v": 1}))
        routed = await a.recv_op("receipt")
        assert routed["id"] == "i1" and routed["status"] == "routed" and routed["devices"] == ["a-phone"], routed
        msg = await b.recv_op("msg")
        assert msg["id"] == "i1", msg

        # same id, same body: one `duplicate` receipt, nothing delivered again
        await a.send(send_env("i1", {"device": "a-phone"}, {"v": 1}))
        dup = await a.recv_op("receipt")
        assert dup["id"] == "i1" and dup["status"] == "duplicate", dup
        await a.expect_nothing()
        await b.expect_nothing()

        # same id, other body: error duplicate_id, nothing delivered
        await a.send(send_env("i1", {"device": "a-phone"}, {"v": 2}))
        err = await a.recv_op("error")
        assert err["code"] == "duplicate_id" and err["id"] == "i1", err
        await a.expect_nothing()
        await b.expect_nothing()

        # the first send's receipts continue
        await b.ack(msg["seq"])
        await b.expect_nothing()
        delivered = await a.recv_op("receipt")
        assert delivered == {**delivered, "id": "i1", "status": "delivered", "device": "a-phone"}, delivered
        await a.expect_nothing()

        # still a duplicate after delivery (within idempotency_window)
        await a.send(send_env("i1", {"device": "a-phone"}, {"v": 1}))
        dup = await a.recv_op("receipt")
        assert dup["id"] == "i1" and dup["status"] == "duplicate", dup
        await a.expect_nothing()
        await b.expect_nothing()

        # an integer id to an offline device: queued once, the repeat is a duplicate, one msg arrives
        await send_queued(a, send_env(77, {"device": "a-tab"}, "x"), "a-tab")
        a.consume()
        await a.send(send_env(77, {"device": "a-tab"}, "x"))
        dup = await a.recv_op("receipt")
        assert dup["id"] == 77 and dup["status"] == "duplicate", dup
        await a.expect_nothing()
        tab = await net.hello("alice", "a-tab")
        got = await tab.recv_op("msg")
        assert got["id"] == 77 and got["body"] == "x", got
        await tab.ack(got["seq"])
        await tab.expect_nothing()
        await a.until(lambda: a.receipts(77, "delivered"), "`delivered` for 77")
        assert [r["status"] for r in a.receipts(77)] == ["routed", "queued", "duplicate", "delivered"], a.receipts(77)


# ---------------------------------------------------------------------------
# 5. receipts reach the sending device wherever it is
# ---------------------------------------------------------------------------


async def test_receipts_kept_for_offline_sender_come_after_next_welcome():
    async with custom_net() as net:
        a = await net.hello("alice", "a-desk")
        await net.register_offline(a, "alice", "a-phone")
        await send_queued(a, send_env("k1", {"device": "a-phone"}, "one"), "a-phone")
        await send_queued(a, send_env("k2", {"device": "a-phone"}, "two"), "a-phone")
        a.consume()
        await a.close()  # the sender is offline (its session ended; receipts belong to the device)

        phone = await net.hello("alice", "a-phone")
        await phone.until(lambda: len(phone.msgs()) >= 2, "2 msgs")
        await phone.ack([m["seq"] for m in phone.msgs()])
        phone.consume()
        await phone.expect_nothing()  # the acks are handled: both receipts exist, kept for a-desk

        a2 = await net.hello("alice", "a-desk")
        # section 5.2: kept receipts are sent right after the next welcome
        first, second = await a2.recv_op("receipt"), await a2.recv_op("receipt")
        got = sorted([(r["id"], r["status"], r.get("device")) for r in (first, second)])
        assert got == [("k1", "delivered", "a-phone"), ("k2", "delivered", "a-phone")], (first, second)
        await a2.expect_nothing()


async def test_receipts_follow_the_senders_new_connection():
    async with custom_net() as net:
        a = await net.hello("alice", "a-desk")
        b = await net.hello("alice", "a-phone")
        await a.send(send_env("r1", {"device": "a-phone"}, "hi"))
        routed = await a.recv_op("receipt")
        assert routed["status"] == "routed" and routed["devices"] == ["a-phone"], routed
        msg = await b.recv_op("msg")

        a2 = await net.hello("alice", "a-desk")  # replaces the first connection (4409)
        await a.wait(lambda: a.closed is not None)
        assert a.closed is not None and a.closed.rcvd is not None and a.closed.rcvd.code == 4409, a.closed
        await b.ack(msg["seq"])
        delivered = await a2.recv_op("receipt")
        assert delivered == {**delivered, "id": "r1", "status": "delivered", "device": "a-phone"}, delivered
        await a2.expect_nothing()
        assert not a.receipts("r1", "delivered"), a.log


# ---------------------------------------------------------------------------
# 6. redelivery after ack_timeout, dead letters
# ---------------------------------------------------------------------------


def strip(envelope: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in envelope.items() if k != "_t"}


async def test_redelivery_after_ack_timeout_same_seq():
    ack_timeout = 0.5
    async with custom_net(ack_timeout=ack_timeout) as net:
        a = await net.hello("alice", "a-desk")
        b = await net.hello("alice", "a-phone")
        await a.send(send_env("t1", {"device": "a-phone"}, {"x": [1, 2]}))
        routed = await a.recv_op("receipt")
        assert routed["status"] == "routed" and routed["devices"] == ["a-phone"], routed

        # not acked: written again with the same seq, the wait doubling (±20 % jitter); the server
        # checks about once a second, so allow a few seconds
        await b.until(lambda: len(b.msgs()) >= 3, "two redeliveries of 't1'", timeout=8)
        writes = b.msgs()[:3]
        for again in writes[1:]:
            assert strip(again) == strip(writes[0]), writes
        gap1 = writes[1]["_t"] - writes[0]["_t"]
        gap2 = writes[2]["_t"] - writes[1]["_t"]
        assert gap1 >= 0.8 * ack_timeout - 0.05, (gap1, gap2)
        assert gap2 >= 0.8 * 2 * ack_timeout - 0.05, (gap1, gap2)
        assert not a.finals("t1"), a.log  # no final receipt while unacked

        await b.ack(writes[0]["seq"])
        await a.until(lambda: a.receipts("t1", "delivered"), "`delivered` for 't1'")
        b.consume()
        await b.expect_nothing()
        # once acked, never written again (the next wait would have been about 4 * ack_timeout)
        count = len(b.msgs())
        assert not await b.wait(lambda: len(b.msgs()) > count, timeout=2.5), b.msgs()
        assert [r["status"] for r in a.receipts("t1")] == ["routed", "delivered"], a.receipts("t1")
        a.consume()
        await a.expect_nothing()


async def test_dead_letter_after_max_delivery_attempts():
    async with custom_net(max_delivery_attempts=2, ack_timeout=0.3) as net:
        a = await net.hello("alice", "a-desk")
        await net.register_offline(a, "alice", "a-phone")
        await send_queued(a, send_env("dl", {"device": "a-phone"}, "never acked", priority="EMERGENCY"), "a-phone")

        writes: list[dict[str, Any]] = []
        phone = await net.hello("alice", "a-phone")
        await phone.until(lambda: phone.msgs(), "the first write of 'dl'")
        # every write counts (section 12). If the server rewrites the inbox message on this connection
        # after ack_timeout, the dead letter comes here; if it writes an inbox message only once per
        # connection, a network loss and a resume give it its second write.
        dead = await a.wait(lambda: a.finals("dl"), timeout=4)
        writes += phone.msgs()
        if not dead:
            await phone.abort()
            phone = await net.hello(
                "alice", "a-phone", resume={"session": phone.welcome["session"], "last_seq": 0})
            await phone.until(lambda: phone.msgs(), "the second write of 'dl'")
            dead = await a.wait(lambda: a.finals("dl"), timeout=4)
            writes += phone.msgs()
        assert dead, f"no final receipt for 'dl' after {len(writes)} unacked writes: {a.receipts('dl')!r}"
        assert all(w["id"] == "dl" for w in writes), writes
        assert len(writes) == 2, f"max_delivery_attempts=2 but 'dl' was written {len(writes)} times"
        finals = a.finals("dl")
        assert len(finals) == 1, finals
        assert finals[0]["status"] == "failed" and finals[0]["reason"] == "undeliverable", repr(finals)
        # section 5.2: `failed` names the `device` (absent only for no_route)
        assert finals[0].get("device") == "a-phone", f"failed/undeliverable without device: {finals!r}"
        a.consume()

        # a dead letter is out of the inbox: a LOW message sent now arrives, and 'dl' (EMERGENCY) not before it
        await phone.close()
        await send_queued(a, send_env("after", {"device": "a-phone"}, "fresh", priority="LOW"), "a-phone")
        fresh = await net.hello("alice", "a-phone")
        msg = await fresh.recv_op("msg")
        assert msg["id"] == "after", msg
        await fresh.ack(msg["seq"])
        await fresh.expect_nothing()
        await a.until(lambda: a.receipts("after", "delivered"), "`delivered` for 'after'")
        assert len(a.finals("dl")) == 1, a.receipts("dl")


# ---------------------------------------------------------------------------
# 7. bad input: documented error codes, nothing delivered
# ---------------------------------------------------------------------------


async def test_bad_delivery_options_are_refused_and_nothing_is_delivered():
    async with custom_net() as net:
        a = await net.hello("alice", "a-desk")
        await net.register_offline(a, "alice", "a-tab")
        b = await net.hello("alice", "a-phone")
        to = {"devices": ["a-phone", "a-tab"]}
        cases: list[tuple[dict[str, Any], str]] = [
            ({"ttl": -1}, "bad_request"),
            ({"ttl": 0}, "bad_request"),
            ({"ttl": "60"}, "bad_request"),
            ({"ttl": MAX_TTL + 1}, "too_large"),
            ({"ttl": 1e12}, "too_large"),
            ({"priority": "CRITICAL"}, "bad_request"),
            ({"priority": 5}, "bad_request"),
            ({"priority": -1}, "bad_request"),
            ({"durable": True, "ack": False}, "bad_request"),
            ({"durable": True, "ack": None}, "bad_request"),  # ack missing
            ({"durable": "yes"}, "bad_request"),
        ]
        for n, (fields, code) in enumerate(cases):
            env = send_env(f"bad-{n}", to, {"n": n}, priority="EMERGENCY")
            env.update(fields)
            if fields.get("ack", True) is None:
                del env["ack"]
            await a.send(env)
            err = await a.recv()
            assert err.get("op") == "error", (fields, err)
            assert err["code"] == code and err.get("id") == f"bad-{n}", (fields, err)
            assert isinstance(err.get("message"), str), err
        await a.expect_nothing()  # no receipts for any of them
        await b.expect_nothing()  # nothing delivered to the online device

        # the upper bound itself is allowed ("at most max_ttl")
        await a.send(send_env("edge", {"device": "a-phone"}, "ok", ttl=MAX_TTL, priority="LOW"))
        routed = await a.recv_op("receipt")
        assert routed["id"] == "edge" and routed["status"] == "routed" and routed["devices"] == ["a-phone"], routed
        edge = await b.recv_op("msg")
        assert edge["id"] == "edge", edge
        await b.ack(edge["seq"])
        await b.expect_nothing()
        await a.until(lambda: a.receipts("edge", "delivered"), "`delivered` for 'edge'")
        a.consume()

        # nothing was queued for the offline device either: a LOW message is the first it gets
        await send_queued(a, send_env("probe", {"device": "a-tab"}, "p", priority="LOW"), "a-tab")
        tab = await net.hello("alice", "a-tab")
        first = await tab.recv_op("msg")
        assert first["id"] == "probe", first
        await tab.ack(first["seq"])
        await tab.expect_nothing()
