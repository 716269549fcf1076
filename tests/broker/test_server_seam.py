"""A running server sends what crosses connections through its broker: a second node attached to the
same broker (a recorder standing in for another process) hears presence and revocations, and a receipt
for a sender that node holds goes to it instead of being kept."""

from rccs.client import Client
from rccs.testing import running_server

from .recording import RecordingNode


async def test_presence_revocations_and_receipts_cross_to_another_node(tmp_path):
    async with running_server(data_dir=str(tmp_path)) as server:
        elsewhere = RecordingNode(("alice", "tablet-elsewhere"))
        server.node.broker.attach(elsewhere)
        clients = []
        try:
            for device in ("alice-phone", "alice-laptop"):
                client = Client(server.ws_url, server.issue_token("alice", device), {"type": "desktop"})
                await client.connect()
                clients.append(client)
            phone, laptop = clients
            await phone.ping()
            presence = [item for item in elsewhere.seen if item[0] == "device"]
            assert [(item[2], item[3]["op"], item[3]["device"], item[3]["status"]) for item in presence] == [
                ("tablet-elsewhere", "presence", "alice-phone", "online"),
                ("tablet-elsewhere", "presence", "alice-laptop", "online")]
            # A receipt for a sender the other node holds (a device there sent the message) goes there.
            server.hub.send_receipt("alice", "tablet-elsewhere", {"op": "receipt", "id": "m1", "status": "delivered",
                                                                  "device": "alice-phone"})
            assert elsewhere.seen[-1] == ("device", "alice", "tablet-elsewhere", {
                "op": "receipt", "id": "m1", "status": "delivered", "device": "alice-phone"})
            assert server.hub.deliveries.stats["receipts_kept"] == 0
            await laptop.request("device.revoke", device="alice-phone")
            assert [item[1] for item in elsewhere.seen if item[0] == "revoked device"] == ["alice-phone"]
        finally:
            server.node.broker.detach(elsewhere)
            for client in clients:
                await client.close()
