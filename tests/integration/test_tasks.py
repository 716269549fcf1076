"""Task leases and handoff through a real server (protocol.md section 15): claims, renewals, releases,
fencing epochs, the four handoff steps, and what every failure and disconnect does."""

import asyncio
import json

import msgpack
import pytest
import websockets

from rccs import tasks
from rccs.testing import running_server

PREPARE_TIMEOUT = 0.4
ACCEPT_TIMEOUT = 0.4


@pytest.fixture
def server_settings():
    return {"handoff_prepare_timeout": PREPARE_TIMEOUT, "handoff_accept_timeout": ACCEPT_TIMEOUT}


class LeaseClock:
    """The server's clock for task leases, moved forward by the test: a lease expires when the test says,
    however long the round trips before took (a lease short enough to wait for can expire before them)."""

    def __init__(self, real_now_ms):
        self.real_now_ms = real_now_ms
        self.ahead_ms = 0

    def now_ms(self):
        return self.real_now_ms() + self.ahead_ms

    def move_past(self, expires):
        self.ahead_ms += max(0, expires + 1 - self.now_ms())


@pytest.fixture
def lease_clock(monkeypatch):
    clock = LeaseClock(tasks.now_ms)
    monkeypatch.setattr(tasks, "now_ms", clock.now_ms)
    return clock


class Device:
    """One device speaking the wire protocol by hand; envelopes it is not waiting for are kept in order."""

    def __init__(self, server, user, name, encoding="json"):
        self.server = server
        self.user = user
        self.name = name
        self.encoding = encoding
        self.ws = None
        self.kept: list[dict] = []
        self.welcome: dict = {}

    async def open(self):
        self.ws = await websockets.connect(self.server.ws_url)
        self.kept = []
        await self.send({"op": "hello", "token": self.server.issue_token(self.user, self.name),
                         "device": {"type": "desktop"}})
        self.welcome = await self.next("welcome")
        return self

    async def send(self, envelope):
        if self.encoding == "json":
            await self.ws.send(json.dumps(envelope))
        else:
            await self.ws.send(msgpack.packb(envelope, use_bin_type=True))

    async def _receive(self, timeout):
        frame = await asyncio.wait_for(self.ws.recv(), timeout)
        return json.loads(frame) if isinstance(frame, str) else msgpack.unpackb(frame, raw=False)

    async def next(self, op, timeout=5, **fields):
        """The first envelope (kept earlier, or arriving within ``timeout``) with this op and these fields."""
        def wanted(envelope):
            return envelope.get("op") == op and all(envelope.get(k) == v for k, v in fields.items())

        for n, envelope in enumerate(self.kept):
            if wanted(envelope):
                return self.kept.pop(n)
        while True:
            envelope = await self._receive(timeout)
            if wanted(envelope):
                return envelope
            self.kept.append(envelope)

    async def request(self, op, **fields):
        """Send a request; its answer (any op with the request's id, ``error`` included)."""
        request_id = f"{op}-{id(fields)}-{len(self.kept)}"
        await self.send({"op": op, "id": request_id, **fields})
        for n, envelope in enumerate(self.kept):
            if envelope.get("id") == request_id:
                return self.kept.pop(n)
        while True:
            envelope = await self._receive(5)
            if envelope.get("id") == request_id:
                return envelope
            self.kept.append(envelope)

    async def nothing_of(self, *ops):
        """No envelope of these ops arrived before a ping's pong (everything sent before now was read)."""
        answer = await self.request("ping")
        assert answer["op"] == "pong"
        assert [e for e in self.kept if e.get("op") in ops] == []

    def drop(self):
        """Lose the connection without a close frame (network loss)."""
        self.ws.transport.abort()

    async def close(self):
        if self.ws is not None:
            await self.ws.close()


@pytest.fixture
async def devices(server):
    """``await devices("ide", "phone", ...)`` -> connected devices of user alice; closed at teardown."""
    opened: list[Device] = []

    async def _open(*names, user="alice", encoding="json"):
        made = []
        for name in names:
            device = await Device(server, user, name, encoding).open()
            opened.append(device)
            made.append(device)
        return made

    yield _open
    for device in opened:
        await device.close()


async def claimed(device, task="agent", **fields):
    lease = await device.request("task.claim", task=task, **fields)
    assert lease["op"] == "task.lease", lease
    return lease


async def start_handoff(requester, owner, target_name, task="agent"):
    """Request a handoff and wait for the owner's prepare; returns the handoff id."""
    started = await requester.request("handoff.request", task=task, to={"device": target_name})
    assert started["op"] == "handoff.started", started
    prepare = await owner.next("handoff.prepare", handoff=started["handoff"])
    assert (prepare["task"], prepare["to"]) == (task, target_name)
    return started["handoff"]


async def offered(owner, target, handoff, checkpoint):
    """The owner answers prepared with ``checkpoint``; the target's offer."""
    await owner.send({"op": "handoff.prepared", "handoff": handoff, "checkpoint": checkpoint})
    return await target.next("handoff.offer", handoff=handoff)


async def lease_of(device, task="agent"):
    listed = await device.request("task.list", task=task)
    assert listed["op"] == "tasks", listed
    (entry,) = listed["tasks"]
    return entry


# ---- leases ----------------------------------------------------------------


async def test_claim_renew_release_and_epochs_that_only_grow(devices):
    ide, phone = await devices("ide", "phone")
    first = await claimed(ide, ttl=60)
    assert (first["task"], first["owner"], first["epoch"]) == ("agent", "ide", 1)
    assert first["expires"] > ide.welcome["server_time"] + 59_000
    again = await claimed(ide)  # the holder claiming again keeps its epoch
    assert (again["owner"], again["epoch"]) == ("ide", 1)
    taken = await phone.request("task.claim", task="agent")
    assert (taken["op"], taken["code"], taken["owner"], taken["epoch"]) == ("error", "conflict", "ide", 1)
    renewed = await ide.request("task.renew", task="agent", epoch=1, ttl=120)
    assert renewed["op"] == "task.lease" and renewed["expires"] > first["expires"]
    released = await ide.request("task.release", task="agent", epoch=1)
    assert (released["op"], released["epoch"]) == ("task.released", 1)
    assert await lease_of(phone) == {"task": "agent", "owner": None, "epoch": 1, "expires": 0, "live": False}
    second = await claimed(phone)
    assert (second["owner"], second["epoch"]) == ("phone", 2)
    stale = await ide.request("task.renew", task="agent", epoch=1)
    assert (stale["code"], stale["epoch"], stale["owner"], stale["task"]) == ("stale_epoch", 2, "phone", "agent")
    stale = await ide.request("task.release", task="agent", epoch=1)
    assert stale["code"] == "stale_epoch"
    assert (await lease_of(ide))["owner"] == "phone"


async def test_an_expired_lease_can_be_claimed_by_another_device_with_the_next_epoch(devices, lease_clock):
    ide, phone = await devices("ide", "phone")
    lease = await claimed(ide)
    lease_clock.move_past(lease["expires"])
    assert not (await lease_of(phone))["live"]
    renewed_late = await ide.request("task.renew", task="agent", epoch=1)  # nobody took it: still the holder's
    assert renewed_late["op"] == "task.lease"
    assert (await lease_of(phone))["live"]
    lease_clock.move_past(renewed_late["expires"])
    assert not (await lease_of(phone))["live"]
    taken = await claimed(phone)
    assert (taken["owner"], taken["epoch"]) == ("phone", 2)
    stale = await ide.request("task.renew", task="agent", epoch=1)
    assert stale["code"] == "stale_epoch"


async def test_fenced_writes_need_the_current_epoch(devices):
    ide, phone = await devices("ide", "phone")
    await claimed(ide)
    ok = await ide.request("state.patch", doc="user/tasks/agent", patch={"step": 1}, task="agent", epoch=1)
    assert (ok["op"], ok["rev"]) == ("state.ok", 1)
    not_holder = await phone.request("state.patch", doc="user/tasks/agent", patch={"step": 9}, task="agent", epoch=1)
    assert (not_holder["code"], not_holder["owner"]) == ("stale_epoch", "ide")
    future = await ide.request("state.patch", doc="user/tasks/agent", patch={"step": 9}, task="agent", epoch=2)
    assert future["code"] == "bad_request"
    only_task = await ide.request("state.patch", doc="user/tasks/agent", patch={"step": 9}, task="agent")
    assert only_task["code"] == "bad_request"
    live = await ide.request("state.patch", doc="live/ide/cursor", patch={"line": 1}, task="agent", epoch=1)
    assert live["op"] == "state.ok"
    await ide.request("task.release", task="agent", epoch=1)
    await claimed(phone)
    stale = await ide.request("state.patch", doc="user/tasks/agent", patch={"step": 2}, task="agent", epoch=1)
    assert (stale["code"], stale["epoch"]) == ("stale_epoch", 2)
    stale_live = await ide.request("state.patch", doc="live/ide/cursor", patch={"line": 2}, task="agent", epoch=1)
    assert stale_live["code"] == "stale_epoch"
    got = await ide.request("state.get", doc="user/tasks/agent")
    assert (got["rev"], got["value"]) == (1, {"step": 1})


async def test_tasks_of_another_user_are_invisible(devices):
    (ide,) = await devices("ide")
    (bob,) = await devices("bob-pc", user="bob")
    await claimed(ide)
    listed = await bob.request("task.list")
    assert listed["tasks"] == []
    own = await claimed(bob)  # the same name is another task
    assert (own["owner"], own["epoch"]) == ("bob-pc", 1)
    started = await bob.request("handoff.request", task="agent", to={"device": "ide"})
    assert started["code"] == "forbidden"


async def test_bad_lease_input_is_refused_and_changes_nothing(devices):
    (ide,) = await devices("ide")
    for fields, code in [
        ({}, "bad_request"),
        ({"task": ""}, "bad_request"),
        ({"task": 5}, "bad_request"),
        ({"task": "x" * 257}, "too_large"),
        ({"task": "agent", "ttl": 0}, "bad_request"),
        ({"task": "agent", "ttl": "long"}, "bad_request"),
        ({"task": "agent", "ttl": 3601}, "too_large"),
    ]:
        answer = await ide.request("task.claim", **fields)
        assert answer["code"] == code, (fields, answer)
    await claimed(ide)
    for fields in [{"task": "agent"}, {"task": "agent", "epoch": 0}, {"task": "agent", "epoch": "1"},
                   {"task": "agent", "epoch": True}, {"task": "agent", "epoch": 2}, {"task": "never", "epoch": 1}]:
        answer = await ide.request("task.renew", **fields)
        assert answer["code"] == "bad_request", (fields, answer)
    assert (await lease_of(ide))["epoch"] == 1


async def test_leases_survive_a_restart(tmp_path):
    data_dir = str(tmp_path / "data")
    async with running_server(store="sqlite", data_dir=data_dir) as server:
        (ide,) = [await Device(server, "alice", "ide").open()]
        await claimed(ide)
        await ide.request("task.release", task="agent", epoch=1)
        await claimed(ide)
        await ide.close()
    async with running_server(store="sqlite", data_dir=data_dir) as server:
        phone = await Device(server, "alice", "phone").open()
        assert (await lease_of(phone))["epoch"] == 2
        await phone.close()


# ---- handoff: the four steps -----------------------------------------------


@pytest.mark.parametrize("encoding", ["json", "msgpack"])
async def test_a_handoff_pushed_by_the_owner_moves_the_task_with_its_checkpoint(devices, encoding):
    ide, phone = await devices("ide", "phone", encoding=encoding)
    await claimed(ide)
    handoff = await start_handoff(ide, ide, "phone")
    offer = await offered(ide, phone, handoff, {"step": 3, "files": ["a.py"]})
    assert (offer["task"], offer["from"], offer["epoch"], offer["checkpoint"]) == (
        "agent", "ide", 2, {"step": 3, "files": ["a.py"]})
    await phone.send({"op": "handoff.accept", "handoff": handoff})
    committed = await phone.next("handoff.committed", handoff=handoff)
    assert (committed["task"], committed["owner"], committed["epoch"]) == ("agent", "phone", 2)
    revoked = await ide.next("handoff.revoked", handoff=handoff)
    assert (revoked["epoch"], revoked["owner"]) == (2, "phone")
    requester_heard = await ide.next("handoff.committed", handoff=handoff)  # the owner was also the requester
    assert requester_heard["owner"] == "phone"
    assert (await lease_of(ide))["owner"] == "phone"
    assert (await ide.request("task.renew", task="agent", epoch=1))["code"] == "stale_epoch"
    assert (await phone.request("task.renew", task="agent", epoch=2))["op"] == "task.lease"


async def test_a_handoff_pulled_by_the_target_and_one_asked_by_a_third_device(devices):
    ide, phone, web = await devices("ide", "phone", "web")
    await claimed(ide)
    handoff = await start_handoff(phone, ide, "phone")  # a pull
    await ide.send({"op": "handoff.prepared", "handoff": handoff, "checkpoint": None})
    await phone.send({"op": "handoff.accept", "handoff": (await phone.next("handoff.offer"))["handoff"]})
    assert (await phone.next("handoff.committed", handoff=handoff))["epoch"] == 2
    await phone.nothing_of("handoff.committed")  # requester and target are one device: told once
    # back, asked by a third device, with a type selector
    started = await web.request("handoff.request", task="agent", to={"device": "ide"})
    assert (started["from"], started["to"], started["epoch"]) == ("phone", "ide", 2)
    await phone.next("handoff.prepare", handoff=started["handoff"])
    await offered(phone, ide, started["handoff"], {"step": 4})
    await ide.send({"op": "handoff.accept", "handoff": started["handoff"]})
    assert (await web.next("handoff.committed", handoff=started["handoff"]))["owner"] == "ide"
    assert (await ide.next("handoff.committed", handoff=started["handoff"]))["epoch"] == 3
    assert (await phone.next("handoff.revoked", handoff=started["handoff"]))["epoch"] == 3


async def test_a_request_names_an_online_device_other_than_the_owner(devices):
    ide, phone = await devices("ide", "phone")
    assert (await phone.request("handoff.request", task="agent", to={"device": "ide"}))["code"] == "not_found"
    await claimed(ide)
    assert (await phone.request("handoff.request", task="agent", to={"device": "ide"}))["code"] == "bad_request"
    assert (await phone.request("handoff.request", task="agent", to={"device": "tablet"}))["code"] == "offline"
    assert (await phone.request("handoff.request", task="agent", to={"type": "mobile"}))["code"] == "offline"
    assert (await phone.request("handoff.request", task="agent", to="phone"))["code"] == "bad_request"
    all_others = await phone.request("handoff.request", task="agent", to={"all": True})
    assert (all_others["op"], all_others["to"]) == ("handoff.started", "phone")


# ---- handoff: failures --------------------------------------------------------


async def assert_failed(devices_told, handoff, reason):
    for device in devices_told:
        failed = await device.next("handoff.failed", handoff=handoff)
        assert (failed["task"], failed["reason"]) == ("agent", reason), failed


async def assert_still_owned_by(device, epoch=1):
    """The old owner kept its lease: renewing at its epoch works, and nobody else holds it."""
    renewed = await device.request("task.renew", task="agent", epoch=epoch)
    assert (renewed["op"], renewed["owner"], renewed["epoch"]) == ("task.lease", device.name, epoch), renewed


async def test_the_owner_refusing_fails_the_handoff_for_everyone(devices):
    ide, phone, web = await devices("ide", "phone", "web")
    await claimed(ide)
    handoff = await start_handoff(web, ide, "phone")
    await ide.send({"op": "handoff.refuse", "handoff": handoff, "reason": "mid-edit"})
    await assert_failed([web, ide, phone], handoff, "refused")
    await assert_still_owned_by(ide)


async def test_the_target_rejecting_fails_the_handoff(devices):
    ide, phone = await devices("ide", "phone")
    await claimed(ide)
    handoff = await start_handoff(phone, ide, "phone")
    await offered(ide, phone, handoff, {"step": 1})
    await phone.send({"op": "handoff.reject", "handoff": handoff, "reason": "battery low"})
    failed = await ide.next("handoff.failed", handoff=handoff)
    assert (failed["reason"], failed["detail"]) == ("rejected", "battery low")
    await assert_failed([phone], handoff, "rejected")
    await assert_still_owned_by(ide)
    # the old owner's fenced writes work again once the handoff is over
    ok = await ide.request("state.patch", doc="user/tasks/agent", patch={"step": 2}, task="agent", epoch=1)
    assert ok["op"] == "state.ok"


async def test_an_owner_that_does_not_answer_in_time_keeps_its_lease(devices):
    ide, phone = await devices("ide", "phone")
    await claimed(ide)
    handoff = await start_handoff(phone, ide, "phone")
    await assert_failed([phone, ide], handoff, "prepare_timeout")
    late = await ide.request("handoff.prepared", handoff=handoff, checkpoint=1)
    assert (late["code"], late["handoff"]) == ("not_found", handoff)
    await assert_still_owned_by(ide)


async def test_a_target_that_does_not_answer_in_time_gets_nothing(devices):
    ide, phone = await devices("ide", "phone")
    await claimed(ide)
    handoff = await start_handoff(ide, ide, "phone")
    await offered(ide, phone, handoff, 1)
    await assert_failed([ide, phone], handoff, "accept_timeout")
    late = await phone.request("handoff.accept", handoff=handoff)
    assert late["code"] == "not_found"
    await assert_still_owned_by(ide)


async def test_the_owner_gone_before_prepared_aborts(devices, server):
    ide, phone = await devices("ide", "phone")
    await claimed(ide)
    handoff = await start_handoff(phone, ide, "phone")
    ide.drop()
    await assert_failed([phone], handoff, "owner_disconnected")
    await ide.open()
    await assert_still_owned_by(ide)


async def test_the_owner_gone_after_prepared_does_not_stop_the_commit(devices):
    ide, phone = await devices("ide", "phone")
    await claimed(ide)
    handoff = await start_handoff(phone, ide, "phone")
    await offered(ide, phone, handoff, {"step": 7})
    ide.drop()
    await phone.next("presence", device="ide", status="offline")  # the server has seen the owner go
    await phone.send({"op": "handoff.accept", "handoff": handoff})
    assert (await phone.next("handoff.committed", handoff=handoff))["epoch"] == 2
    await ide.open()  # back: its next op for the task tells it that epoch 1 is over
    stale = await ide.request("task.renew", task="agent", epoch=1)
    assert (stale["code"], stale["epoch"], stale["owner"]) == ("stale_epoch", 2, "phone")


async def test_the_target_gone_before_accept_aborts(devices):
    ide, phone = await devices("ide", "phone")
    await claimed(ide)
    handoff = await start_handoff(ide, ide, "phone")
    phone.drop()  # before the offer
    await assert_failed([ide], handoff, "target_disconnected")
    await phone.open()
    handoff = await start_handoff(ide, ide, "phone")
    await offered(ide, phone, handoff, 1)
    phone.drop()  # after the offer
    await assert_failed([ide], handoff, "target_disconnected")
    await assert_still_owned_by(ide)


async def test_a_committed_notice_the_new_owner_missed_comes_after_its_next_hello(devices):
    ide, phone = await devices("ide", "phone")
    await claimed(ide)
    handoff = await start_handoff(ide, ide, "phone")
    await offered(ide, phone, handoff, 1)
    await phone.send({"op": "handoff.accept", "handoff": handoff})
    await ide.next("handoff.revoked", handoff=handoff)
    phone.drop()  # whether or not the committed notice made it before the connection went
    await phone.open()
    committed = await phone.next("handoff.committed", handoff=handoff)
    assert (committed["owner"], committed["epoch"]) == ("phone", 2)
    await phone.close()
    await phone.open()  # not used yet: told again
    assert (await phone.next("handoff.committed", handoff=handoff))["epoch"] == 2
    await phone.request("task.renew", task="agent", epoch=2)
    await phone.close()
    await phone.open()  # used: not told again
    await lease_of(phone)  # after the re-send would have been: both wait for the user's task lock, in order
    assert [e for e in phone.kept if e.get("op") == "handoff.committed"] == []


async def test_one_open_handoff_per_task(devices):
    ide, phone, web = await devices("ide", "phone", "web")
    await claimed(ide)
    handoff = await start_handoff(phone, ide, "phone")
    busy = await web.request("handoff.request", task="agent", to={"device": "web"})
    assert (busy["code"], busy["handoff"]) == ("handoff_busy", handoff)
    busy = await web.request("task.claim", task="agent")  # the lease is live, but the handoff is the news
    assert (busy["code"], busy["handoff"]) == ("handoff_busy", handoff)
    assert (await ide.request("task.release", task="agent", epoch=1))["code"] == "handoff_busy"
    listed = await lease_of(web)
    assert listed["handoff"] == handoff
    await offered(ide, phone, handoff, 1)
    paused = await ide.request("state.patch", doc="user/tasks/agent", patch={"x": 1}, task="agent", epoch=1)
    assert (paused["code"], paused["handoff"]) == ("handoff_busy", handoff)
    assert (await ide.request("task.renew", task="agent", epoch=1))["op"] == "task.lease"  # may still renew
    await phone.send({"op": "handoff.reject", "handoff": handoff})
    await assert_failed([phone, ide], handoff, "rejected")
    assert "handoff" not in await lease_of(web)
    assert (await web.request("handoff.request", task="agent", to={"device": "web"}))["op"] == "handoff.started"


# The handoff must still be open when the claim comes: timeouts no stall of the test can reach.
@pytest.mark.parametrize("server_settings", [{"handoff_prepare_timeout": 60, "handoff_accept_timeout": 60}],
                         ids=["open handoff"])
async def test_an_expired_lease_under_a_handoff_cannot_be_claimed(devices, lease_clock):
    ide, phone, web = await devices("ide", "phone", "web")
    lease = await claimed(ide)
    handoff = await start_handoff(phone, ide, "phone")
    lease_clock.move_past(lease["expires"])
    assert not (await lease_of(web))["live"]
    busy = await web.request("task.claim", task="agent")
    assert (busy["code"], busy["handoff"]) == ("handoff_busy", handoff)


async def test_handoff_steps_from_the_wrong_device_or_at_the_wrong_time_are_refused(devices):
    ide, phone, web = await devices("ide", "phone", "web")
    (bob,) = await devices("bob-pc", user="bob")
    await claimed(ide)
    handoff = await start_handoff(phone, ide, "phone")
    for device, op, code in [
        (phone, "handoff.prepared", "forbidden"),  # only the owner prepares
        (web, "handoff.refuse", "forbidden"),
        (phone, "handoff.accept", "bad_request"),  # no offer yet
        (ide, "handoff.accept", "forbidden"),  # only the target accepts
        (bob, "handoff.prepared", "not_found"),  # another user's handoff does not exist for bob
    ]:
        answer = await device.request(op, handoff=handoff, checkpoint=1)
        assert (answer["code"], answer["handoff"]) == (code, handoff), (device.name, op, answer)
    assert (await ide.request("handoff.prepared", handoff="h0-nope"))["code"] == "not_found"
    assert (await ide.request("handoff.prepared", handoff=7))["code"] == "bad_request"
    assert (await ide.request("handoff.prepared", handoff="h" * 129))["code"] == "bad_request"
    await offered(ide, phone, handoff, 1)
    twice = await ide.request("handoff.prepared", handoff=handoff, checkpoint=2)
    assert twice["code"] == "bad_request"
    await phone.send({"op": "handoff.accept", "handoff": handoff})
    assert (await phone.next("handoff.committed", handoff=handoff))["epoch"] == 2


async def test_an_oversized_checkpoint_fails_the_handoff(server, devices):
    ide, phone = await devices("ide", "phone")
    await claimed(ide)
    handoff = await start_handoff(phone, ide, "phone")
    limit = server.hub.settings.handoff_max_checkpoint_bytes
    refused = await ide.request("handoff.prepared", handoff=handoff, checkpoint="x" * limit)
    assert (refused["code"], refused["limit"], refused["max"]) == ("too_large", "handoff_max_checkpoint_bytes", limit)
    assert refused["size"] > limit
    await assert_failed([phone, ide], handoff, "checkpoint_too_large")
    await assert_still_owned_by(ide)


async def test_the_requester_gone_does_not_stop_the_handoff(devices):
    ide, phone, web = await devices("ide", "phone", "web")
    await claimed(ide)
    handoff = await start_handoff(web, ide, "phone")
    await web.close()
    await offered(ide, phone, handoff, 1)
    await phone.send({"op": "handoff.accept", "handoff": handoff})
    assert (await phone.next("handoff.committed", handoff=handoff))["owner"] == "phone"


async def test_a_restart_aborts_uncommitted_handoffs_and_keeps_committed_ones(tmp_path):
    data_dir = str(tmp_path / "data")
    settings = {"store": "sqlite", "data_dir": data_dir}
    async with running_server(**settings) as server:
        ide = await Device(server, "alice", "ide").open()
        phone = await Device(server, "alice", "phone").open()
        await claimed(ide, task="agent")
        await claimed(ide, task="music")
        open_handoff = await start_handoff(phone, ide, "phone", task="agent")
        committed = await start_handoff(phone, ide, "phone", task="music")
        await offered(ide, phone, committed, 1)
        await phone.send({"op": "handoff.accept", "handoff": committed})
        await ide.next("handoff.revoked", handoff=committed)
    # a graceful shutdown tells the parties; the connections are closed with 1001 after it
    failed = await phone.next("handoff.failed", handoff=open_handoff)
    assert failed["reason"] == "shutdown"
    async with running_server(**settings) as server:
        ide = await Device(server, "alice", "ide").open()
        phone = await Device(server, "alice", "phone").open()
        assert (await phone.next("handoff.committed", handoff=committed))["epoch"] == 2
        assert (await lease_of(phone, "agent"))["owner"] == "ide"
        assert "handoff" not in await lease_of(phone, "agent")
        await assert_still_owned_by(ide)
        again = await phone.request("handoff.request", task="agent", to={"device": "phone"})
        assert again["op"] == "handoff.started"
        await ide.close()
        await phone.close()


async def test_a_checkpoint_must_be_json_and_is_measured_as_the_larger_encoding(server, devices):
    (ide,) = await devices("ide", encoding="msgpack")
    (phone,) = await devices("phone", encoding="json")
    await claimed(ide)
    handoff = await start_handoff(phone, ide, "phone")
    for checkpoint in [{"x": float("inf")}, [float("nan")]]:  # (bin values are refused by the decoder)
        refused = await ide.request("handoff.prepared", handoff=handoff, checkpoint=checkpoint)
        assert (refused["code"], refused["handoff"]) == ("bad_request", handoff), checkpoint
    # control characters take 6 bytes each in JSON: 1/6 of the limit fits, a little more does not
    limit = server.hub.settings.handoff_max_checkpoint_bytes
    refused = await ide.request("handoff.prepared", handoff=handoff, checkpoint="\x01" * (limit // 6 + 1))
    assert (refused["code"], refused["size"]) == ("too_large", 6 * (limit // 6 + 1) + 2)
    await assert_failed([phone, ide], handoff, "checkpoint_too_large")
    handoff = await start_handoff(phone, ide, "phone")
    offer = await offered(ide, phone, handoff, "\x01" * (limit // 6 - 1))
    assert offer["checkpoint"] == "\x01" * (limit // 6 - 1)
