"""Ids that start with ``-`` on the command line: every command that takes a user, device, session or
dead letter id takes them as they are, and after ``--`` those that spell one of the command's options.

``-dash`` is a valid device id, and about one session id in 64 starts with ``-`` (they come from
``secrets.token_urlsafe``), so an operator copying one from ``rccs sessions list`` must not be told that
an argument is missing. Run in-process through ``rccs.cli.main`` against a SQLite store; argparse reads
the same command line there as in a real ``rccs`` process.
"""

import json
import os

import msgpack
import pytest
from clistore import now_ms, with_store

from rccs import admin, cli
from rccs.store import QueuedMessage, SessionRecord


@pytest.fixture(autouse=True)
def no_rccs_environment(monkeypatch):
    """Settings from the developer's environment must not leak into these runs."""
    for name in list(os.environ):
        if name.startswith("RCCS_") and name != "RCCS_PUREPYTHON":
            monkeypatch.delenv(name)


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "data")


@pytest.fixture
def rccs(capsys, data_dir):
    """``rccs("devices", "revoke", "-dash")`` -> (exit code, stdout, stderr), with ``--data-dir`` appended:
    after the ids, where plain argparse had already refused them."""

    def run(*args):
        code = cli.main([*args, "--data-dir", data_dir])
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def succeeded(result):
    code, out, err = result
    assert code == 0, err
    assert err == ""
    return out


@pytest.fixture
def dash_user(rccs, data_dir):
    """User ``-u`` with device ``-dash``, both made by the command line."""
    out = succeeded(rccs("users", "add", "-u", "--device", "-dash", "--type", "mobile"))
    assert "added user -u" in out and "added device -dash (type mobile)" in out
    return data_dir


def test_user_and_device_commands_take_ids_starting_with_a_dash(rccs, dash_user):
    data_dir = dash_user
    assert "pairing code: " in succeeded(rccs("users", "pair", "-u"))
    assert json.loads(succeeded(rccs("users", "list", "--json")))[0]["id"] == "-u"
    listed = json.loads(succeeded(rccs("devices", "list", "--user", "-u", "--json")))
    assert [device["id"] for device in listed] == ["-dash"]
    # A name may start with '-' too.
    assert succeeded(rccs("devices", "rename", "-dash", "-kitchen")) == "renamed device -dash to '-kitchen'\n"
    assert with_store(data_dir, lambda store: store.get_device("-dash")).name == "-kitchen"
    token = succeeded(rccs("token", "issue", "--user", "-u", "--device", "-token-device")).strip()
    assert token.count(".") == 2  # a JWT
    assert with_store(data_dir, lambda store: store.get_device("-token-device")).user == "-u"

    assert succeeded(rccs("devices", "revoke", "-dash")).startswith("revoked device -dash of user -u")
    assert with_store(data_dir, lambda store: store.get_device("-dash")).revoked_at is not None
    assert succeeded(rccs("users", "remove", "-u")).startswith("removed user -u: 1 device(s) revoked")
    assert with_store(data_dir, lambda store: store.get_user("-u")) is None


def test_session_commands_take_ids_starting_with_one_or_two_dashes(rccs, dash_user):
    data_dir = dash_user
    now = now_ms()
    sessions = [SessionRecord(id=session_id, user="-u", device="-dash", created=now, expires_at=now + 3_600_000)
                for session_id in ("-abc", "--xyz")]
    with_store(data_dir, lambda store: store.put_sessions(sessions))

    listed = json.loads(succeeded(rccs("sessions", "list", "--user", "-u", "--device", "-dash", "--json")))
    assert sorted(session["session"] for session in listed) == ["--xyz", "-abc"]
    for session_id in ("-abc", "--xyz"):
        out = succeeded(rccs("sessions", "revoke", session_id))
        assert out == f"revoked session {session_id} of device -dash (user -u)\n"
        assert with_store(data_dir, lambda store, sid=session_id: store.get_session(sid)).revoked_at is not None


def test_inbox_and_dead_letter_commands_take_ids_starting_with_a_dash(rccs, dash_user):
    data_dir = dash_user

    async def queue_three_and_kill_two(store):
        messages = [QueuedMessage(device="-dash", user="-u", sender_device="-sender", msg_id=f"m-{n}", type="note",
                                  body=msgpack.packb(n), ts=now_ms(), priority=1, receipt=True) for n in range(3)]
        stored = (await store.enqueue(messages, 100, 1 << 20, "reject")).stored
        await store.dead_letter([message.id for message in stored[:2]], "undeliverable", now_ms())

    with_store(data_dir, queue_three_and_kill_two)
    listed = json.loads(succeeded(rccs("inbox", "list", "-dash", "--json")))
    assert (listed["device"], listed["count"]) == ("-dash", 1)
    dead = json.loads(succeeded(rccs("deadletters", "list", "--user", "-u", "--device", "-dash", "--json")))
    assert [letter["msg_id"] for letter in dead] == ["m-0", "m-1"]

    assert succeeded(rccs("deadletters", "redrive", "--device", "-dash")).startswith(
        "redriven 2 dead letter(s) back to their inboxes, attempts reset: -dash (2)")
    assert succeeded(rccs("inbox", "purge", "-dash")).startswith("purged 3 message(s) from the inbox of device -dash")
    with_store(data_dir, queue_three_and_kill_two)
    assert succeeded(rccs("deadletters", "purge", "--device=-dash")) == "purged 2 dead letter(s) of device -dash\n"
    assert with_store(data_dir, lambda store: store.dead_letters(limit=100)) == []


def test_ids_that_spell_an_option_go_after_a_double_dash(capsys, data_dir):
    def run(*argv):
        code = cli.main(list(argv))
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    # '-h' is a valid device id, and also the command's --help: given as it is, it asks for the help.
    async def register(store):
        await admin.add_user_with_device(store, "alice", device_id="-h", device_type="mobile", now=now_ms())
        await admin.create_device(store, "alice", device_id="-dash", device_type="desktop", now=now_ms())

    with_store(data_dir, register)
    with pytest.raises(SystemExit) as help_shown:
        run("devices", "revoke", "-h", "--data-dir", data_dir)
    assert help_shown.value.code == 0 and "usage: rccs devices revoke" in capsys.readouterr().out

    assert succeeded(run("devices", "revoke", "--data-dir", data_dir, "--", "-h")).startswith("revoked device -h ")
    assert succeeded(run("devices", "revoke", "--data-dir", data_dir, "--", "-dash")).startswith(
        "revoked device -dash ")
    # Option values: '--device=ID' always works, whatever the id looks like.
    listed = json.loads(succeeded(run("sessions", "list", "--device=-h", "--json", "--data-dir", data_dir)))
    assert listed == []


def test_a_mistyped_option_is_still_refused(rccs, dash_user, capsys):
    with pytest.raises(SystemExit) as refused:  # argparse's own refusal: usage, then the error, status 2
        rccs("devices", "revoke", "-dash", "--jsno")
    assert refused.value.code == 2
    assert "unrecognized arguments: --jsno" in capsys.readouterr().err
    assert with_store(dash_user, lambda store: store.get_device("-dash")).revoked_at is None
