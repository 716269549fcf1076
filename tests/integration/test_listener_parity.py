"""The compiled listener and its pure-Python twin, over real sockets: same frames in, same frames out.

The direct-path rules (which sends and acks the listener handles itself, which it hands to the session)
and the server's frame headers exist twice, in ``_listener.pyx`` and ``listener.py``. Here both serve
the same random frame sequences and every device's transcript must be identical; the direct path must
really be taken for the plain cases; and server frames of every header size (7-bit, 16-bit and 64-bit
length) reach the client intact.
"""

import asyncio
import contextlib
import importlib
import os
import struct
import tracemalloc
import types
import zlib

import msgpack
import pytest
import uvloop
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from rawws import masked_frame, open_raw

from rccs.testing import running_server

py_listener = importlib.import_module("rccs._fastpath.listener")
if os.environ.get("RCCS_PUREPYTHON") == "1":
    # The compiled listener needs the compiled routing table (a typed field), which a pure run's hub does
    # not have: here only the twin serves; the compiled run compares both.
    cy_listener = None
    LISTENERS = pytest.mark.parametrize("listener", [py_listener], ids=["python"])
else:
    from rccs._fastpath import _listener as cy_listener

    LISTENERS = pytest.mark.parametrize("listener", [py_listener, cy_listener], ids=["python", "cython"])
USER = "pat"
SENDER, TWIN, JSON_PEER, OFFLINE = "pat-sender", "pat-msgpack", "pat-json", "pat-offline"
TIME_FIELDS = ("ts", "server_time", "session", "heartbeat")


# ---- a raw device: exact frames, nothing hidden ---------------------------------------------------


class RawDevice:
    """A WebSocket client that records every frame the server sends, header bytes included."""

    def __init__(self, reader, writer, encoding):
        self.reader, self.writer, self.encoding = reader, writer, encoding
        self.transcript = []  # decoded envelopes, time fields removed
        self.headers = []  # (first byte, length code, length) of every frame received

    @classmethod
    async def connect(cls, server, device, encoding="msgpack"):
        reader, writer = await open_raw(server.ws_url)
        self = cls(reader, writer, encoding)
        await self.send({"op": "hello", "token": server.issue_token(USER, device), "device": {"type": "web"}})
        welcome = await self.read()
        assert welcome["op"] == "welcome", welcome
        return self

    async def send(self, envelope):
        if self.encoding == "json":
            import json

            self.writer.write(masked_frame(json.dumps(envelope).encode(), opcode=0x1))
        else:
            self.writer.write(masked_frame(msgpack.packb(envelope, use_bin_type=True)))
        await self.writer.drain()

    async def send_bytes(self, payload):
        self.writer.write(masked_frame(payload))
        await self.writer.drain()

    async def read(self):
        first, second = await asyncio.wait_for(self.reader.readexactly(2), 10)
        code = second & 0x7F
        length = code
        if code == 126:
            (length,) = struct.unpack("!H", await self.reader.readexactly(2))
        elif code == 127:
            (length,) = struct.unpack("!Q", await self.reader.readexactly(8))
        self.headers.append((first, code, length))
        payload = await self.reader.readexactly(length)
        assert first & 0x0F in (0x1, 0x2), f"unexpected opcode {first:#x}: {payload!r}"
        if first & 0x0F == 0x1:
            import json

            return json.loads(payload)
        return msgpack.unpackb(payload, raw=False, strict_map_key=False)

    async def settle(self, mark):
        """Ping and record everything up to the pong: all the server did for earlier frames has arrived."""
        await self.send({"op": "ping", "id": mark})
        while True:
            envelope = await self.read()
            if envelope.get("op") == "pong" and envelope.get("id") == mark:
                return
            if envelope.get("op") != "presence":  # presence events depend on connection timing only
                self.transcript.append({k: v for k, v in envelope.items() if k not in TIME_FIELDS})

    async def close(self):
        self.writer.close()
        with contextlib.suppress(ConnectionError):
            await self.writer.wait_closed()


def live_connection(server, device):
    """The server's ServerConnection of ``device`` (for its direct-path counters)."""
    for session in server.hub.sessions:
        if session.device == device:
            return session.sink
    raise AssertionError(f"{device} is not connected")


# ---- random frame sequences -------------------------------------------------------------------------

# msgpack integers end at -2**63 and 2**64 - 1: the id range's ends are the format's
ids = st.sampled_from(["a", "b", "x" * 128, "x" * 129, "", 7, 0, 2**64 - 1, -(2**63), 1.5, True, None])
targets = st.sampled_from([TWIN, JSON_PEER, OFFLINE, SENDER, "y" * 129])
bodies = st.one_of(
    st.none(), st.just("absent"), st.integers(-(2**63), 2**64 - 1), st.text(max_size=20),
    st.binary(max_size=20), st.dictionaries(st.text(max_size=5), st.integers(-(2**63), 2**64 - 1), max_size=3),
    # sizes around the 126 and 65536 frame-header boundaries
    st.integers(0, 3).map(lambda k: "z" * (70, 125, 65_000, 66_000)[k]),
)


@st.composite
def sends(draw):
    envelope = {"op": "send"}
    msg_id = draw(ids)
    if msg_id is not None:
        envelope["id"] = msg_id
    to = draw(st.sampled_from(["device", "device+extra", "all", "wrong type", "not a map", "absent"]))
    target = draw(targets)
    envelope["to"] = {"device": {"device": target}, "device+extra": {"device": target, "user": USER},
                      "all": {"all": True}, "wrong type": {"device": 5}, "not a map": target,
                      "absent": None}[to]
    if envelope["to"] is None:
        del envelope["to"]
    app_type = draw(st.sampled_from(["t", "", "y" * 129, 5, None]))
    if app_type is not None:
        envelope["type"] = app_type
    ack = draw(st.sampled_from(["absent", True, False, 1, "yes"]))
    if ack != "absent":
        envelope["ack"] = ack
    option = draw(st.sampled_from([None, ("ttl", 30), ("durable", False), ("unknown", 1)]))
    if option is not None:
        envelope[option[0]] = option[1]
    body = draw(bodies)
    if body != "absent":
        envelope["body"] = body
    return ("sender", envelope)


frames = st.one_of(
    sends(),
    sends(),
    st.integers(0, 6).map(lambda seq: ("twin", {"op": "ack", "seq": seq})),  # 0 and unknown seqs included
    st.sampled_from([
        ("twin", {"op": "ack", "seq": "1"}),
        ("twin", {"op": "ack", "seq": 1, "extra": True}),
        ("sender", {"op": "ping", "id": "p"}),
        ("sender", b"\x81\xa2op"),  # truncated msgpack
        ("sender", b"\x92\x01\x02"),  # not a map
        ("sender", {"op": "nope"}),
    ]),
)


async def run_sequence(listener, sequence):
    """Every device's transcript and the direct-path counters, after ``sequence`` through ``listener``."""
    async with running_server(listener, ack_timeout=600) as server:
        sender = await RawDevice.connect(server, SENDER)
        twin = await RawDevice.connect(server, TWIN)
        json_peer = await RawDevice.connect(server, JSON_PEER, encoding="json")
        devices = {"sender": sender, "twin": twin}
        for n, (who, frame) in enumerate(sequence):
            device = devices[who]
            if isinstance(frame, bytes):
                await device.send_bytes(frame)
            else:
                await device.send(frame)
            await device.settle(f"step-{n}")
        for n, device in enumerate((sender, twin, json_peer)):
            await device.settle(f"end-{n}")
        counters = {name: (live_connection(server, name).direct_sends, live_connection(server, name).direct_acks)
                    for name in (SENDER, TWIN)}
        result = {"sender": sender.transcript, "twin": twin.transcript, "json": json_peer.transcript,
                  "headers": sorted({(first, code) for d in (sender, twin, json_peer) for first, code, _ in d.headers}),
                  "counters": counters}
        for device in (sender, twin, json_peer):
            await device.close()
        return result


ABSENT = object()


def boundary_send(**fields):
    envelope = {"op": "send", "id": "ok", "to": {"device": TWIN}, "type": "t", "body": 1} | fields
    return ("sender", {key: value for key, value in envelope.items() if value is not ABSENT})


# Each rule of the direct path at its boundary, on both sides; random sequences add the rest.
BOUNDARIES = [
    boundary_send(id="x" * 128), boundary_send(id="x" * 129), boundary_send(id=""),
    boundary_send(type="y" * 128), boundary_send(type="y" * 129), boundary_send(type=""),
    boundary_send(id=2**64 - 1, ack=True), boundary_send(id=-(2**63)), boundary_send(id=0), boundary_send(id=True),
    boundary_send(ack=1), boundary_send(ack=True, id="k"), boundary_send(ack=True, id="k"),
    boundary_send(ack=True, id="k", body=2), boundary_send(ack=False),
    boundary_send(ttl=30), boundary_send(to={"device": TWIN, "user": USER}), boundary_send(to={"device": SENDER}),
    boundary_send(to={"device": JSON_PEER}), boundary_send(to={"device": OFFLINE}),
    boundary_send(body=ABSENT), boundary_send(body=None),
    ("twin", {"op": "ack", "seq": 7}), ("twin", {"op": "ack", "seq": 8}), ("twin", {"op": "ack", "seq": "8"}),
]


@pytest.mark.skipif(cy_listener is None, reason="a pure run has no compiled routing table for the compiled listener")
@example(BOUNDARIES)
@settings(max_examples=12, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.function_scoped_fixture])
@given(st.lists(frames, min_size=1, max_size=25))
def test_listener_twins_answer_random_frame_sequences_alike(sequence):
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        pure = runner.run(run_sequence(py_listener, sequence))
        compiled = runner.run(run_sequence(cy_listener, sequence))
    assert compiled == pure


# ---- the direct path is taken -----------------------------------------------------------------------


@LISTENERS
async def test_plain_sends_and_acks_take_the_direct_path(listener):
    # Both listeners route a plain msgpack send to an online msgpack device, and settle its ack, without
    # the session's general path. A direct path that is never taken passes every other test: this counts.
    async with running_server(listener) as server:
        sender = await RawDevice.connect(server, SENDER)
        twin = await RawDevice.connect(server, TWIN)
        for n in range(20):
            await sender.send({"op": "send", "id": f"m{n}", "to": {"device": TWIN}, "type": "t", "body": n,
                               "ack": n % 2 == 0})
        await sender.settle("sent")
        await twin.settle("received")
        messages = [e for e in twin.transcript if e["op"] == "msg"]
        assert [m["body"] for m in messages] == list(range(20))
        for message in messages:
            if message.get("ack"):
                await twin.send({"op": "ack", "seq": message["seq"]})
        await twin.settle("acked")
        await sender.settle("receipts")
        assert sum(1 for e in sender.transcript if e.get("status") == "delivered") == 10
        assert live_connection(server, SENDER).direct_sends == 20
        assert live_connection(server, TWIN).direct_acks == 10
        # The router's counters (Prometheus' rccs_messages_routed, rccs_messages, the latency histogram)
        # count direct sends like any other.
        stats = server.hub.stats.snapshot()
        assert stats["results"] == {"routed": 20, "no_route": 0, "offline": 0, "rejected": 0}
        assert (stats["frames_in"], stats["frames_out"], sum(stats["latency_buckets"])) == (20, 20, 20)
        assert 0 < stats["latency_sum_ns"] < 20 * 60 * 10**9
        # Not for the direct path: an option it leaves to the session (the general path routes it).
        await sender.send({"op": "send", "id": "slow", "to": {"device": TWIN}, "type": "t", "ttl": 30})
        await sender.settle("general")
        assert live_connection(server, SENDER).direct_sends == 20
        stats = server.hub.stats.snapshot()
        assert (stats["results"]["routed"], stats["frames_in"], stats["frames_out"]) == (21, 21, 21)
        for device in (sender, twin):
            await device.close()


# ---- server frames of every header size ------------------------------------------------------------


@LISTENERS
@pytest.mark.parametrize("encoding", ["msgpack", "json"])
@pytest.mark.parametrize(("body_size", "length_code"), [(10, None), (1000, 126), (65_536, 127), (300_000, 127)])
async def test_server_frames_of_every_length_reach_the_client(listener, encoding, body_size, length_code):
    # 126: a 16-bit length follows; 127: a 64-bit length (frames of 64 KiB and more). msgpack devices
    # are served by the direct path, JSON ones by the session; both write through the listener's framing.
    async with running_server(listener) as server:
        sender = await RawDevice.connect(server, SENDER, encoding=encoding)
        receiver = await RawDevice.connect(server, TWIN, encoding=encoding)
        body = "b" * body_size
        await sender.send({"op": "send", "id": "big", "to": {"device": TWIN}, "type": "t", "body": body})
        await sender.settle("sent")
        await receiver.settle("received")
        (message,) = [e for e in receiver.transcript if e["op"] == "msg"]
        assert message["body"] == body and message["from"] == SENDER
        first, code, length = next(h for h in receiver.headers if h[2] > body_size)
        assert first == (0x82 if encoding == "msgpack" else 0x81)
        expected_code = length if length < 126 else (126 if length < 65536 else 127)
        assert code == expected_code
        if length_code is not None:
            assert code == length_code
        for device in (sender, receiver):
            await device.close()


# ---- seq of every width --------------------------------------------------------------------------


async def transcript_from_seq(listener, first_seq):
    """What the sender and the receiver see when the receiver's next seq is ``first_seq``."""
    async with running_server(listener, ack_timeout=600) as server:
        sender = await RawDevice.connect(server, SENDER)
        twin = await RawDevice.connect(server, TWIN)
        live_connection(server, TWIN).session.next_seq = first_seq
        for n, ack in enumerate((False, True, True)):
            await sender.send({"op": "send", "id": n, "to": {"device": TWIN}, "type": "t", "body": [n], "ack": ack})
        await sender.settle("sent")
        await twin.settle("received")
        for message in twin.transcript:
            if message.get("ack"):
                await twin.send({"op": "ack", "seq": message["seq"]})
        await twin.settle("acked")
        await sender.settle("receipts")
        counters = (live_connection(server, SENDER).direct_sends, live_connection(server, TWIN).direct_acks)
        for device in (sender, twin):
            await device.close()
        return {"sender": sender.transcript, "twin": twin.transcript, "counters": counters}


@pytest.mark.skipif(cy_listener is None, reason="a pure run has no compiled routing table for the compiled listener")
@pytest.mark.parametrize("first_seq", [126, 254, 65_534, 2**32 - 2, 2**40])
async def test_listener_twins_write_every_seq_width_alike(first_seq):
    # Each start puts the three seqs across a msgpack int width boundary (1, 2, 3, 5 and 9 bytes); the
    # direct path writes the seq into the msg it encodes whole, and settles acks of every width.
    pure = await transcript_from_seq(py_listener, first_seq)
    compiled = await transcript_from_seq(cy_listener, first_seq)
    assert compiled == pure
    assert [m["seq"] for m in compiled["twin"] if m["op"] == "msg"] == [first_seq, first_seq + 1, first_seq + 2]
    assert [e["status"] for e in compiled["sender"] if e["op"] == "receipt"] == [
        "routed", "routed", "delivered", "delivered"]
    assert compiled["counters"] == (3, 2)


# ---- a direct send copies the body once --------------------------------------------------------------

# Larger than msgpack's packer, which holds a 256 KiB scratch buffer while it encodes a receipt.
BIG_BODY = 1024 * 1024


def measuring_listener(listener, peaks):
    """``listener`` whose first connection (the sender) records, for every frame it is given, the frame's
    size and the most memory its handling held at once beyond what was held before (tracemalloc)."""

    class MeasuredConnection(listener.ServerConnection):
        def on_ws_frame(self, transport, frame):
            size = frame.payload_size
            tracemalloc.reset_peak()
            before, _ = tracemalloc.get_traced_memory()
            super().on_ws_frame(transport, frame)
            peaks.append((size, tracemalloc.get_traced_memory()[1] - before))

    made = []

    def server_connection(hub, coalescer, session_factory):
        kind = listener.ServerConnection if made else MeasuredConnection
        made.append(kind)
        return kind(hub, coalescer, session_factory)

    return types.SimpleNamespace(ServerConnection=server_connection, WriteCoalescer=listener.WriteCoalescer)


@LISTENERS
@pytest.mark.parametrize("ack", [False, True])
async def test_a_direct_send_copies_its_body_once(listener, ack):
    # Handling a send, the compiled listener holds one body-sized buffer: the msg it queues (and, with
    # ack, keeps for redelivery). Copying the payload to bytes, slicing the body out, encoding a prefix
    # and appending the seq each held another; any of them back fails this. picows' own read buffer is
    # not a Python allocation, so tracemalloc sees only what the listener makes. The pure twin slices
    # and joins in Python: its measure shows the copies the instrument is there to see.
    peaks = []
    tracemalloc.start()
    try:
        async with running_server(measuring_listener(listener, peaks), max_message_bytes=4 * BIG_BODY) as server:
            sender = await RawDevice.connect(server, SENDER)
            twin = await RawDevice.connect(server, TWIN)
            body = "c" * BIG_BODY
            await sender.send({"op": "send", "id": "big", "to": {"device": TWIN}, "type": "t", "body": body,
                               "ack": ack})
            await sender.settle("sent")
            await twin.settle("received")
            (message,) = [e for e in twin.transcript if e["op"] == "msg"]
            assert message["body"] == body
            assert live_connection(server, SENDER).direct_sends == 1
            if ack:
                # The idempotency digest is of the body's own bytes, whichever way the listener hands them over
                # (the compiled one: a view into the msg it encoded). Digests outlive a graceful restart.
                assert server.hub.deliveries.ids.get(SENDER, "big")[1] == zlib.crc32(msgpack.packb(body))
            for device in (sender, twin):
                await device.close()
    finally:
        tracemalloc.stop()
    (held,) = [held for size, held in peaks if size > BIG_BODY]
    if listener is py_listener:
        assert held > 2 * BIG_BODY
    else:
        assert BIG_BODY < held < 2 * BIG_BODY
