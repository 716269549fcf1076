"""Two devices of one user talking through a real rccs server started on a free port."""

import asyncio

import uvloop

from rccs.client import Client
from rccs.testing import running_server


async def main() -> None:
    async with running_server() as server:
        phone = Client(server.ws_url, server.issue_token("alice", "alice-phone"), {"type": "mobile"})
        desktop = Client(server.ws_url, server.issue_token("alice", "alice-desktop"),
                         {"type": "desktop", "capabilities": ["file_sync"]}, encoding="json")
        async with phone, desktop:
            send = phone.send({"capability": "file_sync"}, "user_message", {"text": "build it"}, ack=True)
            receipts, message = await asyncio.gather(send, desktop.next_message(timeout=5))
            print(f"desktop got {message.body} from {message.sender}")
            print(f"phone got receipts {[(r.status, r.device) for r in receipts]}")


if __name__ == "__main__":
    uvloop.run(main())
