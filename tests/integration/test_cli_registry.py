"""The registry commands (``rccs users|devices|sessions``, and ``token issue`` registering its device),
run in-process through ``rccs.cli.main`` against a SQLite store in a temporary data dir.

Every refused command is checked to leave the store exactly as it was. No server runs here.
"""

import dataclasses
import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime

import pytest
from clistore import now_ms, with_store

from rccs import admin, cli
from rccs.auth import TokenAuthority, load_or_create_secret
from rccs.config import ConfigError
from rccs.credentials import parse_pairing_code, secret_hash
from rccs.store import MemoryStore
from rccs.store.base import CHANGE_DEVICE, CHANGE_SESSION, CHANGE_USER, PendingMessage, SessionRecord
from rccs.testing import child_environment

CODE = re.compile(r"^pairing code: ([0-9A-Z]{4}-[0-9A-Z]{4})$", re.M)
CREDENTIAL = re.compile(r"^credential: (rccs_\S+)$", re.M)


@pytest.fixture(autouse=True)
def no_rccs_environment(monkeypatch):
    """Settings from the developer's environment must not leak into these runs. RCCS_PUREPYTHON is no
    setting: it stays, so that the ``rccs`` processes run the fast path of the suite."""
    for name in list(os.environ):
        if name.startswith("RCCS_") and name != "RCCS_PUREPYTHON":
            monkeypatch.delenv(name)


@pytest.fixture
def data_dir(tmp_path):
    return str(tmp_path / "data")


@pytest.fixture
def rccs(capsys, data_dir):
    """``rccs("users", "add", "alice")`` -> (exit code, stdout, stderr), with ``--data-dir`` appended."""

    def run(*args, data_dir_flag=True):
        argv = [*args, "--data-dir", data_dir] if data_dir_flag else list(args)
        code = cli.main(argv)
        captured = capsys.readouterr()
        return code, captured.out, captured.err

    return run


def snapshot(data_dir):
    """Everything the registry commands can change, to compare before and after a refused command."""

    async def read(store):
        return (
            await store.list_users(),
            await store.list_devices(include_revoked=True),
            await store.list_sessions(),
            await store.last_change(),
        )

    return with_store(data_dir, read)


def device(data_dir, device_id):
    return with_store(data_dir, lambda store: store.get_device(device_id))


def session(data_dir, session_id):
    return with_store(data_dir, lambda store: store.get_session(session_id))


def changes(data_dir, cursor=0):
    return with_store(data_dir, lambda store: store.changes_since(cursor))


def parse_iso(text):
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


def add_sessions(data_dir, *sessions):
    with_store(data_dir, lambda store: store.put_sessions(sessions))


def a_session(session_id, user, device_id, **fields):
    now = now_ms()
    return SessionRecord(id=session_id, user=user, device=device_id, created=now - 60_000,
                         expires_at=now + 3_600_000, **fields)


def table(output):
    """Rows of an aligned table as lists of cells, split at the header's column starts."""
    lines = output.rstrip("\n").split("\n")
    starts = [match.start() for match in re.finditer(r"(?:(?<=  )|^)\S", lines[0])]
    ends = [*starts[1:], None]
    return [[line[start:end].strip() for start, end in zip(starts, ends, strict=True)] for line in lines]


def refused(rccs, data_dir, args, message, before=None):
    """Run a command that must fail with exit code 2 and ``message``, changing nothing in the store."""
    before = snapshot(data_dir) if before is None else before
    code, out, err = rccs(*args)
    assert code == 2, (out, err)
    assert err.startswith("rccs: error: ")
    assert message in err
    assert out == ""
    assert snapshot(data_dir) == before
    return err


@pytest.fixture
def alice(rccs):
    """User alice with device alice-phone (credential returned); user bob with bob-laptop."""
    code, out, _ = rccs("users", "add", "alice", "--device", "alice-phone", "--type", "mobile", "--name", "Phone")
    assert code == 0
    code, _, _ = rccs("users", "add", "bob", "--device", "bob-laptop", "--type", "desktop")
    assert code == 0
    return CREDENTIAL.search(out).group(1)


# ---- users add --------------------------------------------------------------


def test_users_add_prints_a_pairing_code_for_the_first_device(rccs, data_dir):
    started = time.time()
    code, out, err = rccs("users", "add", "alice")
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == "added user alice"
    pairing_code = CODE.search(out).group(1)
    assert f"pairing uri:  rccs:pair?code={pairing_code}" in lines
    expires = parse_iso(re.search(r"^expires: +(\S+)$", out, re.M).group(1))
    assert started + 300 - 2 <= expires <= time.time() + 300 + 1  # the default pairing_code_ttl
    assert "before it expires" in out

    users, devices, sessions, _ = snapshot(data_dir)
    assert [user.id for user in users] == ["alice"]
    assert devices == [] and sessions == []
    code_id, code_secret = parse_pairing_code(pairing_code)
    redeemed = with_store(data_dir, lambda store: store.redeem_pairing_code(code_id, code_secret, now_ms(), 5))
    assert redeemed is not None
    assert (redeemed.user, redeemed.issuer_device, redeemed.approve) == ("alice", None, False)


def test_users_add_takes_the_ttl_and_the_public_url_from_flags_and_config(rccs, data_dir, tmp_path):
    config = tmp_path / "rccs.toml"
    config.write_text(f'[server]\ndata_dir = "{data_dir}"\npublic_url = "wss://rccs.example.org/v1"\n')
    started = time.time()
    code, out, _ = rccs("users", "add", "alice", "--ttl", "90s", "--config", str(config), data_dir_flag=False)
    assert code == 0
    pairing_code = CODE.search(out).group(1)
    assert f"pairing uri:  rccs:pair?code={pairing_code}&server=wss%3A%2F%2Frccs.example.org%2Fv1" in out
    expires = parse_iso(re.search(r"^expires: +(\S+)$", out, re.M).group(1))
    assert started + 90 - 2 <= expires <= time.time() + 90 + 1
    assert [user.id for user in snapshot(data_dir)[0]] == ["alice"]


def test_users_add_with_a_device_prints_its_credential_once(rccs, data_dir):
    code, out, err = rccs("users", "add", "alice", "--device", "alice-phone", "--type", "mobile", "--name", "Phone")
    assert (code, err) == (0, "")
    assert out.splitlines()[:2] == ["added user alice", "added device alice-phone (type mobile)"]
    assert "shown once" in out
    assert "pairing code" not in out
    credential = CREDENTIAL.search(out).group(1)

    stored = device(data_dir, "alice-phone")
    assert (stored.user, stored.type, stored.name, stored.revoked_at) == ("alice", "mobile", "Phone", None)
    assert stored.credential_hash == secret_hash(credential)
    assert credential not in repr(snapshot(data_dir))  # only the hash is kept
    found = with_store(data_dir, lambda store: store.find_device_by_credential(secret_hash(credential)))
    assert found.id == "alice-phone"


def test_users_add_device_type_defaults_to_unknown(rccs, data_dir):
    assert rccs("users", "add", "alice", "--device", "alice-phone")[0] == 0
    stored = device(data_dir, "alice-phone")
    assert (stored.type, stored.name) == ("unknown", "")


def test_users_add_refuses_a_duplicate_and_invalid_ids(rccs, data_dir, alice):
    refused(rccs, data_dir, ["users", "add", "alice"], "user 'alice' already exists")
    refused(rccs, data_dir, ["users", "add", "alice", "--device", "alice-tablet"], "user 'alice' already exists")
    refused(rccs, data_dir, ["users", "add", "al ice"], "invalid user id 'al ice'")
    refused(rccs, data_dir, ["users", "add", "x" * 129], "invalid user id")
    refused(rccs, data_dir, ["users", "add", "carol", "--device", "carol phone"], "invalid device id 'carol phone'")


def test_users_add_with_a_taken_or_revoked_device_id_adds_no_user(rccs, data_dir, alice):
    refused(rccs, data_dir, ["users", "add", "carol", "--device", "bob-laptop"], "device 'bob-laptop' already exists")
    assert rccs("devices", "revoke", "alice-phone")[0] == 0
    refused(rccs, data_dir, ["users", "add", "carol", "--device", "alice-phone"], "revoked device")
    refused(rccs, data_dir, ["users", "add", "carol", "--device", "carol-phone", "--name", "n" * 257],
            "'device.name' is longer than 256")
    refused(rccs, data_dir, ["users", "add", "carol", "--device", "carol-phone", "--type", "t" * 129],
            "'device.type' is longer than 128")
    assert "carol" not in [user.id for user in snapshot(data_dir)[0]]


def test_users_add_refuses_flags_that_do_not_fit_together(rccs, data_dir, alice):
    refused(rccs, data_dir, ["users", "add", "carol", "--type", "mobile"], "--device")
    refused(rccs, data_dir, ["users", "add", "carol", "--device", "carol-phone", "--ttl", "5m"], "--ttl")
    refused(rccs, data_dir, ["users", "add", "carol", "--ttl", "soon"], "invalid duration")


# ---- users pair / list / remove ---------------------------------------------


def test_users_pair_prints_a_new_code_each_time(rccs, data_dir, alice):
    codes = set()
    for _ in range(2):
        code, out, err = rccs("users", "pair", "alice", "--ttl", "2m")
        assert (code, err) == (0, "")
        codes.add(CODE.search(out).group(1))
        expires = parse_iso(re.search(r"^expires: +(\S+)$", out, re.M).group(1))
        assert abs(expires - (time.time() + 120)) < 3
    assert len(codes) == 2
    for pairing_code in codes:
        code_id, code_secret = parse_pairing_code(pairing_code)
        redeemed = with_store(data_dir, lambda store, i=code_id, s=code_secret: store.redeem_pairing_code(
            i, s, now_ms(), 5))
        assert redeemed.user == "alice"


def test_users_pair_refuses_an_unknown_user(rccs, data_dir, alice):
    refused(rccs, data_dir, ["users", "pair", "carol"], "unknown user 'carol'")
    refused(rccs, data_dir, ["users", "pair", "al ice"], "invalid user id")
    refused(rccs, data_dir, ["users", "pair", "alice", "--ttl=0"], "duration must be positive")


def test_users_list_counts_devices(rccs, data_dir, alice):
    assert rccs("users", "add", "carol")[0] == 0
    with_store(data_dir, lambda store: store.update_presence([("alice-phone", "online", now_ms())]))
    assert rccs("users", "add", "dave", "--device", "dave-1")[0] == 0
    assert rccs("devices", "revoke", "dave-1")[0] == 0

    code, out, err = rccs("users", "list")
    assert (code, err) == (0, "")
    rows = table(out)
    assert rows[0] == ["USER", "CREATED", "DEVICES", "ONLINE"]
    assert [(row[0], row[2], row[3]) for row in rows[1:]] == [
        ("alice", "1", "1"), ("bob", "1", "0"), ("carol", "0", "0"), ("dave", "0", "0")]
    assert abs(parse_iso(rows[1][1]) - time.time()) < 60

    code, out, _ = rccs("users", "list", "--json")
    assert code == 0
    views = json.loads(out)
    assert [view["id"] for view in views] == ["alice", "bob", "carol", "dave"]
    assert views[0]["devices"] == 1 and views[0]["online"] == 1
    assert set(views[0]) == {"id", "created", "devices", "online"}
    assert abs(views[0]["created"] - now_ms()) < 60_000


def test_users_list_of_an_empty_store(rccs, data_dir):
    assert rccs("users", "add", "alice")[0] == 0
    assert rccs("users", "remove", "alice")[0] == 0
    assert rccs("users", "list") == (0, "no users\n", "")
    assert rccs("users", "list", "--json") == (0, "[]\n", "")


def test_users_remove_revokes_devices_and_deletes_sessions(rccs, data_dir, alice):
    add_sessions(data_dir, a_session("s-alice", "alice", "alice-phone"), a_session("s-bob", "bob", "bob-laptop"))
    cursor = snapshot(data_dir)[3]
    code, out, err = rccs("users", "remove", "alice")
    assert (code, err) == (0, "")
    assert out == "removed user alice: 1 device(s) revoked, its sessions and pairing codes deleted\n"

    users, devices, sessions, _ = snapshot(data_dir)
    assert [user.id for user in users] == ["bob"]
    phone = next(d for d in devices if d.id == "alice-phone")
    assert phone.revoked_at is not None and phone.credential_hash is None
    assert [s.id for s in sessions] == ["s-bob"]
    fed = {(change.kind, change.key) for change in changes(data_dir, cursor)}
    assert {(CHANGE_USER, "alice"), (CHANGE_DEVICE, "alice-phone")} <= fed

    refused(rccs, data_dir, ["users", "remove", "alice"], "unknown user 'alice'")
    refused(rccs, data_dir, ["users", "remove", "b ob"], "invalid user id")
    # The removed user's device id stays taken, also for a new user of the same name.
    assert rccs("users", "add", "alice")[0] == 0
    refused(rccs, data_dir, ["users", "add", "carol", "--device", "alice-phone"], "revoked device")


# ---- devices ----------------------------------------------------------------


def test_devices_list_shows_aligned_columns_and_filters(rccs, data_dir, alice):
    code, out, err = rccs("devices", "list")
    assert (code, err) == (0, "")
    rows = table(out)
    assert rows[0] == ["DEVICE", "USER", "TYPE", "NAME", "STATUS", "LAST SEEN", "CREATED"]
    assert [row[:5] for row in rows[1:]] == [
        ["alice-phone", "alice", "mobile", "Phone", "offline"],
        ["bob-laptop", "bob", "desktop", "-", "offline"],
    ]
    assert rows[1][5] == "-"
    assert abs(parse_iso(rows[1][6]) - time.time()) < 60

    code, out, _ = rccs("devices", "list", "--user", "bob")
    assert [row[0] for row in table(out)[1:]] == ["bob-laptop"]
    refused(rccs, data_dir, ["devices", "list", "--user", "carol"], "unknown user 'carol'")


def test_devices_list_all_includes_revoked_devices(rccs, data_dir, alice):
    assert rccs("devices", "revoke", "alice-phone")[0] == 0
    code, out, _ = rccs("devices", "list")
    assert [row[0] for row in table(out)[1:]] == ["bob-laptop"]
    code, out, _ = rccs("devices", "list", "--all")
    rows = table(out)
    assert rows[0][-1] == "REVOKED"
    assert [(row[0], row[4]) for row in rows[1:]] == [("alice-phone", "revoked"), ("bob-laptop", "offline")]
    assert abs(parse_iso(rows[1][-1]) - time.time()) < 60 and rows[2][-1] == "-"

    assert rccs("users", "remove", "bob")[0] == 0
    refused(rccs, data_dir, ["devices", "list", "--user", "bob"], "unknown user 'bob'")
    code, out, _ = rccs("devices", "list", "--user", "bob", "--all")
    assert code == 0
    assert [row[0] for row in table(out)[1:]] == ["bob-laptop"]
    assert rccs("devices", "list", "--user", "bob", "--all", "--json")[1] != "[]\n"
    assert rccs("devices", "list") == (0, "no devices\n", "")


def test_devices_list_json_has_the_view_without_the_credential_hash(rccs, data_dir, alice):
    seen = now_ms()
    with_store(data_dir, lambda store: store.update_presence([("alice-phone", "away", seen)]))
    code, out, _ = rccs("devices", "list", "--json", "--user", "alice")
    assert code == 0
    [view] = json.loads(out)
    assert set(view) == {"id", "user", "type", "name", "platform", "version", "capabilities", "metadata",
                         "created", "last_seen", "status", "revoked_at"}
    assert view["id"] == "alice-phone" and view["status"] == "away" and view["last_seen"] == seen
    assert view["capabilities"] == [] and view["metadata"] == {} and view["revoked_at"] is None
    assert "credential" not in out and secret_hash(alice) not in out


def test_device_names_with_control_characters_do_not_break_the_table(rccs, data_dir, alice):
    assert rccs("devices", "rename", "alice-phone", "evil\nname\x1b[2J")[0] == 0
    code, out, _ = rccs("devices", "list")
    assert code == 0
    assert len(out.splitlines()) == 3
    assert "\x1b" not in out
    assert json.loads(rccs("devices", "list", "--json")[1])[0]["name"] == "evil\nname\x1b[2J"


def test_devices_revoke_revokes_the_credential_and_the_sessions(rccs, data_dir, alice):
    add_sessions(data_dir, a_session("s-1", "alice", "alice-phone"), a_session("s-2", "bob", "bob-laptop"))
    cursor = snapshot(data_dir)[3]
    code, out, err = rccs("devices", "revoke", "alice-phone")
    assert (code, err) == (0, "")
    assert out == "revoked device alice-phone of user alice: its credential and sessions no longer work\n"

    phone = device(data_dir, "alice-phone")
    assert phone.revoked_at is not None and phone.credential_hash is None
    assert session(data_dir, "s-1").revoked_at is not None
    assert session(data_dir, "s-2").revoked_at is None
    found = with_store(data_dir, lambda store: store.find_device_by_credential(secret_hash(alice)))
    assert found is None
    fed = {(change.kind, change.key) for change in changes(data_dir, cursor)}
    assert (CHANGE_DEVICE, "alice-phone") in fed  # what a running server picks up

    refused(rccs, data_dir, ["devices", "revoke", "alice-phone"], "device 'alice-phone' is already revoked")
    refused(rccs, data_dir, ["devices", "revoke", "nope"], "unknown device 'nope'")


def test_devices_rename(rccs, data_dir, alice):
    cursor = snapshot(data_dir)[3]
    code, out, err = rccs("devices", "rename", "alice-phone", "Alice's phone")
    assert (code, err, out) == (0, "", "renamed device alice-phone to \"Alice's phone\"\n")
    assert device(data_dir, "alice-phone").name == "Alice's phone"
    assert (CHANGE_DEVICE, "alice-phone") in {(c.kind, c.key) for c in changes(data_dir, cursor)}
    # the credential survives a rename
    assert device(data_dir, "alice-phone").credential_hash == secret_hash(alice)
    assert rccs("devices", "rename", "alice-phone", "n" * 256)[0] == 0
    assert device(data_dir, "alice-phone").name == "n" * 256


def test_devices_rename_refuses_bad_names_and_devices(rccs, data_dir, alice):
    refused(rccs, data_dir, ["devices", "rename", "alice-phone", ""], "must not be empty")
    refused(rccs, data_dir, ["devices", "rename", "alice-phone", "n" * 257], "at most 256 characters")
    refused(rccs, data_dir, ["devices", "rename", "nope", "Phone"], "unknown device 'nope'")
    assert rccs("devices", "revoke", "bob-laptop")[0] == 0
    refused(rccs, data_dir, ["devices", "rename", "bob-laptop", "Laptop"], "device 'bob-laptop' is revoked")


# ---- sessions ---------------------------------------------------------------


def test_sessions_list_shows_state_and_counters(rccs, data_dir, alice):
    now = now_ms()
    pending = PendingMessage(seq=7, sender_user="bob", sender_device="bob-laptop", msg_id="m1",
                             frame=b"{}", text=True)
    add_sessions(
        data_dir,
        a_session("s-live", "alice", "alice-phone", connected_at=now - 5_000, last_activity=now - 1_000,
                  next_seq=8, messages_in=3, messages_out=4, bytes_in=300, bytes_out=4000, connected_ms=60_000,
                  pending=[pending]),
        a_session("s-gone", "alice", "alice-phone", disconnected_at=now - 10_000),
        dataclasses.replace(a_session("s-old", "bob", "bob-laptop", disconnected_at=now - 10_000),
                            expires_at=now - 1_000),
    )
    assert rccs("sessions", "revoke", "s-gone")[0] == 0

    code, out, err = rccs("sessions", "list")
    assert (code, err) == (0, "")
    rows = table(out)
    assert rows[0] == ["SESSION", "USER", "DEVICE", "STATE", "CREATED", "EXPIRES", "LAST ACTIVITY",
                       "MSGS IN", "MSGS OUT", "BYTES IN", "BYTES OUT", "PENDING"]
    by_id = {row[0]: row for row in rows[1:]}
    assert set(by_id) == {"s-live", "s-gone", "s-old"}
    assert by_id["s-live"][3:4] + by_id["s-live"][7:] == ["connected", "3", "4", "300", "4000", "1"]
    assert by_id["s-gone"][3] == "revoked"
    assert by_id["s-old"][3] == "expired"
    assert abs(parse_iso(by_id["s-live"][6]) - (now - 1_000) / 1000) < 2

    code, out, _ = rccs("sessions", "list", "--device", "alice-phone", "--json")
    views = {view["session"]: view for view in json.loads(out)}
    assert set(views) == {"s-live", "s-gone"}
    live = views["s-live"]
    assert live == {
        "session": "s-live", "user": "alice", "device": "alice-phone", "created": live["created"],
        "expires_at": live["expires_at"], "connected": True, "connected_at": now - 5_000, "disconnected_at": None,
        "revoked_at": None, "last_activity": now - 1_000, "next_seq": 8, "messages_in": 3, "messages_out": 4,
        "bytes_in": 300, "bytes_out": 4000, "connected_ms": 60_000, "pending": 1,
    }
    assert views["s-gone"]["connected"] is False and views["s-gone"]["revoked_at"] is not None

    code, out, _ = rccs("sessions", "list", "--user", "bob", "--json")
    assert [view["session"] for view in json.loads(out)] == ["s-old"]
    assert rccs("sessions", "list", "--user", "carol") == (0, "no sessions\n", "")


def test_sessions_revoke(rccs, data_dir, alice):
    add_sessions(data_dir, a_session("s-1", "alice", "alice-phone"), a_session("s-2", "alice", "alice-phone"))
    cursor = snapshot(data_dir)[3]
    code, out, err = rccs("sessions", "revoke", "s-1")
    assert (code, err) == (0, "")
    assert out == "revoked session s-1 of device alice-phone (user alice)\n"
    assert session(data_dir, "s-1").revoked_at is not None
    assert session(data_dir, "s-2").revoked_at is None
    assert device(data_dir, "alice-phone").revoked_at is None
    assert (CHANGE_SESSION, "s-1") in {(c.kind, c.key) for c in changes(data_dir, cursor)}

    refused(rccs, data_dir, ["sessions", "revoke", "s-1"], "session 's-1' is already revoked")
    refused(rccs, data_dir, ["sessions", "revoke", "s-404"], "unknown session 's-404'")


# ---- token issue ------------------------------------------------------------


def test_token_issue_registers_the_user_and_device(rccs, data_dir):
    code, out, err = rccs("token", "issue", "--user", "alice", "--device", "alice-cli", "--ttl", "1h")
    assert (code, err) == (0, "")
    identity = TokenAuthority(load_or_create_secret(data_dir)).verify(out.strip())
    assert (identity.user, identity.device) == ("alice", "alice-cli")
    users, devices, _, _ = snapshot(data_dir)
    assert [user.id for user in users] == ["alice"]
    [registered] = devices
    assert (registered.id, registered.user, registered.type) == ("alice-cli", "alice", "unknown")
    assert registered.credential_hash is None  # a token device has no credential

    # Again for the same device: a new token, the same registration.
    before = snapshot(data_dir)
    code, out, _ = rccs("token", "issue", "--user", "alice", "--device", "alice-cli")
    assert code == 0 and out.startswith("ey")
    assert snapshot(data_dir) == before


def test_token_issue_for_an_existing_user_keeps_its_devices(rccs, data_dir, alice):
    assert rccs("token", "issue", "--user", "alice", "--device", "alice-phone")[0] == 0
    assert device(data_dir, "alice-phone").credential_hash == secret_hash(alice)  # untouched
    assert rccs("token", "issue", "--user", "alice", "--device", "alice-cli")[0] == 0
    assert device(data_dir, "alice-cli").user == "alice"


def test_token_issue_refuses_revoked_and_foreign_devices(rccs, data_dir, alice):
    refused(rccs, data_dir, ["token", "issue", "--user", "alice", "--device", "bob-laptop"], "another user")
    refused(rccs, data_dir, ["token", "issue", "--user", "carol", "--device", "bob-laptop"], "another user")
    assert "carol" not in [user.id for user in snapshot(data_dir)[0]]
    assert rccs("devices", "revoke", "alice-phone")[0] == 0
    refused(rccs, data_dir, ["token", "issue", "--user", "alice", "--device", "alice-phone"], "revoked")
    refused(rccs, data_dir, ["token", "issue", "--user", "al ice", "--device", "x"], "invalid user id")
    refused(rccs, data_dir, ["token", "issue", "--user", "alice", "--device", "x", "--ttl", "soon"],
            "invalid duration")


def test_token_issue_with_the_memory_store_leaves_no_store(rccs, data_dir, monkeypatch):
    monkeypatch.setenv("RCCS_STORE", "memory")
    code, out, err = rccs("token", "issue", "--user", "alice", "--device", "alice-cli")
    assert (code, err) == (0, "")
    assert TokenAuthority(load_or_create_secret(data_dir)).verify(out.strip()).device == "alice-cli"
    assert os.listdir(data_dir) == ["token.key"]


# ---- where the store is -----------------------------------------------------


@pytest.mark.parametrize("args", [
    ["users", "list"], ["users", "pair", "alice"], ["users", "remove", "alice"], ["devices", "list"],
    ["devices", "revoke", "d"], ["devices", "rename", "d", "n"], ["sessions", "list"], ["sessions", "revoke", "s"],
])
def test_commands_other_than_users_add_need_an_existing_store(rccs, data_dir, args):
    code, out, err = rccs(*args)
    assert (code, out) == (2, "")
    assert f"rccs: error: no store at {os.path.join(data_dir, 'rccs.db')}" in err
    assert not os.path.exists(data_dir)


def test_registry_commands_refuse_the_memory_store(rccs, data_dir, alice, monkeypatch):
    monkeypatch.setenv("RCCS_STORE", "memory")
    refused(rccs, data_dir, ["users", "add", "carol"], "setting 'store' is 'memory'")
    refused(rccs, data_dir, ["devices", "list"], "setting 'store' is 'memory'")


def test_serve_flags_reach_the_new_settings():
    args = cli.build_parser().parse_args([
        "serve", "--store", "memory", "--no-dev-tokens", "--session-ttl", "3600", "--session-grace", "30",
        "--pairing-code-ttl", "60", "--pairing-approval", "--pairing-max-attempts", "3",
        "--pairing-attempts-per-minute", "20", "--max-metadata-bytes", "2048",
        "--public-url", "wss://rccs.example.org/v1",
    ])
    settings = cli._settings(args)
    assert (settings.store, settings.dev_tokens, settings.session_ttl, settings.session_grace) == (
        "memory", False, 3600.0, 30.0)
    assert (settings.pairing_code_ttl, settings.pairing_approval, settings.pairing_max_attempts) == (60.0, True, 3)
    assert (settings.pairing_attempts_per_minute, settings.max_metadata_bytes) == (20, 2048)
    assert settings.public_url == "wss://rccs.example.org/v1"

    defaults = cli._settings(cli.build_parser().parse_args(["serve"]))
    assert (defaults.store, defaults.dev_tokens, defaults.pairing_approval) == ("sqlite", True, False)
    # Any store a URL can name goes through; a bare word that is no store is refused, naming the forms.
    with pytest.raises(ConfigError, match="redis://HOST:PORT/DB"):
        cli._settings(cli.build_parser().parse_args(["serve", "--store", "redis"]))
    assert cli._settings(cli.build_parser().parse_args(
        ["serve", "--store", "redis://127.0.0.1:6379/0"])).store == "redis://127.0.0.1:6379/0"


# ---- the console entry, as a real process -----------------------------------


def rccs_process(*args):
    return subprocess.run([sys.executable, "-m", "rccs", *args], capture_output=True, text=True, timeout=60,
                          env=child_environment())


def test_registry_commands_run_as_a_process(data_dir):
    added = rccs_process("users", "add", "alice", "--device", "alice-phone", "--type", "mobile",
                         "--data-dir", data_dir)
    assert added.returncode == 0, added.stderr
    assert CREDENTIAL.search(added.stdout)
    listed = rccs_process("devices", "list", "--json", "--data-dir", data_dir)
    assert listed.returncode == 0, listed.stderr
    assert [(view["id"], view["type"]) for view in json.loads(listed.stdout)] == [("alice-phone", "mobile")]

    duplicate = rccs_process("users", "add", "alice", "--data-dir", data_dir)
    assert duplicate.returncode == 2
    assert duplicate.stderr == "rccs: error: user 'alice' already exists\n"
    revoked = rccs_process("devices", "revoke", "alice-phone", "--data-dir", data_dir)
    assert revoked.returncode == 0, revoked.stderr
    token = rccs_process("token", "issue", "--user", "alice", "--device", "alice-phone", "--data-dir", data_dir)
    assert (token.returncode, token.stdout) == (2, "")
    assert "revoked" in token.stderr


# ---- the admin functions the server calls too -------------------------------


@pytest.fixture
async def memory_store():
    store = MemoryStore()
    await store.open()
    await admin.add_user(store, "alice", 1_000)
    yield store
    await store.close()


async def test_create_device_generates_a_free_id_and_applies_the_hello_limits(memory_store):
    device, credential = await admin.create_device(
        memory_store, "alice", device_type="mobile", capabilities=["camera", "camera", "gps"],
        metadata={"os": "android"}, max_metadata_bytes=64, now=2_000,
    )
    assert re.fullmatch(r"d-[0-9a-f]{10}", device.id)
    assert device.capabilities == ("camera", "gps")
    assert (device.metadata, device.created, device.user) == ({"os": "android"}, 2_000, "alice")
    assert device.credential_hash == secret_hash(credential)
    assert await memory_store.get_device(device.id) == device
    with pytest.raises(admin.AdminError, match="larger than 64 bytes"):
        await admin.create_device(memory_store, "alice", metadata={"blob": "x" * 64}, max_metadata_bytes=64, now=1)
    with pytest.raises(admin.AdminError, match="capabilities"):
        await admin.create_device(memory_store, "alice", capabilities=[""], now=1)
    with pytest.raises(admin.AdminError, match="unknown user 'bob'"):
        await admin.create_device(memory_store, "bob", now=1)
    await admin.revoke_device(memory_store, device.id, 3_000)
    with pytest.raises(admin.AdminError, match="revoked device"):
        await admin.create_device(memory_store, "alice", device_id=device.id, now=4_000)
    assert len(await memory_store.list_devices(include_revoked=True)) == 1


async def test_pairing_codes_from_a_device_name_their_issuer(memory_store):
    issuer, _ = await admin.create_device(memory_store, "alice", device_id="alice-phone", now=1_000)
    pairing = await admin.create_pairing_code(memory_store, "alice", issuer_device="alice-phone", ttl_seconds=60,
                                              approve=True, public_url="wss://x.example/v1", now=1_000)
    assert pairing["expires_at"] == 61_000
    assert pairing["uri"] == f"rccs:pair?code={pairing['code']}&server=wss%3A%2F%2Fx.example%2Fv1"
    code_id, code_secret = parse_pairing_code(pairing["code"])
    redeemed = await memory_store.redeem_pairing_code(code_id, code_secret, 2_000, 5)
    assert (redeemed.issuer_device, redeemed.approve) == ("alice-phone", True)

    await admin.add_user(memory_store, "bob", 1_000)
    with pytest.raises(admin.AdminError, match="belongs to another user"):
        await admin.create_pairing_code(memory_store, "bob", issuer_device="alice-phone", ttl_seconds=60, now=1)
    with pytest.raises(admin.AdminError, match="must be positive"):
        await admin.create_pairing_code(memory_store, "alice", ttl_seconds=0, now=1)
    await admin.revoke_device(memory_store, issuer.id, 3_000)
    with pytest.raises(admin.AdminError, match="is revoked"):
        await admin.create_pairing_code(memory_store, "alice", issuer_device="alice-phone", ttl_seconds=60, now=1)


async def test_pairing_code_ids_that_are_taken_are_drawn_again(memory_store, monkeypatch):
    drawn = iter([("AAAA-1111", "AAAA", "h1"), ("AAAA-2222", "AAAA", "h2"), ("BBBB-3333", "BBBB", "h3")])
    monkeypatch.setattr(admin, "new_pairing_code", lambda: next(drawn))
    first = await admin.create_pairing_code(memory_store, "alice", ttl_seconds=60, now=1)
    second = await admin.create_pairing_code(memory_store, "alice", ttl_seconds=60, now=1)
    assert (first["code"], second["code"]) == ("AAAA-1111", "BBBB-3333")


async def test_views_are_json_and_leave_out_secrets(memory_store):
    device, _ = await admin.create_device(memory_store, "alice", device_id="alice-phone", now=1_000)
    view = admin.device_view(device)
    assert "credential_hash" not in view and view["capabilities"] == []
    record = a_session("s-1", "alice", "alice-phone", pending=[
        PendingMessage(seq=1, sender_user="alice", sender_device="x", msg_id=1, frame=b"secret", text=False)])
    session_view = admin.session_view(record)
    assert session_view["pending"] == 1 and session_view["connected"] is False
    json.dumps([view, session_view])  # nothing in them needs a custom encoder
