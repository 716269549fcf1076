"""Handoffs between devices on different nodes (protocol.md section 15.3; operations.md "Several nodes"): the
requester's node coordinates, the owner and the target may be connected anywhere, and every node sees that a
handoff holds the task. Devices: the phone on n0, the laptop on n1, the tablet on n2 (tests/cluster/clusters.py).
"""

import asyncio
import contextlib

import pytest
from clusters import running_cluster

from rccs.client import (
    HandoffBusy,
    HandoffFailed,
    HandoffOffer,
    HandoffPrepare,
    HandoffResult,
    StaleEpoch,
    TaskConflict,
)


async def until_online(client, *devices: str) -> None:
    """Wait (bounded) until ``client`` heard that ``devices`` are online: its node then knows where they are."""
    waiting = set(devices)
    while waiting:
        event = await asyncio.wait_for(client.events.get(), 10)
        if event.get("op") == "presence" and event.get("status") == "online":
            waiting.discard(event.get("device"))


async def three_parties(cluster):
    """The phone on n0, the laptop on n1 holding task "agent", the tablet on n2; the phone knows both."""
    phone = await cluster.connect(0, "alice", "alice-phone")  # first: it hears the others come online
    laptop = await cluster.connect(1, "alice", "alice-laptop")
    tablet = await cluster.connect(2, "alice", "alice-tablet")
    await until_online(phone, "alice-laptop", "alice-tablet")
    lease = await laptop.task_claim("agent", ttl=600)
    return phone, laptop, tablet, lease


async def test_a_handoff_between_three_nodes_commits_and_fences_the_old_owner(cluster):
    phone, laptop, tablet, lease = await three_parties(cluster)
    epoch = lease.epoch

    async def prepare(request: HandoffPrepare):
        # sent before prepared: judged before it, so still the owner's write
        await laptop.state_patch("user/agent", {"step": 3}, task="agent", epoch=request.epoch)
        return {"step": 3}

    offers: list[HandoffOffer] = []
    gained: list[HandoffResult] = []
    lost: list[HandoffResult] = []
    laptop.on_handoff_prepare(prepare)
    laptop.on_task_lost(lost.append)
    tablet.on_handoff_offer(lambda offer: offers.append(offer) or True)
    tablet.on_task_gained(gained.append)

    result = await phone.handoff("agent", "alice-tablet", timeout=30)

    assert (result.owner, result.epoch) == ("alice-tablet", epoch + 1)
    assert [(offer.from_device, offer.checkpoint, offer.epoch) for offer in offers] == [
        ("alice-laptop", {"step": 3}, epoch + 1)]
    await until(lambda: gained and lost)
    assert [(g.handoff, g.epoch) for g in gained] == [(result.handoff, epoch + 1)]
    assert [(r.handoff, r.owner) for r in lost] == [(result.handoff, "alice-tablet")]
    # Fencing across nodes: the old owner's write at its epoch is refused on its node, the new owner's taken.
    with pytest.raises(StaleEpoch):
        await laptop.state_patch("user/agent", {"step": 4}, task="agent", epoch=epoch)
    # The new owner reconnects to a third node (neither the coordinator nor its own) before using the lease:
    # the committed notice comes again there.
    again: list[HandoffResult] = []
    # (The handler is set before the hello: the notice may come right behind the welcome.)
    moved = await cluster.connect(1, "alice", "alice-tablet",
                                  prepare=lambda client: client.on_task_gained(again.append))
    await until(lambda: again)
    assert [(g.handoff, g.owner, g.epoch) for g in again] == [(result.handoff, "alice-tablet", epoch + 1)]
    written = await moved.state_patch("user/agent", {"step": 4}, task="agent", epoch=epoch + 1)
    assert written.rev == 2
    [status] = await phone.task_list("agent")
    assert (status.owner, status.epoch, status.handoff) == ("alice-tablet", epoch + 1, None)


async def test_a_claim_on_a_third_node_is_busy_while_the_handoff_is_open(cluster):
    phone, laptop, tablet, lease = await three_parties(cluster)
    preparing, offered = asyncio.Event(), asyncio.Event()
    prepare_now, accept_now = asyncio.Event(), asyncio.Event()

    async def prepare(request: HandoffPrepare):
        preparing.set()
        await prepare_now.wait()
        return {"step": 1}

    async def offer(request: HandoffOffer):
        offered.set()
        await accept_now.wait()
        return True

    laptop.on_handoff_prepare(prepare)
    phone.on_handoff_offer(offer)
    pulling = asyncio.create_task(phone.handoff("agent", "alice-phone", timeout=30))  # a pull to the phone
    await asyncio.wait_for(preparing.wait(), 10)
    [status] = await tablet.task_list("agent")
    handoff = status.handoff
    assert handoff is not None and handoff.endswith("@n0")
    with pytest.raises(HandoffBusy) as busy:
        await tablet.task_claim("agent")
    assert busy.value.handoff == handoff
    with pytest.raises(HandoffBusy):
        await tablet.handoff("agent", "alice-tablet")
    # Before prepared the owner still works; once it answered prepared its fenced writes are refused.
    await laptop.state_patch("user/agent", {"step": 1}, task="agent", epoch=lease.epoch)
    prepare_now.set()
    await asyncio.wait_for(offered.wait(), 10)
    with pytest.raises(HandoffBusy):
        await laptop.state_patch("user/agent", {"step": 2}, task="agent", epoch=lease.epoch)
    with pytest.raises(HandoffBusy):
        await tablet.task_claim("agent")
    accept_now.set()
    result = await pulling
    assert (result.owner, result.epoch) == ("alice-phone", lease.epoch + 1)
    with pytest.raises(TaskConflict):  # the handoff holds it no more: the phone does
        await tablet.task_claim("agent")


async def test_a_refusal_and_a_disconnect_on_other_nodes_fail_it_and_the_owner_keeps_the_task(cluster):
    phone, laptop, tablet, lease = await three_parties(cluster)
    failures: list[HandoffFailed] = []
    laptop.on_handoff_failed(failures.append)
    # The laptop has no prepare callback: it refuses.
    with pytest.raises(HandoffFailed) as refused:
        await phone.handoff("agent", "alice-tablet", timeout=30)
    assert refused.value.reason == "refused"
    await until(lambda: failures)
    # The owner resumes at once: its fenced write is taken, and the task is its own, not held by a handoff.
    await laptop.state_patch("user/agent", {"step": 1}, task="agent", epoch=lease.epoch)
    with pytest.raises(TaskConflict):
        await tablet.task_claim("agent")

    # The target's connection on n2 ends while it holds the offer.
    offered = asyncio.Event()

    async def offer(request: HandoffOffer):
        offered.set()
        await asyncio.Event().wait()  # never answers

    laptop.on_handoff_prepare(lambda request: {"step": 1})
    tablet.on_handoff_offer(offer)
    handing = asyncio.create_task(phone.handoff("agent", "alice-tablet", timeout=30))
    await asyncio.wait_for(offered.wait(), 10)
    await tablet.close()
    with pytest.raises(HandoffFailed) as gone:
        await handing
    assert gone.value.reason == "target_disconnected"
    await until(lambda: len(failures) == 2)
    assert [failure.reason for failure in failures] == ["refused", "target_disconnected"]
    await laptop.state_patch("user/agent", {"step": 2}, task="agent", epoch=lease.epoch)
    [status] = await phone.task_list("agent")
    assert (status.owner, status.epoch, status.handoff) == ("alice-laptop", lease.epoch, None)


async def test_the_targets_node_dying_fails_the_handoff_on_the_coordinating_node(cluster):
    # The owner on n0, the requester (the coordinator) on n1, the target on n2, which is killed while it holds
    # the offer: n0, the surviving node with the lowest id, speaks for n2 and tells n1.
    laptop = await cluster.connect(1, "alice", "alice-laptop")  # first: it hears the others come online
    phone = await cluster.connect(0, "alice", "alice-phone")
    tablet = await cluster.connect(2, "alice", "alice-tablet", reconnect=False)
    await until_online(laptop, "alice-phone", "alice-tablet")
    lease = await phone.task_claim("agent", ttl=600)
    phone.on_handoff_prepare(lambda request: {"step": 1})
    offered = asyncio.Event()

    async def offer(request: HandoffOffer):
        offered.set()
        await asyncio.Event().wait()  # never answers

    tablet.on_handoff_offer(offer)
    handing = asyncio.create_task(laptop.handoff("agent", "alice-tablet", timeout=60))
    await asyncio.wait_for(offered.wait(), 10)
    cluster.nodes[2].kill()  # SIGKILL: its connections end without a word; accept_timeout (30 s) is far
    with pytest.raises(HandoffFailed) as failed:
        await asyncio.wait_for(handing, 25)  # noticed within NODE_TTL (10 s) and a heartbeat (2 s)
    assert failed.value.reason == "target_disconnected"
    await phone.state_patch("user/agent", {"step": 2}, task="agent", epoch=lease.epoch)  # still the owner's


async def test_a_handoff_whose_coordinating_node_died_lapses_and_the_owner_keeps_the_task(tmp_path):
    async with running_cluster(tmp_path, RCCS_HANDOFF_PREPARE_TIMEOUT="2") as cluster:
        phone = await cluster.connect(0, "alice", "alice-phone", reconnect=False)  # the requester: n0 coordinates
        laptop = await cluster.connect(1, "alice", "alice-laptop")
        tablet = await cluster.connect(2, "alice", "alice-tablet")
        await until_online(phone, "alice-laptop", "alice-tablet")
        lease = await laptop.task_claim("agent", ttl=600)
        preparing = asyncio.Event()

        async def prepare(request: HandoffPrepare):
            preparing.set()
            await asyncio.Event().wait()  # pauses, never answers

        laptop.on_handoff_prepare(prepare)
        handing = asyncio.create_task(phone.handoff("agent", "alice-tablet", timeout=30))
        await asyncio.wait_for(preparing.wait(), 10)
        cluster.nodes[0].kill()  # SIGKILL: nobody hears handoff.failed
        with contextlib.suppress(Exception):
            await handing
        # The handoff still holds the task, as stored, until the prepare deadline (2 s) plus 2 s...
        with pytest.raises(HandoffBusy):
            await tablet.task_claim("agent")
        # ...then it lapses: the lease is the owner's at the same epoch, and the owner writes with it.
        deadline = asyncio.get_running_loop().time() + 10
        while (status := (await tablet.task_list("agent"))[0]).handoff is not None:
            assert asyncio.get_running_loop().time() < deadline, "the dead coordinator's handoff did not lapse"
            await asyncio.sleep(0.1)  # polling the listing: the interval between looks, not synchronisation
        assert (status.owner, status.epoch) == ("alice-laptop", lease.epoch)
        with pytest.raises(TaskConflict):
            await tablet.task_claim("agent")
        await laptop.state_patch("user/agent", {"step": 2}, task="agent", epoch=lease.epoch)


async def until(condition, timeout: float = 10.0) -> None:
    """Wait (bounded) until ``condition()`` holds: a notice the client handles in the background."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError("the condition did not hold in time")
        await asyncio.sleep(0.02)  # polling a client's callbacks: the interval between looks, not synchronisation
