"""The hot path: envelope codec and routing table.

The compiled modules (``_codec``, ``_routing``) are used when importable; the
pure-Python twins (``codec``, ``routing``) when not, or when the environment
sets ``RCCS_PUREPYTHON=1``. Both expose the same names with the same results
and exceptions. ``IMPLEMENTATION`` says which one is in use: ``"cython"`` or
``"python"``.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from . import codec, routing
    IMPLEMENTATION: str
elif os.environ.get("RCCS_PUREPYTHON") == "1":
    from . import codec, routing
    IMPLEMENTATION = "python"
else:
    try:
        from . import _codec as codec
        from . import _routing as routing
    except ImportError:
        from . import codec, routing
        IMPLEMENTATION = "python"
    else:
        IMPLEMENTATION = "cython"

from .errors import EnvelopeError

decode_envelope = codec.decode_envelope
encode_msg_prefix = codec.encode_msg_prefix
append_seq = codec.append_seq
RoutingTable = routing.RoutingTable
RouteStats = routing.RouteStats

__all__ = [
    "IMPLEMENTATION",
    "EnvelopeError",
    "RouteStats",
    "RoutingTable",
    "append_seq",
    "codec",
    "decode_envelope",
    "encode_msg_prefix",
    "routing",
]
