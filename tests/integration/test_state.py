"""State documents through a real server (protocol.md section 14): get/patch/subscribe, merge patches,
revisions, catch-up, limits, live documents, restarts."""

import asyncio
import itertools
import json

import msgpack
import picows
import pytest
import websockets
from test_bad_input import _Collector
from test_delivery_crash import data_directory, issue_token

from rccs import state
from rccs.client import Client, ClientError, StateConflict
from rccs.mergepatch import merge_patch
from rccs.testing import ServerProcess, running_server

# RFC 7396 Appendix A: (original, patch, result)
RFC7396_VECTORS = [
    ({"a": "b"}, {"a": "c"}, {"a": "c"}),
    ({"a": "b"}, {"b": "c"}, {"a": "b", "b": "c"}),
    ({"a": "b"}, {"a": None}, {}),
    ({"a": "b", "b": "c"}, {"a": None}, {"b": "c"}),
    ({"a": ["b"]}, {"a": "c"}, {"a": "c"}),
    ({"a": "c"}, {"a": ["b"]}, {"a": ["b"]}),
    ({"a": {"b": "c"}}, {"a": {"b": "d", "c": None}}, {"a": {"b": "d"}}),
    ({"a": [{"b": "c"}]}, {"a": [1]}, {"a": [1]}),
    (["a", "b"], ["c", "d"], ["c", "d"]),
    ({"a": "b"}, ["c"], ["c"]),
    ({"a": "foo"}, None, None),
    ({"a": "foo"}, "bar", "bar"),
    ({"e": None}, {"a": 1}, {"e": None, "a": 1}),
    ([1, 2], {"a": "b", "c": None}, {"a": "b"}),
    ({}, {"a": {"bb": {"ccc": None}}}, {"a": {"bb": {}}}),
]


def test_merge_patch_follows_rfc_7396_appendix_a():
    for original, patch, result in RFC7396_VECTORS:
        assert merge_patch(original, patch) == result, (original, patch)


async def test_rfc_7396_appendix_a_vectors_over_the_wire(connect):
    phone = await connect("alice", "alice-phone")
    for n, (original, patch, result) in enumerate(RFC7396_VECTORS):
        if isinstance(original, dict) and None in original.values():
            continue  # a stored document never holds null members (null deletes them)
        doc = f"user/rfc/{n}"
        await phone.state_patch(doc, original)
        assert (await phone.state_get(doc)).value == original
        await phone.state_patch(doc, patch)
        got = await phone.state_get(doc)
        assert got.value == result, (original, patch)


async def test_get_patch_and_revisions(connect):
    phone = await connect("alice", "alice-phone")
    desktop = await connect("alice", "alice-desktop", encoding="json")
    missing = await phone.state_get("user/draft")
    assert (missing.rev, missing.value) == (0, None)
    first = await phone.state_patch("user/draft", {"text": "Dear", "to": ["bob"]})
    assert (first.rev, first.prev_rev, first.noop) == (1, 0, False)
    second = await desktop.state_patch("user/draft", {"text": "Dear Bob", "to": None})
    assert (second.rev, second.prev_rev) == (2, 1)
    assert (await phone.state_get("user/draft")).value == {"text": "Dear Bob"}
    # another user sees nothing of alice's documents
    bob = await connect("bob", "bob-phone")
    assert (await bob.state_get("user/draft")).rev == 0


async def test_no_op_patches_bump_nothing_and_notify_no_one(connect):
    phone = await connect("alice", "alice-phone")
    watcher = await connect("alice", "alice-desktop")
    await phone.state_patch("user/s", {"a": 1, "b": [1, 2]})
    subscription = await watcher.state_subscribe("user/s")
    snapshot = await subscription.next(5)
    assert (snapshot.snapshot, snapshot.rev, snapshot.value) == (True, 1, {"a": 1, "b": [1, 2]})
    for same in ({"a": 1}, {"b": [1, 2]}, {"gone": None}, {}):
        outcome = await phone.state_patch("user/s", same)
        assert (outcome.rev, outcome.prev_rev, outcome.noop) == (1, 1, True)
    await phone.state_patch("user/s", {"a": 2})
    change = await subscription.next(5)  # the next thing the subscriber hears is the real change
    assert (change.rev, change.prev_rev, change.patch, change.by) == (2, 1, {"a": 2}, "alice-phone")


async def test_if_rev_conflicts_carry_the_current_revision_and_value(connect):
    phone = await connect("alice", "alice-phone")
    await phone.state_patch("user/c", {"n": 1})
    for wrong in (0, 5):  # stale, and in the future
        with pytest.raises(StateConflict) as caught:
            await phone.state_patch("user/c", {"n": 2}, if_rev=wrong)
        assert (caught.value.code, caught.value.rev, caught.value.value) == ("conflict", 1, {"n": 1})
    assert (await phone.state_patch("user/c", {"n": 2}, if_rev=1)).rev == 2


async def test_a_retried_patch_with_the_same_id_is_applied_once(connect):
    phone = await connect("alice", "alice-phone")
    desktop = await connect("alice", "alice-desktop")
    first = await phone.state_patch("user/counter", {"n": 1}, id="edit-1")
    await desktop.state_patch("user/counter", {"n": 2})
    again = await phone.state_patch("user/counter", {"n": 1}, id="edit-1")
    assert (again.rev, again.prev_rev, again.noop) == (first.rev, first.prev_rev, False)
    assert (await phone.state_get("user/counter")).value == {"n": 2}


async def _chain(subscription, doc, count):
    """``count`` changes of ``doc`` after a snapshot: one gap-free revision chain."""
    changes = []
    while len(changes) < count:
        change = await subscription.next(10)
        if change.snapshot:
            continue
        assert change.doc == doc
        changes.append(change)
    for before, after in itertools.pairwise(changes):
        assert after.prev_rev == before.rev and after.rev == before.rev + 1
    return changes


@pytest.mark.parametrize("same_field", [False, True])
async def test_concurrent_writers_give_every_subscriber_one_gap_free_chain(connect, same_field):
    writers = [await connect("alice", f"alice-w{n}", encoding="json" if n % 2 else "msgpack") for n in range(4)]
    watchers = [await connect("alice", f"alice-r{n}") for n in range(2)]
    subscriptions = [await watchers[0].state_subscribe("user/shared"),
                     await watchers[1].state_subscribe(prefix="user/")]
    per_writer = 15

    async def write(n, client):
        for i in range(per_writer):
            field = "x" if same_field else f"f{n}"
            await client.state_patch("user/shared", {field: f"{n}-{i}"})

    await asyncio.gather(*(write(n, client) for n, client in enumerate(writers)))
    final = await writers[0].state_get("user/shared")
    assert final.rev == 4 * per_writer
    for subscription in subscriptions:
        changes = await _chain(subscription, "user/shared", 4 * per_writer)
        assert [change.rev for change in changes] == list(range(1, 4 * per_writer + 1))
        assert changes[-1].value == final.value
    if not same_field:
        assert final.value == {f"f{n}": f"{n}-{per_writer - 1}" for n in range(4)}


async def test_exactly_one_if_rev_racer_wins(connect):
    racers = [await connect("alice", f"alice-{n}") for n in range(6)]
    await racers[0].state_patch("user/lock", {"owner": None, "v": 0})
    rev = (await racers[0].state_get("user/lock")).rev

    async def race(n, client):
        try:
            return await client.state_patch("user/lock", {"owner": f"alice-{n}"}, if_rev=rev)
        except StateConflict as exc:
            return exc

    outcomes = await asyncio.gather(*(race(n, client) for n, client in enumerate(racers)))
    winners = [outcome for outcome in outcomes if not isinstance(outcome, StateConflict)]
    assert len(winners) == 1 and winners[0].rev == rev + 1
    losers = [outcome for outcome in outcomes if isinstance(outcome, StateConflict)]
    assert all(loser.rev == rev + 1 for loser in losers)


async def test_subscribing_while_writes_race_loses_and_repeats_nothing(connect):
    writer = await connect("alice", "alice-writer")
    watcher = await connect("alice", "alice-watcher")
    total = 60

    async def write():
        for i in range(total):
            await writer.state_patch("user/race", {"i": i})

    writing = asyncio.create_task(write())
    subscription = await watcher.state_subscribe(prefix="user/ra")
    await writing
    seen = []
    value = None
    while not seen or seen[-1] < total:
        change = await subscription.next(10)
        if change.snapshot:
            assert not seen or change.rev > seen[-1]
        else:
            assert not seen or change.prev_rev == seen[-1]
        seen.append(change.rev)
        value = change.value
    assert seen == sorted(set(seen)) and value == {"i": total - 1}


async def test_catch_up_after_a_disconnect_gives_exactly_the_k_changes_in_order(connect):
    writer = await connect("alice", "alice-phone")
    reader = await connect("alice", "alice-desktop")
    await writer.state_patch("user/notes", {"n": 0})
    subscription = await reader.state_subscribe("user/notes")
    seen = await subscription.next(5)
    await reader.close()
    k = 7
    for i in range(1, k + 1):
        await writer.state_patch("user/notes", {"n": i, f"k{i}": True})
    again = await connect("alice", "alice-desktop")
    resumed = await again.state_subscribe("user/notes", known={"user/notes": (seen.rev, seen.value)})
    changes = [await resumed.next(5) for _ in range(k)]
    assert [(c.rev, c.prev_rev, c.snapshot) for c in changes] == [(r, r - 1, False) for r in range(2, k + 2)]
    assert changes[-1].value == (await again.state_get("user/notes")).value
    await writer.state_patch("user/notes", {"live": 1})
    live = await resumed.next(5)
    assert (live.rev, live.snapshot) == (k + 2, False)  # nothing repeated between catch-up and live


async def test_catch_up_past_the_change_log_is_a_snapshot(connect, monkeypatch):
    monkeypatch.setattr(state, "KEEP_CHANGES", 3)
    writer = await connect("alice", "alice-phone")
    reader = await connect("alice", "alice-desktop")
    for i in range(1, 11):
        await writer.state_patch("user/long", {"n": i})
    subscription = await reader.state_subscribe("user/long", known={"user/long": (5, {"n": 5})})
    first = await subscription.next(5)
    assert (first.snapshot, first.rev, first.value) == (True, 10, {"n": 10})
    recent = await reader.state_subscribe("user/long", known={"user/long": (8, {"n": 8})})
    assert [(c.rev, c.snapshot) for c in [await recent.next(5), await recent.next(5)]] == [(9, False), (10, False)]


async def test_the_client_catches_up_by_itself_after_a_dropped_connection(connect):
    writer = await connect("alice", "alice-phone")
    reader = await connect("alice", "alice-desktop", backoff_initial=0.05)
    subscription = await reader.state_subscribe("user/auto")
    assert (await subscription.next(5)).rev == 0
    reader._transport.disconnect()  # the connection drops; the client reconnects and subscribes again
    k = 5
    for i in range(1, k + 1):
        await writer.state_patch("user/auto", {"n": i})
    changes = [await subscription.next(10) for _ in range(k)]
    assert [change.rev for change in changes] == list(range(1, k + 1))
    assert changes[-1].value == {"n": k}


async def test_limits_apply_to_the_merged_document(tmp_path):
    data_dir = str(tmp_path / "data")
    async with running_server(store="sqlite", data_dir=data_dir) as server:
        phone = Client(server.ws_url, server.issue_token("alice", "alice-phone"), {"type": "mobile"})
        await phone.connect()
        await phone.state_patch("user/big", {"a": "x" * 300})
        await phone.close()
    limits = {"state_max_doc_bytes": 200, "state_max_user_bytes": 400}
    async with running_server(store="sqlite", data_dir=data_dir, **limits) as server:
        phone = Client(server.ws_url, server.issue_token("alice", "alice-phone"), {"type": "mobile"})
        await phone.connect()
        # a tiny patch on a document already over the limit that grows it: refused, naming limit and size
        with pytest.raises(ClientError) as caught:
            await phone.state_patch("user/big", {"b": 1})
        assert caught.value.code == "too_large"
        assert "state_max_doc_bytes" in caught.value.message and "200" in caught.value.message
        # a patch that shrinks it is accepted, even though the result is still over the limit
        shrunk = await phone.state_patch("user/big", {"a": "x" * 250})
        assert shrunk.rev == 2
        small = await phone.state_patch("user/small", {"s": "y" * 100})
        assert small.rev == 1
        with pytest.raises(ClientError) as caught:
            await phone.state_patch("user/small", {"t": "z" * 80})  # 44 bytes of patch, the user total too big
        assert caught.value.code == "too_large" and "state_max_user_bytes" in caught.value.message
        assert (await phone.state_get("user/small")).rev == 1
        await phone.close()


async def test_device_documents_are_written_only_by_their_device(connect):
    phone = await connect("alice", "alice-phone")
    desktop = await connect("alice", "alice-desktop")
    await phone.state_patch("device/alice-phone/battery", {"level": 80})
    assert (await desktop.state_get("device/alice-phone/battery")).value == {"level": 80}
    for doc in ("device/alice-phone/battery", "live/alice-phone/cursor"):
        with pytest.raises(ClientError) as caught:
            await desktop.state_patch(doc, {"level": 1})
        assert caught.value.code == "forbidden"
    assert (await phone.state_get("device/alice-phone/battery")).rev == 1


async def test_live_documents_go_away_with_the_connection(connect, server):
    phone = await connect("alice", "alice-phone")
    desktop = await connect("alice", "alice-desktop")
    subscription = await desktop.state_subscribe(prefix="live/")
    ok = await phone.state_patch("live/alice-phone/cursor", {"line": 3})
    assert ok.rev == 1
    change = await subscription.next(5)
    assert (change.rev, change.value) == (1, {"line": 3})
    assert (await desktop.state_get("live/alice-phone/cursor")).value == {"line": 3}
    phone._transport.disconnect()  # dropped, not closed: the session stays resumable, the live document goes
    removed = await subscription.next(5)
    assert (removed.doc, removed.rev, removed.prev_rev, removed.patch, removed.value, removed.by) == (
        "live/alice-phone/cursor", 2, 1, None, None, "alice-phone")
    gone = await desktop.state_get("live/alice-phone/cursor")
    assert (gone.rev, gone.value) == (2, None)
    await phone.reconnected.wait()
    assert (await phone.state_patch("live/alice-phone/cursor", {"line": 4})).rev == 3  # never backwards
    assert (await subscription.next(5)).rev == 3


async def test_a_restart_keeps_revisions_and_forgets_live_documents(tmp_path):
    data_dir = str(tmp_path / "data")
    async with running_server(store="sqlite", data_dir=data_dir) as server:
        phone = Client(server.ws_url, server.issue_token("alice", "alice-phone"), {"type": "mobile"})
        await phone.connect()
        await phone.state_patch("user/kept", {"a": 1})
        await phone.state_patch("user/kept", {"b": 2})
        await phone.state_patch("user/gone", {"x": 1})
        await phone.state_patch("user/gone", None)  # deleted: rev 2, a tombstone
        await phone.state_patch("live/alice-phone/here", {"y": 1})
        await phone.close()
    async with running_server(store="sqlite", data_dir=data_dir) as server:
        phone = Client(server.ws_url, server.issue_token("alice", "alice-phone"), {"type": "mobile"})
        await phone.connect()
        kept = await phone.state_get("user/kept")
        assert (kept.rev, kept.value) == (2, {"a": 1, "b": 2})
        gone = await phone.state_get("user/gone")
        assert (gone.rev, gone.value) == (2, None)
        assert (await phone.state_patch("user/gone", {"again": True})).rev == 3
        live = await phone.state_get("live/alice-phone/here")
        assert (live.rev, live.value) == (0, None)
        await phone.close()


async def test_bad_input_is_refused_and_changes_nothing(server, connect):
    phone = await connect("alice", "alice-phone")
    await phone.state_patch("user/ok", {"a": 1})
    async with websockets.connect(server.ws_url) as ws:
        await ws.send(msgpack.packb({"op": "hello", "token": server.issue_token("alice", "alice-raw"),
                                     "device": {"type": "cli"}}))
        while msgpack.unpackb(await ws.recv())["op"] != "welcome":
            pass
        cases = [
            ({"op": "state.patch", "id": 1, "doc": "user/ok", "patch": {"a": float("nan")}}, "bad_request"),
            ({"op": "state.patch", "id": 2, "doc": "device/alice-phone", "patch": {}}, "bad_request"),
            ({"op": "state.patch", "id": 3, "doc": "user/ok"}, "bad_request"),
            ({"op": "state.patch", "id": 4, "doc": "nowhere/x", "patch": {}}, "bad_request"),
            ({"op": "state.patch", "id": 5, "doc": "user/", "patch": {}}, "bad_request"),
            ({"op": "state.patch", "id": 6, "doc": "user/ok", "patch": {}, "if_rev": -1}, "bad_request"),
            ({"op": "state.patch", "id": 7, "doc": "user/" + "x" * 300, "patch": {}}, "too_large"),
            ({"op": "state.patch", "id": 8, "doc": "live/alice-phone/x", "patch": {}}, "forbidden"),
            ({"op": "state.get", "id": 9, "doc": 5}, "bad_request"),
            ({"op": "state.subscribe", "id": 10, "prefix": "user/", "since": 3}, "bad_request"),
            ({"op": "state.subscribe", "id": 11, "doc": "user/ok", "since": "x"}, "bad_request"),
            ({"op": "state.patch", "id": 12, "doc": "user/ok", "patch": {"a": 2}, "if_rev": 9}, "conflict"),
        ]
        for envelope, code in cases:
            await ws.send(msgpack.packb(envelope, use_bin_type=True))
            while True:
                answer = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 5), raw=False, strict_map_key=False)
                if answer["op"] != "presence":
                    break
            assert (answer["op"], answer["code"], answer.get("id")) == ("error", code, envelope["id"]), answer
        assert answer["rev"] == 1 and answer["value"] == {"a": 1}
    ok = await phone.state_get("user/ok")
    assert (ok.rev, ok.value) == (1, {"a": 1})


async def test_unsubscribe_and_disconnect_end_subscriptions(connect, server):
    phone = await connect("alice", "alice-phone")
    desktop = await connect("alice", "alice-desktop")
    subscription = await desktop.state_subscribe("user/u")
    assert (await subscription.next(5)).rev == 0
    other = await desktop.state_subscribe(prefix="user/o")
    await subscription.close()  # state.unsubscribe
    await phone.state_patch("user/u", {"a": 1})
    await phone.state_patch("user/o1", {"b": 1})
    assert (await other.next(5)).doc == "user/o1"  # the patch of user/u was not sent to the desktop
    registered = server.node.state.subscriptions["alice"]
    assert [key for subs in registered.values() for key in subs] == [("prefix", "user/o")]
    await desktop.close()
    assert "alice" not in server.node.state.subscriptions


@pytest.mark.timeout(60)
async def test_every_acknowledged_patch_survives_kill_9():
    with data_directory() as data_dir:
        token = issue_token(data_dir, "alice", "alice-phone")
        server = ServerProcess(data_dir)
        try:
            await server.start()
            phone = Client(server.ws_url, token, {"type": "mobile"}, reconnect=False)
            await phone.connect()
            for i in range(1, 21):
                ok = await phone.state_patch("user/durable", {"n": i, f"k{i % 3}": i})
            assert ok.rev == 20
            server.kill()  # SIGKILL right after the last state.ok
            await phone.close()
            await server.start()
            phone = Client(server.ws_url, token, {"type": "mobile"}, reconnect=False)
            await phone.connect()
            kept = await phone.state_get("user/durable")
            assert (kept.rev, kept.value) == (20, {"n": 20, "k0": 18, "k1": 19, "k2": 20})
            assert (await phone.state_patch("user/durable", {"n": 21})).rev == 21
            await phone.close()
        except BaseException:
            print(server.logs())
            raise
        finally:
            server.kill()


async def test_a_live_document_of_a_silent_connection_goes_within_the_heartbeat_timeout():
    # The phone answers no ping, and the server drops it two heartbeats after it went quiet: its hello and
    # patch must be done by then. A 1 s heartbeat gives them 2 s, also on a loaded machine.
    async with running_server(heartbeat=1.0) as server:
        desktop = Client(server.ws_url, server.issue_token("alice", "alice-desktop"), {"type": "desktop"})
        await desktop.connect()
        subscription = await desktop.state_subscribe("live/alice-phone/cursor")
        transport, listener = await picows.ws_connect(_Collector, server.ws_url, enable_auto_pong=False)
        hello = {"op": "hello", "token": server.issue_token("alice", "alice-phone"), "device": {"type": "mobile"}}
        transport.send(picows.WSMsgType.TEXT, json.dumps(hello).encode())
        assert (await listener.next())["op"] == "welcome"
        assert (await subscription.next(5)).rev == 0  # the catch-up: the document does not exist yet
        patch = {"op": "state.patch", "id": "p1", "doc": "live/alice-phone/cursor", "patch": {"line": 3}}
        transport.send(picows.WSMsgType.TEXT, json.dumps(patch).encode())
        assert (await listener.next())["op"] == "state.ok"
        assert (await subscription.next(5)).value == {"line": 3}
        # The phone's socket stays open but it answers no ping: the server gives up after 2 x heartbeat
        # (2 s here), and the document goes with the connection. Nothing else would remove it.
        removed = await subscription.next(10)
        assert (removed.rev, removed.value, removed.by) == (2, None, "alice-phone")
        transport.disconnect()
        await desktop.close()
