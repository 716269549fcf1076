"""The remembered ids of ack:true sends (rccs/_fastpath/idmemory.py and its compiled twin; protocol.md section
12), each against a plain model of the guarantees."""

from __future__ import annotations

import random
import sys
import zlib
from collections import OrderedDict
from types import SimpleNamespace

import pytest

from rccs._fastpath import idmemory
from rccs._fastpath.idmemory import id_key, key_from_saved, saved_key

try:
    from rccs._fastpath import _idmemory
except ImportError:  # not built
    _idmemory = None  # type: ignore[assignment]

DAY_MS = 86_400_000


@pytest.fixture(params=["python", "cython"])
def twin(request):
    if request.param == "python":
        return idmemory
    if _idmemory is None:
        pytest.skip("the compiled twin is not built")
    return _idmemory


def settings(window_s: float = 86400.0, cache: int = 10000) -> SimpleNamespace:
    return SimpleNamespace(idempotency_window=window_s, idempotency_cache=cache)


class Model:
    """What section 12 promises, written the plain way (the OrderedDict the compact form replaced)."""

    def __init__(self, window_ms: int, cap: int):
        self.window_ms, self.cap = window_ms, cap
        self.seen: dict[str, OrderedDict[str | int, tuple[int, int]]] = {}

    def check(self, device: str, msg_id: str | int, body: bytes, now: int) -> str | None:
        seen = self.seen.setdefault(device, OrderedDict())
        digest = zlib.crc32(body)
        previous = seen.get(msg_id)
        if previous is not None and previous[0] + self.window_ms > now:
            return "duplicate" if previous[1] == digest else "conflict"
        seen[msg_id] = (now, digest)
        seen.move_to_end(msg_id)
        while len(seen) > self.cap:
            seen.popitem(last=False)
        return None

    def forget(self, device: str, msg_id: str | int) -> None:
        self.seen.get(device, OrderedDict()).pop(msg_id, None)


def test_duplicate_conflict_and_new(twin):
    ids = twin.RememberedIds(settings())
    assert ids.check("phone", "m1", b"a", 1000) is None
    assert ids.check("phone", "m1", b"a", 1001) == "duplicate"
    assert ids.check("phone", "m1", b"b", 1002) == "conflict"
    assert ids.check("laptop", "m1", b"b", 1003) is None  # ids are per sending device
    assert ids.check("phone", 1, b"a", 1004) is None  # the integer 1 and the string "1" are different ids
    assert ids.check("phone", "1", b"a", 1005) is None
    assert ids.check("phone", 1, memoryview(b"a"), 1006) == "duplicate"  # bodies are read as buffers
    assert ids.get("phone", "m1") == (1000, zlib.crc32(b"a"))


def test_the_window_ends_and_the_id_is_new_again(twin):
    ids = twin.RememberedIds(settings(window_s=10))
    assert ids.check("phone", "m", b"a", 0) is None
    assert ids.check("phone", "m", b"a", 9_999) == "duplicate"
    assert ids.check("phone", "m", b"b", 10_000) is None  # taken again, now with body b, from 10,000
    assert ids.check("phone", "m", b"b", 19_999) == "duplicate"
    assert ids.check("phone", "m", b"a", 19_999) == "conflict"
    assert len(ids) == 1


def test_the_cap_keeps_the_last_ids_of_a_device(twin):
    ids = twin.RememberedIds(settings(cache=3))
    for n in range(5):
        assert ids.check("phone", n, b"x", n) is None
    assert [ids.check("phone", n, b"x", 10) for n in (2, 3, 4)] == ["duplicate"] * 3
    assert ids.check("phone", 0, b"x", 11) is None  # forgotten: new again (and 2 goes now)
    assert ids.check("phone", 2, b"x", 12) is None


def test_forget_and_sweep(twin):
    ids = twin.RememberedIds(settings(window_s=10))
    ids.check("phone", "m", b"a", 0)
    ids.forget("phone", "m")
    ids.forget("nobody", "m")
    assert ids.check("phone", "m", b"a", 1) is None
    ids.check("laptop", "x", b"a", 5_000)
    assert ids.sweep(10_000) == 0  # phone's newest id is from 1
    assert ids.sweep(10_001) == 1 and set(ids.devices) == {"laptop"}
    assert ids.sweep(15_000) == 1 and not ids.devices


@pytest.mark.parametrize("seed", range(6))
def test_random_operations_agree_with_the_model(twin, seed):
    rng = random.Random(seed)
    cap = rng.choice([1, 2, 7, 8, 9, 50, 300])
    window_ms = rng.choice([50, 1000, DAY_MS])
    ids, model = twin.RememberedIds(settings(window_ms / 1000, cap)), Model(window_ms, cap)
    now = 0
    for _ in range(6000):
        now += rng.choice([0, 0, 1, 3, 40])
        device = rng.choice(["a", "b", "c"])
        msg_id: str | int = rng.choice([rng.randrange(cap * 3 + 5), f"s{rng.randrange(cap * 3 + 5)}"])
        if rng.random() < 0.05:
            ids.forget(device, msg_id)
            model.forget(device, msg_id)
            continue
        body = rng.choice([b"x", b"y"])
        assert ids.check(device, msg_id, body, now) == model.check(device, msg_id, body, now), (device, msg_id, now)
    # The ids within the window are the model's (an id taken again after its window, or taken back, leaves
    # a dead entry in the ring until the ring moves past it; the model forgets such ids at once).
    for device, seen in model.seen.items():
        assert [(key, at, digest) for key, at, digest in ids.devices[device].entries() if at + window_ms > now] == [
            (id_key(msg_id), at, digest) for msg_id, (at, digest) in seen.items() if at + window_ms > now]


def test_saved_entries_load_back_and_so_do_ids_saved_by_the_older_form(twin):
    ids = twin.RememberedIds(settings(cache=3))
    for n in range(4):
        ids.check("phone", f"m{n}", b"a", 100 + n)
    saved = ids.saved()
    assert [entry[0] for entry in saved] == ["phone"] * 3 and all(entry[1][0] == "#" for entry in saved)
    again = twin.RememberedIds(settings(cache=3))
    # An older version saved the ids themselves: (device, id, at, crc32 of the body).
    again.load([*saved, ("laptop", "raw", 50, zlib.crc32(b"z")), ("laptop", 7, 60, zlib.crc32(b"z"))])
    assert [again.check("phone", f"m{n}", b"a", 200) for n in (1, 2, 3, 0)] == ["duplicate"] * 3 + [None]
    assert again.check("laptop", "raw", b"z", 200) == "duplicate"
    assert again.check("laptop", 7, b"q", 200) == "conflict"
    assert key_from_saved(saved_key(2**64 - 1)) == 2**64 - 1
    assert key_from_saved("#not-hex-digits!") == id_key("#not-hex-digits!")


def held_bytes(ids: idmemory.RememberedIds) -> int:
    """What the structure holds: its dict, each device's object and arrays (sys.getsizeof, headers included)."""
    total = sys.getsizeof(ids.devices)
    for device, one in ids.devices.items():
        total += sys.getsizeof(device) + one.footprint()
    return total


def test_bytes_per_remembered_id_at_the_default_cap(twin):
    """operations.md "Memory": 10 devices x 10,000 ids (the default cap), and one device with one id."""
    ids = twin.RememberedIds(settings())
    for device in range(10):
        for n in range(10_000):
            ids.check(f"d{device}", n, b"body", n)
    per_id = held_bytes(ids) / 100_000
    print(f"{per_id:.1f} bytes per remembered id at the cap")
    assert ids.nbytes() == 10 * (10_000 * 20 + 16_384 * 4)  # 26.6 bytes per id in the arrays
    assert per_id < 29, per_id
    one = twin.RememberedIds(settings())
    one.check("phone", "m-1", b"body", 0)
    print(f"{held_bytes(one)} bytes for a device with one id")
    assert held_bytes(one) < 1024


def test_a_device_that_sent_little_holds_little(twin):
    one = twin.DeviceIds()
    assert one.nbytes() == 8 * 20 + 16 * 4


def test_the_twins_keep_the_same_entries_and_load_each_others():
    if _idmemory is None:
        pytest.skip("the compiled twin is not built")
    rng = random.Random(7)
    pure, compiled = idmemory.RememberedIds(settings(5, 40)), _idmemory.RememberedIds(settings(5, 40))
    for now in range(3000):
        device, msg_id = rng.choice("ab"), rng.choice([rng.randrange(-5, 90), f"s{rng.randrange(90)}", 2**64 - 1])
        body = rng.choice([b"x", b"y"])
        assert pure.check(device, msg_id, body, now) == compiled.check(device, msg_id, body, now)
    assert pure.saved() == compiled.saved() and len(pure) == len(compiled) and pure.nbytes() == compiled.nbytes()
    crossed = idmemory.RememberedIds(settings(5, 40))
    crossed.load(compiled.saved())
    assert crossed.saved() == pure.saved()
