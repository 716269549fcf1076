"""The broker seam (``base.Broker``) and its engines: ``memory`` (one process)."""

from .base import Broker
from .memory import MemoryBroker

__all__ = ["Broker", "MemoryBroker", "open_broker"]


def open_broker(url: str = "memory") -> Broker:
    """The broker for ``url``: ``memory`` is the only engine so far."""
    if url != "memory":
        raise ValueError(f"unknown broker {url!r}: only 'memory' is available")
    return MemoryBroker()
