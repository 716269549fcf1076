"""The hot path: envelope codec and routing table.

The compiled modules (``_codec``, ``_routing``, ``_listener``) are used when importable; the
pure-Python twins (``codec``, ``routing``, ``listener``) when not, or when the environment
sets ``RCCS_PUREPYTHON=1``. Both expose the same names with the same results
and exceptions. ``IMPLEMENTATION`` says which one is in use: ``"cython"`` or
``"python"``. Module constants (selector kinds, result codes, bucket bounds)
are the same in both; import them from the twin ``rccs._fastpath.routing``.

The chosen modules are bound to ``codec_impl``, ``routing_impl`` and
``listener_impl``, never to ``codec``/``routing``/``listener``, so that
importing a twin by name always gives the twin.
"""

from __future__ import annotations

import contextlib
import importlib
import os
from types import ModuleType
from typing import TYPE_CHECKING

from .errors import EnvelopeError


def _load() -> tuple[ModuleType, ModuleType, ModuleType, str]:
    if os.environ.get("RCCS_PUREPYTHON") != "1":
        # Not built (a source tree without build_ext, or a pure-Python install): fall through to the twins.
        with contextlib.suppress(ImportError):
            compiled = [importlib.import_module(f"._{name}", __name__) for name in ("codec", "routing", "listener")]
            return compiled[0], compiled[1], compiled[2], "cython"
    from . import codec, listener, routing

    return codec, routing, listener, "python"


codec_impl, routing_impl, listener_impl, IMPLEMENTATION = _load()

if TYPE_CHECKING:  # both implementations share the twins' signatures
    from .codec import append_seq, decode_envelope, encode_msg_prefix
    from .routing import RouteStats, RoutingTable
else:
    decode_envelope = codec_impl.decode_envelope
    encode_msg_prefix = codec_impl.encode_msg_prefix
    append_seq = codec_impl.append_seq
    RoutingTable = routing_impl.RoutingTable
    RouteStats = routing_impl.RouteStats

__all__ = [
    "IMPLEMENTATION",
    "EnvelopeError",
    "RouteStats",
    "RoutingTable",
    "append_seq",
    "codec_impl",
    "decode_envelope",
    "encode_msg_prefix",
    "listener_impl",
    "routing_impl",
]
