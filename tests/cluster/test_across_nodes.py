"""Several rccs nodes on one Redis, each a real `rccs serve` process (tests/cluster/conftest.py starts three):
devices on different nodes talk. What a device sees when a node or Redis dies is in test_failures.py.

Covered here: ack:true messages between devices on different nodes with their receipts, and their ids
remembered across nodes; live (ack:false) messages by name and by selector; a call and its result; state
changes in order to a subscriber on another node; presence and the `devices` op across nodes; a revocation
made on one node closing the socket on another; the CLI acting on the cluster's store; a device that
connects to a second node ending its older connection on the first; a killed node's devices going offline;
a node started later knowing who is online elsewhere; pairing across three nodes; live/ documents read on
every node and removed with their writer's node; pick-one fail-over to another node; task leases claimed
from two nodes at once; the admin API publishing across nodes. first_ack across nodes is in
test_first_ack_across_nodes.py, handoffs across nodes in test_handoffs_across_nodes.py.
"""

import asyncio
import json
import subprocess
import sys
import urllib.request

import pytest
from clusters import running_cluster
from rawws import masked_frame, open_raw, read_frame

from rccs.client import ClientError, ConnectionClosed, StaleEpoch, TaskConflict, pair
from rccs.store import open_store
from rccs.testing import child_environment


async def test_an_acked_message_crosses_nodes_with_its_receipts(cluster):
    laptop = await cluster.connect(1, "alice", "alice-laptop")
    phone = await cluster.connect(0, "alice", "alice-phone")
    receipts, message = await asyncio.gather(
        phone.send({"device": "alice-laptop"}, "note", {"text": "across"}, ack=True, timeout=10),
        laptop.next_message(timeout=10))
    assert (message.sender, message.type, message.body) == ("alice-phone", "note", {"text": "across"})
    # To a device of another node a message goes through the shared inbox: queued, then delivered once
    # the laptop's application took it (its node sends the receipt to the phone's node).
    assert [(r.status, r.device) for r in receipts] == [("queued", "alice-laptop")]
    delivered = await asyncio.wait_for(phone.receipts.get(), 10)
    assert (delivered.id, delivered.status, delivered.device) == (receipts[0].id, "delivered", "alice-laptop")


async def test_a_device_new_to_the_cluster_gets_what_any_node_sends_it_from_its_welcome_on(tmp_path):
    # Registered by their first hello (not before the nodes started, as alice's devices are): the other nodes
    # hear of such a device only a moment after its welcome. A send or a backend publish from them right after
    # the welcome must reach it, not be answered `offline` (nor its new user `not_found`).
    async with running_cluster(tmp_path, RCCS_ADMIN_KEY="cluster-admin-key-0123456789") as cluster:
        phone = await cluster.connect(0, "bob", "bob-phone")
        for n in range(4):
            laptop = await cluster.connect(1 + n % 2, "bob", f"bob-laptop-{n}")
            receipts, message = await asyncio.gather(
                phone.send({"device": f"bob-laptop-{n}"}, "note", {"n": n}, ack=True, timeout=10),
                laptop.next_message(timeout=10))
            assert [(r.status, r.device) for r in receipts] == [("queued", f"bob-laptop-{n}")]
            assert (message.sender, message.body) == ("bob-phone", {"n": n})
            delivered = await asyncio.wait_for(phone.receipts.get(), 10)
            assert (delivered.status, delivered.device) == ("delivered", f"bob-laptop-{n}")
        # A device that exists nowhere is looked up too, and answered as on one node.
        receipts = await phone.send({"device": "bob-nowhere"}, "note", {}, ack=True, timeout=10)
        assert [(r.status, r.device, r.reason) for r in receipts] == [("failed", "bob-nowhere", "offline")]

        for n in range(2):  # a new user's first device, and a backend publishing through another node at once
            watch = await cluster.connect(1, f"carol-{n}", f"carol-{n}-watch")

            def publish(n: int = n) -> dict:
                request = urllib.request.Request(
                    cluster.nodes[2].http_url + "/admin/publish", method="POST",
                    data=json.dumps({"user": f"carol-{n}", "id": f"srv-{n}", "to": {"device": f"carol-{n}-watch"},
                                     "type": "note", "body": {"n": n}, "ack": True}).encode(),
                    headers={"Authorization": "Bearer cluster-admin-key-0123456789",
                             "Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=10) as response:
                    return json.loads(response.read())

            answer = await asyncio.to_thread(publish)
            assert answer["queued"] == [f"carol-{n}-watch"] and not answer["failed"]
            message = await watch.next_message(timeout=10)
            assert (message.id, message.body) == (f"srv-{n}", {"n": n})


async def test_what_a_new_device_sends_before_its_welcome_is_handled_after_it_in_order(cluster):
    # Its hello waits for the store (the device is written to Redis first): envelopes sent right behind the
    # hello wait too, and are answered after the welcome, not refused.
    phone = await cluster.connect(0, "bob", "bob-phone")
    reader, writer = await open_raw(cluster.nodes[1].ws_url)
    hello = {"op": "hello", "token": cluster.tokens.issue("bob", "bob-watch", 600), "device": {"type": "watch"}}
    send = {"op": "send", "id": "early", "to": {"device": "bob-phone"}, "type": "note", "body": {"n": 1}, "ack": True}
    writer.write(masked_frame(json.dumps(hello).encode(), 0x1) + masked_frame(json.dumps(send).encode(), 0x1))
    try:
        answers = []
        while len(answers) < 2:
            _, data = await asyncio.wait_for(read_frame(reader), 10)
            answers.append(json.loads(data))
        assert answers[0]["op"] == "welcome"
        assert (answers[1]["op"], answers[1]["id"], answers[1]["status"]) == ("receipt", "early", "routed")
        message = await phone.next_message(timeout=10)
        assert (message.id, message.sender) == ("early", "bob-watch")
    finally:
        writer.close()


async def test_a_receipt_kept_in_redis_reaches_its_connected_sender_without_a_doorbell(cluster):
    phone = await cluster.connect(0, "alice", "alice-phone")
    # As a node that kept it and whose doorbell was lost (Redis is the truth): written straight to Redis.
    store = open_store(cluster.redis_url, "")
    await store.open()
    try:
        await store.add_receipts([("alice-phone", {"op": "receipt", "id": "lost-bell", "status": "delivered",
                                                   "device": "alice-laptop"})])
    finally:
        await store.close()
    receipt = await asyncio.wait_for(phone.receipts.get(), 10)  # within a few of its node's sweeps
    assert (receipt.id, receipt.status, receipt.device) == ("lost-bell", "delivered", "alice-laptop")


async def test_live_messages_cross_nodes_by_name_and_by_selector(cluster):
    tablet = await cluster.connect(0, "alice", "alice-tablet")
    phone = await cluster.connect(0, "alice", "alice-phone")
    laptop = await cluster.connect(1, "alice", "alice-laptop")
    # The laptop's node announced where it is before its presence: once the phone has that, its node knows.
    while (event := await asyncio.wait_for(phone.events.get(), 10))["device"] != "alice-laptop":
        pass
    assert event["status"] == "online"
    await phone.send({"device": "alice-laptop"}, "note", {"n": 1})  # ack:false: written at once, not kept
    message = await laptop.next_message(timeout=10)
    assert (message.sender, message.body, message.ack) == ("alice-phone", {"n": 1}, False)
    await phone.send({"all": True}, "note", {"n": 2})  # one device on this node, one on the other
    here, there = await asyncio.gather(tablet.next_message(timeout=10), laptop.next_message(timeout=10))
    assert here.body == there.body == {"n": 2}


async def test_a_call_reaches_a_device_of_another_node_and_its_result_comes_back(cluster):
    phone = await cluster.connect(0, "alice", "alice-phone")
    laptop = await cluster.connect(1, "alice", "alice-laptop")
    laptop.handle("add", lambda params: params["a"] + params["b"])
    while (await asyncio.wait_for(phone.events.get(), 10))["device"] != "alice-laptop":
        pass  # once the phone heard of the laptop, its node knows where the laptop is
    assert await phone.call({"device": "alice-laptop"}, "add", {"a": 2, "b": 3}, timeout=10) == 5
    assert await phone.call({"devices": ["alice-tablet", "alice-laptop"]}, "add", {"a": 1, "b": 1}, timeout=10) == 2


async def test_a_state_change_on_one_node_reaches_a_subscriber_on_the_other_in_order(cluster):
    phone = await cluster.connect(0, "alice", "alice-phone")
    laptop = await cluster.connect(1, "alice", "alice-laptop")
    subscription = await laptop.state_subscribe("user/draft")
    first = await subscription.next(timeout=10)
    assert (first.rev, first.value) == (0, None)  # the snapshot: nothing yet
    for n in range(1, 6):
        await phone.state_patch("user/draft", {"line": n})
    revisions = [(change.rev, change.patch) for change in [await subscription.next(timeout=10) for _ in range(5)]]
    assert revisions == [(n, {"line": n}) for n in range(1, 6)]


async def test_presence_and_the_devices_op_cross_nodes(cluster):
    laptop = await cluster.connect(1, "alice", "alice-laptop")
    await cluster.connect(0, "alice", "alice-phone")
    event = await asyncio.wait_for(laptop.events.get(), 10)
    assert (event["op"], event["device"], event["status"]) == ("presence", "alice-phone", "online")
    listed = {device["id"]: device["status"] for device in await laptop.devices()}
    assert listed["alice-phone"] == "online" and listed["alice-tablet"] == "offline"


async def test_a_revocation_on_one_node_closes_the_socket_on_the_other(cluster):
    laptop = await cluster.connect(1, "alice", "alice-laptop")
    phone = await cluster.connect(0, "alice", "alice-phone", reconnect=False)
    await laptop.request("device.revoke", device="alice-phone")
    closed: ConnectionClosed = await asyncio.wait_for(phone.closed, 5)
    assert closed.code == 4410


async def test_the_command_line_acts_on_the_cluster_store(cluster):
    listed = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "rccs", "devices", "list", "--user", "alice", "--store",
                         cluster.redis_url], capture_output=True, text=True, timeout=60, env=child_environment())
    assert listed.returncode == 0, listed.stderr
    assert {"alice-phone", "alice-laptop", "alice-tablet"} <= set(listed.stdout.split())
    laptop = await cluster.connect(1, "alice", "alice-laptop", reconnect=False)
    revoked = await asyncio.to_thread(
        subprocess.run, [sys.executable, "-m", "rccs", "devices", "revoke", "alice-laptop", "--store",
                         cluster.redis_url], capture_output=True, text=True, timeout=60, env=child_environment())
    assert revoked.returncode == 0, revoked.stderr
    closed: ConnectionClosed = await asyncio.wait_for(laptop.closed, 5)  # through the change feed
    assert closed.code == 4410


async def test_a_device_connecting_to_another_node_ends_its_older_connection(cluster):
    phone = await cluster.connect(1, "alice", "alice-phone")
    first = await cluster.connect(0, "alice", "alice-tablet", reconnect=False)
    # Once node 0 announced the tablet (the phone hears its presence after that), a newer connection is one
    # that Redis orders after it: two made within the same moment are ordered by Redis, not by the clock.
    while ((event := await asyncio.wait_for(phone.events.get(), 10))["device"], event["status"]) != (
            "alice-tablet", "online"):
        pass
    await cluster.connect(1, "alice", "alice-tablet")
    closed: ConnectionClosed = await asyncio.wait_for(first.closed, 5)
    assert closed.code == 4409


async def test_the_devices_of_a_killed_node_go_offline_for_the_others(cluster):
    phone = await cluster.connect(0, "alice", "alice-phone")
    await cluster.connect(1, "alice", "alice-laptop", reconnect=False)
    while (event := await asyncio.wait_for(phone.events.get(), 10))["device"] != "alice-laptop":
        pass
    cluster.nodes[1].kill()  # SIGKILL: no goodbye, no offline announcement from it
    # Within NODE_TTL (10 s) and a heartbeat (2 s) the survivor notices and speaks for it.
    event = await asyncio.wait_for(phone.events.get(), 20)
    assert (event["op"], event["device"], event["status"]) == ("presence", "alice-laptop", "offline")
    listed = {device["id"]: device["status"] for device in await phone.devices()}
    assert listed["alice-laptop"] == "offline"


async def test_a_node_that_starts_later_knows_who_is_online_elsewhere(cluster):
    await cluster.connect(0, "alice", "alice-phone")
    cluster.nodes[1].kill()
    await cluster.nodes[1].start()  # a new process: it must not mark the phone, held by node 0, offline
    laptop = await cluster.connect(1, "alice", "alice-laptop")
    listed = {device["id"]: device["status"] for device in await laptop.devices()}
    assert listed["alice-phone"] == "online"


async def test_a_message_id_sent_again_through_another_node_is_a_repeat(cluster):
    phone = await cluster.connect(0, "alice", "alice-phone", reconnect=False)
    receipts = await phone.send({"device": "alice-tablet"}, "note", {"n": 1}, ack=True, id="once", timeout=10)
    assert [r.status for r in receipts] == ["queued"]
    await phone.close()
    phone = await cluster.connect(1, "alice", "alice-phone")  # reconnected through another node
    again = await phone.send({"device": "alice-tablet"}, "note", {"n": 1}, ack=True, id="once", timeout=10)
    assert [r.status for r in again] == ["duplicate"]
    with pytest.raises(ClientError) as refused:
        await phone.send({"device": "alice-tablet"}, "note", {"n": 2}, ack=True, id="once", timeout=10)
    assert refused.value.code == "duplicate_id"
    await phone.send({"device": "alice-tablet"}, "note", {"n": 3}, ack=True, id="after", timeout=10)
    tablet = await cluster.connect(2, "alice", "alice-tablet")
    # Inbox order is commit order: a second copy of "once" would come before "after".
    assert [(await tablet.next_message(timeout=10)).id for _ in range(2)] == ["once", "after"]


async def test_a_code_made_on_one_node_is_redeemed_on_a_second_and_approved_on_a_third(cluster):
    phone = await cluster.connect(0, "alice", "alice-phone")
    laptop = await cluster.connect(2, "alice", "alice-laptop")
    code = await phone.create_pairing_code(approve=True)
    joining = asyncio.ensure_future(pair(cluster.nodes[1].ws_url, code["code"], {"type": "web", "name": "Browser"}))
    request = await laptop.next_event("pair.request", timeout=10)  # the request waits on node 1
    assert request["device"]["name"] == "Browser" and request["issuer"] == "alice-phone"
    await laptop.approve_pairing(request["request"])
    browser = await asyncio.wait_for(joining, 10)
    cluster.clients.append(browser)
    joined = await phone.next_event("pair.joined", timeout=10)
    assert joined["approved_by"] == "alice-laptop" and joined["device"]["id"] == browser.device_id
    with pytest.raises(ClientError) as unknown:  # decided once: the request is gone on every node
        await phone.approve_pairing(request["request"])
    assert unknown.value.code == "not_found"


async def test_a_denial_on_another_node_refuses_the_waiting_device(cluster):
    phone = await cluster.connect(0, "alice", "alice-phone")
    code = await phone.create_pairing_code(approve=True)
    joining = asyncio.ensure_future(pair(cluster.nodes[1].ws_url, code["code"], {"type": "web"}))
    request = await phone.next_event("pair.request", timeout=10)
    await phone.deny_pairing(request["request"])
    with pytest.raises(ClientError) as refused:
        await asyncio.wait_for(joining, 10)
    assert refused.value.code == "forbidden"


async def test_a_live_document_is_read_on_every_node_and_goes_when_its_writers_node_dies(cluster):
    phone = await cluster.connect(0, "alice", "alice-phone", reconnect=False)
    laptop = await cluster.connect(1, "alice", "alice-laptop")
    watching = await laptop.state_subscribe("live/alice-phone/battery")
    assert (await watching.next(timeout=10)).rev == 0
    await phone.state_patch("live/alice-phone/battery", {"level": 80})
    change = await watching.next(timeout=10)
    assert (change.rev, change.value) == (1, {"level": 80})
    # A subscription made later, on a third node, starts from the document as it is (its node keeps a copy).
    tablet = await cluster.connect(2, "alice", "alice-tablet")
    later = await tablet.state_subscribe("live/alice-phone/battery")
    while (seen := await later.next(timeout=10)).rev < 1:
        pass  # a snapshot taken before node 2 heard of revision 1 is followed by that change
    assert (seen.rev, seen.value) == (1, {"level": 80})
    assert (await tablet.state_get("live/alice-phone/battery")).value == {"level": 80}
    # Its writer's node dies: within the node timeout the document goes, as when its connection ends.
    cluster.nodes[0].kill()
    removed = await watching.next(timeout=30)
    assert (removed.rev, removed.patch, removed.value) == (2, None, None)
    assert (await later.next(timeout=30)).rev == 2


async def test_a_pick_one_message_moves_to_a_device_of_another_node_when_its_device_does_not_ack(tmp_path):
    async with running_cluster(tmp_path, RCCS_ACK_TIMEOUT="1") as cluster:
        phone = await cluster.connect(0, "alice", "alice-phone")
        laptop = await cluster.connect(0, "alice", "alice-laptop", auto_ack=False)  # takes, never acks
        tablet = await cluster.connect(1, "alice", "alice-tablet")
        while (await asyncio.wait_for(phone.events.get(), 10))["device"] != "alice-tablet":
            pass  # once the phone heard of the tablet, its node knows where the tablet is
        sending = asyncio.create_task(phone.send({"devices": ["alice-laptop", "alice-tablet"], "pick": "one"},
                                                 "job", {"n": 1}, ack=True, id="job-1", timeout=30))
        held = await laptop.next_message(timeout=10)  # this node's own candidate first
        assert held.id == "job-1"
        moved = await tablet.next_message(timeout=30)  # then, unacked, to the device on node 1
        assert (moved.id, moved.body) == ("job-1", {"n": 1})
        receipts = await sending
        assert [(r.status, r.device) for r in receipts if r.status in ("moved", "delivered")] == [
            ("moved", "alice-tablet"), ("delivered", "alice-tablet")]
        retract = await laptop.next_event("retract", timeout=10)
        assert retract["id"] == "job-1"


async def test_a_pick_one_message_moves_on_again_from_a_device_of_another_node_that_does_not_ack(tmp_path):
    async with running_cluster(tmp_path, RCCS_ACK_TIMEOUT="1") as cluster:
        phone = await cluster.connect(0, "alice", "alice-phone")
        laptop = await cluster.connect(1, "alice", "alice-laptop", auto_ack=False)  # both take, neither acks
        tablet = await cluster.connect(2, "alice", "alice-tablet", auto_ack=False)
        online: set[str] = set()
        while online != {"alice-laptop", "alice-tablet"}:  # then the phone's node knows where both are
            event = await asyncio.wait_for(phone.events.get(), 10)
            if event.get("op") == "presence" and event["status"] == "online":
                online.add(event["device"])
        # No device of node 0 matches: the message goes to one of the others through its inbox, and from there,
        # unacked, on to the other node's device (either may be first: both are online elsewhere).
        receipts = await phone.send({"devices": ["alice-laptop", "alice-tablet"], "pick": "one"}, "job",
                                    {"n": 3}, ack=True, id="job-3", timeout=10)
        [(status, first_name)] = [(r.status, r.device) for r in receipts if r.status != "routed"]
        assert status == "queued"
        first, second = (laptop, tablet) if first_name == "alice-laptop" else (tablet, laptop)
        second_name = "alice-tablet" if first_name == "alice-laptop" else "alice-laptop"
        assert (await first.next_message(timeout=10)).id == "job-3"
        # The phone moves to the first device's node: there the move's receipt is written to it directly
        # (nothing is kept in Redis for it), and the move must still leave the old inbox by itself.
        await phone.close()
        phone = await cluster.connect(1 if first_name == "alice-laptop" else 2, "alice", "alice-phone")
        moved = await second.next_message(timeout=30)
        assert (moved.id, moved.sender, moved.body) == ("job-3", "alice-phone", {"n": 3})
        assert (await first.next_event("retract", timeout=10))["id"] == "job-3"
        receipt = await asyncio.wait_for(phone.receipts.get(), 10)
        assert (receipt.id, receipt.status, receipt.device, receipt.from_device) == (
            "job-3", "moved", second_name, first_name)
        store = open_store(cluster.redis_url, "")
        await store.open()
        try:
            # It leaves the first device's inbox once the second's holds it, with no other write to carry it
            # (a reconnect of the first device, on any node, brings nothing).
            deadline = asyncio.get_running_loop().time() + 10
            while [m.msg_id for m in await store.inbox(first_name, 0)] == ["job-3"]:
                assert asyncio.get_running_loop().time() < deadline, "still in the inbox it moved from"
                await asyncio.sleep(0.05)  # polling Redis, bounded by the deadline
            assert await store.inbox(first_name, 0) == []
            await second.ack(moved.seq)  # every device tried: it stays with the last one, which acks now
            receipt = await asyncio.wait_for(phone.receipts.get(), 10)
            assert (receipt.id, receipt.status, receipt.device) == ("job-3", "delivered", second_name)
            while await store.inbox(second_name, 0):
                assert asyncio.get_running_loop().time() < deadline + 10, "still in the inbox after its ack"
                await asyncio.sleep(0.05)
        finally:
            await store.close()


async def test_a_pick_one_message_refused_by_the_full_inbox_of_another_nodes_device_stays_with_its_device(tmp_path):
    async with running_cluster(tmp_path, RCCS_ACK_TIMEOUT="1", RCCS_INBOX_MAX_MESSAGES="2") as cluster:
        phone = await cluster.connect(0, "alice", "alice-phone")
        laptop = await cluster.connect(0, "alice", "alice-laptop", auto_ack=False)
        tablet = await cluster.connect(1, "alice", "alice-tablet", auto_ack=False)
        while (await asyncio.wait_for(phone.events.get(), 10))["device"] != "alice-tablet":
            pass  # once the phone heard of the tablet, its node knows where the tablet is
        # The tablet takes two messages and acks neither: its inbox (two messages at most) is full.
        for filler in ("filler-1", "filler-2"):
            await phone.send({"device": "alice-tablet"}, "note", {"n": 0}, ack=True, id=filler, timeout=10)
            assert (await tablet.next_message(timeout=10)).id == filler
        sending = asyncio.create_task(phone.send({"devices": ["alice-laptop", "alice-tablet"], "pick": "one"},
                                                 "job", {"n": 4}, ack=True, id="job-4", timeout=30))
        first = await laptop.next_message(timeout=10)  # this node's own candidate first
        assert first.id == "job-4"
        # Not acked in time, it is taken back to move to the tablet, whose inbox refuses it: it comes back,
        # under a new seq (the client counts it as a repeat of what its application already took).
        assert (await laptop.next_event("retract", timeout=10))["id"] == "job-4"
        deadline = asyncio.get_running_loop().time() + 10
        while laptop.duplicates == 0:
            assert asyncio.get_running_loop().time() < deadline, "the message did not come back"
            await asyncio.sleep(0.05)  # polling the client's counter, bounded by the deadline
        assert laptop.last_seq > first.seq
        await laptop.ack(laptop.last_seq)
        receipts = await sending
        # Nothing about the tablet it never reached: not moved, not failed.
        assert [(r.status, r.device) for r in receipts] == [("delivered", "alice-laptop")]


async def test_a_pick_one_message_prefers_a_device_online_elsewhere_to_one_offline_everywhere(cluster):
    phone = await cluster.connect(0, "alice", "alice-phone")
    tablet = await cluster.connect(1, "alice", "alice-tablet")
    laptop = await cluster.connect(2, "alice", "alice-laptop")
    await laptop.close()  # seen more recently than the tablet, but offline now
    # The phone's node heard that the tablet is on node 1 and that the laptop left (a node hears where a device
    # is before its presence; the two nodes' announcements may arrive in either order).
    latest: dict[str, str] = {}
    while latest.get("alice-tablet") != "online" or latest.get("alice-laptop") != "offline":
        event = await asyncio.wait_for(phone.events.get(), 10)
        if event.get("op") == "presence":
            latest[event["device"]] = event["status"]
    # (Named, not by type: a device's type reaches other nodes' registries a moment after its presence.)
    await phone.send({"devices": ["alice-laptop", "alice-tablet"], "pick": "one"}, "job", {"n": 2}, ack=True,
                     id="job-2", timeout=10)
    assert (await tablet.next_message(timeout=10)).id == "job-2"


async def test_a_task_claimed_from_two_nodes_at_once_has_one_owner_and_its_epochs_follow_each_other(cluster):
    phone = await cluster.connect(0, "alice", "alice-phone")
    laptop = await cluster.connect(1, "alice", "alice-laptop")
    tablet = await cluster.connect(2, "alice", "alice-tablet")
    for round_ in range(5):  # each round races two claims of a free task from two nodes
        task = f"build-{round_}"
        outcomes = await asyncio.gather(phone.task_claim(task), laptop.task_claim(task), return_exceptions=True)
        won = [outcome for outcome in outcomes if not isinstance(outcome, BaseException)]
        lost = [outcome for outcome in outcomes if isinstance(outcome, BaseException)]
        assert len(won) == 1 and len(lost) == 1, outcomes
        assert isinstance(lost[0], TaskConflict) and lost[0].owner == won[0].owner and won[0].epoch == 1
        [status] = await tablet.task_list(task)  # the same on a third node
        assert (status.owner, status.epoch) == (won[0].owner, 1)
    # Released on one node, claimed on another: the epoch goes on from the stored one.
    lease = await phone.task_claim("deploy")
    await phone.task_release("deploy", lease.epoch)
    assert (await laptop.task_claim("deploy")).epoch == lease.epoch + 1
    with pytest.raises(StaleEpoch):  # the old holder's epoch is fenced off, whichever node it asks
        await phone.task_renew("deploy", lease.epoch)


async def test_the_admin_api_of_any_node_publishes_to_devices_of_others(tmp_path):
    async with running_cluster(tmp_path, RCCS_ADMIN_KEY="cluster-admin-key-0123456789") as cluster:
        laptop = await cluster.connect(1, "alice", "alice-laptop")

        def publish() -> dict:
            request = urllib.request.Request(
                cluster.nodes[0].http_url + "/admin/publish", method="POST",
                data=json.dumps({"user": "alice", "id": "srv-1", "to": {"device": "alice-laptop"}, "type": "note",
                                 "body": {"text": "from the backend"}, "ack": True}).encode(),
                headers={"Authorization": "Bearer cluster-admin-key-0123456789",
                         "Content-Type": "application/json"})
            with urllib.request.urlopen(request, timeout=10) as response:
                return json.loads(response.read())

        answer = await asyncio.to_thread(publish)
        assert answer["queued"] == ["alice-laptop"] and not answer["failed"]
        message = await laptop.next_message(timeout=10)
        assert (message.id, message.sender, message.body) == ("srv-1", "server", {"text": "from the backend"})
