"""Randomized task handoffs against a real server process (protocol.md section 15, issue 7).

A hypothesis state machine drives three devices of one user that share one task, speaking the raw
protocol (JSON and msgpack) to ``rccs serve`` on a SQLite data directory. Its rules claim, renew and
release the lease, write fenced ``state.patch``es, start handoffs from any device to any device, answer
``handoff.prepare`` (prepared, a last fenced write sent just before prepared, or refuse) and
``handoff.offer`` (accept / reject), optionally dying right after the answer, abort a device's TCP
connection at whatever step the handoff is in and reconnect it, SIGKILL the server and restart it on the
same data, and wait for a handoff timeout (by waiting for its ``handoff.failed``; the server runs with
0.3 s handoff timeouts and 2 s leases). One rule runs a whole handoff disrupted at one step, another
runs one step at a time so that lease ops come in between.

Each device keeps what a careful client would believe: the epoch it holds, learnt from ``task.lease``,
``handoff.committed`` (acted on once per handoff id), ``handoff.revoked`` and ``stale_epoch``. Every answer
is checked against a prediction made from the server's truth (``task.list``) read just before the op,
allowing only the outcomes a concurrent timeout or lease expiry can explain (and then checking that it
did happen). After every step:

- the task's epoch never decreases, also across server restarts;
- no device believes an epoch newer than the task's; at most one device believes the current epoch,
  and it is the owner in ``task.list``; each epoch was ever given (claim or committed handoff) to one
  device only, and ``task.list``'s owner is the device that epoch was given to;
- the fenced-write log ``user/log-<n>`` holds exactly the writes that got ``state.ok`` (durable across
  SIGKILL, refused ones absent), each from the device holding that epoch: epoch -> device is a
  function and the epochs never decrease in revision order.

``RCCS_HANDOFF_EXAMPLES`` (default 20) and ``RCCS_HANDOFF_STEPS`` (default 20) make a longer hunt.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import sys
import traceback
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
import websockets
from hypothesis import HealthCheck, event, note, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    rule,
    run_state_machine_as_test,
)
from test_delivery_crash import data_directory, issue_token
from websockets.exceptions import ConnectionClosed

from rccs.testing import ServerProcess, child_environment

USER = "handoff-user"
DEVICES = ("d0", "d1", "d2")
ENCODING = {"d0": "json", "d1": "msgpack", "d2": "json"}
# The server process is shared by the examples of one test run (each example has its own task).
SERVER_ENV = {
    "RCCS_HANDOFF_PREPARE_TIMEOUT": "0.3",
    "RCCS_HANDOFF_ACCEPT_TIMEOUT": "0.3",
    "RCCS_TASK_LEASE_TTL": "2",
}
BOUND = 5.0  # the longest any awaited envelope may take: a liveness bound, never a synchronisation
MAX_EXAMPLES = int(os.environ.get("RCCS_HANDOFF_EXAMPLES", "20"))
STEPS = int(os.environ.get("RCCS_HANDOFF_STEPS", "20"))
MAX_CRASHES = 2  # standalone server kills per example (the handoff answers may kill it too)
PREPARE, OFFER = "prepare", "offer"
FAIL_REASONS = {"refused", "rejected", "prepare_timeout", "accept_timeout", "owner_disconnected",
                "target_disconnected", "checkpoint_too_large", "shutdown", "revoked", "lease_changed", "internal"}


@dataclass
class World:
    server: ServerProcess
    tokens: dict[str, str]
    examples: itertools.count = field(default_factory=lambda: itertools.count(1))
    seen: Counter[str] = field(default_factory=Counter)  # what happened, over all examples (printed at the end)
    first_failure: str | None = None  # the steps of the first example that failed, and the error


# ---------------------------------------------------------------------------
# a device's connection: a background reader that hands every envelope to the model
# ---------------------------------------------------------------------------


class Conn:
    def __init__(self, device: str, ws: Any, on_envelope: Callable[[str, Conn, dict[str, Any]], None]):
        self.device = device
        self.ws = ws
        self.encoding = ENCODING[device]
        self.inbox: list[dict[str, Any]] = []
        self.closed = False
        self.failed_seen: dict[str, int] = {}  # handoff id -> handoff.failed envelopes on this connection
        self.failure: BaseException | None = None
        self._on_envelope = on_envelope
        self._changed = asyncio.Event()
        self._reader = asyncio.ensure_future(self._read())

    async def _read(self) -> None:
        try:
            async for frame in self.ws:
                envelope = json.loads(frame) if isinstance(frame, str) else msgpack.unpackb(frame, raw=False)
                assert isinstance(frame, str) == (self.encoding == "json"), (self.device, envelope)
                if envelope.get("op") == "presence":
                    continue
                self.inbox.append(envelope)
                self._on_envelope(self.device, self, envelope)
                self._changed.set()
        except (ConnectionClosed, OSError):
            pass
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # a failed check on a notice: the step waiting on this device raises it
            self.failure = exc
            raise
        finally:
            self.closed = True
            self._changed.set()

    async def send(self, envelope: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(envelope) if self.encoding == "json"
                           else msgpack.packb(envelope, use_bin_type=True))

    async def wait(self, predicate: Callable[[dict[str, Any]], bool], what: str, start: int = 0) -> dict[str, Any]:
        """The first envelope from ``inbox[start:]`` on that matches; fails after BOUND seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BOUND
        while True:
            self._changed.clear()
            if self.failure is not None:
                raise self.failure
            for envelope in self.inbox[start:]:
                if predicate(envelope):
                    return envelope
            remaining = deadline - loop.time()
            if self.closed or remaining <= 0:
                state = "connection closed" if self.closed else f"nothing within {BOUND}s"
                raise AssertionError(f"{self.device}: {state} waiting for {what}; last: {self.inbox[-6:]!r}")
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), remaining)

    def abort(self) -> None:
        """Drop the TCP connection without a close handshake (a device that died or lost its network)."""
        transport = self.ws.transport
        if transport is not None:
            transport.abort()

    async def dispose(self) -> None:
        self.abort()
        self._reader.cancel()
        with contextlib.suppress(BaseException):
            await self._reader


# ---------------------------------------------------------------------------
# the model
# ---------------------------------------------------------------------------


@dataclass
class Belief:
    epoch: int | None = None  # the epoch this device believes it holds
    last: int | None = None  # the newest epoch it ever held (used to try a stale op)
    seen_committed: set[str] = field(default_factory=set)


@dataclass(eq=False)
class Handoff:
    id: str
    requester: str
    owner: str
    target: str
    epoch: int
    stage: str = PREPARE


def is_op(op: str, **fields: Any) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("op") == op and all(e.get(k) == v for k, v in fields.items())


def step_error(handoff_id: str) -> Callable[[dict[str, Any]], bool]:
    return lambda e: e.get("op") == "error" and e.get("handoff") == handoff_id


class HandoffMachine(RuleBasedStateMachine):
    world: World  # set by the test before the run

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        n = next(self.world.examples)
        self.task = f"job-{n}"
        self.doc = f"user/log-{n}"
        self.ids = itertools.count(1)
        self.conns: dict[str, Conn] = {}
        self.all_conns: list[Conn] = []  # also the closed ones: a failed check in a notice handler is kept there
        self.beliefs = {d: Belief() for d in DEVICES}
        self.handoff: Handoff | None = None
        self.failed: dict[str, str] = {}  # handoff id -> reason
        self.committed: dict[str, tuple[str, int]] = {}  # handoff id -> (owner, epoch)
        self.aborted: set[str] = set()  # handoffs open when the server was killed
        self.granted: dict[int, str] = {}  # epoch -> the device it was given to
        self.max_epoch = 0
        self.writes: dict[str, tuple[str, int, int]] = {}  # key -> (device, epoch, rev), the accepted ones
        self.last_rev = 0
        self.notified = asyncio.Event()
        self.crashes = 0
        self.last_entry: dict[str, Any] | None = None  # the task as task.list showed it last
        self.trace: list[str] = []
        try:
            self.run(self._start())
        except BaseException:
            self.teardown()
            raise

    # -- plumbing ----------------------------------------------------------------------

    def run(self, coro: Any) -> Any:
        step = sys._getframe(1).f_code.co_name
        self.world.seen["rule " + step] += 1
        arguments = {k: v for k, v in sys._getframe(1).f_locals.items() if k not in ("self", "__class__")}
        self.note(f"-- {step} {arguments}" if step != "consistent" else "-- check")
        try:
            result = self.loop.run_until_complete(asyncio.wait_for(coro, 30))
            self.raise_failures()
            return result
        except BaseException:
            if self.world.first_failure is None:  # hypothesis may not replay a failure that depends on timing
                self.world.first_failure = "\n".join([*self.trace, traceback.format_exc()])
            raise

    def note(self, text: str) -> None:
        note(text)
        self.trace.append(text)

    async def _start(self) -> None:
        if not self.world.server.running():
            await self.world.server.start()
        for device in DEVICES:
            await self.connect(device)

    def teardown(self) -> None:
        try:
            self.loop.run_until_complete(self._close_all())
        finally:
            self.loop.close()

    async def _close_all(self) -> None:
        for conn in self.conns.values():
            await conn.dispose()
        self.conns.clear()

    async def connect(self, device: str) -> None:
        ws = await websockets.connect(self.world.server.ws_url, proxy=None, open_timeout=BOUND,
                                      max_size=None)
        conn = Conn(device, ws, self.on_envelope)
        self.conns[device] = conn
        self.all_conns.append(conn)
        await conn.send({"op": "hello", "token": self.world.tokens[device],
                         "device": {"type": "desktop", "name": device}})
        welcome = await conn.wait(lambda e: True, "welcome")
        assert welcome["op"] == "welcome", welcome

    async def kill_device(self, device: str) -> None:
        """Abort the device's TCP connection (no close frame); reconnect later with ``connect``."""
        self.note(f"abort {device}'s connection")
        await self.conns.pop(device).dispose()

    async def request(self, device: str, envelope: dict[str, Any]) -> dict[str, Any]:
        msg_id = f"m{next(self.ids)}"
        conn = self.conns[device]
        start = len(conn.inbox)
        await conn.send({**envelope, "id": msg_id})
        answer = await conn.wait(lambda e: e.get("id") == msg_id, f"the answer to {envelope['op']}", start)
        self.note(f"{device}: {envelope} -> {answer}")
        if envelope["op"] not in ("ping", "task.list", "state.get"):
            self.event(f"{envelope['op']} -> {answer.get('code', answer['op'])}")
        return answer

    async def outcome(self, *watches: tuple[str, Callable[[dict[str, Any]], bool], int]) -> dict[str, Any]:
        """The first envelope that matches one of ``(device, predicate, inbox start)``, in the watches' order
        (a handoff step has no reply when it succeeds: what it causes is the answer)."""
        found: list[dict[str, Any]] = []

        def any_seen() -> bool:
            for device, predicate, start in watches:
                found.extend(e for e in self.conns[device].inbox[start:] if predicate(e))
                if found:
                    return True
            return False

        await self.until_notified(any_seen, f"any of {len(watches)} outcomes")
        return found[0]

    def on_envelope(self, device: str, conn: Conn, envelope: dict[str, Any]) -> None:
        """Asynchronous notices: what a careful client learns from them."""
        op = envelope.get("op")
        if isinstance(op, str) and op.startswith("handoff.") and envelope.get("task") != self.task:
            return  # the server is shared by the examples: another example's task (a committed sent again)
        belief = self.beliefs[device]
        if op in ("handoff.committed", "handoff.revoked", "handoff.failed", "handoff.prepare", "handoff.offer"):
            self.trace.append(f"   {device} <- {envelope}")
        if op == "handoff.committed":
            hid, owner, epoch = envelope["handoff"], envelope["owner"], envelope["epoch"]
            assert self.committed.setdefault(hid, (owner, epoch)) == (owner, epoch), envelope
            assert hid not in self.failed, (envelope, self.failed[hid])
            self.event("handoff.committed")
            if owner == device and hid not in belief.seen_committed:  # the same id may come again: act once
                belief.seen_committed.add(hid)
                self.grant(epoch, device)
                assert belief.epoch is None or belief.epoch < epoch, (device, belief, envelope)
                belief.epoch = belief.last = epoch
        elif op == "handoff.revoked":
            hid, epoch = envelope["handoff"], envelope["epoch"]
            assert self.committed.setdefault(hid, (envelope["owner"], epoch)) == (envelope["owner"], epoch)
            if belief.epoch is not None and belief.epoch < epoch:
                belief.epoch = None
        elif op == "handoff.failed":
            hid, reason = envelope["handoff"], envelope["reason"]
            assert reason in FAIL_REASONS, envelope
            assert reason not in ("lease_changed", "internal"), f"the server reports a bug: {envelope}"
            assert self.failed.setdefault(hid, reason) == reason, (envelope, self.failed[hid])
            assert hid not in self.committed, envelope
            self.event(f"handoff.failed: {reason}")
            conn.failed_seen[hid] = conn.failed_seen.get(hid, 0) + 1
            assert conn.failed_seen[hid] == 1, f"{device} told twice that {hid} failed"
        self.notified.set()

    def event(self, what: str) -> None:
        event(what)
        self.world.seen[what] += 1

    def raise_failures(self) -> None:
        for conn in self.all_conns:
            if conn.failure is not None:
                raise conn.failure

    def grant(self, epoch: int, device: str) -> None:
        assert self.granted.setdefault(epoch, device) == device, \
            f"epoch {epoch} given to {self.granted[epoch]} and to {device}"

    def open_handoff(self) -> Handoff | None:
        h = self.handoff
        if h is None or h.id in self.failed or h.id in self.committed or h.id in self.aborted:
            return None
        return h

    async def until_notified(self, condition: Callable[[], bool], what: str) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + BOUND
        while not condition():
            self.raise_failures()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise AssertionError(f"no {what} within {BOUND}s")
            self.notified.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.notified.wait(), remaining)

    async def timed_out(self, h: Handoff, *also: str) -> None:
        """An answer says ``h`` is no longer open although the model did not end it: only its timeout may."""
        await self.until_notified(lambda: h.id in self.failed, f"handoff.failed for {h.id}")
        expected = "prepare_timeout" if h.stage == PREPARE else "accept_timeout"
        assert self.failed[h.id] in (expected, *also), (h, self.failed[h.id])

    async def truth(self) -> dict[str, Any] | None:
        """The task as ``task.list`` shows it; the epoch never goes back."""
        device = next(d for d in DEVICES if d in self.conns)
        answer = await self.request(device, {"op": "task.list", "task": self.task})
        assert answer["op"] == "tasks", answer
        assert len(answer["tasks"]) <= 1, answer
        entry = answer["tasks"][0] if answer["tasks"] else None
        epoch = 0 if entry is None else entry["epoch"]
        assert epoch >= self.max_epoch, f"the task's epoch went back from {self.max_epoch} to {epoch}"
        self.max_epoch = epoch
        self.last_entry = entry
        if entry is not None and entry["owner"] is not None and entry["epoch"] in self.granted:
            assert self.granted[entry["epoch"]] == entry["owner"], (entry, self.granted)
        return entry

    # -- the invariant -------------------------------------------------------------------------

    @invariant()
    def consistent(self) -> None:
        self.run(self._check())

    async def _check(self) -> None:
        entry = await self.truth()
        h = self.open_handoff()
        listed = None if entry is None else entry.get("handoff")
        if h is not None and listed != h.id:
            # it ended since the last step: only a timeout ends a handoff the model did not end
            assert listed is None, (entry, h)
            await self.timed_out(h)
        else:
            assert listed == (h.id if h is not None else None), (entry, h)
        epoch = 0 if entry is None else entry["epoch"]
        owner = None if entry is None else entry["owner"]
        holders = []
        for device, belief in self.beliefs.items():
            assert belief.epoch is None or belief.epoch <= epoch, (device, belief, entry)
            if belief.epoch is not None and belief.epoch == epoch:
                holders.append(device)
        assert len(holders) <= 1, f"split ownership: {holders} all believe they hold epoch {epoch}"
        believed = [b.epoch for b in self.beliefs.values() if b.epoch is not None]
        assert len(believed) == len(set(believed)), f"two devices believe the same epoch: {self.beliefs}"
        if holders:
            assert owner == holders[0], f"{holders[0]} believes it holds epoch {epoch}, task.list says {entry}"
        await self.check_log()

    async def check_log(self) -> None:
        device = next(d for d in DEVICES if d in self.conns)
        answer = await self.request(device, {"op": "state.get", "doc": self.doc})
        assert answer["op"] == "state", answer
        value = answer["value"] or {}
        assert set(value) == set(self.writes), f"the log holds {sorted(value)}, accepted were {sorted(self.writes)}"
        writer_of: dict[int, str] = {}
        previous = 0
        for key, (device_, epoch, _rev) in sorted(self.writes.items(), key=lambda kv: kv[1][2]):
            assert value[key] == {"dev": device_, "epoch": epoch}, (key, value[key])
            assert writer_of.setdefault(epoch, device_) == device_, \
                f"epoch {epoch} has accepted writes of {writer_of[epoch]} and of {device_}"
            assert self.granted.get(epoch) == device_, (epoch, device_, self.granted)
            assert epoch >= previous, f"an accepted write at epoch {epoch} after one at epoch {previous}"
            previous = epoch
        assert answer["rev"] == self.last_rev, (answer, self.last_rev)

    # -- lease ops -------------------------------------------------------------------------

    @initialize(device=st.sampled_from(DEVICES))
    def first_claim(self, device: str) -> None:
        self.run(self._claim(device, None))

    async def _claim(self, device: str, ttl: float | None) -> None:
        entry = await self.truth()
        h = self.open_handoff()
        envelope: dict[str, Any] = {"op": "task.claim", "task": self.task}
        if ttl is not None:
            envelope["ttl"] = ttl
        answer = await self.request(device, envelope)
        owner = None if entry is None else entry["owner"]
        epoch = 0 if entry is None else entry["epoch"]
        belief = self.beliefs[device]
        if answer["op"] == "task.lease":
            assert answer["owner"] == device and answer["task"] == self.task, answer
            if owner == device:
                assert answer["epoch"] == epoch, (answer, entry)  # the holder keeps its epoch
            else:
                # a new owner: nobody held a live lease (it was released, expired, or expired since)
                assert answer["epoch"] == epoch + 1, (answer, entry)
                if h is not None:  # an open handoff holds the task even when the lease expired
                    await self.timed_out(h)
            self.grant(answer["epoch"], device)
            belief.epoch = belief.last = answer["epoch"]
        elif answer["op"] == "error" and answer["code"] == "conflict":
            assert owner not in (None, device) and entry is not None and entry["live"], (answer, entry)
            if h is not None:  # an open handoff holds the task: other devices get handoff_busy
                await self.timed_out(h)
            assert (answer["owner"], answer["epoch"]) == (owner, epoch), (answer, entry)
        elif answer["op"] == "error" and answer["code"] == "handoff_busy":
            assert owner != device and h is not None and answer["handoff"] == h.id, (answer, entry, h)
        else:
            raise AssertionError(f"claim by {device}: {answer}, task was {entry}")

    def epoch_to_use(self, device: str) -> int | None:
        belief = self.beliefs[device]
        return belief.epoch if belief.epoch is not None else belief.last

    def expect_stale(self, device: str, used: int, answer: dict[str, Any], entry: dict[str, Any] | None) -> None:
        assert entry is not None
        assert answer["op"] == "error" and answer["code"] == "stale_epoch", (device, used, answer, entry)
        assert (answer["task"], answer["epoch"], answer["owner"]) == (self.task, entry["epoch"], entry["owner"])
        belief = self.beliefs[device]
        if belief.epoch is not None and belief.epoch <= used:
            belief.epoch = None

    @rule(op=st.sampled_from(["claim", "claim", "short claim", "renew", "renew", "write", "write", "write",
                              "release"]),
          pick=st.sampled_from(range(len(DEVICES))))
    def lease_op(self, op: str, pick: int) -> None:
        """A claim by any device (a short one expires soon), or an op at the epoch a device that ever held the
        task believes it holds, else its last one: the holder's renew, fenced write or release (less often: it
        ends the lease), or a stale one."""
        if op.endswith("claim"):
            self.run(self._claim(DEVICES[pick], 0.3 if op == "short claim" else None))
        else:
            device = self.with_epoch(pick)
            self.run({"renew": self._renew, "write": self._fenced_write, "release": self._release}[op](device))

    def with_epoch(self, pick: int) -> str:
        """One of the devices that hold or once held an epoch (its op is the holder's or a stale one)."""
        candidates = [d for d in DEVICES if self.beliefs[d].last is not None]
        return candidates[pick % len(candidates)]

    def holds(self, device: str, used: int, entry: dict[str, Any] | None) -> bool:
        assert entry is not None and used <= entry["epoch"], (device, used, entry)
        return entry["owner"] == device and entry["epoch"] == used

    async def _renew(self, device: str) -> None:
        used = self.epoch_to_use(device)
        assert used is not None
        entry = await self.truth()
        answer = await self.request(device, {"op": "task.renew", "task": self.task, "epoch": used})
        if self.holds(device, used, entry):
            assert answer["op"] == "task.lease" and (answer["owner"], answer["epoch"]) == (device, used), answer
            self.beliefs[device].epoch = used
        else:
            self.expect_stale(device, used, answer, entry)

    async def _release(self, device: str) -> None:
        used = self.epoch_to_use(device)
        assert used is not None
        entry = await self.truth()
        h = self.open_handoff()
        answer = await self.request(device, {"op": "task.release", "task": self.task, "epoch": used})
        if not self.holds(device, used, entry):
            self.expect_stale(device, used, answer, entry)
        elif answer["op"] == "error" and answer["code"] == "handoff_busy":
            assert h is not None and answer["handoff"] == h.id, (answer, h)
        else:
            assert answer["op"] == "task.released" and answer["epoch"] == used, answer
            if h is not None:
                await self.timed_out(h)
            self.beliefs[device].epoch = None

    async def _fenced_write(self, device: str) -> None:
        used = self.epoch_to_use(device)
        assert used is not None
        entry = await self.truth()
        h = self.open_handoff()
        key = f"w{next(self.ids)}"
        answer = await self.request(device, {"op": "state.patch", "doc": self.doc, "task": self.task,
                                             "epoch": used, "patch": {key: {"dev": device, "epoch": used}}})
        if not self.holds(device, used, entry):
            self.expect_stale(device, used, answer, entry)
            return
        if answer["op"] == "error" and answer["code"] == "handoff_busy":
            # the owner answered prepared: it promised to pause until the handoff ends
            assert h is not None and h.stage == OFFER and answer["handoff"] == h.id, (answer, h)
            return
        assert answer["op"] == "state.ok" and not answer["noop"], answer
        if h is not None and h.stage == OFFER:
            await self.timed_out(h)
        assert answer["prev_rev"] == self.last_rev and answer["rev"] > self.last_rev, (answer, self.last_rev)
        self.last_rev = answer["rev"]
        self.writes[key] = (device, used, answer["rev"])

    # -- handoff --------------------------------------------------------------------------

    @rule(requester=st.sampled_from(DEVICES), to=st.sampled_from(["other", "other", *DEVICES]),
          pick=st.sampled_from([0, 1]),
          owner_answer=st.sampled_from(["prepared", "write+prepared", "prepared+write", "refuse"]),
          target_answer=st.sampled_from(["accept", "accept+write", "reject"]),
          die=st.sampled_from([None, None, None, "party", "server"]))
    def handoff_step(self, requester: str, to: str, pick: int, owner_answer: str, target_answer: str,
                     die: str | None) -> None:
        """One step of a handoff, so that other ops come between the steps: the request (to any device, mostly
        one other than the owner) when none is open, else the owner's or the target's answer, after which the
        answering device ("party") or the server may die at once."""
        h = self.open_handoff()
        if h is None:
            self.run(self._request_handoff(requester, self.to_device(to, pick)))
        elif h.stage == PREPARE:
            self.run(self._owner_answers(owner_answer, "owner" if die == "party" else die))
        else:
            self.run(self._target_answers(target_answer, "target" if die == "party" else die))

    def to_device(self, to: str, pick: int) -> str:
        if to != "other":
            return to
        owner = self.last_entry["owner"] if self.last_entry is not None else None
        others = [d for d in DEVICES if d != owner]
        return others[pick % len(others)]

    async def _request_handoff(self, requester: str, target: str) -> None:
        entry = await self.truth()
        h = self.open_handoff()
        answer = await self.request(requester, {"op": "handoff.request", "task": self.task,
                                                "to": {"device": target}})
        if answer["op"] == "error" and answer["code"] == "not_found":
            # no live lease: never claimed, released, expired, or it expired since task.list
            if entry is not None and entry["live"]:
                later = await self.truth()
                assert later is not None and not later["live"], (answer, entry, later)
            return
        # anything else needs a live lease (nobody renews it between task.list and the request)
        assert entry is not None and entry["owner"] is not None and entry["live"], (answer, entry)
        if answer["op"] == "error" and answer["code"] == "handoff_busy":
            assert h is not None and answer["handoff"] == h.id, (answer, h)
            return
        if h is not None:
            await self.timed_out(h)
        owner = entry["owner"]
        if answer["op"] == "error" and answer["code"] == "bad_request":
            assert target == owner, (answer, entry)
            return
        assert answer["op"] == "handoff.started", (answer, entry)
        assert target != owner, (answer, entry)
        assert (answer["task"], answer["from"], answer["to"], answer["epoch"]) == (
            self.task, owner, target, entry["epoch"]), (answer, entry)
        hid = answer["handoff"]
        self.handoff = Handoff(hid, requester, owner, target, entry["epoch"])
        prepare = await self.conns[owner].wait(is_op("handoff.prepare", handoff=hid), "handoff.prepare")
        assert (prepare["task"], prepare["to"], prepare["epoch"]) == (self.task, target, entry["epoch"]), prepare

    async def send_write(self, device: str, epoch: int) -> tuple[str, str]:
        """Send a fenced write without waiting for its answer; returns (its key in the log, its id)."""
        key, write_id = f"w{next(self.ids)}", f"m{next(self.ids)}"
        await self.conns[device].send({"op": "state.patch", "id": write_id, "doc": self.doc, "task": self.task,
                                       "epoch": epoch, "patch": {key: {"dev": device, "epoch": epoch}}})
        return key, write_id

    async def write_answer(self, device: str, write_id: str, start: int) -> dict[str, Any]:
        answer = await self.conns[device].wait(lambda e: e.get("id") == write_id, "the answer to a write", start)
        self.note(f"{device}: the write {write_id} -> {answer}")
        self.event(f"state.patch next to a step -> {answer.get('code', answer['op'])}")
        return answer

    def accepted(self, key: str, device: str, epoch: int, answer: dict[str, Any]) -> None:
        assert answer["op"] == "state.ok" and not answer["noop"], answer
        assert answer["prev_rev"] == self.last_rev and answer["rev"] > self.last_rev, (answer, self.last_rev)
        self.last_rev = answer["rev"]
        self.writes[key] = (device, epoch, answer["rev"])

    async def _owner_answers(self, answer: str, die: str | None) -> None:
        """The owner answers ``prepared`` (alone, just after a fenced write, or just before one) or ``refuse``;
        with ``die`` its connection or the server dies right after."""
        h = self.open_handoff()
        assert h is not None
        owner = self.conns[h.owner]
        start = len(owner.inbox)
        before = after = None
        if answer == "write+prepared" and die is None:
            # judged before the prepared (section 15.3), while the owner has not paused yet: accepted
            before = await self.send_write(h.owner, h.epoch)
        if answer != "refuse":
            await owner.send({"op": "handoff.prepared", "handoff": h.id, "checkpoint": {"epoch": h.epoch}})
        else:
            await owner.send({"op": "handoff.refuse", "handoff": h.id, "reason": "not now"})
        if answer == "prepared+write" and die is None:
            # judged after the prepared: the owner promised to pause, so handoff_busy
            after = await self.send_write(h.owner, h.epoch)
        if before is not None:
            self.accepted(before[0], h.owner, h.epoch, await self.write_answer(h.owner, before[1], start))
        if die == "server":
            await self.crash_server()
            return
        if die == "owner":
            # the answer may or may not have reached the server before the connection broke
            await self.kill_device(h.owner)
            ended = await self.conns[h.target].wait(lambda e: e.get("handoff") == h.id and e.get("op") in (
                "handoff.offer", "handoff.failed"), "the offer or the failure")
            await self.connect(h.owner)
            self.event(f"owner died after {answer}: {ended['op']}")
            if ended["op"] == "handoff.failed":
                allowed = {"owner_disconnected", "prepare_timeout"} | ({"refused"} if answer == "refuse" else set())
                assert ended["reason"] in allowed, (ended, answer)
                return
            assert answer != "refuse", ended
        else:
            ended = await self.outcome((h.target, is_op("handoff.offer", handoff=h.id), 0),
                                       (h.owner, is_op("handoff.failed", handoff=h.id), 0),
                                       (h.owner, step_error(h.id), start))
            if ended["op"] == "error" or (ended["op"] == "handoff.failed" and ended["reason"] != "refused"):
                # the handoff timed out before the answer was handled
                assert ended["op"] == "handoff.failed" or ended["code"] == "not_found", ended
                # (or, on a slow machine, the offer went out and the accept timeout ran out before it was read)
                await self.timed_out(h, "accept_timeout")
                if after is not None:  # the owner still holds the lease, with no handoff open
                    self.accepted(after[0], h.owner, h.epoch, await self.write_answer(h.owner, after[1], start))
                return
            if ended["op"] == "handoff.failed":
                assert answer == "refuse" and ended.get("detail") == "not now", ended
                return
            assert answer != "refuse", ended
        assert (ended["task"], ended["from"], ended["epoch"], ended["checkpoint"]) == (
            self.task, h.owner, h.epoch + 1, {"epoch": h.epoch}), ended
        h.stage = OFFER
        if after is not None:
            written = await self.write_answer(h.owner, after[1], start)
            if written["op"] == "state.ok":  # only if the accept timeout ended the handoff first
                await self.until_notified(lambda: h.id in self.failed, f"handoff.failed for {h.id}")
                assert self.failed[h.id] == "accept_timeout", (written, self.failed[h.id])
                self.accepted(after[0], h.owner, h.epoch, written)
            else:
                assert (written["op"], written["code"], written["handoff"]) == ("error", "handoff_busy", h.id), written

    async def _target_answers(self, answer: str, die: str | None) -> None:
        """The target answers ``accept`` (alone, or just before a fenced write at the offered epoch) or
        ``reject``; with ``die`` its connection or the server dies right after."""
        h = self.open_handoff()
        assert h is not None
        target = self.conns[h.target]
        start = len(target.inbox)
        after = None
        if answer != "reject":
            await target.send({"op": "handoff.accept", "handoff": h.id})
        else:
            await target.send({"op": "handoff.reject", "handoff": h.id, "reason": "no room"})
        if answer == "accept+write" and die is None:
            # judged after the accept, so after the commit: the new owner's first write at the new epoch
            after = await self.send_write(h.target, h.epoch + 1)
        if die == "server":
            await self.crash_server(maybe_committed=h if answer != "reject" else None)
            return
        if die == "target":
            await self.kill_device(h.target)
            # the owner hears the outcome: revoked (committed) or failed
            ended = await self.conns[h.owner].wait(lambda e: e.get("handoff") == h.id and e.get("op") in (
                "handoff.revoked", "handoff.failed"), "the outcome of the handoff")
            await self.connect(h.target)
            self.event(f"target died after {answer}: {ended['op']}")
            if ended["op"] == "handoff.failed":
                allowed = {"target_disconnected", "accept_timeout"} | ({"rejected"} if answer == "reject" else set())
                assert ended["reason"] in allowed, (ended, answer)
                return
            assert answer != "reject", ended
            # the new owner missed handoff.committed: it comes again after its hello
            await self.expect_committed(h)
            return
        ended = await self.outcome((h.target, is_op("handoff.committed", handoff=h.id), start),
                                   (h.target, is_op("handoff.failed", handoff=h.id), 0),
                                   (h.target, step_error(h.id), start))
        if ended["op"] == "error" or (ended["op"] == "handoff.failed" and ended["reason"] != "rejected"):
            # the handoff timed out before the answer was handled
            assert ended["op"] == "handoff.failed" or ended["code"] == "not_found", ended
            await self.timed_out(h)
            if after is not None:  # epoch E+1 was never given
                written = await self.write_answer(h.target, after[1], start)
                assert (written["op"], written["code"]) == ("error", "bad_request"), written
            return
        if ended["op"] == "handoff.failed":
            assert answer == "reject" and ended.get("detail") == "no room", ended
            return
        assert answer != "reject", ended
        await self.expect_committed(h)
        if after is not None:
            written = await self.write_answer(h.target, after[1], start)
            self.accepted(after[0], h.target, h.epoch + 1, written)
            # handoff.committed came first: it was sent when the accept was handled, before the write was
            assert target.inbox.index(ended) < target.inbox.index(written), (ended, written)
        revoked = await self.conns[h.owner].wait(is_op("handoff.revoked", handoff=h.id), "handoff.revoked")
        assert (revoked["epoch"], revoked["owner"]) == (h.epoch + 1, h.target), revoked
        if h.requester != h.target:
            await self.conns[h.requester].wait(is_op("handoff.committed", handoff=h.id), "committed to the requester")

    @rule(requester=st.sampled_from(DEVICES), pick=st.sampled_from([0, 1]),
          owner_answer=st.sampled_from(["prepared", "write+prepared", "prepared+write", "refuse"]),
          target_answer=st.sampled_from(["accept", "accept+write", "reject"]),
          at=st.sampled_from(["nowhere", "prepare", "prepared", "offer", "accepted"]),
          what=st.sampled_from(["owner", "target", "requester", "server", "timeout"]))
    def whole_handoff(self, requester: str, pick: int, owner_answer: str, target_answer: str, at: str,
                      what: str) -> None:
        """A handoff from its request (to a device other than the owner, unless one is open) to its end, disrupted
        at one step: ``what`` (a device's connection aborted and reconnected, the server killed, or the timeout
        waited for) happens ``at`` the prepare or the offer, before the answer, or right after the answer
        (then the answering device or the server dies)."""
        self.run(self._whole_handoff(requester, pick, owner_answer, target_answer, at, what))

    async def _whole_handoff(self, requester: str, pick: int, owner_answer: str, target_answer: str, at: str,
                             what: str) -> None:
        if self.open_handoff() is None:
            await self.truth()
            await self._request_handoff(requester, self.to_device("other", pick))

        async def disrupt(h: Handoff) -> None:
            if what == "server":
                await self.crash_server()
            elif what == "timeout":
                await self._let_it_time_out()
            else:
                await self._kill_and_reconnect({"owner": h.owner, "target": h.target, "requester": h.requester}[what])

        h = self.open_handoff()
        if h is not None and h.stage == PREPARE:
            if at == "prepare":
                await disrupt(h)
                return
            die = ("server" if what == "server" else "owner") if at == "prepared" else None
            await self._owner_answers(owner_answer, die)
        h = self.open_handoff()
        if h is not None and h.stage == OFFER:
            if at == "offer":
                await disrupt(h)
                return
            die = ("server" if what == "server" else "target") if at == "accepted" else None
            await self._target_answers(target_answer, die)

    async def expect_committed(self, h: Handoff) -> None:
        committed = await self.conns[h.target].wait(is_op("handoff.committed", handoff=h.id), "handoff.committed")
        assert (committed["task"], committed["owner"], committed["epoch"]) == (self.task, h.target, h.epoch + 1)
        assert self.beliefs[h.target].epoch == h.epoch + 1, (self.beliefs[h.target], committed)

    # -- failures ---------------------------------------------------------------------------

    @rule(what=st.sampled_from(["owner", "target", "requester", "device", "server", "timeout"]),
          pick=st.sampled_from(range(len(DEVICES))))
    def disrupt(self, what: str, pick: int) -> None:
        """Whatever step the open handoff is at: abort the connection of its owner, target or requester (or of
        any device) and reconnect it, SIGKILL the server and restart it, or wait for the handoff's timeout."""
        h = self.open_handoff()
        if what == "server" and self.crashes < MAX_CRASHES:  # each costs a server start: keep the run short
            self.crashes += 1
            self.run(self.crash_server())
        elif what == "timeout" and h is not None:
            self.run(self._let_it_time_out())
        elif what in ("owner", "target", "requester") and h is not None:
            self.run(self._kill_and_reconnect(getattr(h, what)))
        else:
            self.run(self._kill_and_reconnect(DEVICES[pick]))

    async def _kill_and_reconnect(self, device: str) -> None:
        h = self.open_handoff()
        await self.kill_device(device)
        if h is not None:
            role = "owner" if device == h.owner else "target" if device == h.target else "other"
            self.event(f"killed {role} at {h.stage}")
        if h is not None and (device == h.target or (device == h.owner and h.stage == PREPARE)):
            expected = "target_disconnected" if device == h.target else "owner_disconnected"
            survivor = h.owner if device == h.target else h.target
            failed = await self.conns[survivor].wait(is_op("handoff.failed", handoff=h.id), "handoff.failed")
            timeout = "prepare_timeout" if h.stage == PREPARE else "accept_timeout"
            assert failed["reason"] in (expected, timeout), (failed, h)
        await self.connect(device)

    async def crash_server(self, maybe_committed: Handoff | None = None) -> None:
        """SIGKILL the server, start it on the same data, reconnect every device."""
        self.note("SIGKILL the server")
        h = self.open_handoff()
        self.world.server.kill()
        await self._close_all()
        await self.world.server.start()
        for device in DEVICES:
            await self.connect(device)
        entry = await self.truth()
        if h is None:
            return
        self.aborted.add(h.id)
        assert entry is not None and "handoff" not in entry, entry  # a restart aborts uncommitted handoffs
        if h is maybe_committed and (entry["owner"], entry["epoch"]) == (h.target, h.epoch + 1):
            # the accept was committed before the kill: the new owner hears it after its hello
            self.event("server killed after accept: committed")
            self.committed.setdefault(h.id, (h.target, h.epoch + 1))
            await self.expect_committed(h)
        else:
            self.event(f"server killed: handoff aborted at {h.stage}")
            assert (entry["owner"], entry["epoch"]) == (h.owner, h.epoch), (entry, h)

    async def _let_it_time_out(self) -> None:
        h = self.open_handoff()
        assert h is not None
        failed = await self.conns[h.owner].wait(is_op("handoff.failed", handoff=h.id), "the handoff's timeout")
        assert failed["reason"] == ("prepare_timeout" if h.stage == PREPARE else "accept_timeout"), (failed, h)
        await self.conns[h.target].wait(is_op("handoff.failed", handoff=h.id), "the failure at the target")
        await self.conns[h.requester].wait(is_op("handoff.failed", handoff=h.id), "the failure at the requester")


@pytest.mark.timeout(max(90, 8 * MAX_EXAMPLES * STEPS // 20))
def test_handoffs_keep_epochs_increasing_and_ownership_whole():
    with data_directory() as data_dir:
        tokens = {device: issue_token(data_dir, USER, device) for device in DEVICES}
        world = World(ServerProcess(data_dir, env=child_environment(**SERVER_ENV)), tokens)
        HandoffMachine.world = world
        try:
            run_state_machine_as_test(HandoffMachine, settings=settings(
                max_examples=MAX_EXAMPLES, stateful_step_count=STEPS, deadline=None,
                suppress_health_check=list(HealthCheck)))
        except BaseException:
            print(world.server.logs())
            print(f"--- the first failing example ---\n{world.first_failure}")
            raise
        finally:
            world.server.kill()
            print("\n".join(f"{n:5} {what}" for what, n in sorted(world.seen.items())))

