# Declarations of the compiled envelope codec, for other Cython modules to cimport.
#
# The cpdef functions behave exactly like their twins in ``codec.py``;
# ``skip_raw`` is the validating skipper on a raw buffer (``data[0:size]``,
# ``0 <= pos``, ``0 <= depth``) that ``skip_value`` and ``decode_envelope`` use.
# ``decode_envelope_from`` and ``encode_msg_from`` are ``decode_envelope`` and ``encode_msg`` on a
# buffer the caller holds (a received frame), so the direct path copies a body once: into its ``msg``.

cdef Py_ssize_t skip_raw(const unsigned char* data, Py_ssize_t size, Py_ssize_t pos, int depth) except -1

cdef dict decode_envelope_from(const unsigned char* buf, Py_ssize_t size, Py_ssize_t* body_start,
                               Py_ssize_t* body_end)

cpdef tuple decode_envelope(object data)

cpdef bytes encode_msg_prefix(object msg_id, object sender, object app_type, object body, object ts, object ack)

cpdef bytes encode_msg(object msg_id, object sender, object app_type, object body, object ts, object ack,
                       object seq)

cdef bytes encode_msg_from(object msg_id, str sender, str app_type, const char* body, Py_ssize_t body_size,
                           long long ts, bint ack, object seq, Py_ssize_t* body_offset)

cpdef bytes append_seq(object prefix, object seq)
