"""Devices, pairing, presence, revocation, sessions and refresh against a real server with real clients."""

import asyncio
import json
import time

import msgpack
import pytest
from rawws import masked_frame, open_raw, read_frame

from rccs import admin, cli
from rccs.client import Client, ClientError, ConnectionClosed, pair
from rccs.errors import CloseCode
from rccs.hub import now_ms
from rccs.metrics import render
from rccs.testing import running_server

DESKTOP = {"type": "desktop", "name": "Desk", "capabilities": ["shell"]}
PHONE = {"type": "mobile", "name": "Phone", "platform": "ios", "capabilities": ["notifications"]}


@pytest.fixture
def server_settings(tmp_path):
    return {"data_dir": str(tmp_path / "data")}


@pytest.fixture
async def desktop(server, connect):
    return await connect("alice", "alice-desktop", type="desktop", capabilities=["shell"])


async def _pair(server, issuer, device=PHONE, **options):
    code = await issuer.create_pairing_code()
    client = await pair(server.ws_url, code["code"], device, **options)
    return client


async def _close_all(*clients):
    for client in clients:
        await client.close()


# ---- pairing -------------------------------------------------------------


async def test_pairing_a_second_and_third_device(server, desktop):
    code = await desktop.create_pairing_code()
    assert len(code["code"]) == 9 and code["code"][4] == "-"
    assert code["uri"].startswith("rccs:pair?code=")
    assert code["expires_at"] > now_ms()
    phone = await pair(server.ws_url, code["code"], PHONE)
    try:
        assert phone.credential.startswith("rccs_")
        assert phone.paired["user"] == "alice"
        assert phone.welcome["device"] == phone.paired["device"]
        joined = await desktop.next_event("pair.joined", timeout=5)
        assert joined["device"]["id"] == phone.paired["device"]
        assert joined["device"]["name"] == "Phone"
        assert joined["device"]["capabilities"] == ["notifications"]

        tablet = await _pair(server, phone, {"type": "tablet", "name": "Tab"})
        devices = {d["id"]: d for d in await desktop.devices()}
        assert set(devices) == {"alice-desktop", phone.paired["device"], tablet.paired["device"]}
        assert all(d["status"] == "online" for d in devices.values())
        assert devices[phone.paired["device"]]["platform"] == "ios"

        # The new devices route like any other.
        receipts, message = await asyncio.gather(
            desktop.send({"type": "tablet"}, "hi", {"n": 1}, ack=True), tablet.next_message(timeout=5))
        assert message.body == {"n": 1} and receipts[0].status == "delivered"
        await tablet.close()
    finally:
        await phone.close()


async def test_a_paired_credential_opens_later_sessions(server, desktop):
    phone = await _pair(server, desktop)
    credential, device_id = phone.credential, phone.paired["device"]
    await phone.close()
    again = Client(server.ws_url, None, credential=credential)
    welcome = await again.connect()
    assert welcome["device"] == device_id and welcome["user"] == "alice"
    await again.close()


async def test_pairing_with_approval(server, desktop):
    code = await desktop.create_pairing_code(approve=True)
    assert code["approve"] is True
    joining = asyncio.ensure_future(pair(server.ws_url, code["code"], PHONE))
    request = await desktop.next_event("pair.request", timeout=5)
    assert request["device"]["name"] == "Phone"
    assert request["issuer"] == "alice-desktop"
    assert not joining.done()
    await desktop.approve_pairing(request["request"])
    phone = await asyncio.wait_for(joining, 5)
    assert phone.credential
    assert (await desktop.next_event("pair.joined", timeout=5))["approved_by"] == "alice-desktop"
    await phone.close()


async def test_pairing_denied(server, desktop):
    code = await desktop.create_pairing_code(approve=True)
    joining = asyncio.ensure_future(pair(server.ws_url, code["code"], PHONE))
    request = await desktop.next_event("pair.request", timeout=5)
    await desktop.deny_pairing(request["request"])
    with pytest.raises(ClientError) as refused:
        await asyncio.wait_for(joining, 5)
    assert (refused.value.code, refused.value.message) == ("forbidden", "pairing denied")
    assert [d["id"] for d in await desktop.devices()] == ["alice-desktop"]
    with pytest.raises(ClientError) as unknown:
        await desktop.approve_pairing(request["request"])
    assert unknown.value.code == "not_found"


async def test_server_wide_approval_setting(tmp_path):
    async with running_server(data_dir=str(tmp_path), pairing_approval=True) as server:
        desktop = Client(server.ws_url, server.issue_token("alice", "desk"), DESKTOP)
        await desktop.connect()
        code = await desktop.create_pairing_code(approve=False)
        assert code["approve"] is True
        await desktop.close()


async def test_a_code_is_single_use_and_wrong_codes_look_expired(server, desktop):
    code = await desktop.create_pairing_code()
    phone = await pair(server.ws_url, code["code"], PHONE)
    await phone.close()
    answers = []
    expired = await admin.create_pairing_code(server.node.store, "alice", ttl_seconds=60, now=now_ms() - 120_000)
    for attempt in (code["code"], "ZZZZ-ZZZZ", expired["code"], code["code"].lower().replace("-", " ")):
        with pytest.raises(ClientError) as refused:
            await pair(server.ws_url, attempt, PHONE)
        answers.append((refused.value.code, refused.value.message))
    assert len(set(answers)) == 1
    assert answers[0][0] == "invalid_code"
    assert len(await desktop.devices()) == 2  # desktop + the one phone


async def test_a_code_is_burnt_after_too_many_wrong_secrets(server, desktop):
    code = (await desktop.create_pairing_code())["code"]
    code_id, secret = code.split("-")
    wrong = "0000" if secret != "0000" else "1111"
    for _ in range(server.node.settings.pairing_max_attempts):
        with pytest.raises(ClientError):
            await pair(server.ws_url, f"{code_id}-{wrong}", PHONE)
    with pytest.raises(ClientError) as refused:
        await pair(server.ws_url, code, PHONE)
    assert refused.value.code == "invalid_code"


async def test_redemption_is_rate_limited_per_address(tmp_path):
    async with running_server(data_dir=str(tmp_path), pairing_attempts_per_minute=3) as server:
        reader, writer = await open_raw(server.ws_url)
        codes = []
        for attempt in range(4):
            writer.write(masked_frame(json.dumps(
                {"op": "pair.redeem", "id": attempt, "code": "ABCD-EFGH", "device": {"type": "mobile"}}).encode(), 1))
            _, payload = await read_frame(reader)
            codes.append(json.loads(payload))
        assert [c["code"] for c in codes] == ["invalid_code"] * 3 + ["rate_limited"]
        assert codes[3]["retry_after"] > 0
        assert server.hub.events["pairing_rate_limited"] == 1
        writer.close()


async def test_malformed_pairing_requests(server):
    reader, writer = await open_raw(server.ws_url)
    cases = [
        ({"op": "pair.redeem", "id": 1, "code": "ABCD-EFGH"}, "bad_request"),  # no device
        ({"op": "pair.redeem", "id": 2, "code": "ABCD-EFGH", "device": {"name": "x"}}, "bad_request"),  # no type
        ({"op": "pair.redeem", "id": 3, "code": 12345678, "device": {"type": "m"}}, "invalid_code"),
        ({"op": "pair.redeem", "id": 4, "code": "AB", "device": {"type": "m"}}, "invalid_code"),
        ({"op": "pair.redeem", "id": 5, "code": "ABCD-EFGH",
          "device": {"type": "m", "metadata": {"x": "y" * 10000}}}, "too_large"),
    ]
    for envelope, expected in cases:
        writer.write(masked_frame(msgpack.packb(envelope)))
        _, payload = await read_frame(reader)
        answer = msgpack.unpackb(payload)
        assert (answer["op"], answer["code"], answer["id"]) == ("error", expected, envelope["id"])
    assert server.hub.registry.user_devices("alice") == []
    writer.close()


# ---- discovery, presence, updates ------------------------------------------


async def test_presence_events_in_order(server, connect, desktop):
    phone = await connect("alice", "alice-phone", type="mobile")
    assert (await desktop.next_event("presence", timeout=5))["status"] == "online"
    await phone.set_presence("away")
    await phone.set_presence("away")  # no change: no event
    await phone.set_presence("online")
    await phone.close()
    events = [await desktop.next_event("presence", timeout=5) for _ in range(3)]
    assert [(e["device"], e["status"]) for e in events] == [
        ("alice-phone", "away"), ("alice-phone", "online"), ("alice-phone", "offline")]
    assert events[2]["last_seen"] >= events[0]["last_seen"]
    # The reply comes after every event the server sent before it: nothing else is on its way.
    listed = {d["id"]: d for d in await desktop.devices()}
    assert desktop.events.empty()
    assert listed["alice-phone"]["status"] == "offline"
    # Another user's devices hear nothing.
    bob = await connect("bob", "bob-laptop")
    await desktop.set_presence("away")  # answered after the server told every device that should hear it
    bob_sees = await bob.devices()  # and bob's reply comes after anything it was told
    assert bob.events.empty() and all(d["id"] == "bob-laptop" for d in bob_sees)


async def test_device_update_moves_the_routing_indexes(server, connect, desktop):
    phone = await connect("alice", "alice-phone", type="mobile")
    before = await desktop.send({"capability": "camera"}, "snap", ack=True)
    assert [(r.status, r.reason) for r in before] == [("failed", "no_route")]
    updated = await phone.update_device(name="Pocket", capabilities=["camera"], metadata={"os": "17.1"})
    assert (updated["name"], updated["capabilities"], updated["metadata"]) == ("Pocket", ["camera"], {"os": "17.1"})
    _, message = await asyncio.gather(desktop.send({"capability": "camera"}, "snap"), phone.next_message(timeout=5))
    assert message.type == "snap"
    renamed = await desktop.update_device("alice-phone", name="Old phone")
    assert renamed["name"] == "Old phone"
    await server.hub.settle()  # the store is written behind
    stored = await server.node.store.get_device("alice-phone")
    assert (stored.name, stored.capabilities) == ("Old phone", ("camera",))


async def test_device_update_refusals_change_nothing(server, connect, desktop):
    await connect("bob", "bob-laptop")
    cases = [
        ({"device": "bob-laptop", "set": {"name": "mine"}}, "forbidden"),
        ({"device": "nobody", "set": {"name": "x"}}, "not_found"),
        ({"set": {"metadata": {"blob": "x" * 5000}}}, "too_large"),
        ({"set": {"name": 7}}, "bad_request"),
        ({"set": {"colour": "red"}}, "bad_request"),
        ({"set": {}}, "bad_request"),
    ]
    for fields, expected in cases:
        with pytest.raises(ClientError) as refused:
            await desktop.request("device.update", **fields)
        assert refused.value.code == expected, fields
    assert server.hub.registry.get("bob-laptop").name == "bob-laptop"
    assert server.hub.registry.get("alice-desktop").metadata == {}


# ---- revocation --------------------------------------------------------------


async def test_revoking_a_device_mid_connection(server, connect, desktop):
    phone = await _pair(server, desktop)
    tablet = await connect("alice", "alice-tablet", type="tablet")
    device_id, credential = phone.paired["device"], phone.credential
    started = time.monotonic()
    await desktop.revoke_device(device_id)
    closed = await asyncio.wait_for(phone.closed, 1.0)
    assert closed.code == CloseCode.REVOKED
    assert time.monotonic() - started < 1.0
    # Its credential and session stop working; the others do not notice.
    again = Client(server.ws_url, None, credential=credential, reconnect=False)
    with pytest.raises(ConnectionClosed) as refused:
        await again.connect()
    assert refused.value.code == CloseCode.UNAUTHORIZED
    assert device_id not in {d["id"] for d in await desktop.devices()}
    heard = []
    while not desktop.events.empty():
        event = desktop.events.get_nowait()
        if event["op"] == "presence" and event["device"] == device_id:
            heard.append(event["status"])
    assert heard == ["online", "revoked"]  # no "offline" for a device that will not come back
    _, message = await asyncio.gather(desktop.send({"device": "alice-tablet"}, "still", 1),
                                      tablet.next_message(timeout=5))
    assert message.body == 1
    with pytest.raises(ClientError) as twice:
        await desktop.revoke_device(device_id)
    assert twice.value.code == "not_found"


async def test_revoking_from_the_cli_while_the_server_runs(server, desktop, tmp_path):
    phone = await _pair(server, desktop)
    device_id = phone.paired["device"]
    await server.hub.settle()
    started = time.monotonic()
    status = await asyncio.to_thread(cli.main, ["devices", "revoke", device_id,
                                                "--data-dir", server.node.settings.data_dir])
    assert status == 0
    closed = await asyncio.wait_for(phone.closed, 1.5)
    assert closed.code == CloseCode.REVOKED
    assert time.monotonic() - started < 1.5  # CLI start-up included; the server reacts within its poll
    assert server.hub.registry.get(device_id).revoked_at is not None


async def test_dev_token_of_a_revoked_device_is_refused(server, connect, desktop):
    await connect("alice", "alice-phone", type="mobile")
    await desktop.revoke_device("alice-phone")
    client = Client(server.ws_url, server.issue_token("alice", "alice-phone"), PHONE, reconnect=False)
    with pytest.raises(ConnectionClosed) as refused:
        await client.connect()
    assert refused.value.code == CloseCode.REVOKED


# ---- sessions -------------------------------------------------------------------


async def test_sessions_listed_with_counters_and_revocable(server, connect, desktop):
    phone = await connect("alice", "alice-phone", type="mobile")
    for n in range(3):
        await asyncio.gather(desktop.send({"device": "alice-phone"}, "n", n), phone.next_message(timeout=5))
    sessions = {s["device"]: s for s in await desktop.sessions()}
    assert sessions["alice-desktop"]["current"] is True
    phone_session = sessions["alice-phone"]
    assert phone_session["session"] == phone.welcome["session"]
    assert phone_session["connected"] is True
    assert phone_session["messages_out"] >= 4  # welcome + 3 msgs
    assert phone_session["bytes_out"] > 0
    assert sessions["alice-desktop"]["messages_in"] >= 4
    await desktop.revoke_session(phone_session["session"])
    closed = await asyncio.wait_for(phone.closed, 1.0)
    assert closed.code == CloseCode.REVOKED
    bob = await connect("bob", "bob-laptop")
    with pytest.raises(ClientError) as foreign:
        await bob.revoke_session(sessions["alice-desktop"]["session"])
    assert foreign.value.code == "not_found"
    assert desktop.welcome["session"] in {s["session"] for s in await desktop.sessions()}


async def _drop(client):
    """Cut the TCP connection without a close frame, as a lost network does."""
    client._transport.underlying_transport.abort()


async def test_resume_redelivers_unacked_messages(server, connect, desktop):
    phone = await connect("alice", "alice-phone", type="mobile", auto_ack=False, backoff_initial=0.01)
    session = phone.welcome["session"]
    receipt = asyncio.ensure_future(desktop.send({"device": "alice-phone"}, "cmd", "run", ack=True))
    first = await phone.next_message(timeout=5)
    phone.reconnected.clear()
    await _drop(phone)
    await asyncio.wait_for(phone.reconnected.wait(), 5)
    assert phone.welcome["resumed"] is True and phone.welcome["session"] == session
    assert phone.welcome["next_seq"] == first.seq + 1
    # The redelivered copy is recognised as already seen; acking it now settles the original.
    await phone.ack(first.seq)
    receipts = await asyncio.wait_for(receipt, 5)
    assert [r.status for r in receipts] == ["delivered"]
    _, second = await asyncio.gather(desktop.send({"device": "alice-phone"}, "cmd", "next"),
                                     phone.next_message(timeout=5))
    assert second.seq == first.seq + 1  # sequence numbers continue
    assert phone.duplicates == 1


async def test_resume_on_the_wire(server, desktop):
    """What a client written from the docs sees: the unacked msg again, same seq, after welcome."""
    token = server.issue_token("alice", "raw-phone")
    reader, writer = await open_raw(server.ws_url)
    writer.write(masked_frame(json.dumps({"op": "hello", "token": token, "device": {"type": "mobile"}}).encode(), 1))
    welcome = json.loads((await read_frame(reader))[1])
    sending = asyncio.ensure_future(desktop.send({"device": "raw-phone"}, "cmd", {"x": 1}, ack=True))
    msg = json.loads((await read_frame(reader))[1])
    assert (msg["op"], msg["seq"]) == ("msg", 1)
    writer.transport.abort()
    reader, writer = await open_raw(server.ws_url)
    writer.write(masked_frame(json.dumps({"op": "hello", "token": token,
                                          "resume": {"session": welcome["session"], "last_seq": 1}}).encode(), 1))
    resumed = json.loads((await read_frame(reader))[1])
    assert (resumed["op"], resumed["resumed"], resumed["session"]) == ("welcome", True, welcome["session"])
    again = json.loads((await read_frame(reader))[1])
    assert again == msg
    writer.write(masked_frame(json.dumps({"op": "ack", "seq": 1}).encode(), 1))
    assert [r.status for r in await asyncio.wait_for(sending, 5)] == ["delivered"]
    writer.write(masked_frame(json.dumps({"op": "hello", "token": token}).encode(), 1))  # a second hello
    assert json.loads((await read_frame(reader))[1])["code"] == "bad_request"
    writer.close()


async def test_a_clean_close_ends_the_session(server, connect, desktop):
    phone = await connect("alice", "alice-phone", type="mobile", auto_ack=False)
    sending = asyncio.ensure_future(desktop.send({"device": "alice-phone"}, "cmd", 1, ack=True))
    await phone.next_message(timeout=5)
    await phone.close()  # close 1000: the session ends; its unacked message goes to the device's inbox
    receipts = await asyncio.wait_for(sending, 5)
    assert (receipts[0].status, receipts[0].device) == ("queued", "alice-phone")
    token = server.issue_token("alice", "alice-phone")
    again = Client(server.ws_url, token, PHONE)
    again.session_id = phone.session_id
    welcome = await again.connect()
    assert welcome["resumed"] is False and welcome["resume_error"] == "unknown_session"
    await again.close()


async def test_resume_of_a_live_session_takes_it_over_without_presence_noise(server, connect, desktop):
    phone = await connect("alice", "alice-phone", type="mobile", reconnect=False)
    await desktop.next_event("presence", timeout=5)
    second = Client(server.ws_url, server.issue_token("alice", "alice-phone"), PHONE)
    second.session_id = phone.session_id
    welcome = await second.connect()
    assert welcome["resumed"] is True and welcome["session"] == phone.session_id
    assert (await asyncio.wait_for(phone.closed, 5)).code == CloseCode.REPLACED
    await desktop.devices()  # a round trip: a presence event sent for the takeover would have arrived first
    assert desktop.events.empty()  # no offline, no second online
    await second.close()
    assert (await desktop.next_event("presence", timeout=5))["status"] == "offline"


async def test_refresh_in_band(server, connect, desktop):
    token = server.issue_token("alice", "alice-phone", ttl_seconds=60)
    phone = Client(server.ws_url, token, PHONE)
    await phone.connect()
    try:
        first_expiry = phone.welcome["expires_at"]
        new_expiry = await phone.refresh(token=server.issue_token("alice", "alice-phone", ttl_seconds=7200))
        assert new_expiry > first_expiry + 3_600_000
        with pytest.raises(ClientError) as other:
            await phone.refresh(token=server.issue_token("alice", "alice-desktop"))
        assert other.value.code == "forbidden"
        with pytest.raises(ClientError) as garbage:
            await phone.refresh(token="not-a-token")
        assert garbage.value.code == "unauthorized"
        expired = server.node.tokens.issue("alice", "alice-phone", 60, now=time.time() - 3600)
        with pytest.raises(ClientError) as stale:
            await phone.refresh(token=expired)
        assert stale.value.code == "unauthorized"
        assert await phone.ping() > 0  # still connected
        # Refused refreshes keep the expiry the last good one set: the session is not cut short (nor extended).
        assert server.hub.online("alice", "alice-phone").expires_at == new_expiry
    finally:
        await phone.close()


async def test_an_expired_session_is_closed(server, desktop):
    phone = Client(server.ws_url, server.issue_token("alice", "alice-phone", ttl_seconds=60), PHONE,
                   reconnect=False)
    await phone.connect()
    expires_at = phone.welcome["expires_at"]
    server.hub.expire_sessions(expires_at - 1)  # what the once-a-second sweep does, at chosen times
    assert not phone.closed.done()
    server.hub.expire_sessions(expires_at)
    closed = await asyncio.wait_for(phone.closed, 5)
    assert closed.code == CloseCode.SESSION_EXPIRED
    assert server.hub.events["session_expired"] == 1
    assert not desktop.closed.done()


async def test_the_sweep_closes_expired_sessions_on_its_own(server):
    # `exp` is whole seconds from an `iat` rounded down: a ttl of 2 lives 1-2 s, time enough to connect
    # (a ttl of 1 can expire before the hello). The bound: that, then the once-a-second sweep, on a loaded machine.
    phone = Client(server.ws_url, server.issue_token("alice", "alice-phone", ttl_seconds=2), PHONE,
                   reconnect=False)
    await phone.connect()
    assert (await asyncio.wait_for(phone.closed, 10)).code == CloseCode.SESSION_EXPIRED


async def test_refresh_with_a_credential_extends_the_session(tmp_path):
    async with running_server(data_dir=str(tmp_path), session_ttl=60) as server:
        desktop = Client(server.ws_url, server.issue_token("alice", "desk"), DESKTOP)
        await desktop.connect()
        phone = await _pair(server, desktop, reconnect=False)
        first_expiry = phone.welcome["expires_at"]
        await asyncio.sleep(0.01)  # let the clock move on: the refresh must land later than the hello
        new_expiry = await phone.refresh()  # the client keeps its credential for this
        assert new_expiry > first_expiry
        server.hub.expire_sessions(first_expiry)
        await phone.ping()  # still open: the refresh moved its expiry
        server.hub.expire_sessions(new_expiry)
        assert (await asyncio.wait_for(phone.closed, 5)).code == CloseCode.SESSION_EXPIRED
        await _close_all(desktop)


# ---- restart ------------------------------------------------------------------------


async def test_restart_keeps_users_devices_credentials_and_resumable_sessions(tmp_path):
    data_dir = str(tmp_path / "data")
    async with running_server(data_dir=data_dir) as server:
        desktop = Client(server.ws_url, server.issue_token("alice", "desk"), DESKTOP, auto_ack=False)
        await desktop.connect()
        phone = await _pair(server, desktop, reconnect=False)
        await phone.update_device(metadata={"theme": "dark"})
        sending = asyncio.ensure_future(phone.send({"device": "desk"}, "cmd", "before restart", ack=True))
        before = await desktop.next_message(timeout=5)
        desktop_session, phone_credential = desktop.session_id, phone.credential
        phone_id = phone.paired["device"]
    # The server stopped (1001): both sessions were saved as resumable, with the unacked message.
    await asyncio.gather(sending, return_exceptions=True)
    async with running_server(data_dir=data_dir) as server:
        assert server.hub.registry.users == {"alice"}
        phone = Client(server.ws_url, None, credential=phone_credential)
        await phone.connect()
        devices = {d["id"]: d for d in await phone.devices()}
        assert devices[phone_id]["metadata"] == {"theme": "dark"}
        assert devices["desk"]["status"] == "offline" and devices["desk"]["last_seen"] > 0
        desktop = Client(server.ws_url, server.issue_token("alice", "desk"), DESKTOP, auto_ack=False)
        desktop.session_id, desktop.last_seq = desktop_session, 0
        welcome = await desktop.connect()
        assert welcome["resumed"] is True and welcome["session"] == desktop_session
        again = await desktop.next_message(timeout=5)
        assert (again.seq, again.body, again.id) == (before.seq, "before restart", before.id)
        await _close_all(phone, desktop)


async def test_cli_changes_reach_a_running_server(server, connect, desktop):
    data_dir = server.node.settings.data_dir
    phone = await connect("alice", "alice-phone", type="mobile", reconnect=False)
    bob = await connect("bob", "bob-laptop", reconnect=False)
    await server.hub.settle()

    def run(*argv):
        return asyncio.to_thread(cli.main, [*argv, "--data-dir", data_dir])

    assert await run("devices", "rename", "alice-phone", "Kitchen phone") == 0
    await asyncio.wait_for(server.hub.catch_up(), 2)  # the change feed is polled every 250 ms
    assert {d["id"]: d["name"] for d in await desktop.devices()}["alice-phone"] == "Kitchen phone"

    assert await run("sessions", "revoke", phone.session_id) == 0
    assert (await asyncio.wait_for(phone.closed, 1.5)).code == CloseCode.REVOKED
    # The device itself is not revoked: a new hello opens a new session, the old one cannot be resumed.
    again = Client(server.ws_url, server.issue_token("alice", "alice-phone"), PHONE)
    again.session_id = phone.session_id
    welcome = await again.connect()
    assert welcome["resumed"] is False
    await again.close()

    assert await run("users", "remove", "bob") == 0
    assert (await asyncio.wait_for(bob.closed, 1.5)).code == CloseCode.REVOKED
    assert server.hub.registry.get("bob-laptop").revoked_at is not None
    assert not desktop.closed.done()


@pytest.mark.parametrize(("hello", "close_code", "error"), [
    ({"credential": "rccs_" + "x" * 43}, CloseCode.UNAUTHORIZED, "unauthorized"),  # unknown
    ({"credential": "not-a-credential"}, CloseCode.UNAUTHORIZED, "unauthorized"),
    ({"credential": 42}, CloseCode.UNAUTHORIZED, "unauthorized"),
    ({}, CloseCode.UNAUTHORIZED, "unauthorized"),  # neither credential nor token
    ({"token": "TOKEN", "resume": "yes"}, CloseCode.BAD_HELLO, "bad_request"),
    ({"token": "TOKEN", "resume": {"session": "s", "last_seq": -1}}, CloseCode.BAD_HELLO, "bad_request"),
    ({"token": "TOKEN", "resume": {"session": 7}}, CloseCode.BAD_HELLO, "bad_request"),
    ({"token": "TOKEN", "device": {"type": "m", "metadata": [1]}}, CloseCode.BAD_HELLO, "bad_request"),
])
async def test_bad_hellos_are_refused_and_counted(server, hello, close_code, error):
    if hello.get("token") == "TOKEN":
        hello["token"] = server.issue_token("carol", "carol-phone")
    hello.setdefault("device", {"type": "mobile"})
    reader, writer = await open_raw(server.ws_url)
    writer.write(masked_frame(json.dumps({"op": "hello", **hello}).encode(), 1))
    opcode, payload = await read_frame(reader)
    assert json.loads(payload)["code"] == error
    opcode, payload = await read_frame(reader)
    assert opcode == 0x8 and int.from_bytes(payload[:2], "big") == close_code
    assert server.hub.errors_sent[error] == 1
    assert server.hub.registry.get("carol-phone") is None  # nothing registered for a refused hello
    writer.close()


async def test_dev_tokens_can_be_turned_off(tmp_path):
    async with running_server(data_dir=str(tmp_path), dev_tokens=False, store="sqlite") as server:
        client = Client(server.ws_url, server.issue_token("alice", "desk"), DESKTOP, reconnect=False)
        with pytest.raises(ConnectionClosed) as refused:
            await client.connect()
        assert refused.value.code == CloseCode.UNAUTHORIZED
        # Credentials still work: the CLI bootstraps a user with one, the running server learns of it.
        await asyncio.to_thread(cli.main, ["users", "add", "alice", "--data-dir", str(tmp_path)])
        record, credential = await admin.create_device(server.node.store, "alice", now=now_ms())
        await server.hub.catch_up()
        client = Client(server.ws_url, None, credential=credential, reconnect=False)
        assert (await client.connect())["device"] == record.id
        await client.close()


async def test_resume_of_another_devices_session_starts_a_new_one(server, connect, desktop):
    phone = await connect("alice", "alice-phone", type="mobile")
    other = Client(server.ws_url, server.issue_token("alice", "alice-tablet"), {"type": "tablet"})
    other.session_id = phone.session_id
    welcome = await other.connect()
    assert (welcome["resumed"], welcome["resume_error"]) == (False, "unknown_session")
    assert welcome["session"] != phone.session_id
    assert not phone.closed.done()
    await other.close()


async def test_resume_in_the_other_encoding_converts_redelivered_messages(server, connect, desktop):
    token = server.issue_token("alice", "alice-phone")
    phone = Client(server.ws_url, token, PHONE, encoding="json", auto_ack=False, reconnect=False)
    await phone.connect()
    sending = asyncio.ensure_future(desktop.send({"device": "alice-phone"}, "cmd", {"bin": b"\x01\x02"}, ack=True))
    first = await phone.next_message(timeout=5)
    assert first.body == {"bin": "AQI="}  # msgpack bin becomes base64 for a JSON receiver
    await _drop(phone)
    again = Client(server.ws_url, token, PHONE, encoding="msgpack", auto_ack=False)
    again.session_id = phone.session_id  # last_seq 0: the client wants everything unacked again
    await again.connect()
    redelivered = await again.next_message(timeout=5)
    assert (redelivered.seq, redelivered.id, redelivered.body) == (first.seq, first.id, {"bin": "AQI="})
    await again.ack(redelivered.seq)
    assert [r.status for r in await asyncio.wait_for(sending, 5)] == ["delivered"]
    await again.close()


async def test_session_metrics(server, connect, desktop):
    phone = await connect("alice", "alice-phone", type="mobile")
    await asyncio.gather(desktop.send({"device": "alice-phone"}, "n", 1), phone.next_message(timeout=5))
    text = render(server.node.registry)
    lines = dict(line.rsplit(" ", 1) for line in text.decode().splitlines() if line and not line.startswith("#"))
    assert float(lines['rccs_sessions{state="connected"}']) == 2
    assert float(lines['rccs_session_messages_total{direction="in"}']) == 3  # two hellos, one send
    assert float(lines['rccs_session_bytes_total{direction="out"}']) > 0
    assert float(lines['rccs_events_total{event="session_opened"}']) == 2
    assert float(lines["rccs_devices_registered"]) == 2


async def test_first_device_of_a_new_user_bootstrapped_from_the_cli(server, capsys):
    data_dir = server.node.settings.data_dir
    assert await asyncio.to_thread(cli.main, ["users", "add", "dora", "--data-dir", data_dir]) == 0
    printed = capsys.readouterr().out
    code = next(line.split(":", 1)[1].strip() for line in printed.splitlines() if line.startswith("pairing code:"))
    await server.hub.catch_up()
    laptop = await pair(server.ws_url, code, {"type": "desktop", "name": "Dora's laptop"})
    assert laptop.paired["user"] == "dora"
    assert [d["name"] for d in await laptop.devices()] == ["Dora's laptop"]
    await laptop.close()


async def test_codes_of_a_revoked_device_stop_working(server, connect, desktop):
    laptop = await _pair(server, desktop)
    code = (await laptop.create_pairing_code())["code"]
    await desktop.revoke_device(laptop.paired["device"])
    with pytest.raises(ClientError) as refused:
        await pair(server.ws_url, code, PHONE)
    assert refused.value.code == "invalid_code"


async def test_cli_made_credentials_and_codes_work_at_once(server, capsys):
    """No waiting for the change feed: a registry miss asks the store before refusing."""
    data_dir = server.node.settings.data_dir
    assert await asyncio.to_thread(cli.main, ["users", "add", "erin", "--device", "erin-pc",
                                              "--data-dir", data_dir]) == 0
    credential = next(line.split(":", 1)[1].strip() for line in capsys.readouterr().out.splitlines()
                      if line.startswith("credential:"))
    pc = Client(server.ws_url, None, credential=credential, reconnect=False)
    assert (await pc.connect())["device"] == "erin-pc"
    await pc.close()
    assert await asyncio.to_thread(cli.main, ["users", "add", "fay", "--data-dir", data_dir]) == 0
    code = next(line.split(":", 1)[1].strip() for line in capsys.readouterr().out.splitlines()
                if line.startswith("pairing code:"))
    tablet = await pair(server.ws_url, code, {"type": "tablet"})
    assert tablet.paired["user"] == "fay"
    await tablet.close()


async def test_resume_last_seq_is_bounded(server):
    reader, writer = await open_raw(server.ws_url)
    hello = {"op": "hello", "token": server.issue_token("alice", "p"), "device": {"type": "m"},
             "resume": {"session": "s", "last_seq": 2**53}}
    writer.write(masked_frame(json.dumps(hello).encode(), 1))
    assert json.loads((await read_frame(reader))[1])["code"] == "bad_request"
    writer.close()
