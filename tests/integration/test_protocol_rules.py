"""Rules of docs/protocol.md that no other test covered: framing violations, a slow consumer's session,
the idempotency cache's bound and its loss on a crash, live ordering by body, the inbox byte cap end to end."""

import asyncio
import signal

import msgpack
import pytest
from rawws import masked_frame, open_raw, read_frame
from test_delivery_crash import data_directory, issue_token

from rccs.client import Client
from rccs.errors import CloseCode
from rccs.testing import ServerProcess, running_server

DESKTOP = {"type": "desktop"}


def unfinished_frame(payload: bytes, opcode: int) -> bytes:
    """A masked client frame without FIN: the first fragment of a message, or a middle continuation."""
    assert len(payload) < 126
    return bytes((opcode, 0x80 | len(payload))) + b"\x00\x00\x00\x00" + payload


async def raw_msgpack_device(server, user, device, resume=None):
    reader, writer = await open_raw(server.ws_url)
    hello = {"op": "hello", "token": server.issue_token(user, device), "device": DESKTOP}
    if resume is not None:
        hello["resume"] = resume
    writer.write(masked_frame(msgpack.packb(hello)))
    opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
    welcome = msgpack.unpackb(payload)
    assert (opcode, welcome["op"]) == (0x2, "welcome"), welcome
    return reader, writer, welcome


async def next_msg(reader) -> dict:
    """The next ``msg`` envelope, skipping events (presence of the user's other devices)."""
    while True:
        _, payload = await asyncio.wait_for(read_frame(reader), 5)
        envelope = msgpack.unpackb(payload)
        if envelope["op"] == "msg":
            return envelope


async def close_frame_code(reader) -> int:
    """Skip data frames until the server's close frame; its code."""
    while True:
        opcode, payload = await asyncio.wait_for(read_frame(reader), 5)
        if opcode == 0x8:
            return int.from_bytes(payload[:2], "big")


# ---- section 7: 1002 ------------------------------------------------------------


@pytest.mark.parametrize("violation", ["continuation_without_a_message", "new_message_inside_a_fragmented_one"])
async def test_fragmentation_violations_close_1002(server, violation):
    reader, writer, _ = await raw_msgpack_device(server, "fay", "fay-1")
    ping = msgpack.packb({"op": "ping", "id": "p"})
    if violation == "continuation_without_a_message":
        writer.write(masked_frame(ping, 0x0))  # a final continuation frame, no message started
    else:
        writer.write(unfinished_frame(ping[:3], 0x2) + masked_frame(ping, 0x2))
    assert await close_frame_code(reader) == CloseCode.PROTOCOL_ERROR == 1002
    writer.close()


async def test_a_fragmented_message_done_right_is_answered(server):
    # The control for the test above: the same bytes, fragmented by the rules, are a ping like any other.
    reader, writer, _ = await raw_msgpack_device(server, "fay", "fay-1")
    ping = msgpack.packb({"op": "ping", "id": "p"})
    writer.write(unfinished_frame(ping[:3], 0x2) + unfinished_frame(ping[3:5], 0x0) + masked_frame(ping[5:], 0x0))
    _, payload = await asyncio.wait_for(read_frame(reader), 5)
    assert msgpack.unpackb(payload)["op"] == "pong"
    writer.close()


# ---- sections 2 and 7: 4413 leaves the session resumable --------------------------


async def test_a_slow_consumer_keeps_its_session_and_gets_its_unacked_message_on_resume():
    async with running_server(max_outbound_bytes=256 * 1024) as server:
        reader, writer, welcome = await raw_msgpack_device(server, "sam", "sam-stuck")
        flooder = Client(server.ws_url, server.issue_token("sam", "sam-flood"), {"type": "mobile"})
        await flooder.connect()
        waiting = asyncio.ensure_future(flooder.send({"device": "sam-stuck"}, "keep", "me", ack=True, id="keep-1"))
        first = await next_msg(reader)
        assert (first["op"], first["id"]) == ("msg", "keep-1")
        writer.transport.pause_reading()
        body = b"x" * (256 * 1024)
        for _ in range(2000):  # bounded: the kernel's socket buffers fill long before this
            if server.hub.online("sam", "sam-stuck") is None:
                break
            await flooder.send({"device": "sam-stuck"}, "bulk", body)
            await flooder.ping()  # the server has processed (and flushed) everything sent so far
        assert server.hub.closes_sent[4413] == 1
        writer.close()
        assert not waiting.done()  # not queued: the unacked message stays with the session
        resume = {"session": welcome["session"], "last_seq": 0}
        reader, writer, again = await raw_msgpack_device(server, "sam", "sam-stuck", resume=resume)
        assert (again["resumed"], again["session"]) == (True, welcome["session"])
        resent = await next_msg(reader)
        assert (resent["op"], resent["id"], resent["seq"], resent["body"]) == ("msg", "keep-1", first["seq"], "me")
        writer.write(masked_frame(msgpack.packb({"op": "ack", "seq": resent["seq"]})))
        receipts = await asyncio.wait_for(waiting, 5)
        assert [(r.status, r.device) for r in receipts] == [("delivered", "sam-stuck")]
        writer.close()
        await flooder.close()


# ---- section 12: idempotency ----------------------------------------------------------


async def test_the_idempotency_cache_keeps_the_last_ids_of_a_device_only():
    async with running_server(idempotency_cache=2) as server:
        sender = Client(server.ws_url, server.issue_token("ida", "ida-send"), DESKTOP)
        receiver = Client(server.ws_url, server.issue_token("ida", "ida-recv"), DESKTOP)
        await sender.connect()
        await receiver.connect()

        async def delivered(msg_id):
            # The receiver acks a message when the application takes it: take it while the sender waits.
            receipts, message = await asyncio.gather(
                sender.send({"device": "ida-recv"}, "t", msg_id, ack=True, id=msg_id), receiver.next_message(timeout=5))
            return [r.status for r in receipts], message.id

        for msg_id in ("m1", "m2", "m3"):
            assert await delivered(msg_id) == (["delivered"], msg_id)
        # m3 and m2 are the last two: remembered. m1 fell out: a new message, written to the receiver again
        # (whose client recognises the repeat by (from, id) and acks it without handing it over twice).
        duplicate = await sender.send({"device": "ida-recv"}, "t", "m3", ack=True, id="m3")
        assert [r.status for r in duplicate] == ["duplicate"]
        assert receiver.duplicates == 0
        again = await sender.send({"device": "ida-recv"}, "t", "m1", ack=True, id="m1", timeout=5)
        assert [r.status for r in again] == ["delivered"]
        assert receiver.duplicates == 1
        await sender.close()
        await receiver.close()


@pytest.mark.timeout(90)
async def test_a_graceful_restart_keeps_the_idempotency_cache_and_a_crash_forgets_it():
    with data_directory() as data_dir:
        server = ServerProcess(data_dir)
        tokens = {device: issue_token(data_dir, "ivy", device) for device in ("ivy-send", "ivy-recv")}

        async def connected():
            sender = Client(server.ws_url, tokens["ivy-send"], DESKTOP, reconnect=False)
            receiver = Client(server.ws_url, tokens["ivy-recv"], DESKTOP, reconnect=False)
            await sender.connect()
            await receiver.connect()
            return sender, receiver

        async def send(sender, receiver, msg_id):
            """The receipt statuses; a message the receiver gets is taken (and so acked) while the sender waits."""
            sending = asyncio.ensure_future(sender.send({"device": "ivy-recv"}, "t", msg_id, ack=True, id=msg_id,
                                                        timeout=10))
            taking = asyncio.ensure_future(receiver.next_message(timeout=10))
            await asyncio.wait([sending, taking], return_when=asyncio.FIRST_EXCEPTION)
            statuses = [r.status for r in await sending]
            if statuses == ["duplicate"]:
                # A duplicate reaches nobody; the ping's answer comes after anything the server wrote before it.
                taking.cancel()
                await receiver.ping()
                assert receiver._inbox.empty()
            else:
                assert (await taking).id == msg_id
            return statuses

        try:
            await server.start()
            sender, receiver = await connected()
            assert await send(sender, receiver, "before-sigterm") == ["delivered"]
            server.send_signal(signal.SIGTERM)
            assert await asyncio.to_thread(server.wait, 30) == 0
            await server.start()
            sender, receiver = await connected()
            assert await send(sender, receiver, "before-sigterm") == ["duplicate"]  # saved at the graceful shutdown
            assert await send(sender, receiver, "before-kill") == ["delivered"]
            assert await send(sender, receiver, "before-kill") == ["duplicate"]
            server.kill()
            await server.start()
            sender, receiver = await connected()
            # Kept in memory only: the crash lost it.
            assert await send(sender, receiver, "before-kill") == ["delivered"]
            await sender.close()
            await receiver.close()
        finally:
            server.kill()


# ---- section 12: ordering -----------------------------------------------------------------


@pytest.mark.parametrize("ack", [False, True])
async def test_live_messages_arrive_in_the_order_they_were_sent_body_for_body(server, ack):
    sender = Client(server.ws_url, server.issue_token("ola", "ola-send"), DESKTOP)
    receiver = Client(server.ws_url, server.issue_token("ola", "ola-recv"), DESKTOP)
    await sender.connect()
    await receiver.connect()
    # Sizes cross the 126 and 65,536 byte frame-length boundaries; every other send carries a ttl, which
    # the direct path leaves to the general one: both paths write into the same ordered stream.
    bodies = [{"n": n, "pad": "x" * (n * 997 % 70_000)} for n in range(120)]
    sends = [sender.send({"device": "ola-recv"}, "t", body, ack=ack, ttl=60 if n % 2 else None)
             for n, body in enumerate(bodies)]
    results = asyncio.gather(*sends)
    received = [(await receiver.next_message(timeout=10)).body for _ in bodies]
    await asyncio.wait_for(results, 10)
    assert [b["n"] for b in received] == list(range(len(bodies)))
    assert received == bodies
    await sender.close()
    await receiver.close()


# ---- sections 5.2 and 12: the inbox byte cap -------------------------------------------------


async def test_a_message_larger_than_inbox_max_bytes_is_refused_end_to_end():
    async with running_server(inbox_max_bytes=4096) as server:
        receiver = Client(server.ws_url, server.issue_token("ula", "ula-recv"), DESKTOP, reconnect=False)
        await receiver.connect()
        await receiver.close()  # close 1000: the session ends, the device is offline, messages go to its inbox
        sender = Client(server.ws_url, server.issue_token("ula", "ula-send"), DESKTOP)
        await sender.connect()
        refused = await sender.send({"device": "ula-recv"}, "t", "x" * 5000, ack=True, id="too-big")
        assert [(r.status, r.reason, r.device) for r in refused] == [("failed", "inbox_full", "ula-recv")]
        fits = await sender.send({"device": "ula-recv"}, "t", "small", ack=True, id="fits")
        assert [(r.status, r.device) for r in fits] == [("queued", "ula-recv")]
        again = Client(server.ws_url, server.issue_token("ula", "ula-recv"), DESKTOP)
        await again.connect()
        assert (await again.next_message(timeout=5)).id == "fits"
        await again.ping()  # the inbox goes out before the answer to a ping: nothing else was in it
        assert again._inbox.empty()
        assert (await asyncio.wait_for(sender.receipts.get(), 5)).status == "delivered"
        await sender.close()
        await again.close()
