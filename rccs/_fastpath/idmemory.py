"""The ids of recent ``"ack": true`` sends, per sending device, in a few bytes each (protocol.md section 12).

Each remembered send is 20 bytes in three arrays, a ring in the order the ids were taken: the id's key (64
bits: an integer id times an odd constant, other ids hashed, see ``id_key``), when it was taken (ms) and the
CRC-32 of its body (same body: ``duplicate``; another body: ``conflict``). An open-addressing index (linear
probing, 4-byte ring positions, a power of two at least 4/3 of the ring) finds an id's entry: 26.6 bytes per
id for a device at the default cap (10,000 ids: 200,000 bytes of ring, 65,536 of index), against ~236 bytes
for the ``OrderedDict`` of ids and tuples this replaces. A device's arrays start at 8 entries and double up
to ``idempotency_cache`` (only when the ring is full of ids within the window); when the cap is reached the
oldest id is forgotten. A device whose newest id is older than ``idempotency_window`` is dropped whole by
``sweep`` (every minute).

Keys instead of ids: two different ids of one device with the same 64-bit key would be taken for the same
id (a duplicate or a conflict); among 10,000 ids that happens with a probability of about 3e-12.

Pure-Python twin of ``_idmemory.pyx`` (the same keys, sizes and results; C arrays there, ``array`` here).
"""

from __future__ import annotations

import sys
import zlib
from array import array
from collections.abc import Iterator
from hashlib import blake2b

FIRST_CAPACITY = 8
DEAD = -(2**63)  # the time of an entry taken back (forget) or replaced by a newer send of its id
SAVED_PREFIX = "#"  # saved keys: "#" + 16 hex digits (an older version saved the ids themselves)


M64 = 2**64 - 1
GOLDEN = 0x9E3779B97F4A7C15  # odd: multiplying by it is a bijection of 64-bit numbers


def id_key(msg_id: str | int) -> int:
    """The 64-bit key of a message id; stable across processes (saved at shutdown).

    An integer id in [0, 2**64) is multiplied by an odd constant (no two such ids share a key; the index
    takes its slot from the product's high bits, which spread ids that are multiples of a power of two); other
    ids (strings, negative integers) are hashed (BLAKE2b, 8 bytes)."""
    if type(msg_id) is int and 0 <= msg_id <= M64:
        return (msg_id * GOLDEN) & M64
    # BLAKE2b of "s<str>" or "i<int>": a copy of a hash fed the prefix already (cheaper than a new one).
    hashed = _STRING_HASH.copy() if type(msg_id) is str else _INT_HASH.copy()
    hashed.update(str(msg_id).encode("utf-8", "surrogatepass"))
    return int.from_bytes(hashed.digest(), "little")


_STRING_HASH = blake2b(b"s", digest_size=8)
_INT_HASH = blake2b(b"i", digest_size=8)


def saved_key(key: int) -> str:
    return f"{SAVED_PREFIX}{key:016x}"


def key_from_saved(saved: str | int) -> int:
    """A saved entry's key: ``saved_key``'s form, or an id saved by a version that kept the ids themselves."""
    if type(saved) is str and len(saved) == 17 and saved[0] == SAVED_PREFIX:
        try:
            return int(saved[1:], 16)
        except ValueError:
            pass
    return id_key(saved)


def _index_size(capacity: int) -> int:
    size = 1
    while size * 3 < capacity * 4:
        size *= 2
    return size


class DeviceIds:
    """One device's ring of (key, time, body digest) and its index."""

    __slots__ = ("count", "digests", "index", "keys", "live", "newest", "shift", "start", "times")

    def __init__(self, capacity: int = FIRST_CAPACITY):
        self.keys = array("Q", bytes(8 * capacity))
        self.times = array("q", bytes(8 * capacity))
        self.digests = array("I", bytes(4 * capacity))
        size = _index_size(capacity)
        self.index = array("i", [-1]) * size
        self.shift = 65 - size.bit_length()  # a key's home slot: its top log2(size) bits
        self.start = 0  # ring position of the oldest entry
        self.count = 0  # entries in the ring, dead ones included
        self.live = 0  # entries in the ring and the index
        self.newest = DEAD  # when the newest id was taken

    def nbytes(self) -> int:
        return len(self.keys) * 8 + len(self.times) * 8 + len(self.digests) * 4 + len(self.index) * 4

    def footprint(self) -> int:
        """Bytes held: the object and its arrays."""
        return sys.getsizeof(self) + sum(sys.getsizeof(part) for part in (self.keys, self.times, self.digests,
                                                                          self.index))

    def find(self, key: int) -> int:
        """The index slot holding ``key``'s ring position, or -1."""
        index, keys = self.index, self.keys
        mask = len(index) - 1
        slot = key >> self.shift
        while True:
            position = index[slot]
            if position < 0:
                return -1
            if keys[position] == key:
                return slot
            slot = (slot + 1) & mask

    def _unindex(self, slot: int) -> None:
        """Empty an index slot, shifting back the entries after it that probed past it (no tombstones)."""
        index, keys, shift = self.index, self.keys, self.shift
        mask = len(index) - 1
        hole = slot
        probe = slot
        while True:
            probe = (probe + 1) & mask
            position = index[probe]
            if position < 0:
                break
            home = keys[position] >> shift
            # The entry at ``probe`` may move into the hole unless its home lies cyclically in (hole, probe].
            if (hole < probe and (home <= hole or home > probe)) or (hole > probe and probe < home <= hole):
                index[hole] = position
                hole = probe
        index[hole] = -1

    def remove(self, slot: int) -> None:
        """Forget the entry an index slot points to (its ring entry stays, dead, until the ring moves on)."""
        self.times[self.index[slot]] = DEAD
        self.live -= 1
        self._unindex(slot)

    def add(self, key: int, now: int, digest: int, cap: int, window_ms: int) -> None:
        """Remember ``key`` (not present); the oldest ids go when ``cap`` are held."""
        if cap <= 0:
            return
        while self.live >= cap:
            self._drop_oldest()
        if self.count == len(self.keys):
            # The ring is full: first the entries at its old end that no longer count (expired or dead),
            # then more room (up to the cap), or the dead entries squeezed out.
            times = self.times
            while self.count and (times[self.start] == DEAD or times[self.start] + window_ms <= now):
                self._drop_oldest()
            capacity = len(self.keys)
            if self.count == capacity:
                self._rebuild(min(cap, capacity * 2) if capacity < cap else capacity)
        self._put(key, now, digest)

    def _put(self, key: int, now: int, digest: int) -> None:
        index = self.index
        mask = len(index) - 1
        slot = key >> self.shift
        while index[slot] >= 0:
            slot = (slot + 1) & mask
        self.put(slot, key, now, digest)

    def put(self, slot: int, key: int, now: int, digest: int) -> None:
        """A new entry at the ring's end, indexed at ``slot`` (empty, where probing for ``key`` ended)."""
        position = (self.start + self.count) % len(self.keys)
        self.keys[position] = key
        self.times[position] = now
        self.digests[position] = digest
        self.count += 1
        self.live += 1
        if now > self.newest:
            self.newest = now
        self.index[slot] = position

    def _drop_oldest(self) -> None:
        position = self.start
        if self.times[position] != DEAD:
            index = self.index
            mask = len(index) - 1
            slot = self.keys[position] >> self.shift
            while index[slot] != position:
                slot = (slot + 1) & mask
            self._unindex(slot)
            self.live -= 1
        self.start = (position + 1) % len(self.keys)
        self.count -= 1

    def _rebuild(self, capacity: int) -> None:
        """New arrays of ``capacity`` entries holding the live ones, in order."""
        old = list(self.entries())
        newest = self.newest
        self.__init__(capacity)  # type: ignore[misc]
        for key, at, digest in old:
            self._put(key, at, digest)
        self.newest = newest

    def entries(self) -> Iterator[tuple[int, int, int]]:
        """(key, time, digest) of the live entries, oldest first."""
        capacity = len(self.keys)
        for n in range(self.count):
            position = (self.start + n) % capacity
            at = self.times[position]
            if at != DEAD:
                yield self.keys[position], at, self.digests[position]


class RememberedIds:
    """Every sending device's recent ids. ``settings`` gives ``idempotency_window`` (s) and
    ``idempotency_cache``, read at each call."""

    def __init__(self, settings: object):
        self.settings = settings
        self.devices: dict[str, DeviceIds] = {}

    def check(self, device: str, msg_id: str | int, body: bytes, now: int) -> str | None:
        """None for a new id, now remembered; ``"duplicate"`` for an id remembered with the same body within
        the window; ``"conflict"`` for one remembered with another body. ``body`` is only read."""
        ids = self.devices.get(device)
        if ids is None:
            ids = self.devices[device] = DeviceIds()
        # id_key, inlined for the common case
        key = (msg_id * GOLDEN) & M64 if type(msg_id) is int and 0 <= msg_id <= M64 else id_key(msg_id)
        index, keys = ids.index, ids.keys
        mask = len(index) - 1
        slot = key >> ids.shift
        position = index[slot]
        while position >= 0 and keys[position] != key:  # ids.find, inlined
            slot = (slot + 1) & mask
            position = index[slot]
        digest = zlib.crc32(body)  # stable across processes (saved at shutdown), unlike hash()
        settings = self.settings
        window_ms = int(settings.idempotency_window * 1000)  # type: ignore[attr-defined]
        cap = settings.idempotency_cache  # type: ignore[attr-defined]
        if position >= 0:
            if ids.times[position] + window_ms > now:
                return "duplicate" if ids.digests[position] == digest else "conflict"
            ids.remove(slot)  # remembered, but from before the window: taken as new
        elif ids.live < cap and ids.count < len(keys):
            ids.put(slot, key, now, digest)  # nothing to make room for: the empty slot found is the key's
            return None
        ids.add(key, now, digest, cap, window_ms)
        return None

    def get(self, device: str, msg_id: str | int) -> tuple[int, int] | None:
        """(time, body digest) remembered for an id, whether or not within the window."""
        ids = self.devices.get(device)
        if ids is None:
            return None
        slot = ids.find(id_key(msg_id))
        if slot < 0:
            return None
        position = ids.index[slot]
        return ids.times[position], ids.digests[position]

    def forget(self, device: str, msg_id: str | int) -> None:
        ids = self.devices.get(device)
        if ids is not None:
            slot = ids.find(id_key(msg_id))
            if slot >= 0:
                ids.remove(slot)

    def sweep(self, now: int) -> int:
        """Drop the devices whose newest id is older than the window; how many were dropped."""
        window = int(self.settings.idempotency_window * 1000)  # type: ignore[attr-defined]
        stale = [device for device, ids in self.devices.items() if ids.newest + window <= now]
        for device in stale:
            del self.devices[device]
        return len(stale)

    def saved(self) -> list[tuple[str, str | int, int, int]]:
        """Every entry as the store saves it: (device, ``saved_key``, time, digest), each device's oldest first."""
        return [(device, saved_key(key), at, digest)
                for device, ids in self.devices.items() for key, at, digest in ids.entries()]

    def load(self, entries: list[tuple[str, str | int, int, int]]) -> None:
        """Entries saved at a shutdown, oldest first."""
        cap = self.settings.idempotency_cache  # type: ignore[attr-defined]
        window_ms = int(self.settings.idempotency_window * 1000)  # type: ignore[attr-defined]
        for device, saved, at, digest in entries:
            ids = self.devices.get(device)
            if ids is None:
                ids = self.devices[device] = DeviceIds()
            key = key_from_saved(saved)
            slot = ids.find(key)
            if slot >= 0:
                ids.remove(slot)
            ids.add(key, at, digest, cap, window_ms)

    def __len__(self) -> int:
        return sum(ids.live for ids in self.devices.values())

    def nbytes(self) -> int:
        """The arrays' bytes (not the objects around them)."""
        return sum(ids.nbytes() for ids in self.devices.values())
