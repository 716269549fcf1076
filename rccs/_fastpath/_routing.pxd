# Declarations of the compiled routing table and counters, for other Cython modules to cimport.
# Behaviour is documented in routing.py, the pure-Python twin.

cdef class _Entry:
    cdef object handle
    cdef object device
    cdef object device_type
    cdef tuple capabilities
    cdef unsigned long long stamp


cdef class RoutingTable:
    cdef dict _users            # user -> {device: _Entry}, devices in insertion order
    cdef dict _by_type          # (user, device_type) -> {device: _Entry}
    cdef dict _by_capability    # (user, capability) -> {device: _Entry}
    cdef dict _type_counts      # device_type -> online devices, across users
    cdef unsigned long long _clock
    cdef Py_ssize_t _size

    cdef object _unlink(self, object user, object device)
    cpdef touch(self, object user, object device)
    cpdef object get(self, object user, object device)


cdef class RouteStats:
    cdef unsigned long long _results[4]     # by RESULT_* code
    cdef unsigned long long _buckets[14]    # len(LATENCY_BUCKETS_US) + 1 (the last one is unbounded)
    cdef unsigned long long _latency_sum_ns
    cdef unsigned long long _frames_in
    cdef unsigned long long _frames_out

    cpdef record_route(self, object result, object latency_ns)
    cpdef count_frames(self, object frames_in, object frames_out)
    # The same two counts for compiled callers, without argument objects or checks: ``result`` must be
    # a RESULT_* code (0..3); ``latency_ns`` is clamped like record_route's.
    cdef void add_route(self, int result, long long latency_ns) noexcept
    cdef void add_frames(self, unsigned long long frames_in, unsigned long long frames_out) noexcept
