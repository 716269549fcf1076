"""The hot path: envelope codec, routing table, remembered ids of acked sends.

The compiled modules (``_codec``, ``_routing``, ``_listener``) are used when importable; the
pure-Python twins (``codec``, ``routing``, ``listener``) when not, or when the environment
sets ``RCCS_PUREPYTHON=1``. The compiled listener is also refused, with a warning, when the
installed picows is not the version it was compiled against. Both expose the same names with
the same results and exceptions. ``IMPLEMENTATION`` says which one is in use: ``"cython"``,
``"python"``, or ``"cython+python-listener"`` after such a refusal. Module constants (selector
kinds, result codes, bucket bounds) are the same in both; import them from the twin
``rccs._fastpath.routing``.

The chosen modules are bound to ``codec_impl``, ``routing_impl`` and
``listener_impl``, never to ``codec``/``routing``/``listener``, so that
importing a twin by name always gives the twin.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import os
import warnings
from importlib.metadata import PackageNotFoundError, version
from types import ModuleType
from typing import TYPE_CHECKING

from .errors import EnvelopeError

log = logging.getLogger("rccs.fastpath")


def installed_picows_version() -> str | None:
    with contextlib.suppress(PackageNotFoundError):
        return version("picows")
    return None


def picows_mismatch(built_with: str, installed: str | None) -> str | None:
    """Why the compiled listener must not run with the installed picows, or None when it may.

    ``_listener`` subclasses picows' cdef ``WSListener`` and reads and writes ``WSTransport``'s C
    fields at offsets fixed when it was compiled; another picows version may lay them out
    differently, and nothing at run time would notice the wrong memory being read.
    """
    if not built_with:
        return "the compiled listener does not record which picows it was built against"
    if installed != built_with:
        return f"it was built against picows {built_with}, but picows {installed or '(not installed)'} is installed"
    return None


def _compiled_listener(pure: ModuleType, picows_version: str | None) -> ModuleType:
    """The compiled listener if it is built for the installed picows; else, with a warning, the twin."""
    try:
        compiled = importlib.import_module("._listener", __name__)
    except ImportError:
        return pure  # not built: the codec and routing decide what IMPLEMENTATION says
    except ValueError as error:  # Cython's own check: a picows class changed size since the build
        reason: str | None = f"picows' classes changed since it was built ({error})"
    else:
        reason = picows_mismatch(getattr(compiled, "PICOWS_BUILD_VERSION", ""), picows_version)
        if reason is None:
            return compiled
    message = f"rccs: using the pure-Python listener instead of the compiled one: {reason}; rebuild rccs"
    warnings.warn(message, RuntimeWarning, stacklevel=3)
    log.warning("%s", message)
    return pure


def _load(picows_version: str | None = None) -> tuple[ModuleType, ModuleType, ModuleType, str]:
    """The codec, routing and listener modules in use, and the IMPLEMENTATION name.

    ``picows_version`` is the installed picows' version (looked up when None; tests pass another to
    see the fallback). "cython" means all three compiled; "cython+python-listener" that the listener
    fell back to its twin because it was built for another picows.
    """
    from . import listener

    if os.environ.get("RCCS_PUREPYTHON") != "1":
        # Not built (a source tree without build_ext, or a pure-Python install): fall through to the twins.
        with contextlib.suppress(ImportError):
            codec = importlib.import_module("._codec", __name__)
            routing = importlib.import_module("._routing", __name__)
            chosen = _compiled_listener(listener, picows_version or installed_picows_version())
            return codec, routing, chosen, "cython" if chosen is not listener else "cython+python-listener"
    from . import codec, routing

    return codec, routing, listener, "python"


codec_impl, routing_impl, listener_impl, IMPLEMENTATION = _load()


def _load_idmemory() -> ModuleType:
    """The remembered ids of ack:true sends: compiled along with the codec and routing, else the twin."""
    from . import idmemory
    if IMPLEMENTATION != "python":
        with contextlib.suppress(ImportError):
            return importlib.import_module("._idmemory", __name__)
    return idmemory


idmemory_impl = _load_idmemory()

if TYPE_CHECKING:  # both implementations share the twins' signatures
    from .codec import append_seq, decode_envelope, encode_msg_prefix
    from .idmemory import RememberedIds
    from .routing import RouteStats, RoutingTable
else:
    decode_envelope = codec_impl.decode_envelope
    encode_msg_prefix = codec_impl.encode_msg_prefix
    append_seq = codec_impl.append_seq
    RoutingTable = routing_impl.RoutingTable
    RouteStats = routing_impl.RouteStats
    RememberedIds = idmemory_impl.RememberedIds

__all__ = [
    "IMPLEMENTATION",
    "EnvelopeError",
    "RememberedIds",
    "RouteStats",
    "RoutingTable",
    "append_seq",
    "codec_impl",
    "decode_envelope",
    "encode_msg_prefix",
    "idmemory_impl",
    "listener_impl",
    "routing_impl",
]
