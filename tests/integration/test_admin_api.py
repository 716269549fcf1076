"""The admin HTTP API (docs/operations.md, "Admin HTTP API"; docs/openapi.json) against a real server.

The last tests throw requests generated from docs/openapi.json (valid and invalid paths, methods, query
strings, bodies and credentials) at a server running in its own thread, and check that nothing answers 5xx
and every answer is one the document lists, with a body matching its schema.
"""

import asyncio
import contextlib
import json
import logging
import pathlib
import threading
import urllib.parse

import msgpack
import pytest
import uvloop
from adminhttp import KEY, api, connection, exchange
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from jsonschema import Draft202012Validator

from rccs import _fastpath
from rccs.admin_api import SERVER_SENDER
from rccs.client import Client, ConnectionClosed
from rccs.store import QueuedMessage
from rccs.testing import running_server
from rccs.transport.http import HttpServer, text_response

OPENAPI = json.loads((pathlib.Path(__file__).parents[2] / "docs" / "openapi.json").read_text())


@pytest.fixture
def server_settings():
    return {"admin_key": KEY}


async def ping(client):
    """Every envelope the client sent before this has been handled by the server (one connection, in order)."""
    await asyncio.wait_for(client.ping(), 5)


# ---- switched off, authentication ------------------------------------------------------------------


async def test_admin_api_is_off_without_a_key():
    async with running_server() as server:
        for method, path in [("GET", "/admin/stats"), ("POST", "/admin/publish"), ("GET", "/admin"),
                             ("DELETE", "/admin/whatever")]:
            reply = await api(server, method, path)
            assert (reply.status, reply.body) == (404, "not found\n"), path
        assert (await api(server, "GET", "/healthz")).status == 200


async def test_every_admin_path_needs_the_key(server):
    for key, extra in [(None, {}), ("wrong", {}), (KEY + "x", {}), (None, {"Authorization": f"Basic {KEY}"}),
                       (None, {"Authorization": KEY}), (None, {"Authorization": "Bearer"})]:
        for method, path in [("GET", "/admin/stats"), ("POST", "/admin/devices/x/revoke"), ("GET", "/admin/nope")]:
            reply = await api(server, method, path, key=key, headers=extra)
            assert reply.status == 401, (key, extra, path)
            assert reply.error_code == "unauthorized"
            assert reply.headers["www-authenticate"].startswith("Bearer")
    assert (await api(server, "GET", "/admin/stats", headers={"Authorization": f"bearer {KEY}"})).status == 200


async def test_unknown_paths_and_methods(server):
    reply = await api(server, "GET", "/admin/nope")
    assert (reply.status, reply.error_code) == (404, "not_found")
    reply = await api(server, "DELETE", "/admin/stats")
    assert (reply.status, reply.headers["allow"]) == (405, "GET")
    reply = await api(server, "GET", "/admin/publish")
    assert (reply.status, reply.headers["allow"]) == (405, "POST")
    reply = await api(server, "POST", "/healthz")
    assert (reply.status, reply.body) == (405, "only GET is supported\n")
    reply = await api(server, "GET", "/admin/stats?bogus=1")
    assert (reply.status, reply.error_code) == (400, "bad_request")


async def test_the_key_is_never_logged(server, connect, caplog):
    caplog.set_level(logging.DEBUG)
    await connect("alice", "a1")
    await api(server, "GET", "/admin/stats")
    await api(server, "GET", "/admin/stats", key="not-the-key-at-all")
    await api(server, "POST", "/admin/devices/a1/revoke")
    assert KEY not in caplog.text
    assert "not-the-key-at-all" not in caplog.text


# ---- reading -----------------------------------------------------------------------------------------


async def test_stats(server, connect):
    await connect("alice", "a1", type="mobile")
    await connect("alice", "a2", type="desktop")
    reply = await api(server, "GET", "/admin/stats")
    assert reply.status == 200
    stats = reply.body
    assert stats["implementation"] == _fastpath.IMPLEMENTATION
    assert stats["version"] == "0.1.0"
    assert stats["ready"] is True
    assert stats["connections"]["authenticated"] == 2
    assert stats["connections"]["by_device_type"] == {"desktop": 1, "mobile": 1}
    assert stats["sessions"] == {"live": 2, "resumable": 0}
    assert stats["events"]["session_opened"] == 2
    assert stats["uptime_seconds"] >= 0
    assert "enqueued" in stats["deliveries"]


async def test_users_and_their_devices_with_live_status(server, connect):
    a1 = await connect("alice", "a1", type="mobile")
    a2 = await connect("alice", "a2")
    await connect("bob", "b1")
    await a2.close()
    reply = await api(server, "GET", "/admin/users")
    assert reply.body == {"users": [
        {"id": "alice", "created": reply.body["users"][0]["created"], "devices": 2, "online": 1},
        {"id": "bob", "created": reply.body["users"][1]["created"], "devices": 1, "online": 1},
    ]}
    reply = await api(server, "GET", "/admin/users/alice/devices")
    assert reply.status == 200
    devices = {device["id"]: device for device in reply.body["devices"]}
    assert devices["a1"]["status"] == "online" and devices["a1"]["session"] == a1.session_id
    assert devices["a1"]["type"] == "mobile"
    assert devices["a2"]["status"] == "offline" and devices["a2"]["session"] is None
    assert "credential_hash" not in devices["a1"]
    await a1.set_presence("away")
    reply = await api(server, "GET", "/admin/users/alice/devices")
    assert {d["id"]: d["status"] for d in reply.body["devices"]}["a1"] == "away"

    assert (await api(server, "POST", "/admin/devices/a2/revoke")).status == 200
    assert [d["id"] for d in (await api(server, "GET", "/admin/users/alice/devices")).body["devices"]] == ["a1"]
    everything = (await api(server, "GET", "/admin/users/alice/devices?all=true")).body["devices"]
    assert {d["id"]: d["status"] for d in everything} == {"a1": "away", "a2": "revoked"}

    reply = await api(server, "GET", "/admin/users/nobody/devices")
    assert (reply.status, reply.error_code) == (404, "not_found")
    reply = await api(server, "GET", "/admin/users/" + urllib.parse.quote("bad id!", safe="") + "/devices")
    assert (reply.status, reply.error_code) == (400, "bad_request")
    reply = await api(server, "GET", "/admin/users/alice/devices?all=maybe")
    assert reply.status == 400


async def test_a_users_tasks_with_owner_and_epoch(server, connect):
    ide = await connect("alice", "ide")
    assert (await api(server, "GET", "/admin/users/alice/tasks")).body == {"user": "alice", "tasks": []}
    lease = await ide.request("task.claim", task="agent")
    await ide.request("task.claim", task="primary")
    await ide.request("task.release", task="primary", epoch=1)
    reply = await api(server, "GET", "/admin/users/alice/tasks")
    assert reply.status == 200
    assert reply.body == {"user": "alice", "tasks": [
        {"task": "agent", "owner": "ide", "epoch": 1, "expires": lease["expires"], "live": True},
        {"task": "primary", "owner": None, "epoch": 1, "expires": 0, "live": False},
    ]}
    assert (await api(server, "GET", "/admin/users/nobody/tasks")).status == 404
    assert (await api(server, "GET", "/admin/users/alice/tasks?all=true")).status == 400


async def test_sessions_show_live_counters(server, connect):
    a1 = await connect("alice", "a1")
    a2 = await connect("alice", "a2")
    for n in range(5):
        await a1.send({"device": "a2"}, "t", n)
    await ping(a1)
    reply = await api(server, "GET", "/admin/sessions?device=a1")
    assert reply.status == 200
    [view] = reply.body["sessions"]
    assert view["session"] == a1.session_id
    assert (view["state"], view["connected"], view["resumable"]) == ("connected", True, False)
    # Live values from memory (the store is written only every few seconds): hello, five sends, ping.
    assert view["messages_in"] >= 7

    sessions = (await api(server, "GET", "/admin/sessions?user=alice")).body["sessions"]
    assert {s["device"] for s in sessions} == {"a1", "a2"}
    assert (await api(server, "GET", "/admin/sessions")).status == 200
    await a2.close()
    [ended] = (await api(server, "GET", "/admin/sessions?device=a2")).body["sessions"]
    assert ended["state"] == "disconnected" and ended["connected"] is False
    assert (await api(server, "GET", "/admin/sessions?device=nope")).status == 404
    assert (await api(server, "GET", "/admin/sessions?user=nobody")).status == 404
    assert (await api(server, "GET", "/admin/sessions?user=alice&user=bob")).status == 400


# ---- revocation ----------------------------------------------------------------------------------------


async def test_revoking_a_device_closes_its_connection_at_once(server, connect):
    watcher = await connect("alice", "watcher")
    phone = await connect("alice", "phone", reconnect=False)
    reply = await api(server, "POST", "/admin/devices/phone/revoke")
    assert reply.status == 200
    assert reply.body["device"]["id"] == "phone" and reply.body["device"]["status"] == "revoked"
    assert reply.body["device"]["revoked_at"] is not None
    closed = await asyncio.wait_for(asyncio.shield(phone.closed), 1.0)
    assert closed.code == 4410
    heard = [(await watcher.next_event("presence", timeout=5))["status"] for _ in range(2)]
    assert heard == ["online", "revoked"]
    with pytest.raises(ConnectionClosed):  # its token no longer opens a session
        await connect("alice", "phone", reconnect=False)

    reply = await api(server, "POST", "/admin/devices/phone/revoke")
    assert (reply.status, reply.error_code) == (409, "revoked")
    reply = await api(server, "POST", "/admin/devices/ghost/revoke")
    assert (reply.status, reply.error_code) == (404, "not_found")


async def test_revoking_a_session_closes_it_and_the_device_may_start_another(server, connect):
    phone = await connect("alice", "phone", reconnect=False)
    session_id = phone.session_id
    reply = await api(server, "POST", f"/admin/sessions/{session_id}/revoke")
    assert reply.status == 200
    assert (reply.body["session"], reply.body["user"], reply.body["device"]) == (session_id, "alice", "phone")
    closed = await asyncio.wait_for(asyncio.shield(phone.closed), 1.0)
    assert closed.code == 4410
    again = await connect("alice", "phone")
    assert again.session_id != session_id
    await server.hub.settle()
    reply = await api(server, "POST", f"/admin/sessions/{session_id}/revoke")
    assert (reply.status, reply.error_code) == (409, "revoked")
    reply = await api(server, "POST", "/admin/sessions/no-such-session/revoke")
    assert (reply.status, reply.error_code) == (404, "not_found")
    reply = await api(server, "POST", "/admin/sessions/" + "x" * 129 + "/revoke")
    assert reply.status == 400


# ---- publishing from the backend -------------------------------------------------------------------------


async def test_publish_with_ack_routes_queues_and_reports_receipts(server, connect):
    web = await connect("alice", "web", encoding="json")
    desk = await connect("alice", "desk", encoding="msgpack")
    laptop = await connect("alice", "laptop")
    await laptop.close()  # registered, offline: gets ack messages through its inbox
    await connect("bob", "bob-phone")

    reply = await api(server, "POST", "/admin/publish", {
        "user": "alice", "to": {"all": True}, "type": "notification", "body": {"text": "hi", "n": [1, 2.5]},
        "ack": True, "id": "pub-1", "priority": "HIGH"})
    assert reply.status == 200, reply.body
    result = reply.body
    assert (result["id"], result["ack"], result["duplicate"]) == ("pub-1", True, False)
    assert sorted(result["routed"]) == ["desk", "web"]
    assert result["queued"] == ["laptop"]
    assert result["failed"] == []
    statuses = [(r["status"], r.get("device")) for r in result["receipts"]]
    assert ("queued", "laptop") in statuses  # committed to the inbox before the response

    for client in (web, desk):
        message = await client.next_message(timeout=5)
        assert (message.sender, message.id, message.type) == (SERVER_SENDER, "pub-1", "notification")
        assert message.body == {"text": "hi", "n": [1, 2.5]}
        await ping(client)  # its ack has been handled
    stats = (await api(server, "GET", "/admin/stats")).body
    assert stats["backend"]["receipts"]["delivered"] == 2
    assert stats["backend"]["published"] == 1
    # Receipts for the backend are never kept for a device "server".
    await server.hub.settle()
    assert await server.hub.store.take_receipts(SERVER_SENDER) == []

    inbox = (await api(server, "GET", "/admin/devices/laptop/inbox")).body
    assert inbox["count"] == 1 and not inbox["more"]
    [queued] = inbox["messages"]
    assert (queued["from"], queued["msg_id"], queued["priority_name"]) == (SERVER_SENDER, "pub-1", "HIGH")
    assert queued["body"] == {"text": "hi", "n": [1, 2.5]}
    laptop = await connect("alice", "laptop")
    message = await laptop.next_message(timeout=5)
    assert (message.sender, message.id) == (SERVER_SENDER, "pub-1")

    # The same id and body again: a duplicate, nothing sent; another body: duplicate_id.
    again = await api(server, "POST", "/admin/publish", {
        "user": "alice", "to": {"all": True}, "type": "notification", "body": {"text": "hi", "n": [1, 2.5]},
        "ack": True, "id": "pub-1", "priority": "HIGH"})
    assert (again.status, again.body["duplicate"]) == (200, True)
    conflict = await api(server, "POST", "/admin/publish", {
        "user": "alice", "to": {"all": True}, "type": "notification", "body": "other", "ack": True, "id": "pub-1"})
    assert (conflict.status, conflict.error_code) == (409, "duplicate_id"), conflict.body


async def test_publish_pick_one_durable_and_failures(server, connect):
    phone = await connect("alice", "phone", type="mobile")
    await connect("alice", "desk", type="desktop")
    reply = await api(server, "POST", "/admin/publish", {
        "user": "alice", "to": {"type": "mobile", "pick": "one"}, "type": "t", "ack": True, "durable": True})
    assert reply.status == 200
    assert (reply.body["routed"], reply.body["queued"]) == ([], ["phone"])
    assert ("accepted", "phone") in [(r["status"], r.get("device")) for r in reply.body["receipts"]]
    assert reply.body["id"].startswith("srv-")  # generated when not given
    message = await phone.next_message(timeout=5)
    assert message.sender == SERVER_SENDER and message.body is None

    reply = await api(server, "POST", "/admin/publish", {
        "user": "alice", "to": {"devices": ["phone", "ghost"]}, "type": "t", "ack": True})
    assert reply.body["routed"] == ["phone"]
    assert reply.body["failed"] == [{"device": "ghost", "reason": "offline"}]
    reply = await api(server, "POST", "/admin/publish", {
        "user": "alice", "to": {"capability": "teleport"}, "type": "t", "ack": True})
    assert reply.body["failed"] == [{"device": None, "reason": "no_route"}]


async def test_publish_without_ack_and_refusals(server, connect):
    phone = await connect("alice", "phone", type="mobile", encoding="json")
    await connect("bob", "bob-phone")
    reply = await api(server, "POST", "/admin/publish", {"user": "alice", "to": {"device": "phone"}, "type": "ping",
                                                         "body": [1, "two", None]})
    assert reply.status == 200 and reply.body["ack"] is False
    message = await phone.next_message(timeout=5)
    assert (message.sender, message.body, message.ack) == (SERVER_SENDER, [1, "two", None], False)

    refusals = [
        ({"user": "alice", "to": {"type": "tv"}, "type": "t"}, 422, "no_route"),
        ({"user": "alice", "to": {"device": "bob-phone"}, "type": "t"}, 403, "forbidden"),
        ({"user": "nobody", "to": {"all": True}, "type": "t"}, 404, "not_found"),
        ({"user": "alice", "to": {"all": False}, "type": "t"}, 400, "bad_request"),
        ({"user": "alice", "to": {"all": True}}, 400, "bad_request"),
        ({"user": "alice", "to": {"all": True}, "type": "x" * 129}, 400, "too_large"),
        ({"user": "alice", "to": {"all": True}, "type": "t", "ttl": 10**400}, 400, "too_large"),
        ({"user": "alice", "to": {"all": True}, "type": "t", "durable": True}, 400, "bad_request"),
        ({"user": "alice", "to": {"all": True}, "type": "t", "from": "x"}, 400, "bad_request"),
        ({"user": 7, "to": {"all": True}, "type": "t"}, 400, "bad_request"),
        ({"user": "alice", "to": {"all": True}, "type": "t", "id": [1]}, 400, "bad_request"),
        ({"user": "alice", "to": {"all": True}, "type": "t", "id": 2**64}, 400, "bad_request"),
        ({"user": "alice", "to": {"all": True}, "type": "t", "ack": "yes"}, 400, "bad_request"),
        ([1, 2], 400, "bad_request"),
    ]
    for body, status, code in refusals:
        reply = await api(server, "POST", "/admin/publish", body)
        assert (reply.status, reply.error_code) == (status, code), body
    for raw in [b"", b"{", b'{"user": NaN}', "\u00e9".encode("latin-1")]:
        reply = await api(server, "POST", "/admin/publish", raw)
        assert (reply.status, reply.error_code) == (400, "bad_request"), raw


async def test_a_device_named_server_keeps_its_receipts_and_blocks_publishing_for_its_user(server, connect):
    impostor = await connect("carol", SERVER_SENDER)
    peer = await connect("carol", "peer")
    reply = await api(server, "POST", "/admin/publish", {"user": "carol", "to": {"all": True}, "type": "t"})
    assert (reply.status, reply.error_code) == (403, "forbidden")
    receipts, _ = await asyncio.gather(impostor.send({"device": "peer"}, "t", 1, ack=True),
                                       peer.next_message(timeout=5))
    assert [r.status for r in receipts] == ["delivered"]  # its own receipts still reach it


# ---- inboxes and dead letters ------------------------------------------------------------------------------


async def make_dead_letters(server, device, user, count):
    store = server.hub.store
    outcome = await store.enqueue([
        QueuedMessage(device=device, user=user, sender_device="someone", msg_id=f"m-{n}", type="t",
                      body=msgpack.packb({"n": n}), ts=server.hub.now(), receipt=True, attempts=5)
        for n in range(count)], 1000, 1 << 30, "reject")
    await store.dead_letter([m.id for m in outcome.stored], "undeliverable", server.hub.now())
    return [m.id for m in outcome.stored]


async def test_inbox_listing_and_purge(server, connect):
    laptop = await connect("alice", "laptop")
    await laptop.close()
    for n in range(3):
        reply = await api(server, "POST", "/admin/publish", {"user": "alice", "to": {"device": "laptop"},
                                                             "type": "t", "body": n, "ack": True})
        assert reply.body["queued"] == ["laptop"]
    inbox = (await api(server, "GET", "/admin/devices/laptop/inbox?limit=2")).body
    assert (inbox["count"], len(inbox["messages"]), inbox["more"]) == (3, 2, True)
    assert [m["body"] for m in inbox["messages"]] == [0, 1]
    reply = await api(server, "POST", "/admin/devices/laptop/inbox/purge")
    assert reply.body == {"device": "laptop", "purged": 3}
    assert (await api(server, "GET", "/admin/devices/laptop/inbox")).body["count"] == 0
    assert (await api(server, "GET", "/admin/devices/ghost/inbox")).status == 404
    assert (await api(server, "POST", "/admin/devices/ghost/inbox/purge")).status == 404
    assert (await api(server, "GET", "/admin/devices/laptop/inbox?limit=0")).status == 400


async def test_dead_letters_listing_and_redrive(server, connect):
    phone = await connect("alice", "phone")
    await server.hub.settle()  # its inbox has been read: new inbox messages go to it at once
    ids = await make_dead_letters(server, "phone", "alice", 3)
    listed = (await api(server, "GET", "/admin/deadletters?user=alice")).body
    assert [d["id"] for d in listed["dead_letters"]] == ids and listed["more"] is False
    assert listed["dead_letters"][0]["reason"] == "undeliverable"
    assert listed["dead_letters"][0]["body"] == {"n": 0}
    assert (await api(server, "GET", "/admin/deadletters?device=phone&limit=1")).body["more"] is True

    reply = await api(server, "POST", "/admin/deadletters/redrive", {"ids": [ids[0], 999999]})
    assert (reply.status, reply.error_code) == (404, "not_found")
    reply = await api(server, "POST", "/admin/deadletters/redrive", {"ids": [ids[0]]})
    assert reply.body == {"redriven": 1, "devices": {"phone": 1}, "expired": 0}
    # In the server's process a connected device need not reconnect: it gets it at once.
    message = await phone.next_message(timeout=5)
    assert (message.id, message.body) == ("m-0", {"n": 0})
    reply = await api(server, "POST", "/admin/deadletters/redrive", {"device": "phone"})
    assert reply.body["redriven"] == 2
    assert {(await phone.next_message(timeout=5)).id for _ in range(2)} == {"m-1", "m-2"}
    assert (await api(server, "GET", "/admin/deadletters")).body["dead_letters"] == []

    for body, status in [({"ids": [1], "device": "phone"}, 400), ({}, 400), ({"ids": []}, 400),
                         ({"ids": [True]}, 400), ({"device": "ghost"}, 404), ({"device": 5}, 400)]:
        assert (await api(server, "POST", "/admin/deadletters/redrive", body)).status == status, body
    gone = await connect("alice", "gone")
    [dead] = await make_dead_letters(server, "gone", "alice", 1)
    await gone.close()
    assert (await api(server, "POST", "/admin/devices/gone/revoke")).status == 200
    reply = await api(server, "POST", "/admin/deadletters/redrive", {"device": "gone"})
    assert (reply.status, reply.error_code) == (409, "revoked")
    reply = await api(server, "POST", "/admin/deadletters/redrive", {"ids": [dead]})
    assert (reply.status, reply.error_code) == (409, "revoked")
    assert (await api(server, "GET", "/admin/deadletters?user=nobody")).status == 404


# ---- the HTTP layer --------------------------------------------------------------------------------------------


async def raw_exchange(server, data, read_until_close=True):
    url = urllib.parse.urlsplit(server.http_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(data)
    await writer.drain()
    try:
        if read_until_close:
            return await asyncio.wait_for(reader.read(), 5)
        return await asyncio.wait_for(reader.read(65536), 5)
    finally:
        writer.close()


async def test_keep_alive_serves_several_requests_on_one_connection(server):
    def several():
        conn = connection(server.http_url)
        replies, sockets = [], []
        for method, path, body in [("GET", "/admin/stats", None), ("GET", "/healthz", None),
                                   ("POST", "/admin/publish", b"{}"), ("GET", "/nope", None),
                                   ("GET", "/metrics", None)]:
            replies.append(exchange(conn, method, path, body))
            sockets.append(conn.sock)
        conn.close()
        return replies, sockets

    replies, sockets = await asyncio.to_thread(several)
    assert [r.status for r in replies] == [200, 200, 400, 404, 200]
    assert sockets[0] is not None and all(sock is sockets[0] for sock in sockets)  # one connection throughout


async def test_malformed_requests_get_400_and_a_close(server):
    for garbage in [b"NOT HTTP\r\n\r\n", b"GET / HTTP/1.1\r\nHost: x\r\nbad header\r\n\r\n",
                    b"GET /healthz HTTP/1.1\r\nHost: x\r\nContent-Length: nope\r\n\r\n"]:
        answer = await raw_exchange(server, garbage)
        assert answer.startswith(b"HTTP/1.1 400 "), answer


async def test_bodies_over_a_mebibyte_get_413(server):
    head = (f"POST /admin/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Length: {2 * 1024 * 1024}\r\n\r\n").encode()
    answer = await raw_exchange(server, head)  # refused from the head alone, the body never sent
    assert answer.startswith(b"HTTP/1.1 413 ") and b'"too_large"' in answer
    chunked = (f"POST /admin/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
               "Transfer-Encoding: chunked\r\n\r\n").encode()
    chunk = b"%x\r\n%s\r\n" % (300_000, b"a" * 300_000)
    answer = await raw_exchange(server, chunked + chunk * 4)  # read (and dropped) after the answer
    assert answer.startswith(b"HTTP/1.1 413 ")


async def test_expect_100_continue(server):
    body = json.dumps({"user": "nobody", "to": {"all": True}, "type": "t"}).encode()
    head = (f"POST /admin/publish HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nExpect: 100-continue\r\n"
            "Connection: close\r\n\r\n").encode()
    url = urllib.parse.urlsplit(server.http_url)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    writer.write(head)
    interim = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    assert interim.startswith(b"HTTP/1.1 100 ")
    writer.write(body)
    answer = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    assert answer.startswith(b"HTTP/1.1 404 ") and b'"not_found"' in answer


async def test_slow_requests_get_408_and_idle_connections_are_closed():
    async def handler(request):
        return text_response(200, "ok\n")

    http_server = HttpServer(handler, request_timeout=0.2, idle_timeout=0.4)
    await http_server.start("127.0.0.1", 0)
    port = http_server.sockets[0].getsockname()[1]
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n")  # the head never ends
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 408 ")
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\nabc")  # nor the body
        assert (await asyncio.wait_for(reader.read(), 5)).startswith(b"HTTP/1.1 408 ")
        writer.close()
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\nGET /y HTTP/1.1\r\nHost: x\r\n\r\n")  # pipelined
        answers = await asyncio.wait_for(reader.read(), 5)  # both answered, then closed once idle, silently
        assert answers.count(b"HTTP/1.1 200 ") == 2 and b"408" not in answers
        writer.close()
    finally:
        http_server.close()
        await http_server.wait_closed()


async def test_shutdown_closes_idle_keep_alive_connections():
    async with running_server(admin_key=KEY) as server:
        url = urllib.parse.urlsplit(server.http_url)
        reader, writer = await asyncio.open_connection(url.hostname, url.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        assert (await asyncio.wait_for(reader.readuntil(b"ok\n"), 5)).startswith(b"HTTP/1.1 200 ")
    with contextlib.suppress(ConnectionResetError):
        assert await asyncio.wait_for(reader.read(), 5) == b""  # the server closed it while stopping
    writer.close()


# ---- generated requests from docs/openapi.json ---------------------------------------------------------------

COMPONENTS = OPENAPI["components"]
ID_PATTERN = COMPONENTS["schemas"]["Id"]["pattern"]
KNOWN_IDS = ["alice", "bob", "a-live", "a-off", "b-live", "nobody", "ghost", SERVER_SENDER]
METHODS = ["GET", "POST", "PUT", "DELETE", "PATCH", "HEAD", "OPTIONS"]
OPERATIONS = [(path, method.upper(), operation) for path, item in OPENAPI["paths"].items()
              for method, operation in item.items()]
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=12,
)


def resolve(schema):
    while "$ref" in schema:
        section, name = schema["$ref"].split("/")[-2:]
        schema = COMPONENTS[section][name]
    return schema


def from_schema(schema):
    """A strategy for (mostly) valid instances of the subset of JSON Schema docs/openapi.json uses."""
    schema = resolve(schema)
    if "const" in schema:
        return st.just(schema["const"])
    if "enum" in schema:
        return st.sampled_from(schema["enum"])
    if schema.get("pattern") == ID_PATTERN:  # mostly ids the server knows, so that requests get past lookups
        return st.integers(0, 4).flatmap(lambda n: st.from_regex(ID_PATTERN, fullmatch=True) if n == 0
                                         else st.sampled_from(KNOWN_IDS))
    kind = schema.get("type")
    if kind is None and "properties" not in schema:
        if "oneOf" in schema:
            return st.one_of([from_schema(sub) for sub in schema["oneOf"]])
        return json_values
    if isinstance(kind, list):
        return st.one_of([from_schema({**schema, "type": one}) for one in kind])
    if kind == "object" or "properties" in schema:
        return objects(schema)
    if kind == "string":
        return st.text(min_size=schema.get("minLength", 0), max_size=min(schema.get("maxLength", 30), 30))
    if kind == "integer":
        return st.integers(schema.get("minimum"), schema.get("maximum"))
    if kind == "number":
        low = schema.get("exclusiveMinimum", schema.get("minimum"))
        return st.floats(low, schema.get("maximum"), exclude_min="exclusiveMinimum" in schema,
                         allow_nan=False, allow_infinity=False)
    if kind == "boolean":
        return st.booleans()
    if kind == "null":
        return st.none()
    if kind == "array":
        return st.lists(from_schema(schema.get("items", {})), min_size=schema.get("minItems", 0),
                        max_size=min(schema.get("maxItems", 4), 4))
    raise AssertionError(f"schema not handled: {schema}")


@st.composite
def objects(draw, schema):
    required = list(schema.get("required", []))
    excluded = set()
    if "oneOf" in schema:  # branches naming which one of some properties is there (the selector)
        chosen = draw(st.sampled_from(schema["oneOf"])).get("required", [])
        required += chosen
        excluded = {name for branch in schema["oneOf"] for name in branch.get("required", [])} - set(chosen)
    value = {}
    for name, sub in schema.get("properties", {}).items():
        if name in required or (name not in excluded and draw(st.booleans())):
            value[name] = draw(from_schema(sub))
    return value


@st.composite
def segment(draw, schema):
    value = draw(from_schema(schema) | st.text(max_size=12) | st.just(""))
    return urllib.parse.quote(str(value), safe="")


@st.composite
def generated_requests(draw):
    """(method, target, body bytes or None, headers)."""
    shape = draw(st.sampled_from(["documented"] * 8 + ["any admin path", "any path"]))
    body = None
    if shape == "documented":
        template, method, operation = draw(st.sampled_from(OPERATIONS))
        params = [resolve(p) for p in operation.get("parameters", [])]
        path = template
        for param in params:
            if param["in"] == "path":
                path = path.replace("{" + param["name"] + "}", draw(segment(param["schema"])))
        query = []
        for param in params:
            if param["in"] == "query" and draw(st.booleans()):
                value = draw(from_schema(param["schema"]).map(lambda v: json.dumps(v) if isinstance(v, bool)
                                                               else str(v)) | st.text(max_size=8))
                query.append((param["name"], value))
        if draw(st.integers(0, 9)) == 0:
            query.append((draw(st.text(min_size=1, max_size=6)), "1"))
        if query:
            path += "?" + urllib.parse.urlencode(query)
        if draw(st.integers(0, 9)) == 0:
            method = draw(st.sampled_from(METHODS))
        if "requestBody" in operation:
            schema = operation["requestBody"]["content"]["application/json"]["schema"]
            kind = draw(st.sampled_from(["schema"] * 4 + ["plausible"] * 2 + ["any JSON", "bytes"]))
            if kind in ("schema", "plausible"):
                value = draw(from_schema(schema))
                if kind == "plausible" and operation["operationId"] == "publish":  # more that go through
                    value.update(user=draw(st.sampled_from(["alice", "bob"])), ack=draw(st.booleans()))
                    value.pop("first_ack", None)
                    if not value["ack"]:
                        value.pop("durable", None)
                body = json.dumps(value).encode()
            elif kind == "any JSON":
                body = json.dumps(draw(json_values)).encode()
            else:
                body = draw(st.binary(max_size=40))
    elif shape == "any admin path":
        method = draw(st.sampled_from(METHODS))
        parts = draw(st.lists(st.sampled_from(["users", "devices", "sessions", "inbox", "revoke", "purge",
                                               "deadletters", "redrive", "publish", "stats", "alice", ""])
                              | st.text(max_size=6), max_size=5))
        path = "/admin/" + "/".join(urllib.parse.quote(p, safe="") for p in parts)
    else:
        method = draw(st.sampled_from(METHODS))
        path = "/" + urllib.parse.quote(draw(st.text(max_size=12)), safe="/")
    if body is None and method in ("POST", "PUT", "PATCH") and draw(st.booleans()):
        body = draw(json_values.map(lambda v: json.dumps(v).encode()))
    auth = draw(st.sampled_from(["right"] * 8 + ["none", "wrong", "basic"]))
    headers = {"right": {"Authorization": f"Bearer {KEY}"}, "none": {}, "wrong": {"Authorization": "Bearer nope"},
               "basic": {"Authorization": f"Basic {KEY}"}}[auth]
    return method, path, body, headers


def documented_outcome(method, target, authorized):
    """(operation or None, the statuses the document allows) for a request."""
    path = target.split("?", 1)[0]
    if path == "/admin" or path.startswith("/admin/"):
        if not authorized:
            return None, {401}
        try:
            segments = [urllib.parse.unquote(s, errors="strict") for s in path.split("/")]
        except UnicodeDecodeError:
            return None, {400}
        matched = False
        for template, operation_method, operation in OPERATIONS:
            parts = template.split("/")
            if len(parts) == len(segments) and all(
                    (p.startswith("{") and s) or p == s for p, s in zip(parts, segments, strict=True)):
                matched = True
                if method == operation_method:
                    return operation, {int(code) for code in operation["responses"]}
        return None, {405} if matched else {404}
    if method != "GET":
        return None, {405}  # outside /admin/ only GET is served, as it always was
    for template, operation_method, operation in OPERATIONS:
        if template == path and method == operation_method:
            return operation, {int(code) for code in operation["responses"]}
    return None, {404}


def response_validator(operation, status):
    response = resolve(operation["responses"][str(status)])
    content = response.get("content", {}).get("application/json")
    if content is None:
        return None
    return Draft202012Validator({**content["schema"], "components": COMPONENTS})


class ThreadServer:
    """A server with the admin API on its own event loop thread: hypothesis drives it with blocking requests."""

    def __init__(self):
        self.loop = uvloop.new_event_loop()
        self.ready = threading.Event()
        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(self._main(),), daemon=True)
        self.stopping = None
        self.server = None
        self.failure = None

    async def _main(self):
        self.stopping = asyncio.Event()
        try:
            async with running_server(admin_key=KEY, inbox_max_messages=50) as server:
                self.server = server
                live = [Client(server.ws_url, server.issue_token(user, device), {"type": "desktop"},
                               encoding=encoding)
                        for user, device, encoding in [("alice", "a-live", "json"), ("bob", "b-live", "msgpack")]]
                for client in live:
                    await client.connect()
                off = Client(server.ws_url, server.issue_token("alice", "a-off"), {"type": "mobile"})
                await off.connect()
                await off.close()
                await make_dead_letters(server, "a-off", "alice", 3)
                self.ready.set()
                await self.stopping.wait()
                for client in live:
                    with contextlib.suppress(Exception):
                        await client.close()
        except BaseException as exc:  # reported to the test thread
            self.failure = exc
            self.ready.set()

    def __enter__(self):
        self.thread.start()
        assert self.ready.wait(20), "the server thread did not start"
        if self.failure is not None:
            raise self.failure
        return self

    def __exit__(self, *exc):
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(20)


@pytest.fixture(scope="module")
def thread_server():
    with ThreadServer() as running:
        yield running


@pytest.fixture(scope="module")
def keep_alive(thread_server):
    holder = {"conn": connection(thread_server.server.http_url)}
    yield holder
    holder["conn"].close()


# 1,000 request round trips, each answer checked against the OpenAPI document: about 5 s on a quiet 2-core
# machine, and proportionally longer on a loaded one. The suite's 60 s timeout is there to catch a hang, not to
# time this test; 300 s still catches a hang.
@pytest.mark.timeout(300)
@settings(max_examples=1000, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow,
                                 HealthCheck.data_too_large])
@given(generated=generated_requests())
def test_generated_requests_get_documented_answers(thread_server, keep_alive, generated):
    method, target, body, headers = generated
    try:
        reply = exchange(keep_alive["conn"], method, target, body, key=None, headers=headers)
    except (ConnectionError, OSError):
        keep_alive["conn"] = connection(thread_server.server.http_url)  # closed after a 400/413: reconnect
        reply = exchange(keep_alive["conn"], method, target, body, key=None, headers=headers)
    authorized = headers.get("Authorization") == f"Bearer {KEY}"
    operation, allowed = documented_outcome(method, target, authorized)
    event(f"{operation['operationId'] if operation else 'other'} -> {reply.status}")
    assert reply.status < 500, (method, target, body, reply.body)
    assert reply.status in allowed, (method, target, body, reply.status, reply.body, allowed)
    if method == "HEAD":
        assert reply.raw == b""
        return
    if reply.status == 401:
        assert reply.error_code == "unauthorized" and "www-authenticate" in reply.headers
    if reply.status == 405:
        assert reply.headers.get("allow")
    if operation is not None:
        validator = response_validator(operation, reply.status)
        if validator is not None:
            errors = [error.message for error in validator.iter_errors(reply.body)]
            assert not errors, (method, target, reply.status, reply.body, errors)
    elif target.split("?")[0].startswith("/admin/") and authorized:
        assert reply.error_code is not None, (method, target, reply.body)
