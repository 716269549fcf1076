"""SIGTERM under load: nothing accepted is lost, every device resumes after the restart."""

import asyncio
import signal

import pytest
from test_delivery_crash import USER, Clients, data_directory, issue_token

from rccs.testing import ServerProcess

SENDER, WORKER, SLEEPER = "drain-sender", "drain-worker", "drain-sleeper"


@pytest.mark.timeout(60)
async def test_sigterm_under_load_loses_nothing_and_devices_resume():
    with data_directory() as data_dir:
        tokens = {device: issue_token(data_dir, USER, device) for device in (SENDER, WORKER, SLEEPER)}
        server = ServerProcess(data_dir)
        clients = Clients(server, tokens)
        try:
            await server.start()
            sleeper = await clients.hello(SLEEPER)
            await sleeper.ws.close(1000)  # registered, offline: its messages are queued
            worker = await clients.hello(WORKER, ack_policy=lambda msg: msg["body"] % 2 == 0)  # acks half
            sender = await clients.hello(SENDER)
            ids = []
            for n in range(300):  # a stream of ack:true sends, half to the online worker, half to the sleeper
                target = WORKER if n % 2 else SLEEPER
                msg_id = f"m{n}"
                ids.append((msg_id, target))
                await sender.send({"op": "send", "id": msg_id, "to": {"device": target}, "type": "t",
                                   "body": n, "ack": True})
            await sender.until(lambda: all(sender.receipts(i, "routed") for i, _ in ids), "every routed receipt")
            server.send_signal(signal.SIGTERM)  # while the worker still holds unacked messages
            assert await asyncio.to_thread(server.wait, 30) == 0
            for conn in (sender, worker):
                await conn.until(lambda conn=conn: conn.closed is not None, "the close on shutdown")
                assert conn.closed.rcvd is not None and conn.closed.rcvd.code == 1001

            await server.start()
            # Every device comes back; the two that were connected resume their sessions.
            worker2 = await clients.hello(WORKER, ack_policy=lambda msg: True,
                                          resume={"session": worker.welcome["session"], "last_seq": 0})
            assert worker2.welcome["resumed"] is True
            sleeper2 = await clients.hello(SLEEPER, ack_policy=lambda msg: True)
            sender2 = await clients.hello(SENDER, resume={"session": sender.welcome["session"], "last_seq": 0})
            assert sender2.welcome["resumed"] is True
            # Every message reaches its device (the worker's unacked ones again), and every send ends delivered.
            got = {}
            for conn in (worker, worker2, sleeper2):
                for msg in conn.msgs():
                    got.setdefault(msg["id"], conn.label)
            await sleeper2.until(lambda: len(sleeper2.msgs()) == 150, "the sleeper's 150 queued messages")
            await worker2.until(lambda: {m["id"] for m in worker2.msgs()} >= {
                i for i, t in ids if t == WORKER and int(i[1:]) % 2}, "the worker's unacked messages again")
            for conn in (worker2, sleeper2):
                for msg in conn.msgs():
                    got.setdefault(msg["id"], conn.label)
            assert {i for i, _ in ids} <= set(got)

            def all_delivered() -> bool:
                return all(sender.receipts(i, "delivered") or sender2.receipts(i, "delivered") for i, _ in ids)

            await sender2.until(all_delivered, "a delivered receipt for every message")
        except BaseException:
            print(server.logs())
            raise
        finally:
            await clients.close_all()
            server.kill()
