"""Remembered ids of ack:true sends, compiled twin of ``idmemory.py``.

Same names, same results as the pure-Python module (whose docstring gives the design); the same keys, so
what one saved the other loads. A device's ring and index are C arrays (``PyMem_Malloc``: tracemalloc
sees them) of the same sizes as the twin's, so the bytes per id are the same.
"""

from cpython.mem cimport PyMem_Free, PyMem_Malloc
from libc.stdint cimport INT64_MIN, int32_t, int64_t, uint32_t, uint64_t
from libc.string cimport memset

from zlib import crc32

from .idmemory import FIRST_CAPACITY, SAVED_PREFIX, id_key, key_from_saved, saved_key

DEAD = -(2**63)
M64 = 2**64 - 1

cdef int64_t C_DEAD = INT64_MIN
cdef uint64_t C_GOLDEN = 0x9E3779B97F4A7C15ULL


cdef Py_ssize_t _index_size(Py_ssize_t capacity):
    cdef Py_ssize_t size = 1
    while size * 3 < capacity * 4:
        size *= 2
    return size


cdef class DeviceIds:
    """One device's ring of (key, time, body digest) and its index."""

    cdef uint64_t* _keys
    cdef int64_t* _times
    cdef uint32_t* _digests
    cdef int32_t* _index
    cdef public Py_ssize_t capacity, size, shift, start, count, live
    cdef public int64_t newest

    def __cinit__(self, Py_ssize_t capacity=FIRST_CAPACITY):
        self._alloc(capacity)

    cdef int _alloc(self, Py_ssize_t capacity) except -1:
        cdef Py_ssize_t size = _index_size(capacity)
        keys = <uint64_t*>PyMem_Malloc(capacity * sizeof(uint64_t))
        times = <int64_t*>PyMem_Malloc(capacity * sizeof(int64_t))
        digests = <uint32_t*>PyMem_Malloc(capacity * sizeof(uint32_t))
        index = <int32_t*>PyMem_Malloc(size * sizeof(int32_t))
        if keys == NULL or times == NULL or digests == NULL or index == NULL:
            PyMem_Free(keys)
            PyMem_Free(times)
            PyMem_Free(digests)
            PyMem_Free(index)
            raise MemoryError()
        memset(index, 0xFF, size * sizeof(int32_t))  # -1: empty
        self._keys, self._times, self._digests, self._index = keys, times, digests, index
        self.capacity = capacity
        self.size = size
        self.shift = 64
        while size > 1:
            size >>= 1
            self.shift -= 1
        self.start = 0
        self.count = 0
        self.live = 0
        self.newest = C_DEAD
        return 0

    def __dealloc__(self):
        PyMem_Free(self._keys)
        PyMem_Free(self._times)
        PyMem_Free(self._digests)
        PyMem_Free(self._index)

    def nbytes(self):
        return self.capacity * 20 + self.size * 4

    def footprint(self):
        """Bytes held: the object and its arrays."""
        return self.__sizeof__() + self.nbytes()

    cdef inline Py_ssize_t _home(self, uint64_t key):
        return <Py_ssize_t>(key >> self.shift) if self.shift < 64 else 0

    cdef Py_ssize_t _find(self, uint64_t key):
        cdef Py_ssize_t mask = self.size - 1
        cdef Py_ssize_t slot = self._home(key)
        cdef int32_t position
        while True:
            position = self._index[slot]
            if position < 0:
                return -1 - slot  # not there: -1 - the empty slot where probing ended
            if self._keys[position] == key:
                return slot
            slot = (slot + 1) & mask

    def find(self, key):
        cdef Py_ssize_t slot = self._find(<uint64_t>key)
        return slot if slot >= 0 else -1

    cdef void _unindex(self, Py_ssize_t slot):
        cdef Py_ssize_t mask = self.size - 1
        cdef Py_ssize_t hole = slot, probe = slot, home
        cdef int32_t position
        while True:
            probe = (probe + 1) & mask
            position = self._index[probe]
            if position < 0:
                break
            home = self._home(self._keys[position])
            if (hole < probe and (home <= hole or home > probe)) or (hole > probe and probe < home <= hole):
                self._index[hole] = position
                hole = probe
        self._index[hole] = -1

    cdef void _remove(self, Py_ssize_t slot):
        self._times[self._index[slot]] = C_DEAD
        self.live -= 1
        self._unindex(slot)

    def remove(self, Py_ssize_t slot):
        self._remove(slot)

    cdef int _add(self, uint64_t key, int64_t now, uint32_t digest, Py_ssize_t cap, int64_t window_ms) except -1:
        if cap <= 0:
            return 0
        while self.live >= cap:
            self._drop_oldest()
        if self.count == self.capacity:
            while self.count and (self._times[self.start] == C_DEAD or self._times[self.start] + window_ms <= now):
                self._drop_oldest()
            if self.count == self.capacity:
                self._rebuild(min(cap, self.capacity * 2) if self.capacity < cap else self.capacity)
        self._put(key, now, digest)
        return 0

    def add(self, key, int64_t now, uint32_t digest, Py_ssize_t cap, int64_t window_ms):
        self._add(<uint64_t>key, now, digest, cap, window_ms)

    cdef void _put(self, uint64_t key, int64_t now, uint32_t digest):
        cdef Py_ssize_t mask = self.size - 1
        cdef Py_ssize_t slot = self._home(key)
        while self._index[slot] >= 0:
            slot = (slot + 1) & mask
        self._put_at(slot, key, now, digest)

    cdef void _put_at(self, Py_ssize_t slot, uint64_t key, int64_t now, uint32_t digest):
        cdef Py_ssize_t position = (self.start + self.count) % self.capacity
        self._keys[position] = key
        self._times[position] = now
        self._digests[position] = digest
        self.count += 1
        self.live += 1
        if now > self.newest:
            self.newest = now
        self._index[slot] = <int32_t>position

    cdef void _drop_oldest(self):
        cdef Py_ssize_t position = self.start, mask = self.size - 1, slot
        if self._times[position] != C_DEAD:
            slot = self._home(self._keys[position])
            while self._index[slot] != position:
                slot = (slot + 1) & mask
            self._unindex(slot)
            self.live -= 1
        self.start = (position + 1) % self.capacity
        self.count -= 1

    cdef int _rebuild(self, Py_ssize_t capacity) except -1:
        cdef uint64_t* keys = self._keys
        cdef int64_t* times = self._times
        cdef uint32_t* digests = self._digests
        cdef int32_t* index = self._index
        cdef Py_ssize_t old_capacity = self.capacity, start = self.start, count = self.count, n, position
        cdef int64_t newest = self.newest
        try:
            self._alloc(capacity)
        except MemoryError:
            self._keys, self._times, self._digests, self._index = keys, times, digests, index
            raise
        for n in range(count):
            position = (start + n) % old_capacity
            if times[position] != C_DEAD:
                self._put(keys[position], times[position], digests[position])
        self.newest = newest
        PyMem_Free(keys)
        PyMem_Free(times)
        PyMem_Free(digests)
        PyMem_Free(index)
        return 0

    def entries(self):
        """(key, time, digest) of the live entries, oldest first."""
        cdef Py_ssize_t n, position
        out = []
        for n in range(self.count):
            position = (self.start + n) % self.capacity
            if self._times[position] != C_DEAD:
                out.append((self._keys[position], self._times[position], self._digests[position]))
        return iter(out)

    cdef object _entry(self, Py_ssize_t slot):
        cdef int32_t position = self._index[slot]
        return self._times[position], self._digests[position]


cdef inline uint64_t _key(object msg_id) except? 0:
    if type(msg_id) is int and 0 <= msg_id <= M64:
        return (<uint64_t>msg_id) * C_GOLDEN
    return <uint64_t>id_key(msg_id)


cdef class RememberedIds:
    """Every sending device's recent ids. ``settings`` gives ``idempotency_window`` (s) and
    ``idempotency_cache``, read at each call."""

    cdef public object settings
    cdef public dict devices

    def __init__(self, settings):
        self.settings = settings
        self.devices = {}

    cpdef object check(self, str device, object msg_id, object body, int64_t now):
        """None for a new id, now remembered; ``"duplicate"`` for an id remembered with the same body within
        the window; ``"conflict"`` for one remembered with another body. ``body`` is only read."""
        cdef DeviceIds ids = self.devices.get(device)
        if ids is None:
            ids = DeviceIds()
            self.devices[device] = ids
        cdef uint64_t key = _key(msg_id)
        cdef Py_ssize_t slot = ids._find(key)
        cdef uint32_t digest = crc32(body)
        settings = self.settings
        cdef int64_t window_ms = int(settings.idempotency_window * 1000)
        cdef Py_ssize_t cap = settings.idempotency_cache
        cdef int32_t position
        if slot >= 0:
            position = ids._index[slot]
            if ids._times[position] + window_ms > now:
                return "duplicate" if ids._digests[position] == digest else "conflict"
            ids._remove(slot)
        elif ids.live < cap and ids.count < ids.capacity:
            ids._put_at(-1 - slot, key, now, digest)
            return None
        ids._add(key, now, digest, cap, window_ms)
        return None

    def get(self, str device, msg_id):
        """(time, body digest) remembered for an id, whether or not within the window."""
        cdef DeviceIds ids = self.devices.get(device)
        if ids is None:
            return None
        cdef Py_ssize_t slot = ids._find(_key(msg_id))
        return ids._entry(slot) if slot >= 0 else None

    def forget(self, str device, msg_id):
        cdef DeviceIds ids = self.devices.get(device)
        cdef Py_ssize_t slot
        if ids is not None:
            slot = ids._find(_key(msg_id))
            if slot >= 0:
                ids._remove(slot)

    def sweep(self, int64_t now):
        """Drop the devices whose newest id is older than the window; how many were dropped."""
        cdef int64_t window = int(self.settings.idempotency_window * 1000)
        cdef DeviceIds ids
        stale = [device for device, ids in self.devices.items() if ids.newest + window <= now]
        for device in stale:
            del self.devices[device]
        return len(stale)

    def saved(self):
        """Every entry as the store saves it: (device, ``saved_key``, time, digest), each device's oldest first."""
        return [(device, saved_key(key), at, digest)
                for device, ids in self.devices.items() for key, at, digest in ids.entries()]

    def load(self, entries):
        """Entries saved at a shutdown, oldest first."""
        cdef Py_ssize_t cap = self.settings.idempotency_cache
        cdef int64_t window_ms = int(self.settings.idempotency_window * 1000)
        cdef DeviceIds ids
        cdef Py_ssize_t slot
        cdef uint64_t key
        for device, saved, at, digest in entries:
            ids = self.devices.get(device)
            if ids is None:
                ids = DeviceIds()
                self.devices[device] = ids
            key = key_from_saved(saved)
            slot = ids._find(key)
            if slot >= 0:
                ids._remove(slot)
            ids._add(key, at, digest, cap, window_ms)

    def __len__(self):
        cdef DeviceIds ids
        return sum([ids.live for ids in self.devices.values()])

    def nbytes(self):
        """The arrays' bytes (not the objects around them)."""
        return sum([ids.nbytes() for ids in self.devices.values()])
