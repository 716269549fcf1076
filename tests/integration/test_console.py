"""The web console's files at /console/ (rccs/transport/console.py) and the ``devices`` counts it shows."""

import asyncio

import msgpack
import pytest

from rccs.client import ClientError
from rccs.store import QueuedMessage
from rccs.transport.console import CONSOLE_DIR

CONSOLE_FILES = {"index.html": "text/html; charset=utf-8", "console.js": "text/javascript; charset=utf-8",
                 "console.css": "text/css; charset=utf-8"}


async def raw_request(server, method, target, *headers):
    """One HTTP/1.1 request with ``target`` exactly as given (no client normalises it): (status, headers, body)."""
    host, port = server.http_url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    head = [f"{method} {target} HTTP/1.1", f"Host: {host}:{port}", "Connection: close", *headers, "", ""]
    writer.write("\r\n".join(head).encode())
    response = await asyncio.wait_for(reader.read(), 5)
    writer.close()
    head_bytes, _, body = response.partition(b"\r\n\r\n")
    lines = head_bytes.decode().split("\r\n")
    fields = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        fields.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), fields, body


async def test_console_files_are_served_with_their_types_and_revalidated_by_etag(server):
    for name, content_type in CONSOLE_FILES.items():
        status, headers, body = await raw_request(server, "GET", f"/console/{name}")
        assert status == 200, name
        assert headers["content-type"] == [content_type]
        assert body == (CONSOLE_DIR / name).read_bytes()
        assert headers["cache-control"] == ["no-cache"]
        assert headers["x-content-type-options"] == ["nosniff"]
        assert "script-src 'self'" in headers["content-security-policy"][0]
        etag = headers["etag"][0]
        status, headers, body = await raw_request(server, "GET", f"/console/{name}", f"If-None-Match: {etag}")
        assert (status, body) == (304, b"")
    status, headers, body = await raw_request(server, "GET", "/console/")
    assert (status, body) == (200, (CONSOLE_DIR / "index.html").read_bytes())
    status, headers, _ = await raw_request(server, "GET", "/console")
    assert (status, headers["location"]) == (301, ["/console/"])
    status, headers, body = await raw_request(server, "HEAD", "/console/console.js")
    assert (status, body) == (200, b"")
    assert headers["content-length"] == [str(len((CONSOLE_DIR / "console.js").read_bytes()))]
    status, headers, _ = await raw_request(server, "POST", "/console/index.html", "Content-Length: 0")
    assert (status, headers["allow"]) == (405, ["GET, HEAD"])


async def test_config_names_the_websocket_port(server):
    status, headers, body = await raw_request(server, "GET", "/console/config.json")
    assert status == 200 and headers["content-type"] == ["application/json"]
    port = int(server.ws_url.rsplit(":", 1)[1].split("/")[0])
    assert body.decode() == f'{{"ws_url": null, "ws_port": {port}, "ws_path": "/v1", "tls": false}}'


@pytest.mark.parametrize("target", [
    "/console/../pyproject.toml", "/console/..%2f..%2fpyproject.toml", "/console/%2e%2e/%2e%2e/README.md",
    "/console//etc/passwd", "/console/console.js/", "/console/nope.js", "/console/transport/console.py",
    "/console/..\\..\\setup.py",
])
async def test_nothing_but_the_console_files_is_reachable(server, target):
    status, _, body = await raw_request(server, "GET", target)
    assert (status, body) == (404, b"not found\n")


async def test_devices_with_counts_carry_inbox_and_dead_letters(server, connect):
    desktop = await connect("alice", "desktop")
    phone = await connect("alice", "phone", type="mobile")
    await connect("alice", "slow")
    await phone.close()
    receipts = await desktop.send({"device": "phone"}, "t", "for later", ack=True)
    assert [(r.status, r.device) for r in receipts] == [("queued", "phone")]
    store = server.hub.store  # two dead letters of the slow device, made as in the admin API's tests
    outcome = await store.enqueue([
        QueuedMessage(device="slow", user="alice", sender_device="desktop", msg_id=f"m-{n}", type="t",
                      body=msgpack.packb(n), ts=server.hub.now(), receipt=True, attempts=5) for n in range(2)],
        1000, 1 << 30, "reject")
    await store.dead_letter([m.id for m in outcome.stored], "undeliverable", server.hub.now())
    plain = await desktop.devices()
    assert all("inbox" not in device and "dead_letters" not in device for device in plain)
    counted = {device["id"]: (device["inbox"], device["dead_letters"])
               for device in (await desktop.request("devices", counts=True))["devices"]}
    assert counted == {"desktop": (0, 0), "phone": (1, 0), "slow": (0, 2)}
    with pytest.raises(ClientError) as refused:
        await desktop.request("devices", counts="yes")
    assert refused.value.code == "bad_request"
