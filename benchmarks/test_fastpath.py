"""Micro-benchmarks of the fast path, both implementations side by side.

Run with ``make bench-micro`` (``make bench`` runs it first). Each group holds the pure-Python twin and the
compiled module on the same input, plus a baseline where one exists
(msgpack-python's C unpacker/packer doing the nearest equivalent work), so
results read as ratios measured in one run.
"""

import importlib
import itertools
import zlib
from collections import OrderedDict
from types import SimpleNamespace

import msgpack
import pytest

ENVELOPE = msgpack.packb({
    "op": "send",
    "id": "7f3a9c1e-42",
    "to": {"type": "desktop", "pick": "one"},
    "type": "task_status",
    "body": {"task": "build", "progress": 0.42, "lines": ["compiling", "linking"], "ok": True},
    "ack": True,
})
BODY = msgpack.packb({"task": "build", "progress": 0.42, "lines": ["compiling", "linking"], "ok": True})


@pytest.mark.benchmark(group="decode_envelope")
def test_decode_envelope(benchmark, fastpath):
    codec, _ = fastpath
    header, start, end = benchmark(codec.decode_envelope, ENVELOPE)
    assert header["op"] == "send" and ENVELOPE[start:end] == BODY


@pytest.mark.benchmark(group="decode_envelope")
def test_decode_envelope_baseline_msgpack_unpackb(benchmark):
    """Baseline: msgpack-python's C unpacker decoding the whole envelope, body included."""
    assert benchmark(msgpack.unpackb, ENVELOPE)["op"] == "send"


@pytest.mark.benchmark(group="encode_msg")
def test_encode_msg(benchmark, fastpath):
    codec, _ = fastpath

    def encode():
        return codec.append_seq(codec.encode_msg_prefix("7f3a9c1e-42", "alice-phone", "task_status", BODY,
                                                        1767225600000, True), 12345)

    assert msgpack.unpackb(benchmark(encode))["seq"] == 12345


@pytest.mark.benchmark(group="encode_msg")
def test_encode_msg_baseline_msgpack_packb(benchmark):
    """Baseline: msgpack-python's C packer encoding the same msg with an already-decoded body."""
    body = msgpack.unpackb(BODY)
    message = {"op": "msg", "id": "7f3a9c1e-42", "from": "alice-phone", "type": "task_status", "body": body,
               "ts": 1767225600000, "ack": True, "seq": 12345}
    assert benchmark(msgpack.packb, message)


@pytest.mark.benchmark(group="fanout_encode_100")
def test_fanout_encode_once_for_100_receivers(benchmark, fastpath):
    """A message to 100 receivers: encoded once, then only each receiver's seq is appended."""
    codec, _ = fastpath

    def fan_out():
        prefix = codec.encode_msg_prefix("7f3a9c1e-42", "alice-phone", "task_status", BODY, 1767225600000, False)
        return [codec.append_seq(prefix, seq) for seq in range(1, 101)]

    frames = benchmark(fan_out)
    assert len(frames) == 100 and msgpack.unpackb(frames[-1])["seq"] == 100


def _populated(routing, users, devices_per_user):
    table = routing.RoutingTable()
    types = ["mobile", "desktop", "extension", "web"]
    for u in range(users):
        for d in range(devices_per_user):
            caps = ["file_sync"] if d % 2 else ["notifications", "file_sync"]
            table.add(f"user{u}", f"user{u}-dev{d}", types[d % 4], caps, object())
    return table


@pytest.mark.benchmark(group="routing_select_capability")
@pytest.mark.parametrize("devices_per_user", [4, 100])
def test_routing_select_capability(benchmark, fastpath, devices_per_user):
    _, routing = fastpath
    table = _populated(routing, 100, devices_per_user)
    found = benchmark(table.select, "user7", routing.SELECT_CAPABILITY, "file_sync", False, "user7-dev0")
    assert len(found) == devices_per_user - 1


@pytest.mark.benchmark(group="routing_select_type_pick_one")
def test_routing_select_type_pick_one(benchmark, fastpath):
    _, routing = fastpath
    table = _populated(routing, 100, 8)
    assert len(benchmark(table.select, "user7", routing.SELECT_TYPE, "desktop", True, None)) == 1


@pytest.mark.benchmark(group="routing_get")
def test_routing_get(benchmark, fastpath):
    _, routing = fastpath
    table = _populated(routing, 1000, 4)
    assert benchmark(table.get, "user500", "user500-dev3") is not None


@pytest.mark.benchmark(group="routing_touch")
def test_routing_touch(benchmark, fastpath):
    _, routing = fastpath
    table = _populated(routing, 1000, 4)
    benchmark(table.touch, "user500", "user500-dev3")


@pytest.mark.benchmark(group="routing_add_remove")
def test_routing_add_remove(benchmark, fastpath):
    _, routing = fastpath
    table = _populated(routing, 1000, 4)
    handle = object()

    def churn():
        table.add("user500", "user500-new", "mobile", ("notifications", "file_sync"), handle)
        table.remove("user500", "user500-new", handle)

    benchmark(churn)
    assert len(table) == 4000


@pytest.mark.benchmark(group="route_stats_record")
def test_route_stats_record(benchmark, fastpath):
    _, routing = fastpath
    stats = routing.RouteStats()
    benchmark(stats.record_route, routing.RESULT_ROUTED, 12_345)
    assert stats.snapshot()["results"]["routed"] > 0


# ---- remembered ids of ack:true sends (protocol.md section 12; issue 20) ----------------------------------

ID_BODY = b"x" * 200


@pytest.fixture(params=["python", "cython"])
def idmemory(request):
    if request.param == "python":
        return importlib.import_module("rccs._fastpath.idmemory")
    try:
        return importlib.import_module("rccs._fastpath._idmemory")
    except ImportError:
        pytest.skip("compiled fast path not built")


def _ids_at_the_cap(module, make_id):
    """A device holding 10,000 ids (the default cap): every new id now also forgets the oldest."""
    ids = module.RememberedIds(SimpleNamespace(idempotency_window=86400.0, idempotency_cache=10_000))
    for n in range(10_000):
        ids.check("phone", make_id(n), ID_BODY, n)
    return ids


@pytest.mark.benchmark(group="remembered_ids_new_id")
@pytest.mark.parametrize("kind", ["int", "str"])
def test_remembered_ids_new_id(benchmark, idmemory, kind):
    make_id = (lambda n: n) if kind == "int" else (lambda n: f"msg-{n:08d}")
    ids = _ids_at_the_cap(idmemory, make_id)
    counter = itertools.count(10_000)

    def check():
        n = next(counter)
        return ids.check("phone", make_id(n), ID_BODY, n)

    assert benchmark(check) is None


@pytest.mark.benchmark(group="remembered_ids_new_id")
@pytest.mark.parametrize("kind", ["int", "str"])
def test_remembered_ids_new_id_baseline_ordereddict(benchmark, kind):
    """Baseline: the OrderedDict of id -> (time, crc32) per device that the compact form replaced."""
    make_id = (lambda n: n) if kind == "int" else (lambda n: f"msg-{n:08d}")
    devices = {"phone": OrderedDict((make_id(n), (n, zlib.crc32(ID_BODY))) for n in range(10_000))}
    counter = itertools.count(10_000)

    def check():
        n = next(counter)
        msg_id = make_id(n)
        seen = devices.get("phone")
        digest = zlib.crc32(ID_BODY)
        previous = seen.get(msg_id)
        if previous is not None and previous[0] + 86_400_000 > n:
            return "duplicate"
        seen[msg_id] = (n, digest)
        seen.move_to_end(msg_id)
        if len(seen) > 10_000:
            seen.popitem(last=False)
        return None

    assert benchmark(check) is None


@pytest.mark.benchmark(group="remembered_ids_duplicate")
def test_remembered_ids_duplicate(benchmark, idmemory):
    ids = _ids_at_the_cap(idmemory, lambda n: n)
    assert benchmark(ids.check, "phone", 5_000, ID_BODY, 10_001) == "duplicate"
