# Declarations of the compiled envelope codec, for other Cython modules to cimport.
#
# The cpdef functions behave exactly like their twins in ``codec.py``;
# ``skip_raw`` is the validating skipper on a raw buffer (``data[0:size]``,
# ``0 <= pos``, ``0 <= depth``) that ``skip_value`` and ``decode_envelope`` use.

cdef Py_ssize_t skip_raw(const unsigned char* data, Py_ssize_t size, Py_ssize_t pos, int depth) except -1

cpdef tuple decode_envelope(object data)

cpdef bytes encode_msg_prefix(object msg_id, object sender, object app_type, object body, object ts, object ack)

cpdef bytes append_seq(object prefix, object seq)
