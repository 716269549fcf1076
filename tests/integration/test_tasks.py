"""Task leases and handoff through a real server (protocol.md section 15): claims, renewals, releases,
fencing epochs, the four handoff steps and what every failure and disconnect does."""

import asyncio

import pytest
from test_rpc import RawDevice, raw  # noqa: F401  (raw is a fixture)

from rccs import tasks


@pytest.fixture
def server_settings():
    return {"handoff_prepare_timeout": 0.5, "handoff_accept_timeout": 0.5}


async def claim(device, task="agent", **fields):
    await device.send({"op": "task.claim", "id": "c", "task": task, **fields})
    return await device.next_op("task.lease")


async def test_smoke_handoff(raw):
    ide = await raw("alice", "ide")
    phone = await raw("alice", "phone")
    lease = await claim(ide)
    assert (lease["owner"], lease["epoch"]) == ("ide", 1)
    await phone.send({"op": "handoff.request", "id": "r", "task": "agent", "to": {"device": "phone"}})
    started = await phone.next_op("handoff.started")
    prepare = await ide.next_op("handoff.prepare")
    assert prepare["handoff"] == started["handoff"]
    await ide.send({"op": "handoff.prepared", "handoff": prepare["handoff"], "checkpoint": {"step": 3}})
    offer = await phone.next_op("handoff.offer")
    assert (offer["checkpoint"], offer["epoch"], offer["from"]) == ({"step": 3}, 2, "ide")
    await phone.send({"op": "handoff.accept", "handoff": offer["handoff"]})
    committed = await phone.next_op("handoff.committed")
    assert (committed["owner"], committed["epoch"]) == ("phone", 2)
    revoked = await ide.next_op("handoff.revoked")
    assert revoked["epoch"] == 2
    await ide.send({"op": "task.renew", "id": "n", "task": "agent", "epoch": 1})
    stale = await ide.next_op("error")
    assert (stale["code"], stale["epoch"], stale["owner"]) == ("stale_epoch", 2, "phone")
    assert tasks
