"""TLS: with tls_cert and tls_key both listeners speak TLS (wss:// and https://), with a certificate made here."""

import asyncio
import datetime
import http.client
import ipaddress
import json
import ssl
from urllib.parse import urlparse

import pytest
import websockets
from adminhttp import KEY, api
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from rccs.client import Client
from rccs.config import ConfigError, Settings
from rccs.node import Node
from rccs.testing import running_server


@pytest.fixture(scope="module")
def certificate(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1 and localhost: (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "rccs test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                    x509.DNSName("localhost")]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(key, hashes.SHA256())
    )
    directory = tmp_path_factory.mktemp("tls")
    cert_path = directory / "cert.pem"
    key_path = directory / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return str(cert_path), str(key_path)


@pytest.fixture
def trusting(certificate):
    """A client SSL context that trusts the test certificate (and nothing else)."""
    return ssl.create_default_context(cafile=certificate[0])


@pytest.fixture
async def tls_server(certificate):
    async with running_server(tls_cert=certificate[0], tls_key=certificate[1], admin_key=KEY) as running:
        yield running


async def test_urls_say_wss_and_https(tls_server):
    assert tls_server.ws_url.startswith("wss://127.0.0.1:")
    assert tls_server.http_url.startswith("https://127.0.0.1:")


async def test_python_clients_talk_over_wss(tls_server, trusting):
    async with Client(tls_server.ws_url, tls_server.issue_token("alice", "phone"), {"type": "mobile"},
                      ssl=trusting) as phone, \
            Client(tls_server.ws_url, tls_server.issue_token("alice", "desk"), {"type": "desktop"},
                   encoding="json", ssl=trusting) as desk:
        receipts, message = await asyncio.gather(
            phone.send({"device": "desk"}, "note", {"text": "over TLS"}, ack=True), desk.next_message(timeout=5))
        assert [r.status for r in receipts] == ["delivered"]
        assert (message.sender, message.body) == ("phone", {"text": "over TLS"})
        for n in range(20):  # several messages, both ways
            await desk.send({"device": "phone"}, "n", n)
        assert [(await phone.next_message(timeout=5)).body for _ in range(20)] == list(range(20))


async def test_websockets_library_over_wss(tls_server, trusting):
    async with Client(tls_server.ws_url, tls_server.issue_token("alice", "desk"), {"type": "desktop"},
                      ssl=trusting) as desk, \
            websockets.connect(tls_server.ws_url, ssl=trusting) as ws:
        await ws.send(json.dumps({"op": "hello", "token": tls_server.issue_token("alice", "web"),
                                  "device": {"type": "web"}}))
        welcome = json.loads(await asyncio.wait_for(ws.recv(), 5))
        assert (welcome["op"], welcome["device"]) == ("welcome", "web")
        await ws.send(json.dumps({"op": "send", "id": "w1", "to": {"device": "desk"}, "type": "t", "body": "hi",
                                  "ack": True}))
        message = await desk.next_message(timeout=5)
        assert (message.sender, message.id, message.body) == ("web", "w1", "hi")
        statuses = []
        while "delivered" not in statuses:
            envelope = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if envelope["op"] == "receipt":
                statuses.append(envelope["status"])
        assert statuses == ["routed", "delivered"]
        await desk.send({"device": "web"}, "t", {"back": True})
        while True:
            envelope = json.loads(await asyncio.wait_for(ws.recv(), 5))
            if envelope["op"] == "msg":
                break
        assert (envelope["from"], envelope["body"]) == ("desk", {"back": True})


async def test_https_health_metrics_and_admin_api(tls_server, trusting):
    reply = await api(tls_server, "GET", "/healthz", key=None, context=trusting)
    assert (reply.status, reply.body) == (200, "ok\n")
    assert (await api(tls_server, "GET", "/metrics", key=None, context=trusting)).status == 200
    reply = await api(tls_server, "GET", "/admin/stats", context=trusting)
    assert reply.status == 200 and reply.body["ready"] is True


async def test_plain_and_untrusting_clients_are_refused(tls_server):
    port = int(tls_server.http_url.rsplit(":", 1)[1])

    def plain_http():
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=5)
        try:
            conn.request("GET", "/healthz")
            return conn.getresponse().status
        finally:
            conn.close()

    with pytest.raises((ConnectionError, http.client.HTTPException, OSError)):
        await asyncio.to_thread(plain_http)
    with pytest.raises(ssl.SSLCertVerificationError):  # the system's CAs do not vouch for a self-signed cert
        await api(tls_server, "GET", "/healthz", key=None, context=ssl.create_default_context())
    client = Client(tls_server.ws_url, tls_server.issue_token("alice", "x"), {"type": "web"}, reconnect=False)
    with pytest.raises(ssl.SSLCertVerificationError):
        await client.connect()
    assert (await api(tls_server, "GET", "/healthz", key=None,
                      context=ssl.create_default_context(cafile=tls_server.node.settings.tls_cert))).status == 200


def test_certificate_and_key_go_together(certificate, tmp_path):
    with pytest.raises(ConfigError, match="go together"):
        Node(Settings(data_dir=str(tmp_path), store="memory", tls_cert=certificate[0]))
    with pytest.raises(ConfigError, match="cannot load"):
        Node(Settings(data_dir=str(tmp_path), store="memory", tls_cert=certificate[1], tls_key=certificate[0]))


async def test_an_oversized_upgrade_head_over_tls_is_answered_431(tls_server, trusting):
    # Over TLS the server cannot half-close: it answers, discards what still comes, and the client closes.
    url = urlparse(tls_server.ws_url)
    for padding, status in [(15 * 1024, b"101"), (64 * 1024, b"431")]:
        reader, writer = await asyncio.open_connection(url.hostname, url.port, ssl=trusting)
        writer.write((f"GET {url.path} HTTP/1.1\r\nHost: {url.netloc}\r\nUpgrade: websocket\r\n"
                      "Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      f"Sec-WebSocket-Version: 13\r\nX-Padding: {'a' * padding}\r\n\r\n").encode())
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 " + status + b" "), head
        if status == b"431":
            length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
            assert (await asyncio.wait_for(reader.readexactly(length), 5)).startswith(b"the request line")
        writer.close()
