"""The durable delivery commands (``rccs inbox list|purge``, ``rccs deadletters list|redrive|purge``),
run in-process through ``rccs.cli.main`` against a SQLite store in a temporary data dir.

Messages are put into the store directly (``enqueue``, ``dead_letter``); every refused command is
checked to leave the inboxes and dead letters exactly as they were. The last test runs a server on
the same data dir to show that a redriven message reaches its device when it connects.
"""

import asyncio
import json
import os
import re

import msgpack
import pytest
from clistore import now_ms, with_store

from rccs import admin, cli
from rccs.client import Client
from rccs.store import QueuedMessage
from rccs.testing import running_server

HOUR_MS = 3_600_000


@pytest.fixture(autouse=True)
def no_rccs_environment(monkeypatch):
    """Settings from the developer's environment must not leak into these runs."""
    for name in list(os.environ):
        if name.startswith("RCCS_"):
            monkeypatch.delenv(name)


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "data")


@pytest.fixture
def rccs(capsys, data_dir):
    """``rccs("inbox", "list", "alice-phone")`` -> (exit code, stdout, stderr), with ``--data-dir`` appended."""

    def run(*args):
        code = cli.main([*args, "--data-dir", data_dir])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def queued(device, msg_id, *, user="alice", sender="alice-desktop", type="note", body=None, priority=1,
           expires_at=None, ts=None):
    packed = msgpack.packb({"n": msg_id} if body is None else body, use_bin_type=True)
    return QueuedMessage(device=device, user=user, sender_device=sender, msg_id=msg_id, type=type, body=packed,
                         ts=now_ms() - 60_000 if ts is None else ts, priority=priority, expires_at=expires_at,
                         receipt=True)


def enqueue(data_dir, *messages):
    """Store the messages; returns their inbox ids in the order given."""
    outcome = with_store(data_dir, lambda store: store.enqueue(messages, 10_000, 64 << 20, "reject"))
    assert outcome.rejected == [] and outcome.dropped == []
    return [message.id for message in outcome.stored]


def dead_letter(data_dir, ids, reason="undeliverable", at=None):
    at = now_ms() if at is None else at
    moved = with_store(data_dir, lambda store: store.dead_letter(ids, reason, at))
    assert len(moved) == len(ids)


def count_attempts(data_dir, ids, times):
    for _ in range(times):
        with_store(data_dir, lambda store: store.count_attempts(ids))


def inbox_ids(data_dir, device):
    return [message.id for message in with_store(data_dir, lambda store: store.inbox(device, 0, 100_000))]


def dead_ids(data_dir, device=None):
    letters = with_store(data_dir, lambda store: store.dead_letters(device_id=device, limit=100_000))
    return [letter.message.id for letter in letters]


def snapshot(data_dir):
    """Every inbox and dead letter (with its counts), to compare before and after a refused command."""

    async def read(store):
        devices = await store.list_devices(include_revoked=True)
        inboxes = {device.id: (await store.inbox(device.id, 0, 100_000), await store.inbox_size(device.id))
                   for device in devices}
        return inboxes, await store.dead_letters(limit=100_000)

    return with_store(data_dir, read)


def table(output):
    """Rows of an aligned table as lists of cells, split at the header's column starts (other lines dropped)."""
    lines = output.rstrip("\n").split("\n")
    starts = [match.start() for match in re.finditer(r"(?:(?<=  )|^)\S", lines[0])]
    ends = [*starts[1:], None]
    rows = [line for line in lines if not line.startswith(("total:", "("))]
    return [[line[start:end].strip() for start, end in zip(starts, ends, strict=True)] for line in rows]


def refused(rccs, data_dir, args, message):
    """Run a command that must fail with exit code 2 and ``message``, changing no inbox or dead letter."""
    before = snapshot(data_dir)
    code, out, err = rccs(*args)
    assert code == 2, (out, err)
    assert err.startswith("rccs: error: ")
    assert message in err, err
    assert out == ""
    assert snapshot(data_dir) == before
    return err


@pytest.fixture
def registry(data_dir):
    """alice with alice-phone and alice-desktop, bob with bob-laptop; no messages yet."""

    async def build(store):
        now = now_ms()
        await admin.add_user_with_device(store, "alice", device_id="alice-phone", device_type="mobile", now=now)
        await admin.create_device(store, "alice", device_id="alice-desktop", device_type="desktop", now=now)
        await admin.add_user_with_device(store, "bob", device_id="bob-laptop", device_type="desktop", now=now)

    with_store(data_dir, build)


@pytest.fixture
def dead(data_dir, registry):
    """Dead letters: two of alice-phone (ids in ``phone``), one of bob-laptop; alice-phone also has one live
    inbox message (``kept``). Returns a dict of the ids."""
    ids = enqueue(data_dir,
                  queued("alice-phone", "d-1", type="task_start", priority=3),
                  queued("alice-phone", "d-2"),
                  queued("bob-laptop", "d-3", user="bob", sender="bob-phone"),
                  queued("alice-phone", "kept"))
    count_attempts(data_dir, ids[:3], 5)
    dead_letter(data_dir, ids[:3])
    return {"phone": ids[:2], "bob": ids[2], "kept": ids[3]}


# ---- inbox list ----------------------------------------------------------------


def test_inbox_list_shows_the_messages_in_delivery_order_and_the_total(rccs, data_dir, registry):
    expires = now_ms() + HOUR_MS
    ids = enqueue(data_dir,
                  queued("alice-phone", "m-low", priority=0),
                  queued("alice-phone", "m-normal-1", type="task_start", expires_at=expires),
                  queued("alice-phone", 42, priority=4, sender="alice-laptop"),
                  queued("alice-phone", "m-normal-2"),
                  queued("alice-desktop", "elsewhere"))
    count_attempts(data_dir, [ids[1]], 2)

    code, out, err = rccs("inbox", "list", "alice-phone")
    assert (code, err) == (0, "")
    rows = table(out)
    assert rows[0] == ["ID", "PRIORITY", "FROM", "MSG ID", "TYPE", "SIZE", "ATTEMPTS", "QUEUED", "EXPIRES"]
    assert [(row[0], row[1], row[2], row[3], row[4], row[6]) for row in rows[1:]] == [
        (str(ids[2]), "EMERGENCY", "alice-laptop", "42", "note", "0"),
        (str(ids[1]), "NORMAL", "alice-desktop", "m-normal-1", "task_start", "2"),
        (str(ids[3]), "NORMAL", "alice-desktop", "m-normal-2", "note", "0"),
        (str(ids[0]), "LOW", "alice-desktop", "m-low", "note", "0"),
    ]
    messages = with_store(data_dir, lambda store: store.inbox("alice-phone", 0))
    assert [row[5] for row in rows[1:]] == [str(message.size) for message in messages]
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", rows[1][7])
    assert rows[1][8] == "-" and re.fullmatch(r"\d{4}-.*Z", rows[2][8])
    count, size = with_store(data_dir, lambda store: store.inbox_size("alice-phone"))
    assert out.splitlines()[-1] == f"total: {count} message(s), {size} bytes"
    assert count == 4 and size == sum(message.size for message in messages)


def test_inbox_list_json_decodes_the_bodies(rccs, data_dir, registry):
    body = {"task": "build", "blob": b"\x00\x01\xff", "nested": [1, 2.5, None, True], 7: "int key"}
    ids = enqueue(data_dir,
                  queued("alice-phone", "m-1", body=body, priority=2, expires_at=now_ms() + HOUR_MS),
                  queued("alice-phone", 9, body="plain"))
    broken = queued("alice-phone", "broken")
    broken.body = b"\xc1"  # never valid msgpack
    ids += enqueue(data_dir, broken)

    code, out, err = rccs("inbox", "list", "alice-phone", "--json")
    assert (code, err) == (0, "")
    listing = json.loads(out)
    count, size = with_store(data_dir, lambda store: store.inbox_size("alice-phone"))
    assert (listing["device"], listing["count"], listing["bytes"]) == ("alice-phone", count, size)
    first, second, third = listing["messages"]
    stored = with_store(data_dir, lambda store: store.inbox("alice-phone", 0))[0]
    assert first == {
        "id": ids[0], "device": "alice-phone", "user": "alice", "from": "alice-desktop", "msg_id": "m-1",
        "type": "note", "priority": 2, "priority_name": "HIGH", "size": stored.size, "attempts": 0,
        "receipt": True, "queued_at": stored.ts, "expires_at": stored.expires_at,
        "body": {"task": "build", "blob": "AAH/", "nested": [1, 2.5, None, True], "7": "int key"},
    }
    assert (second["msg_id"], second["body"], second["priority_name"]) == (9, "plain", "NORMAL")
    assert third["msg_id"] == "broken" and third["body"] is None
    assert "not valid msgpack" in third["body_error"]


def test_inbox_list_json_names_a_body_without_a_json_form(rccs, data_dir, registry):
    meeting_keys = queued("alice-phone", "keys")
    meeting_keys.body = bytes.fromhex("8201a161a131a162")  # {1: "a", "1": "b"}: both keys are "1" in JSON
    enqueue(data_dir, meeting_keys)
    code, out, err = rccs("inbox", "list", "alice-phone", "--json")
    assert (code, err) == (0, "")
    (listed,) = json.loads(out)["messages"]
    assert listed["body"] is None
    assert "has no JSON form" in listed["body_error"]


def test_inbox_list_leaves_out_expired_messages_but_counts_them(rccs, data_dir, registry):
    enqueue(data_dir, queued("alice-phone", "old", expires_at=now_ms() - 1000), queued("alice-phone", "fresh"))
    code, out, _ = rccs("inbox", "list", "alice-phone")
    assert code == 0
    assert [row[3] for row in table(out)[1:]] == ["fresh"]
    assert "total: 2 message(s)" in out
    assert "(1 expired message(s) not listed" in out

    listing = json.loads(rccs("inbox", "list", "alice-phone", "--json")[1])
    assert listing["count"] == 2 and [m["msg_id"] for m in listing["messages"]] == ["fresh"]


def test_inbox_list_limit_says_when_there_is_more(rccs, data_dir, registry):
    enqueue(data_dir, *(queued("alice-phone", f"m-{n}") for n in range(5)))
    code, out, _ = rccs("inbox", "list", "alice-phone", "--limit", "3")
    assert code == 0
    assert [row[3] for row in table(out)[1:]] == ["m-0", "m-1", "m-2"]
    assert "total: 5 message(s)" in out
    assert "only the first 3 messages in delivery order are listed" in out
    assert "expired" not in out
    assert "only the first" not in rccs("inbox", "list", "alice-phone", "--limit", "5")[1]
    assert len(json.loads(rccs("inbox", "list", "alice-phone", "--limit", "2", "--json")[1])["messages"]) == 2
    refused(rccs, data_dir, ["inbox", "list", "alice-phone", "--limit", "0"], "--limit must be at least 1")


def test_inbox_list_of_an_empty_or_revoked_inbox(rccs, data_dir, registry):
    code, out, err = rccs("inbox", "list", "alice-phone")
    assert (code, err) == (0, "")
    assert out == "no queued messages for device alice-phone\ntotal: 0 message(s), 0 bytes\n"
    assert json.loads(rccs("inbox", "list", "alice-phone", "--json")[1]) == {
        "device": "alice-phone", "count": 0, "bytes": 0, "messages": []}
    assert rccs("devices", "revoke", "bob-laptop")[0] == 0
    assert rccs("inbox", "list", "bob-laptop")[0] == 0  # a revoked device is still known


# ---- inbox purge -----------------------------------------------------------------


def test_inbox_purge_deletes_one_inbox_and_says_the_senders_are_not_told(rccs, data_dir, dead):
    enqueue(data_dir, queued("alice-phone", "more"), queued("alice-desktop", "other"))
    dead_before = dead_ids(data_dir)

    code, out, err = rccs("inbox", "purge", "alice-phone")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "purged 2 message(s) from the inbox of device alice-phone"
    assert "senders are NOT told" in out
    assert inbox_ids(data_dir, "alice-phone") == []
    assert with_store(data_dir, lambda store: store.inbox_size("alice-phone")) == (0, 0)
    assert len(inbox_ids(data_dir, "alice-desktop")) == 1
    assert dead_ids(data_dir) == dead_before  # dead letters are purged separately

    code, out, _ = rccs("inbox", "purge", "alice-phone")
    assert (code, out) == (0, "purged 0 message(s) from the inbox of device alice-phone\n")


# ---- deadletters list --------------------------------------------------------------


def test_deadletters_list_shows_reason_and_time(rccs, data_dir, dead):
    code, out, err = rccs("deadletters", "list")
    assert (code, err) == (0, "")
    rows = table(out)
    assert rows[0] == ["ID", "DEVICE", "FROM", "MSG ID", "TYPE", "PRIORITY", "SIZE", "ATTEMPTS", "REASON",
                       "DEAD SINCE"]
    assert [(row[0], row[1], row[2], row[3], row[4], row[5], row[7], row[8]) for row in rows[1:]] == [
        (str(dead["phone"][0]), "alice-phone", "alice-desktop", "d-1", "task_start", "URGENT", "5", "undeliverable"),
        (str(dead["phone"][1]), "alice-phone", "alice-desktop", "d-2", "note", "NORMAL", "5", "undeliverable"),
        (str(dead["bob"]), "bob-laptop", "bob-phone", "d-3", "note", "NORMAL", "5", "undeliverable"),
    ]
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", row[9]) for row in rows[1:])


def test_deadletters_list_filters_and_json(rccs, data_dir, dead):
    code, out, _ = rccs("deadletters", "list", "--user", "bob", "--json")
    assert code == 0
    [letter] = json.loads(out)
    stored = with_store(data_dir, lambda store: store.dead_letters(user_id="bob"))[0]
    assert letter == {
        "id": dead["bob"], "device": "bob-laptop", "user": "bob", "from": "bob-phone", "msg_id": "d-3",
        "type": "note", "priority": 1, "priority_name": "NORMAL", "size": stored.message.size, "attempts": 5,
        "receipt": True, "queued_at": stored.message.ts, "expires_at": None, "body": {"n": "d-3"},
        "reason": "undeliverable", "dead_at": stored.at,
    }
    listed = json.loads(rccs("deadletters", "list", "--device", "alice-phone", "--json")[1])
    assert [view["id"] for view in listed] == dead["phone"]
    assert json.loads(rccs("deadletters", "list", "--user", "alice", "--device", "bob-laptop", "--json")[1]) == []
    assert rccs("deadletters", "list", "--device", "alice-desktop")[1] == "no dead letters\n"

    code, out, _ = rccs("deadletters", "list", "--limit", "1")
    assert [row[0] for row in table(out)[1:]] == [str(dead["phone"][0])]
    assert "only the first 1 dead letters, oldest first, are listed" in out


def test_deadletters_list_of_a_removed_user(rccs, data_dir, dead):
    assert rccs("users", "remove", "bob")[0] == 0
    code, out, _ = rccs("deadletters", "list", "--user", "bob", "--json")
    assert code == 0
    assert [view["id"] for view in json.loads(out)] == [dead["bob"]]


# ---- deadletters redrive -------------------------------------------------------------


def test_redrive_by_id_moves_them_back_with_attempts_reset(rccs, data_dir, dead):
    code, out, err = rccs("deadletters", "redrive", str(dead["phone"][1]), str(dead["bob"]))
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == ("redriven 2 dead letter(s) back to their inboxes, attempts reset: "
                        "alice-phone (1), bob-laptop (1)")
    assert "when it next connects" in lines[1]
    assert "expired" not in out

    assert dead_ids(data_dir) == [dead["phone"][0]]
    phone = with_store(data_dir, lambda store: store.inbox("alice-phone", 0))
    assert [(m.id, m.msg_id, m.attempts) for m in phone] == [(dead["phone"][1], "d-2", 0), (dead["kept"], "kept", 0)]
    bob = with_store(data_dir, lambda store: store.inbox("bob-laptop", 0))
    assert [(m.id, m.attempts, m.sender_device) for m in bob] == [(dead["bob"], 0, "bob-phone")]


def test_redrive_by_device_moves_all_of_its_dead_letters(rccs, data_dir, dead):
    code, out, err = rccs("deadletters", "redrive", "--device", "alice-phone")
    assert (code, err) == (0, "")
    assert out.splitlines()[0] == "redriven 2 dead letter(s) back to their inboxes, attempts reset: alice-phone (2)"
    assert dead_ids(data_dir) == [dead["bob"]]
    assert inbox_ids(data_dir, "alice-phone") == [dead["phone"][0], dead["phone"][1], dead["kept"]]  # URGENT first

    code, out, _ = rccs("deadletters", "redrive", "--device", "alice-phone")
    assert (code, out) == (0, "redriven 0 dead letters: device alice-phone has none\n")


def test_redrive_says_which_messages_expired_meanwhile(rccs, data_dir, registry):
    ids = enqueue(data_dir, queued("alice-phone", "late", expires_at=now_ms() - 1000), queued("alice-phone", "ok"))
    dead_letter(data_dir, ids)
    code, out, _ = rccs("deadletters", "redrive", str(ids[0]), str(ids[1]), str(ids[0]))  # a repeat counts once
    assert code == 0
    assert "redriven 2 dead letter(s)" in out
    assert "1 of them expired already" in out


def test_redrive_is_all_or_nothing(rccs, data_dir, dead):
    refused(rccs, data_dir, ["deadletters", "redrive", str(dead["phone"][0]), "9999"], "no dead letter with id 9999")
    # an inbox message is not a dead letter
    refused(rccs, data_dir, ["deadletters", "redrive", str(dead["kept"])], f"no dead letter with id {dead['kept']}")
    refused(rccs, data_dir, ["deadletters", "redrive"], "give either dead letter ids or --device")
    refused(rccs, data_dir, ["deadletters", "redrive", str(dead["bob"]), "--device", "bob-laptop"],
            "give either dead letter ids or --device")
    refused(rccs, data_dir, ["deadletters", "redrive", "--device", "nobody"], "unknown device 'nobody'")


def test_redrive_refuses_dead_letters_of_revoked_devices(rccs, data_dir, dead):
    assert rccs("devices", "revoke", "bob-laptop")[0] == 0
    refused(rccs, data_dir, ["deadletters", "redrive", "--device", "bob-laptop"],
            "device 'bob-laptop' is revoked")
    refused(rccs, data_dir, ["deadletters", "redrive", str(dead["phone"][0]), str(dead["bob"])],
            f"dead letter {dead['bob']} is for device 'bob-laptop', which is revoked")
    assert rccs("deadletters", "redrive", str(dead["phone"][0]))[0] == 0


def test_redrive_ids_must_be_integers(rccs, data_dir, dead, capsys):
    before = snapshot(data_dir)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["deadletters", "redrive", "d-1", "--data-dir", data_dir])
    assert exit_info.value.code == 2
    assert "invalid int value: 'd-1'" in capsys.readouterr().err
    assert snapshot(data_dir) == before


# ---- deadletters purge ---------------------------------------------------------------


def test_deadletters_purge_deletes_one_devices_dead_letters(rccs, data_dir, dead):
    code, out, err = rccs("deadletters", "purge", "--device", "alice-phone")
    assert (code, err, out) == (0, "", "purged 2 dead letter(s) of device alice-phone\n")
    assert dead_ids(data_dir) == [dead["bob"]]
    assert inbox_ids(data_dir, "alice-phone") == [dead["kept"]]  # the inbox is untouched
    code, out, _ = rccs("deadletters", "purge", "--device", "alice-phone")
    assert (code, out) == (0, "purged 0 dead letter(s) of device alice-phone\n")


def test_deadletters_purge_needs_a_device(data_dir, dead, capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["deadletters", "purge", "--data-dir", data_dir])
    assert exit_info.value.code == 2
    assert "--device" in capsys.readouterr().err


# ---- bad input shared by every command ------------------------------------------------


@pytest.mark.parametrize("args", [
    ["inbox", "list", "{device}"], ["inbox", "list", "{device}", "--json"], ["inbox", "purge", "{device}"],
    ["deadletters", "list", "--device", "{device}"], ["deadletters", "redrive", "--device", "{device}"],
    ["deadletters", "purge", "--device", "{device}"],
])
def test_unknown_and_invalid_devices_are_refused(rccs, data_dir, dead, args):
    refused(rccs, data_dir, [arg.format(device="nobody") for arg in args], "unknown device 'nobody'")
    refused(rccs, data_dir, [arg.format(device="no body") for arg in args], "invalid device id 'no body'")


def test_unknown_users_are_refused(rccs, data_dir, dead):
    refused(rccs, data_dir, ["deadletters", "list", "--user", "carol"], "unknown user 'carol'")
    refused(rccs, data_dir, ["deadletters", "list", "--user", "ca rol"], "invalid user id 'ca rol'")


@pytest.mark.parametrize("args", [
    ["inbox", "list", "d"], ["inbox", "purge", "d"], ["deadletters", "list"], ["deadletters", "redrive", "1"],
    ["deadletters", "purge", "--device", "d"],
])
def test_commands_need_an_existing_store(rccs, data_dir, args):
    code, out, err = rccs(*args)
    assert (code, out) == (2, "")
    assert f"rccs: error: no store at {os.path.join(data_dir, 'rccs.db')}" in err
    assert not os.path.exists(data_dir)


def test_commands_refuse_the_memory_store(rccs, data_dir, dead, monkeypatch):
    monkeypatch.setenv("RCCS_STORE", "memory")
    refused(rccs, data_dir, ["inbox", "list", "alice-phone"], "setting 'store' is 'memory'")
    refused(rccs, data_dir, ["deadletters", "redrive", "--device", "alice-phone"], "setting 'store' is 'memory'")


# ---- with a server running on the data dir ----------------------------------------------


async def test_a_redriven_message_reaches_its_device_when_it_connects(data_dir, dead, capsys):
    async with running_server(data_dir=data_dir) as server:
        # The CLI runs its own event loop, so it gets a thread while the server runs in this one.
        code = await asyncio.to_thread(cli.main, ["deadletters", "redrive", str(dead["phone"][1]),
                                                  "--data-dir", data_dir])
        assert code == 0, capsys.readouterr()
        async with Client(server.ws_url, server.issue_token("alice", "alice-phone"), {"type": "mobile"}) as phone:
            received = [await phone.next_message(timeout=5) for _ in range(2)]  # acked as they are taken
            assert [(m.id, m.sender, m.body) for m in received] == [
                ("d-2", "alice-desktop", {"n": "d-2"}), ("kept", "alice-desktop", {"n": "kept"})]
            await phone.ping()  # the acks are in
    # The server wrote the acks (removed the messages) before it stopped; one dead letter is left.
    assert await asyncio.to_thread(inbox_ids, data_dir, "alice-phone") == []
    assert await asyncio.to_thread(dead_ids, data_dir, "alice-phone") == [dead["phone"][0]]
