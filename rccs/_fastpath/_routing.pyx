"""Routing table and hot-path counters, compiled twin of ``routing.py``.

Same names, same results, same exceptions as the pure-Python module; read its
docstring for the design. The table keeps the same dict-based indexes (so
``select`` returns handles in the same order); entries are C structs with a
C activity stamp, and ``RouteStats`` keeps its counters in C arrays.
"""

from cpython.long cimport PyLong_AsLongLongAndOverflow

SELECT_ALL = 0
SELECT_TYPE = 1
SELECT_CAPABILITY = 2

RESULT_ROUTED = 0
RESULT_NO_ROUTE = 1
RESULT_OFFLINE = 2
RESULT_REJECTED = 3
RESULT_NAMES = ("routed", "no_route", "offline", "rejected")

# Upper bounds, in microseconds, of the routing latency histogram buckets.
LATENCY_BUCKETS_US = (5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 100000)
# Latencies are clamped to [0, one minute] so every sum stays a small exact integer.
MAX_LATENCY_NS = 60_000_000_000
# Largest count accepted by one count_frames call.
MAX_FRAMES_PER_CALL = 2**32 - 1

cdef long long C_MAX_LATENCY_NS = 60_000_000_000

cdef enum:
    RESULT_COUNT = 4
    BOUND_COUNT = 13

cdef double[BOUND_COUNT] _BOUNDS_US
_BOUNDS_US[:] = [5, 10, 25, 50, 100, 250, 500, 1000, 2500, 5000, 10000, 25000, 100000]


cdef class _Entry:
    """One online device in the table; its fields are declared in _routing.pxd."""


cdef inline dict _bucket(dict index, object key):
    """``index.setdefault(key, {})``."""
    cdef object bucket = index.get(key)
    if bucket is None:
        bucket = {}
        index[key] = bucket
    return <dict>bucket


cdef inline int _discard(dict index, object key, object device) except -1:
    cdef object bucket = index.get(key)
    if bucket is not None:
        (<dict>bucket).pop(device, None)
        if not bucket:
            del index[key]
    return 0


cdef inline bint _kept(object device, object exclude) except -1:
    """``device != exclude`` (``device`` is always a str key of the table)."""
    if exclude is None:
        return True
    if type(exclude) is str:
        return <str>device != <str>exclude
    return device != exclude


cdef class RoutingTable:
    """Online devices per user, indexed by device, type and capability."""

    def __cinit__(self):
        self._users = {}
        self._by_type = {}
        self._by_capability = {}
        self._type_counts = {}
        self._clock = 0
        self._size = 0

    def __len__(self):
        return self._size

    def add(self, user, device, device_type, capabilities, handle):
        """Register ``handle`` as the online connection of (user, device).

        Returns the handle it replaced (the same device connected again), or None.
        """
        cdef tuple caps
        cdef object cap, previous
        cdef _Entry entry
        if type(user) is not str or type(device) is not str or type(device_type) is not str:
            raise TypeError("user, device and device_type must be str")
        caps = tuple(dict.fromkeys(capabilities))
        for cap in caps:
            if type(cap) is not str:
                raise TypeError("capabilities must be str")
        previous = self._unlink(user, device)
        self._clock += 1
        entry = _Entry.__new__(_Entry)
        entry.handle = handle
        entry.device = device
        entry.device_type = device_type
        entry.capabilities = caps
        entry.stamp = self._clock
        _bucket(self._users, user)[device] = entry
        _bucket(self._by_type, (user, device_type))[device] = entry
        for cap in caps:
            _bucket(self._by_capability, (user, cap))[device] = entry
        self._type_counts[device_type] = self._type_counts.get(device_type, 0) + 1
        self._size += 1
        return previous

    def remove(self, user, device, handle):
        """Remove (user, device) if ``handle`` is still its connection. True if removed."""
        cdef object devices = self._users.get(user)
        cdef object entry
        if devices is None:
            return False
        entry = (<dict>devices).get(device)
        if entry is None or (<_Entry>entry).handle is not handle:
            return False
        self._unlink(user, device)
        return True

    cdef object _unlink(self, object user, object device):
        cdef object devices = self._users.get(user)
        cdef object found
        cdef _Entry entry
        cdef object cap, remaining
        if devices is None:
            return None
        found = (<dict>devices).pop(device, None)
        if found is None:
            return None
        entry = <_Entry>found
        if not devices:
            del self._users[user]
        _discard(self._by_type, (user, entry.device_type), device)
        for cap in entry.capabilities:
            _discard(self._by_capability, (user, cap), device)
        remaining = self._type_counts[entry.device_type] - 1
        if remaining:
            self._type_counts[entry.device_type] = remaining
        else:
            del self._type_counts[entry.device_type]
        self._size -= 1
        return entry.handle

    cpdef touch(self, object user, object device):
        """Mark (user, device) as the most recently active of its user's devices."""
        cdef object devices = self._users.get(user)
        cdef object entry
        if devices is not None:
            entry = (<dict>devices).get(device)
            if entry is not None:
                self._clock += 1
                (<_Entry>entry).stamp = self._clock

    cpdef object get(self, object user, object device):
        """The online handle of (user, device), or None."""
        cdef object devices = self._users.get(user)
        cdef object entry
        if devices is None:
            return None
        entry = (<dict>devices).get(device)
        return None if entry is None else (<_Entry>entry).handle

    def most_recent(self, user, devices):
        """Handle of the most recently active online device among ``devices``, or None."""
        cdef object online = self._users.get(user)
        cdef object device, item
        cdef _Entry entry
        cdef _Entry best = None
        if online is None:
            return None
        for device in devices:
            item = (<dict>online).get(device)
            if item is not None:
                entry = <_Entry>item
                if best is None or entry.stamp > best.stamp:
                    best = entry
        return None if best is None else best.handle

    def devices(self, user):
        """Ids of the user's online devices, in no particular order."""
        cdef object devices = self._users.get(user)
        return [] if devices is None else list(<dict>devices)

    def select(self, user, kind, value, pick_one, exclude):
        """Handles of the user's online devices matching a selector.

        ``kind`` is SELECT_ALL (``value`` ignored), SELECT_TYPE or
        SELECT_CAPABILITY (``value`` the str to match). ``exclude`` is a device
        id left out (the sender), or None. With ``pick_one`` at most one
        handle is returned: the most recently active match.
        """
        cdef object candidates, device, item
        cdef _Entry entry
        cdef _Entry best = None
        cdef list found
        if kind == 0:
            candidates = self._users.get(user)
        elif kind == 1:
            candidates = self._by_type.get((user, value))
        elif kind == 2:
            candidates = self._by_capability.get((user, value))
        else:
            raise ValueError(f"unknown selector kind {kind}")
        if not candidates:
            return []
        if pick_one:
            for device, item in (<dict>candidates).items():
                entry = <_Entry>item
                if _kept(device, exclude) and (best is None or entry.stamp > best.stamp):
                    best = entry
            return [] if best is None else [best.handle]
        found = []
        for device, item in (<dict>candidates).items():
            if _kept(device, exclude):
                found.append((<_Entry>item).handle)
        return found

    def count_by_type(self):
        """Online devices per device type, across users."""
        return dict(self._type_counts)


cdef inline Py_ssize_t _bucket_index(double latency_us) noexcept nogil:
    cdef Py_ssize_t index = 0
    while index < BOUND_COUNT and not latency_us <= _BOUNDS_US[index]:
        index += 1
    return index


cdef class RouteStats:
    """Plain counters the hot path bumps; metrics read them at scrape time."""

    def __cinit__(self):
        cdef int i
        for i in range(RESULT_COUNT):
            self._results[i] = 0
        for i in range(BOUND_COUNT + 1):
            self._buckets[i] = 0
        self._latency_sum_ns = 0
        self._frames_in = 0
        self._frames_out = 0

    cpdef record_route(self, object result, object latency_ns):
        """Count one routed ``send`` with its result and server-side latency (clamped to 0..MAX_LATENCY_NS)."""
        cdef long long ns
        cdef int overflow = 0
        if type(result) is not int or not 0 <= result < RESULT_COUNT:
            raise ValueError(f"unknown result {result!r}")
        if type(latency_ns) is not int:
            raise TypeError("latency_ns must be an int")
        ns = PyLong_AsLongLongAndOverflow(latency_ns, &overflow)
        if overflow > 0:
            ns = C_MAX_LATENCY_NS
        elif overflow < 0:
            ns = 0
        self.add_route(<int>result, ns)

    cdef void add_route(self, int result, long long latency_ns) noexcept:
        if latency_ns > C_MAX_LATENCY_NS:
            latency_ns = C_MAX_LATENCY_NS
        elif latency_ns < 0:
            latency_ns = 0
        self._results[result] += 1
        self._latency_sum_ns += <unsigned long long>latency_ns
        # Same double arithmetic as routing.py's ``latency_ns / 1000.0`` (exact below 2**53).
        self._buckets[_bucket_index(<double>latency_ns / 1000.0)] += 1

    cpdef count_frames(self, object frames_in, object frames_out):
        """Add to the messages-in and messages-out counters."""
        if not (type(frames_in) is int and type(frames_out) is int
                and 0 <= frames_in <= MAX_FRAMES_PER_CALL and 0 <= frames_out <= MAX_FRAMES_PER_CALL):
            raise ValueError("frame counts must be ints in 0..2**32-1")
        self.add_frames(<unsigned long long>frames_in, <unsigned long long>frames_out)

    cdef void add_frames(self, unsigned long long frames_in, unsigned long long frames_out) noexcept:
        self._frames_in += frames_in
        self._frames_out += frames_out

    def snapshot(self):
        """A consistent copy: results by name, latency buckets (non-cumulative), sums, frames."""
        return {
            "results": {RESULT_NAMES[i]: self._results[i] for i in range(RESULT_COUNT)},
            "latency_buckets": [self._buckets[i] for i in range(BOUND_COUNT + 1)],
            "latency_sum_ns": self._latency_sum_ns,
            "frames_in": self._frames_in,
            "frames_out": self._frames_out,
        }
