"""Crash safety of the delivery guarantees, written only from docs/protocol.md.

Section 12: a message whose sender holds `queued` or `accepted` is "on disk (SQLite, committed) in
the device's inbox; survives a restart and `kill -9`". This test runs ``rccs serve`` as a separate
process, fills inboxes, kills the process with SIGKILL, starts it again on the same data directory
and checks, as a third-party client (plain ``websockets``, hand-built envelopes), that

- every message that got `queued`/`accepted` reaches its device after the restart,
- after de-duplicating by `(from, id)` (section 12, "exactly once for applications that
  de-duplicate") each message reaches the application exactly once,
- an inbox that never was delivered comes out highest `priority` first, then oldest first,
- messages written but not acked when the server died ("in flight", sent `durable` so that they
  were `accepted`) come again after the restart,
- the sender, reconnecting after the receivers acked, gets the kept `delivered` receipts after its
  `welcome` (section 5.2), exactly one final receipt per message and device (section 4.2).

From rccs itself only the documented command line (``rccs serve``, ``rccs token issue``) is used, through
``rccs.testing.ServerProcess``, which starts ``rccs serve`` on free ports and checks that it runs the fast
path this suite runs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import websockets
from websockets.exceptions import ConnectionClosed

from rccs.testing import ServerProcess, child_environment

USER = "crash-user"
A, B, C = "crash-sender", "crash-offline", "crash-online"
N_OFFLINE = 200  # ack:true messages to B while it is offline
N_DURABLE = 30  # durable messages to C while it is online
N_ACKED_BEFORE_CRASH = 10  # of those, C acks this many before the kill
PRIORITY = {"LOW": 0, "NORMAL": 1, "HIGH": 2, "URGENT": 3, "EMERGENCY": 4}
# priorities as sent (section 4.2): numbers, names, and None for the default (NORMAL)
PRIORITY_CYCLE: list[Any] = [0, "HIGH", 4, None, "LOW", 3, "EMERGENCY", 1, 2, "URGENT", "NORMAL"]
FINAL = ("delivered", "expired", "failed")
TIMEOUT = 10.0


def prio_value(priority: Any) -> int:
    if priority is None:
        return 1
    return PRIORITY[priority] if isinstance(priority, str) else priority


def issue_token(data_dir: Path, user: str, device: str) -> str:
    """`rccs token issue` (section 8): signs with <data-dir>/token.key, registers user and device."""
    out = subprocess.run(
        [sys.executable, "-m", "rccs", "token", "issue", "--user", user, "--device", device,
         "--data-dir", str(data_dir)],
        capture_output=True, text=True, timeout=30, check=False,
        env=child_environment(),
    )
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


# ---------------------------------------------------------------------------
# a hand-built client connection with a background reader
# ---------------------------------------------------------------------------


class App:
    """What a device's application processed, across connections and the crash (section 12:
    remember `(from, id)`, ack a repeat again, do not process it twice)."""

    def __init__(self) -> None:
        self.processed: dict[tuple[str, Any], dict[str, Any]] = {}
        self.times_processed: dict[tuple[str, Any], int] = {}

    def handle(self, msg: dict[str, Any]) -> None:
        key = (msg["from"], msg["id"])
        if key in self.processed:
            # a repeat keeps its id, from, type and body (section 12)
            first = self.processed[key]
            assert (msg["type"], msg["body"]) == (first["type"], first["body"]), (first, msg)
            return
        self.processed[key] = msg
        self.times_processed[key] = self.times_processed.get(key, 0) + 1


class Conn:
    def __init__(self, ws: Any, encoding: str, label: str, app: App | None = None, ack_policy: Any = None):
        self.ws = ws
        self.encoding = encoding
        self.label = label
        self.app = app
        # ack_policy(msg) -> bool: whether to ack this msg now (None: never ack automatically)
        self.ack_policy: Callable[[dict[str, Any]], bool] | None = ack_policy
        self.welcome: dict[str, Any] = {}
        self.log: list[dict[str, Any]] = []
        self.presence: list[dict[str, Any]] = []
        self.acked: set[int] = set()
        self.closed: ConnectionClosed | None = None
        self.failure: BaseException | None = None
        self._changed = asyncio.Event()
        self._task = asyncio.create_task(self._pump())

    def _decode(self, frame: str | bytes) -> dict[str, Any]:
        if self.encoding == "json":  # section 1: answers come in the hello's encoding
            assert isinstance(frame, str), f"{self.label}: binary frame on a JSON connection"
            envelope = json.loads(frame)
        else:
            assert isinstance(frame, bytes), f"{self.label}: text frame on a msgpack connection"
            envelope = msgpack.unpackb(frame, raw=False, strict_map_key=False)
        assert isinstance(envelope, dict), envelope
        return envelope

    async def _pump(self) -> None:
        try:
            while True:
                envelope = self._decode(await self.ws.recv())
                if envelope.get("op") == "presence":
                    self.presence.append(envelope)
                else:
                    self.log.append(envelope)
                    if envelope.get("op") == "msg":
                        if self.app is not None:
                            self.app.handle(envelope)
                        if envelope.get("ack") and self.ack_policy is not None and self.ack_policy(envelope):
                            await self.send({"op": "ack", "seq": envelope["seq"]})
                            self.acked.add(envelope["seq"])
                self._changed.set()
        except ConnectionClosed as exc:
            self.closed = exc
        except BaseException as exc:
            self.failure = exc
        finally:
            self._changed.set()

    async def until(self, predicate: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
        deadline = time.monotonic() + timeout
        while True:
            if self.failure is not None:
                raise self.failure
            self._changed.clear()
            if predicate():
                return
            remaining = deadline - time.monotonic()
            if self.closed is not None or remaining <= 0:
                state = f"closed {self.closed!r}" if self.closed is not None else f"timeout {timeout}s"
                raise AssertionError(f"{self.label}: {state} waiting for {what}; last: {self.log[-5:]!r}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    async def send(self, envelope: dict[str, Any]) -> None:
        if self.encoding == "json":
            await self.ws.send(json.dumps(envelope))
        else:
            await self.ws.send(msgpack.packb(envelope, use_bin_type=True))

    async def barrier(self) -> None:
        """A ping answered means every envelope sent before it was handled (section 2: in order)."""
        ping_id = f"ping-{len(self.log)}-{time.monotonic_ns()}"
        await self.send({"op": "ping", "id": ping_id})
        await self.until(lambda: any(e.get("op") == "pong" and e.get("id") == ping_id for e in self.log),
                         f"pong {ping_id}")

    def receipts(self, msg_id: Any, status: str | None = None) -> list[dict[str, Any]]:
        return [e for e in self.log if e.get("op") == "receipt" and e.get("id") == msg_id
                and (status is None or e.get("status") == status)]

    def msgs(self) -> list[dict[str, Any]]:
        return [e for e in self.log if e.get("op") == "msg"]

    def has_presence(self, device: str, status: str) -> bool:
        return any(p.get("device") == device and p.get("status") == status for p in self.presence)


class Clients:
    def __init__(self, server: ServerProcess, tokens: dict[str, str]):
        self.server = server
        self.tokens = tokens
        self.conns: list[Conn] = []

    async def hello(self, device: str, encoding: str = "json", app: App | None = None, ack_policy: Any = None,
                    **fields: Any) -> Conn:
        ws = await websockets.connect(self.server.ws_url, proxy=None, open_timeout=TIMEOUT)
        conn = Conn(ws, encoding, device, app, ack_policy)
        self.conns.append(conn)
        await conn.send({"op": "hello", "token": self.tokens[device],
                         "device": {"type": "desktop", "name": device}, **fields})
        await conn.until(lambda: bool(conn.log), "welcome")
        conn.welcome = conn.log.pop(0)
        assert conn.welcome.get("op") == "welcome", conn.welcome
        assert conn.welcome["device"] == device and conn.welcome["user"] == USER, conn.welcome
        return conn

    async def close_all(self) -> None:
        for conn in self.conns:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.ws.close(), 1)
            conn._task.cancel()


@contextlib.contextmanager
def data_directory() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="rccs-crash-") as tmp:
        path = Path(tmp) / "data"
        path.mkdir()
        yield path


# ---------------------------------------------------------------------------
# the test
# ---------------------------------------------------------------------------


@pytest.mark.timeout(60)
async def test_queued_and_accepted_messages_survive_kill_9():
    started = time.monotonic()
    with data_directory() as data_dir:
        tokens = {device: issue_token(data_dir, USER, device) for device in (A, B, C)}
        server = ServerProcess(data_dir)
        clients = Clients(server, tokens)
        try:
            await _scenario(server, clients)
        except BaseException:
            print(server.logs())
            raise
        finally:
            await clients.close_all()
            server.kill()
    assert time.monotonic() - started < 30, "the crash test should take well under 30 s"


async def _scenario(server: ServerProcess, clients: Clients) -> None:
    b_app, c_app = App(), App()

    # -- first run -----------------------------------------------------------------------
    await server.start()
    a = await clients.hello(A)
    # C stays online and does not ack anything yet
    c = await clients.hello(C, encoding="msgpack", app=c_app)
    b = await clients.hello(B)  # B says hello once (registered) and leaves with 1000
    await a.until(lambda: a.has_presence(B, "online"), f"presence {B}/online")
    await b.ws.close()
    await a.until(lambda: a.has_presence(B, "offline"), f"presence {B}/offline")

    b_plan: list[tuple[Any, int]] = []  # (id, priority value), in send order
    for i in range(N_OFFLINE):
        msg_id: Any = f"b-{i}" if i % 3 else 10**12 + i  # string and integer ids
        priority = PRIORITY_CYCLE[i % len(PRIORITY_CYCLE)]
        env: dict[str, Any] = {"op": "send", "id": msg_id, "to": {"device": B}, "type": "job",
                               "body": {"i": i, "pad": "x" * (i % 17)}, "ack": True}
        if priority is not None:
            env["priority"] = priority
        await a.send(env)
        b_plan.append((msg_id, prio_value(priority)))
    c_plan: list[tuple[Any, int]] = []
    for i in range(N_DURABLE):
        msg_id = f"c-{i}"
        priority = PRIORITY_CYCLE[(i * 7) % len(PRIORITY_CYCLE)]
        env = {"op": "send", "id": msg_id, "to": {"device": C}, "type": "job", "body": {"c": i},
               "ack": True, "durable": True}
        if priority is not None:
            env["priority"] = priority
        await a.send(env)
        c_plan.append((msg_id, prio_value(priority)))

    # section 4.2: routed (B in `queued`), then `queued` once on disk; durable to an online device:
    # C in `queued`, then `accepted` once on disk
    await a.until(lambda: all(a.receipts(m, "queued") for m, _ in b_plan), "`queued` for every B message",
                  timeout=15)
    await a.until(lambda: all(a.receipts(m, "accepted") for m, _ in c_plan), "`accepted` for every C message")
    for msg_id, _ in b_plan:
        receipts = a.receipts(msg_id)
        assert [r["status"] for r in receipts] == ["routed", "queued"], receipts
        assert receipts[0].get("devices") == [] and receipts[0].get("queued") == [B], receipts
        assert receipts[1]["device"] == B, receipts
    for msg_id, _ in c_plan:
        receipts = a.receipts(msg_id)
        statuses = [r["status"] for r in receipts]
        assert statuses[0] == "routed" and "failed" not in statuses, receipts
        assert C in receipts[0].get("queued", []), receipts
        assert set(receipts[0].get("devices", [])) | set(receipts[0]["queued"]) == {C}, receipts
        accepted = a.receipts(msg_id, "accepted")
        assert len(accepted) == 1 and accepted[0]["device"] == C, receipts

    # C receives every durable message (written through its inbox) and acks only the first few
    await c.until(lambda: len({m["id"] for m in c.msgs()}) >= N_DURABLE, f"{N_DURABLE} durable msgs on {C}")
    first_writes = {}
    for m in c.msgs():
        first_writes.setdefault(m["id"], m)
    acked_ids = [m["id"] for m in c.msgs()[:N_ACKED_BEFORE_CRASH]]
    await c.send({"op": "ack", "seq": [first_writes[i]["seq"] for i in acked_ids]})
    await a.until(lambda: all(a.receipts(m, "delivered") for m in acked_ids), "`delivered` for C's acked msgs")
    in_flight = [m for m, _ in c_plan if m not in acked_ids]
    assert not any(a.receipts(m, "delivered") for m in in_flight), "delivered without an ack"
    last_seq_c = max(m["seq"] for m in c.msgs())
    session_c = c.welcome["session"]

    # -- kill -9 ---------------------------------------------------------------------------
    server.kill()
    for conn in (a, c):
        await conn.until(lambda conn=conn: conn.closed is not None, "the connection to drop", timeout=5)

    # -- second run on the same data directory ---------------------------------------------
    await server.start()

    # C comes back as a client does after a lost connection: hello with resume (section 4.1)
    c2 = await clients.hello(C, encoding="msgpack", app=c_app, ack_policy=lambda m: True,
                             resume={"session": session_c, "last_seq": last_seq_c})
    await c2.until(lambda: all((A, m) in {(x["from"], x["id"]) for x in c2.msgs()} for m in in_flight),
                   "every in-flight (accepted, unacked) msg again on C")
    # Whether a session this young is resumable after kill -9 is the subject of
    # test_session_resumable_after_kill_9; redelivery with the original seq in a resumed session is
    # the subject of test_resume_after_kill_9_redelivers_with_original_seq. Here either answer is
    # taken, and what section 12 promises for `accepted` messages is checked.
    resumed = c2.welcome.get("resumed") is True
    for m in c2.msgs():
        original = first_writes[m["id"]]
        assert (m["from"], m["type"], m["body"]) == (original["from"], original["type"], original["body"]), (
            original, m)
    if not resumed:
        # a new session: its msgs come from the inbox, highest priority first, then oldest first
        c_prio = dict(c_plan)
        c_index = {m: i for i, (m, _) in enumerate(c_plan)}
        got = [m["id"] for m in c2.msgs()]
        assert got == sorted(got, key=lambda m: (-c_prio[m], c_index[m])), got
    # section 12: each inbox message at most once per connection until acked
    c2_ids = [m["id"] for m in c2.msgs()]
    assert len(c2_ids) == len(set(c2_ids)), f"a message written twice on one connection: {c2_ids}"

    # B connects for the first time since its messages were queued: all N in priority order
    b2 = await clients.hello(B, app=b_app, ack_policy=lambda m: True)
    await b2.until(lambda: len(b2.msgs()) >= N_OFFLINE, f"{N_OFFLINE} msgs on {B}")
    b_msgs = b2.msgs()
    b_prio = dict(b_plan)
    b_index = {m: i for i, (m, _) in enumerate(b_plan)}
    got = [m["id"] for m in b_msgs]
    missing = [m for m, _ in b_plan if m not in set(got)]
    assert not missing, f"queued before the crash, not delivered after it: {missing}"
    assert len(got) == len(set(got)), "a message written twice on one connection"
    expected = sorted(got, key=lambda m: (-b_prio[m], b_index[m]))
    assert got == expected, f"not in priority/FIFO order: first difference at {_first_diff(got, expected)}"
    first_seq = b2.welcome["next_seq"]
    assert [m["seq"] for m in b_msgs] == list(range(first_seq, first_seq + N_OFFLINE)), "seq not consecutive"
    for m in b_msgs:
        assert m["from"] == A and m["type"] == "job" and m["ack"] is True, m
        assert m["body"]["i"] == (b_index[m["id"]]), m
    await b2.barrier()  # every ack is handled: the `delivered` receipts exist, kept for the offline A
    await c2.barrier()

    # every accepted/queued message reached the application exactly once after de-duplication
    assert set(b_app.processed) == {(A, m) for m, _ in b_plan}
    assert set(c_app.processed) == {(A, m) for m, _ in c_plan}
    assert all(n == 1 for n in (*b_app.times_processed.values(), *c_app.times_processed.values()))

    # -- the sender comes back: kept receipts after its welcome ----------------------------
    a2 = await clients.hello(A)
    await a2.until(
        lambda: all(a2.receipts(m, "delivered") for m, _ in b_plan)
        and all(a2.receipts(m, "delivered") or a.receipts(m, "delivered") for m, _ in c_plan),
        "kept `delivered` receipts for every message")
    await a2.barrier()  # everything the server had for A came before this pong
    a2_rest = [e for e in a2.log if e.get("op") != "receipt"]
    assert len(a2_rest) == 1 and a2_rest[0]["op"] == "pong", a2_rest[:3]
    # sections 4.2 and 12: one final receipt per message and target device; across a crash the same
    # final receipt may come twice (an ack whose removal was not yet on disk), never a different one
    for msg_id, _ in b_plan:
        finals = [r for r in a2.receipts(msg_id) if r["status"] in FINAL]
        assert [(r["status"], r.get("device")) for r in finals] == [("delivered", B)], (msg_id, finals)
    for msg_id, _ in c_plan:
        finals = {(r["status"], r.get("device")) for r in a.receipts(msg_id) + a2.receipts(msg_id)
                  if r["status"] in FINAL}
        assert finals == {("delivered", C)}, (msg_id, finals)


def _first_diff(got: list[Any], expected: list[Any]) -> tuple[int, Any, Any] | None:
    for k, (x, y) in enumerate(zip(got, expected, strict=True)):
        if x != y:
            return k, x, y
    return None


@pytest.mark.timeout(30)
async def test_accepted_message_in_flight_survives_kill_9():
    """Section 2: after a crash "sessions are as the server last wrote them (about every second): a
    session younger than that is unknown (`resume_error`) ... those that were `queued`/`accepted` come
    again from the inbox, with new `seq` numbers"; section 12: de-duplicate by `(from, id)`."""
    with data_directory() as data_dir:
        tokens = {device: issue_token(data_dir, USER, device) for device in (A, C)}
        server = ServerProcess(data_dir)
        clients = Clients(server, tokens)
        try:
            await server.start()
            a = await clients.hello(A)
            c = await clients.hello(C)
            await a.send({"op": "send", "id": "r-1", "to": {"device": C}, "type": "job", "body": {"k": [1, "two"]},
                          "ack": True, "durable": True})
            await a.until(lambda: a.receipts("r-1", "accepted"), "`accepted` for r-1")  # on disk
            await c.until(lambda: c.msgs(), "the msg on C")
            original = c.msgs()[0]

            server.kill()
            await server.start()

            c2 = await clients.hello(C, resume={"session": c.welcome["session"], "last_seq": original["seq"]})
            # Resumed or not depends on whether the young session was written before the kill.
            assert c2.welcome.get("resumed") is True or "resume_error" in c2.welcome, c2.welcome
            await c2.until(lambda: c2.msgs(), "the unacked msg again after welcome")
            again = c2.msgs()[0]
            assert c2.log[0] is again, c2.log[:3]  # right after welcome
            same = ("id", "from", "type", "body", "ts")
            assert {k: again[k] for k in same} == {k: original[k] for k in same}, (original, again)
            assert again["seq"] == c2.welcome["next_seq"], (c2.welcome, again)  # a new seq
            await c2.send({"op": "ack", "seq": again["seq"]})
            await c2.barrier()
            a2 = await clients.hello(A)
            await a2.until(lambda: a2.receipts("r-1", "delivered"), "kept `delivered` for r-1")
            await a2.barrier()
            assert [r["device"] for r in a2.receipts("r-1", "delivered")] == [C]
        except BaseException:
            print(server.logs())
            raise
        finally:
            await clients.close_all()
            server.kill()


@pytest.mark.timeout(40)
async def test_resume_after_kill_9_redelivers_the_accepted_message():
    """Sections 2, 3 and 12: a session saved by a graceful restart is resumable after a later kill -9;
    the `accepted` message comes again from the inbox (same `id`, `ts`, `body`; a new `seq`).

    The session is first carried over a graceful restart (README: SIGTERM "saves the sessions (they
    stay resumable after the restart)"), so it is known to the store before the kill -9."""
    with data_directory() as data_dir:
        tokens = {device: issue_token(data_dir, USER, device) for device in (A, C)}
        server = ServerProcess(data_dir)
        clients = Clients(server, tokens)
        try:
            await server.start()
            c = await clients.hello(C)
            session = c.welcome["session"]
            server.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(server.wait, 10) == 0
            await c.until(lambda: c.closed is not None, "the close on shutdown")
            assert c.closed is not None and c.closed.rcvd is not None and c.closed.rcvd.code == 1001, c.closed

            await server.start()
            c2 = await clients.hello(C, resume={"session": session, "last_seq": 0})
            assert c2.welcome.get("resumed") is True and c2.welcome["session"] == session, c2.welcome
            a = await clients.hello(A)
            await a.send({"op": "send", "id": "s-1", "to": {"device": C}, "type": "job", "body": {"k": [1, "two"]},
                          "ack": True, "durable": True})
            await a.until(lambda: a.receipts("s-1", "accepted"), "`accepted` for s-1")  # on disk
            await c2.until(lambda: c2.msgs(), "the msg on C")
            original = c2.msgs()[0]
            assert original["seq"] == c2.welcome["next_seq"], (c2.welcome, original)

            server.kill()
            await server.start()

            c3 = await clients.hello(C, resume={"session": session, "last_seq": original["seq"]})
            assert c3.welcome.get("resumed") is True and c3.welcome["session"] == session, (
                f"session not resumable after kill -9 and restart: {c3.welcome!r}")
            assert c3.welcome["next_seq"] > original["seq"], c3.welcome  # seq never goes back
            await c3.until(lambda: c3.msgs(), "the unacked msg again after welcome")
            again = c3.log[0]  # right after welcome
            same = ("id", "from", "type", "body", "ts")
            assert {k: again[k] for k in same} == {k: original[k] for k in same}, (original, again)
            assert again["seq"] == c3.welcome["next_seq"], (c3.welcome, again)
            await c3.send({"op": "ack", "seq": again["seq"]})
            await c3.barrier()
            assert [m["id"] for m in c3.msgs()] == ["s-1"], c3.msgs()
            a2 = await clients.hello(A)
            await a2.until(lambda: a2.receipts("s-1", "delivered"), "kept `delivered` for s-1")
            await a2.barrier()
            assert [r["device"] for r in a2.receipts("s-1", "delivered")] == [C]
        except BaseException:
            print(server.logs())
            raise
        finally:
            await clients.close_all()
            server.kill()
