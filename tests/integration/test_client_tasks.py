"""The Python client's task API against a real server (protocol.md section 15): leases, fencing, and
handoffs decided by the ``on_handoff_prepare`` / ``on_handoff_offer`` callbacks."""

import asyncio

import pytest

from rccs.client import (
    Client,
    ClientError,
    HandoffBusy,
    HandoffFailed,
    HandoffRefusal,
    StaleEpoch,
    TaskConflict,
)

WAIT = 5  # seconds any single expected event may take before the test fails


@pytest.fixture
def server_settings():
    # short enough that a handoff nobody answers fails quickly, long enough for every answer in these tests
    return {"handoff_prepare_timeout": 5, "handoff_accept_timeout": 5}


def collect(queue):
    """A callback that puts its argument on ``queue``."""
    return queue.put_nowait


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_claim_renew_release_and_list(connect, encoding):
    ide = await connect("alice", "alice-ide", encoding=encoding)
    lease = await ide.task_claim("agent", ttl=60)
    assert (lease.task, lease.owner, lease.epoch) == ("agent", "alice-ide", 1)
    renewed = await ide.task_renew("agent", lease.epoch, ttl=120)
    assert renewed.epoch == 1 and renewed.expires > lease.expires
    again = await ide.task_claim("agent")  # the holder claiming again keeps its epoch
    assert again.epoch == 1
    [status] = await ide.task_list()
    assert (status.task, status.owner, status.epoch, status.live, status.handoff) == ("agent", "alice-ide", 1,
                                                                                       True, None)
    await ide.task_release("agent", 1)
    [status] = await ide.task_list("agent")
    assert (status.owner, status.live) == (None, False)
    assert (await ide.task_claim("agent")).epoch == 2  # a new owner period: the next epoch


async def test_claim_of_a_held_task_raises_task_conflict_naming_the_holder(connect):
    ide = await connect("alice", "alice-ide")
    phone = await connect("alice", "alice-phone", type="mobile", encoding="json")
    lease = await ide.task_claim("agent")
    with pytest.raises(TaskConflict) as caught:
        await phone.task_claim("agent")
    conflict = caught.value
    assert isinstance(conflict, ClientError) and conflict.code == "conflict"
    assert (conflict.task, conflict.owner, conflict.epoch, conflict.expires) == ("agent", "alice-ide", 1,
                                                                                 lease.expires)


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_an_old_epoch_raises_stale_epoch_with_the_current_holder(connect, encoding):
    ide = await connect("alice", "alice-ide", encoding=encoding)
    phone = await connect("alice", "alice-phone", type="mobile")
    await ide.task_claim("agent")
    await ide.task_release("agent", 1)
    await phone.task_claim("agent")
    with pytest.raises(StaleEpoch) as caught:
        await ide.task_renew("agent", 1)
    assert (caught.value.code, caught.value.task, caught.value.epoch, caught.value.owner) == (
        "stale_epoch", "agent", 2, "alice-phone")
    with pytest.raises(StaleEpoch):
        await ide.task_release("agent", 1)


async def test_fenced_patch_is_applied_only_at_the_current_epoch(connect):
    ide = await connect("alice", "alice-ide")
    phone = await connect("alice", "alice-phone", type="mobile")
    await ide.task_claim("agent")
    written = await ide.state_patch("user/agent", {"step": 1}, task="agent", epoch=1)
    assert written.rev == 1
    await ide.task_release("agent", 1)
    await phone.task_claim("agent")
    with pytest.raises(StaleEpoch):
        await ide.state_patch("user/agent", {"step": 99}, task="agent", epoch=1)
    assert (await phone.state_get("user/agent")).value == {"step": 1}
    with pytest.raises(ValueError):
        await ide.state_patch("user/agent", {"step": 2}, task="agent")


@pytest.mark.parametrize("encoding", ["msgpack", "json"])
async def test_handoff_pushed_by_the_owner_moves_the_task_with_its_checkpoint(connect, encoding):
    ide = await connect("alice", "alice-ide", encoding=encoding)
    phone = await connect("alice", "alice-phone", type="mobile", encoding=encoding)
    prepares, offers, gained, lost = asyncio.Queue(), asyncio.Queue(), asyncio.Queue(), asyncio.Queue()

    def pause(prepare):
        prepares.put_nowait(prepare)
        return {"step": 3, "log": ["read", "edit"]}

    async def accept(offer):
        offers.put_nowait(offer)
        return True

    ide.on_handoff_prepare(pause)
    phone.on_handoff_offer(accept)
    phone.on_task_gained(collect(gained))
    ide.on_task_lost(collect(lost))
    await ide.task_claim("agent")

    result = await ide.handoff("agent", "alice-phone")

    assert (result.task, result.owner, result.epoch) == ("agent", "alice-phone", 2)
    prepare = prepares.get_nowait()
    assert (prepare.handoff, prepare.task, prepare.to, prepare.epoch) == (result.handoff, "agent", "alice-phone", 1)
    offer = offers.get_nowait()
    assert (offer.from_device, offer.checkpoint, offer.epoch) == ("alice-ide", {"step": 3, "log": ["read", "edit"]},
                                                                  2)
    assert (await asyncio.wait_for(gained.get(), WAIT)).lease == result.lease
    revoked = await asyncio.wait_for(lost.get(), WAIT)
    assert (revoked.handoff, revoked.owner, revoked.epoch) == (result.handoff, "alice-phone", 2)
    with pytest.raises(StaleEpoch):
        await ide.state_patch("user/agent", {"step": 4}, task="agent", epoch=1)
    await phone.state_patch("user/agent", {"step": 4}, task="agent", epoch=2)


async def test_handoff_pulled_by_the_target(connect):
    ide = await connect("alice", "alice-ide")
    phone = await connect("alice", "alice-phone", type="mobile", encoding="json")
    gained = asyncio.Queue()
    ide.on_handoff_prepare(lambda prepare: {"step": 7})
    phone.on_handoff_offer(lambda offer: offer.checkpoint == {"step": 7})
    phone.on_task_gained(collect(gained))
    await ide.task_claim("agent")

    result = await phone.handoff("agent", {"device": "alice-phone"})

    assert (result.owner, result.epoch) == ("alice-phone", 2)
    assert (await asyncio.wait_for(gained.get(), WAIT)).handoff == result.handoff
    [status] = await phone.task_list()
    assert (status.owner, status.epoch, status.handoff) == ("alice-phone", 2, None)
    assert gained.empty()  # the requester and new owner hears the commit once


async def test_prepare_callback_refusal_fails_the_handoff_and_the_owner_keeps_the_task(connect):
    ide = await connect("alice", "alice-ide")
    phone = await connect("alice", "alice-phone", type="mobile")
    failures = asyncio.Queue()

    def refuse(prepare):
        raise HandoffRefusal("mid-compile")

    ide.on_handoff_prepare(refuse)
    ide.on_handoff_failed(collect(failures))
    phone.on_handoff_offer(lambda offer: True)
    await ide.task_claim("agent")

    with pytest.raises(HandoffFailed) as caught:
        await phone.handoff("agent", "alice-phone")

    assert (caught.value.reason, caught.value.detail, caught.value.task) == ("refused", "mid-compile", "agent")
    told = await asyncio.wait_for(failures.get(), WAIT)
    assert (told.handoff, told.reason) == (caught.value.handoff, "refused")
    assert (await ide.task_renew("agent", 1)).owner == "alice-ide"


async def test_offer_callback_rejection_fails_the_handoff_and_tells_the_owner(connect):
    ide = await connect("alice", "alice-ide", encoding="json")
    phone = await connect("alice", "alice-phone", type="mobile")
    failures = asyncio.Queue()
    ide.on_handoff_prepare(lambda prepare: "checkpoint")
    ide.on_handoff_failed(collect(failures))  # the owner paused: this tells it to resume
    phone.on_handoff_offer(lambda offer: False)
    await ide.task_claim("agent")

    with pytest.raises(HandoffFailed) as caught:
        await ide.handoff("agent", "alice-phone")

    assert (caught.value.reason, caught.value.detail) == ("rejected", "declined")
    assert (await asyncio.wait_for(failures.get(), WAIT)).reason == "rejected"
    await ide.state_patch("user/agent", {"resumed": True}, task="agent", epoch=1)


async def test_without_callbacks_prepare_is_refused_and_an_offer_rejected(connect):
    ide = await connect("alice", "alice-ide")
    phone = await connect("alice", "alice-phone", type="mobile")
    await ide.task_claim("agent")
    with pytest.raises(HandoffFailed) as caught:
        await phone.handoff("agent", "alice-phone")
    assert caught.value.reason == "refused" and "on_handoff_prepare" in (caught.value.detail or "")

    ide.on_handoff_prepare(lambda prepare: None)
    with pytest.raises(HandoffFailed) as caught:
        await ide.handoff("agent", "alice-phone")
    assert caught.value.reason == "rejected" and "on_handoff_offer" in (caught.value.detail or "")
    assert [(s.owner, s.epoch) for s in await phone.task_list()] == [("alice-ide", 1)]


async def test_a_second_handoff_or_claim_while_one_is_open_raises_handoff_busy(connect):
    ide = await connect("alice", "alice-ide")
    phone = await connect("alice", "alice-phone", type="mobile")
    watch = await connect("alice", "alice-watch", type="watch")
    asked, go_on = asyncio.Event(), asyncio.Event()

    async def pause_when_told(prepare):
        asked.set()
        await go_on.wait()
        return {"step": 1}

    ide.on_handoff_prepare(pause_when_told)
    phone.on_handoff_offer(lambda offer: True)
    await ide.task_claim("agent", ttl=60)
    first = asyncio.ensure_future(phone.handoff("agent", "alice-phone"))
    await asyncio.wait_for(asked.wait(), WAIT)
    [status] = await watch.task_list()

    with pytest.raises(HandoffBusy) as busy:
        await watch.handoff("agent", "alice-watch")
    assert (busy.value.task, busy.value.handoff) == ("agent", status.handoff)
    with pytest.raises(HandoffBusy):
        await ide.task_release("agent", 1)

    go_on.set()
    assert (await asyncio.wait_for(first, WAIT)).handoff == status.handoff


async def test_committed_resent_after_a_reconnect_reaches_the_application_once(connect, server):
    ide = await connect("alice", "alice-ide")
    phone = await connect("alice", "alice-phone", type="mobile")
    gained = asyncio.Queue()
    ide.on_handoff_prepare(lambda prepare: {"step": 2})
    phone.on_handoff_offer(lambda offer: True)
    phone.on_task_gained(collect(gained))
    committed_seen = []
    receive = phone._on_envelope

    def spy(envelope):  # counts what arrives on the wire, to show the server did repeat it
        if envelope.get("op") == "handoff.committed":
            committed_seen.append(envelope["handoff"])
        receive(envelope)

    phone._on_envelope = spy
    await ide.task_claim("agent")
    result = await ide.handoff("agent", "alice-phone")
    assert (await asyncio.wait_for(gained.get(), WAIT)).handoff == result.handoff

    phone.reconnected.clear()
    phone._transport.disconnect()  # dropped before the phone used its new lease
    await asyncio.wait_for(phone.reconnected.wait(), WAIT)
    await phone.task_list()  # answered after the server's re-sent notice (same lock, same connection)

    assert committed_seen == [result.handoff, result.handoff]
    assert gained.empty()

    # The same device in a new process has not heard of it yet: it is told once.
    restarted = Client(server.ws_url, server.issue_token("alice", "alice-phone"), {"type": "mobile"})
    fresh = asyncio.Queue()
    restarted.on_task_gained(collect(fresh))
    async with restarted:
        told = await asyncio.wait_for(fresh.get(), WAIT)
        assert (told.handoff, told.owner, told.epoch) == (result.handoff, "alice-phone", 2)


async def test_keep_task_renews_until_the_task_is_handed_away(connect):
    ide = await connect("alice", "alice-ide")
    phone = await connect("alice", "alice-phone", type="mobile")
    ide.on_handoff_prepare(lambda prepare: None)
    phone.on_handoff_offer(lambda offer: True)
    # The keeper renews every ttl/3 and the handoff needs the lease live: a stall of 2/3 ttl would fail the
    # test, so the leases are long enough (3 s) for a loaded machine's stalls.
    lease = await ide.task_claim("agent", ttl=3)
    keeper = ide.keep_task(lease, ttl=3)

    await asyncio.wait_for(keeper.renewed.wait(), WAIT)
    assert keeper.lease.epoch == 1 and keeper.lease.expires > lease.expires
    await ide.handoff("agent", "alice-phone")

    ended = await asyncio.wait_for(keeper.ended, WAIT)
    assert isinstance(ended, StaleEpoch) and (ended.owner, ended.epoch) == ("alice-phone", 2)
