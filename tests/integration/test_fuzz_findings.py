"""What the protocol fuzzer found (issue 16, item 6), each against a real server: the documented answer, close
code or conversion, never an ``internal`` error, a traceback or a lost connection."""

import asyncio
import base64
import json
import struct

import msgpack
import pytest
from adminhttp import KEY, request
from rawws import masked_frame, open_raw, read_frame

TEXT, BINARY, CLOSE = 0x1, 0x2, 0x8


@pytest.fixture
def server_settings():
    return {"admin_key": KEY}


class Raw:
    """A device on a hand-rolled WebSocket: frames go out exactly as built, answers are read one by one."""

    def __init__(self, reader, writer, text):
        self.reader, self.writer, self.text = reader, writer, text

    def encode(self, envelope):
        return json.dumps(envelope).encode() if self.text else msgpack.packb(envelope)

    def frame(self, envelope):
        return masked_frame(self.encode(envelope), TEXT if self.text else BINARY)

    def write(self, *frames):
        self.writer.write(b"".join(frames))

    async def next(self, timeout=5):
        """The next envelope other than ``presence``; (opcode, payload) of a close frame as a tuple."""
        while True:
            opcode, payload = await asyncio.wait_for(read_frame(self.reader), timeout)
            if opcode == CLOSE:
                return ("close", struct.unpack("!H", payload[:2])[0] if len(payload) >= 2 else None)
            envelope = json.loads(payload) if opcode == TEXT else msgpack.unpackb(payload, strict_map_key=False)
            if envelope.get("op") != "presence":
                return envelope

    async def close_code(self, timeout=5):
        while True:
            answer = await self.next(timeout)
            if isinstance(answer, tuple):
                return answer[1]

    async def still_answers(self):
        self.write(self.frame({"op": "ping", "id": "alive"}))
        assert (await self.next())["id"] == "alive"

    def close(self):
        self.writer.close()


async def raw_device(server, user, device, text):
    reader, writer = await open_raw(server.ws_url)
    raw = Raw(reader, writer, text)
    raw.write(raw.frame({"op": "hello", "token": server.issue_token(user, device), "device": {"type": "web"}}))
    assert (await raw.next())["op"] == "welcome"
    return raw


def envelope_with_body(fields, body):
    """A msgpack envelope whose ``body`` is the given raw msgpack bytes (fields: fewer than 15)."""
    header = msgpack.packb(fields)
    assert 0x80 <= header[0] < 0x8F
    return bytes([header[0] + 1]) + header[1:] + msgpack.packb("body") + body


# ---- msgpack bodies for a JSON receiver (section 6) ------------------------------------------------------------

TWELVE_BYTE_TIMESTAMP = (10**9 - 1).to_bytes(4, "big") + (-1).to_bytes(8, "big", signed=True)


@pytest.mark.parametrize(("body", "converted"), [
    (b"\xc7\x0c\xff" + TWELVE_BYTE_TIMESTAMP, {"$ext": -1, "data": base64.b64encode(TWELVE_BYTE_TIMESTAMP).decode()}),
    (b"\xd4\x80\x07", {"$ext": -128, "data": "Bw=="}),
    (b"\x81\x92\x01\x02\xa1a", {"[1,2]": "a"}),
    (b"\x81\x81\xa1k\x01\xa1a", {'{"k":1}': "a"}),
    (b"\x82\x01\xa1a\xc3\xa1b", {"1": "a", "true": "b"}),
    # nil and NaN keys both say "null" in JSON: one map cannot hold both
    (b"\x83\xc0\x01\xcb\x7f\xf8\x00\x00\x00\x00\x00\x00\x02\xc4\x01\xff\x03", "unconvertible"),
], ids=["timestamp-12-bytes", "ext-minus-128", "array-key", "map-key",
        "int-and-true-keys", "nil-nan-bin-keys"])
async def test_msgpack_bodies_reach_a_json_device_converted(server, body, converted):
    sender = await raw_device(server, "conv", "conv-mp", text=False)
    receiver = await raw_device(server, "conv", "conv-json", text=True)
    sender.write(masked_frame(envelope_with_body(
        {"op": "send", "id": "m", "to": {"device": "conv-json"}, "type": "t", "ack": True}, body)))
    if converted == "unconvertible":
        assert await sender.next() == {"op": "receipt", "id": "m", "status": "failed", "device": "conv-json",
                                       "reason": "unconvertible"}
        assert await sender.next() == {"op": "receipt", "id": "m", "status": "routed", "devices": []}
    else:
        message = await receiver.next()
        assert (message["op"], message["body"]) == ("msg", converted)
        assert (await sender.next())["status"] == "routed"
    await sender.still_answers()
    await receiver.still_answers()


# ---- timestamps in a msgpack body (ext -1) -----------------------------------------------------------------------

NANOSECONDS_OVER = "invalid msgpack timestamp in body: 1000000000 nanoseconds (at most 999999999)"


@pytest.mark.parametrize(("body", "message"), [
    (b"\xc7\x03\xff\x01\x02\x03", "invalid msgpack timestamp in body: ext -1 of 3 bytes (a timestamp has 4, 8 or 12)"),
    (b"\xd7\xff" + (10**9 << 34).to_bytes(8, "big"), NANOSECONDS_OVER),
    (b"\xc7\x0c\xff" + (10**9).to_bytes(4, "big") + b"\x00" * 8, NANOSECONDS_OVER),
    (b"\x92\x01\x81\xa1t\xc7\x03\xff\x01\x02\x03",
     "invalid msgpack timestamp in body: ext -1 of 3 bytes (a timestamp has 4, 8 or 12)"),
], ids=["3-bytes", "8-bytes-bad-nanos", "12-bytes-bad-nanos", "nested"])
@pytest.mark.parametrize("receiver_text", [False, True], ids=["msgpack-receiver", "json-receiver"])
async def test_an_invalid_timestamp_in_a_body_is_refused_at_the_sender(server, body, message, receiver_text):
    # Forwarded as it is, it would be a msg frame no standard msgpack decoder reads: the receiver loses the whole
    # envelope, and an ack:true one would come back until dead-lettered.
    sender = await raw_device(server, "ts", "ts-sender", text=False)
    receiver = await raw_device(server, "ts", "ts-receiver", text=receiver_text)
    sender.write(masked_frame(envelope_with_body(
        {"op": "send", "id": "m", "to": {"device": "ts-receiver"}, "type": "t", "ack": True}, body)))
    assert await sender.next() == {"op": "error", "code": "bad_request",
                                   "message": f"malformed msgpack envelope: {message}"}
    await sender.still_answers()
    await receiver.still_answers()  # its next frame is the pong: no msg came before it
    assert server.hub.errors_sent["internal"] == 0


async def test_a_valid_timestamp_still_arrives_byte_for_byte(server):
    sender = await raw_device(server, "ts", "ts-sender", text=False)
    receiver = await raw_device(server, "ts", "ts-receiver", text=False)
    body = b"\x92\xd7\xff" + ((10**9 - 1) << 34 | 1_700_000_000).to_bytes(8, "big") + b"\xd6\xff" + bytes(4)
    sender.write(masked_frame(envelope_with_body(
        {"op": "send", "id": "m", "to": {"device": "ts-receiver"}, "type": "t"}, body)))
    while True:
        _, payload = await asyncio.wait_for(read_frame(receiver.reader), 5)
        if msgpack.unpackb(payload)["op"] == "msg":
            break
    assert body in payload
    assert msgpack.unpackb(payload)["body"] == [msgpack.Timestamp(1_700_000_000, 10**9 - 1), msgpack.Timestamp(0)]
    await sender.still_answers()  # no error came before the pong


async def test_map_keys_that_meet_in_json_make_the_body_unconvertible(server):
    sender = await raw_device(server, "conv", "conv-mp", text=False)
    await raw_device(server, "conv", "conv-json", text=True)
    sender.write(masked_frame(envelope_with_body(
        {"op": "send", "id": "m", "to": {"device": "conv-json"}, "type": "t"}, b"\x82\x01\xa1a\xa11\xa1b")))
    assert await sender.next() == {"op": "error", "code": "unconvertible", "id": "m",
                                   "message": "the body cannot be converted for any receiver"}


# ---- JSON that is not strict JSON --------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [
    '{"op":"ping","id":"\\ud800"}',
    '{"op":"send","id":"\\udc00x","to":{"device":"x-b"},"type":"t"}',
    '{"op":"send","id":"m","to":{"device":"x-b"},"type":"\\ud800"}',
    '{"op":"send","id":"m","to":{"device":"x-b"},"type":"t","body":["\\ud800"]}',
    '{"op":"send","id":"m","to":{"device":"x-b"},"type":"t","body":{"\\udfff":1}}',
    '{"op":"send","id":"m","to":{"device":"x-b"},"type":"t","body":1e999999}',
    '{"op":"send","id":"m","to":{"device":"x-b"},"type":"t","body":-1e400}',
])
async def test_lone_surrogates_and_infinite_numbers_are_bad_requests(server, text):
    device = await raw_device(server, "x", "x-a", text=True)
    await raw_device(server, "x", "x-b", text=True)
    device.write(masked_frame(text.encode(), TEXT))
    answer = await device.next()
    assert (answer["op"], answer["code"]) == ("error", "bad_request")
    assert answer["message"].startswith("malformed JSON")
    await device.still_answers()
    assert server.hub.errors_sent["internal"] == 0


async def test_a_surrogate_pair_is_one_character(server):
    device = await raw_device(server, "x", "x-a", text=True)
    device.write(masked_frame(b'{"op":"ping","id":"\\ud83d\\ude00"}', TEXT))
    assert (await device.next())["id"] == "\U0001F600"


async def test_utf16_json_is_not_a_text_frame(server):
    device = await raw_device(server, "x", "x-a", text=True)
    device.write(masked_frame('{"op":"ping","id":"p"}'.encode("utf-16-le"), TEXT))
    assert (await device.next())["code"] == "bad_request"


# ---- ping ids (sections 3 and 4.4) ---------------------------------------------------------------------------------

@pytest.mark.parametrize("text", [False, True])
@pytest.mark.parametrize(("ping_id", "code"), [
    (1.5, "bad_request"), (True, "bad_request"), ("", "bad_request"), ("p" * 129, "too_large"),
    (2**64, "bad_request"), (-(2**63) - 1, "bad_request"), ([1], "bad_request"), ({"a": 1}, "bad_request"),
])
async def test_ping_ids_outside_section_3_are_refused_not_echoed(server, text, ping_id, code):
    device = await raw_device(server, "p", "p-a", text=text)
    # JSON carries every one of these; the answer comes in the connection's encoding either way.
    device.write(masked_frame(json.dumps({"op": "ping", "id": ping_id}).encode(), TEXT))
    answer = await device.next()
    assert (answer["op"], answer["code"]) == ("error", code)
    assert "id" not in answer
    await device.still_answers()


async def test_a_nan_ping_id_to_a_json_device_is_refused(server):
    device = await raw_device(server, "p", "p-a", text=True)
    device.write(masked_frame(msgpack.packb({"op": "ping", "id": float("nan")}), BINARY))
    answer = await device.next()
    assert (answer["op"], answer["code"]) == ("error", "bad_request")
    await device.still_answers()


@pytest.mark.parametrize("ping_id", [2**64 - 1, -(2**63), "p" * 128, 0])
async def test_ping_ids_at_the_limits_are_echoed(server, ping_id):
    device = await raw_device(server, "p", "p-a", text=False)
    device.write(device.frame({"op": "ping", "id": ping_id}))
    assert (await device.next())["id"] == ping_id


@pytest.mark.parametrize("op", [{"send": 1}, ["ping"], 7, None])
async def test_an_op_that_is_not_a_string_is_a_bad_request(server, op):
    for text in (False, True):
        device = await raw_device(server, "o", "o-a", text=text)
        device.write(device.frame({"op": op, "id": "q"}))
        assert await device.next() == {"op": "error", "code": "bad_request", "id": "q",
                                       "message": "envelope needs an 'op' string"}
        device.close()


# ---- answers in order (section 2) ----------------------------------------------------------------------------------

REQUESTS = [
    {"op": "session.revoke", "session": "no-such-session"},
    {"op": "sessions"},
    {"op": "state.get", "doc": "user/notes"},
    {"op": "state.patch", "doc": "user/notes", "patch": {"a": 1}},
    {"op": "state.subscribe", "doc": "user/notes"},
    {"op": "task.claim", "task": "agent"},
    {"op": "task.renew", "task": "agent", "epoch": 1},
    {"op": "task.list"},
    {"op": "handoff.request", "task": "agent", "to": {"device": "o-b"}},
    {"op": "task.release", "task": "agent", "epoch": 1},
    {"op": "pair.create"},
]


@pytest.mark.parametrize("text", [False, True], ids=["msgpack", "json"])
async def test_every_request_is_answered_before_what_came_after_it(server, text):
    device = await raw_device(server, "o", "o-a", text=text)
    other = await raw_device(server, "o", "o-b", text=text)
    for n, request_fields in enumerate(REQUESTS):
        request_id = f"r{n}"
        # One write: the request, a ping and a send right behind it, in the same TCP segment.
        device.write(device.frame({**request_fields, "id": request_id}), device.frame({"op": "ping", "id": "after"}),
                     device.frame({"op": "send", "id": f"s{n}", "to": {"device": "o-b"}, "type": "t", "ack": True}))
        ids = []
        while "after" not in ids or f"s{n}" not in ids:
            answer = await device.next()
            ids.append(answer.get("id"))
        assert ids.index(request_id) < ids.index("after") < ids.index(f"s{n}"), (request_fields["op"], ids)
        message = await other.next()
        other.write(other.frame({"op": "ack", "seq": message["seq"]}))
    assert server.hub.errors_sent["internal"] == 0


async def test_a_flood_behind_a_running_request_closes_with_1008(server):
    device = await raw_device(server, "o", "o-a", text=False)
    pings = [device.frame({"op": "ping", "id": n}) for n in range(1500)]
    device.write(device.frame({"op": "sessions", "id": "s"}), *pings)
    assert await device.close_code() == 1008


# ---- WebSocket framing ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("first_byte", [0xC2, 0xA2, 0x92], ids=["rsv1", "rsv2", "rsv3"])
async def test_reserved_bits_fail_the_connection_with_1002(server, first_byte):
    device = await raw_device(server, "w", "w-a", text=False)
    frame = bytearray(device.frame({"op": "ping", "id": "p"}))
    frame[0] = first_byte
    device.write(bytes(frame))
    assert await device.close_code() == 1002
    assert server.hub.closes_sent[1002] == 1


@pytest.mark.parametrize("code", [5000, 65535])
async def test_a_close_code_over_4999_is_answered_1002(server, code):
    device = await raw_device(server, "w", "w-a", text=False)
    device.write(masked_frame(struct.pack("!H", code), CLOSE))
    assert await device.close_code() == 1002


async def test_a_valid_close_code_is_echoed_and_not_counted(server):
    device = await raw_device(server, "w", "w-a", text=False)
    device.write(masked_frame(struct.pack("!H", 4000), CLOSE))
    assert await device.close_code() == 4000
    await asyncio.wait_for(server.hub.wait_idle(), 5)
    assert server.hub.closes_sent[4000] == 0


async def test_closes_made_by_picows_and_the_listener_are_counted(server):
    expected = {}
    cases = [
        (masked_frame(b"x", 0x0), 1002),  # a continuation without a message (the listener)
        (bytes([0x83, 0x80, 0, 0, 0, 0]), 1002),  # opcode 3 is reserved (picows)
        (masked_frame(struct.pack("!H", 1000) + b"\xff", CLOSE), 1007),  # a close reason that is not UTF-8
        (bytes([0x82, 0xFF]) + struct.pack("!Q", 2**40) + b"\0\0\0\0", 1009),  # a frame header over the limit
        (bytes([0x82, 0x01]) + b"a", 1002),  # a client frame that is not masked (picows)
    ]
    for frame, code in cases:
        device = await raw_device(server, "w", "w-a", text=False)
        device.write(frame)
        assert await device.close_code() == code, frame
        expected[code] = expected.get(code, 0) + 1
        device.close()
        await asyncio.wait_for(server.hub.wait_idle(), 5)
    for code, count in expected.items():
        assert server.hub.closes_sent[code] == count, (code, dict(server.hub.closes_sent))
    metrics = (await asyncio.to_thread(request, server.http_url, "GET", "/metrics", key=None)).body
    for code, count in expected.items():
        assert f'rccs_closes_total{{code="{code}"}} {float(count)}' in metrics


# ---- the HTTP side --------------------------------------------------------------------------------------------------

async def test_http_1_0_gets_400_and_a_close(server):
    host, port = server.http_url.removeprefix("http://").split(":")
    reader, writer = await asyncio.open_connection(host, int(port))
    writer.write(b"GET /healthz HTTP/1.0\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 5)  # read to EOF: the server closes
    assert answer.startswith(b"HTTP/1.1 400 ")
    writer.close()


async def test_admin_key_forms_rfc_9110_allows(server):
    # The scheme is case-insensitive and may be followed by more than one space (RFC 9110 section 11);
    # anything else around the key is a wrong key.
    for header, status in [(f"Bearer {KEY}", 200), (f"bearer {KEY}", 200), (f"Bearer  {KEY}", 200),
                           (f"Bearer {KEY}x", 401), (f"Bearer {KEY[:-1]}", 401), (f"Bearer\t{KEY}", 401)]:
        reply = await asyncio.to_thread(request, server.http_url, "GET", "/admin/stats",
                                        headers={"Authorization": header})
        assert reply.status == status, header

