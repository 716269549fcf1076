"""A prompt drafted on the phone and continued on the desktop, through a shared state document
(protocol.md section 14), on a real rccs server started on a free port."""

import uvloop

from rccs.client import Client, StateConflict
from rccs.testing import running_server

DRAFT = "user/draft"


async def main() -> None:
    async with running_server() as server:
        phone = Client(server.ws_url, server.issue_token("alice", "alice-phone"), {"type": "mobile"})
        desktop = Client(server.ws_url, server.issue_token("alice", "alice-desktop"), {"type": "desktop"},
                         encoding="json")
        async with phone, desktop:
            # On the phone, in two sittings.
            await phone.state_patch(DRAFT, {"text": "Refactor the parser", "to": ["agent"]})
            typed = await phone.state_patch(DRAFT, {"text": "Refactor the parser and keep the tests green"})
            print(f"phone saved the draft at rev {typed.rev}")
            on_phone = await phone.state_subscribe(DRAFT)
            await on_phone.next(timeout=5)  # the phone's own copy; it watches for edits from here on

            # The desktop opens the same draft: the subscription starts with what is there now (the catch-up).
            on_desktop = await desktop.state_subscribe(DRAFT)
            current = await on_desktop.next(timeout=5)
            print(f"desktop caught up at rev {current.rev}: {current.value['text']!r}")

            # It continues the text, only if nobody changed the draft since it read it.
            continued = current.value["text"] + ", then open a pull request"
            await desktop.state_patch(DRAFT, {"text": continued}, if_rev=current.rev)
            await on_desktop.next(timeout=5)  # the writer's subscription gets its own change too
            change = await on_phone.next(timeout=5)
            print(f"phone sees rev {change.rev} by {change.by}: {change.value['text']!r}")

            # An edit the phone based on the older revision is refused with the current draft, to redo it on.
            try:
                await phone.state_patch(DRAFT, {"to": ["agent", "bob"]}, if_rev=typed.rev)
            except StateConflict as conflict:
                print(f"phone's edit at rev {typed.rev} conflicted: the draft is at rev {conflict.rev}")
                await phone.state_patch(DRAFT, {"to": ["agent", "bob"]}, if_rev=conflict.rev)
            final = await on_desktop.next(timeout=5)
            print(f"desktop has rev {final.rev} by {final.by}: {final.value}")


if __name__ == "__main__":
    uvloop.run(main())
