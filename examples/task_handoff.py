"""The IDE's running agent handed to the phone and back (protocol.md section 15), on a real rccs server
started on a free port. Each device keeps the agent's progress in a document it writes fenced with its
lease's epoch, so a device that lost the task cannot overwrite it."""

import asyncio

import uvloop

from rccs.client import Client, HandoffOffer, HandoffPrepare, HandoffResult, StaleEpoch
from rccs.testing import running_server

TASK = "agent"
PROGRESS = "user/agent"


class AgentHost:
    """One device that can run the agent: pauses it for a handoff, takes it over from a checkpoint."""

    def __init__(self, client: Client, name: str):
        self.client = client
        self.name = name
        self.step = 0
        self.gained: asyncio.Queue[HandoffResult] = asyncio.Queue()
        client.on_handoff_prepare(self.pause)
        client.on_handoff_offer(self.take_over)
        client.on_task_gained(self.gained.put_nowait)

    def pause(self, prepare: HandoffPrepare) -> dict[str, int]:
        print(f"{self.name} pauses the agent at step {self.step} for {prepare.to}")
        return {"step": self.step}  # the checkpoint the other device continues from

    def take_over(self, offer: HandoffOffer) -> bool:
        print(f"{self.name} is offered the agent at step {offer.checkpoint['step']} by {offer.from_device}")
        self.step = offer.checkpoint["step"]
        return True

    async def work(self, epoch: int, steps: int) -> None:
        for _ in range(steps):
            self.step += 1
            await self.client.state_patch(PROGRESS, {"step": self.step, "by": self.name}, task=TASK, epoch=epoch)
        print(f"{self.name} ran the agent to step {self.step} at epoch {epoch}")


async def main() -> None:
    async with running_server() as server:
        ide_client = Client(server.ws_url, server.issue_token("alice", "alice-ide"), {"type": "desktop"})
        phone_client = Client(server.ws_url, server.issue_token("alice", "alice-phone"), {"type": "mobile"},
                              encoding="json")
        async with ide_client, phone_client:
            ide, phone = AgentHost(ide_client, "ide"), AgentHost(phone_client, "phone")

            lease = await ide_client.task_claim(TASK)
            await ide.work(lease.epoch, 3)

            moved = await ide_client.handoff(TASK, "alice-phone")  # the owner asks; the target could pull too
            print(f"the agent moved to {moved.owner} at epoch {moved.epoch}")
            phone_lease = (await asyncio.wait_for(phone.gained.get(), 5)).lease
            await phone.work(phone_lease.epoch, 2)
            try:
                await ide_client.state_patch(PROGRESS, {"step": 99}, task=TASK, epoch=lease.epoch)
            except StaleEpoch as stale:
                print(f"the ide's late write is refused: {stale.owner} holds epoch {stale.epoch}")

            back = await phone_client.handoff(TASK, "alice-ide")  # done on the phone: it hands the agent back
            print(f"the agent moved back to {back.owner} at epoch {back.epoch}")
            await asyncio.wait_for(ide.gained.get(), 5)
            await ide.work(back.epoch, 1)
            progress = await ide_client.state_get(PROGRESS)
            print(f"progress: {progress.value}")


if __name__ == "__main__":
    uvloop.run(main())
