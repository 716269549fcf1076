"""Event hooks: the bus, and webhooks delivered signed to a real HTTP receiver, with retries."""

import asyncio
import hashlib
import hmac
import json

from rccs.client import Client
from rccs.events import SIGNATURE_HEADER
from rccs.testing import running_server

SECRET = "hook-secret"


class Receiver:
    """A tiny HTTP/1.1 server that records POST bodies; the first ``fail_first`` requests get 500."""

    def __init__(self, fail_first: int = 0):
        self.fail_first = fail_first
        self.requests: list[tuple[dict[str, str], bytes]] = []
        self.arrived = asyncio.Condition()
        self.server: asyncio.Server | None = None

    async def start(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}/hook"

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode()
        lines = head.split("\r\n")
        headers = {k.strip().lower(): v.strip() for k, v in (line.split(":", 1) for line in lines[1:] if ":" in line)}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
        status = b"500 Internal Server Error" if self.fail_first > 0 else b"204 No Content"
        self.fail_first -= 1
        if status.startswith(b"204"):
            async with self.arrived:
                self.requests.append((headers, body))
                self.arrived.notify_all()
        writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        await writer.drain()
        writer.close()

    async def events(self, count: int) -> list[dict]:
        async with self.arrived:
            await asyncio.wait_for(self.arrived.wait_for(lambda: len(self.requests) >= count), 10)
        return [json.loads(body) for _, body in self.requests]


async def test_webhooks_are_signed_retried_and_in_order(tmp_path):
    receiver = Receiver(fail_first=2)
    url = await receiver.start()
    async with running_server(data_dir=str(tmp_path), webhook_url=url, webhook_secret=SECRET,
                              webhook_events="device.registered,device.connected,device.revoked") as server:
        server.hub.webhooks.backoff = 0.01  # retries in milliseconds, not seconds, for the test
        desk = Client(server.ws_url, server.issue_token("alice", "desk"), {"type": "desktop"})
        await desk.connect()
        phone = Client(server.ws_url, server.issue_token("alice", "phone"), {"type": "mobile"}, reconnect=False)
        await phone.connect()
        await desk.revoke_device("phone")
        events = await receiver.events(5)
        kinds = [(e["event"], e["device"]) for e in events]
        assert kinds == [("device.registered", "desk"), ("device.connected", "desk"), ("device.registered", "phone"),
                         ("device.connected", "phone"), ("device.revoked", "phone")]
        for headers, body in receiver.requests:
            expected = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
            assert hmac.compare_digest(headers[SIGNATURE_HEADER.lower()], expected)
            assert headers["content-type"] == "application/json"
        assert server.hub.bus.counts["device.disconnected"] >= 1  # on the bus, filtered out of the webhook
        await desk.close()
    # Stopped: the queue was drained; the two 500s were retried, nothing failed or was dropped.
    assert server.hub.webhooks.results == {"delivered": 5}
    receiver.server.close()


async def test_an_unreachable_webhook_never_blocks_the_server(tmp_path):
    async with running_server(data_dir=str(tmp_path), webhook_url="http://127.0.0.1:9/nothing-listens",
                              webhook_secret=SECRET) as server:
        server.hub.webhooks.backoff = 0.01
        server.hub.webhooks.retries = 1
        clients = []
        for n in range(5):
            client = Client(server.ws_url, server.issue_token("alice", f"d{n}"), {"type": "desktop"})
            await client.connect()
            clients.append(client)
        receipts, _ = await asyncio.gather(
            clients[0].send({"device": "d1"}, "t", 1, ack=True), clients[1].next_message(timeout=5))
        assert receipts[0].status == "delivered"
        for client in clients:
            await client.close()
    assert server.hub.webhooks.results["delivered"] == 0 and server.hub.webhooks.results["failed"] > 0
