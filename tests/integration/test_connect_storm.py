"""A connect storm: what the hellos that arrive together cost the store.

After a network blip every device of a region reconnects at once; each first hello registers a device and
reads its kept receipts and inbox. Those store calls are made once per loop turn for all the hellos the
turn handled, not once per hello.
"""

import asyncio

import msgpack
from rawws import masked_frame, open_raw, read_frame

from rccs.store import DeviceRecord, QueuedMessage, UserRecord

DEVICES = 20


def count_calls(store, names, calls):
    for name in names:
        method = getattr(store, name)

        async def counted(*args, _method=method, _name=name, **kwargs):
            calls.append(_name)
            return await _method(*args, **kwargs)

        setattr(store, name, counted)


async def next_envelope(reader, skip=("presence",)):
    while True:
        _, payload = await read_frame(reader)
        envelope = msgpack.unpackb(payload)
        if envelope["op"] not in skip:
            return envelope


async def test_hellos_arriving_together_share_their_store_calls(server):
    store = server.hub.store
    await store.add_user(UserRecord(id="alice", created=0))
    await store.put_device(DeviceRecord(id="dev-3", user="alice", type="phone", created=0))
    server.hub.registry.users.add("alice")
    server.hub.registry.put(await store.get_device("dev-3"))
    await store.add_receipts([("dev-3", {"op": "receipt", "id": "m-0", "status": "delivered", "device": "x"})])
    await store.enqueue([QueuedMessage(device="dev-3", user="alice", sender_device="x", msg_id="m-1", type="t",
                                       body=b"\xa2hi", ts=0, receipt=False)], 100, 1 << 20, "reject")
    calls = []
    count_calls(store, ["add_user", "put_device", "take_receipts", "inbox", "register", "welcome_reads"], calls)
    connections = [await open_raw(server.ws_url) for _ in range(DEVICES)]
    for number, (_, writer) in enumerate(connections):  # written at once: the server reads them in one turn
        hello = {"op": "hello", "token": server.issue_token("alice", f"dev-{number}"), "device": {"type": "phone"}}
        writer.write(masked_frame(msgpack.packb(hello)))
    welcomes = [await next_envelope(reader) for reader, _ in connections]
    assert [welcome["device"] for welcome in welcomes] == [f"dev-{number}" for number in range(DEVICES)]

    kept_receipt = await next_envelope(connections[3][0])  # the known device still gets its receipt and inbox
    queued = await next_envelope(connections[3][0])
    assert (kept_receipt["op"], kept_receipt["id"], queued["op"], queued["id"]) == ("receipt", "m-0", "msg", "m-1")
    async with asyncio.timeout(5):
        while len(await store.list_devices("alice")) < DEVICES:  # every new device is registered
            await asyncio.sleep(0.01)
    assert len(calls) < DEVICES, calls  # one hello each used to cost 3 store calls
    for _, writer in connections:
        writer.write(masked_frame(b"\x03\xe8", 0x8))
        writer.close()
    await asyncio.wait_for(server.hub.wait_idle(), 5)
