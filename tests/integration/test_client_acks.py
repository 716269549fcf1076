"""The Python client acks a message only once the application has taken it, also when the server writes it again."""

import asyncio

from rccs.client import Client
from rccs.hub import now_ms
from rccs.testing import running_server


async def _barrier(*clients: Client) -> None:
    """A ping round trip on each client, in order: what the server wrote or read before it has happened."""
    for client in clients:
        await client.ping()


def _push_retries(server, past_ms: int) -> None:
    """Run the server's retry sweep as if ``past_ms`` had passed: unacked messages due by then are written again."""
    start = now_ms()
    server.hub.deliveries.retry_due(start)  # the sweep notes the deadline
    server.hub.deliveries.retry_due(start + past_ms)


async def _written_again(server, receiver: Client, past_ms: int = 13_000) -> None:
    """Push the sweep past the retry deadline (ack_timeout 10 s, +20 % jitter), and wait for the repeat."""
    before = receiver.duplicates
    _push_retries(server, past_ms)
    await _barrier(receiver)
    assert receiver.duplicates == before + 1


async def test_a_repeat_of_an_untaken_message_is_not_acked(tmp_path):
    async with running_server(data_dir=str(tmp_path), ack_timeout=10, max_delivery_attempts=5) as server:
        laptop = Client(server.ws_url, server.issue_token("alice", "laptop"), {"type": "desktop"})
        phone = Client(server.ws_url, server.issue_token("alice", "phone"), {"type": "mobile"})
        await laptop.connect()
        await phone.connect()
        sending = asyncio.ensure_future(phone.send({"device": "laptop"}, "cmd", "do it", ack=True, id="job"))
        await _barrier(phone, laptop)  # the message reached the laptop; its application does not read yet
        await _written_again(server, laptop)
        await _barrier(laptop, phone)  # an ack the laptop sent for the repeat would have settled the send by now
        assert not sending.done()
        taken = await laptop.next_message(timeout=5)
        assert (taken.id, taken.body) == ("job", "do it")
        receipts = await asyncio.wait_for(sending, 5)
        assert [(r.status, r.device) for r in receipts] == [("delivered", "laptop")]
        assert laptop._inbox.empty()  # the repeat was not handed to the application
        await laptop.close()
        await phone.close()


async def test_a_repeat_while_on_message_runs_waits_for_it_and_a_failed_callback_gets_another_try(tmp_path):
    async with running_server(data_dir=str(tmp_path), ack_timeout=10, max_delivery_attempts=5) as server:
        release = asyncio.Event()
        calls: list[str] = []

        async def handle(message):
            calls.append(message.body)
            if len(calls) == 1:
                raise RuntimeError("the application failed to take it")
            await release.wait()

        laptop = Client(server.ws_url, server.issue_token("alice", "laptop"), {"type": "desktop"}, on_message=handle)
        phone = Client(server.ws_url, server.issue_token("alice", "phone"), {"type": "mobile"})
        await laptop.connect()
        await phone.connect()
        sending = asyncio.ensure_future(phone.send({"device": "laptop"}, "cmd", "do it", ack=True, id="job"))
        await _barrier(phone, laptop)
        assert calls == ["do it"]  # failed: not acked
        # The next write is the application's second try; it blocks in the callback.
        _push_retries(server, 13_000)
        await _barrier(laptop)
        assert calls == ["do it", "do it"]
        await _written_again(server, laptop, 60_000)  # a third write (backoff doubled) while the callback runs
        await _barrier(laptop, phone)
        assert not sending.done()
        release.set()
        receipts = await asyncio.wait_for(sending, 5)
        assert [(r.status, r.device) for r in receipts] == [("delivered", "laptop")]
        assert calls == ["do it", "do it"]
        await laptop.close()
        await phone.close()


async def test_a_repeat_after_resume_of_an_untaken_message_is_not_acked(tmp_path):
    async with running_server(data_dir=str(tmp_path)) as server:
        laptop = Client(server.ws_url, server.issue_token("alice", "laptop"), {"type": "desktop"},
                        backoff_initial=0.01)
        phone = Client(server.ws_url, server.issue_token("alice", "phone"), {"type": "mobile"})
        await laptop.connect()
        await phone.connect()
        session = laptop.welcome["session"]
        sending = asyncio.ensure_future(phone.send({"device": "laptop"}, "cmd", "run", ack=True, id="r1"))
        await _barrier(phone, laptop)
        laptop.reconnected.clear()
        laptop._transport.underlying_transport.abort()  # a lost network: the session waits to be resumed
        await asyncio.wait_for(laptop.reconnected.wait(), 5)
        assert laptop.welcome["resumed"] is True and laptop.welcome["session"] == session
        await _barrier(laptop)  # the unacked message came again, with the same seq
        assert laptop.duplicates == 1
        await _barrier(laptop, phone)
        assert not sending.done()
        taken = await laptop.next_message(timeout=5)
        assert taken.id == "r1"
        receipts = await asyncio.wait_for(sending, 5)
        assert [(r.status, r.device) for r in receipts] == [("delivered", "laptop")]
        await laptop.close()
        await phone.close()
