"""The HTTP side: health, readiness and Prometheus metrics of a real server."""

import asyncio
import urllib.error
import urllib.request

import pytest
import websockets
import websockets.exceptions

from rccs.client import ConnectionClosed


async def http_get(url):
    def fetch():
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return response.status, response.headers.get("Content-Type"), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.headers.get("Content-Type"), exc.read().decode()

    return await asyncio.get_running_loop().run_in_executor(None, fetch)


def metric_value(text, name, **labels):
    wanted = ",".join(f'{key}="{value}"' for key, value in labels.items())
    prefix = f"{name}{{{wanted}}} " if labels else f"{name} "
    for line in text.splitlines():
        if line.startswith(prefix):
            return float(line[len(prefix):])
    raise AssertionError(f"{prefix!r} not in metrics")


async def test_healthz_and_readyz(server):
    assert (await http_get(server.http_url + "/healthz"))[0] == 200
    status, _, body = await http_get(server.http_url + "/readyz")
    assert (status, body) == (200, "ready\n")
    assert (await http_get(server.http_url + "/nope"))[0] == 404


async def test_readyz_is_503_while_draining(server):
    server.hub.accepting = False
    assert (await http_get(server.http_url + "/readyz"))[0] == 503
    server.hub.accepting = True


async def test_metrics_count_connections_routes_latency_and_errors(server, connect):
    phone = await connect("alice", "p", type="mobile")
    desktop = await connect("alice", "d", type="desktop", capabilities=["file_sync"])
    await connect("alice", "d2", type="desktop")
    receipts, _ = await asyncio.gather(
        phone.send({"device": "d"}, "t", 1, ack=True), desktop.next_message(timeout=5)
    )
    assert receipts[0].status == "delivered"
    await phone.send({"capability": "teleport"}, "t", 1, ack=True)
    await phone.send({"device": "ghost"}, "t", 1, ack=True)
    phone._send({"op": "bogus"})
    error = await asyncio.wait_for(phone.errors.get(), 5)
    assert error.code == "unknown_op"

    status, content_type, text = await http_get(server.http_url + "/metrics")
    assert status == 200
    assert content_type.startswith("text/plain")
    assert metric_value(text, "rccs_connections", device_type="desktop") == 2
    assert metric_value(text, "rccs_connections", device_type="mobile") == 1
    assert metric_value(text, "rccs_connections_open") == 3
    assert metric_value(text, "rccs_messages_routed_total", result="routed") == 1
    assert metric_value(text, "rccs_messages_routed_total", result="no_route") == 1
    assert metric_value(text, "rccs_messages_routed_total", result="offline") == 1
    assert metric_value(text, "rccs_routing_latency_seconds_count") == 3
    assert metric_value(text, "rccs_routing_latency_seconds_bucket", le="+Inf") == 3
    assert metric_value(text, "rccs_errors_total", code="unknown_op") == 1
    assert metric_value(text, "rccs_messages_total", direction="out") == 1
    from rccs import _fastpath
    assert metric_value(text, "rccs_info", implementation=_fastpath.IMPLEMENTATION, node=server.node.node_id,
                        version="0.1.0") == 1
    assert metric_value(text, "process_resident_memory_bytes") > 0


@pytest.mark.parametrize("path", ["/healthz", "/metrics"])
async def test_http_port_does_not_upgrade_websockets(server, path):
    with pytest.raises(websockets.exceptions.InvalidStatus):
        await websockets.connect(server.http_url.replace("http", "ws") + path)


async def test_receipts_for_an_offline_sender_are_counted_as_kept_and_reach_it_later(server, connect):
    desktop = await connect("alice", "desktop", reconnect=False)
    phone = await connect("alice", "phone", auto_ack=False)
    sending = asyncio.create_task(desktop.send({"device": "phone"}, "note", "hi", ack=True))
    message = await phone.next_message(timeout=5)
    await desktop.close()
    with pytest.raises(ConnectionClosed):  # the sender stopped waiting when it closed
        await sending
    await phone.ack(message.seq)
    await phone.ping()  # answered after the ack before it: the receipt found no connection of its sender

    text = (await http_get(server.http_url + "/metrics"))[2]
    assert metric_value(text, "rccs_receipts_undeliverable_total") == 1
    # Its help says what happens to such a receipt, as docs/operations.md does.
    assert ("# HELP rccs_receipts_undeliverable_total Receipts their sender device was offline for: kept in the "
            "store, sent after its next welcome") in text.splitlines()
    again = await connect("alice", "desktop")
    kept = await asyncio.wait_for(again.receipts.get(), 5)
    assert (kept.id, kept.status, kept.device) == (message.id, "delivered", "phone")
